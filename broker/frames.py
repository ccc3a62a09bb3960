"""What libzmq tells about a received frame or a bound socket, read safely.

One place for the three small readers that the broker's loop, its relay
link and ``zchat-relay`` all need.
"""

from __future__ import annotations

from typing import Any

import zmq

__all__ = ["frame_fd", "frame_property", "last_endpoint"]


def last_endpoint(sock: zmq.Socket[Any]) -> str:
    """The endpoint ``sock`` was last bound to (with the port port 0 chose)."""
    endpoint = sock.getsockopt(zmq.LAST_ENDPOINT)
    return endpoint.decode() if isinstance(endpoint, bytes) else str(endpoint)


def frame_property(frame: zmq.Frame, name: str) -> str | None:
    """A metadata property of ``frame`` (``Peer-Address``, ``User-Id``), or None."""
    try:
        value = frame.get(name)
    except zmq.ZMQError:
        return None
    return str(value) if value else None


def frame_fd(frame: zmq.Frame) -> int:
    """The descriptor of the connection a frame came on (-1 if unknown)."""
    try:
        return int(frame.get(zmq.SRCFD))
    except (zmq.ZMQError, TypeError, ValueError):
        return -1
