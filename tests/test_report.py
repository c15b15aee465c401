"""The report: every number on the page against the section-7 queries, stored strings
shown as text, empty periods, the command's errors, and the page in a real Chromium."""

from __future__ import annotations

import collections
import html
import itertools
import json
import math
import os
import random
import re
import shutil
import statistics
import struct
import subprocess
import tempfile
import time
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import tedstore
from conftest import LONG_RETENTION, Store, game_end, game_start, prediction, run_cli

HOUR, DAY = 3600, 86400
NOW = math.floor(time.time())
TODAY = NOW // DAY * DAY
SKIPPED_DAYS = (4, 5)                  # days ago without a game: gaps in the charts
PANELS = tuple(chart.title for chart in tedstore.CHARTS)
NUMBER = r"(-?\d[\d,]*(?:\.\d+)?)"                  # a number in a sentence of the page
FORECASTS = ("Reliability of the side-bet probabilities",
             "Bounds coverage against stated confidence", "Bankroll")
TABLES = ("Patterns", "The 10 games with the largest mean absolute error",
          "Rejected lines by code")


def hostile_strings(rng: random.Random, count: int, limit: int = 60) -> list[str]:
    """Strings made of what breaks HTML (markup, quotes, entities, comment and CDATA
    openers), control and bidi characters, and plain text, each with a '<' in it."""
    alphabet = list("<>&\"'`=/;!-[]{}$%\\ ,") + ["\x00", "\x07", "\n", "\u202e", "\u2028",
                                                 "é", "😀", "script", "on", "&amp;"]
    alphabet += list("abcdefXYZ0123")
    made = []
    while len(made) < count:
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(2, limit // 4)))
        if "<" in text and text.strip() and len(text) <= limit and text not in made:
            made.append(text)
    return made


def visible(text: str) -> str:
    """What the page must show for a stored string: itself, with control and format
    characters written as Python escapes."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


# -- the page, read back ---------------------------------------------------------------------

ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "body", "header", "h1", "h2", "h3",
                "p", "section", "div", "b", "span", "code", "details", "summary", "table",
                "thead", "tbody", "tr", "th", "td", "svg", "line", "text", "rect", "circle",
                "polyline"}


class Page(HTMLParser):
    """The report read back: its summary figures, each panel's or section's table (rows of
    cells; a cell is its text and the texts of its <span>s), the headings that say "no
    data", and every tag with its attributes."""

    def __init__(self, page: str):
        super().__init__(convert_charrefs=True)
        self.figures: dict[str, str] = {}
        self.tables: dict[str, list[list[tuple[str, list[str]]]]] = {}
        self.nodata: list[str] = []
        self.tags: list[tuple[str, dict]] = []
        self.heading, self.into, self.in_span = "", None, False
        self.cell: list = []
        self.figure: list[str] = []
        self.feed(page)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag in ("h2", "h3"):
            self.heading, self.into = "", "heading"
        elif tag == "table":
            self.tables[self.heading] = []
        elif tag == "tr":
            self.tables[self.heading].append([])
        elif tag in ("td", "th"):
            self.cell, self.into = ["", []], "cell"
        elif tag == "span" and self.into == "cell":
            self.cell[1].append("")
            self.in_span = True
        elif tag == "p" and attrs.get("class") == "nodata":
            self.nodata.append(self.heading)
        elif tag == "div" and attrs.get("class") == "figure":
            self.figure, self.into = [], "figure"
        elif tag in ("b", "span") and self.into == "figure":
            self.figure.append("")

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if tag in ("h2", "h3"):
            self.into = None
        elif tag == "span":
            self.in_span = False
        elif tag in ("td", "th"):
            self.tables[self.heading][-1].append((self.cell[0], self.cell[1]))
            self.into = None
        elif tag == "div" and self.into == "figure" and len(self.figure) == 2:
            self.figures[self.figure[1]] = self.figure[0]
            self.into = None

    def handle_data(self, data):
        if self.into == "heading":
            self.heading += data
        elif self.into == "cell":
            self.cell[0] += data
            if self.in_span:
                self.cell[1][-1] += data
        elif self.into == "figure" and self.figure:
            self.figure[-1] += data

    def rows(self, heading: str) -> list[list[str]]:
        """A table's body rows as cell texts."""
        return [[text for text, _ in row] for row in self.tables[heading][1:]]


def shown(text: str) -> tuple[float | None, int]:
    """A number as the page shows it ('1,234', '54.3%', '12.50 ms', '-') and its decimals."""
    text = text.strip()
    if text == "-":
        return None, 0
    number = re.fullmatch(r"(-?[\d,]+(?:\.(\d+))?)(?:%| ms| ticks)?", text)
    assert number, f"not a number as the page shows one: {text!r}"
    return float(number.group(1).replace(",", "")), len(number.group(2) or "")


def assert_shows(text: str, expected: float | None, what: str) -> None:
    """The page's text is the expected value, rounded as far as the page rounds."""
    value, decimals = shown(text)
    if expected is None:
        assert value is None, f"{what}: page shows {text}, the query says nothing"
        return
    assert value is not None, f"{what}: page shows -, the query says {expected}"
    assert abs(value - expected) <= 0.5 * 10 ** -decimals + 1e-9, \
        f"{what}: page shows {text}, the query says {expected}"


# -- a database with ten days of play, hostile strings and rejects ---------------------------

@pytest.fixture(scope="module")
def played(tmp_path_factory):
    """Ten days of simulated games (none 4 and 5 days ago), rolled up but for the newest
    hours; a game whose id and patterns are hostile strings and whose predictions are the
    worst; refused lines carrying hostile strings; a p99 recorded for some hours."""
    folder = tmp_path_factory.mktemp("report")
    store = Store(folder / "report.db", **LONG_RETENTION)
    rng = random.Random(11)
    events = []
    for days_ago in range(10):
        for hour in (2, 9, 17):
            start = TODAY - days_ago * DAY + hour * HOUR + 300
            if days_ago not in SKIPPED_DAYS and start + 3 * HOUR < NOW:
                events += tedstore.simulate_events(3, seed=days_ago * 100 + hour, start=start)
    names = hostile_strings(rng, 8)
    hostile_games = [names[0], names[1] + ", " + names[2]]
    for number, game in enumerate(hostile_games):
        start = NOW - 2 * HOUR + number * 600
        events.append(game_start(game, 0, 1.0, ts=start))
        events += [prediction(game, tick, 5000 + tick, ts=start + tick / 4)
                   for tick in range(20, 200, 20)]
        events.append(game_end(game, at=200, final=0.1, patterns=names[3:6], ts=start + 50))
    assert store.send(*events) == []
    one_line = names[7].replace("\n", " ")
    refused = [json.dumps({"event": names[6], "ts": NOW}).encode(), ("{" + one_line).encode(),
               json.dumps({"event": "prediction", "game_id": names[6]}).encode(),
               b"\xff" + one_line.encode()]
    assert len(store.send(*refused)) == len(refused)
    now = time.time()
    hours = tedstore.hours_to_roll(store.conn, now, store.settings)
    tedstore.run_rollups(store.conn, lambda step: step(store.conn), hours, now)
    store.conn.execute("UPDATE metrics_hourly SET p99_commit_latency_ms = 1.25 + rowid % 7 / 4 "
                       "WHERE rowid % 3 = 0")
    reader = tedstore.Reader(db_path=store.path)
    stored = math.ceil(time.time())
    yield store, reader, {"games": hostile_games, "patterns": names[3:6], "stored": stored}
    reader.close()
    store.conn.close()


def make_report(store: Store, folder: Path, *args: str) -> Page:
    out = folder / "report.html"
    done = run_cli("report", "--db", store.path, "-o", str(out), *args)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stderr
    return Page(out.read_text())


def bucket_bounds(since: int, until: int, period: int) -> list[tuple[int, int]]:
    """The window cut at each hour or day boundary."""
    cuts = [since] + [t for t in range(since // period * period + period, until, period)]
    return list(zip(cuts, cuts[1:] + [until]))


# Each window as (since, until, bucket) from the moment the play was stored.
WINDOWS = {"two days, by hour": lambda stored: (stored - 2 * DAY, stored, HOUR),
           "ten days, by day": lambda stored: (stored - 10 * DAY, stored, DAY),
           "seven whole days, by day": lambda stored: (TODAY - 7 * DAY, TODAY, DAY)}


@pytest.mark.parametrize("window", WINDOWS)
def test_every_number_on_the_page_equals_the_queries(played, tmp_path, window):
    store, reader, hostile = played
    since, until, period = WINDOWS[window](hostile["stored"])
    page = make_report(store, tmp_path, "--since", tedstore.utc_text(since),
                       "--until", tedstore.utc_text(until))
    rejects = reader.rejects(since=since, until=until, limit=10_000)["rejects"]

    # The summary figures: the performance query over the whole window.
    whole = reader.performance(since=since, until=until)
    p, s = whole["prediction_metrics"], whole["sidebet_metrics"]
    figures = page.figures
    assert_shows(figures["games ended"], whole["games_analyzed"], "games ended")
    assert_shows(figures[f"predictions ({p['resolved']:,} resolved)"], p["predictions_made"],
                 "predictions")
    assert_shows(figures["within 1 window"], p["within_1_window"], "within 1 window")
    assert_shows(figures["median e40"], p["median_e40"], "median e40")
    assert_shows(figures["mean absolute error"], p["mean_absolute_error"], "mean absolute error")
    assert_shows(figures["side-bet ROI"], s["roi_percentage"], "side-bet ROI")
    won, lost = figures["bets won / lost"].split(" / ")
    assert_shows(won, s["bets_won"], "bets won")
    assert_shows(lost, s["bets_lost"], "bets lost")
    assert_shows(figures["rejected lines"], len(rejects), "rejected lines")
    assert whole["games_analyzed"] > 0 and p["resolved"] > 0 and s["bets_won"] + s["bets_lost"] > 0

    # Each chart's numbers: per hour or day, the same query over that piece of the window.
    bounds = bucket_bounds(since, until, period)
    tables = {panel: page.rows(panel) for panel in PANELS}
    assert {panel: len(rows) for panel, rows in tables.items()} == \
        {panel: len(bounds) for panel in PANELS}
    hours = reader.metrics(since=since, until=until)["hours"]
    for n, (start, end) in enumerate(bounds):
        label = tables["Accuracy"][n][0]
        whole_day = period == DAY and start % DAY == 0
        partial = end - start < period                 # cut by either end of the period
        assert label == (tedstore.utc_text(start)[:10] if whole_day
                         else tedstore.utc_text(start)[:16] + " UTC") \
            + (" (partial)" if partial else "")
        piece = reader.performance(since=start, until=end)
        pm, sm = piece["prediction_metrics"], piece["sidebet_metrics"]
        where = f"{window}, {label}"
        for column, key in enumerate(("within_1_window", "within_2_windows", "within_3_windows")):
            assert_shows(tables["Accuracy"][n][1 + column], pm[key], f"{where}: {key}")
        assert_shows(tables["e40 bias"][n][1], pm["median_e40"], f"{where}: median e40")
        assert_shows(tables["Side-bet ROI"][n][1], sm["roi_percentage"], f"{where}: ROI")
        assert_shows(tables["Side-bet ROI"][n][2], sm["bets_won"], f"{where}: won")
        assert_shows(tables["Side-bet ROI"][n][3], sm["bets_lost"], f"{where}: lost")
        assert_shows(tables["Volume"][n][1], piece["games_analyzed"], f"{where}: games")
        assert_shows(tables["Volume"][n][2], pm["predictions_made"], f"{where}: predictions")
        complete = [h["p99_commit_latency_ms"] for h in hours
                    if start <= tedstore.parse_when(h["hour_start"], 0) < end
                    and tedstore.parse_when(h["hour_end"], 0) <= end
                    and h["p99_commit_latency_ms"] is not None]
        assert_shows(tables["Ingest health"][n][1], max(complete, default=None), f"{where}: p99")
        assert_shows(tables["Ingest health"][n][2],
                     sum(start <= tedstore.parse_when(r["received_at"], 0) < end for r in rejects),
                     f"{where}: rejected lines")

    # The patterns table: the patterns query.
    patterns = reader.patterns(since=since, until=until)["patterns"]
    assert patterns
    rows = page.tables["Patterns"][1:]
    assert [visible(x["pattern"]) for x in patterns] == [row[0][0] for row in rows]
    for x, row in zip(patterns, rows):
        assert_shows(row[1][0], x["games"], f"{x['pattern']}: games")
        assert_shows(row[2][0], x["avg_prediction_accuracy"], f"{x['pattern']}: accuracy")
        assert_shows(row[3][0], x["avg_duration_ticks"], f"{x['pattern']}: duration")
        assert row[4][1] == [visible(game) for game in x["recent_game_ids"]]

    # The forecasts: the calibration and bankroll queries over the window.
    raw = (tmp_path / "report.html").read_text()
    calibration = reader.calibration(since=since, until=until)
    bets, spans = calibration["side_bets"], calibration["intervals"]
    assert bets["n"] and spans["n"]
    for heading, part, forecast, happened in (
            (FORECASTS[0], bets, "mean_probability", "observed_rate"),
            (FORECASTS[1], spans, "mean_confidence", "coverage")):
        rows = page.rows(heading)
        assert [row[0] for row in rows] == [f"{b['lower']:g}–{b['upper']:g}" for b in part["bins"]]
        for b, row in zip(part["bins"], rows):
            assert_shows(row[1], b["n"], f"{heading} {row[0]}: n")
            assert_shows(row[2], b[forecast], f"{heading} {row[0]}: {forecast}")
            assert_shows(row[3], b[happened], f"{heading} {row[0]}: {happened}")
    for name in ("brier", "reliability", "resolution", "uncertainty"):
        said = re.search(rf"{'Brier score' if name == 'brier' else name} {NUMBER}", raw)
        assert_shows(said.group(1), bets[name], name)
    said = re.search(rf"coverage {NUMBER}% for a stated {NUMBER}%", raw)
    assert_shows(said.group(1), spans["coverage"], "coverage")
    assert_shows(said.group(2), spans["mean_confidence"], "mean confidence")
    bankroll = reader.bankroll(since=since, until=until)
    assert bankroll["bets"] > 0
    rows = page.rows("Bankroll")
    assert len(rows) == len(bankroll["curve"])
    for point, row in zip(bankroll["curve"], rows):
        assert_shows(row[1], point["pnl"], f"bankroll at {point['t']}")
    said = re.search(rf"{NUMBER} BETs resolved, {NUMBER} units", raw)
    assert_shows(said.group(1), bankroll["bets"], "BETs")
    assert_shows(said.group(2), bankroll["pnl"], "profit")
    if bankroll["max_drawdown_to"]:
        said = re.search(rf"max drawdown {NUMBER} units, (\S+ \S+) to (\S+ \S+) UTC", raw)
        assert_shows(said.group(1), bankroll["max_drawdown"], "max drawdown")
        assert (said.group(2), said.group(3)) == (
            tedstore.shown_time(bankroll["max_drawdown_from"], 16),
            tedstore.shown_time(bankroll["max_drawdown_to"], 16))

    # The worst games: computed here from the predictions made in the window.
    errors: dict[str, list[int]] = {}
    for game, error, created in store.rows(
            "SELECT game_id, raw_error, created_at FROM predictions WHERE raw_error IS NOT NULL"):
        if since <= tedstore.parse_when(created, 0) < until:
            errors.setdefault(game, []).append(error)
    ranked = [game for game in errors if len(errors[game]) >= 3]      # as the page says
    assert len(ranked) < len(errors)                  # the data has games with fewer
    worst = sorted(ranked, key=lambda g: (-statistics.mean(map(abs, errors[g])), g))[:10]
    assert "Of the games with at least 3 predictions made in the period." in raw
    rows = page.tables["The 10 games with the largest mean absolute error"][1:]
    assert [row[0][0] for row in rows] == [visible(game) for game in worst]
    for game, row in zip(worst, rows):
        answer = reader.game(game_id=game)["game"]
        assert row[1][0] == tedstore.shown_time(answer["ended_at"])
        assert_shows(row[2][0], len(errors[game]), f"{game}: predictions")
        assert_shows(row[3][0], statistics.mean(map(abs, errors[game])), f"{game}: error")
        assert_shows(row[4][0], answer["prediction_accuracy"], f"{game}: accuracy")
        assert row[5][1] == [visible(x) for x in answer["patterns_detected"]]

    # Rejected lines by code: the rejects query, grouped here; each with its newest line.
    assert ("Rejected lines by code" in page.nodata) == (not rejects)
    rows = page.rows("Rejected lines by code") if rejects else []
    by_code = {}
    for reject in rejects:
        by_code.setdefault(reject["code"], []).append(reject)
    assert sorted(row[0] for row in rows) == sorted(by_code)
    for code, lines, newest, error, raw in rows:
        assert_shows(lines, len(by_code[code]), f"{code}: lines")
        latest = max(r["received_at"] for r in by_code[code])
        assert newest == tedstore.shown_time(latest)
        candidates = [r for r in by_code[code] if r["received_at"] == latest]
        assert any(error == visible(r["error"]) and visible(r["raw"]).startswith(raw.rstrip("�"))
                   for r in candidates), (code, error, raw)

    # The pieces add up to the whole.
    assert sum(shown(row[1])[0] for row in tables["Volume"]) == whole["games_analyzed"]
    assert sum(shown(row[2])[0] for row in tables["Ingest health"]) == len(rejects)


def test_stored_strings_show_as_text_and_never_as_markup(played, tmp_path):
    store, _, hostile = played
    page_text = make_report(store, tmp_path, "--days", "1")
    raw = (tmp_path / "report.html").read_text()
    assert {tag for tag, _ in page_text.tags} <= ALLOWED_TAGS
    for tag, attrs in page_text.tags:
        assert not any(name.startswith("on") or name in ("src", "href", "style", "xlink:href")
                       for name in attrs), (tag, attrs)
    assert "\x00" not in raw and "\u202e" not in raw
    worst = page_text.tables["The 10 games with the largest mean absolute error"][1:]
    assert {visible(g) for g in hostile["games"]} <= {row[0][0] for row in worst}
    shown_patterns = [row[0][0] for row in page_text.tables["Patterns"][1:]]
    assert set(map(visible, hostile["patterns"])) <= set(shown_patterns)
    codes = page_text.rows("Rejected lines by code")
    assert {row[0] for row in codes} >= {"bad_event", "bad_json", "bad_utf8"}


@pytest.fixture(scope="module")
def nothing(tmp_path_factory) -> dict:
    """report_data()'s object for an empty database."""
    store = Store(tmp_path_factory.mktemp("empty") / "empty.db")
    store.conn.close()
    return tedstore.report_data(store.path, NOW - DAY, NOW, NOW)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(strings=st.lists(st.text(min_size=1, max_size=40), min_size=6, max_size=6))
def test_any_string_in_any_stored_field_is_shown_as_itself(nothing, strings):
    game, pattern, other, code, error, raw = strings
    data = json.loads(json.dumps(nothing))
    data["patterns"]["patterns"] = [{"pattern": pattern, "games": 1,
                                     "avg_prediction_accuracy": 50.0, "avg_duration_ticks": 10.0,
                                     "recent_game_ids": [game, other]}]
    data["worst_games"] = [{"game_id": game, "ended_at": "2026-01-01 00:00:00.000",
                            "predictions": 1, "mean_absolute_error": 3.0,
                            "prediction_accuracy": None, "patterns_detected": [pattern, other]}]
    data["rejects_by_code"] = [{"code": code, "lines": 1, "newest_at": "2026-01-01 00:00:00.000",
                                "newest_error": error, "newest_raw": raw}]
    page = Page(tedstore.render_report(data, database=other))
    assert {tag for tag, _ in page.tags} <= ALLOWED_TAGS
    pattern_row = page.tables["Patterns"][1]
    assert pattern_row[0][0] == visible(pattern)
    assert pattern_row[4][1] == [visible(game), visible(other)]
    worst_row = page.tables["The 10 games with the largest mean absolute error"][1]
    assert worst_row[0][0] == visible(game)
    assert worst_row[5][1] == [visible(pattern), visible(other)]
    reject_row = page.rows("Rejected lines by code")[0]
    assert [reject_row[0], reject_row[3], reject_row[4]] == [visible(code), visible(error),
                                                             visible(raw)]


@pytest.mark.parametrize("period", ["--days=2", "--days=30"])
def test_an_empty_database_or_window_says_no_data_in_each_panel(played, tmp_path, period):
    store, _, _ = played
    empty = Store(tmp_path / "empty.db")
    empty.conn.close()
    for page in (make_report(empty, tmp_path, period),
                 make_report(store, tmp_path, "--since", "2020-01-01",
                             "--until", "2020-01-02" if period == "--days=2" else "2020-02-01")):
        assert page.nodata == [*PANELS, *FORECASTS, *TABLES]
        assert page.figures["games ended"] == "0" and page.figures["median e40"] == "-"
        assert page.figures["side-bet ROI"] == "-" and page.figures["rejected lines"] == "0"


# -- the charts ------------------------------------------------------------------------------

CHART = re.compile(r'<svg viewBox[^>]*aria-label="([^"]+)">(.*?)</svg>', re.S)


def charts(page: str) -> dict[str, str]:
    return dict(CHART.findall(page))


def test_charts_have_tooltips_on_every_point_gaps_for_missing_values_and_labelled_axes(
        played, tmp_path):
    store, _, _ = played
    page = make_report(store, tmp_path, "--days", "10")
    text = (tmp_path / "report.html").read_text()
    drawn = charts(text)
    assert set(drawn) == {*PANELS, *FORECASTS}
    for title in PANELS:
        svg = drawn[title]
        values = [row[1:] for row in page.rows(title)]
        if title == "Side-bet ROI":                    # the bars show the ROI column alone
            values = [row[:1] for row in values]
        present = sum(shown(cell)[0] is not None for row in values for cell in row)
        marks = re.findall(r'<(circle|rect) class="(?!partial)(\w+)"[^>]*(?<!/)>'
                           r'(<title>[^<]+</title>)?', svg)
        assert len(marks) == present, title
        assert all(tooltip for _, _, tooltip in marks), f"{title}: a mark without a tooltip"
        assert "time (UTC), one day per" in svg
        assert re.search(r'rotate\(-90\)[^>]*>[^<]*\(.+\)|rotate\(-90\)[^>]*>count<', svg), title
        if title == "Side-bet ROI":
            for _, style, tooltip in marks:
                value = shown(tooltip.split(" side-bet ROI ")[1][:-len("</title>")])[0]
                assert style == ("gain" if value >= 0 else "loss"), tooltip
            assert "gain</text>" in svg and "loss</text>" in svg
        else:
            assert "<polyline" in svg and "<circle" in svg
    # Days without games are gaps: the e40 line breaks there instead of dropping to zero.
    e40 = [shown(row[1])[0] for row in page.rows("e40 bias")]
    runs = [len(run) for run in re.split(r"N+", "".join("N" if v is None else "v" for v in e40))
            if len(run) > 1]
    assert len(runs) >= 2
    lines = re.findall(r'<polyline class="line s1" points="([^"]+)"', drawn["e40 bias"])
    assert [len(points.split()) for points in lines] == runs
    assert '<line class="zero"' in drawn["e40 bias"]
    legends = {title: re.findall(r'y2="14"/><text[^>]*>([^<]+)</text>', drawn[title])
               for title in PANELS}
    assert legends["Accuracy"] == ["within 1 window", "within 2 windows", "within 3 windows"]
    assert legends["Volume"] == ["games ended", "predictions"]
    assert legends["Ingest health"] == ["p99 commit latency", "rejected lines"]


def tick_labels(svg: str) -> list[float]:
    """The numbers on a chart's left axis."""
    return [float(label.replace(",", "")) for label in re.findall(
        rf'<text class="muted" x="{tedstore.CHART_LEFT - 6}" y="[\d.]+" '
        rf'text-anchor="end">([^<]+)</text>', svg)]


def test_the_charts_read_at_a_glance(played, tmp_path):
    """Noise never looks like an event: e40 on an axis symmetric about zero, at least half
    a window out; games and predictions each on an axis of their own; the buckets cut by
    either end of the period shaded and labelled partial; the period stated as asked."""
    store, _, _ = played
    page = make_report(store, tmp_path, "--days", "10")
    text = (tmp_path / "report.html").read_text()
    drawn = charts(text)
    e40 = tick_labels(drawn["e40 bias"])
    assert e40[0] == -e40[-1] and e40[-1] >= 0.5, e40
    assert re.search(r'rotate\(90\)[^>]*>predictions \(count\)<', drawn["Volume"])
    assert re.search(r'rotate\(-90\)[^>]*>games ended \(count\)<', drawn["Volume"])
    for title in PANELS:
        partial = re.findall(r'<rect class="partial"[^>]*><title>([^<]+)</title>', drawn[title])
        names = [row[0] for row in page.rows(title)]
        assert [name for name in names if name.endswith("(partial)")] == [names[0], names[-1]]
        assert len(partial) == 2 and "a partial day" in partial[0], (title, partial)
    assert "10 days · generated" in text
    assert tedstore.period_words(48 * 3600) == "2 days"
    assert tedstore.period_words(36 * 3600) == "36 hours"
    assert tedstore.period_words(90 * 60) == "90 minutes"


def test_the_report_shows_the_commit_latency_a_running_daemon_measured(daemon, tmp_path):
    """Hours not rolled up yet keep their latency only in the daemon: the report asks it."""
    conn = daemon.connect()
    events = list(tedstore.simulate_events(3, seed=8))
    conn.send(*events)
    assert conn.wait_ack(len(events)) == []
    out = tmp_path / "live.html"
    done = run_cli("report", "--db", daemon.db, "--hours", "3", "-o", str(out),
                   env={"TEDSTORE_SOCKET": daemon.socket})
    assert done.returncode == 0, done.stderr
    page = Page(out.read_text())
    measured = [shown(row[1])[0] for row in page.rows("Ingest health")]
    assert measured[-1] is not None and measured[-1] > 0, measured
    assert "No commit latency was measured" not in out.read_text()
    daemon.stop()                                      # without the daemon: not measured
    done = run_cli("report", "--db", daemon.db, "--hours", "3", "-o", str(out),
                   env={"TEDSTORE_SOCKET": daemon.socket})
    assert done.returncode == 0, done.stderr
    assert "No commit latency was measured" in out.read_text()


def test_the_forecast_charts_mark_the_diagonal_the_counts_and_the_worst_fall(played, tmp_path):
    store, reader, _ = played
    page = make_report(store, tmp_path, "--days", "10")
    drawn = charts((tmp_path / "report.html").read_text())
    for title in FORECASTS[:2]:
        svg, rows = drawn[title], page.rows(title)
        points = re.findall(r'<circle class="f1"[^>]*><title>([^<]+)</title>', svg)
        assert len(points) == len(rows) > 1
        counts = re.findall(r'<rect class="count"[^>]*><title>[^<]*: ([\d,]+) \w+</title>', svg)
        assert counts == [row[1] for row in rows]            # each bin's count, drawn
        x1, y1, x2, y2 = map(float, re.search(
            r'<line class="zero" x1="([\d.]+)" y1="([\d.]+)" x2="([\d.]+)" y2="([\d.]+)"',
            svg).groups())
        assert x2 - x1 == y1 - y2 > 0                           # the diagonal, corner to corner
        assert all("95 % interval" in point for point in points)
    bankroll = reader.bankroll(days=10)
    svg = drawn["Bankroll"]
    assert len(re.findall(r"<circle ", svg)) == len(page.rows("Accuracy"))   # one per bucket
    assert bankroll["max_drawdown_to"] is not None
    assert re.search(r'<rect class="band"[^>]*><title>max drawdown', svg)


@pytest.mark.parametrize("count, hourly", [(24, True), (49, True), (72, True), (7, False),
                                           (30, False), (71, False), (365, False), (3660, False)])
def test_time_labels_never_overlap(count, hourly):
    period, first = (HOUR if hourly else DAY), TODAY - 5 * DAY
    starts = [tedstore.utc_text(first + 1800)]                 # a piece cut by the window
    starts += [tedstore.utc_text(first + i * period) for i in range(1, count)]
    series = [tedstore.Series("x", [float(i % 5) for i in range(count)], "s1", "")]
    svg = tedstore.svg_chart("t", starts, hourly, series, y_label="y")
    bottom = tedstore.CHART_HEIGHT - tedstore.CHART_BOTTOM + 17
    labels = [(float(x), text) for x, text in
              re.findall(rf'<text x="([\d.]+)" y="{bottom}" text-anchor="middle">([^<]+)</text>', svg)]
    assert 3 <= len(labels) <= tedstore.MAX_TIME_LABELS
    for (x1, a), (x2, b) in zip(labels, labels[1:]):
        assert x2 - x1 >= 7 * (len(a) + len(b)) / 2 + 6, f"{a!r} and {b!r} overlap"


# -- the command -----------------------------------------------------------------------------

def test_the_report_command_refuses_what_it_cannot_do(played, tmp_path):
    store, _, _ = played
    cases = [
        (["--db", str(tmp_path / "none.db"), "-o", str(tmp_path / "r.html")],
         "does not exist: start the daemon"),
        (["--db", store.path, "-o", str(tmp_path / "no" / "r.html")], "there is no folder"),
        (["--db", store.path, "-o", str(tmp_path / "r.html"), "--days", "2", "--since", "3d"],
         "give --days or --since, not both"),
        (["--db", store.path, "-o", str(tmp_path / "r.html"), "--since", "1d", "--until", "2d"],
         "after it ends"),
        (["--db", store.path, "-o", str(tmp_path / "r.html"), "--since", "last week"],
         "cannot read time"),
        (["--db", store.path], "Missing option '-o'"),
    ]
    for args, words in cases:
        done = run_cli("report", *args)
        assert done.returncode != 0 and words in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr
    assert sorted(os.listdir(tmp_path)) == []                 # nothing created, no partial
    assert not (tmp_path / "none.db").exists()


def test_a_year_of_days_stays_small(played, tmp_path):
    store, _, _ = played
    make_report(store, tmp_path, "--days", "365")
    page = (tmp_path / "report.html").read_text()
    assert page.count("<circle") > 0 and len(page.encode()) <= 2_000_000


# -- in a real browser -----------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def chromium(page: Path, width: int, height: int, folder: Path, dark: bool = False) -> dict:
    """Open the page in headless Chromium with a network log: the screenshot's path, the
    console messages, and every network request the page made."""
    shot, net = folder / f"{page.stem}-{width}{'-dark' if dark else ''}.png", folder / "net.json"
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", f"--user-data-dir={folder / 'profile'}", "--enable-logging=stderr",
         f"--log-net-log={net}", f"--window-size={width},{height}", f"--screenshot={shot}"]
        + (["--force-dark-mode", "--blink-settings=preferredColorScheme=0"] if dark else [])
        + [page.as_uri()], capture_output=True, text=True, timeout=120)
    assert shot.exists(), done.stderr
    console = re.findall(r":CONSOLE[^\]]*\] (.*)", done.stderr)
    log = net.read_text().rstrip().rstrip(",")
    events = json.loads(log if log.endswith("}") and log.count("{") == log.count("}")
                        else log + "]}")["events"]
    requests = sorted({e["params"]["url"] for e in events
                       if "url" in e.get("params", {})
                       and e["params"].get("initiator", "not an origin") != "not an origin"})
    return {"shot": shot, "console": console, "requests": requests}


def png_image(png: Path) -> tuple[int, int, int, bytes]:
    """Width, height, bytes per pixel and the filtered scanlines of an 8-bit RGB(A) PNG."""
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, at = {}, 8
    while at < len(data):
        length, kind = struct.unpack(">I4s", data[at:at + 8])
        chunks.setdefault(kind, []).append(data[at + 8:at + 8 + length])
        at += 12 + length
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[b"IHDR"][0])
    assert depth == 8 and colour in (2, 6) and interlace == 0
    return width, height, 3 if colour == 2 else 4, zlib.decompress(b"".join(chunks[b"IDAT"]))


def looks_blank(png: Path) -> bool:
    """Nearly every filtered byte zero: one colour, or nearly, all over."""
    width, height, size, lines = png_image(png)
    return lines.count(0) > len(lines) - height - 0.002 * width * height * size


def colours(png: Path, rows: int) -> collections.Counter:
    """The colours of the top `rows` scanlines (every 2nd pixel), filters undone."""
    width, height, size, lines = png_image(png)
    stride, high = width * size, int.from_bytes(b"\x80" * width * size, "little")
    low, above, counts = ~high, bytes(width * size), collections.Counter()
    for y in range(min(rows, height)):
        kind, line = lines[y * (stride + 1)], lines[y * (stride + 1) + 1:(y + 1) * (stride + 1)]
        if kind == 1:                                   # Sub: a running sum per channel
            out = bytearray(stride)
            for c in range(size):
                out[c::size] = bytes(itertools.accumulate(line[c::size],
                                                          lambda a, b: (a + b) & 255))
            line = bytes(out)
        elif kind == 2:                                 # Up: bytewise sums, all at once
            a, b = int.from_bytes(line, "little"), int.from_bytes(above, "little")
            line = (((a & low) + (b & low)) ^ ((a ^ b) & high)).to_bytes(stride, "little")
        elif kind in (3, 4):                            # Average, Paeth: byte by byte
            out = bytearray(line)
            for i in range(stride):
                left = out[i - size] if i >= size else 0
                up, corner = above[i], above[i - size] if i >= size else 0
                if kind == 3:
                    out[i] = (out[i] + (left + up) // 2) & 255
                else:
                    guess = left + up - corner
                    near = min((abs(guess - left), 0, left), (abs(guess - up), 1, up),
                               (abs(guess - corner), 2, corner))[2]
                    out[i] = (out[i] + near) & 255
            line = bytes(out)
        above = line
        counts.update(line[x:x + 3] for x in range(0, stride, 2 * size))
    return counts


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (bash .ci/run installs it)")
def test_the_page_renders_in_chromium_without_errors_or_requests(played, tmp_path):
    store, _, _ = played
    make_report(store, tmp_path, "--days", "10")
    page = tmp_path / "report.html"
    folder = Path(tempfile.mkdtemp(prefix="tedstore-report-shots-"))
    for width, height, dark in ((1280, 4200, False), (390, 9000, False), (1280, 1400, True)):
        seen = chromium(page, width, height, folder, dark)
        assert seen["console"] == [], seen["console"]
        assert seen["requests"] == [], seen["requests"]
        assert not looks_blank(seen["shot"]), f"{seen['shot']} looks blank"
        counts = colours(seen["shot"], rows=1000)          # the summary and the first chart
        series = bytes.fromhex("56b4e9" if dark else "0072b2")
        assert counts[series] > 20, f"{seen['shot']}: no chart line drawn in its colour"
    print(f"screenshots in {folder}")


MEASURE = """<script>
const charts = [...document.querySelectorAll(".chart:not(.square)")].map(box => {
  const svg = box.querySelector("svg").getBoundingClientRect(), own = box.getBoundingClientRect();
  return {filled: svg.width / box.closest(".panel").getBoundingClientRect().width,
          scrolls: box.scrollWidth > box.clientWidth + 1,
          at_newest: Math.abs(svg.right - own.right) < 2};
});
const ids = [...document.querySelectorAll("span.nowrap")].map(s => s.getClientRects().length);
document.body.insertAdjacentHTML("beforeend", "<pre id=layout>" +
  JSON.stringify({charts, ids}) + "</pre>");
</script>"""


def layout(page: Path, width: int, folder: Path) -> dict:
    """How Chromium lays the page out at `width`, measured by a script in a copy of it."""
    measured = folder / f"measured-{width}.html"
    measured.write_text(page.read_text().replace("</body>", MEASURE + "</body>"))
    done = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-background-networking", "--hide-scrollbars",
         f"--user-data-dir={folder / 'profile'}", f"--window-size={width},2000", "--dump-dom",
         measured.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r"<pre id=\"layout\">(.*?)</pre>", done.stdout, re.S)
    assert found, done.stderr[-2000:]
    return json.loads(html.unescape(found.group(1)))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (bash .ci/run installs it)")
def test_charts_fill_the_width_and_open_at_the_newest_data_on_a_phone(played, tmp_path):
    """At 1,280 px every time chart is as wide as its panel (its numbers open below it); at
    390 px it scrolls sideways and opens at its right end, the newest data; no game id is
    broken across lines."""
    store, _, _ = played
    make_report(store, tmp_path, "--days", "10")
    page = tmp_path / "report.html"
    wide, narrow = layout(page, 1280, tmp_path), layout(page, 390, tmp_path)
    assert len(wide["charts"]) == len(PANELS) + 1                     # and the bankroll
    assert all(chart["filled"] > 0.95 for chart in wide["charts"]), wide["charts"]
    assert all(chart["scrolls"] and chart["at_newest"] for chart in narrow["charts"]), \
        narrow["charts"]
    assert narrow["ids"] and set(narrow["ids"]) == {1}


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (bash .ci/run installs it)")
def test_the_browser_checks_catch_a_broken_page(tmp_path):
    """The checks above can fail: a page with a script error, a remote image and nothing
    drawn is caught by each of them."""
    broken = tmp_path / "broken.html"
    broken.write_text('<!doctype html><body><img src="http://tedstore.invalid/x.png">'
                      '<script>console.error("boom")</script></body>')
    seen = chromium(broken, 800, 600, tmp_path)
    assert any("boom" in message for message in seen["console"])
    assert seen["requests"] == ["http://tedstore.invalid/x.png"]
    assert looks_blank(seen["shot"])


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (bash .ci/run installs it)")
def test_the_page_prints_on_a4(played, tmp_path):
    store, _, _ = played
    make_report(store, tmp_path, "--days", "10")
    pdf = tmp_path / "report.pdf"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--disable-background-networking", f"--user-data-dir={tmp_path / 'profile'}",
                    "--no-pdf-header-footer", f"--print-to-pdf={pdf}",
                    (tmp_path / "report.html").as_uri()], capture_output=True, timeout=120)
    document = pdf.read_bytes()
    sizes = {tuple(round(float(n)) for n in box.split()[2:])
             for box in re.findall(rb"/MediaBox \[([^\]]+)\]", document)}
    assert sizes == {(595, 842)}                               # A4 in points
    assert 2 <= int(re.search(rb"/Count (\d+)", document).group(1)) <= 8
