"""What a typed line means, and what Tab completes: pure, no I/O.

``parse_line(text)`` turns one input line into a command object (irssi's
commands, where zchat has them):

    hello                 Say("hello")          (to the current window's room or person)
    //etc/motd            Say("/etc/motd")      (a leading // escapes the slash)
    /me waves             Say("/me waves")      (the action convention, see render.py)
    /msg bob psst         Private("bob", "psst")
    /query bob            Query("bob")          (a window for bob; /query bob hi sends too)
    /join #dev, /j dev    JoinRoom("dev")       (/join -private #dev creates it private)
    /part [#dev] [why]    PartRoom("dev" or None, why or None)
    /list                 ListRooms()
    /topic [TEXT]         Topic(TEXT or None)   (none: show it)
    /who, /names          Who()
    /invite NAME [#room]  Invite(NAME, room or None)
    /kick NAME [why]      Kick(NAME, why or None)
    /ban, /unban NAME     RoomAction("ban" or "unban", NAME); /op, /deop likewise
    /mode +p-m +t         Mode({"private": True, "moderated": False, "topic_ops": True})
    /window N, /win next  Window(N, or +1/-1 for next/prev); /close the window
    /help, /?             Help()
    /clear                Clear()
    /nick NAME            Nick("NAME")
    /quit [REASON]        Quit(REASON or None)   (/exit too)
    /bogus                Invalid("unknown command /bogus ...")

Rooms are typed with or without ``#`` and folded to lower case as the
broker does (``room_name``); a name that cannot be a room is ``Invalid``
here, before anything is sent. ``None`` for a room means the current window's.

``complete(before_cursor, names, rooms)`` gives the Tab completions for the
word under the cursor: a command name at the start of a line, ``#room`` for
a word starting with ``#`` (or the first argument of /join, /part, /window),
else the name of someone in the room (with ``": "`` after it when it starts
the line, as IRC clients do when addressing someone).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeAlias

from .options import room_name
from .render import ACTION_PREFIX

__all__ = [
    "COMMANDS",
    "MODE_LETTERS",
    "Clear",
    "CloseWindow",
    "Command",
    "Help",
    "Invalid",
    "Invite",
    "JoinRoom",
    "Kick",
    "ListRooms",
    "Mode",
    "Nick",
    "PartRoom",
    "Private",
    "Query",
    "Quit",
    "RoomAction",
    "Say",
    "Topic",
    "Who",
    "Window",
    "complete",
    "parse_line",
    "room_name",
]


@dataclass(frozen=True, slots=True)
class Say:
    text: str


@dataclass(frozen=True, slots=True)
class Private:
    to: str
    text: str


@dataclass(frozen=True, slots=True)
class Query:
    """Open (or go to) the private window for ``name``."""

    name: str


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
class JoinRoom:
    room: str  # folded, no '#'
    private: bool = False  # only when it creates the room


@dataclass(frozen=True, slots=True)
class PartRoom:
    room: str | None = None  # None: the current window's
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class ListRooms:
    pass


@dataclass(frozen=True, slots=True)
class Topic:
    text: str | None = None  # None: show the topic


@dataclass(frozen=True, slots=True)
class Invite:
    name: str
    room: str | None = None


@dataclass(frozen=True, slots=True)
class Kick:
    name: str
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class RoomAction:
    """``op``, ``deop``, ``ban`` or ``unban`` of ``name`` in the current room."""

    action: str
    name: str


@dataclass(frozen=True, slots=True)
class Mode:
    """Room modes to set: keys ``private``, ``moderated``, ``topic_ops``."""

    changes: dict[str, bool] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Window:
    """Go to window ``number`` (from 1), or by ``step`` (+1 next, -1 previous)."""

    number: int | None = None
    step: int = 0


@dataclass(frozen=True, slots=True)
class CloseWindow:
    pass


@dataclass(frozen=True, slots=True)
class Invalid:
    """A line that is not a valid command; ``why`` says what to type."""

    why: str


Command: TypeAlias = (Say | Private | Query | Who | Help | Clear | Nick | Quit | JoinRoom
                      | PartRoom | ListRooms | Topic | Invite | Kick | RoomAction | Mode
                      | Window | CloseWindow | Invalid)

# irssi's mode letters for what zchat rooms have.
MODE_LETTERS = {"p": "private", "m": "moderated", "t": "topic_ops"}

COMMANDS = ("/ban", "/clear", "/close", "/deop", "/exit", "/help", "/invite", "/join",
            "/kick", "/list", "/me", "/mode", "/msg", "/names", "/nick", "/op", "/part",
            "/query", "/quit", "/topic", "/unban", "/who", "/window")
_ALIASES = {"/names": "/who", "/?": "/help", "/exit": "/quit", "/j": "/join",
            "/leave": "/part", "/win": "/window", "/wc": "/close", "/t": "/topic"}
_ROOM_ARGUMENT = ("/join", "/j", "/part", "/leave", "/invite")


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
    parse = _PARSERS.get(command)
    if parse is None:
        return Invalid(f"unknown command {word}: /help lists them, //{word[1:]} says it as text")
    try:
        return parse(rest)
    except ValueError as exc:
        return Invalid(str(exc))


def _me(rest: str) -> Command:
    if not rest:
        raise ValueError("usage: /me ACTION (e.g. /me waves)")
    return Say(ACTION_PREFIX + rest)


def _msg(rest: str) -> Command:
    to, _, text = rest.partition(" ")
    if not to or not text.strip():
        raise ValueError("usage: /msg NAME TEXT")
    return Private(to, text.strip())


def _query(rest: str) -> Command:
    to, _, text = rest.partition(" ")
    if not to:
        raise ValueError("usage: /query NAME [TEXT]")
    return Private(to, text.strip()) if text.strip() else Query(to)


def _nick(rest: str) -> Command:
    if not rest or " " in rest:
        raise ValueError("usage: /nick NAME")
    return Nick(rest)


def _join(rest: str) -> Command:
    words = rest.split()
    private = bool(words) and words[0].casefold() in ("-private", "-p")
    if private:
        words = words[1:]
    if len(words) != 1:
        raise ValueError("usage: /join #ROOM (/join -private #ROOM makes a new room private)")
    try:
        return JoinRoom(room_name(words[0]), private)
    except ValueError as exc:
        raise ValueError(f"{words[0]} cannot be a room: {exc}") from None


def _part(rest: str) -> Command:
    first, _, reason = rest.partition(" ")
    if first.startswith("#"):
        try:
            room = room_name(first)
        except ValueError as exc:
            raise ValueError(f"{first} cannot be a room: {exc}") from None
        return PartRoom(room, reason.strip() or None)
    return PartRoom(None, rest or None)


def _topic(rest: str) -> Command:
    return Topic(rest or None)


def _invite(rest: str) -> Command:
    words = rest.split()
    if not 1 <= len(words) <= 2:
        raise ValueError("usage: /invite NAME [#ROOM]")
    room = None
    if len(words) == 2:
        try:
            room = room_name(words[1])
        except ValueError as exc:
            raise ValueError(f"{words[1]} cannot be a room: {exc}") from None
    return Invite(words[0], room)


def _kick(rest: str) -> Command:
    name, _, reason = rest.partition(" ")
    if not name:
        raise ValueError("usage: /kick NAME [REASON]")
    return Kick(name, reason.strip() or None)


def _room_action(action: str) -> Callable[[str], Command]:
    def parse(rest: str) -> Command:
        if not rest or " " in rest:
            raise ValueError(f"usage: /{action} NAME")
        return RoomAction(action, rest)
    return parse


def _mode(rest: str) -> Command:
    usage = "usage: /mode +p|-p (private) +m|-m (moderated) +t|-t (topic by operators only)"
    changes: dict[str, bool] = {}
    for word in rest.split():
        if word[:1] not in "+-" or len(word) < 2:
            raise ValueError(usage)
        sign = True
        for char in word:
            if char in "+-":
                sign = char == "+"
            elif char.lower() in MODE_LETTERS:
                changes[MODE_LETTERS[char.lower()]] = sign
            else:
                raise ValueError(f"no mode {char!r}: {usage}")
    if not changes:
        raise ValueError(usage)
    return Mode(changes)


def _window(rest: str) -> Command:
    word = rest.casefold()
    if word in ("next", "n", "+"):
        return Window(step=1)
    if word in ("prev", "previous", "p", "-"):
        return Window(step=-1)
    if word.isdigit() and int(word) >= 1:
        return Window(int(word))
    raise ValueError("usage: /window N, /window next, /window prev")


_PARSERS: dict[str, Callable[[str], Command]] = {
    "/me": _me,
    "/msg": _msg,
    "/query": _query,
    "/who": lambda rest: Who(),
    "/help": lambda rest: Help(),
    "/clear": lambda rest: Clear(),
    "/nick": _nick,
    "/quit": lambda rest: Quit(rest or None),
    "/join": _join,
    "/part": _part,
    "/list": lambda rest: ListRooms(),
    "/topic": _topic,
    "/invite": _invite,
    "/kick": _kick,
    "/op": _room_action("op"),
    "/deop": _room_action("deop"),
    "/ban": _room_action("ban"),
    "/unban": _room_action("unban"),
    "/mode": _mode,
    "/window": _window,
    "/close": lambda rest: CloseWindow(),
}


def complete(before_cursor: str, names: Iterable[str],
             rooms: Iterable[str] = ()) -> tuple[int, list[str]]:
    """Completions for the word that ends at the cursor.

    ``rooms`` are room names without ``#``; they complete a word that
    starts with ``#``, and the first argument of /join, /part and /invite's
    second.

    Returns:
        (length of that word, the texts that may replace it), best first.
    """
    head, _, word = before_cursor.rpartition(" ")
    at_start = len(word) == len(before_cursor)
    if at_start and word.startswith("/"):
        folded = word.casefold()
        return len(word), [c + " " for c in COMMANDS if c.startswith(folded)]
    command = head.split(" ", 1)[0].casefold()
    if word.startswith("#") or (command in _ROOM_ARGUMENT and head.count(" ") == (
            1 if command == "/invite" else 0)):
        typed = word.removeprefix("#").casefold()
        found = sorted({r for r in rooms if r.startswith(typed)})
        return len(word), ["#" + room + " " for room in found]
    if not word:
        return 0, []
    folded = word.casefold()
    matches = sorted({n for n in names if n.casefold().startswith(folded)}, key=str.casefold)
    suffix = ": " if at_start else " "
    return len(word), [name + suffix for name in matches]
