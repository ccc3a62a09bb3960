"""What a relay tier saves the broker: CPU per event, direct against through relays.

One run of ``zchat-broker`` (with its relay link) and two ``zchat-relay``
processes on this machine. S subscribers (plain SUB sockets on ``lobby``,
read by counting processes) connect either all to the broker, or half to
each relay; one joined publisher says R messages a second for T seconds.
For each layout the script reports the CPU seconds each process spent per
1,000 events and the deliveries counted, so the figures in docs/SCALING.md
come from one run on one machine, as ratios::

    flock /work/notes/heavy.lock python -m zchat.bench.relay_cost --subscribers 1000

It needs keys for the link and makes them in a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import multiprocessing.connection
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgpack
import zmq

from zchat.keys import make_keypair

from .systems import cpu_seconds, rss_bytes

LISTENING = re.compile(r"input=(\S+) broadcast=(\S+) control=\S+ relay=(\S+)")
RELAY_LISTENING = re.compile(r"zchat-relay listening input=(\S+) broadcast=(\S+)")


def _start(argv: list[str], pattern: re.Pattern[str]) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = pattern.search(line)
    if match is None:
        proc.kill()
        raise RuntimeError(f"{argv[2]} did not start: {line!r}")
    return proc, list(match.groups())


def _reader(pipe: multiprocessing.connection.Connection, endpoints: list[str]) -> None:
    """Count what ``len(endpoints)`` SUB sockets receive until told to stop."""
    ctx = zmq.Context()
    poller = zmq.Poller()
    socks = []
    for endpoint in endpoints:
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.SUBSCRIBE, b"lobby\x00")
        sock.connect(endpoint)
        poller.register(sock, zmq.POLLIN)
        socks.append(sock)
    pipe.send("ready")
    count = 0
    while not pipe.poll(0):
        for sock, _ in poller.poll(100):
            while True:
                try:
                    sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                count += 1
    pipe.recv()
    pipe.send(count)
    for sock in socks:
        sock.close(linger=0)
    ctx.term()


def measure(layout: str, subscribers: int, rate: float, seconds: float, readers: int,
            keys: Path) -> dict[str, Any]:
    py = sys.executable
    broker, (binput, bbroadcast, link) = _start(
        [py, "-m", "zchat.broker.main", "--quiet", "--rate", "0", "--db", ":memory:",
         "--input", "tcp://127.0.0.1:0", "--broadcast", "tcp://127.0.0.1:0",
         "--control", "tcp://127.0.0.1:0", "--max-per-address", "0", "--join-rate", "0",
         "--query-rate", "0", "--relay-bind", "tcp://127.0.0.1:0",
         "--relay-broadcast", "tcp://127.0.0.1:0", "--relay-keys", str(keys / "relays"),
         "--relay-secret-key", str(keys / "broker.key_secret")], LISTENING)
    procs = {"broker": broker}
    targets = [bbroadcast]
    if layout == "relays":
        targets = []
        for name in ("relay1", "relay2"):
            relay, (_, rbroadcast) = _start(
                [py, "-m", "zchat.broker.relay_main", "--upstream", link,
                 "--upstream-key", str(keys / "broker.key"),
                 "--relay-key", str(keys / f"{name}.key_secret"),
                 "--input", "tcp://127.0.0.1:0", "--broadcast", "tcp://127.0.0.1:0",
                 "--max-per-address", "0", "--log-level", "WARNING"], RELAY_LISTENING)
            procs[name] = relay
            targets.append(rbroadcast)
    ctx = zmq.Context()
    try:
        endpoints = [targets[i % len(targets)] for i in range(subscribers)]
        pipes = []
        workers = []
        for r in range(readers):
            ours, theirs = multiprocessing.Pipe()
            worker = multiprocessing.Process(target=_reader, args=(theirs, endpoints[r::readers]))
            worker.start()
            pipes.append(ours)
            workers.append(worker)
        for pipe in pipes:
            pipe.recv()
        publisher = ctx.socket(zmq.DEALER)
        publisher.connect(binput)
        publisher.send(msgpack.packb({"type": "join", "name": "publisher"}))
        publisher.recv()
        probe = ctx.socket(zmq.SUB)
        probe.setsockopt(zmq.SUBSCRIBE, b"lobby\x00")
        probe.connect(targets[-1])
        # Subscriptions travel up through the relays: wait until one arrives.
        while True:
            publisher.send(msgpack.packb({"type": "message", "text": "warm-up"}))
            publisher.recv()
            if probe.poll(200):
                break
        time.sleep(1.0)  # every reader's subscriptions in place (they forward the same way)
        before = {name: cpu_seconds(p.pid) for name, p in procs.items()}
        start = time.monotonic()
        events = int(rate * seconds)
        for n in range(events):
            due = start + n / rate
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            publisher.send(msgpack.packb({"type": "message", "text": f"m{n}"}))
            while publisher.poll(0):
                publisher.recv()
        time.sleep(2.0)  # let the last deliveries drain
        cpu = {name: cpu_seconds(p.pid) - before[name] for name, p in procs.items()}
        rss = {name: rss_bytes(p.pid) for name, p in procs.items()}
        counts = []
        for pipe in pipes:
            pipe.send("stop")
            counts.append(pipe.recv())
        for worker in workers:
            worker.join(10)
        delivered = sum(counts)
        publisher.close(linger=0)
        probe.close(linger=0)
        return {
            "layout": layout, "subscribers": subscribers, "rate": rate, "events": events,
            "delivered": delivered, "expected_at_least": events * subscribers,
            "cpu_ms_per_1000_events": {k: round(1e6 * v / events, 1) for k, v in cpu.items()},
            "rss_mib": {k: round(v / 2**20, 1) for k, v in rss.items()},
        }
    finally:
        ctx.term()
        for proc in procs.values():
            proc.terminate()
            proc.wait(10)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zchat.bench.relay_cost",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subscribers", type=int, default=1000)
    p.add_argument("--rate", type=float, default=100.0, help="events per second")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--readers", type=int, default=4, help="counting processes")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp)
        make_keypair(keys, "broker")
        (keys / "relays").mkdir()
        for name in ("relay1", "relay2"):
            public, _ = make_keypair(keys, name)
            os.link(public, keys / "relays" / public.name)
        results = [measure(layout, args.subscribers, args.rate, args.seconds, args.readers,
                           keys) for layout in ("direct", "relays")]
    print(json.dumps({"machine_cpus": os.cpu_count(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
