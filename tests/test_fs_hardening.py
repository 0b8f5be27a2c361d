"""File access hardening: pseudo file systems (by statfs type, at load and per request) and hard links
to protected workspace state, down to a real broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from broker.backends.files import read_beneath, write_beneath
from broker.core import protected as _protected
from broker.core.errors import Denied
from broker.core.protected import pseudo_fs_of_path
from broker.core.workspace import Workspace
from broker.policy.grants import Policy, check_directory
from pack_runtime import PermissionDenied
from tests._skip import skip_unless_ci

from ._handlers import file_context
from .conftest import connected_pack, running_broker

REPO = Path(__file__).resolve().parents[1]
TOOL = "default:tool:my_tool"
ENV_SECRET = "rumi-test-environ-secret-4242"


ctx = file_context


def _mounted_types() -> dict[str, str]:
    """mount point -> file system type, from this process's mount table."""
    out: dict[str, str] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" ")
        out[fields[4]] = fields[fields.index("-", 6) + 1]
    return out


# --- per request: the opened file's file system ---------------------------------------------------


def test_a_proc_grant_never_serves_the_brokers_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUMI_TEST_SECRET", ENV_SECRET)
    for path in ("/proc/self/environ", f"/proc/{os.getpid()}/environ", "/proc/version"):
        with pytest.raises(Denied, match="proc file system") as info:
            read_beneath(ctx(["/proc"]), path, 1 << 20)
        assert ENV_SECRET not in str(info.value)
    with pytest.raises(Denied, match="proc file system"):
        write_beneath(ctx(["/proc/self"]), "/proc/self/comm", b"pwned", 100)


@pytest.mark.parametrize(
    ("grant", "path", "kind"),
    [
        ("/sys", "/sys/kernel/uevent_seqnum", "sysfs"),
        ("/sys/fs/cgroup/pids", "/sys/fs/cgroup/pids/cgroup.procs", "cgroup"),
        ("/dev/pts", "/dev/pts/ptmx", None),  # a character device: refused as not a regular file first
    ],
)
def test_other_pseudo_file_systems_are_refused_by_type(grant: str, path: str, kind: str | None) -> None:
    if not os.path.exists(path):
        pytest.skip(f"{path} does not exist on this machine")
    with pytest.raises(Denied, match=f"{kind} file system" if kind else "not a regular file"):
        read_beneath(ctx([grant]), path, 1 << 20)


def test_devtmpfs_is_told_apart_from_tmpfs_by_its_device(tmp_path: Path) -> None:
    """devtmpfs reports TMPFS_MAGIC: the mount table's device number says what it is."""
    if _mounted_types().get("/dev") != "devtmpfs":
        pytest.skip("/dev is not devtmpfs here (a container's /dev is a tmpfs)")
    name = f"rumi-test-{os.getpid()}"
    try:
        with pytest.raises(Denied, match="devtmpfs file system"):
            write_beneath(ctx(["/dev"]), f"/dev/{name}", b"x", 10)
        assert not os.path.exists(f"/dev/{name}")
    finally:
        if os.path.exists(f"/dev/{name}"):
            os.unlink(f"/dev/{name}")
    # An ordinary tmpfs is a file system like any other.
    shm = Path("/dev/shm")
    if _mounted_types().get(str(shm)) == "tmpfs":
        target = shm / name
        try:
            write_beneath(ctx([str(shm)]), str(target), b"ok", 10)
            assert read_beneath(ctx([str(shm)]), str(target), 10) == b"ok"
        finally:
            target.unlink(missing_ok=True)


def test_the_request_time_check_is_one_fstatfs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a.txt").write_bytes(b"data")
    calls: list[int] = []
    real = _protected.fs_type

    def counting(target: int | str | os.PathLike[str]) -> int:
        calls.append(1)
        return real(target)

    monkeypatch.setattr(_protected, "fs_type", counting)
    assert read_beneath(ctx([str(tmp_path)]), f"{tmp_path}/a.txt", 100) == b"data"
    assert len(calls) == 1
    write_beneath(ctx([str(tmp_path)]), f"{tmp_path}/b.txt", b"new", 100)
    assert len(calls) == 2


# --- at load: grants of such directories ----------------------------------------------------------


def test_grants_on_pseudo_file_systems_are_refused_at_load(ws: Workspace, tmp_path: Path) -> None:
    cases = {
        "/proc": "proc file system",
        "/proc/self": "proc file system",
        "/proc/does-not-exist/x": "proc file system",  # judged by its nearest existing parent
        "/sys": "sysfs file system",
        "/sys/fs/cgroup": "cgroup file system mounted at /sys/fs/cgroup/",  # a tmpfs with cgroups beneath
        "/dev/pts": "devpts file system",
    }
    if _mounted_types().get("/dev") == "devtmpfs":
        cases["/dev"] = "devtmpfs file system"
    (tmp_path / "to-proc").symlink_to("/proc")
    cases[str(tmp_path / "to-proc")] = "proc file system"  # by what it is, not by what it is called
    for directory, why in cases.items():
        if not os.path.exists(directory.rsplit("/does-not-exist", 1)[0]):
            continue
        problem = check_directory(ws, "default", directory)
        assert problem is not None and why in problem, (directory, problem)
        assert "\n" not in problem
    # A directory that is merely called proc is a directory like any other.
    (tmp_path / "proc").mkdir()
    assert check_directory(ws, "default", str(tmp_path / "proc")) is None
    assert pseudo_fs_of_path(tmp_path / "proc") is None


def test_a_proc_grant_file_is_invalid_and_denies_its_component(ws: Workspace) -> None:
    ws.grant_file(TOOL).write_text(
        json.dumps(
            {"component_id": TOOL, "permissions": {"file_read": {"enabled": True, "directories": ["/proc"]}}}
        )
    )
    policy = Policy.for_workspace(ws)
    errors = [str(e) for e in policy.errors]
    assert len(errors) == 1 and "'/proc' is on a proc file system" in errors[0]
    assert "$.permissions.file_read.directories" in errors[0]
    with pytest.raises(Denied, match="grant file is invalid"):
        policy.decide("default", TOOL, "file_read")


MOUNTED = r"""
import json, os, subprocess, sys
from pathlib import Path
from broker.backends.files import read_beneath, write_beneath
from broker.core.context import HandlerContext, Limits
from broker.core.errors import Denied
from broker.core.protected import ProtectedSet
from broker.core.workspace import Workspace
from broker.policy.grants import check_directory

root, ws_root = Path(sys.argv[1]), Path(sys.argv[2])
grant = root / "grant"
(grant / "kernel").mkdir(parents=True)
(grant / "plain.txt").write_bytes(b"plain")
subprocess.run(["mount", "-t", "proc", "proc", str(grant / "kernel")], check=True)
ctx = HandlerContext(pack_id="p1", component_id="p1:tool:t", request_id="r1",
                     grant={"enabled": True, "directories": [str(grant)]}, limits=Limits(timeout=5),
                     protected=ProtectedSet())
out = {"load_grant": check_directory(Workspace.at(ws_root), "p1", str(grant)),
       "load_inside": check_directory(Workspace.at(ws_root), "p1", str(grant / "kernel"))}
for key, call in {
    "read": lambda: read_beneath(ctx, f"{grant}/kernel/self/environ", 1 << 20),
    "write": lambda: write_beneath(ctx, f"{grant}/kernel/self/comm", b"pwned", 100),
    "plain": lambda: read_beneath(ctx, f"{grant}/plain.txt", 100),
}.items():
    try:
        result = call()
        out[key] = {"ok": True, "data": result.decode("latin-1") if isinstance(result, bytes) else result}
    except Denied as exc:
        out[key] = {"ok": False, "message": exc.message}
print(json.dumps(out))
"""


def test_a_pseudo_file_system_mounted_beneath_a_grant(ws: Workspace, tmp_path: Path) -> None:
    """Mounted in a private mount namespace of a child process: the host's mounts are untouched."""
    proc = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            sys.executable,
            "-c",
            textwrap.dedent(MOUNTED),
            str(tmp_path),
            str(ws.root),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "RUMI_TEST_SECRET": ENV_SECRET},
    )
    if proc.returncode != 0 and "unshare" in proc.stderr and "Operation not permitted" in proc.stderr:
        skip_unless_ci(f"cannot create a mount namespace (needs root or CAP_SYS_ADMIN): {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out: dict[str, Any] = json.loads(proc.stdout)
    assert "has a proc file system mounted at" in out["load_grant"]
    assert "is on a proc file system" in out["load_inside"]
    # Granted before the mount appeared: each request still checks the opened file's file system.
    assert out["read"] == {
        "ok": False,
        "message": "path is on a proc file system (kernel state); it is never served",
    }
    assert not out["write"]["ok"] and "proc file system" in out["write"]["message"]
    assert out["plain"] == {"ok": True, "data": "plain"}
    assert ENV_SECRET not in proc.stdout
    assert not (tmp_path / "grant" / "kernel" / "self").exists()  # the mount died with the namespace


# --- hard links to protected state, through a real broker -----------------------------------------


@pytest.mark.anyio
async def test_hard_links_to_credentials_in_a_granted_directory_are_refused(
    ws: Workspace, nats_server: object, tmp_path: Path
) -> None:
    """As root (who can link any file): the granted directory is on the workspace's file system."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "notes.txt").write_bytes(b"ordinary")
    credentials = [*sorted((ws.state / "creds").glob("*.nk")), ws.state / "secrets.env"]
    assert credentials[0].is_file() and credentials[-1].is_file()
    links = {}
    for i, target in enumerate(credentials[:2] + credentials[-1:]):
        link = data / f"innocent-{i}.txt"
        os.link(target, link)
        assert link.stat().st_nlink > 1 and link.stat().st_dev == target.stat().st_dev
        links[link] = target.read_bytes()
    ws.grant_file(TOOL).write_text(
        json.dumps(
            {
                "component_id": TOOL,
                "permissions": {
                    "file_read": {"enabled": True, "directories": [str(data)]},
                    "file_write": {"enabled": True, "directories": [str(data)]},
                },
            }
        )
    )
    async with running_broker(ws), connected_pack(ws) as pack:
        tool = pack.context(TOOL)
        assert await tool.file_read(str(data / "notes.txt")) == b"ordinary"
        for link in links:
            with pytest.raises(PermissionDenied, match="hard link to a protected file"):
                await tool.file_read(str(link))
            with pytest.raises(PermissionDenied, match="hard link to a protected file"):
                await tool.file_write(str(link), b"overwritten")
    for link, content in links.items():
        assert link.read_bytes() == content  # neither the link nor the credential behind it changed
