"""Long windows read the daily histograms (schema v5) for the settled days they hold whole,
and the records for the rest: every answer is still the records' own, whatever arrives
late, stays pending or is deleted by retention."""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path

import msgspec
import pytest

import tedstore
from conftest import NOW, Play, Store, close, game_end, prediction, run_cli

TRACKERS = (("production", "v2.1.0"), ("shadow", "v3.0.0"))
TODAY = int(NOW // 86400) * 86400
FIRST = TODAY - 13 * 86400 + 5 * 3600          # a game an hour for 12 days from here
ENDLESS = 100                                  # games 3, 103 and 203 never end
WINDOWS = {"all": (FIRST - 86400, NOW), "cut": (FIRST + 2.5 * 86400, FIRST + 10.3 * 86400),
           "short": (FIRST + 86400, FIRST + 4 * 86400)}
FILTERS = [{}, {"tracker": "shadow"}, {"model": "v2.1.0"}]
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def played(tmp_path_factory):
    """Twelve days of two trackers, rolled up as the scheduler would: the histograms of
    each settled day written. The file is copied by the tests that change it."""
    play = Play(seed=11, games=288, trackers=TRACKERS, first_hour=FIRST, hours=288,
                endless=ENDLESS)
    store = Store(tmp_path_factory.mktemp("histograms") / "h.db")
    assert store.send(*play.events) == []
    store.roll_up()
    store.conn.close()
    return play, Path(store.path)


@pytest.fixture(autouse=True)
def long_from_a_week():
    """Windows from 7 days on read the histograms here (60 by default: below that, sorting
    the window's records costs less than reading every histogram), so that twelve days of
    play hold windows of each kind."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tedstore, "LONG_WINDOW_DAYS", 7)
        yield


def copy(path: Path, tmp: Path) -> Store:
    shutil.copy(path, tmp / "copy.db")
    return Store(tmp / "copy.db")


def listed_days(path) -> set[str]:
    conn = tedstore.connect(str(path), readonly=True)   # never sqlite3 beside apsw: a second
    try:                                                # SQLite in one process drops its locks
        return {day for (day,) in conn.execute("SELECT day FROM histogram_days")}
    finally:
        conn.close()


def day_of(epoch: float) -> str:
    return tedstore.day_text(epoch)


def without_period(answer: dict) -> dict:
    return {k: v for k, v in answer.items() if k not in ("since", "until", "period_hours")}


def test_settled_days_whose_records_are_all_resolved_are_listed(played):
    """Not the first day (the oldest record's: retention may have cut it), not a day with a
    game that never ended (its records are pending), not a day that has not settled."""
    play, path = played
    days_with_records = {day_of(p["ts"]) for p in play.predictions}
    pending = {day_of(g["start"]) for g in play.games if g["ended"] is None}
    settled = {day for day in days_with_records if tedstore.text_epoch(day + " 00:00:00")
               + 86400 + tedstore.SETTLED_HOURS * 3600 <= time.time()}
    assert len(pending) == 3 and len(settled) >= 11
    assert listed_days(path) == settled - pending - {day_of(FIRST)}


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("filters", FILTERS, ids=lambda f: "-".join(f.values()) or "everyone")
def test_a_long_window_equals_its_records(played, window, filters):
    play, path = played
    since, until = WINDOWS[window]
    with tedstore.Reader(db_path=str(path)) as reader:
        answer = reader.performance(since=since, until=until, **filters)
        assert without_period(answer) == close(play.performance(since, until, **filters))
        for bins in (10, 3):
            answer = reader.calibration(since=since, until=until, bins=bins, **filters)
            assert {k: v for k, v in answer.items() if k not in ("since", "until")} \
                == close(play.calibration(since, until, bins=bins, **filters))


def test_the_long_windows_do_read_the_histograms(played, tmp):
    """The histograms answer for the listed days: doubled, the answers double too."""
    _, path = played
    conn = tedstore.connect(str(path), readonly=True)
    for window in ("all", "cut"):
        start, end = (tedstore.utc_text(t) for t in WINDOWS[window])
        for records in ("predictions", "side_bets"):
            cover = tedstore.histogram_cover(conn, start, end, records)
            assert cover["cover_from"] is not None, (window, records)
    assert tedstore.histogram_cover(conn, *(tedstore.utc_text(t) for t in WINDOWS["short"]),
                                    "predictions")["cover_from"] is None
    conn.close()
    store = copy(path, tmp)
    since, until = WINDOWS["all"]
    with tedstore.Reader(db_path=store.path) as reader:
        before = reader.performance(since=since, until=until)["prediction_metrics"]
        bets = reader.calibration(since=since, until=until)["side_bets"]["n"]
        store.conn.execute("UPDATE errors_daily SET n = 2 * n; "
                           "UPDATE probabilities_daily SET n = 2 * n")
        after = reader.performance(since=since, until=until)["prediction_metrics"]
        assert after["resolved"] > before["resolved"]
        assert reader.calibration(since=since, until=until)["side_bets"]["n"] > bets
    store.conn.close()


def test_a_late_record_unlists_its_day_until_the_next_rollup(played, tmp):
    """A prediction for a listed day, received days later, is resolved on arrival: its day
    leaves the list in the transaction that stores it, and long windows count it at once."""
    play, path = played
    store = copy(path, tmp)
    listed = listed_days(path)
    game = next(g for g in play.games if g["ended"] is not None        # a day amid listed ones
                and {day_of(g["start"] + d * 86400) for d in (-1, 0, 1)} <= listed)
    since, until = WINDOWS["all"]
    with tedstore.Reader(db_path=store.path) as reader:
        before = reader.performance(since=since, until=until)["prediction_metrics"]
        line = msgspec.json.encode(prediction(game["id"], 1, 999, ts=game["start"] + 1,
                                              tracker="production", model_version="v2.1.0"))
        batch = tedstore.IngestBatch([tedstore.Chunk(None, 1, 1, line + b"\n", time.time())],
                                     store.settings)          # the daemon's: late hours only
        with tedstore.transaction(store.conn):
            batch.apply(store.conn, time.time())
        assert day_of(game["start"]) not in listed_days(store.path)
        after = reader.performance(since=since, until=until)["prediction_metrics"]
        assert (after["predictions_made"], after["resolved"]) == \
            (before["predictions_made"] + 1, before["resolved"] + 1)
        store.roll_up()
        assert day_of(game["start"]) in listed_days(store.path)
        assert reader.performance(since=since, until=until)["prediction_metrics"] == after
    store.conn.close()


def test_a_day_is_listed_once_its_last_game_ends(played, tmp):
    play, path = played
    store = copy(path, tmp)
    game = next(g for g in play.games if g["ended"] is None
                and day_of(g["start"]) != day_of(FIRST))
    day = day_of(game["start"])
    assert day not in listed_days(path)
    assert store.send(game_end(game["id"], at=game["end_tick"], final=0.5,
                               ts=game["start"] + game["end_tick"] * 0.25)) == []
    store.roll_up()
    assert day in listed_days(store.path)
    store.conn.close()


def test_records_deleted_before_their_histograms_are_never_counted(played, tmp):
    """Retention deletes records first and their histograms after: in between, the day of
    the oldest record left and the days before it are read from the records alone."""
    play, path = played
    store = copy(path, tmp)
    cutoff = tedstore.utc_text(time.time() - 8 * 86400)
    assert cutoff[:10] in listed_days(path)
    for table in ("predictions", "side_bets"):
        store.conn.execute(f"DELETE FROM {table} WHERE created_at < ?", (cutoff,))
    since, until = WINDOWS["all"]
    with tedstore.Reader(db_path=store.path) as reader:
        answer = reader.performance(since=since, until=until)
        truth = play.performance(tedstore.text_epoch(cutoff), until)
        assert answer["prediction_metrics"] == close(truth["prediction_metrics"])
        assert answer["sidebet_metrics"] == close(truth["sidebet_metrics"])
        calibration = reader.calibration(since=since, until=until)
        assert {k: v for k, v in calibration.items() if k not in ("since", "until")} \
            == close(play.calibration(tedstore.text_epoch(cutoff), until))
    store.conn.close()


def test_retention_cuts_a_day_that_is_then_read_from_its_records(played, tmp):
    """Retention deletes up to the middle of a listed day: that day and the ones before are
    read from what is left of the records, and their histograms go with them."""
    play, path = played
    store = copy(path, tmp)
    settings = msgspec.structs.replace(store.settings, prediction_retention_days=8,
                                       sidebet_retention_days=8)
    now = time.time()
    cutoff = now - 8 * 86400
    assert day_of(cutoff) in listed_days(path)
    tedstore.run_retention(store.conn, lambda step: step(store.conn), settings, now)
    since, until = WINDOWS["all"]
    with tedstore.Reader(db_path=store.path) as reader:
        answer = reader.performance(since=since, until=until)
        truth = play.performance(tedstore.text_epoch(tedstore.utc_text(cutoff)), until)
        assert answer["prediction_metrics"] == close(truth["prediction_metrics"])
        assert answer["sidebet_metrics"] == close(truth["sidebet_metrics"])
    kept = store.rows("SELECT min(day) FROM histogram_days")[0][0]
    assert kept > day_of(cutoff)
    for table in ("errors_daily", "confidences_daily", "probabilities_daily"):
        assert store.rows(f"SELECT count(*) FROM {table} WHERE day <= ?", (day_of(cutoff),)) \
            == [(0,)], table
    store.conn.close()


def test_a_version_4_database_is_upgraded_without_losing_or_changing_a_row(tmp):
    """tests/fixtures/schema_v4.sql is a dump of a database made by schema version 4, with
    rows in every table: the step to 5 keeps every row, drops the three value-ordered
    indexes, and the next rollup writes the histograms of its settled days."""
    path = tmp / "v4.db"
    legacy = sqlite3.connect(path)
    legacy.executescript((FIXTURES / "schema_v4.sql").read_text())
    legacy.close()
    tables = ("games", "predictions", "side_bets", "tick_samples", "metrics_hourly",
              "metrics_daily", "metrics_hourly_by", "state", "rejects", "jobs")
    read = sqlite3.connect(path)
    before = {table: read.execute(f"SELECT * FROM {table} ORDER BY rowid").fetchall()
              for table in tables}
    read.close()
    assert all(before.values())
    store = Store(path)
    assert store.conn.pragma("user_version") == tedstore.schema_version()
    assert tedstore.schema_differences(store.conn) == []
    for table in tables:
        assert store.rows(f"SELECT * FROM {table} ORDER BY rowid") == before[table], table
    assert store.rows("SELECT name FROM sqlite_schema WHERE name IN ('predictions_raw_error', "
                      "'predictions_confidence', 'side_bets_probability')") == []
    store.roll_up()
    assert store.rows("SELECT count(*) FROM histogram_days")[0][0] >= 1
    assert store.rows("SELECT count(*) FROM errors_daily")[0][0] >= 1
    store.conn.close()


def test_tedstore_rollup_writes_the_days_missing_from_the_histograms(played, tmp):
    _, path = played
    store = copy(path, tmp)
    day = sorted(listed_days(path))[3]
    store.conn.execute("DELETE FROM histogram_days WHERE day = ?", (day,))
    store.conn.close()
    result = run_cli("rollup", "--db", store.path)
    assert result.returncode == 0, result.stderr
    assert "wrote the histograms of 1 day(s)" in result.stdout, result.stdout
    assert day in listed_days(store.path)
