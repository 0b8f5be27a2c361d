"""The labels Rumi puts on what it creates in Docker, and the default image prefix.

Containers and networks carry `labels(...)` with the workspace tag, so cleanup removes exactly what is
one workspace's; images carry the prefix, kind and content-hash labels, so a build reuses an unchanged
image and `remove_images` finds every one of a prefix.  One definition for the runtime, the Compose
generator, the image builders and the terminal sandbox.
"""

from __future__ import annotations

import hashlib

from broker.core.workspace import Workspace

__all__ = [
    "DEFAULT_PREFIX",
    "LABEL_CONFIG_HASH",
    "LABEL_FLAVOR",
    "LABEL_HASH",
    "LABEL_KIND",
    "LABEL_LIBC",
    "LABEL_MANAGED",
    "LABEL_PACK",
    "LABEL_PACK_VERSION",
    "LABEL_PREFIX",
    "LABEL_ROLE",
    "LABEL_WORKSPACE",
    "labels",
    "workspace_tag",
]

# Image tags and container names start with it: ``rumi-nats:latest``, ``rumi-pack-<id>``.
DEFAULT_PREFIX = "rumi"

# Containers and networks.
LABEL_MANAGED = "io.rumi.managed"
LABEL_WORKSPACE = "io.rumi.workspace"
LABEL_PACK = "io.rumi.pack"
LABEL_ROLE = "io.rumi.role"
LABEL_CONFIG_HASH = "io.rumi.config-hash"  # the settings a container was created with

# Images.
LABEL_PREFIX = "io.rumi.prefix"
LABEL_KIND = "io.rumi.image"
LABEL_HASH = "io.rumi.content-hash"
LABEL_LIBC = "io.rumi.python-libc"  # "glibc 2.36" or "musl": picks the wheel platform for images above
LABEL_FLAVOR = "io.rumi.python-flavor"  # "debian" (assembled here) or "seed" (python:3.11-alpine)
LABEL_PACK_VERSION = "io.rumi.pack-version"


def workspace_tag(ws: Workspace) -> str:
    """A short stable id of a workspace, so two workspaces on one engine never touch each other."""
    return hashlib.sha256(str(ws.root).encode()).hexdigest()[:10]


def labels(workspace: str, role: str, pack_id: str | None = None) -> dict[str, str]:
    """Labels on everything Rumi creates, so cleanup removes exactly what is ours."""
    out = {LABEL_MANAGED: "true", LABEL_WORKSPACE: workspace, LABEL_ROLE: role}
    if pack_id is not None:
        out[LABEL_PACK] = pack_id
    return out
