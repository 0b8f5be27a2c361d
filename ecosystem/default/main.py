"""The example Pack: one tool that tries every capability and reports what the broker allowed."""

from __future__ import annotations

import os
from typing import Any

import anyio

from pack_runtime import BrokerError, Pack, PermissionDenied

pack = Pack()
SANDBOX = os.environ.get("RUMI_SANDBOX", "/sandbox")
METADATA_URL = "http://169.254.169.254/latest/meta-data/"


def summary(capability: str, result: Any) -> str:
    if capability == "env_read":
        return f"<{len(result)} characters>"  # the demo never prints a secret
    if capability == "terminal" and isinstance(result, dict):
        out = bytes(result.get("stdout", b"")).decode(errors="replace").strip().splitlines()
        return f"exit {result.get('exit_code')}: {out[-1] if out else ''}"
    if capability == "network" and isinstance(result, dict):
        return f"HTTP {result.get('status')}, {len(result.get('body', b''))} bytes"
    if isinstance(result, bytes):
        return result.decode(errors="replace")
    return str(result)


async def attempt(label: str, capability: str, make: Any) -> dict[str, Any]:
    row = {"attempt": label, "capability": capability}
    try:
        result = await make()
    except PermissionDenied as exc:
        return {**row, "outcome": "denied", "code": exc.code, "detail": exc.message}
    except BrokerError as exc:
        outcome = "not installed" if exc.code == "unknown_capability" else "error"
        return {**row, "outcome": outcome, "code": exc.code, "detail": exc.message}
    except Exception as exc:  # an unmodified library's own error (e.g. the proxy answered 403)
        return {**row, "outcome": "error", "code": type(exc).__name__, "detail": str(exc)[:120]}
    return {**row, "outcome": "allowed", "code": "ok", "detail": summary(capability, result)[:80]}


async def with_requests(url: str) -> dict[str, Any]:
    """An unmodified `requests` call: HTTP_PROXY points at the SDK's proxy, which asks the broker."""
    import requests

    response = await anyio.to_thread.run_sync(lambda: requests.get(url, timeout=30))
    if response.status_code == 403 and response.headers.get("X-Rumi-Error"):
        raise PermissionDenied(response.text.strip())
    return {"status": response.status_code, "body": response.content}


@pack.tool("my_tool")
async def my_tool(ctx: Any, args: dict[str, Any]) -> dict[str, Any]:
    note = str(args.get("note", "hello from the default Pack"))
    url = str(args.get("url", "http://127.0.0.1:9/"))
    attempts = [
        ("write a file in its sandbox", "file_write", lambda: ctx.file_write(f"{SANDBOX}/hello.txt", note.encode())),
        ("read it back", "file_read", lambda: ctx.file_read(f"{SANDBOX}/hello.txt")),
        ("read /etc/passwd", "file_read", lambda: ctx.file_read("/etc/passwd")),
        (
            "escape with ../ to the broker's credentials",
            "file_read",
            lambda: ctx.file_read(f"{SANDBOX}/../../.rumi/creds/broker.nk"),
        ),
        ("read the granted key RUMI_DEMO_GREETING", "env_read", lambda: ctx.env_read("RUMI_DEMO_GREETING")),
        ("read an ungranted key HOME", "env_read", lambda: ctx.env_read("HOME")),
        ("run `ls` in its sandbox", "terminal", lambda: ctx.terminal(["ls", "-a"], cwd=SANDBOX)),
        ("run a shell (not granted)", "terminal", lambda: ctx.terminal(["sh", "-c", "id"], cwd=SANDBOX)),
        ("GET the granted local service (SDK)", "network", lambda: ctx.http("GET", url)),
        ("GET it with unmodified `requests`", "network", lambda: with_requests(url)),
        ("GET the cloud metadata address", "network", lambda: ctx.http("GET", METADATA_URL)),
    ]
    results = [await attempt(label, cap, make) for label, cap, make in attempts]
    return {"pack": pack.pack_id, "attempts": results}


if __name__ == "__main__":
    pack.run()
