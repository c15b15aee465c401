"""The read API: every query's answer against values computed in plain Python from the
events themselves; the socket op, its limits, and the Reader; the read commands."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import apsw
import click
import msgspec
import pytest

import tedstore
from conftest import (Conn, FIRST_HOUR, PATTERNS, Play, ROOT, Store, answered_at, answered_row,
                      clean_env, game_end, prediction, run_cli, state_write, stored, wait_for)

@pytest.fixture(scope="module")
def played(tmp_path_factory):
    """The play stored and rolled up, with a few rejects and a state key."""
    play = Play()
    store = Store(tmp_path_factory.mktemp("read") / "read.db")
    assert store.send(*play.events) == []
    store.send(b"{oops", b'{"event":"prediction","game_id":"\xff"}')
    store.send(state_write("tracker.model", {"weights": [1, 2]}))
    store.roll_up()
    with store.reading() as reader:
        yield play, store, reader


def without_window(answer: dict) -> dict:
    return {key: value for key, value in answer.items() if key not in ("since", "until")}


# -- answers made for web frontends: RFC 3339 times, percentages ----------------------------

RFC_3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
LOOKS_LIKE_A_TIME = re.compile(r"\d{4}-\d\d-\d\d[ T]\d")
SHARES = {"within_1_window", "within_2_windows", "within_3_windows", "prediction_accuracy",
          "avg_prediction_accuracy", "base_rate", "mean_probability", "observed_rate",
          "coverage", "mean_confidence"}
THEIR_OWN = {"value", "raw", "error"}        # a tracker's state, a refused line: as they came


def leaves(value, key=None):
    """(key, value) of every number and string in an answer, a tracker's own data aside."""
    if isinstance(value, dict):
        for name, inner in value.items():
            if name not in THEIR_OWN:
                yield from leaves(inner, name)
    elif isinstance(value, list):
        for inner in value:
            yield from leaves(inner, key)
    else:
        yield key, value


def test_every_answer_gives_times_in_rfc_3339_and_shares_as_percentages(played):
    """Every query's answer, walked to its leaves: whatever looks like a time is RFC 3339
    UTC with milliseconds and a Z, which `new Date()` reads alike in every browser; every
    share is a percentage (0..100, and some above 1, so none is a fraction)."""
    play, _, reader = played
    windowless = {"game": {"id": play.games[0]["id"]}, "state": {"key": "tracker.model"},
                  "recent_predictions": {}, "recent_side_bets": {}, "recent_ticks": {}}
    times, shares = 0, {}
    for name in tedstore.QUERIES:
        answer = reader.ask(name, **windowless.get(name, {"days": 30}))
        for key, value in leaves(answer):
            if isinstance(value, str) and LOOKS_LIKE_A_TIME.match(value):
                assert RFC_3339.fullmatch(value), (name, key, value)
                times += 1
            if key in SHARES and value is not None:
                assert 0 <= value <= 100, (name, key, value)
                shares[key] = max(shares.get(key, 0), value)
    assert times > 100
    assert set(shares) == SHARES and all(top > 1 for top in shares.values()), shares
    window = reader.performance(since="2026-11-20T10:00:00.000Z", until="2026-11-21 10:00")
    assert (window["since"], window["until"]) == ("2026-11-20T10:00:00.000Z",
                                                  "2026-11-21T10:00:00.000Z")


# -- performance and the hourly rollup ------------------------------------------------------

def test_performance_over_one_completed_hour_equals_its_rollup_and_the_events(played):
    play, store, reader = played
    for hour in range(FIRST_HOUR, FIRST_HOUR + 6 * 3600, 3600):
        answer = reader.performance(since=hour, until=hour + 3600)
        row = store.one("SELECT * FROM metrics_hourly WHERE hour_start = ?",
                        (tedstore.utc_text(hour),))
        p, s = answer["prediction_metrics"], answer["sidebet_metrics"]
        for column, value in [("predictions_made", p["predictions_made"]),
                              ("median_e40", p["median_e40"]),
                              ("mean_absolute_error", p["mean_absolute_error"]),
                              ("within_1_window", p["within_1_window"]),
                              ("within_2_windows", p["within_2_windows"]),
                              ("within_3_windows", p["within_3_windows"]),
                              ("bets_won", s["bets_won"]), ("bets_lost", s["bets_lost"]),
                              ("total_ev", s["total_ev"]),
                              ("roi_percentage", s["roi_percentage"]),
                              ("games_analyzed", answer["games_analyzed"])]:
            assert value == row[column], (hour, column)
        expected = play.performance(hour, hour + 3600)
        assert s.pop("total_ev") == pytest.approx(expected["sidebet_metrics"].pop("total_ev"))
        assert without_window(answer) == {"period_hours": 1.0, **expected}


def test_performance_over_several_hours_takes_the_true_median_of_all(played):
    play, _, reader = played
    since, until = FIRST_HOUR + 1800, FIRST_HOUR + 5 * 3600 + 900      # not on hour bounds
    answer = reader.performance(since=since, until=until)
    expected = play.performance(since, until)
    assert answer["sidebet_metrics"].pop("total_ev") == \
        pytest.approx(expected["sidebet_metrics"].pop("total_ev"))
    assert answer["period_hours"] == pytest.approx((until - since) / 3600)
    del answer["period_hours"]
    assert without_window(answer) == expected
    # not the median of the hourly medians
    hourly = [h["median_e40"] for h in reader.metrics(since=since, until=until)["hours"]
              if h["median_e40"] is not None]
    assert answer["prediction_metrics"]["median_e40"] != statistics.median(hourly)


def test_performance_by_type_and_over_an_empty_window(played):
    _, _, reader = played
    assert reader.performance(hours=24, type="predictions")["sidebet_metrics"] is None
    assert reader.performance(hours=24, type="sidebets")["prediction_metrics"] is None
    empty = reader.performance(since="2020-01-01", until="2020-01-02")
    assert empty["games_analyzed"] == 0
    assert empty["prediction_metrics"] == {
        "predictions_made": 0, "resolved": 0, "median_e40": None, "mean_absolute_error": None,
        "within_1_window": None, "within_2_windows": None, "within_3_windows": None}
    assert empty["sidebet_metrics"] == {"recommended": 0, "positive_ev": 0, "bets_won": 0,
                                        "bets_lost": 0, "pending": 0, "total_ev": 0.0,
                                        "roi_percentage": None}


# -- trends, patterns, metrics -------------------------------------------------------------

def test_trends_are_least_squares_over_the_hourly_rows(played):
    _, store, reader = played
    answer = reader.trends(days=1)
    since = tedstore.text_epoch(answer["since"])
    rows = store.rows("SELECT hour_start, median_e40, within_2_windows, roi_percentage "
                      "FROM metrics_hourly WHERE hour_start >= ? ORDER BY hour_start",
                      (stored(answer["since"]),))
    assert [stored(h["hour_start"]) for h in answer["hourly"]] == [r[0] for r in rows]
    for name, position in (("e40", 1), ("accuracy", 2), ("sidebet_roi", 3)):
        points = [((tedstore.text_epoch(r[0]) - since) / 86400, r[position]) for r in rows
                  if r[position] is not None]
        trend = answer["trends"][name]
        assert trend["n"] == len(points) >= 2
        assert trend["mean"] == pytest.approx(statistics.mean(v for _, v in points))
        assert trend["last"] == points[-1][1]
        expected = statistics.linear_regression([x for x, _ in points], [v for _, v in points])
        assert trend["slope_per_day"] == pytest.approx(expected.slope, rel=1e-6)


def test_a_trend_needs_two_hours_for_a_slope(played):
    _, _, reader = played
    trend = reader.trends(days=1 / 48)["trends"]["e40"]            # the last half hour
    assert trend["n"] <= 1 and trend["slope_per_day"] is None


def test_patterns_count_each_game_once_per_pattern(played):
    play, store, reader = played
    answer = reader.patterns(days=1)
    ended = sorted((g for g in play.games if g["ended"] is not None),
                   key=lambda g: (-round(g["ended"], 3), g["id"]))
    accuracy = dict(store.rows("SELECT game_id, prediction_accuracy FROM games"))
    expected = []
    for pattern in PATTERNS:
        tagged = [g for g in ended if pattern in g["patterns"]]
        if tagged:
            expected.append({
                "pattern": pattern, "games": len(tagged),
                "avg_prediction_accuracy": pytest.approx(statistics.mean(
                    accuracy[g["id"]] for g in tagged if accuracy[g["id"]] is not None)),
                "avg_duration_ticks": pytest.approx(statistics.mean(g["end_tick"] for g in tagged)),
                "recent_game_ids": [g["id"] for g in tagged[:10]]})
    expected.sort(key=lambda p: (-p["games"], p["pattern"]))
    assert answer["patterns"] == expected
    assert answer["total_patterns_detected"] == sum(p["games"] for p in expected)


def test_a_pattern_listed_twice_in_a_stored_game_counts_once(store):
    """As a version-1 database, or a hand edit, may hold it: unsorted, with a repeat."""
    now = time.time()
    store.send(game_end("g1", at=90, final=0.5, patterns=["alpha"], ts=now - 60),
               game_end("g2", at=90, final=0.5, patterns=["beta"], ts=now - 30))
    store.conn.execute("""UPDATE games SET patterns_detected = '["beta","alpha","beta"]'
                          WHERE game_id = 'g1'""")
    with tedstore.Reader(db_path=store.path) as reader:
        answer = reader.patterns(days=1)
    assert [(p["pattern"], p["games"], p["recent_game_ids"]) for p in answer["patterns"]] == \
        [("beta", 2, ["g2", "g1"]), ("alpha", 1, ["g1"])]
    assert answer["total_patterns_detected"] == 3


def test_metrics_are_the_hourly_rows_of_the_window(played):
    _, store, reader = played
    answer = reader.metrics(since=FIRST_HOUR + 3600, until=FIRST_HOUR + 4 * 3600)
    assert [h["hour_start"] for h in answer["hours"]] == \
        [answered_at(FIRST_HOUR + n * 3600) for n in (1, 2, 3)]
    assert answer["hours"][0] == answered_row(store.one(
        "SELECT * FROM metrics_hourly WHERE hour_start = ?", (tedstore.utc_text(FIRST_HOUR + 3600),)))
    assert reader.metrics(since="2020-01-01", until="2020-01-02")["hours"] == []


# -- games, a game, rows ------------------------------------------------------------------------

def test_a_game_with_its_predictions_side_bets_and_samples(played):
    play, store, reader = played
    game = play.games[0]
    answer = reader.game(game["id"])
    row = store.one("SELECT * FROM games WHERE game_id = ?", (game["id"],))
    assert answer["game"] == {**answered_row(row), "patterns_detected": game["patterns"],
                              "had_predictions": True}
    assert [p["predicted_at_tick"] for p in answer["predictions"]] == \
        list(range(20, game["end_tick"], 40))
    assert [p["raw_error"] for p in answer["predictions"]] == \
        [p["error"] for p in game["predictions"]]
    assert {p["epr_active"] for p in answer["predictions"]} == {True, False}
    assert [b["placed_at_tick"] for b in answer["side_bets"]] == sorted(
        b["placed_at_tick"] for b in answer["side_bets"])
    assert answer["ticks"] == {"samples": 0, "first_tick": None, "last_tick": None}
    assert reader.game("no such game") is None
    with pytest.raises(tedstore.QueryRejected, match="no game 'no such game'"):
        reader.ask("game", id="no such game")


def test_games_newest_ended_first_with_a_limit_and_a_pattern(played):
    play, _, reader = played
    ended = sorted((g for g in play.games if g["ended"] is not None),
                   key=lambda g: (-round(g["ended"], 3), g["id"]))
    answer = reader.games(hours=24, limit=5)
    assert [g["game_id"] for g in answer["games"]] == [g["id"] for g in ended[:5]]
    assert set(answer["games"][0]) == set(tedstore.COLUMNS["game_summary"])
    beta = reader.games(hours=24, pattern="beta", limit=1000)["games"]
    assert [g["game_id"] for g in beta] == [g["id"] for g in ended if "beta" in g["patterns"]]
    assert all("beta" in g["patterns_detected"] for g in beta)
    assert reader.games(since="2020-01-01", until="2020-01-02")["games"] == []


def test_recent_rows_are_the_newest_oldest_first(played):
    play, store, reader = played
    newest = sorted(play.predictions, key=lambda p: p["ts"])[-7:]
    rows = reader.recent_predictions(7)
    assert [(r["game_id"], r["created_at"]) for r in rows] == \
        [(p["game"], answered_at(p["ts"])) for p in newest]
    assert len(reader.recent_side_bets()) == min(200, len(play.bets))
    assert reader.recent_ticks() == []


def test_state_and_rejects(played):
    _, _, reader = played
    assert reader.load_state("tracker.model") == {"weights": [1, 2]}
    assert reader.load_state("missing", default=[]) == []
    state = reader.ask("state", key="tracker.model")
    assert state["found"] is True and state["updated_at"]
    rejects = reader.rejects(hours=1)["rejects"]
    assert [(r["code"], r["raw"]) for r in rejects] == [
        ("bad_utf8", '{"event":"prediction","game_id":"\ufffd"}'), ("bad_json", "{oops")]


@pytest.mark.parametrize("name, params, words", [
    ("games", {"hours": -1}, "hours"),
    ("games", {"limit": 0}, "limit"),
    ("games", {"limit": tedstore.MAX_ROWS + 1}, "limit"),
    ("games", {"hours": 2, "since": "2026-01-01"}, "one of them"),
    ("games", {"since": "2026-02-01", "until": "2026-01-01"}, "is not before"),
    ("games", {"since": "yesterday"}, "is not a time"),
    ("games", {"colour": "red"}, "unknown parameter"),
    ("performance", {"type": "everything"}, "type"),
    ("game", {}, "missing parameter"),
    ("trends", {"days": 0}, "days"),
    ("recent_ticks", {"n": "many"}, "n"),
    ("report", {}, "unknown query 'report'"),
])
def test_bad_parameters_are_bad_queries(played, name, params, words):
    _, _, reader = played
    with pytest.raises(tedstore.QueryRejected, match=words):
        reader.ask(name, **params)


def test_every_column_list_matches_the_schema(played):
    _, store, _ = played
    for source, columns in tedstore.COLUMNS.items():
        assert columns == tuple(row[1] for row in store.rows(f"PRAGMA table_info({source})"))


# -- the socket ---------------------------------------------------------------------------------

def test_the_socket_answers_what_the_file_answers(daemon):
    play = Play(seed=3, games=12)
    conn = daemon.connect()
    conn.send(*play.events)
    conn.wait_ack(len(play.events))
    asked = [("games", {"hours": 24}), ("performance", {"hours": 24}), ("patterns", {"days": 1}),
             ("recent_predictions", {"n": 5}), ("state", {"key": "none"})]
    conn.send(*[{"op": "query", "q": name, **params} for name, params in asked])
    first = len(play.events) + 1
    answers = {}
    while len(answers) < len(asked):
        reply = conn.read_reply()
        if "result" in reply:
            answers[reply["line"]] = reply["result"]
    with tedstore.Reader(db_path=daemon.db) as file:
        for line, (name, params) in enumerate(asked, first):
            local = file.ask(name, **params)
            for moving in ("since", "until"):                 # asked a moment apart
                answers[line].pop(moving, None), local.pop(moving, None)
            assert answers[line] == local, name
    conn.wait_ack(first + len(asked) - 1)                     # queries count as lines


def test_a_bad_query_is_rejected_on_its_line_and_not_kept(daemon):
    conn = daemon.connect()
    conn.send(prediction("q", 1, 2), {"op": "query", "q": "nope"}, {"op": "query"},
              {"op": "query", "q": "games", "limit": "all"}, prediction("q", 2, 3))
    while conn.acked < 5 or sum(r.get("code") == "bad_query" for r in conn.replies) < 3:
        conn.read_reply()
    assert sorted((r["rejected"], r["code"]) for r in conn.replies if "rejected" in r) == \
        [(2, "bad_query"), (3, "bad_query"), (4, "bad_query")]
    assert daemon.query("SELECT count(*) FROM rejects") == [(0,)]
    assert daemon.query("SELECT count(*) FROM predictions") == [(2,)]


def test_queries_over_their_limits_are_bad_queries(tmp, inprocess, monkeypatch):
    store = Store(tmp / "tedstore.db")             # 150,000 resolved predictions: ~0.1 s of work
    stamp = tedstore.utc_text(time.time() - 600)
    with tedstore.transaction(store.conn):
        store.conn.executemany(
            "INSERT INTO predictions (game_id, predicted_at_tick, predicted_end_tick, confidence, "
            "model_version, created_at, actual_end_tick, raw_error, e40) "
            "VALUES (?, ?, 100, 0.5, 'v', ?, 100, ?, ?)",
            ((f"big-{n // 100}", n % 100, stamp, n % 301 - 150, (n % 301 - 150) / 40)
             for n in range(150_000)))
    store.conn.close()
    daemon = inprocess()
    conn = Conn(daemon.socket)
    conn.send(*Play(seed=5, games=30).events)
    conn.wait_ack(1)
    monkeypatch.setattr(tedstore, "QUERY_MAX_BYTES", 2000)
    conn.send({"op": "query", "q": "games", "hours": 24, "limit": 100})
    too_big = conn.read_until("code")
    assert "more than 0 MiB" in too_big["error"] and "lower its limit" in too_big["error"]
    monkeypatch.setattr(tedstore, "QUERY_SECONDS", 0.01)
    monkeypatch.setattr(tedstore, "QUERY_MAX_BYTES", 1 << 24)
    conn.send({"op": "query", "q": "performance", "hours": 24})
    too_slow = conn.read_until("code")
    assert "took more than 0.01 s" in too_slow["error"]
    monkeypatch.setattr(tedstore, "QUERY_SECONDS", 2.0)
    conn.send({"op": "query", "q": "performance", "hours": 24})
    answer = conn.read_until("result")["result"]              # the same query, in time
    assert answer["prediction_metrics"]["predictions_made"] >= 150_000
    status = tedstore.request(daemon.socket, "status")["status"]["queries"]
    assert status["refused"] == 2 and status["answered"] >= 1


def test_a_connection_that_ends_after_a_query_still_gets_the_answer(daemon):
    conn = daemon.connect()
    conn.send({"op": "query", "q": "recent_ticks", "n": 3})
    conn.sock.shutdown(2 - 1)                                  # SHUT_WR: no more lines
    assert conn.read_until("result") == {"result": {"rows": []}, "line": 1}
    conn.wait_ack(1)


# -- the read commands --------------------------------------------------------------------------

def test_read_commands_print_the_query_object_as_json(played):
    _, store, reader = played
    for args, name, params in [(["games", "--hours", "24", "--limit", "3"], "games",
                                {"hours": 24, "limit": 3}),
                               (["performance", "--type", "predictions"], "performance",
                                {"type": "predictions"}),
                               (["patterns", "--days", "1"], "patterns", {"days": 1}),
                               (["trends", "--days", "1"], "trends", {"days": 1}),
                               (["game", play_game(store)], "game", {"id": play_game(store)})]:
        result = run_cli(*args, "--db", store.path, "--json")
        assert result.returncode == 0, result.stderr
        printed, expected = json.loads(result.stdout), reader.ask(name, **params)
        for moving in ("since", "until"):
            printed.pop(moving, None), expected.pop(moving, None)
        for trend in expected.get("trends", {}).values():      # a window a moment later
            trend["slope_per_day"] = pytest.approx(trend["slope_per_day"])
        assert printed == expected, args


def play_game(store: Store) -> str:
    return store.rows("SELECT game_id FROM games ORDER BY game_id LIMIT 1")[0][0]


def test_read_commands_print_aligned_tables_and_say_when_a_window_is_empty(played):
    _, store, _ = played
    table = run_cli("games", "--db", store.path, "--limit", "4").stdout.splitlines()
    assert table[0].startswith("4 game(s) ended from ") and table[0].endswith(" UTC")
    assert table[1].split()[:3] == ["ended", "(UTC)", "game"] and "MAE (ticks)" in table[1]
    assert len({len(line) for line in table[2:]}) <= 2                   # aligned columns
    performance = run_cli("performance", "--db", store.path).stdout
    assert "mean absolute error" in performance and " ticks" in performance and " %" in performance
    for command in (["games"], ["metrics"], ["rejects"], ["performance"]):
        empty = run_cli(*command, "--db", store.path, "--since", "2020-01-01",
                        "--until", "2020-01-02")
        assert empty.returncode == 0
        assert "2020-01-01 00:00:00 to 2020-01-02 00:00:00 UTC" in empty.stdout, command
        if command != ["performance"]:
            assert empty.stdout.startswith("no "), command
    unknown = run_cli("game", "nope", "--db", store.path)
    assert unknown.returncode == 1 and unknown.stderr.strip() == "Error: no game 'nope'"


def test_a_read_command_asks_the_daemon_when_it_cannot_read_the_file(daemon):
    conn = daemon.connect()
    conn.send(prediction("over-the-socket", 1, 9))
    conn.wait_ack(1)
    result = run_cli("performance", "--socket", daemon.socket, "--json")
    assert json.loads(result.stdout)["prediction_metrics"]["predictions_made"] == 1
    missing = run_cli("performance", "--socket", daemon.socket, "--db", daemon.db + ".gone")
    assert missing.returncode == 1 and "does not exist" in missing.stderr


def test_export_and_import_through_msgspec_structs_share_the_wire():
    event = tedstore.GameEnd("g", 10, 0.5, startTick=0, patterns=["a"], ts="2026-11-22 10:00:00.000")
    assert msgspec.json.decode(msgspec.json.encode(event)) == game_end("g", at=10, final=0.5, startTick=0, patterns=["a"], ts="2026-11-22 10:00:00.000")


# -- trackers read through the socket, as a user who cannot open the files -----------------

SYSTEM_PYTHON = "/usr/bin/python3"
NOBODY = 65534


def other_user_python() -> str | None:
    """A folder from which uid 65534 can import tedstore and its three dependencies with
    the system Python, or None when that cannot be (not root, another Python)."""
    if os.geteuid() != 0 or not os.access(SYSTEM_PYTHON, os.X_OK):
        return None
    version = subprocess.run([SYSTEM_PYTHON, "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True).stdout.strip()
    if version != str(sys.version_info[:2]):
        return None
    folder = tempfile.mkdtemp(prefix="ts-nobody-", dir="/tmp")
    os.chmod(folder, 0o755)
    for name in ("tedstore.py", "schema.sql"):
        shutil.copy(ROOT / name, folder)
    for module in (apsw, msgspec, click):
        shutil.copytree(Path(module.__file__).parent, Path(folder) / module.__name__)
    subprocess.run(["chmod", "-R", "a+rX", folder], check=True)
    return folder


@pytest.fixture(scope="module")
def as_nobody():
    folder = other_user_python()
    if folder is None:
        pytest.skip("needs root and a system Python 3 of this version to act as uid 65534")

    def run(code: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([SYSTEM_PYTHON, "-c", code, *args], user=NOBODY, cwd="/",
                              env={"PYTHONPATH": folder, "PATH": "/usr/bin:/bin"},
                              capture_output=True, text=True, timeout=60)
    yield run
    shutil.rmtree(folder, ignore_errors=True)


READ_AS_A_TRACKER = """
import json, sys, tedstore
try:
    tedstore.Reader(db_path=sys.argv[2])
except tedstore.StoreError as exc:
    refused = str(exc)
with tedstore.Reader(sys.argv[1]) as reader:
    print(json.dumps({"refused": refused, "recent": reader.recent_predictions(3),
                      "performance": reader.performance(hours=24),
                      "state": reader.load_state("tracker.model")}))
"""


def test_a_tracker_that_cannot_open_the_files_reads_over_the_socket(daemon_factory, tmp,
                                                                    as_nobody):
    os.chmod(tmp, 0o755)
    daemon = daemon_factory(env={"TEDSTORE_SOCKET_MODE": "0666"})
    conn = daemon.connect()
    conn.send(*[prediction("warm", i, i + 40) for i in range(5)],
              state_write("tracker.model", {"epoch": 3}))
    conn.wait_ack(6)
    result = as_nobody(READ_AS_A_TRACKER, daemon.socket, daemon.db)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert "cannot open database" in answer["refused"] or "unable to open" in answer["refused"]
    assert [r["predicted_at_tick"] for r in answer["recent"]] == [2, 3, 4]
    assert answer["performance"]["prediction_metrics"]["predictions_made"] == 5
    assert answer["state"] == {"epoch": 3}
    cli = as_nobody("import sys, tedstore; sys.argv[0] = 'tedstore'; tedstore.main()",
                    "performance", "--socket", daemon.socket, "--json")
    assert json.loads(cli.stdout)["prediction_metrics"]["predictions_made"] == 5, cli.stderr


@pytest.mark.skipif(not shutil.which("systemd-socket-activate"),
                    reason="systemd-socket-activate is missing (.ci/run installs systemd)")
def test_a_tracker_reads_while_the_daemon_is_stopped_through_socket_activation(tmp, as_nobody):
    os.chmod(tmp, 0o755)
    store = Store(tmp / "tedstore.db")
    store.send(*[prediction("cold", i, i + 40) for i in range(4)])
    store.conn.close()
    path = tmp / "activated.sock"
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", str(path), "-E", f"TEDSTORE_DB={store.path}",
         "-E", f"PYTHONPATH={ROOT}", sys.executable, "-m", "tedstore", "serve"],
        env=clean_env(), cwd=tmp, stderr=open(tmp / "daemon.log", "wb"))
    try:
        wait_for(path.exists, what="systemd-socket-activate to listen")
        os.chmod(path, 0o666)                             # as SocketMode=0666 would
        assert not tedstore.serving(store.path)              # nothing runs yet
        result = as_nobody(READ_AS_A_TRACKER, str(path), store.path)
        assert result.returncode == 0, result.stderr + (tmp / "daemon.log").read_text()
        assert [r["predicted_at_tick"] for r in json.loads(result.stdout)["recent"]] == [1, 2, 3]
        assert tedstore.serving(store.path)                  # the connection started it
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


# -- Datasette, beside a live daemon --------------------------------------------------------

DATASETTE = shutil.which("datasette", path=os.path.dirname(sys.executable))


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a Unix socket: Datasette listens on one (--uds), so the test needs no port."""

    def __init__(self, path: str):
        super().__init__("localhost", timeout=30)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(self.path)


@pytest.mark.skipif(DATASETTE is None, reason="datasette is not installed (the test extra has it)")
def test_datasette_browses_the_live_database_while_acks_keep_flowing(daemon, tmp):
    events = list(tedstore.simulate_events(40, seed=8))
    conn = daemon.connect()
    conn.send(*events[:500])
    conn.wait_ack(500)
    where = tmp / "datasette.sock"
    server = subprocess.Popen([DATASETTE, "serve", daemon.db, "--uds", str(where),
                               "--setting", "sql_time_limit_ms", "1000"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: where.exists() or server.poll() is not None, timeout=60,
                 what="datasette to listen")
        assert server.poll() is None, server.stderr.read().decode()

        def fetch(path: str) -> list:
            http = UnixHTTPConnection(str(where))
            try:
                http.request("GET", path)
                reply = http.getresponse()
                assert reply.status == 200, (path, reply.status, reply.read()[:300])
                return json.loads(reply.read())
            finally:
                http.close()

        sent = 500
        for first in range(500, len(events), 500):            # ingest goes on between reads
            conn.send(*events[first:first + 500])
            views = fetch("/tedstore/prediction_accuracy_daily.json?_shape=array")
            games = fetch("/tedstore/games.json?_shape=array&_size=5&_sort_desc=id")
            sent = min(first + 500, len(events))
            assert conn.wait_ack(sent) == []
            assert views and {"day", "resolved"} <= set(views[0])
            assert games and {"game_id", "patterns_detected"} <= set(games[0])
        assert conn.acked == len(events)
        stored = fetch("/tedstore.json?sql=select+count(*)+as+n+from+predictions&_shape=array")
        assert stored[0]["n"] == sum(e["event"] == "prediction" for e in events)
    finally:
        server.terminate()
        server.wait(30)
