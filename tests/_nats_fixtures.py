"""Helpers for tests that run the real embedded nats-server on a temporary workspace."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import nkeys

from broker.bus.creds import Identity
from broker.bus.server import EmbeddedServer
from broker.core.net import free_port
from broker.core.workspace import RumiConfig, Workspace

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
    """Run one async test body with a hard deadline."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def make_workspace(root: Path, packs: Iterable[str]) -> Workspace:
    """A workspace with `ecosystem/<id>/pack.json` for each Pack."""
    ws = Workspace.at(root)
    ws.docker.mkdir(parents=True, exist_ok=True)
    for pack_id in packs:
        src = ws.pack_source(pack_id)
        src.mkdir(parents=True, exist_ok=True)
        (src / "pack.json").write_text(json.dumps({"id": pack_id, "version": "0.1.0"}))
    return ws


@contextmanager
def running_server(ws: Workspace, cfg: RumiConfig | None = None) -> Iterator[EmbeddedServer]:
    """The embedded server for `ws` on a free port, stopped (by pid) however the test ends."""
    server = EmbeddedServer(ws, cfg if cfg is not None else ws.load_config(), port=free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


class Errors:
    """Its `cb` is an `error_cb` recording the asynchronous errors a client gets (permission violations)."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def cb(self, exc: BaseException) -> None:
        self.seen.append(str(exc))

    def violations(self) -> list[str]:
        return [e for e in self.seen if "permissions violation" in e.lower()]

    async def wait_for(self, needle: str, timeout: float = 2.0) -> str:
        """Wait until an error containing `needle` (case-insensitive) arrived; return it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.seen:
                if needle.lower() in e.lower():
                    return e
            await asyncio.sleep(0.02)
        raise AssertionError(f"no error containing {needle!r}; got {self.seen}")


class Collector:
    """Its `cb` is a subscription callback that records (subject, reply, headers, data) and can answer."""

    def __init__(self, answer: bytes | None = None) -> None:
        self.msgs: list[tuple[str, str, dict[str, str], bytes]] = []
        self.answer = answer

    async def cb(self, msg: Any) -> None:
        self.msgs.append((msg.subject, msg.reply, dict(msg.headers or {}), msg.data))
        if self.answer is not None and msg.reply:
            await msg.respond(self.answer)

    def subjects(self) -> list[str]:
        return [m[0] for m in self.msgs]


async def eventually(check: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def settle(*flushes: Callable[[], Awaitable[None]], pause: float = 0.3) -> None:
    """Flush the given clients, then give the server time to deliver anything still in flight."""
    for flush in flushes:
        await flush()
    await asyncio.sleep(pause)


class RawClient:
    """A bare NATS protocol client (nkey auth): sends bytes nats-py would not, e.g. duplicate headers."""

    def __init__(self, port: int, ident: Identity) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=2)
        self.buf = b""
        info = json.loads(self._line().split(b" ", 1)[1])
        kp = nkeys.from_seed(bytearray(ident.seed_path.read_bytes().strip()))
        sig = base64.b64encode(kp.sign(info["nonce"].encode())).decode()
        kp.wipe()
        connect = {"verbose": False, "pedantic": False, "headers": True, "protocol": 1,
                   "nkey": ident.public_key, "sig": sig, "name": "raw"}  # fmt: skip
        self.sock.sendall(b"CONNECT " + json.dumps(connect).encode() + b"\r\nPING\r\n")
        self.expect(b"PONG")

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def expect(self, token: bytes) -> bytes:
        """Read lines (skipping INFO and PING) until one starts with `token`."""
        while True:
            line = self._line()
            if line.startswith(b"PING"):
                self.sock.sendall(b"PONG\r\n")
                continue
            if line.startswith(b"INFO"):
                continue
            if line.startswith(b"-ERR"):
                raise AssertionError(f"server error: {line!r}")
            if line.startswith(token):
                return line

    def sub(self, subject: str, sid: int) -> None:
        self.sock.sendall(f"SUB {subject} {sid}\r\nPING\r\n".encode())
        self.expect(b"PONG")

    def hpub(self, subject: str, reply: str, headers: bytes, body: bytes) -> None:
        head = f"HPUB {subject} {reply} {len(headers)} {len(headers) + len(body)}\r\n".encode()
        self.sock.sendall(head + headers + body + b"\r\nPING\r\n")
        self.expect(b"PONG")

    def next_hmsg(self) -> tuple[str, str, bytes, bytes]:
        """Next HMSG: (subject, reply, raw header block, body)."""
        line = self.expect(b"HMSG")
        parts = line.decode().split(" ")
        subject, reply = parts[1], parts[3] if len(parts) == 6 else ""
        hdr_len, total = int(parts[-2]), int(parts[-1])
        payload = self._exact(total + 2)[:total]
        return subject, reply, payload[:hdr_len], payload[hdr_len:]

    def close(self) -> None:
        self.sock.close()
