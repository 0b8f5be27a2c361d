"""Call a shipped handler file the way the service does, from a test.

The file is loaded by the broker's own loader (`load_handler_source`); `execute` converts a test's
dict context into the typed `HandlerContext`, refuses a disabled grant and validates the args with
the handler's `args_schema`, as `broker.service` does before it runs a handler. The service's side
of this is tested end to end through a real broker (tests/test_broker.py, tests/test_handler_api.py).
"""

from __future__ import annotations

import asyncio
import inspect
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio

from broker.core.context import HandlerContext, Limits
from broker.core.errors import Denied
from broker.core.protected import ProtectedSet
from broker.policy.plugins import HandlerPlugin, load_handler_source

REPO = Path(__file__).resolve().parents[1]
HANDLERS = REPO / "config" / "handlers"

# Dict keys tests use → HandlerContext fields.
_RENAMED = {"egress_resolver": "resolver", "egress_verify": "tls_verify"}
_FIELDS = set(HandlerContext.__dataclass_fields__)


def file_context(
    directories: list[str],
    protected: ProtectedSet | None = None,
    pack_id: str = "p1",
    *,
    max_bytes: int | None = None,
) -> HandlerContext:
    """The context a file back-end call gets for a grant of `directories` (tool `<pack_id>:tool:t`)."""
    grant: dict[str, Any] = {"enabled": True, "directories": directories}
    if max_bytes is not None:
        grant["max_bytes"] = max_bytes
    return HandlerContext(
        pack_id=pack_id,
        component_id=f"{pack_id}:tool:t",
        request_id="r1",
        grant=grant,
        limits=Limits(timeout=5),
        protected=protected if protected is not None else ProtectedSet(),
    )


def as_context(context: HandlerContext | Mapping[str, Any]) -> HandlerContext:
    """A HandlerContext from a test's dict (unknown keys are a mistake in the test, not ignored)."""
    if isinstance(context, HandlerContext):
        return context
    values: dict[str, Any] = {}
    for key, value in context.items():
        name = _RENAMED.get(key, key)
        if name not in _FIELDS:
            raise TypeError(f"HandlerContext has no field for {key!r}")
        values[name] = value
    limits = values.get("limits")
    if isinstance(limits, Mapping):
        values["limits"] = Limits(
            timeout=float(limits.get("timeout", math.inf)),
            max_reply_bytes=int(limits.get("max_reply_bytes", 0)),
        )
    root = values.get("workspace_root")
    if isinstance(root, str):
        values["workspace_root"] = Path(root)
    return HandlerContext(**values)


class LoadedHandler:
    """A handler file's module (attributes pass through) whose `execute` is called as the service calls it."""

    def __init__(self, path: Path) -> None:
        self.plugin: HandlerPlugin = load_handler_source(path, path.read_bytes())
        self.module = sys.modules[self.plugin.execute.__module__]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module, name)

    def execute(self, context: HandlerContext | Mapping[str, Any], args: Mapping[str, Any]) -> Any:
        ctx = as_context(context)
        if ctx.grant.get("enabled") is not True:
            raise Denied(f"no grant for {self.plugin.name}")
        converted = self.plugin.convert_args(args)
        if self.plugin.authorize is not None:
            self.plugin.authorize(ctx.grant, converted)
        result = self.plugin.execute(ctx, converted)
        if inspect.isawaitable(result) and not _in_event_loop():
            # A sync test calling an async handler: run it to completion, as the service awaits it.
            async def wait() -> Any:
                return await result

            return anyio.run(wait)
        return result


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def load_handler(name: str) -> LoadedHandler:
    """A shipped handler file (config/handlers/<name>.py), loaded as the broker loads plugins."""
    return LoadedHandler(HANDLERS / f"{name}.py")
