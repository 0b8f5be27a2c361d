"""The protected-path check per request, before (re-stat everything, walk to "/") and after (index), in one run.

    python bench/protected.py [--packs 20] [--n 2000] [--rounds 7] [--threads 32] [--root DIR]

Builds a realistic workspace (20 Packs with work areas, sources and Dockerfiles; NATS creds per
Pack and for the broker; a JetStream-like store; 40 grant files; handlers and scopes), then reads a
1 KiB file with `read_beneath` from Pack p01's grant on its own work area, through:

- `none`: an empty ProtectedSet (what the rest of read_beneath costs, for reference);
- `old`:  the check as it was at commit 07829a4 (a frozen copy below): every check lists and stats
          every protected path again and walks ".." from the file's directory up to "/";
- `new`:  broker.core.protected: a watcher-kept index (a thread calls `refresh()` every 0.2 s, as
          GrantStore.watch does), three stats of the directories holding the protected paths, a walk
          only up to the grant root, and the root's ancestor chain from a cache.

It reports microseconds per call of the whole read and of the check alone (`check_fd` on an already
resolved file, as `read_beneath` calls it), single-threaded (median of rounds) and with --threads
threads reading at once (wall time / requests), plus the index's size and the cost of one refresh.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import stat
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Generator, Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker.backends.files import read_beneath, write_beneath
from broker.core.context import HandlerContext, Limits
from broker.core.errors import Denied
from broker.core.protected import FileIdentity, ProtectedIndex, ProtectedSet, file_identity
from broker.core.workspace import Workspace

# --- the check before this change: a frozen copy of broker/core/protected.py at 07829a4 -------------------

_MAX_DEPTH = 4096


class OldProtectedSet:
    """ProtectedSet as of 07829a4 (check_fd / check_entry only); `root_fd` is accepted and ignored."""

    def __init__(
        self,
        paths: Iterable[str | os.PathLike[str]] = (),
        *,
        source: Callable[[], Iterable[str | os.PathLike[str]]] | None = None,
    ) -> None:
        self._fixed = tuple(Path(os.path.abspath(p)) for p in paths)
        self._source = source

    @classmethod
    def for_pack(cls, ws: Workspace, pack_id: str | None) -> OldProtectedSet:
        return cls((), source=lambda: ws.protected_paths(pack_id))

    def _path_strings(self) -> list[str]:
        listed = [os.fspath(p) for p in self._fixed]
        if self._source is not None:
            listed.extend(os.path.abspath(p) for p in self._source())
        return listed

    def _snapshot(self) -> tuple[set[FileIdentity], set[tuple[FileIdentity, str]]]:
        ids: set[FileIdentity] = set()
        entries: set[tuple[FileIdentity, str]] = set()
        parents: dict[str, FileIdentity | None] = {}
        for path in self._path_strings():
            for follow in (True, False):
                try:
                    ids.add(file_identity(os.stat(path, follow_symlinks=follow)))
                except OSError:
                    pass
            parent, name = os.path.split(path)
            if parent not in parents:
                try:
                    parents[parent] = file_identity(os.stat(parent))
                except OSError:
                    parents[parent] = None
            parent_id = parents[parent]
            if parent_id is not None:
                entries.add((parent_id, name))
        return ids, entries

    def check_fd(
        self,
        fd: int,
        stop_at: FileIdentity | None = None,
        *,
        parent_fd: int | None = None,
        name: str | None = None,
        root_fd: int | None = None,
    ) -> None:
        ids, entries = self._snapshot()
        st = os.fstat(fd)
        if file_identity(st) in ids:
            raise Denied("path is protected")
        start = parent_fd
        if start is None:
            if not stat.S_ISDIR(st.st_mode):
                raise Denied("cannot check a file without its directory")
            start = fd
        elif name is not None and (file_identity(os.fstat(start)), name) in entries:
            raise Denied("path is protected")
        self._walk_up(start, stop_at, ids)

    def check_entry(
        self, parent_fd: int, name: str, stop_at: FileIdentity | None = None, *, root_fd: int | None = None
    ) -> None:
        ids, entries = self._snapshot()
        if (file_identity(os.fstat(parent_fd)), name) in entries:
            raise Denied("path is protected")
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            pass
        else:
            if file_identity(st) in ids:
                raise Denied("path is protected")
        self._walk_up(parent_fd, stop_at, ids)

    @staticmethod
    def _walk_up(dir_fd: int, stop_at: FileIdentity | None, ids: set[FileIdentity]) -> None:
        with contextlib.closing(_ancestors(dir_fd)) as walk:
            for ident in walk:
                if ident in ids:
                    raise Denied("path is protected")
                if ident == stop_at:
                    return


def _ancestors(dir_fd: int) -> Generator[FileIdentity, None, None]:
    cur = os.dup(dir_fd)
    try:
        prev: FileIdentity | None = None
        for _ in range(_MAX_DEPTH):
            ident = file_identity(os.fstat(cur))
            if ident == prev:
                return
            yield ident
            prev = ident
            parent = os.open("..", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=cur)
            os.close(cur)
            cur = parent
        raise Denied("directory tree is too deep")
    finally:
        os.close(cur)


# --- the workspace ----------------------------------------------------------------------------------


def build_workspace(root: Path, packs: int) -> tuple[Workspace, list[str]]:
    ws = Workspace.at(root / "ws")
    ids = [f"p{i:02d}" for i in range(1, packs + 1)]
    for d in (ws.handlers, ws.scopes, ws.grants, ws.state / "creds", ws.base, ws.work_areas):
        d.mkdir(parents=True, exist_ok=True)
    ws.config_file.write_text('{"broker": {"grant_poll_interval": 0.2}}\n')
    (ws.docker / "docker-compose.yml").write_text("services: {}\n")
    (ws.base / "Dockerfile").write_text("FROM rumi-python:3.11\n")
    for cap in ("file_read", "file_write", "env_read", "terminal", "network"):
        (ws.handlers / f"{cap}.py").write_text(f'"""Handler {cap}."""\n')
        (ws.scopes / f"{cap}.json").write_text('{"version": "1.0", "description": "x"}\n')
    for who in ("broker", "admin", "audit", "cli"):
        (ws.state / "creds" / f"{who}.nk").write_text("SUAxxxxxxxx\n")
    (ws.state / "secrets.env").write_text("API_KEY=secret\n")
    (ws.state / "nats").mkdir()
    (ws.state / "nats" / "nats.conf").write_text("# generated\n")
    store = ws.state / "jetstream" / "RUMI" / "streams" / "RUMI_AUDIT"
    (store / "msgs").mkdir(parents=True)
    (store / "obs").mkdir()
    for i in range(1, 33):
        (store / "msgs" / f"{i}.blk").write_bytes(b"\0" * 64)
    (store / "meta.inf").write_text("{}")
    for pack in ids:
        (ws.state / "creds" / f"{pack}.nk").write_text("SUAxxxxxxxx\n")
        own = ws.state / "packcreds" / pack
        own.mkdir(parents=True)
        (own / f"{pack}.nk").write_text("SUAxxxxxxxx\n")
        src = ws.pack_source(pack)
        src.mkdir(parents=True)
        (src / "pack.json").write_text(f'{{"id": "{pack}", "version": "1"}}\n')
        (src / "main.py").write_text("print('hi')\n")
        (ws.packs / pack).mkdir(parents=True)
        (ws.packs / pack / "Dockerfile").write_text("FROM rumi-base\n")
        area = ws.pack_work_area(pack)
        (area / "data" / "a" / "b").mkdir(parents=True)
        for n in range(10):
            (area / f"note{n}.txt").write_text("x" * 100)
        for comp in ("tool:main", "tool:other"):
            cid = f"{pack}:{comp}"
            (ws.grants / f"{cid}.json").write_text(
                f'{{"component_id": "{cid}", "permissions": {{"file_read": {{"enabled": true, '
                f'"directories": ["{area}"]}}}}}}\n'
            )
    mine = ws.pack_work_area(ids[0])
    (mine / "input.bin").write_bytes(os.urandom(1024))
    (mine / "data" / "a" / "b" / "deep.bin").write_bytes(os.urandom(1024))
    return ws, ids


def context(grant: str, protected: object) -> HandlerContext:
    return HandlerContext(
        pack_id="p01",
        component_id="p01:tool:main",
        request_id="r",
        grant={"enabled": True, "directories": [grant]},
        limits=Limits(timeout=30),
        protected=protected,  # type: ignore[arg-type]
    )


# --- timing -----------------------------------------------------------------------------------------


def per_call_us(fn: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def threaded_us(fn: Callable[[], object], n: int, threads: int) -> float:
    """Wall time per call with `threads` threads calling `fn` n times in all."""
    each = max(1, n // threads)
    barrier = threading.Barrier(threads + 1)

    def worker() -> None:
        barrier.wait()
        for _ in range(each):
            fn()

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in pool:
        t.join()
    return (time.perf_counter() - start) / (each * threads) * 1e6


def reader(protected: object, grant: str, path: str) -> Callable[[], bytes]:
    """read_beneath of `path` under `grant`, through `protected`."""
    c = context(grant, protected)
    return lambda: read_beneath(c, path, 1 << 20)


def check_only(protected: object, root: str, rel_dir: str, name: str) -> Callable[[], None]:
    """`check_fd` exactly as read_beneath calls it, on fds opened once."""
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    parent = os.open(rel_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=root_fd)
    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    check = protected.check_fd  # type: ignore[attr-defined]

    def run() -> None:
        check(fd, parent_fd=parent, name=name, root_fd=root_fd)

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--packs", type=int, default=20)
    ap.add_argument("--n", type=int, default=2000, help="calls per round")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=32)
    ap.add_argument("--root", default=None, help="where to build the workspace (default: a temp dir)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="rumi-bench-", dir=args.root) as tmp:
        ws, ids = build_workspace(Path(tmp), args.packs)
        grant = str(ws.pack_work_area(ids[0]))
        n_protected = len(ws.protected_paths(None))
        index = ProtectedIndex.for_workspace(ws)
        start = time.perf_counter()
        index.current()
        first_build = time.perf_counter() - start
        sets: dict[str, object] = {
            "none": ProtectedSet(),
            "old": OldProtectedSet.for_pack(ws, ids[0]),
            "new": ProtectedSet.for_pack(ws, ids[0], index=index),
        }
        # Both implementations refuse the same things here.
        for label in ("old", "new"):
            for target in (ws.state / "creds" / "p02.nk", ws.pack_work_area(ids[1]) / "note0.txt"):
                try:
                    read_beneath(context(str(ws.root), sets[label]), str(target), 1 << 20)
                except Denied:
                    pass
                else:
                    raise SystemExit(f"{label}: {target} was served")
        os.link(ws.state / "creds" / "p02.nk", ws.pack_work_area(ids[0]) / "hl.nk")
        try:
            read_beneath(context(grant, sets["new"]), f"{grant}/hl.nk", 1 << 20)
            raise SystemExit("new: a hard link to a protected file was served")
        except Denied:
            pass
        (ws.pack_work_area(ids[0]) / "hl.nk").unlink()
        write_beneath(context(grant, sets["new"]), f"{grant}/out.txt", b"x", 100)

        # The broker's watcher: GrantStore.refresh -> index.refresh() every grant_poll_interval.
        stop = threading.Event()
        refresh_costs: list[float] = []

        def watcher() -> None:
            while not stop.wait(0.2):
                t = time.perf_counter()
                index.refresh()
                refresh_costs.append(time.perf_counter() - t)

        # Stamps younger than 2 s are never trusted (racy timestamps); a real workspace is older.
        time.sleep(2.1)
        watch = threading.Thread(target=watcher, daemon=True)
        watch.start()
        cases = {
            "read_beneath, 1 KiB file in the grant root": (f"{grant}/input.bin", ".", "input.bin"),
            "read_beneath, 1 KiB file 3 levels below it": (
                f"{grant}/data/a/b/deep.bin",
                "data/a/b",
                "deep.bin",
            ),
        }
        results: dict[tuple[str, str], float] = {}
        checks: dict[tuple[str, str], float] = {}
        for case, (path, rel_dir, name) in cases.items():
            reads = {k: reader(s, grant, path) for k, s in sets.items()}
            only = {k: check_only(s, grant, rel_dir, name) for k, s in sets.items() if k != "none"}
            samples: dict[str, list[float]] = {k: [] for k in reads}
            check_samples: dict[str, list[float]] = {k: [] for k in only}
            for _ in range(args.rounds):
                for k, fn in reads.items():
                    samples[k].append(per_call_us(fn, args.n))
                for k, fn in only.items():
                    check_samples[k].append(per_call_us(fn, args.n))
            for k in reads:
                results[(case, k)] = statistics.median(samples[k])
            for k in only:
                checks[(case, k)] = statistics.median(check_samples[k])
        first_case, (path, _, _) = next(iter(cases.items()))
        threaded = {k: threaded_us(reader(s, grant, path), args.n * 2, args.threads) for k, s in sets.items()}
        stop.set()
        watch.join()

    print(
        f"$ python bench/protected.py --packs {args.packs} --n {args.n} --rounds {args.rounds} "
        f"--threads {args.threads}"
    )
    print(
        f"workspace: {args.packs} Packs, {n_protected} protected paths; "
        f"index: {len(index)} identities, first build {first_build * 1e3:.2f} ms, "
        f"watcher refresh (no change) median {statistics.median(refresh_costs) * 1e6:.0f} us "
        f"over {len(refresh_costs)} ticks"
    )
    print()
    print(f"{'us per call (single thread, median of rounds)':<48} {'none':>8} {'old':>8} {'new':>8}")
    for case in cases:
        row = [results[(case, k)] for k in ("none", "old", "new")]
        print(f"{case:<48} {row[0]:>8.1f} {row[1]:>8.1f} {row[2]:>8.1f}")
    for case in cases:
        label = "  check_fd alone (" + ("root" if "root" in case else "3 below") + ")"
        print(f"{label:<48} {'':>8} {checks[(case, 'old')]:>8.1f} {checks[(case, 'new')]:>8.1f}")
    for case in cases:
        old_share = results[(case, "old")] - results[(case, "none")]
        new_share = results[(case, "new")] - results[(case, "none")]
        label = "  check's share (read - none, " + ("root" if "root" in case else "3 below") + ")"
        print(f"{label:<48} {'':>8} {old_share:>8.1f} {new_share:>8.1f}")
    print(
        f"{first_case + f', {args.threads} threads':<48} {threaded['none']:>8.1f} "
        f"{threaded['old']:>8.1f} {threaded['new']:>8.1f}   (wall time / reads)"
    )


if __name__ == "__main__":
    main()
