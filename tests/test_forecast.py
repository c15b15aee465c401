"""Forecast evaluation: calibration (the Brier score, Murphy's decomposition, the reliability
bins, interval coverage) and bankroll (the curve, the worst fall, the longest losing run),
each number against its definition computed in plain Python from the raw records."""

from __future__ import annotations

import json
import time

import pytest

import tedstore
from conftest import (FIRST_HOUR, NOW, Conn, Play, Store, answered_at, close, game_end,
                      game_start, run_cli, side_bet)

TRACKERS = (("production", "v2.1.0"), ("shadow", "v3.0.0"))
WINDOWS = {"everything": (FIRST_HOUR, NOW), "cut": (FIRST_HOUR + 3600, FIRST_HOUR + 4 * 3600),
           "days": (FIRST_HOUR - 5 * 86400, NOW), "empty": (NOW - 400 * 86400, NOW - 399 * 86400),
           "long, cut": (FIRST_HOUR - tedstore.LONG_WINDOW_DAYS * 86400, FIRST_HOUR + 3 * 3600)}


@pytest.fixture(scope="module")
def played(tmp_path_factory):
    """A production tracker and a shadow candidate, over-confident in known ways, on the
    same games: some never end (their bets stay pending), forecasts sit on bin edges."""
    play = Play(seed=5, games=60, trackers=TRACKERS)
    store = Store(tmp_path_factory.mktemp("forecast") / "f.db")
    assert store.send(*play.events) == []
    with store.reading() as reader:
        yield play, store, reader


def answered(answer: dict) -> dict:
    return {k: v for k, v in answer.items() if k not in ("since", "until")}


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("bins", [10, 1, 3, 100])
@pytest.mark.parametrize("filters", [{}, {"tracker": "shadow"}, {"model": "v2.1.0"}],
                         ids=lambda f: "-".join(f.values()) or "everyone")
def test_calibration_is_its_definition_over_the_raw_records(played, window, bins, filters):
    play, _, reader = played
    since, until = WINDOWS[window]
    answer = reader.calibration(since=since, until=until, bins=bins, **filters)
    assert answered(answer) == close(play.calibration(since, until, bins=bins, **filters))
    assert answer["since"] == answered_at(since)


def test_the_data_holds_the_edge_cases(played):
    """The oracle test above only proves something if the records reach the edges."""
    play, _, _ = played
    probabilities = {b["p"] for b in play.bets}
    assert {0.0, 1.0, 0.57, 0.3}.issubset(probabilities)
    assert any(b["outcome"] is None for b in play.bets)                     # pending bets
    assert any(p["lower"] == p["upper"] == p["actual"] for p in play.predictions)
    assert any(p["lower"] == p["upper"] != p["actual"] for p in play.predictions)
    assert any(p["lower"] is None for p in play.predictions)


def test_a_forecast_on_a_bin_edge_falls_in_the_bin_it_opens(tmp):
    """0.57 with 100 bins is in [57, 58), 1.0 in the last bin, 0.0 in the first."""
    store = Store(tmp / "edge.db")
    start = time.time() - 3600
    events = [game_start("e", 0, 1.0, ts=start)]
    for n, probability in enumerate((0.57, 1.0, 0.0, 0.3)):
        events.append(side_bet("e", n, probability=probability, ts=start + n))
    events.append(game_end("e", at=10, final=0.5, ts=start + 60))
    assert store.send(*events) == []
    reader = tedstore.Reader(db_path=store.path)
    bins = reader.calibration(hours=2, bins=100)["side_bets"]["bins"]
    assert [(b["lower"], b["n"]) for b in bins] == [(0.0, 1), (30.0, 1), (57.0, 1), (99.0, 1)]
    assert [b["upper"] for b in bins] == [1.0, 31.0, 58.0, 100.0]
    tens = reader.calibration(hours=2)["side_bets"]["bins"]
    assert [(b["lower"], b["n"]) for b in tens] == [(0.0, 1), (30.0, 1), (50.0, 1), (90.0, 1)]


def test_an_empty_window_has_no_measures(played):
    _, _, reader = played
    answer = reader.calibration(since=NOW - 400 * 86400, until=NOW - 399 * 86400)
    assert answer["side_bets"] == {"n": 0, "base_rate": None, "brier": None,
                                   "reliability": None, "resolution": None,
                                   "uncertainty": None, "bins": [],
                                   "expected_value": {"stated": None, "realized": None}}
    assert answer["intervals"] == {"n": 0, "coverage": None, "mean_confidence": None,
                                   "mean_width_ticks": None, "bins": []}
    bankroll = reader.bankroll(since=NOW - 400 * 86400, until=NOW - 399 * 86400)
    assert answered(bankroll) == {
        "bets": 0, "won": 0, "lost": 0, "pnl": 0.0, "roi_percentage": None, "mean_payout": None,
        "stdev_payout": None, "sharpe_per_bet": None, "max_drawdown": 0.0,
        "max_drawdown_from": None, "max_drawdown_to": None, "longest_losing_streak": 0,
        "curve": []}


def test_brier_is_close_to_its_decomposition(played):
    """Murphy: brier = reliability - resolution + uncertainty, exactly when the forecasts
    of a bin are all equal, and nearly so otherwise."""
    _, _, reader = played
    bets = reader.calibration(since=FIRST_HOUR, until=NOW, bins=100)["side_bets"]
    assert bets["brier"] == pytest.approx(
        bets["reliability"] - bets["resolution"] + bets["uncertainty"], abs=0.01)
    assert bets["reliability"] > 0.01          # the play's forecasts are over-confident


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("tracker", [None, "production", "shadow"])
def test_bankroll_is_its_definition_over_the_raw_records(played, window, tracker):
    play, _, reader = played
    since, until = WINDOWS[window]
    answer = reader.bankroll(since=since, until=until, tracker=tracker)
    assert answered(answer) == close(play.bankroll(since, until, tracker=tracker))


def test_the_play_has_a_fall_and_a_losing_run(played):
    play, _, _ = played
    truth = play.bankroll(FIRST_HOUR, NOW, tracker="production")
    assert truth["max_drawdown"] > 0 and truth["longest_losing_streak"] >= 2
    assert truth["max_drawdown_from"] < truth["max_drawdown_to"]


def test_a_fall_from_the_start_is_measured_from_the_window_start(tmp):
    """Lost, won, lost, lost: the running peak starts at 0 before the first bet, rises
    to 4 with the win, and the worst fall is from there to the last loss."""
    store = Store(tmp / "fall.db")
    start = time.time() - 7200
    events = []
    for n, wins in enumerate((False, True, False, False)):
        game = f"b{n}"
        events += [game_start(game, 0, 1.0, ts=start + n * 600),
                   side_bet(game, 100 if wins else 0, ts=start + n * 600 + 1),
                   game_end(game, at=120, final=0.5, ts=start + n * 600 + 60)]
    assert store.send(*events) == []
    reader = tedstore.Reader(db_path=store.path)
    since = start - 60
    answer = reader.bankroll(since=since, until=time.time())
    assert (answer["pnl"], answer["won"], answer["lost"]) == (2.0, 1, 3)
    assert answer["max_drawdown"] == 2.0
    assert answer["max_drawdown_from"] == answered_at(start + 600 + 60)
    assert answer["max_drawdown_to"] == answered_at(start + 3 * 600 + 60)
    assert answer["longest_losing_streak"] == 2
    first = reader.bankroll(since=since, until=start + 300)          # only the first loss
    assert first["max_drawdown"] == 1.0
    assert first["max_drawdown_from"] == answered_at(since)
    assert first["sharpe_per_bet"] is None and first["stdev_payout"] is None


@pytest.mark.parametrize("params", [{"bins": 0}, {"bins": 101}, {"bins": "ten"},
                                    {"model": "x" * 200}, {"tracker": "no spaces"}])
def test_a_bad_parameter_is_a_bad_query(played, params):
    _, _, reader = played
    with pytest.raises(tedstore.QueryRejected):
        reader.calibration(**params)


def test_bankroll_takes_no_model(played):
    _, _, reader = played
    with pytest.raises(tedstore.QueryRejected, match="model"):
        reader.bankroll(model="v2.1.0")


def test_the_commands_print_the_query_and_a_table(played):
    play, store, reader = played
    since = tedstore.utc_text(FIRST_HOUR)
    for name in ("calibration", "bankroll"):
        done = run_cli(name, "--db", store.path, "--since", since, "--tracker", "shadow",
                       "--json")
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout) == reader.ask(name, since=since, tracker="shadow",
                                                     until=json.loads(done.stdout)["until"])
    table = run_cli("calibration", "--db", store.path, "--since", since, "--bins", "5")
    assert table.returncode == 0, table.stderr
    assert "Brier" in table.stdout and "observed" in table.stdout and "coverage" in table.stdout
    table = run_cli("bankroll", "--db", store.path, "--since", since)
    assert table.returncode == 0, table.stderr
    assert "drawdown" in table.stdout and "losing" in table.stdout
    empty = run_cli("bankroll", "--db", store.path, "--since", "2020-01-01",
                    "--until", "2020-01-02")
    assert empty.returncode == 0 and "no resolved BET" in empty.stdout


def test_the_socket_answers_as_the_file_does(daemon):
    events = Play(seed=9, games=12).events
    conn = Conn(daemon.socket)
    conn.send(*events)
    conn.wait_ack(len(events))
    over_socket = tedstore.Reader(daemon.socket)
    from_file = tedstore.Reader(db_path=daemon.db)
    for name in ("calibration", "bankroll"):
        window = {"since": FIRST_HOUR, "until": NOW}
        assert over_socket.ask(name, **window) == from_file.ask(name, **window)
        assert over_socket.ask(name, **window)["since"] == answered_at(FIRST_HOUR)
    over_socket.close()
    from_file.close()


def test_the_simulated_trackers_are_imperfect_as_the_readme_says(tmp):
    """`simulate --trackers 3`: default over-confident at the top with narrow bounds,
    candidate nearly honest, challenger badly over-confident and losing money."""
    store = Store(tmp / "sim.db")
    events = tedstore.simulate_events(days=1, trackers=3, seed=4)
    assert store.send(*events, batch_size=5000) == []
    reader = tedstore.Reader(db_path=store.path)
    seen = {name: (reader.calibration(days=2, tracker=name), reader.bankroll(days=2, tracker=name))
            for name in ("default", "candidate", "challenger")}
    reliability = {name: c["side_bets"]["reliability"] for name, (c, _) in seen.items()}
    assert reliability["candidate"] < reliability["default"] < reliability["challenger"]
    for name in ("default", "challenger"):
        calibration, _ = seen[name]
        top = [b for b in calibration["side_bets"]["bins"] if b["lower"] >= 30]
        assert sum(b["n"] * (b["mean_probability"] - b["observed_rate"]) for b in top) > 0
        intervals = calibration["intervals"]
        assert intervals["coverage"] < intervals["mean_confidence"] - 5     # bounds too narrow
    assert seen["challenger"][1]["pnl"] < 0 < seen["candidate"][1]["pnl"]
    assert seen["challenger"][1]["max_drawdown"] > seen["candidate"][1]["max_drawdown"]
