"""Conformance of a real broker to the wire contract, from the contract alone.

Written as a third-party client author would, from ROOMS.md (version 2),
PROTOCOL.md (version 1) and the project's PROTOCOL.md (its choices): a plain
DEALER, a plain SUB and msgpack, not zchat's client library, against a real
``zchat-broker`` on ephemeral loopback ports (``start_broker`` from
conftest).

Nothing here sleeps to let things settle. A broker is one loop with one PUB
socket, so the frames one subscriber receives keep the order they were
published in: to show that something was *not* announced, a test makes a
later event (a marker) and checks what came before it on the SUB, or checks
that the next event's seq is the one after the last.

Defines ``Peer`` (the raw client), ``check_reply`` and ``check_event``
(every reply, event and frame the client receives is checked against its
contract row, and each room's seq must rise by exactly 1 on the SUB and, for
a private room, on the DEALER), and the tests, one per contract row or rule.
``test_conformance_v1`` reuses ``Peer`` for the version 1 rows.

Every test runs twice: once against the broker itself (``[direct]``) and
once through a real ``zchat-relay`` in front of it (``[relay]``): the
project's promise is that a client written from the contract alone works
unchanged through a relay. ``start_broker`` is overridden here (and
imported by ``test_conformance_v1``) so that in the relay case each broker
a test starts gets the relay link (keys made for the session) and a relay,
and the ``RunningBroker`` the test sees names the relay's two endpoints;
its ``control`` and its process stay the broker's, so ``zchat-admin``, a
stop or a restart act on the broker behind the relay.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq
import zmq.auth
from test_relay import Keys, RunningRelay, free_ports, spawn_relay, wait_listening

from conftest import RunningBroker

Body = dict[str, Any]

# Replies a request may get; anything else arriving on the DEALER (a private
# room's events, `invited`, `bye`) is unsolicited and kept in the inbox.
REPLY_TYPES = {"welcome", "entered", "parted", "ack", "error", "pong", "members",
               "history", "rooms"}

_ids = itertools.count(1)
# ROOMS.md: 1 to 64 of a-z 0-9 - _ . starting with a letter or digit, folded.
ROOM_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


@dataclass
class Frame:
    """One PUB frame as a subscriber received it."""

    topic: bytes
    raw: bytes
    body: Body


class Peer:
    """A raw client: one DEALER for requests, one optional SUB for PUB."""

    def __init__(self, ctx: zmq.Context[Any], broker: RunningBroker,
                 curve: tuple[bytes, bytes, bytes] | None = None) -> None:
        self.curve = curve  # (broker's public key, own public key, own secret key)
        self.dealer = ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self._secure(self.dealer)
        # The project asks clients to announce a routing id not starting
        # with a zero byte (those are libzmq's own), or none.
        self.dealer.setsockopt(zmq.ROUTING_ID, b"\x01" + os.urandom(15))
        self.dealer.connect(broker.input)
        self.ctx = ctx
        self.broker = broker
        self.sub: zmq.Socket[Any] | None = None
        self.inbox: list[Body] = []
        self.pending: list[Frame] = []
        self.seen: list[Frame] = []
        self.pub_seqs: dict[str, int] = {}     # room -> last seq seen on the SUB
        self.dealer_seqs: dict[str, int] = {}  # room -> last seq of a private room's events
        self.name = ""

    def _secure(self, sock: zmq.Socket[Any]) -> None:
        if self.curve is not None:
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = self.curve

    # -- DEALER ----------------------------------------------------------

    def send(self, body: Body) -> None:
        self.dealer.send(msgpack.packb(body))

    def _recv(self, deadline: float) -> Body:
        left = deadline - time.monotonic()
        if left <= 0 or not self.dealer.poll(int(left * 1000)):
            raise AssertionError("no frame on the DEALER in time")
        body: Body = msgpack.unpackb(self.dealer.recv())
        self._check_dealer(body)
        return body

    def _check_dealer(self, body: Body) -> None:
        """Every map on the DEALER obeys the contract (private events: seqs +1)."""
        kind, room = body.get("type"), body.get("room")
        assert isinstance(kind, str), body
        if kind in ("entered", "parted") and isinstance(room, str):
            self.dealer_seqs.pop(room, None)  # a new run starts after (re-)entering
        elif kind not in REPLY_TYPES and "seq" in body:
            check_event(body)
            room = str(room)
            last = self.dealer_seqs.get(room)
            assert last is None or body["seq"] == last + 1, ("DEALER seq gap", last, body)
            self.dealer_seqs[room] = body["seq"]
            if kind == "left" and body.get("name") == self.name:
                self.dealer_seqs.pop(room, None)

    def _recv_any(self, timeout: float = 5.0) -> Body:
        """The next map on the DEALER, whatever it is."""
        return self._recv(time.monotonic() + timeout)

    def reply(self, rid: str, timeout: float = 5.0) -> Body:
        """The reply echoing ``rid``; anything else goes to the inbox."""
        deadline = time.monotonic() + timeout
        while True:
            body = self._recv(deadline)
            if body.get("id") == rid and body.get("type") in REPLY_TYPES:
                check_reply(body)
                return body
            self.inbox.append(body)

    def request(self, kind: str, **fields: Any) -> Body:
        rid = fields.pop("id", None) or f"c{next(_ids)}"
        self.send({"type": kind, "id": rid, **fields})
        return self.reply(rid)

    def ok(self, kind: str, **fields: Any) -> Body:
        """A request that must not be refused."""
        reply = self.request(kind, **fields)
        assert reply["type"] != "error", (kind, fields, reply)
        return reply

    def error(self, kind: str, **fields: Any) -> Body:
        """A request that must be refused."""
        reply = self.request(kind, **fields)
        assert reply["type"] == "error", (kind, fields, reply)
        assert isinstance(reply.get("detail"), str)
        return reply

    def unsolicited(self, match: Callable[[Body], bool], timeout: float = 5.0) -> Body:
        """The first DEALER map (not a reply) that ``match``es."""
        deadline = time.monotonic() + timeout
        while True:
            for i, body in enumerate(self.inbox):
                if match(body):
                    return self.inbox.pop(i)
            self.inbox.append(self._recv(deadline))

    def join(self, name: str, **fields: Any) -> Body:
        welcome = self.ok("join", name=name, **fields)
        assert welcome["type"] == "welcome"
        self.name = welcome["name"]
        return welcome

    # -- SUB -------------------------------------------------------------

    def listen(self, *topics: bytes) -> None:
        """Connect a SUB (to everything unless topics are named)."""
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RCVHWM, 0)
        self._secure(self.sub)
        for topic in topics or (b"",):
            self.sub.setsockopt(zmq.SUBSCRIBE, topic)
        self.sub.connect(self.broker.broadcast)

    def _frame(self, deadline: float) -> Frame:
        if self.pending:
            return self.pending.pop(0)
        assert self.sub is not None
        left = deadline - time.monotonic()
        if left <= 0 or not self.sub.poll(int(left * 1000)):
            raise AssertionError("no matching frame on the SUB in time")
        topic, raw = self.sub.recv_multipart()
        frame = Frame(topic, raw, msgpack.unpackb(raw))
        self.seen.append(frame)
        self._check_frame(frame)
        return frame

    def _check_frame(self, frame: Frame) -> None:
        """Every PUB frame obeys the contract: fields, topic, seq +1 per room."""
        body = frame.body
        if frame.topic == b"\x00":
            assert body["type"] in ("heartbeat", "shutdown"), body
            if body["type"] == "heartbeat":
                assert isinstance(body["ts"], float) and isinstance(body["epoch"], str)
                assert all(isinstance(k, str) and isinstance(v, int)
                           for k, v in body["seqs"].items()), body
            return
        if frame.topic.startswith(b"\x01"):       # a batch (--coalesce)
            assert frame.topic == b"\x01" + body["room"].encode() + b"\x00", frame
            for event in body["events"]:
                check_event(event)
            return
        check_event(body)
        assert frame.topic == body["room"].encode() + b"\x00", frame
        last = self.pub_seqs.get(body["room"])
        assert last is None or body["seq"] == last + 1, ("PUB seq gap", last, body)
        self.pub_seqs[body["room"]] = body["seq"]

    def wait_live(self, timeout: float = 5.0) -> None:
        """Wait until the SUB receives a frame (a heartbeat at the latest).

        PUB/SUB connects asynchronously: before its first frame a SUB may
        miss events. The frame is kept for ``upto``.
        """
        self.pending.append(self._frame(time.monotonic() + timeout))

    def upto(self, match: Callable[[Frame], bool], timeout: float = 5.0) -> list[Frame]:
        """Every frame received up to and including the first that matches."""
        deadline = time.monotonic() + timeout
        got: list[Frame] = []
        while True:
            frame = self._frame(deadline)
            got.append(frame)
            if match(frame):
                return got

    def event(self, room: str, **want: Any) -> Body:
        """The next event of ``room`` on its topic whose fields include ``want``."""
        frames = self.upto(lambda f: f.topic == room.encode() + b"\x00"
                           and f.body.get("room") == room
                           and all(f.body.get(k) == v for k, v in want.items()))
        return frames[-1].body

    def room_frames_upto(self, room: str, **want: Any) -> list[Body]:
        """The events of ``room`` up to the first that matches ``want``."""
        topic = room.encode() + b"\x00"
        frames = self.upto(lambda f: f.topic == topic and f.body.get("room") == room
                           and all(f.body.get(k) == v for k, v in want.items()))
        return [f.body for f in frames if f.topic == topic]


Net = Callable[..., Peer]


def _member_list(members: Any) -> None:
    assert isinstance(members, list) and len(members) <= 1000, members
    for m in members:
        assert isinstance(m["name"], str) and isinstance(m["addr"], str), m


def check_reply(body: Body) -> None:
    """A reply has the fields and types its row in the contract gives it."""
    kind = body["type"]
    if kind in ("welcome", "entered", "parted", "members", "history") or (
            kind == "ack" and "room" in body):    # a `dm`'s ack names no room
        assert ROOM_NAME.fullmatch(body["room"]), body
    if kind == "welcome":
        for key, typ in (("name", str), ("addr", str), ("seq", int), ("pub", str),
                         ("token", str), ("count", int), ("rooms", list)):
            assert isinstance(body[key], typ), (key, body)
        assert isinstance(body["heartbeat"], int | float)
        _member_list(body["members"])
        assert len(body["members"]) <= 100
        for refused in body.get("refused", []):
            assert isinstance(refused["room"], str) and isinstance(refused["code"], str)
    elif kind == "entered":
        fields: list[tuple[str, type[Any]]] = [
            ("seq", int), ("topic", str), ("count", int), ("ops", list),
            ("private", bool), ("moderated", bool), ("topic_ops", bool)]
        for key, typ in fields:
            assert isinstance(body[key], typ), (key, body)
        _member_list(body["members"])
        assert len(body["members"]) <= 100 and len(body["members"]) <= body["count"]
    elif kind == "ack":
        assert "seq" not in body or isinstance(body["seq"], int)
    elif kind == "error":
        assert isinstance(body["code"], str) and isinstance(body["detail"], str)
    elif kind == "pong":
        assert isinstance(body["ts"], float)
        if body.get("joined", True):            # a client not joined is in no room
            assert isinstance(body["seqs"], dict), body
    elif kind == "members":
        _member_list(body["members"])
        assert isinstance(body["count"], int) and len(body["members"]) <= body["count"]
        assert "next" not in body or isinstance(body["next"], str)
    elif kind == "history":
        seqs = [e["seq"] for e in body["events"]]
        assert seqs == sorted(set(seqs)), seqs
        for event in body["events"]:
            check_event(event)
            assert event["room"] == body["room"], event
    elif kind == "rooms":
        for room in body["rooms"]:
            assert ROOM_NAME.fullmatch(room["name"]) and isinstance(room["topic"], str)
            assert isinstance(room["count"], int) and isinstance(room["private"], bool)


def check_event(body: Body) -> None:
    """A room event has `type`, `room` (folded, valid), `seq` (from 1) and `ts`."""
    assert isinstance(body.get("type"), str), body
    room = body.get("room")
    assert isinstance(room, str) and ROOM_NAME.fullmatch(room), body
    assert isinstance(body.get("seq"), int) and body["seq"] >= 1, body
    assert isinstance(body.get("ts"), float), body


# Options a relay takes from the broker's command line: client CURVE ends at
# the relay, so its clients need it there.
RELAY_TAKES = ("--secret-key", "--authorized-keys")


@pytest.fixture(scope="session")
def relay_keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    """The relay link's keys (the broker's pair, two relays'), made once."""
    return Keys(tmp_path_factory.mktemp("relay-keys") / "keys")


# The tests also run through a relay by default: together they send every
# request type (join, enter, part, leave, message, dm, history, who, rooms,
# topic, mode, op, deop, kick, ban, unban, invite, close, ping, a bad frame)
# and receive every event path (PUB topics a client picks, batch topics,
# heartbeats, private rooms' events, `invited` and `bye` on the DEALER, a
# takeover, a timeout, a restart, a shutdown, CURVE). The rest run through a
# relay too with ZCHAT_CONFORMANCE_RELAY=all (all pass; a relay in each test
# doubles the module's time, since each test starts its own broker).
THROUGH_RELAY = {
    "test_v1_client_join_message_history_who_mean_lobby",
    "test_v1_client_counts_seq_of_event_types_it_does_not_know",
    "test_join_with_rooms_enters_them_and_names_the_refused",
    "test_enter_reports_the_room_and_entering_again_announces_nothing",
    "test_part_answers_parted_and_announces_left_part_with_detail",
    "test_leave_takes_the_client_out_of_every_room",
    "test_who_pages_by_folded_name_with_after_limit_next_and_count",
    "test_rooms_lists_public_rooms_and_only_ones_own_private_rooms",
    "test_topic_needs_an_op_while_topic_ops_is_on",
    "test_moderated_room_takes_messages_from_ops_only",
    "test_op_and_deop_announce_mode_and_grant_and_remove_operator_rights",
    "test_kick_announces_left_kicked_with_by_and_detail",
    "test_ban_removes_and_bars_the_name_until_unban",
    "test_invite_to_a_public_room_sends_invited_to_the_invitee",
    "test_private_room_is_invisible_to_non_members",
    "test_private_room_members_get_its_events_on_the_dealer_own_included",
    "test_an_invitation_to_a_private_room_lets_the_invitee_in",
    "test_closing_a_room_tells_its_members_and_keeps_its_seq",
    "test_closing_a_private_room_tells_only_its_members",
    "test_heartbeat_carries_every_public_room_whose_seq_moved",
    "test_pong_carries_the_last_seq_of_each_room_the_client_is_in",
    "test_takeover_announces_joined_in_each_room_of_the_session",
    "test_a_takeover_announces_a_private_rooms_joined_on_the_dealer_only",
    "test_after_a_takeover_private_events_reach_the_new_connection",
    "test_an_operator_kick_from_the_broker_tells_a_private_room_on_the_dealer_only",
    "test_with_batches_a_private_room_still_never_reaches_pub",
    "test_rooms_topics_and_history_outlive_a_broker_restart",
    "test_a_big_room_announces_no_comings_but_always_kicks",
    "test_under_curve_operator_status_belongs_to_the_key",
    "test_a_silent_client_times_out_of_every_room",
    "test_shutdown_announces_left_in_every_room_then_shutdown",
    "test_a_storm_of_joins_gives_every_client_a_consistent_room",
    "test_pipelined_requests_are_answered_in_order",
    "test_rate_limited_names_the_room",
    "test_history_pages_default_to_100_and_cap_at_1000",
    "test_wrongly_typed_fields_are_bad_request_naming_the_room",
    "test_the_51st_room_is_too_many_and_a_part_frees_a_place",
    "test_two_ops_kicking_each_other_at_the_same_instant_one_wins",
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Each test ``[direct]``, and ``[relay]`` where ``THROUGH_RELAY`` (or all) says."""
    if "hop" not in metafunc.fixturenames:
        return
    everything = os.environ.get("ZCHAT_CONFORMANCE_RELAY") == "all"
    relayed = everything or metafunc.function.__name__ in THROUGH_RELAY or (
        metafunc.module.__name__ != __name__)  # test_conformance_v1: every test
    metafunc.parametrize("hop", ["direct", "relay"] if relayed else ["direct"],
                         indirect=True)


@pytest.fixture
def hop(request: pytest.FixtureRequest) -> str:
    """"direct" or "relay": how the tests' clients reach the broker."""
    return str(request.param)


@pytest.fixture
def start_broker(hop: str, start_broker: Callable[..., RunningBroker],
                 relay_keys: Keys) -> Iterator[Callable[..., RunningBroker]]:
    """conftest's ``start_broker``, or the same broker behind a ``zchat-relay``."""
    if hop == "direct":
        yield start_broker
        return
    relays: list[RunningRelay] = []

    def start(*args: str, env: dict[str, str] | None = None) -> RunningBroker:
        taken = [a for i, a in enumerate(args) if a in RELAY_TAKES
                 or (i and args[i - 1] in RELAY_TAKES)]
        # The relay starts while the broker does (each takes a Python start-up),
        # on a link port picked now; it connects once the broker is there.
        link = f"tcp://127.0.0.1:{free_ports(1)[0]}"
        spawned = spawn_relay(link, relay_keys, "relay-a", *taken)
        try:
            broker = start_broker(
                *args, "--relay-bind", link, "--relay-broadcast", "tcp://127.0.0.1:0",
                "--relay-keys", str(relay_keys.relays),
                "--relay-secret-key", relay_keys.secret("broker"), env=env)
        finally:
            relay = wait_listening(*spawned)
            relays.append(relay)
        # A relay cuts whoever speaks before its link is up (as a dead
        # broker would): a test starts once the link is there.
        relay.wait_log("connected to the broker")
        return dataclasses.replace(broker, input=relay.input, broadcast=relay.broadcast)

    yield start
    for relay in relays:
        relay.release()


@pytest.fixture
def zb(start_broker: Callable[..., RunningBroker]) -> RunningBroker:
    """A broker with its defaults (a short heartbeat, so waits are short)."""
    return start_broker("--heartbeat", "0.5")


@pytest.fixture
def net(ctx: zmq.Context[Any], zb: RunningBroker) -> Iterator[Net]:
    """``net(name, listen=False, **join_fields)``: a raw peer, joined if named."""
    def make(name: str | None = None, *, listen: bool = False, **fields: Any) -> Peer:
        peer = Peer(ctx, zb)
        if listen:
            peer.listen()
            peer.wait_live()
        if name is not None:
            peer.join(name, **fields)
        return peer

    yield make


def names(members: list[Body]) -> list[str]:
    return [m["name"] for m in members]


def admin(broker: RunningBroker, *argv: str) -> None:
    subprocess.run(["zchat-admin", "--control", broker.control, *argv],
                   check=True, capture_output=True, timeout=15)


# -- version 1 compatibility ------------------------------------------------


def test_v1_client_join_message_history_who_mean_lobby(net: Net) -> None:
    """ROOMS.md Compatibility: a v1 client works unchanged; no `room` means lobby."""
    v1 = net(listen=True)
    welcome = v1.join("vera")
    assert welcome["room"] == "lobby"
    assert welcome["rooms"] == ["lobby"]
    assert "vera" in names(welcome["members"])
    assert welcome["count"] == len(welcome["members"]) == 1
    assert "refused" not in welcome or welcome["refused"] == []

    ack = v1.ok("message", text="hello")
    assert ack["type"] == "ack" and ack["room"] == "lobby"
    assert ack["seq"] == welcome["seq"] + 1
    event = v1.event("lobby", type="message")
    assert event == {**event, "room": "lobby", "seq": ack["seq"], "from": "vera",
                     "text": "hello"}
    assert isinstance(event["ts"], float)

    history = v1.ok("history", after=0)
    assert history["type"] == "history" and history["room"] == "lobby"
    seqs = [e["seq"] for e in history["events"]]
    assert seqs == list(range(1, ack["seq"] + 1))
    assert all(e["room"] == "lobby" for e in history["events"])

    who = v1.ok("who")
    assert who["type"] == "members" and who["room"] == "lobby"
    assert names(who["members"]) == ["vera"] and who["count"] == 1
    assert "next" not in who


def test_v1_client_counts_seq_of_event_types_it_does_not_know(
        net: Net, ctx: zmq.Context[Any], zb: RunningBroker) -> None:
    """v1: clients ignore unknown types but count their seq; v2 adds them to lobby.

    A v1 client subscribed only to ``lobby\\x00`` (and ``\\x00``) must see a
    gapless run of seqs across `mode` and `topic`, which it does not know.
    """
    v1 = Peer(ctx, zb)
    v1.listen(b"lobby\x00", b"\x00")
    v1.wait_live()
    welcome = v1.join("old")
    alice = net("alice")
    admin(zb, "op", "lobby", "alice")
    alice.ok("topic", room="lobby", text="v2 was here")
    last = alice.ok("message", text="done")["seq"]
    bodies = [b for b in v1.room_frames_upto("lobby", seq=last) if b["seq"] > welcome["seq"]]
    assert [b["seq"] for b in bodies] == list(range(welcome["seq"] + 1, last + 1))
    assert {"mode", "topic"} <= {b["type"] for b in bodies}
    history = v1.ok("history", after=welcome["seq"])
    assert [e["seq"] for e in history["events"]] == list(range(welcome["seq"] + 1, last + 1))


# -- join with rooms ----------------------------------------------------------


def test_join_with_rooms_enters_them_and_names_the_refused(net: Net) -> None:
    """`join` `rooms`: entered ones in `rooms`, the rest in `refused`; join succeeds."""
    alice = net()
    welcome = alice.join("alice", rooms=["Lobby", "Party", "bad room", "party", "-x"])
    assert welcome["rooms"] == ["lobby", "party"]
    assert welcome["refused"] == [{"room": "bad room", "code": "bad_room"},
                                  {"room": "-x", "code": "bad_room"}]
    assert welcome["room"] == "lobby"          # lobby entered: the v1 fields are lobby's
    assert welcome["seq"] == alice.ok("ping")["seqs"]["lobby"]

    bob = net()
    welcome = bob.join("bob", rooms=["party"])
    assert welcome["rooms"] == ["party"]       # lobby not entered: first room's fields
    assert welcome["room"] == "party"
    assert welcome["seq"] == 2                  # alice's joined, then bob's own
    assert welcome["count"] == 2
    assert sorted(names(welcome["members"])) == ["alice", "bob"]


def test_join_refuses_a_private_room_as_forbidden(net: Net) -> None:
    alice = net("alice")
    alice.ok("enter", room="hideout", private=True)
    carol = net()
    welcome = carol.join("carol", rooms=["hideout", "lobby"])
    assert welcome["rooms"] == ["lobby"]
    assert welcome["refused"] == [{"room": "hideout", "code": "forbidden"}]


# -- enter / part ------------------------------------------------------------


def test_enter_reports_the_room_and_entering_again_announces_nothing(net: Net) -> None:
    alice = net("alice", listen=True)
    entered = alice.ok("enter", room="Den")
    assert entered["type"] == "entered"
    assert entered == {**entered, "room": "den", "seq": 1, "topic": "", "count": 1,
                       "ops": ["alice"], "private": False, "moderated": False,
                       "topic_ops": True}
    assert names(entered["members"]) == ["alice"]
    assert isinstance(entered["members"][0]["addr"], str)
    joined = alice.event("den", type="joined")
    assert joined == {**joined, "seq": 1, "name": "alice"}

    bob = net("bob")
    entered = bob.ok("enter", room="DEN")
    assert entered == {**entered, "room": "den", "seq": 2, "count": 2, "ops": ["alice"]}
    assert sorted(names(entered["members"])) == ["alice", "bob"]

    again = alice.ok("enter", room="den")
    assert again == {**again, "type": "entered", "room": "den", "seq": 2, "count": 2}
    ack = alice.ok("message", room="den", text="after")
    assert ack == {**ack, "type": "ack", "room": "den", "seq": 3}
    bodies = alice.room_frames_upto("den", seq=3)
    assert [(b["seq"], b["type"]) for b in bodies] == [(2, "joined"), (3, "message")]


def test_part_answers_parted_and_announces_left_part_with_detail(net: Net) -> None:
    alice = net("alice", listen=True)
    alice.ok("enter", room="den")
    bob = net("bob")
    bob.ok("enter", room="den")
    parted = bob.ok("part", room="DEN", reason="bye now")
    assert parted["type"] == "parted" and parted["room"] == "den"
    left = alice.event("den", type="left")
    assert left == {**left, "name": "bob", "reason": "part", "detail": "bye now", "seq": 3}

    for kind, extra in (("message", {"text": "x"}), ("part", {})):
        err = bob.error(kind, room="den", **extra)
        assert (err["code"], err["room"]) == ("not_in_room", "den")

    bob.ok("part", room="lobby")               # lobby may be parted like any room
    assert "lobby" not in bob.ok("ping")["seqs"]


def test_a_message_without_room_after_parting_lobby_is_refused_naming_lobby(
        net: Net) -> None:
    """ROOMS.md Compatibility: no `room` means lobby, and every reply that
    concerns a room carries `room`: the client must learn which room refused."""
    bob = net("bob")
    bob.ok("part", room="lobby")
    err = bob.error("message", text="no room means lobby")
    assert (err["code"], err.get("room")) == ("not_in_room", "lobby")


def test_leave_takes_the_client_out_of_every_room(net: Net) -> None:
    """ROOMS.md: leaving the broker announces one `left` in each room it is in."""
    spy = net("spy", listen=True, rooms=["lobby", "a", "b"])
    alice = net("alice", rooms=["lobby", "a", "b"])
    alice.send({"type": "leave", "reason": "gone"})
    for room in ("lobby", "a", "b"):
        left = spy.event(room, type="left", name="alice")
        assert left["reason"] == "leave"


# -- messages, history, who, rooms -------------------------------------------


def test_message_is_acked_with_its_room_and_published_on_the_room_topic(net: Net) -> None:
    alice = net("alice", listen=True, rooms=["lobby", "chat"])
    ack = alice.ok("message", room="Chat", text="hi")
    assert ack == {**ack, "type": "ack", "room": "chat", "seq": 2}
    event = alice.event("chat", type="message")
    assert event == {**event, "seq": 2, "from": "alice", "text": "hi"}
    err = alice.error("message", room="nowhere", text="x")
    assert (err["code"], err["room"]) == ("no_such_room", "nowhere")


def test_history_of_a_room_is_that_rooms_events_and_readable_without_entering(
        net: Net) -> None:
    alice = net("alice", rooms=["lobby", "den"])
    for text in ("one", "two"):
        alice.ok("message", room="den", text=text)
    bob = net("bob")                            # not in den: a public room is readable
    history = bob.ok("history", room="DEN", after=0)
    assert history["type"] == "history" and history["room"] == "den"
    assert [(e["seq"], e["type"]) for e in history["events"]] == [
        (1, "joined"), (2, "message"), (3, "message")]
    assert all(e["room"] == "den" for e in history["events"])
    page = bob.ok("history", room="den", after=1, limit=1)
    assert [e["seq"] for e in page["events"]] == [2]
    err = bob.error("history", room="nowhere", after=0)
    assert (err["code"], err["room"]) == ("no_such_room", "nowhere")
    err = bob.error("history", room="Bad Room", after=0)
    assert (err["code"], err["room"]) == ("bad_room", "Bad Room")


def test_who_pages_by_folded_name_with_after_limit_next_and_count(net: Net) -> None:
    for name in ("delta", "Bravo", "alpha", "Echo", "charlie"):
        net(name, rooms=["club"])
    outsider = net("zulu")                      # public: who without entering
    pages = []
    after: str | None = None
    while True:
        fields: dict[str, Any] = {"room": "CLUB", "limit": 2}
        if after is not None:
            fields["after"] = after
        page = outsider.ok("who", **fields)
        assert page["type"] == "members" and page["room"] == "club"
        assert page["count"] == 5
        pages.append(names(page["members"]))
        if "next" not in page:
            break
        after = page["next"]
    assert pages == [["alpha", "Bravo"], ["charlie", "delta"], ["Echo"]]
    page = outsider.ok("who", room="club", after="c", limit=10)
    assert names(page["members"]) == ["charlie", "delta", "Echo"] and "next" not in page
    err = outsider.error("who", room="nowhere")
    assert (err["code"], err["room"]) == ("no_such_room", "nowhere")


def test_rooms_lists_public_rooms_and_only_ones_own_private_rooms(net: Net) -> None:
    alice = net("alice")
    alice.ok("enter", room="pub1")
    alice.ok("topic", room="pub1", text="about pub1")
    alice.ok("enter", room="priv1", private=True)
    alice.ok("enter", room="pub2")
    alice.ok("part", room="pub2")               # empty, but still listed
    bob = net("bob")

    listed = {r["name"]: r for r in bob.ok("rooms")["rooms"]}
    assert {"lobby", "pub1", "pub2"} <= set(listed) and "priv1" not in listed
    assert listed["pub1"] == {"name": "pub1", "topic": "about pub1", "count": 1,
                              "private": False}
    assert listed["pub2"]["count"] == 0
    assert listed["lobby"]["count"] == 2
    mine = {r["name"]: r for r in alice.ok("rooms")["rooms"]}
    assert mine["priv1"] == {"name": "priv1", "topic": "", "count": 1, "private": True}


# -- operators: topic, mode, op, deop, kick, ban, unban, invite --------------


def test_topic_needs_an_op_while_topic_ops_is_on(net: Net) -> None:
    alice = net("alice", listen=True, rooms=["t"])
    bob = net("bob", rooms=["t"])
    err = bob.error("topic", room="t", text="mine")
    assert (err["code"], err["room"]) == ("forbidden", "t")
    ack = alice.ok("topic", room="T", text="hello")
    assert ack["type"] == "ack" and ack["room"] == "t"
    event = alice.event("t", type="topic")
    assert event == {**event, "seq": ack["seq"], "name": "alice", "text": "hello"}
    assert bob.ok("enter", room="t")["topic"] == "hello"

    ack = alice.ok("mode", room="t", topic_ops=False)
    event = alice.event("t", type="mode")
    assert event == {**event, "seq": ack["seq"], "name": "alice", "topic_ops": False}
    ack = bob.ok("topic", room="t", text="anyone may")
    assert alice.event("t", type="topic")["name"] == "bob"


def test_moderated_room_takes_messages_from_ops_only(net: Net) -> None:
    alice = net("alice", listen=True, rooms=["m"])
    bob = net("bob", rooms=["m"])
    ack = alice.ok("mode", room="m", moderated=True)
    assert ack["room"] == "m"
    event = alice.event("m", type="mode")
    assert event == {**event, "seq": ack["seq"], "name": "alice", "moderated": True}
    err = bob.error("message", room="m", text="may I?")
    assert (err["code"], err["room"]) == ("forbidden", "m")
    assert alice.ok("message", room="m", text="ops may")["seq"] == ack["seq"] + 1


def test_mode_that_changes_nothing_is_acked_and_announces_nothing(net: Net) -> None:
    alice = net("alice", listen=True, rooms=["m"])
    before = alice.ok("message", room="m", text="before")["seq"]
    for change in ({"topic_ops": True}, {"moderated": False}, {"private": False}):
        ack = alice.ok("mode", room="m", **change)
        assert ack["type"] == "ack" and ack["room"] == "m"
    after = alice.ok("message", room="m", text="after")["seq"]
    assert after == before + 1
    bodies = alice.room_frames_upto("m", seq=after)
    assert [b["type"] for b in bodies if b["seq"] > before] == ["message"]


def test_op_and_deop_announce_mode_and_grant_and_remove_operator_rights(net: Net) -> None:
    alice = net("alice", listen=True, rooms=["o"])
    bob = net("bob", rooms=["o"])
    carol = net("carol", rooms=["o"])
    err = carol.error("op", room="o", name="carol")
    assert (err["code"], err["room"]) == ("forbidden", "o")

    ack = alice.ok("op", room="o", name="bob")
    event = alice.event("o", type="mode")
    assert event == {**event, "seq": ack["seq"], "name": "alice", "op": "bob"}
    assert sorted(bob.ok("enter", room="o")["ops"]) == ["alice", "bob"]
    bob.ok("mode", room="o", moderated=True)

    ack = alice.ok("deop", room="o", name="bob")
    event = alice.event("o", type="mode", deop="bob")
    assert event == {**event, "seq": ack["seq"], "name": "alice"}
    err = bob.error("mode", room="o", moderated=False)
    assert (err["code"], err["room"]) == ("forbidden", "o")


def test_kick_announces_left_kicked_with_by_and_detail(net: Net) -> None:
    alice = net("alice", listen=True, rooms=["k"])
    bob = net("bob", rooms=["k"])
    carol = net("carol", rooms=["k"])
    err = carol.error("kick", room="k", name="bob")
    assert (err["code"], err["room"]) == ("forbidden", "k")
    ack = alice.ok("kick", room="k", name="bob", reason="spam")
    assert ack["type"] == "ack" and ack["room"] == "k"
    left = alice.event("k", type="left")
    assert left == {**left, "seq": ack["seq"], "name": "bob", "reason": "kicked",
                    "by": "alice", "detail": "spam"}
    err = bob.error("message", room="k", text="still here?")
    assert (err["code"], err["room"]) == ("not_in_room", "k")
    bob.ok("enter", room="k")                   # a kick is not a ban


def test_ban_removes_and_bars_the_name_until_unban(net: Net) -> None:
    alice = net("alice", listen=True, rooms=["b"])
    bob = net("bob", rooms=["b"])
    ack = alice.ok("ban", room="b", name="bob")
    assert ack["type"] == "ack" and ack["room"] == "b"
    # alice's joined is 1, bob's 2; the ban makes a `mode` and a `left`, in either order.
    bodies = [b for b in alice.room_frames_upto("b", seq=4) if b["seq"] in (3, 4)]
    assert ack["seq"] in (3, 4)
    mode = next(b for b in bodies if b["type"] == "mode")
    left = next(b for b in bodies if b["type"] == "left")
    assert mode == {**mode, "name": "alice", "ban": "bob"}
    assert left == {**left, "name": "bob", "reason": "banned", "by": "alice"}

    err = bob.error("enter", room="b")
    assert (err["code"], err["room"]) == ("forbidden", "b")
    ack = alice.ok("unban", room="b", name="bob")
    event = alice.event("b", type="mode", unban="bob")
    assert event == {**event, "seq": ack["seq"], "name": "alice"}
    bob.ok("enter", room="b")

    ack = alice.ok("ban", room="b", name="zed")  # a name not present may be banned
    event = alice.event("b", type="mode", ban="zed")
    assert event["seq"] == ack["seq"]


def test_invite_to_a_public_room_sends_invited_to_the_invitee(net: Net) -> None:
    alice = net("alice", rooms=["pub"])
    bob = net("bob", rooms=["pub"])             # any member of a public room may invite
    carol = net("carol")
    ack = bob.ok("invite", room="pub", name="carol")
    assert ack["type"] == "ack" and ack["room"] == "pub"
    invited = carol.unsolicited(lambda b: b.get("type") == "invited")
    assert invited == {**invited, "room": "pub", "from": "bob"}
    err = carol.error("invite", room="pub", name="alice")
    assert (err["code"], err["room"]) == ("not_in_room", "pub")
    del alice


@pytest.mark.parametrize(("kind", "fields"), [
    ("topic", {"text": "x"}),
    ("mode", {"moderated": True}),
    ("op", {"name": "bob"}),
    ("deop", {"name": "alice"}),
    ("kick", {"name": "alice"}),
    ("ban", {"name": "alice"}),
    ("unban", {"name": "alice"}),
])
def test_room_changes_need_an_operator(net: Net, kind: str, fields: Body) -> None:
    net("alice", rooms=["r"])
    bob = net("bob", rooms=["r"])
    err = bob.error(kind, room="r", **fields)
    assert (err["code"], err["room"]) == ("forbidden", "r")


def test_operator_status_is_lost_on_leaving_the_room(net: Net) -> None:
    """ROOMS.md: once the op's connection leaves the room, re-entering does not restore it."""
    alice = net("alice", rooms=["gone"])
    alice.ok("part", room="gone")
    assert alice.ok("enter", room="gone")["ops"] == []
    err = alice.error("mode", room="gone", moderated=True)
    assert (err["code"], err["room"]) == ("forbidden", "gone")


def test_operator_status_survives_a_takeover_with_the_token(net: Net) -> None:
    old = net()
    token = old.join("alice", rooms=["lobby", "tk"])["token"]
    new = net()
    new.join("alice", token=token, rooms=["lobby", "tk"])
    bye = old.unsolicited(lambda b: b.get("type") == "bye")
    assert bye["reason"] == "replaced"
    assert new.ok("enter", room="tk")["ops"] == ["alice"]
    new.ok("mode", room="tk", moderated=True)


# -- private rooms -----------------------------------------------------------


def test_private_room_is_invisible_to_non_members(net: Net) -> None:
    """A SUB subscribed to everything sees no frame naming it, heartbeats included."""
    spy = net("spy", listen=True)
    alice = net("alice")
    bob = net("bob")
    entered = alice.ok("enter", room="secretroom", private=True)
    assert entered["private"] is True

    err = bob.error("enter", room="secretroom")
    assert (err["code"], err["room"]) == ("forbidden", "secretroom")
    for kind, extra in (("history", {"after": 0}), ("who", {}),
                        ("message", {"text": "x"}), ("topic", {"text": "x"}),
                        ("part", {}), ("mode", {"moderated": True}),
                        ("invite", {"name": "spy"})):
        err = bob.error(kind, room="secretroom", **extra)
        assert (err["code"], err["room"]) == ("not_in_room", "secretroom"), kind
    assert "secretroom" not in {r["name"] for r in bob.ok("rooms")["rooms"]}

    alice.ok("invite", room="secretroom", name="bob")
    invited = bob.unsolicited(lambda b: b.get("type") == "invited")
    assert invited == {**invited, "room": "secretroom", "from": "alice"}
    entered = bob.ok("enter", room="secretroom")
    assert entered["private"] is True and entered["count"] == 2
    err = bob.error("invite", room="secretroom", name="spy")   # only ops, in private
    assert (err["code"], err["room"]) == ("forbidden", "secretroom")

    # Members get the room's events on their DEALER, as the same maps, in seq order.
    joined = alice.unsolicited(lambda b: b.get("type") == "joined" and b.get("seq") == 2)
    assert joined == {**joined, "room": "secretroom", "seq": 2, "name": "bob"}
    ack = alice.ok("message", room="secretroom", text="psst")
    got = bob.unsolicited(lambda b: b.get("type") == "message")
    assert got == {**got, "room": "secretroom", "seq": ack["seq"], "from": "alice",
                   "text": "psst"}
    ack = alice.ok("kick", room="secretroom", name="bob")
    left = bob.unsolicited(lambda b: b.get("type") == "left")   # its own left, on DEALER
    assert left == {**left, "room": "secretroom", "seq": ack["seq"], "reason": "kicked"}

    # Two heartbeats after a lobby marker: all that was published meanwhile is in.
    marker = alice.ok("message", text="marker")["seq"]
    spy.upto(lambda f: f.topic == b"lobby\x00" and f.body.get("seq") == marker)
    for _ in range(2):
        beat = spy.upto(lambda f: f.topic == b"\x00" and f.body.get("type") == "heartbeat")
        assert "lobby" in beat[-1].body["seqs"]
    leaks = [f for f in spy.seen if b"secretroom" in f.topic + f.raw]
    assert leaks == []


def test_making_a_room_private_tells_members_on_their_dealer_only(net: Net) -> None:
    spy = net("spy", listen=True)
    alice = net("alice", rooms=["flip"])
    bob = net("bob", rooms=["flip"])
    ack = alice.ok("mode", room="flip", private=True)
    got = bob.unsolicited(lambda b: b.get("type") == "mode")
    assert got == {**got, "room": "flip", "seq": ack["seq"], "private": True}
    marker = spy.ok("message", text="marker")["seq"]
    frames = spy.upto(lambda f: f.topic == b"lobby\x00" and f.body.get("seq") == marker)
    assert [f.body for f in frames if f.body.get("room") == "flip"
            and f.body.get("seq", 0) >= ack["seq"]] == []
    assert "flip" not in {r["name"] for r in spy.ok("rooms")["rooms"]}


# -- names and errors --------------------------------------------------------


@pytest.mark.parametrize("room", ["", "-x", "_x", ".x", "has space", "#hash", "caf\u00e9",
                                  "\u212aelvin", "a" * 65, "tab\t", "slash/"])
def test_bad_room_names_are_refused_naming_the_room_as_sent(net: Net, room: str) -> None:
    alice = net("alice")
    err = alice.error("enter", room=room)
    assert (err["code"], err["room"]) == ("bad_room", room)


def test_room_names_fold_to_lower_case_and_allow_the_whole_alphabet(net: Net) -> None:
    alice = net("alice")
    for sent, folded in (("A" * 64, "a" * 64), ("0Day", "0day"), ("a-B_c.9", "a-b_c.9")):
        assert alice.ok("enter", room=sent)["room"] == folded


@pytest.mark.parametrize(("kind", "fields"), [
    ("part", {}), ("message", {"text": "x"}), ("history", {"after": 0}), ("who", {}),
    ("topic", {"text": "x"}), ("mode", {"moderated": True}), ("op", {"name": "alice"}),
    ("deop", {"name": "alice"}), ("kick", {"name": "alice"}), ("ban", {"name": "zed"}),
    ("unban", {"name": "zed"}), ("invite", {"name": "alice"}),
])
def test_errors_name_their_room(net: Net, kind: str, fields: Body) -> None:
    """no_such_room for a room that does not exist; not_in_room for one not entered."""
    alice = net("alice", rooms=["lobby", "there"])
    bob = net("bob")
    err = bob.error(kind, room="Nowhere", **fields)
    assert (err["code"], err["room"]) == ("no_such_room", "nowhere")
    err = bob.error(kind, room="Bad Room", **fields)
    assert (err["code"], err["room"]) == ("bad_room", "Bad Room")
    if kind not in ("history", "who"):          # readable without entering
        err = bob.error(kind, room="THERE", **fields)
        assert (err["code"], err["room"]) == ("not_in_room", "there")
    del alice


def test_the_51st_room_is_too_many_and_a_part_frees_a_place(net: Net) -> None:
    fifty = ["lobby"] + [f"r{i}" for i in range(49)]
    alice = net()
    assert alice.join("alice", rooms=fifty)["rooms"] == fifty
    err = alice.error("enter", room="r49")
    assert (err["code"], err["room"]) == ("too_many_rooms", "r49")
    alice.ok("part", room="r0")
    assert alice.ok("enter", room="r49")["room"] == "r49"

    bob = net()
    welcome = bob.join("bob", rooms=[*fifty, "r49"])
    assert welcome["rooms"] == fifty
    assert welcome["refused"] == [{"room": "r49", "code": "too_many_rooms"}]


# -- liveness: pong and heartbeat seqs ---------------------------------------


def test_pong_carries_the_last_seq_of_each_room_the_client_is_in(net: Net) -> None:
    alice = net("alice", rooms=["lobby", "p1"])
    alice.ok("message", room="p1", text="a")
    last = alice.ok("message", room="p1", text="b")["seq"]
    lobby = alice.ok("history", after=0)["events"][-1]["seq"]
    pong = alice.ok("ping")
    assert pong["type"] == "pong" and pong["seqs"] == {"lobby": lobby, "p1": last}
    alice.ok("part", room="p1")
    assert alice.ok("ping")["seqs"] == {"lobby": lobby}


def test_heartbeat_carries_every_public_room_whose_seq_moved(net: Net) -> None:
    alice = net("alice", listen=True, rooms=["lobby", "hb1"])
    seq = alice.ok("message", room="hb1", text="tick")["seq"]
    alice.event("hb1", seq=seq)
    beat = alice.upto(lambda f: f.topic == b"\x00" and f.body.get("type") == "heartbeat")
    body = beat[-1].body
    assert body["seqs"]["hb1"] == seq and "lobby" in body["seqs"]
    assert isinstance(body["epoch"], str) and isinstance(body["ts"], float)


# -- concurrency -------------------------------------------------------------


def _at_once(peers: list[Peer], bodies: list[Body]) -> list[Body]:
    """Send one request from each peer at the same instant; return the replies."""
    for peer in peers:                          # DEALERs connected before the race
        peer.ok("ping")
    start = threading.Barrier(len(peers))

    def go(peer: Peer, body: Body) -> None:
        start.wait()
        peer.send(body)

    threads = [threading.Thread(target=go, args=(p, b)) for p, b in zip(peers, bodies,
                                                                       strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [p.reply(b["id"]) for p, b in zip(peers, bodies, strict=True)]


def test_two_joins_at_the_same_instant_are_each_announced_once(net: Net) -> None:
    """Project PROTOCOL.md: each join in a room below --announce-max is one `joined`.

    Whatever order the broker takes them in, each client must be able to
    build the room from its welcome plus the events after its welcome's seq.
    """
    spy = net("spy", listen=True)
    base = spy.ok("ping")["seqs"]["lobby"]
    a, b = net(), net()
    wa, wb = _at_once([a, b], [
        {"type": "join", "id": "ja", "name": "ann", "rooms": ["lobby", "race"]},
        {"type": "join", "id": "jb", "name": "ben", "rooms": ["lobby", "race"]}])
    assert wa["type"] == wb["type"] == "welcome"
    bodies = spy.room_frames_upto("lobby", type="joined", seq=base + 2)
    joined = {e["name"]: e["seq"] for e in bodies if e["type"] == "joined" and e["seq"] > base}
    assert sorted(joined.values()) == [base + 1, base + 2]
    for me, other, welcome in (("ann", "ben", wa), ("ben", "ann", wb)):
        assert welcome["seq"] >= joined[me]
        assert (other in names(welcome["members"])) != (joined[other] > welcome["seq"])

    ops = a.ok("enter", room="race")["ops"]     # the creator of race is its only op
    assert ops in (["ann"], ["ben"])
    history = spy.ok("history", room="race", after=0)["events"]
    assert sorted((e["seq"], e["type"]) for e in history) == [(1, "joined"), (2, "joined")]


def test_two_joins_of_one_name_at_the_same_instant_get_one_welcome(net: Net) -> None:
    a, b = net(), net()
    replies = _at_once([a, b], [{"type": "join", "id": "j1", "name": "zoe"},
                                {"type": "join", "id": "j2", "name": "ZOE"}])
    assert sorted(r["type"] for r in replies) == ["error", "welcome"]
    assert next(r for r in replies if r["type"] == "error")["code"] == "name_taken"


# -- more rows: details a client author relies on ------------------------------


def test_part_without_reason_and_kick_without_reason_carry_no_detail(net: Net) -> None:
    """ROOMS.md: `detail` is the reason given, *if any*."""
    alice = net("alice", listen=True, rooms=["d"])
    bob = net("bob", rooms=["d"])
    bob.ok("part", room="d")
    assert "detail" not in alice.event("d", type="left", name="bob")
    bob.ok("enter", room="d")
    alice.ok("kick", room="d", name="bob")
    left = alice.event("d", type="left", reason="kicked")
    assert left["by"] == "alice" and "detail" not in left


def test_private_flag_is_used_only_when_creating(net: Net) -> None:
    alice = net("alice", rooms=["open"])
    bob = net("bob")
    assert bob.ok("enter", room="open", private=True)["private"] is False
    assert bob.ok("enter", room="lobby", private=True)["private"] is False
    assert "open" in {r["name"] for r in alice.ok("rooms")["rooms"]}


def test_mode_event_carries_only_what_changed(net: Net) -> None:
    alice = net("alice", listen=True, rooms=["mc"])
    ack = alice.ok("mode", room="mc", moderated=True, topic_ops=True)
    event = alice.event("mc", type="mode")
    assert event["seq"] == ack["seq"] and event["moderated"] is True
    assert "topic_ops" not in event and "private" not in event


def test_a_banned_name_listed_in_join_is_refused_as_forbidden(net: Net) -> None:
    alice = net("alice", rooms=["lobby", "b"])
    alice.ok("ban", room="b", name="dora")      # not present: a ban by name
    dora = net()
    welcome = dora.join("dora", rooms=["lobby", "b"])
    assert welcome["rooms"] == ["lobby"]
    assert welcome["refused"] == [{"room": "b", "code": "forbidden"}]


def test_the_broker_operator_names_an_operator_of_a_room_left_without_one(
        net: Net, zb: RunningBroker) -> None:
    alice = net("alice", listen=True, rooms=["orphan"])
    bob = net("bob", rooms=["orphan"])
    alice.ok("part", room="orphan")
    assert bob.ok("enter", room="orphan")["ops"] == []
    admin(zb, "op", "orphan", "bob")
    event = alice.event("orphan", type="mode", op="bob")
    assert event["name"] == "*"
    bob.ok("mode", room="orphan", moderated=True)


def test_a_resent_message_is_acked_with_its_first_room_and_seq(net: Net) -> None:
    """v1 dedupe, per room: a message resent with the same id is not delivered twice."""
    alice = net("alice", listen=True, rooms=["lobby", "dup"])
    first = alice.ok("message", room="dup", text="once", id="same-id")
    again = alice.ok("message", room="dup", text="once", id="same-id")
    assert again == {**again, "type": "ack", "room": "dup", "seq": first["seq"]}
    after = alice.ok("message", room="dup", text="next")
    assert after["seq"] == first["seq"] + 1
    bodies = alice.room_frames_upto("dup", seq=after["seq"])
    assert [b["text"] for b in bodies if b["type"] == "message"] == ["once", "next"]


def test_seqs_are_per_room(net: Net) -> None:
    alice = net("alice", rooms=["lobby", "s1", "s2"])
    before = alice.ok("ping")["seqs"]
    assert alice.ok("message", room="s1", text="x")["seq"] == before["s1"] + 1
    after = alice.ok("ping")["seqs"]
    assert after == {**before, "s1": before["s1"] + 1}


def test_private_room_members_get_its_events_on_the_dealer_own_included(net: Net) -> None:
    alice = net("alice", listen=True)
    alice.ok("enter", room="cellar", private=True)
    ack = alice.ok("message", room="cellar", text="echo")
    own = alice.unsolicited(lambda b: b.get("type") == "message")
    assert own == {**own, "room": "cellar", "seq": ack["seq"], "from": "alice"}
    assert alice.ok("ping")["seqs"]["cellar"] == ack["seq"]
    history = alice.ok("history", room="cellar", after=0)
    assert [e["seq"] for e in history["events"]] == [1, ack["seq"]]
    who = alice.ok("who", room="cellar")
    assert names(who["members"]) == ["alice"] and who["count"] == 1
    alice.ok("part", room="cellar")
    err = alice.error("history", room="cellar", after=0)
    assert (err["code"], err["room"]) == ("not_in_room", "cellar")


def test_an_invitation_to_a_private_room_lets_the_invitee_in(net: Net) -> None:
    alice = net("alice")
    alice.ok("enter", room="vault", private=True)
    bob = net("bob")
    carol = net("carol")
    assert bob.error("enter", room="vault")["code"] == "forbidden"
    ack = alice.ok("invite", room="vault", name="Bob")
    assert ack == {**ack, "type": "ack", "room": "vault"}
    assert bob.ok("enter", room="vault")["room"] == "vault"
    err = carol.error("enter", room="vault")   # the invitation was bob's alone
    assert (err["code"], err["room"]) == ("forbidden", "vault")


def test_welcome_and_entered_list_at_most_100_members_with_count(net: Net) -> None:
    """ROOMS.md Scale; who defaults to pages of 100 (capped at 1,000)."""
    crowd = [net(f"m{i:03d}", rooms=["big"]) for i in range(101)]
    last = net()
    welcome = last.join("zz-last", rooms=["big"])
    assert welcome["count"] == 102 and len(welcome["members"]) == 100
    entered = crowd[0].ok("enter", room="big")
    assert entered["count"] == 102 and len(entered["members"]) == 100
    page = last.ok("who", room="big")
    assert page["count"] == 102 and len(page["members"]) == 100 and "next" in page
    rest = last.ok("who", room="big", after=page["next"])
    assert names(rest["members"]) == ["m100", "zz-last"] and "next" not in rest
    full = last.ok("who", room="big", limit=5000)
    assert len(full["members"]) == 102 and "next" not in full


def test_two_enters_of_a_new_room_at_the_same_instant_make_one_creator(net: Net) -> None:
    a, b = net("ann"), net("ben")
    ea, eb = _at_once([a, b], [{"type": "enter", "id": "ea", "room": "fresh"},
                               {"type": "enter", "id": "eb", "room": "fresh"}])
    assert ea["type"] == eb["type"] == "entered"
    assert sorted([ea["seq"], eb["seq"]]) == [1, 2]
    first, second = sorted([ea, eb], key=lambda e: e["seq"])
    assert first["ops"] == names(first["members"]) and len(first["ops"]) == 1
    assert second["ops"] == first["ops"] and second["count"] == 2


def test_two_messages_at_the_same_instant_get_consecutive_seqs(net: Net) -> None:
    spy = net("spy", listen=True, rooms=["lobby", "busy"])
    a, b = net("ann", rooms=["busy"]), net("ben", rooms=["busy"])
    base = spy.ok("ping")["seqs"]["busy"]
    acks = _at_once([a, b], [{"type": "message", "id": "ma", "room": "busy", "text": "a"},
                             {"type": "message", "id": "mb", "room": "busy", "text": "b"}])
    assert sorted(ack["seq"] for ack in acks) == [base + 1, base + 2]
    bodies = spy.room_frames_upto("busy", seq=base + 2)
    by_seq = {e["seq"]: e["text"] for e in bodies if e["type"] == "message"}
    assert by_seq == {acks[0]["seq"]: "a", acks[1]["seq"]: "b"}


def test_takeover_announces_joined_in_each_room_of_the_session(net: Net) -> None:
    spy = net("spy", listen=True, rooms=["lobby", "tk"])
    old = net()
    token = old.join("alice", rooms=["lobby", "tk"])["token"]
    spy.event("tk", type="joined", name="alice")
    new = net()
    welcome = new.join("alice", token=token)
    assert set(welcome["rooms"]) >= {"lobby", "tk"}
    for room in ("lobby", "tk"):
        spy.event(room, type="joined", name="alice")


@pytest.mark.parametrize(("kind", "fields", "code"), [
    ("topic", {}, "bad_request"),                     # text missing
    ("kick", {"name": 5}, "bad_request"),             # name of the wrong type
    ("message", {"text": "x" * 4097}, "too_large"),
    ("topic", {"text": "x" * 4097}, "too_large"),
])
def test_errors_from_the_requests_own_checks_name_the_room_too(
        net: Net, kind: str, fields: Body, code: str) -> None:
    """ROOMS.md: *every* error answering a request that named a room carries it."""
    alice = net("alice", rooms=["lobby", "e"])
    err = alice.error(kind, room="E", **fields)
    assert err["code"] == code
    assert err.get("room") == "e"


def test_rate_limited_names_the_room(net: Net) -> None:
    alice = net("alice", rooms=["lobby", "fast"])
    for i in range(100):
        reply = alice.request("message", room="fast", text=f"{i}")
        if reply["type"] == "error":
            assert (reply["code"], reply.get("room")) == ("rate_limited", "fast")
            return
    raise AssertionError("100 messages at once were never rate limited")


def test_join_that_enters_no_room_still_succeeds(net: Net) -> None:
    alice = net()
    welcome = alice.join("alice", rooms=["bad room"])
    assert welcome["rooms"] == []
    assert welcome["refused"] == [{"room": "bad room", "code": "bad_room"}]
    assert alice.ok("ping")["seqs"] == {}
    assert alice.ok("enter", room="lobby")["room"] == "lobby"


def test_op_kick_ban_invite_find_the_member_case_insensitively(net: Net) -> None:
    alice = net("alice", listen=True, rooms=["ci"])
    net("bob", rooms=["ci"])
    carol = net("carol")
    alice.ok("op", room="ci", name="BOB")
    assert alice.event("ci", type="mode")["op"] in ("bob", "BOB")
    alice.ok("kick", room="ci", name="Bob")
    assert alice.event("ci", type="left")["name"] == "bob"
    alice.ok("invite", room="ci", name="CAROL")
    assert carol.unsolicited(lambda b: b.get("type") == "invited")["room"] == "ci"


def test_entering_a_private_room_again_announces_nothing(net: Net) -> None:
    alice = net("alice")
    alice.ok("enter", room="den", private=True)
    bob = net("bob")
    alice.ok("invite", room="den", name="bob")
    assert bob.ok("enter", room="den")["seq"] == 2
    again = bob.ok("enter", room="den")
    assert again["seq"] == 2 and again["count"] == 2
    ack = alice.ok("message", room="den", text="next")
    assert ack["seq"] == 3
    got = [alice.unsolicited(lambda b: b.get("room") == "den")["seq"] for _ in range(3)]
    assert got == [1, 2, 3]                     # own joined, bob's, the message


def _no_leak(spy: Peer, marker_from: Peer, room: str) -> None:
    """Two heartbeats after a lobby marker: nothing the spy saw named ``room``."""
    marker = marker_from.ok("message", text="marker")["seq"]
    spy.upto(lambda f: f.topic == b"lobby\x00" and f.body.get("seq") == marker)
    for _ in range(2):
        spy.upto(lambda f: f.topic == b"\x00" and f.body.get("type") == "heartbeat")
    assert [f for f in spy.seen if room.encode() in f.topic + f.raw] == []


def test_leaving_the_broker_tells_a_private_room_on_the_dealer_only(net: Net) -> None:
    spy = net("spy", listen=True)
    alice = net("alice")
    alice.ok("enter", room="attic", private=True)
    bob = net("bob")
    alice.ok("invite", room="attic", name="bob")
    bob.ok("enter", room="attic")
    bob.send({"type": "leave", "reason": "off"})
    left = alice.unsolicited(lambda b: b.get("type") == "left")
    assert left == {**left, "room": "attic", "name": "bob", "reason": "leave", "seq": 3}
    _no_leak(spy, alice, "attic")


def test_a_takeover_announces_a_private_rooms_joined_on_the_dealer_only(net: Net) -> None:
    spy = net("spy", listen=True)
    alice = net("alice")
    alice.ok("enter", room="crypt", private=True)
    old = net()
    token = old.join("bob")["token"]
    alice.ok("invite", room="crypt", name="bob")
    old.ok("enter", room="crypt")
    new = net()
    new.join("bob", token=token)
    rejoined = alice.unsolicited(lambda b: b.get("type") == "joined" and b.get("seq") == 3)
    assert rejoined == {**rejoined, "room": "crypt", "name": "bob"}
    assert new.ok("enter", room="crypt")["seq"] == 3   # still in it, nothing new
    _no_leak(spy, alice, "crypt")


def test_an_operator_kick_from_the_broker_tells_a_private_room_on_the_dealer_only(
        net: Net, zb: RunningBroker) -> None:
    spy = net("spy", listen=True)
    alice = net("alice")
    alice.ok("enter", room="bunker", private=True)
    bob = net("bob")
    alice.ok("invite", room="bunker", name="bob")
    bob.ok("enter", room="bunker")
    admin(zb, "kick", "bob")
    assert bob.unsolicited(lambda b: b.get("type") == "bye")["reason"] == "kicked"
    left = alice.unsolicited(lambda b: b.get("type") == "left")
    assert left == {**left, "room": "bunker", "name": "bob", "reason": "kicked"}
    _no_leak(spy, alice, "bunker")


# -- broker options the contract names -----------------------------------------


def test_with_batches_a_private_room_still_never_reaches_pub(
        ctx: zmq.Context[Any], start_broker: Callable[..., RunningBroker]) -> None:
    """ROOMS.md: batch topics ``\\x01<room>\\x00`` exist where batches are on."""
    broker = start_broker("--heartbeat", "0.5", "--coalesce", "8")
    spy = Peer(ctx, broker)
    spy.listen()
    spy.wait_live()
    spy.join("spy", rooms=["lobby", "open"])
    alice = Peer(ctx, broker)
    alice.join("alice", rooms=["lobby", "open"])
    alice.ok("enter", room="hush", private=True)
    alice.ok("message", room="hush", text="quiet")
    seq = alice.ok("message", room="open", text="loud")["seq"]
    batch = spy.upto(lambda f: f.topic == b"\x01open\x00")[-1].body
    assert batch["type"] == "batch" and batch["room"] == "open"
    assert all(e["room"] == "open" for e in batch["events"])
    spy.upto(lambda f: f.topic == b"open\x00" and f.body.get("seq") == seq)
    _no_leak(spy, alice, "hush")


def test_rooms_topics_and_history_outlive_a_broker_restart(
        ctx: zmq.Context[Any], start_broker: Callable[..., RunningBroker],
        tmp_path: Path) -> None:
    """ROOMS.md: a room and its history outlive its members (durable history, a restart too)."""
    db = str(tmp_path / "rooms.db")
    first = start_broker("--heartbeat", "0.5", "--db", db)
    alice = Peer(ctx, first)
    alice.join("alice", rooms=["lobby", "keep"])
    alice.ok("topic", room="keep", text="kept")
    last = alice.ok("message", room="keep", text="remember me")["seq"]
    assert first.stop() == 0

    second = start_broker("--heartbeat", "0.5", "--db", db)
    bob = Peer(ctx, second)
    bob.join("bob")
    listed = {r["name"]: r for r in bob.ok("rooms")["rooms"]}
    assert listed["keep"]["topic"] == "kept"
    history = bob.ok("history", room="keep", after=0)["events"]
    assert history[-1]["seq"] >= last
    assert any(e["type"] == "message" and e["text"] == "remember me" for e in history)
    entered = bob.ok("enter", room="keep")
    assert entered["seq"] == history[-1]["seq"] + 1 and entered["topic"] == "kept"


def test_a_big_room_announces_no_comings_but_always_kicks(
        ctx: zmq.Context[Any], start_broker: Callable[..., RunningBroker]) -> None:
    """Project PROTOCOL.md: above --announce-max no `joined`; announced events keep seqs."""
    broker = start_broker("--heartbeat", "0.5", "--announce-max", "2")
    alice = Peer(ctx, broker)
    alice.listen()
    alice.wait_live()
    alice.join("alice", rooms=["lobby", "big"])
    bob = Peer(ctx, broker)
    bob.join("bob", rooms=["big"])
    carol = Peer(ctx, broker)
    entered = carol.ok("join", name="carol", rooms=["big"])
    assert entered["count"] == 3
    ack = alice.ok("kick", room="big", name="carol")
    bodies = alice.room_frames_upto("big", seq=ack["seq"])
    assert [(b["type"], b.get("name")) for b in bodies] == [
        ("joined", "alice"), ("joined", "bob"), ("left", "carol")]
    assert [b["seq"] for b in bodies] == [1, 2, 3]
    history = alice.ok("history", room="big", after=0)["events"]
    assert [e["seq"] for e in history] == [1, 2, 3]


def test_a_room_turned_private_leaves_the_heartbeat_at_once(net: Net) -> None:
    """ROOMS.md: heartbeats included; the project: the heartbeat never lists a private room.

    The room's seq moves and the room turns private within one heartbeat
    interval: no heartbeat sent after the turn may name it.
    """
    spy = net("spy", listen=True)
    alice = net("alice", rooms=["lobby", "turn"])
    alice.ok("message", room="turn", text="last public word")
    ack = alice.ok("mode", room="turn", private=True)
    mode = alice.unsolicited(lambda b: b.get("type") == "mode" and b.get("seq") == ack["seq"])
    marker = alice.ok("message", text="marker")["seq"]
    frames = spy.upto(lambda f: f.topic == b"lobby\x00" and f.body.get("seq") == marker)
    for _ in range(2):
        frames += spy.upto(lambda f: f.body.get("type") == "heartbeat")
    late = [f.body for f in frames if f.body.get("type") == "heartbeat"
            and f.body["ts"] >= mode["ts"]]
    assert late and all("turn" not in beat["seqs"] for beat in late)


def test_closing_a_room_tells_its_members_and_keeps_its_seq(
        net: Net, zb: RunningBroker) -> None:
    """Project PROTOCOL.md: `zchat-admin close`: notice, `left` closed, then gone; seq kept."""
    alice = net("alice", listen=True, rooms=["lobby", "shut"])
    last = alice.ok("message", room="shut", text="bye")["seq"]
    admin(zb, "close", "shut", "done")
    bodies = alice.room_frames_upto("shut", type="left")
    assert [b["type"] for b in bodies if b["seq"] > last] == ["notice", "left"]
    assert bodies[-1]["reason"] == "closed"
    assert "shut" not in {r["name"] for r in alice.ok("rooms")["rooms"]}
    err = alice.error("history", room="shut", after=0)
    assert (err["code"], err["room"]) == ("no_such_room", "shut")
    assert "shut" not in alice.ok("ping")["seqs"]
    assert alice.ok("enter", room="shut")["seq"] == last + 3


def test_closing_a_private_room_tells_only_its_members(net: Net, zb: RunningBroker) -> None:
    spy = net("spy", listen=True)
    alice = net("alice")
    alice.ok("enter", room="tomb", private=True)
    admin(zb, "close", "tomb")
    notice = alice.unsolicited(lambda b: b.get("type") == "notice")
    assert notice["room"] == "tomb"
    left = alice.unsolicited(lambda b: b.get("type") == "left")
    assert left == {**left, "room": "tomb", "name": "alice", "reason": "closed"}
    _no_leak(spy, alice, "tomb")


def test_inviting_a_banned_name_does_not_lift_the_ban(net: Net) -> None:
    alice = net("alice")
    alice.ok("enter", room="club", private=True)
    bob = net("bob")
    alice.ok("ban", room="club", name="bob")
    alice.ok("invite", room="club", name="bob")
    err = bob.error("enter", room="club")
    assert (err["code"], err["room"]) == ("forbidden", "club")


def test_pong_keeps_v1_seq_of_lobby(net: Net) -> None:
    alice = net("alice", rooms=["lobby", "x"])
    pong = alice.ok("ping")
    assert pong["seq"] == pong["seqs"]["lobby"] and pong["joined"] is True


@pytest.mark.parametrize(("setup", "kind", "fields", "code"), [
    # Project PROTOCOL.md: bad_room, no_such_room, not_in_room, forbidden, then
    # the request's own checks.
    ("none", "message", {"room": "Bad Room", "text": "x" * 5000}, "bad_room"),
    ("none", "message", {"room": "absent", "text": "x" * 5000}, "no_such_room"),
    ("public", "message", {"room": "r", "text": "x" * 5000}, "not_in_room"),
    ("private", "message", {"room": "r", "text": "x" * 5000}, "not_in_room"),
    ("private", "enter", {"room": "r"}, "forbidden"),
    ("member", "topic", {"room": "r", "text": "x" * 5000}, "forbidden"),
    ("member", "kick", {"room": "r", "name": "nobody-here"}, "forbidden"),
])
def test_error_checks_come_in_the_documented_order(
        net: Net, setup: str, kind: str, fields: Body, code: str) -> None:
    alice = net("alice")
    if setup != "none":
        alice.ok("enter", room="r", private=setup == "private")
    bob = net("bob")
    if setup == "member":
        bob.ok("enter", room="r")
    assert bob.error(kind, **fields)["code"] == code


def test_a_private_room_stays_hidden_after_a_restart(
        ctx: zmq.Context[Any], start_broker: Callable[..., RunningBroker],
        tmp_path: Path) -> None:
    db = str(tmp_path / "rooms.db")
    first = start_broker("--heartbeat", "0.5", "--db", db)
    alice = Peer(ctx, first)
    alice.join("alice")
    alice.ok("enter", room="vaulted", private=True)
    alice.ok("message", room="vaulted", text="still secret")
    assert first.stop() == 0

    second = start_broker("--heartbeat", "0.5", "--db", db)
    spy = Peer(ctx, second)
    spy.listen()
    spy.wait_live()
    spy.join("spy")
    assert "vaulted" not in {r["name"] for r in spy.ok("rooms")["rooms"]}
    err = spy.error("history", room="vaulted", after=0)
    assert (err["code"], err["room"]) == ("not_in_room", "vaulted")
    assert spy.error("enter", room="vaulted")["code"] == "forbidden"
    _no_leak(spy, spy, "vaulted")


@pytest.mark.parametrize(("kind", "fields"), [
    ("enter", {"private": "yes"}),
    ("mode", {"moderated": 1}),
    ("mode", {"topic_ops": "false"}),
    ("part", {"reason": 5}),
    ("who", {"limit": "10"}),
    ("history", {"after": "0"}),
    ("kick", {"name": "bob", "reason": 5}),
    ("invite", {"name": ["bob"]}),
    ("topic", {"text": None}),
    ("message", {"text": 7}),
])
def test_wrongly_typed_fields_are_bad_request_naming_the_room(
        net: Net, kind: str, fields: Body) -> None:
    """v1: a missing or wrongly typed field is `bad_request`; v2: errors name their room."""
    alice = net("alice", rooms=["lobby", "r"])
    net("bob", rooms=["r"])
    err = alice.error(kind, room="r", **fields)
    assert (err["code"], err.get("room")) == ("bad_request", "r")
    alice.ok("ping")                            # and the broker goes on


def test_join_rooms_must_be_a_list(net: Net) -> None:
    alice = net()
    err = alice.error("join", name="alice", rooms="lobby")
    assert err["code"] == "bad_request"


def test_pipelined_requests_are_answered_in_order(net: Net) -> None:
    """A client may send join, enter, message, part without waiting for each reply."""
    alice = net()
    kinds = [("join", {"name": "alice"}), ("enter", {"room": "pipe"}),
             ("message", {"room": "pipe", "text": "hi"}), ("part", {"room": "pipe"}),
             ("message", {"room": "pipe", "text": "late"})]
    for i, (kind, fields) in enumerate(kinds):
        alice.send({"type": kind, "id": f"p{i}", **fields})
    replies = [alice.reply(f"p{i}") for i in range(len(kinds))]
    assert [r["type"] for r in replies] == ["welcome", "entered", "ack", "parted", "error"]
    assert replies[2]["seq"] == 2 and replies[4]["code"] == "not_in_room"


def test_two_private_creations_of_one_name_at_the_same_instant(net: Net) -> None:
    a, b = net("ann"), net("ben")
    replies = _at_once([a, b], [
        {"type": "enter", "id": "pa", "room": "mine", "private": True},
        {"type": "enter", "id": "pb", "room": "mine", "private": True}])
    assert sorted(r["type"] for r in replies) == ["entered", "error"]
    entered = next(r for r in replies if r["type"] == "entered")
    error = next(r for r in replies if r["type"] == "error")
    assert entered["private"] is True and entered["count"] == 1
    assert (error["code"], error["room"]) == ("forbidden", "mine")


def test_a_kick_and_a_message_at_the_same_instant_agree(net: Net) -> None:
    """Either the message is in before the kick, or it is refused: never after the left."""
    alice = net("alice", listen=True, rooms=["lobby", "ring"])
    bob = net("bob", rooms=["ring"])
    kick, said = _at_once([alice, bob], [
        {"type": "kick", "id": "k", "room": "ring", "name": "bob"},
        {"type": "message", "id": "m", "room": "ring", "text": "last word"}])
    assert kick["type"] == "ack"
    if said["type"] == "ack":
        assert said["seq"] < kick["seq"]
    else:
        assert (said["code"], said["room"]) == ("not_in_room", "ring")
    bodies = alice.room_frames_upto("ring", seq=kick["seq"])
    assert bodies[-1]["type"] == "left"


def test_under_curve_operator_status_belongs_to_the_key(
        ctx: zmq.Context[Any], start_broker: Callable[..., RunningBroker],
        tmp_path: Path) -> None:
    """ROOMS.md: with CURVE, op status survives the key's reconnecting and a restart."""
    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    subprocess.run(["zchat-keygen", "--dir", str(keys), "broker", "alice", "bob"],
                   check=True, capture_output=True, timeout=30)
    allowed.mkdir()
    for who in ("alice", "bob"):
        (allowed / f"{who}.key").write_bytes((keys / f"{who}.key").read_bytes())
    server, _ = zmq.auth.load_certificate(keys / "broker.key")
    curve = {who: (server, *zmq.auth.load_certificate(keys / f"{who}.key_secret"))
             for who in ("alice", "bob")}
    args = ("--heartbeat", "0.5", "--db", str(tmp_path / "c.db"),
            "--secret-key", str(keys / "broker.key_secret"),
            "--authorized-keys", str(allowed))

    first = start_broker(*args)
    alice = Peer(ctx, first, curve["alice"])  # type: ignore[arg-type]
    alice.join("alice", rooms=["lobby", "keyed"])
    alice.ok("part", room="keyed")
    assert alice.ok("enter", room="keyed")["ops"] == ["alice"]  # the key is the op
    alice.send({"type": "leave"})
    again = Peer(ctx, first, curve["alice"])  # type: ignore[arg-type]
    again.join("alice", rooms=["keyed"])
    assert again.ok("enter", room="keyed")["ops"] == ["alice"]
    assert first.stop() == 0

    second = start_broker(*args)
    bob = Peer(ctx, second, curve["bob"])  # type: ignore[arg-type]
    bob.join("bob", rooms=["keyed"])
    err = bob.error("mode", room="keyed", moderated=True)
    assert (err["code"], err["room"]) == ("forbidden", "keyed")
    alice = Peer(ctx, second, curve["alice"])  # type: ignore[arg-type]
    assert alice.join("alice", rooms=["keyed"])["rooms"] == ["keyed"]
    assert alice.ok("enter", room="keyed")["ops"] == ["alice"]
    alice.ok("mode", room="keyed", moderated=True)


def test_a_silent_client_times_out_of_every_room(net: Net) -> None:
    """v1 liveness, per room: `left` `timeout` in each room, a private one on the DEALER."""
    spy = net("spy", listen=True, rooms=["lobby", "t1"])
    alice = net("alice")
    alice.ok("enter", room="hideaway", private=True)
    bob = net("bob", rooms=["lobby", "t1"])
    alice.ok("invite", room="hideaway", name="bob")
    bob.ok("enter", room="hideaway")                # from here bob says nothing
    public: set[str] = set()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        spy.ok("ping")                          # the watchers stay alive meanwhile
        alice.ok("ping")
        assert spy.sub is not None
        while spy.sub.poll(100):
            frame = spy._frame(deadline)
            body = frame.body
            if body.get("type") == "left" and body.get("name") == "bob":
                assert body["reason"] == "timeout"
                public.add(body["room"])
        private = [b for b in alice.inbox if b.get("type") == "left"]
        if public == {"lobby", "t1"} and private:
            assert private[0] == {**private[0], "room": "hideaway", "name": "bob",
                                  "reason": "timeout"}
            assert not [f for f in spy.seen if b"hideaway" in f.topic + f.raw]
            return
    raise AssertionError(f"bob timed out of {public} only")


def test_a_private_room_made_public_shows_up_and_publishes(net: Net) -> None:
    spy = net("spy", listen=True)
    alice = net("alice")
    alice.ok("enter", room="opening", private=True)
    assert "opening" not in {r["name"] for r in spy.ok("rooms")["rooms"]}
    alice.ok("mode", room="opening", private=False)
    listed = {r["name"]: r for r in spy.ok("rooms")["rooms"]}
    assert listed["opening"]["private"] is False
    ack = alice.ok("message", room="opening", text="now public")
    assert spy.event("opening", type="message")["seq"] == ack["seq"]
    assert spy.ok("enter", room="opening")["private"] is False


def test_op_of_an_op_and_ban_of_a_banned_name_announce_nothing(net: Net) -> None:
    """Project PROTOCOL.md: an op or ban that changed nothing is acked without seq."""
    alice = net("alice", listen=True, rooms=["same"])
    alice.ok("ban", room="same", name="zed")
    before = alice.ok("message", room="same", text="before")["seq"]
    for kind, name in (("op", "alice"), ("ban", "zed")):
        ack = alice.ok(kind, room="same", name=name)
        assert ack["room"] == "same" and "seq" not in ack, kind
    after = alice.ok("message", room="same", text="after")["seq"]
    assert after == before + 1
    assert [b["type"] for b in alice.room_frames_upto("same", seq=after)
            if b["seq"] > before] == ["message"]


def test_an_invitation_to_a_private_room_is_used_once(net: Net) -> None:
    alice = net("alice")
    alice.ok("enter", room="once", private=True)
    bob = net("bob")
    alice.ok("invite", room="once", name="bob")
    bob.ok("enter", room="once")
    bob.ok("part", room="once")
    err = bob.error("enter", room="once")
    assert (err["code"], err["room"]) == ("forbidden", "once")


def test_after_a_takeover_private_events_reach_the_new_connection(net: Net) -> None:
    alice = net("alice")
    alice.ok("enter", room="nook", private=True)
    old = net()
    token = old.join("bob")["token"]
    alice.ok("invite", room="nook", name="bob")
    old.ok("enter", room="nook")
    new = net()
    new.join("bob", token=token)
    ack = alice.ok("message", room="nook", text="to the new bob")
    got = new.unsolicited(lambda b: b.get("type") == "message")
    assert got == {**got, "room": "nook", "seq": ack["seq"], "text": "to the new bob"}


def test_history_pages_default_to_100_and_cap_at_1000(
        ctx: zmq.Context[Any], start_broker: Callable[..., RunningBroker]) -> None:
    broker = start_broker("--heartbeat", "0.5", "--rate", "0")
    alice = Peer(ctx, broker)
    alice.join("alice", rooms=["long"])
    for i in range(1005):                       # pipelined: a client need not wait
        alice.send({"type": "message", "id": f"h{i}", "room": "long", "text": f"{i}"})
    last = [alice.reply(f"h{i}")["seq"] for i in range(1005)][-1]
    assert last == 1006
    assert len(alice.ok("history", room="long", after=0)["events"]) == 100
    capped = alice.ok("history", room="long", after=0, limit=5000)["events"]
    assert 0 < len(capped) <= 1000 and capped[0]["seq"] == 1
    assert [e["seq"] for e in alice.ok("history", room="long", after=last - 2,
                                        limit=2)["events"]] == [last - 1, last]


def test_lobby_stays_public(net: Net, zb: RunningBroker) -> None:
    """ROOMS.md: `lobby` always exists and is public."""
    alice = net("alice")
    admin(zb, "op", "lobby", "alice")
    err = alice.error("mode", room="lobby", private=True)
    assert (err["code"], err["room"]) == ("forbidden", "lobby")
    listed = {r["name"]: r for r in alice.ok("rooms")["rooms"]}
    assert listed["lobby"]["private"] is False


def test_the_brokers_limit_of_rooms_in_all_is_too_many_rooms(
        ctx: zmq.Context[Any], start_broker: Callable[..., RunningBroker]) -> None:
    broker = start_broker("--heartbeat", "0.5", "--max-rooms", "3")
    alice = Peer(ctx, broker)
    alice.join("alice", rooms=["lobby", "two", "three"])
    err = alice.error("enter", room="four")
    assert (err["code"], err["room"]) == ("too_many_rooms", "four")
    alice.ok("enter", room="two")               # existing rooms are still open


def test_a_storm_of_joins_gives_every_client_a_consistent_room(net: Net) -> None:
    """Twelve clients join the same rooms at once; each sees everyone exactly once:
    in its welcome's members, or in a `joined` after its welcome's seq."""
    spy = net("spy", listen=True)
    crowd = [net() for _ in range(12)]
    welcomes = _at_once(crowd, [{"type": "join", "id": f"s{i}", "name": f"storm{i}",
                                 "rooms": ["lobby", "eye"]} for i in range(12)])
    assert all(w["type"] == "welcome" for w in welcomes)
    last = max(w["seq"] for w in welcomes)
    bodies = spy.room_frames_upto("lobby", seq=last)
    joined = {b["name"]: b["seq"] for b in bodies if b["type"] == "joined"}
    everyone = {f"storm{i}" for i in range(12)}
    assert everyone <= set(joined)
    for i, welcome in enumerate(welcomes):
        assert welcome["seq"] >= joined[f"storm{i}"]
        seen = set(names(welcome["members"])) | {
            n for n, seq in joined.items() if seq > welcome["seq"]}
        assert seen >= everyone and set(names(welcome["members"])) & {
            n for n, seq in joined.items() if seq > welcome["seq"]} == set()
    eye = spy.ok("who", room="eye")
    assert eye["count"] == 12 and set(names(eye["members"])) == everyone
    ops = crowd[0].ok("enter", room="eye")["ops"]
    assert len(ops) == 1 and ops[0] in everyone


def test_a_member_banned_from_a_private_room_gets_its_own_left(net: Net) -> None:
    alice = net("alice")
    alice.ok("enter", room="keep-out", private=True)
    bob = net("bob")
    alice.ok("invite", room="keep-out", name="bob")
    bob.ok("enter", room="keep-out")
    alice.ok("ban", room="keep-out", name="bob")
    left = bob.unsolicited(lambda b: b.get("type") == "left")
    assert left == {**left, "room": "keep-out", "name": "bob", "reason": "banned",
                    "by": "alice"}
    mode = alice.unsolicited(lambda b: b.get("type") == "mode")
    assert mode == {**mode, "room": "keep-out", "ban": "bob", "name": "alice"}


def test_shutdown_announces_left_in_every_room_then_shutdown(
        ctx: zmq.Context[Any], start_broker: Callable[..., RunningBroker]) -> None:
    broker = start_broker("--heartbeat", "0.5")
    spy = Peer(ctx, broker)                     # a subscriber need not join
    spy.listen()
    spy.wait_live()
    alice = Peer(ctx, broker)
    alice.join("alice", rooms=["lobby", "sd"])
    assert broker.stop() == 0
    frames = spy.upto(lambda f: f.topic == b"\x00" and f.body["type"] == "shutdown")
    lefts = {f.body["room"]: f.body["reason"] for f in frames
             if f.body.get("type") == "left" and f.body.get("name") == "alice"}
    assert lefts == {"lobby": "shutdown", "sd": "shutdown"}
    assert alice.unsolicited(lambda b: b.get("type") == "bye")["reason"] == "shutdown"


def test_two_ops_kicking_each_other_at_the_same_instant_one_wins(net: Net) -> None:
    alice = net("alice", listen=True, rooms=["lobby", "duel"])
    bob = net("bob", rooms=["duel"])
    alice.ok("op", room="duel", name="bob")
    replies = _at_once([alice, bob], [
        {"type": "kick", "id": "ka", "room": "duel", "name": "bob"},
        {"type": "kick", "id": "kb", "room": "duel", "name": "alice"}])
    assert sorted(r["type"] for r in replies) == ["ack", "error"]
    error = next(r for r in replies if r["type"] == "error")
    assert (error["code"], error["room"]) == ("not_in_room", "duel")
    ack = next(r for r in replies if r["type"] == "ack")
    left = alice.event("duel", type="left", reason="kicked")
    assert left["seq"] == ack["seq"]
    assert alice.ok("who", room="duel")["count"] == 1
