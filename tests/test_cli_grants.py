"""`rumi grant`, `rumi revoke`, `rumi grants` through typer's CliRunner on a temporary workspace."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from broker.cli.grants import register
from broker.core.workspace import Workspace
from broker.policy.grants import Policy

FILES_HANDLER = """
from __future__ import annotations
import msgspec

class Grant(msgspec.Struct, forbid_unknown_fields=True):
    enabled: bool = False
    directories: list[str] = []

META = {"requires_scope": True, "supports_modes": ["sandbox"], "description": "files", "grant_schema": Grant}

def execute(context, args):
    return {"success": True, "data": None}
"""

NET_HANDLER = """
from __future__ import annotations
import msgspec

class Grant(msgspec.Struct, forbid_unknown_fields=True):
    enabled: bool = False
    allowed_domains: list[str] = []
    allowed_ports: list[int] = []

META = {"requires_scope": False, "supports_modes": ["sandbox"], "description": "net", "grant_schema": Grant}

def execute(context, args):
    return {"success": True, "data": None}
"""

TERM_HANDLER = """
from __future__ import annotations
import msgspec

class Grant(msgspec.Struct, forbid_unknown_fields=True):
    enabled: bool = False
    directories: list[str] = []
    shell: bool = False

META = {"requires_scope": False, "supports_modes": ["sandbox"], "description": "term", "grant_schema": Grant}

def execute(context, args):
    return {"success": True, "data": None}
"""

KEYS_HANDLER = """
import msgspec

class Grant(msgspec.Struct, forbid_unknown_fields=True):
    enabled: bool = False
    allowed_keys: list[str] = []

META = {"requires_scope": False, "supports_modes": ["sandbox"], "description": "keys", "grant_schema": Grant}

def execute(context, args):
    return {"success": True, "data": None}
"""


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    ws = Workspace.at(tmp_path / "ws")
    for d in (ws.handlers, ws.scopes, ws.state, ws.work_areas / "a", ws.work_areas / "b"):
        d.mkdir(parents=True)
    for name, source in (
        ("files", FILES_HANDLER),
        ("net", NET_HANDLER),
        ("term", TERM_HANDLER),
        ("keys", KEYS_HANDLER),
    ):
        (ws.handlers / f"{name}.py").write_text(textwrap.dedent(source))
    (ws.scopes / "files.json").write_text(json.dumps({"version": "1.0", "description": "files"}))
    for pack in ("a", "b"):  # installed, declaring nothing: `rumi grant` takes any of their components
        (ws.ecosystem / pack).mkdir(parents=True)
        (ws.ecosystem / pack / "pack.json").write_text(json.dumps({"id": pack, "version": "1"}))
    return ws


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    d = tmp_path / "docs"
    d.mkdir()
    return d


runner = CliRunner()


def cli(ws: Workspace, *args: str) -> tuple[int, str, str]:
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    register(app)
    result = runner.invoke(app, [*args, "--root", str(ws.root)])
    assert "Traceback" not in result.output
    return result.exit_code, result.stdout, result.stderr


def grant_doc(ws: Workspace, component: str) -> dict:
    return json.loads(ws.grant_file(component).read_text())


def test_grant_creates_and_merges(
    ws: Workspace, docs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, out, _ = cli(ws, "grant", "a:tool:t", "files", "--dir", str(docs))
    assert code == 0 and "granted files to a:tool:t" in out
    assert grant_doc(ws, "a:tool:t") == {
        "component_id": "a:tool:t",
        "permissions": {"files": {"enabled": True, "directories": [str(docs)]}},
    }
    # A relative --dir is made absolute; a repeated one is not added twice.
    (tmp_path / "more").mkdir()
    monkeypatch.chdir(tmp_path)
    code, _, _ = cli(ws, "grant", "a:tool:t", "files", "--dir", "more", "--dir", str(docs))
    assert code == 0
    assert grant_doc(ws, "a:tool:t")["permissions"]["files"]["directories"] == [
        str(docs),
        str(tmp_path / "more"),
    ]
    code, _, _ = cli(
        ws, "grant", "a:tool:t", "net", "--domain", "api.example.com", "--port", "443", "--port", "8443"
    )
    assert code == 0
    code, _, _ = cli(ws, "grant", "a:tool:t", "term", "--dir", str(docs), "--shell")
    code2, _, _ = cli(ws, "grant", "a:tool:t", "keys", "--key", "OPENAI_API_KEY")
    assert code == 0 and code2 == 0
    perms = grant_doc(ws, "a:tool:t")["permissions"]
    assert perms["net"] == {
        "enabled": True,
        "allowed_domains": ["api.example.com"],
        "allowed_ports": [443, 8443],
    }
    assert perms["term"] == {"enabled": True, "directories": [str(docs)], "shell": True}
    assert perms["keys"] == {"enabled": True, "allowed_keys": ["OPENAI_API_KEY"]}
    # The broker's own loader accepts what the CLI wrote.
    pol = Policy.for_workspace(ws)
    assert pol.grants.errors == []
    assert pol.decide("a", "a:tool:t", "net").grant["allowed_ports"] == [443, 8443]
    assert not [p for p in ws.grants.iterdir() if p.name.endswith(".tmp")]  # no temp file left


def test_grant_reenables_a_disabled_entry(ws: Workspace, docs: Path) -> None:
    ws.grants.mkdir()
    ws.grant_file("a:tool:t").write_text(
        json.dumps(
            {
                "component_id": "a:tool:t",
                "permissions": {"files": {"enabled": False, "directories": [str(docs)]}},
            }
        )
    )
    assert cli(ws, "grant", "a:tool:t", "files")[0] == 0
    assert grant_doc(ws, "a:tool:t")["permissions"]["files"] == {"enabled": True, "directories": [str(docs)]}


REFUSALS = [
    # (args, expected part of the one-line error)
    (["grant", "a:tool:t", "files", "--dir", "{state}"], "is the protected workspace path"),
    (["grant", "a:tool:t", "files", "--dir", "{state}/sub"], "is inside the protected workspace path"),
    (["grant", "a:tool:t", "files", "--dir", "{root}"], "contains the protected workspace path"),
    (["grant", "a:tool:t", "files", "--dir", "{link}"], "is the protected workspace path"),
    (["grant", "a:tool:t", "files", "--dir", "{sandbox}/b"], "is the protected workspace path"),
    (["grant", "a:tool:t", "nosuch"], "unknown permission 'nosuch'; installed: files, keys, net, term"),
    (
        ["grant", "a:tool:t", "files", "--key", "X"],
        "files does not take --key (its grant keys: directories, enabled)",
    ),
    (["grant", "a:tool:t", "net", "--shell"], "net does not take --shell"),
    (["grant", "not-a-component", "files"], "must look like '<pack_id>:<type>:<name>'"),
    (["grant", "../x:tool:t", "files"], "pack id must match"),
    (["revoke", "a/b:tool:t"], "pack id must match"),
    (["grants", "bad"], "must look like"),
]


@pytest.mark.parametrize(("args", "expected"), REFUSALS)
def test_refusals_are_one_line(ws: Workspace, tmp_path: Path, args: list[str], expected: str) -> None:
    link = tmp_path / "link"
    link.symlink_to(ws.state)
    subst = {"state": str(ws.state), "root": str(ws.root), "link": str(link), "sandbox": str(ws.work_areas)}
    code, _, err = cli(ws, *[a.format(**subst) for a in args])
    assert code != 0
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert not ws.grants.exists() or not any(p.suffix == ".json" for p in ws.grants.iterdir())


def test_refused_grant_leaves_existing_file_unchanged(ws: Workspace, docs: Path) -> None:
    assert cli(ws, "grant", "a:tool:t", "files", "--dir", str(docs))[0] == 0
    before = ws.grant_file("a:tool:t").read_bytes()
    code, _, err = cli(ws, "grant", "a:tool:t", "files", "--dir", str(ws.state))
    assert code != 0 and "protected" in err
    assert ws.grant_file("a:tool:t").read_bytes() == before


def test_broken_handler_is_named(ws: Workspace) -> None:
    (ws.handlers / "broken.py").write_text("META = 1\n")
    code, _, err = cli(ws, "grant", "a:tool:t", "broken")
    assert code != 0 and "handler 'broken' is refused" in err and "META must be a dict" in err


def test_grant_on_unparseable_file_refused(ws: Workspace) -> None:
    ws.grants.mkdir()
    ws.grant_file("a:tool:t").write_text("{oops")
    code, _, err = cli(ws, "grant", "a:tool:t", "net")
    assert code != 0 and "not valid JSON" in err and "rumi revoke a:tool:t" in err


def test_revoke(ws: Workspace, docs: Path) -> None:
    cli(ws, "grant", "a:tool:t", "files", "--dir", str(docs))
    cli(ws, "grant", "a:tool:t", "net", "--domain", "example.com")
    pol = Policy.for_workspace(ws)
    pol.decide("a", "a:tool:t", "files")
    code, out, _ = cli(ws, "revoke", "a:tool:t", "files")
    assert code == 0 and "revoked files from a:tool:t" in out
    assert list(grant_doc(ws, "a:tool:t")["permissions"]) == ["net"]
    pol.refresh()
    with pytest.raises(Exception, match="no grant for files"):
        pol.decide("a", "a:tool:t", "files")
    code, out, _ = cli(ws, "revoke", "a:tool:t", "files")
    assert code == 0 and "nothing to revoke" in out
    code, out, _ = cli(ws, "revoke", "a:tool:t", "net")  # last permission: the file goes
    assert code == 0 and not ws.grant_file("a:tool:t").exists()
    cli(ws, "grant", "a:tool:t", "net")
    code, out, _ = cli(ws, "revoke", "a:tool:t")
    assert code == 0 and "revoked every permission" in out and not ws.grant_file("a:tool:t").exists()
    code, out, _ = cli(ws, "revoke", "a:tool:t")
    assert code == 0 and "nothing to revoke" in out
    # Revoking the whole component also works on a file too broken to parse.
    ws.grant_file("a:tool:t").write_text("{oops")
    assert cli(ws, "revoke", "a:tool:t")[0] == 0 and not ws.grant_file("a:tool:t").exists()


def test_grants_table_and_json(ws: Workspace, docs: Path) -> None:
    code, out, _ = cli(ws, "grants")
    assert code == 0 and "no grants" in out
    cli(ws, "grant", "a:tool:t", "files", "--dir", str(docs))
    cli(ws, "grant", "a:tool:t", "net", "--domain", "example.com", "--port", "443")
    ws.grant_file("b:tool:x").write_text(
        json.dumps({"component_id": "b:tool:x", "permissions": {"files": {"enabled": 1}}})
    )
    code, out, _ = cli(ws, "grants")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["COMPONENT", "PERMISSION", "STATUS", "FROM", "SETTINGS"]
    assert any(
        line.split()[:4] == ["a:tool:t", "files", "enabled", "own"] and str(docs) in line for line in lines
    )
    assert any("allowed_domains=example.com" in line and "allowed_ports=443" in line for line in lines)
    assert any(line.split()[:3] == ["b:tool:x", "files", "invalid"] for line in lines)
    assert any(
        line.startswith("invalid (component denied): ") and "$.permissions.files.enabled" in line
        for line in lines
    )

    code, out, _ = cli(ws, "grants", "--json")
    data = json.loads(out)
    by_id = {g["component_id"]: g for g in data["grants"]}
    assert by_id["a:tool:t"]["valid"] is True and by_id["a:tool:t"]["active"] == ["files", "net"]
    assert (
        by_id["b:tool:x"]["valid"] is False and "Expected `bool`, got `int`" in by_id["b:tool:x"]["errors"][0]
    )

    code, out, _ = cli(ws, "grants", "b:tool:x", "--json")
    assert [g["component_id"] for g in json.loads(out)["grants"]] == ["b:tool:x"]
    code, out, _ = cli(ws, "grants", "a:tool:nothing")
    assert code == 0 and "a:tool:nothing has no grants" in out


def test_root_from_environment(ws: Workspace, docs: Path) -> None:
    app = typer.Typer(add_completion=False)
    register(app)
    result = runner.invoke(
        app, ["grant", "a:tool:t", "files", "--dir", str(docs)], env={"RUMI_ROOT": str(ws.root)}
    )
    assert result.exit_code == 0, result.output
    assert ws.grant_file("a:tool:t").is_file()


def test_help() -> None:
    app = typer.Typer(add_completion=False)
    register(app)
    for command in ("grant", "revoke", "grants"):
        result = runner.invoke(app, [command, "--help"])
        assert result.exit_code == 0 and "--root" in result.output
