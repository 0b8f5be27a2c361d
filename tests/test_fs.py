"""broker.backends.files: openat2, grant roots, traversal corpus, symlinks, magic links, races, protected paths."""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import functools
import os
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

from broker.backends import files as _fs
from broker.backends.files import (
    RESOLVE_BENEATH,
    RESOLVE_NO_MAGICLINKS,
    ProtectedSet,
    find_grant_root,
    openat2,
    read_beneath,
    write_beneath,
)
from broker.core.errors import Denied, HandlerFailed, InvalidRequest, RequestError, TooLarge, Unavailable
from broker.core.workspace import Workspace
from tests._skip import skip_unless_ci

from ._handlers import file_context

CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"
SECRET = b"TOP-SECRET-OUTSIDE-THE-GRANT"
INSIDE = b"inside the grant"


ctx = functools.partial(file_context, max_bytes=1 << 20)


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """tmp/grant (granted, with inside files) next to tmp/outside (holding the secret)."""
    grant = tmp_path / "grant"
    outside = tmp_path / "outside"
    (grant / "sub").mkdir(parents=True)
    (grant / "etc").mkdir()
    outside.mkdir()
    (outside / "secret.txt").write_bytes(SECRET)
    (grant / "inside.txt").write_bytes(INSIDE)
    (grant / "sub" / "real.txt").write_bytes(INSIDE)
    (grant / "etc" / "passwd").write_bytes(INSIDE)
    return {"root": tmp_path, "grant": grant, "outside": outside, "secret": outside / "secret.txt"}


# --- openat2 ---------------------------------------------------------------------------------------


def test_openat2_opens_beneath_and_refuses_escapes(tree: dict[str, Path]) -> None:
    root = os.open(tree["grant"], os.O_PATH | os.O_DIRECTORY)
    try:
        fd = openat2(root, "sub/real.txt", os.O_RDONLY | os.O_CLOEXEC)
        try:
            assert os.read(fd, 100) == INSIDE
        finally:
            os.close(fd)
        for bad, code in [
            ("../outside/secret.txt", errno.EXDEV),
            (str(tree["secret"]), errno.EXDEV),
            ("sub/../../outside/secret.txt", errno.EXDEV),
            ("missing", errno.ENOENT),
        ]:
            with pytest.raises(OSError) as info:
                openat2(root, bad, os.O_RDONLY)
            assert info.value.errno == code, bad
    finally:
        os.close(root)


def test_openat2_refuses_magic_links() -> None:
    proc = os.open("/proc", os.O_PATH | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError) as info:
            openat2(proc, "self/root/etc/hostname", os.O_RDONLY, 0, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)
        assert info.value.errno in (errno.ELOOP, errno.EXDEV)
    finally:
        os.close(proc)


def test_openat2_missing_syscall_refuses(monkeypatch: pytest.MonkeyPatch, tree: dict[str, Path]) -> None:
    def enosys(*_args: object) -> int:
        ctypes.set_errno(errno.ENOSYS)
        return -1

    monkeypatch.setattr(_fs, "_syscall", enosys)
    root = os.open("/", os.O_PATH)
    try:
        with pytest.raises(OSError) as info:
            openat2(root, "etc", os.O_PATH)
    finally:
        os.close(root)
    assert info.value.errno == errno.ENOSYS and "openat2" in str(info.value)
    with pytest.raises(Unavailable):
        read_beneath(ctx([str(tree["grant"])]), f"{tree['grant']}/inside.txt", 100)
    monkeypatch.setattr(_fs, "_syscall", None)
    with pytest.raises(Unavailable):
        write_beneath(ctx([str(tree["grant"])]), f"{tree['grant']}/new.txt", b"x", 100)
    assert not (tree["grant"] / "new.txt").exists()


# --- find_grant_root ------------------------------------------------------------------------------

GRANTS = ["/data", "/data/deep/", "/srv//x", "/bad/../etc", "relative/dir", "/"]


@pytest.mark.parametrize(
    ("path", "dirs", "expected"),
    [
        ("/data/a.txt", ["/data"], ("/data", "a.txt")),
        ("/data", ["/data"], ("/data", ".")),
        ("/data/", ["/data"], ("/data", ".")),
        ("/data/sub/", ["/data"], ("/data", "sub")),
        ("/data//sub///f", ["/data"], ("/data", "sub/f")),
        ("/data/../etc/passwd", ["/data"], ("/data", "../etc/passwd")),
        ("/data/./a", ["/data"], ("/data", "./a")),
        ("/data/deep/f", ["/data", "/data/deep/"], ("/data/deep/", "f")),
        ("/srv/x/y", ["/srv//x"], ("/srv//x", "y")),
        ("/data2/x", ["/data"], Denied),
        ("/dat", ["/data"], Denied),
        ("/datax", ["/data"], Denied),
        ("/etc/passwd", ["/data"], Denied),
        ("/./data/a", ["/data"], Denied),
        ("/bad/../etc/passwd", ["/bad/../etc"], Denied),
        ("/relative/dir/x", ["relative/dir"], Denied),
        ("/anything", [], Denied),
        ("/etc/passwd", ["/"], ("/", "etc/passwd")),
        ("data/a.txt", ["/data"], InvalidRequest),
        ("./data/a.txt", ["/data"], InvalidRequest),
        ("", ["/data"], InvalidRequest),
        ("/data/a\0.txt", ["/data"], InvalidRequest),
        ("\\data\\a.txt", ["/data"], InvalidRequest),
    ],
)
def test_find_grant_root(path: str, dirs: list[str], expected: object) -> None:
    if isinstance(expected, type):
        with pytest.raises(expected):
            find_grant_root(path, dirs)
    else:
        assert find_grant_root(path, dirs) == expected


# --- traversal corpus -----------------------------------------------------------------------------


def _corpus_lines() -> list[str]:
    folder = CORPORA / "traversal"
    if not folder.is_dir():
        pytest.skip(f"traversal corpus absent at {folder}")
    lines: list[str] = []
    for f in sorted(folder.glob("*.txt")):
        for raw in f.read_bytes().split(b"\n"):
            line = raw.decode("utf-8", "surrogateescape").rstrip("\r")
            if line:
                lines.append(line)
    if not lines:
        pytest.skip(f"traversal corpus at {folder} is empty")
    return lines


def _expand(line: str, files: list[str]) -> set[str]:
    """Raw, URL-decoded once and twice, backslashes as slashes; {FILE} replaced by each target."""
    forms = {line}
    forms |= {urllib.parse.unquote(v) for v in list(forms)}
    forms |= {urllib.parse.unquote(urllib.parse.unquote(line))}
    forms |= {v.replace("\\", "/") for v in list(forms)}
    if "{FILE}" in line:
        return {v.replace("{FILE}", f) for v in forms for f in files}
    return forms


def test_traversal_corpus_never_escapes(tree: dict[str, Path]) -> None:
    lines = _corpus_lines()
    grant = str(tree["grant"])
    # {FILE} targets: the secret from "/" (deep traversals) and from the grant's parent (one "..").
    files = [str(tree["secret"]).lstrip("/"), "outside/secret.txt", "etc/passwd"]
    outside_contents = {SECRET, Path("/etc/passwd").read_bytes()}
    context = ctx([grant])
    seen: set[str] = set()
    counts: dict[str, int] = {}
    for line in lines:
        for variant in _expand(line, files):
            if variant in seen:
                continue
            seen.add(variant)
            path = grant + "/" + variant
            try:
                data = read_beneath(context, path, 1 << 20)
            except RequestError as exc:
                counts[type(exc).__name__] = counts.get(type(exc).__name__, 0) + 1
                assert SECRET.decode() not in exc.message and str(tree["outside"]) not in exc.message
                continue
            counts["read"] = counts.get("read", 0) + 1
            assert data not in outside_contents, variant
            assert data == INSIDE, variant
    print(f"traversal corpus: {len(lines)} lines, {len(seen)} distinct paths, outcomes {counts}")
    assert counts.get("Denied", 0) > 1000


# --- symlinks, magic links, hard links -----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "target", "request_tail", "expected"),
    [
        ("link.txt", "sub/real.txt", "link.txt", INSIDE),
        ("dirlink", "sub", "dirlink/real.txt", INSIDE),
        ("chain1", "chain2", "chain1", INSIDE),  # chain2 -> sub/real.txt, made below
        ("uplink", "../inside.txt", "sub/uplink", INSIDE),
        ("out.txt", "../outside/secret.txt", "out.txt", Denied),
        ("outdir", "../outside", "outdir/secret.txt", Denied),
        ("abs.txt", "{secret}", "abs.txt", Denied),
        ("absin.txt", "{grant}/inside.txt", "absin.txt", Denied),  # absolute links are refused even inside
        ("roundtrip", "../grant/inside.txt", "roundtrip", Denied),  # passes above the grant root
        ("procroot", "/proc/self/root{secret}", "procroot", Denied),
        ("procup", "../../../../../../../../../../proc/self/root{secret}", "procup", Denied),
        ("loop", "loop", "loop", Denied),
    ],
)
def test_symlinks(tree: dict[str, Path], name: str, target: str, request_tail: str, expected: object) -> None:
    grant = tree["grant"]
    (grant / "chain2").symlink_to("sub/real.txt")
    where = grant / "sub" if name == "uplink" else grant
    (where / name).symlink_to(target.format(secret=tree["secret"], grant=grant))
    path = f"{grant}/{request_tail}"
    if isinstance(expected, bytes):
        assert read_beneath(ctx([str(grant)]), path, 1000) == expected
    else:
        with pytest.raises(Denied) as info:
            read_beneath(ctx([str(grant)]), path, 1000)
        assert str(tree["secret"]) not in info.value.message


def test_magic_links_refused(tree: dict[str, Path]) -> None:
    """A grant on /proc/<pid> still cannot follow root/, cwd/ or fd/N out of it."""
    proc = f"/proc/{os.getpid()}"
    fd = os.open(tree["secret"], os.O_RDONLY)
    try:
        cwd = os.getcwd()
        os.chdir(tree["outside"])
        try:
            for path in [f"{proc}/root{tree['secret']}", f"{proc}/cwd/secret.txt", f"{proc}/fd/{fd}"]:
                with pytest.raises(RequestError) as info:
                    read_beneath(ctx([proc]), path, 1000)
                assert isinstance(info.value, Denied | HandlerFailed), path
        finally:
            os.chdir(cwd)
    finally:
        os.close(fd)


def test_hardlink_to_protected_file_is_refused(tree: dict[str, Path]) -> None:
    precious = tree["root"] / "precious.json"
    precious.write_bytes(SECRET)
    os.link(precious, tree["grant"] / "hl.json")
    with pytest.raises(Denied):
        read_beneath(ctx([str(tree["grant"])], ProtectedSet([precious])), f"{tree['grant']}/hl.json", 1000)
    # Writing the hard-linked name replaces the entry; the protected inode keeps its content.
    write_beneath(ctx([str(tree["grant"])]), f"{tree['grant']}/hl.json", b"new", 1000)
    assert precious.read_bytes() == SECRET


def test_special_files_refused(tree: dict[str, Path]) -> None:
    os.mkfifo(tree["grant"] / "fifo")
    with pytest.raises(Denied):
        read_beneath(ctx([str(tree["grant"])]), f"{tree['grant']}/fifo", 1000)
    with pytest.raises(HandlerFailed, match="directory"):
        read_beneath(ctx([str(tree["grant"])]), f"{tree['grant']}/sub", 1000)
    with pytest.raises(HandlerFailed, match="directory"):
        read_beneath(ctx([str(tree["grant"])]), f"{tree['grant']}", 1000)
    with pytest.raises(HandlerFailed, match="no such file"):
        read_beneath(ctx([str(tree["grant"])]), f"{tree['grant']}/nope", 1000)


def test_read_size_cap(tree: dict[str, Path]) -> None:
    (tree["grant"] / "big").write_bytes(b"x" * 101)
    assert read_beneath(ctx([str(tree["grant"])]), f"{tree['grant']}/big", 101) == b"x" * 101
    with pytest.raises(TooLarge):
        read_beneath(ctx([str(tree["grant"])]), f"{tree['grant']}/big", 100)


@pytest.mark.parametrize("hint", [0, 10, 5000, 200_000])
def test_read_reads_to_the_end_whatever_the_size_hint(tmp_path: Path, hint: int) -> None:
    # The first read is sized from the fstat that checked the file; a file that grew since (hint
    # too small) is still read to its end, and the cap still holds.
    path = tmp_path / "f"
    path.write_bytes(bytes(range(256)) * 40)  # 10,240 bytes
    fd = os.open(path, os.O_RDONLY)
    try:
        assert _fs._read_capped(fd, 20_000, hint) == path.read_bytes()
        os.lseek(fd, 0, os.SEEK_SET)
        with pytest.raises(TooLarge):
            _fs._read_capped(fd, 10_239, hint)
    finally:
        os.close(fd)


def test_read_of_a_file_in_a_subdirectory_and_in_the_grant_root(tree: dict[str, Path]) -> None:
    # A name directly in the grant root is opened in the root's own fd (no second fd of it).
    (tree["grant"] / "sub").mkdir(exist_ok=True)
    (tree["grant"] / "sub" / "f").write_bytes(b"deep")
    (tree["grant"] / "top").write_bytes(b"top")
    context = ctx([str(tree["grant"])])
    assert read_beneath(context, f"{tree['grant']}/sub/f", 100) == b"deep"
    assert read_beneath(context, f"{tree['grant']}/top", 100) == b"top"
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        read_beneath(context, f"{tree['grant']}/top", 100)
    assert len(os.listdir("/proc/self/fd")) == before  # no descriptor leaked


# --- races -----------------------------------------------------------------------------------------


def test_rename_races_never_leak(tree: dict[str, Path]) -> None:
    grant, outside = tree["grant"], tree["outside"]
    (outside / "f.txt").write_bytes(SECRET)
    (outside / "inside.txt").write_bytes(SECRET)
    # Race 1: grant/d flips between a real dir and a symlink to the outside dir.
    (grant / "d_dir").mkdir()
    (grant / "d_dir" / "f.txt").write_bytes(INSIDE)
    (grant / "d_sym").symlink_to(outside)
    # Race 2: grant/f flips between a regular file and a relative symlink to the secret.
    (grant / "f_reg").write_bytes(INSIDE)
    (grant / "f_sym").symlink_to("../outside/secret.txt")
    # Race 3: grant/inner/deeper moves out of the grant and back, while reads walk ".." from it.
    (grant / "inner" / "deeper").mkdir(parents=True)
    (outside / "parked").mkdir()
    (outside / "parked" / "inside.txt").write_bytes(SECRET)

    stop = threading.Event()
    errors: list[BaseException] = []

    def flip(a: Path, b: Path, target: Path) -> None:
        try:
            for _ in range(1_000_000):
                if stop.is_set():
                    return
                for staged in (a, b):
                    try:
                        os.rename(staged, target)
                        os.rename(target, staged)
                    except FileNotFoundError:
                        pass
        except BaseException as exc:
            errors.append(exc)

    def move_out() -> None:
        src, dst = grant / "inner" / "deeper", outside / "parked" / "deeper"
        try:
            for _ in range(1_000_000):
                if stop.is_set():
                    return
                os.rename(src, dst)
                os.rename(dst, src)
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=flip, args=(grant / "d_dir", grant / "d_sym", grant / "d")),
        threading.Thread(target=flip, args=(grant / "f_reg", grant / "f_sym", grant / "f")),
        threading.Thread(target=move_out),
    ]
    context = ctx([str(grant)])
    paths = [f"{grant}/d/f.txt", f"{grant}/f", f"{grant}/inner/deeper/../../inside.txt"]
    outcomes: dict[str, int] = {}
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 2.0
        for i in range(1_000_000):
            if time.monotonic() > deadline:
                break
            try:
                data = read_beneath(context, paths[i % len(paths)], 1000)
            except RequestError as exc:
                outcomes[type(exc).__name__] = outcomes.get(type(exc).__name__, 0) + 1
                continue
            assert data == INSIDE
            outcomes["read"] = outcomes.get("read", 0) + 1
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=5)
    assert not errors
    print(f"race outcomes in 2 s: {outcomes}")
    assert outcomes.get("read", 0) > 0


# --- protected paths -------------------------------------------------------------------------------


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    root = tmp_path / "ws"
    for d in [
        "docker/.rumi",
        "docker/grants",
        "docker/handlers",
        "docker/scopes",
        "docker/sandbox/p1",
        "docker/sandbox/p2",
        "ecosystem/default",
    ]:
        (root / d).mkdir(parents=True)
    (root / "docker/.rumi/creds").write_bytes(SECRET)
    (root / "docker/config.json").write_bytes(b"{}")
    (root / "docker/grants/p1:tool:t.json").write_bytes(b"{}")
    (root / "docker/sandbox/p1/note.txt").write_bytes(INSIDE)
    (root / "docker/sandbox/p2/note.txt").write_bytes(SECRET)
    (root / "ecosystem/default/main.py").write_bytes(SECRET)
    return Workspace.at(root)


def test_overlaps(ws: Workspace, tmp_path: Path) -> None:
    ps = ProtectedSet.for_pack(ws, "p1")
    (tmp_path / "alias").symlink_to(ws.state)
    (tmp_path / "other").mkdir()
    table = [
        (ws.root, True),
        (ws.docker, True),
        (ws.state, True),
        (ws.state / "sub", True),
        (ws.root / "docker/.rumi/../.rumi", True),
        (tmp_path / "alias", True),
        (tmp_path / "alias" / "x", True),
        (ws.work_areas / "p2", True),
        (ws.work_areas / "p1", False),
        (ws.work_areas / "p1" / "out", False),
        (ws.config_file, True),
        (tmp_path / "other", False),
        (tmp_path / "wsx", False),
        (tmp_path, True),
    ]
    for path, expected in table:
        assert ps.overlaps(path) is expected, path
    assert ProtectedSet.for_pack(ws, None).overlaps(ws.work_areas / "p1")


@pytest.mark.parametrize(
    ("tail", "expected"),
    [
        ("docker/.rumi/creds", Denied),
        ("docker/config.json", Denied),
        ("docker/grants/p1:tool:t.json", Denied),
        ("docker/sandbox/p2/note.txt", Denied),
        ("ecosystem/default/main.py", Denied),
        ("docker/sandbox/p1/note.txt", INSIDE),
        ("docker/sandbox/p1/../p2/note.txt", Denied),
        ("docker/sandbox/p1/link", Denied),  # link -> ../../.rumi/creds, inside the grant but protected
    ],
)
def test_protected_reads_through_a_workspace_grant(ws: Workspace, tail: str, expected: object) -> None:
    (ws.work_areas / "p1" / "link").symlink_to("../../.rumi/creds")
    context = ctx([str(ws.root)], ProtectedSet.for_pack(ws, "p1"))
    path = f"{ws.root}/{tail}"
    if isinstance(expected, bytes):
        assert read_beneath(context, path, 1000) == expected
    else:
        with pytest.raises(Denied):
            read_beneath(context, path, 1000)


def test_grant_inside_protected_dir_is_refused(ws: Workspace) -> None:
    context = ctx([str(ws.state)], ProtectedSet.for_pack(ws, "p1"))
    with pytest.raises(Denied):
        read_beneath(context, f"{ws.state}/creds", 1000)
    with pytest.raises(Denied):
        write_beneath(context, f"{ws.state}/new", b"x", 1000)
    assert not (ws.state / "new").exists()


def test_protected_dir_created_later_is_covered(ws: Workspace) -> None:
    ps = ProtectedSet.for_pack(ws, "p1")
    context = ctx([str(ws.root)], ps)
    ws.base.mkdir()
    (ws.base / "Dockerfile").write_bytes(SECRET)
    (ws.work_areas / "p3").mkdir()
    (ws.work_areas / "p3" / "x").write_bytes(SECRET)
    for tail in ["docker/base/Dockerfile", "docker/sandbox/p3/x"]:
        with pytest.raises(Denied):
            read_beneath(context, f"{ws.root}/{tail}", 1000)


@pytest.mark.parametrize(
    "tail",
    [
        "docker/config.json",
        "docker/docker-compose.yml",  # does not exist yet: refused by (parent, name)
        "docker/.rumi/new",
        "docker/grants/p1:tool:t.json",
        "docker/sandbox/p2/note.txt",
        "ecosystem/default/main.py",
    ],
)
def test_protected_writes_through_a_workspace_grant(ws: Workspace, tail: str) -> None:
    context = ctx([str(ws.root)], ProtectedSet.for_pack(ws, "p1"))
    before = {p: p.read_bytes() for p in ws.root.rglob("*") if p.is_file()}
    with pytest.raises(Denied):
        write_beneath(context, f"{ws.root}/{tail}", b"pwned", 1000)
    after = {p: p.read_bytes() for p in ws.root.rglob("*") if p.is_file()}
    assert after == before
    assert write_beneath(context, f"{ws.root}/docker/sandbox/p1/ok.txt", b"fine", 1000) == 4


def test_missing_protected_set_fails_closed(tree: dict[str, Path]) -> None:
    context = dataclasses.replace(ctx([str(tree["grant"])]), protected=None)
    with pytest.raises(HandlerFailed):
        read_beneath(context, f"{tree['grant']}/inside.txt", 1000)


def test_written_files_belong_to_the_directory_owner(tmp_path: Path) -> None:
    """A Pack can change the files the broker wrote into its sandbox (owned by the Pack's uid)."""
    if os.geteuid() != 0:
        skip_unless_ci("chown needs root (the broker runs as root in Docker mode)")
    grant = tmp_path / "sandbox"
    grant.mkdir()
    os.chown(grant, 23456, 23456)
    write_beneath(ctx([str(grant)]), f"{grant}/out.txt", b"x", 100)
    st = (grant / "out.txt").stat()
    assert (st.st_uid, st.st_gid) == (23456, 23456)
    assert st.st_mode & 0o7000 == 0
