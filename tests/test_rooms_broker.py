"""Rooms (protocol v2) against a real broker, with raw DEALER/SUB clients only."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import zmq

from conftest import RawClient, RunningBroker

Raw = Callable[[], RawClient]

PING_EVERY = 0.2  # seconds: well within the fixture broker's 0.5 s heartbeat


def admin(broker: RunningBroker, *args: str,
          members: tuple[RawClient, ...] = ()) -> subprocess.CompletedProcess[str]:
    """Run ``zchat-admin``; ``members`` keep pinging while it runs.

    A member silent for 3 heartbeats (1.5 s with the fixture's 0.5 s) is
    dropped, and starting a Python on a busy machine can take that long: a
    raw client that waits on the tool without pinging, as the protocol asks
    of every client, would be gone (announced ``left`` ``timeout``) before
    the operator's command reaches it.
    """
    argv = [sys.executable, "-m", "zchat.broker.admin", "--control", broker.control,
            "--timeout", "10", *args]
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        deadline = time.monotonic() + 30
        while True:
            for member in members:
                member.send({"type": "ping"})  # its pong is skipped by request()
            try:
                out, err = proc.communicate(timeout=PING_EVERY)
                break
            except subprocess.TimeoutExpired:
                if time.monotonic() > deadline:
                    proc.kill()
                    raise
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def entered(client: RawClient, room: str, **fields: Any) -> dict[str, Any]:
    reply = client.request({"type": "enter", "room": room, "id": f"e-{room}", **fields})
    assert reply["type"] == "entered", reply
    return reply


def dealer_event(client: RawClient, match: Callable[[dict[str, Any]], bool],
                 timeout: float = 5.0) -> dict[str, Any]:
    """The next map on the DEALER that ``match``es (private rooms' events come there)."""
    while True:
        body = client.recv(timeout)
        if match(body):
            return body


def test_two_rooms_each_on_its_own_topic(raw: Raw) -> None:
    alice, bob, carol = raw(), raw(), raw()
    alice.join("alice")
    bob.join("bob", keep_alive=[alice])
    carol.subscribe(b"lobby\x00")
    welcome = carol.request({"type": "join", "name": "carol", "rooms": ["lobby", "Dev"]})
    assert welcome["rooms"] == ["lobby", "dev"] and welcome["room"] == "lobby"
    assert entered(bob, "DEV")["members"][0]["name"] == "carol"
    ack = bob.request({"type": "message", "text": "in dev", "room": "dev", "id": "m1"})
    assert (ack["type"], ack["room"], ack["id"]) == ("ack", "dev", "m1")
    message = alice.wait_event(lambda e: e.get("text") == "in dev")
    assert (message["room"], message["seq"]) == ("dev", ack["seq"])
    # Carol's SUB only took lobby's topic: a lobby message comes, dev's did not.
    bob.request({"type": "message", "text": "in lobby", "id": "m2"})
    topic, body = carol.next_event()
    while body.get("type") == "joined":
        topic, body = carol.next_event()
    assert (topic, body["text"]) == (b"lobby\x00", "in lobby")
    page = carol.request({"type": "history", "room": "dev", "after": 0, "id": "h"})
    assert page["room"] == "dev"
    assert [e["text"] for e in page["events"] if e["type"] == "message"] == ["in dev"]
    pong = bob.request({"type": "ping", "id": "p"})
    assert pong["seqs"] == {"lobby": pong["seq"], "dev": ack["seq"]}
    err = alice.request({"type": "message", "room": "dev", "text": "x", "id": "n"})
    assert (err["code"], err["room"]) == ("not_in_room", "dev")


def test_private_room_is_invisible_to_a_third(raw: Raw) -> None:
    alice, bob, eve = raw(), raw(), raw()
    alice.join("alice")
    bob.join("bob", keep_alive=[alice])
    eve.join("eve", keep_alive=[alice, bob])  # her SUB takes every topic
    entered(alice, "secret", private=True)
    assert bob.request({"type": "enter", "room": "secret", "id": "x"})["code"] == "forbidden"
    alice.request({"type": "invite", "room": "secret", "name": "bob", "id": "i"})
    invited = dealer_event(bob, lambda b: b["type"] == "invited")
    assert invited == {"type": "invited", "room": "secret", "from": "alice"}
    assert entered(bob, "secret")["count"] == 2
    alice.request({"type": "message", "room": "secret", "text": "psst", "id": "s"})
    heard = dealer_event(bob, lambda b: b.get("text") == "psst")
    assert (heard["type"], heard["room"]) == ("message", "secret")
    alice.request({"type": "topic", "room": "secret", "text": "hush", "id": "t"})
    alice.request({"type": "kick", "room": "secret", "name": "bob", "id": "k"})
    left = dealer_event(bob, lambda b: b.get("type") == "left")
    assert (left["reason"], left["by"]) == ("kicked", "alice")
    for body in ({"type": "history", "room": "secret", "after": 0},
                 {"type": "who", "room": "secret"},
                 {"type": "message", "room": "secret", "text": "x"}):
        reply = eve.request({**body, "id": "q"})
        assert (reply["code"], reply["room"]) == ("not_in_room", "secret")
    rooms = eve.request({"type": "rooms", "id": "r"})["rooms"]
    assert [r["name"] for r in rooms] == ["lobby"]
    # A marker in lobby, then the heartbeat after it: every frame Eve's SUB
    # got until then, heartbeats included, is free of the private room.
    alice.request({"type": "message", "text": "marker", "id": "mk"})
    frames: list[bytes] = []
    seen_marker = False
    while True:
        topic, body = eve.next_event()
        frames.append(topic + msgpack.packb(body))
        seen_marker = seen_marker or body.get("text") == "marker"
        if seen_marker and body["type"] == "heartbeat":
            break
    assert not any(b"secret" in frame for frame in frames)


def test_operators_topic_mode_ban_and_who_paging(raw: Raw) -> None:
    alice, bob, carol = raw(), raw(), raw()
    for client, name in ((alice, "alice"), (bob, "bob"), (carol, "carol")):
        client.join(name)
        entered(client, "dev")
    reply = bob.request({"type": "topic", "room": "dev", "text": "mine", "id": "t"})
    assert (reply["code"], reply["room"]) == ("forbidden", "dev")
    assert alice.request({"type": "op", "room": "dev", "name": "bob", "id": "o"})["type"] == "ack"
    mode = carol.wait_event(lambda e: e["type"] == "mode")
    assert (mode["name"], mode["op"]) == ("alice", "bob")
    bob.request({"type": "mode", "room": "dev", "moderated": True, "id": "m"})
    assert carol.wait_event(lambda e: e["type"] == "mode")["moderated"] is True
    reply = carol.request({"type": "message", "room": "dev", "text": "x", "id": "c"})
    assert reply["code"] == "forbidden"
    bob.request({"type": "ban", "room": "dev", "name": "carol", "id": "b"})
    left = alice.wait_event(lambda e: e["type"] == "left")
    assert (left["name"], left["reason"], left["by"]) == ("carol", "banned", "bob")
    assert carol.request({"type": "enter", "room": "dev", "id": "e"})["code"] == "forbidden"
    names: list[str] = []
    after = None
    while True:
        page = alice.request({"type": "who", "room": "dev", "limit": 1, "id": "w",
                              **({"after": after} if after else {})})
        assert page["count"] == 2
        names += [m["name"] for m in page["members"]]
        if "next" not in page:
            break
        after = page["next"]
    assert names == ["alice", "bob"]


def test_v1_client_sees_lobby_only_as_before(raw: Raw) -> None:
    old, new = raw(), raw()
    # A version 1 client subscribes to lobby's topic, as PROTOCOL.md v1 says.
    old.subscribe(b"lobby\x00")
    welcome = old.request({"type": "join", "name": "old"})
    assert (welcome["room"], welcome["count"]) == ("lobby", 1)
    new.join("new")
    entered(new, "dev")
    new.request({"type": "message", "room": "dev", "text": "elsewhere", "id": "1"})
    new.request({"type": "message", "text": "here", "id": "2"})
    event = old.wait_event(lambda e: e["type"] == "message")
    assert (event["room"], event["text"]) == ("lobby", "here")  # dev's went to dev's topic
    members = old.request({"type": "who", "id": "w"})
    assert sorted(m["name"] for m in members["members"]) == ["new", "old"]


def test_admin_rooms_who_op_close(raw: Raw, broker: RunningBroker) -> None:
    alice, bob = raw(), raw()
    alice.join("alice")
    bob.join("bob", keep_alive=[alice])
    entered(alice, "dev")
    entered(bob, "dev")
    alice.request({"type": "part", "room": "dev", "id": "p"})  # dev has no operator now
    # Bob pings while each command runs: a member silent for 3 heartbeats
    # would have timed out of dev before `close` (see admin()).
    listing = admin(broker, "rooms", members=(bob,))
    assert listing.returncode == 0 and "#dev" in listing.stdout, listing
    assert admin(broker, "op", "#dev", "bob", members=(bob,)).returncode == 0
    mode = bob.wait_event(lambda e: e["type"] == "mode")
    assert (mode["op"], mode["name"]) == ("bob", "*")
    who = json.loads(admin(broker, "--json", "who", "dev", members=(bob,)).stdout)
    assert who["members"] == [{"name": "bob", "addr": "127.0.0.1", "op": True}]
    assert admin(broker, "close", "dev", "too", "noisy", members=(bob,)).returncode == 0
    notice = bob.wait_event(lambda e: e["type"] == "notice")
    assert "too noisy" in notice["text"] and notice["room"] == "dev"
    left = bob.wait_event(lambda e: e["type"] == "left" and e["room"] == "dev")
    assert (left["name"], left["reason"]) == ("bob", "closed")
    gone = bob.request({"type": "history", "room": "dev", "after": 0, "id": "h"})
    assert gone["code"] == "no_such_room"
    assert admin(broker, "close", "lobby").returncode == 1


def test_rooms_survive_a_restart_with_durable_history(
        start_broker: Callable[..., RunningBroker], ctx: zmq.Context[Any],
        tmp_path: Path) -> None:
    db = str(tmp_path / "h.db")
    first = start_broker("--db", db)
    alice = RawClient(ctx, first)
    alice.join("alice")
    entered(alice, "dev")
    alice.request({"type": "topic", "room": "dev", "text": "kept", "id": "t"})
    ack = alice.request({"type": "message", "room": "dev", "text": "hello", "id": "m"})
    entered(alice, "secret", private=True)
    alice.request({"type": "ban", "room": "dev", "name": "mallory", "id": "b"})
    assert first.stop(signal.SIGTERM) == 0
    second = start_broker("--db", db)
    bob = RawClient(ctx, second)
    bob.join("bob")
    room = entered(bob, "dev")
    assert room["topic"] == "kept" and room["seq"] > ack["seq"]  # seqs go on
    page = bob.request({"type": "history", "room": "dev", "after": 0, "id": "h"})
    assert "hello" in [e.get("text") for e in page["events"]]
    assert bob.request({"type": "enter", "room": "secret", "id": "s"})["code"] == "forbidden"
    mallory = RawClient(ctx, second)
    mallory.join("mallory")
    assert mallory.request({"type": "enter", "room": "dev", "id": "x"})["code"] == "forbidden"


def test_room_limits_are_configurable(start_broker: Callable[..., RunningBroker],
                                      ctx: zmq.Context[Any]) -> None:
    broker = start_broker("--rooms-per-client", "2", "--max-room-chars", "5")
    alice = RawClient(ctx, broker)
    alice.join("alice")
    entered(alice, "one")
    reply = alice.request({"type": "enter", "room": "two", "id": "t"})
    assert (reply["code"], reply["room"]) == ("too_many_rooms", "two")
    alice.request({"type": "part", "room": "lobby", "id": "p"})
    entered(alice, "two")
    alice.request({"type": "part", "room": "two", "id": "p2"})
    assert alice.request({"type": "enter", "room": "sixsix", "id": "s"})["code"] == "bad_room"


def test_a_broker_that_did_not_run_expires_nobody_who_pinged(
        start_broker: Callable[..., RunningBroker], ctx: zmq.Context[Any]) -> None:
    """Liveness never punishes a client for the broker's own backlog (issue 12).

    The broker is stopped for over three times its expiry while clients go
    on pinging as asked: their pings wait in the kernel, as in a join storm
    they wait in the input queue. Resumed, it must read them, not expire them.
    """
    import os
    import time

    broker = start_broker("--heartbeat", "0.3")  # silent for 0.9 s: expired
    alice, watcher = RawClient(ctx, broker), RawClient(ctx, broker)
    alice.join("alice")
    watcher.join("watcher")

    def ping_for(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for client in (alice, watcher):
                client.send({"type": "ping"})
            time.sleep(0.1)  # the clients' ping cadence (not a wait for a state)

    os.kill(broker.proc.pid, signal.SIGSTOP)
    try:
        ping_for(3.0)
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)
    ping_for(1.5)
    pong = alice.request({"type": "ping", "id": "last"})
    assert pong["joined"] is True
    timeouts = []
    while watcher.sub.poll(0):
        _, body = watcher.next_event(0)
        if body.get("type") == "left":
            timeouts.append(body["name"])
    assert timeouts == []


def test_a_malformed_request_naming_a_room_gets_its_room_back(raw: Raw) -> None:
    alice = raw()
    alice.join("alice")
    reply = alice.request({"type": "enter", "room": "Dev", "private": 1, "id": "x"})
    assert (reply["code"], reply["room"], reply["id"]) == ("bad_request", "dev", "x")
    reply = alice.request({"type": "part", "room": "#dev", "id": "y"})
    assert (reply["code"], reply["room"]) == ("bad_room", "#dev")
