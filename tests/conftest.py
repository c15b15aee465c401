"""Fixtures: a temporary folder, the daemon as a real subprocess or in-process, raw connections."""

from __future__ import annotations

import contextlib
import decimal
import itertools
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import apsw
import msgspec
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import tedstore  # noqa: E402

README = ROOT / "README.md"
_README_BLOCK = re.compile(r"<!-- readme: ([\w-]+)[^>]*-->\n```\w*\n(.*?)```", re.S)


def readme_blocks() -> dict[str, str]:
    """The README's code blocks by their tag (<!-- readme: TAG --> above each)."""
    return dict(_README_BLOCK.findall(README.read_text()))


def readme_block(tag: str) -> str:
    """A README code block as a user would copy it; tests/test_readme.py checks that
    every block is run (or checked) by a test that asks for it here."""
    return readme_blocks()[tag]


def commands_of(block: str) -> list[str]:
    """A shell block's commands: comment lines left out, continued lines joined."""
    joined = block.replace("\\\n", " ")
    return [line for line in joined.splitlines() if line.strip() and not line.startswith("#")]


BIN = os.path.dirname(sys.executable)           # where pip put tedstore (and litestream)


def localized(text: str, folder: Path, **extra: str) -> str:
    """A deployment's paths as a test folder's, without sudo or the tedstore user."""
    for deployed, local in {"/var/lib/tedstore/": f"{folder}/", "/var/lib/tedstore ": f"{folder} ",
                            "/srv/backups": f"{folder}/srv",
                            "/var/lib/node_exporter/": f"{folder}/node_exporter/",
                            "/opt/tedstore/bin/": f"{BIN}/", "-o tedstore -g tedstore ": "",
                            "sudo -u tedstore ": "", "sudo ": "", **extra}.items():
        text = text.replace(deployed, local)
    return text


def shell(line: str, folder: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """One README command in bash, in `folder`, with tedstore on the PATH and its defaults."""
    env = clean_env({"PATH": f"{BIN}:{os.environ['PATH']}"})
    return subprocess.run(["bash", "-c", line], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def tmp():
    """A short folder: Unix socket paths must stay under 108 bytes."""
    folder = Path(tempfile.mkdtemp(prefix="ts-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def answered_at(epoch: float) -> str:
    """A time as answers give it (RFC 3339, Z)."""
    return tedstore.answer_time(tedstore.utc_text(epoch))


def answered_row(row: dict) -> dict:
    """A stored row as answers give it: its times in RFC 3339."""
    return {key: tedstore.answer_time(value) if key in tedstore.TIME_COLUMNS else value
            for key, value in row.items()}


def stored(answered: str | None) -> str | None:
    """An answer's time as the database keeps it, to compare with its rows."""
    return None if answered is None else tedstore.stored_time(answered)


def wait_for(predicate, timeout: float = 15.0, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def idle_for(socket_path: str) -> float:
    """Seconds since the daemon's last commit, as it reports them."""
    status = tedstore.request(socket_path, "status")["status"]
    return time.time() - tedstore.parse_when(status["repository"]["last_save"], 0)


def clean_env(extra: dict | None = None) -> dict:
    """The environment without tedstore's settings or systemd's variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TEDSTORE_", "PERSISTENCE_", "NOTIFY_", "WATCHDOG_"))}
    env.update(extra or {})
    return env


def run_cli(*args, env: dict | None = None, input: bytes | str | None = None, cwd=None,
            text: bool = True) -> subprocess.CompletedProcess:
    """`tedstore ARGS` as a subprocess, in a clean environment plus `env`."""
    return subprocess.run([sys.executable, "-m", "tedstore", *args], input=input, cwd=cwd,
                          capture_output=True, text=text, env=clean_env(env), timeout=120)


class DaemonProcess:
    """`tedstore serve` as a subprocess, with its log in a file."""

    def __init__(self, folder: Path, env: dict | None = None, args: tuple = ()):
        self.folder = folder
        self.db = str(folder / "tedstore.db")
        self.socket = str(folder / "tedstore.sock")
        self.log_path = folder / "daemon.log"
        self.env = {"TEDSTORE_DB": self.db, "TEDSTORE_SOCKET": self.socket, **(env or {})}
        self.args = args
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> "DaemonProcess":
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tedstore", "serve", *self.args], cwd=self.folder,
            env=clean_env(self.env),
            stdout=subprocess.DEVNULL, stderr=open(self.log_path, "ab"))
        if wait:
            wait_for(lambda: self.proc.poll() is not None or tedstore.socket_answers(self.socket),
                     what="the daemon to listen")
            assert self.proc.poll() is None, self.log()
        return self

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def connect(self) -> "Conn":
        return Conn(self.socket)

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        return query(self.db, sql, params)


def query(db: str, sql: str, params: tuple = ()) -> list[tuple]:
    conn = apsw.Connection(db, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


@pytest.fixture
def daemon_factory(tmp):
    started: list[DaemonProcess] = []

    def make(env: dict | None = None, args: tuple = (), start: bool = True, folder: Path = None):
        daemon = DaemonProcess(folder or tmp, env, args)
        started.append(daemon)
        return daemon.start() if start else daemon

    yield make
    for daemon in started:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.kill()
    for daemon in started:      # whatever a test checked, the daemon itself must not have failed
        assert "Traceback" not in daemon.log(), daemon.log()


@pytest.fixture
def daemon(daemon_factory) -> DaemonProcess:
    return daemon_factory()


class Conn:
    """A raw NDJSON connection that reads replies as the tests need them."""

    def __init__(self, path: str, timeout: float = 15.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buffer = b""
        self.replies: list[dict] = []
        self.acked = 0            # the highest ack received
        self._reported = 0        # replies already looked at by wait_ack

    def send(self, *lines) -> None:
        data = b"".join((line if isinstance(line, bytes) else
                         (json.dumps(line) if isinstance(line, dict) else line).encode()) + b"\n"
                        for line in lines)
        self.sock.sendall(data)

    def read_reply(self) -> dict:
        while b"\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by tedstore")
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        reply = json.loads(line)
        self.replies.append(reply)
        self.acked = max(self.acked, reply.get("ack", 0))
        return reply

    def poll(self, wait: float = 0.0) -> list[dict]:
        """The replies that arrive within `wait` seconds, without blocking any longer."""
        if select.select([self.sock], [], [], wait)[0]:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by tedstore")
            self.buffer += data
        replies = []
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            replies.append(json.loads(line))
            self.acked = max(self.acked, replies[-1].get("ack", 0))
        self.replies.extend(replies)
        return replies

    def read_until(self, key: str) -> dict:
        """The next reply carrying `key`; acks may come in between."""
        while True:
            reply = self.read_reply()
            if key in reply:
                return reply

    def wait_ack(self, n: int) -> list[dict]:
        """Read replies until an ack >= n; return the rejections since the last wait_ack."""
        while self.acked < n:
            self.read_reply()
        rejected = [r for r in self.replies[self._reported:] if "rejected" in r]
        self._reported = len(self.replies)
        return rejected

    def close(self) -> None:
        self.sock.close()


class InProcessDaemon:
    """The Daemon object in a thread: for faults only a test VFS or a hook can cause."""

    def __init__(self, folder: Path, vfs: str | None = None, **settings):
        self.settings = tedstore.load_settings(db=str(folder / "tedstore.db"),
                                               socket=str(folder / "tedstore.sock"), **settings)
        self.daemon = tedstore.Daemon(self.settings, vfs=vfs)
        self.code = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.code = self.daemon.run()

    def start(self) -> "InProcessDaemon":
        self.thread.start()
        wait_for(lambda: self.daemon.ready.is_set() or not self.thread.is_alive(),
                 what="the in-process daemon")
        assert self.daemon.ready.is_set(), "the in-process daemon did not start"
        return self

    def stop(self) -> int:
        self.daemon.request_stop()
        self.thread.join(60)
        assert not self.thread.is_alive()
        return self.code

    @property
    def socket(self) -> str:
        return self.settings.socket

    @property
    def db(self) -> str:
        return self.settings.db


@pytest.fixture
def inprocess(tmp):
    running: list[InProcessDaemon] = []

    def make(vfs: str | None = None, **settings) -> InProcessDaemon:
        daemon = InProcessDaemon(tmp, vfs, **settings).start()
        running.append(daemon)
        return daemon

    yield make
    for daemon in running:
        if daemon.thread.is_alive():
            daemon.stop()


# -- events, as trackers send them: every test builds them here ------------------------------

def game_start(game: str = "g", tick: int = 0, price: float = 1.0, **extra) -> dict:
    return {"event": "gameStart", "gameId": game, "tick": tick, "price": price, **extra}


def price_update(game: str, tick: int, price: float, **extra) -> dict:
    return {"event": "priceUpdate", "gameId": game, "tick": tick, "price": price, **extra}


def game_end(game: str = "g", at: int = 100, final: float = 0.2, **extra) -> dict:
    return {"event": "gameEnd", "gameId": game, "tick": at, "finalPrice": final, **extra}


def prediction(game: str, at: int, end: int, **extra) -> dict:
    return {"event": "prediction", "game_id": game, "predicted_at_tick": at,
            "predicted_end_tick": end, "confidence": 0.5, **extra}


def side_bet(game: str, at: int, recommendation: str = "BET", **extra) -> dict:
    return {"event": "sideBet", "game_id": game, "placed_at_tick": at, "probability": 0.2,
            "expected_value": 0.2, "confidence": 0.6, "recommendation": recommendation, **extra}


def state_write(key: str, value, **extra) -> dict:
    return {"event": "state", "key": key, "value": value, **extra}


def predictions(game: str, n: int, start: int = 0) -> list[dict]:
    """n predictions of one game, at ticks start, start + 1, ..., each 50 ticks out."""
    return [prediction(game, tick, tick + 50) for tick in range(start, start + n)]


HOUR = tedstore.text_epoch("2026-11-20 10:00:00.000")      # a fixed hour the jobs' tests use


def at(hour: float, minute: float) -> float:
    """Unix seconds at `minute` past the hour, as a ts in milliseconds."""
    return (hour + minute * 60) * 1000


def local_write(conn: apsw.Connection):
    """A job's write steps run on `conn` itself (the CLI's way; the daemon's is its writer)."""
    return lambda fn: fn(conn)


# -- a play with known outcomes: the plain-Python oracle of the queries ---------------------

NOW = time.time()
FIRST_HOUR = tedstore.hour_floor(NOW) - 8 * 3600           # eight complete hours of play
PATTERNS = ("alpha", "beta", "gamma", "delta")


# Forecasts on the edges the evaluation must get right: 0, 1, bin edges as written (0.57
# is 0.5699999... as a float, and on an edge with 100 bins).
EDGE_FORECASTS = (0.0, 1.0, 0.1, 0.3, 0.5, 0.57, 0.25, 0.7)


def overconfident(rng: random.Random, happens: bool) -> float:
    """A side bet's probability that leans towards the outcome but overstates it: a
    known miscalibration (and now and then a forecast on an edge)."""
    if rng.random() < 0.3:
        return rng.choice(EDGE_FORECASTS)
    return round(rng.uniform(0.3, 1.0) if happens else rng.uniform(0.0, 0.75), 4)


def forecast_bounds(rng: random.Random, guess: int, end_tick: int) -> tuple:
    """A prediction's confidence and bounds: none at all now and then, sometimes a single
    tick (lower = upper, on the real end or not), else around the guess."""
    confidence = rng.choice((0.5, 0.9, 1.0, 0.25, round(rng.uniform(0.4, 0.99), 3)))
    roll = rng.random()
    if roll < 0.2:
        return confidence, None, None
    if roll < 0.3:
        tick = rng.choice((guess, end_tick))
        return confidence, tick, tick
    return confidence, guess - rng.randint(0, 150), guess + rng.randint(0, 150)


class Play:
    """Games, predictions and side bets with known outcomes, and what each query should say.

    With `trackers`, each tracker (name, model) predicts and bets on every game on its own,
    as a production tracker and a shadow candidate do; without, the default tracker alone,
    its lines naming no tracker."""

    def __init__(self, seed: int = 7, games: int = 48,
                 trackers: tuple[tuple[str, str], ...] = (), first_hour: int = FIRST_HOUR,
                 hours: int = 6, endless: int = 7):
        """`games` games in turn over `hours` hours from `first_hour`; game n never ends
        when n % endless == 3."""
        rng = random.Random(seed)
        forecasts = random.Random(seed + 1)                 # confidences, bounds, probabilities
        self.events, self.games, self.predictions, self.bets = [], [], [], []
        self.state: dict[tuple[str, str], object] = {}
        whose = [(name, model, {"tracker": name, "model_version": model})
                 for name, model in trackers] or [("default", "v2.1.0", {})]
        for number in range(games):
            hour = first_hour + (number % hours) * 3600
            start = hour + rng.randint(60, 2400) + rng.randint(0, 999) / 1000
            end_tick = rng.randint(60, 500)
            ends = number % endless != 3                      # a few games never end
            ended = start + end_tick * 0.25 if ends else None
            game = {"id": f"g{seed}-{number:02d}", "start": start, "end_tick": end_tick,
                    "ended": ended, "patterns": sorted(rng.sample(PATTERNS, rng.randint(0, 2))),
                    "predictions": []}
            self.events.append(game_start(game["id"], 0, 1.0, ts=start))
            for tracker, model, fields in whose:
                for tick in range(20, end_tick, 40):
                    ts = start + tick * 0.25
                    guess = tick + rng.randint(0, 300)
                    confidence, lower, upper = forecast_bounds(forecasts, guess, end_tick)
                    bounds = {} if lower is None else \
                        {"uncertainty_bounds": {"lower": lower, "upper": upper}}
                    self.events.append(prediction(game["id"], tick, guess, ts=ts, **fields,
                                                  features_used={"epr_active": tick % 80 == 20},
                                                  confidence=confidence, **bounds))
                    row = {"game": game["id"], "ts": ts, "tracker": tracker, "model": model,
                           "error": guess - end_tick if ends else None,
                           "confidence": confidence, "lower": lower, "upper": upper,
                           "actual": end_tick if ends else None}
                    self.predictions.append(row)
                    game["predictions"].append(row)
                for tick in range(30, end_tick + 40, 60):
                    ts = start + tick * 0.25
                    if ended is not None and ts > ended:
                        break
                    advice = "BET" if tick % 120 == 30 else "SKIP"
                    ev = round(rng.uniform(-0.5, 0.5), 3)
                    probability = overconfident(forecasts, tick <= end_tick <= tick + 40)
                    self.events.append(side_bet(game["id"], tick, advice, expected_value=ev,
                                                probability=probability,
                                                ts=ts, **{k: v for k, v in fields.items()
                                                          if k == "tracker"}))
                    outcome = None if not ends else \
                        ("WON" if tick <= end_tick <= tick + 40 else "LOST")
                    self.bets.append({"ts": ts, "advice": advice, "ev": ev, "outcome": outcome,
                                      "tracker": tracker, "game": game["id"], "tick": tick,
                                      "p": probability, "ended": ended,
                                      "payout": None if outcome is None else
                                      (5.0 if outcome == "WON" else -1.0)})
            if ends:
                self.events.append(game_end(game["id"], at=end_tick, final=0.5,
                                            patterns=game["patterns"], ts=ended))
            self.games.append(game)
        for tracker, _, fields in whose:                       # each tracker's own state
            self.state[tracker, "tracker.model"] = {"weights": [len(tracker), seed]}
            self.events.append(state_write("tracker.model", self.state[tracker, "tracker.model"],
                                           **{k: v for k, v in fields.items() if k == "tracker"}))

    def performance(self, since: float, until: float, tracker: str | None = None,
                    model: str | None = None) -> dict:
        """What performance says of [since, until), of one tracker (and model) or all."""
        made = [p for p in self.predictions if since <= round(p["ts"], 3) < until
                and tracker in (None, p["tracker"]) and model in (None, p["model"])]
        errors = [p["error"] for p in made if p["error"] is not None]
        bets = [b for b in self.bets if since <= round(b["ts"], 3) < until
                and tracker in (None, b["tracker"])]
        advised = [b for b in bets if b["advice"] == "BET"]
        settled = [b for b in advised if b["outcome"]]
        won = sum(b["outcome"] == "WON" for b in settled)
        payout = 5.0 * won - (len(settled) - won)

        def share(windows: int) -> float | None:
            return 100.0 * sum(abs(e) <= 40 * windows for e in errors) / len(errors) \
                if errors else None
        return {
            "games_analyzed": sum(1 for g in self.games
                                  if g["ended"] is not None and since <= round(g["ended"], 3) < until),
            "prediction_metrics": {
                "predictions_made": len(made), "resolved": len(errors),
                "median_e40": statistics.median(errors) / 40 if errors else None,
                "mean_absolute_error": sum(map(abs, errors)) / len(errors) if errors else None,
                "within_1_window": share(1), "within_2_windows": share(2),
                "within_3_windows": share(3)},
            "sidebet_metrics": {
                "recommended": len(advised), "positive_ev": sum(b["ev"] > 0 for b in bets),
                "bets_won": won, "bets_lost": len(settled) - won,
                "pending": len(advised) - len(settled),
                "total_ev": sum(b["ev"] for b in settled),
                "roi_percentage": 100.0 * payout / len(settled) if settled else None}}


    def calibration(self, since: float, until: float, tracker: str | None = None,
                    model: str | None = None, bins: int = 10) -> dict:
        """What calibration says of [since, until): every score straight from its definition
        (SPEC section 7), over the raw records."""
        def bin_of(value: float) -> int:
            return min(int(decimal.Decimal(repr(value)) * bins), bins - 1)

        bets = [b for b in self.bets if since <= round(b["ts"], 3) < until
                and tracker in (None, b["tracker"]) and b["outcome"] is not None]
        happened = {id(b): 1.0 if b["outcome"] == "WON" else 0.0 for b in bets}
        side_bets = {"n": len(bets), "base_rate": None, "brier": None, "reliability": None,
                     "resolution": None, "uncertainty": None, "bins": [],
                     "expected_value": {"stated": None, "realized": None}}
        if bets:
            rate = statistics.fmean(happened.values())
            grouped = {}
            for b in bets:
                grouped.setdefault(bin_of(b["p"]), []).append(b)
            parts = []
            for k in sorted(grouped):
                members = grouped[k]
                mean_p = statistics.fmean(b["p"] for b in members)
                seen = statistics.fmean(happened[id(b)] for b in members)
                parts.append((k, len(members), mean_p, seen))
            side_bets.update(
                base_rate=100 * rate,
                brier=statistics.fmean((b["p"] - happened[id(b)]) ** 2 for b in bets),
                reliability=sum(n * (p - o) ** 2 for _, n, p, o in parts) / len(bets),
                resolution=sum(n * (o - rate) ** 2 for _, n, _, o in parts) / len(bets),
                uncertainty=rate * (1 - rate),
                bins=[{"lower": 100 * k / bins, "upper": 100 * (k + 1) / bins, "n": n,
                       "mean_probability": 100 * p, "observed_rate": 100 * o}
                      for k, n, p, o in parts])
            placed = [b for b in bets if b["advice"] == "BET"]
            if placed:
                side_bets["expected_value"] = {"stated": sum(b["ev"] for b in placed),
                                               "realized": sum(b["payout"] for b in placed)}
        spans = [p for p in self.predictions if since <= round(p["ts"], 3) < until
                 and tracker in (None, p["tracker"]) and model in (None, p["model"])
                 and p["actual"] is not None and p["lower"] is not None]
        intervals = {"n": len(spans), "coverage": None, "mean_confidence": None,
                     "mean_width_ticks": None, "bins": []}
        if spans:
            def covered(group):
                return 100 * statistics.fmean(p["lower"] <= p["actual"] <= p["upper"]
                                              for p in group)
            grouped = {}
            for p in spans:
                grouped.setdefault(bin_of(p["confidence"]), []).append(p)
            intervals.update(
                coverage=covered(spans),
                mean_confidence=100 * statistics.fmean(p["confidence"] for p in spans),
                mean_width_ticks=statistics.fmean(p["upper"] - p["lower"] for p in spans),
                bins=[{"lower": 100 * k / bins, "upper": 100 * (k + 1) / bins,
                       "n": len(grouped[k]),
                       "mean_confidence": 100 * statistics.fmean(p["confidence"]
                                                                 for p in grouped[k]),
                       "coverage": covered(grouped[k])} for k in sorted(grouped)])
        return {"side_bets": side_bets, "intervals": intervals}

    def bankroll(self, since: float, until: float, tracker: str | None = None) -> dict:
        """What bankroll says of [since, until), by brute force: every fall from every
        earlier point, every run of losses."""
        bets = sorted((b for b in self.bets if since <= round(b["ts"], 3) < until
                       and tracker in (None, b["tracker"]) and b["advice"] == "BET"
                       and b["outcome"] is not None),
                      key=lambda b: (tedstore.utc_text(b["ended"]), b["game"], b["tick"],
                                     b["tracker"]))
        payouts = [b["payout"] for b in bets]
        times = [tedstore.utc_text(since)] + [tedstore.utc_text(b["ended"]) for b in bets]
        cumulative = [0.0] + list(itertools.accumulate(payouts))
        fall, fall_from, fall_to = 0.0, None, None
        for j in range(1, len(cumulative)):
            drop = max(cumulative[:j]) - cumulative[j]
            if drop > fall:                                  # the earliest deepest trough
                top = max(cumulative[:j])
                i = max(i for i in range(j) if cumulative[i] == top)    # its latest peak
                fall, fall_from, fall_to = drop, times[i], times[j]
        streaks = [len(list(run)) for lost, run in
                   itertools.groupby(b["outcome"] == "LOST" for b in bets) if lost]
        hourly = until - since <= 3 * 86400
        curve = {}
        for b, total in zip(bets, cumulative[1:]):
            start = (tedstore.hour_floor(b["ended"]) if hourly
                     else b["ended"] // 86400 * 86400)
            curve[tedstore.utc_text(start)] = total
        mean = statistics.fmean(payouts) if payouts else None
        stdev = statistics.stdev(payouts) if len(payouts) >= 2 else None
        return {"bets": len(bets), "won": sum(b["outcome"] == "WON" for b in bets),
                "lost": sum(b["outcome"] == "LOST" for b in bets), "pnl": sum(payouts),
                "roi_percentage": None if mean is None else 100 * mean,
                "mean_payout": mean, "stdev_payout": stdev,
                "sharpe_per_bet": mean / stdev if stdev else None,
                "max_drawdown": fall, "max_drawdown_from": tedstore.answer_time(fall_from),
                "max_drawdown_to": tedstore.answer_time(fall_to),
                "longest_losing_streak": max(streaks, default=0),
                "curve": [{"t": tedstore.answer_time(t), "pnl": v} for t, v in curve.items()]}


def close(expected):
    """`expected` with every float compared as pytest.approx does, however deep."""
    if isinstance(expected, dict):
        return {key: close(value) for key, value in expected.items()}
    if isinstance(expected, list):
        return [close(value) for value in expected]
    return pytest.approx(expected) if isinstance(expected, float) else expected


# Retention long enough for the fixed instants (2025) that the lifecycle tests pin down;
# the timestamp bounds themselves are tested with the real defaults.
LONG_RETENTION = {f"{table}_retention_days": 36500
                  for table in ("tick", "prediction", "sidebet", "game", "metrics")}


class Store:
    """A real database file fed through the same batches the writer commits."""

    def __init__(self, path: Path, **overrides):
        self.path = str(path)
        self.settings = tedstore.load_settings(db=self.path, **overrides)
        self.conn = tedstore.open_store(self.path)

    def send(self, *events, batch_size: int | None = None,
             settings: tedstore.Settings | None = None) -> list[tuple[int, str, str]]:
        lines = [msgspec.json.encode(e) + b"\n" if not isinstance(e, bytes) else e + b"\n"
                 for e in events]
        size = batch_size or len(lines) or 1
        settings = msgspec.structs.replace(settings or self.settings, batch_size=size)
        return tedstore.ingest_offline(self.conn, lines, settings).rejections

    def rows(self, sql: str, params: tuple = ()) -> list[tuple]:
        return self.conn.execute(sql, params).fetchall()

    def one(self, sql: str, params: tuple = ()) -> dict:
        return tedstore.rows_as_dicts(self.conn.execute(sql, params))[0]

    def roll_up(self) -> None:
        """Every hour the scheduler would roll up now, rolled up."""
        now = time.time()
        tedstore.run_rollups(self.conn, lambda step: step(self.conn),
                             tedstore.hours_to_roll(self.conn, now, self.settings), now)

    @contextlib.contextmanager
    def reading(self):
        """A Reader on this database; both closed after."""
        reader = tedstore.Reader(db_path=self.path)
        try:
            yield reader
        finally:
            reader.close()
            self.conn.close()


@pytest.fixture
def store(tmp):
    store = Store(tmp / "t.db", **LONG_RETENTION)
    yield store
    store.conn.close()


class WatchedVFS(apsw.VFS):
    """The default VFS, calling on_write/on_sync before each write or sync of a database
    or WAL file: the hook may raise an I/O error, or block, as a test needs."""

    def __init__(self, name: str) -> None:
        super().__init__(name, "")

    def xOpen(self, name, flags):
        return WatchedFile(self, name, flags)

    def on_write(self) -> None:
        pass

    def on_sync(self) -> None:
        pass


class WatchedFile(apsw.VFSFile):
    def __init__(self, vfs: WatchedVFS, name, flags):
        self.watcher = vfs
        self.watched = bool(flags[0] & (apsw.SQLITE_OPEN_MAIN_DB | apsw.SQLITE_OPEN_WAL))
        super().__init__("", name, flags)

    def xWrite(self, data, offset):
        if self.watched:
            self.watcher.on_write()
        return super().xWrite(data, offset)

    def xSync(self, flags):
        if self.watched:
            self.watcher.on_sync()
        return super().xSync(flags)
