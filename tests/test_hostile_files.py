"""Hostile files and wrong-shaped answers (issue 10, part "files").

- A 200 that is not what the format expects (an HTML error page where an index, a packument,
  a manifest or maven-metadata.xml belongs; a manifest of another media type or digest) is an
  upstream failure: the stored copy is served marked stale, nothing replaces it, the lock
  records the good bytes; with nothing stored, a 502 that says why.
- Header values read from files (entry files, lock files, export archives, cassettes) are
  validated before use: a CR/LF planted in any of them is refused with an error naming the file.
- Bit rot: a blob changed in place (size and mtime kept) is caught when its ctime changes, and a
  blob whose stamp cannot show the change is re-hashed on the documented schedule.
"""

from __future__ import annotations

import io
import json
import os
import re
import socket
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.client import HTTPConnection
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from pytest_upstream.admin.archive import ArchiveRefused, export_archive, import_into
from pytest_upstream.admin.cassettes import CassetteError, read_cassette
from pytest_upstream.admin.verify import verify
from pytest_upstream.config.settings import ProxyDefinition
from pytest_upstream.engine.clock import ManualClock
from pytest_upstream.formats.base import Kind, Resource
from pytest_upstream.repro.lockfile import LockError, LockFile
from pytest_upstream.server.proxy_server import ProxyServer
from pytest_upstream.server.responses import Wire
from pytest_upstream.store.blobs import REVERIFY_AFTER, stamp_of
from pytest_upstream.store.cache import Cache
from pytest_upstream.store.entry import parse_entry
from pytest_upstream.store.headers import header_problem

from .conftest import MakeProxy, proxy_def
from .upstreams import FakeRegistry, Fault, Upstream

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode()
INDEX = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode()
BAD_GATEWAY = b"<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>"
HTML = {"Content-Type": "text/html"}

PYPI_PAGE = (
    b'<!DOCTYPE html><html><body><a href="/packages/demo-1.0.tar.gz#sha256=' + b"a" * 64 + b'">'
    b"demo-1.0.tar.gz</a></body></html>"
)
PACKUMENT = json.dumps(
    {
        "name": "demo",
        "dist-tags": {"latest": "1.0.0"},
        "versions": {"1.0.0": {"dist": {"tarball": "/demo/-/demo-1.0.0.tgz", "shasum": "b" * 40}}},
    }
).encode()
MAVEN_METADATA = b"<?xml version='1.0'?><metadata><groupId>org.demo</groupId></metadata>"


@dataclass(frozen=True)
class Response:
    status: int
    reason: str
    headers: dict[str, str]  # lower-case names
    body: bytes


def get(server: ProxyServer, path: str, headers: dict[str, str] | None = None) -> Response:
    conn = HTTPConnection("127.0.0.1", urlsplit(server.base_url).port, timeout=20)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return Response(resp.status, resp.reason, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


@dataclass(frozen=True)
class Case:
    """One format's metadata: where it lives, a good answer, and a wrong-shaped 200."""

    proxy: Callable[[str], ProxyDefinition]
    upstream_path: str  # what the proxy asks the upstream for
    client_path: str
    good: tuple[bytes, dict[str, str]]
    bad: Fault
    why: str  # a fragment of the reason given
    accept: str = ""


def _pypi(url: str) -> ProxyDefinition:
    return proxy_def(key="pypi", format="pypi", url=url + "/simple/", metadata_ttl=10)


def _npm(url: str) -> ProxyDefinition:
    return proxy_def(key="npm", format="npm", url=url, metadata_ttl=10)


def _maven(url: str) -> ProxyDefinition:
    return proxy_def(key="maven", format="maven", url=url, metadata_ttl=10)


def _docker(url: str) -> ProxyDefinition:
    return proxy_def(key="oci", format="docker", url=url, metadata_ttl=10)


ZERO_DIGEST = "sha256:" + "0" * 64
_MANIFEST_PATH = "/v2/demo/app/manifests/v1"
CASES = {
    "pypi-502-page": Case(
        _pypi, "/simple/demo/", "/pypi/simple/demo/", (PYPI_PAGE, HTML),
        Fault(200, BAD_GATEWAY, headers=HTML), "not a simple index",
    ),
    "pypi-html-as-json": Case(
        _pypi, "/simple/demo/", "/pypi/simple/demo/", (PYPI_PAGE, HTML),
        Fault(200, PYPI_PAGE, headers={"Content-Type": "application/vnd.pypi.simple.v1+json"}),
        "the body is not JSON",
    ),
    "npm-html": Case(
        _npm, "/demo", "/npm/demo", (PACKUMENT, {"Content-Type": "application/json"}),
        Fault(200, BAD_GATEWAY, headers=HTML), "is not JSON",
    ),
    "npm-no-versions": Case(
        _npm, "/demo", "/npm/demo", (PACKUMENT, {"Content-Type": "application/json"}),
        Fault(200, b'{"name": "demo"}', headers={"Content-Type": "application/json"}), "has no 'versions'",
    ),
    "maven-html": Case(
        _maven, "/org/demo/app/maven-metadata.xml", "/maven/org/demo/app/maven-metadata.xml",
        (MAVEN_METADATA, {"Content-Type": "application/xml"}), Fault(200, BAD_GATEWAY, headers=HTML),
        "not <metadata>",
    ),
    "docker-html": Case(
        _docker, _MANIFEST_PATH, "/v2/oci/demo/app/manifests/v1", (MANIFEST, {}),
        Fault(200, BAD_GATEWAY, headers=HTML), "did not answer a JSON object", accept=OCI_MANIFEST,
    ),
    "docker-wrong-media-type": Case(
        _docker, _MANIFEST_PATH, "/v2/oci/demo/app/manifests/v1", (MANIFEST, {}),
        Fault(200, INDEX, headers={"Content-Type": OCI_INDEX}), "which the client did not accept",
        accept=OCI_MANIFEST,
    ),
    "docker-type-disagrees-with-body": Case(
        _docker, _MANIFEST_PATH, "/v2/oci/demo/app/manifests/v1", (MANIFEST, {}),
        Fault(200, INDEX, headers={"Content-Type": OCI_MANIFEST}), "for a manifest of type",
        accept=OCI_MANIFEST,
    ),
    "docker-digest-mismatch": Case(
        _docker, _MANIFEST_PATH, "/v2/oci/demo/app/manifests/v1", (MANIFEST, {}),
        Fault(200, MANIFEST, headers={"Content-Type": OCI_MANIFEST, "Docker-Content-Digest": ZERO_DIGEST}),
        "digest mismatch", accept=OCI_MANIFEST,
    ),
}  # fmt: skip


@pytest.fixture
def upstream_for(request: pytest.FixtureRequest) -> Iterator[Callable[[Case], Upstream]]:
    started: list[Upstream] = []

    def make(case: Case) -> Upstream:
        if case.proxy is _docker:
            reg = FakeRegistry()
            reg.add_manifest("demo/app", "v1", (OCI_MANIFEST, case.good[0]))
            up: Upstream = reg
        else:
            up = Upstream()
            up.files[case.upstream_path] = case.good[0]
            up.content_types[case.upstream_path] = case.good[1].get(
                "Content-Type", "application/octet-stream"
            )
        started.append(up.start())
        return up

    yield make
    for up in started:
        up.stop()


@pytest.mark.parametrize("name", list(CASES))
def test_a_wrong_shaped_200_serves_the_stale_copy_and_replaces_nothing(
    name: str, make_proxy: MakeProxy, upstream_for: Callable[[Case], Upstream], tmp_path: Path
) -> None:
    case = CASES[name]
    up = upstream_for(case)
    clock = ManualClock()
    proxy = make_proxy(case.proxy(up.url), clock=clock)
    accept = {"Accept": case.accept} if case.accept else {}
    first = get(proxy, case.client_path, accept)
    assert (first.status, first.headers["x-upstream-cache"]) == (200, "miss"), first.body
    stored = proxy.engine.cache.lookup(*_identity(proxy))
    assert stored is not None

    up.faults[case.upstream_path] = case.bad
    clock.advance(60)  # past the metadata TTL
    again = get(proxy, case.client_path, accept)
    assert again.status == 200
    assert again.headers["x-upstream-cache"] == "stale"
    assert case.why in again.headers["x-upstream-error"]
    assert again.body == first.body  # the good copy, rendered as before
    assert up.hits[case.upstream_path] == 2  # it was asked, and its answer refused
    assert proxy.engine.cache.lookup(*_identity(proxy)) == stored  # nothing replaced it
    locked = [e for e in proxy.engine.recorded_lock() if e.path == stored.path]
    assert [e.sha256 for e in locked] == [stored.sha256]  # the lock names the good bytes

    # With nothing stored: a 502 that says why, and still nothing stored.
    cold = make_proxy(case.proxy(up.url), cache=tmp_path / "cold")
    refused = get(cold, case.client_path, accept)
    assert refused.status == 502
    assert case.why in refused.body.decode()
    assert refused.reason in ("Upstream answer unusable", "Upstream bytes failed verification")
    assert list(cold.engine.cache.iter_entries()) == []
    assert list(cold.engine.recorded_lock()) == []


def _identity(proxy: ProxyServer) -> tuple[str, str, str]:
    entries = list(proxy.engine.cache.iter_entries())
    metadata = [e for e in entries if e.is_metadata]
    assert len(metadata) == 1, entries
    return metadata[0].key, metadata[0].path, metadata[0].variant


def test_a_simple_index_without_links_is_accepted_when_it_declares_its_version(
    make_proxy: MakeProxy,
) -> None:
    """A project with no files left is a valid page: PEP 629's meta tag says it is an index."""
    empty = (
        b'<!DOCTYPE html><html><head><meta name="pypi:repository-version" content="1.1">'
        b"<title>Links for demo</title></head><body><h1>Links for demo</h1></body></html>"
    )
    with Upstream() as up:
        up.files["/simple/demo/"] = empty
        up.content_types["/simple/demo/"] = "text/html"
        proxy = make_proxy(_pypi(up.url))
        assert get(proxy, "/pypi/simple/demo/").status == 200


# -- header values from files ----------------------------------------------------------------
INJECTED = "text/plain\r\nX-Injected: yes"


def _generic(url: str) -> ProxyDefinition:
    return proxy_def(key="g", format="generic", url=url)


def _entry_file(cache: Path) -> Path:
    (found,) = (cache / "entries" / "g").glob("*/*.json")
    return found


def _rewrite_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_bytes())
    data.update(changes)
    tmp = path.with_suffix(".new")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


@pytest.mark.parametrize(
    ("field", "value", "why"),
    [
        (
            "content_type",
            INJECTED,
            "field 'content_type': header Content-Type holds the control character '\\r'",
        ),
        ("last_modified", "Mon\nSet-Cookie: a=b", "field 'last_modified'"),
        ("etag", '"x"\x00', "field 'etag'"),
        ("headers", {"Set-Cookie": "a=b"}, "header 'Set-Cookie' is not one the proxy keeps"),
        ("headers", {"Link": "<a>\r\nX-Injected: yes"}, "header Link holds the control character"),
        ("headers", {"Link": "x" * 9000}, "at most 8192"),
        ("upstream_url", "http://h/a\r\nX: y", "field 'upstream_url'"),
    ],
)
def test_a_tampered_entry_file_is_refused_and_never_served(
    field: str,
    value: object,
    why: str,
    make_proxy: MakeProxy,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with Upstream() as up:
        up.files["/a.txt"] = b"hello"
        up.content_types["/a.txt"] = "text/plain"
        proxy = make_proxy(_generic(up.url), cache=tmp_path / "cache")
        assert get(proxy, "/g/a.txt").status == 200
        entry_file = _entry_file(tmp_path / "cache")
        _rewrite_json(entry_file, **{field: value})
        with pytest.raises(ValueError, match=re.escape(why)):
            parse_entry(entry_file.read_bytes(), "g", entry_file.name)
        again = get(proxy, "/g/a.txt")
        assert (again.status, again.body, again.headers["x-upstream-cache"]) == (200, b"hello", "miss")
        assert "x-injected" not in again.headers and "set-cookie" not in again.headers
        assert up.hits["/a.txt"] == 2  # the bad entry counted as absent: fetched again over it
        assert f"ignoring the entry file {entry_file}" in caplog.text
    assert verify(Cache(tmp_path / "cache")).ok  # the refetch replaced it with a good one


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ({"content_type": INJECTED}, "field 'content_type': header Content-Type holds the control character"),
        ({"headers": [["Docker-Content-Digest", "sha256:x\r\nX-Injected: yes"]]}, "holds the control"),
        ({"headers": [["Set-Cookie", "a=b"]]}, "header 'Set-Cookie' is not one the proxy keeps"),
        ({"headers": [["X Bad", "a"]]}, "is not a valid header name"),
        ({"size": "12"}, "field 'size' is not a non-negative integer"),
    ],
)
def test_a_lock_file_with_a_bad_header_is_refused_naming_file_and_entry(
    line: dict[str, object], why: str, tmp_path: Path
) -> None:
    good = {"key": "g", "path": "a.txt", "variant": "", "sha256": "a" * 64, "size": 5, "kind": "artifact"}
    path = tmp_path / "upstream.lock"
    path.write_text(json.dumps({"version": 1, "entries": [good, {**good, "path": "b.txt", **line}]}))
    with pytest.raises(LockError, match=re.escape(f"{path}: entry 2: ") + ".*" + re.escape(why)):
        LockFile.load(path)
    path.write_text(json.dumps({"version": 1, "entries": [good]}))
    assert len(LockFile.load(path)) == 1


def test_an_archive_with_a_tampered_entry_is_refused_and_imports_nothing(
    make_proxy: MakeProxy, tmp_path: Path
) -> None:
    with Upstream() as up:
        up.files["/a.txt"] = b"hello"
        proxy = make_proxy(_generic(up.url), cache=tmp_path / "cache")
        assert get(proxy, "/g/a.txt").status == 200
    archive, tampered = tmp_path / "cache.tar", tmp_path / "tampered.tar"
    export_archive(Cache(tmp_path / "cache"), archive)
    with tarfile.open(archive) as src, tarfile.open(tampered, "w", format=tarfile.GNU_FORMAT) as out:
        for member in src:
            data = src.extractfile(member) if member.isreg() else None
            if data is not None and member.name.startswith("entries/"):
                raw = json.loads(data.read())
                raw["content_type"] = INJECTED
                body = json.dumps(raw).encode()
                member.size = len(body)
                out.addfile(member, io.BytesIO(body))
            else:
                out.addfile(member, data)
    with pytest.raises(
        ArchiveRefused, match=r"tampered\.tar: refused, nothing imported: entries/g/.*content_type"
    ):
        import_into(tmp_path / "new", tampered)
    assert not (tmp_path / "new" / "VERSION").exists()


def test_a_cassette_with_a_header_line_break_is_refused_by_name(tmp_path: Path) -> None:
    pytest.importorskip("vcr")
    cassette = tmp_path / "c.yaml"
    cassette.write_text(
        "interactions:\n"
        "- request: {body: null, headers: {}, method: GET, uri: 'http://127.0.0.1:1/a.txt'}\n"
        "  response:\n"
        "    body: {string: hello}\n"
        '    headers: {Content-Type: ["text/plain\\r\\nX-Injected: yes"]}\n'
        "    status: {code: 200, message: OK}\n"
        "version: 1\n"
    )
    with pytest.raises(
        CassetteError, match=re.escape(f"{cassette}: interaction 0: refused: header Content-Type")
    ):
        read_cassette(cassette)


def test_the_server_never_sends_a_header_value_with_a_line_break() -> None:
    """The last line of defence (server/responses.py): whatever a bug lets through is dropped."""
    a, b = socket.socketpair()
    with a, b:
        Wire(a).whole(200, {"X-Ok": "fine", "X-Bad": "a\r\nX-Injected: yes", "X-Nul": "a\x00"}, b"")
        head = b.recv(65536)
    assert b"X-Ok: fine\r\n" in head
    assert b"X-Injected" not in head and b"X-Bad" not in head and b"X-Nul" not in head


def test_every_kept_header_can_be_read_back() -> None:
    """A format keeping a header the file readers refuse would poison its own entries."""
    with pytest.raises(ValueError, match="KEPT_HEADERS"):
        Resource("p", "http://h/p", Kind.METADATA, keep_headers=("Set-Cookie",))
    assert header_problem("Docker-Content-Digest", "sha256:" + "0" * 64) == ""


# -- bit rot ----------------------------------------------------------------------------------
def _rot_in_place(blob: Path) -> os.stat_result:
    """Change a blob's bytes keeping its size and mtime, as a careless (or hostile) edit would."""
    before = blob.stat()
    time.sleep(0.03)  # past the kernel's coarse file clock tick: the ctime will differ
    blob.chmod(0o644)
    with open(blob, "r+b") as f:
        f.write(b"J")
    os.utime(blob, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = blob.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    return after


def test_a_blob_changed_in_place_keeping_size_and_mtime_is_caught_by_its_ctime(
    make_proxy: MakeProxy, tmp_path: Path
) -> None:
    with Upstream() as up:
        up.files["/a.txt"] = b"hello"
        proxy = make_proxy(_generic(up.url), cache=tmp_path / "cache")
        assert get(proxy, "/g/a.txt").body == b"hello"
        entry = proxy.engine.cache.lookup("g", "a.txt")
        assert entry is not None
        blob = proxy.engine.cache.blob_path(entry.sha256)
        _rot_in_place(blob)
        # another process (a new CI job): its marker no longer matches the stamp
        assert Cache(tmp_path / "cache").verified_digest(entry.sha256, entry.size) is None
        assert not blob.exists()  # found corrupt and removed
        blob.parent.mkdir(parents=True, exist_ok=True)
        # the same process, which hashed it before: the ctime in its memo no longer matches
        assert get(proxy, "/g/a.txt").body == b"hello"
        _rot_in_place(blob)
        again = get(proxy, "/g/a.txt")
        assert (again.status, again.body, again.headers["x-upstream-cache"]) == (200, b"hello", "miss")
        assert up.hits["/a.txt"] == 3  # fetched again each time, never served rotten


def test_a_blob_rotting_under_an_unchanged_stamp_is_rehashed_on_schedule(
    make_proxy: MakeProxy, tmp_path: Path
) -> None:
    """The case no stamp can see (the disk flips bits): trusted for REVERIFY_AFTER, then re-hashed."""
    with Upstream() as up:
        up.files["/a.txt"] = b"hello"
        proxy = make_proxy(_generic(up.url), cache=tmp_path / "cache")
        assert get(proxy, "/g/a.txt").body == b"hello"
        cache = proxy.engine.cache
        entry = cache.lookup("g", "a.txt")
        assert entry is not None
        blob = cache.blob_path(entry.sha256)
        hashed_at = cache.verifier.known(entry.sha256, stamp_of(blob.stat()))
        assert hashed_at is not None
        rotten = stamp_of(_rot_in_place(blob))
        # what a silent bit flip looks like: the remembered stamp is still the file's stamp
        cache.verifier.remember(entry.sha256, rotten, marker=True, hashed_at=hashed_at)
        assert get(proxy, "/g/a.txt").body == b"Jello"  # within the schedule: what docs/cache.md admits
        start = cache.verifier.now()
        cache.verifier.now = lambda: start + REVERIFY_AFTER + 1
        late = get(proxy, "/g/a.txt")
        assert (late.body, late.headers["x-upstream-cache"]) == (b"hello", "miss")  # re-hashed, refetched
        assert up.hits["/a.txt"] == 2
        # the marker counts from the hash it records: a new process past the schedule hashes too
        fresh = Cache(tmp_path / "cache")
        new_stamp = stamp_of(blob.stat())
        assert fresh.verifier.known(entry.sha256, new_stamp) is not None  # just hashed by the refetch
        fresh.verifier.now = lambda: time.time() + REVERIFY_AFTER + 10
        assert fresh.verifier.known(entry.sha256, new_stamp) is None


def test_an_upstream_header_the_readers_would_refuse_is_not_stored(make_proxy: MakeProxy) -> None:
    """Else every later read of the entry would fail and the file be fetched again and again."""
    with Upstream() as up:
        up.files["/a.txt"] = b"hello"
        up.faults["/a.txt"] = Fault(200, b"hello", headers={"Last-Modified": "x" * 9000})
        proxy = make_proxy(_generic(up.url))
        assert get(proxy, "/g/a.txt").status == 200
        entry = proxy.engine.cache.lookup("g", "a.txt")
        assert entry is not None and entry.last_modified is None
        again = get(proxy, "/g/a.txt")
        assert (again.body, again.headers["x-upstream-cache"]) == (b"hello", "hit")
        assert up.hits["/a.txt"] == 1
