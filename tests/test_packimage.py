"""Pack images (``<prefix>-pack-<id>``) and ``rumi build``.

Without an engine the Docker tests skip, except under CI (``CI=true``) where that is a failure. The engine
tests build under a fresh prefix (``rumi-tp<random>``) and remove every image with that prefix's label.
The requirement tests download a tiny pure wheel (``six``) from the package index on the host; they skip
when the index cannot be reached.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from broker.admin.init import init_workspace
from broker.containers import images, packimage
from broker.containers.images import ImageBuildError
from broker.containers.settings import pack_uid
from broker.core.errors import WorkspaceError
from broker.core.labels import LABEL_HASH, LABEL_KIND, LABEL_PREFIX
from broker.core.workspace import Workspace
from tests._skip import skip_unless_ci

from .conftest import docker_engine, say

MB = 1_000_000


def _pack(ws: Workspace, pack_id: str, *, requirements: str | None = None, entry: str = "main.py",
          code: str = "print('hello')\n") -> Path:
    src = ws.ecosystem / pack_id
    src.mkdir(parents=True, exist_ok=True)
    (src / "pack.json").write_text(json.dumps({"id": pack_id, "version": "1.0.0", "entrypoint": entry}))
    (src / entry).parent.mkdir(parents=True, exist_ok=True)
    (src / entry).write_text(code)
    if requirements is not None:
        (src / "requirements.txt").write_text(requirements)
    return src


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    workspace = Workspace.at(tmp_path / "ws")
    init_workspace(workspace)
    return workspace


# ------------------------------------------------------------------------------ no engine needed


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("six==1.17.0\n", ["six==1.17.0"]),
        ("# comment\n\nsix>=1.16,<2  # trailing\n", ["six>=1.16,<2"]),
        ("requests[socks] ~= 2.31 ; python_version >= '3.8'", ["requests[socks] ~= 2.31 ; python_version >= '3.8'"]),
        ("attrs", ["attrs"]),
        ("six==1.17.0 --hash=sha256:" + "a" * 64, ["six==1.17.0 --hash=sha256:" + "a" * 64]),
    ],
)
def test_parse_requirements_accepts_plain_lines(text: str, expected: list[str]) -> None:
    assert packimage.parse_requirements(text) == expected


@pytest.mark.parametrize(
    "line",
    [
        "-r /etc/passwd",
        "-e .",
        "--index-url http://evil.example/simple",
        "--extra-index-url http://evil.example/simple",
        "-c constraints.txt",
        "--find-links /root",
        "pkg @ https://evil.example/pkg.whl",
        "git+https://evil.example/repo.git",
        "./local/dir",
        "/abs/path/pkg.whl",
        "file:///etc/passwd",
        "six==${HOME}",
        "six \\",
        "six==1.0 --install-option=--prefix=/",
        "six==1.0 --hash=md5:abc",
    ],
)
def test_parse_requirements_refuses_options_urls_paths(line: str) -> None:
    with pytest.raises(WorkspaceError, match=r"requirements.txt:1: "):
        packimage.parse_requirements(line + "\n")


@pytest.mark.parametrize(
    ("pack_id", "prefix", "expected"),
    [("default", "rumi", "rumi-pack-default:latest"), ("a-b_c", "rumi-ci1", "rumi-ci1-pack-a-b_c:latest")],
)
def test_pack_image_tag(pack_id: str, prefix: str, expected: str) -> None:
    assert packimage.pack_image_tag(pack_id, prefix) == expected


@pytest.mark.parametrize(("pack_id", "prefix"), [("Bad", "rumi"), ("a.b", "rumi"), ("ok", "Rumi"), ("ok", "a/b")])
def test_pack_image_tag_refuses_bad_names(pack_id: str, prefix: str) -> None:
    with pytest.raises((WorkspaceError, ValueError)):
        packimage.pack_image_tag(pack_id, prefix)


@pytest.mark.parametrize(
    ("entry", "base", "expect"),
    [
        ("main.py", "rumi-base:latest", ['FROM rumi-base:latest', 'CMD ["python3", "main.py"]',
                                         'io.rumi.prefix="rumi"']),
        ("src/app.py", "rumi-ci9-base:latest", ['FROM rumi-ci9-base:latest', 'CMD ["python3", "src/app.py"]',
                                                 'io.rumi.prefix="rumi-ci9"']),
        ("main.py", "registry.example/x/base:1", ["FROM registry.example/x/base:1"]),
    ],
)
def test_render_dockerfile(ws: Workspace, entry: str, base: str, expect: list[str]) -> None:
    _pack(ws, "demo", entry=entry)
    text = packimage.render_pack_dockerfile(ws, "demo", base)
    for needle in expect:
        assert needle in text
    assert f"WORKDIR {packimage.APP_DIR}" in text
    assert 'io.rumi.pack="demo"' in text and 'io.rumi.image="pack"' in text
    assert "COPY app/ /app/" in text and "COPY site/ /opt/pack/lib/python3.11/site-packages/" in text
    assert "PATH=/opt/pack/bin:" in text
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    # Exec form only: the base has no shell.
    for ln in lines:
        if ln.startswith(("RUN ", "CMD ", "ENTRYPOINT ")):
            assert ln.split(" ", 1)[1].startswith("["), ln
    # Non-root at the end; the code was copied as root (no --chown).
    assert [ln for ln in lines if ln.startswith("USER ")][-1] == "USER 10001:10001"
    assert "--chown" not in text


@pytest.mark.parametrize(
    ("manifest", "base", "message"),
    [
        ({"id": "demo", "version": "1.0", "entrypoint": "missing.py"}, "rumi-base:latest", "is not a file"),
        ({"id": "demo", "version": "1.0\nRUN evil", "entrypoint": "main.py"}, "rumi-base:latest", "version"),
        ({"id": "demo", "version": "1.0", "entrypoint": "../x.py"}, "rumi-base:latest", "entrypoint"),
        ({"id": "demo", "version": "1.0", "entrypoint": "a b.py"}, "rumi-base:latest", "entrypoint"),
        ({"id": "demo", "version": "1.0"}, "rumi-base:latest\nRUN evil", "not a valid image reference"),
        ({"id": "other", "version": "1.0"}, "rumi-base:latest", "does not match"),
    ],
)
def test_render_refuses_bad_input(ws: Workspace, manifest: dict[str, str], base: str, message: str) -> None:
    src = _pack(ws, "demo")
    (src / "pack.json").write_text(json.dumps(manifest))
    with pytest.raises(WorkspaceError, match=message):
        packimage.render_pack_dockerfile(ws, "demo", base)


def test_context_copies_links_as_links_and_normalises_modes(ws: Workspace, tmp_path: Path) -> None:
    secret = tmp_path / "host-secret.txt"
    secret.write_text("TOP SECRET")
    src = _pack(ws, "demo")
    (src / "leak").symlink_to(secret)
    (src / "linkdir").symlink_to(tmp_path)
    (src / "private.py").write_text("x = 1\n")
    os.chmod(src / "private.py", 0o600)
    (src / "tool.sh").write_text("#!/bin/sh\n")
    os.chmod(src / "tool.sh", 0o700)
    (src / "__pycache__").mkdir()
    (src / "__pycache__" / "main.cpython-311.pyc").write_bytes(b"junk")
    (src / ".git").mkdir()
    (src / ".git" / "config").write_text("[core]")
    dockerfile = packimage.write_pack_dockerfile(ws, "demo", "rumi-base:latest")
    app = dockerfile.parent / "app"
    assert (app / "leak").is_symlink() and os.readlink(app / "leak") == str(secret)
    assert (app / "linkdir").is_symlink()
    assert not any("TOP SECRET" in p.read_text(errors="replace") for p in app.rglob("*")
                   if p.is_file() and not p.is_symlink())
    assert (app / "private.py").stat().st_mode & 0o777 == 0o644
    assert (app / "tool.sh").stat().st_mode & 0o777 == 0o755
    assert not (app / "__pycache__").exists() and not (app / ".git").exists()
    assert (dockerfile.parent / "site").is_dir() and not any((dockerfile.parent / "site").iterdir())


def test_context_refuses_special_files(ws: Workspace) -> None:
    src = _pack(ws, "demo")
    os.mkfifo(src / "pipe")
    with pytest.raises(WorkspaceError, match="not a regular file"):
        packimage.write_pack_dockerfile(ws, "demo", "rumi-base:latest")


def test_context_is_rewritten_only_when_inputs_change(ws: Workspace) -> None:
    src = _pack(ws, "demo")
    dockerfile = packimage.write_pack_dockerfile(ws, "demo", "rumi-base:latest")
    first = dockerfile.parent.stat().st_ino
    assert packimage.write_pack_dockerfile(ws, "demo", "rumi-base:latest") == dockerfile
    assert dockerfile.parent.stat().st_ino == first
    (src / "main.py").write_text("print('changed')\n")
    packimage.write_pack_dockerfile(ws, "demo", "rumi-base:latest")
    assert dockerfile.parent.stat().st_ino != first
    assert (dockerfile.parent / "app" / "main.py").read_text() == "print('changed')\n"
    assert not [p for p in ws.packs.iterdir() if p.name.startswith(".")]


def test_sdist_only_requirement_is_refused_naming_it(ws: Workspace, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # An index holding only a source distribution (offline: a local find-links directory).
    links = tmp_path / "links"
    links.mkdir()
    data = b'[project]\nname = "onlysdist"\nversion = "1.0"\n'
    with tarfile.open(links / "onlysdist-1.0.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("onlysdist-1.0/pyproject.toml")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    _pack(ws, "demo", requirements="onlysdist==1.0\n")
    with pytest.raises(ImageBuildError) as info_:
        packimage.write_pack_dockerfile(ws, "demo", "rumi-base:latest", cache_dir=tmp_path / "cache")
    message = str(info_.value)
    assert "onlysdist==1.0" in message and "wheel" in message and "source distribution" in message
    assert "\n" not in message
    assert not (ws.packs / "demo").exists()


def test_stage_base_context_fills_docker_base(ws: Workspace) -> None:
    base = packimage.stage_base_context(ws)
    assert (base / "Dockerfile").is_file()
    assert (base / "site-packages" / "msgspec").is_dir() and (base / "site-packages" / "nats").is_dir()
    assert not (base / "site-packages" / "aiohttp").exists()
    assert (base / "lib" / "pack_runtime" / "__init__.py").is_file()
    assert (base / "site-packages" / ".gitignore").read_text().strip().endswith("*")
    assert not list(base.glob(".stage-*"))


# ----------------------------------------------------------------------------------- engine


_engine = docker_engine

_say = say

def _cli() -> typer.Typer:
    from broker.cli import build as _build

    app = typer.Typer()
    _build.register(app)

    @app.command("version")
    def _version() -> None:  # a second command keeps typer from collapsing the app into one command
        """Unused."""

    return app


@dataclass
class Built:
    client: Any
    prefix: str
    ws: Workspace
    output: str
    seconds: float
    sizes: dict[str, int] = field(default_factory=dict)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Iterator[Built]:
    """`rumi build` of a fresh workspace under a fresh prefix (all shared images and `default`)."""
    client = _engine()
    prefix = f"rumi-tp{secrets.token_hex(4)}"
    ws = Workspace.at(tmp_path_factory.mktemp("built") / "ws")
    init_workspace(ws)
    try:
        started = time.monotonic()
        result = CliRunner().invoke(_cli(), ["build", "--root", str(ws.root), "--prefix", prefix])
        seconds = time.monotonic() - started
        assert result.exit_code == 0, result.output
        sizes = {**images.image_sizes(client, prefix)}
        sizes["pack-default"] = int(client.images.get(packimage.pack_image_tag("default", prefix)).attrs["Size"])
        _say(pytestconfig, f"\nrumi build under {prefix}: {seconds:.1f}s; "
             + ", ".join(f"{k} {v / MB:.1f} MB" for k, v in sizes.items())
             + f"; default's own layers {(sizes['pack-default'] - sizes['base']) / 1000:.1f} kB")
        yield Built(client, prefix, ws, result.output, seconds, sizes)
    finally:
        images.remove_images(client, prefix)
        left = client.images.list(all=True, filters={"label": f"{LABEL_PREFIX}={prefix}"})
        client.close()
        assert not left, f"{len(left)} images with prefix {prefix} left"


def _run(client: Any, image: str, argv: list[str], **kwargs: Any) -> tuple[int, str]:
    """Run argv to completion with no network; return (exit code, output)."""
    options: dict[str, Any] = {"network_mode": "none", "cap_drop": ["ALL"], "security_opt": ["no-new-privileges"]}
    options.update(kwargs)
    container = client.containers.run(image, argv, detach=True, labels={"io.rumi.test": "packimage"}, **options)
    try:
        status = container.wait(timeout=120)
        return int(status["StatusCode"]), container.logs().decode()
    finally:
        container.remove(force=True)


@pytest.mark.docker
def test_rumi_build_shows_numbered_progress(built: Built) -> None:
    lines = built.output.splitlines()
    tag = images.image_tag("base", built.prefix)
    assert any(ln.startswith("[3/5] ") and tag in ln and "built" in ln for ln in lines), built.output
    assert any(ln.startswith("[5/5] ") and "pack-default" in ln for ln in lines)
    again = CliRunner().invoke(_cli(), ["build", "--root", str(built.ws.root), "--prefix", built.prefix])
    assert again.exit_code == 0, again.output
    verdicts = [ln for ln in again.output.splitlines() if ln.startswith("[") and "checking" not in ln]
    assert len(verdicts) == 5 and all(": reusing " in ln for ln in verdicts), again.output


@pytest.mark.docker
def test_rumi_build_fails_with_one_line(built: Built) -> None:
    _pack(built.ws, "broken", requirements="--index-url http://evil.example/simple\n")
    try:
        result = CliRunner().invoke(
            _cli(), ["build", "broken", "--root", str(built.ws.root), "--prefix", built.prefix]
        )
    finally:
        import shutil

        shutil.rmtree(built.ws.ecosystem / "broken")
    assert result.exit_code != 0
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert errors and "requirements.txt:1" in errors[0] and "not allowed" in errors[0], result.output


@pytest.mark.docker
def test_default_pack_runs_non_root_with_read_only_code(built: Built) -> None:
    uid = pack_uid("default")
    code = (
        "import json, os, sys, pack_runtime\n"
        "try:\n"
        "    open('/app/main.py', 'a').close(); wrote = True\n"
        "except PermissionError:\n"
        "    wrote = False\n"
        "try:\n"
        "    open('/app/new.py', 'w').close(); created = True\n"
        "except PermissionError:\n"
        "    created = False\n"
        "st = os.stat('/app/main.py')\n"
        "print(json.dumps({'uid': os.getuid(), 'wrote': wrote, 'created': created, 'owner': st.st_uid,\n"
        "                  'mode': oct(st.st_mode & 0o777), 'cwd': os.getcwd(), 'prefix': sys.prefix,\n"
        "                  'w_app': os.access('/app', os.W_OK), 'w_venv': os.access('/opt/pack', os.W_OK)}))\n"
    )
    # No read-only root here: the code must be unwritable by ownership and mode alone.
    status, out = _run(built.client, packimage.pack_image_tag("default", built.prefix), ["python3", "-c", code],
                       user=f"{uid}:{uid}")
    assert status == 0, out
    info = json.loads(out.strip().splitlines()[-1])
    assert info == {"uid": uid, "wrote": False, "created": False, "owner": 0, "mode": "0o644", "cwd": "/app",
                    "prefix": "/opt/pack", "w_app": False, "w_venv": False}


@pytest.mark.docker
def test_default_image_cmd_and_labels(built: Built) -> None:
    image = built.client.images.get(packimage.pack_image_tag("default", built.prefix))
    config = image.attrs["Config"]
    assert config["Cmd"] == ["python3", "main.py"] and config["WorkingDir"] == "/app"
    assert config["User"] == "10001:10001"
    assert image.labels[LABEL_PREFIX] == built.prefix and image.labels["io.rumi.pack"] == "default"
    assert image.labels[LABEL_KIND] == "pack" and LABEL_HASH in image.labels


@pytest.mark.docker
def test_pack_layer_is_small(built: Built, pytestconfig: pytest.Config) -> None:
    layer = packimage.pack_layer_size(built.client, "default", built.prefix)
    _say(pytestconfig, f"\npack-default adds {layer / 1000:.1f} kB to the base")
    # Its code plus its own venv with `requests` and its dependencies (about 3 MB of wheels).
    assert 0 < layer < 6 * MB


def _index_reachable() -> bool:
    with_tmp = Path(os.environ.get("TMPDIR", "/tmp")) / f"rumi-probe-{secrets.token_hex(4)}"
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(with_tmp),
             "six==1.17.0"],
            capture_output=True, timeout=120, check=False,
        )
        return done.returncode == 0
    except subprocess.TimeoutExpired:
        return False
    finally:
        import shutil

        shutil.rmtree(with_tmp, ignore_errors=True)


@pytest.mark.docker
def test_requirement_wheel_is_importable_offline(built: Built, tmp_path: Path,
                                                 pytestconfig: pytest.Config) -> None:
    if not _index_reachable():
        skip_unless_ci("the package index is unreachable from this host (six==1.17.0 could not be downloaded)")
    ws = built.ws
    _pack(ws, "withsix", requirements="six==1.17.0\n",
          code="import six, sys\nprint('six', six.__version__, six.__file__, sys.prefix)\n")
    try:
        first = packimage.build_pack(built.client, ws, "withsix", prefix=built.prefix)
        second = packimage.build_pack(built.client, ws, "withsix", prefix=built.prefix)
        _say(pytestconfig, f"\npack-withsix: {first.seconds:.1f}s, adds {first.layer_size / 1000:.1f} kB; "
             f"reuse {second.seconds:.2f}s")
        assert not first.reused and second.reused and second.image_id == first.image_id
        uid = pack_uid("withsix")
        status, out = _run(built.client, first.tag, [], user=f"{uid}:{uid}", read_only=True)
        assert status == 0, out
        assert out.split()[:2] == ["six", "1.17.0"]
        assert out.split()[2].startswith("/opt/pack/lib/python3.11/site-packages/") and out.split()[3] == "/opt/pack"
        site = ws.packs / "withsix" / "site"
        assert (site / "six.py").is_file() and not (site / "bin").exists()
    finally:
        import shutil

        shutil.rmtree(ws.ecosystem / "withsix")


@pytest.mark.docker
def test_docker_base_context_builds_offline(built: Built) -> None:
    """`docker build -t rumi-base:latest docker/base/` (here through the SDK, under the test prefix)."""
    tag = f"{built.prefix}-basectx:latest"
    built.client.images.build(
        path=str(built.ws.base), tag=tag, rm=True, forcerm=True, pull=False, network_mode="none",
        buildargs={"PYTHON_IMAGE": images.image_tag("python", built.prefix)},
        labels={LABEL_PREFIX: built.prefix},
    )
    status, out = _run(built.client, tag, ["python3", "-c", "import pack_runtime, nats, msgspec, os; "
                                                         "print(os.path.exists('/opt/rumi/site-packages/.gitignore'))"])
    assert status == 0, out
    assert out.strip() == "False"


# ---------------------------------------------------------------------- native wheels, source, syntax

NUMPY_PACK = '''
import numpy
from pack_runtime import Pack

pack = Pack()


@pack.tool("sum")
async def total(ctx, args):
    return {"sum": int(numpy.arange(10).sum()), "numpy": numpy.__version__}


if __name__ == "__main__":
    pack.run()
'''


@pytest.mark.docker
@pytest.mark.slow
def test_numpy_2_pack_builds_and_answers_through_the_broker(built: Built, pytestconfig: pytest.Config) -> None:
    """numpy 2.x needs libstdc++ from the image: the Pack starts, and its tool answers a `rumi call`."""
    import asyncio
    import shutil

    from broker.admin.calls import call_tool
    from broker.containers.engine import DockerRuntime
    from broker.core.net import free_port

    from .test_native_wheels import NUMPY

    ws, client = built.ws, built.client
    _pack(ws, "numpy2", requirements=f"{NUMPY}\n", code=NUMPY_PACK)
    config_text = ws.config_file.read_text()
    config = json.loads(config_text)
    config["nats_port"] = free_port()
    ws.config_file.write_text(json.dumps(config))
    rt = DockerRuntime(ws, client, prefix=built.prefix)
    try:
        try:
            first = packimage.build_pack(client, ws, "numpy2", prefix=built.prefix)
        except ImageBuildError as exc:
            if "pip download failed" in str(exc):
                skip_unless_ci(f"{NUMPY} could not be downloaded on this host: {exc}")
            raise
        assert not first.reused
        report = rt.up(["numpy2"], build=False, health_timeout=90)
        started = time.monotonic()
        answer = asyncio.run(call_tool(ws, "numpy2", "tool", "sum", {}, 60))
        call = time.monotonic() - started
        assert answer == {"sum": 45, "numpy": NUMPY.split("==")[1]}
        ready = report.packs[0].seconds_to_ready
        _say(pytestconfig, f"\npack-numpy2 ({NUMPY}): built in {first.seconds:.1f}s, {first.layer_size / MB:.1f} MB "
             f"above the base ({first.size / MB:.1f} MB in all); ready in {ready:.1f}s; call {call * 1000:.0f} ms")
    finally:
        try:
            rt.down()
        finally:
            ws.config_file.write_text(config_text)
            shutil.rmtree(ws.ecosystem / "numpy2")


@pytest.mark.docker
def test_wheel_needing_an_absent_library_builds_no_image(
    built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from .test_native_wheels import EXT, _fake_index

    _fake_index(tmp_path, monkeypatch)
    _pack(built.ws, "fakenative", requirements="fakenative==1.0\n", code="import fakenative\n")
    tag = packimage.pack_image_tag("fakenative", built.prefix)
    try:
        with pytest.raises(ImageBuildError) as info:
            packimage.build_pack(built.client, built.ws, "fakenative", prefix=built.prefix,
                                 cache_dir=tmp_path / "cache")
    finally:
        shutil.rmtree(built.ws.ecosystem / "fakenative")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        f"Pack fakenative: fakenative/_native.{EXT} (fakenative 1.0) needs libdoesnotexist.so.1, "
        f"which {images.image_tag('base', built.prefix)} does not have"
    ), message
    assert images._existing(built.client, tag) is None


@pytest.mark.docker
def test_rumi_build_shows_a_syntax_error_with_file_and_line(built: Built) -> None:
    import shutil

    _pack(built.ws, "typo", code="print('a')\nprint('b'\n")
    try:
        result = CliRunner().invoke(_cli(), ["build", "typo", "--root", str(built.ws.root), "--prefix", built.prefix])
    finally:
        shutil.rmtree(built.ws.ecosystem / "typo")
    assert result.exit_code != 0
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert errors and errors[0].endswith(
        f"{built.prefix}-pack-typo: main.py:2: SyntaxError: '(' was never closed (fix ecosystem/typo/main.py)"
    ), result.output
    assert "compileall" not in result.output and "non-zero code" not in result.output
    assert images._existing(built.client, packimage.pack_image_tag("typo", built.prefix)) is None


@pytest.mark.docker
def test_no_build_warns_when_the_source_changed(built: Built) -> None:
    from broker.containers.engine import DockerRuntime

    lines: list[str] = []
    rt = DockerRuntime(built.ws, built.client, prefix=built.prefix, progress=lines.append)
    tag = packimage.pack_image_tag("default", built.prefix)
    assert built.client.images.get(tag).labels[packimage.LABEL_SOURCE] == packimage.source_digest(built.ws, "default")
    rt.ensure_images(["default"], build=False)
    assert not [ln for ln in lines if "warning" in ln], lines
    main = built.ws.ecosystem / "default" / "main.py"
    original = main.read_text()
    try:
        main.write_text(original + "\n# edited after the build\n")
        rt.ensure_images(["default"], build=False)
    finally:
        main.write_text(original)
    assert [ln for ln in lines if "warning" in ln] == [
        f"warning: pack default: ecosystem/default/ changed since {tag} was built; it runs the old code: "
        "run `rumi build default` (or `rumi up` without --no-build)"
    ]
    lines.clear()
    rt.ensure_images(["default"], build=False)  # the source is back as built: nothing to say
    assert not [ln for ln in lines if "warning" in ln], lines
