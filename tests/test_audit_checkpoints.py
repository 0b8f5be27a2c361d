"""Signed audit checkpoints: keys, signatures, the broker's checkpoints, and `rumi audit verify`
finding a cut tail or a rewritten history by the checkpoint it no longer matches.

NATS tests run the workspace's real embedded nats-server (conftest `nats_server`) and a real Broker.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from broker.audit.checkpoint import (
    CHECKPOINT_SUBJECT,
    AuditKeys,
    Checkpointer,
    CheckpointSigner,
    SigningChain,
    checkpoint_fields,
    register_chain,
    signed_message,
)
from broker.audit.trail import ZERO_HASH, AuditWriter, ChainVerifier, audit_fields, event_hash, verify_events
from broker.core.errors import AuditError
from broker.core.workspace import Workspace
from tests._nats_fixtures import run
from tests._skip import skip_unless_ci

from .conftest import connected_pack, running_broker

TOOL = "default:tool:my_tool"


def _fields(i: int, pack: str = "default") -> dict[str, Any]:
    return audit_fields(
        request_id=f"r{i}", pack_id=pack, component_id=TOOL, capability="file_read",
        target=f"/data/{i}.txt", decision="allow", code="ok", duration_ms=0.5, phase="complete",
    )  # fmt: skip


def _signing_chain(ws: Workspace, worker: int = 0) -> SigningChain:
    signer = CheckpointSigner.for_worker(ws, worker)
    chain = SigningChain(signer, lambda chain_id: register_chain(ws, signer, chain_id, worker=worker))
    chain.register_current()
    return chain


def _keys(ws: Workspace) -> AuditKeys:
    return AuditKeys.load(ws.audit_keys_file)


def _rehash(events: list[dict[str, Any]], start: int) -> None:
    """What a forger without the key can do: change events, then re-link every hash from `start` on."""
    for i in range(start, len(events)):
        if i:
            events[i]["prev_hash"] = events[i - 1]["hash"]
        events[i]["hash"] = event_hash(events[i])


# ----------------------------------------------------------------------------------------- keys


def test_each_worker_has_a_private_key_and_its_public_half_is_recorded(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path / "ws")
    first = Checkpointer.open(ws, worker=0)
    key_file = ws.audit_signing_keys / "worker-0.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(ws.audit_signing_keys.stat().st_mode) == 0o700
    seed = key_file.read_text().strip()
    recorded = json.loads(ws.audit_keys_file.read_text())
    entry = recorded["keys"][first.chain.signer.key_id]
    assert entry["public_key"] == first.chain.signer.public_key.hex() and entry["alg"] == "ed25519"
    assert entry["chains"] == [first.chain.chain_id]
    assert seed not in ws.audit_keys_file.read_text()
    assert seed not in repr(first.chain.signer)

    again = Checkpointer.open(ws, worker=0)  # a restart: same key, one more chain
    other = Checkpointer.open(ws, worker=1)  # another worker: a key of its own
    assert again.chain.signer.key_id == first.chain.signer.key_id
    assert other.chain.signer.key_id != first.chain.signer.key_id
    recorded = json.loads(ws.audit_keys_file.read_text())
    assert recorded["keys"][first.chain.signer.key_id]["chains"] == [
        first.chain.chain_id,
        again.chain.chain_id,
    ]
    assert recorded["keys"][other.chain.signer.key_id]["chains"] == [other.chain.chain_id]


def test_the_checkpoint_key_is_not_the_nats_key(ws: Workspace) -> None:
    import nkeys

    from broker.bus.creds import ensure_identity

    signer = CheckpointSigner.for_worker(ws, 0)
    nats_key = nkeys.from_seed(bytearray(ensure_identity(ws, "broker").seed_path.read_bytes().strip()))
    encoded = bytes(nats_key.public_key).decode()
    # An nkey public key is base32 of a prefix byte, the 32 raw Ed25519 bytes and a CRC.
    nats_public = base64.b32decode(encoded + "=" * (-len(encoded) % 8))[1:33]
    assert bytes(nats_public) != signer.public_key


def test_an_unusable_key_file_stops_the_broker_with_one_line(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path / "ws")
    CheckpointSigner.for_worker(ws, 0)
    key_file = ws.audit_signing_keys / "worker-0.key"
    os.chmod(key_file, 0o644)
    with pytest.raises(AuditError, match=r"readable by others.*chmod 600"):
        Checkpointer.open(ws)
    os.chmod(key_file, 0o600)
    key_file.write_text("not a key\n")
    with pytest.raises(AuditError, match="not an audit checkpoint key"):
        Checkpointer.open(ws)
    ws.audit_keys_file.write_text("{broken")
    with pytest.raises(AuditError, match="not valid JSON"):
        AuditKeys.load(ws.audit_keys_file)


# ----------------------------------------------------------------------------------------- signatures


def test_a_checkpoint_signs_its_predecessor_and_verifies(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path / "ws")
    chain = _signing_chain(ws)
    events = [chain.seal(_fields(i)) for i in range(3)]
    checkpoint = chain.seal(checkpoint_fields())
    extra = checkpoint["extra"]
    assert (extra["chain"], extra["seq"], extra["head"]) == (chain.chain_id, 3, events[-1]["hash"])
    assert checkpoint["seq"] == 4 and checkpoint["prev_hash"] == events[-1]["hash"]
    assert chain.since_checkpoint == 0 and chain.checkpoints == 1
    keys = _keys(ws)
    assert keys.check(checkpoint) is None
    report = verify_events([*events, checkpoint])  # without keys: an ordinary event of the chain
    assert report.ok
    verifier = ChainVerifier(checkpoints=keys.check)
    for e in [*events, checkpoint]:
        verifier.add(e)
    assert verifier.report.ok and verifier.report.checkpoints[chain.chain_id][0] == 4

    # The recipe of docs/audit.md, with nothing but PyNaCl and the keys file.
    import nacl.signing

    public = json.loads(ws.audit_keys_file.read_text())["keys"][extra["key_id"]]["public_key"]
    message = f"rumi-audit-checkpoint:v1:{extra['chain']}:{extra['seq']}:{extra['head']}".encode()
    assert message == signed_message(chain.chain_id, 3, events[-1]["hash"])
    nacl.signing.VerifyKey(bytes.fromhex(public)).verify(message, bytes.fromhex(extra["sig"]))


def test_an_empty_chain_can_be_signed(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path / "ws")
    chain = _signing_chain(ws)
    first = chain.seal(checkpoint_fields())
    assert (first["extra"]["seq"], first["extra"]["head"]) == (0, ZERO_HASH)
    assert _keys(ws).check(first) is None


@pytest.mark.parametrize(
    ("tamper", "needle"),
    [
        (lambda cp: cp["extra"].update(sig=("0" if cp["extra"]["sig"][0] != "0" else "1") + cp["extra"]["sig"][1:]),
         "signature does not verify"),
        (lambda cp: cp["extra"].update(head="ab" * 32), "does not match the chain: seq 3 has hash"),
        (lambda cp: cp["extra"].update(seq=2), "signs seq 2 but follows seq 3"),
        (lambda cp: cp["extra"].update(chain="b-000000000000"), "signs chain b-000000000000"),
        (lambda cp: cp["extra"].update(key_id="0123456789abcdef"), "key 0123456789abcdef, which is not in"),
        (lambda cp: cp.update(extra={"bytes": 5}), "unknown signature algorithm"),
        (lambda cp: cp.pop("extra"), "no signature"),
    ],
)  # fmt: skip
def test_a_tampered_checkpoint_fails_verification(tmp_path: Path, tamper: Any, needle: str) -> None:
    ws = Workspace.at(tmp_path / "ws")
    chain = _signing_chain(ws)
    events = [chain.seal(_fields(i)) for i in range(3)]
    events.append(chain.seal(checkpoint_fields()))
    tamper(events[-1])
    _rehash(events, 3)  # its own hash re-made: only the signature can tell
    verifier = ChainVerifier(checkpoints=_keys(ws).check)
    for e in events:
        verifier.add(e)
    failure = verifier.report.failure
    assert failure is not None and failure.reason == "bad checkpoint" and failure.seq == 4
    assert needle in failure.detail, failure.detail


def test_a_key_may_sign_only_the_chains_recorded_for_it(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path / "ws")
    signer = CheckpointSigner.for_worker(ws, 0)
    chain = SigningChain(signer, lambda chain_id: None)  # never recorded in audit-keys.json
    register_chain(ws, signer, "b-111111111111")
    event = chain.seal(checkpoint_fields())
    assert f"is not recorded as signing chain {chain.chain_id}" in str(_keys(ws).check(event))


def test_a_rewritten_history_fails_at_the_next_checkpoint(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path / "ws")
    chain = _signing_chain(ws)
    events = [chain.seal(_fields(i)) for i in range(5)]
    events.append(chain.seal(checkpoint_fields()))
    events += [chain.seal(_fields(i)) for i in range(5, 8)]
    events[1]["target"] = "/data/innocent.txt"
    _rehash(events, 1)
    assert verify_events(events).ok  # every hash re-linked: a plain hash chain cannot tell
    verifier = ChainVerifier(checkpoints=_keys(ws).check)
    for e in events:
        verifier.add(e)
    failure = verifier.report.failure
    assert failure is not None and (failure.seq, failure.reason) == (6, "bad checkpoint")
    assert "does not match the chain" in failure.detail


def test_a_chain_may_start_at_a_signed_checkpoint_only(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path / "ws")
    chain = _signing_chain(ws)
    events = [chain.seal(_fields(i)) for i in range(4)]
    events.append(chain.seal(checkpoint_fields()))
    events += [chain.seal(_fields(i)) for i in range(4, 7)]
    tail = events[4:]
    verifier = ChainVerifier(checkpoints=_keys(ws).check)
    for e in tail:
        verifier.add(e)
    assert verifier.report.ok and verifier.report.starts[chain.chain_id] == 5
    # Without the keys the same file has no anchor; starting anywhere else is a gap either way.
    assert verify_events(tail).failure is not None
    verifier = ChainVerifier(checkpoints=_keys(ws).check)
    for e in events[5:]:
        verifier.add(e)
    failure = verifier.report.failure
    assert failure is not None and failure.reason == "missing (gap)"


def test_openssl_verifies_a_checkpoint_with_the_documented_recipe(tmp_path: Path) -> None:
    if shutil.which("openssl") is None or shutil.which("xxd") is None:
        skip_unless_ci("openssl and xxd are needed to check the documented recipe (not installed)")
    ws = Workspace.at(tmp_path / "ws")
    chain = _signing_chain(ws)
    chain.seal(_fields(1))
    extra = chain.seal(checkpoint_fields())["extra"]
    public = json.loads(ws.audit_keys_file.read_text())["keys"][extra["key_id"]]["public_key"]
    script = """
set -e
printf '302a300506032b6570032100%s' "$PUB" | xxd -r -p > pub.der
openssl pkey -pubin -inform DER -in pub.der -out pub.pem
printf 'rumi-audit-checkpoint:v1:%s:%s:%s' "$CHAIN" "$SEQ" "$HEAD" > msg
printf '%s' "$SIG" | xxd -r -p > sig
openssl pkeyutl -verify -pubin -inkey pub.pem -rawin -in msg -sigfile sig
"""
    env = {
        **os.environ,
        "PUB": public,
        "CHAIN": extra["chain"],
        "SEQ": str(extra["seq"]),
        "HEAD": extra["head"],
    }
    good = subprocess.run(["bash", "-c", script], cwd=tmp_path, env={**env, "SIG": extra["sig"]},
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert good.returncode == 0 and "Signature Verified Successfully" in good.stdout, (
        good.stdout + good.stderr
    )
    bad = subprocess.run(["bash", "-c", script], cwd=tmp_path, env={**env, "SIG": extra["sig"], "SEQ": "2"},
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    assert bad.returncode != 0


# ----------------------------------------------------------------------------------------- writing


async def _stored(ws: Workspace) -> list[dict[str, Any]]:
    from broker.audit.trail import read_events
    from broker.bus.server import connect

    nc = await connect(ws, "audit")
    try:
        return [e async for e in read_events(nc)]
    finally:
        await nc.close()


async def _with_writer(ws: Workspace, checkpointer: Checkpointer, body: Any) -> None:
    from broker.bus.server import connect

    nc = await connect(ws, "broker")
    writer = AuditWriter(nc.jetstream(), checkpointer.chain)
    task = asyncio.create_task(checkpointer.run(writer))
    try:
        await body(writer)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await nc.close()


def test_a_checkpoint_every_n_events_and_one_at_the_end(ws: Workspace, nats_server: object) -> None:
    checkpointer = Checkpointer.open(ws, every_events=100, every_seconds=60)

    async def body(writer: AuditWriter) -> None:
        for i in range(350):
            await writer.record(_fields(i), msg_id=f"r{i}")
        await asyncio.sleep(0.2)
        final = await checkpointer.final(writer)
        assert final is not None and final["extra"]["seq"] == final["seq"] - 1
        assert await checkpointer.final(writer) is None  # nothing new: no second one

    run(_with_writer(ws, checkpointer, body))
    events = run(_stored(ws))
    positions = [e["seq"] for e in events if e.get("phase") == "checkpoint"]
    gaps = [b - a - 1 for a, b in zip([0, *positions], positions, strict=False)]
    assert len(positions) == 4, positions
    assert all(100 <= gap <= 120 for gap in gaps[:3]), gaps  # events between checkpoints
    assert events[-1]["phase"] == "checkpoint"
    verifier = ChainVerifier(checkpoints=_keys(ws).check)
    for e in events:
        verifier.add(e)
    assert (
        verifier.report.ok
        and verifier.report.checkpoints[checkpointer.chain.chain_id][0] == events[-1]["seq"]
    )
    assert all(e["pack_id"] == "_broker" for e in events if e.get("phase") == "checkpoint")


def test_a_checkpoint_every_interval_but_none_when_idle(ws: Workspace, nats_server: object) -> None:
    checkpointer = Checkpointer.open(ws, every_events=10**6, every_seconds=0.2)

    async def body(writer: AuditWriter) -> None:
        await asyncio.sleep(0.5)  # idle from the start: nothing to sign
        for i in range(3):
            await writer.record(_fields(i), msg_id=f"r{i}")
        await asyncio.sleep(0.6)  # one tick signs the three, the next ones find nothing new

    run(_with_writer(ws, checkpointer, body))
    events = run(_stored(ws))
    assert [e.get("phase") for e in events] == ["complete"] * 3 + ["checkpoint"]


# ----------------------------------------------------------------------------------------- broker + CLI


def _cli(args: list[str]) -> Any:
    from typer.testing import CliRunner

    from broker.cli.audit import audit_app

    return CliRunner().invoke(audit_app, args)


async def _serve_some(ws: Workspace, caplog: pytest.LogCaptureFixture) -> str:
    sandbox = ws.pack_work_area("default")
    caplog.set_level(logging.DEBUG)
    async with running_broker(ws) as broker, connected_pack(ws) as pack:
        ctx = pack.context(TOOL)
        for i in range(3):
            await ctx.file_write(f"{sandbox}/{i}.txt", b"x")
        chain = str(broker.chain_id)  # type: ignore[attr-defined]
    return chain


def test_the_broker_ends_its_chain_with_a_signed_checkpoint(
    ws: Workspace, nats_server: object, caplog: pytest.LogCaptureFixture
) -> None:
    chain = run(_serve_some(ws, caplog))
    events = run(_stored(ws))
    ours = [e for e in events if e["chain"] == chain]
    assert ours[-1]["phase"] == "checkpoint" and ours[-1]["extra"]["seq"] == len(ours) - 1
    assert ours[-1]["extra"]["head"] == ours[-2]["hash"]
    keys = json.loads(ws.audit_keys_file.read_text())["keys"]
    assert any(chain in entry["chains"] for entry in keys.values())
    seed = (ws.audit_signing_keys / "worker-0.key").read_text().strip()
    assert all(seed not in json.dumps(e) for e in events)
    assert all(seed not in r.getMessage() for r in caplog.records)

    result = _cli(["verify", "--root", str(ws.root)])
    assert result.exit_code == 0, result.output
    assert f"chain {chain}: seq 1-{len(ours)}" in result.output
    assert f"signed up to its checkpoint at seq {len(ours)}" in result.output


def _export(ws: Workspace, path: Path, *extra: str) -> list[str]:
    result = _cli(["export", "-o", str(path), *extra, "--root", str(ws.root)])
    assert result.exit_code == 0, result.output
    return path.read_text().splitlines()


def test_verify_names_the_checkpoint_a_cut_file_no_longer_reaches(
    ws: Workspace, nats_server: object, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    chain = run(_serve_some(ws, caplog))
    full = tmp_path / "full.jsonl"
    lines = _export(ws, full)
    last = json.loads(lines[-1])
    assert last["phase"] == "checkpoint" and last["chain"] == chain
    cut = tmp_path / "cut.jsonl"
    cut.write_text("\n".join(lines[:-2]) + "\n")  # the last event and the checkpoint after it

    # On its own a cut file still verifies: nothing after its own last checkpoint shows the cut.
    alone = _cli(["verify", "--file", str(cut), "--root", str(ws.root)])
    assert alone.exit_code == 0, alone.output
    assert "has no signed checkpoint" in alone.output  # …and it says its events are unsigned

    checkpoint = f"checkpoint seq {last['seq']} of chain {chain}"
    against = _cli(["verify", "--file", str(cut), "--against-stream", "--root", str(ws.root)])
    assert against.exit_code == 1, against.output
    assert checkpoint in against.output and "cut at the end" in against.output
    assert f"ends at seq {last['seq'] - 2} of chain {chain}" in against.output

    saved = tmp_path / "checkpoints.jsonl"
    saved.write_text("\n".join(line for line in lines if '"phase":"checkpoint"' in line) + "\n")
    by_file = _cli(
        ["verify", "--file", str(cut), "--checkpoint", str(saved), "--json", "--root", str(ws.root)]
    )
    assert by_file.exit_code == 1, by_file.output
    report = json.loads(by_file.stdout)
    assert report["ok"] is False and report["failure"]["reason"] == "cut at the end"
    assert checkpoint in report["failure"]["detail"]

    whole = _cli(["verify", "--file", str(full), "--against-stream", "--json", "--root", str(ws.root)])
    assert whole.exit_code == 0, whole.output
    assert json.loads(whole.stdout)["chains"][chain]["unsigned_events"] == 0
    stream = _cli(["verify", "--checkpoint", str(saved), "--root", str(ws.root)])
    assert stream.exit_code == 0, stream.output


def test_verify_against_the_stream_finds_a_history_without_its_signatures(
    ws: Workspace, nats_server: object, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    chain = run(_serve_some(ws, caplog))
    lines = _export(ws, tmp_path / "full.jsonl")
    events = [json.loads(line) for line in lines]
    # A forger without the key: change an early event, turn the checkpoints into ordinary events
    # (their signatures would no longer match), re-link every hash.
    events[0]["target"] = "/innocent"
    for e in events:
        if e.get("phase") == "checkpoint":
            e["phase"], e["extra"] = "complete", {"bytes": 0}
    _rehash(events, 0)
    forged = tmp_path / "forged.jsonl"
    forged.write_text("".join(json.dumps(e) + "\n" for e in events))
    assert _cli(["verify", "--file", str(forged), "--root", str(ws.root)]).exit_code == 0
    result = _cli(["verify", "--file", str(forged), "--against-stream", "--root", str(ws.root)])
    assert result.exit_code == 1, result.output
    assert (
        "checkpoint mismatch" in result.output
        and f"checkpoint seq {len(events)} of chain {chain}" in result.output
    )


def test_a_since_export_starts_at_a_checkpoint_and_verifies_alone(
    ws: Workspace, nats_server: object, tmp_path: Path
) -> None:
    from broker.audit.trail import utc_timestamp

    checkpointer = Checkpointer.open(ws, every_events=5, every_seconds=60)
    marks: list[str] = []

    async def body(writer: AuditWriter) -> None:
        for i in range(12):
            await writer.record(_fields(i), msg_id=f"r{i}")
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        marks.append(utc_timestamp())
        for i in range(12, 15):
            await writer.record(_fields(i), msg_id=f"r{i}")
        await checkpointer.final(writer)

    run(_with_writer(ws, checkpointer, body))
    stored = run(_stored(ws))
    first_after = next(i for i, e in enumerate(stored) if e["ts"] >= marks[0])
    anchor = max(i for i, e in enumerate(stored[:first_after]) if e.get("phase") == "checkpoint")
    lines = _export(ws, tmp_path / "since.jsonl", "--since", marks[0])
    exported = [json.loads(line) for line in lines]
    assert exported == stored[anchor:]
    assert exported[0]["phase"] == "checkpoint" and exported[0]["seq"] > 1
    result = _cli(["verify", "--file", str(tmp_path / "since.jsonl"), "--root", str(ws.root)])
    assert result.exit_code == 0, result.output
    assert f"seq {exported[0]['seq']}-{exported[-1]['seq']}" in result.output
    assert not verify_events(exported).ok  # the anchor is trusted for its signature only


# ----------------------------------------------------------------------------------------- CLI errors


def test_verify_usage_errors_exit_2(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path / "ws")
    ws.state.mkdir(parents=True)
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad-keys.json").write_text("[]")
    cases = [
        (["verify", "--against-stream"], "add --file F"),
        (
            ["verify", "--file", str(tmp_path / "empty.jsonl"), "--against-stream", "--checkpoint", "x"],
            "not both",
        ),
        (["verify", "--keys", str(tmp_path / "bad-keys.json")], "expected"),
        (["verify", "--checkpoint", str(tmp_path / "empty.jsonl")], "no valid checkpoint event"),
        (["verify", "--file", str(tmp_path / "missing.jsonl")], "cannot read"),
    ]
    for args, needle in cases:
        result = _cli([*args, "--root", str(ws.root)])
        assert result.exit_code == 2, (args, result.output)
        assert needle in result.output and "Traceback" not in result.output, result.output


def test_verify_without_nats_exits_3(tmp_path: Path) -> None:
    from broker.core.net import free_port

    ws = Workspace.at(tmp_path / "ws")
    ws.state.mkdir(parents=True)
    (ws.state / "nats.url").write_text(f"nats://127.0.0.1:{free_port()}\n")
    (tmp_path / "f.jsonl").write_text("")
    for args in (["verify"], ["verify", "--file", str(tmp_path / "f.jsonl"), "--against-stream"]):
        result = _cli([*args, "--root", str(ws.root)])
        assert result.exit_code == 3, result.output
        assert "cannot reach NATS" in result.output and "Traceback" not in result.output


def test_checkpoint_subject_is_the_brokers_own() -> None:
    from broker.core.ids import is_pack_id

    assert CHECKPOINT_SUBJECT == "rumi.audit._broker.checkpoint"
    assert not is_pack_id("_broker")  # no Pack can have the checkpoints' pack_id
