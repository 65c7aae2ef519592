"""Content codings from the upstream, byte ranges and where credentials go."""

from __future__ import annotations

import gzip
import json
import urllib.request
from pathlib import Path

import pytest

from .conftest import MakeProxy, proxy_def
from .upstreams import Fault, Upstream


def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    req = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status, r.read(), {k.lower(): v for k, v in r.headers.items()}


def test_gzip_encoded_upstream_answers_are_stored_decoded(upstream: Upstream, make_proxy: MakeProxy) -> None:
    payload = b"artifact bytes " * 1000
    upstream.files["/a.bin"] = gzip.compress(payload)
    upstream.faults["/a.bin"] = Fault(headers={"Content-Encoding": "gzip"})
    page = {
        "meta": {"api-version": "1.0"},
        "name": "demo",
        "files": [{"filename": "demo-1.0.tar.gz", "url": "/f/demo-1.0.tar.gz", "hashes": {}}],
    }
    upstream.files["/simple/demo/"] = gzip.compress(json.dumps(page).encode())
    upstream.content_types["/simple/demo/"] = "application/vnd.pypi.simple.v1+json"
    upstream.faults["/simple/demo/"] = Fault(headers={"Content-Encoding": "gzip"})
    proxy = make_proxy(
        proxy_def(key="g", format="generic", url=upstream.url),
        proxy_def(key="p", format="pypi", url=upstream.url + "/simple/"),
    )
    status, body, headers = fetch(proxy.url("g") + "a.bin")
    assert (status, body) == (200, payload)
    assert "content-encoding" not in headers
    assert fetch(proxy.url("g") + "a.bin")[1] == payload  # the hit serves the decoded bytes too
    status, body, _ = fetch(proxy.url("p") + "simple/demo/")
    assert status == 200 and b"demo-1.0.tar.gz" in body


@pytest.mark.parametrize(
    ("range_header", "status", "expected"),
    [
        ("bytes=0-9", 206, slice(0, 10)),
        ("bytes=10-", 206, slice(10, None)),
        ("bytes=-5", 206, slice(-5, None)),
        ("bytes=0-4,10-14", 200, slice(None)),  # several ranges: the whole file
        ("items=1-2", 200, slice(None)),  # a unit we do not know: the whole file
    ],
)
def test_ranges_on_cached_files(
    upstream: Upstream, make_proxy: MakeProxy, range_header: str, status: int, expected: slice
) -> None:
    data = bytes(range(256)) * 4
    upstream.files["/r.bin"] = data
    proxy = make_proxy(proxy_def(key="g", format="generic", url=upstream.url))
    fetch(proxy.url("g") + "r.bin")
    got_status, body, headers = fetch(proxy.url("g") + "r.bin", {"Range": range_header})
    assert (got_status, body) == (status, data[expected])
    if status == 206:
        assert headers["content-range"].endswith(f"/{len(data)}")


def test_unsatisfiable_range_is_416(upstream: Upstream, make_proxy: MakeProxy) -> None:
    import urllib.error

    upstream.files["/r.bin"] = b"0123456789"
    proxy = make_proxy(proxy_def(key="g", format="generic", url=upstream.url))
    fetch(proxy.url("g") + "r.bin")
    with pytest.raises(urllib.error.HTTPError) as info:
        fetch(proxy.url("g") + "r.bin", {"Range": "bytes=50-60"})
    assert info.value.code == 416
    assert info.value.headers["Content-Range"] == "bytes */10"


def test_credentials_go_only_to_the_configured_origin(
    make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A private index linking files on another host must not leak its token there."""
    monkeypatch.setenv("IDX_TOKEN", "tok-only-for-the-index")
    with Upstream() as index, Upstream() as files:
        files.files["/f/demo-1.0.tar.gz"] = b"sdist"
        page = f'<a href="{files.url}/f/demo-1.0.tar.gz">demo-1.0.tar.gz</a>'
        index.files["/simple/demo/"] = page.encode()
        index.content_types["/simple/demo/"] = "text/html"
        proxy = make_proxy(
            proxy_def(
                key="p", format="pypi", url=index.url + "/simple/", auth="bearer", token_env="IDX_TOKEN"
            ),
            allow_hosts=(files.url.split("//")[1],),  # a loopback host: the SSRF guard's
        )
        assert fetch(proxy.url("p") + "files/demo/demo-1.0.tar.gz")[1] == b"sdist"
        index_auth = {k.lower(): v for k, v in index.request_headers[-1][1].items()}.get("authorization")
        files_auth = {k.lower(): v for k, v in files.request_headers[-1][1].items()}.get("authorization")
    assert index_auth == "Bearer tok-only-for-the-index"
    assert files_auth is None


def test_simple_without_slash_redirects(upstream: Upstream, make_proxy: MakeProxy) -> None:
    import http.client

    proxy = make_proxy(proxy_def(key="p", format="pypi", url=upstream.url + "/simple/"))
    host, port = proxy.base_url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request("GET", "/p/simple")
    resp = conn.getresponse()
    assert (resp.status, resp.getheader("Location")) == (301, "/p/simple/")
    conn.close()
