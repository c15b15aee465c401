"""Operations: hourly rollups, retention, WAL upkeep, backups, status, init, doctor, faults."""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import threading
import time

import apsw
import msgspec
import pytest

import tedstore
from conftest import (LONG_RETENTION, Conn, Store, WatchedVFS, idle_for, prediction, query,
                      run_cli, side_bet, wait_for)

HOUR = tedstore.text_epoch("2026-11-20 10:00:00.000")


def at(hour: float, minute: float) -> float:
    """Unix seconds at `minute` past the hour, as a ts in milliseconds."""
    return (hour + minute * 60) * 1000


def rollup_row(store: Store, hour: float) -> dict:
    return store.one("SELECT * FROM metrics_hourly WHERE hour_start = ?", (tedstore.utc_text(hour),))


def local_write(conn: apsw.Connection):
    return lambda fn: fn(conn)


# -- hourly rollup ---------------------------------------------------------------------------

def hour_of_play(store: Store) -> dict:
    """Two games in HOUR, with predictions and side bets whose outcomes are known."""
    events = [
        {"event": "gameStart", "gameId": "a", "tick": 0, "price": 1.0, "ts": at(HOUR, 1)},
        prediction("a", 10, 110, ts=at(HOUR, 2)),      # error +10
        prediction("a", 20, 40, ts=at(HOUR, 3)),       # error -60
        prediction("a", 30, 230, ts=at(HOUR, 4)),      # error +130
        side_bet("a", 80, ts=at(HOUR, 5)),             # 80..120: WON, ev 0.2
        side_bet("a", 10, expected_value=-0.3, ts=at(HOUR, 5)),   # BET, LOST
        side_bet("a", 30, "SKIP", expected_value=0.4, ts=at(HOUR, 5)),  # SKIP, LOST
        {"event": "gameEnd", "gameId": "a", "tick": 100, "finalPrice": 0.1, "ts": at(HOUR, 20)},
        {"event": "gameStart", "gameId": "b", "tick": 0, "price": 1.0, "ts": at(HOUR, 30)},
        prediction("b", 5, 50, ts=at(HOUR, 31)),       # error -150
        side_bet("b", 190, ts=at(HOUR, 31)),           # 190..230: WON
        {"event": "gameEnd", "gameId": "b", "tick": 200, "finalPrice": 0.1, "ts": at(HOUR, 59)},
        # created in the hour but never resolved: counted as made, not measured
        prediction("c", 1, 90, ts=at(HOUR, 40)),
        side_bet("c", 1, ts=at(HOUR, 40)),
        # the next hour
        prediction("b", 6, 51, ts=at(HOUR, 61)),
    ]
    assert store.send(*events) == []
    store.conn.execute("INSERT INTO rejects (received_at, line_no, code, error) VALUES "
                       "(?, 1, 'bad_json', 'x'), (?, 2, 'bad_json', 'x'), (?, 3, 'bad_json', 'x')",
                       (tedstore.utc_text(HOUR + 60), tedstore.utc_text(HOUR + 3599),
                        tedstore.utc_text(HOUR + 3600)))
    return {"errors": [10, -60, 130, -150]}


def test_rollup_computes_every_column_as_the_spec_defines(store):
    errors = hour_of_play(store)["errors"]
    latency = tedstore.LatencyHistogram()
    for ms in (1.0, 2.0, 3.0, 50.0):
        latency.record(ms)
    now = HOUR + 7200
    tedstore.run_rollups(store.conn, local_write(store.conn), [int(HOUR)], now,
                         latency_for=lambda hour: latency if hour == HOUR else None)
    row = rollup_row(store, HOUR)
    assert row["hour_end"] == "2026-11-20 11:00:00.000"
    assert row["games_analyzed"] == 2
    assert row["predictions_made"] == 5
    assert row["median_e40"] == statistics.median(e / 40 for e in errors) == -0.625
    assert row["mean_absolute_error"] == statistics.mean(abs(e) for e in errors) == 87.5
    assert row["within_1_window"] == 25.0       # |10|
    assert row["within_2_windows"] == 50.0      # |10|, |-60|
    assert row["within_3_windows"] == 50.0      # 130 and 150 are beyond 120
    assert row["sidebets_recommended"] == 3     # resolved BETs
    assert row["sidebets_positive_ev"] == 3     # resolved, ev > 0: two BETs and the SKIP
    assert (row["bets_won"], row["bets_lost"]) == (2, 1)
    assert row["total_ev"] == pytest.approx(0.2 - 0.3 + 0.2)
    assert row["roi_percentage"] == pytest.approx(100 * (5 + 5 - 1) / 3)
    assert row["avg_commit_latency_ms"] == latency.mean
    assert row["p99_commit_latency_ms"] == latency.quantile(0.99) >= 50
    assert row["rejected_lines"] == 2
    assert row["created_at"] == tedstore.utc_text(now)


def test_an_hour_with_nothing_to_measure_has_null_ratios(store):
    tedstore.run_rollups(store.conn, local_write(store.conn), [int(HOUR)], HOUR + 7200)
    row = rollup_row(store, HOUR)
    assert (row["games_analyzed"], row["predictions_made"], row["bets_won"]) == (0, 0, 0)
    for column in ("median_e40", "mean_absolute_error", "within_1_window", "within_2_windows",
                   "within_3_windows", "roi_percentage", "avg_commit_latency_ms",
                   "p99_commit_latency_ms"):
        assert row[column] is None, column


def test_rollup_is_idempotent_and_keeps_measured_latency(store):
    hour_of_play(store)
    latency = tedstore.LatencyHistogram()
    latency.record(7.0)
    write = local_write(store.conn)
    tedstore.run_rollups(store.conn, write, [int(HOUR)], HOUR + 7200, lambda h: latency)
    first = rollup_row(store, HOUR)
    tedstore.run_rollups(store.conn, write, [int(HOUR)], HOUR + 7200)   # e.g. tedstore rollup
    again = rollup_row(store, HOUR)
    assert again == first
    assert store.rows("SELECT count(*) FROM metrics_hourly") == [(1,)]
    store.send(prediction("b", 7, 200, ts=at(HOUR, 45)))               # a late arrival
    tedstore.run_rollups(store.conn, write, [int(HOUR)], HOUR + 7200)
    assert rollup_row(store, HOUR)["predictions_made"] == first["predictions_made"] + 1
    assert rollup_row(store, HOUR)["avg_commit_latency_ms"] == 7.0


def test_a_long_catch_up_takes_the_write_lock_a_day_at_a_time(store):
    """A catch-up yields to ingest: each write transaction saves one day of hours at most."""
    saves = []

    def write(fn):
        before = store.rows("SELECT count(*) FROM metrics_hourly")[0][0]
        fn(store.conn)
        saves.append(store.rows("SELECT count(*) FROM metrics_hourly")[0][0] - before)

    hours = [int(HOUR) - 3600 * n for n in range(100, 0, -1)]
    tedstore.run_rollups(store.conn, write, hours, HOUR + 7200)
    # four days of hours, the rest, the complete days among them, the job record
    assert saves == [24, 24, 24, 24, 4, 0, 0]


def test_hours_to_roll_catch_up_and_revisit(store):
    hour_of_play(store)
    now = HOUR + 5 * 3600 + 120
    hours = tedstore.hours_to_roll(store.conn, now, store.settings)
    assert hours == [int(HOUR) + 3600 * i for i in range(5)]          # from the oldest data
    tedstore.run_rollups(store.conn, local_write(store.conn), hours, now)
    later = tedstore.hours_to_roll(store.conn, now + 3600, store.settings)
    assert later == [int(HOUR) + 3600 * i for i in range(5 - tedstore.ROLLUP_REVISIT_HOURS, 6)]
    assert tedstore.hours_to_roll(store.conn, now, store.settings, since=HOUR + 3600)[0] == HOUR + 3600


def test_the_daemon_catches_up_missed_hours_at_start(daemon_factory, tmp):
    old = Store(tmp / "tedstore.db")
    hour_of_play(old)
    old.conn.close()
    daemon = daemon_factory()
    expected = tedstore.newest_complete_hour(time.time())
    wait_for(lambda: query(daemon.db, "SELECT max(hour_start) FROM metrics_hourly")[0][0]
             == tedstore.utc_text(expected), what="the catch-up rollup")
    hours = query(daemon.db, "SELECT count(*), min(hour_start) FROM metrics_hourly")[0]
    assert hours == ((expected - HOUR) // 3600 + 1, "2026-11-20 10:00:00.000")
    assert query(daemon.db, "SELECT predictions_made FROM metrics_hourly WHERE hour_start = ?",
                 (tedstore.utc_text(HOUR),)) == [(5,)]
    status = tedstore.request(daemon.socket, "status")["status"]
    assert status["last_rollup"]["through"] == tedstore.utc_text(expected + 3600)


def test_the_daemon_rolls_up_its_own_commit_latency(inprocess):
    daemon = inprocess()
    conn = Conn(daemon.socket)
    conn.send(*[prediction("lat", i, i + 5) for i in range(300)])
    conn.wait_ack(300)
    daemon.daemon.scheduler.stop()                          # the test drives the clock
    daemon.daemon.scheduler.join(10)
    now = time.time()
    tedstore.Scheduler(daemon.settings, daemon.daemon.writer).run_due(now + 2 * 3600)
    measured = daemon.daemon.writer.stats.latency_by_hour[tedstore.hour_floor(now)]
    row = query(daemon.db, "SELECT avg_commit_latency_ms, p99_commit_latency_ms, predictions_made "
                           "FROM metrics_hourly WHERE hour_start = ?",
                (tedstore.utc_text(tedstore.hour_floor(now)),))
    assert row == [(measured.mean, measured.quantile(0.99), 300)]
    assert measured.count == 300


def test_rollup_cli_recomputes_a_range(tmp):
    store = Store(tmp / "r.db")
    hour_of_play(store)
    store.conn.close()
    result = run_cli("rollup", "--db", store.path, "--since", "2026-11-20T10:00", "--json")
    assert result.returncode == 0, result.stderr
    detail = json.loads(result.stdout)
    assert detail["hours"] >= 2
    assert query(store.path, "SELECT predictions_made FROM metrics_hourly WHERE hour_start = ?",
                 (tedstore.utc_text(HOUR),)) == [(5,)]
    assert "rolled up" in run_cli("rollup", "--db", store.path, "--since", "2026-11-20").stdout


# -- retention -----------------------------------------------------------------------------

def aged_store(tmp, **settings) -> tuple[Store, float]:
    """Data at 1, 10, 100 and 200 days old, in every table: rows that aged in place (sent
    with a retention that accepted them), now under `settings`."""
    now = time.time()
    store = Store(tmp / "aged.db", **settings)
    accepting = tedstore.load_settings(db=store.path, **LONG_RETENTION)
    for days in (1, 10, 100, 200):
        ts = (now - days * 86400) * 1000
        game = f"d{days}"
        events = [{"event": "gameStart", "gameId": game, "tick": 0, "price": 1.0, "ts": ts},
                  *[{"event": "priceUpdate", "gameId": game, "tick": n, "price": 1.5, "ts": ts}
                    for n in (10, 20)],
                  prediction(game, 5, 50, ts=ts), side_bet(game, 5, ts=ts),
                  {"event": "gameEnd", "gameId": game, "tick": 40, "finalPrice": 0.1, "ts": ts}]
        assert store.send(*events, settings=accepting) == []
        store.conn.execute("INSERT INTO rejects (received_at, line_no, code, error) "
                           "VALUES (?, 1, 'bad_json', 'x')", (tedstore.utc_text(ts / 1000),))
    return store, now


def test_retention_dry_run_then_run_deletes_per_table(tmp):
    store, now = aged_store(tmp)
    write = local_write(store.conn)
    tedstore.run_rollups(store.conn, write, tedstore.hours_to_roll(store.conn, now, store.settings), now)
    planned = tedstore.run_retention(store.conn, write, store.settings, now, dry_run=True)
    assert planned == {"tick_samples": 6, "predictions": 2, "side_bets": 2, "games": 1,
                       "rejects": 2, "metrics_hourly": 0, "metrics_daily": 0}
    assert store.rows("SELECT count(*) FROM predictions") == [(4,)]       # dry run kept them
    removed = tedstore.run_retention(store.conn, write, store.settings, now)
    assert removed == planned
    assert store.rows("SELECT game_id FROM predictions ORDER BY game_id") == [("d1",), ("d10",)]
    assert store.rows("SELECT game_id FROM games ORDER BY game_id") == \
        [("d1",), ("d10",), ("d100",)]
    assert store.rows("SELECT DISTINCT game_id FROM tick_samples") == [("d1",)]
    assert store.rows("SELECT count(*) FROM rejects") == [(2,)]
    assert json.loads(store.rows("SELECT detail FROM jobs WHERE name = 'retention'")[0][0]) == \
        {"deleted": removed}


def test_retention_rolls_up_before_it_deletes(tmp):
    """Never delete rows of an hour whose rollup has not been written."""
    store, now = aged_store(tmp)
    assert store.rows("SELECT count(*) FROM metrics_hourly") == [(0,)]
    hours = {tedstore.utc_text(tedstore.hour_floor(tedstore.text_epoch(t)))
             for (t,) in store.rows("SELECT created_at FROM predictions WHERE game_id IN "
                                    "('d100', 'd200')")}
    tedstore.run_retention(store.conn, local_write(store.conn), store.settings, now)
    for hour in hours:
        assert store.rows("SELECT predictions_made, games_analyzed FROM metrics_hourly "
                          "WHERE hour_start = ?", (hour,)) == [(1, 1)]


def test_retention_cutoffs_never_pass_the_newest_complete_hour():
    """What the rollup reads is deleted only up to the hours retention can roll up first."""
    settings = msgspec.structs.replace(tedstore.load_settings(), prediction_retention_days=0.001,
                                       sidebet_retention_days=0.001, tick_retention_days=0.001)
    now = HOUR + 1800
    cutoffs = tedstore.retention_cutoffs(settings, now)
    assert cutoffs["predictions"] == cutoffs["side_bets"] == cutoffs["rejects"] == \
        tedstore.utc_text(HOUR)                          # the end of the newest complete hour
    assert cutoffs["tick_samples"] == tedstore.utc_text(now - 86.4)


def test_dry_run_counts_exactly_what_the_run_deletes(tmp):
    """No rollups yet, and games kept shorter than their predictions: the dry run still
    agrees with the run that follows, and writes nothing."""
    store, now = aged_store(tmp, game_retention_days=5)
    write = local_write(store.conn)
    planned = tedstore.run_retention(store.conn, write, store.settings, now, dry_run=True)
    assert store.rows("SELECT count(*) FROM metrics_hourly") == [(0,)]
    removed = tedstore.run_retention(store.conn, write, store.settings, now)
    assert removed == planned
    # d10's game is older than 5 days, but its prediction and side bet are kept: so is it
    assert planned["games"] == 2
    assert store.rows("SELECT game_id FROM games ORDER BY game_id") == [("d1",), ("d10",)]
    orphans = store.rows("SELECT count(*) FROM predictions p WHERE NOT EXISTS "
                         "(SELECT 1 FROM games g WHERE g.game_id = p.game_id)")
    assert orphans == [(0,)]


def test_each_retention_step_deletes_its_limit_even_among_equal_times(tmp):
    """A bulk load stamps many rows with one time: a step still deletes only `limit`."""
    store = Store(tmp / "ties.db")
    old = tedstore.utc_text(time.time() - 30 * 86400)
    store.conn.executemany("INSERT INTO tick_samples (game_id, tick, price, ts, created_at) "
                           "VALUES (?, ?, 1.0, ?, ?)",
                           [(f"g{n // 100}", n % 100, old, old) for n in range(4500)])
    cutoffs = tedstore.retention_cutoffs(store.settings, time.time())
    steps = [tedstore.delete_expired(store.conn, "tick_samples", cutoffs, 1000)[0]
             for _ in range(6)]
    assert steps == [1000, 1000, 1000, 1000, 500, 0]


def test_catch_up_is_bounded_by_the_horizon_and_steps_over_empty_hours(tmp):
    """Rows from before the timestamp bounds (1970, 2001) cost one rollup per hour that
    holds data, not one per hour since 1970; retention rolls them up, then deletes them."""
    store = Store(tmp / "h.db", metrics_retention_days=36500)
    store.conn.execute(
        "INSERT INTO predictions (game_id, predicted_at_tick, predicted_end_tick, confidence, "
        "model_version, created_at) VALUES ('a', 1, 2, 0.5, 'v', '1970-01-01 00:00:05.000'), "
        "('b', 1, 2, 0.5, 'v', '2001-09-09 01:46:40.000')")
    assert store.send(prediction("c", 1, 2)) == []
    now = time.time()
    hours = tedstore.hours_to_roll(store.conn, now, store.settings)
    assert hours[0] == tedstore.rollup_floor(now, store.settings)
    assert len(hours) <= 180 * 24 + 1
    cutoff = tedstore.retention_cutoffs(store.settings, now)["predictions"]
    assert tedstore.unrolled(store.conn, cutoff, now) == \
        [0, tedstore.hour_floor(tedstore.text_epoch("2001-09-09 01:46:40.000"))]
    removed = tedstore.run_retention(store.conn, local_write(store.conn), store.settings, now)
    assert removed["predictions"] == 2
    assert store.rows("SELECT hour_start, predictions_made FROM metrics_hourly ORDER BY 1") == \
        [("1970-01-01 00:00:00.000", 1), ("2001-09-09 01:00:00.000", 1)]


def test_retention_follows_the_configured_days(tmp):
    store, now = aged_store(tmp, prediction_retention_days=5, tick_retention_days=300)
    removed = tedstore.run_retention(store.conn, local_write(store.conn), store.settings, now)
    assert removed["predictions"] == 3 and removed["tick_samples"] == 0 and removed["rejects"] == 3


def test_retention_cli(tmp):
    store, _ = aged_store(tmp)
    store.conn.close()
    dry = run_cli("retention", "--db", store.path, "--dry-run")
    assert dry.returncode == 0 and "tick_samples: would delete 6 rows" in dry.stdout
    done = run_cli("retention", "--db", store.path, "--json")
    assert json.loads(done.stdout)["deleted"]["predictions"] == 2


def test_nightly_jobs_run_once_a_day_and_catch_up(tmp):
    settings = tedstore.load_settings(db=str(tmp / "n.db"), backup_dir=str(tmp / "backups"),
                                      backup_keep=2)
    tedstore.open_store(settings.db).close()
    writer = tedstore.Writer(settings)
    writer.start()
    writer.started.wait()
    scheduler = tedstore.Scheduler(settings, writer)
    day = tedstore.text_epoch("2026-11-20 00:00:00.000")

    def run_at(clock: str) -> tuple[str, str]:
        scheduler.run_due(day + tedstore.text_epoch(f"1970-01-01 {clock}") if len(clock) == 12
                          else tedstore.text_epoch(clock))
        return scheduler.last["retention"]["at"], scheduler.last.get("backup", {}).get("at")

    first = run_at("02:00:00.000")                                  # never ran: catch up
    assert first == ("2026-11-20 02:00:00.000", "2026-11-20 02:00:00.000")
    assert run_at("02:30:00.000") == first                          # not again before 03:00
    assert run_at("03:00:05.000")[0] == "2026-11-20 03:00:05.000"   # the nightly slot
    assert run_at("05:00:00.000")[0] == "2026-11-20 03:00:05.000"
    assert run_at("2026-11-22 10:00:00.000")[0] == "2026-11-22 10:00:00.000"  # missed a night
    assert len(os.listdir(tmp / "backups")) == 2                    # TEDSTORE_BACKUP_KEEP
    jobs = dict(query(settings.db, "SELECT name, last_run_at FROM jobs"))
    assert jobs["retention"] == jobs["backup"] == "2026-11-22 10:00:00.000"
    scheduler.stop()
    writer.stop()
    writer.join(10)


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
    """An hour of ingest at 100 events/s (360,000 events), sent as fast as it goes."""
    peak, done = [0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], wal_size(daemon.db))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    lines = (json.dumps(e).encode() + b"\n"
             for e in tedstore.simulate_events(events=360_000, seed=4, mix="predictions"))
    result = tedstore.stream_lines(daemon.socket, lines)
    done.set()
    watcher.join()
    assert result.acked == 360_000 and not result.rejections
    assert 0 < peak[0] <= tedstore.JOURNAL_SIZE_LIMIT, f"WAL peaked at {peak[0] / 1e6:.1f} MB"


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


def test_status_for_people_starts_with_a_summary_and_speaks_in_units(daemon):
    conn = daemon.connect()
    events = list(tedstore.simulate_events(2, seed=3))
    conn.send(*events, b"{not json")
    assert [r["code"] for r in conn.wait_ack(len(events) + 1)] == ["bad_json"]
    done = run_cli("status", "--socket", daemon.socket)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert re.fullmatch(r"tedstore \S+ is running \(pid \d+, up \d+ (s|min|h|d)\): [\d,]+ "
                        r"events/min, last commit \d+ (s|min) ago, queue \d+, WAL [\d.]+ MB",
                        lines[0]), lines[0]
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
    assert "not running" in result.stdout and "schema_version" in result.stdout
    assert "retention" in result.stdout                            # what the database knows
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
              {"event": "gameStart", "gameId": "c", "tick": 0, "price": 1.0},
              {"event": "priceUpdate", "gameId": "c", "tick": 10, "price": 2.0},
              {"event": "state", "key": "k", "value": 1}]
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


def run_with_fault(tmp, vfs: FaultVFS, kind: str, n: int, persistent: bool) -> bool:
    """One run on a fresh database with the fault armed; True if the fault fired."""
    for name in os.listdir(tmp):
        os.unlink(tmp / name)
    settings = tedstore.load_settings(db=str(tmp / "tedstore.db"), socket=str(tmp / "tedstore.sock"),
                                      synchronous="FULL", batch_size=50)
    daemon = tedstore.Daemon(settings, vfs=FAULT_VFS)
    runner = threading.Thread(target=daemon.run)
    runner.start()
    try:
        wait_for(daemon.ready.is_set, what="the daemon")
        daemon.writer.run_task(lambda db: None)               # start-up writes are behind us
        vfs.arm(kind, n, persistent)
        conn = Conn(settings.socket)
        conn.send(*[prediction("io", i, i + 1) for i in range(200)])
        wait_for(lambda: conn.poll(0.05) is not None and (vfs.failures or conn.acked == 200),
                 what="the fault or the last ack")
        if persistent and vfs.failures:
            wait_for(lambda: daemon.writer.stats.failing, what="the writer to notice")
            conn.poll(0.1)
            stored = {row[0] for row in query(settings.db, "SELECT predicted_at_tick FROM predictions")}
            assert set(range(conn.acked)) <= stored, "acknowledged a batch whose COMMIT failed"
            assert conn.acked < 200
        vfs.disarm()
        assert conn.wait_ack(200) == []
        assert query(settings.db, "SELECT count(*) FROM predictions") == [(200,)]
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
