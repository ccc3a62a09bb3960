"""Property tests: no input makes the codec or the broker state misbehave."""

from __future__ import annotations

from typing import Any

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from zchat.errors import ProtocolError
from zchat.protocol import ROOM_TOPIC, decode_request, parse_request
from zchat.state import Broker, Limits, Publish, Reply

PEERS = [b"p1", b"p2", b"p3", b"p4"]
NAMES = ["ann", "Ann", "bob", "", "x y", "z" * 40]

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)

field_values = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 50), st.text(max_size=10), st.binary(max_size=5),
    st.sampled_from(NAMES), st.lists(st.integers(), max_size=2),
)

request_maps = st.fixed_dictionaries(
    {"type": st.sampled_from(["join", "message", "leave", "ping", "who", "history", "dm",
                              "nope"])},
    optional={
        "name": st.sampled_from(NAMES) | field_values,
        "text": st.text(max_size=30) | field_values,
        "to": st.sampled_from(NAMES) | field_values,
        "id": st.sampled_from(["1", "2", "3"]) | field_values,
        "after": field_values,
        "limit": field_values,
        "since": field_values,
        "token": field_values,
        "reason": field_values,
    },
)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_decode_or_raise_protocol_error(raw: bytes) -> None:
    try:
        decode_request(raw)
    except ProtocolError as exc:
        assert exc.code in ("bad_frame", "bad_request", "too_large")


@settings(max_examples=300, deadline=None)
@given(msgpack_values)
def test_any_msgpack_value_decodes_or_raises_protocol_error(value: Any) -> None:
    try:
        decode_request(msgpack.packb(value, use_bin_type=True))
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(PEERS), request_maps, st.floats(0, 2)), max_size=40))
def test_broker_state_never_raises_and_keeps_its_invariants(
    steps: list[tuple[bytes, dict[str, Any], float]],
) -> None:
    broker = Broker(heartbeat=1.0, limits=Limits(rate=5, burst=3, max_text=20, history=10),
                    now=0.0)
    now = 0.0
    last_seq = 0
    for peer, body, dt in steps:
        now += dt
        try:
            request = parse_request(body)
        except ProtocolError:
            continue
        out = broker.handle(peer, request, now, addr="127.0.0.1") + broker.tick(now)
        for item in out:
            if isinstance(item, Publish) and item.topic == ROOM_TOPIC:
                # seq rises by exactly one per room event
                assert item.body["seq"] == last_seq + 1
                last_seq = item.body["seq"]
            elif isinstance(item, Reply):
                assert item.body["type"] in (
                    "welcome", "ack", "error", "pong", "members", "history", "dm", "bye")
                if item.body["type"] == "error" and isinstance(body.get("id"), str):
                    assert item.body.get("id") in (body["id"], None)
        names = [m["name"].casefold() for m in broker.members()]
        assert len(names) == len(set(names))
        assert broker.seq == last_seq
        assert len(broker.history(0, 1000)) <= 10
