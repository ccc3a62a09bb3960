"""zchat.names and the protocol's name rules: names that look alike collide.

Look-alikes are spelt with escapes, so that this file shows what each is.
"""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zchat import names
from zchat.errors import ProtocolError
from zchat.names import RestrictionLevel, name_key, restriction_level, skeleton
from zchat.protocol import MAX_NAME_CHARS, check_name, fold_name

# Each renders as "alice" (or nearly), and must not coexist with it.
SAME_AS_ALICE = {
    "case": "ALICE",
    "fullwidth a": "\uff41lice",
    "all fullwidth": "\uff41\uff4c\uff49\uff43\uff45",
    "mathematical bold": "\U0001d41a\U0001d425\U0001d422\U0001d41c\U0001d41e",
    "digit one for l": "a1ice",
    "all-Cyrillic look-alike": "\u0430\u04cf\u0456\u0441\u0435",
}
# Each is refused outright: it could only ever pass for another name.
REFUSED = {
    "Cyrillic a among Latin": "\u0430lice",
    "Greek capital alpha among Latin": "\u0391LICE",
    "Cyrillic and Greek": "\u0430\u03b2",
    "combining grapheme joiner": "alice\u034f",
    "variation selector 16": "alice\ufe0f",
    "variation selector 17": "alice\U000e0100",
    "zero width space": "ali\u200bce",
    "zero width joiner": "alice\u200d",
    "soft hyphen": "al\u00adice",
    "Hangul filler": "\u3164",
    "Hangul filler after a name": "alice\u3164",
    "halfwidth Hangul filler": "\uffa0",
    "Braille blank": "\u2800",
    "Braille blank after a name": "alice\u2800",
    "Hangul choseong and jungseong fillers": "\u115f\u1160",
    "right-to-left override": "\u202eecila",
    "right-to-left isolate": "\u2067alice\u2069",
    "left-to-right mark": "alice\u200e",
    "tag characters": "alice\U000e0041",
    "Hebrew then Latin": "\u05e9\u05e8\u05d4alice",
    "Latin then Arabic": "bob\u0645\u062d\u0645\u062f",
    "right-to-left name starting with a digit": "1\u05e9\u05e8\u05d4",
    "right-to-left name ending with a hyphen": "\u05e9\u05e8\u05d4-",
    "European and Arabic digits in a right-to-left name": "\u0645\u062d7\u0663",
    "digits of two systems": "bob1\u0967",
    "leading combining mark": "\u0301alice",
    "the same mark twice": "ali\u0301\u0301ce",
    "five marks in a row": "a\u0300\u0301\u0302\u0303\u0304lice",
    "no-break space": "alice\u00a0",
    "ideographic space": "\u3000alice",
}
# Names in other scripts that must still join.
HONEST = ["alice", "\u041e\u043b\u044c\u0433\u0430", "\u5c71\u7530", "Jos\u00e9",
          "\u0141UKASZ", "\u05e9\u05e8\u05d4", "\u0645\u062d\u0645\u062f7",
          "\u5c71\u7530\u305f\u308d\u3046", "\u0417\u043e\u044f_2", "Zo\u00eb", "bob_99",
          "o'brien", "Ma\u00f1ana", "\u00c5sa", "\u03a3\u03c9\u03ba\u03c1\u03ac\u03c4\u03b7\u03c2",
          "\uae40\ubbfc\uc900", "\u0926\u0947\u0935", "Tokyo\u6771\u4eac", "\U0001f642"]


def reason(name: str) -> str:
    with pytest.raises(ProtocolError) as caught:
        check_name(name)
    assert caught.value.code == "bad_name"
    return caught.value.detail


@pytest.mark.parametrize("variant", SAME_AS_ALICE.values(), ids=SAME_AS_ALICE.keys())
def test_look_alikes_share_the_key_of_alice(variant: str) -> None:
    check_name(variant)
    assert fold_name(variant) == fold_name("alice")


@pytest.mark.parametrize("name", REFUSED.values(), ids=REFUSED.keys())
def test_look_alikes_that_cannot_be_made_safe_are_refused(name: str) -> None:
    assert reason(name)


def test_composed_and_decomposed_are_one_name_shown_composed() -> None:
    composed, decomposed = "alic\u00e9", "alice\u0301"
    assert check_name(decomposed) == check_name(composed) == composed
    assert fold_name(decomposed) == fold_name(composed)
    assert fold_name(composed) != fold_name("alice")


def test_the_shown_name_is_the_nfkc_form() -> None:
    assert check_name("\uff22\uff4f\uff42") == "Bob"  # fullwidth
    assert check_name("\ufb01ona") == "fiona"  # the fi ligature
    assert check_name("Carol") == "Carol"  # case is kept


@pytest.mark.parametrize("name", HONEST)
def test_names_in_one_script_are_accepted(name: str) -> None:
    assert check_name(name) == unicodedata.normalize("NFKC", name)


def test_honest_names_in_different_scripts_do_not_collide() -> None:
    keys = {fold_name(name) for name in HONEST}
    assert len(keys) == len(HONEST)


def test_details_say_what_is_wrong() -> None:
    assert "Cyrillic and Latin" in reason("\u0430lice")
    assert "U+034F COMBINING GRAPHEME JOINER" in reason("alice\u034f")
    assert "U+2800 BRAILLE PATTERN BLANK" in reason("\u2800")
    assert "right-to-left" in reason("alice\u05e9")
    assert "number systems" in reason("a1\u0661")


def test_length_counts_the_shown_form() -> None:
    assert check_name("e\u0301" * MAX_NAME_CHARS) == "\u00e9" * MAX_NAME_CHARS
    assert reason("x" * (MAX_NAME_CHARS + 1))
    assert reason("\ufdfa")  # one code point, 18 after NFKC
    assert reason("")
    assert reason("e\u0301" * (4 * MAX_NAME_CHARS))  # refused before normalising


def test_skeleton_is_the_uts39_one() -> None:
    assert skeleton("\u0440\u0430ypal") == "paypal"
    assert skeleton("m") == "rn"  # UTS #39 maps m to its look-alike rn
    assert skeleton("a\u200bb") == "ab"  # ignorables go
    assert skeleton("0") == "O"


def test_keys_are_keys_not_names() -> None:
    assert fold_name("Bob0") == fold_name("bobo")
    assert fold_name("mary") == fold_name("rnary")
    # Case folds first, so a capital I is an i, not an l (PROTOCOL.md, Names).
    assert fold_name("aIice") != fold_name("alice")


@pytest.mark.parametrize(
    ("name", "level"),
    [
        ("alice", RestrictionLevel.ASCII),
        ("\u041e\u043b\u044c\u0433\u0430", RestrictionLevel.SINGLE_SCRIPT),
        ("\u5c71\u7530\u305f\u308d\u3046", RestrictionLevel.SINGLE_SCRIPT),  # Japanese
        ("Tokyo\u6771\u4eac\u30bf\u30ef\u30fc", RestrictionLevel.HIGHLY_RESTRICTIVE),
        ("Dev\u0926\u0947\u0935", RestrictionLevel.MODERATELY_RESTRICTIVE),
        ("\u0430lice", RestrictionLevel.MINIMALLY_RESTRICTIVE),
        ("\u03b1lice", RestrictionLevel.MINIMALLY_RESTRICTIVE),
        ("\u0926\u0947\u0935\u0e01", RestrictionLevel.MINIMALLY_RESTRICTIVE),
    ],
)
def test_restriction_levels(name: str, level: RestrictionLevel) -> None:
    assert restriction_level(name) == level


def test_the_data_is_what_the_module_expects() -> None:
    # An upgrade of the data package that changed its files fails here.
    assert int(names.UNICODE_VERSION.split(".")[0]) >= 17
    assert skeleton("\u0430") == "a"
    assert restriction_level("\u0430") == RestrictionLevel.SINGLE_SCRIPT


@settings(max_examples=500)
@given(st.text(max_size=40))
def test_fold_name_is_idempotent(text: str) -> None:
    key = fold_name(text)
    assert fold_name(key) == key


@settings(max_examples=500)
@given(st.one_of(st.text(max_size=40), st.text(alphabet=st.characters(codec="utf-8"),
                                                 max_size=200),
                 st.integers(), st.none(), st.binary()))
def test_check_name_raises_only_protocol_errors(value: object) -> None:
    try:
        shown = check_name(value)
    except ProtocolError as exc:
        assert exc.code in ("bad_name", "bad_request")
        return
    assert isinstance(shown, str) and 1 <= len(shown) <= MAX_NAME_CHARS
    # What is shown is itself a valid name, with the same key.
    assert check_name(shown) == shown
    assert fold_name(shown) == fold_name(value)  # type: ignore[arg-type]


@settings(max_examples=300)
@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=32))
def test_ascii_names_fold_like_their_case(name: str) -> None:
    check_name(name)
    assert name_key(name.upper(), MAX_NAME_CHARS) == name_key(name, MAX_NAME_CHARS)


def test_strings_too_long_to_be_names_are_their_own_key() -> None:
    # A dm's 'to' is folded: a 64 KiB one must cost nothing and find nobody.
    long = "\ufdfa" * 20000
    assert fold_name(long) == long
    assert fold_name("\ufdfa\ufdfa") == "\ufdfa\ufdfa"  # 36 code points after NFKC
    assert fold_name("x" * 129) == "x" * 129
