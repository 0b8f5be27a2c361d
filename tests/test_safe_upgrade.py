"""Safe upgrades: `rumi up` of a changed Pack swaps containers without a gap, and rolls a broken one back.

With Docker, one small Pack, heartbeats every second, and a caller calling it all the time:

* v1 → v2: the new container starts beside the old one (both in the Pack's queue group), the old one
  stops only after the new one said "ready", the new one takes the usual name; no call fails;
* v2 → v3 that fails at import: `rumi up` raises PackNotReady (exit 1) naming the error, the new
  container is removed, the v2 container (the same one) still serves; no call fails.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from broker.admin.calls import call_tool
from broker.core.errors import exit_code
from broker.core.workspace import Workspace

from ._deploy import small_packs
from .conftest import say

PACK = "up"
VERSIONED = """
from pack_runtime import Pack

pack = Pack()


@pack.tool("version")
async def version(ctx, args):
    return {version}


if __name__ == "__main__":
    pack.run()
"""
BROKEN = """
raise RuntimeError("broken on purpose: v3 cannot import")
"""


class Caller:
    """Calls the Pack's `version` tool over and over in a thread; keeps every answer and every error."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.answers: list[int] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Caller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.answers.append(anyio.run(call_tool, self.ws, PACK, "tool", "version", {}, 20))
            except Exception as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
            time.sleep(0.05)


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Pack "up" (v1) built under a fresh image prefix; everything removed afterwards."""
    with small_packs(
        tmp_path_factory, "su", {PACK: VERSIONED.format(version=1)}, heartbeat_interval=1.0
    ) as rt:
        yield rt


def _containers(rt: Any) -> list[Any]:
    return rt.client.containers.list(all=True, filters=rt._filters("pack", PACK))


@pytest.mark.docker
def test_upgrade_swaps_without_a_gap_and_a_broken_one_is_rolled_back(
    runtime: Any, pytestconfig: pytest.Config
) -> None:
    from broker.containers.engine import PackNotReady
    from broker.containers.packimage import build_pack_image

    rt = runtime
    lines: list[str] = []
    rt.progress = lines.append
    rt.up([PACK], build=False, with_broker=False, health_timeout=90)
    first = _containers(rt)
    assert [c.name for c in first] == [rt.pack_container_name(PACK)]
    assert anyio.run(call_tool, rt.ws, PACK, "tool", "version", {}, 20) == 1

    # v2: swapped in while calls keep coming.
    (rt.ws.pack_source(PACK) / "main.py").write_text(VERSIONED.format(version=2))
    build_pack_image(rt.client, rt.ws, PACK, prefix=rt.prefix)
    with Caller(rt.ws) as caller:
        time.sleep(1)
        started = time.monotonic()
        report = rt.up([PACK], build=False, with_broker=False, health_timeout=90)
        swap_seconds = time.monotonic() - started
        time.sleep(1)
    assert caller.errors == [], caller.errors[:5]
    assert caller.answers[0] == 1 and caller.answers[-1] == 2, caller.answers
    assert caller.answers == sorted(caller.answers)  # once v2 answered, v1 never did again
    (start,) = report.packs
    assert start.created and start.states == ("upgrading", "created", "started", "ready"), start
    assert f"pack {PACK}: upgraded, the previous container stopped" in lines, lines
    second = _containers(rt)
    assert [c.name for c in second] == [rt.pack_container_name(PACK)] and second[0].id != first[0].id
    assert second[0].status == "running"

    # v3 fails at import: rolled back, v2 still serves; the error is named; exit code 1.
    (rt.ws.pack_source(PACK) / "main.py").write_text(BROKEN)
    build_pack_image(rt.client, rt.ws, PACK, prefix=rt.prefix)
    with Caller(rt.ws) as caller:
        time.sleep(1)
        started = time.monotonic()
        with pytest.raises(PackNotReady) as failed:
            rt.up([PACK], build=False, with_broker=False, health_timeout=90)
        rollback_seconds = time.monotonic() - started
        time.sleep(1)
    message = str(failed.value)
    assert exit_code(failed.value) == 1
    assert "1 of 1 Pack(s) did not become ready: up:" in message, message
    assert "RuntimeError: broken on purpose: v3 cannot import" in message, message
    assert "rolled back: the previous container still serves" in message, message
    assert "\n" not in message
    assert caller.errors == [], caller.errors[:5]
    assert caller.answers and set(caller.answers) == {2}
    third = _containers(rt)
    assert [(c.id, c.name, c.status) for c in third] == [
        (second[0].id, rt.pack_container_name(PACK), "running")
    ]
    assert anyio.run(call_tool, rt.ws, PACK, "tool", "version", {}, 20) == 2
    say(pytestconfig, f"\nupgrade: swapped in {swap_seconds:.1f} s with {len(caller.answers)} calls meanwhile, "
                      f"no failure; broken upgrade rolled back in {rollback_seconds:.1f} s")  # fmt: skip
