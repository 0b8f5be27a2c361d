"""`rumi build` (images, no registry needed) and `rumi compose` (docker/docker-compose.yml)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from broker.cli.common import RootOption, fail, workspace
from broker.core.errors import RumiError
from broker.core.workspace import Workspace

PrefixOption = Annotated[
    str,
    typer.Option(
        "--prefix",
        envvar="RUMI_IMAGE_PREFIX",
        help="Image name prefix: images are <prefix>-nats, <prefix>-base, ...",
    ),
]
PacksArgument = Annotated[
    list[str] | None, typer.Argument(help="Packs (directories under ecosystem/); default: all of them.")
]


def _pack_ids(ws: Workspace, packs: list[str] | None) -> list[str]:
    chosen = sorted(set(packs)) if packs else ws.pack_ids()
    if not chosen and not packs:
        typer.echo(
            f"no Packs in {ws.ecosystem} (a Pack is ecosystem/<id>/pack.json); building shared images only"
        )
    return chosen


def _error_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def register(app: typer.Typer) -> None:
    """Add `build` and `compose` to the main app."""

    @app.command("build")
    def build_cmd(
        packs: PacksArgument = None,
        root: RootOption = None,
        prefix: PrefixOption = "rumi",
        verbose: Annotated[
            bool, typer.Option("--verbose", "-v", help="Show every docker build step.")
        ] = False,
    ) -> None:
        """Build the NATS, Python base, base, sandbox and Pack images (works with no registry)."""
        import docker.errors

        from broker.containers import images
        from broker.containers.engine import docker_client
        from broker.containers.packimage import build_pack, stage_base_context

        ws = workspace(root)
        try:
            pack_ids = _pack_ids(ws, packs)
            for pack_id in pack_ids:
                from broker.core.manifest import load_manifest

                load_manifest(ws, pack_id)
            cfg = ws.load_config()
            images.image_tag("base", prefix)
            client = docker_client()
        except (RumiError, ValueError) as exc:
            fail(str(exc))

        def detail(message: str) -> None:
            # docker build's own step lines are noise unless asked for.
            if verbose or not message.split(":", 1)[-1].startswith("   "):
                typer.echo(f"      {message}")

        shared: list[tuple[str, str, Callable[[], str]]] = [
            (
                "nats",
                images.image_tag("nats", prefix),
                lambda: images.build_nats_image(client, prefix, detail),
            ),
            (
                "python",
                images.image_tag("python", prefix),
                lambda: images.build_python_base(client, prefix, detail, cfg.allow_pull),
            ),
            (
                "base",
                images.image_tag("base", prefix),
                lambda: images.build_base_image(client, prefix, detail, cfg.allow_pull),
            ),
            (
                "sandbox",
                images.image_tag("sandbox", prefix),
                lambda: images.build_sandbox_image(client, prefix, detail),
            ),
        ]
        total = len(shared) + len(pack_ids)
        libc = "glibc 2.36"
        started = time.monotonic()
        for step, (kind, tag, build) in enumerate(shared, 1):
            before = _image_id(client, tag)
            typer.echo(f"[{step}/{total}] {tag}: checking…")
            t0 = time.monotonic()
            try:
                build()
            except (RumiError, docker.errors.DockerException, OSError) as exc:
                fail(f"[{step}/{total}] {tag}: {_error_line(exc)}")
            image = client.images.get(tag)
            if image.id == before:
                typer.echo(f"[{step}/{total}] {tag}: reusing {image.short_id.split(':')[-1]}")
            else:
                typer.echo(
                    f"[{step}/{total}] {tag}: built {image.short_id.split(':')[-1]} "
                    f"({_mb(image.attrs.get('Size', 0))}) in {time.monotonic() - t0:.1f}s"
                )
            if kind == "python":
                libc = str((image.labels or {}).get(images.LABEL_LIBC) or "glibc 2.36")
        try:
            # docker/base/ is a complete build context too (`docker build -t rumi-base:latest docker/base/`).
            stage_base_context(ws, libc=libc, progress=detail)
        except (RumiError, OSError) as exc:
            fail(f"docker/base: {_error_line(exc)}")
        failed = 0
        for step, pack_id in enumerate(pack_ids, len(shared) + 1):
            label = f"[{step}/{total}] {prefix}-pack-{pack_id}"
            typer.echo(f"{label}: checking…")
            try:
                built = build_pack(client, ws, pack_id, prefix=prefix, progress=detail)
            except (RumiError, docker.errors.DockerException, OSError) as exc:
                typer.echo(f"error: {label}: {_error_line(exc)}", err=True)
                failed += 1
                continue
            short = built.image_id.split(":")[-1][:12]
            if built.reused:
                typer.echo(f"{label}: reusing {short}")
            else:
                typer.echo(
                    f"{label}: built {short} ({_mb(built.size)}, {_mb(built.layer_size)} above the base) "
                    f"in {built.seconds:.1f}s"
                )
        if failed:
            fail(f"{failed} of {len(pack_ids)} Pack image(s) failed to build")
        typer.echo(f"done in {time.monotonic() - started:.1f}s")

    @app.command("compose")
    def compose_cmd(
        packs: PacksArgument = None,
        root: RootOption = None,
        prefix: PrefixOption = "rumi",
    ) -> None:
        """(Re)write docker/docker-compose.yml and the build contexts it points at."""
        target = write_compose_files(workspace(root), packs, prefix=prefix, echo=typer.echo)
        typer.echo(f"wrote {target}")
        typer.echo("next: `rumi build`, then `docker-compose -f docker/docker-compose.yml up -d`")


def write_compose_files(
    ws: Workspace, packs: list[str] | None, *, prefix: str, echo: Callable[[str], None]
) -> Path:
    """write_compose with one-line errors (the base's libc comes from the engine when one answers)."""
    from broker.containers.compose import write_compose

    try:
        return write_compose(ws, packs or None, prefix=prefix, progress=lambda m: echo(f"  {m}"))
    except (RumiError, ValueError, OSError) as exc:
        fail(_error_line(exc))


def _image_id(client: Any, tag: str) -> str | None:
    import docker.errors

    try:
        return str(client.images.get(tag).id)
    except docker.errors.ImageNotFound:
        return None


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"
