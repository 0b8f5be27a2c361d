"""A copy of the repository's source tree, for tests that build or install from it (test_wheel, test_install)."""

from __future__ import annotations

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Not source (top level of the repository): VCS, environments, caches, build output.
NOT_SOURCE = {
    ".git",
    ".venv",
    "venv",
    "build",
    "dist",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    ".hypothesis",
}
# docker/ is the repository's own workspace: its runtime state (gitignored) is not copied.
WORKSPACE_STATE = {".rumi", "packs", "sandbox", "grants"}


def not_source(directory: str, names: list[str], *, bytecode: bool = True) -> set[str]:
    """What `shutil.copytree` leaves out: top-level clutter, the workspace's runtime state and, with
    `bytecode=False`, every `__pycache__`."""
    here = Path(directory)
    if here == REPO:
        return {n for n in names if n in NOT_SOURCE or n.endswith(".egg-info")}
    if here == REPO / "docker":
        return WORKSPACE_STATE & set(names)
    return set() if bytecode else {n for n in names if n == "__pycache__"}


def copy_source(dest: Path, *, bytecode: bool = True) -> None:
    """Copy the repository's source to `dest` (symlinks kept as links)."""
    shutil.copytree(
        REPO, dest, ignore=lambda d, names: not_source(d, names, bytecode=bytecode), symlinks=True
    )
