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

    actions: OpenDealer, CloseDealer, Send(body), OpenSub(endpoint, topics),
             Emit(item), Resolve(rid, value), Reject(rid, error),
             Welcomed(welcome), Closed(reason, error)

What it does, so that a bot is a few lines:

- joins (and rejoins with ``token`` and ``since``), retrying with backoff
  when the broker does not answer or says ``rate_limited``;
- delivers room events exactly once and in ``seq`` order, filling every gap
  from ``history`` page by page until it reaches the head seq it knows of (a
  page may be short: the broker caps a page's bytes); a failed fill is asked
  again a moment later;
- sees an epoch change (the broker lost its history) and events that fell out
  of the history (``missed``);
- keeps every request until answered and sends it again after a rejoin (the
  same ``id``: the broker's dedupe makes a message land once);
- pings when idle, and takes the broker as gone after ``MISSED_HEARTBEATS``
  silent intervals, or at once when the connection drops.

Its phase is one ``Phase``; ``_TRANSITIONS`` says which phase may follow
which. Replies are routed by request id alone: the session's own requests
(the join, the history fill, the leave's closing ping) get ids from the same
counter as the user's, and ``_purpose`` says what each is for.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum, StrEnum, auto
from typing import Any, TypeAlias

from zchat.errors import ClientClosed, HandshakeFailed, ProtocolError, RequestFailed
from zchat.protocol import (
    BATCH_TOPIC,
    BROKER_TOPIC,
    DEFAULT_HEARTBEAT,
    HISTORY_PAGE_MAX,
    MISSED_HEARTBEATS,
    ROOM,
    ROOM_TOPIC,
    Ack,
    BrokerReply,
    Bye,
    ByeReason,
    ClientStatus,
    Direct,
    ErrorCode,
    ErrorReply,
    Event,
    HistoryPage,
    Joined,
    Left,
    Member,
    Members,
    Pong,
    Welcome,
    decode_frame,
    fold_name,
    parse_event,
    parse_reply,
)

__all__ = [
    "EARLY_PING_SECONDS",
    "FILL_RETRY_SECONDS",
    "HANDSHAKE_TRIES",
    "JOIN_ATTEMPT_SECONDS",
    "LEAVE_WAIT_SECONDS",
    "RETRY_MAX",
    "RETRY_MIN",
    "Action",
    "CloseDealer",
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
    "Send",
    "Session",
    "Status",
    "Welcomed",
    "resolve_pub",
]

log = logging.getLogger("zchat.client")

JOIN_ATTEMPT_SECONDS = 2.0  # a join unanswered this long is tried again
RETRY_MIN, RETRY_MAX = 0.25, 5.0  # backoff between join attempts
EARLY_PING_SECONDS = 0.3  # after a welcome: time enough for the SUB to connect
LEAVE_WAIT_SECONDS = 2.0  # at most, for the broker to confirm a leave
FILL_RETRY_SECONDS = 0.5  # after a history fill failed (rate_limited, unavailable)
HANDSHAKE_TRIES = 5  # handshakes cut short in a row before a CURVE key is blamed


@dataclass(frozen=True, slots=True)
class Status:
    """A change in the connection, delivered among the events.

    ``state`` is a ``ClientStatus``: ``connected`` (first welcome),
    ``disconnected`` (the broker stopped answering or shut down; retrying),
    ``reconnected``, ``history_lost`` (the broker restarted without its
    history: events from before may be missing; ``count`` is the room's seq
    when we rejoined, so the events up to it that follow are the new history,
    said while we were away or long before), ``missed`` (``count`` events fell
    out of the broker's history before they could be fetched), ``closed``
    (kicked, replaced by another connection with our token, or ``close()``).
    """

    state: ClientStatus
    detail: str = ""
    count: int = 0


Item: TypeAlias = Event | Direct | Status


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
    """A user's request, and so how its reply is read."""

    MESSAGE = "message"  # -> the seq the broker gave it
    DM = "dm"  # -> None
    WHO = "who"  # -> list[Member]
    HISTORY = "history"  # -> list[Event]
    PING = "ping"  # -> the broker's clock


class _Purpose(Enum):
    """What the session's own requests are for."""

    JOIN = auto()
    FILL = auto()
    LEAVE_ACK = auto()  # answered after the broker took our `leave`


# Actions, for the shell to carry out in order.


@dataclass(frozen=True, slots=True)
class OpenDealer:
    """Close the DEALER (and its monitor) if any; open and connect a new one."""


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
    OpenDealer | CloseDealer | Send | OpenSub | Emit | Resolve | Reject | Welcomed | Closed
)


@dataclass(slots=True)
class _Pending:
    kind: RequestKind
    body: dict[str, Any]
    sent_at: float = -math.inf


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


# How a user's request reads its reply.
_RESULTS: dict[RequestKind, Callable[[BrokerReply], Any]] = {
    RequestKind.MESSAGE: _ack_seq,
    RequestKind.DM: _ack,
    RequestKind.WHO: _members,
    RequestKind.HISTORY: _events,
    RequestKind.PING: _pong_ts,
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


@dataclass(slots=True)
class _Gap:
    """Room events received ahead of a hole in seq, while history fills it."""

    ahead: dict[int, Event] = field(default_factory=dict)
    fill_id: str | None = None  # the history request out, if any
    retry_at: float = math.inf  # when to ask again after a failed fill


class Session:
    """One client's protocol state: a join, a room, the requests in flight.

    Args:
        name: the name to join with.
        endpoint: the broker's input endpoint (for a ``pub`` given as a port).
        broadcast: the broadcast endpoint, if known (else from ``welcome``).
        token: a token from an earlier ``welcome``, to take the name over.
        since: the last seq already seen (events after it are delivered).
        encrypted: the sockets use CURVE keys (a handshake failure then
            blames a key; without keys, a broker that encrypts).
        id_prefix: makes this session's request ids its own.
    """

    def __init__(self, name: str, endpoint: str, *, broadcast: str | None = None,
                 token: str | None = None, since: int | None = None,
                 encrypted: bool = False, id_prefix: str = "") -> None:
        self.name = name
        self.endpoint = endpoint
        self.welcome: Welcome | None = None  # the current join's, while joined
        self.members: dict[str, Member] = {}  # by fold_name
        self.last_seq = since or 0  # the last room event delivered
        self.phase = Phase.IDLE
        self.close_reason = ""
        self._broadcast = broadcast
        self._token = token
        self._has_seq = since is not None
        self._encrypted = encrypted
        self._ids = (f"{id_prefix}{n}" for n in itertools.count(1))
        self._purpose: dict[str, _Purpose] = {}
        self._join_id = ""
        self._pending: dict[str, _Pending] = {}
        self._gap = _Gap()
        self._head = self.last_seq  # the highest seq we know the room has
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
                              self._early_ping, self._gap.retry_at)
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
        """The timers: join attempts, pings, silence, resends, leave."""
        out: list[Action] = []
        match self.phase:
            case Phase.LEAVING:
                if now >= self._leave_deadline:
                    out += self._close("left")  # the broker will time us out instead
            case Phase.JOINING:
                if now - self._attempt_at >= JOIN_ATTEMPT_SECONDS:
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
                if now >= self._gap.retry_at:
                    self._gap.retry_at = math.inf
                    out += self._fill(now)
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
        pending = _Pending(kind, {**body, "type": kind.value, "id": rid})
        self._pending[rid] = pending
        if self.phase is Phase.JOINED:
            pending.sent_at = now
            return self._send(pending.body, now)
        return []  # it goes out after the welcome

    def leave(self, reason: str | None, now: float) -> list[Action]:
        """Leave the room; ``Closed`` follows once the broker took it (or soon)."""
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
            case Direct():
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
            return self._filled(reply, now)
        out: list[Action] = []
        if isinstance(reply, Pong) and reply.seq is not None and self.phase is Phase.JOINED:
            out += self._known_head(reply.seq, now)
        pending = self._pending.pop(rid, None) if rid is not None else None
        if rid is None or pending is None:
            return out  # a pong, or a late duplicate answer
        if isinstance(reply, ErrorReply):
            return [*out, Reject(rid, RequestFailed.from_reply(reply.code, reply.detail))]
        try:
            value = _RESULTS[pending.kind](reply)
        except ProtocolError as exc:
            return [*out, Reject(rid, RequestFailed(ErrorCode.BAD_REPLY, exc.detail))]
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
                room = self.welcome.room if self.welcome is not None else ROOM
                head = seqs.get(room) if isinstance(seqs, dict) else None
                if type(head) is int:
                    return self._known_head(head, now)
            elif body["type"] == "shutdown" and self.phase is Phase.JOINED:
                return self._lost("broker shut down, retrying…", now)
            return []
        if not self.joined:
            return []  # resumed after the next welcome, from history
        items = body.get("events") if topic == BATCH_TOPIC else [body]
        if not isinstance(items, list):
            return []
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

    def _new_id(self, purpose: _Purpose) -> str:
        rid = next(self._ids)
        self._purpose[rid] = purpose
        return rid

    def _forget(self, rid: str | None) -> None:
        if rid is not None:
            self._purpose.pop(rid, None)

    def _join(self, now: float) -> list[Action]:
        self._goto(Phase.JOINING)
        self._forget(self._join_id)
        self._join_id = self._new_id(_Purpose.JOIN)
        self._handshaken = False
        self._attempt_at = now
        body: dict[str, Any] = {"type": "join", "name": self.name, "id": self._join_id}
        if self._token:
            body["token"] = self._token
        if self._has_seq:
            body["since"] = self.last_seq
        return [OpenDealer(), *self._send(body, now)]

    def _wait_to_join(self, now: float) -> None:
        self._goto(Phase.WAITING)
        self._attempt_at = now + self._retry
        self._retry = min(self._retry * 2, RETRY_MAX)

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
        self.members = {fold_name(m.name): m for m in welcome.members}
        # A broker that coalesces events offers them as batches too: fewer
        # frames for it to send, and for us to receive.
        topics = (BATCH_TOPIC if welcome.batch else ROOM_TOPIC, BROKER_TOPIC)
        out: list[Action] = [
            OpenSub(self._broadcast or resolve_pub(welcome.pub, self.endpoint), topics)]
        restarted = welcome.epoch != self._epoch and self._epoch is not None
        if restarted or (self._has_seq and welcome.seq < self.last_seq):
            # The broker lost its history: old seqs mean nothing now.
            out.append(Emit(Status(ClientStatus.HISTORY_LOST,
                                   "the broker restarted without its history", welcome.seq)))
            self.last_seq = 0
        elif not self._has_seq:
            self.last_seq = welcome.seq
        self._has_seq = True
        self._epoch = welcome.epoch
        self._forget(self._gap.fill_id)
        self._gap = _Gap()
        self._head = self.last_seq
        out += self._known_head(welcome.seq, now)
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
            return self._fill_failed(now)
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
        # to it by itself. Keep the requests, join again, and they go out
        # after the welcome (their ids keep them from doubling).
        if self.phase is not Phase.JOINED:
            return []
        out = self._lost("the broker restarted, rejoining…", now)
        self._attempt_at = now
        return out

    def _lost(self, why: str, now: float) -> list[Action]:
        out: list[Action] = [Emit(Status(ClientStatus.DISCONNECTED, why)), CloseDealer()]
        self.welcome = None
        self._early_ping = math.inf
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
        return [*out, CloseDealer(), Closed(reason, error or ClientClosed(reason))]

    def _send(self, body: dict[str, Any], now: float) -> list[Action]:
        self._last_sent = now
        return [Send(body)]

    # ------------------------------------------------------------ room events

    def _accept(self, event: Event, now: float) -> list[Action]:
        if event.seq <= self.last_seq:
            return []
        if event.seq == self.last_seq + 1 and not self._gap.ahead:
            self._head = max(self._head, event.seq)
            return self._deliver(event)
        self._gap.ahead[event.seq] = event
        return self._known_head(event.seq, now)

    def _known_head(self, seq: int, now: float) -> list[Action]:
        """The room has events up to ``seq``: fetch what we lack."""
        self._head = max(self._head, seq)
        if self._head > self.last_seq:
            return self._fill(now)
        return []

    def _fill(self, now: float) -> list[Action]:
        gap = self._gap
        if gap.fill_id is not None or gap.retry_at < math.inf or not self.joined:
            return []
        if self._head <= self.last_seq and not gap.ahead:
            return []
        gap.fill_id = self._new_id(_Purpose.FILL)
        return self._send({"type": "history", "after": self.last_seq,
                           "limit": HISTORY_PAGE_MAX, "id": gap.fill_id}, now)

    def _fill_failed(self, now: float) -> list[Action]:
        # Re-armed, not dropped: the gap is still there. Not at once: the
        # broker may be refusing queries (rate_limited) or its store may be
        # failing (unavailable).
        self._forget(self._gap.fill_id)
        self._gap.fill_id = None
        self._gap.retry_at = now + FILL_RETRY_SECONDS
        return []

    def _filled(self, reply: BrokerReply, now: float) -> list[Action]:
        if not isinstance(reply, HistoryPage):
            return self._fill_failed(now)
        gap = self._gap
        self._forget(gap.fill_id)
        gap.fill_id = None
        before = self.last_seq
        out: list[Action] = []
        for event in reply.events:
            if event.seq > self.last_seq:
                out += self._deliver(event)
        progressed = self.last_seq > before
        if not progressed:
            # Nothing past what we have: what is not there is gone for good,
            # so what waits beyond the hole goes out now.
            self._head = self.last_seq
        ahead = gap.ahead
        while ahead:
            first = min(ahead)
            if first <= self.last_seq:
                del ahead[first]
            elif first == self.last_seq + 1 or not progressed:
                out += self._deliver(ahead.pop(first))
            else:
                break
        self._head = max(self._head, self.last_seq)
        if progressed and (ahead or self.last_seq < self._head):
            # A page may be short (the broker caps its bytes): page on until
            # we reach the head.
            out += self._fill(now)
        return out

    def _deliver(self, event: Event) -> list[Action]:
        out: list[Action] = []
        # Only history fills deliver past a hole: what it lacks is gone for good.
        missed = event.seq - self.last_seq - 1
        if missed > 0:
            out.append(Emit(Status(ClientStatus.MISSED,
                                   f"{missed} events are no longer kept", missed)))
        self.last_seq = event.seq
        if isinstance(event, Joined):
            self.members[fold_name(event.name)] = Member(event.name, event.addr)
        elif isinstance(event, Left):
            self.members.pop(fold_name(event.name), None)
        out.append(Emit(event))
        return out
