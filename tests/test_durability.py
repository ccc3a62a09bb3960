"""Nothing acked is lost: a broker killed with SIGKILL and restarted on its --db."""

from __future__ import annotations

import io
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from conftest import RawClient, RunningBroker, launch_broker
from zchat import Client, Message, Status
from zchat.broker.config import Config
from zchat.broker.server import Server
from zchat.history import SqliteHistory
from zchat.state import Limits

SENDERS = 3
PER_SENDER = 150


@pytest.mark.parametrize("fsync", [(), ("--fsync",)], ids=["on-the-loop", "fsync-aside"])
def test_kill_9_loses_nothing_acked_and_resumes(
    start_broker: Callable[..., RunningBroker], tmp_path: Path, ctx: zmq.Context[Any],
    fsync: tuple[str, ...],
) -> None:
    # Both commit paths: on the loop (the default), and on the writer thread
    # while the loop decodes the next pass (commits that fsync).
    db = str(tmp_path / "history.db")
    options = ("--db", db, "--rate", "0", "--heartbeat", "0.3", *fsync)
    first = start_broker(*options)
    epoch = RawClient(ctx, first).request({"type": "ping"})  # the broker answers
    assert epoch["type"] == "pong"
    senders = [Client(first.input, f"sender{i}", timeout=30) for i in range(SENDERS)]
    reader = Client(first.input, "reader", timeout=30)
    restarted: RunningBroker | None = None
    try:
        for client in (*senders, reader):
            client.connect()
        futures: dict[str, Future[int]] = {}
        acked_before_kill: dict[str, int] = {}
        for n in range(PER_SENDER):
            for i, client in enumerate(senders):
                futures[f"s{i}-{n}"] = client.send_nowait(f"s{i}-{n}")
            if n == PER_SENDER // 3:
                # Wait for some acks, so the kill lands mid-stream with acked events.
                futures[f"s0-{n}"].result(30)
                acked_before_kill = {t: f.result() for t, f in futures.items()
                                     if f.done() and not f.exception()}
                first.proc.send_signal(signal.SIGKILL)
                first.proc.wait(10)
        assert acked_before_kill
        restarted = launch_broker("--input", first.input, "--broadcast", first.broadcast,
                                  "--control", "tcp://127.0.0.1:0", *options)
        acks = {text: fut.result(60) for text, fut in futures.items()}
        # Every ack the first broker gave holds: same seq after the crash.
        for text, seq in acked_before_kill.items():
            assert acks[text] == seq
        history = []
        after = 0
        while True:
            page = senders[0].history(after=after, limit=1000)
            if not page:
                break
            history.extend(page)
            after = page[-1].seq
        seqs = [e.seq for e in history]
        assert seqs == list(range(1, len(seqs) + 1)), "seq has a hole or a repeat"
        texts = [e.text for e in history if isinstance(e, Message)]
        assert sorted(texts) == sorted(futures), "a message is missing or doubled"
        by_seq = {e.seq: e for e in history}
        for text, seq in acks.items():
            event = by_seq[seq]
            assert isinstance(event, Message) and event.text == text
        # New events continue the seq, under the same epoch: nothing was lost.
        new_seq = senders[1].send("after restart")
        assert new_seq == seqs[-1] + 1
        # The reader resumed with since: every message exactly once, in order.
        got: list[str] = []
        statuses = []
        deadline = time.monotonic() + 60
        # Events can reach the reader's SUB (reconnected by itself) before the
        # reader has rejoined: wait for both.
        while ("after restart" not in got or "reconnected" not in statuses) and (
                time.monotonic() < deadline):
            item = reader.next_event(1)
            if isinstance(item, Message):
                got.append(item.text)
            elif isinstance(item, Status):
                statuses.append(item.state)
        assert "history_lost" not in statuses
        assert "reconnected" in statuses
        assert sorted(got) == sorted([*futures, "after restart"])
        assert len(got) == len(set(got))
    finally:
        for client in (*senders, reader):
            client.close()
        if restarted is not None:
            restarted.stop()
            restarted.release()


def test_restart_on_same_db_keeps_history_and_epoch(
    start_broker: Callable[..., RunningBroker], tmp_path: Path, ctx: zmq.Context[Any],
) -> None:
    db = str(tmp_path / "history.db")
    first = start_broker("--db", db)
    alice = RawClient(ctx, first)
    welcome = alice.join("alice")
    alice.request({"type": "message", "text": "remember me"})
    first.stop()
    second = start_broker("--db", db)
    bob = RawClient(ctx, second)
    again = bob.join("bob")
    assert again["epoch"] == welcome["epoch"]
    events = bob.request({"type": "history", "after": 0})["events"]
    assert [e.get("text") for e in events if e["type"] == "message"] == ["remember me"]
    kinds = [e["type"] for e in events]
    assert kinds[:3] == ["joined", "message", "left"]  # alice's shutdown leave was kept
    assert again["seq"] == events[-1]["seq"]
    assert any("history:" in line and db in line for line in second.stderr_lines)


def test_second_broker_on_the_same_db_exits_4(start_broker: Callable[..., RunningBroker],
                                              tmp_path: Path) -> None:
    import subprocess
    import sys

    db = str(tmp_path / "history.db")
    start_broker("--db", db)
    clash = subprocess.run(
        [sys.executable, "-m", "zchat.broker.main", "--db", db, "--input", "tcp://127.0.0.1:0",
         "--broadcast", "tcp://127.0.0.1:0", "--control", "tcp://127.0.0.1:0"],
        capture_output=True, text=True, timeout=30)
    assert clash.returncode == 4
    assert "cannot open history database" in clash.stderr


@pytest.mark.parametrize("fsync", [False, True], ids=["on-the-loop", "fsync-aside"])
def test_a_store_that_fills_up_stops_the_broker_and_nothing_unstored_goes_out(
    ctx: zmq.Context[Any], tmp_path: Path, fsync: bool,
) -> None:
    """SQLITE_FULL mid-stream: every ack and every published event names a stored seq.

    The broker runs in this process (a real Server on loopback sockets) so
    that its database can be capped (``PRAGMA max_page_count``) while it
    commits, on the loop or (fsync) on its writer thread while it decodes
    the next pass.
    """
    db = tmp_path / "history.db"
    server = Server(Config(input="tcp://127.0.0.1:0", broadcast="tcp://127.0.0.1:0",
                           control="tcp://127.0.0.1:0", db=str(db), heartbeat=0.2,
                           retention=3600.0, limits=Limits(rate=0.0), fsync=fsync),
                    screen=io.StringIO(), context=ctx)
    endpoints = server.bind()
    assert server.state is not None
    store = server.state.store
    assert isinstance(store, SqliteHistory) and store.commits_aside is fsync
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count={pages + 300}")  # about 1.2 MB more
    loop = threading.Thread(target=server.run)
    loop.start()
    dealer = ctx.socket(zmq.DEALER)
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")  # singles, batches and heartbeats
    sent = 1500
    acks: dict[str, int] = {}
    try:
        dealer.connect(endpoints.input)
        sub.connect(endpoints.broadcast)
        dealer.send(msgpack.packb({"type": "join", "name": "ann", "id": "j"}))
        assert dealer.poll(5000)
        assert msgpack.unpackb(dealer.recv())["type"] == "welcome"
        for n in range(sent):  # no waiting: passes of many messages, commits under way
            dealer.send(msgpack.packb({"type": "message", "text": f"m{n} " + "w" * 2000,
                                       "id": f"m{n}"}))
        while dealer.poll(10_000):
            reply = msgpack.unpackb(dealer.recv())
            if reply["type"] == "bye":
                break
            if reply["type"] == "ack":
                acks[reply["id"]] = reply["seq"]
        loop.join(30)
        assert not loop.is_alive(), "the broker went on after its store failed"
        published: dict[int, str] = {}
        while sub.poll(200):  # the loop is gone: what it sent has arrived or never will
            frames = sub.recv_multipart()
            body = msgpack.unpackb(frames[-1])
            for event in body["events"] if body["type"] == "batch" else [body]:
                if event["type"] == "message":
                    published[event["seq"]] = event["text"]
    finally:
        server.stop()
        loop.join(10)
        dealer.close(linger=0)
        sub.close(linger=0)
    assert server.failure is not None and "cannot write history" in server.failure
    assert 0 < len(acks) < sent, "the cap should stop the broker mid-stream"
    stored = {}
    with sqlite3.connect(db) as check:
        # Each row holds a room's events first..last back to back.
        for first, last, bodies in check.execute(
                "SELECT first, last, bodies FROM segments WHERE room = 'lobby'"):
            events = list(msgpack.Unpacker(io.BytesIO(bodies)))
            assert len(events) == last - first + 1
            for seq, event in enumerate(events, first):
                stored[seq] = event.get("text", "")
    for rid, seq in acks.items():
        assert stored.get(seq, "").startswith(rid + " "), f"{rid} acked as {seq}, not stored"
    for seq, text in published.items():
        assert stored.get(seq) == text, f"seq {seq} published, not stored"
