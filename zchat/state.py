"""The broker's logic as a pure object: requests in, frames to send out.

``Broker.handle(peer, request, now, addr, key)`` takes one decoded request
from one peer (its ZeroMQ routing id, with the address and CURVE key of the
connection behind it) and returns the list of ``Outgoing`` frames it causes:
``Reply`` to one peer's DEALER, ``Publish`` to every SUB of a topic,
``Deliver`` (a private room's event) to its members' DEALERs. It never touches a
socket and never reads the clock: ``now`` (wall-clock seconds, the ``ts`` of
events) is a parameter, so tests of heartbeats, expiry and rate limits run
without sleeping. ``tick(now)`` does the timed work (heartbeats, dropping
silent clients) and ``next_deadline()`` tells the loop how long it may sleep.

Who is who, and what an attacker cannot borrow:

- A member's session is bound to the connection it joined on (routing id,
  and under CURVE the key). When the shell reports the connection gone
  (``disconnected``), the member stays in the room until it times out, but
  nothing arriving under that routing id speaks for it any more: only a
  ``join`` with its token takes the session back. Under CURVE a request
  must also come with the key the member joined with.
- Rate limits follow the person, not the session: token buckets keyed by
  the folded name and by the address (or, under CURVE, the key), kept in a
  bounded LRU, so leave/join, reconnects and takeovers start no fresh
  bucket. Messages and dms, ``history`` and ``who``, and joins draw from
  three separate budgets; an address gets ``Limits.per_address`` times a
  person's budget, since a NAT can hide several honest people.
- Dedupe follows the sender's lineage, which only the sender can continue:
  under CURVE its key and name, otherwise its token (kept across takeovers
  and resumes, so a resend after a reconnect or a broker restart is still
  recognised). Whoever held a name before cannot poison the next holder's
  ids. Message ids and dm ids are separate, and all ids together are
  bounded (``Limits.dedupe_total``, least recently used forgotten first).
- Under CURVE a name belongs to the key that took it, a key holds at most
  ``Limits.names_per_key`` names (a new one recycles its least recently
  used free one), a binding unused for ``Limits.name_ttl`` lapses, and
  ``release(name)`` lets the operator free one. Bindings live in memory.

Rooms (protocol version 2, ``PROTOCOL.md``): each room has its own seq,
history, PUB topic, topic, members, operators, modes, bans and invitations.
A member holds its rooms and a room its members, so nothing a request does
costs time in proportion to the number of rooms (only ``rooms`` lists them
all). A private room's events never reach PUB: they are ``Deliver`` items
to its members alone, and every request about it from a non-member gets the
same ``not_in_room`` as a room it is not in.

Defines: ``Limits``, ``Reply``, ``Publish``, ``Deliver``, ``Outgoing``,
``Broker``, ``Statistics``, ``TokenBucket``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Final, NamedTuple, TypeAlias

import msgpack

from zchat.errors import HistoryError, ProtocolError
from zchat.history import History, MemoryHistory
from zchat.protocol import (
    BROKER_TOPIC,
    HISTORY_PAGE,
    HISTORY_PAGE_MAX,
    MAX_ID_CHARS,
    MAX_ROOM_CHARS,
    MEMBERS_SHOWN,
    MISSED_HEARTBEATS,
    ROOM,
    WHO_PAGE,
    WHO_PAGE_MAX,
    Ban,
    ByeReason,
    Deop,
    Enter,
    ErrorCode,
    GetHistory,
    Invite,
    Join,
    KickFrom,
    Leave,
    LeaveReason,
    ListRooms,
    Op,
    Part,
    Ping,
    Request,
    Say,
    SendDm,
    SetMode,
    SetTopic,
    Unban,
    Who,
    check_name,
    check_room,
    fold_name,
    named_room,
    room_topic,
    with_id,
)

__all__ = ["Broker", "Deliver", "Limits", "Outgoing", "Publish", "Reply", "Statistics",
           "TokenBucket"]

BUCKETS_KEPT: Final = 100_000  # rate buckets remembered (LRU); an idle full one is no loss


@dataclass(frozen=True, slots=True)
class Limits:
    """What one client may do; 0 turns a limit off."""

    max_text: int = 4096  # characters of `text`
    max_frame: int = 64 * 1024  # bytes of one frame
    rate: float = 10.0  # messages and dms per second, sustained, per person
    burst: int = 20  # messages in a burst
    query_rate: float = 5.0  # `history` and `who` requests per second, per person
    query_burst: int = 20
    join_rate: float = 0.5  # joins per second per person (5 per 10 s)
    join_burst: int = 5
    per_address: int = 50  # an address gets this many persons' worth of each rate (NAT)
    page_bytes: int = 256 * 1024  # packed events in one `history` reply (at least one)
    history: int = 10_000  # room events kept in memory
    dedupe: int = 1000  # request ids remembered per sender
    dedupe_total: int = 100_000  # request ids remembered across all senders
    names_per_key: int = 3  # CURVE: names one key may hold
    name_ttl: float = 30 * 86_400.0  # CURVE: seconds an unused name stays bound to its key
    rooms_per_client: int = 50  # rooms one client is in at once, lobby included
    rooms_total: int = 10_000  # rooms in all (a room outlives its members)
    room_chars: int = MAX_ROOM_CHARS  # characters of a room name (the protocol's most: 64)
    announce_max: int = 1000  # a room this full announces no joins and parts (0: always)
    coalesce_above: int = 100  # a room this full coalesces one pass's joins (0: any room)
    invites_kept: int = 1000  # pending invitations per private room (oldest forgotten)


class Origin(NamedTuple):
    """Where a request came from: the peer's address and CURVE key, if any."""

    addr: str
    key: str | None


# The three kinds of ``Outgoing`` are named tuples, not frozen dataclasses:
# one of each is made per message on the hot path, and a tuple is made in a
# fraction of the time a frozen dataclass's ``__init__`` takes.


class Reply(NamedTuple):
    """Send ``body`` to one peer (by routing id)."""

    peer: bytes
    body: dict[str, Any]


class Publish(NamedTuple):
    """Send ``body`` to every subscriber of ``topic``."""

    topic: bytes
    body: dict[str, Any]
    # A message's sender address (as clients see it), for the operator's
    # screen: the event carries it, so nothing is looked up at print time,
    # when the sender may be gone. Never sent.
    sender_addr: str | None = None
    # ``body`` packed once, as the store keeps it: the shell publishes these
    # bytes instead of packing the event again (None: the shell packs).
    packed: bytes | None = None


class Deliver(NamedTuple):
    """A private room's event, sent to each of ``peers`` on its DEALER (never PUB)."""

    peers: tuple[bytes, ...]
    body: dict[str, Any]
    sender_addr: str | None = None  # as in ``Publish``: for the screen, never sent
    packed: bytes | None = None  # as in ``Publish``


Outgoing: TypeAlias = Reply | Publish | Deliver
# Per message on the hot path: ``tuple.__new__`` makes a named tuple in half
# the time of its class's ``__new__`` (a Python-level function).
_new = tuple.__new__


@dataclass(frozen=True, slots=True)
class Statistics:
    """A snapshot of the broker's counters."""

    members: int
    seq: int
    epoch: str
    history: int
    messages: int
    dms: int
    joins: int
    timeouts: int
    errors: int
    rate_limited: int
    uptime: float
    dedupe_ids: int = 0
    buckets: int = 0
    rooms: int = 0


class TokenBucket:
    """``burst`` tokens, refilled at ``rate`` per second; 0 rate: unlimited."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(max(burst, 1))
        self.tokens = self.burst
        self.stamp = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one."""
        if self.rate <= 0:
            return True
        if self.refill(now) >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def refill(self, now: float) -> float:
        """Add what ``now`` earned; return the tokens there are."""
        elapsed = now - self.stamp
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.stamp = now
        return self.tokens


class _Budgets:
    """Token buckets by (kind, identity), least recently used first, at most ``size``.

    A bucket idle long enough to be full again is the same as a new one:
    each ``take`` drops such buckets from the old end (expiry costs nothing
    and loses nothing), and past ``size`` the least recently used goes.
    """

    def __init__(self, size: int = BUCKETS_KEPT) -> None:
        self.size = size
        self._buckets: OrderedDict[tuple[str, str], TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, wants: list[tuple[tuple[str, str], float, int]], now: float) -> bool:
        """One token from each bucket in ``wants`` (key, rate, burst), or none at all."""
        self._expire(now)
        buckets = []
        for key, rate, burst in wants:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = TokenBucket(rate, burst, now)
                if len(self._buckets) > self.size:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(key)
            buckets.append(bucket)
        if any(bucket.refill(now) < 1.0 for bucket in buckets):
            return False
        for bucket in buckets:
            bucket.tokens -= 1.0
        return True

    def _expire(self, now: float, most: int = 2) -> None:
        for _ in range(most):
            oldest = next(iter(self._buckets.values()), None)
            if oldest is None or oldest.refill(now) < oldest.burst:
                return
            self._buckets.popitem(last=False)

    def forget(self, identity: str) -> None:
        for key in [key for key in self._buckets if key[1] == identity]:
            del self._buckets[key]


class _Dedupe:
    """Request ids already handled, by sender lineage, bounded per sender and in all.

    An id maps to the room and seq its message got (``("", 0)`` for a dm). Senders are kept in
    order of last use; past ``total`` ids, the least recently used sender
    loses its oldest id first.
    """

    def __init__(self, per_sender: int, total: int) -> None:
        self.per_sender = per_sender
        self.total = total
        self._ids: OrderedDict[str, OrderedDict[str, tuple[str, int]]] = OrderedDict()
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def knows(self, sender: str) -> bool:
        return sender in self._ids

    def get(self, sender: str, rid: str) -> tuple[str, int] | None:
        ids = self._ids.get(sender)
        return None if ids is None else ids.get(rid)

    def put(self, sender: str, rid: str, seq: tuple[str, int]) -> None:
        if not self.per_sender:
            return
        ids = self._ids.get(sender)
        if ids is None:
            ids = self._ids[sender] = OrderedDict()
        else:
            self._ids.move_to_end(sender)
        if rid not in ids:
            self._count += 1
        ids[rid] = seq
        if len(ids) > self.per_sender:
            ids.popitem(last=False)
            self._count -= 1
        while self.total and self._count > self.total:
            oldest_sender, oldest = next(iter(self._ids.items()))
            oldest.popitem(last=False)
            self._count -= 1
            if not oldest:
                del self._ids[oldest_sender]


@dataclass(slots=True)
class _Binding:
    """Under CURVE: the key a name belongs to, and when it was last used."""

    key: str
    used: float


@dataclass(slots=True, eq=False)
class _Member:
    peer: bytes | None  # None: its connection is gone, only its token brings it back
    name: str
    folded: str
    addr: str  # as the operator sees it
    shown: str  # as other clients see it (cloaked if configured)
    key: str | None  # the CURVE key it joined with
    token: str
    lineage: str  # whose request ids these are (see the module docstring)
    last_seen: float
    rooms: dict[str, _Room] = field(default_factory=dict)  # by name, in order of entry

    @property
    def public(self) -> dict[str, str]:
        return {"name": self.name, "addr": self.shown}




@dataclass(slots=True, eq=False)
class _Room:
    """One room: its seq, settings and who is in it."""

    name: str
    seq: int
    topic: str = ""
    private: bool = False
    moderated: bool = False
    topic_ops: bool = True
    members: dict[str, _Member] = field(default_factory=dict)  # folded name -> member
    ops: set[str] = field(default_factory=set)  # folded names of members who are operators
    op_keys: set[str] = field(default_factory=set)  # CURVE keys that are operators (kept)
    bans: dict[str, str] = field(default_factory=dict)  # folded name -> name as banned
    invites: dict[str, None] = field(default_factory=dict)  # folded names, oldest first
    pub_topic: bytes = b""
    # The first members as `welcome` and `entered` list them, built once and
    # shared until one of them may have changed: a join storm then costs no
    # 100 dicts per welcome.
    shown: list[dict[str, str]] | None = None

    def settings(self) -> dict[str, Any]:
        """What the store keeps of the room (members, ops by name, invites are not)."""
        return {"topic": self.topic, "private": self.private, "moderated": self.moderated,
                "topic_ops": self.topic_ops, "bans": dict(self.bans),
                "op_keys": sorted(self.op_keys)}

    def restore(self, settings: dict[str, Any]) -> None:
        self.topic = str(settings.get("topic", ""))
        self.private = settings.get("private") is True
        self.moderated = settings.get("moderated") is True
        self.topic_ops = settings.get("topic_ops") is not False
        bans = settings.get("bans")
        self.bans = {str(k): str(v) for k, v in bans.items()} if isinstance(bans, dict) else {}
        keys = settings.get("op_keys")
        self.op_keys = {str(k) for k in keys} if isinstance(keys, list) else set()


# The `left` reasons a very full room does not announce (see Limits.announce_max):
# comings and goings. An operator's kick or ban is always announced.
_QUIET_REASONS: Final = frozenset(
    {LeaveReason.LEAVE, LeaveReason.TIMEOUT, LeaveReason.PART, LeaveReason.REPLACED,
     LeaveReason.SHUTDOWN})
# Refusals by the room itself: with no `room` in the request, they name lobby.
_ROOM_REFUSALS: Final = frozenset({ErrorCode.NOT_IN_ROOM, ErrorCode.FORBIDDEN})
# Who a `mode` or `notice` says made the change when it is the broker's operator.
BROKER_OPERATOR: Final = "*"


class Broker:
    """The state of one zchat broker: members, rooms, their histories.

    Args:
        heartbeat: seconds between heartbeats; clients silent for
            ``3 * heartbeat`` are dropped.
        limits: per-client limits.
        pub: the broadcast endpoint that ``welcome`` tells clients.
        batch: tell clients (in ``welcome``) that room events are also
            published coalesced on each room's batch topic.
        cloak: maps a peer address to what other clients see.
        now: the clock at start.
    """

    def __init__(
        self,
        *,
        heartbeat: float = 5.0,
        limits: Limits | None = None,
        pub: str = "5556",
        cloak: Callable[[str], str] | None = None,
        now: float = 0.0,
        epoch: str | None = None,
        batch: bool = False,
        history: History | None = None,
        coalesce_joins: bool = False,
    ) -> None:
        self.heartbeat = heartbeat
        self.limits = limits or Limits()
        self.pub = pub
        self.batch = batch
        self._cloak = cloak or (lambda addr: addr)
        self._started = now
        self._by_peer: dict[bytes, _Member] = {}  # members whose connection lives
        self._by_name: dict[str, _Member] = {}  # every member, by folded name
        # Members in order of last activity, oldest first: expiry pops the front.
        self._activity: OrderedDict[str, _Member] = OrderedDict()
        # Under CURVE: folded name -> its key; key -> its names, least recently used first.
        self._owners: dict[str, _Binding] = {}
        self._names_of: dict[str, OrderedDict[str, None]] = {}
        self._budgets = _Budgets()
        limits = self.limits
        self._rates: dict[str, tuple[float, int, str]] = {
            _MESSAGE: (limits.rate, limits.burst, "messages"),
            _QUERY: (limits.query_rate, limits.query_burst, "queries, enters or parts"),
            _JOIN: (limits.join_rate, limits.join_burst, "joins"),
        }
        self._dedupe = _Dedupe(self.limits.dedupe, self.limits.dedupe_total)
        self._packer = msgpack.Packer(use_bin_type=True)
        # 0 is "no limit" like every limit, but no name is longer than the protocol's 64.
        self._room_chars = min(limits.room_chars or MAX_ROOM_CHARS, MAX_ROOM_CHARS)
        self._history = history if history is not None else MemoryHistory(self.limits.history)
        if epoch is not None:
            self._history.epoch = epoch
        self.epoch = self._history.epoch
        # A durable history carries rooms, their settings and seqs over a
        # restart, and the ids of recent messages with them, so a client's
        # resend after the crash is not doubled.
        self._rooms: dict[str, _Room] = {}
        for name, settings in self._history.rooms().items():
            self._new_room(name).restore(settings)
        if ROOM not in self._rooms:
            self._history.save_room(ROOM, self._new_room(ROOM).settings())
        for lineage, items in self._history.recent_ids(self.limits.dedupe).items():
            for rid, seq, room in items:
                self._dedupe.put(lineage, _MESSAGE + rid, (room, seq))
        # Public rooms whose seq moved since the last heartbeat (it lists them).
        self._changed: set[str] = set()
        # Joins coalesced per pass of the loop (see ``end_pass``): rooms that
        # announced a join this pass, the joins waiting for the pass's end, and
        # the welcome/entered bodies whose seq must count them.
        self._coalesce = coalesce_joins
        self._joined_this_pass: set[str] = set()
        self._pending_joins: dict[str, dict[str, dict[str, str]]] = {}
        self._awaiting_seq: list[tuple[_Room, dict[str, Any]]] = []
        self._next_heartbeat = now
        self._expiry_from = now  # nobody is expired before this (see ``lagged``)
        self._counts = dict.fromkeys(
            ("messages", "dms", "joins", "timeouts", "errors", "rate_limited"), 0
        )
        self._handlers: dict[type, Callable[[bytes, Any, float, Origin], list[Outgoing]]] = {
            Join: self._join,
            Say: self._say,
            Leave: self._leave,
            Ping: self._ping,
            Who: self._who,
            GetHistory: self._get_history,
            SendDm: self._dm,
            Enter: self._enter,
            Part: self._part,
            ListRooms: self._list_rooms,
            SetTopic: self._set_topic,
            SetMode: self._set_mode,
            Op: self._op,
            Deop: self._deop,
            KickFrom: self._kick_from,
            Ban: self._ban,
            Unban: self._unban,
            Invite: self._invite,
        }

    # ---------------------------------------------------------------- queries

    def __len__(self) -> int:
        return len(self._by_name)

    @property
    def seq(self) -> int:
        """The last seq of ``lobby`` (version 1's one room)."""
        return self._rooms[ROOM].seq

    def room_seq(self, room: str) -> int | None:
        found = self._rooms.get(room)
        return None if found is None else found.seq

    def is_member(self, peer: bytes) -> bool:
        """Whether ``peer`` (a live connection) speaks for a member."""
        return peer in self._by_peer

    def name_of(self, peer: bytes) -> str | None:
        member = self._by_peer.get(peer)
        return member.name if member else None

    def address_of(self, name: str) -> str | None:
        """The address (as clients see it) of the member called ``name``."""
        member = self._by_name.get(fold_name(name))
        return member.shown if member else None

    def members(self, *, real_addresses: bool = False) -> list[dict[str, str]]:
        """Members of the broker as ``{name, addr}``, by join order (also those reconnecting)."""
        if real_addresses:
            return [{"name": m.name, "addr": m.addr} for m in self._by_name.values()]
        return [{"name": m.name, "addr": m.shown} for m in self._by_name.values()]

    def rooms_of(self, name: str) -> list[str]:
        """The rooms the member called ``name`` is in, in order of entry."""
        member = self._by_name.get(fold_name(name))
        return list(member.rooms) if member is not None else []

    def room_list(self) -> list[dict[str, Any]]:
        """Every room, private ones too (for the broker's operator)."""
        return [self._room_item(room) for room in self._rooms.values()]

    def room_members(self, room: str) -> list[dict[str, Any]]:
        """A room's members with real addresses and operator flags (operator's ``who``)."""
        found = self._operator_room(room)
        return [{"name": m.name, "addr": m.addr, "op": m.folded in found.ops}
                for m in found.members.values()]

    def statistics(self, now: float) -> Statistics:
        return Statistics(
            members=len(self._by_name),
            seq=self.seq,
            epoch=self.epoch,
            history=len(self._history),
            uptime=now - self._started,
            dedupe_ids=len(self._dedupe),
            buckets=len(self._budgets),
            rooms=len(self._rooms),
            **self._counts,
        )

    def next_deadline(self) -> float:
        """When ``tick`` next has work to do (clock of ``now``)."""
        deadline = self._next_heartbeat
        if self._activity:
            oldest = next(iter(self._activity.values()))
            expiry = oldest.last_seen + MISSED_HEARTBEATS * self.heartbeat
            deadline = min(deadline, max(expiry, self._expiry_from))
        return deadline

    def lagged(self, now: float) -> None:
        """The loop is behind its input (or did not run): expire nobody for a while.

        A member's ping may be waiting in the input behind other frames (a
        join storm) or in the kernel (the process was stopped). Expiry waits
        one heartbeat interval past the last time the loop said it lagged:
        by then a live member's next ping has been read.
        """
        self._expiry_from = max(self._expiry_from, now + self.heartbeat)

    # --------------------------------------------------------------- requests

    def handle(self, peer: bytes, request: Request, now: float, addr: str = "",
               key: str | None = None) -> list[Outgoing]:
        """Apply one request from ``peer``; return what to send.

        ``addr`` is the peer's IP address (needed for ``join``) and ``key``
        the CURVE public key of its connection, which the shell passes with
        every request: a member's requests must come with the key it joined
        with. A request the protocol forbids gets an ``error`` reply to that
        peer alone (with the request's ``room``, if it named one).
        """
        member = self._by_peer.get(peer)
        if member is not None:
            if member.key != key:
                # Same routing id, another key: not the member, whatever it says.
                return [self.error(peer, ErrorCode.NOT_JOINED,
                                   "this connection's key did not join", request.id)]
            member.last_seen = now
            self._activity.move_to_end(member.folded)
        elif type(request) not in (Join, Ping):
            return [self.error(peer, ErrorCode.NOT_JOINED, "join first", request.id)]
        try:
            return self._handlers[type(request)](peer, request, now, Origin(addr, key))
        except ProtocolError as exc:
            raw = getattr(request, "room", None)
            if raw is None and hasattr(request, "room") and exc.code in _ROOM_REFUSALS:
                raw = ROOM  # no room means lobby (ROOMS.md): say which room refused
            room = named_room({"room": raw}) if isinstance(raw, str) else None
            return [self.error(peer, exc.code, exc.detail, request.id, room)]

    def disconnected(self, peer: bytes, now: float) -> list[Outgoing]:
        """The connection behind ``peer`` is gone.

        Its member stays in its rooms, resumable with its token until it
        times out, but a new connection that comes with the same routing id
        is a stranger: it must join (with the token) to act as the member.
        """
        member = self._by_peer.pop(peer, None)
        if member is not None:
            member.peer = None
        return []

    def error(self, peer: bytes, code: str, detail: str, rid: str | None = None,
              room: str | None = None) -> Reply:
        """An ``error`` reply (the shell uses it for frames that did not decode)."""
        self._counts["errors"] += 1
        if code == ErrorCode.RATE_LIMITED:
            self._counts["rate_limited"] += 1
        body: dict[str, Any] = {"type": "error", "code": code, "detail": detail}
        if room is not None:
            body["room"] = room
        return Reply(peer, with_id(body, rid))

    def _join(self, peer: bytes, req: Join, now: float, origin: Origin) -> list[Outgoing]:
        name = check_name(req.name)
        folded = fold_name(name)
        out: list[Outgoing] = []
        current = self._by_peer.get(peer)
        if current is not None:
            if current.folded == folded:
                # A repeated join (say, a retry whose welcome was lost): same session.
                return [Reply(peer, self._welcome(current, [], req.id))]
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, f"already joined as {current.name!r}; leave first"
            )
        if origin.key is not None:
            self._check_binding(folded, name, origin.key, now)
        holder = self._by_name.get(folded)
        if holder is not None and not _same_token(req.token, holder.token):
            raise ProtocolError(ErrorCode.NAME_TAKEN, f"{holder.name!r} is taken")
        # Only a join that will happen is charged: failed attempts at a name
        # must not use up its owner's budget.
        self._spend(_JOIN, folded, origin, now)
        inherited: dict[str, _Room] = {}
        if holder is not None:
            # Takeover: the same user, back on a new connection; same lineage,
            # same rooms, same operator status.
            if holder.peer is not None:
                out.append(Reply(holder.peer, {"type": "bye", "reason": ByeReason.REPLACED}))
            self._forget(holder)
            token, lineage = holder.token, holder.lineage
            inherited = holder.rooms
        else:
            token, lineage = self._lineage(req.token, folded, origin.key)
        if origin.key is not None:
            self._bind(folded, origin.key, now)
        member = _Member(
            peer=peer,
            name=name,
            folded=folded,
            addr=origin.addr,
            shown=self._cloak(origin.addr),
            key=origin.key,
            token=token,
            lineage=lineage,
            last_seen=now,
            rooms=inherited,
        )
        self._by_peer[peer] = member
        self._by_name[folded] = member
        self._activity[folded] = member
        self._counts["joins"] += 1
        for room in inherited.values():
            room.members[folded] = member
            room.shown = None  # its address may have changed
            # As version 1 did for a takeover: the room sees the name come back.
            out += self._announce(room, now, "joined", {"name": name, "addr": member.shown})
        refused: list[dict[str, str]] = []
        for wanted in _unique(req.rooms if req.rooms is not None else [ROOM]):
            try:
                out += self._admit(member, check_room(wanted, self._room_chars),
                                   None, now)
            except ProtocolError as exc:
                code = ErrorCode.BAD_ROOM if exc.code == ErrorCode.BAD_REQUEST else exc.code
                refused.append({"room": wanted if isinstance(wanted, str) else repr(wanted),
                                "code": code})
        out.append(Reply(peer, self._welcome(member, refused, req.id)))
        return out

    def _lineage(self, token: object, folded: str, key: str | None) -> tuple[str, str]:
        """The token and dedupe lineage of a new session (not a takeover)."""
        if key is not None:
            # The key proves who this is; the name keeps one key's clients apart.
            return secrets.token_urlsafe(18), _digest("key", key, folded)
        if isinstance(token, str) and token:
            # A token whose ids we still hold resumes its lineage (after a
            # timeout, a leave, or a broker restart with durable history).
            lineage = _digest("token", token)
            if self._dedupe.knows(lineage):
                return token, lineage
        fresh = secrets.token_urlsafe(18)
        return fresh, _digest("token", fresh)

    def _check_binding(self, folded: str, name: str, key: str, now: float) -> None:
        """Refuse a name bound to another key, or a key past its number of names."""
        binding = self._owners.get(folded)
        if binding is not None and binding.key != key and not self._lapsed(folded, binding, now):
            raise ProtocolError(ErrorCode.NAME_TAKEN, f"{name!r} is registered to another key")
        if binding is not None and binding.key == key:
            return
        limit = self.limits.names_per_key
        names = self._names_of.get(key)
        if not limit or names is None or len(names) < limit:
            return
        if all(self._holds(key, other) for other in names):
            raise ProtocolError(
                ErrorCode.TOO_MANY_NAMES,
                f"this key already holds {limit} names, all in use; leave one first",
            )

    def _bind(self, folded: str, key: str, now: float) -> None:
        old = self._owners.get(folded)
        if old is not None and old.key != key:
            self._unbind(folded)
        names = self._names_of.setdefault(key, OrderedDict())
        limit = self.limits.names_per_key
        if folded not in names and limit and len(names) >= limit:
            # Recycle the key's least recently used name that nobody holds.
            spare = next(other for other in names if not self._holds(key, other))
            self._unbind(spare)
        names[folded] = None
        names.move_to_end(folded)
        self._owners[folded] = _Binding(key, now)

    def _unbind(self, folded: str) -> str | None:
        binding = self._owners.pop(folded, None)
        if binding is None:
            return None
        names = self._names_of.get(binding.key)
        if names is not None:
            names.pop(folded, None)
            if not names:
                del self._names_of[binding.key]
        return binding.key

    def _holds(self, key: str, folded: str) -> bool:
        member = self._by_name.get(folded)
        return member is not None and member.key == key

    def _lapsed(self, folded: str, binding: _Binding, now: float) -> bool:
        ttl = self.limits.name_ttl
        return bool(ttl) and now - binding.used > ttl and not self._holds(binding.key, folded)

    def release(self, name: str) -> str:
        """Free ``name`` from the CURVE key it is bound to; return that key.

        A member holding the name keeps it until it leaves (kick it first to
        free it at once). Its join budget is reset, so its rightful owner
        can take it at once. ``ProtocolError`` (``no_such_user``) if the
        name is bound to no key.
        """
        folded = fold_name(name)
        key = self._unbind(folded)
        if key is None:
            raise ProtocolError(ErrorCode.NO_SUCH_USER, f"{name!r} is not bound to any key")
        self._budgets.forget(_NAME + folded)
        return key

    def _welcome(self, member: _Member, refused: list[dict[str, str]],
                 rid: str | None) -> dict[str, Any]:
        # The v1 fields describe lobby if the client is in it, else the first
        # room it entered (lobby, which it is not in, if it entered none).
        first = member.rooms.get(ROOM) or next(iter(member.rooms.values()), None)
        shown = first if first is not None else self._rooms[ROOM]
        body: dict[str, Any] = {
            "type": "welcome",
            "name": member.name,
            "addr": member.shown,
            "room": shown.name,
            "seq": shown.seq,
            "members": _first_members(shown),
            "count": len(shown.members),
            "rooms": list(member.rooms),
            "pub": self.pub,
            "heartbeat": self.heartbeat,
            "token": member.token,
            "epoch": self.epoch,
            # Addition: the message budget, so a client paces itself instead
            # of being refused (0: no limit).
            "rate": self.limits.rate,
            "burst": self.limits.burst,
        }
        if refused:
            body["refused"] = refused
        if self.batch:
            body["batch"] = True
        self._await_seq(shown, body)
        return with_id(body, rid)

    def _check_text(self, text: str) -> None:
        limit = self.limits.max_text
        if limit and len(text) > limit:
            raise ProtocolError(
                ErrorCode.TOO_LARGE, f"text of {len(text)} characters exceeds {limit}"
            )

    def _spend(self, kind: str, folded: str, origin: Origin, now: float) -> None:
        """Take one token from the person's and the address's (or key's) budget."""
        rate, burst, what = self._rates[kind]
        if rate <= 0:
            return
        wants = [((kind, _NAME + folded), rate, burst)]
        if origin.key is not None:
            wants.append(((kind, _KEY + origin.key), rate, burst))
        elif self.limits.per_address:
            share = self.limits.per_address
            wants.append(((kind, _ADDRESS + origin.addr), rate * share, burst * share))
        if not self._budgets.take(wants, now):
            raise ProtocolError(ErrorCode.RATE_LIMITED,
                                f"more than {burst} {what} at once or {rate:g}/s; refused")

    def _spend_as(self, kind: str, member: _Member, now: float) -> None:
        """``_spend`` for a member; its origin is made only when the budget is on."""
        if self._rates[kind][0] > 0:
            self._spend(kind, member.folded, Origin(member.addr, member.key), now)

    def _find(self, raw: str | None, member: _Member | None, *, inside: bool) -> _Room:
        """The room a request names (None: lobby), as ``member`` may see it.

        ``inside``: the request needs the member to be in the room. A
        private room is only ever seen from inside: to anyone else it is
        ``not_in_room``, the same answer as a room they have left.
        """
        name = ROOM if raw is None else check_room(raw, self._room_chars)
        room = self._rooms.get(name)
        if room is None:
            raise ProtocolError(ErrorCode.NO_SUCH_ROOM, f"there is no room {name!r}")
        if (inside or room.private) and (member is None or member.folded not in room.members):
            raise ProtocolError(ErrorCode.NOT_IN_ROOM, f"you are not in {name!r}")
        return room

    def _need_op(self, member: _Member, room: _Room) -> None:
        if member.folded not in room.ops:
            raise ProtocolError(ErrorCode.FORBIDDEN,
                                f"you are not an operator of {room.name!r}")

    def message(self, peer: bytes, body: dict[str, Any], now: float) -> list[Outgoing] | None:
        """A ``message`` map from a member's connection, as decoded: the hot path.

        The same checks and the same result as ``handle(peer,
        parse_request(body), now)``, without the typed request: a plain map
        with a string ``text``, a valid or no ``id`` and a string or no
        ``room``, from a member that joined without a key. For anything
        else it returns None and the shell takes the general path, which
        answers every oddity exactly as before.
        """
        member = self._by_peer.get(peer)
        if member is None or member.key is not None:
            return None
        text = body.get("text")
        rid = body.get("id")
        room = body.get("room")
        if (type(text) is not str or (room is not None and type(room) is not str)
                or (rid is not None and (type(rid) is not str or len(rid) > MAX_ID_CHARS))):
            return None
        member.last_seen = now
        self._activity.move_to_end(member.folded)
        try:
            return self._message(peer, member, text, room, rid, now)
        except ProtocolError as exc:
            # As ``handle`` answers: no room means lobby, and says so when refused.
            raw = ROOM if room is None and exc.code in _ROOM_REFUSALS else room
            named = named_room({"room": raw}) if raw is not None else None
            return [self.error(peer, exc.code, exc.detail, rid, named)]

    def _say(self, peer: bytes, req: Say, now: float, origin: Origin) -> list[Outgoing]:
        return self._message(peer, self._by_peer[peer], req.text, req.room, req.id, now)

    def _message(self, peer: bytes, member: _Member, text: str, raw_room: str | None,
                 rid: str | None, now: float) -> list[Outgoing]:
        if rid is not None:
            seen = self._dedupe.get(member.lineage, _MESSAGE + rid)
            if seen is not None:
                return [Reply(peer, {"type": "ack", "id": rid, "room": seen[0],
                                     "seq": seen[1]})]
        room = self._find(raw_room, member, inside=True)
        if room.moderated and member.folded not in room.ops:
            raise ProtocolError(ErrorCode.FORBIDDEN,
                                f"{room.name!r} is moderated: only its operators speak")
        self._check_text(text)  # after the room's own refusals, as PROTOCOL.md orders them
        self._spend_as(_MESSAGE, member, now)
        event = self._room_event(room, now, "message", {"from": member.name, "text": text},
                                 dedupe=(member.lineage, rid), sender_addr=member.shown)
        seq = room.seq
        if rid is not None:
            self._dedupe.put(member.lineage, _MESSAGE + rid, (room.name, seq))
            ack = {"type": "ack", "seq": seq, "room": room.name, "id": rid}
        else:
            ack = {"type": "ack", "seq": seq, "room": room.name}
        self._counts["messages"] += 1
        return [event, _new(Reply, (peer, ack))]

    def _dm(self, peer: bytes, req: SendDm, now: float, origin: Origin) -> list[Outgoing]:
        member = self._by_peer[peer]
        self._check_text(req.text)
        ack = with_id({"type": "ack"}, req.id)
        if req.id is not None and self._dedupe.get(member.lineage, _DM + req.id) is not None:
            return [Reply(peer, ack)]
        target = self._by_name.get(fold_name(req.to))
        if target is None:
            raise ProtocolError(ErrorCode.NO_SUCH_USER, f"nobody called {req.to!r} is here")
        if target.peer is None:
            # Acking a dm that can only be dropped would be a lie.
            raise ProtocolError(ErrorCode.NO_SUCH_USER,
                                f"{target.name!r} lost its connection; try again later")
        self._spend_as(_MESSAGE, member, now)
        if req.id is not None:
            self._dedupe.put(member.lineage, _DM + req.id, ("", 0))
        self._counts["dms"] += 1
        direct = {"type": "dm", "from": member.name, "text": req.text, "ts": now}
        return [Reply(target.peer, direct), Reply(peer, ack)]

    def _leave(self, peer: bytes, req: Leave, now: float, origin: Origin) -> list[Outgoing]:
        return self._depart(self._by_peer[peer], LeaveReason.LEAVE, now,
                            detail=self._cut(req.reason))

    def _cut(self, reason: str | None) -> str | None:
        # A leave, part or kick always succeeds; an overlong reason is cut, not refused.
        if reason and self.limits.max_text and len(reason) > self.limits.max_text:
            return reason[: self.limits.max_text]
        return reason

    def _ping(self, peer: bytes, req: Ping, now: float, origin: Origin) -> list[Outgoing]:
        # Additions: `joined` tells an idle client whose DEALER silently
        # reconnected to a restarted broker that it must join again; `seq`
        # (lobby's) and `seqs` (every room it is in) let a client see a gap
        # without waiting for the next heartbeat.
        member = self._by_peer.get(peer)
        body: dict[str, Any] = {"type": "pong", "ts": now, "joined": member is not None,
                                "seq": self.seq}
        if member is not None:
            body["seqs"] = {name: room.seq for name, room in member.rooms.items()}
        return [Reply(peer, with_id(body, req.id))]

    def _who(self, peer: bytes, req: Who, now: float, origin: Origin) -> list[Outgoing]:
        member = self._by_peer[peer]
        room = self._find(req.room, member, inside=False)
        limit = WHO_PAGE if req.limit is None else req.limit
        if limit < 0:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "'limit' must not be negative")
        if req.after is not None and not isinstance(req.after, str):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "'after' must be a member name")
        self._spend_as(_QUERY, member, now)
        # By case-folded name as people read it (the unique fold breaks ties),
        # so that a name given as `after` has one place in the order.
        keys = sorted((m.name.casefold(), m.folded) for m in room.members.values())
        start = 0 if req.after is None else bisect_right(
            keys, (req.after.casefold(), fold_name(req.after)))
        page = keys[start:start + max(1, min(limit, WHO_PAGE_MAX))]
        body: dict[str, Any] = {
            "type": "members", "room": room.name, "count": len(keys),
            "members": [room.members[folded].public for _, folded in page],
        }
        if page and start + len(page) < len(keys):
            body["next"] = room.members[page[-1][1]].name
        return [Reply(peer, with_id(body, req.id))]

    def _get_history(self, peer: bytes, req: GetHistory, now: float,
                     origin: Origin) -> list[Outgoing]:
        limit = req.limit if req.limit is not None else HISTORY_PAGE
        if limit < 0:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "'limit' must not be negative")
        member = self._by_peer[peer]
        room = self._find(req.room, member, inside=False)
        self._spend_as(_QUERY, member, now)
        try:
            events = self.history(req.after, limit, self.limits.page_bytes, room.name)
        except HistoryError as exc:
            # The store logged it; this request fails, the broker goes on.
            raise ProtocolError(ErrorCode.UNAVAILABLE,
                                "history cannot be read right now; try again later") from exc
        body = with_id({"type": "history", "room": room.name, "events": events}, req.id)
        return [Reply(peer, body)]

    def history(self, after: int, limit: int = HISTORY_PAGE,
                max_bytes: int = 0, room: str = ROOM) -> list[dict[str, Any]]:
        """Kept events of ``room`` with ``seq > after``, oldest first, at most ``limit``.

        ``max_bytes`` bounds the packed size of the page (one event at least):
        a client pages on with ``after`` until a page comes back empty.
        """
        found = self._rooms.get(room)
        if found is None or after >= found.seq:
            return []
        return self._history.after(after, min(limit, HISTORY_PAGE_MAX), max_bytes, room)

    @property
    def store(self) -> History:
        """Where room events are kept (the loop commits it once per pass)."""
        return self._history

    # ------------------------------------------------------------------ rooms

    def _enter(self, peer: bytes, req: Enter, now: float, origin: Origin) -> list[Outgoing]:
        member = self._by_peer[peer]
        name = check_room(req.room, self._room_chars)
        out: list[Outgoing] = []
        if name not in member.rooms:
            # Only a real entry is charged: entering again just answers again.
            self._spend_as(_QUERY, member, now)
            out = self._admit(member, name, req.private, now)
        out.append(Reply(peer, with_id(self._entered(member.rooms[name]), req.id)))
        return out

    def _admit(self, member: _Member, name: str, private: bool | None,
               now: float) -> list[Outgoing]:
        """Put ``member`` in room ``name`` (created if new); the events it causes."""
        if name in member.rooms:
            return []
        room = self._rooms.get(name)
        limit = self.limits.rooms_per_client
        if limit and len(member.rooms) >= limit:
            raise ProtocolError(ErrorCode.TOO_MANY_ROOMS,
                                f"you are in {limit} rooms already; part one first")
        if room is None:
            total = self.limits.rooms_total
            if total and len(self._rooms) >= total:
                raise ProtocolError(ErrorCode.TOO_MANY_ROOMS,
                                    f"this broker holds its limit of {total} rooms")
            room = self._new_room(name)
            room.private = private is True
            # Its creator is its first operator (under CURVE, its key).
            room.ops.add(member.folded)
            if member.key is not None:
                room.op_keys.add(member.key)
            self._history.save_room(name, room.settings())
        else:
            if member.folded in room.bans:
                raise ProtocolError(ErrorCode.FORBIDDEN, f"you are banned from {name!r}")
            if room.private and member.folded not in room.invites:
                raise ProtocolError(ErrorCode.FORBIDDEN, f"{name!r} is invite-only")
            room.invites.pop(member.folded, None)
            if member.key is not None and member.key in room.op_keys:
                room.ops.add(member.folded)
        room.members[member.folded] = member
        if len(room.members) <= MEMBERS_SHOWN:
            room.shown = None
        member.rooms[name] = room
        return self._announce_join(room, member, now)

    def _announce_join(self, room: _Room, member: _Member, now: float) -> list[Outgoing]:
        """A member's ``joined`` event now, or coalesced with the pass's others.

        With ``coalesce_joins`` the first join of a loop pass into a room is
        announced at once, as always; later ones of the same pass wait for
        ``end_pass``, which announces them in one ``joins`` event. Each event
        costs a send to every subscriber, so a storm of N joins costs a few
        events per pass instead of N; at low load nothing changes. A room of
        at most ``coalesce_above`` members always gets one ``joined`` per
        join: in a room that small a `welcome` lists everyone, a broadcast is
        cheap, and a version 1 client, which shows no line for ``joins``,
        names everyone who comes (two people back at once after a restart).
        """
        most = self.limits.announce_max
        if most and len(room.members) > most:
            return []
        fields = {"name": member.name, "addr": member.shown}
        small = len(room.members) <= self.limits.coalesce_above
        if not self._coalesce or small or room.name not in self._joined_this_pass:
            if self._coalesce:
                self._joined_this_pass.add(room.name)
            return [self._room_event(room, now, "joined", fields)]
        self._pending_joins.setdefault(room.name, {})[member.folded] = fields
        return []

    def _await_seq(self, room: _Room, body: dict[str, Any]) -> None:
        """``body`` tells ``room``'s seq: if joins wait, it must count their event."""
        if room.name in self._pending_joins:
            self._awaiting_seq.append((room, body))

    def end_pass(self, now: float) -> list[Outgoing]:
        """The loop's pass ends: announce the joins it coalesced, one event per room.

        The shell calls it before it commits and sends, so the welcomes of
        this pass (still unsent) get the seq of the event that names them.
        """
        out: list[Outgoing] = []
        for name, joined in self._pending_joins.items():
            room = self._rooms.get(name)
            if room is not None and joined:
                members = list(joined.values())
                out.append(self._room_event(room, now, "joins",
                                            {"members": members, "count": len(members)}))
        for room, body in self._awaiting_seq:
            body["seq"] = room.seq
        self._pending_joins.clear()
        self._awaiting_seq.clear()
        self._joined_this_pass.clear()
        return out

    def _entered(self, room: _Room) -> dict[str, Any]:
        body = {
            "type": "entered", "room": room.name, "seq": room.seq, "topic": room.topic,
            "count": len(room.members), "members": _first_members(room),
            "ops": [room.members[f].name for f in room.ops if f in room.members],
            "private": room.private, "moderated": room.moderated,
            "topic_ops": room.topic_ops,
        }
        self._await_seq(room, body)
        return body

    def _part(self, peer: bytes, req: Part, now: float, origin: Origin) -> list[Outgoing]:
        member = self._by_peer[peer]
        room = self._find(req.room, member, inside=True)
        self._spend_as(_QUERY, member, now)
        out = self._leave_room(member, room, LeaveReason.PART, now, self._cut(req.reason))
        out.append(Reply(peer, with_id({"type": "parted", "room": room.name}, req.id)))
        return out

    def _list_rooms(self, peer: bytes, req: ListRooms, now: float,
                    origin: Origin) -> list[Outgoing]:
        member = self._by_peer[peer]
        self._spend_as(_QUERY, member, now)
        items = [self._room_item(room) for room in self._rooms.values()
                 if not room.private or member.folded in room.members]
        return [Reply(peer, with_id({"type": "rooms", "rooms": items}, req.id))]

    @staticmethod
    def _room_item(room: _Room) -> dict[str, Any]:
        return {"name": room.name, "topic": room.topic, "count": len(room.members),
                "private": room.private}

    def _set_topic(self, peer: bytes, req: SetTopic, now: float,
                   origin: Origin) -> list[Outgoing]:
        member = self._by_peer[peer]
        room = self._find(req.room, member, inside=True)
        if room.topic_ops:
            self._need_op(member, room)
        self._check_text(req.text)
        self._spend_as(_MESSAGE, member, now)
        room.topic = req.text
        self._history.save_room(room.name, room.settings())
        event = self._room_event(room, now, "topic", {"name": member.name, "text": req.text})
        return [event, self._ack(peer, room, req.id, room.seq)]

    def _set_mode(self, peer: bytes, req: SetMode, now: float,
                  origin: Origin) -> list[Outgoing]:
        member = self._by_peer[peer]
        room = self._find(req.room, member, inside=True)
        self._need_op(member, room)
        if req.private and room.name == ROOM:
            raise ProtocolError(ErrorCode.FORBIDDEN, "lobby is always public")
        asked = {"private": req.private, "moderated": req.moderated, "topic_ops": req.topic_ops}
        changes = {k: v for k, v in asked.items() if v is not None and getattr(room, k) != v}
        if not changes:
            return [self._ack(peer, room, req.id)]
        self._spend_as(_MESSAGE, member, now)
        for key, value in changes.items():
            setattr(room, key, value)
        if room.private:
            self._changed.discard(room.name)
        self._history.save_room(room.name, room.settings())
        # Made after the change: the event that makes a room private is its
        # first to go to the members' DEALERs only.
        event = self._room_event(room, now, "mode", {"name": member.name, **changes})
        return [event, self._ack(peer, room, req.id, room.seq)]

    def _target(self, room: _Room, name: str) -> _Member:
        target = room.members.get(fold_name(name))
        if target is None:
            raise ProtocolError(ErrorCode.NO_SUCH_USER, f"nobody called {name!r} is in "
                                f"{room.name!r}")
        return target

    def _op(self, peer: bytes, req: Op, now: float, origin: Origin) -> list[Outgoing]:
        member = self._by_peer[peer]
        room = self._find(req.room, member, inside=True)
        self._need_op(member, room)
        target = self._target(room, req.name)
        if target.folded in room.ops:
            return [self._ack(peer, room, req.id)]
        self._spend_as(_MESSAGE, member, now)
        out = self._make_op(room, target, member.name, now)
        return [*out, self._ack(peer, room, req.id, room.seq)]

    def _make_op(self, room: _Room, target: _Member, by: str, now: float) -> list[Outgoing]:
        room.ops.add(target.folded)
        if target.key is not None:
            room.op_keys.add(target.key)
            self._history.save_room(room.name, room.settings())
        return [self._room_event(room, now, "mode", {"name": by, "op": target.name})]

    def _deop(self, peer: bytes, req: Deop, now: float, origin: Origin) -> list[Outgoing]:
        member = self._by_peer[peer]
        room = self._find(req.room, member, inside=True)
        self._need_op(member, room)
        target = self._target(room, req.name)
        if target.folded not in room.ops:
            return [self._ack(peer, room, req.id)]
        self._spend_as(_MESSAGE, member, now)
        room.ops.discard(target.folded)
        if target.key is not None and target.key in room.op_keys:
            room.op_keys.discard(target.key)
            self._history.save_room(room.name, room.settings())
        event = self._room_event(room, now, "mode", {"name": member.name, "deop": target.name})
        return [event, self._ack(peer, room, req.id, room.seq)]

    def _kick_from(self, peer: bytes, req: KickFrom, now: float,
                   origin: Origin) -> list[Outgoing]:
        member = self._by_peer[peer]
        room = self._find(req.room, member, inside=True)
        self._need_op(member, room)
        target = self._target(room, req.name)
        self._spend_as(_MESSAGE, member, now)
        out = self._leave_room(target, room, LeaveReason.KICKED, now, self._cut(req.reason),
                               by=member.name)
        return [*out, self._ack(peer, room, req.id, room.seq)]

    def _ban(self, peer: bytes, req: Ban, now: float, origin: Origin) -> list[Outgoing]:
        member = self._by_peer[peer]
        room = self._find(req.room, member, inside=True)
        self._need_op(member, room)
        name = check_name(req.name)
        folded = fold_name(name)
        if folded in room.bans:
            return [self._ack(peer, room, req.id)]
        self._spend_as(_MESSAGE, member, now)
        room.bans[folded] = name
        room.invites.pop(folded, None)
        self._history.save_room(room.name, room.settings())
        out: list[Outgoing] = [self._room_event(room, now, "mode",
                                                         {"name": member.name, "ban": name})]
        target = room.members.get(folded)
        if target is not None:
            out += self._leave_room(target, room, LeaveReason.BANNED, now, by=member.name)
        return [*out, self._ack(peer, room, req.id, room.seq)]

    def _unban(self, peer: bytes, req: Unban, now: float, origin: Origin) -> list[Outgoing]:
        member = self._by_peer[peer]
        room = self._find(req.room, member, inside=True)
        self._need_op(member, room)
        shown = room.bans.get(fold_name(req.name))
        if shown is None:
            return [self._ack(peer, room, req.id)]
        self._spend_as(_MESSAGE, member, now)
        del room.bans[fold_name(req.name)]
        self._history.save_room(room.name, room.settings())
        event = self._room_event(room, now, "mode", {"name": member.name, "unban": shown})
        return [event, self._ack(peer, room, req.id, room.seq)]

    def _invite(self, peer: bytes, req: Invite, now: float, origin: Origin) -> list[Outgoing]:
        member = self._by_peer[peer]
        room = self._find(req.room, member, inside=True)
        if room.private:
            self._need_op(member, room)
        target = self._by_name.get(fold_name(req.name))
        if target is None or target.peer is None:
            raise ProtocolError(ErrorCode.NO_SUCH_USER, f"nobody called {req.name!r} is here")
        self._spend_as(_MESSAGE, member, now)
        if room.private:
            room.invites[target.folded] = None
            if len(room.invites) > self.limits.invites_kept:
                del room.invites[next(iter(room.invites))]
        invited = {"type": "invited", "room": room.name, "from": member.name}
        return [Reply(target.peer, invited), self._ack(peer, room, req.id)]

    @staticmethod
    def _ack(peer: bytes, room: _Room, rid: str | None, seq: int | None = None) -> Reply:
        body: dict[str, Any] = {"type": "ack", "room": room.name}
        if seq is not None:
            body["seq"] = seq  # the event the request became, when it became one
        return Reply(peer, with_id(body, rid))

    # --------------------------------------------------------- timed and ops

    def tick(self, now: float) -> list[Outgoing]:
        """Send a heartbeat when due and drop clients silent for too long.

        Nobody is dropped while the loop lags (``lagged``).
        """
        out: list[Outgoing] = []
        horizon = now - MISSED_HEARTBEATS * self.heartbeat
        while now >= self._expiry_from and self._activity:
            oldest = next(iter(self._activity.values()))
            if oldest.last_seen >= horizon:
                break
            self._counts["timeouts"] += 1
            out += self._depart(oldest, LeaveReason.TIMEOUT, now)
        if now >= self._next_heartbeat:
            out.append(self.heartbeat_frame(now))
            self._next_heartbeat = now + self.heartbeat
            try:
                self._history.prune(now)
            except HistoryError:
                pass  # the store logged it; forgetting old events can wait a beat
        return out

    def heartbeat_frame(self, now: float) -> Publish:
        """The broker-wide heartbeat: lobby's seq and every public room's that moved."""
        seqs = {ROOM: self.seq}
        for name in self._changed:
            room = self._rooms.get(name)
            if room is not None and not room.private:
                seqs[name] = room.seq
        self._changed.clear()
        return Publish(BROKER_TOPIC,
                       {"type": "heartbeat", "ts": now, "seqs": seqs, "epoch": self.epoch})

    def kick(self, name: str, now: float, reason: str | None = None) -> list[Outgoing]:
        """Remove ``name`` from the broker (``bye kicked``); ``ProtocolError`` if absent."""
        member = self._by_name.get(fold_name(name))
        if member is None:
            raise ProtocolError(ErrorCode.NO_SUCH_USER, f"nobody called {name!r} is here")
        bye: dict[str, Any] = {"type": "bye", "reason": ByeReason.KICKED}
        if reason:
            bye["detail"] = reason
        out: list[Outgoing] = [] if member.peer is None else [Reply(member.peer, bye)]
        out += self._depart(member, LeaveReason.KICKED, now, detail=reason)
        return out

    def notice(self, text: str, now: float, room: str = ROOM) -> list[Outgoing]:
        """An operator announcement to a room."""
        return [self._room_event(self._operator_room(room), now, "notice", {"text": text})]

    def name_op(self, room: str, name: str, now: float) -> list[Outgoing]:
        """The broker's operator makes ``name`` an operator of ``room``."""
        found = self._operator_room(room)
        target = self._target(found, name)
        if target.folded in found.ops:
            return []
        return self._make_op(found, target, BROKER_OPERATOR, now)

    def close_room(self, room: str, now: float, reason: str = "") -> list[Outgoing]:
        """Say why in ``room``, take everyone out of it and forget it and its history.

        Its seq is not forgotten: a room of the same name made later goes on
        from it, so no seq is given twice in an epoch. ``lobby`` stays.
        """
        found = self._operator_room(room)
        if found.name == ROOM:
            raise ProtocolError(ErrorCode.FORBIDDEN, "lobby always exists")
        text = f"this room is closed by the broker's operator{': ' + reason if reason else ''}"
        out: list[Outgoing] = [self._room_event(found, now, "notice", {"text": text})]
        for member in list(found.members.values()):
            extra = (member.peer,) if found.private and member.peer is not None else ()
            del found.members[member.folded]
            found.shown = None
            del member.rooms[found.name]
            fields = {"name": member.name, "addr": member.shown, "reason": LeaveReason.CLOSED}
            out.append(self._room_event(found, now, "left", fields, extra=extra))
        del self._rooms[found.name]
        self._changed.discard(found.name)
        self._history.drop_room(found.name)
        return out

    def _operator_room(self, room: str) -> _Room:
        found = self._rooms.get(check_room(room, MAX_ROOM_CHARS))
        if found is None:
            raise ProtocolError(ErrorCode.NO_SUCH_ROOM, f"there is no room {room!r}")
        return found

    def shutdown(self, now: float, reason: str = "shutdown") -> list[Outgoing]:
        """Everyone leaves; ``shutdown`` goes out and each client gets ``bye``."""
        out: list[Outgoing] = []
        self._pending_joins.clear()  # nobody is there to hear of them
        for member in list(self._by_name.values()):
            if member.peer is not None:
                out.append(Reply(member.peer, {"type": "bye", "reason": ByeReason.SHUTDOWN}))
            out += self._depart(member, LeaveReason.SHUTDOWN, now)
        out.append(Publish(BROKER_TOPIC, {"type": "shutdown", "reason": reason}))
        return out

    # ---------------------------------------------------------------- helpers

    def _new_room(self, name: str) -> _Room:
        room = _Room(name, seq=self._history.seq_of(name), pub_topic=room_topic(name))
        self._rooms[name] = room
        return room

    def _room_event(self, room: _Room, now: float, kind: str, fields: dict[str, Any], *,
                    dedupe: tuple[str, str | None] | None = None,
                    sender_addr: str | None = None,
                    extra: tuple[bytes, ...] = ()) -> Outgoing:
        """The next event of ``room``: kept, then published (or, private, delivered).

        ``extra``: peers that get a private room's event too (one just kicked).
        """
        room.seq += 1
        body = {"type": kind, "room": room.name, "seq": room.seq, "ts": now, **fields}
        # Packed once: the store keeps these bytes and the shell sends them.
        packed = self._packer.pack(body)
        if dedupe is None:
            self._history.append(body, packed=packed)
        else:
            self._history.append(body, dedupe[0], dedupe[1], packed)
        if room.private:
            peers = tuple(m.peer for m in room.members.values() if m.peer is not None)
            return Deliver(peers + extra, body, sender_addr, packed)
        self._changed.add(room.name)
        return _new(Publish, (room.pub_topic, body, sender_addr, packed))

    def _announce(self, room: _Room, now: float, kind: str,
                  fields: dict[str, Any]) -> list[Outgoing]:
        """A join's or a departure's event, unless the room is too full to announce them."""
        most = self.limits.announce_max
        if most and len(room.members) > most:
            return []
        return [self._room_event(room, now, kind, fields)]

    def _leave_room(self, member: _Member, room: _Room, reason: LeaveReason, now: float,
                    detail: str | None = None, by: str | None = None) -> list[Outgoing]:
        """Take ``member`` out of ``room`` (its operator status with it)."""
        extra: tuple[bytes, ...] = ()
        if room.private and member.peer is not None and reason not in _QUIET_REASONS:
            extra = (member.peer,)  # a kicked or banned member learns it too
        fields: dict[str, Any] = {"name": member.name, "addr": member.shown, "reason": reason}
        if detail:
            fields["detail"] = detail
        if by is not None:
            fields["by"] = by
        most = self.limits.announce_max
        quiet = reason in _QUIET_REASONS and most and len(room.members) > most
        pending = self._pending_joins.get(room.name)
        if pending is not None and pending.pop(member.folded, None) is not None:
            # Its join was never announced: neither is its going (unless an
            # operator's act, which is always announced).
            quiet = quiet or reason in _QUIET_REASONS
        del room.members[member.folded]
        room.shown = None
        del member.rooms[room.name]
        room.ops.discard(member.folded)
        if quiet:
            return []
        return [self._room_event(room, now, "left", fields, extra=extra)]

    def _depart(
        self, member: _Member, reason: LeaveReason, now: float, detail: str | None = None
    ) -> list[Outgoing]:
        """``member`` leaves the broker: one ``left`` in each of its rooms."""
        out: list[Outgoing] = []
        for room in list(member.rooms.values()):
            out += self._leave_room(member, room, reason, now, detail)
        self._forget(member)
        binding = self._owners.get(member.folded)
        if binding is not None and binding.key == member.key:
            binding.used = now  # a name's lapse counts from when it was last held
        return out

    def _forget(self, member: _Member) -> None:
        if member.peer is not None:
            del self._by_peer[member.peer]
        del self._by_name[member.folded]
        del self._activity[member.folded]


def _first_members(room: _Room) -> list[dict[str, str]]:
    """At most ``MEMBERS_SHOWN`` members, so a join never costs the room's size.

    The list is shared by every reply until the room's first members change:
    callers must not modify it.
    """
    if room.shown is None:
        room.shown = [m.public for m in islice(room.members.values(), MEMBERS_SHOWN)]
    return room.shown


def _unique(items: Iterable[Any]) -> list[Any]:
    """``items`` without repeats (valid names folded), in order."""
    seen: set[Any] = set()
    kept = []
    for item in items:
        key = item.lower() if isinstance(item, str) else repr(item)
        if key not in seen:
            seen.add(key)
            kept.append(item)
    return kept
# Kinds of budget and of dedupe id, and prefixes of identities.
_MESSAGE: Final = "m"
_DM: Final = "d"
_QUERY: Final = "q"
_JOIN: Final = "j"
_NAME: Final = "name:"
_KEY: Final = "key:"
_ADDRESS: Final = "addr:"


def _same_token(given: object, expected: str) -> bool:
    """Constant-time token check that no value of ``given`` can make raise."""
    if not isinstance(given, str):
        return False
    # compare_digest refuses non-ASCII str: compare the UTF-8 bytes instead.
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode())


def _digest(*parts: str) -> str:
    """A short stable id for a lineage (stored with messages; no secret in it)."""
    joined = "\0".join(parts).encode("utf-8", "surrogatepass")
    return hashlib.blake2b(joined, digest_size=16).hexdigest()
