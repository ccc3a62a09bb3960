"""Where the rooms' events are kept: in memory, or durably in SQLite.

The broker state appends each room event as it makes it and asks for ranges
to answer ``history``; the broker loop commits once per pass, and publishes
and acks nothing of that pass before that commit returned. So a client never
sees a seq that a crash could take back, and one fsync-free WAL commit
covers many events (group commit).

Committing is the only write: nothing else (``after``, ``__len__``,
``prune``) touches the database on the side, and every failure of the store
is a ``HistoryError``. ``prune`` only says what the next commit forgets. The
loop may split a commit in two, ``begin_commit()`` (hand the pass to a
writer thread, return at once) and ``finish_commit()`` (wait for it, raise
if it failed), and decode the next pass in between: sqlite3 releases the
GIL while it writes. It does when a commit waits on the disk
(``commits_aside``: with an fsync per commit). ``commit()`` is both at once.

Every room has its own log with its own consecutive seqs; ``keep`` bounds
each room's log. The store also keeps each room's settings (topic, modes,
bans, operator keys) and its last seq, which outlives the room: a room
closed and made again goes on from it, so no seq is given twice in an epoch.

Defines: ``History`` (the interface), ``MemoryHistory`` (bounded deques, lost
with the process), ``SqliteHistory`` (WAL, survives the process; seqs, epoch,
rooms and recent message ids carry over a restart; a room's events of one
commit are one row, and a version 1 or 2 database is migrated at open),
``open_history``.
"""

from __future__ import annotations

import fcntl
import functools
import heapq
import logging
import os
import queue
import secrets
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, TypeAlias, TypeVar

import msgpack

from zchat.errors import HistoryError
from zchat.protocol import ROOM

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
# Events one row of ``segments`` holds at most: a commit writes a room's
# events of its pass as one row (SQLite's work is per row: a row per event
# cost 5.4-7.3 us of CPU an event in commit here, a row per pass 1.9-4.7 at
# 256-40 events), and a history read unpacks at most this many events it
# does not return.
SEGMENT_EVENTS = 256
# Rows one INSERT statement writes. sqlite3 releases the GIL around each
# statement step, and on the writer thread each step's release and
# re-acquisition waits for the loop's thread to let go of the GIL (up to the
# switch interval): one step per row (executemany) put tens of milliseconds
# into p99.
ROWS_PER_INSERT = 64
# Seconds between two WAL checkpoints (on their own thread). A checkpoint
# still holds commits up while it ends, longer the more it copies: at
# 20,000 events/s, one a second (35-47 ms each) held single commits up to
# 31 ms and 1-5 commits a run over 5 ms, and p99 at that rate was 6-22 ms
# (median 17) over six runs; one every 0.2 s (13-23 ms each) held none over
# 4.4 ms, and p99 was 6.5-12.6 ms (median 7.8) over five; with none, 5-7 ms.
CHECKPOINT_EVERY = 0.2
TRIM_SLACK = 16  # a room past its count by keep // TRIM_SLACK events is trimmed at once

log = logging.getLogger("zchat.history")
T = TypeVar("T")
# (request id, seq, room) of a sender's recent messages, oldest first.
RecentIds: TypeAlias = dict[str, list[tuple[str, int, str]]]


class History:
    """The interface: per room, an ordered log of events with consecutive seqs.

    Args:
        keep: events kept per room (older ones pruned); 0 keeps all.
        max_age: seconds an event is kept; 0 keeps them regardless of age.
    """

    durable = False
    # Whether a commit waits on the disk (an fsync), so that the loop gains
    # by decoding its next pass while a writer thread waits (``begin_commit``).
    commits_aside = False

    def __init__(self, keep: int = 10_000, max_age: float = 0.0) -> None:
        self.keep = keep
        self.max_age = max_age
        self.last_seqs: dict[str, int] = {}  # every room ever given a seq, closed ones too
        self.epoch = secrets.token_hex(8)
        self._settings: dict[str, dict[str, Any]] = {}

    @property
    def last_seq(self) -> int:
        """``lobby``'s last seq (version 1's one room)."""
        return self.last_seqs.get(ROOM, 0)

    def seq_of(self, room: str) -> int:
        """The last seq ``room`` was given (0 if never)."""
        return self.last_seqs.get(room, 0)

    def append(self, event: dict[str, Any], sender: str | None = None,
               rid: str | None = None, packed: bytes | None = None) -> None:
        """Keep ``event`` (its ``seq`` is its room's last seq + 1).

        ``packed``: the event already packed (MessagePack), as it is
        published: a durable store keeps these bytes instead of packing again.
        """
        raise NotImplementedError

    def rooms(self) -> dict[str, dict[str, Any]]:
        """The settings of every room kept (closed rooms are not)."""
        return dict(self._settings)

    def save_room(self, room: str, settings: dict[str, Any]) -> None:
        """Keep ``room``'s settings (with the next commit)."""
        self._settings[room] = settings
        self.last_seqs.setdefault(room, 0)

    def drop_room(self, room: str) -> None:
        """Forget ``room``'s settings and events; its last seq is kept."""
        self._settings.pop(room, None)

    def after(self, seq: int, limit: int, max_bytes: int = 0,
              room: str = ROOM) -> list[dict[str, Any]]:
        """Kept events of ``room`` with seq above ``seq``, ascending, at most ``limit``.

        ``max_bytes`` bounds the packed size of the page (0: no bound); the
        first event is returned whatever its size, so paging always moves on.
        """
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def commit(self) -> None:
        """Make everything appended so far durable (no-op in memory)."""
        self.begin_commit()
        self.finish_commit()

    def begin_commit(self) -> None:
        """Start making everything appended so far durable; return at once.

        At most one commit is under way: a commit begun before is finished
        first (and its failure raised).
        """

    def finish_commit(self) -> None:
        """Wait until the commit begun last returned (``HistoryError`` if it failed)."""

    @property
    def committing(self) -> bool:
        """Whether a commit was begun and not yet finished."""
        return False

    def fileno(self) -> int | None:
        """A descriptor readable while a begun commit has returned and is not finished.

        The loop polls it beside its sockets. None: commits never run aside.
        """
        return None

    def prune(self, now: float) -> None:
        """Forget events past the count or age limit (durably: with the next commit)."""

    def recent_ids(self, per_sender: int) -> RecentIds:
        """(id, seq, room) of the last messages of each sender, oldest first.

        A sender is the dedupe lineage the broker stored with each message
        (see ``zchat.state``), never a bare name.
        """
        return {}

    def close(self) -> None:
        """Release the store."""


class MemoryHistory(History):
    """The last ``keep`` events of each room in a deque; gone when the process ends."""

    def __init__(self, keep: int = 10_000, max_age: float = 0.0) -> None:
        super().__init__(keep, max_age)
        self._logs: dict[str, deque[dict[str, Any]]] = {}
        self._count = 0
        self._packer = msgpack.Packer(use_bin_type=True)

    def append(self, event: dict[str, Any], sender: str | None = None,
               rid: str | None = None, packed: bytes | None = None) -> None:
        room = event.get("room", ROOM)
        log_ = self._logs.get(room)
        if log_ is None:
            log_ = self._logs[room] = deque(maxlen=self.keep or None)
        if log_.maxlen is not None and len(log_) == log_.maxlen:
            self._count -= 1
        log_.append(event)
        self._count += 1
        self.last_seqs[room] = event["seq"]

    def drop_room(self, room: str) -> None:
        super().drop_room(room)
        self._count -= len(self._logs.pop(room, ()))

    def after(self, seq: int, limit: int, max_bytes: int = 0,
              room: str = ROOM) -> list[dict[str, Any]]:
        events = self._logs.get(room)
        if not events or seq >= self.seq_of(room):
            return []
        skip = max(0, seq - events[0]["seq"] + 1)
        page = islice(events, skip, skip + limit)
        if not max_bytes:
            return list(page)
        pack = self._packer.pack
        return [event for event, _ in _within(((e, len(pack(e))) for e in page), max_bytes)]

    def __len__(self) -> int:
        return self._count

    def prune(self, now: float) -> None:
        if self.max_age:
            horizon = now - self.max_age
            for events in self._logs.values():
                while events and events[0]["ts"] < horizon:
                    events.popleft()
                    self._count -= 1


_SCHEMA = """
-- meta: 'epoch' and 'schema' ('3'), where version 1 also kept 'last_seq' (lobby's)
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- rooms given a seq: a last seq no lower than any a deletion took away (the
-- highest stored event may say more), and settings (NULL once closed)
CREATE TABLE IF NOT EXISTS rooms (
    name TEXT PRIMARY KEY,
    last_seq INTEGER NOT NULL,
    settings BLOB              -- MessagePack map (see zchat.state), NULL: closed
);
-- a room's events, consecutive seqs first..last, as one commit wrote them: a
-- rowid table: rows this large (kilobytes, overflow pages) would be copied
-- into the interior pages of a WITHOUT ROWID table's B-tree
CREATE TABLE IF NOT EXISTS segments (
    room TEXT NOT NULL,
    first INTEGER NOT NULL,    -- the seq of its first event
    last INTEGER NOT NULL,     -- the seq of its last event
    ts0 REAL NOT NULL,         -- no event in it is older (a trim may leave it lower)
    ts REAL NOT NULL,          -- its newest event's ts
    ids BLOB,                  -- MessagePack array, per event [sender's dedupe lineage,
                               -- request id] or nil (NULL: no event has one)
    bodies BLOB NOT NULL       -- the events as published (MessagePack), back to back
);
CREATE UNIQUE INDEX IF NOT EXISTS segments_by_room ON segments (room, first, last);
"""
# Version 2 kept a row per event; version 1 one room's events keyed by seq
# alone (they became lobby's). Both are read into segments at open.
_EVENTS_V2 = """
CREATE TABLE IF NOT EXISTS events (
    room TEXT NOT NULL,
    seq INTEGER NOT NULL,
    ts REAL NOT NULL,
    sender TEXT,
    rid TEXT,
    body BLOB NOT NULL,
    PRIMARY KEY (room, seq)
) WITHOUT ROWID;
"""
_MIGRATE_V1 = """
ALTER TABLE events RENAME TO events_v1;
""" + _EVENTS_V2 + """
INSERT INTO events SELECT 'lobby', seq, ts, sender, rid, body FROM events_v1;
DROP TABLE events_v1;
INSERT OR IGNORE INTO rooms
    SELECT 'lobby', coalesce((SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'last_seq'),
                             0), NULL;
DELETE FROM meta WHERE key = 'last_seq';
"""


# (room, seq, ts, sender, rid, body): one event appended, not yet committed
_Row: TypeAlias = tuple[str, int, float, str | None, str | None, bytes]
# (room, first, last, ts0, ts, ids, bodies): one row of ``segments``
_Segment: TypeAlias = tuple[str, int, int, float, float, bytes | None, bytes]


@dataclass(slots=True)
class _Commit:
    """What one commit writes, taken from the store on the loop's thread.

    The writer thread reads nothing else of the store: while it writes,
    the loop goes on appending to fresh lists.
    """

    rows: list[_Row]
    # (room, last seq, settings): settings None closes the room, ``_KEEP`` keeps them
    rooms: list[tuple[str, int, object]]  # object: bytes, None or _KEEP
    dropped: list[str]  # rooms whose events go
    trim: list[tuple[str, int]] = field(default_factory=list)  # (room, highest seq to forget)
    horizon: float | None = None  # events older than this go (retention by age)


_KEEP = object()  # a room's settings stay as they are; only its last seq moves


class _Writer:
    """One thread that runs commits handed to it, one at a time.

    The loop hands a commit over (``submit``) and later collects its
    result (``wait``); ``fileno`` turns readable when the result is in, so
    the loop's poll wakes for it. sqlite3 releases the GIL while SQLite
    writes, so the loop decodes its next pass meanwhile. The hand-over is
    a ``SimpleQueue`` (a C lock, no Python-level condition variable: it is
    paid once per pass) and the result comes back over a pipe.
    """

    def __init__(self, run: Callable[[_Commit], int]) -> None:
        self._run = run
        self._ready, self._done = os.pipe()
        self._jobs: queue.SimpleQueue[_Commit | None] = queue.SimpleQueue()
        self._result: int | BaseException = 0
        self.busy = False
        self._thread = threading.Thread(target=self._serve, name="zchat-history-writer",
                                        daemon=True)
        self._thread.start()

    def fileno(self) -> int:
        return self._ready

    def submit(self, job: _Commit) -> None:
        self.busy = True
        self._jobs.put(job)

    def wait(self) -> int | BaseException:
        """The deleted count of the commit handed over last, or what it raised."""
        os.read(self._ready, 1)  # blocks until the writer is done
        self.busy = False
        return self._result

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                self._result = self._run(job)
            except BaseException as exc:  # handed to the loop, which decides
                self._result = exc
            os.write(self._done, b"c")

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()
        for fd in (self._ready, self._done):
            os.close(fd)


def _hold(path: str) -> int:
    """Lock a file beside the database for this process; its descriptor.

    One broker per database: a second one fails at start instead of
    interleaving seqs. The lock goes with the process, however it ends.
    """
    fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        raise OSError(f"in use by another broker ({exc.strerror})") from exc
    return fd


class _Checkpointer:
    """Copies the WAL into the database on its own connection and thread.

    A PASSIVE checkpoint never blocks the writer (WAL lets both run), so its
    fsyncs no longer sit inside a commit. Every ``CHECKPOINT_EVERY`` seconds;
    a failure is logged (once a minute) and tried again: the WAL only grows
    meanwhile, and every commit stays durable in it.
    """

    def __init__(self, path: str, fsync: bool) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, timeout=5.0,
                                   check_same_thread=False)
        self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
        self._path = path
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="zchat-history-checkpoint",
                                        daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        said = -REPORT_EVERY
        while not self._stop.wait(CHECKPOINT_EVERY):
            try:
                self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error as exc:
                if time.monotonic() - said >= REPORT_EVERY:
                    said = time.monotonic()
                    log.error("history checkpoint failed in %s: %s (said once a minute)",
                              self._path, exc)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._db.close()


class SqliteHistory(History):
    """Events in an SQLite database (WAL); survives the process.

    The broker holds the database alone (a lock on ``<db>.lock``): a second
    broker on the same file fails at start instead of interleaving seqs. ``fsync`` (SQLite
    ``synchronous=FULL``) also survives a power cut, at the price of an
    fsync per commit; without it (``NORMAL``) a killed process loses
    nothing committed, a crashed machine may lose the last commits.

    A room's last seq is its highest stored event's, or its row in
    ``rooms`` where that is higher: a commit that can delete a room's newest
    events (retention by age, closing the room) writes every room's row up
    to date in the same transaction, so a seq once acked is never given
    again under the same epoch, even when every event is gone. A commit
    that only adds events is a single INSERT and leaves the rows behind.

    A commit writes each room's events of its pass as one row of
    ``segments`` (``SEGMENT_EVENTS`` at most), their packed bytes back to
    back: SQLite's work is per row, and a row per event cost 2-3 times the
    CPU per event at the 40-256 events a busy pass holds. Trimming to the
    count or the age cuts inside a row exactly (the row that straddles the
    cut is written again without its head), so what is kept is what a
    row per event kept.

    Every failure is a ``HistoryError``. Opening checks every page once
    (``quick_check``), so a corrupt database is found at start; a read
    that fails later costs that request only; a failed commit (pruning
    included) marks the store broken: nothing more is written, and the
    broker stops without acking what it could not store.

    One connection, used by one thread at a time (``_lock``): the writer
    thread for a commit begun with ``begin_commit``, the loop's thread for
    everything else. A read waits for a commit under way.
    """

    durable = True

    def __init__(self, path: str | os.PathLike[str], keep: int = 10_000,
                 max_age: float = 0.0, fsync: bool = False) -> None:
        super().__init__(keep, max_age)
        self.path = str(path)
        # Without an fsync a commit is CPU work (pages into the page cache):
        # on a writer thread it only added GIL hand-overs (W1, S = 10,
        # 32,000/s, six runs each way: 37-52 against 35.5-37 us of CPU a
        # message, and the step passed in 2 runs against 4 committed on the
        # loop). With one it waits on the disk, with the GIL released.
        self.commits_aside = fsync
        self._pending: list[_Row] = []  # appended, not yet handed to a commit
        self._inflight: list[_Row] = []  # handed to the commit under way
        self._pending_rooms: dict[str, bytes | None] = {}  # settings to write (None: closed)
        self._dropped: set[str] = set()  # rooms whose events to delete at commit
        # Per room, a seq no stored event is below (the oldest one, or less
        # once the age limit deleted some): how far the room is over its count.
        self._first: dict[str, int] = {}
        self._behind: set[str] = set()  # rooms whose row's last_seq is below their events'
        self._prune_at: float | None = None  # the next commit prunes, as of this time
        self._packer = msgpack.Packer(use_bin_type=True)
        self._broken: str | None = None
        self._said: dict[str, float] = {}
        self._lock = threading.Lock()
        self._writer: _Writer | None = None  # started by the first begin_commit
        self._checkpoints: _Checkpointer | None = None
        self._hold = -1  # the descriptor whose lock says "this broker's database"
        try:
            if self.path != MEMORY:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                self._hold = _hold(self.path)
            # A short busy timeout: a database held by another program is an
            # error to report at once, not a lock to wait for. Not bound to
            # this thread: the writer thread commits (never at the same time).
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=0.5,
                                       check_same_thread=False,
                                       cached_statements=ROWS_PER_INSERT + 64)
        except (sqlite3.Error, OSError) as exc:
            self._release_hold()
            raise HistoryError(f"cannot open history database {self.path}: {exc}") from exc
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
            if self.path != MEMORY:
                # Checkpoints (the only fsyncs under NORMAL) run on their own
                # connection and thread, never inside a commit: one took up
                # to 18 ms here, and a commit waiting for it held back every
                # ack and event of its pass.
                self._db.execute("PRAGMA wal_autocheckpoint=0")
            self._db.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            columns = [row[1] for row in self._db.execute("PRAGMA table_info(events)")]
            if columns:
                if "room" not in columns:
                    for statement in _MIGRATE_V1.split(";"):
                        if statement.strip():
                            self._db.execute(statement)
                began = time.monotonic()
                moved = _migrate_v2(self._db)
                log.warning("history database %s rewritten to format 3 (a row per room and "
                            "commit): %d events in %.1f s; brokers older than this one "
                            "cannot read it", self.path, moved, time.monotonic() - began)
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', '3')")
            row = self._db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('epoch', ?)", (self.epoch,))
            else:
                self.epoch = row[0]
            self._db.execute("COMMIT")
            # A row's events live mostly in overflow pages, which nothing
            # below reads: every page is walked once now, while a corrupt
            # database is still a clean exit 4 rather than a failed read later.
            problems = [row[0] for row in self._db.execute("PRAGMA quick_check(5)")]
            if problems != ["ok"]:
                raise ValueError("; ".join(problems))
            # The check walked every page through SQLite's cache: let it go,
            # so the cache holds what the broker reads, not what the check
            # happened to walk last.
            self._db.execute("PRAGMA shrink_memory")
            for name, last, settings in self._db.execute(
                    "SELECT name, last_seq, settings FROM rooms"):
                self.last_seqs[name] = int(last)
                if settings is not None:
                    self._settings[name] = msgpack.unpackb(settings)
            stored = 0
            for name, first_seq, kept_seq, count in self._db.execute(
                    "SELECT room, min(first), max(last), sum(last - first + 1) "
                    "FROM segments GROUP BY room"):
                if int(kept_seq) > self.last_seqs.get(name, 0):
                    # Left behind by insert-only commits before a stop: the
                    # first commit that may delete events writes it.
                    self._behind.add(name)
                self.last_seqs[name] = max(self.last_seqs.get(name, 0), int(kept_seq))
                self._first[name] = int(first_seq)
                stored += count
            self._stored: int = stored
            # Read now, while a failure is still a clean exit 4.
            self._recent: list[tuple[str, str, int, str]] = self._read_recent()
        except (sqlite3.Error, ValueError, msgpack.ExtraData) as exc:
            self._db.close()
            self._release_hold()
            raise HistoryError(f"cannot open history database {self.path}: {exc}") from exc
        if self.path != MEMORY:
            try:
                self._checkpoints = _Checkpointer(self.path, fsync)
            except sqlite3.Error as exc:
                self._db.close()
                self._release_hold()
                raise HistoryError(f"cannot open history database {self.path}: {exc}") from exc

    def _read_recent(self) -> list[tuple[str, str, int, str]]:
        """(sender, id, seq, room) of the last ``RECENT_IDS_SCANNED`` stored messages with an id."""
        recent: list[tuple[str, str, int, str]] = []
        cursor = self._db.execute("SELECT room, first, ids FROM segments WHERE ids IS NOT NULL "
                                  "ORDER BY ts DESC, first DESC")
        try:
            for room, first, packed in cursor:
                ids = msgpack.unpackb(packed)
                for offset in range(len(ids) - 1, -1, -1):
                    pair = ids[offset]
                    if pair is not None:
                        recent.append((pair[0], pair[1], first + offset, room))
                if len(recent) >= RECENT_IDS_SCANNED:
                    break
        finally:
            cursor.close()
        del recent[RECENT_IDS_SCANNED:]
        recent.reverse()
        return recent

    def _release_hold(self) -> None:
        if self._hold >= 0:
            os.close(self._hold)  # closing the descriptor drops its lock
            self._hold = -1

    def append(self, event: dict[str, Any], sender: str | None = None,
               rid: str | None = None, packed: bytes | None = None) -> None:
        room = event.get("room", ROOM)
        seq = event["seq"]
        if packed is None:
            packed = self._packer.pack(event)
        self._pending.append((room, seq, event["ts"], sender, rid, packed))
        self.last_seqs[room] = seq
        if room not in self._first:
            self._first[room] = seq

    def save_room(self, room: str, settings: dict[str, Any]) -> None:
        super().save_room(room, settings)
        self._pending_rooms[room] = self._packer.pack(settings)

    def drop_room(self, room: str) -> None:
        super().drop_room(room)
        self._pending_rooms[room] = None
        self._dropped.add(room)
        self._pending = [p for p in self._pending if p[0] != room]
        self._first.pop(room, None)

    @property
    def committing(self) -> bool:
        return self._writer is not None and self._writer.busy

    def fileno(self) -> int | None:
        if self._writer is None:
            self._writer = _Writer(self._run_guarded)
        return self._writer.fileno()

    def commit(self) -> None:
        self.finish_commit()
        job = self._take()
        if job is not None:
            self._collect(self._attempt(job))

    def begin_commit(self) -> None:
        self.finish_commit()
        job = self._take()
        if job is None:
            return
        if self._writer is None:
            self._writer = _Writer(self._run_guarded)
        self._writer.submit(job)

    def finish_commit(self) -> None:
        if self._broken is not None:
            raise HistoryError(self._broken)
        if self._writer is None or not self._writer.busy:
            return
        self._collect(self._writer.wait())

    def _take(self) -> _Commit | None:
        """This pass's writes as one commit (None: nothing to write); the store goes on empty."""
        if not self._pending and not self._pending_rooms and self._prune_at is None:
            return None
        grown = {p[0] for p in self._pending}
        trim = self._trims(grown) if self.keep else []
        # Most commits only add events: one INSERT, no transaction around
        # it (see ``_write``), and the rooms' rows are left behind (the
        # highest stored event says a room's last seq). A commit that may
        # delete a room's newest events (retention by age, a room dropped)
        # or changes settings brings every row behind up to date first.
        rooms: list[tuple[str, int, object]] = []
        horizon = None
        if self._pending_rooms or self._dropped or self._prune_at is not None:
            changed = self._behind | grown | set(self._pending_rooms)
            rooms = [(room, self.last_seqs.get(room, 0), self._pending_rooms.get(room, _KEEP))
                     for room in changed]
            self._behind = set()
            if self._prune_at is not None and self.max_age:
                horizon = self._prune_at - self.max_age
            self._prune_at = None
        else:
            self._behind |= grown
        job = _Commit(self._pending, rooms, list(self._dropped), trim, horizon)
        self._inflight = self._pending
        self._pending = []
        self._pending_rooms = {}
        self._dropped = set()
        return job

    def _trims(self, grown: set[str]) -> list[tuple[str, int]]:
        """(room, last seq to delete) for the rooms this commit brings back to their count.

        A room is trimmed as it grows, once it holds ``keep // TRIM_SLACK``
        events more than its count, and exactly at each ``prune``. Trimmed
        only at the prune (each heartbeat), a busy room's commit deleted all
        that the heartbeat had added (160,000 rows at 32,000 messages/s),
        and the acks and events of that pass waited for it.
        """
        exact = self._prune_at is not None
        slack = 0 if exact else self.keep // TRIM_SLACK
        trims = []
        for room in (self._first if exact else grown):
            first = self._first.get(room)
            upto = self.last_seqs.get(room, 0) - self.keep
            if first is not None and upto - first + 1 > slack:
                trims.append((room, upto))
                self._first[room] = upto + 1
        return trims

    def _run_guarded(self, job: _Commit) -> int:
        with self._lock:
            return self._write(job)

    def _attempt(self, job: _Commit) -> int | BaseException:
        """``_write`` on this thread: its count, or what it raised (for ``_collect``)."""
        try:
            return self._run_guarded(job)
        except Exception as exc:  # every failure of the store takes one path
            return exc

    def _write(self, job: _Commit) -> int:
        """Write ``job`` in one transaction; by how many events the store grew.

        Runs on the writer thread (or the caller's, for ``commit``), holding
        the connection's lock; reads nothing of the store but ``job``.
        """
        db = self._db
        segments = _segments(job.rows)
        if (0 < len(segments) <= ROWS_PER_INSERT and not job.rooms and not job.dropped
                and not job.trim and job.horizon is None):
            # One statement is one transaction: BEGIN, the room rows and
            # COMMIT were three statements more, each with its own fixed
            # cost (and, on the writer thread, its own wait for the GIL).
            _insert(db, segments)
            return len(job.rows)
        db.execute("BEGIN")
        try:
            deleted = 0
            for room in job.dropped:
                deleted += _count(db, "WHERE room = ?", (room,))
                db.execute("DELETE FROM segments WHERE room = ?", (room,))
            _insert(db, segments)
            for room, seq, settings in job.rooms:
                if settings is _KEEP:
                    db.execute("INSERT INTO rooms VALUES (?, ?, NULL) ON CONFLICT(name) "
                               "DO UPDATE SET last_seq = excluded.last_seq", (room, seq))
                else:
                    db.execute("INSERT OR REPLACE INTO rooms VALUES (?, ?, ?)",
                               (room, seq, settings))
            for room, upto in job.trim:
                deleted += _count(db, "WHERE room = ? AND last <= ?", (room, upto))
                db.execute("DELETE FROM segments WHERE room = ? AND last <= ?", (room, upto))
                # The one row that holds both sides of the cut loses its head.
                for row in db.execute("SELECT * FROM segments WHERE room = ? AND first <= ?",
                                      (room, upto)).fetchall():
                    deleted += _cut(db, row, upto=upto)
            if job.horizon is not None:
                horizon = job.horizon
                deleted += _count(db, "WHERE ts < ?", (horizon,))
                db.execute("DELETE FROM segments WHERE ts < ?", (horizon,))
                for row in db.execute("SELECT * FROM segments WHERE ts0 < ?",
                                      (horizon,)).fetchall():
                    deleted += _cut(db, row, horizon=horizon)
            db.execute("COMMIT")
        except BaseException:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # no transaction left to roll back: the error above says why
            raise
        return len(job.rows) - deleted

    def _collect(self, result: int | BaseException) -> None:
        """Take in a commit's result: its count, or the failure that breaks the store."""
        self._inflight = []
        if isinstance(result, BaseException):
            # What failed to commit was never acked; nothing more is written.
            # Whatever the writer raised, it is the store's failure: the
            # broker's one path for it (stop without acking) must see it.
            self._broken = f"cannot write history to {self.path}: {result}"
            self._pending = []
            self._pending_rooms = {}
            raise HistoryError(self._broken) from result
        self._stored += result

    def after(self, seq: int, limit: int, max_bytes: int = 0,
              room: str = ROOM) -> list[dict[str, Any]]:
        # Events not yet known to be committed are served from memory: the
        # reply leaves with the pass, after its commit, like the events.
        # A room closed since the last commit still has rows in the table:
        # they are not read.
        try:
            rows: list[tuple[int, bytes]] = []
            if room not in self._dropped:
                with self._lock:
                    cursor = self._db.execute(
                        "SELECT first, last, bodies FROM segments WHERE room = ? AND last > ? "
                        "ORDER BY first", (room, seq))
                    try:
                        for first, last, bodies in cursor:
                            rows += islice(_split(first, last, bodies), max(0, seq + 1 - first),
                                           None)
                            if len(rows) >= limit:
                                break
                    finally:
                        cursor.close()  # a statement left open holds a read snapshot
            # What a commit under way (or just finished) holds may also be in
            # the table already: each seq is taken once.
            unsure = [(p[1], p[5]) for p in self._inflight
                      if p[0] == room and p[1] > seq and room not in self._dropped]
            pending = [(p[1], p[5]) for p in self._pending if p[0] == room and p[1] > seq]
            merged = heapq.merge(rows, unsure, pending)
            bodies = (body for _, body in _unique_seqs(merged))
            page = _within(((body, len(body)) for body in islice(bodies, limit)), max_bytes)
            return [msgpack.unpackb(body) for body, _ in page]
        except (sqlite3.Error, ValueError, msgpack.ExtraData) as exc:
            raise self._failure("read", exc) from exc

    def __len__(self) -> int:
        return self._stored + len(self._inflight) + len(self._pending)

    def prune(self, now: float) -> None:
        # Deleting is writing: it goes with the next commit, never on the side.
        self._prune_at = now

    def recent_ids(self, per_sender: int) -> RecentIds:
        ids: RecentIds = {}
        for sender, rid, seq, room in self._recent:
            ids.setdefault(sender, []).append((rid, seq, room))
        self._recent = []  # needed once, at start
        return {sender: items[-per_sender:] for sender, items in ids.items()}

    def close(self) -> None:
        try:
            if self._broken is None:
                self.commit()
        finally:
            try:
                if self._writer is not None:
                    self._writer.close()
                if self._checkpoints is not None:
                    self._checkpoints.close()
                self._db.close()  # the last connection: it checkpoints the rest
            except sqlite3.Error as exc:
                raise HistoryError(f"cannot close history database {self.path}: {exc}") from exc
            finally:
                self._release_hold()

    def _failure(self, what: str, exc: Exception) -> HistoryError:
        """A ``HistoryError``, logged once a minute per kind, not once per request."""
        now = time.monotonic()
        if now - self._said.get(what, -REPORT_EVERY) >= REPORT_EVERY:
            self._said[what] = now
            log.error("history %s failed in %s: %s (said once a minute)", what, self.path, exc)
        return HistoryError(f"history {what} failed: {exc}")


@functools.cache
def _insert_segments(count: int) -> str:
    """``INSERT INTO segments`` of ``count`` rows in one statement (sqlite3 caches each)."""
    return "INSERT INTO segments VALUES " + ", ".join(["(?, ?, ?, ?, ?, ?, ?)"] * count)


def _insert(db: sqlite3.Connection, segments: list[_Segment]) -> None:
    """Write ``segments``, ``ROWS_PER_INSERT`` rows a statement."""
    for start in range(0, len(segments), ROWS_PER_INSERT):
        chunk = segments[start:start + ROWS_PER_INSERT]
        db.execute(_insert_segments(len(chunk)), [v for seg in chunk for v in seg])


def _segments(rows: list[_Row]) -> list[_Segment]:
    """``rows`` as segments: each room's consecutive events, ``SEGMENT_EVENTS`` at most a row."""
    runs: dict[str, list[_Row]] = {}
    segments = []
    for row in rows:
        run = runs.get(row[0])
        if run is not None and (row[1] != run[-1][1] + 1 or len(run) >= SEGMENT_EVENTS):
            segments.append(_segment(run))
            run = None
        if run is None:
            run = runs[row[0]] = []
        run.append(row)
    segments += (_segment(run) for run in runs.values())
    return segments


def _segment(run: list[_Row]) -> _Segment:
    stamps = [row[2] for row in run]
    ids = [None if row[4] is None else (row[3], row[4]) for row in run]
    return (run[0][0], run[0][1], run[-1][1], min(stamps), max(stamps),
            msgpack.packb(ids) if any(ids) else None, b"".join([row[5] for row in run]))


def _split(first: int, last: int, bodies: bytes) -> Iterator[tuple[int, bytes]]:
    """(seq, packed event) of each event of a segment, in order (``ValueError``: corrupt)."""
    unpacker = msgpack.Unpacker()
    unpacker.feed(bodies)
    start = 0
    for seq in range(first, last + 1):
        try:
            unpacker.skip()
        except msgpack.OutOfData:  # not a ValueError, unlike the other unpack errors
            raise ValueError(f"segment {first}..{last}: no event for seq {seq}") from None
        end = unpacker.tell()
        yield seq, bodies[start:end]
        start = end
    if start != len(bodies):
        raise ValueError(f"segment {first}..{last}: bytes past its last event")


def _count(db: sqlite3.Connection, where: str, args: tuple[object, ...]) -> int:
    """How many events the segments ``where`` selects hold."""
    row = db.execute("SELECT coalesce(sum(last - first + 1), 0) FROM segments " + where,
                     args).fetchone()
    return int(row[0])


def _cut(db: sqlite3.Connection, segment: _Segment, upto: int = 0,
         horizon: float | None = None) -> int:
    """Delete a segment's leading events up to seq ``upto``, or older than ``horizon``; how many."""
    room, first, last, ts0, newest, ids, bodies = segment
    events = list(_split(first, last, bodies))
    if horizon is None:
        # By count: no event need be read, and ts0 stays a bound below.
        gone = min(len(events), max(0, upto - first + 1))
    else:
        gone = 0
        while gone < len(events) and _stamp(events[gone][1]) < horizon:
            gone += 1
        # Its ts0 exact again, so that the next prune passes it by (the clock
        # may have gone back within it: the oldest is not always the first).
        ts0 = min((_stamp(packed) for _, packed in events[gone:]), default=ts0)
    key = (room, first)
    if gone == len(events):
        db.execute("DELETE FROM segments WHERE room = ? AND first = ?", key)
        return gone
    if not gone:
        db.execute("UPDATE segments SET ts0 = ? WHERE room = ? AND first = ?", (ts0, *key))
        return 0
    kept_ids = None
    if ids is not None:
        rest = msgpack.unpackb(ids)[gone:]
        kept_ids = msgpack.packb(rest) if any(rest) else None
    offset = sum(len(packed) for _, packed in events[:gone])
    db.execute("DELETE FROM segments WHERE room = ? AND first = ?", key)
    _insert(db, [(room, first + gone, last, ts0, newest, kept_ids, bodies[offset:])])
    return gone


def _stamp(packed: bytes) -> float:
    ts = msgpack.unpackb(packed)["ts"]
    return float(ts)


def _migrate_v2(db: sqlite3.Connection) -> int:
    """Version 2's ``events`` (a row per event) become segments, in the transaction under way.

    Returns how many events moved. A million take ~5 s here, once.
    """
    moved = 0
    cursor = db.execute("SELECT room, seq, ts, sender, rid, body FROM events ORDER BY room, seq")
    while batch := cursor.fetchmany(4096):
        moved += len(batch)
        _insert(db, _segments(batch))
    cursor.close()
    db.execute("DROP TABLE events")
    return moved


def _unique_seqs(rows: Iterable[tuple[int, bytes]]) -> Iterator[tuple[int, bytes]]:
    """``rows`` (ascending by seq) with each seq once."""
    last = None
    for row in rows:
        if row[0] != last:
            last = row[0]
            yield row


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
