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

from typing import TYPE_CHECKING, Any

from broker.backends import files
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

if TYPE_CHECKING:
    from broker.backends import egress, tunnels
    from broker.backends import terminal as sandbox

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


def __getattr__(name: str) -> Any:
    """`egress`, `tunnels` and `sandbox`, imported on first use.

    Loading a handler file to check grants (`rumi grants`) must not load an HTTP client, asyncio or the
    Docker SDK: a handler file names these back-ends inside the functions that use them.
    """
    module: Any
    if name == "egress":
        from broker.backends import egress as module
    elif name == "tunnels":
        from broker.backends import tunnels as module
    elif name == "sandbox":
        from broker.backends import terminal as module
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = module
    return module
