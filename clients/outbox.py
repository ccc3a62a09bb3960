"""What the user typed, sent in order at the broker's pace: pure, no I/O.

The broker lets each member send ``burst`` messages at once and then
``rate`` per second (token bucket); what goes beyond is refused with
``rate_limited`` and not delivered. A pasted text of 30 lines would lose
some. Like irssi's flood protection, the ``Outbox`` keeps the same bucket on
our side and lets a line go only when the broker will take it, so nothing
typed is ever refused for speed, let alone dropped.

The shell (the interactive session, the pipe mode) puts lines in, asks
``take(now)`` for those that may go now, sends them, and reports each
answer: ``acked``, ``failed`` (refused for good: too long, no such user),
or ``refused`` (rate limited after all: a broker stricter than we knew).
A refused line goes back to the front of the queue; from then on only one
line is in flight at a time, so that the order of lines is kept while we
probe the broker's real pace. ``wake_at(now)`` says when ``take`` will have
more. Time is a parameter, so all of it is tested without sleeping.

Defines ``Line``, ``TokenBucket`` and ``Outbox``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

__all__ = ["DEFAULT_BURST", "DEFAULT_RATE", "Outbox", "Outgoing", "TokenBucket"]

# The broker's defaults (PROTOCOL.md, "Limits"), for a welcome that does not say.
DEFAULT_RATE, DEFAULT_BURST = 10.0, 20
# Our bucket fills a little slower than the broker's: the broker takes a
# line later than we send it, so clocks and queues never put us ahead.
MARGIN = 0.9
RETRY_MIN, RETRY_MAX = 0.5, 5.0  # backoff after a rate_limited
EPSILON = 1e-9  # float refills: a token due "now" must be there now


class TokenBucket:
    """``burst`` tokens refilled at ``rate`` per second; rate 0 means no limit."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self.tokens = float(self.burst)
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = max(self.stamp, now)

    def take(self, now: float) -> bool:
        """Spend a token if there is one."""
        if self.rate <= 0:
            return True
        self._refill(now)
        if self.tokens >= 1 - EPSILON:
            self.tokens = max(0.0, self.tokens - 1)
            return True
        return False

    def ready_at(self, now: float) -> float:
        """When a token will be there."""
        if self.rate <= 0:
            return now
        self._refill(now)
        return now if self.tokens >= 1 - EPSILON else now + (1 - self.tokens) / self.rate

    def empty(self, now: float) -> None:
        """The broker says we have nothing left: believe it."""
        self._refill(now)
        self.tokens = 0.0


_numbers = itertools.count(1)


@dataclass(slots=True)
class Outgoing:
    """One line to send: a message to ``room``, or a private one when ``to`` is set."""

    text: str
    to: str | None = None
    room: str = "lobby"
    number: int = field(default_factory=lambda: next(_numbers))  # typing order
    in_flight: bool = False


class Outbox:
    """Lines in typing order, released at the broker's pace."""

    def __init__(self, now: float, rate: float = DEFAULT_RATE,
                 burst: int = DEFAULT_BURST) -> None:
        self.bucket = TokenBucket(rate * MARGIN, burst, now)
        self._lines: list[Outgoing] = []  # queued and in flight, in order
        self._hold_until = 0.0
        self._backoff = RETRY_MIN
        self._careful = False  # after a refusal: one line in flight at a time

    def set_limits(self, rate: float | None, burst: int | None) -> None:
        """The broker's own limits, when its welcome says them."""
        if rate is not None:
            self.bucket.rate = rate * MARGIN
        if burst is not None:
            self.bucket.burst = max(1, burst)
            self.bucket.tokens = min(self.bucket.tokens, self.bucket.burst)

    def put(self, line: Outgoing) -> None:
        self._lines.append(line)

    @property
    def pending(self) -> list[Outgoing]:
        """Every line not yet acked or failed, in order."""
        return list(self._lines)

    def take(self, now: float) -> list[Outgoing]:
        """The lines that may be sent now, in order; each becomes in flight."""
        out: list[Outgoing] = []
        if now < self._hold_until:
            return out
        for line in self._lines:
            if line.in_flight:
                if self._careful:
                    break
                continue
            if not self.bucket.take(now):
                break
            line.in_flight = True
            out.append(line)
            if self._careful:
                break
        return out

    def wake_at(self, now: float) -> float | None:
        """When ``take`` may give more lines (None: not before an answer)."""
        waiting = [line for line in self._lines if not line.in_flight]
        if not waiting or (self._careful and len(waiting) < len(self._lines)):
            return None
        return max(self._hold_until, self.bucket.ready_at(now))

    def acked(self, line: Outgoing) -> None:
        self._remove(line)
        self._backoff = RETRY_MIN
        if not self._lines:
            self._careful = False

    def failed(self, line: Outgoing) -> None:
        """Refused for good (too long, no such user): the shell says why."""
        self._remove(line)
        if not self._lines:
            self._careful = False

    def refused(self, line: Outgoing, now: float) -> None:
        """``rate_limited``: the line waits, and goes again, first."""
        line.in_flight = False
        self.bucket.empty(now)
        self._hold_until = max(self._hold_until, now + self._backoff)
        self._backoff = min(self._backoff * 2, RETRY_MAX)
        self._careful = True

    def _remove(self, line: Outgoing) -> None:
        try:
            self._lines.remove(line)
        except ValueError:
            pass  # already settled
