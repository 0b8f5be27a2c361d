"""One broker worker process: `python -m broker.service.worker ROOT INDEX COUNT [METRICS]`.

Started by `rumi broker --workers`; METRICS is this worker's own `/metrics` address (HOST:PORT).
"""

from __future__ import annotations

import logging
import sys

import anyio

from broker.core.workspace import Workspace
from broker.service.broker import serve_worker
from broker.service.metrics import parse_listen

USAGE = "usage: python -m broker.service.worker ROOT INDEX COUNT [METRICS_HOST:PORT]"


def main(argv: list[str]) -> int:
    """Serve worker INDEX of COUNT for the workspace at ROOT until SIGTERM."""
    if len(argv) not in (3, 4) or not argv[1].isdigit() or not argv[2].isdigit():
        print(USAGE, file=sys.stderr)
        return 2
    try:
        metrics = parse_listen(argv[3]) if len(argv) == 4 else None
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    anyio.run(serve_worker, Workspace.at(argv[0]), int(argv[1]), int(argv[2]), metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
