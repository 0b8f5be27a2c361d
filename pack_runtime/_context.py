"""The object a tool receives: requests to the broker on behalf of one component."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from typing import Any, Literal, Protocol, overload

import msgspec

from ._errors import BrokerError, error_from_reply
from ._wire import ENCODER, PROTOCOL_VERSION, REPLY_DECODER, Request, request_subject


class Connection(Protocol):
    """What a Context needs of its connection: NATS request/reply (nats-py's Client, or a test's fake)."""

    async def request(self, subject: str, payload: bytes = b"", timeout: float = 0.5) -> Any:
        """Send `payload` on `subject`; return the reply message (its `.data` holds the bytes)."""


# Seconds a terminal request may take beyond its command's timeout (the sandbox's create and remove).
_TERMINAL_SETUP_S = 10.0


def new_request_id() -> str:
    """A request id: random, URL-safe, unique enough to deduplicate audit events."""
    return secrets.token_hex(12)


class Context:
    """Asks the broker for capabilities as one component (``<pack_id>:<type>:<name>``)."""

    def __init__(self, nc: Connection, pack_id: str, component_id: str, timeout: float) -> None:
        self._nc = nc
        self.pack_id = pack_id
        self.component_id = component_id
        self.timeout = timeout
        # Set by the SDK for a streamed call (`rumi call --stream`): where `progress` goes.
        self._progress: Callable[[Any], Awaitable[None]] | None = None

    async def request(
        self, capability: str, args: dict[str, Any] | None = None, *, timeout: float | None = None
    ) -> Any:
        """Invoke any installed handler; return its ``data`` or raise BrokerError/PermissionDenied.

        `timeout`: seconds to wait for the answer (default: this context's `timeout`).
        """
        from nats.errors import NoRespondersError
        from nats.errors import TimeoutError as NatsTimeout

        request_id = new_request_id()
        payload = ENCODER.encode(
            Request(v=PROTOCOL_VERSION, id=request_id, component_id=self.component_id, args=args or {})
        )
        wait = self.timeout if timeout is None else timeout
        try:
            msg = await self._nc.request(request_subject(self.pack_id, capability), payload, timeout=wait)
        except NatsTimeout:
            raise BrokerError("timeout", f"no answer from the broker within {wait:g} s") from None
        except NoRespondersError:
            raise BrokerError("unavailable", "no broker is serving requests") from None
        try:
            reply = REPLY_DECODER.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
            raise BrokerError("invalid_request", f"malformed reply from the broker: {exc}") from None
        # A reply for another request, or an unknown version, is a broker failure: fail closed.
        if reply.v != PROTOCOL_VERSION or reply.id != request_id:
            raise BrokerError("unavailable", "reply does not match the request")
        if not reply.success:
            err = reply.error
            if err is None:
                raise BrokerError("handler_error", "request failed without an error")
            raise error_from_reply(err.code, err.message)
        return reply.data

    async def file_read(self, path: str) -> bytes:
        """Read a file inside a granted directory."""
        data = await self.request("file_read", {"path": path})
        if not isinstance(data, bytes):
            raise BrokerError("handler_error", "file_read returned no bytes")
        return data

    async def file_write(self, path: str, data: bytes | str, *, parents: bool = False) -> Any:
        """Write a file atomically inside a granted directory.

        `parents=True` also creates the missing directories between the granted directory and the file
        (like ``mkdir -p``; never outside the grant).
        """
        body = data.encode() if isinstance(data, str) else data
        args: dict[str, Any] = {"path": path, "data": body}
        if parents:
            args["parents"] = True  # sent only when asked: a plain write stays valid for any broker
        return await self.request("file_write", args)

    async def env_read(self, key: str) -> str:
        """Read a granted environment key."""
        value = await self.request("env_read", {"key": key})
        if not isinstance(value, str):
            raise BrokerError("handler_error", "env_read returned no string")
        return value

    async def terminal(
        self,
        argv: list[str],
        cwd: str | None = None,
        timeout: float | None = None,
        stdin: bytes | None = None,
    ) -> Any:
        """Run a granted command in a fresh sandbox; returns {"exit_code", "stdout", "stderr"}.

        A `timeout` over the broker's limit (its request_timeout, less a few seconds) or the scope's
        `max_timeout` is refused with ``invalid_request`` naming the limit, never cut short silently.
        """
        args: dict[str, Any] = {"argv": argv}
        if cwd is not None:
            args["cwd"] = cwd
        if timeout is not None:
            args["timeout"] = timeout
        if stdin is not None:
            args["stdin"] = stdin
        # Wait as long as the command may run, and the sandbox's setup besides.
        wait = max(self.timeout, timeout + _TERMINAL_SETUP_S) if timeout is not None else None
        return await self.request("terminal", args, timeout=wait)

    @overload
    async def http(
        self,
        method: str,
        url: str,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        *,
        stream: Literal[False] = False,
    ) -> Any: ...

    @overload
    async def http(
        self,
        method: str,
        url: str,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        *,
        stream: Literal[True],
    ) -> HttpStream: ...

    async def http(
        self,
        method: str,
        url: str,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
        *,
        stream: bool = False,
    ) -> Any:
        """Make an HTTP(S) request through the broker; returns {"status", "headers", "body"}.

        With ``stream=True`` it returns an `HttpStream` as soon as the status and headers are there:
        ``async for chunk in response`` yields the body as the server sends it (server-sent events,
        chunked replies, large downloads), and ``await response.aclose()`` (or ``async with``) ends it
        early. A stream is bounded by the grant (64 MiB and 10 minutes by default).
        """
        args: dict[str, Any] = {"method": method, "url": url}
        if headers:
            args["headers"] = headers
        if body is not None:
            args["body"] = body
        if not stream:
            return await self.request("network", args)
        args["stream"] = True
        return HttpStream(self, await self.request("network", args))

    async def progress(self, update: str | dict[str, Any]) -> None:
        """Tell the caller how the call is going: a line of text, or a small dict (``{"done": 3, "of": 10}``).

        A caller of ``rumi call --stream`` sees each as a ``progress:`` line as it happens; a plain call
        has nobody watching, and this returns at once. Text is cut to 1000 characters, a dict to 16 KiB
        encoded (a bigger one is a ValueError).
        """
        if isinstance(update, str):
            update = update[:MAX_PROGRESS_CHARS]
        elif isinstance(update, dict):
            if len(ENCODER.encode(update)) > MAX_PROGRESS_BYTES:
                raise ValueError(f"a progress dict must encode to at most {MAX_PROGRESS_BYTES} bytes")
        else:
            raise TypeError(f"progress takes a str or a dict, not {type(update).__name__}")
        if self._progress is not None:
            await self._progress(update)


MAX_PROGRESS_CHARS = 1000
MAX_PROGRESS_BYTES = 16 * 1024
STREAM_READ_BYTES = 1024 * 1024  # one `read` (the broker's cap)
_RETRY_CODES = frozenset({"rate_limited"})  # refused before anything ran: safe to send again
_OPEN_AFTER = frozenset({"timeout", "unavailable", "rate_limited"})  # the broker may still hold the stream


class HttpStream:
    """A response whose body arrives in chunks: what ``await ctx.http(..., stream=True)`` returns.

    ``status`` and ``headers`` (``[(name, value), ...]`` as received) are there at once; iterate for
    the body. Reading to the end closes it; stop early with ``await aclose()`` or ``async with``, or
    the broker closes it after `stream_idle_timeout` (60 s) without a read. A failure while reading
    raises `BrokerError` (``too_large`` past the stream's byte cap, ``timeout`` past its lifetime,
    ``permission_denied`` once the grant no longer covers the host).
    """

    def __init__(self, ctx: Context, data: Any) -> None:
        if not isinstance(data, dict) or not isinstance(data.get("stream"), str):
            raise BrokerError(
                "handler_error", "the broker did not open a stream (is it older than this SDK?)"
            )
        self._ctx = ctx
        self.status = int(data["status"])
        self.headers: list[tuple[str, str]] = [(str(k), str(v)) for k, v in data.get("headers", [])]
        self._id: str = data["stream"]
        self._done = False
        # A long-poll must come back well inside the SDK's request timeout.
        self._wait = max(0.5, min(10.0, ctx.timeout / 2))

    def __aiter__(self) -> HttpStream:
        return self

    async def __anext__(self) -> bytes:
        while not self._done:
            args = {"op": "read", "stream": self._id, "max_bytes": STREAM_READ_BYTES, "wait": self._wait}
            try:
                got = await _retrying(self._ctx, args)
            except BrokerError as exc:
                # The broker closed it on any other refusal (caps, revocation, the server failing).
                self._done = exc.code not in _OPEN_AFTER
                if not self._done:
                    await self.aclose()
                raise
            data = bytes(got.get("data") or b"")
            if got.get("eof") or got.get("closed"):
                self._done = True
            if data:
                return data
        raise StopAsyncIteration

    async def read(self) -> bytes:
        """The rest of the body, joined."""
        return b"".join([chunk async for chunk in self])

    async def aclose(self) -> None:
        """Stop reading: the broker drops the connection (nothing to do after the end of the body)."""
        if self._done:
            return
        self._done = True
        try:
            await _retrying(self._ctx, {"op": "close", "stream": self._id})
        except BrokerError:
            pass  # already gone (closed by the broker meanwhile): nothing left to release

    async def __aenter__(self) -> HttpStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def _retrying(ctx: Context, args: dict[str, Any]) -> Any:
    """One `network` request; `rate_limited` (refused before anything ran) is sent again, with backoff."""
    import anyio

    delay = 0.02
    for _ in range(20):
        try:
            return await ctx.request("network", args)
        except BrokerError as exc:
            if exc.code not in _RETRY_CODES:
                raise
        await anyio.sleep(delay)
        delay = min(delay * 2, 0.5)
    raise BrokerError("rate_limited", "the broker kept refusing: too many requests")
