"""The npm format: name rules, rewriting, Accept negotiation, SRI digests, failure
handling against a fake upstream, and a real npm install through the proxy from a
real registry (verdaccio), recorded and then replayed with the registry gone."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from subprocess import PIPE
from typing import Any
from urllib.parse import urlsplit

import pytest

from pytest_upstream.config.sources import BUILTIN_SOURCES
from pytest_upstream.formats.base import MalformedUpstream
from pytest_upstream.formats.npm_packuments import (
    ABBREVIATED,
    InvalidName,
    PackageName,
    abbreviate,
    choose_representation,
    expected_digests,
    parse_name,
    parse_packument,
    rewrite_tarballs,
    split_name,
    sri_to_hex,
)
from pytest_upstream.messages import BadPath, split_proxy_path
from pytest_upstream.pytest_plugin.harness import exported_env
from pytest_upstream.server.proxy_server import ProxyServer
from pytest_upstream.store.cache import Cache

from .conftest import MakeProxy, proxy_def
from .peers import free_port, require_peer, wait_http
from .upstreams import Upstream

ROOT = Path(__file__).resolve().parent.parent
VERDACCIO = ROOT / ".peers" / "npm" / "node_modules" / ".bin" / "verdaccio"
CORGI = "application/vnd.npm.install-v1+json; q=1.0, application/json; q=0.8, */*"


# -- helpers ------------------------------------------------------------------
@dataclass
class Response:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def fetch(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> Response:
    """One request; the path goes on the request line exactly as given (no normalisation)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=20)
    try:
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        conn.request(method, target, body=b"{}" if method in ("PUT", "POST") else None, headers=headers or {})
        resp = conn.getresponse()
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()


def sri(data: bytes, algo: str = "sha512") -> str:
    return f"{algo}-" + base64.b64encode(hashlib.new(algo, data).digest()).decode()


def manifest(name: str, version: str, tarball_url: str, data: bytes, **extra: object) -> dict[str, object]:
    return {
        "name": name,
        "version": version,
        "readme": "long text the abbreviated form drops",
        "dist": {
            "tarball": tarball_url,
            "integrity": sri(data),
            "shasum": hashlib.sha1(data).hexdigest(),
        },
        **extra,
    }


def packument(name: str, versions: dict[str, dict[str, object]], latest: str) -> bytes:
    return json.dumps(
        {
            "_id": name,
            "name": name,
            "dist-tags": {"latest": latest},
            "versions": versions,
            "time": {"modified": "2024-01-02T03:04:05.000Z"},
            "readme": "top-level readme",
        }
    ).encode()


def entry_paths(cache_dir: Path) -> set[str]:
    return {e.path for e in Cache(cache_dir).iter_entries()}


# -- names and paths ----------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("lodash", PackageName("lodash")),
        ("@demo/util", PackageName("util", "demo")),
        ("JSONStream", PackageName("JSONStream")),  # a legacy capitalised name that installs still need
        ("a.b-c_d~e", PackageName("a.b-c_d~e")),
        ("x" * 214, PackageName("x" * 214)),
        ("@types/node", PackageName("node", "types")),
    ],
)
def test_valid_names(text: str, expected: PackageName) -> None:
    assert parse_name(text) == expected
    assert parse_name(text).full == text


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "cannot be empty"),
        ("x" * 215, "longer than 214"),
        (".hidden", "cannot start with a period or an underscore"),
        ("_private", "cannot start with a period or an underscore"),
        ("node_modules", "reserved"),
        ("favicon.ico", "reserved"),
        ("@demo", "must have the form @scope/name"),
        ("@/util", "must have the form @scope/name"),
        ("@demo/", "must have the form @scope/name"),
        ("@demo/a/b", "URL-friendly"),
        ("a/b", "URL-friendly"),
        ("with space", "URL-friendly"),
        ("caf\u00e9", "URL-friendly"),
        ("a%2fb", "URL-friendly"),
        ("@demo/.x", "cannot start with a period"),
        ("@../x", "cannot start with a period"),
    ],
)
def test_invalid_names(text: str, words: str) -> None:
    with pytest.raises(InvalidName, match=words.replace(".", r"\.")):
        parse_name(text)


def test_escaped_name_and_tarball_file() -> None:
    assert PackageName("util", "demo").escaped == "@demo%2futil"
    assert PackageName("lodash").escaped == "lodash"
    assert PackageName("util", "demo").tarball_file("1.0.0") == "util-1.0.0.tgz"  # npm leaves the scope out


def test_split_name() -> None:
    assert split_name(["lodash"]) == ("lodash", [])
    assert split_name(["@demo", "util"]) == ("@demo/util", [])
    assert split_name(["@demo", "util", "-", "util-1.0.0.tgz"]) == ("@demo/util", ["-", "util-1.0.0.tgz"])
    assert split_name(["lodash", "4.17.21"]) == ("lodash", ["4.17.21"])


def test_split_proxy_path_allows_one_encoded_slash_in_an_npm_scope() -> None:
    assert split_proxy_path("/npm/@demo%2futil") == ("npm", "@demo/util")
    assert split_proxy_path("/npm/@demo%2Futil") == ("npm", "@demo/util")
    assert split_proxy_path("/npm/@demo/util") == ("npm", "@demo/util")
    assert split_proxy_path("/npm/@demo%2futil/-/util-1.0.0.tgz") == ("npm", "@demo/util/-/util-1.0.0.tgz")


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ("/npm/a%2fb", "encoded slashes"),  # not a scope
        ("/npm/x@demo%2futil", "encoded slashes"),  # '@' not at the start of the segment
        ("/npm/%40demo%2futil", "encoded slashes"),  # the '@' itself encoded
        ("/npm/@demo%2futil%2fx", "encoded slashes"),  # two of them
        ("/npm/@demo%2f", "encoded slashes"),  # an empty name half
        ("/npm/@%2futil", "encoded slashes"),  # an empty scope half
        ("/@demo%2futil/x", "encoded slashes"),  # not in the key segment
        ("/npm/@demo/util/-/%40x%2f..", "encoded slashes"),
        ("/npm/@demo%2f..", "'..' path segments"),
        ("/npm/@demo%2f%2e%2e", "'..' path segments"),
        ("/npm/@demo%2f.", "'..' path segments"),
        ("/npm/@demo%5cutil", "encoded slashes"),
    ],
)
def test_split_proxy_path_still_refuses_other_encoded_slashes(raw: str, words: str) -> None:
    with pytest.raises(BadPath, match=words):
        split_proxy_path(raw)


# -- digests --------------------------------------------------------------------
def test_sri_to_hex() -> None:
    data = b"tarball bytes"
    assert sri_to_hex(sri(data)) == {"sha512": hashlib.sha512(data).hexdigest()}
    both = f"{sri(data)} {sri(data, 'sha1')}?opt md5-AAAA"  # several tokens; options; unknown algorithm
    assert sri_to_hex(both) == {
        "sha512": hashlib.sha512(data).hexdigest(),
        "sha1": hashlib.sha1(data).hexdigest(),
    }
    assert sri_to_hex("") == {}
    with pytest.raises(MalformedUpstream, match="not valid base64"):
        sri_to_hex("sha512-!!!!")
    with pytest.raises(MalformedUpstream, match="wrong length"):
        sri_to_hex("sha512-" + base64.b64encode(b"short").decode())


def test_expected_digests() -> None:
    data = b"x"
    sha1 = hashlib.sha1(data).hexdigest()
    assert expected_digests({"integrity": sri(data), "shasum": sha1.upper()}) == {
        "sha512": hashlib.sha512(data).hexdigest(),
        "sha1": sha1,
    }
    assert expected_digests({"shasum": sha1}) == {"sha1": sha1}
    assert expected_digests({}) == {}
    with pytest.raises(MalformedUpstream, match="disagree"):
        expected_digests({"integrity": sri(b"other", "sha1"), "shasum": sha1})
    with pytest.raises(MalformedUpstream, match="not a sha1"):
        expected_digests({"shasum": "xyz"})


# -- Accept and rendering --------------------------------------------------------------
@pytest.mark.parametrize(
    ("accept", "rep"),
    [
        (None, "full"),
        ("", "full"),
        ("application/json", "full"),
        ("*/*", "full"),
        ("text/html", "full"),  # nothing we offer: the registry's default, full JSON
        (ABBREVIATED, "abbreviated"),
        (CORGI, "abbreviated"),  # what npm/pacote send for the abbreviated form
        (f"{ABBREVIATED}; q=0.5, application/json", "full"),
        (f"{ABBREVIATED}; q=0, */*", "full"),
        (f"application/json; q=0.5, {ABBREVIATED}", "abbreviated"),
    ],
)
def test_choose_representation(accept: str | None, rep: str) -> None:
    assert choose_representation(accept) == rep


def _doc() -> Any:
    return json.loads(
        packument(
            "@demo/util",
            {
                "1.0.0": manifest(
                    "@demo/util",
                    "1.0.0",
                    "https://elsewhere.invalid/tarballs/util-1.0.0.tgz",
                    b"one",
                    scripts={"postinstall": "node x.js", "test": "true"},
                    dependencies={"demo-base": "^1.0.0"},
                    os=["linux"],
                ),
                "1.1.0-rc.1+build": manifest("@demo/util", "1.1.0-rc.1+build", "/relative.tgz", b"two"),
            },
            latest="1.0.0",
        )
    )


def test_rewrite_tarballs_to_absolute_proxy_urls() -> None:
    doc = rewrite_tarballs(_doc(), parse_name("@demo/util"), "http://127.0.0.1:9/npm")
    versions = doc["versions"]
    assert versions["1.0.0"]["dist"]["tarball"] == "http://127.0.0.1:9/npm/@demo/util/-/util-1.0.0.tgz"
    assert (
        versions["1.1.0-rc.1+build"]["dist"]["tarball"]
        == "http://127.0.0.1:9/npm/@demo/util/-/util-1.1.0-rc.1+build.tgz"
    )
    assert versions["1.0.0"]["dist"]["integrity"] == sri(b"one")  # digests untouched


def test_abbreviate() -> None:
    short = abbreviate(_doc())
    assert set(short) == {"name", "modified", "dist-tags", "versions"}
    assert short["modified"] == "2024-01-02T03:04:05.000Z"
    v1 = short["versions"]["1.0.0"]
    assert v1["hasInstallScript"] is True
    assert v1["dependencies"] == {"demo-base": "^1.0.0"} and v1["os"] == ["linux"]
    assert "readme" not in v1 and "scripts" not in v1
    assert "hasInstallScript" not in short["versions"]["1.1.0-rc.1+build"]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"name": "other", "versions": {}}', "names another package"),
        (b'{"name": "demo"}', "has no 'versions'"),
        (b'{"name": "demo", "versions": []}', "'versions' is not an object"),
        (b'{"name": "demo", "versions": {"1.0.0": 3}}', "is not an object"),
        (b'{"name": "demo", "versions": {"1.0.0": {}}}', "has no 'dist' object"),
        (b'{"name": "demo", "versions": {"1.0.0": {"dist": {"shasum": "x"}}}}', "has no 'dist.tarball'"),
        (b'{"name": "demo", "versions": {}, "dist-tags": {"latest": 1}}', "'dist-tags'"),
    ],
)
def test_parse_packument_refuses_malformed(body: bytes, words: str) -> None:
    with pytest.raises(MalformedUpstream, match=words):
        parse_packument(body, "demo")


def test_parse_packument_accepts_an_unpublished_package() -> None:
    doc = parse_packument(b'{"name": "gone", "time": {"unpublished": {"time": "2020"}}}', "gone")
    assert doc["versions"] == {}


# -- against a fake upstream ---------------------------------------------------------
class Registry:
    """A fake registry on ``Upstream`` with demo-base 1.0.0 and @demo/util 1.0.0.

    Its tarball URLs use a layout of its own (``/files/...``): the proxy must
    find them through the packument, not by guessing.
    """

    BASE = b"base tarball bytes"
    UTIL = b"util tarball bytes"

    def __init__(self, up: Upstream) -> None:
        self.up = up
        self.set_base(self.BASE)
        util_url = f"{up.url}/files/util.tgz"
        up.files["/@demo%2futil"] = packument(
            "@demo/util", {"1.0.0": manifest("@demo/util", "1.0.0", util_url, self.UTIL)}, "1.0.0"
        )
        up.files["/files/util.tgz"] = self.UTIL

    def set_base(self, published: bytes, served: bytes | None = None) -> None:
        """Publish demo-base with the digests of ``published``; serve ``served`` as its tarball."""
        url = f"{self.up.url}/files/base-1.0.0.tgz"
        self.up.files["/demo-base"] = packument(
            "demo-base", {"1.0.0": manifest("demo-base", "1.0.0", url, published)}, "1.0.0"
        )
        self.up.files["/files/base-1.0.0.tgz"] = published if served is None else served


@pytest.fixture(scope="module")
def shared_upstream() -> Iterator[Upstream]:
    with Upstream() as up:  # one for the module: stopping a server costs half a second
        yield up


@pytest.fixture
def registry(shared_upstream: Upstream) -> Registry:
    up = shared_upstream
    with up.lock:
        up.files.clear()
        up.faults.clear()
        up.hits.clear()
        up.request_headers.clear()
    return Registry(up)


def npm_proxy(make_proxy: MakeProxy, up: Upstream, **kw: object) -> ProxyServer:
    return make_proxy(proxy_def(key="npm", format="npm", url=up.url + "/", **kw))


def test_packument_full_and_abbreviated_from_one_upstream_fetch(
    registry: Registry, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    server = npm_proxy(make_proxy, registry.up)
    url = server.url("npm")
    full = fetch(url + "demo-base", headers={"Accept": "application/json"})
    assert full.status == 200, full.body
    assert full.headers["content-type"] == "application/json"
    assert full.headers["vary"] == "Accept"
    doc = full.json()
    assert doc["readme"] == "top-level readme"  # the full document
    tarball = doc["versions"]["1.0.0"]["dist"]["tarball"]
    assert tarball == f"{url}demo-base/-/demo-base-1.0.0.tgz"

    short = fetch(url + "demo-base", headers={"Accept": CORGI})
    assert (short.status, short.headers["content-type"]) == (200, ABBREVIATED)
    assert short.headers["x-upstream-cache"] == "hit"
    assert set(short.json()) == {"name", "modified", "dist-tags", "versions"}
    assert short.json()["versions"]["1.0.0"]["dist"]["tarball"] == tarball
    assert registry.up.hits["/demo-base"] == 1  # one stored copy serves both forms
    sent = dict(registry.up.request_headers)["/demo-base"]
    assert sent["Accept"] == "application/json" and sent["Accept-Encoding"] == "identity"
    assert entry_paths(tmp_path / "cache") == {"demo-base"}


def test_tarball_urls_follow_the_address_the_client_used(registry: Registry, make_proxy: MakeProxy) -> None:
    server = npm_proxy(make_proxy, registry.up)
    port = urlsplit(server.base_url).port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"127.0.0.1:{port}"):
        r = fetch(f"http://127.0.0.1:{port}/npm/demo-base", headers={"Host": host})
        tarball = r.json()["versions"]["1.0.0"]["dist"]["tarball"]
        assert tarball == f"http://{host}/npm/demo-base/-/demo-base-1.0.0.tgz"
    assert registry.up.hits["/demo-base"] == 1


def test_scoped_packument_in_both_spellings(registry: Registry, make_proxy: MakeProxy) -> None:
    server = npm_proxy(make_proxy, registry.up)
    a = fetch(server.url("npm") + "@demo%2futil")
    b = fetch(server.url("npm") + "@demo/util")
    assert a.status == b.status == 200
    assert a.body == b.body
    tarball = a.json()["versions"]["1.0.0"]["dist"]["tarball"]
    assert tarball == server.url("npm") + "@demo/util/-/util-1.0.0.tgz"
    assert registry.up.hits["/@demo%2futil"] == 1  # the upstream is asked the way npm asks


def test_tarball_verified_and_cached(registry: Registry, make_proxy: MakeProxy, tmp_path: Path) -> None:
    server = npm_proxy(make_proxy, registry.up)
    url = server.url("npm") + "@demo/util/-/util-1.0.0.tgz"  # before the client ever read the packument
    first = fetch(url)
    assert (first.status, first.body, first.headers["x-upstream-cache"]) == (200, Registry.UTIL, "miss")
    second = fetch(url)
    assert (second.status, second.body, second.headers["x-upstream-cache"]) == (200, Registry.UTIL, "hit")
    assert registry.up.hits["/files/util.tgz"] == 1
    assert entry_paths(tmp_path / "cache") == {"@demo/util", "@demo/util/-/util-1.0.0.tgz"}


def test_tarball_digest_mismatch_is_502_and_nothing_stored(
    registry: Registry, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    registry.set_base(Registry.BASE, served=b"tampered bytes!!!!")
    server = npm_proxy(make_proxy, registry.up)
    url = server.url("npm") + "demo-base/-/demo-base-1.0.0.tgz"
    r = fetch(url)
    assert r.status == 502
    assert "sha" in r.json()["error"]
    assert "demo-base/-/demo-base-1.0.0.tgz" not in entry_paths(tmp_path / "cache")
    blobs = {p.name for p in (tmp_path / "cache" / "blobs").rglob("*") if p.is_file()}
    assert hashlib.sha256(b"tampered bytes!!!!").hexdigest() not in blobs
    r = fetch(url)  # not remembered: the next request tries the upstream again
    assert r.status == 502
    assert registry.up.hits["/files/base-1.0.0.tgz"] == 2


def test_shasum_alone_is_verified(registry: Registry, make_proxy: MakeProxy) -> None:
    doc = json.loads(registry.up.files["/demo-base"])
    del doc["versions"]["1.0.0"]["dist"]["integrity"]
    registry.up.files["/demo-base"] = json.dumps(doc).encode()
    registry.up.files["/files/base-1.0.0.tgz"] = b"other bytes"
    server = npm_proxy(make_proxy, registry.up)
    r = fetch(server.url("npm") + "demo-base/-/demo-base-1.0.0.tgz")
    assert r.status == 502 and "sha1" in r.json()["error"]


def test_tarball_without_any_digest_is_refused(registry: Registry, make_proxy: MakeProxy) -> None:
    doc = json.loads(registry.up.files["/demo-base"])
    dist = doc["versions"]["1.0.0"]["dist"]
    del dist["integrity"], dist["shasum"]
    registry.up.files["/demo-base"] = json.dumps(doc).encode()
    server = npm_proxy(make_proxy, registry.up)
    r = fetch(server.url("npm") + "demo-base/-/demo-base-1.0.0.tgz")
    assert r.status == 502 and "unverifiable" in r.json()["error"]
    assert registry.up.hits["/files/base-1.0.0.tgz"] == 0


def test_malformed_packument_is_502_and_nothing_stored(
    registry: Registry, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    server = npm_proxy(make_proxy, registry.up)
    for body in (
        b'{"name": "demo-base", "versions": {"1.0.0": {"name": "demo-base"',  # cut short
        b'{"name": "demo-base", "versions": {"1.0.0": {"dist": {}}}}',  # no tarball
        b'{"name": "someone-else", "versions": {}}',
    ):
        registry.up.files["/demo-base"] = body
        for path in ("demo-base", "demo-base/-/demo-base-1.0.0.tgz"):
            r = fetch(server.url("npm") + path)
            assert r.status == 502, (body, path, r.body)
            assert r.headers["content-type"] == "application/json"
        assert entry_paths(tmp_path / "cache") == set()
    assert registry.up.hits["/demo-base"] == 6  # nothing was stored, so every request asked again
    assert registry.up.hits["/files/base-1.0.0.tgz"] == 0


def test_unlisted_tarball_is_404_and_never_fetched(registry: Registry, make_proxy: MakeProxy) -> None:
    server = npm_proxy(make_proxy, registry.up)
    for path in (
        "demo-base/-/demo-base-9.9.9.tgz",
        "demo-base/-/../../files/util.tgz",
        "demo-base/-/util.tgz",
    ):
        r = fetch(server.url("npm") + path)
        assert r.status in (400, 404), (path, r.status)
    assert registry.up.hits["/files/util.tgz"] == 0


BAD_REQUESTS = [
    ("/npm/@demo%2f..", "'..' path segments"),
    ("/npm/@demo%2f%2e%2e/-/x.tgz", "'..' path segments"),
    ("/npm/..%2fetc%2fpasswd", "encoded slashes"),
    ("/npm/@demo%2futil%2f..", "encoded slashes"),
    ("/npm/@..%2f..", "'..' path segments"),
    ("/npm/@..%2fetc", "cannot start with a period"),  # passes the path layer, not npm's rules
    ("/npm/.hidden", "cannot start with a period"),
    ("/npm/_private", "cannot start with a period or an underscore"),
    ("/npm/@demo", "must have the form @scope/name"),
    ("/npm/with%20space", "URL-friendly"),
    ("/npm/" + "x" * 215, "longer than 214"),
    ("/npm/node_modules", "reserved"),
    ("/npm/@demo/-/../../files/util.tgz", "'..' path segments"),
]


def test_traversal_and_invalid_names_are_400(
    registry: Registry, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    server = npm_proxy(make_proxy, registry.up)
    failures = []
    for path, words in BAD_REQUESTS:
        r = fetch(server.base_url + path)
        if r.status != 400 or words not in r.body.decode():
            failures.append((path, r.status, r.body))
    assert failures == []
    assert sum(registry.up.hits.values()) == 0
    assert entry_paths(tmp_path / "cache") == set()


def test_version_manifest(registry: Registry, make_proxy: MakeProxy) -> None:
    server = npm_proxy(make_proxy, registry.up)
    for spec in ("1.0.0", "latest"):
        r = fetch(server.url("npm") + f"demo-base/{spec}")
        assert r.status == 200, r.body
        data = r.json()
        assert data["version"] == "1.0.0"
        assert data["dist"]["tarball"] == server.url("npm") + "demo-base/-/demo-base-1.0.0.tgz"
    r = fetch(server.url("npm") + "demo-base/2.0.0")
    assert r.status == 404 and "no version or dist-tag '2.0.0'" in r.json()["error"]
    assert registry.up.hits["/demo-base"] == 1


def test_unsupported_endpoints(registry: Registry, make_proxy: MakeProxy) -> None:
    server = npm_proxy(make_proxy, registry.up)
    url = server.url("npm")
    assert fetch(url + "-/ping").status == 200
    for path, words in [
        ("-/v1/search?text=demo", "search"),
        ("-/whoami", "whoami"),
        ("-/npm/v1/security/advisories/bulk", "audit"),
        ("-/package/demo-base/dist-tags", "dist-tag"),
    ]:
        r = fetch(url + path)
        assert r.status == 404, path
        assert words in r.json()["error"] and "not supported by this proxy" in r.json()["error"]
    for method, path in [
        ("PUT", "demo-base"),  # npm publish
        ("PUT", "-/user/org.couchdb.user:me"),  # npm adduser/login
        ("POST", "-/npm/v1/security/advisories/bulk"),  # npm audit
        ("DELETE", "demo-base/-rev/1"),  # npm unpublish
    ]:
        r = fetch(url + path, method=method)
        assert r.status == 405, (method, path)
        assert "not supported by this proxy" in r.json()["error"]
        assert r.headers["allow"] == "GET, HEAD"
    assert sum(registry.up.hits.values()) == 0


def test_credentials_only_go_to_the_registry_origin(
    registry: Registry, make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NPM_TEST_TOKEN", "s3cret")
    with Upstream() as cdn:  # another origin serving the tarball
        cdn.files["/base.tgz"] = Registry.BASE
        doc = json.loads(registry.up.files["/demo-base"])
        doc["versions"]["1.0.0"]["dist"]["tarball"] = f"{cdn.url}/base.tgz"
        registry.up.files["/demo-base"] = json.dumps(doc).encode()
        server = make_proxy(
            proxy_def(
                key="npm", format="npm", url=registry.up.url + "/", auth="bearer", token_env="NPM_TEST_TOKEN"
            ),
            allow_hosts=(cdn.url.split("//")[1],),  # a loopback host: the SSRF guard's
        )
        r = fetch(server.url("npm") + "demo-base/-/demo-base-1.0.0.tgz")
        assert (r.status, r.body) == (200, Registry.BASE)
        assert dict(registry.up.request_headers)["/demo-base"]["Authorization"] == "Bearer s3cret"
        assert "Authorization" not in dict(cdn.request_headers)["/base.tgz"]


def test_replay_serves_everything_recorded_without_the_upstream(
    upstream: Upstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    registry = Registry(upstream)  # its own upstream: this test stops it
    cache = tmp_path / "shared-cache"
    definition = proxy_def(key="npm", format="npm", url=registry.up.url + "/")
    record = make_proxy(definition, cache=cache)
    for path in ("demo-base", "demo-base/-/demo-base-1.0.0.tgz"):
        assert fetch(record.url("npm") + path).status == 200
    assert fetch(record.url("npm") + "no-such-package").status == 404
    registry.up.stop()
    replay = make_proxy(definition, mode="replay", cache=cache)
    short = fetch(replay.url("npm") + "demo-base", headers={"Accept": CORGI})  # recorded as full
    assert short.status == 200
    tarball = short.json()["versions"]["1.0.0"]["dist"]["tarball"]
    assert tarball.startswith(replay.url("npm"))
    assert fetch(tarball).body == Registry.BASE
    gone = fetch(replay.url("npm") + "no-such-package")  # a recorded 404 is replayed as one
    assert (gone.status, gone.headers["content-type"]) == (404, "application/json")
    assert "not found upstream" in gone.json()["error"]
    missing = fetch(replay.url("npm") + "@demo/util")
    assert missing.status == 504 and "was not recorded" in missing.json()["error"]


def test_exported_env_points_npm_clients_at_the_first_npm_key(
    registry: Registry, make_proxy: MakeProxy
) -> None:
    server = make_proxy(
        proxy_def(key="g", format="generic", url=registry.up.url + "/"),
        proxy_def(key="npm-one", format="npm", url=registry.up.url + "/"),
        proxy_def(key="npm-two", format="npm", url=registry.up.url + "/"),
    )
    env = exported_env(server)
    registry_url = server.url("npm-one")
    assert registry_url.endswith("/npm-one/")
    for name in (
        "npm_config_registry",
        "NPM_CONFIG_REGISTRY",
        "pnpm_config_registry",
        "YARN_REGISTRY",
        "YARN_NPM_REGISTRY_SERVER",
    ):
        assert env[name] == registry_url, name
    without = exported_env(make_proxy(proxy_def(key="g", format="generic", url=registry.up.url + "/")))
    assert "npm_config_registry" not in without


# -- the real thing: npm and verdaccio ---------------------------------------------------
PACKAGES = {
    "demo-base": ({}, "module.exports = 'base';\n"),
    "demo-app": ({"demo-base": "^1.0.0"}, "module.exports = 'app+' + require('demo-base');\n"),
    "@demo/util": ({}, "module.exports = 'util';\n"),
}


def npm_env(tmp: Path) -> dict[str, str]:
    """An environment in which npm reads no config of this machine or user (e.g. a global registry)."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "user-npmrc").write_text("")
    (tmp / "global-npmrc").write_text("")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.lower().startswith(("npm_config_", "pnpm_config_", "yarn_")) and k != "UPSTREAM_PROXY_URL"
    }
    env.update(
        HOME=str(tmp),
        npm_config_userconfig=str(tmp / "user-npmrc"),
        npm_config_globalconfig=str(tmp / "global-npmrc"),
        npm_config_update_notifier="false",
        npm_config_fund="false",
        npm_config_audit="false",
        npm_config_loglevel="warn",
    )
    return env


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 60) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture
def verdaccio(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A local-only verdaccio (no uplinks, storage in tmp); yields its URL and process."""
    require_peer("node", "npm", str(VERDACCIO), install="scripts/peers/npm.sh")
    home = tmp_path / "verdaccio"
    home.mkdir()
    (home / "config.yaml").write_text(
        f"storage: {home / 'storage'}\n"
        f"auth:\n  htpasswd:\n    file: {home / 'htpasswd'}\n    max_users: 10\n"
        "packages:\n"
        "  '@*/*':\n    access: $all\n    publish: $authenticated\n"
        "  '**':\n    access: $all\n    publish: $authenticated\n"
        "log: { type: stdout, format: pretty, level: error }\n"
    )
    port = free_port()
    env = {**os.environ, "HOME": str(home)}
    proc = subprocess.Popen(
        [str(VERDACCIO), "--config", str(home / "config.yaml"), "--listen", f"127.0.0.1:{port}"],
        cwd=home,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_http(url + "-/ping", timeout=30)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def npm_user(registry_url: str) -> str:
    """Create a user through the registry API; its token."""
    req = urllib.request.Request(
        registry_url + "-/user/org.couchdb.user:demo",
        data=json.dumps({"name": "demo", "password": "demo-password-1", "type": "user"}).encode(),
        headers={"Content-Type": "application/json"},
        method="PUT",
    )
    with urllib.request.urlopen(req, timeout=20) as resp:
        return str(json.load(resp)["token"])


def publish_demo_packages(registry_url: str, tmp: Path) -> None:
    """Create a user through the registry API, then ``npm publish`` the demo packages (in parallel)."""
    token = npm_user(registry_url)
    env = npm_env(tmp / "publisher")
    npmrc = tmp / "publisher" / "npmrc"
    npmrc.write_text(f"//{urlsplit(registry_url).netloc}/:_authToken={token}\n")
    procs = []
    for name, (deps, code) in PACKAGES.items():
        src = tmp / "src" / name.replace("/", "__")
        src.mkdir(parents=True)
        meta = {"name": name, "version": "1.0.0", "main": "index.js", "license": "MIT", "dependencies": deps}
        (src / "package.json").write_text(json.dumps(meta, indent=2))
        (src / "index.js").write_text(code)
        cmd = ["npm", "publish", "--registry", registry_url, "--userconfig", str(npmrc)]
        cmd += ["--cache", str(tmp / "publisher" / "cache" / src.name), "--ignore-scripts"]
        procs.append((name, subprocess.Popen(cmd, cwd=src, env=env, stdout=PIPE, stderr=PIPE)))
    for name, proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, f"npm publish {name} failed:\n{out.decode()}\n{err.decode()}"


def npm_install(registry: str, project: Path, cache: Path) -> dict[str, object]:
    """A real ``npm install`` of a project needing demo-app (-> demo-base) and @demo/util.

    Returns the package-lock.json it wrote.
    """
    project.mkdir(parents=True)
    deps = {"demo-app": "^1.0.0", "@demo/util": "^1.0.0"}
    (project / "package.json").write_text(
        json.dumps({"name": "consumer", "version": "1.0.0", "private": True, "dependencies": deps})
    )
    cmd = ["npm", "install", "--registry", registry, "--cache", str(cache), "--no-audit", "--no-fund"]
    run(cmd, project, npm_env(project.parent / f"{project.name}-home"))
    lock = json.loads((project / "package-lock.json").read_text())
    assert isinstance(lock, dict)
    return lock


def installed_tree(project: Path) -> dict[str, str]:
    """relative path -> sha256 of every installed file.

    npm's own bookkeeping copy of the lockfile is left out: it names the proxy's port.
    """
    root = project / "node_modules"
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".package-lock.json"
    }


@pytest.mark.slow
def test_real_npm_install_through_the_proxy_then_replay(
    verdaccio: tuple[str, subprocess.Popen[bytes]], make_proxy: MakeProxy, tmp_path: Path
) -> None:
    started = time.monotonic()
    registry_url, registry_proc = verdaccio
    publish_demo_packages(registry_url, tmp_path)
    cache = tmp_path / "proxy-cache"
    definition = proxy_def(key="npm", format="npm", url=registry_url)

    # record: every packument and tarball comes from verdaccio through the proxy
    record = make_proxy(definition, mode="record", cache=cache)
    first_lock = npm_install(record.url("npm"), tmp_path / "first", tmp_path / "npm-cache-1")
    first = installed_tree(tmp_path / "first")
    assert {"demo-app/package.json", "demo-base/package.json", "@demo/util/package.json"} <= set(first)
    packages = first_lock["packages"]
    assert isinstance(packages, dict)
    for name in PACKAGES:
        resolved = packages[f"node_modules/{name}"]["resolved"]
        assert resolved.startswith(record.url("npm")), resolved  # the tarball came through the proxy
    served = {(r.path, r.cache) for r in record.served.records}
    assert {
        ("demo-app", "miss"),
        ("@demo/util", "miss"),
        ("demo-base/-/demo-base-1.0.0.tgz", "miss"),
    } <= served
    assert all(r.status == 200 for r in record.served.records), record.served.records
    script = "console.log(require('demo-app'), require('@demo/util'))"
    output = run(["node", "-e", script], tmp_path / "first", npm_env(tmp_path / "node-home"))
    assert output.strip() == "app+base util"

    # replay: the registry is gone; a fresh project and an empty npm cache install the same tree
    registry_proc.terminate()
    registry_proc.wait(timeout=10)
    replay = make_proxy(definition, mode="replay", cache=cache)
    mark = replay.served.mark()
    second_lock = npm_install(replay.url("npm"), tmp_path / "second", tmp_path / "npm-cache-2")
    assert installed_tree(tmp_path / "second") == first
    for name in ("demo-app", "demo-base", "@demo/util"):
        path = f"{name}/package.json"
        assert (tmp_path / "second/node_modules" / path).read_text() == (
            tmp_path / "first/node_modules" / path
        ).read_text()

    def integrity(lock: dict[str, object]) -> dict[str, str]:
        pkgs = lock["packages"]
        assert isinstance(pkgs, dict)
        return {k: v["integrity"] for k, v in pkgs.items() if k}

    assert integrity(second_lock) == integrity(first_lock)
    assert len(integrity(first_lock)) == 3
    records, fetches = replay.served.since(mark)
    assert fetches == []
    assert records and all((r.cache, r.status) == ("hit", 200) for r in records), records

    # a committed lockfile names the public registry: npm ci maps it onto the proxy's
    # identical tarball layout (npm's default replace-registry-host), still offline
    public = BUILTIN_SOURCES["npm"].url
    lock_text = (tmp_path / "first" / "package-lock.json").read_text()
    assert record.url("npm") in lock_text
    third = tmp_path / "third"
    third.mkdir()
    (third / "package.json").write_text((tmp_path / "first" / "package.json").read_text())
    (third / "package-lock.json").write_text(lock_text.replace(record.url("npm"), public))
    cmd = ["npm", "ci", "--registry", replay.url("npm"), "--cache", str(tmp_path / "npm-cache-3")]
    run(cmd, third, npm_env(tmp_path / "third-home"))
    assert installed_tree(third) == first
    assert time.monotonic() - started < 60
