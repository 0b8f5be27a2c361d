"""broker.policy.grants: scope and grant validation, protected directories, decide() order, hot reload."""

from __future__ import annotations

import asyncio
import json
import os
import textwrap
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from broker.core.errors import Denied, GrantError, RequestError, ScopeError, UnknownCapability, WorkspaceError
from broker.core.protected import file_identity
from broker.core.workspace import Workspace
from broker.policy.grants import (
    GrantStore,
    Policy,
    ScopeStore,
    check_directory,
    load_scopes,
    schema_file_texts,
)
from broker.policy.plugins import HandlerRegistry, load_handlers

REPO = Path(__file__).resolve().parents[1]

FILES_HANDLER = """
from __future__ import annotations
import msgspec

class Grant(msgspec.Struct, forbid_unknown_fields=True):
    enabled: bool = False
    directories: list[str] = []
    max_bytes: int = 1000

META = {"requires_scope": True, "supports_modes": ["sandbox"], "description": "files",
        "grant_schema": Grant, "target": "path"}

def execute(context, args):
    return {"success": True, "data": dict(context.grant)}
"""

PING_HANDLER = """
META = {"requires_scope": False, "supports_modes": ["sandbox"], "description": "ping"}

async def execute(context, args):
    return {"success": True, "data": "pong"}
"""

FILES_SCOPE = {"version": "1.0", "description": "files", "default_config": {"max_bytes": 5, "note": "scope"}}


def make_ws(tmp_path: Path) -> Workspace:
    ws = Workspace.at(tmp_path / "ws")
    for d in (
        ws.handlers,
        ws.scopes,
        ws.grants,
        ws.state,
        ws.work_areas / "a",
        ws.work_areas / "b",
        ws.packs,
        ws.base,
    ):
        d.mkdir(parents=True)
    for pack in ("a", "b"):
        (ws.ecosystem / pack).mkdir(parents=True)
        (ws.ecosystem / pack / "pack.json").write_text(json.dumps({"id": pack, "version": "1"}))
    ws.config_file.write_text("{}")
    (ws.handlers / "files.py").write_text(textwrap.dedent(FILES_HANDLER))
    (ws.handlers / "ping.py").write_text(textwrap.dedent(PING_HANDLER))
    (ws.scopes / "files.json").write_text(json.dumps(FILES_SCOPE))
    return ws


def write_grant(ws: Workspace, component: str, permissions: Any, *, name: str | None = None) -> Path:
    path = ws.grants / f"{name or component}.json"
    path.write_text(json.dumps({"component_id": component, "permissions": permissions}))
    return path


def policy_for(ws: Workspace) -> Policy:
    return Policy.for_workspace(ws)


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return make_ws(tmp_path)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    d = tmp_path / "outside" / "docs"
    d.mkdir(parents=True)
    return d


# --- scopes ------------------------------------------------------------------------------------------

SCOPE_CASES = [
    ({"version": "2.0", "description": "d"}, "Invalid enum value '2.0' - at `$.version`"),
    ({"version": "1.0"}, "Object missing required field `description`"),
    (
        {"version": "1.0", "description": "d", "default_config": []},
        "Expected `object`, got `array` - at `$.default_config`",
    ),
    ({"version": "1.0", "description": 3}, "Expected `str`, got `int` - at `$.description`"),
    ({"version": "1.0", "description": "d", "extra": 1}, "Object contains unknown field `extra`"),
    (
        {"version": "1.0", "description": "d", "default_config": {"enabled": True}},
        "at `$.default_config.enabled`",
    ),
    ("{not json", "not valid JSON"),
]


@pytest.mark.parametrize(("doc", "expected"), SCOPE_CASES)
def test_scope_errors_name_file_and_field(tmp_path: Path, doc: Any, expected: str) -> None:
    path = tmp_path / "thing.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    (tmp_path / "ok.json").write_text(json.dumps({"version": "1.0", "description": "fine"}))
    scopes, errors = load_scopes(tmp_path)
    assert list(scopes) == ["ok"] and scopes["ok"].default_config == {}
    assert len(errors) == 1 and isinstance(errors[0], ScopeError)
    assert str(errors[0]).startswith(f"{path}: ") and expected in str(errors[0]), str(errors[0])


def test_scope_name_must_be_a_capability(tmp_path: Path) -> None:
    (tmp_path / "Bad.json").write_text(json.dumps({"version": "1.0", "description": "d"}))
    _, errors = load_scopes(tmp_path)
    assert "scope name 'Bad' must match" in str(errors[0])


# --- grant file validation ---------------------------------------------------------------------------


def grant_errors(ws: Workspace) -> list[str]:
    return [str(e) for e in GrantStore(ws, HandlerRegistry(ws.handlers)).errors]


GRANT_CASES: list[tuple[str, str | dict[str, Any], str]] = [
    # (file name without .json, document (or raw text), expected part of the error)
    ("a:tool:t", {"component_id": "a:tool:other", "permissions": {}}, "does not match the file name"),
    ("a:tool:t", {"component_id": "a:tool:other", "permissions": {}}, "- at `$.component_id`"),
    ("notacomponent", {"component_id": "notacomponent"}, "file name must be <component_id>.json"),
    ("A:tool:t", {"component_id": "A:tool:t"}, "pack id must match"),
    ("a:tool:t", "{", "not valid JSON"),
    ("a:tool:t", {"permissions": {}}, "Object missing required field `component_id`"),
    ("a:tool:t", {"component_id": "a:tool:t", "extra": 1}, "Object contains unknown field `extra`"),
    (
        "a:tool:t",
        {"component_id": "a:tool:t", "permissions": []},
        "Expected `object`, got `array` - at `$.permissions`",
    ),
    (
        "a:tool:t",
        {"component_id": "a:tool:t", "permissions": {"files": True}},
        "Expected `object`, got `bool` - at `$.permissions.files`",
    ),
    (
        "a:tool:t",
        {"component_id": "a:tool:t", "permissions": {"files": {"enabled": "yes"}}},
        "Expected `bool`, got `str` - at `$.permissions.files.enabled`",
    ),
    (
        "a:tool:t",
        {"component_id": "a:tool:t", "permissions": {"files": {"enabled": True, "directory": "/x"}}},
        "Object contains unknown field `directory` - at `$.permissions.files`",
    ),
    (
        "a:tool:t",
        {"component_id": "a:tool:t", "permissions": {"files": {"enabled": True, "directories": [1]}}},
        "Expected `str`, got `int` - at `$.permissions.files.directories[0]`",
    ),
    (
        "a:tool:t",
        {"component_id": "a:tool:t", "permissions": {"files": {"enabled": True, "max_bytes": "9"}}},
        "Expected `int`, got `str` - at `$.permissions.files.max_bytes`",
    ),
    (
        "a:tool:t",
        {"component_id": "a:tool:t", "permissions": {"ping": {"enabled": True, "x": 1}}},
        "Object contains unknown field `x` - at `$.permissions.ping`",
    ),
    (
        "a:tool:t",
        {"component_id": "a:tool:t", "permissions": {"files": {"enabled": True, "directories": ["rel/dir"]}}},
        "directory 'rel/dir' must be an absolute path - at `$.permissions.files.directories`",
    ),
]


@pytest.mark.parametrize(("name", "doc", "expected"), GRANT_CASES)
def test_grant_errors_name_file_and_field(ws: Workspace, name: str, doc: Any, expected: str) -> None:
    path = ws.grants / f"{name}.json"
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    errors = grant_errors(ws)
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"{path}: ") and expected in errors[0], errors[0]
    assert "\n" not in errors[0]


def protected_cases(ws: Workspace, tmp_path: Path) -> list[tuple[str, str]]:
    link = tmp_path / "innocent-looking"
    link.symlink_to(ws.state)
    deep_link = tmp_path / "via-docker"
    deep_link.symlink_to(ws.docker)
    return [
        (str(ws.state), "is the protected workspace path"),
        (str(ws.state / "creds"), "is inside the protected workspace path"),
        (str(ws.root), "contains the protected workspace path"),
        (str(ws.docker), "contains the protected workspace path"),
        ("/", "contains the protected workspace path"),
        (str(ws.grants), "is the protected workspace path"),
        (str(ws.handlers / "x"), "is inside the protected workspace path"),
        (str(ws.scopes), "is the protected workspace path"),
        (str(ws.config_file), "is the protected workspace path"),
        (str(ws.ecosystem / "a"), "is inside the protected workspace path"),
        (str(ws.work_areas / "b"), "is the protected workspace path"),
        (str(ws.work_areas / "b" / "deep"), "is inside the protected workspace path"),
        (str(ws.work_areas / "future-pack"), "is inside another Pack's sandbox"),
        (str(ws.work_areas), "contains the protected workspace path"),
        (str(link), "is the protected workspace path"),
        (str(link / "sub"), "is inside the protected workspace path"),
        (str(deep_link / ".rumi"), "is the protected workspace path"),
        (str(ws.work_areas / "a" / ".." / "b"), "is the protected workspace path"),
    ]


def test_protected_directories_refused(ws: Workspace, tmp_path: Path) -> None:
    for directory, expected in protected_cases(ws, tmp_path):
        problem = check_directory(ws, "a", directory)
        assert problem is not None and expected in problem, (directory, problem)
        path = write_grant(ws, "a:tool:t", {"files": {"enabled": True, "directories": [directory]}})
        errors = grant_errors(ws)
        assert len(errors) == 1 and errors[0].startswith(f"{path}: "), errors
        assert repr(directory) in errors[0] and "$.permissions.files.directories" in errors[0]
        assert expected in errors[0]
        pol = policy_for(ws)
        with pytest.raises(Denied, match="its grant file is invalid"):
            pol.decide("a", "a:tool:t", "files")


def test_allowed_directories(ws: Workspace, outside: Path) -> None:
    for directory in (
        str(outside),
        str(ws.work_areas / "a"),
        str(ws.work_areas / "a" / "work"),
        "/nonexistent/yet",
    ):
        assert check_directory(ws, "a", directory) is None, directory
    # The same directory is another Pack's sandbox for b.
    assert "is the protected workspace path" in (check_directory(ws, "b", str(ws.work_areas / "a")) or "")


def test_symlink_swapped_in_after_grant_is_rechecked(ws: Workspace) -> None:
    # A grant to a harmless path inside docker/ becomes invalid when that path turns into a link to state.
    target = ws.docker / "shared-data"
    target.mkdir()
    write_grant(ws, "a:tool:t", {"files": {"enabled": True, "directories": [str(target)]}})
    pol = policy_for(ws)
    assert pol.decide("a", "a:tool:t", "files").grant["directories"] == [str(target)]
    target.rmdir()
    target.symlink_to(ws.state)
    assert pol.refresh() is True
    with pytest.raises(Denied):
        pol.decide("a", "a:tool:t", "files")
    assert "is the protected workspace path" in str(pol.grants.errors[0])


def test_unknown_handler_entry_skipped_rest_usable(ws: Workspace, outside: Path) -> None:
    path = write_grant(ws, "a:tool:t", {"nosuch": {"enabled": True}, "ping": {"enabled": True}})
    pol = policy_for(ws)
    assert pol.decide("a", "a:tool:t", "ping").plugin.name == "ping"
    errors = [str(e) for e in pol.grants.errors]
    assert len(errors) == 1
    assert errors[0].startswith(f"{path}: no handler 'nosuch' is installed (installed: files, ping)")
    assert errors[0].endswith("- at `$.permissions.nosuch`")
    with pytest.raises(UnknownCapability):
        pol.decide("a", "a:tool:t", "nosuch")


def test_bad_file_denies_only_that_component(ws: Workspace, outside: Path) -> None:
    write_grant(ws, "a:tool:good", {"ping": {"enabled": True}})
    write_grant(
        ws, "a:tool:bad", {"ping": {"enabled": True}, "files": {"enabled": True, "directories": ["rel"]}}
    )
    (ws.grants / "a:tool:garbage.json").write_text("\x00\xff not json")
    pol = policy_for(ws)
    assert pol.decide("a", "a:tool:good", "ping").grant == {"enabled": True}
    # One bad entry makes the whole file invalid: ping was fine in it but is denied too.
    for component in ("a:tool:bad", "a:tool:garbage"):
        with pytest.raises(Denied, match="grant file is invalid"):
            pol.decide("a", component, "ping")
    assert len(pol.grants.errors) == 2


def test_scope_default_with_wrong_type_names_the_scope(ws: Workspace) -> None:
    (ws.scopes / "files.json").write_text(
        json.dumps({"version": "1.0", "description": "d", "default_config": {"max_bytes": "big"}})
    )
    path = write_grant(ws, "a:tool:t", {"files": {"enabled": True}})
    errors = grant_errors(ws)
    assert len(errors) == 1
    assert errors[0].startswith(
        f"{path}: $.permissions.files takes a bad default from {ws.scopes / 'files.json'}"
    )
    assert "- at `$.default_config.max_bytes`" in errors[0]


def test_scope_directories_are_checked_too(ws: Workspace) -> None:
    scope = {"version": "1.0", "description": "d", "default_config": {"directories": [str(ws.state)]}}
    (ws.scopes / "files.json").write_text(json.dumps(scope))
    write_grant(ws, "a:tool:t", {"files": {"enabled": True}})
    path = ws.grant_file("a:tool:t")
    errors = grant_errors(ws)
    assert len(errors) == 1 and "is the protected workspace path" in errors[0]
    assert errors[0].startswith(
        f"{path}: $.permissions.files takes a bad default from {ws.scopes / 'files.json'}"
    )
    assert errors[0].endswith("- at `$.default_config.directories`")


def test_new_errors_are_logged_once(ws: Workspace, caplog: pytest.LogCaptureFixture) -> None:
    pol = policy_for(ws)
    caplog.set_level("WARNING", logger="rumi.policy")
    write_grant(ws, "a:tool:t", {"files": {"enabled": "yes"}})
    (ws.handlers / "broken.py").write_text("META = 1\n")
    pol.refresh()
    pol.refresh()
    (ws.grants / "a:tool:u.json").write_text("{}")
    pol.refresh()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3, messages
    assert sum("broken.py: META must be a dict" in m for m in messages) == 1
    assert (
        sum("a:tool:t.json" in m for m in messages) == 1 and sum("a:tool:u.json" in m for m in messages) == 1
    )


# --- decide() ----------------------------------------------------------------------------------------


def test_decide_order_and_codes(ws: Workspace, outside: Path) -> None:
    write_grant(
        ws, "a:tool:t", {"files": {"enabled": True, "directories": [str(outside)]}, "ping": {"enabled": True}}
    )
    write_grant(ws, "a:tool:off", {"files": {"enabled": False, "directories": [str(outside)]}})
    write_grant(ws, "b:tool:t", {"ping": {"enabled": True}})
    (ws.handlers / "noscope.py").write_text(textwrap.dedent(FILES_HANDLER))  # requires a scope it lacks
    pol = policy_for(ws)
    cases: list[tuple[str, str, str, type[RequestError], str]] = [
        # (pack, component, capability, error, message part) — earlier checks win
        ("a", "b:tool:t", "nosuch", UnknownCapability, "unknown capability 'nosuch'"),
        ("a", "garbage", "nosuch", UnknownCapability, "unknown capability"),
        ("a", "b:tool:t", "noscope", Denied, "capability noscope has no scope installed"),
        ("a", "garbage", "ping", Denied, "must look like '<pack_id>:<type>:<name>'"),
        ("a", "b:tool:t", "ping", Denied, "component 'b:tool:t' does not belong to pack 'a'"),
        (
            "a",
            "a:tool:nogrant",
            "ping",
            Denied,
            "no grant for ping on component a:tool:nogrant: run `rumi grant",
        ),
        ("a", "a:tool:off", "files", Denied, "no grant for files on component a:tool:off"),
        ("a", "a:tool:t", "noscope", Denied, "has no scope installed"),
        ("b", "a:tool:t", "files", Denied, "does not belong to pack 'b'"),
    ]
    for pack, component, capability, error, part in cases:
        with pytest.raises(error) as info:
            pol.decide(pack, component, capability)
        assert part in info.value.message, (component, capability, info.value.message)
        assert info.value.code == error.code
    decision = pol.decide("a", "a:tool:t", "files")
    assert decision.plugin.name == "files"
    # schema defaults < scope default_config < the entry; scope keys outside the schema pass through.
    assert decision.grant == {"enabled": True, "directories": [str(outside)], "max_bytes": 5, "note": "scope"}
    assert decision.protected is not None
    assert pol.grants.entry("a:tool:t", "files") == {
        "enabled": True,
        "directories": [str(outside)],
        "max_bytes": 5,
    }
    assert pol.grants.entry("a:tool:off", "files") is None
    assert pol.decide("a", "a:tool:t", "ping").grant == {"enabled": True}  # no scope needed
    assert pol.decide("b", "b:tool:t", "ping").grant == {"enabled": True}
    # Each decision gets its own copy: a handler cannot widen the next request's grant.
    decision.grant["directories"].append("/")
    assert pol.decide("a", "a:tool:t", "files").grant["directories"] == [str(outside)]


def test_entry_overrides_scope_default(ws: Workspace, outside: Path) -> None:
    write_grant(ws, "a:pack:_", {"files": {"enabled": True, "directories": [str(outside)], "max_bytes": 77}})
    pol = policy_for(ws)
    assert pol.decide("a", "a:pack:_", "files").grant["max_bytes"] == 77


def test_invalid_scope_denies_even_without_requires_scope(ws: Workspace) -> None:
    write_grant(ws, "a:tool:t", {"ping": {"enabled": True}})
    (ws.scopes / "ping.json").write_text("{broken")
    pol = policy_for(ws)
    with pytest.raises(Denied, match="capability ping has an invalid scope file"):
        pol.decide("a", "a:tool:t", "ping")
    assert any("ping.json: not valid JSON" in str(e) for e in pol.errors)


def test_policy_constructors(ws: Workspace) -> None:
    registry = HandlerRegistry(ws.handlers)
    scopes = ScopeStore(ws.scopes)
    grants = GrantStore(ws, registry, scopes)
    assert Policy(ws, registry, scopes, grants).grants is grants
    assert Policy(ws, registry, grants).scopes is scopes
    with pytest.raises(ValueError):
        Policy(ws, registry, ScopeStore(ws.scopes), grants)


# --- hot reload --------------------------------------------------------------------------------------


def test_decide_shares_the_grant_stores_protected_index(ws: Workspace, outside: Path) -> None:
    write_grant(ws, "a:tool:t", {"files": {"enabled": True, "directories": [str(outside)]}})
    pol = policy_for(ws)
    protected = pol.decide("a", "a:tool:t", "files").protected
    assert protected is not None
    assert pol.decide("a", "a:tool:t", "files").protected is protected  # one set per Pack
    index = pol.grants.protected_index
    # The one tagged index gives each Pack exactly the paths `ws.protected_paths(pack)` lists.
    for pack in ("a", "b", "future", None):
        assert sorted(index.paths(pack)) == sorted(ws.protected_paths(pack)), pack
    assert sorted(protected.paths()) == sorted(ws.protected_paths("a"))
    (ws.work_areas / "b" / "theirs.txt").write_text("b's")
    (ws.work_areas / "a" / "mine.txt").write_text("a's")
    assert protected.contains(file_identity((ws.work_areas / "b" / "theirs.txt").stat()))
    assert not protected.contains(file_identity((ws.work_areas / "a" / "mine.txt").stat()))
    # A file created under docker/.rumi after the index was built is in it after the watcher's poll.
    (ws.state / "creds").mkdir()
    (ws.state / "creds" / "b.nk").write_text("seed")
    os.link(ws.state / "creds" / "b.nk", outside / "copy.nk")
    pol.refresh()
    assert protected.contains(file_identity((outside / "copy.nk").stat()))
    assert index.contains(file_identity((outside / "copy.nk").stat()))


def test_refresh_picks_up_changes_and_revocations(ws: Workspace, outside: Path) -> None:
    pol = policy_for(ws)
    assert pol.refresh() is False  # nothing changed
    with pytest.raises(Denied):
        pol.decide("a", "a:tool:t", "files")

    path = write_grant(ws, "a:tool:t", {"files": {"enabled": True, "directories": [str(outside)]}})
    assert pol.refresh() is True
    assert pol.decide("a", "a:tool:t", "files").grant["directories"] == [str(outside)]
    assert pol.refresh() is False

    other = outside.parent / "other"
    other.mkdir()
    write_grant(ws, "a:tool:t", {"files": {"enabled": True, "directories": [str(other)]}})
    assert pol.refresh() is True
    assert pol.decide("a", "a:tool:t", "files").grant["directories"] == [str(other)]

    write_grant(ws, "a:tool:t", {"files": {"enabled": False, "directories": [str(other)]}})
    pol.refresh()
    with pytest.raises(Denied):
        pol.decide("a", "a:tool:t", "files")

    write_grant(ws, "a:tool:t", {"files": {"enabled": True, "directories": [str(other)]}})
    pol.refresh()
    pol.decide("a", "a:tool:t", "files")
    path.unlink()  # revocation by removing the file
    assert pol.refresh() is True
    with pytest.raises(Denied):
        pol.decide("a", "a:tool:t", "files")


def test_same_size_same_mtime_edit_is_seen(ws: Workspace, outside: Path) -> None:
    path = write_grant(ws, "a:tool:t", {"files": {"enabled": True, "directories": [str(outside)]}})
    pol = policy_for(ws)
    pol.decide("a", "a:tool:t", "files")
    st = path.stat()
    text = path.read_text().replace("true", "fals").replace('"files"', '"filez"')  # same length
    with open(path, "r+") as f:
        f.write(text.replace("fals", "true"))  # only the key name changes
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size
    assert pol.refresh() is True
    with pytest.raises(Denied):
        pol.decide("a", "a:tool:t", "files")


def test_handler_and_scope_changes_recheck_grants(ws: Workspace, outside: Path) -> None:
    write_grant(ws, "a:tool:t", {"files": {"enabled": True, "directories": [str(outside)], "max_bytes": 9}})
    pol = policy_for(ws)
    assert pol.decide("a", "a:tool:t", "files").grant["note"] == "scope"
    # The scope changes: the merged grant follows.
    (ws.scopes / "files.json").write_text(
        json.dumps({"version": "1.0", "description": "d", "default_config": {"note": "new"}})
    )
    assert pol.refresh() is True
    assert pol.decide("a", "a:tool:t", "files").grant["note"] == "new"
    # The scope goes away: a requires_scope capability is denied.
    (ws.scopes / "files.json").unlink()
    pol.refresh()
    with pytest.raises(Denied, match="no scope installed"):
        pol.decide("a", "a:tool:t", "files")
    (ws.scopes / "files.json").write_text(json.dumps(FILES_SCOPE))
    pol.refresh()
    pol.decide("a", "a:tool:t", "files")
    # The handler's schema drops max_bytes: the grant that sets it is now invalid.
    (ws.handlers / "files.py").write_text(
        textwrap.dedent(FILES_HANDLER).replace("    max_bytes: int = 1000\n", "")
    )
    assert pol.refresh() is True
    with pytest.raises(Denied, match="grant file is invalid"):
        pol.decide("a", "a:tool:t", "files")
    assert "unknown field `max_bytes`" in str(pol.grants.errors[0])
    # The handler is removed: unknown capability.
    (ws.handlers / "files.py").unlink()
    pol.refresh()
    with pytest.raises(UnknownCapability):
        pol.decide("a", "a:tool:t", "files")


def test_watch_picks_up_a_change_quickly(ws: Workspace, outside: Path) -> None:
    pol = policy_for(ws)

    async def main() -> float:
        async with anyio.create_task_group() as tg:
            await tg.start(lambda task_status: pol.grants.watch(interval=0.2, task_status=task_status))
            start = time.monotonic()
            write_grant(ws, "a:tool:t", {"files": {"enabled": True, "directories": [str(outside)]}})
            with anyio.fail_after(3):
                while True:
                    try:
                        pol.decide("a", "a:tool:t", "files")
                        break
                    except Denied:
                        await anyio.sleep(0.01)
            granted = time.monotonic() - start
            (ws.grants / "a:tool:t.json").unlink()
            start = time.monotonic()
            with anyio.fail_after(3):
                while True:
                    try:
                        pol.decide("a", "a:tool:t", "files")
                        await anyio.sleep(0.01)
                    except Denied:
                        break
            revoked = time.monotonic() - start
            tg.cancel_scope.cancel()
        print(
            f"\nwatch(interval=0.2): grant seen after {granted * 1000:.0f} ms, "
            f"revocation after {revoked * 1000:.0f} ms"
        )
        return max(granted, revoked)

    assert anyio.run(main) < 3


def test_costs(ws: Workspace, outside: Path) -> None:
    """Not a timing assertion: prints what decide() and a no-change refresh() cost."""
    past = time.time() - 10  # older than the racy window: a poll only stats them
    for i in range(300):
        path = write_grant(ws, f"a:tool:t{i}", {"files": {"enabled": True, "directories": [str(outside)]}})
        os.utime(path, (past, past))
    start = time.perf_counter()
    pol = policy_for(ws)
    load = time.perf_counter() - start
    assert pol.grants.errors == []
    n = 20000
    start = time.perf_counter()
    for _ in range(n):
        pol.decide("a", "a:tool:t7", "files")
    per_decide = (time.perf_counter() - start) / n
    start = time.perf_counter()
    for _ in range(20):
        assert pol.refresh() is False
    per_refresh = (time.perf_counter() - start) / 20
    print(
        f"\n300 grant files: load {load * 1000:.1f} ms, decide {per_decide * 1e6:.1f} us, "
        f"no-change refresh {per_refresh * 1000:.2f} ms"
    )


# --- schema ------------------------------------------------------------------------------------------


def test_committed_schema_files_are_current() -> None:
    for name, text in schema_file_texts().items():
        committed = REPO / "config" / "schema" / name
        assert committed.read_text() == text, (
            f"{committed} is stale: run `python -m broker.policy.grants config/schema`"
        )


def test_schema_with_handlers_describes_each_permission(tmp_path: Path) -> None:
    ws = make_ws(tmp_path)
    plugins, _ = load_handlers(ws.handlers)
    docs = json.loads(schema_file_texts(plugins)["grant.schema.json"])
    props = docs["$defs"]["Permissions"]["properties"]
    assert set(props) == {"files", "ping"}
    grant_def = docs["$defs"][props["files"]["$ref"].rsplit("/", 1)[1]]
    assert grant_def["properties"]["directories"]["type"] == "array"
    assert grant_def["additionalProperties"] is False


def test_all_errors_are_grant_errors(ws: Workspace) -> None:
    (ws.grants / "bad.json").write_text("{}")
    store = GrantStore(ws, HandlerRegistry(ws.handlers))
    assert all(isinstance(e, GrantError) for e in store.errors) and store.errors


def test_watch_with_inotify_sees_changes_long_before_its_rescan(ws: Workspace, outside: Path) -> None:
    """The broker's watch (rescan given): a grant, a revocation, a handler removed, each seen at once.

    `interval` and `rescan` are 30 s here, so only the inotify wake-up can explain a change seen within
    the 3 s bound (the broker's default rescan is 1 s; without inotify it polls every `interval`).
    """
    pol = policy_for(ws)
    refreshes: list[bool | None] = []

    async def until(allowed: bool) -> float:
        start = time.monotonic()
        with anyio.fail_after(3):
            while True:
                try:
                    pol.decide("a", "a:tool:t", "files")
                    now = True
                except (Denied, UnknownCapability):
                    now = False
                if now is allowed:
                    return time.monotonic() - start
                await anyio.sleep(0.01)

    async def main() -> list[float]:
        async with anyio.create_task_group() as tg:
            await tg.start(
                lambda task_status: pol.grants.watch(
                    interval=30, rescan=30, on_refresh=refreshes.append, task_status=task_status
                )
            )
            write_grant(ws, "a:tool:t", {"files": {"enabled": True, "directories": [str(outside)]}})
            granted = await until(True)
            (ws.grants / "a:tool:t.json").unlink()
            revoked = await until(False)
            write_grant(ws, "a:tool:t", {"files": {"enabled": True, "directories": [str(outside)]}})
            await until(True)
            (ws.handlers / "files.py").unlink()  # the handler directory is watched too
            unloaded = await until(False)
            tg.cancel_scope.cancel()
        return [granted, revoked, unloaded]

    times = anyio.run(main)
    print(
        f"\nwatch(rescan=30) with inotify: grant, revocation, handler removal seen after "
        f"{', '.join(f'{t * 1000:.0f} ms' for t in times)}"
    )
    assert max(times) < 3
    assert True in refreshes and None not in refreshes


def test_notifier_wakes_on_a_change_and_watches_a_directory_made_later(tmp_path: Path) -> None:
    from broker.core.notify import DirectoryNotifier

    later = tmp_path / "later"
    notifier = DirectoryNotifier([tmp_path, later])
    assert notifier.available  # Linux: inotify is there

    async def main() -> list[tuple[bool, float]]:
        seen = []
        for change in (
            lambda: (tmp_path / "a.json").write_text("{}"),  # created and written
            lambda: os.replace(tmp_path / "a.json", tmp_path / "b.json"),  # renamed in place
            lambda: later.mkdir(),  # seen through tmp_path; from now on `later` is watched as well
            lambda: (later / "c.json").write_text("{}"),  # inside the directory made later
        ):
            waiter = asyncio.ensure_future(notifier.wait(30))
            await asyncio.sleep(0.05)  # the waiter (re)adds its watches first
            start = time.monotonic()
            change()
            woke = await asyncio.wait_for(waiter, 5)
            seen.append((woke, time.monotonic() - start))
        # Nothing changed: the timeout, reported as such.
        seen.append((await notifier.wait(0.2), 0.2))
        return seen

    try:
        seen = asyncio.run(main())
    finally:
        notifier.close()
    assert [woke for woke, _ in seen] == [True, True, True, True, False]
    assert all(took < 2 for _, took in seen[:4]), seen
    assert notifier.available is False  # closed: wait() is a plain sleep from now on


@pytest.mark.parametrize("key", ["grant_poll_interval", "grant_rescan_interval"])
def test_a_watch_interval_of_zero_is_refused_with_the_key_named(ws: Workspace, key: str) -> None:
    # 0 (or less) would make the broker re-read the grant files in a busy loop.
    ws.config_file.write_text(json.dumps({"broker": {key: 0}}))
    with pytest.raises(WorkspaceError, match=rf"Expected `float` > 0.* - at `\$\.broker\.{key}`"):
        ws.load_config()
    ws.config_file.write_text(json.dumps({"broker": {key: 0.5}}))
    assert getattr(ws.load_config().broker, key) == 0.5
