"""Load generator processes: many clients per process over raw sockets.

Each ``Worker`` process runs one epoll loop (``selectors``) over its
clients' TCP connections and over the pipe from the bench's main process,
which drives it by remote calls (``Handle.call(op, **args)`` -> reply dict).

A client looks like the real one to the system under test:

    framing   subscriber ("sub")                  publisher ("pub")
    zchat     DEALER join -> welcome, then SUB    DEALER join -> welcome, then
              (lobby and broker topics); pings    ``message`` frames; acks read
    ceiling   DEALER "join" echoed, then SUB      PUSH of [topic, event]
    epoll     one TCP connection: join, welcome,  join with sub=false, then
              then every broadcast                ``message`` frames

It is cheap where the load is: a subscriber's broadcast stream is never
decoded, only scanned (``StreamCounter``: count of message marks, and on
sampled subscribers the stamp of the first message of each read); a
publisher writes a whole batch of frames with one ``bytes.join``
(``MessageTemplate``), paced at its rate on a 1 ms tick. Each connection's
unsent bytes wait in its own buffer; past ``OUT_CAP`` a publisher stops
generating and counts the messages it could not offer (backpressure).

Its cost per delivery must stay far below the system's, or it measures
itself: a count-only process (``read_every``) reads each stream only when
16-128 KiB have piled up (``Worker._tune_interval``), into a receive buffer
large enough that the window never closes; sampled subscribers are read on
a timer (``pace``), not woken per message.

Defines: ``Target``, ``Worker``, ``Handle``, ``spawn``.
"""

from __future__ import annotations

import errno
import multiprocessing
import multiprocessing.connection
import os
import selectors
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from .wire import (
    LengthPrefixReader,
    MessageTemplate,
    StreamCounter,
    ZmtpReader,
    greeting,
    lp_frame,
    pack,
    ready,
    subscribe,
    zmtp_frame,
)

__all__ = ["Handle", "Target", "Worker", "spawn"]

ROOM_TOPIC: Final = b"lobby\x00"
BATCH_TOPIC: Final = b"\x01lobby\x00"  # zchat's coalesced events (PROTOCOL.md extension)
BROKER_TOPIC: Final = b"\x00"
OUT_CAP: Final = 4 << 20  # a publisher's unsent bytes before it stops offering
READ_BUFFER: Final = 1 << 20
TICK: Final = 0.001
# A count-only process reads each stream every READ_EVERY_MIN..MAX seconds,
# tuned so a read takes READ_LOW..READ_HIGH bytes (``Worker._tune_interval``).
READ_LOW: Final = 16 << 10
READ_HIGH: Final = 128 << 10
READ_EVERY_MIN: Final = 0.001
READ_EVERY_MAX: Final = 0.2
COUNT_RCVBUF: Final = 4 << 20  # a count-only stream's receive buffer (the kernel doubles it)
IDS_CYCLE: Final = 4096  # distinct message ids per publisher (the broker remembers 1,000)

PARSE, COUNT, DISCARD = 0, 1, 2


@dataclass(frozen=True)
class Target:
    """What to connect to: a system's framing and its endpoints."""

    framing: str  # "zchat", "zchat-batch", "ceiling" or "epoll"
    endpoints: dict[str, str]
    ping_interval: float = 5.0

    def address(self, key: str) -> tuple[str, int]:
        endpoint = self.endpoints[key].removeprefix("tcp://")
        host, _, port = endpoint.rpartition(":")
        return host.strip("[]"), int(port)


class Conn:
    """One TCP connection of a client, with its output buffer and read mode."""

    __slots__ = ("client", "connected", "counter", "events", "fd", "kind", "mode", "out",
                 "pending", "reader", "sock", "swept", "then")

    def __init__(self, client: Client, kind: str, sock: socket.socket,
                 reader: ZmtpReader | LengthPrefixReader) -> None:
        self.client = client
        self.kind = kind  # "dealer", "sub", "push" or "lp"
        self.sock = sock
        self.fd = sock.fileno()
        self.out = bytearray()
        self.pending: list[bytes] = []  # frames that wait for the peer's READY
        self.reader = reader
        self.mode = PARSE
        self.then = PARSE  # the mode once the handshake is done
        self.counter: StreamCounter | None = None
        self.connected = False
        self.events = 0  # what epoll watches for it now (0: not registered)
        self.swept = False  # read on the sweep timer instead of when epoll says


class Client:
    """One simulated user: its connections and where it is in joining."""

    __slots__ = ("batches", "dealer", "failed", "index", "live_conn", "name", "pub_conn",
                 "role", "sample", "settled", "started", "welcomed_at")

    def __init__(self, index: int, name: str, role: str, sample: bool) -> None:
        self.index = index
        self.name = name
        self.role = role
        self.sample = sample
        self.dealer: Conn | None = None  # the request connection (the only one for epoll)
        self.live_conn: Conn | None = None  # where broadcasts arrive
        self.pub_conn: Conn | None = None  # where a publisher writes
        self.welcomed_at = 0.0
        self.started = False
        self.settled = False  # welcomed or failed: no longer in the join window
        self.failed = ""
        self.batches = False  # its welcome offered batches (the library then takes them)


class Publisher:
    """Paces one publisher's messages at ``rate`` per second."""

    __slots__ = ("client", "dropped", "generated", "lag_max", "rate", "t0", "t_end",
                 "template", "total")

    def __init__(self, client: Client, template: MessageTemplate) -> None:
        self.client = client
        self.template = template
        self.rate = 0.0
        self.t0 = self.t_end = 0.0
        self.total = self.generated = self.dropped = 0
        self.lag_max = 0.0

    def start(self, t0: float, duration: float, rate: float) -> None:
        self.rate, self.t0, self.t_end = rate, t0, t0 + duration
        self.total = int(rate * duration)
        self.generated = self.dropped = 0
        self.lag_max = 0.0

    @property
    def active(self) -> bool:
        return self.generated < self.total

    def tick(self, now: float, write: Callable[[Conn, bytes], None]) -> None:
        if now < self.t0 or not self.active:
            return
        if now >= self.t_end:
            target = self.total  # (t_end - t0) * rate may round to one less
        else:
            target = min(self.total, int((now - self.t0) * self.rate))
        due = target - self.generated
        if due <= 0:
            return
        self.lag_max = max(self.lag_max, now - (self.t0 + (self.generated + 1) / self.rate))
        conn = self.client.pub_conn
        if conn is None or len(conn.out) > OUT_CAP:
            self.dropped += due
        else:
            write(conn, self.template.batch(due, now))
        self.generated = target


class Worker:
    """One load-generator process: its clients, publishers and event loop."""

    def __init__(self, pipe: multiprocessing.connection.Connection, target: Target) -> None:
        self.pipe = pipe
        self.target = target
        self.selector = selectors.EpollSelector()
        self.selector.register(pipe.fileno(), selectors.EVENT_READ, None)
        self.conns: dict[int, Conn] = {}
        self.clients: list[Client] = []
        self.publishers: list[Publisher] = []
        self.waiting: deque[Client] = deque()  # not started yet (join window)
        self.window = 64
        self.in_flight = 0
        self.pings: deque[tuple[float, Client]] = deque()
        self.buffer = bytearray(READ_BUFFER + 64)
        self.view = memoryview(self.buffer)
        self.running = True
        self.read_every = 0.0
        self._last_round = 0.0
        self._round_bytes = 0  # what count reads took since the interval was last tuned
        self._round_reads = 0
        self.sweep_every = 0.0
        self._next_sweep = 0.0
        self.swept: list[Conn] = []  # counting connections read on the sweep timer
        fr = target.framing
        self.ping_frame = (lp_frame if fr == "epoll" else zmtp_frame)(pack({"type": "ping"}))

    # ------------------------------------------------------------------ loop

    def run(self) -> None:
        select = self.selector.select
        while self.running:
            publishing = any(p.active for p in self.publishers)
            timeout = TICK if publishing else 0.05
            now = time.time()
            if self.read_every and not publishing:
                # Count-only readers: let data pile up so each read takes many
                # messages; the per-read cost, not the bytes, is what costs.
                self._tune_interval()
                pause = self._last_round + self.read_every - now
                if pause > 0:
                    time.sleep(pause)
                    now = time.time()
                self._last_round = now
            if self.pings:
                timeout = min(timeout, max(0.0, self.pings[0][0] - now))
            if self.sweep_every:
                timeout = min(timeout, max(0.0, self._next_sweep - now))
            for key, mask in select(timeout):
                conn = key.data
                if conn is None:
                    self._command()
                    continue
                if mask & selectors.EVENT_WRITE:
                    self._writable(conn)
                if mask & selectors.EVENT_READ and conn.fd in self.conns:
                    self._readable(conn)
            now = time.time()
            for publisher in self.publishers:
                publisher.tick(now, self._write)
            self._ping(now)
            if self.sweep_every and now >= self._next_sweep:
                self._sweep()
                self._next_sweep = time.time() + self.sweep_every
            self._start_waiting()
        for conn in list(self.conns.values()):
            self._close(conn)
        self.selector.close()

    def _tune_interval(self) -> None:
        """Keep a count read between ``READ_LOW`` and ``READ_HIGH`` bytes.

        Too small a read and the generator pays a syscall and a turn of
        Python per message or two (it measured itself: at S = 100 its count
        processes cost as much CPU per delivery as the C ceiling did). Too
        large, and unread bytes would fill the socket's receive window and
        make the system under test write in bigger batches than a client
        that reads promptly lets it: a flattering difference. Between the
        two, the system's writes are the same as for a prompt reader's.
        """
        if not self._round_reads:
            return
        # Every round: a step that starts at a high rate must shorten the
        # interval within a few rounds (quartered each time), while it only
        # lengthens slowly when reads are small.
        average = self._round_bytes / self._round_reads
        if average > READ_HIGH:
            self.read_every = max(READ_EVERY_MIN, self.read_every / 4)
        elif average < READ_LOW:
            self.read_every = min(READ_EVERY_MAX, self.read_every * 1.25)
        self._round_bytes = self._round_reads = 0

    def _start_waiting(self) -> None:
        while self.waiting and self.in_flight < self.window:
            client = self.waiting.popleft()
            client.started = True
            self.in_flight += 1
            self._open_client(client)

    def _ping(self, now: float) -> None:
        pings = self.pings
        interval = self.target.ping_interval
        while pings and pings[0][0] <= now:
            _, client = pings.popleft()
            if client.dealer is not None and client.dealer.fd in self.conns:
                self._write(client.dealer, self.ping_frame)
                pings.append((now + interval, client))

    # ------------------------------------------------------------- clients

    def _open_client(self, client: Client) -> None:
        fr = self.target.framing
        if fr == "epoll":
            conn = self._connect(client, "lp", "server", LengthPrefixReader())
            client.dealer = conn
            join = {"type": "join", "name": client.name, "sub": client.role == "sub"}
            conn.pending.append(lp_frame(pack(join)))
            self._flush_pending(conn)
        elif fr == "ceiling" and client.role == "pub":
            conn = self._connect(client, "push", "push", ZmtpReader(), b"PUSH")
            client.pub_conn = conn
            conn.then = DISCARD
        else:
            conn = self._connect(client, "dealer", "input", ZmtpReader(), b"DEALER")
            client.dealer = conn
            conn.pending.append(zmtp_frame(pack({"type": "join", "name": client.name,
                                                 "id": "join"})))

    def _connect(self, client: Client, kind: str, endpoint: str,
                 reader: ZmtpReader | LengthPrefixReader, zmtp_type: bytes = b"") -> Conn:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.read_every and kind in ("sub", "lp"):
            # A reader that waits between reads needs the room to hold what
            # arrives meanwhile, from the first step on: a window that closed
            # would make the system queue, batch or drop for us, and
            # autotuning grows the buffer only after reads have been large.
            # Set before connecting, so the window scale allows all of it.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, COUNT_RCVBUF)
        conn = Conn(client, kind, sock, reader)
        code = sock.connect_ex(self.target.address(endpoint))
        if code not in (0, errno.EINPROGRESS):
            client.failed = f"connect: {os.strerror(code)}"
        if zmtp_type:
            conn.out += greeting() + ready(zmtp_type.decode())
        self.conns[conn.fd] = conn
        self._watch(conn, selectors.EVENT_READ | selectors.EVENT_WRITE)
        return conn

    def _watch(self, conn: Conn, events: int) -> None:
        """Have epoll watch ``conn`` for ``events`` (a swept one never for reading)."""
        if conn.swept:
            events &= ~selectors.EVENT_READ
        if events == conn.events:
            return
        if not events:
            self.selector.unregister(conn.fd)
        elif not conn.events:
            self.selector.register(conn.fd, events, conn)
        else:
            self.selector.modify(conn.fd, events, conn)
        conn.events = events

    def _settle(self, client: Client) -> None:
        if client.started and not client.settled:
            client.settled = True
            self.in_flight -= 1

    def _welcomed(self, client: Client, now: float) -> None:
        client.welcomed_at = now
        self._settle(client)
        dealer = client.dealer
        if dealer is not None:
            # Spread pings over the interval, as real clients' joins would.
            phase = (client.index * 0.618034) % 1.0
            self.pings.append((now + self.target.ping_interval * (0.5 + phase / 2), client))
        fr = self.target.framing
        if client.role == "pub":
            if dealer is not None:
                dealer.mode = DISCARD
                client.pub_conn = dealer
            return
        if fr == "epoll" and dealer is not None:
            # The same connection now carries broadcasts: count from here on
            # (``_readable`` feeds the counter what was read past the welcome).
            self._count_from(dealer, client, b"")
            client.live_conn = dealer
            return
        sub = self._connect(client, "sub", "broadcast", ZmtpReader(), b"SUB")
        # As zchat's library does: batches when the welcome offers them
        # (coalescing is the default), the single-event topic otherwise.
        batched = self.target.framing == "zchat-batch" or client.batches
        room = BATCH_TOPIC if batched else ROOM_TOPIC
        sub.pending += [subscribe(room), subscribe(BROKER_TOPIC)]
        sub.then = COUNT
        client.live_conn = sub
        if dealer is not None:
            dealer.mode = DISCARD

    def _count_from(self, conn: Conn, client: Client, leftover: bytes) -> None:
        conn.mode = COUNT
        conn.counter = StreamCounter(sample=client.sample)
        conn.counter.feed(leftover)
        if self.sweep_every:
            conn.swept = True
            self._watch(conn, conn.events)
            self.swept.append(conn)

    def _sweep(self) -> None:
        """Read every swept connection until it has nothing more."""
        for conn in self.swept:
            if conn.fd in self.conns:
                for _ in range(8):
                    if not self._readable(conn):
                        break

    def _set_sweep(self, every: float) -> None:
        """Turn sweeping on or off; off puts the swept connections back in epoll."""
        self.sweep_every = every
        self._next_sweep = time.time() + every
        if every:
            return
        for conn in self.swept:
            conn.swept = False
            if conn.fd in self.conns:
                self._watch(conn, conn.events | selectors.EVENT_READ)
        self.swept = []

    def _on_message(self, conn: Conn, parts: list[bytes], now: float) -> None:
        client = conn.client
        if client.welcomed_at or conn.kind not in ("dealer", "lp"):
            return
        body = parts[-1]
        head = body[:24]
        if self.target.framing == "ceiling" or b"\xa7welcome" in head:
            client.batches = b"\xa5batch\xc3" in body  # "batch": true
            self._welcomed(client, now)
        elif b"\xa5error" in head:
            client.failed = f"join refused: {body[:200]!r}"
            self._settle(client)

    # ------------------------------------------------------------------ I/O

    def _write(self, conn: Conn, data: bytes) -> None:
        if conn.out or not conn.connected:
            conn.out += data
            return
        try:
            sent = conn.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            conn.client.failed = f"send: {exc}"
            return
        if sent < len(data):
            conn.out += data[sent:]
            self._watch(conn, selectors.EVENT_READ | selectors.EVENT_WRITE)

    def _writable(self, conn: Conn) -> None:
        if not conn.connected:
            code = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                conn.client.failed = f"connect: {os.strerror(code)}"
                self._lost(conn)
                return
            conn.connected = True
        if conn.out:
            try:
                sent = conn.sock.send(conn.out)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                conn.client.failed = f"send: {exc}"
                self._close(conn)
                return
            del conn.out[:sent]
        if not conn.out:
            self._watch(conn, selectors.EVENT_READ)

    def _flush_pending(self, conn: Conn) -> None:
        if conn.pending:
            data = b"".join(conn.pending)
            conn.pending.clear()
            self._write(conn, data)

    def _readable(self, conn: Conn) -> bool:
        """Read what ``conn`` has; True if a count read filled the buffer."""
        now = time.time()
        if conn.mode == COUNT and conn.counter is not None:
            counter = conn.counter
            tail = counter.tail
            start = len(tail)
            self.buffer[:start] = tail
            try:
                size = conn.sock.recv_into(self.view[start:READ_BUFFER + start])
            except BlockingIOError:
                return False
            except OSError:
                size = 0
            if size == 0:
                self._lost(conn)
                return False
            counter.scan(self.buffer, start + size, now)
            self._round_bytes += size
            self._round_reads += 1
            return size == READ_BUFFER
        if conn.mode == DISCARD:
            try:
                size = conn.sock.recv_into(self.view[:READ_BUFFER])
            except BlockingIOError:
                return False
            except OSError:
                size = 0
            if size == 0:
                self._lost(conn)
            return False
        try:
            data = conn.sock.recv(1 << 16)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            self._lost(conn)
            return False
        reader = conn.reader
        was_ready = reader.ready
        try:
            messages = reader.feed(data)
        except ConnectionError as exc:
            conn.client.failed = str(exc)
            self._close(conn)
            return False
        if reader.ready and not was_ready:
            self._flush_pending(conn)
            if conn.then == COUNT:
                self._count_from(conn, conn.client, reader.rest())
                return False
            if conn.then == DISCARD:
                conn.mode = DISCARD
                if conn.client.role == "pub" and not conn.client.welcomed_at:
                    self._welcomed(conn.client, now)  # a PUSH is ready once greeted
                return False
        for at, parts in enumerate(messages):
            self._on_message(conn, parts, now)
            if conn.mode != PARSE:
                if conn.mode == COUNT and conn.counter is not None:
                    later = b"".join(lp_frame(p[-1]) for p in messages[at + 1:])
                    conn.counter.feed(later + reader.rest(), now)
                break
        return False

    def _lost(self, conn: Conn) -> None:
        if not conn.client.failed:
            conn.client.failed = f"{conn.kind} connection closed by the peer"
        self._settle(conn.client)
        self._close(conn)

    def _close(self, conn: Conn) -> None:
        if self.conns.pop(conn.fd, None) is not None:
            if conn.events:
                self.selector.unregister(conn.fd)
                conn.events = 0
            conn.sock.close()

    # ------------------------------------------------------------- commands

    def _command(self) -> None:
        request: dict[str, Any] = self.pipe.recv()
        op = request.pop("op")
        reply = getattr(self, f"op_{op}")(**request)
        self.pipe.send(reply if reply is not None else {})

    def op_stop_joining(self) -> dict[str, Any]:
        """Start no more clients; say how many never started."""
        never = len(self.waiting)
        self.waiting.clear()
        return {"never_started": never}

    def op_pace(self, sweep_every: float) -> None:
        """Read subscribers' streams on a timer (seconds) or, with 0, as data comes."""
        self._set_sweep(sweep_every)

    def op_add(self, clients: list[tuple[int, str, str, bool]], window: int = 64,
               read_every: float = 0.0) -> None:
        """Add clients (index, name, role, sample); they join ``window`` at a time.

        ``read_every`` > 0 makes the loop turn at most that often (seconds),
        for processes that only count and need not read promptly.
        """
        self.window = window
        self.read_every = read_every
        fr = self.target.framing
        for index, name, role, sample in clients:
            client = Client(index, name, role, sample)
            self.clients.append(client)
            self.waiting.append(client)
            if role == "pub":
                self.publishers.append(Publisher(client, _template(fr, name)))

    def op_status(self) -> dict[str, Any]:
        """How far joining went, messages counted, this process's CPU time."""
        subs = [c for c in self.clients if c.role == "sub"]
        live = count = 0
        for client in subs:
            conn = client.live_conn
            if conn is not None and conn.counter is not None:
                count += conn.counter.count
                live += conn.counter.count > 0
        failed = [f"{c.name}: {c.failed}" for c in self.clients if c.failed]
        return {
            "clients": len(self.clients),
            "welcomed": sum(1 for c in self.clients if c.welcomed_at),
            "live": live,
            "count": count,
            "failed": len(failed),
            "failures": failed[:3],
            "cpu": time.process_time(),
            "wall": time.time(),
            "fds": len(self.conns),
        }

    def op_publish(self, t0: float, duration: float, rate: float) -> None:
        """Every publisher here sends ``rate`` messages/s from ``t0`` for ``duration``."""
        for publisher in self.publishers:
            publisher.start(t0, duration, rate)

    def op_published(self) -> dict[str, Any]:
        """Per-step publisher figures (messages generated, unsent, dropped, lag)."""
        unsent = 0
        for pub in self.publishers:
            conn = pub.client.pub_conn
            if conn is not None:
                unsent += len(conn.out) // pub.template.size
        return {
            "active": any(p.active for p in self.publishers),
            "offered": sum(p.total for p in self.publishers),
            "generated": sum(p.generated for p in self.publishers),
            "dropped": sum(p.dropped for p in self.publishers),
            "unsent": unsent,
            "lag_max": max((p.lag_max for p in self.publishers), default=0.0),
            "cpu": time.process_time(),
        }

    def op_send_one(self, text: str) -> dict[str, Any]:
        """The first publisher sends one message with ``text``; returns when it wrote it."""
        for pub in self.publishers:
            conn = pub.client.pub_conn
            if conn is not None and conn.fd in self.conns:
                frame = _one_frame(self.target.framing, pub.client.name, text)
                sent_at = time.time()
                self._write(conn, frame)
                return {"sent_at": sent_at}
        return {"sent_at": 0.0}

    def op_samples(self) -> dict[str, Any]:
        """Latencies sampled since the last call (and forget them)."""
        out: list[float] = []
        for client in self.clients:
            conn = client.live_conn
            if conn is not None and conn.counter is not None and conn.counter.latencies:
                out += conn.counter.latencies
                conn.counter.latencies = []
        return {"latencies": out}

    def op_watch(self, token: bytes) -> dict[str, Any]:
        """Note when ``token`` reaches each subscriber; say how many watch."""
        watching = 0
        for client in self.clients:
            conn = client.live_conn
            if conn is not None and conn.counter is not None and conn.fd in self.conns:
                conn.counter.watch(token)
                watching += 1
        return {"watching": watching}

    def op_watched(self) -> dict[str, Any]:
        seen = [c.live_conn.counter.seen_at for c in self.clients
                if c.live_conn is not None and c.live_conn.counter is not None
                and c.live_conn.counter.seen_at]
        return {"seen": len(seen), "last": max(seen, default=0.0)}

    def op_stop(self) -> None:
        self.running = False


def _template(framing: str, name: str) -> MessageTemplate:
    if framing.startswith("zchat"):
        run = os.urandom(4).hex()  # ids of one run never meet an earlier run's
        return MessageTemplate.build(
            lambda text, rid: zmtp_frame(pack({"type": "message", "id": f"{run}{rid}",
                                               "text": text})),
            ids=IDS_CYCLE,
        )
    if framing == "ceiling":
        return MessageTemplate.build(lambda text, rid: _ceiling_frames(name, text))
    return MessageTemplate.build(
        lambda text, rid: lp_frame(pack({"type": "message", "text": text}))
    )


def _ceiling_frames(name: str, text: str) -> bytes:
    # The same event map zchat's broker publishes (seq as uint32, ts a float).
    event = {"type": "message", "room": "lobby", "seq": 1 << 16, "ts": time.time(),
             "from": name, "text": text}
    return zmtp_frame(ROOM_TOPIC, more=True) + zmtp_frame(pack(event))


def _one_frame(framing: str, name: str, text: str) -> bytes:
    if framing.startswith("zchat"):
        return zmtp_frame(pack({"type": "message", "text": text}))
    if framing == "ceiling":
        return _ceiling_frames(name, text)
    return lp_frame(pack({"type": "message", "text": text}))


def worker_main(pipe: multiprocessing.connection.Connection, target: Target) -> None:
    """A worker process's entry point."""
    try:
        Worker(pipe, target).run()
    except KeyboardInterrupt:
        pass
    finally:
        pipe.close()


class Handle:
    """The main process's end of one worker process: the process and its call pipe.

    ``main(pipe, *args)`` runs in a fresh (spawned) process and answers each
    ``{"op": ..., **args}`` it reads from ``pipe`` with one reply; ``stop``
    asks it to end, then kills it if it does not.
    """

    def __init__(self, name: str, main: Callable[..., None] = worker_main,
                 *args: Any) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.name = name
        self.pipe, child = ctx.Pipe()
        self.process = ctx.Process(target=main, args=(child, *args), name=name, daemon=True)
        self.process.start()
        child.close()

    def call(self, op: str, timeout: float = 60.0, **args: Any) -> dict[str, Any]:
        self.pipe.send({"op": op, **args})
        if not self.pipe.poll(timeout):
            raise TimeoutError(f"worker {self.name} did not answer {op!r} in {timeout}s")
        reply: dict[str, Any] = self.pipe.recv()
        return reply

    def stop(self) -> None:
        if self.process.is_alive():
            try:
                self.call("stop", timeout=10)
            except (OSError, EOFError, TimeoutError):
                pass
            self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.pipe.close()
        self.process.close()


def spawn(name: str, target: Target) -> Handle:
    """Start one worker process for ``target``."""
    return Handle(name, worker_main, target)
