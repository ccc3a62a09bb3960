"""Conformance of a real broker to version 1 of the wire contract (PROTOCOL.md).

The same raw client as ``test_conformance_rooms`` (a DEALER, a SUB and
msgpack, not zchat's library), for the version 1 rows: frames, names, `dm`,
limits, takeover, leave. Every reply and frame it receives is also checked
against its contract row by that client. Like that module's tests, each test
runs against the broker directly and through a ``zchat-relay`` (its
``start_broker`` fixture).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgpack
import pytest
import test_conformance_rooms as rooms
import zmq
from test_conformance_rooms import Net, Peer, names

from conftest import RunningBroker

# Each test against the broker directly and through a relay, as in that module
# (all of this module's tests: they are few).
start_broker = rooms.start_broker
relay_keys = rooms.relay_keys
hop = rooms.hop
pytest_generate_tests = rooms.pytest_generate_tests


@pytest.fixture
def net(ctx: zmq.Context[Any], start_broker: Callable[..., RunningBroker]) -> Net:
    """``net(name, listen=False, **join_fields)``: a raw peer, joined if named."""
    broker = start_broker("--heartbeat", "0.5")

    def make(name: str | None = None, *, listen: bool = False, **fields: Any) -> Peer:
        peer = Peer(ctx, broker)
        if listen:
            peer.listen()
            peer.wait_live()
        if name is not None:
            peer.join(name, **fields)
        return peer

    return make


@pytest.mark.parametrize("frames", [
    [b"\xc1"],                                   # not MessagePack
    [msgpack.packb(["type", "ping"])],           # not a map
    [b"\x81\xa4type\xa4\xff\xfe\xfd\xfc"],       # a str that is not UTF-8
    [msgpack.packb({"type": "ping"}), b"more"],  # not ONE frame
])
def test_a_frame_that_is_not_one_map_is_bad_frame_and_harms_no_one(
        net: Net, frames: list[bytes]) -> None:
    alice = net("alice")
    bob = net("bob")
    bob.dealer.send_multipart(frames)
    err = bob._recv_any()
    assert err["type"] == "error" and err["code"] == "bad_frame"
    bob.ok("ping")
    alice.ok("message", text="still fine")


def test_unknown_type_and_missing_fields_are_bad_request_echoing_id(net: Net) -> None:
    alice = net("alice")
    err = alice.error("no-such-type")
    assert err["code"] == "bad_request"         # and `id` echoed: error() matched it
    assert alice.error("message")["code"] == "bad_request"
    assert alice.error("join")["code"] == "bad_request"


def test_before_join_only_join_and_ping_are_served(net: Net) -> None:
    stranger = net()
    assert stranger.ok("ping")["type"] == "pong"
    for kind, fields in (("message", {"text": "x"}), ("who", {}),
                         ("history", {"after": 0}), ("dm", {"to": "x", "text": "y"})):
        assert stranger.error(kind, **fields)["code"] == "not_joined", kind


@pytest.mark.parametrize("name", ["", "has space", "tab\tname", "ctl\x07", "a" * 33])
def test_bad_names_are_refused(net: Net, name: str) -> None:
    assert net().error("join", name=name)["code"] == "bad_name"


def test_names_are_unique_case_insensitively(net: Net) -> None:
    net("Alice")
    assert net().error("join", name="aLICE")["code"] == "name_taken"
    assert net().join("a" * 32)["name"] == "a" * 32


def test_dm_goes_to_the_receivers_dealer_and_never_on_pub(net: Net) -> None:
    spy = net("spy", listen=True)
    alice = net("alice")
    bob = net("bob")
    ack = alice.ok("dm", to="BOB", text="for-bob-only")
    assert ack["type"] == "ack" and "seq" not in ack
    dm = bob.unsolicited(lambda b: b.get("type") == "dm")
    assert dm == {**dm, "from": "alice", "text": "for-bob-only"}
    assert isinstance(dm["ts"], float)
    assert alice.error("dm", to="nobody", text="x")["code"] == "no_such_user"
    marker = alice.ok("message", text="marker")["seq"]
    spy.upto(lambda f: f.topic == b"lobby\x00" and f.body.get("seq") == marker)
    assert not [f for f in spy.seen if b"for-bob-only" in f.raw]


def test_text_limit_and_id_length(net: Net) -> None:
    alice = net("alice")
    alice.ok("message", text="x" * 4096)
    assert alice.error("message", text="x" * 4097)["code"] == "too_large"
    alice.send({"type": "ping", "id": "i" * 65})
    assert alice._recv_any()["code"] == "bad_request"


def test_a_burst_past_the_limit_is_rate_limited_and_not_delivered(net: Net) -> None:
    spy = net("spy", listen=True)
    alice = net("alice")
    sent = []
    refused = 0
    for i in range(30):
        reply = alice.request("message", text=f"burst-{i}")
        if reply["type"] == "ack":
            sent.append(reply["seq"])
        else:
            assert reply["code"] == "rate_limited"
            refused += 1
    assert refused and len(sent) >= 20
    bodies = spy.room_frames_upto("lobby", seq=sent[-1])
    assert len([b for b in bodies if b["type"] == "message"]) == len(sent)


def test_a_resent_message_is_not_delivered_twice(net: Net) -> None:
    alice = net("alice", listen=True)
    first = alice.ok("message", text="once", id="dup-1")
    assert alice.ok("message", text="once", id="dup-1")["seq"] == first["seq"]
    nxt = alice.ok("message", text="then")["seq"]
    assert nxt == first["seq"] + 1


def test_takeover_replaces_the_old_connection_without_a_left(net: Net) -> None:
    spy = net("spy", listen=True)
    old = net()
    token = old.join("alice")["token"]
    new = net()
    welcome = new.join("alice", token=token)
    assert welcome["token"] == token
    assert old.unsolicited(lambda b: b.get("type") == "bye")["reason"] == "replaced"
    joined = spy.room_frames_upto("lobby", type="joined", seq=welcome["seq"])
    assert [b["type"] for b in joined if b["seq"] > 1 and b["name"] == "alice"] == [
        "joined", "joined"]


def test_leave_announces_left_and_forgets_the_client(net: Net) -> None:
    spy = net("spy", listen=True)
    alice = net("alice")
    alice.send({"type": "leave", "reason": "done"})
    left = spy.event("lobby", type="left", name="alice")
    assert left["reason"] == "leave" and isinstance(left["addr"], str)
    assert alice.error("message", text="ghost")["code"] == "not_joined"


def test_welcome_gives_the_heartbeat_and_history_fills_gaps(net: Net) -> None:
    alice = net()
    welcome = alice.join("alice")
    assert welcome["heartbeat"] == 0.5
    acks = [alice.ok("message", text=f"m{i}")["seq"] for i in range(3)]
    events = alice.ok("history", after=welcome["seq"])["events"]
    assert [e["seq"] for e in events] == acks
    assert names(alice.ok("who")["members"]) == ["alice"]
