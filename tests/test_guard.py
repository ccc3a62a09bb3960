"""The connection ledger's rules, without sockets: measurements and time are given."""

from __future__ import annotations

from zchat.broker.guard import (
    CONTROL_IDLE,
    HANDSHAKE_ALLOWANCE,
    STRANGER_BURST,
    ConnectionLimits,
    Kind,
    Ledger,
    Measure,
)

MIB = 1024 * 1024


def never(peer: bytes) -> bool:
    return False


def always(peer: bytes) -> bool:
    return True


def test_connections_past_the_per_address_cap_are_cut_at_once() -> None:
    ledger = Ledger(ConnectionLimits(per_address=2))
    assert ledger.accepted(Kind.INPUT, 10, "10.0.0.1", 0.0) is None
    assert ledger.accepted(Kind.INPUT, 11, "10.0.0.1", 0.0) is None
    assert ledger.accepted(Kind.BROADCAST, 12, "10.0.0.1", 0.0) is None  # another port
    assert ledger.accepted(Kind.INPUT, 13, "10.0.0.2", 0.0) is None  # another address
    cut = ledger.accepted(Kind.INPUT, 14, "10.0.0.1", 0.0)
    assert cut is not None and cut.fd == 14 and "from one address" in cut.reason
    ledger.disconnected(14)
    ledger.disconnected(10)
    assert ledger.accepted(Kind.INPUT, 15, "10.0.0.1", 0.0) is None  # room again


def test_capacity_keeps_descriptors_in_reserve() -> None:
    ledger = Ledger(ConnectionLimits(per_address=0), capacity=2)
    assert ledger.accepted(Kind.INPUT, 1, "a", 0.0) is None
    assert ledger.accepted(Kind.INPUT, 2, "b", 0.0) is None
    cut = ledger.accepted(Kind.INPUT, 3, "c", 0.0)
    assert cut is not None and cut.reason == "the broker is full"


def test_a_connection_without_a_member_is_cut_after_the_join_timeout() -> None:
    ledger = Ledger(ConnectionLimits(join_timeout=5))
    ledger.accepted(Kind.INPUT, 7, "a", 100.0)
    ledger.accepted(Kind.INPUT, 8, "a", 101.0)
    ledger.accepted(Kind.BROADCAST, 9, "a", 100.0)  # subscribers need not join
    assert ledger.next_deadline() == 105.0
    assert ledger.expire(104.9, never) == []
    ledger.bind(8, b"bob")
    cuts = ledger.expire(106.0, never)
    assert [c.fd for c in cuts] == [7]
    assert ledger.next_deadline() is None


def test_a_member_that_left_but_stays_connected_must_join_again() -> None:
    ledger = Ledger(ConnectionLimits(join_timeout=5))
    ledger.accepted(Kind.INPUT, 7, "a", 0.0)
    ledger.bind(7, b"ann")
    ledger.recheck_members(10.0, always)
    assert ledger.next_deadline() is None
    ledger.recheck_members(20.0, never)
    assert ledger.fd_of(b"ann") is None
    assert [c.fd for c in ledger.expire(25.5, never)] == [7]


def test_disconnect_returns_the_member_it_carried() -> None:
    ledger = Ledger(ConnectionLimits())
    ledger.accepted(Kind.INPUT, 7, "a", 0.0)
    ledger.bind(7, b"ann")
    assert ledger.fd_of(b"ann") == 7
    assert ledger.disconnected(7) == b"ann"
    assert ledger.fd_of(b"ann") is None
    assert ledger.disconnected(7) is None


def test_a_reused_descriptor_starts_afresh() -> None:
    ledger = Ledger(ConnectionLimits())
    ledger.accepted(Kind.INPUT, 7, "a", 0.0)
    ledger.bind(7, b"ann")
    ledger.accepted(Kind.INPUT, 7, "b", 1.0)  # DISCONNECTED never came
    assert ledger.fd_of(b"ann") is None
    assert len(ledger) == 1


def test_stranger_requests_are_a_leaky_bucket() -> None:
    ledger = Ledger(ConnectionLimits())
    ledger.accepted(Kind.INPUT, 7, "a", 0.0)
    for _ in range(STRANGER_BURST):
        assert ledger.stranger_request(7, 10, 0.0) is None
    assert ledger.stranger_request(7, 10, 60.0) is None  # drained meanwhile
    for _ in range(STRANGER_BURST):
        last = ledger.stranger_request(7, 10, 60.0)
    assert last is not None and "without joining" in last.reason


def test_unread_input_past_the_backlog_is_cut() -> None:
    ledger = Ledger(ConnectionLimits(max_backlog=MIB))
    ledger.accepted(Kind.INPUT, 7, "a", 0.0)
    ledger.bind(7, b"ann")
    for _ in range(100):
        ledger.received(b"ann", 1000)
    taken = 100 * 1002 + HANDSHAKE_ALLOWANCE
    assert ledger.judge(7, Measure(0, taken + MIB // 2, 0), 0.0) is None
    cut = ledger.judge(7, Measure(0, taken + 2 * MIB, 0), 0.0)
    assert cut is not None and "not taken" in cut.reason


def test_unread_replies_past_the_backlog_are_cut_and_measured_when_sent() -> None:
    ledger = Ledger(ConnectionLimits(max_backlog=MIB))
    ledger.accepted(Kind.INPUT, 7, "a", 0.0)
    ledger.bind(7, b"ann")
    assert ledger.judge(7, Measure(0, 0, 0), 0.0) is None
    due = [ledger.sent(b"ann", 100_000) for _ in range(20)]
    assert due[9] is None and due[-1] == 7  # past the bound: measure it now
    assert ledger.judge(7, Measure(1_500_000, 0, 0), 1.0) is None  # it reads, slowly
    cut = ledger.judge(7, Measure(200_000, 0, 0), 1.0)
    assert cut is not None and "not read" in cut.reason
    assert ledger.severed == {b"ann"}  # what it queued meanwhile is not read
    ledger.disconnected(7)
    assert not ledger.severed


def test_a_subscriber_that_stops_reading_is_cut_after_the_stall_time() -> None:
    ledger = Ledger(ConnectionLimits(stall=3))
    ledger.accepted(Kind.BROADCAST, 9, "a", 0.0)
    assert ledger.judge(9, Measure(100, 50, 0), 1.0) is None
    assert ledger.judge(9, Measure(100, 50, 5000), 2.0) is None  # waiting starts
    assert ledger.judge(9, Measure(100, 50, 9000), 4.0) is None
    cut = ledger.judge(9, Measure(100, 50, 9000), 5.5)
    assert cut is not None and cut.reason == "stopped reading"


def test_a_slow_subscriber_that_still_reads_is_kept_and_pressure_is_quicker() -> None:
    ledger = Ledger(ConnectionLimits(stall=3))
    ledger.accepted(Kind.BROADCAST, 9, "a", 0.0)
    for second in range(1, 10):
        assert ledger.judge(9, Measure(100 * second, 50, 5000), float(second)) is None
    assert ledger.judge(9, Measure(900, 50, 5000), 10.0, pressure=True) is not None


def test_subscriptions_past_their_bytes_are_cut() -> None:
    ledger = Ledger(ConnectionLimits(max_subscribe=1000))
    ledger.accepted(Kind.BROADCAST, 9, "a", 0.0)
    assert ledger.judge(9, Measure(0, HANDSHAKE_ALLOWANCE + 900, 0), 0.0) is None
    cut = ledger.judge(9, Measure(0, HANDSHAKE_ALLOWANCE + 1100, 0), 0.0)
    assert cut is not None and "subscriptions" in cut.reason


def test_an_idle_operator_connection_is_cut_and_a_command_extends_it() -> None:
    ledger = Ledger(ConnectionLimits())
    ledger.accepted(Kind.CONTROL, 5, "local", 0.0)
    ledger.control_command(1.0)
    assert ledger.expire(CONTROL_IDLE + 0.5, never) == []
    cuts = ledger.expire(1.0 + CONTROL_IDLE + 0.1, never)
    assert [c.reason for c in cuts] == ["operator connection idle"]


def test_statistics_count_open_and_cut() -> None:
    ledger = Ledger(ConnectionLimits(per_address=1))
    ledger.accepted(Kind.INPUT, 1, "a", 0.0)
    ledger.accepted(Kind.INPUT, 2, "a", 0.0)
    stats = ledger.statistics()
    assert stats["connections"] == {"input": 2, "broadcast": 0, "control": 0}
    assert stats["cut"] == {"more than 1 connections from one address": 1}
