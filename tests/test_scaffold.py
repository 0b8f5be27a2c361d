"""`rumi new PACK`: a Pack from the shipped templates whose own tests pass with no NATS and no Docker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from broker.admin.init import init_workspace
from broker.admin.scaffold import InvalidPackId, PackExists, new_pack, template_files
from broker.cli import app
from broker.containers.packimage import parse_requirements
from broker.core.manifest import load_manifest
from broker.core.workspace import Workspace

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    workspace = Workspace.at(tmp_path / "ws")
    init_workspace(workspace)
    return workspace


def test_new_creates_a_pack_the_broker_accepts(ws: Workspace) -> None:
    result = CliRunner().invoke(app, ["new", "notes", "--root", str(ws.root), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    src = ws.pack_source("notes")
    assert report["directory"] == str(src)
    assert sorted(Path(f).name for f in report["files"]) == [
        "main.py",
        "pack.json",
        "requirements.txt",
        "test_main.py",
    ]
    manifest = load_manifest(ws, "notes")
    assert (manifest.id, manifest.entrypoint) == ("notes", "main.py")
    assert parse_requirements((src / "requirements.txt").read_text()) == []
    main = (src / "main.py").read_text()
    assert "{{" not in main and '"notes:tool:greet"' in main
    compile(main, "main.py", "exec")
    assert "notes" in ws.pack_ids()
    # Nothing half-made is left beside it.
    assert sorted(p.name for p in ws.ecosystem.iterdir()) == ["default", "notes"]


def test_new_pack_tests_pass_without_nats_or_docker(ws: Workspace) -> None:
    assert CliRunner().invoke(app, ["new", "notes", "--root", str(ws.root)]).exit_code == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUMI_", "DOCKER_", "NATS_"))}
    env["DOCKER_HOST"] = "unix:///nonexistent/docker.sock"  # any Docker use would fail
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "ecosystem/notes", "-q", "-p", "no:cacheprovider"],
        cwd=ws.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "5 passed" in result.stdout


def test_new_pack_code_is_lint_clean(ws: Workspace) -> None:
    new_pack(ws, "notes")
    ruff = Path(sys.executable).with_name("ruff")
    result = subprocess.run(
        [
            str(ruff),
            "check",
            "--isolated",
            "--select",
            "E,F,W,I,B,UP",
            "--line-length",
            "110",
            "ecosystem/notes",
        ],
        cwd=ws.root,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("bad", ["Notes", "9lives", "a.b", "x" * 33, "a b", "", "é"])
def test_bad_ids_are_one_line_usage_errors(ws: Workspace, bad: str) -> None:
    result = CliRunner().invoke(app, ["new", bad, "--root", str(ws.root)])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and result.output.startswith("error: ")
    assert "not a valid pack id" in result.output
    assert sorted(p.name for p in ws.ecosystem.iterdir()) == ["default"]


def test_an_existing_directory_is_kept(ws: Workspace) -> None:
    before = (ws.pack_source("default") / "main.py").read_bytes()
    result = CliRunner().invoke(app, ["new", "default", "--root", str(ws.root)])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "already exists" in result.output
    assert (ws.pack_source("default") / "main.py").read_bytes() == before
    (ws.ecosystem / "stray").write_text("a file, not a directory")
    with pytest.raises(PackExists):
        new_pack(ws, "stray")
    with pytest.raises(InvalidPackId):
        new_pack(ws, "UPPER")


def test_no_workspace_says_to_init(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["new", "notes", "--root", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "rumi init" in result.output
    assert not (tmp_path / "nothing").exists()


def test_templates_ship_as_package_data() -> None:
    files = template_files()
    assert sorted(files) == ["main.py", "pack.json", "requirements.txt", "test_main.py"]
    shipped = sorted(p.name for p in (REPO / "config" / "templates" / "pack").iterdir())
    assert shipped == sorted(f"{name}.tmpl" for name in files)
