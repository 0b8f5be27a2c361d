"""Refresh the repository's own workspace (docker/, ecosystem/) from config/, the one place to edit.

Usage: .venv/bin/python scripts/sync-workspace.py [--check]      (`just sync-workspace [--check]`)

What is shipped, and where it goes, is decided by the project's own code path: `rumi init`, run with
this tree's broker/ and this tree's config/ as `broker._defaults`, writes a fresh workspace into a
temporary directory. Its shipped files (docker/handlers, docker/scopes, docker/base, docker/config.json,
ecosystem/default) are copied over the repository's copies, and files those directories hold that
config/ no longer has are removed. The result is `rumi init --force --root .` plus the removal of stale
copies, without creating runtime state in the repository: docker/.rumi/, grants/, sandbox/ and packs/
(the workspace's .gitignore), other Packs under ecosystem/, generated directories (a .gitignore of `*`,
made by `rumi build`), __init__.py and .dockerignore files are never touched.

--check changes nothing: it lists what differs and exits 1 if anything does.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import sys
import tempfile
from importlib import resources
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LEFT_ALONE = {"__init__.py", ".dockerignore"}  # never written by `rumi init` (as in tests/test_repo.py)


def _use_this_tree() -> None:
    """Import broker/ from this repository, with this repository's config/ as `broker._defaults`."""
    sys.dont_write_bytecode = True
    sys.path.insert(0, str(REPO))
    import broker

    config = REPO / "config"
    spec = importlib.util.spec_from_file_location(
        "broker._defaults", config / "__init__.py", submodule_search_locations=[str(config)]
    )
    assert spec is not None and spec.loader is not None
    defaults = importlib.util.module_from_spec(spec)
    sys.modules["broker._defaults"] = defaults
    spec.loader.exec_module(defaults)
    broker._defaults = defaults  # type: ignore[attr-defined]
    code = Path(broker.__file__ or "").resolve().parent
    shipped = Path(str(resources.files("broker._defaults"))).resolve()
    if code != (REPO / "broker").resolve() or shipped != config.resolve():
        raise SystemExit(
            f"sync-workspace: would use broker from {code}, defaults from {shipped}; expected {REPO}"
        )


def _rumi_init(root: Path) -> None:
    from broker.cli import main

    argv, out = sys.argv, io.StringIO()
    sys.argv = ["rumi", "init", "--root", str(root)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            main()
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise SystemExit(f"sync-workspace: rumi init failed ({exc.code}):\n{out.getvalue()}") from None
    finally:
        sys.argv = argv


def _generated(path: Path, root: Path) -> bool:
    """Inside a directory `rumi build` generates: it holds a .gitignore whose only rule is `*`."""
    for parent in path.parents:
        marker = parent / ".gitignore"
        if marker.is_file():
            rules = [line.strip() for line in marker.read_text().splitlines()]
            if [r for r in rules if r and not r.startswith("#")] == ["*"]:
                return True
        if parent == root:
            return False
    return False


def _files(root: Path) -> set[str]:
    """Files under root (relative, posix) that a workspace's sources hold."""
    if not root.is_dir():
        return set()
    return {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file()
        and "__pycache__" not in p.parts
        and p.suffix != ".pyc"
        and p.name not in LEFT_ALONE
        and not _generated(p, root)
    }


def _shipped(fresh: Path) -> dict[str, bytes]:
    """Files a fresh `rumi init` writes, minus the runtime state its docker/.gitignore names."""
    gitignore = fresh / "docker" / ".gitignore"
    runtime = {
        "docker/" + line.strip().strip("/")
        for line in (gitignore.read_text().splitlines() if gitignore.is_file() else [])
        if line.strip() and not line.startswith("#")
    }
    return {
        rel: (fresh / rel).read_bytes()
        for rel in sorted(_files(fresh))
        if rel != "docker/.gitignore" and not any(rel == r or rel.startswith(r + "/") for r in runtime)
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if anything differs")
    args = parser.parse_args()

    _use_this_tree()
    with tempfile.TemporaryDirectory(prefix="rumi-sync-") as tmp:
        fresh = Path(tmp)
        _rumi_init(fresh)
        shipped = _shipped(fresh)
        gitignore_fresh = (fresh / "docker" / ".gitignore").read_bytes()

    changes: list[tuple[str, str]] = []
    for rel, data in shipped.items():
        target = REPO / rel
        if not target.is_file():
            changes.append(("add", rel))
        elif target.read_bytes() != data:
            changes.append(("update", rel))
    # Directories the workspace mirrors (docker/handlers, ecosystem/default, ...), not docker/ itself.
    mirrored = sorted({"/".join(rel.split("/")[:2]) for rel in shipped if rel.count("/") >= 2})
    for top in mirrored:
        for rel in sorted(_files(REPO / top)):
            if f"{top}/{rel}" not in shipped:
                changes.append(("remove", f"{top}/{rel}"))

    verb = "would " if args.check else ""
    for action, rel in changes:
        print(f"  {verb}{action} {rel}")
        if args.check:
            continue
        target = REPO / rel
        if action == "remove":
            target.unlink()
            parent = target.parent
            while (
                parent != REPO
                and not any(parent.iterdir())
                and parent.relative_to(REPO).as_posix() not in mirrored
            ):
                parent.rmdir()
                parent = parent.parent
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(shipped[rel])
    ws_gitignore = REPO / "docker" / ".gitignore"
    if ws_gitignore.is_file() and ws_gitignore.read_bytes() != gitignore_fresh:
        print(
            "  note: docker/.gitignore differs from what `rumi init` writes (rumi init never overwrites it)"
        )

    where = ", ".join(mirrored + sorted(r for r in shipped if r.count("/") < 2))
    if not changes:
        print(f"sync-workspace: in step with config/ ({where})")
        return 0
    done = {"update": "updated", "add": "added", "remove": "removed"}
    counts = {a: sum(1 for x, _ in changes if x == a) for a in done}
    summary = ", ".join(f"{n} to {a}" if args.check else f"{n} {done[a]}" for a, n in counts.items() if n)
    print(f"sync-workspace: {'out of step with config/: ' if args.check else ''}{summary} ({where})")
    return 1 if args.check else 0


if __name__ == "__main__":
    sys.exit(main())
