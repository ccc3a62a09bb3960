"""zchat.Client and zchat.AsyncClient against real brokers."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

import zchat
from conftest import RunningBroker, launch_broker, wait_item
from zchat import (
    AsyncClient,
    BrokerUnreachable,
    Client,
    ClientClosed,
    Direct,
    HandshakeFailed,
    Joined,
    Left,
    Message,
    NameTaken,
    NoSuchUser,
    RateLimited,
    Status,
)
from zchat.client import check_endpoint
from zchat.keys import load_client_keys


@pytest.fixture
def clients() -> Iterator[Callable[..., Client]]:
    made: list[Client] = []

    def make(broker: RunningBroker, name: str, **kw: Any) -> Client:
        client = Client(broker.input, name, timeout=10, **kw)
        made.append(client)
        client.connect()
        return client

    yield make
    for client in made:
        client.close()


def messages_until(client: Client, last_text: str, timeout: float = 20) -> list[Message]:
    got: list[Message] = []
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        item = client.next_event(left)
        if isinstance(item, Message):
            got.append(item)
            if item.text == last_text:
                return got
    raise AssertionError(f"never saw {last_text!r}; got {[m.text for m in got]}")


def test_public_api_is_complete() -> None:
    import inspect

    exported = set(zchat.__all__)
    public = {name for name, value in vars(zchat).items()
              if not name.startswith("_") and not inspect.ismodule(value)} - {"annotations"}
    # Everything public at the top level is in __all__, and everything in __all__ exists.
    assert public == exported - {"__version__"}
    assert all(hasattr(zchat, name) for name in exported)


def test_send_receive_dm_who_history(broker: RunningBroker,
                                     clients: Callable[..., Client]) -> None:
    alice = clients(broker, "alice")
    bob = clients(broker, "bob")
    assert wait_item(alice, lambda e: isinstance(e, Joined) and e.name == "bob").addr == "127.0.0.1"
    seq = alice.send("hello bob")
    got = wait_item(bob, lambda e: isinstance(e, Message))
    assert (got.seq, got.sender, got.text) == (seq, "alice", "hello bob")
    bob.dm("alice", "hi alice")
    direct = wait_item(alice, lambda e: isinstance(e, Direct))
    assert (direct.sender, direct.text) == ("bob", "hi alice")
    assert sorted(m.name for m in alice.who()) == ["alice", "bob"]
    assert sorted(alice.members) == ["alice", "bob"]
    history = alice.history(after=0)
    assert [type(e).__name__ for e in history] == ["Joined", "Joined", "Message"]
    with pytest.raises(NoSuchUser):
        bob.dm("nobody", "x")
    assert alice.ping() > 0


def test_name_taken_raises(broker: RunningBroker, clients: Callable[..., Client]) -> None:
    clients(broker, "alice")
    with pytest.raises(NameTaken):
        Client(broker.input, "ALICE", timeout=5).connect()


def test_unreachable_broker_raises() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    client = Client(f"tcp://127.0.0.1:{port}", "alice")
    with pytest.raises(zchat.BrokerUnreachable):
        client.connect(timeout=1)
    with pytest.raises(ClientClosed):
        client.send("x")


def test_rate_limited_raises(start_broker: Callable[..., RunningBroker],
                             clients: Callable[..., Client]) -> None:
    broker = start_broker("--rate", "1", "--burst", "2")
    alice = clients(broker, "alice")
    futures = [alice.send_nowait(f"m{i}") for i in range(5)]
    outcomes = []
    for fut in futures:
        try:
            outcomes.append(fut.result(10))
        except RateLimited:
            outcomes.append("limited")
    assert outcomes.count("limited") >= 2
    assert isinstance(outcomes[0], int)


def test_late_and_slow_joiners_miss_nothing(broker: RunningBroker,
                                            clients: Callable[..., Client]) -> None:
    alice = clients(broker, "alice")
    for i in range(30):
        alice.send_nowait(f"early{i}")
    alice.send("early-done")
    # Bob joins late; his SUB connects after these; his welcome seq is past them.
    bob = clients(broker, "bob")
    # Messages sent right after bob's welcome race his SUB connection (the
    # slow joiner): the library must fill the gap from history.
    for i in range(30):
        alice.send_nowait(f"m{i}")
    alice.send("done")
    got = messages_until(bob, "done")
    assert [m.text for m in got] == [f"m{i}" for i in range(30)] + ["done"]
    seqs = [m.seq for m in got]
    assert seqs == sorted(seqs)


def test_kicked_client_is_closed(broker: RunningBroker, clients: Callable[..., Client]) -> None:
    import subprocess
    import sys

    alice = clients(broker, "alice")
    subprocess.run([sys.executable, "-m", "zchat.broker.admin", "--control", broker.control,
                    "kick", "alice", "spam"], check=True, capture_output=True, timeout=30)
    status = wait_item(alice, lambda e: isinstance(e, Status) and e.state == "closed")
    assert "kicked" in status.detail and "spam" in status.detail
    with pytest.raises(ClientClosed):
        alice.send("still here?")


def test_leave_is_announced_with_reason(broker: RunningBroker,
                                        clients: Callable[..., Client]) -> None:
    alice = clients(broker, "alice")
    bob = clients(broker, "bob")
    bob.leave("lunch")
    left = wait_item(alice, lambda e: isinstance(e, Left))
    assert (left.name, left.reason) == ("bob", "leave")


def test_resume_across_broker_restart_without_loss_or_duplicates(
    start_broker: Callable[..., RunningBroker], clients: Callable[..., Client],
) -> None:
    first = start_broker("--heartbeat", "0.3", "--rate", "0")
    alice = clients(first, "alice")
    bob = clients(first, "bob")
    acked = [alice.send(f"before{i}") for i in range(10)]
    assert len(set(acked)) == 10
    messages_until(bob, "before9")
    # The broker dies without a word; alice keeps typing meanwhile.
    first.stop(sig=9)
    pending = [alice.send_nowait(f"during{i}") for i in range(5)]
    wait_item(alice, lambda e: isinstance(e, Status) and e.state == "disconnected")
    second = launch_broker("--input", first.input, "--broadcast", first.broadcast,
                           "--control", "tcp://127.0.0.1:0", "--heartbeat", "0.3",
                           "--rate", "0")
    try:
        assert all(isinstance(f.result(20), int) for f in pending)
        wait_item(bob, lambda e: isinstance(e, Status) and e.state == "reconnected")
        alice.send("after")
        got = [m.text for m in messages_until(bob, "after")]
        # Nothing acked before the crash comes again; nothing sent during it is lost or doubled.
        assert got == [f"during{i}" for i in range(5)] + ["after"]
        assert alice.connected and bob.connected
    finally:
        second.stop()
        second.release()


def test_sends_queued_while_disconnected_go_out_once(
    start_broker: Callable[..., RunningBroker], clients: Callable[..., Client],
) -> None:
    first = start_broker("--heartbeat", "0.3", "--rate", "0")
    alice = clients(first, "alice")
    first.stop()  # SIGTERM: bye shutdown, the client retries
    wait_item(alice, lambda e: isinstance(e, Status) and e.state == "disconnected")
    futures = [alice.send_nowait(f"q{i}") for i in range(3)]
    second = launch_broker("--input", first.input, "--broadcast", first.broadcast,
                           "--control", "tcp://127.0.0.1:0", "--heartbeat", "0.3")
    try:
        seqs = [f.result(20) for f in futures]
        assert seqs == sorted(seqs)
        texts = [e.text for e in alice.history(0) if isinstance(e, Message)]
        assert texts == ["q0", "q1", "q2"]
    finally:
        second.stop()
        second.release()


def test_async_client(broker: RunningBroker) -> None:
    async def scenario() -> None:
        async with AsyncClient(broker.input, "alice") as alice, \
                AsyncClient(broker.input, "bob") as bob:
            seq = await alice.send("hi from asyncio")
            async for item in bob.events():
                if isinstance(item, Message):
                    assert (item.seq, item.text) == (seq, "hi from asyncio")
                    break
            assert sorted(m.name for m in await bob.who()) == ["alice", "bob"]
            await bob.dm("alice", "psst")
            async for item in alice.events():
                if isinstance(item, Direct):
                    assert item.text == "psst"
                    break
            await bob.leave()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_library_uses_batches_when_the_broker_offers_them(
    start_broker: Callable[..., RunningBroker], clients: Callable[..., Client],
) -> None:
    broker = start_broker("--coalesce", "16", "--rate", "0", "--heartbeat", "0.5")
    alice = clients(broker, "alice")
    bob = clients(broker, "bob")
    for i in range(100):
        alice.send_nowait(f"m{i}")
    alice.send("done")
    got = messages_until(bob, "done")
    assert [m.text for m in got] == [f"m{i}" for i in range(100)] + ["done"]


def test_event_racing_a_new_subscription_arrives_without_waiting_for_a_heartbeat(
    start_broker: Callable[..., RunningBroker], clients: Callable[..., Client],
) -> None:
    # Heartbeats every 60 s cannot help within this test: only the library's
    # early ping (pong carries seq) can reveal the event bob's SUB missed.
    broker = start_broker("--heartbeat", "60", "--rate", "0")
    alice = clients(broker, "alice")
    for attempt in range(5):
        bob = clients(broker, f"bob{attempt}")
        alice.send(f"right after bob{attempt} joined")  # likely before bob's SUB is up
        got = wait_item(bob, lambda e: isinstance(e, Message), timeout=10)
        assert got.text == f"right after bob{attempt} joined"
        bob.close()


def test_leave_is_taken_before_the_program_exits(broker: RunningBroker,
                                                 clients: Callable[..., Client]) -> None:
    import subprocess
    import sys
    import textwrap

    watcher = clients(broker, "watcher")
    script = textwrap.dedent(f"""
        import os
        from zchat import Client
        client = Client({broker.input!r}, "brief")
        client.connect()
        client.leave("off I go")
        os._exit(0)  # no interpreter clean-up that could flush for us
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=30)
    left = wait_item(watcher, lambda e: isinstance(e, Left) and e.name == "brief")
    assert (left.reason, left.detail) == ("leave", "off I go")


def test_events_older_than_the_kept_history_are_reported_missed(
    start_broker: Callable[..., RunningBroker], clients: Callable[..., Client],
) -> None:
    broker = start_broker("--history", "5", "--rate", "0")
    alice = clients(broker, "alice")
    for i in range(20):
        alice.send(f"m{i}")
    # A client resuming from seq 0 finds only the last 5 events kept.
    late = clients(broker, "late", since=0)
    missed = wait_item(late, lambda e: isinstance(e, Status) and e.state == "missed")
    first = wait_item(late, lambda e: isinstance(e, Message))
    assert missed.count == first.seq - 1
    assert missed.count > 0


# ------------------------------------------- endpoints, handshakes, liveness


@pytest.mark.parametrize("endpoint", [
    "localhost:46101", "tcp://127.0.0.1", "tcp://*:46101", "udp://127.0.0.1:46101", "",
    "tcp://:46101", "tcp://127.0.0.1:0", "tcp://127.0.0.1:99999", "tcp://127.0.0.1:x1",
    "ipc://",
])
def test_a_bad_endpoint_is_refused_before_any_socket(endpoint: str) -> None:
    with pytest.raises(ValueError) as caught:
        Client(endpoint, "zz")
    assert str(caught.value) == f"bad endpoint {endpoint!r}: expected tcp://HOST:PORT"


@pytest.mark.parametrize("endpoint", [
    "tcp://127.0.0.1:5555", "tcp://localhost:1", "tcp://[::1]:5555", "tcp://chat.example.org:80",
    "ipc:///run/zchat/input",  # a broker on this machine
])
def test_good_endpoints_pass(endpoint: str) -> None:
    check_endpoint(endpoint)


def test_an_unresolvable_host_is_said_at_once() -> None:
    started = time.monotonic()
    with pytest.raises(BrokerUnreachable, match=r"cannot resolve host 'nohost\.invalid'"):
        Client("tcp://nohost.invalid:5555", "zz", timeout=10).connect()
    assert time.monotonic() - started < 5


@pytest.fixture
def key_dir(tmp_path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "zchat.broker.keygen", "--dir", str(tmp_path),
                    "broker", "other", "alice"], capture_output=True, timeout=30, check=True)
    (tmp_path / "authorized").mkdir()
    shutil.copy(tmp_path / "alice.key", tmp_path / "authorized")
    return tmp_path


def test_a_wrong_server_key_is_a_failed_handshake_not_unreachable(
        start_broker: Callable[..., RunningBroker], key_dir: Path) -> None:
    broker = start_broker("--secret-key", str(key_dir / "broker.key_secret"),
                          "--authorized-keys", str(key_dir / "authorized"))
    wrong = load_client_keys(key_dir / "other.key", key_dir / "alice.key_secret")
    started = time.monotonic()
    with pytest.raises(HandshakeFailed, match="handshake failed: wrong server key"):
        Client(broker.input, "alice", timeout=10, keys=wrong).connect()
    assert time.monotonic() - started < 5
    with pytest.raises(HandshakeFailed, match="--server-key and --key"):
        Client(broker.input, "alice", timeout=10).connect()
    right = load_client_keys(key_dir / "broker.key", key_dir / "alice.key_secret")
    with Client(broker.input, "alice", timeout=10, keys=right) as alice:
        assert alice.welcome is not None


def test_routing_ids_are_our_own_and_unguessable(ctx: zmq.Context[Any]) -> None:
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    ids = []
    for name in ("one", "two"):
        client = Client(f"tcp://127.0.0.1:{port}", name, timeout=0.2)
        with pytest.raises(BrokerUnreachable):
            client.connect()  # nobody answers: the join frame is all we need
        assert router.poll(5000)
        ids.append(router.recv_multipart()[0])
    assert all(len(rid) == 16 and rid[0] != 0 for rid in ids)
    assert ids[0] != ids[1]


def test_a_dead_broker_is_noticed_at_once(start_broker: Callable[..., RunningBroker],
                                          clients: Callable[..., Client]) -> None:
    broker = start_broker("--heartbeat", "5")  # 3 silent intervals would be 15 s
    client = clients(broker, "watcher")
    broker.stop(signal.SIGKILL)
    started = time.monotonic()
    wait_item(client, lambda i: isinstance(i, Status) and i.state == "disconnected",
              timeout=5)
    assert time.monotonic() - started < 2


def test_a_frozen_broker_is_noticed_within_seconds(start_broker: Callable[..., RunningBroker],
                                                   clients: Callable[..., Client]) -> None:
    broker = start_broker("--heartbeat", "5")  # 3 silent intervals would be 15 s
    client = clients(broker, "watcher")
    broker.proc.send_signal(signal.SIGSTOP)  # a host that vanished: nothing closes
    try:
        started = time.monotonic()
        wait_item(client, lambda i: isinstance(i, Status) and i.state == "disconnected",
                  timeout=10)
        assert time.monotonic() - started < 6
    finally:
        broker.proc.send_signal(signal.SIGCONT)


def test_connect_that_does_not_give_up_waits_for_a_broker_that_comes_later(
        start_broker: Callable[..., RunningBroker]) -> None:
    import socket

    with socket.socket() as probe:  # a free port for the broker that is not there yet
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"tcp://127.0.0.1:{port}"
    client = Client(endpoint, "patient")
    try:
        with pytest.raises(BrokerUnreachable):
            client.connect(timeout=0.5, give_up=False)
        start_broker("--input", endpoint)
        # The same client, still trying: no loop of our own, no new Client.
        welcome = client.connect(timeout=15, give_up=False)
        assert welcome.name == "patient"
        assert client.send("made it") > 0
    finally:
        client.close()


def test_async_client_resumes_across_a_broker_restart(
        start_broker: Callable[..., RunningBroker]) -> None:
    first = start_broker("--heartbeat", "0.3", "--rate", "0")
    second: list[RunningBroker] = []

    async def until(chat: AsyncClient, wanted: Callable[[Any], bool]) -> Any:
        async for item in chat.events():
            if wanted(item):
                return item
        raise AssertionError("closed before it came")

    async def scenario() -> None:
        async with AsyncClient(first.input, "alice") as alice, \
                AsyncClient(first.input, "bob") as bob:
            await alice.send("before")
            seen = await until(bob, lambda e: isinstance(e, Message))
            assert seen.text == "before"
            first.stop(sig=9)
            pending = [asyncio.ensure_future(alice.send(f"during{i}")) for i in range(3)]
            await until(alice, lambda e: isinstance(e, Status) and e.state == "disconnected")
            second.append(launch_broker(
                "--input", first.input, "--broadcast", first.broadcast,
                "--control", "tcp://127.0.0.1:0", "--heartbeat", "0.3", "--rate", "0"))
            assert all(isinstance(seq, int) for seq in await asyncio.gather(*pending))
            await alice.send("after")
            got = []
            while not got or got[-1] != "after":
                item = await until(bob, lambda e: isinstance(e, Message))
                got.append(item.text)
            # Nothing acked before the crash comes again; nothing sent during it is lost
            # or doubled.
            assert got == ["during0", "during1", "during2", "after"]
            assert alice.connected and bob.connected

    try:
        asyncio.run(asyncio.wait_for(scenario(), 40))
    finally:
        for broker in second:
            broker.stop()
            broker.release()


def test_an_async_client_abandoned_at_loop_end_cleans_up_quietly(
        caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import socket

    with socket.socket() as probe:  # nothing listens here
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def scenario() -> None:
        chat = AsyncClient(f"tcp://127.0.0.1:{port}", "abandoned")
        with pytest.raises(BrokerUnreachable):
            await chat.connect(timeout=0.3, give_up=False)
        # Still trying when asyncio.run() cancels its task.

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio.run(scenario())
    assert not caplog.records, [r.getMessage() for r in caplog.records]
