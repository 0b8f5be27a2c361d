"""Native wheels, Pack syntax errors and source digests, checked on the host before any image is built.

No engine needed. The ELF files are written byte by byte (tests/_elf.py); the numpy test downloads the real
``numpy==2.2.6`` manylinux wheel on the host (cached in ~/.cache/rumi/wheels) and skips when the package
index cannot be reached. The engine tests (a numpy Pack that runs, the build that fails in one line, the
``--no-build`` warning) are in test_packimage.py, on the images its module fixture builds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from broker.admin.init import init_workspace
from broker.containers import images, packimage
from broker.containers.images import ImageBuildError
from broker.containers.packimage import MissingLibrary
from broker.core.errors import WorkspaceError
from broker.core.workspace import Workspace
from tests._skip import skip_unless_ci

from ._elf import shared_object, wheel

# What a glibc image without libstdc++ offers (the Debian base before libstdc++6 and libgomp1 were added).
GLIBC_ONLY = frozenset(
    {
        "libc.so.6",
        "libm.so.6",
        "libpthread.so.0",
        "libdl.so.2",
        "ld-linux-x86-64.so.2",
        "libgcc_s.so.1",
        "libz.so.1",
    }
)
EXT = "cpython-311-x86_64-linux-gnu.so"
NUMPY = "numpy==2.2.6"


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    workspace = Workspace.at(tmp_path / "ws")
    init_workspace(workspace)
    return workspace


def _pack(ws: Workspace, pack_id: str, files: dict[str, str], requirements: str | None = None) -> Path:
    src = ws.ecosystem / pack_id
    src.mkdir(parents=True, exist_ok=True)
    (src / "pack.json").write_text(json.dumps({"id": pack_id, "version": "1.0.0", "entrypoint": "main.py"}))
    for rel, text in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(text)
    if requirements is not None:
        (src / "requirements.txt").write_text(requirements)
    return src


def _put(site: Path, rel: str, data: bytes) -> None:
    (site / rel).parent.mkdir(parents=True, exist_ok=True)
    (site / rel).write_bytes(data)


# ------------------------------------------------------------------------------------------- ELF


def test_read_elf_reads_needed_rpath_and_runpath(tmp_path: Path) -> None:
    path = tmp_path / "x.so"
    path.write_bytes(
        shared_object(["libone.so.1", "libc.so.6"], rpath="$ORIGIN/../x.libs:/opt/a", runpath="$ORIGIN")
    )
    elf = images._read_elf(path)
    assert elf is not None
    assert elf.needed == ("libone.so.1", "libc.so.6")
    assert elf.rpath == ("$ORIGIN/../x.libs", "/opt/a") and elf.runpath == ("$ORIGIN",)
    path.write_bytes(b"\x7fELF" + b"\x02\x01" + b"\xff" * 30)  # truncated header
    assert images._read_elf(path) is None


def test_missing_libraries_resolves_origin_runpath_and_vendored_dirs(tmp_path: Path) -> None:
    site = tmp_path / "site"
    outside = tmp_path / "host-lib"
    outside.mkdir()
    (outside / "libhost.so.1").write_bytes(shared_object([]))
    cases = {
        # auditwheel's layout: RPATH to the wheel's own .libs directory.
        f"a/_ext.{EXT}": shared_object(["libvend-1a2b.so.1", "libc.so.6"], rpath="$ORIGIN/../a.libs"),
        "a.libs/libvend-1a2b.so.1": shared_object(["libc.so.6"]),
        # RUNPATH next to the module, spelled ${ORIGIN}.
        f"b/_ext.{EXT}": shared_object(["libsame.so.2"], runpath="${ORIGIN}"),
        "b/libsame.so.2": shared_object([]),
        # RPATH into the site, but the file is not there.
        f"c/_ext.{EXT}": shared_object(["libgone.so.1"], rpath="$ORIGIN/../c.libs"),
        # No path at all, but another wheel vendors it (its package preloads it).
        f"d/_ext.{EXT}": shared_object(["libvend-1a2b.so.1"]),
        # A library only the image can give.
        f"e/_ext.{EXT}": shared_object(["libstdc++.so.6", "libc.so.6"]),
        # With a RUNPATH the loader ignores RPATH: the library next to it is not found.
        f"f/_ext.{EXT}": shared_object(["libonlyrpath.so"], rpath="$ORIGIN", runpath="/nowhere"),
        "f/libonlyrpath.so": shared_object([]),
        # A path that leaves the site means a directory of the image, never of this host.
        f"g/_ext.{EXT}": shared_object(["libhost.so.1"], rpath=f"$ORIGIN/../../../../../../../..{outside}"),
    }
    # A needed name that is a path: not searched for, and never a file of this host.
    cases[f"h/_ext.{EXT}"] = shared_object([f"{outside}/libhost.so.1"], runpath="$ORIGIN")
    for rel, data in cases.items():
        _put(site, rel, data)
    (site / "g" / "README.so.txt").write_text("not an ELF file")
    missing = packimage.missing_libraries(site, GLIBC_ONLY)
    assert {(m.module, m.library) for m in missing} == {
        (f"c/_ext.{EXT}", "libgone.so.1"),
        (f"e/_ext.{EXT}", "libstdc++.so.6"),
        (f"f/_ext.{EXT}", "libonlyrpath.so"),
        (f"g/_ext.{EXT}", "libhost.so.1"),
        (f"h/_ext.{EXT}", f"{outside}/libhost.so.1"),
    }
    with_cxx = packimage.missing_libraries(site, GLIBC_ONLY | {"libstdc++.so.6"})
    assert (f"e/_ext.{EXT}", "libstdc++.so.6") not in {(m.module, m.library) for m in with_cxx}


# ------------------------------------------------------------------------------ wheels through pip


def _fake_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline index (a find-links directory) with `fakenative`, whose module needs libdoesnotexist.so.1."""
    links = tmp_path / "links"
    links.mkdir()
    wheel(
        links,
        "fakenative",
        "1.0",
        {
            "fakenative/__init__.py": b"from . import _native\n",
            f"fakenative/_native.{EXT}": shared_object(["libdoesnotexist.so.1", "libc.so.6"]),
        },
    )
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    return links


def test_wheel_needing_an_absent_library_fails_in_one_line(
    ws: Workspace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_index(tmp_path, monkeypatch)
    _pack(ws, "fake", {"main.py": "import fakenative\n"}, requirements="fakenative==1.0\n")
    dockerfile = packimage.write_pack_dockerfile(ws, "fake", "rumi-base:latest", cache_dir=tmp_path / "cache")
    site = dockerfile.parent / "site"
    assert (site / "fakenative" / f"_native.{EXT}").is_file()
    module = f"fakenative/_native.{EXT}"
    assert packimage.missing_libraries(site, GLIBC_ONLY) == [
        MissingLibrary(module, "libdoesnotexist.so.1", "fakenative 1.0")
    ]
    lines: list[str] = []
    with pytest.raises(ImageBuildError) as info:
        packimage.check_native_libraries("fake", site, GLIBC_ONLY, "rumi-base:latest", lines.append)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        f"Pack fake: {module} (fakenative 1.0) needs libdoesnotexist.so.1, which rumi-base:latest"
    )
    assert "pin a version of fakenative" in message and "more missing" not in message
    assert lines == [f"pack-fake:   {module} needs libdoesnotexist.so.1: not found"]


def test_numpy_2_needs_libstdcxx_from_the_image_and_vendors_the_rest(ws: Workspace) -> None:
    _pack(ws, "np", {"main.py": "import numpy\n"}, requirements=f"{NUMPY}\n")
    try:
        dockerfile = packimage.write_pack_dockerfile(ws, "np", "rumi-base:latest")
    except ImageBuildError as exc:
        skip_unless_ci(f"{NUMPY} could not be downloaded on this host: {exc}")
    site = dockerfile.parent / "site"
    assert any((site / "numpy.libs").glob("libscipy_openblas*.so")), (
        "numpy 2.x vendors OpenBLAS in numpy.libs/"
    )
    missing = packimage.missing_libraries(site, GLIBC_ONLY)
    # The base without libstdc++: what crash-looped. Everything numpy vendors is found through its RPATH.
    assert missing and {m.library for m in missing} == {"libstdc++.so.6"}, missing
    assert f"numpy/_core/_multiarray_umath.{EXT}" in {m.module for m in missing}
    assert {m.distribution for m in missing} == {"numpy 2.2.6"}
    with pytest.raises(ImageBuildError, match=r"more missing \(`rumi build -v` lists them\)$"):
        packimage.check_native_libraries("np", site, GLIBC_ONLY, "old-base:latest")
    # The Debian base now has libstdc++6 and libgomp1: nothing is missing.
    assert packimage.missing_libraries(site, GLIBC_ONLY | {"libstdc++.so.6", "libgomp.so.1"}) == []


def test_musllinux_numpy_vendors_its_cxx_runtime(ws: Workspace) -> None:
    """On a musl base (the seed's python:3.11-alpine) the wheels are musllinux: they carry libstdc++ themselves."""
    _pack(ws, "npmusl", {"main.py": "import numpy\n"}, requirements=f"{NUMPY}\n")
    try:
        dockerfile = packimage.write_pack_dockerfile(ws, "npmusl", "rumi-base:latest", libc="musl")
    except ImageBuildError as exc:
        skip_unless_ci(f"{NUMPY} (musllinux) could not be downloaded on this host: {exc}")
    site = dockerfile.parent / "site"
    assert any((site / "numpy.libs").glob("libstdc++-*.so*"))
    # Only musl itself comes from the image.
    assert packimage.missing_libraries(site, {"libc.musl-x86_64.so.1", "ld-musl-x86_64.so.1"}) == []
    assert {m.library for m in packimage.missing_libraries(site, set())} == {"libc.musl-x86_64.so.1"}


# ----------------------------------------------------------------------------------- syntax errors


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"main.py": "print('ok')\ndef broken(:\n    pass\n"}, "main.py:2: SyntaxError: invalid syntax"),
        (
            {"main.py": "import pkg.util\n", "pkg/__init__.py": "", "pkg/util.py": "x = 1\n    y = 2\n"},
            "pkg/util.py:2: IndentationError: unexpected indent",
        ),
        ({"main.py": "print(1\n"}, "main.py:1: SyntaxError: '(' was never closed"),
        ({"main.py": "def f():\n    pass\nreturn 3\n"}, "main.py:3: SyntaxError: 'return' outside function"),
        ({"main.py": "x = 1\0\n"}, "main.py: SyntaxError: source code"),
    ],
)
def test_syntax_error_is_reported_with_file_and_line(
    ws: Workspace, files: dict[str, str], expected: str
) -> None:
    _pack(ws, "bad", files)
    with pytest.raises(WorkspaceError) as info:
        packimage.write_pack_dockerfile(ws, "bad", "rumi-base:latest")
    message = str(info.value)
    assert message.startswith(expected), message
    assert "\n" not in message and "ecosystem/bad/" in message
    assert not (ws.packs / "bad").exists()


def test_syntax_check_runs_none_of_the_packs_code(ws: Workspace, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    _pack(
        ws,
        "quiet",
        {
            "main.py": f"open({str(marker)!r}, 'w').close()\nimport helper\n",
            "helper.py": f"open({str(marker)!r}, 'w').close()\n'\\d'  # an invalid escape: a warning, not an error\n",
        },
    )
    packimage.write_pack_dockerfile(ws, "quiet", "rumi-base:latest")
    assert not marker.exists()
    assert not list((ws.packs / "quiet" / "app").rglob("__pycache__"))


# ---------------------------------------------------------------------------------- source digest


def test_source_digest_is_labelled_and_follows_the_source(ws: Workspace) -> None:
    src = _pack(ws, "dig", {"main.py": "print(1)\n"})
    first = packimage.source_digest(ws, "dig")
    text = packimage.render_pack_dockerfile(ws, "dig", "rumi-base:latest")
    assert f'{packimage.LABEL_SOURCE}="{first}"' in text
    (src / "__pycache__").mkdir()
    (src / "__pycache__" / "main.cpython-311.pyc").write_bytes(b"junk")  # not part of the image
    assert packimage.source_digest(ws, "dig") == first
    (src / "main.py").write_text("print(2)\n")
    second = packimage.source_digest(ws, "dig")
    assert second != first
    (src / "requirements.txt").write_text("six==1.17.0\n")
    assert packimage.source_digest(ws, "dig") not in (first, second)


def test_failed_run_step_is_named_by_its_output() -> None:
    error = "The command 'python3 -c import compileall, pathlib, sys, venv; venv.EnvBuilder(...)' returned a non-zero code: 1"
    assert images._build_error(error, "SyntaxError: invalid syntax") == (
        "SyntaxError: invalid syntax (a RUN step exited with code 1)"
    )
    assert images._build_error(error, "") == error
    assert images._build_error("no space left\non device", "x") == "no space left on device"
