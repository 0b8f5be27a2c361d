"""The example Pack: one tool that tries every capability and reports what the broker allowed."""

from __future__ import annotations

import os
from typing import Any

from pack_runtime import BrokerError, Pack, PermissionDenied

pack = Pack()
SANDBOX = os.environ.get("RUMI_SANDBOX", "/sandbox")


async def attempt(label: str, capability: str, make: Any) -> dict[str, Any]:
    try:
        result = await make()
    except PermissionDenied as exc:
        return {"attempt": label, "capability": capability, "outcome": "denied", "code": exc.code,
                "detail": exc.message}
    except BrokerError as exc:
        return {"attempt": label, "capability": capability, "outcome": "error", "code": exc.code,
                "detail": exc.message}
    if isinstance(result, bytes):
        result = result.decode(errors="replace")
    if isinstance(result, str) and capability == "env_read":
        result = f"<{len(result)} characters>"  # the demo never prints a secret
    return {"attempt": label, "capability": capability, "outcome": "allowed", "code": "ok",
            "detail": str(result)[:80]}


@pack.tool("my_tool")
async def my_tool(ctx: Any, args: dict[str, Any]) -> dict[str, Any]:
    note = str(args.get("note", "hello from the default Pack"))
    attempts = [
        ("write a file in its sandbox", "file_write",
         lambda: ctx.file_write(f"{SANDBOX}/hello.txt", note.encode())),
        ("read it back", "file_read", lambda: ctx.file_read(f"{SANDBOX}/hello.txt")),
        ("read /etc/passwd", "file_read", lambda: ctx.file_read("/etc/passwd")),
        ("escape with ../ to the broker's credentials", "file_read",
         lambda: ctx.file_read(f"{SANDBOX}/../../.rumi/creds/broker.nk")),
        ("read the granted key RUMI_DEMO_GREETING", "env_read", lambda: ctx.env_read("RUMI_DEMO_GREETING")),
        ("read an ungranted key HOME", "env_read", lambda: ctx.env_read("HOME")),
        ("run `ls` in the sandbox", "terminal", lambda: ctx.terminal(["ls", "-la"], cwd=SANDBOX)),
        ("fetch a URL", "network", lambda: ctx.http("GET", args.get("url", "http://127.0.0.1:9/"))),
    ]
    results = [await attempt(label, cap, make) for label, cap, make in attempts]
    return {"pack": pack.pack_id, "attempts": results}


if __name__ == "__main__":
    pack.run()
