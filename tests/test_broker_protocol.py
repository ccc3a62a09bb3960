"""Every row of PROTOCOL.md against a real zchat-broker, in raw ZeroMQ + MessagePack.

These tests use no zchat code on the client side (see ``RawClient`` in
conftest.py): they are what a client written by someone else would do.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
import zmq

from conftest import RawClient, RunningBroker

Raw = Callable[[], RawClient]


def joined(raw: Raw, name: str) -> tuple[RawClient, dict[str, Any]]:
    client = raw()
    welcome = client.join(name)
    assert welcome["type"] == "welcome", welcome
    return client, welcome


def test_join_welcome_has_every_field_and_joined_goes_to_everyone(raw: Raw,
                                                                  broker: RunningBroker) -> None:
    watcher, _ = joined(raw, "watcher")
    client = raw()
    welcome = client.request({"type": "join", "name": "carol", "id": "j1"})
    assert welcome["type"] == "welcome"
    assert welcome["id"] == "j1"
    assert welcome["name"] == "carol"
    assert welcome["addr"] == "127.0.0.1"
    assert welcome["room"] == "lobby"
    assert welcome["seq"] == 2
    assert {"name": "carol", "addr": "127.0.0.1"} in welcome["members"]
    assert {"name": "watcher", "addr": "127.0.0.1"} in welcome["members"]
    assert welcome["pub"] == broker.broadcast
    assert welcome["heartbeat"] == 0.5
    assert isinstance(welcome["token"], str)
    event = watcher.wait_event(lambda e: e.get("type") == "joined" and e["name"] == "carol")
    assert event == {"type": "joined", "room": "lobby", "seq": 2, "ts": event["ts"],
                     "name": "carol", "addr": "127.0.0.1"}
    assert abs(event["ts"] - time.time()) < 60


def test_room_events_use_the_room_topic(raw: Raw) -> None:
    client, _ = joined(raw, "alice")
    client.request({"type": "message", "text": "hi"})
    while True:
        topic, body = client.next_event()
        if body["type"] == "message":
            assert topic == b"lobby\x00"
            return
        assert topic in (b"lobby\x00", b"\x00")


def test_message_is_acked_and_broadcast_in_seq_order(raw: Raw) -> None:
    alice, _ = joined(raw, "alice")
    bob, welcome = joined(raw, "bob")
    acks = [alice.request({"type": "message", "text": f"m{i}", "id": f"i{i}"}) for i in range(5)]
    assert [a["type"] for a in acks] == ["ack"] * 5
    assert [a["id"] for a in acks] == [f"i{i}" for i in range(5)]
    seqs = [a["seq"] for a in acks]
    assert seqs == list(range(welcome["seq"] + 1, welcome["seq"] + 6))
    got = []
    while len(got) < 5:
        event = bob.wait_event(lambda e: e["type"] == "message")
        got.append((event["seq"], event["from"], event["text"]))
    assert got == [(s, "alice", f"m{i}") for i, s in enumerate(seqs)]


def test_text_is_utf8_str_on_the_wire(raw: Raw) -> None:
    alice, _ = joined(raw, "alice")
    alice.request({"type": "message", "text": "héllo ☃"})
    alice.sub.setsockopt(zmq.RCVTIMEO, 5000)
    while True:
        _, payload = alice.sub.recv_multipart()
        body = msgpack.unpackb(payload, raw=True)  # keep the wire types
        if body[b"type"] == b"message":
            assert isinstance(body[b"text"], bytes)
            assert body[b"text"].decode() == "héllo ☃"
            # str family (fixstr/str8), never bin (0xc4-0xc6)
            assert b"\xc4" not in payload.split(b"text")[1][:1]
            return


def test_leave_announces_left(raw: Raw) -> None:
    watcher, _ = joined(raw, "watcher")
    client, _ = joined(raw, "carol")
    client.send({"type": "leave", "reason": "lunch"})
    event = watcher.wait_event(lambda e: e["type"] == "left")
    assert (event["name"], event["addr"], event["reason"]) == ("carol", "127.0.0.1", "leave")
    assert event["detail"] == "lunch"
    assert client.request({"type": "who"})["code"] == "not_joined"


def test_ping_echoes_id_even_before_join(raw: Raw) -> None:
    client = raw()
    pong = client.request({"type": "ping", "id": "p1", "extra": [1, 2]})
    assert pong["type"] == "pong"
    assert pong["id"] == "p1"
    assert isinstance(pong["ts"], float)


def test_who_lists_members(raw: Raw) -> None:
    alice, _ = joined(raw, "alice")
    joined(raw, "bob")
    reply = alice.request({"type": "who", "id": "w"})
    assert reply["type"] == "members"
    assert reply["id"] == "w"
    assert sorted(m["name"] for m in reply["members"]) == ["alice", "bob"]


def test_history_returns_events_after_seq_ascending(raw: Raw) -> None:
    alice, welcome = joined(raw, "alice")
    for i in range(5):
        alice.request({"type": "message", "text": f"m{i}"})
    reply = alice.request({"type": "history", "after": welcome["seq"], "limit": 3, "id": "h"})
    assert reply["type"] == "history"
    assert reply["id"] == "h"
    events = reply["events"]
    assert [e["seq"] for e in events] == [2, 3, 4]
    assert [e["text"] for e in events] == ["m0", "m1", "m2"]
    everything = alice.request({"type": "history", "after": 0})["events"]
    assert everything[0] == {"type": "joined", "room": "lobby", "seq": 1,
                             "ts": everything[0]["ts"], "name": "alice", "addr": "127.0.0.1"}


def test_dm_reaches_only_the_receiver_and_never_pub(raw: Raw, ctx: zmq.Context[Any],
                                                    broker: RunningBroker) -> None:
    spy = ctx.socket(zmq.SUB)  # subscribed to everything, never joined
    spy.setsockopt(zmq.LINGER, 0)
    spy.setsockopt(zmq.SUBSCRIBE, b"")
    spy.connect(broker.broadcast)
    alice, _ = joined(raw, "alice")
    bob, _ = joined(raw, "bob")
    carol, _ = joined(raw, "carol")
    # the spy is connected once it hears heartbeats
    assert spy.poll(5000)
    ack = alice.request({"type": "dm", "to": "Bob", "text": "secret", "id": "d1"})
    assert ack == {"type": "ack", "id": "d1"}
    dm = bob.recv()
    assert dm["type"] == "dm"
    assert (dm["from"], dm["text"]) == ("alice", "secret")
    assert isinstance(dm["ts"], float)
    # Push a marker through PUB; everything the spy got before it must be dm-free.
    marker = alice.request({"type": "message", "text": "marker"})["seq"]
    spy.setsockopt(zmq.RCVTIMEO, 5000)
    while True:
        _, payload = spy.recv_multipart()
        assert b"secret" not in payload
        body = msgpack.unpackb(payload)
        assert body["type"] != "dm"
        if body.get("seq") == marker:
            break
    assert not carol.dealer.poll(200)


def test_dm_to_unknown_user(raw: Raw) -> None:
    alice, _ = joined(raw, "alice")
    reply = alice.request({"type": "dm", "to": "ghost", "text": "x", "id": "d"})
    assert (reply["type"], reply["code"], reply["id"]) == ("error", "no_such_user", "d")


@pytest.mark.parametrize("kind", ["message", "who", "history", "dm", "leave"])
def test_not_joined(raw: Raw, kind: str) -> None:
    client = raw()
    body = {"type": kind, "text": "x", "to": "y", "after": 0, "id": "n"}
    reply = client.request(body)
    assert (reply["type"], reply["code"], reply["id"]) == ("error", "not_joined", "n")


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([b"\xc1\xc1garbage"], "bad_frame"),
        ([msgpack.packb([1, 2, 3])], "bad_frame"),
        ([b"\x81\xa4type\xa4\xff\xfe\xfd\xfc"], "bad_frame"),
        ([msgpack.packb({"type": "ping"}), b"extra"], "bad_frame"),
        ([msgpack.packb({"type": "fly"})], "bad_request"),
        ([msgpack.packb({"no": "type"})], "bad_request"),
        ([msgpack.packb({"type": "join", "name": 7})], "bad_request"),
    ],
)
def test_bad_frames_get_error_and_the_broker_goes_on(raw: Raw, frames: list[bytes],
                                                     code: str) -> None:
    client = raw()
    client.send_raw(*frames)
    reply = client.recv()
    assert (reply["type"], reply["code"]) == ("error", code)
    assert isinstance(reply["detail"], str) and reply["detail"]
    assert client.request({"type": "ping"})["type"] == "pong"


def test_bad_request_echoes_id(raw: Raw) -> None:
    client = raw()
    reply = client.request({"type": "history", "after": "x", "id": "q"})
    assert (reply["code"], reply["id"]) == ("bad_request", "q")


@pytest.mark.parametrize("name", ["", "two words", "x" * 33, "bell\x07"])
def test_bad_name(raw: Raw, name: str) -> None:
    reply = raw().request({"type": "join", "name": name})
    assert (reply["type"], reply["code"]) == ("error", "bad_name")


def test_name_taken_case_insensitive(raw: Raw) -> None:
    joined(raw, "Alice")
    reply = raw().request({"type": "join", "name": "aLICE", "id": "j"})
    assert (reply["type"], reply["code"], reply["id"]) == ("error", "name_taken", "j")


def test_too_large_text(raw: Raw) -> None:
    alice, _ = joined(raw, "alice")
    assert alice.request({"type": "message", "text": "x" * 4096})["type"] == "ack"
    reply = alice.request({"type": "message", "text": "x" * 4097, "id": "big"})
    assert (reply["type"], reply["code"], reply["id"]) == ("error", "too_large", "big")


def test_too_large_frame(raw: Raw) -> None:
    alice, _ = joined(raw, "alice")
    blob = msgpack.packb({"type": "ping", "pad": "x" * (70 * 1024)})
    alice.send_raw(blob)
    reply = alice.recv()
    assert (reply["type"], reply["code"]) == ("error", "too_large")


def test_huge_frame_drops_only_that_connection(raw: Raw) -> None:
    alice, _ = joined(raw, "alice")
    bob, _ = joined(raw, "bob")
    mallory = raw()
    mallory.send_raw(b"\x00" * (8 * 1024 * 1024))
    # Alice's traffic is unaffected, whatever happened to mallory.
    for i in range(20):
        assert alice.request({"type": "message", "text": f"m{i}"})["type"] == "ack"
    texts = []
    while len(texts) < 20:
        texts.append(bob.wait_event(lambda e: e["type"] == "message")["text"])
    assert texts == [f"m{i}" for i in range(20)]


def test_duplicate_id_is_not_delivered_twice(raw: Raw) -> None:
    alice, _ = joined(raw, "alice")
    bob, _ = joined(raw, "bob")
    first = alice.request({"type": "message", "text": "once", "id": "dup"})
    second = alice.request({"type": "message", "text": "once", "id": "dup"})
    assert second == first
    marker = alice.request({"type": "message", "text": "marker"})["seq"]
    seen = []
    while True:
        event = bob.wait_event(lambda e: e["type"] == "message")
        seen.append(event["text"])
        if event["seq"] == marker:
            break
    assert seen == ["once", "marker"]


def test_takeover_with_token(raw: Raw) -> None:
    watcher, _ = joined(raw, "watcher")
    old, welcome = joined(raw, "carol")
    sent = old.request({"type": "message", "text": "before", "id": "m1"})
    new = raw()
    refused = new.request({"type": "join", "name": "carol"})
    assert refused["code"] == "name_taken"
    taken = new.request({"type": "join", "name": "carol", "token": welcome["token"]})
    assert taken["type"] == "welcome"
    assert old.recv() == {"type": "bye", "reason": "replaced"}
    # Dedupe outlives the connection: the resend after takeover is acked, not delivered.
    assert new.request({"type": "message", "text": "before", "id": "m1"}) == sent
    event = watcher.wait_event(lambda e: e["type"] == "joined" and e["name"] == "carol"
                               and e["seq"] == taken["seq"])
    assert event["addr"] == "127.0.0.1"
    assert old.request({"type": "who"})["code"] == "not_joined"


def test_rate_limited(start_broker: Callable[..., RunningBroker],
                      ctx: zmq.Context[Any]) -> None:
    broker = start_broker("--rate", "1", "--burst", "5")
    alice = RawClient(ctx, broker)
    alice.join("alice")
    bob = RawClient(ctx, broker)
    bob.join("bob")
    for i in range(12):
        alice.send({"type": "message", "text": f"m{i}", "id": str(i)})
    replies = [alice.recv() for _ in range(12)]
    kinds = [r["type"] for r in replies]
    assert kinds[:5] == ["ack"] * 5
    limited = [r for r in replies if r["type"] == "error"]
    assert limited and all(r["code"] == "rate_limited" for r in limited)
    broker.wait_output(r"rate limited alice$", stderr=True)  # a name, not a routing id
    # bob is not limited by alice's flood
    assert bob.request({"type": "message", "text": "bob here"})["type"] == "ack"
    # and what was limited was not delivered
    history = bob.request({"type": "history", "after": 0})["events"]
    delivered = [e["text"] for e in history if e["type"] == "message"]
    assert len(delivered) == kinds.count("ack") + 1


def test_heartbeats_on_broker_topic(raw: Raw) -> None:
    client = raw()
    client.subscribe(b"\x00")
    topic, beat = client.next_event(timeout=5)
    assert topic == b"\x00"
    assert beat["type"] == "heartbeat"
    assert isinstance(beat["ts"], float)
    assert beat["seqs"] == {"lobby": beat["seqs"]["lobby"]}
    assert isinstance(beat["epoch"], str)
    topic, second = client.next_event(timeout=5)
    assert second["epoch"] == beat["epoch"]
    assert 0.3 < second["ts"] - beat["ts"] < 2.0


def test_silent_client_times_out(raw: Raw) -> None:
    watcher = raw()
    watcher.join("watcher")
    joined(raw, "silent")
    # The watcher keeps pinging; the silent one says nothing.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        watcher.request({"type": "ping"})
        if watcher.sub.poll(200):
            _, event = watcher.sub.recv_multipart()
            body = msgpack.unpackb(event)
            if body["type"] == "left":
                assert (body["name"], body["reason"]) == ("silent", "timeout")
                break
    else:
        raise AssertionError("no timeout announced")
    assert watcher.request({"type": "who"})["members"] == [
        {"name": "watcher", "addr": "127.0.0.1"}]


def test_sigterm_sends_shutdown_and_bye_and_exits_zero(raw: Raw, broker: RunningBroker) -> None:
    alice, _ = joined(raw, "alice")
    broker.proc.send_signal(signal.SIGTERM)
    assert alice.recv() == {"type": "bye", "reason": "shutdown"}
    kinds = []
    while "shutdown" not in kinds:
        topic, body = alice.next_event()
        kinds.append(body["type"])
        if body["type"] == "shutdown":
            assert topic == b"\x00"
    assert "left" in kinds
    assert broker.proc.wait(10) == 0
    assert any("left [shutdown]" in line for line in broker.stdout_lines)


def test_sigint_stops_cleanly(broker: RunningBroker) -> None:
    assert broker.stop(signal.SIGINT) == 0


def test_broker_screen_shows_time_address_name_text(raw: Raw, broker: RunningBroker) -> None:
    alice, _ = joined(raw, "alice")
    alice.request({"type": "message", "text": "hello\nfake line"})
    alice.send({"type": "leave"})
    broker.wait_output(r"^\d\d:\d\d:\d\d #lobby 1 --> alice joined from 127\.0\.0\.1$")
    # A newline in a message cannot fake a second line on the operator's screen.
    broker.wait_output(r"^\d\d:\d\d:\d\d #lobby 2 127\.0\.0\.1 <alice> hello\\nfake line$")
    broker.wait_output(r"<-- alice \(127\.0\.0\.1\) left \[leave\]")


def test_broker_screen_shows_actions_as_actions(raw: Raw, broker: RunningBroker) -> None:
    carol, _ = joined(raw, "carol")
    carol.request({"type": "message", "text": "/me waves"})
    broker.wait_output(r"^\d\d:\d\d:\d\d #lobby \d+ 127\.0\.0\.1 \* carol waves$")


def test_bad_frames_are_logged_without_flooding(raw: Raw, broker: RunningBroker) -> None:
    mallory = raw()
    for _ in range(200):
        mallory.send_raw(b"\xc1")
    for _ in range(200):
        assert mallory.recv()["code"] == "bad_frame"
    broker.wait_output("sent a bad frame", stderr=True)
    assert mallory.request({"type": "ping", "id": "after"})["type"] == "pong"
    warnings = [line for line in broker.stderr_lines if "bad frame" in line]
    assert 1 <= len(warnings) <= 2


def test_hide_addresses(start_broker: Callable[..., RunningBroker],
                        ctx: zmq.Context[Any]) -> None:
    broker = start_broker("--hide-addresses")
    a = RawClient(ctx, broker)
    wa = a.join("alice")
    b = RawClient(ctx, broker)
    wb = b.join("bob")
    assert wa["addr"].startswith("cloak-")
    assert wa["addr"] == wb["addr"]  # same IP, same stable cloak
    assert "127.0.0.1" not in str(wb["members"])
    broker.wait_output(r"--> bob joined from cloak-")


def test_environment_configures_the_broker(start_broker: Callable[..., RunningBroker],
                                           ctx: zmq.Context[Any]) -> None:
    broker = start_broker(env={"ZCHAT_HEARTBEAT": "0.25", "ZCHAT_MAX_TEXT": "5"})
    client = RawClient(ctx, broker)
    welcome = client.join("alice")
    assert welcome["heartbeat"] == 0.25
    assert client.request({"type": "message", "text": "123456"})["code"] == "too_large"


def test_coalesced_batches_carry_the_same_events_in_order(
    start_broker: Callable[..., RunningBroker], ctx: zmq.Context[Any],
) -> None:
    broker = start_broker("--coalesce", "8", "--rate", "0", "--heartbeat", "0.5")
    batched = ctx.socket(zmq.SUB)
    batched.setsockopt(zmq.LINGER, 0)
    batched.setsockopt(zmq.SUBSCRIBE, b"\x01lobby\x00")
    batched.setsockopt(zmq.SUBSCRIBE, b"\x00")
    batched.connect(broker.broadcast)
    v1 = ctx.socket(zmq.SUB)  # subscribed as PROTOCOL.md v1 says
    v1.setsockopt(zmq.LINGER, 0)
    v1.setsockopt(zmq.SUBSCRIBE, b"lobby\x00")
    v1.setsockopt(zmq.SUBSCRIBE, b"\x00")
    v1.connect(broker.broadcast)
    plain = RawClient(ctx, broker)
    welcome = plain.join("alice")
    assert welcome["batch"] is True
    assert batched.poll(5000)  # live once it heard a heartbeat
    assert v1.poll(5000)
    for i in range(50):
        plain.send({"type": "message", "text": f"m{i}"})
    last = max(plain.recv()["seq"] for _ in range(50))
    singles: list[int] = []
    v1.setsockopt(zmq.RCVTIMEO, 5000)
    while not singles or singles[-1] < last:
        topic, payload = v1.recv_multipart()
        assert topic != b"\x01lobby\x00"  # a v1 subscriber never sees batches
        if topic == b"lobby\x00":
            singles.append(msgpack.unpackb(payload)["seq"])
    from_batches: list[int] = []
    sizes = []
    batched.setsockopt(zmq.RCVTIMEO, 5000)
    while not from_batches or from_batches[-1] < last:
        topic, payload = batched.recv_multipart()
        body = msgpack.unpackb(payload)
        if topic == b"\x01lobby\x00":
            assert (body["type"], body["room"]) == ("batch", "lobby")
            sizes.append(len(body["events"]))
            from_batches.extend(e["seq"] for e in body["events"])
    assert from_batches[-len(singles):] == singles
    assert max(sizes) <= 8
