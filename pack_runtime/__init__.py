"""Rumi Pack SDK: everything a Pack does outside its container goes through the broker.

```python
import msgspec
from pack_runtime import Pack, ToolError

pack = Pack()

class ReadArgs(msgspec.Struct):
    name: str

@pack.tool("read")
async def read(ctx, args: ReadArgs):
    '''Read one file of /data (the first docstring line is what `rumi tools` shows).'''
    if "/" in args.name:
        raise ToolError("bad_name", "name must not contain /")    # the caller sees tool:bad_name
    return {"text": (await ctx.file_read(f"/data/{args.name}")).decode()}

if __name__ == "__main__":
    pack.run()
```

`pack_runtime.testing` runs tools in-process against a fake broker (no NATS, no Docker).
"""

from typing import Any

from ._context import Context, HttpStream
from ._errors import BrokerError, PermissionDenied, ToolError
from ._pack import Pack, StreamLimits

__all__ = [
    "BrokerError",
    "BrokerTransport",
    "Context",
    "HttpStream",
    "Pack",
    "PermissionDenied",
    "StreamLimits",
    "ToolError",
]


def __getattr__(name: str) -> Any:
    # httpx is optional inside Pack images: import the transport only when asked for.
    if name == "BrokerTransport":
        from ._httpx import BrokerTransport

        return BrokerTransport
    raise AttributeError(f"module 'pack_runtime' has no attribute {name!r}")
