"""Data and loads that the tests and the benchmarks (bench/reads.py) share: a year of
predictions, heavy rejects, and clients that flood status lines or ask heavy queries."""

from __future__ import annotations

import contextlib
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import tedstore  # noqa: E402

YEAR_OF_RETENTION = {f"{name}_RETENTION_DAYS": "36500" for name in
                     ("PREDICTION", "SIDEBET", "GAME", "TICK", "METRICS")}


def insert(db: str, sql: str, rows) -> None:
    conn = tedstore.open_store(db)
    try:
        with tedstore.transaction(conn):
            conn.executemany(sql, rows)
    finally:
        conn.close()


def year_of_predictions(db: str, rows: int = 150_000) -> None:
    """Resolved predictions spread over the last year: performance over years is the
    heaviest query in work."""
    now = time.time()
    insert(db, "INSERT INTO predictions (game_id, predicted_at_tick, predicted_end_tick, "
               "confidence, model_version, created_at, actual_end_tick, raw_error) "
               "VALUES (?, ?, 100, 0.5, 'v', ?, 100, ?)",
           ((f"year-{n // 100}", n % 100, tedstore.utc_text(now - 365 * 86400 * n / rows),
             n % 301 - 150) for n in range(rows)))


def heavy_rejects(db: str, rows: int = 8000, every_blob: int = 0) -> None:
    """Rejects of 4 KiB each (every `every_blob`-th one bytes that are not UTF-8),
    received within the last day: `rejects` is the heaviest answer per row."""
    stamp = tedstore.utc_text(time.time() - 3600)
    insert(db, "INSERT INTO rejects (received_at, line_no, code, error, raw) "
               "VALUES (?, ?, 'bad_json', 'not valid JSON', ?)",
           ((stamp, n, b"\xff" * 4095 if every_blob and n % every_blob == 0 else "x" * 4095)
            for n in range(rows)))


def status_flood(socket_path: str, stop, read: bool) -> None:
    """Status lines as fast as the daemon takes them, reading the replies or never."""
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
    """The heaviest legal queries back to back: rejects of 12 MB (odd numbers), or
    performance over ten years (even ones)."""
    query = ({"name": "rejects", "hours": 24, "limit": 3000} if number % 2 else
             {"name": "performance", "days": 3650})
    with tedstore.Reader(socket_path) as reader:
        while not stop.is_set():
            with contextlib.suppress(tedstore.QueryRejected):    # refused: over a limit
                reader.ask(**query)
