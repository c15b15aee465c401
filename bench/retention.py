"""Retention benchmark: purge 1.5 million expired tick samples under live ingest, two ways.

A database holds 1.5 million tick samples from a month ago, and a client sends the game
mix at 1,000 events/s. The daemon's way: it starts, finds the nightly retention missed,
and purges through its own writer. The CLI's way: the daemon runs (its retention already
done), and `tedstore retention` purges from its own connection beside it. Prints, for
each, the purge rate and the client's ack latency while the purge runs (target: p99 <=
50 ms) and after it.

    python bench/retention.py [--rows 1500000] [--rate 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import tedstore  # noqa: E402


def expired_ticks(path: str, rows: int, retention_done: bool) -> None:
    conn = tedstore.open_store(path)
    old = tedstore.utc_text(time.time() - 30 * 86400)
    batch = 100_000
    for first in range(0, rows, batch):
        with tedstore.transaction(conn):
            conn.executemany(
                "INSERT INTO tick_samples (game_id, tick, price, volatility_10, rsi, ts, created_at)"
                " VALUES (?, ?, 1.5, 0.02, 50.0, ?, ?)",
                ((f"old-{n // 500}", n % 500, old, old) for n in range(first, min(rows, first + batch))))
    if retention_done:                   # so that the daemon leaves the purge to the CLI
        tedstore.record_job(conn, "retention", {"deleted": {}}, time.time())
    conn.close()


def purge(folder: str, way: str, rows: int, rate: float) -> dict:
    """Ingest at `rate` while the purge runs, `way` being "daemon" or "cli"."""
    db, sock = os.path.join(folder, f"{way}.db"), os.path.join(folder, f"{way}.sock")
    expired_ticks(db, rows, retention_done=way == "cli")
    lines = [msgspec.json.encode(e) + b"\n"
             for e in tedstore.simulate_events(events=int(rate * 180), seed=3)]
    env = dict(os.environ, TEDSTORE_DB=db, TEDSTORE_SOCKET=sock)
    daemon = subprocess.Popen([sys.executable, str(ROOT / "tedstore.py"), "serve"], env=env,
                              stderr=subprocess.DEVNULL)
    window: dict = {}
    try:
        while not tedstore.socket_answers(sock):
            time.sleep(0.01)
        started = time.monotonic()

        def watch_daemon() -> None:
            window["start"] = 0.0
            while "end" not in window:
                last = tedstore.request(sock, "status")["status"]["last_retention"]
                if last:
                    window["end"] = time.monotonic() - started
                    window["deleted"] = last["deleted"]["tick_samples"]
                time.sleep(0.05)

        def run_cli() -> None:
            time.sleep(2.0)                  # ingest settles first
            window["start"] = time.monotonic() - started
            done = subprocess.run([sys.executable, str(ROOT / "tedstore.py"), "retention",
                                   "--db", db, "--json"], env=env, capture_output=True,
                                  text=True, check=True)
            window["end"] = time.monotonic() - started
            window["deleted"] = json.loads(done.stdout)["deleted"]["tick_samples"]

        worker = threading.Thread(target=watch_daemon if way == "daemon" else run_cli)
        worker.start()

        def paced():
            for number, line in enumerate(lines):
                if "end" in window and number % 100 == 0 and \
                        time.monotonic() - started > window["end"] + 5:
                    return
                yield line

        result = tedstore.stream_lines(sock, paced(), rate=rate, measure_latency=True)
        worker.join()
    finally:
        daemon.terminate()
        daemon.wait(60)
    # line n left at n / rate seconds: split the latencies at the purge's window
    first, last = int(window["start"] * rate), int(window["end"] * rate)
    return {**window, "during": sorted(result.latencies_ms[first:last]),
            "after": sorted(result.latencies_ms[last:])}


def describe(latencies: list[float]) -> str:
    return (f"p50 {statistics.median(latencies):.2f} ms, "
            f"p99 {latencies[int(len(latencies) * 0.99) - 1]:.2f} ms, max {latencies[-1]:.2f} ms "
            f"({len(latencies):,} lines)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_500_000)
    parser.add_argument("--rate", type=float, default=1000)
    args = parser.parse_args()
    print(f"purging {args.rows:,} expired tick samples while a client sends the game mix "
          f"at {args.rate:,.0f} events/s")
    with tempfile.TemporaryDirectory(prefix="tedstore-retention-") as folder:
        for way, label in (("daemon", "the daemon's own retention"),
                           ("cli", "`tedstore retention` beside the daemon")):
            run = purge(folder, way, args.rows, args.rate)
            seconds = run["end"] - run["start"]
            print(f"{label}: {run['deleted']:,} rows in {seconds:.1f} s "
                  f"({run['deleted'] / seconds:,.0f} rows/s)")
            print(f"  ack latency during the purge: {describe(run['during'])}")
            print(f"  ack latency after the purge:  {describe(run['after'])}")


if __name__ == "__main__":
    main()
