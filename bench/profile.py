"""Where one line's time goes on its way in: microseconds per line, stage by stage.

Each stage of the daemon's path is timed alone, in process, on the same lines the
ingest benchmark sends (predictions, and the simulated game mix), cut into the
batches the writer would take:

    cut      the event loop: a Session numbers 64 KiB reads into chunks of lines
    decode   decode_chunk: JSON into Structs, each line on its own
    route    IngestBatch: timestamps checked and turned to text, rows built as tuples
    insert   those rows alone, inserted as the daemon inserts them (insert_rows)
    sqlite   the rest of apply and the COMMIT: game rows, resolution, counting
    ack      the writer's acks and the replies written to the connection

The writer thread does all but the cut, one after the other; the event loop cuts the next
lines meanwhile. Then the daemon end to end (a subprocess, 1 and 4 clients, as
bench/ingest.py runs it): what it costs beyond the writer thread's stages is the
hand-offs between the threads, waits for the GIL, the socket and the clients.

    python bench/profile.py [--events 200000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import blocks_of, ceiling, end_to_end, fresh_db, prediction_events  # noqa: E402

import tedstore  # noqa: E402  (ingest put the checkout first on the path)

STAGES = ("cut", "decode", "route", "insert", "sqlite", "ack")


class Transport:
    """What a Session writes to, kept as a byte count."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str):
        return None

    def close(self) -> None:
        pass


class Server:
    """The little of tedstore's Server a Session needs to cut lines."""

    def __init__(self, settings: tedstore.Settings) -> None:
        self.settings = settings
        self.draining = False
        self.chunks: list[tedstore.Chunk] = []

    def admit(self, session) -> None:
        pass

    def submit(self, chunk: tedstore.Chunk) -> None:
        self.chunks.append(chunk)


def stages_once(folder: str, events: list[dict], settings: tedstore.Settings) -> dict:
    """Microseconds per line in each stage, one pass over `events`."""
    lines = [msgspec.json.encode(e) + b"\n" for e in events]
    blocks = blocks_of(lines)
    server = Server(settings)
    session = tedstore.Session(server)
    session.transport = Transport()             # connection_made would ask a real socket
    started = time.perf_counter()
    for block in blocks:
        session.data_received(block)
    cut = time.perf_counter() - started
    chunks = server.chunks
    batches, batch, count = [], [], 0          # as the writer takes them: batch_size lines
    for chunk in chunks:
        while count + chunk.count > settings.batch_size:
            head, chunk = chunk.split(settings.batch_size - count)
            batches.append(batch + [head])
            batch, count = [], 0
        batch.append(chunk)
        count += chunk.count
    if batch:
        batches.append(batch)

    decode = route = insert = sqlite = ack = 0.0
    writer = tedstore.Writer(settings, on_commit=lambda acks: [
        ack_.session.acknowledge(ack_) for ack_ in acks])
    conn = tedstore.connect(fresh_db(folder, f"stages-{time.monotonic_ns()}.db"),
                            synchronous=settings.synchronous)
    plain = tedstore.connect(fresh_db(folder, f"plain-{time.monotonic_ns()}.db"),
                             synchronous=settings.synchronous)
    try:
        for batch in batches:
            started = time.perf_counter()
            for chunk in batch:
                tedstore.decode_chunk(chunk.data)
            decoded = time.perf_counter()
            ingest = tedstore.IngestBatch(batch, settings)
            built = time.perf_counter()
            with tedstore.transaction(conn):
                ingest.apply(conn, time.time())
            applied = time.perf_counter()
            writer._acknowledge(ingest)
            acked = time.perf_counter()
            with tedstore.transaction(plain):           # the rows alone, as the ceiling does
                for sql, rows in ((tedstore.SQL_SAVE_TICKS, ingest.samples),
                                  (tedstore.SQL_SAVE_PREDICTIONS, ingest.predictions),
                                  (tedstore.SQL_SAVE_SIDE_BETS, ingest.side_bets)):
                    if rows:
                        tedstore.insert_rows(plain, sql, rows)
            inserted = time.perf_counter()
            decode += decoded - started
            route += built - decoded - (decoded - started)   # IngestBatch decodes again
            insert += inserted - acked
            sqlite += applied - built - (inserted - acked)
            ack += acked - applied
    finally:
        conn.close()
        plain.close()
    n = len(lines)
    return {name: seconds * 1e6 / n for name, seconds in
            zip(STAGES, (cut, decode, route, insert, sqlite, ack))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-daemon", action="store_true",
                        help="the in-process stages only")
    args = parser.parse_args()
    settings = tedstore.load_settings(db=":memory:", socket="/nonexistent.sock")
    mixes = {"predictions": prediction_events(args.events, seed=1),
             "game mix": list(tedstore.simulate_events(events=args.events, seed=2))}
    stages: dict[str, dict[str, list[float]]] = {name: {} for name in mixes}
    rates: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="tedstore-profile-") as folder:
        for _ in range(args.rounds):
            rates.setdefault("ceiling", []).append(ceiling(folder, mixes["predictions"]))
            for name, events in mixes.items():
                for stage, us in stages_once(folder, events, settings).items():
                    stages[name].setdefault(stage, []).append(us)
                if args.no_daemon:
                    continue
                for clients in (1, 4):
                    rate, _ = end_to_end(folder, name.replace(" ", "-"), events, clients)
                    rates.setdefault(f"{name} {clients}", []).append(rate)
    med = {name: {stage: statistics.median(v) for stage, v in by.items()}
           for name, by in stages.items()}
    top = statistics.median(rates["ceiling"])
    print(f"machine: {os.cpu_count()} cores, SQLite {tedstore.apsw.sqlite_lib_version()}, "
          f"Python {sys.version.split()[0]}; medians of {args.rounds} rounds, "
          f"{args.events:,} events each, batches of {settings.batch_size:,} lines")
    print(f"in-process ceiling: {top:,.0f} predictions/s = {1e6 / top:.2f} µs per line")
    print()
    header = f"{'µs per line':<34}" + "".join(f"{name:>14}" for name in mixes)
    print(header)
    for stage in STAGES:
        print(f"  {stage:<32}" + "".join(f"{med[name][stage]:>14.2f}" for name in mixes))
    writer = {name: sum(us for stage, us in med[name].items() if stage != "cut")
              for name in mixes}
    print(f"  {'the writer thread (all but cut)':<32}"
          + "".join(f"{writer[name]:>14.2f}" for name in mixes))
    print(f"  {'  of which Python':<32}"
          + "".join(f"{writer[name] - med[name]['insert'] - med[name]['sqlite']:>14.2f}"
                    for name in mixes))
    if args.no_daemon:
        return
    for clients in (1, 4):
        rate = {name: statistics.median(rates[f"{name} {clients}"]) for name in mixes}
        print(f"  {f'end to end, {clients} client(s)':<32}"
              + "".join(f"{1e6 / rate[name]:>14.2f}" for name in mixes))
        print(f"  {'  beyond the writer thread':<32}"
              + "".join(f"{1e6 / rate[name] - writer[name]:>14.2f}" for name in mixes))
        print(f"  {'  events/s (of ceiling)':<32}"
              + "".join(f"{rate[name]:>9,.0f} {rate[name] / top:3.2f}" for name in mixes))
    print("all rounds: " + "; ".join(f"{name} " + "/".join(f"{v:,.0f}" for v in values)
                                     for name, values in rates.items()))


if __name__ == "__main__":
    main()
