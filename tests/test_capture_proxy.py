"""Capture's forward proxy (server/forward.py): CONNECT to a captured host is intercepted with a
leaf of the cache's CA and answered by the engine as the host's generic proxy (recorded, then
replayed byte for byte with the upstream gone); upstream TLS is verified against upstream_ca;
hosts not captured are tunnelled, or refused while tunnels are off; plain absolute-form
requests are captured too."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pytest_upstream.config.capture import CaptureSettings
from pytest_upstream.config.settings import Settings
from pytest_upstream.server.proxy_server import ProxyServer
from tests.capture_peers import HOST, TlsUpstream
from tests.upstreams import Upstream

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
BODY = os.urandom(200_000)


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[TlsUpstream]:
    with TlsUpstream(tmp_path / "upstream-ca") as up:
        up.files["/file.bin"] = BODY
        up.files["/small.txt"] = b"hello\n"
        yield up


def _settings(tmp_path: Path, mode: str = "record", **capture: Any) -> Settings:
    return Settings(cache_dir=tmp_path / "cache", mode=mode, capture=CaptureSettings(True, **capture))


def curl(server: ProxyServer, url: str, *extra: str) -> subprocess.CompletedProcess[bytes]:
    ca = server.capture.ca.cert_path if server.capture else ""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return subprocess.run(
        ["curl", "-sS", "-i", "--proxy", server.base_url, "--cacert", str(ca), *extra, url],
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )


def _split(out: bytes) -> tuple[bytes, bytes]:
    """(the last response's status line, its body) of ``curl -i`` output."""
    heads = out.split(b"\r\n\r\n")
    # curl -i prints the CONNECT response's head first
    while heads[0].startswith(b"HTTP/1.1 200 Connection established"):
        heads = heads[1:]
    return heads[0].split(b"\r\n", 1)[0], b"\r\n\r\n".join(heads[1:])


def test_record_then_replay_with_the_upstream_gone(tmp_path: Path, upstream: TlsUpstream) -> None:
    settings = _settings(tmp_path, upstream_ca=upstream.ca_file)
    with ProxyServer(settings) as server:
        status, body = _split(curl(server, f"{upstream.url}/file.bin").stdout)
        assert status.startswith(b"HTTP/1.1 200") and body == BODY
        status, body = _split(curl(server, f"{upstream.url}/file.bin").stdout)
        assert body == BODY
        assert upstream.hits["/file.bin"] == 1  # the second came from the cache
        key = f"ip-{HOST}_{upstream.port}"
        assert {r.key for r in server.served.records} == {key}
    upstream.stop()
    with ProxyServer(replace(settings, mode="replay")) as server:
        status, body = _split(curl(server, f"{upstream.url}/file.bin").stdout)
        assert status.startswith(b"HTTP/1.1 200") and body == BODY
        status, _ = _split(curl(server, f"{upstream.url}/never.bin").stdout)
        assert status == b"HTTP/1.1 504 Not recorded (replay mode)"


def test_keep_alive_requests_in_one_tunnel(tmp_path: Path, upstream: TlsUpstream) -> None:
    with ProxyServer(_settings(tmp_path, upstream_ca=upstream.ca_file)) as server:
        out = curl(
            server,
            f"{upstream.url}/small.txt",
            "--next",
            "--proxy",
            server.base_url,
            "--cacert",
            str(server.capture.ca.cert_path) if server.capture else "",
            f"{upstream.url}/small.txt",
            "-w",
            "%{num_connects}\n",
        )
        assert out.stdout.count(b"hello\n") == 2, out


def test_an_untrusted_upstream_certificate_is_a_502_that_says_so(
    tmp_path: Path, upstream: TlsUpstream
) -> None:
    with ProxyServer(_settings(tmp_path)) as server:  # no upstream_ca: the system's roots only
        status, body = _split(curl(server, f"{upstream.url}/small.txt").stdout)
    assert status == b"HTTP/1.1 502 Upstream certificate not trusted"
    assert b"upstream_ca" in body
    assert upstream.hits["/small.txt"] == 0


def test_hosts_not_captured_are_tunnelled_or_refused(tmp_path: Path, upstream: TlsUpstream) -> None:
    settings = _settings(tmp_path, upstream_ca=upstream.ca_file, exclude=(HOST,))
    with ProxyServer(settings) as server:
        assert server.capture is not None
        # tunnelled untouched: the client sees the upstream's own certificate
        out = subprocess.run(
            [
                "curl",
                "-sS",
                "--proxy",
                server.base_url,
                "--cacert",
                str(upstream.ca_file),
                f"{upstream.url}/small.txt",
            ],
            capture_output=True,
            timeout=60,
            check=False,
        )
        assert out.stdout == b"hello\n", out
        assert not list((tmp_path / "cache").glob("entries/*"))  # nothing cached
        server.capture.tunnels = False  # what the plugin does while the network is blocked
        out = curl(server, f"{upstream.url}/small.txt")
        assert out.returncode != 0 and b"403" in out.stderr + out.stdout
        assert [host for host, _ in server.refused] == [HOST]


def test_plain_http_absolute_form_is_captured(tmp_path: Path) -> None:
    with Upstream() as plain, ProxyServer(_settings(tmp_path)) as server:
        plain.files["/a.txt"] = b"plain\n"
        url = f"http://{HOST}:{plain.port}/a.txt".replace(HOST, "127.0.0.1")
        # 127.0.0.1 on another port than the proxy's: a forward request, captured
        out = curl(server, url)
        status, body = _split(out.stdout)
        assert status.startswith(b"HTTP/1.1 200") and body == b"plain\n", out
        assert {r.key for r in server.served.records} == {f"ip-127.0.0.1_{plain.port}"}


def test_without_capture_forward_requests_are_refused(tmp_path: Path, upstream: TlsUpstream) -> None:
    with ProxyServer(Settings(cache_dir=tmp_path / "cache")) as server:
        assert server.capture is None
        out = curl(server, f"{upstream.url}/small.txt")
        assert out.returncode != 0
    assert upstream.hits["/small.txt"] == 0


def test_a_proxy_token_is_required_when_set(
    tmp_path: Path, upstream: TlsUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CAPTURE_TEST_TOKEN", "s3cret")
    settings = replace(
        _settings(tmp_path, upstream_ca=upstream.ca_file), client_token_env="CAPTURE_TEST_TOKEN"
    )
    with ProxyServer(settings) as server:
        refused = curl(server, f"{upstream.url}/small.txt")
        assert refused.returncode != 0 and b"407" in refused.stderr + refused.stdout
        ok = curl(server, f"{upstream.url}/small.txt", "--proxy-user", "x:s3cret")
        assert _split(ok.stdout)[1] == b"hello\n"


def test_the_marker_scope_takes_captured_host_keys(tmp_path: Path, upstream: TlsUpstream) -> None:
    from pytest_upstream.pytest_plugin.harness import UpstreamProxy

    proxy = UpstreamProxy.start(_settings(tmp_path, upstream_ca=upstream.ca_file))
    try:
        server = proxy.server
        key = f"ip-{HOST}_{upstream.port}"
        with proxy.using(proxies=["other.example.org"]):  # another captured host only: refused
            status, _ = _split(curl(server, f"{upstream.url}/small.txt").stdout)
            assert status == b"HTTP/1.1 403 Blocked by the upstream marker"
        with proxy.using(proxies=[key]):
            assert _split(curl(server, f"{upstream.url}/small.txt").stdout)[1] == b"hello\n"
        with pytest.raises(KeyError):
            proxy.set_test_scope(proxies=["Not A Key"])
    finally:
        proxy.stop()


def test_serve_capture_prints_the_ca_and_captures(tmp_path: Path, upstream: TlsUpstream) -> None:
    from tests.test_serve_ops import Serve

    config = tmp_path / "pyproject.toml"
    config.write_text(f'[tool.pytest-upstream]\nupstream_ca = "{upstream.ca_file}"\n')
    serve = Serve(config, tmp_path / "cache", "--capture")
    try:
        lines = [serve.line(serve.proc.stdout), serve.line(serve.proc.stdout)]
        assert lines[0] == f"  capture: HTTPS_PROXY={serve.base_url} (hosts *)"
        ca = tmp_path / "cache" / "capture" / "ca-cert.pem"
        assert lines[1].startswith(f"  capture CA: {ca} ")
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        out = subprocess.run(
            ["curl", "-sS", "--proxy", serve.base_url, "--cacert", str(ca), f"{upstream.url}/small.txt"],
            capture_output=True,
            env=env,
            timeout=60,
            check=False,
        )
        assert out.stdout == b"hello\n", out
    finally:
        serve.stop()


def test_upstream_ca_applies_to_keyed_proxies(tmp_path: Path, upstream: TlsUpstream) -> None:
    import urllib.error
    import urllib.request

    from pytest_upstream.config.settings import ProxyDefinition

    keyed = ProxyDefinition(key="files", source="custom", format="generic", url=upstream.url + "/")
    trusted = Settings(
        cache_dir=tmp_path / "a", proxies=(keyed,), capture=CaptureSettings(upstream_ca=upstream.ca_file)
    )
    with ProxyServer(trusted) as server:  # capture off: upstream_ca is about upstream TLS only
        body = urllib.request.urlopen(server.url("files") + "small.txt", timeout=30).read()
        assert body == b"hello\n"
    with ProxyServer(Settings(cache_dir=tmp_path / "b", proxies=(keyed,))) as server:
        with pytest.raises(urllib.error.HTTPError) as failed:
            urllib.request.urlopen(server.url("files") + "small.txt", timeout=30)
        assert (failed.value.code, failed.value.reason) == (502, "Upstream certificate not trusted")


def test_a_silent_tunnel_is_closed_by_the_header_deadline(tmp_path: Path, upstream: TlsUpstream) -> None:
    import socket
    import time

    settings = replace(_settings(tmp_path, upstream_ca=upstream.ca_file), header_timeout=0.5)
    with ProxyServer(settings) as server:
        port = int(server.base_url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            target = f"{HOST}:{upstream.port}"
            sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
            assert sock.recv(1024).startswith(b"HTTP/1.1 200 Connection established")
            started = time.monotonic()
            assert sock.recv(1024) == b""  # no TLS handshake came: the proxy closed the tunnel
            assert time.monotonic() - started < 5
