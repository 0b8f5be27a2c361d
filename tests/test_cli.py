"""The `rumi` CLI as a whole: --version, exit codes, --json, -v, completion, start-up cost, and `rumi ps`
seeing a foreground `rumi broker`.

Commands run as real processes (`main()`, the console script's entry point, with argv[0] = "rumi")
against a real nats-server and broker where they need one; nothing of the CLI is mocked.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.admin.init import init_workspace
from broker.core import errors
from broker.core.net import free_port
from broker.core.workspace import Workspace
from tests._cli import RUMI

REPO = Path(__file__).resolve().parents[1]
# What the `rumi` console script does: `from broker.cli import main; main()` with argv[0] = "rumi".


def rumi(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RUMI, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, **(env or {})},
    )


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    """stderr is exactly one `error: ...` line (no traceback)."""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


# ------------------------------------------------------------------------------ --version, completion


def test_version_prints_the_distribution_version() -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    done = rumi("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"rumi {version}"


def test_distribution_is_rumi_broker_and_command_is_rumi() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["name"] == "rumi-broker"
    assert project["scripts"] == {"rumi": "broker.cli:main"}
    # Ranges in pyproject.toml, exact pins in requirements.lock.
    assert all(">=" in dep and "==" not in dep for dep in project["dependencies"]), project["dependencies"]


def test_requirements_lock_pins_every_line_and_is_sorted() -> None:
    lines = [
        line for line in (REPO / "requirements.lock").read_text().splitlines() if line and line[0] != "#"
    ]
    assert all(line.count("==") == 1 for line in lines), [line for line in lines if "==" not in line]
    names = [line.split("==")[0].lower().replace("_", "-") for line in lines]
    assert names == sorted(names) and len(set(names)) == len(names)
    for needed in ("prometheus-client", "rich", "ocsf-lib", "dacite", "semver", "termcolor"):
        assert needed in names


def test_completion_script_and_completions() -> None:
    script = rumi(env={"_RUMI_COMPLETE": "source_bash"})
    assert script.returncode == 0, script.stderr
    assert "_rumi_completion()" in script.stdout and "complete " in script.stdout
    shown = rumi("--show-completion", "bash", env={"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"})
    assert shown.returncode == 0 and "_rumi_completion()" in shown.stdout
    words = rumi(env={"_RUMI_COMPLETE": "complete_bash", "COMP_WORDS": "rumi gra", "COMP_CWORD": "1"})
    assert words.stdout.split() == ["grant", "grants"]
    assert "--install-completion" in rumi("--help").stdout


# ------------------------------------------------------------------------------ exit codes


def test_error_classes_carry_the_documented_exit_codes() -> None:
    assert errors.RumiError("x").exit_code == 4
    assert errors.GrantError("x").exit_code == 2
    assert errors.NatsSetupError("x").exit_code == 3
    assert errors.EngineUnavailable("x").exit_code == 3
    assert errors.RuntimeSetupError("x").exit_code == 4
    assert errors.Missing("x").exit_code == 3
    assert errors.ChainBroken("x").exit_code == 1
    codes = {code: errors.request_error(code, "m") for code in errors.ERROR_CODES}
    assert {c: type(e) for c, e in codes.items()}["permission_denied"] is errors.Denied
    assert [codes[c].exit_code for c in errors.ERROR_CODES] == [1, 2, 2, 2, 4, 4, 4, 3]
    assert type(errors.request_error("tool:whatever", "m")) is errors.HandlerFailed
    assert errors.exit_code(ValueError()) == 4


@pytest.mark.parametrize(
    ("args", "rumi_error"),
    [
        (["grants", "--no-such-option"], False),  # typer's usage error
        (["no-such-command"], False),
        (["call", "not-a-component"], True),
        (["call", "default:tool:my_tool", "[1]"], True),
        (["call", "default:tool:my_tool", "{not json"], True),
        (["grant", "default:tool:my_tool", "no_such_handler"], True),
        (["logs"], True),
    ],
)
def test_usage_errors_exit_2(ws: Workspace, args: list[str], rumi_error: bool) -> None:
    done = rumi(*args, "--root", str(ws.root))
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    if rumi_error:
        one_line_error(done)


def test_no_workspace_is_a_usage_error(tmp_path: Path) -> None:
    done = rumi(
        "grant", "default:tool:my_tool", "env_read", "--key", "HOME", "--root", str(tmp_path / "none")
    )
    assert done.returncode == 2
    assert "rumi init" in one_line_error(done)


def test_no_nats_exits_3(ws: Workspace) -> None:
    # No broker ever ran: no embedded server's URL.
    done = rumi("call", "default:tool:my_tool", "--root", str(ws.root))
    assert done.returncode == 3
    assert "no NATS server" in one_line_error(done)
    # An embedded server's URL left behind, nothing answering: no Compose hint (none is configured).
    ws.state.mkdir(parents=True, exist_ok=True)
    (ws.state / "nats.url").write_text(f"nats://127.0.0.1:{free_port()}\n")
    done = rumi("call", "default:tool:my_tool", "--root", str(ws.root), "--timeout", "5")
    assert done.returncode == 3
    line = one_line_error(done)
    assert "cannot connect to NATS" in line and "docker-compose" not in line
    (ws.state / "nats.url").unlink()
    # A configured server that does not answer: the line says which deployment should be running.
    config = json.loads(ws.config_file.read_text())
    config["nats_url"] = f"nats://127.0.0.1:{free_port()}"
    ws.config_file.write_text(json.dumps(config))
    done = rumi("call", "default:tool:my_tool", "--root", str(ws.root), "--timeout", "5")
    assert done.returncode == 3
    line = one_line_error(done)
    assert "cannot connect to NATS" in line
    assert line.endswith("is `docker-compose -f docker/docker-compose.yml up -d` running?")


def test_denied_check_exits_1(ws: Workspace) -> None:
    denied = rumi(
        "check", "default:tool:my_tool", "env_read", "--key", "NOT_GRANTED", "--root", str(ws.root), "--json"
    )
    assert denied.returncode == 1, denied.stderr
    assert json.loads(denied.stdout)["decision"] == "deny"


def test_broker_log_before_any_broker_exits_3(ws: Workspace) -> None:
    done = rumi("logs", "--broker", "--root", str(ws.root))
    assert done.returncode == 3
    assert "rumi up" in one_line_error(done)


# ------------------------------------------------------------------------------ --json


def test_grant_revoke_grants_json(ws: Workspace) -> None:
    component = "other:tool:extra"  # the `ws` fixture's Pack `other` declares no permissions
    done = rumi("grant", component, "env_read", "--key", "HOME", "--root", str(ws.root), "--json")
    assert done.returncode == 0, done.stderr
    granted = json.loads(done.stdout)
    assert granted["component_id"] == component and granted["permission"] == "env_read"
    assert Path(granted["file"]) == ws.grant_file(component) and ws.grant_file(component).is_file()

    shown = json.loads(rumi("grants", component, "--root", str(ws.root), "--json").stdout)
    (entry,) = shown["grants"]
    assert entry["active"] == ["env_read"] and entry["valid"] is True

    done = rumi("revoke", component, "env_read", "--root", str(ws.root), "--json")
    assert done.returncode == 0, done.stderr
    revoked = json.loads(done.stdout)
    assert revoked == {
        "component_id": component,
        "permission": "env_read",
        "result": "last",
        "file": str(ws.grant_file(component)),
        "file_removed": True,
    }
    assert not ws.grant_file(component).exists()
    again = json.loads(rumi("revoke", component, "--root", str(ws.root), "--json").stdout)
    assert again["result"] == "no_grant_file" and again["file_removed"] is False


def test_init_json(tmp_path: Path) -> None:
    done = rumi("init", "--root", str(tmp_path / "w"), "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)  # progress went to stderr
    assert out["root"] == str(tmp_path / "w") and any(p.endswith("file_read.py") for p in out["written"])


def test_every_reporting_command_has_json() -> None:
    for command in (
        ["doctor"],
        ["grant"],
        ["revoke"],
        ["grants"],
        ["up"],
        ["down"],
        ["ps"],
        ["stats"],
        ["init"],
        ["check"],
        ["explain"],
        ["review"],
        ["pending"],
        ["approve"],
        ["deny"],
        ["new"],
        ["tools"],
        ["top"],
        ["systemd-unit"],
        ["audit", "verify"],
        ["audit", "creds"],
    ):
        out = rumi(*command, "--help", env={"COLUMNS": "200"}).stdout
        assert "--json" in out, command


@pytest.mark.docker
def test_down_json_with_nothing_running(ws: Workspace) -> None:
    from tests.conftest import docker_engine

    docker_engine()
    done = rumi("down", "--root", str(ws.root), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"removed": []}


# ------------------------------------------------------------------------------ a foreground broker

DENIER = """
from pack_runtime import Pack

pack = Pack()


@pack.tool("peek")
async def peek(ctx, args):
    # No grant: the broker denies, and the tool lets PermissionDenied reach the caller.
    return await ctx.env_read("HOME")


if __name__ == "__main__":
    pack.run()
"""


def _wait_for(proc: subprocess.Popen[bytes], needle: str, timeout: float = 30) -> None:
    """Read the process's output until `needle` appears; from then on a thread drains (and drops) it."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    seen = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        chunk = os.read(fd, 65536) if ready else b""
        seen += chunk
        if needle.encode() in seen:
            threading.Thread(target=lambda: all(iter(lambda: os.read(fd, 65536), b"")), daemon=True).start()
            return
        if ready and not chunk:  # EOF: the process ended
            break
    raise AssertionError(
        f"{needle!r} not seen (exit {proc.poll()}):\n{seen.decode(errors='replace')[-3000:]}"
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def foreground(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`rumi broker` in the foreground (embedded nats-server) and `rumi dev denier` against it."""
    ws = Workspace.at(tmp_path_factory.mktemp("fg") / "ws")
    init_workspace(ws)
    (ws.ecosystem / "denier").mkdir()
    (ws.ecosystem / "denier" / "pack.json").write_text('{"id": "denier", "version": "0.1.0"}')
    (ws.ecosystem / "denier" / "main.py").write_text(DENIER)
    out = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "cwd": REPO}
    broker = subprocess.Popen([*RUMI, "broker", "--root", str(ws.root), "--port", str(free_port())], **out)
    dev = None
    try:
        _wait_for(broker, "rumi broker: serving")
        dev = subprocess.Popen([*RUMI, "dev", "denier", "--root", str(ws.root)], **out)
        _wait_for(dev, "pack denier serving")
        yield {"ws": ws, "broker": broker}
    finally:
        if dev is not None:
            _stop(dev)
        _stop(broker)
    assert broker.returncode == 0


def test_call_exit_codes_against_a_running_broker(foreground: dict[str, Any]) -> None:
    root = str(foreground["ws"].root)
    denied = rumi("call", "denier:tool:peek", "--root", root, "--timeout", "20")
    assert denied.returncode == 1, denied.stderr
    assert one_line_error(denied).startswith("error: permission_denied: ")
    unknown = rumi("call", "denier:tool:nope", "--root", root, "--timeout", "20")
    assert unknown.returncode == 2, unknown.stderr
    assert "unknown_capability" in one_line_error(unknown)
    not_running = rumi("call", "default:tool:my_tool", "--root", root, "--timeout", "20")
    assert not_running.returncode == 3, not_running.stderr
    assert "not running" in one_line_error(not_running) or "unavailable" in not_running.stderr


@pytest.mark.docker
def test_ps_and_doctor_see_a_foreground_broker(foreground: dict[str, Any]) -> None:
    from tests.conftest import docker_engine

    docker_engine()
    root, pid = str(foreground["ws"].root), foreground["broker"].pid
    done = rumi("ps", "--root", root, "--json")
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["broker_pid"] == pid and status["broker_mode"] == "foreground"
    assert isinstance(status["nats_pid"], int) and status["nats_url"].startswith("nats://127.0.0.1:")
    text = rumi("ps", "--root", root).stdout
    assert f"broker: pid {pid} (foreground `rumi broker`" in text

    report = json.loads(rumi("doctor", "--root", root, "--json").stdout)
    (broker,) = [c for c in report["checks"] if c["name"] == "broker"]
    assert broker["status"] == "OK" and f"pid {pid}" in broker["detail"]
    assert report["failed"] == sum(c["status"] == "FAIL" for c in report["checks"])


@pytest.mark.docker
def test_doctor_json_exit_code_follows_its_checks(ws: Workspace) -> None:
    from tests.conftest import docker_engine

    docker_engine()
    done = rumi("doctor", "--root", str(ws.root), "--json")
    report = json.loads(done.stdout)
    assert {"checks", "ok", "failed"} <= set(report)
    assert all(set(c) == {"status", "name", "detail", "fix"} for c in report["checks"])
    # No broker runs for this workspace: at least that check fails, and so the exit code is 1.
    assert report["failed"] >= 1 and done.returncode == 1


# ------------------------------------------------------------------------------ -v


def test_verbose_shows_rumi_debug_logs_not_the_libraries(ws: Workspace) -> None:
    probe = (
        "import logging, sys\n"
        "from broker.cli import app\n"
        "sys.argv = ['rumi', *sys.argv[1:]]\n"
        "try:\n"
        "    app()\n"
        "except SystemExit:\n"
        "    pass\n"
        "for name in ('broker.probe', 'rumi.probe', 'urllib3.connectionpool', 'docker.api', 'httpx', 'nats.aio'):\n"
        "    logging.getLogger(name).debug('DEBUG-FROM %s', name)\n"
    )
    run = [sys.executable, "-c", probe]
    loud = subprocess.run(
        [*run, "-v", "grants", "--root", str(ws.root)], capture_output=True, text=True, cwd=REPO
    )
    assert "DEBUG-FROM broker.probe" in loud.stderr and "DEBUG-FROM rumi.probe" in loud.stderr
    for library in ("urllib3", "docker", "httpx", "nats"):
        assert f"DEBUG-FROM {library}" not in loud.stderr
    quiet = subprocess.run([*run, "grants", "--root", str(ws.root)], capture_output=True, text=True, cwd=REPO)
    assert "DEBUG-FROM" not in quiet.stderr


def test_setup_logging_keeps_libraries_at_warning() -> None:
    from broker.cli.common import QUIET_LOGGERS, setup_logging

    before = {n: logging.getLogger(n).level for n in ("broker", "rumi", *QUIET_LOGGERS)}
    try:
        setup_logging(True)
        assert logging.getLogger("broker.service.broker").getEffectiveLevel() == logging.DEBUG
        for name in ("urllib3", "docker", "httpx", "nats"):
            assert logging.getLogger(name).getEffectiveLevel() == logging.WARNING
    finally:
        for name, level in before.items():
            logging.getLogger(name).setLevel(level)


# ------------------------------------------------------------------------------ start-up cost


def test_importing_the_cli_loads_no_heavy_module() -> None:
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import broker.cli"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr
    modules = {
        line.rsplit("|", 1)[1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")
    }
    assert "broker.cli" in modules and "typer" in modules
    heavy = sorted(
        m
        for m in modules
        if m.split(".")[0] in {"docker", "nats", "asyncio", "anyio", "httpx", "pydantic"}
        or m.startswith(("broker.audit", "broker.policy", "broker.containers", "broker.bus", "broker.admin"))
    )
    assert not heavy, f"`import broker.cli` loads {heavy}: import them inside the command"


def test_cli_constants_agree_with_the_engine() -> None:
    from broker.cli import containers
    from broker.containers import engine

    assert containers.DEFAULT_PREFIX == engine.DEFAULT_PREFIX
    assert containers.BROKER_SERVE_COMMAND == engine.BROKER_SERVE_COMMAND


def test_find_nats_server_beside_the_interpreter_without_path(monkeypatch: pytest.MonkeyPatch) -> None:
    from broker.bus.server import find_nats_server

    beside = Path(sys.executable).parent / "nats-server"
    if not beside.is_file():
        pytest.skip(f"no nats-server beside {sys.executable} (this interpreter is not Rumi's venv)")
    monkeypatch.setenv("PATH", "")
    assert find_nats_server() == str(beside)


# ------------------------------------------------------------------------------ docs


def test_docs_cli_lists_every_command() -> None:
    import typer.main

    from broker.cli import app

    group: Any = typer.main.get_command(app)
    names = []
    for name, command in group.commands.items():
        if command.hidden:
            continue
        subs = getattr(command, "commands", None)
        names += [f"{name} {sub}" for sub, c in subs.items() if not c.hidden] if subs else [name]
    text = (REPO / "docs" / "cli.md").read_text()
    missing = [n for n in names if f"`rumi {n}" not in text]
    assert not missing, f"docs/cli.md has no line for: {missing}"
