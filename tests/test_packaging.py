"""Packaging and the command line as a newcomer meets them."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import tedstore
from conftest import readme_block, wait_for

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_readmes_quick_start_installs_and_serves_with_its_schema(tmp):
    """The README's first command, as is, in a fresh copy of the checkout: `pip install .`
    (not editable) into a new venv, and `tedstore serve` finds schema.sql and serves."""
    source = tmp / "source"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    for name in tracked:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TEDSTORE_", "PYTHON"))}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep)
                                  if not p.startswith(sys.prefix))   # not the tests' venv
    quick_start = subprocess.Popen(["bash", "-c", readme_block("quick-start")], cwd=source,
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    sock = str(source / "tedstore.sock")
    try:
        wait_for(lambda: quick_start.poll() is not None or tedstore.socket_answers(sock),
                 timeout=600, what="the quick start to install and serve")
        assert quick_start.poll() is None, quick_start.stdout.read().decode()[-3000:]
        assert tedstore.request(sock, "ping") == {"pong": True}
        pid, _ = tedstore.serving(str(source / "tedstore.db"))
        os.kill(int(pid), signal.SIGTERM)
        assert quick_start.wait(30) == 0
    finally:
        if quick_start.poll() is None:
            quick_start.kill()
    venv = source / ".venv"
    located = subprocess.run([str(venv / "bin" / "python"), "-c",
                              "import tedstore; print(tedstore.__file__); print(tedstore.schema_path())"],
                             cwd=tmp, capture_output=True, text=True, check=True).stdout.split()
    assert located[0].startswith(str(venv)) and located[1].startswith(str(venv))
    assert (venv / "share" / "tedstore" / "systemd" / "tedstore.service").exists()


def test_ci_runs_exactly_the_readmes_test_command():
    [test_command] = readme_block("tests").splitlines()
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def commands() -> list[str]:
    return sorted(tedstore.cli.commands)


@pytest.mark.parametrize("name", commands())
def test_every_command_has_help_and_an_example(name):
    for flag in ("--help", "-h"):
        result = CliRunner().invoke(tedstore.cli, [name, flag])
        assert result.exit_code == 0, result.output
    assert "Example" in result.output and tedstore.cli.commands[name].help


# One shape for every read command: (takes a time window, takes --model). Every read
# command takes --tracker; --hours/--days/--since/--until mean the same everywhere.
READ_COMMANDS = {"game": (False, True), "games": (True, True), "metrics": (True, True),
                 "performance": (True, True), "trends": (True, True), "patterns": (True, True),
                 "calibration": (True, True), "bankroll": (True, False),
                 "rejects": (True, False), "trackers": (True, False), "report": (True, True),
                 "export": (True, False)}
WINDOW = {"--hours", "--days", "--since", "--until"}


def options(name: str) -> set[str]:
    return {o for p in tedstore.cli.commands[name].params for o in p.opts if o.startswith("--")}


def test_every_read_command_has_the_same_window_and_filter_options():
    windowed = {name for name in tedstore.cli.commands if WINDOW <= options(name)}
    assert windowed == {name for name, (window, _) in READ_COMMANDS.items() if window}
    for name, (window, model) in READ_COMMANDS.items():
        given = options(name)
        assert (WINDOW <= given) == window and "--tracker" in given, name
        assert ("--model" in given) == model, name
    assert {name for name in tedstore.cli.commands if "--model" in options(name)} == \
        {name for name, (_, model) in READ_COMMANDS.items() if model}
    queried = {name for name in tedstore.QUERIES if name in tedstore.cli.commands}
    assert queried <= set(READ_COMMANDS)


@pytest.mark.parametrize("args, words", [
    (["rollup", "--db", "/nonexistent/t.db"], "does not exist"),
    (["retention", "--db", "/nonexistent/t.db"], "does not exist"),
    (["status", "--db", "/nonexistent/t.db", "--socket", "/nonexistent/s"], "not running"),
    (["rollup", "--db", "x.db", "--since", "someday"], "ISO-8601"),
    (["backup", "--db", "/nonexistent/t.db", "/tmp/x.db"], "does not exist"),
    (["send", "--socket", "/nonexistent/s", "/dev/null"], "cannot reach tedstore"),
])
def test_errors_are_one_line_without_a_traceback(tmp, args, words):
    result = CliRunner().invoke(tedstore.cli, args, catch_exceptions=False)
    assert result.exit_code == 1
    text = result.output.strip()
    assert words in text and "Traceback" not in text
    if args[0] != "status":
        assert len(text.splitlines()) == 1, text


def test_bad_configuration_is_one_line(monkeypatch):
    monkeypatch.setenv("PERSISTENCE_BATCH_SIZE", "many")
    result = CliRunner().invoke(tedstore.cli, ["init", "--check"], catch_exceptions=False)
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: invalid value 'many' for batch_size (environment variable "
        "PERSISTENCE_BATCH_SIZE): expected an integer from 1 to 100000"]


def test_version():
    result = CliRunner().invoke(tedstore.cli, ["--version"])
    assert result.output.strip() == f"tedstore, version {tedstore.__version__}"
