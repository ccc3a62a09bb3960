"""The systems under test, each a real subprocess on loopback ephemeral ports.

    zchat        zchat-broker --quiet --rate 0 (default heartbeat 5 s, durable
                 history in a fresh SQLite file, batches on, as shipped); its
                 subscribers take the batch topic when welcome offers it
    zchat-print  zchat-broker --rate 0, printing every chat line (into a pipe
                 that the bench drains), as the product runs by default
    zchat-batch  zchat-broker --quiet --rate 0 --coalesce 64, subscribers
                 taking the coalesced ``\x01lobby\x00`` topic (PROTOCOL.md):
                 now the default, so the same as ``zchat``
    zchat-memory zchat-broker --quiet --rate 0 --db :memory: (history in memory,
                 not durable): beside ``zchat``, the cost of durability
    zchat-io2    zchat-broker --quiet --rate 0 --io-threads 2 (not by default)
    zchat-before zchat as ``zchat``, but the code found under ``$ZCHAT_BENCH_BEFORE``
                 (a directory holding a ``zchat`` package with ``broker`` inside,
                 say an export of main): before and after a change in one run
    floor        python -m zchat.bench.floor: the Python floor, zchat's wire
                 work per message (decode, event, publish, batch, ack) and none of
                 its logic or history: what any Python broker of this shape pays
    ceiling-io2  the ceiling with two libzmq I/O threads (not by default)
    ceiling      python -m zchat.bench.ceiling: libzmq forwarding in C
    epoll        python -m zchat.bench.baseline_epoll: the original design

``start(name)`` waits for the program's "listening" line and returns a
``Running`` whose ``endpoints`` the load generator connects to and whose
``cpu_seconds()`` and ``rss_bytes()`` read ``/proc`` (all threads counted).

Defines: ``SYSTEMS``, ``Running``, ``start``, ``cpu_seconds``, ``rss_bytes``,
``thread_cpu``, ``machine_cpu``, ``raise_fd_limits``.
"""

from __future__ import annotations

import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Final

__all__ = [
    "SYSTEMS",
    "Running",
    "StartError",
    "cpu_seconds",
    "machine_cpu",
    "raise_fd_limits",
    "rss_bytes",
    "start",
    "thread_cpu",
]

LOOPBACK: Final = "tcp://127.0.0.1:0"
ENDPOINTS: Final = re.compile(r"(\w+)=(tcp://\S+)")
COALESCE: Final = 64  # events per batch frame for zchat-batch
CLOCK_TICK: Final = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_CPUCLOCK_SCHED: Final = 2  # a process CPU clock counting the scheduler's runtime (Linux)

# name -> (framing the load generator speaks, label for tables)
SYSTEMS: Final = {
    "zchat": ("zchat", "zchat broker (--quiet)"),
    "zchat-print": ("zchat", "zchat broker (printing)"),
    "zchat-batch": ("zchat-batch", "zchat broker (--coalesce 64)"),
    "zchat-memory": ("zchat", "zchat broker (--db :memory:)"),
    "zchat-io2": ("zchat", "zchat broker (--io-threads 2)"),
    "zchat-before": ("zchat", "zchat broker from $ZCHAT_BENCH_BEFORE (--quiet)"),
    "floor": ("zchat", "Python floor: zchat's wire work alone"),
    "ceiling": ("ceiling", "ceiling: libzmq proxy in C"),
    "ceiling-io2": ("ceiling", "ceiling, two I/O threads"),
    "epoll": ("epoll", "original design: Python epoll"),
}


class StartError(RuntimeError):
    """A system under test did not start or died."""


def _argv(name: str, data_dir: str) -> list[str]:
    py = sys.executable
    if name.startswith("zchat"):
        # Durable history as shipped (SQLite file, no fsync), in a database of
        # its own: a shared one would refuse a second broker and remember
        # message ids from an earlier run.
        argv = [py, "-m", "zchat.broker.main", "--input", LOOPBACK, "--broadcast", LOOPBACK,
                "--control", LOOPBACK, "--rate", "0", "--max-per-address", "0",
                "--join-rate", "0", "--query-rate", "0",
                "--db", f"{data_dir}/history.db"]
        if name == "zchat-batch":
            return [*argv, "--quiet", "--coalesce", str(COALESCE)]
        if name == "zchat-io2":
            return [*argv, "--quiet", "--io-threads", "2"]
        if name == "zchat-memory":
            return [*argv[:-2], "--db", ":memory:", "--quiet"]
        return [*argv, "--quiet"] if name in ("zchat", "zchat-before") else argv
    if name in ("ceiling", "ceiling-io2"):
        threads = "2" if name == "ceiling-io2" else "1"
        return [py, "-m", "zchat.bench.ceiling", "--io-threads", threads]
    if name == "floor":
        return [py, "-m", "zchat.bench.floor"]
    if name == "epoll":
        return [py, "-m", "zchat.bench.baseline_epoll"]
    raise ValueError(f"unknown system {name!r}; known: {', '.join(SYSTEMS)}")


def _env(name: str) -> dict[str, str]:
    """What a system's environment adds: ``zchat-before`` imports the older code."""
    if name != "zchat-before":
        return {}
    before = os.environ.get("ZCHAT_BENCH_BEFORE")
    if not before:
        raise StartError("zchat-before needs ZCHAT_BENCH_BEFORE (a tree with zchat/broker)")
    # sys.path (PYTHONPATH first) is searched before the editable install's finder.
    return {"PYTHONPATH": before}


def _drain(stream: IO[bytes], keep: list[bytes], limit: int) -> None:
    """Read a pipe to its end in big chunks; keep only its first ``limit`` bytes."""
    kept = 0
    fd = stream.fileno()
    while True:
        try:
            chunk = os.read(fd, 1 << 20)
        except OSError:
            return
        if not chunk:
            return
        if kept < limit:
            keep.append(chunk[: limit - kept])
            kept += len(keep[-1])


@dataclass
class Running:
    """A started system: its process and the endpoints it bound."""

    name: str
    proc: subprocess.Popen[bytes]
    endpoints: dict[str, str]
    stdout: list[bytes] = field(default_factory=list)
    stderr: list[bytes] = field(default_factory=list)
    data_dir: str = ""
    _readers: list[threading.Thread] = field(default_factory=list)

    @property
    def framing(self) -> str:
        return SYSTEMS[self.name][0]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def rss_bytes(self) -> int:
        return rss_bytes(self.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for reader in self._readers:
            reader.join(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        if self.data_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def errors(self) -> str:
        return b"".join(self.stderr).decode(errors="replace")[-2000:]


def start(name: str, timeout: float = 20.0) -> Running:
    """Start system ``name`` and wait until it says where it listens."""
    data_dir = tempfile.mkdtemp(prefix=f"zchat-bench-{name}-")
    proc = subprocess.Popen(
        _argv(name, data_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **_env(name)},
        # -m puts the working directory first on sys.path: for zchat-before,
        # the older tree itself, so that it is what gets imported.
        cwd=_env(name).get("PYTHONPATH"),
    )
    if proc.stdout is None or proc.stderr is None:  # pragma: no cover - PIPE was asked
        raise StartError("no pipes to the system under test")
    # The first line carries the endpoints; read it before the drain threads start.
    deadline = time.monotonic() + timeout
    first = b""
    fd = proc.stdout.fileno()
    os.set_blocking(fd, False)
    while b"\n" not in first and time.monotonic() < deadline and proc.poll() is None:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            time.sleep(0.01)
            continue
        if not chunk:
            break
        first += chunk
    os.set_blocking(fd, True)
    running = Running(name, proc, dict(ENDPOINTS.findall(first.split(b"\n")[0].decode())),
                      data_dir=data_dir)
    running.stdout.append(first[:4096])
    for stream, keep in ((proc.stdout, running.stdout), (proc.stderr, running.stderr)):
        reader = threading.Thread(target=_drain, args=(stream, keep, 64 << 10), daemon=True)
        reader.start()
        running._readers.append(reader)
    if not running.endpoints:
        running.stop()
        raise StartError(f"{name} did not start: {running.errors()}")
    return running


def cpu_seconds(pid: int) -> float:
    """CPU seconds of process ``pid`` (all its threads, exited ones too), to the ns.

    The kernel's CPU clock of the process (``clock_getcpuclockid(3)``'s
    clock id, made by hand: Python has no call for another process's):
    ``stat``'s utime and stime are in clock ticks (10 ms here), so a system
    that spent 2 ms in a short step read as 0. Falls back to ``stat``.
    """
    try:
        return time.clock_gettime(((~pid) << 3) | _CPUCLOCK_SCHED)
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return _stat_seconds(stat.read())
    except OSError:
        return 0.0


def _stat_seconds(raw: bytes) -> float:
    """utime + stime of a ``/proc/.../stat`` line, in seconds (10 ms ticks)."""
    # After the ")" of the command name: state is field 3, utime 14, stime 15.
    fields = raw.rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK


def rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` in bytes (0 if unknown)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds of each thread of ``pid``: {tid: (name, seconds)} (ns precision).

    libzmq names its threads (``ZMQbg/IO/0`` does the TCP work), so this
    tells whether Python or libzmq is the busy one.
    """
    threads: dict[int, tuple[str, float]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return threads
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as stat:
                raw = stat.read()
        except OSError:
            continue
        name = raw[raw.index(b"(") + 1:raw.rindex(b")")].decode(errors="replace")
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as schedstat:
                seconds = int(schedstat.read().split()[0]) / 1e9  # ns on a CPU
        except (OSError, ValueError, IndexError):
            seconds = _stat_seconds(raw)
        threads[int(tid)] = (name, seconds)
    return threads


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot."""
    try:
        with open("/proc/stat", "rb") as stat:
            values = [int(v) for v in stat.readline().split()[1:]]
    except OSError:
        return 0.0, 0.0
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])
    return (total - idle) / CLOCK_TICK, total / CLOCK_TICK


def raise_fd_limits(needed: int) -> tuple[int, int]:
    """Raise this process's open-file limits (inherited by what it starts).

    The soft limit goes to the hard one; the hard one goes up to ``needed``
    when the process may (root). Returns the (soft, hard) limits now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
            return needed, needed
        except (ValueError, OSError):
            pass
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)
