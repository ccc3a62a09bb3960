"""zchat.protocol: frames to typed messages and back, no sockets."""

from __future__ import annotations

import msgpack
import pytest

from zchat.errors import ProtocolError
from zchat.protocol import (
    GetHistory,
    Join,
    Joined,
    Leave,
    Left,
    Message,
    Notice,
    OtherEvent,
    Ping,
    Say,
    SendDm,
    Who,
    check_name,
    decode_frame,
    decode_request,
    encode,
    fold_name,
    parse_event,
    parse_members,
    request_id,
)


def frame(**body: object) -> bytes:
    return msgpack.packb(body)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"type": "join", "name": "carol"}, Join("carol")),
        ({"type": "join", "name": "c", "since": 7, "token": "t", "id": "1"},
         Join("c", since=7, token="t", id="1")),
        ({"type": "message", "text": "hi", "id": "m1"}, Say("hi", id="m1")),
        ({"type": "leave"}, Leave()),
        ({"type": "leave", "reason": "lunch"}, Leave(reason="lunch")),
        ({"type": "ping", "anything": [1, 2]}, Ping()),
        ({"type": "who"}, Who()),
        ({"type": "history", "after": 3}, GetHistory(after=3)),
        ({"type": "history", "after": 0, "limit": 5}, GetHistory(after=0, limit=5)),
        ({"type": "dm", "to": "bob", "text": "psst"}, SendDm("bob", "psst")),
    ],
)
def test_every_request_type_decodes(body: dict[str, object], expected: object) -> None:
    assert decode_request(msgpack.packb(body)) == expected


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"", "bad_frame"),
        (b"\xc1", "bad_frame"),  # never-used MessagePack byte
        (msgpack.packb([1, 2]), "bad_frame"),
        (msgpack.packb("join"), "bad_frame"),
        (msgpack.packb({"type": "join"}) + b"\x00", "bad_frame"),  # trailing data
        (msgpack.packb({1: "x", "type": "who"}), "bad_frame"),  # non-string key
        (b"\x81\xa4type\xa3\xff\xfe\xfd", "bad_frame"),  # text that is not UTF-8
        (msgpack.packb({"kind": "who"}), "bad_request"),
        (msgpack.packb({"type": 5}), "bad_request"),
        (msgpack.packb({"type": "dance"}), "bad_request"),
        (frame(type="join"), "bad_request"),
        (frame(type="join", name=5), "bad_request"),
        (frame(type="join", name="x", since="3"), "bad_request"),
        (frame(type="join", name="x", since=True), "bad_request"),  # bool is not an int
        (frame(type="message"), "bad_request"),
        (msgpack.packb({"type": "message", "text": b"bytes"}, use_bin_type=True),
         "bad_request"),
        (frame(type="history"), "bad_request"),
        (frame(type="history", after=1.5), "bad_request"),
        (frame(type="dm", to="bob"), "bad_request"),
        (frame(type="who", id=7), "bad_request"),
        (frame(type="who", id="x" * 65), "bad_request"),
        (b"\x81" + msgpack.packb("type") + msgpack.packb("m" * 70_000), "too_large"),
    ],
)
def test_bad_frames_raise_one_error_type(raw: bytes, code: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_request(raw)
    assert caught.value.code == code


def test_frame_size_limit_is_configurable_and_zero_turns_it_off() -> None:
    big = frame(type="message", text="x" * 100)
    with pytest.raises(ProtocolError, match="too_large"):
        decode_frame(big, max_size=50)
    assert decode_frame(big, max_size=0)["text"] == "x" * 100


def test_encode_writes_text_as_str_and_round_trips() -> None:
    raw = encode({"type": "message", "text": "héllo"})
    # "héllo" is 6 UTF-8 bytes: a fixstr (0xa6), never bin (0xc4..0xc6)
    assert b"\xa6h\xc3\xa9llo" in raw
    assert msgpack.unpackb(raw, raw=False) == {"type": "message", "text": "héllo"}


def test_id_is_echoed_only_when_valid() -> None:
    assert request_id({"type": "x", "id": "abc"}) == "abc"
    assert request_id({"type": "x", "id": 5}) is None
    assert request_id({"type": "x", "id": "y" * 65}) is None


@pytest.mark.parametrize("name", ["carol", "Ünïcödé", "x" * 32, "a-b_c.d", "日本"])
def test_valid_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "x" * 33, "two words", "tab\there", "new\nline", "nul\x00", "nbsp\u00a0x",
             "zero\u200bwidth"],
)
def test_bad_names(name: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        check_name(name)
    assert caught.value.code == "bad_name"


def test_names_fold_case_insensitively() -> None:
    assert fold_name("Carol") == fold_name("CAROL") == fold_name("carol")
    assert fold_name("STRASSE") == fold_name("straße")


def test_room_events_parse_to_typed_events() -> None:
    base = {"room": "lobby", "seq": 4, "ts": 1.5}
    assert parse_event({**base, "type": "joined", "name": "a", "addr": "1.2.3.4"}) == Joined(
        4, 1.5, "a", "1.2.3.4")
    assert parse_event({**base, "type": "message", "from": "a", "text": "t"}) == Message(
        4, 1.5, "a", "t")
    assert parse_event({**base, "type": "left", "name": "a", "addr": "x", "reason": "timeout"}
                       ) == Left(4, 1.5, "a", "x", "timeout")
    assert parse_event({**base, "type": "notice", "text": "hi"}) == Notice(4, 1.5, "hi")


def test_unknown_event_types_keep_their_seq() -> None:
    event = parse_event({"type": "poll", "room": "lobby", "seq": 9, "ts": 2, "q": "?"})
    assert isinstance(event, OtherEvent)
    assert event.seq == 9
    assert event.body["q"] == "?"


@pytest.mark.parametrize(
    "body",
    [{"type": "message", "seq": "1", "ts": 1}, {"type": "message", "ts": 1},
     {"type": "message", "seq": 1, "ts": 1}, {"type": "joined", "seq": True, "ts": 1}],
)
def test_malformed_events_raise(body: dict[str, object]) -> None:
    with pytest.raises(ProtocolError):
        parse_event(body)


def test_members_parse() -> None:
    assert parse_members([{"name": "a", "addr": "b"}])[0].name == "a"
    with pytest.raises(ProtocolError):
        parse_members("nope")
    with pytest.raises(ProtocolError):
        parse_members([{"name": "a"}])
