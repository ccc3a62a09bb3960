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
    limits = broker.limits
    assert (welcome["rate"], welcome["burst"]) == (limits.rate, limits.burst)  # to pace by


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
        assert replies(out, A) == [{"type": "ack", "id": str(i), "seq": seqs[-1],
                                        "room": "lobby"}]
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
    assert replies(again) == [{"type": "ack", "id": "m1", "seq": seq, "room": "lobby"}]


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


# ------------------------------------------------------------ hostile peers (issue 9)


@pytest.mark.parametrize("token", ["é", "\udcff", "", "x" * 10_000, None, "\x00"])
def test_any_token_is_name_taken_never_an_exception(token: str | None) -> None:
    broker = make()
    join(broker, A, "x")
    assert join(broker, B, "x", token=token)["code"] == "name_taken"
    assert broker.name_of(A) == "x"


def test_a_routing_id_reused_after_disconnect_is_a_stranger() -> None:
    broker = make()
    token = join(broker, A, "alice")["token"]
    broker.handle(A, Say("x", id="m1"), T0)
    assert broker.disconnected(A, T0 + 0.1) == []
    # Still in the room, resumable; but A is nobody now.
    assert [m["name"] for m in broker.members()] == ["alice"]
    assert not broker.is_member(A)
    for request in (Say("as alice"), SendDm("alice", "hi"), Who(), Leave()):
        (reply,) = replies(broker.handle(A, request, T0 + 0.2))
        assert reply["code"] == "not_joined"
    assert join(broker, A, "mallory")["type"] == "welcome"  # a stranger may join as itself
    broker.handle(A, Leave(), T0 + 0.3)
    assert join(broker, A, "alice")["code"] == "name_taken"
    # Alice comes back with her token on a new connection: same session.
    out = broker.handle(B, Join("alice", token=token), T0 + 0.5, addr="10.0.0.5")
    assert replies(out, A) == []  # no bye to a connection that is gone
    assert replies(out, B)[-1]["token"] == token
    again = broker.handle(B, Say("x", id="m1"), T0 + 0.6)
    assert published(again) == []  # her dedupe ids came along


def test_a_detached_member_times_out_and_can_be_kicked_or_shut_down() -> None:
    broker = make()
    broker.tick(T0)
    join(broker, A, "a")
    join(broker, B, "b")
    join(broker, C, "c")
    for peer in (A, B, C):
        broker.disconnected(peer, T0)
    assert replies(broker.kick("b", T0)) == []
    out = broker.tick(T0 + 3.01)
    assert [e["name"] for e in published(out)] == ["a", "c"]
    assert len(broker) == 0
    join(broker, A, "d", now=T0 + 4)
    broker.disconnected(A, T0 + 4)
    out = broker.shutdown(T0 + 4)
    assert replies(out) == []
    assert published(out)[0]["name"] == "d"


def test_a_members_requests_must_come_with_its_key() -> None:
    broker = make()
    broker.handle(A, Join("alice"), T0, addr="10.0.0.1", key="KEY-A")
    for key in ("KEY-M", None):
        (reply,) = replies(broker.handle(A, Say("as alice"), T0, key=key))
        assert reply["code"] == "not_joined"
    assert replies(broker.handle(A, Say("me"), T0, key="KEY-A"))[0]["type"] == "ack"


def test_history_reply_is_bounded_in_bytes_and_pages_on() -> None:
    broker = make(page_bytes=64 * 1024, rate=0, query_rate=0)
    join(broker, A, "a")
    big = "\U0001f600" * 4096  # 16 KiB of UTF-8
    for _ in range(30):
        broker.handle(A, Say(big), T0)
    (reply,) = replies(broker.handle(A, GetHistory(0, limit=1000), T0))
    import msgpack
    assert len(msgpack.packb(reply["events"])) <= 64 * 1024 + 16
    assert 1 <= len(reply["events"]) < 31
    seen: list[int] = []
    after = 0
    while page := replies(broker.handle(A, GetHistory(after, limit=1000), T0))[0]["events"]:
        seen += [e["seq"] for e in page]
        after = page[-1]["seq"]
    assert seen == list(range(1, 32))
    # An event bigger than the budget still comes, alone: paging never stalls.
    tiny = make(page_bytes=100, rate=0, query_rate=0)
    join(tiny, A, "a")
    tiny.handle(A, Say("y" * 1000), T0)
    assert [e["seq"] for e in replies(tiny.handle(A, GetHistory(1), T0))[0]["events"]] == [2]


def test_history_and_who_draw_from_a_per_person_budget() -> None:
    broker = make(query_rate=5, query_burst=20)
    join(broker, A, "a")
    kinds = [replies(broker.handle(A, request, T0))[0]["type"]
             for request in [Who(), GetHistory(0)] * 15]
    assert kinds[:20] == ["members", "history"] * 10
    assert set(kinds[20:]) == {"error"}
    # Leaving and joining again does not refill it; time does.
    broker.handle(A, Leave(), T0)
    join(broker, A, "a", now=T0 + 0.1)
    assert replies(broker.handle(A, Who(), T0 + 0.1))[0]["code"] == "rate_limited"
    assert replies(broker.handle(A, Who(), T0 + 0.4))[0]["type"] == "members"


def test_message_rate_survives_leave_join_and_takeover() -> None:
    broker = make(rate=10, burst=20)
    token = join(broker, A, "a")["token"]
    assert all(replies(broker.handle(A, Say("x"), T0))[0]["type"] == "ack" for _ in range(20))
    broker.handle(A, Leave(), T0)
    join(broker, A, "a")
    assert replies(broker.handle(A, Say("x"), T0))[0]["code"] == "rate_limited"
    token = join(broker, B, "c")["token"]
    for _ in range(20):
        broker.handle(B, Say("x"), T0)
    broker.handle(C, Join("c", token=token), T0, addr="10.0.0.200")  # takeover, elsewhere
    assert replies(broker.handle(C, Say("x"), T0))[0]["code"] == "rate_limited"


def test_joins_are_budgeted_per_name_and_per_address() -> None:
    broker = make(join_rate=0.5, join_burst=5, per_address=3)
    kinds = []
    for _ in range(7):
        kinds.append(join(broker, A, "churn")["type"])
        broker.handle(A, Leave(), T0)
    assert kinds == ["welcome"] * 5 + ["error"] * 2
    assert join(broker, A, "churn", now=T0 + 2.0)["type"] == "welcome"  # 0.5/s
    broker.handle(A, Leave(), T0 + 2.0)
    # Many names from one address: the address has 3 persons' worth (15).
    fresh = []
    for i in range(20):
        fresh.append(broker.handle(A, Join(f"n{i}"), T0 + 2.0, addr="10.7.7.7")[-1].body["type"])
        broker.handle(A, Leave(), T0 + 2.0)
    assert fresh == ["welcome"] * 15 + ["error"] * 5
    # Another address is not affected.
    assert broker.handle(B, Join("other"), T0 + 2.0, addr="10.8.8.8")[-1].body["type"] == (
        "welcome")


def test_a_former_holder_of_a_name_cannot_poison_its_ids() -> None:
    broker = make()
    join(broker, A, "bob")  # eve, as bob
    broker.handle(A, Say("eve", id="1"), T0)
    broker.handle(A, Leave(), T0)
    join(broker, B, "bob")  # the real bob, no token
    out = broker.handle(B, Say("bob", id="1"), T0)
    assert published(out)[0]["text"] == "bob"


def test_message_and_dm_ids_are_separate() -> None:
    broker = make()
    join(broker, A, "a")
    join(broker, B, "b")
    broker.handle(A, SendDm("b", "psst", id="same"), T0)
    out = broker.handle(A, Say("public", id="same"), T0)
    assert published(out)[0]["text"] == "public"
    assert isinstance(replies(out, A)[0]["seq"], int)
    again = broker.handle(A, SendDm("b", "psst2", id="x"), T0)
    assert replies(again, B)[0]["text"] == "psst2"


def test_dedupe_is_bounded_across_all_senders() -> None:
    broker = make(dedupe=50, dedupe_total=200, rate=0, join_rate=0)
    for n in range(20):
        peer = b"p%d" % n
        join(broker, peer, f"u{n}")
        for i in range(50):
            broker.handle(peer, Say("x", id=str(i)), T0)
    assert broker.statistics(T0).dedupe_ids == 200
    # The most recent sender keeps its last ids.
    assert published(broker.handle(b"p19", Say("x", id="49"), T0)) == []


def test_curve_names_per_key_recycle_then_refuse() -> None:
    broker = make(names_per_key=3, join_rate=0)
    for i, name in enumerate(("n1", "n2", "n3")):
        peer = b"k%d" % i
        broker.handle(peer, Join(name), T0, addr="10.0.0.1", key="K")
    # All three held: a fourth is refused.
    (refused,) = replies(broker.handle(b"k9", Join("n4"), T0, addr="10.0.0.1", key="K"))
    assert refused["code"] == "too_many_names"
    # n1 left: the fourth name recycles it, and n1 is free for another key.
    broker.handle(b"k0", Leave(), T0, key="K")
    assert broker.handle(b"k9", Join("n4"), T0, addr="10.0.0.1", key="K")[-1].body["type"] == (
        "welcome")
    assert broker.handle(b"o", Join("n1"), T0, addr="10.0.0.2", key="O")[-1].body["type"] == (
        "welcome")
    # n2 is still K's.
    broker.handle(b"k1", Leave(), T0, key="K")
    assert replies(broker.handle(b"o2", Join("n2"), T0, addr="10.0.0.2", key="O"))[0][
        "code"] == "name_taken"


def test_curve_bindings_lapse_and_the_operator_can_release_one() -> None:
    broker = make(name_ttl=100.0)
    broker.handle(A, Join("alice"), T0, addr="10.0.0.1", key="KA")
    broker.handle(A, Leave(), T0 + 10, key="KA")
    (refused,) = replies(broker.handle(B, Join("alice"), T0 + 50, addr="10.0.0.2", key="KB"))
    assert refused["code"] == "name_taken"
    # Unused for longer than name_ttl since alice left: free.
    assert broker.handle(B, Join("alice"), T0 + 111, addr="10.0.0.2",
                         key="KB")[-1].body["type"] == "welcome"
    broker.handle(B, Leave(), T0 + 111, key="KB")
    assert broker.release("ALICE") == "KB"
    assert broker.handle(C, Join("alice"), T0 + 112, addr="10.0.0.3",
                         key="KC")[-1].body["type"] == "welcome"
    with pytest.raises(Exception, match="no_such_user"):
        broker.release("nobody")


def test_a_store_that_cannot_read_costs_one_request() -> None:
    from zchat.errors import HistoryError
    from zchat.history import MemoryHistory

    class Broken(MemoryHistory):
        def after(self, seq: int, limit: int, max_bytes: int = 0,
                  room: str = "lobby") -> list[dict[str, Any]]:
            raise HistoryError("disk image is malformed")

        def prune(self, now: float) -> None:
            raise HistoryError("disk image is malformed")

    broker = Broker(heartbeat=1.0, now=T0, history=Broken())
    join(broker, A, "a")
    (reply,) = replies(broker.handle(A, GetHistory(0, id="h"), T0))
    assert (reply["code"], reply["id"]) == ("unavailable", "h")
    assert published(broker.tick(T0 + 1), BROKER_TOPIC)  # prune failing stops nothing
    assert replies(broker.handle(A, Ping(), T0))[0]["type"] == "pong"


def test_rate_buckets_expire_once_full_again_and_are_bounded() -> None:
    broker = make(rate=10, burst=20, join_rate=0)
    for n in range(50):
        peer = b"x%d" % n
        broker.handle(peer, Join(f"u{n}"), T0, addr=f"10.1.{n}.1")
        broker.handle(peer, Say("x"), T0)
    assert broker.statistics(T0).buckets == 100  # a name and an address each
    # Two seconds on, every bucket is full again: each take drops old ones.
    for _ in range(60):
        broker.handle(b"x0", Say("x"), T0 + 3)
    assert broker.statistics(T0 + 3).buckets <= 3
