"""Rumi Pack SDK: everything a Pack does outside its container goes through the broker.

```python
from pack_runtime import Pack, PermissionDenied, BrokerError

pack = Pack()

@pack.tool("my_tool")
async def my_tool(ctx, args):
    return {"text": (await ctx.file_read("/data/a.txt")).decode()}

if __name__ == "__main__":
    pack.run()
```
"""

from typing import Any

from ._context import Context
from ._errors import BrokerError, PermissionDenied
from ._pack import Pack

__all__ = ["BrokerError", "BrokerTransport", "Context", "Pack", "PermissionDenied"]


def __getattr__(name: str) -> Any:
    # httpx is optional inside Pack images: import the transport only when asked for.
    if name == "BrokerTransport":
        from ._httpx import BrokerTransport

        return BrokerTransport
    raise AttributeError(f"module 'pack_runtime' has no attribute {name!r}")
