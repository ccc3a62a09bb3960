"""The zchat wire protocol, versions 1 and 2: frames to typed messages and back.

This module does no I/O and imports no ``zmq``. Every payload on the wire is
one frame holding one MessagePack map with string keys (see ``PROTOCOL.md``).

Client -> broker requests (``decode_request``)::

    type       fields                                  class
    join       name, since?, token?, rooms?            Join
    message    text, room?                             Say
    leave      reason?                                 Leave
    ping       (anything)                              Ping
    who        room?, after?, limit?                   Who
    history    after, room?, limit?                    GetHistory
    dm         to, text                                SendDm
    enter      room, private?                          Enter        (v2 from here)
    part       room, reason?                           Part
    rooms      -                                       ListRooms
    topic      room, text                              SetTopic
    mode       room, private?, moderated?, topic_ops?  SetMode
    op, deop   room, name                              Op, Deop
    kick       room, name, reason?                     KickFrom
    ban, unban room, name                              Ban, Unban
    invite     room, name                              Invite

A request without ``room`` means ``lobby`` (a version 1 client sends none).

Every request may carry ``id`` (str, at most 64 chars), echoed by its reply.

Broker -> client frames (``decode_frame`` on the client side, parsed by
``parse_event``)::

    room events (PUB, topic "<room>\\0"; a private room's on each member's
        DEALER instead): joined, joins, message, left, notice, topic, mode
    direct (DEALER): welcome, ack, error, pong, members, history, dm, bye,
        entered, parted, rooms, invited
    broker-wide (PUB, topic "\\0"): heartbeat, shutdown

Anything a peer got wrong raises ``ProtocolError`` with one of the protocol's
error codes, so the broker can answer that peer and carry on.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final, TypeAlias

import msgpack

from zchat.errors import ProtocolError
from zchat.names import name_key, name_problem

__all__ = [
    "BATCH_TOPIC",
    "BROKER_TOPIC",
    "DEFAULT_HEARTBEAT",
    "EVENT_TYPES",
    "HISTORY_PAGE",
    "HISTORY_PAGE_MAX",
    "MAX_ID_CHARS",
    "MAX_NAME_CHARS",
    "MAX_ROOM_CHARS",
    "MEMBERS_SHOWN",
    "MISSED_HEARTBEATS",
    "PROTOCOL_VERSION",
    "ROOM",
    "ROOM_TOPIC",
    "WHO_PAGE",
    "WHO_PAGE_MAX",
    "Ack",
    "Ban",
    "BrokerReply",
    "Bye",
    "ByeReason",
    "ClientStatus",
    "Deop",
    "Direct",
    "Enter",
    "Entered",
    "ErrorCode",
    "ErrorReply",
    "Event",
    "GetHistory",
    "HistoryPage",
    "Invite",
    "Invited",
    "Join",
    "Joined",
    "Joins",
    "KickFrom",
    "Leave",
    "LeaveReason",
    "Left",
    "ListRooms",
    "Member",
    "Members",
    "Message",
    "ModeChanged",
    "Notice",
    "Op",
    "OtherEvent",
    "OtherReply",
    "Part",
    "Parted",
    "Ping",
    "Pong",
    "Refused",
    "Request",
    "RoomInfo",
    "RoomList",
    "Say",
    "SendDm",
    "SetMode",
    "SetTopic",
    "TopicChanged",
    "Unban",
    "Welcome",
    "Who",
    "batch_topic",
    "check_name",
    "check_room",
    "decode_frame",
    "decode_request",
    "encode",
    "encode_batch",
    "fold_name",
    "named_room",
    "parse_event",
    "parse_members",
    "parse_reply",
    "parse_request",
    "request_id",
    "room_topic",
    "with_id",
]

PROTOCOL_VERSION: Final = 2
ROOM: Final = "lobby"  # the room every version 1 client is in
BROKER_TOPIC: Final = b"\x00"


def room_topic(room: str) -> bytes:
    """The PUB topic of a public room's events: its folded name and a NUL."""
    return room.encode() + b"\x00"


def batch_topic(room: str) -> bytes:
    """Extension: the topic of a room's events coalesced into one frame (PROTOCOL.md)."""
    return b"\x01" + room.encode() + b"\x00"


ROOM_TOPIC: Final = room_topic(ROOM)
BATCH_TOPIC: Final = batch_topic(ROOM)

MAX_ID_CHARS: Final = 64
MAX_NAME_CHARS: Final = 32
MAX_ROOM_CHARS: Final = 64  # the protocol's bound; a broker may set a lower one
MEMBERS_SHOWN: Final = 100  # members listed in `welcome` and `entered` (the rest: `who`)
WHO_PAGE: Final = 100  # members in a `who` page when no `limit` is asked
WHO_PAGE_MAX: Final = 1000
DEFAULT_MAX_FRAME: Final = 64 * 1024


HISTORY_PAGE: Final = 100  # events in a `history` reply when no `limit` is asked
HISTORY_PAGE_MAX: Final = 1000  # the most a page holds, whatever `limit` says
DEFAULT_HEARTBEAT: Final = 5.0  # seconds, until a `welcome` says otherwise
# The broker drops a member after this many silent heartbeat intervals, and a
# client takes a broker as gone after as many.
MISSED_HEARTBEATS: Final = 3


class ErrorCode(StrEnum):
    """The error codes of ``error`` replies (an unknown one is a plain failure)."""

    BAD_FRAME = "bad_frame"
    BAD_REQUEST = "bad_request"
    BAD_NAME = "bad_name"
    NAME_TAKEN = "name_taken"
    NOT_JOINED = "not_joined"
    TOO_LARGE = "too_large"
    RATE_LIMITED = "rate_limited"
    NO_SUCH_USER = "no_such_user"
    INTERNAL = "internal"  # the broker failed on this request (its bug, not yours)
    # Additions (a v1 client treats an unknown code as a plain failure):
    TOO_MANY_NAMES = "too_many_names"  # CURVE: this key holds its limit of names
    UNAVAILABLE = "unavailable"  # the broker's store failed this request; retry later
    # Version 2 (rooms):
    BAD_ROOM = "bad_room"  # not a valid room name
    NO_SUCH_ROOM = "no_such_room"
    NOT_IN_ROOM = "not_in_room"  # a room the client has not entered (or may not see)
    FORBIDDEN = "forbidden"  # not an operator, banned, invite-only, moderated
    TOO_MANY_ROOMS = "too_many_rooms"  # rooms per client, or rooms in all
    # Never on the wire: the client library's code for a reply it cannot parse.
    BAD_REPLY = "bad_reply"


class LeaveReason(StrEnum):
    """Why a member left: the ``reason`` of a ``left`` event."""

    LEAVE = "leave"  # it said `leave`
    TIMEOUT = "timeout"  # it fell silent
    KICKED = "kicked"  # the operator kicked it, or (v2, with `by`) a room operator
    REPLACED = "replaced"  # another connection took its name with its token
    SHUTDOWN = "shutdown"  # the broker stopped
    PART = "part"  # v2: it parted the room
    BANNED = "banned"  # v2: a room operator banned it (with `by`)
    CLOSED = "closed"  # v2: the broker's operator closed the room


class ByeReason(StrEnum):
    """Why the broker said ``bye`` to a client."""

    KICKED = "kicked"
    REPLACED = "replaced"
    SHUTDOWN = "shutdown"


class ClientStatus(StrEnum):
    """The ``state`` of a client library ``Status`` item (see ``zchat.client``)."""

    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    RECONNECTED = "reconnected"
    HISTORY_LOST = "history_lost"
    MISSED = "missed"
    CLOSED = "closed"
    # v2: a room we were in could not be entered again after a reconnect
    # (the broker restarted and it is private, or we were banned meanwhile).
    REFUSED = "refused"


# --------------------------------------------------------------------------
# Frames


def encode(body: dict[str, Any]) -> bytes:
    """Pack one map into one frame (text as MessagePack ``str``)."""
    return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]


def decode_frame(frame: bytes | memoryview, max_size: int = DEFAULT_MAX_FRAME) -> dict[str, Any]:
    """Unpack one frame into a map with string keys and a string ``type``.

    Raises:
        ProtocolError: ``too_large`` past ``max_size`` bytes (0: no limit),
            ``bad_frame`` for anything that is not one UTF-8 MessagePack map,
            ``bad_request`` when ``type`` is missing or not a string.
    """
    if max_size and len(frame) > max_size:
        raise ProtocolError(
            ErrorCode.TOO_LARGE, f"frame of {len(frame)} bytes exceeds {max_size}"
        )
    try:
        body = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
            msgpack.StackError) as exc:
        # UnicodeDecodeError is a ValueError: non-UTF-8 text lands here too.
        raise ProtocolError(ErrorCode.BAD_FRAME, f"not one MessagePack map: {exc}") from exc
    if not isinstance(body, dict):
        raise ProtocolError(ErrorCode.BAD_FRAME, f"payload is a {type(body).__name__}, not a map")
    kind = body.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "missing or non-string 'type'")
    return body


def encode_batch(packed_events: list[bytes], room: str = ROOM) -> bytes:
    """One ``batch`` frame from already packed room events, without repacking.

    ``{type: "batch", room, events: [...]}``: a MessagePack array is its
    header followed by its items, so the events' bytes are joined as they are.
    """
    head = b"\x83" + b"".join(
        msgpack.packb(word) for word in ("type", "batch", "room", room, "events"))
    count = len(packed_events)
    if count < 16:
        header = bytes((0x90 | count,))
    elif count < 0x10000:
        header = b"\xdc" + count.to_bytes(2, "big")
    else:
        header = b"\xdd" + count.to_bytes(4, "big")
    return head + header + b"".join(packed_events)


# --------------------------------------------------------------------------
# Names


# NFKC composes at most four code points into one, so a longer string cannot
# be a name and is refused (or folded) before any work is spent on it.
_MAX_RAW_NAME: Final = 4 * MAX_NAME_CHARS


def fold_name(name: str) -> str:
    """The key under which names are unique: names that render alike share it.

    The Unicode UTS #39 skeleton of the NFKC case-folded name (see
    ``zchat.names``): ``alice``, ``ALICE``, a fullwidth ``alice`` and an
    all-Cyrillic look-alike have one key. A key, never shown.

    A string too long to be a name (see ``check_name``) is its own key: it
    finds no member, without the cost of folding, say, a 64 KiB dm ``to``
    (and a key is a fixed point, so this keeps ``fold_name`` idempotent).
    """
    if len(name) > _MAX_RAW_NAME:
        return name
    return name_key(name, MAX_NAME_CHARS)


def check_name(name: object) -> str:
    """Return ``name`` as it is to be shown if it is a valid user name.

    The shown name is the NFKC form of what the user typed (fullwidth letters
    become plain ones, a decomposed ``é`` the composed one); ``PROTOCOL.md``
    ("Names") has the rules.

    Raises:
        ProtocolError: ``bad_request`` if ``name`` is not a string, else
            ``bad_name`` with a detail that says which rule it breaks.
    """
    if not isinstance(name, str):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'name' must be a string")
    shown = "" if len(name) > _MAX_RAW_NAME else unicodedata.normalize("NFKC", name)
    if not 1 <= len(shown) <= MAX_NAME_CHARS:
        raise ProtocolError(ErrorCode.BAD_NAME, f"name must be 1 to {MAX_NAME_CHARS} characters")
    problem = name_problem(shown)
    if problem is not None:
        raise ProtocolError(ErrorCode.BAD_NAME, problem)
    return shown


_ROOM_NAME: Final = re.compile(r"[a-z0-9][a-z0-9._-]*")


def check_room(room: object, max_chars: int = MAX_ROOM_CHARS) -> str:
    """Return ``room`` folded to lower case if it is a valid room name.

    1 to ``max_chars`` characters from ``a-z0-9-_.``, starting with a letter
    or a digit; upper-case ASCII letters are folded. Anything else (a ``#``,
    a space, a non-ASCII letter, even one whose lower case is ASCII, like
    the Kelvin sign) is refused.

    Raises:
        ProtocolError: ``bad_request`` if ``room`` is not a string, else
            ``bad_room``.
    """
    if not isinstance(room, str):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'room' must be a string")
    if not 1 <= len(room) <= max_chars or not room.isascii():
        raise ProtocolError(ErrorCode.BAD_ROOM,
                            f"a room name is 1 to {max_chars} characters from a-z0-9-_.")
    folded = room.lower()
    if _ROOM_NAME.fullmatch(folded) is None:
        raise ProtocolError(ErrorCode.BAD_ROOM, "a room name is made of a-z, 0-9, '-', '_', "
                            "'.' and starts with a letter or a digit")
    return folded


def named_room(body: dict[str, Any]) -> str | None:
    """The room a request map names, folded if valid, as sent if not (None: none).

    Every error about a request that named a room carries that room, even
    when the request was refused before it was parsed.
    """
    raw = body.get("room")
    if not isinstance(raw, str):
        return None
    try:
        return check_room(raw)
    except ProtocolError:
        return raw


# --------------------------------------------------------------------------
# Requests (client -> broker)


@dataclass(frozen=True, slots=True)
class Join:
    name: str
    since: int | None = None
    token: str | None = None
    rooms: list[Any] | None = None  # v2: rooms to enter (None: lobby); checked one by one
    id: str | None = None


@dataclass(frozen=True, slots=True)
class Say:
    """A ``message`` request: say ``text`` in ``room`` (None: lobby)."""

    text: str
    room: str | None = None
    id: str | None = None


@dataclass(frozen=True, slots=True)
class Leave:
    reason: str | None = None
    id: str | None = None


@dataclass(frozen=True, slots=True)
class Ping:
    id: str | None = None


@dataclass(frozen=True, slots=True)
class Who:
    room: str | None = None
    after: object = None  # a member name (str): the page starts after it
    limit: int | None = None
    id: str | None = None


@dataclass(frozen=True, slots=True)
class GetHistory:
    after: int
    room: str | None = None
    limit: int | None = None
    id: str | None = None


@dataclass(frozen=True, slots=True)
class SendDm:
    to: str
    text: str
    id: str | None = None


@dataclass(frozen=True, slots=True)
class Enter:
    room: str
    private: bool | None = None  # only when it creates the room
    id: str | None = None


@dataclass(frozen=True, slots=True)
class Part:
    room: str
    reason: str | None = None
    id: str | None = None


@dataclass(frozen=True, slots=True)
class ListRooms:
    id: str | None = None


@dataclass(frozen=True, slots=True)
class SetTopic:
    room: str
    text: str
    id: str | None = None


@dataclass(frozen=True, slots=True)
class SetMode:
    room: str
    private: bool | None = None
    moderated: bool | None = None
    topic_ops: bool | None = None
    id: str | None = None


@dataclass(frozen=True, slots=True)
class Op:
    room: str
    name: str
    id: str | None = None


@dataclass(frozen=True, slots=True)
class Deop:
    room: str
    name: str
    id: str | None = None


@dataclass(frozen=True, slots=True)
class KickFrom:
    """A room operator's ``kick`` (the broker's operator kicks from the console)."""

    room: str
    name: str
    reason: str | None = None
    id: str | None = None


@dataclass(frozen=True, slots=True)
class Ban:
    room: str
    name: str
    id: str | None = None


@dataclass(frozen=True, slots=True)
class Unban:
    room: str
    name: str
    id: str | None = None


@dataclass(frozen=True, slots=True)
class Invite:
    room: str
    name: str
    id: str | None = None


Request: TypeAlias = (
    Join | Say | Leave | Ping | Who | GetHistory | SendDm | Enter | Part | ListRooms
    | SetTopic | SetMode | Op | Deop | KickFrom | Ban | Unban | Invite
)

# The request table: wire type -> (class, {field: (accepted type, required)}).
# ``int`` means a true int (a MessagePack bool is refused); ``object``, anything.
_FieldSpec: TypeAlias = dict[str, tuple[type, bool]]
_ROOM_NAMED: Final[_FieldSpec] = {"room": (str, True), "name": (str, True)}
_REQUESTS: Final[dict[str, tuple[type, _FieldSpec]]] = {
    "join": (Join, {"name": (str, True), "since": (int, False), "token": (str, False),
                    "rooms": (list, False)}),
    "message": (Say, {"text": (str, True), "room": (str, False)}),
    "leave": (Leave, {"reason": (str, False)}),
    "ping": (Ping, {}),
    # `after` is checked by the broker, after `not_joined`: version 1 sent
    # `who` with any fields, and an int `after` there was never an error.
    "who": (Who, {"room": (str, False), "after": (object, False), "limit": (int, False)}),
    "history": (GetHistory, {"after": (int, True), "room": (str, False),
                             "limit": (int, False)}),
    "dm": (SendDm, {"to": (str, True), "text": (str, True)}),
    "enter": (Enter, {"room": (str, True), "private": (bool, False)}),
    "part": (Part, {"room": (str, True), "reason": (str, False)}),
    "rooms": (ListRooms, {}),
    "topic": (SetTopic, {"room": (str, True), "text": (str, True)}),
    "mode": (SetMode, {"room": (str, True), "private": (bool, False),
                       "moderated": (bool, False), "topic_ops": (bool, False)}),
    "op": (Op, _ROOM_NAMED),
    "deop": (Deop, _ROOM_NAMED),
    "kick": (KickFrom, {**_ROOM_NAMED, "reason": (str, False)}),
    "ban": (Ban, _ROOM_NAMED),
    "unban": (Unban, _ROOM_NAMED),
    "invite": (Invite, _ROOM_NAMED),
}


def with_id(body: dict[str, Any], rid: str | None) -> dict[str, Any]:
    """``body`` with the ``id`` of the request it answers, if it had one.

    Every reply echoes its request's ``id`` (PROTOCOL.md): the client routes
    replies by it.
    """
    if rid is not None:
        body["id"] = rid
    return body


def request_id(body: dict[str, Any]) -> str | None:
    """The request's ``id`` if it is a valid one, so errors can echo it."""
    rid = body.get("id")
    if isinstance(rid, str) and len(rid) <= MAX_ID_CHARS:
        return rid
    return None


def parse_request(body: dict[str, Any]) -> Request:
    """Turn a decoded map into a typed request.

    Raises:
        ProtocolError: ``bad_request`` for an unknown type, a missing or
            wrongly typed field, or a bad ``id``.
    """
    kind = body["type"]
    entry = _REQUESTS.get(kind)
    if entry is None:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"unknown type {kind!r}")
    cls, fields = entry
    rid = request_id(body)
    if rid is None and body.get("id") is not None:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"'id' must be a string of at most {MAX_ID_CHARS} characters"
        )
    values: dict[str, Any] = {"id": rid}
    for field, (ftype, required) in fields.items():
        value = body.get(field)
        if value is None:
            if required:
                raise ProtocolError(ErrorCode.BAD_REQUEST, f"{kind!r} needs {field!r}")
            continue
        if ftype is not object and type(value) is not ftype:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, f"{kind!r} field {field!r} must be {ftype.__name__}"
            )
        values[field] = value
    return cls(**values)  # type: ignore[no-any-return]


def decode_request(frame: bytes | memoryview, max_size: int = DEFAULT_MAX_FRAME) -> Request:
    """Decode one client frame into a typed request (``ProtocolError`` if bad)."""
    return parse_request(decode_frame(frame, max_size))


# --------------------------------------------------------------------------
# Events (broker -> client), as the client library hands them to its user


@dataclass(frozen=True, slots=True)
class Member:
    name: str
    addr: str


@dataclass(frozen=True, slots=True)
class Joined:
    seq: int
    ts: float
    name: str
    addr: str
    room: str = ROOM


@dataclass(frozen=True, slots=True)
class Joins:
    """Several members came into ``room`` at once: one event, one seq.

    A big room's broker announces the joins of one pass of its loop after
    the first as one ``joins`` (PROTOCOL.md, "Scale: big rooms"); each of
    ``members`` is to be taken as a ``Joined``.
    """

    room: str
    seq: int
    ts: float
    members: tuple[Member, ...]


@dataclass(frozen=True, slots=True)
class Message:
    seq: int
    ts: float
    sender: str
    text: str
    room: str = ROOM


@dataclass(frozen=True, slots=True)
class Left:
    seq: int
    ts: float
    name: str
    addr: str
    reason: str
    room: str = ROOM
    detail: str = ""  # the client's free-text `leave` reason, or the operator's for a kick
    by: str = ""  # v2: the room operator who kicked or banned


@dataclass(frozen=True, slots=True)
class Notice:
    seq: int
    ts: float
    text: str
    room: str = ROOM


@dataclass(frozen=True, slots=True)
class TopicChanged:
    """v2: ``name`` set ``room``'s topic to ``text``."""

    room: str
    seq: int
    ts: float
    name: str
    text: str


@dataclass(frozen=True, slots=True)
class ModeChanged:
    """v2: ``name`` (``"*"``: the broker's operator) changed ``room``'s settings.

    Only the fields that changed are set: the flags to their new value,
    ``op``/``deop``/``ban``/``unban`` to the name concerned.
    """

    room: str
    seq: int
    ts: float
    name: str
    private: bool | None = None
    moderated: bool | None = None
    topic_ops: bool | None = None
    op: str | None = None
    deop: str | None = None
    ban: str | None = None
    unban: str | None = None


@dataclass(frozen=True, slots=True)
class OtherEvent:
    """A room event of a type this version does not know (it still has a seq)."""

    seq: int
    ts: float
    type: str
    body: dict[str, Any]
    room: str = ROOM


@dataclass(frozen=True, slots=True)
class Direct:
    """A private ``dm`` received on the DEALER socket (never on PUB)."""

    sender: str
    text: str
    ts: float


Event: TypeAlias = (Joined | Joins | Message | Left | Notice | TopicChanged | ModeChanged
                    | OtherEvent)

# Room event types (an unknown type is an ``OtherEvent``): a frame of one of
# these on the DEALER is a private room's event, not a reply.
EVENT_TYPES: Final = frozenset({"joined", "joins", "message", "left", "notice", "topic",
                                "mode"})


def _field(body: dict[str, Any], name: str, ftype: type | tuple[type, ...]) -> Any:
    value = body.get(name)
    if not isinstance(value, ftype) or isinstance(value, bool):
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"{body.get('type')!r} field {name!r} is bad")
    return value


def parse_event(body: dict[str, Any]) -> Event:
    """Turn a room event map into a typed event (unknown types are kept).

    Raises:
        ProtocolError: when ``seq`` or ``ts`` is missing, or a known type
            lacks one of its fields.
    """
    seq = _field(body, "seq", int)
    ts = float(_field(body, "ts", (int, float)))
    room = _optional(body, "room", str) or ROOM
    kind = body["type"]
    if kind == "message":
        return Message(seq, ts, _field(body, "from", str), _field(body, "text", str), room)
    if kind == "joined":
        return Joined(seq, ts, _field(body, "name", str), _field(body, "addr", str), room)
    if kind == "joins":
        # `count` is only len(members): the list is what counts.
        return Joins(room, seq, ts, tuple(parse_members(body.get("members"))))
    if kind == "left":
        return Left(
            seq, ts, _field(body, "name", str), _field(body, "addr", str),
            _field(body, "reason", str), room,
            body["detail"] if isinstance(body.get("detail"), str) else "",
            body["by"] if isinstance(body.get("by"), str) else "",
        )
    if kind == "notice":
        return Notice(seq, ts, _field(body, "text", str), room)
    if kind == "topic":
        return TopicChanged(room, seq, ts, _field(body, "name", str), _field(body, "text", str))
    if kind == "mode":
        flags = {k: body[k] for k in ("private", "moderated", "topic_ops")
                 if isinstance(body.get(k), bool)}
        names = {k: body[k] for k in ("op", "deop", "ban", "unban")
                 if isinstance(body.get(k), str)}
        return ModeChanged(room, seq, ts, _field(body, "name", str), **flags, **names)
    return OtherEvent(seq, ts, kind, body, room)


def parse_members(items: object) -> list[Member]:
    """Parse a ``members`` list of ``{name, addr}`` maps."""
    if not isinstance(items, list):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'members' must be a list")
    members = []
    for item in items:
        if not isinstance(item, dict):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "a member must be a map")
        members.append(Member(_field(item, "name", str), _field(item, "addr", str)))
    return members


# --------------------------------------------------------------------------
# Replies (broker -> client, on the DEALER), parsed by a table
#
#     type      class          fields (? optional, with its default)
#     welcome   Welcome        name, seq, pub, token, addr?, room?, members?,
#                              heartbeat?, epoch?, rate?, burst?, batch?
#     ack       Ack            seq? (a message's; a dm's ack has none)
#     error     ErrorReply     code, detail?
#     pong      Pong           ts, seq?, joined?, seqs?
#     members   Members        members, room?, count?, next?
#     history   HistoryPage    events, room?
#     dm        Direct         from, text, ts?
#     bye       Bye            reason, detail?
#     entered   Entered        room, seq, topic, count, members, ops, private,
#                              moderated, topic_ops                 (v2 from here)
#     parted    Parted         room
#     rooms     RoomList       rooms: [{name, topic, count, private}]
#     invited   Invited        room, from
#     (other)   OtherReply     the map as it came
#
# Version 2 adds to welcome: rooms, count, refused; to ack and error: room.
# Its fields come after ``id``, so version 1 code that builds replies by
# position is unchanged.
#
# Every reply but ``dm`` and ``bye`` may carry the ``id`` of its request.


@dataclass(frozen=True, slots=True)
class Welcome:
    """What the broker said when we joined."""

    name: str
    addr: str
    room: str
    seq: int
    members: list[Member]
    pub: str
    heartbeat: float
    token: str
    epoch: str | None
    rate: float | None = None  # the broker's message rate limit, if it says
    burst: int | None = None
    batch: bool = False  # it also publishes room events in batches
    id: str | None = None
    rooms: tuple[str, ...] = ()  # v2: the rooms entered (v1 brokers: none said)
    count: int | None = None  # v2: members of `room`
    refused: tuple[Refused, ...] = ()  # v2: rooms of the join it could not enter


@dataclass(frozen=True, slots=True)
class Refused:
    """A room a ``join`` listed and could not enter, and why (an ``ErrorCode``)."""

    room: str
    code: str


@dataclass(frozen=True, slots=True)
class Ack:
    seq: int | None = None
    id: str | None = None
    room: str | None = None  # v2: the room the request was about


@dataclass(frozen=True, slots=True)
class ErrorReply:
    code: str  # an ``ErrorCode`` value, or one this version does not know
    detail: str = ""
    id: str | None = None
    room: str | None = None  # v2: the room the failed request named


@dataclass(frozen=True, slots=True)
class Pong:
    ts: float
    seq: int | None = None  # addition: the room's head seq
    joined: bool | None = None  # addition: False once the broker forgot us
    id: str | None = None
    seqs: dict[str, int] | None = None  # v2: the last seq of each room we are in


@dataclass(frozen=True, slots=True)
class Members:
    members: list[Member]
    id: str | None = None
    room: str = ROOM
    count: int | None = None  # v2: all the room's members, of which this is a page
    next: str | None = None  # v2: pass as `after` for the next page; None: last page


@dataclass(frozen=True, slots=True)
class HistoryPage:
    events: list[Event]
    id: str | None = None
    room: str = ROOM


@dataclass(frozen=True, slots=True)
class Entered:
    """v2: we are in ``room`` (the answer to ``enter``)."""

    room: str
    seq: int
    topic: str
    count: int
    members: list[Member]  # at most MEMBERS_SHOWN; the rest with `who`
    ops: list[str]
    private: bool
    moderated: bool
    topic_ops: bool
    id: str | None = None


@dataclass(frozen=True, slots=True)
class Parted:
    room: str
    id: str | None = None


@dataclass(frozen=True, slots=True)
class RoomInfo:
    name: str
    topic: str
    count: int
    private: bool


@dataclass(frozen=True, slots=True)
class RoomList:
    rooms: list[RoomInfo]
    id: str | None = None


@dataclass(frozen=True, slots=True)
class Invited:
    """v2: ``from_`` invites us to ``room`` (on the DEALER, never PUB)."""

    room: str
    from_: str


@dataclass(frozen=True, slots=True)
class Bye:
    reason: str  # a ``ByeReason`` value, or one this version does not know
    detail: str = ""


@dataclass(frozen=True, slots=True)
class OtherReply:
    """A reply of a type this version does not know."""

    type: str
    body: dict[str, Any]
    id: str | None = None


BrokerReply: TypeAlias = (
    Welcome | Ack | ErrorReply | Pong | Members | HistoryPage | Direct | Bye | OtherReply
    | Entered | Parted | RoomList | Invited
)


def _optional(body: dict[str, Any], name: str, ftype: type | tuple[type, ...]) -> Any:
    """A field that may be absent (None); present, it must have its type."""
    if body.get(name) is None:
        return None
    return _field(body, name, ftype)


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return None
    return float(value)


def _parse_welcome(body: dict[str, Any], rid: str | None) -> Welcome:
    burst = _number(body.get("burst"))
    epoch = body.get("epoch")
    return Welcome(
        name=_field(body, "name", str),
        addr=_optional(body, "addr", str) or "",
        room=_optional(body, "room", str) or ROOM,
        seq=_field(body, "seq", int),
        members=parse_members(body.get("members", [])),
        pub=str(_field(body, "pub", (str, int))),
        heartbeat=float(_optional(body, "heartbeat", (int, float)) or DEFAULT_HEARTBEAT),
        token=_field(body, "token", str),
        epoch=epoch if isinstance(epoch, str) else None,
        rate=_number(body.get("rate")),
        burst=int(burst) if burst is not None else None,
        batch=body.get("batch") is True,
        id=rid,
        rooms=tuple(_strings(body, "rooms")),
        count=_optional(body, "count", int),
        refused=tuple(Refused(_field(item, "room", str), _field(item, "code", str))
                      for item in _maps(body, "refused")),
    )


def _maps(body: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """An optional list of maps (absent: empty)."""
    items = body.get(name)
    if items is None:
        return []
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise ProtocolError(ErrorCode.BAD_REPLY, f"{name!r} must be a list of maps")
    return items


def _strings(body: dict[str, Any], name: str) -> list[str]:
    """An optional list of strings (absent: empty)."""
    items = body.get(name)
    if items is None:
        return []
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise ProtocolError(ErrorCode.BAD_REPLY, f"{name!r} must be a list of strings")
    return items


def _parse_entered(body: dict[str, Any], rid: str | None) -> Entered:
    flags = {}
    for name in ("private", "moderated", "topic_ops"):
        if not isinstance(body.get(name), bool):
            raise ProtocolError(ErrorCode.BAD_REPLY, f"'entered' field {name!r} is bad")
        flags[name] = body[name]
    return Entered(
        room=_field(body, "room", str), seq=_field(body, "seq", int),
        topic=_field(body, "topic", str), count=_field(body, "count", int),
        members=parse_members(body.get("members")), ops=_strings(body, "ops"),
        id=rid, **flags,
    )


def _parse_rooms(body: dict[str, Any], rid: str | None) -> RoomList:
    rooms = []
    for item in _maps(body, "rooms"):
        if not isinstance(item.get("private"), bool):
            raise ProtocolError(ErrorCode.BAD_REPLY, "a room's 'private' is bad")
        rooms.append(RoomInfo(_field(item, "name", str), _field(item, "topic", str),
                              _field(item, "count", int), item["private"]))
    return RoomList(rooms, rid)


def _parse_members(body: dict[str, Any], rid: str | None) -> Members:
    return Members(parse_members(body.get("members")), rid,
                   _optional(body, "room", str) or ROOM, _optional(body, "count", int),
                   _optional(body, "next", str))


def _parse_events(body: dict[str, Any], rid: str | None) -> HistoryPage:
    items = body.get("events")
    if not isinstance(items, list):
        raise ProtocolError(ErrorCode.BAD_REPLY, "'events' must be a list")
    events = [parse_event(item) for item in items if isinstance(item, dict) and "type" in item]
    return HistoryPage(events, rid, _optional(body, "room", str) or ROOM)


def _parse_pong(body: dict[str, Any], rid: str | None) -> Pong:
    joined = body.get("joined")
    seqs = body.get("seqs")
    if seqs is not None and not (isinstance(seqs, dict) and all(
            isinstance(k, str) and type(v) is int for k, v in seqs.items())):
        raise ProtocolError(ErrorCode.BAD_REPLY, "'seqs' must map rooms to seqs")
    return Pong(float(_field(body, "ts", (int, float))), _optional(body, "seq", int),
                joined if isinstance(joined, bool) else None, rid, seqs)


_REPLIES: Final[dict[str, Callable[[dict[str, Any], str | None], BrokerReply]]] = {
    "welcome": _parse_welcome,
    "ack": lambda b, rid: Ack(_optional(b, "seq", int), rid, _optional(b, "room", str)),
    "error": lambda b, rid: ErrorReply(_field(b, "code", str),
                                       str(b.get("detail") or ""), rid,
                                       _optional(b, "room", str)),
    "pong": _parse_pong,
    "members": _parse_members,
    "history": _parse_events,
    "dm": lambda b, rid: Direct(_field(b, "from", str), _field(b, "text", str),
                                float(_optional(b, "ts", (int, float)) or 0.0)),
    "bye": lambda b, rid: Bye(str(b.get("reason") or ""), str(b.get("detail") or "")),
    "entered": _parse_entered,
    "parted": lambda b, rid: Parted(_field(b, "room", str), rid),
    "rooms": _parse_rooms,
    "invited": lambda b, rid: Invited(_field(b, "room", str), _field(b, "from", str)),
}


def parse_reply(body: dict[str, Any]) -> BrokerReply:
    """Turn a decoded broker reply into a typed one (unknown types are kept).

    Raises:
        ProtocolError: ``bad_reply`` when a known type lacks a field or has
            one of the wrong type (a ``welcome`` without ``seq``, say).
    """
    rid = request_id(body)
    parse = _REPLIES.get(body["type"])
    if parse is None:
        return OtherReply(body["type"], body, rid)
    try:
        return parse(body, rid)
    except ProtocolError as exc:
        raise ProtocolError(ErrorCode.BAD_REPLY, exc.detail) from None
