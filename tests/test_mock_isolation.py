"""The proxy's upstream traffic is not captured by process-wide HTTP mocks.

respx, pytest-httpx and vcrpy patch httpx/httpcore classes (vcrpy also
http.client); responses patches requests.  A test that runs the proxy in
its own process and mocks HTTP for its code under test must still get the
real upstream bytes through the proxy.  Each mock below also registers a
decoy answer for the very upstream URL: if the proxy's request leaked into
the mock, the client would get the decoy (or an error) and the upstream
would count no request.

The client here is a raw socket, so none of the mocks can touch it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import requests
import responses
import respx
import vcr
from pytest_httpx import HTTPXMock

from pytest_upstream.config.settings import Settings
from pytest_upstream.server.proxy_server import ProxyServer

from .conftest import proxy_def
from .upstreams import Upstream

DECOY = b"MOCKED: this came from a test mock, not the upstream"


def raw_get(base: str, target: str, timeout: float = 20.0) -> tuple[int, dict[str, str], bytes]:
    """HTTP/1.1 GET over a plain socket: (status, lower-cased headers, body of Content-Length bytes)."""
    parts = urlsplit(base)
    assert parts.hostname and parts.port
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n".encode())
        f = sock.makefile("rb")
        status = int(f.readline().split()[1])
        headers: dict[str, str] = {}
        while (line := f.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers["content-length"])
        body = f.read(length)
        assert len(body) == length, f"short body: {len(body)} of {length} bytes"
        return status, headers, body


@dataclass
class Env:
    up: Upstream
    proxy: ProxyServer
    cache: Path

    def publish(self, name: str) -> tuple[str, bytes]:
        """A new uncached artifact: (proxy path, bytes)."""
        data = os.urandom(50_000)
        self.up.files[f"/{name}"] = data
        return f"/g/{name}", data

    def check_fetch(self, name: str) -> None:
        path, data = self.publish(name)
        status, headers, body = raw_get(self.proxy.base_url, path)
        assert status == 200, body[:300]
        assert body == data
        assert headers["x-upstream-cache"] == "miss"
        assert self.up.hits[f"/{name}"] == 1
        status, headers, body = raw_get(self.proxy.base_url, path)
        assert (status, headers["x-upstream-cache"], body) == (200, "hit", data)
        assert self.up.hits[f"/{name}"] == 1


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    cache = tmp_path_factory.mktemp("mocks") / "cache"
    up = Upstream().start()
    proxy = ProxyServer(
        Settings(cache_dir=cache, mode="record", proxies=(proxy_def(key="g", format="generic", url=up.url),))
    ).start()
    try:
        yield Env(up, proxy, cache)
    finally:
        proxy.stop()
        up.stop()


def test_respx_mock(env: Env) -> None:
    with respx.mock(assert_all_called=False) as router:  # assert_all_mocked stays on
        route = router.get(f"{env.up.url}/respx.bin").mock(return_value=httpx.Response(200, content=DECOY))
        env.check_fetch("respx.bin")
        assert not route.called
        # the mock is live for the test's own httpx code
        assert httpx.get(f"{env.up.url}/respx.bin").content == DECOY
        assert env.up.hits["/respx.bin"] == 1
    env.check_fetch("after-respx.bin")


def test_proxy_started_inside_respx_mock(env: Env) -> None:
    with respx.mock(assert_all_called=False) as router:
        route = router.get(url__startswith=env.up.url).mock(return_value=httpx.Response(200, content=DECOY))
        proxy = ProxyServer(
            Settings(
                cache_dir=env.cache.parent / "cache2",
                proxies=(proxy_def(key="g", format="generic", url=env.up.url),),
            )
        ).start()
        try:
            path, data = env.publish("respx-inner.bin")
            status, _, body = raw_get(proxy.base_url, path)
            assert (status, body) == (200, data)
            assert env.up.hits["/respx-inner.bin"] == 1
            assert not route.called
        finally:
            proxy.stop()


@pytest.mark.httpx_mock(assert_all_responses_were_requested=False)
def test_pytest_httpx(env: Env, httpx_mock: HTTPXMock) -> None:
    # assert_all_requests_were_expected stays on: a leaked proxy request would fail the test at teardown
    httpx_mock.add_response(url=f"{env.up.url}/pytest-httpx.bin", content=DECOY)
    env.check_fetch("pytest-httpx.bin")
    assert httpx_mock.get_requests() == []


def test_pytest_httpx_mock_is_left_cleanly(env: Env) -> None:
    env.check_fetch("after-pytest-httpx.bin")


def test_vcrpy_empty_cassette_record_none(env: Env, tmp_path: Path) -> None:
    recorder = vcr.VCR(record_mode="none")
    with recorder.use_cassette(str(tmp_path / "empty.yaml")) as cassette:
        env.check_fetch("vcr.bin")
        assert len(cassette) == 0
        assert cassette.play_count == 0
        # the cassette is live: the test's own http.client/httpx requests are refused
        with pytest.raises(vcr.errors.CannotOverwriteExistingCassetteException):
            httpx.get(f"{env.up.url}/vcr.bin")
    assert env.up.hits["/vcr.bin"] == 1
    assert not (tmp_path / "empty.yaml").exists()
    env.check_fetch("after-vcr.bin")


def test_responses_requests_mock(env: Env) -> None:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        rsps.add(responses.GET, f"{env.up.url}/responses.bin", body=DECOY)
        env.check_fetch("responses.bin")
        assert len(rsps.calls) == 0
        assert requests.get(f"{env.up.url}/responses.bin", timeout=5).content == DECOY
        assert env.up.hits["/responses.bin"] == 1
    env.check_fetch("after-responses.bin")


def test_all_mocks_at_once(env: Env, httpx_mock: HTTPXMock, tmp_path: Path) -> None:
    with (
        respx.mock(assert_all_called=False),
        vcr.VCR(record_mode="none").use_cassette(str(tmp_path / "empty.yaml")),
        responses.RequestsMock(assert_all_requests_are_fired=False),
    ):
        env.check_fetch("all.bin")
    env.check_fetch("after-all.bin")
