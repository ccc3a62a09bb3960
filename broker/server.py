"""The broker's event loop: a thin shell around ``zchat.state.Broker``.

One thread, one ``zmq.Poller`` (epoll underneath) over three sockets and a
self-pipe::

    ROUTER  input      client DEALERs -> requests; replies go back here
    PUB     broadcast  room events and heartbeats to every client SUB
    PAIR    control    operator commands from ``zchat-admin``
    pipe    wake-up    written by the SIGINT/SIGTERM handler

Each wake-up drains what is ready without blocking, decodes each frame,
asks the state what to send and sends it. The poll timeout is the time to
the state's next deadline (heartbeat, expiry). A peer's bad frame gets an
``error`` reply and a rate-limited warning in the log; nothing a peer sends
can stop the loop.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import resource
import secrets
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import msgpack
import zmq

from zchat.errors import ProtocolError
from zchat.history import History, HistoryError, open_history
from zchat.keys import load_server_keys
from zchat.protocol import (
    BROKER_TOPIC,
    ErrorCode,
    batch_topic,
    decode_frame,
    encode,
    encode_batch,
    named_room,
    parse_request,
    request_id,
)
from zchat.state import Broker, Deliver, Outgoing, Reply

from .auth import CurveGate
from .config import Config
from .console import Console
from .frames import frame_fd, frame_property, last_endpoint
from .guard import FD_RESERVE, Guard, Kind, seed_routing_ids
from .relaylink import RelayLink, is_relayed
from .screen import Screen

__all__ = ["Endpoints", "Server", "raise_fd_limit"]

log = logging.getLogger("zchat.broker")

DRAIN_BATCH = 4096  # frames taken from one socket before looking at the others
RELEASE_EVERY = 256  # frames between group commits (and sends) within a pass
CLOSE_LINGER_MS = 1000  # time to flush `bye` and `shutdown` at exit
MAX_SUBSCRIPTION = 4096  # bytes of one frame a subscriber may send (a topic, or a handshake)
MAX_CONTROL_FRAME = 64 * 1024  # bytes of one operator command
OVERSLEEP = 0.5  # seconds a poll may return late before the loop counts as having lagged
# The history writer (commits aside: --fsync) takes the GIL back after each
# SQLite call of a commit while the loop decodes the next pass. With the
# loop busy, each take waits for CPython's switch interval (5 ms by
# default), and the pass's acks and events wait for the commit. 0.5 ms
# lets the writer in sooner; W1, three runs each way, median p99: S = 10 at
# 20,000/s 27 -> 10 ms, S = 100 at 10,000/s 19 -> 15 ms and at 20,000/s
# 67 -> 46 ms (but S = 10 at 32,000/s, failing either way, 164 -> 236 ms).
GIL_SWITCH = 0.0005
HANDSHAKE_TIMEOUT = 5.0  # seconds a connection may take to finish its ZMTP handshake
OWN_FDS = 64  # descriptors the broker itself holds (sockets, pipes, the database, logs)
FDS_WANTED = 65_536  # two connections per client, for 10,000 clients and more
# Connections waiting to be accepted (the kernel caps it at net.core.somaxconn).
# libzmq asks for 100: when thousands of clients connect at once (a join storm,
# everyone back after a restart) the rest of the SYNs are dropped and retried
# 1, 3, 7 s later, which the clients see as a slow broker.
ACCEPT_BACKLOG = 4096

_NOBLOCK = int(zmq.NOBLOCK)
_POLLIN = int(zmq.POLLIN)
_MORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
_send = zmq.backend.Socket.send  # the compiled send, under pyzmq's Python-level wrapper


@dataclass(frozen=True, slots=True)
class Endpoints:
    """The endpoints the broker actually bound (port 0 resolved)."""

    input: str
    broadcast: str
    control: str


class _Throttle:
    """Log a kind of warning at most once per ``interval`` seconds, with a count."""

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last.get(key, -self.interval) < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last[key] = now
        skipped = self._suppressed.pop(key, 0)
        if skipped:
            message += " (and %d more like it)"
            args = (*args, skipped)
        log.warning(message, *args)

    def next_deadline(self) -> float | None:
        """When the oldest suppressed count is due to be told (monotonic clock)."""
        if not self._suppressed:
            return None
        return min(self._last[key] for key in self._suppressed) + self.interval

    def flush(self) -> None:
        """Tell the counts of warnings suppressed for a full interval."""
        now = time.monotonic()
        for key in [k for k in self._suppressed if now - self._last[k] >= self.interval]:
            self._last[key] = now
            log.warning("... and %d more like the last %s warning in %g s",
                        self._suppressed.pop(key), key, self.interval)


def raise_fd_limit(wanted: int = FDS_WANTED) -> int:
    """Raise the open-file limit as far as allowed; return the new soft limit.

    Every client holds two connections (DEALER and SUB), so 10,000 clients
    need over 20,000 descriptors. The soft limit goes up to the hard limit;
    a privileged broker (root in a container) may lift the hard limit too,
    up to ``wanted`` and the kernel's ``fs.nr_open``.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else max(hard, wanted)
    try:
        target = min(target, int(Path("/proc/sys/fs/nr_open").read_text()))
    except (OSError, ValueError):
        pass
    for limit in (target, hard):
        if limit == resource.RLIM_INFINITY or limit <= soft:
            continue
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, max(limit, hard)))
            return limit
        except (ValueError, OSError):
            continue
    if soft < 4 * 1024:
        log.warning("the open-file limit is %d: at most about %d clients fit", soft, soft // 2)
    return soft


def make_cloak(key: bytes) -> Callable[[str], str]:
    """A stable stand-in for an address, like IRC host cloaks."""

    def cloak(addr: str) -> str:
        digest = hmac.new(key, addr.encode(), hashlib.sha256).hexdigest()
        return f"cloak-{digest[:10]}"

    return cloak


class Server:
    """Binds the broker's sockets and runs its loop until told to stop."""

    def __init__(
        self, config: Config, *, context: zmq.Context[Any] | None = None,
        screen: TextIO | None = None,
    ) -> None:
        self.config = config
        self._own_context = context is None
        self.context = context or zmq.Context(io_threads=config.io_threads)
        self._screen = Screen(None if config.quiet else (screen or sys.stdout))
        self.console: Console | None = None
        self._throttle = _Throttle()
        self._stopping = False
        self.endpoints: Endpoints | None = None
        self.state: Broker | None = None
        self._packer = msgpack.Packer(use_bin_type=True)
        self._outbox: list[Outgoing] = []  # frames of the pass being decoded
        self._held: list[Outgoing] = []  # frames of the pass being committed
        self.auth: CurveGate | None = None
        self.failure: str | None = None  # why the loop stopped, if not asked to
        self._batch: dict[str, list[bytes]] = {}  # packed events by room, per pass
        # Whether the last drain emptied the input: until it has, a member's
        # ping may be waiting behind others' frames, and nobody is expired.
        self._caught_up = True
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self.guard: Guard | None = None
        self._internal_errors = 0
        self.relays: RelayLink | None = None  # --relay-bind: relays speak for their clients

    # ------------------------------------------------------------------ setup

    def bind(self) -> Endpoints:
        """Open the history, bind the three sockets; return the endpoints bound.

        Raises:
            HistoryError: the history database cannot be opened (or is in use).
            OSError: an endpoint cannot be bound.
        """
        cfg = self.config
        ctx = self.context
        # The store first: a second broker on the same database stops here,
        # before it takes any port.
        keys = (load_server_keys(cfg.secret_key, cfg.authorized_keys)
                if cfg.secret_key and cfg.authorized_keys else None)
        history = open_history(cfg.db, cfg.limits.history, cfg.retention, cfg.fsync)
        now = time.time()
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        capacity = 0 if soft == resource.RLIM_INFINITY else max(16, soft - FD_RESERVE - OWN_FDS)
        self.guard = guard = Guard(cfg.connections, capacity, now)
        seed_routing_ids()  # before the ROUTER exists: it draws its first id at birth
        self.router = ctx.socket(zmq.ROUTER)
        # A reply to a peer that is gone raises instead of vanishing silently,
        # so it can be counted; it never blocks (NOBLOCK at every send).
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        max_frame = cfg.limits.max_frame
        # Frames a little over the limit get a `too_large` reply; far over it,
        # libzmq drops the connection before the frame fills our memory.
        self.router.setsockopt(zmq.MAXMSGSIZE, max(4 * max_frame, 1 << 20) if max_frame else -1)
        self.router.setsockopt(zmq.RCVHWM, 10_000)
        self.router.setsockopt(zmq.SNDHWM, 10_000)
        self.pub = ctx.socket(zmq.PUB)
        # A subscriber that stops reading loses frames past this many; it sees
        # the seq gap when it reads again and fetches the rest with `history`.
        # One that stops for long is cut by the guard (its bytes, not this count).
        self.pub.setsockopt(zmq.SNDHWM, 10_000)
        # A subscriber only ever sends short topics: anything longer, handshake
        # frames included, drops its connection inside libzmq.
        self.pub.setsockopt(zmq.MAXMSGSIZE, MAX_SUBSCRIPTION)
        if keys is not None:
            # The ZAP socket is polled by our own loop: still one thread.
            self.auth = CurveGate(ctx, keys.authorized, self._throttle.warning)
            keys.apply(self.router)
            keys.apply(self.pub)
        self.control = ctx.socket(zmq.PAIR)
        self.control.setsockopt(zmq.MAXMSGSIZE, MAX_CONTROL_FRAME)
        # A connection that has not finished its ZMTP handshake in this time
        # is dropped by libzmq (its default is 30 s): raw TCP connections that
        # say nothing, to any port, do not pile up.
        timeout = cfg.connections.join_timeout
        handshake_ms = int(1000 * min(HANDSHAKE_TIMEOUT, timeout or HANDSHAKE_TIMEOUT))
        for sock in (self.router, self.pub, self.control):
            sock.setsockopt(zmq.LINGER, CLOSE_LINGER_MS)
            sock.setsockopt(zmq.HANDSHAKE_IVL, handshake_ms)
        for sock in (self.router, self.pub):
            sock.setsockopt(zmq.BACKLOG, ACCEPT_BACKLOG)
        self._monitors = [guard.watch(self.router, Kind.INPUT, ctx),
                          guard.watch(self.pub, Kind.BROADCAST, ctx),
                          guard.watch(self.control, Kind.CONTROL, ctx)]
        try:
            # Before any TCP peer can take an automatic id: the guard learns
            # where libzmq's counter starts, to tell its ids from forged ones.
            guard.probe_routing_ids(self.router, ctx)
            self.router.bind(cfg.input)
            self.pub.bind(cfg.broadcast)
            self.control.bind(cfg.control)
        except zmq.ZMQError as exc:
            history.close()
            self.close()
            raise OSError(f"cannot bind: {exc}") from exc
        self.endpoints = Endpoints(
            input=last_endpoint(self.router),
            broadcast=last_endpoint(self.pub),
            control=last_endpoint(self.control),
        )
        # After the endpoints are read: the PUB's inproc feed is bound last.
        if cfg.relay is not None:
            self.relays = RelayLink(cfg.relay, cfg.heartbeat, max_frame, advertised)
            try:
                self.relays.bind(ctx, self.pub)
            except Exception:
                history.close()
                self.close()
                raise
        cloak = make_cloak(secrets.token_bytes(16)) if cfg.hide_addresses else None
        self.state = Broker(
            heartbeat=cfg.heartbeat,
            limits=cfg.limits,
            pub=cfg.advertise or advertised(cfg.broadcast, self.endpoints.broadcast),
            cloak=cloak,
            now=now,
            batch=cfg.coalesce > 0,
            # One event for a pass's joins into a room, not one each: every
            # event is a send to every subscriber (PROTOCOL.md, big rooms).
            coalesce_joins=True,
            history=history,
        )
        self.console = Console(self.state, self._stats)
        return self.endpoints

    def _bind_state(self) -> Broker:
        self.bind()
        if self.state is None:  # pragma: no cover - bind() always sets it
            raise RuntimeError("bind() set no state")
        return self.state

    def install_signal_handlers(self) -> None:
        """SIGINT and SIGTERM stop the loop cleanly (also as PID 1)."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        self.stop()

    def stop(self) -> None:
        """Ask the loop to stop (safe from a signal handler or another thread)."""
        self._stopping = True
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    # ------------------------------------------------------------------- loop

    def run(self) -> None:
        """Serve until ``stop()``; then say goodbye to everyone and close."""
        state = self.state if self.state is not None else self._bind_state()
        sys.setswitchinterval(GIL_SWITCH)
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.control, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        guard = self.guard
        monitors = self._monitors
        for monitor in monitors:
            poller.register(monitor, zmq.POLLIN)
        zap = self.auth.socket if self.auth is not None else None
        if zap is not None:
            poller.register(zap, zmq.POLLIN)
        # Readable when a commit begun aside returned.
        committed = state.store.fileno() if state.store.commits_aside else None
        if committed is not None:
            poller.register(committed, zmq.POLLIN)
        relays = self.relays
        for sock in relays.sockets if relays is not None else ():
            poller.register(sock, zmq.POLLIN)
        try:
            self._queue(state.tick(time.time()))
            self._before_sleep(state)
            while not self._stopping:
                deadline = state.next_deadline()
                if guard is not None:
                    deadline = min(deadline, guard.next_deadline())
                timeout = max(0.0, deadline - time.time())
                told = self._throttle.next_deadline()
                if told is not None:
                    timeout = min(timeout, max(0.0, told - time.monotonic()))
                asleep = time.monotonic()
                ready = dict(poller.poll(int(timeout * 1000) + 1))
                # Woken much later than asked: the process did not run (stopped,
                # a paused machine), and members' pings may still be on their way.
                woke = time.monotonic()
                overslept = woke - asleep - timeout > OVERSLEEP
                if any(monitor in ready for monitor in monitors):
                    # Connections first: a closed one must be known before a
                    # newcomer reusing its routing id is read.
                    self._drain_monitors()
                # Not ready: nothing waits (zmq_poll reads the socket's own
                # state), so a drain that stopped at DRAIN_BATCH exactly
                # cannot leave expiry switched off, nor the loop spinning.
                self._caught_up = self._drain_input(state) if self.router in ready else True
                if self.control in ready:
                    self._drain_control(state)
                if self.auth is not None and zap in ready:
                    self.auth.answer()
                relayed_all = relays is None or relays.serve(ready, state, self._queue,
                                                              time.time())
                now = time.time()
                # The same when the pass itself took that long: the process was
                # stopped between the poll and here, and the pings that came
                # meanwhile are read next pass, after this one's expiry.
                overslept = overslept or time.monotonic() - woke > OVERSLEEP
                if overslept or not self._caught_up or not relayed_all:
                    # Liveness never punishes a client for the broker's own
                    # backlog: while input is still queued (a join storm), or
                    # after the loop did not run, a silent-looking member's
                    # ping may be waiting, so nobody expires until the loop
                    # has caught up and a heartbeat interval has passed.
                    state.lagged(now)
                    if guard is not None:
                        guard.ledger.lagged(now)  # a newcomer's join may be queued too
                if now >= state.next_deadline():
                    self._queue(state.tick(now))
                if guard is not None and now >= guard.next_deadline():
                    guard.tick(now, state.is_member)
                self._throttle.flush()
                self._before_sleep(state)
            self._queue(state.shutdown(time.time()))
            self._before_sleep(state)
            self._finish_commit(state.store)
        finally:
            self._screen.flush(wait=2.0)
            try:
                state.store.close()
            except HistoryError as exc:
                if self.failure is None:
                    log.critical("%s", exc)
                    self.failure = str(exc)
            self.close()

    def _drain_monitors(self) -> None:
        if self.guard is not None:
            now = time.time()
            for monitor in self._monitors:
                self.guard.drain(monitor, now, self._connection_gone)

    def _connection_gone(self, kind: Kind, peer: bytes) -> None:
        """A member's connection closed: its routing id no longer speaks for it."""
        if self.state is not None and kind is Kind.INPUT:
            self._queue(self.state.disconnected(peer, time.time()))

    def _queue(self, out: list[Outgoing]) -> None:
        """Queue frames; ``_before_sleep`` sends them once their events are durable."""
        self._outbox.extend(out)

    def _before_sleep(self, state: Broker) -> None:
        """What must happen before the loop polls again, in this order.

        1. Finish the previous pass's commit (begun on the writer thread at
           the end of that pass; the loop decoded this pass meanwhile), then
           send that pass's replies and publish its events and its
           coalesced batches: only now, because nothing of a pass is
           published or acked before its commit returned, so no client ever
           sees a seq that a crash could take back. A failed commit stops
           the broker, and then only the goodbyes go out.
        2. End the pass in the state: the joins it coalesced become one
           event per room, before the commit that keeps it and the sends
           whose welcomes count it.
        3. Commit this pass (one group commit). If the commit waits on the
           disk (``--fsync``) and input is waiting, begin it on the writer
           thread and hold the pass's frames until it returns (step 1 of
           the next pass; the poll wakes when it does); if not, commit here
           and send at once. A pass that wrote nothing
           sends at once, still after the previous pass's frames: a pong's
           seqs must not overtake the events they count.
        4. Write the operator's screen: last, it is for people and may lag.

        Also run every ``RELEASE_EVERY`` frames of a long drain, so that a
        flood does not hold everyone's replies back. Nothing else commits.
        """
        store = state.store
        self._finish_commit(store)
        self._queue(state.end_pass(time.time()))
        if self._outbox:
            if self.failure is None:
                try:
                    events = self.router.get(zmq.EVENTS)
                    if store.commits_aside and isinstance(events, int) and events & _POLLIN:
                        store.begin_commit()  # input waits: decode it meanwhile
                    else:
                        # Nothing to overlap, or nothing to wait for (no
                        # fsync): handing over would only add thread
                        # wake-ups and GIL hand-overs to every reply's
                        # latency, and CPU.
                        store.commit()
                except HistoryError as exc:
                    self._store_failed(exc)
            out, self._outbox = self._outbox, []
            if store.committing:
                self._held = out
            else:
                self._release(out)
        self._screen.flush()

    def _finish_commit(self, store: History) -> None:
        """Wait for the commit under way, then send the frames it held back."""
        if store.committing:
            try:
                store.finish_commit()
            except HistoryError as exc:
                self._store_failed(exc)
        if self._held:
            out, self._held = self._held, []
            self._release(out)

    def _store_failed(self, exc: HistoryError) -> None:
        # Acking what is not stored would be a lie: stop, loudly.
        if self.failure is None:
            log.critical("%s; stopping without acking the last events", exc)
            self.failure = str(exc)
        self.stop()

    def _release(self, out: list[Outgoing]) -> None:
        """Send one pass's frames, its batches after them: its events are durable."""
        if self.failure is not None:
            # The store failed: nothing naming a seq goes out, only the goodbyes.
            out = [o for o in out if o.body["type"] in ("bye", "shutdown")]
        self._send_now(out)
        self._flush_batch()

    def _flush_batch(self) -> None:
        """Publish each room's events coalesced so far as one frame on its batch topic.

        Under load one drain pass relays many events, and libzmq's I/O thread
        pays per frame per subscriber: one frame for many events is cheaper.
        At low load a pass holds one event, so nothing waits for company.
        """
        for room, packed in self._batch.items():
            _send(self.pub, batch_topic(room), _MORE_NOBLOCK)
            _send(self.pub, encode_batch(packed, room), _NOBLOCK)
        self._batch.clear()

    def _drain_input(self, state: Broker) -> bool:
        """Handle what the input holds, up to ``DRAIN_BATCH`` frames; True if emptied.

        The hot path is a member's ``message``: its payload is decoded and
        handed to ``Broker.message`` as the map it is, without a typed
        request; anything else takes the general path (``parse_request``,
        ``Broker.handle``). Frames are received as ``zmq.Frame``s and their
        ``more`` read from the frame: a ``getsockopt(RCVMORE)`` per frame
        costs more than the receive itself.
        """
        router = self.router
        recv = router.recv
        max_frame = self.config.limits.max_frame
        guard = self.guard
        ledger = guard.ledger if guard is not None else None
        is_member = state.is_member
        message = state.message if self.auth is None else None
        clock = time.time
        relays = self.relays
        for count in range(1, DRAIN_BATCH + 1):
            if count % RELEASE_EVERY == 0:
                self._before_sleep(state)
                self._drain_monitors()
            try:
                # The routing id as bytes (a Frame would cost more than the
                # receive). A ROUTER always hands over the id with at least
                # one frame after it, so the id's ``more`` need not be read.
                peer = recv(_NOBLOCK)
            except zmq.Again:
                return True
            # A payload stays a Frame: its ``more`` is read from it, and a
            # stranger's join reads the properties libzmq attached to it
            # (address, descriptor, key).
            payload: zmq.Frame = recv(_NOBLOCK, copy=False)
            if (ledger is not None and ledger.severed and peer in ledger.severed) or (
                    relays is not None and is_relayed(peer)):
                # Queued before its connection was cut; or a direct peer under
                # a relayed client's id, which only the relay link may speak for.
                while payload.more:
                    payload = recv(_NOBLOCK, copy=False)
                continue
            stranger = not is_member(peer)
            size = len(payload)
            extra = 0
            last = payload
            while last.more:
                last = recv(_NOBLOCK, copy=False)
                size += len(last)
                extra += 1
            now = clock()
            fd = -1
            if stranger:
                fd = frame_fd(payload)
                if guard is not None and fd >= 0 and not self._admit_stranger(
                        guard, peer, fd, size, now):
                    continue
            elif ledger is not None:
                ledger.received(peer, size)
            body: dict[str, Any] | None = None
            try:
                if extra:
                    raise ProtocolError(
                        ErrorCode.BAD_FRAME, f"expected 1 payload frame, got {extra + 1}"
                    )
                body = decode_frame(payload.buffer, max_frame)
                if message is not None and body["type"] == "message" and not stranger:
                    try:
                        said = message(peer, body, now)
                    except Exception:
                        self._internal_error(state, peer, body, request_id(body))
                        continue
                    if said is not None:
                        self._outbox += said
                        continue
                request = parse_request(body)
            except ProtocolError as exc:
                # A frame that decoded but is no valid request still gets its
                # id back, and the room it named.
                rid = request_id(body) if body is not None else None
                room = named_room(body) if body is not None else None
                self._warn_peer(state, peer, exc)
                self._queue([state.error(peer, exc.code, exc.detail, rid, room)])
                continue
            addr, key = "", None
            if stranger and body["type"] == "join":
                addr = _peer_address(payload)
            if self.auth is not None:
                # Our ZAP handler made the client's public key its User-Id.
                key = frame_property(payload, "User-Id")
            try:
                self._queue(state.handle(peer, request, now, addr, key))
            except Exception:
                self._internal_error(state, peer, body, request.id)
                continue
            if stranger and ledger is not None and fd >= 0 and state.is_member(peer):
                ledger.bind(fd, peer)
        return False

    def _internal_error(self, state: Broker, peer: bytes, body: dict[str, Any],
                        rid: str | None) -> None:
        """A bug, not the peer's fault: it costs this request, never the broker."""
        self._internal_errors += 1
        if self._internal_errors <= 10 or self._internal_errors % 1000 == 0:
            log.exception("internal error handling %s from %s (%d so far)",
                          body["type"], state.name_of(peer) or "a stranger",
                          self._internal_errors)
        self._queue([state.error(peer, ErrorCode.INTERNAL,
                                "the broker failed on this request; see its log", rid)])

    def _admit_stranger(self, guard: Guard, peer: bytes, fd: int, size: int,
                        now: float) -> bool:
        """Whether a request from a connection without a member may be handled."""
        if fd not in guard.ledger or not guard.plausible_routing_id(peer):
            # Its ACCEPTED may still wait on the monitor (a long drain pass).
            self._drain_monitors()
        if not guard.plausible_routing_id(peer):
            # An id in libzmq's own form that libzmq never made: a peer is
            # aiming at the ids libzmq will make next. Nothing it says is read.
            guard.cut(guard.ledger.forged(fd))
            return False
        cut = guard.ledger.stranger_request(fd, size, now)
        if cut is not None:
            guard.cut(cut)
            return False
        return True

    def _warn_peer(self, state: Broker, peer: bytes, exc: ProtocolError) -> None:
        self._throttle.warning(exc.code, "%s sent a bad frame: %s", self._who(peer), exc)

    def _send_now(self, out: list[Outgoing]) -> None:
        """Send one pass's frames: its PUB events and batches first, then its DEALER frames.

        A reply goes out after the events of its pass, batches included, so
        a client that has an ack, a welcome or an ``entered`` finds the
        events they imply already sent, whichever topic it takes (with
        batches on by default, the library takes the batch topic).
        """
        # Plain int flags, the backend's send (pyzmq's Python-level wrapper
        # only adds draft-socket options) and one reused Packer: per frame,
        # Python overhead costs more than the sends themselves. An event
        # comes packed from the state (the bytes the store keeps).
        pack = self._packer.pack
        pub = self.pub
        screen = self._screen if self._screen.on else None
        coalesce = self.config.coalesce
        batch = self._batch
        direct = False
        for item in out:
            if isinstance(item, Reply):
                direct = True
                continue
            if isinstance(item, Deliver):  # a private room's event: sent below
                direct = True
                if screen is not None:
                    screen.add(item.body, item.sender_addr)
                continue
            packed = item.packed
            if packed is None:
                packed = pack(item.body)
            topic = item.topic
            if topic != BROKER_TOPIC:  # a public room's event
                if screen is not None:
                    screen.add(item.body, item.sender_addr)
                if coalesce:
                    room = item.body["room"]
                    events = batch.get(room)
                    if events is None:
                        events = batch[room] = []
                    events.append(packed)
                    if len(events) >= coalesce:
                        self._flush_batch()
            elif batch:
                self._flush_batch()  # heartbeats must not overtake events
            _send(pub, topic, _MORE_NOBLOCK)
            _send(pub, packed, _NOBLOCK)
        self._flush_batch()
        if not direct:
            return
        reply = self._reply
        for item in out:
            if isinstance(item, Reply):
                body = item.body
                if body["type"] == "error" and body["code"] == ErrorCode.RATE_LIMITED:
                    self._throttle.warning("rate", "rate limited %s", self._who(item.peer))
                reply(item.peer, body, pack(body))
            elif isinstance(item, Deliver):  # a private room's event, members only
                packed = item.packed if item.packed is not None else pack(item.body)
                for peer in item.peers:
                    reply(peer, item.body, packed)

    def _reply(self, peer: bytes, body: dict[str, Any], packed: bytes) -> None:
        """One packed frame to one peer's DEALER, never blocking."""
        if self.relays is not None and is_relayed(peer):
            state = self.state
            self.relays.reply(peer, str(body.get("type")), packed,
                              state is not None and state.is_member(peer))
            return
        router = self.router
        try:
            # With ROUTER_MANDATORY only the first frame can fail; the
            # second then goes out whole with it.
            _send(router, peer, _MORE_NOBLOCK)
        except zmq.ZMQError as exc:
            # EHOSTUNREACH: the peer is gone; EAGAIN: it reads too slowly.
            # Either way only that peer misses this reply.
            self._throttle.warning(
                "unreachable", "reply %s to %s dropped: %s", body.get("type"), self._who(peer),
                exc.strerror,
            )
            return
        _send(router, packed, _NOBLOCK)
        guard = self.guard
        if guard is not None:
            fd = guard.ledger.sent(peer, len(packed))
            if fd is not None:
                guard.check_sent(fd, time.time())

    def _who(self, peer: bytes) -> str:
        """A peer as the operator knows it: the member's name, else its routing id."""
        name = self.state.name_of(peer) if self.state is not None else None
        return name if name is not None else f"peer {peer.hex()}"

    # ---------------------------------------------------------------- control

    def _drain_control(self, state: Broker) -> None:
        while True:
            try:
                frame = self.control.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if self.guard is not None:
                self.guard.ledger.control_command(time.time())
            console = self.console if self.console is not None else Console(state, self._stats)
            self.console = console
            try:
                answer = console.answer(frame, time.time())
            except Exception:  # the operator's tool, not a peer: log, keep serving
                log.exception("control command failed")
                reply = encode({"type": "error", "code": ErrorCode.INTERNAL, "detail": "see log"})
            else:
                reply = answer.reply
                self._queue(answer.out)
                if answer.stop:
                    self.stop()
            try:
                self.control.send(reply, zmq.NOBLOCK)
            except zmq.Again:
                log.warning("operator went away before the reply")

    def _stats(self) -> dict[str, Any]:
        """What ``stats`` adds to the state's counters: endpoints, pid, connections."""
        stats: dict[str, Any] = asdict(self.endpoints) if self.endpoints is not None else {}
        stats["pid"] = os.getpid()
        if self.guard is not None:
            stats.update(self.guard.ledger.statistics())
        if self.relays is not None:
            stats.update(self.relays.statistics())
        return stats

    @property
    def screen(self) -> TextIO | None:
        """Where chat lines go (None: quiet, or the screen went away)."""
        return self._screen.out

    # ---------------------------------------------------------------- closing

    def close(self) -> None:
        if self.relays is not None:
            self.relays.close()
            self.relays = None
        if self.auth is not None:
            self.auth.close()
        if self.guard is not None:
            self.guard.close()
        for name in ("router", "pub", "control"):
            sock = getattr(self, name, None)
            if sock is not None and not sock.closed:
                sock.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1
        if self._own_context:
            self.context.term()


def _peer_address(frame: zmq.Frame) -> str:
    return frame_property(frame, "Peer-Address") or "local"


def advertised(configured: str, bound: str) -> str:
    """The broadcast endpoint to tell clients: the port alone for wildcards.

    A broker bound to ``tcp://*:5556`` cannot know which of its addresses a
    client reached, so it says ``"5556"`` and the client uses the host it
    connected to. A concrete host or an ``ipc://`` path is told in full.
    """
    if not bound.startswith("tcp://"):
        return bound
    host = configured.removeprefix("tcp://").rpartition(":")[0]
    if host in ("*", "0.0.0.0", "[::]", "::", ""):
        return bound.rpartition(":")[2]
    return bound
