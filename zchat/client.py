"""The zchat client library: ``Client`` (threads) and ``AsyncClient`` (asyncio).

The protocol logic is ``zchat.session.Session`` (sans-I/O); this module
holds its two shells, which own the ZeroMQ sockets (a DEALER for requests,
a SUB for room events, through ``_Sockets``) and a clock, feed the session
frames, monitor events and the time, and carry out the actions it returns.
``Client`` runs one I/O thread; its public methods are thread-safe and pass
their commands to it, as data, through a queue and a wake-up pipe.
``AsyncClient`` runs one task on the caller's event loop. Together with the
session they do what a good chat client must do by itself, so that a bot
is a few lines:

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
  same ``id`` after a reconnect: the broker's dedupe makes that at most once;
- lives in several rooms (``enter``, ``part``, ``rooms=`` at start): every
  event carries its room, each room's events come in order and gap-filled,
  and after a reconnect the client is in the same rooms again;
- fails over: ``endpoint`` may list several brokers, comma-separated; a
  lost connection moves on to the next one, resuming with the token.

Both shells share the session-backed read-only API (``_SessionView``) and
the request bodies (``_enter_body`` and the like); what differs is only how they wait.

Typical use::

    with Client("tcp://127.0.0.1:5555", "bot", rooms=("lobby", "dev")) as chat:
        chat.send("hello", room="dev")
        for event in chat.events():
            if isinstance(event, Message) and event.text == "!ping":
                chat.send("pong", room=event.room)
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
from collections.abc import AsyncIterator, Callable, Container, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeVar

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from zchat.errors import BrokerUnreachable, ClientClosed
from zchat.keys import ClientKeys
from zchat.protocol import (
    ROOM,
    ClientStatus,
    Entered,
    Event,
    Member,
    RoomInfo,
    Welcome,
    encode,
)
from zchat.session import (
    Action,
    Closed,
    CloseDealer,
    CloseSub,
    Emit,
    HandshakeFault,
    Item,
    OpenDealer,
    OpenSub,
    Reject,
    RequestKind,
    Resolve,
    RoomState,
    Send,
    Session,
    Status,
    Subscribe,
    Unsubscribe,
    Welcomed,
    resolve_pub,
    split_endpoints,
)

__all__ = ["DEFAULT_ENDPOINT", "AsyncClient", "Client", "Item", "RoomState", "Status",
           "Welcome", "check_endpoint", "resolve_endpoint", "resolve_pub"]

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"

log = logging.getLogger("zchat.client")

T = TypeVar("T")

# ZMTP heartbeats on the DEALER: libzmq's I/O thread answers them even while
# the broker's Python loop is busy, so silence means the peer is gone (a
# host that vanished without closing its connection), noticed in seconds.
ZMTP_HEARTBEAT_MS, ZMTP_TIMEOUT_MS = 1000, 3000
_FAULTS: dict[int, HandshakeFault] = {
    int(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL): HandshakeFault.NO_DETAIL,
    int(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL): HandshakeFault.PROTOCOL,
    int(zmq.EVENT_HANDSHAKE_FAILED_AUTH): HandshakeFault.AUTH,
}
DRAIN_BATCH = 10_000  # frames read from one socket before looking at the others
_MONITORED = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
for _event in _FAULTS:
    _MONITORED |= _event


# Commands from the public API to the I/O thread: data, not code.


@dataclass(frozen=True, slots=True)
class _Submit:
    rid: str
    kind: RequestKind
    body: dict[str, Any]
    future: concurrent.futures.Future[Any]


@dataclass(frozen=True, slots=True)
class _Leave:
    reason: str | None


@dataclass(frozen=True, slots=True)
class _Close:
    pass


_Command: TypeAlias = _Submit | _Leave | _Close


class _Sockets:
    """One client's DEALER (with its monitor) and SUB: the actions that touch sockets.

    Both shells carry the session's socket actions through this, and read
    what the sockets say back into the session with ``drain``.
    """

    def __init__(self, ctx: zmq.Context[Any], keys: ClientKeys | None,
                 routing_id: Callable[[], bytes] | None = None) -> None:
        self.ctx = ctx
        self.keys = keys
        self.routing_id = routing_id
        self.dealer: zmq.Socket[Any] | None = None
        self.monitor: zmq.Socket[Any] | None = None
        self.sub: zmq.Socket[Any] | None = None

    def carry(self, action: Action) -> bool:
        """Do ``action`` if it is about sockets; False if it is not."""
        match action:
            case Send(body):
                if self.dealer is not None:
                    try:
                        self.dealer.send(encode(body), zmq.NOBLOCK)
                    except zmq.Again:
                        pass  # the broker is not there; resent after the next welcome
            case OpenDealer(endpoint):
                self.open_dealer(endpoint)
            case CloseDealer():
                self.close_dealer()
            case OpenSub(endpoint, topics):
                self.open_sub(endpoint, topics)
            case CloseSub():
                self.close_sub()
            case Subscribe(topic):
                if self.sub is not None:
                    self.sub.setsockopt(zmq.SUBSCRIBE, topic)
            case Unsubscribe(topic):
                if self.sub is not None:
                    self.sub.setsockopt(zmq.UNSUBSCRIBE, topic)
            case _:
                return False
        return True

    def open(self) -> list[zmq.Socket[Any]]:
        """The sockets open now, to poll."""
        return [s for s in (self.dealer, self.monitor, self.sub) if s is not None and not s.closed]

    def drain(self, ready: Container[Any], session: Session, clock: Callable[[], float],
              apply: Callable[[list[Action]], None]) -> None:
        """Feed the session what the ready sockets hold, applying its actions as they come.

        Each socket is read without blocking, at most ``DRAIN_BATCH`` frames
        a turn; an action may close a socket mid-way (then it is left).
        """
        if self.dealer is not None and self.dealer in ready:
            self._drain(self.dealer, session.reply_received, clock, apply)
        if self.monitor is not None and self.monitor in ready:
            self._drain_monitor(session, clock, apply)
        if self.sub is not None and self.sub in ready:
            self._drain(self.sub, session.broadcast_received, clock, apply)

    @staticmethod
    def _drain(sock: zmq.Socket[Any], take: Callable[[list[bytes], float], list[Action]],
               clock: Callable[[], float], apply: Callable[[list[Action]], None]) -> None:
        for _ in range(DRAIN_BATCH):
            if sock.closed:
                return
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            apply(take(frames, clock()))

    def _drain_monitor(self, session: Session, clock: Callable[[], float],
                       apply: Callable[[list[Action]], None]) -> None:
        while self.monitor is not None:
            try:
                event = parse_monitor_message(self.monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            kind = event["event"]
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                session.handshake_succeeded()
            elif kind in _FAULTS:
                apply(session.handshake_failed(_FAULTS[kind], clock()))
            elif kind == zmq.EVENT_DISCONNECTED:
                apply(session.disconnected(clock()))

    def open_dealer(self, endpoint: str) -> None:
        self.close_dealer()
        self.dealer = dealer = self.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        # Our own routing id, 16 random bytes: libzmq's automatic ids are a
        # counter from an unseeded rand(), the same in every broker run, so
        # anyone could predict ours and take over a dropped session. A first
        # byte of 0 is reserved by ZMTP for libzmq's own ids.
        # An embedder (zchat-web through its relay) may name each DEALER
        # itself, to know which connection is whose.
        dealer.setsockopt(zmq.ROUTING_ID, self.routing_id() if self.routing_id is not None
                          else b"z" + secrets.token_bytes(15))
        dealer.setsockopt(zmq.HEARTBEAT_IVL, ZMTP_HEARTBEAT_MS)
        dealer.setsockopt(zmq.HEARTBEAT_TIMEOUT, ZMTP_TIMEOUT_MS)
        if self.keys is not None:
            self.keys.apply(dealer)
        self.monitor = dealer.get_monitor_socket(_MONITORED)
        dealer.connect(endpoint)

    def close_dealer(self) -> None:
        if self.monitor is not None:
            if self.dealer is not None and not self.dealer.closed:
                try:
                    self.dealer.disable_monitor()
                except zmq.ZMQError:
                    pass  # the context is going away: closing is all that is left
            self.monitor.close(linger=0)
            self.monitor = None
        if self.dealer is not None:
            self.dealer.close(linger=0)
            self.dealer = None

    def close_sub(self) -> None:
        if self.sub is not None:
            self.sub.close(linger=0)
            self.sub = None

    def open_sub(self, endpoint: str, topics: tuple[bytes, ...]) -> None:
        self.close_sub()
        self.sub = sub = self.ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        if self.keys is not None:
            self.keys.apply(sub)
        for topic in topics:
            sub.setsockopt(zmq.SUBSCRIBE, topic)
        sub.connect(endpoint)

    def close(self) -> None:
        self.close_dealer()
        self.close_sub()


class _SessionView:
    """What both shells tell of their session: read-only, safe from any thread.

    The session replaces (never mutates) what these return, except
    ``members``, which is its own dict: copy it before iterating from
    another thread.
    """

    _session: Session
    _ids: Iterator[str]
    endpoint: str
    timeout: float

    def _start_session(self, endpoint: str, name: str, broadcast: str | None, timeout: float,
                       token: str | None, since: int | None, encrypted: bool,
                       rooms: Iterable[str]) -> None:
        """Check the arguments both shells take alike and make their ``Session``."""
        endpoint, name = _arguments(endpoint, name)
        if not name:
            raise ValueError("a name is needed to join")
        _check_endpoints(endpoint)
        self.endpoint = endpoint
        self.timeout = timeout
        prefix = secrets.token_hex(4)
        self._session = Session(name, endpoint, broadcast=broadcast, token=token, since=since,
                                encrypted=encrypted, id_prefix=f"{prefix}-s", rooms=rooms)
        self._ids = (f"{prefix}-{n}" for n in itertools.count(1))

    @property
    def name(self) -> str:
        """Our name, as the broker's last ``welcome`` spelled it."""
        return self._session.name

    @property
    def welcome(self) -> Welcome | None:
        """The current join's ``welcome``; None while (re)connecting."""
        return self._session.welcome

    @property
    def members(self) -> dict[str, Member]:
        """Who is in the room ``welcome`` describes (lobby), keyed by ``fold_name``."""
        return self._session.members

    @property
    def last_seq(self) -> int:
        """The seq of the last event delivered of the room ``welcome`` describes (lobby)."""
        return self._session.last_seq

    @property
    def entered_rooms(self) -> tuple[str, ...]:
        """The rooms this client is in, in order of entry."""
        return self._session.entered_rooms

    def room_state(self, room: str) -> RoomState | None:
        """What we know of ``room`` (topic, members, ops, modes, last seq); None if not in it."""
        return self._session.room_state(room)


# The request bodies both shells send (the session adds ``type`` and ``id``).


def _enter_body(room: str, private: bool) -> dict[str, Any]:
    return {"room": room, "private": True} if private else {"room": room}


def _part_body(room: str, reason: str | None) -> dict[str, Any]:
    return {"room": room, "reason": reason} if reason else {"room": room}


def _history_body(after: int, room: str, limit: int | None) -> dict[str, Any]:
    body: dict[str, Any] = {"after": after, "room": room}
    if limit is not None:
        body["limit"] = limit
    return body


def _mode_body(room: str, private: bool | None, moderated: bool | None,
               topic_ops: bool | None) -> dict[str, Any]:
    flags = {"private": private, "moderated": moderated, "topic_ops": topic_ops}
    return {"room": room, **{k: v for k, v in flags.items() if v is not None}}


def _kick_body(room: str, name: str, reason: str | None) -> dict[str, Any]:
    body = {"room": room, "name": name}
    return {**body, "reason": reason} if reason else body


def _v1_who(room: object, timeout: float | None) -> tuple[str, float | None]:
    """``who(timeout)`` as version 1 callers wrote it still works (room was not there)."""
    if room is None or isinstance(room, int | float):
        return ROOM, room
    return str(room), timeout


def _v1_history(room: object, limit: object,
                timeout: float | None) -> tuple[str, int | None, float | None]:
    """``history(after, limit, timeout)``, version 1's order, still works."""
    if isinstance(room, int):
        return ROOM, room, limit if isinstance(limit, int | float) else timeout
    return str(room), limit if isinstance(limit, int) else None, timeout


def _arguments(endpoint: str, name: str) -> tuple[str, str]:
    """``(endpoint, name)`` from either order of the first two arguments.

    Version 1 code calls ``Client(endpoint, name)``; the rooms API reads
    ``Client(name, endpoint=...)``. An endpoint has a scheme (``tcp://``),
    a name cannot look like one to us here, so both orders work.
    """
    if "://" not in endpoint and ("://" in name or not name):
        return name or DEFAULT_ENDPOINT, endpoint
    return endpoint, name


def _check_endpoints(endpoint: str) -> None:
    for each in split_endpoints(endpoint) or [endpoint]:
        check_endpoint(each)


def _resolve_endpoints(endpoint: str) -> None:
    for each in split_endpoints(endpoint):
        resolve_endpoint(each)


class Client(_SessionView):
    """A zchat client for bots, tests and tools (thread-safe).

    Args:
        endpoint: the broker's input endpoint (``tcp://host:5555``), or
            several, comma-separated, to fail over between.
        name: the name to join with (the two may also come in the order
            ``Client(name, endpoint)``).
        broadcast: the broadcast endpoint, if known; by default taken from
            ``welcome`` (a bare port means the host of ``endpoint``).
        timeout: default seconds for calls that wait on the broker.
        token: a token from an earlier ``welcome``, to take the name over.
        since: the last seq of lobby already seen (events after it are delivered).
        context: a ``zmq.Context``; by default the process-wide one.
        on_item: called in the I/O thread with every event instead of
            queueing it for ``events()`` (used by ``AsyncClient``).
        keys: CURVE keys (``zchat.keys.load_client_keys``) for a broker that
            encrypts; both sockets use them.
        rooms: the rooms to enter when joining (``#`` optional).
        routing_id: makes the routing id of each new DEALER (default: 16
            random bytes); an embedder that runs a relay in-process uses it
            to tell the relay whose connection is whose.
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        name: str = "",
        *,
        broadcast: str | None = None,
        timeout: float = 10.0,
        token: str | None = None,
        since: int | None = None,
        context: zmq.Context[Any] | None = None,
        on_item: Callable[[Item], None] | None = None,
        keys: ClientKeys | None = None,
        rooms: Iterable[str] = (ROOM,),
        routing_id: Callable[[], bytes] | None = None,
    ) -> None:
        self._start_session(endpoint, name, broadcast, timeout, token, since,
                            keys is not None, rooms)
        name = self._session.name
        self._ctx = context or zmq.Context.instance()
        self._items: queue.Queue[Item | None] = queue.Queue()
        self._on_item = on_item
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._futures: dict[str, concurrent.futures.Future[Any]] = {}  # the I/O thread's
        self._closed = threading.Event()
        self._close_reason = "closed"
        self._joined_future: concurrent.futures.Future[Welcome] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, name=f"zchat-{name}", daemon=True)
        self._started = False
        self._sockets = _Sockets(self._ctx, keys, routing_id)

    @property
    def _dealer(self) -> zmq.Socket[Any] | None:
        return self._sockets.dealer  # for tests that look at the socket itself

    # ------------------------------------------------------------ public API

    def connect(self, timeout: float | None = None, *, give_up: bool = True) -> Welcome:
        """Start the I/O thread and join; return the ``welcome``.

        ``welcome.rooms`` are the rooms entered, ``welcome.refused`` those
        that could not be. With ``give_up=False`` a timeout raises
        ``BrokerUnreachable`` but the client goes on trying (with backoff):
        call ``connect`` again to wait more, ``close()`` to stop. A program
        that waits for a broker to come up needs no retry loop of its own.

        Raises:
            NameTaken, RequestFailed: the broker refused the join.
            HandshakeFailed: a broker answered but the handshake failed
                (wrong server key, key not accepted, encryption expected).
            BrokerUnreachable: no welcome within ``timeout``, or the host
                name does not resolve (said at once).
        """
        if not self._started:
            try:
                _resolve_endpoints(self.endpoint)
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
            if give_up or self._joined_future.done():
                self.close()
            raise

    def __enter__(self) -> Client:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def enter(self, room: str, private: bool = False, timeout: float | None = None) -> Entered:
        """Enter ``room`` (created if new: then ``private`` makes it invite-only).

        Its events follow from the ``entered`` seq on. Raises
        ``RequestFailed`` (``bad_room``, ``forbidden``, ``too_many_rooms``).
        """
        entered: Entered = self._wait(
            self._request(RequestKind.ENTER, _enter_body(room, private)), timeout)
        return entered

    def part(self, room: str, reason: str | None = None, timeout: float | None = None) -> None:
        """Leave ``room`` (the others see ``left`` with reason ``part``)."""
        self._wait(self._request(RequestKind.PART, _part_body(room, reason)), timeout)

    def send_nowait(self, text: str, room: str = ROOM) -> concurrent.futures.Future[int]:
        """Queue ``text`` for ``room``; the future gives its seq once acked.

        The message is kept, across reconnects, until the broker acks it.
        """
        return self._request(RequestKind.MESSAGE, {"text": text, "room": room})

    def send(self, text: str, room: str = ROOM, timeout: float | None = None) -> int:
        """Say ``text`` in ``room`` and return its seq once the broker acked it.

        On timeout ``BrokerUnreachable`` is raised, but the message stays
        queued and is still delivered (once) if the broker comes back.
        """
        return self._wait(self.send_nowait(text, room), timeout)

    def dm_nowait(self, to: str, text: str) -> concurrent.futures.Future[None]:
        """Queue a private message to ``to``."""
        return self._request(RequestKind.DM, {"to": to, "text": text})

    def dm(self, to: str, text: str, timeout: float | None = None) -> None:
        """Send a private message; ``NoSuchUser`` if nobody is called ``to``."""
        self._wait(self.dm_nowait(to, text), timeout)

    def who(self, room: str = ROOM, timeout: float | None = None) -> list[Member]:
        """Everyone in ``room`` (every page of the broker's answer)."""
        room, timeout = _v1_who(room, timeout)
        members: list[Member] = self._wait(
            self._request(RequestKind.WHO, {"room": room}), timeout)
        return members

    def history(self, after: int = 0, room: str = ROOM, limit: int | None = None,
                timeout: float | None = None) -> list[Event]:
        """``room``'s events with seq above ``after`` that the broker still keeps (one page)."""
        room, limit, timeout = _v1_history(room, limit, timeout)
        events: list[Event] = self._wait(
            self._request(RequestKind.HISTORY, _history_body(after, room, limit)), timeout)
        return events

    def rooms(self, timeout: float | None = None) -> list[RoomInfo]:
        """The public rooms, and the private ones this client is in."""
        rooms: list[RoomInfo] = self._wait(self._request(RequestKind.ROOMS, {}), timeout)
        return rooms

    def topic(self, room: str, text: str, timeout: float | None = None) -> None:
        """Set ``room``'s topic (an operator's right unless the room says otherwise)."""
        self._wait(self._request(RequestKind.TOPIC, {"room": room, "text": text}), timeout)

    def mode(self, room: str, *, private: bool | None = None, moderated: bool | None = None,
             topic_ops: bool | None = None, timeout: float | None = None) -> None:
        """Change ``room``'s settings (None: leave as is); operators only."""
        body = _mode_body(room, private, moderated, topic_ops)
        self._wait(self._request(RequestKind.MODE, body), timeout)

    def op(self, room: str, name: str, timeout: float | None = None) -> None:
        """Make ``name`` an operator of ``room``."""
        self._wait(self._request(RequestKind.OP, {"room": room, "name": name}), timeout)

    def deop(self, room: str, name: str, timeout: float | None = None) -> None:
        """Take ``name``'s operator status in ``room`` away."""
        self._wait(self._request(RequestKind.DEOP, {"room": room, "name": name}), timeout)

    def kick(self, room: str, name: str, reason: str | None = None,
             timeout: float | None = None) -> None:
        """Put ``name`` out of ``room`` (it may enter again)."""
        self._wait(self._request(RequestKind.KICK, _kick_body(room, name, reason)), timeout)

    def ban(self, room: str, name: str, timeout: float | None = None) -> None:
        """Keep ``name`` out of ``room`` (put out if in it)."""
        self._wait(self._request(RequestKind.BAN, {"room": room, "name": name}), timeout)

    def unban(self, room: str, name: str, timeout: float | None = None) -> None:
        """Let ``name`` into ``room`` again."""
        self._wait(self._request(RequestKind.UNBAN, {"room": room, "name": name}), timeout)

    def invite(self, room: str, name: str, timeout: float | None = None) -> None:
        """Invite ``name`` (it gets ``Invited``; into a private room, once)."""
        self._wait(self._request(RequestKind.INVITE, {"room": room, "name": name}), timeout)

    def ping(self, timeout: float | None = None) -> float:
        """Round trip to the broker; return the broker's clock."""
        broker_time: float = self._wait(self._request(RequestKind.PING, {}), timeout)
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
        """Leave the broker (announced in every room) and close.

        Returns once the broker has taken the leave (2 s at most), so a
        program may exit right after it.
        """
        self._call(_Leave(reason))
        self._stop_thread()

    def close(self) -> None:
        """Stop without a ``leave``: the broker will time the client out."""
        self._call(_Close())
        self._stop_thread()

    # ------------------------------------------------------ calling the thread

    def _call(self, command: _Command) -> None:
        self._commands.put(command)
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # already awake, or closing

    def _request(self, kind: RequestKind, body: dict[str, Any]) -> concurrent.futures.Future[Any]:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        if self._closed.is_set():
            fut.set_exception(ClientClosed(self._close_reason))
            return fut
        self._call(_Submit(next(self._ids), kind, body, fut))
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
        elif not self._started and not self._closed.is_set():
            # Never connected: no thread will close the wake-up pair.
            self._wake_r.close()
            self._wake_w.close()
        self._closed.set()

    # --------------------------------------------------------- the I/O thread

    def _run(self) -> None:
        session = self._session
        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        try:
            self._apply(session.start(time.monotonic()))
            while not session.closed:
                for sock in self._sockets.open():
                    if sock not in poller:
                        poller.register(sock, zmq.POLLIN)
                timeout = min(max(0.0, session.deadline() - time.monotonic()), 60.0)
                ready = dict(poller.poll(int(timeout * 1000) + 1))
                if self._wake_r.fileno() in ready:
                    self._drain_commands()
                self._sockets.drain(ready, session, time.monotonic, self._apply)
                self._apply(session.tick(time.monotonic()))
                for polled, _ in list(poller.sockets):
                    if isinstance(polled, zmq.Socket) and polled.closed:
                        poller.unregister(polled)
        except Exception:  # never leave callers waiting forever on a dead thread
            log.exception("zchat client thread failed")
            self._apply(session.close("internal error"))
        finally:
            self._sockets.close()
            self._wake_r.close()
            self._wake_w.close()
            if not self._closed.is_set():
                self._on_closed(Closed("internal error", ClientClosed("internal error")))

    def _drain_commands(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            now = time.monotonic()
            match command:
                case _Submit(rid, kind, body, future):
                    self._futures[rid] = future
                    self._apply(self._session.submit(rid, kind, body, now))
                case _Leave(reason):
                    self._apply(self._session.leave(reason, now))
                case _Close():
                    self._apply(self._session.close())

    def _apply(self, actions: list[Action]) -> None:
        """Carry out what the session said, in its order."""
        for action in actions:
            if self._sockets.carry(action):
                continue
            match action:
                case Emit(item):
                    self._emit(item)
                case Resolve(rid, value):
                    future = self._futures.pop(rid, None)
                    if future is not None and not future.done():
                        future.set_result(value)
                case Reject(rid, error):
                    future = self._futures.pop(rid, None)
                    if future is not None and not future.done():
                        future.set_exception(error)
                case Welcomed(welcome):
                    if not self._joined_future.done():
                        self._joined_future.set_result(welcome)
                case Closed():
                    self._on_closed(action)

    def _emit(self, item: Item) -> None:
        if self._on_item is not None:
            self._on_item(item)
        else:
            self._items.put(item)

    def _on_closed(self, closed: Closed) -> None:
        self._close_reason = closed.reason
        self._closed.set()
        error = ClientClosed(closed.reason)
        for future in self._futures.values():
            if not future.done():
                future.set_exception(error)
        self._futures.clear()
        if not self._joined_future.done():
            self._joined_future.set_exception(closed.error)
        self._sockets.close_dealer()
        if self._on_item is None:
            self._items.put(None)


def check_endpoint(endpoint: str) -> tuple[str, int] | None:
    """The host and port of a ``tcp://HOST:PORT`` endpoint to connect to.

    ``ipc://PATH`` (a broker on the same machine) and ``inproc://NAME`` (a
    relay in the same process, on the same context) are accepted too: they
    have no host or port, so the result is None.

    Raises:
        ValueError: ``bad endpoint 'X': expected tcp://HOST:PORT`` for
            anything else (no scheme, no port, ``*``, another transport).
    """
    error = ValueError(f"bad endpoint {endpoint!r}: expected tcp://HOST:PORT")
    scheme, sep, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc") and sep and rest:
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
    """Check that each endpoint's host resolves (libzmq would retry forever).

    ``endpoint`` may list several, comma-separated, as ``Client`` takes
    them for fail-over: each must be well formed and resolve.

    Raises:
        ValueError: a malformed endpoint (see ``check_endpoint``).
        OSError: ``cannot resolve host 'X': ...``.
    """
    parts = split_endpoints(endpoint)
    if not parts:
        check_endpoint(endpoint)  # raises: an empty list names no broker
    for part in parts:
        address = check_endpoint(part)
        if address is None:
            continue
        host, port = address
        try:
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            reason = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
            raise OSError(f"cannot resolve host {host!r}: {reason}") from None



class AsyncClient(_SessionView):
    """The asyncio shell over the same ``Session``: the same behaviour, awaitable.

    One task of the running loop owns the sockets (polled with
    ``zmq.asyncio.Poller``) and the loop's clock; the coroutines below hand
    their commands straight to the session (one thread: no queue needed) and
    wake the task so that it sees new deadlines. Options and method names
    are ``Client``'s.

    ::

        async with AsyncClient("tcp://127.0.0.1:5555", "bot") as chat:
            await chat.send("hello")
            async for event in chat.events():
                ...
    """

    def __init__(
        self,
        endpoint: str = DEFAULT_ENDPOINT,
        name: str = "",
        *,
        broadcast: str | None = None,
        timeout: float = 10.0,
        token: str | None = None,
        since: int | None = None,
        context: zmq.Context[Any] | None = None,
        keys: ClientKeys | None = None,
        rooms: Iterable[str] = (ROOM,),
        routing_id: Callable[[], bytes] | None = None,
    ) -> None:
        self._start_session(endpoint, name, broadcast, timeout, token, since,
                            keys is not None, rooms)
        self._sockets = _Sockets(context or zmq.Context.instance(), keys, routing_id)
        self._items: asyncio.Queue[Item | None] = asyncio.Queue()
        self._futures: dict[str, asyncio.Future[Any]] = {}
        self._joined: asyncio.Future[Welcome] | None = None
        self._task: asyncio.Task[None] | None = None
        # A wake-up pair in the poller, as in the thread shell: a poll is
        # never cancelled, so no readiness of a socket is lost with it.
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None

    @property
    def connected(self) -> bool:
        return self.welcome is not None and not self._session.closed

    async def connect(self, timeout: float | None = None, *, give_up: bool = True) -> Welcome:
        """Join; see ``Client.connect`` (the same errors, the same ``give_up``)."""
        loop = asyncio.get_running_loop()
        if self._task is None:
            try:
                # getaddrinfo blocks: not on the loop.
                await loop.run_in_executor(None, _resolve_endpoints, self.endpoint)
            except OSError as exc:
                self._session.close()
                raise BrokerUnreachable(str(exc)) from None
            self._joined = loop.create_future()
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
            self._task = loop.create_task(self._run(), name=f"zchat-{self.name}")
        if self._joined is None:  # pragma: no cover - set with the task
            raise ClientClosed("not connected")
        seconds = self.timeout if timeout is None else timeout
        try:
            return await asyncio.wait_for(asyncio.shield(self._joined), seconds)
        except TimeoutError:
            if give_up:
                await self.close()
            raise BrokerUnreachable(
                f"no answer from {self.endpoint} within {seconds:g}s") from None
        except BrokerUnreachable:
            await self.close()
            raise

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def enter(self, room: str, private: bool = False,
                    timeout: float | None = None) -> Entered:
        """Enter ``room``; see ``Client.enter``."""
        entered: Entered = await self._request(RequestKind.ENTER, _enter_body(room, private),
                                               timeout)
        return entered

    async def part(self, room: str, reason: str | None = None,
                   timeout: float | None = None) -> None:
        await self._request(RequestKind.PART, _part_body(room, reason), timeout)

    async def send(self, text: str, room: str = ROOM, timeout: float | None = None) -> int:
        """Say ``text`` in ``room``; its seq once acked (kept across reconnects until then).

        Without ``timeout`` it waits for the ack however long it takes.
        """
        seq: int = await self._request(RequestKind.MESSAGE, {"text": text, "room": room},
                                       timeout)
        return seq

    async def dm(self, to: str, text: str) -> None:
        await self._request(RequestKind.DM, {"to": to, "text": text}, None)

    async def who(self, room: str = ROOM, timeout: float | None = None) -> list[Member]:
        room, timeout = _v1_who(room, timeout)
        members: list[Member] = await self._request(RequestKind.WHO, {"room": room}, timeout)
        return members

    async def history(self, after: int = 0, room: str = ROOM, limit: int | None = None,
                      timeout: float | None = None) -> list[Event]:
        room, limit, timeout = _v1_history(room, limit, timeout)
        events: list[Event] = await self._request(
            RequestKind.HISTORY, _history_body(after, room, limit), timeout)
        return events

    async def rooms(self, timeout: float | None = None) -> list[RoomInfo]:
        rooms: list[RoomInfo] = await self._request(RequestKind.ROOMS, {}, timeout)
        return rooms

    async def topic(self, room: str, text: str, timeout: float | None = None) -> None:
        await self._request(RequestKind.TOPIC, {"room": room, "text": text}, timeout)

    async def mode(self, room: str, *, private: bool | None = None,
                   moderated: bool | None = None, topic_ops: bool | None = None,
                   timeout: float | None = None) -> None:
        await self._request(RequestKind.MODE, _mode_body(room, private, moderated, topic_ops),
                            timeout)

    async def op(self, room: str, name: str, timeout: float | None = None) -> None:
        await self._request(RequestKind.OP, {"room": room, "name": name}, timeout)

    async def deop(self, room: str, name: str, timeout: float | None = None) -> None:
        await self._request(RequestKind.DEOP, {"room": room, "name": name}, timeout)

    async def kick(self, room: str, name: str, reason: str | None = None,
                   timeout: float | None = None) -> None:
        await self._request(RequestKind.KICK, _kick_body(room, name, reason), timeout)

    async def ban(self, room: str, name: str, timeout: float | None = None) -> None:
        await self._request(RequestKind.BAN, {"room": room, "name": name}, timeout)

    async def unban(self, room: str, name: str, timeout: float | None = None) -> None:
        await self._request(RequestKind.UNBAN, {"room": room, "name": name}, timeout)

    async def invite(self, room: str, name: str, timeout: float | None = None) -> None:
        await self._request(RequestKind.INVITE, {"room": room, "name": name}, timeout)

    async def ping(self, timeout: float | None = None) -> float:
        ts: float = await self._request(RequestKind.PING, {}, timeout)
        return ts

    async def next_event(self) -> Item | None:
        """The next item; None once closed."""
        return await self._items.get()

    async def events(self) -> AsyncIterator[Item]:
        """Items until closed."""
        while (item := await self._items.get()) is not None:
            yield item
            if isinstance(item, Status) and item.state == ClientStatus.CLOSED:
                return

    async def leave(self, reason: str | None = None) -> None:
        """Leave the room and close, once the broker took it (2 s at most)."""
        self._apply(self._session.leave(reason, asyncio.get_running_loop().time()))
        await self._stopped()

    async def close(self) -> None:
        """Stop without a ``leave``."""
        self._apply(self._session.close())
        await self._stopped()

    def _wake(self) -> None:
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass  # already awake (full), or closed

    async def _stopped(self) -> None:
        self._wake()
        if self._task is not None and not self._task.done():
            await asyncio.wait({self._task}, timeout=5.0)
        self._items.put_nowait(None)

    async def _request(self, kind: RequestKind, body: dict[str, Any],
                       timeout: float | None) -> Any:
        if self._task is None:
            raise ClientClosed("not connected")
        loop = asyncio.get_running_loop()
        rid = next(self._ids)
        future: asyncio.Future[Any] = loop.create_future()
        self._futures[rid] = future
        self._apply(self._session.submit(rid, kind, body, loop.time()))
        self._wake()  # a new deadline: its resend
        if kind in (RequestKind.MESSAGE, RequestKind.DM) and timeout is None:
            return await future  # kept until acked, however long
        seconds = self.timeout if timeout is None else timeout
        try:
            # Shielded: a message that timed out stays queued, as Client's does.
            return await asyncio.wait_for(asyncio.shield(future), seconds)
        except TimeoutError:
            raise BrokerUnreachable(
                f"no answer from {self.endpoint} within {seconds:g}s") from None

    async def _run(self) -> None:
        session = self._session
        loop = asyncio.get_running_loop()
        poller = zmq.asyncio.Poller()
        polled: list[zmq.Socket[Any]] = []
        wake_r = self._wake_r
        if wake_r is not None:
            # By number, not the socket object: a poll cancelled with the task
            # unwatches it after the finally below closed the socket.
            poller.register(wake_r.fileno(), zmq.POLLIN)
        try:
            self._apply(session.start(loop.time()))
            while not session.closed:
                sockets = self._sockets.open()
                if sockets != polled:
                    for sock in polled:
                        poller.unregister(sock)
                    for sock in sockets:
                        poller.register(sock, zmq.POLLIN)
                    polled = sockets
                timeout = min(max(0.0, session.deadline() - loop.time()), 60.0)
                await poller.poll(int(timeout * 1000) + 1)
                if wake_r is not None:
                    try:
                        while wake_r.recv(4096):
                            pass
                    except OSError:
                        pass
                # Every socket, not only those the poll named: reads do not
                # block, and libzmq's descriptors only signal edges.
                self._sockets.drain(sockets, session, loop.time, self._apply)
                self._apply(session.tick(loop.time()))
        except Exception:  # never leave callers waiting forever on a dead task
            log.exception("zchat client task failed")
            self._apply(session.close("internal error"))
        finally:
            self._sockets.close()
            if not session.closed:  # cancelled
                self._apply(session.close())
            for pair_end in (self._wake_r, self._wake_w):
                if pair_end is not None:
                    pair_end.close()
            self._wake_r = self._wake_w = None

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            if self._sockets.carry(action):
                continue
            match action:
                case Emit(item):
                    self._items.put_nowait(item)
                case Resolve(rid, value):
                    future = self._futures.pop(rid, None)
                    if future is not None and not future.done():
                        future.set_result(value)
                case Reject(rid, error):
                    future = self._futures.pop(rid, None)
                    if future is not None and not future.done():
                        future.set_exception(error)
                case Welcomed(welcome):
                    if self._joined is not None and not self._joined.done():
                        self._joined.set_result(welcome)
                case Closed(reason, error):
                    for future in self._futures.values():
                        if not future.done():
                            future.set_exception(ClientClosed(reason))
                    self._futures.clear()
                    if self._joined is not None and not self._joined.done():
                        self._joined.set_exception(error)
                        self._joined.exception()  # said to connect(), if anyone waits
                    self._sockets.close_dealer()
                    self._items.put_nowait(None)
