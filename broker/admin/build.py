"""`rumi build`: the shared images, the docker/base build context and each Pack's image, in order."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from broker.core.errors import RumiError
from broker.core.workspace import Workspace


@dataclass(frozen=True)
class _Shared:
    """One shared image: its kind, its tag and how to build (or reuse) it."""

    kind: str
    tag: str
    build: Callable[[], str]


def error_line(exc: BaseException) -> str:
    """The first line of an error's text (or its type's name), for a one-line message."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def build_images(
    ws: Workspace,
    packs: list[str] | None,
    *,
    prefix: str,
    verbose: bool,
    echo: Callable[[str], None],
    warn: Callable[[str], None],
) -> None:
    """Build (or reuse) the NATS, Python base, base and sandbox images, stage docker/base, then build
    the Pack images (all of ecosystem/ unless `packs` names some).

    Progress lines go to `echo`, a Pack that fails to build to `warn` (the others still build);
    RumiError names the first shared step that failed, or how many Packs did.
    """
    _Build(ws, prefix=prefix, verbose=verbose, echo=echo, warn=warn).run(packs)


class _Build:
    """One `rumi build`: its steps are numbered across the shared images and the Packs."""

    def __init__(
        self,
        ws: Workspace,
        *,
        prefix: str,
        verbose: bool,
        echo: Callable[[str], None],
        warn: Callable[[str], None],
    ) -> None:
        self.ws = ws
        self.prefix = prefix
        self.verbose = verbose
        self.echo = echo
        self.warn = warn
        self.client: Any = None
        self.total = 0

    def detail(self, message: str) -> None:
        # docker build's own step lines are noise unless asked for.
        if self.verbose or not message.split(":", 1)[-1].startswith("   "):
            self.echo(f"      {message}")

    def run(self, packs: list[str] | None) -> None:
        from broker.containers.packimage import stage_base_context

        pack_ids, shared = self._prepare(packs)
        self.total = len(shared) + len(pack_ids)
        started = time.monotonic()
        libc = self._build_shared(shared)
        try:
            # docker/base/ is a complete build context too (`docker build -t rumi-base:latest docker/base/`).
            stage_base_context(self.ws, libc=libc, progress=self.detail)
        except (RumiError, OSError) as exc:
            raise RumiError(f"docker/base: {error_line(exc)}") from None
        failed = self._build_packs(pack_ids, first=len(shared) + 1)
        if failed:
            raise RumiError(f"{failed} of {len(pack_ids)} Pack image(s) failed to build")
        self.echo(f"done in {time.monotonic() - started:.1f}s")

    def _prepare(self, packs: list[str] | None) -> tuple[list[str], list[_Shared]]:
        """Check the Packs' manifests, the config and the prefix; connect to the engine."""
        from broker.containers import images
        from broker.core.docker_client import docker_client
        from broker.core.manifest import load_manifest

        ws, prefix, detail = self.ws, self.prefix, self.detail
        try:
            pack_ids = self._pack_ids(packs)
            for pack_id in pack_ids:
                load_manifest(ws, pack_id)
            cfg = ws.load_config()
            images.image_tag("base", prefix)
            client = self.client = docker_client()
        except ValueError as exc:
            raise RumiError(str(exc)) from None
        shared = [
            _Shared(
                "nats",
                images.image_tag("nats", prefix),
                lambda: images.build_nats_image(client, prefix, detail),
            ),
            _Shared(
                "python",
                images.image_tag("python", prefix),
                lambda: images.build_python_base(client, prefix, detail, cfg.allow_pull),
            ),
            _Shared(
                "base",
                images.image_tag("base", prefix),
                lambda: images.build_base_image(client, prefix, detail, cfg.allow_pull),
            ),
            _Shared(
                "sandbox",
                images.image_tag("sandbox", prefix),
                lambda: images.build_sandbox_image(client, prefix, detail),
            ),
        ]
        return pack_ids, shared

    def _pack_ids(self, packs: list[str] | None) -> list[str]:
        chosen = sorted(set(packs)) if packs else self.ws.pack_ids()
        if not chosen and not packs:
            self.echo(
                f"no Packs in {self.ws.ecosystem} (a Pack is ecosystem/<id>/pack.json); "
                "building shared images only"
            )
        return chosen

    def _build_shared(self, shared: list[_Shared]) -> str:
        """Build (or reuse) each shared image, one numbered step each; the Python base's libc."""
        import docker.errors

        from broker.containers.packimage import DEFAULT_LIBC
        from broker.core.labels import LABEL_LIBC

        libc = DEFAULT_LIBC
        for step, item in enumerate(shared, 1):
            before = _image_id(self.client, item.tag)
            self.echo(f"[{step}/{self.total}] {item.tag}: checking…")
            t0 = time.monotonic()
            try:
                item.build()
            except (RumiError, docker.errors.DockerException, OSError) as exc:
                raise RumiError(f"[{step}/{self.total}] {item.tag}: {error_line(exc)}") from None
            image = self.client.images.get(item.tag)
            short = image.short_id.split(":")[-1]
            if image.id == before:
                self.echo(f"[{step}/{self.total}] {item.tag}: reusing {short}")
            else:
                self.echo(
                    f"[{step}/{self.total}] {item.tag}: built {short} "
                    f"({_mb(image.attrs.get('Size', 0))}) in {time.monotonic() - t0:.1f}s"
                )
            if item.kind == "python":
                libc = str((image.labels or {}).get(LABEL_LIBC) or DEFAULT_LIBC)
        return libc

    def _build_packs(self, pack_ids: list[str], *, first: int) -> int:
        """Build (or reuse) each Pack's image, numbered from `first`; how many failed."""
        import docker.errors

        from broker.containers.packimage import build_pack

        failed = 0
        for step, pack_id in enumerate(pack_ids, first):
            label = f"[{step}/{self.total}] {self.prefix}-pack-{pack_id}"
            self.echo(f"{label}: checking…")
            try:
                built = build_pack(self.client, self.ws, pack_id, prefix=self.prefix, progress=self.detail)
            except (RumiError, docker.errors.DockerException, OSError) as exc:
                self.warn(f"error: {label}: {error_line(exc)}")
                failed += 1
                continue
            short = built.image_id.split(":")[-1][:12]
            if built.reused:
                self.echo(f"{label}: reusing {short}")
            else:
                self.echo(
                    f"{label}: built {short} ({_mb(built.size)}, {_mb(built.layer_size)} above the base) "
                    f"in {built.seconds:.1f}s"
                )
        return failed


def _image_id(client: Any, tag: str) -> str | None:
    import docker.errors

    try:
        return str(client.images.get(tag).id)
    except docker.errors.ImageNotFound:
        return None


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"
