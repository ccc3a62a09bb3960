"""The rooms API of zchat.Client and zchat.AsyncClient against real brokers."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from conftest import RunningBroker, launch_broker, wait_item
from zchat import (
    AsyncClient,
    Client,
    Entered,
    ErrorCode,
    Invited,
    Joined,
    Joins,
    Left,
    Message,
    ModeChanged,
    RequestFailed,
    RoomInfo,
    Status,
    TopicChanged,
)


@pytest.fixture
def clients() -> Iterator[Callable[..., Client]]:
    made: list[Client] = []

    def make(broker: RunningBroker | str, name: str, **kw: Any) -> Client:
        endpoint = broker if isinstance(broker, str) else broker.input
        client = Client(endpoint, name, timeout=10, **kw)
        made.append(client)
        client.connect()
        return client

    yield make
    for client in made:
        client.close()


def texts_until(client: Client, room: str, last: str, timeout: float = 20) -> list[Message]:
    """``room``'s messages up to the one saying ``last``; asserts each room's seqs rise."""
    got: list[Message] = []
    seen: dict[str, int] = {}
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        item = client.next_event(left)
        if isinstance(item, Message | Left | TopicChanged | ModeChanged):
            assert item.seq > seen.get(item.room, 0), (item, seen)
            seen[item.room] = item.seq
        if isinstance(item, Message) and item.room == room:
            got.append(item)
            if item.text == last:
                return got
    raise AssertionError(f"never saw {last!r} in {room}; got {[m.text for m in got]}")


def texts_in_rooms(client: Client, lasts: dict[str, str],
                   timeout: float = 20) -> dict[str, list[str]]:
    """Each room's message texts up to the one saying ``lasts[room]``.

    Rooms have no order between them: each is read until its own last.
    """
    seen: dict[str, list[str]] = {room: [] for room in lasts}
    seqs: dict[str, int] = {}
    deadline = time.monotonic() + timeout
    while any(seen[room][-1:] != [last] for room, last in lasts.items()):
        item = client.next_event(max(0.0, deadline - time.monotonic()))
        assert item is not None, seen
        if isinstance(item, Message) and item.room in seen:
            assert item.seq > seqs.get(item.room, 0), (item, seqs)  # no duplicate
            seqs[item.room] = item.seq
            seen[item.room].append(item.text)
    return seen


def until(client: Client, match: Callable[[Any], bool], timeout: float = 10) -> Any:
    return wait_item(client, match, timeout)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


# ------------------------------------------------------------------ the API


def test_two_clients_in_two_rooms(broker: RunningBroker,
                                  clients: Callable[..., Client]) -> None:
    alice = clients(broker, "alice", rooms=("lobby", "dev"))
    assert alice.entered_rooms == ("lobby", "dev")
    assert alice.welcome is not None and alice.welcome.rooms == ("lobby", "dev")
    bob = clients(broker, "bob", rooms=("#Dev",))  # shown as #Dev: still dev
    assert bob.entered_rooms == ("dev",)
    entered = bob.enter("ops")
    assert isinstance(entered, Entered)
    assert (entered.room, entered.ops, entered.private) == ("ops", ["bob"], False)
    assert bob.entered_rooms == ("dev", "ops")
    alice.enter("ops")
    seq = bob.send("to dev", room="dev")
    bob.send("to ops", room="ops")
    got = texts_until(alice, "ops", "to ops")
    assert [m.text for m in got] == ["to ops"]
    assert alice.room_state("dev") is not None
    history = alice.history(0, room="dev")
    assert [e.text for e in history if isinstance(e, Message)] == ["to dev"]
    assert [e.seq for e in history if isinstance(e, Message)] == [seq]
    assert {m.name for m in alice.who("ops")} == {"alice", "bob"}
    assert [m.name for m in bob.who()] == ["alice"]  # lobby: bob is not in it
    state = alice.room_state("#OPS")
    assert state is not None
    assert (state.count, state.ops, {m.name for m in state.members}) == (
        2, ("bob",), {"alice", "bob"})
    names = {info.name for info in bob.rooms()}
    assert {"lobby", "dev", "ops"} <= names
    bob.part("dev", "enough")
    assert bob.entered_rooms == ("ops",)
    left = until(alice, lambda e: isinstance(e, Left) and e.room == "dev")
    assert (left.name, left.reason, left.detail) == ("bob", "part", "enough")
    with pytest.raises(RequestFailed) as caught:
        bob.send("no longer in it", room="dev")
    assert caught.value.code == ErrorCode.NOT_IN_ROOM


def test_a_private_room_is_invisible_to_a_third(broker: RunningBroker,
                                                clients: Callable[..., Client]) -> None:
    alice = clients(broker, "alice")
    bob = clients(broker, "bob")
    carol = clients(broker, "carol")
    assert alice.enter("secret", private=True).private
    with pytest.raises(RequestFailed) as caught:
        bob.enter("secret")
    assert caught.value.code == ErrorCode.FORBIDDEN
    alice.invite("secret", "bob")
    invited = until(bob, lambda e: isinstance(e, Invited))
    assert (invited.room, invited.from_) == ("secret", "alice")
    bob.enter("secret")
    alice.topic("secret", "plans")
    alice.send("psst", room="secret")
    got = texts_until(bob, "secret", "psst")
    assert [m.text for m in got] == ["psst"]
    state = bob.room_state("secret")
    assert state is not None and (state.topic, state.private) == ("plans", True)
    assert "secret" not in {info.name for info in carol.rooms()}
    assert any(info == RoomInfo("secret", "plans", 2, True) for info in bob.rooms())
    # Carol saw nothing of it, up to a message in lobby said after it all.
    alice.send("in the open")
    heard: list[Any] = []
    while not (heard and isinstance(heard[-1], Message) and heard[-1].text == "in the open"):
        heard.append(until(carol, lambda e: True))
    assert [i for i in heard if getattr(i, "room", "") == "secret"] == []
    with pytest.raises(RequestFailed) as caught:
        carol.history(0, room="secret")
    assert caught.value.code == ErrorCode.NOT_IN_ROOM
    # A kick in a private room reaches the kicked one on its DEALER.
    alice.kick("secret", "bob")
    left = until(bob, lambda e: isinstance(e, Left) and e.room == "secret")
    assert (left.name, left.reason, left.by) == ("bob", "kicked", "alice")
    assert bob.entered_rooms == ("lobby",)


def test_topic_mode_kick_ban_through_the_library(broker: RunningBroker,
                                                 clients: Callable[..., Client]) -> None:
    alice = clients(broker, "alice", rooms=("dev",))  # its creator: an operator
    bob = clients(broker, "bob", rooms=("dev",))
    alice.topic("dev", "release on friday")
    changed = until(bob, lambda e: isinstance(e, TopicChanged))
    assert (changed.room, changed.name, changed.text) == ("dev", "alice", "release on friday")
    alice.mode("dev", moderated=True)
    mode = until(bob, lambda e: isinstance(e, ModeChanged))
    assert (mode.name, mode.moderated, mode.private) == ("alice", True, None)
    with pytest.raises(RequestFailed) as caught:
        bob.send("may I?", room="dev")
    assert caught.value.code == ErrorCode.FORBIDDEN
    alice.op("dev", "bob")
    until(bob, lambda e: isinstance(e, ModeChanged) and e.op == "bob")
    state = bob.room_state("dev")
    assert state is not None and set(state.ops) == {"alice", "bob"} and state.moderated
    bob.send("now I may", room="dev")
    alice.deop("dev", "bob")
    alice.kick("dev", "bob", "flood")
    left = until(bob, lambda e: isinstance(e, Left) and e.name == "bob")
    assert (left.room, left.reason, left.by, left.detail) == ("dev", "kicked", "alice", "flood")
    assert bob.entered_rooms == ()
    assert bob.room_state("dev") is None
    bob.enter("dev")  # a kick is not a ban
    alice.ban("dev", "bob")
    left = until(bob, lambda e: isinstance(e, Left) and e.reason == "banned")
    assert bob.entered_rooms == ()
    with pytest.raises(RequestFailed) as caught:
        bob.enter("dev")
    assert caught.value.code == ErrorCode.FORBIDDEN
    alice.unban("dev", "bob")
    entered = bob.enter("dev")
    assert bob.entered_rooms == ("dev",)
    # bob's answer can come before alice's SUB has his `joined` (its seq is
    # the answer's): alice's view of the room counts him once she has it.
    until(alice, lambda e: isinstance(e, Joined) and e.name == "bob" and e.seq == entered.seq)
    state = alice.room_state("dev")
    assert state is not None and state.topic == "release on friday" and state.count == 2


def test_a_room_entered_with_the_join_misses_nothing_said_around_it(
        broker: RunningBroker, clients: Callable[..., Client]) -> None:
    bob = clients(broker, "bob", rooms=("dev",))
    for i in range(40):
        bob.send_nowait(f"early{i}", room="dev")  # racing alice's join
    alice = clients(broker, "alice", rooms=("lobby", "dev"))
    for i in range(40):
        bob.send_nowait(f"m{i}", room="dev")
    bob.send("done", room="dev")
    got = [m.text for m in texts_until(alice, "dev", "done")]
    history = bob.history(0, room="dev", limit=1000)
    came = max(i for i, e in enumerate(history) if getattr(e, "name", "") == "alice")
    # Every message after alice's own joined, none before it, once each.
    assert got == [e.text for e in history[came:] if isinstance(e, Message)]


def test_the_contracts_argument_order_works_too(broker: RunningBroker) -> None:
    with Client("bob", broker.input, timeout=10) as bob:
        assert bob.name == "bob" and bob.entered_rooms == ("lobby",)


def test_async_client_rooms(broker: RunningBroker) -> None:
    async def scenario() -> None:
        async with AsyncClient(broker.input, "alice", rooms=("dev",)) as alice, \
                AsyncClient(broker.input, "bob", rooms=()) as bob:
            assert bob.entered_rooms == ()
            entered = await bob.enter("dev")
            assert entered.count == 2
            await alice.topic("dev", "async")
            seq = await alice.send("hi dev", room="dev")
            async for item in bob.events():
                if isinstance(item, Message):
                    assert (item.room, item.seq, item.text) == ("dev", seq, "hi dev")
                    break
            assert {m.name for m in await bob.who("dev")} == {"alice", "bob"}
            assert [r.name for r in await bob.rooms() if r.name == "dev"] == ["dev"]
            state = bob.room_state("dev")
            assert state is not None and state.topic == "async"
            await bob.part("dev")
            assert bob.entered_rooms == ()

    asyncio.run(asyncio.wait_for(scenario(), 30))


# ------------------------------------------------------------------ resuming


@pytest.mark.slow
def test_a_killed_broker_restarted_fills_every_rooms_gap_once(
        tmp_path: Path, clients: Callable[..., Client]) -> None:
    db = str(tmp_path / "rooms.db")
    args = ("--heartbeat", "0.3", "--rate", "0", "--db", db)
    first = launch_broker(*args)
    second: RunningBroker | None = None
    try:
        alice = clients(first, "alice", rooms=("lobby", "dev", "ops"))
        bob = clients(first, "bob", rooms=("lobby", "dev", "ops"))
        for room in ("lobby", "dev", "ops"):
            alice.send(f"before {room}", room=room)
        texts_in_rooms(bob, {room: f"before {room}" for room in ("lobby", "dev", "ops")})
        first.stop(sig=9)
        pending = [alice.send_nowait(f"during {room} {i}", room=room)
                   for room in ("lobby", "dev", "ops") for i in range(3)]
        until(bob, lambda e: isinstance(e, Status) and e.state == "disconnected")
        second = launch_broker("--input", first.input, "--broadcast", first.broadcast,
                               "--control", "tcp://127.0.0.1:0", *args)
        assert all(isinstance(f.result(20), int) for f in pending)
        for room in ("lobby", "dev", "ops"):
            alice.send(f"after {room}", room=room)
        seen = texts_in_rooms(bob, {room: f"after {room}" for room in ("lobby", "dev", "ops")})
        for room in seen:
            # Nothing acked before the crash comes again; nothing sent during it
            # is lost or doubled, in every room.
            assert seen[room] == [f"during {room} {i}" for i in range(3)] + [f"after {room}"]
        assert bob.entered_rooms == ("lobby", "dev", "ops")
    finally:
        first.release()
        if second is not None:
            second.stop()
            second.release()


@pytest.mark.slow
def test_fail_over_to_the_next_endpoint_loses_and_doubles_nothing(
        tmp_path: Path, clients: Callable[..., Client]) -> None:
    # No relay yet: "the other broker" is the same durable history served
    # from another port, which only the endpoint list names.
    db = str(tmp_path / "rooms.db")
    args = ("--heartbeat", "0.3", "--rate", "0", "--db", db, "--control", "tcp://127.0.0.1:0",
            "--broadcast", "tcp://127.0.0.1:0")
    one, two = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    first = launch_broker("--input", one, *args)
    second: RunningBroker | None = None
    try:
        alice = clients(f"{one},{two}", "alice", rooms=("lobby", "dev"))
        bob = clients(f"{one}, {two}", "bob", rooms=("dev", "lobby"))
        for room in ("lobby", "dev"):
            alice.send(f"before {room}", room=room)
        texts_in_rooms(bob, {room: f"before {room}" for room in ("lobby", "dev")})
        first.stop(sig=9)
        pending = [alice.send_nowait(f"during {room} {i}", room=room)
                   for room in ("lobby", "dev") for i in range(3)]
        until(bob, lambda e: isinstance(e, Status) and e.state == "disconnected")
        second = launch_broker("--input", two, *args)
        assert all(isinstance(f.result(20), int) for f in pending)
        until(bob, lambda e: isinstance(e, Status) and e.state == "reconnected")
        assert bob.welcome is not None and bob.welcome.pub == second.broadcast
        for room in ("lobby", "dev"):
            alice.send(f"after {room}", room=room)
        seen = texts_in_rooms(bob, {room: f"after {room}" for room in ("lobby", "dev")})
        for room, texts in seen.items():
            assert texts == [f"during {room} {i}" for i in range(3)] + [f"after {room}"]
        assert bob.entered_rooms == ("dev", "lobby") and alice.connected
    finally:
        first.release()
        if second is not None:
            second.stop()
            second.release()


@pytest.mark.slow
def test_a_private_room_forgotten_by_a_restart_is_said_refused(
        tmp_path: Path, clients: Callable[..., Client]) -> None:
    # Memberships and invitations do not survive a restart: a private room
    # cannot be entered again, and the library says so instead of hanging on.
    args = ("--heartbeat", "0.3", "--rate", "0", "--db", str(tmp_path / "rooms.db"))
    first = launch_broker(*args)
    second: RunningBroker | None = None
    try:
        alice = clients(first, "alice", rooms=("lobby", "dev"))
        alice.enter("secret", private=True)
        assert alice.entered_rooms == ("lobby", "dev", "secret")
        first.stop(sig=9)
        second = launch_broker("--input", first.input, "--broadcast", first.broadcast,
                               "--control", "tcp://127.0.0.1:0", *args)
        refused = until(alice, lambda e: isinstance(e, Status) and e.state == "refused")
        assert refused.room == "secret" and "forbidden" in refused.detail
        until(alice, lambda e: isinstance(e, Status) and e.state == "reconnected")
        assert alice.entered_rooms == ("lobby", "dev")
        assert alice.room_state("secret") is None
        alice.send("still here", room="dev")
    finally:
        first.release()
        if second is not None:
            second.stop()
            second.release()


@pytest.mark.slow
def test_async_client_fails_over_with_its_rooms(tmp_path: Path) -> None:
    args = ("--heartbeat", "0.3", "--rate", "0", "--db", str(tmp_path / "rooms.db"),
            "--control", "tcp://127.0.0.1:0", "--broadcast", "tcp://127.0.0.1:0")
    one, two = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    brokers = [launch_broker("--input", one, *args)]

    async def next_item(chat: AsyncClient, wanted: Callable[[Any], bool]) -> Any:
        async for item in chat.events():
            if wanted(item):
                return item
        raise AssertionError("closed before it came")

    async def scenario() -> None:
        async with AsyncClient(f"{one},{two}", "alice", rooms=("dev",)) as alice, \
                AsyncClient(f"{one},{two}", "bob", rooms=("dev",)) as bob:
            await alice.send("before", room="dev")
            await next_item(bob, lambda e: isinstance(e, Message))
            brokers[0].stop(sig=9)
            pending = asyncio.ensure_future(alice.send("during", room="dev"))
            await next_item(bob, lambda e: isinstance(e, Status) and e.state == "disconnected")
            brokers.append(launch_broker("--input", two, *args))
            await pending
            await alice.send("after", room="dev")
            got: list[str] = []
            while got[-1:] != ["after"]:
                item = await next_item(bob, lambda e: isinstance(e, Message) and e.room == "dev")
                got.append(item.text)
            assert got == ["during", "after"]  # once each, nothing lost in the move
            assert bob.entered_rooms == ("dev",) and bob.endpoint == f"{one},{two}"

    try:
        asyncio.run(asyncio.wait_for(scenario(), 40))
    finally:
        for broker in brokers:
            broker.release()


STORM = 20  # joiners at once: several land in one pass of the broker's loop


def dealers_ready(ctx: zmq.Context[Any], broker: RunningBroker,
                  count: int) -> list[zmq.Socket[Any]]:
    """``count`` raw DEALERs, each connected (its ping answered) before any joins."""
    made = []
    for _ in range(count):
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(broker.input)
        dealer.send(msgpack.packb({"type": "ping", "id": "p"}))
        made.append(dealer)
    for dealer in made:
        assert dealer.poll(10_000), "no pong"
        assert msgpack.unpackb(dealer.recv())["type"] == "pong"
    return made


def test_a_join_storm_reaches_a_member_whole_and_in_seq_order(
        start_broker: Callable[..., RunningBroker], ctx: zmq.Context[Any],
        clients: Callable[..., Client]) -> None:
    """Joins coalesced into `joins` events name everyone once, in seq order.

    Every room coalesces here (--coalesce-joins-above 0). The broker is
    stopped while the joins are sent, so that when it runs again they wait
    in its input together and one pass of its loop reads several of them:
    the first is a `joined`, the others of that pass one `joins`.
    """
    broker = start_broker("--coalesce-joins-above", "0", "--join-rate", "0",
                          "--heartbeat", "5")
    alice = clients(broker, "alice")
    base = alice.enter("big").seq
    names = [f"user{n:02}" for n in range(STORM)]
    dealers = dealers_ready(ctx, broker, STORM)
    broker.proc.send_signal(signal.SIGSTOP)
    try:
        for dealer, name in zip(dealers, names, strict=True):
            dealer.send(msgpack.packb({"type": "join", "name": name, "rooms": ["big"]}))
    finally:
        broker.proc.send_signal(signal.SIGCONT)
    for dealer in dealers:
        assert dealer.poll(10_000), "no welcome"
        assert msgpack.unpackb(dealer.recv())["type"] == "welcome"
    seqs: list[int] = []
    arrived: list[str] = []
    kinds: list[str] = []
    deadline = time.monotonic() + 20
    while sorted(arrived) != names:
        item = alice.next_event(max(0.0, deadline - time.monotonic()))
        assert item is not None, f"only {sorted(arrived)} arrived"
        if isinstance(item, Joined | Joins) and item.room == "big":
            seqs.append(item.seq)
            kinds.append(type(item).__name__)
            if isinstance(item, Joins):
                arrived += [member.name for member in item.members]
            else:
                arrived.append(item.name)
    # Each name once, the events one after another from where alice came in.
    assert seqs == list(range(base + 1, base + 1 + len(seqs))), seqs
    assert "Joins" in kinds, kinds  # else this storm tested nothing new
    assert len(seqs) < STORM  # fewer events than joins: that is the point
    state = alice.room_state("big")
    assert state is not None and state.last_seq == seqs[-1]
    assert state.count == STORM + 1
    assert sorted(m.name for m in state.members) == sorted([*names, "alice"])
    # History holds the same events, as any client filling a gap reads them.
    page = alice.history(base, room="big")
    assert [e.seq for e in page] == seqs
    assert [type(e).__name__ for e in page] == kinds
