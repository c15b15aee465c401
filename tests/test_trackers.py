"""Many trackers, many models (SPEC v3): a production tracker and a shadow candidate on one
feed keep every record of their own, every query narrows to a tracker or a model and says
what the raw rows say, and hosts merge without losing a row."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import apsw
import pytest

import tedstore
from conftest import (FIRST_HOUR, NOW, Play, Store, close, game_end, game_start, prediction, run_cli, side_bet, state_write)

FIXTURES = Path(__file__).parent / "fixtures"
TRACKERS = (("production", "v2.1.0"), ("shadow", "v3.0.0"))


def rows(db, table: str) -> list[dict]:
    conn = apsw.Connection(str(db), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return tedstore.rows_as_dicts(conn.execute(f"SELECT * FROM {table} ORDER BY rowid"))
    finally:
        conn.close()


# -- the schema step ------------------------------------------------------------------------

def test_a_version_3_database_is_upgraded_without_losing_or_changing_a_row(tmp):
    """tests/fixtures/schema_v3.sql is a dump of a database made by schema version 3, with
    rows in every table; after the upgrade every row is there, the same (but for a game's
    prediction_accuracy, now a percentage), its tracker 'default', and a second tracker's
    records with the same keys fit beside them."""
    path = tmp / "v3.db"
    legacy = sqlite3.connect(path)
    legacy.executescript((FIXTURES / "schema_v3.sql").read_text())
    legacy.close()
    tables = ("games", "predictions", "side_bets", "tick_samples", "metrics_hourly",
              "metrics_daily", "state", "rejects", "jobs")
    before = {table: rows(path, table) for table in tables}
    assert all(before.values())
    conn = tedstore.open_store(str(path))
    assert conn.pragma("user_version") == tedstore.schema_version()
    assert tedstore.schema_differences(conn) == []
    conn.close()
    after = {table: rows(path, table) for table in tables}
    for game in before["games"]:                # a share 0..1 becomes a percentage
        if game["prediction_accuracy"] is not None:
            game["prediction_accuracy"] *= 100.0
    assert any(game["prediction_accuracy"] for game in before["games"])
    for table in tables:
        assert [{k: v for k, v in row.items() if k != "tracker"} for row in after[table]] \
            == before[table], table
        assert all(row.get("tracker", "default") == "default" for row in after[table]), table
    store = Store(path)
    old = before["predictions"][0]
    assert store.send(prediction(old["game_id"], old["predicted_at_tick"], 99,
                                 model_version=old["model_version"], tracker="shadow"),
                      side_bet(before["side_bets"][0]["game_id"],
                               before["side_bets"][0]["placed_at_tick"], tracker="shadow"),
                      state_write("tracker.model", "shadow's", tracker="shadow")) == []
    assert store.rows("SELECT tracker, count(*) FROM predictions WHERE game_id = ? AND "
                      "predicted_at_tick = ? GROUP BY tracker ORDER BY 1",
                      (old["game_id"], old["predicted_at_tick"])) == [("default", 1), ("shadow", 1)]
    assert store.rows("SELECT tracker, value FROM state WHERE key = 'tracker.model' ORDER BY 1")\
        == [("default", '{"weights":[1,2]}'), ("shadow", '"shadow\'s"')]
    store.conn.close()


# -- two trackers on one feed, one daemon ------------------------------------------------------

def test_two_trackers_on_one_feed_keep_every_record_of_their_own(daemon):
    """The same game, and the same keys, from a production tracker and a shadow: every
    prediction, side bet and state value kept apart; the feed's events stored once; every
    resend a duplicate that changes nothing."""
    feed = [game_start("g"), game_end("g", at=100)]
    lines = {name: feed + [prediction("g", 10, 90 + n, tracker=name, model_version=model),
                           side_bet("g", 80, tracker=name),
                           state_write("k", {"who": name}, tracker=name, ts=NOW - 60)]
             for n, (name, model) in enumerate(TRACKERS)}
    production, shadow = daemon.connect(), daemon.connect()
    production.send(*lines["production"])
    assert production.wait_ack(5) == []
    shadow.send(*lines["shadow"])
    assert shadow.wait_ack(5) == []
    for conn, name in ((production, "production"), (shadow, "shadow")):
        conn.send(*lines[name])                            # a reconnecting tracker resends
        conn.wait_ack(10)
    assert daemon.query("SELECT count(*) FROM games") == [(1,)]
    assert daemon.query("SELECT tracker, model_version, raw_error FROM predictions ORDER BY 1")\
        == [("production", "v2.1.0", -10), ("shadow", "v3.0.0", -9)]
    assert daemon.query("SELECT tracker, actual_outcome FROM side_bets ORDER BY 1") == \
        [("production", "WON"), ("shadow", "WON")]
    assert daemon.query("SELECT tracker, value FROM state ORDER BY 1") == \
        [("production", '{"who":"production"}'), ("shadow", '{"who":"shadow"}')]
    status = tedstore.request(daemon.socket, "status")
    counts = status["status"]
    assert counts["events"] == {"gameStart": 1, "gameEnd": 1, "prediction": 2, "sideBet": 2,
                                "state": 2}
    assert counts["duplicates"] == {"gameStart": 3, "gameEnd": 3, "prediction": 2,
                                    "sideBet": 2, "state": 2}
    with tedstore.Reader(daemon.socket, tracker="shadow") as reader:   # the shadow's warm start
        assert [p["tracker"] for p in reader.recent_predictions()] == ["shadow"]
        assert [b["tracker"] for b in reader.recent_side_bets()] == ["shadow"]
        assert reader.load_state("k") == {"who": "shadow"}
    with tedstore.Reader(daemon.socket) as reader:
        assert reader.load_state("k", "none of the default's") == "none of the default's"
        assert len(reader.recent_predictions()) == 2


def test_a_client_names_its_tracker_on_every_record_it_sends(daemon, monkeypatch):
    with tedstore.Client(daemon.socket, tracker="shadow") as client:
        client.send(game_start("c"))
        client.send(prediction("c", 1, 9))
        client.send(tedstore.SideBet("c", 1, 0.2, 0.2, 0.6, "BET"))
        client.send(state_write("k", 1, tracker="named"))        # a record that names one
        assert client.flush(10)
    monkeypatch.setenv("TEDSTORE_TRACKER", "from-the-environment")
    with tedstore.Client(daemon.socket) as client:
        client.send(prediction("c", 2, 9))
        assert client.flush(10)
    assert daemon.query("SELECT tracker FROM predictions ORDER BY predicted_at_tick") == \
        [("shadow",), ("from-the-environment",)]
    assert daemon.query("SELECT tracker FROM side_bets") == [("shadow",)]
    assert daemon.query("SELECT tracker FROM state") == [("named",)]
    monkeypatch.setenv("TEDSTORE_TRACKER", "no spaces allowed")
    with pytest.raises(tedstore.ConfigError, match="TEDSTORE_TRACKER"):
        tedstore.Client(daemon.socket)


@pytest.mark.parametrize("name", ["", "x" * 65, "has space", "slash/", "ünicode"])
def test_a_tracker_name_outside_the_rules_is_a_bad_event(store, name):
    [(line, code, error)] = store.send(prediction("g", 1, 9, tracker=name))
    assert code == "bad_event" and "tracker" in error


# -- every query, narrowed to a tracker or a model, against the raw rows ----------------------

@pytest.fixture(scope="module")
def shadowed(tmp_path_factory):
    """A production tracker and a shadow candidate on the same 48 games, rolled up."""
    play = Play(seed=11, trackers=TRACKERS)
    store = Store(tmp_path_factory.mktemp("trackers") / "t.db")
    assert store.send(*play.events) == []
    store.roll_up()
    with store.reading() as reader:
        yield play, store, reader


def without_period(answer: dict) -> dict:
    return {k: v for k, v in answer.items() if k not in ("since", "until", "period_hours")}


FILTERS = [{}, {"tracker": "production"}, {"tracker": "shadow"}, {"model": "v3.0.0"},
           {"tracker": "production", "model": "v2.1.0"}, {"tracker": "shadow", "model": "v2.1.0"}]


@pytest.mark.parametrize("filters", FILTERS, ids=lambda f: "-".join(f.values()) or "everyone")
def test_performance_of_a_tracker_or_model_equals_its_raw_rows(shadowed, filters):
    play, _, reader = shadowed
    long_ago = FIRST_HOUR - tedstore.LONG_WINDOW_DAYS * 86400       # read by error, not by time
    for since, until in ((FIRST_HOUR, NOW), (FIRST_HOUR + 3600, FIRST_HOUR + 7200),
                         (long_ago, NOW), (long_ago, FIRST_HOUR + 7200)):
        answer = reader.performance(since=since, until=until, **filters)
        truth = play.performance(since, until, **filters)
        assert without_period(answer) == close(truth), filters


def test_performance_by_tracker_and_by_model_is_each_ones_raw_rows(shadowed):
    play, _, reader = shadowed
    by_tracker = reader.performance(since=FIRST_HOUR, until=NOW, by="tracker")
    assert by_tracker["by"] == "tracker"
    assert [g["tracker"] for g in by_tracker["groups"]] == ["production", "shadow"]
    for group in by_tracker["groups"]:
        truth = play.performance(FIRST_HOUR, NOW, tracker=group["tracker"])
        assert group["prediction_metrics"] == close(truth["prediction_metrics"])
        assert group["sidebet_metrics"] == close(truth["sidebet_metrics"])
    by_model = reader.performance(since=FIRST_HOUR, until=NOW, by="model", tracker="shadow")
    assert [g["model_version"] for g in by_model["groups"]] == ["v3.0.0"]
    assert by_model["groups"][0]["sidebet_metrics"] is None            # side bets: no model
    assert by_model["groups"][0]["prediction_metrics"] == close(
        play.performance(FIRST_HOUR, NOW, tracker="shadow", model="v3.0.0")["prediction_metrics"])


def test_trackers_lists_who_sent_what(shadowed):
    play, _, reader = shadowed
    answer = reader.trackers(since=FIRST_HOUR, until=NOW)
    expected = []
    for name, model in TRACKERS:
        times = [tedstore.utc_text(row["ts"]) for row in play.predictions + play.bets
                 if row["tracker"] == name]
        expected.append({"tracker": name, "models": [model],
                         "predictions": sum(p["tracker"] == name for p in play.predictions),
                         "side_bets": sum(b["tracker"] == name for b in play.bets),
                         "first_seen": tedstore.answer_time(min(times)),
                         "last_seen": tedstore.answer_time(max(times))})
    assert answer["trackers"] == expected
    assert reader.trackers(since=FIRST_HOUR, until=NOW, tracker="shadow")["trackers"] == \
        expected[1:]


def test_the_hourly_rollup_keeps_one_row_for_everyone_and_one_per_tracker_and_model(shadowed):
    play, store, reader = shadowed
    hours = store.rows("SELECT hour_start, count(*) FROM metrics_hourly GROUP BY 1 "
                       "HAVING count(*) > 1")
    assert hours == []                                  # one row per hour, everyone's
    for filters in FILTERS:
        answer = reader.metrics(since=FIRST_HOUR, until=FIRST_HOUR + 6 * 3600, **filters)
        made = play.performance(FIRST_HOUR, NOW, **filters)["prediction_metrics"]
        assert len(answer["hours"]) == (6 if made["predictions_made"] else 0), filters
        for row in answer["hours"]:
            hour = tedstore.text_epoch(row["hour_start"])
            truth = play.performance(hour, hour + 3600, **filters)
            p, s = truth["prediction_metrics"], truth["sidebet_metrics"]
            assert (row["predictions_made"], row["median_e40"], row["within_2_windows"],
                    row["bets_won"], row["bets_lost"], row["roi_percentage"]) == pytest.approx(
                (p["predictions_made"], p["median_e40"], p["within_2_windows"],
                 s["bets_won"], s["bets_lost"], s["roi_percentage"])), (filters, row)
            assert row["hour_end"] == tedstore.answer_time(tedstore.utc_text(hour + 3600))
    trends = reader.trends(since=FIRST_HOUR, until=FIRST_HOUR + 6 * 3600, tracker="shadow")
    assert [h["predictions_made"] for h in trends["hourly"]] == [
        play.performance(FIRST_HOUR + n * 3600, FIRST_HOUR + (n + 1) * 3600,
                         tracker="shadow")["prediction_metrics"]["predictions_made"]
        for n in range(6)]


def test_the_other_queries_narrow_to_a_tracker(shadowed):
    play, _, reader = shadowed
    game = next(g for g in play.games if g["ended"] and g["predictions"])
    whole = reader.game(game["id"])
    shadow = reader.ask("game", id=game["id"], tracker="shadow")
    assert {p["tracker"] for p in whole["predictions"]} == {"production", "shadow"}
    assert {p["tracker"] for p in shadow["predictions"]} == {"shadow"}
    assert {b["tracker"] for b in shadow["side_bets"]} <= {"shadow"}
    assert shadow["game"] == whole["game"] and shadow["ticks"] == whole["ticks"]
    listed = reader.games(since=FIRST_HOUR, until=NOW, tracker="shadow", limit=100)["games"]
    summary = next(g for g in listed if g["game_id"] == game["id"])
    errors = [p["error"] for p in game["predictions"] if p["tracker"] == "shadow"]
    assert summary["predictions"] == len(errors)
    assert summary["mean_absolute_error"] == pytest.approx(sum(map(abs, errors)) / len(errors))
    assert summary["prediction_accuracy"] == pytest.approx(
        100 * sum(abs(e) <= 40 for e in errors) / len(errors))
    assert [p["tracker"] for p in reader.ask("recent_predictions", n=5, model="v3.0.0")["rows"]] \
        == ["shadow"] * 5
    for name, _ in TRACKERS:
        assert reader.ask("state", key="tracker.model", tracker=name)["value"] == \
            play.state[name, "tracker.model"]
    patterns = reader.patterns(since=FIRST_HOUR, until=NOW, tracker="shadow")
    ended = [g for g in play.games if g["ended"]]
    for row in patterns["patterns"]:
        games = [g for g in ended if row["pattern"] in g["patterns"]]
        accuracies = [100 * sum(abs(p["error"]) <= 40 for p in g["predictions"]
                          if p["tracker"] == "shadow") /
                      sum(p["tracker"] == "shadow" for p in g["predictions"])
                      for g in games if any(p["tracker"] == "shadow" for p in g["predictions"])]
        assert row["avg_prediction_accuracy"] == pytest.approx(
            sum(accuracies) / len(accuracies)), row["pattern"]


def test_every_query_takes_a_tracker_and_those_of_predictions_a_model(shadowed):
    play, _, reader = shadowed
    game = play.games[0]["id"]
    required = {"game": {"id": game}, "state": {"key": "tracker.model"}}
    for name in tedstore.QUERIES:
        reader.ask(name, tracker="shadow", **required.get(name, {}))   # QueryRejected if not
    for name in ("game", "games", "metrics", "performance", "trends", "patterns",
                 "recent_predictions"):
        reader.ask(name, model="v3.0.0", **required.get(name, {}))
    with pytest.raises(tedstore.QueryRejected, match="model"):
        reader.ask("recent_side_bets", model="v3.0.0")                  # side bets have none
    assert reader.ask("recent_ticks", n=50, tracker="shadow") == reader.ask("recent_ticks", n=50)


def test_the_read_commands_take_tracker_and_model(shadowed):
    play, store, _ = shadowed
    done = run_cli("performance", "--db", store.path, "--since", tedstore.utc_text(FIRST_HOUR),
                   "--by", "tracker", "--json")
    assert done.returncode == 0, done.stderr
    groups = json.loads(done.stdout)["groups"]
    assert [g["tracker"] for g in groups] == ["production", "shadow"]
    table = run_cli("performance", "--db", store.path, "--since", tedstore.utc_text(FIRST_HOUR),
                    "--by", "model")
    assert table.returncode == 0 and "v2.1.0" in table.stdout and "v3.0.0" in table.stdout
    narrowed = json.loads(run_cli("games", "--db", store.path, "--since",
                                  tedstore.utc_text(FIRST_HOUR), "--tracker", "shadow",
                                  "--model", "v3.0.0", "--json").stdout)
    assert narrowed["games"]
    listed = run_cli("trackers", "--db", store.path, "--since", tedstore.utc_text(FIRST_HOUR))
    assert listed.returncode == 0 and "production" in listed.stdout and "v3.0.0" in listed.stdout
    bad = run_cli("metrics", "--db", store.path, "--tracker", "no spaces")
    assert bad.returncode == 1 and "tracker" in bad.stderr and "Traceback" not in bad.stderr


# -- hosts merged into one database -------------------------------------------------------------

def record_rows(db) -> dict[str, list[tuple]]:
    """Every record row, as the store keeps it (receipt-time columns and row ids aside; and
    a game's aggregates of the records of every tracker, which a merge adds up)."""
    skip = {"id", "updated_at", "had_predictions", "prediction_accuracy", "side_bets_placed"}
    found = {}
    for table in ("games", "predictions", "side_bets", "tick_samples", "state"):
        found[table] = sorted(tuple(v for k, v in row.items() if k not in skip)
                              for row in rows(db, table))
    return found


def test_three_hosts_over_the_same_games_merge_without_losing_a_row(tmp):
    """Three hosts, each a tracker named `default` on the same feed: exported, imported
    into one central database with --tracker, every record of every host is there."""
    play = Play(seed=21, games=30)
    hosts = []
    for n in range(3):
        host = Store(tmp / f"host-{n}.db")
        events = [dict(event) for event in play.events]
        for event in events:                              # each host's own predictions
            if event["event"] == "prediction":
                event["predicted_end_tick"] += n
            if event["event"] == "state":
                event["value"] = {"host": n}
        assert host.send(*events) == []
        host.conn.close()
        done = run_cli("export", "--events", "--db", host.path, "-o", str(tmp / f"host-{n}.ndjson"))
        assert done.returncode == 0, done.stderr
        hosts.append(host.path)
    central = str(tmp / "central.db")
    assert run_cli("init", "--db", central).returncode == 0
    for n in range(3):
        done = run_cli("import", "--db", central, "--tracker", f"host-{n}",
                       str(tmp / f"host-{n}.ndjson"))
        assert done.returncode == 0, done.stderr
    merged = record_rows(central)
    for n, path in enumerate(hosts):
        alone = record_rows(path)
        for table in ("predictions", "side_bets", "state"):
            mine = [row for row in merged[table] if f"host-{n}" in row]
            assert sorted(tuple(f"host-{n}" if value == "default" else value for value in row)
                          for row in alone[table]) == mine, (n, table)
        assert alone["games"] == merged["games"] and alone["tick_samples"] == merged["tick_samples"]
    assert len(merged["predictions"]) == 3 * len(play.predictions)


def test_the_report_compares_trackers_and_models_and_narrows_to_one(shadowed, tmp):
    play, store, reader = shadowed
    since = tedstore.utc_text(FIRST_HOUR)
    done = run_cli("report", "--db", store.path, "--since", since, "-o", str(tmp / "all.html"))
    assert done.returncode == 0, done.stderr
    page = (tmp / "all.html").read_text()
    assert "<h2>Trackers and models side by side</h2>" in page
    table = page[page.index("side by side</h2>"):]
    table = table[:table.index("</table>")]
    cells = [found for row in re.findall(r"<tr>(.*?)</tr>", table)
             if (found := re.findall(r"<td[^>]*>(.*?)</td>", row))]
    by = reader.performance(since=FIRST_HOUR, until=NOW, by="tracker")["groups"]
    for group in by:
        row = next(c for c in cells if c[:2] == ["tracker", group["tracker"]])
        assert row[2] == f"{group['prediction_metrics']['predictions_made']:,}"
        settled = group["sidebet_metrics"]["bets_won"] + group["sidebet_metrics"]["bets_lost"]
        assert row[7] == f"{settled:,}"
    assert {c[1] for c in cells if c[0] == "model"} == {"v2.1.0", "v3.0.0"}
    done = run_cli("report", "--db", store.path, "--since", since, "--tracker", "shadow",
                   "-o", str(tmp / "shadow.html"))
    assert done.returncode == 0, done.stderr
    shadow = (tmp / "shadow.html").read_text()
    assert "tracker shadow only" in shadow and "side by side" not in shadow
    made = play.performance(FIRST_HOUR, NOW, tracker="shadow")["prediction_metrics"]
    assert f"<b>{made['predictions_made']:,}</b><span>predictions" in shadow
