"""The join storm: N clients join one room at one instant.

Every client is a real ZeroMQ peer on its own TCP connections (a DEALER to
the input, a SUB to the broadcast socket, spoken in ZMTP 3 by raw
non-blocking sockets, see ``wire``), from its own loopback address
(``127.0.x.y``, ``per_address`` clients each), so that the broker runs as
shipped, with its per-address limits on. The storm goes in phases:

1. **Connect.** Generator processes (``processes``) open every DEALER and
   SUB and finish the handshakes; each SUB subscribes to ``lobby`` and the
   broker-wide topic. Nobody has joined yet.
2. **Storm.** At one instant ``t0`` each process writes every one of its
   clients' ``join`` (a few milliseconds for thousands). From then on each
   client pings every heartbeat interval, as a real one must.
3. **Measure.** ``welcome_all_s``: ``t0`` until the last ``welcome``.
   ``last_seq_all_s``: ``t0`` until the last client has seen the room's
   last seq (the broker's own count, asked on its operator channel once
   everyone is welcomed), in its ``welcome`` or as an event on its SUB. A
   SUB's stream is never decoded: the last ``seq`` in each read is found
   with ``rfind`` (events arrive in seq order, so the last is the highest).
4. **Hold.** Everyone keeps pinging for ``hold_seconds``; then the broker
   must still count every client as a member, with no timeout, and no
   client may have been told ``bye`` or lost a connection.

The broker's resident memory is read before any connection, when all are
connected, and after the storm: ``kib_per_client`` is the growth from the
first to the last over N (libzmq's buffers for two connections included).

The ceiling is the same storm against ``ceiling`` (libzmq in C: a ROUTER
that echoes each ``join`` at once); its ``welcome_all_s`` is the fastest
answer N joins can get here, and ``x ceiling`` compares zchat's time to
the last seq with it.

Defines: ``StormSettings``, ``run_storm``, ``fitting``, ``table``.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import re
import resource
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgpack

from . import profiler, systems
from .loadgen import Handle
from .wire import ZmtpReader, greeting, pack, ready, subscribe, zmtp_frame

__all__ = ["StormSettings", "fitting", "last_seq", "ratios", "run_storm", "source_address", "table"]

SEQ_MARK: Final = b"\xa3seq"  # the MessagePack key "seq" (a heartbeat's "seqs" is \xa4seqs)
ROOM_TOPIC: Final = b"lobby\x00"
BROKER_TOPIC: Final = b"\x00"
READ_SIZE: Final = 1 << 18
CONNECTING: Final = 40  # handshakes in flight per process: libzmq's accept queue is 100
PACE: Final = 0.01  # once the storm is on, a process reads at most this often
FD_SPARE: Final = 200  # descriptors a broker keeps for itself (its reserve, files, sockets)
LOOPBACK: Final = "tcp://127.0.0.1:0"

Progress = Callable[[str], None]


@dataclass
class StormSettings:
    """One storm's knobs; ``clients`` 0 means as many as the broker can hold."""

    clients: int = 0
    processes: int = 2
    per_address: int = 100  # clients on one loopback source address
    heartbeat: float = 5.0  # the broker's default; clients ping this often
    hold_seconds: float = 10.0
    connect_timeout: float = 60.0
    storm_timeout: float = 180.0
    systems: tuple[str, ...] = ("zchat", "ceiling")
    profile_dir: str = ""  # if set, py-spy records the zchat broker during the storm, here


def fitting(requested: int) -> int:
    """``requested`` (0: all), or fewer if one broker's open-file limit cannot hold them."""
    _, hard = systems.raise_fd_limits(1 << 20)
    most = max(1, (hard - FD_SPARE) // 2)
    return most if requested <= 0 else min(requested, most)


# ----------------------------------------------------------------- the worker


def _int_at(data: bytes, at: int) -> int | None:
    """The MessagePack unsigned int at ``data[at:]``; None if cut short or not one."""
    if at >= len(data):
        return None
    head = data[at]
    if head < 0x80:
        return head
    width = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}.get(head)
    if width is None or at + 1 + width > len(data):
        return None
    return int.from_bytes(data[at + 1:at + 1 + width], "big")


def last_seq(data: bytes) -> int:
    """The seq of the last complete room event in ``data`` (-1 if none)."""
    end = len(data)
    while (pos := data.rfind(SEQ_MARK, 0, end)) >= 0:
        value = _int_at(data, pos + len(SEQ_MARK))
        if value is not None:
            return value
        end = pos
    return -1


class _Client:
    __slots__ = ("bye", "dealer", "failed", "index", "name", "seen", "seen_at", "sub",
                 "welcome_seq", "welcomed_at")

    def __init__(self, index: int, name: str) -> None:
        self.index = index
        self.name = name
        self.dealer: _Conn | None = None
        self.sub: _Conn | None = None
        self.welcomed_at = 0.0
        self.welcome_seq = -1
        self.seen = -1  # the highest seq this client has seen (welcome or SUB)
        self.seen_at = 0.0
        self.failed = ""
        self.bye = ""


class _Conn:
    __slots__ = ("client", "greeted", "kind", "out", "reader", "sock", "tail")

    def __init__(self, client: _Client, kind: str, sock: socket.socket) -> None:
        self.client = client
        self.kind = kind
        self.sock = sock
        self.out = bytearray()
        self.reader = ZmtpReader()
        self.greeted = False  # the peer's READY is in
        self.tail = b""  # a SUB's last bytes, for a mark cut by a read


class StormWorker:
    """One generator process: its clients' sockets and one epoll loop."""

    def __init__(self, pipe: multiprocessing.connection.Connection) -> None:
        self.pipe = pipe
        self.selector = selectors.EpollSelector()
        self.selector.register(pipe.fileno(), selectors.EVENT_READ, None)
        self.clients: list[_Client] = []
        self.framing = "zchat"
        self.heartbeat = 5.0
        self.fire_at = 0.0
        self.fired = False
        self.pings: deque[tuple[float, _Client]] = deque()
        # Connections still to open (SUBs first: only a DEALER has a join timeout).
        self.to_open: deque[tuple[_Client, str]] = deque()
        self.opening = 0
        self.addrs: dict[str, tuple[str, int]] = {}
        self.sources: dict[int, str] = {}
        self.lost = 0
        self.running = True

    def run(self) -> None:
        select = self.selector.select
        while self.running:
            turn = time.monotonic()
            now = time.time()
            timeout = 0.05
            if self.fire_at and not self.fired:
                timeout = min(timeout, max(0.0, self.fire_at - now))
            if self.pings:
                timeout = min(timeout, max(0.0, self.pings[0][0] - now))
            for key, mask in select(timeout):
                conn = key.data
                if conn is None:
                    self._command()
                    continue
                if mask & selectors.EVENT_WRITE:
                    self._flush(conn)
                if mask & selectors.EVENT_READ:
                    self._read(conn)
            now = time.time()
            self._open_more()
            if self.fire_at and not self.fired and now >= self.fire_at:
                self._fire(now)
            self._ping(now)
            if self.fired:
                # Let bytes pile up between turns: a read per event would
                # make the generator, not the broker, the slow part.
                pause = PACE - (time.monotonic() - turn)
                if pause > 0:
                    time.sleep(pause)
        for client in self.clients:
            for conn in (client.dealer, client.sub):
                if conn is not None:
                    conn.sock.close()

    # ------------------------------------------------------------- commands

    def _command(self) -> None:
        try:
            request = self.pipe.recv()
        except EOFError:
            self.running = False
            return
        op = request.pop("op")
        reply: dict[str, Any] = getattr(self, f"_op_{op}")(**request)
        self.pipe.send(reply)

    def _op_open(self, clients: list[tuple[int, str, str]], framing: str,
                 input_addr: tuple[str, int], broadcast_addr: tuple[str, int],
                 heartbeat: float) -> dict[str, Any]:
        self.framing = framing
        self.heartbeat = heartbeat
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        self.addrs = {"dealer": input_addr, "sub": broadcast_addr}
        for index, name, source in clients:
            client = _Client(index, name)
            self.clients.append(client)
            self.sources[index] = source
        self.to_open.extend((c, "sub") for c in self.clients)
        self.to_open.extend((c, "dealer") for c in self.clients)
        return {"clients": len(self.clients)}

    def _open_more(self) -> None:
        """Open connections while fewer than ``CONNECTING`` handshakes are under way.

        A listener's accept queue is short (libzmq asks for 100): thousands of
        SYNs at once are dropped and retried 1, 3, 7 s later, which would make
        the connect phase outlast the broker's join timeout.
        """
        while self.to_open and self.opening < CONNECTING:
            client, kind = self.to_open.popleft()
            source = self.sources[client.index]
            zmtp_type = b"DEALER" if kind == "dealer" else b"SUB"
            conn = self._connect(client, kind, source, self.addrs[kind], zmtp_type)
            if kind == "dealer":
                client.dealer = conn
            else:
                client.sub = conn
            self.opening += 1

    def _op_status(self, final: int = -1) -> dict[str, Any]:
        clients = self.clients
        cpu = os.times()
        return {
            "dealers": sum(1 for c in clients if c.dealer is not None and c.dealer.greeted),
            "subs": sum(1 for c in clients if c.sub is not None and c.sub.greeted),
            "welcomed": sum(1 for c in clients if c.welcomed_at),
            "failed": sum(1 for c in clients if c.failed),
            "seen": sum(1 for c in clients if final >= 0 and c.welcomed_at and c.seen >= final),
            "max_welcome_seq": max((c.welcome_seq for c in clients), default=-1),
            "cpu": cpu.user + cpu.system,
        }

    def _op_fire(self, at: float) -> dict[str, Any]:
        self.fire_at = at
        return {}

    def _op_report(self, t0: float, final: int) -> dict[str, Any]:
        clients = self.clients
        welcomed = [c.welcomed_at - t0 for c in clients if c.welcomed_at]
        # A client has the last seq once it is welcomed too (its SUB may be first).
        seen = [max(c.seen_at, c.welcomed_at) - t0 for c in clients
                if c.welcomed_at and c.seen >= final and c.seen_at]
        byes: dict[str, int] = {}
        for c in clients:
            if c.bye:
                byes[c.bye] = byes.get(c.bye, 0) + 1
        return {
            "welcomed": welcomed,
            "seen": seen,
            "failures": [c.failed for c in clients if c.failed][:3],
            "failed": sum(1 for c in clients if c.failed),
            "byes": byes,
            "lost": self.lost,
        }

    def _op_stop(self) -> dict[str, Any]:
        self.running = False
        return {}

    # ------------------------------------------------------------- sockets

    def _connect(self, client: _Client, kind: str, source: str, addr: tuple[str, int],
                 zmtp_type: bytes) -> _Conn:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((source, 0))
        conn = _Conn(client, kind, sock)
        sock.connect_ex(addr)
        conn.out += greeting() + ready(zmtp_type.decode())
        self.selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)
        return conn

    def _write(self, conn: _Conn, data: bytes) -> None:
        if conn.out:
            conn.out += data
            return
        try:
            sent = conn.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            conn.client.failed = conn.client.failed or f"send: {exc}"
            return
        if sent < len(data):
            conn.out += data[sent:]
            self.selector.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)

    def _flush(self, conn: _Conn) -> None:
        if conn.out:
            try:
                sent = conn.sock.send(conn.out)
            except BlockingIOError:
                return
            except OSError as exc:
                conn.client.failed = conn.client.failed or f"connect: {exc}"
                self._lose(conn)
                return
            del conn.out[:sent]
        if not conn.out:
            self.selector.modify(conn.sock, selectors.EVENT_READ, conn)

    def _lose(self, conn: _Conn) -> None:
        self.lost += 1
        if not conn.greeted:
            self.opening -= 1
        try:
            self.selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
        if conn.kind == "dealer":
            conn.client.dealer = None
        else:
            conn.client.sub = None

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._lose(conn)
            return
        now = time.time()
        client = conn.client
        if conn.kind == "sub" and conn.greeted:
            data = conn.tail + data
            seq = last_seq(data)
            if seq > client.seen:
                client.seen, client.seen_at = seq, now
            conn.tail = data[-16:]
            return
        try:
            messages = conn.reader.feed(data)
        except ConnectionError as exc:
            client.failed = client.failed or str(exc)
            self._lose(conn)
            return
        if conn.reader.ready and not conn.greeted:
            conn.greeted = True
            self.opening -= 1
            if conn.kind == "sub":
                self._write(conn, subscribe(ROOM_TOPIC) + subscribe(BROKER_TOPIC))
                rest = conn.reader.rest()
                if rest:
                    self._read_rest(conn, rest, now)
                return
        for parts in messages:
            self._reply(client, parts[-1], now)

    def _read_rest(self, conn: _Conn, rest: bytes, now: float) -> None:
        seq = last_seq(rest)
        if seq > conn.client.seen:
            conn.client.seen, conn.client.seen_at = seq, now
        conn.tail = rest[-16:]

    def _reply(self, client: _Client, payload: bytes, now: float) -> None:
        if self.framing == "ceiling":  # the echo of the join is its answer
            if not client.welcomed_at:
                client.welcomed_at = client.seen_at = now
                client.welcome_seq = client.seen = 0
            return
        head = payload[:16]
        if b"\xa4pong" in head:
            return
        body = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        kind = body.get("type")
        if kind == "welcome" and not client.welcomed_at:
            client.welcomed_at = now
            client.welcome_seq = seq = int(body["seq"])
            if seq > client.seen:
                client.seen, client.seen_at = seq, now
        elif kind == "error":
            client.failed = client.failed or f"{body.get('code')}: {body.get('detail')}"
        elif kind == "bye":
            client.bye = str(body.get("reason"))

    # ---------------------------------------------------------------- storm

    def _fire(self, now: float) -> None:
        self.fired = True
        for client in self.clients:
            if client.dealer is not None:
                join = pack({"type": "join", "name": client.name, "id": "j"})
                self._write(client.dealer, zmtp_frame(join))
        # Each client pings every heartbeat, at its own phase, as real ones do.
        ordered = sorted(self.clients, key=lambda c: (c.index * 0.618034) % 1.0)
        self.pings = deque((now + self.heartbeat * ((c.index * 0.618034) % 1.0), c)
                           for c in ordered)

    def _ping(self, now: float) -> None:
        frame = zmtp_frame(pack({"type": "ping"}))
        pings = self.pings
        while pings and pings[0][0] <= now:
            due, client = pings.popleft()
            if client.dealer is not None:
                self._write(client.dealer, frame)
            pings.append((due + self.heartbeat, client))


def _worker_main(pipe: multiprocessing.connection.Connection) -> None:
    StormWorker(pipe).run()


# ------------------------------------------------------------ the systems


def _start(name: str, heartbeat: float) -> systems.Running:
    """``ceiling`` as the bench knows it; ``zchat`` as shipped, only its ports chosen."""
    if name != "zchat":
        return systems.start(name)
    data_dir = tempfile.mkdtemp(prefix="zchat-storm-")
    argv = [sys.executable, "-m", "zchat.broker.main", "--input", LOOPBACK,
            "--broadcast", LOOPBACK, "--control", LOOPBACK, "--quiet",
            "--heartbeat", f"{heartbeat:g}", "--db", f"{data_dir}/history.db"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.stdout is None:  # pragma: no cover - PIPE was asked
        raise systems.StartError("no pipe to the broker")
    first = proc.stdout.readline()
    endpoints = dict(re.findall(r"(\w+)=(tcp://\S+)", first.decode(errors="replace")))
    run = systems.Running(name, proc, endpoints, data_dir=data_dir)
    for stream, keep in ((proc.stdout, run.stdout), (proc.stderr, run.stderr)):
        reader = threading.Thread(target=_drain, args=(stream, keep), daemon=True)
        reader.start()
        run._readers.append(reader)
    if "input" not in endpoints:
        run.stop()
        raise systems.StartError(f"zchat did not start: {run.errors()}")
    return run


def _drain(stream: Any, keep: list[bytes]) -> None:
    while chunk := stream.read1(1 << 16):
        if sum(map(len, keep)) < 64 << 10:
            keep.append(chunk)


def _address(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    return host.strip("[]"), int(port)


def _stats(run: systems.Running) -> dict[str, Any]:
    """The broker's counters, from its operator channel (zchat only)."""
    import zmq  # only here: the generator processes need no libzmq

    ctx: zmq.Context[Any] = zmq.Context.instance()
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        # One PAIR per attempt, as zchat-admin does (PAIR does not reconnect).
        sock = ctx.socket(zmq.PAIR)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(run.endpoints["control"])
            sock.send(pack({"type": "stats", "id": "storm"}))
            if sock.poll(2000):
                reply = msgpack.unpackb(sock.recv(), raw=False)
                if reply.get("id") == "storm" and "stats" in reply:
                    stats: dict[str, Any] = reply["stats"]
                    return stats
        finally:
            sock.close()
    raise TimeoutError("the broker did not answer stats on its operator channel")


def source_address(index: int, per_address: int) -> str:
    """Client ``index``'s loopback address: ``per_address`` clients share one."""
    group = index // max(1, per_address)
    return f"127.0.{1 + group // 250}.{1 + group % 250}"


def _wait(what: str, predicate: Callable[[], tuple[bool, str]], timeout: float,
          say: Progress) -> tuple[bool, float]:
    started = time.monotonic()
    last = started
    while True:
        done, line = predicate()
        now = time.monotonic()
        if done or now - started > timeout:
            return done, now - started
        if now - last >= 2.0:
            say(f"    {what}: {line} after {now - started:.0f}s")
            last = now
        time.sleep(0.05)


def run_storm(name: str, clients: int, cfg: StormSettings, say: Progress) -> dict[str, Any]:
    """One storm of ``clients`` joins against system ``name`` (``zchat`` or ``ceiling``)."""
    result: dict[str, Any] = {"system": name, "clients": clients, "error": None}
    run = _start(name, cfg.heartbeat)
    handles: list[Handle] = []
    try:
        time.sleep(0.2)  # the broker's resident memory at rest, before anyone connects
        rss0 = run.rss_bytes()
        processes = max(1, min(cfg.processes, clients))
        handles = [Handle(f"storm-{name}-{w}", _worker_main) for w in range(processes)]
        input_addr = _address(run.endpoints["input"])
        broadcast_addr = _address(run.endpoints["broadcast"])
        for w, handle in enumerate(handles):
            mine = [(i, f"s{i}", source_address(i, cfg.per_address))
                    for i in range(w, clients, processes)]
            handle.call("open", clients=mine, framing=systems.SYSTEMS[name][0],
                        input_addr=input_addr, broadcast_addr=broadcast_addr,
                        heartbeat=cfg.heartbeat)

        def connected() -> tuple[bool, str]:
            states = [h.call("status") for h in handles]
            dealers = sum(s["dealers"] for s in states)
            subs = sum(s["subs"] for s in states)
            return dealers >= clients and subs >= clients, f"{dealers} DEALERs, {subs} SUBs"

        ok, connect_s = _wait(f"{name} connect", connected, cfg.connect_timeout, say)
        if not ok:
            raise TimeoutError(f"only {connected()[1]} of {clients} connected")
        # libzmq applies a subscription in its I/O thread: give the last few a beat.
        time.sleep(0.2)
        rss1 = run.rss_bytes()
        cpu0 = [h.call("status")["cpu"] for h in handles]
        sys_cpu0 = run.cpu_seconds()
        threads0 = systems.thread_cpu(run.pid)
        recording = None
        if cfg.profile_dir and name == "zchat":
            recording = profiler.Recording(run.pid, Path(cfg.profile_dir) / f"storm-{clients}.txt")
        t0 = time.time() + 0.3
        for handle in handles:
            handle.call("fire", at=t0)
        say(f"  {name:<8} N={clients}: {clients} DEALERs and SUBs connected in "
            f"{connect_s:.1f}s; every join goes at once")
        final = -1

        def welcomed() -> tuple[bool, str]:
            states = [h.call("status") for h in handles]
            done = sum(s["welcomed"] for s in states)
            failed = sum(s["failed"] for s in states)
            return done + failed >= clients, f"{done}/{clients} welcomed, {failed} failed"

        _wait(f"{name} storm", welcomed, cfg.storm_timeout, say)
        final = int(_stats(run)["seq"]) if name == "zchat" else 0

        def seen() -> tuple[bool, str]:
            states = [h.call("status", final=final) for h in handles]
            done = sum(s["seen"] for s in states)
            return done >= clients, f"{done}/{clients} have seen seq {final}"

        left = max(1.0, cfg.storm_timeout - (time.time() - t0))
        _wait(f"{name} last seq", seen, left, say)
        storm_wall = time.time() - t0
        cpu = [round((h.call("status")["cpu"] - c) / storm_wall * 100, 1)
               for h, c in zip(handles, cpu0, strict=True)]
        system_cpu = round((run.cpu_seconds() - sys_cpu0) / storm_wall * 100, 1)
        threads: dict[str, float] = {}
        for tid, (thread, seconds) in systems.thread_cpu(run.pid).items():
            used = seconds - threads0.get(tid, (thread, 0.0))[1]
            threads[thread] = round(threads.get(thread, 0.0) + used, 2)
        result["thread_cpu_s"] = {k: v for k, v in threads.items() if v >= 0.01}
        if recording is not None:
            result["profile"] = recording.stop()
            say(profiler.render(result["profile"]))
        rss2 = run.rss_bytes()
        reports = [h.call("report", t0=t0, final=final) for h in handles]
        welcome_times = sorted(t for r in reports for t in r["welcomed"])
        seen_times = sorted(t for r in reports for t in r["seen"])
        result.update({
            "connect_s": round(connect_s, 2),
            "welcomed": len(welcome_times),
            "failed": sum(r["failed"] for r in reports),
            "failures": [f for r in reports for f in r["failures"]][:3],
            "last_seq": final,
            "seen_last_seq": len(seen_times),
            "welcome_p50_s": _at(welcome_times, 0.5),
            "welcome_all_s": round(welcome_times[-1], 3) if welcome_times else None,
            "last_seq_all_s": (round(seen_times[-1], 3)
                               if len(seen_times) >= clients else None),
            "system_cpu_pct": system_cpu,
            "generator_cpu_pct": cpu,
            "rss_idle_mib": round(rss0 / 2**20, 1),
            "rss_connected_mib": round(rss1 / 2**20, 1),
            "rss_joined_mib": round(rss2 / 2**20, 1),
            "kib_per_client": round((rss2 - rss0) / clients / 1024, 1),
            "kib_per_client_connected": round((rss1 - rss0) / clients / 1024, 1),
        })
        say(f"  {name:<8} N={clients}: welcomed {len(welcome_times)}/{clients} "
            f"(all in {_s(result['welcome_all_s'])}), seq {final} seen by "
            f"{len(seen_times)} (all in {_s(result['last_seq_all_s'])}); "
            f"{result['kib_per_client']} KiB/client; CPU {system_cpu:.0f}%, "
            f"generators {', '.join(f'{c:.0f}%' for c in cpu)}")
        if name == "zchat" and cfg.hold_seconds > 0:
            say(f"  {name:<8} N={clients}: everyone pings on for {cfg.hold_seconds:g}s")
            time.sleep(cfg.hold_seconds)
            stats = _stats(run)
            reports = [h.call("report", t0=t0, final=final) for h in handles]
            byes: dict[str, int] = {}
            for r in reports:
                for reason, count in r["byes"].items():
                    byes[reason] = byes.get(reason, 0) + count
            result.update({
                "members_at_end": stats["members"],
                "timeouts": stats["timeouts"],
                "byes": byes,
                "connections_lost": sum(r["lost"] for r in reports),
                "rss_end_mib": round(run.rss_bytes() / 2**20, 1),
            })
            say(f"  {name:<8} N={clients}: {stats['members']} members at the end, "
                f"{stats['timeouts']} timeouts, {result['connections_lost']} connections lost")
        if not run.alive():
            result["error"] = f"{name} died: {run.errors()}"
    finally:
        for handle in handles:
            handle.stop()
        run.stop()
        if run.data_dir:
            shutil.rmtree(run.data_dir, ignore_errors=True)
    return result


def ratios(entries: dict[str, Any]) -> dict[str, Any]:
    """zchat's times over the ceiling's time to answer every join, in the same run."""
    zchat, ceiling = entries.get("zchat"), entries.get("ceiling")
    if not zchat or not ceiling or not ceiling.get("welcome_all_s"):
        return {}
    base = ceiling["welcome_all_s"]
    out = {}
    for key, ratio in (("welcome_all_s", "welcome_all_x_ceiling"),
                       ("last_seq_all_s", "last_seq_all_x_ceiling")):
        if zchat.get(key):
            out[ratio] = round(zchat[key] / base, 1)
    return out


def _at(ordered: list[float], fraction: float) -> float | None:
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))], 3)


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def table(storm: dict[str, Any]) -> str:
    """The join-storm table, as printed at the end of a run and in the README."""
    headers = ["Join storm", "N", "welcomed", "all welcomed", "all saw last seq",
               "last seq", "KiB/client", "members at end", "timeouts", "x ceiling"]
    rows = []
    for size, per in sorted(storm.items(), key=lambda item: int(item[0])):
        x = ratios(per)
        for name, e in per.items():
            if e.get("error") and "welcomed" not in e:
                rows.append([name, size, "-", "-", "-", "-", "-", "-", "-", e["error"][:40]])
                continue
            ratio = x.get("last_seq_all_x_ceiling") if name == "zchat" else None
            rows.append([name, size, f"{e['welcomed']}/{e['clients']}",
                         _s(e.get("welcome_all_s")), _s(e.get("last_seq_all_s")),
                         str(e.get("last_seq")), str(e.get("kib_per_client")),
                         str(e.get("members_at_end", "-")), str(e.get("timeouts", "-")),
                         "-" if ratio is None else f"{ratio}x"])
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    lines = [" | ".join(str(c).ljust(w) for c, w in zip(headers, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)
