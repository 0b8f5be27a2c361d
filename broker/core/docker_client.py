"""The one way the broker connects to a Docker engine."""

from __future__ import annotations

import importlib
from typing import Any

from broker.core.errors import EngineUnavailable

__all__ = ["docker_client"]


def docker_client(timeout: float = 60) -> Any:
    """A Docker SDK client for the engine from the environment; EngineUnavailable with what to do."""
    try:
        # By name: the workspace's own docker/ directory would otherwise shadow the SDK for type checkers.
        sdk: Any = importlib.import_module("docker")
    except ImportError:  # pragma: no cover - a declared dependency
        raise EngineUnavailable("the docker Python package is missing: pip install docker") from None
    try:
        client = sdk.from_env(timeout=int(timeout))
        client.ping()
    except Exception as exc:
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise EngineUnavailable(
            f"no Docker engine answers ({first}): start one (scripts/ensure-docker.sh) or set DOCKER_HOST"
        ) from None
    return client
