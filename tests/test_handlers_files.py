"""Built-in handler plugins file_read, file_write, env_read, loaded from their files as the broker does."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import msgspec
import pytest

from broker.backends.files import ProtectedSet
from broker.core.errors import Denied, HandlerFailed, InvalidRequest, TooLarge
from broker.core.workspace import Workspace

from .conftest import load_handler

CONFIG = Path(__file__).resolve().parents[1] / "config"
SECRET_VALUE = "sk-VERY-SECRET-VALUE-42"


load = load_handler


def scope(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((CONFIG / "scopes" / f"{name}.json").read_text())
    return data


def context(ws: Workspace, name: str, grant: dict[str, Any]) -> dict[str, Any]:
    return {
        "pack_id": "p1",
        "component_id": "p1:tool:t",
        "request_id": "r1",
        "grant": {**scope(name)["default_config"], "enabled": True, **grant},
        "limits": {"timeout": 5},
        "protected": ProtectedSet.for_pack(ws, "p1"),
        "workspace_root": str(ws.root),
        "audit": {},
    }


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    root = tmp_path / "ws"
    (root / "docker" / ".rumi").mkdir(parents=True)
    (root / "docker" / "sandbox" / "p1").mkdir(parents=True)
    return Workspace.at(root)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    (d / "a.txt").write_bytes(b"hello")
    (tmp_path / "outside.txt").write_bytes(b"SECRET")
    return d


@pytest.mark.parametrize(
    ("name", "target"), [("file_read", "path"), ("file_write", "path"), ("env_read", "key")]
)
def test_meta_and_scope(name: str, target: str) -> None:
    module = load(name)
    meta = module.META
    assert meta["requires_scope"] is True
    assert meta["supports_modes"] == ["sandbox"]
    assert meta["target"] == target
    assert isinstance(meta["description"], str) and meta["description"]
    assert issubclass(meta["grant_schema"], msgspec.Struct)
    assert issubclass(meta["args_schema"], msgspec.Struct)
    sc = scope(name)
    assert sc["version"] == "1.0" and sc["description"] and isinstance(sc["default_config"], dict)
    if name != "env_read":
        assert sc["default_config"] == {"max_bytes": 7340032}


@pytest.mark.parametrize(
    ("name", "args", "ok"),
    [
        ("file_read", {"path": "/x"}, True),
        ("file_read", {"path": 1}, False),
        ("file_read", {}, False),
        ("file_read", {"path": "/x", "extra": 1}, False),
        ("file_write", {"path": "/x", "data": b"\x00\xff"}, True),
        ("file_write", {"path": "/x", "data": "text"}, False),
        ("file_write", {"path": "/x"}, False),
        ("env_read", {"key": "K"}, True),
        ("env_read", {"key": ["K"]}, False),
    ],
)
def test_args_schema_over_msgpack(name: str, args: dict[str, Any], ok: bool) -> None:
    schema = load(name).META["args_schema"]
    raw = msgspec.msgpack.encode(args)
    if ok:
        decoded = msgspec.msgpack.decode(raw, type=schema)
        # Optional fields the request left out keep their defaults (file_write's `parents`).
        assert {k: v for k, v in msgspec.structs.asdict(decoded).items() if k in args} == args
    else:
        with pytest.raises(msgspec.ValidationError):
            msgspec.msgpack.decode(raw, type=schema)


@pytest.mark.parametrize(
    ("name", "grant", "ok"),
    [
        ("file_read", {"enabled": True, "directories": ["/data"]}, True),
        ("file_read", {"enabled": True, "directories": ["data"]}, False),
        ("file_read", {"enabled": True, "directory": ["/data"]}, False),
        ("file_write", {"enabled": True, "directories": ["/out"]}, True),
        ("env_read", {"enabled": True, "allowed_keys": ["OPENAI_API_KEY"]}, True),
        ("env_read", {"enabled": True, "allowed_keys": "OPENAI_API_KEY"}, False),
    ],
)
def test_grant_schema(name: str, grant: dict[str, Any], ok: bool) -> None:
    schema = load(name).META["grant_schema"]
    if ok:
        msgspec.convert(grant, schema)
    else:
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert(grant, schema)


# --- file_read -------------------------------------------------------------------------------------


def test_file_read(ws: Workspace, data_dir: Path) -> None:
    handler = load("file_read")
    ctx = context(ws, "file_read", {"directories": [str(data_dir)]})
    assert handler.execute(ctx, {"path": f"{data_dir}/a.txt"}) == {"success": True, "data": b"hello"}
    assert ctx["audit"] == {"bytes": 5}
    with pytest.raises(Denied):
        handler.execute(ctx, {"path": f"{data_dir}/../outside.txt"})
    with pytest.raises(Denied):
        handler.execute(ctx, {"path": f"{data_dir.parent}/outside.txt"})
    with pytest.raises(InvalidRequest):
        handler.execute(ctx, {"path": "a.txt"})
    ctx["grant"]["max_bytes"] = 4
    with pytest.raises(TooLarge):
        handler.execute(ctx, {"path": f"{data_dir}/a.txt"})


def test_file_read_errors_carry_no_outside_paths(ws: Workspace, data_dir: Path) -> None:
    handler = load("file_read")
    ctx = context(ws, "file_read", {"directories": [str(data_dir)]})
    (data_dir / "link").symlink_to(data_dir.parent / "outside.txt")
    for path in [f"{data_dir}/link", f"{data_dir}/../outside.txt", f"{data_dir}/missing"]:
        with pytest.raises((Denied, HandlerFailed)) as info:
            handler.execute(ctx, {"path": path})
        assert str(data_dir.parent) not in info.value.message and "SECRET" not in info.value.message


# --- file_write ------------------------------------------------------------------------------------


def leftovers(d: Path) -> list[str]:
    return [p.name for p in d.iterdir() if "rumi-tmp" in p.name]


def test_file_write_creates_and_replaces(ws: Workspace, data_dir: Path) -> None:
    handler = load("file_write")
    ctx = context(ws, "file_write", {"directories": [str(data_dir)]})
    result = handler.execute(ctx, {"path": f"{data_dir}/new.bin", "data": b"\x00\x01\x02"})
    assert result == {"success": True, "data": {"bytes_written": 3}}
    assert (data_dir / "new.bin").read_bytes() == b"\x00\x01\x02"
    assert ctx["audit"] == {"bytes": 3}
    (data_dir / "a.txt").chmod(0o600)
    handler.execute(ctx, {"path": f"{data_dir}/a.txt", "data": b"replaced"})
    assert (data_dir / "a.txt").read_bytes() == b"replaced"
    assert (data_dir / "a.txt").stat().st_mode & 0o777 == 0o600  # permissions never widened
    handler.execute(ctx, {"path": f"{data_dir}/empty", "data": b""})
    assert (data_dir / "empty").read_bytes() == b""
    assert leftovers(data_dir) == []


def test_file_write_too_large_leaves_old_content(ws: Workspace, data_dir: Path) -> None:
    handler = load("file_write")
    ctx = context(ws, "file_write", {"directories": [str(data_dir)], "max_bytes": 10})
    with pytest.raises(TooLarge):
        handler.execute(ctx, {"path": f"{data_dir}/a.txt", "data": b"x" * 11})
    assert (data_dir / "a.txt").read_bytes() == b"hello"
    assert leftovers(data_dir) == []


def test_file_write_failure_midway_leaves_old_content(
    ws: Workspace, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    handler = load("file_write")
    ctx = context(ws, "file_write", {"directories": [str(data_dir)]})

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(HandlerFailed) as info:
        handler.execute(ctx, {"path": f"{data_dir}/a.txt", "data": b"new content"})
    assert str(data_dir) not in info.value.message
    monkeypatch.undo()
    assert (data_dir / "a.txt").read_bytes() == b"hello"
    assert leftovers(data_dir) == []


def test_file_write_replaces_symlink_instead_of_following(ws: Workspace, data_dir: Path) -> None:
    handler = load("file_write")
    ctx = context(ws, "file_write", {"directories": [str(data_dir)]})
    outside = data_dir.parent / "outside.txt"
    (data_dir / "t").symlink_to(outside)
    (data_dir / "t2").symlink_to("a.txt")
    handler.execute(ctx, {"path": f"{data_dir}/t", "data": b"mine"})
    handler.execute(ctx, {"path": f"{data_dir}/t2", "data": b"mine2"})
    assert outside.read_bytes() == b"SECRET"
    assert (data_dir / "a.txt").read_bytes() == b"hello"
    assert not (data_dir / "t").is_symlink() and (data_dir / "t").read_bytes() == b"mine"
    assert not (data_dir / "t2").is_symlink() and (data_dir / "t2").read_bytes() == b"mine2"


@pytest.mark.parametrize(
    ("tail", "error"),
    [
        ("/../outside.txt", Denied),
        ("/sub/../../outside.txt", Denied),
        ("/outlink/x.txt", Denied),  # dir symlink pointing outside
        ("/", InvalidRequest),
        ("/new/", InvalidRequest),
        ("/.", InvalidRequest),
        ("/..", InvalidRequest),
        ("/adir", HandlerFailed),
        ("/missing/x.txt", HandlerFailed),
        ("/a.txt/x", HandlerFailed),
    ],
)
def test_file_write_refusals(ws: Workspace, data_dir: Path, tail: str, error: type[Exception]) -> None:
    handler = load("file_write")
    ctx = context(ws, "file_write", {"directories": [str(data_dir)]})
    (data_dir / "adir").mkdir()
    (data_dir / "sub").mkdir()
    (data_dir / "outlink").symlink_to(data_dir.parent)
    before = sorted(p.name for p in data_dir.parent.rglob("*"))
    with pytest.raises(error):
        handler.execute(ctx, {"path": f"{data_dir}{tail}", "data": b"x"})
    assert sorted(p.name for p in data_dir.parent.rglob("*")) == before
    assert (data_dir.parent / "outside.txt").read_bytes() == b"SECRET"


def test_file_write_outside_grant_denied(ws: Workspace, data_dir: Path, tmp_path: Path) -> None:
    handler = load("file_write")
    ctx = context(ws, "file_write", {"directories": [str(data_dir)]})
    (tmp_path / "data2").mkdir()
    with pytest.raises(Denied):
        handler.execute(ctx, {"path": f"{tmp_path}/data2/x", "data": b"x"})
    assert not (tmp_path / "data2" / "x").exists()


# --- env_read --------------------------------------------------------------------------------------


def test_env_read_from_environment(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    handler = load("env_read")
    monkeypatch.setenv("RUMI_TEST_KEY", SECRET_VALUE)
    monkeypatch.setenv("RUMI_TEST_OTHER", SECRET_VALUE)
    monkeypatch.delenv("RUMI_TEST_UNSET", raising=False)
    ctx = context(ws, "env_read", {"allowed_keys": ["RUMI_TEST_KEY", "RUMI_TEST_UNSET", "RUMI_TEST_*", "*"]})
    assert handler.execute(ctx, {"key": "RUMI_TEST_KEY"}) == {"success": True, "data": SECRET_VALUE}
    for key, error, message in [
        ("RUMI_TEST_OTHER", Denied, "key is not granted"),  # no wildcards: "RUMI_TEST_*" and "*" are literal
        ("rumi_test_key", Denied, "key is not granted"),
        ("", Denied, "key is not granted"),
        ("RUMI_TEST_UNSET", HandlerFailed, "key is not set"),
    ]:
        with pytest.raises(error) as info:
            handler.execute(ctx, {"key": key})
        assert info.value.message == message
        assert SECRET_VALUE not in str(info.value)
    assert SECRET_VALUE not in json.dumps(ctx["audit"])


def test_env_read_secrets_file_wins(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    handler = load("env_read")
    (ws.state / "secrets.env").write_text(
        "# comment\n"
        "\n"
        f"FROM_FILE={SECRET_VALUE}\n"
        'QUOTED="a b=c"\n'
        "export EXPORTED=yes\n"
        "BOTH=file\n"
        "garbage line without equals\n"
    )
    monkeypatch.setenv("BOTH", "environment")
    monkeypatch.setenv("ONLY_ENV", "env-value")
    keys = ["FROM_FILE", "QUOTED", "EXPORTED", "BOTH", "ONLY_ENV", "MISSING"]
    ctx = context(ws, "env_read", {"allowed_keys": keys})
    got = {k: handler.execute(ctx, {"key": k})["data"] for k in keys[:-1]}
    assert got == {
        "FROM_FILE": SECRET_VALUE,
        "QUOTED": "a b=c",
        "EXPORTED": "yes",
        "BOTH": "file",
        "ONLY_ENV": "env-value",
    }
    with pytest.raises(HandlerFailed, match="key is not set"):
        handler.execute(ctx, {"key": "MISSING"})
    with pytest.raises(Denied) as info:
        handler.execute(ctx, {"key": "garbage line without equals"})
    assert SECRET_VALUE not in info.value.message
    assert SECRET_VALUE not in json.dumps(ctx["audit"])


def test_env_read_unreadable_secrets_file_says_nothing(ws: Workspace) -> None:
    handler = load("env_read")
    (ws.state / "secrets.env").write_bytes(b"K=\xff" + SECRET_VALUE.encode())
    ctx = context(ws, "env_read", {"allowed_keys": ["K"]})
    with pytest.raises(HandlerFailed) as info:
        handler.execute(ctx, {"key": "K"})
    assert SECRET_VALUE not in info.value.message and str(ws.root) not in info.value.message
