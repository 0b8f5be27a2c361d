"""docker/docker-compose.yml: generated from the runtime's own container settings; the seed's workflow.

The engine tests need a Docker engine and Debian's ``docker-compose`` (1.29); without them they skip, except
under CI (``CI=true``) where that is a failure. They build under a fresh image prefix, run Compose with a
fresh project name (``rumi-test-<random>``), a free NATS port and a free network pool, and remove every
container, network and image they made.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from broker.admin.init import init_workspace
from broker.containers import compose, images
from broker.containers.engine import DockerRuntime
from broker.containers.settings import pack_uid
from broker.core.errors import WorkspaceError
from broker.core.labels import LABEL_PREFIX, workspace_tag
from broker.core.net import free_port
from broker.core.workspace import RumiConfig, Workspace
from tests._skip import skip_unless_ci

from .conftest import docker_engine, say

REPO = Path(__file__).resolve().parents[1]


def _yaml() -> Any:
    return pytest.importorskip("yaml", reason="PyYAML is needed to read the Compose file back")


def _config(ws: Workspace, **changes: Any) -> None:
    cfg = json.loads(ws.config_file.read_text())
    cfg.update(changes)
    ws.config_file.write_text(json.dumps(cfg))


# ------------------------------------------------------------------------------ no engine needed


def test_networks_are_deterministic_distinct_and_inside_the_pool() -> None:
    cfg = RumiConfig(network_pool="10.213.0.0/16", network_prefix_length=28)
    packs = ["default", "other", "a", "b-c", "zeta_9"]
    nets = compose.compose_networks(cfg, packs, "tag")
    assert nets == compose.compose_networks(cfg, list(reversed(packs)), "tag")
    pool = ipaddress.IPv4Network("10.213.0.0/16")
    assert (
        nets["control"].subnet == ipaddress.IPv4Network("10.213.255.240/28") and not nets["control"].internal
    )
    subnets = [n.subnet for n in nets.values()]
    assert len(set(subnets)) == len(subnets)
    for pack_id in packs:
        net = nets[f"pack-{pack_id}"]
        assert net.internal and net.subnet.subnet_of(pool) and net.subnet.prefixlen == 28
        # The upper half: `rumi up` allocates from the bottom of the same pool.
        assert int(net.subnet.network_address) >= int(pool.network_address) + pool.num_addresses // 2
        assert net.nats_ip == str(net.subnet[2]) and net.pack_ip == str(net.subnet[3])
        assert net.bridge.startswith("rumi-") and len(net.bridge) <= 15
    assert len({n.bridge for n in nets.values()}) == len(nets)


def test_adding_a_pack_leaves_the_others_subnets() -> None:
    cfg = RumiConfig()
    before = compose.compose_networks(cfg, ["default", "other"])
    after = compose.compose_networks(cfg, ["default", "other", "aaa", "new"])
    for key, net in before.items():
        assert after[key].subnet == net.subnet


def test_small_pool_fills_every_slot_without_overlap() -> None:
    cfg = RumiConfig(network_pool="10.9.0.0/26", network_prefix_length=29)  # 8 subnets
    packs = [f"p{i}" for i in range(7)]
    nets = compose.compose_networks(cfg, packs)
    assert len({n.subnet for n in nets.values()}) == 8


@pytest.mark.parametrize(
    ("pool", "plen", "packs", "message"),
    [
        ("10.9.0.0/26", 29, [f"p{i}" for i in range(8)], "subnets and 9 are needed"),
        ("10.9.0.0/16", 30, ["a"], "between the pool"),
        ("10.9.0.0/16", 15, ["a"], "between the pool"),
        ("10.9.0.1/16", 28, ["a"], "not a network"),
        ("fd00::/64", 120, ["a"], "IPv4"),
        ("banana", 28, ["a"], "not a network"),
    ],
)
def test_network_config_errors(pool: str, plen: int, packs: list[str], message: str) -> None:
    cfg = RumiConfig(network_pool=pool, network_prefix_length=plen)
    with pytest.raises(compose.ComposeError, match=message):
        compose.compose_networks(cfg, packs)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"cpu_period": 500_000, "cpu_quota": 250_000}, {"cpu_period": 500_000, "cpu_quota": 250_000}),
        ({"restart_policy": {"Name": "on-failure", "MaximumRetryCount": 5}}, {"restart": "on-failure:5"}),
        (
            {"restart_policy": {"Name": "unless-stopped", "MaximumRetryCount": 0}},
            {"restart": "unless-stopped"},
        ),
        ({"ipc_mode": "private"}, {"ipc": "private"}),
        ({"tmpfs": {"/tmp": "rw,size=1m"}}, {"tmpfs": ["/tmp:rw,size=1m"]}),
        ({"volumes": {"/a": {"bind": "/b", "mode": "ro"}}}, {"volumes": ["/a:/b:ro"]}),
        ({"ports": {"4222/tcp": ("127.0.0.1", 4999)}}, {"ports": ["127.0.0.1:4999:4222"]}),
        (
            {
                "healthcheck": {
                    "test": ["CMD", "x"],
                    "interval": 2_000_000_000,
                    "timeout": 500_000_000,
                    "retries": 3,
                }
            },
            {"healthcheck": {"test": ["CMD", "x"], "interval": "2s", "timeout": "500ms", "retries": 3}},
        ),
        (
            {"log_config": {"Type": "json-file", "Config": {"max-size": "10m"}}},
            {"logging": {"driver": "json-file", "options": {"max-size": "10m"}}},
        ),
        (
            {"labels": {"io.rumi.role": "pack", "x": "y"}},
            {"labels": {"io.rumi.role": "compose-pack", "x": "y"}},
        ),
        ({"name": "rumi-pack-x", "network": "n", "detach": True}, {}),
        ({"environment": {"A": 1}}, {"environment": {"A": "1"}}),
    ],
)
def test_compose_service_conversion(settings: dict[str, Any], expected: dict[str, Any]) -> None:
    service = compose.compose_service(settings, {"n": {}})
    assert service == {**expected, "networks": {"n": {}}}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"oom_kill_disable": True}, "oom_kill_disable"),
        ({"ports": {"4222/tcp": 4222}}, "127.0.0.1 only"),
        ({"volumes": {"relative": {"bind": "/b", "mode": "ro"}}}, "absolute"),
        ({"volumes": {"/a:b": {"bind": "/b", "mode": "ro"}}}, "absolute"),
        ({"healthcheck": {"test": ["CMD", "x"], "shell": "sh"}}, "shell"),
    ],
)
def test_compose_service_refuses_what_it_cannot_express(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(compose.ComposeError, match=message):
        compose.compose_service(settings, {})


@pytest.mark.parametrize(
    "value",
    [
        "no",
        "on",
        "yes",
        "off",
        "0755",
        "1e3",
        "null",
        "~",
        "a: b",
        "#x",
        "- y",
        "line\nbreak",
        'q"uote',
        "ü",
        "",
        "*alias",
        "&anchor",
        "!tag",
        "{a}",
        "[b]",
        "%x",
        "@x",
        "`x",
    ],
)
def test_yaml_strings_stay_strings(value: str) -> None:
    yaml = _yaml()
    doc = {"k": value, "list": [value, {"inner": value}], value or "empty": [1, True, None, 0.5]}
    assert yaml.safe_load(compose.to_yaml(doc)) == doc


def _settings(ws: Workspace, pack_id: str, prefix: str = "rumi") -> dict[str, Any]:
    """The docker SDK settings `rumi up` would use for this Pack (on the Compose network)."""
    cfg = ws.load_config()
    net = compose.compose_networks(cfg, ws.pack_ids(), workspace_tag(ws))[f"pack-{pack_id}"]
    from broker.containers.packimage import pack_image_tag

    return DockerRuntime(ws, prefix=prefix).pack_settings(
        pack_id, pack_image_tag(pack_id, prefix), net.runtime_network(), cfg
    )


def test_rendered_pack_service_is_the_runtime_settings(ws: Workspace) -> None:
    yaml = _yaml()
    doc = yaml.safe_load(compose.render_compose(ws))
    assert doc["version"] == "2.4"
    assert set(doc["services"]) == {"nats", "pack-default", "pack-other"}
    service = doc["services"]["pack-default"]
    settings = _settings(ws, "default")
    assert service["image"] == settings["image"] == "rumi-pack-default:latest"
    assert service["user"] == settings["user"] == f"{pack_uid('default')}:{pack_uid('default')}"
    for key in (
        "read_only",
        "cap_drop",
        "security_opt",
        "mem_limit",
        "memswap_limit",
        "pids_limit",
        "cpu_shares",
        "cpu_period",
        "cpu_quota",
        "dns",
        "dns_opt",
        "dns_search",
        "stop_signal",
        "init",
    ):
        assert service[key] == settings[key], key
    assert service["cap_drop"] == ["ALL"] and service["read_only"] is True
    assert "cpus" not in service  # the limit is cpu_quota over cpu_period (settings.cpu_limits)
    assert service["ipc"] == settings["ipc_mode"]
    assert service["environment"] == settings["environment"]
    assert service["tmpfs"] == [f"{k}:{v}" for k, v in settings["tmpfs"].items()]
    assert service["healthcheck"]["test"] == settings["healthcheck"]["test"]
    assert service["restart"] == "on-failure:5"
    assert sorted(service["volumes"]) == sorted(
        f"{k}:{v['bind']}:{v['mode']}" for k, v in settings["volumes"].items()
    )
    assert service["build"] == {"context": "packs/default", "dockerfile": "Dockerfile"}
    assert service["depends_on"] == ["nats"]
    # Only its own network, at a fixed address; NATS by address on that network.
    assert list(service["networks"]) == ["pack-default"]
    net = doc["networks"]["pack-default"]
    subnet = ipaddress.IPv4Network(net["ipam"]["config"][0]["subnet"])
    assert service["networks"]["pack-default"]["ipv4_address"] == str(subnet[3])
    assert service["environment"]["RUMI_NATS_URL"] == f"nats://{subnet[2]}:4222"
    assert "ports" not in service and "privileged" not in service and "cap_add" not in service


def test_rendered_networks_and_nats(ws: Workspace) -> None:
    yaml = _yaml()
    _config(ws, nats_port=4999)
    doc = yaml.safe_load(compose.render_compose(ws))
    nats = doc["services"]["nats"]
    assert nats["ports"] == ["127.0.0.1:4999:4222"]
    assert nats["user"] == "65534:65534" and nats["read_only"] is True and nats["cap_drop"] == ["ALL"]
    assert "build" not in nats
    assert set(nats["networks"]) == {"control", "pack-default", "pack-other"}
    for key in ("pack-default", "pack-other"):
        net = doc["networks"][key]
        assert net["internal"] is True
        assert net["driver_opts"]["com.docker.network.bridge.inhibit_ipv4"] == "true"
        assert net["driver_opts"]["com.docker.network.bridge.enable_ip_masquerade"] == "false"
        subnet = ipaddress.IPv4Network(net["ipam"]["config"][0]["subnet"])
        assert nats["networks"][key]["ipv4_address"] == str(subnet[2])
        assert net["ipam"]["config"][0]["aux_addresses"]["rumi-dns-sink"] == doc["services"][key]["dns"][0]
        assert net["labels"]["io.rumi.pack"] == key[5:]
    assert "internal" not in doc["networks"]["control"]
    # A Pack is never on another Pack's network.
    assert list(doc["services"]["pack-other"]["networks"]) == ["pack-other"]


def test_render_subset_and_unknown_pack(ws: Workspace) -> None:
    yaml = _yaml()
    doc = yaml.safe_load(compose.render_compose(ws, ["other"]))
    assert set(doc["services"]) == {"nats", "pack-other"}
    with pytest.raises(WorkspaceError, match="no Pack 'nope'"):
        compose.render_compose(ws, ["nope"])


def test_write_compose_writes_contexts_creds_and_config(ws: Workspace) -> None:
    target = compose.write_compose(ws, libc="glibc 2.36")
    assert target == ws.docker / "docker-compose.yml"
    assert target.read_text().startswith("# Generated by rumi")
    for pack_id in ("default", "other"):
        context = ws.packs / pack_id
        assert (context / "Dockerfile").is_file() and (context / "app" / "main.py").is_file()
        creds = ws.state / "packcreds" / pack_id / f"{pack_id}.nk"
        assert creds.read_bytes().startswith(b"SU")
        if os.geteuid() == 0:
            assert creds.stat().st_uid == pack_uid(pack_id) and creds.stat().st_mode & 0o777 == 0o400
    conf = (ws.state / "nats" / "nats.conf").read_text()
    assert 'listen: "0.0.0.0:4222"' in conf and "PACK_default" in conf and "PACK_other" in conf
    assert (ws.base / "site-packages").is_dir() and (ws.base / "lib" / "pack_runtime").is_dir()
    # `rumi broker` and `rumi call` find the NATS the file publishes.
    assert ws.load_config().nats_url == "nats://127.0.0.1:4222"


def test_write_compose_records_the_published_nats_url(ws: Workspace) -> None:
    from broker.bus.server import nats_url

    _config(ws, nats_port=4999, nats_url="nats://10.0.0.9:4222")
    said: list[str] = []
    compose.write_compose(ws, libc="glibc 2.36", progress=said.append)
    assert ws.load_config().nats_url == nats_url(ws) == "nats://127.0.0.1:4999"
    assert any(
        "nats_url = nats://127.0.0.1:4999 (was nats://10.0.0.9:4222)" in m and "rumi broker" in m
        for m in said
    ), said
    said.clear()
    compose.write_compose(ws, libc="glibc 2.36", progress=said.append)
    assert not any("nats_url" in m for m in said), said  # unchanged: nothing to say


SHIPPED_CONFIG = REPO / "config" / "config.json"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # The shipped file: only the value changes, the layout (one-line objects) stays.
        (
            SHIPPED_CONFIG.read_text(),
            SHIPPED_CONFIG.read_text().replace('"nats_url": null', '"nats_url": "nats://127.0.0.1:4222"', 1),
        ),
        ('{"nats_port": 4222}\n', '{\n  "nats_url": "nats://127.0.0.1:4222", "nats_port": 4222}\n'),
        ('{\n  "nats_port": 1\n}', '{\n  "nats_url": "nats://127.0.0.1:4222",\n  "nats_port": 1\n}'),
        ("{}", '{\n  "nats_url": "nats://127.0.0.1:4222"}'),
        (
            '{"nats_url" : "nats://x:1" , "packs": {"nats_url": {}}}',
            '{"nats_url" : "nats://127.0.0.1:4222" , "packs": {"nats_url": {}}}',
        ),
        (
            '{"nats_url": "a", "nats_url": null}',
            '{"nats_url": "nats://127.0.0.1:4222", "nats_url": "nats://127.0.0.1:4222"}',
        ),
    ],
)
def test_record_nats_url_changes_only_that_value(ws: Workspace, text: str, expected: str) -> None:
    ws.config_file.write_text(text)
    os.chmod(ws.config_file, 0o640)
    before = json.loads(text).get("nats_url")
    assert compose.record_nats_url(ws, "nats://127.0.0.1:4222") == before
    assert ws.config_file.read_text() == expected
    assert json.loads(expected)["nats_url"] == "nats://127.0.0.1:4222"
    assert ws.config_file.stat().st_mode & 0o777 == 0o640
    assert compose.record_nats_url(ws, "nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"
    assert ws.config_file.read_text() == expected


def test_record_nats_url_refuses_a_broken_config(ws: Workspace) -> None:
    ws.config_file.write_text('{"nats_port": 4222,')
    with pytest.raises(WorkspaceError, match=r"docker/config\.json is not valid JSON"):
        compose.record_nats_url(ws, "nats://127.0.0.1:4222")
    assert ws.config_file.read_text() == '{"nats_port": 4222,'


def test_write_compose_refuses_while_an_embedded_server_runs(ws: Workspace) -> None:
    from broker.bus.server import pid_file

    pid_file(ws).write_text(f"{os.getpid()}\n")  # a live pid stands in for the embedded nats-server
    with pytest.raises(compose.ComposeError, match="stop `rumi broker` first"):
        compose.write_compose(ws, libc="glibc 2.36")
    assert not (ws.docker / "docker-compose.yml").exists() and ws.load_config().nats_url is None


def test_create_dockerfile_script(ws: Workspace) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, str(REPO / "create_dockerfile.py"), "--root", str(ws.root), "default"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"wrote {ws.packs / 'default' / 'Dockerfile'}" in done.stdout
    assert (ws.docker / "docker-compose.yml").is_file() and not (ws.packs / "other").exists()
    assert "then `rumi broker`" in done.stdout.splitlines()[-1]
    assert ws.load_config().nats_url == f"nats://127.0.0.1:{ws.load_config().nats_port}"
    bad = subprocess.run(
        [sys.executable, str(REPO / "create_dockerfile.py"), "--root", str(ws.root), "nope"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert bad.returncode == 1
    assert bad.stderr.strip().count("\n") == 0 and bad.stderr.startswith("error: no Pack 'nope'")


def test_cli_compose(ws: Workspace) -> None:
    import typer
    from typer.testing import CliRunner

    from broker.cli import build as _build

    app = typer.Typer()
    _build.register(app)
    result = CliRunner().invoke(app, ["compose", "--root", str(ws.root)])
    assert result.exit_code == 0, result.output
    assert f"wrote {ws.docker / 'docker-compose.yml'}" in result.output
    _config(ws, network_pool="nonsense")
    result = CliRunner().invoke(app, ["compose", "--root", str(ws.root)])
    assert result.exit_code != 0 and "error: docker/config.json: network_pool" in result.output


# ----------------------------------------------------------------------------------- engine


_engine = docker_engine


def _compose_binary() -> str:
    found = shutil.which("docker-compose")
    if found is None:
        message = "docker-compose is not installed (Debian: apt-get install -y docker-compose)"
        skip_unless_ci(message)
    return found


_say = say


def _free_pool(client: Any) -> str:
    """A /22 of 10.0.0.0/8 that no Docker network and no host route uses (the runtime's own allocator)."""
    from broker.containers.engine import _docker_subnets, allocate_subnet, host_routes

    start = 64 + secrets.randbelow(128)  # away from the default pool (10.213/16) and other tests' choices
    used = [*_docker_subnets(client), *host_routes()]
    return str(allocate_subnet(f"10.{start}.0.0/16", 22, used))


@dataclass
class Seed:
    client: Any
    prefix: str
    ws: Workspace
    project: str
    binary: str

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """docker-compose -p <project> -f docker/docker-compose.yml ARGS, from the workspace root."""
        # Debian's docker-compose runs on the system Python: keep this interpreter's paths out of it.
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        return subprocess.run(
            [self.binary, "-p", self.project, "-f", "docker/docker-compose.yml", *args],
            cwd=self.ws.root,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


@pytest.fixture(scope="module")
def seed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seed]:
    """The shared images under a fresh prefix and a workspace whose Compose file uses them."""
    client = _engine()
    binary = _compose_binary()
    prefix = f"rumi-tc{secrets.token_hex(4)}"
    ws = Workspace.at(tmp_path_factory.mktemp("compose") / "ws")
    init_workspace(ws)
    result = Seed(client, prefix, ws, f"rumi-test-{secrets.token_hex(4)}", binary)
    try:
        images.build_nats_image(client, prefix)
        images.build_base_image(client, prefix)
        _config(ws, nats_port=free_port(), network_pool=_free_pool(client), network_prefix_length=28)
        # The seed's first command (the README's), as the user runs it: from the workspace root.
        made = subprocess.run(
            [sys.executable, str(REPO / "create_dockerfile.py"), "--prefix", prefix],
            cwd=ws.root,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert made.returncode == 0, made.stderr[-3000:]
        yield result
    finally:
        result.run("down", "--volumes", "--remove-orphans", "--timeout", "5", timeout=120)
        project = {"label": f"com.docker.compose.project={result.project}"}
        for container in client.containers.list(all=True, filters=project):
            container.remove(force=True)
        for network in client.networks.list(filters=project):
            network.remove()
        images.remove_images(client, prefix)
        left = client.images.list(all=True, filters={"label": f"{LABEL_PREFIX}={prefix}"})
        client.close()
        assert not left, f"{len(left)} images with prefix {prefix} left"


async def _await_pack_status(ws: Workspace, pack_id: str, timeout: float) -> str:
    """The first status the Pack sends once NATS answers (its "ready", or a heartbeat); "" on timeout."""
    import nats

    from broker.bus.creds import ensure_identity
    from broker.core.protocol import decode_status, status_subject

    url = f"nats://127.0.0.1:{ws.load_config().nats_port}"
    seed = str(ensure_identity(ws, "cli").seed_path)
    deadline = time.monotonic() + timeout
    nc = None
    while nc is None:
        try:
            nc = await nats.connect(url, nkeys_seed=seed, inbox_prefix="_INBOX.cli", allow_reconnect=False,
                                    connect_timeout=2)  # fmt: skip
        except Exception:
            if time.monotonic() > deadline:
                return ""
            await asyncio.sleep(0.2)
    try:
        sub = await nc.subscribe(status_subject(pack_id))
        while time.monotonic() < deadline:
            try:
                msg = await sub.next_msg(timeout=max(deadline - time.monotonic(), 0.1))
            except Exception:
                continue
            heard = decode_status(msg.subject, msg.data, time.monotonic())
            if heard is not None:
                return heard.state
        return ""
    finally:
        await nc.close()


@pytest.mark.docker
def test_compose_config_is_valid(seed: Seed) -> None:
    done = seed.run("config", "-q")
    assert done.returncode == 0, done.stderr


@pytest.mark.docker
def test_seed_workflow_build_up_ps_logs_down(seed: Seed, pytestconfig: pytest.Config) -> None:
    started = time.monotonic()
    built = seed.run("build")
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-2000:]
    build_seconds = time.monotonic() - started
    image = seed.client.images.get(f"{seed.prefix}-pack-default:latest")
    assert image.labels.get("io.rumi.pack") == "default" and image.labels.get(LABEL_PREFIX) == seed.prefix

    up = seed.run("up", "-d", "pack-default")
    assert up.returncode == 0, up.stderr
    project = {"label": f"com.docker.compose.project={seed.project}"}
    # The ready signal: the Pack's status on rumi.pack.default.status, heard as `cli` on the published port.
    status = asyncio.run(_await_pack_status(seed.ws, "default", timeout=60))
    healthy_after = time.monotonic() - started - build_seconds
    found = [
        c
        for c in seed.client.containers.list(all=True, filters=project)
        if c.labels.get("com.docker.compose.service") == "pack-default"
    ]
    logs = seed.run("logs", "--no-color", "pack-default")
    assert status in ("ready", "alive"), f"pack-default is {status or 'silent'}:\n{logs.stdout[-3000:]}"
    _say(
        pytestconfig,
        f"\ncompose: build {build_seconds:.1f}s, pack-default {status} {healthy_after:.1f}s after up",
    )
    assert "serving default:tool:my_tool" in logs.stdout

    # Docker's own healthcheck is configured, and what its probe runs passes (its first probe comes
    # one interval, minutes, after the start: until then `ps` says "health: starting").
    ps = seed.run("ps")
    assert ps.returncode == 0 and "pack-default" in ps.stdout and "Up" in ps.stdout, ps.stdout
    assert "healthy" in ps.stdout or "health: starting" in ps.stdout, ps.stdout
    found[0].reload()
    probe = found[0].exec_run(found[0].attrs["Config"]["Healthcheck"]["Test"][1:])
    assert probe.exit_code == 0, probe.output

    # What Compose made is what `rumi up` would make.
    pack = found[0]
    host = pack.attrs["HostConfig"]
    settings = _settings(seed.ws, "default", seed.prefix)
    assert host["CapDrop"] == ["ALL"] and host["ReadonlyRootfs"] is True
    assert host["SecurityOpt"] == settings["security_opt"]
    assert host["Memory"] == host["MemorySwap"] == 128 * 1024 * 1024
    assert host["CpuPeriod"] == settings["cpu_period"] and host["CpuQuota"] == settings["cpu_quota"]
    assert host["PidsLimit"] == settings["pids_limit"]
    assert host["Tmpfs"] == settings["tmpfs"] and host["Dns"] == settings["dns"]
    assert host["RestartPolicy"] == settings["restart_policy"]
    assert pack.attrs["Config"]["User"] == settings["user"]
    assert sorted(host["Binds"]) == sorted(
        f"{k}:{v['bind']}:{v['mode']}" for k, v in settings["volumes"].items()
    )
    assert list(pack.attrs["NetworkSettings"]["Networks"]) == [f"{seed.project}_pack-default"]
    network = seed.client.networks.get(f"{seed.project}_pack-default")
    assert network.attrs["Internal"] is True
    assert network.attrs["Labels"]["io.rumi.workspace"] == workspace_tag(seed.ws)

    down = seed.run("down", "--timeout", "5")
    assert down.returncode == 0, down.stderr
    assert not seed.client.containers.list(all=True, filters=project)


def _rumi(*args: str) -> list[str]:
    """`rumi ARGS`: the console script of this installation."""
    return [str(Path(sys.executable).parent / "rumi"), *args]


@pytest.mark.docker
def test_seed_commands_then_rumi_call(seed: Seed, pytestconfig: pytest.Config) -> None:
    """The README's seed workflow, command for command, ends in a working `rumi call`.

    `python create_dockerfile.py` (the fixture; `rumi build`'s base images too), then `docker-compose …
    build`, `… up -d`, `rumi broker` and `rumi call default:tool:my_tool`, each from the workspace root.
    """
    ws = seed.ws
    assert ws.load_config().nats_url == f"nats://127.0.0.1:{ws.load_config().nats_port}"
    assert seed.run("build").returncode == 0
    started = time.monotonic()
    up = seed.run("up", "-d")
    assert up.returncode == 0, up.stderr
    status = asyncio.run(_await_pack_status(ws, "default", timeout=60))
    assert status in ("ready", "alive"), seed.run("logs", "--no-color").stdout[-3000:]
    log = ws.root / "broker.out"
    with open(log, "wb") as out:
        broker = subprocess.Popen(
            _rumi("broker"), cwd=ws.root, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        deadline = time.monotonic() + 60
        while "rumi broker: serving" not in log.read_text(errors="replace"):
            assert broker.poll() is None, (
                f"rumi broker exited {broker.returncode}:\n{log.read_text()[-3000:]}"
            )
            assert time.monotonic() < deadline, f"rumi broker not serving:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        # It serves the Compose file's NATS: no nats-server of its own.
        assert "embedded nats-server" not in log.read_text()
        called = subprocess.run(
            _rumi("call", "default:tool:my_tool", '{"note": "via compose"}', "--timeout", "90"),
            cwd=ws.root,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
        assert called.returncode == 0, called.stderr
        working = time.monotonic() - started
        rows = {row["attempt"]: row for row in json.loads(called.stdout)["attempts"]}
        # The broker on the host answered: allowed where granted, denied where not.
        assert rows["write a file in its sandbox"]["outcome"] == "allowed", rows
        assert rows["read it back"] == {**rows["read it back"], "outcome": "allowed", "detail": "via compose"}
        assert rows["read /etc/passwd"]["outcome"] == "denied", rows
        assert rows["escape with ../ to the broker's credentials"]["outcome"] == "denied", rows
        assert (ws.pack_work_area("default") / "hello.txt").read_text() == "via compose"
        verified = subprocess.run(
            _rumi("audit", "verify"), cwd=ws.root, capture_output=True, text=True, timeout=120, check=False
        )
        assert verified.returncode == 0, verified.stdout + verified.stderr
        _say(pytestconfig, f"\ncompose: `up -d` to a served `rumi call` in {working:.1f}s")
    finally:
        broker.send_signal(signal.SIGTERM)
        try:
            broker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            broker.kill()
            broker.wait()
        seed.run("down", "--timeout", "5")
    assert broker.returncode == 0, log.read_text()[-3000:]
