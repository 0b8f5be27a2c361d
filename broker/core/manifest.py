"""A Pack's manifest: `ecosystem/<pack_id>/pack.json`, read and checked."""

from __future__ import annotations

from pathlib import Path

import msgspec

from broker.core.errors import WorkspaceError
from broker.core.ids import is_pack_id
from broker.core.workspace import Workspace

__all__ = ["PackManifest", "load_manifest"]


class PackManifest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """ecosystem/<pack_id>/pack.json"""

    id: str
    version: str
    entrypoint: str = "main.py"
    description: str = ""


def load_manifest(ws: Workspace, pack_id: str) -> PackManifest:
    """Read and check a Pack's pack.json."""
    if not is_pack_id(pack_id):
        raise WorkspaceError(
            f"{pack_id!r} is not a valid pack id (lowercase letter, then [a-z0-9_-], max 32)"
        )
    path = ws.pack_source(pack_id) / "pack.json"
    try:
        manifest = msgspec.json.decode(path.read_bytes(), type=PackManifest)
    except FileNotFoundError:
        raise WorkspaceError(
            f"{path}: not found; a Pack lives in ecosystem/<pack_id>/ with a pack.json"
        ) from None
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise WorkspaceError(f"{path}: {exc}") from None
    if manifest.id != pack_id:
        raise WorkspaceError(f"{path}: id {manifest.id!r} does not match the directory name {pack_id!r}")
    entry = Path(manifest.entrypoint)
    if entry.is_absolute() or ".." in entry.parts:
        raise WorkspaceError(f"{path}: entrypoint must be a relative path inside the Pack")
    return manifest
