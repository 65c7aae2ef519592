"""Hostile upstreams (issue 10, part "upstream"): decompression bombs are refused within caps, the
SSRF guard keeps redirects and links off loopback and private addresses, and a dead pooled
connection costs a retry, not a failed request.  Loopback only; every loop bounded."""

from __future__ import annotations

import gzip
import ipaddress
import json
import socket
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

from pytest_upstream.config.settings import ConfigError, parse_table
from pytest_upstream.config.upstream_limits import DecodeLimits
from pytest_upstream.upstream.addresses import AddressPolicy, AddressRefused, why_not_public
from pytest_upstream.upstream.client import UpstreamClient, UpstreamError

from .conftest import MakeProxy, proxy_def
from .upstreams import Fault, Upstream

MiB = 1024 * 1024
BOMB_SIZE = 256 * MiB


def fetch(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url), timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@cache
def bomb(coding: str, size: int = BOMB_SIZE) -> bytes:
    """``size`` zero bytes, gzip- or zlib-deflate-coded: about a thousandth of that."""
    packer = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16 if coding == "gzip" else zlib.MAX_WBITS)
    zeros = bytes(MiB)
    out = [packer.compress(zeros) for _ in range(size // MiB)]
    out.append(packer.flush())
    return b"".join(out)


def stored_nothing(cache_dir: Path) -> bool:
    """No blob, no part file: the bomb left nothing behind."""
    return not [p for p in cache_dir.rglob("*") if p.is_file() and p.stat().st_size > MiB]


# -- bounded decoding ---------------------------------------------------------------------------------
@pytest.mark.parametrize("coding", ["gzip", "deflate"])
@pytest.mark.parametrize("target", ["artifact", "index page"])
def test_a_decompression_bomb_is_a_502_naming_the_cap_and_nothing_is_stored(
    upstream: Upstream, make_proxy: MakeProxy, tmp_path: Path, coding: str, target: str
) -> None:
    path = "/bomb.bin" if target == "artifact" else "/simple/bomb/"
    upstream.files[path] = bomb(coding)
    upstream.faults[path] = Fault(headers={"Content-Encoding": coding})
    upstream.content_types["/simple/bomb/"] = "text/html"
    proxy = make_proxy(
        proxy_def(key="g", format="generic", url=upstream.url),
        proxy_def(key="p", format="pypi", url=upstream.url + "/simple/"),
    )
    status, body = fetch(
        proxy.url("g") + "bomb.bin" if target == "artifact" else proxy.url("p") + "simple/bomb/"
    )
    assert status == 502
    assert b"max_expansion" in body and b"decompression bomb" in body, body
    assert stored_nothing(tmp_path / "cache")
    assert proxy.engine.cache.lookup("g", "bomb.bin") is None
    assert proxy.engine.cache.lookup("p", "simple/bomb/") is None


def test_the_decoded_size_cap_is_per_proxy(upstream: Upstream, make_proxy: MakeProxy) -> None:
    plain = b"an honest, repetitive text " * 200_000  # 5.4 MB, compresses ~100x
    upstream.files["/t.txt"] = gzip.compress(plain)
    upstream.faults["/t.txt"] = Fault(headers={"Content-Encoding": "gzip"})
    proxy = make_proxy(
        proxy_def(key="small", format="generic", url=upstream.url, max_decoded_size="1M", max_expansion=0),
        proxy_def(key="big", format="generic", url=upstream.url),
    )
    status, body = fetch(proxy.url("small") + "t.txt")
    assert status == 502 and b"more than 1.0 MiB (max_decoded_size)" in body, body
    assert fetch(proxy.url("big") + "t.txt") == (200, plain)  # within the defaults


@pytest.mark.parametrize("wrapper", ["zlib", "raw"])
def test_deflate_with_and_without_its_zlib_wrapper_decodes(
    upstream: Upstream, make_proxy: MakeProxy, wrapper: str
) -> None:
    data = b"deflated " * 5000
    packer = zlib.compressobj(6, zlib.DEFLATED, zlib.MAX_WBITS if wrapper == "zlib" else -zlib.MAX_WBITS)
    upstream.files["/d.bin"] = packer.compress(data) + packer.flush()
    upstream.faults["/d.bin"] = Fault(headers={"Content-Encoding": "deflate"})
    proxy = make_proxy(proxy_def(key="g", format="generic", url=upstream.url))
    assert fetch(proxy.url("g") + "d.bin") == (200, data)


def test_a_coding_the_proxy_did_not_offer_is_refused(upstream: Upstream, make_proxy: MakeProxy) -> None:
    upstream.files["/b.bin"] = b"not really brotli"
    upstream.faults["/b.bin"] = Fault(headers={"Content-Encoding": "br"})
    proxy = make_proxy(proxy_def(key="g", format="generic", url=upstream.url))
    status, body = fetch(proxy.url("g") + "b.bin")
    assert status == 502 and b"content coding 'br' is not supported" in body


def test_identity_is_asked_for_bytes_with_a_published_digest(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    import hashlib

    wheel = b"wheel bytes"
    page = {
        "meta": {"api-version": "1.0"},
        "name": "demo",
        "files": [
            {
                "filename": "demo-1.0-py3-none-any.whl",
                "url": "/f/demo-1.0-py3-none-any.whl",
                "hashes": {"sha256": hashlib.sha256(wheel).hexdigest()},
            }
        ],
    }
    upstream.files["/simple/demo/"] = json.dumps(page).encode()
    upstream.content_types["/simple/demo/"] = "application/vnd.pypi.simple.v1+json"
    upstream.files["/f/demo-1.0-py3-none-any.whl"] = wheel
    proxy = make_proxy(proxy_def(key="p", format="pypi", url=upstream.url + "/simple/"))
    assert fetch(proxy.url("p") + "files/demo/demo-1.0-py3-none-any.whl") == (200, wheel)
    asked = {path: {k.lower(): v for k, v in h.items()} for path, h in upstream.request_headers}
    assert asked["/f/demo-1.0-py3-none-any.whl"]["accept-encoding"] == "identity"
    assert asked["/simple/demo/"]["accept-encoding"] == "gzip, deflate"


def _vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc to read a process's peak RSS")
def test_bombs_leave_the_peak_rss_of_serve_bounded(upstream: Upstream, tmp_path: Path) -> None:
    from .test_serve_ops import Serve

    for coding in ("gzip", "deflate"):
        upstream.files[f"/{coding}.bin"] = bomb(coding)
        upstream.faults[f"/{coding}.bin"] = Fault(headers={"Content-Encoding": coding})
        upstream.files[f"/simple/{coding}/"] = bomb(coding)
        upstream.faults[f"/simple/{coding}/"] = Fault(headers={"Content-Encoding": coding})
    config = tmp_path / "pyproject.toml"
    config.write_text(
        "[[tool.pytest-upstream.proxy]]\n"
        f'key = "g"\nsource = "custom"\nformat = "generic"\nurl = "{upstream.url}"\n'
        "[[tool.pytest-upstream.proxy]]\n"
        f'key = "p"\nsource = "custom"\nformat = "pypi"\nurl = "{upstream.url}/simple/"\n'
    )
    serve = Serve(config, tmp_path / "cache", "--log-format", "json")
    try:
        assert fetch(serve.base_url + "/g/nothing")[0] == 404  # warmed up: every module imported
        before = _vm_hwm(serve.proc.pid)
        for coding in ("gzip", "deflate"):
            assert fetch(f"{serve.base_url}/g/{coding}.bin")[0] == 502
            assert fetch(f"{serve.base_url}/p/simple/{coding}/")[0] == 502
        growth = _vm_hwm(serve.proc.pid) - before
    finally:
        serve.stop()
    assert growth < 100 * MiB, f"peak RSS grew {growth / MiB:.0f} MiB"
    assert stored_nothing(tmp_path / "cache")


# -- the SSRF guard -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.2", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.1.1", "private"),
        ("172.16.0.1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("fd00::1", "unique-local"),
        ("0.0.0.0", "unspecified"),
        ("100.64.0.1", "not a public"),
        ("8.8.8.8", ""),
        ("2606:4700::1111", ""),
    ],
)
def test_addresses_that_are_not_public_are_named(address: str, why: str) -> None:
    reason = why_not_public(ipaddress.ip_address(address))
    assert (why in reason) if why else reason == ""


def test_a_name_is_judged_by_the_addresses_it_resolves_to(monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS rebinding: a public-looking name resolving to loopback is refused, and a public one
    is connected to by the address that was checked."""
    answers = {"rebound.example": "127.0.0.1", "public.example": "93.184.215.14"}

    def fake_getaddrinfo(host: str, port: int, *args: object, **kw: object) -> list[tuple[object, ...]]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (answers[host], port))]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    policy = AddressPolicy(["https://registry.example/"], ["10.9.0.0/16", "build-cache.internal:8080"])
    with pytest.raises(AddressRefused, match=r"rebound.example \(127.0.0.1\) port 443: a loopback address"):
        policy.resolve("rebound.example", 443)
    assert policy.resolve("public.example", 443) == ["93.184.215.14"]
    assert policy.trusted("registry.example", 443) and not policy.trusted("registry.example", 8443)
    assert policy.trusted("build-cache.internal", 8080) and not policy.trusted("build-cache.internal", 80)
    assert policy.refusal("x", 80, ipaddress.ip_address("10.9.1.1")) == ""  # an allowed network
    assert "private" in policy.refusal("x", 80, ipaddress.ip_address("10.8.1.1"))


def _pypi_page_linking(target: str) -> bytes:
    return f'<a href="{target}/f/demo-1.0.tar.gz">demo-1.0.tar.gz</a>'.encode()


def test_an_index_link_to_a_loopback_host_that_is_no_upstream_is_refused(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    with Upstream() as internal:
        internal.files["/f/demo-1.0.tar.gz"] = b"INTERNAL-SECRET-DATA"
        upstream.files["/simple/demo/"] = _pypi_page_linking(internal.url)  # another port: another origin
        upstream.content_types["/simple/demo/"] = "text/html"
        proxy = make_proxy(proxy_def(key="p", format="pypi", url=upstream.url + "/simple/"))
        status, body = fetch(proxy.url("p") + "files/demo/demo-1.0.tar.gz")
        assert status == 502 and b"a loopback address" in body and b"allow_hosts" in body, body
        assert b"INTERNAL-SECRET-DATA" not in body
        assert internal.hits["/f/demo-1.0.tar.gz"] == 0

        allowing = make_proxy(
            proxy_def(key="p", format="pypi", url=upstream.url + "/simple/"),
            cache=proxy.engine.cache.root.parent / "other",
            allow_hosts=(internal.url.split("//")[1],),
        )
        assert fetch(allowing.url("p") + "files/demo/demo-1.0.tar.gz") == (200, b"INTERNAL-SECRET-DATA")


def test_a_redirect_to_a_loopback_host_or_a_name_resolving_to_one_is_refused(
    upstream: Upstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    with Upstream() as internal:
        internal.files["/secret"] = b"INTERNAL-SECRET-DATA"
        for name, host in (("ip", "127.0.0.1"), ("name", "localhost")):
            upstream.faults[f"/{name}"] = Fault(
                status=302, body=b"", headers={"Location": f"http://{host}:{internal.port}/secret"}
            )
        proxy = make_proxy(proxy_def(key="g", format="generic", url=upstream.url))
        for name in ("ip", "name"):
            status, body = fetch(proxy.url("g") + name)
            assert status == 502 and b"a loopback address" in body, body
        assert internal.hits["/secret"] == 0
        allowing = make_proxy(
            proxy_def(key="g", format="generic", url=upstream.url),
            cache=tmp_path / "other",
            allow_hosts=("localhost",),
        )
        assert fetch(allowing.url("g") + "name") == (200, b"INTERNAL-SECRET-DATA")
        assert fetch(allowing.url("g") + "ip")[0] == 502  # the name is allowed, not its address


def test_allow_hosts_and_the_decoding_caps_are_read_from_the_table(tmp_path: Path) -> None:
    table = {
        "allow_hosts": ["files.internal", "10.0.0.0/8"],
        "proxy": [
            {
                "key": "g",
                "format": "generic",
                "url": "http://h/",
                "max_decoded_size": "64M",
                "max_expansion": 20,
            }
        ],
    }
    settings = parse_table(table, "pyproject.toml", tmp_path)
    assert settings.allow_hosts == ("files.internal", "10.0.0.0/8")
    assert settings.proxies[0].decoding == DecodeLimits(max_size=64 * MiB, max_expansion=20.0)
    for bad in ({"allow_hosts": "files.internal"}, {"allow_hosts": ["a:b"]}):
        with pytest.raises(ConfigError, match="allow_hosts"):
            parse_table(bad, "pyproject.toml", tmp_path)
    with pytest.raises(ConfigError, match="max_expansion"):
        parse_table(
            {"proxy": [{"key": "g", "format": "generic", "url": "http://h/", "max_expansion": -1}]},
            "pyproject.toml",
            tmp_path,
        )


# -- a dead pooled connection -------------------------------------------------------------------------
class OneShotKeepAlive:
    """Answers the first request on each connection keep-alive; on a connection's second request
    it misbehaves (``how``: closes without answering, or answers garbage)."""

    def __init__(self, how: str) -> None:
        self.how = how
        self.connections = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self._stop = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:  # closed
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        with conn:
            for n in range(2):
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                if n == 0:
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"
                    )
                elif self.how == "garbage":
                    conn.sendall(b"SPLAT\r\n\r\n")
                # "close": say nothing; leaving the with-block closes the connection

    def close(self) -> None:
        self._stop = True
        self.sock.close()


@pytest.fixture(params=["close", "garbage"])
def flaky(request: pytest.FixtureRequest) -> Iterator[OneShotKeepAlive]:
    server = OneShotKeepAlive(request.param)
    yield server
    server.close()


def test_a_get_that_breaks_on_a_reused_connection_is_retried_once_on_a_fresh_one(
    flaky: OneShotKeepAlive, make_proxy: MakeProxy
) -> None:
    proxy = make_proxy(proxy_def(key="g", format="generic", url=flaky.url))
    assert fetch(proxy.url("g") + "one") == (200, b"ok")
    assert fetch(proxy.url("g") + "two") == (200, b"ok")  # the pooled connection broke: retried
    assert flaky.connections == 2


def test_only_idempotent_requests_are_retried(flaky: OneShotKeepAlive) -> None:
    client = UpstreamClient(AddressPolicy([flaky.url]))
    try:
        with client.stream(flaky.url + "/a", headers={}, timeout=5, method="POST") as resp:
            assert resp.read() == b"ok"
        with (
            pytest.raises(UpstreamError, match=r"protocol error|disconnected"),
            client.stream(flaky.url + "/b", headers={}, timeout=5, method="POST"),
        ):
            pass
        deadline = time.monotonic() + 5
        while flaky.connections < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert flaky.connections == 1  # no second connection: a POST is not sent twice
    finally:
        client.close()


# -- rendering metadata: memory and sharing -----------------------------------------------------------
def _pypi_json_page(files: int) -> bytes:
    import hashlib

    page = {
        "meta": {"api-version": "1.0"},
        "name": "demo",
        "files": [
            {
                "filename": f"demo-1.{i}-py3-none-any.whl",
                "url": f"https://files.example/pk/{i:08x}/demo-1.{i}-py3-none-any.whl",
                "hashes": {"sha256": hashlib.sha256(str(i).encode()).hexdigest()},
                "requires-python": ">=3.8",
            }
            for i in range(files)
        ],
    }
    return json.dumps(page).encode()


def _memo_args(tmp_path: Path, body: bytes, render_as: str) -> tuple[object, ...]:
    from pytest_upstream.formats import get_format
    from pytest_upstream.formats.base import Kind, Resource
    from pytest_upstream.store.cache import Entry

    blob = tmp_path / "page"
    blob.write_bytes(body)
    entry = Entry(
        key="py",
        path="simple/demo/",
        variant="",
        upstream_url="u",
        sha256="0" * 64,
        size=len(body),
        kind="metadata",
        fetched_at=0.0,
    )
    res = Resource("simple/demo/", "https://x/simple/demo/", Kind.METADATA, render_as=render_as)
    return ("py", get_format("pypi"), res, entry, blob)


@pytest.mark.parametrize("render_as", ["json", "html"])
def test_rendering_an_index_takes_a_small_multiple_of_its_size(tmp_path: Path, render_as: str) -> None:
    import tracemalloc

    from pytest_upstream.engine.render import RenderMemo

    body = _pypi_json_page(4_000)  # about 1.2 MB
    args = _memo_args(tmp_path, body, render_as)
    tracemalloc.start()
    try:
        assert RenderMemo().render(*args) is not None  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 10 * len(body), f"{peak / len(body):.1f} times the document"


def test_concurrent_renders_of_one_document_share_one(tmp_path: Path) -> None:
    from pytest_upstream.engine.render import RenderMemo

    key, pypi, res, entry, blob = _memo_args(tmp_path, _pypi_json_page(100), "json")
    calls: list[int] = []
    started = threading.Event()

    class SlowFormat(type(pypi)):  # type: ignore[misc]
        def render(self, resource, body, hiding=None):  # type: ignore[no-untyped-def]
            calls.append(1)
            started.set()
            time.sleep(0.3)
            return super().render(resource, body, hiding)

    memo = RenderMemo(budget=1)  # nothing is kept: sharing must not depend on the memo
    results: list[object] = []
    threads = [
        threading.Thread(target=lambda: results.append(memo.render(key, SlowFormat(), res, entry, blob)))  # type: ignore[arg-type]
        for _ in range(6)
    ]
    threads[0].start()
    assert started.wait(5)
    for t in threads[1:]:
        t.start()
    for t in threads:
        t.join(10)
    assert len(calls) == 1 and len(results) == 6 and len({id(r) for r in results}) == 1
    assert memo.render(key, SlowFormat(), res, entry, blob) is not None  # type: ignore[arg-type]
    assert len(calls) == 2  # not kept (over the budget): rendered anew once nobody is rendering


def test_the_retry_goes_over_a_new_connection_even_when_other_idle_ones_are_pooled() -> None:
    """Two idle pooled connections, both dead: the retry must not take the second one."""
    flaky = OneShotKeepAlive("close")
    client = UpstreamClient(AddressPolicy([flaky.url]))
    try:
        with (
            client.stream(flaky.url + "/a", headers={}, timeout=5) as first,
            client.stream(flaky.url + "/b", headers={}, timeout=5) as second,
        ):
            assert first.read() == second.read() == b"ok"  # two connections, both idle now
        with client.stream(flaky.url + "/c", headers={}, timeout=5) as third:
            assert third.read() == b"ok"
        assert flaky.connections == 3
    finally:
        client.close()
        flaky.close()
