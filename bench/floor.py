"""The Python floor: zchat's wire work per message in CPython, and nothing else.

What any broker written in Python on pyzmq and msgpack pays to speak
zchat's protocol, with none of zchat's own work: one thread on a
``zmq.Poller`` over a ROUTER and a PUB, like the broker; per ``message``
it receives the routing id and the payload, decodes the map, makes and
packs the event, publishes it on the room's topic and keeps it for the
pass's batch, packs and sends the ``ack``; per pass it publishes the batch.
No validation, names, rooms, budgets, dedupe, history or guard: a join gets
a ``welcome`` that offers batches, a ping a ``pong``, anything else nothing.

So ``zchat ÷ floor`` is what zchat's own logic and durability cost, and
``floor ÷ ceiling`` what per-message Python costs against libzmq's C
forwarding: a bound no Python broker of this shape gets past.

It prints ``floor listening input=EP broadcast=EP`` and runs until SIGINT
or SIGTERM. Run with ``python -m zchat.bench.floor``.
"""

from __future__ import annotations

import argparse
import signal
import time
from collections.abc import Sequence
from typing import Any

import msgpack
import zmq

from zchat.protocol import batch_topic, encode_batch, room_topic

from .systems import raise_fd_limits

__all__ = ["main"]

PUB_SNDHWM = 10_000  # what zchat's broker sets on its PUB
DRAIN = 4096  # frames per pass at most, as the broker's drain
ROOM = "lobby"

_NOBLOCK = int(zmq.NOBLOCK)
_MORE = int(zmq.SNDMORE | zmq.NOBLOCK)
_send = zmq.backend.Socket.send  # the compiled send, as the broker uses


def serve(router: zmq.Socket[Any], pub: zmq.Socket[Any], stopping: list[bool]) -> None:
    """Answer and forward until ``stopping[0]`` is set."""
    pack = msgpack.Packer().pack
    unpack = msgpack.unpackb
    recv = router.recv
    topic, batched = room_topic(ROOM), batch_topic(ROOM)
    names: dict[bytes, str] = {}
    seq = 0
    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    while not stopping[0]:
        if not poller.poll(500):
            continue
        batch: list[bytes] = []
        now = time.time()
        for _ in range(DRAIN):
            try:
                peer = recv(_NOBLOCK)
            except zmq.Again:
                break
            payload = recv(_NOBLOCK, copy=False)
            while payload.more:  # a frame too many: read past it, as the broker does
                payload = recv(_NOBLOCK, copy=False)
            body = unpack(payload.buffer)
            kind = body.get("type")
            if kind == "message":
                seq += 1
                packed = pack({"type": "message", "room": ROOM, "seq": seq, "ts": now,
                               "from": names.get(peer, "?"), "text": body.get("text")})
                _send(pub, topic, _MORE)
                _send(pub, packed, _NOBLOCK)
                batch.append(packed)
                reply = {"type": "ack", "seq": seq, "room": ROOM}
                if "id" in body:
                    reply["id"] = body["id"]
            elif kind == "join":
                names[peer] = str(body.get("name"))
                reply = {"type": "welcome", "name": names[peer], "seq": seq, "batch": True}
            elif kind == "ping":
                reply = {"type": "pong", "ts": now, "seq": seq}
            else:
                continue
            try:
                _send(router, peer, _MORE)
            except zmq.ZMQError:
                continue  # the peer is gone (ROUTER_MANDATORY, as the broker): drop the reply
            _send(router, pack(reply), _NOBLOCK)
        if batch:
            _send(pub, batched, _MORE)
            _send(pub, encode_batch(batch, ROOM), _NOBLOCK)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zchat.bench.floor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default="tcp://127.0.0.1:0", help="ROUTER endpoint")
    parser.add_argument("--broadcast", default="tcp://127.0.0.1:0", help="PUB endpoint")
    args = parser.parse_args(argv)
    raise_fd_limits(0)
    ctx: zmq.Context[Any] = zmq.Context()
    router, pub = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, PUB_SNDHWM)
    for sock in (router, pub):
        sock.setsockopt(zmq.LINGER, 0)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.bind(args.input)
    pub.bind(args.broadcast)
    stopping = [False]

    def stop(*_: object) -> None:
        stopping[0] = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    input_ep = router.getsockopt_string(zmq.LAST_ENDPOINT)
    broadcast_ep = pub.getsockopt_string(zmq.LAST_ENDPOINT)
    print(f"floor listening input={input_ep} broadcast={broadcast_ep}", flush=True)
    try:
        serve(router, pub, stopping)
    finally:
        router.close()
        pub.close()
        ctx.term()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
