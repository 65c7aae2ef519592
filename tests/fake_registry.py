"""A small, controllable OCI registry (pull side) for fast tests, on loopback.

Serves manifests (optionally one body per accepted media type, like a real
registry negotiating), blobs (optionally by a 307 to another host), tags
(paginated like distribution: ``n``, ``last`` and a ``Link`` to the next
page) and a token endpoint; answers chosen paths with a forced error
(``fail``); records every request's headers.  ``auth`` is ``""``,
``"basic"`` (one user) or ``"token"`` (Bearer challenge, tokens from
``/token``, Basic accepted at the token endpoint).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Manifest:
    bodies: dict[str, bytes]  # media type -> body; the first listed is the default
    digest_header: str | None = "auto"  # "auto": the body's digest; None: no header; else as given


@dataclass
class FakeRegistry:
    auth: str = ""
    user: tuple[str, str] = ("reg-user", "reg-pass-0d1e")
    token_life: int = 300
    manifests: dict[tuple[str, str], Manifest] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    tags: dict[str, list[str]] = field(default_factory=dict)
    redirect_blobs_to: str | None = None  # base URL: blobs answer 307 to <base>/<digest>
    tags_page: int | None = None  # page size when the client sends no n (None: all tags)
    link_extra: str = ""  # appended to the next-page Link's query (e.g. "&cursor=x")
    fail: dict[str, tuple[int, bytes]] = field(default_factory=dict)  # URL path -> (status, body)
    hits: Counter[str] = field(default_factory=Counter)
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    token_requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    port: int = 0
    _server: ThreadingHTTPServer | None = None
    _issued: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

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

    def start(self) -> FakeRegistry:
        handler = type("H", (_Handler,), {"registry": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeRegistry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    registry: FakeRegistry

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self.do_GET()

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str, headers: dict[str, str] | None = None) -> None:
        body = json.dumps({"errors": [{"code": code, "message": code.lower()}]}).encode()
        self._send(status, body, {"Content-Type": "application/json", **(headers or {})})

    def do_GET(self) -> None:
        reg = self.registry
        url = urllib.parse.urlsplit(self.path)
        headers = dict(self.headers.items())
        if url.path == "/token":
            with reg.lock:
                reg.token_requests.append((url.query, headers))
            if headers.get("Authorization") not in (None, _basic(*reg.user)):
                self._error(401, "UNAUTHORIZED")
                return
            body = json.dumps({"token": reg.issue(), "expires_in": reg.token_life}).encode()
            self._send(200, body, {"Content-Type": "application/json"})
            return
        with reg.lock:
            reg.hits[url.path] += 1
            reg.requests.append((self.path, headers))
        auth = headers.get("Authorization")
        if reg.auth == "basic" and auth != _basic(*reg.user):
            self._error(401, "UNAUTHORIZED", {"WWW-Authenticate": 'Basic realm="fake"'})
            return
        if reg.auth == "token" and (auth or "").removeprefix("Bearer ") not in reg.valid_tokens():
            parts = url.path.split("/")
            name = "/".join(parts[2:-2])
            challenge = (
                f'Bearer realm="{reg.url}/token",service="fake-registry",scope="repository:{name}:pull"'
            )
            self._error(401, "UNAUTHORIZED", {"WWW-Authenticate": challenge})
            return
        if url.path in reg.fail:
            status, body = reg.fail[url.path]
            self._send(status, body, {"Content-Type": "application/json"})
            return
        parts = url.path.split("/")
        if parts[:2] != ["", "v2"] or len(parts) < 5:
            self._error(404, "NAME_UNKNOWN")
            return
        if parts[-2:] == ["tags", "list"]:
            name = "/".join(parts[2:-2])
            if name not in reg.tags:
                self._error(404, "NAME_UNKNOWN")
                return
            query = dict(urllib.parse.parse_qsl(url.query))
            tags = sorted(reg.tags[name])
            if "last" in query:
                tags = [t for t in tags if t > query["last"]]
            n = int(query["n"]) if "n" in query else reg.tags_page
            out = {"Content-Type": "application/json"}
            if n is not None and len(tags) > n:
                tags = tags[:n]
                # as distribution writes it: url.Values.Encode() sorts the keys
                next_query = urllib.parse.urlencode({"last": tags[-1], "n": n}) + reg.link_extra
                out["Link"] = f'</v2/{name}/tags/list?{next_query}>; rel="next"'
            self._send(200, json.dumps({"name": name, "tags": tags}).encode(), out)
            return
        name, what, ref = "/".join(parts[2:-2]), parts[-2], parts[-1]
        if what == "blobs":
            if ref not in reg.blobs:
                self._error(404, "BLOB_UNKNOWN")
                return
            if reg.redirect_blobs_to:
                self._send(307, b"", {"Location": f"{reg.redirect_blobs_to}/{ref}"})
                return
            self._send(
                200,
                reg.blobs[ref],
                {"Content-Type": "application/octet-stream", "Docker-Content-Digest": ref},
            )
            return
        manifest = reg.manifests.get((name, ref))
        if what != "manifests" or manifest is None:
            self._error(404, "MANIFEST_UNKNOWN")
            return
        accepted = [a.split(";")[0].strip() for a in headers.get("Accept", "").split(",")]
        ctype = next((t for t in manifest.bodies if t in accepted), next(iter(manifest.bodies)))
        body = manifest.bodies[ctype]
        out = {"Content-Type": ctype}
        if manifest.digest_header == "auto":
            out["Docker-Content-Digest"] = digest_of(body)
        elif manifest.digest_header is not None:
            out["Docker-Content-Digest"] = manifest.digest_header
        self._send(200, body, out)
