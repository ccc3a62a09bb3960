"""Where the room's events are kept: in memory, or durably in SQLite.

The broker state appends each room event as it makes it and asks for ranges
to answer ``history``; the broker loop calls ``commit()`` once per pass, and
publishes and acks nothing of that pass before ``commit()`` returned. So a
client never sees a seq that a crash could take back, and one fsync-free
WAL commit covers many events (group commit).

Defines: ``History`` (the interface), ``MemoryHistory`` (a bounded deque, lost
with the process), ``SqliteHistory`` (WAL, survives the process; seq, epoch
and recent message ids carry over a restart), ``open_history``.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
from collections import deque
from itertools import islice
from pathlib import Path
from typing import Any

import msgpack

from zchat.errors import ZchatError

__all__ = [
    "History",
    "HistoryError",
    "MemoryHistory",
    "SqliteHistory",
    "default_db_path",
    "open_history",
]

MEMORY = ":memory:"


class HistoryError(ZchatError):
    """The history store cannot be opened or written."""


class History:
    """The interface: an ordered log of one room's events with consecutive seqs.

    Args:
        keep: events kept (older ones pruned); 0 keeps all.
        max_age: seconds an event is kept; 0 keeps them regardless of age.
    """

    durable = False

    def __init__(self, keep: int = 10_000, max_age: float = 0.0) -> None:
        self.keep = keep
        self.max_age = max_age
        self.last_seq = 0
        self.epoch = secrets.token_hex(8)

    def append(self, event: dict[str, Any], sender: str | None = None,
               rid: str | None = None) -> None:
        """Keep ``event`` (its ``seq`` is ``last_seq + 1``)."""
        raise NotImplementedError

    def after(self, seq: int, limit: int) -> list[dict[str, Any]]:
        """Kept events with seq above ``seq``, ascending, at most ``limit``."""
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def commit(self) -> None:
        """Make everything appended so far durable (no-op in memory)."""

    def prune(self, now: float) -> None:
        """Forget events past the count or age limit."""

    def recent_ids(self, per_name: int) -> dict[str, list[tuple[str, int]]]:
        """(id, seq) of the last messages of each sender, oldest first."""
        return {}

    def close(self) -> None:
        """Release the store."""


class MemoryHistory(History):
    """The last ``keep`` events in a deque; gone when the process ends."""

    def __init__(self, keep: int = 10_000, max_age: float = 0.0) -> None:
        super().__init__(keep, max_age)
        self._events: deque[dict[str, Any]] = deque(maxlen=keep or None)

    def append(self, event: dict[str, Any], sender: str | None = None,
               rid: str | None = None) -> None:
        self._events.append(event)
        self.last_seq = event["seq"]

    def after(self, seq: int, limit: int) -> list[dict[str, Any]]:
        if not self._events or seq >= self.last_seq:
            return []
        skip = max(0, seq - self._events[0]["seq"] + 1)
        return list(islice(self._events, skip, skip + limit))

    def __len__(self) -> int:
        return len(self._events)

    def prune(self, now: float) -> None:
        if self.max_age:
            horizon = now - self.max_age
            while self._events and self._events[0]["ts"] < horizon:
                self._events.popleft()


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,   -- consecutive per room; v1 has one room
    ts REAL NOT NULL,
    sender TEXT,               -- folded name of a message's sender, for dedupe
    rid TEXT,                  -- the request id of that message
    body BLOB NOT NULL         -- the event as published (MessagePack)
);
"""


class SqliteHistory(History):
    """Events in an SQLite database (WAL); survives the process.

    The broker holds the database exclusively: a second broker on the same
    file fails at start instead of interleaving seqs. ``fsync`` (SQLite
    ``synchronous=FULL``) also survives a power cut, at the price of an
    fsync per commit; without it (``NORMAL``) a killed process loses
    nothing committed, a crashed machine may lose the last commits.
    """

    durable = True

    def __init__(self, path: str | os.PathLike[str], keep: int = 10_000,
                 max_age: float = 0.0, fsync: bool = False) -> None:
        super().__init__(keep, max_age)
        self.path = str(path)
        self._pending: list[tuple[int, float, str | None, str | None, bytes]] = []
        self._packer = msgpack.Packer(use_bin_type=True)
        try:
            if self.path != MEMORY:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            # A short busy timeout: a database held by another broker is an
            # error to report at once, not a lock to wait for.
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=0.5)
            self._db.execute("PRAGMA locking_mode=EXCLUSIVE")
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
            self._db.executescript(_SCHEMA)
            # Taking the write lock now makes a second broker fail here, at start.
            self._db.execute("BEGIN IMMEDIATE")
            row = self._db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('epoch', ?)", (self.epoch,))
            else:
                self.epoch = row[0]
            self._db.execute("COMMIT")
            self.last_seq = self._db.execute("SELECT coalesce(max(seq), 0) FROM events"
                                             ).fetchone()[0]
        except (sqlite3.Error, OSError) as exc:  # OSError: its folder cannot be made
            raise HistoryError(f"cannot open history database {self.path}: {exc}") from exc

    def append(self, event: dict[str, Any], sender: str | None = None,
               rid: str | None = None) -> None:
        self._pending.append(
            (event["seq"], event["ts"], sender, rid, self._packer.pack(event)))
        self.last_seq = event["seq"]

    def commit(self) -> None:
        if not self._pending:
            return
        try:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?)", self._pending)
        except sqlite3.Error as exc:
            raise HistoryError(f"cannot write history to {self.path}: {exc}") from exc
        self._pending.clear()

    def after(self, seq: int, limit: int) -> list[dict[str, Any]]:
        self.commit()
        rows = self._db.execute(
            "SELECT body FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit)
        ).fetchall()
        return [msgpack.unpackb(row[0]) for row in rows]

    def __len__(self) -> int:
        self.commit()
        count: int = self._db.execute("SELECT count(*) FROM events").fetchone()[0]
        return count

    def prune(self, now: float) -> None:
        self.commit()
        with self._db:
            self._db.execute("BEGIN")
            if self.keep:
                self._db.execute("DELETE FROM events WHERE seq <= ?", (self.last_seq - self.keep,))
            if self.max_age:
                self._db.execute("DELETE FROM events WHERE ts < ?", (now - self.max_age,))

    def recent_ids(self, per_name: int) -> dict[str, list[tuple[str, int]]]:
        rows = self._db.execute(
            "SELECT sender, rid, seq FROM events WHERE rid IS NOT NULL "
            "AND seq > ? ORDER BY seq", (self.last_seq - 100_000,)
        ).fetchall()
        ids: dict[str, list[tuple[str, int]]] = {}
        for sender, rid, seq in rows:
            ids.setdefault(sender, []).append((rid, seq))
        return {name: pairs[-per_name:] for name, pairs in ids.items()}

    def close(self) -> None:
        try:
            self.commit()
        finally:
            self._db.close()


def default_db_path() -> Path:
    """``$ZCHAT_DATA_DIR`` or ``$XDG_STATE_HOME/zchat`` (``~/.local/state/zchat``)."""
    base = os.environ.get("ZCHAT_DATA_DIR") or os.environ.get("XDG_STATE_HOME")
    root = Path(base) if base else Path.home() / ".local" / "state"
    if not os.environ.get("ZCHAT_DATA_DIR"):
        root = root / "zchat"
    return root / "history.db"


def open_history(db: str | None, keep: int, max_age: float = 0.0,
                 fsync: bool = False) -> History:
    """``MemoryHistory`` for ``:memory:``, else ``SqliteHistory`` at ``db``."""
    if db == MEMORY:
        return MemoryHistory(keep, max_age)
    return SqliteHistory(db or default_db_path(), keep, max_age, fsync)
