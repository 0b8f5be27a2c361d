"""Pack images: ``<prefix>-pack-<id>:latest`` = ``rumi-base`` + the Pack's own venv + its code, read-only.

Each Pack gets a generated build context ``docker/packs/<id>/``::

    Dockerfile   generated (render_pack_dockerfile); FROM the base, exec-form only (the base has no shell)
    app/         a copy of ecosystem/<id>/ (links kept as links, never followed; modes normalised)
    site/        the Pack's requirements, installed ON THE HOST from wheels (pip install --target,
                 --no-index, --only-binary): unpacking a wheel runs none of its code
    .content-hash  what the context was made from, so an unchanged Pack is not restaged

The Pack's "own venv" is a real one: ``python3 -m venv --without-pip --symlinks /opt/pack`` runs at build
time inside the image (the base has ``venv`` but no pip and no shell), ``site/`` becomes its
``site-packages`` and ``/opt/pack/bin`` leads ``PATH``, so ``CMD ["python3", ...]`` is the venv's Python.
The base's ``PYTHONPATH`` (pack_runtime and its pinned dependencies) comes first on ``sys.path``: a Pack
cannot shadow the SDK's msgspec or nats-py by accident; its own packages are found after them.

Requirements are untrusted input read on the host: only plain ``name[extras] specifiers ; marker`` lines
(and ``--hash``) are accepted; options, URLs, paths and includes are refused. Wheels are downloaded on the
host for the base image's platform (its ``io.rumi.python-libc`` label) into ``~/.cache/rumi/wheels`` and
reused from there; a requirement with no wheel is refused, naming it. The image build needs no network.

The code is copied owned by root, files 0644 (0755 when executable), directories 0755: the Pack's uid
can read it and write none of it (and the container's root filesystem is read-only besides).

Checked on the host before any image is built, without running any of it:

- every ``.py`` file of the Pack compiles (``compile()`` of its text): a syntax error is reported as
  ``main.py:LINE: SyntaxError: ...``;
- every shared object the wheels unpacked (extension modules and the libraries they vendor) finds each
  library it needs: through its RPATH/RUNPATH (``$ORIGIN``), in the wheels' own ``*.libs/`` directories, or
  among the base image's libraries (its ``io.rumi.libraries`` label). A missing one fails the build, naming
  the module and the library, instead of a Pack that crash-loops on ``cannot open shared object file``.

A Pack image carries ``io.rumi.source-digest``, the hash of its source directory, so ``rumi up --no-build``
can warn when the source changed since the image was built (stale_source_warning).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import posixpath
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.containers.images import (
    RUNTIME_REQUIREMENTS,
    ImageBuildError,
    Progress,
    _docker_build,
    _Elf,
    _existing,
    _fetch_wheels,
    _pack_runtime_dir,
    _pip_env,
    _platform_args,
    _read_elf,
    _template,
    _wheel_platforms,
    build_base_image,
    default_cache_dir,
    image_libraries,
    image_tag,
    install_wheels,
)
from broker.core.errors import WorkspaceError
from broker.core.ids import is_pack_id
from broker.core.labels import (
    DEFAULT_PREFIX,
    LABEL_HASH,
    LABEL_KIND,
    LABEL_LIBC,
    LABEL_PACK,
    LABEL_PACK_VERSION,
    LABEL_PREFIX,
)
from broker.core.workspace import Workspace

__all__ = [
    "APP_DIR",
    "DEFAULT_LIBC",
    "LABEL_PACK",
    "LABEL_SOURCE",
    "PACK_VENV",
    "BuiltPack",
    "MissingLibrary",
    "build_pack_image",
    "check_native_libraries",
    "check_pack_syntax",
    "image_libc",
    "missing_libraries",
    "pack_image_tag",
    "pack_layer_size",
    "parse_requirements",
    "render_pack_dockerfile",
    "source_digest",
    "stage_base_context",
    "stale_source_warning",
    "wheel_platforms",
    "write_pack_dockerfile",
]

APP_DIR = "/app"
PACK_VENV = "/opt/pack"
# The Debian-assembled Python base (Debian 12): used when no engine says otherwise.
DEFAULT_LIBC = "glibc 2.36"
HASH_FILE = ".content-hash"
# On a Pack image: the hash of the Pack's source directory it was built from (source_digest).
LABEL_SOURCE = "io.rumi.source-digest"

_SITE = f"{PACK_VENV}/lib/python3.11/site-packages"
_PATH = f"{PACK_VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Left out of the code copy: caches, VCS data, and what would only be a secret or noise in an image.
_SKIP_NAMES = frozenset(
    {
        "__pycache__",
        ".git",
        ".hg",
        ".svn",
        ".venv",
        "venv",
        ".mypy_cache",
        ".pytest_cache",
        ".ruff_cache",
        ".DS_Store",
    }
)
_SKIP_SUFFIXES = (".pyc", ".pyo")
_ENTRY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./-]{0,199}$")
_VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}$")
_IMAGE_REF_RE = re.compile(r"^[a-z0-9][a-z0-9._/-]*(:[A-Za-z0-9._-]+)?(@sha256:[0-9a-f]{64})?$")
# One requirement: a name, optional extras, version specifiers, an environment marker. No URL, path
# or option can be spelled with these characters (no '-' first, no '@', '/', ':', '$', '\\').
_REQ_RE = re.compile(
    r"^(?P<name>[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)"
    r"\s*(?:\[[A-Za-z0-9._,\s-]*\])?"
    r"\s*(?:(?:===|==|!=|<=|>=|~=|<|>)\s*[A-Za-z0-9.*+!_-]+\s*,?\s*)*"
    r"(?:;\s*[A-Za-z0-9_.'\"<>=!~(),\s-]+)?$"
)
_HASH_RE = re.compile(r"^--hash[= ](sha256|sha384|sha512):[0-9a-f]{64,128}$")


# ----------------------------------------------------------------------------------------- names


def pack_image_tag(pack_id: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The tag of a Pack's image: ``<prefix>-pack-<pack_id>:latest``."""
    if not is_pack_id(pack_id):
        raise WorkspaceError(
            f"{pack_id!r} is not a valid pack id (lowercase letter, then [a-z0-9_-], max 32)"
        )
    image_tag("base", prefix)  # validates the prefix with the same rule as every other image
    return f"{prefix}-pack-{pack_id}:latest"


def wheel_platforms(libc: str, arch: str | None = None) -> list[str]:
    """pip ``--platform`` tags a Python with ``libc`` (``glibc X.Y`` or ``musl``) on ``arch`` loads."""
    return _wheel_platforms(libc, arch or platform.machine() or "x86_64")


def image_libc(client: Any | None, base_image: str) -> str:
    """The libc the base image's Python uses (its label), or DEFAULT_LIBC when unknown or no engine."""
    image = _existing(client, base_image) if client is not None else None
    if image is None:
        return DEFAULT_LIBC
    return str((image.labels or {}).get(LABEL_LIBC) or DEFAULT_LIBC)


def _quiet(_: str) -> None:
    """Progress sink that drops every message."""


def _hash_parts(*parts: object) -> str:
    """Stable SHA-256 over JSON-encoded parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _recipe_hash() -> str:
    """Hash of this module: a change to how Pack images are made rebuilds them."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class _Pack:
    """What the generator needs from a Pack's source directory."""

    pack_id: str
    version: str
    entrypoint: str
    source: Path
    requirements: tuple[str, ...]


def _load_pack(ws: Workspace, pack_id: str) -> _Pack:
    """Read and check ecosystem/<id>/pack.json and requirements.txt (raises WorkspaceError)."""
    from broker.core.manifest import load_manifest

    manifest = load_manifest(ws, pack_id)
    source = ws.pack_source(pack_id)
    where = source / "pack.json"
    if not _ENTRY_RE.match(manifest.entrypoint) or ".." in Path(manifest.entrypoint).parts:
        raise WorkspaceError(f"{where}: entrypoint {manifest.entrypoint!r} must be a plain relative path")
    entry = source / manifest.entrypoint
    if entry.is_symlink() or not entry.is_file():
        raise WorkspaceError(
            f"{where}: entrypoint {manifest.entrypoint} is not a file in ecosystem/{pack_id}/"
        )
    if not _VERSION_RE.match(manifest.version):
        raise WorkspaceError(
            f"{where}: version {manifest.version!r} must be like 1.2.3 (letters, digits, .+_-)"
        )
    req_file = source / "requirements.txt"
    requirements: tuple[str, ...] = ()
    if req_file.is_symlink():
        raise WorkspaceError(f"{req_file}: must be a regular file, not a link")
    if req_file.is_file():
        requirements = tuple(parse_requirements(req_file.read_text(encoding="utf-8"), str(req_file)))
    return _Pack(pack_id, manifest.version, manifest.entrypoint, source, requirements)


def parse_requirements(text: str, source: str = "requirements.txt") -> list[str]:
    """The requirement lines of a Pack's requirements.txt, checked; raise WorkspaceError on anything else.

    Accepted: ``name[extras] <specifiers> ; <marker>`` with optional ``--hash=sha256:...`` options, comments
    and blank lines. Refused: options (``-r``, ``-e``, ``--index-url``...), URLs, paths, line continuations.
    """
    out: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split(" #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if not line:
            continue
        parts = re.split(r"\s+(?=--hash)", line)
        req, hashes = parts[0].strip(), [p.strip() for p in parts[1:]]
        if req.startswith("-"):
            raise WorkspaceError(
                f"{source}:{number}: option {req.split()[0]!r} is not allowed; "
                "list plain requirements (name and version) only"
            )
        if not _REQ_RE.match(req) or any(not _HASH_RE.match(h) for h in hashes):
            raise WorkspaceError(
                f"{source}:{number}: {req[:80]!r} is not a plain requirement (name[extras] specifiers ; marker); "
                "URLs, paths and options are not allowed"
            )
        out.append(" ".join([req, *(h.replace("--hash ", "--hash=") for h in hashes)]))
    return out


# ------------------------------------------------------------------------------------ the code


@dataclass(frozen=True)
class _Entry:
    """One entry of a Pack's code tree as it goes into the image."""

    rel: str
    kind: str  # "dir", "file", "link"
    mode: int
    digest: str  # file SHA-256, or link target


def _code_entries(source: Path) -> list[_Entry]:
    """The Pack's code tree, sorted, links not followed, modes normalised; special files refused."""
    entries: list[_Entry] = []
    for dirpath, dirnames, filenames in os.walk(source):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_NAMES)
        here = Path(dirpath)
        names = sorted([*filenames, *(d for d in dirnames if (here / d).is_symlink())])
        # os.walk does not descend into linked directories; they are copied as links.
        dirnames[:] = [d for d in dirnames if not (here / d).is_symlink()]
        for d in dirnames:
            entries.append(_Entry(str((here / d).relative_to(source)), "dir", 0o755, ""))
        for name in names:
            if name in _SKIP_NAMES or name.endswith(_SKIP_SUFFIXES):
                continue
            path = here / name
            rel = str(path.relative_to(source))
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                entries.append(_Entry(rel, "link", 0o777, os.readlink(path)))
            elif stat.S_ISREG(st.st_mode):
                mode = 0o755 if st.st_mode & 0o111 else 0o644
                entries.append(_Entry(rel, "file", mode, _file_sha256(path)))
            else:
                raise WorkspaceError(
                    f"{path}: not a regular file, directory or link; remove it from the Pack"
                )
    entries.sort(key=lambda e: e.rel)
    return entries


def _copy_code(source: Path, entries: Sequence[_Entry], dest: Path) -> None:
    """Copy the listed entries into dest with their normalised modes (links as links)."""
    dest.mkdir(parents=True)
    _set_mode(dest, 0o755)
    for entry in entries:
        target = dest / entry.rel
        if entry.kind == "dir":
            target.mkdir(exist_ok=True)
            _set_mode(target, 0o755)
        elif entry.kind == "link":
            # A link is kept as a link: it resolves inside the image, never to a file on this host.
            target.symlink_to(entry.digest)
        else:
            shutil.copyfile(source / entry.rel, target, follow_symlinks=False)
            _set_mode(target, entry.mode)


def _set_mode(path: Path, mode: int) -> None:
    """chmod for build-context files: world-readable on purpose (the Pack's uid must read its code)."""
    os.chmod(path, mode)


def _normalise_tree(root: Path) -> None:
    """Directories 0755, files 0644 (0755 when executable): readable by any uid, writable by none."""
    for dirpath, _, filenames in os.walk(root):
        _set_mode(Path(dirpath), 0o755)
        for name in filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            if stat.S_ISREG(st.st_mode):
                _set_mode(path, 0o755 if st.st_mode & 0o111 else 0o644)


def _digest(code: Sequence[_Entry]) -> str:
    """Hash of a Pack's source tree as it goes into the image (paths, kinds, modes, contents)."""
    return _hash_parts("pack-source", [e.__dict__ for e in code])


def source_digest(ws: Workspace, pack_id: str) -> str:
    """Hash of ecosystem/<id>/ as the image takes it (what the ``io.rumi.source-digest`` label records)."""
    return _digest(_code_entries(ws.pack_source(pack_id)))


def check_pack_syntax(source: Path, code: Sequence[_Entry]) -> None:
    """Compile every ``.py`` file of the Pack on the host; the first error raises ``main.py:LINE: SyntaxError: ...``.

    ``compile()`` parses and compiles the text only: none of the Pack's code runs.
    """
    for entry in code:
        if entry.kind != "file" or not entry.rel.endswith(".py"):
            continue
        data = (source / entry.rel).read_bytes()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # SyntaxWarning / DeprecationWarning are not errors
                compile(data, entry.rel, "exec", dont_inherit=True)
        except SyntaxError as exc:
            where = f"{entry.rel}:{exc.lineno}" if exc.lineno else entry.rel
            raise WorkspaceError(
                f"{where}: {type(exc).__name__}: {exc.msg} (fix ecosystem/{source.name}/{entry.rel})"
            ) from None
        except (ValueError, RecursionError, MemoryError) as exc:  # NUL bytes, absurd nesting
            raise WorkspaceError(
                f"{entry.rel}: SyntaxError: {str(exc) or type(exc).__name__} (fix ecosystem/{source.name}/{entry.rel})"
            ) from None


# ------------------------------------------------------------------------------------- wheels


def _fetch_pack_wheels(
    pack: _Pack, platforms: Sequence[str], cache: Path, progress: Progress
) -> tuple[Path, list[tuple[str, str]]]:
    """Wheels for the Pack's requirements for the image's platform, downloaded on the host, cached."""
    key = _hash_parts("pack-wheels", list(pack.requirements), list(platforms))[:16]
    wheels = cache / "wheels" / f"pack-{key}"
    manifest = wheels / "manifest.json"
    if manifest.is_file():
        try:
            files = [(str(a), str(b)) for a, b in json.loads(manifest.read_text())]
        except (ValueError, TypeError):
            files = []
        if files and all((wheels / name).is_file() for name, _ in files):
            return wheels, files
    wheels.mkdir(parents=True, exist_ok=True)
    progress(
        f"pack-{pack.pack_id}: downloading wheels for {len(pack.requirements)} requirement(s) ({platforms[0]})"
    )
    with tempfile.TemporaryDirectory(prefix="rumi-req-") as tmp:
        req_file = Path(tmp) / "requirements.txt"
        req_file.write_text("\n".join(pack.requirements) + "\n")
        _pip(
            [
                "download",
                "-q",
                "-d",
                str(wheels),
                "--find-links",
                str(wheels),
                *_platform_args(platforms),
                "-r",
                str(req_file),
            ],
            pack=pack,
            platforms=platforms,
            hermetic=False,
        )
    stray = sorted(
        p.name
        for p in wheels.iterdir()
        if p.is_file() and p.name != "manifest.json" and not p.name.endswith(".whl")
    )
    if stray:
        raise ImageBuildError(
            f"Pack {pack.pack_id}: {stray[0]} is a source distribution; Rumi installs wheels only "
            "(no dependency code runs on the host): pick a version that ships a wheel"
        )
    files = sorted((p.name, _file_sha256(p)) for p in wheels.glob("*.whl"))
    manifest.write_text(json.dumps(files))
    return wheels, files


def no_wheel_refusal(pip_output: str, pack_id: str, target: str) -> str | None:
    """The one-line refusal when pip found no wheel of a requirement (for `target`, e.g. "CPython 3.11"),
    or None when its output says something else. Used by `rumi build` and by `rumi dev`'s environments."""
    missing = re.search(r"No matching distribution found for (\S+)", pip_output)
    if missing is None:
        return None
    return (
        f"Pack {pack_id}: no wheel of {missing.group(1)} for {target}: Rumi installs wheels only, so no "
        "dependency code runs on the host, and refuses a package published only as a source distribution; "
        "pick a version that ships a wheel (or check that the package index is reachable)"
    )


def _pip(
    args: Sequence[str], *, pack: _Pack, platforms: Sequence[str], hermetic: bool, timeout: float = 600
) -> None:
    """Run host pip for a Pack; turn "no matching distribution" into a wheel-only refusal naming it."""
    argv = [sys.executable, "-m", "pip", *args]
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
            env=_pip_env(hermetic),
        )
    except subprocess.TimeoutExpired as exc:
        raise ImageBuildError(
            f"Pack {pack.pack_id}: pip {args[0]} did not finish within {timeout:.0f}s"
        ) from exc
    if done.returncode == 0:
        return
    text = done.stderr or done.stdout
    where = f" ({platforms[0]})" if platforms else ""
    if (refusal := no_wheel_refusal(text, pack.pack_id, f"CPython 3.11{where}")) is not None:
        raise ImageBuildError(refusal)
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(("WARNING:", "  "))]
    last = lines[-1].strip() if lines else f"exit code {done.returncode}"
    raise ImageBuildError(
        f"Pack {pack.pack_id}: pip {args[0]} failed: {last[:300]} "
        "(is the package index reachable? wheels once downloaded are reused from ~/.cache/rumi/wheels)"
    )


def _install_wheels(pack: _Pack, wheels: Path, platforms: Sequence[str], site: Path) -> None:
    """Unpack the wheels into ``site`` on the host: no index, no build, no code of theirs run."""
    site.mkdir(parents=True)
    if not pack.requirements:
        return
    with tempfile.TemporaryDirectory(prefix="rumi-req-") as tmp:
        req_file = Path(tmp) / "requirements.txt"
        req_file.write_text("\n".join(pack.requirements) + "\n")
        _pip(
            [
                "install",
                "-q",
                "--no-compile",
                "--no-index",
                "--find-links",
                str(wheels),
                "--target",
                str(site),
                *_platform_args(platforms),
                "-r",
                str(req_file),
            ],
            pack=pack,
            platforms=platforms,
            hermetic=True,
        )
    # Console scripts carry the host's interpreter in their shebang: useless in the image.
    shutil.rmtree(site / "bin", ignore_errors=True)
    _normalise_tree(site)


# ------------------------------------------------------------------------------ native wheels


@dataclass(frozen=True)
class MissingLibrary:
    """A shared library that a shared object of the Pack's wheels needs and nothing provides.

    ``module`` is its path under site-packages (``numpy/_core/_multiarray_umath.cpython-311-x86_64-linux-gnu.so``),
    ``library`` the DT_NEEDED name (``libstdc++.so.6``), ``distribution`` ``"numpy 2.2.6"`` (empty when no
    RECORD lists the file).
    """

    module: str
    library: str
    distribution: str


def _shared_objects(site: Path) -> dict[str, _Elf]:
    """The ELF shared objects under ``site`` (extension modules, vendored libraries), by relative path."""
    found: dict[str, _Elf] = {}
    for dirpath, dirnames, filenames in os.walk(site):
        dirnames.sort()
        for name in sorted(filenames):
            if ".so" not in name:
                continue
            path = Path(dirpath, name)
            if not path.is_file() or path.is_symlink():
                continue
            elf = _read_elf(path)
            if elf is not None:
                found[path.relative_to(site).as_posix()] = elf
    return found


def _vendored(site: Path) -> set[str]:
    """Names of the files in the wheels' ``*.libs/`` directories (auditwheel's vendored libraries)."""
    return {p.name for libs in site.glob("*.libs") if libs.is_dir() for p in libs.rglob("*") if p.is_file()}


def _on_search_path(site: Path, rel: str, elf: _Elf, library: str) -> bool:
    """Whether the loader finds ``library`` for the object ``rel`` in the site through its RUNPATH (else RPATH)."""
    origin = posixpath.dirname(posixpath.join(_SITE, rel))
    for entry in elf.runpath or elf.rpath:
        folder = posixpath.normpath(entry.replace("${ORIGIN}", origin).replace("$ORIGIN", origin))
        if folder == _SITE or folder.startswith(_SITE + "/"):
            if (site / posixpath.relpath(folder, _SITE) / library).is_file():
                return True
    return False


def missing_libraries(site: Path, libraries: Iterable[str]) -> list[MissingLibrary]:
    """What the shared objects under ``site`` need that neither they nor the image provide.

    ``libraries``: the image's (image_libraries). A needed library counts as found when the object's RUNPATH
    (or RPATH), with ``$ORIGIN`` resolved, leads to it inside the site; when it is among the image's
    libraries; or when a wheel ships it in its ``*.libs/`` directory (vendored, possibly preloaded).
    """
    system = set(libraries)
    vendored = _vendored(site)
    missing: list[MissingLibrary] = []
    for rel, elf in _shared_objects(site).items():
        for library in elf.needed:
            name = posixpath.basename(library)
            if name in system or name in vendored:
                continue
            # A name with a slash is a path, not searched for; it never leads to a file of this host.
            if "/" not in library and _on_search_path(site, rel, elf, library):
                continue
            missing.append(MissingLibrary(rel, library, ""))
    if not missing:
        return []
    owners = _record_owners(site)
    return [MissingLibrary(m.module, m.library, owners.get(m.module, "")) for m in missing]


def _record_owners(site: Path) -> dict[str, str]:
    """File (relative to site) -> ``"name version"`` of the distribution whose RECORD lists it."""
    owners: dict[str, str] = {}
    for record in site.glob("*.dist-info/RECORD"):
        name, _, version = record.parent.name[: -len(".dist-info")].partition("-")
        for line in record.read_text(encoding="utf-8", errors="replace").splitlines():
            owners.setdefault(line.split(",", 1)[0], f"{name} {version}".strip())
    return owners


def check_native_libraries(
    pack_id: str, site: Path, libraries: Iterable[str], image: str, progress: Progress | None = None
) -> None:
    """Raise ImageBuildError (one line: module, library, what to do) when a shared object under ``site``
    needs a library that neither the wheels nor ``image`` (whose ``libraries`` these are) provide.

    Every missing one also goes to ``progress`` (shown by ``rumi build -v``).
    """
    missing = missing_libraries(site, libraries)
    if not missing:
        return
    for m in missing:
        (progress or _quiet)(f"pack-{pack_id}:   {m.module} needs {m.library}: not found")
    first = missing[0]
    owner = f" ({first.distribution})" if first.distribution else ""
    dist = first.distribution.split(" ")[0] if first.distribution else "that package"
    more = len(missing) - 1
    tail = f"; {more} more missing (`rumi build -v` lists them)" if more else ""
    raise ImageBuildError(
        f"Pack {pack_id}: {first.module}{owner} needs {first.library}, which {image} does not have "
        f"and no wheel ships: pin a version of {dist} whose wheel bundles it (in {dist}.libs/), "
        f"or drop the requirement{tail}"
    )


# --------------------------------------------------------------------------------- Dockerfile


def _prefix_of(base_image: str) -> str | None:
    """``rumi`` for ``rumi-base:latest``: the prefix label of images built from a generated Dockerfile."""
    m = re.fullmatch(r"([a-z0-9][a-z0-9_.-]{0,62})-base(?::latest)?", base_image)
    return m.group(1) if m else None


def _render(pack: _Pack, base_image: str, digest: str) -> str:
    if not _IMAGE_REF_RE.match(base_image):
        raise WorkspaceError(f"base image {base_image!r} is not a valid image reference")
    prefix = _prefix_of(base_image)
    labels = {
        LABEL_KIND: "pack",
        LABEL_PACK: pack.pack_id,
        LABEL_PACK_VERSION: pack.version,
        LABEL_SOURCE: digest,
    }
    if prefix is not None:
        labels[LABEL_PREFIX] = prefix
    # The venv is made at build time by the image's own Python; site-packages compile best-effort (a
    # wheel may carry files for other Pythons), the Pack's code must compile.
    setup = (
        "import compileall, pathlib, sys, venv; "
        f"venv.EnvBuilder(symlinks=True, with_pip=False).create({PACK_VENV!r}); "
        f"[p.unlink() for p in pathlib.Path({PACK_VENV!r}, 'bin').glob('[Aa]ctivate*')]; "
        f"compileall.compile_dir({_SITE!r}, quiet=2); "
        f"sys.exit(0 if compileall.compile_dir({APP_DIR!r}, quiet=1) else 1)"
    )
    lines = [
        f"# Generated by rumi (broker/containers/packimage.py) for Pack {pack.pack_id} {pack.version}. Do not edit:",
        "# `rumi build` / `rumi compose` rewrite it. Build context: this directory (app/ = the Pack's code,",
        "# site/ = its requirements, unpacked from wheels on the host). Needs no network. Exec-form only:",
        "# the base has no shell.",
        f"FROM {base_image}",
        "USER 0:0",
        f"COPY site/ {_SITE}/",
        f"COPY app/ {APP_DIR}/",
        f"RUN {json.dumps(['python3', '-c', setup])}",
        f"ENV PATH={_PATH} \\",
        f"    VIRTUAL_ENV={PACK_VENV} \\",
        "    PYTHONDONTWRITEBYTECODE=1 \\",
        "    PYTHONUNBUFFERED=1",
        "LABEL " + " \\\n      ".join(f"{k}={json.dumps(v)}" for k, v in labels.items()),
        f"WORKDIR {APP_DIR}",
        "# The runtime sets the Pack's own uid; this one is the base's non-root default.",
        "USER 10001:10001",
        f"CMD {json.dumps(['python3', pack.entrypoint])}",
        "",
    ]
    return "\n".join(lines)


def render_pack_dockerfile(ws: Workspace, pack_id: str, base_image: str) -> str:
    """The Dockerfile text of Pack ``pack_id`` built FROM ``base_image`` (reads its pack.json)."""
    pack = _load_pack(ws, pack_id)
    return _render(pack, base_image, _digest(_code_entries(pack.source)))


@dataclass(frozen=True)
class _Staged:
    """A written build context and the hash of what it was made from."""

    path: Path
    dockerfile: str
    key: str


def _inputs_key(
    pack: _Pack,
    dockerfile: str,
    code: Sequence[_Entry],
    wheel_files: Sequence[tuple[str, str]],
    platforms: Sequence[str],
) -> str:
    """Hash of everything the context is made from (the base image's id is added for the image key)."""
    return _hash_parts(
        "pack-context",
        _recipe_hash(),
        dockerfile,
        [e.__dict__ for e in code],
        list(pack.requirements),
        list(wheel_files),
        list(platforms),
    )


def _stage(
    ws: Workspace, pack: _Pack, base_image: str, platforms: Sequence[str], cache: Path, progress: Progress
) -> _Staged:
    """Write docker/packs/<id>/ (Dockerfile, app/, site/) unless it already holds these inputs."""
    code = _code_entries(pack.source)
    check_pack_syntax(pack.source, code)
    dockerfile = _render(pack, base_image, _digest(code))
    wheels, wheel_files = (
        _fetch_pack_wheels(pack, platforms, cache, progress) if pack.requirements else (cache, [])
    )
    key = _inputs_key(pack, dockerfile, code, wheel_files, platforms)
    target = ws.packs / pack.pack_id
    stamp = target / HASH_FILE
    if stamp.is_file() and stamp.read_text().strip() == key and (target / "Dockerfile").is_file():
        return _Staged(target, dockerfile, key)
    ws.packs.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{pack.pack_id}.", dir=ws.packs))
    try:
        _set_mode(tmp, 0o755)
        _copy_code(pack.source, code, tmp / "app")
        if wheel_files:
            progress(
                f"pack-{pack.pack_id}: unpacking {len(wheel_files)} wheel(s) into site/ (host, no index)"
            )
        _install_wheels(pack, wheels, platforms, tmp / "site")
        (tmp / "Dockerfile").write_text(dockerfile)
        (tmp / HASH_FILE).write_text(key + "\n")
        old = target.with_name(f".{pack.pack_id}.old-{os.getpid()}")
        if target.exists():
            target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _Staged(target, dockerfile, key)


def write_pack_dockerfile(
    ws: Workspace,
    pack_id: str,
    base_image: str,
    *,
    libc: str = DEFAULT_LIBC,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
) -> Path:
    """Write ``docker/packs/<id>/Dockerfile`` and its build context (app/, site/); return the Dockerfile.

    ``libc`` is the base image's (see image_libc): it picks the wheel platform. Downloads wheels (host,
    cached) only when the Pack has a requirements.txt.
    """
    pack = _load_pack(ws, pack_id)
    staged = _stage(
        ws, pack, base_image, wheel_platforms(libc), cache_dir or default_cache_dir(), progress or _quiet
    )
    return staged.path / "Dockerfile"


# ------------------------------------------------------------------------------------- build


@dataclass(frozen=True)
class BuiltPack:
    """A Pack image: its tag, id, whether it was reused, and its own layers' size."""

    tag: str
    image_id: str
    reused: bool
    size: int
    layer_size: int
    seconds: float


def build_pack_image(
    client: Any,
    ws: Workspace,
    pack_id: str,
    *,
    prefix: str = DEFAULT_PREFIX,
    progress: Progress | None = None,
    cache_dir: Path | None = None,
) -> str:
    """Build (or reuse) ``<prefix>-pack-<id>:latest`` and return its tag.

    The base image is ``<prefix>-base:latest`` (built first when missing). The image is reused when the
    content hash (code, requirements' wheels, Dockerfile, base image id) is unchanged.
    """
    return build_pack(client, ws, pack_id, prefix=prefix, progress=progress, cache_dir=cache_dir).tag


def build_pack(
    client: Any,
    ws: Workspace,
    pack_id: str,
    *,
    prefix: str = DEFAULT_PREFIX,
    progress: Progress | None = None,
    cache_dir: Path | None = None,
) -> BuiltPack:
    """build_pack_image, returning what was built (tag, id, reused, sizes, seconds)."""
    progress = progress or _quiet
    started = time.monotonic()
    tag = pack_image_tag(pack_id, prefix)
    cache = cache_dir or default_cache_dir()
    pack = _load_pack(ws, pack_id)
    base_tag = image_tag("base", prefix)
    base = _existing(client, base_tag)
    if base is None:
        progress(f"pack-{pack_id}: {base_tag} is missing; building it first")
        base = client.images.get(build_base_image(client, prefix, progress, cache_dir=cache))
    libc = str((base.labels or {}).get(LABEL_LIBC) or DEFAULT_LIBC)
    arch = str(client.info().get("Architecture", "") or platform.machine())
    platforms = _wheel_platforms(libc, arch)
    staged = _stage(ws, pack, base_tag, platforms, cache, progress)
    key = _hash_parts("pack-image", staged.key, base.id)
    image = _existing(client, tag)
    if image is not None and (image.labels or {}).get(LABEL_HASH) == key:
        return _built(client, tag, base, reused=True, started=started)
    if pack.requirements:
        check_native_libraries(
            pack_id, staged.path / "site", image_libraries(client, base_tag), base_tag, progress
        )
    with tempfile.TemporaryDirectory(prefix="rumi-pack-") as tmp:
        _docker_build(
            client,
            tag=tag,
            dockerfile=staged.dockerfile,
            context={"app": staged.path / "app", "site": staged.path / "site"},
            labels={
                LABEL_PREFIX: prefix,
                LABEL_KIND: "pack",
                LABEL_HASH: key,
                LABEL_PACK: pack_id,
                LABEL_LIBC: libc,
            },
            buildargs={},
            work=Path(tmp),
            progress=progress,
            label=f"pack-{pack_id}",
        )
    return _built(client, tag, base, reused=False, started=started)


def _built(client: Any, tag: str, base: Any, *, reused: bool, started: float) -> BuiltPack:
    image = client.images.get(tag)
    size = int(image.attrs.get("Size", 0))
    return BuiltPack(
        tag, str(image.id), reused, size, size - int(base.attrs.get("Size", 0)), time.monotonic() - started
    )


def stale_source_warning(client: Any, ws: Workspace, pack_id: str, tag: str) -> str | None:
    """A warning when Pack ``pack_id``'s image ``tag`` was built from other source than ecosystem/<id>/ now.

    For ``rumi up --no-build``: compares the image's ``io.rumi.source-digest`` label with source_digest().
    """
    image = _existing(client, tag)
    if image is None:
        return None
    try:
        current = source_digest(ws, pack_id)
    except (OSError, WorkspaceError) as exc:
        return f"warning: pack {pack_id}: cannot read ecosystem/{pack_id}/ ({exc}); {tag} may be stale"
    recorded = (image.labels or {}).get(LABEL_SOURCE)
    if recorded == current:
        return None
    if recorded is None:
        return (
            f"warning: pack {pack_id}: {tag} records no source digest (built by an older rumi or by hand), "
            f"so it may run stale code: run `rumi build {pack_id}`"
        )
    return (
        f"warning: pack {pack_id}: ecosystem/{pack_id}/ changed since {tag} was built; "
        f"it runs the old code: run `rumi build {pack_id}` (or `rumi up` without --no-build)"
    )


def pack_layer_size(client: Any, pack_id: str, prefix: str = DEFAULT_PREFIX) -> int:
    """Bytes a Pack's image adds on top of its base (image size minus base size)."""
    image = client.images.get(pack_image_tag(pack_id, prefix))
    base = client.images.get(image_tag("base", prefix))
    return int(image.attrs.get("Size", 0)) - int(base.attrs.get("Size", 0))


# -------------------------------------------------------------------------------- docker/base


def stage_base_context(
    ws: Workspace,
    *,
    libc: str = DEFAULT_LIBC,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
) -> Path:
    """Fill ``docker/base/`` so ``docker build -t rumi-base:latest docker/base/`` works offline.

    Writes the shipped Dockerfile when missing, ``site-packages/`` (pack_runtime's dependencies, unpacked
    on the host from cached wheels) and ``lib/pack_runtime``. The build still needs ``rumi-python:3.11``
    (made by ``rumi build``). Generated directories carry a ``.gitignore`` of their own.
    """
    progress = progress or _quiet
    cache = cache_dir or default_cache_dir()
    platforms = wheel_platforms(libc)
    wheels, wheel_files = _fetch_wheels(RUNTIME_REQUIREMENTS, platforms, cache, progress)
    runtime = _pack_runtime_dir()
    runtime_code = [e.__dict__ for e in _code_entries(runtime)] if runtime is not None else None
    key = _hash_parts("base-context", _recipe_hash(), wheel_files, list(platforms), runtime_code)
    base = ws.base
    base.mkdir(parents=True, exist_ok=True)
    if not (base / "Dockerfile").exists():
        (base / "Dockerfile").write_text(_template("base", "Dockerfile"))
    ignore = base / ".dockerignore"
    if not ignore.exists():
        ignore.write_text(
            "# generated by rumi: the .gitignore files of generated directories stay out of images\n"
            "*/.gitignore\n"
        )
    # The stamp lives in the state directory: docker/base/ holds only what a user may commit or build.
    ws.state.mkdir(parents=True, exist_ok=True)
    stamp = ws.state / "base-context.hash"
    if stamp.is_file() and stamp.read_text().strip() == key and (base / "site-packages").is_dir():
        return base
    progress(f"base: staging docker/base/ ({len(wheel_files)} wheels, pack_runtime)")
    tmp = Path(tempfile.mkdtemp(prefix=".stage-", dir=base))
    try:
        site = tmp / "site-packages"
        install_wheels(RUNTIME_REQUIREMENTS, wheels, platforms, site, what="staging docker/base: pip install")
        _normalise_tree(site)
        lib = tmp / "lib"
        lib.mkdir()
        if runtime is not None:
            _copy_code(runtime, _code_entries(runtime), lib / "pack_runtime")
        for part in (site, lib):
            (part / ".gitignore").write_text("# generated by rumi: not part of the workspace's sources\n*\n")
            final = base / part.name
            if final.exists():
                shutil.rmtree(final)
            part.rename(final)
        stamp.write_text(key + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return base
