"""Built-in handler terminal: run one command in a fresh sandbox container.

Args: `{"argv": [str, ...], "cwd": str | None, "timeout": float | None, "stdin": bytes | None}`.
Data: `{"exit_code": int, "stdout": bytes, "stderr": bytes, "timed_out": bool, "truncated": bool}`.

argv is exec form: nothing interprets it. A shell (or another command interpreter) as argv[0], or
behind a wrapper such as `env`/`timeout`/`xargs`, is refused unless the grant says `"shell": true`.
That rule states intent, it is not the boundary: the sandbox is (see `broker.backends.terminal` and
docs/terminal.md): only the granted directories, no network, no capabilities, a read-only root,
non-root, a fixed environment, time/output/memory/pids limits, and a new container per command.
"""

# No `from __future__ import annotations`: msgspec must see real types even when the
# broker loads this file without registering it in sys.modules.
import math
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Annotated, Any

import msgspec

from broker.handler_api import (
    Denied,
    HandlerContext,
    HandlerFailed,
    InvalidRequest,
    find_grant_root,
    is_pack_id,
    protected_set,
)

MAX_ARGS = 1024
MAX_ARG_CHARS = 32 * 1024
MAX_ARGV_CHARS = 256 * 1024
MAX_STDIN_BYTES = 4 * 1024 * 1024
MAX_PATH_CHARS = 4096
# Seconds kept back from the broker's own request timeout for create/start/remove.
SETUP_MARGIN = 3.0
# A reply must fit one NATS message (the server's default max_payload unless the broker says more).
DEFAULT_MAX_REPLY_BYTES = 1024 * 1024
REPLY_OVERHEAD_BYTES = 16 * 1024

SHELLS = frozenset(
    {"sh", "bash", "rbash", "dash", "ash", "zsh", "ksh", "ksh93", "mksh", "pdksh", "oksh", "yash", "posh",
     "csh", "tcsh", "fish", "elvish", "nu", "xonsh", "pwsh", "busybox", "toybox"}
)  # fmt: skip
# Interpreters that run code given as text are shells for this rule.
INTERPRETERS = frozenset(
    {"python", "python3", "python3.11", "python3.12", "python3.13", "perl", "ruby", "php", "node",
     "nodejs", "lua", "tclsh", "wish", "awk", "gawk", "mawk", "nawk", "expect"}
)  # fmt: skip
# Programs whose arguments are another command line.
WRAPPERS = frozenset(
    {"env", "nice", "nohup", "timeout", "stdbuf", "setsid", "xargs", "time", "ionice", "taskset", "chrt",
     "flock", "sudo", "su", "doas", "runuser", "unshare", "nsenter", "chroot", "watch", "script",
     "numactl", "setpriv", "setarch", "linux32", "linux64", "prlimit", "sg", "strace", "ltrace",
     "command", "exec", "builtin", "eval"}
)  # fmt: skip


class TerminalArgs(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Request args. There is no `env`: the command's environment is fixed by the broker."""

    argv: Annotated[
        list[Annotated[str, msgspec.Meta(max_length=MAX_ARG_CHARS)]],
        msgspec.Meta(min_length=1, max_length=MAX_ARGS),
    ]
    cwd: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_PATH_CHARS)] | None = None
    timeout: Annotated[float, msgspec.Meta(gt=0)] | None = None
    stdin: Annotated[bytes, msgspec.Meta(max_length=MAX_STDIN_BYTES)] | None = None


class TerminalGrant(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Grant entry: directories mounted into the sandbox (rw), and whether a shell may run."""

    enabled: bool = False
    directories: list[Annotated[str, msgspec.Meta(pattern="^/")]] = []
    shell: bool = False


class _ScopeConfig(msgspec.Struct, frozen=True):
    """The scope's default_config (the broker merges it into the grant); unknown keys are ignored."""

    timeout: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    max_timeout: Annotated[float, msgspec.Meta(gt=0)] = 300.0
    max_output_bytes: Annotated[int, msgspec.Meta(ge=0)] = 1024 * 1024
    memory_limit: Annotated[str, msgspec.Meta(pattern="^[0-9]+[bkmgBKMG]?$")] = "256m"
    pids_limit: Annotated[int, msgspec.Meta(ge=8)] = 64
    cpus: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    tmp_size: Annotated[str, msgspec.Meta(pattern="^[0-9]+[kmgKMG]?$")] = "64m"
    image: Annotated[str, msgspec.Meta(min_length=1)] = "rumi-sandbox:latest"
    max_concurrent: Annotated[int, msgspec.Meta(ge=1)] = 4  # per Pack


def _target(args: dict[str, Any]) -> str:
    argv = args.get("argv") if isinstance(args, dict) else None
    if isinstance(argv, list) and argv and isinstance(argv[0], str):
        return argv[0][:256]
    return ""


META: dict[str, Any] = {
    "requires_scope": True,
    "supports_modes": ["sandbox"],
    "description": "Run a command (argv; no shell unless granted) in a fresh sandbox container with only "
                   "the granted directories mounted, no network, no capabilities, time and output limits.",
    "grant_schema": TerminalGrant,
    "args_schema": TerminalArgs,
    "target": _target,
}  # fmt: skip


def _program(arg: str) -> str:
    return PurePosixPath(arg).name


def refuse_shell(argv: list[str]) -> None:
    """Raise Denied when argv runs a shell or interpreter, directly or behind a wrapper."""
    first = _program(argv[0])
    if first in SHELLS or first in INTERPRETERS:
        raise Denied(
            f"{first!r} is a shell or command interpreter and this grant has no `shell: true`; "
            "pass the program and its arguments as argv instead"
        )
    if first in WRAPPERS:
        for arg in argv[1:]:
            name = _program(arg)
            if name in SHELLS or name in INTERPRETERS:
                raise Denied(
                    f"{first!r} would run the shell {name!r} and this grant has no `shell: true`; "
                    "pass the program and its arguments as argv instead"
                )


def _check_argv(argv: list[str]) -> None:
    if not argv[0]:
        raise InvalidRequest("argv[0] must be a non-empty program name")
    if any("\0" in a for a in argv):
        raise InvalidRequest("argv contains a NUL character")
    if sum(len(a) for a in argv) > MAX_ARGV_CHARS:
        raise InvalidRequest(f"argv is longer than {MAX_ARGV_CHARS} characters in total")


def _scope(grant: Mapping[str, Any]) -> _ScopeConfig:
    fields = {k: grant[k] for k in _ScopeConfig.__struct_fields__ if k in grant and grant[k] is not None}
    try:
        return msgspec.convert(fields, _ScopeConfig)
    except msgspec.ValidationError as exc:
        raise HandlerFailed(f"the terminal scope is invalid ({exc}); ask the admin to fix it") from None


def _timeout(requested: float | None, scope: _ScopeConfig, broker_timeout: float) -> float:
    """The command's timeout: asked (else the scope's default), within max_timeout and the broker's limit.

    Asking for more than either allows is refused with the limit and where it is set, never cut
    silently (a Pack asking for 60 s under a 30 s request_timeout must know it gets none of it).
    The scope's default is kept within the limit.
    """
    cap = scope.max_timeout
    where = "the terminal scope's max_timeout (docker/scopes/terminal.json)"
    if math.isfinite(broker_timeout) and broker_timeout > 0:
        # Answer with timed_out before the broker gives up on the request.
        margin = min(SETUP_MARGIN, broker_timeout / 4)
        if broker_timeout - margin < cap:
            cap = broker_timeout - margin
            where = (
                f"the broker's request_timeout of {broker_timeout:g} s (docker/config.json, broker.request_timeout) "
                f"less {margin:g} s to set up the sandbox"
            )
    if requested is None:
        return min(scope.timeout, cap)
    if requested > cap:
        raise InvalidRequest(
            f"timeout {requested:g} s is over the limit of {cap:g} s for a command, set by {where}: "
            f"ask for at most {cap:g} s, or have the admin raise it"
        )
    return requested


def _cwd(cwd: str | None, directories: list[str]) -> str:
    if cwd is None:
        return directories[0]
    if "\0" in cwd:
        raise InvalidRequest("cwd contains a NUL character")
    if not cwd.startswith("/"):
        raise InvalidRequest("cwd must be absolute (start with /)")
    if any(c in (".", "..") for c in cwd.split("/")):
        raise InvalidRequest("cwd must not contain . or .. components")
    find_grant_root(cwd, directories)  # Denied when outside every granted directory
    return "/" + "/".join(c for c in cwd.split("/") if c)


def fit_reply(stdout: bytes, stderr: bytes, max_reply_bytes: int | None) -> tuple[bytes, bytes, bool]:
    """Trim output so the whole reply fits one NATS message (else the Pack gets too_large, no output).

    `max_reply_bytes` is the broker's (None or 0: the default). stderr keeps at least a quarter of the
    budget when both are long. Returns (stdout, stderr, trimmed).
    """
    reply = max_reply_bytes if max_reply_bytes and max_reply_bytes > 0 else DEFAULT_MAX_REPLY_BYTES
    budget = max(0, reply - REPLY_OVERHEAD_BYTES)
    if len(stdout) + len(stderr) <= budget:
        return stdout, stderr, False
    err_keep = min(len(stderr), max(budget - len(stdout), budget // 4))
    out_keep = min(len(stdout), budget - err_keep)
    return stdout[:out_keep], stderr[:err_keep], True


def _granted_directories(grant: Mapping[str, Any]) -> list[str]:
    raw_dirs = grant.get("directories")
    if not isinstance(raw_dirs, list) or not raw_dirs or not all(isinstance(d, str) for d in raw_dirs):
        raise Denied("no directories are granted to terminal")
    return ["/" + "/".join(c for c in d.split("/") if c) for d in raw_dirs]


def authorize(grant: Mapping[str, Any], args: TerminalArgs) -> None:
    """Refuse on the arguments alone: argv well formed, no shell unless granted, cwd in a grant."""
    _check_argv(list(args.argv))
    if grant.get("shell") is not True:
        refuse_shell(list(args.argv))
    _cwd(args.cwd, _granted_directories(grant))


def execute(ctx: HandlerContext, args: TerminalArgs) -> dict[str, Any]:
    """Run argv in a new sandbox container; return its exit code and (capped) output."""
    # Imported here: loading this file to check grants (`rumi grants`) must not load the sandbox back-end.
    from broker.handler_api import sandbox as _sandbox

    grant = ctx.grant
    argv = list(args.argv)
    _check_argv(argv)
    if grant.get("shell") is not True:
        refuse_shell(argv)
    scope = _scope(grant)
    directories = _granted_directories(grant)
    cwd = _cwd(args.cwd, directories)
    limits = _sandbox.SandboxLimits(
        timeout=_timeout(args.timeout, scope, ctx.limits.timeout),
        max_output_bytes=scope.max_output_bytes,
        memory_limit=scope.memory_limit,
        pids_limit=scope.pids_limit,
        cpus=scope.cpus,
        tmp_size=scope.tmp_size,
    )
    pack_id = ctx.pack_id
    if not is_pack_id(pack_id):
        raise HandlerFailed("the broker gave no valid pack id; terminal is refused")
    with (
        _sandbox.command_slot(pack_id, scope.max_concurrent),
        _sandbox.open_granted_directories(directories, protected_set(ctx)) as granted,
    ):
        home, _ = find_grant_root(cwd, [g.path for g in granted])
        owner = next(g for g in granted if g.path == home)
        _sandbox.check_cwd(owner, cwd)
        uid, gid = _sandbox.sandbox_user(owner)
        command = _sandbox.SandboxCommand(
            argv=tuple(argv),
            cwd=cwd,
            uid=uid,
            gid=gid,
            mounts=tuple((g.path, g.identity) for g in granted),
            stdin=args.stdin,
        )
        result = _sandbox.run_in_sandbox(_sandbox.engine(), scope.image, command, limits, pack_id=pack_id)
    stdout, stderr, trimmed = fit_reply(result.stdout, result.stderr, ctx.limits.max_reply_bytes)
    truncated = result.truncated or trimmed
    # Sizes and status only: never the output itself.
    ctx.audit.update(
        exit_code=result.exit_code,
        run_ms=round(result.duration * 1000, 1),
        stdout_bytes=result.stdout_total,
        stderr_bytes=result.stderr_total,
        timed_out=result.timed_out,
        truncated=truncated,
        oom_killed=result.oom_killed,
    )
    return {
        "success": True,
        "data": {
            "exit_code": result.exit_code,
            "stdout": stdout,
            "stderr": stderr,
            "timed_out": result.timed_out,
            "truncated": truncated,
        },
    }
