"""Share of a py-spy profile's event-loop samples by module, and what that is per request.

    py-spy record --pid <broker pid> --duration 12 --rate 200 --gil --format raw --output broker.raw
    python bench/profile_modules.py broker.raw [CPU_US_PER_REQUEST]

Record while `bench/pipeline.py` drives the broker (e.g. its `file_read` point at c=32: the broker is
`python -m broker.cli broker --root /tmp/rumi-bench-pipeline-*/ws`); `--gil` keeps only samples that
hold the GIL, i.e. Python work, not time blocked in a syscall. Each sample is counted under the module
of its innermost frame. With the broker CPU per request of the same point (the bench prints it), each
share is also given in microseconds per request.
"""

from __future__ import annotations

import sys
from collections import Counter

CATEGORIES = (
    (("asyncio/", "selectors.py"), "asyncio (event loop, tasks, futures, transports)"),
    (("anyio/",), "anyio"),
    (("nats/",), "nats-py"),
    (("broker/bus/wire",), "broker: its NATS client (broker/bus/wire.py)"),
    (("broker/audit",), "broker: audit"),
    (("broker/backends", "broker/core/protected"), "broker: file back-end + protected check"),
    (("broker/", "pack_runtime", "handlers/"), "broker: the rest"),
    (("json", "hashlib"), "json / hashing"),
)


def category(frame: str) -> str:
    for needles, name in CATEGORIES:
        if any(n in frame for n in needles):
            return name
    return "other"


def main() -> int:
    if len(sys.argv) not in (2, 3):
        print("usage: python bench/profile_modules.py PROFILE.raw [CPU_US_PER_REQUEST]", file=sys.stderr)
        return 2
    cpu = float(sys.argv[2]) if len(sys.argv) == 3 else 0.0
    counts: Counter[str] = Counter()
    total = 0
    with open(sys.argv[1]) as raw:
        for line in raw:
            stack, _, count = line.rstrip().rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = stack.split(";")
            if not any("_run_once" in f for f in frames):  # the event-loop thread only
                continue
            total += int(count)
            counts[category(frames[-1])] += int(count)
    if not total:
        print("no event-loop samples in this profile", file=sys.stderr)
        return 1
    print(f"{total} event-loop samples")
    for name, n in counts.most_common():
        extra = f"  ~{cpu * n / total:.0f} us/request" if cpu else ""
        print(f"{100 * n / total:5.1f} %  {name}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
