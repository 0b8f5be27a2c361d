"""One broker worker process: `python -m broker.service.worker ROOT INDEX COUNT` (started by `rumi broker --workers`)."""

from __future__ import annotations

import logging
import sys

import anyio

from broker.core.workspace import Workspace
from broker.service.broker import serve_worker


def main(argv: list[str]) -> int:
    """Serve worker INDEX of COUNT for the workspace at ROOT until SIGTERM."""
    if len(argv) != 3 or not argv[1].isdigit() or not argv[2].isdigit():
        print("usage: python -m broker.service.worker ROOT INDEX COUNT", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    anyio.run(serve_worker, Workspace.at(argv[0]), int(argv[1]), int(argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
