"""Error paths a user can hit that the other files do not: signals, import, config, shutdown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import tedstore
from conftest import Conn, prediction, query, wait_for


def run_cli(*args, input: bytes | None = None):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TEDSTORE_", "PERSISTENCE_"))}
    return subprocess.run([sys.executable, "-m", "tedstore", *args], input=input,
                          capture_output=True, text=True, env=env, timeout=120)


def test_sigint_drains_like_sigterm(daemon):
    conn = daemon.connect()
    conn.send(*[prediction("int", i, i + 1) for i in range(500)])
    conn.wait_ack(500)
    daemon.proc.send_signal(signal.SIGINT)
    assert daemon.proc.wait(30) == 0
    assert "stopped after saving 500 records" in daemon.log()
    assert "Traceback" not in daemon.log()


def write_log(path, lines) -> None:
    path.write_text("".join(json.dumps(line) + "\n" if isinstance(line, dict) else line + "\n"
                            for line in lines))


def test_import_without_a_daemon_goes_straight_into_the_database(tmp):
    played = int(time.time()) - 3600
    log = tmp / "old.ndjson"
    write_log(log, [prediction("imp", 1, 50, ts=played), "{broken",
                    {"event": "gameEnd", "gameId": "imp", "tick": 40, "finalPrice": 0.1,
                     "ts": played + 100}])
    db = str(tmp / "t.db")
    assert run_cli("init", "--db", db).returncode == 0
    result = run_cli("import", "--db", db, "--socket", str(tmp / "none.sock"), str(log))
    assert result.returncode == 1
    assert f"{log}:2: bad_json" in result.stderr and f"into {db}" in result.stderr
    assert query(db, "SELECT raw_error, resolved_at FROM predictions") == \
        [(10, tedstore.utc_text(played + 100))]
    assert query(db, "SELECT line_no, code FROM rejects") == [(2, "bad_json")]
    again = run_cli("import", "--db", db, "--socket", str(tmp / "none.sock"), str(log))
    assert query(db, "SELECT count(*) FROM predictions") == [(1,)]        # replay is idempotent
    assert again.returncode == 1


def test_import_goes_through_a_running_daemon(daemon, tmp):
    log = tmp / "today.ndjson"
    write_log(log, [prediction("via", i, i + 5) for i in range(50)])
    result = run_cli("import", "--db", daemon.db, "--socket", daemon.socket, str(log))
    assert result.returncode == 0, result.stderr
    assert "into the daemon: 50 stored" in result.stderr
    assert daemon.query("SELECT count(*) FROM predictions") == [(50,)]


def test_config_file_problems_are_one_line(tmp):
    broken = tmp / "broken.toml"
    broken.write_text("db = \n")
    result = run_cli("init", "--check", "--config", str(broken))
    assert result.returncode == 1 and "is not valid TOML" in result.stderr
    missing = run_cli("init", "--check", "--config", str(tmp / "absent.toml"))
    assert missing.returncode == 1 and "cannot read config file" in missing.stderr
    good = tmp / "good.toml"
    good.write_text(f'db = "{tmp / "from-toml.db"}"\n')
    assert run_cli("init", "--config", str(good)).returncode == 0
    assert (tmp / "from-toml.db").exists()


def test_backup_into_a_missing_folder(daemon, tmp):
    result = run_cli("backup", "--db", daemon.db, str(tmp / "no" / "such" / "b.db"))
    assert result.returncode == 1 and "does not exist: create it first" in result.stderr


def test_a_shutdown_on_a_full_disk_acks_nothing_and_exits_non_zero(inprocess, monkeypatch,
                                                                   caplog):
    monkeypatch.setattr(tedstore, "STOP_GRACE_SECONDS", 1.0)
    daemon = inprocess(batch_size=100)
    writer = daemon.daemon.writer
    conn = Conn(daemon.socket)
    conn.send(prediction("before", 1, 2))
    conn.wait_ack(1)
    writer.run_task(lambda db: db.pragma("max_page_count", db.pragma("page_count")))
    conn.send(*[prediction("full", i, i + 1) for i in range(2000)])   # several batches
    wait_for(lambda: writer.stats.failing, what="the full disk")
    started = time.monotonic()
    assert daemon.stop() == 1
    assert time.monotonic() - started < 10     # one grace period, not one per queued batch
    assert 0 < writer.stats.unsaved <= 2000            # lines still unread at the drain were never taken
    assert "giving up on" in caplog.text and "not acknowledged" in caplog.text
    with pytest.raises(ConnectionError):         # read every reply until the daemon hangs up
        while True:
            conn.poll(1.0)
    # Nothing after the full disk was acknowledged, not even the few lines that fitted in
    # the pages left and committed after earlier lines were given up: acks are cumulative.
    assert conn.acked == 1
    assert query(daemon.db, "SELECT count(*) FROM predictions WHERE game_id = 'before'") == [(1,)]
