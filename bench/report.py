"""Report benchmark: `tedstore report` on a year of TED-volume data.

Builds (or reuses, with --db) the year of bench/queries.py, then times the report over 7
days (target: 0.5 s) and over 365 days (target: 2 s, at most 2 MB), in process (the data,
then the page) and as the wall time of the CLI command, and prints the page sizes.

    python bench/report.py [--db /tmp/year.db] [--runs 5]
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import tedstore  # noqa: E402
from queries import year_from_arguments  # noqa: E402


def main() -> None:
    args, folder, db = year_from_arguments(__doc__, runs=5)
    print(f"{'period':>8}  {'data p50':>9}  {'page p50':>9}  {'in process':>10}  "
          f"{'CLI wall':>9}  {'size':>8}")
    for days in (7, 365):
        data_ms, page_ms = [], []
        for _ in range(args.runs):
            now = time.time()
            started = time.perf_counter()
            data = tedstore.report_data(db, now - days * 86400, now, now)
            middle = time.perf_counter()
            page = tedstore.render_report(data, db)
            data_ms.append((middle - started) * 1000)
            page_ms.append((time.perf_counter() - middle) * 1000)
        out = os.path.join(folder, f"report-{days}.html")
        walls = []
        for _ in range(3):
            started = time.perf_counter()
            subprocess.run([sys.executable, str(ROOT / "tedstore.py"), "report", "--db", db,
                            "--days", str(days), "-o", out], check=True, capture_output=True)
            walls.append(time.perf_counter() - started)
        data_p50, page_p50 = statistics.median(data_ms), statistics.median(page_ms)
        print(f"{days:>6} d  {data_p50:>6.0f} ms  {page_p50:>6.0f} ms  "
              f"{data_p50 + page_p50:>7.0f} ms  {statistics.median(walls):>7.2f} s  "
              f"{os.path.getsize(out) / 1e6:>5.2f} MB")
        print(f"          ({len(page.encode()):,} bytes, {len(data['buckets'])} "
              f"{data['bucket']} buckets; written to {out})")


if __name__ == "__main__":
    main()
