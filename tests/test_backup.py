"""Backups: consistent copies of the live database, never overwritten, private to their
user, the newest kept."""

from __future__ import annotations

import os
import threading


import tedstore
from conftest import HOUR, prediction, query, run_cli, wait_for

# -- backups ----------------------------------------------------------------------------------

def test_backup_while_ingesting_is_consistent_and_never_overwrites(daemon, tmp):
    stop = threading.Event()

    def ingest() -> None:
        with tedstore.Client(daemon.socket) as client:
            for event in tedstore.simulate_events(400, seed=8):
                if stop.is_set():
                    break
                client.send(event)
            client.flush(30)

    feeder = threading.Thread(target=ingest)
    feeder.start()
    wait_for(lambda: daemon.query("SELECT count(*) FROM games WHERE end_tick IS NOT NULL")[0][0] > 5,
             what="some finished games")
    dest = tmp / "copy.db"
    result = run_cli("backup", "--db", daemon.db, str(dest))
    stop.set()
    feeder.join()
    assert result.returncode == 0, result.stderr
    assert "integrity ok" in result.stdout
    assert query(str(dest), "PRAGMA integrity_check") == [("ok",)]
    assert query(str(dest), "PRAGMA journal_mode") == [("delete",)]
    # a consistent snapshot: every prediction of an ended game is resolved in the copy
    assert query(str(dest), "SELECT count(*) FROM predictions p JOIN games g USING (game_id) "
                            "WHERE g.end_tick IS NOT NULL AND p.actual_end_tick IS NULL") == [(0,)]
    assert 0 < query(str(dest), "SELECT count(*) FROM predictions")[0][0] <= \
        daemon.query("SELECT count(*) FROM predictions")[0][0]
    before = dest.read_bytes()
    again = run_cli("backup", "--db", daemon.db, str(dest))
    assert again.returncode == 1 and "never overwrites" in again.stderr
    assert dest.read_bytes() == before
    assert not [p for p in os.listdir(tmp) if "partial" in p]


def test_the_database_its_files_and_backups_are_private_to_their_user(daemon, tmp):
    """Section 3: only the daemon's user opens them (whatever the umask says)."""
    conn = daemon.connect()
    conn.send(prediction("private", 1, 2))
    conn.wait_ack(1)
    backup = tmp / "b.db"
    assert run_cli("backup", "--db", daemon.db, str(backup)).returncode == 0
    assert run_cli("init", "--db", str(tmp / "new.db")).returncode == 0
    files = [daemon.db, daemon.db + "-wal", daemon.db + "-shm", daemon.db + ".lock", backup,
             tmp / "new.db"]
    assert {str(path): oct(os.stat(path).st_mode & 0o777) for path in files} == \
        {str(path): oct(0o600) for path in files}


def test_nightly_backup_keeps_the_newest(tmp):
    settings = tedstore.load_settings(db=str(tmp / "n.db"), backup_dir=str(tmp / "b"),
                                      backup_keep=3)
    tedstore.open_store(settings.db).close()
    made = [tedstore.nightly_backup(settings, HOUR + day * 86400)["path"] for day in range(5)]
    assert sorted(str(p) for p in (tmp / "b").iterdir()) == made[-3:]
