"""Disk full and I/O errors: nothing unacknowledged is lost, and the daemon recovers by
itself."""

from __future__ import annotations

import os
import threading

import apsw
import pytest

import tedstore
from conftest import Conn, WatchedVFS, prediction, query, wait_for

# -- disk full and I/O errors --------------------------------------------------------------------

def test_disk_full_acks_nothing_uncommitted_and_recovers_by_itself(inprocess, caplog):
    daemon = inprocess()
    writer = daemon.daemon.writer
    writer.run_task(lambda db: db.pragma("max_page_count", db.pragma("page_count") + 30))
    conn = Conn(daemon.socket)
    lines = [prediction("full", i, i + 3) for i in range(20_000)]
    sender = threading.Thread(target=lambda: [conn.send(*lines[i:i + 1000])
                                              for i in range(0, len(lines), 1000)])
    sender.start()
    wait_for(lambda: writer.stats.failing, what="the disk to fill up")

    def acks_cover_exactly_what_committed() -> bool:
        conn.poll(0.05)
        acked = conn.acked                                # read before the rows: never more
        stored = {row[0] for row in query(daemon.db, "SELECT predicted_at_tick FROM predictions")}
        assert set(range(acked)) <= stored, "acknowledged a line that did not commit"
        return len(stored) == acked

    wait_for(acks_cover_exactly_what_committed, what="the acks of every committed line")
    status = tedstore.request(daemon.socket, "status")["status"]
    assert status["writer"]["state"] == "failing" and "full" in status["writer"]["error"]
    assert status["repository"]["errors"] > 0
    assert "cannot commit" in caplog.text
    writer.run_task(lambda db: db.pragma("max_page_count", 1 << 30))  # space comes back
    sender.join()
    assert conn.wait_ack(len(lines)) == []
    assert query(daemon.db, "SELECT count(*) FROM predictions") == [(len(lines),)]
    assert query(daemon.db, "PRAGMA integrity_check") == [("ok",)]
    assert "commits work again" in caplog.text
    assert tedstore.request(daemon.socket, "status")["status"]["writer"]["state"] == "ok"


FAULT_VFS = "tedstore-fault"


class FaultVFS(WatchedVFS):
    """The N-th write (or sync) of the database or its WAL fails, once or from then on."""

    def __init__(self) -> None:
        super().__init__(FAULT_VFS)
        self.operations = 0
        self.fail_at: int | None = None
        self.persistent = False
        self.kind = "write"
        self.failures = 0

    def on_write(self) -> None:
        self.strike("write")

    def on_sync(self) -> None:
        self.strike("sync")

    def strike(self, kind: str) -> None:
        if kind != self.kind or self.fail_at is None:
            return
        self.operations += 1
        if self.operations == self.fail_at or (self.persistent and self.operations > self.fail_at):
            self.failures += 1
            code = apsw.SQLITE_IOERR_WRITE if kind == "write" else apsw.SQLITE_IOERR_FSYNC
            raise apsw.exception_for(code)

    def arm(self, kind: str, n: int, persistent: bool) -> None:
        self.kind, self.operations, self.fail_at = kind, 0, n
        self.persistent, self.failures = persistent, 0

    def disarm(self) -> None:
        self.fail_at = None


@pytest.fixture(scope="module")
def fault_vfs():
    vfs = FaultVFS()
    yield vfs
    vfs.unregister()


LINES = 100                    # in four commits: each write and sync of them is failed in turn


def run_with_fault(tmp, vfs: FaultVFS, kind: str, n: int, persistent: bool) -> bool:
    """One run on a fresh database with the fault armed; True if the fault fired."""
    for name in os.listdir(tmp):
        os.unlink(tmp / name)
    settings = tedstore.load_settings(db=str(tmp / "tedstore.db"), socket=str(tmp / "tedstore.sock"),
                                      synchronous="FULL", batch_size=LINES // 4)
    daemon = tedstore.Daemon(settings, vfs=FAULT_VFS)
    runner = threading.Thread(target=daemon.run)
    runner.start()
    try:
        wait_for(daemon.ready.is_set, what="the daemon")
        daemon.writer.run_task(lambda db: None)               # start-up writes are behind us
        vfs.arm(kind, n, persistent)
        conn = Conn(settings.socket)
        conn.send(*[prediction("io", i, i + 1) for i in range(LINES)])
        wait_for(lambda: conn.poll(0.01) is not None and (vfs.failures or conn.acked == LINES),
                 what="the fault or the last ack")
        if persistent and vfs.failures:
            # The fault may strike a commit of lines (then they wait, unacknowledged), or
            # an idle checkpoint after the last of them was acknowledged.
            wait_for(lambda: daemon.writer.stats.failing
                     or (conn.poll(0.01) is not None and conn.acked == LINES),
                     what="the writer to notice, or every line acknowledged before the fault")
            if daemon.writer.stats.failing:
                conn.poll(0.03)                       # any ack that (wrongly) follows
                stored = {row[0] for row in
                          query(settings.db, "SELECT predicted_at_tick FROM predictions")}
                assert set(range(conn.acked)) <= stored, "acknowledged a batch whose COMMIT failed"
                assert conn.acked < LINES
        vfs.disarm()
        assert conn.wait_ack(LINES) == []
        assert query(settings.db, "SELECT count(*) FROM predictions") == [(LINES,)]
        assert query(settings.db, "PRAGMA integrity_check") == [("ok",)]
        assert daemon.writer.stats.failing is None                  # resumed without a restart
        conn.close()
        return vfs.failures > 0
    finally:
        vfs.disarm()
        daemon.request_stop()
        runner.join(30)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["write", "sync"])
@pytest.mark.parametrize("persistent", [False, True], ids=["one-shot", "persistent"])
def test_io_faults_at_every_write_and_sync(tmp, fault_vfs, kind, persistent):
    """Fail the N-th write (or sync), N = 1, 2, 3, ... until a run completes untouched."""
    n = 1
    while run_with_fault(tmp, fault_vfs, kind, n, persistent):
        n += 1
        assert n < 400, "the fault never stopped firing"
    assert n > 3, f"only {n - 1} {kind}s were tested"
