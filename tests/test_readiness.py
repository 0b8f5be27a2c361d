"""Pack readiness and heartbeats: the `PackStatus` contract on rumi.pack.<id>.status.

* unit: the message, how readers decode it (the Pack from the subject, never the payload), the stale
  rule, and the Docker healthcheck settings (exec form, a rare interval);
* with a real nats-server: the SDK says "ready", then "alive" every interval, then "stopping"; a call to
  a Pack whose heartbeats stopped fails fast with `unavailable` (while waiting, and before sending when
  the status stream already shows it silent);
* with Docker (3 small Packs): `rumi up` returns on the status subject, the healthcheck interval on
  `docker inspect` is at least 60 s and its command passes, a paused Pack gives a fast `unavailable`.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from broker.admin.calls import call_tool
from broker.bus.server import StatusWatch, connect, ensure_status_stream, last_statuses
from broker.containers.settings import HEALTHCHECK_INTERVAL_S, PackSpec, pack_container_settings
from broker.core.errors import RumiError, Unavailable
from broker.core.pack_env import READY_FILE
from broker.core.protocol import (
    ENCODER,
    HEARTBEAT_INTERVAL,
    STALE_AFTER_INTERVALS,
    STATUS_DECODER,
    PackStatus,
    decode_status,
    stale_after,
    status_subject,
)
from broker.core.workspace import Workspace
from pack_runtime import Pack

from ._deploy import small_packs
from .conftest import say
from .test_isolation import OTHER_PACK

SMALL_PACK = OTHER_PACK  # one tool, `echo`, no requirements


# ------------------------------------------------------------------------------------------- unit


def _status(**changes: Any) -> bytes:
    fields: dict[str, Any] = {"v": 1, "pack_id": "alpha", "state": "alive", "ts": 1.5, "seq": 3, "interval": 5.0}
    fields.update(changes)
    return msgspec.msgpack.encode(fields)


def test_status_message_is_strict() -> None:
    status = STATUS_DECODER.decode(_status())
    assert status == PackStatus(v=1, pack_id="alpha", state="alive", ts=1.5, seq=3, interval=5.0)
    assert STATUS_DECODER.decode(ENCODER.encode(status)) == status
    assert status_subject("alpha") == "rumi.pack.alpha.status"
    for bad in (
        {"state": "healthy"},
        {"seq": -1},
        {"pack_id": "Alpha"},
        {"pack_id": "a.b"},
        {"v": 1.0},
        {"interval": 0},
        {"interval": 1e9},
        {"extra": 1},
    ):
        with pytest.raises(msgspec.ValidationError):
            STATUS_DECODER.decode(_status(**bad))


def test_readers_take_the_pack_from_the_subject() -> None:
    heard = decode_status("rumi.pack.alpha.status", _status(), 10.0)
    assert heard is not None and (heard.pack_id, heard.state, heard.seq, heard.heard_at) == ("alpha", "alive", 3, 10.0)
    # The payload naming another Pack, another version, a malformed payload or subject: dropped.
    assert decode_status("rumi.pack.beta.status", _status(), 0.0) is None
    assert decode_status("rumi.pack.alpha.status", _status(v=2), 0.0) is None
    assert decode_status("rumi.pack.alpha.status", b"\xc1", 0.0) is None
    for subject in ("rumi.pack.alpha.status.x", "rumi.pack.alpha.req", "rumi.audit.alpha.status", "x"):
        assert decode_status(subject, _status(), 0.0) is None


def test_stale_rule() -> None:
    assert stale_after() == STALE_AFTER_INTERVALS * HEARTBEAT_INTERVAL == 15.0
    assert stale_after(0.2) == pytest.approx(0.6)
    assert stale_after(3600) == 180.0  # a Pack cannot claim hours of silence
    assert stale_after(float("nan")) == 15.0
    heard = decode_status("rumi.pack.alpha.status", _status(interval=1.0), 100.0)
    assert heard is not None
    assert heard.live(102.9) and not heard.live(103.1)
    stopping = decode_status("rumi.pack.alpha.status", _status(state="stopping"), 100.0)
    assert stopping is not None and not stopping.live(100.0)


def test_healthcheck_is_exec_form_and_rare(tmp_path: Path) -> None:
    spec = PackSpec("alpha", "img", "net", "nats://x:4222", tmp_path / "sb", tmp_path / "creds", "ws")
    check = pack_container_settings(spec)["healthcheck"]
    assert check["test"][:2] == ["CMD", "python3"]  # exec form: the base image has no shell
    assert READY_FILE in check["test"][-1]
    assert check["interval"] >= 60 * 10**9 and check["interval"] == HEALTHCHECK_INTERVAL_S * 10**9
    assert check["timeout"] < check["interval"]


# ------------------------------------------------------------------------------ with a real NATS


class PackInThread:
    """A Pack SDK serving in its own thread and event loop (its tools may block that loop)."""

    def __init__(self, pack: Pack) -> None:
        self.pack = pack
        self.started = threading.Event()
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PackInThread:
        self._thread.start()
        assert self.started.wait(20), "the Pack did not start"
        if self.error is not None:
            raise self.error
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._loop is not None and self._task is not None and not self._task.done():
            self._loop.call_soon_threadsafe(self._task.cancel)
        self._thread.join(20)
        assert not self._thread.is_alive()

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._task = asyncio.current_task()  # type: ignore[assignment]
            import anyio

            try:
                async with anyio.create_task_group() as tg:
                    await tg.start(self.pack.serve)
                    self.started.set()
                    await anyio.sleep_forever()
            except asyncio.CancelledError:
                pass

        try:
            asyncio.run(main())
        except BaseException as exc:
            self.error = exc
        finally:
            self.started.set()


def _pack(ws: Workspace, interval: float) -> Pack:
    from broker.bus.creds import pack_identity
    from broker.bus.server import nats_url

    pack = Pack("default", nats_url=nats_url(ws), creds=str(pack_identity(ws, "default").seed_path),
                heartbeat_interval=interval)  # fmt: skip

    @pack.tool("block")
    async def block(ctx: Any, args: dict[str, Any]) -> str:
        time.sleep(float(args["seconds"]))  # a tool that blocks the event loop: no heartbeat meanwhile
        return "done"

    @pack.tool("slow")
    async def slow(ctx: Any, args: dict[str, Any]) -> str:
        await asyncio.sleep(float(args["seconds"]))  # the loop is free: heartbeats go on
        return "done"

    return pack


def test_sdk_says_ready_then_alive_then_stopping(
    ws: Workspace, nats_server: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ready_file = tmp_path / "ready"
    monkeypatch.setenv("RUMI_READY_FILE", str(ready_file))

    async def listen(seconds: float) -> list[Any]:
        nc = await connect(ws, "cli")
        heard: list[Any] = []
        await StatusWatch(on_status=heard.append).start(nc)
        with PackInThread(_pack(ws, 0.2)):
            first_mtime = ready_file.stat().st_mtime
            await asyncio.sleep(seconds)
            assert ready_file.stat().st_mtime > first_mtime  # touched with every heartbeat
        await asyncio.sleep(0.3)
        await nc.close()
        return heard

    heard = asyncio.run(asyncio.wait_for(listen(1.1), 60))
    states = [h.state for h in heard]
    assert states[0] == "ready" and states[-1] == "stopping", states
    assert 3 <= states.count("alive") <= 8, states
    assert [h.seq for h in heard] == list(range(len(heard)))
    assert all(h.pack_id == "default" and h.interval == pytest.approx(0.2) for h in heard)


def test_first_heartbeats_come_sooner_than_the_interval(ws: Workspace, nats_server: object) -> None:
    """With the default 5 s interval, "alive" follows "ready" after ~1 s and ~3 s (1, 2, 4 s, … 5 s):
    a replacement's own status soon follows the old instance's "stopping"."""

    async def listen(seconds: float) -> list[Any]:
        nc = await connect(ws, "cli")
        heard: list[Any] = []
        await StatusWatch(on_status=heard.append).start(nc)
        with PackInThread(_pack(ws, 5.0)):
            await asyncio.sleep(seconds)
        await asyncio.sleep(0.3)
        await nc.close()
        return heard

    heard = asyncio.run(asyncio.wait_for(listen(3.8), 60))
    states = [h.state for h in heard]
    assert states == ["ready", "alive", "alive", "stopping"], states
    first, second = heard[1].heard_at - heard[0].heard_at, heard[2].heard_at - heard[1].heard_at
    assert 0.7 < first < 2.0 and 1.7 < second < 3.0, (first, second)
    assert all(h.interval == 5.0 for h in heard)  # the claim stays the interval: an upper bound


def test_call_to_a_silent_pack_fails_fast(ws: Workspace, nats_server: object, pytestconfig: pytest.Config) -> None:
    """Heartbeats every 0.2 s: stale after 0.6 s. The call's own timeout is 30 s."""

    async def body() -> None:
        await ensure_status_stream(ws)
        with PackInThread(_pack(ws, 0.2)) as running:
            # Heartbeats flow while a tool awaits: a call longer than the stale time still succeeds.
            assert await call_tool(ws, "default", "tool", "slow", {"seconds": 1.5}, 30) == "done"
            # The tool blocks its loop for 4 s: no heartbeat, the waiting call gives up soon.
            started = time.monotonic()
            with pytest.raises(Unavailable, match=r"unavailable: Pack default sent no heartbeat for \d+ s"):
                await call_tool(ws, "default", "tool", "block", {"seconds": 4}, 30)
            waited = time.monotonic() - started
            assert waited < 3, waited
            # Still blocked: the stored status is stale, so the next call fails before it is sent.
            await asyncio.sleep(0.5)
            started = time.monotonic()
            with pytest.raises(Unavailable, match="sent no heartbeat"):
                await call_tool(ws, "default", "tool", "slow", {"seconds": 0}, 30)
            before_send = time.monotonic() - started
            assert before_send < 1.5, before_send
            # Once the loop is free again, heartbeats resume and calls work.
            await asyncio.sleep(3.5)
            assert await call_tool(ws, "default", "tool", "slow", {"seconds": 0}, 30) == "done"
            running.stop()
        # The Pack said "stopping" on its way out: refused at once, without waiting.
        started = time.monotonic()
        with pytest.raises(RumiError, match=r"stopping|not running"):
            await call_tool(ws, "default", "tool", "slow", {"seconds": 0}, 30)
        assert time.monotonic() - started < 2
        say(pytestconfig, f"\nsilent Pack: call failed after {waited:.2f} s (stale 0.6 s), {before_send:.2f} s when known")

    asyncio.run(asyncio.wait_for(body(), 90))


def test_call_to_a_pack_never_heard_waits_one_stale_time(
    ws: Workspace, nats_server: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A responder that never sends a status (an old SDK, a hand-written client): one stale time from
    the call's start (15 s; shortened to 1 s here), not the call's timeout."""
    import anyio

    import broker.admin.calls

    monkeypatch.setattr(broker.admin.calls, "stale_after", lambda interval=5.0: 1.0)

    async def body() -> None:
        nc = await connect(ws, "pack-default")

        async def hang(msg: Any) -> None:
            await anyio.sleep(60)

        await nc.subscribe("rumi.pack.default.call.>", cb=hang)
        await nc.flush()
        started = time.monotonic()
        with pytest.raises(Unavailable, match="sent no heartbeat for 1 s"):
            await call_tool(ws, "default", "tool", "x", {}, 60)
        assert 0.9 < time.monotonic() - started < 5
        await nc.close()

    asyncio.run(asyncio.wait_for(body(), 90))


# ---------------------------------------------------------------------------------------- Docker


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Three small Packs up under a fresh image prefix, heartbeats every second; all removed afterwards."""
    ids = ["ra", "rb", "rc"]
    with small_packs(tmp_path_factory, "rd", dict.fromkeys(ids, SMALL_PACK), heartbeat_interval=1.0) as rt:
        yield rt, ids


@pytest.mark.docker
def test_up_waits_for_ready_and_a_paused_pack_is_unavailable(deployment: Any, pytestconfig: pytest.Config) -> None:
    rt, ids = deployment
    lines: list[str] = []
    rt.progress = lines.append
    report = rt.up(ids, build=False, health_timeout=90)
    assert [p.pack_id for p in report.packs] == ids
    for start in report.packs:
        assert start.created and start.states == ("created", "started", "ready"), start
        assert 0 < start.seconds_to_ready < 60
        assert any(ln.startswith(f"pack {start.pack_id}: created → started → ready (") for ln in lines), lines

    async def stored() -> dict[str, Any]:
        nc = await connect(rt.ws, "cli")
        try:
            return await last_statuses(nc, ids)
        finally:
            await nc.close()

    # Readiness as anyone with `cli` sees it: every Pack's last status is ready or alive, and fresh.
    heard = asyncio.run(stored())
    now = time.monotonic()
    assert set(heard) == set(ids) and all(h.live(now) for h in heard.values()), heard

    for pack_id in ids:
        container = rt.container_for(pack_id)
        container.reload()
        check = container.attrs["Config"]["Healthcheck"]
        assert check["Test"][0] == "CMD" and check["Interval"] >= 60 * 10**9, check
        # What Docker's probe will run, run now: it passes while the heartbeats flow.
        probe = container.exec_run(check["Test"][1:])
        assert probe.exit_code == 0, probe.output
        assert container.attrs["State"]["Health"]["Status"] in ("starting", "healthy")
        assert asyncio.run(call_tool(rt.ws, pack_id, "tool", "echo", {"x": pack_id}, 30)) == {"x": pack_id}

    paused = rt.container_for("rb")
    paused.pause()
    try:
        started = time.monotonic()
        with pytest.raises(Unavailable, match=r"unavailable: Pack rb sent no heartbeat for \d+ s \(`rumi logs rb`\)"):
            asyncio.run(call_tool(rt.ws, "rb", "tool", "echo", {}, 60))
        failed_after = time.monotonic() - started
        assert failed_after < 10, failed_after  # 3 intervals of 1 s, not the 60 s timeout
        # The others still answer; `rumi ps` data shows rb silent.
        assert asyncio.run(call_tool(rt.ws, "rc", "tool", "echo", {"y": 1}, 30)) == {"y": 1}
        rows = {c.pack_id: c for c in rt.status().containers if c.role == "pack"}
        assert not rows["rb"].live and rows["rc"].live and rows["ra"].live
        assert rows["rb"].heartbeat_age is not None and rows["rb"].heartbeat_age > 3
    finally:
        paused.unpause()
    # Unpaused: its heartbeats resume and it answers again.
    deadline = time.monotonic() + 20
    while not {c.pack_id: c for c in rt.status().containers if c.role == "pack"}["rb"].live:
        assert time.monotonic() < deadline, "rb's heartbeat did not resume"
        time.sleep(0.5)
    assert asyncio.run(call_tool(rt.ws, "rb", "tool", "echo", {"z": 2}, 30)) == {"z": 2}
    say(
        pytestconfig,
        "\n3 Packs: " + ", ".join(f"{p.pack_id} ready {p.seconds_to_ready:.2f} s" for p in report.packs)
        + f"; up {report.seconds:.1f} s; paused Pack unavailable after {failed_after:.1f} s",
    )


def test_cli_ps_and_doctor_show_heartbeats_without_docker(tmp_path: Path) -> None:
    """`rumi ps` text for a Pack row, from the status fields alone (no engine needed)."""
    from broker.cli.containers import _pack_status
    from broker.containers.engine import ContainerInfo

    def row(**changes: Any) -> ContainerInfo:
        base: dict[str, Any] = {"name": "rumi-pack-a", "role": "pack", "pack_id": "a", "state": "running",
                                "health": "starting", "image": "i", "addresses": {}, "ports": []}
        base.update(changes)
        return ContainerInfo(**base)

    assert _pack_status(row()) == "never heard"
    assert _pack_status(row(heartbeat="alive", heartbeat_age=1.0, heartbeat_stale_after=15.0)) == "alive"
    assert _pack_status(row(heartbeat="alive", heartbeat_age=20.0, heartbeat_stale_after=15.0)) == "silent (was alive)"
    assert _pack_status(row(heartbeat="stopping", heartbeat_age=20.0, heartbeat_stale_after=15.0)) == "stopping"
    assert _pack_status(row(role="nats")) == "-"
    assert os.environ.get("RUMI_HEARTBEAT_INTERVAL") is None
