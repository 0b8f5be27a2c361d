"""An HTTP(S) proxy inside the Pack container, so unmodified `requests`, `urllib` and `httpx` work.

The container sets `HTTP_PROXY`/`HTTPS_PROXY` (and lowercase) to `http://127.0.0.1:3128`, `NO_PROXY`
empty, and `RUMI_PROXY_LISTEN=127.0.0.1:3128`; `Pack.serve` then runs `serve_proxy`. The proxy
opens nothing itself: every connection becomes requests to the broker's `network` capability as
the component `<pack_id>:pack:_` (so that is the component the admin grants network to).

- `CONNECT host:port` → `open` (the broker checks the grant and the address, and connects);
  `200 Connection Established`, then bytes are pumped with `send` and long-polled `recv` until
  either side closes. TLS stays end to end: the proxy never decrypts, and the broker checks that
  the ClientHello's server name is the CONNECT host. The broker opens tunnels to port 443 only,
  unless the grant sets `plaintext_tunnel` (elsewhere the bytes could be plaintext carrying any
  `Host:` header): any other port is a `403`.
- `GET http://host/...` (absolute form, plain HTTP) → one `fetch` with `stream: true`: status and
  headers are written back at once, then the body as it arrives (`read` long-polls), so chunked
  replies and server-sent events reach the client as the server sends them; then the connection
  is closed. The server's `Content-Length` is kept; without one the body goes to an HTTP/1.1 client
  chunked (a cut-off body is then visible as such), to HTTP/1.0 delimited by the close. The
  client's `Host` header is dropped: the broker writes it from the URL it checked. Redirects are
  returned to the client, which follows them (each hop through the proxy, each checked again).
- A refusal is `403 Forbidden` (permission_denied) or `502 Bad Gateway` (anything else), with
  `X-Rumi-Error: <code>` and `rumi: <code>: <message>` as the body.

Standard library asyncio only; it listens on loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import ipaddress
import logging
import re
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskStatus

from ._errors import BrokerError

if TYPE_CHECKING:
    from ._context import Context

__all__ = ["ProxyServer", "parse_listen", "serve_proxy"]

log = logging.getLogger("pack_runtime.proxy")

CHUNK_BYTES = 1024 * 1024  # one send/recv (the broker's cap)
MAX_HEAD_BYTES = 64 * 1024
MAX_BODY_BYTES = 7 * 1024 * 1024  # the broker's default max_request_bytes
HEAD_TIMEOUT = 30.0
CLOSE_GRACE = 5.0  # after the remote side ended, how long the client may keep its side open
MAX_CONNECTIONS = 64
RATE_LIMIT_RETRIES = 20
_AUTHORITY_RE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):([0-9]{1,5})$")
_TOKEN_RE = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# Hop-by-hop and framing headers: this proxy and the broker own them, never the end points.
_HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "proxy-authenticate",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "expect",
        "http2-settings",
    }
)


def parse_listen(text: str) -> tuple[str, int]:
    """`host:port` (`[v6]:port`) of a loopback address; ValueError otherwise (never a public listener)."""
    host, sep, port = text.strip().rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"RUMI_PROXY_LISTEN={text!r} must be host:port, e.g. 127.0.0.1:3128")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"RUMI_PROXY_LISTEN={text!r} must be a loopback address (127.0.0.1 or ::1)")
    return host, int(port)


class _ProxyRefusal(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def _refusal(exc: BrokerError) -> _ProxyRefusal:
    status = 403 if exc.code == "permission_denied" else 502
    return _ProxyRefusal(status, exc.code, exc.message)


class _PumpState:
    """How a tunnel's pumping ended: decides whether the proxy still has to `close` it."""

    def __init__(self) -> None:
        self.sent_eof = False
        self.got_eof = False
        self.broker_error: str | None = None
        self.closed_by_broker = False

    @property
    def needs_close(self) -> bool:
        # The broker closes a tunnel itself once EOF went both ways, and on the refusals it answers
        # (SNI, revocation, caps); a close then would only be one more audited error.
        if self.closed_by_broker or (self.sent_eof and self.got_eof):
            return False
        return self.broker_error in (None, "timeout", "unavailable", "rate_limited")


class ProxyServer:
    """Serves proxy clients on one loopback address; each connection is handled on its own."""

    def __init__(
        self, ctx: Context, *, recv_wait: float | None = None, max_connections: int = MAX_CONNECTIONS
    ) -> None:
        self._ctx = ctx
        # A long-poll must come back well inside the SDK's request timeout.
        self._wait = recv_wait if recv_wait is not None else max(0.5, min(10.0, ctx.timeout / 2))
        # A send must fit the server's payload limit with the request's envelope.
        max_payload = int(getattr(ctx._nc, "max_payload", 0) or CHUNK_BYTES + 4096)
        self._chunk = max(4096, min(CHUNK_BYTES, max_payload - 4096))
        self._slots = asyncio.Semaphore(max_connections)
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen; return the bound (host, port)."""
        self._server = await asyncio.start_server(self._handle, host, port, limit=MAX_HEAD_BYTES)
        name = self._server.sockets[0].getsockname()
        return str(name[0]), int(name[1])

    async def close(self) -> None:
        """Stop listening (open connections end with their tunnels)."""
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    # -- one client connection --------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._slots.locked():
            await _respond_error(writer, 503, "unavailable", "too many proxy connections")
            return
        async with self._slots:
            try:
                await self._serve_one(reader, writer)
            except _ProxyRefusal as exc:
                await _respond_error(writer, exc.status, exc.code, exc.message)
            except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
                pass
            except Exception:
                log.exception("proxy connection failed")
            finally:
                writer.close()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
        except asyncio.LimitOverrunError:
            raise _ProxyRefusal(431, "invalid_request", "request head is too large") from None
        method, target, headers, version = _parse_head(head)
        if method == "CONNECT":
            await self._tunnel(target, reader, writer)
        elif target.lower().startswith("http://"):
            await self._forward(method, target, headers, reader, writer, chunked_ok=version != "HTTP/1.0")
        else:
            raise _ProxyRefusal(
                400, "invalid_request", "this is a proxy: send CONNECT host:port or an absolute http:// URL"
            )

    async def _request(self, args: dict[str, Any]) -> Any:
        """One broker request; `rate_limited` (refused before anything ran) is retried with backoff."""
        delay = 0.02
        for _ in range(RATE_LIMIT_RETRIES):
            try:
                return await self._ctx.request("network", args)
            except BrokerError as exc:
                if exc.code != "rate_limited":
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)
        raise BrokerError("rate_limited", "the broker kept refusing: too many requests")

    # -- CONNECT ---------------------------------------------------------------------------------
    async def _tunnel(self, target: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        m = _AUTHORITY_RE.match(target)
        if m is None:
            raise _ProxyRefusal(400, "invalid_request", "CONNECT needs host:port")
        host, port = m.group(1).strip("[]"), int(m.group(2))
        try:
            opened = await self._request({"op": "open", "host": host, "port": port})
        except BrokerError as exc:
            raise _refusal(exc) from None
        tunnel = str(opened["tunnel"])
        writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        state = _PumpState()
        try:
            await writer.drain()
            await self._pump(tunnel, reader, writer, state)
        finally:
            if state.needs_close:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._ctx.request("network", {"op": "close", "tunnel": tunnel}), 5)

    async def _pump(
        self, tunnel: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: _PumpState
    ) -> None:
        async def op(args: dict[str, Any]) -> Any:
            try:
                answer = await self._request(args)
            except BrokerError as exc:
                state.broker_error = exc.code
                raise
            if isinstance(answer, dict) and answer.get("closed"):
                state.closed_by_broker = True
            return answer

        async def up() -> None:
            while True:
                data = await reader.read(self._chunk)
                if not data:
                    await op({"op": "send", "tunnel": tunnel, "data": b"", "eof": True})
                    state.sent_eof = True
                    return
                await op({"op": "send", "tunnel": tunnel, "data": data})

        async def down() -> None:
            while True:
                got = await op({"op": "recv", "tunnel": tunnel, "max_bytes": self._chunk, "wait": self._wait})
                data = got.get("data") or b""
                if data:
                    writer.write(data)
                    await writer.drain()
                if got.get("eof"):
                    state.got_eof = True
                    if writer.can_write_eof():
                        with contextlib.suppress(OSError):
                            writer.write_eof()
                    return

        up_task = asyncio.ensure_future(up())
        down_task = asyncio.ensure_future(down())
        try:
            done, _ = await asyncio.wait({up_task, down_task}, return_when=asyncio.FIRST_COMPLETED)
            failed = any(t.exception() is not None for t in done)
            if not failed:
                # One side ended cleanly; let the other finish (bounded once the remote side ended).
                rest = down_task if up_task in done else up_task
                grace = None if rest is down_task else CLOSE_GRACE
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(rest), grace)
        finally:
            for task in (up_task, down_task):
                task.cancel()
            await asyncio.gather(up_task, down_task, return_exceptions=True)

    # -- plain HTTP ------------------------------------------------------------------------------
    async def _forward(
        self,
        method: str,
        url: str,
        headers: list[tuple[str, str]],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        chunked_ok: bool = True,
    ) -> None:
        names = {n.lower() for n, _ in headers}
        connection_tokens = {
            t.strip().lower() for n, v in headers if n.lower() == "connection" for t in v.split(",")
        }
        if any(v.strip().lower() == "100-continue" for n, v in headers if n.lower() == "expect"):
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
        body = await _read_body(headers, reader) if names & {"content-length", "transfer-encoding"} else b""
        forwarded: dict[str, str] = {}
        for name, value in headers:
            low = name.lower()
            if low in _HOP_HEADERS or low in connection_tokens:
                continue
            joiner = "; " if low == "cookie" else ", "
            forwarded[name] = f"{forwarded[name]}{joiner}{value}" if name in forwarded else value
        args: dict[str, Any] = {
            "op": "fetch",
            "method": method,
            "url": url,
            "headers": forwarded,
            "follow_redirects": False,
            "stream": True,  # the body comes as it arrives (chunked replies, server-sent events)
        }
        if body:
            args["body"] = body
        try:
            data = await self._request(args)
        except BrokerError as exc:
            raise _refusal(exc) from None
        stream = str(data["stream"])
        state = _PumpState()
        try:
            status = int(data["status"])
            out = bytearray(f"HTTP/1.1 {status} {_reason(status)}\r\n".encode("ascii"))
            length: str | None = None
            for name, value in data.get("headers", []):
                low = str(name).lower()
                if low == "content-length":
                    length = str(value).strip()
                if low in _HOP_HEADERS:
                    continue
                out += f"{name}: {value}\r\n".encode("latin-1")
            bodyless = method == "HEAD" or status < 200 or status in (204, 304)
            chunked = False
            if length is not None and length.isdigit():
                out += f"Content-Length: {length}\r\n".encode()  # the server's (h11 holds it to that)
            elif not bodyless and chunked_ok:
                out += b"Transfer-Encoding: chunked\r\n"
                chunked = True
            out += b"Connection: close\r\n\r\n"
            writer.write(bytes(out))
            await writer.drain()
            await self._relay(stream, writer, state, chunked=chunked, send=not bodyless)
        finally:
            if not state.got_eof and state.needs_close:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._ctx.request("network", {"op": "close", "stream": stream}), 5)

    async def _relay(
        self, stream: str, writer: asyncio.StreamWriter, state: _PumpState, *, chunked: bool, send: bool
    ) -> None:
        """Write the body of a streamed fetch to the client as the broker hands it over."""
        while True:
            try:
                got = await self._request(
                    {"op": "read", "stream": stream, "max_bytes": self._chunk, "wait": self._wait}
                )
            except BrokerError as exc:
                state.broker_error = exc.code
                return  # the client sees a cut-off body (no final chunk, or short of Content-Length)
            if got.get("closed"):
                state.closed_by_broker = True
            data = bytes(got.get("data") or b"")
            if data and send:
                writer.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
                await writer.drain()
            if got.get("eof"):
                state.got_eof = True
                if chunked:
                    writer.write(b"0\r\n\r\n")
                    await writer.drain()
                return


def _parse_head(head: bytes) -> tuple[str, str, list[tuple[str, str]], str]:
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes everything
        raise _ProxyRefusal(400, "invalid_request", "request head is not text") from None
    lines = text[:-4].split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not _TOKEN_RE.match(parts[0]):
        raise _ProxyRefusal(400, "invalid_request", "malformed request line")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN_RE.match(name):
            raise _ProxyRefusal(400, "invalid_request", "malformed header line")
        headers.append((name, value.strip()))
    return parts[0].upper(), parts[1], headers, parts[2]


async def _read_body(headers: list[tuple[str, str]], reader: asyncio.StreamReader) -> bytes:
    encodings = [v.strip().lower() for n, v in headers if n.lower() == "transfer-encoding"]
    lengths = {v.strip() for n, v in headers if n.lower() == "content-length"}
    if encodings:
        if encodings != ["chunked"] or lengths:
            raise _ProxyRefusal(400, "invalid_request", "only a single chunked transfer-encoding is accepted")
        return await _read_chunked(reader)
    if len(lengths) != 1 or not next(iter(lengths)).isdigit():
        raise _ProxyRefusal(400, "invalid_request", "malformed Content-Length")
    size = int(next(iter(lengths)))
    if size > MAX_BODY_BYTES:
        raise _ProxyRefusal(413, "too_large", f"request body is larger than {MAX_BODY_BYTES} bytes")
    return await asyncio.wait_for(reader.readexactly(size), HEAD_TIMEOUT)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        line = await asyncio.wait_for(reader.readuntil(b"\r\n"), HEAD_TIMEOUT)
        size_text = line[:-2].split(b";", 1)[0].strip()
        if not size_text or len(size_text) > 8 or not all(c in b"0123456789abcdefABCDEF" for c in size_text):
            raise _ProxyRefusal(400, "invalid_request", "malformed chunk size")
        size = int(size_text, 16)
        if size == 0:
            while (await asyncio.wait_for(reader.readuntil(b"\r\n"), HEAD_TIMEOUT)) != b"\r\n":
                pass  # trailers are dropped
            return bytes(body)
        if len(body) + size > MAX_BODY_BYTES:
            raise _ProxyRefusal(413, "too_large", f"request body is larger than {MAX_BODY_BYTES} bytes")
        body += await asyncio.wait_for(reader.readexactly(size + 2), HEAD_TIMEOUT)
        del body[-2:]


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


async def _respond_error(writer: asyncio.StreamWriter, status: int, code: str, message: str) -> None:
    body = f"rumi: {code}: {message}\n".encode()
    head = (
        f"HTTP/1.1 {status} {_reason(status)}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"X-Rumi-Error: {code}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    with contextlib.suppress(ConnectionError, OSError, RuntimeError):
        writer.write(head.encode("latin-1") + body)
        await asyncio.wait_for(writer.drain(), 5)


async def serve_proxy(
    ctx: Context, listen: str, *, task_status: TaskStatus[tuple[str, int]] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Listen on `listen` (loopback `host:port`) and serve until cancelled; `started()` gets the address."""
    host, port = parse_listen(listen)
    server = ProxyServer(ctx)
    bound = await server.start(host, port)
    log.info(
        "HTTP(S) proxy for unmodified clients on %s:%d (component %s)", bound[0], bound[1], ctx.component_id
    )
    try:
        task_status.started(bound)
        await anyio.sleep_forever()
    finally:
        with anyio.CancelScope(shield=True):
            await server.close()
