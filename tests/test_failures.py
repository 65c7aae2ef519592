"""Failure modes: a dead or misbehaving upstream, bad digests, hostile paths, a killed proxy.

Every test talks to the proxy over loopback with a raw-socket HTTP/1.1 client
(so nothing normalises the request line) and checks the exact status, bytes
and what the cache holds afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from urllib.parse import urlsplit

import pytest

from pytest_upstream.config.settings import Settings
from pytest_upstream.engine import fetch
from pytest_upstream.server.proxy_server import ProxyServer
from pytest_upstream.store.cache import Cache

from .conftest import MakeProxy, proxy_def
from .peers import serve_url, spawn_serve
from .upstreams import Fault, Upstream

ROOT = Path(__file__).resolve().parent.parent


# -- helpers ------------------------------------------------------------------
class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes, length: int | None) -> None:
        self.status = status
        self.headers = headers  # lower-case names
        self.body = body
        self.length = length  # declared Content-Length, if any

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    @property
    def complete(self) -> bool:
        return self.length is None or len(self.body) == self.length


def request(
    base: str,
    target: str | bytes,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    timeout: float = 20.0,
) -> Response:
    """One request on a fresh connection; ``target`` goes on the request line verbatim.

    A body cut short (fewer bytes than Content-Length, or a broken chunked
    stream) is returned as read, with ``complete`` False.
    """
    parts = urlsplit(base)
    assert parts.hostname and parts.port
    if isinstance(target, str):
        target = target.encode("latin-1")
    lines = [
        method.encode() + b" " + target + b" HTTP/1.1",
        f"Host: {parts.netloc}".encode(),
        b"Connection: close",
    ]
    lines += [f"{k}: {v}".encode() for k, v in (headers or {}).items()]
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(b"\r\n".join(lines) + b"\r\n\r\n")
        f = sock.makefile("rb")
        status_line = f.readline()
        assert status_line.startswith(b"HTTP/1.1 "), status_line
        status = int(status_line.split()[1])
        hdrs: dict[str, str] = {}
        while (line := f.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            hdrs[name.strip().lower()] = value.strip()
        length = int(hdrs["content-length"]) if "content-length" in hdrs else None
        body = bytearray()
        try:
            if method == "HEAD":
                pass
            elif length is not None:
                while len(body) < length and (chunk := f.read1(min(65536, length - len(body)))):
                    body += chunk
            elif hdrs.get("transfer-encoding", "").lower() == "chunked":
                while (size_line := f.readline().strip()) and (size := int(size_line, 16)):
                    body += f.read(size)
                    f.readline()
            else:
                body += f.read()
        except (ConnectionResetError, TimeoutError, ValueError):
            if length is None:
                length = len(body) + 1  # a broken chunked stream is incomplete by definition
        return Response(status, hdrs, bytes(body), length)


def blob_names(cache_dir: Path) -> set[str]:
    return {p.name for p in (cache_dir / "blobs").rglob("*") if p.is_file()}


def assert_blobs_intact(cache_dir: Path) -> None:
    for p in (cache_dir / "blobs").rglob("*"):
        if p.is_file():
            assert hashlib.sha256(p.read_bytes()).hexdigest() == p.name, f"blob {p} does not match its name"


def entries(cache_dir: Path) -> dict[str, str]:
    """path -> sha256 of every index entry."""
    return {e.path: e.sha256 for e in Cache(cache_dir).iter_entries()}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _build_wheels() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_build_wheels", ROOT / "fixtures" / "build_wheels.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def publish_tree(up: Upstream, tree: Path) -> None:
    """Serve a static PEP 503 tree from the Upstream fixture (``dir/`` -> ``dir/index.html``)."""
    for file in tree.rglob("*"):
        if not file.is_file():
            continue
        rel = "/" + file.relative_to(tree).as_posix()
        if rel.endswith("/index.html"):
            rel = rel[: -len("index.html")]
            up.content_types[rel] = "text/html"
        up.files[rel] = file.read_bytes()


def write_config(path: Path, url: str) -> Path:
    path.write_text(
        "[tool.pytest-upstream]\n"
        "[[tool.pytest-upstream.proxy]]\n"
        f'key = "g"\nsource = "custom"\nformat = "generic"\nurl = "{url}"\n'
    )
    return path


@dataclass
class Shared:
    up: Upstream
    proxy: ProxyServer
    root: Path

    @property
    def base(self) -> str:
        return self.proxy.base_url

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    def total_hits(self) -> int:
        with self.up.lock:
            return sum(self.up.hits.values())


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    """One upstream and one proxy for the tests that need no fresh state.

    Stopping a server costs up to half a second of polling, so the many
    small tests share these; each uses paths of its own.
    """
    root = tmp_path_factory.mktemp("shared")
    up = Upstream().start()
    settings = Settings(
        cache_dir=root / "cache",
        mode="record",
        proxies=(
            proxy_def(key="g", format="generic", url=up.url, mutable_paths=["*.json"], metadata_ttl=0),
            proxy_def(key="pypi-mirror", format="pypi", url=up.url + "/simple/"),
            proxy_def(key="root", format="pypi", url=up.url + "/root/simple/"),
        ),
    )
    proxy = ProxyServer(settings).start()
    try:
        yield Shared(up, proxy, root)
    finally:
        proxy.stop()
        up.stop()


# -- the upstream is down or refuses --------------------------------------------
def test_upstream_down_nothing_cached_is_502_naming_url_and_error(
    upstream: Upstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    upstream.files["/a.bin"] = b"a" * 100
    proxy = make_proxy(proxy_def(key="g", format="generic", url=upstream.url))
    upstream.stop()
    r = request(proxy.base_url, "/g/a.bin")
    assert r.status == 502
    assert f"{upstream.url}/a.bin" in r.text
    assert "connection failed" in r.text
    assert entries(tmp_path / "cache") == {}
    assert blob_names(tmp_path / "cache") == set()


@pytest.mark.parametrize(("status", "words"), [(503, "answered 503"), (429, "rate limited")])
def test_upstream_error_status_nothing_cached_is_502(shared: Shared, status: int, words: str) -> None:
    path = f"/err{status}.json"
    shared.up.files[path] = b"{}"
    shared.up.faults[path] = Fault(status=status)
    r = request(shared.base, f"/g{path}")
    assert r.status == 502
    assert f"{shared.up.url}{path}" in r.text and words in r.text
    assert shared.up.hits[path] == 1
    assert path[1:] not in entries(shared.cache)


@pytest.mark.parametrize(("status", "words"), [(503, "answered 503"), (429, "rate limited")])
def test_expired_metadata_is_served_stale_on_error_status(shared: Shared, status: int, words: str) -> None:
    up, path = shared.up, f"/stale{status}.json"
    up.files[path] = b'{"version": 1}'
    r = request(shared.base, f"/g{path}")
    assert (r.status, r.body, r.headers["x-upstream-cache"]) == (200, b'{"version": 1}', "miss")
    # metadata_ttl 0: the next request revalidates, and the upstream now has a new version
    up.files[path] = b'{"version": 2}'
    r = request(shared.base, f"/g{path}")
    assert (r.status, r.body, r.headers["x-upstream-cache"]) == (200, b'{"version": 2}', "miss")
    up.faults[path] = Fault(status=status)
    for attempt in (3, 4):
        r = request(shared.base, f"/g{path}")
        assert r.status == 200
        assert r.body == b'{"version": 2}'
        assert r.headers["x-upstream-cache"] == "stale"
        assert f"{up.url}{path}" in r.headers["x-upstream-error"] and words in r.headers["x-upstream-error"]
        assert up.hits[path] == attempt  # asked again each time: a stale copy is not made fresh
    assert entries(shared.cache)[path[1:]] == sha(b'{"version": 2}')


def test_expired_metadata_is_served_stale_when_upstream_is_down(
    upstream: Upstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    body = b'{"version": 1}'
    upstream.files["/meta.json"] = body
    definition = proxy_def(
        key="g", format="generic", url=upstream.url, mutable_paths=["*.json"], metadata_ttl=0
    )
    first = make_proxy(definition)
    r = request(first.base_url, "/g/meta.json")
    assert (r.status, r.body, r.headers["x-upstream-cache"]) == (200, body, "miss")
    upstream.stop()
    # a second server on the same cache: its connection pool holds no keep-alive
    # connection to the stopped upstream (whose handler threads outlive stop())
    proxy = make_proxy(definition, cache=tmp_path / "cache")
    for _ in range(2):
        r = request(proxy.base_url, "/g/meta.json")
        assert r.status == 200
        assert r.body == body
        assert r.headers["x-upstream-cache"] == "stale"
        assert f"{upstream.url}/meta.json" in r.headers["x-upstream-error"]
        assert "connection failed" in r.headers["x-upstream-error"]
    assert upstream.hits["/meta.json"] == 1


def test_cached_artifact_is_a_hit_when_upstream_is_down(
    upstream: Upstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    data = os.urandom(300_000)
    upstream.files["/x/tool-1.0.tar.gz"] = data
    definition = proxy_def(key="g", format="generic", url=upstream.url)
    first = make_proxy(definition)
    r = request(first.base_url, "/g/x/tool-1.0.tar.gz")
    assert (r.status, r.headers["x-upstream-cache"]) == (200, "miss") and r.body == data
    upstream.stop()
    for proxy in (first, make_proxy(definition, cache=tmp_path / "cache")):
        r = request(proxy.base_url, "/g/x/tool-1.0.tar.gz")
        assert (r.status, r.headers["x-upstream-cache"]) == (200, "hit")
        assert r.body == data
    assert upstream.hits["/x/tool-1.0.tar.gz"] == 1


# -- PyPI digests ---------------------------------------------------------------
def test_pypi_wrong_hash_is_502_and_nothing_stored(
    upstream: Upstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    bw = _build_wheels()
    tree = tmp_path / "tree"
    bw.write_tree(tree)
    publish_tree(upstream, tree)
    good_name = bw.DISTS[0].filename  # upstream-demo-b: served correctly
    bad_name = bw.DISTS[1].filename  # upstream-demo-a: one byte flipped, the index keeps the old hash
    good = upstream.files[f"/files/{good_name}"]
    original = upstream.files[f"/files/{bad_name}"]
    tampered = bytearray(original)
    tampered[len(tampered) // 2] ^= 0xFF
    upstream.files[f"/files/{bad_name}"] = bytes(tampered)
    cache_dir = tmp_path / "cache"
    proxy = make_proxy(proxy_def(key="p", format="pypi", url=upstream.url + "/simple/"))

    r = request(proxy.base_url, f"/p/files/upstream-demo-b/{good_name}")
    assert (r.status, r.body) == (200, good)
    before = blob_names(cache_dir)

    for attempt in (1, 2):
        r = request(proxy.base_url, f"/p/files/upstream-demo-a/{bad_name}")
        assert r.status == 502, r.text
        assert "sha256 digest mismatch" in r.text
        assert sha(original) in r.text and sha(bytes(tampered)) in r.text
        assert upstream.hits[f"/files/{bad_name}"] == attempt  # refetched: never served from the cache
        assert f"files/upstream-demo-a/{bad_name}" not in entries(cache_dir)
        index_sha = entries(cache_dir)["simple/upstream-demo-a/"]
        assert blob_names(cache_dir) == before | {index_sha}
        assert sha(bytes(tampered)) not in blob_names(cache_dir)
    assert list((cache_dir / "tmp").glob("*.part")) == []
    assert_blobs_intact(cache_dir)


def test_pypi_wrong_hash_large_file_cuts_the_connection(
    upstream: Upstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    size = 9 * 1024 * 1024
    assert size > fetch.VERIFY_BEFORE_SERVE_LIMIT
    data = bytes(range(256)) * (size // 256)
    name = "big-1.0-py3-none-any.whl"
    upstream.files[f"/files/{name}"] = data
    upstream.files["/simple/big/"] = (
        f'<!DOCTYPE html><html><body><a href="../../files/{name}#sha256={sha(b"other")}">{name}</a>'
        "</body></html>\n"
    ).encode()
    cache_dir = tmp_path / "cache"
    proxy = make_proxy(proxy_def(key="p", format="pypi", url=upstream.url + "/simple/"))

    r = request(proxy.base_url, f"/p/files/big/{name}")
    assert r.status == 200  # streamed: the status went out before the digest could be checked
    assert r.length == size
    assert not r.complete, "the client must not receive a whole body for a digest mismatch"
    assert r.body == data[: len(r.body)]
    assert set(entries(cache_dir)) == {"simple/big/"}
    assert sha(data) not in blob_names(cache_dir)
    assert list((cache_dir / "tmp").glob("*.part")) == []
    assert upstream.hits[f"/files/{name}"] == 1


# -- truncated bodies ------------------------------------------------------------
def test_truncated_upstream_body_is_not_stored(
    upstream: Upstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    data = os.urandom(1024 * 1024)
    upstream.files["/t.bin"] = data
    upstream.faults["/t.bin"] = Fault(truncate_at=300_000)
    cache_dir = tmp_path / "cache"
    proxy = make_proxy(proxy_def(key="g", format="generic", url=upstream.url))

    r = request(proxy.base_url, "/g/t.bin")
    assert r.status == 200 and r.length == len(data)
    assert not r.complete
    assert len(r.body) <= 300_000 and r.body == data[: len(r.body)]
    assert entries(cache_dir) == {}
    assert blob_names(cache_dir) == set()

    del upstream.faults["/t.bin"]
    r = request(proxy.base_url, "/g/t.bin")
    assert (r.status, r.headers["x-upstream-cache"]) == (200, "miss")
    assert r.complete and r.body == data
    assert upstream.hits["/t.bin"] == 2
    assert entries(cache_dir) == {"t.bin": sha(data)}
    r = request(proxy.base_url, "/g/t.bin")
    assert (r.status, r.headers["x-upstream-cache"], r.body) == (200, "hit", data)
    assert upstream.hits["/t.bin"] == 2


def test_truncated_metadata_is_not_stored(shared: Shared) -> None:
    up = shared.up
    data = json.dumps({"items": list(range(20000))}).encode()
    up.files["/m.json"] = data
    up.faults["/m.json"] = Fault(truncate_at=1000)
    r = request(shared.base, "/g/m.json")
    assert r.status == 502 and f"{up.url}/m.json" in r.text
    assert "m.json" not in entries(shared.cache)
    assert sha(data) not in blob_names(shared.cache)
    del up.faults["/m.json"]
    r = request(shared.base, "/g/m.json")
    assert (r.status, r.body) == (200, data)
    assert up.hits["/m.json"] == 2


# -- a proxy killed mid-download ------------------------------------------------
def test_proxy_killed_mid_download_leaves_no_partial_entry(
    upstream: Upstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    data = os.urandom(4 * 1024 * 1024)
    upstream.files["/big.bin"] = data
    upstream.faults["/big.bin"] = Fault(chunk_delay=0.04)  # 64 chunks: ~2.5 s
    cache_dir = tmp_path / "cache"
    config = write_config(tmp_path / "pyproject.toml", upstream.url)
    proc = spawn_serve(config, "--cache", str(cache_dir), "--mode", "record")
    base = serve_url(proc)
    try:
        parts = urlsplit(base)
        assert parts.hostname and parts.port
        received = 0
        with socket.create_connection((parts.hostname, parts.port), timeout=20) as sock:
            sock.sendall(f"GET /g/big.bin HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode())
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = sock.recv(65536)
                assert chunk, "proxy closed before sending headers"
                buf += chunk
            head, _, rest = buf.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            assert f"content-length: {len(data)}".encode() in head.lower()
            received = len(rest)
            killed = False
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if not killed and received >= 512 * 1024:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(10)
                    killed = True
                try:
                    chunk = sock.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                received += len(chunk)
            assert killed
        assert received < len(data)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    assert upstream.hits["/big.bin"] == 1
    assert entries(cache_dir) == {}
    assert blob_names(cache_dir) == set()
    assert_blobs_intact(cache_dir)

    definition = proxy_def(key="g", format="generic", url=upstream.url)
    replay = make_proxy(definition, mode="replay", cache=cache_dir)
    r = request(replay.base_url, "/g/big.bin")
    assert r.status == 504
    assert "was not recorded" in r.text and f"{upstream.url}/big.bin" in r.text
    assert upstream.hits["/big.bin"] == 1

    del upstream.faults["/big.bin"]
    record = make_proxy(definition, mode="record", cache=cache_dir)  # the dead process's lock is gone
    r = request(record.base_url, "/g/big.bin")
    assert (r.status, r.headers["x-upstream-cache"]) == (200, "miss")
    assert r.body == data
    assert upstream.hits["/big.bin"] == 2
    assert entries(cache_dir) == {"big.bin": sha(data)}
    assert blob_names(cache_dir) == {sha(data)}
    assert_blobs_intact(cache_dir)
    for entry in Cache(cache_dir).iter_entries():
        blob = cache_dir / "blobs" / "sha256" / entry.sha256[:2] / entry.sha256
        assert blob.stat().st_size == entry.size


# -- hostile request paths ---------------------------------------------------------
TRAVERSALS = [
    ("/g/../etc/passwd", "'..' path segments"),
    ("/g/x/../../etc/passwd", "'..' path segments"),
    ("/g/%2e%2e/%2e%2e/etc/passwd", "'..' path segments"),
    ("/g/%2E%2e/secret", "'..' path segments"),
    ("/g/%2E%2e/", "'..' path segments"),
    ("/../g/x", "'..' path segments"),
    ("/g/./x", "'..' path segments"),
    ("/g//etc/passwd", "empty"),
    ("//etc/passwd", "empty"),
    ("/g/..%2f..%2fetc%2fpasswd", "encoded slashes"),
    ("/g/a%2Fb", "encoded slashes"),
    ("/g/..%5c..%5cetc%5cpasswd", "encoded slashes"),
    ("/g/..\\..\\etc\\passwd", "backslashes"),
    ("/g/a%00.txt", "control characters"),
    ("/g/a%0a.txt", "control characters"),
    ("/g/%c0%ae%c0%ae/etc/passwd", "overlong UTF-8"),
]


def _listing(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def test_path_traversal_is_refused(shared: Shared) -> None:
    shared.up.files["/etc/passwd"] = b"root:x:0:0\n"
    shared.up.files["/secret"] = b"secret\n"
    hits = shared.total_hits()
    before = _listing(shared.root)
    failures = []
    for target, words in TRAVERSALS:
        r = request(shared.base, target)
        if r.status != 400 or not r.text.startswith("bad request path:") or words not in r.text:
            failures.append((target, r.status, r.text))
    assert failures == []
    assert shared.total_hits() == hits  # the upstream never saw any of them
    assert _listing(shared.root) == before
    assert not [e for e in Cache(shared.cache).iter_entries() if "passwd" in e.path or "secret" in e.path]


def test_absolute_form_target_is_refused(shared: Shared) -> None:
    hits = shared.total_hits()
    r = request(shared.base, f"{shared.up.url}/g/x")  # another port: a forward-proxy request
    assert r.status == 403
    assert "no upstream proxy is configured for 127.0.0.1; the build tried to reach it directly" in r.text
    assert shared.total_hits() == hits


# -- keys and methods --------------------------------------------------------------
@pytest.mark.parametrize("key", ["nope", "NOPE", "bad!key", "g.x"])
def test_unknown_key_is_404_naming_configured_keys(shared: Shared, key: str) -> None:
    hits = shared.total_hits()
    r = request(shared.base, f"/{key}/some/file.txt")
    assert r.status == 404
    assert f"no upstream proxy with key {key!r}" in r.text
    assert "(configured: g, pypi-mirror, root)" in r.text
    assert shared.total_hits() == hits


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_non_get_method_is_405(shared: Shared, method: str) -> None:
    shared.up.files["/f.txt"] = b"x"
    hits = shared.total_hits()
    r = request(shared.base, "/g/f.txt", method=method, headers={"Content-Length": "0"})
    assert r.status == 405
    assert r.headers["allow"] == "GET, HEAD"
    assert f"{method} is not allowed" in r.text
    assert shared.total_hits() == hits
    assert "f.txt" not in entries(shared.cache)


# -- malformed upstream index --------------------------------------------------------
MALFORMED = [
    b'{"name": "proj", "files": "not a list"}',
    b'{"name": "proj", "files": [{"filename": "proj-1.0.tar.gz", "url": "x", "hashes": "sha256=00"}]}',
    b'{"name": "proj", "files": [{"filename": "proj-1.0.tar.gz"}]}',
    b'{"name": "proj", "files": ["proj-1.0.tar.gz"]}',
    b'{"name": "proj"}',
    b'{"name": "proj", "files": [',
    b'<html><body><a href="proj-1.0.tar.gz">proj-1.0\xff\xfe.tar.gz</a></body></html>',
]


@pytest.mark.parametrize("case", range(len(MALFORMED)))
def test_malformed_pypi_index_is_502_and_nothing_stored(shared: Shared, case: int) -> None:
    up, project, body = shared.up, f"proj{case}", MALFORMED[case]
    up.files[f"/simple/{project}/"] = body
    up.files[f"/simple/{project}/proj-1.0.tar.gz"] = b"sdist"
    for target in (f"/pypi-mirror/simple/{project}/", f"/pypi-mirror/files/{project}/proj-1.0.tar.gz"):
        r = request(shared.base, target, headers={"Accept": "text/html"})
        assert r.status == 502, (target, r.status, r.text)
        assert "unreadable index page" in r.text or "is not an object" in r.text
        assert f"{up.url}/simple/{project}/" in r.text
    assert up.hits[f"/simple/{project}/"] == 2  # not stored, so asked again
    assert up.hits[f"/simple/{project}/proj-1.0.tar.gz"] == 0
    assert not [e for e in Cache(shared.cache).iter_entries("pypi-mirror") if project in e.path]
    assert sha(body) not in blob_names(shared.cache)


def test_malformed_root_index_is_502(shared: Shared) -> None:
    shared.up.files["/root/simple/"] = b'{"projects": 42}'
    r = request(shared.base, "/root/simple/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    assert r.status == 502 and "unreadable index page" in r.text
    assert list(Cache(shared.cache).iter_entries("root")) == []
    assert shared.up.hits["/root/simple/"] == 1


# -- a blob corrupted on disk -----------------------------------------------------------
@pytest.mark.parametrize("mode", ["record", "replay"])
def test_corrupt_blob_is_never_served(
    upstream: Upstream, make_proxy: MakeProxy, tmp_path: Path, mode: str
) -> None:
    data = os.urandom(200_000)
    upstream.files["/c.bin"] = data
    cache_dir = tmp_path / "cache"
    definition = proxy_def(key="g", format="generic", url=upstream.url)
    first = make_proxy(definition, cache=cache_dir)
    r = request(first.base_url, "/g/c.bin")
    assert (r.status, r.body) == (200, data)
    first.stop()
    blob = cache_dir / "blobs" / "sha256" / sha(data)[:2] / sha(data)
    assert blob.read_bytes() == data
    corrupt = bytes(b ^ 0x5A for b in data)
    with open(blob, "r+b") as f:  # same inode, same length, other bytes
        f.write(corrupt)
    assert blob.stat().st_size == len(data)

    second = make_proxy(definition, mode=mode, cache=cache_dir)  # a fresh Cache: re-hashes on first use
    r = request(second.base_url, "/g/c.bin")
    assert not r.body.startswith(corrupt[:1024])
    if mode == "record":
        assert (r.status, r.headers["x-upstream-cache"]) == (200, "miss")
        assert r.body == data
        assert upstream.hits["/c.bin"] == 2
        assert blob.read_bytes() == data
        assert entries(cache_dir) == {"c.bin": sha(data)}
    else:
        assert r.status == 504
        assert "was not recorded" in r.text
        assert upstream.hits["/c.bin"] == 1
        assert not blob.exists()  # removed, never to be served
        assert entries(cache_dir) == {}
    assert_blobs_intact(cache_dir)
