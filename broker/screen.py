"""The operator's screen: one readable line per room event, never blocking.

``screen_line`` renders an event (pure); ``Screen`` gathers a pass's lines
and writes them once per loop turn without ever blocking the loop. The
events carry what the screen shows: a message's sender address comes with
its ``Publish`` (``zchat.state.Publish.addr``), so nothing is looked up at
print time, when the sender may already be gone.
"""

from __future__ import annotations

import logging
import os
import select
import time
from datetime import datetime
from typing import Any, TextIO

from zchat.display import printable

__all__ = ["SCREEN_BACKLOG", "Screen", "screen_line"]

log = logging.getLogger("zchat.broker")

SCREEN_BACKLOG = 1 << 20  # bytes of chat lines kept for a screen that does not keep up


def screen_line(event: dict[str, Any], stamp: str | None = None,
                addr: str | None = None) -> str:
    """One readable line for the operator's screen (control characters escaped).

    Messages show the sender's address (``addr``) as well as the name, as
    the original server did: the operator sees where each line came from.
    """
    if stamp is None:
        stamp = datetime.fromtimestamp(event["ts"]).strftime("%H:%M:%S")
    kind = event["type"]
    # The room, then the event's seq in it: `#dev 12`.
    where = f"#{event.get('room', 'lobby')} {event['seq']}"
    if kind == "message":
        text = event["text"]
        if text.startswith("/me "):  # an action, shown as the clients show it
            return f"{stamp} {where} {addr or '?'} * {event['from']} {printable(text[4:])}\n"
        return f"{stamp} {where} {addr or '?'} <{event['from']}> {printable(text)}\n"
    if kind == "joined":
        return f"{stamp} {where} --> {event['name']} joined from {event['addr']}\n"
    if kind == "left":
        detail = f": {printable(event['detail'])}" if event.get("detail") else ""
        by = f" by {event['by']}" if event.get("by") else ""
        who = f"{event['name']} ({event['addr']})"
        return f"{stamp} {where} <-- {who} left [{event['reason']}{by}]{detail}\n"
    if kind == "notice":
        return f"{stamp} {where} *** notice: {printable(event['text'])}\n"
    if kind == "topic":
        return f"{stamp} {where} *** {event['name']} set the topic: {printable(event['text'])}\n"
    if kind == "mode":
        changes = " ".join(f"{k}={printable(str(v))}" for k, v in event.items()
                           if k not in ("type", "room", "seq", "ts", "name"))
        return f"{stamp} {where} *** {event['name']} mode {changes}\n"
    return f"{stamp} {where} {printable(kind)}\n"


class Screen:
    """Chat lines for the operator, written once per loop turn.

    A write per chat line costs more than the chat, so ``add`` only gathers
    and ``flush`` writes. A screen that does not keep up (a paused terminal,
    a pipe nobody reads) lags by up to ``backlog`` bytes; past that, lines
    are dropped and counted, and the screen says so when it catches up.
    """

    def __init__(self, out: TextIO | None, backlog: int = SCREEN_BACKLOG) -> None:
        self.out = out
        self.backlog = backlog
        self._lines: list[str] = []
        self._pending = bytearray()
        self._dropped = 0
        self._stamp_second = -1
        self._stamp = ""

    @property
    def on(self) -> bool:
        """Whether anything is shown (quiet, or the screen went away: not)."""
        return self.out is not None

    def add(self, event: dict[str, Any], addr: str | None = None) -> None:
        """Gather the line of one room event (``addr``: a message sender's)."""
        if self.out is None:
            return
        second = int(event["ts"])
        if second != self._stamp_second:
            # One strftime per second of chat, not per line.
            self._stamp_second = second
            self._stamp = datetime.fromtimestamp(second).strftime("%H:%M:%S")
        self._lines.append(screen_line(event, self._stamp, addr))

    def flush(self, wait: float = 0.0) -> None:
        """Write what was gathered without blocking (``wait``: at exit, a moment)."""
        out = self.out
        if out is None or not (self._lines or self._pending):
            return
        pending = self._pending
        if self._lines:
            text = "".join(self._lines)
            self._lines.clear()
            if len(pending) + len(text) > self.backlog:
                self._dropped += text.count("\n")
            else:
                pending += text.encode(errors="replace")
        try:
            fd = out.fileno()
        except (OSError, ValueError, AttributeError):
            fd = -1
        if fd < 0:  # not a real file (a test's StringIO): it cannot block
            out.write(pending.decode(errors="replace"))
            out.flush()
            pending.clear()
            return
        out.flush()
        blocking = os.get_blocking(fd)
        deadline = time.monotonic() + wait
        try:
            if blocking:
                os.set_blocking(fd, False)
            while pending:
                if self._dropped and len(pending) < self.backlog // 2:
                    pending += (f"*** the screen fell behind: {self._dropped} "
                                "chat lines not shown\n").encode()
                    self._dropped = 0
                try:
                    written = os.write(fd, pending)
                except (BlockingIOError, InterruptedError):
                    # At exit the screen gets a moment to take the rest.
                    left = deadline - time.monotonic()
                    if left <= 0 or not select.select([], [fd], [], left)[1]:
                        break
                    continue
                del pending[:written]
        except OSError as exc:  # the screen is gone (EPIPE, EIO): stop writing to it
            log.warning("screen output failed (%s); chat lines are no longer printed", exc)
            self.out = None
            pending.clear()
        finally:
            if blocking:
                os.set_blocking(fd, True)
