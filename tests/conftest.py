"""Shared fixtures: real brokers on ephemeral loopback ports, tracked sockets.

``start_broker(*args)`` runs ``zchat-broker`` as a real subprocess bound to
``tcp://127.0.0.1:0`` and returns a ``RunningBroker`` with the endpoints it
reported. ``ctx`` is a ZeroMQ context whose sockets the test need not close:
teardown closes them with linger 0 and fails if the context cannot end.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, settings

# Property tests judge the code, not the machine: a loaded CI box (containers
# building beside the suite) makes input generation slow, which is no failure.
settings.register_profile("zchat", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("zchat")

# .ci/run spreads the suite over xdist workers a file at a time (`--dist
# loadfile`): the Docker tests share one image build and one dockerd (a
# session fixture is per worker), and a tmux or Chromium file keeps its
# screens on one worker. (`--dist loadgroup` with `xdist_group` marks would
# say it finer, but xdist 3.8 under pytest 9 ignores the marks.)
def unused_ports(count: int) -> list[int]:
    """``count`` loopback TCP ports nobody holds now, for a test to bind later.

    Picked below the kernel's ephemeral range (32768-60999 here): a port
    from inside it may be handed meanwhile to any socket bound to port 0 or
    connecting out (other xdist workers', or a client's own retries to that
    very port, which can connect to itself), and then the bind fails.
    """
    import random
    import socket

    found: list[int] = []
    while len(found) < count:
        port = random.randrange(20000, 32768)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        if port not in found:
            found.append(port)
    return found


# The files that take longest, longest first: xdist hands files out in
# collection order, so these start at once, side by side, and the run does
# not end waiting for one of them started late. The two Docker files first
# (about 5 and 1.5 minutes: the image build and the demos, the Debian
# container), each on a worker of its own. The others follow, the ones with
# more tests first (xdist's own order, which it would otherwise apply to
# all files, the Docker files last: they have few tests).
LONGEST_FIRST = ("test_docker.py", "test_docker_debian.py")


def pytest_configure(config: pytest.Config) -> None:
    # Keep the order below: xdist's --dist loadfile would sort the files by
    # their number of tests instead (its default --loadscope-reorder).
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    tests_in: dict[Path, int] = {}
    for item in items:
        tests_in[item.path] = tests_in.get(item.path, 0) + 1

    def rank(item: pytest.Item) -> tuple[int, int]:
        name = item.path.name
        first = LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
        return first, -tests_in[item.path]

    items.sort(key=rank)  # stable: the order within a file stays


ROOT = Path(__file__).resolve().parent.parent
LISTENING = re.compile(r"input=(\S+) broadcast=(\S+) control=(\S+)")


def wait_until(what: str, condition: Any, timeout: float, interval: float = 0.5) -> Any:
    """Poll ``condition()`` until it returns something true; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def wait_line(lines: list[str], pattern: str, timeout: float = 10.0, *, count: int = 1,
              what: str = "program", alive: Callable[[], bool] | None = None) -> str:
    """Wait until ``count`` of ``lines`` (filled by a reader thread) match ``pattern``.

    Returns the ``count``-th match. Gives up early once ``alive()`` says no more
    lines can come (the program exited and its output was read).
    """
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [line for line in list(lines) if regex.search(line)]
        if len(found) >= count:
            return found[count - 1]
        if alive is not None and not alive():
            break
        time.sleep(0.02)
    raise AssertionError(f"no {what} line matched {pattern!r}; output:\n" + "".join(lines))


@dataclass
class RunningBroker:
    """A ``zchat-broker`` subprocess and what it printed."""

    proc: subprocess.Popen[str]
    input: str
    broadcast: str
    control: str
    args: tuple[str, ...]
    stdout_lines: list[str] = field(default_factory=list)
    stderr_lines: list[str] = field(default_factory=list)

    def wait_output(self, pattern: str, timeout: float = 10.0, *,
                    stderr: bool = False) -> str:
        """Wait until a stdout (or stderr) line matches ``pattern``; return it."""
        lines = self.stderr_lines if stderr else self.stdout_lines
        return wait_line(lines, pattern, timeout, what="broker",
                         alive=lambda: self.proc.poll() is None or self._readers_alive())

    def _readers_alive(self) -> bool:
        return any(t.is_alive() for t in getattr(self, "_readers", []))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError("broker did not stop in time") from None


    def release(self) -> None:
        """Kill the process if it still runs and close its pipes."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        for t in getattr(self, "_readers", []):
            t.join(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def _pump(stream: Any, lines: list[str]) -> None:
    for line in stream:
        lines.append(line)


def _first_line(stream: Any, lines: list[str]) -> None:
    lines.append(stream.readline())


def launch_broker(*args: str, env: dict[str, str] | None = None,
                  timeout: float = 15.0, read_stdout: bool = True,
                  preexec_fn: Callable[[], None] | None = None) -> RunningBroker:
    """Start ``zchat-broker`` on ephemeral loopback ports (args may override).

    ``read_stdout=False`` reads only the first line (the endpoints) and then
    leaves stdout unread, as a paused terminal would.
    """
    argv = [
        sys.executable, "-m", "zchat.broker.main",
        "--input", "tcp://127.0.0.1:0",
        "--broadcast", "tcp://127.0.0.1:0",
        "--control", "tcp://127.0.0.1:0",
        # Tests that are not about durability keep history in memory, so
        # brokers never share the user's default database.
        *(() if "--db" in args else ("--db", ":memory:")),
        # A short heartbeat unless the test sets one: a raw client waits for
        # the first frame on its SUB, a heartbeat at the latest.
        *(() if "--heartbeat" in args or "ZCHAT_HEARTBEAT" in (env or {})
          else ("--heartbeat", "0.5")),
        *args,
    ]
    proc = subprocess.Popen(
        # errors="replace": a broker stopped mid-write may end on half a
        # UTF-8 character (its screen writes without blocking).
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, errors="replace",
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        preexec_fn=preexec_fn,
    )
    stdout: list[str] = []
    stderr: list[str] = []
    pump_stdout = _pump if read_stdout else _first_line
    readers = [
        threading.Thread(target=pump_stdout, args=(proc.stdout, stdout), daemon=True),
        threading.Thread(target=_pump, args=(proc.stderr, stderr), daemon=True),
    ]
    for t in readers:
        t.start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in stdout:
            match = LISTENING.search(line)
            if match:
                broker = RunningBroker(proc, *match.groups(), args=tuple(args),
                                       stdout_lines=stdout, stderr_lines=stderr)
                broker._readers = readers  # type: ignore[attr-defined]
                return broker
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    proc.kill()
    proc.wait(5)
    for t in readers:  # they end at the pipes' end of file
        t.join(5)
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:  # else a later test's GC warns of them (an error here)
            pipe.close()
    raise AssertionError(f"broker did not start: {''.join(stderr)}")


@pytest.fixture(autouse=True, scope="session")
def private_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Brokers started without --db write under a temporary data dir, never $HOME."""
    path = tmp_path_factory.mktemp("zchat-data")
    saved = os.environ.get("ZCHAT_DATA_DIR")
    os.environ["ZCHAT_DATA_DIR"] = str(path)
    yield path
    if saved is None:
        os.environ.pop("ZCHAT_DATA_DIR", None)
    else:
        os.environ["ZCHAT_DATA_DIR"] = saved


@pytest.fixture
def start_broker() -> Iterator[Callable[..., RunningBroker]]:
    """A factory of real brokers, all stopped at teardown."""
    started: list[RunningBroker] = []

    def start(*args: str, env: dict[str, str] | None = None) -> RunningBroker:
        broker = launch_broker(*args, env=env)
        started.append(broker)
        return broker

    yield start
    for broker in started:
        broker.release()


@pytest.fixture
def broker(start_broker: Callable[..., RunningBroker]) -> RunningBroker:
    """One real broker with a short heartbeat and rate limits off."""
    return start_broker("--heartbeat", "0.5", "--rate", "0")


class TrackingContext(zmq.Context):  # type: ignore[type-arg]
    """Keeps every socket it made, so teardown can close them all."""

    made: list[zmq.Socket[Any]] = []  # noqa: RUF012 - declared here: pyzmq treats unknown attributes as options

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.made = []

    def socket(self, *args: Any, **kwargs: Any) -> zmq.Socket[Any]:
        sock = super().socket(*args, **kwargs)
        self.made.append(sock)
        return sock


def close_context(context: TrackingContext, timeout: float = 5.0) -> None:
    """Close every socket with linger 0; fail if the context cannot end."""
    for sock in context.made:
        if not sock.closed:
            sock.close(linger=0)
    done = threading.Thread(target=context.term, daemon=True)
    done.start()
    done.join(timeout)
    if done.is_alive():
        raise AssertionError("the ZeroMQ context did not terminate: a socket was left open")


@pytest.fixture
def ctx() -> Iterator[TrackingContext]:
    """A context whose sockets are all closed (linger 0) at teardown."""
    context = TrackingContext()
    yield context
    close_context(context)


def wait_item(client: Any, match: Callable[[Any], bool], timeout: float = 10.0) -> Any:
    """The next item of a ``zchat.Client`` that ``match``es, within ``timeout``."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        item = client.next_event(timeout=left)
        if item is not None and match(item):
            return item
    raise AssertionError("no matching event in time")


class RawClient:
    """A client speaking raw ZeroMQ + MessagePack, independent of zchat.client."""

    def __init__(self, ctx: zmq.Context[Any], broker: RunningBroker) -> None:
        self.dealer = ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.connect(broker.input)
        self.sub = ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RCVHWM, 0)
        self.broker = broker
        self._early: list[tuple[bytes, dict[str, Any]]] = []

    def send(self, body: Any) -> None:
        self.dealer.send(msgpack.packb(body))

    def send_raw(self, *frames: bytes) -> None:
        self.dealer.send_multipart(list(frames))

    def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        if not self.dealer.poll(timeout * 1000):
            raise AssertionError(f"no reply within {timeout}s")
        reply: dict[str, Any] = msgpack.unpackb(self.dealer.recv())
        return reply

    def request(self, body: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        """Send ``body``; return the next reply, or the one echoing its ``id``."""
        self.send(body)
        while True:
            reply = self.recv(timeout)
            if "id" not in body or reply.get("id") == body["id"]:
                return reply

    def subscribe(self, topic: bytes = b"") -> None:
        self.sub.setsockopt(zmq.SUBSCRIBE, topic)
        self.sub.connect(self.broker.broadcast)

    def join(self, name: str, *, keep_alive: Iterable[RawClient] = (),
             **fields: Any) -> dict[str, Any]:
        """Subscribe to everything, join, and wait until the SUB is live.

        PUB/SUB connects asynchronously (the slow joiner): the SUB is known
        to be connected once it has received a frame, a heartbeat at the
        latest. Frames received meanwhile are kept for ``next_event``.
        ``keep_alive``: members that ping meanwhile (their pongs are left
        for ``request`` to skip): silent for 3 heartbeats (1.5 s with a
        0.5 s heartbeat) they are dropped, and on a busy machine two or
        three joins, each waiting up to a heartbeat, can take that long.
        """
        self.subscribe()
        reply = self.request({"type": "join", "name": name, **fields})
        if reply.get("type") == "welcome":
            others = list(keep_alive)
            deadline = time.monotonic() + 10
            while not self.sub.poll(200):
                for other in others:
                    other.send({"type": "ping"})
                if time.monotonic() > deadline:
                    raise AssertionError("the SUB heard nothing, not even a heartbeat")
            for other in others:
                other.send({"type": "ping"})
            topic, payload = self.sub.recv_multipart()
            self._early.append((topic, msgpack.unpackb(payload)))
        return reply

    def next_event(self, timeout: float = 5.0) -> tuple[bytes, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            if self._early:
                topic, body = self._early.pop(0)
            else:
                if not self.sub.poll(max(0.0, deadline - time.monotonic()) * 1000):
                    raise AssertionError(f"no broadcast within {timeout}s")
                topic, payload = self.sub.recv_multipart()
                body = msgpack.unpackb(payload)
            # A v1 client subscribed to everything ignores topics it does not
            # know (PROTOCOL.md): the batch topics, on by default.
            if not topic.startswith(b"\x01"):
                return topic, body

    def wait_event(self, match: Callable[[dict[str, Any]], bool],
                   timeout: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            _, body = self.next_event(left)
            if match(body):
                return body
        raise AssertionError("no matching broadcast in time")


@pytest.fixture
def raw(ctx: zmq.Context[Any], broker: RunningBroker) -> Callable[[], RawClient]:
    """A factory of raw-protocol clients on the ``broker`` fixture."""
    return lambda: RawClient(ctx, broker)
