"""The docker format: the pull side of the OCI distribution API through the proxy.

Fast tests run against ``FakeRegistry`` (tests/upstreams.py); the slow ones
against CNCF distribution (``docker-registry``) with skopeo as the client.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from http.client import HTTPConnection
from pathlib import Path

import pytest

from pytest_upstream.config.settings import ConfigError, ProxyDefinition, Settings, parse_table
from pytest_upstream.config.sources import IMAGE_DOMAINS
from pytest_upstream.engine.clock import ManualClock
from pytest_upstream.formats.base import FormatError
from pytest_upstream.formats.docker import (
    ALL_MANIFESTS_ACCEPT,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    name_problem,
    normalize_accept,
    parse_digest,
)
from pytest_upstream.formats.docker_auth import parse_challenge
from pytest_upstream.pytest_plugin.harness import UpstreamProxy
from pytest_upstream.server.proxy_server import ProxyServer

from .conftest import MakeProxy, proxy_def
from .oci import (
    DOCKER_LAYER,
    PUSH_PASS,
    PUSH_USER,
    Blob,
    FileServer,
    Registry,
    TokenServer,
    build_image,
    build_index,
    http,
    make_htpasswd,
    push_http,
    registry,
    sha256,
    skopeo,
    write_layout,
)
from .peers import free_port, require_peer
from .upstreams import FakeRegistry, Fault, digest_of

SHA = "sha256:" + "ab" * 32
LAYER = b"layer bytes " * 1000
LAYER_DIGEST = digest_of(LAYER)
MANIFEST = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}).encode()
INDEX = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode()


@pytest.fixture
def fake() -> Iterator[FakeRegistry]:
    with FakeRegistry() as reg:
        yield reg


def docker_proxy(url: str, key: str = "oci", **extra: object) -> ProxyDefinition:
    return proxy_def(key=key, format="docker", url=url, **extra)


def v2(server: ProxyServer, path: str) -> str:
    return f"{server.base_url}/v2/{path}"


def port_of(server: ProxyServer) -> int:
    return int(server.base_url.rsplit(":", 1)[1])


def errors(body: bytes) -> tuple[str, str]:
    err = json.loads(body)["errors"][0]
    return err["code"], err["message"]


# -- grammar --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name",
    ["alpine", "library/alpine", "a/b/c", "a.b", "a_b", "a__b", "a---b", "x0/y-1.z_2", "a" * 200],
)
def test_valid_names(name: str) -> None:
    assert name_problem("k", name) is None


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "empty"),
        ("Alpine", "invalid repository name"),
        ("a..b", "invalid"),
        ("a/../b", "invalid"),
        ("a___b", "invalid"),
        ("-a", "invalid"),
        ("a-", "invalid"),
        ("a//b", "invalid"),
        ("a/", "invalid"),
        ("a b", "invalid"),
        ("a" * 254, "at most 255"),  # 1 + 1 + 254 = 256 with key "k"
    ],
)
def test_invalid_names(name: str, why: str) -> None:
    problem = name_problem("k", name)
    assert problem is not None and why in problem


def test_name_length_counts_the_key() -> None:
    assert name_problem("k", "a" * 253) is None  # k/ + 253 = 255
    assert name_problem("kk", "a" * 253) is not None


@pytest.mark.parametrize(
    ("value", "expected"),
    [("sha256:" + "0f" * 32, ("sha256", "0f" * 32)), ("sha512:" + "a1" * 64, ("sha512", "a1" * 64))],
)
def test_parse_digest(value: str, expected: tuple[str, str]) -> None:
    assert parse_digest(value) == expected


@pytest.mark.parametrize(
    ("value", "code"),
    [
        ("sha256:" + "0f" * 31, "DIGEST_INVALID"),  # too short
        ("sha256:" + "0F" * 32, "DIGEST_INVALID"),  # upper case
        ("sha512:" + "a1" * 32, "DIGEST_INVALID"),
        ("sha256:", "DIGEST_INVALID"),
        ("md5:d41d8cd98f00b204e9800998ecf8427e", "UNSUPPORTED"),
        ("blake3:" + "ab" * 32, "UNSUPPORTED"),
        ("nonsense", "DIGEST_INVALID"),
        ("sha256:zz", "DIGEST_INVALID"),
    ],
)
def test_bad_digests(value: str, code: str) -> None:
    with pytest.raises(FormatError) as info:
        parse_digest(value)
    assert (info.value.status, info.value.code) == (400, code)


def test_normalize_accept_merges_lines_and_sorts() -> None:
    skopeo_like = f"{OCI_MANIFEST}, {DOCKER_MANIFEST} , {OCI_INDEX},{DOCKER_LIST}, {OCI_MANIFEST}"
    assert normalize_accept(skopeo_like) == ", ".join(
        sorted({OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST})
    )
    assert normalize_accept(f"{DOCKER_LIST}, {OCI_INDEX}") == normalize_accept(f"{OCI_INDEX},{DOCKER_LIST}")
    assert normalize_accept("Application/JSON; q=0.5") == "application/json;q=0.5"
    assert normalize_accept(None) == normalize_accept("") == ""


def test_parse_challenge() -> None:
    scheme, params = parse_challenge(
        'Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push"'
    )
    assert scheme == "bearer"
    assert params == {
        "realm": "https://auth.example/token",
        "service": "registry.example",
        "scope": "repository:a/b:pull,push",
    }
    assert parse_challenge('Basic realm="x"') == ("basic", {"realm": "x"})


# -- serving ---------------------------------------------------------------------------------------------
def test_blob_miss_then_hit_head_and_range(fake: FakeRegistry, make_proxy: MakeProxy) -> None:
    fake.blobs[LAYER_DIGEST] = LAYER
    proxy = make_proxy(docker_proxy(fake.url))
    url = v2(proxy, f"oci/demo/app/blobs/{LAYER_DIGEST}")
    status, body, headers = http(url)
    assert (status, body, headers["X-Upstream-Cache"]) == (200, LAYER, "miss")
    assert headers["Docker-Content-Digest"] == LAYER_DIGEST
    status, body, headers = http(url)
    assert (status, body, headers["X-Upstream-Cache"]) == (200, LAYER, "hit")
    status, body, headers = http(url, method="HEAD")
    assert (status, body, headers["Content-Length"]) == (200, b"", str(len(LAYER)))
    assert headers["Docker-Content-Digest"] == LAYER_DIGEST
    status, body, headers = http(url, headers={"Range": "bytes=100-199"})
    assert (status, body, headers["Content-Range"]) == (206, LAYER[100:200], f"bytes 100-199/{len(LAYER)}")
    assert fake.hits[f"/v2/demo/app/blobs/{LAYER_DIGEST}"] == 1
    records = [r for r in proxy.served.records if r.status < 400]
    assert {r.path for r in records} == {f"demo/app/blobs/{LAYER_DIGEST}"}
    assert [r.cache for r in records] == ["miss", "hit", "hit", "hit"]


def test_manifest_by_tag_is_metadata_per_accept_and_passed_through(
    fake: FakeRegistry, make_proxy: MakeProxy
) -> None:
    fake.add_manifest("demo/app", "v1", (OCI_MANIFEST, MANIFEST), (OCI_INDEX, INDEX))
    proxy = make_proxy(docker_proxy(fake.url))
    url = v2(proxy, "oci/demo/app/manifests/v1")
    # skopeo sends its Accept as separate header lines: they are merged and normalised
    conn = HTTPConnection("127.0.0.1", port_of(proxy), timeout=30)
    conn.putrequest("GET", "/v2/oci/demo/app/manifests/v1")
    for media in (OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX):
        conn.putheader("Accept", media)
    conn.endheaders()
    resp = conn.getresponse()
    first = resp.read()
    assert resp.status == 200 and resp.getheader("X-Upstream-Cache") == "miss"
    assert first == MANIFEST and resp.getheader("Content-Type") == OCI_MANIFEST
    assert resp.getheader("Docker-Content-Digest") == digest_of(MANIFEST)
    conn.close()
    forwarded = fake.requests[-1][1]["Accept"]
    assert forwarded == normalize_accept(f"{OCI_MANIFEST}, {DOCKER_MANIFEST}, {OCI_INDEX}")
    # the same set of types in another order: the same entry
    status, body, headers = http(url, headers={"Accept": f"{OCI_INDEX}, {OCI_MANIFEST},{DOCKER_MANIFEST}"})
    assert (status, body, headers["X-Upstream-Cache"]) == (200, MANIFEST, "hit")
    # another set of types is another variant: the index only
    status, body, headers = http(url, headers={"Accept": OCI_INDEX})
    assert (status, body, headers["X-Upstream-Cache"], headers["Content-Type"]) == (
        200,
        INDEX,
        "miss",
        OCI_INDEX,
    )
    status, body, headers = http(url, headers={"Accept": OCI_INDEX}, method="HEAD")
    assert (status, headers["X-Upstream-Cache"], headers["Docker-Content-Digest"]) == (
        200,
        "hit",
        digest_of(INDEX),
    )
    assert fake.hits["/v2/demo/app/manifests/v1"] == 2


def test_manifest_by_digest_asks_for_every_type_and_is_verified(
    fake: FakeRegistry, make_proxy: MakeProxy
) -> None:
    digest = digest_of(INDEX)
    fake.add_manifest("demo/app", digest, (OCI_INDEX, INDEX))
    proxy = make_proxy(docker_proxy(fake.url))
    url = v2(proxy, f"oci/demo/app/manifests/{digest}")
    status, body, headers = http(url, headers={"Accept": OCI_MANIFEST})
    assert (status, body, headers["Content-Type"]) == (200, INDEX, OCI_INDEX)
    accept = fake.requests[-1][1]["Accept"]
    assert set(accept.split(", ")) == set(ALL_MANIFESTS_ACCEPT.split(", "))
    status, body, headers = http(url)  # any Accept: the bytes are pinned by the digest
    assert (status, body, headers["X-Upstream-Cache"]) == (200, INDEX, "hit")
    # the upstream answers other bytes for a digest: refused, nothing stored
    bad = "sha256:" + "cd" * 32
    fake.add_manifest("demo/app", bad, (OCI_INDEX, INDEX))
    status, body, _ = http(v2(proxy, f"oci/demo/app/manifests/{bad}"))
    _code, message = errors(body)
    assert status == 502 and "digest mismatch" in message and f"oci/demo/app@{bad}" in message
    assert not list(proxy.engine.cache.iter_entries("oci")) or all(
        e.path != f"demo/app/manifests/{bad}" for e in proxy.engine.cache.iter_entries("oci")
    )


def test_manifest_by_tag_must_match_its_docker_content_digest(
    fake: FakeRegistry, make_proxy: MakeProxy
) -> None:
    fake.add_manifest("demo/app", "v1", (OCI_MANIFEST, MANIFEST), digest_header="sha256:" + "ee" * 32)
    fake.add_manifest("demo/app", "nodigest", (OCI_MANIFEST, MANIFEST), digest_header=None)
    proxy = make_proxy(docker_proxy(fake.url))
    url = v2(proxy, "oci/demo/app/manifests/v1")
    status, body, _ = http(url, headers={"Accept": OCI_MANIFEST})
    _code, message = errors(body)
    assert status == 502 and "oci/demo/app:v1" in message and "digest mismatch" in message
    assert not [e for e in proxy.engine.cache.iter_entries("oci") if e.path == "demo/app/manifests/v1"]
    http(url, headers={"Accept": OCI_MANIFEST})
    assert fake.hits["/v2/demo/app/manifests/v1"] == 2  # nothing was stored: asked again
    # no header: nothing to check against, stored
    status, body, _ = http(v2(proxy, "oci/demo/app/manifests/nodigest"))
    assert (status, body) == (200, MANIFEST)


def test_metadata_that_is_not_json_is_refused(fake: FakeRegistry, make_proxy: MakeProxy) -> None:
    fake.add_manifest("demo/app", "v1", ("text/html", b"<html>login</html>"))
    proxy = make_proxy(docker_proxy(fake.url))
    status, body, _ = http(v2(proxy, "oci/demo/app/manifests/v1"))
    assert status == 502 and "did not answer a JSON object" in errors(body)[1]
    assert not list(proxy.engine.cache.iter_entries("oci"))


def test_tags_list_is_metadata_and_passes_pagination(fake: FakeRegistry, make_proxy: MakeProxy) -> None:
    fake.tags["demo/app"] = ["v1", "v2"]
    proxy = make_proxy(docker_proxy(fake.url))
    status, body, _headers = http(v2(proxy, "oci/demo/app/tags/list"))
    assert status == 200 and json.loads(body)["tags"] == ["v1", "v2"]
    assert http(v2(proxy, "oci/demo/app/tags/list"))[2]["X-Upstream-Cache"] == "hit"
    http(v2(proxy, "oci/demo/app/tags/list?n=1&last=v0&evil=1"))
    assert fake.requests[-1][0] == "/v2/demo/app/tags/list?n=1&last=v0"
    status, body, _ = http(v2(proxy, "oci/demo/other/tags/list"))
    assert (status, errors(body)[0]) == (404, "NAME_UNKNOWN")


def test_dockerhub_official_images_map_to_library(fake: FakeRegistry, make_proxy: MakeProxy) -> None:
    fake.add_manifest("library/alpine", "3", (OCI_MANIFEST, MANIFEST))
    fake.blobs[LAYER_DIGEST] = LAYER
    proxy = make_proxy(proxy_def(key="hub", source="dockerhub", url=fake.url + "/"))
    assert http(v2(proxy, "hub/alpine/manifests/3"))[1] == MANIFEST
    assert http(v2(proxy, "hub/library/alpine/manifests/3"))[2]["X-Upstream-Cache"] == "hit"  # one entry
    assert http(v2(proxy, f"hub/alpine/blobs/{LAYER_DIGEST}"))[1] == LAYER
    assert fake.hits["/v2/library/alpine/manifests/3"] == 1
    assert fake.hits[f"/v2/library/alpine/blobs/{LAYER_DIGEST}"] == 1
    assert {r.path for r in proxy.served.records} == {
        "library/alpine/manifests/3",
        f"library/alpine/blobs/{LAYER_DIGEST}",
    }


def test_upstream_url_may_end_in_v2(fake: FakeRegistry, make_proxy: MakeProxy) -> None:
    fake.blobs[LAYER_DIGEST] = LAYER
    proxy = make_proxy(docker_proxy(fake.url + "/v2/"))
    assert http(v2(proxy, f"oci/a/blobs/{LAYER_DIGEST}"))[0] == 200
    assert fake.hits[f"/v2/a/blobs/{LAYER_DIGEST}"] == 1


def test_api_version_check(make_proxy: MakeProxy, fake: FakeRegistry) -> None:
    proxy = make_proxy(docker_proxy(fake.url))
    for path in ("", "oci/"):
        status, body, headers = http(v2(proxy, path))
        assert (status, body, headers["Docker-Distribution-API-Version"]) == (200, b"{}", "registry/2.0")


@pytest.fixture(scope="module")
def refusing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeRegistry, ProxyServer]]:
    """One registry and proxy for the many requests that must never reach the upstream."""
    with FakeRegistry() as fake:
        settings = Settings(cache_dir=tmp_path_factory.mktemp("refusing"), proxies=(docker_proxy(fake.url),))
        with ProxyServer(settings) as proxy:
            yield fake, proxy


# -- refusals ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "status", "code", "needle"),
    [
        ("oci/Demo/manifests/v1", 400, "NAME_INVALID", "invalid repository name 'Demo'"),
        ("oci/a..b/manifests/v1", 400, "NAME_INVALID", "'a..b'"),
        ("oci/a___b/blobs/" + SHA, 400, "NAME_INVALID", "invalid repository name"),
        ("oci/" + "a" * 252 + "/manifests/v1", 400, "NAME_INVALID", "at most 255"),
        ("oci/demo/manifests/bad:tag:x", 400, "DIGEST_INVALID", "invalid digest"),
        ("oci/demo/manifests/.hidden", 400, "NAME_INVALID", "invalid tag"),
        ("oci/demo/manifests/" + "t" * 129, 400, "NAME_INVALID", "invalid tag"),
        ("oci/demo/blobs/sha256:abc", 400, "DIGEST_INVALID", "64 lower-case hex"),
        ("oci/demo/blobs/SHA256:" + "ab" * 32, 400, "DIGEST_INVALID", "invalid digest"),
        (
            "oci/demo/blobs/md5:d41d8cd98f00b204e9800998ecf8427e",
            400,
            "UNSUPPORTED",
            "unsupported digest algorithm",
        ),
        ("oci/demo/manifests/sha1:" + "ab" * 20, 400, "UNSUPPORTED", "'sha1'"),
        ("oci/_catalog", 404, "UNSUPPORTED", "_catalog"),
        ("oci/demo/referrers/" + SHA, 404, "UNSUPPORTED", "a docker proxy serves"),
        ("nokey/demo/manifests/v1", 404, "NAME_UNKNOWN", "no docker upstream proxy with key 'nokey'"),
    ],
)
def test_bad_requests_get_registry_errors_and_reach_no_upstream(
    refusing: tuple[FakeRegistry, ProxyServer], path: str, status: int, code: str, needle: str
) -> None:
    fake, proxy = refusing
    got, body, headers = http(v2(proxy, path))
    assert (got, errors(body)[0]) == (status, code)
    assert needle in errors(body)[1]
    assert headers["Content-Type"].startswith("application/json")
    assert not fake.requests and not list(proxy.engine.cache.iter_entries())


def test_dot_segments_are_refused_before_routing(fake: FakeRegistry, make_proxy: MakeProxy) -> None:
    proxy = make_proxy(docker_proxy(fake.url))
    for raw in ("/v2/oci/../x/manifests/v1", "/v2/oci/a/%2e%2e/b/manifests/v1", "/v2/oci/a//b/manifests/v1"):
        conn = HTTPConnection("127.0.0.1", port_of(proxy), timeout=30)
        conn.request("GET", raw)
        resp = conn.getresponse()
        assert resp.status == 400, raw
        resp.read()
        conn.close()
    assert not fake.requests


@pytest.mark.parametrize("method", ["PUT", "POST", "DELETE", "PATCH"])
def test_push_is_refused_as_unsupported(refusing: tuple[FakeRegistry, ProxyServer], method: str) -> None:
    fake, proxy = refusing
    for path in ("oci/demo/manifests/v1", "oci/demo/blobs/uploads/", f"oci/demo/blobs/{SHA}"):
        status, body, headers = http(v2(proxy, path), method=method, data=b"{}")
        code, message = errors(body)
        assert (status, code, headers["Allow"]) == (405, "UNSUPPORTED", "GET, HEAD")
        assert "read-only upstream proxy" in message
    status, body, _ = http(v2(proxy, "oci/demo/blobs/uploads/0e7e"))  # GET of an upload session
    assert (status, errors(body)[0]) == (405, "UNSUPPORTED")
    assert not fake.requests


def test_not_found_names_the_image_and_reference(fake: FakeRegistry, make_proxy: MakeProxy) -> None:
    proxy = make_proxy(docker_proxy(fake.url))
    status, body, _ = http(v2(proxy, "oci/demo/app/manifests/v9"))
    code, message = errors(body)
    assert (status, code) == (404, "MANIFEST_UNKNOWN") and message.startswith("manifest oci/demo/app:v9: ")
    status, body, _ = http(v2(proxy, f"oci/demo/app/blobs/{SHA}"))
    code, message = errors(body)
    assert (status, code) == (404, "BLOB_UNKNOWN") and message.startswith(f"blob oci/demo/app@{SHA}: ")


def test_replay_miss_and_upstream_down(fake: FakeRegistry, make_proxy: MakeProxy, tmp_path: Path) -> None:
    fake.add_manifest("demo/app", "v1", (OCI_MANIFEST, MANIFEST))
    cache = tmp_path / "c"
    rec = make_proxy(
        docker_proxy(fake.url), docker_proxy(f"http://127.0.0.1:{free_port()}", key="down"), cache=cache
    )
    assert http(v2(rec, "oci/demo/app/manifests/v1"), headers={"Accept": OCI_MANIFEST})[0] == 200
    status, body, _ = http(v2(rec, "down/demo/app/manifests/v2"))
    code, message = errors(body)
    assert (status, code) == (502, "UNKNOWN")
    assert message.startswith("manifest down/demo/app:v2: ") and "connection failed" in message
    replay = make_proxy(docker_proxy(fake.url), cache=cache, mode="replay")
    with UpstreamProxy(replay).no_upstream_requests():
        status, body, _ = http(v2(replay, "oci/demo/app/manifests/v1"), headers={"Accept": OCI_MANIFEST})
        assert (status, body) == (200, MANIFEST)
        status, body, _ = http(v2(replay, "oci/demo/app/manifests/v1"), headers={"Accept": OCI_INDEX})
    code, message = errors(body)
    assert (status, code) == (504, "UNAVAILABLE")
    assert message.startswith("manifest oci/demo/app:v1: replay mode:") and "was not recorded" in message


def test_concurrent_pulls_of_one_layer_fetch_it_once(make_proxy: MakeProxy) -> None:
    from .upstreams import Fault, Upstream

    big = os.urandom(3 * 1024 * 1024)
    digest = digest_of(big)
    with Upstream() as up:
        up.files[f"/v2/demo/app/blobs/{digest}"] = big
        up.faults[f"/v2/demo/app/blobs/{digest}"] = Fault(chunk_delay=0.005)
        proxy = make_proxy(docker_proxy(up.url))
        results: list[bytes] = []

        def pull() -> None:
            results.append(http(v2(proxy, f"oci/demo/app/blobs/{digest}"))[1])

        threads = [threading.Thread(target=pull) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [big] * 8
        assert up.hits[f"/v2/demo/app/blobs/{digest}"] == 1
        caches = sorted(r.cache for r in proxy.served.records)
        assert caches == ["hit"] * 7 + ["miss"]


# -- upstream auth ------------------------------------------------------------------------------------------
def test_bearer_token_flow_caches_one_token_per_scope(make_proxy: MakeProxy) -> None:
    with FakeRegistry(auth="token") as fake:
        fake.blobs[LAYER_DIGEST] = LAYER
        fake.add_manifest("demo/app", "v1", (OCI_MANIFEST, MANIFEST))
        fake.add_manifest("demo/other", "v1", (OCI_MANIFEST, MANIFEST))
        proxy = make_proxy(docker_proxy(fake.url, metadata_ttl=0))
        for _ in range(3):
            assert http(v2(proxy, "oci/demo/app/manifests/v1"))[1] == MANIFEST
        assert http(v2(proxy, f"oci/demo/app/blobs/{LAYER_DIGEST}"))[1] == LAYER
        assert http(v2(proxy, "oci/demo/other/manifests/v1"))[1] == MANIFEST
        scopes = [q for q, _ in fake.token_requests]
        assert scopes == [
            "service=fake-registry&scope=repository%3Ademo%2Fapp%3Apull",
            "service=fake-registry&scope=repository%3Ademo%2Fother%3Apull",
        ]
        assert all("Authorization" not in h for _, h in fake.token_requests)  # anonymous
        # one 401 per scope, then the cached token is sent up front
        assert sum(1 for _, h in fake.requests if "Authorization" not in h) == 2


def test_bearer_token_expiry_and_basic_credentials_at_the_realm(
    make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = ManualClock()
    with FakeRegistry(auth="token", token_life=4) as fake:
        monkeypatch.setenv("REG_USER", fake.user[0])
        monkeypatch.setenv("REG_PASS", fake.user[1])
        fake.add_manifest("demo/app", "v1", (OCI_MANIFEST, MANIFEST))
        proxy = make_proxy(
            docker_proxy(
                fake.url, metadata_ttl=0, auth="basic", username_env="REG_USER", password_env="REG_PASS"
            ),
            clock=clock,
        )
        assert http(v2(proxy, "oci/demo/app/manifests/v1"))[0] == 200
        clock.advance(3.5)
        assert http(v2(proxy, "oci/demo/app/manifests/v1"))[0] == 200
        assert len(fake.token_requests) == 1  # expires_in=4: used for at most 3.6 s
        clock.advance(0.2)
        assert http(v2(proxy, "oci/demo/app/manifests/v1"))[0] == 200
        assert len(fake.token_requests) == 2  # the real token server was asked again
        basic = "Basic " + base64.b64encode(f"{fake.user[0]}:{fake.user[1]}".encode()).decode()
        assert all(h.get("Authorization") == basic for _, h in fake.token_requests)


def test_an_error_on_a_reused_connection_names_its_own_image(
    fake: FakeRegistry, make_proxy: MakeProxy
) -> None:
    """One keep-alive connection is one server thread: the second answer must not name the
    image of the first (the format once kept the request's image in thread-local state)."""
    fake.add_manifest("demo/app", "v1", (OCI_MANIFEST, MANIFEST))
    proxy = make_proxy(docker_proxy(fake.url), docker_proxy(fake.url, key="other"))
    conn = HTTPConnection("127.0.0.1", port_of(proxy), timeout=30)
    try:
        conn.request("GET", "/v2/oci/demo/app/manifests/v1")
        first = conn.getresponse()
        assert (first.status, first.read()) == (200, MANIFEST)
        proxy.engine.allowed_keys = frozenset({"other"})  # as a test's upstream marker narrows it
        conn.request("GET", "/v2/oci/demo/elsewhere/manifests/v2")
        second = conn.getresponse()
        code, message = errors(second.read())
        assert second.status == 403 and code == "DENIED"
        assert message.startswith("manifest oci/demo/elsewhere:v2: ")
        assert "demo/app" not in message
        conn.request("GET", "/v2/oci/_catalog")  # names no image at all
        third = conn.getresponse()
        assert third.status == 403 and "demo/" not in errors(third.read())[1]
    finally:
        conn.close()


def test_token_server_refusal_is_a_clear_502(make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REG_USER", "wrong")
    monkeypatch.setenv("REG_PASS", "wrong")
    with FakeRegistry(auth="token") as fake:
        fake.add_manifest("demo/app", "v1", (OCI_MANIFEST, MANIFEST))
        proxy = make_proxy(
            docker_proxy(fake.url, auth="basic", username_env="REG_USER", password_env="REG_PASS")
        )
        status, body, _ = http(v2(proxy, "oci/demo/app/manifests/v1"))
        _code, message = errors(body)
        assert status == 502 and "token server" in message and "refused a token" in message
        assert "wrong" not in message


def test_basic_and_static_bearer_are_sent_directly(
    make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with FakeRegistry(auth="basic") as fake:
        monkeypatch.setenv("REG_USER", fake.user[0])
        monkeypatch.setenv("REG_PASS", fake.user[1])
        fake.add_manifest("demo/app", "v1", (OCI_MANIFEST, MANIFEST))
        proxy = make_proxy(
            docker_proxy(fake.url, auth="basic", username_env="REG_USER", password_env="REG_PASS"),
            docker_proxy(fake.url, key="anon"),
        )
        assert http(v2(proxy, "oci/demo/app/manifests/v1"))[0] == 200
        assert len(fake.requests) == 1  # no challenge round trip
        status, body, _ = http(v2(proxy, "anon/demo/app/manifests/v1"))
        assert status == 502 and "refused access (401)" in errors(body)[1]
    with FakeRegistry(auth="token") as fake:
        token = fake.issue()
        monkeypatch.setenv("REG_TOKEN", token)
        fake.add_manifest("demo/app", "v1", (OCI_MANIFEST, MANIFEST))
        proxy = make_proxy(
            docker_proxy(fake.url, auth="bearer", token_env="REG_TOKEN"), cache=tmp_path / "c2"
        )
        assert http(v2(proxy, "oci/demo/app/manifests/v1"))[0] == 200
        assert fake.requests[0][1]["Authorization"] == f"Bearer {token}" and not fake.token_requests


def test_blob_redirect_to_another_host_drops_authorization(
    make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    from .upstreams import Upstream

    with FakeRegistry(auth="basic") as fake, Upstream() as cdn:
        monkeypatch.setenv("REG_USER", fake.user[0])
        monkeypatch.setenv("REG_PASS", fake.user[1])
        fake.blobs[LAYER_DIGEST] = LAYER
        fake.redirect_blobs_to = cdn.url
        cdn.files[f"/{LAYER_DIGEST}"] = LAYER
        proxy = make_proxy(
            docker_proxy(fake.url, auth="basic", username_env="REG_USER", password_env="REG_PASS"),
            allow_hosts=(cdn.url.split("//")[1],),  # a loopback host: the SSRF guard's
        )
        status, body, _ = http(v2(proxy, f"oci/demo/app/blobs/{LAYER_DIGEST}"))
        assert (status, body) == (200, LAYER)
        assert fake.requests[0][1]["Authorization"].startswith("Basic ")
        assert cdn.hits[f"/{LAYER_DIGEST}"] == 1
        assert all("authorization" not in {k.lower() for k in h} for _, h in cdn.request_headers)


# -- keyless registry mirror, upstream 4xx, tag list pages ---------------------------------------------
def registry_error(code: str, message: str) -> bytes:
    return json.dumps({"errors": [{"code": code, "message": message, "detail": {}}]}).encode()


def test_keyless_requests_go_to_the_single_dockerhub_proxy(fake: FakeRegistry, make_proxy: MakeProxy) -> None:
    fake.add_manifest("library/alpine", "3", (OCI_MANIFEST, MANIFEST))
    fake.blobs[LAYER_DIGEST] = LAYER
    proxy = make_proxy(
        proxy_def(key="hub", source="dockerhub", url=fake.url + "/"),
        docker_proxy(fake.url),
        proxy_def(key="py", format="pypi", url="http://127.0.0.1:9/simple/"),
    )
    # what a Docker daemon's registry-mirrors entry asks for (containerd adds ?ns=<domain>)
    domain = IMAGE_DOMAINS["dockerhub"]
    status, body, headers = http(v2(proxy, f"library/alpine/manifests/3?ns={domain}"))
    assert (status, body, headers["X-Upstream-Cache"]) == (200, MANIFEST, "miss")
    # the short name and the keyed spellings share that entry
    for path in ("alpine/manifests/3", "hub/alpine/manifests/3", "hub/library/alpine/manifests/3"):
        assert http(v2(proxy, path))[2]["X-Upstream-Cache"] == "hit", path
    assert http(v2(proxy, f"library/alpine/blobs/{LAYER_DIGEST}"))[1] == LAYER
    assert fake.hits["/v2/library/alpine/manifests/3"] == 1
    assert {(r.key, r.path) for r in proxy.served.records} == {
        ("hub", "library/alpine/manifests/3"),
        ("hub", f"library/alpine/blobs/{LAYER_DIGEST}"),
    }
    # a first component that is a docker proxy's key keeps the keyed routing ...
    assert http(v2(proxy, "oci/tools/manifests/1"))[0] == 404
    assert fake.hits["/v2/tools/manifests/1"] == 1 and not fake.hits["/v2/oci/tools/manifests/1"]
    # ... one that is another format's key does not: py/x is a repository of the mirror
    http(v2(proxy, "py/x/manifests/1"))
    assert fake.hits["/v2/py/x/manifests/1"] == 1
    # errors name the image as the client spelled it; keyless names may use all 255 characters
    status, body, _ = http(v2(proxy, "nope/manifests/1"))
    code, message = errors(body)
    assert (status, code) == (404, "MANIFEST_UNKNOWN") and message.startswith("manifest nope:1: ")
    status, body, _ = http(v2(proxy, "a" * 254 + "/manifests/1"))
    assert status == 404
    status, body, _ = http(v2(proxy, "a" * 256 + "/manifests/1"))
    assert (status, errors(body)[0]) == (400, "NAME_INVALID") and "at most 255)" in errors(body)[1]
    status, body, _ = http(v2(proxy, "library/alpine/referrers/" + SHA))
    assert status == 404 and "/v2/<name>/manifests/<reference>" in errors(body)[1]


def test_the_mirror_flag_and_its_rules(fake: FakeRegistry, make_proxy: MakeProxy, tmp_path: Path) -> None:
    def mirror_of(*entries: dict[str, object]) -> str | None:
        found = parse_table({"proxy": list(entries)}, "pyproject.toml", tmp_path).registry_mirror()
        return found.key if found else None

    hub = {"key": "hub", "source": "dockerhub"}
    corp = {"key": "corp", "format": "docker", "url": "http://127.0.0.1:9/"}
    assert mirror_of(hub, corp) == "hub"  # the only dockerhub-source proxy
    assert mirror_of(hub, {**corp, "mirror": True}) == "corp"  # a marked proxy wins
    assert mirror_of({**hub, "mirror": False}, corp) is None  # opted out
    assert mirror_of(hub, {**hub, "key": "hub2"}, corp) is None  # two dockerhub proxies: none
    assert mirror_of(corp) is None
    with pytest.raises(ConfigError, match="'hub', 'corp'; at most one docker proxy"):
        mirror_of({**hub, "mirror": True}, {**corp, "mirror": True})
    with pytest.raises(ConfigError, match="mirror applies to docker proxies only"):
        mirror_of({"key": "py", "source": "pypi", "mirror": False})
    with pytest.raises(ConfigError, match="mirror must be true or false"):
        mirror_of({**corp, "mirror": "yes"})
    assert proxy_def(**corp, mirror=True).as_table()["mirror"] is True
    # no mirror: a keyless request is an unknown key, and the message says how to get one
    plain = make_proxy(docker_proxy(fake.url))
    status, body, _ = http(v2(plain, "demo/app/manifests/v1"))
    code, message = errors(body)
    assert (status, code) == (404, "NAME_UNKNOWN") and "mark a docker proxy with mirror = true" in message
    assert not fake.requests
    # a marked custom proxy serves keyless names as they are (no library/ mapping)
    fake.add_manifest("demo/app", "v1", (OCI_MANIFEST, MANIFEST))
    marked = make_proxy(docker_proxy(fake.url, mirror=True), cache=tmp_path / "c2")
    assert http(v2(marked, "demo/app/manifests/v1"))[:2] == (200, MANIFEST)
    assert http(v2(marked, "oci/demo/app/manifests/v1"))[2]["X-Upstream-Cache"] == "hit"


def test_upstream_4xx_pass_the_registrys_error_on(fake: FakeRegistry, make_proxy: MakeProxy) -> None:
    busy = registry_error("TOOMANYREQUESTS", "You have reached your pull rate limit.")
    fake.faults["/v2/demo/app/manifests/bad"] = Fault(
        400, registry_error("MANIFEST_INVALID", "manifest invalid")
    )
    fake.faults["/v2/demo/app/manifests/busy"] = Fault(429, busy)
    fake.faults[f"/v2/demo/app/blobs/{SHA}"] = Fault(429, busy)
    fake.faults["/v2/demo/app/manifests/odd"] = Fault(418, b"<html>teapot</html>")
    fake.faults["/v2/demo/app/manifests/down"] = Fault(503, registry_error("UNAVAILABLE", "maintenance"))
    proxy = make_proxy(docker_proxy(fake.url, metadata_ttl=0))
    for path, status, code, needle in [
        ("manifests/bad", 400, "MANIFEST_INVALID", "answered 400 MANIFEST_INVALID: manifest invalid"),
        ("manifests/busy", 429, "TOOMANYREQUESTS", "answered 429 TOOMANYREQUESTS: You have reached"),
        (f"blobs/{SHA}", 429, "TOOMANYREQUESTS", "answered 429 TOOMANYREQUESTS: You have reached"),
        ("manifests/odd", 418, "UNKNOWN", "manifests/odd answered 418"),
        ("manifests/down", 502, "UNKNOWN", "answered 503"),  # 5xx: still a 502 of our own
    ]:
        got, body, _ = http(v2(proxy, f"oci/demo/app/{path}"))
        assert (got, errors(body)[0]) == (status, code), path
        assert needle in errors(body)[1], errors(body)
    assert errors(http(v2(proxy, "oci/demo/app/manifests/busy"))[1])[1].startswith(
        "manifest oci/demo/app:busy: "
    )
    assert not list(proxy.engine.cache.iter_entries("oci"))  # nothing of that was stored
    assert [r.status for r in proxy.served.records][:5] == [400, 429, 429, 418, 502]
    # rate limited with a cached copy: the stale tag is served, GET and HEAD
    fake.add_manifest("demo/app", "v1", (OCI_MANIFEST, MANIFEST))
    url = v2(proxy, "oci/demo/app/manifests/v1")
    assert http(url, headers={"Accept": OCI_MANIFEST})[2]["X-Upstream-Cache"] == "miss"
    fake.faults["/v2/demo/app/manifests/v1"] = Fault(429, busy)
    for method in ("GET", "HEAD"):
        status, body, headers = http(url, headers={"Accept": OCI_MANIFEST}, method=method)
        assert (status, headers["X-Upstream-Cache"]) == (200, "stale")
        assert body == (MANIFEST if method == "GET" else b"")
        assert headers["Docker-Content-Digest"] == digest_of(MANIFEST)
        assert "rate limited" in headers["X-Upstream-Error"]
    assert fake.hits["/v2/demo/app/manifests/v1"] == 3


def test_tag_list_pages_link_back_through_the_proxy(fake: FakeRegistry, make_proxy: MakeProxy) -> None:
    fake.tags["demo/app"] = ["a", "b", "c", "d", "e"]
    fake.tags["library/alpine"] = ["3.18", "3.19", "3.20"]
    proxy = make_proxy(docker_proxy(fake.url), proxy_def(key="hub", source="dockerhub", url=fake.url))

    def walk(path: str) -> tuple[list[str], list[str], list[str]]:
        """Follow rel="next" as containers/image does: the link's path and query on the same host."""
        tags, links, caches, url = [], [], [], v2(proxy, path)
        while True:
            status, body, headers = http(url)
            assert status == 200, body
            tags += json.loads(body)["tags"]
            caches.append(headers["X-Upstream-Cache"])
            if "Link" not in headers:
                return tags, links, caches
            links.append(headers["Link"])
            url = proxy.base_url + headers["Link"].split(">", 1)[0].lstrip("<")

    tags, links, caches = walk("oci/demo/app/tags/list?n=2")
    assert tags == ["a", "b", "c", "d", "e"] and caches == ["miss"] * 3
    assert links == [
        '</v2/oci/demo/app/tags/list?n=2&last=b>; rel="next"',
        '</v2/oci/demo/app/tags/list?n=2&last=d>; rel="next"',
    ]
    assert [p for p, _ in fake.requests] == [
        "/v2/demo/app/tags/list?n=2",
        "/v2/demo/app/tags/list?n=2&last=b",
        "/v2/demo/app/tags/list?n=2&last=d",
    ]
    # every page is its own entry: again, all hits with the same links
    assert walk("oci/demo/app/tags/list?n=2") == (tags, links, ["hit"] * 3)
    assert http(v2(proxy, "oci/demo/app/tags/list?last=b&n=2"))[2]["X-Upstream-Cache"] == "hit"
    assert len(fake.requests) == 3
    # the link is spelled as the client asked: keyless, short name or keyed, one set of entries
    assert walk("alpine/tags/list?n=2")[1] == ['</v2/alpine/tags/list?n=2&last=3.19>; rel="next"']
    keyed = walk("hub/library/alpine/tags/list?n=2")
    assert keyed[1:] == (['</v2/hub/library/alpine/tags/list?n=2&last=3.19>; rel="next"'], ["hit", "hit"])
    # pages the registry cuts by itself (no n from the client)
    fake.tags_page = 3
    assert walk("oci/demo/app/tags/list")[1] == ['</v2/oci/demo/app/tags/list?n=3&last=c>; rel="next"']
    # a next page the proxy could not ask for (another query parameter) is not offered
    fake.link_extra = "&cursor=opaque"
    status, body, headers = http(v2(proxy, "oci/demo/app/tags/list?n=4"))
    assert (status, json.loads(body)["tags"]) == (200, ["a", "b", "c", "d"]) and "Link" not in headers


# -- the harness -------------------------------------------------------------------------------------------
def test_harness_image_and_registries_conf(fake: FakeRegistry, make_proxy: MakeProxy) -> None:
    import tomllib

    server = make_proxy(
        docker_proxy(fake.url),
        proxy_def(key="hub", source="dockerhub"),
        proxy_def(key="py", format="pypi", url="http://127.0.0.1:9/simple/"),
    )
    harness = UpstreamProxy(server)
    hostport = server.base_url.split("://", 1)[1]
    assert harness.image("hub", "alpine:3") == f"{hostport}/hub/alpine:3"
    with pytest.raises(ValueError, match="not 'docker'"):
        harness.image("py", "x")
    with pytest.raises(KeyError):
        harness.registries_conf("nope")
    conf = tomllib.loads(harness.registries_conf("oci").read_text())
    upstream_host = fake.url.split("://", 1)[1]
    assert conf["registry"][0]["prefix"] == upstream_host and conf["registry"][0]["insecure"] is True
    assert conf["registry"][0]["mirror"] == [{"location": f"{hostport}/oci", "insecure": True}]
    assert conf["registry"][1] == {"location": hostport, "insecure": True}
    hub = tomllib.loads(harness.registries_conf("hub").read_text())
    assert hub["registry"][0]["insecure"] is False
    assert hub["registry"][0]["mirror"][0]["location"] == f"{hostport}/hub"
    path = harness.registries_conf("oci")
    harness.stop()
    assert not path.exists()


def test_served_records_name_the_layers(fake: FakeRegistry, make_proxy: MakeProxy) -> None:
    fake.blobs[LAYER_DIGEST] = LAYER
    server = make_proxy(docker_proxy(fake.url))
    harness = UpstreamProxy(server)
    harness.begin_test("t")
    http(v2(server, f"oci/demo/app/blobs/{LAYER_DIGEST}"))
    with pytest.raises(AssertionError, match="was a miss"):
        harness.assert_hits(f"demo/app/blobs/{LAYER_DIGEST}")
    harness.begin_test("t2")
    with harness.no_upstream_requests():
        http(v2(server, f"oci/demo/app/blobs/{LAYER_DIGEST}"))
    harness.assert_hits("demo/app/blobs/sha256:*", key="oci")
    assert hashlib.sha256(LAYER).hexdigest() in harness.test_served[0].path


# -- real peers: CNCF distribution and skopeo --------------------------------------------------------
@pytest.fixture
def peers() -> None:
    require_peer("docker-registry", "skopeo", "htpasswd", "openssl", install="scripts/peers/docker.sh")


def multiarch(*, docker: bool = False, salt: str = "") -> tuple[Blob, list[Blob]]:
    """A two-platform index (OCI) or manifest list (Docker); the images share one layer."""
    images = {
        arch: build_image(
            arch,
            {"hello": f"{arch} {salt}".encode(), "shared": b"one layer in both " + salt.encode()},
            docker=docker,
        )
        for arch in ("amd64", "arm64")
    }
    index = build_index(images, docker=docker)
    blobs = {b.digest: b for img in images.values() for b in img.blobs}
    return index, [*blobs.values(), index]


def push_oci(
    tmp: Path, reg: Registry, name: str, tag: str, index: Blob, blobs: list[Blob], *creds: str
) -> None:
    layout = write_layout(tmp / f"layout-{name.replace('/', '-')}", blobs, {tag: index})
    args = ["--dest-creds", f"{creds[0]}:{creds[1]}"] if creds else []
    dest = f"docker://127.0.0.1:{reg.port}/{name}:{tag}"
    r = skopeo("copy", "--all", "--dest-tls-verify=false", *args, f"oci:{layout}:{tag}", dest, home=tmp)
    assert r.returncode == 0, r.stderr


def pull(
    tmp: Path, image: str, out: Path, tag: str = "v1", *, conf: Path | None = None, tls: bool = False
) -> subprocess.CompletedProcess[str]:
    """``skopeo copy --all docker://IMAGE oci:OUT:TAG``.

    skopeo 1.9 reads a registries.conf given by ``--registries-conf`` (or
    ~/.config/containers/registries.conf), not CONTAINERS_REGISTRIES_CONF as podman does.
    """
    flags = [] if tls else ["--src-tls-verify=false"]
    conf_flags = ["--registries-conf", str(conf)] if conf else []
    return subprocess.run(
        [
            "skopeo",
            *conf_flags,
            "--insecure-policy",
            "copy",
            "--all",
            *flags,
            f"docker://{image}",
            f"oci:{out}:{tag}",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp), "XDG_RUNTIME_DIR": str(tmp)},
    )


def layout_top_digest(layout: Path) -> str:
    return str(json.loads((layout / "index.json").read_text())["manifests"][0]["digest"])


def blob_paths(name: str, blobs: list[Blob]) -> list[str]:
    return [
        f"{name}/blobs/{b.digest}"
        for b in blobs
        if b.media_type not in (OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST)
    ]


@pytest.mark.slow
def test_skopeo_pulls_a_multiarch_oci_index_records_and_replays(
    peers: None, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    index, blobs = multiarch()
    cache = tmp_path / "cache"
    with registry(tmp_path / "reg") as reg:
        push_oci(tmp_path, reg, "demo/multi", "v1", index, blobs)
        upstream_raw = skopeo(
            "inspect",
            "--raw",
            "--tls-verify=false",
            f"docker://127.0.0.1:{reg.port}/demo/multi:v1",
            home=tmp_path,
        )
        assert sha256(upstream_raw.stdout.encode()) == index.digest
        server = make_proxy(docker_proxy(reg.url), cache=cache)
        harness = UpstreamProxy(server)
        image = harness.image("oci", "demo/multi:v1")
        started = time.monotonic()
        r = pull(tmp_path, image, tmp_path / "first")
        first_pull = time.monotonic() - started
        assert r.returncode == 0, r.stderr
        assert layout_top_digest(tmp_path / "first") == index.digest
        via_proxy = skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{image}", home=tmp_path)
        assert via_proxy.stdout == upstream_raw.stdout  # byte for byte
        for b in blobs:  # every blob and manifest arrived intact
            assert (tmp_path / "first" / "blobs" / "sha256" / b.digest.split(":")[1]).read_bytes() == b.data
        # again: every layer, config and manifest from the cache, not one upstream request
        harness.begin_test("again")
        with harness.no_upstream_requests():
            assert pull(tmp_path, image, tmp_path / "second").returncode == 0
        harness.assert_hits(*blob_paths("demo/multi", blobs), "demo/multi/manifests/*", key="oci")
        # a registries.conf mirror sends pulls of the upstream's own image names through the proxy
        harness.begin_test("mirror")
        conf = harness.registries_conf("oci")
        r = pull(tmp_path, f"127.0.0.1:{reg.port}/demo/multi:v1", tmp_path / "mirrored", conf=conf, tls=True)
        assert r.returncode == 0, r.stderr
        assert {rec.path for rec in harness.test_served} >= set(blob_paths("demo/multi", blobs))
    # the upstream is gone: replay serves the same pull from the record
    replay = make_proxy(docker_proxy(reg.url), cache=cache, mode="replay")
    started = time.monotonic()
    r = pull(tmp_path, UpstreamProxy(replay).image("oci", "demo/multi:v1"), tmp_path / "replayed")
    replay_pull = time.monotonic() - started
    assert r.returncode == 0, r.stderr
    assert layout_top_digest(tmp_path / "replayed") == index.digest
    assert all(rec.cache == "hit" for rec in replay.served.records)
    missing = pull(tmp_path, UpstreamProxy(replay).image("oci", "demo/multi:v2"), tmp_path / "nope", tag="v2")
    # containers/image prints only the status line of a 5xx: its reason phrase says why
    assert missing.returncode != 0 and "504 Not recorded (replay mode)" in missing.stderr
    assert (
        replay.served.records[-1].cache == "miss"
        and replay.served.records[-1].path == "demo/multi/manifests/v2"
    )
    status, body, _ = http(v2(replay, "oci/demo/multi/manifests/v2"))
    assert status == 504 and errors(body)[1].startswith("manifest oci/demo/multi:v2: replay mode:")
    print(f"skopeo pull through the proxy: record {first_pull:.2f}s, replay {replay_pull:.2f}s")


@pytest.mark.slow
def test_manifest_lists_negotiate_per_accept_like_distribution(
    peers: None, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    dlist, dblobs = multiarch(docker=True, salt="docker")
    oindex, oblobs = multiarch(salt="oci")
    with registry(tmp_path / "reg") as reg:
        push_http(reg.url, "demo/dlist", dblobs, "v1", dlist)
        push_oci(tmp_path, reg, "demo/oindex", "v1", oindex, oblobs)
        server = make_proxy(docker_proxy(reg.url))
        cases = [
            ("demo/dlist", DOCKER_LIST),  # the list as pushed
            ("demo/dlist", f"{DOCKER_MANIFEST}, {OCI_MANIFEST}"),  # distribution picks linux/amd64
            ("demo/dlist", "*/*"),  # distribution tries schema 1 and fails: 400 MANIFEST_INVALID
            ("demo/oindex", OCI_INDEX),
            ("demo/oindex", DOCKER_MANIFEST),  # distribution 404s an OCI index without its Accept
        ]
        seen = set()
        for name, accept in cases:
            direct = http(f"{reg.url}/v2/{name}/manifests/v1", headers={"Accept": accept})
            proxied = http(v2(server, f"oci/{name}/manifests/v1"), headers={"Accept": accept})
            if direct[0] == 200:
                assert proxied[0] == 200, (name, accept, proxied)
                assert proxied[2]["Content-Type"] == direct[2]["Content-Type"], (name, accept)
                assert proxied[1] == direct[1] and proxied[2]["Docker-Content-Digest"] == sha256(direct[1])
                seen.add(proxied[2]["Content-Type"])
            elif direct[0] == 404:
                assert (proxied[0], errors(proxied[1])[0]) == (404, "MANIFEST_UNKNOWN")
            else:  # distribution's own error is passed on: 400 MANIFEST_INVALID, its message
                code, message = errors(direct[1])
                assert (direct[0], code) == (400, "MANIFEST_INVALID")
                assert (proxied[0], errors(proxied[1])[0]) == (400, code)
                assert f"answered 400 MANIFEST_INVALID: {message}" in errors(proxied[1])[1]
        assert seen == {DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX}
        # each negotiated type is its own entry: asking again with the list's Accept gives the list
        again = http(v2(server, "oci/demo/dlist/manifests/v1"), headers={"Accept": DOCKER_LIST})
        assert (again[1], again[2]["X-Upstream-Cache"]) == (dlist.data, "hit")
        assert http(v2(server, "oci/demo/oindex/manifests/v1"), headers={"Accept": OCI_INDEX})[0] == 200
        # skopeo through the proxy: the Docker list byte for byte, and both images
        image = UpstreamProxy(server).image("oci", "demo/dlist:v1")
        raw = skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{image}", home=tmp_path)
        assert raw.stdout.encode() == dlist.data
        r = pull(tmp_path, image, tmp_path / "out")  # an oci: layout converts the list to an OCI index
        assert r.returncode == 0, r.stderr
        out = tmp_path / "out" / "blobs" / "sha256"
        layers = [b for b in dblobs if b.media_type == DOCKER_LAYER]
        assert all((out / b.digest.split(":")[1]).read_bytes() == b.data for b in layers)


@pytest.mark.slow
def test_htpasswd_registry_with_blobs_redirected_to_another_host(
    peers: None, make_proxy: MakeProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index, blobs = multiarch(salt="basic")
    htpasswd = make_htpasswd(tmp_path / "htpasswd", PUSH_USER, PUSH_PASS)
    monkeypatch.setenv("OCI_USER", PUSH_USER)
    monkeypatch.setenv("OCI_PASS", PUSH_PASS)
    storage = tmp_path / "reg" / "storage"
    storage.mkdir(parents=True)
    with (
        FileServer(storage) as cdn,
        registry(tmp_path / "reg", htpasswd=htpasswd, redirect_to=cdn.url) as reg,
    ):
        push_oci(tmp_path, reg, "private/app", "v1", index, blobs, PUSH_USER, PUSH_PASS)
        assert http(f"{reg.url}/v2/private/app/manifests/v1")[0] == 401
        server = make_proxy(
            docker_proxy(reg.url, auth="basic", username_env="OCI_USER", password_env="OCI_PASS"),
            allow_hosts=(cdn.url.split("//")[1],),  # a loopback host: the SSRF guard's
        )
        r = pull(tmp_path, UpstreamProxy(server).image("oci", "private/app:v1"), tmp_path / "out")
        assert r.returncode == 0, r.stderr
        assert layout_top_digest(tmp_path / "out") == index.digest
        layers = {b.digest.split(":")[1] for b in blobs if b.media_type not in (OCI_INDEX, OCI_MANIFEST)}
        fetched = {path.split("/")[-2] for path, _ in cdn.requests}
        assert fetched >= layers  # the blobs came from the "CDN" ...
        assert all(
            "authorization" not in {k.lower() for k in h} for _, h in cdn.requests
        )  # ... without the password


@pytest.mark.slow
def test_token_auth_registry(
    peers: None, make_proxy: MakeProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    index, blobs = multiarch(salt="token")
    monkeypatch.setenv("OCI_USER", PUSH_USER)
    monkeypatch.setenv("OCI_PASS", PUSH_PASS)
    with (
        TokenServer(tmp_path, [(PUSH_USER, PUSH_PASS)]) as tokens,
        registry(tmp_path / "reg", token=tokens) as reg,
    ):
        push_oci(tmp_path, reg, "demo/tok", "v1", index, blobs, PUSH_USER, PUSH_PASS)
        realm = (tokens.url.split("//")[1],)  # the token server, on loopback: the SSRF guard's
        anon = make_proxy(docker_proxy(reg.url), cache=tmp_path / "c1", allow_hosts=realm)
        before = len(tokens.requests)
        r = pull(tmp_path, UpstreamProxy(anon).image("oci", "demo/tok:v1"), tmp_path / "anon")
        assert r.returncode == 0, r.stderr
        assert layout_top_digest(tmp_path / "anon") == index.digest
        # one anonymous pull token for the whole image (7 upstream requests), then reused
        assert tokens.requests[before:] == [
            {"scope": "repository:demo/tok:pull", "service": tokens.service, "user": ""}
        ]
        # anonymous pulls no longer allowed: the anonymous proxy explains, the one with credentials pulls
        tokens.require_user = True
        anon2 = make_proxy(docker_proxy(reg.url, key="oci2"), cache=tmp_path / "c2", allow_hosts=realm)
        status, body, _ = http(v2(anon2, "oci2/demo/tok/manifests/v1"), headers={"Accept": OCI_INDEX})
        assert status == 502 and "refused a token" in errors(body)[1]
        authed = make_proxy(
            docker_proxy(
                reg.url,
                auth="basic",
                username_env="OCI_USER",
                password_env="OCI_PASS",
                auth_hosts=[tokens.url.split("://", 1)[1].rstrip("/")],  # the realm is on another port
            ),
            cache=tmp_path / "c3",
            allow_hosts=realm,
        )
        r = pull(tmp_path, UpstreamProxy(authed).image("oci", "demo/tok:v1"), tmp_path / "authed")
        assert r.returncode == 0, r.stderr
        assert tokens.requests[-1]["user"] == PUSH_USER


def keyless_mirror_conf(path: Path, prefix: str, location: str, proxy: ProxyServer) -> Path:
    """A registries.conf whose mirror for ``prefix`` is the proxy's bare host:port (no key).

    The registry's own ``location`` is a dead loopback port, so a pull that succeeds came
    through the mirror (containers/image falls back to the location when mirrors fail).
    """
    hostport = proxy.base_url.split("://", 1)[1]
    path.write_text(
        f'[[registry]]\nprefix = "{prefix}"\nlocation = "{location}"\ninsecure = true\n\n'
        f'[[registry.mirror]]\nlocation = "{hostport}"\ninsecure = true\n'
    )
    return path


@pytest.mark.slow
def test_skopeo_pulls_through_a_keyless_registries_conf_mirror(
    peers: None, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    index, blobs = multiarch(salt="mirror")
    dead = f"127.0.0.1:{free_port()}"
    with registry(tmp_path / "reg") as reg:
        push_oci(tmp_path, reg, "library/demo", "v1", index, blobs)
        for tag in ("v2", "v3"):  # more tags, for the pages below
            status, _, _ = http(
                f"{reg.url}/v2/library/demo/manifests/{tag}",
                method="PUT",
                headers={"Content-Type": OCI_INDEX},
                data=index.data,
            )
            assert status == 201
        # Docker Hub's image names, as a daemon's registry-mirrors entry sends them: the
        # single dockerhub-source proxy is the mirror without being marked
        hub = make_proxy(proxy_def(key="hub", source="dockerhub", url=reg.url + "/"), cache=tmp_path / "c1")
        domain = IMAGE_DOMAINS["dockerhub"]
        conf = keyless_mirror_conf(tmp_path / "hub.conf", domain, dead, hub)
        r = pull(tmp_path, f"{domain}/demo:v1", tmp_path / "hub-out", conf=conf, tls=True)
        assert r.returncode == 0, r.stderr
        assert layout_top_digest(tmp_path / "hub-out") == index.digest
        assert {rec.path for rec in hub.served.records} >= set(blob_paths("library/demo", blobs))
        assert {rec.key for rec in hub.served.records} == {"hub"}
        # any registry: the docker proxy marked mirror = true
        corp = make_proxy(docker_proxy(reg.url, mirror=True), cache=tmp_path / "c2")
        conf = keyless_mirror_conf(tmp_path / "corp.conf", dead, dead, corp)
        r = pull(tmp_path, f"{dead}/library/demo:v1", tmp_path / "corp-out", conf=conf, tls=True)
        assert r.returncode == 0, r.stderr
        assert layout_top_digest(tmp_path / "corp-out") == index.digest
        assert {rec.path for rec in corp.served.records} >= set(blob_paths("library/demo", blobs))
        # the tag list, keyless; distribution 2.8 ignores n (its tags/list has no pages: the
        # fake registry and skopeo list-tags below cover Link), so both answers are whole
        direct = http(f"{reg.url}/v2/library/demo/tags/list?n=1")
        proxied = http(v2(corp, "library/demo/tags/list?n=1"))
        assert proxied[:2] == direct[:2] and json.loads(direct[1])["tags"] == ["v1", "v2", "v3"]
        assert "Link" not in direct[2] and "Link" not in proxied[2]


@pytest.mark.slow
def test_skopeo_lists_tag_pages_through_the_proxy(
    fake: FakeRegistry, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    require_peer("skopeo", install="scripts/peers/docker.sh")
    fake.tags["demo/app"] = [f"v{i}" for i in range(7)]
    fake.tags_page = 3  # the registry cuts pages by itself; skopeo follows rel="next"
    proxy = make_proxy(docker_proxy(fake.url))
    image = UpstreamProxy(proxy).image("oci", "demo/app")
    r = skopeo("list-tags", "--tls-verify=false", f"docker://{image}", home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["Tags"] == [f"v{i}" for i in range(7)]
    assert [p for p, _ in fake.requests if "/tags/list" in p] == [
        "/v2/demo/app/tags/list",
        "/v2/demo/app/tags/list?n=3&last=v2",
        "/v2/demo/app/tags/list?n=3&last=v5",
    ]
