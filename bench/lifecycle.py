"""What the game lifecycle costs: game-mix ingest with it, and with plain storage, in one run.

"Plain" is what tedstore did before the lifecycle existed: every event simply stored under
its natural key (no peaks, no resolution, no game aggregates). The daemon runs as a real
subprocess either way; for the plain runs this script starts it with IngestBatch.write
swapped for the plain version. Prints medians of interleaved rounds and the lifecycle's
cost (target: at most a third of the plain throughput).

    python bench/lifecycle.py [--events 200000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
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

SQL_PLAIN_GAMES = """
INSERT OR IGNORE INTO games (game_id, start_tick, end_tick, final_price, created_at, updated_at)
VALUES (?1, ?2, ?3, ?4, ?5, ?5)"""


def plain_route(self: tedstore.IngestBatch, events, chunk, line_no: int, limits: tuple) -> None:
    """Rows per natural key, no per-game folding: the routing before the lifecycle."""
    received = limits[0]
    for event in events:
        ts = event.ts
        event.ts = received if ts is None else tedstore.wire_ts(ts)
        kind = type(event)
        if kind is tedstore.PriceUpdate:
            self.ticks += 1
            if event.tick % self.settings.tick_sample_every == 0:
                f = event.features
                self.samples.append((event.gameId, event.tick, event.price, f and f.volatility_10,
                                     f and f.volatility_40, f and f.momentum, f and f.rsi,
                                     f and f.volume_ratio, event.ts))
        elif kind is tedstore.Prediction:
            b, u = event.uncertainty_bounds, event.features_used
            self.predictions.append((
                event.game_id, event.predicted_at_tick, event.predicted_end_tick,
                event.confidence, b and b.lower, b and b.upper, u and u.epr_active,
                u and u.peak_ratio, u and u.volatility, u and u.momentum, event.model_version,
                event.ts, event.tracker))
        elif kind is tedstore.SideBet:
            self.side_bets.append((event.game_id, event.placed_at_tick, event.window_ticks,
                                   event.probability, event.expected_value, event.confidence,
                                   event.recommendation, event.ts, event.tracker))
        elif kind is tedstore.StateWrite:
            self.states.append(event)
        else:
            self.lifecycle.append((event, chunk, line_no))
        line_no += 1


def plain_apply(self: tedstore.IngestBatch, conn, now: float) -> None:
    """Store every event under its natural key, and nothing more."""
    self.rejects = list(self.decode_rejects)
    self.stored = {"priceUpdate": self.ticks, "prediction": len(self.predictions),
                   "sideBet": len(self.side_bets), "state": len(self.states),
                   "games": len(self.lifecycle)}
    conn.executemany(SQL_PLAIN_GAMES, [
        (e.gameId, e.tick if type(e) is tedstore.GameStart else None,
         e.tick if type(e) is tedstore.GameEnd else None,
         getattr(e, "finalPrice", None), e.ts) for e, _, _ in self.lifecycle])
    tedstore.insert_rows(conn, tedstore.SQL_SAVE_TICKS, self.samples)
    tedstore.insert_rows(conn, tedstore.SQL_SAVE_PREDICTIONS, self.predictions)
    tedstore.insert_rows(conn, tedstore.SQL_SAVE_SIDE_BETS, self.side_bets)
    if self.states:
        conn.execute(tedstore.SQL_SAVE_STATE, (msgspec.json.encode(self.states),))


def ingest(folder: str, lines: list[bytes], plain: bool) -> float:
    unique = f"{'plain' if plain else 'full'}-{time.monotonic_ns()}"
    db, sock = os.path.join(folder, f"{unique}.db"), os.path.join(folder, f"{unique}.sock")
    env = dict(os.environ, TEDSTORE_DB=db, TEDSTORE_SOCKET=sock)
    command = [sys.executable, __file__, "--serve-plain"] if plain else \
        [sys.executable, str(ROOT / "tedstore.py"), "serve"]
    daemon = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    try:
        while not tedstore.socket_answers(sock):
            time.sleep(0.02)
        blocks = [b"".join(lines[i:i + 400]) for i in range(0, len(lines), 400)]
        started = time.perf_counter()
        result = tedstore.stream_lines(sock, blocks)
        seconds = time.perf_counter() - started
        assert result.acked == len(lines) and not result.rejections
        return len(lines) / seconds
    finally:
        daemon.terminate()
        daemon.wait(60)


def main() -> None:
    if sys.argv[1:] == ["--serve-plain"]:
        tedstore.IngestBatch._route = plain_route
        tedstore.IngestBatch.apply = plain_apply
        sys.argv[1:] = ["serve"]
        tedstore.main()
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    lines = [msgspec.json.encode(e) + b"\n"
             for e in tedstore.simulate_events(events=args.events, seed=2)]
    runs: dict[str, list[float]] = {"plain": [], "full": []}
    with tempfile.TemporaryDirectory(prefix="tedstore-lifecycle-") as folder:
        for _ in range(args.rounds):
            runs["plain"].append(ingest(folder, lines, plain=True))
            runs["full"].append(ingest(folder, lines, plain=False))
    plain, full = (statistics.median(runs[k]) for k in ("plain", "full"))
    print(f"game mix, 1 client, medians of {args.rounds} interleaved rounds of {args.events:,} events")
    print(f"stored under natural keys only (before the lifecycle): {plain:>10,.0f} events/s")
    print(f"with the game lifecycle (after):                       {full:>10,.0f} events/s")
    print(f"the lifecycle costs {100 * (1 - full / plain):.0f}% of the throughput (target <= 33%)")
    print("all rounds: " + "; ".join(f"{k} " + "/".join(f"{v:,.0f}" for v in vals)
                                     for k, vals in runs.items()))


if __name__ == "__main__":
    main()
