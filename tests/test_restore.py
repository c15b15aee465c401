"""Restores that cannot lose data (SPEC section 4, v3): what restore checks is what it
installs, a backup's WAL comes with it, its schema must be tedstore's own, kept copies are
never overwritten, and a restore killed at any moment leaves the old database usable."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import apsw
import pytest

import tedstore
from conftest import Store, clean_env, prediction, query, run_cli, wait_for


def backup_with_a_wal(path, rows: int = 500, in_file: int = 100) -> None:
    """A database whose first `in_file` rows are in its file and the rest only in its
    -wal: a copy of both files taken beside a running daemon (or left by a crash)."""
    source = path.with_name(f"source-{path.name}")
    store = Store(source)
    store.send(*[prediction("wal", tick, tick + 40) for tick in range(in_file)])
    store.conn.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_TRUNCATE)
    store.conn.pragma("wal_autocheckpoint", 0)
    store.send(*[prediction("wal", tick, tick + 40) for tick in range(in_file, rows)])
    shutil.copyfile(source, path)
    shutil.copyfile(f"{source}-wal", f"{path}-wal")
    store.conn.close()
    for name in (source, f"{source}-wal", f"{source}-shm"):
        if os.path.exists(name):
            os.unlink(name)


def test_a_backup_with_a_wal_is_restored_with_every_row_of_it(tmp):
    backup_with_a_wal(tmp / "b.db")
    assert os.path.getsize(tmp / "b.db-wal") > 0
    Store(tmp / "tedstore.db").conn.close()
    done = run_cli("restore", "--db", str(tmp / "tedstore.db"), str(tmp / "b.db"))
    assert done.returncode == 0, done.stderr
    assert not os.path.exists(tmp / "tedstore.db-wal")       # folded in: one file installed
    assert query(str(tmp / "tedstore.db"), "SELECT count(*) FROM predictions") == [(500,)]
    assert query(str(tmp / "b.db"), "SELECT count(*) FROM predictions") == [(500,)]


def test_a_wal_that_does_not_belong_to_the_backup_is_refused(tmp):
    """A -wal SQLite cannot read a frame of is not silently left out: restore says so."""
    backup_with_a_wal(tmp / "b.db")
    backup_with_a_wal(tmp / "other.db")
    with open(tmp / "b.db-wal", "r+b") as wal:          # the right size, someone else's salt
        wal.seek(16)
        wal.write(b"\x12\x34\x56\x78\x9a\xbc\xde\xf0")
    done = run_cli("restore", "--db", str(tmp / "tedstore.db"), str(tmp / "b.db"))
    assert done.returncode == 1 and "holds no WAL frame of this database" in done.stderr
    assert "move it away" in done.stderr and not (tmp / "tedstore.db").exists()
    os.unlink(tmp / "b.db-wal")
    done = run_cli("restore", "--db", str(tmp / "tedstore.db"), str(tmp / "b.db"))
    assert done.returncode == 0 and \
        query(str(tmp / "tedstore.db"), "SELECT count(*) FROM predictions") == [(100,)]


TAMPERING = [
    ("CREATE TRIGGER forget AFTER INSERT ON predictions BEGIN DELETE FROM predictions; END",
     "an extra trigger forget on predictions"),
    ("DROP INDEX predictions_created_at", "the index predictions_created_at is missing"),
    ("DROP VIEW game_summary; CREATE TABLE game_summary (game_id TEXT)",
     "game_summary is a table where tedstore has a view"),
    ("DROP TABLE state; CREATE VIEW state AS SELECT 'k' AS key, '1' AS value, '' AS updated_at",
     "state is a view where tedstore has a table"),
    ("CREATE INDEX mine ON games (final_price)", "an extra index mine on games"),
]


@pytest.mark.parametrize("sql, words", TAMPERING, ids=[w.split()[1] for _, w in TAMPERING])
def test_a_backup_whose_schema_is_not_tedstores_is_refused_naming_what_differs(tmp, sql, words):
    store = Store(tmp / "b.db")
    store.send(prediction("tampered", 1, 2))
    store.conn.execute(sql)
    store.conn.close()
    original = Store(tmp / "tedstore.db")
    original.send(prediction("original", 1, 2))
    original.conn.close()
    done = run_cli("restore", "--db", str(tmp / "tedstore.db"), str(tmp / "b.db"))
    assert done.returncode == 1 and words in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert query(str(tmp / "tedstore.db"), "SELECT game_id FROM predictions") == [("original",)]
    assert not [name for name in os.listdir(tmp) if ".partial-" in name or ".replaced-" in name]


def test_the_daemon_and_doctor_refuse_a_schema_that_is_not_tedstores(tmp, daemon_factory):
    store = Store(tmp / "tedstore.db")
    store.conn.execute(TAMPERING[0][0])
    store.conn.close()
    daemon = daemon_factory(start=False)
    served = subprocess.run([sys.executable, "-m", "tedstore", "serve"], cwd=tmp,
                            env=clean_env({"TEDSTORE_DB": daemon.db,
                                           "TEDSTORE_SOCKET": daemon.socket}),
                            capture_output=True, text=True, timeout=60)
    assert served.returncode == 1 and "an extra trigger forget on predictions" in served.stderr
    assert "Traceback" not in served.stderr and not os.path.exists(daemon.socket)
    doctor = run_cli("doctor", "--db", daemon.db, "--socket", daemon.socket)
    assert doctor.returncode == 1
    assert "FAIL" in doctor.stdout and "an extra trigger forget on predictions" in doctor.stdout


def test_restores_in_the_same_second_keep_every_replaced_database(tmp, monkeypatch):
    Store(tmp / "b.db").conn.close()
    for n in range(3):
        store = Store(tmp / "tedstore.db")
        store.send(prediction(f"generation-{n}", 1, 2))
        store.conn.close()
        tedstore.restore_database(str(tmp / "tedstore.db"), str(tmp / "b.db"), now=1_800_000_000)
    kept = sorted(name for name in os.listdir(tmp) if ".replaced-" in name)
    assert kept == ["tedstore.db.replaced-20270115T080000Z",
                    "tedstore.db.replaced-20270115T080000Z-2",
                    "tedstore.db.replaced-20270115T080000Z-3"]
    assert sorted(query(str(tmp / name), "SELECT game_id FROM predictions")[0][0]
                  for name in kept) == ["generation-0", "generation-1", "generation-2"]


def test_the_replaced_database_is_kept_with_the_rows_only_its_wal_held(tmp):
    """A database left by a crashed daemon, half its rows only in its -wal."""
    backup_with_a_wal(tmp / "tedstore.db", rows=300, in_file=100)
    Store(tmp / "b.db").conn.close()
    tedstore.restore_database(str(tmp / "tedstore.db"), str(tmp / "b.db"), now=1_800_000_000)
    [kept] = [name for name in os.listdir(tmp) if ".replaced-" in name]
    assert query(str(tmp / kept), "SELECT count(*) FROM predictions") == [(300,)]
    assert query(str(tmp / "tedstore.db"), "SELECT count(*) FROM predictions") == [(0,)]


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["copying", "checking", "keeping"])
def test_kill_9_during_a_restore_leaves_the_old_database_usable_and_no_leftovers(tmp, moment):
    """Killed while it copies the backup, while it checks the copy, or once it has kept the
    old database: the old one is in place with all its rows, and the next restore (or
    daemon start) cleans up and succeeds."""
    store = Store(tmp / "b.db")
    store.conn.execute("CREATE TABLE ballast (b BLOB)")
    store.conn.execute("INSERT INTO ballast VALUES (zeroblob(150 * 1024 * 1024))")
    store.conn.execute("DROP TABLE ballast")               # 150 MB of free pages: slow to copy
    store.conn.close()
    original = Store(tmp / "tedstore.db")
    original.send(*[prediction("old", tick, tick + 9) for tick in range(50)])
    original.conn.close()
    proc = subprocess.Popen([sys.executable, "-m", "tedstore", "restore", "--db",
                             str(tmp / "tedstore.db"), str(tmp / "b.db")], env=clean_env(),
                            stderr=subprocess.PIPE)
    partial = f".tedstore.db.partial-{proc.pid}"

    def reached() -> bool:
        names = os.listdir(tmp)
        if moment == "copying":
            return partial in names
        if moment == "checking":
            return f"{partial}-shm" in names or f"{partial}-wal" in names or \
                (partial in names and os.path.getsize(tmp / partial) >= 150 * 1024 * 1024)
        return any(".replaced-" in name for name in names)

    wait_for(lambda: reached() or proc.poll() is not None, interval=0.001,
             what=f"the restore to be {moment}")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert query(str(tmp / "tedstore.db"), "SELECT count(*) FROM predictions") in ([(50,)],
                                                                                    [(0,)])
    assert query(str(tmp / "tedstore.db"), "PRAGMA integrity_check") == [("ok",)]
    done = run_cli("restore", "--db", str(tmp / "tedstore.db"), str(tmp / "b.db"))
    assert done.returncode == 0, done.stderr
    names = os.listdir(tmp)
    assert not [name for name in names if ".partial-" in name], names
    kept = [name for name in names if ".replaced-" in name]
    assert kept and all(query(str(tmp / name), "SELECT count(*) FROM predictions") in
                        ([(50,)], [(0,)]) for name in kept)
    assert any(query(str(tmp / name), "SELECT count(*) FROM predictions") == [(50,)]
               for name in kept + ["tedstore.db"])


def test_restore_puts_a_backup_in_place_and_keeps_what_it_replaced(daemon_factory, tmp):
    daemon = daemon_factory()
    conn = daemon.connect()
    conn.send(*[prediction("keep", i, i + 1) for i in range(100)])
    conn.wait_ack(100)
    assert run_cli("backup", "--db", daemon.db, str(tmp / "b.db")).returncode == 0
    conn.send(*[prediction("later", i, i + 1) for i in range(10)])
    conn.wait_ack(110)
    refused = run_cli("restore", "--db", daemon.db, str(tmp / "b.db"))
    assert refused.returncode == 1 and "is running on" in refused.stderr
    assert "stop it first" in refused.stderr
    assert daemon.stop() == 0
    (tmp / "tedstore.db-wal").write_bytes(b"")           # stale files a crash may leave
    (tmp / "tedstore.db-shm").write_bytes(b"\0" * 32768)
    done = run_cli("restore", "--db", daemon.db, str(tmp / "b.db"))
    assert done.returncode == 0, done.stderr
    assert "integrity ok" in done.stdout and "kept as" in done.stdout
    assert not (tmp / "tedstore.db-wal").exists() and not (tmp / "tedstore.db-shm").exists()
    assert not [p for p in os.listdir(tmp) if ".partial-" in p]
    kept = [p for p in os.listdir(tmp) if p.startswith("tedstore.db.replaced-")
            and not p.endswith(("-wal", "-shm"))]
    assert len(kept) == 1
    assert query(str(tmp / kept[0]), "SELECT count(*) FROM predictions") == [(110,)]
    assert os.stat(tmp / "tedstore.db").st_mode & 0o777 == 0o600
    restored = daemon_factory()
    assert restored.query("SELECT game_id, count(*) FROM predictions GROUP BY 1") == [("keep", 100)]


def test_restore_refuses_what_is_not_a_usable_backup(tmp):
    store = Store(tmp / "tedstore.db")
    store.send(prediction("g", 1, 2))
    store.conn.close()
    (tmp / "garbage.db").write_bytes(b"not a database at all" * 100)
    apsw.Connection(str(tmp / "empty.db")).close()
    cases = [(tmp / "missing.db", "there is no backup at"),
             (tmp / "garbage.db", "is not a usable tedstore backup"),
             (tmp / "empty.db", "is not a usable tedstore backup")]
    for backup, words in cases:
        done = run_cli("restore", "--db", str(tmp / "tedstore.db"), str(backup))
        assert done.returncode == 1 and words in done.stderr, (backup, done.stderr)
        assert "Traceback" not in done.stderr
    assert query(str(tmp / "tedstore.db"), "SELECT count(*) FROM predictions") == [(1,)]
    assert not [p for p in os.listdir(tmp) if "replaced" in p or ".partial-" in p]
