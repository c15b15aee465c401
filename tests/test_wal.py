"""WAL upkeep: the writer's checkpoints keep the WAL small, whatever holds it back, and
TEDSTORE_CHECKPOINT chooses what the idle checkpoint does."""

from __future__ import annotations

import collections
import json
import os
import shutil
import threading
import time

import apsw
import pytest

import tedstore
from conftest import Conn, idle_for, prediction, query, run_cli, wait_for


class FileWrites(apsw.VFS):
    """The default VFS, counting which threads write the database file itself: in WAL
    mode, only checkpoints do."""

    def __init__(self) -> None:
        super().__init__("tedstore-file-writes", "")
        self.by_thread: collections.Counter = collections.Counter()

    def xOpen(self, name, flags):
        return CountedFile(self, name, flags)


class CountedFile(apsw.VFSFile):
    def __init__(self, vfs: FileWrites, name, flags):
        self.vfs, self.main = vfs, bool(flags[0] & apsw.SQLITE_OPEN_MAIN_DB)
        super().__init__("", name, flags)

    def xWrite(self, data, offset):
        if self.main:
            self.vfs.by_thread[threading.current_thread().name] += 1
        return super().xWrite(data, offset)


@pytest.fixture(scope="module")
def file_writes():
    vfs = FileWrites()
    yield vfs
    vfs.unregister()

# -- WAL upkeep ------------------------------------------------------------------------------

def wal_size(db: str) -> int:
    try:
        return os.path.getsize(db + "-wal")
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_a_reader_holding_a_snapshot_does_not_stop_ingest_and_the_wal_shrinks_after(daemon):
    reader = apsw.Connection(daemon.db, flags=apsw.SQLITE_OPEN_READONLY)
    reader.execute("BEGIN")
    before = reader.execute("SELECT count(*) FROM predictions").get
    conn = daemon.connect()
    lines = [prediction("w", i, i + 9) for i in range(40_000)]
    for first in range(0, len(lines), 2000):
        conn.send(*lines[first:first + 2000])
    assert conn.wait_ack(len(lines)) == []
    time.sleep(3 * tedstore.CHECKPOINT_IDLE_SECONDS)              # idle checkpoints were tried
    autocheckpoint = 1000 * daemon.query("PRAGMA page_size")[0][0]
    assert wal_size(daemon.db) > autocheckpoint    # the snapshot kept the WAL from resetting
    assert reader.execute("SELECT count(*) FROM predictions").get == before
    reader.execute("COMMIT")
    reader.close()
    wait_for(lambda: wal_size(daemon.db) == 0, what="the idle checkpoint to truncate the WAL")
    assert daemon.query("SELECT count(*) FROM predictions") == [(40_000,)]


@pytest.mark.slow
def test_the_wal_stays_bounded_under_constant_ingest(daemon):
    """Half an hour of ingest at 100 events/s (180,000 events), sent as fast as it goes:
    the WAL passes the checkpoint threshold dozens of times."""
    peak, done = [0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], wal_size(daemon.db))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    lines = (json.dumps(e).encode() + b"\n"
             for e in tedstore.simulate_events(events=180_000, seed=4, mix="predictions"))
    result = tedstore.stream_lines(daemon.socket, lines)
    done.set()
    watcher.join()
    assert result.acked == 180_000 and not result.rejections
    assert 0 < peak[0] <= tedstore.JOURNAL_SIZE_LIMIT, f"WAL peaked at {peak[0] / 1e6:.1f} MB"


def test_no_commit_waits_for_a_checkpoint(inprocess, file_writes, monkeypatch):
    """SQLite's automatic checkpoint ran inside the commit that crossed 1,000 WAL pages,
    whose acks then waited 5 to 10 ms for it. The checkpointer runs it beside the writer
    instead: while lines stream in, only it writes the database file, and the WAL is
    restarted rather than growing. (The writer's own checkpoint, after a second without
    commits, is put off: on a busy machine this test's sender may pause that long.)"""
    monkeypatch.setattr(tedstore, "CHECKPOINT_IDLE_SECONDS", 3600.0)
    daemon = inprocess(vfs="tedstore-file-writes")
    daemon.daemon.writer.run_task(lambda db: None)          # start-up writes are behind us
    file_writes.by_thread.clear()
    conn = Conn(daemon.socket)
    count = 30_000                                           # about 3,000 WAL pages
    for first in range(0, count, 3000):
        conn.send(*[prediction("k", i, i + 9) for i in range(first, first + 3000)])
    assert conn.wait_ack(count) == []
    writes = dict(file_writes.by_thread)                    # before any idle checkpoint
    conn.close()
    assert set(writes) == {"tedstore-checkpointer"}, writes
    assert daemon.daemon.writer.checkpointer.completed >= 1
    assert wal_size(daemon.settings.db) < 2 * tedstore.CHECKPOINT_PAGES * 4096


def in_database_file(db: str, folder) -> int:
    """The predictions the database file holds without its WAL: what checkpoints copied."""
    copy = folder / "without-wal.db"
    shutil.copyfile(db, copy)
    conn = apsw.Connection(str(copy))
    try:
        if not conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'predictions'").get:
            return 0                                 # even the schema is only in the WAL
        return conn.execute("SELECT count(*) FROM predictions").get
    finally:
        conn.close()


@pytest.mark.parametrize("mode", ["truncate", "PASSIVE", "off"])
def test_the_checkpoint_setting_decides_what_becomes_of_the_wal(daemon_factory, tmp, mode):
    """truncate empties the WAL once idle; passive copies it into the database file and
    leaves the file; off copies nothing, not even past SQLite's automatic threshold or at
    exit, and leaves it all to a replicator."""
    daemon = daemon_factory(env={"TEDSTORE_CHECKPOINT": mode})
    count = 30_000                                   # past SQLite's 1,000-page autocheckpoint
    conn = daemon.connect()
    for first in range(0, count, 3000):
        conn.send(*[prediction("c", i, i + 9) for i in range(first, first + 3000)])
    assert conn.wait_ack(count) == []
    folder = tmp / "copies"
    folder.mkdir()

    def status() -> dict:
        return json.loads(run_cli("status", "--json", "--socket", daemon.socket).stdout)

    if mode == "off":
        wait_for(lambda: idle_for(daemon.socket) > 3 * tedstore.CHECKPOINT_IDLE_SECONDS,
                 what="the daemon to have been idle long enough to checkpoint")
        seen = status()
        assert seen["writer"]["checkpoints"] == 0 and seen["writer"]["last_checkpoint"] is None
        assert in_database_file(daemon.db, folder) == 0
        assert wal_size(daemon.db) > 1000 * daemon.query("PRAGMA page_size")[0][0]
    else:
        seen = wait_for(lambda: (s := status())["writer"]["last_checkpoint"] is not None
                        and s["writer"]["last_checkpoint"] > s["repository"]["last_save"]
                        and s, what="an idle checkpoint after the last commit")
        assert in_database_file(daemon.db, folder) == count
        assert (wal_size(daemon.db) == 0) == (mode == "truncate")
    assert seen["writer"]["checkpoint"] == mode.lower()
    assert daemon.stop() == 0
    assert daemon.query("SELECT count(*) FROM predictions") == [(count,)]
    assert (in_database_file(daemon.db, folder) == count) == (mode != "off")


def test_with_checkpoints_off_a_wal_nobody_checkpoints_is_flagged_then_truncated(
        inprocess, monkeypatch, caplog):
    """With TEDSTORE_CHECKPOINT=off and no replicator running, the WAL only grows: status
    and doctor say so past WAL_WARNING_BYTES, and past REPLICATOR_WAL_LIMIT the idle
    writer truncates it anyway rather than fill the disk."""
    monkeypatch.setattr(tedstore, "WAL_WARNING_BYTES", 1_000_000)
    monkeypatch.setattr(tedstore, "REPLICATOR_WAL_LIMIT", 6_000_000)
    daemon = inprocess(checkpoint="off")
    conn = Conn(daemon.socket)
    sent = 0

    def grow_past(size: int) -> None:
        nonlocal sent
        while wal_size(daemon.db) <= size:
            conn.send(*[prediction("w", i, i + 9) for i in range(sent, sent + 500)])
            sent += 500
            assert conn.wait_ack(sent) == []

    def summary() -> str:
        return tedstore.status_lines(tedstore.request(daemon.socket, "status")["status"],
                                     time.time())[0]

    grow_past(1_000_000)
    assert wal_size(daemon.db) < 6_000_000
    assert summary().endswith("; WAL LARGE: checkpoints are left to a replicator "
                              "(TEDSTORE_CHECKPOINT=off): is it running?")
    verdicts = dict((line, ok) for ok, line in tedstore.diagnose(daemon.settings, time.time())
                    if line.startswith("WAL is"))
    assert list(verdicts.values()) == [False] and "is it running?" in list(verdicts)[0]
    wait_for(lambda: idle_for(daemon.socket) > 3 * tedstore.CHECKPOINT_IDLE_SECONDS,
             what="an idle writer")
    assert wal_size(daemon.db) > 1_000_000                     # below the limit: left alone
    grow_past(6_000_000)
    wait_for(lambda: tedstore.request(daemon.socket, "status")["status"]["writer"]
             ["checkpoints"] == 1, what="the writer to checkpoint the WAL itself")
    assert wal_size(daemon.db) == 0 and "WAL LARGE" not in summary()
    assert "with TEDSTORE_CHECKPOINT=off, so nothing has checkpointed it" in caplog.text
    assert query(daemon.db, "SELECT count(*) FROM predictions") == [(sent,)]
