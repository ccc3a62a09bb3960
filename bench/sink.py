"""A do-nothing system: what the load generator can drive when nothing resists.

The sink speaks the ceiling's framing (ZMTP 3.0 over raw sockets) and does
no work per message: it discards whatever publishers push, in reads of
1 MiB, and on ``blast`` it writes a pre-built 64 KiB run of chat events to
every subscriber as fast as the kernel takes them. Both are bulk memory
copies, so the figures measure the generator, not the sink:

    push       publishers' PUSH frames: discarded (how fast can they offer?)
    input      a client's DEALER ``join``: answered, so it counts as welcomed
    broadcast  a SUB: greeted, then, while blasting, fed without pause
               (how many deliveries a second can the subscribers count?)

``SinkHandle`` runs it in a process of its own, driven by calls over a pipe
like the generator's workers.

Defines: ``SinkHandle``, ``sink_main``.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import selectors
import socket
import time
from typing import Any, Final

from .systems import cpu_seconds
from .wire import ZmtpReader, greeting, pack, ready, stamp_text, zmtp_frame

__all__ = ["SinkHandle", "sink_main"]

CHUNK: Final = 64 << 10
READ: Final = 1 << 20


def _chunk() -> bytes:
    """Whole [topic, event] messages, as the ceiling forwards them, to about ``CHUNK`` bytes."""
    event = {"type": "message", "room": "lobby", "seq": 1 << 16, "ts": time.time(),
             "from": "sink", "text": stamp_text()}
    one = zmtp_frame(b"lobby\x00", more=True) + zmtp_frame(pack(event))
    return one * (CHUNK // len(one))


class _Sink:
    def __init__(self, pipe: multiprocessing.connection.Connection) -> None:
        self.pipe = pipe
        self.selector = selectors.DefaultSelector()
        self.selector.register(pipe.fileno(), selectors.EVENT_READ, ("pipe", None))
        self.listeners: dict[str, socket.socket] = {}
        for kind in ("input", "broadcast", "push"):
            lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            lsock.bind(("127.0.0.1", 0))
            lsock.listen(4096)
            lsock.setblocking(False)
            self.listeners[kind] = lsock
            self.selector.register(lsock, selectors.EVENT_READ, ("listen", kind))
        self.subs: dict[socket.socket, int] = {}  # broadcast connections -> offset in chunk
        self.readers: dict[socket.socket, ZmtpReader] = {}
        self.chunk = memoryview(_chunk())
        self.buffer = bytearray(READ)
        self.blasting = False
        self.running = True
        self.pushed_bytes = 0

    def endpoints(self) -> dict[str, str]:
        return {kind: f"tcp://127.0.0.1:{lsock.getsockname()[1]}"
                for kind, lsock in self.listeners.items()}

    def run(self) -> None:
        self.pipe.send(self.endpoints())
        while self.running:
            for key, mask in self.selector.select(0.5):
                role, kind = key.data
                if role == "pipe":
                    self._command()
                elif role == "listen":
                    self._accept(kind)
                else:
                    self._serve(key.fileobj, kind, mask)  # type: ignore[arg-type]

    def _accept(self, kind: str) -> None:
        lsock = self.listeners[kind]
        while True:
            try:
                sock, _ = lsock.accept()
            except BlockingIOError:
                return
            sock.setblocking(False)
            own = {"input": "ROUTER", "broadcast": "PUB", "push": "PULL"}[kind]
            sock.send(greeting() + ready(own))
            events = selectors.EVENT_READ
            if kind == "input":
                self.readers[sock] = ZmtpReader()
            elif kind == "broadcast":
                self.subs[sock] = 0
                if self.blasting:
                    events |= selectors.EVENT_WRITE
            self.selector.register(sock, events, ("conn", kind))

    def _serve(self, sock: socket.socket, kind: str, mask: int) -> None:
        if mask & selectors.EVENT_WRITE and sock in self.subs:
            offset = self.subs[sock]
            try:
                sent = sock.send(self.chunk[offset:])
            except BlockingIOError:
                sent = 0
            except OSError:
                self._drop(sock)
                return
            self.subs[sock] = (offset + sent) % len(self.chunk)
        if not mask & selectors.EVENT_READ:
            return
        try:
            size = sock.recv_into(self.buffer)
        except BlockingIOError:
            return
        except OSError:
            size = 0
        if not size:
            self._drop(sock)
            return
        if kind == "push":
            self.pushed_bytes += size
        reader = self.readers.get(sock)
        if reader is not None:
            try:
                messages = reader.feed(self.buffer[:size])
            except ConnectionError:
                self._drop(sock)
                return
            if messages:
                # Joins and pings alike: any answer welcomes a ceiling client.
                sock.send(zmtp_frame(b"ok") * len(messages))

    def _drop(self, sock: socket.socket) -> None:
        self.selector.unregister(sock)
        self.subs.pop(sock, None)
        self.readers.pop(sock, None)
        sock.close()

    def _command(self) -> None:
        request: dict[str, Any] = self.pipe.recv()
        op = request["op"]
        if op == "blast":
            self.blasting = bool(request["on"])
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.blasting else 0)
            for sock in self.subs:
                self.selector.modify(sock, events, ("conn", "broadcast"))
        elif op == "stop":
            self.running = False
        self.pipe.send({"subscribers": len(self.subs), "pushed_bytes": self.pushed_bytes})


def sink_main(pipe: multiprocessing.connection.Connection) -> None:
    """The sink process's entry point."""
    try:
        _Sink(pipe).run()
    except KeyboardInterrupt:
        pass
    finally:
        pipe.close()


class SinkHandle:
    """The bench's end of a sink process."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pipe, child = ctx.Pipe()
        self.process = ctx.Process(target=sink_main, args=(child,), name="sink", daemon=True)
        self.process.start()
        child.close()
        if not self.pipe.poll(30):
            raise TimeoutError("the sink did not start")
        self.endpoints: dict[str, str] = self.pipe.recv()

    @property
    def pid(self) -> int:
        return self.process.pid or 0

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        self.pipe.send({"op": op, **args})
        if not self.pipe.poll(30):
            raise TimeoutError(f"the sink did not answer {op!r}")
        reply: dict[str, Any] = self.pipe.recv()
        return reply

    def stop(self) -> None:
        if self.process.is_alive():
            try:
                self.call("stop")
            except (OSError, EOFError, TimeoutError):
                pass
            self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.pipe.close()
