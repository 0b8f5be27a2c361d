"""The HTTP transport of `broker.backends.egress`: an httpcore pool that dials only vetted addresses.

`broker.backends.egress` decides where a request may go (grant, URL, resolution, address rules) and
imports this module only when it sends one: httpx, httpcore and the TLS setup are not loaded to read
or check a grant (`rumi grants` loads every handler file). This module imports nothing of the broker.

- `PinnedBackend` is an httpcore network backend that connects only to the addresses egress checked
  for the one origin it was made for, and refuses any other host, port or a Unix socket; the Host
  header, TLS SNI and certificate check keep the URL's host name.
- `PinnedTransport` is an httpx transport over an httpcore pool with that backend: HTTP/1.1, one
  connection, no retries, only the `timeout` extension passed through.
- `ssl_context` is the verifying TLS context: certifi's CA bundle unless a test gives its own.
"""

from __future__ import annotations

import functools
import ipaddress
import ssl
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

import certifi
import httpcore
import httpx

__all__ = ["PinnedBackend", "PinnedTransport", "ssl_context"]


class PinnedBackend(httpcore.AsyncNetworkBackend):
    """A network backend that dials only the vetted addresses of one vetted (host, port).

    httpcore asks it for `connect_tcp(host, port)` with the URL's own host; it answers by connecting to
    the addresses checked for that host, in order, and refuses any other host, port or a Unix socket.
    TLS then runs over that stream with `server_hostname` = the URL's host (SNI and certificate).
    The caller bounds how many addresses it passes (`egress.MAX_ADDRESSES_TRIED`).
    """

    def __init__(
        self,
        host: str,
        port: int,
        addresses: Sequence[ipaddress.IPv4Address | ipaddress.IPv6Address],
        inner: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        self._host = host
        self._port = port
        self._addresses = tuple(addresses)
        self._inner = inner if inner is not None else httpcore.AnyIOBackend()
        self.dialed: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        """Connect to the first vetted address that answers; anything unvetted is refused."""
        if host != self._host or port != self._port or not self._addresses:
            raise httpcore.ConnectError("refused: this origin was not vetted")
        failure: Exception | None = None
        for address in self._addresses:
            self.dialed.append(address)
            try:
                return await self._inner.connect_tcp(
                    str(address), port, timeout, local_address, socket_options
                )
            except httpcore.ConnectError as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        """Never: a URL cannot name a Unix socket here."""
        raise httpcore.ConnectError("refused: Unix sockets are not reachable")

    async def sleep(self, seconds: float) -> None:
        """Delegate to the wrapped backend."""
        await self._inner.sleep(seconds)


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, stream: Any) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        if hasattr(self._stream, "aclose"):
            await self._stream.aclose()


class PinnedTransport(httpx.AsyncBaseTransport):
    """An httpx transport over an httpcore pool that uses a `PinnedBackend` (HTTP/1.1, no retries).

    httpcore exceptions are not translated to httpx ones: `egress.fetch` maps them to contract errors.
    Only the `timeout` extension passes through (no `sni_hostname` override can reach the pool).
    """

    def __init__(self, backend: PinnedBackend, ssl_context: ssl.SSLContext) -> None:
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            http1=True,
            http2=False,
            retries=0,
            max_connections=1,
            network_backend=backend,
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send `request` through the pinned pool; the response body stays unread."""
        assert isinstance(request.stream, httpx.AsyncByteStream)
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,
            extensions={k: v for k, v in request.extensions.items() if k == "timeout"},
        )
        response = await self._pool.handle_async_request(core_request)
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_ResponseStream(response.stream),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        """Close every connection of the pool."""
        await self._pool.aclose()


@functools.lru_cache(maxsize=1)
def _default_ssl_context() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=certifi.where())


def ssl_context(verify: ssl.SSLContext | str | None) -> ssl.SSLContext:
    """The TLS context for `verify`: certifi's CA bundle (made once) for None, a given context as is,
    or a context trusting the CA file at a path."""
    if verify is None:
        return _default_ssl_context()
    if isinstance(verify, ssl.SSLContext):
        return verify
    return ssl.create_default_context(cafile=verify)
