"""The zchat client library: ``Client`` (threads) and ``AsyncClient`` (asyncio).

A client owns one I/O thread that owns the ZeroMQ sockets (a DEALER for
requests, a SUB for room events); public methods are thread-safe and talk to
it through a queue and a wake-up pipe. The thread does what a good chat
client must do by itself, so that a bot is a few lines:

- joins, learns the broadcast endpoint from ``welcome`` and subscribes;
- delivers room events exactly once and in ``seq`` order, filling any gap
  (late join, dropped frames, reconnect) from ``history``;
- pings when idle, and treats the broker as gone after three silent
  heartbeat intervals, or at once when the connection drops (a socket
  monitor on the DEALER, and ZMTP heartbeats for a peer that vanished
  without closing); then rejoins with its ``token`` and ``since`` so the
  name is kept and nothing is missed;
- tells a failed handshake (a wrong CURVE server key) from an absent
  broker: ``HandshakeFailed`` at once instead of ``BrokerUnreachable``
  after the timeout;
- keeps every ``message`` and ``dm`` until acked, sending it again with the
  same ``id`` after a reconnect: the broker's dedupe makes that at most once.

Typical use::

    with Client("tcp://127.0.0.1:5555", "bot") as chat:
        chat.send("hello")
        for event in chat.events():
            if isinstance(event, Message) and event.text == "!ping":
                chat.send("pong")
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import itertools
import logging
import queue
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeAlias, TypeVar

import zmq
from zmq.utils.monitor import parse_monitor_message

from zchat.errors import (
    BrokerUnreachable,
    ClientClosed,
    HandshakeFailed,
    ProtocolError,
    RequestFailed,
)
from zchat.keys import ClientKeys
from zchat.protocol import (
    BATCH_TOPIC,
    BROKER_TOPIC,
    ROOM_TOPIC,
    Direct,
    Event,
    Joined,
    Left,
    Member,
    decode_frame,
    encode,
    parse_event,
    parse_members,
)

__all__ = ["AsyncClient", "Client", "Status", "Welcome", "check_endpoint", "resolve_endpoint"]

log = logging.getLogger("zchat.client")

T = TypeVar("T")

DEFAULT_HEARTBEAT = 5.0  # until the broker's `welcome` says otherwise
JOIN_ATTEMPT_SECONDS = 2.0
RETRY_MIN, RETRY_MAX = 0.25, 5.0  # backoff between join attempts
HISTORY_PAGE = 1000
EARLY_PING_SECONDS = 0.3  # after a welcome: time enough for the SUB to connect
LEAVE_ACK = "leave-ack"
LEAVE_WAIT_SECONDS = 2.0  # at most, for the broker to confirm a leave
# ZMTP heartbeats on the DEALER: libzmq's I/O thread answers them even while
# the broker's Python loop is busy, so silence means the peer is gone (a
# host that vanished without closing its connection), noticed in seconds.
ZMTP_HEARTBEAT_MS, ZMTP_TIMEOUT_MS = 1000, 3000
HANDSHAKE_TRIES = 5  # handshakes cut short in a row before a CURVE key is blamed
_MONITORED = (zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
              | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
              | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


@dataclass(frozen=True, slots=True)
class Status:
    """A change in the connection, delivered among the events.

    ``state`` is one of ``connected`` (first welcome), ``disconnected`` (the
    broker stopped answering or shut down; retrying), ``reconnected``,
    ``history_lost`` (the broker restarted without its history: events from
    before may be missing; ``count`` is the room's seq when we rejoined, so
    the events up to it that follow are the new history, said while we were
    away or long before), ``missed`` (``count`` events fell out of the
    broker's history before they could be fetched), ``closed`` (kicked,
    replaced by another connection with our token, or ``close()``).
    """

    state: str
    detail: str = ""
    count: int = 0


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


Item: TypeAlias = Event | Direct | Status


@dataclass(slots=True)
class _Pending:
    body: dict[str, Any]
    future: concurrent.futures.Future[Any]
    parse: Callable[[dict[str, Any]], Any]
    durable: bool  # a message or dm: kept and resent until acked
    sent_at: float = 0.0


@dataclass(slots=True)
class _Gap:
    """Events received ahead of a hole in seq, while history fills it."""

    ahead: dict[int, Event] = field(default_factory=dict)
    asked: bool = False


class Client:
    """A zchat client for bots, tests and tools (thread-safe).

    Args:
        endpoint: the broker's input endpoint (``tcp://host:5555``).
        name: the name to join with.
        broadcast: the broadcast endpoint, if known; by default taken from
            ``welcome`` (a bare port means the host of ``endpoint``).
        timeout: default seconds for calls that wait on the broker.
        token: a token from an earlier ``welcome``, to take the name over.
        since: the last seq already seen (events after it are delivered).
        context: a ``zmq.Context``; by default the process-wide one.
        on_item: called in the I/O thread with every event instead of
            queueing it for ``events()`` (used by ``AsyncClient``).
        keys: CURVE keys (``zchat.keys.load_client_keys``) for a broker that
            encrypts; both sockets use them.
    """

    def __init__(
        self,
        endpoint: str = "tcp://127.0.0.1:5555",
        name: str = "",
        *,
        broadcast: str | None = None,
        timeout: float = 10.0,
        token: str | None = None,
        since: int | None = None,
        context: zmq.Context[Any] | None = None,
        on_item: Callable[[Item], None] | None = None,
        keys: ClientKeys | None = None,
    ) -> None:
        if not name:
            raise ValueError("a name is needed to join")
        check_endpoint(endpoint)
        self.endpoint = endpoint
        self.name = name
        self.timeout = timeout
        self.welcome: Welcome | None = None
        self.members: dict[str, Member] = {}
        self.last_seq = since or 0
        self._broadcast = broadcast
        self._keys = keys
        self._token = token
        self._has_seq = since is not None
        self._ctx = context or zmq.Context.instance()
        self._items: queue.Queue[Item | None] = queue.Queue()
        self._on_item = on_item
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._ids = (f"{secrets.token_hex(4)}-{n}" for n in itertools.count(1))
        self._closed = threading.Event()
        self._close_reason = "closed"
        self._joined_future: concurrent.futures.Future[Welcome] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, name=f"zchat-{name}", daemon=True)
        self._started = False

    # ------------------------------------------------------------ public API

    def connect(self, timeout: float | None = None) -> Welcome:
        """Start the I/O thread and join; return the ``welcome``.

        Raises:
            NameTaken, RequestFailed: the broker refused the join.
            HandshakeFailed: a broker answered but the handshake failed
                (wrong server key, key not accepted, encryption expected).
            BrokerUnreachable: no welcome within ``timeout``, or the host
                name does not resolve (said at once).
        """
        if not self._started:
            try:
                resolve_endpoint(self.endpoint)
            except OSError as exc:
                self._closed.set()  # no thread ran: nothing else to stop
                self._wake_r.close()
                self._wake_w.close()
                raise BrokerUnreachable(str(exc)) from None
            self._started = True
            self._thread.start()
        try:
            return self._wait(self._joined_future, timeout)
        except BrokerUnreachable:
            self.close()
            raise

    def __enter__(self) -> Client:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_nowait(self, text: str) -> concurrent.futures.Future[int]:
        """Queue ``text`` for the room; the future gives its seq once acked.

        The message is kept, across reconnects, until the broker acks it.
        """
        return self._request({"type": "message", "text": text}, _ack_seq, durable=True)

    def send(self, text: str, timeout: float | None = None) -> int:
        """Say ``text`` in the room and return its seq once the broker acked it.

        On timeout ``BrokerUnreachable`` is raised, but the message stays
        queued and is still delivered (once) if the broker comes back.
        """
        return self._wait(self.send_nowait(text), timeout)

    def dm_nowait(self, to: str, text: str) -> concurrent.futures.Future[None]:
        """Queue a private message to ``to``."""
        return self._request({"type": "dm", "to": to, "text": text}, _nothing, durable=True)

    def dm(self, to: str, text: str, timeout: float | None = None) -> None:
        """Send a private message; ``NoSuchUser`` if nobody is called ``to``."""
        self._wait(self.dm_nowait(to, text), timeout)

    def who(self, timeout: float | None = None) -> list[Member]:
        """Ask the broker who is in the room."""
        fut = self._request({"type": "who"}, lambda r: parse_members(r.get("members")))
        return self._wait(fut, timeout)

    def history(
        self, after: int = 0, limit: int | None = None, timeout: float | None = None
    ) -> list[Event]:
        """Room events with seq above ``after`` that the broker still keeps."""
        body: dict[str, Any] = {"type": "history", "after": after}
        if limit is not None:
            body["limit"] = limit
        return self._wait(self._request(body, _events), timeout)

    def ping(self, timeout: float | None = None) -> float:
        """Round trip to the broker; return the broker's clock."""
        fut = self._request({"type": "ping"}, lambda r: float(r["ts"]))
        broker_time: float = self._wait(fut, timeout)
        return broker_time

    def next_event(self, timeout: float | None = None) -> Item | None:
        """The next event, or None after ``timeout`` seconds or once closed."""
        if self._closed.is_set() and self._items.empty():
            return None
        try:
            return self._items.get(timeout=timeout)
        except queue.Empty:
            return None

    def events(self, timeout: float | None = None) -> Iterator[Item]:
        """Iterate events until closed (or until ``timeout`` seconds of quiet)."""
        while (item := self.next_event(timeout)) is not None:
            yield item

    @property
    def connected(self) -> bool:
        return self.welcome is not None and not self._closed.is_set()

    def leave(self, reason: str | None = None) -> None:
        """Leave the room (announced to everyone) and close.

        Returns once the broker has taken the leave (2 s at most), so a
        program may exit right after it.
        """
        body: dict[str, Any] = {"type": "leave"}
        if reason:
            body["reason"] = reason
        self._call(lambda: self._leave_now(body))
        self._stop_thread()

    def close(self) -> None:
        """Stop without a ``leave``: the broker will time the client out."""
        self._call(lambda: self._finish("closed"))
        self._stop_thread()

    # ------------------------------------------------------ calling the thread

    def _call(self, fn: Callable[[], None]) -> None:
        self._commands.put(fn)
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # already awake, or closing

    def _request(
        self, body: dict[str, Any], parse: Callable[[dict[str, Any]], Any], durable: bool = False
    ) -> concurrent.futures.Future[Any]:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        if self._closed.is_set():
            fut.set_exception(ClientClosed(self._close_reason))
            return fut
        body["id"] = next(self._ids)
        pending = _Pending(body, fut, parse, durable)
        self._call(lambda: self._submit(pending))
        return fut

    def _wait(self, fut: concurrent.futures.Future[T], timeout: float | None) -> T:
        seconds = self.timeout if timeout is None else timeout
        try:
            return fut.result(seconds)
        except concurrent.futures.TimeoutError:
            raise BrokerUnreachable(f"no answer from {self.endpoint} within {seconds:g}s") from None

    def _stop_thread(self) -> None:
        if self._started and threading.current_thread() is not self._thread:
            self._thread.join(5.0)
        self._closed.set()

    # --------------------------------------------------------- the I/O thread

    def _run(self) -> None:
        self._dealer: zmq.Socket[Any] | None = None
        self._monitor: zmq.Socket[Any] | None = None
        self._handshaken = False  # on the current DEALER connection
        self._handshake_failures = 0  # handshakes cut short since the last one that worked
        self._sub: zmq.Socket[Any] | None = None
        self._pending: dict[str, _Pending] = {}
        self._gap = _Gap()
        self._joining_since = 0.0
        self._retry = RETRY_MIN
        self._next_attempt = 0.0
        self._heartbeat = DEFAULT_HEARTBEAT
        self._last_heard = time.monotonic()
        self._last_sent = 0.0
        self._early_ping = 0.0
        self._leave_deadline = 0.0
        self._epoch: str | None = None
        self._was_joined = False
        self._stop = False
        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        try:
            self._start_join(time.monotonic())
            while not self._stop:
                for sock in (self._dealer, self._monitor, self._sub):
                    if sock is not None and sock not in poller:
                        poller.register(sock, zmq.POLLIN)
                timeout = max(0.0, self._deadline() - time.monotonic())
                ready = dict(poller.poll(int(timeout * 1000) + 1))
                if self._wake_r.fileno() in ready:
                    self._drain_commands()
                if self._dealer is not None and self._dealer in ready:
                    self._drain(self._dealer, self._on_reply)
                if self._monitor is not None and self._monitor in ready:
                    self._drain_monitor()
                if self._sub is not None and self._sub in ready:
                    self._drain(self._sub, self._on_broadcast)
                self._on_time(time.monotonic())
                for sock in list(poller.sockets):
                    if isinstance(sock, zmq.Socket) and sock.closed:
                        poller.unregister(sock)
        except Exception:  # never leave callers waiting forever on a dead thread
            log.exception("zchat client thread failed")
            self._finish("internal error")
        finally:
            self._close_dealer()
            if self._sub is not None:
                self._sub.close(linger=0)
            self._wake_r.close()
            self._wake_w.close()

    def _drain_commands(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        while True:
            try:
                fn = self._commands.get_nowait()
            except queue.Empty:
                return
            fn()

    def _drain(self, sock: zmq.Socket[Any], on_frames: Callable[[list[bytes]], None]) -> None:
        for _ in range(10_000):
            if sock.closed:
                return
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._last_heard = time.monotonic()
            on_frames(frames)

    def _send(self, body: dict[str, Any]) -> None:
        if self._dealer is None:
            return
        try:
            self._dealer.send(encode(body), zmq.NOBLOCK)
            self._last_sent = time.monotonic()
        except zmq.Again:
            pass  # the broker is not there; resent after the next welcome

    def _deadline(self) -> float:
        if self._leave_deadline:
            return self._leave_deadline
        if self._joining_since:
            return self._joining_since + JOIN_ATTEMPT_SECONDS
        if self.welcome is None:
            return self._next_attempt
        hb = self._heartbeat
        deadline = min(self._last_sent + hb, self._last_heard + 3 * hb)
        return min(deadline, self._early_ping) if self._early_ping else deadline

    def _on_time(self, now: float) -> None:
        if self._stop:
            return
        if self._leave_deadline:
            if now >= self._leave_deadline:
                self._finish("left")  # the broker will time us out instead
            return
        if self._joining_since:
            if now - self._joining_since >= JOIN_ATTEMPT_SECONDS:
                self._joining_since = 0.0
                self._next_attempt = now + self._retry
                self._retry = min(self._retry * 2, RETRY_MAX)
            return
        if self.welcome is None or self._dealer is None:
            if now >= self._next_attempt:
                self._start_join(now)
            return
        hb = self._heartbeat
        if now - self._last_heard >= 3 * hb:
            self._lost("broker unreachable, retrying…", now)
            return
        if now - self._last_sent >= hb or (self._early_ping and now >= self._early_ping):
            # The early ping closes the slow-joiner window: events published
            # between our welcome and our SUB's connection show up as a seq
            # in the pong, well before the next heartbeat would tell.
            self._early_ping = 0.0
            self._send({"type": "ping"})
        for pending in self._pending.values():
            # An unacked request after a full interval may have been lost in a
            # reconnect of the DEALER: the same id makes resending harmless.
            if now - pending.sent_at >= 2 * hb:
                pending.sent_at = now
                self._send(pending.body)

    # join / reconnect

    def _start_join(self, now: float) -> None:
        self._close_dealer()
        self._dealer = self._ctx.socket(zmq.DEALER)
        self._dealer.setsockopt(zmq.LINGER, 0)
        # Our own routing id, 16 random bytes: libzmq's automatic ids are a
        # counter from an unseeded rand(), the same in every broker run, so
        # anyone could predict ours and take over a dropped session. A first
        # byte of 0 is reserved by ZMTP for libzmq's own ids.
        self._dealer.setsockopt(zmq.ROUTING_ID, b"z" + secrets.token_bytes(15))
        self._dealer.setsockopt(zmq.HEARTBEAT_IVL, ZMTP_HEARTBEAT_MS)
        self._dealer.setsockopt(zmq.HEARTBEAT_TIMEOUT, ZMTP_TIMEOUT_MS)
        if self._keys is not None:
            self._keys.apply(self._dealer)
        self._monitor = self._dealer.get_monitor_socket(_MONITORED)
        self._handshaken = False
        self._dealer.connect(self.endpoint)
        body: dict[str, Any] = {"type": "join", "name": self.name, "id": "join"}
        if self._token:
            body["token"] = self._token
        if self._has_seq:
            body["since"] = self.last_seq
        self._joining_since = now
        self._send(body)

    def _lost(self, why: str, now: float) -> None:
        if self.welcome is not None:
            self._emit(Status("disconnected", why))
        self.welcome = None
        self._joining_since = 0.0
        self._close_dealer()
        self._next_attempt = now + self._retry

    def _close_dealer(self) -> None:
        if self._monitor is not None:
            if self._dealer is not None and not self._dealer.closed:
                try:
                    self._dealer.disable_monitor()
                except zmq.ZMQError:
                    pass  # the context is going away: closing is all that is left
            self._monitor.close(linger=0)
            self._monitor = None
        if self._dealer is not None:
            self._dealer.close(linger=0)
            self._dealer = None

    def _drain_monitor(self) -> None:
        while self._monitor is not None:
            try:
                event = parse_monitor_message(self._monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            kind = event["event"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._handshaken = True
                self._handshake_failures = 0
            elif kind & (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                         | zmq.EVENT_HANDSHAKE_FAILED_AUTH):
                # A connection closed mid-handshake (NO_DETAIL) may be a busy
                # broker shedding connections: only a wrong key makes it
                # happen every time. A mechanism mismatch or a refused key
                # says so at once.
                self._handshake_failures += 1
                if (kind != zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
                        or (self._keys is not None
                            and self._handshake_failures >= HANDSHAKE_TRIES)):
                    self._handshake_failed(kind)
                    return
            elif kind == zmq.EVENT_DISCONNECTED and self._handshaken:
                # The broker's end closed (it died, or restarted): no need to
                # wait three heartbeats to say so. Rejoin at once.
                self._handshaken = False
                if self.welcome is not None and not self._joining_since:
                    self._lost("broker unreachable, retrying…", time.monotonic())
                    return

    def _handshake_failed(self, kind: int) -> None:
        if self._keys is None:
            why = "handshake failed: does the broker need --server-key and --key?"
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            why = "handshake failed: the broker does not accept your key"
        else:
            why = "handshake failed: wrong server key?"
        if not self._joined_future.done():
            # Retrying cannot fix a key: say so now rather than time out.
            self._joined_future.set_exception(HandshakeFailed(why))
            self._finish(why)

    def _on_welcome(self, reply: dict[str, Any]) -> None:
        welcome = Welcome(
            name=str(reply["name"]),
            addr=str(reply.get("addr", "")),
            room=str(reply.get("room", "lobby")),
            seq=int(reply["seq"]),
            members=parse_members(reply.get("members", [])),
            pub=str(reply["pub"]),
            heartbeat=float(reply.get("heartbeat", DEFAULT_HEARTBEAT)),
            token=str(reply["token"]),
            epoch=reply.get("epoch") if isinstance(reply.get("epoch"), str) else None,
            rate=_number(reply.get("rate")),
            burst=int(burst) if (burst := _number(reply.get("burst"))) is not None else None,
        )
        first = not self._was_joined
        self.welcome = welcome
        self.name = welcome.name
        self._token = welcome.token
        self._heartbeat = welcome.heartbeat
        self._joining_since = 0.0
        self._retry = RETRY_MIN
        self._last_heard = time.monotonic()
        self._early_ping = self._last_heard + EARLY_PING_SECONDS
        self.members = {m.name.casefold(): m for m in welcome.members}
        self._connect_sub(welcome.pub, batched=reply.get("batch") is True)
        restarted = welcome.epoch != self._epoch and self._epoch is not None
        if restarted or (self._has_seq and welcome.seq < self.last_seq):
            # The broker lost its history: old seqs mean nothing now.
            self._emit(Status("history_lost", "the broker restarted without its history",
                              welcome.seq))
            self.last_seq = 0
        elif not self._has_seq:
            self.last_seq = welcome.seq
        self._has_seq = True
        self._epoch = welcome.epoch
        self._gap = _Gap()
        if welcome.seq > self.last_seq:
            self._ask_history()
        self._was_joined = True
        self._emit(Status("connected" if first else "reconnected", welcome.addr))
        for pending in list(self._pending.values()):
            pending.sent_at = time.monotonic()
            self._send(pending.body)
        if not self._joined_future.done():
            self._joined_future.set_result(welcome)

    def _connect_sub(self, pub: str, batched: bool) -> None:
        endpoint = self._broadcast or resolve_pub(pub, self.endpoint)
        if self._sub is not None:
            self._sub.close(linger=0)
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        if self._keys is not None:
            self._keys.apply(self._sub)
        # A broker that coalesces events offers them as batches too: fewer
        # frames for it to send, and for us to receive.
        self._sub.setsockopt(zmq.SUBSCRIBE, BATCH_TOPIC if batched else ROOM_TOPIC)
        self._sub.setsockopt(zmq.SUBSCRIBE, BROKER_TOPIC)
        self._sub.connect(endpoint)

    # incoming

    def _on_reply(self, frames: list[bytes]) -> None:
        try:
            reply = decode_frame(frames[-1], 0)
        except ProtocolError as exc:
            log.warning("ignoring a bad frame from the broker: %s", exc)
            return
        kind = reply["type"]
        rid = reply.get("id")
        if rid == LEAVE_ACK:
            self._finish("left")
            return
        if kind == "welcome":
            if self._joining_since or self.welcome is None:
                self._on_welcome(reply)
            return
        if kind == "dm":
            self._emit(Direct(str(reply.get("from")), str(reply.get("text")),
                              float(reply.get("ts", 0.0))))
            return
        if kind == "bye":
            self._on_bye(str(reply.get("reason", "")), str(reply.get("detail", "")))
            return
        if kind == "error" and rid == "join":
            self._join_refused(reply)
            return
        if rid == "history-fill":
            if kind == "history":
                self._on_fill(reply)
            return
        if kind == "pong":
            head = reply.get("seq")
            if (type(head) is int and head > self.last_seq and self.welcome is not None
                    and not self._joining_since):
                self._ask_history()
        forgotten = kind == "pong" and reply.get("joined") is False
        if forgotten or (kind == "error" and reply.get("code") == "not_joined"):
            # The broker does not know us: it restarted and our DEALER
            # reconnected to it by itself. Keep the request, join again, and
            # it goes out after the welcome (its id keeps it from doubling).
            if self.welcome is not None and not self._joining_since:
                self._lost("the broker restarted, rejoining…", time.monotonic())
                self._next_attempt = time.monotonic()
            return
        pending = self._pending.pop(rid, None) if isinstance(rid, str) else None
        if pending is None:
            return  # a pong, or a late duplicate answer
        if kind == "error":
            pending.future.set_exception(
                RequestFailed.from_reply(str(reply.get("code")), str(reply.get("detail")))
            )
            return
        try:
            pending.future.set_result(pending.parse(reply))
        except (KeyError, TypeError, ValueError, ProtocolError) as exc:
            pending.future.set_exception(RequestFailed("bad_reply", str(exc)))

    def _join_refused(self, reply: dict[str, Any]) -> None:
        error = RequestFailed.from_reply(str(reply.get("code")), str(reply.get("detail")))
        if not self._joined_future.done():
            self._joined_future.set_exception(error)
            self._finish(str(error))
        else:
            # Our name was taken while we were away and our token no longer
            # counts (the broker restarted): nothing to resume.
            self._emit(Status("closed", str(error)))
            self._finish(str(error))

    def _on_bye(self, reason: str, detail: str) -> None:
        if reason == "shutdown":
            self._lost("broker shut down, retrying…", time.monotonic())
            return
        text = {"kicked": "kicked by the operator", "replaced": "replaced by a new connection"}
        message = text.get(reason, reason) + (f": {detail}" if detail else "")
        self._emit(Status("closed", message))
        self._finish(reason)

    def _on_broadcast(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            return
        try:
            body = decode_frame(frames[1], 0)
        except ProtocolError:
            return
        if frames[0] == BROKER_TOPIC:
            if body["type"] == "heartbeat":
                seqs = body.get("seqs")
                head = seqs.get(self.welcome.room if self.welcome else "lobby") if isinstance(
                    seqs, dict) else None
                if isinstance(head, int) and head > self.last_seq and self.welcome is not None:
                    self._ask_history()
            elif body["type"] == "shutdown":
                self._lost("broker shut down, retrying…", time.monotonic())
            return
        if self.welcome is None:
            return  # resumed after the next welcome, from history
        items = body.get("events") if frames[0] == BATCH_TOPIC else [body]
        if not isinstance(items, list):
            return
        for item in items:
            try:
                event = parse_event(item) if isinstance(item, dict) and "type" in item else None
            except ProtocolError:
                event = None
            if event is not None:
                self._accept(event)

    def _accept(self, event: Event) -> None:
        if event.seq <= self.last_seq:
            return
        if event.seq == self.last_seq + 1 and not self._gap.ahead:
            self._deliver(event)
            return
        self._gap.ahead[event.seq] = event
        self._ask_history()

    def _ask_history(self) -> None:
        if not self._gap.asked:
            self._gap.asked = True
            self._send({"type": "history", "after": self.last_seq, "limit": HISTORY_PAGE,
                        "id": "history-fill"})

    def _on_fill(self, reply: dict[str, Any]) -> None:
        self._gap.asked = False
        events = _events(reply)
        for event in events:
            if event.seq > self.last_seq:
                self._deliver(event)
        ahead = self._gap.ahead
        while ahead:
            first = min(ahead)
            if first <= self.last_seq:
                del ahead[first]
            elif first == self.last_seq + 1 or not events:
                self._deliver(ahead.pop(first))
            else:
                break
        if ahead or len(events) >= HISTORY_PAGE:
            self._ask_history()

    def _deliver(self, event: Event) -> None:
        # Only history fills deliver past a hole: what it lacks is gone for good.
        missed = event.seq - self.last_seq - 1
        if missed > 0:
            self._emit(Status("missed", f"{missed} events are no longer kept", missed))
        self.last_seq = event.seq
        if isinstance(event, Joined):
            self.members[event.name.casefold()] = Member(event.name, event.addr)
        elif isinstance(event, Left):
            self.members.pop(event.name.casefold(), None)
        self._emit(event)

    def _emit(self, item: Item) -> None:
        if self._on_item is not None:
            self._on_item(item)
        else:
            self._items.put(item)

    # commands from the public API, run in the I/O thread

    def _submit(self, pending: _Pending) -> None:
        if self._stop:
            pending.future.set_exception(ClientClosed(self._close_reason))
            return
        self._pending[pending.body["id"]] = pending
        if self.welcome is not None and not self._joining_since:
            pending.sent_at = time.monotonic()
            self._send(pending.body)

    def _leave_now(self, body: dict[str, Any]) -> None:
        if self._dealer is not None and self.welcome is not None and not self._joining_since:
            # `leave` has no reply, and a program that exits right after
            # leave() would drop it unsent. The broker answers a ping even
            # after the leave, in order: its pong says the leave was taken.
            self._send(body)
            self._send({"type": "ping", "id": LEAVE_ACK})
            self._leave_deadline = time.monotonic() + LEAVE_WAIT_SECONDS
            return
        self._finish("left")

    def _finish(self, reason: str) -> None:
        if self._stop:
            return
        self._stop = True
        self._close_reason = reason
        self._closed.set()
        error = ClientClosed(reason)
        for pending in self._pending.values():
            if not pending.future.done():
                pending.future.set_exception(error)
        self._pending.clear()
        if not self._joined_future.done():
            self._joined_future.set_exception(error)
        self._close_dealer()
        if self._on_item is None:
            self._items.put(None)


def check_endpoint(endpoint: str) -> tuple[str, int] | None:
    """The host and port of a ``tcp://HOST:PORT`` endpoint to connect to.

    ``ipc://PATH`` (a broker on the same machine) is accepted too: it has
    no host or port, so the result is None.

    Raises:
        ValueError: ``bad endpoint 'X': expected tcp://HOST:PORT`` for
            anything else (no scheme, no port, ``*``, another transport).
    """
    error = ValueError(f"bad endpoint {endpoint!r}: expected tcp://HOST:PORT")
    scheme, sep, rest = endpoint.partition("://")
    if scheme == "ipc" and sep and rest:
        return None
    host, colon, port = rest.rpartition(":")
    if scheme != "tcp" or not sep or not colon or not port.isascii() or not port.isdigit():
        raise error
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise error from None
    if not host or host == "*" or any(c in host for c in "[]/ ;") or not 0 < int(port) < 65536:
        raise error
    return host, int(port)


def resolve_endpoint(endpoint: str) -> None:
    """Check that the endpoint's host resolves (libzmq would retry forever).

    Raises:
        ValueError: a malformed endpoint (see ``check_endpoint``).
        OSError: ``cannot resolve host 'X': ...``.
    """
    address = check_endpoint(endpoint)
    if address is None:
        return
    host, port = address
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
        raise OSError(f"cannot resolve host {host!r}: {reason}") from None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return None
    return float(value)


def resolve_pub(pub: str, endpoint: str) -> str:
    """The SUB endpoint for a ``welcome`` ``pub``: a bare port uses our host."""
    if pub.isdigit():
        base = endpoint.rpartition(":")[0]
        return f"{base}:{pub}"
    return pub


def _ack_seq(reply: dict[str, Any]) -> int:
    return int(reply["seq"])


def _nothing(reply: dict[str, Any]) -> None:
    return None


def _events(reply: dict[str, Any]) -> list[Event]:
    items = reply.get("events")
    if not isinstance(items, list):
        raise ProtocolError("bad_request", "'events' must be a list")
    return [parse_event(item) for item in items if isinstance(item, dict) and "type" in item]


class AsyncClient:
    """The asyncio face of ``Client``: the same behaviour, awaitable.

    ::

        async with AsyncClient("tcp://127.0.0.1:5555", "bot") as chat:
            await chat.send("hello")
            async for event in chat.events():
                ...
    """

    def __init__(self, endpoint: str = "tcp://127.0.0.1:5555", name: str = "",
                 **options: Any) -> None:
        self._options = options
        self._endpoint = endpoint
        self._name = name
        self._queue: asyncio.Queue[Item | None] = asyncio.Queue()
        self._client: Client | None = None

    @property
    def client(self) -> Client:
        if self._client is None:
            raise ClientClosed("not connected")
        return self._client

    async def connect(self, timeout: float | None = None) -> Welcome:
        loop = asyncio.get_running_loop()

        def on_item(item: Item) -> None:
            loop.call_soon_threadsafe(self._queue.put_nowait, item)

        self._client = Client(self._endpoint, self._name, on_item=on_item, **self._options)
        return await loop.run_in_executor(None, self._client.connect, timeout)

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def send(self, text: str) -> int:
        return await asyncio.wrap_future(self.client.send_nowait(text))

    async def dm(self, to: str, text: str) -> None:
        await asyncio.wrap_future(self.client.dm_nowait(to, text))

    async def who(self) -> list[Member]:
        return await asyncio.to_thread(self.client.who)

    async def history(self, after: int = 0, limit: int | None = None) -> list[Event]:
        return await asyncio.to_thread(self.client.history, after, limit)

    async def next_event(self) -> Item | None:
        return await self._queue.get()

    async def events(self) -> AsyncIterator[Item]:
        while (item := await self._queue.get()) is not None:
            yield item
            if isinstance(item, Status) and item.state == "closed":
                return

    async def leave(self, reason: str | None = None) -> None:
        await asyncio.to_thread(self.client.leave, reason)
        self._queue.put_nowait(None)

    async def close(self) -> None:
        if self._client is not None:
            await asyncio.to_thread(self._client.close)
        self._queue.put_nowait(None)

