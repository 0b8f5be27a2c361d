#!/usr/bin/env python3
"""Seed compatibility: write docker/packs/<id>/Dockerfile (with its build context) and docker/docker-compose.yml.

    python create_dockerfile.py [--root R] [--prefix P] [PACK...]

The same generators as `rumi compose` (broker/containers/packimage.py, broker/containers/compose.py); build the images with
`rumi build` (or `docker-compose -f docker/docker-compose.yml build` once the base images exist). It also sets
`nats_url` in docker/config.json to the NATS the Compose file publishes, so that after
`docker-compose -f docker/docker-compose.yml up -d`, `rumi broker` serves the Packs and `rumi call` reaches them.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    """Parse the seed's arguments, write the files, print one line per file or one error line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("packs", nargs="*", metavar="PACK", help="Packs under ecosystem/ (default: all)")
    parser.add_argument("--root", default=os.environ.get("RUMI_ROOT"), help="workspace root (default: cwd)")
    parser.add_argument("--prefix", default="rumi", help="image name prefix (default: rumi)")
    args = parser.parse_args(argv)

    from broker.containers.compose import write_compose
    from broker.core.errors import RumiError
    from broker.core.workspace import Workspace

    ws = Workspace.at(args.root)
    try:
        target = write_compose(ws, args.packs or None, prefix=args.prefix, progress=lambda m: print(f"  {m}"))
    except (RumiError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for pack_id in args.packs or ws.pack_ids():
        print(f"wrote {ws.packs / pack_id / 'Dockerfile'}")
    print(f"wrote {target}")
    compose = "docker-compose -f docker/docker-compose.yml"
    build = "rumi build" if args.prefix == "rumi" else f"rumi build --prefix {args.prefix}"
    print(f"next: `{build}` (once), `{compose} build`, `{compose} up -d`, then `rumi broker`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
