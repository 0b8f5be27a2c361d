"""`rumi dev PACK --reload`: the Pack's own cached environment, and an edit served on the next call.

What an author does, with real parts: a Pack whose requirements.txt names a package Rumi's environment
does not have, run by the real `rumi dev` as a process against a real nats-server, called with the real
`rumi call`. pip is pointed at a local directory (PIP_NO_INDEX, PIP_FIND_LINKS: pip's own variables,
which `rumi dev` passes on) holding a wheel made here and a source distribution whose setup.py would
leave a mark if anything ran it, so no network is needed.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

from broker.admin.dev import DEV_ENVS, SDK_DIR, prepare_local_pack
from broker.core.workspace import Workspace
from tests._cli import RUMI
from tests.conftest import say

REPO = Path(__file__).resolve().parents[1]

PROBE = "rumidevprobe"  # the Pack's requirement: in no index, only in the test's wheel directory

MAIN = '''
import os
import sys

import {probe}
from pack_runtime import Context, Pack

pack = Pack()


@pack.tool("value")
async def value(ctx: Context, args: dict):
    """Which version of this file answers, from which process and environment."""
    return {{"v": {v}, "probe": {probe}.VALUE, "pid": os.getpid(), "prefix": sys.prefix}}


if __name__ == "__main__":
    pack.run()
'''


def main_py(v: int) -> str:
    return MAIN.format(probe=PROBE, v=v)


def make_wheel(where: Path, name: str, version: str, files: dict[str, str]) -> Path:
    """A pure-Python wheel with a valid RECORD."""
    info = f"{name}-{version}.dist-info"
    contents = {
        **files,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: rumi-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in contents.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    contents[f"{info}/RECORD"] = "\n".join([*record, f"{info}/RECORD,,"]) + "\n"
    wheel = where / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in contents.items():
            zf.writestr(path, text)
    return wheel


def make_sdist(where: Path, name: str, version: str, mark: Path) -> Path:
    """A source distribution only: its setup.py writes `mark` if anything runs it."""
    base = f"{name}-{version}"
    files = {
        f"{base}/PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{base}/setup.py": (
            f"open({str(mark)!r}, 'w').write('setup.py ran')\n"
            f"from setuptools import setup\nsetup(name={name!r}, version={version!r})\n"
        ),
    }
    sdist = where / f"{base}.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for path, text in files.items():
            data = text.encode()
            member = tarfile.TarInfo(path)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return sdist


@pytest.fixture
def wheelhouse(tmp_path: Path) -> Path:
    where = tmp_path / "wheelhouse"
    where.mkdir()
    make_wheel(where, PROBE, "1.0", {f"{PROBE}/__init__.py": 'VALUE = "probe-1.0"\n'})
    make_sdist(where, "rumisdistonly", "1.0", tmp_path / "setup-py-ran")
    return where


def pip_env(wheelhouse: Path) -> dict[str, str]:
    """The test's environment for `rumi dev`: pip reads the local directory only, no user config."""
    return {
        **os.environ,
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(wheelhouse),
        "PIP_CONFIG_FILE": os.devnull,
    }


def add_pack(ws: Workspace, pack_id: str, main: str, requirements: str) -> Path:
    src = ws.ecosystem / pack_id
    src.mkdir()
    (src / "pack.json").write_text(json.dumps({"id": pack_id, "version": "0.1.0"}))
    (src / "main.py").write_text(main)
    (src / "requirements.txt").write_text(requirements)
    return src


@pytest.fixture
def probe_ws(ws: Workspace) -> Workspace:
    """The workspace with a Pack `probe` (made before the nats-server starts, so it knows the Pack)."""
    add_pack(ws, "probe", main_py(1), f"{PROBE}==1.0\n")
    return ws


class Dev:
    """A `rumi dev` process, its merged output collected line by line."""

    def __init__(self, ws: Workspace, env: dict[str, str], *args: str) -> None:
        self.proc = subprocess.Popen(
            [*RUMI, "dev", *args, "--root", str(ws.root)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in iter(self.proc.stdout.readline, b""):
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 90, since: int = 0) -> str:
        """The first line from `since` on matching `pattern` (a regex)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines[since:]:
                if re.search(pattern, line):
                    return line
            assert self.proc.poll() is None or self._reader.is_alive(), self.text[-3000:]
            time.sleep(0.1)
        raise AssertionError(f"{pattern!r} not seen (exit {self.proc.poll()}):\n{self.text[-3000:]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        return self.proc.returncode


def call(ws: Workspace) -> tuple[int, dict[str, Any] | str]:
    done = subprocess.run(
        [*RUMI, "call", "probe:tool:value", "--root", str(ws.root), "--timeout", "10"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        return done.returncode, done.stderr
    return 0, json.loads(done.stdout)


def call_until(ws: Workspace, v: int, timeout: float = 40) -> dict[str, Any]:
    """Call until version `v` answers (bounded): the reload is asynchronous to the edit."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        code, answer = call(ws)
        if code == 0 and isinstance(answer, dict) and answer["v"] == v:
            return answer
        last = answer
        time.sleep(0.3)
    raise AssertionError(f"version {v} never answered; last answer: {last}")


def gone(pid: int, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return True
        time.sleep(0.1)
    return False


def test_reload_serves_the_packs_own_requirements_and_each_edit(
    probe_ws: Workspace, nats_server: object, wheelhouse: Path, pytestconfig: pytest.Config
) -> None:
    ws = probe_ws
    env_root = ws.state / DEV_ENVS
    with pytest.raises(ModuleNotFoundError):
        __import__(PROBE)  # Rumi's own environment does not have the Pack's requirement
    dev = Dev(ws, pip_env(wheelhouse), "probe", "--reload")
    pids: list[int] = []
    try:
        dev.wait_for(r"pack probe serving")
        assert "rumi dev: installing 1 requirement for probe (wheels only)…" in dev.lines, dev.text
        first = call_until(ws, 1)
        # The Pack's own environment, with its requirement installed: not Rumi's interpreter.
        (env_dir,) = [p for p in env_root.iterdir() if p.is_dir()]
        assert first["probe"] == "probe-1.0"
        assert Path(first["prefix"]) == env_dir and re.fullmatch(r"probe-[0-9a-f]{16}", env_dir.name)
        assert (env_dir / SDK_DIR / "pack_runtime").is_symlink()
        pids.append(first["pid"])

        # An edit: the next call after the reload runs the new code, in a new process.
        mark = len(dev.lines)
        edited = time.monotonic()
        (ws.pack_source("probe") / "main.py").write_text(main_py(2))
        second = call_until(ws, 2)
        say(
            pytestconfig,
            f"\nrumi dev --reload: the edit served {time.monotonic() - edited:.1f} s after saving",
        )
        assert second["pid"] != first["pid"] and second["probe"] == "probe-1.0"
        dev.wait_for(r"rumi dev: reloaded \(pid \d+\)", since=mark)
        assert gone(first["pid"]), "the old version still runs after the reload"
        pids.append(second["pid"])

        # A syntax error: one line naming file and line; the running version keeps serving.
        broken = main_py(2) + "\ndef broken(:\n    pass\n"
        line = broken.splitlines().index("def broken(:") + 1
        mark = len(dev.lines)
        (ws.pack_source("probe") / "main.py").write_text(broken)
        error = dev.wait_for(r"SyntaxError", since=mark)
        assert re.search(rf"rumi dev: main\.py:{line}: SyntaxError: ", error), error
        assert "the running version keeps serving" in error
        for _ in range(3):
            code, answer = call(ws)
            assert code == 0 and isinstance(answer, dict), answer
            assert answer["v"] == 2 and answer["pid"] == second["pid"]
        assert not any("Traceback" in ln for ln in dev.lines[mark:]), dev.text

        # Fixed: served again.
        (ws.pack_source("probe") / "main.py").write_text(main_py(3))
        third = call_until(ws, 3)
        assert third["pid"] not in (first["pid"], second["pid"])
        assert gone(second["pid"])
        pids.append(third["pid"])
    finally:
        code = dev.stop()
    assert code == 0, dev.text
    assert all(gone(pid, 5) for pid in pids), "a Pack process outlived `rumi dev`"

    # Unchanged requirements: the cached environment is reused (nothing installed), without --reload too.
    again = Dev(ws, pip_env(wheelhouse), "probe")
    try:
        again.wait_for(r"pack probe serving")
        assert any(ln.startswith("rumi dev: using the cached environment of probe") for ln in again.lines)
        assert not any("installing" in ln for ln in again.lines), again.text
        answer = call_until(ws, 3)
        assert Path(answer["prefix"]) == env_dir and answer["probe"] == "probe-1.0"
    finally:
        assert again.stop() == 0, again.text
    assert [p.name for p in env_root.iterdir() if p.is_dir()] == [env_dir.name]


def test_a_requirement_with_no_wheel_fails_with_one_line_naming_it(
    ws: Workspace, wheelhouse: Path, tmp_path: Path
) -> None:
    add_pack(ws, "sdistpack", main_py(1), "rumisdistonly==1.0\n")
    done = subprocess.run(
        [*RUMI, "dev", "sdistpack", "--root", str(ws.root)],
        cwd=REPO,
        env=pip_env(wheelhouse),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 4, done.stderr
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith("error: Pack sdistpack: no wheel of rumisdistonly==1.0 "), errors
    assert "wheels only" in errors[0] and "pick a version that ships a wheel" in errors[0]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "setup-py-ran").exists(), "the source distribution's setup.py ran"
    # Nothing half-made is left to be mistaken for a cached environment.
    envs = ws.state / DEV_ENVS
    assert not envs.exists() or not [p for p in envs.iterdir() if p.is_dir()]


def test_no_env_keeps_rumis_interpreter_and_the_own_env_leaves_the_callers_path_out(
    ws: Workspace, nats_server: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", "/somewhere/of/the/caller")
    plain = prepare_local_pack(ws, "other", own_env=False, progress=lambda _line: None)
    assert plain.argv == [sys.executable, "main.py"] and plain.env_dir is None
    assert plain.env["PYTHONPATH"] == "/somewhere/of/the/caller"

    said: list[str] = []
    own = prepare_local_pack(ws, "other", progress=said.append)
    assert own.env_dir is not None and own.env_dir.parent == ws.state / DEV_ENVS
    assert own.argv == [str(own.env_dir / "bin" / "python"), "main.py"]
    assert own.env["PYTHONPATH"] == str(own.env_dir / SDK_DIR)
    assert own.env["VIRTUAL_ENV"] == str(own.env_dir)
    assert own.env["PATH"].split(os.pathsep)[0] == str(own.env_dir / "bin")
    # No requirements.txt: an environment all the same, with nothing installed (and so no pip run).
    assert not any("installing" in line for line in said), said
    probe = subprocess.run(
        [*own.argv[:1], "-c", "import pack_runtime, nats, nkeys, msgspec, anyio, sys; print(sys.prefix)"],
        env=own.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    assert Path(probe.stdout.strip()) == own.env_dir
