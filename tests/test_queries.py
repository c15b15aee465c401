"""The README's sqlite3 one-liners against a live daemon's database, and the query plans."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import time

import apsw
import pytest

import tedstore
from conftest import query, readme_block, wait_for

ONE_LINER = re.compile(r'^sqlite3 (?:-\S+ )*tedstore\.db "(.+)"$')


def readme_one_liners() -> dict[str, str]:
    """{question (the comment above it): SQL} for every sqlite3 one-liner in the README."""
    found, question = {}, None
    for line in readme_block("sqlite3").splitlines():
        if line.startswith("# "):
            question = line[2:].strip()
        match = ONE_LINER.match(line)
        if match:
            found[question] = match.group(1)
    return found


def sqlite3_cli(db: str, sql: str) -> list[dict]:
    result = subprocess.run(["sqlite3", "-json", db, sql], capture_output=True, text=True,
                            check=True, timeout=30)
    return json.loads(result.stdout) if result.stdout.strip() else []


def utc_day(at: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(at))


@pytest.fixture
def live(daemon):
    """A daemon that has played a few games, the last ending seconds ago, with rejects.

    Within half a minute of midnight UTC it first waits, so that "today" in the README's
    questions holds that last game both when it is sent and when the sqlite3 CLI asks.
    """
    wait_for(lambda: utc_day(time.time() - 30) == utc_day(time.time() + 30), timeout=90,
             what="midnight UTC to be half a minute past")
    with tedstore.Client(daemon.socket) as client:
        for event in tedstore.simulate_events(6, seed=21):
            client.send(event)
        client.send({"event": "nonsense"})
        assert client.flush(30)
    return daemon


def rows(db: str, sql: str) -> list[dict]:
    conn = apsw.Connection(db, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return tedstore.rows_as_dicts(conn.execute(sql))
    finally:
        conn.close()


def check_accuracy_daily(db, answer):
    resolved = [r["raw_error"] for r in rows(db, "SELECT raw_error FROM predictions "
                                                 "WHERE raw_error IS NOT NULL")]
    total = sum(r["predictions"] for r in answer)
    assert total == query(db, "SELECT count(*) FROM predictions")[0][0]
    assert sum(r["resolved"] for r in answer) == len(resolved)
    if len(answer) == 1:
        assert answer[0]["mean_absolute_error"] == round(statistics.mean(map(abs, resolved)), 2)
        assert answer[0]["within_1_window_pct"] == \
            round(100 * sum(abs(e) <= 40 for e in resolved) / len(resolved), 1)


def check_roi_daily(db, answer):
    bets = rows(db, "SELECT actual_outcome, payout FROM side_bets WHERE recommendation = 'BET'")
    assert sum(r["bets"] for r in answer) == len(bets)
    assert sum(r["won"] for r in answer) == sum(b["actual_outcome"] == "WON" for b in bets)
    if len(answer) == 1:
        assert answer[0]["roi_percentage"] == \
            round(100 * sum(b["payout"] for b in bets) / len(bets), 1)


def check_game_summary(db, answer):
    games = rows(db, "SELECT game_id, end_tick FROM games")
    assert len(answer) == min(10, len(games))
    for line in answer:
        assert line["predictions"] == query(
            db, "SELECT count(*) FROM predictions WHERE game_id = ?", (line["game_id"],))[0][0]
        assert line["end_tick"] == next(g["end_tick"] for g in games if g["game_id"] == line["game_id"])


def check_last_24_hours(db, answer):
    since = tedstore.utc_text(time.time() - 86400)
    errors = [r["raw_error"] for r in rows(db, "SELECT raw_error, created_at FROM predictions "
                                               "WHERE raw_error IS NOT NULL")
              if r["created_at"] > since]
    assert answer == [{"resolved": len(errors),
                       "mean_abs_error_ticks": round(statistics.mean(map(abs, errors)), 1),
                       "within_1_window_pct":
                           round(100 * sum(abs(e) <= 40 for e in errors) / len(errors), 1)}]


def check_worst_today(db, answer):
    today = utc_day(time.time())
    ended = {game for (game,) in query(db, "SELECT game_id FROM games WHERE ended_at >= ?",
                                       (today,))}
    by_game: dict[str, list[int]] = {}
    for r in rows(db, "SELECT game_id, raw_error FROM predictions"):
        if r["game_id"] in ended:
            by_game.setdefault(r["game_id"], []).append(r["raw_error"])
    expected = sorted(((g, len(e), round(statistics.mean(map(abs, e)), 1))
                       for g, e in by_game.items()), key=lambda t: (-t[2], t[0]))[:10]
    assert [(r["game_id"], r["predictions"], r["mean_absolute_error"]) for r in answer] == expected


def check_roi_by_day(db, answer):
    assert set(answer[0]) == {"day", "bets", "won", "lost", "roi_percentage"}
    check_roi_daily(db, answer)


def check_rejects(db, answer):
    assert [(r["code"], "nonsense" in r["error"]) for r in answer] == [("unknown_event", True)]
    assert answer[0]["line_no"] == query(db, "SELECT line_no FROM rejects")[0][0]


CHECKS = {
    "View prediction_accuracy_daily": check_accuracy_daily,
    "View side_bet_roi_daily": check_roi_daily,
    "View game_summary": check_game_summary,
    "How accurate were we in the last 24 hours?": check_last_24_hours,
    "Which games that ended today had the worst predictions?": check_worst_today,
    "Side-bet ROI by day": check_roi_by_day,
    "What was rejected in the last hour, and why?": check_rejects,
}


def test_every_readme_one_liner_has_a_check():
    questions = {q.split(":")[0] for q in readme_one_liners()}
    assert questions == set(CHECKS)


@pytest.mark.parametrize("question", sorted(CHECKS))
def test_readme_one_liner_answers_through_the_sqlite3_cli(live, question):
    sql = next(s for q, s in readme_one_liners().items() if q.split(":")[0] == question)
    answer = sqlite3_cli(live.db, sql)
    assert answer, f"no answer to {question!r}"
    CHECKS[question](live.db, answer)


# -- query plans --------------------------------------------------------------------------------

def statements() -> dict[str, str]:
    """Every SQL statement tedstore runs, by name: its SQL_* constants and SQL_* tables."""
    found = {}
    for name, value in vars(tedstore).items():
        if name.startswith("SQL_") and isinstance(value, str):
            found[name] = value
        elif name.startswith("SQL_") and isinstance(value, dict):
            found.update((f"{name}[{key}]", sql) for key, sql in value.items())
    return found


def people_statements() -> dict[str, str]:
    """What people run in sqlite3: the views and the README's time-range one-liners."""
    found = {"game_summary view": "SELECT * FROM game_summary WHERE game_id = ?1"}
    for question, sql in readme_one_liners().items():
        if "created_at" in sql or "received_at" in sql:
            found[f"README: {question}"] = sql
    return found


def plan(conn: apsw.Connection, sql: str) -> list[str]:
    named = re.findall(r"(?<!')\B:([A-Za-z_]\w*)", sql)
    numbered = [int(n) for n in re.findall(r"\?(\d+)", sql)]
    params = dict.fromkeys(named) if named else \
        (None,) * (max(numbered) if numbered else sql.count("?"))
    return [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params)]


def month_of_games(path: str) -> apsw.Connection:
    conn = tedstore.open_store(path)
    settings = tedstore.load_settings(db=path)
    for day in range(30):
        events = tedstore.simulate_events(3, seed=day, start=time.time() - (day + 1) * 86400)
        tedstore.ingest_offline(conn, [json.dumps(e).encode() + b"\n" for e in events], settings)
    return conn


@pytest.fixture(scope="module", params=["daemon statistics", "statistics of a tiny table",
                                        "no statistics"])
def planner(request, tmp_path_factory):
    yield from planner_with(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def daemon_planner(tmp_path_factory):
    yield from planner_with("daemon statistics", tmp_path_factory)


def planner_with(statistics: str, tmp_path_factory):
    """A database with a month of games, and either the statistics the daemon's PRAGMA
    optimize keeps, or stale ones gathered when the tables held a few rows."""
    path = str(tmp_path_factory.mktemp("plan") / "plan.db")
    if statistics == "daemon statistics":
        conn = month_of_games(path)
        conn.pragma("optimize", tedstore.OPTIMIZE_ON_OPEN)
    elif statistics == "no statistics":
        conn = month_of_games(path)
    else:
        conn = tedstore.open_store(path)
        events = tedstore.simulate_events(1, seed=99, events=30)
        tedstore.ingest_offline(conn, [json.dumps(e).encode() + b"\n" for e in events],
                                tedstore.load_settings(db=path))
        conn.execute("ANALYZE")
        conn.close()
        conn = month_of_games(path)
    yield conn
    conn.close()


# Ordered index scans that stop at a LIMIT are fine; everything else must search, but
# for tables that hold a handful of rows by design.
ORDERED_SCANS = ("SQL_Q_RECENT[",)
SMALL_TABLES = ("sqlite_master", "jobs", "state")       # sqlite_schema is sqlite_master
TABLES = ("games", "predictions", "side_bets", "tick_samples", "metrics_hourly",
          "metrics_daily", "rejects", *SMALL_TABLES)


def stored_tables(sql: str) -> dict[str, str]:
    """{name or alias: table} for the stored tables a statement reads."""
    found = {}
    for table, alias in re.findall(r"\b(?:FROM|JOIN|UPDATE)\s+(\w+)(?:\s+(?:AS\s+)?(\w+))?", sql):
        if table in TABLES:
            found[table] = table
            if alias and alias.upper() not in ("INDEXED", "WHERE", "ON", "SET", "CROSS",
                                                "ORDER", "GROUP", "LIMIT", "JOIN"):
                found[alias] = table
    return found


def assert_uses_an_index(conn: apsw.Connection, name: str, sql: str) -> None:
    """No statement reads a whole table: each one searches an index (json_each lists aside)."""
    steps = plan(conn, sql)
    views = conn.execute("SELECT group_concat(sql, ' ') FROM sqlite_master WHERE type = 'view' "
                         "AND instr(?1, name)", (sql,)).get or ""
    tables = stored_tables(sql + " " + views)
    bad = [step for step in steps
           if re.match(r"(SCAN|SEARCH) (?!\()", step) and step.split()[1] in tables
           and tables[step.split()[1]] not in SMALL_TABLES
           and ("USING" not in step or (step.startswith("SCAN") and not name.startswith(ORDERED_SCANS)))]
    assert not bad, f"{name}: {steps}"


@pytest.mark.parametrize("name", sorted(statements()))
def test_every_query_uses_an_index(planner, name):
    assert_uses_an_index(planner, name, statements()[name])


@pytest.mark.parametrize("name", sorted(people_statements()))
def test_the_views_and_one_liners_use_an_index(daemon_planner, name):
    assert_uses_an_index(daemon_planner, name, people_statements()[name])
