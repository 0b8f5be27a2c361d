"""Images built with no registry: rumi-nats, the Python base, rumi-base, rumi-sandbox.

The Docker tests build every image under a fresh prefix (``rumi-ci<random>``), check what each image
must do, and remove every image carrying that prefix's label afterwards. Without an engine they skip,
except under CI (``CI=true``) where that is a failure: run ``scripts/ensure-docker.sh`` first.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

from broker.containers import images
from broker.core.labels import LABEL_FLAVOR, LABEL_LIBC, LABEL_PREFIX

from .conftest import docker_engine, say

MB = 1_000_000


# ------------------------------------------------------------------------------ no engine needed


def test_read_elf_tells_static_from_dynamic() -> None:
    nats = images.find_nats_server_binary()
    elf = images._read_elf(nats)
    assert elf is not None and elf.interpreter is None, "nats-server must be a static ELF, not a shim"
    python = images._read_elf(Path(os.path.realpath(sys.executable)))
    assert python is not None and python.interpreter is not None
    assert images._read_elf(Path(__file__)) is None


def test_find_nats_server_binary_is_not_the_shim() -> None:
    path = images.find_nats_server_binary()
    assert path.read_bytes()[:4] == b"\x7fELF"
    shim = shutil.which("nats-server")
    if shim is not None and Path(shim).read_bytes()[:2] == b"#!":
        assert path != Path(shim)


@pytest.mark.parametrize(
    ("libc", "first", "contains"),
    [
        ("glibc 2.36", "manylinux_2_36_x86_64", "manylinux2014_x86_64"),
        ("glibc 2.17", "manylinux_2_17_x86_64", "manylinux1_x86_64"),
        ("musl", "musllinux_1_2_x86_64", "musllinux_1_1_x86_64"),
    ],
)
def test_wheel_platforms(libc: str, first: str, contains: str) -> None:
    platforms = images._wheel_platforms(libc, "x86_64")
    assert platforms[0] == first and contains in platforms


@pytest.mark.parametrize(
    ("kind", "prefix", "expected"),
    [
        ("python", "rumi", "rumi-python:3.11"),
        ("nats", "rumi", "rumi-nats:latest"),
        ("sandbox", "rumi-ci1a2b", "rumi-ci1a2b-sandbox:latest"),
        ("base", "x", "x-base:latest"),
    ],
)
def test_image_tag(kind: str, prefix: str, expected: str) -> None:
    assert images.image_tag(kind, prefix) == expected


@pytest.mark.parametrize(
    ("kind", "prefix"), [("pack", "rumi"), ("base", "Rumi"), ("base", ""), ("base", "a/b")]
)
def test_image_tag_refuses_bad_names(kind: str, prefix: str) -> None:
    with pytest.raises(ValueError):
        images.image_tag(kind, prefix)


def test_write_tar_keeps_links_and_owners(tmp_path: Path) -> None:
    import tarfile

    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "home/rumi").mkdir(parents=True)
    (root / "usr/bin/a").write_bytes(b"x" * 100_000)
    os.link(root / "usr/bin/a", root / "usr/bin/b")
    (root / "bin").symlink_to("usr/bin")
    out = tmp_path / "out.tar"
    images._write_tar(root, out, owners={"home/rumi": 10001}, skip={"usr/bin/zzz"})
    with tarfile.open(out) as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["bin"].issym() and members["bin"].linkname == "usr/bin"
    assert members["usr/bin/a"].isreg() and members["usr/bin/b"].islnk()
    assert members["home/rumi"].uid == 10001 and members["usr/bin/a"].uid == 0
    assert list(members).index("usr") < list(members).index("usr/bin/a")


# ----------------------------------------------------------------------------------- engine


_engine = docker_engine

@dataclass
class Built:
    client: Any
    prefix: str
    tags: dict[str, str]
    seconds: dict[str, float] = field(default_factory=dict)


_say = say

@pytest.fixture(scope="module")
def built(pytestconfig: pytest.Config) -> Iterator[Built]:
    client = _engine()
    prefix = f"rumi-ci{secrets.token_hex(4)}"
    lines: list[str] = []
    result = Built(client, prefix, {})
    try:
        for kind, build in (
            ("nats", images.build_nats_image),
            ("python", images.build_python_base),
            ("base", images.build_base_image),
            ("sandbox", images.build_sandbox_image),
        ):
            started = time.monotonic()
            result.tags[kind] = build(client, prefix, lines.append)
            result.seconds[kind] = time.monotonic() - started
        sizes = images.image_sizes(client, prefix)
        _say(
            pytestconfig,
            "\nimages under "
            + prefix
            + ": "
            + ", ".join(
                f"{k} {sizes[k] / MB:.1f} MB in {result.seconds[k]:.1f}s" for k in images.IMAGE_KINDS
            ),
        )
        yield result
    except Exception:
        _say(pytestconfig, "\n".join(lines[-40:]))
        raise
    finally:
        removed = images.remove_images(client, prefix)
        left = client.images.list(all=True, filters={"label": f"{LABEL_PREFIX}={prefix}"})
        client.close()
        assert not left, f"{len(left)} images with prefix {prefix} left after removing {removed}"


def _run(client: Any, image: str, argv: list[str], **kwargs: Any) -> tuple[int, str]:
    """Run argv to completion in a locked-down container; return (exit code, output)."""
    options: dict[str, Any] = {
        "network_mode": "none",
        "read_only": True,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "tmpfs": {"/tmp": "rw,size=16m"},
    }
    options.update(kwargs)
    container = client.containers.run(image, argv, detach=True, **options)
    try:
        status = container.wait(timeout=120)
        return int(status["StatusCode"]), container.logs().decode()
    finally:
        container.remove(force=True)


@pytest.mark.docker
def test_python_base_is_small(built: Built, pytestconfig: pytest.Config) -> None:
    size = images.image_sizes(built.client, built.prefix)["python"]
    _say(pytestconfig, f"\npython base {size / MB:.1f} MB")
    assert size <= 60 * MB


@pytest.mark.docker
def test_python_base_runs_ssl_asyncio_as_non_root(built: Built) -> None:
    code = (
        "import asyncio, json, os, sqlite3, ssl, zlib\n"
        "ctx = ssl.create_default_context()\n"
        "assert ctx.cert_store_stats()['x509_ca'] > 100, ctx.cert_store_stats()\n"
        "print(json.dumps({'uid': os.getuid(), 'gid': os.getgid(),\n"
        "                  'async': asyncio.run(asyncio.sleep(0, 7)),\n"
        "                  'openssl': ssl.OPENSSL_VERSION, 'sqlite': sqlite3.sqlite_version}))\n"
    )
    status, out = _run(built.client, built.tags["python"], ["python3", "-c", code])
    assert status == 0, out
    info = json.loads(out.strip().splitlines()[-1])
    assert info["uid"] == 10001 and info["gid"] == 10001 and info["async"] == 7
    assert info["openssl"].startswith("OpenSSL 3")


@pytest.mark.docker
def test_python_base_has_the_cxx_runtime_manylinux_wheels_need(built: Built) -> None:
    """libstdc++ and libgomp are in the image, loadable, and listed in its libraries label (base inherits it)."""
    wanted = ["libstdc++.so.6", "libgomp.so.1", "libgcc_s.so.1", "libz.so.1", "libc.so.6", "libm.so.6"]
    label = images.image_libraries(built.client, built.tags["python"])
    assert set(wanted) <= label, sorted(label)
    assert images.image_libraries(built.client, built.tags["base"]) == label
    code = "import ctypes, sys\nfor name in sys.argv[1:]:\n    ctypes.CDLL(name)\nprint('loaded', len(sys.argv) - 1)\n"
    status, out = _run(built.client, built.tags["python"], ["python3", "-c", code, *wanted])
    assert status == 0 and out.strip() == f"loaded {len(wanted)}", out
    # Nothing else from the gcc packages: no gdb pretty-printers.
    status, out = _run(built.client, built.tags["python"], ["python3", "-c", "import os; print(os.path.exists('/usr/share/gcc'))"])
    assert status == 0 and out.strip() == "False", out


@pytest.mark.docker
def test_python_base_has_no_shell_and_compiled_stdlib(built: Built) -> None:
    status, out = _run(
        built.client,
        built.tags["python"],
        ["python3", "-v", "-c", "import os, json; print(os.path.exists('/bin/sh'))"],
    )
    assert status == 0, out
    assert "False" in out.splitlines()
    assert "json/__pycache__/__init__.cpython-311.pyc matches" in out


@pytest.mark.docker
def test_base_image_has_runtime_deps_without_aiohttp(built: Built) -> None:
    code = (
        "import importlib.util, os, msgspec, nats, nkeys, nacl.signing\n"
        "assert importlib.util.find_spec('aiohttp') is None\n"
        "from pack_runtime import Pack, PermissionDenied, BrokerError\n"
        "import sys\n"
        "assert 'aiohttp' not in sys.modules\n"
        "print(os.getuid(), 'sdk-ok')\n"
    )
    status, out = _run(built.client, built.tags["base"], ["python3", "-c", code])
    assert status == 0, out
    uid, sdk = out.split()[-2:]
    assert uid == "10001"
    assert sdk == "sdk-ok"


@pytest.mark.docker
def test_sandbox_has_git_curl_tar_find(built: Built) -> None:
    script = (
        "set -e; id -u; git --version; curl --version | head -n1; tar --version | head -n1; "
        "find --version | head -n1; cd /tmp && git init -q r && cd r && echo x > f && "
        "git -c user.name=t -c user.email=t@t add f && "
        "git -c user.name=t -c user.email=t@t commit -qm m && git log --format=%s && tar czf /tmp/a.tgz f"
    )
    status, out = _run(built.client, built.tags["sandbox"], ["bash", "-c", script])
    assert status == 0, out
    lines = out.splitlines()
    assert lines[0] == "10001"
    assert any(ln.startswith("git version") for ln in lines)
    assert any(ln.startswith("curl ") for ln in lines)
    assert any("GNU tar" in ln for ln in lines) and any("findutils" in ln for ln in lines)
    assert lines[-1] == "m"


@pytest.mark.docker
def test_nats_image_serves_jetstream_on_loopback_as_nobody(built: Built, tmp_path: Path) -> None:
    import nats

    conf_dir = tmp_path / "conf"
    data_dir = tmp_path / "data"
    conf_dir.mkdir()
    data_dir.mkdir()
    (conf_dir / "nats.conf").write_text('port: 4222\njetstream { store_dir: "/data" }\n')
    os.chmod(conf_dir / "nats.conf", 0o644)
    if os.geteuid() == 0:
        os.chown(data_dir, 65534, 65534)
    else:
        os.chmod(data_dir, 0o777)
    image = built.client.images.get(built.tags["nats"])
    assert image.attrs["Config"]["User"] == "65534:65534"
    container = built.client.containers.run(
        built.tags["nats"],
        detach=True,
        read_only=True,
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        ports={"4222/tcp": ("127.0.0.1", None)},
        volumes={
            str(conf_dir): {"bind": "/etc/nats", "mode": "ro"},
            str(data_dir): {"bind": "/data", "mode": "rw"},
        },
    )
    try:
        deadline = time.monotonic() + 30
        port = None
        while time.monotonic() < deadline:
            container.reload()
            bindings = (container.ports or {}).get("4222/tcp")
            if bindings and "Server is ready" in container.logs().decode():
                port = int(bindings[0]["HostPort"])
                assert bindings[0]["HostIp"] == "127.0.0.1"
                break
            assert container.status in ("created", "running"), container.logs().decode()
            time.sleep(0.2)
        assert port is not None, container.logs().decode()

        async def talk() -> tuple[bytes, int]:
            nc = await nats.connect(f"nats://127.0.0.1:{port}", connect_timeout=5, max_reconnect_attempts=0)
            try:
                js = nc.jetstream()
                await js.add_stream(name="T", subjects=["t.>"])
                ack = await js.publish("t.x", b"hello")
                sub = await nc.subscribe("echo")
                await nc.publish("echo", b"ping")
                msg = await sub.next_msg(timeout=5)
                return msg.data, ack.seq
            finally:
                await nc.close()

        data, seq = anyio.run(talk)
        assert data == b"ping" and seq == 1
        assert any(data_dir.rglob("*")), "JetStream wrote nothing into its mounted directory"
    finally:
        container.remove(force=True)


@pytest.mark.docker
def test_second_build_reuses_images(built: Built) -> None:
    before = {k: built.client.images.get(t).id for k, t in built.tags.items()}
    messages: list[str] = []
    started = time.monotonic()
    for build in (
        images.build_nats_image,
        images.build_python_base,
        images.build_base_image,
        images.build_sandbox_image,
    ):
        build(built.client, built.prefix, messages.append)
    warm = time.monotonic() - started
    after = {k: built.client.images.get(t).id for k, t in built.tags.items()}
    assert after == before
    assert not any("docker build" in m for m in messages), messages
    assert warm < 60, f"warm check took {warm:.1f}s"


@pytest.mark.docker
def test_failed_pull_falls_back_to_debian_python(built: Built) -> None:
    """allow_pull with an unreachable registry (a closed loopback port) keeps the Debian-made base."""
    messages: list[str] = []
    before = built.client.images.get(built.tags["python"]).id
    tag = images.build_python_base(
        built.client, built.prefix, messages.append, True, seed_image="127.0.0.1:9/rumi-absent:3.11"
    )
    assert tag == built.tags["python"] and built.client.images.get(tag).id == before
    assert any("cannot pull" in m for m in messages), messages


@pytest.mark.docker
def test_seed_python_image_is_used_when_present(built: Built) -> None:
    """A local python:3.11-alpine stand-in (the Debian base under another name) is taken as the base."""
    client = built.client
    prefix = f"{built.prefix}s"
    seed = f"{prefix}-seed:3.11"
    # The stand-in carries the test prefix label so the cleanup below finds it.
    client.images.get(built.tags["python"]).tag(f"{prefix}-seed", "3.11")
    try:
        tag = images.build_python_base(client, prefix, None, seed_image=seed)
        labels = client.images.get(tag).labels
        assert labels[LABEL_FLAVOR] == "seed" and labels[LABEL_LIBC].startswith("glibc 2.")
        # The seed's libraries come from a run of its Python: the same as the list made from the Debian rootfs.
        assert labels[images.LABEL_LIBRARIES] == client.images.get(built.tags["python"]).labels[images.LABEL_LIBRARIES]
        assert "libstdc++.so.6" in images._probe_image(client, seed)[1]
        base = images.build_base_image(client, prefix, None, seed_image=seed)
        status, out = _run(
            client, base, ["python3", "-c", "import nats, msgspec, nkeys, os; print(os.getuid())"]
        )
        assert status == 0 and out.strip() == "10001", out
        # On a seed base the sandbox is a Debian root of its own (FROM scratch).
        sandbox = images.build_sandbox_image(client, prefix, None)
        status, out = _run(client, sandbox, ["bash", "-c", "git --version && python3 -c 'print(7)'"])
        assert status == 0 and out.strip().endswith("7"), out
    finally:
        images.remove_images(client, prefix)
        try:
            client.images.remove(seed)  # only untags: the image is the main prefix's python base
        except Exception:
            pass
