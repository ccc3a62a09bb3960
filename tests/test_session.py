"""zchat.session.Session with a fake clock: no sockets, milliseconds each."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zchat.errors import ClientClosed, HandshakeFailed, NameTaken, RequestFailed
from zchat.protocol import (
    BATCH_TOPIC,
    BROKER_TOPIC,
    HISTORY_PAGE_MAX,
    ROOM,
    ROOM_TOPIC,
    WHO_PAGE_MAX,
    ClientStatus,
    Direct,
    ErrorCode,
    Invited,
    Joined,
    Joins,
    Left,
    Member,
    Message,
    ModeChanged,
    TopicChanged,
    batch_topic,
    encode,
    room_topic,
)
from zchat.session import (
    EARLY_PING_SECONDS,
    FILL_RETRY_SECONDS,
    HANDSHAKE_TRIES,
    JOIN_ATTEMPT_SECONDS,
    LEAVE_WAIT_SECONDS,
    LOOK_BACK,
    RETRY_MIN,
    Action,
    Closed,
    CloseDealer,
    CloseSub,
    Emit,
    HandshakeFault,
    OpenDealer,
    OpenSub,
    Phase,
    Reject,
    RequestKind,
    Resolve,
    Send,
    Session,
    Status,
    Subscribe,
    Unsubscribe,
    Welcomed,
)

T0 = 1000.0
HB = 5.0


def sent(actions: list[Action]) -> list[dict[str, Any]]:
    return [a.body for a in actions if isinstance(a, Send)]


def items(actions: list[Action]) -> list[Any]:
    return [a.item for a in actions if isinstance(a, Emit)]


def statuses(actions: list[Action]) -> list[Status]:
    return [i for i in items(actions) if isinstance(i, Status)]


def welcome(rid: str | None, seq: int = 0, epoch: str = "e1", **extra: Any) -> list[bytes]:
    body: dict[str, Any] = {"type": "welcome", "name": "alice", "addr": "127.0.0.1",
                            "room": "lobby", "seq": seq, "pub": "5556", "heartbeat": HB,
                            "token": "tok", "epoch": epoch,
                            "members": [{"name": "alice", "addr": "127.0.0.1"}], **extra}
    if rid is not None:
        body["id"] = rid
    return [encode(body)]


def reply(**body: Any) -> list[bytes]:
    return [encode(body)]


def message(seq: int, text: str = "", sender: str = "bob") -> dict[str, Any]:
    return {"type": "message", "seq": seq, "ts": 1.0, "room": "lobby", "from": sender,
            "text": text or f"m{seq}"}


def room(event: dict[str, Any]) -> list[bytes]:
    return [ROOM_TOPIC, encode(event)]


def join_id(actions: list[Action]) -> str:
    (body,) = [b for b in sent(actions) if b["type"] == "join"]
    rid = body["id"]
    assert isinstance(rid, str)
    return rid


def joined(seq: int = 0, since: int | None = None, now: float = T0,
           **kw: Any) -> tuple[Session, list[Action]]:
    session = Session("alice", "tcp://127.0.0.1:5555", since=since, id_prefix="s", **kw)
    rid = join_id(session.start(now))
    out = session.reply_received(welcome(rid, seq), now)
    assert session.phase is Phase.JOINED
    return session, out


def fill_of(actions: list[Action]) -> dict[str, Any]:
    (body,) = [b for b in sent(actions) if b["type"] == "history"]
    return body


def delivered(actions: list[Action]) -> list[int]:
    return [i.seq for i in items(actions) if isinstance(i, Message | Joined | Left)]


# ------------------------------------------------------------------ joining


def test_start_opens_a_dealer_and_joins_with_token_and_since() -> None:
    session = Session("alice", "tcp://h:5555", token="t0", since=7)
    out = session.start(T0)
    assert isinstance(out[0], OpenDealer)
    (body,) = sent(out)
    assert (body["type"], body["name"], body["token"], body["since"]) == ("join", "alice", "t0", 7)
    assert session.phase is Phase.JOINING
    assert session.start(T0) == []  # once


def test_welcome_subscribes_says_connected_and_pings_early() -> None:
    session, out = joined(seq=4)
    (sub,) = [a for a in out if isinstance(a, OpenSub)]
    assert sub.endpoint == "tcp://127.0.0.1:5556"
    assert sub.topics == (ROOM_TOPIC, BROKER_TOPIC)
    assert [s.state for s in statuses(out)] == [ClientStatus.CONNECTED]
    assert isinstance(out[-1], Welcomed) and out[-1].welcome.seq == 4
    assert session.last_seq == 4  # no since: start at the head
    assert list(session.members) == ["alice"]
    assert session.deadline() == T0 + EARLY_PING_SECONDS
    assert sent(session.tick(T0 + EARLY_PING_SECONDS)) == [{"type": "ping"}]
    assert session.deadline() == T0 + EARLY_PING_SECONDS + HB


def test_a_batching_broker_is_subscribed_in_batches() -> None:
    session = Session("alice", "tcp://h:5555", broadcast="tcp://other:1")
    rid = join_id(session.start(T0))
    out = session.reply_received(welcome(rid, batch=True), T0)
    (sub,) = [a for a in out if isinstance(a, OpenSub)]
    assert (sub.endpoint, sub.topics) == ("tcp://other:1", (BATCH_TOPIC, BROKER_TOPIC))


def test_an_unanswered_join_is_retried_with_backoff_and_a_late_welcome_counts() -> None:
    session = Session("alice", "tcp://h:5555")
    first = join_id(session.start(T0))
    assert session.deadline() == T0 + JOIN_ATTEMPT_SECONDS
    assert session.tick(T0 + JOIN_ATTEMPT_SECONDS) == []
    assert session.phase is Phase.WAITING
    again_at = T0 + JOIN_ATTEMPT_SECONDS + RETRY_MIN
    assert session.deadline() == again_at
    # A slow broker's welcome to the first join, still on the same DEALER.
    out = session.reply_received(welcome(first), T0 + 2.1)
    assert session.phase is Phase.JOINED and isinstance(out[-1], Welcomed)


def test_each_attempt_has_its_own_id_and_a_stale_welcome_is_ignored() -> None:
    session = Session("alice", "tcp://h:5555")
    first = join_id(session.start(T0))
    session.tick(T0 + 2)
    out = session.tick(T0 + 2 + RETRY_MIN)
    assert isinstance(out[0], OpenDealer)
    second = join_id(out)
    assert second != first
    assert session.reply_received(welcome(first), T0 + 2.3) == []
    assert session.phase is Phase.JOINING
    # The backoff doubles.
    session.tick(T0 + 4.25)
    assert session.deadline() == pytest.approx(T0 + 4.25 + 2 * RETRY_MIN)


def test_a_rate_limited_join_waits_and_tries_again() -> None:
    session = Session("alice", "tcp://h:5555")
    rid = join_id(session.start(T0))
    out = session.reply_received(reply(type="error", code="rate_limited", detail="slow", id=rid),
                                 T0 + 0.01)
    assert not any(isinstance(a, Closed) for a in out)
    assert session.phase is Phase.WAITING
    again = session.tick(session.deadline())
    assert join_id(again) != rid


def test_a_refused_first_join_closes_with_the_specific_error() -> None:
    session = Session("alice", "tcp://h:5555")
    rid = join_id(session.start(T0))
    out = session.reply_received(reply(type="error", code="name_taken", detail="x", id=rid), T0)
    (closed,) = [a for a in out if isinstance(a, Closed)]
    assert isinstance(closed.error, NameTaken)
    assert session.closed and session.deadline() == float("inf")


def test_a_refused_rejoin_says_closed() -> None:
    session, _ = joined()
    session.reply_received(reply(type="pong", ts=1.0, joined=False), T0 + 1)
    rid = join_id(session.tick(T0 + 1))
    out = session.reply_received(reply(type="error", code="name_taken", detail="x", id=rid),
                                 T0 + 1)
    assert [s.state for s in statuses(out)] == [ClientStatus.CLOSED]
    assert isinstance(out[-1], Closed)


def test_a_welcome_missing_a_field_is_a_clean_failure_not_a_key_error() -> None:
    session = Session("alice", "tcp://h:5555")
    rid = join_id(session.start(T0))
    out = session.reply_received(reply(type="welcome", name="alice", id=rid), T0)
    (closed,) = [a for a in out if isinstance(a, Closed)]
    assert isinstance(closed.error, RequestFailed)
    assert closed.error.code == ErrorCode.BAD_REPLY


# ------------------------------------------------------------------ requests


def test_requests_wait_for_the_welcome_and_are_answered_by_id() -> None:
    session = Session("alice", "tcp://h:5555")
    rid = join_id(session.start(T0))
    assert session.submit("u1", RequestKind.MESSAGE, {"text": "hi"}, T0) == []
    out = session.reply_received(welcome(rid), T0)
    assert {"type": "message", "text": "hi", "id": "u1"} in sent(out)
    assert session.reply_received(reply(type="ack", seq=3, id="u1"), T0) == [Resolve("u1", 3)]
    assert session.reply_received(reply(type="ack", seq=3, id="u1"), T0) == []  # a duplicate
    session.submit("u2", RequestKind.DM, {"to": "zed", "text": "x"}, T0)
    (rejected,) = session.reply_received(
        reply(type="error", code="no_such_user", detail="", id="u2"), T0)
    assert isinstance(rejected, Reject) and rejected.error.__class__.__name__ == "NoSuchUser"
    session.submit("u3", RequestKind.WHO, {}, T0)
    (members,) = session.reply_received(
        reply(type="members", members=[{"name": "a", "addr": "b"}], id="u3"), T0)
    assert members == Resolve("u3", [Member("a", "b")])
    session.submit("u4", RequestKind.PING, {}, T0)
    (bad,) = session.reply_received(reply(type="ack", id="u4"), T0)
    assert isinstance(bad, Reject) and isinstance(bad.error, RequestFailed)


def test_unacked_requests_are_resent_after_two_intervals_and_after_a_rejoin() -> None:
    session, _ = joined()
    out = session.submit("u1", RequestKind.MESSAGE, {"text": "hi"}, T0)
    body = sent(out)[0]
    session.reply_received(reply(type="pong", ts=1.0), T0 + HB)  # heard: not lost
    assert body in sent(session.tick(T0 + 2 * HB))
    # The connection drops; the rejoin's welcome sends it again, same id.
    session.handshake_succeeded()
    out = session.disconnected(T0 + 11)
    assert [s.state for s in statuses(out)] == [ClientStatus.DISCONNECTED]
    assert CloseDealer() in out
    rejoin = session.tick(session.deadline())
    (join,) = [b for b in sent(rejoin) if b["type"] == "join"]
    assert (join["token"], join["since"]) == ("tok", 0)  # the name and the place kept
    out = session.reply_received(welcome(join["id"]), T0 + 12)
    assert body in sent(out)
    assert [s.state for s in statuses(out)] == [ClientStatus.RECONNECTED]


def test_a_disconnect_before_any_handshake_means_nothing() -> None:
    session, _ = joined()
    assert session.disconnected(T0 + 1) == []
    assert session.phase is Phase.JOINED


def test_close_rejects_what_is_pending() -> None:
    session = Session("alice", "tcp://h:5555")
    session.start(T0)
    session.submit("u1", RequestKind.MESSAGE, {"text": "x"}, T0)
    out = session.close()
    assert isinstance(out[0], Reject) and isinstance(out[0].error, ClientClosed)
    assert isinstance(out[-1], Closed) and out[-1].reason == "closed"
    (late,) = session.submit("u2", RequestKind.WHO, {}, T0)
    assert isinstance(late, Reject)
    assert session.close() == []


# ------------------------------------------------------------------ liveness


def test_silence_for_three_heartbeats_is_a_lost_broker() -> None:
    session, _ = joined()
    session.tick(T0 + EARLY_PING_SECONDS)
    session.tick(T0 + 3 * HB - 0.001)
    assert session.phase is Phase.JOINED
    out = session.tick(T0 + 3 * HB)
    assert [s.state for s in statuses(out)] == [ClientStatus.DISCONNECTED]
    assert session.phase is Phase.WAITING and session.welcome is None


def test_pings_when_idle() -> None:
    session, _ = joined()
    session.tick(T0 + EARLY_PING_SECONDS)
    assert session.tick(T0 + 1) == []
    assert sent(session.tick(T0 + EARLY_PING_SECONDS + HB)) == [{"type": "ping"}]


@pytest.mark.parametrize("frames", [
    reply(type="pong", ts=1.0, joined=False),
    reply(type="error", code="not_joined", detail="join first"),
])
def test_a_broker_that_forgot_us_is_rejoined_at_once(frames: list[bytes]) -> None:
    session, _ = joined()
    out = session.reply_received(frames, T0 + 1)
    assert [s.state for s in statuses(out)] == [ClientStatus.DISCONNECTED]
    assert session.deadline() == T0 + 1
    assert join_id(session.tick(T0 + 1))


def test_bye() -> None:
    session, _ = joined()
    out = session.reply_received(reply(type="bye", reason="shutdown"), T0)
    assert [s.state for s in statuses(out)] == [ClientStatus.DISCONNECTED]
    session, _ = joined()
    out = session.reply_received(reply(type="bye", reason="kicked", detail="spam"), T0)
    assert [(s.state, s.detail) for s in statuses(out)] == [
        (ClientStatus.CLOSED, "kicked by the operator: spam")]
    assert isinstance(out[-1], Closed) and out[-1].reason == "kicked"


def test_a_broadcast_shutdown_is_a_lost_broker() -> None:
    session, _ = joined()
    out = session.broadcast_received([BROKER_TOPIC, encode({"type": "shutdown"})], T0)
    assert [s.state for s in statuses(out)] == [ClientStatus.DISCONNECTED]


# ------------------------------------------------------------------ leaving


def test_leave_waits_for_the_broker_to_take_it() -> None:
    session, _ = joined()
    out = session.leave("bye all", T0)
    leave, ping = sent(out)
    assert leave == {"type": "leave", "reason": "bye all"}
    assert ping["type"] == "ping" and isinstance(ping["id"], str)
    assert session.phase is Phase.LEAVING
    out = session.reply_received(reply(type="pong", ts=1.0, id=ping["id"]), T0 + 0.01)
    assert isinstance(out[-1], Closed) and out[-1].reason == "left"


def test_leave_gives_up_after_its_timeout() -> None:
    session, _ = joined()
    session.leave(None, T0)
    assert session.deadline() == T0 + LEAVE_WAIT_SECONDS
    assert session.tick(T0 + 1) == []
    out = session.tick(T0 + LEAVE_WAIT_SECONDS)
    assert isinstance(out[-1], Closed) and out[-1].reason == "left"


def test_leave_before_joining_just_closes() -> None:
    session = Session("alice", "tcp://h:5555")
    session.start(T0)
    out = session.leave(None, T0)
    assert sent(out) == [] and isinstance(out[-1], Closed)


# ------------------------------------------------------------------ handshakes


def test_a_mechanism_mismatch_fails_the_first_connect_at_once() -> None:
    session = Session("alice", "tcp://h:5555")
    session.start(T0)
    out = session.handshake_failed(HandshakeFault.PROTOCOL, T0)
    assert isinstance(out[-1], Closed) and isinstance(out[-1].error, HandshakeFailed)
    assert "--server-key" in out[-1].reason


def test_handshakes_cut_short_blame_a_key_only_when_they_keep_happening() -> None:
    session = Session("alice", "tcp://h:5555", encrypted=True)
    session.start(T0)
    for _ in range(HANDSHAKE_TRIES - 1):
        assert session.handshake_failed(HandshakeFault.NO_DETAIL, T0) == []
    out = session.handshake_failed(HandshakeFault.NO_DETAIL, T0)
    assert isinstance(out[-1], Closed) and "wrong server key" in out[-1].reason
    plain = Session("alice", "tcp://h:5555")
    plain.start(T0)
    for _ in range(2 * HANDSHAKE_TRIES):
        assert plain.handshake_failed(HandshakeFault.NO_DETAIL, T0) == []


# ------------------------------------------------------------------ room events


def test_events_in_order_are_delivered_at_once_and_members_follow() -> None:
    session, _ = joined()
    out = session.broadcast_received(
        room({"type": "joined", "seq": 1, "ts": 1.0, "name": "Bob", "addr": "x"}), T0)
    assert delivered(out) == [1] and "bob" in session.members
    out = session.broadcast_received(room(message(2)), T0)
    assert delivered(out) == [2] and sent(out) == []
    out = session.broadcast_received(
        room({"type": "left", "seq": 3, "ts": 1.0, "name": "BOB", "addr": "x",
              "reason": "leave"}), T0)
    assert delivered(out) == [3] and "bob" not in session.members
    assert session.broadcast_received(room(message(2)), T0) == []  # seen


def test_a_batch_is_delivered_in_order() -> None:
    session, _ = joined()
    frame = [BATCH_TOPIC, encode({"type": "batch", "room": "lobby",
                                  "events": [message(1), message(2), 7, {"x": 1}]})]
    assert delivered(session.broadcast_received(frame, T0)) == [1, 2]


def test_a_gap_is_filled_from_history_and_what_waited_follows() -> None:
    session, _ = joined()
    out = session.broadcast_received(room(message(3)), T0)
    assert delivered(out) == []
    fill = fill_of(out)
    assert (fill["after"], fill["limit"]) == (0, HISTORY_PAGE_MAX)
    assert session.broadcast_received(room(message(4)), T0) == []  # one fill at a time
    out = session.reply_received(
        reply(type="history", events=[message(1), message(2), message(3)], id=fill["id"]), T0)
    assert delivered(out) == [1, 2, 3, 4]
    assert sent(out) == []  # caught up


def test_short_pages_page_on_until_the_known_head() -> None:
    session, _ = joined()
    out = session.reply_received(reply(type="pong", ts=1.0, seq=10), T0)
    fill = fill_of(out)
    out = session.reply_received(
        reply(type="history", events=[message(s) for s in (1, 2, 3)], id=fill["id"]), T0)
    assert delivered(out) == [1, 2, 3]
    fill = fill_of(out)
    assert fill["after"] == 3  # a short page is not the end
    out = session.reply_received(
        reply(type="history", events=[message(s) for s in range(4, 11)], id=fill["id"]), T0)
    assert delivered(out) == list(range(4, 11))
    assert sent(out) == []


def test_a_heartbeat_head_starts_a_fill() -> None:
    session, _ = joined()
    out = session.broadcast_received(
        [BROKER_TOPIC, encode({"type": "heartbeat", "seqs": {"lobby": 2}})], T0)
    assert fill_of(out)["after"] == 0


def test_a_failed_fill_is_asked_again_a_moment_later() -> None:
    session, _ = joined()
    fill = fill_of(session.broadcast_received(room(message(2)), T0))
    out = session.reply_received(
        reply(type="error", code="rate_limited", detail="", id=fill["id"]), T0)
    assert out == []
    assert session.deadline() <= T0 + FILL_RETRY_SECONDS
    again = fill_of(session.tick(T0 + FILL_RETRY_SECONDS))
    assert again["after"] == 0 and again["id"] != fill["id"]
    out = session.reply_received(
        reply(type="history", events=[message(1), message(2)], id=again["id"]), T0 + 1)
    assert delivered(out) == [1, 2]


def test_events_gone_from_history_are_said_missed() -> None:
    session, _ = joined()
    fill = fill_of(session.broadcast_received(room(message(9)), T0))
    out = session.reply_received(
        reply(type="history", events=[message(5), message(6)], id=fill["id"]), T0)
    assert [(s.state, s.count) for s in statuses(out)] == [(ClientStatus.MISSED, 4)]
    fill = fill_of(out)
    out = session.reply_received(reply(type="history", events=[], id=fill["id"]), T0)
    assert [(s.state, s.count) for s in statuses(out)] == [(ClientStatus.MISSED, 2)]
    assert delivered(out) == [9]


def test_a_new_epoch_says_history_lost_and_starts_over() -> None:
    session, _ = joined(seq=5)
    session.handshake_succeeded()
    session.disconnected(T0 + 1)
    rid = join_id(session.tick(session.deadline()))
    out = session.reply_received(welcome(rid, seq=2, epoch="e2"), T0 + 2)
    lost = statuses(out)[0]
    assert (lost.state, lost.count) == (ClientStatus.HISTORY_LOST, 2)
    assert session.last_seq == 0
    assert fill_of(out)["after"] == 0


def test_a_welcome_behind_our_seq_says_history_lost() -> None:
    session = Session("alice", "tcp://h:5555", since=50)
    rid = join_id(session.start(T0))
    out = session.reply_received(welcome(rid, seq=3), T0)
    assert statuses(out)[0].state == ClientStatus.HISTORY_LOST


def test_since_fills_from_there() -> None:
    _, out = joined(seq=8, since=6)
    assert fill_of(out)["after"] == 6


def test_a_dm_is_emitted() -> None:
    session, _ = joined()
    out = session.reply_received(reply(type="dm", **{"from": "bob"}, text="psst", ts=2.0), T0)
    assert items(out) == [Direct("bob", "psst", 2.0)]


def test_an_illegal_transition_is_our_bug() -> None:
    session, _ = joined()
    with pytest.raises(RuntimeError):
        session._goto(Phase.JOINING)


# ------------------------------------------------------------------ property


_event = st.builds(message, st.integers(-2, 30))
_bodies = st.one_of(
    _event,
    st.builds(lambda s: {"type": "pong", "ts": 1.0, "seq": s}, st.integers(-1, 30)),
    st.builds(lambda evs: {"type": "history", "events": evs}, st.lists(_event, max_size=5)),
    st.builds(lambda c: {"type": "error", "code": c, "detail": ""},
              st.sampled_from(["rate_limited", "not_joined", "unavailable", "x"])),
    st.builds(lambda s, e: {"type": "welcome", "name": "a", "seq": s, "pub": "1", "token": "t",
                            "epoch": e}, st.integers(0, 30), st.sampled_from(["e1", "e2"])),
    st.just({"type": "bye", "reason": "shutdown"}),
    st.builds(lambda s: {"type": "heartbeat", "seqs": {"lobby": s}}, st.integers(-1, 30)),
    st.dictionaries(st.sampled_from(["type", "id", "seq", "events", "ts"]),
                    st.one_of(st.integers(-(2**40), 2**40), st.text(max_size=3), st.none(),
                              st.lists(st.integers(0, 99), max_size=2))),
)
_inputs = st.lists(st.tuples(
    st.sampled_from(["reply", "room", "batch", "broker", "tick", "drop", "raw"]),
    _bodies, st.booleans(), st.floats(0, 3)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(_inputs)
def test_any_broker_frames_never_raise_and_seqs_only_increase(
        steps: list[tuple[str, dict[str, Any], bool, float]]) -> None:
    session = Session("alice", "tcp://h:5555", id_prefix="s")
    now = T0
    out = session.start(now)
    last = -1
    for where, body, use_id, dt in steps:
        now += dt
        if use_id and where == "reply":
            # Answer the request the session sent last, whatever it was.
            ids = [b["id"] for b in sent(out) if "id" in b]
            if ids:
                body = {**body, "id": ids[-1]}
        match where:
            case "reply":
                out = session.reply_received([encode(body)], now)
            case "room":
                out = session.broadcast_received([ROOM_TOPIC, encode(body)], now)
            case "batch":
                out = session.broadcast_received(
                    [BATCH_TOPIC, encode({"type": "batch", "events": [body, body]})], now)
            case "broker":
                out = session.broadcast_received([BROKER_TOPIC, encode(body)], now)
            case "drop":
                session.handshake_succeeded()
                out = session.disconnected(now)
            case "raw":
                out = session.reply_received([b"\xc1garbage"], now)
            case _:
                out = session.tick(now)
        for item in items(out):
            if isinstance(item, Status) and item.state == ClientStatus.HISTORY_LOST:
                last = -1  # a new epoch: its seqs start over
            elif isinstance(item, Message):
                assert item.seq > last, (item.seq, last)
                last = item.seq
        assert session.last_seq >= max(last, 0)
        if session.closed:
            break


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_against_a_lossy_broker_every_event_arrives_once_in_order(data: st.DataObject) -> None:
    """A model broker that drops broadcasts, pages short and fails fills."""
    total = data.draw(st.integers(1, 40), label="events")
    session, out = joined()
    now = T0
    published = 0
    fills: list[dict[str, Any]] = []
    got: list[int] = []

    def take(actions: list[Action]) -> None:
        got.extend(delivered(actions))
        assert not [s for s in statuses(actions) if s.state != ClientStatus.CONNECTED]
        fills.extend(b for b in sent(actions) if b["type"] == "history")

    def answer_fill(page: int, fail: bool) -> None:
        body = fills.pop(0)
        if fail:
            take(session.reply_received(reply(type="error", code="rate_limited", detail="",
                                              id=body["id"]), now))
            return
        events = [message(s) for s in range(body["after"] + 1, published + 1)][:page]
        take(session.reply_received(reply(type="history", events=events, id=body["id"]), now))

    take(out)
    for _ in range(data.draw(st.integers(0, 120), label="steps")):
        step = data.draw(st.sampled_from(["publish", "fill", "pong", "tick"]))
        if step == "publish" and published < total:
            published += 1
            if not data.draw(st.booleans(), label="dropped"):
                take(session.broadcast_received(room(message(published)), now))
        elif step == "fill" and fills:
            answer_fill(data.draw(st.integers(1, 5)), data.draw(st.booleans()))
        elif step == "pong":
            take(session.reply_received(reply(type="pong", ts=1.0, seq=published), now))
        else:
            now += data.draw(st.sampled_from([0.1, FILL_RETRY_SECONDS, 1.0]))
            session.reply_received(reply(type="pong", ts=1.0), now)  # the broker is alive
            take(session.tick(now))
    # Everything said; then the broker behaves: the client must catch up.
    while published < total:
        published += 1
    take(session.reply_received(reply(type="pong", ts=1.0, seq=published), now))
    for _ in range(1000):
        if fills:
            answer_fill(HISTORY_PAGE_MAX, False)
        elif got[-1:] != [total]:
            now += FILL_RETRY_SECONDS
            take(session.tick(now))
            take(session.reply_received(reply(type="pong", ts=1.0, seq=published), now))
        else:
            break
    assert got == list(range(1, total + 1))


# ------------------------------------------------------------------ rooms (v2)


def welcome2(rid: str, rooms: list[str], seq: int = 0, epoch: str = "e1",
             **extra: Any) -> list[bytes]:
    """A version 2 broker's welcome: it says which rooms we are in."""
    return welcome(rid, seq, epoch, rooms=rooms, count=1, **extra)


def entered(rid: str, name: str, seq: int, **extra: Any) -> list[bytes]:
    body: dict[str, Any] = {"type": "entered", "room": name, "seq": seq, "topic": "",
                            "count": 1, "members": [{"name": "alice", "addr": "127.0.0.1"}],
                            "ops": [], "private": False, "moderated": False,
                            "topic_ops": True, "id": rid, **extra}
    return [encode(body)]


def in_room(seq: int, name: str, text: str = "", sender: str = "bob") -> dict[str, Any]:
    return {**message(seq, text or f"{name}{seq}", sender), "room": name}


def on_topic(event: dict[str, Any]) -> list[bytes]:
    return [room_topic(event["room"]), encode(event)]


def snapshots(actions: list[Action]) -> dict[str, str]:
    """The `enter`s a welcome sends: room -> request id."""
    return {b["room"]: b["id"] for b in sent(actions) if b["type"] == "enter"}


def joined2(rooms: list[str], seqs: dict[str, int] | None = None, now: float = T0,
            **kw: Any) -> Session:
    """A session in ``rooms`` whose snapshots were answered (each room at ``seqs``)."""
    seqs = seqs or {}
    session = Session("alice", "tcp://127.0.0.1:5555", id_prefix="s", rooms=rooms, **kw)
    out = session.start(now)
    assert join_id(out) and sent(out)[0]["rooms"] == rooms
    out = session.reply_received(welcome2(join_id(out), rooms, seqs.get(ROOM, 0)), now)
    answer_snapshots(session, out, seqs, now)
    assert session.entered_rooms == tuple(rooms)
    assert all(session.room_state(name).last_seq == seqs.get(name, 0)  # type: ignore[union-attr]
               for name in rooms)
    return session


def answer_snapshots(session: Session, out: list[Action], seqs: dict[str, int],
                     now: float) -> None:
    """Answer a welcome's `enter`s, each room at ``seqs``, and the look back they cause."""
    for name, rid in snapshots(out).items():
        seq = seqs.get(name, 0)
        out = session.reply_received(entered(rid, name, seq), now)
        for fill in fills(out).values():
            # The look back to our own `joined` (see test_a_v2_welcome_...).
            ours = {"type": "joined", "room": name, "seq": seq, "ts": 1.0, "name": "alice",
                    "addr": "x"}
            assert room_seqs(session.reply_received(
                reply(type="history", room=name, events=[ours], id=fill["id"]), now)) == []


def room_seqs(actions: list[Action]) -> list[tuple[str, int]]:
    return [(i.room, i.seq) for i in items(actions)
            if isinstance(i, Message | Joined | Joins | Left | TopicChanged | ModeChanged)]


def fills(actions: list[Action]) -> dict[str, dict[str, Any]]:
    return {b["room"]: b for b in sent(actions) if b["type"] == "history"}


def test_a_v2_welcome_subscribes_every_room_and_asks_each_where_it_is() -> None:
    session = Session("alice", "tcp://h:5555", rooms=["lobby", "#Dev"])
    out = session.start(T0)
    assert sent(out)[0]["rooms"] == ["lobby", "dev"]
    out = session.reply_received(welcome2(join_id(out), ["lobby", "dev"], 3, batch=True), T0)
    (sub,) = [a for a in out if isinstance(a, OpenSub)]
    assert sub.topics == (batch_topic("lobby"), batch_topic("dev"), BROKER_TOPIC)
    asked = snapshots(out)
    assert list(asked) == ["lobby", "dev"]
    # Events of dev before we know where we start in it wait for `entered`.
    assert session.broadcast_received(
        [batch_topic("dev"), encode({"type": "batch", "room": "dev",
                                     "events": [in_room(8, "dev"), in_room(9, "dev")]})],
        T0) == []
    out = session.reply_received(entered(asked["dev"], "dev", 7, topic="t", ops=["bob"]), T0)
    # Only lobby's seq came with the welcome: dev may have moved on between
    # our join and this answer. Read back to our own `joined` there.
    assert room_seqs(out) == []
    fill = fills(out)["dev"]
    assert fill["after"] == max(0, 7 - LOOK_BACK)
    ours = {"type": "joined", "room": "dev", "seq": 6, "ts": 1.0, "name": "alice",
            "addr": "x"}
    page = [*(in_room(n, "dev") for n in range(1, 6)), ours, in_room(7, "dev")]
    out = session.reply_received(reply(type="history", room="dev", events=page,
                                       id=fill["id"]), T0)
    assert room_seqs(out) == [("dev", 7), ("dev", 8), ("dev", 9)]
    assert statuses(out) == []  # nothing missed: what came before us is not ours
    state = session.room_state("DEV")
    assert state is not None and (state.topic, state.ops, state.last_seq) == ("t", ("bob",), 9)
    assert session.room_state("ops") is None


def test_each_room_fills_its_own_gap_page_by_page() -> None:
    session = joined2(["lobby", "dev"], {"lobby": 2, "dev": 5})
    out = session.reply_received(reply(type="pong", ts=1.0, seqs={"lobby": 2, "dev": 9}), T0)
    (fill,) = fills(out).values()
    assert (fill["room"], fill["after"], fill["limit"]) == ("dev", 5, HISTORY_PAGE_MAX)
    # A lobby event in order meanwhile goes out at once: rooms do not wait for each other.
    out = session.broadcast_received(on_topic(in_room(3, "lobby")), T0)
    assert room_seqs(out) == [("lobby", 3)]
    out = session.reply_received(
        reply(type="history", room="dev", events=[in_room(6, "dev"), in_room(7, "dev")],
              id=fill["id"]), T0)
    assert room_seqs(out) == [("dev", 6), ("dev", 7)]
    fill = fills(out)["dev"]
    assert fill["after"] == 7  # a short page is not the end
    out = session.reply_received(
        reply(type="history", room="dev", events=[in_room(8, "dev"), in_room(9, "dev")],
              id=fill["id"]), T0)
    assert room_seqs(out) == [("dev", 8), ("dev", 9)] and fills(out) == {}
    # The heartbeat names only rooms that moved; each fills alone.
    out = session.broadcast_received(
        [BROKER_TOPIC, encode({"type": "heartbeat", "seqs": {"lobby": 3, "dev": 10,
                                                             "elsewhere": 99}})], T0)
    assert list(fills(out)) == ["dev"]


def test_a_failed_fill_of_one_room_is_asked_again_for_that_room() -> None:
    session = joined2(["lobby", "dev"])
    fill = fills(session.broadcast_received(on_topic(in_room(2, "dev")), T0))["dev"]
    assert session.reply_received(
        reply(type="error", code="unavailable", detail="", id=fill["id"], room="dev"), T0) == []
    again = fills(session.tick(T0 + FILL_RETRY_SECONDS))
    assert list(again) == ["dev"] and again["dev"]["after"] == 0


def test_a_private_rooms_events_on_the_dealer_are_delivered_in_order() -> None:
    session = joined2(["lobby", "secret"], {"secret": 4})
    assert room_seqs(session.reply_received(reply(**in_room(5, "secret")), T0)) == [
        ("secret", 5)]
    # One lost (say, in a reconnect of the DEALER): a gap, filled from history.
    out = session.reply_received(reply(**in_room(7, "secret")), T0)
    assert room_seqs(out) == []
    fill = fills(out)["secret"]
    assert fill["after"] == 5
    out = session.reply_received(
        reply(type="history", room="secret", events=[in_room(6, "secret")], id=fill["id"]), T0)
    assert room_seqs(out) == [("secret", 6), ("secret", 7)]
    assert session.reply_received(reply(**in_room(7, "secret")), T0) == []  # seen
    # A room event for a room we are not in is nobody's.
    assert session.reply_received(reply(**in_room(1, "other")), T0) == []


def test_an_invitation_is_an_item() -> None:
    session = joined2(["lobby"])
    out = session.reply_received(reply(type="invited", room="secret", **{"from": "bob"}), T0)
    assert items(out) == [Invited("secret", "bob")]


def test_topic_and_mode_events_keep_the_room_state_current() -> None:
    session = joined2(["dev"])
    events = [
        {"type": "topic", "room": "dev", "seq": 1, "ts": 1.0, "name": "bob", "text": "hi"},
        {"type": "mode", "room": "dev", "seq": 2, "ts": 1.0, "name": "bob", "moderated": True,
         "op": "carol"},
        {"type": "joined", "room": "dev", "seq": 3, "ts": 1.0, "name": "carol", "addr": "x"},
        {"type": "mode", "room": "dev", "seq": 4, "ts": 1.0, "name": "bob", "deop": "alice"},
        {"type": "left", "room": "dev", "seq": 5, "ts": 1.0, "name": "carol", "addr": "x",
         "reason": "part"},
    ]
    for event in events:
        session.broadcast_received(on_topic(event), T0)
    state = session.room_state("dev")
    assert state is not None
    assert (state.topic, state.moderated, state.ops, state.count, state.last_seq) == (
        "hi", True, (), 1, 5)


def joins(seq: int, room: str, *names: str) -> dict[str, Any]:
    """A big room's coalesced joins: {type: "joins", room, seq, ts, members, count}."""
    members = [{"name": name, "addr": f"10.0.0.{n}"} for n, name in enumerate(names, 1)]
    return {"type": "joins", "room": room, "seq": seq, "ts": 1.0, "members": members,
            "count": len(members)}


def test_a_joins_event_changes_the_room_as_each_joined_would() -> None:
    session = joined2(["lobby", "big"], {"big": 3})
    bob = {"type": "joined", "room": "big", "seq": 4, "ts": 1.0, "name": "bob", "addr": "x"}
    session.broadcast_received(on_topic(bob), T0)
    # Bob comes again within the pass (a takeover by token, a new address):
    # he is one member, counted once.
    out = session.broadcast_received(on_topic(joins(5, "big", "carol", "Bob", "dave")), T0)
    (event,) = items(out)
    assert event == Joins("big", 5, 1.0, (Member("carol", "10.0.0.1"), Member("Bob", "10.0.0.2"),
                                          Member("dave", "10.0.0.3")))
    state = session.room_state("big")
    assert state is not None and (state.count, state.last_seq) == (4, 5)
    assert {m.name: m.addr for m in state.members} == {
        "alice": "127.0.0.1", "Bob": "10.0.0.2", "carol": "10.0.0.1", "dave": "10.0.0.3"}
    # Its members leave one by one, as any member does.
    session.broadcast_received(on_topic(
        {"type": "left", "room": "big", "seq": 6, "ts": 1.0, "name": "carol", "addr": "x",
         "reason": "leave"}), T0)
    state = session.room_state("big")
    assert state is not None and state.count == 3
    assert sorted(m.name for m in state.members) == ["Bob", "alice", "dave"]
    # Another room's state is not touched, nor its seqs.
    lobby = session.room_state("lobby")
    assert lobby is not None and (lobby.count, lobby.last_seq) == (1, 0)


def test_joins_on_the_dealer_and_in_history_come_in_seq_order() -> None:
    # A private room's events come on the DEALER; a lost one is filled from history.
    session = joined2(["lobby", "secret"], {"secret": 4})
    out = session.reply_received(reply(**joins(5, "secret", "bob", "carol")), T0)
    assert room_seqs(out) == [("secret", 5)]
    out = session.reply_received(reply(**joins(8, "secret", "frank")), T0)
    assert room_seqs(out) == []  # 6 and 7 are missing
    fill = fills(out)["secret"]
    assert fill["after"] == 5
    page = [in_room(6, "secret"), joins(7, "secret", "dave", "erin")]
    out = session.reply_received(reply(type="history", room="secret", events=page,
                                       id=fill["id"]), T0)
    assert room_seqs(out) == [("secret", 6), ("secret", 7), ("secret", 8)]
    assert [e.members[0].name for e in items(out) if isinstance(e, Joins)] == ["dave", "frank"]
    state = session.room_state("secret")
    assert state is not None and state.count == 1 + 5
    assert session.reply_received(reply(**joins(8, "secret", "frank")), T0) == []  # seen


def test_a_look_back_finds_our_own_join_in_a_joins() -> None:
    # Entered with the join into a big room: our coming may be one of a
    # `joins`; what comes after it is ours, what came before it is not.
    session = Session("alice", "tcp://h:5555", rooms=["lobby", "big"])
    out = session.start(T0)
    out = session.reply_received(welcome2(join_id(out), ["lobby", "big"], 3), T0)
    asked = snapshots(out)
    session.reply_received(entered(asked["lobby"], "lobby", 3), T0)
    out = session.reply_received(entered(asked["big"], "big", 12, count=200), T0)
    fill = fills(out)["big"]
    page = [in_room(n, "big") for n in range(1, 10)]
    page += [joins(10, "big", "bob", "ALICE", "carol"), in_room(11, "big"), in_room(12, "big")]
    out = session.reply_received(reply(type="history", room="big", events=page,
                                       id=fill["id"]), T0)
    assert room_seqs(out) == [("big", 11), ("big", 12)]
    assert statuses(out) == []
    state = session.room_state("big")
    # The snapshot (seq 12) already counts the joins of seq 10.
    assert state is not None and (state.count, state.last_seq) == (200, 12)


def test_entering_and_parting_subscribe_and_unsubscribe() -> None:
    session = joined2(["lobby"])
    session.submit("u1", RequestKind.ENTER, {"room": "#Ops"}, T0)
    out = session.reply_received(entered("u1", "ops", 3, count=2), T0)
    assert Subscribe(room_topic("ops")) in out
    (resolved,) = [a for a in out if isinstance(a, Resolve)]
    assert resolved.value.room == "ops" and resolved.value.count == 2
    assert session.entered_rooms == ("lobby", "ops")
    assert room_seqs(session.broadcast_received(on_topic(in_room(4, "ops")), T0)) == [
        ("ops", 4)]
    session.submit("u2", RequestKind.PART, {"room": "ops"}, T0)
    out = session.reply_received(reply(type="parted", room="ops", id="u2"), T0)
    assert Unsubscribe(room_topic("ops")) in out and Resolve("u2", None) in out
    assert session.entered_rooms == ("lobby",)
    assert session.broadcast_received(on_topic(in_room(5, "ops")), T0) == []


def test_who_gathers_every_page() -> None:
    session = joined2(["lobby"])
    (body,) = sent(session.submit("u1", RequestKind.WHO, {"room": "dev"}, T0))
    assert (body["room"], body["limit"]) == ("dev", WHO_PAGE_MAX)
    out = session.reply_received(reply(type="members", room="dev", count=3, next="b",
                                       members=[{"name": "a", "addr": "x"},
                                                {"name": "b", "addr": "x"}], id="u1"), T0)
    (again,) = sent(out)
    assert (again["after"], again["id"]) == ("b", "u1")
    out = session.reply_received(reply(type="members", room="dev", count=3,
                                       members=[{"name": "c", "addr": "x"}], id="u1"), T0)
    assert out == [Resolve("u1", [Member("a", "x"), Member("b", "x"), Member("c", "x")])]


def test_a_kick_of_ourselves_takes_the_room_away() -> None:
    session = joined2(["lobby", "dev"], {"dev": 3})
    kicked = {"type": "left", "room": "dev", "seq": 4, "ts": 1.0, "name": "ALICE",
              "addr": "x", "reason": "kicked", "by": "bob", "detail": "flood"}
    out = session.broadcast_received(on_topic(kicked), T0)
    (left,) = items(out)
    assert isinstance(left, Left) and (left.by, left.detail) == ("bob", "flood")
    assert Unsubscribe(room_topic("dev")) in out
    assert session.entered_rooms == ("lobby",)
    # Another's kick is just an event.
    out = session.broadcast_received(on_topic({**kicked, "room": "lobby", "seq": 1,
                                                "name": "bob"}), T0)
    assert session.entered_rooms == ("lobby",) and room_seqs(out) == [("lobby", 1)]


def test_after_a_reconnect_every_room_is_entered_again_and_filled_once() -> None:
    session = joined2(["lobby", "dev", "ops"], {"lobby": 1, "dev": 10, "ops": 20})
    session.broadcast_received(on_topic(in_room(11, "dev")), T0)
    session.handshake_succeeded()
    session.disconnected(T0 + 1)
    out = session.tick(session.deadline())
    join = next(b for b in sent(out) if b["type"] == "join")
    assert (join["rooms"], join["since"], join["token"]) == (["lobby", "dev", "ops"], 1, "tok")
    out = session.reply_received(welcome2(join["id"], ["lobby", "dev", "ops"], 1), T0 + 2)
    (sub,) = [a for a in out if isinstance(a, OpenSub)]
    assert sub.topics == (room_topic("lobby"), room_topic("dev"), room_topic("ops"),
                          BROKER_TOPIC)
    asked = snapshots(out)
    assert list(asked) == ["lobby", "dev", "ops"]
    # dev moved on while we were away (our kick there then, and our return);
    # a live dev event races the answers on the SUB.
    out = session.broadcast_received(on_topic(in_room(15, "dev")), T0 + 2)
    fill = fills(out)["dev"]
    assert fill["after"] == 11  # from where we were, not from where the room is
    got: list[tuple[str, int]] = []
    assert session.reply_received(entered(asked["dev"], "dev", 14), T0 + 2) == []  # asked
    assert session.reply_received(entered(asked["ops"], "ops", 20), T0 + 2) == []
    events = [in_room(12, "dev"),
              {"type": "left", "room": "dev", "seq": 13, "ts": 1.0, "name": "alice",
               "addr": "x", "reason": "kicked", "by": "bob"},
              {"type": "joined", "room": "dev", "seq": 14, "ts": 1.0, "name": "alice",
               "addr": "x"}]
    out = session.reply_received(reply(type="history", room="dev", events=events,
                                       id=fill["id"]), T0 + 2)
    got += room_seqs(out)
    assert got == [("dev", 12), ("dev", 13), ("dev", 14), ("dev", 15)]
    # The kick came before the answer that we are in: the room stays.
    assert session.entered_rooms == ("lobby", "dev", "ops")
    assert session.broadcast_received(on_topic(in_room(15, "dev")), T0 + 2) == []


def test_a_kick_while_the_answer_is_out_counts_if_it_came_after() -> None:
    session = joined2(["lobby", "dev"], {"dev": 3})
    session.handshake_succeeded()
    session.disconnected(T0 + 1)
    join = join_id(session.tick(session.deadline()))
    asked = snapshots(session.reply_received(welcome2(join, ["lobby", "dev"]), T0 + 2))
    kicked = {"type": "left", "room": "dev", "seq": 5, "ts": 1.0, "name": "alice",
              "addr": "x", "reason": "banned", "by": "bob"}
    session.broadcast_received(on_topic(in_room(4, "dev")), T0 + 2)
    session.broadcast_received(on_topic(kicked), T0 + 2)
    assert session.entered_rooms == ("lobby", "dev")  # until the answer says when we came
    out = session.reply_received(entered(asked["dev"], "dev", 4), T0 + 2)
    assert Unsubscribe(room_topic("dev")) in out
    assert session.entered_rooms == ("lobby",)


def test_a_room_refused_on_rejoin_is_said_and_dropped() -> None:
    session = joined2(["lobby", "secret"])
    session.handshake_succeeded()
    session.disconnected(T0 + 1)
    join = join_id(session.tick(session.deadline()))
    out = session.reply_received(
        welcome2(join, ["lobby"], refused=[{"room": "secret", "code": "forbidden"}]), T0 + 2)
    (refused,) = [s for s in statuses(out) if s.state == ClientStatus.REFUSED]
    assert refused.room == "secret" and "forbidden" in refused.detail
    assert session.entered_rooms == ("lobby",)
    assert list(snapshots(out)) == ["lobby"]


def test_fail_over_moves_to_the_next_endpoint_and_resumes() -> None:
    session = Session("alice", "tcp://one:5555, tcp://two:6666", id_prefix="s",
                      rooms=["lobby", "dev"])
    out = session.start(T0)
    assert out[0] == OpenDealer("tcp://one:5555")
    out = session.reply_received(welcome2(join_id(out), ["lobby", "dev"], 2), T0)
    (sub,) = [a for a in out if isinstance(a, OpenSub)]
    assert sub.endpoint == "tcp://one:5556"
    answer_snapshots(session, out, {"lobby": 2, "dev": 7}, T0)
    session.handshake_succeeded()
    # The SUB goes with the broker left behind: retried, a dead relay's
    # host name held up the I/O thread that the next DEALER shares.
    assert CloseSub() in session.disconnected(T0 + 1)
    out = session.tick(session.deadline())
    assert out[0] == OpenDealer("tcp://two:6666")
    join = next(b for b in sent(out) if b["type"] == "join")
    assert (join["token"], join["rooms"], join["since"]) == ("tok", ["lobby", "dev"], 2)
    out = session.reply_received(welcome2(join["id"], ["lobby", "dev"], 2, pub="7777"), T0 + 2)
    (sub,) = [a for a in out if isinstance(a, OpenSub)]
    assert sub.endpoint == "tcp://two:7777"  # the new broker's port, on its host
    asked = snapshots(out)
    out = session.reply_received(entered(asked["dev"], "dev", 9), T0 + 2)
    assert fills(out)["dev"]["after"] == 7  # the same history: resume where we were
    # A join nobody answers moves on too, round robin.
    session.handshake_succeeded()
    session.disconnected(T0 + 3)
    assert session.tick(session.deadline())[0] == OpenDealer("tcp://one:5555")
    assert CloseSub() in session.tick(session.deadline())  # no welcome in the attempt's time
    assert session.tick(session.deadline())[0] == OpenDealer("tcp://two:6666")


def test_one_endpoint_or_a_named_broadcast_keeps_the_sub_across_a_loss() -> None:
    # Its SUB reconnects by itself to the same broadcast endpoint.
    for endpoints, broadcast in (("tcp://one:5555", None),
                                 ("tcp://one:5555,tcp://two:6666", "tcp://bus:7000")):
        session = Session("alice", endpoints, broadcast=broadcast, id_prefix="s")
        out = session.reply_received(welcome2(join_id(session.start(T0)), ["lobby"], 2), T0)
        answer_snapshots(session, out, {"lobby": 2}, T0)
        session.handshake_succeeded()
        out = session.disconnected(T0 + 1)
        assert CloseDealer() in out and CloseSub() not in out
        out = session.tick(session.deadline())
        assert isinstance(out[0], OpenDealer) and CloseSub() not in out


# ------------------------------------------------------------------ property, rooms

_ROOMS = ["lobby", "dev", "secret"]
_room_event = st.builds(in_room, st.integers(-2, 30), st.sampled_from([*_ROOMS, "other"]))
_room_bodies = st.one_of(
    _room_event,
    st.builds(lambda r, s, n: {"type": "left", "room": r, "seq": s, "ts": 1.0, "name": n,
                               "addr": "x", "reason": "kicked", "by": "bob"},
              st.sampled_from(_ROOMS), st.integers(1, 30), st.sampled_from(["alice", "bob"])),
    st.builds(lambda r, s: {"type": "mode", "room": r, "seq": s, "ts": 1.0, "name": "b",
                            "private": True, "op": "x"},
              st.sampled_from(_ROOMS), st.integers(1, 30)),
    st.builds(lambda seqs: {"type": "pong", "ts": 1.0, "seqs": seqs},
              st.dictionaries(st.sampled_from(_ROOMS), st.integers(-1, 30))),
    st.builds(lambda r, evs: {"type": "history", "room": r, "events": evs},
              st.sampled_from(_ROOMS), st.lists(_room_event, max_size=5)),
    st.builds(lambda r, s: {"type": "entered", "room": r, "seq": s, "topic": "", "count": 1,
                            "members": [], "ops": [], "private": False, "moderated": False,
                            "topic_ops": True}, st.sampled_from(_ROOMS), st.integers(0, 30)),
    st.builds(lambda rooms, s, e: {"type": "welcome", "name": "alice", "seq": s, "pub": "1",
                                   "token": "t", "epoch": e, "rooms": rooms, "count": 1,
                                   "refused": [{"room": "secret", "code": "forbidden"}]},
              st.lists(st.sampled_from(_ROOMS), max_size=3, unique=True),
              st.integers(0, 30), st.sampled_from(["e1", "e2"])),
    st.builds(lambda seqs: {"type": "heartbeat", "seqs": seqs},
              st.dictionaries(st.sampled_from([*_ROOMS, 7]), st.integers(-1, 30))),
    st.builds(lambda c, r: {"type": "error", "code": c, "detail": "", "room": r},
              st.sampled_from(["rate_limited", "not_in_room", "forbidden", "unavailable"]),
              st.sampled_from(_ROOMS)),
    st.just({"type": "invited", "room": "secret", "from": "bob"}),
    st.just({"type": "parted", "room": "dev"}),
    st.just({"type": "bye", "reason": "shutdown"}),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(
    st.sampled_from(["reply", "room", "batch", "broker", "tick", "drop", "user"]),
    _room_bodies, st.integers(0, 8), st.floats(0, 3)), max_size=50))
def test_any_frames_in_any_rooms_never_raise_and_each_rooms_seqs_only_increase(
        steps: list[tuple[str, dict[str, Any], int, float]]) -> None:
    session = Session("alice", "tcp://h:5555,tcp://g:5555", id_prefix="s", rooms=_ROOMS)
    now = T0
    out = session.start(now)
    last: dict[str, int] = {}
    ids: list[str] = []
    users = itertools.count()
    for where, body, pick, dt in steps:
        now += dt
        ids += [b["id"] for b in sent(out) if "id" in b]
        if where == "reply" and pick and ids:
            # Answer one of the requests the session sent, whatever it was.
            body = {**body, "id": ids[-min(pick, len(ids))]}
        match where:
            case "reply":
                out = session.reply_received([encode(body)], now)
            case "room":
                out = session.broadcast_received(
                    [room_topic(str(body.get("room", ""))), encode(body)], now)
            case "batch":
                out = session.broadcast_received(
                    [batch_topic("dev"), encode({"type": "batch", "events": [body, body]})],
                    now)
            case "broker":
                out = session.broadcast_received([BROKER_TOPIC, encode(body)], now)
            case "drop":
                session.handshake_succeeded()
                out = session.disconnected(now)
            case "user":
                kind = [RequestKind.ENTER, RequestKind.PART, RequestKind.WHO][pick % 3]
                out = session.submit(f"u{next(users)}", kind, {"room": _ROOMS[pick % 3]}, now)
            case _:
                out = session.tick(now)
        for item in items(out):
            if isinstance(item, Status) and item.state == ClientStatus.HISTORY_LOST:
                last = {}  # a new epoch: its seqs start over
            elif isinstance(item, Message | Left | ModeChanged):
                assert item.seq > last.get(item.room, -1), (item, last)
                last[item.room] = item.seq
        assert set(session.entered_rooms) <= set(_ROOMS)
        for name in session.entered_rooms:
            state = session.room_state(name)
            assert state is not None and state.last_seq >= 0
        if session.closed:
            break


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_against_a_lossy_broker_with_reconnects_every_rooms_events_arrive_once_in_order(
        data: st.DataObject) -> None:
    """Three rooms (one private, on the DEALER), lost frames, short and failed pages,
    answers that come late, and reconnects: each room still gets every message said
    after we came in, once, in order."""
    total = {room: data.draw(st.integers(1, 25), label=room) for room in _ROOMS}
    session = Session("alice", "tcp://h:5555", id_prefix="s", rooms=_ROOMS)
    now = T0
    said: dict[str, list[dict[str, Any]]] = {room: [] for room in _ROOMS}  # each room's events
    ours: dict[str, list[int]] = {room: [] for room in _ROOMS}  # messages after we came in
    asked: list[dict[str, Any]] = []  # requests out on the DEALER, answered in order
    got: dict[str, list[int]] = {room: [] for room in _ROOMS}

    def take(actions: list[Action]) -> None:
        for item in items(actions):
            if isinstance(item, Message):
                got[item.room].append(item.seq)
            elif isinstance(item, Status):
                assert item.state in (ClientStatus.CONNECTED, ClientStatus.RECONNECTED,
                                      ClientStatus.DISCONNECTED), item
        asked.extend(b for b in sent(actions) if b["type"] in ("history", "enter"))

    def publish(room: str, event: dict[str, Any], lost: bool) -> None:
        said[room].append(event)
        if not lost and session.joined:
            take(session.reply_received(reply(**event), now) if room == "secret"
                 else session.broadcast_received(on_topic(event), now))

    def come_in(rid: str) -> None:
        # The broker enters us (again: a takeover re-announces us) in every room.
        for room in _ROOMS:
            said[room].append({"type": "joined", "room": room, "seq": len(said[room]) + 1,
                               "ts": 1.0, "name": "alice", "addr": "x"})
        take(session.reply_received(welcome2(rid, _ROOMS, len(said[ROOM])), now))

    def rejoin() -> None:
        nonlocal now
        asked.clear()  # the old DEALER's answers never come
        session.handshake_succeeded()
        take(session.disconnected(now))
        now = session.deadline()
        come_in(join_id(session.tick(now)))

    def answer(page: int, fail: bool) -> None:
        body = asked.pop(0)
        room = body["room"]
        if body["type"] == "enter":
            take(session.reply_received(entered(body["id"], room, len(said[room])), now))
        elif fail:
            take(session.reply_received(reply(type="error", code="rate_limited", detail="",
                                              id=body["id"], room=room), now))
        else:
            events = said[room][body["after"]:][:page]
            take(session.reply_received(reply(type="history", room=room, events=events,
                                              id=body["id"]), now))

    def pong() -> None:
        seqs = {room: len(events) for room, events in said.items()}
        take(session.reply_received(reply(type="pong", ts=1.0, seqs=seqs), now))

    come_in(join_id(session.start(now)))
    for _ in range(data.draw(st.integers(0, 150), label="steps")):
        step = data.draw(st.sampled_from(["say", "say", "answer", "pong", "tick", "reconnect"]))
        if step == "say":
            room = data.draw(st.sampled_from(_ROOMS))
            if len(ours[room]) < total[room]:
                ours[room].append(len(said[room]) + 1)
                publish(room, in_room(len(said[room]) + 1, room),
                        data.draw(st.booleans(), label="lost"))
        elif step == "answer" and asked:
            answer(data.draw(st.integers(1, 4)), data.draw(st.booleans()))
        elif step == "pong" and session.phase is Phase.JOINED:
            pong()
        elif step == "reconnect" and session.phase is Phase.JOINED:
            rejoin()
        else:
            now += data.draw(st.sampled_from([0.1, FILL_RETRY_SECONDS, 1.0]))
            session.reply_received(reply(type="pong", ts=1.0), now)  # the broker is alive
            take(session.tick(now))
    # Everything said (unheard); then the broker behaves: the client must catch up.
    for room in _ROOMS:
        while len(ours[room]) < total[room]:
            ours[room].append(len(said[room]) + 1)
            publish(room, in_room(len(said[room]) + 1, room), True)
    if session.phase is not Phase.JOINED:
        rejoin()
    pong()
    for _ in range(2000):
        if asked:
            answer(HISTORY_PAGE_MAX, False)
        elif got != ours:
            now += FILL_RETRY_SECONDS
            take(session.tick(now))
            pong()
        else:
            break
    assert got == ours
