"""`rumi audit export`: time, Pack and decision filters, chain-preserving windows, and OCSF for SIEMs.

The OCSF events are validated against the OCSF 1.7.0 schema as published by schema.ocsf.io, bundled
offline by the PyPI package `ocsf-json-schema==1.2.0` (ocsf_json_schema/ocsf/1.7.0.json) and loaded
with `ocsf-lib==0.10.4` (`ocsf.schema.from_file`). ocsf-lib itself bundles no schema: it fetches one
from schema.ocsf.io or compiles a checkout of the ocsf-schema repository, neither of which is
reachable here. The checker below applies the schema's rules: required attributes (with the chosen
profiles), no unknown attributes, types (with each type's regex, length and range), enum values,
object attributes recursively, and the `at_least_one`/`just_one` constraints.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from broker.audit.export import OCSF_VERSION, Selection, parse_time, to_ocsf
from broker.audit.trail import AuditChain, audit_fields, utc_timestamp, verify_events
from tests._nats_fixtures import make_workspace, run, running_server

OCSF_SCHEMA_PACKAGE = "ocsf-json-schema==1.2.0"
PROFILES = ("security_control",)
T0 = datetime(2026, 11, 28, 10, 0, 0, tzinfo=UTC)


# ----------------------------------------------------------------------------------------- schema


def _ocsf_schema() -> Any:
    import ocsf_json_schema
    from ocsf.schema import from_file

    path = Path(ocsf_json_schema.__file__).parent / "ocsf" / f"{OCSF_VERSION}.json"
    assert path.is_file(), f"{OCSF_SCHEMA_PACKAGE} does not bundle OCSF {OCSF_VERSION}"
    schema = from_file(str(path))
    assert schema.version == OCSF_VERSION
    return schema


_SCHEMA: list[Any] = []


def ocsf_schema() -> Any:
    if not _SCHEMA:
        _SCHEMA.append(_ocsf_schema())
    return _SCHEMA[0]


_KINDS = {
    "string_t": "string",
    "integer_t": "integer",
    "long_t": "integer",
    "float_t": "number",
    "boolean_t": "boolean",
    "json_t": "any",
}


def _profiles_of(attr: Any) -> list[str]:
    profile = attr.profile
    if profile is None:
        return []
    return [profile] if isinstance(profile, str) else list(profile)


def _is(kind: str, value: Any) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "string":
        return isinstance(value, str)
    return True


def _check_scalar(schema: Any, attr: Any, value: Any, where: str) -> list[str]:
    import re

    chain = [attr.type]  # e.g. timestamp_t -> long_t: each level's regex, length and range apply
    while chain[-1] not in _KINDS:
        declared = schema.types.get(chain[-1])
        assert declared is not None and declared.type, f"{where}: schema type {chain[-1]} unknown"
        chain.append(declared.type)
    kind = _KINDS[chain[-1]]
    if not _is(kind, value):
        return [
            f"{where}: {value!r} is not an {kind}"
            if kind == "integer"
            else f"{where}: {value!r} is not a {kind}"
        ]
    errors = []
    for name in chain:
        declared = schema.types.get(name)
        if declared is None:
            continue
        if declared.regex and isinstance(value, str) and not re.search(declared.regex, value):
            errors.append(f"{where}: {value!r} does not match the {name} pattern")
        if declared.max_len is not None and isinstance(value, str) and len(value) > declared.max_len:
            errors.append(f"{where}: longer than {declared.max_len}")
        if (
            declared.range
            and kind in ("integer", "number")
            and not declared.range[0] <= value <= declared.range[1]
        ):
            errors.append(f"{where}: {value} outside {declared.range}")
    if attr.enum and str(value) not in attr.enum:
        errors.append(f"{where}: {value!r} is not one of {sorted(attr.enum)}")
    return errors


def _check_value(schema: Any, attr: Any, value: Any, where: str) -> list[str]:
    if attr.is_array:
        if not isinstance(value, list):
            return [f"{where}: must be an array"]
        return [e for i, item in enumerate(value) for e in _check_one(schema, attr, item, f"{where}[{i}]")]
    return _check_one(schema, attr, value, where)


def _check_one(schema: Any, attr: Any, value: Any, where: str) -> list[str]:
    if attr.object_type:
        if not isinstance(value, dict):
            return [f"{where}: must be an object ({attr.object_type})"]
        obj = schema.objects[attr.object_type]
        return _check_object(schema, obj.attributes, obj.constraints, value, where)
    return _check_scalar(schema, attr, value, where)


def _check_object(
    schema: Any, attributes: dict[str, Any], constraints: Any, value: dict[str, Any], where: str
) -> list[str]:
    if not attributes:  # the `object` object: any content
        return []
    allowed = {
        name: attr
        for name, attr in attributes.items()
        if not _profiles_of(attr) or any(p in PROFILES for p in _profiles_of(attr))
    }
    errors = [f"{where}.{name}: not an attribute here" for name in value if name not in allowed]
    errors += [
        f"{where}.{name}: required but missing"
        for name, attr in allowed.items()
        if attr.requirement == "required" and name not in value
    ]
    for kind, names in (constraints or {}).items():
        present = [n for n in names if n in value]
        if kind == "at_least_one" and not present:
            errors.append(f"{where}: needs at least one of {names}")
        elif kind == "just_one" and len(present) != 1:
            errors.append(f"{where}: needs exactly one of {names}")
    for name, item in value.items():
        if name in allowed:
            errors += _check_value(schema, allowed[name], item, f"{where}.{name}")
    return errors


def ocsf_errors(event: dict[str, Any]) -> list[str]:
    """Everything in `event` that the OCSF API Activity class (with PROFILES) does not allow."""
    schema = ocsf_schema()
    cls = next(c for c in schema.classes.values() if c.uid == 6003)
    assert cls.caption == "API Activity"
    return _check_object(schema, cls.attributes, cls.constraints, event, "api_activity")


# ----------------------------------------------------------------------------------------- events


def _event(
    chain: AuditChain,
    i: int,
    at: datetime,
    *,
    pack: str = "alpha",
    capability: str = "file_read",
    decision: str = "allow",
    code: str = "ok",
    phase: str | None = "complete",
    **more: Any,
) -> dict[str, Any]:
    fields = audit_fields(
        request_id=f"r{i}",
        pack_id=pack,
        component_id=f"{pack}:tool:t",
        capability=capability,
        target=f"/data/{i}.txt",
        decision=decision,
        code=code,
        duration_ms=1.25,
        phase=phase,
        ts=utc_timestamp(at),
        **more,
    )
    return chain.seal(fields)


def _checkpoint(chain: AuditChain, at: datetime) -> dict[str, Any]:
    # The shape Selection looks at; signatures are tested in test_audit_checkpoints.py.
    return chain.seal(
        {"v": 1, "ts": utc_timestamp(at), "request_id": "checkpoint", "pack_id": "_broker", "component_id": "",
         "capability": "checkpoint", "target": "", "decision": "allow", "code": "ok", "duration_ms": 0.0,
         "phase": "checkpoint"}
    )  # fmt: skip


def _samples() -> list[dict[str, Any]]:
    chain = AuditChain()
    at = T0
    return [
        _event(chain, 1, at, capability="file_write", phase="decision"),
        _event(chain, 1, at, capability="file_write", phase="outcome", extra={"bytes": 5}),
        _event(chain, 2, at, decision="deny", code="permission_denied", phase="decision", message="outside the grant"),
        _event(chain, 3, at, capability="terminal", decision="error", code="timeout", phase="outcome",
               message="handler did not finish in time", extra={"exit_code": None, "timed_out": True}),
        _event(chain, 4, at, capability="network", decision="deny", code="rate_limited", phase=None, count=250,
               extra={"codes": "rate_limited=200,permission_denied=50"}),
        _event(chain, 5, at, pack="beta", capability="env_read"),
        _checkpoint(chain, at),
    ]  # fmt: skip


def test_every_kind_of_event_maps_to_a_valid_ocsf_api_activity() -> None:
    for event in _samples():
        mapped = to_ocsf(event)
        assert ocsf_errors(mapped) == [], (event, mapped)
        assert mapped["class_uid"] == 6003 and mapped["category_uid"] == 6
        assert mapped["metadata"]["version"] == OCSF_VERSION
        assert mapped["time"] == int(T0.timestamp() * 1000)
        assert mapped["unmapped"]["hash"] == event["hash"]
        assert mapped["api"]["operation"] == event["capability"]
        assert mapped["actor"]["app_name"] == event["pack_id"]


def test_ocsf_mapping_table() -> None:
    write, outcome, denied, failed, folded, env, checkpoint = (to_ocsf(e) for e in _samples())
    assert (write["activity_id"], write["type_uid"], write["action_id"], write["status_id"]) == (
        3,
        600303,
        1,
        1,
    )
    assert outcome["unmapped"]["extra"] == {"bytes": 5}
    assert (denied["action"], denied["disposition"], denied["severity_id"], denied["status"]) == (
        "Denied", "Blocked", 3, "Failure",
    )  # fmt: skip
    assert denied["api"]["response"] == {"error": "permission_denied", "error_message": "outside the grant"}
    assert (failed["action_id"], failed["status_id"], failed["status_code"]) == (1, 2, "timeout")
    assert (failed["activity_id"], failed["activity_name"], failed["type_uid"]) == (99, "terminal", 600399)
    assert folded["count"] == 250 and folded["metadata"]["event_code"] == "aggregate"
    assert (env["activity_id"], env["activity_name"], env["src_endpoint"]) == (2, "Read", {"name": "beta"})
    assert checkpoint["metadata"]["event_code"] == "checkpoint"


def test_the_schema_check_finds_what_is_wrong() -> None:
    good = to_ocsf(_samples()[0])
    missing = {k: v for k, v in good.items() if k != "src_endpoint"}
    assert any("src_endpoint: required" in e for e in ocsf_errors(missing))
    assert any("not one of" in e for e in ocsf_errors({**good, "activity_id": 7}))
    assert any("not an attribute" in e for e in ocsf_errors({**good, "chain": "b-1"}))
    assert any("not an integer" in e for e in ocsf_errors({**good, "time": "2026-11-28"}))
    assert any("at least one" in e for e in ocsf_errors({**good, "actor": {}}))
    assert any("operation: required" in e for e in ocsf_errors({**good, "api": {"request": {"uid": "r"}}}))


def test_malformed_events_are_refused_by_the_mapping() -> None:
    with pytest.raises(ValueError):
        to_ocsf({"_malformed": "line 3 is not JSON"})


# ----------------------------------------------------------------------------------------- selection


def _select(events: list[dict[str, Any]], **kwargs: Any) -> list[dict[str, Any]]:
    selection = Selection(**kwargs)
    out = [chosen for e in events for chosen in selection.add(e)]
    return out + selection.finish()


def _two_chains() -> list[dict[str, Any]]:
    """Chain a: events each minute from T0, a checkpoint every 3 events; chain b: 4 events at T0+10m."""
    a, b = AuditChain("b-aaaaaaaaaaaa"), AuditChain("b-bbbbbbbbbbbb")
    events = []
    for minute in range(9):
        at = T0 + timedelta(minutes=minute)
        events.append(_event(a, minute, at, pack="alpha" if minute % 2 else "beta",
                             decision="deny" if minute % 3 == 0 else "allow"))  # fmt: skip
        if minute % 3 == 2:
            events.append(_checkpoint(a, at))
    for i in range(4):
        events.append(_event(b, 100 + i, T0 + timedelta(minutes=10)))
    return events


def test_since_starts_each_chain_at_a_checkpoint_and_the_file_verifies() -> None:
    events = _two_chains()
    chosen = _select(events, since=T0 + timedelta(minutes=4))
    chain_a = [e for e in chosen if e["chain"] == "b-aaaaaaaaaaaa"]
    # Minute 4 is chain a's first event in the window; its last checkpoint before it follows minute 2.
    assert chain_a[0]["phase"] == "checkpoint" and chain_a[0]["seq"] == 4
    assert [e["seq"] for e in chain_a] == list(range(4, 13))
    assert [e["seq"] for e in chosen if e["chain"] == "b-bbbbbbbbbbbb"] == [1, 2, 3, 4]
    # Without checking signatures a chain must start at seq 1: the anchor needs the key (test_audit_checkpoints).
    assert not verify_events(chosen).ok


def test_until_runs_on_to_the_next_checkpoint_and_drops_chains_outside() -> None:
    chosen = _select(_two_chains(), until=T0 + timedelta(minutes=4))
    assert {e["chain"] for e in chosen} == {"b-aaaaaaaaaaaa"}  # chain b starts after --until
    assert [e["seq"] for e in chosen] == list(range(1, 9))  # minutes 0-5 and the checkpoint after 5
    assert chosen[-1]["phase"] == "checkpoint"
    assert verify_events(chosen).ok


def test_a_window_with_both_ends() -> None:
    chosen = _select(_two_chains(), since=T0 + timedelta(minutes=4), until=T0 + timedelta(minutes=5))
    assert [e["seq"] for e in chosen] == [4, 5, 6, 7, 8]  # checkpoint, minutes 3, 4, 5, checkpoint


def test_pack_and_decision_filters_are_exact() -> None:
    events = _two_chains()
    chosen = _select(events, pack="alpha", decision="allow", since=T0 + timedelta(minutes=2))
    minutes = [int(e["request_id"][1:]) for e in chosen]
    assert minutes == [5, 7, 100, 101, 102, 103]  # chain b: alpha, allow, at T0+10m
    assert all(e["pack_id"] == "alpha" and e["decision"] == "allow" for e in chosen)
    exact = _select(events, since=T0 + timedelta(minutes=4), until=T0 + timedelta(minutes=5), exact=True)
    assert [e["request_id"] for e in exact] == ["r4"]


def test_selection_refuses_an_empty_window_and_a_bad_decision() -> None:
    with pytest.raises(ValueError, match="later than"):
        Selection(since=T0, until=T0)
    with pytest.raises(ValueError, match="decision"):
        Selection(decision="maybe")


def test_events_held_before_the_window_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import broker.audit.export as export

    monkeypatch.setattr(export, "MAX_HELD", 5)
    chain = AuditChain("b-cccccccccccc")
    events = [_event(chain, i, T0 + timedelta(seconds=i)) for i in range(8)]  # no checkpoint at all
    with pytest.raises(ValueError, match="chain b-cccccccccccc has no checkpoint in its last 5 events"):
        _select(events, since=T0 + timedelta(minutes=1))


def test_parse_time_forms() -> None:
    now = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
    assert parse_time("2026-11-28T10:00:00Z") == T0
    assert parse_time("2026-11-28T11:00:00+01:00") == T0
    assert parse_time("2026-11-28T10:00:00") == T0
    assert parse_time("2026-11-28") == datetime(2026, 11, 28, tzinfo=UTC)
    assert parse_time("2h", now=now) == T0
    assert parse_time("90s", now=now) == now - timedelta(seconds=90)
    assert parse_time("7d", now=now) == now - timedelta(days=7)
    for bad in ("yesterday", "2h ago", "", "-5m", "2026-13-01"):
        with pytest.raises(ValueError, match="not a time"):
            parse_time(bad)


# ----------------------------------------------------------------------------------------- CLI


@pytest.fixture
def live_ws(tmp_path: Path) -> Iterator[Any]:
    """A workspace whose embedded nats-server runs, with the audit stream and events of two chains."""
    from broker.bus.server import connect, ensure_audit_stream

    ws = make_workspace(tmp_path / "ws", ["alpha", "beta"])
    with running_server(ws):
        run(ensure_audit_stream(ws))

        async def write() -> None:
            from broker.audit.trail import AuditWriter

            nc = await connect(ws, "broker")
            try:
                writers: dict[str, AuditWriter] = {}  # one per chain of the samples: same positions
                for e in _two_chains():
                    writer = writers.setdefault(e["chain"], AuditWriter(nc.jetstream(), AuditChain()))
                    fields = {k: v for k, v in e.items() if k not in ("chain", "seq", "prev_hash", "hash")}
                    await writer.record(fields, msg_id=str(e["request_id"]))
            finally:
                await nc.close()

        run(write())
        yield ws


def _cli(args: list[str]) -> Any:
    from typer.testing import CliRunner

    from broker.cli.audit import audit_app

    return CliRunner().invoke(audit_app, args)


def test_cli_exports_ocsf_with_filters(live_ws: Any, tmp_path: Path) -> None:
    out = tmp_path / "siem.jsonl"
    root = ["--root", str(live_ws.root)]
    result = _cli(["export", "--format", "ocsf", "--pack", "alpha", "--decision", "allow",
                   "--since", "2026-11-28T10:02:00Z", "--until", "2026-11-28T10:08:00Z", "-o", str(out), *root])  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [e["api"]["request"]["uid"] for e in lines] == ["r5", "r7"]
    for line in lines:
        assert ocsf_errors(line) == [], line
        assert line["actor"]["app_name"] == "alpha" and line["action"] == "Allowed"
    assert "exported 2 events" in result.output

    result = _cli(["export", "--format", "ocsf", *root])  # every event, checkpoints included
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == len(_two_chains())
    assert all(ocsf_errors(r) == [] for r in rows)


def test_cli_export_jsonl_since_is_a_contiguous_run(live_ws: Any, tmp_path: Path) -> None:
    out = tmp_path / "since.jsonl"
    result = _cli(["export", "--since", "2026-11-28T10:04:00Z", "-o", str(out), "--root", str(live_ws.root)])
    assert result.exit_code == 0, result.output
    events = [json.loads(line) for line in out.read_text().splitlines()]
    expected = _select(_two_chains(), since=T0 + timedelta(minutes=4))
    # Same runs of the same chains' positions (the stream's chain ids are the writer's own).
    assert [(e["seq"], e.get("phase"), e["request_id"]) for e in events] == [
        (e["seq"], e.get("phase"), e["request_id"]) for e in expected
    ]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["export", "--since", "yesterday"], "--since 'yesterday' is not a time"),
        (["export", "--format", "cef"], "--format must be jsonl or ocsf"),
        (["export", "--decision", "maybe"], "--decision must be allow, deny or error"),
        (["export", "--pack", "Bad Pack"], "is not a pack id"),
        (["export", "--since", "2026-11-28", "--until", "2026-11-27"], "--until must be later than --since"),
    ],
)
def test_cli_export_usage_errors_exit_2(tmp_path: Path, args: list[str], needle: str) -> None:
    result = _cli([*args, "--root", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_cli_export_without_nats_exits_3(tmp_path: Path) -> None:
    from broker.core.net import free_port

    ws = tmp_path / "ws"
    (ws / "docker" / ".rumi").mkdir(parents=True)
    (ws / "docker" / ".rumi" / "nats.url").write_text(f"nats://127.0.0.1:{free_port()}\n")
    result = _cli(["export", "--format", "ocsf", "--root", str(ws)])
    assert result.exit_code == 3, result.output
    assert "cannot reach NATS" in result.output and "Traceback" not in result.output
