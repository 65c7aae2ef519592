"""``GET /-/ui/`` without a browser (docs/ui.md): the query's bounds, the artifact index kept
current (by this process and by another one writing the same cache), the view models, and the
HTTP side (read-only, the token and its cookie, the Host check, the security headers, escaping).
The browser drives the same pages in tests/test_ui_browser.py."""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_upstream.config.settings import Settings
from pytest_upstream.engine.artifact_index import SETTLE, ArtifactIndex, Row
from pytest_upstream.repro.lockfile import LockFile, LockFileEntry
from pytest_upstream.server.access_log import without_token
from pytest_upstream.server.proxy_server import ProxyServer
from pytest_upstream.server.ui.listing import list_page
from pytest_upstream.server.ui.overview import overview
from pytest_upstream.server.ui.query import DEFAULT_PAGE_SIZE, MAX_FILTER, MAX_PAGE, ListQuery
from pytest_upstream.server.ui.values import shown_url
from pytest_upstream.store.cache import Cache
from pytest_upstream.store.entry import Entry

from .conftest import proxy_def
from .upstreams import Upstream

HOSTILE_NAME = "<img src=x onerror=alert(1)>"
HOSTILE_VERSION = '1.0"><script>alert(2)</script>'
TOKEN = "ui-token-0123456789abcdef"


def put(cache: Cache, key: str, path: str, data: bytes, kind: str = "artifact", **fields: object) -> Entry:
    """Store ``data`` as ``key``'s entry for ``path`` (the store's own writers)."""
    sha = cache.store_bytes(data)
    url = "http://upstream.invalid/" + urllib.parse.quote(path)
    entry = Entry(key, path, "", url, sha, len(data), kind, time.time() - 60, **fields)  # type: ignore[arg-type]
    return cache.store_entry(entry)


def settings_for(cache_dir: Path, url: str = "http://127.0.0.1:9/", **fields: object) -> Settings:
    url = url.rstrip("/") + "/"
    proxies = (
        proxy_def(key="gen", format="generic", url=url),
        proxy_def(key="npm", format="npm", url=url),
        proxy_def(key="py", format="pypi", url=url + "simple/"),
    )
    return Settings(cache_dir=cache_dir, proxies=proxies, **fields)  # type: ignore[arg-type]


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ProxyServer]:
    monkeypatch.setenv("UI_TOKEN", TOKEN)
    cache = Cache(tmp_path / "cache")
    put(cache, "gen", HOSTILE_NAME, b"hostile")
    put(cache, "gen", "docs/readme.txt", b"hello")
    put(cache, "npm", f"evil/-/evil-{HOSTILE_VERSION}.tgz", b"tgz")
    put(cache, "py", "files/demo/demo-1.0-py3-none-any.whl", b"wheel")
    with ProxyServer(settings_for(tmp_path / "cache", client_token_env="UI_TOKEN")) as started:
        yield started


def request(
    server: ProxyServer, target: str, *, method: str = "GET", headers: str = ""
) -> tuple[str, str, str]:
    """(status line, head, body) of one raw request (a browser's headers are just lines)."""
    host, port = server.base_url.removeprefix("http://").rsplit(":", 1)
    head = f"{method} {target} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n{headers}\r\n"
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    top, _, body = data.decode().partition("\r\n\r\n")
    return top.split("\r\n", 1)[0], top, body


def bearer(token: str = TOKEN) -> str:
    return f"Authorization: Bearer {token}\r\n"


# -- the query string ----------------------------------------------------------------------------
def test_list_query_bounds_every_value() -> None:
    q = ListQuery.parse("q=" + "x" * 5000 + "&sort=__class__&order=up&page=99999999999&per=100000&kind=<b>")
    assert len(q.text) == MAX_FILTER and q.sort == "name" and not q.descending
    assert q.page == 1 and q.per_page == DEFAULT_PAGE_SIZE and q.kind == ""  # 11 digits: not a page
    assert ListQuery.parse("page=999999999").page == MAX_PAGE
    assert ListQuery.parse("page=%C2%B2&per=-5").page == 1  # a superscript two is no digit here
    q = ListQuery.parse("q=%20demo%20%20a%20&sort=size&order=desc&page=3&per=25&kind=artifact")
    assert (q.text, q.sort, q.descending, q.page, q.per_page, q.kind) == (
        "demo a",
        "size",
        True,
        3,
        25,
        "artifact",
    )
    assert q.query_string(page=4) == "?q=demo+a&kind=artifact&sort=size&order=desc&page=4&per=25"
    assert q.sort_link("size") == "?q=demo+a&kind=artifact&sort=size&per=25"  # the other way, page 1
    assert ListQuery().sort_link("hits") == "?sort=hits&order=desc"  # counts: the largest first


# -- the index -----------------------------------------------------------------------------------
def test_index_sees_what_another_process_writes_and_removes(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    settings = settings_for(tmp_path / "cache")
    index = ArtifactIndex(cache, lambda: settings)
    index.start()
    assert index.wait_scanned(10)
    assert index.rows("gen")[0] == []
    other = Cache(tmp_path / "cache")  # another process's view of the same directory
    first = put(other, "gen", "a.txt", b"a")
    rows, generation = index.rows("gen")
    assert [r.path for r in rows] == ["a.txt"]
    # Written again at once (within the directory mtime's tick): the directory is looked at
    # again while its mtime is too recent to trust, so the second write is seen too.
    second = put(other, "gen", "b.txt", b"b")
    if first.id[:2] != second.id[:2]:
        put(other, "gen", "a2.txt", b"a2")
    rows, later = index.rows("gen")
    assert {"a.txt", "b.txt"} <= {r.path for r in rows} and later > generation
    os.unlink(cache.layout.entry("gen", first.id))
    assert "a.txt" not in {r.path for r in index.rows("gen")[0]}
    assert SETTLE > 0


def test_index_reads_only_the_directories_that_moved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = Cache(tmp_path / "cache")
    for i in range(40):
        put(cache, "gen", f"f{i}.txt", b"x%d" % i)
    index = ArtifactIndex(cache, lambda: settings_for(tmp_path / "cache"))
    old = time.time() - 3600  # settled directories: their mtime is trusted
    for sub in (cache.entries / "gen").iterdir():
        os.utime(sub, (old, old))
    assert len(index.rows("gen")[0]) == 40
    parsed: list[str] = []
    real = index._read

    def counted(key: str, directory: str, eid: str) -> object:
        parsed.append(eid)
        return real(key, directory, eid)

    monkeypatch.setattr(index, "_read", counted)
    assert len(index.rows("gen")[0]) == 40 and parsed == []  # nothing moved: nothing read
    new = put(cache, "gen", "new.txt", b"new")
    assert len(index.rows("gen")[0]) == 41 and parsed == [new.id]  # one file parsed, not 41


def test_engine_keeps_the_index_current_and_counts_hits(tmp_path: Path) -> None:
    with Upstream() as upstream:
        upstream.files["/pkg/a.txt"] = b"first"
        with ProxyServer(settings_for(tmp_path / "cache", url=upstream.url)) as proxy:
            index = proxy.engine.artifacts
            index.start()
            assert index.wait_scanned(10)
            index.rows("gen")  # the key is known to the index (read once)
            for _ in range(3):
                with urllib.request.urlopen(proxy.url("gen") + "pkg/a.txt") as r:
                    assert r.read() == b"first"
            row = next(r for r in index.rows("gen")[0] if r.path == "pkg/a.txt")
            assert row.hits == 2 and row.size == 5  # the miss stored it, two hits counted
            assert row.last_served >= row.fetched_at


# -- the view models -----------------------------------------------------------------------------
def test_list_page_filters_sorts_and_pages(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    for i in range(30):
        put(cache, "py", f"files/proj{i % 3}/proj{i % 3}-1.{i}-py3-none-any.whl", b"w" * (i + 1))
    with ProxyServer(settings_for(tmp_path / "cache")) as proxy:
        page = list_page(proxy.engine, "py", ListQuery.parse("q=PROJ1&sort=size&order=desc&per=25"))
        assert page.total == 30 and page.matched == 10 and page.pages == 1
        assert [r.name for r in page.rows] == ["proj1"] * 10
        assert [r.version for r in page.rows][:3] == ["1.28", "1.25", "1.22"]  # pypi's version, largest first
        second = list_page(proxy.engine, "py", ListQuery.parse("per=25&page=2"))
        assert len(second.rows) == 5 and second.query.page == 2 and second.pages == 2
        past = list_page(proxy.engine, "py", ListQuery.parse("per=25&page=9"))
        assert past.query.page == 2  # a page past the end shows the last one


# -- HTTP: read-only, admission, headers, escaping -----------------------------------------------
def test_ui_is_read_only(server: ProxyServer) -> None:
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        status, head, _ = request(
            server, "/-/ui/gen/", method=method, headers=bearer() + "Content-Length: 0\r\n"
        )
        assert status.startswith("HTTP/1.1 405 ") and "Allow: GET, HEAD" in head, (method, status)
    status, head, body = request(server, "/-/ui/gen/", method="HEAD", headers=bearer())
    assert status.startswith("HTTP/1.1 200 ") and body == ""


def test_ui_security_headers_and_escaping(server: ProxyServer) -> None:
    status, head, body = request(server, "/-/ui/gen/", headers=bearer())
    assert status.startswith("HTTP/1.1 200 ")
    for line in (
        "Content-Security-Policy: default-src 'none'; script-src 'self'; style-src 'self'",
        "X-Content-Type-Options: nosniff",
        "Cache-Control: no-store",
        "Referrer-Policy: no-referrer",
        "Content-Type: text/html; charset=utf-8",
    ):
        assert line in head
    assert "&lt;img src=x onerror=alert(1)&gt;" in body and "<img" not in body
    assert "<script>" not in body.split("</head>", 1)[1]  # the one script is the static file in <head>
    _, _, npm = request(server, "/-/ui/npm/", headers=bearer())
    assert "1.0&#34;&gt;&lt;script&gt;alert(2)&lt;/script&gt;" in npm and "<script>alert" not in npm
    _, _, overview = request(server, "/-/ui/", headers=bearer())
    assert 'href="/-/ui/gen/"' in overview and "hit rate" in overview


def test_ui_needs_the_token_and_a_browser_gets_a_cookie_not_the_token(
    server: ProxyServer, caplog: pytest.LogCaptureFixture
) -> None:
    assert request(server, "/-/ui/")[0].startswith("HTTP/1.1 401 ")
    assert request(server, "/-/ui/gen/?token=wrong")[0].startswith("HTTP/1.1 401 ")
    assert request(server, "/-/ui/", headers=bearer("wrong"))[0].startswith("HTTP/1.1 401 ")
    with caplog.at_level(logging.INFO, logger="pytest_upstream.access"):
        status, head, _ = request(server, f"/-/ui/gen/?q=readme&token={TOKEN}")
    assert status.startswith("HTTP/1.1 303 ") and "Location: /-/ui/gen/?q=readme\r\n" in head
    cookie_line = next(line for line in head.split("\r\n") if line.startswith("Set-Cookie: "))
    assert "HttpOnly" in cookie_line and "SameSite=Strict" in cookie_line and "Path=/-/ui/" in cookie_line
    assert TOKEN not in head and TOKEN not in caplog.text and "token=<redacted>" in caplog.text
    cookie = cookie_line.removeprefix("Set-Cookie: ").split(";")[0]
    status, _, body = request(server, "/-/ui/gen/?q=readme", headers=f"Cookie: other=1; {cookie}\r\n")
    assert status.startswith("HTTP/1.1 200 ") and "docs/readme.txt" in body and "onerror" not in body
    # The cookie opens the UI only: not a proxy key, nor /-/metrics.
    assert request(server, "/gen/docs/readme.txt", headers=f"Cookie: {cookie}\r\n")[0].startswith(
        "HTTP/1.1 401 "
    )
    assert request(server, "/-/metrics", headers=f"Cookie: {cookie}\r\n")[0].startswith("HTTP/1.1 401 ")
    forged = cookie.split("=")[0] + "=" + "0" * 64
    assert request(server, "/-/ui/", headers=f"Cookie: {forged}\r\n")[0].startswith("HTTP/1.1 401 ")


def test_ui_obeys_the_host_check(server: ProxyServer) -> None:
    port = server.base_url.rsplit(":", 1)[1]
    with socket.create_connection(("127.0.0.1", int(port)), timeout=10) as sock:
        sock.sendall(f"GET /-/ui/ HTTP/1.1\r\nHost: rebound.example:{port}\r\n{bearer()}\r\n".encode())
        assert sock.recv(100).startswith(b"HTTP/1.1 421 ")


def test_ui_detail_shows_the_digest_and_the_pins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = Cache(tmp_path / "cache")
    entry = put(cache, "py", "files/demo/demo-1.0-py3-none-any.whl", b"wheel", headers={})
    lock = tmp_path / "keep.lock.json"
    LockFile([LockFileEntry("py", entry.path, "", entry.sha256, entry.size, entry.kind)]).save(lock)
    settings = settings_for(tmp_path / "cache", keep_locks=(lock,))
    with ProxyServer(settings) as proxy:
        status, _, body = request(proxy, f"/-/ui/py/{entry.id}")
        assert status.startswith("HTTP/1.1 200 ")
        assert f'id="field-sha256">{entry.sha256}<' in body and "demo" in body
        assert f"{lock} (--keep-lock): names this entry and its bytes" in body
        assert request(proxy, "/-/ui/py/" + "0" * 64)[0].startswith("HTTP/1.1 404 ")
        assert request(proxy, "/-/ui/nokey/")[0].startswith("HTTP/1.1 404 ")
        assert request(proxy, "/-/ui/py")[1].count("Location: /-/ui/py/") == 1
        assert request(proxy, "/-/ui/-/static/ui_script.js")[1].count("text/javascript") == 1


def test_overview_shows_health_modes_and_the_metrics_counters(tmp_path: Path) -> None:
    settings = settings_for(tmp_path / "cache")
    offline = proxy_def(key="off", format="generic", url="http://127.0.0.1:9/", offline=True)
    settings = Settings(cache_dir=settings.cache_dir, proxies=(*settings.proxies, offline), mode="refresh")
    with ProxyServer(settings) as proxy:
        engine = proxy.engine
        for _ in range(settings.health.failures):
            engine.health.failed("gen", "connection refused")
        for result in ("hit", "hit", "hit", "miss", "error"):
            engine.metrics.request("py", result, 10)
        view = overview(engine)
        by_key = {p.key: p for p in view.proxies}
        assert (
            by_key["gen"].health == "backed off"
            and f"UTC, {settings.health.failures} failures in a row" in by_key["gen"].health_note
        )
        assert by_key["off"].health == "offline" and by_key["npm"].health == "up"
        assert by_key["py"].requests == 5 and by_key["py"].hit_rate == "75%"  # errors served nothing
        assert by_key["npm"].hit_rate == "-" and {p.mode for p in view.proxies} == {"refresh"}
        assert view.gauges["connections_total"] >= 0
        status, _, body = request(proxy, "/-/ui/-/counters.json")
        assert status.startswith("HTTP/1.1 200 ")
        assert json.loads(body)["proxies"]["py"] == {
            "requests": 5,
            "hit_rate": "75%",
            "hit": 3,
            "miss": 1,
            "error": 1,
            "bytes_cache": 30,
            "bytes_upstream": 10,
        }
        assert (
            shown_url(engine, "http://user:s3cret@up.example:8080/simple/")
            == "http://up.example:8080/simple/"
        )


def test_ui_refuses_oversized_queries(server: ProxyServer) -> None:
    many = "&".join(f"f{i}=1" for i in range(40))
    assert request(server, f"/-/ui/gen/?{many}", headers=bearer())[0].startswith("HTTP/1.1 400 ")
    assert request(server, f"/-/ui/gen/?{many}&token={TOKEN}")[0].startswith("HTTP/1.1 401 ")
    assert request(server, "/-/ui/gen/?q=" + "x" * 5000, headers=bearer())[0].startswith("HTTP/1.1 414 ")
    assert ListQuery.parse(many) == ListQuery()


def test_filter_finds_a_name_that_is_not_in_the_path_and_ignores_case() -> None:
    maven = Row(
        "e1", "org/example/lib/1.0/lib-1.0.jar", "", "artifact", 1, 0.0, "org.example:lib", "1.0", 0.0, 0
    )
    upper = Row("e2", "Docs/README.TXT", "", "artifact", 1, 0.0, "", "", 0.0, 0)
    plain = Row("e3", "files/demo/demo-1.0.whl", "", "artifact", 1, 0.0, "demo", "1.0", 0.0, 0)
    assert "org.example:lib" in maven.search and "readme.txt" in upper.search
    assert plain.search is plain.path  # lower case and naming it: no second copy per row


def test_the_access_log_never_shows_a_token_however_it_is_spelled() -> None:
    assert without_token("/-/ui/?a=1&token=s3cret&b=2") == "/-/ui/?a=1&token=<redacted>&b=2"
    assert without_token("/-/ui/?%74oken=s3cret") == "/-/ui/?%74oken=<redacted>"
    assert without_token("/-/ui/?TOKEN=s3cret&token") == "/-/ui/?TOKEN=<redacted>&token=<redacted>"
    assert without_token("/pypi/simple/x/") == "/pypi/simple/x/"
