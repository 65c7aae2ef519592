"""OCI test fixtures built by hand: images, a real registry, a token server, a "CDN".

* Images: OCI (or Docker schema 2) manifests, configs and tiny gzip'd tar
  layers written in Python, laid out as an ``oci:`` directory for skopeo.
* ``registry()``: CNCF distribution (Debian ``docker-registry``) on loopback,
  filesystem storage in a temporary directory; anonymous, htpasswd (Basic) or
  token auth, optionally redirecting blob downloads to another host.
* ``TokenServer``: the registry token endpoint, issuing RS256 JWTs signed with
  the ``openssl`` CLI (key and self-signed certificate made by openssl too;
  the certificate travels in the ``x5c`` header).
* ``FileServer``: serves a directory and records request headers (the CDN
  that the redirect middleware sends blob downloads to).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import ssl
import subprocess
import tarfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from pytest_upstream.formats.docker import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
)

from .peers import free_port

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
PUSH_USER, PUSH_PASS = "pusher", "push-secret-4c1d"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- images -------------------------------------------------------------------------------
@dataclass
class Blob:
    media_type: str
    data: bytes
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. platform, annotations

    @property
    def digest(self) -> str:
        return sha256(self.data)

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": len(self.data), **self.extra}


def _json(obj: Any) -> bytes:
    return json.dumps(obj, indent=3, sort_keys=True).encode()  # not canonical on purpose


def tar_gz(files: dict[str, bytes]) -> tuple[bytes, str]:
    """A reproducible gzip'd tar of ``files``, and the diff ID (digest of the tar)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    tar_bytes = raw.getvalue()
    return gzip.compress(tar_bytes, mtime=0), sha256(tar_bytes)


@dataclass
class Image:
    manifest: Blob
    config: Blob
    layers: list[Blob]

    @property
    def blobs(self) -> list[Blob]:
        return [self.config, *self.layers, self.manifest]


def build_image(arch: str, files: dict[str, bytes], *, docker: bool = False) -> Image:
    layer_types = DOCKER_LAYER if docker else OCI_LAYER
    layers, diff_ids = [], []
    for name, data in files.items():
        gz, diff_id = tar_gz({name: data})
        layers.append(Blob(layer_types, gz))
        diff_ids.append(diff_id)
    config = Blob(
        DOCKER_CONFIG if docker else OCI_CONFIG,
        _json(
            {
                "architecture": arch,
                "os": "linux",
                "config": {"Cmd": ["/hello"]},
                "rootfs": {"type": "layers", "diff_ids": diff_ids},
            }
        ),
    )
    mtype = DOCKER_MANIFEST if docker else OCI_MANIFEST
    manifest = Blob(
        mtype,
        _json(
            {
                "schemaVersion": 2,
                "mediaType": mtype,
                "config": config.descriptor(),
                "layers": [layer.descriptor() for layer in layers],
            }
        ),
    )
    return Image(manifest, config, layers)


def build_index(images: dict[str, Image], *, docker: bool = False) -> Blob:
    """A multi-platform index (OCI) or manifest list (Docker) over ``{arch: image}``."""
    mtype = DOCKER_LIST if docker else OCI_INDEX
    manifests = [
        {**img.manifest.descriptor(), "platform": {"architecture": arch, "os": "linux"}}
        for arch, img in images.items()
    ]
    return Blob(mtype, _json({"schemaVersion": 2, "mediaType": mtype, "manifests": manifests}))


def write_layout(directory: Path, blobs: list[Blob], refs: dict[str, Blob]) -> Path:
    """An ``oci:`` image layout holding ``blobs``, with ``refs`` {tag: top-level blob}."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    store = directory / "blobs" / "sha256"
    store.mkdir(parents=True, exist_ok=True)
    for blob in blobs:
        (store / blob.digest.split(":", 1)[1]).write_bytes(blob.data)
    index = {
        "schemaVersion": 2,
        "manifests": [
            {**blob.descriptor(), "annotations": {"org.opencontainers.image.ref.name": tag}}
            for tag, blob in refs.items()
        ],
    }
    (directory / "index.json").write_text(json.dumps(index))
    return directory


# -- HTTP helpers ------------------------------------------------------------------------
def http(
    url: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    data: bytes | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int, bytes, dict[str, str]]:
    req = urllib.request.Request(url, method=method, headers=headers or {}, data=data)
    try:
        with urllib.request.urlopen(req, timeout=30, context=context) as r:
            return r.status, r.read(), dict(r.headers.items())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers.items())


def _unverified() -> ssl.SSLContext:
    """For waiting until a test's own HTTPS server answers at all (its certificate is checked by
    the client under test, not here)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def wait_listening(url: str, timeout: float = 30.0, ssl_context: ssl.SSLContext | None = None) -> None:
    """Until ``url`` gives any HTTP answer (a 401 counts)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            http(url, context=ssl_context)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout:g}s") from None
            time.sleep(0.1)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def push_http(registry_url: str, name: str, blobs: list[Blob], tag: str, top: Blob, auth: str = "") -> None:
    """Push exact bytes with the registry API (monolithic uploads), for what skopeo would convert."""
    headers = {"Authorization": auth} if auth else {}
    for blob in blobs:
        if blob is top or blob.media_type in (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST):
            continue
        status, _, h = http(
            f"{registry_url}/v2/{name}/blobs/uploads/", method="POST", headers=headers, data=b""
        )
        assert status == 202, status
        loc = urllib.parse.urljoin(registry_url, h["Location"])
        sep = "&" if "?" in loc else "?"
        status, body, _ = http(
            f"{loc}{sep}digest={blob.digest}",
            method="PUT",
            headers={**headers, "Content-Type": "application/octet-stream"},
            data=blob.data,
        )
        assert status == 201, (status, body)
    manifests = [b for b in blobs if b.media_type in (OCI_MANIFEST, DOCKER_MANIFEST) and b is not top]
    for m in manifests:
        status, body, _ = http(
            f"{registry_url}/v2/{name}/manifests/{m.digest}",
            method="PUT",
            headers={**headers, "Content-Type": m.media_type},
            data=m.data,
        )
        assert status == 201, (status, body)
    status, body, _ = http(
        f"{registry_url}/v2/{name}/manifests/{tag}",
        method="PUT",
        headers={**headers, "Content-Type": top.media_type},
        data=top.data,
    )
    assert status == 201, (status, body)


# -- skopeo -------------------------------------------------------------------------------
def skopeo(*args: str, home: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """skopeo with a private HOME (no stray auth files) and no policy check."""
    full_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "XDG_RUNTIME_DIR": str(home),
        "REGISTRY_AUTH_FILE": str(home / "auth.json"),
        **(env or {}),
    }
    return subprocess.run(
        ["skopeo", "--insecure-policy", *args], capture_output=True, text=True, timeout=180, env=full_env
    )


# -- the registry ----------------------------------------------------------------------------
@dataclass
class Registry:
    url: str
    port: int
    storage: Path
    proc: subprocess.Popen[bytes]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@contextmanager
def registry(
    tmp: Path,
    *,
    htpasswd: Path | None = None,
    token: TokenServer | None = None,
    redirect_to: str | None = None,
    tls: tuple[Path, Path] | None = None,
    host: str = "127.0.0.1",
) -> Iterator[Registry]:
    """``docker-registry serve`` on loopback (``host``) with filesystem storage under ``tmp``;
    over HTTPS with ``tls`` (certificate chain file, key file)."""
    port = free_port()
    storage = tmp / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    lines = [
        "version: 0.1",
        "log:",
        "  level: error",
        "  accesslog:",
        "    disabled: true",
        "storage:",
        "  filesystem:",
        f"    rootdirectory: {storage}",
        "  delete:",
        "    enabled: true",
        "http:",
        f"  addr: {host}:{port}",
        "  secret: pytest-upstream-test-secret",
    ]
    if tls is not None:
        lines += ["  tls:", f"    certificate: {tls[0]}", f"    key: {tls[1]}"]
    if htpasswd is not None:
        lines += ["auth:", "  htpasswd:", "    realm: test-realm", f"    path: {htpasswd}"]
    if token is not None:
        lines += [
            "auth:",
            "  token:",
            f"    realm: {token.url}/token",
            f"    service: {token.service}",
            f"    issuer: {token.issuer}",
            f"    rootcertbundle: {token.cert}",
        ]
    if redirect_to is not None:
        lines += [
            "middleware:",
            "  storage:",
            "    - name: redirect",
            "      options:",
            f"        baseurl: {redirect_to}",
        ]
    config = tmp / "registry.yml"
    config.write_text("\n".join(lines) + "\n")
    log = (tmp / "registry.log").open("wb")
    proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log, stderr=subprocess.STDOUT)
    reg = Registry(f"{'https' if tls else 'http'}://{host}:{port}", port, storage, proc)
    try:
        try:
            wait_listening(reg.url + "/v2/", ssl_context=_unverified() if tls else None)
        except TimeoutError:
            raise RuntimeError(
                f"docker-registry did not start: {(tmp / 'registry.log').read_text()}"
            ) from None
        yield reg
    finally:
        reg.stop()
        log.close()


def make_htpasswd(path: Path, user: str, password: str) -> Path:
    out = subprocess.run(["htpasswd", "-Bbn", user, password], capture_output=True, text=True, check=True)
    path.write_text(out.stdout)
    return path


# -- the token server --------------------------------------------------------------------------
def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class _TokenHandler(BaseHTTPRequestHandler):
    server: _TokenHTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        ts = self.server.token_server
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        auth = self.headers.get("Authorization", "")
        user = ""
        if auth:
            if auth not in [basic(u, p) for u, p in ts.users]:
                self._answer(401, {"details": "bad credentials"})
                return
            user = base64.b64decode(auth.split(" ", 1)[1]).decode().split(":", 1)[0]
        with ts.lock:
            ts.requests.append(
                {"scope": query.get("scope", ""), "service": query.get("service", ""), "user": user}
            )
        if ts.require_user and not user:
            self._answer(401, {"details": "credentials required"})
            return
        access = []
        for scope in query.get("scope", "").split(" "):
            if scope.count(":") < 2:
                continue
            kind, rest = scope.split(":", 1)
            name, actions = rest.rsplit(":", 1)
            allowed = [a for a in actions.split(",") if a == "pull" or (user and a in ("push", "*"))]
            access.append({"type": kind, "name": name, "actions": allowed})
        self._answer(200, {"token": ts.issue(user, access), "expires_in": ts.expires_in})

    def _answer(self, status: int, data: dict[str, Any]) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _TokenHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    token_server: TokenServer


class TokenServer:
    """The registry token endpoint: anonymous callers get pull, known users pull and push."""

    service = "pytest-upstream-registry"
    issuer = "pytest-upstream-token-issuer"

    def __init__(self, tmp: Path, users: list[tuple[str, str]], *, require_user: bool = False) -> None:
        self.users = users
        self.require_user = require_user
        self.expires_in = 300
        self.requests: list[dict[str, str]] = []
        self.lock = threading.Lock()
        self.key = tmp / "token.key"
        self.cert = tmp / "token.crt"
        subprocess.run(
            [
                "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                "-subj", "/CN=pytest-upstream-token", "-keyout", str(self.key), "-out", str(self.cert),
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip
        pem = self.cert.read_text().splitlines()
        self._x5c = "".join(line for line in pem if not line.startswith("-----"))
        self._httpd = _TokenHTTPServer(("127.0.0.1", 0), _TokenHandler)
        self._httpd.token_server = self
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def issue(self, user: str, access: list[dict[str, Any]]) -> str:
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        claims = {
            "iss": self.issuer,
            "sub": user,
            "aud": self.service,
            "exp": now + self.expires_in,
            "nbf": now - 10,
            "iat": now,
            "jti": os.urandom(8).hex(),
            "access": access,
        }
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = subprocess.run(
            ["openssl", "dgst", "-sha256", "-sign", str(self.key)],
            input=signing_input.encode(),
            capture_output=True,
            check=True,
        ).stdout
        return f"{signing_input}.{_b64url(signature)}"

    def __enter__(self) -> TokenServer:
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


# -- a file server standing in for a CDN ---------------------------------------------------------
class _FileHandler(SimpleHTTPRequestHandler):
    server: _FileHTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        with self.server.files.lock:
            self.server.files.requests.append((self.path, dict(self.headers.items())))
        super().do_GET()


class _FileHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    files: FileServer


class FileServer:
    """Serves ``root`` on another loopback port and records every request's headers."""

    def __init__(self, root: Path) -> None:
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.lock = threading.Lock()
        self._httpd = _FileHTTPServer(("127.0.0.1", 0), partial(_FileHandler, directory=str(root)))
        self._httpd.files = self
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> FileServer:
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
