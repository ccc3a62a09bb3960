"""zchat.web.state: a session's numbered log, its answers, a tab's frame budget (pure)."""

from __future__ import annotations

from zchat.web.state import FrameBudget, SessionLog


def test_items_are_numbered_and_the_last_ones_replayed_in_order() -> None:
    log = SessionLog(limit=3)
    frames = [log.record({"type": "message", "text": str(n)}) for n in range(5)]
    assert [f["n"] for f in frames] == [1, 2, 3, 4, 5]
    assert all(f["live"] for f in frames)
    assert [f["n"] for f in log.replay(0)] == [3, 4, 5]  # only the last 3 are kept
    assert [f["item"]["text"] for f in log.replay(3)] == ["3", "4"]
    assert not any(f["live"] for f in log.replay(0))
    assert log.replay(5) == [] and log.replay(99) == []


def test_answers_are_remembered_up_to_a_bound() -> None:
    log = SessionLog(limit=10, answers=2)
    log.answer("a", {"type": "ack", "id": "a", "seq": 1})
    log.answer("b", {"type": "ack", "id": "b", "seq": 2})
    assert log.answered("a") == {"type": "ack", "id": "a", "seq": 1}
    log.answer("c", {"type": "ack", "id": "c", "seq": 3})
    assert log.answered("a") is None  # the oldest went first
    assert log.answered("b") is not None and log.answered("c") is not None


def test_a_tab_may_send_a_burst_then_its_rate() -> None:
    budget = FrameBudget.full(rate=2, burst=3, now=100.0)
    assert [budget.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert budget.take(100.5)  # half a second: one more frame
    assert not budget.take(100.5)
    assert FrameBudget.full(rate=0, burst=0, now=0).take(0)  # 0: no limit
