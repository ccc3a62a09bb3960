"""The broker's ZAP handler: which CURVE clients may connect.

libzmq asks every new connection to a CURVE server socket over ZAP
(``inproc://zeromq.zap.01``, RFC 27): a REP socket the broker polls in its
one loop. A client is admitted when its public key is one of the ``.key``
files in the authorized directory; the directory is read again whenever it
changes, so adding or removing a client needs no restart.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq
import zmq.auth

__all__ = ["CurveGate"]

log = logging.getLogger("zchat.broker.auth")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_VERSION = b"1.0"


class CurveGate:
    """Answers ZAP requests from the authorized-keys directory."""

    def __init__(self, context: zmq.Context[Any], authorized: Path,
                 warn: Callable[..., None] | None = None) -> None:
        self.authorized = authorized
        # (kind, message, *args): the broker's throttled warnings, so a crowd
        # of strangers' keys makes a line every few seconds, not one each.
        self._warn = warn or (lambda _kind, message, *args: log.warning(message, *args))
        self._stamp: int | None = None
        self._keys: set[bytes] = set()
        self.socket = context.socket(zmq.REP)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(ZAP_ENDPOINT)
        self._reload()

    def _reload(self) -> None:
        try:
            stamp = self.authorized.stat().st_mtime_ns
        except OSError as exc:
            log.error("cannot read authorized keys %s: %s", self.authorized, exc)
            self._keys = set()
            return
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            keys = zmq.auth.load_certificates(self.authorized)
        except (OSError, ValueError) as exc:
            log.error("cannot load authorized keys from %s: %s", self.authorized, exc)
            return
        self._keys = {key for key, allowed in keys.items() if allowed}
        log.info("%d client key(s) authorized from %s", len(self._keys), self.authorized)

    def answer(self) -> None:
        """Answer every pending ZAP request."""
        while True:
            try:
                request = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.socket.send_multipart(self._verdict(request))

    def _verdict(self, request: list[bytes]) -> list[bytes]:
        if len(request) < 6:
            rid = request[1] if len(request) > 1 else b""
            return [ZAP_VERSION, rid, b"400", b"malformed ZAP request", b"", b""]
        _, rid, _, address, _, mechanism, *credentials = request
        if mechanism != b"CURVE" or len(credentials) != 1:
            return [ZAP_VERSION, rid, b"400", b"CURVE required", b"", b""]
        self._reload()
        key = zmq.utils.z85.encode(credentials[0])
        if key not in self._keys:
            self._warn("zap", "refused a client from %s: key %s is not authorized",
                       address.decode(errors="replace"), key.decode())
            return [ZAP_VERSION, rid, b"400", b"key not authorized", b"", b""]
        return [ZAP_VERSION, rid, b"200", b"OK", key, b""]

    def close(self) -> None:
        self.socket.close(linger=0)
