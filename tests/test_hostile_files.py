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

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.client import HTTPConnection
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from pytest_upstream.config.settings import ProxyDefinition
from pytest_upstream.engine.clock import ManualClock
from pytest_upstream.server.proxy_server import ProxyServer

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
