"""Replication benchmark: the WAL's size and the ack latency with and without Litestream.

For tedstore alone and for Litestream beside it in each TEDSTORE_CHECKPOINT mode: a client
sends the game mix at --rate events/s for --seconds, then --burst events as fast as it can;
the largest WAL seen in each phase and the WAL once idle are printed, with the ack latency.
With Litestream, it is stopped before the burst for --outage seconds while the client goes
on at --rate, and restarted: printed are how fast the WAL grew, the WAL when it returns,
and whether it had to copy the whole database again (a snapshot) instead of going on from
the WAL.

    python bench/replication.py [--rate 1000] [--seconds 30] [--burst 300000] [--outage 20]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
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

LITESTREAM = shutil.which("litestream", path=os.path.dirname(sys.executable)) \
    or shutil.which("litestream")
SETUPS = [("alone", "truncate"), ("litestream", "truncate"), ("litestream", "passive"),
          ("litestream", "off")]


class WalWatch:
    """The WAL file's largest size per phase, sampled every 10 ms in a thread."""

    def __init__(self, db: str):
        self.wal, self.phase, self.largest = db + "-wal", "start", {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def size(self) -> int:
        try:
            return os.path.getsize(self.wal)
        except FileNotFoundError:
            return 0

    def _run(self) -> None:
        while not self.done.wait(0.01):
            self.largest[self.phase] = max(self.largest.get(self.phase, 0), self.size())

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


def litestream(folder: str, db: str) -> tuple[Path, subprocess.Popen]:
    config = Path(folder) / "litestream.yml"
    config.write_text(f"logging:\n  level: debug\ndbs:\n  - path: {db}\n    replica:\n"
                      f"      type: file\n      path: {folder}/replica\n")
    return config, start_litestream(config)


def start_litestream(config: Path) -> subprocess.Popen:
    log = open(config.with_suffix(".log"), "ab")
    return subprocess.Popen([LITESTREAM, "replicate", "-config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT)


def snapshots(config: Path) -> int:
    log = config.with_suffix(".log").read_text()
    return sum("msg=sync" in line and "snap=true" in line for line in log.splitlines())


def idle(sock: str, seconds: float) -> None:
    """Wait until the daemon has not committed for `seconds` (its idle checkpoint ran)."""
    while True:
        last = tedstore.request(sock, "status")["status"]["repository"]["last_save"]
        if time.time() - tedstore.parse_when(last, 0) > seconds:
            return
        time.sleep(0.1)


def lines(events: int, seed: int) -> list[bytes]:
    return [msgspec.json.encode(e) + b"\n" for e in tedstore.simulate_events(events=events,
                                                                             seed=seed)]


def p99(latencies: list[float]) -> float:
    ordered = sorted(latencies)
    return ordered[int(len(ordered) * 0.99) - 1]


def run(folder: str, replicated: bool, mode: str, args) -> dict:
    db, sock = os.path.join(folder, "tedstore.db"), os.path.join(folder, "tedstore.sock")
    config, replicator = litestream(folder, db) if replicated else (None, None)
    env = dict(os.environ, TEDSTORE_DB=db, TEDSTORE_SOCKET=sock, TEDSTORE_CHECKPOINT=mode)
    daemon = subprocess.Popen([sys.executable, str(ROOT / "tedstore.py"), "serve"], env=env,
                              stderr=subprocess.DEVNULL)
    watch = WalWatch(db)
    found: dict = {}
    try:
        while not tedstore.socket_answers(sock):
            time.sleep(0.01)
        steady = tedstore.stream_lines(sock, lines(int(args.rate * args.seconds), 1),
                                       rate=args.rate, measure_latency=True)
        found["steady p99"] = p99(steady.latencies_ms)
        if replicated:
            replicator.send_signal(signal.SIGTERM)
            replicator.wait(60)
            found["before outage"] = watch.size()
            watch.phase = "outage"
            tedstore.stream_lines(sock, lines(int(args.rate * args.outage), 3), rate=args.rate)
            idle(sock, 3 * tedstore.CHECKPOINT_IDLE_SECONDS)
            found["after outage"] = watch.size()
            before = snapshots(config)
            replicator = start_litestream(config)
            watch.phase = "catch-up"
            tedstore.stream_lines(sock, lines(int(args.rate * 5), 4), rate=args.rate)
            idle(sock, 3 * tedstore.CHECKPOINT_IDLE_SECONDS)
            found["snapshots on return"] = snapshots(config) - before
        watch.phase = "burst"
        started = time.monotonic()
        burst = tedstore.stream_lines(sock, lines(args.burst, 2), measure_latency=True)
        found["burst rate"] = args.burst / (time.monotonic() - started)
        found["burst p99"] = p99(burst.latencies_ms)
        watch.phase = "idle"
        idle(sock, 3 * tedstore.CHECKPOINT_IDLE_SECONDS)
        found["idle"] = watch.size()
    finally:
        daemon.terminate()
        daemon.wait(60)
        if replicator is not None:
            replicator.terminate()
            replicator.wait(60)
        watch.stop()
    return {**found, **{f"largest {phase}": size for phase, size in watch.largest.items()}}


def mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--burst", type=int, default=300_000)
    parser.add_argument("--outage", type=float, default=20)
    args = parser.parse_args()
    if LITESTREAM is None:
        sys.exit("litestream is not installed: pip install -e '.[test]'")
    version = subprocess.run([LITESTREAM, "version"], capture_output=True, text=True).stdout
    print(f"game mix at {args.rate:,.0f} events/s for {args.seconds:.0f} s, then "
          f"{args.burst:,} events flat out; Litestream {version.strip()}")
    for replicated, mode in SETUPS:
        with tempfile.TemporaryDirectory(prefix="tedstore-replication-") as folder:
            found = run(folder, replicated == "litestream", mode, args)
        print(f"{replicated:>10} {mode:>8}: WAL largest {mb(found['largest start'])} steady, "
              f"{mb(found['largest burst'])} burst, {mb(found['idle'])} once idle; "
              f"ack p99 {found['steady p99']:.1f} ms steady, {found['burst p99']:.1f} ms "
              f"burst ({found['burst rate']:,.0f} events/s)")
        if replicated == "litestream":
            grown = found["largest outage"] - found["before outage"]
            print(f"{'':>20}  Litestream down {args.outage:.0f} s (before the burst): WAL "
                  f"{mb(found['before outage'])} -> {mb(found['largest outage'])} "
                  f"({grown / args.outage / 1e3:,.0f} kB/s), {mb(found['after outage'])} when "
                  f"it returns; on return: {found['snapshots on return']} full snapshot(s), WAL "
                  f"{mb(found['largest catch-up'])} at most while catching up")

if __name__ == "__main__":
    main()
