"""The object a tool receives: requests to the broker on behalf of one component."""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any

import msgspec

from ._errors import BrokerError, error_from_reply
from ._wire import ENCODER, PROTOCOL_VERSION, REPLY_DECODER, Request, request_subject

if TYPE_CHECKING:
    from nats.aio.client import Client


def new_request_id() -> str:
    """A request id: random, URL-safe, unique enough to deduplicate audit events."""
    return secrets.token_hex(12)


class Context:
    """Asks the broker for capabilities as one component (``<pack_id>:<type>:<name>``)."""

    def __init__(self, nc: Client, pack_id: str, component_id: str, timeout: float) -> None:
        self._nc = nc
        self.pack_id = pack_id
        self.component_id = component_id
        self.timeout = timeout

    async def request(self, capability: str, args: dict[str, Any] | None = None) -> Any:
        """Invoke any installed handler; return its ``data`` or raise BrokerError/PermissionDenied."""
        from nats.errors import NoRespondersError
        from nats.errors import TimeoutError as NatsTimeout

        request_id = new_request_id()
        payload = ENCODER.encode(
            Request(v=PROTOCOL_VERSION, id=request_id, component_id=self.component_id, args=args or {})
        )
        try:
            msg = await self._nc.request(
                request_subject(self.pack_id, capability), payload, timeout=self.timeout
            )
        except NatsTimeout:
            raise BrokerError("timeout", f"no answer from the broker within {self.timeout:g} s") from None
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

    async def file_write(self, path: str, data: bytes | str) -> Any:
        """Write a file atomically inside a granted directory."""
        body = data.encode() if isinstance(data, str) else data
        return await self.request("file_write", {"path": path, "data": body})

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
        """Run a granted command in a fresh sandbox; returns {"exit_code", "stdout", "stderr"}."""
        args: dict[str, Any] = {"argv": argv}
        if cwd is not None:
            args["cwd"] = cwd
        if timeout is not None:
            args["timeout"] = timeout
        if stdin is not None:
            args["stdin"] = stdin
        return await self.request("terminal", args)

    async def http(
        self, method: str, url: str, headers: dict[str, str] | None = None, body: bytes | None = None
    ) -> Any:
        """Make an HTTP(S) request through the broker; returns {"status", "headers", "body"}."""
        args: dict[str, Any] = {"method": method, "url": url}
        if headers:
            args["headers"] = headers
        if body is not None:
            args["body"] = body
        return await self.request("network", args)
