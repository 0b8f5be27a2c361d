"""The one module a handler file imports from the broker (see docs/handlers.md).

A handler file in `docker/handlers/<capability>.py` defines::

    META = {"requires_scope": True, "supports_modes": ["sandbox"], "description": "...",
            "grant_schema": MyGrant,     # optional msgspec Struct with `enabled: bool = False`
            "args_schema": MyArgs,       # optional msgspec Struct: the service validates args with it
            "target": "path"}            # optional: the audited target (an arg name, or callable(args))

    def execute(ctx: HandlerContext, args: MyArgs) -> dict: ...        # or async def
    def authorize(grant: Mapping[str, Any], args: MyArgs) -> None: ...  # optional, pure: raise Denied
    async def shutdown() -> None: ...                                    # optional: end open sessions

The service has already checked the grant is enabled and validated `args` against `args_schema`
(without one, `args` is the request's dict). `execute` returns `{"success": True, "data": ...}` or
raises one of the errors below; any other exception becomes a safe `handler_error`.
"""

from __future__ import annotations

from broker.backends import egress, files, tunnels
from broker.backends import terminal as sandbox
from broker.backends.files import (
    check_beneath_grant,
    find_grant_root,
    protected_set,
    read_beneath,
    read_beneath_async,
    write_beneath,
)
from broker.core.context import HandlerContext, Limits
from broker.core.errors import (
    Denied,
    HandlerFailed,
    InvalidRequest,
    RateLimited,
    RequestError,
    Timeout,
    TooLarge,
    Unavailable,
)
from broker.core.ids import is_pack_id

__all__ = [
    "Denied",
    "HandlerContext",
    "HandlerFailed",
    "InvalidRequest",
    "Limits",
    "RateLimited",
    "RequestError",
    "Timeout",
    "TooLarge",
    "Unavailable",
    "check_beneath_grant",
    "egress",
    "files",
    "find_grant_root",
    "is_pack_id",
    "protected_set",
    "read_beneath",
    "read_beneath_async",
    "sandbox",
    "tunnels",
    "write_beneath",
]
