"""Hourly and daily rollups: every column as the README defines it, idempotent, caught up
when missed, a day at a time."""

from __future__ import annotations

import json
import statistics
import time

import pytest

import tedstore
from conftest import (HOUR, Conn, Store, at, game_end, game_start, local_write, prediction, query,
                      run_cli, side_bet, wait_for)


def rollup_row(store: Store, hour: float) -> dict:
    return store.one("SELECT * FROM metrics_hourly WHERE hour_start = ?", (tedstore.utc_text(hour),))



# -- hourly rollup ---------------------------------------------------------------------------

def hour_of_play(store: Store) -> dict:
    """Two games in HOUR, with predictions and side bets whose outcomes are known."""
    events = [
        game_start("a", 0, 1.0, ts=at(HOUR, 1)),
        prediction("a", 10, 110, ts=at(HOUR, 2)),      # error +10
        prediction("a", 20, 40, ts=at(HOUR, 3)),       # error -60
        prediction("a", 30, 230, ts=at(HOUR, 4)),      # error +130
        side_bet("a", 80, ts=at(HOUR, 5)),             # 80..120: WON, ev 0.2
        side_bet("a", 10, expected_value=-0.3, ts=at(HOUR, 5)),   # BET, LOST
        side_bet("a", 30, "SKIP", expected_value=0.4, ts=at(HOUR, 5)),  # SKIP, LOST
        game_end("a", at=100, final=0.1, ts=at(HOUR, 20)),
        game_start("b", 0, 1.0, ts=at(HOUR, 30)),
        prediction("b", 5, 50, ts=at(HOUR, 31)),       # error -150
        side_bet("b", 190, ts=at(HOUR, 31)),           # 190..230: WON
        game_end("b", at=200, final=0.1, ts=at(HOUR, 59)),
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
    # four days of hours, the rest, the complete days among them, the daily histograms'
    # upkeep (their days are not settled yet), the job record
    assert saves == [24, 24, 24, 24, 4, 0, 0, 0]


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
    wait_for(lambda: tedstore.request(daemon.socket, "status")["status"]["last_rollup"],
             what="the scheduler to record the catch-up")
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


def test_the_daily_views_say_what_the_measures_say_rolled_up_or_not(store):
    """prediction_accuracy_daily and side_bet_roi_daily read metrics_daily for the days
    rolled up and the base tables for the others (their own SQL); either way each day's
    row is the day's Measures, rounded as the view rounds them."""
    first = tedstore.hour_floor(time.time()) // 86400 * 86400 - 5 * 86400
    for day in range(5):
        events = tedstore.simulate_events(6, seed=40 + day, start=first + day * 86400 + 3600)
        assert store.send(*events) == []
    now = time.time()
    rolled = [first, first + 86400]                        # two days rolled up, three not
    tedstore.run_rollups(store.conn, local_write(store.conn), [], now, days=rolled)
    assert [row[0] for row in store.rows("SELECT day FROM metrics_daily")] == \
        [tedstore.utc_text(day)[:10] for day in rolled]
    accuracy = {row["day"]: row for row in tedstore.rows_as_dicts(
        store.conn.execute("SELECT * FROM prediction_accuracy_daily"))}
    roi = {row["day"]: row for row in
           tedstore.rows_as_dicts(store.conn.execute("SELECT * FROM side_bet_roi_daily"))}
    assert len(accuracy) == len(roi) == 5

    def rounded(value, digits):
        return None if value is None else round(value, digits)

    for day in range(first, first + 5 * 86400, 86400):
        m = tedstore.measure(store.conn, tedstore.utc_text(day), tedstore.utc_text(day + 86400))
        name = tedstore.utc_text(day)[:10]
        assert accuracy[name] == {
            "day": name, "predictions": m.predictions_made, "resolved": m.predictions_resolved,
            "mean_absolute_error": rounded(m.mean_absolute_error, 2),
            "mean_e40": rounded(m.mean_e40, 3),
            "within_1_window_pct": rounded(m.within_1_window, 1),
            "within_2_windows_pct": rounded(m.within_2_windows, 1),
            "within_3_windows_pct": rounded(m.within_3_windows, 1)}, name
        assert roi[name] == {
            "day": name, "bets": m.bets, "won": m.bets_won, "lost": m.bets_lost,
            "pending": m.bets_pending, "total_payout": rounded(m.total_payout, 2),
            "roi_percentage": rounded(m.roi_percentage, 1)}, name
