"""A relay: clients connect to it as to a broker; it carries them to the broker.

One broker (the single writer of every room's seq) holds about 10,000
clients here. Relays in front of it hold the clients' connections and
fan its events out, so the broker writes each event once per relay::

    clients' DEALERs -> ROUTER input  --[R client meta payload]-->  broker --relay-bind
    clients' SUBs    <- XPUB broadcast <== libzmq proxy ==  XSUB <- broker --relay-broadcast

To a client a relay is a broker: the same two sockets, the same protocol
(``welcome``'s ``pub`` names the relay's broadcast endpoint). The two paths:

- **Broadcast**: ``zmq.proxy_steerable(xsub, xpub)`` in a thread. Events go
  down and subscriptions go up in libzmq's C code, no Python per event; the
  XPUB passes on a topic only when its first subscriber wants it, so the
  broker sends a relay only what its clients want.
- **Requests**: this loop reads each client's frame and sends it upstream
  with the client's routing id and a meta frame (its IP address, its CURVE
  key under CURVE), which the broker trusts because the link is CURVE and
  the relay's key is one it admits (``broker/relaylink.py``). Replies come
  back with a flag saying whether the client is joined; a ``welcome`` gets
  the relay's own ``pub``.

The relay keeps the broker's connection bounds on its own clients (the
``Guard`` of ``broker/guard.py``: join timeout, bytes per connection,
connections per address, forged routing ids, subscription size, stalled
subscribers) and terminates their CURVE with the broker's own options. A
client's connection that closes is told upstream (``G``), so the broker
treats it as a dropped connection. When the broker goes away the relay cuts
its clients' connections, as the broker's death would have, so they resume
(through another relay when they know one); it reconnects upstream by
itself, and a broker restarted on the same endpoints is found again.

Embedding: ``Relay(config, context=ctx, address_of=hook)``; bind the input
to an ``inproc://`` endpoint of ``ctx`` and connect DEALERs to it. Such
connections have no IP address, so ``hook(routing_id)`` supplies it (a
browser gateway knows its WebSocket peer's address); it is never asked
about a TCP connection, whose address the kernel gives. ``forget(rid)``
tells the broker such a client is gone (libzmq reports no inproc close).

Defines: ``RelayConfig``, ``RelayEndpoints``, ``Relay``.
"""

from __future__ import annotations

import logging
import os
import resource
import secrets
import struct
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack
import zmq

from zchat.errors import ProtocolError
from zchat.keys import load_client_keys, load_server_keys
from zchat.protocol import DEFAULT_MAX_FRAME, ErrorCode, decode_frame, encode

from .auth import CurveGate
from .config import DEFAULT_BROADCAST, DEFAULT_INPUT, ConfigError, check_endpoint
from .frames import frame_fd, frame_property, last_endpoint
from .guard import FD_RESERVE, ConnectionLimits, Guard, Kind, seed_routing_ids, shutdown_fd
from .relaylink import GONE, HELLO, LINK_VERSION, REQUEST, pack_meta
from .server import advertised  # the broker's rule for what `pub` says

__all__ = ["Relay", "RelayConfig", "RelayEndpoints"]

log = logging.getLogger("zchat.relay")

DRAIN_BATCH: Final = 4096  # frames from one socket before looking at the others
MAX_SUBSCRIPTION: Final = 4096  # bytes of one frame a subscriber may send (as the broker)
HANDSHAKE_TIMEOUT_MS: Final = 5000
UPSTREAM_HEARTBEAT_MS: Final = 1000  # the broker's death is known in 3 s at worst
UPSTREAM_TIMEOUT_MS: Final = 3000
UPSTREAM_HWM: Final = 1_000_000  # the link carries every client's requests
FANOUT_HWM: Final = 10_000  # per client subscriber, as the broker's PUB
PENDING_FDS: Final = 100_000  # strangers' descriptors remembered until their welcome
OWN_FDS: Final = 64

_NOBLOCK = int(zmq.NOBLOCK)
_MORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
_RCVMORE = int(zmq.RCVMORE)
_UPSTREAM_EVENTS = int(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
                       | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
_EVENT_HEAD = struct.Struct("=HI")


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """Everything ``zchat-relay`` can be told.

    Attributes:
        upstream: the broker's relay endpoint (its ``--relay-bind``).
        upstream_key: the broker's public ``.key`` file (the link is CURVE).
        relay_key: this relay's ``.key_secret`` file; its public half must be
            in the broker's ``--relay-keys``.
        input, broadcast: what clients connect to, as on a broker.
        advertise: the broadcast endpoint told in ``welcome`` (default: the
            bound port alone when bound to a wildcard, as the broker does).
        upstream_broadcast: the broker's relay broadcast endpoint (default:
            what the broker says in its hello, a bare port meaning the
            upstream's host).
        secret_key, authorized_keys: CURVE for clients, as on the broker.
        connections: the bounds on client connections (as the broker's).
        max_frame: bytes of one client frame (libzmq drops a connection
            sending four times this); the broker answers ``too_large``.
    """

    upstream: str
    upstream_key: str
    relay_key: str
    input: str = DEFAULT_INPUT
    broadcast: str = DEFAULT_BROADCAST
    advertise: str | None = None
    upstream_broadcast: str | None = None
    secret_key: str | None = None
    authorized_keys: str | None = None
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)
    max_frame: int = DEFAULT_MAX_FRAME
    io_threads: int = 1

    def __post_init__(self) -> None:
        if (self.secret_key is None) != (self.authorized_keys is None):
            raise ConfigError("--secret-key and --authorized-keys go together")
        check_endpoint("upstream", self.upstream)
        check_endpoint("input", self.input)
        check_endpoint("broadcast", self.broadcast)
        if self.upstream_broadcast is not None:
            check_endpoint("upstream-broadcast", self.upstream_broadcast)


@dataclass(frozen=True, slots=True)
class RelayEndpoints:
    """What the relay bound (port 0 resolved)."""

    input: str
    broadcast: str


class Relay:
    """A relay's sockets and loop; ``run()`` serves until ``stop()``.

    Args:
        config: the settings.
        context: the ZeroMQ context (default: a new one, ended at close);
            give the embedder's own to use ``inproc://`` endpoints.
        address_of: for a client connection without an IP address
            (inproc, ipc), its address by routing id; None: "local".
    """

    def __init__(self, config: RelayConfig, *, context: zmq.Context[Any] | None = None,
                 address_of: Callable[[bytes], str | None] | None = None) -> None:
        self.config = config
        self._own_context = context is None
        self.context: zmq.Context[Any] = context or zmq.Context(io_threads=config.io_threads)
        # The link to the broker has a context (an I/O thread) of its own:
        # libzmq resolves a host name with a blocking getaddrinfo in the I/O
        # thread, and while a restarted broker's name does not resolve (a
        # container being replaced), the clients' sockets must not wait on it.
        self.upstream_context: zmq.Context[Any] = zmq.Context()
        self._address_of = address_of
        self.endpoints: RelayEndpoints | None = None
        self.up = False  # the upstream link's handshake succeeded and it has not closed
        self.guard: Guard | None = None
        self.auth: CurveGate | None = None
        self._members: set[bytes] = set()  # clients the broker last said are joined
        self._released: set[bytes] = set()  # connected, once members, let go by the broker
        self._pending_fd: OrderedDict[bytes, int] = OrderedDict()  # strangers' descriptors
        self._forget: deque[bytes] = deque()
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._proxy: threading.Thread | None = None
        self._feed: str | None = None  # where the XSUB is connected
        self._pub_told = ""
        self._packer = msgpack.Packer(use_bin_type=True)
        self.counts = {"requests": 0, "replies": 0, "dropped": 0, "cut_upstream_down": 0}
        self.upstream_changes = 0  # times the link came up (the first included)
        self._poller: zmq.Poller | None = None

    # ------------------------------------------------------------------ setup

    def bind(self) -> RelayEndpoints:
        """Make the sockets, bind the client side, connect upstream.

        Raises:
            KeyFileError: a key file is bad.
            OSError: an endpoint cannot be bound.
        """
        cfg = self.config
        ctx = self.context
        link_keys = load_client_keys(cfg.upstream_key, cfg.relay_key)
        client_keys = (load_server_keys(cfg.secret_key, cfg.authorized_keys)
                       if cfg.secret_key and cfg.authorized_keys else None)
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        capacity = 0 if soft == resource.RLIM_INFINITY else max(16, soft - FD_RESERVE - OWN_FDS)
        self.guard = guard = Guard(cfg.connections, capacity, time.time())
        seed_routing_ids()
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if cfg.max_frame:
            self.router.setsockopt(zmq.MAXMSGSIZE, max(4 * cfg.max_frame, 1 << 20))
        self.router.setsockopt(zmq.RCVHWM, 10_000)
        self.router.setsockopt(zmq.SNDHWM, 10_000)
        self.xpub = ctx.socket(zmq.XPUB)
        self.xpub.setsockopt(zmq.SNDHWM, FANOUT_HWM)
        self.xpub.setsockopt(zmq.MAXMSGSIZE, MAX_SUBSCRIPTION)
        if client_keys is not None:
            self.auth = CurveGate(ctx, client_keys.authorized)
            client_keys.apply(self.router)
            client_keys.apply(self.xpub)
        handshake_ms = int(min(HANDSHAKE_TIMEOUT_MS,
                               1000 * (cfg.connections.join_timeout or 5.0)))
        for sock in (self.router, self.xpub):
            sock.setsockopt(zmq.LINGER, 1000)
            sock.setsockopt(zmq.HANDSHAKE_IVL, handshake_ms)
        self._monitors = [guard.watch(self.router, Kind.INPUT, ctx),
                          guard.watch(self.xpub, Kind.BROADCAST, ctx)]
        self._link_keys = link_keys
        self._open_link()
        self.xsub = self.upstream_context.socket(zmq.XSUB)
        self.xsub.setsockopt(zmq.RCVHWM, UPSTREAM_HWM)
        self.xsub.setsockopt(zmq.LINGER, 0)
        self.xsub.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        link_keys.apply(self.xsub)
        control = f"inproc://zchat-relay-control-{secrets.token_hex(8)}"
        self.control = ctx.socket(zmq.PAIR)
        self.control.setsockopt(zmq.LINGER, 0)
        self.control.bind(control)
        self._proxy_control = ctx.socket(zmq.PAIR)
        self._proxy_control.setsockopt(zmq.LINGER, 0)
        self._proxy_control.connect(control)
        try:
            guard.probe_routing_ids(self.router, ctx)
            self.router.bind(cfg.input)
            self.xpub.bind(cfg.broadcast)
        except zmq.ZMQError as exc:
            self.close()
            raise OSError(f"cannot bind: {exc}") from exc
        self.dealer.connect(cfg.upstream)
        self.endpoints = RelayEndpoints(last_endpoint(self.router), last_endpoint(self.xpub))
        self._pub_told = cfg.advertise or advertised(cfg.broadcast, self.endpoints.broadcast)
        if cfg.upstream_broadcast is not None:
            self._feed_from(cfg.upstream_broadcast)
        else:
            self._start_proxy()  # clients' subscriptions wait in the XSUB until it connects
        return self.endpoints

    def _open_link(self) -> None:
        """Make the DEALER to the broker and its monitor (not yet connected).

        Not ``ZMQ_IMMEDIATE``: under it libzmq drops, when the connection
        closes, whatever the socket received and this loop has not read yet
        (the pipe is terminated at once), and a stopping broker's last
        ``bye`` to each member was lost whenever the close was seen first.
        What IMMEDIATE gave, that no request waits for a broker that is not
        there, the loop keeps itself: it forwards nothing while the link is
        down, and replaces the socket when the link goes (``_upstream_lost``),
        so a request queued on the dead connection never reaches a broker
        restarted later.
        """
        dealer = self.upstream_context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.SNDHWM, UPSTREAM_HWM)
        dealer.setsockopt(zmq.RCVHWM, UPSTREAM_HWM)
        dealer.setsockopt(zmq.HEARTBEAT_IVL, UPSTREAM_HEARTBEAT_MS)
        dealer.setsockopt(zmq.HEARTBEAT_TIMEOUT, UPSTREAM_TIMEOUT_MS)
        dealer.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        dealer.setsockopt(zmq.LINGER, 0)
        self._link_keys.apply(dealer)
        self.dealer = dealer
        self.upstream_monitor = dealer.get_monitor_socket(_UPSTREAM_EVENTS)

    def _reopen_link(self) -> None:
        """Replace the link's socket: what was queued on the dead one goes with it."""
        poller = self._poller
        if poller is not None:
            poller.unregister(self.dealer)
            poller.unregister(self.upstream_monitor)
        self.dealer.disable_monitor()
        self.upstream_monitor.close(linger=0)
        self.dealer.close(linger=0)
        self._open_link()
        if poller is not None:
            poller.register(self.dealer, zmq.POLLIN)
            poller.register(self.upstream_monitor, zmq.POLLIN)
        self.dealer.connect(self.config.upstream)

    # ------------------------------------------------------------ the proxy

    def _start_proxy(self) -> None:
        self._proxy = threading.Thread(target=self._run_proxy, name="zchat-relay-proxy",
                                       daemon=True)
        self._proxy.start()

    def _run_proxy(self) -> None:
        try:
            zmq.proxy_steerable(self.xsub, self.xpub, None, self._proxy_control)
        except zmq.ZMQError as exc:
            log.debug("proxy stopped: %s", exc)

    def _stop_proxy(self) -> None:
        if self._proxy is None:
            return
        try:
            self.control.send(b"TERMINATE")
        except zmq.ZMQError:
            pass
        self._proxy.join(5)
        self._proxy = None

    def _feed_from(self, endpoint: str) -> None:
        """Connect the XSUB to the broker's relay broadcast (again, if it moved)."""
        if endpoint == self._feed:
            if self._proxy is None:
                self._start_proxy()
            return
        # The proxy thread owns the XSUB while it runs: stop it to touch it.
        self._stop_proxy()
        if self._feed is not None:
            try:
                self.xsub.disconnect(self._feed)
            except zmq.ZMQError:
                pass
        self.xsub.connect(endpoint)
        self._feed = endpoint
        log.info("broadcast from %s", endpoint)
        self._start_proxy()

    # ------------------------------------------------------------ threads

    def stop(self) -> None:
        """Ask the loop to stop (safe from a signal handler or another thread)."""
        self._stopping = True
        self._wake()

    def forget(self, routing_id: bytes) -> None:
        """Tell the broker that the client ``routing_id`` is gone (any thread).

        For connections libzmq reports no close of (inproc): the broker then
        treats the member as on a dropped connection.
        """
        self._forget.append(routing_id)
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    # ------------------------------------------------------------------ loop

    def run(self) -> None:
        """Serve until ``stop()``; then close."""
        if self.endpoints is None:
            self.bind()
        guard = self.guard
        if guard is None:  # pragma: no cover - bind() always makes it
            raise RuntimeError("bind() made no guard")
        self._poller = poller = zmq.Poller()
        for sock in (self.router, self.dealer, self.upstream_monitor, *self._monitors):
            poller.register(sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        if self.auth is not None:
            poller.register(self.auth.socket, zmq.POLLIN)
        try:
            while not self._stopping:
                timeout = max(0.0, guard.next_deadline() - time.time())
                ready = dict(poller.poll(int(timeout * 1000) + 1))
                if self._wake_r in ready:
                    os.read(self._wake_r, 4096)
                if any(m in ready for m in self._monitors):
                    self._drain_monitors()
                if self.upstream_monitor in ready:
                    self._drain_upstream_monitor()
                if self.auth is not None and self.auth.socket in ready:
                    self.auth.answer()
                while self._forget:
                    self._client_gone(Kind.INPUT, self._forget.popleft())
                if self.router in ready:
                    self._drain_clients()
                if self.dealer in ready:
                    self._drain_upstream()
                now = time.time()
                if now >= guard.next_deadline():
                    guard.tick(now, self._members.__contains__)
        finally:
            self.close()

    def _drain_monitors(self) -> None:
        if self.guard is not None:
            now = time.time()
            for monitor in self._monitors:
                self.guard.drain(monitor, now, self._client_gone)

    def _client_gone(self, kind: Kind, peer: bytes) -> None:
        """A joined client's connection closed: the broker hears it as a drop."""
        if kind is not Kind.INPUT:
            return
        self._members.discard(peer)
        self._released.discard(peer)
        if self.up:
            self._upstream([GONE, peer])

    def _drain_upstream_monitor(self) -> None:
        while True:
            try:
                head, _endpoint = self.upstream_monitor.recv_multipart(_NOBLOCK)
            except zmq.Again:
                return
            event, _value = _EVENT_HEAD.unpack_from(head)
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.up = True
                self.upstream_changes += 1
                log.info("connected to the broker at %s", self.config.upstream)
                self._upstream([HELLO, self._packer.pack({"type": "hello",
                                                          "version": LINK_VERSION})])
            elif event == zmq.EVENT_DISCONNECTED and self.up:
                self._upstream_lost()
            elif event in (zmq.EVENT_HANDSHAKE_FAILED_AUTH,
                           zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL):
                log.error("the broker at %s refused this relay (is its key in the broker's "
                          "--relay-keys, and --upstream-key the broker's?)", self.config.upstream)

    def _upstream_lost(self) -> None:
        """The broker is gone: its clients see it as they would a broker's death.

        What it said before it went is passed on first: a broker that stops
        sends each member a ``bye`` and then closes, and the poll can report
        both at once. Then every client connection is cut, as a dead broker's
        would close, except those of clients the broker itself let go (a
        ``bye``, a ``left``, an ``ack`` of ``leave``) while still connected:
        such a client knows, and its last reply may still wait in this
        relay's queue, which a cut would drop (its next request finds the
        link down and is cut then).
        """
        self._drain_upstream()
        self.up = False
        # The broker has dropped every client of this link: none is joined now.
        self._members.clear()
        self._pending_fd.clear()
        cut = 0
        if self.guard is not None:
            ledger = self.guard.ledger
            spared = {ledger.fd_of(peer) for peer in self._released}
            for fd, _kind in list(ledger.connections(Kind.INPUT)):
                if fd not in spared:
                    shutdown_fd(fd)
                    cut += 1
        self._released.clear()
        self.counts["cut_upstream_down"] += cut
        log.warning("lost the broker at %s; cut %d client connection(s), reconnecting",
                    self.config.upstream, cut)
        self._reopen_link()

    def _upstream(self, frames: list[bytes]) -> bool:
        try:
            self.dealer.send_multipart(frames, _NOBLOCK)
        except zmq.Again:
            self.counts["dropped"] += 1
            return False
        return True

    def _drain_clients(self) -> None:
        router = self.router
        recv = router.recv
        more = router.get
        guard = self.guard
        ledger = guard.ledger if guard is not None else None
        members = self._members
        for _ in range(DRAIN_BATCH):
            try:
                peer = recv(_NOBLOCK)
            except zmq.Again:
                return
            if ledger is not None and ledger.severed and peer in ledger.severed:
                while more(_RCVMORE):
                    recv(_NOBLOCK)
                continue
            payload: zmq.Frame | None = recv(_NOBLOCK, copy=False) if more(_RCVMORE) else None
            size = len(payload) if payload is not None else 0
            extra = 0
            while more(_RCVMORE):
                size += len(recv(_NOBLOCK))
                extra += 1
            fd = frame_fd(payload) if payload is not None else -1
            now = time.time()
            member = peer in members
            if member and fd >= 0 and ledger is not None and ledger.fd_of(peer) != fd:
                # The member's id on another connection: the close of the one
                # it joined on is queued on the monitor; tell the broker first,
                # so that this connection is a stranger there too.
                self._drain_monitors()
                member = peer in members
            if guard is not None and ledger is not None:
                if not member and fd >= 0:
                    if not self._admit_stranger(guard, peer, fd, size, now):
                        continue
                else:
                    ledger.received(peer, size)
            if payload is None or extra:
                # The broker would say the same; it need not hear of it.
                self._reply(peer, encode({
                    "type": "error", "code": ErrorCode.BAD_FRAME,
                    "detail": f"expected 1 payload frame, got {extra + (payload is not None)}"}))
                continue
            if not self.up:
                # As a client of a dead broker would find: the connection closes.
                if fd >= 0:
                    shutdown_fd(fd)
                    self.counts["cut_upstream_down"] += 1
                continue
            if not member and fd >= 0:
                self._pending_fd[peer] = fd
                if len(self._pending_fd) > PENDING_FDS:
                    self._pending_fd.popitem(last=False)
            key = frame_property(payload, "User-Id") if self.auth is not None else None
            meta = pack_meta(self._address(payload, peer), key)
            self.counts["requests"] += 1
            self._upstream([REQUEST, peer, meta, payload.bytes])

    def _address(self, frame: zmq.Frame, peer: bytes) -> str:
        addr = frame_property(frame, "Peer-Address")
        if addr:
            return addr
        if self._address_of is not None:
            # inproc or ipc: only the embedder knows who is behind it.
            told = self._address_of(peer)
            if told:
                return told
        return "local"

    def _admit_stranger(self, guard: Guard, peer: bytes, fd: int, size: int,
                        now: float) -> bool:
        if fd not in guard.ledger or not guard.plausible_routing_id(peer):
            self._drain_monitors()
        if not guard.plausible_routing_id(peer):
            guard.cut(guard.ledger.forged(fd))
            return False
        cut = guard.ledger.stranger_request(fd, size, now)
        if cut is not None:
            guard.cut(cut)
            return False
        return True

    def _drain_upstream(self) -> None:
        dealer = self.dealer
        for _ in range(DRAIN_BATCH):
            try:
                frames = dealer.recv_multipart(_NOBLOCK)
            except zmq.Again:
                return
            tag = frames[0] if frames else b""
            if tag == REQUEST and len(frames) == 4:
                _, client, flag, payload = frames
                self._from_broker(client, flag, payload)
            elif tag == HELLO and len(frames) == 2:
                self._hello(frames[1])
            else:
                log.warning("the broker sent an unknown frame (tag %r)", tag[:8])

    def _from_broker(self, client: bytes, flag: bytes, payload: bytes) -> None:
        if flag == b"w":
            payload = self._rewrite_welcome(payload)
            self._joined(client)
        elif flag == b"m":
            if client not in self._members:
                self._joined(client)
        elif client in self._members:
            self._members.discard(client)
            self._released.add(client)
        self.counts["replies"] += 1
        self._reply(client, payload)

    def _joined(self, client: bytes) -> None:
        self._members.add(client)
        self._released.discard(client)
        fd = self._pending_fd.pop(client, None)
        if fd is not None and self.guard is not None:
            self.guard.ledger.bind(fd, client)

    def _rewrite_welcome(self, payload: bytes) -> bytes:
        """A ``welcome`` names the broadcast endpoint to connect to: ours."""
        try:
            body = decode_frame(payload, 0)
        except ProtocolError:
            return payload
        body["pub"] = self._pub_told
        packed: bytes = self._packer.pack(body)
        return packed

    def _hello(self, raw: bytes) -> None:
        try:
            told = decode_frame(raw, 0)
        except ProtocolError:
            log.warning("the broker's hello did not decode")
            return
        if self.config.upstream_broadcast is not None:
            return
        broadcast = told.get("broadcast")
        if not isinstance(broadcast, str) or not broadcast:
            log.warning("the broker's hello names no broadcast endpoint")
            return
        self._feed_from(_resolve(broadcast, self.config.upstream))

    def _reply(self, peer: bytes, packed: bytes) -> None:
        try:
            self.router.send(peer, _MORE_NOBLOCK)
        except zmq.ZMQError:
            return  # the client is gone (or not reading): only it misses this
        self.router.send(packed, _NOBLOCK)
        guard = self.guard
        if guard is not None:
            fd = guard.ledger.sent(peer, len(packed))
            if fd is not None:
                guard.check_sent(fd, time.time())

    def statistics(self) -> dict[str, Any]:
        """Counters, connections by socket, and whether the broker is reachable."""
        stats: dict[str, Any] = {"up": self.up, "members": len(self._members), **self.counts}
        if self.guard is not None:
            stats.update(self.guard.ledger.statistics())
        return stats

    # --------------------------------------------------------------- closing

    def close(self) -> None:
        """Stop the proxy, close every socket (and the context, if ours)."""
        self._stop_proxy()
        if self.auth is not None:
            self.auth.close()
            self.auth = None
        if self.guard is not None:
            self.guard.close()
        for name in ("upstream_monitor", "router", "xpub", "dealer", "xsub", "control",
                     "_proxy_control"):
            sock = getattr(self, name, None)
            if sock is not None and not sock.closed:
                sock.close(linger=0)
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._wake_r = self._wake_w = -1
        self.upstream_context.term()
        if self._own_context:
            self.context.term()


def _resolve(told: str, upstream: str) -> str:
    """A bare port names the upstream's host, as ``pub`` does for clients."""
    if told.isdigit():
        host = upstream.removeprefix("tcp://").rpartition(":")[0]
        return f"tcp://{host}:{told}"
    return told
