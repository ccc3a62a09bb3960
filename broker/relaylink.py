"""The broker's end of the relay link: authenticated relays speak for their clients.

A relay (``zchat-relay``, ``broker/relay.py``) holds clients' connections in
front of the broker. It carries each client's requests to the broker over
one DEALER connection to the broker's relay endpoint (``--relay-bind``), and
re-publishes the broker's events through libzmq's XSUB/XPUB proxy. Both
link sockets are always CURVE, and only relays whose public key is in
``--relay-keys`` get in: that key, not anything a frame says, is what makes
the broker believe a client's address and key. A client that connects to
``--relay-bind`` without a relay key fails the handshake; one that sends
relay-shaped frames to ``--input`` is only a client.

The link's frames (MessagePack maps where a map is said)::

    relay -> broker   [b"H", {version}]                 hello, after each handshake
                      [b"R", client, meta, payload]     one client's request, as sent
                      [b"G", client]                    that client's connection closed
    broker -> relay   [b"H", {version, broadcast, heartbeat}]
                      [b"R", client, flags, payload]    one reply or event for a client

``client`` is the client's routing id on the relay; ``meta`` is
``{addr, key}`` (its IP address as the relay saw it, its CURVE key or nil);
``flags`` is ``b"w"`` (a ``welcome``: the client is joined), ``b"m"`` (joined)
or ``b"-"`` (not joined), so the relay can keep its join timeout without
reading replies. Inside the broker a relayed client's peer id is
``RELAYED + slot + client``: ``slot`` names the relay connection, so replies
route back through it, and the ``0x00`` first byte with a length no libzmq
id has means no direct connection can ever speak under it (the server drops
frames from a direct peer that tries). When a relay's connection closes,
every client it carried is ``disconnected`` as if its own connection had.

The broadcast side: the broker's PUB also binds an ``inproc`` endpoint that
a proxy thread's XSUB reads and forwards to an XPUB on ``--relay-broadcast``;
subscriptions flow back the same way, so the broker publishes to a relay
only the topics that relay's clients want, and no Python runs per event.

Defines: ``RelayLinkConfig``, ``RelayLink``, ``RELAYED``, ``is_relayed``,
``pack_meta``, ``unpack_meta``, the frame tags.
"""

from __future__ import annotations

import logging
import secrets
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgpack
import zmq

from zchat.errors import ProtocolError
from zchat.keys import load_server_keys
from zchat.protocol import ErrorCode, decode_frame, named_room, parse_request, request_id
from zchat.state import Broker, Outgoing

from .auth import CurveGate
from .frames import frame_fd, last_endpoint

__all__ = [
    "GONE",
    "HELLO",
    "LINK_VERSION",
    "RELAYED",
    "REQUEST",
    "RelayLink",
    "RelayLinkConfig",
    "is_relayed",
    "pack_meta",
    "unpack_meta",
]

log = logging.getLogger("zchat.broker.relays")

LINK_VERSION: Final = 1
DRAIN_BATCH: Final = 4096  # frames taken from the link before the loop looks elsewhere
HELLO: Final = b"H"
REQUEST: Final = b"R"
GONE: Final = b"G"
FLAG_WELCOME: Final = b"w"
FLAG_MEMBER: Final = b"m"
FLAG_STRANGER: Final = b"-"
RELAYED: Final = b"\x00\xff"  # first bytes of a relayed client's peer id inside the broker
_SLOT_END: Final = len(RELAYED) + 4
MAX_META: Final = 1024  # bytes of one meta frame (an address and a key fit in 100)
LINK_HEARTBEAT_MS: Final = 1000  # ZMTP heartbeats: a silent relay link is known gone in 3 s
LINK_TIMEOUT_MS: Final = 3000
LINK_HWM: Final = 1_000_000  # frames queued per relay: each carries many clients
CLOSE_LINGER_MS: Final = 1000  # time to let the last events out to the relays at exit
PROXY_HWM: Final = 1_000_000  # events queued towards the relays' proxy

_NOBLOCK = int(zmq.NOBLOCK)
_MORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
_EVENTS = int(zmq.EVENT_DISCONNECTED)
_EVENT_HEAD = struct.Struct("=HI")
_packb = msgpack.Packer(use_bin_type=True).pack


def is_relayed(peer: bytes) -> bool:
    """Whether ``peer`` is a relayed client's id (no direct connection has one)."""
    return len(peer) > _SLOT_END and peer[:2] == RELAYED


def pack_meta(addr: str, key: str | None) -> bytes:
    """The meta frame of a relayed request: the client's address and CURVE key."""
    packed: bytes = _packb({"addr": addr, "key": key})
    return packed


def unpack_meta(raw: bytes) -> tuple[str, str | None]:
    """The address and key of a meta frame.

    Raises:
        ProtocolError: not a meta frame (a relay bug: relays are trusted,
            but a bad frame must not cost the broker).
    """
    if len(raw) > MAX_META:
        raise ProtocolError(ErrorCode.BAD_FRAME, "relay meta too large")
    try:
        meta = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several kinds for bad input
        raise ProtocolError(ErrorCode.BAD_FRAME, f"relay meta: {exc}") from exc
    if not isinstance(meta, dict):
        raise ProtocolError(ErrorCode.BAD_FRAME, "relay meta is not a map")
    addr, key = meta.get("addr"), meta.get("key")
    if not isinstance(addr, str) or not (key is None or isinstance(key, str)):
        raise ProtocolError(ErrorCode.BAD_FRAME, "relay meta: addr str, key str or nil")
    return addr, key


@dataclass(frozen=True, slots=True)
class RelayLinkConfig:
    """Where relays connect and who may.

    Attributes:
        bind: the ROUTER relays send their clients' requests to.
        broadcast: the XPUB relays subscribe to (the broker's events).
        keys: directory of the relays' public ``.key`` files.
        secret_key: the broker's ``.key_secret`` file for the link.
        advertise: the broadcast endpoint told to relays (default: the
            bound port alone when bound to a wildcard, as for clients).
    """

    bind: str
    broadcast: str
    keys: str
    secret_key: str
    advertise: str | None = None


@dataclass(slots=True)
class _Link:
    """One relay connection."""

    rid: bytes  # its routing id on our ROUTER
    prefix: bytes  # RELAYED + slot: what its clients' peer ids start with
    fd: int
    clients: set[bytes]  # client ids that were members at their last reply


class RelayLink:
    """The relay endpoints of one broker, polled by the broker's own loop.

    Args:
        config: endpoints and keys.
        heartbeat: the broker's heartbeat, told to relays in the hello.
        max_frame: the broker's frame limit (payloads), as for clients.
        advertised: turns (configured, bound) broadcast endpoints into
            what relays are told (``server.advertised``).
    """

    def __init__(self, config: RelayLinkConfig, heartbeat: float, max_frame: int,
                 advertised: Callable[[str, str], str]) -> None:
        self.config = config
        self.heartbeat = heartbeat
        self.max_frame = max_frame
        self._advertised = advertised
        # Its own context: ZAP is per context, and the relay keys must be
        # judged apart from the clients' authorized keys.
        self.context: zmq.Context[Any] = zmq.Context()
        self._links: dict[bytes, _Link] = {}  # by relay routing id
        self._by_prefix: dict[bytes, _Link] = {}
        self._by_fd: dict[int, _Link] = {}
        self._slot = secrets.randbits(32)
        self._proxy: threading.Thread | None = None
        self.endpoints: tuple[str, str] | None = None
        self.relayed_requests = 0
        self.internal_errors = 0

    # ------------------------------------------------------------------ setup

    def bind(self, main_context: zmq.Context[Any], pub: zmq.Socket[Any]) -> tuple[str, str]:
        """Bind both relay endpoints and start the broadcast proxy.

        ``pub`` is the broker's PUB (in ``main_context``): it also binds an
        inproc endpoint that the proxy's XSUB reads.

        Raises:
            KeyFileError: a key file or the relay keys directory is bad.
            OSError: an endpoint cannot be bound.
        """
        cfg = self.config
        keys = load_server_keys(cfg.secret_key, cfg.keys)
        ctx = self.context
        self.gate = CurveGate(ctx, Path(cfg.keys))
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.SNDHWM, LINK_HWM)
        self.router.setsockopt(zmq.RCVHWM, LINK_HWM)
        self.router.setsockopt(zmq.HEARTBEAT_IVL, LINK_HEARTBEAT_MS)
        self.router.setsockopt(zmq.HEARTBEAT_TIMEOUT, LINK_TIMEOUT_MS)
        self.router.setsockopt(zmq.LINGER, 1000)
        if self.max_frame:
            self.router.setsockopt(zmq.MAXMSGSIZE, max(4 * self.max_frame, 1 << 20))
        keys.apply(self.router)
        self.xpub = ctx.socket(zmq.XPUB)
        self.xpub.setsockopt(zmq.SNDHWM, PROXY_HWM)
        self.xpub.setsockopt(zmq.LINGER, 0)
        keys.apply(self.xpub)
        self.monitor = self.router.get_monitor_socket(_EVENTS)
        self.xsub = main_context.socket(zmq.XSUB)
        self.xsub.setsockopt(zmq.RCVHWM, PROXY_HWM)
        self.xsub.setsockopt(zmq.LINGER, 0)
        self.control = ctx.socket(zmq.PAIR)
        self.control.setsockopt(zmq.LINGER, 0)
        control_ep = f"inproc://zchat-relay-proxy-{secrets.token_hex(8)}"
        self.control.bind(control_ep)
        self._proxy_control = ctx.socket(zmq.PAIR)
        self._proxy_control.setsockopt(zmq.LINGER, 0)
        self._proxy_control.connect(control_ep)
        inproc = f"inproc://zchat-relay-feed-{secrets.token_hex(8)}"
        try:
            pub.bind(inproc)
            self.xsub.connect(inproc)
            self.router.bind(cfg.bind)
            self.xpub.bind(cfg.broadcast)
        except zmq.ZMQError as exc:
            raise OSError(f"cannot bind the relay link: {exc}") from exc
        self.endpoints = (last_endpoint(self.router), last_endpoint(self.xpub))
        self._told = {"type": "hello", "version": LINK_VERSION,
                      "broadcast": cfg.advertise or self._advertised(cfg.broadcast,
                                                                    self.endpoints[1]),
                      "heartbeat": self.heartbeat}
        # libzmq's proxy moves events and subscriptions in C, GIL released.
        self._proxy = threading.Thread(target=self._run_proxy, name="zchat-relay-proxy",
                                       daemon=True)
        self._proxy.start()
        return self.endpoints

    def _run_proxy(self) -> None:
        try:
            zmq.proxy_steerable(self.xsub, self.xpub, None, self._proxy_control)
        except zmq.ZMQError as exc:  # the context ended under it: closing
            log.debug("relay proxy stopped: %s", exc)

    @property
    def sockets(self) -> list[zmq.Socket[Any]]:
        """What the broker's poller must watch for this link."""
        return [self.router, self.monitor, self.gate.socket]

    # ------------------------------------------------------------------ loop

    def serve(self, ready: dict[Any, int], state: Broker,
              queue: Callable[[list[Outgoing]], None], now: float) -> bool:
        """Take what is ready on the link's sockets (called by the broker's loop).

        Returns False when relayed requests are still queued: a relayed
        member's ping may wait behind them, so the loop counts as lagging.
        """
        if self.gate.socket in ready:
            self.gate.answer()
        if self.monitor in ready:
            self._drain_monitor(state, queue, now)
        if self.router in ready:
            return self._drain(state, queue, now)
        return True

    def _drain_monitor(self, state: Broker, queue: Callable[[list[Outgoing]], None],
                       now: float) -> None:
        while True:
            try:
                head, _endpoint = self.monitor.recv_multipart(_NOBLOCK)
            except zmq.Again:
                return
            event, fd = _EVENT_HEAD.unpack_from(head)
            if event == zmq.EVENT_DISCONNECTED:
                link = self._by_fd.pop(fd, None)
                if link is not None:
                    self._drop(link, state, queue, now)

    def _drop(self, link: _Link, state: Broker, queue: Callable[[list[Outgoing]], None],
              now: float) -> None:
        """A relay is gone: so are the connections of every client it carried."""
        self._links.pop(link.rid, None)
        self._by_prefix.pop(link.prefix, None)
        log.warning("relay link from fd %d closed: %d client(s) disconnected",
                    link.fd, len(link.clients))
        for client in link.clients:
            queue(state.disconnected(link.prefix + client, now))
        link.clients.clear()

    def _link(self, rid: bytes, fd: int, state: Broker,
              queue: Callable[[list[Outgoing]], None], now: float) -> _Link:
        link = self._links.get(rid)
        if link is None:
            # A new connection: the close of one that had its descriptor
            # before is queued on the monitor ahead of it, so read that first.
            self._drain_monitor(state, queue, now)
            self._slot = (self._slot + 1) % (1 << 32)
            link = _Link(rid, RELAYED + self._slot.to_bytes(4, "big"), fd, set())
            self._links[rid] = link
            self._by_prefix[link.prefix] = link
            self._by_fd[fd] = link
            log.info("relay connected (fd %d)", fd)
        return link

    def _drain(self, state: Broker, queue: Callable[[list[Outgoing]], None],
               now: float) -> bool:
        router = self.router
        for _ in range(DRAIN_BATCH):
            try:
                frames = router.recv_multipart(_NOBLOCK, copy=False)
            except zmq.Again:
                return True
            if len(frames) < 2:
                continue
            rid = frames[0].bytes
            link = self._link(rid, frame_fd(frames[1]), state, queue, now)
            tag = frames[1].bytes
            if tag == REQUEST and len(frames) == 5:
                self._request(link, frames[2].bytes, frames[3].bytes, frames[4], state,
                              queue, now)
            elif tag == GONE and len(frames) == 3:
                client = frames[2].bytes
                link.clients.discard(client)
                queue(state.disconnected(link.prefix + client, now))
            elif tag == HELLO:
                self._send(rid, [HELLO, _packb(self._told)])
            else:
                log.warning("relay sent an unknown frame (tag %r, %d frames)", tag[:8],
                            len(frames))
        return False

    def _request(self, link: _Link, client: bytes, meta: bytes, frame: zmq.Frame,
                 state: Broker, queue: Callable[[list[Outgoing]], None], now: float) -> None:
        peer = link.prefix + client
        self.relayed_requests += 1
        body: dict[str, Any] | None = None
        try:
            addr, key = unpack_meta(meta)
            body = decode_frame(frame.buffer, self.max_frame)
            request = parse_request(body)
        except ProtocolError as exc:
            rid = request_id(body) if body is not None else None
            room = named_room(body) if body is not None else None
            queue([state.error(peer, exc.code, exc.detail, rid, room)])
            return
        # Only a join reads the address; the broker keeps it with the member.
        try:
            queue(state.handle(peer, request, now, addr, key))
        except Exception:
            # A bug, not the peer's fault: it costs this request, never the broker.
            self.internal_errors += 1
            if self.internal_errors <= 10 or self.internal_errors % 1000 == 0:
                log.exception("internal error handling a relayed %s", body["type"])
            queue([state.error(peer, ErrorCode.INTERNAL,
                               "the broker failed on this request; see its log", request.id)])
            return
        if state.is_member(peer):
            link.clients.add(client)

    def reply(self, peer: bytes, kind: str, packed: bytes, member: bool) -> None:
        """Send one packed reply (or private event) to a relayed client."""
        link = self._by_prefix.get(peer[:_SLOT_END])
        if link is None:
            return  # its relay is gone; the client will resume elsewhere
        client = peer[_SLOT_END:]
        if kind == "welcome":
            flag = FLAG_WELCOME
        elif member:
            flag = FLAG_MEMBER
        else:
            flag = FLAG_STRANGER
            link.clients.discard(client)
        self._send(link.rid, [REQUEST, client, flag, packed])

    def _send(self, rid: bytes, frames: list[bytes]) -> None:
        try:
            self.router.send(rid, _MORE_NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("relay unreachable, frame dropped: %s", exc.strerror)
            return
        last = len(frames) - 1
        for i, frame in enumerate(frames):
            self.router.send(frame, _NOBLOCK if i == last else _MORE_NOBLOCK)

    def statistics(self) -> dict[str, Any]:
        return {"relays": len(self._links),
                "relayed_clients": sum(len(link.clients) for link in self._links.values()),
                "relayed_requests": self.relayed_requests}

    # --------------------------------------------------------------- closing

    def close(self) -> None:
        """Stop the proxy and close the link's sockets (the broker's PUB is not ours)."""
        if self._proxy is not None:
            try:
                self.control.send(b"TERMINATE")
            except zmq.ZMQError:
                pass
            self._proxy.join(5)
            if not self._proxy.is_alive():
                self._forward_the_rest()
            self._proxy = None
        for name in ("monitor", "router", "xpub", "xsub", "control", "_proxy_control"):
            sock = getattr(self, name, None)
            if sock is not None and not sock.closed:
                sock.close()  # the router's linger lets the last goodbyes out
        gate = getattr(self, "gate", None)
        if gate is not None:
            gate.close()
        self.context.term()


    def _forward_the_rest(self) -> None:
        """Send the relays what the broker published last (its ``left``s, ``shutdown``).

        They are in the XSUB's inproc pipe when the loop closes, but the proxy
        reads its control socket first, so ``TERMINATE`` stops it before it
        moved them: a relay's clients would never hear the broker's goodbye.
        The proxy thread has returned, so this thread may use its sockets.
        """
        self.xpub.setsockopt(zmq.LINGER, CLOSE_LINGER_MS)
        while True:
            try:
                frames = self.xsub.recv_multipart(zmq.NOBLOCK)
                self.xpub.send_multipart(frames, zmq.NOBLOCK)
            except zmq.ZMQError:  # nothing left, or a relay's queue is full
                return
