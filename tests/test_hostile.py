"""Hostile and unlucky input: live fuzzing, a slow subscriber, a reconnect storm."""

from __future__ import annotations

import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from conftest import RawClient, RunningBroker, launch_broker
from zchat import Client, Message


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


VALID = [
    {"type": "join", "name": "fuzzy", "id": "1"},
    {"type": "message", "text": "hello", "id": "2"},
    {"type": "history", "after": 0, "limit": 5},
    {"type": "dm", "to": "alice", "text": "x"},
    {"type": "who"},
    {"type": "ping", "id": "p"},
    {"type": "leave", "reason": "bye"},
]
ODD_VALUES: list[Any] = [None, True, -1, 2**63, 1.5, "", "x" * 300, b"\xff", [], {}, [1, [2]],
                         {"type": "join"}]


def mutate(rng: random.Random) -> list[bytes]:
    """One hostile message: random bytes, a broken valid frame, or odd fields."""
    choice = rng.randrange(6)
    if choice == 0:
        return [rng.randbytes(rng.randrange(0, 200))]
    base = dict(rng.choice(VALID))
    if choice == 1:
        raw = bytearray(msgpack.packb(base))
        for _ in range(rng.randrange(1, 4)):
            raw[rng.randrange(len(raw))] = rng.randrange(256)
        return [bytes(raw)]
    if choice == 2:
        raw = msgpack.packb(base)
        return [raw[: rng.randrange(len(raw))]]
    if choice == 3:
        base[rng.choice(["type", "name", "text", "after", "limit", "id", "to", "since"])] = (
            rng.choice(ODD_VALUES))
        return [msgpack.packb(base, use_bin_type=True)]
    if choice == 4:
        return [msgpack.packb(base), rng.randbytes(5)]
    base["name"] = f"f{rng.randrange(10_000)}"
    return [msgpack.packb(base)]


def test_live_fuzz_loses_nothing_for_honest_clients(start_broker: Callable[..., RunningBroker],
                                                    ctx: zmq.Context[Any]) -> None:
    broker = start_broker("--rate", "0", "--heartbeat", "0.5")
    alice = Client(broker.input, "alice", timeout=20)
    bob = Client(broker.input, "bob", timeout=20)
    fuzzers = [ctx.socket(zmq.DEALER) for _ in range(5)]
    try:
        alice.connect()
        bob.connect()
        for sock in fuzzers:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.connect(broker.input)
        rng = random.Random(20261127)
        rss_before = rss_kib(broker.proc.pid)
        sent = []
        deadline = time.monotonic() + 4.0  # bounded in time as well as in count
        for round_ in range(3000):
            if time.monotonic() > deadline:
                break
            for sock in fuzzers:
                sock.send_multipart(mutate(rng))
            if round_ % 10 == 0:
                alice.send_nowait(f"honest {round_}")
                sent.append(f"honest {round_}")
            for sock in fuzzers:  # drain replies so the fuzzers' queues stay small
                while sock.poll(0):
                    sock.recv_multipart()
        alice.send("the end")
        got = []
        for item in bob.events(timeout=20):
            if isinstance(item, Message) and item.sender == "alice":
                got.append(item.text)
                if item.text == "the end":
                    break
        assert got == [*sent, "the end"]
        assert broker.proc.poll() is None
        assert RawClient(ctx, broker).request({"type": "ping"})["type"] == "pong"
        grown = rss_kib(broker.proc.pid) - rss_before
        assert grown < 64 * 1024, f"broker memory grew by {grown} KiB"
    finally:
        alice.close()
        bob.close()


def test_slow_subscriber_does_not_hold_others_back_and_recovers(
    start_broker: Callable[..., RunningBroker], ctx: zmq.Context[Any],
) -> None:
    # A 2 s heartbeat (6 s of silence allowed): the slow client's DEALER is
    # alive and pings between phases; only its SUB stops reading.
    broker = start_broker("--rate", "0", "--heartbeat", "2", "--history", "50000",
                          "--query-rate", "0")
    slow = RawClient(ctx, broker)
    slow.sub.setsockopt(zmq.RCVHWM, 100)  # and then it stops reading
    slow.sub.setsockopt(zmq.RCVBUF, 4096)
    welcome = slow.join("slowpoke")
    _, first = slow.next_event()
    fast = Client(broker.input, "fast", timeout=20)
    talker = RawClient(ctx, broker)
    try:
        fast.connect()
        talker.join("talker")
        rss_before = rss_kib(broker.proc.pid)
        total = 20_000
        text = "x" * 200
        for i in range(total):
            talker.send({"type": "message", "text": f"{i} {text}"})
            if i % 1000 == 999:  # keep the slow one alive on its DEALER
                slow.send({"type": "ping"})
        last = 0
        for i in range(total):
            last = talker.recv(10)["seq"]
            if i % 1000 == 999:
                slow.send({"type": "ping"})
        # The reader that keeps up gets everything.
        count = 0
        for item in fast.events(timeout=20):
            if isinstance(item, Message):
                count += 1
                if count % 1000 == 0:  # the slow one still pings: only its SUB is stuck
                    slow.send({"type": "ping"})
                if item.seq == last:
                    break
        assert count == total
        grown = rss_kib(broker.proc.pid) - rss_before
        assert grown < 64 * 1024, f"broker memory grew by {grown} KiB for a slow reader"
        # The slow one reads again: it sees a gap and fills it from history.
        seen = {first["seq"]} if "seq" in first else set()
        expected_last = last
        highest = welcome["seq"]
        while slow.sub.poll(500):
            if len(seen) % 1000 == 0:
                slow.send({"type": "ping"})
            topic, payload = slow.sub.recv_multipart()
            body = msgpack.unpackb(payload)
            if topic == b"lobby\x00":
                seen.add(body["seq"])
                highest = max(highest, body["seq"])
        missing = sorted(set(range(welcome["seq"] + 1, expected_last + 1)) - seen)
        assert missing, "the slow reader should have lost frames past its HWM"
        after = welcome["seq"]
        recovered: set[int] = set()
        while after < expected_last:
            page = slow.request({"type": "history", "after": after, "limit": 1000,
                                 "id": f"h{after}"})["events"]
            assert page, "history ran dry before the gap was filled"
            recovered.update(e["seq"] for e in page)
            after = page[-1]["seq"]
        assert set(missing) <= recovered
    finally:
        fast.close()


@pytest.mark.slow
def test_reconnect_storm_1000_clients_resume(tmp_path: Path,
                                             start_broker: Callable[..., RunningBroker]) -> None:
    n = 1000
    db = str(tmp_path / "storm.db")
    first = start_broker("--db", db, "--heartbeat", "2", "--rate", "0",
                         "--max-per-address", "0", "--join-rate", "0")
    ctx: zmq.Context[Any] = zmq.Context()
    ctx.setsockopt(zmq.MAX_SOCKETS, 4 * n + 100)
    dealers: list[zmq.Socket[Any]] = []
    second: RunningBroker | None = None
    try:
        for _ in range(n):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(first.input)
            dealers.append(sock)

        def join_all(names_since: dict[int, int], timeout: float) -> dict[int, dict[str, Any]]:
            for i, sock in enumerate(dealers):
                body = {"type": "join", "name": f"c{i}", "id": "j"}
                if i in names_since:
                    body["since"] = names_since[i]
                sock.send(msgpack.packb(body))
            replies: dict[int, dict[str, Any]] = {}
            poller = zmq.Poller()
            index = {}
            for i, sock in enumerate(dealers):
                poller.register(sock, zmq.POLLIN)
                index[sock] = i
            deadline = time.monotonic() + timeout
            while len(replies) < n and time.monotonic() < deadline:
                for sock, _ in poller.poll(1000):
                    replies[index[sock]] = msgpack.unpackb(sock.recv())
            return replies

        welcomes = join_all({}, 60)
        assert len(welcomes) == n and all(w["type"] == "welcome" for w in welcomes.values())
        last_seen = {i: w["seq"] for i, w in welcomes.items()}
        epoch = welcomes[0]["epoch"]
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
        second = launch_broker("--input", first.input, "--broadcast", first.broadcast,
                               "--control", "tcp://127.0.0.1:0", "--db", db,
                               "--heartbeat", "2", "--rate", "0", "--max-per-address", "0",
                               "--join-rate", "0")
        # Every DEALER reconnects by itself; all rejoin at once with their since.
        again = join_all(last_seen, 60)
        assert len(again) == n, f"only {len(again)} of {n} were welcomed back"
        assert all(w["type"] == "welcome" for w in again.values())
        assert {w["epoch"] for w in again.values()} == {epoch}  # history survived
        # Each can fetch what it missed: history after its own since is contiguous.
        probe = dealers[0]
        probe.send(msgpack.packb({"type": "history", "after": last_seen[0], "limit": 1000}))
        assert probe.poll(10_000)
        events = msgpack.unpackb(probe.recv())["events"]
        seqs = [e["seq"] for e in events]
        assert seqs == list(range(last_seen[0] + 1, last_seen[0] + 1 + len(seqs)))
        # The other clients' joins after ours, at the least: one `joined` each,
        # or many in one `joins` (joins of one broker pass are coalesced).
        named = sum(len(e["members"]) if e["type"] == "joins" else 1
                    for e in events if e["type"] in ("joined", "joins"))
        assert named >= n - 1
    finally:
        for sock in dealers:
            sock.close(linger=0)
        ctx.term()
        if second is not None:
            second.stop()
            second.release()
