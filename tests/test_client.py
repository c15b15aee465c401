"""What trackers and operators send with: the Client, `tedstore send` and `tedstore simulate`."""

from __future__ import annotations

import functools
import json
import re
import os
import socket
import subprocess
import sys
import threading
import time


import tedstore
import conftest
from conftest import clean_env, game_start, prediction, query, state_write, wait_for


run_cli = functools.partial(conftest.run_cli, text=False)        # these tests read bytes


# -- tedstore send ------------------------------------------------------------------------

def test_send_waits_for_acks_and_reports_rejections_by_file_and_line(daemon, tmp):
    first = tmp / "a.ndjson"
    first.write_text("\n".join(json.dumps(prediction("a", i, i + 9)) for i in range(3)) + "\n")
    second = tmp / "b.ndjson"
    second.write_text(json.dumps(prediction("b", 1, 9)) + "\n{oops\n"
                      + json.dumps(prediction("b", 2, 9)))            # no final newline
    result = run_cli("send", "--socket", daemon.socket, str(first), str(second))
    assert result.returncode == 1
    err = result.stderr.decode()
    assert f"{second}:2: bad_json:" in err
    assert "6 lines" in err and "1 rejected" in err
    assert daemon.query("SELECT count(*) FROM predictions") == [(5,)]


def test_send_from_stdin_exits_zero_when_all_lines_are_stored(daemon):
    data = "".join(json.dumps(prediction("s", i, i + 9)) + "\n" for i in range(500)).encode()
    result = run_cli("send", "--socket", daemon.socket, input=data)
    assert result.returncode == 0, result.stderr
    assert daemon.query("SELECT count(*) FROM predictions") == [(500,)]


def test_send_without_a_daemon_says_so_in_one_line(tmp):
    result = run_cli("send", "--socket", str(tmp / "none.sock"), input=b"{}\n")
    assert result.returncode == 1
    err = result.stderr.decode().strip()
    assert "cannot reach tedstore" in err and "tedstore serve" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


# -- tedstore simulate ----------------------------------------------------------------------

def test_simulate_plays_whole_games_into_the_daemon(daemon):
    result = run_cli("simulate", "--socket", daemon.socket, "--games", "3", "--seed", "5")
    assert result.returncode == 0, result.stderr
    games = daemon.query("SELECT count(*), count(end_tick), sum(had_predictions) FROM games")
    assert games == [(3, 3, 3)]
    assert daemon.query("SELECT count(*) FROM predictions WHERE actual_end_tick IS NULL") == [(0,)]
    assert daemon.query("SELECT count(*) FROM side_bets WHERE actual_outcome = 'PENDING'") == [(0,)]


def test_simulate_is_reproducible(tmp):
    args = ("simulate", "--games", "2", "--seed", "7", "--start", "2026-11-20T08:00", "--stdout")
    one, two = run_cli(*args).stdout, run_cli(*args).stdout
    assert one == two and one.count(b"\n") > 50
    events = [json.loads(line) for line in one.splitlines()]
    assert {e["event"] for e in events} == {"gameStart", "priceUpdate", "prediction",
                                            "sideBet", "gameEnd"}
    for line in one.splitlines():
        tedstore.decode_line(line)                      # every simulated line is valid


def game_ids(ndjson: bytes) -> set[str]:
    return {json.loads(line).get("gameId") for line in ndjson.splitlines()} - {None}


def test_simulate_plays_new_games_each_run_unless_seeded():
    first = game_ids(run_cli("simulate", "--games", "3", "--stdout").stdout)
    second = game_ids(run_cli("simulate", "--games", "3", "--stdout").stdout)
    assert len(first) == len(second) == 3 and not first & second
    seeded = [game_ids(run_cli("simulate", "--games", "3", "--seed", "4", "--stdout").stdout)
              for _ in range(2)]
    assert seeded[0] == seeded[1] == {"sim-4-0", "sim-4-1", "sim-4-2"}


def test_simulate_never_writes_events_beyond_the_clock_skew():
    result = run_cli("simulate", "--games", "500", "--start", "1h", "--stdout")
    assert result.returncode == 1 and result.stdout == b""
    [line] = result.stderr.decode().strip().splitlines()
    assert "TEDSTORE_MAX_CLOCK_SKEW" in line and "start earlier, or play fewer" in line
    played = run_cli("simulate", "--games", "20", "--stdout",
                     env={"TEDSTORE_MAX_CLOCK_SKEW": "0"}).stdout
    newest = max(json.loads(line)["ts"] for line in played.splitlines())
    assert newest / 1000 <= time.time()


def test_simulate_rate_is_honoured(daemon):
    started = time.monotonic()
    result = run_cli("simulate", "--socket", daemon.socket, "--events", "200", "--rate", "400")
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started >= 0.45           # 200 events at 400/s take 0.5 s


# -- the Python client ----------------------------------------------------------------------

def test_client_delivers_and_counts(daemon):
    with tedstore.Client(daemon.socket) as client:
        for i in range(1000):
            client.send(prediction("c", i, i + 5))
        client.send(tedstore.GameStart(gameId="c", tick=0, price=1.0))
        client.send(game_start("c", -1, 1.0))
        assert client.flush(15)
        assert (client.sent, client.acked, client.rejected, client.dropped) == (1002, 1001, 1, 0)
    assert daemon.query("SELECT count(*) FROM predictions") == [(1000,)]


def test_client_never_blocks_or_raises_without_a_daemon(tmp):
    client = tedstore.Client(str(tmp / "nobody.sock"), buffer_size=100)
    for i in range(1000):
        client.send(prediction("x", i, i + 1))
    client.send({"not": object()})                      # cannot be encoded: counted, not raised
    assert client.flush(0.2) is False
    assert client.dropped == 901 and client.sent == 1000
    assert client.close(timeout=0.1) is False


def test_client_send_returns_while_the_other_end_reads_nothing(tmp):
    """A listener that accepts and never reads: the socket fills up, send() still returns."""
    path = str(tmp / "deaf.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    client = tedstore.Client(path, buffer_size=1000)
    wait_for(lambda: client.connected, what="the client to connect")
    big = state_write("k", "v" * 1000)
    sender = threading.Thread(target=lambda: [client.send(big) for _ in range(20_000)])
    sender.start()
    sender.join(60)                          # 20 MB into a socket nobody reads
    assert not sender.is_alive(), "send() blocked behind a full socket"
    assert (client.sent, client.dropped, client.acked) == (20_000, 19_000, 0)
    assert client.close(timeout=0.1) is False
    server.close()


def test_client_resends_across_a_daemon_restart(daemon_factory):
    daemon = daemon_factory()
    client = tedstore.Client(daemon.socket)
    stop = threading.Event()
    sent = []

    def produce() -> None:
        i = 0
        while not stop.is_set() or i < 3000:
            client.send(prediction("r", i, i + 3))
            sent.append(i)
            i += 1
            if i % 100 == 0:
                time.sleep(0.005)

    producer = threading.Thread(target=produce)
    producer.start()
    wait_for(lambda: client.acked > 500, what="first acks")
    daemon.kill()                                       # mid-stream, unacked lines in flight
    time.sleep(0.3)
    daemon_factory()                                    # same folder, same socket
    stop.set()
    producer.join()
    assert client.flush(30), (client.acked, client.sent)
    stored = {row[0] for row in query(daemon.db, "SELECT predicted_at_tick FROM predictions "
                                                 "WHERE game_id = 'r'")}
    assert stored == set(sent)
    assert client.dropped == 0 and client.rejected == 0
    client.close()


def test_client_is_a_no_op_when_persistence_is_disabled(tmp, monkeypatch):
    monkeypatch.setenv("PERSISTENCE_ENABLED", "false")
    client = tedstore.Client(str(tmp / "never.sock"))
    client.send(prediction("x", 1, 2))
    assert client.flush(0) is True and client.sent == 0
    assert not client._thread.is_alive()
    client.close()


def on_a_terminal(*args: str) -> str:
    """`tedstore ARGS` on a terminal (a pty): what a person would see."""
    import pty
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "tedstore", *args], stderr=follower,
                            stdout=follower, env=clean_env())
    os.close(follower)
    output = b""
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:                    # the terminal closes when the command exits
            break
        if not data:
            break
        output += data
    assert proc.wait(120) == 0, output.decode(errors="replace")
    return output.decode(errors="replace")


def test_long_commands_show_progress_on_a_terminal_and_sum_up_in_one_line(daemon, tmp):
    """send, simulate, import, rollup and export: a bar on a terminal, then one line with
    thousands separators."""
    events = tmp / "many.ndjson"
    events.write_text("".join(json.dumps(prediction("p", i, i + 9)) + "\n" for i in range(5000)))
    text = on_a_terminal("send", "--socket", daemon.socket, str(events))
    assert "sending" in text and "100%" in text and "5,000 stored" in text
    text = on_a_terminal("simulate", "--days", "0.5", "--socket", daemon.socket)
    assert "simulating" in text and "100%" in text
    summary = re.search(r"simulated ([\d,]+) events in [\d.,]+ s \([\d,]+/s\): ([\d,]+) stored, "
                        r"0 duplicates, 0 rejected", text)
    assert summary and summary.group(1) == summary.group(2) and "," in summary.group(1), text
    out = tmp / "predictions.csv"
    text = on_a_terminal("export", "--db", daemon.db, "--table", "predictions", "-o", str(out))
    written = len(out.read_text().splitlines())
    assert "exporting" in text and "100%" in text and f"exported {written:,} lines" in text
    assert written > 5000
    copy = tmp / "copy.db"
    assert run_cli("init", "--db", str(copy)).returncode == 0
    text = on_a_terminal("import", "--db", str(copy), str(events))
    assert "importing" in text and "100%" in text and "5,000 stored" in text
    text = on_a_terminal("rollup", "--db", str(copy), "--since", "3d")
    assert "rolling up" in text and re.search(r"rolled up [\d,]+ hour", text), text


def test_rejections_are_named_by_file_and_line_even_for_a_file_given_twice(daemon, tmp):
    events = tmp / "twice.ndjson"
    events.write_text(json.dumps(prediction("t", 1, 9)) + "\n{oops\n")
    result = run_cli("send", "--socket", daemon.socket, str(events), str(events))
    assert result.returncode == 1
    assert result.stderr.decode().count(f"{events}:2: bad_json") == 2


def test_simulated_games_end_now_rather_than_in_the_future():
    events = list(tedstore.simulate_events(5, seed=3))
    newest = max(e["ts"] for e in events) / 1000
    assert time.time() - 10 < newest <= time.time()


def test_simulate_plays_just_enough_games_for_an_event_budget():
    events = list(tedstore.simulate_events(events=1000, seed=5))
    assert len(events) == 1000
    assert time.time() - 3600 < events[0]["ts"] / 1000         # not hours in the past
    assert len(list(tedstore.simulate_events(events=50, seed=5, mix="predictions"))) == 50


def test_a_stranger_on_the_socket_is_one_clear_line(tmp):
    """Something that is not tedstore answers: the CLI says so instead of a traceback."""
    path = str(tmp / "stranger.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def answer() -> None:
        conn, _ = server.accept()
        conn.recv(1024)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        conn.close()

    threading.Thread(target=answer, daemon=True).start()
    result = run_cli("send", "--socket", path, input=b'{"op":"ping"}\n')
    err = result.stderr.decode()
    assert result.returncode == 1 and "is tedstore what listens there?" in err
    assert "Traceback" not in err
    server.close()


def client_log(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "tedstore"]


def test_a_refused_client_says_why_once_however_often_it_retries(daemon_factory, caplog):
    daemon = daemon_factory(env={"TEDSTORE_ALLOW_UIDS": "12345"})
    client = tedstore.Client(daemon.socket)
    client.send(prediction("x", 1, 2))
    wait_for(lambda: client._troubles["connection"].total >= 5, what="five refused connections")
    assert client.connected is False
    client.close(timeout=0.1)
    lines = client_log(caplog)
    assert lines[0] == (f"tedstore client: tedstore at {daemon.socket} refused the connection: "
                        f"uid {os.getuid()} is not allowed to send to tedstore "
                        f"(TEDSTORE_ALLOW_UIDS)")
    assert len(lines) == 2 and lines[1].startswith("tedstore client: closed with 1 events not "
                                                   "delivered, after ")


def test_an_unreachable_daemon_is_one_warning_then_a_count_now_and_then(tmp, caplog,
                                                                         monkeypatch):
    monkeypatch.setattr(tedstore, "TROUBLE_LOG_SECONDS", 0.3)
    path = str(tmp / "nobody.sock")
    client = tedstore.Client(path)
    client.send(prediction("x", 1, 2))
    wait_for(lambda: any("more failed connections" in line for line in client_log(caplog)),
             what="a count of failed connections")
    client.close(timeout=0.1)
    lines = client_log(caplog)
    assert lines[0].startswith(f"tedstore client: cannot reach tedstore at {path}: ")
    assert lines[0].endswith("events wait in the client's buffer")
    assert "more failed connections in the last 0 s; the latest: cannot reach" in lines[1]
    assert "closed with 1 events not delivered" in lines[-1]
    attempts = sum(int(line.split()[2]) for line in lines[1:-1]) + 1
    assert len(lines) < attempts + 2                  # fewer lines than attempts


def test_a_flood_of_bad_events_writes_a_handful_of_log_lines(daemon, caplog):
    with tedstore.Client(daemon.socket) as client:
        for _ in range(100_000):
            client.send({"event": "prediction", "game_id": "no fields"})
        assert client.flush(120)
        assert client.connected is True
        assert (client.rejected, client.acked, client.dropped) == (100_000, 0, 0)
    lines = client_log(caplog)
    assert lines[0].startswith("tedstore client: tedstore rejected an event (bad_event): "
                               "prediction: Object missing required field")
    assert lines[-1].startswith("tedstore client: closed, after 100000 rejected events over")
    assert len(lines) <= 3              # and a count a minute, had it taken that long
