"""The broker's own log file for `rumi logs --broker`: its last lines, then new ones as they come."""

from __future__ import annotations

import time
from collections.abc import Iterator

from broker.core.errors import Missing
from broker.core.workspace import Workspace


def broker_log(ws: Workspace, *, follow: bool, tail: int | None) -> Iterator[bytes]:
    """The log (only its last `tail` lines when given), then, with `follow`, what is appended to it.

    Raises Missing when there is no log (the first chunk is read when iteration starts). A rotated
    log is read again from its start.
    """
    from broker.containers.engine import broker_log_file

    path = broker_log_file(ws)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise Missing(f"no broker log at {path}: `rumi up` starts the broker") from None
    if tail is not None:
        data = b"".join(data.splitlines(keepends=True)[-tail:]) if tail else b""
    yield data
    if not follow:
        return
    offset = path.stat().st_size
    while True:
        time.sleep(0.5)
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < offset:
                offset = 0  # rotated
            f.seek(offset)
            chunk = f.read()
        offset += len(chunk)
        yield chunk
