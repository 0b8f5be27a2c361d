"""Errors that say what happened: what a tool's failure looks like to its caller.

* in-process (the SDK's own dispatch, `Pack.answer_call`): `ToolError` gives `tool:<code>`, any other
  exception its type and message (one line, capped, no traceback), validation errors name the field,
  typed arguments are checked before the tool runs;
* through a real nats-server with `rumi call`'s code path (`call_tool`) and the CLI itself: the same
  errors reach the host, with exit codes; a Pack that answers with a made-up code or terminal escapes
  is shown as `handler_error` and cleaned.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, TypedDict

import anyio
import msgspec
import pydantic
import pytest
from typer.testing import CliRunner

from broker.admin.calls import call_tool, pack_error
from broker.cli import app
from broker.core.errors import Denied, HandlerFailed, InvalidRequest
from broker.core.workspace import Workspace
from pack_runtime import BrokerError, Pack, PermissionDenied, ToolError
from pack_runtime._wire import ENCODER, REPLY_DECODER, CallRequest, ErrorInfo, Reply

pytestmark = pytest.mark.anyio


class Invoice(msgspec.Struct, forbid_unknown_fields=True):
    number: int
    customer: str
    lines: list[str] = []


class Person(pydantic.BaseModel):
    name: str
    age: int


class Picky(pydantic.BaseModel):
    name: str

    @pydantic.field_validator("name")
    @classmethod
    def not_admin(cls, value: str) -> str:
        if value == "admin":
            raise LookupError("admin is reserved")  # not a ValueError: pydantic lets it through
        return value


@dataclasses.dataclass
class Point:
    x: int
    y: int


class Options(TypedDict):
    verbose: bool


def make_pack(pack_id: str = "default", **kwargs: Any) -> Pack:
    pack = Pack(pack_id, **kwargs)

    @pack.tool("tool_error")
    async def tool_error(ctx: Any, args: dict[str, Any]) -> None:
        raise ToolError("not_found", "no invoice 42")

    @pack.tool("value_error")
    async def value_error(ctx: Any, args: dict[str, Any]) -> None:
        raise ValueError("x is required")

    @pack.tool("long_error")
    async def long_error(ctx: Any, args: dict[str, Any]) -> None:
        raise RuntimeError("line one\nline two\x1b[31m " + "y" * 5000)

    @pack.tool("bare_error")
    async def bare_error(ctx: Any, args: dict[str, Any]) -> None:
        raise KeyError

    @pack.tool("inner_pydantic")
    async def inner_pydantic(ctx: Any, args: dict[str, Any]) -> None:
        Person.model_validate({"name": "Ada", "age": "old"})

    @pack.tool("inner_msgspec")
    async def inner_msgspec(ctx: Any, args: dict[str, Any]) -> None:
        msgspec.convert({"number": "7", "customer": "c"}, Invoice)

    @pack.tool("passes_denial")
    async def passes_denial(ctx: Any, args: dict[str, Any]) -> None:
        raise PermissionDenied("no grant for file_read")

    @pack.tool("in_group")
    async def in_group(ctx: Any, args: dict[str, Any]) -> None:
        async def child() -> None:
            raise ToolError("child_failed", "from a task group")

        async with anyio.create_task_group() as tg:
            tg.start_soon(child)

    @pack.tool("unencodable")
    async def unencodable(ctx: Any, args: dict[str, Any]) -> object:
        return object()

    @pack.tool("huge")
    async def huge(ctx: Any, args: dict[str, Any]) -> bytes:
        return b"x" * (2 * 1024 * 1024)

    @pack.tool("invoice")
    async def invoice(ctx: Any, args: Invoice) -> dict[str, Any]:
        """Make an invoice."""
        assert isinstance(args, Invoice)
        return {"number": args.number, "lines": len(args.lines)}

    @pack.tool("person")
    async def person(ctx: Any, args: Person) -> str:
        assert isinstance(args, Person)
        return f"{args.name} {args.age}"

    @pack.tool("picky")
    async def picky(ctx: Any, args: Picky) -> str:
        return args.name

    @pack.tool("point")
    async def point(ctx: Any, args: Point) -> int:
        return args.x + args.y

    @pack.tool("options")
    async def options(ctx: Any, args: Options) -> bool:
        return args["verbose"]

    @pack.tool("counts")
    async def counts(ctx: Any, args: dict[str, int]) -> int:
        return sum(args.values())

    return pack


class _NoConnection:
    max_payload = 1024 * 1024

    async def request(self, subject: str, payload: bytes = b"", timeout: float = 0.5) -> Any:
        raise AssertionError("these tools ask the broker for nothing")


async def answer(pack: Pack, name: str, args: dict[str, Any] | None = None) -> Reply:
    data = ENCODER.encode(CallRequest(v=1, id="c1", args=args or {}))
    return REPLY_DECODER.decode(await pack.answer_call(_NoConnection(), "tool", name, data))


def error_of(reply: Reply) -> tuple[str, str]:
    assert not reply.success and reply.error is not None
    return reply.error.code, reply.error.message


# ----------------------------------------------------------------------------------- in-process


@pytest.mark.parametrize(
    ("tool", "args", "code", "message"),
    [
        ("tool_error", {}, "tool:not_found", "no invoice 42"),
        ("value_error", {}, "handler_error", "ValueError: x is required"),
        ("bare_error", {}, "handler_error", "KeyError"),
        ("passes_denial", {}, "permission_denied", "no grant for file_read"),
        ("in_group", {}, "tool:child_failed", "from a task group"),
        # Arguments checked against the declared type before the tool runs: the field is named.
        ("invoice", {"number": "7", "customer": "c"}, "invalid_request", "Expected `int`, got `str` - at `$.number`"),
        ("invoice", {"number": 7}, "invalid_request", "Object missing required field `customer`"),
        ("invoice", {"number": 7, "customer": "c", "extra": 1}, "invalid_request", "unknown field `extra`"),
        ("invoice", {"number": 7, "customer": "c", "lines": [1]}, "invalid_request", "at `$.lines[0]`"),
        ("person", {"name": "Ada"}, "invalid_request", "Field required - at `$.age`"),
        ("person", {"name": "Ada", "age": "old"}, "invalid_request", "valid integer, unable to parse string as an integer - at `$.age`"),
        ("point", {"x": 1}, "invalid_request", "missing required field `y`"),
        ("picky", {"name": "admin"}, "invalid_request", "LookupError: admin is reserved"),
        ("options", {"verbose": "yes"}, "invalid_request", "at `$.verbose`"),
        ("counts", {"a": "1"}, "invalid_request", "at `$.a`"),
        # A validation error inside the tool (not of its arguments) is the tool's failure, naming the field.
        ("inner_pydantic", {}, "handler_error", "ValidationError: Input should be a valid integer, unable to parse string as an integer - at `$.age`"),
        ("inner_msgspec", {}, "handler_error", "ValidationError: Expected `int`, got `str` - at `$.number`"),
        ("unencodable", {}, "handler_error", "the tool's result cannot be encoded"),
        ("huge", {}, "too_large", "over the 1048576-byte message limit"),
        ("nope", {}, "unknown_capability", "this Pack has no tool tool:nope"),
    ],
)  # fmt: skip
async def test_tool_failures_reach_the_caller_as_they_happened(
    tool: str, args: dict[str, Any], code: str, message: str
) -> None:
    got_code, got_message = error_of(await answer(make_pack(), tool, args))
    assert got_code == code
    assert message in got_message, got_message
    if code == "invalid_request":
        assert got_message.startswith("invalid arguments: ")
    assert "Traceback" not in got_message and "\n" not in got_message


async def test_typed_arguments_arrive_converted() -> None:
    pack = make_pack()
    ok = await answer(pack, "invoice", {"number": 7, "customer": "c", "lines": ["a", "b"]})
    assert ok.success and ok.data == {"number": 7, "lines": 2}
    assert (await answer(pack, "person", {"name": "Ada", "age": 36})).data == "Ada 36"
    assert (await answer(pack, "point", {"x": 1, "y": 2})).data == 3
    assert (await answer(pack, "options", {"verbose": True})).data is True
    assert (await answer(pack, "counts", {"a": 1, "b": 2})).data == 3


async def test_messages_are_one_line_capped_and_never_a_traceback(caplog: pytest.LogCaptureFixture) -> None:
    code, message = error_of(await answer(make_pack(), "long_error", {}))
    assert code == "handler_error"
    assert message.startswith("RuntimeError: line one line two")
    assert len(message) <= 500 and message.endswith("…")
    assert not any(ord(c) < 0x20 for c in message)
    # The traceback is the Pack's own log (`rumi logs`), not the caller's business.
    assert any(r.exc_info for r in caplog.records if "long_error" in r.getMessage())


def test_tool_error_codes_cannot_pose_as_broker_codes() -> None:
    err = ToolError("permission_denied", "pretending")
    assert err.wire_code == "tool:permission_denied"  # namespaced: never the broker's own code
    for bad in ("", "Bad", "9lives", "a-b", "a:b", "x" * 33, "tool:x", " x"):
        with pytest.raises(ValueError, match="must match"):
            ToolError(bad, "m")
    assert ToolError("a" * 32, "ok").code == "a" * 32


def test_tool_declarations_are_checked_when_registered() -> None:
    pack = Pack("default")
    with pytest.raises(TypeError, match="args must be a msgspec Struct"):

        @pack.tool("bad")
        async def bad(ctx: Any, args: int) -> None: ...

    with pytest.raises(TypeError, match="cannot resolve the type of args"):

        @pack.tool("unresolved")
        async def unresolved(ctx: Any, args: NotDefinedAnywhere) -> None: ...  # type: ignore[name-defined]  # noqa: F821

    with pytest.raises(ValueError, match="tool type"):
        pack.tool("x", type="_rumi")


# ------------------------------------------------------------------------------- real nats-server


@asynccontextmanager
async def serving(ws: Workspace, pack: Pack) -> AsyncIterator[Pack]:
    async with anyio.create_task_group() as tg:
        await tg.start(pack.serve)
        try:
            yield pack
        finally:
            tg.cancel_scope.cancel()


def real_pack(ws: Workspace) -> Pack:
    from broker.bus.creds import pack_identity
    from broker.bus.server import nats_url

    return make_pack(nats_url=nats_url(ws), creds=str(pack_identity(ws, "default").seed_path))


async def test_call_tool_shows_the_tools_own_error(ws: Workspace, nats_server: object) -> None:
    async with serving(ws, real_pack(ws)):
        with pytest.raises(HandlerFailed) as failed:
            await call_tool(ws, "default", "tool", "tool_error", {}, 10)
        assert str(failed.value) == "tool:not_found: no invoice 42"
        with pytest.raises(HandlerFailed) as failed:
            await call_tool(ws, "default", "tool", "value_error", {}, 10)
        assert str(failed.value) == "handler_error: ValueError: x is required"
        with pytest.raises(InvalidRequest, match=r"invalid_request: invalid arguments: .* at `\$\.number`"):
            await call_tool(ws, "default", "tool", "invoice", {"number": "seven", "customer": "c"}, 10)
        with pytest.raises(Denied, match=r"^permission_denied: no grant for file_read$"):
            await call_tool(ws, "default", "tool", "passes_denial", {}, 10)
        assert await call_tool(ws, "default", "tool", "invoice", {"number": 1, "customer": "c"}, 10) == {
            "number": 1,
            "lines": 0,
        }


def test_rumi_call_prints_one_line_and_exits_4(ws: Workspace, nats_server: object) -> None:
    import threading

    started, stop = threading.Event(), threading.Event()

    def run() -> None:
        async def main() -> None:
            async with serving(ws, real_pack(ws)):
                started.set()
                while not stop.is_set():
                    await anyio.sleep(0.05)

        anyio.run(main)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert started.wait(20)
        runner = CliRunner()
        result = runner.invoke(
            app, ["call", "default:tool:value_error", "--root", str(ws.root), "--timeout", "10"]
        )
        assert result.exit_code == 4, result.output
        assert result.output == "error: handler_error: ValueError: x is required\n"
        result = runner.invoke(
            app, ["call", "default:tool:tool_error", "--root", str(ws.root), "--timeout", "10"]
        )
        assert (result.exit_code, result.output) == (4, "error: tool:not_found: no invoice 42\n")
        result = runner.invoke(
            app,
            [
                "call",
                "default:tool:invoice",
                json.dumps({"number": 1}),
                "--root",
                str(ws.root),
                "--timeout",
                "10",
            ],
        )
        assert result.exit_code == 2 and result.output.count("\n") == 1
        assert "missing required field `customer`" in result.output
    finally:
        stop.set()
        thread.join(20)


async def test_a_pack_cannot_fake_codes_or_escape_the_terminal(ws: Workspace, nats_server: object) -> None:
    """A hand-written Pack answering with its own bytes: unknown codes and control characters are cleaned."""
    from broker.bus.server import connect
    from pack_runtime._wire import CALL_DECODER, error_reply

    nc = await connect(ws, "pack-default")
    replies = iter(
        [
            ("nonsense_code", "evil"),
            ("permission_denied", "line\n\x1b[2Jcleared" + "z" * 2000),
            ("tool:fine_code", "ok message"),
        ]
    )

    async def respond(msg: Any) -> None:
        code, message = next(replies)
        await msg.respond(error_reply(CALL_DECODER.decode(msg.data).id, code, message))

    await nc.subscribe("rumi.pack.default.call.>", cb=respond)
    await nc.flush()
    try:
        with pytest.raises(HandlerFailed) as failed:
            await call_tool(ws, "default", "tool", "x", {}, 10)
        assert (
            str(failed.value) == "handler_error: (the Pack sent the unknown error code 'nonsense_code') evil"
        )
        with pytest.raises(Denied) as denied:
            await call_tool(ws, "default", "tool", "x", {}, 10)
        text = str(denied.value)
        assert "\x1b" not in text and "\n" not in text and len(text) <= 520
        with pytest.raises(HandlerFailed, match=r"^tool:fine_code: ok message$"):
            await call_tool(ws, "default", "tool", "x", {}, 10)
    finally:
        await nc.close()


def test_pack_error_table() -> None:
    cases = [
        (ErrorInfo("tool:a_b", "m"), HandlerFailed, "tool:a_b: m"),
        (
            ErrorInfo("tool:A", "m"),
            HandlerFailed,
            "handler_error: (the Pack sent the unknown error code 'tool:A') m",
        ),
        (ErrorInfo("invalid_request", "bad"), InvalidRequest, "invalid_request: bad"),
        (
            ErrorInfo("x\x1b[0m", "m"),
            HandlerFailed,
            "handler_error: (the Pack sent the unknown error code 'x [0m') m",
        ),
    ]
    for info, cls, text in cases:
        err = pack_error(info)
        assert type(err) is cls and str(err) == text
    assert str(pack_error(None)) == "handler_error: the tool failed without an error"


def test_sdk_errors_keep_their_codes() -> None:
    assert BrokerError("timeout", "m").code == "timeout"
    assert PermissionDenied("m").code == "permission_denied"
