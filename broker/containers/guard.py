"""Host guard: a Pack's bridge never reaches the host itself.

Docker's internal networks stop forwarding to the outside, but packets a container addresses to the
host (the bridge's gateway address, docker0's 172.17.0.1, any other host address) are *input*, not
forwarded traffic, and Docker leaves them alone.  For each Pack bridge the guard adds:

* ``iptables  -I INPUT -i <bridge> -m comment --comment rumi-guard:<workspace> -j DROP``
* the same rule with ``ip6tables``
* ``net.ipv6.conf.<bridge>.disable_ipv6 = 1`` (no link-local address on the host side either)

Traffic between the NATS container and the Pack stays on the bridge (the FORWARD path), so it is not
affected.  Rules carry the workspace in their comment: removal deletes exactly the rules of one
workspace and nothing else.  Every step is idempotent.  Needs root (iptables).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from broker.core.errors import RumiError

__all__ = [
    "BRIDGE_RE",
    "BridgeGuard",
    "GuardError",
    "bridge_guard_status",
    "guard_comment",
    "guarded_bridges",
    "install_guard",
    "install_guards",
    "remove_guard",
    "remove_guards",
    "remove_workspace_guard",
]

# Only names Rumi made: `rumi-` + 10 hex digits (15 chars, the kernel's limit for interface names).
BRIDGE_RE = re.compile(r"^rumi-[0-9a-f]{10}$")
_TAG_RE = re.compile(r"^[0-9a-f]{1,32}$")
_TOOLS = ("iptables", "ip6tables")
_PROC_IPV6 = Path("/proc/sys/net/ipv6/conf")
_MAX_DELETES = 64  # bound on removing duplicates of one rule


class GuardError(RumiError):
    """The host guard could not be installed, checked or removed."""


@dataclass(frozen=True)
class BridgeGuard:
    """The guard state of one bridge."""

    bridge: str
    ipv4_drop: bool
    ipv6_drop: bool
    ipv6_disabled: bool
    bridge_exists: bool

    @property
    def active(self) -> bool:
        """True when every part of the guard is in place."""
        return self.ipv4_drop and self.ipv6_drop and self.ipv6_disabled

    def missing(self) -> list[str]:
        """Human names of the parts that are not in place."""
        out = []
        if not self.ipv4_drop:
            out.append("iptables INPUT drop")
        if not self.ipv6_drop:
            out.append("ip6tables INPUT drop")
        if not self.ipv6_disabled:
            out.append("disable_ipv6")
        return out


def guard_comment(workspace: str) -> str:
    """The comment that marks a workspace's guard rules."""
    if not _TAG_RE.match(workspace):
        raise GuardError(f"invalid workspace tag {workspace!r}")
    return f"rumi-guard:{workspace}"


def _check_bridge(bridge: str) -> str:
    if not BRIDGE_RE.match(bridge):
        raise GuardError(f"refusing to guard {bridge!r}: not a Rumi bridge name (rumi-<10 hex>)")
    return bridge


def _ipv6_present() -> bool:
    return _PROC_IPV6.is_dir()


def _tool(name: str) -> str:
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if Path(p).is_file()), None
    )
    if path is None:
        raise GuardError(
            f"{name} is not installed: the host guard needs it (apt-get install iptables), then `rumi doctor --fix`"
        )
    return path


def _rule(bridge: str, workspace: str) -> list[str]:
    return ["INPUT", "-i", bridge, "-m", "comment", "--comment", guard_comment(workspace), "-j", "DROP"]


def _run(tool: str, args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    # -w: wait for the xtables lock (Docker takes it too) instead of failing at once.
    argv = [_tool(tool), "-w", "10", *args]
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        raise GuardError(f"{tool} did not finish within 30 s") from None


def _has_rule(tool: str, bridge: str, workspace: str) -> bool:
    done = _run(tool, ["-C", *_rule(bridge, workspace)])
    if done.returncode == 0:
        return True
    if done.returncode == 1:  # "does a matching rule exist": no
        return False
    raise GuardError(f"{tool} -C failed: {_last_line(done)}")


def _last_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
    text = lines[-1].strip() if lines else f"exit code {done.returncode}"
    if "Permission denied" in text or "you must be root" in text:
        return f"{text} (the host guard needs root)"
    return text


def _tools_for_host() -> tuple[str, ...]:
    return _TOOLS if _ipv6_present() else _TOOLS[:1]


def _disable_ipv6(bridge: str) -> bool:
    path = _PROC_IPV6 / bridge / "disable_ipv6"
    try:
        if path.read_text().strip() != "1":
            path.write_text("1\n")
        return path.read_text().strip() == "1"
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise GuardError(
            f"cannot set net.ipv6.conf.{bridge}.disable_ipv6=1 ({exc.strerror}); run as root"
        ) from None


def install_guard(bridge: str, workspace: str) -> BridgeGuard:
    """Install the guard on `bridge` (idempotent); return its state afterwards."""
    _check_bridge(bridge)
    for tool in _tools_for_host():
        if not _has_rule(tool, bridge, workspace):
            done = _run(tool, ["-I", *_rule(bridge, workspace)])
            if done.returncode != 0:
                raise GuardError(f"{tool} -I INPUT for {bridge} failed: {_last_line(done)}")
    if _ipv6_present() and (_PROC_IPV6 / bridge).is_dir():
        _disable_ipv6(bridge)
    status = bridge_guard_status(bridge, workspace)
    if not (status.ipv4_drop and status.ipv6_drop):
        raise GuardError(f"the guard rules for {bridge} did not stick: {', '.join(status.missing())}")
    return status


def bridge_guard_status(bridge: str, workspace: str) -> BridgeGuard:
    """What of the guard is in place on `bridge`."""
    _check_bridge(bridge)
    exists = Path("/sys/class/net", bridge).exists()
    ipv4 = _has_rule("iptables", bridge, workspace)
    if _ipv6_present():
        ipv6 = _has_rule("ip6tables", bridge, workspace)
        conf = _PROC_IPV6 / bridge / "disable_ipv6"
        try:
            disabled = conf.read_text().strip() == "1"
        except FileNotFoundError:
            # No such interface: no address on it either; the rules are what matters when it returns.
            disabled = not exists
    else:
        ipv6 = disabled = True  # no IPv6 in this kernel at all
    return BridgeGuard(
        bridge=bridge, ipv4_drop=ipv4, ipv6_drop=ipv6, ipv6_disabled=disabled, bridge_exists=exists
    )


def remove_guard(bridge: str, workspace: str) -> None:
    """Remove the guard rules of `bridge` (every copy); a missing rule is fine."""
    _check_bridge(bridge)
    for tool in _tools_for_host():
        for _ in range(_MAX_DELETES):
            if not _has_rule(tool, bridge, workspace):
                break
            done = _run(tool, ["-D", *_rule(bridge, workspace)])
            if done.returncode != 0:
                raise GuardError(f"{tool} -D INPUT for {bridge} failed: {_last_line(done)}")


def guarded_bridges(workspace: str) -> list[str]:
    """Bridges that carry this workspace's guard rule in iptables or ip6tables (from `-S INPUT`)."""
    comment = guard_comment(workspace)
    found: set[str] = set()
    for tool in _tools_for_host():
        done = _run(tool, ["-S", "INPUT"])
        if done.returncode != 0:
            raise GuardError(f"{tool} -S INPUT failed: {_last_line(done)}")
        for line in done.stdout.splitlines():
            parts = line.split()
            # Exact match on the comment value: another workspace's tag never matches a prefix of ours.
            if "--comment" not in parts or "-i" not in parts:
                continue
            value = parts[parts.index("--comment") + 1].strip('"')
            bridge = parts[parts.index("-i") + 1]
            if value == comment and BRIDGE_RE.match(bridge):
                found.add(bridge)
    return sorted(found)


def remove_workspace_guard(workspace: str) -> list[str]:
    """Remove every guard rule of this workspace; return the bridges it was on."""
    bridges = guarded_bridges(workspace)
    for bridge in bridges:
        remove_guard(bridge, workspace)
    return bridges


def _guard_rules(tool: str, comment: str) -> dict[str, int]:
    """Bridges with a DROP rule carrying `comment` in `tool`'s INPUT chain, and how many (one `-S INPUT`)."""
    done = _run(tool, ["-S", "INPUT"])
    if done.returncode != 0:
        raise GuardError(f"{tool} -S INPUT failed: {_last_line(done)}")
    found: dict[str, int] = {}
    for line in done.stdout.splitlines():
        parts = shlex.split(line)
        if "--comment" not in parts or "-i" not in parts or parts[-2:] != ["-j", "DROP"]:
            continue
        bridge = parts[parts.index("-i") + 1]
        # Exact match on the comment, and only bridges Rumi names: nothing else is ever deleted.
        if parts[parts.index("--comment") + 1] == comment and BRIDGE_RE.match(bridge):
            found[bridge] = found.get(bridge, 0) + 1
    return found


def _restore(tool: str, lines: Sequence[str]) -> None:
    """Apply `lines` in one `<tool>-restore --noflush` transaction (waits for the xtables lock)."""
    argv = [_tool(f"{tool}-restore"), "-w", "10", "--noflush"]
    try:
        done = subprocess.run(
            argv, input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=60, check=False
        )
    except subprocess.TimeoutExpired:
        raise GuardError(f"{tool}-restore did not finish within 60 s") from None
    if done.returncode != 0:
        raise GuardError(f"{tool}-restore of {len(lines) - 2} guard rules failed: {_last_line(done)}")


def install_guards(bridges: Sequence[str], workspace: str) -> None:
    """`install_guard` for every bridge in `bridges`, batched: per tool, one listing of INPUT, one
    `iptables-restore --noflush` inserting every missing rule, one listing to check; then IPv6 off
    (100 bridges: 4 calls, not 600)."""
    wanted = sorted(set(bridges))
    if not wanted:
        return
    for bridge in wanted:
        _check_bridge(bridge)
    comment = guard_comment(workspace)
    for tool in _tools_for_host():
        present = _guard_rules(tool, comment)
        missing = [b for b in wanted if b not in present]
        if missing:
            _restore(
                tool, ["*filter", *(shlex.join(["-I", *_rule(b, workspace)]) for b in missing), "COMMIT"]
            )
            present = _guard_rules(tool, comment)
            left = [b for b in missing if b not in present]
            if left:
                raise GuardError(f"the {tool} guard rules for {', '.join(left)} did not stick")
    if _ipv6_present():
        for bridge in wanted:
            if (_PROC_IPV6 / bridge).is_dir():
                _disable_ipv6(bridge)


def remove_guards(workspace: str, bridges: Iterable[str] = ()) -> list[str]:
    """Remove every guard rule of `workspace` (every copy), batched like `install_guards`.

    Returns the bridges that had one, and those in `bridges`.
    """
    comment = guard_comment(workspace)
    done: set[str] = set(bridges)
    for tool in _tools_for_host():
        rules = _guard_rules(tool, comment)
        if not rules:
            continue
        done.update(rules)
        lines = ["*filter"]
        for bridge, copies in sorted(rules.items()):
            lines += [shlex.join(["-D", *_rule(bridge, workspace)])] * copies
        _restore(tool, [*lines, "COMMIT"])
        left = _guard_rules(tool, comment)
        if left:
            raise GuardError(f"the {tool} guard rules for {', '.join(sorted(left))} did not go")
    return sorted(done)
