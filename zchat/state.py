"""The broker's logic as a pure object: requests in, frames to send out.

``Broker.handle(peer, request, now, addr)`` takes one decoded request from
one peer (its ZeroMQ routing id) and returns the list of ``Outgoing`` frames
it causes: ``Reply`` to one peer's DEALER, ``Publish`` to every SUB. It never
touches a socket and never reads the clock: ``now`` (wall-clock seconds, the
``ts`` of events) is a parameter, so tests
of heartbeats, expiry and rate limits run without sleeping. ``tick(now)``
does the timed work (heartbeats, dropping silent clients) and
``next_deadline()`` tells the loop how long it may sleep.

Defines: ``Limits``, ``Reply``, ``Publish``, ``Outgoing``, ``Broker``,
``Statistics``, ``TokenBucket``.
"""

from __future__ import annotations

import hmac
import secrets
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple, TypeAlias

from zchat.errors import ProtocolError
from zchat.history import History, MemoryHistory
from zchat.protocol import (
    BROKER_TOPIC,
    ROOM,
    ROOM_TOPIC,
    ErrorCode,
    GetHistory,
    Join,
    Leave,
    Ping,
    Request,
    Say,
    SendDm,
    Who,
    check_name,
    fold_name,
)

__all__ = ["Broker", "Limits", "Outgoing", "Publish", "Reply", "Statistics", "TokenBucket"]

MISSED_HEARTBEATS: Final = 3
HISTORY_PAGE: Final = 100  # events per `history` reply when no limit is asked
HISTORY_PAGE_MAX: Final = 1000
DEPARTED_DEDUPE_NAMES: Final = 4096  # names whose dedupe ids outlive their session


@dataclass(frozen=True, slots=True)
class Limits:
    """What one client may do; 0 turns a limit off."""

    max_text: int = 4096  # characters of `text`
    max_frame: int = 64 * 1024  # bytes of one frame
    rate: float = 10.0  # messages per second, sustained
    burst: int = 20  # messages in a burst
    history: int = 10_000  # room events kept in memory
    dedupe: int = 1000  # request ids remembered per name


class Origin(NamedTuple):
    """Where a request came from: the peer's address and CURVE key, if any."""

    addr: str
    key: str | None


@dataclass(frozen=True, slots=True)
class Reply:
    """Send ``body`` to one peer (by routing id)."""

    peer: bytes
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Publish:
    """Send ``body`` to every subscriber of ``topic``."""

    topic: bytes
    body: dict[str, Any]


Outgoing: TypeAlias = Reply | Publish


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
        elapsed = now - self.stamp
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass(slots=True, eq=False)
class _Member:
    peer: bytes
    name: str
    addr: str  # as the operator sees it
    shown: str  # as other clients see it (cloaked if configured)
    token: str
    last_seen: float
    bucket: TokenBucket
    seen_ids: OrderedDict[str, int | None] = field(default_factory=OrderedDict)

    @property
    def public(self) -> dict[str, str]:
        return {"name": self.name, "addr": self.shown}


class Broker:
    """The state of one zchat broker: members, the room, its history.

    Args:
        heartbeat: seconds between heartbeats; clients silent for
            ``3 * heartbeat`` are dropped.
        limits: per-client limits.
        pub: the broadcast endpoint that ``welcome`` tells clients.
        batch: tell clients (in ``welcome``) that room events are also
            published coalesced on ``BATCH_TOPIC``.
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
    ) -> None:
        self.heartbeat = heartbeat
        self.limits = limits or Limits()
        self.pub = pub
        self.batch = batch
        self._cloak = cloak or (lambda addr: addr)
        self._started = now
        self._by_peer: dict[bytes, _Member] = {}
        self._by_name: dict[str, _Member] = {}
        # name -> the CURVE key that registered it (only when clients have keys)
        self._owners: dict[str, str] = {}
        # Members in order of last activity, oldest first: expiry pops the front.
        self._activity: OrderedDict[bytes, _Member] = OrderedDict()
        self._departed_ids: OrderedDict[str, OrderedDict[str, int | None]] = OrderedDict()
        self._history = history if history is not None else MemoryHistory(self.limits.history)
        if epoch is not None:
            self._history.epoch = epoch
        self.epoch = self._history.epoch
        # A durable history carries seq over a restart, and the ids of recent
        # messages with it, so a client's resend after the crash is not doubled.
        self.seq = self._history.last_seq
        for folded, pairs in self._history.recent_ids(self.limits.dedupe).items():
            self._departed_ids[folded] = OrderedDict(pairs)
        self._next_heartbeat = now
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
        }

    # ---------------------------------------------------------------- queries

    def __len__(self) -> int:
        return len(self._by_peer)

    def is_member(self, peer: bytes) -> bool:
        return peer in self._by_peer

    def name_of(self, peer: bytes) -> str | None:
        member = self._by_peer.get(peer)
        return member.name if member else None

    def address_of(self, name: str) -> str | None:
        """The address (as clients see it) of the member called ``name``."""
        member = self._by_name.get(fold_name(name))
        return member.shown if member else None

    def members(self, *, real_addresses: bool = False) -> list[dict[str, str]]:
        """Joined members as ``{name, addr}``, by join order."""
        if real_addresses:
            return [{"name": m.name, "addr": m.addr} for m in self._by_peer.values()]
        return [m.public for m in self._by_peer.values()]

    def statistics(self, now: float) -> Statistics:
        return Statistics(
            members=len(self._by_peer),
            seq=self.seq,
            epoch=self.epoch,
            history=len(self._history),
            uptime=now - self._started,
            **self._counts,
        )

    def next_deadline(self) -> float:
        """When ``tick`` next has work to do (clock of ``now``)."""
        deadline = self._next_heartbeat
        if self._activity:
            oldest = next(iter(self._activity.values()))
            deadline = min(deadline, oldest.last_seen + MISSED_HEARTBEATS * self.heartbeat)
        return deadline

    # --------------------------------------------------------------- requests

    def handle(self, peer: bytes, request: Request, now: float, addr: str = "",
               key: str | None = None) -> list[Outgoing]:
        """Apply one request from ``peer``; return what to send.

        ``addr`` is the peer's IP address and ``key`` its CURVE public key
        (both needed for ``join`` only). A request the protocol forbids gets
        an ``error`` reply to that peer alone.
        """
        member = self._by_peer.get(peer)
        if member is not None:
            member.last_seen = now
            self._activity.move_to_end(peer)
        elif type(request) not in (Join, Ping):
            return [self.error(peer, ErrorCode.NOT_JOINED, "join first", request.id)]
        try:
            return self._handlers[type(request)](peer, request, now, Origin(addr, key))
        except ProtocolError as exc:
            return [self.error(peer, exc.code, exc.detail, request.id)]

    def error(self, peer: bytes, code: str, detail: str, rid: str | None = None) -> Reply:
        """An ``error`` reply (the shell uses it for frames that did not decode)."""
        self._counts["errors"] += 1
        if code == ErrorCode.RATE_LIMITED:
            self._counts["rate_limited"] += 1
        body: dict[str, Any] = {"type": "error", "code": code, "detail": detail}
        if rid is not None:
            body["id"] = rid
        return Reply(peer, body)

    def _join(self, peer: bytes, req: Join, now: float, origin: Origin) -> list[Outgoing]:
        name = check_name(req.name)
        folded = fold_name(name)
        out: list[Outgoing] = []
        current = self._by_peer.get(peer)
        if current is not None:
            if fold_name(current.name) == folded:
                # A repeated join (say, a retry whose welcome was lost): same session.
                return [Reply(peer, self._welcome(current, req.id))]
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, f"already joined as {current.name!r}; leave first"
            )
        owner = self._owners.get(folded)
        if owner is not None and owner != origin.key:
            # With CURVE, a name belongs to the first key that took it.
            raise ProtocolError(ErrorCode.NAME_TAKEN,
                                f"{name!r} is registered to another key")
        holder = self._by_name.get(folded)
        seen_ids: OrderedDict[str, int | None] | None = None
        if holder is not None:
            if req.token is None or not hmac.compare_digest(req.token, holder.token):
                raise ProtocolError(ErrorCode.NAME_TAKEN, f"{holder.name!r} is taken")
            # Takeover: the same user, back on a new connection.
            out.append(Reply(holder.peer, {"type": "bye", "reason": "replaced"}))
            self._forget(holder)
            seen_ids = holder.seen_ids
        else:
            seen_ids = self._departed_ids.pop(folded, None)
        if origin.key is not None:
            self._owners[folded] = origin.key
        member = _Member(
            peer=peer,
            name=name,
            addr=origin.addr,
            shown=self._cloak(origin.addr),
            token=secrets.token_urlsafe(18),
            last_seen=now,
            bucket=TokenBucket(self.limits.rate, self.limits.burst, now),
            seen_ids=seen_ids if seen_ids is not None else OrderedDict(),
        )
        self._by_peer[peer] = member
        self._by_name[folded] = member
        self._activity[peer] = member
        self._counts["joins"] += 1
        out.append(self._room_event(now, "joined", name=name, addr=member.shown))
        out.append(Reply(peer, self._welcome(member, req.id)))
        return out

    def _welcome(self, member: _Member, rid: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": "welcome",
            "name": member.name,
            "addr": member.shown,
            "room": ROOM,
            "seq": self.seq,
            "members": self.members(),
            "pub": self.pub,
            "heartbeat": self.heartbeat,
            "token": member.token,
            "epoch": self.epoch,
        }
        if self.batch:
            body["batch"] = True
        if rid is not None:
            body["id"] = rid
        return body

    def _check_text(self, text: str) -> None:
        limit = self.limits.max_text
        if limit and len(text) > limit:
            raise ProtocolError(
                ErrorCode.TOO_LARGE, f"text of {len(text)} characters exceeds {limit}"
            )

    def _admit(self, member: _Member, now: float) -> None:
        """Refuse a new message or dm past the member's rate."""
        if not member.bucket.take(now):
            limit = self.limits
            raise ProtocolError(
                ErrorCode.RATE_LIMITED,
                f"more than {limit.burst} messages at once or {limit.rate:g}/s; not delivered",
            )

    def _remember(self, member: _Member, rid: str | None, seq: int | None) -> None:
        if rid is None or not self.limits.dedupe:
            return
        member.seen_ids[rid] = seq
        if len(member.seen_ids) > self.limits.dedupe:
            member.seen_ids.popitem(last=False)

    def _say(self, peer: bytes, req: Say, now: float, origin: Origin) -> list[Outgoing]:
        member = self._by_peer[peer]
        self._check_text(req.text)
        if req.id is not None and req.id in member.seen_ids:
            return [Reply(peer, {"type": "ack", "id": req.id, "seq": member.seen_ids[req.id]})]
        self._admit(member, now)
        event = self._room_event(
            now, "message", (fold_name(member.name), req.id), **{"from": member.name,
                                                                  "text": req.text})
        self._remember(member, req.id, self.seq)
        self._counts["messages"] += 1
        ack: dict[str, Any] = {"type": "ack", "seq": self.seq}
        if req.id is not None:
            ack["id"] = req.id
        return [event, Reply(peer, ack)]

    def _dm(self, peer: bytes, req: SendDm, now: float, origin: Origin) -> list[Outgoing]:
        member = self._by_peer[peer]
        self._check_text(req.text)
        ack: dict[str, Any] = {"type": "ack"}
        if req.id is not None:
            ack["id"] = req.id
            if req.id in member.seen_ids:
                return [Reply(peer, ack)]
        target = self._by_name.get(fold_name(req.to))
        if target is None:
            raise ProtocolError(ErrorCode.NO_SUCH_USER, f"nobody called {req.to!r} is here")
        self._admit(member, now)
        self._remember(member, req.id, None)
        self._counts["dms"] += 1
        direct = {"type": "dm", "from": member.name, "text": req.text, "ts": now}
        return [Reply(target.peer, direct), Reply(peer, ack)]

    def _leave(self, peer: bytes, req: Leave, now: float, origin: Origin) -> list[Outgoing]:
        reason = req.reason
        if reason and self.limits.max_text and len(reason) > self.limits.max_text:
            # A leave always succeeds; an overlong reason is cut, not refused.
            reason = reason[: self.limits.max_text]
        return [self._depart(self._by_peer[peer], "leave", now, detail=reason)]

    def _ping(self, peer: bytes, req: Ping, now: float, origin: Origin) -> list[Outgoing]:
        # Additions: `joined` tells an idle client whose DEALER silently
        # reconnected to a restarted broker that it must join again; `seq`
        # lets a client see a gap without waiting for the next heartbeat.
        body: dict[str, Any] = {"type": "pong", "ts": now, "joined": peer in self._by_peer,
                                "seq": self.seq}
        if req.id is not None:
            body["id"] = req.id
        return [Reply(peer, body)]

    def _who(self, peer: bytes, req: Who, now: float, origin: Origin) -> list[Outgoing]:
        body: dict[str, Any] = {"type": "members", "members": self.members()}
        if req.id is not None:
            body["id"] = req.id
        return [Reply(peer, body)]

    def _get_history(self, peer: bytes, req: GetHistory, now: float,
                     origin: Origin) -> list[Outgoing]:
        limit = req.limit if req.limit is not None else HISTORY_PAGE
        if limit < 0:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "'limit' must not be negative")
        body: dict[str, Any] = {"type": "history", "events": self.history(req.after, limit)}
        if req.id is not None:
            body["id"] = req.id
        return [Reply(peer, body)]

    def history(self, after: int, limit: int = HISTORY_PAGE) -> list[dict[str, Any]]:
        """Kept room events with ``seq > after``, oldest first, at most ``limit``."""
        if after >= self.seq:
            return []
        return self._history.after(after, min(limit, HISTORY_PAGE_MAX))

    @property
    def store(self) -> History:
        """Where room events are kept (the loop commits it once per pass)."""
        return self._history

    # --------------------------------------------------------- timed and ops

    def tick(self, now: float) -> list[Outgoing]:
        """Send a heartbeat when due and drop clients silent for too long."""
        out: list[Outgoing] = []
        horizon = now - MISSED_HEARTBEATS * self.heartbeat
        while self._activity:
            oldest = next(iter(self._activity.values()))
            if oldest.last_seen >= horizon:
                break
            self._counts["timeouts"] += 1
            out.append(self._depart(oldest, "timeout", now))
        if now >= self._next_heartbeat:
            out.append(self.heartbeat_frame(now))
            self._next_heartbeat = now + self.heartbeat
            self._history.prune(now)
        return out

    def heartbeat_frame(self, now: float) -> Publish:
        return Publish(
            BROKER_TOPIC,
            {"type": "heartbeat", "ts": now, "seqs": {ROOM: self.seq}, "epoch": self.epoch},
        )

    def kick(self, name: str, now: float, reason: str | None = None) -> list[Outgoing]:
        """Remove ``name`` (``bye kicked``); ``ProtocolError`` if absent."""
        member = self._by_name.get(fold_name(name))
        if member is None:
            raise ProtocolError(ErrorCode.NO_SUCH_USER, f"nobody called {name!r} is here")
        bye: dict[str, Any] = {"type": "bye", "reason": "kicked"}
        if reason:
            bye["detail"] = reason
        return [Reply(member.peer, bye), self._depart(member, "kicked", now, detail=reason)]

    def notice(self, text: str, now: float) -> list[Outgoing]:
        """An operator announcement to the room."""
        return [self._room_event(now, "notice", text=text)]

    def shutdown(self, now: float, reason: str = "shutdown") -> list[Outgoing]:
        """Everyone leaves; ``shutdown`` goes out and each client gets ``bye``."""
        out: list[Outgoing] = []
        for member in list(self._by_peer.values()):
            out.append(Reply(member.peer, {"type": "bye", "reason": "shutdown"}))
            out.append(self._depart(member, "shutdown", now))
        out.append(Publish(BROKER_TOPIC, {"type": "shutdown", "reason": reason}))
        return out

    # ---------------------------------------------------------------- helpers

    def _room_event(self, now: float, kind: str, dedupe: tuple[str, str | None] | None = None,
                    **fields: Any) -> Publish:
        self.seq += 1
        body = {"type": kind, "room": ROOM, "seq": self.seq, "ts": now, **fields}
        if dedupe is None:
            self._history.append(body)
        else:
            self._history.append(body, *dedupe)
        return Publish(ROOM_TOPIC, body)

    def _depart(
        self, member: _Member, reason: str, now: float, detail: str | None = None
    ) -> Publish:
        self._forget(member)
        if member.seen_ids:
            folded = fold_name(member.name)
            self._departed_ids[folded] = member.seen_ids
            self._departed_ids.move_to_end(folded)
            if len(self._departed_ids) > DEPARTED_DEDUPE_NAMES:
                self._departed_ids.popitem(last=False)
        fields: dict[str, Any] = {"name": member.name, "addr": member.shown, "reason": reason}
        if detail:
            fields["detail"] = detail
        return self._room_event(now, "left", **fields)

    def _forget(self, member: _Member) -> None:
        del self._by_peer[member.peer]
        del self._by_name[fold_name(member.name)]
        del self._activity[member.peer]


    # TEMPORARY (lead): replaced by the state worker's version on merge.
    def disconnected(self, peer: bytes, now: float) -> list[Outgoing]:
        member = self._by_peer.pop(peer, None)
        if member is None:
            return []
        detached = peer + b"\x00gone"
        member.peer = detached
        self._by_peer[detached] = member
        self._activity[detached] = self._activity.pop(peer)
        return []
