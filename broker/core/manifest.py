"""A Pack's manifest: `ecosystem/<pack_id>/pack.json`, read and checked.

Besides its id, version and entrypoint a manifest may declare the permissions its Pack needs:

```json
{"id": "notes", "version": "1.0.0",
 "permissions": {
   "notes:tool:search": {"file_read": {"directories": ["$RUMI_SANDBOX"], "reason": "reads its index"}},
   "notes:*": {"network": {"allowed_domains": ["api.example.com:443"], "reason": "fetches notes"}}}}
```

Keyed by component id (or `<pack_id>:*`, every component of the Pack), then by capability, each entry
is a grant entry as in a grant file, without `enabled`, with a `reason` for the operator. A declaration
grants nothing: `rumi review` shows it against what is granted, `rumi grant --from-pack` grants it.
In `directories`, `$RUMI_SANDBOX` stands for the Pack's own work area and `~` for the operator's home
(`expand_declared`). The capabilities' own keys are checked by their handlers when granted, not here.
The JSON Schema is `manifest_schema()`, committed as `config/schema/pack.schema.json`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from broker.core.errors import WorkspaceError
from broker.core.ids import (
    CAPABILITY_RE,
    COMPONENT_NAME_RE,
    COMPONENT_TYPE_RE,
    PACK_ID_RE,
    is_pack_id,
    parse_component_id,
)
from broker.core.workspace import Workspace

__all__ = [
    "MAX_DECLARED_CAPABILITIES",
    "MAX_DECLARED_COMPONENTS",
    "MAX_MANIFEST_BYTES",
    "MAX_REASON_CHARS",
    "SANDBOX_PLACEHOLDER",
    "Declared",
    "PackManifest",
    "declared_permissions",
    "expand_declared",
    "load_manifest",
    "manifest_schema",
    "manifest_schema_text",
]

MAX_MANIFEST_BYTES = 256 * 1024
MAX_DECLARED_COMPONENTS = 64
MAX_DECLARED_CAPABILITIES = 32
MAX_REASON_CHARS = 500
SANDBOX_PLACEHOLDER = "$RUMI_SANDBOX"
"""In a declared `directories` entry: the Pack's own work area `docker/sandbox/<pack_id>/`."""


class PackManifest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """ecosystem/<pack_id>/pack.json"""

    id: str
    version: str
    entrypoint: str = "main.py"
    description: str = ""
    # component id (or `<pack_id>:*`) -> capability -> grant entry with a `reason`; None: not declared.
    permissions: dict[str, dict[str, dict[str, Any]]] | None = None


@dataclass(frozen=True)
class Declared:
    """One declared permission: the component (or `<pack_id>:*`), the capability, why, and the entry."""

    component_id: str
    capability: str
    reason: str
    entry: Mapping[str, Any]  # the grant keys as written, without `reason`


def load_manifest(ws: Workspace, pack_id: str) -> PackManifest:
    """Read and check a Pack's pack.json (its `permissions` block included)."""
    if not is_pack_id(pack_id):
        raise WorkspaceError(
            f"{pack_id!r} is not a valid pack id (lowercase letter, then [a-z0-9_-], max 32)"
        )
    path = ws.pack_source(pack_id) / "pack.json"
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise WorkspaceError(
            f"{path}: not found; a Pack lives in ecosystem/<pack_id>/ with a pack.json"
        ) from None
    except OSError as exc:
        raise WorkspaceError(f"{path}: cannot read ({exc.strerror})") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise WorkspaceError(f"{path}: larger than {MAX_MANIFEST_BYTES // 1024} KiB")
    try:
        manifest = msgspec.json.decode(data, type=PackManifest)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise WorkspaceError(f"{path}: {exc}") from None
    if manifest.id != pack_id:
        raise WorkspaceError(f"{path}: id {manifest.id!r} does not match the directory name {pack_id!r}")
    entry = Path(manifest.entrypoint)
    if entry.is_absolute() or ".." in entry.parts:
        raise WorkspaceError(f"{path}: entrypoint must be a relative path inside the Pack")
    problem = _permissions_problem(manifest)
    if problem is not None:
        raise WorkspaceError(f"{path}: {problem}")
    return manifest


def _permissions_problem(manifest: PackManifest) -> str | None:
    """Why the `permissions` block is malformed (one line, with where), else None."""
    block = manifest.permissions
    if block is None:
        return None
    if len(block) > MAX_DECLARED_COMPONENTS:
        return f"permissions names more than {MAX_DECLARED_COMPONENTS} components - at `$.permissions`"
    for component, capabilities in block.items():
        at = f"$.permissions.{component}"
        try:
            owner = parse_component_id(component, pack_wide=True)[0]
        except ValueError as exc:
            return f"{exc} - at `{at}`"
        if owner != manifest.id:
            return (
                f"component {component!r} belongs to pack {owner!r}, not to this Pack {manifest.id!r} "
                f"- at `{at}`"
            )
        if len(capabilities) > MAX_DECLARED_CAPABILITIES:
            return f"more than {MAX_DECLARED_CAPABILITIES} capabilities - at `{at}`"
        for capability, entry in capabilities.items():
            where = f"{at}.{capability}"
            if not CAPABILITY_RE.match(capability):
                return f"capability {capability!r} must match {CAPABILITY_RE.pattern} - at `{where}`"
            reason = entry.get("reason")
            if not isinstance(reason, str) or not reason.strip():
                return (
                    "each declared permission needs a `reason` (a non-empty string telling the operator "
                    f"why) - at `{where}.reason`"
                )
            if len(reason) > MAX_REASON_CHARS:
                return f"reason is longer than {MAX_REASON_CHARS} characters - at `{where}.reason`"
            if "enabled" in entry:
                return (
                    "a declaration is not a grant: remove `enabled` (`rumi grant --from-pack` enables "
                    f"what is declared) - at `{where}.enabled`"
                )
    return None


def declared_permissions(manifest: PackManifest) -> list[Declared]:
    """The manifest's declarations in file order (empty when it has no `permissions` block)."""
    found: list[Declared] = []
    for component, capabilities in (manifest.permissions or {}).items():
        for capability, entry in capabilities.items():
            keys = {k: v for k, v in entry.items() if k != "reason"}
            found.append(Declared(component, capability, str(entry.get("reason", "")), keys))
    return found


def expand_declared(entry: Mapping[str, Any], work_area: Path) -> dict[str, Any]:
    """The entry with its `directories` made concrete: `$RUMI_SANDBOX[/sub]` → the Pack's work area
    (`work_area`), `~[/sub]` → the operator's home. Anything else is kept as written (the grant check
    refuses what is not an absolute path)."""
    out = dict(entry)
    directories = out.get("directories")
    if isinstance(directories, list):
        out["directories"] = [_expand_directory(d, work_area) for d in directories]
    return out


def _expand_directory(value: object, work_area: Path) -> object:
    if not isinstance(value, str):
        return value
    for prefix, base in ((SANDBOX_PLACEHOLDER, os.fspath(work_area)), ("~", os.path.expanduser("~"))):
        if value == prefix:
            return base
        if value.startswith(prefix + "/"):
            return os.path.normpath(base + value[len(prefix) :])
    return value


# --- JSON Schema -------------------------------------------------------------------------------------

_DRAFT = "https://json-schema.org/draft/2020-12/schema"


def _component_key_pattern() -> str:
    """Component id or `<pack_id>:*`, as one regular expression (the rules of `broker.core.ids`)."""
    pack, kind, name = (
        rx.pattern.removeprefix("^").removesuffix("$")
        for rx in (PACK_ID_RE, COMPONENT_TYPE_RE, COMPONENT_NAME_RE)
    )
    return f"^{pack}:(\\*|{kind}:{name})$"


def manifest_schema() -> dict[str, Any]:
    """JSON Schema of pack.json (committed as `config/schema/pack.schema.json`)."""
    declared = {
        "type": "object",
        "description": (
            "A grant entry as in a grant file (the capability handler's grant keys; see "
            "grant.schema.json), without `enabled`, and why the Pack needs it. In `directories`, "
            f"`{SANDBOX_PLACEHOLDER}` is the Pack's own work area and `~` the operator's home."
        ),
        "required": ["reason"],
        "properties": {
            "reason": {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_REASON_CHARS,
                "description": "Why the Pack needs this permission, for the operator who grants it.",
            },
            "enabled": {"not": {}, "description": "Not allowed: a declaration is not a grant."},
        },
        "additionalProperties": True,
    }
    return {
        "$schema": _DRAFT,
        "title": "Rumi Pack manifest (ecosystem/<pack_id>/pack.json)",
        "type": "object",
        "required": ["id", "version"],
        "additionalProperties": False,
        "properties": {
            "id": {
                "type": "string",
                "pattern": PACK_ID_RE.pattern,
                "description": "The pack id: the directory name under ecosystem/.",
            },
            "version": {"type": "string"},
            "entrypoint": {
                "type": "string",
                "default": "main.py",
                "description": "The Pack's main module, relative to its directory.",
            },
            "description": {"type": "string", "default": ""},
            "permissions": {
                "type": "object",
                "description": (
                    "What the Pack needs, by component id (`<pack_id>:<type>:<name>`, or `<pack_id>:*` "
                    "for every component of the Pack) and capability. Grants nothing by itself: "
                    "`rumi review` compares it with the grants, `rumi grant --from-pack` grants it."
                ),
                "maxProperties": MAX_DECLARED_COMPONENTS,
                "propertyNames": {"pattern": _component_key_pattern()},
                "additionalProperties": {
                    "type": "object",
                    "maxProperties": MAX_DECLARED_CAPABILITIES,
                    "propertyNames": {"pattern": CAPABILITY_RE.pattern},
                    "additionalProperties": {"$ref": "#/$defs/DeclaredPermission"},
                },
            },
        },
        "$defs": {"DeclaredPermission": declared},
    }


def manifest_schema_text() -> str:
    """`manifest_schema()` as the exact text of the committed `config/schema/pack.schema.json`."""
    return json.dumps(manifest_schema(), indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":  # python -m broker.core.manifest DIR: (re)write pack.schema.json
    import sys

    target = Path(sys.argv[1] if len(sys.argv) > 1 else "config/schema") / "pack.schema.json"
    target.write_text(manifest_schema_text())
    print(target)
