"""Small Packs built and run under a fresh image prefix, for the Docker tests that need a live Pack."""

from __future__ import annotations

import contextlib
import json
import secrets
from collections.abc import Iterator
from typing import Any

import pytest

from broker.core.workspace import Workspace


@contextlib.contextmanager
def small_packs(
    tmp_path_factory: pytest.TempPathFactory,
    tag: str,
    packs: dict[str, str],
    *,
    config: dict[str, Any] | None = None,
    up: dict[str, Any] | None = None,
    **runtime: Any,
) -> Iterator[Any]:
    """A workspace with `packs` (id → main.py source), NATS and their images built under the prefix
    `rumi-<tag><random>`; with `up`, the Packs are started (`DockerRuntime.up(..., **up)`). Yields the
    `DockerRuntime` (`runtime` are its keyword arguments); everything is removed afterwards, also on failure.
    """
    from broker.admin.init import init_workspace
    from broker.containers import images as _images
    from broker.containers.engine import DockerRuntime
    from broker.containers.packimage import build_pack_image
    from broker.core.net import free_port

    from .test_runtime import _engine

    client = _engine()
    prefix = f"rumi-{tag}{secrets.token_hex(4)}"
    ws = Workspace.at(tmp_path_factory.mktemp(tag) / "ws")
    init_workspace(ws)
    settings = json.loads(ws.config_file.read_text())
    settings["nats_port"] = free_port()
    settings.update(config or {})
    ws.config_file.write_text(json.dumps(settings))
    for pack_id, main in packs.items():
        src = ws.pack_source(pack_id)
        src.mkdir(parents=True)
        (src / "pack.json").write_text(json.dumps({"id": pack_id, "version": "0.1.0"}))
        (src / "main.py").write_text(main)
    rt = DockerRuntime(ws, client, prefix=prefix, **runtime)
    try:
        _images.build_nats_image(client, prefix)
        for pack_id in packs:
            build_pack_image(client, ws, pack_id, prefix=prefix)
        if up is not None:
            rt.up(list(packs), build=False, **up)
        yield rt
    finally:
        try:
            rt.down()
        finally:
            _images.remove_images(client, prefix)
            client.close()
