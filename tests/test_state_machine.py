"""The broker state as a hypothesis state machine: any interleaving of joins,
messages, dms, leaves, dropped connections, takeovers and time keeps its
promises.

Each rule is something a peer (or the clock, or the loop) can do; the
invariants are what every client relies on: one member per name key, seq
rising by exactly one per room event, history that is the events published
in order, acks that name the seq of the event their message became, and no
message delivered twice for one id.
"""

from __future__ import annotations

from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from zchat.protocol import ROOM_TOPIC, GetHistory, Join, Leave, Ping, Say, SendDm, Who, fold_name
from zchat.state import Broker, Limits, Outgoing, Publish, Reply

PEERS = [b"peer-1", b"peer-2", b"peer-3", b"peer-4", b"peer-5"]
NAMES = ["ann", "ANN", "bob", "carol"]
IDS = ["1", "2", "3"]


class BrokerMachine(RuleBasedStateMachine):
    """Drive one ``Broker`` and check it against what it published."""

    @initialize()
    def start(self) -> None:
        self.now = 1_000_000.0
        self.broker = Broker(heartbeat=1.0, now=self.now, epoch="e1",
                             limits=Limits(rate=0, join_rate=0, query_rate=0))
        self.events: list[dict[str, Any]] = []  # every room event published, in order
        self.tokens: dict[str, str] = {}  # name key -> the token its welcome gave
        self.delivered: dict[tuple[str, str], int] = {}  # (token, id) -> seq of the message

    def apply(self, out: list[Outgoing]) -> list[Reply]:
        replies = []
        for item in out:
            if isinstance(item, Publish) and item.topic == ROOM_TOPIC:
                self.events.append(item.body)
            elif isinstance(item, Reply):
                replies.append(item)
        return replies

    def reply_to(self, peer: bytes, out: list[Outgoing]) -> dict[str, Any] | None:
        mine = [r.body for r in self.apply(out) if r.peer == peer]
        return mine[-1] if mine else None

    # ------------------------------------------------------------- rules

    @rule(peer=st.sampled_from(PEERS), name=st.sampled_from(NAMES), with_token=st.booleans())
    def join(self, peer: bytes, name: str, with_token: bool) -> None:
        token = self.tokens.get(fold_name(name)) if with_token else None
        reply = self.reply_to(peer, self.broker.handle(peer, Join(name, token=token), self.now,
                                                       addr="10.0.0.1"))
        assert reply is not None
        if reply["type"] == "welcome":
            self.tokens[fold_name(reply["name"])] = reply["token"]
            assert reply["seq"] == self.broker.seq

    @rule(peer=st.sampled_from(PEERS), text=st.text(max_size=5), rid=st.sampled_from(IDS))
    def say(self, peer: bytes, text: str, rid: str) -> None:
        name = self.broker.name_of(peer)
        before = len(self.events)
        reply = self.reply_to(peer, self.broker.handle(peer, Say(text, id=rid), self.now))
        assert reply is not None
        if name is None:
            assert reply["code"] == "not_joined"
            return
        assert reply["type"] == "ack"
        token = self.tokens[fold_name(name)]
        if (token, rid) in self.delivered:
            # A resend: acked with the original seq, and not delivered again.
            assert reply["seq"] == self.delivered[(token, rid)]
            assert len(self.events) == before
        else:
            assert len(self.events) == before + 1
            event = self.events[-1]
            assert (event["type"], event["from"], event["text"]) == ("message", name, text)
            assert reply["seq"] == event["seq"]
            self.delivered[(token, rid)] = reply["seq"]

    @rule(peer=st.sampled_from(PEERS), to=st.sampled_from(NAMES))
    def dm(self, peer: bytes, to: str) -> None:
        before = len(self.events)
        out = self.broker.handle(peer, SendDm(to, "psst"), self.now)
        assert len(self.apply(out)) >= 1
        assert len(self.events) == before  # a dm is never a room event

    @rule(peer=st.sampled_from(PEERS))
    def leave(self, peer: bytes) -> None:
        was = self.broker.name_of(peer)
        self.apply(self.broker.handle(peer, Leave("bye"), self.now))
        if was is not None:
            assert self.events[-1]["type"] == "left"
            assert self.broker.name_of(peer) is None

    @rule(peer=st.sampled_from(PEERS))
    def connection_drops(self, peer: bytes) -> None:
        self.apply(self.broker.disconnected(peer, self.now))
        assert self.broker.name_of(peer) is None  # the id no longer speaks for anyone

    @rule(peer=st.sampled_from(PEERS))
    def ask(self, peer: bytes) -> None:
        for request in (Ping(id="p"), Who(id="w"), GetHistory(0, id="h")):
            self.apply(self.broker.handle(peer, request, self.now))

    @rule(seconds=st.sampled_from([0.1, 1.0, 5.0]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        self.apply(self.broker.tick(self.now))

    # -------------------------------------------------------- invariants

    @invariant()
    def seq_rises_by_one_per_event(self) -> None:
        seqs = [event["seq"] for event in self.events]
        assert seqs == list(range(1, len(seqs) + 1))
        assert self.broker.seq == len(seqs)

    @invariant()
    def history_is_what_was_published(self) -> None:
        kept = self.broker.history(0, 1000)
        assert kept == self.events[-len(kept):] if kept else not self.events

    @invariant()
    def one_member_per_name_key(self) -> None:
        keys = [fold_name(m["name"]) for m in self.broker.members()]
        assert len(keys) == len(set(keys))
        # Members whose connection dropped stay (until they time out) but no
        # routing id speaks for them.
        assert len(self.broker) == len(keys)
        speaking = [self.broker.name_of(p) for p in PEERS if self.broker.name_of(p)]
        assert len(speaking) == len(set(speaking)) <= len(keys)


BrokerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                           deadline=None)
test_broker_keeps_its_promises = BrokerMachine.TestCase
