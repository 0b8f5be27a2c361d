"""`rumi systemd-unit`: the unit parses, says what it should, and its ExecStart starts a broker.

The unit is read back with a small parser of systemd's syntax (sections, `Key=value`, quoted and
escaped arguments, `%%` and `$$`), and, where `systemd-analyze` is installed, checked by
`systemd-analyze verify` too. ExecStart runs as systemd would run it: its argv, its WorkingDirectory,
and only the unit's Environment (plus systemd's default PATH), against a real embedded nats-server.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from broker.admin import systemd
from broker.admin.init import init_workspace
from broker.bus.server import pid_file
from broker.core.net import free_port
from broker.core.workspace import Workspace
from tests._skip import skip_unless_ci


def _config(ws: Workspace, **changes: object) -> None:
    cfg = json.loads(ws.config_file.read_text())
    cfg.update(changes)
    ws.config_file.write_text(json.dumps(cfg))


def _words(value: str, *, variables: bool) -> list[str]:
    """Split a value as systemd does: double quotes, C escapes, `%%` -> `%`, (ExecStart) `$$` -> `$`."""
    words: list[str] = []
    i, n = 0, len(value)
    while i < n:
        while i < n and value[i] in " \t":
            i += 1
        if i >= n:
            break
        word, quoted = "", False
        while i < n and (quoted or value[i] not in " \t"):
            ch = value[i]
            if ch == '"':
                quoted = not quoted
            elif ch == "\\" and quoted:
                i += 1
                word += value[i]
            elif ch == "%":
                assert value[i + 1] == "%", f"a specifier in {value!r}"
                word += "%"
                i += 1
            elif ch == "$" and variables:
                assert value[i + 1] == "$", f"a variable in {value!r}"
                word += "$"
                i += 1
            else:
                word += ch
            i += 1
        assert not quoted, f"unterminated quote in {value!r}"
        words.append(word)
    return words


def _parse(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> values (a key may repeat); comments and blank lines skipped."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for line in text.splitlines():
        if not line.strip() or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep and key == key.strip() and key.isidentifier(), f"not a Key=value line: {line!r}"
        current.setdefault(key, []).append(value)
    return sections


def _environment(values: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for value in values:
        for word in _words(value, variables=False):
            name, _, val = word.partition("=")
            env[name] = val
    return env


@pytest.fixture
def plain_ws(tmp_path: Path) -> Workspace:
    ws = Workspace.at(tmp_path / "ws")
    init_workspace(ws)
    return ws


def test_unit_runs_rumi_broker_for_the_workspace(plain_ws: Workspace) -> None:
    unit = systemd.broker_unit(plain_ws, workers=3)
    parsed = _parse(unit.text)
    assert list(parsed) == ["Unit", "Service", "Install"]
    service = parsed["Service"]
    rumi = Path(sys.executable).parent / "rumi"
    argv = _words(service["ExecStart"][0], variables=True)
    assert argv == [str(rumi), "broker", "--root", str(plain_ws.root), "--workers", "3"] == unit.exec_start
    assert Path(argv[0]).is_absolute() and os.access(argv[0], os.X_OK)
    assert service["WorkingDirectory"] == [str(plain_ws.root)]
    assert service["Restart"] == ["on-failure"] and service["Type"] == ["simple"]
    # SIGTERM to the broker alone: it drains, writes the outcomes, then stops its nats-server itself.
    assert service["KillMode"] == ["mixed"] and service["KillSignal"] == ["SIGTERM"]
    env = _environment(service["Environment"])
    assert env["PATH"].split(":")[0] == str(rumi.parent)  # where pip put nats-server
    assert env["PYTHONUNBUFFERED"] == "1"
    for key, value in systemd.HARDENING:
        assert service[key] == [value], key
    # Options that would redirect or hide a granted host path are not there.
    for key in ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "User"):
        assert key not in service, key
    assert parsed["Install"] == {"WantedBy": ["multi-user.target"]}
    assert "docker.service" in parsed["Unit"]["After"][0]
    assert parsed["Unit"]["StartLimitIntervalSec"] == ["0"] and service["RestartSec"] == ["2"]


def test_workers_default_is_one_per_core(plain_ws: Workspace) -> None:
    unit = systemd.broker_unit(plain_ws)
    assert unit.exec_start[-2:] == ["--workers", str(max(1, os.cpu_count() or 1))]


def test_awkward_paths_are_quoted_and_escaped(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path / 'my "ws" 100% $HOME \\ x')
    init_workspace(ws)
    unit = systemd.broker_unit(ws, workers=1)
    service = _parse(unit.text)["Service"]
    assert _words(service["ExecStart"][0], variables=True)[3] == str(ws.root)
    assert service["WorkingDirectory"] == [str(ws.root).replace("%", "%%")]
    _verify(unit, tmp_path)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: systemd.broker_unit(Workspace.at(tmp / "none"), workers=1), "run `rumi init` first"),
        (lambda tmp: systemd.broker_unit(_init(tmp), workers=1, rumi=Path("rumi")), "absolute path"),
        (lambda tmp: systemd.broker_unit(_init(tmp), workers=1, rumi=tmp / "nope"), "not an executable"),
        (lambda tmp: systemd.broker_unit(_init(tmp), workers=0), "between 1 and 64"),
        (lambda tmp: systemd.broker_unit(_init(tmp / "a\nb"), workers=1), "control character"),
    ],
)
def test_refusals(tmp_path: Path, make: object, message: str) -> None:
    with pytest.raises(systemd.SystemdUnitError, match=message):
        make(tmp_path)  # type: ignore[operator]


def _init(root: Path) -> Workspace:
    ws = Workspace.at(root)
    init_workspace(ws)
    return ws


def _verify(unit: systemd.BrokerUnit, tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit with no warning (where systemd-analyze exists)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    units = tmp_path / "units"
    units.mkdir(exist_ok=True)
    path = systemd.write_unit(unit, units / "rumi-broker.service")
    done = subprocess.run(
        [analyze, "verify", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    complaints = [line for line in done.stderr.splitlines() if "rumi-broker.service" in line]
    assert not complaints, complaints


def test_systemd_analyze_verify_accepts_the_unit(plain_ws: Workspace, tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        skip_unless_ci("systemd-analyze is not installed (Debian: apt-get install -y systemd)")
    _verify(systemd.broker_unit(plain_ws, workers=2), tmp_path)


def test_exec_start_starts_a_broker_and_sigterm_stops_it(plain_ws: Workspace) -> None:
    _config(plain_ws, nats_port=free_port())
    unit = systemd.broker_unit(plain_ws)  # the default: one worker per core
    service = _parse(unit.text)["Service"]
    argv = _words(service["ExecStart"][0], variables=True)
    env = {"PATH": systemd.SYSTEMD_PATH, **_environment(service["Environment"])}
    log = plain_ws.root / "unit.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            argv,
            cwd=service["WorkingDirectory"][0],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 90
        while "rumi broker: serving" not in log.read_text(errors="replace"):
            assert proc.poll() is None, f"exited {proc.returncode}:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"not serving after 90 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        nats_pid = int(pid_file(plain_ws).read_text())
        os.kill(nats_pid, 0)  # its embedded nats-server (found on the unit's PATH) runs
        proc.send_signal(signal.SIGTERM)  # KillMode=mixed: the main process only
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
        assert not pid_file(plain_ws).exists()
        with pytest.raises(ProcessLookupError):
            os.kill(nats_pid, 0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_writes_prints_and_refuses(plain_ws: Workspace, tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from broker.cli import systemd as cli

    app = typer.Typer()
    cli.register(app)
    app.command("noop", hidden=True)(lambda: None)  # a group, so the command is named on the line
    runner = CliRunner()
    target = tmp_path / "rumi-broker.service"
    root = ["--root", str(plain_ws.root)]
    done = runner.invoke(app, ["systemd-unit", *root, "--workers", "2", "--output", str(target)])
    assert done.exit_code == 0, done.output
    assert f"wrote {target}" in done.output and "systemctl daemon-reload" in done.output
    assert target.stat().st_mode & 0o777 == 0o644
    assert _parse(target.read_text())["Service"]["ExecStart"][0].endswith("--workers 2")

    printed = runner.invoke(app, ["systemd-unit", *root, "--workers", "2"])
    assert printed.exit_code == 0 and printed.output == target.read_text()

    report = json.loads(runner.invoke(app, ["systemd-unit", *root, "--workers", "2", "--json"]).output)
    assert report["path"] is None and report["exec_start"][1:3] == ["broker", "--root"]

    for args, message in [
        (["--output", str(tmp_path / "unit.txt")], "ends in .service"),
        (["--output", str(tmp_path / "no" / "x.service")], "is not a directory"),
        (["--rumi", "rumi"], "absolute path"),
        (["--root", str(tmp_path / "empty")], "run `rumi init` first"),
    ]:
        bad = runner.invoke(app, ["systemd-unit", *root, *args])
        assert bad.exit_code == 2, (args, bad.output)
        assert bad.output.count("\n") == 1 and bad.output.startswith("error: ") and message in bad.output
