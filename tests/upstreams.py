"""Small, controllable fake upstreams for fast tests, on loopback: one server, one fault model.

``Upstream`` serves files from a dict; ``FakeRegistry`` is an ``Upstream`` that answers an
OCI registry's pull API instead (manifests, blobs, paginated tags, Basic or token auth).
Both count requests per path, record every request's headers, and misbehave on request
(``Fault``): answer a status (and body), cut a body short under a full Content-Length, slow
down, or be stopped altogether (open connections are cut, like a host going down).  Real
protocol peers (pip, pypiserver, registries) are used in the end-to-end tests; these exist
to inject faults and to count.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import socket
import sys
import threading
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


@dataclass
class Fault:
    status: int | None = None  # answer this status instead
    body: bytes | None = None  # ... with this body (default "fault <status>")
    truncate_at: int | None = None  # send this many bytes, then close (Content-Length says more)
    delay: float = 0.0  # seconds to sleep before answering
    chunk_delay: float = 0.0  # seconds between 64 KiB chunks
    headers: dict[str, str] = field(default_factory=dict)  # added to the answer


@dataclass
class Answer:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle stalls
        up = self.server.upstream
        with up.lock:
            up.connections.add(self.connection)

    def finish(self) -> None:
        up = self.server.upstream
        with up.lock:
            up.connections.discard(self.connection)
        super().finish()

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        up = self.server.upstream
        if up.stopped:  # a kept-alive connection outlived stop(): answer nothing, like a dead host
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        path = self.path
        headers = dict(self.headers.items())
        with up.lock:
            up.hits[path] += 1
            up.request_headers.append((path, headers))
            fault = up.faults.get(path) or up.default_fault
        if fault and fault.delay:
            time.sleep(fault.delay)
        if fault and fault.status:
            body = fault.body if fault.body is not None else f"fault {fault.status}\n".encode()
            answer = Answer(fault.status, body)
        else:
            answer = up.answer(path, headers)
        self.send_response(answer.status)
        for name, value in {**answer.headers, **(fault.headers if fault else {})}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        if self.command == "HEAD":
            return
        body = answer.body
        limit = fault.truncate_at if fault and fault.truncate_at is not None else len(body)
        step = 64 * 1024
        for start in range(0, limit, step):
            self.wfile.write(body[start : min(start + step, limit)])
            if fault and fault.chunk_delay:
                time.sleep(fault.chunk_delay)
        if limit < len(body):
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    upstream: Upstream

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Quiet: connections cut by ``stop()`` or a truncating fault are expected."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class Upstream:
    """``with Upstream() as up: up.files["/a"] = b"..."; up.url + "/a"``.

    ``hits`` and ``request_headers`` are keyed by the request target (path and query).
    Subclasses answer differently by overriding ``answer``; faults apply to every answer.
    """

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.content_types: dict[str, str] = {}
        self.faults: dict[str, Fault] = {}
        self.default_fault: Fault | None = None
        self.hits: Counter[str] = Counter()
        self.request_headers: list[tuple[str, dict[str, str]]] = []
        self.connections: set[socket.socket] = set()
        self.lock = threading.Lock()
        self._server: _Server | None = None
        self.port = 0
        self.stopped = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def answer(self, path: str, headers: dict[str, str]) -> Answer:
        """The answer to GET ``path`` (HEAD sends its headers only), before faults."""
        with self.lock:
            body = self.files.get(path)
            content_type = self.content_types.get(path, "application/octet-stream")
        if body is None:
            return Answer(404, b"not found\n")
        return Answer(200, body, {"Content-Type": content_type})

    def start(self) -> Self:
        self.stopped = False
        self._server = _Server(("127.0.0.1", self.port), _Handler)
        self._server.upstream = self
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, args=(0.01,), daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop answering and cut open connections; ``start()`` again reuses the port."""
        self.stopped = True
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self.lock:
            open_connections = list(self.connections)
        for conn in open_connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- an OCI registry (pull side) -------------------------------------------------------------


def custom_proxies_toml(base_url: str, proxies: list[tuple[str, str, str]]) -> str:
    """A ``[tool.pytest-upstream]`` table with one custom proxy per ``(key, format, path)``, each
    at ``base_url/path`` (the pyproject.toml of a pytester session)."""
    blocks = "".join(
        f'\n[[tool.pytest-upstream.proxy]]\nkey = "{key}"\nsource = "custom"\n'
        f'format = "{fmt}"\nurl = "{base_url}/{path}"\n'
        for key, fmt, path in proxies
    )
    return "[tool.pytest-upstream]\n" + blocks


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _registry_error(status: int, code: str, headers: dict[str, str] | None = None) -> Answer:
    body = json.dumps({"errors": [{"code": code, "message": code.lower()}]}).encode()
    return Answer(status, body, {"Content-Type": "application/json", **(headers or {})})


@dataclass
class Manifest:
    bodies: dict[str, bytes]  # media type -> body; the first listed is the default
    digest_header: str | None = "auto"  # "auto": the body's digest; None: no header; else as given


class FakeRegistry(Upstream):
    """Manifests (one body per accepted media type, negotiated like a real registry), blobs
    (optionally by a 307 to another host), tags (paginated like distribution: ``n``, ``last``
    and a ``Link`` to the next page) and a token endpoint.  ``auth`` is ``""``, ``"basic"``
    (one user) or ``"token"`` (Bearer challenge, tokens from ``/token``, Basic accepted there).
    """

    TOKEN_PATH = "/token"

    def __init__(self, auth: str = "", token_life: int = 300) -> None:
        super().__init__()
        self.auth = auth
        self.token_life = token_life
        self.user = ("reg-user", "reg-pass-0d1e")
        self.manifests: dict[tuple[str, str], Manifest] = {}
        self.blobs: dict[str, bytes] = {}
        self.tags: dict[str, list[str]] = {}
        self.redirect_blobs_to: str | None = None  # base URL: blobs answer 307 to <base>/<digest>
        self.tags_page: int | None = None  # page size when the client sends no n (None: all tags)
        self.link_extra = ""  # appended to the next-page Link's query (e.g. "&cursor=x")
        self._issued = 0

    @property
    def requests(self) -> list[tuple[str, dict[str, str]]]:
        """The registry API requests (target, headers), token requests left out."""
        return [(p, h) for p, h in self.request_headers if not self._is_token(p)]

    @property
    def token_requests(self) -> list[tuple[str, dict[str, str]]]:
        """The token endpoint's requests (query, headers)."""
        return [(urllib.parse.urlsplit(p).query, h) for p, h in self.request_headers if self._is_token(p)]

    def _is_token(self, target: str) -> bool:
        return urllib.parse.urlsplit(target).path == self.TOKEN_PATH

    def add_manifest(
        self, name: str, ref: str, *bodies: tuple[str, bytes], digest_header: str | None = "auto"
    ) -> None:
        self.manifests[(name, ref)] = Manifest(dict(bodies), digest_header)

    def issue(self) -> str:
        with self.lock:
            self._issued += 1
            return f"tok-{self._issued}"

    def valid_tokens(self) -> set[str]:
        return {f"tok-{i}" for i in range(1, self._issued + 1)}

    def answer(self, path: str, headers: dict[str, str]) -> Answer:
        url = urllib.parse.urlsplit(path)
        auth = headers.get("Authorization")
        if url.path == self.TOKEN_PATH:
            if auth not in (None, _basic(*self.user)):
                return _registry_error(401, "UNAUTHORIZED")
            body = json.dumps({"token": self.issue(), "expires_in": self.token_life}).encode()
            return Answer(200, body, {"Content-Type": "application/json"})
        parts = url.path.split("/")
        if self.auth == "basic" and auth != _basic(*self.user):
            return _registry_error(401, "UNAUTHORIZED", {"WWW-Authenticate": 'Basic realm="fake"'})
        if self.auth == "token" and (auth or "").removeprefix("Bearer ") not in self.valid_tokens():
            scope = "/".join(parts[2:-2])
            challenge = (
                f'Bearer realm="{self.url}/token",service="fake-registry",scope="repository:{scope}:pull"'
            )
            return _registry_error(401, "UNAUTHORIZED", {"WWW-Authenticate": challenge})
        if parts[:2] != ["", "v2"] or len(parts) < 5:
            return _registry_error(404, "NAME_UNKNOWN")
        name, what, ref = "/".join(parts[2:-2]), parts[-2], parts[-1]
        if [what, ref] == ["tags", "list"]:
            return self._tags(name, dict(urllib.parse.parse_qsl(url.query)))
        if what == "blobs":
            if ref not in self.blobs:
                return _registry_error(404, "BLOB_UNKNOWN")
            if self.redirect_blobs_to:
                return Answer(307, b"", {"Location": f"{self.redirect_blobs_to}/{ref}"})
            ctype = {"Content-Type": "application/octet-stream", "Docker-Content-Digest": ref}
            return Answer(200, self.blobs[ref], ctype)
        manifest = self.manifests.get((name, ref))
        if what != "manifests" or manifest is None:
            return _registry_error(404, "MANIFEST_UNKNOWN")
        accepted = [a.split(";")[0].strip() for a in headers.get("Accept", "").split(",")]
        ctype = next((t for t in manifest.bodies if t in accepted), next(iter(manifest.bodies)))
        body = manifest.bodies[ctype]
        out = {"Content-Type": ctype}
        if manifest.digest_header == "auto":
            out["Docker-Content-Digest"] = digest_of(body)
        elif manifest.digest_header is not None:
            out["Docker-Content-Digest"] = manifest.digest_header
        return Answer(200, body, out)

    def _tags(self, name: str, query: dict[str, str]) -> Answer:
        if name not in self.tags:
            return _registry_error(404, "NAME_UNKNOWN")
        tags = sorted(self.tags[name])
        if "last" in query:
            tags = [t for t in tags if t > query["last"]]
        n = int(query["n"]) if "n" in query else self.tags_page
        out = {"Content-Type": "application/json"}
        if n is not None and len(tags) > n:
            tags = tags[:n]
            # as distribution writes it: url.Values.Encode() sorts the keys
            next_query = urllib.parse.urlencode({"last": tags[-1], "n": n}) + self.link_extra
            out["Link"] = f'</v2/{name}/tags/list?{next_query}>; rel="next"'
        return Answer(200, json.dumps({"name": name, "tags": tags}).encode(), out)
