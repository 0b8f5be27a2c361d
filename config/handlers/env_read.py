"""Built-in handler env_read: return the value of one granted key.

Values come from the workspace's secrets file `docker/.rumi/secrets.env` (KEY=VALUE lines; a key
set there wins) or else from the broker's environment. Only keys listed exactly in the grant's
`allowed_keys` are served. The value never reaches the audit record, a log or an error message.
"""

# No `from __future__ import annotations`: msgspec must see real types even when the
# broker loads this file without registering it in sys.modules.
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from broker.handler_api import Denied, HandlerContext, HandlerFailed

SECRETS_FILE = ("docker", ".rumi", "secrets.env")


class EnvReadArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Request args: the name of the key."""

    key: str


class EnvReadGrant(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Grant entry: the exact key names the component may read (no wildcards)."""

    enabled: bool = False
    allowed_keys: list[str] = []


META: dict[str, Any] = {
    "requires_scope": True,
    "supports_modes": ["sandbox"],
    "description": "Read a granted key from the broker's secrets file or environment.",
    "grant_schema": EnvReadGrant,
    "args_schema": EnvReadArgs,
    "target": "key",
    # A read: one audit event after it ran, stored before the value is released.
    "side_effect_free": True,
}


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


# path -> (stamp, parsed assignments): the file is parsed again only when its stamp changes.
_CACHE: dict[Path, tuple[tuple[int, int, int, int], dict[str, str]]] = {}
# A file changed within this many ns of its mtime may have been changed again in the same tick: re-read.
_RACY_NS = 2_000_000_000


def _parse(text: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or "=" not in stripped:
            continue
        name, _, value = stripped.partition("=")
        name = name.strip()
        if name.startswith("export "):
            name = name[len("export ") :].strip()
        found[name] = _unquote(value.strip())  # the last assignment wins, as in a shell
    return found


def _from_secrets_file(workspace_root: Path, key: str) -> str | None:
    """The value of `key` in the secrets file, or None when the file or the key is absent."""
    path = Path(workspace_root, *SECRETS_FILE)
    try:
        st = os.stat(path)
        stamp = (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)
        cached = _CACHE.get(path)
        if cached is not None and cached[0] == stamp and time.time_ns() - st.st_mtime_ns > _RACY_NS:
            return cached[1].get(key)
        values = _parse(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        _CACHE.pop(path, None)
        return None
    except (OSError, UnicodeDecodeError):
        # Say nothing about the content: it holds secrets.
        raise HandlerFailed("the broker's secrets file cannot be read") from None
    _CACHE[path] = (stamp, values)
    return values.get(key)


def authorize(grant: Mapping[str, Any], args: EnvReadArgs) -> None:
    """Only keys the grant lists exactly."""
    allowed = grant.get("allowed_keys") or []
    if not args.key or not isinstance(allowed, list) or args.key not in allowed:
        raise Denied("key is not granted")


async def execute(ctx: HandlerContext, args: EnvReadArgs) -> dict[str, Any]:
    """Return the value of `args.key` if the grant lists it exactly.

    Async on purpose: the work is one small file read, cheaper in the event loop than a hop to a
    thread (and no thread to hold the GIL while the loop waits for it).
    """
    key = args.key
    allowed = ctx.grant.get("allowed_keys") or []
    if not key or not isinstance(allowed, list) or key not in allowed:
        raise Denied("key is not granted")
    value: str | None = None
    if ctx.workspace_root is not None:
        value = _from_secrets_file(ctx.workspace_root, key)
    if value is None:
        value = os.environ.get(key)
    if value is None:
        raise HandlerFailed("key is not set")
    return {"success": True, "data": value}
