"""Every code block of the README, as a user copies it, run against a real daemon, so that
the README cannot drift from what the code does. Deployment paths (/var/lib/tedstore,
/srv/backups) and sudo are the only things changed on the way, and `systemctl stop/start`
stands for stopping and starting the daemon. Blocks that need root and systemd as PID 1
are checked against the units instead (tests/test_systemd.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import tedstore
from conftest import (BIN, README, DaemonProcess, clean_env, commands_of, localized, prediction,
                      query, readme_block, readme_blocks, shell, wait_for)


def test_every_code_block_is_run_or_checked_by_a_test():
    """Each block has its tag, and some test asks for it by that tag."""
    fences = re.findall(r"(?:<!-- readme: ([\w-]+)[^>]*-->\n)?```(\w*)\n", README.read_text())
    opening = fences[::2]                         # every other fence opens a block
    untagged = [lang for tag, lang in opening if not tag and lang != "text"]
    assert not untagged, f"{len(untagged)} README code block(s) without a <!-- readme: --> tag"
    sources = "".join(path.read_text() for path in Path(__file__).parent.glob("test_*.py"))
    unasked = [tag for tag in readme_blocks() if f'readme_block("{tag}")' not in sources]
    assert not unasked, f"README blocks no test runs: {unasked}"



def test_the_configuration_table_names_every_setting_and_the_query_table_every_query():
    """The README's tables are where a newcomer looks a setting or a query up."""
    text = README.read_text()
    settings = dict(re.findall(r"^\| `(\w+)` \| `([A-Z_]+)` \|", text, re.M))
    assert settings == tedstore.SETTING_ENV
    listed = {name for first_cell in re.findall(r"^\| ((?:`\w+`(?:, )?)+) \|", text, re.M)
              for name in re.findall(r"`(\w+)`", first_cell)}
    assert set(tedstore.QUERIES) <= listed, set(tedstore.QUERIES) - listed


@pytest.fixture
def here(tmp):
    """A daemon with its defaults (./tedstore.db, ./tedstore.sock) in the folder, and a few
    games in it."""
    daemon = DaemonProcess(tmp).start()
    assert shell("tedstore simulate --seed 1 --games 43", tmp).returncode == 0
    yield daemon
    if daemon.proc.poll() is None:
        daemon.stop()
    assert "Traceback" not in daemon.log(), daemon.log()


def run_python(block: str, folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", block], cwd=folder, capture_output=True,
                          text=True, timeout=60, env=clean_env())


# -- sending ----------------------------------------------------------------------------------

def test_the_client_snippet(here, tmp):
    result = run_python(readme_block("client"), tmp)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["2", "2", "0", "0"]
    assert here.query("SELECT count(*) FROM predictions WHERE game_id = 'g1'") == [(1,)]


def test_the_shell_sending_lines(here, tmp):
    events = [prediction("readme", tick, tick + 40) for tick in range(30)]
    for name, part in (("events.ndjson", events[:10]), ("tracker.ndjson", events[10:20]),
                       ("tracker-1.ndjson", events[20:25]), ("tracker-2.ndjson", events[25:])):
        (tmp / name).write_text("".join(json.dumps(event) + "\n" for event in part))
    for line in commands_of(readme_block("shell-send")):
        if line.startswith("tail -f"):          # follows the file forever: until it is in
            follower = subprocess.Popen(["bash", "-c", line], cwd=tmp, start_new_session=True,
                                        env=clean_env({"PATH": f"{BIN}:{os.environ['PATH']}"}))
            wait_for(lambda: here.query("SELECT count(*) FROM predictions WHERE game_id = "
                                        "'readme'")[0][0] >= 20, what="tail -f | send")
            os.killpg(follower.pid, signal.SIGTERM)
            follower.wait(10)
            continue
        result = shell(line, tmp)
        assert result.returncode == 0, (line, result.stderr)
    assert here.query("SELECT count(*) FROM predictions WHERE game_id = 'readme'") == [(30,)]
    assert here.query("SELECT count(*) FROM games")[0][0] >= 43 + 10


def test_the_socat_line(here, tmp):
    assert shutil.which("socat"), "socat is missing: .ci/run installs it"
    (tmp / "events.ndjson").write_text(json.dumps(prediction("socat", 1, 9)) + "\n{oops\n")
    [line] = commands_of(readme_block("socat"))
    result = shell(line, tmp)
    assert result.returncode == 0, result.stderr
    replies = [json.loads(reply) for reply in result.stdout.splitlines()]
    assert replies[-1] == {"ack": 2} and replies[0]["rejected"] == 2


# -- reading ----------------------------------------------------------------------------------

def test_the_warm_start_snippet(here, tmp):
    block = readme_block("warm-start") + "\nprint(len(predictions), len(side_bets), len(ticks), model)"
    result = run_python(block, tmp)
    assert result.returncode == 0, result.stderr
    predictions, side_bets, ticks, model = result.stdout.split()
    assert (int(predictions), model) == (200, "{}") and int(side_bets) > 0 and int(ticks) > 0


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_the_fastapi_example_answers_json_on_every_route(here, tmp):
    """The README's web API saved as tracker_api.py and run as the README says, with
    uvicorn: JSON from every route, sixteen requests at a time through its one Reader."""
    (tmp / "tracker_api.py").write_text(readme_block("web-api"))
    port = free_port()
    server = subprocess.Popen([os.path.join(BIN, "uvicorn"), "tracker_api:app", "--port",
                               str(port)], cwd=tmp, env=clean_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: server.poll() is not None or port_open(port), timeout=60,
                 what="uvicorn to serve")
        assert server.poll() is None, server.stderr.read().decode()
        routes = set(get(f"{base}/openapi.json")[1]["paths"])
        game = here.query("SELECT game_id FROM games WHERE end_tick IS NOT NULL LIMIT 1")[0][0]
        asked = {"/api/persistence/status": {"enabled", "repository", "manager"},
                 "/api/persistence/metrics?hours=48": {"since", "until", "hours"},
                 "/api/analytics/performance": {"prediction_metrics", "sidebet_metrics"},
                 "/api/analytics/trends?days=2": {"hourly", "trends"},
                 "/api/analytics/patterns": {"patterns", "total_patterns_detected"},
                 f"/api/analytics/games/{game}": {"game", "predictions", "side_bets", "ticks"}}
        assert {path.split("?")[0].replace(game, "{game_id}") for path in asked} == routes
        with ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(lambda path: (path, get(base + path)), list(asked) * 8))
        for path, (status, body) in replies:
            assert status == 200 and asked[path] <= set(body), (path, status, body)
        assert get(f"{base}/api/analytics/games/no-such-game") == \
            (404, {"detail": "no game no-such-game"})
        status, body = get(f"{base}/api/persistence/metrics?hours=-1")
        assert status == 400 and "hours" in body["error"]
    finally:
        server.terminate()
        server.wait(30)


def port_open(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_the_read_commands(here, tmp):
    for line in commands_of(readme_block("read-commands")):
        result = shell(line, tmp)
        assert result.returncode == 0, (line, result.stderr)
        assert result.stdout.strip(), line


def test_the_export_lines(here, tmp):
    for line in commands_of(readme_block("export")):
        result = shell(line, tmp)
        assert result.returncode == 0, (line, result.stderr)
    assert (tmp / "predictions.csv").read_text().startswith("id,game_id,")
    assert "0 stored" in result.stderr and "duplicates" in result.stderr   # the same store


def test_the_report_lines(here, tmp):
    for line in commands_of(readme_block("report")):
        result = shell(line, tmp)
        assert result.returncode == 0, (line, result.stderr)
    for page in ("tedstore-report.html", "quarter.html", "two-days.html"):
        assert (tmp / page).read_text().startswith("<!doctype html>")
    assert "2 days · generated" in (tmp / "two-days.html").read_text()     # as asked


def test_the_comparison_lines(tmp):
    """Two simulated trackers, compared in one command each, as a newcomer would."""
    daemon = DaemonProcess(tmp).start()
    try:
        simulate, performance, report = [shell(line, tmp)
                                         for line in commands_of(readme_block("compare"))]
        assert simulate.returncode == 0, simulate.stderr
        assert performance.returncode == 0, performance.stderr
        lines = performance.stdout.splitlines()
        assert any(line.startswith("default") for line in lines), performance.stdout
        assert any(line.startswith("candidate") for line in lines), performance.stdout
        assert report.returncode == 0, report.stderr
        page = (tmp / "compare.html").read_text()
        assert "side by side" in page and "candidate" in page
    finally:
        daemon.stop()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_datasette_line(here, tmp):
    port = free_port()
    [line] = commands_of(readme_block("datasette"))
    line = localized(line, tmp, **{"--port 8001": f"--port {port}"})
    server = subprocess.Popen(["bash", "-c", line], cwd=tmp, start_new_session=True,
                              env=clean_env({"PATH": f"{BIN}:{os.environ['PATH']}"}),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}/tedstore/game_summary.json?_shape=array&_size=3"

        def answer():
            try:
                with urllib.request.urlopen(url, timeout=5) as reply:
                    return json.loads(reply.read())
            except OSError:
                return None
        rows = wait_for(lambda: answer() or server.poll() is not None, timeout=60,
                        what="datasette to answer")
        assert isinstance(rows, list) and rows and "game_id" in rows[0], server.stderr
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


def test_the_sqlite_utils_lines(here, tmp):
    counts, query = (shell(localized(line, tmp), tmp) for line in
                     commands_of(readme_block("sqlite-utils")))
    assert counts.returncode == 0, counts.stderr
    assert re.search(r"^games\s+43$", counts.stdout, re.M), counts.stdout
    assert query.returncode == 0, query.stderr
    rows = json.loads(query.stdout)
    assert len(rows) == 5 and set(rows[0]) == {"game_id", "predictions", "mean_absolute_error"}


# -- operations -------------------------------------------------------------------------------

def test_the_prometheus_cron_line(here, tmp):
    [line] = commands_of(readme_block("status-cron"))
    command = localized(line.split(" ", 5)[5], tmp)           # the five cron fields aside
    (tmp / "node_exporter").mkdir()
    result = shell(command, tmp)
    assert result.returncode == 0, result.stderr
    assert "tedstore_up 1" in (tmp / "node_exporter" / "tedstore.prom").read_text()
    assert os.listdir(tmp / "node_exporter") == ["tedstore.prom"]


def test_the_backup_and_restore_lines(here, tmp):
    (tmp / "srv").mkdir()
    for line in commands_of(readme_block("backup")):
        result = shell(localized(line, tmp), tmp)
        assert result.returncode == 0, (line, result.stderr)
    named = re.search(r"tedstore-\d{8}T\d{6}Z\.db", readme_block("restore")).group(0)
    assert shell(f"tedstore backup srv/{named}", tmp).returncode == 0
    games = here.query("SELECT count(*) FROM games")
    conn = here.connect()
    conn.send(prediction("after-the-backup", 1, 9))
    conn.wait_ack(1)
    for line in commands_of(readme_block("restore")):
        if "systemctl stop" in line:
            assert here.stop() == 0
        elif "systemctl start" in line:
            here.start()
        else:
            result = shell(localized(line, tmp), tmp)
            assert result.returncode == 0, (line, result.stderr)
    assert here.query("SELECT count(*) FROM games") == games
    assert here.query("SELECT count(*) FROM predictions WHERE game_id = 'after-the-backup'") \
        == [(0,)]
    kept = [name for name in os.listdir(tmp) if ".replaced-" in name]
    assert query(str(tmp / kept[0]), "SELECT count(*) FROM predictions WHERE game_id = "
                                     "'after-the-backup'") == [(1,)]
