"""Packaging and the command line as a newcomer meets them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import tedstore
from conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_plain_pip_install_serves_with_its_schema(tmp):
    """`pip install .` (not editable) into a fresh venv: tedstore serve finds schema.sql."""
    source = tmp / "source"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    for name in tracked:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    install = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(source)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr
    elsewhere = tmp / "run"
    elsewhere.mkdir()
    located = subprocess.run([str(venv / "bin" / "python"), "-c",
                              "import tedstore; print(tedstore.__file__); print(tedstore.schema_path())"],
                             cwd=elsewhere, capture_output=True, text=True, check=True).stdout.split()
    assert located[0].startswith(str(venv)) and located[1].startswith(str(venv))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TEDSTORE_", "PYTHON"))}
    daemon = subprocess.Popen([str(venv / "bin" / "tedstore"), "serve"], cwd=elsewhere, env=env,
                              stderr=subprocess.PIPE)
    try:
        sock = str(elsewhere / "tedstore.sock")
        wait_for(lambda: daemon.poll() is not None or tedstore.socket_answers(sock),
                 what="the installed daemon")
        assert tedstore.request(sock, "ping") == {"pong": True}
        daemon.terminate()
        assert daemon.wait(30) == 0
        assert (elsewhere / "tedstore.db").exists()
    finally:
        if daemon.poll() is None:
            daemon.kill()
    assert (venv / "share" / "tedstore" / "systemd" / "tedstore.service").exists()


def test_ci_runs_exactly_the_readmes_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", readme, re.S)
    test_command = next(line for block in blocks for line in block.splitlines()
                        if "pytest" in line)
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def commands() -> list[str]:
    return sorted(tedstore.cli.commands)


@pytest.mark.parametrize("name", commands())
def test_every_command_has_help_and_an_example(name):
    for flag in ("--help", "-h"):
        result = CliRunner().invoke(tedstore.cli, [name, flag])
        assert result.exit_code == 0, result.output
    assert "Example" in result.output and tedstore.cli.commands[name].help


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
