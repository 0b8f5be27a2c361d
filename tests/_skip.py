"""Skipping a test for what this machine lacks: never in CI.

`skip_unless_ci(message)` skips with `message` (pytest's `-ra` prints it); when `CI=true` it fails with
the same message instead, because CI's machine must have what the core path needs (Docker, root,
network and mount namespaces, the tools it calls).
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def skip_unless_ci(message: str) -> NoReturn:
    """Skip the calling test with `message`, or fail it with `message` when CI=true."""
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)
