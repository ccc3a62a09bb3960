"""The client's protocol logic, sans-I/O: ``Session`` (the client role of ``Broker``).

A ``Session`` owns no socket and reads no clock. Its shell (``zchat.client``)
feeds it what happened, with the time, and carries out the actions it
returns, in order::

    shell                               Session                      actions
    start()                          -> start(now)                 -> OpenDealer, Send(join)
    a DEALER frame                   -> reply_received(frames, now)
    a SUB frame                      -> broadcast_received(frames, now)
    the DEALER's monitor             -> handshake_succeeded(),
                                        handshake_failed(fault, now),
                                        disconnected(now)
    a public call (data, not code)   -> submit(rid, kind, body, now),
                                        leave(reason, now), close(reason)
    the poll timed out               -> tick(now); the next is at deadline()

    actions: OpenDealer(endpoint), CloseDealer, Send(body), OpenSub(endpoint,
             topics), CloseSub, Subscribe(topic), Unsubscribe(topic), Emit(item),
             Resolve(rid, value), Reject(rid, error), Welcomed(welcome),
             Closed(reason, error)

What it does, so that a bot is a few lines:

- joins (and rejoins with ``token``, ``since`` and the ``rooms`` it is in),
  retrying with backoff when the broker does not answer or says
  ``rate_limited``; with several endpoints, a lost connection or an
  unanswered join moves on to the next one (round robin);
- keeps one ``_Room`` per room it is in: its last delivered seq, the head
  seq it knows of, its gap, and its state (topic, members, operators, modes)
  from ``entered`` and then from the room's events; subscribes to the topic
  of every room it is in (a private room's carries nothing, and staying
  subscribed means a room made public is heard from its first event);
- delivers each room's events exactly once and in ``seq`` order, whether
  they come on the SUB (public rooms) or on the DEALER (private rooms),
  filling every gap from ``history`` page by page until it reaches the head
  seq it knows of (a page may be short: the broker caps a page's bytes); a
  failed fill is asked again a moment later;
- learns heads from ``pong`` ``seqs``, the heartbeat's ``seqs`` and the
  events themselves; sees an epoch change (the broker lost its history) and
  events that fell out of the history (``missed``);
- after every ``welcome``, asks ``enter`` again for each room it is in (free
  for a member, and it announces nothing): the ``entered`` replies give each
  room's seq and state, so a resumed room is filled from where we were and
  a room's state is current; a kick of ourselves seen in the events before
  that seq happened before we came back, one after it takes the room away;
  a room the first join entered (only the room ``welcome`` describes comes
  with its seq) is read back to our own ``joined`` (``LOOK_BACK`` events at
  most), so what was said between the join and that answer is ours too;
- keeps every request until answered and sends it again after a rejoin (the
  same ``id``: the broker's dedupe makes a message land once);
- pings when idle, and takes the broker as gone after ``MISSED_HEARTBEATS``
  silent intervals, or at once when the connection drops.

Its phase is one ``Phase``; ``_TRANSITIONS`` says which phase may follow
which. Replies are routed by request id alone: the session's own requests
(the join, the history fills, the room snapshots, the leave's closing ping)
get ids from the same counter as the user's, and ``_purpose`` says what each
is for (and ``_about`` which room it concerns).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum, StrEnum, auto
from typing import Any, TypeAlias

from zchat.errors import ClientClosed, HandshakeFailed, ProtocolError, RequestFailed
from zchat.protocol import (
    BROKER_TOPIC,
    DEFAULT_HEARTBEAT,
    EVENT_TYPES,
    HISTORY_PAGE_MAX,
    MISSED_HEARTBEATS,
    ROOM,
    WHO_PAGE_MAX,
    Ack,
    BrokerReply,
    Bye,
    ByeReason,
    ClientStatus,
    Direct,
    Entered,
    ErrorCode,
    ErrorReply,
    Event,
    HistoryPage,
    Invited,
    Joined,
    Joins,
    LeaveReason,
    Left,
    Member,
    Members,
    ModeChanged,
    Parted,
    Pong,
    RoomInfo,
    RoomList,
    TopicChanged,
    Welcome,
    batch_topic,
    decode_frame,
    fold_name,
    parse_event,
    parse_reply,
    room_topic,
)

__all__ = [
    "EARLY_PING_SECONDS",
    "FILL_RETRY_SECONDS",
    "HANDSHAKE_TRIES",
    "JOIN_ATTEMPT_SECONDS",
    "LEAVE_WAIT_SECONDS",
    "LOOK_BACK",
    "RETRY_MAX",
    "RETRY_MIN",
    "Action",
    "CloseDealer",
    "CloseSub",
    "Closed",
    "Emit",
    "HandshakeFault",
    "Item",
    "OpenDealer",
    "OpenSub",
    "Phase",
    "Reject",
    "RequestKind",
    "Resolve",
    "RoomState",
    "Send",
    "Session",
    "Status",
    "Subscribe",
    "Unsubscribe",
    "Welcomed",
    "resolve_pub",
    "room_key",
    "split_endpoints",
]

log = logging.getLogger("zchat.client")

JOIN_ATTEMPT_SECONDS = 2.0  # a join unanswered this long is tried again
RETRY_MIN, RETRY_MAX = 0.25, 5.0  # backoff between join attempts
EARLY_PING_SECONDS = 0.3  # after a welcome: time enough for the SUB to connect
LEAVE_WAIT_SECONDS = 2.0  # at most, for the broker to confirm a leave
FILL_RETRY_SECONDS = 0.5  # after a history fill failed (rate_limited, unavailable)
HANDSHAKE_TRIES = 5  # handshakes cut short in a row before a CURVE key is blamed
REPLAY_KEPT = 1000  # events kept to replay onto a room snapshot still out
# A room our first join entered (other than the one `welcome` describes) is
# read back this far before its `entered` seq, to find our own `joined`.
LOOK_BACK = 100

# A `left` of ourselves for one of these takes the room away; the others
# (leave, timeout, shutdown, replaced) end a connection, and we rejoin.
_OUSTED = frozenset({LeaveReason.KICKED, LeaveReason.BANNED, LeaveReason.CLOSED,
                     LeaveReason.PART})
# A snapshot `enter` refused for one of these: we are not in that room.
_NOT_IN = frozenset({ErrorCode.FORBIDDEN, ErrorCode.NOT_IN_ROOM, ErrorCode.NO_SUCH_ROOM,
                     ErrorCode.BAD_ROOM, ErrorCode.TOO_MANY_ROOMS})


@dataclass(frozen=True, slots=True)
class Status:
    """A change in the connection, delivered among the events.

    ``state`` is a ``ClientStatus``: ``connected`` (first welcome),
    ``disconnected`` (the broker stopped answering or shut down; retrying),
    ``reconnected``, ``history_lost`` (the broker restarted without its
    history: events from before may be missing; ``count`` is the room's seq
    when we rejoined, so the events up to it that follow are the new history,
    said while we were away or long before), ``missed`` (``count`` events of
    ``room`` fell out of the broker's history before they could be fetched),
    ``refused`` (``room`` could not be entered again after a reconnect;
    ``detail`` says why), ``closed`` (kicked, replaced by another connection
    with our token, or ``close()``).
    """

    state: ClientStatus
    detail: str = ""
    count: int = 0
    room: str = ""  # the room it is about, if any


@dataclass(frozen=True, slots=True)
class RoomState:
    """What we know of a room we are in, as of ``last_seq`` (a frozen snapshot).

    ``members`` lists at most the first 100 that ``entered`` named plus
    those seen joining since (``who`` has them all); ``count`` is the
    room's size.
    """

    room: str
    topic: str = ""
    count: int = 0
    members: tuple[Member, ...] = ()
    ops: tuple[str, ...] = ()
    private: bool = False
    moderated: bool = False
    topic_ops: bool = True
    last_seq: int = 0


Item: TypeAlias = Event | Direct | Invited | Status


class Phase(Enum):
    """Where the session is; ``_TRANSITIONS`` says where it may go next."""

    IDLE = auto()  # not started
    JOINING = auto()  # a join is out, on a fresh DEALER
    WAITING = auto()  # between join attempts (a late welcome still counts)
    JOINED = auto()
    LEAVING = auto()  # `leave` sent; waiting for the broker to take it
    CLOSED = auto()


_TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.IDLE: frozenset({Phase.JOINING, Phase.CLOSED}),
    Phase.JOINING: frozenset({Phase.JOINING, Phase.WAITING, Phase.JOINED, Phase.CLOSED}),
    Phase.WAITING: frozenset({Phase.JOINING, Phase.WAITING, Phase.JOINED, Phase.CLOSED}),
    Phase.JOINED: frozenset({Phase.WAITING, Phase.LEAVING, Phase.CLOSED}),
    Phase.LEAVING: frozenset({Phase.CLOSED}),
    Phase.CLOSED: frozenset(),
}


class HandshakeFault(StrEnum):
    """How the DEALER's handshake failed, as its monitor says."""

    NO_DETAIL = "no_detail"  # cut short: a wrong key, or a broker shedding connections
    PROTOCOL = "protocol"  # a mechanism mismatch (one side encrypts)
    AUTH = "auth"  # the broker refused our key


class RequestKind(Enum):
    """A user's request (the wire type), and so how its reply is read."""

    MESSAGE = "message"  # -> the seq the broker gave it
    DM = "dm"  # -> None
    WHO = "who"  # -> list[Member], every page
    HISTORY = "history"  # -> list[Event]
    PING = "ping"  # -> the broker's clock
    ENTER = "enter"  # -> Entered
    PART = "part"  # -> None
    ROOMS = "rooms"  # -> list[RoomInfo]
    TOPIC = "topic"  # these -> None, once acked
    MODE = "mode"
    OP = "op"
    DEOP = "deop"
    KICK = "kick"
    BAN = "ban"
    UNBAN = "unban"
    INVITE = "invite"


class _Purpose(Enum):
    """What the session's own requests are for."""

    JOIN = auto()
    FILL = auto()  # a history page for one room's gap
    SNAPSHOT = auto()  # `enter` again after a welcome: the room's seq and state
    LEAVE_ACK = auto()  # answered after the broker took our `leave`


# Actions, for the shell to carry out in order.


@dataclass(frozen=True, slots=True)
class OpenDealer:
    """Close the DEALER (and its monitor) if any; open one connected to ``endpoint``."""

    endpoint: str = ""


@dataclass(frozen=True, slots=True)
class CloseDealer:
    """Close the DEALER and its monitor."""


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``body`` on the DEALER (dropped if it cannot go now)."""

    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class OpenSub:
    """Replace the SUB socket by one connected to ``endpoint``."""

    endpoint: str
    topics: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class CloseSub:
    """Close the SUB socket: its broadcast endpoint belongs to a broker left behind."""


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Add ``topic`` to the SUB's subscriptions (a room entered)."""

    topic: bytes


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """Drop ``topic`` from the SUB's subscriptions (a room left)."""

    topic: bytes


@dataclass(frozen=True, slots=True)
class Emit:
    """Hand ``item`` to the user."""

    item: Item


@dataclass(frozen=True, slots=True)
class Resolve:
    """The request ``rid`` succeeded with ``value``."""

    rid: str
    value: Any


@dataclass(frozen=True, slots=True)
class Reject:
    """The request ``rid`` failed."""

    rid: str
    error: Exception


@dataclass(frozen=True, slots=True)
class Welcomed:
    """A join succeeded (``connect()`` returns the first one)."""

    welcome: Welcome


@dataclass(frozen=True, slots=True)
class Closed:
    """The session ended: stop. ``error`` is for a ``connect()`` still waiting."""

    reason: str
    error: Exception


Action: TypeAlias = (
    OpenDealer | CloseDealer | Send | OpenSub | CloseSub | Subscribe | Unsubscribe | Emit
    | Resolve | Reject | Welcomed | Closed
)


@dataclass(slots=True)
class _Pending:
    kind: RequestKind
    body: dict[str, Any]
    sent_at: float = -math.inf
    gathered: list[Any] = field(default_factory=list)  # `who` pages so far


def _ack_seq(reply: BrokerReply) -> int:
    if not isinstance(reply, Ack) or reply.seq is None:
        raise ProtocolError(ErrorCode.BAD_REPLY, "a message's ack needs 'seq'")
    return reply.seq


def _ack(reply: BrokerReply) -> None:
    if not isinstance(reply, Ack):
        raise ProtocolError(ErrorCode.BAD_REPLY, "expected an ack")


def _members(reply: BrokerReply) -> list[Member]:
    if not isinstance(reply, Members):
        raise ProtocolError(ErrorCode.BAD_REPLY, "expected members")
    return reply.members


def _events(reply: BrokerReply) -> list[Event]:
    if not isinstance(reply, HistoryPage):
        raise ProtocolError(ErrorCode.BAD_REPLY, "expected history")
    return reply.events


def _pong_ts(reply: BrokerReply) -> float:
    if not isinstance(reply, Pong):
        raise ProtocolError(ErrorCode.BAD_REPLY, "expected a pong")
    return reply.ts


def _entered(reply: BrokerReply) -> Entered:
    if not isinstance(reply, Entered):
        raise ProtocolError(ErrorCode.BAD_REPLY, "expected entered")
    return reply


def _parted(reply: BrokerReply) -> None:
    if not isinstance(reply, Parted):
        raise ProtocolError(ErrorCode.BAD_REPLY, "expected parted")


def _room_list(reply: BrokerReply) -> list[RoomInfo]:
    if not isinstance(reply, RoomList):
        raise ProtocolError(ErrorCode.BAD_REPLY, "expected rooms")
    return reply.rooms


# How a user's request reads its reply.
_RESULTS: dict[RequestKind, Callable[[BrokerReply], Any]] = {
    RequestKind.MESSAGE: _ack_seq,
    RequestKind.DM: _ack,
    RequestKind.WHO: _members,
    RequestKind.HISTORY: _events,
    RequestKind.PING: _pong_ts,
    RequestKind.ENTER: _entered,
    RequestKind.PART: _parted,
    RequestKind.ROOMS: _room_list,
    **{kind: _ack for kind in (RequestKind.TOPIC, RequestKind.MODE, RequestKind.OP,
                               RequestKind.DEOP, RequestKind.KICK, RequestKind.BAN,
                               RequestKind.UNBAN, RequestKind.INVITE)},
}

_BYE_TEXT: dict[str, str] = {
    ByeReason.KICKED: "kicked by the operator",
    ByeReason.REPLACED: "replaced by a new connection",
}


def resolve_pub(pub: str, endpoint: str) -> str:
    """The SUB endpoint for a ``welcome`` ``pub``: a bare port uses our host."""
    if pub.isdigit():
        base = endpoint.rpartition(":")[0]
        return f"{base}:{pub}"
    return pub


def split_endpoints(endpoint: str) -> list[str]:
    """The endpoints of a comma-separated list (fail-over, tried in turn)."""
    return [part.strip() for part in endpoint.split(",") if part.strip()]


def room_key(room: str) -> str:
    """A room name as the broker folds it: ``#Dev`` and ``dev`` are ``dev``.

    Users write rooms as ``#name``; the wire has no ``#``. Only ASCII is
    folded (the broker refuses any other name as ``bad_room`` anyway).
    """
    name = room[1:] if room.startswith("#") else room
    return name.lower() if name.isascii() else name


@dataclass(slots=True)
class _Gap:
    """Room events received ahead of a hole in seq, while history fills it."""

    ahead: dict[int, Event] = field(default_factory=dict)
    fill_id: str | None = None  # the history request out, if any
    retry_at: float = math.inf  # when to ask again after a failed fill


@dataclass(slots=True)
class _Room:
    """One room we are in: where its events are, and what we know of it."""

    name: str
    last_seq: int | None  # the last event delivered; None: not known where to start yet
    head: int = 0  # the highest seq we know the room has
    gap: _Gap = field(default_factory=_Gap)
    topic: str = ""
    count: int = 0
    members: dict[str, Member] = field(default_factory=dict)  # by fold_name
    ops: dict[str, str] = field(default_factory=dict)  # fold_name -> name
    private: bool = False
    moderated: bool = False
    topic_ops: bool = True
    snapshot_seq: int = 0  # the seq of the last `entered`: its state counts events to it
    snapshot_id: str | None = None  # a snapshot `enter` out
    replay: list[Event] = field(default_factory=list)  # delivered while it is out
    ousted_at: int | None = None  # a `left` of ourselves seen while it is out
    look_back: bool = False  # entered with the join: where we came in is to be found
    quiet_to: int | None = None  # events to here came before us, unless after our `joined`

    def state(self) -> RoomState:
        # Made afresh on each call, never cached: a shell's user may ask from
        # another thread, and a cache filled there could outlive the change
        # that made it stale. Asking is rare; events are not.
        return RoomState(self.name, self.topic, self.count, tuple(self.members.values()),
                         tuple(self.ops.values()), self.private, self.moderated,
                         self.topic_ops, self.last_seq or 0)


class Session:
    """One client's protocol state: a join, its rooms, the requests in flight.

    Args:
        name: the name to join with.
        endpoint: the broker's input endpoint, or several separated by
            commas (fail-over: tried in turn when one is lost).
        broadcast: the broadcast endpoint, if known (else from ``welcome``).
        token: a token from an earlier ``welcome``, to take the name over.
        since: the last seq of ``lobby`` already seen (events after it are
            delivered).
        encrypted: the sockets use CURVE keys (a handshake failure then
            blames a key; without keys, a broker that encrypts).
        id_prefix: makes this session's request ids its own.
        rooms: the rooms to enter with the first join.
    """

    def __init__(self, name: str, endpoint: str, *, broadcast: str | None = None,
                 token: str | None = None, since: int | None = None,
                 encrypted: bool = False, id_prefix: str = "",
                 rooms: Iterable[str] = (ROOM,)) -> None:
        self.name = name
        self.endpoints = split_endpoints(endpoint) or [endpoint]
        self.endpoint = self.endpoints[0]  # the one tried now
        self.welcome: Welcome | None = None  # the current join's, while joined
        self.rooms: dict[str, _Room] = {}  # the rooms we are in, in order of entry
        self.phase = Phase.IDLE
        self.close_reason = ""
        self._wanted = list(dict.fromkeys(room_key(r) for r in rooms))
        self._entered: tuple[str, ...] = ()  # self.rooms' names, for other threads
        self._primary = ROOM  # the room the v1 fields of `welcome` describe
        self._since = since
        self._broadcast = broadcast
        self._batch = False
        self._token = token
        self._encrypted = encrypted
        self._ids = (f"{id_prefix}{n}" for n in itertools.count(1))
        self._purpose: dict[str, _Purpose] = {}
        self._about: dict[str, str] = {}  # a fill's or snapshot's room
        self._join_id = ""
        self._pending: dict[str, _Pending] = {}
        self._epoch: str | None = None
        self._was_joined = False
        self._heartbeat = DEFAULT_HEARTBEAT
        self._retry = RETRY_MIN
        self._attempt_at = 0.0  # JOINING: when the join went; WAITING: when to try again
        self._leave_deadline = math.inf
        self._early_ping = math.inf
        self._last_heard = 0.0
        self._last_sent = 0.0
        self._handshaken = False  # on the current DEALER connection
        self._handshake_failures = 0  # cut short since the last one that worked

    # ------------------------------------------------------------ what we know

    @property
    def members(self) -> dict[str, Member]:
        """Who is in the room ``welcome`` describes (lobby), keyed by ``fold_name``."""
        room = self.rooms.get(self._primary)
        return room.members if room is not None else {}

    @property
    def last_seq(self) -> int:
        """The last event delivered of the room ``welcome`` describes (lobby)."""
        room = self.rooms.get(self._primary)
        if room is None or room.last_seq is None:
            return (self._since or 0) if self._primary == ROOM else 0
        return room.last_seq

    @property
    def entered_rooms(self) -> tuple[str, ...]:
        """The rooms we are in, in order of entry (a tuple replaced on change)."""
        return self._entered

    def room_state(self, room: str) -> RoomState | None:
        """What we know of ``room``, or None if we are not in it."""
        found = self.rooms.get(room_key(room))
        return found.state() if found is not None else None

    # ------------------------------------------------------------ phases

    def _goto(self, phase: Phase) -> None:
        if phase not in _TRANSITIONS[self.phase]:
            raise RuntimeError(f"session: {self.phase.name} -> {phase.name} is not a transition")
        self.phase = phase

    @property
    def joined(self) -> bool:
        """Joined (or leaving): requests go out, room events come in."""
        return self.phase in (Phase.JOINED, Phase.LEAVING)

    @property
    def closed(self) -> bool:
        return self.phase is Phase.CLOSED

    def deadline(self) -> float:
        """When ``tick`` must run next, on the clock ``now`` comes from."""
        match self.phase:
            case Phase.LEAVING:
                return self._leave_deadline
            case Phase.JOINING:
                return self._attempt_at + JOIN_ATTEMPT_SECONDS
            case Phase.WAITING:
                return self._attempt_at
            case Phase.JOINED:
                hb = self._heartbeat
                soonest = min(self._last_sent + hb, self._last_heard + MISSED_HEARTBEATS * hb,
                              self._early_ping)
                for room in self.rooms.values():
                    soonest = min(soonest, room.gap.retry_at)
                for pending in self._pending.values():
                    soonest = min(soonest, pending.sent_at + 2 * hb)
                return soonest
            case _:
                return math.inf

    # ------------------------------------------------------------ inputs

    def start(self, now: float) -> list[Action]:
        """Begin: open the DEALER and join."""
        if self.phase is not Phase.IDLE:
            return []
        self._last_heard = now
        return self._join(now)

    def tick(self, now: float) -> list[Action]:
        """The timers: join attempts, pings, silence, resends, fills, leave."""
        out: list[Action] = []
        match self.phase:
            case Phase.LEAVING:
                if now >= self._leave_deadline:
                    out += self._close("left")  # the broker will time us out instead
            case Phase.JOINING:
                if now - self._attempt_at >= JOIN_ATTEMPT_SECONDS:
                    # No answer: with several endpoints, the next one may.
                    out += self._next_endpoint()
                    self._wait_to_join(now)
            case Phase.WAITING:
                if now >= self._attempt_at:
                    out += self._join(now)
            case Phase.JOINED:
                hb = self._heartbeat
                if now - self._last_heard >= MISSED_HEARTBEATS * hb:
                    return self._lost("broker unreachable, retrying…", now)
                if now - self._last_sent >= hb or now >= self._early_ping:
                    # The early ping closes the slow-joiner window: events
                    # published between our welcome and our SUB's connection
                    # show up as a seq in the pong, well before the next
                    # heartbeat would tell.
                    self._early_ping = math.inf
                    out += self._send({"type": "ping"}, now)
                for room in list(self.rooms.values()):
                    if now >= room.gap.retry_at:
                        room.gap.retry_at = math.inf
                        out += self._fill(room, now)
                for pending in self._pending.values():
                    # Unacked after two intervals: it may have been lost in a
                    # reconnect of the DEALER; the same id makes resending
                    # harmless.
                    if now - pending.sent_at >= 2 * hb:
                        pending.sent_at = now
                        out += self._send(pending.body, now)
        return out

    def submit(self, rid: str, kind: RequestKind, body: dict[str, Any],
               now: float) -> list[Action]:
        """A user's request (``body`` without its ``id``), answered by ``rid``."""
        if self.closed:
            return [Reject(rid, ClientClosed(self.close_reason))]
        body = {**body, "type": kind.value, "id": rid}
        if isinstance(body.get("room"), str):
            body["room"] = room_key(body["room"])
        if kind is RequestKind.WHO:
            body.setdefault("limit", WHO_PAGE_MAX)  # all pages are wanted: few of them
        pending = _Pending(kind, body)
        self._pending[rid] = pending
        if self.phase is Phase.JOINED:
            pending.sent_at = now
            return self._send(pending.body, now)
        return []  # it goes out after the welcome

    def leave(self, reason: str | None, now: float) -> list[Action]:
        """Leave the broker; ``Closed`` follows once the broker took it (or soon)."""
        if self.phase is not Phase.JOINED:
            return self._close("left")
        # `leave` has no reply, and a program that exits right after leave()
        # would drop it unsent. The broker answers a ping even after the
        # leave, in order: its pong says the leave was taken.
        body: dict[str, Any] = {"type": "leave"}
        if reason:
            body["reason"] = reason
        ack = self._new_id(_Purpose.LEAVE_ACK)
        self._goto(Phase.LEAVING)
        self._leave_deadline = now + LEAVE_WAIT_SECONDS
        return self._send(body, now) + self._send({"type": "ping", "id": ack}, now)

    def close(self, reason: str = "closed") -> list[Action]:
        """Stop without a ``leave``: the broker will time the client out."""
        return self._close(reason)

    def handshake_succeeded(self) -> None:
        self._handshaken = True
        self._handshake_failures = 0

    def handshake_failed(self, fault: HandshakeFault, now: float) -> list[Action]:
        """The DEALER's handshake failed: at once fatal if a key is surely wrong."""
        # A connection cut short (NO_DETAIL) may be a busy broker shedding
        # connections: only a wrong key makes it happen every time. A
        # mechanism mismatch or a refused key says so at once.
        self._handshake_failures += 1
        if fault is HandshakeFault.NO_DETAIL and not (
                self._encrypted and self._handshake_failures >= HANDSHAKE_TRIES):
            return []
        if not self._encrypted:
            why = "handshake failed: does the broker need --server-key and --key?"
        elif fault is HandshakeFault.AUTH:
            why = "handshake failed: the broker does not accept your key"
        else:
            why = "handshake failed: wrong server key?"
        if self._was_joined:
            return []  # it worked before: a broker restarted with other keys keeps retrying
        # Retrying cannot fix a key: say so now rather than time out.
        return self._close(why, HandshakeFailed(why))

    def disconnected(self, now: float) -> list[Action]:
        """The DEALER's connection closed."""
        if not self._handshaken:
            return []
        # The broker's end closed (it died, or restarted): no need to wait
        # for heartbeats to say so. Rejoin at once.
        self._handshaken = False
        if self.phase is Phase.LEAVING:
            return self._close("left")
        if self.phase is Phase.JOINED:
            return self._lost("broker unreachable, retrying…", now)
        return []

    def reply_received(self, frames: list[bytes], now: float) -> list[Action]:
        """A frame from the broker on the DEALER."""
        self._last_heard = now
        if self.closed or not frames:
            return []
        try:
            body = decode_frame(frames[-1], 0)
        except ProtocolError as exc:
            log.warning("ignoring a bad frame from the broker: %s", exc)
            return []
        rid = body.get("id") if isinstance(body.get("id"), str) else None
        if rid is None and body["type"] in EVENT_TYPES:
            # A private room's event: it comes to its members' DEALERs.
            return self._events_received([body], now)
        purpose = self._purpose.get(rid) if rid is not None else None
        try:
            reply = parse_reply(body)
        except ProtocolError as exc:
            return self._bad_reply(rid, purpose, exc, now)
        if purpose is _Purpose.LEAVE_ACK:
            return self._close("left")
        match reply:
            case Welcome():
                if self.phase in (Phase.JOINING, Phase.WAITING) and (
                        rid is None or rid == self._join_id):
                    return self._welcomed(reply, now)
                return []
            case Direct() | Invited():
                return [Emit(reply)]
            case Bye():
                return self._bye(reply, now)
            case ErrorReply() if purpose is _Purpose.JOIN:
                return self._join_refused(reply, now)
            case ErrorReply() if reply.code == ErrorCode.NOT_JOINED:
                return self._forgotten(now)
            case Pong() if reply.joined is False:
                return self._forgotten(now)
        if purpose is _Purpose.FILL:
            return self._filled(reply, self._about.get(rid or "", ""), now)
        if purpose is _Purpose.SNAPSHOT:
            return self._snapshot(reply, self._about.get(rid or "", ""), now)
        out: list[Action] = []
        if isinstance(reply, Pong) and self.phase is Phase.JOINED:
            out += self._pong_heads(reply, now)
        pending = self._pending.pop(rid, None) if rid is not None else None
        if rid is None or pending is None:
            return out  # a pong, or a late duplicate answer
        if isinstance(reply, ErrorReply):
            return [*out, Reject(rid, RequestFailed.from_reply(reply.code, reply.detail))]
        try:
            value = _RESULTS[pending.kind](reply)
        except ProtocolError as exc:
            return [*out, Reject(rid, RequestFailed(ErrorCode.BAD_REPLY, exc.detail))]
        if isinstance(reply, Members) and reply.next is not None:
            # `who` pages: ask for the next, answer once all are in.
            pending.gathered += value
            pending.body = {**pending.body, "after": reply.next}
            pending.sent_at = now
            self._pending[rid] = pending
            return [*out, *self._send(pending.body, now)]
        if pending.gathered:
            value = [*pending.gathered, *value]
        if isinstance(reply, Entered):
            out += self._took_room(reply, now)
        elif isinstance(reply, Parted):
            out += self._drop_room(room_key(reply.room))
        return [*out, Resolve(rid, value)]

    def broadcast_received(self, frames: list[bytes], now: float) -> list[Action]:
        """A frame from the broker on the SUB: room events, or broker-wide news."""
        self._last_heard = now
        if len(frames) != 2 or self.closed:
            return []
        topic, frame = frames
        try:
            body = decode_frame(frame, 0)
        except ProtocolError:
            return []
        if topic == BROKER_TOPIC:
            if body["type"] == "heartbeat" and self.phase is Phase.JOINED:
                seqs = body.get("seqs")
                if isinstance(seqs, dict):
                    return self._heads(seqs, now)
            elif body["type"] == "shutdown" and self.phase is Phase.JOINED:
                return self._lost("broker shut down, retrying…", now)
            return []
        items = body.get("events") if topic.startswith(b"\x01") else [body]
        if not isinstance(items, list):
            return []
        return self._events_received(items, now)

    def _events_received(self, items: list[Any], now: float) -> list[Action]:
        if not self.joined:
            return []  # resumed after the next welcome, from history
        out: list[Action] = []
        for item in items:
            try:
                event = parse_event(item) if isinstance(item, dict) and "type" in item else None
            except ProtocolError:
                event = None
            if event is not None:
                out += self._accept(event, now)
        return out

    # ------------------------------------------------------------ joining

    def _new_id(self, purpose: _Purpose, room: str | None = None) -> str:
        rid = next(self._ids)
        self._purpose[rid] = purpose
        if room is not None:
            self._about[rid] = room
        return rid

    def _forget(self, rid: str | None) -> None:
        if rid is not None:
            self._purpose.pop(rid, None)
            self._about.pop(rid, None)

    def _next_endpoint(self) -> list[Action]:
        """Move on to the next endpoint (fail-over), round robin.

        Moving to another one also closes the SUB, whose broadcast endpoint
        is the one left behind's (unless the user named the broadcast): left
        open, it retried a dead relay for ever, and libzmq resolves a host
        name in the I/O thread that the new DEALER shares, so a name that
        no longer resolved (a container gone) held up the fail-over.
        """
        index = self.endpoints.index(self.endpoint) if self.endpoint in self.endpoints else -1
        before, self.endpoint = self.endpoint, self.endpoints[(index + 1) % len(self.endpoints)]
        return [CloseSub()] if self.endpoint != before and self._broadcast is None else []

    def _join(self, now: float) -> list[Action]:
        self._goto(Phase.JOINING)
        self._forget(self._join_id)
        self._join_id = self._new_id(_Purpose.JOIN)
        self._handshaken = False
        self._attempt_at = now
        body: dict[str, Any] = {"type": "join", "name": self.name, "id": self._join_id,
                                "rooms": list(self.rooms) if self._was_joined else self._wanted}
        if self._token:
            body["token"] = self._token
        lobby = self.rooms.get(ROOM)
        since = lobby.last_seq if lobby is not None else (
            None if self._was_joined else self._since)
        if since is not None:
            body["since"] = since  # version 1's resume point; rooms resume by their own seq
        return [OpenDealer(self.endpoint), *self._send(body, now)]

    def _wait_to_join(self, now: float) -> None:
        self._goto(Phase.WAITING)
        self._attempt_at = now + self._retry
        self._retry = min(self._retry * 2, RETRY_MAX)

    def _topic(self, room: str) -> bytes:
        # A broker that coalesces events offers them as batches too: fewer
        # frames for it to send, and for us to receive.
        return batch_topic(room) if self._batch else room_topic(room)

    def _welcomed(self, welcome: Welcome, now: float) -> list[Action]:
        self._goto(Phase.JOINED)
        self._forget(self._join_id)
        first = not self._was_joined
        self.welcome = welcome
        self.name = welcome.name
        self._token = welcome.token
        self._heartbeat = welcome.heartbeat
        self._retry = RETRY_MIN
        self._last_heard = now
        self._early_ping = now + EARLY_PING_SECONDS
        self._batch = welcome.batch
        self._primary = welcome.room
        # A version 1 broker says nothing of rooms: it put us in its one room.
        v2 = welcome.count is not None
        names = [room_key(r) for r in welcome.rooms] if v2 else [welcome.room]
        out: list[Action] = []
        primary = self.rooms.get(welcome.room)
        known = primary.last_seq if primary is not None else (
            self._since if welcome.room == ROOM else None)
        restarted = welcome.epoch != self._epoch and self._epoch is not None
        if restarted or (known is not None and welcome.seq < known):
            # The broker lost its history: old seqs mean nothing now.
            out.append(Emit(Status(ClientStatus.HISTORY_LOST,
                                   "the broker restarted without its history", welcome.seq)))
            for room in self.rooms.values():
                if room.last_seq is not None:
                    room.last_seq = 0
            if self._since is not None:
                self._since = 0
        self._epoch = welcome.epoch
        refused = {room_key(r.room): r.code for r in welcome.refused}
        for name in [n for n in self.rooms if n not in names]:
            # Listed in our join and not entered: the broker restarted and the
            # room is private, or we were banned while away.
            code = refused.get(name, "")
            out.append(Emit(Status(ClientStatus.REFUSED, f"cannot enter #{name} again: {code}",
                                   room=name)))
            self._discard_room(name)
        for name in names:
            found = self.rooms.get(name)
            if found is None:
                since = self._since if name == ROOM else None
                found = self.rooms[name] = _Room(name, since)
                # Only the room `welcome` describes comes with its seq; see
                # _apply_snapshot for the others.
                found.look_back = since is None and name != welcome.room
            room = found
            self._forget(room.gap.fill_id)
            self._forget(room.snapshot_id)
            room.gap = _Gap()
            room.head = room.last_seq or 0
            room.snapshot_id, room.replay, room.ousted_at = None, [], None
        self._entered = tuple(self.rooms)
        topics = (*(self._topic(name) for name in self.rooms), BROKER_TOPIC)
        out.append(OpenSub(self._broadcast or resolve_pub(welcome.pub, self.endpoint), topics))
        if v2:
            for name in self.rooms:
                # Free for a member and announcing nothing: the answer tells
                # where the room is and what it is like now.
                rid = self._new_id(_Purpose.SNAPSHOT, name)
                self.rooms[name].snapshot_id = rid
                out += self._send({"type": "enter", "room": name, "id": rid}, now)
        primary = self.rooms.get(welcome.room)  # None: we are in none of them
        if primary is not None:
            primary.members = {fold_name(m.name): m for m in welcome.members}
            primary.count = welcome.count if welcome.count is not None else len(welcome.members)
            if primary.last_seq is None:
                primary.last_seq = welcome.seq
            out += self._known_head(primary, welcome.seq, now)
        self._was_joined = True
        out.append(Emit(Status(ClientStatus.CONNECTED if first else ClientStatus.RECONNECTED,
                               welcome.addr)))
        for pending in self._pending.values():
            pending.sent_at = now
            out += self._send(pending.body, now)
        out.append(Welcomed(welcome))
        return out

    def _join_refused(self, reply: ErrorReply, now: float) -> list[Action]:
        if reply.code == ErrorCode.RATE_LIMITED:
            # Joins are rate-limited per person: a client that reconnects
            # often waits its turn rather than give up.
            if self.phase is Phase.JOINING:
                self._wait_to_join(now)
            return [CloseDealer()]
        error = RequestFailed.from_reply(reply.code, reply.detail)
        if not self._was_joined:
            return self._close(str(error), error)
        # Our name was taken while we were away and our token no longer
        # counts (the broker restarted): nothing to resume.
        return [Emit(Status(ClientStatus.CLOSED, str(error))), *self._close(str(error))]

    def _bad_reply(self, rid: str | None, purpose: _Purpose | None,
                   exc: ProtocolError, now: float) -> list[Action]:
        log.warning("a bad reply from the broker: %s", exc)
        error = RequestFailed(ErrorCode.BAD_REPLY, exc.detail)
        if purpose is _Purpose.JOIN and self.phase in (Phase.JOINING, Phase.WAITING):
            # A broker whose welcome we cannot read will not send a better one.
            if not self._was_joined:
                return self._close(str(error), error)
            return [Emit(Status(ClientStatus.CLOSED, str(error))), *self._close(str(error))]
        if purpose is _Purpose.FILL:
            room = self.rooms.get(self._about.get(rid or "", ""))
            self._forget(rid)
            return self._fill_failed(room, now) if room is not None else []
        if purpose is _Purpose.SNAPSHOT:
            return self._snapshot(None, self._about.get(rid or "", ""), now)
        if rid is not None and self._pending.pop(rid, None) is not None:
            return [Reject(rid, error)]
        return []

    def _bye(self, bye: Bye, now: float) -> list[Action]:
        if bye.reason == ByeReason.SHUTDOWN:
            if self.phase is Phase.JOINED:
                return self._lost("broker shut down, retrying…", now)
            return []
        message = _BYE_TEXT.get(bye.reason, bye.reason) + (f": {bye.detail}" if bye.detail else "")
        return [Emit(Status(ClientStatus.CLOSED, message)), *self._close(bye.reason)]

    def _forgotten(self, now: float) -> list[Action]:
        # The broker does not know us: it restarted and our DEALER reconnected
        # to it by itself. Keep the requests, join again (the same endpoint:
        # it answers), and they go out after the welcome (their ids keep
        # them from doubling).
        if self.phase is not Phase.JOINED:
            return []
        out = self._lost("the broker restarted, rejoining…", now, move_on=False)
        self._attempt_at = now
        return out

    def _lost(self, why: str, now: float, *, move_on: bool = True) -> list[Action]:
        out: list[Action] = [Emit(Status(ClientStatus.DISCONNECTED, why)), CloseDealer()]
        self.welcome = None
        self._early_ping = math.inf
        if move_on:
            out += self._next_endpoint()  # fail-over: the next broker may be there
        self._goto(Phase.WAITING)
        self._attempt_at = now + self._retry
        return out

    def _close(self, reason: str, error: Exception | None = None) -> list[Action]:
        if self.closed:
            return []
        self._goto(Phase.CLOSED)
        self.close_reason = reason
        out: list[Action] = [Reject(rid, ClientClosed(reason)) for rid in self._pending]
        self._pending.clear()
        self._purpose.clear()
        self._about.clear()
        return [*out, CloseDealer(), Closed(reason, error or ClientClosed(reason))]

    def _send(self, body: dict[str, Any], now: float) -> list[Action]:
        self._last_sent = now
        return [Send(body)]

    # ------------------------------------------------------------ rooms

    def _took_room(self, entered: Entered, now: float) -> list[Action]:
        """We are in ``entered.room`` (a user's ``enter``): keep it and hear it."""
        name = room_key(entered.room)
        out: list[Action] = []
        room = self.rooms.get(name)
        if room is None:
            room = self.rooms[name] = _Room(name, None)
            self._entered = tuple(self.rooms)
            out.append(Subscribe(self._topic(name)))
        return out + self._apply_snapshot(room, entered, now)

    def _snapshot(self, reply: BrokerReply | None, name: str, now: float) -> list[Action]:
        room = self.rooms.get(name)
        if room is None or room.snapshot_id is None:
            return []
        self._forget(room.snapshot_id)
        room.snapshot_id = None
        if isinstance(reply, Entered):
            return self._apply_snapshot(room, reply, now)
        if isinstance(reply, ErrorReply) and reply.code in _NOT_IN:
            # Ousted between the welcome and this answer (or the room closed).
            return [Emit(Status(ClientStatus.REFUSED, f"not in #{name}: {reply.code}",
                                room=name)), *self._drop_room(name)]
        # Anything else (a store failure, a bad reply): the state waits for
        # the events; the seqs still come from pongs and heartbeats.
        room.replay, room.ousted_at = [], None
        if room.last_seq is None:
            room.last_seq = room.head
        return self._known_head(room, room.head, now)

    def _apply_snapshot(self, room: _Room, entered: Entered, now: float) -> list[Action]:
        room.topic, room.count = entered.topic, entered.count
        room.members = {fold_name(m.name): m for m in entered.members}
        room.ops = {fold_name(n): n for n in entered.ops}
        room.private, room.moderated = entered.private, entered.moderated
        room.topic_ops = entered.topic_ops
        room.snapshot_seq = entered.seq
        if room.last_seq is None and room.look_back:
            # Entered with the join, but its seq comes only now: the room may
            # have moved on since. Where we came in is our own `joined`: read
            # back to it (events before it are not ours, nor are any up to
            # this seq if none is found: a big room announces no joins).
            room.look_back = False
            room.last_seq = max(0, entered.seq - LOOK_BACK)
            room.quiet_to = entered.seq
        elif room.last_seq is None:
            room.last_seq = entered.seq  # a room new to us: from now on
            for seq in [s for s in room.gap.ahead if s <= entered.seq]:
                del room.gap.ahead[seq]
        # Events delivered while the answer was on its way, newer than it.
        for event in room.replay:
            if event.seq > entered.seq:
                self._change(room, event)
        room.replay = []
        ousted, room.ousted_at = room.ousted_at, None
        if ousted is not None and ousted > entered.seq:
            return self._drop_room(room.name)
        out: list[Action] = []
        ahead = room.gap.ahead
        while room.gap.fill_id is None and room.last_seq + 1 in ahead:
            # What waited for this answer and follows on from it goes out now.
            out += self._deliver(room, ahead.pop(room.last_seq + 1))
            if self.rooms.get(room.name) is not room:
                return out
        return out + self._known_head(room, entered.seq, now)

    def _drop_room(self, name: str) -> list[Action]:
        if name not in self.rooms:
            return []
        self._discard_room(name)
        return [Unsubscribe(self._topic(name))]

    def _discard_room(self, name: str) -> None:
        room = self.rooms.pop(name)
        self._entered = tuple(self.rooms)
        self._forget(room.gap.fill_id)
        self._forget(room.snapshot_id)

    def _change(self, room: _Room, event: Event) -> None:
        """What ``event`` changes in what we know of ``room``."""
        match event:
            case Joined(name=name, addr=addr):
                self._came(room, Member(name, addr))
            case Joins(members=members):
                for member in members:
                    self._came(room, member)
            case Left(name=name):
                key = fold_name(name)
                room.members.pop(key, None)
                room.ops.pop(key, None)  # operator status ends with the stay
                room.count = max(0, room.count - 1)
            case TopicChanged(text=text):
                room.topic = text
            case ModeChanged():
                for flag in ("private", "moderated", "topic_ops"):
                    value = getattr(event, flag)
                    if value is not None:
                        setattr(room, flag, value)
                if event.op is not None:
                    room.ops[fold_name(event.op)] = event.op
                if event.deop is not None:
                    room.ops.pop(fold_name(event.deop), None)

    @staticmethod
    def _came(room: _Room, member: Member) -> None:
        """``member`` joined ``room`` (a ``joined``, or one of a ``joins``)."""
        key = fold_name(member.name)
        if key not in room.members:
            room.count += 1
        room.members[key] = member

    # ------------------------------------------------------------ room events

    def _accept(self, event: Event, now: float) -> list[Action]:
        room = self.rooms.get(room_key(event.room))
        if room is None:
            return []  # a room we are not in (any more)
        if room.last_seq is None:
            room.gap.ahead[event.seq] = event  # kept until `entered` says where we start
            room.head = max(room.head, event.seq)
            return []
        if event.seq <= room.last_seq:
            return []
        if event.seq == room.last_seq + 1 and not room.gap.ahead:
            room.head = max(room.head, event.seq)
            return self._deliver(room, event)
        room.gap.ahead[event.seq] = event
        return self._known_head(room, event.seq, now)

    def _pong_heads(self, pong: Pong, now: float) -> list[Action]:
        if pong.seqs is not None:
            return self._heads(pong.seqs, now)
        room = self.rooms.get(self._primary)
        if pong.seq is not None and room is not None:
            return self._known_head(room, pong.seq, now)  # a version 1 broker
        return []

    def _heads(self, seqs: dict[Any, Any], now: float) -> list[Action]:
        out: list[Action] = []
        for name, seq in seqs.items():
            room = self.rooms.get(name) if isinstance(name, str) else None
            if room is not None and type(seq) is int:
                out += self._known_head(room, seq, now)
        return out

    def _known_head(self, room: _Room, seq: int, now: float) -> list[Action]:
        """``room`` has events up to ``seq``: fetch what we lack."""
        room.head = max(room.head, seq)
        if room.last_seq is not None and room.head > room.last_seq:
            return self._fill(room, now)
        return []

    def _fill(self, room: _Room, now: float) -> list[Action]:
        gap = room.gap
        if gap.fill_id is not None or gap.retry_at < math.inf or not self.joined:
            return []
        if room.last_seq is None or (room.head <= room.last_seq and not gap.ahead):
            return []
        gap.fill_id = self._new_id(_Purpose.FILL, room.name)
        return self._send({"type": "history", "room": room.name, "after": room.last_seq,
                           "limit": HISTORY_PAGE_MAX, "id": gap.fill_id}, now)

    def _fill_failed(self, room: _Room, now: float) -> list[Action]:
        # Re-armed, not dropped: the gap is still there. Not at once: the
        # broker may be refusing queries (rate_limited) or its store may be
        # failing (unavailable).
        self._forget(room.gap.fill_id)
        room.gap.fill_id = None
        room.gap.retry_at = now + FILL_RETRY_SECONDS
        return []

    def _filled(self, reply: BrokerReply, name: str, now: float) -> list[Action]:
        room = self.rooms.get(name)
        if room is None or room.last_seq is None:
            return []  # parted or ousted meanwhile
        if not isinstance(reply, HistoryPage):
            return self._fill_failed(room, now)
        gap = room.gap
        self._forget(gap.fill_id)
        gap.fill_id = None
        before = room.last_seq
        out: list[Action] = []
        for event in reply.events:
            if self.rooms.get(name) is not room:
                return out  # a kick of ourselves among them took the room away
            if event.seq > room.last_seq and room_key(event.room) == name:
                out += self._deliver(room, event)
        progressed = room.last_seq > before
        if not progressed:
            # Nothing past what we have: what is not there is gone for good,
            # so what waits beyond the hole goes out now.
            room.head = room.last_seq
        ahead = gap.ahead
        while ahead and self.rooms.get(name) is room:
            first = min(ahead)
            if first <= room.last_seq:
                del ahead[first]
            elif first == room.last_seq + 1 or not progressed:
                out += self._deliver(room, ahead.pop(first))
            else:
                break
        if self.rooms.get(name) is not room:
            return out
        room.head = max(room.head, room.last_seq)
        if progressed and (ahead or room.last_seq < room.head):
            # A page may be short (the broker caps its bytes): page on until
            # we reach the head.
            out += self._fill(room, now)
        return out

    def _names_us(self, event: Event) -> bool:
        """Whether ``event`` announces our own join (a big room's may be a ``joins``)."""
        me = fold_name(self.name)
        if isinstance(event, Joined):
            return fold_name(event.name) == me
        if isinstance(event, Joins):
            return any(fold_name(member.name) == me for member in event.members)
        return False

    def _deliver(self, room: _Room, event: Event) -> list[Action]:
        if room.quiet_to is not None:
            if event.seq <= room.quiet_to:
                room.last_seq = event.seq  # from before we came in: passed over
                if self._names_us(event):
                    room.quiet_to = None  # ours: what follows is for us
                return []
            room.quiet_to = None
        out: list[Action] = []
        last = room.last_seq or 0
        # Only history fills deliver past a hole: what it lacks is gone for good.
        missed = event.seq - last - 1
        if missed > 0:
            out.append(Emit(Status(ClientStatus.MISSED,
                                   f"{missed} events of #{room.name} are no longer kept",
                                   missed, room.name)))
        room.last_seq = event.seq
        if event.seq > room.snapshot_seq:
            self._change(room, event)  # (the snapshot has the rest already)
        if room.snapshot_id is not None and len(room.replay) < REPLAY_KEPT:
            room.replay.append(event)
        out.append(Emit(event))
        if (isinstance(event, Left) and event.reason in _OUSTED
                and fold_name(event.name) == fold_name(self.name)):
            if room.snapshot_id is not None:
                room.ousted_at = event.seq  # before or after our return: its answer says
            elif event.seq > room.snapshot_seq:
                out += self._drop_room(room.name)
        return out
