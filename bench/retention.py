"""Retention benchmark: purge 1.5 million expired tick samples under live ingest.

A database holds 1.5 million tick samples from a month ago; the daemon starts, finds the
nightly retention missed, and purges them in small transactions while a client sends
the game mix at 1,000 events/s. Prints the client's ack latency while the purge runs
(target: p99 <= 50 ms) and the purge rate.

    python bench/retention.py [--rows 1500000] [--rate 1000]
"""

from __future__ import annotations

import argparse
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


def expired_ticks(path: str, rows: int) -> None:
    conn = tedstore.open_store(path)
    old = tedstore.utc_text(time.time() - 30 * 86400)
    batch = 100_000
    for first in range(0, rows, batch):
        with tedstore.transaction(conn):
            conn.executemany(
                "INSERT INTO tick_samples (game_id, tick, price, volatility_10, rsi, ts, created_at)"
                " VALUES (?, ?, 1.5, 0.02, 50.0, ?, ?)",
                ((f"old-{n // 500}", n % 500, old, old) for n in range(first, min(rows, first + batch))))
    conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_500_000)
    parser.add_argument("--rate", type=float, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tedstore-retention-") as folder:
        db, sock = os.path.join(folder, "t.db"), os.path.join(folder, "t.sock")
        expired_ticks(db, args.rows)
        lines = [msgspec.json.encode(e) + b"\n"
                 for e in tedstore.simulate_events(events=int(args.rate * 120), seed=3)]
        env = dict(os.environ, TEDSTORE_DB=db, TEDSTORE_SOCKET=sock)
        daemon = subprocess.Popen([sys.executable, str(ROOT / "tedstore.py"), "serve"], env=env,
                                  stderr=subprocess.DEVNULL)
        try:
            while not tedstore.socket_answers(sock):
                time.sleep(0.01)
            started = time.monotonic()
            purge = {}

            def watch() -> None:
                while "end" not in purge:
                    status = tedstore.request(sock, "status")["status"]
                    if status["last_retention"]:
                        purge["end"] = time.monotonic()
                        purge["deleted"] = status["last_retention"]["deleted"]["tick_samples"]
                    time.sleep(0.05)

            watcher = threading.Thread(target=watch)
            watcher.start()

            def paced() -> iter:
                for number, line in enumerate(lines):
                    if "end" in purge and time.monotonic() > purge["end"] + 3 and number % 100 == 0:
                        return
                    yield line

            result = tedstore.stream_lines(sock, paced(), rate=args.rate, measure_latency=True)
            watcher.join()
        finally:
            daemon.terminate()
            daemon.wait(60)
    seconds = purge["end"] - started
    during = sorted(result.latencies_ms[:int(seconds * args.rate)])
    after = sorted(result.latencies_ms[int(seconds * args.rate):])
    print(f"purged {purge['deleted']:,} expired tick samples in {seconds:.1f} s "
          f"({purge['deleted'] / seconds:,.0f} rows/s) while ingesting {args.rate:,.0f} events/s")
    print(f"ack latency during the purge ({len(during):,} lines): p50 {statistics.median(during):.2f} ms, "
          f"p99 {during[int(len(during) * 0.99) - 1]:.2f} ms, max {during[-1]:.2f} ms")
    print(f"ack latency after the purge ({len(after):,} lines): p50 {statistics.median(after):.2f} ms, "
          f"p99 {after[int(len(after) * 0.99) - 1]:.2f} ms")


if __name__ == "__main__":
    main()
