"""export: a table's rows as CSV or JSON lines, events that rebuild the store, flat memory;
import rolls up the hours it touched."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import time

import msgspec
import pytest

import tedstore
from conftest import (Conn, Store, clean_env, game_end, game_start, prediction, price_update,
                      query, run_cli, side_bet, state_write)

NATURAL_ORDER = {"games": "game_id", "predictions": "game_id, predicted_at_tick, model_version",
                 "side_bets": "game_id, placed_at_tick", "tick_samples": "game_id, tick",
                 "state": "key"}
RECEIPT_TIME = {"games": ("id", "updated_at")}       # and every surrogate id


def table(db: str, name: str) -> list[dict]:
    """A table's rows without receipt-time columns or surrogate ids, in natural-key order."""
    rows = [dict(zip(tedstore.COLUMNS[name], row)) for row in
            query(db, f"SELECT {', '.join(tedstore.COLUMNS[name])} FROM {name} "
                      f"ORDER BY {NATURAL_ORDER[name]}")]
    return [{k: v for k, v in row.items() if k not in RECEIPT_TIME.get(name, ("id",))}
            for row in rows]


@pytest.fixture
def filled(tmp) -> Store:
    """Simulated games (ticks with features, patterns, bets), an unfinished game whose peak
    was never sampled, an orphan prediction, state, and a reject."""
    store = Store(tmp / "source.db")
    now = time.time()
    events = list(tedstore.simulate_events(25, seed=12, start=now - 3 * 3600))
    events += [price_update("open", 3, 9.5, ts=now - 60),
               game_start("open", 0, 1.5, ts=now - 50),
               price_update("open", 10, 2.0, ts=now - 40),
               prediction("nobody's", 5, 90, ts=now - 30), side_bet("nobody's", 5, ts=now - 30),
               state_write("tracker.model", {"w": [1.5, None, "x"]}, ts=now - 20)]
    assert store.send(*events) == []
    store.send(b"\xff not utf-8")
    return store


def test_events_replayed_by_import_rebuild_the_same_rows(filled, tmp):
    exported = tmp / "events.ndjson"
    result = run_cli("export", "--db", filled.path, "--events", "-o", str(exported))
    assert result.returncode == 0, result.stderr
    assert not [p for p in tmp.iterdir() if "partial" in p.name]
    target = str(tmp / "target.db")
    assert run_cli("init", "--db", target).returncode == 0
    replayed = run_cli("import", "--db", target, "--socket", str(tmp / "none.sock"), str(exported))
    assert replayed.returncode == 0, replayed.stderr
    for name in NATURAL_ORDER:
        assert table(target, name) == table(filled.path, name), name
    kinds = {json.loads(line)["event"] for line in exported.read_text().splitlines()}
    assert kinds == {"gameStart", "priceUpdate", "prediction", "sideBet", "gameEnd", "state"}


def test_a_game_end_carries_what_rebuilds_the_game(filled, tmp):
    conn = tedstore.connect(filled.path, readonly=True)
    events = [msgspec.json.decode(msgspec.json.encode(e))
              for e in tedstore.export_events(conn, "", "~")]
    conn.close()
    ends = [e for e in events if e["event"] == "gameEnd"]
    assert len(ends) == 25
    assert all({"startTick", "peakPrice", "peakTick", "treasuryRemainder", "ts"} <= set(e)
               for e in ends)
    samples = query(filled.path, "SELECT count(*) FROM tick_samples")[0][0]
    unsampled_peak = 1                                   # the open game's peak at tick 3
    assert sum(e["event"] == "priceUpdate" for e in events) == samples + unsampled_peak


def test_a_table_as_csv_and_as_json_lines(filled, tmp):
    as_csv = run_cli("export", "--db", filled.path, "--table", "predictions")
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    stored = query(filled.path, "SELECT game_id, raw_error, created_at FROM predictions ORDER BY "
                                "created_at, rowid")
    assert [(r["game_id"], r["raw_error"], r["created_at"]) for r in rows] == \
        [(g, "" if e is None else str(e), c) for g, e, c in stored]
    assert list(rows[0]) == list(tedstore.COLUMNS["predictions"])
    as_jsonl = run_cli("export", "--db", filled.path, "--table", "rejects", "--format", "jsonl")
    [reject] = [json.loads(line) for line in as_jsonl.stdout.splitlines()]
    assert reject["code"] == "bad_utf8" and reject["raw"] == "\ufffd not utf-8"
    since = query(filled.path, "SELECT created_at FROM predictions ORDER BY created_at "
                               "LIMIT 1 OFFSET 100")[0][0]
    windowed = run_cli("export", "--db", filled.path, "--table", "predictions", "--since", since,
                       "--format", "jsonl")
    assert len(windowed.stdout.splitlines()) == len(stored) - 100


@pytest.mark.parametrize("args, words", [
    (["--table", "predictions", "--events"], "give --table NAME or --events"),
    ([], "give --table NAME or --events"),
    (["--events", "--format", "csv"], "events are NDJSON"),
    (["--table", "nothing"], "Invalid value for '--table'"),
])
def test_export_usage_errors(filled, args, words):
    result = run_cli("export", "--db", filled.path, *args)
    assert result.returncode == 2 and words in result.stderr


PEAK_MEMORY = """
import resource, sys, tedstore
sys.argv[0] = "tedstore"
try:
    tedstore.main()
finally:
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


@pytest.mark.slow
def test_export_streams_with_flat_memory(tmp):
    """Exporting 400,000 rows takes the memory that exporting 4,000 takes."""
    db = str(tmp / "big.db")
    conn = tedstore.open_store(db)
    older, newer = tedstore.utc_text(time.time() - 7200), tedstore.utc_text(time.time())
    with tedstore.transaction(conn):
        conn.executemany("INSERT INTO tick_samples (game_id, tick, price, rsi, ts, created_at) "
                         "VALUES (?, ?, 1.25, 50.5, ?, ?)",
                         ((f"big-{n // 1000}", n % 1000, stamp, stamp)
                          for n in range(400_000) for stamp in [older if n < 4_000 else newer]))
    conn.close()
    export = ["export", "--db", db, "--table", "tick_samples", "--format", "jsonl"]
    small = peak_kib([*export, "--until", newer, "-o", str(tmp / "small.jsonl")])
    large = peak_kib([*export, "-o", str(tmp / "large.jsonl")])
    assert len((tmp / "small.jsonl").read_text().splitlines()) == 4_000
    assert (tmp / "large.jsonl").stat().st_size > 30_000_000
    assert large - small < 20_000, (small, large)          # KiB


def peak_kib(args: list[str]) -> int:
    """The peak resident memory of `tedstore ARGS`, in KiB."""
    result = subprocess.run([sys.executable, "-c", PEAK_MEMORY, *args], capture_output=True,
                            text=True, env=clean_env(), timeout=300)
    assert result.returncode == 0, result.stderr
    return int(result.stderr.strip().splitlines()[-1])


# -- import rolls up the hours it touched --------------------------------------------------------

def test_an_import_into_the_file_rolls_up_the_hours_it_touched(tmp):
    hour = tedstore.hour_floor(time.time()) - 5 * 3600
    log = tmp / "late.ndjson"
    log.write_text("".join(json.dumps(e) + "\n" for e in [
        prediction("late", 10, 50, ts=hour + 600),
        game_end("late", at=60, final=0.1, ts=hour + 900)]))
    db = str(tmp / "t.db")
    assert run_cli("init", "--db", db).returncode == 0
    assert run_cli("import", "--db", db, "--socket", str(tmp / "none.sock"), str(log)).returncode == 0
    assert query(db, "SELECT predictions_made, games_analyzed FROM metrics_hourly "
                     "WHERE hour_start = ?", (tedstore.utc_text(hour),)) == [(1, 1)]


def test_the_daemon_rolls_up_again_the_hours_that_late_events_changed(inprocess):
    daemon = inprocess()
    hour = tedstore.hour_floor(time.time()) - 5 * 3600
    scheduler = daemon.daemon.scheduler
    scheduler.stop()                                       # the test drives the clock
    scheduler.join(10)
    scheduler = tedstore.Scheduler(daemon.settings, daemon.daemon.writer)
    scheduler.run_due(time.time())
    rolled = "SELECT predictions_made FROM metrics_hourly WHERE hour_start = ?"
    assert query(daemon.db, rolled, (tedstore.utc_text(hour),)) == []      # nothing there yet
    by = ("SELECT tracker, model_version, predictions_made FROM metrics_hourly_by "
          "WHERE hour_start = ? ORDER BY 1, 2")
    conn = Conn(daemon.socket)
    conn.send(prediction("late", 10, 50, ts=hour + 600), prediction("late", 20, 50, ts=hour + 700))
    conn.wait_ack(2)
    scheduler.run_due(time.time())
    assert query(daemon.db, rolled, (tedstore.utc_text(hour),)) == [(2,)]
    assert query(daemon.db, by, (tedstore.utc_text(hour),)) == [
        ("*", "v2.1.0", 2), ("default", "*", 2), ("default", "v2.1.0", 2)]
    conn.send(prediction("late", 10, 60, ts=hour + 800, tracker="shadow", model_version="v3"))
    conn.wait_ack(3)
    scheduler.run_due(time.time())                          # each tracker's rows, again
    assert query(daemon.db, rolled, (tedstore.utc_text(hour),)) == [(3,)]
    assert query(daemon.db, by, (tedstore.utc_text(hour),)) == [
        ("*", "v2.1.0", 2), ("*", "v3", 1), ("default", "*", 2), ("default", "v2.1.0", 2),
        ("shadow", "*", 1), ("shadow", "v3", 1)]


def test_output_cut_short_by_head_ends_quietly(filled):
    """`tedstore export ... | head` is what people type: once the reader has gone, the
    command stops, says nothing, and exits as a command killed by SIGPIPE does."""
    proc = subprocess.Popen([sys.executable, "-m", "tedstore", "export", "--db", filled.path,
                             "--events"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=clean_env())
    first = proc.stdout.readline()
    proc.stdout.close()                                 # more than a pipe's 64 KiB remains
    _, err = proc.communicate(timeout=60)
    assert json.loads(first)["event"]
    assert err == b"" and proc.returncode == 141
    everything = run_cli("export", "--db", filled.path, "--events")
    assert len(everything.stdout.encode()) > 2 * 65536
