"""Built-in handler file_read: read a file inside a granted directory.

Resolution is the kernel's (openat2 beneath the grant, see `broker.backends.files`): symlinks may not leave the
grant, magic links are refused, protected workspace paths are refused by device and inode.
"""

# No `from __future__ import annotations`: msgspec must see real types even when the
# broker loads this file without registering it in sys.modules.
from collections.abc import Mapping
from typing import Annotated, Any

import msgspec

from broker.handler_api import HandlerContext, check_beneath_grant, read_beneath_async

DEFAULT_MAX_BYTES = 10 * 1024 * 1024


class FileReadArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Request args: the absolute path to read."""

    path: str


class FileReadGrant(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Grant entry: absolute directories the component may read beneath."""

    enabled: bool = False
    directories: list[Annotated[str, msgspec.Meta(pattern="^/")]] = []


META: dict[str, Any] = {
    "requires_scope": True,
    "supports_modes": ["sandbox"],
    "description": "Read a file inside a granted directory (returns its bytes).",
    "grant_schema": FileReadGrant,
    "args_schema": FileReadArgs,
    "target": "path",
    # A read: one audit event after it ran (decision and bytes), stored before the data is released.
    "side_effect_free": True,
}


def authorize(grant: Mapping[str, Any], args: FileReadArgs) -> None:
    """Refuse before anything is recorded as allowed: the path must lie beneath a granted directory."""
    check_beneath_grant(args.path, grant.get("directories") or [])


async def execute(ctx: HandlerContext, args: FileReadArgs) -> dict[str, Any]:
    """Return the file's content as bytes, at most `max_bytes` (scope default 7 MiB, below the NATS payload limit).

    Small files are read in the event loop; larger ones in the Pack's own handler threads.
    """
    max_bytes = int(ctx.grant.get("max_bytes", DEFAULT_MAX_BYTES))
    data = await read_beneath_async(ctx, args.path, max_bytes)
    ctx.audit["bytes"] = len(data)
    return {"success": True, "data": data}
