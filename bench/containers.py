"""Pack containers: image sizes, cold start (create → healthy) and idle memory, for N Packs in one run.

    python bench/containers.py [--packs 20] [--prefix rumi]

Needs root and a Docker engine (bash scripts/ensure-docker.sh). Builds (or reuses) the images, starts
N copies of the example Pack with `rumi up` in a temporary workspace, samples memory after the Packs
have idled, then `rumi down`. Compare with the seed: base ~60 MB, ~20-30 MB per container, 20 Packs ~560 MB.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from broker.admin.init import init_workspace
from broker.containers.engine import DockerRuntime
from broker.core.docker_client import docker_client
from broker.containers.images import image_sizes
from broker.containers.packimage import pack_layer_size
from broker.core.workspace import Workspace

MB = 1_000_000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packs", type=int, default=20)
    ap.add_argument("--prefix", default="rumi")
    ap.add_argument("--idle", type=float, default=10.0, help="seconds to idle before sampling memory")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="rumi-bench-") as tmp:
        ws = Workspace.at(Path(tmp) / "ws")
        init_workspace(ws)
        ids = ["default"] + [f"bench{i:02d}" for i in range(1, a.packs)]
        for pid in ids[1:]:
            dst = ws.pack_source(pid)
            shutil.copytree(ws.pack_source("default"), dst)
            (dst / "pack.json").write_text(f'{{"id": "{pid}", "version": "0.1.0"}}')
        cfg = ws.config_file.read_text().replace('"nats_port": 4222', '"nats_port": 14299')
        ws.config_file.write_text(cfg)
        runtime = DockerRuntime(ws, prefix=a.prefix, progress=lambda m: None)
        t0 = time.perf_counter()
        report = runtime.up(ids, build=True)
        up_s = time.perf_counter() - t0
        try:
            time.sleep(a.idle)
            stats = runtime.stats()
            client = docker_client()
            sizes = image_sizes(client, a.prefix)
            layer = pack_layer_size(client, "default", a.prefix)
        finally:
            runtime.down()
            # The bench's own Pack images (the copies); the shared images stay for reuse.
            for pid in ids[1:]:
                docker_client().images.remove(f"{a.prefix}-pack-{pid}:latest", noprune=False)
    starts = [p.seconds_to_healthy for p in report.packs]
    packs = [s for s in stats if s.role == "pack"]
    mem = [s.memory_bytes / MB for s in packs]
    nats = [s.memory_bytes / MB for s in stats if s.role == "nats"]
    print("\nimages: " + ", ".join(f"{k} {v / MB:.1f} MB" for k, v in sizes.items()))
    print(f"per-Pack layer (default, with requests): {layer / MB:.3f} MB")
    print(f"rumi up of {len(ids)} Packs (images present): {up_s:.1f} s")
    print(f"cold start create→healthy: p50 {statistics.median(starts):.2f} s, max {max(starts):.2f} s")
    print(f"idle memory per Pack container: p50 {statistics.median(mem):.1f} MB, max {max(mem):.1f} MB")
    print(f"total for {len(packs)} Packs: {sum(mem):.0f} MB (+ NATS {sum(nats):.1f} MB)")


if __name__ == "__main__":
    main()
