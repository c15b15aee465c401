"""The daemon as a subprocess: acks after commit, bad input, limits, back-pressure, drain, crashes."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time


import tedstore
from conftest import Conn, game_start, prediction, predictions, query, wait_for


def test_pipelined_lines_are_acked_and_stored(daemon):
    conn = daemon.connect()
    conn.send(*predictions("g", 2000))
    assert conn.wait_ack(2000) == []
    acks = [r["ack"] for r in conn.replies]
    assert acks == sorted(acks) and acks[-1] == 2000
    assert daemon.query("SELECT count(*) FROM predictions") == [(2000,)]


def test_every_ack_comes_after_its_commit(daemon):
    """Whenever an ack arrives, every line it covers is already readable by another process."""
    conn = daemon.connect()
    for batch in range(20):
        conn.send(*predictions(f"g{batch}", 50))
        conn.wait_ack(50 * (batch + 1))
        stored = daemon.query("SELECT count(*) FROM predictions")[0][0]
        assert stored == 50 * (batch + 1)


def test_batches_never_exceed_the_batch_size(daemon_factory):
    daemon = daemon_factory(env={"PERSISTENCE_BATCH_SIZE": "100"})
    conn = daemon.connect()
    conn.send(*predictions("g", 3000))
    conn.wait_ack(3000)
    acks = [0] + [r["ack"] for r in conn.replies if "ack" in r]
    assert max(b - a for a, b in zip(acks, acks[1:])) <= 100


def test_a_duplicate_is_acked_and_changes_nothing(daemon):
    first_seen = int(time.time()) - 3600
    first = daemon.connect()
    first.send(prediction("g", 10, 90), game_start("g", 0, 1.0, ts=first_seen))
    first.wait_ack(2)
    before = daemon.query("SELECT * FROM predictions")
    second = daemon.connect()
    second.send(prediction("g", 10, 95), game_start("g", 3, 9.0, ts=first_seen + 600))
    assert second.wait_ack(2) == []
    assert daemon.query("SELECT * FROM predictions") == before
    assert daemon.query("SELECT start_tick, peak_price, started_at FROM games") == \
        [(0, 1.0, tedstore.utc_text(first_seen))]


BAD_LINES = [
    (b"{not json", "bad_json"),
    (b'{"event":"gameStart","gameId":"g","tick":0,"price":NaN}', "bad_json"),
    (b'{"event":"prediction","game_id":"g","predicted_at_tick":1,"predicted_end_tick":9,'
     b'"confidence":Infinity}', "bad_json"),
    (b'{"event":"gameStart","gameId":"x\xfe\xff","tick":0,"price":1}', "bad_utf8"),
    (b'{"event":"gameStart","gameId":"g","tick":0,"price":1e400}', "bad_event"),
    (b'{"event":"gameStart","gameId":"g","tick":-3,"price":1}', "bad_event"),
    (b'{"event":"gameStart","gameId":"g","tick":"zero","price":1}', "bad_event"),
    (b'{"event":"gameStart","gameId":"g","tick":0,"price":1,"x":' + b"[" * 3000 + b"]" * 3000
     + b"}", "bad_json"),
    (b'{"event":"prediction","game_id":"g","predicted_at_tick":1,"predicted_end_tick":9,'
     b'"confidence":7}', "bad_event"),
    (b"[1,2,3]", "bad_event"),
    (b"", "bad_json"),
    (b'{"event":"rocket"}', "unknown_event"),
    (b'{"op":"selfdestruct"}', "unknown_event"),
]


def test_bad_lines_cost_nothing_around_them(daemon):
    conn = daemon.connect()
    lines, expected = [], {}
    for i, (bad, code) in enumerate(BAD_LINES):
        lines.append(json.dumps(prediction("good", i, 100)).encode())
        lines.append(bad)
        expected[len(lines)] = code
    lines.append(json.dumps(prediction("good", 999, 1000)).encode())
    conn.send(*lines)
    rejections = conn.wait_ack(len(lines))
    assert {r["rejected"]: r["code"] for r in rejections} == expected
    assert all(r["error"] for r in rejections)
    assert daemon.query("SELECT count(*) FROM predictions") == [(len(BAD_LINES) + 1,)]
    stored = daemon.query("SELECT line_no, code, raw FROM rejects ORDER BY line_no")
    assert [(n, c) for n, c, _ in stored] == sorted(expected.items())
    assert stored[0][2] == "{not json"
    assert stored[3][2] == BAD_LINES[3][0]             # invalid UTF-8 kept byte for byte
    # the same connection is still good, and so is the daemon
    conn.send(prediction("after", 1, 2))
    assert conn.wait_ack(len(lines) + 1) == []
    assert daemon.proc.poll() is None


def test_rejected_reply_comes_before_the_ack_that_covers_it(daemon):
    conn = daemon.connect()
    conn.send(b"nope", prediction("g", 1, 2))
    conn.wait_ack(2)
    kinds = [next(iter(r)) for r in conn.replies]
    assert kinds.index("rejected") < kinds.index("ack")


def test_too_long_lines_are_cut_out_and_the_connection_stays_usable(daemon_factory):
    daemon = daemon_factory(env={"TEDSTORE_MAX_LINE_BYTES": "8192"})
    conn = daemon.connect()
    huge = b'{"event":"state","key":"k","value":"' + b"x" * 20_000 + b'"}'
    conn.send(prediction("g", 1, 2), huge, prediction("g", 2, 3))
    # a long line that arrives in pieces, then more lines on the same connection
    conn.sock.sendall(b'{"event":"state","key":"k2","value":"' + b"y" * 6000)
    time.sleep(0.2)
    conn.sock.sendall(b"y" * 6000 + b'"}\n')
    conn.send(prediction("g", 3, 4))
    rejections = conn.wait_ack(5)
    assert [(r["rejected"], r["code"]) for r in rejections] == [(2, "too_long"), (4, "too_long")]
    assert "8192" in rejections[0]["error"]
    assert daemon.query("SELECT count(*) FROM predictions") == [(3,)]
    raw = daemon.query("SELECT length(raw) FROM rejects WHERE line_no = 2")
    assert raw == [(tedstore.MAX_RAW_BYTES,)]


def test_control_lines_answer_at_once_and_count_as_lines(daemon):
    conn = daemon.connect()
    conn.send({"op": "ping"})
    assert conn.read_until("pong") == {"pong": True}
    conn.send({"op": "status"})
    status = conn.read_until("status")["status"]
    assert status["enabled"] is True and status["version"] == tedstore.__version__
    conn.send(prediction("g", 1, 2))
    conn.wait_ack(3)


def test_an_unterminated_last_line_is_taken_at_end_of_input(daemon):
    conn = daemon.connect()
    conn.sock.sendall(json.dumps(prediction("g", 1, 2)).encode() + b"\n"
                      + json.dumps(prediction("g", 2, 3)).encode())
    conn.sock.shutdown(socket.SHUT_WR)
    conn.wait_ack(2)
    assert conn.sock.recv(10) == b""                   # closed once everything is acked
    assert daemon.query("SELECT count(*) FROM predictions") == [(2,)]


def test_connection_limit(daemon_factory):
    daemon = daemon_factory(env={"TEDSTORE_MAX_CONNECTIONS": "3"})
    held = []

    def hold_one() -> bool:
        """Connections that just closed may hold a slot until their last ack: retry."""
        try:
            conn = daemon.connect()
            conn.send({"op": "ping"})
            conn.read_until("pong")
        except (ConnectionError, OSError, KeyError):
            return False
        held.append(conn)
        return True

    for _ in range(3):
        wait_for(hold_one, what="a connection slot")
    extra = daemon.connect()
    assert "TEDSTORE_MAX_CONNECTIONS" in extra.read_until("error")["error"]
    held[0].close()
    wait_for(lambda: _can_ping(daemon.socket), what="a free connection slot")


def _can_ping(path: str) -> bool:
    try:
        return tedstore.request(path, "ping") == {"pong": True}
    except tedstore.ProtocolError:
        return False


def test_idle_connections_are_closed(daemon_factory):
    daemon = daemon_factory(env={"TEDSTORE_IDLE_TIMEOUT": "1"})
    conn = daemon.connect()
    conn.send({"op": "ping"})
    conn.read_until("pong")
    conn.sock.settimeout(10)
    assert "idle" in conn.read_until("error")["error"]
    assert conn.sock.recv(10) == b""


def test_fifty_idle_or_half_line_clients_do_not_stop_a_new_one(daemon):
    idle = [daemon.connect() for _ in range(25)]
    half = [daemon.connect() for _ in range(25)]
    for conn in half:
        conn.sock.sendall(b'{"event":"prediction","game_id":"half","predicted_at')
    newcomer = daemon.connect()
    newcomer.send(*predictions("new", 10))
    assert newcomer.wait_ack(10) == []
    assert len(idle) + len(half) == 50


def _rss_kb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_flood_that_never_reads_replies_is_held_back(daemon_factory):
    """The kernel stops the flooder; the daemon's memory stays flat; others are served."""
    daemon = daemon_factory(env={"TEDSTORE_QUEUE_EVENTS": "2000",
                                 "TEDSTORE_QUEUE_BYTES": "1000000"})
    base = _rss_kb(daemon.proc.pid)
    flooder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    flooder.connect(daemon.socket)
    flooder.setblocking(False)
    bad = b"x" * 200 + b"\n"           # every line earns a rejection reply it never reads
    block = bad * 5000
    pushed, stalled_since = 0, None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            pushed += flooder.send(block)
            stalled_since = None
        except BlockingIOError:
            stalled_since = stalled_since or time.monotonic()
            if time.monotonic() - stalled_since > 2:
                break
            time.sleep(0.01)
    assert stalled_since is not None, "the flooder was never held back"
    assert pushed < 100 * 1024 * 1024
    grown_mb = (_rss_kb(daemon.proc.pid) - base) / 1024
    assert grown_mb < 64, f"the daemon grew by {grown_mb:.0f} MB"
    other = daemon.connect()
    other.send(*predictions("other", 100))
    assert other.wait_ack(100) == []
    flooder.close()


def test_sigterm_drains_commits_and_acks_what_was_accepted(daemon):
    conn = daemon.connect()
    lines = predictions("g", 20_000)
    sender = threading.Thread(target=lambda: _send_quietly(conn, lines))
    sender.start()
    wait_for(lambda: daemon.query("SELECT count(*) FROM predictions")[0][0] > 0,
             what="the first commit")
    daemon.proc.send_signal(signal.SIGTERM)
    acked = 0
    try:
        while True:
            reply = conn.read_reply()
            acked = max(acked, reply.get("ack", 0))
    except (ConnectionError, OSError):
        pass
    sender.join()
    assert daemon.proc.wait(30) == 0
    assert acked > 0
    stored = {row[0] for row in query(daemon.db, "SELECT predicted_at_tick FROM predictions")}
    assert set(range(acked)) <= stored                 # every acked line is there
    assert "stopping" in daemon.log() and "stopped" in daemon.log()
    assert not os.path.exists(daemon.socket)


def _send_quietly(conn: Conn, lines: list[dict]) -> None:
    try:
        for first in range(0, len(lines), 500):
            conn.send(*lines[first:first + 500])
    except OSError:
        pass


def _ingest_until_killed(path: str, client: int, acked: dict, killed: threading.Event,
                         errors: list) -> None:
    """Send unique predictions on one connection, keeping at most 4,000 unacknowledged,
    and remember the highest ack; any error before the kill fails the test."""
    try:
        conn = Conn(path, timeout=60)
        sent = 0
        while not killed.is_set():
            if sent - acked[client] < 4000:
                conn.send(*[prediction(f"c{client}", sent + i, sent + i + 1) for i in range(200)])
                sent += 200
            conn.poll(0 if sent - acked[client] < 4000 else 0.2)
            acked[client] = conn.acked
    except (ConnectionError, OSError) as exc:
        if not killed.is_set():
            errors.append(f"client {client}: {exc!r}")


def test_kill_9_during_ingest_loses_no_acknowledged_line(daemon_factory):
    daemon = daemon_factory()
    acked = {client: 0 for client in range(4)}
    killed, errors = threading.Event(), []
    threads = [threading.Thread(target=_ingest_until_killed,
                                args=(daemon.socket, c, acked, killed, errors)) for c in acked]
    for thread in threads:
        thread.start()
    wait_for(lambda: errors or min(acked.values()) > 20_000, timeout=120,
             what="sustained ingest from four connections")
    assert not errors
    killed.set()
    daemon.kill()
    for thread in threads:
        thread.join(30)
    restarted = daemon_factory()
    for client, last in acked.items():
        stored = {row[0] for row in restarted.query(
            "SELECT predicted_at_tick FROM predictions WHERE game_id = ?", (f"c{client}",))}
        missing = set(range(last)) - stored
        assert not missing, f"client {client}: {len(missing)} acknowledged lines lost"
    assert restarted.query("PRAGMA integrity_check") == [("ok",)]


def test_a_second_daemon_on_the_same_database_refuses(daemon, daemon_factory, tmp):
    other = daemon_factory(env={"TEDSTORE_SOCKET": str(tmp / "other.sock")}, start=False)
    other.start(wait=False)
    assert other.proc.wait(15) == 1
    assert "already serving" in other.log() and "Traceback" not in other.log()


def test_a_second_daemon_on_the_same_socket_refuses(daemon, daemon_factory, tmp):
    other = daemon_factory(env={"TEDSTORE_DB": str(tmp / "other.db")}, start=False)
    other.start(wait=False)
    assert other.proc.wait(15) == 1
    assert "already listening" in other.log() and "Traceback" not in other.log()
    assert not [name for name in os.listdir(tmp) if name.startswith("other.db")]


def test_a_daemon_that_cannot_take_its_socket_leaves_no_files(daemon_factory, tmp):
    folder = tmp / "data"
    folder.mkdir()
    daemon = daemon_factory(env={"TEDSTORE_DB": str(folder / "t.db"),
                                 "TEDSTORE_SOCKET": str(tmp / "missing" / "t.sock")}, start=False)
    daemon.start(wait=False)
    assert daemon.proc.wait(15) == 1
    assert "cannot listen on" in daemon.log() and "TEDSTORE_SOCKET" in daemon.log()
    assert os.listdir(folder) == []


def test_a_daemon_removes_only_the_socket_file_it_created(daemon_factory, tmp):
    first = daemon_factory()
    os.unlink(first.socket)                  # removed by mistake, and the path taken again
    second = daemon_factory(env={"TEDSTORE_DB": str(tmp / "second.db")})
    assert first.stop() == 0
    assert tedstore.request(second.socket, "ping") == {"pong": True}
    assert "left " + second.socket + " alone" in first.log()


def test_a_stale_socket_file_is_replaced(daemon_factory, tmp):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp / "tedstore.sock"))
    stale.close()                                      # the file stays, nobody listens
    daemon = daemon_factory()
    assert tedstore.request(daemon.socket, "ping") == {"pong": True}


def test_a_file_that_is_not_a_socket_is_left_alone(daemon_factory, tmp):
    (tmp / "tedstore.sock").write_text("mine")
    daemon = daemon_factory(start=False)
    daemon.start(wait=False)
    assert daemon.proc.wait(15) == 1
    assert "not a socket" in daemon.log()
    assert (tmp / "tedstore.sock").read_text() == "mine"


def test_socket_mode_is_0660_by_default(daemon):
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o660


def test_an_event_the_database_refuses_is_rejected_alone(daemon):
    """An operator's trigger that aborts one insert costs only that line."""
    subprocess.run(["sqlite3", "-cmd", ".timeout 5000", daemon.db, "CREATE TRIGGER no_poison BEFORE INSERT ON predictions "
                    "WHEN NEW.game_id = 'poison' BEGIN SELECT RAISE(ABORT, 'no poison'); END;"],
                   check=True)
    conn = daemon.connect()
    lines = predictions("good", 30)
    lines.insert(17, prediction("poison", 1, 2))
    conn.send(*lines)
    rejections = conn.wait_ack(31)
    assert [(r["rejected"], r["code"]) for r in rejections] == [(18, "bad_event")]
    assert "no poison" in rejections[0]["error"]
    assert daemon.query("SELECT count(*) FROM predictions") == [(30,)]


def test_serve_reports_a_missing_folder_in_one_line(tmp):
    result = subprocess.run([sys.executable, "-m", "tedstore", "serve", "--db",
                             str(tmp / "nope" / "t.db"), "--socket", str(tmp / "s.sock")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "TEDSTORE_DB" in result.stderr and "Traceback" not in result.stderr


def _chunk(lines: int, received: float, width: int = 10) -> tedstore.Chunk:
    return tedstore.Chunk(None, 1, lines, (b"x" * (width - 1) + b"\n") * lines, received)


def test_the_queue_is_bounded_by_waiting_time():
    queue = tedstore.IngestQueue(max_events=100, max_bytes=5000, max_wait=0.05)
    queue.put(tedstore._Task(lambda db: None))                    # a task ahead of the lines
    assert queue.put(_chunk(10, 100.0), now=100.0) is False
    assert queue.put(_chunk(10, 100.01), now=100.04) is False
    assert queue.put(_chunk(10, 100.06), now=100.06) is True     # the oldest waited 60 ms
    assert type(queue.take(100, 0, now=100.07)[0]) is tedstore._Task
    batch, room = queue.take(15, 0, now=100.07)
    assert [c.count for c in batch] == [10] and room is False     # what is left is not fresh
    batch, room = queue.take(100, 0, now=100.08)
    assert [c.count for c in batch] == [10, 10] and room is True  # drained: read again


def test_the_queue_is_bounded_by_events_and_bytes():
    queue = tedstore.IngestQueue(max_events=100, max_bytes=5000, max_wait=60)
    assert queue.put(_chunk(100, 200.0), now=200.0) is True       # 100 events
    batch, room = queue.take(50, 0, now=200.0)
    assert [c.count for c in batch] == [50] and room is False     # a lone chunk is cut; 50 left
    batch, room = queue.take(1, 0, now=200.0)
    assert room is True                                           # 49: below half
    queue.take(100, 0, now=200.0)
    assert queue.put(_chunk(10, 300.0, width=600), now=300.0) is True   # 6,000 bytes
