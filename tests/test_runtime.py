"""`rumi up` / `ps` / `stats` / `logs` / `doctor` / `down`, the subnet allocator and the host guard.

Unit tests need nothing. The guard tests need root and iptables (they make a bridge of their own).
The Docker tests build their images under a fresh prefix, run everything in a temporary workspace
(its own workspace tag, so its containers, networks and guard rules are its alone) and remove it all
afterwards, also on failure. Without an engine they skip, except under CI (``CI=true``): then they fail.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from broker.admin.init import init_workspace
from broker.cli import app
from broker.containers import guard as _guard
from broker.containers.engine import (
    DockerRuntime,
    RuntimeSetupError,
    allocate_subnet,
    bridge_name,
    host_routes,
    running_broker_pid,
)
from broker.core.labels import workspace_tag
from broker.core.workspace import Workspace
from tests._skip import skip_unless_ci

from .conftest import docker_engine, free_port, say

MB = 1_000_000
N = ipaddress.IPv4Network


# ------------------------------------------------------------------------------ subnet allocator


@pytest.mark.parametrize(
    ("pool", "prefix", "used", "expected"),
    [
        ("10.213.0.0/16", 28, [], "10.213.0.0/28"),
        ("10.213.0.0/16", 28, ["10.213.0.0/28"], "10.213.0.16/28"),
        ("10.213.0.0/16", 28, ["10.213.0.0/24"], "10.213.1.0/28"),
        # A used network bigger than the pool's start, overlapping from below.
        ("10.213.0.0/16", 28, ["10.0.0.0/8"], None),
        ("10.213.0.0/16", 28, ["10.213.0.8/29"], "10.213.0.16/28"),
        ("10.213.0.0/16", 28, ["192.168.0.0/16", "172.17.0.0/16"], "10.213.0.0/28"),
        ("10.213.0.0/16", 29, ["10.213.0.0/29", "10.213.0.16/29"], "10.213.0.8/29"),
        ("10.213.0.0/28", 28, [], "10.213.0.0/28"),
        ("10.213.0.0/28", 28, ["10.213.0.5/32"], None),
    ],
)
def test_allocate_subnet(pool: str, prefix: int, used: list[str], expected: str | None) -> None:
    if expected is None:
        with pytest.raises(RuntimeSetupError, match="no free"):
            allocate_subnet(pool, prefix, [N(u) for u in used])
    else:
        assert allocate_subnet(pool, prefix, [N(u) for u in used]) == N(expected)


@pytest.mark.parametrize(
    ("pool", "prefix", "message"),
    [
        ("10.213.0.1/16", 28, "not a network"),
        ("nonsense", 28, "not a network"),
        ("fd00::/64", 120, "IPv4"),
        ("10.213.0.0/16", 30, "between"),
        ("10.213.0.0/16", 12, "between"),
    ],
)
def test_allocate_subnet_refuses_bad_settings(pool: str, prefix: int, message: str) -> None:
    with pytest.raises(RuntimeSetupError, match=message):
        allocate_subnet(pool, prefix, [])


def test_allocator_gives_100_distinct_subnets_fast() -> None:
    # Docker's default pools run out after ~30 networks; Rumi's pool must carry 100 Packs and more.
    used = [N("172.17.0.0/16"), N("10.213.0.32/27"), N("192.0.2.0/24")]
    started = time.monotonic()
    got: list[ipaddress.IPv4Network] = []
    for _ in range(100):
        subnet = allocate_subnet("10.213.0.0/16", 28, [*used, *got])
        got.append(subnet)
    assert time.monotonic() - started < 5
    assert len(set(got)) == 100
    pool = N("10.213.0.0/16")
    for i, a in enumerate(got):
        assert a.subnet_of(pool) and a.prefixlen == 28
        assert not any(a.overlaps(u) for u in used)
        assert not any(a.overlaps(b) for b in got[i + 1 :])
    # The whole /16 holds 4096 of them; the last one is found as fast.
    full = [N(f"10.213.{i // 16}.{(i % 16) * 16}/28") for i in range(4095)]
    assert allocate_subnet("10.213.0.0/16", 28, full) == N("10.213.255.240/28")


def test_host_routes_parses_proc_net_route(tmp_path: Path) -> None:
    table = tmp_path / "route"
    table.write_text(
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
        "eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
        "docker0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n"
        "garbage line\n"
    )
    assert host_routes(table) == [N("192.0.2.0/24"), N("172.17.0.0/16")]
    assert host_routes(tmp_path / "missing") == []


def test_bridge_names_fit_the_kernel_limit_and_the_guard_pattern() -> None:
    names = {bridge_name(secrets.token_hex(5), f"pack:p{i}") for i in range(200)}
    assert len(names) == 200
    for name in names:
        assert len(name) <= 15 and _guard.BRIDGE_RE.match(name)


def test_broker_pidfile_pointing_at_another_process_is_ignored(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path)
    ws.state.mkdir(parents=True)
    (ws.state / "broker.pid").write_text(f"{os.getpid()}\n")  # pytest: not our broker
    assert running_broker_pid(ws) is None
    (ws.state / "broker.pid").write_text("not a pid\n")
    assert running_broker_pid(ws) is None


def test_guard_refuses_foreign_names() -> None:
    for bad in ("eth0", "docker0", "rumi-XYZ", "rumi-0123456789a", "rumi-01234;rm"):
        with pytest.raises(_guard.GuardError, match="not a Rumi bridge"):
            _guard.install_guard(bad, "abc")
    with pytest.raises(_guard.GuardError, match="workspace tag"):
        _guard.guard_comment("a b")


# ------------------------------------------------------------------------------------ CLI shape


COMMANDS = ["up", "down", "ps", "logs", "stats", "doctor", "new", "tools"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "--root" in result.output


def test_logs_needs_exactly_one_target(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["logs", "--root", str(tmp_path)])
    assert result.exit_code != 0
    assert "name one Pack, or pass --nats or --broker" in result.output
    result = CliRunner().invoke(app, ["logs", "default", "--nats", "--root", str(tmp_path)])
    assert result.exit_code != 0


def test_broker_log_without_a_broker_is_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["logs", "--broker", "--root", str(tmp_path)])
    assert result.exit_code == 3  # environment missing: no broker has run here (docs/cli.md)
    assert result.output.count("\n") == 1 and "rumi up" in result.output


def test_up_refuses_a_configured_nats_url(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path / "ws")
    init_workspace(ws)
    ws.config_file.write_text(json.dumps({"nats_url": "nats://127.0.0.1:4222"}))
    # No engine is asked: the check comes first. A fake client proves it.
    rt = DockerRuntime(ws, client=object())
    with pytest.raises(RuntimeSetupError, match="remove nats_url"):
        rt.up(build=False)


@pytest.mark.parametrize("cpus", [0.01, 0.1, 0.25, 0.5, 1.0, 2.0, 2.5, 4.0, 256.0])
def test_cpu_limit_keeps_the_average_and_fits_the_start_up(cpus: float) -> None:
    from broker.containers.settings import STARTUP_CPU_US, cpu_limits

    limits = cpu_limits(cpus)
    period, quota = limits["cpu_period"], limits["cpu_quota"]
    assert 100_000 <= period <= 1_000_000  # Docker's default period .. the kernel's longest
    assert quota / period == pytest.approx(cpus, rel=1e-3)  # the average is what was configured
    # A start-up of STARTUP_CPU_US runs in one period wherever the longest period allows it.
    assert quota >= STARTUP_CPU_US or period == 1_000_000


@pytest.mark.parametrize("config", [{"cpus": 0}, {"cpus": -1}, {"packs": {"a": {"cpus": 0}}}, {"cpus": 1000}])
def test_a_cpu_limit_that_would_mean_no_limit_is_refused(tmp_path: Path, config: dict[str, Any]) -> None:
    ws = Workspace.at(tmp_path / "ws")
    init_workspace(ws)
    ws.config_file.write_text(json.dumps(config))
    result = CliRunner().invoke(app, ["up", "--root", str(ws.root)])
    assert result.exit_code != 0 and "cpus" in result.output and "Traceback" not in result.output
    assert result.output.count("\n") == 1, result.output


def test_doctor_without_workspace_fails_with_what_to_do(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["doctor", "--root", str(tmp_path / "nothing")])
    assert result.exit_code == 1
    assert "FAIL workspace" in result.output and "rumi init" in result.output


# ------------------------------------------------------------------------------------ host guard


def _need_root_and_iptables() -> None:
    why = None
    if os.geteuid() != 0:
        why = "the host guard needs root"
    elif shutil.which("iptables") is None and not Path("/usr/sbin/iptables").exists():
        why = "iptables is not installed"
    if why is not None:
        skip_unless_ci(why)


@pytest.fixture
def scratch_bridge() -> Iterator[str]:
    """A bridge interface of our own (no address, no member), removed afterwards."""
    _need_root_and_iptables()
    name = "rumi-" + secrets.token_hex(5)
    subprocess.run(["ip", "link", "add", name, "type", "bridge"], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "link", "del", name], check=False)


def test_guard_install_is_idempotent_and_removal_is_exact(scratch_bridge: str) -> None:
    ours, theirs = secrets.token_hex(5), secrets.token_hex(5)
    try:
        first = _guard.install_guard(scratch_bridge, ours)
        again = _guard.install_guard(scratch_bridge, ours)
        assert first.active and again.active
        _guard.install_guard(scratch_bridge, theirs)
        rules = subprocess.run(["iptables", "-S", "INPUT"], capture_output=True, text=True, check=True).stdout
        assert rules.count(f"rumi-guard:{ours}") == 1, "a second install must not add a second rule"
        assert Path(f"/proc/sys/net/ipv6/conf/{scratch_bridge}/disable_ipv6").read_text().strip() == "1"
        assert _guard.guarded_bridges(ours) == [scratch_bridge]
        assert _guard.remove_workspace_guard(ours) == [scratch_bridge]
        after = _guard.bridge_guard_status(scratch_bridge, ours)
        assert not after.ipv4_drop and not after.ipv6_drop
        # The other workspace's rule on the same bridge is untouched.
        assert _guard.bridge_guard_status(scratch_bridge, theirs).active
    finally:
        _guard.remove_workspace_guard(ours)
        _guard.remove_workspace_guard(theirs)
    rules = subprocess.run(["iptables", "-S", "INPUT"], capture_output=True, text=True, check=True).stdout
    assert ours not in rules and theirs not in rules


# ------------------------------------------------------------------------------------- engine


def _engine() -> Any:
    """A Docker client (and root, for the guard), or skip (fail under CI) with what to do."""
    # Removing images can take a while on a busy engine: a generous read timeout.
    client = docker_engine(timeout=300)
    _need_root_and_iptables()
    return client

_say = say

@dataclass
class Images:
    client: Any
    prefix: str
    sizes: dict[str, int] = field(default_factory=dict)


@pytest.fixture(scope="module")
def images(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Images]:
    """NATS, base, sandbox and the example Pack's image under a fresh prefix; removed afterwards."""
    from broker.containers import images as _images
    from broker.containers.packimage import build_pack_image

    client = _engine()
    prefix = f"rumi-rt{secrets.token_hex(4)}"
    log: list[str] = []
    scratch = Workspace.at(tmp_path_factory.mktemp("imgws") / "ws")
    init_workspace(scratch)
    try:
        started = time.monotonic()
        _images.build_nats_image(client, prefix, log.append)
        _images.build_base_image(client, prefix, log.append)
        _images.build_sandbox_image(client, prefix, log.append)
        pack_tag = build_pack_image(client, scratch, "default", prefix=prefix, progress=log.append)
        sizes = _images.image_sizes(client, prefix)
        sizes["pack-default"] = int(client.images.get(pack_tag).attrs["Size"])
        _say(
            pytestconfig,
            f"\nimages {prefix} built in {time.monotonic() - started:.1f} s: "
            + ", ".join(f"{k} {v / MB:.1f} MB" for k, v in sorted(sizes.items())),
        )
        yield Images(client, prefix, sizes)
    except Exception:
        _say(pytestconfig, "\n".join(log[-30:]))
        raise
    finally:
        _images.remove_images(client, prefix)
        client.close()


def _workspace(root: Path) -> Workspace:
    ws = Workspace.at(root)
    init_workspace(ws)
    config = json.loads(ws.config_file.read_text())
    config["nats_port"] = free_port()
    ws.config_file.write_text(json.dumps(config))
    return ws


def _leftovers(client: Any, tag: str) -> list[str]:
    wanted = {"label": [f"io.rumi.workspace={tag}"]}
    found = [f"container {c.name}" for c in client.containers.list(all=True, filters=wanted)]
    found += [f"network {n.name}" for n in client.networks.list(filters=wanted)]
    found += [f"guard {b}" for b in _guard.guarded_bridges(tag)]
    return found


@pytest.mark.docker
def test_100_pack_networks_from_the_pool(images: Images, tmp_path: Path, pytestconfig: pytest.Config) -> None:
    ws = _workspace(tmp_path / "ws")
    rt = DockerRuntime(ws, images.client, prefix=images.prefix)
    try:
        started = time.monotonic()
        nets = [rt.ensure_pack_network(f"p{i}") for i in range(100)]
        created = time.monotonic() - started
        for net in nets[:10]:
            _guard.install_guard(net.bridge, rt.tag)
        subnets = [N(n.subnet) for n in nets]
        assert len(set(subnets)) == 100
        pool = N(ws.load_config().network_pool)
        assert all(s.subnet_of(pool) and s.prefixlen == 28 for s in subnets)
        assert len({n.bridge for n in nets}) == 100 and all(_guard.BRIDGE_RE.match(n.bridge) for n in nets)
        # Reused, not re-created, on a second call.
        assert rt.ensure_pack_network("p7") == nets[7]
        attrs = images.client.networks.get(nets[0].id).attrs
        assert attrs["Internal"] is True
        assert attrs["Options"]["com.docker.network.bridge.inhibit_ipv4"] == "true"
        assert attrs["Options"]["com.docker.network.bridge.enable_ip_masquerade"] == "false"
        assert attrs["IPAM"]["Config"][0]["AuxiliaryAddresses"] == {"rumi-dns-sink": nets[0].dns_sink}
    finally:
        began = time.monotonic()
        rt.down()
        removed = time.monotonic() - began
    assert _leftovers(images.client, rt.tag) == []
    _say(pytestconfig, f"\n100 Pack networks: created in {created:.1f} s, removed in {removed:.1f} s")


def _cli(runner: CliRunner, *args: str) -> Any:
    result = runner.invoke(app, list(args), catch_exceptions=False)
    return result


@pytest.mark.docker
def test_up_ps_stats_logs_call_doctor_down(images: Images, tmp_path: Path, pytestconfig: pytest.Config) -> None:
    ws = _workspace(tmp_path / "ws")
    root = str(ws.root)
    tag = workspace_tag(ws)
    runner = CliRunner()
    env = {"RUMI_IMAGE_PREFIX": images.prefix}
    try:
        began = time.monotonic()
        up = runner.invoke(app, ["up", "--root", root, "--no-build"], env=env, catch_exceptions=False)
        assert up.exit_code == 0, up.output
        up_seconds = time.monotonic() - began
        # Up means the Pack's SDK said "ready" on rumi.pack.default.status.
        cold = [ln for ln in up.output.splitlines() if "pack default: created → started → ready (" in ln]
        assert cold, up.output

        ps = runner.invoke(app, ["ps", "--root", root, "--json"])
        assert ps.exit_code == 0, ps.output
        status = json.loads(ps.output)
        roles = {c["role"]: c for c in status["containers"]}
        # Ready by its own heartbeat; Docker's rare healthcheck may not have run yet.
        pack = roles["pack"]
        assert pack["heartbeat"] in ("ready", "alive") and pack["name"] == f"{images.prefix}-pack-default"
        assert pack["heartbeat_age"] <= pack["heartbeat_stale_after"] and pack["health"] in ("starting", "healthy")
        assert roles["nats"]["state"] == "running"
        assert roles["nats"]["ports"] == [f"127.0.0.1:{ws.load_config().nats_port}->4222/tcp"]
        pack_nets = [n for n in status["networks"] if n["role"] == "pack-network"]
        assert [n["guard"] for n in pack_nets] == ["active"] and pack_nets[0]["internal"] is True
        assert status["broker_pid"] and status["nats_url"] == f"nats://127.0.0.1:{ws.load_config().nats_port}"
        human = runner.invoke(app, ["ps", "--root", root])
        pack_row = next(ln for ln in human.output.splitlines() if ln.startswith(f"{images.prefix}-pack-default"))
        assert human.exit_code == 0 and ("ready" in pack_row or "alive" in pack_row) and "s ago" in pack_row
        assert "active" in human.output

        stats = runner.invoke(app, ["stats", "--root", root, "--json"])
        assert stats.exit_code == 0, stats.output
        mem = {s["role"]: s for s in json.loads(stats.output)}
        assert 0 < mem["pack"]["memory_bytes"] < mem["pack"]["memory_limit"] == 128 * 1024 * 1024
        assert mem["nats"]["memory_bytes"] > 0

        logs = runner.invoke(app, ["logs", "default", "--root", root, "--tail", "20"])
        assert logs.exit_code == 0 and "serving default:tool:my_tool" in logs.output
        assert runner.invoke(app, ["logs", "--nats", "--root", root]).output.count("Server is ready") == 1
        assert "rumi broker: serving" in runner.invoke(app, ["logs", "--broker", "--root", root]).output
        missing = runner.invoke(app, ["logs", "nosuchpack", "--root", root])
        assert missing.exit_code == 3 and missing.output.count("\n") == 1  # environment missing
        assert "has no container in this workspace" in missing.output

        call = runner.invoke(app, ["call", "default:tool:my_tool", '{"note": "from a container"}', "--root", root,
                                   "--timeout", "30"])
        assert call.exit_code == 0, call.output
        result = json.loads(call.output)
        outcome = {a["attempt"]: a for a in result["attempts"]}
        assert outcome["write a file in its sandbox"]["outcome"] == "allowed"
        assert outcome["read it back"]["detail"] == "from a container"
        assert outcome["read /etc/passwd"]["code"] == "permission_denied"
        assert outcome["escape with ../ to the broker's credentials"]["code"] == "permission_denied"
        assert outcome["read an ungranted key HOME"]["code"] == "permission_denied"
        assert outcome["GET the cloud metadata address"]["code"] == "permission_denied"
        # The broker wrote through the grant into the sandbox the container has mounted.
        assert (ws.pack_work_area("default") / "hello.txt").read_text() == "from a container"

        doctor = runner.invoke(app, ["doctor", "--root", root], env=env)
        assert doctor.exit_code == 0, doctor.output
        assert "\nFAIL" not in doctor.output and "OK   guard default" in doctor.output
        # Take the guard away: doctor says so and fails; --fix puts it back.
        bridge = pack_nets[0]["bridge"]
        _guard.remove_guard(bridge, tag)
        broken = runner.invoke(app, ["doctor", "--root", root], env=env)
        assert broken.exit_code == 1 and "FAIL guard default" in broken.output and "--fix" in broken.output
        fixed = runner.invoke(app, ["doctor", "--root", root, "--fix"], env=env)
        assert fixed.exit_code == 0, fixed.output
        assert _guard.bridge_guard_status(bridge, tag).active

        # A second `up` keeps the running Pack (same settings), it does not restart it.
        again = runner.invoke(app, ["up", "--root", root, "--no-build"], env=env)
        assert again.exit_code == 0 and "already running" in again.output, again.output

        _say(
            pytestconfig,
            f"\nrumi up (images built) {up_seconds:.1f} s; {cold[0].strip()}; idle memory: "
            + ", ".join(f"{s['name']} {s['memory_bytes'] / 2**20:.1f} MiB" for s in json.loads(stats.output)),
        )
    finally:
        down = runner.invoke(app, ["down", "--root", root])
    assert down.exit_code == 0, down.output
    assert "removed broker" in down.output
    assert _leftovers(images.client, tag) == []
    assert not (ws.state / "broker.pid").exists() and not (ws.state / "nats.url").exists()
    second = runner.invoke(app, ["down", "--root", root])
    assert second.exit_code == 0 and "Nothing was running" in second.output


@pytest.mark.docker
def test_up_without_images_says_to_build(images: Images, tmp_path: Path) -> None:
    ws = _workspace(tmp_path / "ws")
    runner = CliRunner()
    result = runner.invoke(app, ["up", "--root", str(ws.root), "--no-build", "--prefix", "rumi-nosuchprefix"])
    assert result.exit_code == 3  # environment missing: an image is not built (docs/cli.md)
    assert "missing" in result.output and "rumi build" in result.output
    assert _leftovers(images.client, workspace_tag(ws)) == []
