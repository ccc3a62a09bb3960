"""zchat.history: the in-memory and SQLite stores, no sockets."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from conftest import wait_until
from zchat.history import HistoryError, MemoryHistory, SqliteHistory, open_history
from zchat.protocol import Join, Leave, Say
from zchat.state import Broker, Limits


def event(seq: int, ts: float = 100.0, text: str = "x") -> dict[str, object]:
    return {"type": "message", "room": "lobby", "seq": seq, "ts": ts, "from": "a", "text": text}


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> MemoryHistory | SqliteHistory:
    if request.param == "memory":
        return MemoryHistory(keep=5)
    return SqliteHistory(tmp_path / "h.db", keep=5)


def test_append_after_and_keep(store: MemoryHistory | SqliteHistory) -> None:
    for seq in range(1, 11):
        store.append(event(seq))
    store.commit()
    store.prune(200.0)
    store.commit()  # what prune forgets goes with the next commit, never on the side
    assert store.last_seq == 10
    assert [e["seq"] for e in store.after(0, 100)] == [6, 7, 8, 9, 10]
    assert [e["seq"] for e in store.after(7, 2)] == [8, 9]
    assert store.after(10, 5) == []
    assert len(store) == 5
    store.close()


def test_a_growing_room_is_trimmed_a_little_at_each_commit_not_all_at_the_prune(
        tmp_path: Path) -> None:
    # Trimmed only at the heartbeat's prune, a busy room's commit deleted
    # all that a heartbeat had added, and that pass's acks waited for it.
    from zchat.history import TRIM_SLACK

    keep = 160
    slack = keep // TRIM_SLACK
    path = tmp_path / "t.db"
    store = SqliteHistory(path, keep=keep)
    most = 0
    for seq in range(1, 2001):
        store.append(event(seq))
        if seq % 7 == 0:  # passes of 7 events
            store.commit()
            most = max(most, len(store))
    store.commit()
    assert keep < most <= keep + slack + 7  # never the 2,000 a prune-only store held
    assert len(store.after(0, 10_000)) == len(store)
    store.prune(200.0)
    store.commit()
    assert [e["seq"] for e in store.after(0, 10_000)] == list(range(2001 - keep, 2001))
    store.close()
    reopened = SqliteHistory(path, keep=keep)  # the count it starts from is the stored one
    assert len(reopened) == keep and reopened.last_seq == 2000
    for seq in range(2001, 2001 + slack + 1):
        reopened.append(event(seq))
    reopened.commit()
    assert len(reopened) == keep
    reopened.close()


def test_age_retention(tmp_path: Path) -> None:
    for store in (MemoryHistory(keep=0, max_age=10), SqliteHistory(tmp_path / "a.db", 0, 10)):
        store.append(event(1, ts=100))
        store.append(event(2, ts=105))
        store.append(event(3, ts=111))
        store.commit()  # as the loop does each pass
        store.prune(now=116)
        store.commit()  # prune only says what the next commit forgets
        assert [e["seq"] for e in store.after(0, 10)] == [3]
        store.close()


def test_sqlite_keeps_seq_epoch_and_ids_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    first = SqliteHistory(path)
    first.append(event(1, text="hi"), "alice", "m1")
    first.append(event(2, text="yo"), "bob", None)
    first.commit()
    epoch = first.epoch
    first.close()
    second = SqliteHistory(path)
    assert (second.last_seq, second.epoch) == (2, epoch)
    assert [e["text"] for e in second.after(0, 10)] == ["hi", "yo"]
    assert second.recent_ids(10) == {"alice": [("m1", 1, "lobby")]}
    second.close()


def test_uncommitted_events_are_not_on_disk(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    store = SqliteHistory(path)
    store.append(event(1))
    store.commit()
    store.append(event(2))  # never committed: as if the process died now
    store._db.close()
    store._release_hold()  # a dead process's lock goes with it
    again = SqliteHistory(path)
    assert again.last_seq == 1
    again.close()


def test_second_broker_on_same_database_fails_clearly(tmp_path: Path) -> None:
    first = SqliteHistory(tmp_path / "h.db")
    with pytest.raises(HistoryError, match="cannot open history database"):
        SqliteHistory(tmp_path / "h.db")
    first.close()


def test_open_history_picks_the_store(tmp_path: Path) -> None:
    assert isinstance(open_history(":memory:", 10), MemoryHistory)
    store = open_history(str(tmp_path / "x" / "h.db"), 10)
    assert isinstance(store, SqliteHistory)
    assert store.durable
    store.close()


def test_broker_resumes_seq_and_dedupe_from_a_durable_store(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    broker = Broker(history=SqliteHistory(path), now=0.0)
    token = broker.handle(b"a", Join("alice"), 0.0, "10.0.0.1")[-1].body["token"]
    out = broker.handle(b"a", Say("kept", id="m1"), 1.0)
    seq = out[-1].body["seq"]
    broker.store.commit()
    epoch = broker.epoch
    broker.store.close()
    # A new broker on the same file: same epoch, seq goes on, the id is known.
    again = Broker(history=SqliteHistory(path), now=5.0, limits=Limits())
    assert (again.epoch, again.seq) == (epoch, seq)
    # Someone else who takes the name without the token is a new sender.
    again.handle(b"c", Join("alice"), 5.0, "10.0.0.9")
    fresh = again.handle(b"c", Say("not a resend", id="m1"), 5.5)
    assert fresh[-1].body["seq"] == seq + 2
    again.handle(b"c", Leave(), 5.5)
    # The client rejoins with its token: its lineage, and so its ids, go on.
    again.handle(b"b", Join("ALICE", token=token), 5.0, "10.0.0.1")
    resent = again.handle(b"b", Say("kept", id="m1"), 6.0)
    assert [o.body for o in resent] == [{"type": "ack", "id": "m1", "seq": seq,
                                            "room": "lobby"}]
    assert [e["text"] for e in again.history(0) if e["type"] == "message"] == [
        "kept", "not a resend"]
    again.store.close()


def test_fsync_asks_sqlite_for_full_synchronous_commits(tmp_path: Path) -> None:
    for fsync, level in ((False, 1), (True, 2)):  # NORMAL, FULL
        store = SqliteHistory(tmp_path / f"s{level}.db", fsync=fsync)
        assert store._db.execute("PRAGMA synchronous").fetchone()[0] == level
        assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        store.close()


def test_last_seq_survives_retention_that_pruned_everything(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    first = SqliteHistory(path, keep=0, max_age=2.0)
    for seq in range(1, 7):
        first.append(event(seq, ts=100.0))
    first.commit()
    first.prune(now=103.0)
    first.commit()
    assert len(first) == 0
    first.close()
    second = SqliteHistory(path, keep=0, max_age=2.0)
    assert second.last_seq == 6  # never 0: seq 1..6 were acked under this epoch
    second.close()


def test_a_room_only_ever_added_to_keeps_its_seq_when_age_empties_it(tmp_path: Path) -> None:
    # Commits that only add events leave the rooms' rows behind (one INSERT
    # each); the commit whose retention empties a room must bring its row up
    # to date, even when that commit holds none of the room's events.
    path = tmp_path / "h.db"
    first = SqliteHistory(path, keep=0, max_age=2.0)
    for seq in range(1, 5):
        first.append({**event(seq, ts=100.0), "room": "dev"})
        first.commit()  # insert-only commits
    first.append({**event(1, ts=100.0), "room": "ops"})
    first.commit()
    first.append(event(1, ts=103.0))  # lobby's, in the commit that prunes
    first.prune(now=103.0)
    first.commit()
    assert first.after(0, 10, room="dev") == [] and first.after(0, 10, room="ops") == []
    first.close()
    second = SqliteHistory(path, keep=0, max_age=2.0)
    assert (second.seq_of("dev"), second.seq_of("ops"), second.seq_of("lobby")) == (4, 1, 1)
    second.close()


def test_insert_only_commits_are_found_again_without_a_clean_close(tmp_path: Path) -> None:
    # Their rooms' rows are behind (or absent): reopening takes the last seq
    # from the stored events, as after a kill -9.
    path = tmp_path / "h.db"
    first = SqliteHistory(path)
    first.save_room("dev", {"topic": "t"})
    first.commit()
    for seq in range(1, 4):
        first.append({**event(seq), "room": "dev"})
        first.append({**event(seq), "room": "new"})
        first.commit()
    crashed = tmp_path / "crashed.db"  # what is on disk now, as a kill -9 leaves it
    for suffix in ("", "-wal"):
        shutil.copyfile(f"{path}{suffix}", f"{crashed}{suffix}")
    second = SqliteHistory(crashed, keep=0, max_age=2.0)
    assert (second.seq_of("dev"), second.seq_of("new")) == (3, 3)
    assert second.rooms() == {"dev": {"topic": "t"}}
    # The rows it found behind are written by its first commit that may
    # delete: here age retention empties both rooms.
    second.prune(now=time.time() + 10)
    second.commit()
    assert second.after(0, 10, room="dev") == [] and second.after(0, 10, room="new") == []
    second.close()
    third = SqliteHistory(crashed, keep=0, max_age=2.0)
    assert (third.seq_of("dev"), third.seq_of("new")) == (3, 3)
    third.close()
    first.close()


def test_pages_are_bounded_in_bytes(store: MemoryHistory | SqliteHistory) -> None:
    for seq in range(1, 6):
        store.append(event(seq, text="y" * 1000))
    store.commit()
    assert [e["seq"] for e in store.after(0, 100, max_bytes=2500)] == [1, 2]
    assert [e["seq"] for e in store.after(0, 100, max_bytes=10)] == [1]  # one at least
    assert len(store.after(0, 100)) == 5
    store.close()


def test_uncommitted_events_are_served_without_committing(tmp_path: Path) -> None:
    store = SqliteHistory(tmp_path / "h.db")
    store.append(event(1))
    store.commit()
    store.append(event(2))
    assert [e["seq"] for e in store.after(0, 10)] == [1, 2]
    assert store._db.execute("SELECT sum(last - first + 1) FROM segments").fetchone()[0] == 1
    store.close()


def corrupt(path: Path) -> None:
    """Overwrite pages of the first third with garbage, as a bad disk would.

    Not the last pages: finding the highest seq reads only those, so this
    is the corruption that a broker which only read max(seq) opened happily.
    """
    size = path.stat().st_size
    with path.open("r+b") as f:
        # Pages 1-4 are the schema, meta and the events root; leaves follow.
        for page in range(8, size // 4096 // 3, 2):
            f.seek(page * 4096)
            f.write(bytes([0xA5]) * 4096)


def fill(path: Path, events: int = 400) -> None:
    store = SqliteHistory(path)
    for seq in range(1, events + 1):
        store.append(event(seq, text="z" * 1000), "someone", f"id{seq}")
    store.commit()
    store.close()


def test_a_corrupt_database_is_a_history_error_at_open(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    fill(path)
    corrupt(path)
    with pytest.raises(HistoryError, match="cannot open history database"):
        SqliteHistory(path)


def test_a_failed_read_is_a_history_error(tmp_path: Path) -> None:
    store = SqliteHistory(tmp_path / "h.db")
    store._db.close()  # any sqlite3 error will do: this one is certain
    with pytest.raises(HistoryError, match="history read failed"):
        store.after(0, 10)
    store.prune(0.0)  # only noted: the commit that writes it fails
    with pytest.raises(HistoryError):
        store.commit()


def test_a_failed_commit_breaks_the_store_and_close_is_quiet(tmp_path: Path) -> None:
    store = SqliteHistory(tmp_path / "h.db")
    store.append(event(1))
    store.commit()
    # The database may not grow past its current pages: the next commit is "disk full".
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count={pages}")
    for seq in range(2, 200):
        store.append(event(seq, text="w" * 4000))
    with pytest.raises(HistoryError, match="cannot write history"):
        store.commit()
    with pytest.raises(HistoryError):
        store.commit()  # broken: nothing more is written
    store.append(event(300))
    store.close()  # no second error on the way out
    again = SqliteHistory(tmp_path / "h.db")
    assert again.last_seq == 1  # what failed was never stored
    again.close()


V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE events (seq INTEGER PRIMARY KEY, ts REAL NOT NULL, sender TEXT, rid TEXT,
                     body BLOB NOT NULL);
"""


def test_a_version_1_database_becomes_lobby_s(tmp_path: Path) -> None:
    import sqlite3

    import msgpack

    path = tmp_path / "v1.db"
    db = sqlite3.connect(path)
    db.executescript(V1_SCHEMA)
    db.execute("INSERT INTO meta VALUES ('epoch', 'old-epoch')")
    db.execute("INSERT INTO meta VALUES ('last_seq', '9')")  # 8 and 9 were pruned
    for seq in range(1, 8):
        db.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?)",
                   (seq, 100.0, "alice", f"m{seq}", msgpack.packb(event(seq, text=f"t{seq}"))))
    db.commit()
    db.close()
    store = SqliteHistory(path)
    assert (store.epoch, store.last_seq, store.seq_of("lobby"), len(store)) == (
        "old-epoch", 9, 9, 7)
    assert [e["text"] for e in store.after(5, 10)] == ["t6", "t7"]
    assert store.recent_ids(2) == {"alice": [("m6", 6, "lobby"), ("m7", 7, "lobby")]}
    broker = Broker(history=store, now=0.0)
    broker.handle(b"a", Join("bob"), 1.0, "10.0.0.1")
    assert broker.seq == 10  # seqs go on from the v1 database's last
    broker.store.close()
    again = SqliteHistory(path)  # migrated once: opening again changes nothing
    assert (again.last_seq, len(again)) == (10, 8)
    again.close()


def test_rooms_have_their_own_logs_and_closed_rooms_keep_their_seq(
        store: MemoryHistory | SqliteHistory) -> None:
    for seq in range(1, 8):
        store.append({**event(seq), "room": "dev"})
    store.append(event(1))
    store.save_room("dev", {"topic": "t"})
    store.commit()
    store.prune(200.0)
    store.commit()
    assert [e["seq"] for e in store.after(0, 100, room="dev")] == [3, 4, 5, 6, 7]  # keep=5
    assert [e["seq"] for e in store.after(0, 100)] == [1]
    assert store.rooms()["dev"] == {"topic": "t"}
    store.drop_room("dev")
    store.commit()
    assert store.after(0, 100, room="dev") == [] and "dev" not in store.rooms()
    assert store.seq_of("dev") == 7 and len(store) == 1
    store.close()


def test_closed_room_seq_and_settings_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    first = SqliteHistory(path)
    first.append({**event(1), "room": "gone"})
    first.save_room("gone", {})
    first.save_room("kept", {"topic": "x", "bans": {"m": "M"}})
    first.commit()
    first.drop_room("gone")
    first.close()
    second = SqliteHistory(path)
    assert second.rooms() == {"kept": {"topic": "x", "bans": {"m": "M"}}}
    assert (second.seq_of("gone"), second.seq_of("kept")) == (1, 0)
    second.close()


V2_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE rooms (name TEXT PRIMARY KEY, last_seq INTEGER NOT NULL, settings BLOB);
CREATE TABLE events (room TEXT NOT NULL, seq INTEGER NOT NULL, ts REAL NOT NULL, sender TEXT,
                     rid TEXT, body BLOB NOT NULL, PRIMARY KEY (room, seq)) WITHOUT ROWID;
"""


def test_a_version_2_database_s_rows_become_segments(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import sqlite3

    import msgpack

    path = tmp_path / "v2.db"
    db = sqlite3.connect(path)
    db.executescript(V2_SCHEMA)
    db.execute("INSERT INTO meta VALUES ('epoch', 'v2-epoch')")
    db.execute("INSERT INTO meta VALUES ('schema', '2')")
    db.execute("INSERT INTO rooms VALUES ('dev', 12, ?)", (msgpack.packb({"topic": "t"}),))
    for seq in range(3, 11):  # dev's 1-2 pruned, 11-12 stored then age-pruned
        body = dict(event(seq, text=f"d{seq}"), room="dev")
        db.execute("INSERT INTO events VALUES ('dev', ?, ?, ?, ?, ?)",
                   (seq, 100.0 + seq, "bob", f"b{seq}" if seq % 2 else None,
                    msgpack.packb(body)))
    for seq in range(1, 4):
        db.execute("INSERT INTO events VALUES ('lobby', ?, ?, ?, ?, ?)",
                   (seq, 100.0, "alice", f"a{seq}", msgpack.packb(event(seq, text=f"l{seq}"))))
    db.commit()
    db.close()
    store = SqliteHistory(path)
    assert "rewritten to format 3 (a row per room and commit): 11 events" in caplog.text
    assert (store.epoch, store.seq_of("dev"), store.seq_of("lobby"), len(store)) == (
        "v2-epoch", 12, 3, 11)
    assert [e["text"] for e in store.after(4, 3, room="dev")] == ["d5", "d6", "d7"]
    assert store.rooms() == {"dev": {"topic": "t"}}
    assert store.recent_ids(2) == {"alice": [("a2", 2, "lobby"), ("a3", 3, "lobby")],
                                   "bob": [("b7", 7, "dev"), ("b9", 9, "dev")]}
    tables = {row[0] for row in store._db.execute("SELECT name FROM sqlite_master")}
    assert "events" not in tables
    assert store._db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone() == ("3",)
    store.close()
    caplog.clear()
    again = SqliteHistory(path)  # migrated once: opening again changes nothing
    assert "rewritten" not in caplog.text
    assert [e["seq"] for e in again.after(0, 100, room="dev")] == list(range(3, 11))
    again.close()


def test_a_commit_keeps_each_room_s_events_of_a_pass_in_one_row(tmp_path: Path) -> None:
    # A row per event cost SQLite's B-tree work per event (4-7 us of CPU
    # here); a row per room and pass costs it once.
    store = SqliteHistory(tmp_path / "h.db")
    for seq in range(1, 301):  # two rooms interleaved, one pass
        store.append(event(seq))
        store.append(dict(event(seq), room="dev"), "bob", f"m{seq}")
    store.commit()
    rows = store._db.execute(
        "SELECT room, first, last FROM segments ORDER BY room, first").fetchall()
    # Each room's 300 events: one row of SEGMENT_EVENTS (256), one of the rest.
    assert rows == [("dev", 1, 256), ("dev", 257, 300), ("lobby", 1, 256), ("lobby", 257, 300)]
    assert [e["seq"] for e in store.after(250, 10, room="dev")] == list(range(251, 261))
    store.close()
    again = SqliteHistory(tmp_path / "h.db")  # the ids are read at start
    assert again.recent_ids(2) == {"bob": [("m299", 299, "dev"), ("m300", 300, "dev")]}
    again.close()


def test_cuts_inside_a_row_are_exact_and_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    store = SqliteHistory(path, keep=4, max_age=10)
    for seq in range(1, 11):  # one row: ts 101..110
        store.append(event(seq, ts=100.0 + seq), "a", f"m{seq}")
    store.commit()
    store.prune(now=117.5)  # count keeps 7..10, age keeps 8..10
    store.commit()
    assert [e["seq"] for e in store.after(0, 100)] == [8, 9, 10]
    assert len(store) == 3
    store.close()
    again = SqliteHistory(path, keep=4, max_age=10)
    assert ([e["seq"] for e in again.after(0, 100)], len(again)) == ([8, 9, 10], 3)
    assert again.recent_ids(5) == {"a": [("m8", 8, "lobby"), ("m9", 9, "lobby"),
                                         ("m10", 10, "lobby")]}
    again.close()


@pytest.mark.parametrize("last, tail", [(1, b"\xc1"), (2, b""), (1, b"\x92")],
                         ids=["bytes past its events", "a seq without an event",
                              "an event cut short"])
def test_a_row_that_does_not_hold_its_seqs_is_a_failed_read(
        tmp_path: Path, last: int, tail: bytes) -> None:
    import msgpack

    store = SqliteHistory(tmp_path / "h.db")
    store._db.execute("INSERT INTO segments VALUES ('lobby', 1, ?, 1.0, 1.0, NULL, ?)",
                      (last, msgpack.packb(event(1)) + tail))
    with pytest.raises(HistoryError, match="history read failed"):
        store.after(0, 10)
    store.close()


def test_the_wal_is_copied_into_the_database_on_its_own(tmp_path: Path) -> None:
    # Commits only append to the WAL; the checkpoint thread copies it into
    # the database file (and lets the WAL start over) every CHECKPOINT_EVERY.
    from zchat.history import CHECKPOINT_EVERY

    path = tmp_path / "h.db"
    store = SqliteHistory(path)
    empty = path.stat().st_size
    for seq in range(1, 2001):
        store.append(event(seq, text="c" * 500))
        if seq % 100 == 0:
            store.commit()
    wait_until("the events to leave the WAL",
               lambda: path.stat().st_size >= empty + 1_000_000,
               20 * CHECKPOINT_EVERY + 5, interval=0.05)
    store.close()
