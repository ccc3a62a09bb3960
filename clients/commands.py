"""What a typed line means, and what Tab completes: pure, no I/O.

``parse_line(text)`` turns one input line into a command object:

    hello                 Say("hello")
    //etc/motd            Say("/etc/motd")    (a leading // escapes the slash)
    /me waves             Say("/me waves")    (the action convention, see render.py)
    /msg bob psst         Private("bob", "psst")
    /who, /names          Who()
    /help, /?             Help()
    /clear                Clear()
    /nick NAME            Nick("NAME")
    /quit [REASON]        Quit(REASON or None)   (/exit too)
    /bogus                Invalid("unknown command /bogus ...")

``complete(before_cursor, names)`` gives the Tab completions for the word
under the cursor: a command name at the start of a line, else the name of
someone in the room (with ``": "`` after it when it starts the line, as IRC
clients do when addressing someone).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeAlias

from .render import ACTION_PREFIX

__all__ = [
    "COMMANDS",
    "Clear",
    "Command",
    "Help",
    "Invalid",
    "Nick",
    "Private",
    "Quit",
    "Say",
    "Who",
    "complete",
    "parse_line",
]


@dataclass(frozen=True, slots=True)
class Say:
    text: str


@dataclass(frozen=True, slots=True)
class Private:
    to: str
    text: str


@dataclass(frozen=True, slots=True)
class Who:
    pass


@dataclass(frozen=True, slots=True)
class Help:
    pass


@dataclass(frozen=True, slots=True)
class Clear:
    pass


@dataclass(frozen=True, slots=True)
class Nick:
    """A wish to change name: the protocol keeps a name for a session."""

    name: str


@dataclass(frozen=True, slots=True)
class Quit:
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Invalid:
    """A line that is not a valid command; ``why`` says what to type."""

    why: str


Command: TypeAlias = Say | Private | Who | Help | Clear | Nick | Quit | Invalid

COMMANDS = ("/clear", "/exit", "/help", "/me", "/msg", "/names", "/nick", "/quit", "/who")
_ALIASES = {"/names": "/who", "/?": "/help", "/exit": "/quit", "/query": "/msg"}


def parse_line(line: str) -> Command | None:
    """The command a typed line means; None for a blank line."""
    line = line.rstrip("\r\n")
    if not line.strip():
        return None
    if line.startswith("//"):
        return Say(line[1:])
    if not line.startswith("/"):
        return Say(line)
    word, _, rest = line.partition(" ")
    command = _ALIASES.get(word.casefold(), word.casefold())
    rest = rest.strip()
    if command == "/me":
        if not rest:
            return Invalid("usage: /me ACTION (e.g. /me waves)")
        return Say(ACTION_PREFIX + rest)
    if command == "/msg":
        to, _, text = rest.partition(" ")
        if not to or not text.strip():
            return Invalid("usage: /msg NAME TEXT")
        return Private(to, text.strip())
    if command == "/who":
        return Who()
    if command == "/help":
        return Help()
    if command == "/clear":
        return Clear()
    if command == "/nick":
        return Nick(rest) if rest and " " not in rest else Invalid("usage: /nick NAME")
    if command == "/quit":
        return Quit(rest or None)
    return Invalid(f"unknown command {word}: /help lists them, //{word[1:]} says it as text")


def complete(before_cursor: str, names: Iterable[str]) -> tuple[int, list[str]]:
    """Completions for the word that ends at the cursor.

    Returns:
        (length of that word, the texts that may replace it), best first.
    """
    word = before_cursor.rpartition(" ")[2]
    at_start = len(word) == len(before_cursor)
    if at_start and word.startswith("/"):
        folded = word.casefold()
        return len(word), [c + " " for c in COMMANDS if c.startswith(folded)]
    if not word:
        return 0, []
    folded = word.casefold()
    matches = sorted({n for n in names if n.casefold().startswith(folded)}, key=str.casefold)
    suffix = ": " if at_start else " "
    return len(word), [name + suffix for name in matches]
