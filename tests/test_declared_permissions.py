"""Declared permissions: a Pack's pack.json `permissions` block, `rumi review`, `rumi grant --from-pack`,
`rumi grant` refusing components no Pack has, and `rumi init` granting the example Pack's declaration.

Everything runs on a workspace made by `rumi init` (the shipped handlers and scopes, loaded as the broker
loads them), through the real CLI app; what is written is read back with the broker's own Policy.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from broker.admin.init import init_workspace
from broker.cli import app
from broker.core.errors import Denied, WorkspaceError
from broker.core.ids import parse_component_id
from broker.core.manifest import expand_declared, load_manifest, manifest_schema, manifest_schema_text
from broker.core.workspace import Workspace
from broker.policy.grants import Policy

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def rumi(ws: Workspace, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
    done = runner.invoke(app, [*args, "--root", str(ws.root)], input=stdin)
    assert "Traceback" not in done.output, done.output
    return done.exit_code, done.stdout, done.stderr


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def write_pack(ws: Workspace, pack_id: str, permissions: Any = None, **extra: Any) -> Path:
    doc: dict[str, Any] = {"id": pack_id, "version": "1.0.0", **extra}
    if permissions is not None:
        doc["permissions"] = permissions
    path = ws.pack_source(pack_id) / "pack.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def grant_json(ws: Workspace, component: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(ws.grant_file(component).read_text())
    return doc


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    workspace = Workspace.at(tmp_path / "ws")
    init_workspace(workspace)
    return workspace


# --- the manifest ------------------------------------------------------------------------------------


def test_a_declaration_loads_and_expands(ws: Workspace) -> None:
    write_pack(
        ws,
        "notes",
        {
            "notes:tool:search": {
                "file_read": {
                    "directories": ["$RUMI_SANDBOX", "$RUMI_SANDBOX/index", "~/notes", "/srv"],
                    "reason": "reads its index",
                },
            },
            "notes:*": {"network": {"allowed_domains": ["api.example.com:443"], "reason": "fetches notes"}},
        },
    )
    manifest = load_manifest(ws, "notes")
    assert manifest.permissions is not None and set(manifest.permissions) == {"notes:tool:search", "notes:*"}
    entry = manifest.permissions["notes:tool:search"]["file_read"]
    work_area = ws.pack_work_area("notes")
    assert expand_declared({k: v for k, v in entry.items() if k != "reason"}, work_area) == {
        "directories": [str(work_area), str(work_area / "index"), os.path.expanduser("~/notes"), "/srv"]
    }
    # A Pack without the block still loads, with no declarations (the contract's pack.json).
    assert load_manifest(ws, "default").permissions is not None
    write_pack(ws, "plain")
    assert load_manifest(ws, "plain").permissions is None


BAD_BLOCKS = [
    (
        {"x:tool:t": {"env_read": {"allowed_keys": ["K"], "reason": "r"}}},
        "belongs to pack 'x', not to this Pack",
    ),
    ({"bad": {"env_read": {"reason": "r"}}}, "must look like '<pack_id>:<type>:<name>' or '<pack_id>:*'"),
    ({"p:tool:t": {"Env": {"reason": "r"}}}, "capability 'Env' must match"),
    ({"p:tool:t": {"env_read": {"allowed_keys": ["K"]}}}, "needs a `reason`"),
    ({"p:tool:t": {"env_read": {"reason": "  "}}}, "needs a `reason`"),
    ({"p:tool:t": {"env_read": {"reason": "x" * 501}}}, "reason is longer than 500 characters"),
    ({"p:tool:t": {"env_read": {"reason": "r", "enabled": True}}}, "a declaration is not a grant"),
    ({"p:tool:t": {"env_read": ["K"]}}, "Expected `object`, got `array`"),
    ({f"p:tool:t{i}": {} for i in range(65)}, "more than 64 components"),
]


@pytest.mark.parametrize(("block", "expected"), BAD_BLOCKS)
def test_a_malformed_block_is_one_line_naming_where(ws: Workspace, block: Any, expected: str) -> None:
    write_pack(ws, "p", block)
    with pytest.raises(WorkspaceError) as refused:
        load_manifest(ws, "p")
    message = str(refused.value)
    assert "\n" not in message and "pack.json" in message and expected in message, message
    assert "$.permissions" in message


def test_an_oversized_manifest_is_refused(ws: Workspace) -> None:
    write_pack(ws, "big", description="x" * 300_000)
    with pytest.raises(WorkspaceError, match="larger than 256 KiB"):
        load_manifest(ws, "big")


def test_committed_schema_is_current_and_its_key_pattern_agrees_with_the_loader() -> None:
    committed = REPO / "config" / "schema" / "pack.schema.json"
    assert committed.read_text() == manifest_schema_text(), "stale: run `python -m broker.core.manifest`"
    schema = manifest_schema()
    key = re.compile(schema["properties"]["permissions"]["propertyNames"]["pattern"])
    for text in ("a:tool:t", "a:*", "a:pack:_", "a-b:type_x:Name-1", "a:tool", "a:*:x", "A:tool:t", "*", "a:**",
                 "a:tool:t:u", "a:Tool:t", "a:tool:1x"):  # fmt: skip
        try:
            parse_component_id(text, pack_wide=True)
            valid = True
        except ValueError:
            valid = False
        assert bool(key.match(text)) == valid, text
    assert schema["$defs"]["DeclaredPermission"]["required"] == ["reason"]
    # The example Pack's pack.json follows the schema's shape (keys, reasons, no `enabled`).
    example = json.loads((REPO / "config" / "ecosystem" / "default" / "pack.json").read_text())
    assert set(example) <= set(schema["properties"])
    for component, capabilities in example["permissions"].items():
        assert key.match(component)
        for entry in capabilities.values():
            assert entry["reason"].strip() and "enabled" not in entry


# --- `rumi grant` names a component that exists --------------------------------------------------------


def test_grant_refuses_a_component_no_pack_has(ws: Workspace) -> None:
    before = sorted(p.name for p in ws.grants.iterdir())
    # The issue's own example: the example Pack declares its permissions and has no tool `other`.
    code, _, err = rumi(ws, "grant", "default:tool:other", "env_read", "--key", "HOME")
    assert code == 2
    line = one_line_error(err)
    assert (
        "does not declare default:tool:other" in line and "default:tool:my_tool" in line and "--force" in line
    )
    code, _, err = rumi(ws, "grant", "nosuch:tool:t", "env_read", "--key", "HOME")
    assert code == 2 and "pack 'nosuch' is not installed" in one_line_error(err)
    code, _, err = rumi(ws, "grant", "nosuch:*", "env_read", "--key", "HOME")
    assert code == 2 and "pack 'nosuch' is not installed" in one_line_error(err)
    write_pack(ws, "broken", {"broken:tool:t": {"env_read": {}}})
    code, _, err = rumi(ws, "grant", "broken:tool:t", "env_read", "--key", "K")
    assert code == 2 and "needs a `reason`" in one_line_error(err) and "--force" in err
    assert sorted(p.name for p in ws.grants.iterdir()) == before  # nothing written

    # --force overrides, and the result is a grant the broker loads.
    code, out, _ = rumi(ws, "grant", "default:tool:other", "env_read", "--key", "HOME", "--force")
    assert code == 0 and "granted env_read to default:tool:other" in out
    assert Policy.for_workspace(ws).decide("default", "default:tool:other", "env_read").grant[
        "allowed_keys"
    ] == ["HOME"]


def test_grant_takes_declared_components_the_proxy_component_and_the_pack_and_warns_when_undeclared(
    ws: Workspace,
) -> None:
    code, _, err = rumi(ws, "grant", "default:tool:my_tool", "env_read", "--key", "RUMI_DEMO_GREETING")
    assert code == 0 and err == ""  # declared: no warning
    code, _, err = rumi(ws, "grant", "default:tool:my_tool", "network", "--domain", "api.example.com:443")
    assert code == 0 and "does not declare network for default:tool:my_tool: granted anyway" in err
    for target in ("default:pack:_", "default:*"):
        code, _, err = rumi(ws, "grant", target, "env_read", "--key", "K")
        assert code == 0 and f"does not declare env_read for {target}" in err, err
    # A Pack without a `permissions` block: any of its components, as before.
    write_pack(ws, "plain")
    code, _, err = rumi(ws, "grant", "plain:tool:anything", "env_read", "--key", "K")
    assert code == 0 and err == ""


# --- `rumi review` -----------------------------------------------------------------------------------


RISKY_PERMISSIONS = {
    "risky:tool:t": {
        "network": {"allowed_domains": ["*", "*.example.com", "0.0.0.0/0"], "allowed_ports": [443],
                    "allow_wide_networks": True, "reason": "talks to anything"},
        "file_read": {"directories": ["/"], "reason": "reads everything"},
        "terminal": {"directories": ["$RUMI_SANDBOX"], "shell": True, "reason": "runs scripts"},
        "file_write": {"directories": ["~"], "reason": "writes into the home directory"},
    },
    "risky:tool:quiet": {"env_read": {"allowed_keys": ["K"], "reason": "one key"}},
}  # fmt: skip


def test_review_flags_risky_entries(ws: Workspace) -> None:
    write_pack(ws, "risky", RISKY_PERMISSIONS)
    code, out, _ = rumi(ws, "review", "risky", "--json")
    assert code == 0
    review = json.loads(out)
    rows = {(r["component_id"], r["capability"]): r for r in review["rows"]}
    assert all(r["status"] == "not granted" for r in rows.values())
    risks = {key: " | ".join(r["risks"]) for key, r in rows.items()}
    network = risks[("risky:tool:t", "network")]
    assert "'*': any host on the internet" in network and "every name under example.com" in network
    assert "'0.0.0.0/0' is wider than /8" in network and "allow_wide_networks: true" in network
    assert "'/': the whole file system" in risks[("risky:tool:t", "file_read")]
    assert "a home directory" in risks[("risky:tool:t", "file_write")]
    assert "shell: true" in risks[("risky:tool:t", "terminal")]
    assert risks[("risky:tool:quiet", "env_read")] == ""
    assert review["risky"] == 4
    # `/` is also refused outright: it contains the workspace's own state.
    assert any("directory '/' contains the protected workspace path" in p for p in review["problems"])
    # The same in the text, one RISKY line per finding.
    code, out, _ = rumi(ws, "review", "risky")
    assert code == 0 and out.count("RISKY:") == 7 and "declares 5 permission(s)" in out


def test_review_compares_declared_with_granted(ws: Workspace) -> None:
    sandbox = ws.pack_work_area("default")
    # As `rumi init` made it: everything as declared.
    code, out, _ = rumi(ws, "review", "default", "--json")
    rows = {(r["component_id"], r["capability"]): r for r in json.loads(out)["rows"]}
    assert {k: r["status"] for k, r in rows.items()} == {
        ("default:tool:my_tool", cap): "as declared"
        for cap in ("env_read", "file_read", "file_write", "terminal")
    }
    assert rows[("default:tool:my_tool", "file_read")]["declared"] == {"directories": [str(sandbox)]}
    assert rows[("default:tool:my_tool", "env_read")]["reason"].startswith("reads the demo greeting")
    # More, less, undeclared, and one granted only through the Pack-wide grant.
    assert rumi(ws, "grant", "default:tool:my_tool", "terminal", "--shell")[0] == 0
    assert rumi(ws, "grant", "default:tool:my_tool", "env_read", "--key", "HOME")[0] == 0
    doc = grant_json(ws, "default:tool:my_tool")
    doc["permissions"]["file_read"]["directories"] = [str(sandbox / "sub")]
    doc["permissions"]["file_write"]["enabled"] = False
    ws.grant_file("default:tool:my_tool").write_text(json.dumps(doc))
    assert rumi(ws, "grant", "default:*", "network", "--domain", "api.example.com:443")[0] == 0
    code, out, _ = rumi(ws, "review", "default", "--json")
    rows = {(r["component_id"], r["capability"]): r for r in json.loads(out)["rows"]}
    mine = {cap: r for (c, cap), r in rows.items() if c == "default:tool:my_tool"}
    assert mine["terminal"]["status"] == "more than declared" and mine["terminal"]["differences"] == [
        "shell=true"
    ]
    assert mine["terminal"]["risks"] == ["shell: true runs any command through a shell or interpreter"]
    assert mine["env_read"]["status"] == "more than declared" and mine["env_read"]["differences"] == [
        "allowed_keys +HOME"
    ]
    assert mine["file_read"]["status"] == "more than declared"  # another directory, however near
    assert mine["file_read"]["differences"] == [f"directories +{sandbox / 'sub'}", f"directories -{sandbox}"]
    assert mine["file_write"]["status"] == "not granted"  # switched off
    assert mine["network"]["status"] == "not declared" and mine["network"]["source"] == "default:*"
    assert rows[("default:*", "network")]["status"] == "not declared"
    # Text: per component, the Pack-wide source named.
    code, out, _ = rumi(ws, "review", "default")
    assert code == 0 and "from the Pack-wide grant default:*" in out and "MORE THAN DECLARED" in out


def test_review_names_a_narrower_grant_and_refused_declarations(ws: Workspace) -> None:
    write_pack(ws, "p", {
        "p:tool:t": {"env_read": {"allowed_keys": ["A", "B"], "reason": "two keys"},
                     "file_read": {"directories": ["$RUMI_SANDBOX/../../.rumi"], "reason": "sneaky"}},
    })  # fmt: skip
    assert rumi(ws, "grant", "p:tool:t", "env_read", "--key", "A")[0] == 0
    code, out, _ = rumi(ws, "review", "p", "--json")
    assert code == 0
    review = json.loads(out)
    rows = {r["capability"]: r for r in review["rows"]}
    assert rows["env_read"]["status"] == "less than declared" and rows["env_read"]["differences"] == [
        "allowed_keys -B"
    ]
    (problem,) = review["problems"]
    assert "declared for p:tool:t" in problem and "protected workspace path" in problem


def test_review_usage_errors_are_one_line(ws: Workspace) -> None:
    code, _, err = rumi(ws, "review", "Not-A-Pack")
    assert code == 2 and "is not a pack id" in one_line_error(err)
    code, _, err = rumi(ws, "review", "missing")
    assert code == 2 and "pack.json: not found" in one_line_error(err)


# --- `rumi grant --from-pack` ------------------------------------------------------------------------


def test_from_pack_shows_the_review_asks_and_grants_exactly_the_declaration(ws: Workspace) -> None:
    write_pack(ws, "notes", {
        "notes:tool:search": {
            "file_read": {"directories": ["$RUMI_SANDBOX"], "reason": "reads its index"},
            "env_read": {"allowed_keys": ["NOTES_TOKEN"], "reason": "the notes API token"},
        },
        "notes:*": {"network": {"allowed_domains": ["api.notes.example:443"], "reason": "the notes API"}},
    })  # fmt: skip
    # An entry already there for a declared capability is replaced; other entries stay.
    assert rumi(ws, "grant", "notes:tool:search", "env_read", "--key", "EXTRA")[0] == 0
    assert (
        rumi(ws, "grant", "notes:tool:search", "terminal", "--dir", str(ws.pack_work_area("notes")))[0] == 0
    )

    code, out, err = rumi(ws, "grant", "--from-pack", "notes", stdin="n\n")
    assert code == 1 and "not confirmed: nothing granted" in err
    assert "notes:tool:search" in out and "reads its index" in out and "Grant exactly these 3" in out
    assert not ws.grant_file("notes:*").exists()
    assert grant_json(ws, "notes:tool:search")["permissions"]["env_read"]["allowed_keys"] == ["EXTRA"]

    code, out, _ = rumi(ws, "grant", "--from-pack", "notes", stdin="y\n")
    assert code == 0 and "granted network to notes:*" in out
    permissions = grant_json(ws, "notes:tool:search")["permissions"]
    assert permissions["file_read"] == {"enabled": True, "directories": [str(ws.pack_work_area("notes"))]}
    assert permissions["env_read"] == {"enabled": True, "allowed_keys": ["NOTES_TOKEN"]}
    assert "terminal" in permissions
    assert grant_json(ws, "notes:*")["permissions"] == {
        "network": {"enabled": True, "allowed_domains": ["api.notes.example:443"]}
    }
    policy = Policy.for_workspace(ws)
    assert policy.errors == []
    decision = policy.decide("notes", "notes:pack:_", "network")  # the proxy's, through the Pack-wide grant
    assert decision.source == "notes:*" and decision.grant["allowed_domains"] == ["api.notes.example:443"]
    code, out, _ = rumi(ws, "review", "notes", "--json")
    assert all(r["status"] == "as declared" for r in json.loads(out)["rows"] if r["capability"] != "terminal")


def test_from_pack_is_all_or_nothing_and_checks_its_options(ws: Workspace) -> None:
    write_pack(ws, "p", {
        "p:tool:a": {"env_read": {"allowed_keys": ["K"], "reason": "fine"}},
        "p:tool:b": {"file_read": {"directories": ["$RUMI_SANDBOX/../../.rumi"], "reason": "reaches state"}},
    })  # fmt: skip
    code, _, err = rumi(ws, "grant", "--from-pack", "p", "--yes")
    assert code == 2 and "protected workspace path" in one_line_error(err) and "nothing granted" in err
    assert not ws.grant_file("p:tool:a").exists() and not ws.grant_file("p:tool:b").exists()

    write_pack(ws, "q", {"q:tool:a": {"no_such_capability": {"reason": "r"}}})
    code, _, err = rumi(ws, "grant", "--from-pack", "q", "--yes")
    assert code == 2 and "no such handler is installed" in one_line_error(err)
    write_pack(ws, "plain")
    code, _, err = rumi(ws, "grant", "--from-pack", "plain", "--yes")
    assert code == 2 and "declares no permissions" in one_line_error(err)
    for args, expected in (
        (["--from-pack", "default", "default:tool:my_tool"], "give no COMPONENT, PERMISSION"),
        (["--from-pack", "default", "--key", "K"], "give no COMPONENT, PERMISSION"),
        (["--from-pack", "default", "--json"], "cannot ask: add --yes"),
        (["--from-pack", "Bad"], "is not a pack id"),
        ([], "give COMPONENT and PERMISSION"),
        (["default:tool:my_tool", "env_read", "--yes"], "--yes only applies to --from-pack"),
    ):
        code, _, err = rumi(ws, "grant", *args)
        assert code == 2 and expected in one_line_error(err), (args, err)


def test_from_pack_json_with_yes(ws: Workspace) -> None:
    code, out, err = rumi(ws, "grant", "--from-pack", "default", "--yes", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert sorted((g["component_id"], g["permission"]) for g in data["granted"]) == [
        ("default:tool:my_tool", cap) for cap in ("env_read", "file_read", "file_write", "terminal")
    ]
    assert data["review"]["pack_id"] == "default" and all(g["reason"] for g in data["granted"])


# --- `rumi init` ---------------------------------------------------------------------------------------


def test_init_grants_the_example_packs_declaration_and_never_overwrites(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path / "fresh")
    written = init_workspace(ws)
    tool = ws.grant_file("default:tool:my_tool")
    assert tool in written
    sandbox = str(ws.pack_work_area("default"))
    assert grant_json(ws, "default:tool:my_tool")["permissions"] == {
        "file_write": {"enabled": True, "directories": [sandbox]},
        "file_read": {"enabled": True, "directories": [sandbox]},
        "env_read": {"enabled": True, "allowed_keys": ["RUMI_DEMO_GREETING"]},
        "terminal": {"enabled": True, "directories": [sandbox]},
    }
    policy = Policy.for_workspace(ws)
    assert policy.errors == []
    assert policy.decide("default", "default:tool:my_tool", "terminal").grant.get("shell") is False
    with pytest.raises(Denied):
        policy.decide("default", "default:pack:_", "env_read")  # declared for the tool only
    # A second init leaves the user's grant alone.
    tool.write_text(json.dumps({"component_id": "default:tool:my_tool", "permissions": {}}))
    assert tool not in init_workspace(ws)
    assert grant_json(ws, "default:tool:my_tool")["permissions"] == {}
