"""The terminal handler: each command in a fresh, confined sandbox container (real containers).

Tests marked ``docker`` run real containers from ``rumi-sandbox:latest`` (built or reused with
``broker.containers.images.build_sandbox_image``). Without an engine they skip, except under CI (``CI=true``)
where that is a failure: run ``scripts/ensure-docker.sh`` first. The others need no engine.
"""

from __future__ import annotations

import json
import os
import re
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from broker.backends import terminal as _sandbox
from broker.backends.files import ProtectedSet
from broker.core.errors import Denied, HandlerFailed, InvalidRequest, RateLimited, Unavailable
from broker.core.workspace import Workspace
from tests._skip import skip_unless_ci

from .conftest import docker_engine, load_handler, say

CONFIG = Path(__file__).resolve().parents[1] / "config"
PACK = "default"
SECRET = b"HOST-SECRET-7f3a"
ROOT = os.geteuid() == 0


load = load_handler


terminal = load("terminal")
file_read = load("file_read")


def scope(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((CONFIG / "scopes" / f"{name}.json").read_text())
    return data


def context(ws: Workspace, name: str, grant: dict[str, Any], **extra: Any) -> dict[str, Any]:
    ctx: dict[str, Any] = {
        "pack_id": PACK,
        "component_id": f"{PACK}:tool:t",
        "request_id": "r1",
        "grant": {**scope(name)["default_config"], "enabled": True, **grant},
        "limits": {"timeout": 60},
        "protected": ProtectedSet.for_pack(ws, PACK),
        "workspace_root": str(ws.root),
        "audit": {},
    }
    ctx.update(extra)
    return ctx


@pytest.fixture
def area(tmp_path: Path) -> dict[str, Path]:
    """A granted directory with a file, and a host secret next to it (outside the grant)."""
    grant = tmp_path / "grant"
    grant.mkdir()
    (grant / "hello.txt").write_bytes(b"hello from the grant\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_bytes(SECRET)
    if ROOT:
        # A root-owned grant runs as 10001, which could not write here; the owner rule is tested below.
        os.chown(grant, _sandbox.SANDBOX_UID, _sandbox.SANDBOX_GID)
    return {"grant": grant, "outside": outside, "secret": outside / "secret.txt", "tmp": tmp_path}


def run(ws: Workspace, grant_dir: Path, argv: list[str], **kw: Any) -> dict[str, Any]:
    grant = {"directories": [str(grant_dir)], **kw.pop("grant", {})}
    ctx = context(ws, "terminal", grant)
    result = terminal.execute(ctx, {"argv": argv, **kw})
    assert result["success"] is True
    data: dict[str, Any] = result["data"]
    data["_audit"] = ctx["audit"]
    return data


# ------------------------------------------------------------------------------------ engine fixture


_engine = docker_engine

def _leftovers(client: Any) -> list[Any]:
    return list(
        client.api.containers(all=True, filters={"label": ["io.rumi.role=sandbox", f"io.rumi.pack={PACK}"]})
    )


@pytest.fixture(scope="module")
def engine(pytestconfig: pytest.Config) -> Iterator[Any]:
    from broker.containers.images import build_sandbox_image, image_tag

    client = _engine()
    lines: list[str] = []
    try:
        tag = build_sandbox_image(client, "rumi", lines.append)
    except Exception:
        _say(pytestconfig, "\n".join(lines[-40:]))
        raise
    assert tag == image_tag("sandbox") == scope("terminal")["default_config"]["image"]
    _sandbox.reset_engine()
    yield client
    _sandbox.reset_engine()
    left = _leftovers(client)
    _sandbox.remove_sandboxes(client, PACK)
    client.close()
    assert not left, f"{len(left)} sandbox containers left behind"


_say = say

# ------------------------------------------------------------------------------- no engine needed


def test_meta_and_scope() -> None:
    meta = terminal.META
    assert meta["requires_scope"] is True and meta["supports_modes"] == ["sandbox"]
    assert meta["target"]({"argv": ["git", "status"]}) == "git"
    assert meta["target"]({"argv": []}) == "" and meta["target"]({}) == ""
    assert issubclass(meta["grant_schema"], msgspec.Struct)
    grant = msgspec.convert({"enabled": True, "directories": ["/d"], "shell": True}, meta["grant_schema"])
    assert grant.shell is True
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"enabled": True, "directories": ["rel"]}, meta["grant_schema"])
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"enabled": True, "image": "evil:latest"}, meta["grant_schema"])
    assert scope("terminal")["default_config"] == {
        "timeout": 30,
        "max_timeout": 300,
        "max_output_bytes": 1048576,
        "memory_limit": "256m",
        "pids_limit": 64,
        "cpus": 1.0,
        "image": "rumi-sandbox:latest",
    }


@pytest.mark.parametrize(
    ("argv", "allowed"),
    [
        (["ls", "-la"], True),
        (["git", "status"], True),
        (["grep", "-r", "bash", "."], True),
        (["sh", "-c", "id"], False),
        (["bash", "-c", "id"], False),
        (["dash"], False),
        (["/bin/sh", "-c", "id"], False),
        (["/usr/bin/bash"], False),
        (["./bash"], False),
        (["zsh", "-c", "id"], False),
        (["busybox", "sh"], False),
        (["python3", "-c", "print(1)"], False),
        (["env", "bash", "-c", "id"], False),
        (["timeout", "5", "/bin/sh", "-c", "id"], False),
        (["xargs", "sh", "-c", "id"], False),
        (["env", "ls"], True),
    ],
)
def test_shell_rule(argv: list[str], allowed: bool) -> None:
    if allowed:
        terminal.refuse_shell(argv)
    else:
        with pytest.raises(Denied, match="shell: true"):
            terminal.refuse_shell(argv)


def test_shell_refused_without_grant_before_anything_runs(ws: Workspace, area: dict[str, Path]) -> None:
    with pytest.raises(Denied, match="shell"):
        run(ws, area["grant"], ["bash", "-c", "id"])
    with pytest.raises(Denied, match="shell"):
        run(ws, area["grant"], ["/bin/sh", "-c", "id"], grant={"shell": False})


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        ({"argv": []}, InvalidRequest, "argv"),
        ({"argv": [""]}, InvalidRequest, "argv"),
        ({"argv": ["ls", "a\0b"]}, InvalidRequest, "NUL"),
        ({"argv": ["ls"], "env": {"LD_PRELOAD": "/x.so"}}, InvalidRequest, "env"),
        ({"argv": "ls"}, InvalidRequest, "argv"),
        ({"argv": ["ls"] * 2000}, InvalidRequest, "argv"),
        ({"argv": ["x" * 40000]}, InvalidRequest, "argv"),
        ({"argv": ["ls"], "timeout": 0}, InvalidRequest, "timeout"),
        ({"argv": ["ls"], "timeout": -1.0}, InvalidRequest, "timeout"),
        ({"argv": ["ls"], "cwd": "relative"}, InvalidRequest, "absolute"),
        ({"argv": ["ls"], "cwd": "/etc"}, Denied, "outside"),
        ({"argv": ["ls"], "cwd": "{grant}/../outside"}, InvalidRequest, r"\.\."),
        ({"argv": ["ls"], "cwd": "{grant}x"}, Denied, "outside"),
        ({"argv": ["ls"], "stdin": 5}, InvalidRequest, "stdin"),
    ],
)
def test_invalid_requests(
    ws: Workspace, area: dict[str, Path], args: dict[str, Any], error: type[Exception], match: str
) -> None:
    if isinstance(args.get("cwd"), str):
        args = {**args, "cwd": args["cwd"].replace("{grant}", str(area["grant"]))}
    ctx = context(ws, "terminal", {"directories": [str(area["grant"])]})
    with pytest.raises(error, match=match):
        terminal.execute(ctx, args)


def test_not_granted(ws: Workspace, area: dict[str, Path]) -> None:
    with pytest.raises(Denied):
        terminal.execute(
            context(ws, "terminal", {"enabled": False, "directories": [str(area["grant"])]}), {"argv": ["ls"]}
        )
    with pytest.raises(Denied, match="no directories"):
        terminal.execute(context(ws, "terminal", {"directories": []}), {"argv": ["ls"]})


def test_invalid_scope_is_a_handler_error(ws: Workspace, area: dict[str, Path]) -> None:
    ctx = context(ws, "terminal", {"directories": [str(area["grant"])], "memory_limit": "lots"})
    with pytest.raises(HandlerFailed, match="scope"):
        terminal.execute(ctx, {"argv": ["ls"]})


def test_granted_directory_checks(ws: Workspace, area: dict[str, Path], tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(area["grant"])
    via_link = tmp_path / "via"
    via_link.symlink_to(tmp_path)
    sock_dir = tmp_path / "engine"
    sock_dir.mkdir()
    engine_sock = socket.socket(socket.AF_UNIX)
    engine_sock.bind(str(sock_dir / "docker.sock"))
    ws.pack_work_area("other").mkdir(parents=True, exist_ok=True)
    protected = ProtectedSet.for_pack(ws, PACK)
    cases: list[tuple[str, type[Exception], str]] = [
        (str(link), Denied, "symbolic link"),
        (f"{via_link}/grant", Denied, "symbolic link"),
        (str(ws.state), Denied, "protected"),
        (str(ws.grants), Denied, "protected"),
        (str(ws.pack_work_area("other")), Denied, "protected"),
        (str(ws.root), Denied, "protected"),
        ("/", Denied, "system"),
        ("/proc/self", Denied, "system"),
        ("/sys", Denied, "system"),
        ("/dev/shm", Denied, "system"),
        ("/etc", Denied, "system"),
        ("/usr/local/bin", Denied, "system"),
        ("/lib", Denied, "system"),
        ("/var", Denied, "system"),
        (str(sock_dir), Denied, "socket"),
        (str(tmp_path / "missing"), HandlerFailed, "does not exist"),
        (str(area["secret"]), HandlerFailed, "not a directory"),
        (f"{area['grant']}/../outside", HandlerFailed, r"\.\."),
    ]
    try:
        for path, error, match in cases:
            with pytest.raises(error, match=match):
                with _sandbox.open_granted_directories([path], protected, [str(sock_dir / "docker.sock")]):
                    pass
        ws.pack_work_area(PACK).mkdir(parents=True, exist_ok=True)
        with _sandbox.open_granted_directories(
            [str(area["grant"]), f"{area['grant']}/", str(ws.pack_work_area(PACK))], protected, []
        ) as opened:
            assert [g.path for g in opened] == [str(area["grant"]), str(ws.pack_work_area(PACK))]
            fds = [g.fd for g in opened]
        for fd in fds:
            with pytest.raises(OSError):
                os.fstat(fd)
    finally:
        engine_sock.close()


def test_command_slots_are_per_pack() -> None:
    with _sandbox.command_slot("a", 2), _sandbox.command_slot("a", 2):
        with pytest.raises(RateLimited, match="already running"):
            with _sandbox.command_slot("a", 2):
                pass
        with _sandbox.command_slot("b", 2):
            pass
    with _sandbox.command_slot("a", 1):
        pass
    assert _sandbox._running == {}


def test_handler_refuses_a_protected_grant(ws: Workspace) -> None:
    ctx = context(ws, "terminal", {"directories": [str(ws.state)]})
    with pytest.raises(Denied, match="protected"):
        terminal.execute(ctx, {"argv": ["ls"]})


def test_sandbox_user_is_never_root() -> None:
    def granted(uid: int, gid: int) -> _sandbox.GrantedDirectory:
        return _sandbox.GrantedDirectory("/d", -1, (1, 2), uid, gid, _closed=True)

    assert _sandbox.sandbox_user(granted(0, 0)) == (10001, 10001)
    assert _sandbox.sandbox_user(granted(1000, 1000)) == (1000, 1000)
    assert _sandbox.sandbox_user(granted(1000, 0)) == (1000, 10001)
    with pytest.raises(ValueError):
        _sandbox.container_spec(
            _sandbox.SandboxCommand(("id",), "/d", 0, 0, ()), _sandbox.SandboxLimits(), "img", PACK, "n"
        )


def test_container_spec_starts_from_nothing() -> None:
    command = _sandbox.SandboxCommand(("ls", "-la"), "/data/x", 1000, 1000, (("/data", (5, 7)),), None)
    spec = _sandbox.container_spec(
        command, _sandbox.SandboxLimits(memory_limit="128m", cpus=0.5), "img", PACK, "N"
    )
    host, create = spec.host, spec.create
    assert host["network_mode"] == "none" and host["cap_drop"] == ["ALL"]
    assert host["security_opt"] == ["no-new-privileges:true"] and host["privileged"] is False
    assert host["read_only"] is True and host["ipc_mode"] == "private" and host["init"] is False
    assert host["mem_limit"] == host["memswap_limit"] == "128m" and host["nano_cpus"] == 500_000_000
    assert host["pids_limit"] == 64 and host["log_config"]["Type"] == "none"
    assert "noexec" in host["tmpfs"]["/tmp"] and "size=64m" in host["tmpfs"]["/tmp"]
    assert not any(
        k in host for k in ("pid_mode", "userns_mode", "uts_mode", "devices", "volumes_from", "binds")
    )
    assert host["mounts"] == [
        {
            "Type": "bind",
            "Source": "/data",
            "Target": "/data",
            "ReadOnly": False,
            "BindOptions": {"Propagation": "rprivate", "NonRecursive": True},
        }
    ]
    assert create["environment"] == ["PATH=/usr/local/bin:/usr/bin:/bin", "HOME=/tmp", "LANG=C.UTF-8"]
    assert create["user"] == "1000:1000" and create["working_dir"] == "/data/x"
    assert create["command"] == ["N", "1", "5:7:/data", "ls", "-la"]
    assert create["entrypoint"][:4] == ["/usr/bin/python3", "-I", "-S", "-c"]
    assert create["labels"] == {"io.rumi.managed": "true", "io.rumi.role": "sandbox", "io.rumi.pack": PACK}
    assert create["stdin_open"] is False and create["use_config_proxy"] is False
    granted_tmp = _sandbox.SandboxCommand(("ls",), "/tmp", 1000, 1000, (("/tmp", (1, 2)),))
    assert (
        _sandbox.container_spec(granted_tmp, _sandbox.SandboxLimits(), "img", PACK, "N").host["tmpfs"] == {}
    )


@pytest.mark.parametrize(
    ("out", "err", "limit", "expected"),
    [
        (100, 50, 1024 * 1024, (100, 50, False)),
        (2_000_000, 0, None, (1024 * 1024 - 16384, 0, True)),
        (2_000_000, 2_000_000, None, (786432 - 12288, 262144 - 4096, True)),
        (10, 2_000_000, None, (10, 1024 * 1024 - 16384 - 10, True)),
        (3_000_000, 10, 4 * 1024 * 1024, (3_000_000, 10, False)),
    ],
)
def test_output_fits_one_reply(
    out: int, err: int, limit: int | None, expected: tuple[int, int, bool]
) -> None:
    stdout, stderr, trimmed = terminal.fit_reply(b"o" * out, b"e" * err, limit)
    assert (len(stdout), len(stderr), trimmed) == expected


def test_demux_splits_frames_across_chunks() -> None:
    def frame(stream: int, data: bytes) -> bytes:
        return bytes([stream, 0, 0, 0]) + len(data).to_bytes(4, "big") + data

    wire = frame(1, b"hello ") + frame(2, b"oops") + frame(1, b"world") + frame(1, b"x" * 50)
    demux = _sandbox._Demux(cap=20)
    for i in range(0, len(wire), 3):
        demux.feed(wire[i : i + 3])
    assert bytes(demux.kept[1]) == b"hello worldxxxxxxxxx" and bytes(demux.kept[2]) == b"oops"
    assert demux.totals == {1: 61, 2: 4} and demux.truncated


def test_engine_unreachable_is_unavailable(
    ws: Workspace, area: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-engine.sock")
    _sandbox.reset_engine()
    try:
        with pytest.raises(Unavailable, match="Docker engine"):
            run(ws, area["grant"], ["ls"])
    finally:
        monkeypatch.delenv("DOCKER_HOST")
        _sandbox.reset_engine()


# ---------------------------------------------------------------------------------- real containers


@pytest.mark.docker
def test_ls_sees_only_the_grant(engine: Any, ws: Workspace, area: dict[str, Path]) -> None:
    out = run(ws, area["grant"], ["ls", "-la"])
    assert out["exit_code"] == 0 and not out["timed_out"] and not out["truncated"]
    assert b"hello.txt" in out["stdout"]
    host_name = socket.gethostname().encode()
    out = run(ws, area["grant"], ["cat", "/etc/hostname", "/proc/sys/kernel/hostname"])
    assert out["stdout"].split() == [b"sandbox", b"sandbox"] and host_name not in out["stdout"]
    out = run(ws, area["grant"], ["cat", str(area["secret"])])
    assert out["exit_code"] != 0 and SECRET not in out["stdout"] + out["stderr"]
    assert b"No such file" in out["stderr"]
    out = run(ws, area["grant"], ["ls", str(area["tmp"])])
    assert out["stdout"].split() == [b"grant"], "only the mount point, nothing else of the host"
    out = run(ws, area["grant"], ["ls", "/var/run/docker.sock", "/run/docker.sock"])
    assert out["exit_code"] != 0 and out["stdout"] == b""
    audit = out["_audit"]
    assert audit["exit_code"] == out["exit_code"] and audit["run_ms"] > 0
    assert audit["stderr_bytes"] == len(out["stderr"]) and "stdout" not in audit


@pytest.mark.docker
def test_find_exec_cannot_read_outside(engine: Any, ws: Workspace, area: dict[str, Path]) -> None:
    out = run(ws, area["grant"], ["find", str(area["grant"]), "-exec", "cat", str(area["secret"]), "{}", ";"])
    assert SECRET not in out["stdout"] and b"hello from the grant" in out["stdout"]
    assert b"No such file" in out["stderr"]


@pytest.mark.docker
def test_tar_checkpoint_exec_stays_in_the_sandbox(engine: Any, ws: Workspace, area: dict[str, Path]) -> None:
    inside = area["grant"] / "ran-inside"
    outside = area["outside"] / "pwned"
    action = f"exec=touch {inside} {outside} /tmp/rumi-tar-pwned"
    out = run(
        ws,
        area["grant"],
        ["tar", "--checkpoint=1", f"--checkpoint-action={action}", "-cf", "/dev/null", "hello.txt"],
    )
    assert inside.exists(), f"the checkpoint action did not run at all: {out['stderr']!r}"
    assert not outside.exists() and not Path("/tmp/rumi-tar-pwned").exists()
    assert not any(p.name == "pwned" for p in area["tmp"].rglob("*"))


@pytest.mark.docker
def test_git_cannot_reach_outside(engine: Any, ws: Workspace, area: dict[str, Path]) -> None:
    out = run(ws, area["grant"], ["git", "-C", str(area["outside"]), "status"])
    assert out["exit_code"] != 0 and b"cannot change to" in out["stderr"]
    marker = area["outside"] / "ssh-ran"
    out = run(
        ws,
        area["grant"],
        ["git", "-c", f"core.sshCommand=touch {marker}", "clone", "ssh://example.invalid/r.git", "clone"],
    )
    assert out["exit_code"] != 0 and not marker.exists()
    out = run(ws, area["grant"], ["git", "-c", "safe.directory=*", "init", "-q", "repo"])
    assert out["exit_code"] == 0 and (area["grant"] / "repo" / ".git").is_dir()
    out = run(ws, area["grant"], ["git", "-C", str(area["grant"] / "repo"), "status", "--short"])
    assert out["exit_code"] == 0, out["stderr"]


@pytest.mark.docker
def test_symlink_made_in_the_sandbox_does_not_open_file_read(
    engine: Any, ws: Workspace, area: dict[str, Path]
) -> None:
    link = area["grant"] / "x"
    out = run(ws, area["grant"], ["ln", "-s", str(area["outside"]), str(link)])
    assert out["exit_code"] == 0, out["stderr"]
    assert link.is_symlink()
    ctx = context(ws, "file_read", {"directories": [str(area["grant"])]})
    for path in (f"{link}/secret.txt", str(link)):
        with pytest.raises(Denied):
            file_read.execute(ctx, {"path": path})
    out = run(ws, area["grant"], ["cat", f"{link}/secret.txt"])
    assert SECRET not in out["stdout"]


@pytest.mark.docker
def test_no_network(engine: Any, ws: Workspace, area: dict[str, Path]) -> None:
    seen: list[object] = []
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, peer = listener.accept()
            except OSError:
                continue
            seen.append(peer)
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        out = run(ws, area["grant"], ["curl", "-sS", "-m", "3", f"http://127.0.0.1:{port}/"])
        assert out["exit_code"] != 0
        out = run(ws, area["grant"], ["cat", "/proc/net/dev"])
        interfaces = [ln.split(b":")[0].strip() for ln in out["stdout"].splitlines() if b":" in ln]
        assert interfaces == [b"lo"], out["stdout"]
    finally:
        stop.set()
        thread.join(timeout=5)
        listener.close()
    assert seen == [], "the sandbox reached a listener on the host"


@pytest.mark.docker
def test_shell_allowed_only_with_grant(engine: Any, ws: Workspace, area: dict[str, Path]) -> None:
    with pytest.raises(Denied):
        run(ws, area["grant"], ["bash", "-c", "echo hi"])
    out = run(ws, area["grant"], ["bash", "-c", "echo hi; echo err >&2; exit 3"], grant={"shell": True})
    assert (out["exit_code"], out["stdout"], out["stderr"]) == (3, b"hi\n", b"err\n")


@pytest.mark.docker
def test_confinement(engine: Any, ws: Workspace, area: dict[str, Path]) -> None:
    out = run(ws, area["grant"], ["env"])
    assert sorted(out["stdout"].decode().splitlines()) == [
        "HOME=/tmp",
        "LANG=C.UTF-8",
        "PATH=/usr/local/bin:/usr/bin:/bin",
    ]
    out = run(ws, area["grant"], ["cat", "/proc/self/status"])
    status = dict(ln.split(":", 1) for ln in out["stdout"].decode().splitlines() if ":" in ln)
    for cap in ("CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh"):
        assert int(status[cap].strip(), 16) == 0, cap
    assert status["NoNewPrivs"].strip() == "1" and status["Seccomp"].strip() == "2"
    uid = int(status["Uid"].split()[0])
    assert uid != 0 and uid == (os.geteuid() if not ROOT else _sandbox.SANDBOX_UID)
    out = run(ws, area["grant"], ["touch", "/etc/x", "/usr/x"])
    assert out["exit_code"] != 0 and b"Read-only file system" in out["stderr"]
    out = run(ws, area["grant"], ["bash", "-c", "cp /bin/true /tmp/t && /tmp/t"], grant={"shell": True})
    assert out["exit_code"] == 126, "/tmp is writable but noexec"
    out = run(ws, area["grant"], ["cat", "/proc/1/cmdline"])
    assert out["stdout"] == b"cat\0/proc/1/cmdline\0", "pid 1 is the command itself (own PID namespace)"
    out = run(ws, area["grant"], ["ls", "/sys/fs/cgroup"])
    cgroup_files = {
        "memory": ["/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/pids/pids.max"],
        "v2": ["/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/pids.max"],
    }
    files = cgroup_files["memory"] if b"memory" in out["stdout"].split() else cgroup_files["v2"]
    out = run(ws, area["grant"], ["cat", *files])
    assert out["stdout"].split() == [str(256 * 1024 * 1024).encode(), b"64"], out


@pytest.mark.docker
def test_runs_as_the_owner_of_the_granted_directory(
    engine: Any, ws: Workspace, area: dict[str, Path]
) -> None:
    if not ROOT:
        skip_unless_ci("needs root to chown the granted directory")
    os.chown(area["grant"], 4242, 4343)
    out = run(ws, area["grant"], ["touch", "made-here"])
    assert out["exit_code"] == 0, out["stderr"]
    st = (area["grant"] / "made-here").stat()
    assert (st.st_uid, st.st_gid) == (4242, 4343)
    os.chown(area["grant"], 0, 0)
    out = run(ws, area["grant"], ["id", "-u"])
    assert out["stdout"] == b"10001\n"
    out = run(ws, area["grant"], ["touch", "nope"])
    assert out["exit_code"] != 0 and not (area["grant"] / "nope").exists()


@pytest.mark.docker
def test_cwd_and_several_grants(engine: Any, ws: Workspace, area: dict[str, Path], tmp_path: Path) -> None:
    sub = area["grant"] / "sub"
    sub.mkdir()
    second = tmp_path / "second"
    second.mkdir()
    (second / "b.txt").write_bytes(b"B")
    out = run(ws, area["grant"], ["pwd"], cwd=str(sub))
    assert out["stdout"] == f"{sub}\n".encode()
    out = run(
        ws,
        area["grant"],
        ["cat", str(second / "b.txt")],
        grant={"directories": [str(area["grant"]), str(second)]},
    )
    assert out["stdout"] == b"B"
    with pytest.raises(InvalidRequest, match="existing directory"):
        run(ws, area["grant"], ["pwd"], cwd=str(area["grant"] / "missing"))
    (area["grant"] / "out").symlink_to(area["outside"])
    with pytest.raises(Denied, match="escapes"):
        run(ws, area["grant"], ["pwd"], cwd=str(area["grant"] / "out"))


@pytest.mark.docker
def test_stdin(engine: Any, ws: Workspace, area: dict[str, Path]) -> None:
    out = run(ws, area["grant"], ["wc", "-c"], stdin=b"x" * 300_000)
    assert out["stdout"].strip() == b"300000"
    out = run(ws, area["grant"], ["cat"], stdin=b"")
    assert out["stdout"] == b"" and out["exit_code"] == 0
    out = run(ws, area["grant"], ["cat"])
    assert out["stdout"] == b"" and out["exit_code"] == 0, "no stdin means EOF, not a hang"
    binary = bytes(range(256)) * 64  # includes ctrl-p ctrl-q, Docker's detach keys
    out = run(ws, area["grant"], ["od", "-An", "-v", "-tx1"], stdin=binary)
    assert bytes.fromhex(out["stdout"].decode()) == binary
    out = run(ws, area["grant"], ["true"], stdin=b"y" * 3_000_000)
    assert out["exit_code"] == 0 and not out["timed_out"]


@pytest.mark.docker
def test_timeout_kills_and_removes(engine: Any, ws: Workspace, area: dict[str, Path]) -> None:
    started = time.monotonic()
    out = run(ws, area["grant"], ["sleep", "100"], timeout=2)
    elapsed = time.monotonic() - started
    assert out["timed_out"] is True and out["exit_code"] == -1
    assert elapsed < 2 + 20, f"took {elapsed:.1f}s"
    assert out["_audit"]["timed_out"] is True
    assert _leftovers(engine) == []
    # Endless output: drained past the cap until the deadline, then killed and removed promptly.
    started = time.monotonic()
    out = run(ws, area["grant"], ["yes"], timeout=2)
    assert out["timed_out"] is True and out["truncated"] is True
    assert time.monotonic() - started < 2 + 20
    assert _leftovers(engine) == []


@pytest.mark.docker
def test_timeout_over_the_limit_is_refused_not_cut(engine: Any, ws: Workspace, area: dict[str, Path]) -> None:
    """A limit the broker caps says so: a timeout above it is refused, naming the limit and its source."""
    ctx = context(ws, "terminal", {"directories": [str(area["grant"])], "max_timeout": 1})
    with pytest.raises(InvalidRequest, match=r"over the limit of 1 s .*max_timeout"):
        terminal.execute(ctx, {"argv": ["sleep", "100"], "timeout": 50})
    ctx = context(ws, "terminal", {"directories": [str(area["grant"])]}, limits={"timeout": 4})
    with pytest.raises(InvalidRequest, match=r"over the limit of 3 s .*request_timeout of 4 s"):
        terminal.execute(ctx, {"argv": ["sleep", "100"], "timeout": 50})
    started = time.monotonic()
    out = terminal.execute(ctx, {"argv": ["sleep", "100"]})["data"]
    assert out["timed_out"] is True, "answers before the broker's own request timeout"
    assert time.monotonic() - started < 4 + 20


@pytest.mark.docker
def test_output_is_capped(engine: Any, ws: Workspace, area: dict[str, Path]) -> None:
    ctx = context(ws, "terminal", {"directories": [str(area["grant"])], "max_output_bytes": 1000})
    result = terminal.execute(ctx, {"argv": ["head", "-c", "5000000", "/dev/zero"]})["data"]
    assert result["truncated"] is True and result["stdout"] == b"\0" * 1000
    assert result["exit_code"] == 0 and not result["timed_out"]
    assert ctx["audit"]["stdout_bytes"] == 5_000_000
    out = run(ws, area["grant"], ["echo", "small"])
    assert out["truncated"] is False


@pytest.mark.docker
def test_missing_command_and_image(engine: Any, ws: Workspace, area: dict[str, Path]) -> None:
    out = run(ws, area["grant"], ["no-such-program", "x"])
    assert out["exit_code"] == 127 and b"command not found" in out["stderr"]
    ctx = context(
        ws, "terminal", {"directories": [str(area["grant"])], "image": "rumi-test-absent-sandbox:latest"}
    )
    with pytest.raises(
        HandlerFailed,
        match=re.escape("sandbox image rumi-test-absent-sandbox:latest is not built: run `rumi build`"),
    ):
        terminal.execute(ctx, {"argv": ["ls"]})


@pytest.mark.docker
def test_a_swapped_mount_runs_nothing(engine: Any, area: dict[str, Path]) -> None:
    """The launcher compares each mount with the identity the broker checked before anything runs."""
    grant = str(area["grant"])
    real = os.stat(grant)
    marker = area["grant"] / "ran"
    command = _sandbox.SandboxCommand(
        ("touch", str(marker)),
        grant,
        _sandbox.SANDBOX_UID if ROOT else os.geteuid(),
        _sandbox.SANDBOX_GID if ROOT else os.getegid(),
        ((grant, (real.st_dev, real.st_ino + 1)),),
    )
    with pytest.raises(Denied, match="nothing was run"):
        _sandbox.run_in_sandbox(
            _sandbox.engine(), "rumi-sandbox:latest", command, _sandbox.SandboxLimits(), pack_id=PACK
        )
    assert not marker.exists()
    good = _sandbox.SandboxCommand(
        command.argv, grant, command.uid, command.gid, ((grant, (real.st_dev, real.st_ino)),)
    )
    result = _sandbox.run_in_sandbox(
        _sandbox.engine(), "rumi-sandbox:latest", good, _sandbox.SandboxLimits(), pack_id=PACK
    )
    assert result.exit_code == 0 and marker.exists()


@pytest.mark.docker
def test_concurrent_commands_keep_their_own_output(engine: Any, ws: Workspace, area: dict[str, Path]) -> None:
    results: dict[int, bytes] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            out = run(ws, area["grant"], ["seq", str(i), str(i * 2000)])
            results[i] = out["stdout"]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    for i in range(1, 5):
        assert results[i] == "".join(f"{n}\n" for n in range(i, i * 2000 + 1)).encode()


@pytest.mark.docker
def test_latency_p50(engine: Any, ws: Workspace, area: dict[str, Path], pytestconfig: pytest.Config) -> None:
    durations = []
    for _ in range(10):
        out = run(ws, area["grant"], ["true"])
        assert out["exit_code"] == 0
        durations.append(out["_audit"]["run_ms"])
    p50 = statistics.median(durations)
    _say(
        pytestconfig,
        f"\nterminal sandbox latency (create→remove) over 10 runs: p50 {p50:.0f} ms, max {max(durations):.0f} ms",
    )
    assert p50 < 10_000


@pytest.mark.docker
def test_no_leftover_containers(engine: Any) -> None:
    assert _leftovers(engine) == []


@pytest.mark.docker
def test_through_the_broker(engine: Any, ws: Workspace, nats_server: object) -> None:
    """A Pack's ctx.terminal over NATS: grant file, policy, handler, reply and audit together."""
    import anyio

    from pack_runtime import PermissionDenied

    from .conftest import connected_pack, running_broker
    from .test_broker import audit_events

    sandbox = ws.pack_work_area(PACK)
    if ROOT:
        os.chown(sandbox, _sandbox.SANDBOX_UID, _sandbox.SANDBOX_GID)
    tool = f"{PACK}:tool:my_tool"
    grant = json.loads(ws.grant_file(tool).read_text())
    grant["permissions"]["terminal"] = {"enabled": True, "directories": [str(sandbox)]}
    ws.grant_file(tool).write_text(json.dumps(grant))

    async def main() -> None:
        async with running_broker(ws), connected_pack(ws) as pack:
            ctx = pack.context(tool)
            ran = await ctx.terminal(["touch", "made-by-terminal"], cwd=str(sandbox))
            assert ran["exit_code"] == 0 and ran["timed_out"] is False, ran
            listed = await ctx.terminal(["ls", "-la"], cwd=str(sandbox))
            assert b"made-by-terminal" in listed["stdout"]
            big = await ctx.terminal(["head", "-c", "3000000", "/dev/zero"])
            # capped by the scope's max_output_bytes (1 MiB) and by the reply size limit the broker passes
            assert big["truncated"] is True and 512 * 1024 < len(big["stdout"]) <= 1024 * 1024
            with pytest.raises(PermissionDenied):
                await ctx.terminal(["sh", "-c", "id"])
            with pytest.raises(PermissionDenied):
                await ctx.terminal(["ls"], cwd="/etc")

    anyio.run(main)
    assert (sandbox / "made-by-terminal").is_file()
    events: list[dict[str, Any]] = anyio.run(audit_events, ws, 8)
    terminal_events = [e for e in events if e["capability"] == "terminal"]
    assert {e["target"] for e in terminal_events} == {"touch", "ls", "head", "sh"}
    outcomes = [e for e in terminal_events if e.get("phase") == "outcome" and "extra" in e]
    assert outcomes and all(set(e["extra"]) >= {"exit_code", "run_ms", "stdout_bytes"} for e in outcomes)
    assert not any("made-by-terminal" in json.dumps(e) for e in events), "output reached the audit log"
