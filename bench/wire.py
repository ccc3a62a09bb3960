"""Just enough of each system's wire format for a cheap load generator.

The load generator speaks to every system over plain non-blocking TCP
sockets, so that a Python process can receive millions of deliveries per
second: it never decodes a frame it only has to count.

ZeroMQ (ZMTP 3.0, NULL mechanism), for zchat and the C ceiling: a peer sends
its 64-byte greeting and a ``READY`` command naming its socket type, then
frames ``[flags, size, body]`` (size in 1 byte, or 8 with the LONG flag). A
SUB subscribes with a message ``0x01 + topic``. libzmq drops a connection whose
frames arrive in the same write as the greeting and ``READY``, so
``ZmtpReader`` tells the caller when the peer's ``READY`` is in and frames
may follow.

Length-prefixed frames (4-byte big-endian size), for the original design.

Counting without decoding: every chat ``message`` event, whatever the
system, is a MessagePack map that starts ``type: "message"`` and carries a
100-character ``text`` that starts with ``@`` and the sender's clock. So the
number of deliveries in a byte stream is the number of ``MESSAGE_MARK`` in
it, and the latency of a read is ``now`` minus the first stamp after
``STAMP_MARK`` (see ``StreamCounter``).

Defines: ``greeting``, ``ready``, ``zmtp_frame``, ``subscribe``,
``ZmtpReader``, ``lp_frame``, ``LengthPrefixReader``, ``StreamCounter``,
``MessageTemplate``, ``MESSAGE_MARK``, ``STAMP_MARK``, ``TEXT_CHARS``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

import msgpack

__all__ = [
    "MESSAGE_MARK",
    "STAMP_MARK",
    "TEXT_CHARS",
    "LengthPrefixReader",
    "MessageTemplate",
    "StreamCounter",
    "ZmtpReader",
    "greeting",
    "lp_frame",
    "pack",
    "ready",
    "stamp_text",
    "subscribe",
    "zmtp_frame",
]

TEXT_CHARS: Final = 100
STAMP_CHARS: Final = 17  # "%.6f" of time.time() until the year 2286
# `type: "message"` as MessagePack: fixstr "type", fixstr "message".
MESSAGE_MARK: Final = b"\xa4type\xa7message"
# A 100-character str is str8 (0xd9, length 100), and our texts start with "@".
STAMP_MARK: Final = b"\xd9d@"
GREETING_SIZE: Final = 64

FLAG_MORE: Final = 0x01
FLAG_LONG: Final = 0x02
FLAG_COMMAND: Final = 0x04


def greeting() -> bytes:
    """A ZMTP 3.0 greeting for the NULL mechanism, as a client."""
    # The signature's last padding byte is 1, as libzmq sends it (ZMTP 1.0
    # peers read it as the length of an empty identity).
    return (b"\xff" + b"\x00" * 7 + b"\x01\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00")
            + b"\x00" + b"\x00" * 31)


def zmtp_frame(body: bytes, *, more: bool = False, command: bool = False) -> bytes:
    """One ZMTP frame around ``body``."""
    flags = (FLAG_MORE if more else 0) | (FLAG_COMMAND if command else 0)
    size = len(body)
    if size < 256:
        return bytes((flags, size)) + body
    return bytes((flags | FLAG_LONG,)) + size.to_bytes(8, "big") + body


def ready(socket_type: str) -> bytes:
    """The ``READY`` command announcing ``socket_type`` (``SUB``, ``DEALER``...)."""
    name, value = b"Socket-Type", socket_type.encode()
    body = b"\x05READY" + bytes((len(name),)) + name + len(value).to_bytes(4, "big") + value
    return zmtp_frame(body, command=True)


def subscribe(topic: bytes) -> bytes:
    """A ZMTP 3.0 subscription message (what a SUB sends for ``SUBSCRIBE``)."""
    return zmtp_frame(b"\x01" + topic)


class _StreamReader:
    """What both framings' readers share: a buffer of bytes not yet parsed."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def rest(self) -> bytes:
        """Hand back the unparsed bytes (for a caller that switches to counting)."""
        data = bytes(self._buf)
        self._buf.clear()
        return data


class ZmtpReader(_StreamReader):
    """Splits a ZMTP byte stream into messages (lists of frame bodies).

    ``feed(data)`` returns the messages completed by ``data``; commands
    (``READY``) are consumed, and ``ready`` turns true once the peer's
    ``READY`` is in. ``rest()`` hands back unparsed bytes, for a caller that
    switches to counting.
    """

    def __init__(self) -> None:
        super().__init__()
        self._greeted = False
        self.ready = False
        self._parts: list[bytes] = []

    def feed(self, data: bytes | bytearray | memoryview) -> list[list[bytes]]:
        buf = self._buf
        buf += data
        pos = 0
        out: list[list[bytes]] = []
        if not self._greeted:
            if len(buf) < GREETING_SIZE:
                return out
            if buf[0] != 0xFF or buf[10] != 3:
                raise ConnectionError("peer is not a ZMTP 3 endpoint")
            self._greeted = True
            pos = GREETING_SIZE
        end = len(buf)
        while end - pos >= 2:
            flags = buf[pos]
            if flags & FLAG_LONG:
                if end - pos < 9:
                    break
                size = int.from_bytes(buf[pos + 1:pos + 9], "big")
                start = pos + 9
            else:
                size = buf[pos + 1]
                start = pos + 2
            if end - start < size:
                break
            body = bytes(buf[start:start + size])
            pos = start + size
            if flags & FLAG_COMMAND:
                if body.startswith(b"\x05READY"):
                    self.ready = True
                elif body.startswith(b"\x05ERROR"):
                    raise ConnectionError(f"peer refused the handshake: {body!r}")
                continue
            self._parts.append(body)
            if not flags & FLAG_MORE:
                out.append(self._parts)
                self._parts = []
        del buf[:pos]
        return out



def lp_frame(body: bytes) -> bytes:
    """One length-prefixed frame (the original design's framing)."""
    return len(body).to_bytes(4, "big") + body


class LengthPrefixReader(_StreamReader):
    """Splits a stream of length-prefixed frames; same interface as ``ZmtpReader``."""

    ready = True

    def feed(self, data: bytes | bytearray | memoryview) -> list[list[bytes]]:
        buf = self._buf
        buf += data
        pos = 0
        end = len(buf)
        out: list[list[bytes]] = []
        while end - pos >= 4:
            size = int.from_bytes(buf[pos:pos + 4], "big")
            if end - pos - 4 < size:
                break
            out.append([bytes(buf[pos + 4:pos + 4 + size])])
            pos += 4 + size
        del buf[:pos]
        return out



class StreamCounter:
    """Counts chat messages in a byte stream without decoding it.

    Each chunk is scanned with the last bytes of the one before in front, so
    a mark split between two reads is still found; the carried tail is one
    byte shorter than ``MESSAGE_MARK``, so no mark is counted twice. With
    ``sample`` on, each chunk also yields one latency: now minus the stamp
    of the first message in the chunk, the oldest one in that read.
    ``watch(token)`` records when ``token`` (at most 13 bytes) first shows up.
    """

    TAIL = len(MESSAGE_MARK) - 1

    __slots__ = ("count", "latencies", "seen_at", "tail", "watching")

    def __init__(self, sample: bool = False) -> None:
        self.count = 0
        self.tail = b""
        self.latencies: list[float] | None = [] if sample else None
        self.watching: bytes | None = None
        self.seen_at = 0.0

    def watch(self, token: bytes) -> None:
        if len(token) > len(MESSAGE_MARK):
            raise ValueError("a watched token must be at most 13 bytes")
        self.watching = token
        self.seen_at = 0.0

    def scan(self, buf: bytearray, end: int, now: float) -> None:
        """Account for ``buf[:end]``, whose first ``len(self.tail)`` bytes are the tail."""
        self.count += buf.count(MESSAGE_MARK, 0, end)
        if self.latencies is not None:
            at = buf.find(STAMP_MARK, 0, end)
            if at >= 0 and at + 3 + STAMP_CHARS <= end:
                try:
                    self.latencies.append(now - float(buf[at + 3:at + 3 + STAMP_CHARS]))
                except ValueError:
                    pass  # not one of our stamps (a probe or a broadcast token)
        if self.watching is not None and buf.find(self.watching, 0, end) >= 0:
            self.seen_at = now
            self.watching = None
        self.tail = bytes(buf[max(0, end - self.TAIL):end])

    def feed(self, data: bytes, now: float | None = None) -> None:
        """Account for bytes read some other way (left over from a parser)."""
        if not data:
            return
        buf = bytearray(self.tail + data)
        self.scan(buf, len(buf), time.time() if now is None else now)


def stamp_text(stamp: float | None = None) -> str:
    """A 100-character text that starts with ``@`` and the sender's clock."""
    now = time.time() if stamp is None else stamp
    return f"@{now:.6f} ".ljust(TEXT_CHARS, "x")


class MessageTemplate:
    """Pre-built frames that differ only in their stamp (and an id, if any).

    A frame is ``heads[i] + stamp + tail``, where the stamp is the 17 digits
    of the send time; ``batch(k, stamp)`` builds k frames with one
    ``bytes.join``, so a publisher's cost is per batch, not per message.
    """

    def __init__(self, heads: list[bytes], tail: bytes) -> None:
        self.heads = heads
        self.tail = tail
        self.size = len(heads[0]) + STAMP_CHARS + len(tail)
        self._next = 0

    @classmethod
    def build(cls, frame_of: Callable[[str, str | None], bytes], ids: int = 0) -> MessageTemplate:
        """``frame_of(text, id)`` makes one frame; ``ids`` distinct ids (0: no id), cycled."""
        placeholder = "@" + "9" * STAMP_CHARS
        text = (placeholder + " ").ljust(TEXT_CHARS, "x")
        heads: list[bytes] = []
        tail = b""
        for n in range(max(ids, 1)):
            frame = frame_of(text, f"{n:08x}" if ids else None)
            at = frame.index(placeholder.encode()) + 1
            heads.append(frame[:at])
            tail = frame[at + STAMP_CHARS:]
        return cls(heads, tail)

    def batch(self, count: int, stamp: float) -> bytes:
        sep = f"{stamp:.6f}".encode() + self.tail
        heads = self.heads
        if len(heads) == 1:
            return sep.join(heads * count) + sep
        start = self._next
        stop = start + count
        chosen = heads[start:stop]
        while len(chosen) < count:
            chosen += heads[:count - len(chosen)]
        self._next = stop % len(heads)
        return sep.join(chosen) + sep


def pack(body: dict[str, object]) -> bytes:
    """MessagePack as zchat speaks it (text as ``str``)."""
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    return packed
