"""zchat.state.Broker: the broker's logic with time as a parameter, no sockets."""

from __future__ import annotations

from typing import Any

import pytest

from zchat.protocol import (
    BROKER_TOPIC,
    ROOM_TOPIC,
    GetHistory,
    Join,
    Leave,
    Ping,
    Say,
    SendDm,
    Who,
)
from zchat.state import Broker, Limits, Outgoing, Publish, Reply, TokenBucket

T0 = 1_000_000.0
A, B, C = b"peer-a", b"peer-b", b"peer-c"


def make(**limits: Any) -> Broker:
    return Broker(heartbeat=1.0, limits=Limits(**limits), pub="5556", now=T0, epoch="e1")


def replies(out: list[Outgoing], peer: bytes | None = None) -> list[dict[str, Any]]:
    return [o.body for o in out if isinstance(o, Reply) and (peer is None or o.peer == peer)]


def published(out: list[Outgoing], topic: bytes = ROOM_TOPIC) -> list[dict[str, Any]]:
    return [o.body for o in out if isinstance(o, Publish) and o.topic == topic]


def join(broker: Broker, peer: bytes, name: str, now: float = T0, **kw: Any) -> dict[str, Any]:
    out = broker.handle(peer, Join(name, **kw), now, addr=f"10.0.0.{peer[-1] % 250}")
    return replies(out, peer)[-1]


def test_join_welcomes_and_announces_with_address() -> None:
    broker = make()
    out = broker.handle(A, Join("alice", id="j"), T0, addr="10.1.2.3")
    (event,) = published(out)
    assert event == {"type": "joined", "room": "lobby", "seq": 1, "ts": T0,
                     "name": "alice", "addr": "10.1.2.3"}
    (welcome,) = replies(out, A)
    assert welcome["type"] == "welcome"
    assert welcome["id"] == "j"
    assert welcome["seq"] == 1  # counts our own joined event
    assert welcome["members"] == [{"name": "alice", "addr": "10.1.2.3"}]
    assert welcome["room"] == "lobby"
    assert welcome["pub"] == "5556"
    assert welcome["heartbeat"] == 1.0
    assert welcome["epoch"] == "e1"
    assert isinstance(welcome["token"], str) and len(welcome["token"]) >= 16


def test_names_are_unique_case_insensitively() -> None:
    broker = make()
    join(broker, A, "Alice")
    reply = join(broker, B, "ALICE")
    assert reply["type"] == "error"
    assert reply["code"] == "name_taken"
    assert len(broker) == 1


def test_bad_name_is_refused() -> None:
    broker = make()
    assert join(broker, A, "two words")["code"] == "bad_name"
    assert join(broker, A, "x" * 33)["code"] == "bad_name"
    assert len(broker) == 0


def test_only_join_and_ping_before_joining() -> None:
    broker = make()
    for request in (Say("hi", id="1"), Leave(), Who(), GetHistory(0), SendDm("x", "y")):
        (reply,) = replies(broker.handle(A, request, T0))
        assert reply["code"] == "not_joined"
    (pong,) = replies(broker.handle(A, Ping(id="p"), T0 + 2))
    assert pong == {"type": "pong", "ts": T0 + 2, "id": "p", "joined": False, "seq": 0}
    join(broker, A, "a")
    assert replies(broker.handle(A, Ping(), T0 + 3))[0]["joined"] is True


def test_seq_starts_at_one_and_rises_by_one_per_event() -> None:
    broker = make()
    join(broker, A, "a")
    join(broker, B, "b")
    seqs = []
    for i in range(5):
        out = broker.handle(A, Say(f"m{i}", id=str(i)), T0)
        seqs.append(published(out)[0]["seq"])
        assert replies(out, A) == [{"type": "ack", "id": str(i), "seq": seqs[-1]}]
    broker.handle(B, Leave(), T0)
    assert seqs == [3, 4, 5, 6, 7]
    assert broker.seq == 8


def test_message_event_carries_sender_from_routing_id_not_payload() -> None:
    broker = make()
    join(broker, A, "alice")
    (event,) = published(broker.handle(A, Say("hello"), T0 + 1))
    assert event == {"type": "message", "room": "lobby", "seq": 2, "ts": T0 + 1,
                     "from": "alice", "text": "hello"}


def test_text_limit_gives_too_large_and_delivers_nothing() -> None:
    broker = make(max_text=10)
    join(broker, A, "a")
    out = broker.handle(A, Say("x" * 11, id="big"), T0)
    assert published(out) == []
    assert replies(out) == [{"type": "error", "code": "too_large", "id": "big",
                             "detail": "text of 11 characters exceeds 10"}]
    assert published(broker.handle(A, Say("x" * 10), T0))


def test_zero_text_limit_turns_it_off() -> None:
    broker = make(max_text=0)
    join(broker, A, "a")
    assert published(broker.handle(A, Say("x" * 100_000), T0))


def test_duplicate_message_id_is_acked_with_original_seq_not_delivered_twice() -> None:
    broker = make()
    join(broker, A, "a")
    first = broker.handle(A, Say("once", id="m1"), T0)
    seq = replies(first)[0]["seq"]
    again = broker.handle(A, Say("once", id="m1"), T0 + 1)
    assert published(again) == []
    assert replies(again) == [{"type": "ack", "id": "m1", "seq": seq}]


def test_dedupe_survives_reconnect_and_takeover() -> None:
    broker = make()
    token = join(broker, A, "a")["token"]
    seq = replies(broker.handle(A, Say("x", id="m1"), T0))[0]["seq"]
    # Takeover from a new connection with the token.
    join(broker, B, "a", token=token)
    again = broker.handle(B, Say("x", id="m1"), T0)
    assert published(again) == []
    assert replies(again)[0]["seq"] == seq
    # After leaving, a join with the same token resumes the lineage.
    broker.handle(B, Leave(), T0)
    assert join(broker, C, "A", token=token)["token"] == token
    assert replies(broker.handle(C, Say("x", id="m1"), T0))[0]["seq"] == seq


def test_dedupe_memory_is_bounded_per_sender() -> None:
    broker = make(dedupe=1000)
    join(broker, A, "a")
    for i in range(1500):
        broker.handle(A, Say("x", id=f"id{i}"), T0 + i)
    # The last 1000 are remembered, the oldest forgotten.
    assert published(broker.handle(A, Say("x", id="id1499"), T0 + 2000)) == []
    assert published(broker.handle(A, Say("x", id="id600"), T0 + 2000)) == []
    assert published(broker.handle(A, Say("x", id="id0"), T0 + 2000)) != []


def test_takeover_with_token_replaces_old_connection() -> None:
    broker = make()
    token = join(broker, A, "alice")["token"]
    out = broker.handle(B, Join("alice", token=token), T0 + 1, addr="10.9.9.9")
    assert replies(out, A) == [{"type": "bye", "reason": "replaced"}]
    assert replies(out, B)[0]["type"] == "welcome"
    assert [e["type"] for e in published(out)] == ["joined"]
    assert not broker.is_member(A)
    assert broker.name_of(B) == "alice"
    assert replies(broker.handle(A, Say("ghost"), T0))[0]["code"] == "not_joined"


def test_takeover_with_wrong_token_is_name_taken() -> None:
    broker = make()
    join(broker, A, "alice")
    assert join(broker, B, "alice", token="wrong")["code"] == "name_taken"
    assert broker.name_of(A) == "alice"


def test_repeated_join_on_same_connection_is_idempotent() -> None:
    broker = make()
    first = join(broker, A, "alice")
    out = broker.handle(A, Join("alice"), T0)
    assert published(out) == []
    assert replies(out)[0]["token"] == first["token"]
    assert join(broker, A, "other")["code"] == "bad_request"


def test_who_lists_members() -> None:
    broker = make()
    join(broker, A, "a")
    join(broker, B, "b")
    (reply,) = replies(broker.handle(A, Who(id="w"), T0))
    assert reply["id"] == "w"
    assert [m["name"] for m in reply["members"]] == ["a", "b"]


def test_history_after_and_limit() -> None:
    broker = make()
    join(broker, A, "a")
    for i in range(10):
        broker.handle(A, Say(f"m{i}"), T0)
    (reply,) = replies(broker.handle(A, GetHistory(after=5, limit=3, id="h"), T0))
    assert reply["id"] == "h"
    assert [e["seq"] for e in reply["events"]] == [6, 7, 8]
    (reply,) = replies(broker.handle(A, GetHistory(after=0), T0))
    assert [e["seq"] for e in reply["events"]] == list(range(1, 12))
    (reply,) = replies(broker.handle(A, GetHistory(after=11), T0))
    assert reply["events"] == []
    (reply,) = replies(broker.handle(A, GetHistory(after=1, limit=-1), T0))
    assert reply["code"] == "bad_request"


def test_history_is_bounded_and_starts_at_oldest_kept() -> None:
    broker = make(history=5)
    join(broker, A, "a")
    for i in range(10):
        broker.handle(A, Say(f"m{i}"), T0)
    events = broker.history(after=0)
    assert [e["seq"] for e in events] == [7, 8, 9, 10, 11]
    assert [e["seq"] for e in broker.history(after=8)] == [9, 10, 11]


def test_dm_goes_to_the_receiver_only_never_published() -> None:
    broker = make()
    join(broker, A, "alice")
    join(broker, B, "bob")
    out = broker.handle(A, SendDm("BOB", "psst", id="d"), T0 + 3)
    assert published(out) == []
    assert replies(out, B) == [{"type": "dm", "from": "alice", "text": "psst", "ts": T0 + 3}]
    assert replies(out, A) == [{"type": "ack", "id": "d"}]
    again = broker.handle(A, SendDm("bob", "psst", id="d"), T0 + 4)
    assert replies(again, B) == []  # deduped
    (reply,) = replies(broker.handle(A, SendDm("nobody", "x", id="n"), T0))
    assert reply["code"] == "no_such_user"
    assert reply["id"] == "n"


def test_rate_limit_burst_then_sustained() -> None:
    broker = make(rate=10, burst=20)
    join(broker, A, "a")
    results = [replies(broker.handle(A, Say("x"), T0))[0]["type"] for _ in range(25)]
    assert results.count("ack") == 20
    assert results[20:] == ["error"] * 5
    # A second later, 10 more tokens.
    later = [replies(broker.handle(A, Say("x"), T0 + 1.0))[0]["type"] for _ in range(12)]
    assert later.count("ack") == 10
    # One client's limit never touches another's.
    join(broker, B, "b")
    assert replies(broker.handle(B, Say("x"), T0 + 1.0))[0]["type"] == "ack"


def test_rate_limited_message_is_not_delivered() -> None:
    broker = make(rate=1, burst=1)
    join(broker, A, "a")
    broker.handle(A, Say("1"), T0)
    out = broker.handle(A, Say("2", id="x"), T0)
    assert published(out) == []
    assert replies(out)[0]["code"] == "rate_limited"
    assert broker.statistics(T0).rate_limited == 1


def test_rate_zero_means_unlimited() -> None:
    bucket = TokenBucket(0, 1, T0)
    assert all(bucket.take(T0) for _ in range(1000))


def test_leave_announces_left_with_reason_and_detail() -> None:
    broker = make()
    join(broker, A, "a")
    out = broker.handle(A, Leave(reason="lunch"), T0 + 1)
    (event,) = published(out)
    assert event["type"] == "left"
    assert event["reason"] == "leave"
    assert event["detail"] == "lunch"
    assert event["addr"] == "10.0.0.97"
    assert replies(out) == []
    assert len(broker) == 0


def test_heartbeat_on_schedule_with_seqs_and_epoch() -> None:
    broker = make()
    beats = published(broker.tick(T0), BROKER_TOPIC)
    assert beats == [{"type": "heartbeat", "ts": T0, "seqs": {"lobby": 0}, "epoch": "e1"}]
    assert broker.tick(T0 + 0.5) == []
    assert broker.next_deadline() == T0 + 1.0
    join(broker, A, "a", now=T0 + 0.9)
    (beat,) = published(broker.tick(T0 + 1.0), BROKER_TOPIC)
    assert beat["seqs"] == {"lobby": 1}


def test_silent_client_times_out_after_three_intervals() -> None:
    broker = make()
    broker.tick(T0)
    join(broker, A, "a", now=T0)
    join(broker, B, "b", now=T0)
    broker.handle(B, Ping(), T0 + 2.5)  # b stays alive
    assert published(broker.tick(T0 + 2.9)) == []
    assert broker.next_deadline() <= T0 + 3.0
    out = broker.tick(T0 + 3.01)
    (left,) = published(out)
    assert left["name"] == "a"
    assert left["reason"] == "timeout"
    assert broker.is_member(B)
    assert broker.statistics(T0).timeouts == 1


def test_any_request_keeps_a_client_alive() -> None:
    broker = make()
    join(broker, A, "a", now=T0)
    for t in range(1, 10):
        broker.handle(A, Who(), T0 + t)
        assert published(broker.tick(T0 + t + 0.5)) == []
    assert broker.is_member(A)


def test_kick_says_bye_and_announces() -> None:
    broker = make()
    join(broker, A, "a")
    out = broker.kick("A", T0, reason="spam")
    assert replies(out, A) == [{"type": "bye", "reason": "kicked", "detail": "spam"}]
    (left,) = published(out)
    assert (left["reason"], left["detail"]) == ("kicked", "spam")
    with pytest.raises(Exception, match="no_such_user"):
        broker.kick("a", T0)


def test_notice_is_a_room_event() -> None:
    broker = make()
    (event,) = published(broker.notice("maintenance at noon", T0))
    assert event == {"type": "notice", "room": "lobby", "seq": 1, "ts": T0,
                     "text": "maintenance at noon"}


def test_shutdown_says_bye_to_everyone() -> None:
    broker = make()
    join(broker, A, "a")
    join(broker, B, "b")
    out = broker.shutdown(T0)
    assert replies(out, A) == [{"type": "bye", "reason": "shutdown"}]
    assert replies(out, B) == [{"type": "bye", "reason": "shutdown"}]
    assert [e["reason"] for e in published(out)] == ["shutdown", "shutdown"]
    assert published(out, BROKER_TOPIC) == [{"type": "shutdown", "reason": "shutdown"}]
    assert len(broker) == 0


def test_cloak_hides_addresses_from_clients_not_from_operator() -> None:
    broker = Broker(heartbeat=1.0, now=T0, cloak=lambda addr: "cloak-1")
    out = broker.handle(A, Join("a"), T0, addr="10.1.1.1")
    assert published(out)[0]["addr"] == "cloak-1"
    assert replies(out)[0]["addr"] == "cloak-1"
    assert broker.members() == [{"name": "a", "addr": "cloak-1"}]
    assert broker.members(real_addresses=True) == [{"name": "a", "addr": "10.1.1.1"}]


def test_statistics_count() -> None:
    broker = make()
    join(broker, A, "a")
    join(broker, B, "b")
    broker.handle(A, Say("x"), T0)
    broker.handle(A, SendDm("b", "y"), T0)
    broker.handle(C, Who(), T0)
    stats = broker.statistics(T0 + 10)
    assert (stats.members, stats.messages, stats.dms, stats.joins, stats.errors) == (2, 1, 1, 2, 1)
    assert stats.uptime == 10
    assert stats.seq == 3


def test_an_overlong_leave_reason_is_cut_to_the_text_limit() -> None:
    broker = make(max_text=10)
    join(broker, A, "a")
    (event,) = published(broker.handle(A, Leave(reason="x" * 100), T0))
    assert event["detail"] == "x" * 10


def test_with_keys_a_name_belongs_to_the_first_key() -> None:
    broker = make()
    broker.handle(A, Join("alice"), T0, addr="10.0.0.1", key="KEY-A")
    broker.handle(A, Leave(), T0, key="KEY-A")  # every request comes with its key
    # Another key cannot take the name, even once it is free.
    (refused,) = replies(broker.handle(B, Join("ALICE"), T0, addr="10.0.0.2", key="KEY-B"))
    assert (refused["code"], refused["detail"]) == (
        "name_taken", "'ALICE' is registered to another key")
    # The same key can, from anywhere.
    welcome = replies(broker.handle(C, Join("alice"), T0, addr="10.0.0.3", key="KEY-A"))[-1]
    assert welcome["type"] == "welcome"
