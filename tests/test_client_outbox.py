"""The outbox paces typed lines at the broker's rate: pure, a fake clock."""

from __future__ import annotations

from zchat.clients.outbox import Outbox, Outgoing


def lines(n: int) -> list[Outgoing]:
    return [Outgoing(f"line {i}") for i in range(1, n + 1)]


def test_a_paste_goes_out_at_the_brokers_pace_and_nothing_is_dropped() -> None:
    box = Outbox(now=0.0, rate=10, burst=20)
    typed = lines(30)
    for line in typed:
        box.put(line)
    sent = box.take(0.0)
    assert [line.text for line in sent] == [f"line {i}" for i in range(1, 21)]
    now = 0.0
    while len(sent) < 30:
        wake = box.wake_at(now)
        assert wake is not None and wake > now
        now = wake
        sent += box.take(now)
    assert [line.number for line in sent] == [line.number for line in typed]
    # 10 more at 9/s (a margin under the broker's 10/s): about a second.
    assert 1.0 < now < 1.3
    for line in sent:
        box.acked(line)
    assert box.pending == [] and box.wake_at(now) is None


def test_a_refused_line_waits_and_goes_again_first() -> None:
    box = Outbox(now=0.0, rate=10, burst=20)  # the broker is stricter than we know
    typed = lines(5)
    for line in typed:
        box.put(line)
    first = box.take(0.0)
    assert len(first) == 5
    box.acked(first[0])
    box.acked(first[1])
    for line in first[2:]:
        box.refused(line, 0.0)
    assert box.take(0.1) == []  # held back for a while
    wake = box.wake_at(0.1)
    assert wake is not None and wake >= 0.5
    again = box.take(wake)
    assert again == [typed[2]]  # one at a time, in order, until all is through
    assert box.wake_at(wake) is None  # nothing more before its answer
    box.acked(again[0])
    later = box.wake_at(wake)
    assert later is not None
    assert box.take(later) == [typed[3]]
    assert [line.text for line in box.pending] == ["line 4", "line 5"]


def test_failed_lines_leave_and_limits_come_from_the_broker() -> None:
    box = Outbox(now=0.0)
    box.set_limits(1.0, 2)
    for line in lines(3):
        box.put(line)
    sent = box.take(0.0)
    assert len(sent) == 2
    box.failed(sent[0])
    assert [line.text for line in box.pending] == ["line 2", "line 3"]
    wake = box.wake_at(0.0)
    assert wake is not None and 1.0 < wake < 1.2
    unlimited = Outbox(now=0.0, rate=0)
    for line in lines(100):
        unlimited.put(line)
    assert len(unlimited.take(0.0)) == 100
