"""The environment a Pack process starts with: its identity, its NATS connection, its work area, its proxy.

One definition for a Pack in its container (`broker.containers.settings.pack_container_settings`) and a
Pack run as a local process (`rumi dev`).  `pack_runtime` reads these variables.
"""

from __future__ import annotations

import os

__all__ = ["READY_FILE", "pack_environment", "proxy_environment"]

# In a container: the SDK creates it once serving and touches it with every heartbeat; the Docker
# healthcheck looks at its age.
READY_FILE = "/tmp/rumi-ready"  # noqa: S108 - the container's private tmpfs


def proxy_environment(listen: str) -> dict[str, str]:
    """Variables that send unmodified HTTP clients through the SDK's proxy (and so the broker)."""
    url = f"http://{listen}"
    return {
        "RUMI_PROXY_LISTEN": listen,
        "HTTP_PROXY": url,
        "HTTPS_PROXY": url,
        "http_proxy": url,
        "https_proxy": url,
        "NO_PROXY": "",
        "no_proxy": "",
    }


def pack_environment(
    pack_id: str,
    *,
    nats_url: str,
    creds_file: str,
    work_area: str | os.PathLike[str],
    proxy_listen: str,
    container: bool = False,
    heartbeat_interval: float | None = None,
) -> dict[str, str]:
    """The Pack's variables: identity, NATS URL and credentials, work area (RUMI_SANDBOX), PYTHONUNBUFFERED, the proxy's.

    `creds_file` and `work_area` are paths as the Pack sees them.  `container` adds what a read-only
    container needs: RUMI_READY_FILE (`READY_FILE`, the healthcheck), HOME on the tmpfs and no bytecode
    writes; a local process (`rumi dev`) leaves them out and passes its caller's HOME itself.
    `heartbeat_interval` sets RUMI_HEARTBEAT_INTERVAL (seconds between status heartbeats; the SDK's
    default, 5 s, when None).
    """
    env = {
        "RUMI_PACK_ID": pack_id,
        "RUMI_NATS_URL": nats_url,
        "RUMI_NATS_CREDS": creds_file,
        "RUMI_SANDBOX": os.fspath(work_area),
    }
    if heartbeat_interval is not None:
        env["RUMI_HEARTBEAT_INTERVAL"] = f"{heartbeat_interval:g}"
    if container:
        env["RUMI_READY_FILE"] = READY_FILE
        env["HOME"] = "/tmp"  # noqa: S108 - the container's private tmpfs
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    # Unmodified HTTP clients go through the SDK's proxy, i.e. through the broker.
    env.update(proxy_environment(proxy_listen))
    return env
