"""Container commands: up, down, ps, logs, stats, doctor (and the hidden broker entry `rumi up` starts).

broker.containers (and with it the Docker SDK) is imported inside each command: `rumi --help` and
`rumi grants` never load it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any

import typer

from broker.cli.common import JsonOption, RootOption, fail, fail_error, print_json, serve_broker, workspace
from broker.cli.top import MetricsOption, check_metrics, use_metrics
from broker.core.errors import EXIT_DENIED, EXIT_FAILED, EXIT_USAGE, RumiError

if TYPE_CHECKING:
    from broker.admin.doctor import BrokerProcess
    from broker.containers.engine import ContainerInfo, DockerRuntime, RuntimeStatus

# broker.containers.engine's DEFAULT_PREFIX and BROKER_SERVE_COMMAND, spelt out so that registering
# the commands imports nothing of the engine (tests/test_cli.py checks they agree).
DEFAULT_PREFIX = "rumi"
BROKER_SERVE_COMMAND = "serve-broker"

PrefixOption = Annotated[
    str,
    typer.Option("--prefix", envvar="RUMI_IMAGE_PREFIX", help="Image and container name prefix."),
]


@contextmanager
def _one_line_errors() -> Iterator[None]:
    """RumiError and Docker SDK errors become one line on stderr and their exit code (docs/cli.md)."""
    try:
        import docker.errors

        docker_error: type[BaseException] = docker.errors.DockerException
    except ImportError:  # pragma: no cover
        docker_error = RumiError
    try:
        yield
    except RumiError as exc:
        fail_error(exc)
    except docker_error as exc:
        text = str(getattr(exc, "explanation", None) or exc).splitlines()
        fail(f"Docker: {text[0] if text else type(exc).__name__}", EXIT_FAILED)


def _runtime(root: str | None, prefix: str, progress: Callable[[str], None] | None = None) -> DockerRuntime:
    from broker.containers.engine import DockerRuntime

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


def up_cmd(
    packs: Annotated[
        list[str] | None, typer.Argument(help="Packs to start (default: every Pack in ecosystem/).")
    ] = None,
    root: RootOption = None,
    build: Annotated[bool, typer.Option("--build/--no-build", help="Build (or reuse) images first.")] = True,
    prefix: PrefixOption = DEFAULT_PREFIX,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for every Pack to say it is ready.")] = 90.0,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            min=1,
            max=64,
            help="Broker processes, each serving its share of the Packs (default: one per core).",
        ),
    ] = None,
    as_json: JsonOption = False,
    metrics: MetricsOption = None,
) -> None:
    """Start NATS, the broker and the Pack containers (with their networks and host guard).

    Packs start concurrently; each is up when its SDK says "ready" on rumi.pack.<id>.status. One line
    per Pack as it settles (`pack default: created → started → ready (0.8 s)`), a count every 2 s.
    """
    from dataclasses import asdict

    # The broker this starts serves /metrics on 127.0.0.1:9464 (+ worker index) unless told otherwise.
    check_metrics(workspace(root), metrics, workers=workers or os.cpu_count() or 1)
    with _one_line_errors():
        # With --json, stdout holds only the JSON document: progress goes to stderr.
        rt = _runtime(root, prefix, lambda m: typer.echo(f"  {m}", err=as_json))
        report = rt.up(packs or None, build=build, health_timeout=timeout, workers=workers)
    if as_json:
        print_json(asdict(report))
        return
    started = [p for p in report.packs if p.created]
    times = sorted(p.seconds_to_ready for p in started)
    how = f"{len(started)} started, {len(report.packs) - len(started)} already running"
    if times:
        how += f"; ready after p50 {times[len(times) // 2]:.1f} s, max {times[-1]:.1f} s"
    typer.echo(
        f"Up in {report.seconds:.1f} s: {len(report.packs)} Pack(s) ready ({how}), NATS {report.nats_url}, "
        f"broker pid {report.broker_pid}. `rumi ps` shows them, `rumi down` stops them."
    )


def down_cmd(root: RootOption = None, as_json: JsonOption = False) -> None:
    """Stop and remove this workspace's broker, Pack and NATS containers, networks and guard rules."""
    with _one_line_errors():
        removed = _runtime(root, DEFAULT_PREFIX).down()
    if as_json:
        print_json({"removed": removed})
        return
    for item in removed:
        typer.echo(f"  removed {item}")
    typer.echo("Down." if removed else "Nothing was running.")


def ps_cmd(root: RootOption = None, as_json: JsonOption = False) -> None:
    """Show containers (state, health, each Pack's last heartbeat), networks (subnet, guard), broker, NATS.

    The broker is found as `rumi doctor` finds it: detached by `rumi up`, or `rumi broker` in a terminal.
    """
    from broker.admin.doctor import find_broker

    with _one_line_errors():
        ws = workspace(root)
        status = _runtime(root, DEFAULT_PREFIX).status()
        broker = find_broker(ws)
    if as_json:
        out: dict[str, Any] = status.to_json()
        out["broker_pid"] = broker.pid if broker else None
        out["broker_mode"] = broker.mode if broker else None
        out["nats_pid"] = broker.nats_pid if broker else None
        print_json(out)
        return
    typer.echo(_containers_table(status) if status.containers else "No containers (run `rumi up`).")
    if status.networks:
        typer.echo("")
        typer.echo(_networks_table(status))
    typer.echo("")
    typer.echo(f"broker: {_broker_line(broker)}")
    typer.echo(f"nats:   {status.nats_url or 'no URL (not running)'}")


def _broker_line(broker: BrokerProcess | None) -> str:
    if broker is None:
        return "not running"
    if broker.mode == "detached":
        return f"pid {broker.pid} (detached, `rumi up`)"
    pid = f"pid {broker.pid}" if broker.pid is not None else "pid unknown"
    return f"{pid} (foreground `rumi broker`, embedded nats-server pid {broker.nats_pid})"


def _containers_table(status: RuntimeStatus) -> str:
    rows = [["CONTAINER", "ROLE", "STATE", "HEALTH", "PACK STATUS", "HEARTBEAT", "ADDRESSES", "PORTS"]]
    for c in status.containers:
        rows.append(
            [
                c.name,
                c.role,
                f"{c.state} ({c.incident})" if c.incident else c.state,
                c.health or "-",
                _pack_status(c),
                f"{c.heartbeat_age:.1f} s ago" if c.heartbeat_age is not None else "-",
                _addresses(c),
                ",".join(c.ports) or "-",
            ]
        )
    return _table(rows)


def _addresses(c: ContainerInfo, shown: int = 3) -> str:
    """A few addresses (NATS has one per Pack network: `rumi ps --json` lists them all)."""
    values = sorted(c.addresses.values())
    if len(values) <= shown:
        return ",".join(values) or "-"
    return ",".join(values[:shown]) + f",… ({len(values)} networks)"


def _pack_status(c: ContainerInfo) -> str:
    """ready / alive / stopping from the Pack's status subject; "silent" once its heartbeats stopped."""
    if c.role != "pack":
        return "-"
    if c.heartbeat is None:
        return "never heard"
    if c.heartbeat != "stopping" and not c.live:
        return f"silent (was {c.heartbeat})"
    return c.heartbeat


def _networks_table(status: RuntimeStatus) -> str:
    rows = [["NETWORK", "SUBNET", "BRIDGE", "INTERNAL", "GUARD"]]
    for n in status.networks:
        rows.append([n.name, n.subnet, n.bridge, "yes" if n.internal else "no", n.guard])
    return _table(rows)


def logs_cmd(
    pack: Annotated[str | None, typer.Argument(help="The Pack whose container log to show.")] = None,
    root: RootOption = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines.")] = False,
    tail: Annotated[int | None, typer.Option("--tail", "-n", help="Only the last N lines.", min=0)] = None,
    nats: Annotated[bool, typer.Option("--nats", help="The NATS container's log instead.")] = False,
    broker: Annotated[
        bool, typer.Option("--broker", help="The broker's log (docker/.rumi/broker.log).")
    ] = False,
) -> None:
    """Print a Pack's container log (or the NATS container's, or the broker's)."""
    if sum((pack is not None, nats, broker)) != 1:
        fail("name one Pack, or pass --nats or --broker", EXIT_USAGE)
    if broker:
        from broker.admin.logs import broker_log

        try:
            _write_chunks(broker_log(workspace(root), follow=follow, tail=tail))
        except RumiError as exc:
            fail_error(exc)
        except KeyboardInterrupt:
            return
        return
    with _one_line_errors():
        try:
            _write_chunks(_runtime(root, DEFAULT_PREFIX).logs(pack, nats=nats, follow=follow, tail=tail))
        except KeyboardInterrupt:
            raise typer.Exit(0) from None


def _write_chunks(chunks: Iterator[bytes]) -> None:
    out = sys.stdout.buffer
    for chunk in chunks:
        out.write(chunk)
        out.flush()


def stats_cmd(root: RootOption = None, as_json: JsonOption = False) -> None:
    """Memory (and pids) per running container, one sample from the Docker stats API."""
    from dataclasses import asdict

    with _one_line_errors():
        samples = _runtime(root, DEFAULT_PREFIX).stats()
    if as_json:
        print_json([asdict(s) for s in samples])
        return
    if not samples:
        typer.echo("No running containers (run `rumi up`).")
        return
    rows = [["CONTAINER", "ROLE", "MEMORY", "LIMIT", "PIDS"]]
    for s in samples:
        rows.append([s.name, s.role, _human_bytes(s.memory_bytes), _human_bytes(s.memory_limit), str(s.pids)])
    typer.echo(_table(rows))


def doctor_cmd(
    root: RootOption = None,
    fix: Annotated[bool, typer.Option("--fix", help="Install missing host guard rules.")] = False,
    prefix: PrefixOption = DEFAULT_PREFIX,
    as_json: JsonOption = False,
) -> None:
    """Check Docker, images, NATS, broker, host guard, Pack heartbeats and grants; say what to fix.

    Exit code 1 when a check fails.
    """
    from broker.admin.doctor import run_doctor

    with _one_line_errors():
        checks = run_doctor(workspace(root), prefix=prefix, fix=fix)
    failed = [c for c in checks if c.status == "FAIL"]
    if as_json:
        print_json(
            {"checks": [c.to_json() for c in checks], "ok": len(checks) - len(failed), "failed": len(failed)}
        )
    else:
        for c in checks:
            typer.echo(c.line())
        typer.echo(f"{len(checks) - len(failed)} OK, {len(failed)} FAIL")
    if failed:
        raise typer.Exit(EXIT_DENIED)


def serve_broker_cmd(
    root: RootOption = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Rumi's own debug logs (every request).")
    ] = False,
    workers: Annotated[int, typer.Option("--workers", min=1, max=64, help="Broker processes.")] = 1,
    metrics: MetricsOption = None,
) -> None:
    """Run the broker against the NATS container (`rumi up` starts this detached)."""
    from broker.service.metrics import DEFAULT_LISTEN

    ws = workspace(root)
    use_metrics(ws, metrics, workers=workers, default=DEFAULT_LISTEN)
    serve_broker(ws, verbose=verbose, embedded=False, workers=workers)


def register(app: typer.Typer) -> None:
    """Add the container commands to the main app."""
    app.command("up")(up_cmd)
    app.command("down")(down_cmd)
    app.command("ps")(ps_cmd)
    app.command("logs")(logs_cmd)
    app.command("stats")(stats_cmd)
    app.command("doctor")(doctor_cmd)
    app.command(BROKER_SERVE_COMMAND, hidden=True)(serve_broker_cmd)
