"""NATS identities: one nkey user seed per role and per Pack, kept under docker/.rumi/creds/.

Each identity is a file `<name>.nk` holding an nkey *user* seed (`SU...`), mode 0400 in a 0700
directory.  The generated NATS config (`broker.bus.config`) names only the public keys; seeds never leave
these files and are never printed.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import nkeys

from broker.core.atomic import fsync_directory
from broker.core.errors import NatsSetupError
from broker.core.ids import is_pack_id
from broker.core.workspace import Workspace

ROLES = ("broker", "admin", "cli", "audit")
PACK_PREFIX = "pack-"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class Identity:
    """One NATS user: its name, where its seed lives, and its public nkey (`U...`)."""

    name: str
    seed_path: Path
    public_key: str


def creds_dir(ws: Workspace) -> Path:
    """Directory holding every seed file (0700)."""
    return ws.state / "creds"


def seed_path(ws: Workspace, name: str) -> Path:
    """Path of identity `name`'s seed file (it may not exist yet)."""
    _check_name(name)
    return creds_dir(ws) / f"{name}.nk"


def pack_identity_name(pack_id: str) -> str:
    """Identity name of a Pack: `pack-<pack_id>`."""
    if not is_pack_id(pack_id):
        raise NatsSetupError(f"invalid pack id {pack_id!r}: it must match ^[a-z][a-z0-9_-]{{0,31}}$")
    return PACK_PREFIX + pack_id


def ensure_identity(ws: Workspace, name: str) -> Identity:
    """Return identity `name`, creating its seed file first if it does not exist."""
    path = seed_path(ws, name)
    _ensure_private_dir(path.parent)
    if not path.exists():
        _write_new_seed(path)
    return Identity(name=name, seed_path=path, public_key=_public_key(path))


def pack_identity(ws: Workspace, pack_id: str) -> Identity:
    """Identity of Pack `pack_id` (`pack-<pack_id>`), created if missing."""
    return ensure_identity(ws, pack_identity_name(pack_id))


def _check_name(name: str) -> None:
    if name in ROLES:
        return
    if name.startswith(PACK_PREFIX) and is_pack_id(name[len(PACK_PREFIX) :]):
        return
    raise NatsSetupError(f"unknown NATS identity {name!r}: use one of {', '.join(ROLES)} or pack-<pack_id>")


def _ensure_private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    # mkdir's mode is masked by umask and ignored for an existing dir: set it explicitly.
    os.chmod(path, 0o700)


def _write_new_seed(path: Path) -> None:
    seed = nkeys.encode_seed(secrets.token_bytes(32), nkeys.PREFIX_BYTE_USER)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    # Created 0400 from the first byte: the seed is never readable by anyone else, not even briefly.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(seed + b"\n")
            f.flush()
            os.fsync(f.fileno())
        # link() fails if another process created the seed meanwhile: keep theirs, never overwrite.
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    fsync_directory(path.parent)


def _public_key(path: Path) -> str:
    try:
        raw = bytearray(path.read_bytes().strip())
    except OSError as exc:
        raise NatsSetupError(f"{path}: cannot read NATS seed ({exc.strerror})") from None
    try:
        kp = nkeys.from_seed(raw)
    except Exception:
        # The message must not echo the file's content: it is a secret.
        raise NatsSetupError(f"{path}: not a valid nkey seed; delete it to create a new one") from None
    try:
        public = str(kp.public_key.decode())
    finally:
        kp.wipe()
        raw[:] = b"\0" * len(raw)
    if not public.startswith("U"):
        raise NatsSetupError(f"{path}: not an nkey user seed; delete it to create a new one")
    return public
