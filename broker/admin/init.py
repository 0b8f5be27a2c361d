"""`rumi init`: write the shipped handlers, scopes, config and example Pack into a workspace."""

from __future__ import annotations

import os
from collections.abc import Callable
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path

from broker.core.workspace import Workspace

WORKSPACE_GITIGNORE = ".rumi/\npacks/\nsandbox/\ngrants/\n"
DEMO_SECRET_KEY = "RUMI_DEMO_GREETING"  # noqa: S105 - a key name, not a secret
EXAMPLE_PACK = "default"


def defaults() -> Traversable:
    """The shipped defaults (the repository's `config/`, packaged as `broker._defaults`)."""
    return resources.files("broker._defaults")


def _copy_tree(src: Traversable, dst: Path, overwrite: bool, written: list[Path]) -> None:
    for item in src.iterdir():
        if item.name in {"__init__.py", "__pycache__"} or item.name.endswith(".pyc"):
            continue
        target = dst / item.name
        if item.is_dir():
            _copy_tree(item, target, overwrite, written)
        elif overwrite or not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(item.read_bytes())
            written.append(target)


def init_workspace(
    ws: Workspace, *, overwrite: bool = False, progress: Callable[[str], None] = lambda _: None
) -> list[Path]:
    """Create the layout; never overwrite user files unless asked. Returns the files written."""
    written: list[Path] = []
    src = defaults()
    for sub, dst in (("handlers", ws.handlers), ("scopes", ws.scopes), ("base", ws.base)):
        if src.joinpath(sub).is_dir():
            progress(f"writing {dst.relative_to(ws.root)}/")
            _copy_tree(src.joinpath(sub), dst, overwrite, written)
    if overwrite or not ws.config_file.exists():
        ws.docker.mkdir(parents=True, exist_ok=True)
        ws.config_file.write_bytes(src.joinpath("config.json").read_bytes())
        written.append(ws.config_file)
    example = src.joinpath("ecosystem")
    if example.is_dir():
        progress("writing ecosystem/default (the example Pack)")
        _copy_tree(example, ws.ecosystem, overwrite, written)
    for d in (ws.grants, ws.work_areas, ws.state, ws.packs):
        d.mkdir(parents=True, exist_ok=True)
    os.chmod(ws.state, 0o700)
    gitignore = ws.docker / ".gitignore"
    if not gitignore.exists():
        gitignore.write_text(WORKSPACE_GITIGNORE)
        written.append(gitignore)
    _example_grant(ws, written)
    return written


def _example_grant(ws: Workspace, written: list[Path]) -> None:
    """The example Pack gets what its pack.json declares (its tool: its own sandbox for files and
    commands, one demo key), nothing more; grant files already there are left alone."""
    from broker.admin.grants import grant_declared

    ws.pack_work_area(EXAMPLE_PACK).mkdir(parents=True, exist_ok=True)
    if (ws.pack_source(EXAMPLE_PACK) / "pack.json").is_file():
        new = {d.path for d in grant_declared(ws, EXAMPLE_PACK, only_new_files=True)}
        written.extend(sorted(new))
    secrets_file = ws.state / "secrets.env"
    if not secrets_file.exists():
        fd = os.open(secrets_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{DEMO_SECRET_KEY}=hello from the broker's secrets file\n")
        written.append(secrets_file)
