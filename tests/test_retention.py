"""Retention: what each table keeps, never past what is rolled up, in small steps; and the
nightly jobs."""

from __future__ import annotations

import json
import os
import time

import msgspec

import tedstore
from conftest import (HOUR, LONG_RETENTION, Store, game_end, game_start, local_write, prediction,
                      price_update, query, run_cli, side_bet)

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
        events = [game_start(game, 0, 1.0, ts=ts),
                  *[price_update(game, n, 1.5, ts=ts)
                    for n in (10, 20)],
                  prediction(game, 5, 50, ts=ts), side_bet(game, 5, ts=ts),
                  game_end(game, at=40, final=0.1, ts=ts)]
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
                       "rejects": 2, "metrics_hourly": 0, "metrics_daily": 0,
                       "metrics_hourly_by": 0}
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
