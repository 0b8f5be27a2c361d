"""The one generator of the NATS server config: accounts, per-Pack identities, limits, JetStream.

Shape (docs/architecture.md, docs/protocol.md):

* `RUMI`: the trusted account, JetStream on.  Users `broker`, `admin`, `cli`, `audit`.  For each Pack
  it exports the service `rumi.pack.<id>.req.>` to that Pack's account alone, imports the service
  `rumi.pack.<id>.call.>` from it, and imports the stream `rumi.pack.<id>.status` from it.
* `PACK_<id>`: one account per Pack with one user.  Because the Pack reaches RUMI only through a
  service import, the server (not the Pack) puts `<id>` in the subject, rewrites the reply subject to
  `_R_...` and stamps `Nats-Request-Info` with the account: neither identity nor reply address can
  be forged, and nothing the Pack does is visible in any other account.  Its status (ready,
  heartbeats) reaches RUMI only as the stream export `rumi.pack.<id>.status` of its own account, so a
  status on that subject in RUMI always comes from that Pack.
* `SYS`: the system account, with no users.

Every permission is an allow-list.  All user-controlled text that reaches the config (pack ids,
host, paths, sync interval) is validated first: the config is a security boundary, so nothing is
escaped, everything odd is refused.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from pathlib import Path

from broker.bus.creds import ROLES, Identity, ensure_identity, pack_identity
from broker.core.atomic import write_atomic
from broker.core.errors import NatsSetupError
from broker.core.ids import PACK_ACCOUNT_PREFIX, is_pack_id
from broker.core.protocol import AUDIT_STREAM, STATUS_STREAM, STATUS_WILDCARD, status_subject
from broker.core.workspace import RumiConfig, Workspace

RUMI_ACCOUNT = "RUMI"
SYSTEM_ACCOUNT = "SYS"
# The server's own default; raised when a Pack may send more, so its account limit is the one that binds.
DEFAULT_MAX_PAYLOAD = 1024 * 1024

# Ask mode (broker/service/approvals.py): only the admin identity lists and answers held requests.
APPROVALS_PENDING = "rumi.admin.pending"  # request: every broker answers with the asks it holds
APPROVALS_ANSWER = "rumi.admin.approve"  # .<broker instance>.<n>: approve or deny one ask
APPROVALS_NOTICES = "rumi.admin.asks"  # broker → admin: an ask was made or settled

_SYNC_RE = re.compile(r"^(always|[1-9][0-9]{0,8}(ms|s|m|h))$")
_HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
_SAFE_PATH_RE = re.compile(r'^[^"\\\x00-\x1f\x7f]+$')


def account_name(pack_id: str) -> str:
    """Account name of a Pack: `PACK_<pack_id>`, verbatim (nats-server accepts `-` in a quoted name).

    Verbatim keeps it unambiguous (`a-b` and `a_b` are different Packs) and is what the broker sees
    in `Nats-Request-Info`.
    """
    _check_pack_id(pack_id)
    return PACK_ACCOUNT_PREFIX + pack_id


pack_account = account_name


def inbox_prefix(role: str) -> str:
    """Inbox prefix of a RUMI user (`_INBOX.<role>`); a Pack account keeps the default `_INBOX`.

    The trusted users share one account, so each gets its own inboxes: the audit reader cannot read
    `rumi call` results or the broker's acks, and (JetStream delivers a push consumer's messages only
    where its creator may subscribe) cannot aim a consumer at another user's inbox either.
    """
    if role not in ROLES:
        return "_INBOX"
    return f"_INBOX.{role}"


def inbox(role: str) -> str:
    """Subscribe permission covering `role`'s inboxes."""
    return f"{inbox_prefix(role)}.>"


def config_dir(ws: Workspace) -> Path:
    """Directory holding the generated config; mounted whole into the NATS container (see module doc)."""
    return ws.state / "nats"


def config_path(ws: Workspace) -> Path:
    """Path of the generated config file."""
    return config_dir(ws) / "nats.conf"


def jetstream_dir(ws: Workspace) -> Path:
    """JetStream file store of the embedded server."""
    return ws.state / "jetstream"


def render_config(
    ws: Workspace,
    cfg: RumiConfig,
    pack_ids: Sequence[str],
    *,
    port: int | None = None,
    listen_host: str | None = None,
    store_dir: str | None = None,
) -> str:
    """Return the nats-server config text for `pack_ids` (deterministic for the same inputs and seeds).

    `listen_host` and `store_dir` override the embedded defaults (`cfg.nats_host`, docker/.rumi/jetstream)
    for a server in a container, where both are container-side values.  Creates missing seeds.
    """
    packs = sorted(set(pack_ids))
    for pack_id in packs:
        _check_pack_id(pack_id)
    host = _check_host(listen_host if listen_host is not None else cfg.nats_host)
    chosen_port = _check_port(port if port is not None else cfg.nats_port)
    store = _check_path(store_dir if store_dir is not None else str(jetstream_dir(ws)))
    sync = _check_sync(cfg.jetstream_sync)
    limits = cfg.limits
    for key, value in (
        ("max_payload", limits.max_payload),
        ("max_connections", limits.max_connections),
        ("max_subscriptions", limits.max_subscriptions),
    ):
        if not (isinstance(value, int) and 0 < value <= 64 * 1024 * 1024):
            raise NatsSetupError(
                f"docker/config.json: limits.{key} must be a positive integer up to 64 MiB (got {value!r})"
            )

    roles = {role: ensure_identity(ws, role) for role in ROLES}
    pack_users = {pack_id: pack_identity(ws, pack_id) for pack_id in packs}

    out: list[str] = [
        "# Generated by rumi (broker/bus/config.py). Do not edit: `rumi` rewrites it.",
        f"listen: {_q(f'{_bracket(host)}:{chosen_port}')}",
        "# No monitoring port: it would expose every account's connections.",
        "http_port: 0",
        f"max_payload: {max(DEFAULT_MAX_PAYLOAD, limits.max_payload)}",
        "",
        "jetstream {",
        f"  store_dir: {_q(store)}",
        "  # `always` fsyncs every write before JetStream acks it: an acked audit event is on disk.",
        f"  sync_interval: {_q(sync)}",
        "}",
        "",
        f"system_account: {_q(SYSTEM_ACCOUNT)}",
        "",
        "accounts {",
        "  # No users: nothing can log into the system account, so $SYS stays unreachable.",
        f"  {_q(SYSTEM_ACCOUNT)}: {{}}",
        "",
        *_rumi_account(roles, packs),
        "",
    ]
    for pack_id in packs:
        out.extend(_pack_account(pack_id, pack_users[pack_id], cfg))
        out.append("")
    out.append("}")
    return "\n".join(out) + "\n"


def write_config(
    ws: Workspace,
    cfg: RumiConfig,
    pack_ids: Sequence[str],
    port: int | None = None,
    *,
    listen_host: str | None = None,
    store_dir: str | None = None,
) -> Path:
    """Write the config to docker/.rumi/nats/nats.conf atomically and return its path."""
    text = render_config(ws, cfg, pack_ids, port=port, listen_host=listen_host, store_dir=store_dir)
    target = config_path(ws)
    # Only public keys inside, and a non-root nats-server in a container must read it: 0644, owner writes.
    write_atomic(target, text, mode=0o644)
    return target


def _rumi_account(roles: dict[str, Identity], packs: list[str]) -> list[str]:
    js = "$JS.API"
    stream = AUDIT_STREAM
    broker = _user(
        roles["broker"],
        publish=["rumi.audit.>", f"{js}.STREAM.INFO.{stream}", APPROVALS_NOTICES],
        subscribe=[
            "rumi.pack.*.req.>",
            STATUS_WILDCARD,
            inbox("broker"),
            APPROVALS_PENDING,
            f"{APPROVALS_ANSWER}.*.*",
        ],
        allow_responses=True,
        comment="broker: answers Pack requests, appends audit events; cannot change or delete the stream",
    )
    admin = _user(
        roles["admin"],
        publish=[f"{js}.>", APPROVALS_PENDING, f"{APPROVALS_ANSWER}.*.*"],
        subscribe=[STATUS_WILDCARD, inbox("admin"), APPROVALS_NOTICES],
        comment="admin: JetStream administration (setup code); lists and answers asks (`rumi approve`)",
    )
    cli = _user(
        roles["cli"],
        # The last status of each Pack, one message at a time (`rumi ps`, `rumi call`).
        publish=["rumi.pack.*.call.>", f"{js}.STREAM.MSG.GET.{STATUS_STREAM}"],
        subscribe=[STATUS_WILDCARD, inbox("cli")],
        comment="cli: `rumi call` invokes Pack tools; `rumi up`, `ps`, `doctor` read Pack status",
    )
    audit = _user(
        roles["audit"],
        publish=[
            f"{js}.STREAM.INFO.{stream}",
            # Stream names only: lets clients find the stream by subject (nats-py's js.subscribe does).
            f"{js}.STREAM.NAMES",
            f"{js}.STREAM.MSG.GET.{stream}",
            f"{js}.CONSUMER.CREATE.{stream}",
            f"{js}.CONSUMER.CREATE.{stream}.>",
            f"{js}.CONSUMER.DURABLE.CREATE.{stream}.*",
            f"{js}.CONSUMER.INFO.{stream}.*",
            f"{js}.CONSUMER.DELETE.{stream}.*",
            f"{js}.CONSUMER.MSG.NEXT.{stream}.*",
            f"$JS.ACK.{stream}.>",
            f"$JS.FC.{stream}.>",
        ],
        subscribe=["rumi.audit.>", inbox("audit")],
        comment="audit: read-only consumer of RUMI_AUDIT (stream limits retention: acks delete nothing)",
    )
    exports = [
        f"      {{service: {_q(f'rumi.pack.{p}.req.>')}, accounts: [{_q(pack_account(p))}]}}" for p in packs
    ]
    imports = [
        f"      {{service: {{account: {_q(pack_account(p))}, subject: {_q(f'rumi.pack.{p}.call.>')}}}}}"
        for p in packs
    ]
    # Each Pack's status, from that Pack's account only: the subject names the Pack.
    imports += [
        f"      {{stream: {{account: {_q(pack_account(p))}, subject: {_q(status_subject(p))}}}}}"
        for p in packs
    ]
    return [
        f"  {_q(RUMI_ACCOUNT)}: {{",
        "    jetstream: enabled",
        "    users: [",
        *broker,
        *admin,
        *cli,
        *audit,
        "    ]",
        "    # Each Pack's requests are a service only that Pack's account may import.",
        "    exports: [",
        *_commas(exports),
        "    ]",
        "    imports: [",
        *_commas(imports),
        "    ]",
        "  }",
    ]


def _pack_account(pack_id: str, user: Identity, cfg: RumiConfig) -> list[str]:
    limits = cfg.limits
    return [
        f"  {_q(pack_account(pack_id))}: {{",
        "    # Per-account limits (reloadable; re-applied to connected clients).",
        "    limits: {",
        f"      max_payload: {limits.max_payload}",
        f"      max_connections: {limits.max_connections}",
        f"      max_subscriptions: {limits.max_subscriptions}",
        "    }",
        "    users: [",
        *_user(
            user,
            publish=[f"rumi.pack.{pack_id}.req.>", status_subject(pack_id)],
            subscribe=[f"rumi.pack.{pack_id}.call.>", "_INBOX.>"],
            allow_responses=True,
            comment=f"Pack {pack_id}: its own requests and status, and answers to calls it received",
        ),
        "    ]",
        "    imports: [",
        f"      {{service: {{account: {_q(RUMI_ACCOUNT)}, subject: {_q(f'rumi.pack.{pack_id}.req.>')}}}}}",
        "    ]",
        "    exports: [",
        f"      {{service: {_q(f'rumi.pack.{pack_id}.call.>')}, accounts: [{_q(RUMI_ACCOUNT)}]}},",
        f"      {{stream: {_q(status_subject(pack_id))}, accounts: [{_q(RUMI_ACCOUNT)}]}}",
        "    ]",
        "  }",
    ]


def _user(
    ident: Identity,
    *,
    publish: list[str],
    subscribe: list[str],
    allow_responses: bool = False,
    comment: str,
) -> list[str]:
    lines = [
        f"      # {comment}",
        "      {",
        f"        nkey: {_q(ident.public_key)}",
        "        permissions: {",
        f"          publish: {{allow: [{', '.join(_q(s) for s in publish)}]}}",
        f"          subscribe: {{allow: [{', '.join(_q(s) for s in subscribe)}]}}",
    ]
    if allow_responses:
        lines.append("          allow_responses: true")
    lines += ["        }", "      }"]
    return lines


def _commas(items: list[str]) -> list[str]:
    return [item + ("," if i < len(items) - 1 else "") for i, item in enumerate(items)]


def _q(value: str) -> str:
    # Only values already validated reach here; a quote or backslash would be a bug, not data.
    if not _SAFE_PATH_RE.match(value):
        raise NatsSetupError(f"refusing to write {value!r} into the NATS config")
    return f'"{value}"'


def _check_pack_id(pack_id: str) -> None:
    if not is_pack_id(pack_id):
        raise NatsSetupError(f"invalid pack id {pack_id!r}: it must match ^[a-z][a-z0-9_-]{{0,31}}$")


def _check_host(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if _HOSTNAME_RE.match(host):
        return host
    raise NatsSetupError(f"docker/config.json: nats_host {host!r} is not an IP address or host name")


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _check_port(port: int) -> int:
    if not (isinstance(port, int) and 0 < port < 65536):
        raise NatsSetupError(f"NATS port {port!r} must be 1-65535")
    return port


def _check_path(path: str) -> str:
    if not path.startswith("/") or not _SAFE_PATH_RE.match(path):
        raise NatsSetupError(
            f"JetStream directory {path!r} must be absolute, without quotes, backslashes or control chars"
        )
    return path


def _check_sync(value: str) -> str:
    if not _SYNC_RE.match(value):
        raise NatsSetupError(
            f"docker/config.json: jetstream_sync {value!r} must be 'always' or a duration like '2m', '500ms'"
        )
    return value
