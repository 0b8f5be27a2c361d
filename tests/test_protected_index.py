"""broker.core.protected.ProtectedIndex: what is indexed, how it stays current, the grant-root chain cache."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from broker.backends.files import read_beneath, write_beneath
from broker.core import protected as _protected
from broker.core.errors import Denied
from broker.core.protected import ProtectedIndex, ProtectedSet, file_identity
from broker.core.workspace import Workspace
from tests._skip import skip_unless_ci

from ._handlers import file_context

SECRET = b"SUASECRETSEEDSECRETSEED"
INSIDE = b"inside the grant"


ctx = file_context


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    root = tmp_path / "ws"
    for d in (
        "docker/.rumi/creds",
        "docker/.rumi/packcreds/p1",
        "docker/grants",
        "docker/handlers",
        "docker/scopes",
        "docker/sandbox/p1",
        "docker/sandbox/p2",
        "ecosystem/p1",
    ):
        (root / d).mkdir(parents=True)
    for name in ("broker", "p1", "p2"):
        (root / f"docker/.rumi/creds/{name}.nk").write_bytes(SECRET)
    (root / "docker/.rumi/packcreds/p1/p1.nk").write_bytes(SECRET)
    (root / "docker/.rumi/secrets.env").write_bytes(SECRET)
    (root / "docker/grants/p1:tool:t.json").write_bytes(b"{}")
    (root / "docker/config.json").write_bytes(b"{}")
    (root / "docker/sandbox/p1/mine.txt").write_bytes(INSIDE)
    (root / "docker/sandbox/p2/theirs.txt").write_bytes(SECRET)
    return Workspace.at(root)


@pytest.fixture
def grant(tmp_path: Path) -> Path:
    g = tmp_path / "data" / "grant"
    g.mkdir(parents=True)
    (g / "a.txt").write_bytes(INSIDE)
    return g


@pytest.fixture
def settle_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Trust stamps older than 50 ms instead of 2 s (where the file system has sub-second timestamps).

    So a test can build a *settled* index (one that checks reuse without rebuilding) and then see
    that a change is still noticed by the stamps alone.
    """
    probe = tmp_path / "probe"
    probe.mkdir()
    if probe.stat().st_ctime_ns % 1_000_000_000 == 0:
        pytest.skip("this file system has whole-second timestamps")
    monkeypatch.setattr(_protected, "_SETTLE_NS", 50_000_000)
    # And no refresh because the index got old on a busy machine: these tests count rebuilds and walks.
    monkeypatch.setattr(_protected, "_STALE_AFTER", 3600.0)


class _NoMountEvents:
    def count(self) -> int:
        return 0


@pytest.fixture
def quiet_mounts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Containers started by other tests on this host change the mount table, which (rightly) makes
    every index rebuild; tests that assert an index is *reused* ignore the mount table."""
    monkeypatch.setattr(_protected, "_mounts", _NoMountEvents)


def settled_index(ws: Workspace, *, reused: bool = True) -> ProtectedIndex:
    time.sleep(0.1)  # everything created by the fixtures is now older than the settle time
    index = ProtectedIndex.for_workspace(ws)
    state = index.current()
    assert state.settled
    if reused:
        assert index.current() is state  # validated by the stamps, not rebuilt
    return index


# --- what is indexed --------------------------------------------------------------------------------


def test_index_holds_the_protected_paths_and_the_files_beneath_them(ws: Workspace) -> None:
    index = ProtectedIndex.for_workspace(ws)
    for path in [
        ws.state,
        ws.state / "creds",
        ws.state / "creds" / "p2.nk",
        ws.state / "packcreds" / "p1" / "p1.nk",
        ws.state / "secrets.env",
        ws.grants / "p1:tool:t.json",
        ws.config_file,
        ws.pack_work_area("p2") / "theirs.txt",
    ]:
        assert index.contains(file_identity(path.lstat())), path
    assert not index.contains(file_identity(Path("/").stat()))
    # A Pack's own work area is protected for every other Pack, not for itself.
    mine = file_identity((ws.pack_work_area("p1") / "mine.txt").lstat())
    assert index.contains(mine)
    assert not ProtectedSet.for_pack(ws, "p1", index=index).contains(mine)
    assert ProtectedSet.for_pack(ws, "p2", index=index).contains(mine)
    assert ProtectedSet.for_pack(ws, None, index=index).contains(mine)
    assert index.complete


def test_hard_link_to_a_protected_file_is_in_the_index_and_refused(ws: Workspace, grant: Path) -> None:
    creds = ws.state / "creds" / "p2.nk"
    link = grant / "innocent.txt"
    os.link(creds, link)
    index = ProtectedIndex.for_workspace(ws)
    assert index.contains(file_identity(link.stat()))
    ps = ProtectedSet.for_pack(ws, "p1", index=index)
    with pytest.raises(Denied, match="hard link to a protected file"):
        read_beneath(ctx([str(grant)], ps), str(link), 1000)
    with pytest.raises(Denied, match="hard link to a protected file"):
        write_beneath(ctx([str(grant)], ps), str(link), b"pwned", 1000)
    assert creds.read_bytes() == SECRET and link.stat().st_nlink == 2
    # An ordinary file in the same grant is served; so is a hard link among the grant's own files.
    os.link(grant / "a.txt", grant / "b.txt")
    assert read_beneath(ctx([str(grant)], ps), f"{grant}/b.txt", 1000) == INSIDE


def test_hard_link_to_another_packs_file_is_refused_to_it_only(ws: Workspace, grant: Path) -> None:
    os.link(ws.pack_work_area("p1") / "mine.txt", grant / "shared.txt")
    index = ProtectedIndex.for_workspace(ws)
    p1 = ProtectedSet.for_pack(ws, "p1", index=index)
    p2 = ProtectedSet.for_pack(ws, "p2", index=index)
    assert read_beneath(ctx([str(grant)], p1), f"{grant}/shared.txt", 1000) == INSIDE
    with pytest.raises(Denied):
        read_beneath(ctx([str(grant)], p2, "p2"), f"{grant}/shared.txt", 1000)


def test_a_new_protected_file_is_indexed_by_the_next_refresh(ws: Workspace, grant: Path) -> None:
    index = ProtectedIndex.for_workspace(ws)
    ps = ProtectedSet.for_pack(ws, "p1", index=index)
    assert read_beneath(ctx([str(grant)], ps), f"{grant}/a.txt", 1000) == INSIDE
    (ws.state / "creds" / "p3.nk").write_bytes(SECRET)
    os.link(ws.state / "creds" / "p3.nk", grant / "p3.nk")
    index.refresh()  # the watcher's poll
    assert index.contains(file_identity((grant / "p3.nk").stat()))
    with pytest.raises(Denied):
        read_beneath(ctx([str(grant)], ps), f"{grant}/p3.nk", 1000)
    (ws.state / "creds" / "p3.nk").unlink()
    index.refresh()
    assert not index.contains(file_identity((grant / "p3.nk").stat()))
    assert read_beneath(ctx([str(grant)], ps), f"{grant}/p3.nk", 1000) == SECRET  # no longer protected


def test_an_entry_renamed_inside_the_trees_stays_indexed(ws: Workspace) -> None:
    index = ProtectedIndex.for_workspace(ws)
    ident = file_identity((ws.state / "creds" / "p2.nk").stat())
    os.rename(ws.state / "creds" / "p2.nk", ws.state / "packcreds" / "p1" / "moved.nk")
    index.refresh()
    assert index.contains(ident)
    os.rename(ws.state / "packcreds" / "p1" / "moved.nk", ws.pack_work_area("p1") / "moved.nk")
    index.refresh()
    assert index.contains(ident)  # now beneath p1's work area: protected for every other Pack
    assert not ProtectedSet.for_pack(ws, "p1", index=index).contains(ident)


def test_index_size_is_capped_and_the_cap_is_logged(ws: Workspace, caplog: pytest.LogCaptureFixture) -> None:
    for i in range(50):
        (ws.state / "creds" / f"extra{i}.nk").write_bytes(SECRET)
    caplog.set_level(logging.INFO, logger="rumi.protected")
    index = ProtectedIndex.for_workspace(ws, max_entries=20)
    index.current()
    assert not index.complete
    top = len(index.current().top)
    assert len(index) - top <= 20
    assert sum("more than 20 entries" in r.getMessage() for r in caplog.records) == 1
    index.refresh()
    assert sum("more than 20 entries" in r.getMessage() for r in caplog.records) == 1  # logged once
    for i in range(50):
        (ws.state / "creds" / f"extra{i}.nk").unlink()
    index.refresh()
    assert index.complete
    assert any("complete again" in r.getMessage() for r in caplog.records)
    # The workspace's own state is indexed before other Packs' work areas.
    small = ProtectedIndex.for_workspace(ws, max_entries=8)
    assert small.contains(file_identity((ws.state / "secrets.env").stat()))
    assert not small.contains(file_identity((ws.pack_work_area("p2") / "theirs.txt").stat()))


# --- the top level is exact: changes are seen by the very next check --------------------------------


def test_protected_path_created_after_load_is_covered(
    ws: Workspace, tmp_path: Path, settle_fast: None, quiet_mounts: None
) -> None:
    index = settled_index(ws)
    ps = ProtectedSet.for_pack(ws, "p1", index=index)
    context = ctx([str(ws.root)], ps)
    gen = index.generation
    ws.base.mkdir()
    (ws.base / "Dockerfile").write_bytes(SECRET)
    (ws.work_areas / "p3").mkdir()
    (ws.work_areas / "p3" / "x").write_bytes(SECRET)
    (ws.docker / "docker-compose.yml").write_bytes(SECRET)
    for tail in ["docker/base/Dockerfile", "docker/sandbox/p3/x", "docker/docker-compose.yml"]:
        with pytest.raises(Denied):
            read_beneath(context, f"{ws.root}/{tail}", 1000)
    assert index.generation > gen  # no refresh() was called: the stamps saw it


def test_protected_directory_replaced_by_rename_is_covered_at_once(
    ws: Workspace, tmp_path: Path, settle_fast: None, quiet_mounts: None
) -> None:
    staged = tmp_path / "new-state"
    staged.mkdir()
    (staged / "fresh.nk").write_bytes(SECRET)
    index = settled_index(ws)
    ps = ProtectedSet.for_pack(ws, "p1", index=index)
    # A grant on the staged directory is fine while it is not protected ...
    assert read_beneath(ctx([str(staged)], ps), f"{staged}/fresh.nk", 1000) == SECRET
    old = index.current()
    os.rename(ws.state, ws.docker / "old-state")
    os.rename(staged, ws.state)
    # ... and refused the moment it becomes docker/.rumi, with no refresh in between.
    assert index.current() is not old
    with pytest.raises(Denied):
        read_beneath(ctx([str(ws.root)], ps), f"{ws.state}/fresh.nk", 1000)
    with pytest.raises(Denied):
        write_beneath(ctx([str(ws.root)], ps), f"{ws.state}/planted", b"x", 1000)
    assert not (ws.state / "planted").exists()
    # Its contents were indexed along with it (a hard link to them is recognised at once too).
    assert index.contains(file_identity((ws.state / "fresh.nk").stat()))


def test_symlinked_protected_path_is_followed_on_every_check(
    ws: Workspace, tmp_path: Path, settle_fast: None, quiet_mounts: None
) -> None:
    real = tmp_path / "state-a"
    shutil.move(ws.state, real)
    ws.state.symlink_to(real)
    other = tmp_path / "state-b"
    other.mkdir()
    (other / "k.nk").write_bytes(SECRET)
    index = settled_index(ws)
    ps = ProtectedSet.for_pack(ws, "p1", index=index)
    assert read_beneath(ctx([str(other)], ps), f"{other}/k.nk", 1000) == SECRET
    # The link's target is replaced: docker/ does not change, the followed identity does.
    os.rename(real, tmp_path / "state-a-old")
    os.rename(other, real)
    with pytest.raises(Denied):
        read_beneath(ctx([str(real)], ps), f"{real}/k.nk", 1000)


def _can_mount(tmp_path: Path) -> bool:
    probe = tmp_path / "mount-probe"
    probe.mkdir()
    ok = subprocess.run(["mount", "--bind", str(probe), str(probe)], capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", str(probe)], check=True)
    return ok


def test_a_mount_over_a_protected_path_is_seen_at_once(
    ws: Workspace, tmp_path: Path, settle_fast: None
) -> None:
    if shutil.which("mount") is None or not _can_mount(tmp_path):
        skip_unless_ci("cannot mount here (needs CAP_SYS_ADMIN)")
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "f").write_bytes(SECRET)
    index = settled_index(ws, reused=False)  # the mount table may change under other tests
    ps = ProtectedSet.for_pack(ws, "p1", index=index)
    assert read_beneath(ctx([str(other)], ps), f"{other}/f", 1000) == SECRET
    subprocess.run(["mount", "--bind", str(other), str(ws.state)], check=True)
    try:
        # docker/.rumi now is `other` (same device and inode): nothing in docker/ changed.
        with pytest.raises(Denied):
            read_beneath(ctx([str(other)], ps), f"{other}/f", 1000)
    finally:
        subprocess.run(["umount", str(ws.state)], check=True)
    assert read_beneath(ctx([str(other)], ps), f"{other}/f", 1000) == SECRET


def test_unsettled_stamps_are_never_trusted(ws: Workspace) -> None:
    index = ProtectedIndex.for_workspace(ws)  # the fixtures just wrote docker/: younger than 2 s
    first = index.current()
    assert not first.settled
    assert index.current() is not first  # rebuilt (top level only) on every check until settled


# --- the grant root's ancestors: computed once, dropped when they may have changed ----------------


def _count_walks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the start directory of every walk up (the chain walk starts at the grant root)."""
    starts: list[int] = []
    original = ProtectedSet._walk_up

    def counting(self: ProtectedSet, states, dir_fd, ident, stop_at):  # type: ignore[no-untyped-def]
        starts.append(0 if stop_at is None else 1)  # 0: a walk to "/" (the chain), 1: up to the root
        return original(self, states, dir_fd, ident, stop_at)

    monkeypatch.setattr(ProtectedSet, "_walk_up", counting)
    return starts


def test_grant_root_chain_is_computed_once(
    ws: Workspace, grant: Path, monkeypatch: pytest.MonkeyPatch, settle_fast: None, quiet_mounts: None
) -> None:
    index = settled_index(ws)
    ps = ProtectedSet.for_pack(ws, "p1", index=index)
    walks = _count_walks(monkeypatch)
    context = ctx([str(grant)], ps)
    for _ in range(5):
        assert read_beneath(context, f"{grant}/a.txt", 1000) == INSIDE
    assert walks.count(0) == 1 and walks.count(1) == 5
    index.refresh()  # the watcher's tick drops the cached chains
    read_beneath(context, f"{grant}/a.txt", 1000)
    assert walks.count(0) == 2


def test_chain_cache_is_invalidated_when_the_grant_directory_is_replaced(
    ws: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settle_fast: None, quiet_mounts: None
) -> None:
    area = tmp_path / "area"
    (area / "g").mkdir(parents=True)
    (area / "g" / "f").write_bytes(INSIDE)
    other = tmp_path / "other-g"
    other.mkdir()
    (other / "f").write_bytes(b"other")
    (ws.state / "g").mkdir()
    (ws.state / "g" / "f").write_bytes(SECRET)
    via = tmp_path / "via"
    via.symlink_to(area)
    index = settled_index(ws)
    ps = ProtectedSet.for_pack(ws, "p1", index=index)
    walks = _count_walks(monkeypatch)
    context = ctx([f"{via}/g"], ps)
    assert read_beneath(context, f"{via}/g/f", 1000) == INSIDE
    assert read_beneath(context, f"{via}/g/f", 1000) == INSIDE
    assert walks.count(0) == 1
    # A different directory renamed into the grant directory's place: its chain is computed anew.
    os.rename(area / "g", tmp_path / "old-g")
    os.rename(other, area / "g")
    assert read_beneath(context, f"{via}/g/f", 1000) == b"other"
    assert walks.count(0) == 2
    # The grant path re-pointed (a new symlink renamed over the old one) at a directory inside
    # docker/.rumi: another grant root, whose chain holds a protected directory. Refused at once.
    (tmp_path / "via.new").symlink_to(ws.state)
    os.rename(tmp_path / "via.new", via)
    with pytest.raises(Denied):
        read_beneath(context, f"{via}/g/f", 1000)
    (tmp_path / "via.new").symlink_to(area)
    os.rename(tmp_path / "via.new", via)
    assert read_beneath(context, f"{via}/g/f", 1000) == b"other"


def test_chain_cache_sees_a_protected_path_appearing_above_a_grant(tmp_path: Path, settle_fast: None) -> None:
    area = tmp_path / "area"
    (area / "g").mkdir(parents=True)
    (area / "g" / "f").write_bytes(INSIDE)
    slot = tmp_path / "slot"  # protected, not there yet
    time.sleep(0.1)
    ps = ProtectedSet([slot])
    context = ctx([f"{tmp_path}/link/g"], ps)
    (tmp_path / "link").symlink_to("area")
    assert read_beneath(context, f"{tmp_path}/link/g/f", 1000) == INSIDE
    # The grant root keeps its identity and ctime; a directory above it becomes the protected path.
    os.rename(area, slot)
    (tmp_path / "link").unlink()
    (tmp_path / "link").symlink_to("slot")
    with pytest.raises(Denied):
        read_beneath(context, f"{tmp_path}/link/g/f", 1000)


def test_shared_index_belongs_to_its_workspace(ws: Workspace, tmp_path: Path) -> None:
    other = Workspace.at(tmp_path / "other-ws")
    with pytest.raises(ValueError):
        ProtectedSet.for_pack(other, "p1", index=ProtectedIndex.for_workspace(ws))
