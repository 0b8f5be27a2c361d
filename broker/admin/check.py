"""`rumi check`: would the broker allow this request, which rule decides, and which `rumi grant` fixes it.

The verdict comes from the broker's own functions, in the broker's order (`Broker._decide_and_run`):
`Policy.decide(pack, component, capability)` (scope and grant), `plugin.convert_args(args)`, then the
handler's pure `authorize(grant, args)`. Nothing else runs: no NATS, no audit event, no handler
`execute`, no file written. What only `execute` checks (openat2 resolution beneath the grant,
protected files by inode, the addresses a host name resolves to, the command itself) is not
covered, and a verdict says so.

The grant file named is the one that decides, as `Policy.decide` resolves it (`grant_source`): the
component's own file when it has an entry for the capability, else its Pack's Pack-wide `<pack_id>:*`
file (an allowed request names `Decision.source`); an invalid file of either denies everything.

The deciding rule is named from what refused (`RULES`: the refusal's code and message, refined with
the grant file's state for "no grant"). The fix is searched, not guessed: the grant file is changed
in memory the way `rumi grant` would change it, checked with the broker's loader
(`check_grant_document`, which refuses protected paths) and the request re-run against it, adding
one option per refusal until it passes (verified) or no grant option can help (then it says why).
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import msgspec

from broker.core.errors import EXIT_USAGE, RequestError, RumiError
from broker.core.ids import is_pack_wide, pack_wide_id, parse_component_id
from broker.core.workspace import Workspace
from broker.policy.grants import GrantFileState, Policy, check_grant_document, grant_source
from broker.policy.plugins import HandlerPlugin, display_path

__all__ = [
    "RULES",
    "CheckUsageError",
    "Fix",
    "Verdict",
    "args_from_options",
    "args_from_target",
    "check_request",
    "load_policy",
    "plugin_for",
    "rule_of",
]

MAX_FIX_STEPS = 6


class CheckUsageError(RumiError):
    """The request to check makes no sense (unknown capability, an option it does not take)."""

    exit_code = EXIT_USAGE


# --- rules: what refused, by the refusal's code and message ------------------------------------------

# (rule, code, message pattern): the first match names the rule. The messages are the broker's and the
# built-in handlers' own (`Policy.decide`, `broker.backends.files`, `egress`, `config/handlers/*.py`).
RULES: tuple[tuple[str, str, re.Pattern[str]], ...] = tuple(
    (rule, code, re.compile(pattern))
    for rule, code, pattern in (
        ("scope_invalid", "permission_denied", r"has an invalid scope file"),
        ("scope_missing", "permission_denied", r"has no scope installed"),
        ("component_not_in_pack", "permission_denied", r"does not belong to pack"),
        ("request_not_from_pack", "permission_denied", r"did not come from this Pack's account"),
        ("grant_file_invalid", "permission_denied", r"^no grant for .*grant file is invalid"),
        ("no_grant", "permission_denied", r"^no grant for "),
        ("path_outside_directories", "permission_denied", r"path is outside the granted directories"),
        ("no_directories", "permission_denied", r"^no directories are granted"),
        ("path_escapes", "permission_denied", r"path escapes the granted directory"),
        ("protected_path", "permission_denied", r"path is protected|hard link to a protected file"),
        ("key_not_granted", "permission_denied", r"^key is not granted"),
        ("shell_not_granted", "permission_denied", r"has no `shell: true`"),
        ("host_not_granted", "permission_denied", r"^host \S+ is not granted"),
        ("port_not_granted", "permission_denied", r"^port \d+ is not granted"),
        ("address_not_granted", "permission_denied", r"^address .*grant it as an IP/CIDR entry"),
        ("tunnel_port_not_granted", "permission_denied", r"^tunnels to port"),
        ("scheme_not_allowed", "permission_denied", r"^scheme .* is not allowed"),
        ("redirect_refused", "permission_denied", r"^redirect from"),
    )
)
# A code without a more specific rule.
_CODE_RULES = {
    "ok": "allowed",
    "permission_denied": "handler_refused",
    "unknown_capability": "unknown_capability",
    "invalid_request": "invalid_request",
    "too_large": "too_large",
    "rate_limited": "rate_limited",
    "timeout": "handler_failed",
    "handler_error": "handler_failed",
    "unavailable": "unavailable",
}


def rule_of(code: str, message: str) -> str:
    """The rule a refusal with this contract `code` and `message` comes from (`RULES`, else by code)."""
    for rule, rule_code, pattern in RULES:
        if code == rule_code and pattern.search(message):
            return rule
    return _CODE_RULES.get(code, "refused")


# --- verdicts ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fix:
    """How to make the request pass: a `rumi grant` command (`argv`), or why no grant can (`argv` None).

    `verified`: the request was re-run against the grant file as that command would leave it, and passed.
    """

    argv: tuple[str, ...] | None
    note: str
    verified: bool = False

    @property
    def command(self) -> str | None:
        return None if self.argv is None else shlex.join(self.argv)

    def as_json(self) -> dict[str, Any]:
        return {"command": self.command, "argv": self.argv, "verified": self.verified, "note": self.note}


@dataclass(frozen=True)
class Verdict:
    """What the broker would answer, which rule decided, the grant file it read, and the fix."""

    component_id: str
    capability: str
    target: str
    allowed: bool
    code: str  # "ok", or the contract error code the Pack would get
    rule: str  # a name from RULES / _CODE_RULES, or a grant-file rule (no_grant_file, not_granted, ...)
    reason: str  # the message the Pack would get ("" when allowed)
    detail: str  # the deciding rule in words, naming what was granted
    grant_file: Path  # the file that decides: the component's own, or its Pack's `<pack_id>:*` file
    grant_file_exists: bool
    fix: Fix | None = None
    notes: tuple[str, ...] = ()
    args_checked: bool = True  # False: only scope and grant were checked (the arguments are unknown)

    @property
    def decision(self) -> str:
        return "allow" if self.allowed else "deny"

    def as_json(self) -> dict[str, Any]:
        return {
            "component_id": self.component_id,
            "capability": self.capability,
            "target": self.target,
            "decision": self.decision,
            "allowed": self.allowed,
            "code": self.code,
            "rule": self.rule,
            "reason": self.reason,
            "detail": self.detail,
            "grant_file": str(self.grant_file),
            "grant_file_exists": self.grant_file_exists,
            "arguments_checked": self.args_checked,
            "fix": None if self.fix is None else self.fix.as_json(),
            "notes": list(self.notes),
        }


# --- request arguments -------------------------------------------------------------------------------

# `rumi check` option -> the argument names it fills, first present wins (terminal: --path is the cwd).
OPTION_FIELDS: dict[str, tuple[str, ...]] = {
    "path": ("path", "cwd"),
    "key": ("key",),
    "url": ("url",),
    "argv": ("argv",),
}


def _arg_fields(plugin: HandlerPlugin) -> dict[str, msgspec.structs.FieldInfo] | None:
    if plugin.args_schema is None:
        return None
    return {f.encode_name: f for f in msgspec.structs.fields(plugin.args_schema)}


def args_from_options(
    plugin: HandlerPlugin,
    *,
    path: str | None = None,
    key: str | None = None,
    url: str | None = None,
    argv: str | None = None,
) -> dict[str, Any]:
    """The request's args from `rumi check` options, by the handler's `args_schema`.

    `argv` is one shell-like string (split with shlex, nothing runs it). Required arguments the options
    cannot give get a neutral value (`data`: empty bytes, `method`: GET). CheckUsageError for an option
    the capability does not take, or none given where it takes one.
    """
    given = {"path": path, "key": key, "url": url, "argv": argv}
    fields = _arg_fields(plugin)
    args: dict[str, Any] = {}
    for option, value in given.items():
        if value is None:
            continue
        names = OPTION_FIELDS[option] if fields is not None else (option,)
        name = next((n for n in names if fields is None or n in fields), None)
        if name is None:
            takes = _options_taken(fields)
            hint = f"it takes {', '.join(takes)}" if takes else "it takes no option: check it without one"
            raise CheckUsageError(f"{plugin.name} takes no --{option} ({hint})")
        if option == "argv":
            try:
                words = shlex.split(value)
            except ValueError as exc:
                raise CheckUsageError(f"--argv {value!r} cannot be split into words ({exc})") from None
            if not words:
                raise CheckUsageError("--argv is empty: give the command, e.g. --argv 'ls -la'")
            args[name] = words
        else:
            args[name] = value
    if fields is None:
        return args
    takes = _options_taken(fields)
    if takes and not args:
        raise CheckUsageError(f"{plugin.name} needs {' or '.join(takes)} to check a request")
    if "url" in args and "method" in fields and "method" not in args:
        args["method"] = "GET"
    for name, info in fields.items():
        if name in args or not info.required:
            continue
        if name == "data":
            args[name] = b""  # the size rule is not checked: rumi check sends no content
            continue
        raise CheckUsageError(
            f"{plugin.name} needs the argument `{name}`, which rumi check cannot give "
            f"(options: --path, --key, --url, --argv)"
        )
    return args


def _options_taken(fields: Mapping[str, Any] | None) -> list[str]:
    if fields is None:
        return [f"--{o}" for o in OPTION_FIELDS]
    return [f"--{o}" for o, names in OPTION_FIELDS.items() if any(n in fields for n in names)]


def args_from_target(plugin: HandlerPlugin, target: str) -> dict[str, Any] | None:
    """Arguments rebuilt from an audit event's `target` (None when it records none to rebuild from).

    A target holds only what the audit keeps: a path, a key name, `host:port`, or `argv[0]`.
    """
    if not target:
        return None
    fields = _arg_fields(plugin) or {}
    if "url" in fields:
        if not re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):\d{1,5}", target):
            return None
        return {"method": "GET", "url": f"http://{target}/"} if "method" in fields else {"url": target}
    for name in ("path", "key"):
        if name in fields:
            args: dict[str, Any] = {name: target}
            if "data" in fields and fields["data"].required:
                args["data"] = b""
            return args
    if "argv" in fields:
        return {"argv": [target]}
    return None


# --- the check ---------------------------------------------------------------------------------------


def load_policy(ws: Workspace) -> Policy:
    """The workspace's handlers, scopes and grants, loaded as the broker loads them."""
    if not ws.handlers.is_dir():
        raise CheckUsageError(f"no workspace at {ws.root}: run `rumi init` first (or pass --root)")
    return Policy.for_workspace(ws)


def plugin_for(policy: Policy, capability: str) -> HandlerPlugin:
    """The installed handler of `capability`; CheckUsageError naming the installed ones otherwise."""
    plugin = policy.registry.get(capability)
    if plugin is not None:
        return plugin
    refused = policy.registry.error_for(capability)
    if refused is not None:
        raise CheckUsageError(f"unknown capability {capability!r}: its handler is refused ({refused})")
    installed = ", ".join(policy.registry.names()) or "none"
    raise CheckUsageError(f"unknown capability {capability!r} (installed: {installed})")


def check_request(
    ws: Workspace,
    component_id: str,
    capability: str,
    args: Mapping[str, Any] | None,
    *,
    policy: Policy | None = None,
    root_hint: str | None = None,
) -> Verdict:
    """Decide `capability` with `args` for `component_id` as the broker would, with no side effect.

    `args` None: the arguments are unknown (an audit event without a target); only scope and grant
    are checked. `root_hint`: a workspace root to put in the suggested `rumi grant` command.
    """
    try:
        pack_id = parse_component_id(component_id)[0]
    except ValueError as exc:
        raise CheckUsageError(str(exc)) from None
    policy = policy or load_policy(ws)
    plugin = plugin_for(policy, capability)
    raw = dict(args) if args is not None else None
    target = _target(plugin, raw or {})
    own = _grant_state(policy, ws.grant_file(component_id))  # the file a suggested `rumi grant` edits
    source = _deciding_source(policy, pack_id, component_id, capability)
    grant_file = ws.grant_file(source)
    notes = _notes(ws, pack_id, plugin, raw)
    base = Verdict(
        component_id=component_id,
        capability=capability,
        target=target,
        allowed=False,
        code="",
        rule="",
        reason="",
        detail="",
        grant_file=grant_file,
        grant_file_exists=grant_file.exists(),
        notes=notes,
        args_checked=raw is not None,
    )
    # 1. scope and grant: the broker's own decision.
    try:
        decision = policy.decide(pack_id, component_id, capability)
    except RequestError as exc:
        deciding = _grant_state(policy, grant_file)
        rule, detail = _grant_rule(ws, exc, capability, deciding, grant_file, _wide_state(ws, policy, source))
        fix = _fix(ws, policy, plugin, component_id, raw, own, rule, exc, root_hint, source, deciding)
        return replace(base, code=exc.code, rule=rule, reason=exc.message, detail=detail, fix=fix)
    if decision.source:  # the policy's own word on which file allowed it (`<pack_id>:*`: Pack-wide)
        source = decision.source
        grant_file = ws.grant_file(source)
        base = replace(base, grant_file=grant_file, grant_file_exists=grant_file.exists())
    if decision.grant.get("mode") == "ask":
        timeout = decision.grant.get("ask_timeout", 20)
        base = replace(
            base,
            notes=(
                *base.notes,
                f"this entry asks: the broker holds such a request until an operator answers it "
                f"(`rumi pending`, `rumi approve`/`rumi deny`), and denies it after {float(timeout):g} s",
            ),
        )
    if raw is None:
        detail = (
            f"{_shown(grant_file)} enables {capability}; the request's arguments are unknown, so the "
            "handler's own check was not run"
        )
        return replace(base, allowed=True, code="ok", rule="grant_only", detail=detail)
    # 2. arguments and the handler's pure check, on the grant the broker would hand it.
    refusal = _authorize(plugin, decision.grant, raw)
    if refusal is None:
        detail = _allowed_detail(plugin, decision.grant, raw, grant_file)
        return replace(base, allowed=True, code="ok", rule="allowed", detail=detail)
    rule = rule_of(refusal.code, refusal.message)
    return replace(
        base,
        code=refusal.code,
        rule=rule,
        reason=refusal.message,
        detail=_refusal_detail(rule, refusal, plugin, decision.grant, raw, grant_file),
        fix=_fix(ws, policy, plugin, component_id, raw, own, rule, refusal, root_hint, source),
    )


def _target(plugin: HandlerPlugin, raw: dict[str, Any]) -> str:
    """What the audit event would name, by the handler's own `target` (as the broker computes it)."""
    try:
        return str(plugin.target(raw))[:256]
    except Exception:
        return ""


def _authorize(
    plugin: HandlerPlugin, grant: Mapping[str, Any], raw: Mapping[str, Any]
) -> RequestError | None:
    """The broker's steps after the decision: convert the args, then the handler's `authorize`."""
    from broker.core.errors import Unavailable

    try:
        args = plugin.convert_args(raw)
        if plugin.authorize is not None:
            plugin.authorize(grant, args)
    except RequestError as exc:
        return exc
    except Exception as exc:
        # The broker fails closed on a crashing authorize: `unavailable`, "internal broker error".
        failed = Unavailable("internal broker error")
        failed.add_note(f"{plugin.name}'s authorize raised {type(exc).__name__}")
        return failed
    return None


def _grant_state(policy: Policy, grant_file: Path) -> GrantFileState | None:
    return next((s for s in policy.grants.files() if s.path == grant_file), None)


def _deciding_source(policy: Policy, pack_id: str, component_id: str, capability: str) -> str:
    """The grant target whose file decides `capability` for the component, as `Policy.decide` resolves
    it (`grant_source`): its own file when that has an entry for the capability (enabled or not), else
    the Pack-wide `<pack_id>:*`. An invalid file decides by denying everything (the component's own
    first). With no entry in either, the component's own file: the one `rumi grant` would write."""
    states = {s.component_id: s for s in policy.grants.files() if s.component_id is not None}
    invalid = {t for t, s in states.items() if not s.usable}
    present = {t: frozenset(s.entries) for t, s in states.items() if s.usable}
    wide = pack_wide_id(pack_id)
    source = grant_source(component_id, capability, present, invalid)
    if source is None:
        return component_id if component_id in invalid else wide
    if source == wide and capability not in present.get(wide, ()):
        return component_id
    return source


def _wide_state(ws: Workspace, policy: Policy, source: str) -> GrantFileState | None:
    """The Pack's Pack-wide grant file, when it is not itself the deciding one (to name what it grants)."""
    wide = pack_wide_id(source.partition(":")[0])
    return None if source == wide else _grant_state(policy, ws.grant_file(wide))


def _shown(path: Path) -> str:
    return display_path(path)


def _notes(
    ws: Workspace, pack_id: str, plugin: HandlerPlugin, raw: Mapping[str, Any] | None
) -> tuple[str, ...]:
    notes = []
    if pack_id not in ws.pack_ids():
        notes.append(
            f"pack {pack_id!r} is not in this workspace (no ecosystem/{pack_id}): it sends no requests"
        )
    if raw is not None:
        notes.append(
            "checked: scope, grant and the handler's authorize(); not run: the handler itself, so what "
            "only it checks (symlinks and protected files on disk, where a host name resolves) can "
            "still refuse an allowed request"
        )
    if plugin.args_schema is not None and raw is not None and "data" in raw and raw["data"] == b"":
        notes.append("no content was given: a size limit is not checked")
    return tuple(notes)


def _grant_rule(
    ws: Workspace,
    exc: RequestError,
    capability: str,
    state: GrantFileState | None,
    grant_file: Path,
    wide: GrantFileState | None = None,
) -> tuple[str, str]:
    """The rule of a refusal by `Policy.decide`, refined with the deciding grant file's state (`wide`:
    the Pack-wide file, when it exists and did not decide: it has no entry for the capability)."""
    rule = rule_of(exc.code, exc.message)
    shown = _shown(grant_file)
    nor = ""
    if wide is not None and wide.usable:
        granted = ", ".join(sorted(wide.permissions)) or "nothing"
        nor = f", nor has the Pack-wide {_shown(wide.path)} (it grants: {granted})"
    if rule == "scope_missing":
        return (
            rule,
            f"{capability} needs a scope file and {_shown(ws.scopes / f'{capability}.json')} is missing",
        )
    if rule == "scope_invalid":
        return rule, f"the scope file {_shown(ws.scopes / f'{capability}.json')} is invalid: {exc.message}"
    if rule not in ("no_grant", "grant_file_invalid"):
        return rule, exc.message
    if state is None:
        if nor:
            return "no_grant_file", f"there is no grant file {shown}{nor}"
        return "no_grant_file", f"there is no grant file {shown}: the component is granted nothing"
    if not state.usable:
        first = str(state.errors[0]) if state.errors else "invalid"
        who = "every component of the Pack is" if is_pack_wide(grant_file.stem) else "the component is"
        return "grant_file_invalid", f"{shown} is invalid, so {who} denied everything: {first}"
    written = state.permissions.get(capability)
    if written is None:
        granted = ", ".join(sorted(state.permissions)) or "nothing"
        return "not_granted", f"{shown} has no {capability} entry (it grants: {granted}){nor}"
    if isinstance(written, dict) and written.get("enabled") is not True:
        return "disabled", f'the {capability} entry of {shown} is not "enabled": true'
    return "no_grant", exc.message


def _dirs(grant: Mapping[str, Any]) -> list[str]:
    value = grant.get("directories")
    return [d for d in value if isinstance(d, str)] if isinstance(value, list) else []


def _allowed_detail(
    plugin: HandlerPlugin, grant: Mapping[str, Any], raw: Mapping[str, Any], grant_file: Path
) -> str:
    from broker.backends.files import find_grant_root

    shown = _shown(grant_file)
    parts: list[str] = []
    place = raw.get("path", raw.get("cwd"))
    if "directories" in grant:
        directories = _dirs(grant)
        if isinstance(place, str):
            try:
                root, _ = find_grant_root(place, directories)
                parts.append(f"{place} is beneath the granted directory {root}")
            except RequestError:
                pass
        elif directories:
            parts.append(f"it runs in the granted directory {directories[0]}")
    if isinstance(raw.get("key"), str):
        parts.append(f"key {raw['key']} is listed in allowed_keys")
    argv = raw.get("argv")
    if isinstance(argv, list) and argv and "shell" in grant:
        parts.append(
            "the grant allows a shell" if grant.get("shell") is True else f"{argv[0]} is not a shell"
        )
    if isinstance(raw.get("url"), str):
        parts.append(_network_match(grant, raw["url"]))
    if not parts:
        checked = "its authorize() accepted the arguments" if plugin.authorize else "it has no authorize()"
        parts.append(f"an enabled {plugin.name} entry; {checked}")
    return f"{'; '.join(parts)} ({shown})"


def _network_match(grant: Mapping[str, Any], url: str) -> str:
    """Which allowed_domains entry covers the URL's host and port (each entry tried alone)."""
    from broker.backends.egress import EgressPolicy, parse_destination, parse_host_entry

    try:
        dest = parse_destination(url)
    except RequestError:
        return "the URL passed the network check"
    ports = [p for p in grant.get("allowed_ports") or [] if isinstance(p, int)]
    for entry in grant.get("allowed_domains") or []:
        try:
            EgressPolicy.from_grant([entry], ports, allow_wide_networks=True).check_destination(dest)
            own_port = parse_host_entry(entry).port is not None
        except (RequestError, ValueError, TypeError):
            continue
        how = "" if own_port else f" and port {dest.port} by allowed_ports"
        return f"{dest.target} is covered by the allowed_domains entry {entry!r}{how}"
    return f"{dest.target} passed the network check"


def _refusal_detail(
    rule: str,
    exc: RequestError,
    plugin: HandlerPlugin,
    grant: Mapping[str, Any],
    raw: Mapping[str, Any],
    grant_file: Path,
) -> str:
    shown = _shown(grant_file)
    place = raw.get("path", raw.get("cwd"))
    if rule == "path_outside_directories":
        return f"{place} is outside the granted directories: {', '.join(_dirs(grant))} ({shown})"
    if rule == "no_directories":
        return f"the {plugin.name} entry of {shown} lists no directories"
    if rule == "path_escapes":
        return f"{place} climbs out of its granted directory with '..' ({shown})"
    if rule == "key_not_granted":
        keys = [k for k in grant.get("allowed_keys") or [] if isinstance(k, str)]
        return f"key {raw.get('key')} is not in allowed_keys: {', '.join(keys) or 'none'} ({shown})"
    if rule == "shell_not_granted":
        return f"{exc.message} ({shown})"
    if rule in ("host_not_granted", "port_not_granted", "address_not_granted", "tunnel_port_not_granted"):
        domains = ", ".join(str(d) for d in grant.get("allowed_domains") or []) or "none"
        ports = ", ".join(str(p) for p in grant.get("allowed_ports") or []) or "none"
        return f"{exc.message}; granted: allowed_domains {domains}, allowed_ports {ports} ({shown})"
    notes = getattr(exc, "__notes__", None)
    return f"{exc.message} ({notes[0]})" if notes else exc.message


# --- the fix -----------------------------------------------------------------------------------------

# grant key -> the `rumi grant` option that adds to it (broker/cli/grants.py).
GRANT_OPTIONS = {
    "directories": "--dir",
    "allowed_keys": "--key",
    "allowed_domains": "--domain",
    "allowed_ports": "--port",
    "shell": "--shell",
    "allow_wide_networks": "--allow-wide-networks",
    "plaintext_tunnel": "--plaintext-tunnel",
}
_FLAGS = frozenset({"shell", "allow_wide_networks", "plaintext_tunnel"})
_PLACEHOLDERS = {
    "directories": "DIR",
    "allowed_keys": "KEY",
    "allowed_domains": "HOST",
    "allowed_ports": "PORT",
}

_Step = tuple[str, Any]  # (grant key, value)
_NO_PLACE = "no place"  # a refusal about directories, for a request that names none


@dataclass
class _Search:
    """One fix search: the grant file as `rumi grant` would leave it after `steps`, re-checked."""

    ws: Workspace
    policy: Policy
    plugin: HandlerPlugin
    component_id: str
    state: GrantFileState | None
    steps: list[_Step] = field(default_factory=list)

    def grant_keys(self) -> set[str]:
        return {f.encode_name for f in msgspec.structs.fields(self.plugin.grant_schema)}

    def document(self) -> dict[str, Any]:
        permissions: dict[str, Any] = dict(self.state.permissions) if self.state is not None else {}
        written = permissions.get(self.plugin.name)
        entry = dict(written) if isinstance(written, dict) else {}
        entry["enabled"] = True
        for key, value in self.steps:
            if key in _FLAGS:
                entry[key] = True
            else:
                current = entry.get(key, [])
                current = list(current) if isinstance(current, list) else []
                if value not in current:
                    current.append(value)
                entry[key] = current
        permissions[self.plugin.name] = entry
        return {"component_id": self.component_id, "permissions": permissions}

    def run(self, raw: Mapping[str, Any]) -> RequestError | str | None:
        """None: allowed; a RequestError: still refused; a str: the loader refuses the changed file."""
        path = self.ws.grant_file(self.component_id)
        data = (json.dumps(self.document(), indent=2) + "\n").encode()
        scopes = self.policy.scopes.current
        state = check_grant_document(self.ws, self.policy.registry.plugins, scopes, path, data)
        if not state.usable:
            return str(state.errors[0]) if state.errors else "the changed grant file is refused"
        grant = state.grants.get(self.plugin.name)
        if grant is None:
            return f"the {self.plugin.name} entry is refused"
        return _authorize(self.plugin, grant, raw)

    def command(self, root_hint: str | None, *, placeholders: Sequence[_Step] = ()) -> tuple[str, ...]:
        argv = ["rumi", "grant", self.component_id, self.plugin.name]
        for key, value in [*self.steps, *placeholders]:
            option = GRANT_OPTIONS[key]
            argv += [option] if key in _FLAGS else [option, str(value)]
        if root_hint:
            argv += ["--root", root_hint]
        return tuple(argv)


def _next_steps(rule: str, search: _Search, raw: Mapping[str, Any], message: str) -> list[_Step] | str:
    """The grant options that answer this refusal, or why no grant option can."""
    from broker.backends.egress import parse_destination

    takes = search.grant_keys()
    place = raw.get("path", raw.get("cwd"))
    wanted: list[_Step]
    if rule in ("path_outside_directories", "no_directories", "path_escapes"):
        if place is None:
            return _NO_PLACE
        if not isinstance(place, str) or not place.startswith("/"):
            return "the request names no absolute path to grant a directory for"
        normal = os.path.normpath(place)
        directory = normal if "path" not in raw else os.path.dirname(normal)
        wanted = [("directories", str(Path(directory).expanduser().resolve()))]
    elif rule == "key_not_granted":
        wanted = [("allowed_keys", raw.get("key"))]
    elif rule == "shell_not_granted":
        wanted = [("shell", True)]
    elif rule in ("host_not_granted", "port_not_granted", "address_not_granted"):
        try:
            dest = parse_destination(str(raw.get("url", "")))
        except RequestError:
            return "the request's URL is not valid"
        wanted = [("allowed_domains", dest.host), ("allowed_ports", dest.port)]
    elif rule == "tunnel_port_not_granted":
        wanted = [("plaintext_tunnel", True)]
    else:
        return f"no `rumi grant` option changes this refusal ({message})"
    missing = sorted({k for k, _ in wanted} - takes)
    if missing:
        return f"{search.plugin.name}'s grant takes no {', '.join(missing)}"
    return wanted


def _fix(
    ws: Workspace,
    policy: Policy,
    plugin: HandlerPlugin,
    component_id: str,
    raw: Mapping[str, Any] | None,
    state: GrantFileState | None,
    rule: str,
    refusal: RequestError,
    root_hint: str | None,
    source: str = "",
    deciding: GrantFileState | None = None,
) -> Fix:
    """Search the `rumi grant` command that lets the request through, re-checking after each option.

    `state` is the component's own grant file (what `rumi grant COMPONENT` edits); `source` the target
    whose file decides now and `deciding` that file's state, when it is not the component's own.
    """
    if rule in ("scope_missing", "scope_invalid"):
        scope = _shown(ws.scopes / f"{plugin.name}.json")
        what = "install" if rule == "scope_missing" else "fix"
        return Fix(
            None, f"no grant helps: {what} the scope file {scope} (`rumi init` restores a built-in one)"
        )
    invalid = deciding if deciding is not None else state
    if rule == "grant_file_invalid" and invalid is not None and invalid.errors:
        target = source or component_id
        return Fix(
            None,
            f"fix the grant file first ({invalid.errors[0]}), or remove it with "
            f"`{shlex.join(['rumi', 'revoke', target])}` and grant again",
        )
    if rule in ("invalid_request", "too_large"):
        return Fix(None, f"no grant helps: the request itself is refused ({refusal.message})")
    if rule in ("unavailable", "handler_failed", "unknown_capability", "rate_limited"):
        return Fix(None, f"no grant helps: {refusal.message}")
    search = _Search(ws, policy, plugin, component_id, state)

    def noted(note: str) -> str:
        if not source or source == component_id:
            return note
        # A Pack-wide entry decides now: the command writes the component's own entry, which replaces it.
        replaces = (
            f"it writes {component_id}'s own {plugin.name} entry, which replaces the Pack-wide {source} "
            "entry for this component (the two are never merged)"
        )
        return f"{note}; {replaces}" if note else replaces

    if raw is None:
        # The arguments are unknown: the command enables the capability; fill in what it should reach.
        placeholders = [(k, v) for k, v in _PLACEHOLDERS.items() if k in search.grant_keys()]
        note = "the request's arguments are not recorded: replace the placeholders with what it needs"
        return Fix(search.command(root_hint, placeholders=placeholders), noted(note if placeholders else ""))
    last: RequestError | str | None = refusal
    for _ in range(MAX_FIX_STEPS):
        last = search.run(raw)
        if last is None:
            return Fix(
                search.command(root_hint),
                noted("verified: the same check passes against the grant file as this command leaves it"),
                True,
            )
        if isinstance(last, str):
            return Fix(None, f"no grant can allow this: {last}")
        step = _next_steps(rule_of(last.code, last.message), search, raw, last.message)
        if step == _NO_PLACE:
            # Nothing names where it runs (terminal without a cwd): the admin picks the directory.
            note = "the request names no directory (it runs in the first granted one): replace DIR"
            return Fix(search.command(root_hint, placeholders=[("directories", "DIR")]), noted(note), False)
        if isinstance(step, str):
            return Fix(None, f"no grant can allow this: {step}")
        new = [s for s in step if s not in search.steps]
        if not new:
            return Fix(None, f"no grant can allow this: still refused with that grant ({last.message})")
        search.steps += new
    message = last.message if isinstance(last, RequestError) else str(last)
    return Fix(None, f"no grant found within {MAX_FIX_STEPS} options: still refused ({message})")
