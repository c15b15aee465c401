"""Game lifecycle: peaks, sampling, outcomes, order independence, timestamps, schema upgrades."""

from __future__ import annotations

import json
import random
import sqlite3
import tempfile
from pathlib import Path

import apsw
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import tedstore
from conftest import (LONG_RETENTION, Store, game_end, game_start, prediction, price_update,
                      side_bet, state_write)

FIXTURES = Path(__file__).parent / "fixtures"


FEATURES = {"volatility_10": 0.1, "volatility_40": 0.2, "momentum": -0.3, "rsi": 55.5,
            "volume_ratio": 1.25}


def test_a_game_from_start_to_end(store):
    events = [game_start(ts=1_763_800_000)]
    prices = {1: 1.1, 2: 1.5, 3: 1.5, 10: 1.2, 20: 2.5, 25: 2.5, 30: 0.9}
    events += [price_update("g", n, p, features=FEATURES, ts=1_763_800_000 + n) for n, p in prices.items()]
    events.append(game_end(at=42, final=0.05, treasuryRemainder=1234, patterns=["moonshot", "bleed"],
                      ts=1_763_800_050))
    assert store.send(*events) == []
    game = store.one("SELECT * FROM games")
    assert (game["start_tick"], game["end_tick"], game["duration_ticks"]) == (0, 42, 42)
    assert (game["peak_price"], game["peak_tick"]) == (2.5, 20)     # highest, earliest tick
    assert (game["final_price"], game["treasury_remainder"]) == (0.05, 1234)
    assert json.loads(game["patterns_detected"]) == ["bleed", "moonshot"]
    assert game["started_at"] == "2025-11-22 08:26:40.000"
    assert game["ended_at"] == "2025-11-22 08:27:30.000"
    assert game["created_at"] == game["started_at"]
    assert (game["had_predictions"], game["prediction_accuracy"], game["side_bets_placed"]) == \
        (0, None, 0)
    samples = store.rows("SELECT tick, price, volatility_10, volatility_40, momentum, rsi, "
                         "volume_ratio FROM tick_samples ORDER BY tick")
    assert samples == [(10, 1.2, 0.1, 0.2, -0.3, 55.5, 1.25), (20, 2.5, 0.1, 0.2, -0.3, 55.5, 1.25),
                       (30, 0.9, 0.1, 0.2, -0.3, 55.5, 1.25)]


def test_tick_sample_every_one_keeps_every_tick(tmp):
    store = Store(tmp / "all.db", tick_sample_every=1)
    store.send(game_start(), *[price_update("g", n, 1 + n / 10) for n in range(1, 8)])
    assert store.rows("SELECT count(*) FROM tick_samples") == [(7,)]


def test_price_updates_for_an_unknown_game_create_it(store):
    store.send(price_update("new", 5, 3.0), price_update("new", 6, 4.0))
    game = store.one("SELECT * FROM games WHERE game_id = 'new'")
    assert (game["start_tick"], game["peak_price"], game["peak_tick"]) == (None, 4.0, 6)


def test_game_end_for_an_unknown_game_creates_it(store):
    store.send(game_end("lost", at=77, startTick=7, peakPrice=3.0, peakTick=30))
    game = store.one("SELECT * FROM games WHERE game_id = 'lost'")
    assert (game["start_tick"], game["end_tick"], game["duration_ticks"]) == (7, 77, 70)
    assert (game["peak_price"], game["peak_tick"]) == (3.0, 30)


def test_game_end_resolves_predictions_and_side_bets_in_the_same_batch(store):
    store.send(game_start(),
               prediction("g", 10, 130, ts=1_763_800_001),      # error +30
               prediction("g", 20, 60),                          # error -40
               prediction("g", 30, 300),                         # error +200
               side_bet("g", 60, ts=1_763_800_002),              # 60..100: WON
               side_bet("g", 100),                               # 100..140: WON (edge)
               side_bet("g", 101),                               # LOST
               side_bet("g", 50, window_ticks=50),               # 50..100: WON (edge)
               side_bet("g", 20, "SKIP"),                        # 20..60: LOST
               game_end(at=100, ts=1_763_800_100))
    ended_at = "2025-11-22 08:28:20.000"
    predictions = store.rows("SELECT predicted_at_tick, actual_end_tick, raw_error, signed_error, "
                             "e40, within_windows, resolved_at FROM predictions ORDER BY 1")
    assert predictions == [(10, 100, 30, 30, 0.75, 0, ended_at),
                           (20, 100, -40, -40, -1.0, 1, ended_at),
                           (30, 100, 200, 200, 5.0, 5, ended_at)]
    bets = store.rows("SELECT placed_at_tick, window_end_tick, actual_outcome, payout, resolved_at "
                      "FROM side_bets ORDER BY 1")
    assert bets == [(20, 60, "LOST", -1.0, ended_at), (50, 100, "WON", 5.0, ended_at),
                    (60, 100, "WON", 5.0, ended_at), (100, 140, "WON", 5.0, ended_at),
                    (101, 141, "LOST", -1.0, ended_at)]
    game = store.one("SELECT had_predictions, prediction_accuracy, side_bets_placed FROM games")
    assert game == {"had_predictions": 1, "prediction_accuracy": pytest.approx(200 / 3),
                    "side_bets_placed": 4}


def test_predictions_stored_before_the_end_are_resolved_by_it(store):
    store.send(game_start(), prediction("g", 10, 90), side_bet("g", 80))
    assert store.rows("SELECT actual_end_tick FROM predictions") == [(None,)]
    assert store.rows("SELECT actual_outcome, payout FROM side_bets") == [("PENDING", None)]
    store.send(game_end(at=95, ts=1_763_800_100))
    assert store.rows("SELECT raw_error, resolved_at FROM predictions") == \
        [(-5, "2025-11-22 08:28:20.000")]
    assert store.rows("SELECT actual_outcome, payout FROM side_bets") == [("WON", 5.0)]


def test_late_arrivals_are_resolved_on_arrival_with_the_games_end_time(store):
    store.send(game_start(), game_end(at=100, ts=1_763_800_100), prediction("g", 5, 95))
    store.send(prediction("g", 10, 300, ts=1_763_900_000), side_bet("g", 70))
    assert store.rows("SELECT raw_error, resolved_at FROM predictions ORDER BY 1") == \
        [(-5, "2025-11-22 08:28:20.000"), (200, "2025-11-22 08:28:20.000")]
    assert store.rows("SELECT actual_outcome, resolved_at FROM side_bets") == \
        [("WON", "2025-11-22 08:28:20.000")]
    game = store.one("SELECT had_predictions, prediction_accuracy, side_bets_placed FROM games")
    assert game == {"had_predictions": 1, "prediction_accuracy": 50.0, "side_bets_placed": 1}


def test_payout_multiplier_is_configurable(tmp):
    store = Store(tmp / "m.db", payout_multiplier=3.5)
    store.send(side_bet("g", 10), side_bet("g", 200), game_end(at=20))
    assert store.rows("SELECT payout FROM side_bets ORDER BY placed_at_tick") == [(3.5,), (-1.0,)]


def test_a_second_game_end_with_another_tick_is_a_conflict_and_the_first_stands(store):
    store.send(game_start(), prediction("g", 10, 90), game_end(at=100, final=0.3, patterns=["a"]))
    rejections = store.send(game_end(at=120, final=0.9, patterns=["b"]))
    assert [(code, "already ended at tick 100" in error) for _, code, error in rejections] == \
        [("conflict", True)]
    assert store.rows("SELECT end_tick, final_price, patterns_detected FROM games") == \
        [(100, 0.3, '["a"]')]
    assert store.rows("SELECT actual_end_tick FROM predictions") == [(100,)]
    assert store.rows("SELECT code, line_no FROM rejects") == [("conflict", 1)]


def test_a_resent_game_end_is_a_duplicate_and_merges_patterns(store):
    store.send(game_start(), game_end(at=100, patterns=["a"]))
    assert store.send(game_end(at=100, patterns=["b", "a"])) == []
    assert store.rows("SELECT end_tick, patterns_detected FROM games") == [(100, '["a","b"]')]


def test_conflicts_inside_one_batch_keep_the_first(store):
    rejections = store.send(game_start(), game_end(at=50), game_end(at=60))
    assert [(line, code) for line, code, _ in rejections] == [(3, "conflict")]
    assert store.rows("SELECT end_tick FROM games") == [(50,)]


@pytest.mark.parametrize("events, words", [
    ([game_start(tick=10), game_end(at=5)], "before the start tick 10"),
    ([game_end(at=5), game_start(tick=10)], "after the end tick 5"),
    ([game_end(at=5, startTick=10)], "before startTick 10"),
    ([prediction("g", 50, 40)], "before predicted_at_tick"),
])
def test_semantic_nonsense_is_a_bad_event_and_changes_nothing(store, events, words):
    rejections = store.send(*events)
    assert [code for _, code, _ in rejections] == ["bad_event"]
    assert words in rejections[0][2]
    assert store.rows("SELECT count(*) FROM predictions") == [(0,)]
    assert store.rows("SELECT count(*) FROM games WHERE start_tick IS NOT NULL "
                      "AND end_tick IS NOT NULL") == [(0,)]


def test_state_keeps_the_newest_write(store):
    store.send(state_write("k", {"v": 2}, ts=2000),
               state_write("k", {"v": 1}, ts=1000),
               state_write("other", [1, "x"]))
    assert store.rows("SELECT key, value FROM state ORDER BY key") == \
        [("k", '{"v":2}'), ("other", '[1,"x"]')]
    store.send(state_write("k", None, ts=3000))
    assert store.rows("SELECT value FROM state WHERE key = 'k'") == [("null",)]


# -- order independence -----------------------------------------------------------------------

RECEIPT_COLUMNS = {"updated_at", "id"}


def snapshot(store: Store) -> dict[str, list]:
    """Every table's rows without receipt-time columns, in a canonical order."""
    tables = {}
    for table in ("games", "predictions", "side_bets", "tick_samples", "state"):
        rows = tedstore.rows_as_dicts(store.conn.execute(f"SELECT * FROM {table}"))
        tables[table] = sorted(tuple(v for k, v in row.items() if k not in RECEIPT_COLUMNS)
                               for row in rows)
    return tables


def generated_game(rng: random.Random, number: int, trackers: int = 1) -> list[dict]:
    """A game's feed, and each tracker's predictions, side bets and state on it (two
    trackers, a production one and a shadow, each forward the feed too)."""
    game = f"h{number}"
    base = 1_763_800_000_000 + number * 1_000_000
    end_tick = rng.randint(5, 120)
    feed = [game_start(game, 0, 1.0, ts=base)]
    records = []
    names = [{}] if trackers == 1 else [{"tracker": "production"}, {"tracker": "shadow"}]
    for n in range(1, end_tick):
        feed.append(price_update(game, n, round(rng.uniform(0.5, 3.0), 1), ts=base + n * 250,
                                 features=FEATURES))
        for whose in names:
            if rng.random() < 0.15:
                records.append(prediction(game, n, n + rng.randint(0, 150), ts=base + n * 250,
                                          **whose))
            if rng.random() < 0.1:
                records.append(side_bet(game, n, rng.choice(["BET", "SKIP"]), ts=base + n * 250,
                                        **whose))
    feed.append(game_end(game, end_tick, 0.1, startTick=0, patterns=rng.sample("abcd", 2),
                         ts=base + end_tick * 250))
    records += [state_write(f"last-{number % 2}", number, ts=base + end_tick * 250, **whose)
                for whose in names]
    return feed * len(names) + records


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2 ** 32 - 1), games=st.integers(1, 4), batch=st.integers(1, 60),
       duplicates=st.floats(0, 0.5), trackers=st.integers(1, 2))
def test_shuffled_and_duplicated_streams_give_the_same_tables(tmp, seed, games, batch, duplicates,
                                                              trackers):
    """With one tracker, or two on the same feed."""
    rng = random.Random(seed)
    events = [e for number in range(games) for e in generated_game(rng, number, trackers)]
    example = Path(tempfile.mkdtemp(dir=tmp))               # hypothesis reuses `tmp`
    in_order = Store(example / "in-order.db", **LONG_RETENTION)
    assert in_order.send(*events, batch_size=len(events)) == []
    replayed = events + [e for e in events if rng.random() < duplicates]
    rng.shuffle(replayed)
    shuffled = Store(example / "shuffled.db", **LONG_RETENTION)
    assert shuffled.send(*replayed, batch_size=batch) == []
    assert snapshot(shuffled) == snapshot(in_order)
    # replaying everything once more changes nothing
    before = snapshot(shuffled)
    shuffled.send(*events, batch_size=batch)
    assert snapshot(shuffled) == before
    if trackers == 2:                                   # each tracker's records, all of them
        assert {row[0] for row in shuffled.rows("SELECT DISTINCT tracker FROM state")} == \
            {"production", "shadow"}
        assert shuffled.rows("SELECT count(*) FROM predictions")[0][0] == \
            sum(e["event"] == "prediction" for e in events)
    in_order.conn.close()
    shuffled.conn.close()


# -- timestamps -----------------------------------------------------------------------------------

def test_ts_forms_land_on_the_same_instant_in_the_database(daemon_factory):
    daemon = daemon_factory(env={"PREDICTION_RETENTION_DAYS": "36500"})
    forms = [1_763_800_215.25, 1_763_800_215_250, "2025-11-22T08:30:15.250Z",
             "2025-11-22T10:30:15.250+02:00", "2025-11-22T03:00:15.250-05:30"]
    conn = daemon.connect()
    conn.send(*[prediction("ts", i, 50, ts=ts) for i, ts in enumerate(forms)])
    assert conn.wait_ack(len(forms)) == []
    assert daemon.query("SELECT DISTINCT created_at FROM predictions") == \
        [("2025-11-22 08:30:15.250",)]


def test_receipt_time_compares_with_sqlite_now(daemon):
    conn = daemon.connect()
    conn.send(prediction("now", 1, 2))
    conn.wait_ack(1)
    assert daemon.query("SELECT count(*) FROM predictions "
                        "WHERE created_at > datetime('now', '-1 minute') "
                        "AND created_at <= strftime('%Y-%m-%d %H:%M:%f', 'now')") == [(1,)]


def test_every_stored_time_has_the_one_format(store):
    store.send(game_start(ts="2025-11-22T08:30:15Z"), prediction("g", 1, 9), game_end(at=9, ts=1.7e12))
    times = store.rows("SELECT created_at, started_at, ended_at, updated_at FROM games "
                       "UNION ALL SELECT created_at, resolved_at, created_at, created_at "
                       "FROM predictions")
    for value in [v for row in times for v in row]:
        assert len(value) == 23 and value[10] == " " and value[19] == "."


# -- the Reader -------------------------------------------------------------------------------------

def test_reader_restores_a_trackers_buffers_while_the_daemon_writes(daemon):
    """A tracker restarts: its deques refill from the Reader, newest last, bounded as before."""
    from collections import deque
    with tedstore.Client(daemon.socket) as client:
        for event in tedstore.simulate_events(8, seed=11):
            client.send(event)
        client.send(state_write("tracker.model", {"epoch": 12}))
        assert client.flush(30)
    predictions, bets, ticks = deque(maxlen=200), deque(maxlen=200), deque(maxlen=1200)
    with tedstore.Reader(daemon.socket) as reader:       # a tracker reads over the socket
        predictions.extend(reader.recent_predictions())
        bets.extend(reader.recent_side_bets())
        ticks.extend(reader.recent_ticks())
        assert reader.load_state("tracker.model") == {"epoch": 12}
        assert reader.load_state("missing", default=[]) == []
        last_game = ticks[-1]["game_id"]
        assert reader.game(last_game)["game"]["end_tick"] is not None
        assert reader.game("no-such-game") is None
        # the daemon keeps writing while the reader is open
        conn = daemon.connect()
        conn.send(prediction("later", 1, 2))                  # received now: the newest
        conn.wait_ack(1)
        assert reader.recent_predictions(1)[0]["game_id"] == "later"
    stored = daemon.query("SELECT count(*) FROM predictions")[0][0]
    assert len(predictions) == min(200, stored - 1)
    created = [p["created_at"] for p in predictions]
    assert created == sorted(created)
    assert {"predicted_end_tick", "actual_end_tick", "raw_error"} <= set(predictions[0])
    assert len(ticks) == daemon.query("SELECT min(count(*), 1200) FROM tick_samples")[0][0]
    assert all(b["actual_outcome"] in ("WON", "LOST") for b in bets)


def test_a_reader_on_the_file_refuses_to_write(daemon):
    with tedstore.Reader(db_path=daemon.db) as reader:
        with pytest.raises(apsw.ReadOnlyError):
            reader._idle[0].execute("DELETE FROM predictions")


def test_reader_of_a_missing_database_says_what_to_do(tmp):
    with pytest.raises(tedstore.StoreError, match="tedstore init"):
        tedstore.Reader(db_path=str(tmp / "missing.db"))


def test_reader_without_a_daemon_says_what_to_do(tmp):
    with pytest.raises(tedstore.ProtocolError, match="cannot reach tedstore .*tedstore serve"):
        tedstore.Reader(str(tmp / "nobody.sock")).recent_predictions()


# -- schema upgrades -------------------------------------------------------------------------------

def test_schema_steps_are_forward_and_numbered():
    versions = [version for version, _ in tedstore.schema_steps()]
    assert versions == list(range(1, len(versions) + 1)) and tedstore.schema_version() >= 2


def test_a_version_1_database_is_upgraded_without_losing_rows(tmp):
    """tests/fixtures/schema_v1.sql is a dump of a database made by schema version 1."""
    path = tmp / "old.db"
    legacy = sqlite3.connect(path)
    legacy.executescript((FIXTURES / "schema_v1.sql").read_text())
    legacy.close()
    before = {table: tedstore_count(path, table) for table in
              ("games", "predictions", "side_bets", "tick_samples", "state", "rejects")}
    assert tedstore_version(path) == 1 and min(before.values()) > 0
    conn = tedstore.open_store(str(path))
    assert conn.pragma("user_version") == tedstore.schema_version()
    conn.close()
    assert {table: tedstore_count(path, table) for table in before} == before
    assert tedstore_count(path, "game_summary") == before["games"]
    store = Store(path)
    store.send(prediction("upgraded", 1, 50), game_end("upgraded", 60))
    assert store.rows("SELECT raw_error FROM predictions WHERE game_id = 'upgraded'") == [(-10,)]


def test_a_database_from_a_newer_tedstore_is_refused(tmp):
    path = str(tmp / "future.db")
    conn = apsw.Connection(path)
    conn.pragma("user_version", 99)
    conn.close()
    with pytest.raises(tedstore.StoreError, match="newer than this tedstore"):
        tedstore.open_store(path)


def test_schema_sql_runs_as_is_in_the_sqlite3_cli_twice(tmp):
    import subprocess
    schema = Path(tedstore.schema_path()).read_text()
    for _ in range(2):
        subprocess.run(["sqlite3", str(tmp / "cli.db")], input=schema, text=True, check=True)
    assert tedstore_version(tmp / "cli.db") == tedstore.schema_version()


def tedstore_count(path, table: str) -> int:
    return apsw.Connection(str(path)).execute(f"SELECT count(*) FROM {table}").get


def tedstore_version(path) -> int:
    return apsw.Connection(str(path)).pragma("user_version")
