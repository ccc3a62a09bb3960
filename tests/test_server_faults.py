"""A bug while handling one request costs that request, never the broker.

The broker runs in this process (a real Server on real loopback sockets) so
that its state can be given a fault no peer could cause.
"""

from __future__ import annotations

import io
import threading
from typing import Any

import msgpack
import pytest
import zmq

from zchat.broker.config import Config
from zchat.broker.server import Server
from zchat.protocol import Request, Say
from zchat.state import Outgoing


def test_an_exception_in_one_request_is_answered_internal_and_logged(
        ctx: zmq.Context[Any], caplog: pytest.LogCaptureFixture) -> None:
    server = Server(Config(input="tcp://127.0.0.1:0", broadcast="tcp://127.0.0.1:0",
                           control="tcp://127.0.0.1:0", db=":memory:"),
                    screen=io.StringIO(), context=ctx)  # tracked: leaks fail the test
    endpoints = server.bind()
    state = server.state
    assert state is not None
    handle = state.handle

    def faulty(peer: bytes, request: Request, now: float, addr: str = "",
               key: str | None = None) -> list[Outgoing]:
        if isinstance(request, Say) and request.text == "boom":
            raise KeyError("a bug")
        return handle(peer, request, now, addr, key)

    state.handle = faulty  # type: ignore[method-assign]
    fast = state.message

    def faulty_message(peer: bytes, body: dict[str, Any], now: float) -> list[Outgoing] | None:
        # The loop's hot path for a member's message map: the same bug there.
        if body.get("text") == "boom":
            raise KeyError("a bug")
        return fast(peer, body, now)

    state.message = faulty_message  # type: ignore[method-assign]
    loop = threading.Thread(target=server.run)
    loop.start()
    dealer = ctx.socket(zmq.DEALER)
    try:
        dealer.connect(endpoints.input)

        def request(body: dict[str, Any]) -> dict[str, Any]:
            dealer.send(msgpack.packb(body))
            assert dealer.poll(5000)
            reply: dict[str, Any] = msgpack.unpackb(dealer.recv())
            return reply

        assert request({"type": "join", "name": "ann"})["type"] == "welcome"
        reply = request({"type": "message", "text": "boom", "id": "b1"})
        assert reply == {"type": "error", "code": "internal", "id": "b1",
                         "detail": "the broker failed on this request; see its log"}
        assert request({"type": "message", "text": "fine", "id": "f1"})["type"] == "ack"
        assert any("internal error handling message from ann" in r.getMessage()
                   and r.exc_info for r in caplog.records)
    finally:
        server.stop()
        loop.join(10)
    assert not loop.is_alive()
