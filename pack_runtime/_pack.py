"""`Pack`: registers tools and serves tool calls from the bus."""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import inspect
import logging
import math
import os
import re
import secrets
import signal
import time
import types
import typing
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anyio
import msgspec
from anyio.abc import TaskGroup, TaskStatus

from ._context import Connection, Context
from ._errors import BrokerError, ToolError, cap_message
from ._wire import (
    CALL_DECODER,
    CANCEL_NAME,
    ENCODER,
    HEARTBEAT_INTERVAL,
    LISTING_NAME,
    LISTING_TYPE,
    PROTOCOL_VERSION,
    REPLY_DECODER,
    PackStatus,
    StatusState,
    ToolInfo,
    ToolList,
    cancel_subject,
    error_reply,
    ok_reply,
    status_subject,
)

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg

log = logging.getLogger("pack_runtime")

# A tool is an async function, or an async generator (its items stream to the caller).
Tool = Callable[[Context, Any], Awaitable[Any] | AsyncIterator[Any]]
ToolT = typing.TypeVar("ToolT", bound=Callable[..., Awaitable[Any] | AsyncIterator[Any]])
_PACK_ID_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_TYPE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
_MAX_FIELD_ERRORS = 5
# Every instance of a Pack takes calls in this queue group: while `rumi up` swaps an upgraded container
# in, two serve and each call still runs once.
CALL_QUEUE = "rumi-pack"
# Seconds from "ready" to the first "alive"; the next waits double up to the heartbeat interval.
FIRST_HEARTBEAT = 1.0
# Seconds a stopping Pack gives the calls it already took before it cancels them (Docker's stop
# timeout is 10 s).
STOP_GRACE = 8.0


class _CallId(msgspec.Struct):
    """The one field of a CallRequest read before the call is decoded (to cancel it by id)."""

    id: str = ""


_CALL_ID_DECODER = msgspec.msgpack.Decoder(_CallId)


def _call_id(data: bytes) -> str:
    try:
        return _CALL_ID_DECODER.decode(data).id[:64]
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
        return ""


class ArgumentsInvalid(ValueError):
    """A call's arguments do not match the tool's declared type; the message names the field."""


ArgsKind = Literal["dict", "msgspec", "pydantic"]
_UNTYPED: tuple[object, ...] = (
    inspect.Parameter.empty,
    Any,
    object,
    dict,
    typing.Dict,  # noqa: UP006 - an annotation some code still uses
    collections.abc.Mapping,
    typing.Mapping,
)


@dataclasses.dataclass(frozen=True)
class _ToolSpec:
    """A registered tool: the function, how its arguments are checked, what the listing says."""

    type: str
    name: str
    fn: Tool
    kind: ArgsKind
    args_type: Any
    description: str
    schema: dict[str, Any]
    streams: bool = False  # an async generator: its items go to the caller as they come

    def convert(self, args: dict[str, Any]) -> Any:
        """The arguments as the tool declared them; ArgumentsInvalid names the field that is wrong."""
        if self.kind == "dict":
            return args
        if self.kind == "pydantic":
            try:
                return self.args_type.model_validate(args)
            except Exception as exc:
                if _is_pydantic_validation_error(exc):
                    raise ArgumentsInvalid(_pydantic_summary(exc)) from None
                raise
        if typing.get_origin(self.args_type) in (dict, collections.abc.Mapping):
            # Key by key, so an error names the key (msgspec says `$[...]` for a dict's values).
            key_type, value_type = typing.get_args(self.args_type)
            out = {}
            for key, value in args.items():
                at = f"`$.{key}`" if isinstance(key, str) else "`$`"
                try:
                    out[msgspec.convert(key, key_type)] = msgspec.convert(value, value_type)
                except msgspec.ValidationError as exc:
                    text = str(exc)
                    raise ArgumentsInvalid(
                        text.replace(" - at `$", f" - at {at[:-1]}", 1)
                        if " - at `$" in text
                        else f"{text} - at {at}"
                    ) from None
            return out
        try:
            return msgspec.convert(args, self.args_type)
        except msgspec.ValidationError as exc:
            raise ArgumentsInvalid(str(exc)) from None


def _tool_spec(type_: str, name: str, fn: Tool) -> _ToolSpec:
    """Read the tool's declared argument type from its signature (the second parameter)."""
    params = [
        p
        for p in inspect.signature(fn).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    annotation: Any = params[1].annotation if len(params) >= 2 else inspect.Parameter.empty
    annotation = _resolve(fn, annotation, f"{type_}:{name}")
    description = (inspect.getdoc(fn) or "").strip().split("\n", 1)[0][:1000]
    origin = typing.get_origin(annotation)
    if annotation in _UNTYPED or (
        origin in (dict, collections.abc.Mapping) and typing.get_args(annotation)[1:] in ((Any,), ())
    ):
        return _ToolSpec(type_, name, fn, "dict", None, description, {"type": "object"})
    if isinstance(annotation, type) and callable(getattr(annotation, "model_validate", None)):
        try:
            schema = dict(getattr(annotation, "model_json_schema")())  # noqa: B009 - typed as plain `type`
        except Exception as exc:
            raise TypeError(f"tool {type_}:{name}: no JSON Schema for {annotation.__name__}: {exc}") from None
        return _ToolSpec(type_, name, fn, "pydantic", annotation, description, schema)
    try:
        info = msgspec.inspect.type_info(annotation)
        schema = msgspec.json.schema(annotation)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"tool {type_}:{name}: cannot use {annotation!r} as the type of args: {exc}"
        ) from None
    objects = (
        msgspec.inspect.StructType,
        msgspec.inspect.DataclassType,
        msgspec.inspect.TypedDictType,
        msgspec.inspect.DictType,
    )
    if not isinstance(info, objects):
        raise TypeError(
            f"tool {type_}:{name}: args must be a msgspec Struct, a pydantic model, a dataclass, a "
            f"TypedDict or a dict, not {annotation!r}"
        )
    return _ToolSpec(type_, name, fn, "msgspec", annotation, description, schema)


def _resolve(fn: Callable[..., Any], annotation: Any, tool: str) -> Any:
    """An annotation written as a string (``from __future__ import annotations``), evaluated."""
    if not isinstance(annotation, str):
        return annotation
    holder = types.SimpleNamespace(__annotations__={"args": annotation})
    try:
        return typing.get_type_hints(holder, globalns=getattr(fn, "__globals__", {}), include_extras=True)[
            "args"
        ]
    except Exception as exc:
        raise TypeError(
            f"tool {tool}: cannot resolve the type of args {annotation!r} ({type(exc).__name__}: {exc}); "
            "define it at module level"
        ) from None


def _is_pydantic_validation_error(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("pydantic") and callable(getattr(exc, "errors", None))


def _pydantic_summary(exc: BaseException) -> str:
    """`msg - at `$.field`` for each error (the first few), like msgspec's own messages."""
    try:
        errors = list(exc.errors(include_url=False, include_input=False))  # type: ignore[attr-defined]
    except Exception:
        return cap_message(str(exc))
    parts = []
    for err in errors[:_MAX_FIELD_ERRORS]:
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.get("loc", ()))
        parts.append(f"{err.get('msg', 'invalid')} - at `${loc}`")
    if len(errors) > _MAX_FIELD_ERRORS:
        parts.append(f"and {len(errors) - _MAX_FIELD_ERRORS} more")
    return "; ".join(parts) or type(exc).__name__


def describe_exception(exc: BaseException) -> str:
    """``<ExceptionType>: <message>`` on one line, at most 500 characters; validation errors name the field."""
    if _is_pydantic_validation_error(exc):
        text = _pydantic_summary(exc)
    else:
        text = str(exc)
    name = type(exc).__name__
    return cap_message(f"{name}: {text}" if text.strip() else name)


def _leaf(exc: BaseException) -> BaseException:
    """The one exception inside (nested) exception groups of one, e.g. from a tool's task group."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


# --- streamed calls (`rumi call --stream`) ---------------------------------------------------------
# The caller opens one with a CallRequest on `rumi.pack.<id>.call._rumi.stream` whose args name the
# tool: `{"type", "name", "args"}`; the answer is `StreamOpened`. It then pulls `StreamPage`s with
# CallRequests `{"stream": id, "wait": s}` on `pull_subject(<id>, <pull>)`: a subject of the one instance
# running the call (calls are spread over a queue group; pulls must reach that instance). It has one
# token more than a call subject, so only that instance's own subscription hears it (the queue group
# takes `call.*.*`: nats-server refuses the reply to a message that two subscriptions of one
# connection received, under `allow_responses`).
# Cancelling is the cancel of any call: the open's id on `cancel_subject`.
STREAM_NAME = "stream"
PULL_NAME = "pull"
PULL_MAX_WAIT = 20.0
_STREAM_ID_PATTERN = r"^[A-Za-z0-9_-]{16,64}$"
_PULL_PATTERN = r"^[0-9a-f]{16}$"


def pull_subject(pack_id: str, instance: str) -> str:
    """Where a streamed call's caller pulls: ``rumi.pack.<id>.call._rumi.pull.<instance>``."""
    return f"rumi.pack.{pack_id}.call.{LISTING_TYPE}.{PULL_NAME}.{instance}"


class StreamEvent(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One thing a streamed call sends: an item the tool yielded, or a `ctx.progress` update."""

    kind: Literal["item", "progress"]
    data: Any = None


class StreamPage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The answer to a pull: the events since the last one, in order; `done` once the tool finished.

    A tool that failed answers its last pull with an error Reply instead (the tool's error code).
    """

    events: list[StreamEvent]
    done: bool = False


class StreamOpened(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The answer to `_rumi.stream`: the stream's id and the instance to pull from (`pull_subject`)."""

    stream: typing.Annotated[str, msgspec.Meta(pattern=_STREAM_ID_PATTERN)]
    pull: typing.Annotated[str, msgspec.Meta(pattern=_PULL_PATTERN)]


@dataclasses.dataclass(frozen=True)
class StreamLimits:
    """Bounds of one streamed call on the Pack's side (`Pack.stream_limits`)."""

    max_bytes: int = 64 * 1024 * 1024  # items and progress together, encoded
    max_seconds: float = 600.0  # from open to the last item
    idle_seconds: float = 60.0  # no pull for this long: the caller is gone, the tool is cancelled
    max_streams: int = 16  # streamed calls running at once in one instance
    buffer_bytes: int = 1024 * 1024  # encoded events waiting for the caller; beyond, the tool waits


class _StreamFailed(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _ToolStream:
    """The events of one streamed call, waiting for its caller's pulls (bounded: the tool waits)."""

    def __init__(self, stream_id: str, call_id: str, limits: StreamLimits, max_event: int) -> None:
        self.id = stream_id
        self.call_id = call_id
        self.limits = limits
        self.max_event = max_event
        self.events: deque[bytes] = deque()
        self.buffered = 0
        self.total = 0
        self.finished = False
        self.closed = False  # the caller has everything (or is gone): forget the stream
        self.error: tuple[str, str] | None = None
        self.pulling = False
        self.scope = anyio.CancelScope()
        self.started = self.last_pull = time.monotonic()
        self._changed = anyio.Event()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = anyio.Event()

    async def changed(self, timeout: float) -> None:
        """Wait until something changes (an event put or taken, the end), at most `timeout` s."""
        event = self._changed
        with anyio.move_on_after(timeout):
            await event.wait()

    async def put(self, kind: str, data: Any) -> None:
        """Queue one event; waits while the caller is `buffer_bytes` behind."""
        try:
            event = ENCODER.encode(StreamEvent(kind="item" if kind == "item" else "progress", data=data))
        except Exception as exc:  # not MessagePack-encodable
            message = cap_message(f"the tool's result cannot be encoded: {exc}")
            raise _StreamFailed("handler_error", message) from None
        if len(event) > self.max_event:
            raise _StreamFailed(
                "too_large", f"one item is {len(event)} bytes, over the {self.max_event}-byte message limit"
            )
        if self.total + len(event) > self.limits.max_bytes:
            raise _StreamFailed(
                "too_large", f"the streamed call sent more than {self.limits.max_bytes} bytes (its cap)"
            )
        while self.events and self.buffered + len(event) > self.limits.buffer_bytes:
            await self.changed(1.0)
        self.total += len(event)
        self.events.append(event)
        self.buffered += len(event)
        self._notify()

    def finish(self, error: tuple[str, str] | None = None) -> None:
        """The tool is done (with its error, if it failed); the caller collects what is left."""
        if not self.finished:
            self.finished, self.error = True, error
            self._notify()

    async def page(self, request_id: str, wait: float, budget: int) -> bytes:
        """The reply to one pull: what is there (after waiting up to `wait` s for something)."""
        self.pulling = True
        try:
            self.last_pull = time.monotonic()
            if not self.events and not self.finished:
                await self.changed(wait)
        finally:
            self.pulling = False
            self.last_pull = time.monotonic()
        batch: list[msgspec.Raw] = []
        size = 0
        while self.events and (not batch or size + len(self.events[0]) <= budget):
            event = self.events.popleft()
            batch.append(msgspec.Raw(event))
            size += len(event)
        if batch:
            self.buffered -= size
            self._notify()
        done = self.finished and not self.events
        if done and self.error is not None:
            if batch:
                done = False  # the events first, the error at the next pull
            else:
                self.closed = True
                self._notify()
                return error_reply(request_id, *self.error)
        if done:
            self.closed = True
            self._notify()
        return ok_reply(request_id, {"events": batch, "done": done})


class Pack:
    """A Pack's tools and its connection to the broker.

    Identity and connection come from the environment (``RUMI_PACK_ID``, ``RUMI_NATS_URL``,
    ``RUMI_NATS_CREDS``, ``RUMI_HEARTBEAT_INTERVAL``); arguments override them, for tests.

    While serving, it publishes a `PackStatus` on ``rumi.pack.<id>.status``: ``ready`` once it takes
    calls, ``alive`` every `heartbeat_interval` seconds, ``stopping`` when it stops.
    """

    def __init__(
        self,
        pack_id: str | None = None,
        *,
        nats_url: str | None = None,
        creds: str | None = None,
        request_timeout: float = 30.0,
        heartbeat_interval: float | None = None,
        stop_grace: float = STOP_GRACE,
    ) -> None:
        self.pack_id = pack_id or os.environ.get("RUMI_PACK_ID", "")
        self.nats_url = nats_url or os.environ.get("RUMI_NATS_URL", "")
        self.creds = creds or os.environ.get("RUMI_NATS_CREDS", "")
        self.request_timeout = request_timeout
        self.heartbeat_interval = _heartbeat_interval(heartbeat_interval)
        self._tools: dict[tuple[str, str], _ToolSpec] = {}
        self._nc: Client | None = None
        self._status_seq = 0
        self.ready = anyio.Event()
        self.stop_grace = stop_grace
        # Calls running now, by call id: what a cancel from the caller reaches.
        self._in_flight: dict[str, anyio.CancelScope] = {}
        self._running = 0
        # Streamed calls of this instance, by stream id; their pulls come on this instance's own subject.
        self.stream_limits = StreamLimits()
        self._streams: dict[str, _ToolStream] = {}
        self._instance = secrets.token_hex(8)
        self._calls_group: TaskGroup | None = None

    def tool(self, name: str, *, type: str = "tool") -> Callable[[ToolT], ToolT]:
        """Register an async function ``fn(ctx, args)`` as the tool ``<pack_id>:<type>:<name>``.

        An async generator streams: ``rumi call --stream`` prints each item it yields as it comes, a
        plain call gets them as one list. ``await ctx.progress(...)`` reports progress to a streaming
        caller.

        The type of `args` comes from the annotation: a msgspec Struct, a pydantic model, a dataclass or
        a TypedDict is validated (and converted) before the tool runs, and a call whose arguments do not
        match fails with ``invalid_request`` naming the field; ``dict`` or no annotation takes any object.
        The first line of the docstring is the tool's description in `rumi tools`.
        """
        if not _NAME_RE.match(name):
            raise ValueError(f"tool name {name!r} must match {_NAME_RE.pattern}")
        if not _TYPE_RE.match(type):
            raise ValueError(f"tool type {type!r} must match {_TYPE_RE.pattern}")

        def register(fn: ToolT) -> ToolT:
            func: Any = fn
            streams = inspect.isasyncgenfunction(func)
            if not (inspect.iscoroutinefunction(func) or streams):
                raise TypeError(f"tool {name!r} must be an async function (or an async generator)")
            self._tools[(type, name)] = dataclasses.replace(_tool_spec(type, name, func), streams=streams)
            return fn

        return register

    @property
    def tools(self) -> list[str]:
        """Component ids of the registered tools."""
        return [f"{self.pack_id}:{t}:{n}" for (t, n) in sorted(self._tools)]

    def context(self, component_id: str | None = None) -> Context:
        """A context for requests outside a tool call (component ``<pack_id>:pack:_``)."""
        if self._nc is None:
            raise BrokerError("unavailable", "the Pack is not connected; call connect() or run() first")
        return Context(self._nc, self.pack_id, component_id or f"{self.pack_id}:pack:_", self.request_timeout)

    async def connect(self) -> Client:
        """Connect to NATS with this Pack's credentials."""
        import nats

        if not _PACK_ID_RE.match(self.pack_id):
            raise BrokerError("invalid_request", "RUMI_PACK_ID is missing or not a valid pack id")
        if not self.nats_url:
            raise BrokerError("unavailable", "RUMI_NATS_URL is not set")
        if not self.creds or not Path(self.creds).is_file():
            raise BrokerError("unavailable", "RUMI_NATS_CREDS does not name a readable credentials file")
        self._nc = await nats.connect(
            self.nats_url,
            nkeys_seed=self.creds,
            name=f"pack-{self.pack_id}",
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            allow_reconnect=True,
            error_cb=_log_error,
        )
        return self._nc

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve tool calls until cancelled, then stop without dropping the calls already taken.

        Calls come in the queue group `CALL_QUEUE` (each runs on one instance of the Pack). Cancelled,
        the Pack stops taking calls (those already delivered to it still run), says "stopping", gives the
        calls in flight `stop_grace` seconds, then cancels them, each answered ``unavailable``.
        """
        nc = self._nc or await self.connect()
        ready_file = os.environ.get("RUMI_READY_FILE")
        stop = anyio.Event()
        try:
            async with anyio.create_task_group() as tg:
                # The call subscription is in place once this returns (the server handles this
                # connection in order): whoever hears "ready" may call at once.
                await tg.start(self._serve_calls, nc, stop)
                if ready_file:
                    Path(ready_file).write_text("ready\n")
                await self._publish_status(nc, "ready", flush=True)
                tg.start_soon(self._heartbeat, nc, ready_file)
                self.ready.set()
                task_status.started()
                try:
                    await anyio.sleep_forever()
                finally:
                    stop.set()  # _serve_calls, shielded, winds down; the task group waits for it
        finally:
            with anyio.move_on_after(5, shield=True):
                await nc.drain()
            self._nc = None

    async def _serve_calls(
        self, nc: Client, stop: anyio.Event, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Take calls (and run the HTTP proxy their tools use) until `stop`; shielded from `serve`'s cancel."""
        with anyio.CancelScope(shield=True):
            sub: Any = await nc.subscribe(f"rumi.pack.{self.pack_id}.call.*.*", queue=CALL_QUEUE)
            cancels = await nc.subscribe(cancel_subject(self.pack_id), cb=self._on_cancel)
            pulls = await nc.subscribe(self._pull_subject())  # this instance's streamed calls
            async with anyio.create_task_group() as calls:
                self._calls_group = calls
                calls.start_soon(self._take_pulls, pulls, calls)
                proxy_listen = os.environ.get("RUMI_PROXY_LISTEN")
                if proxy_listen:
                    # Unmodified HTTP clients (HTTPS_PROXY) reach the network through the broker.
                    from ._proxy import serve_proxy

                    await calls.start(serve_proxy, self.context(), proxy_listen)
                calls.start_soon(self._take_calls, nc, sub, calls)
                task_status.started()
                await stop.wait()
                # No new calls reach this instance; the ones already delivered to it still start.
                with anyio.move_on_after(2):
                    try:
                        await sub.drain()
                    except Exception as exc:  # closed or reconnecting: nothing more arrives anyway
                        log.warning("could not drain the call subscription: %s", exc)
                with anyio.move_on_after(2):
                    await self._publish_status(nc, "stopping", flush=True)
                with anyio.move_on_after(self.stop_grace):
                    while self._running:
                        await anyio.sleep(0.05)
                calls.cancel_scope.cancel()  # calls still running are answered `unavailable`
            with anyio.move_on_after(1), contextlib.suppress(Exception):
                await cancels.unsubscribe()

    async def _take_calls(self, nc: Client, sub: Any, calls: TaskGroup) -> None:
        async for msg in sub.messages:
            calls.start_soon(self._serve_call, nc, msg)

    async def _take_pulls(self, sub: Any, calls: TaskGroup) -> None:
        async for msg in sub.messages:
            calls.start_soon(self._serve_pull, msg)

    async def _on_cancel(self, msg: Msg) -> None:
        """A caller gave up on a call: cancel its tool, if it runs here (every instance hears this)."""
        scope = self._in_flight.get(_call_id(msg.data))
        if scope is not None:
            log.info("a call was cancelled by its caller")
            scope.cancel()

    async def _heartbeat(self, nc: Client, ready_file: str | None) -> None:
        """Every `heartbeat_interval` s: "alive" on the status subject, and a fresh ready file's mtime.

        The first ones come sooner (1, 2 and 4 s apart, then every interval): when this instance
        replaces another, whose "stopping" is the last status readers stored, its own "alive" follows
        within about a second instead of a whole interval (`rumi up` waits for it to retire the old one).
        """
        wait = min(FIRST_HEARTBEAT, self.heartbeat_interval)
        while True:
            await anyio.sleep(wait)
            wait = min(2 * wait, self.heartbeat_interval)
            await self._publish_status(nc, "alive")
            if ready_file:
                # The container's healthcheck looks at this file's age: a stuck event loop turns it stale.
                try:
                    os.utime(ready_file)
                except OSError:
                    log.warning("cannot touch the ready file %s", ready_file)

    async def _publish_status(self, nc: Client, state: StatusState, *, flush: bool = False) -> None:
        status = PackStatus(
            v=PROTOCOL_VERSION,
            pack_id=self.pack_id,
            state=state,
            ts=time.time(),
            seq=self._status_seq,
            interval=self.heartbeat_interval,
        )
        self._status_seq += 1
        try:
            await nc.publish(status_subject(self.pack_id), ENCODER.encode(status))
            if flush:
                await nc.flush(timeout=2)
        except Exception as exc:  # disconnected or closed: the next heartbeat tries again
            log.warning("could not publish status %s: %s", state, exc)

    async def _serve_call(self, nc: Client, msg: Msg) -> None:
        parts = msg.subject.split(".")
        # rumi.pack.<id>.call.<type>.<name>
        if len(parts) == 6 and (parts[4], parts[5]) == (LISTING_TYPE, CANCEL_NAME):
            await self._on_cancel(msg)  # the cancel subscription hears it too; either one cancels
            return
        call_id = _call_id(msg.data)
        self._running += 1
        try:
            with anyio.CancelScope() as scope:
                if call_id:
                    self._in_flight[call_id] = scope
                try:
                    if len(parts) != 6 or parts[2] != self.pack_id:
                        payload = error_reply("", "invalid_request", "malformed call subject")
                    else:
                        payload = await self.answer_call(nc, parts[4], parts[5], msg.data)
                finally:
                    if self._in_flight.get(call_id) is scope:
                        del self._in_flight[call_id]
        except anyio.get_cancelled_exc_class():
            # The Pack is stopping and the tool did not finish within the grace: say so, not nothing.
            with anyio.move_on_after(2, shield=True):
                await self._respond(
                    msg,
                    error_reply(
                        call_id,
                        "unavailable",
                        f"the Pack stopped before the tool finished (it had {self.stop_grace:g} s); call again",
                    ),
                )
            raise
        finally:
            self._running -= 1
        if scope.cancelled_caught:
            return  # cancelled by its caller, who is no longer waiting
        await self._respond(msg, payload)

    @staticmethod
    async def _respond(msg: Msg, payload: bytes) -> None:
        if msg.reply:
            try:
                await msg.respond(payload)
            except Exception:
                log.exception("could not send the reply")

    async def answer_call(self, conn: Connection, type_: str, name: str, data: bytes) -> bytes:
        """The encoded Reply to one CallRequest for the tool `type_`:`name` (never raises).

        The tool runs with a Context on `conn`. How failures reach the caller:

        - `ToolError(code, message)`: ``tool:<code>`` and the message;
        - a BrokerError the tool let through: its own code and message;
        - arguments that do not match the tool's declared type: ``invalid_request`` naming the field;
        - any other exception: ``handler_error`` with ``<ExceptionType>: <message>`` (one line, at most
          500 characters, never a traceback; the traceback goes to the Pack's own log).
        """
        try:
            call = CALL_DECODER.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
            return error_reply("", "invalid_request", cap_message(f"malformed call: {exc}"))
        request_id = call.id
        if call.v != PROTOCOL_VERSION:
            return error_reply(request_id, "invalid_request", f"unsupported protocol version {call.v}")
        if (type_, name) == (LISTING_TYPE, LISTING_NAME):
            return ok_reply(request_id, self.listing())
        if (type_, name) == (LISTING_TYPE, STREAM_NAME):
            return self._open_stream(conn, request_id, dict(call.args))
        spec = self._tools.get((type_, name))
        if spec is None:
            return error_reply(request_id, "unknown_capability", f"this Pack has no tool {type_}:{name}")
        try:
            args = spec.convert(dict(call.args))
        except ArgumentsInvalid as exc:
            return error_reply(request_id, "invalid_request", cap_message(f"invalid arguments: {exc}"))
        except Exception as exc:  # a model's own validator raised something else
            return error_reply(request_id, "invalid_request", f"invalid arguments: {describe_exception(exc)}")
        ctx = Context(conn, self.pack_id, f"{self.pack_id}:{type_}:{name}", self.request_timeout)
        try:
            result = await self._run_tool(spec, ctx, args, conn)
        except Exception as exc:
            return self._failure(request_id, spec, _leaf(exc))
        try:
            payload = ok_reply(request_id, result)
        except Exception as exc:  # not MessagePack-encodable (a set, an object, a huge int...)
            return error_reply(
                request_id, "handler_error", cap_message(f"the tool's result cannot be encoded: {exc}")
            )
        max_payload = int(getattr(conn, "max_payload", 0) or 0)
        if max_payload and len(payload) > max_payload:
            return error_reply(
                request_id,
                "too_large",
                f"the tool's result is {len(payload)} bytes, over the {max_payload}-byte message limit",
            )
        return payload

    async def _run_tool(self, spec: _ToolSpec, ctx: Context, args: Any, conn: Connection) -> Any:
        """The tool's result; a generator's items as one list (bounded by one message)."""
        if not spec.streams:
            return await typing.cast(Awaitable[Any], spec.fn(ctx, args))
        cap = int(getattr(conn, "max_payload", 0) or 0) or self.stream_limits.max_bytes
        items: list[Any] = []
        size = 0
        agen = typing.cast(AsyncIterator[Any], spec.fn(ctx, args))
        try:
            async for item in agen:
                items.append(item)
                with contextlib.suppress(Exception):  # unencodable: the reply says so below
                    size += len(ENCODER.encode(item))
                if size > cap:
                    raise BrokerError(
                        "too_large",
                        f"the tool's items are over the {cap}-byte message limit; "
                        "call it with `rumi call --stream` to get them one by one",
                    )
        finally:
            await typing.cast(Any, agen).aclose()
        return items

    # -- streamed calls ------------------------------------------------------------------------
    def _pull_subject(self) -> str:
        return pull_subject(self.pack_id, self._instance)

    def _open_stream(self, conn: Connection, request_id: str, raw: dict[str, Any]) -> bytes:
        """Start the tool named in `raw` as a streamed call; the reply is `StreamOpened` (or an error)."""
        type_, name, args = raw.get("type"), raw.get("name"), raw.get("args", {})
        if not isinstance(type_, str) or not isinstance(name, str) or not isinstance(args, dict):
            return error_reply(request_id, "invalid_request", "a streamed call takes {type, name, args}")
        spec = self._tools.get((type_, name))
        if spec is None:
            message = cap_message(f"this Pack has no tool {type_}:{name}")
            return error_reply(request_id, "unknown_capability", message)
        group = self._calls_group
        if group is None:
            return error_reply(request_id, "unavailable", "streamed calls need a serving Pack (Pack.serve)")
        limits = self.stream_limits
        if len(self._streams) >= limits.max_streams:
            message = f"{limits.max_streams} streamed calls are running; try again later"
            return error_reply(request_id, "rate_limited", message)
        try:
            converted = spec.convert(args)
        except ArgumentsInvalid as exc:
            return error_reply(request_id, "invalid_request", cap_message(f"invalid arguments: {exc}"))
        except Exception as exc:
            return error_reply(request_id, "invalid_request", f"invalid arguments: {describe_exception(exc)}")
        max_payload = int(getattr(conn, "max_payload", 0) or 0) or 1024 * 1024
        stream = _ToolStream(secrets.token_urlsafe(18), request_id, limits, max(1024, max_payload - 4096))
        self._streams[stream.id] = stream
        if request_id:
            self._in_flight[request_id] = stream.scope  # a cancel of the open call ends the stream
        ctx = Context(conn, self.pack_id, f"{self.pack_id}:{type_}:{name}", self.request_timeout)
        ctx._progress = lambda update: stream.put("progress", update)
        group.start_soon(self._produce, stream, spec, ctx, converted)
        return ok_reply(request_id, StreamOpened(stream=stream.id, pull=self._instance))

    async def _produce(self, stream: _ToolStream, spec: _ToolSpec, ctx: Context, args: Any) -> None:
        """Run the tool into `stream`, bounded in time and idleness; then wait (bounded) for the last pull."""
        self._running += 1
        try:
            with stream.scope:
                async with anyio.create_task_group() as watch:
                    watch.start_soon(self._watch_stream, stream)
                    try:
                        await self._feed(stream, spec, ctx, args)
                    finally:
                        watch.cancel_scope.cancel()
                # Hand what is left to the caller; a caller gone for `idle_seconds` is not waited for.
                while not stream.closed and time.monotonic() - stream.last_pull < stream.limits.idle_seconds:
                    await stream.changed(0.5)
            if stream.scope.cancelled_caught:
                log.info(
                    "streamed call %s:%s ended early (cancelled, idle or too long)", spec.type, spec.name
                )
        finally:
            self._running -= 1
            stream.closed = True
            self._streams.pop(stream.id, None)
            if self._in_flight.get(stream.call_id) is stream.scope:
                del self._in_flight[stream.call_id]

    async def _feed(self, stream: _ToolStream, spec: _ToolSpec, ctx: Context, args: Any) -> None:
        try:
            if spec.streams:
                agen = typing.cast(AsyncIterator[Any], spec.fn(ctx, args))
                try:
                    async for item in agen:
                        await stream.put("item", item)
                finally:
                    await typing.cast(Any, agen).aclose()
            else:
                await stream.put("item", await typing.cast(Awaitable[Any], spec.fn(ctx, args)))
        except _StreamFailed as exc:
            stream.finish((exc.code, exc.message))
        except Exception as exc:
            err = REPLY_DECODER.decode(self._failure(stream.call_id, spec, _leaf(exc))).error
            stream.finish((err.code, err.message) if err else ("handler_error", "the tool failed"))
        else:
            stream.finish()

    @staticmethod
    async def _watch_stream(stream: _ToolStream) -> None:
        """End the call when its caller stops pulling, or when it outlives `max_seconds`."""
        limits = stream.limits
        while True:
            await anyio.sleep(min(0.5, limits.idle_seconds / 4))
            now = time.monotonic()
            if now - stream.started > limits.max_seconds:
                stream.events.clear()  # the caller gets the error at its next pull
                stream.buffered = 0
                stream.finish(("timeout", f"the streamed call ran longer than {limits.max_seconds:g} s"))
                stream.scope.cancel()
                return
            if not stream.pulling and now - stream.last_pull > limits.idle_seconds:
                stream.closed = True
                stream.scope.cancel()
                return

    async def _serve_pull(self, msg: Msg) -> None:
        """Answer one pull of a streamed call running in this instance."""
        try:
            call = CALL_DECODER.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
            await self._respond(
                msg, error_reply("", "invalid_request", cap_message(f"malformed pull: {exc}"))
            )
            return
        stream_id, wait = call.args.get("stream"), call.args.get("wait", 0.0)
        stream = self._streams.get(stream_id) if isinstance(stream_id, str) else None
        if stream is None or stream.closed:
            message = "no such streamed call (finished, timed out or never opened)"
            payload = error_reply(call.id, "invalid_request", message)
        elif not isinstance(wait, int | float) or isinstance(wait, bool) or not 0 <= wait <= PULL_MAX_WAIT:
            message = f"wait must be a number of seconds 0-{PULL_MAX_WAIT:g}"
            payload = error_reply(call.id, "invalid_request", message)
        elif stream.pulling:
            payload = error_reply(call.id, "rate_limited", "another pull is waiting on this streamed call")
        else:
            payload = await stream.page(call.id, float(wait), stream.max_event)
        await self._respond(msg, payload)

    def _failure(self, request_id: str, spec: _ToolSpec, exc: BaseException) -> bytes:
        if isinstance(exc, ToolError):
            log.info("tool %s:%s failed: %s", spec.type, spec.name, exc.wire_code)
            return error_reply(request_id, exc.wire_code, cap_message(exc.message))
        if isinstance(exc, BrokerError):
            log.info("tool %s:%s failed: %s", spec.type, spec.name, exc.code)
            return error_reply(request_id, exc.code, cap_message(exc.message))
        log.error("tool %s:%s failed", spec.type, spec.name, exc_info=exc)
        return error_reply(request_id, "handler_error", describe_exception(exc))

    def listing(self) -> ToolList:
        """Every registered tool with its description and its arguments' JSON Schema (the listing call)."""
        return ToolList(
            pack_id=self.pack_id,
            tools=[
                ToolInfo(
                    component_id=f"{self.pack_id}:{t}:{n}",
                    type=t,
                    name=n,
                    description=spec.description,
                    args_schema=spec.schema,
                )
                for (t, n), spec in sorted(self._tools.items())
            ],
        )

    def run(self) -> None:
        """Connect and serve until SIGTERM or SIGINT; exits cleanly."""
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

        async def main() -> None:
            async with anyio.create_task_group() as tg:
                await tg.start(self.serve)
                log.info("pack %s serving %s", self.pack_id, ", ".join(self.tools) or "no tools")
                with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        log.info("pack %s stopping (signal %d)", self.pack_id, signum)
                        tg.cancel_scope.cancel()
                        break

        try:
            anyio.run(main)
        except BrokerError as exc:
            raise SystemExit(f"rumi pack: {exc}") from None


def _heartbeat_interval(value: float | None) -> float:
    """The argument, else RUMI_HEARTBEAT_INTERVAL, else the default; kept within 0.1 s .. 1 h."""
    if value is None:
        try:
            value = float(os.environ.get("RUMI_HEARTBEAT_INTERVAL") or HEARTBEAT_INTERVAL)
        except ValueError:
            value = HEARTBEAT_INTERVAL
    if not math.isfinite(value):
        return HEARTBEAT_INTERVAL
    return min(max(value, 0.1), 3600.0)


async def _log_error(exc: Exception) -> None:
    log.warning("nats: %s", exc)
