"""Registry-aware capture of Maven Central (docs/capture.md § Registries): a request to either of
its public host names, ``https://<host>/maven2/<path>``, is answered by the configured
``maven-central``-source proxy as ``/<key>/<path>``, with the maven format's checksum check (a jar
whose ``.sha1`` does not match is a 502, nothing stored).  The proxy's url points at an HTTPS
server on loopback standing in for the public host; recorded, then replayed with it gone: with
curl, and with mvn given only Java's proxy properties and a trust store."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from pytest_upstream.config.capture import CaptureSettings
from pytest_upstream.config.settings import ProxyDefinition, Settings
from pytest_upstream.config.sources import BUILTIN_SOURCES
from pytest_upstream.server.proxy_server import ProxyServer
from tests import maven_peers
from tests.capture_peers import TlsUpstream
from tests.peers import require_peer
from tests.test_capture_proxy import _split, curl
from tests.upstreams import Answer

GREETER = 'package org.example;\npublic class Greeter { public static String hi() { return "hi"; } }\n'

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


def _central_settings(tmp_path: Path, url: str, ca_file: Path) -> Settings:
    """Capture on, the one maven-central proxy at the HTTPS stand-in ``url`` (trusted by ``ca_file``)."""
    proxy = ProxyDefinition(key="central", source="maven-central", format="maven", url=f"{url}/maven2/")
    return Settings(
        cache_dir=tmp_path / "cache",
        proxies=(proxy,),
        capture=CaptureSettings(enabled=True, upstream_ca=ca_file),
    )


def test_both_central_hosts_go_through_the_maven_proxy(tmp_path: Path, central: TlsUpstream) -> None:
    hosts = _hosts()
    assert len(hosts) == 2
    settings = _central_settings(tmp_path, central.url, central.ca_file)
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


class DebianRepository(TlsUpstream):
    """Debian's Maven repository (what a tiny build's plugins need) under ``/maven2/``, over HTTPS:
    the stand-in for Maven Central."""

    def answer(self, path: str, headers: dict[str, str]) -> Answer:
        rel = path.removeprefix("/maven2/")
        file = maven_peers.MAVEN_REPO / rel
        if path.startswith("/maven2/") and ".." not in rel.split("/") and file.is_file():
            return Answer(200, file.read_bytes(), {"Content-Type": "application/octet-stream"})
        return Answer(404, b"not found\n")


def _mvn_package(server: ProxyServer, project: Path, work: Path) -> subprocess.CompletedProcess[str]:
    """``mvn package`` with Maven Central as built in (no mirror, no repository in the settings),
    through the forward proxy by Java's own properties, trusting the cache's CA."""
    assert server.capture is not None
    work.mkdir(exist_ok=True)
    store = work / "trust.p12"
    if not store.exists():
        ca = str(server.capture.ca.cert_path)
        keystore = ["-keystore", str(store), "-storetype", "PKCS12", "-storepass", "changeit"]
        subprocess.run(
            ["keytool", "-importcert", "-noprompt", "-alias", "capture", "-file", ca, *keystore],
            check=True,
            capture_output=True,
        )
    settings = work / "settings.xml"
    settings.write_text(f"<settings><localRepository>{work / 'm2'}</localRepository></settings>\n")
    port = server.base_url.rsplit(":", 1)[1]
    java = (
        f"-Dhttps.proxyHost=127.0.0.1 -Dhttps.proxyPort={port} -Djavax.net.ssl.trustStore={store} "
        "-Djavax.net.ssl.trustStorePassword=changeit -Djavax.net.ssl.trustStoreType=PKCS12"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAVEN_", "JAVA_TOOL"))}
    env["MAVEN_OPTS"] = f"-XX:+UseSerialGC -XX:TieredStopAtLevel=1 {java}"
    return subprocess.run(
        ["mvn", "-B", "-ntp", "-s", str(settings), "package"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_mvn_with_java_proxy_properties_builds_through_capture(tmp_path: Path) -> None:
    """mvn knows Maven Central by its public name only; Java's proxy properties and a trust store
    with the cache's CA send it through capture, where the maven-central proxy answers (its
    records, its key).  Built again in replay mode, the stand-in gone, from a fresh local repo."""
    require_peer(*maven_peers.PEER_COMMANDS, "keytool", install=maven_peers.INSTALL)
    project = maven_peers.write_project(
        tmp_path / "app",
        "app",
        "1.0",
        deps=f"<dependency><groupId>junit</groupId><artifactId>junit</artifactId>"
        f"<version>{maven_peers.JUNIT}</version><scope>test</scope></dependency>",
        sources={"src/main/java/org/example/Greeter.java": GREETER},
    )
    with DebianRepository(tmp_path / "central-ca") as central:
        settings = _central_settings(tmp_path, central.url, central.ca_file)
        with ProxyServer(settings) as server:
            maven_peers.assert_success(_mvn_package(server, project, tmp_path / "first"))
            records = server.served.records
        assert {r.key for r in records} == {"central"}
        assert any(r.path.endswith(f"junit-{maven_peers.JUNIT}.jar") and r.status == 200 for r in records)
    shutil.rmtree(project / "target")
    with ProxyServer(replace(settings, mode="replay")) as server:
        maven_peers.assert_success(_mvn_package(server, project, tmp_path / "again"))
        assert {r.cache for r in server.served.records} == {"hit"}
    assert (project / "target" / "app-1.0.jar").is_file()
