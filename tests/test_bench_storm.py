"""The join storm: its stream shortcut is exact, the broker's storm rules hold, one small run works.

Nothing here asserts a speed. The pure tests check how the storm's
generator reads the last seq off a SUB stream it never decodes, and the
broker's two rules for a storm: joins of one loop pass are announced as one
event whose seq every welcome of the pass counts, and nobody is cut for not
joining while the loop is behind its input. The real one runs ``zchat-bench
--workloads storm --quick`` (200 clients, then the ceiling) and checks that
everyone was welcomed, saw the last seq, and is still a member.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from zchat.bench.storm import last_seq, source_address
from zchat.bench.wire import pack, zmtp_frame
from zchat.broker.guard import LAG_GRACE, ConnectionLimits, Kind, Ledger
from zchat.protocol import parse_request
from zchat.state import Broker, Limits, Outgoing, Publish, Reply


def _stream(seqs: range) -> bytes:
    heartbeat = zmtp_frame(b"\x00", more=True) + zmtp_frame(
        pack({"type": "heartbeat", "ts": 1.0, "seqs": {"lobby": 99999}, "epoch": "e"}))
    events = b"".join(
        zmtp_frame(b"lobby\x00", more=True) + zmtp_frame(
            pack({"type": "joined", "room": "lobby", "seq": seq, "ts": 1.5, "name": f"s{seq}",
                  "addr": "127.0.0.1"}))
        for seq in seqs)
    return events + heartbeat  # a heartbeat's `seqs` must not count as an event's seq


@pytest.mark.parametrize("size", [1, 3, 7, 64, 1000])
def test_last_seq_of_a_stream_read_in_any_pieces(size: int) -> None:
    stream = _stream(range(100, 400))
    seen, tail = -1, b""
    for start in range(0, len(stream), size):
        data = tail + stream[start:start + size]
        seen = max(seen, last_seq(data))
        tail = data[-16:]
    assert seen == 399


def test_last_seq_reads_every_width_of_int() -> None:
    for seq in (5, 200, 70_000, 5_000_000_000):
        assert last_seq(_stream(range(seq, seq + 1))) == seq
    assert last_seq(b"nothing here") == -1


def test_clients_share_loopback_addresses_a_hundred_each() -> None:
    assert source_address(0, 100) == source_address(99, 100) == "127.0.1.1"
    assert source_address(100, 100) == "127.0.1.2"
    assert source_address(9899, 100) == "127.0.1.99"


def _join(broker: Broker, i: int) -> list[Outgoing]:
    out = broker.handle(b"peer%d" % i, parse_request({"type": "join", "name": f"u{i}"}),
                        1.0, "10.0.0.1")
    return out


def test_joins_of_one_pass_are_one_event_that_their_welcomes_count() -> None:
    broker = Broker(now=0.0, coalesce_joins=True, limits=Limits(coalesce_above=0))
    out = [o for i in range(5) for o in _join(broker, i)]
    out += broker.end_pass(1.0)
    events = [o.body for o in out if isinstance(o, Publish)]
    welcomes = [o.body for o in out if isinstance(o, Reply)]
    # The first join of the pass is announced at once, as at low load; the
    # four others in one `joins` event, kept in history with its seq.
    assert [(e["type"], e["seq"]) for e in events] == [("joined", 1), ("joins", 2)]
    assert [m["name"] for m in events[1]["members"]] == ["u1", "u2", "u3", "u4"]
    assert events[1]["count"] == 4
    assert [w["seq"] for w in welcomes] == [1, 2, 2, 2, 2]
    assert [e["type"] for e in broker.history(0)] == ["joined", "joins"]
    # The next pass starts afresh: its first join is a `joined` again.
    again = _join(broker, 5) + broker.end_pass(2.0)
    assert [o.body["type"] for o in again if isinstance(o, Publish)] == ["joined"]


def test_a_join_that_leaves_within_its_pass_is_not_announced_at_all() -> None:
    broker = Broker(now=0.0, coalesce_joins=True, limits=Limits(coalesce_above=0))
    _join(broker, 0)
    _join(broker, 1)
    left = broker.handle(b"peer1", parse_request({"type": "leave"}), 1.0)
    assert left == []
    assert broker.end_pass(1.0) == []
    assert [e["type"] for e in broker.history(0)] == ["joined"]


def test_a_room_of_at_most_coalesce_above_members_announces_every_join() -> None:
    # The broker's default: joins of one pass into a small room are each a
    # `joined`, which a version 1 client shows (it shows nothing for `joins`).
    broker = Broker(now=0.0, coalesce_joins=True, limits=Limits(coalesce_above=3))
    out = [o for i in range(5) for o in _join(broker, i)]
    out += broker.end_pass(1.0)
    events = [o.body for o in out if isinstance(o, Publish)]
    # Three members or fewer: one event each; past three, the rest of the
    # pass (this pass already announced a join there) is one `joins`.
    assert [(e["type"], e["seq"]) for e in events] == [
        ("joined", 1), ("joined", 2), ("joined", 3), ("joins", 4)]
    assert [m["name"] for m in events[3]["members"]] == ["u3", "u4"]


def test_without_coalescing_every_join_is_its_own_event() -> None:
    broker = Broker(now=0.0)
    out = [o for i in range(3) for o in _join(broker, i)]
    assert [o.body["seq"] for o in out if isinstance(o, Publish)] == [1, 2, 3]
    assert broker.end_pass(1.0) == []


def test_no_connection_is_cut_for_not_joining_while_the_loop_lags() -> None:
    ledger = Ledger(ConnectionLimits(join_timeout=10.0))
    assert ledger.accepted(Kind.INPUT, 7, "10.0.0.1", 0.0) is None
    ledger.lagged(9.5)  # its join may be among the frames still queued
    assert ledger.expire(10.5, lambda peer: False) == []
    assert ledger.expire(9.5 + LAG_GRACE - 0.1, lambda peer: False) == []
    cuts = ledger.expire(9.5 + LAG_GRACE, lambda peer: False)
    assert [cut.fd for cut in cuts] == [7]


def test_a_small_storm_runs_and_everyone_stays(tmp_path: Path) -> None:
    out = tmp_path / "storm.json"
    run = subprocess.run(
        [sys.executable, "-m", "zchat.bench", "--workloads", "storm", "--quick",
         "--json", str(out), "--no-chart"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text())
    (size, entries), = results["storm"].items()
    clients = int(size)
    zchat, ceiling = entries["zchat"], entries["ceiling"]
    assert zchat["error"] is None and ceiling["error"] is None
    assert zchat["welcomed"] == ceiling["welcomed"] == clients
    assert zchat["failed"] == 0 and zchat["seen_last_seq"] == clients
    assert zchat["last_seq"] >= 1  # at least the first join was announced
    assert zchat["members_at_end"] == clients and zchat["timeouts"] == 0
    assert zchat["connections_lost"] == 0 and zchat["byes"] == {}
    assert zchat["kib_per_client"] > 0
    assert results["storm_ratios"][size]["last_seq_all_x_ceiling"] > 0
    assert "Join storm" in run.stdout


def test_the_members_a_welcome_lists_follow_leaves_and_takeovers() -> None:
    # The list is built once and shared until it may change (a storm's
    # welcomes cost no 100 dicts each): it must still be right after changes.
    broker = Broker(now=0.0)
    for i in range(3):
        _join(broker, i)
    broker.handle(b"peer1", parse_request({"type": "leave"}), 1.0)
    welcome = next(o.body for o in _join(broker, 3) if o.body["type"] == "welcome")
    assert [m["name"] for m in welcome["members"]] == ["u0", "u2", "u3"]
    token = welcome["token"]
    back = broker.handle(b"peer9", parse_request({"type": "join", "name": "u3", "token": token}),
                         2.0, "10.0.0.9")
    again = next(o.body for o in back if o.body["type"] == "welcome")
    assert again["members"][-1] == {"name": "u3", "addr": "10.0.0.9"}
