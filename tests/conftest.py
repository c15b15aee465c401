"""Fixtures: a temporary folder, the daemon as a real subprocess or in-process, raw connections."""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import apsw
import msgspec
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import tedstore  # noqa: E402

README = ROOT / "README.md"
_README_BLOCK = re.compile(r"<!-- readme: ([\w-]+)[^>]*-->\n```\w*\n(.*?)```", re.S)


def readme_blocks() -> dict[str, str]:
    """The README's code blocks by their tag (<!-- readme: TAG --> above each)."""
    return dict(_README_BLOCK.findall(README.read_text()))


def readme_block(tag: str) -> str:
    """A README code block as a user would copy it; tests/test_readme.py checks that
    every block is run (or checked) by a test that asks for it here."""
    return readme_blocks()[tag]


def commands_of(block: str) -> list[str]:
    """A shell block's commands: comment lines left out, continued lines joined."""
    joined = block.replace("\\\n", " ")
    return [line for line in joined.splitlines() if line.strip() and not line.startswith("#")]


BIN = os.path.dirname(sys.executable)           # where pip put tedstore (and litestream)


def localized(text: str, folder: Path, **extra: str) -> str:
    """A deployment's paths as a test folder's, without sudo or the tedstore user."""
    for deployed, local in {"/var/lib/tedstore/": f"{folder}/", "/var/lib/tedstore ": f"{folder} ",
                            "/srv/backups": f"{folder}/srv",
                            "/var/lib/node_exporter/": f"{folder}/node_exporter/",
                            "/opt/tedstore/bin/": f"{BIN}/", "-o tedstore -g tedstore ": "",
                            "sudo -u tedstore ": "", "sudo ": "", **extra}.items():
        text = text.replace(deployed, local)
    return text


def shell(line: str, folder: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """One README command in bash, in `folder`, with tedstore on the PATH and its defaults."""
    env = clean_env({"PATH": f"{BIN}:{os.environ['PATH']}"})
    return subprocess.run(["bash", "-c", line], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def tmp():
    """A short folder: Unix socket paths must stay under 108 bytes."""
    folder = Path(tempfile.mkdtemp(prefix="ts-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def wait_for(predicate, timeout: float = 15.0, interval: float = 0.02, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def idle_for(socket_path: str) -> float:
    """Seconds since the daemon's last commit, as it reports them."""
    status = tedstore.request(socket_path, "status")["status"]
    return time.time() - tedstore.parse_when(status["repository"]["last_save"], 0)


def clean_env(extra: dict | None = None) -> dict:
    """The environment without tedstore's settings or systemd's variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TEDSTORE_", "PERSISTENCE_", "NOTIFY_", "WATCHDOG_"))}
    env.update(extra or {})
    return env


def run_cli(*args, env: dict | None = None, input: bytes | str | None = None, cwd=None,
            text: bool = True) -> subprocess.CompletedProcess:
    """`tedstore ARGS` as a subprocess, in a clean environment plus `env`."""
    return subprocess.run([sys.executable, "-m", "tedstore", *args], input=input, cwd=cwd,
                          capture_output=True, text=text, env=clean_env(env), timeout=120)


class DaemonProcess:
    """`tedstore serve` as a subprocess, with its log in a file."""

    def __init__(self, folder: Path, env: dict | None = None, args: tuple = ()):
        self.folder = folder
        self.db = str(folder / "tedstore.db")
        self.socket = str(folder / "tedstore.sock")
        self.log_path = folder / "daemon.log"
        self.env = {"TEDSTORE_DB": self.db, "TEDSTORE_SOCKET": self.socket, **(env or {})}
        self.args = args
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> "DaemonProcess":
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tedstore", "serve", *self.args], cwd=self.folder,
            env=clean_env(self.env),
            stdout=subprocess.DEVNULL, stderr=open(self.log_path, "ab"))
        if wait:
            wait_for(lambda: self.proc.poll() is not None or tedstore.socket_answers(self.socket),
                     what="the daemon to listen")
            assert self.proc.poll() is None, self.log()
        return self

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def stop(self, timeout: float = 30) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def connect(self) -> "Conn":
        return Conn(self.socket)

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        return query(self.db, sql, params)


def query(db: str, sql: str, params: tuple = ()) -> list[tuple]:
    conn = apsw.Connection(db, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


@pytest.fixture
def daemon_factory(tmp):
    started: list[DaemonProcess] = []

    def make(env: dict | None = None, args: tuple = (), start: bool = True, folder: Path = None):
        daemon = DaemonProcess(folder or tmp, env, args)
        started.append(daemon)
        return daemon.start() if start else daemon

    yield make
    for daemon in started:
        if daemon.proc is not None and daemon.proc.poll() is None:
            daemon.kill()
    for daemon in started:      # whatever a test checked, the daemon itself must not have failed
        assert "Traceback" not in daemon.log(), daemon.log()


@pytest.fixture
def daemon(daemon_factory) -> DaemonProcess:
    return daemon_factory()


class Conn:
    """A raw NDJSON connection that reads replies as the tests need them."""

    def __init__(self, path: str, timeout: float = 15.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buffer = b""
        self.replies: list[dict] = []
        self.acked = 0            # the highest ack received
        self._reported = 0        # replies already looked at by wait_ack

    def send(self, *lines) -> None:
        data = b"".join((line if isinstance(line, bytes) else
                         (json.dumps(line) if isinstance(line, dict) else line).encode()) + b"\n"
                        for line in lines)
        self.sock.sendall(data)

    def read_reply(self) -> dict:
        while b"\n" not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by tedstore")
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        reply = json.loads(line)
        self.replies.append(reply)
        self.acked = max(self.acked, reply.get("ack", 0))
        return reply

    def poll(self, wait: float = 0.0) -> list[dict]:
        """The replies that arrive within `wait` seconds, without blocking any longer."""
        if select.select([self.sock], [], [], wait)[0]:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by tedstore")
            self.buffer += data
        replies = []
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            replies.append(json.loads(line))
            self.acked = max(self.acked, replies[-1].get("ack", 0))
        self.replies.extend(replies)
        return replies

    def read_until(self, key: str) -> dict:
        """The next reply carrying `key`; acks may come in between."""
        while True:
            reply = self.read_reply()
            if key in reply:
                return reply

    def wait_ack(self, n: int) -> list[dict]:
        """Read replies until an ack >= n; return the rejections since the last wait_ack."""
        while self.acked < n:
            self.read_reply()
        rejected = [r for r in self.replies[self._reported:] if "rejected" in r]
        self._reported = len(self.replies)
        return rejected

    def close(self) -> None:
        self.sock.close()


class InProcessDaemon:
    """The Daemon object in a thread: for faults only a test VFS or a hook can cause."""

    def __init__(self, folder: Path, vfs: str | None = None, **settings):
        self.settings = tedstore.load_settings(db=str(folder / "tedstore.db"),
                                               socket=str(folder / "tedstore.sock"), **settings)
        self.daemon = tedstore.Daemon(self.settings, vfs=vfs)
        self.code = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.code = self.daemon.run()

    def start(self) -> "InProcessDaemon":
        self.thread.start()
        wait_for(lambda: self.daemon.ready.is_set() or not self.thread.is_alive(),
                 what="the in-process daemon")
        assert self.daemon.ready.is_set(), "the in-process daemon did not start"
        return self

    def stop(self) -> int:
        self.daemon.request_stop()
        self.thread.join(60)
        assert not self.thread.is_alive()
        return self.code

    @property
    def socket(self) -> str:
        return self.settings.socket

    @property
    def db(self) -> str:
        return self.settings.db


@pytest.fixture
def inprocess(tmp):
    running: list[InProcessDaemon] = []

    def make(vfs: str | None = None, **settings) -> InProcessDaemon:
        daemon = InProcessDaemon(tmp, vfs, **settings).start()
        running.append(daemon)
        return daemon

    yield make
    for daemon in running:
        if daemon.thread.is_alive():
            daemon.stop()


def prediction(game: str, at: int, end: int, **extra) -> dict:
    return {"event": "prediction", "game_id": game, "predicted_at_tick": at,
            "predicted_end_tick": end, "confidence": 0.5, **extra}


def side_bet(game: str, at: int, recommendation: str = "BET", **extra) -> dict:
    return {"event": "sideBet", "game_id": game, "placed_at_tick": at, "probability": 0.2,
            "expected_value": 0.2, "confidence": 0.6, "recommendation": recommendation, **extra}


# Retention long enough for the fixed instants (2025) that the lifecycle tests pin down;
# the timestamp bounds themselves are tested with the real defaults.
LONG_RETENTION = {f"{table}_retention_days": 36500
                  for table in ("tick", "prediction", "sidebet", "game", "metrics")}


class Store:
    """A real database file fed through the same batches the writer commits."""

    def __init__(self, path: Path, **overrides):
        self.path = str(path)
        self.settings = tedstore.load_settings(db=self.path, **overrides)
        self.conn = tedstore.open_store(self.path)

    def send(self, *events, batch_size: int | None = None,
             settings: tedstore.Settings | None = None) -> list[tuple[int, str, str]]:
        lines = [msgspec.json.encode(e) + b"\n" if not isinstance(e, bytes) else e + b"\n"
                 for e in events]
        size = batch_size or len(lines) or 1
        settings = msgspec.structs.replace(settings or self.settings, batch_size=size)
        return tedstore.ingest_offline(self.conn, lines, settings).rejections

    def rows(self, sql: str, params: tuple = ()) -> list[tuple]:
        return self.conn.execute(sql, params).fetchall()

    def one(self, sql: str, params: tuple = ()) -> dict:
        return tedstore.rows_as_dicts(self.conn.execute(sql, params))[0]


@pytest.fixture
def store(tmp):
    store = Store(tmp / "t.db", **LONG_RETENTION)
    yield store
    store.conn.close()


class WatchedVFS(apsw.VFS):
    """The default VFS, calling on_write/on_sync before each write or sync of a database
    or WAL file: the hook may raise an I/O error, or block, as a test needs."""

    def __init__(self, name: str) -> None:
        super().__init__(name, "")

    def xOpen(self, name, flags):
        return WatchedFile(self, name, flags)

    def on_write(self) -> None:
        pass

    def on_sync(self) -> None:
        pass


class WatchedFile(apsw.VFSFile):
    def __init__(self, vfs: WatchedVFS, name, flags):
        self.watcher = vfs
        self.watched = bool(flags[0] & (apsw.SQLITE_OPEN_MAIN_DB | apsw.SQLITE_OPEN_WAL))
        super().__init__("", name, flags)

    def xWrite(self, data, offset):
        if self.watched:
            self.watcher.on_write()
        return super().xWrite(data, offset)

    def xSync(self, flags):
        if self.watched:
            self.watcher.on_sync()
        return super().xSync(flags)
