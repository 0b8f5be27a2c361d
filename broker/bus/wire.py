"""A lean NATS connection for the broker's two hot paths: a Pack's requests, and the audit writer.

nats-py gives every message a parse into a `Msg`, a queue hop to a subscription task, and every
publish a validated header build and a flusher-task wake-up. On the broker's request path that came
to about a sixth of its CPU per request. This module speaks the client protocol itself (INFO,
CONNECT with the identity's nkey signature, PING/PONG, SUB/UNSUB, PUB/HPUB, MSG/HMSG, -ERR) as an
`asyncio.Protocol`:

- bytes are parsed where they arrive (`data_received`); a subscription with a callback gets it
  called there, in order, without a task; one without gets a bounded queue read by `messages`
  (past its limits a message is dropped and counted, as nats-py does for a slow consumer);
- publishes are appended to one buffer, written once per turn of the event loop;
- a lost connection is re-opened every `reconnect_wait` seconds, forever, and its subscriptions are
  made again. Meanwhile a publish raises `WireError`: nothing is buffered for later, so the audit
  writer's retry and deadline decide (the broker refuses instead of waiting), and a Pack's request
  sent meanwhile goes unanswered (it times out, as with any broker outage).

It is not a general client: no TLS, no JetStream API, no request/reply helper, no drain. The broker
keeps nats-py for everything else (its control connection, the ask desk, stream management).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = ["WireConnection", "WireError", "WireMsg", "WireSubscription", "parse_headers"]

log = logging.getLogger("rumi.wire")

MAX_CONTROL_LINE = 4096  # longer than any control line the server sends (subjects are capped far below)
MAX_WRITE_BUFFER = 64 * 1024 * 1024  # bytes the server has not taken: past this the connection is dropped
_CRLF = b"\r\n"
_HDR_LINE = b"NATS/1.0"


class WireError(Exception):
    """The connection cannot do what was asked (closed, not connected, refused by the server)."""


def parse_headers(raw: bytes) -> dict[str, str]:
    """A NATS header block as nats-py reads it: `Status`/`Description` from the status line, then
    `Name: Value` lines (names ASCII without spaces, values stripped and UTF-8 with replacement; a
    repeated name keeps its last value)."""
    out: dict[str, str] = {}
    first, _, rest = raw.partition(_CRLF)
    if not first.startswith(_HDR_LINE):
        return out
    status_part = first[len(_HDR_LINE) :].strip()
    if status_part:
        code, _, description = status_part.partition(b" ")
        if code.isdigit():
            out["Status"] = code.decode()
        if description:
            out["Description"] = description.decode("utf-8", "replace")
    for line in rest.split(_CRLF):
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        try:
            key = name.strip().decode("ascii")
        except UnicodeDecodeError:
            continue
        if not key or any(c.isspace() for c in key):
            continue
        out[key] = value.strip().decode("utf-8", "replace")
    return out


_CHECKED_NAMES: set[str] = set()  # header names already found valid (the writer uses two, on every event)


def _header_block(headers: dict[str, str]) -> bytes:
    parts = [_HDR_LINE, _CRLF]
    for key, value in headers.items():
        name = key.strip()
        if name not in _CHECKED_NAMES:
            if not name or any(c.isspace() or c == ":" for c in name):
                raise WireError(f"invalid header name {key!r}")
            if len(_CHECKED_NAMES) < 256:
                _CHECKED_NAMES.add(name)
        # A value can never end the header line early: CR and LF are dropped (as nats-py does).
        parts += [name.encode(), b": ", value.strip().replace("\r", "").replace("\n", "").encode(), _CRLF]
    parts.append(_CRLF)
    return b"".join(parts)


def _check_subject(subject: str, what: str) -> bytes:
    raw = subject.encode()
    if not raw or b" " in raw or b"\t" in raw or b"\r" in raw or b"\n" in raw:
        raise WireError(f"invalid {what} {subject!r}")
    return raw


class WireMsg:
    """One delivered message (the attributes the broker reads of a nats-py `Msg`)."""

    __slots__ = ("_conn", "data", "headers", "reply", "subject")

    def __init__(
        self, conn: WireConnection, subject: str, reply: str, data: bytes, headers: dict[str, str] | None
    ) -> None:
        self._conn = conn
        self.subject = subject
        self.reply = reply
        self.data = data
        self.headers = headers

    async def respond(self, data: bytes) -> None:
        """Publish `data` to this message's reply subject."""
        if not self.reply:
            raise WireError("the message has no reply subject")
        self._conn.publish_nowait(self.reply, data)


class WireSubscription:
    """A subscription: its callback runs as messages are parsed, or they queue for `messages`."""

    def __init__(
        self,
        conn: WireConnection,
        sid: int,
        subject: str,
        queue: str,
        cb: Callable[[WireMsg], None] | None,
        pending_msgs_limit: int,
        pending_bytes_limit: int,
    ) -> None:
        self._conn = conn
        self.sid = sid
        self.subject = subject
        self.queue = queue
        self._cb = cb
        self._pending: deque[WireMsg] = deque()
        self._pending_bytes = 0
        self._msgs_limit = pending_msgs_limit
        self._bytes_limit = pending_bytes_limit
        self._waiter: asyncio.Future[None] | None = None
        self.dropped = 0  # messages dropped because the queue was over its limits
        self.closed = False

    def _deliver(self, msg: WireMsg) -> None:
        if self._cb is not None:
            try:
                self._cb(msg)
            except Exception:
                log.exception("subscription callback for %s failed", self.subject)
            return
        size = len(msg.data)
        if len(self._pending) >= self._msgs_limit or self._pending_bytes + size > self._bytes_limit:
            self.dropped += 1
            if self.dropped % 10_000 == 1:
                log.warning(
                    "%s: %d message(s) on %s dropped so far: more than %d messages or %d bytes were waiting",
                    self._conn.name, self.dropped, self.subject, self._msgs_limit, self._bytes_limit,
                )  # fmt: skip
            return
        self._pending.append(msg)
        self._pending_bytes += size
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @property
    def pending(self) -> int:
        """Messages queued and not yet read."""
        return len(self._pending)

    @property
    def messages(self) -> AsyncIterator[WireMsg]:
        """The queued messages, in order; ends when the subscription or connection is closed."""
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[WireMsg]:
        pending = self._pending
        while True:
            while pending:
                msg = pending.popleft()
                self._pending_bytes -= len(msg.data)
                yield msg
            if self.closed:
                return
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _close(self) -> None:
        self.closed = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def unsubscribe(self) -> None:
        """Stop delivery (what is queued can still be read from `messages`, which then ends)."""
        self._conn._unsubscribe(self)


class WireConnection(asyncio.Protocol):
    """One NATS client connection (see the module docstring). Make it with `await WireConnection.open(...)`."""

    delivers_inline = True  # subscription callbacks are plain functions, called as messages are parsed

    def __init__(
        self,
        url: str,
        seed_path: str | Path | None,
        *,
        name: str,
        inbox_prefix: str = "_INBOX",
        reconnect_wait: float = 0.5,
        connect_timeout: float = 5.0,
        ping_interval: float = 30.0,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("nats", "") or not parts.hostname:
            raise WireError(f"unsupported NATS URL {url!r} (nats://HOST:PORT)")
        self.url = url
        self._host, self._port = parts.hostname, parts.port or 4222
        self._seed_path = None if seed_path is None else Path(seed_path)
        self.name = name
        self.inbox_prefix = inbox_prefix
        self.reconnect_wait = reconnect_wait
        self.connect_timeout = connect_timeout
        self.max_payload = 1024 * 1024
        self.server_info: dict[str, Any] = {}
        self._transport: asyncio.Transport | None = None
        self._buf = b""
        self._parts: list[bytes] = []  # a large payload's chunks, joined once it is complete
        self._have = 0
        self._need = 0  # bytes of payload (+ CRLF) the current MSG/HMSG still waits for
        self._msg_head: tuple[int, str, str, int] | None = None  # sid, subject, reply, header size
        self._out: list[bytes] = []
        self._flush_handle: asyncio.Handle | None = None
        self._subs: dict[int, WireSubscription] = {}
        self._next_sid = 0
        # In the order the PINGs went out: a `flush` waiter, or None for a keep-alive PING.
        self._pongs: deque[asyncio.Future[None] | None] = deque()
        self._keepalive: asyncio.TimerHandle | None = None
        self._handshake: asyncio.Future[None] | None = None
        self._hello_sent = False
        self._connected = False
        self._closed = False
        self._reconnecting: asyncio.Task[None] | None = None
        self.reconnects = 0
        self.last_error = ""
        self.ping_interval = ping_interval

    # -- lifecycle -------------------------------------------------------------------------------
    @classmethod
    async def open(
        cls, url: str, seed_path: str | Path | None, *, name: str, inbox_prefix: str = "_INBOX", **kwargs: Any
    ) -> WireConnection:
        """Connect and authenticate; WireError if the server cannot be reached or refuses us."""
        conn = cls(url, seed_path, name=name, inbox_prefix=inbox_prefix, **kwargs)
        await conn._connect()
        return conn

    @property
    def is_closed(self) -> bool:
        return self._closed

    @property
    def is_connected(self) -> bool:
        return self._connected

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        self._buf, self._need, self._msg_head = b"", 0, None
        self._parts, self._have = [], 0
        self._hello_sent = False
        self._handshake = loop.create_future()
        try:
            async with asyncio.timeout(self.connect_timeout):
                await loop.create_connection(lambda: self, self._host, self._port)
                await self._handshake
        except TimeoutError:
            self._drop()
            raise WireError(f"no answer from {self.url} within {self.connect_timeout:g} s") from None
        except OSError as exc:
            raise WireError(f"cannot reach {self.url}: {exc.strerror or exc}") from None
        except BaseException:
            self._drop()
            raise

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def _hello(self, info: dict[str, Any]) -> None:
        """The server's first INFO: answer CONNECT (signed nonce), our subscriptions, and a PING."""
        self.server_info = info
        self.max_payload = int(info.get("max_payload") or self.max_payload)
        options: dict[str, Any] = {
            "verbose": False,
            "pedantic": False,
            "lang": "python3",
            "version": "rumi-wire",
            "protocol": 1,
            "headers": True,
            "no_responders": True,
            "name": self.name,
        }
        if self._seed_path is not None:
            import nkeys  # nats-py's own dependency

            try:
                seed = bytearray(self._seed_path.read_bytes().strip())
                kp = nkeys.from_seed(seed)
            except (OSError, ValueError, nkeys.NkeysError) as exc:
                self.last_error = f"cannot use the seed file {self._seed_path}: {type(exc).__name__}"
                self._drop()
                return
            try:
                options["nkey"] = kp.public_key.decode()
                if "nonce" in info:
                    options["sig"] = base64.b64encode(kp.sign(str(info["nonce"]).encode())).decode()
            finally:
                kp.wipe()
                del seed
        lines = [b"CONNECT " + json.dumps(options, separators=(",", ":")).encode() + _CRLF]
        for sub in self._subs.values():
            lines.append(self._sub_line(sub))
        lines.append(b"PING\r\n")
        assert self._transport is not None
        self._transport.write(b"".join(lines))

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        was_connected, self._connected = self._connected, False
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._out.clear()
        lost = WireError(self.last_error or "the NATS connection was lost")
        if self._handshake is not None and not self._handshake.done():
            self._handshake.set_exception(lost)
        while self._pongs:
            pong = self._pongs.popleft()
            if pong is not None and not pong.done():
                pong.set_exception(lost)
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        if self._closed:
            for sub in list(self._subs.values()):
                sub._close()
            return
        if was_connected and self._reconnecting is None:
            log.warning(
                "NATS connection %s lost (%s); reconnecting", self.name, self.last_error or exc or "closed"
            )
            self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        try:
            while not self._closed:
                await asyncio.sleep(self.reconnect_wait)
                if self._closed:
                    return
                try:
                    await self._connect()
                except WireError as exc:
                    log.debug("reconnect of %s failed: %s", self.name, exc)
                    continue
                self.reconnects += 1
                log.info("NATS connection %s re-established", self.name)
                return
        finally:
            self._reconnecting = None

    def _drop(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    async def close(self) -> None:
        """Close for good: no reconnect; `messages` iterators end after what they hold."""
        if self._closed:
            return
        self._closed = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        if self._transport is not None:
            self._flush()
            self._transport.close()
        for sub in list(self._subs.values()):
            sub._close()
        self._subs.clear()

    # -- subscriptions ---------------------------------------------------------------------------
    def new_inbox(self) -> str:
        return f"{self.inbox_prefix}.{secrets.token_hex(11)}"

    def _sub_line(self, sub: WireSubscription) -> bytes:
        queue = f" {sub.queue}" if sub.queue else ""
        return f"SUB {sub.subject}{queue} {sub.sid}\r\n".encode()

    async def subscribe(
        self,
        subject: str,
        queue: str = "",
        cb: Callable[[WireMsg], None] | None = None,
        pending_msgs_limit: int = 65_536,
        pending_bytes_limit: int = 64 * 1024 * 1024,
    ) -> WireSubscription:
        """Subscribe; `cb` (a plain function) is called for each message as it is parsed, else the
        messages queue for `sub.messages`. The server has the SUB once this returns (a PING answered)."""
        if self._closed:
            raise WireError("the connection is closed")
        _check_subject(subject, "subject")
        if queue:
            _check_subject(queue, "queue group")
        self._next_sid += 1
        sub = WireSubscription(
            self, self._next_sid, subject, queue, cb, pending_msgs_limit, pending_bytes_limit
        )
        self._subs[sub.sid] = sub
        if self._connected:
            self._write(self._sub_line(sub))
            await self.flush()
        return sub

    def _unsubscribe(self, sub: WireSubscription) -> None:
        if self._subs.pop(sub.sid, None) is not None and self._connected:
            self._write(f"UNSUB {sub.sid}\r\n".encode())
        sub._close()

    # -- publishing ------------------------------------------------------------------------------
    def publish_nowait(
        self, subject: str, payload: bytes, reply: str = "", headers: dict[str, str] | None = None
    ) -> None:
        """Queue one message for this turn's write; WireError if not connected or it is too large."""
        if not self._connected:
            raise WireError("not connected to NATS" if not self._closed else "the connection is closed")
        subj = _check_subject(subject, "subject")
        rep = b" " + _check_subject(reply, "reply subject") if reply else b""
        if headers:
            block = _header_block(headers)
            size = len(block) + len(payload)
            if size > self.max_payload:
                raise WireError(f"message of {size} bytes is over the server's limit of {self.max_payload}")
            self._write(b"HPUB %s%s %d %d\r\n%s%s\r\n" % (subj, rep, len(block), size, block, payload))
        else:
            if len(payload) > self.max_payload:
                raise WireError(
                    f"message of {len(payload)} bytes is over the server's limit of {self.max_payload}"
                )
            self._write(b"PUB %s%s %d\r\n%s\r\n" % (subj, rep, len(payload), payload))

    async def publish(
        self, subject: str, payload: bytes = b"", reply: str = "", headers: dict[str, str] | None = None
    ) -> None:
        """`publish_nowait` with nats-py's signature."""
        self.publish_nowait(subject, payload, reply, headers)

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait until the server has processed everything written so far (a PING answered)."""
        if not self._connected:
            raise WireError("not connected to NATS")
        pong: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pongs.append(pong)
        self._write(b"PING\r\n")
        try:
            async with asyncio.timeout(timeout):
                await pong
        except TimeoutError:
            raise WireError(f"the NATS server did not answer a PING within {timeout:g} s") from None

    def flush_now(self) -> None:
        """Write what is queued at once instead of at the end of this turn of the event loop."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self._flush()

    def _write(self, data: bytes) -> None:
        self._out.append(data)
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        transport = self._transport
        if not self._out or transport is None:
            self._out.clear()
            return
        data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
        self._out.clear()
        transport.write(data)
        if transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            # The server takes nothing: drop the connection rather than hold unbounded memory.
            self.last_error = "the NATS server stopped reading from the broker"
            transport.abort()

    # -- parsing ---------------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._msg_head is not None and self._have + len(data) < self._need - len(self._buf):
            # Part of a large payload: keep the chunk, join once, when the message is complete.
            self._parts.append(data)
            self._have += len(data)
            return
        if self._parts:
            data = b"".join([*self._parts, data])
            self._parts, self._have = [], 0
        buf = self._buf + data if self._buf else data
        pos, end = 0, len(buf)
        subs = self._subs
        try:
            while pos < end:
                head = self._msg_head
                if head is not None:
                    need = self._need
                    if end - pos < need:
                        break
                    sid, subject, reply, hdr_size = head
                    body_end = pos + need - 2
                    self._msg_head = None
                    sub = subs.get(sid)
                    if sub is not None:
                        if hdr_size:
                            headers = parse_headers(buf[pos : pos + hdr_size])
                            payload = buf[pos + hdr_size : body_end]
                        else:
                            headers, payload = None, buf[pos:body_end]
                        sub._deliver(WireMsg(self, subject, reply, payload, headers))
                    pos = body_end + 2
                    continue
                eol = buf.find(_CRLF, pos)
                if eol < 0:
                    if end - pos > MAX_CONTROL_LINE:
                        self._protocol_error("control line too long")
                        return
                    break
                line = buf[pos:eol]
                pos = eol + 2
                op = line[:4]
                if op == b"MSG " or op == b"HMSG":
                    args = line[5 if op == b"HMSG" else 4 :].split()
                    hsize = b"0"
                    if op == b"HMSG":
                        if len(args) not in (4, 5):
                            self._protocol_error("malformed HMSG")
                            return
                        hsize = args.pop(-2)
                    if len(args) == 3:
                        a_subject, a_sid, a_size = args
                        a_reply = b""
                    elif len(args) == 4:
                        a_subject, a_sid, a_reply, a_size = args
                    else:
                        self._protocol_error("malformed MSG")
                        return
                    size, header_size = int(a_size), int(hsize)
                    if not 0 <= header_size <= size:
                        self._protocol_error("malformed message sizes")
                        return
                    self._msg_head = (int(a_sid), a_subject.decode(), a_reply.decode(), header_size)
                    self._need = size + 2
                elif op == b"PING":
                    self._write(b"PONG\r\n")
                elif op == b"PONG":
                    self._on_pong()
                elif op == b"INFO":
                    self._on_info(line[5:])
                elif op == b"-ERR":
                    self._on_err(line[4:].strip().strip(b"'").decode("utf-8", "replace"))
                elif op != b"+OK":
                    self._protocol_error(f"unexpected {line[:16]!r}")
                    return
        except (ValueError, UnicodeDecodeError):
            self._protocol_error("unreadable control line")
            return
        self._buf = buf[pos:] if pos < end else b""

    def _on_info(self, raw: bytes) -> None:
        try:
            info = json.loads(raw)
        except ValueError:
            self._protocol_error("unreadable INFO")
            return
        if self._handshake is not None and not self._handshake.done() and not self._hello_sent:
            self._hello_sent = True
            self._hello(info)
        else:
            self.server_info.update(info)  # e.g. lame duck mode, cluster changes

    def _on_pong(self) -> None:
        if self._handshake is not None and not self._handshake.done():
            self._connected = True
            self._handshake.set_result(None)
            self._keepalive = asyncio.get_running_loop().call_later(self.ping_interval, self._ping)
            return
        if self._pongs:
            pong = self._pongs.popleft()
            if pong is not None and not pong.done():
                pong.set_result(None)

    def _ping(self) -> None:
        """Every `ping_interval`: a PING; two unanswered in a row and the server is gone (re-connect)."""
        self._keepalive = None
        if not self._connected or self._transport is None:
            return
        if sum(1 for p in self._pongs if p is None) >= 2:
            self.last_error = "the NATS server stopped answering PINGs"
            self._drop()
            return
        self._pongs.append(None)
        self._write(b"PING\r\n")
        self._keepalive = asyncio.get_running_loop().call_later(self.ping_interval, self._ping)

    def _on_err(self, text: str) -> None:
        self.last_error = text
        lowered = text.lower()
        if "permissions violation" in lowered:
            # Not fatal: the server refused one publish or subscription and keeps the connection.
            log.warning("NATS refused an operation of %s: %s", self.name, text)
            return
        if "authorization violation" in lowered or "authentication" in lowered:
            self.last_error = f"the server rejected the credentials of {self.name!r}"
        log.warning("NATS error on %s: %s", self.name, text)

    def _protocol_error(self, what: str) -> None:
        self.last_error = f"NATS protocol error: {what}"
        self._buf, self._msg_head = b"", None
        self._drop()
