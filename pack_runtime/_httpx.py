"""An httpx transport that sends every request through the broker's `network` capability.

```python
import httpx, openai
from pack_runtime import BrokerTransport

client = httpx.AsyncClient(transport=BrokerTransport(ctx))
llm = openai.AsyncOpenAI(http_client=client)
```

The broker checks the domain and port against the grant, resolves and vets the address itself, and
returns the whole response (no streaming).  httpx is optional: it is imported only here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx

from ._errors import BrokerError

if TYPE_CHECKING:
    from ._context import Context


class BrokerTransport(httpx.AsyncBaseTransport):
    """Route an httpx.AsyncClient through `ctx.http`; denials surface as httpx errors."""

    def __init__(self, ctx: Context) -> None:
        self._ctx = ctx

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        # One value per header name: later duplicates are joined as HTTP allows.
        headers: dict[str, str] = {}
        for name, value in request.headers.multi_items():
            if name.lower() in {"host", "content-length", "transfer-encoding", "connection"}:
                continue
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        try:
            data = await self._ctx.http(request.method, str(request.url), headers=headers, body=body)
        except BrokerError as exc:
            raise BrokerTransportError(exc, request) from exc
        return httpx.Response(
            status_code=int(data["status"]),
            headers=[(str(k), str(v)) for k, v in data.get("headers", [])],
            content=bytes(data.get("body", b"")),
            request=request,
        )


class BrokerTransportError(httpx.TransportError):
    """The broker refused or failed the request; `.broker_error` holds the typed error."""

    def __init__(self, error: BrokerError, request: httpx.Request) -> None:
        super().__init__(str(error), request=request)
        self.broker_error = error
        self.code = error.code
