"""`rumi systemd-unit`: a systemd service unit that runs `rumi broker` for one workspace.

The unit runs the broker as root (it opens the Docker socket for the terminal sandbox and reaches
whatever a grant names on the host), restarts it when it fails, and stops it in order: SIGTERM to the
broker alone (`KillMode=mixed`), which drains in-flight requests, writes their audit outcomes and then
stops its own nats-server and workers; whatever is left is killed after `TimeoutStopSec`.

Hardening that cannot change what a grant reaches is on (no new privileges, no namespaces, no kernel
tunables, modules, logs or cgroup writes, no realtime, no set-uid files). `ProtectSystem=`,
`ProtectHome=`, `PrivateTmp=` and `PrivateDevices=` are left out on purpose: a grant may name any host
path, and under them the broker would read or write another file than the one granted (or none).

Values are written in systemd's syntax: arguments with anything but plain characters are double-quoted
with C escapes, `%` is written `%%` (specifiers), and `$` in `ExecStart=` `$$` (variable expansion); a
path with a control character is refused.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from broker.containers.engine import default_workers
from broker.core.atomic import write_atomic
from broker.core.errors import EXIT_USAGE, RumiError
from broker.core.workspace import Workspace

__all__ = [
    "DEFAULT_UNIT_NAME",
    "HARDENING",
    "BrokerUnit",
    "SystemdUnitError",
    "broker_unit",
    "exec_quote",
    "rumi_executable",
    "write_unit",
]

DEFAULT_UNIT_NAME = "rumi-broker.service"
# systemd's own default PATH for services; the directory of `rumi` (its venv: nats-server) goes first.
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
HARDENING: tuple[tuple[str, str], ...] = (
    ("NoNewPrivileges", "yes"),
    ("RestrictSUIDSGID", "yes"),
    ("RestrictNamespaces", "yes"),
    ("RestrictRealtime", "yes"),
    ("LockPersonality", "yes"),
    ("ProtectKernelTunables", "yes"),
    ("ProtectKernelModules", "yes"),
    ("ProtectKernelLogs", "yes"),
    ("ProtectControlGroups", "yes"),
    ("ProtectHostname", "yes"),
    ("SystemCallArchitectures", "native"),
)
_PLAIN = re.compile(r"^[A-Za-z0-9_@+=:,./-]+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class SystemdUnitError(RumiError):
    """The unit cannot be written; the message says which option to change."""

    exit_code = EXIT_USAGE


@dataclass(frozen=True)
class BrokerUnit:
    """The unit's text and what it runs."""

    text: str
    exec_start: list[str]
    working_directory: Path
    environment: dict[str, str] = field(default_factory=dict)


def rumi_executable() -> Path:
    """The `rumi` of this installation: the script beside this Python (its venv), else `rumi` on PATH."""
    beside = Path(sys.executable).parent / "rumi"
    if beside.is_file() and os.access(beside, os.X_OK):
        return Path(os.path.abspath(beside))  # not resolved: a venv's python is a symlink
    found = shutil.which("rumi")
    if found is None:
        raise SystemdUnitError("no `rumi` executable found beside this Python or on PATH: pass --rumi PATH")
    return Path(os.path.abspath(found))


def _checked(value: str, what: str) -> str:
    if _CONTROL.search(value):
        raise SystemdUnitError(f"{what} {value!r} contains a control character: systemd cannot hold it")
    return value


def _specifiers(value: str) -> str:
    """`%` starts a specifier in every value: `%%` is a literal one."""
    return value.replace("%", "%%")


def exec_quote(arg: str, *, variables: bool = True) -> str:
    """One argument of `ExecStart=` in systemd's syntax (`variables=False`: an `Environment=` assignment).

    `ExecStart=` expands `$NAME` (so `$` is written `$$`); `Environment=` does not.
    """
    _checked(arg, "argument")
    text = _specifiers(arg)
    if variables:
        text = text.replace("$", "$$")
    if _PLAIN.match(arg):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def broker_unit(
    ws: Workspace,
    *,
    workers: int | None = None,
    rumi: Path | None = None,
    description: str | None = None,
) -> BrokerUnit:
    """The unit that runs `<rumi> broker --root <ws> --workers <workers>` in the workspace.

    `workers` defaults to `rumi up`'s choice: one broker process per core.
    """
    if workers is None:
        workers = default_workers()
    if not ws.handlers.is_dir():
        raise SystemdUnitError(f"no workspace at {ws.root}: run `rumi init` first (or pass --root)")
    if not 1 <= workers <= 64:
        raise SystemdUnitError(f"--workers must be between 1 and 64 (got {workers})")
    exe = rumi if rumi is not None else rumi_executable()
    if not exe.is_absolute():
        raise SystemdUnitError(f"--rumi {exe} must be an absolute path (systemd does not search PATH for it)")
    if not (exe.is_file() and os.access(exe, os.X_OK)):
        raise SystemdUnitError(f"--rumi {exe} is not an executable file")
    root = Path(_checked(str(ws.root), "workspace root"))
    _checked(str(exe), "rumi path")
    argv = [str(exe), "broker", "--root", str(root), "--workers", str(workers)]
    # nats-server (the embedded server, when no nats_url is set) is installed beside rumi's Python
    # (a `rumi` on PATH may be a link into that environment: its target's directory comes first).
    dirs = list(dict.fromkeys([str(Path(os.path.realpath(exe)).parent), str(exe.parent)]))
    if any(":" in d for d in dirs):
        raise SystemdUnitError(f"--rumi {exe}: a directory with ':' cannot be put on PATH")
    env = {"PATH": ":".join([*dirs, SYSTEMD_PATH]), "PYTHONUNBUFFERED": "1"}
    about = description or f"Rumi permission broker ({root})"
    lines = [
        f"# Generated by `rumi systemd-unit` for the workspace {root}. Install it with",
        f"#   rumi systemd-unit --root {shlex.quote(str(root))} --output /etc/systemd/system/{DEFAULT_UNIT_NAME}",
        f"#   systemctl daemon-reload && systemctl enable --now {DEFAULT_UNIT_NAME}",
        "[Unit]",
        f"Description={_specifiers(_checked(about, 'description'))}",
        # NATS may run in a container (Compose, nats_url): start after the engine, retry until it answers.
        "After=network-online.target docker.service",
        "Wants=network-online.target",
        "StartLimitIntervalSec=0",  # keep restarting while NATS is not there yet: RestartSec paces it
        "",
        "[Service]",
        "Type=simple",
        f"WorkingDirectory={_specifiers(str(root))}",
        *(f"Environment={exec_quote(f'{k}={v}', variables=False)}" for k, v in env.items()),
        "ExecStart=" + " ".join(exec_quote(a) for a in argv),
        "KillMode=mixed",
        "KillSignal=SIGTERM",
        "TimeoutStopSec=60",
        "Restart=on-failure",
        "RestartSec=2",
        *(f"{k}={v}" for k, v in HARDENING),
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return BrokerUnit("\n".join(lines), argv, root, env)


def write_unit(unit: BrokerUnit, path: Path) -> Path:
    """Write the unit file atomically (0644); return its absolute path."""
    target = Path(os.path.abspath(path))
    if target.is_dir():
        target = target / DEFAULT_UNIT_NAME
    if not target.parent.is_dir():
        raise SystemdUnitError(f"cannot write {target}: {target.parent} is not a directory")
    if target.suffix != ".service":
        raise SystemdUnitError(f"{target.name}: a systemd service unit's name ends in .service")
    try:
        write_atomic(target, unit.text, mode=0o644)
    except OSError as exc:
        raise SystemdUnitError(f"cannot write {target}: {exc.strerror or exc}") from None
    return target
