"""The original design: one Python thread, ``select.epoll``, one TCP socket per client.

This is the C10K-era chat server that zchat replaces, kept only as a
baseline for ``zchat-bench``. Each frame is a 4-byte big-endian length and a
MessagePack map, as in zchat::

    client -> server   join {name, sub?}   message {text}   ping
    server -> client   welcome {name}      pong
    server -> all      joined {name, addr} message {room, seq, ts, from, text}

A ``message`` is packed once and then sent from Python to every joined
client whose ``sub`` is true (the default): a non-blocking ``send`` per
recipient, and what the kernel does not take waits in that client's output
buffer until epoll says the socket is writable. A client whose buffer holds
more than ``OUT_LIMIT`` bytes loses frames (as a PUB socket past its
high-water mark). A client that sends a bad frame is disconnected.

It prints ``epoll-baseline listening server=tcp://HOST:PORT`` and runs until
SIGINT or SIGTERM. Run with ``python -m zchat.bench.baseline_epoll``.
"""

from __future__ import annotations

import argparse
import select
import signal
import socket
import time
from collections.abc import Sequence
from typing import Any

import msgpack

from .systems import raise_fd_limits

__all__ = ["Peer", "Server", "main"]

OUT_LIMIT = 4 << 20
READ_SIZE = 1 << 16
MAX_FRAME = 64 << 10
ROOM = "lobby"


class Peer:
    """One client connection and its buffers."""

    __slots__ = ("addr", "dropped", "inbuf", "name", "out", "sock", "sub", "writing")

    def __init__(self, sock: socket.socket, addr: str) -> None:
        self.sock = sock
        self.addr = addr
        self.inbuf = bytearray()
        self.out = bytearray()
        self.name: str | None = None
        self.sub = True
        self.writing = False
        self.dropped = 0


class Server:
    """The epoll loop: accept, read frames, relay to everyone."""

    def __init__(self, host: str, port: int) -> None:
        self.listener = socket.create_server((host, port), backlog=4096)
        self.listener.setblocking(False)
        self.epoll = select.epoll()
        self.epoll.register(self.listener.fileno(), select.EPOLLIN)
        self.peers: dict[int, Peer] = {}
        self.members: dict[int, Peer] = {}  # joined and listening
        self.seq = 0
        self.stopping = False

    @property
    def endpoint(self) -> str:
        host, port = self.listener.getsockname()[:2]
        return f"tcp://{host}:{port}"

    def run(self) -> None:
        listen_fd = self.listener.fileno()
        while not self.stopping:
            for fd, mask in self.epoll.poll(0.5):
                if fd == listen_fd:
                    self._accept()
                    continue
                peer = self.peers.get(fd)
                if peer is None:
                    continue
                if mask & select.EPOLLOUT:
                    self._flush(peer)
                if mask & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                    self._read(peer)
        for peer in list(self.peers.values()):
            self._close(peer)
        self.epoll.close()
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                sock, addr = self.listener.accept()
            except BlockingIOError:
                return
            except OSError:  # out of fds: leave it in the backlog for later
                return
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = Peer(sock, str(addr[0]))
            self.peers[sock.fileno()] = peer
            self.epoll.register(sock.fileno(), select.EPOLLIN)

    def _read(self, peer: Peer) -> None:
        try:
            data = peer.sock.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close(peer)
            return
        buf = peer.inbuf
        buf += data
        pos = 0
        end = len(buf)
        while end - pos >= 4:
            size = int.from_bytes(buf[pos:pos + 4], "big")
            if size > MAX_FRAME:
                self._close(peer)
                return
            if end - pos - 4 < size:
                break
            body = bytes(buf[pos + 4:pos + 4 + size])
            pos += 4 + size
            if not self._on_frame(peer, body):
                self._close(peer)
                return
        del buf[:pos]

    def _on_frame(self, peer: Peer, frame: bytes) -> bool:
        try:
            body: Any = msgpack.unpackb(frame, raw=False)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
            return False
        if not isinstance(body, dict):
            return False
        kind = body.get("type")
        if kind == "message" and peer.name is not None:
            text = body.get("text")
            if not isinstance(text, str):
                return False
            self.seq += 1
            self._broadcast({"type": "message", "room": ROOM, "seq": self.seq,
                             "ts": time.time(), "from": peer.name, "text": text})
        elif kind == "join":
            name = body.get("name")
            if not isinstance(name, str) or not name:
                return False
            if peer.name is None:
                peer.name = name
                peer.sub = bool(body.get("sub", True))
                self._send(peer, _frame({"type": "welcome", "name": name}))
                self.seq += 1
                self._broadcast({"type": "joined", "room": ROOM, "seq": self.seq,
                                 "ts": time.time(), "name": name, "addr": peer.addr})
                if peer.sub:
                    self.members[peer.sock.fileno()] = peer
        elif kind == "ping":
            self._send(peer, _frame({"type": "pong", "ts": time.time()}))
        else:
            return False
        return True

    def _broadcast(self, event: dict[str, Any]) -> None:
        frame = _frame(event)
        send = self._send
        for member in self.members.values():  # _send never closes, so no copy
            send(member, frame)

    def _send(self, peer: Peer, frame: bytes) -> None:
        if peer.out:
            if len(peer.out) > OUT_LIMIT:
                peer.dropped += 1
            else:
                peer.out += frame
            return
        try:
            sent = peer.sock.send(frame)
        except BlockingIOError:
            sent = 0
        except OSError:
            return  # gone: the read side notices and closes it
        if sent < len(frame):
            peer.out += frame[sent:]
            if not peer.writing:
                peer.writing = True
                self.epoll.modify(peer.sock.fileno(), select.EPOLLIN | select.EPOLLOUT)

    def _flush(self, peer: Peer) -> None:
        try:
            sent = peer.sock.send(peer.out)
        except BlockingIOError:
            return
        except OSError:
            self._close(peer)
            return
        del peer.out[:sent]
        if not peer.out and peer.writing:
            peer.writing = False
            self.epoll.modify(peer.sock.fileno(), select.EPOLLIN)

    def _close(self, peer: Peer) -> None:
        fd = peer.sock.fileno()
        self.peers.pop(fd, None)
        self.members.pop(fd, None)
        try:
            self.epoll.unregister(fd)
        except (OSError, ValueError):
            pass
        peer.sock.close()


def _frame(body: dict[str, Any]) -> bytes:
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return len(packed).to_bytes(4, "big") + packed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zchat.bench.baseline_epoll",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    raise_fd_limits(0)
    server = Server(args.host, args.port)

    def stop(*_: object) -> None:
        server.stopping = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    print(f"epoll-baseline listening server={server.endpoint}", flush=True)
    server.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
