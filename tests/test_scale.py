"""Many clients, vanished clients and garbage, against a real broker."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any

import msgpack
import zmq

from conftest import RawClient, RunningBroker

N_CLIENTS = 200


def poll_all(ctx: zmq.Context[Any], socks: list[zmq.Socket[Any]],
             done: Any, timeout: float, on_frame: Any) -> None:
    """Poll ``socks`` and feed frames to ``on_frame`` until ``done()`` or timeout."""
    poller = zmq.Poller()
    for sock in socks:
        poller.register(sock, zmq.POLLIN)
    deadline = time.monotonic() + timeout
    while not done():
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError("timed out")
        for sock, _ in poller.poll(min(left, 1.0) * 1000):
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                on_frame(sock, frames)


def test_200_clients_each_get_every_message_in_order_despite_garbage(
    broker: RunningBroker, ctx: zmq.Context[Any],
) -> None:
    clients = [RawClient(ctx, broker) for _ in range(N_CLIENTS)]
    for client in clients:
        client.subscribe()
    # All join at once.
    for i, client in enumerate(clients):
        client.send({"type": "join", "name": f"user{i}", "id": "j"})
    welcomes: dict[int, dict[str, Any]] = {}
    index = {c.dealer: i for i, c in enumerate(clients)}
    poll_all(ctx, [c.dealer for c in clients], lambda: len(welcomes) == N_CLIENTS, 60,
             lambda s, f: welcomes.__setitem__(index[s], msgpack.unpackb(f[-1])))
    assert all(w["type"] == "welcome" for w in welcomes.values())
    # Every SUB is live once it heard a frame (a heartbeat at the latest).
    by_sub = {c.sub: i for i, c in enumerate(clients)}
    events: dict[int, list[dict[str, Any]]] = {i: [] for i in range(N_CLIENTS)}
    live: set[int] = set()

    def on_sub(sock: zmq.Socket[Any], frames: list[bytes]) -> None:
        i = by_sub[sock]
        live.add(i)
        body = msgpack.unpackb(frames[1])
        if frames[0] == b"lobby\x00":
            events[i].append(body)

    poll_all(ctx, list(by_sub), lambda: len(live) == N_CLIENTS, 30, on_sub)

    # Mallory sends garbage the whole time the others chat.
    mallory = RawClient(ctx, broker)
    rng = random.Random(7)
    senders = clients[:3]
    sent = 0
    for round_ in range(50):
        for garbage in (rng.randbytes(rng.randint(0, 64)), b"\xc1" * 10,
                        msgpack.packb({"type": "message"}), msgpack.packb({"type": 1})):
            mallory.send_raw(garbage)
        mallory.send_raw(b"a", b"b", b"c")
        for k, sender in enumerate(senders):
            sender.send({"type": "message", "text": f"s{k}-{round_}", "id": f"{round_}"})
            sent += 1
    acks: list[dict[str, Any]] = []
    sender_dealers = {s.dealer for s in senders}
    poll_all(ctx, list(sender_dealers), lambda: len(acks) == sent, 60,
             lambda s, f: acks.append(msgpack.unpackb(f[-1])))
    assert all(a["type"] == "ack" for a in acks)
    last_seq = max(a["seq"] for a in acks)

    poll_all(ctx, list(by_sub),
             lambda: all(ev and ev[-1]["seq"] >= last_seq for ev in events.values()), 60, on_sub)
    for i, got in events.items():
        seqs = [e["seq"] for e in got]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), f"gap for user{i}"
        texts = [e["text"] for e in got if e["type"] == "message"]
        assert len(texts) == sent, f"user{i} got {len(texts)} of {sent}"
    # The flood of garbage got one error each, and the broker is still fine.
    mallory.send({"type": "ping", "id": "alive"})
    answers = []
    while not answers or answers[-1].get("id") != "alive":
        answers.append(mallory.recv())
    errors = answers[:-1]
    assert len(errors) == 5 * 50
    assert {e["code"] for e in errors} <= {"bad_frame", "bad_request", "not_joined"}


def test_killed_client_is_announced_as_timed_out(broker: RunningBroker,
                                                 ctx: zmq.Context[Any]) -> None:
    watcher = RawClient(ctx, broker)
    watcher.join("watcher")
    script = textwrap.dedent(f"""
        import sys, time
        from zchat import Client
        client = Client({broker.input!r}, "doomed")
        client.connect()
        print("joined", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "joined"
        watcher.wait_event(lambda e: e["type"] == "joined" and e["name"] == "doomed")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        watcher.request({"type": "ping"})  # stay alive ourselves
        if watcher.sub.poll(100):
            _, payload = watcher.sub.recv_multipart()
            body = msgpack.unpackb(payload)
            if body["type"] == "left":
                assert (body["name"], body["reason"]) == ("doomed", "timeout")
                return
    raise AssertionError("the killed client was never announced")
