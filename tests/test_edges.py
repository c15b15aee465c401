"""Error paths a user can hit that the other files do not: signals, import, config, shutdown."""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time

import msgspec
import pytest
from click.testing import CliRunner

import tedstore
from conftest import Conn, clean_env, game_end, prediction, query, run_cli, state_write, wait_for


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
                    game_end("imp", at=40, final=0.1, ts=played + 100)])
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


# -- a daemon that goes away, or says no -----------------------------------------------------

def lines_of(game: str, first: int, n: int) -> bytes:
    return "".join(json.dumps(prediction(game, i, i + 1)) + "\n"
                   for i in range(first, first + n)).encode()


def feed_then_kill(daemon, stdin, game: str) -> None:
    """Feed 1,000 lines, wait until they are stored, kill the daemon, feed 1,000 more."""
    stdin.write(lines_of(game, 0, 1000))
    stdin.flush()
    wait_for(lambda: daemon.query("SELECT count(*) FROM predictions")[0][0] == 1000,
             what="the first thousand lines")
    daemon.kill()
    stdin.write(lines_of(game, 1000, 1000))
    stdin.close()


def one_line_of_how_far(stderr: str) -> tuple[int, int]:
    """(acknowledged, sent) from the one line a command prints when the daemon goes away."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    match = re.search(r"after acknowledging ([\d,]+) of the ([\d,]+) lines sent", lines[0])
    assert match and "send the rest again" in lines[0], lines[0]
    return int(match.group(1).replace(",", "")), int(match.group(2).replace(",", ""))


def test_send_says_how_far_it_got_when_the_daemon_stops(daemon):
    proc = subprocess.Popen([sys.executable, "-m", "tedstore", "send", "--socket", daemon.socket],
                            stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env())
    feed_then_kill(daemon, proc.stdin, "send")
    assert proc.wait(60) == 1
    acknowledged, sent = one_line_of_how_far(proc.stderr.read().decode())
    assert acknowledged <= 1000 <= sent <= 2000


def test_import_says_how_far_it_got_when_the_daemon_stops(daemon, tmp):
    fifo = tmp / "events.ndjson"
    os.mkfifo(fifo)
    proc = subprocess.Popen([sys.executable, "-m", "tedstore", "import", "--db", daemon.db,
                             "--socket", daemon.socket, str(fifo)],
                            stderr=subprocess.PIPE, env=clean_env())
    with open(fifo, "wb") as feed:
        feed_then_kill(daemon, feed, "import")
    assert proc.wait(60) == 1
    acknowledged, sent = one_line_of_how_far(proc.stderr.read().decode())
    assert acknowledged <= 1000 <= sent <= 2000


@pytest.mark.parametrize("attempt", range(5))
def test_a_refused_peer_is_one_line_that_says_why(daemon_factory, tmp, attempt):
    daemon = daemon_factory(env={"TEDSTORE_ALLOW_UIDS": "12345"})
    events = tmp / "e.ndjson"
    events.write_bytes(lines_of("refused", 0, 5000))
    result = run_cli("send", "--socket", daemon.socket, str(events))
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert re.fullmatch(rf"Error: tedstore refused the connection after acknowledging 0 of the "
                        rf"[\d,]+ lines sent: uid {os.getuid()} is not allowed to send to "
                        rf"tedstore \(TEDSTORE_ALLOW_UIDS\)", line), line


# -- backups that cannot be written ------------------------------------------------------------

def test_a_backup_destination_that_cannot_be_written_is_one_line(daemon):
    result = run_cli("backup", "--db", daemon.db, "/sys/tedstore-backup.db")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"Error: cannot write the backup in /sys (Permission denied): check that uid "
        f"{os.getuid()} may write there"]


def test_a_backup_on_a_filesystem_without_hard_links(daemon, tmp, monkeypatch):
    """vfat and some network filesystems refuse link(2) with EPERM: the checked copy is
    renamed into place instead, still never over an existing file. (No such filesystem can
    be mounted here, so link(2) is made to fail as theirs does.)"""
    def no_links(source, target):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    result = CliRunner().invoke(tedstore.cli, ["backup", "--db", daemon.db, str(tmp / "b.db")])
    assert result.exit_code == 0, result.output
    assert query(str(tmp / "b.db"), "PRAGMA integrity_check") == [("ok",)]
    again = CliRunner().invoke(tedstore.cli, ["backup", "--db", daemon.db, str(tmp / "b.db")])
    assert again.exit_code == 1 and "never overwrites" in again.output
    assert not [name for name in os.listdir(tmp) if "partial" in name]


@pytest.mark.slow
def test_an_interrupted_backup_leaves_nothing_that_looks_like_one(tmp):
    """kill -9 during a backup leaves only a hidden partial file; the next backup into
    the same folder removes it."""
    db = str(tmp / "big.db")
    conn = tedstore.open_store(db)
    conn.execute("CREATE TABLE ballast (b BLOB)")
    conn.execute("INSERT INTO ballast VALUES (zeroblob(300 * 1024 * 1024))")
    conn.close()
    folder = tmp / "backups"
    folder.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "tedstore", "backup", "--db", db,
                             str(folder)], env=clean_env(), stderr=subprocess.PIPE)
    wait_for(lambda: os.listdir(folder) or proc.poll() is not None, interval=0.002,
             what="the backup to start writing")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    left = os.listdir(folder)
    assert left and all(name.startswith(".") and ".partial-" in name for name in left), left
    result = run_cli("backup", "--db", db, str(folder))
    assert result.returncode == 0, result.stderr
    [made] = os.listdir(folder)
    assert re.fullmatch(r"tedstore-\d{8}T\d{6}Z\.db", made)


def test_write_commands_never_create_a_database(tmp):
    db = tmp / "mistyped.db"
    log = tmp / "e.ndjson"
    log.write_bytes(lines_of("x", 0, 3))
    for args in (["import", "--db", str(db), "--socket", str(tmp / "none.sock"), str(log)],
                 ["rollup", "--db", str(db)], ["retention", "--db", str(db)]):
        result = run_cli(*args)
        assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, args
        assert "does not exist" in result.stderr and "tedstore init" in result.stderr
        assert os.listdir(tmp) == ["e.ndjson"], args


# -- v3: import and send say what became of each line; import --db means that database ----

def test_import_and_send_count_duplicates_apart_from_stored_lines(daemon, tmp):
    log = tmp / "twice.ndjson"
    write_log(log, [prediction("dup", i, i + 5) for i in range(4)]
              + [state_write("k", 1, ts=time.time() - 60), "{broken"])
    first = run_cli("import", "--db", daemon.db, str(log), env={"TEDSTORE_SOCKET": daemon.socket})
    assert "6 lines into the daemon: 5 stored, 0 duplicates, 1 rejected" in first.stderr
    again = run_cli("send", "--socket", daemon.socket, str(log))
    assert "sent 6 lines: 0 stored, 5 duplicates, 1 rejected" in again.stderr
    offline = tmp / "offline.db"
    assert run_cli("init", "--db", str(offline)).returncode == 0
    for expected in ("5 stored, 0 duplicates", "0 stored, 5 duplicates"):
        result = run_cli("import", "--db", str(offline), "--socket", str(tmp / "no.sock"),
                         str(log))
        assert f"into {offline}: {expected}, 1 rejected" in result.stderr


def test_import_into_a_named_database_never_goes_to_a_daemon_serving_another(daemon_factory,
                                                                             tmp):
    """A daemon answers on the default socket, but --db names another database: the
    lines go into that one, straight, or through its own daemon if one serves it."""
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    other = daemon_factory(folder=elsewhere)
    mine = str(tmp / "mine.db")
    assert run_cli("init", "--db", mine).returncode == 0
    log = tmp / "mine.ndjson"
    write_log(log, [prediction("mine", i, i + 5) for i in range(3)])
    result = run_cli("import", "--db", mine, str(log), env={"TEDSTORE_SOCKET": other.socket})
    assert result.returncode == 0 and f"into {mine}: 3 stored" in result.stderr
    assert query(mine, "SELECT count(*) FROM predictions") == [(3,)]
    assert other.query("SELECT count(*) FROM predictions") == [(0,)]
    served = daemon_factory()                            # tmp/tedstore.db, its own socket
    result = run_cli("import", "--db", served.db, str(log), env={"TEDSTORE_SOCKET": other.socket})
    assert result.returncode == 0 and "into the daemon: 3 stored" in result.stderr
    assert served.query("SELECT count(*) FROM predictions") == [(3,)]
    assert other.query("SELECT count(*) FROM predictions") == [(0,)]


# -- v3: numbers finite and in range, socket paths that fit, signals that never stop it -----

NUMBERS = [name for name, kind in tedstore.SETTING_TYPES.items()
           if isinstance(kind.type, (msgspec.inspect.IntType, msgspec.inspect.FloatType))]


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e308", "-1", "0"])
@pytest.mark.parametrize("name", NUMBERS)
def test_every_number_must_be_finite_and_in_range(monkeypatch, name, value):
    if value == "0" and name in ("cleanup_hour_utc", "max_clock_skew"):
        return                                           # 0 is a fine hour and a fine skew
    monkeypatch.setenv(tedstore.SETTING_ENV[name], value)
    with pytest.raises(tedstore.ConfigError) as refused:
        tedstore.load_settings()
    message = str(refused.value)
    assert f"environment variable {tedstore.SETTING_ENV[name]}" in message and "\n" not in message
    assert f"for {name}" in message and ("from" in message or "at most" in message)


def test_an_infinite_retention_stops_the_daemon_at_start_in_one_line(tmp):
    result = subprocess.run([sys.executable, "-m", "tedstore", "serve"], cwd=tmp,
                            env=clean_env({"GAME_RETENTION_DAYS": "inf"}), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "GAME_RETENTION_DAYS" in result.stderr and "from 1 to 36500" in result.stderr
    assert os.listdir(tmp) == []


def test_a_socket_path_too_long_for_unix_sockets_says_so(tmp):
    long_path = str(tmp / ("s" * 120)) + ".sock"
    for args in (["serve", "--socket", long_path], ["status", "--socket", long_path]):
        result = run_cli(*args, cwd=tmp)
        assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, args
        assert "longer than the 107 a Unix socket path may have" in result.stderr
        assert "--socket" in result.stderr and "None" not in result.stderr


def test_hup_and_usr_signals_never_stop_the_daemon(daemon):
    conn = daemon.connect()
    conn.send(prediction("sig", 1, 2))
    conn.wait_ack(1)
    for signum in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
        daemon.proc.send_signal(signum)
        assert tedstore.request(daemon.socket, "ping") == {"pong": True}
    wait_for(lambda: "SIGUSR2" in daemon.log(), what="the signals to be logged")
    log = daemon.log()
    assert log.count("SIGHUP: nothing to reload") == 2
    assert re.search(r"INFO tedstore \S+ is running \(pid \d+, up", log)   # SIGUSR1
    conn.send(prediction("sig", 2, 3))
    conn.wait_ack(2)
    assert daemon.stop() == 0


def test_a_failing_scheduled_job_is_logged_shown_and_retried(inprocess, monkeypatch):
    """Not a TedstoreError either: the scheduler lives on, says why, and tries again."""
    calls = []

    def broken(scheduler, now):
        calls.append(now)
        raise ZeroDivisionError("a bug in a job")

    monkeypatch.setattr(tedstore.Scheduler, "run_due", broken)
    monkeypatch.setattr(tedstore, "SCHEDULER_FAILURE_PAUSE", 0.05)
    daemon = inprocess()
    wait_for(lambda: len(calls) >= 3, what="the job to be retried")
    status = tedstore.request(daemon.socket, "status")["status"]
    assert status["scheduler"] == {"state": "failing",
                                   "error": "ZeroDivisionError: a bug in a job"}
    assert daemon.daemon.scheduler.is_alive()
    assert "JOBS FAILING: ZeroDivisionError" in tedstore.status_lines(status, time.time())[0]
