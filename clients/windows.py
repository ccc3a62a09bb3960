"""The terminal client's windows, irssi's way: pure, no I/O.

One window per room the user is in, one per correspondent of private
messages, and the status window (always number 1, for the connection and
the broker's answers that belong to no room). Windows are numbered from 1
in the order they opened; closing one renumbers those after it, as irssi
does. Exactly one is current: what it shows is on the screen, and what the
user types goes to its room or person.

A window keeps its last lines (rendered ``Line`` tuples, so switching back
redraws it without asking anyone) and, while it is not current, its
activity: how many lines arrived unseen, and whether one of them named us
or was a private message (a *mention*, which irssi shows in another
colour). Going to a window clears its activity.

``status_line`` draws the bar above the input line::

    [2:#dev] 1:status 3:#ops+4 4:bob+1!  #dev: release on friday

the current window in brackets, then every other window with ``+N`` unread
lines and ``!`` for a mention, then the current room's topic.

Defines ``Kind``, ``Window``, ``Windows`` and ``status_line``.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from enum import StrEnum

from zchat.display import printable
from zchat.protocol import fold_name

from .render import BOLD, DIM, MENTION, Line, Span

__all__ = ["KEPT_LINES", "Kind", "Window", "Windows", "status_line"]

KEPT_LINES = 1000  # lines each window keeps for redrawing
REVERSE = "7"
ACTIVE = "1;36"  # a window with unread lines
TOPIC_SHOWN = 60  # characters of the topic in the status line


class Kind(StrEnum):
    STATUS = "status"
    ROOM = "room"
    QUERY = "query"  # private messages with one person


@dataclass(eq=False)
class Window:
    """One window: a room (``name`` without ``#``), a person, or the status."""

    kind: Kind
    name: str
    lines: collections.deque[Line] = field(
        default_factory=lambda: collections.deque(maxlen=KEPT_LINES))
    unread: int = 0
    mention: bool = False
    topic: str = ""
    joined: bool = True  # a room window whose room we left (kicked) stays, not joined

    @property
    def label(self) -> str:
        if self.kind == Kind.ROOM:
            return "#" + self.name
        return printable(self.name) if self.kind == Kind.QUERY else "status"

    @property
    def key(self) -> str:
        return self.name if self.kind == Kind.ROOM else fold_name(self.name)


class Windows:
    """The windows of one session, and which is current."""

    def __init__(self) -> None:
        self.all: list[Window] = [Window(Kind.STATUS, "")]
        self.current: Window = self.all[0]

    @property
    def status(self) -> Window:
        return self.all[0]

    def number(self, window: Window) -> int:
        return self.all.index(window) + 1

    def find(self, kind: Kind, name: str) -> Window | None:
        key = name if kind == Kind.ROOM else fold_name(name)
        for window in self.all:
            if window.kind == kind and window.key == key:
                return window
        return None

    def open(self, kind: Kind, name: str) -> Window:
        """The window for a room or a person, opened (at the end) if needed."""
        window = self.find(kind, name)
        if window is None:
            window = Window(kind, name)
            self.all.append(window)
        return window

    def room(self, name: str) -> Window:
        return self.open(Kind.ROOM, name)

    def query(self, name: str) -> Window:
        return self.open(Kind.QUERY, name)

    @property
    def rooms(self) -> list[str]:
        """Rooms that have a window, in window order."""
        return [w.name for w in self.all if w.kind == Kind.ROOM]

    def close(self, window: Window) -> Window:
        """Close a window (never the status one); return the new current one.

        As in irssi, the window before the closed one becomes current.
        """
        if window is self.status or window not in self.all:
            return self.current
        index = self.all.index(window)
        self.all.remove(window)
        if window is self.current:
            self.go(self.all[max(0, index - 1)])
        return self.current

    def go(self, window: Window) -> Window:
        """Make ``window`` current; its activity is seen."""
        self.current = window
        window.unread = 0
        window.mention = False
        return window

    def go_number(self, number: int) -> Window | None:
        """Go to window ``number`` (from 1); None if there is none."""
        if not 1 <= number <= len(self.all):
            return None
        return self.go(self.all[number - 1])

    def step(self, by: int) -> Window:
        """The next (+1) or previous (-1) window, round the ends (Ctrl-N, Ctrl-P)."""
        index = (self.all.index(self.current) + by) % len(self.all)
        return self.go(self.all[index])

    def add(self, window: Window, lines: list[Line], mention: bool = False) -> bool:
        """Keep lines in a window; True if they are to be shown now (it is current).

        Lines for another window count as its activity.
        """
        window.lines.extend(lines)
        if window is self.current or not lines:
            return window is self.current
        window.unread += len(lines)
        window.mention = window.mention or mention
        return False


def status_line(windows: Windows) -> Line:
    """The bar above the input line: windows with their activity, the topic."""
    current = windows.current
    spans: list[Span] = [(REVERSE + ";" + BOLD,
                          f"[{windows.number(current)}:{current.label}]")]
    for number, window in enumerate(windows.all, 1):
        if window is current:
            continue
        style = MENTION if window.mention else (ACTIVE if window.unread else DIM)
        activity = f"+{window.unread}" if window.unread else ""
        mark = "!" if window.mention else ""
        spans.append(("", " "))
        spans.append((style, f"{number}:{window.label}{activity}{mark}"))
    if current.kind == Kind.ROOM:
        if not current.joined:
            spans.append((DIM, f"  (not in {current.label}: /join {current.label})"))
        elif current.topic:
            topic = printable(current.topic)
            if len(topic) > TOPIC_SHOWN:
                topic = topic[:TOPIC_SHOWN - 1] + "…"
            spans.append(("", f"  {current.label}: "))
            spans.append((BOLD, topic))
    return tuple(spans)
