"""Calling a Pack's tool from the host as the `cli` identity (`rumi call`, `rumi demo`).

No silent waits.  A call fails fast with `unavailable` when the Pack's heartbeat stopped: before
sending, when the last status RUMI_STATUS holds for it is older than `stale_after` (3 heartbeat
intervals); while waiting, when no heartbeat arrives within that time of the last one.  A Pack never
heard (no status stream, e.g. under `rumi broker` before any heartbeat) gets that time from the start
of the call.  A "stopping" status refreshes nothing: it is one instance going away (during an upgrade
another one serves); a Pack nobody serves answers "no responders" at once.  While a call waits, Docker's
`oom`/`die` events for the Pack's containers (`_ContainerWatch`) fail it at once, with the reason.
A call given up (timeout, Ctrl-C, the Pack silent or dead) is cancelled in the Pack: its id goes to
the Pack's cancel subject (`pack_runtime._wire.cancel_subject`), and the SDK cancels the tool.

A Pack is untrusted, and so is its answer: an error code that is neither a contract code nor a tool's
own `tool:<code>` is shown as `handler_error`, and messages are cut to one line of 500 characters with
control characters removed before anything prints them.  `list_tools` asks a running Pack for its
tools over the listing call its SDK answers (`rumi tools`): no Pack code runs on the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from broker.core.errors import (
    ERROR_CODES,
    HandlerFailed,
    RequestError,
    RumiError,
    Timeout,
    Unavailable,
    request_error,
)
from broker.core.protocol import HeardStatus, stale_after
from broker.core.workspace import Workspace

if TYPE_CHECKING:
    from pack_runtime._wire import ErrorInfo, ToolList

TOOL_CODE_RE = re.compile(r"^tool:[a-z][a-z0-9_]{0,31}$")
MAX_MESSAGE_CHARS = 500


def reply_data(data: bytes, request_id: str) -> Any:
    """The data of the Pack's reply to `request_id`; its refusal or a malformed reply as an error."""
    import msgspec

    from broker.core.protocol import REPLY_DECODER
    from pack_runtime._errors import cap_message

    try:
        reply = REPLY_DECODER.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise RumiError(f"malformed reply from the Pack: {cap_message(str(exc), 200)}") from None
    if reply.id != request_id:
        raise RumiError("the Pack answered a different request")
    if not reply.success:
        raise pack_error(reply.error)
    return reply.data


def pack_error(err: ErrorInfo | None) -> RequestError:
    """A Pack's error reply, safe to print: `<code>: <message>`, a known code, one capped line.

    The code picks the class, and so `rumi call`'s exit code (docs/cli.md); a tool's own
    `tool:<code>` is a HandlerFailed (the tool failed).
    """
    from pack_runtime._errors import cap_message

    if err is None:
        return HandlerFailed("handler_error: the tool failed without an error")
    message = cap_message(err.message, MAX_MESSAGE_CHARS)
    if err.code in ERROR_CODES:
        return request_error(err.code, f"{err.code}: {message}")
    if TOOL_CODE_RE.match(err.code):
        return HandlerFailed(f"{err.code}: {message}")
    shown = cap_message(err.code, 40)
    return HandlerFailed(f"handler_error: (the Pack sent the unknown error code {shown!r}) {message}")


async def call_tool(
    ws: Workspace, pack_id: str, type_: str, name: str, args: dict[str, Any], timeout: float
) -> Any:
    """Send a CallRequest to a Pack's tool as the `cli` identity; return its data or raise RumiError.

    A failure the Pack reports is the RequestError `pack_error` makes of it.
    """
    return await _call(ws, pack_id, type_, name, args, timeout)


async def list_tools(ws: Workspace, pack_id: str, timeout: float) -> ToolList:
    """The running Pack's tools, each with its arguments' JSON Schema (the SDK's listing call)."""
    import msgspec

    from pack_runtime._errors import cap_message
    from pack_runtime._wire import LISTING_NAME, LISTING_TYPE, ToolList

    data = await _call(ws, pack_id, LISTING_TYPE, LISTING_NAME, {}, timeout)
    try:
        listing = msgspec.convert(data, ToolList)
    except msgspec.ValidationError as exc:
        raise HandlerFailed(
            f"Pack '{pack_id}' sent a malformed tool list: {cap_message(str(exc), 200)}"
        ) from None
    if listing.pack_id != pack_id or any(
        t.component_id != f"{pack_id}:{t.type}:{t.name}" for t in listing.tools
    ):
        raise HandlerFailed(f"Pack '{pack_id}' sent a tool list that does not match its own id")
    return listing


async def _call(
    ws: Workspace, pack_id: str, type_: str, name: str, args: dict[str, Any], timeout: float
) -> Any:
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeout

    from broker.bus.server import StatusWatch, connect, last_statuses
    from broker.core.protocol import ENCODER, PROTOCOL_VERSION, CallRequest, call_subject
    from pack_runtime._context import new_request_id

    nc = await connect(ws, "cli", max_reconnect_attempts=0)
    containers = _ContainerWatch(ws, pack_id, asyncio.get_running_loop())
    containers.start()
    request_id = new_request_id()
    sent = answered = False
    heard: HeardStatus | None = None
    try:
        began = time.monotonic()
        watch = StatusWatch()
        await watch.start(nc, pack_id)
        stored = (await last_statuses(nc, [pack_id], timeout=min(timeout, 2.0))).get(pack_id)
        heard = watch.last.get(pack_id) or stored
        _check_heartbeat(pack_id, heard, began)
        payload = ENCODER.encode(CallRequest(v=PROTOCOL_VERSION, id=request_id, args=args))
        request = asyncio.ensure_future(
            nc.request(call_subject(pack_id, type_, name), payload, timeout=timeout)
        )
        sent = True
        try:
            while not request.done():
                if containers.died.done():
                    raise Unavailable(
                        f"unavailable: Pack {pack_id}'s container {containers.died.result()} while the call "
                        f"ran (`rumi logs {pack_id}`, `rumi ps`)"
                    )
                heard = watch.last.get(pack_id) or stored
                _check_heartbeat(pack_id, heard, began)
                until = (heard.heard_at + heard.stale_after()) if heard else began + stale_after()
                watch.changed.clear()
                changed = asyncio.ensure_future(watch.changed.wait())
                waiting: set[asyncio.Future[Any]] = {request, changed, containers.died}
                try:
                    await asyncio.wait(
                        waiting,
                        timeout=max(until - time.monotonic(), 0.0) + 0.05,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    changed.cancel()
            msg = request.result()
            answered = True
        except NoRespondersError:
            answered = True  # nobody took it: nothing to cancel
            raise Unavailable(await _not_running(pack_id, heard, containers)) from None
        except NatsTimeout:
            raise Timeout(
                f"no answer from {pack_id}:{type_}:{name} within {timeout:g} s; the call was cancelled "
                "in the Pack (pass a longer --timeout)"
            ) from None
        finally:
            if not request.done():
                request.cancel()
                with contextlib.suppress(BaseException):
                    await request
        await watch.stop()
        return reply_data(msg.data, request_id)
    finally:
        containers.stop()
        if sent and not answered:
            # Given up (timeout, Ctrl-C, the Pack silent or dead): the tool must not run on unseen.
            await _cancel_in_pack(nc, pack_id, request_id)
        await nc.close()


async def _cancel_in_pack(nc: Any, pack_id: str, request_id: str) -> None:
    """Publish the abandoned call's id on the Pack's cancel subject (best effort, at most 1 s)."""
    from broker.core.protocol import ENCODER, PROTOCOL_VERSION, CallRequest
    from pack_runtime._wire import cancel_subject

    async def send() -> None:
        await nc.publish(
            cancel_subject(pack_id), ENCODER.encode(CallRequest(v=PROTOCOL_VERSION, id=request_id))
        )
        await nc.flush(timeout=1)

    # Shielded: after Ctrl-C this runs in a task that was just cancelled.
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await asyncio.wait_for(asyncio.shield(send()), 1.5)


async def _not_running(pack_id: str, heard: HeardStatus | None, containers: _ContainerWatch) -> str:
    """`not running`, with why when Docker or the last status knows."""
    why = await asyncio.to_thread(containers.not_running_reason, 1.0)
    if why:
        return f"Pack '{pack_id}' is not running: its container {why} (`rumi logs {pack_id}`, `rumi ps`)"
    if heard is not None and heard.state == "stopping":
        return f"Pack '{pack_id}' is not running: it stopped (`rumi up` or `rumi dev {pack_id}` starts it)"
    return f"Pack '{pack_id}' is not running: start it with `rumi dev {pack_id}` or `rumi up`"


def _check_heartbeat(pack_id: str, heard: HeardStatus | None, began: float) -> None:
    """Raise Unavailable when the Pack has been silent for longer than its stale time.

    "stopping" counts from when it was heard and refreshes nothing: it is one instance going away (during
    an upgrade another one serves), and a call to a Pack nobody serves fails at once (no responders).
    """
    now = time.monotonic()
    if heard is None:
        silent, limit = now - began, stale_after()
    else:
        silent, limit = heard.age(now), heard.stale_after()
    if silent > limit:
        what = "stopped" if heard is not None and heard.state == "stopping" else "sent no heartbeat"
        raise Unavailable(f"unavailable: Pack {pack_id} {what} for {silent:.0f} s (`rumi logs {pack_id}`)")


class _ContainerWatch:
    """Docker's `oom` and `die` events for one Pack's containers, heard in a thread while a call waits.

    Best effort: with no engine (or no access to it), or no container of this Pack (`rumi dev`,
    `rumi broker`), nothing is watched and the heartbeat rule alone applies. A container that stops
    cleanly (exit 0) is not a death: its SDK answers the calls it took before it exits.
    """

    def __init__(self, ws: Workspace, pack_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.ws = ws
        self.pack_id = pack_id
        self.died: asyncio.Future[str] = loop.create_future()
        self._loop = loop
        self._since = time.time()
        self._listed = threading.Event()
        self._not_running: str | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._stream: Any = None
        self._thread = threading.Thread(target=self._run, name=f"rumi-call-{pack_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """End the watch (closing the event stream ends the thread)."""
        with self._lock:
            self._closed = True
            stream, self._stream = self._stream, None
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()

    def not_running_reason(self, wait: float) -> str | None:
        """Why no container of the Pack runs (from Docker's listing), waiting up to `wait` s for it."""
        self._listed.wait(wait)
        return self._not_running

    def _run(self) -> None:
        try:
            self._watch()
        except Exception:  # noqa: S110 - best effort: the heartbeat rule still applies
            pass
        finally:
            self._listed.set()

    def _watch(self) -> None:
        from broker.containers.engine import ROLE_PACK, describe_exit
        from broker.core.docker_client import docker_client
        from broker.core.labels import LABEL_MANAGED, LABEL_PACK, LABEL_ROLE, LABEL_WORKSPACE, workspace_tag

        wanted = [
            f"{LABEL_MANAGED}=true",
            f"{LABEL_WORKSPACE}={workspace_tag(self.ws)}",
            f"{LABEL_ROLE}={ROLE_PACK}",
            f"{LABEL_PACK}={self.pack_id}",
        ]
        client = docker_client(timeout=10)
        try:
            self._follow(client, wanted, describe_exit)
        finally:
            client.close()

    def _follow(self, client: Any, wanted: list[str], describe_exit: Callable[..., str]) -> None:
        found = client.containers.list(all=True, filters={"label": wanted})
        if not found:
            return
        memory = {c.id: int((c.attrs.get("HostConfig") or {}).get("Memory") or 0) for c in found}
        if not any(c.status == "running" for c in found):
            state = found[0].attrs.get("State") or {}
            self._not_running = describe_exit(
                state.get("ExitCode"), bool(state.get("OOMKilled")), memory[found[0].id], state.get("Status")
            )
        self._listed.set()
        with self._lock:
            if self._closed:
                return
            self._stream = client.events(
                decode=True,
                since=f"{self._since:.9f}",
                filters={"type": "container", "event": ["oom", "die"], "label": wanted},
            )
            stream = self._stream
        oom: set[str] = set()
        for event in stream:
            actor = event.get("Actor") or {}
            cid = str(actor.get("ID") or event.get("id") or "")
            action = event.get("Action") or event.get("status")
            if action == "oom":
                oom.add(cid)
                continue
            code = (actor.get("Attributes") or {}).get("exitCode")
            if action != "die" or (code == "0" and cid not in oom):
                continue
            exit_code = int(code) if code is not None and str(code).isdigit() else None
            reason = describe_exit(exit_code, cid in oom, memory.get(cid, 0), "died")
            self._loop.call_soon_threadsafe(_settle, self.died, reason)
            return


def _settle(future: asyncio.Future[str], reason: str) -> None:
    if not future.done():
        future.set_result(reason)


# --- streamed calls (`rumi call --stream`) ---------------------------------------------------------

STREAM_MAX_BYTES = 64 * 1024 * 1024
STREAM_MAX_SECONDS = 600.0
PULL_WAIT = 5.0  # one pull's long-poll; the Pack answers at once when something is there
PULL_MARGIN = 5.0  # beyond the long-poll, how long a pull's answer may take


def progress_text(data: Any) -> str:
    """A progress update as one safe line: text as sent, a dict as compact JSON; control characters removed."""
    import msgspec

    from pack_runtime._errors import cap_message

    if isinstance(data, str):
        return cap_message(data, 1000)
    try:
        text = msgspec.json.encode(data).decode()
    except (TypeError, ValueError, OverflowError):
        text = f"(a {type(data).__name__} that is not JSON)"
    return cap_message(text, 1000)


async def stream_tool(
    ws: Workspace,
    pack_id: str,
    type_: str,
    name: str,
    args: dict[str, Any],
    timeout: float,
    on_event: Callable[[str, Any], None],
    *,
    max_bytes: int = STREAM_MAX_BYTES,
    max_seconds: float = STREAM_MAX_SECONDS,
) -> int:
    """Call a tool as a stream: `on_event("item" | "progress", data)` for each as it arrives.

    Returns the number of items. `timeout` bounds the silence before the stream opens and between two
    events (an item or a progress update); the whole call is bounded by `max_seconds` and by
    `max_bytes` received. Given up on (a bound, a failure, Ctrl-C), the call is cancelled in the Pack.
    """
    import msgspec
    from nats.errors import NoRespondersError
    from nats.errors import TimeoutError as NatsTimeout

    from broker.bus.server import StatusWatch, connect, last_statuses
    from broker.core.errors import TooLarge
    from broker.core.protocol import ENCODER, PROTOCOL_VERSION, CallRequest, call_subject
    from pack_runtime._context import new_request_id
    from pack_runtime._pack import STREAM_NAME, StreamOpened, StreamPage, pull_subject
    from pack_runtime._wire import LISTING_TYPE

    component = f"{pack_id}:{type_}:{name}"
    received = 0

    async def ask(subject: str, request_id: str, body: dict[str, Any], wait: float) -> Any:
        nonlocal received
        payload = ENCODER.encode(CallRequest(v=PROTOCOL_VERSION, id=request_id, args=body))
        msg = await nc.request(subject, payload, timeout=wait)
        received += len(msg.data)
        if received > max_bytes:
            raise TooLarge(f"the stream from {component} passed {max_bytes} bytes; cancelled")
        return reply_data(msg.data, request_id)

    nc = await connect(ws, "cli", max_reconnect_attempts=0)
    open_id = new_request_id()
    sent = finished = False
    watch = StatusWatch()
    try:
        began = time.monotonic()
        await watch.start(nc, pack_id)
        stored = (await last_statuses(nc, [pack_id], timeout=min(timeout, 2.0))).get(pack_id)
        _check_heartbeat(pack_id, watch.last.get(pack_id) or stored, began)
        sent = True
        try:
            data = await ask(
                call_subject(pack_id, LISTING_TYPE, STREAM_NAME),
                open_id,
                {"type": type_, "name": name, "args": args},
                timeout,
            )
        except NoRespondersError:
            finished = True
            raise Unavailable(
                f"Pack '{pack_id}' is not running: start it with `rumi dev {pack_id}` or `rumi up`"
            ) from None
        except NatsTimeout:
            raise Timeout(f"{component} did not start streaming within {timeout:g} s") from None
        except RequestError:
            finished = True  # the Pack refused the call: nothing runs
            raise
        try:
            opened = msgspec.convert(data, StreamOpened)
        except msgspec.ValidationError:
            raise HandlerFailed(f"Pack '{pack_id}' answered the stream with something else") from None
        pulls = pull_subject(pack_id, opened.pull)
        items = 0
        last_event = time.monotonic()
        while True:
            now = time.monotonic()
            if now - began > max_seconds:
                raise Timeout(f"the stream from {component} ran longer than {max_seconds:g} s; cancelled")
            if now - last_event > timeout:
                raise Timeout(
                    f"nothing from {component} for {timeout:g} s; cancelled (pass a longer --timeout)"
                )
            _check_heartbeat(pack_id, watch.last.get(pack_id) or stored, began)
            wait = max(0.0, min(PULL_WAIT, timeout - (now - last_event), max_seconds - (now - began)))
            try:
                data = await ask(
                    pulls,
                    new_request_id(),
                    {"stream": opened.stream, "wait": round(wait, 3)},
                    wait + PULL_MARGIN,
                )
            except (NoRespondersError, NatsTimeout):
                raise Unavailable(
                    f"Pack '{pack_id}' stopped answering while {component} streamed (`rumi logs {pack_id}`)"
                ) from None
            except RequestError:
                finished = True  # the tool's own failure ends the call in the Pack
                raise
            try:
                page = msgspec.convert(data, StreamPage)
            except msgspec.ValidationError:
                raise HandlerFailed(f"Pack '{pack_id}' sent a malformed stream page") from None
            for event in page.events:
                items += event.kind == "item"
                on_event(event.kind, event.data)
            if page.events:
                last_event = time.monotonic()
            if page.done:
                finished = True
                return items
    finally:
        await watch.stop()
        if sent and not finished:
            # Given up (a bound, Ctrl-C, the Pack silent): the tool must not run on unseen.
            await _cancel_in_pack(nc, pack_id, open_id)
        await nc.close()
