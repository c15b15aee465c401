"""status (for people, as JSON, for Prometheus), init and doctor."""

from __future__ import annotations

import json
import os
import re
import time

import pytest

import tedstore
from conftest import game_start, prediction, price_update, run_cli, side_bet, state_write, wait_for


def test_status_for_people_starts_with_a_summary_and_speaks_in_units(daemon):
    conn = daemon.connect()
    events = list(tedstore.simulate_events(2, seed=3))
    conn.send(*events, b"{not json")
    assert [r["code"] for r in conn.wait_ack(len(events) + 1)] == ["bad_json"]
    done = run_cli("status", "--socket", daemon.socket)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert re.fullmatch(r"tedstore \S+ is running \(pid \d+, up \d+ (s|min|h|d)\): [\d,]+ "
                        r"events in the last \d+ (s|min), last commit \d+ (s|min) ago, "
                        r"queue \d+, WAL [\d.]+ MB", lines[0]), lines[0]
    text = "\n".join(lines)
    for literal in ("True", "False", "None", "{", "[", "'", "_bytes", "uptime_s"):
        assert literal not in text, f"{literal!r} in the status for people:\n{text}"
    assert re.search(r"^commits: +avg [\d.]+ ms, p50 [\d.]+ ms, p99 [\d.]+ ms", text, re.M)
    assert re.search(r"^rejects: +bad_json 1$", text, re.M)
    assert re.search(rf"^events: .*prediction {sum(e['event'] == 'prediction' for e in events)}",
                     text, re.M)
    assert re.search(r"^database: .*, [\d.]+ MB, WAL [\d.]+ MB, schema \d+$", text, re.M)
    machine = json.loads(run_cli("status", "--json", "--socket", daemon.socket).stdout)
    assert machine["rejects"] == {"bad_json": 1} and machine["running"] is True
    # A rate only over what it has measured: not a minute's worth from seconds of uptime.
    assert machine["recent"]["events"] == len(events)
    assert 0 <= machine["recent"]["seconds"] <= min(machine["uptime_s"] + 0.1,
                                                    tedstore.RATE_WINDOW_SECONDS)
    assert machine["repository"]["records_saved"] > 0 and machine["database"]["size_bytes"] > 0


METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
SAMPLE = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{((?:[a-zA-Z_]\w*="(?:[^"\\\n]|\\[\\"n])*",?)*)\})? '
                    r'(\S+)')


def parse_prometheus(text: str) -> dict[tuple, float]:
    """Samples by (name, labels), checked against the text format's rules: names, one HELP
    and one TYPE per family before its samples, label values escaped, numbers floats."""
    samples, typed, helped = {}, {}, set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ")[2]
            assert METRIC_NAME.fullmatch(name) and name not in helped, line
            helped.add(name)
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name not in typed and kind in ("counter", "gauge"), line
            typed[name] = kind
        else:
            match = SAMPLE.fullmatch(line)
            assert match, f"not a sample line: {line!r}"
            name, labels, value = match.groups()
            assert name in typed and name in helped, f"{name} has no TYPE or HELP before it"
            assert not typed[name] == "counter" or name.endswith("_total"), name
            pairs = tuple(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels or ""))
            samples[(name, pairs)] = float(value)
    return samples


def test_status_for_prometheus_follows_the_text_format(daemon, tmp):
    conn = daemon.connect()
    conn.send(prediction("p", 1, 2), prediction("p", 1, 2), b"{oops")
    conn.wait_ack(3)
    done = run_cli("status", "--format", "prometheus", "--socket", daemon.socket)
    assert done.returncode == 0, done.stderr
    samples = parse_prometheus(done.stdout)
    assert samples[("tedstore_up", ())] == 1
    assert samples[("tedstore_events_total", (("type", "prediction"),))] == 1
    assert samples[("tedstore_duplicates_total", (("type", "prediction"),))] == 1
    assert samples[("tedstore_rejects_total", (("code", "bad_json"),))] == 1
    assert samples[("tedstore_database_bytes", ())] > 0
    assert samples[("tedstore_last_timestamp_seconds", (("job", "commit"),))] == \
        pytest.approx(time.time(), abs=120)
    assert samples[("tedstore_writer_failing", ())] == 0
    assert daemon.stop() == 0
    down = run_cli("status", "--format", "prometheus", "--socket", daemon.socket,
                   "--db", daemon.db)
    assert down.returncode == 0 and parse_prometheus(down.stdout) == {("tedstore_up", ()): 0}


def test_prometheus_label_values_are_escaped():
    status = json.loads(json.dumps({
        "version": 'v"1\\2\n', "uptime_s": 1.5, "events": {'we"ird\\type\n': 3},
        "duplicates": {}, "rejects": {}, "repository": {"records_saved": 3, "errors": 0,
                                                        "last_save": None},
        "writer": {"batches": 1, "state": "ok", "checkpoint": "off", "checkpoints": 0,
                   "last_checkpoint": None},
        "commit_latency_ms": {"p50": None, "p99": None},
        "queue": {"events": 0, "bytes": 0, "full": False},
        "connections": {"open": 0, "total": 0}, "database": {"size_bytes": 1, "wal_bytes": 0},
        "last_rollup": None, "last_retention": None, "last_backup": None}))
    text = "\n".join(tedstore.prometheus_lines(status))
    samples = parse_prometheus(text)
    assert samples[("tedstore_events_total", (("type", 'we\\"ird\\\\type\\n'),))] == 3
    assert ("tedstore_info", (("version", 'v\\"1\\\\2\\n'), ("checkpoint", "off"))) in samples


# -- status, init, doctor --------------------------------------------------------------------------

def test_status_reports_every_field(daemon):
    conn = daemon.connect()
    conn.send(prediction("s", 1, 2), b"nope")
    conn.wait_ack(2)
    status = wait_for(lambda: (answer := tedstore.request(daemon.socket, "status")["status"])
                      ["last_retention"] and answer, what="the start-up retention run")
    assert status["enabled"] is True and status["version"] == tedstore.__version__
    assert set(status["repository"]) == {"enabled", "last_save", "records_saved", "errors"}
    assert status["repository"]["records_saved"] == 1
    assert set(status["manager"]) == {"enabled", "running", "persist_interval"}
    assert status["manager"]["running"] is True and status["manager"]["persist_interval"] == 0.05
    assert status["queue"]["events"] == 0 and status["connections"]["open"] >= 1
    assert status["events"]["prediction"] == 1 and status["rejects"] == {"bad_json": 1}
    assert status["commit_latency_ms"]["p99"] is not None
    assert {"last_rollup", "last_retention", "last_backup"} <= set(status)
    assert status["last_retention"]["deleted"]["predictions"] == 0
    assert status["database"]["size_bytes"] > 0 and "wal_bytes" in status["database"]
    assert status["database"]["schema_version"] == tedstore.schema_version()
    result = run_cli("status", "--socket", daemon.socket, "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["running"] is True
    human = run_cli("status", "--socket", daemon.socket)
    assert "is running" in human.stdout and "1 rows saved" in human.stdout


def test_status_when_the_daemon_is_down(daemon_factory):
    daemon = daemon_factory()
    wait_for(lambda: tedstore.request(daemon.socket, "status")["status"]["last_retention"],
             what="the start-up retention run")
    daemon.stop()
    result = run_cli("status", "--socket", daemon.socket, "--db", daemon.db)
    assert result.returncode == 1
    assert "not running" in result.stdout
    assert re.search(rf"^database: +{re.escape(daemon.db)}, [\d.]+ MB, WAL (-|[\d.]+ MB), "
                     rf"schema {tedstore.schema_version()}$", result.stdout, re.M), result.stdout
    assert re.search(r"^retention: +\d+ (s|min) ago", result.stdout, re.M)   # the database knows
    for literal in ("{", "_bytes", "None"):
        assert literal not in result.stdout, result.stdout
    offline = json.loads(run_cli("status", "--socket", daemon.socket, "--db", daemon.db,
                             "--json").stdout)
    assert offline["running"] is False and offline["jobs"]["retention"]["at"]


def test_status_and_doctor_tell_a_lost_socket_from_a_stopped_daemon(daemon_factory):
    daemon = daemon_factory()
    os.unlink(daemon.socket)
    args = ("--db", daemon.db, "--socket", daemon.socket)
    lost = run_cli("status", *args, "--json")
    assert lost.returncode == 1
    answer = json.loads(lost.stdout)
    assert (answer["running"], answer["answering"], answer["pid"]) == \
        (True, False, str(daemon.proc.pid))
    assert answer["error"] == (f"tedstore (pid {daemon.proc.pid}) is running on {daemon.db}, "
                               f"but its socket {daemon.socket} is gone: restart tedstore to "
                               f"listen again")
    doctor = run_cli("doctor", *args)
    assert doctor.returncode == 1 and f"FAIL {answer['error']}" in doctor.stdout
    assert daemon.stop() == 0
    stopped = json.loads(run_cli("status", *args, "--json").stdout)
    assert (stopped["running"], stopped["pid"]) == (False, None)
    assert stopped["error"].startswith(f"tedstore is not running: cannot reach tedstore at "
                                       f"{daemon.socket}")


def test_status_counts_rows_that_changed_and_duplicates_apart(daemon):
    conn = daemon.connect()
    events = [prediction("c", 1, 9), side_bet("c", 1),
              game_start("c", 0, 1.0),
              price_update("c", 10, 2.0),
              state_write("k", 1)]
    conn.send(*events)
    conn.wait_ack(5)
    conn.send(*events)                                     # all five again
    conn.wait_ack(10)
    status = tedstore.request(daemon.socket, "status")["status"]
    # the resent state write is newer, so it wins and changes its row; the rest change nothing
    assert status["events"] == {"prediction": 1, "sideBet": 1, "gameStart": 1,
                                "priceUpdate": 1, "state": 2}
    assert status["duplicates"] == {"prediction": 1, "sideBet": 1, "gameStart": 1,
                                    "priceUpdate": 1}
    rows = sum(daemon.query(f"SELECT count(*) FROM {table}")[0][0]
               for table in ("predictions", "side_bets", "tick_samples", "state", "games"))
    assert status["repository"]["records_saved"] == rows + 1 == 6


def test_init_creates_checks_and_upgrades(tmp):
    db = str(tmp / "i.db")
    missing = run_cli("init", "--check", "--db", db)
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    assert not os.path.exists(db)
    assert run_cli("init", "--db", db).returncode == 0
    assert run_cli("init", "--check", "--db", db).returncode == 0
    old = str(tmp / "old.db")
    import sqlite3
    from pathlib import Path
    legacy = sqlite3.connect(old)
    legacy.executescript((Path(__file__).parent / "fixtures" / "schema_v1.sql").read_text())
    legacy.close()
    stale = run_cli("init", "--check", "--db", old)
    assert stale.returncode == 1 and "schema version 1" in stale.stderr
    upgraded = run_cli("init", "--db", old)
    assert upgraded.returncode == 0 and "upgraded from 1" in upgraded.stdout
    garbage = tmp / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    broken = run_cli("init", "--check", "--db", str(garbage))
    assert broken.returncode == 1 and "cannot be read" in broken.stderr
    assert "Traceback" not in broken.stderr


def test_doctor_passes_on_a_healthy_deployment_and_names_what_to_fix(daemon, tmp):
    healthy = run_cli("doctor", "--db", daemon.db, "--socket", daemon.socket)
    assert healthy.returncode == 0, healthy.stdout
    assert all(line.startswith("ok") for line in healthy.stdout.splitlines())
    assert "daemon answers" in healthy.stdout and "GB free" in healthy.stdout
    down = run_cli("doctor", "--db", daemon.db, "--socket", str(tmp / "elsewhere.sock"))
    assert down.returncode == 1 and f"FAIL tedstore (pid {daemon.proc.pid}) serves {daemon.db} on " \
        f"{daemon.socket}, not on {tmp / 'elsewhere.sock'}" in down.stdout
    nowhere = run_cli("doctor", "--db", str(tmp / "no" / "t.db"), "--socket", daemon.socket)
    assert nowhere.returncode == 1 and "is missing" in nowhere.stdout
