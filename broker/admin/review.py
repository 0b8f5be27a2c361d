"""`rumi review PACK`: what a Pack declares in its pack.json against what is granted, per component,
with the risky entries flagged (also shown by `rumi grant --from-pack` before it asks).

Both sides are read the way the broker reads them: each declaration is checked with the broker's own
grant loader (`check_grant_document`, as if it were the component's grant file; `$RUMI_SANDBOX` and `~`
expanded), and the granted side is the component's effective permission (`effective_grants`: its own
entry, else its Pack's Pack-wide one). Entries are compared key by key on the validated entries, lists
as sets. For a component the declaration that applies is its own, else the Pack's `<pack_id>:*` one.

Risky (`entry_risks`): `*` and `*.suffix` domains, wide or special CIDRs (`wide_network_reason`: wider
than /8 or /16, loopback, link-local, metadata, the unspecified address), `/` or a home directory,
`shell: true`, `allow_wide_networks` and `plaintext_tunnel`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.admin.grants import grant_files
from broker.core.ids import pack_wide_id
from broker.core.manifest import Declared, declared_permissions, expand_declared, load_manifest
from broker.core.workspace import Workspace
from broker.policy.grants import EffectiveGrant, ScopeStore, check_grant_document, effective_grants
from broker.policy.plugins import HandlerRegistry, display_path

__all__ = ["STATUSES", "Review", "ReviewRow", "entry_risks", "review_pack"]

STATUSES = (
    "as declared",
    "not granted",
    "not declared",
    "more than declared",
    "less than declared",
    "differs",
)
_IGNORED_KEYS = frozenset({"enabled", "reason"})
_FLAG_RISKS = {
    "shell": "shell: true runs any command through a shell or interpreter",
    "allow_wide_networks": "allow_wide_networks: true lets CIDRs reach wide and special networks",
    "plaintext_tunnel": "plaintext_tunnel: true lets tunnels reach any granted port, not only TLS on 443",
}


@dataclass(frozen=True)
class ReviewRow:
    """One capability of one component (or `<pack_id>:*`): declared, granted, how they compare, risks."""

    component_id: str
    capability: str
    status: str  # one of STATUSES
    reason: str = ""  # the declaration's reason ("" when not declared)
    declared: Mapping[str, Any] | None = None  # as declared, directories expanded (no reason)
    declared_for: str | None = None  # the declaration applying: the component, or `<pack_id>:*`
    granted: Mapping[str, Any] | None = None  # as the grant file has it (None: not granted)
    source: str | None = None  # the grant file it comes from: the component, or `<pack_id>:*`
    differences: tuple[str, ...] = ()
    risks: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        return {
            "component_id": self.component_id,
            "capability": self.capability,
            "status": self.status,
            "reason": self.reason,
            "declared": None if self.declared is None else dict(self.declared),
            "declared_for": self.declared_for,
            "granted": None if self.granted is None else dict(self.granted),
            "source": self.source,
            "differences": list(self.differences),
            "risks": list(self.risks),
        }


@dataclass(frozen=True)
class Review:
    """A Pack's declared permissions against its grants."""

    pack_id: str
    manifest: Path
    declares: bool  # the pack.json has a `permissions` block
    rows: list[ReviewRow] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # declarations refused, grant files invalid

    @property
    def declared(self) -> list[ReviewRow]:
        """The rows of declared permissions (what `rumi grant --from-pack` writes)."""
        return [r for r in self.rows if r.declared is not None and r.declared_for == r.component_id]

    @property
    def risky(self) -> list[ReviewRow]:
        return [r for r in self.rows if r.risks]

    def as_json(self) -> dict[str, Any]:
        return {
            "pack_id": self.pack_id,
            "manifest": str(self.manifest),
            "declares": self.declares,
            "rows": [r.as_json() for r in self.rows],
            "problems": list(self.problems),
            "risky": len(self.risky),
        }


def review_pack(ws: Workspace, pack_id: str) -> Review:
    """Compare PACK's declared permissions with its effective grants; WorkspaceError when its pack.json
    is missing or invalid."""
    manifest = load_manifest(ws, pack_id)
    path = ws.pack_source(pack_id) / "pack.json"
    shown = display_path(path)
    declared = declared_permissions(manifest)
    checked, problems = _check_declarations(ws, shown, declared)
    files = [s for s in grant_files(ws) if s.component_id is not None and _pack_of(s.component_id) == pack_id]
    wide = pack_wide_id(pack_id)
    for state in files:
        for error in state.errors:
            covered = "every component of the Pack" if state.component_id == wide else state.component_id
            kind = "is invalid, so it denies everything to" if not state.usable else "has a warning for"
            problems.append(f"{display_path(state.path)} {kind} {covered}: {error}")
    targets = {d.component_id for d in declared} | {s.component_id for s in files if s.component_id}
    rows: list[ReviewRow] = []
    for target in sorted(targets, key=lambda t: (t != wide, t)):
        granted = {g.capability: g for g in effective_grants(files, target) if g.enabled}
        own = {d.capability: d for d in declared if d.component_id == target}
        fallback = {d.capability: d for d in declared if d.component_id == wide}
        for capability in sorted(set(own) | set(granted)):
            declaration = own.get(capability) or fallback.get(capability)
            rows.append(_row(ws, target, capability, declaration, checked, granted.get(capability)))
    return Review(pack_id, path, manifest.permissions is not None, rows, problems)


def _pack_of(target: str) -> str:
    return target.partition(":")[0]


def _check_declarations(
    ws: Workspace, shown: str, declared: list[Declared]
) -> tuple[dict[tuple[str, str], Mapping[str, Any]], list[str]]:
    """Each declaration as the grant loader validates it (by (component, capability)), and why the
    loader refuses the others."""
    if not declared:
        return {}, []
    registry = HandlerRegistry(ws.handlers)
    scopes = ScopeStore(ws.scopes).current
    checked: dict[tuple[str, str], Mapping[str, Any]] = {}
    problems: list[str] = []
    by_target: dict[str, dict[str, Any]] = {}
    for d in declared:
        work_area = ws.pack_work_area(_pack_of(d.component_id))
        by_target.setdefault(d.component_id, {})[d.capability] = {
            "enabled": True,
            **expand_declared(d.entry, work_area),
        }
    for target, permissions in by_target.items():
        path = ws.grant_file(target)
        for capability, entry in permissions.items():
            if registry.get(capability) is None:
                problems.append(
                    f"{shown} declares {capability} for {target}, but no handler {capability!r} is installed "
                    f"(installed: {', '.join(registry.names()) or 'none'})"
                )
                continue
            # One capability at a time, so one bad declaration does not hide the others.
            data = _document(target, {capability: entry})
            state = check_grant_document(ws, registry.plugins, scopes, path, data)
            if state.usable and capability in state.entries:
                checked[(target, capability)] = state.entries[capability]
            else:
                for error in state.errors:
                    message = str(error).replace(display_path(path), f"{shown} (declared for {target})", 1)
                    problems.append(f"{message}: `rumi grant --from-pack` would refuse it")
    return checked, problems


def _document(target: str, permissions: Mapping[str, Any]) -> bytes:
    import json

    return json.dumps({"component_id": target, "permissions": dict(permissions)}).encode()


def _row(
    ws: Workspace,
    target: str,
    capability: str,
    declaration: Declared | None,
    checked: Mapping[tuple[str, str], Mapping[str, Any]],
    granted: EffectiveGrant | None,
) -> ReviewRow:
    declared_entry: Mapping[str, Any] | None = None
    declared_for: str | None = None
    reason = ""
    validated: Mapping[str, Any] | None = None
    if declaration is not None:
        declared_for, reason = declaration.component_id, declaration.reason
        # As `rumi grant --from-pack` writes it: the placeholders expanded.
        declared_entry = expand_declared(declaration.entry, ws.pack_work_area(_pack_of(target)))
        validated = checked.get((declaration.component_id, capability))
    written = (
        None if granted is None else {k: v for k, v in granted.written.items() if k not in _IGNORED_KEYS}
    )
    risks = list(entry_risks(capability, declared_entry or {}))
    risks += [r for r in entry_risks(capability, written or {}) if r not in risks]
    differences: list[str] = []
    if granted is None:
        status = "not granted"
    elif declaration is None:
        status = "not declared"
    elif validated is None:
        status, differences = "differs", ["the declaration is refused by its handler (see the problems)"]
    else:
        status, differences = _compare(validated, granted.entry)
    return ReviewRow(
        target,
        capability,
        status,
        reason,
        declared_entry,
        declared_for,
        written,
        None if granted is None else granted.source,
        tuple(differences),
        tuple(risks),
    )


def _compare(declared: Mapping[str, Any], granted: Mapping[str, Any]) -> tuple[str, list[str]]:
    """How the validated granted entry compares with the validated declared one, and in what."""
    more: list[str] = []
    less: list[str] = []
    other: list[str] = []
    for key in sorted((set(declared) | set(granted)) - _IGNORED_KEYS):
        want, have = declared.get(key), granted.get(key)
        if isinstance(want, list) and isinstance(have, list):
            extra = [v for v in have if _norm(key, v) not in {_norm(key, w) for w in want}]
            missing = [v for v in want if _norm(key, v) not in {_norm(key, h) for h in have}]
            if extra:
                more.append(f"{key} +{','.join(map(str, extra))}")
            if missing:
                less.append(f"{key} -{','.join(map(str, missing))}")
        elif want != have:
            if have is True and not want:
                more.append(f"{key}=true")
            elif want is True and not have:
                less.append(f"{key}=false")
            else:
                other.append(f"{key}={_value(have)} (declared {_value(want)})")
    if other:
        return "differs", more + less + other
    if more:
        return "more than declared", more + less
    if less:
        return "less than declared", less
    return "as declared", []


def _norm(key: str, value: object) -> object:
    if key == "directories" and isinstance(value, str):
        return os.path.normpath(value)
    if isinstance(value, str):
        return value.strip().lower() if key == "allowed_domains" else value
    return value


def _value(value: object) -> str:
    import json

    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


# --- risks -------------------------------------------------------------------------------------------


def entry_risks(capability: str, entry: Mapping[str, Any]) -> list[str]:
    """What in one grant entry (declared or granted) deserves a second look, one line each."""
    risks: list[str] = []
    domains = entry.get("allowed_domains")
    if isinstance(domains, list):
        risks += [r for d in domains if isinstance(d, str) and (r := _domain_risk(d)) is not None]
    directories = entry.get("directories")
    if isinstance(directories, list):
        risks += [r for d in directories if isinstance(d, str) and (r := _directory_risk(d)) is not None]
    risks += [why for key, why in _FLAG_RISKS.items() if entry.get(key) is True]
    return risks


def _domain_risk(text: str) -> str | None:
    from broker.backends.egress import AnyHost, SubdomainsOf, parse_host_entry, wide_network_reason

    try:
        host = parse_host_entry(text)
    except ValueError:
        return None  # refused by the grant check, reported as a problem
    if isinstance(host, AnyHost):
        return f"domain {text.strip()!r}: any host on the internet"
    if isinstance(host, SubdomainsOf):
        return f"domain {text.strip()!r}: every name under {host.suffix}"
    why = wide_network_reason(host)
    return None if why is None else f"network {text.strip()!r} {why}"


def _directory_risk(text: str) -> str | None:
    if not os.path.isabs(text):
        return None
    path = os.path.normpath(text)
    if path == "/":
        return "directory '/': the whole file system"
    home = os.path.normpath(os.path.expanduser("~"))
    parent = os.path.dirname(path)
    if path in (home, "/root", "/home") or parent == "/home":
        return f"directory {text!r}: a home directory (keys, shell history, every project)"
    return None
