"""broker.policy.plugins: handler loading, shape checks (one-line errors), change detection and reload."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import msgspec
import pytest

from broker.core.errors import PluginError
from broker.policy.plugins import (
    DefaultGrant,
    HandlerRegistry,
    WatchedDirectory,
    load_handler_source,
    load_handlers,
)

REPO = Path(__file__).resolve().parents[1]

GOOD = """
from __future__ import annotations
import msgspec

class Grant(msgspec.Struct, forbid_unknown_fields=True):
    enabled: bool = False
    directories: list[str] = []

class Args(msgspec.Struct, forbid_unknown_fields=True):
    path: str

META = {"requires_scope": True, "supports_modes": ["sandbox"], "description": "good one",
        "grant_schema": Grant, "args_schema": Args, "target": "path"}

def execute(context, args):
    return {"success": True, "data": args["path"]}
"""

MINIMAL_ASYNC = """
META = {"requires_scope": False, "supports_modes": ["sandbox", "dev"], "description": "ping"}

async def execute(context, args):
    return {"success": True, "data": "pong"}
"""

_META = 'META = {"requires_scope": False, "supports_modes": ["sandbox"], "description": "d"%s}\n'
_EXEC = "def execute(context, args):\n    return {'success': True}\n"


def meta(extra: str = "") -> str:
    return _META % extra + _EXEC


def write(directory: Path, name: str, source: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(textwrap.dedent(source))
    return path


def test_good_plugins_load(tmp_path: Path) -> None:
    write(tmp_path, "good.py", GOOD)
    write(tmp_path, "ping.py", MINIMAL_ASYNC)
    plugins, errors = load_handlers(tmp_path)
    assert errors == []
    assert sorted(plugins) == ["good", "ping"]
    good = plugins["good"]
    assert good.requires_scope is True and good.supports_modes == ("sandbox",)
    assert good.description == "good one" and good.is_async is False
    assert good.args_schema is not None and good.grant_schema.__name__ == "Grant"
    assert good.target({"path": "/a/b"}) == "/a/b" and good.target({}) == ""
    assert good.execute({}, {"path": "x"}) == {"success": True, "data": "x"}
    assert good.path == tmp_path / "good.py"
    ping = plugins["ping"]
    assert ping.is_async is True and ping.grant_schema is DefaultGrant and ping.args_schema is None
    assert ping.supports_modes == ("sandbox", "dev") and ping.target({"x": 1}) == ""
    # The grant schema of a handler without one takes `enabled` only.
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"enabled": True, "directories": []}, ping.grant_schema)
    assert not (tmp_path / "__pycache__").exists()  # compiled from source bytes, no stale .pyc


def test_callable_target(tmp_path: Path) -> None:
    write(tmp_path, "t.py", meta(', "target": lambda a: a["host"] + ":" + str(a["port"])'))
    plugins, errors = load_handlers(tmp_path)
    assert errors == [] and plugins["t"].target({"host": "h", "port": 443}) == "h:443"


BAD_PLUGINS = [
    # (source, expected part of the one-line message)
    ("def broken(:\n", "syntax error at line 1"),
    ("import no_such_module_rumi_test\n" + meta(), "import failed: ModuleNotFoundError"),
    ("raise RuntimeError('boom\\nsecond line')\n", "import failed: RuntimeError: boom second line"),
    ("import sys\nsys.exit(3)\n", "import failed: SystemExit: 3"),
    (_EXEC, "META must be a dict"),
    ("META = [1]\n" + _EXEC, "META must be a dict"),
    (
        'META = {"supports_modes": ["sandbox"], "description": "d"}\n' + _EXEC,
        "META['requires_scope'] must be a bool",
    ),
    (
        'META = {"requires_scope": 1, "supports_modes": ["s"], "description": "d"}\n' + _EXEC,
        "META['requires_scope'] must be a bool",
    ),
    (
        'META = {"requires_scope": "yes", "supports_modes": ["s"], "description": "d"}\n' + _EXEC,
        "META['requires_scope'] must be a bool",
    ),
    (
        'META = {"requires_scope": True, "supports_modes": [], "description": "d"}\n' + _EXEC,
        "META['supports_modes'] must be a non-empty list of str",
    ),
    (
        'META = {"requires_scope": True, "supports_modes": "sandbox", "description": "d"}\n' + _EXEC,
        "META['supports_modes'] must be a non-empty list of str",
    ),
    (
        'META = {"requires_scope": True, "supports_modes": [1], "description": "d"}\n' + _EXEC,
        "META['supports_modes'] must be a non-empty list of str",
    ),
    (
        'META = {"requires_scope": True, "supports_modes": ["s"]}\n' + _EXEC,
        "META['description'] must be a str",
    ),
    (
        'META = {"requires_scope": True, "supports_modes": ["s"], "description": 3}\n' + _EXEC,
        "META['description'] must be a str",
    ),
    (meta(', "grant_shema": 1'), "META has unknown key(s) grant_shema"),
    (meta(', "grant_schema": {"enabled": bool}'), "META['grant_schema'] must be a msgspec.Struct subclass"),
    (meta(', "grant_schema": dict'), "META['grant_schema'] must be a msgspec.Struct subclass"),
    (
        "import msgspec\nclass G(msgspec.Struct):\n    directories: list[str] = []\n"
        + meta(', "grant_schema": G'),
        "META['grant_schema'] must have a field `enabled: bool = False`",
    ),
    (
        "import msgspec\nclass G(msgspec.Struct):\n    enabled: int = 0\n" + meta(', "grant_schema": G'),
        "must have a field `enabled: bool = False`",
    ),
    (
        "import msgspec\nclass G(msgspec.Struct):\n    enabled: bool = True\n" + meta(', "grant_schema": G'),
        "must have a field `enabled: bool = False`",
    ),
    (
        "import msgspec\nclass G(msgspec.Struct, array_like=True):\n    enabled: bool = False\n"
        + meta(', "grant_schema": G'),
        "META['grant_schema'] must be a plain object Struct",
    ),
    (
        "from __future__ import annotations\nimport msgspec\nclass G(msgspec.Struct):\n"
        "    enabled: bool = False\n    x: NoSuchType = None\n" + meta(', "grant_schema": G'),
        "META['grant_schema'] has unresolvable field types",
    ),
    (meta(', "args_schema": 5'), "META['args_schema'] must be a msgspec.Struct subclass"),
    (meta(', "target": 5'), "META['target'] must be an argument name"),
    (meta(', "target": ""'), "META['target'] must be an argument name"),
    (_META % "", "execute must be a function"),
    (_META % "" + "execute = 3\n", "execute must be a function"),
    (_META % "" + "def execute(context):\n    pass\n", "execute must take exactly two positional parameters"),
    (_META % "" + "def execute(a, b, c):\n    pass\n", "execute must take exactly two positional parameters"),
    (_META % "" + "def execute(*args):\n    pass\n", "execute must take exactly two positional parameters"),
    (
        _META % "" + "def execute(a, b, *, c):\n    pass\n",
        "execute must take exactly two positional parameters",
    ),
]


@pytest.mark.parametrize(("source", "expected"), BAD_PLUGINS)
def test_malformed_plugin_refused_with_one_line(tmp_path: Path, source: str, expected: str) -> None:
    write(tmp_path, "bad.py", source)
    write(tmp_path, "ping.py", MINIMAL_ASYNC)  # loads although its neighbour is broken
    plugins, errors = load_handlers(tmp_path)
    assert sorted(plugins) == ["ping"]
    assert len(errors) == 1
    message = str(errors[0])
    assert isinstance(errors[0], PluginError)
    assert message.startswith(f"{tmp_path / 'bad.py'}: "), message
    assert expected in message, message
    assert "\n" not in message and "Traceback" not in message


def test_file_names(tmp_path: Path) -> None:
    write(tmp_path, "Bad-Name.py", MINIMAL_ASYNC)
    write(tmp_path, "_private_helper.py", "raise RuntimeError('never imported')\n")
    write(tmp_path, "notes.txt", "not python")
    write(tmp_path, "ok.py", MINIMAL_ASYNC)
    (tmp_path / "pkg.py").mkdir()  # a directory with a .py name is not a handler
    plugins, errors = load_handlers(tmp_path)
    assert sorted(plugins) == ["ok"]
    assert [str(e) for e in errors] == [
        f"{tmp_path / 'Bad-Name.py'}: handler name 'Bad-Name' must match ^[a-z][a-z0-9_]{{0,63}}$"
    ]


def test_missing_directory(tmp_path: Path) -> None:
    plugins, errors = load_handlers(tmp_path / "nope")
    assert plugins == {} and "handler directory not found" in str(errors[0])
    registry = HandlerRegistry(tmp_path / "nope")
    assert registry.plugins == {} and len(registry.errors) == 1
    write(tmp_path / "nope", "ping.py", MINIMAL_ASYNC)
    assert registry.reload_if_changed() is True
    assert registry.names() == ["ping"] and registry.errors == []


def test_direct_source_load(tmp_path: Path) -> None:
    plugin = load_handler_source(tmp_path / "direct.py", textwrap.dedent(GOOD).encode())
    assert plugin.name == "direct"
    with pytest.raises(PluginError, match=r"direct\.py: META must be a dict"):
        load_handler_source(tmp_path / "direct.py", b"x = 1\n")


def _same_stamp_rewrite(path: Path, text: str) -> None:
    """Rewrite in place with the same size and mtime: only a content comparison sees it."""
    st = path.stat()
    assert len(text.encode()) == st.st_size
    with open(path, "r+") as f:
        f.write(text)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_registry_reload(tmp_path: Path) -> None:
    write(tmp_path, "good.py", GOOD)
    write(tmp_path, "ping.py", MINIMAL_ASYNC)
    registry = HandlerRegistry(tmp_path)
    gen = registry.generation
    assert registry.names() == ["good", "ping"] and registry.reload_if_changed() is False
    assert registry.generation == gen
    old_ping = registry.get("ping")

    # Same size, same mtime, within the racy window: still picked up by content.
    _same_stamp_rewrite(tmp_path / "ping.py", MINIMAL_ASYNC.replace('"ping"', '"pong"'))
    assert registry.reload_if_changed() is True and registry.generation == gen + 1
    ping = registry.get("ping")
    assert ping is not None and ping is not old_ping and ping.description == "pong"
    assert registry.get("good") is not None

    # A change that breaks the file drops the handler (deny by default) and reports why.
    write(tmp_path, "ping.py", "META = 1\n")
    assert registry.reload_if_changed() is True
    assert registry.get("ping") is None and "META must be a dict" in str(registry.error_for("ping"))
    write(tmp_path, "ping.py", MINIMAL_ASYNC)
    assert registry.reload_if_changed() is True and registry.get("ping") is not None
    assert registry.errors == []

    (tmp_path / "good.py").unlink()
    assert registry.reload_if_changed() is True and registry.names() == ["ping"]
    write(tmp_path, "third.py", MINIMAL_ASYNC)
    assert registry.reload_if_changed() is True and registry.names() == ["ping", "third"]
    assert registry.reload_if_changed() is False


def test_watched_directory(tmp_path: Path) -> None:
    watch = WatchedDirectory(tmp_path, ".json", max_bytes=10)
    assert not watch.scan().changed
    (tmp_path / "a.json").write_text("1")
    (tmp_path / ".a.json.123.tmp").write_text("temp")  # atomic-write temp files are ignored
    (tmp_path / ".hidden.json").write_text("x")
    changes = watch.scan()
    assert list(changes.updated) == [tmp_path / "a.json"] and changes.updated[tmp_path / "a.json"] == b"1"
    assert not watch.scan().changed
    (tmp_path / "big.json").write_text("x" * 11)
    big = watch.scan().updated[tmp_path / "big.json"]
    assert isinstance(big, OSError) and "larger than 10 bytes" in str(big)
    assert not watch.scan().changed  # a persisting error is reported once
    (tmp_path / "a.json").unlink()
    assert watch.scan().removed == [tmp_path / "a.json"]
    # Replacing a file by rename with identical content is not a change.
    (tmp_path / "big.json").write_text("y")
    watch.scan()
    (tmp_path / "tmp").write_text("y")
    os.replace(tmp_path / "tmp", tmp_path / "big.json")
    assert not watch.scan().changed


def test_shipped_handlers_load() -> None:
    directory = REPO / "config" / "handlers"
    assert any(directory.glob("*.py")), f"no shipped handlers in {directory}"
    plugins, errors = load_handlers(directory)
    assert errors == [], [str(e) for e in errors]
    assert plugins
