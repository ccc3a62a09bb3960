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

from .systems import cpu_seconds, raise_fd_limits, rss_bytes

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


def lobby_subscriber(ctx: zmq.Context[Any], endpoint: str, *,
                     unbounded: bool = True) -> zmq.Socket[Any]:
    """A SUB on lobby's single-event topic at ``endpoint`` (no receive bound unless told)."""
    sock: zmq.Socket[Any] = ctx.socket(zmq.SUB)
    if unbounded:
        sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"lobby\x00")
    sock.connect(endpoint)
    return sock


def await_broadcast(subs: Sequence[zmq.Socket[Any]], deadline: float) -> tuple[int, float]:
    """Read each of ``subs`` until the "to everyone" message, until ``deadline`` (monotonic).

    Returns how many never had it, and the wall-clock time the last one that
    did got it (0.0 if none did).
    """
    missed, last = 0, 0.0
    for sub in subs:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sub.poll(int(1000 * left) + 1):
                missed += 1
                break
            topic, body = sub.recv_multipart()
            if topic == b"lobby\x00" and b"to everyone" in body:
                last = max(last, time.time())
                break
    return missed, last


def _reader(pipe: multiprocessing.connection.Connection, endpoints: list[str]) -> None:
    """Count what ``len(endpoints)`` SUB sockets receive until told to stop."""
    ctx = zmq.Context()
    poller = zmq.Poller()
    socks = []
    for endpoint in endpoints:
        sock = lobby_subscriber(ctx, endpoint)
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


def _systems(layout: str, keys: Path, relays: int = 2,
             ) -> tuple[dict[str, subprocess.Popen[str]], str, str, list[tuple[str, str]]]:
    """Start the broker (and ``relays`` relays); return them, the broker's input
    and broadcast, and the (input, broadcast) pairs clients use."""
    py = sys.executable
    broker, (binput, bbroadcast, link) = _start(
        [py, "-m", "zchat.broker.main", "--quiet", "--rate", "0", "--db", ":memory:",
         "--input", "tcp://127.0.0.1:0", "--broadcast", "tcp://127.0.0.1:0",
         "--control", "tcp://127.0.0.1:0", "--max-per-address", "0", "--join-rate", "0",
         "--query-rate", "0", "--relay-bind", "tcp://127.0.0.1:0",
         "--relay-broadcast", "tcp://127.0.0.1:0", "--relay-keys", str(keys / "relays"),
         "--relay-secret-key", str(keys / "broker.key_secret")], LISTENING)
    procs = {"broker": broker}
    pairs = [(binput, bbroadcast)]
    if layout == "relays":
        pairs = []
        for name in (f"relay{n + 1}" for n in range(relays)):
            relay, (rinput, rbroadcast) = _start(
                [py, "-m", "zchat.broker.relay_main", "--upstream", link,
                 "--upstream-key", str(keys / "broker.key"),
                 "--relay-key", str(keys / f"{name}.key_secret"),
                 "--input", "tcp://127.0.0.1:0", "--broadcast", "tcp://127.0.0.1:0",
                 "--max-per-address", "0", "--log-level", "WARNING"], RELAY_LISTENING)
            procs[name] = relay
            pairs.append((rinput, rbroadcast))
    return procs, binput, bbroadcast, pairs


def make_keys(keys: Path, relays: int) -> None:
    """The link's keys in ``keys``: the broker's pair, ``relays`` relays' (in relays/)."""
    make_keypair(keys, "broker")
    (keys / "relays").mkdir()
    for n in range(relays):
        public, _ = make_keypair(keys, f"relay{n + 1}")
        os.link(public, keys / "relays" / public.name)


def _stop(procs: dict[str, subprocess.Popen[str]]) -> None:
    for proc in procs.values():
        proc.terminate()
        proc.wait(10)


def measure(layout: str, subscribers: int, rate: float, seconds: float, readers: int,
            keys: Path) -> dict[str, Any]:
    """Broker and relay CPU per event with ``subscribers`` SUBs on lobby."""
    procs, binput, _, pairs = _systems(layout, keys)
    targets = [broadcast for _, broadcast in pairs]
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
        probe = lobby_subscriber(ctx, targets[-1], unbounded=False)
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
        _stop(procs)


def join_cost(layout: str, clients: int, keys: Path) -> dict[str, Any]:
    """``clients`` really joined (a DEALER and a SUB each): time, memory, one broadcast."""
    procs, _, _, pairs = _systems(layout, keys)
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, 4 * clients + 64)  # libzmq's default is 1,023
    socks: list[zmq.Socket[Any]] = []
    try:
        rss_before = {name: rss_bytes(p.pid) for name, p in procs.items()}
        start = time.monotonic()
        dealers = []
        subs = []
        for n in range(clients):
            input_, broadcast = pairs[n % len(pairs)]
            dealer = ctx.socket(zmq.DEALER)
            dealer.connect(input_)
            dealer.send(msgpack.packb({"type": "join", "name": f"c{n}"}))
            sub = lobby_subscriber(ctx, broadcast, unbounded=False)
            dealers.append(dealer)
            subs.append(sub)
        socks += dealers + subs
        waiting = set(range(clients))
        deadline = start + 120
        resend = start + 10
        while waiting:
            for n in list(waiting):
                while dealers[n].poll(0):
                    if msgpack.unpackb(dealers[n].recv())["type"] == "welcome":
                        waiting.discard(n)
            now = time.monotonic()
            if now > deadline:
                raise RuntimeError(f"{len(waiting)} of {clients} clients not joined in 120 s")
            if now > resend:
                # A connection cut before its join was read (a full listen
                # queue, the join timeout) lost it: ask again.
                resend = now + 10
                for n in waiting:
                    dealers[n].send(msgpack.packb({"type": "join", "name": f"c{n}"}))
            time.sleep(0.01)
        joined = time.monotonic() - start
        # Every SUB connected and subscribed (upstream too): each hears a heartbeat.
        for sub in subs:
            sub.setsockopt(zmq.SUBSCRIBE, b"\x00")
        for sub in subs:
            if not sub.poll(20_000):
                raise RuntimeError("a subscriber heard no heartbeat in 20 s")
            while sub.poll(0):
                sub.recv_multipart()
        rss = {name: rss_bytes(p.pid) for name, p in procs.items()}
        publisher = dealers[0]
        sent = time.monotonic()
        publisher.send(msgpack.packb({"type": "message", "text": "to everyone"}))
        # Heartbeats keep coming, so each wait is bounded by one deadline for all.
        missed, _ = await_broadcast(subs[::-1], sent + 30)
        to_last = time.monotonic() - sent
        return {
            "layout": layout, "clients": clients, "join_all_s": round(joined, 2),
            "broadcast_to_last_ms": round(1000 * to_last, 1), "broadcast_missed": missed,
            "rss_kib_per_client": {
                name: round((rss[name] - rss_before[name]) / 1024 / clients, 2)
                for name in procs},
            "rss_mib": {name: round(v / 2**20, 1) for name, v in rss.items()},
        }
    finally:
        for sock in socks:
            sock.close(linger=0)
        ctx.term()
        _stop(procs)


def failover_cost(clients: int, keys: Path, messages: int = 50) -> dict[str, Any]:
    """``clients`` zchat clients on relay1 (relay2 their second endpoint); relay1
    is killed with SIGKILL while a client on relay2 says ``messages`` lines:
    how long until every one resumed, and did each get every line exactly once."""
    from zchat import Client, Message, Status
    from zchat.protocol import ClientStatus

    procs, _, _, pairs = _systems("relays", keys)
    (input1, _), (input2, _) = pairs
    heard: list[list[str]] = [[] for _ in range(clients)]
    resumed: list[float] = [0.0] * clients

    def on_item(n: int) -> Any:
        def take(item: Any) -> None:
            if isinstance(item, Message) and item.text.startswith("f"):
                heard[n].append(item.text)
            elif isinstance(item, Status) and item.state == ClientStatus.RECONNECTED:
                resumed[n] = time.monotonic()
        return take

    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, 8 * clients + 64)
    people = [Client(f"{input1},{input2}", f"p{n}", context=ctx, timeout=60,
                     on_item=on_item(n)) for n in range(clients)]
    sender = Client(input2, "sender", context=ctx, timeout=60)
    try:
        for person in people:
            person.connect()
        sender.connect()
        half = messages // 2
        for n in range(half):
            sender.send(f"f{n}")
        killed = time.monotonic()
        procs["relay1"].kill()
        for n in range(half, messages):
            sender.send_nowait(f"f{n}")
        deadline = killed + 120
        while (not all(resumed) or any(len(h) < messages for h in heard)) and \
                time.monotonic() < deadline:
            time.sleep(0.05)
        expected = [f"f{n}" for n in range(messages)]
        times = sorted(t - killed for t in resumed if t)
        return {
            "layout": "failover", "clients": clients, "messages": messages,
            "resumed": len(times),
            "all_resumed_s": round(times[-1], 2) if len(times) == clients else None,
            "median_resumed_s": round(times[len(times) // 2], 2) if times else None,
            "exactly_once": sum(1 for h in heard if h == expected),
        }
    finally:
        for client in (*people, sender):
            client.close()
        ctx.term()
        procs.pop("relay1").wait(5)
        _stop(procs)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m zchat.bench.relay_cost",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subscribers", type=int, default=1000)
    p.add_argument("--rate", type=float, default=100.0, help="events per second")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--readers", type=int, default=4, help="counting processes")
    p.add_argument("--layouts", default="direct,relays", help="direct, relays or both")
    p.add_argument("--failover", type=int, default=0,
                   help="also kill a relay under this many clients and time their resumption")
    p.add_argument("--joined", type=int, default=0,
                   help="also join this many clients (DEALER + SUB each) per layout")
    args = p.parse_args(argv)
    raise_fd_limits(8 * args.joined + 1024)  # each socket holds a descriptor and a mailbox
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp)
        make_keys(keys, 2)
        # Each result as soon as it is in: a later step that fails loses nothing.
        print(json.dumps({"machine_cpus": os.cpu_count()}), flush=True)
        layouts = args.layouts.split(",")
        for layout in layouts if args.subscribers else ():
            print(json.dumps(measure(layout, args.subscribers, args.rate, args.seconds,
                                     args.readers, keys)), flush=True)
        for layout in layouts if args.joined else ():
            try:
                print(json.dumps(join_cost(layout, args.joined, keys)), flush=True)
            except RuntimeError as exc:
                print(json.dumps({"layout": layout, "clients": args.joined,
                                  "error": str(exc)}), flush=True)
        if args.failover:
            print(json.dumps(failover_cost(args.failover, keys)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
