"""Rooms (protocol v2) in zchat.state.Broker: every request and every private-room rule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from zchat.errors import ProtocolError
from zchat.history import SqliteHistory
from zchat.protocol import (
    BROKER_TOPIC,
    Ban,
    Deop,
    Enter,
    GetHistory,
    Invite,
    Join,
    KickFrom,
    Leave,
    ListRooms,
    Op,
    Part,
    Ping,
    Say,
    SetMode,
    SetTopic,
    Unban,
    Who,
    check_room,
    decode_request,
    encode,
    room_topic,
)
from zchat.state import Broker, Deliver, Limits, Outgoing, Publish, Reply

T0 = 1_000_000.0
A, B, C, D = b"peer-a", b"peer-b", b"peer-c", b"peer-d"


def make(history: Any = None, **limits: Any) -> Broker:
    return Broker(heartbeat=1.0, limits=Limits(**limits), now=T0, epoch="e1", history=history)


def replies(out: list[Outgoing], peer: bytes) -> list[dict[str, Any]]:
    return [o.body for o in out if isinstance(o, Reply) and o.peer == peer]


def reply(out: list[Outgoing], peer: bytes) -> dict[str, Any]:
    return replies(out, peer)[-1]


def public(out: list[Outgoing], room: str) -> list[dict[str, Any]]:
    return [o.body for o in out if isinstance(o, Publish) and o.topic == room_topic(room)]


def delivered(out: list[Outgoing]) -> list[Deliver]:
    return [o for o in out if isinstance(o, Deliver)]


def everything(out: list[Outgoing]) -> list[bytes]:
    """Every frame of ``out`` that goes to PUB, packed: what a SUB on '' could see."""
    return [o.topic + encode(o.body) for o in out if isinstance(o, Publish)]


def join(broker: Broker, peer: bytes, name: str, **kw: Any) -> dict[str, Any]:
    return reply(broker.handle(peer, Join(name, **kw), T0, addr="10.0.0.1"), peer)


def setup(*names: str) -> Broker:
    broker = make()
    for peer, name in zip((A, B, C, D), names, strict=False):
        join(broker, peer, name)
    return broker


def test_room_names_fold_and_are_checked() -> None:
    assert check_room("Dev-Team_2.x") == "dev-team_2.x"
    for bad in ("", "#dev", "-dev", ".dev", "a b", "x" * 65, "caf\u00e9", "\u212aelvin"):
        with pytest.raises(ProtocolError) as info:
            check_room(bad)
        assert info.value.code == "bad_room"
    assert check_room("x" * 64) == "x" * 64


def test_v2_requests_parse_from_the_wire() -> None:
    assert decode_request(encode({"type": "enter", "room": "Dev", "private": True})) == Enter(
        "Dev", True)
    assert decode_request(encode({"type": "kick", "room": "d", "name": "n", "reason": "r"})) == \
        KickFrom("d", "n", "r")
    assert decode_request(encode({"type": "rooms", "id": "x"})) == ListRooms("x")
    with pytest.raises(ProtocolError):
        decode_request(encode({"type": "mode", "room": "d", "private": 1}))


def test_enter_creates_a_room_its_creator_operates() -> None:
    broker = setup("alice", "bob")
    out = broker.handle(A, Enter("Dev", id="e"), T0)
    entered = reply(out, A)
    assert entered == {"type": "entered", "id": "e", "room": "dev", "seq": 1, "topic": "",
                       "count": 1, "members": [{"name": "alice", "addr": "10.0.0.1"}],
                       "ops": ["alice"], "private": False, "moderated": False,
                       "topic_ops": True}
    assert public(out, "dev") == [{"type": "joined", "room": "dev", "seq": 1, "ts": T0,
                                   "name": "alice", "addr": "10.0.0.1"}]
    out = broker.handle(B, Enter("dev"), T0)
    assert reply(out, B)["ops"] == ["alice"] and reply(out, B)["count"] == 2
    # Entering again answers again and announces nothing.
    again = broker.handle(B, Enter("DEV"), T0)
    assert reply(again, B)["seq"] == 2 and public(again, "dev") == []
    assert broker.rooms_of("bob") == ["lobby", "dev"]


def test_per_room_seq_history_and_lobby_default() -> None:
    broker = setup("alice", "bob")
    broker.handle(A, Enter("dev"), T0)
    out = broker.handle(A, Say("in dev", room="dev", id="m"), T0)
    assert reply(out, A) == {"type": "ack", "id": "m", "seq": 2, "room": "dev"}
    out = broker.handle(A, Say("in lobby"), T0)
    assert reply(out, A)["room"] == "lobby" and reply(out, A)["seq"] == 3
    page = reply(broker.handle(B, GetHistory(0, room="dev"), T0), B)
    assert page["room"] == "dev"
    assert [(e["seq"], e["type"]) for e in page["events"]] == [(1, "joined"), (2, "message")]
    # Bob is not in dev: he may read a public room, not speak in it.
    err = reply(broker.handle(B, Say("x", room="dev", id="n"), T0), B)
    assert (err["code"], err["room"], err["id"]) == ("not_in_room", "dev", "n")
    assert reply(broker.handle(B, Say("x", room="nope"), T0), B)["code"] == "no_such_room"
    assert reply(broker.handle(B, Say("x", room="#bad"), T0), B)["code"] == "bad_room"
    # The dedupe of a resend answers with the room and seq it got.
    assert reply(broker.handle(A, Say("in dev", room="dev", id="m"), T0), A)["seq"] == 2


def test_join_with_rooms_enters_them_and_refuses_some() -> None:
    broker = setup("alice")
    broker.handle(A, Enter("secret", private=True), T0)
    broker.handle(A, Enter("dev"), T0)
    welcome = join(broker, B, "bob", rooms=["Dev", "secret", "#no", 5, "dev"])
    assert welcome["rooms"] == ["dev"]
    assert welcome["room"] == "dev"  # not in lobby: the first room it entered
    assert welcome["count"] == 2
    assert welcome["refused"] == [{"room": "secret", "code": "forbidden"},
                                  {"room": "#no", "code": "bad_room"},
                                  {"room": "5", "code": "bad_room"}]
    welcome = join(broker, C, "carol")
    assert (welcome["rooms"], welcome["room"]) == (["lobby"], "lobby")
    assert "refused" not in welcome


def test_welcome_and_entered_list_at_most_100_members() -> None:
    broker = make(join_rate=0, announce_max=50)
    for i in range(130):
        join(broker, b"p%d" % i, f"u{i}")
    welcome = join(broker, b"last", "last")
    assert len(welcome["members"]) == 100 and welcome["count"] == 131
    # Once a room holds more than announce_max, joins are not announced (nor seq'd).
    assert broker.seq == 50


def test_part_and_left_reason() -> None:
    broker = setup("alice", "bob")
    broker.handle(A, Enter("dev"), T0)
    broker.handle(B, Enter("dev"), T0)
    out = broker.handle(B, Part("dev", reason="bye", id="p"), T0)
    assert reply(out, B) == {"type": "parted", "id": "p", "room": "dev"}
    (left,) = public(out, "dev")
    assert (left["reason"], left["detail"], left["name"]) == ("part", "bye", "bob")
    assert reply(broker.handle(B, Part("dev"), T0), B)["code"] == "not_in_room"
    # A part frees a place: the limit counts lobby.
    broker = make(rooms_per_client=2)
    join(broker, A, "alice")
    broker.handle(A, Enter("one"), T0)
    assert reply(broker.handle(A, Enter("two"), T0), A)["code"] == "too_many_rooms"
    broker.handle(A, Part("lobby"), T0)
    assert reply(broker.handle(A, Enter("two"), T0), A)["type"] == "entered"


def test_rooms_in_all_are_limited() -> None:
    broker = make(rooms_total=2)
    join(broker, A, "alice")
    broker.handle(A, Enter("one"), T0)
    err = reply(broker.handle(A, Enter("two"), T0), A)
    assert (err["code"], err["room"]) == ("too_many_rooms", "two")
    assert reply(broker.handle(A, Enter("x" * 10), T0), A)["code"] == "too_many_rooms"
    short = make(room_chars=8)
    join(short, A, "alice")
    assert reply(short.handle(A, Enter("x" * 9), T0), A)["code"] == "bad_room"


def test_leaving_the_broker_leaves_every_room() -> None:
    broker = setup("alice", "bob")
    broker.handle(A, Enter("dev"), T0)
    broker.handle(B, Enter("dev"), T0)
    out = broker.handle(B, Leave(), T0)
    assert [e["reason"] for e in public(out, "dev")] == ["leave"]
    assert [e["reason"] for e in public(out, "lobby")] == ["leave"]
    out = broker.tick(T0 + 10)
    assert [e["reason"] for e in public(out, "dev")] == ["timeout"]


def test_rooms_lists_public_rooms_and_own_private_ones() -> None:
    broker = setup("alice", "bob")
    broker.handle(A, Enter("dev"), T0)
    broker.handle(A, SetTopic("dev", "code"), T0)
    broker.handle(A, Enter("secret", private=True), T0)
    broker.handle(A, Part("dev"), T0)
    mine = reply(broker.handle(A, ListRooms(), T0), A)["rooms"]
    assert {r["name"] for r in mine} == {"lobby", "dev", "secret"}
    theirs = reply(broker.handle(B, ListRooms(), T0), B)["rooms"]
    assert theirs == [{"name": "lobby", "topic": "", "count": 2, "private": False},
                      {"name": "dev", "topic": "code", "count": 0, "private": False}]


def test_topic_needs_an_operator_while_topic_ops_is_on() -> None:
    broker = setup("alice", "bob")
    broker.handle(A, Enter("dev"), T0)
    broker.handle(B, Enter("dev"), T0)
    err = reply(broker.handle(B, SetTopic("dev", "mine"), T0), B)
    assert (err["code"], err["room"]) == ("forbidden", "dev")
    out = broker.handle(A, SetTopic("dev", "ours", id="t"), T0)
    (event,) = public(out, "dev")
    assert (event["type"], event["name"], event["text"]) == ("topic", "alice", "ours")
    assert reply(out, A) == {"type": "ack", "id": "t", "room": "dev", "seq": event["seq"]}
    out = broker.handle(A, SetMode("dev", topic_ops=False), T0)
    assert public(out, "dev")[0]["topic_ops"] is False
    assert reply(broker.handle(B, SetTopic("dev", "mine"), T0), B)["type"] == "ack"
    assert reply(broker.handle(B, Enter("dev"), T0), B)["topic"] == "mine"


def test_mode_changes_are_announced_once() -> None:
    broker = setup("alice", "bob")
    broker.handle(A, Enter("dev"), T0)
    broker.handle(B, Enter("dev"), T0)
    assert reply(broker.handle(B, SetMode("dev", moderated=True), T0), B)["code"] == "forbidden"
    out = broker.handle(A, SetMode("dev", moderated=True, topic_ops=True), T0)
    (event,) = public(out, "dev")
    assert {k: event[k] for k in ("type", "name", "moderated")} == {
        "type": "mode", "name": "alice", "moderated": True}
    assert "topic_ops" not in event  # unchanged: not in the event
    again = broker.handle(A, SetMode("dev", moderated=True, id="z"), T0)
    assert public(again, "dev") == [] and reply(again, A) == {
        "type": "ack", "id": "z", "room": "dev"}
    # Moderated: only operators speak.
    assert reply(broker.handle(B, Say("x", room="dev"), T0), B)["code"] == "forbidden"
    assert reply(broker.handle(A, Say("x", room="dev"), T0), A)["type"] == "ack"


def test_op_deop_and_operator_status_ends_with_the_connection_in_the_room() -> None:
    broker = setup("alice", "bob")
    broker.handle(A, Enter("dev"), T0)
    broker.handle(B, Enter("dev"), T0)
    assert reply(broker.handle(B, Op("dev", "bob"), T0), B)["code"] == "forbidden"
    out = broker.handle(A, Op("dev", "Bob"), T0)
    assert public(out, "dev")[0]["op"] == "bob"
    assert reply(broker.handle(A, Op("dev", "ghost"), T0), A)["code"] == "no_such_user"
    out = broker.handle(B, Deop("dev", "alice"), T0)
    assert public(out, "dev")[0]["deop"] == "alice"
    assert reply(broker.handle(A, SetTopic("dev", "x"), T0), A)["code"] == "forbidden"
    # Bob parts: his status is gone, re-entering does not restore it; the
    # room has no operator until the broker's operator names one.
    broker.handle(B, Part("dev"), T0)
    assert reply(broker.handle(B, Enter("dev"), T0), B)["ops"] == []
    out = broker.name_op("dev", "alice", T0)
    assert public(out, "dev")[0] == {**public(out, "dev")[0], "name": "*", "op": "alice"}
    assert reply(broker.handle(A, Enter("dev"), T0), A)["ops"] == ["alice"]


def test_operator_status_survives_a_takeover_with_the_token() -> None:
    broker = setup("alice")
    token = join(broker, B, "bob")["token"]
    broker.handle(B, Enter("dev"), T0)
    welcome = join(broker, C, "bob", token=token)
    assert "dev" in welcome["rooms"]
    assert reply(broker.handle(C, SetTopic("dev", "still op"), T0), C)["type"] == "ack"


def test_curve_operator_status_belongs_to_the_key() -> None:
    broker = make()
    broker.handle(A, Join("alice"), T0, "10.0.0.1", "KEY-A")
    broker.handle(A, Enter("dev"), T0, "", "KEY-A")
    broker.handle(A, Leave(), T0, "", "KEY-A")
    broker.handle(B, Join("alice"), T0, "10.0.0.1", "KEY-A")
    entered = reply(broker.handle(B, Enter("dev"), T0, "", "KEY-A"), B)
    assert entered["ops"] == ["alice"]


def test_kick_with_reason_and_by() -> None:
    broker = setup("alice", "bob")
    broker.handle(A, Enter("dev"), T0)
    broker.handle(B, Enter("dev"), T0)
    assert reply(broker.handle(B, KickFrom("dev", "alice"), T0), B)["code"] == "forbidden"
    out = broker.handle(A, KickFrom("dev", "BOB", "spam", id="k"), T0)
    (left,) = public(out, "dev")
    assert (left["reason"], left["by"], left["detail"], left["name"]) == (
        "kicked", "alice", "spam", "bob")
    assert reply(out, A)["id"] == "k"
    assert broker.rooms_of("bob") == ["lobby"]
    # A kick is no ban: bob may come back.
    assert reply(broker.handle(B, Enter("dev"), T0), B)["type"] == "entered"


def test_ban_removes_and_keeps_out_unban_lets_in() -> None:
    broker = setup("alice", "bob")
    broker.handle(A, Enter("dev"), T0)
    broker.handle(B, Enter("dev"), T0)
    out = broker.handle(A, Ban("dev", "Bob"), T0)
    mode, left = public(out, "dev")
    assert (mode["type"], mode["ban"]) == ("mode", "Bob")
    assert (left["reason"], left["by"]) == ("banned", "alice")
    assert reply(broker.handle(B, Enter("dev"), T0), B)["code"] == "forbidden"
    assert public(broker.handle(A, Ban("dev", "bob"), T0), "dev") == []  # already banned
    assert reply(broker.handle(A, Ban("dev", "two words"), T0), A)["code"] == "bad_name"
    out = broker.handle(A, Unban("dev", "BOB"), T0)
    assert public(out, "dev")[0]["unban"] == "Bob"
    assert reply(broker.handle(B, Enter("dev"), T0), B)["type"] == "entered"


def test_invite_to_a_public_room_by_anyone() -> None:
    broker = setup("alice", "bob", "carol")
    broker.handle(A, Enter("dev"), T0)
    broker.handle(B, Enter("dev"), T0)
    out = broker.handle(B, Invite("dev", "carol", id="i"), T0)
    assert reply(out, C) == {"type": "invited", "room": "dev", "from": "bob"}
    assert reply(out, B) == {"type": "ack", "id": "i", "room": "dev"}
    assert reply(broker.handle(B, Invite("dev", "ghost"), T0), B)["code"] == "no_such_user"


def test_private_room_is_invisible_to_outsiders() -> None:
    broker = setup("alice", "bob", "carol")
    out = broker.handle(A, Enter("Secret", private=True), T0)
    frames: list[bytes] = everything(out)
    broker.handle(B, Enter("secret"), T0)  # not invited
    assert reply(broker.handle(B, Enter("secret"), T0), B)["code"] == "forbidden"
    # Ops invite; the invitee enters (once), and the invitation is used up.
    assert reply(broker.handle(C, Invite("secret", "bob"), T0), C)["code"] == "not_in_room"
    out = broker.handle(A, Invite("secret", "bob"), T0)
    assert reply(out, B) == {"type": "invited", "room": "secret", "from": "alice"}
    out = broker.handle(B, Enter("secret"), T0)
    frames += everything(out)
    (joined,) = delivered(out)
    assert set(joined.peers) == {A, B} and joined.body["name"] == "bob"
    # Every request from an outsider: not_in_room, as for a room it left.
    for request in (Say("x", room="secret"), GetHistory(0, room="secret"),
                    Who(room="secret"), SetTopic("secret", "x"), SetMode("secret", moderated=True),
                    Op("secret", "carol"), Deop("secret", "alice"), KickFrom("secret", "bob"),
                    Ban("secret", "bob"), Unban("secret", "bob"), Invite("secret", "carol"),
                    Part("secret")):
        err = reply(broker.handle(C, request, T0), C)
        assert (err["code"], err["room"]) == ("not_in_room", "secret"), request
    assert reply(broker.handle(C, Enter("secret"), T0), C)["code"] == "forbidden"
    assert "secret" not in str(reply(broker.handle(C, ListRooms(), T0), C))
    # Its events go to members' DEALERs only, never PUB (heartbeats included).
    out = broker.handle(A, Say("psst", room="secret"), T0)
    frames += everything(out)
    (message,) = delivered(out)
    assert set(message.peers) == {A, B}
    out = broker.handle(A, KickFrom("secret", "bob"), T0)
    (left,) = delivered(out)
    assert B in left.peers  # the kicked member learns it there too
    frames += everything(out) + everything(broker.tick(T0 + 0.5))
    frames += everything(broker.handle(A, Leave(), T0))
    assert frames and not any(b"secret" in frame for frame in frames)
    pong = reply(broker.handle(C, Ping(), T0), C)
    assert "secret" not in pong.get("seqs", {})


def test_making_a_room_private_moves_its_events_off_pub() -> None:
    broker = setup("alice", "bob", "carol")
    broker.handle(A, Enter("dev"), T0)
    broker.handle(B, Enter("dev"), T0)
    out = broker.handle(A, SetMode("dev", private=True), T0)
    (mode,) = delivered(out)
    assert set(mode.peers) == {A, B} and mode.body["private"] is True
    assert public(out, "dev") == []
    assert reply(broker.handle(C, Enter("dev"), T0), C)["code"] == "forbidden"
    out = broker.handle(A, SetMode("dev", private=False), T0)
    assert public(out, "dev")[0]["private"] is False
    # lobby always exists and is public, whoever operates it.
    broker.name_op("lobby", "alice", T0)
    err = reply(broker.handle(A, SetMode("lobby", private=True), T0), A)
    assert (err["code"], err["room"]) == ("forbidden", "lobby")


def test_who_pages_by_folded_name() -> None:
    broker = make(join_rate=0, query_rate=0)
    names = [f"user{i:02d}" for i in range(25)]
    for i, name in enumerate(reversed(names)):
        join(broker, b"p%d" % i, name)
    seen: list[str] = []
    after: str | None = None
    while True:
        page = reply(broker.handle(b"p0", Who(after=after, limit=10), T0), b"p0")
        assert page["count"] == 25 and page["room"] == "lobby"
        seen += [m["name"] for m in page["members"]]
        if "next" not in page:
            break
        after = page["next"]
    assert seen == names
    assert len(reply(broker.handle(b"p0", Who(), T0), b"p0")["members"]) == 25
    assert reply(broker.handle(b"p0", Who(after=3), T0), b"p0")["code"] == "bad_request"
    broker.handle(b"p0", Enter("dev"), T0)
    page = reply(broker.handle(b"p1", Who(room="dev"), T0), b"p1")  # public: readable
    assert [m["name"] for m in page["members"]] == ["user24"]


def test_pong_and_heartbeat_carry_room_seqs() -> None:
    broker = setup("alice")
    broker.handle(A, Enter("dev"), T0)
    broker.handle(A, Say("x", room="dev"), T0)
    pong = reply(broker.handle(A, Ping(), T0), A)
    assert pong["seqs"] == {"lobby": 1, "dev": 2}
    (beat,) = [o.body for o in broker.tick(T0) if isinstance(o, Publish)
               and o.topic == BROKER_TOPIC]
    assert beat["seqs"] == {"lobby": 1, "dev": 2}
    (beat,) = [o.body for o in broker.tick(T0 + 1) if isinstance(o, Publish)
               and o.topic == BROKER_TOPIC]
    assert beat["seqs"] == {"lobby": 1}  # dev was quiet


def test_enter_and_part_churn_is_budgeted() -> None:
    broker = make(query_rate=1.0, query_burst=3)
    join(broker, A, "alice")
    codes = [reply(broker.handle(A, Enter(f"r{i}") if i % 2 == 0 else Part(f"r{i - 1}"), T0),
                   A).get("code") for i in range(6)]
    assert codes[:3] == [None, None, None] and "rate_limited" in codes[3:]


def test_expiry_waits_a_heartbeat_past_the_loop_catching_up() -> None:
    broker = setup("alice")  # heartbeat 1 s: silent for 3 s is gone
    broker.lagged(T0 + 10)  # the loop was behind its input until now
    assert broker.tick(T0 + 10.5)[-1].body["type"] == "heartbeat"
    assert broker.next_deadline() == T0 + 11  # no wake-up for an expiry it may not do
    assert len(broker) == 1
    broker.handle(A, Ping(), T0 + 10.6)  # its ping, read once caught up
    broker.tick(T0 + 11.5)
    assert len(broker) == 1
    out = broker.tick(T0 + 14)  # really silent since: gone
    assert [o.body["reason"] for o in out if o.body["type"] == "left"] == ["timeout"]


def test_close_room_says_why_and_forgets_it_but_not_its_seq() -> None:
    broker = setup("alice", "bob")
    broker.handle(A, Enter("dev"), T0)
    broker.handle(B, Enter("dev"), T0)
    out = broker.close_room("dev", T0, "spam")
    notice, *lefts = public(out, "dev")
    assert "spam" in notice["text"]
    assert [e["reason"] for e in lefts] == ["closed", "closed"]
    assert broker.rooms_of("alice") == ["lobby"]
    assert reply(broker.handle(A, GetHistory(0, room="dev"), T0), A)["code"] == "no_such_room"
    entered = reply(broker.handle(A, Enter("dev"), T0), A)
    assert entered["seq"] == 6  # goes on: no seq given twice in an epoch
    with pytest.raises(ProtocolError):
        broker.close_room("lobby", T0)


def test_rooms_settings_bans_and_seqs_survive_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    broker = make(SqliteHistory(path))
    join(broker, A, "alice")
    broker.handle(A, Enter("dev"), T0)
    broker.handle(A, SetTopic("dev", "kept"), T0)
    broker.handle(A, SetMode("dev", moderated=True), T0)
    broker.handle(A, Ban("dev", "mallory"), T0)
    broker.handle(A, Enter("secret", private=True), T0)
    broker.handle(A, Say("hidden", room="secret", id="s1"), T0)
    broker.store.commit()
    broker.store.close()
    again = make(SqliteHistory(path))
    assert again.room_seq("dev") == 4 and again.room_seq("secret") == 2
    join(again, B, "bob")
    entered = reply(again.handle(B, Enter("dev"), T0), B)
    assert (entered["topic"], entered["moderated"], entered["seq"]) == ("kept", True, 5)
    assert reply(again.handle(B, Enter("secret"), T0), B)["code"] == "forbidden"
    join(again, C, "mallory")
    assert reply(again.handle(C, Enter("dev"), T0), C)["code"] == "forbidden"
    events = again.history(0, room="secret")
    assert [e["text"] for e in events if e["type"] == "message"] == ["hidden"]
    again.store.close()


def test_v2_replies_are_typed_from_what_the_broker_sends() -> None:
    from zchat.protocol import (
        Ack,
        Entered,
        ErrorReply,
        Invited,
        Members,
        Parted,
        Pong,
        RoomInfo,
        RoomList,
        Welcome,
        parse_reply,
    )

    broker = setup("alice", "bob")
    broker.handle(A, Enter("secret", private=True), T0)
    welcome = parse_reply(join(broker, C, "carol", rooms=["secret", "dev"]))
    assert isinstance(welcome, Welcome)
    assert (welcome.rooms, welcome.count, [r.room for r in welcome.refused]) == (
        ("dev",), 1, ["secret"])
    entered = parse_reply(reply(broker.handle(A, Enter("dev"), T0), A))
    assert isinstance(entered, Entered) and entered.count == 2 and entered.topic_ops
    out = broker.handle(A, Invite("secret", "bob", id="i"), T0)
    assert parse_reply(reply(out, B)) == Invited("secret", "alice")
    assert parse_reply(reply(out, A)) == Ack(None, "i", "secret")
    ack = parse_reply(reply(broker.handle(A, Say("x", room="dev"), T0), A))
    assert isinstance(ack, Ack) and (ack.room, ack.seq) == ("dev", 3)
    pong = parse_reply(reply(broker.handle(A, Ping(), T0), A))
    assert isinstance(pong, Pong) and pong.seqs == {"lobby": 2, "secret": 1, "dev": 3}
    page = parse_reply(reply(broker.handle(A, Who(room="dev", limit=1), T0), A))
    assert isinstance(page, Members) and (page.room, page.count, page.next) == (
        "dev", 2, "alice")
    rooms = parse_reply(reply(broker.handle(B, ListRooms(), T0), B))
    assert isinstance(rooms, RoomList)
    assert rooms.rooms[1] == RoomInfo("dev", "", 2, False)
    assert parse_reply(reply(broker.handle(A, Part("dev", id="p"), T0), A)) == Parted("dev", "p")
    error = parse_reply(reply(broker.handle(B, Say("x", room="secret"), T0), B))
    assert isinstance(error, ErrorReply) and (error.code, error.room) == (
        "not_in_room", "secret")
