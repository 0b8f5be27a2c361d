"""`rumi dev`: a Pack as a local process with its own credentials and environment (nothing isolated).

The Pack runs in a virtual environment of its own, cached under ``docker/.rumi/dev-envs/<id>-<key>/``
(``key`` hashes its requirements, the Python and the SDK): ``python -m venv``, then its
``requirements.txt`` installed by pip with ``--only-binary=:all:`` (wheels only: unpacking a wheel runs
none of its code, and a package published only as a source distribution is refused, naming it). The
SDK is not installed there: ``<env>/rumi-sdk/`` holds links to Rumi's own ``pack_runtime`` and the
installed distributions it needs (nats-py, msgspec, nkeys, anyio and their dependencies) and leads
``PYTHONPATH``, as the base image's SDK leads a Pack image's ``sys.path``. An unchanged requirements
file reuses the environment; a changed one builds a new one and removes the old. ``--no-env`` keeps the
old behaviour: the Pack runs with Rumi's own interpreter.

``--reload`` supervises the Pack: every 0.5 s it looks at the mtimes of the Pack's ``*.py`` files; on
a change it compiles them on the host (``compile()``: none of the Pack's code runs), and on a syntax
error prints ``main.py:LINE: SyntaxError: ...`` and keeps the running version. Otherwise it starts the
edited version beside the running one (a new proxy port and ready file), waits for its "ready" (the
SDK's ``RUMI_READY_FILE``), then stops the old one (SIGTERM): the SDK's queue group and its "stopping"
status make this the swap ``rumi up`` does on upgrade, so the next call reaches the new code and none is
refused in between. An edited version that exits or stays silent leaves the old one serving.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from broker.core.errors import EXIT_ENVIRONMENT, RumiError, RuntimeSetupError
from broker.core.workspace import Workspace

# What a local Python needs from the caller's environment (a container sets its own).
HOST_PASSTHROUGH = ("PATH", "LANG", "HOME", "VIRTUAL_ENV", "PYTHONPATH")
# In the Pack's own environment, PYTHONPATH and VIRTUAL_ENV are its own: the caller's are left out.
ENV_PASSTHROUGH = ("PATH", "LANG", "HOME")

Progress = Callable[[str], None]

DEV_ENVS = "dev-envs"
SDK_DIR = "rumi-sdk"
_MARKER = ".rumi-dev-env.json"
_ENV_FORMAT = 1
# pip options that could let a source distribution in, or install somewhere else: the caller's are
# dropped (index options such as PIP_INDEX_URL, PIP_FIND_LINKS or PIP_NO_INDEX are kept).
_PIP_DROPPED = frozenset(
    {
        "PIP_NO_BINARY",
        "PIP_ONLY_BINARY",
        "PIP_PREFER_BINARY",
        "PIP_TARGET",
        "PIP_PREFIX",
        "PIP_ROOT",
        "PIP_USER",
        "PIP_EDITABLE",
        "PIP_REQUIREMENT",
        "PIP_CONSTRAINT",
        "PYTHONPATH",
        "PYTHONHOME",
        "VIRTUAL_ENV",
    }
)
VENV_TIMEOUT = 180.0
PIP_TIMEOUT = 600.0

# --reload
POLL_INTERVAL = 0.5
MAX_WATCHED_FILES = 2000
READY_TIMEOUT = 30.0
# The SDK gives calls in flight 8 s (STOP_GRACE) and drains for up to 5 s more.
STOP_TIMEOUT = 15.0
_SKIP_DIRS = frozenset({"__pycache__", "node_modules"})


class DevEnvError(RumiError):
    """The Pack's own environment could not be made (pip failed, a requirement has no wheel)."""


class NoVenv(DevEnvError):
    """This Python cannot make a virtual environment (no venv or ensurepip module)."""

    exit_code = EXIT_ENVIRONMENT


@dataclass(frozen=True)
class LocalPack:
    """How to start one Pack as a local process."""

    argv: list[str]
    cwd: Path
    env: dict[str, str]
    pack_id: str = ""
    # The Pack's cached environment (None with --no-env: Rumi's own interpreter).
    env_dir: Path | None = field(default=None)


def prepare_local_pack(
    ws: Workspace, pack_id: str, *, own_env: bool = True, progress: Progress | None = None
) -> LocalPack:
    """The Pack's manifest, environment, credentials and work area; RumiError when it cannot run.

    `own_env` runs it in its cached environment (built first when missing: its requirements are
    installed, wheels only); False runs it with Rumi's own interpreter.
    """
    from broker.core.manifest import load_manifest

    manifest = load_manifest(ws, pack_id)
    source = ws.pack_source(pack_id)
    if not own_env:
        env = dev_environment(ws, pack_id)
        return LocalPack([sys.executable, manifest.entrypoint], source, env, pack_id)
    env_dir = ensure_dev_env(ws, pack_id, progress)
    env = dev_environment(ws, pack_id, passthrough=ENV_PASSTHROUGH)
    env["VIRTUAL_ENV"] = str(env_dir)
    env["PATH"] = os.pathsep.join(p for p in (str(env_dir / "bin"), env.get("PATH", "")) if p)
    env["PYTHONPATH"] = str(env_dir / SDK_DIR)
    return LocalPack([str(env_dir / "bin" / "python"), manifest.entrypoint], source, env, pack_id, env_dir)


def run_local_pack(pack: LocalPack, *, reload: bool = False, progress: Progress | None = None) -> int:
    """Run the Pack in the foreground until SIGTERM or SIGINT; its exit code.

    Without `reload`, one process, the signals forwarded to it. With `reload`, see `Supervisor`.
    """
    if reload:
        return Supervisor(pack, progress or _stderr).run()
    proc = subprocess.Popen(pack.argv, cwd=pack.cwd, env=pack.env)

    def forward(signum: int, _frame: Any) -> None:
        proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return proc.wait()


def dev_environment(
    ws: Workspace, pack_id: str, *, passthrough: tuple[str, ...] = HOST_PASSTHROUGH
) -> dict[str, str]:
    """The same variables a Pack gets in its container, plus what a local Python needs.

    Makes the Pack's identity known to the running NATS server (embedded or container) and creates
    its work area first.
    """
    from broker.bus.creds import pack_identity
    from broker.bus.server import nats_url, reload_running
    from broker.core.net import free_port
    from broker.core.pack_env import pack_environment

    identity = pack_identity(ws, pack_id)
    if (ws.state / "docker.json").exists():
        # `rumi up` runs NATS in a container: its config (listen address, port) is the runtime's.
        from broker.containers.engine import DockerRuntime

        runtime = DockerRuntime(ws)
        if runtime.write_nats_config(ws.pack_ids()):
            runtime.reload_nats()
    else:
        reload_running(ws, ws.pack_ids())
    work_area = ws.pack_work_area(pack_id)
    work_area.mkdir(parents=True, exist_ok=True)
    env = pack_environment(
        pack_id,
        nats_url=nats_url(ws),
        creds_file=str(identity.seed_path),
        work_area=work_area,
        proxy_listen=f"127.0.0.1:{free_port()}",
    )
    for key in passthrough:
        if key in os.environ:
            env[key] = os.environ[key]
    return env


# ------------------------------------------------------------------------ the Pack's own environment


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def pack_requirements(ws: Workspace, pack_id: str) -> list[str]:
    """The checked lines of ecosystem/<id>/requirements.txt (none when there is no such file)."""
    from broker.containers.packimage import parse_requirements
    from broker.core.errors import WorkspaceError

    req_file = ws.pack_source(pack_id) / "requirements.txt"
    if req_file.is_symlink():
        raise WorkspaceError(f"{req_file}: must be a regular file, not a link")
    if not req_file.is_file():
        return []
    try:
        text = req_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WorkspaceError(f"{req_file}: cannot read it ({exc})") from None
    return parse_requirements(text, str(req_file))


def _sdk_distributions() -> list[metadata.Distribution]:
    """The installed distributions `pack_runtime` needs: its pinned requirements and what they require.

    A requirement only an extra asks for is left out; one that is not installed here (a marker excludes
    it for this Python) is skipped.
    """
    from broker.containers.images import RUNTIME_REQUIREMENTS

    todo = [re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0] for req in RUNTIME_REQUIREMENTS]
    seen: dict[str, metadata.Distribution] = {}
    while todo:
        name = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen[key] = dist
        for req in dist.requires or []:
            spec, _, marker = req.partition(";")
            if "extra" in marker:
                continue
            todo.append(re.split(r"[<>=!~\[ (]", spec.strip(), maxsplit=1)[0])
    return [seen[k] for k in sorted(seen)]


def _sdk_entries() -> dict[str, Path]:
    """What `<env>/rumi-sdk/` links to: name -> path (pack_runtime and the SDK's installed packages)."""
    spec = importlib.util.find_spec("pack_runtime")
    locations = list(spec.submodule_search_locations or []) if spec else []
    runtime = next((Path(p) for p in locations if (Path(p) / "__init__.py").is_file()), None)
    if runtime is None:
        raise RuntimeSetupError("pack_runtime is not importable in Rumi's environment; reinstall Rumi")
    entries: dict[str, Path] = {"pack_runtime": runtime.resolve()}
    for dist in _sdk_distributions():
        files = dist.files
        if files is None:
            raise RuntimeSetupError(
                f"cannot list the files of {dist.metadata['Name']} in Rumi's environment (no RECORD); "
                "reinstall it, or run `rumi dev PACK --no-env`"
            )
        for file in files:
            top = file.parts[0] if file.parts else ""
            if not top or top in ("..", "__pycache__") or top.startswith("."):
                continue
            if top not in entries:
                entries[top] = Path(str(dist.locate_file(top))).resolve()
    return entries


def _env_key(requirements: list[str], sdk: dict[str, Path]) -> str:
    """What the environment is made from: its requirements, this Python, the SDK's packages."""
    base = getattr(sys, "_base_executable", sys.executable)
    parts = [
        f"format {_ENV_FORMAT}",
        "python " + ".".join(map(str, sys.version_info[:3])) + f" {sys.implementation.name}",
        os.path.realpath(base),
        *requirements,
        "--sdk--",
        *(f"{name} {path}" for name, path in sorted(sdk.items())),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def dev_env_dir(ws: Workspace, pack_id: str, key: str) -> Path:
    """`docker/.rumi/dev-envs/<pack_id>-<key>/`: one cached environment of a Pack."""
    return ws.state / DEV_ENVS / f"{pack_id}-{key}"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (two `rumi dev` of one Pack build its environment once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_dev_env(ws: Workspace, pack_id: str, progress: Progress | None = None) -> Path:
    """The Pack's cached environment, made (venv + wheels of its requirements + SDK links) when missing."""
    say = progress or _stderr
    requirements = pack_requirements(ws, pack_id)
    sdk = _sdk_entries()
    key = _env_key(requirements, sdk)
    env_dir = dev_env_dir(ws, pack_id, key)
    shown = env_dir.relative_to(ws.root) if env_dir.is_relative_to(ws.root) else env_dir
    if (env_dir / _MARKER).is_file():
        say(f"rumi dev: using the cached environment of {pack_id} ({shown})")
        return env_dir
    with _locked(ws.state / DEV_ENVS / f"{pack_id}.lock"):
        if (env_dir / _MARKER).is_file():
            say(f"rumi dev: using the cached environment of {pack_id} ({shown})")
            return env_dir
        began = time.monotonic()
        shutil.rmtree(env_dir, ignore_errors=True)  # a build that did not finish
        say(f"rumi dev: creating an environment for {pack_id} ({shown})")
        try:
            _create_venv(env_dir, with_pip=bool(requirements))
            _link_sdk(env_dir / SDK_DIR, sdk)
            if requirements:
                count = f"{len(requirements)} requirement{'s' if len(requirements) != 1 else ''}"
                say(f"rumi dev: installing {count} for {pack_id} (wheels only)…")
                _install_requirements(env_dir, pack_id, requirements)
        except BaseException:
            shutil.rmtree(env_dir, ignore_errors=True)
            raise
        (env_dir / _MARKER).write_text(
            json.dumps({"pack_id": pack_id, "requirements": requirements, "created": time.time()})
        )
        _prune(ws, pack_id, keep=env_dir)
        say(f"rumi dev: environment of {pack_id} ready in {time.monotonic() - began:.1f} s")
    return env_dir


def _create_venv(env_dir: Path, *, with_pip: bool) -> None:
    """`python -m venv` from Rumi's interpreter (the venv's base is the same Python)."""
    argv = [sys.executable, "-m", "venv", *([] if with_pip else ["--without-pip"]), str(env_dir)]
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=VENV_TIMEOUT,
            check=False,
            stdin=subprocess.DEVNULL,
            env={k: v for k, v in os.environ.items() if k not in _PIP_DROPPED},
        )
    except subprocess.TimeoutExpired:
        raise DevEnvError(f"python -m venv did not finish within {VENV_TIMEOUT:.0f} s") from None
    if done.returncode != 0:
        lines = [ln.strip() for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
        last = lines[-1][:300] if lines else f"exit code {done.returncode}"
        raise NoVenv(
            f"cannot create a virtual environment ({last}): install Python's venv module "
            "(e.g. the python3-venv package), or run `rumi dev PACK --no-env`"
        )


def _link_sdk(target: Path, sdk: dict[str, Path]) -> None:
    """`<env>/rumi-sdk/`: links to pack_runtime and the installed packages it needs."""
    target.mkdir(parents=True)
    for name, path in sorted(sdk.items()):
        (target / name).symlink_to(path, target_is_directory=path.is_dir())


def _install_requirements(env_dir: Path, pack_id: str, requirements: list[str]) -> None:
    """pip install the checked requirements into the environment, wheels only."""
    req_file = env_dir / "rumi-requirements.txt"
    req_file.write_text("\n".join(requirements) + "\n")
    argv = [
        str(env_dir / "bin" / "python"),
        "-m",
        "pip",
        "install",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--no-input",
        "--progress-bar=off",
        "-r",
        str(req_file),
    ]
    env = {k: v for k, v in os.environ.items() if k not in _PIP_DROPPED}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=PIP_TIMEOUT,
            check=False,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    except subprocess.TimeoutExpired:
        raise DevEnvError(
            f"Pack {pack_id}: pip install did not finish within {PIP_TIMEOUT:.0f} s "
            "(is the package index reachable?)"
        ) from None
    if done.returncode == 0:
        return
    from broker.containers.packimage import no_wheel_refusal

    version = ".".join(map(str, sys.version_info[:2]))
    if (
        refusal := no_wheel_refusal(f"{done.stdout}\n{done.stderr}", pack_id, f"Python {version}")
    ) is not None:
        raise DevEnvError(refusal)
    lines = [
        ln.strip()
        for ln in done.stderr.splitlines()
        if ln.strip() and not ln.startswith(("WARNING:", "  ", "[notice]"))
    ]
    last = lines[-1][:300] if lines else f"exit code {done.returncode}"
    raise DevEnvError(f"Pack {pack_id}: pip install failed: {last}")


def _prune(ws: Workspace, pack_id: str, keep: Path) -> None:
    """Remove this Pack's other environments (made for requirements it no longer has)."""
    pattern = re.compile(rf"^{re.escape(pack_id)}-[0-9a-f]{{16}}$")
    for child in (ws.state / DEV_ENVS).iterdir():
        if child != keep and child.is_dir() and not child.is_symlink() and pattern.match(child.name):
            shutil.rmtree(child, ignore_errors=True)


# -------------------------------------------------------------------------------------- --reload


def watched_files(root: Path) -> dict[str, tuple[int, int]]:
    """The Pack's `*.py` files and requirements.txt: relative path -> (mtime_ns, size); bounded."""
    found: dict[str, tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            if not (name.endswith(".py") or (name == "requirements.txt" and dirpath == str(root))):
                continue
            path = Path(dirpath) / name
            try:
                st = path.stat()
            except OSError:
                continue
            found[str(path.relative_to(root))] = (st.st_mtime_ns, st.st_size)
            if len(found) >= MAX_WATCHED_FILES:
                return found
    return found


def syntax_error(root: Path, files: list[str]) -> str | None:
    """`main.py:LINE: SyntaxError: ...` for the first of `files` that does not compile, else None.

    `compile()` parses the text only: none of the Pack's code runs.
    """
    for rel in sorted(files):
        if not rel.endswith(".py"):
            continue
        try:
            data = (root / rel).read_bytes()
        except OSError:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # SyntaxWarning / DeprecationWarning are not errors
                compile(data, rel, "exec", dont_inherit=True)
        except SyntaxError as exc:
            where = f"{rel}:{exc.lineno}" if exc.lineno else rel
            return f"{where}: {type(exc).__name__}: {exc.msg}"
        except (ValueError, RecursionError, MemoryError) as exc:  # NUL bytes, absurd nesting
            return f"{rel}: SyntaxError: {str(exc) or type(exc).__name__}"
    return None


class Supervisor:
    """`rumi dev --reload`: runs the Pack, and swaps in an edited version that compiles and says ready."""

    def __init__(self, pack: LocalPack, progress: Progress) -> None:
        self.pack = pack
        self.say = progress
        self.stop = threading.Event()
        self.current: subprocess.Popen[bytes] | None = None
        self.exit_code = 0
        self._tmp = Path(tempfile.mkdtemp(prefix="rumi-dev-"))
        self._starts = 0

    def run(self) -> int:
        def on_signal(_signum: int, _frame: Any) -> None:
            self.stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        root = self.pack.cwd
        try:
            seen = watched_files(root)
            error = syntax_error(root, list(seen))
            if error:
                self.say(f"rumi dev: {error} (fix it and save: the Pack starts then)")
            else:
                self._start_first()
            self.say(f"rumi dev: watching {root} for edits (*.py)")
            while not self.stop.wait(POLL_INTERVAL):
                self._check_exited()
                now = watched_files(root)
                if now == seen:
                    continue
                # An editor may write in steps: look again once it settled.
                if self.stop.wait(0.2):
                    break
                now = watched_files(root)
                changed = sorted(k for k in now if seen.get(k) != now[k])
                seen = now
                if not changed:
                    continue
                if "requirements.txt" in changed:
                    self.say(
                        "rumi dev: requirements.txt changed: restart `rumi dev` to install them "
                        "(reloading the code only)"
                    )
                error = syntax_error(root, list(now))
                if error:
                    keeps = "the running version keeps serving" if self._running() else "not started"
                    self.say(f"rumi dev: {error} ({keeps}; fix it and save)")
                    continue
                self._reload(", ".join(changed[:3]) + (" …" if len(changed) > 3 else ""))
        finally:
            self._stop_current()
            shutil.rmtree(self._tmp, ignore_errors=True)
        return self.exit_code

    def _running(self) -> bool:
        return self.current is not None and self.current.poll() is None

    def _check_exited(self) -> None:
        if self.current is not None and self.current.poll() is not None:
            code = self.current.returncode
            self.exit_code = code if code >= 0 else 128 - code
            self.say(
                f"rumi dev: the Pack exited with code {self.exit_code}; "
                "save an edit to start it again (Ctrl-C to stop)"
            )
            self.current = None

    def _spawn(self) -> tuple[subprocess.Popen[bytes], Path]:
        """Start one instance with its own proxy port and ready file."""
        from broker.core.net import free_port
        from broker.core.pack_env import proxy_environment

        self._starts += 1
        ready = self._tmp / f"ready-{self._starts}"
        env = dict(self.pack.env)
        env.update(proxy_environment(f"127.0.0.1:{free_port()}"))
        env["RUMI_READY_FILE"] = str(ready)
        # Its own process group: a Ctrl-C in the terminal reaches `rumi dev` alone, which stops it once.
        proc = subprocess.Popen(
            self.pack.argv, cwd=self.pack.cwd, env=env, stdin=subprocess.DEVNULL, process_group=0
        )
        return proc, ready

    def _start_first(self) -> None:
        self.current, _ = self._spawn()

    def _reload(self, what: str) -> None:
        if not self._running():
            self.say(f"rumi dev: {what} changed; starting the Pack")
            self._start_first()
            return
        self.say(f"rumi dev: {what} changed; starting the edited version")
        proc, ready = self._spawn()
        deadline = time.monotonic() + READY_TIMEOUT
        while not ready.exists():
            if proc.poll() is not None:
                self.say(
                    f"rumi dev: the edited version exited with code {proc.returncode} before it was ready "
                    "(its error is above); the running version keeps serving"
                )
                return
            if self.stop.is_set() or time.monotonic() > deadline:
                if not self.stop.is_set():
                    self.say(
                        f"rumi dev: the edited version was not ready within {READY_TIMEOUT:.0f} s; "
                        "the running version keeps serving"
                    )
                _terminate(proc)
                return
            time.sleep(0.05)
        old, self.current = self.current, proc
        if old is not None:
            _terminate(old)
        self.say(f"rumi dev: reloaded (pid {proc.pid}); the next call runs the edited code")

    def _stop_current(self) -> None:
        if self.current is not None:
            code = _terminate(self.current)
            self.exit_code = code
            self.current = None


def _terminate(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM, then SIGKILL after STOP_TIMEOUT; the exit code (0 for a clean stop)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    code = proc.returncode if proc.returncode is not None else 0
    return code if code >= 0 else 128 - code  # killed by a signal: 128 + its number, as a shell says
