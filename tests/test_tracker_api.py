"""The Client and the Reader as trackers embed them: a Client whose daemon is down or
restarts costs no CPU and loses nothing; one Reader shared by a web server's threads gives
each call its own answer."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import tedstore
from conftest import Play, ROOT, Store, clean_env, state_write, wait_for

TRACKER = textwrap.dedent("""
    import json, os, sys, time
    sys.path.insert(0, {root!r})
    import tedstore

    def cpu(thread):
        fields = open(f"/proc/self/task/{{thread.native_id}}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    client = tedstore.Client({socket!r})
    step = sys.stdin.readline
    sent = 0
    for line in iter(step, ""):
        command = line.split()
        if command[0] == "send":             # send N events, one every 10 ms, like a tracker
            for _ in range(int(command[1])):
                client.send({{"event": "prediction", "game_id": "cpu", "predicted_at_tick": sent,
                             "predicted_end_tick": sent + 40, "confidence": 0.5}})
                sent += 1
                time.sleep(0.01)
        elif command[0] == "flush":
            ok = client.flush(float(command[1]))
            print(json.dumps({{"flushed": ok, "acked": client.acked, "sent": client.sent}}), flush=True)
        elif command[0] == "cpu":
            print(json.dumps({{"cpu": cpu(client._thread)}}), flush=True)
    client.close()
""")


class Tracker:
    """A tracker process with a Client, driven line by line through its stdin."""

    def __init__(self, socket_path: str):
        self.proc = subprocess.Popen([sys.executable, "-c", TRACKER.format(root=str(ROOT),
                                                                         socket=socket_path)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=clean_env())

    def do(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def send(self, events: int) -> None:
        self.proc.stdin.write(f"send {events}\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


def test_a_client_backs_off_for_real_while_the_daemon_is_down(daemon_factory, tmp):
    """Down at the start, then restarted under a sending tracker: the client's thread
    uses well under 0.05 s of CPU per second of outage, and every event arrives once."""
    daemon = daemon_factory(start=False)
    tracker = Tracker(daemon.socket)
    try:
        before = tracker.do("cpu")["cpu"]
        tracker.send(200)                                  # 2 s of events, nobody listening
        down = time.monotonic()
        assert tracker.do("flush 0")["flushed"] is False
        outage = time.monotonic() - down
        first = tracker.do("cpu")["cpu"] - before
        daemon.start()
        assert tracker.do("flush 30") == {"flushed": True, "acked": 200, "sent": 200}
        daemon.stop()                                       # a restart, under a sending tracker
        during = tracker.do("cpu")["cpu"]
        tracker.send(200)
        restarted = time.monotonic()
        daemon.start()
        second_outage = time.monotonic() - restarted
        assert tracker.do("flush 30") == {"flushed": True, "acked": 400, "sent": 400}
        second = tracker.do("cpu")["cpu"] - during
    finally:
        tracker.close()
    assert first <= 0.05 * outage, f"{first:.2f} s of CPU in {outage:.1f} s of outage"
    assert second <= 0.05 * max(second_outage, 2.0) + 0.05, f"{second:.2f} s of CPU"
    assert daemon.query("SELECT count(*), count(DISTINCT predicted_at_tick) FROM predictions") \
        == [(400, 400)]


# -- one Reader, many threads ---------------------------------------------------------------

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from conftest import DaemonProcess
    folder = tmp_path_factory.mktemp("shared")
    store = Store(folder / "tedstore.db")
    play = Play(seed=9, games=40)
    store.send(*play.events, state_write("tracker.model", [1, 2, 3]))
    now = time.time()
    tedstore.run_rollups(store.conn, lambda step: step(store.conn),
                         tedstore.hours_to_roll(store.conn, now, store.settings), now)
    store.conn.close()
    daemon = DaemonProcess(folder).start()
    yield daemon, play
    daemon.stop()


def mixed_calls(play: Play) -> list[tuple[str, tuple, dict]]:
    """Calls whose answers do not move with the clock: fixed windows and the newest rows."""
    since, until = play.games[0]["start"] - 3600, play.games[-1]["start"] + 7200
    window = {"since": since, "until": until}
    return [("performance", (), window), ("performance", (), {**window, "type": "sidebets"}),
            ("patterns", (), window), ("games", (), {**window, "limit": 7}),
            ("metrics", (), window), ("rejects", (), window),
            ("game", (play.games[3]["id"],), {}), ("game", ("no-such-game",), {}),
            ("recent_predictions", (17,), {}), ("recent_side_bets", (5,), {}),
            ("recent_ticks", (3,), {}), ("load_state", ("tracker.model",), {}),
            ("load_state", ("missing",), {"default": "none"})]


@pytest.mark.parametrize("over", ["socket", "file"])
def test_one_reader_shared_by_sixteen_threads_gives_each_call_its_own_answer(served, over):
    daemon, play = served
    calls = mixed_calls(play)
    make = (lambda: tedstore.Reader(daemon.socket)) if over == "socket" else \
        (lambda: tedstore.Reader(db_path=daemon.db))
    with make() as alone:
        truth = [getattr(alone, name)(*args, **kwargs) for name, args, kwargs in calls]
    shared, wrong, errors = make(), [], []

    def work(seed: int) -> None:
        for n in range(60):
            index = (seed * 7 + n * 5) % len(calls)
            name, args, kwargs = calls[index]
            try:
                answer = getattr(shared, name)(*args, **kwargs)
            except Exception as exc:          # noqa: BLE001 - reported below, with the call
                errors.append((name, repr(exc)))
                continue
            if answer != truth[index]:
                wrong.append((name, args))

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and not wrong, (errors[:3], wrong[:3])
    assert len(shared._idle) <= tedstore.READER_IDLE_CONNECTIONS
    if over == "socket":
        status = shared.status()
        assert status["enabled"] is True and status["manager"]["running"] is True
        wait_for(lambda: shared.status()["connections"]["open"]     # the extras it closed
                 <= tedstore.READER_IDLE_CONNECTIONS, what="the extra connections to close")
    shared.close()
    if over == "socket":
        wait_for(lambda: tedstore.request(daemon.socket, "status")["status"]["connections"]
                 ["open"] == 1, what="the shared reader's connections to close")


def test_a_reader_rides_out_a_daemon_restart(daemon_factory):
    """Its idle connections die with the daemon; the next call opens a fresh one."""
    daemon = daemon_factory()
    with tedstore.Reader(daemon.socket) as reader:
        assert reader.load_state("k", 0) == 0
        daemon.stop()
        daemon.start()
        assert reader.load_state("k", 0) == 0
        assert reader.status()["manager"]["running"] is True


def test_a_reader_on_the_file_tells_its_daemons_status_or_that_none_runs(daemon_factory):
    daemon = daemon_factory()
    with tedstore.Reader(db_path=daemon.db) as reader:
        assert reader.status()["pid"] == daemon.proc.pid
        daemon.stop()
        status = reader.status()
        assert status["running"] is False and status["manager"]["running"] is False
