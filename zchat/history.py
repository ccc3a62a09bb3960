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

import heapq
import logging
import os
import secrets
import sqlite3
import time
from collections import deque
from collections.abc import Iterable
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

import msgpack

from zchat.errors import HistoryError

__all__ = [
    "History",
    "HistoryError",
    "MemoryHistory",
    "SqliteHistory",
    "default_db_path",
    "open_history",
]

MEMORY = ":memory:"
RECENT_IDS_SCANNED = 100_000  # events read at start for the ids of recent messages
REPORT_EVERY = 60.0  # seconds between two log lines about the same store failure

log = logging.getLogger("zchat.history")
T = TypeVar("T")


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

    def after(self, seq: int, limit: int, max_bytes: int = 0) -> list[dict[str, Any]]:
        """Kept events with seq above ``seq``, ascending, at most ``limit``.

        ``max_bytes`` bounds the packed size of the page (0: no bound); the
        first event is returned whatever its size, so paging always moves on.
        """
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def commit(self) -> None:
        """Make everything appended so far durable (no-op in memory)."""

    def prune(self, now: float) -> None:
        """Forget events past the count or age limit."""

    def recent_ids(self, per_sender: int) -> dict[str, list[tuple[str, int]]]:
        """(id, seq) of the last messages of each sender, oldest first.

        A sender is the dedupe lineage the broker stored with each message
        (see ``zchat.state``), never a bare name.
        """
        return {}

    def close(self) -> None:
        """Release the store."""


class MemoryHistory(History):
    """The last ``keep`` events in a deque; gone when the process ends."""

    def __init__(self, keep: int = 10_000, max_age: float = 0.0) -> None:
        super().__init__(keep, max_age)
        self._events: deque[dict[str, Any]] = deque(maxlen=keep or None)
        self._packer = msgpack.Packer(use_bin_type=True)

    def append(self, event: dict[str, Any], sender: str | None = None,
               rid: str | None = None) -> None:
        self._events.append(event)
        self.last_seq = event["seq"]

    def after(self, seq: int, limit: int, max_bytes: int = 0) -> list[dict[str, Any]]:
        if not self._events or seq >= self.last_seq:
            return []
        skip = max(0, seq - self._events[0]["seq"] + 1)
        page = islice(self._events, skip, skip + limit)
        if not max_bytes:
            return list(page)
        pack = self._packer.pack
        return [event for event, _ in _within(((e, len(pack(e))) for e in page), max_bytes)]

    def __len__(self) -> int:
        return len(self._events)

    def prune(self, now: float) -> None:
        if self.max_age:
            horizon = now - self.max_age
            while self._events and self._events[0]["ts"] < horizon:
                self._events.popleft()


_SCHEMA = """
-- meta: 'epoch', and 'last_seq' (kept even when every event is pruned)
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,   -- consecutive per room; v1 has one room
    ts REAL NOT NULL,
    sender TEXT,               -- the sender's dedupe lineage (see zchat.state)
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

    The last seq is kept in ``meta`` by the same commit as the events, so
    it survives even when retention has pruned every event: a seq once
    acked is never given again under the same epoch.

    Every failure is a ``HistoryError``. Opening reads the whole events
    table once (its count and the recent ids), so a corrupt database is
    found at start; a read that fails later costs that request only; a
    failed commit marks the store broken: nothing more is written, and the
    broker stops without acking what it could not store.
    """

    durable = True

    def __init__(self, path: str | os.PathLike[str], keep: int = 10_000,
                 max_age: float = 0.0, fsync: bool = False) -> None:
        super().__init__(keep, max_age)
        self.path = str(path)
        self._pending: list[tuple[int, float, str | None, str | None, bytes]] = []
        self._packer = msgpack.Packer(use_bin_type=True)
        self._broken: str | None = None
        self._said: dict[str, float] = {}
        try:
            if self.path != MEMORY:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            # A short busy timeout: a database held by another broker is an
            # error to report at once, not a lock to wait for.
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=0.5)
        except (sqlite3.Error, OSError) as exc:
            raise HistoryError(f"cannot open history database {self.path}: {exc}") from exc
        try:
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
            row = self._db.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone()
            kept_seq, stored = self._db.execute(
                "SELECT coalesce(max(seq), 0), count(*) FROM events").fetchone()
            self._stored: int = stored
            self.last_seq = max(int(row[0]) if row is not None else 0, kept_seq)
            # Read now, while a failure is still a clean exit 4.
            self._recent: list[tuple[str, str, int]] = self._db.execute(
                "SELECT sender, rid, seq FROM events WHERE rid IS NOT NULL "
                "AND seq > ? ORDER BY seq", (self.last_seq - RECENT_IDS_SCANNED,)
            ).fetchall()
        except (sqlite3.Error, ValueError) as exc:
            self._db.close()
            raise HistoryError(f"cannot open history database {self.path}: {exc}") from exc

    def append(self, event: dict[str, Any], sender: str | None = None,
               rid: str | None = None) -> None:
        self._pending.append(
            (event["seq"], event["ts"], sender, rid, self._packer.pack(event)))
        self.last_seq = event["seq"]

    def commit(self) -> None:
        if self._broken is not None:
            raise HistoryError(self._broken)
        if not self._pending:
            return
        try:
            with self._db:
                self._db.execute("BEGIN")
                self._db.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?)", self._pending)
                self._db.execute("INSERT OR REPLACE INTO meta VALUES ('last_seq', ?)",
                                 (str(self.last_seq),))
        except sqlite3.Error as exc:
            # What failed to commit was never acked; nothing more is written.
            self._broken = f"cannot write history to {self.path}: {exc}"
            self._pending.clear()
            raise HistoryError(self._broken) from exc
        self._stored += len(self._pending)
        self._pending.clear()

    def after(self, seq: int, limit: int, max_bytes: int = 0) -> list[dict[str, Any]]:
        # Events of this pass not yet committed are served from memory: the
        # reply leaves with the pass, after the commit, like the events.
        try:
            rows = self._db.execute(
                "SELECT seq, body FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit))
            pending = ((p[0], p[4]) for p in self._pending if p[0] > seq)
            # The cursor is read only as far as the budget goes.
            bodies = (body for _, body in heapq.merge(rows, pending))
            page = _within(((body, len(body)) for body in islice(bodies, limit)), max_bytes)
            return [msgpack.unpackb(body) for body, _ in page]
        except (sqlite3.Error, ValueError, msgpack.ExtraData) as exc:
            raise self._failure("read", exc) from exc

    def __len__(self) -> int:
        return self._stored + len(self._pending)

    def prune(self, now: float) -> None:
        if self._broken is not None:
            return
        try:
            with self._db:
                self._db.execute("BEGIN")
                deleted = 0
                if self.keep:
                    deleted += self._db.execute(
                        "DELETE FROM events WHERE seq <= ?", (self.last_seq - self.keep,)
                    ).rowcount
                if self.max_age:
                    deleted += self._db.execute(
                        "DELETE FROM events WHERE ts < ?", (now - self.max_age,)).rowcount
        except sqlite3.Error as exc:
            raise self._failure("prune", exc) from exc
        self._stored -= deleted

    def recent_ids(self, per_sender: int) -> dict[str, list[tuple[str, int]]]:
        ids: dict[str, list[tuple[str, int]]] = {}
        for sender, rid, seq in self._recent:
            ids.setdefault(sender, []).append((rid, seq))
        self._recent = []  # needed once, at start
        return {sender: pairs[-per_sender:] for sender, pairs in ids.items()}

    def close(self) -> None:
        try:
            if self._broken is None:
                self.commit()
        finally:
            try:
                self._db.close()
            except sqlite3.Error as exc:
                raise HistoryError(f"cannot close history database {self.path}: {exc}") from exc

    def _failure(self, what: str, exc: Exception) -> HistoryError:
        """A ``HistoryError``, logged once a minute per kind, not once per request."""
        now = time.monotonic()
        if now - self._said.get(what, -REPORT_EVERY) >= REPORT_EVERY:
            self._said[what] = now
            log.error("history %s failed in %s: %s (said once a minute)", what, self.path, exc)
        return HistoryError(f"history {what} failed: {exc}")


def _within(sized: Iterable[tuple[T, int]], max_bytes: int) -> list[tuple[T, int]]:
    """The items of ``sized`` (item, size) up to ``max_bytes`` in all; 0: all.

    The first item comes whatever its size, so a reader paging on always
    moves forward. Reads ``sized`` no further than it keeps.
    """
    kept: list[tuple[T, int]] = []
    total = 0
    for item in sized:
        total += item[1]
        if max_bytes and total > max_bytes and kept:
            break
        kept.append(item)
    return kept


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
