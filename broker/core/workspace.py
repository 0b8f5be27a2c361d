"""Workspace layout (docs/architecture.md, "Workspace") and runtime settings from docker/config.json."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import msgspec

from broker.core.errors import WorkspaceError


class AccountLimits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Per-Pack NATS account limits (NATS has no rate limit: rates are the broker's job)."""

    max_payload: int = 8 * 1024 * 1024  # replies carry file and HTTP bodies up to the scopes' 7 MiB caps
    max_connections: int = 4
    max_subscriptions: int = 64


# A wait between two looks at the grant files: 0 or less would spin.
Interval = Annotated[float, msgspec.Meta(gt=0)]
# A container's CPU limit in cores: 0 would mean "no limit" to Docker, so it is refused.
Cpus = Annotated[float, msgspec.Meta(ge=0.01, le=256)]


class BrokerSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`broker` in docker/config.json. Rates, in-flight, threads and refusals are per Pack (one lane each)."""

    max_in_flight: int = 256  # kept for old configs; the per-Pack quota below is what binds
    rate_per_second: float = 200.0
    burst: int = 400
    request_timeout: float = 30.0
    grant_poll_interval: Interval = 0.2  # how often grants are re-read where inotify is missing
    grant_rescan_interval: Interval = 1.0  # with inotify: re-read on every change, and at least this often
    max_in_flight_per_pack: int = 32  # tunnel long-polls hold one of their own Pack's slots
    threads_per_pack: int = 4  # blocking handlers (files, Docker) of one Pack at once
    refusals_per_second: int = 10  # audited one by one; more are folded into one event with a count
    flood_refusals_per_second: int = 1000  # beyond: the Pack's requests go unanswered for a while
    metrics_listen: str | None = None  # HOST:PORT for Prometheus /metrics, "off", or None (default)


class PackSettings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    memory_limit: str | None = None
    cpus: Cpus | None = None


class RumiConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """docker/config.json. Every key is optional."""

    nats_url: str | None = None
    nats_host: str = "127.0.0.1"
    nats_port: int = 4222
    jetstream_sync: str = "always"
    memory_limit: str = "128m"
    cpus: Cpus = 0.5
    pids_limit: int = 128
    allow_pull: bool = False
    network_pool: str = "10.213.0.0/16"
    network_prefix_length: int = 28
    limits: AccountLimits = AccountLimits()
    broker: BrokerSettings = BrokerSettings()
    # The audit stream never discards old events (discard: new): when it is full, requests are refused
    # `unavailable`. The broker logs an alarm at `audit_alarm_ratio` of it.
    audit_max_bytes: int = 8 * 1024**3
    audit_alarm_ratio: float = 0.8
    packs: dict[str, PackSettings] = {}


_CONFIG_DECODER = msgspec.json.Decoder(RumiConfig)


@dataclass(frozen=True)
class Workspace:
    """Paths of one workspace root."""

    root: Path

    @classmethod
    def at(cls, root: str | os.PathLike[str] | None = None) -> Workspace:
        chosen = root if root is not None else os.environ.get("RUMI_ROOT") or os.getcwd()
        return cls(Path(chosen).resolve())

    @property
    def docker(self) -> Path:
        return self.root / "docker"

    @property
    def handlers(self) -> Path:
        return self.docker / "handlers"

    @property
    def scopes(self) -> Path:
        return self.docker / "scopes"

    @property
    def grants(self) -> Path:
        return self.docker / "grants"

    @property
    def work_areas(self) -> Path:
        """`docker/sandbox/`: the Packs' work areas (the seed's directory name; not the terminal sandbox)."""
        return self.docker / "sandbox"

    @property
    def packs(self) -> Path:
        return self.docker / "packs"

    @property
    def base(self) -> Path:
        return self.docker / "base"

    @property
    def config_file(self) -> Path:
        return self.docker / "config.json"

    @property
    def state(self) -> Path:
        return self.docker / ".rumi"

    @property
    def audit_signing_keys(self) -> Path:
        """`docker/.rumi/audit-signing/`: each broker worker's private Ed25519 checkpoint key (0600)."""
        return self.state / "audit-signing"

    @property
    def audit_keys_file(self) -> Path:
        """`docker/.rumi/audit-keys.json`: the checkpoint keys' public halves and the chains each signed."""
        return self.state / "audit-keys.json"

    @property
    def ecosystem(self) -> Path:
        return self.root / "ecosystem"

    def pack_work_area(self, pack_id: str) -> Path:
        """`docker/sandbox/<pack_id>/`: the Pack's own work area, mounted into its container alone."""
        return self.work_areas / pack_id

    def pack_source(self, pack_id: str) -> Path:
        return self.ecosystem / pack_id

    def grant_file(self, component_id: str) -> Path:
        return self.grants / f"{component_id}.json"

    def protected_paths(self, pack_id: str | None = None) -> list[Path]:
        """Paths no grant may reach: workspace state and code, other Packs' sandboxes.

        With `pack_id`, that Pack's own sandbox is left out (it is its work area).
        """
        paths = [
            self.state,
            self.ecosystem,
            self.grants,
            self.handlers,
            self.scopes,
            self.config_file,
            self.packs,
            self.base,
            self.docker / "docker-compose.yml",
        ]
        if self.work_areas.is_dir():
            for child in sorted(self.work_areas.iterdir()):
                if child.name != pack_id:
                    paths.append(child)
        if pack_id is None:
            paths.append(self.work_areas)
        return paths

    def load_config(self) -> RumiConfig:
        try:
            raw = self.config_file.read_bytes()
        except FileNotFoundError:
            return RumiConfig()
        except OSError as exc:
            raise WorkspaceError(f"{self.config_file}: cannot read ({exc.strerror})") from None
        try:
            return _CONFIG_DECODER.decode(raw)
        except msgspec.ValidationError as exc:
            raise WorkspaceError(f"{self.config_file}: {exc}") from None
        except msgspec.DecodeError as exc:
            raise WorkspaceError(f"{self.config_file}: not valid JSON ({exc})") from None

    def pack_ids(self) -> list[str]:
        """Packs present in ecosystem/ (directories holding a pack.json)."""
        from broker.core.ids import is_pack_id

        if not self.ecosystem.is_dir():
            return []
        return sorted(
            p.name for p in self.ecosystem.iterdir() if (p / "pack.json").is_file() and is_pack_id(p.name)
        )
