"""In-process routing: the test process's own requests/httpx/urllib calls go through the proxy."""

from __future__ import annotations

import asyncio
import hashlib
import textwrap
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import requests
import responses
import urllib3

from pytest_upstream.clients import inprocess
from pytest_upstream.clients.inprocess import InProcessRouting, suspended

from .conftest import MakeProxy, proxy_def
from .upstreams import Upstream

BODY = b"the upstream's bytes\n" * 100


def fetch_all(url: str) -> list[bytes]:
    """The same URL through requests, httpx and urllib, as code under test would."""
    with urllib.request.urlopen(url, timeout=10) as r:
        via_urllib = r.read()
    return [requests.get(url, timeout=10).content, httpx.get(url, timeout=10).content, via_urllib]


@pytest.fixture(autouse=True)
def no_routing_leaks() -> Iterator[None]:
    originals = (
        httpx.HTTPTransport.__dict__["handle_request"],
        urllib3.connectionpool.HTTPConnectionPool.__dict__["urlopen"],
        urllib.request.AbstractHTTPHandler.__dict__["do_open"],
    )
    yield
    assert inprocess.active_routing() is None
    assert (
        httpx.HTTPTransport.__dict__["handle_request"],
        urllib3.connectionpool.HTTPConnectionPool.__dict__["urlopen"],
        urllib.request.AbstractHTTPHandler.__dict__["do_open"],
    ) == originals, "a patch was left behind"


def test_three_clients_record_once_then_replay_offline(
    upstream: Upstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    upstream.files["/x.bin"] = BODY
    url = upstream.url + "/x.bin"
    definition = proxy_def(key="g", format="generic", url=upstream.url)
    proxy = make_proxy(definition, cache=tmp_path / "cache")
    with InProcessRouting.for_server(proxy).activate() as routing:
        assert fetch_all(url) == [BODY] * 3
    assert upstream.hits["/x.bin"] == 1
    assert [(r.key, r.path, r.cache) for r in proxy.served.records] == [
        ("g", "x.bin", "miss"),
        ("g", "x.bin", "hit"),
        ("g", "x.bin", "hit"),
    ]
    assert [(r.client, r.url, r.proxy_url) for r in routing.routed] == [
        ("urllib", url, proxy.url("g") + "x.bin"),
        ("urllib3", url, proxy.url("g") + "x.bin"),
        ("httpx", url, proxy.url("g") + "x.bin"),
    ]

    upstream.stop()  # connections to the upstream are refused from now on
    with pytest.raises(requests.ConnectionError):
        requests.get(url, timeout=5)
    replay = make_proxy(definition, cache=tmp_path / "cache", mode="replay")
    with InProcessRouting.for_server(replay).activate():
        assert fetch_all(url) == [BODY] * 3
        with pytest.raises(urllib.error.HTTPError) as missing:  # replay miss: the proxy's 504
            urllib.request.urlopen(upstream.url + "/never-recorded", timeout=10)
        assert missing.value.code == 504
        assert missing.value.url == upstream.url + "/never-recorded"
    assert [r.cache for r in replay.served.records] == ["hit", "hit", "hit", "miss"]


def test_httpx_async_client_is_routed(upstream: Upstream, make_proxy: MakeProxy) -> None:
    upstream.files["/a.bin"] = BODY
    proxy = make_proxy(proxy_def(key="g", format="generic", url=upstream.url))

    async def get_twice() -> list[bytes]:
        async with httpx.AsyncClient() as client:
            first = await client.get(upstream.url + "/a.bin")
            async with client.stream("GET", upstream.url + "/a.bin") as second:
                return [first.content, b"".join([c async for c in second.aiter_bytes()])]

    with InProcessRouting.for_server(proxy).activate():
        assert asyncio.run(get_twice()) == [BODY, BODY]
    assert upstream.hits["/a.bin"] == 1
    assert [r.cache for r in proxy.served.records] == ["miss", "hit"]


def test_urls_no_proxy_covers_go_direct(upstream: Upstream, make_proxy: MakeProxy) -> None:
    upstream.files["/files/in.bin"] = b"in"
    upstream.files["/elsewhere/out.bin"] = b"out"
    proxy = make_proxy(proxy_def(key="g", format="generic", url=upstream.url + "/files"))
    with Upstream() as other, InProcessRouting.for_server(proxy).activate() as routing:
        other.files["/o.bin"] = b"other"
        assert fetch_all(other.url + "/o.bin") == [b"other"] * 3  # another origin
        assert fetch_all(upstream.url + "/elsewhere/out.bin") == [b"out"] * 3  # outside the source path
        assert requests.post(upstream.url + "/files/in.bin", timeout=10).status_code == 501  # not GET/HEAD
        assert requests.get(upstream.url + "/files/in.bin", timeout=10).content == b"in"
    assert other.hits["/o.bin"] == 3
    assert upstream.hits["/elsewhere/out.bin"] == 3
    assert upstream.hits["/files/in.bin"] == 1
    assert [r.path for r in proxy.served.records] == ["in.bin"]
    assert [r.url for r in routing.routed] == [upstream.url + "/files/in.bin"]


def test_the_proxys_own_fetches_are_not_looped_back(upstream: Upstream, make_proxy: MakeProxy) -> None:
    upstream.files["/y.bin"] = BODY
    proxy = make_proxy(proxy_def(key="g", format="generic", url=upstream.url))
    with InProcessRouting.for_server(proxy).activate() as routing:
        # the proxy's pinned upstream client goes straight to the upstream ...
        with proxy.engine.client.stream(upstream.url + "/y.bin", headers={}, timeout=10) as resp:
            assert resp.read() == BODY
        assert upstream.hits["/y.bin"] == 1
        assert proxy.served.records == [] and routing.routed == []
        # ... while an ordinary httpx transport in the same process is routed
        assert httpx.Client().get(upstream.url + "/y.bin").content == BODY
        assert [(r.path, r.cache) for r in proxy.served.records] == [("y.bin", "miss")]
    assert upstream.hits["/y.bin"] == 2  # the proxy's miss: one fetch, no loop
    assert proxy.served.fetches == [upstream.url + "/y.bin"]


def _simple_page(upstream: Upstream, files: dict[str, bytes]) -> None:
    links = "".join(
        f'<a href="../../packages/{name}#sha256={hashlib.sha256(data).hexdigest()}">{name}</a>\n'
        for name, data in files.items()
    )
    upstream.files["/simple/demo-pkg/"] = f"<html><body>{links}</body></html>".encode()
    upstream.content_types["/simple/demo-pkg/"] = "text/html"
    for name, data in files.items():
        upstream.files[f"/packages/{name}"] = data


def test_pypi_pages_files_and_redirects(upstream: Upstream, make_proxy: MakeProxy) -> None:
    wheel, sdist = b"wheel bytes", b"sdist bytes"
    _simple_page(upstream, {"demo_pkg-1.0-py3-none-any.whl": wheel, "demo_pkg-1.0.tar.gz": sdist})
    proxy = make_proxy(proxy_def(key="py", format="pypi", url=upstream.url + "/simple/"))
    with InProcessRouting.for_server(proxy).activate() as routing:
        page = requests.get(upstream.url + "/simple/Demo.Pkg", timeout=10)  # 301 to the normalised name
        assert page.status_code == 200
        assert page.url == upstream.url + "/simple/demo-pkg/"
        assert [r.status_code for r in page.history] == [301]
        assert "../../files/demo-pkg/demo_pkg-1.0-py3-none-any.whl#sha256=" in page.text
        # a link on the rendered page, resolved against the page's URL, is routed too
        link = httpx.URL(page.url).join("../../files/demo-pkg/demo_pkg-1.0-py3-none-any.whl")
        assert httpx.get(link).content == wheel
        # and so is the file's upstream URL itself
        with urllib.request.urlopen(upstream.url + "/packages/demo_pkg-1.0.tar.gz", timeout=10) as r:
            assert r.read() == sdist
        follow = httpx.get(upstream.url + "/simple/demo_pkg", follow_redirects=True)
        assert (follow.status_code, str(follow.url)) == (200, upstream.url + "/simple/demo-pkg/")
    assert [(r.path, r.cache) for r in proxy.served.records if r.path.startswith("files/")] == [
        ("files/demo-pkg/demo_pkg-1.0-py3-none-any.whl", "miss"),
        ("files/demo-pkg/demo_pkg-1.0.tar.gz", "miss"),
    ]
    assert upstream.hits["/simple/demo-pkg/"] == 1
    assert {r.client for r in routing.routed} == {"urllib3", "httpx", "urllib"}


def test_suspended_and_nested_activations(upstream: Upstream, make_proxy: MakeProxy) -> None:
    upstream.files["/n.bin"] = b"n"
    proxy = make_proxy(proxy_def(key="g", format="generic", url=upstream.url))
    outer = InProcessRouting.for_server(proxy)
    inner = InProcessRouting.for_server(proxy)
    with outer.activate():
        with suspended():
            assert requests.get(upstream.url + "/n.bin", timeout=10).content == b"n"
        with inner.activate():
            assert httpx.get(upstream.url + "/n.bin").content == b"n"
        assert inprocess.active_routing() is outer
    assert upstream.hits["/n.bin"] == 2  # the direct one and the proxy's miss
    assert (len(outer.routed), len(inner.routed)) == (0, 1)


def test_a_requests_mock_started_inside_still_wins(upstream: Upstream, make_proxy: MakeProxy) -> None:
    upstream.files["/m.bin"] = BODY
    proxy = make_proxy(proxy_def(key="g", format="generic", url=upstream.url))
    upstream.files["/passthru.bin"] = b"p"
    with (
        InProcessRouting.for_server(proxy).activate(),
        responses.RequestsMock(assert_all_requests_are_fired=False) as rsps,
    ):
        rsps.add(responses.GET, upstream.url + "/m.bin", body=b"mocked")
        rsps.add_passthru(upstream.url + "/passthru")
        assert requests.get(upstream.url + "/m.bin", timeout=10).content == b"mocked"
        assert requests.get(upstream.url + "/passthru.bin", timeout=10).content == b"p"
    assert upstream.hits["/m.bin"] == 0
    assert [r.path for r in proxy.served.records] == ["passthru.bin"]


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://up.test/files/a/b.tar.gz?x=1", "g/a/b.tar.gz?x=1"),
        ("http://UP.test:80/files/a%20b", "g/a%20b"),
        ("http://up.test/files/", None),  # a directory
        ("http://up.test/files", None),
        ("http://up.test/filesX/a", None),
        ("https://up.test/files/a", None),  # another scheme, another origin
        ("http://up.test:8080/files/a", None),
        ("http://up.test/files/deeper/a", "deep/a"),  # the most specific source wins
        ("http://mvn.test/repo/org/x/1/x-1.jar", "mvn/org/x/1/x-1.jar"),
        ("https://npm.test/@scope%2fname", "npm/@scope%2fname"),
        ("https://npm.test/left-pad/-/left-pad-1.0.0.tgz", "npm/left-pad/-/left-pad-1.0.0.tgz"),
        ("http://py.test/simple/", "py/simple/"),
        ("http://py.test/simple", "py/simple"),
        ("http://py.test/simple/Some_Pkg/", "py/simple/Some_Pkg/"),
        ("http://py.test/simple/a/b/", None),
        (
            "http://py.test/packages/ab/Some_Pkg-2.0-py3-none-any.whl",
            "py/files/some-pkg/Some_Pkg-2.0-py3-none-any.whl",
        ),
        ("http://py.test/packages/some.pkg-2.0.tar.gz", "py/files/some-pkg/some.pkg-2.0.tar.gz"),
        ("http://py.test/x/p-1.0-py3-none-any.whl.metadata", "py/files/p/p-1.0-py3-none-any.whl.metadata"),
        ("http://py.test/files/my-proj/my_proj-1.0.zip", "py/files/my-proj/my_proj-1.0.zip"),
        ("http://py.test/files/My.Proj/my_proj-1.0.zip", "py/files/my-proj/my_proj-1.0.zip"),
        (  # the file name is read decoded, the path stays raw
            "http://py.test/p/pkg-1.0%2Blocal-py3-none-any.whl",
            "py/files/pkg/pkg-1.0%2Blocal-py3-none-any.whl",
        ),
        ("http://py.test/p/old-0.9.tar.bz2", "py/files/old/old-0.9.tar.bz2"),
        ("http://py.test/p/x-1.0-py3.8.egg", "py/files/x/x-1.0-py3.8.egg"),
        ("http://py.test/p/noversion.tar.gz", None),  # not a distribution file name
        ("http://py.test/p/README.txt", None),
        ("http://py.test/pypi/x/json", None),
        ("http://docker.test/v2/library/alpine/manifests/3", None),  # docker is not routed
        ("http://127.0.0.1:9/loop/a", None),  # the proxy's own origin is never routed
        ("ftp://up.test/files/a", None),
    ],
)
def test_the_url_mapping(url: str, expected: str | None) -> None:
    routing = InProcessRouting(
        "http://127.0.0.1:9",
        [
            proxy_def(key="g", format="generic", url="http://up.test/files/"),
            proxy_def(key="deep", format="generic", url="http://up.test/files/deeper"),
            proxy_def(key="mvn", format="maven", url="http://mvn.test/repo"),
            proxy_def(key="npm", format="npm", url="https://npm.test/"),
            proxy_def(key="py", format="pypi", url="http://py.test/simple/"),
            proxy_def(key="hub", format="docker", url="http://docker.test"),
            proxy_def(key="loop", format="generic", url="http://127.0.0.1:9"),
        ],
    )
    target = routing.target(url)
    assert (target.url if target else None) == (f"http://127.0.0.1:9/{expected}" if expected else None)
    assert routing.target(url, "POST") is None


def test_locations_point_back_under_the_source_url() -> None:
    routing = InProcessRouting(
        "http://127.0.0.1:9",
        [
            proxy_def(key="py", format="pypi", url="http://py.test/pypi/simple"),
            proxy_def(key="g", format="generic", url="http://up.test/base/"),
        ],
    )
    assert routing.source_location("/py/simple/demo/") == "http://py.test/pypi/simple/demo/"
    assert routing.source_location("http://127.0.0.1:9/py/simple/") == "http://py.test/pypi/simple/"
    assert routing.source_location("/py/files/d/d-1.tar.gz") == "http://py.test/pypi/files/d/d-1.tar.gz"
    assert routing.source_location("/g/a/b") == "http://up.test/base/a/b"
    assert routing.source_location("/other/a") == "/other/a"
    assert routing.source_location("https://elsewhere.test/x") == "https://elsewhere.test/x"


def _plugin_project(path: Path, upstream_url: str) -> None:
    (path / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""
            [tool.pytest-upstream]
            cache = "cache-dir"
            [[tool.pytest-upstream.proxy]]
            key = "g"
            source = "custom"
            format = "generic"
            url = "{upstream_url}/files"
            """
        )
    )


def test_plugin_flag_routes_the_session(pytester: pytest.Pytester, upstream: Upstream) -> None:
    upstream.files["/files/s.bin"] = b"S" * 100
    _plugin_project(pytester.path, upstream.url)
    pytester.makeconftest(
        f"""
        import pytest, requests

        @pytest.fixture(scope="session")
        def downloaded():  # a session fixture: routed too, the flag acts from configure on
            return requests.get("{upstream.url}/files/s.bin", timeout=10).content
        """
    )
    pytester.makepyfile(
        test_inner=f"""
        import urllib.request, httpx, pytest

        URL = "{upstream.url}/files/s.bin"

        def test_routed(upstream_proxy, downloaded):
            assert downloaded == b"S" * 100
            assert httpx.get(URL).content == b"S" * 100
            assert [(r.path, r.cache) for r in upstream_proxy.served] == [("s.bin", "miss"), ("s.bin", "hit")]

        def test_fixture_lists_this_tests_requests(upstream_inprocess):
            urllib.request.urlopen(URL).read()
            assert [r.client for r in upstream_inprocess.routed] == ["urllib"]

        @pytest.mark.upstream(inprocess=False)
        def test_marker_turns_it_off(upstream_proxy):
            assert httpx.get(URL).content == b"S" * 100
            assert upstream_proxy.test_served == []
        """
    )
    result = pytester.runpytest_subprocess("--upstream-inprocess", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(["pytest-upstream (record, *): 3 requests, 2 hits, 1 miss,*"])
    assert upstream.hits["/files/s.bin"] == 2  # the proxy's miss and the un-routed test


def test_plugin_marker_and_fixture_without_the_flag(pytester: pytest.Pytester, upstream: Upstream) -> None:
    upstream.files["/files/m.bin"] = b"M"
    _plugin_project(pytester.path, upstream.url)
    pytester.makepyfile(
        test_inner=f"""
        import pytest, requests

        URL = "{upstream.url}/files/m.bin"

        @pytest.mark.upstream(inprocess=True)
        def test_marker(upstream_proxy):
            assert requests.get(URL, timeout=10).status_code == 504
            assert upstream_proxy.test_served[0].cache == "miss"

        def test_not_routed():
            assert requests.get(URL, timeout=10).content == b"M"
        """
    )
    # nothing is recorded: a routed request is a replay miss
    result = pytester.runpytest_subprocess("--upstream-mode", "replay", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["replay misses (1)*", f"*test_marker: g {upstream.url}/files/m.bin"])
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    assert upstream.hits["/files/m.bin"] == 1
