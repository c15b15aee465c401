"""Query benchmark: a year of TED-volume data, and every read query timed three ways.

Builds (or reuses, with --db) a database holding a year of the TED tracker's volume: 500
games, 2,000 predictions and 1,000 side bets a day, the last 7 days of tick samples at
50,000 a day, a few rejects, and the hourly and daily rollups. Then prints p50/p99 for
every query over its default window and over 365 days: in process (targets: 20 ms and
1 s), over the socket, and as the wall time of the CLI command; and the time of each
README sqlite3 one-liner through the real sqlite3 CLI (target: 100 ms).

With --trackers 2 that volume comes from two trackers on the same feed (a production
tracker and a candidate, taking turns at the prediction and bet ticks), and the queries
narrowed to one tracker, performance by tracker and trackers are timed too; with
--trackers 2 --each, each tracker makes the full volume (shadow mode, twice the records).

    python bench/queries.py [--db /tmp/year.db] [--runs 20] [--trackers 2 [--each]]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import tedstore  # noqa: E402

DAYS = 365
YEAR = {f"{name}_retention_days": DAYS + 5 for name in ("prediction", "sidebet", "game", "metrics")}
YEAR_ENV = {f"{name.upper()}": str(days) for name, days in YEAR.items()}
PATTERNS = ("double_top", "slow_bleed", "moonshot", "flatline", "whipsaw")


TRACKERS = ("production", "candidate")


def year_of_events(now: float, seed: int = 1, trackers: int = 1, each: bool = False):
    """A day at a time: 500 games, each with 4 predictions and 2 side bets (between the
    trackers, or of each tracker), ticks for the last 7 days (100 samples a game), and 10
    rejects a day."""
    rng = random.Random(seed)
    first_day = int(now // 86400) * 86400 - (DAYS - 1) * 86400
    for day in range(DAYS):
        events = []
        for n in range(500):
            start = first_day + day * 86400 + n * 172.8 + rng.uniform(0, 30)
            if start + 200 > now:
                break
            game, end = f"y{day}-{n}", rng.randint(100, 500)
            events.append({"event": "gameStart", "gameId": game, "tick": 0, "price": 1.0,
                           "ts": start})
            if day >= DAYS - 7:
                events += [{"event": "priceUpdate", "gameId": game, "tick": tick,
                            "price": round(1 + tick / 400 + rng.random(), 4),
                            "features": {"rsi": rng.uniform(0, 100)}, "ts": start + tick * 0.25}
                           for tick in range(10, 1010, 10)]
            for n, tracker in enumerate(TRACKERS[:trackers]):
                whose = {"tracker": tracker} if trackers > 1 else {}
                turn = slice(None) if each else slice(n, None, trackers)
                for tick in (20, 40, 60, 80)[turn]:
                    guess, spread = tick + rng.randint(0, 500), rng.randint(0, 200)
                    events.append({"event": "prediction", "game_id": game,
                                   "predicted_at_tick": tick, "predicted_end_tick": guess,
                                   "confidence": round(rng.uniform(0.5, 0.95), 3),
                                   "uncertainty_bounds": {"lower": guess - spread,
                                                          "upper": guess + spread},
                                   "features_used": {"epr_active": tick == 20},
                                   "ts": start + tick * 0.25, **whose})
                for tick in (40, 80)[turn]:
                    probability = round(rng.betavariate(1.2, 5), 4)
                    ev = round(6 * probability - 1, 4)
                    events.append({"event": "sideBet", "game_id": game, "placed_at_tick": tick,
                                   "probability": probability, "expected_value": ev,
                                   "confidence": 0.6, "recommendation": "BET" if ev > 0 else "SKIP",
                                   "ts": start + tick * 0.25, **whose})
            events.append({"event": "gameEnd", "gameId": game, "tick": end, "finalPrice": 0.1,
                           "startTick": 0, "patterns": rng.sample(PATTERNS, rng.randint(0, 2)),
                           "ts": start + end * 0.25})
        yield events


def build_year(path: str, trackers: int = 1, each: bool = False) -> float:
    """The year in a fresh database at `path`; the seconds it took."""
    started = time.perf_counter()
    now = time.time()
    settings = tedstore.load_settings(db=path, **YEAR)
    conn = tedstore.open_store(path)
    for events in year_of_events(now, trackers=trackers, each=each):
        lines = [msgspec.json.encode(e) + b"\n" for e in events]
        blocks = [b"".join(lines[i:i + 2000]) for i in range(0, len(lines), 2000)]
        blocks.append(b"{not json\n" * 10)
        tedstore.ingest_offline(conn, blocks, settings)
    hours = tedstore.hours_to_roll(conn, now, settings)
    tedstore.run_rollups(conn, lambda step: step(conn), hours, now,
                         days=tedstore.unrolled(conn, "~", now, 86400))
    conn.execute("ANALYZE")
    conn.close()
    return time.perf_counter() - started


ASKED = [  # (query, parameters over its default window, over 365 days)
    ("game", {"id": "y363-100"}, None),                  # yesterday: always played
    ("games", {}, {"days": DAYS}),
    ("metrics", {}, {"days": DAYS}),
    ("performance", {}, {"days": DAYS}),
    ("trends", {}, {"days": DAYS}),
    ("patterns", {}, {"days": DAYS}),
    ("recent_predictions", {}, None),
    ("recent_side_bets", {}, None),
    ("recent_ticks", {}, None),
    ("state", {"key": "tracker.model"}, None),
    ("rejects", {}, {"days": DAYS}),
    ("calibration", {}, {"days": DAYS}),
    ("bankroll", {}, {"days": DAYS}),
]
BY_TRACKER = [  # with two trackers: one tracker's answers, and the answers per tracker
    ("performance", {"tracker": "candidate"}, {"days": DAYS, "tracker": "candidate"}),
    ("performance", {"by": "tracker"}, {"days": DAYS, "by": "tracker"}),
    ("metrics", {"tracker": "candidate"}, {"days": DAYS, "tracker": "candidate"}),
    ("trends", {"tracker": "candidate"}, {"days": DAYS, "tracker": "candidate"}),
    ("patterns", {"tracker": "candidate"}, {"days": DAYS, "tracker": "candidate"}),
    ("games", {"tracker": "candidate"}, {"days": DAYS, "tracker": "candidate"}),
    ("trackers", {}, {"days": DAYS}),
    ("calibration", {"tracker": "candidate"}, {"days": DAYS, "tracker": "candidate"}),
    ("bankroll", {"tracker": "candidate"}, {"days": DAYS, "tracker": "candidate"}),
    ("recent_predictions", {"tracker": "candidate"}, None),
]
COMMAND = {"recent_predictions": None, "recent_side_bets": None, "recent_ticks": None,
           "state": None}


def timed(fn, runs: int) -> tuple[float, float]:
    seconds = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        seconds.append((time.perf_counter() - started) * 1000)
    seconds.sort()
    return statistics.median(seconds), seconds[max(0, int(len(seconds) * 0.99) - 1)]


def cli_args(name: str, params: dict) -> list[str]:
    """The CLI command asking the same: trends and patterns take --days, the rest --since."""
    args = [name] + ([params["id"]] if "id" in params else [])
    for key, value in params.items():
        if key == "days" and name not in ("trends", "patterns"):
            args += ["--since", f"{value}d"]
        elif key != "id":
            args += [f"--{key}", str(value)]
    return args


def the_year(db: str | None, folder: str, trackers: int = 1, each: bool = False) -> str:
    """The year's database: `db` if it exists, else built there (or in `folder`)."""
    db = db or os.path.join(folder, f"year-{trackers}.db")
    if not os.path.exists(db):
        volume = "each at TED volume" if each else "TED volume"
        print(f"built a year of {trackers} tracker(s), {volume}, in "
              f"{build_year(db, trackers, each):.0f} s")
    return db


def year_from_arguments(doc: str, runs: int) -> tuple[argparse.Namespace, str, str]:
    """--db, --runs and --trackers, as every benchmark over the year takes them:
    (arguments, a scratch folder, the year's database)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--db", help="Build the year here, or reuse it if it exists.")
    parser.add_argument("--runs", type=int, default=runs)
    parser.add_argument("--trackers", type=int, choices=(1, 2), default=1)
    parser.add_argument("--each", action="store_true",
                        help="Each tracker at TED volume (with --trackers 2).")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="tedstore-bench-")
    return args, folder, the_year(args.db, folder, args.trackers, args.each)


def main() -> None:
    args, folder, db = year_from_arguments(__doc__, runs=20)
    conn = tedstore.connect(db, readonly=True)
    counts = {table: conn.execute(f"SELECT count(*) FROM {table}").get for table in
              ("games", "predictions", "side_bets", "tick_samples", "metrics_hourly", "rejects")}
    print("rows: " + ", ".join(f"{n:,} {table}" for table, n in counts.items()) +
          f"; {os.path.getsize(db) / 1e6:,.0f} MB")
    sock = os.path.join(folder, "q.sock")
    env = dict(os.environ, TEDSTORE_DB=db, TEDSTORE_SOCKET=sock, **YEAR_ENV)
    daemon = subprocess.Popen([sys.executable, str(ROOT / "tedstore.py"), "serve"], env=env,
                              stderr=subprocess.DEVNULL)
    try:
        while not tedstore.socket_answers(sock):
            time.sleep(0.05)
        remote, local_reader = tedstore.Reader(sock), tedstore.Reader(db_path=db)
        print(f"\n{'query':<36}{'window':>8}  {'in process p50/p99':>20}  "
              f"{'socket p50/p99':>18}  {'CLI wall':>9}")
        for name, default, year in ASKED + (BY_TRACKER if args.trackers > 1 else []):
            for label, params in (("default", default), ("365 d", year)):
                if params is None:
                    continue
                runs = args.runs if label == "default" else max(3, args.runs // 4)
                local = timed(lambda: local_reader.ask(name, **params), runs)
                over = timed(lambda: remote.ask(name, **params), runs)
                wall = "-"
                if name not in COMMAND and "by" not in params:
                    command = [sys.executable, str(ROOT / "tedstore.py"), *cli_args(name, params),
                               "--db", db, "--json"]
                    wall = f"{timed(lambda: subprocess.run(command, capture_output=True, check=True), 3)[0]:.0f} ms"
                asked = " ".join([name] + [f"{key}={params[key]}" for key in ("tracker", "by")
                                           if key in params])
                print(f"{asked:<36}{label:>8}  {local[0]:>9.1f}/{local[1]:>7.1f} ms  "
                      f"{over[0]:>8.1f}/{over[1]:>6.1f} ms  {wall:>9}")
        remote.close()
        local_reader.close()
    finally:
        daemon.terminate()
        daemon.wait(60)
    print("\nREADME sqlite3 one-liners, through the sqlite3 CLI (median of 5):")
    readme = (ROOT / "README.md").read_text().splitlines()
    question = ""
    for line in readme:
        if line.startswith("# "):
            question = line[2:]
        match = re.match(r'^sqlite3 (?:-\S+ )*tedstore\.db "(.+)"$', line)
        if match:
            command = ["sqlite3", db, match.group(1)]
            ms = timed(lambda: subprocess.run(command, capture_output=True, check=True), 5)[0]
            print(f"  {ms:6.1f} ms  {question}")


if __name__ == "__main__":
    main()
