"""The connection guard: bounds libzmq does not keep, kept by the broker's loop.

libzmq hands the broker whole messages and counts its queues in messages, not
bytes. It never says which TCP connection a routing id rides on, never drops
a connection that says nothing, buffers a multipart message that never ends,
and keeps every subscription a SUB sends. So the broker watches connections
itself, from its one thread:

- socket monitors report ``ACCEPTED`` and ``DISCONNECTED`` with the
  connection's descriptor; ``getpeername`` on it gives the address;
- a payload frame names its descriptor (``ZMQ_SRCFD``), which binds a joined
  member's routing id to its connection;
- the kernel's ``TCP_INFO`` tells the bytes received from and acknowledged by
  the peer, so what libzmq holds for a connection is measured in bytes;
- ``shutdown(2)`` on the descriptor ends one connection: libzmq sees the peer
  go, frees that connection's queues and reports ``DISCONNECTED``.

``Ledger`` is the policy and does no I/O (measurements are parameters, time
is ``now``); ``Guard`` is the shell that owns the monitor sockets and does
the system calls.

Defines: ``ConnectionLimits``, ``Kind``, ``Cut``, ``Measure``, ``Ledger``,
``Guard``, ``seed_routing_ids``.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import logging
import os
import secrets
import socket
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import zmq

__all__ = [
    "ConnectionLimits",
    "Cut",
    "Guard",
    "Kind",
    "Ledger",
    "Measure",
    "seed_routing_ids",
]

log = logging.getLogger("zchat.broker.guard")

KIB: Final = 1024
MIB: Final = 1024 * KIB
FD_RESERVE: Final = 64  # descriptors kept free, so the operator and the store always get one
HANDSHAKE_ALLOWANCE: Final = 4 * KIB  # greeting, READY or CURVE commands, a routing id
DRIFT_PER_SECOND: Final = 64  # ZMTP heartbeats and other commands we never see
STRANGER_BURST: Final = 256  # requests a connection without a member may send at once,
STRANGER_RATE: Final = 32.0  # and per second after that
CONTROL_IDLE: Final = 0.5  # seconds an operator connection may stay silent (zchat-admin is quick)
MEMORY_STEP: Final = 64 * MIB  # RSS growth that triggers a scan at once
MEMORY_CHECK: Final = 0.1  # seconds between RSS readings
SCAN_PER_SECOND: Final = 5000  # connections measured per second at most, in steady state
# After the loop last lagged behind its input, seconds before a connection is
# cut for not joining: its join may have been among the frames still queued.
LAG_GRACE: Final = 2.0


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """Bounds on connections; 0 turns one off.

    Attributes:
        per_address: connections from one IP address to each port (a NAT'd
            office is legitimate: keep it well above its head count).
        join_timeout: seconds a connection to the input may stay without a
            joined member on it.
        max_backlog: bytes one client connection may have waiting in the
            broker, in either direction (unread input, unsent replies).
        max_subscribe: bytes a subscriber may ever send (its subscriptions).
        stall: seconds a subscriber may read nothing while events wait for it.
    """

    per_address: int = 256
    join_timeout: float = 10.0
    max_backlog: int = 4 * MIB
    max_subscribe: int = 64 * KIB
    stall: float = 15.0


class Kind(enum.Enum):
    """Which of the broker's sockets a connection reached."""

    INPUT = "input"
    BROADCAST = "broadcast"
    CONTROL = "control"


class Measure(NamedTuple):
    """What the kernel says of one TCP connection (cumulative bytes)."""

    acked: int  # bytes we sent that the peer's kernel acknowledged
    received: int  # bytes the peer sent us
    notsent: int  # bytes in our kernel send queue not yet sent


class Cut(NamedTuple):
    """End the connection on descriptor ``fd``, for ``reason``."""

    fd: int
    kind: Kind
    addr: str
    reason: str


class _Conn:
    __slots__ = ("acked", "addr", "consumed", "deadline", "fd", "kind", "opened", "peer",
                 "requests", "requests_at", "sent", "stalled_since")

    def __init__(self, fd: int, kind: Kind, addr: str, now: float) -> None:
        self.fd = fd
        self.kind = kind
        self.addr = addr
        self.opened = now
        self.deadline: float | None = None
        self.peer: bytes | None = None  # the joined member's routing id
        self.consumed = HANDSHAKE_ALLOWANCE  # bytes of what we read, framing included
        self.sent = 0  # bytes of what we sent on the ROUTER, framing included
        self.acked = 0  # bytes_acked at the last measurement
        self.stalled_since: float | None = None
        self.requests = 0.0  # stranger requests in the bucket (drains at STRANGER_RATE)
        self.requests_at = now


def frame_cost(size: int) -> int:
    """Bytes a ZMTP 3 frame of ``size`` bytes takes on the wire."""
    return size + (2 if size < 256 else 9)


class Ledger:
    """Every open connection and the rules they live by; no I/O.

    Args:
        limits: the bounds.
        capacity: connections the broker may hold at once (descriptors
            minus a reserve); 0: no cap.
    """

    def __init__(self, limits: ConnectionLimits, capacity: int = 0) -> None:
        self.limits = limits
        self.capacity = capacity
        self._conns: dict[int, _Conn] = {}
        self._by_peer: dict[bytes, _Conn] = {}
        self._per_address: dict[tuple[Kind, str], int] = {}
        # Connections with a deadline (join or control idle), oldest first.
        self._waiting: OrderedDict[int, _Conn] = OrderedDict()
        self.counts: dict[str, int] = {}
        # Routing ids of members whose connection was cut but not yet reported
        # gone: what libzmq had already queued from them is not worth reading.
        self.severed: set[bytes] = set()
        self._join_from = 0.0  # no connection is cut for not joining before this

    def __len__(self) -> int:
        return len(self._conns)

    def __contains__(self, fd: int) -> bool:
        return fd in self._conns

    def statistics(self) -> dict[str, Any]:
        """Open connections by socket, and connections cut so far by reason."""
        open_ = dict.fromkeys((kind.value for kind in Kind), 0)
        for conn in self._conns.values():
            open_[conn.kind.value] += 1
        return {"connections": open_, "cut": dict(self.counts)}

    def connections(self, kind: Kind | None = None) -> Iterator[tuple[int, Kind]]:
        for fd, conn in self._conns.items():
            if kind is None or conn.kind is kind:
                yield fd, conn.kind

    def _cut(self, conn: _Conn, reason: str) -> Cut:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if conn.peer is not None:
            self.severed.add(conn.peer)
        return Cut(conn.fd, conn.kind, conn.addr, reason)

    # ----------------------------------------------------------- lifecycle

    def accepted(self, kind: Kind, fd: int, addr: str, now: float) -> Cut | None:
        """A new connection; a ``Cut`` when it is one too many."""
        stale = self._conns.get(fd)
        if stale is not None:  # its DISCONNECTED was lost: the descriptor was reused
            self.disconnected(fd)
        conn = _Conn(fd, kind, addr, now)
        self._conns[fd] = conn
        key = (kind, addr)
        self._per_address[key] = self._per_address.get(key, 0) + 1
        if kind is Kind.INPUT and self.limits.join_timeout:
            self._wait(conn, now + self.limits.join_timeout)
        elif kind is Kind.CONTROL:
            self._wait(conn, now + CONTROL_IDLE)
        if self.capacity and len(self._conns) > self.capacity:
            return self._cut(conn, "the broker is full")
        limit = self.limits.per_address
        if limit and kind is not Kind.CONTROL and self._per_address[key] > limit:
            return self._cut(conn, f"more than {limit} connections from one address")
        return None

    def disconnected(self, fd: int) -> bytes | None:
        """The connection on ``fd`` is gone; return the member routing id it carried."""
        conn = self._conns.pop(fd, None)
        if conn is None:
            return None
        key = (conn.kind, conn.addr)
        left = self._per_address[key] - 1
        if left:
            self._per_address[key] = left
        else:
            del self._per_address[key]
        self._waiting.pop(fd, None)
        if conn.peer is not None and self._by_peer.get(conn.peer) is conn:
            del self._by_peer[conn.peer]
            self.severed.discard(conn.peer)
        return conn.peer

    def _wait(self, conn: _Conn, deadline: float) -> None:
        conn.deadline = deadline
        self._waiting[conn.fd] = conn
        self._waiting.move_to_end(conn.fd)

    # ------------------------------------------------------------ traffic

    def stranger_request(self, fd: int, size: int, now: float) -> Cut | None:
        """A request read from ``fd`` while no member is bound to it."""
        conn = self._conns.get(fd)
        if conn is None:
            return None
        conn.consumed += frame_cost(size)
        # A leaky bucket: odd requests before a join are answered, a flood is not.
        conn.requests = max(0.0, conn.requests - (now - conn.requests_at) * STRANGER_RATE) + 1
        conn.requests_at = now
        if conn.requests > STRANGER_BURST:
            return self._cut(conn, f"more than {STRANGER_BURST} requests at once, "
                                   f"or {STRANGER_RATE:g}/s, without joining")
        return None

    def forged(self, fd: int) -> Cut:
        """The connection on ``fd`` announced a routing id libzmq keeps for itself."""
        conn = self._conns.get(fd) or _Conn(fd, Kind.INPUT, "?", 0.0)
        return self._cut(conn, "forged an automatic routing id")

    def bind(self, fd: int, peer: bytes) -> None:
        """A member joined through ``fd``: its routing id is that connection's."""
        conn = self._conns.get(fd)
        if conn is None or conn.kind is not Kind.INPUT:
            return
        if conn.peer is not None and self._by_peer.get(conn.peer) is conn:
            del self._by_peer[conn.peer]
        conn.peer = peer
        conn.requests = 0.0
        self._by_peer[peer] = conn
        conn.deadline = None
        self._waiting.pop(fd, None)

    def fd_of(self, peer: bytes) -> int | None:
        conn = self._by_peer.get(peer)
        return conn.fd if conn is not None else None

    def received(self, peer: bytes, size: int) -> None:
        """A member's request of ``size`` bytes was read."""
        conn = self._by_peer.get(peer)
        if conn is not None:
            conn.consumed += frame_cost(size)

    def sent(self, peer: bytes, size: int) -> int | None:
        """A reply of ``size`` bytes went to ``peer``; its fd if it must be measured now."""
        conn = self._by_peer.get(peer)
        if conn is None:
            return None
        conn.sent += frame_cost(size)
        limit = self.limits.max_backlog
        if limit and conn.sent - conn.acked > limit:
            return conn.fd
        return None

    def control_command(self, now: float) -> None:
        """The operator sent a command: every control connection gets its idle time anew."""
        for conn in list(self._waiting.values()):
            if conn.kind is Kind.CONTROL:
                self._wait(conn, now + CONTROL_IDLE)

    # ------------------------------------------------------------- timers

    def next_deadline(self) -> float | None:
        for conn in self._waiting.values():
            return conn.deadline
        return None

    def lagged(self, now: float) -> None:
        """The loop is behind its input: a connection's join may still be queued.

        Like a member's ping (``Broker.lagged``), a newcomer's ``join`` can
        wait behind thousands of others' frames in a join storm; cutting its
        connection for the broker's backlog would punish the client for it.
        Nobody is cut for not joining until ``LAG_GRACE`` after the last pass
        that lagged (the operator channel's idle limit still holds).
        """
        self._join_from = max(self._join_from, now + LAG_GRACE)

    def expire(self, now: float, is_member: Callable[[bytes], bool]) -> list[Cut]:
        """Cut connections past their deadline (no member joined, operator idle)."""
        cuts: list[Cut] = []
        held: list[_Conn] = []
        while self._waiting:
            conn = next(iter(self._waiting.values()))
            if conn.deadline is None or conn.deadline > now:
                break
            if conn.kind is Kind.INPUT and now < self._join_from:
                # Its join may be queued: look again once the loop caught up.
                del self._waiting[conn.fd]
                held.append(conn)
                continue
            del self._waiting[conn.fd]
            conn.deadline = None
            if conn.kind is Kind.CONTROL:
                cuts.append(self._cut(conn, "operator connection idle"))
            elif conn.peer is None or not is_member(conn.peer):
                cuts.append(self._cut(conn, f"no join within {self.limits.join_timeout:g} s"))
        for conn in held:
            self._wait(conn, self._join_from)
        return cuts

    def recheck_members(self, now: float, is_member: Callable[[bytes], bool]) -> None:
        """Connections whose member left (but stay open) must join again in time."""
        if not self.limits.join_timeout:
            return
        for conn in list(self._by_peer.values()):
            if conn.peer is not None and not is_member(conn.peer):
                del self._by_peer[conn.peer]
                conn.peer = None
                self._wait(conn, now + self.limits.join_timeout)

    def judge(self, fd: int, measure: Measure, now: float, *, pressure: bool = False) -> Cut | None:
        """Apply the byte bounds to one measured connection."""
        conn = self._conns.get(fd)
        if conn is None:
            return None
        limits = self.limits
        drift = DRIFT_PER_SECOND * max(0.0, now - conn.opened)
        if conn.kind is Kind.INPUT and limits.max_backlog:
            unread = measure.received - conn.consumed - drift
            if unread > limits.max_backlog:
                return self._cut(conn, f"{unread // KIB:.0f} KiB sent and not taken "
                                       "(an endless or flooding message)")
            unsent = conn.sent - measure.acked
            if unsent > limits.max_backlog:
                return self._cut(conn, f"{unsent // KIB:.0f} KiB of replies not read")
        elif conn.kind is Kind.BROADCAST:
            if limits.max_subscribe and measure.received - drift > (
                    limits.max_subscribe + HANDSHAKE_ALLOWANCE):
                return self._cut(conn, f"more than {limits.max_subscribe // KIB} KiB "
                                       "of subscriptions")
            if measure.notsent > 0 and measure.acked == conn.acked:
                if conn.stalled_since is None:
                    conn.stalled_since = now
                # Under memory pressure a reader stuck since the last look goes at once.
                if pressure or (limits.stall and now - conn.stalled_since > limits.stall):
                    return self._cut(conn, "stopped reading")
            else:
                conn.stalled_since = None
        conn.acked = measure.acked
        return None


# --------------------------------------------------------------------------
# The system calls


_TCP_INFO_SIZE: Final = 232
_ACKED_AT: Final = 120  # struct tcp_info: u64 tcpi_bytes_acked
_RECEIVED_AT: Final = 128  # u64 tcpi_bytes_received
_NOTSENT_AT: Final = 144  # u32 tcpi_notsent_bytes

_libc = ctypes.CDLL(None, use_errno=True)
_info = ctypes.create_string_buffer(_TCP_INFO_SIZE)
_info_len = ctypes.c_uint32(_TCP_INFO_SIZE)


def tcp_measure(fd: int) -> Measure | None:
    """The kernel's byte counters of a TCP descriptor; None if it has none."""
    _info_len.value = _TCP_INFO_SIZE
    if _libc.getsockopt(fd, socket.IPPROTO_TCP, socket.TCP_INFO, _info,
                        ctypes.byref(_info_len)) != 0:
        return None
    if _info_len.value < _NOTSENT_AT + 4:  # a kernel older than 4.6
        return None
    raw = _info.raw
    acked, received = struct.unpack_from("=QQ", raw, _ACKED_AT)
    (notsent,) = struct.unpack_from("=I", raw, _NOTSENT_AT)
    return Measure(acked, received, notsent)


def shutdown_fd(fd: int) -> bool:
    """End the connection on ``fd`` without closing the descriptor libzmq owns."""
    if _libc.shutdown(fd, socket.SHUT_RDWR) == 0:
        return True
    return ctypes.get_errno() not in (errno.EBADF, errno.ENOTSOCK)


def peer_address(fd: int) -> str:
    """The IP address at the other end of ``fd`` ("local" for ipc and inproc)."""
    try:
        dup = socket.socket(fileno=os.dup(fd))
    except OSError:
        return "local"
    try:
        name = dup.getpeername()
    except OSError:
        return "local"
    finally:
        dup.close()
    if isinstance(name, tuple):
        host = str(name[0])
        return host.removeprefix("::ffff:")
    return "local"


def seed_routing_ids() -> None:
    """Seed the C library's ``rand()`` before the ROUTER socket is made.

    libzmq starts a ROUTER's automatic routing ids (``0x00`` + 32-bit
    counter) from an unseeded ``rand()``, so without this the first id is
    ``00 6b8b4567`` in every run, and a peer that announces the next ids
    makes libzmq generate one that is taken (an assertion: the process
    aborts). Seeded from the OS's CSPRNG, the counter is a secret.
    """
    _libc.srand(ctypes.c_uint(secrets.randbits(32)))


def read_rss() -> int:
    """This process's resident memory in bytes (0 where /proc has none)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


_EVENTS: Final = int(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
_EVENT_HEAD = struct.Struct("=HI")


class Guard:
    """Watches the broker's sockets' connections and ends those past a bound.

    Args:
        limits: the bounds.
        capacity: connections at most (0: no cap).
        now: the clock at start.
    """

    def __init__(self, limits: ConnectionLimits, capacity: int, now: float) -> None:
        self.ledger = Ledger(limits, capacity)
        self._monitors: dict[zmq.Socket[Any], Kind] = {}
        self._auto_first = -1  # the ROUTER's first automatic id's counter, once probed
        self._input_accepts = 0
        self._next_scan = now + 1.0
        self._next_memory = now + MEMORY_CHECK
        self._rss_mark = read_rss()
        # Cuts by reason as they are carried out (not ``ledger.counts``: the
        # ledger counts a whole expiry before the first of it is logged).
        self._cut_log: dict[str, int] = {}

    # ------------------------------------------------------------- sockets

    def watch(self, sock: zmq.Socket[Any], kind: Kind,
              context: zmq.Context[Any]) -> zmq.Socket[Any]:
        """Monitor ``sock``'s connections; return the monitor socket to poll.

        Call before ``sock`` binds. Our end takes an unlimited queue before it
        connects: libzmq's end sends events blocking, so a full queue would
        stall its I/O thread, and a lost DISCONNECTED would leak an entry.
        """
        endpoint = f"inproc://zchat-monitor-{kind.value}-{secrets.token_hex(8)}"
        sock.monitor(endpoint, _EVENTS)
        monitor: zmq.Socket[Any] = context.socket(zmq.PAIR)
        monitor.setsockopt(zmq.RCVHWM, 0)
        monitor.setsockopt(zmq.LINGER, 0)
        monitor.connect(endpoint)
        self._monitors[monitor] = kind
        return monitor

    def close(self) -> None:
        for monitor in self._monitors:
            monitor.close()
        self._monitors.clear()

    @property
    def monitors(self) -> list[zmq.Socket[Any]]:
        return list(self._monitors)

    def probe_routing_ids(self, router: zmq.Socket[Any], context: zmq.Context[Any]) -> None:
        """Learn where the ROUTER's automatic ids start, with one inproc peer."""
        endpoint = f"inproc://zchat-probe-{secrets.token_hex(8)}"
        router.bind(endpoint)
        probe = context.socket(zmq.DEALER)
        probe.setsockopt(zmq.LINGER, 0)
        try:
            probe.connect(endpoint)
            probe.send(b"")
            if router.poll(2000):
                frames = router.recv_multipart()
                rid = frames[0]
                if len(rid) == 5 and rid[0] == 0:
                    self._auto_first = int.from_bytes(rid[1:], "big")
        finally:
            probe.close()
            router.unbind(endpoint)

    def plausible_routing_id(self, peer: bytes) -> bool:
        """False for an id in libzmq's own form (``0x00`` + 4 bytes) it never made.

        Automatic ids are a counter: those made so far lie between the probe's
        and the probe's plus the number of connections accepted since. An id
        of that form outside the range, or of another length, was chosen by
        the peer to collide with one libzmq will make.
        """
        if not peer or peer[0] != 0:
            return True
        if len(peer) != 5:
            return False  # libzmq makes no other id that starts with 0x00
        if self._auto_first < 0:
            return True  # the probe failed: nothing to compare with
        ahead = (int.from_bytes(peer[1:], "big") - self._auto_first) % (1 << 32)
        return ahead <= self._input_accepts

    def drain(self, monitor: zmq.Socket[Any], now: float,
              on_gone: Callable[[Kind, bytes], None]) -> None:
        """Take the monitor's events; ``on_gone`` hears of a member's connection closing."""
        kind = self._monitors[monitor]
        ledger = self.ledger
        while True:
            try:
                head, _endpoint = monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            event, fd = _EVENT_HEAD.unpack_from(head)
            if event == zmq.EVENT_ACCEPTED:
                if kind is Kind.INPUT:
                    self._input_accepts += 1
                cut = ledger.accepted(kind, fd, peer_address(fd), now)
                if cut is not None:
                    self.cut(cut)
            elif event == zmq.EVENT_DISCONNECTED:
                peer = ledger.disconnected(fd)
                if peer is not None:
                    on_gone(kind, peer)

    # ------------------------------------------------------------- actions

    def cut(self, cut: Cut) -> None:
        """End one connection and say so (throttled by reason in the caller's log)."""
        shutdown_fd(cut.fd)
        count = self._cut_log.get(cut.reason, 0) + 1
        self._cut_log[cut.reason] = count
        # The first of each reason at once, then every 100th: a flood stays readable.
        if count == 1 or count % 100 == 0:
            log.warning("dropped a %s connection from %s: %s%s", cut.kind.value, cut.addr,
                        cut.reason, f" ({count} so far)" if count > 1 else "")

    def check_sent(self, fd: int, now: float) -> None:
        """Measure one ROUTER peer at once (its replies piled up past the bound)."""
        measure = tcp_measure(fd)
        if measure is not None:
            cut = self.ledger.judge(fd, measure, now)
            if cut is not None:
                self.cut(cut)

    def next_deadline(self) -> float:
        deadline = min(self._next_scan, self._next_memory)
        waiting = self.ledger.next_deadline()
        return deadline if waiting is None else min(deadline, waiting)

    def tick(self, now: float, is_member: Callable[[bytes], bool]) -> None:
        """Expire, scan when due or when memory grew, and cut what breaks a bound."""
        ledger = self.ledger
        for cut in ledger.expire(now, is_member):
            self.cut(cut)
        pressure = False
        if now >= self._next_memory:
            self._next_memory = now + MEMORY_CHECK
            rss = read_rss()
            pressure = rss - self._rss_mark > MEMORY_STEP
            # Memory given back lowers the mark, so the next growth is seen too.
            self._rss_mark = min(self._rss_mark, rss)
        if pressure or now >= self._next_scan:
            ledger.recheck_members(now, is_member)
            self.scan(now, pressure=pressure)
            self._next_scan = now + max(1.0, len(ledger) / SCAN_PER_SECOND)
            if pressure:
                self._rss_mark = read_rss()

    def scan(self, now: float, *, pressure: bool = False) -> int:
        """Measure every TCP connection; return how many were cut."""
        ledger = self.ledger
        cuts = 0
        for fd, kind in list(ledger.connections()):
            if kind is Kind.CONTROL:
                continue
            measure = tcp_measure(fd)
            if measure is None:
                continue
            cut = ledger.judge(fd, measure, now, pressure=pressure)
            if cut is not None:
                self.cut(cut)
                cuts += 1
        if pressure:
            log.warning("memory grew by over %d MiB: measured %d connections, cut %d",
                        MEMORY_STEP // MIB, len(ledger), cuts)
        return cuts
