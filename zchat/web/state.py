"""What a browser session remembers, and a tab's frame budget: pure, no I/O, no clock.

The gateway's shell (``zchat.web.server``) owns sockets and time; these hold
the decisions it makes with them, so they are tested in microseconds:

- ``SessionLog``: every item the session delivered, numbered from 1, the
  last ``limit`` of them kept so that a tab coming back (a reload) gets what
  it has not shown (``after``); and the answers to the page's line ids, so
  that a line sent again after a reconnect is answered, not sent again.
- ``FrameBudget``: a token bucket on the frames a tab sends (``burst`` at
  once, then ``rate`` per second; ``now`` is a parameter).

Defines ``SessionLog`` and ``FrameBudget``.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any

__all__ = ["FrameBudget", "SessionLog"]


class SessionLog:
    """The numbered items of one session, and its answers by page line id."""

    def __init__(self, limit: int, answers: int = 1000) -> None:
        self.count = 0  # the number of the last item recorded
        self._items: collections.deque[tuple[int, dict[str, Any]]] = collections.deque(
            maxlen=max(1, limit))
        self._answers: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()
        self._answers_kept = answers

    def record(self, item: dict[str, Any]) -> dict[str, Any]:
        """Number ``item`` and keep it; return the frame that carries it live."""
        self.count += 1
        self._items.append((self.count, item))
        return {"type": "item", "n": self.count, "live": True, "item": item}

    def replay(self, after: int) -> list[dict[str, Any]]:
        """The frames of the items kept that are numbered above ``after``, in order."""
        return [{"type": "item", "n": n, "live": False, "item": item}
                for n, item in self._items if n > after]

    def answered(self, rid: str) -> dict[str, Any] | None:
        """The answer already given to the page's line ``rid``, if it is remembered."""
        return self._answers.get(rid)

    def answer(self, rid: str, frame: dict[str, Any]) -> None:
        """Remember the answer to line ``rid`` (the oldest are forgotten past the bound)."""
        self._answers[rid] = frame
        self._answers.move_to_end(rid)
        while len(self._answers) > self._answers_kept:
            self._answers.popitem(last=False)


@dataclass
class FrameBudget:
    """Frames a tab may send: ``burst`` at once, then ``rate`` per second (0: no limit)."""

    rate: float
    burst: float
    tokens: float = 0.0
    stamp: float = 0.0

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> FrameBudget:
        return cls(rate, burst, burst, now)

    def take(self, now: float) -> bool:
        """Spend one frame at ``now``; False when the tab is over its budget."""
        if self.rate <= 0:
            return True
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True
