"""Reads cannot hurt ingest (SPEC section 2, v3): hostile queries never stop the query
threads, answers nobody reads never grow the daemon's memory without bound, floods of
control lines and heavy queries leave an honest client's acks alone, and one connection's
backlog of queries does not hold up another's."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import socket
import threading
import time
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import tedstore
from conftest import Conn, Play, Store, prediction, state_write, wait_for
from loads import (YEAR_OF_RETENTION, heavy_queries, heavy_rejects, status_flood,
                   year_of_predictions)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def ask(conn: Conn, line_no: int, query: dict) -> dict:
    """Send one query line and read until its own answer or refusal."""
    conn.sock.sendall(msgspec.json.encode({"op": "query", **query}) + b"\n")
    while True:
        reply = conn.read_reply()
        if reply.get("line") == line_no or reply.get("rejected") == line_no:
            return reply


# -- hostile parameters ---------------------------------------------------------------------

PARAMETERS = ("id", "hours", "days", "since", "until", "limit", "pattern", "type", "n", "key")
LIMITS = (0, 1, -1, 0.5, 7, 24, 3660, 3661, 87_840, 87_841, 100_000, 100_001, 2 ** 31,
          2 ** 53, 2 ** 63, 2 ** 64, 10 ** 30, 1e11, 1e12, 1e308, -1e308,
          tedstore.MAX_EPOCH, tedstore.MAX_EPOCH + 1)
TIMES = st.one_of(
    st.sampled_from(["9" * 400 + "d", "99999999999999999999h", "0.0000001s", "1e9d", "-5d",
                     " 7d ", "9999-12-31T23:59:59+14:00", "0001-01-01T00:00:00-14:00",
                     "0001-01-01", "9999-12-31", "2026-02-30", "2026-11-20T25:00", "now",
                     "", "\x00", "\u202e2026", "٢٠٢٦-١١-٢٠"]),
    st.text(max_size=70))
HOSTILE = st.one_of(st.sampled_from(LIMITS), st.integers(), st.floats(allow_nan=True),
                    TIMES, st.booleans(), st.none(), st.lists(st.integers(), max_size=3),
                    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


@pytest.fixture(scope="module")
def busy_daemon(tmp_path_factory):
    """A daemon over a small database of games, its predictions rolled up."""
    from conftest import DaemonProcess
    folder = tmp_path_factory.mktemp("hostile")
    store = Store(folder / "tedstore.db")
    store.send(*Play(seed=3, games=20).events)
    store.send(b"{oops", state_write("k", 1))
    store.conn.close()
    daemon = DaemonProcess(folder).start()
    yield daemon
    daemon.stop()
    assert "Traceback" not in daemon.log(), daemon.log()


def test_hostile_query_parameters_never_stop_the_query_threads(busy_daemon):
    """Whatever a query line holds, it gets an answer or a one-line bad_query, and a plain
    query asked after it is answered: the query threads live on."""
    conn = busy_daemon.connect()
    line = [0]

    @settings(max_examples=300, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(name=st.sampled_from(list(tedstore.QUERIES) + ["nope"]),
           params=st.dictionaries(st.sampled_from(PARAMETERS), HOSTILE, max_size=4))
    def hostile(name: str, params: dict) -> None:
        line[0] += 1
        reply = ask(conn, line[0], {"q": name, **params})
        if "rejected" in reply:
            assert reply["code"] == "bad_query" and "\n" not in reply["error"], reply
            assert 0 < len(reply["error"]) <= tedstore.MAX_ERROR_CHARS
        else:
            assert isinstance(reply["result"], dict)
        line[0] += 1
        plain = ask(conn, line[0], {"q": "state", "key": "k"})
        assert plain["result"]["value"] == 1, plain

    hostile()
    status = tedstore.request(busy_daemon.socket, "status")["status"]
    assert status["queries"]["answered"] > 300 and status["queries"]["refused"] > 0


def test_a_query_that_fails_unexpectedly_is_a_bad_query_and_the_threads_live_on(
        tmp, inprocess, monkeypatch):
    """Not a TedstoreError: still one line to its client, one line in the log."""
    daemon = inprocess()
    real = tedstore.QUERIES["state"]

    def broken(conn, args, now):
        if args.key == "boom":
            raise ZeroDivisionError("a bug")
        return real.compute(conn, args, now)

    monkeypatch.setitem(tedstore.QUERIES, "state", tedstore.Query(real.args, broken))
    conn = Conn(daemon.socket)
    for line in range(1, 2 * tedstore.QUERY_THREADS + 3, 2):
        failed = ask(conn, line, {"q": "state", "key": "boom"})
        assert failed["code"] == "bad_query" and "ZeroDivisionError: a bug" in failed["error"]
        assert ask(conn, line + 1, {"q": "state", "key": "k"})["result"]["found"] is False


# -- memory: answers nobody reads ----------------------------------------------------------

@pytest.mark.slow
def test_clients_that_pipeline_heavy_queries_and_never_read_keep_memory_bounded(
        daemon_factory, tmp):
    """Sixteen clients each pipeline 100 rejects queries of ~12 MiB answers and never read
    a byte: 19 GiB of answers if the daemon built them all. It builds what its budgets
    allow and stops (README: the answer budgets), staying within 300 MB of where it
    started, and an honest client is still answered and acknowledged."""
    heavy_rejects(str(tmp / "tedstore.db"))
    daemon = daemon_factory()
    start = rss_mb(daemon.proc.pid)
    line = msgspec.json.encode({"op": "query", "q": "rejects", "hours": 24, "limit": 3000})
    greedy = []
    for _ in range(16):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(daemon.socket)
        sock.sendall((line + b"\n") * 100)       # 7 KB: the kernel takes it all
        greedy.append(sock)
    peak, answered, steady_since = start, -1, time.monotonic()
    while time.monotonic() - steady_since < 1.0:  # until the daemon stops building answers
        peak = max(peak, rss_mb(daemon.proc.pid))
        now = tedstore.request(daemon.socket, "status")["status"]["queries"]
        if now["answered"] + now["refused"] != answered:
            answered, steady_since = now["answered"] + now["refused"], time.monotonic()
        time.sleep(0.05)
    assert answered >= 16                         # every greedy client got something
    honest = daemon.connect()
    honest.send(prediction("honest", 1, 9), {"op": "query", "q": "state", "key": "k"})
    assert honest.read_until("result")["result"]["found"] is False
    honest.wait_ack(2)
    peak = max(peak, rss_mb(daemon.proc.pid))
    assert peak - start < 300, f"RSS went from {start:.0f} MB to {peak:.0f} MB"
    for sock in greedy:
        sock.close()


def test_an_answer_over_the_limit_is_refused_while_it_is_built(tmp):
    """SQLite stops building JSON at the length limit; rejects, built row by row in
    Python, stops reading rows there too, instead of building it all first."""
    heavy_rejects(str(tmp / "tedstore.db"), rows=400, every_blob=2)
    store = Store(tmp / "tedstore.db")
    store.send(*[prediction("many", tick, tick + 40) for tick in range(200)])
    store.conn.close()
    conn = tedstore.connect(str(tmp / "tedstore.db"), readonly=True)
    rows = []
    conn.row_trace = lambda cursor, row: rows.append(1) or row
    name, args = tedstore.query_args("rejects", {"hours": 24, "limit": 400})
    with pytest.raises(tedstore.QueryRejected, match="more than 0 MiB"):
        tedstore.run_query_within_limits(conn, name, args, max_bytes=64 * 1024)
    assert 0 < len(rows) <= 64 * 1024 // 4096 + 2
    conn.row_trace = None
    name, args = tedstore.query_args("recent_predictions", {"n": 100_000})
    with pytest.raises(tedstore.StoreError) as refused:
        conn.limit(tedstore.apsw.SQLITE_LIMIT_LENGTH, 10_000)     # 200 rows: ~80 kB
        tedstore.run_query(conn, name, args, time.time())
    assert isinstance(refused.value.orig, tedstore.apsw.TooBigError)
    conn.close()


# -- acks stay quick, queries are served in turn ---------------------------------------------

def ack_p99(socket_path: str, seconds: float = 2.5, seed: int = 11) -> float:
    events = list(tedstore.simulate_events(events=int(1000 * seconds), seed=seed))
    lines = [msgspec.json.encode(e) + b"\n" for e in events]
    result = tedstore.stream_lines(socket_path, lines, rate=1000, measure_latency=True)
    latencies = sorted(result.latencies_ms)
    return latencies[int(len(latencies) * 0.99) - 1]


def niced(load, *args) -> None:
    """A load at the lowest CPU priority: on a 2-core machine, sixteen busy processes
    would otherwise starve the measuring client itself, and the test would measure the
    kernel's scheduler rather than how the daemon shares itself out."""
    os.nice(19)
    load(*args)


def ask_performance_over_ten_years(socket_path: str, stop, answers) -> None:
    os.nice(19)
    with tedstore.Reader(socket_path) as reader:
        while not stop.is_set():
            answers.put(reader.performance(days=3650)["prediction_metrics"]["predictions_made"])


@pytest.mark.slow
def test_heavy_queries_do_not_raise_the_ack_p99_of_a_steady_stream(daemon_factory, tmp):
    """Performance over ten years of a year of predictions, asked back to back (by another
    process), beside a stream of 1,000 events/s: the stream's acks keep a p99 within 20 ms."""
    year_of_predictions(str(tmp / "tedstore.db"))
    daemon = daemon_factory(env=YEAR_OF_RETENTION)
    ctx = multiprocessing.get_context("fork")
    stop, answers = ctx.Event(), ctx.Queue()
    asker = ctx.Process(target=ask_performance_over_ten_years,
                        args=(daemon.socket, stop, answers))
    asker.start()
    asked = [answers.get(timeout=60)]                        # a first heavy answer
    lines = [msgspec.json.encode(e) + b"\n" for e in tedstore.simulate_events(events=3000, seed=4)]
    result = tedstore.stream_lines(daemon.socket, lines, rate=1000, measure_latency=True)
    stop.set()
    while asker.is_alive() or not answers.empty():
        with contextlib.suppress(queue.Empty):
            asked.append(answers.get(timeout=0.1))
    asker.join()
    latencies = sorted(result.latencies_ms)
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    assert len(asked) >= 5 and asked[0] >= 150_000
    # Quiet, the p99 is 1 to 3 ms; before reads were isolated it was 195 ms. The bound
    # leaves room for the scheduler's slices on a busy 2-core machine (6 to 9 ms seen).
    assert p99 <= 20.0, f"ack p99 {p99:.1f} ms while {len(asked)} heavy queries ran"


@pytest.mark.slow
@pytest.mark.parametrize("load", ["status flood", "heavy queries"])
def test_floods_and_heavy_queries_leave_an_honest_clients_acks_alone(daemon_factory, tmp, load):
    """Eight clients flood status lines (four never read their replies, four do), or
    sixteen run the heaviest legal queries back to back (rejects of 12 MB, performance
    over ten years); each in a process of its own. A stream at 1,000 events/s keeps its
    ack p99 within a generous bound (bench/reads.py measures it against the quiet
    baseline: README, Benchmarks)."""
    heavy_rejects(str(tmp / "tedstore.db"), rows=20_000)
    year_of_predictions(str(tmp / "tedstore.db"))
    daemon = daemon_factory(env=YEAR_OF_RETENTION)
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    workers = ([ctx.Process(target=niced, args=(status_flood, daemon.socket, stop, n % 2 == 0))
                for n in range(8)] if load == "status flood" else
               [ctx.Process(target=niced, args=(heavy_queries, daemon.socket, stop, n))
                for n in range(16)])
    for worker in workers:
        worker.start()
    wait_for(lambda: tedstore.request(daemon.socket, "status")["status"]["connections"]
             ["open"] >= len(workers) + 1, what="the load to connect")
    if load == "heavy queries":     # running back to back, past the first burst of all 16
        wait_for(lambda: tedstore.request(daemon.socket, "status")["status"]["queries"]
                 ["answered"] >= len(workers), timeout=60, what="an answer for each client")
    try:
        p99 = ack_p99(daemon.socket)
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)
    assert p99 <= 250, f"ack p99 {p99:.1f} ms under {load}"
    assert tedstore.request(daemon.socket, "ping") == {"pong": True}


def test_one_connections_backlog_does_not_hold_up_anothers_query(tmp, daemon_factory):
    """One client pipelines 30 slow queries and reads their answers as they come; a
    second client's one query is answered after at most a query per thread of the
    first's backlog, not after all of it."""
    store = Store(tmp / "tedstore.db")
    stamp = tedstore.utc_text(time.time() - 7200)
    with tedstore.transaction(store.conn):          # ~0.1 s for each performance query
        store.conn.executemany(
            "INSERT INTO predictions (game_id, predicted_at_tick, predicted_end_tick, "
            "confidence, model_version, created_at, actual_end_tick, raw_error) "
            "VALUES (?, ?, 100, 0.5, 'v', ?, 100, ?)",
            ((f"slow-{n // 100}", n % 100, stamp, n % 301 - 150) for n in range(150_000)))
    store.conn.close()
    daemon = daemon_factory()
    greedy, polite = daemon.connect(), daemon.connect()
    greedy.send(*[{"op": "query", "q": "performance", "hours": 24}] * 30)
    order: list[str] = []

    def read_greedy() -> None:
        for _ in range(30):
            greedy.read_until("result")
            order.append("greedy")

    reader = threading.Thread(target=read_greedy)
    reader.start()
    wait_for(lambda: order, what="the first greedy answer")
    before = len(order)
    polite.send({"op": "query", "q": "state", "key": "k"})
    polite.read_until("result")
    waited = len(order) - before
    reader.join()
    assert before < 30 - 2 * tedstore.QUERY_THREADS          # the backlog was still long
    assert waited <= tedstore.QUERY_THREADS + 1, (before, waited)
