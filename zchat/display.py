"""Text as people see it: safe for a terminal, and stable colours for names.

``printable`` is the one filter between a peer's text and a screen (the
terminal client, pipe output, the broker's chat screen). It escapes only
what can harm a terminal or mislead a reader, and shows everything else as
written: emoji sequences, scripts that need joiners, combining marks.

Defines ``printable``, ``name_colour`` and ``PALETTE``.
"""

from __future__ import annotations

import re
import zlib

__all__ = ["PALETTE", "name_colour", "printable"]

TAB = "    "

# Escaped, as \xNN, \uNNNN or \UNNNNNNNN:
# - C0 controls (but tab, shown as spaces), DEL and C1 controls: they move
#   the cursor, clear the screen, start escape sequences (C1 CSI is 0x9b);
# - U+2028/U+2029 line and paragraph separators: a second line in one;
# - bidi embeddings, overrides and isolates (U+202A-202E, U+2066-2069):
#   they reorder what follows them ("Trojan Source"), so the text a reader
#   sees is not the text that was sent. The bidi *marks* (LRM, RLM, ALM)
#   stay: right-to-left writers need them, and they cannot reorder letters;
# - deprecated format controls (U+206A-206F) and interlinear annotations
#   (U+FFF9-FFFB), which some renderers use to hide text;
# - lone surrogates, which cannot even be encoded for the terminal.
# Not escaped, on purpose: ZWJ/ZWNJ (emoji sequences, Persian, Indic
# scripts), soft hyphen, variation selectors, tag characters (flag
# sequences), word joiner, other spaces, unassigned code points (new emoji).
_HARMFUL = re.compile(
    "[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069"
    "\u206a-\u206f\ufff9-\ufffb\ud800-\udfff]"
)


_NAMED = {"\n": "\\n", "\r": "\\r"}  # the two a reader knows by sight


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` as it may be shown: harmful characters as escapes, tabs as spaces.

    A message must never move the cursor, clear the screen, fake a second
    line or reorder itself on someone's terminal or on the operator's screen;
    everything else (emoji with joiners, ``می‌خواهم``, soft hyphens) shows
    as it was written.
    """
    if text.isprintable():  # the common case: nothing to look at
        return text
    return _HARMFUL.sub(_escape, text.replace("\t", TAB))


def _palette() -> tuple[int, ...]:
    # The 6x6x6 cube of 256-colour terminals, without the colours that are
    # too dark for a dark background, too light for a light one, or too
    # grey to tell apart: what is left reads well on both.
    levels = (0, 95, 135, 175, 215, 255)
    chosen = []
    for r in range(6):
        for g in range(6):
            for b in range(6):
                red, green, blue = levels[r], levels[g], levels[b]
                luma = (0.299 * red + 0.587 * green + 0.114 * blue) / 255
                if 0.3 <= luma <= 0.68 and max(r, g, b) - min(r, g, b) >= 2:
                    chosen.append(16 + 36 * r + 6 * g + b)
    return tuple(chosen)


# 256-colour palette entries for names: many, so that few names share one.
PALETTE = _palette()


def name_colour(name: str) -> int:
    """A 256-colour index that is the same for a name everywhere, every time."""
    return PALETTE[zlib.crc32(name.casefold().encode()) % len(PALETTE)]
