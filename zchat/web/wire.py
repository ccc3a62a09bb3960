"""The page's protocol with the gateway: JSON text frames on one WebSocket (no I/O here).

Page -> gateway (one JSON object per frame; ``id`` is the page's own, at most
64 characters, echoed in the answer)::

    hello  name, token?, after?   first frame: join as name, or resume the
                                  session of token; replay items numbered
                                  above after (0: all that is kept)
    say    id, text, room?        -> ack (id, seq) or error (id, code, detail)
    dm     id, to, text           -> ack (id) or error
    who    room?                  -> members (room, members)
    enter  room                   -> an ``entered`` item (room, topic, count, members)
    part   room, reason?          -> a ``parted`` item (room)
    rooms                         -> roomlist (rooms: name, topic, count, private)
    topic  room, text             -> a ``topic`` event, or error
    leave  reason?                the user quits: leave now, no grace

Gateway -> page::

    welcome  name, token, addr, heartbeat, state, resumed, members, colour,
             rooms (each entered room: name, topic, count, members)
    item     n, live, item        one numbered item of the session's log: a
                                  room event, a dm, a status line (see
                                  ``item_json``); live is false in a replay
    ack      id, seq?             error  code, detail, id?
    members  room, members        state  state (online | reconnecting)

A frame to the page may also hold a JSON array of such objects, in order:
what queued up while the tab's socket was busy goes in one frame.

A name's colour travels with it (``colour``, ``#rrggbb``): it is
``zchat.display.name_colour``, the terminal client's, as the RGB of its
256-colour index, so a name looks the same in both.

Defines ``PageError``, the request classes, ``PageRequest``, ``parse_request``,
``item_json``, ``member_json``, ``colour`` and ``xterm_rgb``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

from zchat.display import name_colour
from zchat.protocol import (
    ROOM,
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
    TopicChanged,
)
from zchat.session import Item, Status

__all__ = [
    "MAX_ID",
    "Dm",
    "Enter",
    "Hello",
    "LeavePage",
    "ListRooms",
    "PageError",
    "PageRequest",
    "Part",
    "Say",
    "SetTopic",
    "Who",
    "colour",
    "item_json",
    "member_json",
    "mode_text",
    "parse_request",
    "xterm_rgb",
]

MAX_ID = 64
MAX_TOKEN = 256
MAX_TEXT = 16_384  # the broker's own limit (4,096 characters) answers below this


class PageError(Exception):
    """The page sent something this protocol does not allow (its fault, not ours)."""


@dataclass(frozen=True, slots=True)
class Hello:
    name: str
    token: str | None = None
    after: int = 0


@dataclass(frozen=True, slots=True)
class Say:
    id: str
    text: str
    room: str = ROOM


@dataclass(frozen=True, slots=True)
class Dm:
    id: str
    to: str
    text: str


@dataclass(frozen=True, slots=True)
class Who:
    room: str = ROOM


@dataclass(frozen=True, slots=True)
class LeavePage:
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class Enter:
    room: str


@dataclass(frozen=True, slots=True)
class Part:
    room: str
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class ListRooms:
    pass


@dataclass(frozen=True, slots=True)
class SetTopic:
    room: str
    text: str


PageRequest: TypeAlias = Hello | Say | Dm | Who | LeavePage | Enter | Part | ListRooms | SetTopic


def _str(body: dict[str, Any], key: str, limit: int, *, optional: bool = False) -> Any:
    value = body.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise PageError(f"{key!r} must be a string of at most {limit} characters")
    return value


def _hello(body: dict[str, Any]) -> Hello:
    after = body.get("after", 0)
    if not isinstance(after, int) or isinstance(after, bool) or after < 0:
        raise PageError("'after' must be a non-negative integer")
    return Hello(_str(body, "name", 128), _str(body, "token", MAX_TOKEN, optional=True), after)


def _say(body: dict[str, Any]) -> Say:
    room = _str(body, "room", 64, optional=True) or ROOM
    return Say(_str(body, "id", MAX_ID), _str(body, "text", MAX_TEXT), room)


def _dm(body: dict[str, Any]) -> Dm:
    return Dm(_str(body, "id", MAX_ID), _str(body, "to", 128), _str(body, "text", MAX_TEXT))


def _who(body: dict[str, Any]) -> Who:
    return Who(_str(body, "room", 64, optional=True) or ROOM)


def _leave(body: dict[str, Any]) -> LeavePage:
    return LeavePage(_str(body, "reason", MAX_TEXT, optional=True))


def _enter(body: dict[str, Any]) -> Enter:
    return Enter(_str(body, "room", 64))


def _part(body: dict[str, Any]) -> Part:
    return Part(_str(body, "room", 64), _str(body, "reason", MAX_TEXT, optional=True))


def _topic(body: dict[str, Any]) -> SetTopic:
    return SetTopic(_str(body, "room", 64), _str(body, "text", MAX_TEXT))


_PARSERS: dict[str, Callable[[dict[str, Any]], PageRequest]] = {
    "hello": _hello,
    "say": _say,
    "dm": _dm,
    "who": _who,
    "leave": _leave,
    "enter": _enter,
    "part": _part,
    "rooms": lambda body: ListRooms(),
    "topic": _topic,
}


def parse_request(frame: str | bytes) -> PageRequest:
    """The request in one frame from the page.

    Raises:
        PageError: not a JSON object, an unknown ``type``, a missing or
            wrongly typed field.
    """
    if isinstance(frame, bytes):
        raise PageError("text frames only")
    try:
        body = json.loads(frame)
    except ValueError:
        raise PageError("not JSON") from None
    if not isinstance(body, dict):
        raise PageError("not a JSON object")
    parser = _PARSERS.get(body.get("type"))  # type: ignore[arg-type]
    if parser is None:
        raise PageError(f"unknown type {body.get('type')!r}")
    return parser(body)


# ----------------------------------------------------------------- colours

_CUBE = (0, 95, 135, 175, 215, 255)
_BASIC = ("000000", "800000", "008000", "808000", "000080", "800080", "008080", "c0c0c0",
          "808080", "ff0000", "00ff00", "ffff00", "0000ff", "ff00ff", "00ffff", "ffffff")


def xterm_rgb(index: int) -> str:
    """``#rrggbb`` of a 256-colour terminal's colour ``index`` (xterm's table)."""
    if index < 16:
        return "#" + _BASIC[index]
    if index < 232:
        cube = index - 16
        red, green, blue = _CUBE[cube // 36], _CUBE[cube // 6 % 6], _CUBE[cube % 6]
        return f"#{red:02x}{green:02x}{blue:02x}"
    grey = 8 + 10 * (index - 232)
    return f"#{grey:02x}{grey:02x}{grey:02x}"


def colour(name: str) -> str:
    """The colour the terminal client gives ``name``, as ``#rrggbb``."""
    return xterm_rgb(name_colour(name))


# ------------------------------------------------------------------- items


def member_json(member: Member) -> dict[str, Any]:
    return {"name": member.name, "addr": member.addr, "colour": colour(member.name)}


def mode_text(event: ModeChanged) -> str:
    """What a ``mode`` event changed, in words (``made the room private, banned eve``)."""
    said: list[str] = []
    for flag, on, off in (("private", "made the room private", "made the room public"),
                          ("moderated", "moderated the room", "unmoderated the room"),
                          ("topic_ops", "let only operators set the topic",
                           "let anyone set the topic")):
        value = getattr(event, flag)
        if value is not None:
            said.append(on if value else off)
    for field, verb in (("op", "gave operator status to"), ("deop", "took operator status from"),
                        ("ban", "banned"), ("unban", "unbanned")):
        who = getattr(event, field)
        if who is not None:
            said.append(f"{verb} {who}")
    return ", ".join(said) or "changed the room's settings"


def item_json(item: Item, now: float) -> dict[str, Any]:
    """The page's form of a library item; ``now`` stamps items without a time."""
    if isinstance(item, Message):
        return {"type": "message", "room": item.room, "seq": item.seq, "ts": item.ts,
                "from": item.sender, "text": item.text, "colour": colour(item.sender)}
    if isinstance(item, Joined):
        return {"type": "joined", "room": item.room, "seq": item.seq, "ts": item.ts,
                "name": item.name, "addr": item.addr, "colour": colour(item.name)}
    if isinstance(item, Joins):
        members = [member_json(member) for member in item.members]
        return {"type": "joins", "room": item.room, "seq": item.seq, "ts": item.ts,
                "members": members, "count": len(members)}
    if isinstance(item, Left):
        return {"type": "left", "room": item.room, "seq": item.seq, "ts": item.ts,
                "name": item.name, "addr": item.addr, "reason": item.reason,
                "detail": item.detail, "by": item.by, "colour": colour(item.name)}
    if isinstance(item, Notice):
        return {"type": "notice", "room": item.room, "seq": item.seq, "ts": item.ts,
                "text": item.text}
    if isinstance(item, TopicChanged):
        return {"type": "topic", "room": item.room, "seq": item.seq, "ts": item.ts,
                "name": item.name, "text": item.text, "colour": colour(item.name)}
    if isinstance(item, ModeChanged):
        return {"type": "mode", "room": item.room, "seq": item.seq, "ts": item.ts,
                "name": item.name, "text": mode_text(item), "colour": colour(item.name)}
    if isinstance(item, Invited):
        return {"type": "invited", "room": item.room, "from": item.from_, "ts": now,
                "colour": colour(item.from_)}
    if isinstance(item, OtherEvent):
        return {"type": "other", "event": item.type, "room": item.room, "seq": item.seq,
                "ts": item.ts}
    if isinstance(item, Direct):
        return {"type": "dm", "from": item.sender, "text": item.text, "ts": item.ts,
                "colour": colour(item.sender)}
    if isinstance(item, Status):
        return {"type": "status", "state": str(item.state), "detail": item.detail,
                "count": item.count, "room": item.room, "ts": now}
    return {"type": "other", "event": type(item).__name__, "ts": now}  # pragma: no cover
