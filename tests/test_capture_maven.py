"""Registry-aware capture of Maven Central (docs/capture.md § Registries): a request to either of
its public host names, ``https://<host>/maven2/<path>``, is answered by the configured
``maven-central``-source proxy as ``/<key>/<path>``, with the maven format's checksum check (a jar
whose ``.sha1`` does not match is a 502, nothing stored).  The proxy's url points at an HTTPS
server on loopback standing in for the public host; recorded, then replayed with it gone."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from pytest_upstream.config.capture import CaptureSettings
from pytest_upstream.config.settings import ProxyDefinition, Settings
from pytest_upstream.config.sources import BUILTIN_SOURCES
from pytest_upstream.server.proxy_server import ProxyServer
from tests.capture_peers import TlsUpstream
from tests.test_capture_proxy import _split, curl

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
JAR = os.urandom(50_000)
LIB = "/org/demo/lib/1.0/lib-1.0.jar"
BAD = "/org/demo/bad/1.0/bad-1.0.jar"


@pytest.fixture
def central(tmp_path: Path) -> Iterator[TlsUpstream]:
    with TlsUpstream(tmp_path / "central-ca") as up:
        up.files["/maven2" + LIB] = JAR
        up.files["/maven2" + LIB + ".sha1"] = hashlib.sha1(JAR).hexdigest().encode()
        up.files["/maven2" + BAD] = b"not the published bytes"
        up.files["/maven2" + BAD + ".sha1"] = hashlib.sha1(b"the published bytes").hexdigest().encode()
        yield up


def _hosts() -> list[str]:
    """Maven Central's host names, as the built-in source table knows them."""
    source = BUILTIN_SOURCES["maven-central"]
    return [source.host, *(host for host, role in source.other_hosts if role == "registry")]


def test_both_central_hosts_go_through_the_maven_proxy(tmp_path: Path, central: TlsUpstream) -> None:
    hosts = _hosts()
    assert len(hosts) == 2
    proxy = ProxyDefinition(
        key="central", source="maven-central", format="maven", url=f"{central.url}/maven2/"
    )
    settings = Settings(
        cache_dir=tmp_path / "cache",
        proxies=(proxy,),
        capture=CaptureSettings(enabled=True, upstream_ca=central.ca_file),
    )
    with ProxyServer(settings) as server:
        for host in hosts:
            status, body = _split(curl(server, f"https://{host}/maven2{LIB}").stdout)
            assert (status, body) == (b"HTTP/1.1 200 OK", JAR)
        assert central.hits["/maven2" + LIB] == 1  # one entry for both names: the proxy's key
        assert central.hits["/maven2" + LIB + ".sha1"] == 1  # the checksum the jar was checked against
        bad = _split(curl(server, f"https://{hosts[1]}/maven2{BAD}").stdout)[0]
        assert bad == b"HTTP/1.1 502 Upstream bytes failed verification"
        outside = _split(curl(server, f"https://{hosts[0]}{LIB}").stdout)[0]
        assert outside == b"HTTP/1.1 404 Not served through capture (maven repository)"
        records = {(r.key, r.path, r.status) for r in server.served.records}
    assert ("central", LIB[1:], 200) in records
    assert {key for key, _, _ in records} == {"central"}
    central.stop()
    with ProxyServer(replace(settings, mode="replay")) as server:
        for host in hosts:
            status, body = _split(curl(server, f"https://{host}/maven2{LIB}").stdout)
            assert (status, body) == (b"HTTP/1.1 200 OK", JAR)
        missing = _split(curl(server, f"https://{hosts[0]}/maven2/org/demo/lib/2.0/lib-2.0.jar").stdout)[0]
        assert missing == b"HTTP/1.1 504 Not recorded (replay mode)"
