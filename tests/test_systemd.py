"""systemd: notify protocol, watchdog, socket activation, the units, peer credentials."""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import tedstore
from conftest import Conn, WatchedVFS, commands_of, prediction, query, readme_block, wait_for

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
needs_systemd_tools = pytest.mark.skipif(
    not shutil.which("systemd-analyze") or not shutil.which("systemd-socket-activate"),
    reason="systemd-analyze/systemd-socket-activate missing (.ci/run installs the systemd package)")


class NotifyListener:
    """A stand-in for systemd's $NOTIFY_SOCKET: collects the datagrams the daemon sends."""

    def __init__(self, folder: Path, abstract: bool = False):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"tedstore-test-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.address = str(folder / "notify.sock")
            self.sock.bind(self.address)
        self.messages: list[tuple[float, str]] = []
        self._stop = False
        self.sock.settimeout(0.1)
        self.thread = threading.Thread(target=self._collect, daemon=True)
        self.thread.start()

    def _collect(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def seen(self, prefix: str) -> list[tuple[float, str]]:
        return [(at, line) for at, message in list(self.messages)
                for line in message.splitlines() if line.startswith(prefix)]

    def close(self) -> None:
        self._stop = True
        self.thread.join()
        self.sock.close()


@pytest.fixture
def notify(tmp):
    listener = NotifyListener(tmp)
    yield listener
    listener.close()


@pytest.mark.slow
def test_ready_status_watchdog_and_stopping(daemon_factory, notify):
    daemon = daemon_factory(env={"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "1000000"},
                            start=False)
    daemon.start(wait=False)
    wait_for(lambda: notify.seen("READY=1"), what="READY=1")
    assert tedstore.socket_answers(daemon.socket)          # ready means listening
    ready_at = notify.seen("READY=1")[0][0]
    assert notify.seen("STATUS=queue 0 events")
    wait_for(lambda: len(notify.seen("WATCHDOG=1")) >= 3, what="watchdog pings")
    pings = [at for at, _ in notify.seen("WATCHDOG=1")]
    assert all(at >= ready_at for at in pings)
    assert max(b - a for a, b in zip(pings, pings[1:])) < 1.0   # at least every WATCHDOG_USEC/2
    wait_for(lambda: len(notify.seen("STATUS=")) >= 2, timeout=20, what="a periodic STATUS=")
    assert "last commit" in notify.seen("STATUS=")[-1][1]
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(30) == 0
    assert notify.seen("STOPPING=1")


def test_notify_to_an_abstract_socket(daemon_factory, tmp):
    listener = NotifyListener(tmp, abstract=True)
    try:
        daemon_factory(env={"NOTIFY_SOCKET": listener.address}, start=False).start(wait=False)
        wait_for(lambda: listener.seen("READY=1"), what="READY=1 on an abstract socket")
    finally:
        listener.close()


def test_no_watchdog_pings_unless_systemd_asks(daemon_factory, notify):
    daemon = daemon_factory(env={"NOTIFY_SOCKET": notify.address})
    wait_for(lambda: notify.seen("READY=1"), what="READY=1")
    time.sleep(1.5)
    assert not notify.seen("WATCHDOG=1")
    assert daemon.stop() == 0


class HangVFS(WatchedVFS):
    """Writes of the database or WAL block while `hang` is set, until `release`."""

    def __init__(self) -> None:
        super().__init__("tedstore-hang")
        self.hang = threading.Event()
        self.release = threading.Event()
        self.stuck = threading.Event()

    def on_write(self) -> None:
        if self.hang.is_set():
            self.stuck.set()
            self.release.wait(60)


@pytest.mark.slow
def test_a_stuck_writer_lets_the_watchdog_fire(inprocess, notify, monkeypatch):
    vfs = HangVFS()
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", notify.address)
        monkeypatch.setenv("WATCHDOG_USEC", "1000000")
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        daemon = inprocess(vfs="tedstore-hang")
        wait_for(lambda: len(notify.seen("WATCHDOG=1")) >= 2, what="pings from a healthy writer")
        vfs.hang.set()
        conn = Conn(daemon.socket)
        conn.send(prediction("stuck", 1, 2))
        assert vfs.stuck.wait(10)                            # the writer is inside a write
        time.sleep(1.0)                                      # pings already in flight land
        silent_from = len(notify.seen("WATCHDOG=1"))
        time.sleep(2.5)                                      # systemd would fire after 1 s
        assert len(notify.seen("WATCHDOG=1")) == silent_from
        status = tedstore.request(daemon.socket, "status")["status"]
        assert status["repository"]["records_saved"] == 0    # and nothing was acknowledged
        vfs.hang.clear()
        vfs.release.set()
        assert conn.wait_ack(1) == []
        wait_for(lambda: len(notify.seen("WATCHDOG=1")) > silent_from, what="pings again")
    finally:
        vfs.hang.clear()
        vfs.release.set()


@needs_systemd_tools
def test_socket_activation_with_systemd_socket_activate(tmp):
    path = tmp / "activated.sock"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TEDSTORE_", "LISTEN_"))}
    log = open(tmp / "daemon.log", "wb")
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", str(path), "--fdname=ingest",
         "-E", f"TEDSTORE_DB={tmp / 'tedstore.db'}",
         "-E", f"TEDSTORE_SOCKET={tmp / 'ignored.sock'}",
         "-E", f"PYTHONPATH={ROOT}",
         sys.executable, "-m", "tedstore", "serve"], env=env, cwd=tmp, stderr=log)
    try:
        wait_for(path.exists, what="systemd-socket-activate to listen")
        conn = Conn(str(path), timeout=30)                   # starts the daemon on connect
        conn.send({"op": "ping"}, prediction("sa", 1, 2))
        assert conn.read_until("pong") == {"pong": True}
        assert conn.wait_ack(2) == []
        assert query(str(tmp / "tedstore.db"), "SELECT count(*) FROM predictions") == [(1,)]
        assert not (tmp / "ignored.sock").exists()          # it served the inherited socket
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert path.exists()                                # and left systemd's socket alone
        assert "serving the socket systemd passed" in (tmp / "daemon.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()


# -- the units ----------------------------------------------------------------------------------

def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(UNITS / name)
    return parser


@needs_systemd_tools
def test_systemd_analyze_verify_reports_only_the_missing_executable():
    result = subprocess.run(["systemd-analyze", "verify", "tedstore.service", "tedstore.socket"],
                            cwd=UNITS, capture_output=True, text=True, timeout=60)
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    executable = unit("tedstore.service")["Service"]["ExecStart"].split()[0]
    assert all(f"{executable} is not executable" in line for line in complaints), complaints


@needs_systemd_tools
def test_systemd_analyze_security_rates_the_service_safe():
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", "tedstore.service"],
                            cwd=UNITS, capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for tedstore\.service: ([0-9.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0


def test_the_units_say_what_the_daemon_needs():
    service, sock = unit("tedstore.service")["Service"], unit("tedstore.socket")["Socket"]
    assert service["Type"] == "notify" and "WatchdogSec" in service
    assert int(service["TimeoutStopSec"]) > tedstore.STOP_GRACE_SECONDS + 10
    assert service["StateDirectory"] == service["RuntimeDirectory"] == "tedstore"
    assert service["StateDirectoryMode"] == "0700" and service["UMask"] == "0077"  # private
    assert sock["ListenStream"] == "/run/tedstore/tedstore.sock"      # $RUNTIME_DIRECTORY/...
    assert sock["SocketMode"] == "0660" and sock["SocketGroup"] == service["Group"]
    assert service["RestrictAddressFamilies"] == "AF_UNIX"
    sysusers = (UNITS / "tedstore.sysusers.conf").read_text()
    assert re.search(rf"^u {service['User']} ", sysusers, re.M)


def test_the_readmes_install_commands_name_files_that_exist():
    """The deployment and Litestream blocks need root and systemd as PID 1, so they are
    checked rather than run: every file they install is in the checkout, and every unit in
    systemd/ is installed by one of them."""
    commands = commands_of(readme_block("deploy")) + commands_of(readme_block("litestream-install"))
    named = {word for command in commands for word in command.split()
             if word.startswith("systemd/")}
    assert named == {f"systemd/{path.name}" for path in UNITS.iterdir()}
    for command in (part.strip() for line in commands for part in line.split("&&")):
        if command.startswith("install ") and "systemd/" in command:
            assert command.split()[-1].startswith("/etc/"), command


def test_the_readme_deployment_section_matches_the_units():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Deployment with systemd"):]
    section = section[:section.index("\n## ", 5)]
    service, sock = unit("tedstore.service")["Service"], unit("tedstore.socket")["Socket"]
    for fact in (service["ExecStart"].split()[0].rsplit("/", 2)[0],     # the install prefix
                 sock["ListenStream"], f"/var/lib/{service['StateDirectory']}",
                 service["Group"], "tedstore.sysusers.conf", "journalctl -u tedstore",
                 "systemctl enable --now tedstore.socket"):
        assert fact in section, fact


@needs_systemd_tools
def test_the_litestream_unit_and_drop_in_verify_and_rate_safe(tmp):
    """Laid out as installed: litestream.service beside tedstore.service, and the drop-in
    in tedstore.service.d/, which systemd-analyze reads from there."""
    for name in ("tedstore.service", "tedstore.socket", "litestream.service"):
        shutil.copy(UNITS / name, tmp)
    (tmp / "tedstore.service.d").mkdir()
    shutil.copy(UNITS / "tedstore-litestream.conf", tmp / "tedstore.service.d" / "litestream.conf")
    result = subprocess.run(["systemd-analyze", "verify", "litestream.service",
                             "tedstore.service", "tedstore.socket"],
                            cwd=tmp, capture_output=True, text=True, timeout=60)
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert complaints and all("/opt/tedstore/bin/" in line and "is not executable" in line
                              for line in complaints), complaints
    result = subprocess.run(["systemd-analyze", "security", "--offline=true",
                             "litestream.service"],
                            cwd=tmp, capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for litestream\.service: ([0-9.]+)", result.stdout)
    assert match and float(match.group(1)) <= 2.0, result.stdout + result.stderr


def test_litestream_starts_before_tedstore_as_its_user_and_owns_the_checkpoints():
    drop_in, litestream = unit("tedstore-litestream.conf"), unit("litestream.service")
    service = unit("tedstore.service")["Service"]
    assert drop_in["Unit"]["After"] == drop_in["Unit"]["Wants"] == "litestream.service"
    assert "Requires" not in drop_in["Unit"] and "BindsTo" not in drop_in["Unit"]
    assert drop_in["Service"]["Environment"] == f"{tedstore.SETTING_ENV['checkpoint']}=off"
    replicator = litestream["Service"]
    assert (replicator["User"], replicator["Group"], replicator["StateDirectory"]) == \
        (service["User"], service["Group"], service["StateDirectory"])
    assert replicator["StateDirectoryMode"] == "0700" and replicator["UMask"] == "0077"
    assert "After" not in litestream["Unit"] or "tedstore" not in litestream["Unit"]["After"]
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Replication with Litestream"):]
    section = section[:section.index("\n## ", 5)]
    # ProtectSystem=strict: the file replica the README names must be a writable path.
    file_replica = re.search(r"type: file \+ path: (\S+)", section).group(1)
    assert replicator["ProtectSystem"] == "strict"
    writable = [path.lstrip("-") for path in replicator["ReadWritePaths"].split()]
    assert any(file_replica == path or file_replica.startswith(path + "/") for path in writable)
    assert f"`{file_replica}` (`ReadWritePaths=`)" in section
    for fact in ("systemd/litestream.service", "tedstore-litestream.conf",
                 "/etc/systemd/system/tedstore.service.d/", "/etc/litestream.yml",
                 replicator["ExecStart"].split()[0], "TEDSTORE_CHECKPOINT=off",
                 ".tedstore.db-litestream", "litestream restore", "tedstore restore",
                 "_litestream_seq"):
        assert fact in section, fact


# -- peer credentials --------------------------------------------------------------------------

def test_allowed_uid_is_served(daemon_factory):
    daemon = daemon_factory(env={"TEDSTORE_ALLOW_UIDS": f"12345,{os.getuid()}"})
    conn = daemon.connect()
    conn.send(prediction("ok", 1, 2))
    assert conn.wait_ack(1) == []


def test_a_uid_not_allowed_is_refused_logged_and_recorded(daemon_factory):
    daemon = daemon_factory(env={"TEDSTORE_ALLOW_UIDS": "12345"})
    conn = daemon.connect()
    reply = conn.read_reply()
    assert reply["rejected"] == 0 and reply["code"] == "forbidden"
    assert f"uid {os.getuid()}" in reply["error"] and "TEDSTORE_ALLOW_UIDS" in reply["error"]
    with pytest.raises((ConnectionError, OSError)):
        conn.send(prediction("no", 1, 2))
        conn.read_reply()
    wait_for(lambda: daemon.query("SELECT code, peer_uid, peer_pid FROM rejects"),
             what="the rejects row")
    assert daemon.query("SELECT code, peer_uid, peer_pid FROM rejects") == \
        [("forbidden", os.getuid(), os.getpid())]
    assert "refused a connection" in daemon.log()
    assert daemon.query("SELECT count(*) FROM predictions") == [(0,)]


SYSTEM_PYTHON = "/usr/bin/python3"     # a Python any user may run, for a probe as uid 65534


@pytest.mark.skipif(os.geteuid() != 0 or not os.access(SYSTEM_PYTHON, os.X_OK),
                    reason="needs root and /usr/bin/python3 to connect as another uid")
def test_a_real_other_user_is_refused_while_root_is_served(daemon_factory, tmp):
    os.chmod(tmp, 0o755)
    daemon = daemon_factory(env={"TEDSTORE_ALLOW_UIDS": "0", "TEDSTORE_SOCKET_MODE": "0666"})
    # A refused peer is told at once, unasked, and hung up on: read, do not write.
    probe = ("import socket, sys; s = socket.socket(socket.AF_UNIX); s.settimeout(10);"
             "s.connect(sys.argv[1]); print(s.makefile().readline(), end='')")
    other = subprocess.run([SYSTEM_PYTHON, "-c", probe, daemon.socket], user=65534, cwd="/",
                           capture_output=True, text=True, timeout=30)
    assert json.loads(other.stdout)["code"] == "forbidden", other.stderr
    assert "uid 65534" in json.loads(other.stdout)["error"]
    assert tedstore.request(daemon.socket, "ping") == {"pong": True}
