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
import socket
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

YEAR = {f"{name}_RETENTION_DAYS": "36500" for name in
        ("PREDICTION", "SIDEBET", "GAME", "TICK", "METRICS")}


def build(db: str) -> None:
    """150,000 resolved predictions over a year and 20,000 rejects of 4 KiB."""
    conn = tedstore.open_store(db)
    now = time.time()
    with tedstore.transaction(conn):
        conn.executemany(
            "INSERT INTO predictions (game_id, predicted_at_tick, predicted_end_tick, confidence,"
            " model_version, created_at, actual_end_tick, raw_error) VALUES (?, ?, 100, 0.5, "
            "'v', ?, 100, ?)",
            ((f"year-{n // 100}", n % 100, tedstore.utc_text(now - 365 * 86400 * n / 150_000),
              n % 301 - 150) for n in range(150_000)))
        conn.executemany(
            "INSERT INTO rejects (received_at, line_no, code, error, raw) VALUES (?, ?, "
            "'bad_json', 'not valid JSON', ?)",
            ((tedstore.utc_text(now - 3600), n, "x" * 4095) for n in range(20_000)))
    conn.close()


class Daemon:
    def __init__(self, folder: str):
        self.db = os.path.join(folder, "tedstore.db")
        self.socket = os.path.join(folder, "tedstore.sock")
        build(self.db)
        env = dict(os.environ, TEDSTORE_DB=self.db, TEDSTORE_SOCKET=self.socket, **YEAR)
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "tedstore.py"), "serve"],
                                     env=env, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
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
        self.proc.wait(60)


def ack_latencies(socket_path: str, seconds: float, seed: int) -> list[float]:
    events = list(tedstore.simulate_events(events=int(1000 * seconds), seed=seed))
    lines = [msgspec.json.encode(e) + b"\n" for e in events]
    return tedstore.stream_lines(socket_path, lines, rate=1000, measure_latency=True).latencies_ms


def status_flood(socket_path: str, stop, read: bool) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(socket_path)
    sock.settimeout(0.2)
    burst = b'{"op":"status"}\n' * 4096
    while not stop.is_set():
        try:
            sock.sendall(burst)
            while read and sock.recv(1 << 20):
                pass
        except (socket.timeout, BlockingIOError):
            continue
        except OSError:
            break
    sock.close()


def heavy_queries(socket_path: str, stop, number: int) -> None:
    query = ({"name": "rejects", "hours": 24, "limit": 3000} if number % 2 else
             {"name": "performance", "days": 3650})
    with tedstore.Reader(socket_path) as reader:
        while not stop.is_set():
            try:
                reader.ask(**query)
            except tedstore.QueryRejected:
                pass                       # over a limit: refused, as it should be


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
        daemon = Daemon(folder)
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
