"""`rumi check` and `rumi explain`: would a request be allowed, and why was one decided as it was.

`rumi check` runs the broker's own decision in-process (scope, grant, the handler's pure authorize)
with no NATS, no audit event and no handler run: exit 0 allow, 1 deny, 2 a usage error. `rumi
explain` reads one request's audit events: exit 0 explained, 1 not found, 2 usage, 3 no NATS,
4 reading failed. The work is in `broker.admin.check` and `broker.admin.explain`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from broker.cli.common import JsonOption, RootOption, fail, fail_error, print_json, run_async, workspace
from broker.core.errors import EXIT_DENIED, EXIT_USAGE

if TYPE_CHECKING:
    from broker.admin.check import Fix, Verdict
    from broker.admin.explain import Explanation

__all__ = ["check_cmd", "explain_cmd", "register"]


def _line(label: str, text: str) -> None:
    typer.echo(f"  {label + ':' if label else '':<12}{text}")


def _fix_lines(fix: Fix | None) -> None:
    if fix is None:
        return
    if fix.command is not None:
        _line("fix", fix.command)
        if fix.note:
            _line("", fix.note)
    else:
        _line("fix", fix.note)


def _print_verdict(v: Verdict) -> None:
    from broker.policy.plugins import display_path

    what = f" {v.target}" if v.target else ""
    typer.echo(f"{v.decision}: {v.component_id} {v.capability}{what}")
    _line("rule", f"{v.rule}: {v.detail}")
    if not v.allowed:
        _line("reason", f"{v.reason} ({v.code}: what the Pack is told)")
    exists = "" if v.grant_file_exists else " (does not exist)"
    _line("grant file", f"{display_path(v.grant_file)}{exists}")
    _fix_lines(v.fix)
    for note in v.notes:
        _line("note", note)


def check_cmd(
    component: Annotated[str, typer.Argument(help="Component id '<pack_id>:<type>:<name>'.")],
    capability: Annotated[str, typer.Argument(help="Capability, e.g. file_read (an installed handler).")],
    path: Annotated[
        str | None, typer.Option("--path", help="The path (file_read, file_write; terminal: its cwd).")
    ] = None,
    key: Annotated[str | None, typer.Option("--key", help="The key name (env_read).")] = None,
    url: Annotated[str | None, typer.Option("--url", help="The URL, fetched with GET (network).")] = None,
    argv: Annotated[
        str | None, typer.Option("--argv", help="The command as one string, split like a shell (terminal).")
    ] = None,
    root: RootOption = None,
    as_json: JsonOption = False,
) -> None:
    """Would the broker allow this request? Exit 0 allow, 1 deny; prints the deciding rule and, on deny,
    the `rumi grant` command that allows it. Nothing is sent, run or audited."""
    from broker.admin.check import CheckUsageError, args_from_options, check_request, load_policy, plugin_for
    from broker.core.ids import parse_component_id

    try:
        parse_component_id(component)
    except ValueError as exc:
        fail(str(exc), EXIT_USAGE)
    ws = workspace(root)
    try:
        policy = load_policy(ws)
        args = args_from_options(plugin_for(policy, capability), path=path, key=key, url=url, argv=argv)
        verdict = check_request(
            ws, component, capability, args, policy=policy, root_hint=str(ws.root) if root else None
        )
    except CheckUsageError as exc:
        fail_error(exc)
    if as_json:
        print_json(verdict.as_json())
    else:
        _print_verdict(verdict)
    if not verdict.allowed:
        raise typer.Exit(EXIT_DENIED)


def _print_explanation(e: Explanation) -> None:
    from pathlib import Path

    from broker.policy.plugins import display_path

    outcome = f", then {e.outcome}" if e.outcome and e.outcome != e.decision else ""
    typer.echo(f"request {e.request_id}: {e.decision}{outcome} ({e.code})")
    if e.message:
        _line("reason", e.message)
    _line("rule", f"{e.rule}: {e.detail}")
    _line("capability", e.capability)
    _line("target", e.target or "(not recorded)")
    _line("component", f"{e.component_id or '(none)'} (pack {e.pack_id})")
    if e.grant_file:
        since = ""
        if e.grants_changed_since is not None:
            since = (
                " (changed since the request)" if e.grants_changed_since else " (unchanged since the request)"
            )
        _line("grant file", display_path(Path(e.grant_file)) + since)
    _fix_lines(e.fix)
    if e.now is not None:
        _line("now", f"{'allowed' if e.now.allowed else 'denied'} with the current grants ({e.now.rule})")
    for event in e.events:
        phase = event.get("phase") or f"aggregate x{event.get('count')}"
        _line(
            "event",
            f"#{event.get('seq')} {phase} {event.get('decision')}/{event.get('code')} at {event.get('ts')} "
            f"(chain {event.get('chain')})",
        )
    for note in e.notes:
        _line("note", note)


def explain_cmd(
    request_id: Annotated[str, typer.Argument(help="The request id, as `rumi audit tail` shows it.")],
    pack: Annotated[
        str | None, typer.Option("--pack", help="Read only this Pack's events (faster on a big stream).")
    ] = None,
    root: RootOption = None,
    as_json: JsonOption = False,
) -> None:
    """Why was request REQUEST_ID allowed or denied? Reads its audit events; prints the decision, the rule,
    the grant file and the `rumi grant` command that would allow it now."""
    from broker.admin.check import CheckUsageError
    from broker.admin.explain import RequestNotFound, explain_request, find_request_events
    from broker.core.ids import is_pack_id

    if pack is not None and not is_pack_id(pack):
        fail(
            f"--pack {pack!r} is not a pack id (a lowercase letter, then [a-z0-9_-], at most 32)", EXIT_USAGE
        )
    ws = workspace(root)
    if not ws.handlers.is_dir():
        fail(f"no workspace at {ws.root}: run `rumi init` first (or pass --root)", EXIT_USAGE)
    found = run_async(lambda: find_request_events(ws, request_id, pack=pack))
    try:
        explanation = explain_request(
            ws, request_id, found, pack=pack, root_hint=str(ws.root) if root else None
        )
    except (RequestNotFound, CheckUsageError) as exc:
        fail_error(exc)
    if as_json:
        print_json(explanation.as_json())
    else:
        _print_explanation(explanation)


def register(app: typer.Typer) -> None:
    """Add `rumi check` and `rumi explain`."""
    app.command("check")(check_cmd)
    app.command("explain")(explain_cmd)
