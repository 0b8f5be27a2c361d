"""Container commands: up, down, ps, logs, stats, doctor (and the hidden broker entry `rumi up` starts)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Annotated

import typer

from broker.cli.common import RootOption, fail, serve_broker, workspace
from broker.containers.engine import (
    BROKER_SERVE_COMMAND,
    DEFAULT_PREFIX,
    DockerRuntime,
    broker_log_file,
    running_broker_pid,
)
from broker.core.errors import RumiError
from broker.core.workspace import Workspace

PrefixOption = Annotated[
    str,
    typer.Option("--prefix", envvar="RUMI_IMAGE_PREFIX", help="Image and container name prefix."),
]


@contextmanager
def _one_line_errors() -> Iterator[None]:
    """RumiError and Docker SDK errors become one line on stderr and exit code 1."""
    try:
        import docker.errors

        docker_error: type[BaseException] = docker.errors.DockerException
    except ImportError:  # pragma: no cover
        docker_error = RumiError
    try:
        yield
    except RumiError as exc:
        fail(str(exc))
    except docker_error as exc:
        text = str(getattr(exc, "explanation", None) or exc).splitlines()
        fail(f"Docker: {text[0] if text else type(exc).__name__}")


def _runtime(root: str | None, prefix: str, progress: Callable[[str], None] | None = None) -> DockerRuntime:
    return DockerRuntime(workspace(root), prefix=prefix, progress=progress)


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def register(app: typer.Typer) -> None:
    """Add the container commands to the main app."""

    @app.command("up")
    def up_cmd(
        packs: Annotated[
            list[str] | None, typer.Argument(help="Packs to start (default: every Pack in ecosystem/).")
        ] = None,
        root: RootOption = None,
        build: Annotated[
            bool, typer.Option("--build/--no-build", help="Build (or reuse) images first.")
        ] = True,
        prefix: PrefixOption = DEFAULT_PREFIX,
        timeout: Annotated[
            float, typer.Option(help="Seconds to wait for the Packs to become healthy.")
        ] = 90.0,
    ) -> None:
        """Start NATS, the broker and the Pack containers (with their networks and host guard)."""
        with _one_line_errors():
            rt = _runtime(root, prefix, lambda m: typer.echo(f"  {m}"))
            report = rt.up(packs or None, build=build, health_timeout=timeout)
        for p in report.packs:
            how = "started" if p.created else "already running"
            typer.echo(f"pack {p.pack_id}: {p.container} {how}, healthy after {p.seconds_to_healthy:.1f} s")
        typer.echo(
            f"Up in {report.seconds:.1f} s: {len(report.packs)} Pack(s), NATS {report.nats_url}, "
            f"broker pid {report.broker_pid}. `rumi ps` shows them, `rumi down` stops them."
        )

    @app.command("down")
    def down_cmd(root: RootOption = None) -> None:
        """Stop and remove this workspace's broker, Pack and NATS containers, networks and guard rules."""
        with _one_line_errors():
            removed = _runtime(root, DEFAULT_PREFIX).down()
        for item in removed:
            typer.echo(f"  removed {item}")
        typer.echo("Down." if removed else "Nothing was running.")

    @app.command("ps")
    def ps_cmd(
        root: RootOption = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    ) -> None:
        """Show containers (state, health), networks (subnet, guard), broker pid and NATS URL."""
        with _one_line_errors():
            status = _runtime(root, DEFAULT_PREFIX).status()
        if as_json:
            typer.echo(json.dumps(status.to_json(), indent=2, sort_keys=True))
            return
        if status.containers:
            rows = [["CONTAINER", "ROLE", "STATE", "HEALTH", "ADDRESSES", "PORTS"]]
            for c in status.containers:
                rows.append(
                    [
                        c.name,
                        c.role,
                        c.state,
                        c.health or "-",
                        ",".join(sorted(c.addresses.values())) or "-",
                        ",".join(c.ports) or "-",
                    ]
                )
            typer.echo(_table(rows))
        else:
            typer.echo("No containers (run `rumi up`).")
        if status.networks:
            typer.echo("")
            rows = [["NETWORK", "SUBNET", "BRIDGE", "INTERNAL", "GUARD"]]
            for n in status.networks:
                rows.append([n.name, n.subnet, n.bridge, "yes" if n.internal else "no", n.guard])
            typer.echo(_table(rows))
        typer.echo("")
        typer.echo(f"broker: {'pid ' + str(status.broker_pid) if status.broker_pid else 'not running'}")
        typer.echo(f"nats:   {status.nats_url or 'no URL (not running)'}")

    @app.command("logs")
    def logs_cmd(
        pack: Annotated[str | None, typer.Argument(help="The Pack whose container log to show.")] = None,
        root: RootOption = None,
        follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines.")] = False,
        tail: Annotated[
            int | None, typer.Option("--tail", "-n", help="Only the last N lines.", min=0)
        ] = None,
        nats: Annotated[bool, typer.Option("--nats", help="The NATS container's log instead.")] = False,
        broker: Annotated[
            bool, typer.Option("--broker", help="The broker's log (docker/.rumi/broker.log).")
        ] = False,
    ) -> None:
        """Print a Pack's container log (or the NATS container's, or the broker's)."""
        if sum((pack is not None, nats, broker)) != 1:
            fail("name one Pack, or pass --nats or --broker")
        ws = workspace(root)
        if broker:
            _print_file_log(ws, follow=follow, tail=tail)
            return
        out = sys.stdout.buffer
        with _one_line_errors():
            try:
                for chunk in _runtime(root, DEFAULT_PREFIX).logs(pack, nats=nats, follow=follow, tail=tail):
                    out.write(chunk)
                    out.flush()
            except KeyboardInterrupt:
                raise typer.Exit(0) from None

    @app.command("stats")
    def stats_cmd(
        root: RootOption = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    ) -> None:
        """Memory (and pids) per running container, one sample from the Docker stats API."""
        with _one_line_errors():
            samples = _runtime(root, DEFAULT_PREFIX).stats()
        if as_json:
            typer.echo(json.dumps([asdict(s) for s in samples], indent=2, sort_keys=True))
            return
        if not samples:
            typer.echo("No running containers (run `rumi up`).")
            return
        rows = [["CONTAINER", "ROLE", "MEMORY", "LIMIT", "PIDS"]]
        for s in samples:
            rows.append(
                [s.name, s.role, _human_bytes(s.memory_bytes), _human_bytes(s.memory_limit), str(s.pids)]
            )
        typer.echo(_table(rows))

    @app.command("doctor")
    def doctor_cmd(
        root: RootOption = None,
        fix: Annotated[bool, typer.Option("--fix", help="Install missing host guard rules.")] = False,
        prefix: PrefixOption = DEFAULT_PREFIX,
    ) -> None:
        """Check Docker, images, NATS, broker, host guard, Pack health and grants; say what to fix."""
        checks = run_doctor(workspace(root), prefix=prefix, fix=fix)
        for c in checks:
            typer.echo(c.line())
        failed = [c for c in checks if c.status == "FAIL"]
        typer.echo(f"{len(checks) - len(failed)} OK, {len(failed)} FAIL")
        if failed:
            raise typer.Exit(1)

    @app.command(BROKER_SERVE_COMMAND, hidden=True)
    def serve_broker_cmd(
        root: RootOption = None,
        verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every request.")] = False,
    ) -> None:
        """Run the broker against the NATS container (`rumi up` starts this detached)."""
        serve_broker(workspace(root), verbose=verbose, embedded=False)


def _print_file_log(ws: Workspace, *, follow: bool, tail: int | None) -> None:
    path = broker_log_file(ws)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        fail(f"no broker log at {path}: `rumi up` starts the broker")
    if tail is not None:
        data = b"".join(data.splitlines(keepends=True)[-tail:]) if tail else b""
    out = sys.stdout.buffer
    out.write(data)
    out.flush()
    if not follow:
        return
    offset = path.stat().st_size
    try:
        while True:
            time.sleep(0.5)
            with open(path, "rb") as f:
                size = f.seek(0, 2)
                if size < offset:
                    offset = 0  # rotated
                f.seek(offset)
                chunk = f.read()
            offset += len(chunk)
            out.write(chunk)
            out.flush()
    except KeyboardInterrupt:
        return


# ------------------------------------------------------------------------------------ doctor


@dataclass(frozen=True)
class Check:
    """One line of `rumi doctor`."""

    status: str  # OK, FAIL
    name: str
    detail: str
    fix: str = ""

    def line(self) -> str:
        """`OK   name: detail` or `FAIL name: detail -> fix`."""
        text = f"{self.status:<4} {self.name}: {self.detail}"
        return f"{text} -> {self.fix}" if self.fix and self.status != "OK" else text


def run_doctor(ws: Workspace, *, prefix: str = DEFAULT_PREFIX, fix: bool = False) -> list[Check]:
    """Every check of `rumi doctor`, in order."""
    checks: list[Check] = []
    checks.extend(_check_policy(ws))
    try:
        rt = DockerRuntime(ws, prefix=prefix)
        major, api = rt.engine_version()
    except RumiError as exc:
        checks.append(Check("FAIL", "engine", str(exc)))
        checks.extend(_check_embedded(ws))
        return checks
    note = (
        " (before 26: internal networks' DNS is forwarded; Rumi points Pack DNS at a dead address)"
        if _engine_major(major) < 26
        else ""
    )
    checks.append(Check("OK", "engine", f"Docker {major}, API {api}{note}"))
    checks.extend(_check_images(rt))
    checks.extend(_check_nats(rt))
    checks.extend(_check_broker(ws))
    checks.extend(_check_guard(rt, fix))
    checks.extend(_check_packs(rt))
    return checks


def _engine_major(version: str) -> int:
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else 0


def _check_policy(ws: Workspace) -> list[Check]:
    from broker.policy.grants import Policy

    if not ws.handlers.is_dir():
        return [Check("FAIL", "workspace", f"no workspace at {ws.root}", "run `rumi init` (or pass --root)")]
    try:
        errors = Policy.for_workspace(ws).errors
    except RumiError as exc:
        return [Check("FAIL", "policy", str(exc), "fix the file named")]
    if not errors:
        return [Check("OK", "policy", "handlers, scopes and grants load without errors")]
    return [
        Check("FAIL", "policy", str(e), "fix or remove that file (its component stays denied)")
        for e in errors
    ]


def _check_images(rt: DockerRuntime) -> list[Check]:
    from broker.containers.images import image_tag
    from broker.containers.packimage import pack_image_tag

    wanted = [image_tag(k, rt.prefix) for k in ("nats", "base", "sandbox")]
    wanted += [pack_image_tag(p, rt.prefix) for p in rt.ws.pack_ids()]
    missing = [t for t in wanted if not rt._image_exists(t)]
    if missing:
        return [Check("FAIL", "images", f"missing {', '.join(missing)}", "run `rumi build`")]
    return [Check("OK", "images", f"{len(wanted)} present ({', '.join(wanted)})")]


def _check_nats(rt: DockerRuntime) -> list[Check]:
    from broker.bus.server import nats_url
    from broker.containers.engine import _nats_answers

    try:
        container = rt.container_for(nats=True)
    except RumiError:
        container = None
    if container is None:
        embedded = _check_embedded(rt.ws)
        if embedded and embedded[0].status == "OK":
            return embedded
        return [Check("FAIL", "nats", "the NATS container is not running", "run `rumi up`")]
    if container.status != "running":
        return [
            Check(
                "FAIL",
                "nats",
                f"{container.name} is {container.status}",
                "run `rumi up` (`rumi logs --nats`)",
            )
        ]
    try:
        url = nats_url(rt.ws)
    except RumiError as exc:
        return [Check("FAIL", "nats", str(exc), "run `rumi up`")]
    host, _, port = url.removeprefix("nats://").rpartition(":")
    if not port.isdigit() or not _nats_answers(host.strip("[]"), int(port)):
        return [Check("FAIL", "nats", f"{container.name} runs but {url} does not answer", "run `rumi up`")]
    return [Check("OK", "nats", f"{container.name} running, {url} answers")]


def _check_embedded(ws: Workspace) -> list[Check]:
    from broker.bus.server import _running_pid

    pid = _running_pid(ws)
    if pid is None:
        return []
    return [
        Check("OK", "nats", f"embedded nats-server (pid {pid}) of `rumi broker`; nothing is containerised")
    ]


def _check_broker(ws: Workspace) -> list[Check]:
    from broker.bus.server import _running_pid

    pid = running_broker_pid(ws)
    if pid is not None:
        return [Check("OK", "broker", f"running (pid {pid}, log {broker_log_file(ws)})")]
    if _running_pid(ws) is not None:
        return [
            Check("OK", "broker", "`rumi broker` runs in the foreground somewhere (embedded server found)")
        ]
    return [Check("FAIL", "broker", "not running", "run `rumi up`")]


def _check_guard(rt: DockerRuntime, fix: bool) -> list[Check]:
    from broker.containers import guard as _guard

    try:
        statuses = _guard.guard_status(rt.ws, rt.client)
    except RumiError as exc:
        return [Check("FAIL", "guard", str(exc), "run as root with iptables installed")]
    if not statuses:
        return [Check("OK", "guard", "no Pack networks (nothing to guard)")]
    out = []
    for pack_id, status in sorted(statuses.items()):
        if not status.active and fix:
            try:
                status = _guard.install_guard(status.bridge, rt.tag)
            except RumiError as exc:
                out.append(Check("FAIL", f"guard {pack_id}", str(exc), "run as root"))
                continue
            if status.active:
                out.append(Check("OK", f"guard {pack_id}", f"{status.bridge}: installed now"))
                continue
        if status.active:
            out.append(
                Check("OK", f"guard {pack_id}", f"{status.bridge}: INPUT dropped (IPv4, IPv6), IPv6 off")
            )
        else:
            out.append(
                Check(
                    "FAIL",
                    f"guard {pack_id}",
                    f"{status.bridge}: missing {', '.join(status.missing())}",
                    "run `rumi doctor --fix`",
                )
            )
    return out


def _check_packs(rt: DockerRuntime) -> list[Check]:
    status = rt.status()
    packs = [c for c in status.containers if c.role == "pack"]
    out = []
    for c in packs:
        if c.state == "running" and c.health == "healthy":
            out.append(Check("OK", f"pack {c.pack_id}", f"{c.name} healthy"))
        else:
            out.append(
                Check(
                    "FAIL",
                    f"pack {c.pack_id}",
                    f"{c.name} {c.state}, health {c.health or '-'}",
                    f"see `rumi logs {c.pack_id}`, then `rumi up`",
                )
            )
    for n in status.networks:
        if n.role == "pack-network" and not n.internal:
            out.append(
                Check("FAIL", f"network {n.name}", "is not internal", "run `rumi down` then `rumi up`")
            )
    return out
