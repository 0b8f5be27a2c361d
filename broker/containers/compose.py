"""``docker/docker-compose.yml``: the same NATS and Pack containers as ``rumi up``, for Compose users.

Compose file format ``2.4``: docker-compose 1.29 and ``docker compose`` v2 both read it, and it is the last
format with ``mem_limit``, ``memswap_limit``, ``cpus`` and ``pids_limit`` outside swarm's ``deploy:``.

Nothing about a container is decided here. Both services are converted, key by key through one table
(``compose_service``), from the docker SDK settings ``rumi up`` itself uses:

* ``pack-<id>``: ``DockerRuntime.pack_settings`` = ``broker.containers.settings.pack_container_settings`` (the one
  place a Pack's confinement is decided) plus the runtime's DNS sink; ``build:`` points at
  ``docker/packs/<id>/``;
* ``nats``: the runtime's NATS settings (config directory ``docker/.rumi/nats`` and the JetStream directory
  mounted whole at their host paths, client port on 127.0.0.1 only).

A settings key the table does not know is an error: new hardening can never be dropped silently.
The credentials directories, the NATS config and the sandboxes are prepared by the runtime's own code too,
so ``rumi up`` and ``docker-compose up`` of one workspace use the same files (never both at once: they
would publish the same port).

Networks: ``control`` (NATS's plain bridge) and one ``internal: true`` network per Pack holding only that
Pack and ``nats``, with the runtime's bridge options (no host address on a Pack bridge, no masquerade)
and its reserved DNS-sink address. Subnets are fixed in the file, from ``network_pool`` /
``network_prefix_length``: ``control`` takes the pool's last subnet; each Pack a slot in the pool's upper
half chosen by a hash of its id (linear probing), so adding a Pack leaves the others' subnets alone, and
``rumi up`` (which takes the first free subnets from the bottom) does not collide with them. In a Pack
subnet the gateway is host 1 (reserved, not on the bridge), nats host 2, the Pack host 3.

The broker stays on the host (it reaches whatever a grant names on the host file system, and the Docker
engine for the terminal sandbox): ``write_compose`` records the URL of this NATS (``nats://127.0.0.1:<nats_port>``)
as ``nats_url`` in docker/config.json, so ``rumi broker`` connects to it instead of starting its own
nats-server, and ``rumi call`` finds it.

Roles are labelled ``compose-<role>``: ``rumi ps`` / ``rumi down`` manage ``rumi up``'s containers, Compose
manages its own. Scalars are written as JSON (valid YAML): no YAML 1.1 surprise (``no``, ``on``, ``0755``).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.containers.engine import DockerRuntime, PackNetwork, bridge_name
from broker.containers.images import Progress, image_tag
from broker.containers.packimage import (
    DEFAULT_LIBC,
    image_libc,
    pack_image_tag,
    stage_base_context,
    write_pack_dockerfile,
)
from broker.core.atomic import write_atomic
from broker.core.docker_client import docker_client
from broker.core.errors import RumiError, WorkspaceError
from broker.core.labels import DEFAULT_PREFIX, LABEL_ROLE, labels, workspace_tag
from broker.core.workspace import RumiConfig, Workspace

__all__ = [
    "COMPOSE_VERSION",
    "ComposeError",
    "ComposeNetwork",
    "compose_file",
    "compose_nats_url",
    "compose_networks",
    "compose_service",
    "record_nats_url",
    "render_compose",
    "to_yaml",
    "write_compose",
]

COMPOSE_VERSION = "2.4"
DNS_SINK_NAME = "rumi-dns-sink"


class ComposeError(RumiError):
    """The Compose file cannot be generated; the message says what to change."""


def compose_file(ws: Workspace) -> Path:
    """``docker/docker-compose.yml``."""
    return ws.docker / "docker-compose.yml"


# ---------------------------------------------------------------------------------- networks


@dataclass(frozen=True)
class ComposeNetwork:
    """One network of the Compose file: its key, subnet and bridge; for a Pack, its fixed addresses."""

    name: str
    subnet: ipaddress.IPv4Network
    bridge: str
    pack_id: str | None = None

    @property
    def internal(self) -> bool:
        """Pack networks are internal (no route out); ``control`` is a plain bridge."""
        return self.pack_id is not None

    @property
    def nats_ip(self) -> str:
        """nats's address here (host 2, as ``rumi up`` uses)."""
        return str(self.subnet[2])

    @property
    def pack_ip(self) -> str:
        """The Pack's address here (host 3)."""
        return str(self.subnet[3])

    def runtime_network(self) -> PackNetwork:
        """The runtime's view of this network (for its Pack settings: NATS URL, DNS sink)."""
        return PackNetwork(self.pack_id or "", self.name, "", self.bridge, str(self.subnet))


def compose_networks(cfg: RumiConfig, pack_ids: Sequence[str], tag: str = "") -> dict[str, ComposeNetwork]:
    """``control`` and ``pack-<id>`` networks with fixed subnets from ``cfg.network_pool`` (deterministic)."""
    try:
        pool = ipaddress.ip_network(cfg.network_pool, strict=True)
    except ValueError as exc:
        raise ComposeError(
            f"docker/config.json: network_pool {cfg.network_pool!r} is not a network ({exc})"
        ) from None
    if not isinstance(pool, ipaddress.IPv4Network):
        raise ComposeError(
            "docker/config.json: network_pool must be an IPv4 network (Docker's internal bridges)"
        )
    plen = cfg.network_prefix_length
    if not (pool.prefixlen <= plen <= 29):
        raise ComposeError(
            f"docker/config.json: network_prefix_length {plen} must be between the pool's /{pool.prefixlen} "
            "and /29 (a Pack network needs 8 addresses)"
        )
    count = 1 << (plen - pool.prefixlen)
    packs = sorted(set(pack_ids))
    if len(packs) + 1 > count:
        raise ComposeError(
            f"docker/config.json: network_pool {pool} has {count} /{plen} subnets and {len(packs) + 1} are "
            "needed: widen the pool or lengthen network_prefix_length"
        )
    size = 1 << (32 - plen)

    def subnet(slot: int) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network((int(pool.network_address) + slot * size, plen))

    control = count - 1
    out = {"control": ComposeNetwork("control", subnet(control), bridge_name(tag, "compose:control"))}
    used = {control}
    upper = count // 2
    for pack_id in packs:
        # A hash of the id, not its index: adding a Pack leaves every other Pack's subnet where it was.
        slot = upper + int(hashlib.sha256(pack_id.encode()).hexdigest()[:8], 16) % max(1, count - 1 - upper)
        while slot in used:
            slot = (slot + 1) % count
        used.add(slot)
        key = f"pack-{pack_id}"
        out[key] = ComposeNetwork(key, subnet(slot), bridge_name(tag, f"compose:pack:{pack_id}"), pack_id)
    return out


def _network_entry(net: ComposeNetwork, tag: str) -> dict[str, Any]:
    # The same bridge options as `rumi up`'s networks (broker/containers/engine.py ensure_*_network).
    options = {
        "com.docker.network.bridge.name": net.bridge,
        "com.docker.network.bridge.enable_ip_masquerade": "false",
    }
    pool: dict[str, Any] = {"subnet": str(net.subnet)}
    if net.internal:
        # No host address on a Pack bridge: the container's default route leads nowhere.
        options["com.docker.network.bridge.inhibit_ipv4"] = "true"
        options["com.docker.network.bridge.enable_icc"] = "true"
        pool["gateway"] = str(net.subnet[1])
        # Reserved, never assigned: the Pack's DNS upstream that nobody holds.
        pool["aux_addresses"] = {DNS_SINK_NAME: str(net.subnet[-2])}
    entry: dict[str, Any] = {"driver": "bridge"}
    if net.internal:
        entry["internal"] = True
    entry["driver_opts"] = options
    entry["ipam"] = {"driver": "default", "config": [pool]}
    entry["labels"] = labels(
        tag, "compose-pack-network" if net.internal else "compose-control-network", net.pack_id
    )
    return entry


# ------------------------------------------------------------------------- settings -> compose


def _seconds(ns: int) -> str:
    """Docker SDK nanoseconds as a Compose duration."""
    if ns % 1_000_000_000 == 0:
        return f"{ns // 1_000_000_000}s"
    return f"{ns // 1_000_000}ms"


def _restart(policy: dict[str, Any]) -> str:
    name = str(policy.get("Name") or "no")
    retries = int(policy.get("MaximumRetryCount") or 0)
    return f"{name}:{retries}" if name == "on-failure" and retries else name


def _healthcheck(check: dict[str, Any]) -> dict[str, Any]:
    unknown = set(check) - {"test", "interval", "timeout", "start_period", "retries"}
    if unknown:
        raise ComposeError(
            f"healthcheck key(s) {sorted(unknown)} have no Compose form in broker/containers/compose.py"
        )
    out: dict[str, Any] = {"test": list(check["test"])}
    for key in ("interval", "timeout", "start_period"):
        if key in check:
            out[key] = _seconds(int(check[key]))
    if "retries" in check:
        out["retries"] = int(check["retries"])
    return out


def _volumes(volumes: dict[str, dict[str, str]]) -> list[str]:
    out = []
    for source, spec in volumes.items():
        for part in (source, spec["bind"]):
            if ":" in part or not part.startswith("/"):
                raise ComposeError(f"volume path {part!r} must be absolute and contain no ':'")
        out.append(f"{source}:{spec['bind']}:{spec.get('mode', 'rw')}")
    return out


def _ports(ports: dict[str, Any]) -> list[str]:
    out = []
    for container, host in ports.items():
        port, _, proto = str(container).partition("/")
        if isinstance(host, tuple):
            mapping = f"{host[0]}:{host[1]}:{port}"
        else:
            # A bare host port would listen on every address: refuse rather than widen it.
            raise ComposeError(
                f"port {container} is not bound to an address; Rumi publishes on 127.0.0.1 only"
            )
        out.append(mapping if proto in ("", "tcp") else f"{mapping}/{proto}")
    return out


def _tmpfs(mounts: dict[str, str]) -> list[str]:
    return [f"{path}:{options}" if options else path for path, options in mounts.items()]


def _logging(config: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"driver": config["Type"]}
    if config.get("Config"):
        out["options"] = {str(k): str(v) for k, v in config["Config"].items()}
    return out


def _role(value: dict[str, str]) -> tuple[str, dict[str, str]]:
    out = dict(value)
    if LABEL_ROLE in out:
        # Compose's containers are Compose's to manage: `rumi ps`/`down` select `rumi up`'s roles only.
        out[LABEL_ROLE] = f"compose-{out[LABEL_ROLE]}"
    return "labels", out


_Convert = Callable[[Any], tuple[str, Any]]


def _same(key: str) -> _Convert:
    return lambda value: (key, value)


# docker SDK `containers.create` keyword -> (Compose key, value). The only place the two vocabularies meet.
_TABLE: dict[str, _Convert | None] = {
    "image": _same("image"),
    "command": _same("command"),
    "user": _same("user"),
    "environment": lambda env: ("environment", {str(k): str(v) for k, v in env.items()}),
    "labels": _role,
    "read_only": _same("read_only"),
    "cap_drop": _same("cap_drop"),
    "cap_add": _same("cap_add"),
    "security_opt": _same("security_opt"),
    "tmpfs": lambda t: ("tmpfs", _tmpfs(t)),
    "mem_limit": _same("mem_limit"),
    "memswap_limit": _same("memswap_limit"),
    "mem_reservation": _same("mem_reservation"),
    "cpu_period": _same("cpu_period"),
    "cpu_quota": _same("cpu_quota"),
    "cpu_shares": _same("cpu_shares"),
    "pids_limit": _same("pids_limit"),
    "volumes": lambda v: ("volumes", _volumes(v)),
    "ports": lambda p: ("ports", _ports(p)),
    "healthcheck": lambda h: ("healthcheck", _healthcheck(h)),
    "restart_policy": lambda p: ("restart", _restart(p)),
    "ipc_mode": _same("ipc"),
    "init": _same("init"),
    "stop_signal": _same("stop_signal"),
    "log_config": lambda c: ("logging", _logging(c)),
    "dns": _same("dns"),
    "dns_opt": _same("dns_opt"),
    "dns_search": _same("dns_search"),
    "ulimits": lambda u: ("ulimits", {x["Name"]: {"soft": x["Soft"], "hard": x["Hard"]} for x in u}),
    "sysctls": _same("sysctls"),
    "privileged": _same("privileged"),
    # Compose names containers after the project (two projects, or `rumi up`, never collide on a name);
    # `network` becomes `networks:` with fixed addresses; `detach` is how the SDK call returns.
    "name": None,
    "network": None,
    "detach": None,
}


def compose_service(settings: dict[str, Any], networks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A Compose service from docker SDK ``containers.create`` settings; unknown keys are an error."""
    unknown = sorted(set(settings) - set(_TABLE))
    if unknown:
        raise ComposeError(
            f"container settings key(s) {', '.join(unknown)} have no Compose form in broker/containers/compose.py: "
            "add them to its conversion table"
        )
    service: dict[str, Any] = {}
    for key, value in settings.items():
        convert = _TABLE[key]
        if convert is not None:
            name, converted = convert(value)
            service[name] = converted
    service["networks"] = networks
    return service


# --------------------------------------------------------------------------------- rendering


def render_compose(
    ws: Workspace, pack_ids: Sequence[str] | None = None, *, prefix: str = DEFAULT_PREFIX
) -> str:
    """The Compose file text for ``pack_ids`` (default: every Pack in ecosystem/).

    Writes no file; the runtime's NATS settings make sure the JetStream directory exists.
    """
    return _HEADER + to_yaml(_compose_document(ws, ws.load_config(), _packs(ws, pack_ids), prefix))


def _packs(ws: Workspace, pack_ids: Sequence[str] | None) -> list[str]:
    packs = sorted(set(pack_ids)) if pack_ids else ws.pack_ids()
    for pack_id in packs:
        pack_image_tag(pack_id)  # validates the id
        if not (ws.pack_source(pack_id) / "pack.json").is_file():
            raise WorkspaceError(f"no Pack {pack_id!r}: ecosystem/{pack_id}/pack.json does not exist")
    return packs


def _runtime_nats_settings(runtime: DockerRuntime, image: str, host_port: int) -> dict[str, Any]:
    """``rumi up``'s own NATS container settings: one definition for both deployments.

    The runtime makes the JetStream directory (owned by the nats uid) while building them.
    """
    settings: dict[str, Any] = runtime.nats_settings(image, host_port)
    return settings


def _compose_document(ws: Workspace, cfg: RumiConfig, packs: list[str], prefix: str) -> dict[str, Any]:
    tag = workspace_tag(ws)
    nets = compose_networks(cfg, packs, tag)
    runtime = DockerRuntime(ws, prefix=prefix)
    nats_networks: dict[str, Any] = {"control": {}}
    for net in nets.values():
        if net.internal:
            nats_networks[net.name] = {"ipv4_address": net.nats_ip}
    services: dict[str, Any] = {
        "nats": compose_service(
            _runtime_nats_settings(runtime, image_tag("nats", prefix), cfg.nats_port), nats_networks
        )
    }
    for pack_id in packs:
        net = nets[f"pack-{pack_id}"]
        settings = runtime.pack_settings(pack_id, pack_image_tag(pack_id, prefix), net.runtime_network(), cfg)
        service = compose_service(settings, {net.name: {"ipv4_address": net.pack_ip}})
        services[f"pack-{pack_id}"] = {
            "build": {"context": f"packs/{pack_id}", "dockerfile": "Dockerfile"},
            **service,
            "depends_on": ["nats"],
        }
    networks = {net.name: _network_entry(net, tag) for net in nets.values()}
    return {"version": COMPOSE_VERSION, "services": services, "networks": networks}


# ---------------------------------------------------------------------------------------- YAML


_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
_YAML11_WORDS = frozenset({"y", "n", "yes", "no", "on", "off", "true", "false", "null"})
_HEADER = (
    "# Generated by rumi (broker/containers/compose.py): `rumi compose` rewrites it. Do not edit.\n"
    "# Build the images with `rumi build` (no registry needed), then\n"
    "#   docker-compose -f docker/docker-compose.yml up -d\n"
    "#   rumi broker      # the broker runs on the host: nats_url in docker/config.json points it here\n"
    "# See docs/compose.md for what `rumi up` adds.\n"
)


def to_yaml(doc: Any) -> str:
    """Block-style YAML with every scalar written as JSON (so a string can never be read as anything else)."""
    lines: list[str] = []
    _emit(doc, 0, lines)
    return "\n".join(lines) + "\n"


def _key(key: object) -> str:
    text = str(key)
    plain = _PLAIN_KEY.match(text) and text.lower() not in _YAML11_WORDS
    return text if plain else json.dumps(text)


def _scalar(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return "{}" if isinstance(value, dict) else "[]"  # only empty ones get here
    if value is None or isinstance(value, (bool, int, float, str)):
        return json.dumps(value)
    raise ComposeError(f"cannot write {type(value).__name__} into the Compose file")


def _emit(value: Any, indent: int, lines: list[str]) -> None:
    pad = "  " * indent
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, (dict, list)) and item:
                lines.append(f"{pad}{_key(key)}:")
                _emit(item, indent + 1, lines)
            else:
                lines.append(f"{pad}{_key(key)}: {_scalar(item)}")
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, (dict, list)) and item:
                sub: list[str] = []
                _emit(item, indent + 1, sub)
                lines.append(f"{pad}- {sub[0].lstrip()}")
                lines.extend(sub[1:])
            else:
                lines.append(f"{pad}- {_scalar(item)}")
    else:
        lines.append(pad + _scalar(value))


# ------------------------------------------------------------------------------------- writing


def _embedded_server_running(ws: Workspace) -> int | None:
    from broker.bus.server import pid_file

    try:
        pid = int(pid_file(ws).read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def _engine_libc(base_image: str, progress: Progress) -> str:
    """The base image's libc from the engine; the Debian base's when no engine answers."""
    try:
        client = docker_client(timeout=10)
    except RumiError:
        progress(f"no Docker engine answers: assuming the Debian base ({DEFAULT_LIBC}) for wheels")
        return DEFAULT_LIBC
    try:
        return image_libc(client, base_image)
    finally:
        client.close()


def write_compose(
    ws: Workspace,
    pack_ids: Sequence[str] | None = None,
    *,
    prefix: str = DEFAULT_PREFIX,
    libc: str | None = None,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
) -> Path:
    """Write everything ``docker-compose -f docker/docker-compose.yml build|up`` needs; return the file.

    Each Pack's build context (docker/packs/<id>/) and docker/base/'s; and, with the runtime's own code,
    the container NATS config, the JetStream directory, each Pack's credentials directory and sandbox;
    last, ``nats_url`` in docker/config.json (the published NATS: ``rumi broker`` serves it).
    ``libc`` (the base image's, picks the wheel platform) is read from the engine when not given.
    """
    progress = progress or (lambda _: None)
    packs = _packs(ws, pack_ids)
    running = _embedded_server_running(ws)
    if running is not None:
        raise ComposeError(
            f"an embedded nats-server (pid {running}) uses docker/.rumi/nats/ for this workspace: "
            "stop `rumi broker` first; the containers' NATS config replaces that one"
        )
    text = render_compose(ws, packs, prefix=prefix)  # checks networks and settings before anything is written
    runtime = DockerRuntime(ws, prefix=prefix)
    base_image = image_tag("base", prefix)
    if libc is None:
        libc = _engine_libc(base_image, progress)
    for pack_id in packs:
        progress(f"pack-{pack_id}: writing docker/packs/{pack_id}/")
        write_pack_dockerfile(ws, pack_id, base_image, libc=libc, cache_dir=cache_dir, progress=progress)
        runtime.prepare_pack_files(pack_id)
    stage_base_context(ws, libc=libc, cache_dir=cache_dir, progress=progress)
    progress("nats: writing docker/.rumi/nats/nats.conf for the container")
    runtime.write_nats_config(sorted(set(ws.pack_ids()) | set(packs)))
    runtime.prepare_jetstream_dir()  # the container's nats-server (uid 65534) must own its store
    url = compose_nats_url(ws.load_config())
    before = record_nats_url(ws, url)
    if before != url:
        was = f" (was {before})" if before else ""
        progress(
            f"docker/config.json: nats_url = {url}{was}, the NATS this file publishes: `rumi broker` serves it"
        )
    target = compose_file(ws)
    write_atomic(target, text, fsync=False)
    return target


# ------------------------------------------------------------------------- the broker's NATS URL


def compose_nats_url(cfg: RumiConfig) -> str:
    """The client URL of the Compose file's NATS on this host (published on 127.0.0.1 only)."""
    return f"nats://127.0.0.1:{cfg.nats_port}"


def record_nats_url(ws: Workspace, url: str) -> str | None:
    """Set ``nats_url`` in docker/config.json to ``url``; return the value it had before.

    Only that value changes: the rest of the file keeps its text (its layout and the admin's edits).
    With ``nats_url`` set, ``rumi broker`` connects there instead of starting its own nats-server,
    and ``rumi call`` and the other commands find NATS there too.
    """
    path = ws.config_file
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        text, mode = "{}\n", 0o644
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkspaceError(f"cannot read docker/config.json: {exc}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise WorkspaceError(
            f"docker/config.json is not valid JSON ({exc.msg}, line {exc.lineno}): fix it"
        ) from None
    if not isinstance(doc, dict):
        raise WorkspaceError("docker/config.json must hold a JSON object")
    before = doc.get("nats_url")
    if before == url:
        return url
    new_text = _set_top_level(text, "nats_url", url)
    if json.loads(new_text) != {
        **doc,
        "nats_url": url,
    }:  # pragma: no cover - the splice is checked, not trusted
        new_text = json.dumps({**doc, "nats_url": url}, indent=2) + "\n"
    write_atomic(path, new_text, mode=mode, fsync=True)
    return before if isinstance(before, str) else None


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _set_top_level(text: str, key: str, value: str) -> str:
    """``text`` (a valid JSON object) with every top-level ``key`` set to ``value``, or it added first."""
    decoder = json.JSONDecoder()
    spans: list[tuple[int, int]] = []
    opening = _skip_space(text, 0)  # the "{"
    pos = _skip_space(text, opening + 1)
    while text[pos] != "}":
        name, pos = decoder.raw_decode(text, pos)
        pos = _skip_space(text, _skip_space(text, pos) + 1)  # past the ":"
        _, end = decoder.raw_decode(text, pos)
        if name == key:
            spans.append((pos, end))
        pos = _skip_space(text, end)
        if text[pos] == ",":
            pos = _skip_space(text, pos + 1)
    encoded = json.dumps(value)
    if not spans:
        rest = text[opening + 1 :]
        separator = "" if rest.strip() == "}" else "," if rest[:1].isspace() else ", "
        return f"{text[: opening + 1]}\n  {json.dumps(key)}: {encoded}{separator}{rest}"
    for start, end in reversed(spans):
        text = text[:start] + encoded + text[end:]
    return text
