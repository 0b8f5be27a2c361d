"""`rumi new PACK`: a new Pack in ecosystem/<id>/ from the shipped templates (config/templates/pack/).

It gets a `pack.json`, a `main.py` with one typed tool, an empty `requirements.txt` and a
`test_main.py` that runs the tool against `pack_runtime.testing.FakeBroker` (`pytest ecosystem/<id>`
needs no NATS and no Docker). The files are written into a hidden directory beside the target and
renamed into place: a Pack directory is complete or absent.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from broker.core.errors import WorkspaceError
from broker.core.ids import PACK_ID_RE, is_pack_id
from broker.core.workspace import Workspace

TEMPLATE_SUFFIX = ".tmpl"
PLACEHOLDER = "{{pack_id}}"


class InvalidPackId(WorkspaceError):
    """The requested id cannot name a Pack."""


class PackExists(WorkspaceError):
    """ecosystem/<id>/ is already there."""


def template_files() -> dict[str, str]:
    """File name in the new Pack → template text (`{{pack_id}}` not yet filled in)."""
    from broker.admin.init import defaults

    src = defaults().joinpath("templates", "pack")
    files = {
        item.name.removesuffix(TEMPLATE_SUFFIX): item.read_text(encoding="utf-8")
        for item in src.iterdir()
        if item.name.endswith(TEMPLATE_SUFFIX)
    }
    if "pack.json" not in files or "main.py" not in files:
        raise WorkspaceError("the Pack templates are missing from this installation (reinstall rumi)")
    return files


def new_pack(ws: Workspace, pack_id: str) -> list[Path]:
    """Create ecosystem/<pack_id>/ from the templates; return the files written.

    Raises InvalidPackId for an id that is not `^[a-z][a-z0-9_-]{0,31}$`, PackExists when the
    directory (or anything of that name) exists, WorkspaceError when there is no workspace.
    """
    if not is_pack_id(pack_id):
        raise InvalidPackId(
            f"{pack_id[:40]!r} is not a valid pack id: a lowercase letter, then lowercase letters, digits, "
            f"'_' or '-', at most 32 characters ({PACK_ID_RE.pattern})"
        )
    if not ws.docker.is_dir() and not ws.ecosystem.is_dir():
        raise WorkspaceError(f"no workspace at {ws.root}: run `rumi init` first (or pass --root)")
    target = ws.pack_source(pack_id)
    if target.exists() or target.is_symlink():
        raise PackExists(f"{target} already exists: choose another id, or remove that directory first")
    files = {name: text.replace(PLACEHOLDER, pack_id) for name, text in template_files().items()}
    ws.ecosystem.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".new-{pack_id}-", dir=ws.ecosystem))
    try:
        for name, text in sorted(files.items()):
            (staging / name).write_text(text, encoding="utf-8")
        staging.chmod(0o755)
        try:
            # One rename: the Pack directory appears complete (a non-empty one made meanwhile is kept).
            os.rename(staging, target)
        except OSError as exc:
            if target.exists():
                raise PackExists(f"{target} already exists: choose another id, or remove it first") from None
            raise WorkspaceError(f"cannot create {target} ({exc.strerror})") from None
    finally:
        if staging.exists():
            with contextlib.suppress(OSError):
                shutil.rmtree(staging)
    return [target / name for name in sorted(files)]
