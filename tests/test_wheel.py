"""`pip install .` ships the whole tree: every package of broker/ and pack_runtime/, every file of config/.

The wheel is built from a copy of the working tree (so a stale build/ or egg-info in the repository
cannot leak in, and nothing is written into the repository), installed with `pip install --target`
into a temporary directory, and imported from there by a separate interpreter whose working
directory is outside the repository. The expected lists come from the repository tree at test time.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from ._source import copy_source

TOP_PACKAGES = ("broker", "pack_runtime")
# Named explicitly (the CLI entry point, the handler API, the defaults); the rest is compared with the tree.
MUST_IMPORT = ("broker.cli", "broker.handler_api", "broker._defaults", "pack_runtime")
# broker._defaults is config/ (pyproject.toml [tool.setuptools.package-dir]).
MUST_SHIP = ("handlers/file_read.py", "scopes", "schema", "base/Dockerfile", "ecosystem/default/pack.json")
# Runs in the installed location: imports every module the wheel holds, lists broker._defaults.
_CHILD = r"""
import importlib, json, pkgutil, sys
from importlib import resources

site = sys.argv[1]
sys.path.insert(0, site)
out = {"modules": {}, "errors": {}, "defaults": [], "defaults_root": ""}


def failed(name):
    out["errors"][name] = repr(sys.exc_info()[1])


for top in ("broker", "pack_runtime"):
    try:
        pkg = importlib.import_module(top)
    except Exception:
        failed(top)
        continue
    out["modules"][top] = pkg.__file__
    for info in pkgutil.walk_packages(pkg.__path__, top + ".", onerror=failed):
        if info.name.rsplit(".", 1)[-1] == "__main__":  # runs the CLI / a Pack when imported
            continue
        try:
            out["modules"][info.name] = importlib.import_module(info.name).__file__
        except Exception:
            failed(info.name)


def walk(node, prefix):
    for item in node.iterdir():
        if item.name == "__pycache__":  # pip compiles at install time
            continue
        if item.is_dir():
            walk(item, prefix + item.name + "/")
        else:
            out["defaults"].append(prefix + item.name)


try:
    root = resources.files("broker._defaults")
    out["defaults_root"] = str(root)
    walk(root, "")
except Exception:
    failed("importlib.resources.files(broker._defaults)")
print(json.dumps(out))
"""


def _version(dist: str) -> tuple[int, ...]:
    try:
        raw = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ()
    parts: list[int] = []
    for piece in raw.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _can_build_without_isolation() -> bool:
    """setuptools >= 68 (pyproject's build requirement) and a bdist_wheel (built in from 70.1, else `wheel`)."""
    setuptools = _version("setuptools")
    return setuptools >= (68,) and (setuptools >= (70, 1) or _version("wheel") >= (0, 40))


def _tree_files(root: Path) -> set[str]:
    return {
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    }


def _tree_packages(tree: Path, top: str) -> set[str]:
    return {
        ".".join(init.parent.relative_to(tree).parts)
        for init in (tree / top).rglob("__init__.py")
        if "__pycache__" not in init.parts
    }


def _tree_modules(tree: Path, top: str) -> set[str]:
    return {
        p.relative_to(tree).as_posix() for p in (tree / top).rglob("*.py") if "__pycache__" not in p.parts
    }


def test_wheel_ships_every_package_and_every_default(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src, wheels, site = tmp_path / "src", tmp_path / "wheels", tmp_path / "site"
    # The copy is the tree under test: the wheel is built from it and the expected lists come from it.
    copy_source(src)
    # Bytecode next to the defaults (left by anything that imports a handler from config/) stays out.
    (src / "config" / "handlers" / "__pycache__").mkdir(exist_ok=True)
    (src / "config" / "handlers" / "__pycache__" / "file_read.cpython-311.pyc").write_bytes(b"stale")

    isolated = not _can_build_without_isolation()
    build = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--disable-pip-version-check",
        "-q",
        "-w",
        str(wheels),
    ]
    build += [] if isolated else ["--no-build-isolation"]
    started = time.monotonic()
    done = subprocess.run([*build, str(src)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - started
    assert done.returncode == 0, (
        f"pip wheel failed (build isolation: {isolated}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    )
    (wheel,) = wheels.glob("rumi_broker-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]

    # Only the two packages and the metadata at the top: no docker/, tests/, config/, bench/ ...
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == set(TOP_PACKAGES)
    assert not [n for n in names if n.endswith(".pyc") or "__pycache__" in n]
    # Every module file of the tree, nothing else (broker/_defaults is config/, compared below).
    shipped_py = {n for n in names if n.endswith(".py") and not n.startswith("broker/_defaults/")}
    tree_py = _tree_modules(src, "broker") | _tree_modules(src, "pack_runtime")
    assert shipped_py == tree_py, (
        f"wheel vs tree: missing {sorted(tree_py - shipped_py)}, extra {sorted(shipped_py - tree_py)}"
    )

    installed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "--disable-pip-version-check",
            "-q",
            "--target",
            str(site),
            str(wheel),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert installed.returncode == 0, installed.stderr[-3000:]

    # -I: no PYTHONPATH, no user site, no cwd on sys.path; the child puts only `site` in front.
    child = subprocess.run(
        [sys.executable, "-I", "-c", _CHILD, str(site)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    found = json.loads(child.stdout.strip().splitlines()[-1])
    assert found["errors"] == {}, f"modules that do not import from the wheel: {found['errors']}"
    modules: dict[str, str] = found["modules"]
    outside = {m: f for m, f in modules.items() if not Path(f).resolve().is_relative_to(site.resolve())}
    assert not outside, f"imported from outside the installed wheel: {outside}"

    missing_pkgs = (_tree_packages(src, "broker") | _tree_packages(src, "pack_runtime")) - set(modules)
    assert not missing_pkgs, f"packages of the tree missing from the wheel: {sorted(missing_pkgs)}"
    missing = [m for m in MUST_IMPORT if m not in modules]
    assert not missing, f"not importable from the wheel: {missing}"

    assert Path(found["defaults_root"]).resolve().is_relative_to(site.resolve())
    defaults = set(found["defaults"])
    expected = _tree_files(src / "config")
    assert defaults == expected, (
        f"broker._defaults differs from config/: missing {sorted(expected - defaults)}, extra {sorted(defaults - expected)}"
    )
    for item in MUST_SHIP:
        assert item in defaults or any(d.startswith(item + "/") for d in defaults), (
            f"{item} not in broker._defaults"
        )

    # The CLI from the installed wheel writes a workspace from the packaged defaults.
    ws = tmp_path / "ws"
    init = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            "import sys; sys.path.insert(0, sys.argv[1]); from broker.cli import main; "
            "sys.argv = ['rumi', 'init', '--root', sys.argv[2]]; main()",
            str(site),
            str(ws),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert init.returncode == 0, init.stdout[-2000:] + init.stderr[-2000:]
    assert (ws / "docker" / "handlers" / "file_read.py").read_bytes() == (
        src / "config" / "handlers" / "file_read.py"
    ).read_bytes()
    assert (ws / "ecosystem" / "default" / "pack.json").is_file()

    with capsys.disabled():
        print(
            f"\n[wheel] {wheel.name}: {wheel.stat().st_size / 1024:.0f} KiB, {len(names)} files "
            f"({len(defaults)} in broker._defaults), {len(modules)} modules imported; "
            f"built in {seconds:.1f}s {'with build isolation' if isolated else 'without build isolation'}"
        )
