"""broker/console.py and broker/screen.py without sockets: the operator's side."""

from __future__ import annotations

import io
import os
from typing import Any

import msgpack

from zchat.broker.console import CONTROL_IDS_KEPT, Console
from zchat.broker.screen import Screen, screen_line
from zchat.protocol import ROOM_TOPIC, ByeReason, ErrorCode, Join, LeaveReason, Say, encode
from zchat.state import Broker, Limits, Publish, Reply

T0 = 1_000_000.0
A, B = b"peer-a", b"peer-b"


def broker() -> Broker:
    state = Broker(heartbeat=1.0, limits=Limits(), pub="5556", now=T0, epoch="e1")
    state.handle(A, Join("alice", id="j"), T0, addr="10.0.0.1")
    state.handle(B, Join("bob", id="j"), T0, addr="10.0.0.2")
    return state


def ask(console: Console, **body: Any) -> tuple[dict[str, Any], Any]:
    answer = console.answer(encode(body), T0 + 1)
    return msgpack.unpackb(answer.reply), answer


def test_stats_and_who() -> None:
    console = Console(broker(), lambda: {"pid": 7})
    reply, _ = ask(console, type="stats")
    assert reply["type"] == "result" and reply["stats"]["pid"] == 7
    assert reply["stats"]["members"] == 2
    reply, _ = ask(console, type="who")
    assert reply["members"] == [{"name": "alice", "addr": "10.0.0.1"},
                                {"name": "bob", "addr": "10.0.0.2"}]


def test_kick_says_bye_and_announces_and_the_loop_sends_it() -> None:
    console = Console(broker())
    reply, answer = ask(console, type="kick", name="BOB", reason="spam")
    assert reply == {"type": "result"}
    byes = [o.body for o in answer.out if isinstance(o, Reply)]
    assert byes == [{"type": "bye", "reason": ByeReason.KICKED, "detail": "spam"}]
    (left,) = [o.body for o in answer.out if isinstance(o, Publish)]
    assert (left["name"], left["reason"]) == ("bob", LeaveReason.KICKED)
    reply, answer = ask(console, type="kick", name="nobody")
    assert reply["code"] == ErrorCode.NO_SUCH_USER and answer.out == []
    reply, _ = ask(console, type="kick")
    assert reply["code"] == ErrorCode.BAD_REQUEST


def test_say_release_shutdown_and_unknown() -> None:
    console = Console(broker())
    reply, answer = ask(console, type="say", text="maintenance at noon")
    (notice,) = [o.body for o in answer.out if isinstance(o, Publish)]
    assert notice["type"] == "notice" and notice["text"] == "maintenance at noon"
    assert ask(console, type="say", text="")[0]["code"] == ErrorCode.BAD_REQUEST
    assert ask(console, type="release")[0]["code"] == ErrorCode.BAD_REQUEST
    assert ask(console, type="release", name="alice")[0]["code"] == ErrorCode.NO_SUCH_USER
    reply, answer = ask(console, type="shutdown")
    assert reply == {"type": "result"} and answer.stop
    assert ask(console, type="reboot")[0]["code"] == ErrorCode.BAD_REQUEST
    garbled = msgpack.unpackb(console.answer(b"\xc1", T0).reply)
    assert garbled["code"] == ErrorCode.BAD_FRAME


def test_a_retried_command_is_answered_again_not_done_twice() -> None:
    state = broker()
    console = Console(state)
    first, answer = ask(console, type="say", text="once", id="c1")
    assert first["id"] == "c1" and answer.out
    again, answer = ask(console, type="say", text="once", id="c1")
    assert again == first and answer.out == []
    assert state.seq == 3  # two joins and one notice
    for n in range(CONTROL_IDS_KEPT):
        ask(console, type="who", id=f"w{n}")
    _, answer = ask(console, type="say", text="once", id="c1")
    assert answer.out  # forgotten: the cache is bounded


def test_a_message_event_carries_its_senders_address_for_the_screen() -> None:
    state = broker()
    out = state.handle(A, Say("hi"), T0 + 1)
    (event,) = [o for o in out if isinstance(o, Publish)]
    assert event.sender_addr == "10.0.0.1"
    assert "sender_addr" not in event.body  # never sent


def test_screen_lines() -> None:
    # Every line names its room (#room), then the event's seq in it.
    event = {"type": "message", "room": "dev", "seq": 4, "ts": T0, "from": "carol",
             "text": "hi\nthere"}
    assert screen_line(event, "12:00:00", "10.0.0.5") == (
        "12:00:00 #dev 4 10.0.0.5 <carol> hi\\nthere\n")
    action = {**event, "text": "/me waves"}
    assert screen_line(action, "12:00:00", None) == "12:00:00 #dev 4 ? * carol waves\n"
    left = {"type": "left", "room": "lobby", "seq": 5, "ts": T0, "name": "bob", "addr": "x",
            "reason": LeaveReason.KICKED, "detail": "spam", "by": "ann"}
    assert screen_line(left, "t") == "t #lobby 5 <-- bob (x) left [kicked by ann]: spam\n"
    topic = {"type": "topic", "room": "ops", "seq": 6, "ts": T0, "name": "ann", "text": "x"}
    assert screen_line(topic, "t") == "t #ops 6 *** ann set the topic: x\n"


def test_a_screen_gathers_lines_and_writes_once() -> None:
    out = io.StringIO()
    screen = Screen(out)
    for seq in (1, 2):
        screen.add({"type": "notice", "seq": seq, "ts": T0, "text": f"n{seq}"})
    assert out.getvalue() == ""
    screen.flush()
    assert out.getvalue().count("*** notice") == 2
    quiet = Screen(None)
    quiet.add({"type": "notice", "seq": 1, "ts": T0, "text": "x"})
    quiet.flush()
    assert not quiet.on


def test_a_screen_nobody_reads_drops_lines_and_says_so_without_blocking() -> None:
    r, w = os.pipe()
    try:
        with os.fdopen(w, "w", closefd=False) as writer:
            screen = Screen(writer, backlog=4096)
            line = {"type": "notice", "seq": 1, "ts": T0, "text": "x" * 200}
            for _ in range(2000):  # far more than a pipe holds: never blocks
                screen.add(line)
                screen.flush()
            assert screen._dropped > 0
            while os.read(r, 1 << 16):  # the reader catches up
                if not screen._pending:
                    break
                screen.flush()
            screen.add(line)
            screen.flush()
        told = b""
        os.set_blocking(r, False)
        try:
            while chunk := os.read(r, 1 << 16):
                told += chunk
        except BlockingIOError:
            pass
        assert b"the screen fell behind" in told
    finally:
        os.close(r)
        os.close(w)


def test_publish_topic_is_the_room() -> None:
    out = broker().handle(A, Say("x"), T0 + 1)
    assert any(isinstance(o, Publish) and o.topic == ROOM_TOPIC for o in out)
