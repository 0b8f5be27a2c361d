"""`file_write` with `parents=True`: missing directories inside the grant are made, never outside it.

* the backend (`write_beneath(..., parents=True)`): made with the parent's owner, refused without
  `parents` with a clear error, and no directory ever appears outside the grant (a symlink leading out,
  `..`, a protected name, more than 32 levels);
* end to end: a Pack's `ctx.file_write(path, data, parents=True)` through a real broker and nats-server.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

from broker.backends.files import ProtectedSet, write_beneath
from broker.core.context import HandlerContext, Limits
from broker.core.errors import Denied, HandlerFailed, InvalidRequest
from broker.core.workspace import Workspace
from pack_runtime import BrokerError, PermissionDenied

from ._handlers import file_context
from .conftest import connected_pack, running_broker

TOOL = "default:tool:my_tool"


ctx = functools.partial(file_context, max_bytes=1 << 20)


def tree_of(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def grant(tmp_path: Path) -> Path:
    (tmp_path / "grant").mkdir()
    (tmp_path / "outside").mkdir()
    return tmp_path / "grant"


def test_parents_made_inside_the_grant(grant: Path) -> None:
    if os.geteuid() == 0:
        os.chown(grant, 4242, 4243)  # a root broker gives new directories the owner of their parent
    (grant / "have").mkdir()
    target = f"{grant}/have/a/b/c/file.txt"
    assert write_beneath(ctx([str(grant)]), target, b"deep", 100, parents=True) == 4
    assert Path(target).read_bytes() == b"deep"
    for made in ("have/a", "have/a/b", "have/a/b/c"):
        st = (grant / made).stat()
        assert (st.st_mode & 0o777) & ~0o755 == 0, oct(st.st_mode)
        if os.geteuid() == 0:
            assert (st.st_uid, st.st_gid) == (os.stat(grant / "have").st_uid, os.stat(grant / "have").st_gid)
    # Again, into what now exists: fine, and the file is replaced.
    assert write_beneath(ctx([str(grant)]), target, b"again", 100, parents=True) == 5
    assert Path(target).read_bytes() == b"again"
    # parents=True with the file right in the grant root: nothing to make.
    assert write_beneath(ctx([str(grant)]), f"{grant}/top.txt", b"t", 100, parents=True) == 1


def test_without_parents_a_missing_directory_is_a_clear_error(grant: Path) -> None:
    with pytest.raises(HandlerFailed, match=r"a directory of the path does not exist: .*parents=True"):
        write_beneath(ctx([str(grant)]), f"{grant}/missing/file.txt", b"x", 100)
    assert tree_of(grant) == set()


def test_no_directory_outside_the_grant(grant: Path) -> None:
    outside = grant.parent / "outside"
    (grant / "out").symlink_to(outside)  # a symlink in the grant leading out of it
    (grant / "abs").symlink_to("/tmp")
    (grant / "inner").mkdir()
    (grant / "in").symlink_to("inner")  # one that stays inside is followed
    c = ctx([str(grant)])
    for path in (f"{grant}/out/new/file.txt", f"{grant}/out/file.txt", f"{grant}/abs/rumi-escape/file.txt"):
        with pytest.raises(Denied, match="escapes the granted directory"):
            write_beneath(c, path, b"x", 100, parents=True)
    for path in (
        f"{grant}/a/../../outside/new/file.txt",
        f"{grant}/a/../b/file.txt",
        f"{grant}/./a/file.txt",
    ):
        with pytest.raises((Denied, InvalidRequest)):
            write_beneath(c, path, b"x", 100, parents=True)
    assert tree_of(outside) == set()
    assert not Path("/tmp/rumi-escape").exists()
    assert tree_of(grant) == {"out", "abs", "inner", "in"}  # not even a partial directory
    # Too deep: refused before anything is made.
    deep = "/".join(f"d{i}" for i in range(33))
    with pytest.raises(InvalidRequest, match="at most 32 directories"):
        write_beneath(c, f"{grant}/{deep}/file.txt", b"x", 100, parents=True)
    assert tree_of(grant) == {"out", "abs", "inner", "in"}
    # Through the inside symlink: made in its target, inside the grant.
    assert write_beneath(c, f"{grant}/in/x/file.txt", b"ok", 100, parents=True) == 2
    assert (grant / "inner" / "x" / "file.txt").read_bytes() == b"ok"


def test_a_protected_name_is_not_made(ws: Workspace) -> None:
    """A grant of the workspace root: parents=True cannot make `docker/.rumi/...` (protected)."""
    protected = ProtectedSet.for_pack(ws, "default")
    c = HandlerContext(
        pack_id="default",
        component_id="default:tool:t",
        request_id="r1",
        grant={"enabled": True, "directories": [str(ws.root)], "max_bytes": 1 << 20},
        limits=Limits(timeout=5),
        protected=protected,
    )
    before = sorted(os.listdir(ws.state)) if ws.state.exists() else None
    with pytest.raises(Denied):
        write_beneath(c, f"{ws.state}/nats/new/x.txt", b"x", 100, parents=True)
    assert (sorted(os.listdir(ws.state)) if ws.state.exists() else None) == before
    assert not (ws.state / "nats" / "new").exists()


@pytest.mark.anyio
async def test_a_pack_writes_into_a_new_subdirectory(
    ws: Workspace, nats_server: object, tmp_path: Path
) -> None:
    sandbox = ws.pack_work_area("default")
    sandbox.mkdir(parents=True, exist_ok=True)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (sandbox / "leak").symlink_to(outside)
    async with running_broker(ws), connected_pack(ws) as pack:
        c = pack.context(TOOL)
        with pytest.raises(BrokerError, match="parents=True") as missing:
            await c.file_write(f"{sandbox}/reports/2024/a.txt", b"r")
        assert missing.value.code == "handler_error"
        assert await c.file_write(f"{sandbox}/reports/2024/a.txt", b"report", parents=True) == {
            "bytes_written": 6
        }
        assert (sandbox / "reports" / "2024" / "a.txt").read_bytes() == b"report"
        with pytest.raises(PermissionDenied):
            await c.file_write(f"{sandbox}/leak/x/a.txt", b"r", parents=True)
        with pytest.raises(PermissionDenied):
            await c.file_write(f"{sandbox}/../../escape/a.txt", b"r", parents=True)
        with pytest.raises(BrokerError) as dots:
            await c.file_write(f"{sandbox}/reports/../x/a.txt", b"r", parents=True)
        assert dots.value.code == "invalid_request"
    assert tree_of(outside) == set()
    assert not (sandbox.parent / "escape").exists() and not (sandbox / "x").exists()
