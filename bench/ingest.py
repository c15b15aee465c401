"""Ingest benchmark: tedstore end to end against SQLite's own ceiling, in one run.

Prints the in-process ceiling (apsw executemany, 5,000-row transactions), the
per-event-commit baseline, tedstore's acknowledged events/s with 1 and 4 clients
(predictions, and the simulated game mix), p50/p99 ack latency at a paced rate,
and the daemon's peak RSS. Every figure comes from this run on this machine.

    python bench/ingest.py [--events 200000] [--paced-seconds 10] [--rounds 5]
    python bench/ingest.py --against ../other-checkout      # A/B, interleaved
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import apsw
import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import tedstore  # noqa: E402

PREDICTION_COLUMNS = ("game_id, predicted_at_tick, predicted_end_tick, confidence, bound_lower, "
                      "bound_upper, epr_active, peak_ratio, volatility, momentum, model_version, "
                      "created_at")


def prediction_events(n: int, seed: int) -> list[dict]:
    return list(tedstore.simulate_events(events=n, seed=seed, mix="predictions"))


def fresh_db(folder: str, name: str) -> str:
    path = os.path.join(folder, name)
    tedstore.open_store(path).close()
    return path


def ceiling(folder: str, events: list[dict], synchronous: str = "NORMAL") -> float:
    """apsw executemany in 5,000-row transactions: the most this schema takes in-process."""
    rows = [(e["game_id"], e["predicted_at_tick"], e["predicted_end_tick"], e["confidence"],
             e["uncertainty_bounds"]["lower"], e["uncertainty_bounds"]["upper"],
             e["features_used"]["epr_active"], e["features_used"]["peak_ratio"],
             e["features_used"]["volatility"], e["features_used"]["momentum"], "v2.1.0",
             tedstore.utc_text(e["ts"] / 1000)) for e in events]
    conn = tedstore.connect(fresh_db(folder, f"ceiling-{time.monotonic_ns()}.db"),
                            synchronous=synchronous)
    sql = f"INSERT OR IGNORE INTO predictions ({PREDICTION_COLUMNS}) VALUES ({', '.join('?' * 12)})"
    started = time.perf_counter()
    for first in range(0, len(rows), 5000):
        with tedstore.transaction(conn):
            conn.executemany(sql, rows[first:first + 5000])
    seconds = time.perf_counter() - started
    conn.close()
    return len(rows) / seconds


def per_event_commit(folder: str, events: list[dict], synchronous: str = "NORMAL") -> float:
    """One transaction per event, with the same durability setting."""
    rows = [(e["game_id"], e["predicted_at_tick"], e["predicted_end_tick"], e["confidence"],
             None, None, None, None, None, None, "v2.1.0", tedstore.utc_text(e["ts"] / 1000))
            for e in events]
    conn = tedstore.connect(fresh_db(folder, f"per-event-{time.monotonic_ns()}.db"),
                            synchronous=synchronous)
    sql = f"INSERT OR IGNORE INTO predictions ({PREDICTION_COLUMNS}) VALUES ({', '.join('?' * 12)})"
    started = time.perf_counter()
    for row in rows:
        conn.execute(sql, row)
    seconds = time.perf_counter() - started
    conn.close()
    return len(rows) / seconds


class Daemon:
    """tedstore serve as a subprocess (from `root`: this checkout, or the one --against
    names) on a fresh database, or on `db` as it is."""

    def __init__(self, folder: str, name: str, synchronous: str = "NORMAL", root: Path = ROOT,
                 db: str | None = None, env: dict | None = None):
        unique = f"{name}-{time.monotonic_ns()}"
        self.db = db or os.path.join(folder, f"{unique}.db")
        self.socket = os.path.join(folder, f"{unique}.sock")
        env = dict(os.environ, TEDSTORE_DB=self.db, TEDSTORE_SOCKET=self.socket,
                   TEDSTORE_SYNCHRONOUS=synchronous, **(env or {}))
        self.proc = subprocess.Popen([sys.executable, str(root / "tedstore.py"), "serve"],
                                     env=env, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while not tedstore.socket_answers(self.socket):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit("the daemon did not start")
            time.sleep(0.05)

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def blocks_of(lines: list[bytes], size: int = 1 << 16) -> list[bytes]:
    out, current, length = [], [], 0
    for line in lines:
        current.append(line)
        length += len(line)
        if length >= size:
            out.append(b"".join(current))
            current, length = [], 0
    if current:
        out.append(b"".join(current))
    return out


def _client(socket_path: str, blocks: list[bytes], barrier, results) -> None:
    barrier.wait()
    result = tedstore.stream_lines(socket_path, blocks)
    results.put((result.acked, len(result.rejections)))


def end_to_end(folder: str, name: str, events: list[dict], clients: int,
               synchronous: str = "NORMAL", root: Path = ROOT) -> tuple[float, float]:
    """Acknowledged events/s with `clients` concurrent connections; and the daemon's peak RSS.

    The clients take turns at the events, 64 KiB each, so that together they send one
    stream of the same hours, as trackers on one feed do. (Given one quarter of the history
    each instead, four clients write to four far-apart places of every index, and SQLite
    takes a fifth longer per row.)"""
    lines = [msgspec.json.encode(e) + b"\n" for e in events]
    blocks = blocks_of(lines)
    parts = [blocks[i::clients] for i in range(clients)]
    daemon = Daemon(folder, name, synchronous, root)
    try:
        ctx = multiprocessing.get_context("fork")
        barrier, results = ctx.Barrier(clients + 1), ctx.Queue()
        workers = [ctx.Process(target=_client, args=(daemon.socket, part, barrier, results))
                   for part in parts]
        for worker in workers:
            worker.start()
        barrier.wait()
        started = time.perf_counter()
        outcomes = [results.get(timeout=600) for _ in workers]
        seconds = time.perf_counter() - started
        for worker in workers:
            worker.join()
        acked = sum(a for a, _ in outcomes)
        rejected = sum(r for _, r in outcomes)
        if rejected or acked != len(lines):
            raise SystemExit(f"{name}: {acked} acked, {rejected} rejected of {len(lines)}")
        return len(lines) / seconds, daemon.peak_rss_mb()
    finally:
        daemon.stop()


def paced(folder: str, rate: float, seconds: float,
          root: Path = ROOT) -> tuple[float, float, float]:
    """p50 and p99 of send-to-ack latency at a steady rate, one line at a time."""
    events = list(tedstore.simulate_events(events=int(rate * seconds), seed=9))
    lines = [msgspec.json.encode(e) + b"\n" for e in events]
    daemon = Daemon(folder, "paced", root=root)
    try:
        result = tedstore.stream_lines(daemon.socket, lines, rate=rate, measure_latency=True)
        latencies = sorted(result.latencies_ms)
        return (statistics.median(latencies), latencies[int(len(latencies) * 0.99) - 1],
                daemon.peak_rss_mb())
    finally:
        daemon.stop()


def compare(args: argparse.Namespace) -> None:
    """This checkout against another (--against), interleaved round by round: A/B."""
    other = Path(args.against).resolve()
    predictions = prediction_events(args.events, seed=1)
    game_mix = list(tedstore.simulate_events(events=args.events, seed=2))
    runs: dict[tuple[str, str], list[float]] = {}
    trees = (("this", ROOT), ("other", other))
    with tempfile.TemporaryDirectory(prefix="tedstore-bench-") as folder:
        for round_ in range(args.rounds):
            for side, root in trees if round_ % 2 == 0 else trees[::-1]:
                for name, events in (("predictions", predictions), ("game mix", game_mix)):
                    for clients in (1, 4):
                        rate, _ = end_to_end(folder, name.replace(" ", "-"), events, clients,
                                             root=root)
                        runs.setdefault((f"{name}, {clients} client(s), events/s", side),
                                        []).append(rate)
                _, p99, _ = paced(folder, args.paced_rate, args.paced_seconds, root)
                runs.setdefault((f"ack p99 at {args.paced_rate:,.0f}/s, ms", side), []).append(p99)
    print(f"this checkout ({ROOT}) against {other}: medians of {args.rounds} interleaved "
          f"rounds, {args.events:,} events each")
    for measure in dict.fromkeys(measure for measure, _ in runs):
        this, that = (statistics.median(runs[(measure, side)]) for side in ("this", "other"))
        print(f"  {measure:<40} this {this:>11,.2f}   other {that:>11,.2f}   "
              f"this/other {this / that:5.2f}   [this: "
              + ", ".join(f"{v:,.2f}" for v in runs[(measure, "this")]) + "; other: "
              + ", ".join(f"{v:,.2f}" for v in runs[(measure, "other")]) + "]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5,
                        help="measure everything this many times, interleaved; report medians")
    parser.add_argument("--paced-rate", type=float, default=1000)
    parser.add_argument("--paced-seconds", type=float, default=10)
    parser.add_argument("--against", metavar="CHECKOUT",
                        help="compare with the daemon of another checkout (A/B), interleaved")
    args = parser.parse_args()
    if args.against:
        compare(args)
        return
    predictions = prediction_events(args.events, seed=1)
    game_mix = list(tedstore.simulate_events(events=args.events, seed=2))
    runs: dict[str, list[float]] = {}
    rss: list[float] = []

    def measure(name: str, value: float) -> None:
        runs.setdefault(name, []).append(value)

    with tempfile.TemporaryDirectory(prefix="tedstore-bench-") as folder:
        for _ in range(args.rounds):
            measure("ceiling", ceiling(folder, predictions))
            measure("per-event", per_event_commit(folder, predictions[:20_000]))
            measure("per-event FULL", per_event_commit(folder, predictions[:3_000], "FULL"))
            for name, events in (("predictions", predictions), ("game mix", game_mix)):
                for clients in (1, 4):
                    rate, peak = end_to_end(folder, name.replace(" ", "-"), events, clients)
                    measure(f"{name} {clients}", rate)
                    rss.append(peak)
            rate, peak = end_to_end(folder, "predictions-full", predictions, 1, "FULL")
            measure("predictions 1 FULL", rate)
            rss.append(peak)
            p50, p99, peak = paced(folder, args.paced_rate, args.paced_seconds)
            measure("ack p50", p50)
            measure("ack p99", p99)
            rss.append(peak)
    med = {name: statistics.median(values) for name, values in runs.items()}
    top, naive, naive_full = med["ceiling"], med["per-event"], med["per-event FULL"]
    print(f"machine: {os.cpu_count()} cores, SQLite {apsw.sqlite_lib_version()}, "
          f"apsw {apsw.apsw_version()}, Python {sys.version.split()[0]}; "
          f"medians of {args.rounds} interleaved rounds, {args.events:,} events each")
    print(f"in-process ceiling (executemany, 5,000-row txns): {top:>10,.0f} predictions/s")
    print(f"per-event-commit baseline, synchronous=NORMAL:   {naive:>10,.0f} predictions/s")
    print(f"per-event-commit baseline, synchronous=FULL:     {naive_full:>10,.0f} predictions/s")
    for name in ("predictions 1", "predictions 4", "game mix 1", "game mix 4"):
        what, clients = name.rsplit(" ", 1)
        line = f"tedstore {what}, {clients} client(s):"
        print(f"{line:<49}{med[name]:>10,.0f} events/s acknowledged  "
              f"({100 * med[name] / top:.0f}% of ceiling, {med[name] / naive:.1f}x per-event)")
    full = med["predictions 1 FULL"]
    print(f"{'tedstore predictions, 1 client, FULL:':<49}{full:>10,.0f} events/s acknowledged  "
          f"({full / naive_full:.0f}x per-event FULL)")
    p99s = runs["ack p99"]
    print(f"ack latency at {args.paced_rate:,.0f} events/s (game mix): "
          f"p50 {med['ack p50']:.2f} ms, p99 {med['ack p99']:.2f} ms "
          f"(p99 of each round: {', '.join(f'{v:.2f}' for v in p99s)}; "
          f"spread {min(p99s):.2f} to {max(p99s):.2f} ms)")
    print(f"daemon peak RSS: {max(rss):.0f} MB")
    print("all rounds: " + "; ".join(f"{name} " + "/".join(f"{v:,.2f}" if v < 100 else f"{v:,.0f}"
                                                        for v in values)
                                     for name, values in runs.items()))


if __name__ == "__main__":
    main()
