"""Reads cannot hurt ingest: an honest client's ack latency at a paced 1,000 events/s,
quiet, and while other clients flood status lines or run the heaviest legal queries.

Every phase runs on the same daemon, over a database with a year of predictions
(performance over years is the heaviest query in work) and 4 KiB rejects (rejects is the
heaviest answer per row), interleaved round by round; the daemon's peak RSS comes last.

    python bench/reads.py [--rounds 3] [--seconds 5]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
import tedstore  # noqa: E402
from ingest import Daemon  # noqa: E402
from loads import (YEAR_OF_RETENTION, heavy_queries, heavy_rejects, status_flood,  # noqa: E402
                   year_of_predictions)


def ack_latencies(socket_path: str, seconds: float, seed: int) -> list[float]:
    events = list(tedstore.simulate_events(events=int(1000 * seconds), seed=seed))
    lines = [msgspec.json.encode(e) + b"\n" for e in events]
    return tedstore.stream_lines(socket_path, lines, rate=1000, measure_latency=True).latencies_ms


def under(load: str, socket_path: str, seconds: float, seed: int) -> list[float]:
    """The paced client's latencies while the load runs in other processes (so that their
    work never holds up the measuring client's own interpreter)."""
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    if load == "status flood":
        workers = [ctx.Process(target=status_flood, args=(socket_path, stop, n % 2 == 0))
                   for n in range(8)]
    elif load == "heavy queries":
        workers = [ctx.Process(target=heavy_queries, args=(socket_path, stop, n))
                   for n in range(16)]
    else:
        workers = []
    for worker in workers:
        worker.start()
    time.sleep(0.5 if workers else 0)      # let the load build up
    try:
        return ack_latencies(socket_path, seconds, seed)
    finally:
        stop.set()
        for worker in workers:
            worker.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5)
    args = parser.parse_args()
    loads = ("quiet", "status flood", "heavy queries")
    p99s: dict[str, list[float]] = {load: [] for load in loads}
    p50s: dict[str, list[float]] = {load: [] for load in loads}
    with tempfile.TemporaryDirectory(prefix="tedstore-reads-") as folder:
        db = os.path.join(folder, "year.db")
        year_of_predictions(db)
        heavy_rejects(db, rows=20_000)
        daemon = Daemon(folder, "reads", db=db, env=YEAR_OF_RETENTION)
        try:
            for round_ in range(args.rounds):
                for n, load in enumerate(loads):
                    latencies = sorted(under(load, daemon.socket, args.seconds, round_ * 10 + n))
                    p50s[load].append(statistics.median(latencies))
                    p99s[load].append(latencies[int(len(latencies) * 0.99) - 1])
            status = tedstore.request(daemon.socket, "status")["status"]["queries"]
            rss = daemon.peak_rss_mb()
        finally:
            daemon.stop()
    print(f"ack latency at 1,000 events/s, {args.rounds} interleaved rounds of "
          f"{args.seconds:g} s each (median of the rounds; every round's p99 in brackets):")
    for load in loads:
        print(f"  {load:<14} p50 {statistics.median(p50s[load]):6.2f} ms   p99 "
              f"{statistics.median(p99s[load]):7.2f} ms   "
              f"[{', '.join(f'{p:.2f}' for p in p99s[load])}]")
    print(f"queries answered {status['answered']:,}, refused {status['refused']:,}; "
          f"daemon peak RSS {rss:.0f} MB")


if __name__ == "__main__":
    main()
