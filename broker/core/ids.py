"""Identifier rules shared by policy, NATS config and the CLI."""

from __future__ import annotations

import re

PACK_ID_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
CAPABILITY_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
COMPONENT_TYPE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
COMPONENT_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")


def is_pack_id(value: str) -> bool:
    return bool(PACK_ID_RE.match(value))


PACK_WIDE = "*"
"""The component part of a Pack-wide grant target `<pack_id>:*`: every component of that Pack."""


def pack_wide_id(pack_id: str) -> str:
    """`<pack_id>:*`, the grant target that covers every component of the Pack (the proxy's included)."""
    return f"{pack_id}:{PACK_WIDE}"


def is_pack_wide(target: str) -> bool:
    """True for `<pack_id>:*` with a valid pack id."""
    pack_id, sep, rest = target.partition(":")
    return bool(sep) and rest == PACK_WIDE and is_pack_id(pack_id)


def parse_component_id(component_id: str, *, pack_wide: bool = False) -> tuple[str, str, str]:
    """Split "<pack_id>:<type>:<name>"; raise ValueError with a helpful message when malformed.

    With `pack_wide`, the grant target `<pack_id>:*` (every component of that Pack) is accepted too and
    returned as `(pack_id, "*", "*")`. A request always names one component, so the broker never
    passes `pack_wide`; grant files and `rumi grant` do.
    """
    if pack_wide and is_pack_wide(component_id):
        return component_id.partition(":")[0], PACK_WIDE, PACK_WIDE
    parts = component_id.split(":")
    if len(parts) != 3:
        shape = "'<pack_id>:<type>:<name>'"
        if pack_wide:
            shape += " or '<pack_id>:*' (every component of the Pack)"
        raise ValueError(f"component id {component_id!r} must look like {shape}")
    pack_id, type_, name = parts
    if not PACK_ID_RE.match(pack_id):
        raise ValueError(f"component id {component_id!r}: pack id must match {PACK_ID_RE.pattern}")
    if not COMPONENT_TYPE_RE.match(type_):
        raise ValueError(f"component id {component_id!r}: type must match {COMPONENT_TYPE_RE.pattern}")
    if name != "_" and not COMPONENT_NAME_RE.match(name):
        raise ValueError(f"component id {component_id!r}: name must match {COMPONENT_NAME_RE.pattern}")
    return pack_id, type_, name


PACK_ACCOUNT_PREFIX = "PACK_"
"""A Pack's NATS account is `PACK_<pack_id>`, verbatim: the server stamps it on every request."""


def pack_of_account(account: str) -> str:
    """The pack id of a Pack's account name (`PACK_<pack_id>`), or '' for any other account."""
    if not account.startswith(PACK_ACCOUNT_PREFIX):
        return ""
    pack_id = account[len(PACK_ACCOUNT_PREFIX) :]
    return pack_id if is_pack_id(pack_id) else ""
