"""How the terminal client shows things: pure functions from events to lines.

Nothing here does I/O. ``render(item, view, now)`` turns a library item (a
room event, a private message, a connection ``Status``) or one of the
client's own records (``SentPrivate``) into a ``Line``: a tuple of
``(sgr, text)`` spans, where ``sgr`` is an ANSI "select graphic rendition"
parameter string (``"1"`` bold, ``"38;5;33"`` a 256-colour foreground, ``""``
plain). ``to_ansi`` paints a line for a terminal, ``to_plain`` strips it for
pipes and logs, and ``item_json`` gives the ``--json`` form of an item.

Every string a peer chose (names, text, addresses, reasons) goes through
``zchat.display.printable`` so that a message can never move the cursor or
fake a line on someone's terminal.

Line shapes (``HH:MM`` first, then)::

    <alice> hello                      a message (yours in bold)
    * alice waves                      an action: a message "/me waves"
    --> bob (10.0.0.7) joined
    --> bob (10.0.0.7) and carol (10.0.0.9) joined
    --> bob, carol, dave and 27 more joined          a big room's `joins` (not naming you)
    <-- bob (10.0.0.7) left: lunch     left / timed out / was kicked ...
    [private from alice] psst          and [private to bob] on the sender's side
    -!- notice: maintenance at noon    an operator announcement
    -!- broker unreachable, retrying…  connection changes

Defines ``Span``, ``Line``, ``View``, ``SentPrivate``, ``ACTION_PREFIX``,
``render``, ``joins_others``, ``notice``, ``who_line``, ``help_lines``, ``to_ansi``,
``to_plain``, ``item_json``, ``is_action``, ``refusal``, ``pending_line``,
``wants_attention``, ``wrap``, ``width``.
"""

from __future__ import annotations

import time
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeAlias

from zchat import (
    Direct,
    Invited,
    Joined,
    Joins,
    Left,
    Member,
    Message,
    ModeChanged,
    Notice,
    OtherEvent,
    Status,
    TopicChanged,
)
from zchat.display import name_colour, printable
from zchat.protocol import ClientStatus, ErrorCode, LeaveReason, fold_name

__all__ = [
    "ACTION_PREFIX",
    "Item",
    "Line",
    "SentPrivate",
    "Span",
    "View",
    "entered_line",
    "help_lines",
    "in_room",
    "invited_line",
    "is_action",
    "item_json",
    "joins_others",
    "mode_changes",
    "mode_line",
    "notice",
    "pending_line",
    "refusal",
    "render",
    "room_lines",
    "room_refusal",
    "to_ansi",
    "to_plain",
    "topic_line",
    "wants_attention",
    "who_line",
    "width",
    "wrap",
]

Span: TypeAlias = tuple[str, str]  # (SGR parameters, text)
Line: TypeAlias = tuple[Span, ...]

# The /me convention (PROTOCOL.md, notes): the wire text is "/me waves", which
# a client that knows nothing of it still shows as something readable.
ACTION_PREFIX = "/me "

PLAIN = ""
BOLD = "1"
DIM = "2"
RED = "31"
GREEN = "32"
YELLOW = "33"
MAGENTA = "35"
MENTION = "1;33"  # someone said our name

LEAVE_VERBS: dict[str, str] = {
    LeaveReason.LEAVE: "left",
    LeaveReason.TIMEOUT: "timed out",
    LeaveReason.KICKED: "was kicked by the operator",
    LeaveReason.SHUTDOWN: "left: the broker shut down",
    "part": "left the room",
    "banned": "was banned",
    "closed": "left: the room was closed",
}

STATUS_STYLES: dict[str, str] = {
    ClientStatus.CONNECTED: GREEN,
    ClientStatus.RECONNECTED: GREEN,
    ClientStatus.DISCONNECTED: YELLOW,
    ClientStatus.HISTORY_LOST: YELLOW,
    ClientStatus.MISSED: YELLOW,
    ClientStatus.CLOSED: RED,
    ClientStatus.REFUSED: RED,
}


@dataclass(frozen=True, slots=True)
class View:
    """Who is looking, and how: the things a line's look depends on.

    Args:
        me: our name; our own messages are bold, lines naming us stand out.
        clock: ``strftime`` format of the time column.
    """

    me: str
    clock: str = "%H:%M"


@dataclass(frozen=True, slots=True)
class SentPrivate:
    """A private message we sent, once the broker took it."""

    to: str
    text: str
    ts: float


Item: TypeAlias = (Message | Joined | Joins | Left | Notice | TopicChanged | ModeChanged
                  | OtherEvent | Direct | Invited | Status | SentPrivate)

# A `joins` of at most this many others names each with an address; a bigger
# one names this many less one, then "and N more" (never "and 1 more").
JOINS_LISTED = 4


def is_action(text: str) -> bool:
    """True for a message that is an action (``/me waves``)."""
    return text.startswith(ACTION_PREFIX) and len(text) > len(ACTION_PREFIX)


def _name(name: str, view: View, style: str = "") -> Span:
    colour = f"38;5;{name_colour(name)}"
    return (";".join(s for s in (style, colour) if s), printable(name))


def _stamp(ts: float, view: View, now: float | None = None) -> Span:
    when = time.localtime(ts)
    today = time.localtime(ts if now is None else now)
    # A line from another day (history, a long-running session) says which.
    day = "" if when[:3] == today[:3] else time.strftime("%Y-%m-%d ", when)
    return (DIM, day + time.strftime(view.clock, when) + " ")


def _mentions(text: str, me: str) -> bool:
    folded = text.casefold()
    start = folded.find(me.casefold())
    while start >= 0:
        end = start + len(me)
        before = folded[start - 1] if start else " "
        after = folded[end] if end < len(folded) else " "
        if not (before.isalnum() or after.isalnum()):
            return True
        start = folded.find(me.casefold(), start + 1)
    return False


def render(item: Item, view: View, now: float | None = None) -> Line:
    """The line that shows ``item``; ``now`` stamps items without a time,
    and says which day is today (lines from another day show their date)."""
    now = time.time() if now is None else now
    if isinstance(item, Message):
        return _message(item, view, now)
    if isinstance(item, Joined):
        return (
            _stamp(item.ts, view, now), (GREEN, "--> "), _name(item.name, view),
            (DIM, f" ({printable(item.addr)}) joined"),
        )
    if isinstance(item, Joins):
        return (_stamp(item.ts, view, now), (GREEN, "--> "), *_joins(item, view))
    if isinstance(item, Left):
        verb = LEAVE_VERBS.get(item.reason, f"left [{printable(item.reason)}]")
        if item.by and item.reason in (LeaveReason.KICKED, "banned"):
            # v2: a room operator kicked or banned (v1: the broker's operator).
            verb = f"was {'kicked' if item.reason == LeaveReason.KICKED else 'banned'} by " \
                   f"{printable(item.by)}"
        detail = f": {printable(item.detail)}" if item.detail else ""
        return (
            _stamp(item.ts, view, now), (RED, "<-- "), _name(item.name, view),
            (DIM, f" ({printable(item.addr)}) {verb}{detail}"),
        )
    if isinstance(item, Notice):
        return (_stamp(item.ts, view, now), (MAGENTA, "-!- "), ("1;35", "notice: "),
                (BOLD, printable(item.text)))
    if isinstance(item, TopicChanged):
        return topic_line(item.room, item.name, item.text, item.ts, view, now)
    if isinstance(item, ModeChanged):
        return mode_line(item.room, item.name, mode_changes(item), item.ts, view, now)
    if isinstance(item, Invited):
        return invited_line(item.room, item.from_, now, view)
    if isinstance(item, OtherEvent):
        return (_stamp(item.ts, view, now),
                (DIM, f"-!- a {printable(item.type)} event (#{item.seq})"))
    if isinstance(item, Direct):
        return (
            _stamp(item.ts, view, now), (MAGENTA, "[private from "), _name(item.sender, view),
            (MAGENTA, "] "), (PLAIN, printable(item.text)),
        )
    if isinstance(item, SentPrivate):
        return (
            _stamp(item.ts, view, now), (MAGENTA, "[private to "), _name(item.to, view),
            (MAGENTA, "] "), (BOLD, printable(item.text)),
        )
    return _status(item, view, now)


def joins_others(item: Joins, me: str) -> list[Member]:
    """Who a ``joins`` announces, but us: our own coming is said by the connection lines."""
    mine = fold_name(me)
    return [member for member in item.members if fold_name(member.name) != mine]


def _joins(item: Joins, view: View) -> list[Span]:
    """``bob (10.0.0.7), carol (…) and dave (…) joined``, or ``bob, carol, dave
    and 27 more joined`` when too many to list with their addresses."""
    others = joins_others(item, view.me)
    few = len(others) <= JOINS_LISTED
    named = others if few else others[:JOINS_LISTED - 1]
    spans: list[Span] = []
    for index, member in enumerate(named):
        if index:
            last = few and index == len(named) - 1
            spans.append((DIM, " and " if last else ", "))
        spans.append(_name(member.name, view))
        if few:
            spans.append((DIM, f" ({printable(member.addr)})"))
    more = f" and {len(others) - len(named)} more" if not few else ""
    spans.append((DIM, f"{more} joined"))
    return spans


def _message(item: Message, view: View, now: float) -> Line:
    mine = fold_name(item.sender) == fold_name(view.me)
    text_style = BOLD if mine else (MENTION if _mentions(item.text, view.me) else PLAIN)
    name = _name(item.sender, view, BOLD if mine else "")
    if is_action(item.text):
        action = item.text[len(ACTION_PREFIX):]
        return (_stamp(item.ts, view, now), (name[0], "* "), name,
                (text_style, " " + printable(action)))
    return (_stamp(item.ts, view, now), (PLAIN, "<"), name, (PLAIN, "> "),
            (text_style, printable(item.text)))


def _status(item: Status, view: View, now: float) -> Line:
    style = STATUS_STYLES.get(item.state, YELLOW)
    if item.state == ClientStatus.CONNECTED:
        text = f"connected (your address: {printable(item.detail)})"
    elif item.state == ClientStatus.RECONNECTED:
        text = "reconnected"
    elif item.state == ClientStatus.HISTORY_LOST:
        text = "the broker was restarted: the room's history starts afresh"
    elif item.state == ClientStatus.MISSED:
        where = f" in #{item.room}" if item.room else ""
        text = f"{item.count} events{where} were lost: the broker no longer keeps them"
    elif item.state == ClientStatus.REFUSED:
        # A room we were in that a reconnect could not enter again.
        text = printable(item.detail) or f"could not enter #{item.room} again"
    elif item.state == ClientStatus.CLOSED:
        text = f"disconnected: {printable(item.detail)}" if item.detail else "disconnected"
    else:
        text = printable(item.detail) or item.state
    return (_stamp(now, view), (style, "-!- " + text))


def in_room(line: Line, room: str) -> Line:
    """``line`` with ``#room`` after its time: for output that mixes rooms."""
    return (*line[:1], (DIM, f"#{room} "), *line[1:])


def notice(text: str, now: float, view: View, style: str = YELLOW) -> Line:
    """A line of the client's own: help, errors, hints."""
    return (_stamp(now, view), (style, "-!- " + text))


def who_line(members: Iterable[Member], view: View, now: float,
             ops: Iterable[str] = (), room: str | None = None,
             count: int | None = None) -> Line:
    """``-!- 3 here: alice (10.0.0.7), bob (…), carol (you)``; room operators
    get irssi's ``@``; with ``room``, ``-!- 3 in #dev: …``; ``count`` says
    how many there are when ``members`` is a first page."""
    people = sorted(members, key=lambda m: m.name.casefold())
    operators = {fold_name(name) for name in ops}
    where = "here" if room is None else f"in #{room}"
    total = len(people) if count is None or count < len(people) else count
    more = f" (the first {len(people)})" if total > len(people) else ""
    spans: list[Span] = [_stamp(now, view), (GREEN, f"-!- {total} {where}{more}: ")]
    for index, member in enumerate(people):
        if index:
            spans.append((PLAIN, ", "))
        if fold_name(member.name) in operators:
            spans.append((BOLD, "@"))
        spans.append(_name(member.name, view))
        mine = fold_name(member.name) == fold_name(view.me)
        spans.append((DIM, f" ({printable(member.addr)}{', you' if mine else ''})"))
    return tuple(spans)


MODE_NAMES = {"private": "p", "moderated": "m", "topic_ops": "t"}
MODE_WORDS = {"private": "private (invite only)", "moderated": "moderated",
              "topic_ops": "topic by operators only"}


def _by(name: str, view: View) -> Span:
    # "*": the broker's operator (zchat-admin op), not a member.
    return (BOLD, "the broker's operator") if name == "*" else _name(name, view)


def topic_line(room: str, name: str, text: str, ts: float, view: View,
               now: float | None = None) -> Line:
    """``-!- alice changed the topic of #dev to: release on friday``."""
    stamp = _stamp(ts, view, now)
    if not text:
        return (stamp, (MAGENTA, "-!- "), _by(name, view),
                (PLAIN, f" cleared the topic of #{room}"))
    return (stamp, (MAGENTA, "-!- "), _by(name, view),
            (PLAIN, f" changed the topic of #{room} to: "), (BOLD, printable(text)))


def mode_line(room: str, name: str, changes: dict[str, bool | str], ts: float, view: View,
              now: float | None = None) -> Line:
    """``-!- mode/#dev [+p -m +o bob] by alice``, as irssi says it, and in words."""
    flags: list[str] = []
    words: list[str] = []
    for key, value in changes.items():
        if key in MODE_NAMES and isinstance(value, bool):
            flags.append(("+" if value else "-") + MODE_NAMES[key])
            words.append(("" if value else "not ") + MODE_WORDS[key])
        elif key in ("op", "deop", "ban", "unban") and isinstance(value, str):
            sign, letter = {"op": ("+", "o"), "deop": ("-", "o"),
                            "ban": ("+", "b"), "unban": ("-", "b")}[key]
            flags.append(f"{sign}{letter} {printable(value)}")
            words.append({"op": "operator", "deop": "no longer operator", "ban": "banned",
                          "unban": "no longer banned"}[key] + f": {printable(value)}")
    return (_stamp(ts, view, now), (MAGENTA, "-!- "), (PLAIN, f"mode/#{room} "),
            (BOLD, f"[{' '.join(flags)}]"), (PLAIN, " by "), _by(name, view),
            (DIM, f" ({', '.join(words)})" if words else ""))


def mode_changes(item: ModeChanged) -> dict[str, bool | str]:
    """What a ``mode`` event changed: only the fields it set."""
    fields = ("private", "moderated", "topic_ops", "op", "deop", "ban", "unban")
    return {key: value for key in fields if (value := getattr(item, key)) is not None}


def invited_line(room: str, sender: str, now: float, view: View) -> Line:
    """``-!- bob invites you to #secret: /join #secret``."""
    return (_stamp(now, view), (MAGENTA, "-!- "), _name(sender, view),
            (PLAIN, f" invites you to #{room}: "), (BOLD, f"/join #{room}"))


def room_lines(rooms: Iterable[tuple[str, int, str, bool]], view: View, now: float) -> list[Line]:
    """``/list``: one line per room (name, members, topic, private)."""
    listed = sorted(rooms)
    lines = [notice(f"{len(listed)} room{'' if len(listed) == 1 else 's'}"
                    + (":" if listed else ""), now, view, GREEN)]
    width = max((len(name) for name, *_ in listed), default=0) + 1
    for name, count, topic, private in listed:
        lines.append((_stamp(now, view), (GREEN, "-!-   "), (BOLD, f"#{name}".ljust(width + 1)),
                      (PLAIN, f" {count:>4}  "), (DIM, "private " if private else ""),
                      (PLAIN, printable(topic))))
    return lines


def entered_line(room: str, topic: str, flags: dict[str, bool], now: float,
                 view: View) -> Line:
    """``-!- you are in #dev (private) - topic: release on friday``."""
    modes = [MODE_WORDS[key] for key in ("private", "moderated") if flags.get(key)]
    said = f" ({', '.join(modes)})" if modes else ""
    spans: tuple[Span, ...] = (_stamp(now, view), (GREEN, f"-!- you are in #{room}{said}"))
    if topic:
        spans += ((GREEN, "; topic: "), (BOLD, printable(topic)))
    return spans


HELP = (
    ("TEXT", "say TEXT in this window's room (or to its person); //TEXT if it starts with /"),
    ("/msg NAME TEXT", "a private message to NAME; only you and NAME see it (in NAME's window)"),
    ("/query NAME", "a window for private messages with NAME"),
    ("/join #ROOM, /j", "enter a room (made if new; /join -private #ROOM: invite only)"),
    ("/part [#ROOM] [WHY]", "leave this room (or #ROOM)"),
    ("/list", "the rooms there are"),
    ("/topic [TEXT]", "show or set this room's topic"),
    ("/invite NAME [#ROOM]", "invite NAME to this room (or #ROOM)"),
    ("/kick NAME [WHY]", "put NAME out of this room (operators)"),
    ("/ban, /unban NAME", "keep NAME out of this room, or let back in (operators)"),
    ("/op, /deop NAME", "make NAME an operator of this room, or not (operators)"),
    ("/mode +p|-p +m|-m +t|-t", "private, moderated, topic by operators only (operators)"),
    ("Alt-1..9, Ctrl-N/P", "go to window 1..9, the next, the previous (/window N too)"),
    ("/close", "close this window (and part its room)"),
    ("/me ACTION", "say what you are doing: * you ACTION"),
    ("/who, /names", "who is in this room, with their address (@: operators)"),
    ("/clear", "clear the screen"),
    ("/nick NAME", "(names are kept for a session: /quit, join again as NAME)"),
    ("/help", "this help"),
    ("/quit, /exit [REASON]", "leave (Ctrl-D leaves too; Ctrl-C on an empty line)"),
    ("Ctrl-C", "clear the line you are typing"),
    ("Up / Down", "recall what you typed"),
    ("PageUp / PageDown", "scroll back through the room (in tmux; a pager elsewhere)"),
    ("Tab", "complete a name, a #room or a command"),
)


def pending_line(text: str, to: str | None, view: View) -> Line:
    """A line the user typed that the broker has not taken yet (dim)."""
    if to is not None:
        return ((DIM, "(pending) [private to "), (DIM, printable(to)), (DIM, "] "),
                (DIM, printable(text)))
    if is_action(text):
        return ((DIM, "(pending) * "), (DIM, printable(view.me)),
                (DIM, " " + printable(text[len(ACTION_PREFIX):])))
    return ((DIM, "(pending) <"), (DIM, printable(view.me)), (DIM, "> "), (DIM, printable(text)))


def wants_attention(item: Item, me: str) -> bool:
    """True for what rings the bell: a private message, or someone naming us."""
    if isinstance(item, Direct):
        return True
    return (isinstance(item, Message) and fold_name(item.sender) != fold_name(me)
            and _mentions(item.text, me))


def _char_width(char: str) -> int:
    if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me", "Cf"):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def width(text: str) -> int:
    """Terminal columns that ``text`` takes (wide East Asian and emoji count 2)."""
    return sum(_char_width(char) for char in text)


def wrap(line: Line, columns: int) -> list[Line]:
    """``line`` cut to ``columns``, the continuation indented under the text.

    The text is the last span (what someone said, a notice): its wrapped
    rest starts in the column where it started, as irssi and weechat do,
    so the time and name column stay clear. Cuts fall between words when
    the word fits on a line.
    """
    spans = list(line)
    if not spans or columns < 2 or width(to_plain(line)) < columns:
        return [line]
    style, text = spans[-1]
    indent = width(to_plain(tuple(spans[:-1])))
    if indent > columns // 2:  # a long prefix: wrap under the start instead
        indent = 0
    first = columns - 1 - width(to_plain(tuple(spans[:-1])))
    room = columns - 1 - indent
    pieces: list[str] = []
    while text:
        limit = first if not pieces else room
        if limit <= 0:
            pieces.append("")
            first = room
            continue
        cut, used = 0, 0
        for index, char in enumerate(text):
            used += _char_width(char)
            if used > limit:
                break
            cut = index + 1
        else:
            pieces.append(text.rstrip(" "))
            break
        space = text.rfind(" ", 0, cut + 1)
        if space > 0 and text[:space].strip():
            cut = space
        pieces.append(text[:cut].rstrip(" "))
        text = text[cut:].lstrip(" ")
    lines = [(*spans[:-1], (style, pieces[0]))] if pieces else [line]
    lines += [((PLAIN, " " * indent), (style, piece)) for piece in pieces[1:]]
    return lines


def help_lines(view: View, now: float) -> list[Line]:
    width = max(len(key) for key, _ in HELP)
    return [notice("commands:", now, view, GREEN)] + [
        (_stamp(now, view), (GREEN, "-!-   "), (BOLD, key.ljust(width)), (PLAIN, "  " + what))
        for key, what in HELP
    ]


def refusal(code: str, detail: str, text: str, to: str | None = None,
            room: str | None = None) -> str:
    """Why a line was not sent, in a few words, quoting the start of it."""
    quoted = printable(text if len(text) <= 40 else text[:39] + "…")
    if code == ErrorCode.FORBIDDEN and room is not None:
        return f"#{room} is moderated: only its operators speak; not sent: {quoted}"
    if code == ErrorCode.NOT_IN_ROOM and room is not None:
        return f"you are not in #{room} (/join #{room}); not sent: {quoted}"
    if code == ErrorCode.RATE_LIMITED:
        return f"slow down: rate limited, not sent: {quoted}"
    if code == ErrorCode.TOO_LARGE:
        return f"too long ({len(text)} characters), not sent: {quoted}"
    if code == ErrorCode.NO_SUCH_USER:
        return f"nobody called {printable(to or '?')} is here, not sent: {quoted}"
    return f"not sent ({printable(code)}: {printable(detail)}): {quoted}"


ROOM_ACTIONS = {
    "enter": "enter", "part": "leave", "who": "list the members of", "topic": "set the topic of",
    "mode": "change the modes of", "op": "make operators in", "deop": "take operators from",
    "kick": "kick from", "ban": "ban from", "unban": "lift bans in", "invite": "invite to",
}


def room_refusal(action: str, room: str, code: str, name: str | None = None) -> str:
    """Why a request about a room was refused, in words (``action`` is the
    request's type, ``name`` the person it was about)."""
    what = f"cannot {ROOM_ACTIONS.get(action, action)} #{room}"
    if code == ErrorCode.FORBIDDEN:
        if action == "enter":
            return f"{what}: it is invite only, or you are banned from it"
        return f"{what}: only its operators may"
    if code == ErrorCode.NOT_IN_ROOM:
        return f"{what}: you are not in it (/join #{room})"
    if code == ErrorCode.NO_SUCH_ROOM:
        return f"{what}: there is no such room (/list shows them)"
    if code == ErrorCode.NO_SUCH_USER:
        return f"{what}: nobody called {printable(name or '?')} is there"
    if code == ErrorCode.TOO_MANY_ROOMS:
        return f"{what}: you are in as many rooms as the broker allows (/part one)"
    if code == ErrorCode.BAD_ROOM:
        return f"{what}: not a room name (a-z, 0-9, '-', '_', '.')"
    if code == ErrorCode.BAD_NAME:
        return f"{what}: {printable(name or '?')} cannot be a name"
    if code == ErrorCode.RATE_LIMITED:
        return f"{what}: slow down (rate limited)"
    return f"{what} ({printable(code)})"


def to_ansi(line: Line) -> str:
    """The line with ANSI colours, for a terminal."""
    return "".join(f"\x1b[{sgr}m{text}\x1b[0m" if sgr else text for sgr, text in line)


def to_plain(line: Line) -> str:
    """The line without styling, for pipes and logs."""
    return "".join(text for _, text in line)


def item_json(item: Item, me: str) -> dict[str, Any]:
    """The ``--json`` form of an item: room events as on the wire (with their
    ``room``), plus ``dm`` (with ``from`` and ``to``) and ``status``."""
    if isinstance(item, Direct):
        return {"type": "dm", "from": item.sender, "to": me, "text": item.text, "ts": item.ts}
    if isinstance(item, SentPrivate):
        return {"type": "dm", "from": me, "to": item.to, "text": item.text, "ts": item.ts}
    if isinstance(item, Invited):
        return {"type": "invited", "room": item.room, "from": item.from_}
    if isinstance(item, Status):
        body: dict[str, Any] = {"type": "status", "state": item.state}
        if item.detail:
            body["detail"] = item.detail
        if item.count:
            body["count"] = item.count
        if item.room:  # a status about one room (missed, refused)
            body["room"] = item.room
        return body
    body = {"type": "", "room": item.room, "seq": item.seq, "ts": item.ts}
    if isinstance(item, Message):
        body.update(type="message", text=item.text)
        body["from"] = item.sender
    elif isinstance(item, Joined):
        body.update(type="joined", name=item.name, addr=item.addr)
    elif isinstance(item, Joins):
        members = [{"name": m.name, "addr": m.addr} for m in item.members]
        body.update(type="joins", members=members, count=len(members))
    elif isinstance(item, Left):
        body.update(type="left", name=item.name, addr=item.addr, reason=item.reason)
        if item.detail:
            body["detail"] = item.detail
        if item.by:
            body["by"] = item.by
    elif isinstance(item, Notice):
        body.update(type="notice", text=item.text)
    elif isinstance(item, TopicChanged):
        body.update(type="topic", name=item.name, text=item.text)
    elif isinstance(item, ModeChanged):
        body.update(type="mode", name=item.name, **mode_changes(item))
    else:
        body = {**item.body, **body, "type": item.type}
    return body
