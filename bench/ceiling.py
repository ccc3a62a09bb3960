"""The ceiling: libzmq forwarding in C, with no Python per message.

Three sockets, two ``zmq.proxy_steerable`` threads, one libzmq I/O thread
(as the broker has by default)::

    PULL   push       publishers' [topic, payload] messages  -> PUB
    PUB    broadcast  to every SUB, filtered by topic, SNDHWM as the broker
    ROUTER input      a proxy from the ROUTER to itself: an echo, so a
                      client's DEALER "join" and pings get an answer

It prints ``ceiling listening input=EP broadcast=EP push=EP`` and runs until
SIGINT or SIGTERM. Run with ``python -m zchat.bench.ceiling``.
"""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Sequence
from typing import Any

import zmq

from .systems import raise_fd_limits

__all__ = ["main"]

PUB_SNDHWM = 10_000  # what zchat's broker sets on its PUB


def _steered(ctx: zmq.Context[Any], frontend: zmq.Socket[Any], backend: zmq.Socket[Any],
             control: str) -> threading.Thread:
    steer = ctx.socket(zmq.PAIR)
    steer.bind(control)

    def run() -> None:
        try:
            zmq.proxy_steerable(frontend, backend, None, steer)
        finally:
            steer.close(linger=0)

    thread = threading.Thread(target=run, name=control, daemon=True)
    thread.start()
    return thread


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m zchat.bench.ceiling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default="tcp://127.0.0.1:0", help="ROUTER echo endpoint")
    parser.add_argument("--broadcast", default="tcp://127.0.0.1:0", help="PUB endpoint")
    parser.add_argument("--push", default="tcp://127.0.0.1:0", help="PULL endpoint")
    parser.add_argument("--io-threads", type=int, default=1)
    args = parser.parse_args(argv)
    raise_fd_limits(0)
    ctx: zmq.Context[Any] = zmq.Context(io_threads=args.io_threads)
    pull, pub, router = ctx.socket(zmq.PULL), ctx.socket(zmq.PUB), ctx.socket(zmq.ROUTER)
    pub.setsockopt(zmq.SNDHWM, PUB_SNDHWM)
    for sock in (pull, pub, router):
        sock.setsockopt(zmq.LINGER, 0)
    pull.bind(args.push)
    pub.bind(args.broadcast)
    router.bind(args.input)
    names = {sock: sock.getsockopt_string(zmq.LAST_ENDPOINT) for sock in (pull, pub, router)}
    threads = [
        _steered(ctx, pull, pub, "inproc://steer-forward"),
        _steered(ctx, router, router, "inproc://steer-echo"),
    ]
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print(f"ceiling listening input={names[router]} broadcast={names[pub]} push={names[pull]}",
          flush=True)
    while not stop.wait(0.5):
        pass
    for name in ("inproc://steer-forward", "inproc://steer-echo"):
        steer = ctx.socket(zmq.PAIR)
        steer.connect(name)
        steer.send(b"TERMINATE")
        steer.close(linger=1000)
    for thread in threads:
        thread.join(5)
    for sock in (pull, pub, router):
        sock.close()
    ctx.term()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
