"""Signed audit checkpoints: each broker signs its chain's head, so a cut tail or a rewrite shows.

Every `EVERY_SECONDS` (10 s) or `EVERY_EVENTS` (1,000) events, and once more on shutdown, a broker
writes a checkpoint into its own chain: an ordinary chained audit event with ``phase: "checkpoint"``
whose ``extra`` holds ``{alg, chain, seq, head, key_id, sig}``.  ``seq``/``head`` are the position and
``hash`` of the event just before the checkpoint (so ``seq == event.seq - 1`` and
``head == event.prev_hash``), and ``sig`` is an Ed25519 signature (hex) over

    signed_message = "rumi-audit-checkpoint:v1:<chain>:<seq>:<head>"      (UTF-8, seq in decimal)

Each broker worker has a signing key of its own (never the NATS authentication key), kept in
``docker/.rumi/audit-signing/worker-<n>.key`` (mode 0600).  Its public half, with the ids of the chains
it signed, is in ``docker/.rumi/audit-keys.json``; `AuditKeys.check` verifies a checkpoint event with
it.  A checkpoint vouches for every event of its chain up to ``seq``: events after a chain's last
checkpoint can still be cut without a trace (docs/audit.md, "Checkpoints").
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import nacl.exceptions
import nacl.signing

from broker.audit.trail import (
    AUDIT_VERSION,
    CHECKPOINT_PHASE,
    AuditChain,
    AuditWriter,
    ChainVerifier,
    VerifyFailure,
    VerifyReport,
    event_hash,
    utc_timestamp,
)
from broker.core.atomic import write_atomic
from broker.core.errors import AuditError
from broker.core.workspace import Workspace

__all__ = [
    "CHECKPOINT_PACK",
    "CHECKPOINT_SUBJECT",
    "EVERY_EVENTS",
    "EVERY_SECONDS",
    "SIGNATURE_CONTEXT",
    "AuditKeys",
    "CheckpointSigner",
    "Checkpointer",
    "InputCheck",
    "Reference",
    "SigningChain",
    "compare_with_references",
    "references",
    "register_chain",
    "signed_message",
    "unsigned_tails",
]

log = logging.getLogger(__name__)

EVERY_SECONDS: Final = 10.0
EVERY_EVENTS: Final = 1000
SIGNATURE_CONTEXT: Final = "rumi-audit-checkpoint:v1"
ALGORITHM: Final = "ed25519"
# A checkpoint is the broker's own event: no Pack id can start with "_" (^[a-z][a-z0-9_-]{0,31}$).
CHECKPOINT_PACK: Final = "_broker"
CHECKPOINT_CAPABILITY: Final = "checkpoint"
CHECKPOINT_SUBJECT: Final = f"rumi.audit.{CHECKPOINT_PACK}.{CHECKPOINT_CAPABILITY}"
KEYS_FORMAT: Final = 1
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX128 = re.compile(r"^[0-9a-f]{128}$")
_KEY_ID = re.compile(r"^[0-9a-f]{16}$")


def signed_message(chain: str, seq: int, head: str) -> bytes:
    """The exact bytes a checkpoint signature covers."""
    return f"{SIGNATURE_CONTEXT}:{chain}:{seq}:{head}".encode()


def key_id_of(public_key: bytes) -> str:
    """A key's id: the first 16 hex digits of SHA-256 over its 32 raw public-key bytes."""
    return hashlib.sha256(public_key).hexdigest()[:16]


# ----------------------------------------------------------------------------------------- keys


class CheckpointSigner:
    """One broker worker's Ed25519 checkpoint key. Never printed, logged or put in an event."""

    def __init__(self, signing_key: nacl.signing.SigningKey) -> None:
        self._key = signing_key
        self.public_key = bytes(signing_key.verify_key)
        self.key_id = key_id_of(self.public_key)

    def __repr__(self) -> str:
        return f"CheckpointSigner(key_id={self.key_id!r})"

    @classmethod
    def for_worker(cls, ws: Workspace, worker: int = 0) -> CheckpointSigner:
        """Worker `worker`'s key from ``docker/.rumi/audit-signing/``, made (0600) on first use.

        AuditError when the file is not a key, or others can read it.
        """
        path = ws.audit_signing_keys / f"worker-{int(worker)}.key"
        if not path.exists() and not path.is_symlink():
            try:
                with _keys_lock(ws):  # two processes starting at once make one key, not two
                    if not path.exists() and not path.is_symlink():
                        key = nacl.signing.SigningKey.generate()
                        path.parent.mkdir(parents=True, exist_ok=True)
                        os.chmod(path.parent, 0o700)
                        write_atomic(path, bytes(key).hex() + "\n", mode=0o600)
                        log.info(
                            "made audit checkpoint key %s for worker %d",
                            key_id_of(bytes(key.verify_key)),
                            worker,
                        )
                        return cls(key)
            except OSError as exc:
                raise AuditError(f"{path}: cannot make the audit checkpoint key ({exc.strerror})") from None
        try:
            info = path.lstat()
        except OSError as exc:
            raise AuditError(f"{path}: cannot read the audit checkpoint key ({exc.strerror})") from None
        if not stat.S_ISREG(info.st_mode):
            raise AuditError(f"{path}: the audit checkpoint key is not a regular file")
        if info.st_mode & 0o077:
            raise AuditError(
                f"{path}: the audit checkpoint key is readable by others (mode {stat.S_IMODE(info.st_mode):o}); "
                "chmod 600 it"
            )
        try:
            text = path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            text = ""
        if not _HEX64.match(text):
            raise AuditError(
                f"{path}: not an audit checkpoint key (64 hex digits); remove it and a new key is made"
            )
        return cls(nacl.signing.SigningKey(bytes.fromhex(text)))

    def sign(self, chain: str, seq: int, head: str) -> dict[str, Any]:
        """A checkpoint event's ``extra``: the signed position and the signature."""
        signature = self._key.sign(signed_message(chain, seq, head)).signature
        return {
            "alg": ALGORITHM,
            "chain": chain,
            "seq": seq,
            "head": head,
            "key_id": self.key_id,
            "sig": signature.hex(),
        }


@contextlib.contextmanager
def _keys_lock(ws: Workspace) -> Iterator[None]:
    """An exclusive lock shared by every broker process of the workspace (key files, audit-keys.json)."""
    ws.state.mkdir(parents=True, exist_ok=True)
    with (ws.state / ".audit-keys.lock").open("a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        yield


def _read_keys_file(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {"v": KEYS_FORMAT, "keys": {}}
    except OSError as exc:
        raise AuditError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        data = json.loads(raw)
    except ValueError:
        raise AuditError(f"{path}: not valid JSON (a copy of the workspace's audit-keys.json?)") from None
    if not isinstance(data, dict) or not isinstance(data.get("keys"), dict):
        raise AuditError(f'{path}: expected {{"v": 1, "keys": {{...}}}}')
    return data


def register_chain(ws: Workspace, signer: CheckpointSigner, chain_id: str, *, worker: int = 0) -> None:
    """Record in audit-keys.json that `signer` signs `chain_id` (before it signs anything in it).

    Brokers of several worker processes share the file: each update holds an exclusive lock.
    """
    path = ws.audit_keys_file
    with _keys_lock(ws):
        data = _read_keys_file(path)
        entry = data["keys"].setdefault(
            signer.key_id,
            {"alg": ALGORITHM, "public_key": signer.public_key.hex(), "worker": worker,
             "created": utc_timestamp(), "chains": []},
        )  # fmt: skip
        if entry.get("public_key") != signer.public_key.hex():
            raise AuditError(f"{path}: key {signer.key_id} is recorded with another public key")
        chains = entry.setdefault("chains", [])
        if chain_id not in chains:
            chains.append(chain_id)
        write_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n", mode=0o644)


@dataclass(frozen=True)
class _PublicKey:
    key: nacl.signing.VerifyKey
    chains: frozenset[str] | None  # None: the file does not list them (a hand-made copy)


@dataclass
class AuditKeys:
    """The public checkpoint keys (audit-keys.json), to check checkpoint events with."""

    source: str = "audit-keys.json"
    keys: dict[str, _PublicKey] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> AuditKeys:
        """The keys in `path` (none when it does not exist); AuditError when it is not a keys file."""
        data = _read_keys_file(path)
        keys: dict[str, _PublicKey] = {}
        for key_id, entry in data["keys"].items():
            public = entry.get("public_key") if isinstance(entry, dict) else None
            if not isinstance(public, str) or not _HEX64.match(public):
                raise AuditError(f"{path}: key {key_id!r} has no public_key of 64 hex digits")
            if key_id_of(bytes.fromhex(public)) != key_id:
                raise AuditError(f"{path}: key id {key_id!r} does not match its public key")
            chains = entry.get("chains")
            listed = frozenset(c for c in chains if isinstance(c, str)) if isinstance(chains, list) else None
            keys[key_id] = _PublicKey(nacl.signing.VerifyKey(bytes.fromhex(public)), listed)
        return cls(str(path), keys)

    def check(self, event: Mapping[str, Any]) -> str | None:
        """None when `event` is a checkpoint signed by a known key for its own chain position, else why not.

        The position it signs must be the event's own predecessor: ``chain`` = the event's chain,
        ``seq`` = its seq - 1, ``head`` = its prev_hash (so a checkpoint cannot be moved or copied).
        """
        extra = event.get("extra")
        if not isinstance(extra, Mapping):
            return "it has no signature (no extra)"
        chain, seq, head = extra.get("chain"), extra.get("seq"), extra.get("head")
        key_id, sig = extra.get("key_id"), extra.get("sig")
        if extra.get("alg") != ALGORITHM:
            return f"unknown signature algorithm {extra.get('alg')!r} (expected {ALGORITHM})"
        if not isinstance(chain, str) or isinstance(seq, bool) or not isinstance(seq, int):
            return "extra.chain must be a string and extra.seq an integer"
        if not isinstance(head, str) or not _HEX64.match(head):
            return "extra.head must be 64 lowercase hex digits"
        if not isinstance(key_id, str) or not _KEY_ID.match(key_id):
            return "extra.key_id must be 16 lowercase hex digits"
        if not isinstance(sig, str) or not _HEX128.match(sig):
            return "extra.sig must be 128 lowercase hex digits"
        if chain != event.get("chain"):
            return f"it signs chain {chain} but stands in chain {event.get('chain')}"
        own_seq = event.get("seq")
        if not isinstance(own_seq, int) or seq != own_seq - 1:
            return f"it signs seq {seq} but follows seq {own_seq - 1 if isinstance(own_seq, int) else '?'}"
        if head != event.get("prev_hash"):
            return (
                f"its signed head {head[:16]}… does not match the chain: seq {seq} has hash "
                f"{str(event.get('prev_hash'))[:16]}…"
            )
        public = self.keys.get(key_id)
        if public is None:
            return f"signed by key {key_id}, which is not in {self.source}"
        if public.chains is not None and chain not in public.chains:
            return f"key {key_id} is not recorded as signing chain {chain} in {self.source}"
        try:
            public.key.verify(signed_message(chain, seq, head), bytes.fromhex(sig))
        except nacl.exceptions.BadSignatureError:
            return f"its signature does not verify with key {key_id}"
        return None


# ----------------------------------------------------------------------------------------- writing


def checkpoint_fields() -> dict[str, Any]:
    """A checkpoint event's own fields; the chain adds the signed ``extra`` as it seals it."""
    return {
        "v": AUDIT_VERSION,
        "ts": utc_timestamp(),
        "request_id": "checkpoint",
        "pack_id": CHECKPOINT_PACK,
        "component_id": "",
        "capability": CHECKPOINT_CAPABILITY,
        "target": "",
        "decision": "allow",
        "code": "ok",
        "duration_ms": 0.0,
        "phase": CHECKPOINT_PHASE,
    }


class SigningChain(AuditChain):
    """An AuditChain that signs its head into each checkpoint event as it seals it.

    Signing happens in `seal`, which the writer calls under its send lock, so the signed position is
    exactly the checkpoint's predecessor even with hundreds of events in flight. It also counts the
    events sealed since the last checkpoint and sets `due` every `every_events`.
    """

    def __init__(
        self,
        signer: CheckpointSigner,
        register: Callable[[str], None],
        *,
        every_events: int = EVERY_EVENTS,
        chain_id: str | None = None,
    ) -> None:
        super().__init__(chain_id)
        self.signer = signer
        self._register = register
        self._registered: set[str] = set()
        self.every_events = every_events
        self.since_checkpoint = 0
        self.checkpoints = 0
        self.due = asyncio.Event()

    def register_current(self) -> None:
        """Record the current chain id for this key (file I/O; done before the chain's first checkpoint)."""
        if self.chain_id not in self._registered:
            self._register(self.chain_id)
            self._registered.add(self.chain_id)

    def seal(self, fields: dict[str, Any]) -> dict[str, Any]:
        if fields.get("phase") != CHECKPOINT_PHASE:
            event = super().seal(fields)
            self.since_checkpoint += 1
            if self.since_checkpoint >= self.every_events:
                self.due.set()
            return event
        self.register_current()  # a chain rotated after a failed write is recorded here, once
        signed = dict(fields)
        signed["extra"] = self.signer.sign(self.chain_id, self.seq, self.last_hash)
        event = super().seal(signed)
        self.since_checkpoint = 0
        self.checkpoints += 1
        self.due.clear()  # events sealed while this one waited for the lock are covered by it
        return event


class Checkpointer:
    """Writes a broker's checkpoints: `run` every `every_seconds` or `every_events`, `final` on shutdown.

    A checkpoint is written only when events were sealed since the last one. A checkpoint that cannot
    be stored is logged and tried again at the next tick; requests are never held up by it.
    """

    def __init__(self, chain: SigningChain, *, every_seconds: float = EVERY_SECONDS) -> None:
        self.chain = chain
        self.every_seconds = every_seconds

    @classmethod
    def open(
        cls,
        ws: Workspace,
        *,
        worker: int = 0,
        every_seconds: float = EVERY_SECONDS,
        every_events: int = EVERY_EVENTS,
    ) -> Checkpointer:
        """The checkpointer of broker worker `worker`: its key (made on first use), a new chain
        recorded in audit-keys.json. AuditError when the key or the keys file is unusable."""
        signer = CheckpointSigner.for_worker(ws, worker)

        def register(chain_id: str) -> None:
            try:
                register_chain(ws, signer, chain_id, worker=worker)
            except OSError as exc:
                raise AuditError(f"{ws.audit_keys_file}: cannot record chain ({exc.strerror})") from None

        chain = SigningChain(signer, register, every_events=every_events)
        chain.register_current()
        return cls(chain, every_seconds=every_seconds)

    async def checkpoint(self, writer: AuditWriter) -> dict[str, Any] | None:
        """Write one checkpoint now (unless nothing was sealed since the last one); the event, or None."""
        if self.chain.since_checkpoint == 0:
            return None
        try:
            return await writer.record(checkpoint_fields(), msg_id="checkpoint")
        except Exception as exc:  # logged, never fatal: the next tick tries again
            log.warning("audit checkpoint not written: %s", exc)
            return None

    async def run(self, writer: AuditWriter) -> None:
        """Write checkpoints until cancelled."""
        task = asyncio.current_task()
        while True:
            if task is not None and task.cancelling():
                # A cancel that arrived while a publish's ack came in can be swallowed by the
                # writer's asyncio.wait_for (Python 3.11); it still ends this loop.
                raise asyncio.CancelledError
            # asyncio.timeout, not wait_for: wait_for (3.11) can swallow a cancel that arrives as
            # the event fires, and the broker's shutdown would then wait on this loop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.every_seconds):
                    await self.chain.due.wait()
            self.chain.due.clear()
            await self.checkpoint(writer)

    async def final(self, writer: AuditWriter) -> dict[str, Any] | None:
        """The shutdown checkpoint: after the last event, so a cleanly stopped chain is signed to its end."""
        return await self.checkpoint(writer)


# ----------------------------------------------------------------------------------------- verifying


@dataclass(frozen=True)
class Reference:
    """A chain's latest checkpoint from another source (the stream, or a saved file)."""

    chain: str
    seq: int  # the checkpoint event's own seq
    hash: str  # the checkpoint event's hash
    head: str  # the hash it signs: that of seq - 1
    key_id: str
    ts: str

    def __str__(self) -> str:
        return f"checkpoint seq {self.seq} of chain {self.chain} ({self.ts}, key {self.key_id})"


def references(events: Iterable[Any], keys: AuditKeys) -> tuple[dict[str, Reference], list[str]]:
    """Each chain's latest valid checkpoint among `events`, and one line per checkpoint that was refused."""
    latest: dict[str, Reference] = {}
    refused: list[str] = []
    for event in events:
        if not isinstance(event, dict) or event.get("phase") != CHECKPOINT_PHASE:
            continue
        problem = keys.check(event)
        chain, seq = event.get("chain"), event.get("seq")
        if problem is None:
            try:
                problem = (
                    None if event_hash(event) == event.get("hash") else "its content does not match its hash"
                )
            except (TypeError, ValueError):
                problem = "it cannot be hashed"
        if problem is not None:
            refused.append(f"checkpoint seq {seq} of chain {chain} ignored: {problem}")
            continue
        assert isinstance(chain, str) and isinstance(seq, int)
        if chain not in latest or seq > latest[chain].seq:
            extra = event["extra"]
            latest[chain] = Reference(
                chain, seq, str(event["hash"]), extra["head"], extra["key_id"], str(event.get("ts"))
            )
    return latest, refused


class InputCheck:
    """A ChainVerifier that checks checkpoint signatures and remembers the hashes at given positions."""

    def __init__(self, keys: AuditKeys, wanted: Iterable[tuple[str, int]] = ()) -> None:
        self.verifier = ChainVerifier(checkpoints=keys.check)
        self.wanted = set(wanted)
        self.seen: dict[tuple[str, int], str] = {}
        self.first_ts: str | None = None

    def add(self, event: Any) -> None:
        self.verifier.add(event)
        if isinstance(event, dict):
            ts = event.get("ts")
            if isinstance(ts, str) and (self.first_ts is None or ts < self.first_ts):
                self.first_ts = ts
            position = (event.get("chain"), event.get("seq"))
            if position in self.wanted and isinstance(event.get("hash"), str):
                self.seen[position] = event["hash"]

    @property
    def report(self) -> VerifyReport:
        return self.verifier.report


def wanted_positions(refs: Mapping[str, Reference]) -> set[tuple[str, int]]:
    """The positions `compare_with_references` needs the hashes of."""
    return {(r.chain, r.seq) for r in refs.values()} | {(r.chain, r.seq - 1) for r in refs.values()}


def compare_with_references(
    check: InputCheck, refs: Mapping[str, Reference], what: str
) -> VerifyFailure | None:
    """The first way the verified input disagrees with `refs` (checkpoints from elsewhere), or None.

    - a chain that ends before its reference checkpoint: its tail was cut;
    - a chain whose event at a checkpoint's position has another hash: a checkpoint that does not
      match its chain (the input was rewritten, or the checkpoint belongs to another history);
    - a chain missing from the input while the input covers the time of its checkpoint.
    """
    report = check.report
    for chain in sorted(refs):
        ref = refs[chain]
        head = report.heads.get(chain)
        if head is None:
            if check.first_ts is not None and check.first_ts <= ref.ts:
                return VerifyFailure(
                    report.events, chain, ref.seq, "chain missing",
                    f"{what} has no event of chain {chain}, but {ref} was written while it covers",
                )  # fmt: skip
            continue
        last_seq = head[0]
        if last_seq < ref.seq:
            return VerifyFailure(
                report.events, chain, last_seq, "cut at the end",
                f"{what} ends at seq {last_seq} of chain {chain}, before {ref}: "
                f"{ref.seq - last_seq} event(s) of this chain are missing from the end",
            )  # fmt: skip
        for seq, expected, label in (
            (ref.seq, ref.hash, "the checkpoint itself"),
            (ref.seq - 1, ref.head, "the head it signs"),
        ):
            found = check.seen.get((chain, seq))
            if found is not None and found != expected:
                return VerifyFailure(
                    report.events, chain, seq, "checkpoint mismatch",
                    f"{ref} does not match {what}: {label}, seq {seq}, has hash {expected[:16]}… "
                    f"there but {found[:16]}… here",
                )  # fmt: skip
    return None


def unsigned_tails(report: VerifyReport) -> dict[str, int]:
    """Per chain, how many of its events read come after its last signed checkpoint (all, without one)."""
    tails = {}
    for chain, (last, _) in report.heads.items():
        start = report.starts.get(chain, 1)
        checkpoint = report.checkpoints.get(chain)
        tails[chain] = last - checkpoint[0] if checkpoint else last - start + 1
    return tails
