"""Text as people see it: safe for a terminal, and stable colours for names."""

from __future__ import annotations

import unicodedata
import zlib

__all__ = ["name_colour", "printable"]

# 256-colour palette entries that read well on dark and light backgrounds.
_PALETTE = (33, 39, 41, 70, 99, 129, 135, 166, 172, 178, 202, 208, 37, 63, 161, 31)


def printable(text: str) -> str:
    """``text`` with control characters shown as ``\\xNN`` escapes.

    A message must never move the cursor, clear the screen or fake a second
    line on someone's terminal or on the operator's screen.
    """
    if text.isprintable():
        return text
    out = []
    for char in text:
        if char.isprintable() or (char == " "):
            out.append(char)
        elif unicodedata.category(char) == "Zs":
            out.append(" ")
        else:
            out.append(repr(char)[1:-1] if ord(char) < 0x10000 else f"\\U{ord(char):08x}")
    return "".join(out)


def name_colour(name: str) -> int:
    """A 256-colour index that is the same for a name everywhere, every time."""
    return _PALETTE[zlib.crc32(name.casefold().encode()) % len(_PALETTE)]
