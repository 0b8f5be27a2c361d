"""`rumi demo` end to end: its outcome, not just that it printed."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests._skip import skip_unless_ci

ROWS = {
    "write a file in its sandbox": "allowed",
    "read /etc/passwd": "denied",
    "escape with ../ to the broker's credentials": "denied",
    "read an ungranted key HOME": "denied",
    "run `ls` in its sandbox": "allowed",
    "run a shell (not granted)": "denied",
    "GET the granted local service (SDK)": "allowed",
    "GET it with unmodified `requests`": "allowed",
    "GET the cloud metadata address": "denied",
}


def run_demo(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "broker.cli", "demo", *args], capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    return out.stdout


def assert_table(stdout: str) -> None:
    for attempt, result in ROWS.items():
        line = next((ln for ln in stdout.splitlines() if ln.startswith(attempt)), None)
        assert line is not None, f"row {attempt!r} missing:\n{stdout}"
        assert f"  {result}  " in line, line
        assert "#" in line, f"no audit event on {line!r}"
        if result == "denied":
            # Refused on its arguments: exactly one audit event, and it says deny.
            audit = line.rsplit("  ", 1)[-1].split(" (")[0]
            assert re.fullmatch(r"#\d+ deny/permission_denied", audit), line
    assert "hash chain verified" in stdout
    # Unmodified `requests` goes through the proxy as `default:pack:_`, which has no grant file of its
    # own: it is allowed through the demo's Pack-wide grant; the SDK's request through the tool's own.
    proxy = next(ln for ln in stdout.splitlines() if ln.startswith("GET it with unmodified `requests`"))
    assert "(default:pack:_ via default:*)" in proxy, proxy
    sdk = next(ln for ln in stdout.splitlines() if ln.startswith("GET the granted local service (SDK)"))
    assert "via" not in sdk, sdk
    assert "rumi grant 'default:*' network --domain 127.0.0.1 --port" in stdout


def test_local_demo(tmp_path: object) -> None:
    assert_table(run_demo("--local", "--root", str(tmp_path)))


@pytest.mark.docker
def test_container_demo(tmp_path: object) -> None:
    if os.geteuid() != 0:
        skip_unless_ci("rumi up needs root (host firewall rules)")
    stdout = run_demo("--root", str(tmp_path))
    assert_table(stdout)
    assert "rumi-pack-default healthy" in stdout
