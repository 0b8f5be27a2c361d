"""Repository invariants: public API, the repo's own workspace in step with the shipped defaults, lint, types."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_sdk_public_api_is_exactly_this() -> None:
    import pack_runtime

    assert sorted(pack_runtime.__all__) == [
        "BrokerError",
        "BrokerTransport",
        "Context",
        "HttpStream",
        "Pack",
        "PermissionDenied",
        "StreamLimits",
        "ToolError",
    ]
    for name in pack_runtime.__all__:
        assert getattr(pack_runtime, name) is not None


def test_sdk_never_imports_the_broker() -> None:
    code = "import sys, pack_runtime, pack_runtime._pack; sys.exit(any(m.split('.')[0] == 'broker' for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], cwd="/").returncode == 0


def test_docker_dir_is_not_a_package() -> None:
    assert not (REPO / "docker" / "__init__.py").exists()


def _generated(path: Path, root: Path) -> bool:
    """Inside a directory that `rumi build` generates (it holds a .gitignore of `*`)."""
    for parent in path.parents:
        marker = parent / ".gitignore"
        if marker.is_file() and [
            ln for ln in marker.read_text().splitlines() if ln.strip() and not ln.startswith("#")
        ] == ["*"]:
            return True
        if parent == root:
            return False
    return False


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
        and "__pycache__" not in p.parts
        and p.name not in {"__init__.py", ".dockerignore"}
        and not _generated(p, root)
    }


@pytest.mark.parametrize(
    ("shipped", "workspace"),
    [
        ("config/handlers", "docker/handlers"),
        ("config/scopes", "docker/scopes"),
        ("config/base", "docker/base"),
        ("config/ecosystem/default", "ecosystem/default"),
    ],
)
def test_repository_workspace_is_in_step_with_shipped_defaults(shipped: str, workspace: str) -> None:
    """The repo's own docker/ is a workspace made by `rumi init`; `rumi init --force` refreshes it."""
    src, dst = REPO / shipped, REPO / workspace
    assert src.is_dir(), f"{shipped} is missing from the repository"
    assert _files(src) == _files(dst), f"{workspace} differs from {shipped}: run `rumi init --force --root .`"


def test_repository_config_json_matches_shipped() -> None:
    assert (REPO / "config" / "config.json").read_bytes() == (REPO / "docker" / "config.json").read_bytes()


def test_ruff_is_clean() -> None:
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is a dev dependency (requirements.lock)"
    out = subprocess.run([ruff, "check", "broker", "pack_runtime", "tests", "config/handlers"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:]


def test_mypy_strict_is_clean() -> None:
    out = subprocess.run([sys.executable, "-m", "mypy"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:]
    # The shipped handlers are part of the run (pyproject's [tool.mypy] files), not left out.
    mypy_files = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mypy"]["files"]
    assert "config/handlers" in mypy_files
