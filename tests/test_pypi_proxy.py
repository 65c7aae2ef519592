"""The pypi format end to end: a real ProxyServer in front of a static PEP 503 tree on loopback."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

from fixtures.build_wheels import DISTS, build_wheel, write_tree
from pytest_upstream.formats.pypi_pages import HTML_V1, JSON_V1, UPSTREAM_ACCEPT, FileLink, parse_page
from pytest_upstream.server.proxy_server import ProxyServer

from .conftest import MakeProxy, proxy_def
from .upstreams import Upstream

PIP_ACCEPT = f"{JSON_V1}, {HTML_V1}; q=0.1, text/html; q=0.01"
DEMO_A = next(d for d in DISTS if d.name == "upstream-demo-a")
DEMO_B = next(d for d in DISTS if d.name == "upstream-demo-b")
PAGE_A = "/py/simple/upstream-demo-a/"
PROJECTS = ["upstream-demo-a", "upstream-demo-b"]
CACHE = "X-Upstream-Cache"


def _publish_tree(up: Upstream, root: Path) -> None:
    """Serve a tree written by ``write_tree`` the way a static web server would."""
    for file in sorted(root.rglob("*")):
        if not file.is_file():
            continue
        rel = file.relative_to(root).as_posix()
        if file.name == "index.html":
            path = "/" + rel[: -len("index.html")]
            up.content_types[path] = "text/html; charset=utf-8"
        else:
            path = "/" + rel
        up.files[path] = file.read_bytes()


@pytest.fixture
def tree(tmp_path: Path, upstream: Upstream) -> Path:
    root = tmp_path / "tree"
    write_tree(root)
    _publish_tree(upstream, root)
    return root


@pytest.fixture
def proxy(tree: Path, upstream: Upstream, make_proxy: MakeProxy) -> ProxyServer:
    return make_proxy(proxy_def(key="py", format="pypi", url=f"{upstream.url}/simple/"))


@pytest.fixture
def client(proxy: ProxyServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=proxy.base_url, trust_env=False, timeout=30) as c:
        yield c


def _files(resp: httpx.Response) -> dict[str, FileLink]:
    page = parse_page(resp.content, str(resp.url), root=False)
    return {f.filename: f for f in page.files}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_hits(up: Upstream) -> int:
    return sum(n for path, n in up.hits.items() if path.startswith("/files/"))


# -- index pages ------------------------------------------------------------------
def test_html_and_json_by_accept_from_one_upstream_fetch(
    client: httpx.Client, proxy: ProxyServer, upstream: Upstream, tree: Path
) -> None:
    wheel = (tree / "files" / DEMO_A.filename).read_bytes()
    html = client.get(PAGE_A, headers={"Accept": "text/html"})
    assert html.status_code == 200
    assert html.headers["content-type"].startswith("text/html")
    assert html.headers["vary"] == "Accept"
    assert html.headers[CACHE] == "miss"
    assert f'href="../../files/upstream-demo-a/{DEMO_A.filename}#sha256={_sha(wheel)}"' in html.text
    assert upstream.url.split("//")[1] not in html.text  # no link leads around the proxy

    as_json = client.get(PAGE_A, headers={"Accept": PIP_ACCEPT})
    assert as_json.status_code == 200
    assert as_json.headers["content-type"] == JSON_V1
    assert as_json.headers["vary"] == "Accept"
    assert as_json.headers[CACHE] == "hit"
    data = json.loads(as_json.content)
    assert data["name"] == "upstream-demo-a"
    assert [f["url"] for f in data["files"]] == [f"../../files/upstream-demo-a/{DEMO_A.filename}"]

    v1 = client.get(PAGE_A, headers={"Accept": HTML_V1})
    assert v1.headers["content-type"] == HTML_V1
    default = client.get(PAGE_A)  # httpx sends */*
    assert default.headers["content-type"].startswith("text/html")
    assert client.get(PAGE_A, headers={"Accept": "application/json"}).status_code == 406

    for resp in (html, as_json, v1):
        (link,) = _files(resp).values()
        assert link.filename == DEMO_A.filename
        assert link.url == f"{proxy.base_url}/py/files/upstream-demo-a/{DEMO_A.filename}"
        assert link.hashes == {"sha256": _sha(wheel)}
        assert link.requires_python == ">=3.8"
        assert link.core_metadata == {"sha256": _sha(DEMO_A.metadata().encode())}
    assert html.headers["etag"] != as_json.headers["etag"]  # one ETag per representation

    assert upstream.hits["/simple/upstream-demo-a/"] == 1  # one fetch served every representation
    sent = dict(upstream.request_headers)["/simple/upstream-demo-a/"]
    assert sent["Accept"] == UPSTREAM_ACCEPT


def test_non_normalised_names_redirect(client: httpx.Client, upstream: Upstream) -> None:
    for path in ("/py/simple/Upstream_Demo.A/", "/py/simple/UPSTREAM-demo--a", "/py/simple/upstream-demo-a"):
        resp = client.get(path)
        assert resp.status_code == 301, path
        assert resp.headers["location"] == PAGE_A
    assert not upstream.hits  # answered without asking the upstream
    assert client.get("/py/simple/Upstream_Demo.A/", follow_redirects=True).status_code == 200


def test_root_listing(client: httpx.Client, upstream: Upstream) -> None:
    html = client.get("/py/simple/", headers={"Accept": "text/html"})
    assert html.status_code == 200
    assert parse_page(html.content, str(html.url), root=True).projects == PROJECTS
    assert 'href="upstream-demo-a/"' in html.text
    as_json = client.get("/py/simple/", headers={"Accept": JSON_V1})
    assert as_json.headers["content-type"] == JSON_V1
    assert [p["name"] for p in json.loads(as_json.content)["projects"]] == PROJECTS
    assert as_json.headers[CACHE] == "hit"
    assert upstream.hits["/simple/"] == 1
    # the root's relative links lead to the project pages, through the proxy
    project = client.get(urljoin(str(html.url), "upstream-demo-b/"))
    assert project.status_code == 200
    assert DEMO_B.filename in _files(project)


# -- files --------------------------------------------------------------------
def test_file_from_page_downloads_exact_bytes_then_hits(
    client: httpx.Client, upstream: Upstream, tree: Path
) -> None:
    wheel = (tree / "files" / DEMO_A.filename).read_bytes()
    page = client.get(PAGE_A)
    link = _files(page)[DEMO_A.filename]
    first = client.get(link.url)
    assert first.status_code == 200
    assert first.content == wheel
    assert _sha(first.content) == link.hashes["sha256"]
    assert first.headers[CACHE] == "miss"
    assert upstream.hits[f"/files/{DEMO_A.filename}"] == 1

    second = client.get(link.url)
    assert second.status_code == 200
    assert second.content == wheel
    assert second.headers[CACHE] == "hit"
    assert second.headers["etag"] == f'"sha256-{_sha(wheel)}"'
    assert second.headers["accept-ranges"] == "bytes"
    again = client.get(PAGE_A)
    assert again.headers[CACHE] == "hit"
    assert upstream.hits[f"/files/{DEMO_A.filename}"] == 1
    assert upstream.hits["/simple/upstream-demo-a/"] == 1


def test_metadata_file_served_and_verified(client: httpx.Client, upstream: Upstream) -> None:
    link = _files(client.get(PAGE_A))[DEMO_A.filename]
    assert isinstance(link.core_metadata, dict)
    resp = client.get(link.url + ".metadata")
    assert resp.status_code == 200
    assert resp.content == DEMO_A.metadata().encode()
    assert _sha(resp.content) == link.core_metadata["sha256"]
    assert client.get(link.url + ".metadata").headers[CACHE] == "hit"
    assert upstream.hits[f"/files/{DEMO_A.filename}.metadata"] == 1
    assert upstream.hits[f"/files/{DEMO_A.filename}"] == 0  # pip reads the metadata, not the wheel


def test_bytes_not_matching_the_index_hash_are_refused(client: httpx.Client, upstream: Upstream) -> None:
    wheel_path = f"/files/{DEMO_A.filename}"
    good_wheel, good_meta = upstream.files[wheel_path], upstream.files[wheel_path + ".metadata"]
    upstream.files[wheel_path] = good_wheel[:-1] + bytes([good_wheel[-1] ^ 1])
    upstream.files[wheel_path + ".metadata"] = b"Metadata-Version: 2.1\nName: evil\n"
    url = f"/py/files/upstream-demo-a/{DEMO_A.filename}"
    for path in (url, url + ".metadata"):
        resp = client.get(path)
        assert resp.status_code == 502, path
        assert "mismatch" in resp.text
    # nothing was stored: with the right bytes upstream they are fetched again
    upstream.files[wheel_path], upstream.files[wheel_path + ".metadata"] = good_wheel, good_meta
    assert client.get(url).content == good_wheel
    assert client.get(url + ".metadata").content == good_meta
    assert upstream.hits[wheel_path] == 2


def test_filename_not_on_the_page_is_404(client: httpx.Client, upstream: Upstream) -> None:
    for path in (
        "/py/files/upstream-demo-a/upstream_demo_a-9.9-py3-none-any.whl",
        f"/py/files/upstream-demo-a/{DEMO_B.filename}",  # listed, but on another project's page
        f"/py/files/upstream-demo-a/{DEMO_A.filename}.asc",
        f"/py/files/Upstream_Demo_A/{DEMO_A.filename}",  # files live under the normalised name
        f"/py/files/no-such-project/{DEMO_A.filename}",
    ):
        assert client.get(path).status_code == 404, path
    assert _file_hits(upstream) == 0  # the proxy fetches only URLs an index listed


def test_if_none_match_gives_304(client: httpx.Client) -> None:
    page = client.get(PAGE_A, headers={"Accept": "text/html"})
    etag = page.headers["etag"]
    cond = client.get(PAGE_A, headers={"Accept": "text/html", "If-None-Match": etag})
    assert cond.status_code == 304
    assert cond.content == b""
    assert cond.headers["etag"] == etag
    # the ETag names the HTML rendering: asking for JSON gets the JSON
    other = client.get(PAGE_A, headers={"Accept": JSON_V1, "If-None-Match": etag})
    assert other.status_code == 200
    assert other.headers["content-type"] == JSON_V1

    url = _files(page)[DEMO_A.filename].url
    file_etag = client.get(url).headers["etag"]
    assert client.get(url, headers={"If-None-Match": file_etag}).status_code == 304
    assert client.get(url, headers={"If-None-Match": '"sha256-other"'}).status_code == 200


def test_range_on_a_cached_file(client: httpx.Client, upstream: Upstream, tree: Path) -> None:
    wheel = (tree / "files" / DEMO_A.filename).read_bytes()
    url = f"/py/files/upstream-demo-a/{DEMO_A.filename}"
    assert client.get(url).content == wheel  # cache it
    part = client.get(url, headers={"Range": "bytes=0-9"})
    assert part.status_code == 206
    assert part.content == wheel[:10]
    assert part.headers["content-range"] == f"bytes 0-9/{len(wheel)}"
    assert part.headers[CACHE] == "hit"
    tail = client.get(url, headers={"Range": "bytes=-5"})
    assert tail.status_code == 206
    assert tail.content == wheel[-5:]
    assert upstream.hits[f"/files/{DEMO_A.filename}"] == 1


# -- pages whose links lead elsewhere --------------------------------------------
def test_links_to_another_host_go_through_the_proxy(
    upstream: Upstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    wheel = build_wheel(DEMO_B)
    meta = DEMO_B.metadata().encode()
    with Upstream() as files_host:
        assert urlsplit(files_host.url).port != urlsplit(upstream.url).port
        files_host.files[f"/pkgs/{DEMO_B.filename}"] = wheel
        files_host.files[f"/pkgs/{DEMO_B.filename}.metadata"] = meta
        upstream.files["/simple/upstream-demo-b/"] = (
            f'<html><body><a href="{files_host.url}/pkgs/{DEMO_B.filename}#sha256={_sha(wheel)}" '
            f'data-requires-python="&gt;=3.8" data-core-metadata="sha256={_sha(meta)}">{DEMO_B.filename}</a>'
            "</body></html>"
        ).encode()
        upstream.content_types["/simple/upstream-demo-b/"] = "text/html"
        proxy = make_proxy(
            proxy_def(key="py", format="pypi", url=f"{upstream.url}/simple/"),
            allow_hosts=(files_host.url.split("//")[1],),  # a loopback host: the SSRF guard's
        )
        with httpx.Client(base_url=proxy.base_url, trust_env=False, timeout=30) as client:
            page = client.get("/py/simple/upstream-demo-b/", headers={"Accept": "text/html"})
            assert page.status_code == 200
            assert files_host.url.split("//")[1] not in page.text
            link = _files(page)[DEMO_B.filename]
            assert link.url == f"{proxy.base_url}/py/files/upstream-demo-b/{DEMO_B.filename}"
            assert link.requires_python == ">=3.8"
            resp = client.get(link.url)
            assert resp.status_code == 200
            assert resp.content == wheel
            assert client.get(link.url + ".metadata").content == meta
            assert client.get(link.url).headers[CACHE] == "hit"
        assert files_host.hits[f"/pkgs/{DEMO_B.filename}"] == 1
        assert files_host.hits[f"/pkgs/{DEMO_B.filename}.metadata"] == 1
    assert _file_hits(upstream) == 0


def test_json_upstream_page_rendered_as_html(
    upstream: Upstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    wheel = build_wheel(DEMO_A)
    upstream.files[f"/packages/{DEMO_A.filename}"] = wheel
    upstream.files["/simple/upstream-demo-a/"] = json.dumps(
        {
            "meta": {"api-version": "1.1"},
            "name": "upstream-demo-a",
            "versions": ["1.0"],
            "files": [
                {
                    "filename": DEMO_A.filename,
                    "url": f"../../packages/{DEMO_A.filename}",
                    "hashes": {"sha256": _sha(wheel)},
                    "requires-python": ">=3.8",
                    "yanked": "do not use",
                    "size": len(wheel),
                }
            ],
        }
    ).encode()
    upstream.content_types["/simple/upstream-demo-a/"] = JSON_V1
    proxy = make_proxy(proxy_def(key="py", format="pypi", url=f"{upstream.url}/simple/"))
    with httpx.Client(base_url=proxy.base_url, trust_env=False, timeout=30) as client:
        html = client.get(PAGE_A, headers={"Accept": "text/html"})
        assert html.headers["content-type"].startswith("text/html")
        link = _files(html)[DEMO_A.filename]
        assert link.yanked == "do not use"
        assert link.hashes == {"sha256": _sha(wheel)}
        as_json = json.loads(client.get(PAGE_A, headers={"Accept": JSON_V1}).content)
        assert as_json["versions"] == ["1.0"]
        assert as_json["files"][0]["size"] == len(wheel)
        assert client.get(link.url).content == wheel
    assert upstream.hits["/simple/upstream-demo-a/"] == 1
