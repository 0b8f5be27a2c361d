"""Built-in handler file_write: atomically write a file inside a granted directory.

The new content goes to a temp file beside the target, is fsynced and renamed over it
(see broker.backends.files.write_beneath): never half-written, a symlink at the target is replaced, not followed.
`parents: true` also creates the missing directories between the granted directory and the file
(never outside it; no `.`/`..` components, at most 32 levels).
"""

# No `from __future__ import annotations`: msgspec must see real types even when the
# broker loads this file without registering it in sys.modules.
from collections.abc import Mapping
from typing import Annotated, Any

import msgspec

from broker.handler_api import HandlerContext, TooLarge, check_beneath_grant, write_beneath

DEFAULT_MAX_BYTES = 10 * 1024 * 1024


class FileWriteArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Request args: the absolute path, the bytes to write (msgpack bin), whether to create missing parents."""

    path: str
    data: bytes
    parents: bool = False


class FileWriteGrant(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Grant entry: absolute directories the component may write beneath."""

    enabled: bool = False
    directories: list[Annotated[str, msgspec.Meta(pattern="^/")]] = []


META: dict[str, Any] = {
    "requires_scope": True,
    "supports_modes": ["sandbox"],
    "description": "Write a file inside a granted directory (atomic replace).",
    "grant_schema": FileWriteGrant,
    "args_schema": FileWriteArgs,
    "target": "path",
}


def authorize(grant: Mapping[str, Any], args: FileWriteArgs) -> None:
    """Refuse before anything is recorded as allowed: size within the grant, a file name beneath a granted directory."""
    max_bytes = int(grant.get("max_bytes", DEFAULT_MAX_BYTES))
    if len(args.data) > max_bytes:
        raise TooLarge(f"data is larger than {max_bytes} bytes")
    check_beneath_grant(args.path, grant.get("directories") or [], for_write=True)


def execute(ctx: HandlerContext, args: FileWriteArgs) -> dict[str, Any]:
    """Write `data` to `path`; return {"bytes_written": n}."""
    max_bytes = int(ctx.grant.get("max_bytes", DEFAULT_MAX_BYTES))
    written = write_beneath(ctx, args.path, args.data, max_bytes, parents=args.parents)
    ctx.audit["bytes"] = written
    return {"success": True, "data": {"bytes_written": written}}
