"""Identifier rules shared by policy, NATS config and the CLI."""

from __future__ import annotations

import re

PACK_ID_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
CAPABILITY_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
COMPONENT_TYPE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
COMPONENT_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")


def is_pack_id(value: str) -> bool:
    return bool(PACK_ID_RE.match(value))


def parse_component_id(component_id: str) -> tuple[str, str, str]:
    """Split "<pack_id>:<type>:<name>"; raise ValueError with a helpful message when malformed."""
    parts = component_id.split(":")
    if len(parts) != 3:
        raise ValueError(f"component id {component_id!r} must look like '<pack_id>:<type>:<name>'")
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
