"""zchat.protocol: frames to typed messages and back, no sockets."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from zchat.errors import ProtocolError
from zchat.protocol import (
    ROOM,
    Ack,
    Bye,
    ByeReason,
    ClientStatus,
    Direct,
    ErrorCode,
    ErrorReply,
    GetHistory,
    HistoryPage,
    Join,
    Joined,
    Joins,
    Leave,
    LeaveReason,
    Left,
    Member,
    Members,
    Message,
    Notice,
    OtherEvent,
    OtherReply,
    Ping,
    Pong,
    Say,
    SendDm,
    Welcome,
    Who,
    check_name,
    decode_frame,
    decode_request,
    encode,
    fold_name,
    parse_event,
    parse_members,
    parse_reply,
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


def test_a_joins_event_parses_to_its_members_in_order() -> None:
    body = {"type": "joins", "room": "big", "seq": 7, "ts": 2.5, "count": 2,
            "members": [{"name": "bob", "addr": "10.0.0.2"}, {"name": "ann", "addr": "x"}]}
    assert parse_event(body) == Joins("big", 7, 2.5, (Member("bob", "10.0.0.2"),
                                                      Member("ann", "x")))
    # In a history page, among other events.
    page = parse_reply({"type": "history", "room": "big", "id": "h",
                        "events": [body, {**body, "type": "notice", "text": "hi", "seq": 8}]})
    assert isinstance(page, HistoryPage)
    assert [type(e) for e in page.events] == [Joins, Notice]
    for broken in ({**body, "members": None}, {**body, "members": [{"name": "x"}]},
                   {**body, "members": "bob"}):
        with pytest.raises(ProtocolError):
            parse_event(broken)


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


# --------------------------------------------------------------------------
# Replies (broker -> client)


def test_replies_parse_to_typed_classes_by_the_table() -> None:
    welcome = parse_reply({"type": "welcome", "name": "a", "seq": 3, "pub": 5556,
                           "token": "t", "id": "j1", "rate": 2, "burst": 4, "batch": True})
    assert isinstance(welcome, Welcome)
    assert (welcome.seq, welcome.pub, welcome.room, welcome.heartbeat, welcome.id) == (
        3, "5556", ROOM, 5.0, "j1")
    assert (welcome.rate, welcome.burst, welcome.batch, welcome.epoch) == (2.0, 4, True, None)
    assert parse_reply({"type": "ack", "seq": 9, "id": "x"}) == Ack(9, "x")
    assert parse_reply({"type": "ack"}) == Ack()
    assert parse_reply({"type": "error", "code": "name_taken", "detail": "d"}) == ErrorReply(
        ErrorCode.NAME_TAKEN, "d")
    assert parse_reply({"type": "pong", "ts": 1, "seq": 4, "joined": False}) == Pong(
        1.0, 4, False)
    assert parse_reply({"type": "members", "members": [{"name": "a", "addr": "b"}]}) == Members(
        [Member("a", "b")])
    page = parse_reply({"type": "history", "events": [
        {"type": "notice", "seq": 1, "ts": 0.5, "text": "hi"}, 7]})
    assert page == HistoryPage([Notice(1, 0.5, "hi")])
    assert parse_reply({"type": "dm", "from": "a", "text": "t", "ts": 2}) == Direct("a", "t", 2.0)
    assert parse_reply({"type": "bye", "reason": "kicked"}) == Bye(ByeReason.KICKED)
    other = parse_reply({"type": "future", "x": 1})
    assert isinstance(other, OtherReply) and other.type == "future"


@pytest.mark.parametrize("body", [
    {"type": "welcome", "name": "a", "pub": "1", "token": "t"},  # no seq
    {"type": "welcome", "name": "a", "seq": "3", "pub": "1", "token": "t"},
    {"type": "welcome", "name": "a", "seq": 3, "pub": "1", "token": "t", "members": 5},
    {"type": "pong"},
    {"type": "error", "detail": "no code"},
    {"type": "history", "events": {}},
    {"type": "dm", "from": "a"},
])
def test_a_reply_missing_a_field_is_a_clean_protocol_error(body: dict[str, Any]) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_reply(body)
    assert caught.value.code == ErrorCode.BAD_REPLY


@given(st.dictionaries(
    st.sampled_from(["type", "id", "seq", "name", "pub", "token", "events", "ts", "code",
                     "members", "from", "text", "reason", "joined"]),
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=4),
              st.lists(st.integers(), max_size=2)),
).map(lambda d: {**d, "type": d.get("type") if isinstance(d.get("type"), str) else "welcome"}))
def test_any_reply_map_parses_or_raises_protocol_error(body: dict[str, Any]) -> None:
    try:
        parse_reply(body)
    except ProtocolError:
        pass


@pytest.mark.parametrize("module", ["zchat.protocol", "zchat.session"])
def test_the_sans_io_modules_import_no_zmq_or_sqlite(module: str) -> None:
    code = (f"import sys, {module}; "
            "print(sorted(m for m in ('zmq', 'sqlite3', 'asyncio') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]"


def test_vocabulary_values_are_the_wire_strings() -> None:
    assert ErrorCode.RATE_LIMITED == "rate_limited"
    assert encode({"code": ErrorCode.NAME_TAKEN}) == encode({"code": "name_taken"})
    assert {r.value for r in ByeReason} <= {r.value for r in LeaveReason}
    assert ClientStatus("closed") is ClientStatus.CLOSED
