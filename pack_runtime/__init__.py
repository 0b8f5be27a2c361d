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

from ._context import Context
from ._errors import BrokerError, PermissionDenied
from ._pack import Pack

__all__ = ["BrokerError", "Context", "Pack", "PermissionDenied"]
