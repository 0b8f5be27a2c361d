"""Run egress test code inside a fresh network namespace that holds only loopback.

Every test that makes the network handler send anything runs its code through `run_in_netns`: a
child Python started by `unshare --net`, where the only interface is `lo` (127.0.0.1/8, ::1 and
`PUBLIC_TEST_ADDRESS`, a global address that exists nowhere else). The child refuses to run if it
sees any other interface, so even a buggy handler cannot reach a real network, and an address such
as 169.254.169.254 or a public TEST-NET address has no route at all.

Also here, for the code that runs inside: a tiny HTTP(S) test server that records connections,
requests and TLS SNI; a scripted resolver; a test PKI; and a way to call the shipped handler.
"""

from __future__ import annotations

import functools
import http.server
import inspect
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
if TYPE_CHECKING:
    from tests._handlers import LoadedHandler

HANDLER_FILE = REPO / "config" / "handlers" / "network.py"
SCOPE_FILE = REPO / "config" / "scopes" / "network.json"
CORPORA = REPO.parent / "shared" / "corpora"
PUBLIC_TEST_ADDRESS = "1.2.3.4"  # global unicast, bound to the namespace's own lo only

_BOOTSTRAP = r"""
import inspect, json, runpy, socket, subprocess, sys
script, function, payload_path, result_path, extra = sys.argv[1:6]
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
for address in filter(None, extra.split(",")):
    subprocess.run(["ip", "addr", "add", address + "/32", "dev", "lo"], check=True)
names = sorted(name for _, name in socket.if_nameindex())
if names != ["lo"]:
    sys.exit(f"refusing to run: the namespace has interfaces {names}, expected only lo")
sys.path[:0] = [sys.argv[6], sys.argv[7]]
fn = runpy.run_path(script, run_name="__netns__")[function]
with open(payload_path) as f:
    payload = json.load(f)
if inspect.iscoroutinefunction(fn):
    import anyio
    result = anyio.run(fn, payload)
else:
    result = fn(payload)
with open(result_path, "w") as f:
    json.dump(result, f)
"""


@functools.cache
def netns_unavailable() -> str | None:
    """Why a network namespace cannot be made here (None when it can)."""
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (util-linux / iproute2)"
    try:
        probe = subprocess.run(
            ["unshare", "--net", "--", "ip", "link", "set", "lo", "up"],
            capture_output=True, text=True, timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`unshare --net` failed: {exc}"
    if probe.returncode != 0:
        return f"`unshare --net` is not permitted here: {probe.stderr.strip()[:200]}"
    return None


def run_in_netns(script: str | Path, function: str, payload: Any = None, *, timeout: float = 120) -> Any:
    """Call `function(payload)` (sync or async) from `script` in a fresh loopback-only namespace.

    The payload and the result travel as JSON. Skips the calling test when namespaces are unavailable.
    """
    from tests._skip import skip_unless_ci

    reason = netns_unavailable()
    if reason is not None:
        message = f"needs a network namespace so no request can leave the machine: {reason}"
        skip_unless_ci(message)  # the egress isolation tests are the core path: never skipped in CI
    with tempfile.TemporaryDirectory(prefix="rumi-netns-") as tmp:
        payload_path = Path(tmp, "payload.json")
        result_path = Path(tmp, "result.json")
        payload_path.write_text(json.dumps(payload))
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
        cmd = [
            "unshare", "--net", "--", sys.executable, "-c", _BOOTSTRAP,
            str(script), function, str(payload_path), str(result_path), PUBLIC_TEST_ADDRESS,
            str(TESTS), str(REPO),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0 or not result_path.exists():
            raise AssertionError(
                f"netns child failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}\n{proc.stdout[-2000:]}"
            )
        return json.loads(result_path.read_text())


# --- test PKI -------------------------------------------------------------------------------------

def make_pki(directory: Path, dns_names: Sequence[str], ip_addresses: Sequence[str]) -> dict[str, str]:
    """A test CA and one server certificate for the names/IPs; paths of ca, cert and key (PEM)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {k: str(directory / f"{k}.pem") for k in ("ca", "cert", "key")}
    try:
        _make_pki_cryptography(paths, dns_names, ip_addresses)
    except ImportError:
        _make_pki_openssl(directory, paths, dns_names, ip_addresses)
    return paths


def _make_pki_cryptography(paths: dict[str, str], dns_names: Sequence[str], ips: Sequence[str]) -> None:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rumi test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (list(dns_names) or ["test"])[0])]))
        .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    Path(paths["ca"]).write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    Path(paths["cert"]).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    Path(paths["key"]).write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))


def _make_pki_openssl(directory: Path, paths: dict[str, str], dns_names: Sequence[str],
                      ips: Sequence[str]) -> None:
    san = ",".join([f"DNS:{n}" for n in dns_names] + [f"IP:{i}" for i in ips])
    ext = directory / "leaf.ext"
    ext.write_text(f"subjectAltName={san}\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n")
    ca_key, csr = directory / "ca.key", directory / "leaf.csr"

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
        "-subj", "/CN=rumi test CA", "-keyout", str(ca_key), "-out", paths["ca"],
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-subj", f"/CN={(list(dns_names) or ['test'])[0]}", "-keyout", paths["key"], "-out", str(csr))
    run("x509", "-req", "-in", str(csr), "-CA", paths["ca"], "-CAkey", str(ca_key), "-CAcreateserial",
        "-days", "2", "-extfile", str(ext), "-out", paths["cert"])


# --- test HTTP(S) server --------------------------------------------------------------------------

class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: TestServer._Server

    def setup(self) -> None:
        if isinstance(self.request, ssl.SSLSocket):
            self.request.settimeout(10)
            self.request.do_handshake()
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _reply(self, status: int, body: bytes, headers: Sequence[tuple[str, str]] = (),
               chunked: bool = False) -> None:
        self.send_response(status)
        for k, v in headers:
            self.send_header(k, v)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command == "HEAD":
            return
        if chunked:
            for i in range(0, len(body), 4096):
                part = body[i:i + 4096]
                self.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.wfile.write(body)

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        parts = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(parts.query))
        self.server.owner.requests.append({
            "method": self.command, "path": self.path,
            "headers": [[k, v] for k, v in self.headers.items()], "body": body.decode("latin-1"),
        })
        route = parts.path
        if route == "/ok":
            cookies = [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")]
            self._reply(200, b"hello", [("Content-Type", "text/plain"), *cookies])
        elif route == "/echo":
            echo = {"method": self.command, "headers": [[k, v] for k, v in self.headers.items()],
                    "body": body.decode("latin-1")}
            self._reply(200, json.dumps(echo).encode(), [("Content-Type", "application/json")])
        elif route == "/redirect":
            self._reply(int(query.get("status", "302")), b"", [("Location", query["to"])])
        elif route == "/loop":
            self._reply(302, b"", [("Location", "/loop")])
        elif route == "/big":
            self._reply(200, b"x" * int(query["n"]), chunked=query.get("chunked") == "1")
        elif route == "/slow":
            time.sleep(float(query.get("s", "5")))
            self._reply(200, b"late")
        else:
            self._reply(404, b"not found")

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = do_PATCH = do_OPTIONS = _serve


class TestServer:
    """A threaded HTTP(S) server on one address; counts accepted connections, keeps requests and SNI."""

    __test__ = False  # not a pytest test class

    class _Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        owner: TestServer

        def get_request(self) -> tuple[socket.socket, Any]:
            sock, addr = super().get_request()
            self.owner.connections += 1
            if self.owner.ssl_context is not None:
                # The handshake runs in the handler thread (`_Handler.setup`), after accept was counted.
                sock = self.owner.ssl_context.wrap_socket(
                    sock, server_side=True, do_handshake_on_connect=False
                )
            return sock, addr

        def handle_error(self, request: Any, client_address: Any) -> None:
            self.owner.errors += 1

    def __init__(self, host: str, port: int = 0, *, pki: dict[str, str] | None = None) -> None:
        self.connections = 0
        self.errors = 0
        self.requests: list[dict[str, Any]] = []
        self.sni: list[str | None] = []
        self.ssl_context: ssl.SSLContext | None = None
        if pki is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(pki["cert"], pki["key"])
            ctx.sni_callback = lambda _sock, name, _ctx: self.sni.append(name)  # type: ignore[assignment, misc]
            self.ssl_context = ctx
        self._server = self._Server((host, port), _Handler, bind_and_activate=False)
        self._server.owner = self
        self._server.allow_reuse_address = False
        self._server.server_bind()
        self._server.server_activate()
        self.host = host
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    def url(self, path: str = "/ok", *, host: str | None = None) -> str:
        """A URL of this server (`host` replaces the address, e.g. with a test name)."""
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{host or self.host}:{self.port}{path}"

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()


class Listener:
    """A bare TCP listener that only counts connection attempts (nothing should ever arrive)."""

    def __init__(self, host: str, port: int = 0) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.bind((host, port))
        self._sock.listen(16)
        self._sock.settimeout(0.05)
        self.port = int(self._sock.getsockname()[1])
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        """Stop and close."""
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close()


# --- resolver and handler -------------------------------------------------------------------------

class ScriptedResolver:
    """A resolver the test controls: `answers[name]` is a list of answers, one per call (last repeats)."""

    def __init__(self, answers: dict[str, list[list[str]]] | None = None,
                 fallback: Callable[[str], list[str]] | None = None) -> None:
        self.answers = answers or {}
        self.fallback = fallback
        self.calls: list[str] = []

    def __call__(self, host: str, port: int) -> list[str]:
        count = self.calls.count(host)
        self.calls.append(host)
        if host in self.answers:
            queue = self.answers[host]
            return list(queue[min(count, len(queue) - 1)])
        if self.fallback is not None:
            return self.fallback(host)
        raise OSError(f"no answer for {host}")


@functools.cache
def load_network_handler() -> LoadedHandler:
    """The shipped handler file, loaded and called the way the broker loads and calls plugins."""
    from tests._handlers import LoadedHandler

    return LoadedHandler(HANDLER_FILE)


def scope_defaults() -> dict[str, Any]:
    """The shipped scope's `default_config`."""
    return dict(json.loads(SCOPE_FILE.read_text())["default_config"])


async def call_network(grant: dict[str, Any], args: dict[str, Any], *, resolver: Any = None,
                       verify: Any = None, broker_timeout: float = 30) -> dict[str, Any]:
    """Run the handler with a hand-built context; a JSON-able outcome (bodies as latin-1 text)."""
    from broker.core.errors import RequestError

    handler = load_network_handler()
    audit: dict[str, Any] = {}
    context = {
        "pack_id": "p", "component_id": "p:tool:t", "request_id": "r-1",
        "grant": {**scope_defaults(), "enabled": True, **grant},
        "limits": {"timeout": broker_timeout}, "workspace_root": "/nonexistent", "audit": audit,
        "egress_resolver": resolver, "egress_verify": verify,
    }
    try:
        result = handler.execute(context, args)
        if inspect.isawaitable(result):
            result = await result
    except RequestError as exc:
        return {"ok": False, "code": exc.code, "message": exc.message, "audit": audit}
    data = result["data"]
    return {"ok": True, "status": data["status"], "headers": data["headers"],
            "body": data["body"].decode("latin-1"), "audit": audit}
