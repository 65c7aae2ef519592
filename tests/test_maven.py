"""The Maven format: path classification, checksum verification, the negative
cache, metadata checks, the settings.xml the fixture writes, and real ``mvn``
builds (record, then replay with the upstream gone; SNAPSHOT redeploys).

The fast tests run the proxy against ``tests.upstreams.Upstream`` on loopback;
the ``slow`` ones against nginx (Debian's /usr/share/maven-repo, and a WebDAV
directory for SNAPSHOTs) with Debian's mvn 3.8 as the client.
"""

from __future__ import annotations

import hashlib
import http.client
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from pytest_upstream.config.settings import DEFAULT_NEGATIVE_TTL, ConfigError, ProxyDefinition
from pytest_upstream.engine.clock import ManualClock
from pytest_upstream.formats.base import Kind, MalformedUpstream
from pytest_upstream.formats.maven import (
    BadMavenPath,
    check_metadata_xml,
    classify,
    parse_checksum,
    split_checksum,
)
from pytest_upstream.pytest_plugin.harness import UpstreamProxy
from pytest_upstream.server.proxy_server import ProxyServer
from pytest_upstream.store.cache import Cache

from . import maven_peers
from .conftest import MakeProxy, proxy_def
from .peers import require_peer
from .upstreams import Upstream

JAR_PATH = "org/example/demo/1.0/demo-1.0.jar"
JAR = b"PK\x03\x04 a jar, more or less" * 50
METADATA = b"""<?xml version="1.0" encoding="UTF-8"?>
<metadata><groupId>org.example</groupId><artifactId>demo</artifactId>
<versioning><latest>1.0</latest><release>1.0</release><versions><version>1.0</version></versions>
<lastUpdated>20240101000000</lastUpdated></versioning></metadata>
"""


def sha1(data: bytes) -> bytes:
    return hashlib.sha1(data).hexdigest().encode()


def maven_def(upstream: Upstream, **fields: object) -> ProxyDefinition:
    return proxy_def(key="m", format="maven", url=upstream.url + "/repo/", **fields)


def get(proxy: ProxyServer, path: str, key: str = "m") -> httpx.Response:
    return httpx.get(f"{proxy.url(key)}{path}", timeout=30)


def raw_get(proxy: ProxyServer, target: str) -> tuple[int, str]:
    """GET with the request target exactly as given (no client-side normalisation)."""
    parts = urlsplit(proxy.base_url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)
    try:
        conn.request("GET", target)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def stored(cache_dir: Path, path: str, key: str = "m") -> str | None:
    """The kind of the cache entry for ``path`` ("artifact", "metadata", "notfound"), or None."""
    entry = Cache(cache_dir).lookup(key, path)
    return None if entry is None else entry.kind


# -- path classification ----------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "kind", "verify"),
    [
        ("org/example/demo/1.0/demo-1.0.jar", Kind.ARTIFACT, True),
        ("org/example/demo/1.0/demo-1.0.pom", Kind.ARTIFACT, True),
        ("org/example/demo/1.0/demo-1.0-sources.jar", Kind.ARTIFACT, True),
        ("org/example/demo/1.0/demo-1.0.jar.asc", Kind.ARTIFACT, True),
        ("org/example/demo/1.0/demo-1.0.jar.sha1", Kind.ARTIFACT, False),
        ("org/example/demo/1.0/demo-1.0.pom.sha512", Kind.ARTIFACT, False),
        ("junit/junit/4.13.2/junit-4.13.2.jar", Kind.ARTIFACT, True),  # one-segment group
        ("org/example/demo/1.0+build.5~rc/demo-1.0+build.5~rc.jar", Kind.ARTIFACT, True),
        ("org/example/maven-metadata.xml", Kind.METADATA, False),  # group level (plugin prefixes)
        ("org/example/demo/maven-metadata.xml", Kind.METADATA, False),  # artifact level
        ("org/example/demo/maven-metadata.xml.sha1", Kind.METADATA, False),
        ("org/example/demo/1.0/maven-metadata.xml", Kind.METADATA, False),  # version level
        ("org/example/demo/1.0-SNAPSHOT/maven-metadata.xml", Kind.METADATA, False),
        ("org/example/demo/1.0-SNAPSHOT/demo-1.0-SNAPSHOT.jar", Kind.METADATA, False),
        ("org/example/demo/1.0-SNAPSHOT/demo-1.0-20240101.120000-3.jar", Kind.METADATA, True),
        ("org/example/demo/1.0-SNAPSHOT/demo-1.0-20240101.120000-3-tests.jar", Kind.METADATA, True),
        ("org/example/demo/1.0-SNAPSHOT/demo-1.0-20240101.120000-3.jar.md5", Kind.METADATA, False),
        ("archetype-catalog.xml", Kind.METADATA, False),
        (".meta/prefixes.txt", Kind.METADATA, False),
    ],
)
def test_classify(path: str, kind: Kind, verify: bool) -> None:
    assert classify(path) == (kind, verify)


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("org/example/demo/1.0/", "directory listings are not served"),
        ("", "directory listings are not served"),
        ("demo-1.0.jar", "expected <group path>/<artifactId>/<version>/<file>"),
        ("demo/1.0/demo-1.0.jar", "expected <group path>/<artifactId>/<version>/<file>"),
        ("maven-metadata.xml", "maven-metadata.xml belongs in a group, artifact or version directory"),
        ("org/example/demo/1.0/other-1.0.jar", "'other-1.0.jar' is not a file of demo 1.0"),
        ("org/example/demo/1.0/demo-1.00.jar", "'demo-1.00.jar' is not a file of demo 1.0"),
        ("org/example/demo/1.0-SNAPSHOT/demo-2.0-SNAPSHOT.jar", "is not a file of demo 1.0-SNAPSHOT"),
        ("org/ex ample/demo/1.0/demo-1.0.jar", "segment 'ex ample' is not a Maven name"),
        ("org/example/demo/1.0/demo-1.0.jar;x", "segment 'demo-1.0.jar;x' is not a Maven name"),
        ("org/.hidden/demo/1.0/demo-1.0.jar", "segment '.hidden' is not a Maven name"),
        ("org/-x/demo/1.0/demo-1.0.jar", "segment '-x' is not a Maven name"),
        ("org/example/démo/1.0/démo-1.0.jar", "segment 'démo' is not a Maven name"),
        ("org/" + "a" * 300 + "/demo/1.0/demo-1.0.jar", "longer than 255 characters"),
    ],
)
def test_classify_refuses_odd_paths(path: str, why: str) -> None:
    with pytest.raises(BadMavenPath, match="not a Maven repository path") as info:
        classify(path)
    assert info.value.status == 400
    assert why in str(info.value)


def test_checksum_file_parsing() -> None:
    digest = hashlib.sha1(b"x").hexdigest()
    assert split_checksum("a-1.jar.sha1") == ("a-1.jar", ".sha1")
    assert split_checksum("a-1.jar") == ("a-1.jar", "")
    assert parse_checksum(digest.encode(), ".sha1") == digest
    assert parse_checksum(f"{digest.upper()}  demo-1.0.jar\n".encode(), ".sha1") == digest
    assert parse_checksum(f"{digest} *demo-1.0.jar".encode(), ".sha1") == digest
    assert parse_checksum(b"<html>not found</html>", ".sha1") is None
    assert parse_checksum(digest.encode() + b"ab", ".sha1") is None  # 42 hex digits: not a sha1
    md5 = hashlib.md5(b"x").hexdigest()
    assert parse_checksum(f"MD5 (demo-1.0.jar) = {md5}".encode(), ".md5") == md5


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"<metadata><versioning>", "not well-formed XML"),
        (b"", "not well-formed XML"),
        (b"<html><body>maintenance</body></html>", "has root <html>"),
        (
            b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;">]>'
            b"<metadata>&lol2;</metadata>",
            "DOCTYPE or ENTITY",
        ),
        (b'<!DOCTYPE m [<!ENTITY x SYSTEM "file:///etc/passwd">]><metadata>&x;</metadata>', "DOCTYPE"),
        ('<?xml version="1.0" encoding="UTF-16"?><metadata/>'.encode("utf-16"), "not UTF-8"),
    ],
)
def test_metadata_check_refuses(body: bytes, why: str) -> None:
    with pytest.raises(MalformedUpstream, match=why):
        check_metadata_xml(body, "u")


def test_metadata_check_accepts_namespaced_metadata() -> None:
    check_metadata_xml(METADATA, "u")
    check_metadata_xml(
        b'<metadata xmlns="http://maven.apache.org/METADATA/1.1.0" modelVersion="1.1.0"/>', "u"
    )


# -- configuration ------------------------------------------------------------------
def test_negative_ttl_config() -> None:
    assert proxy_def(key="m", format="maven", url="http://127.0.0.1:1/").negative_ttl == DEFAULT_NEGATIVE_TTL
    assert proxy_def(key="m", format="maven", url="http://127.0.0.1:1/", negative_ttl=5).negative_ttl == 5.0
    with pytest.raises(ConfigError, match="negative_ttl must be a non-negative number of seconds"):
        proxy_def(key="m", format="maven", url="http://127.0.0.1:1/", negative_ttl=-1)
    with pytest.raises(ConfigError, match="negative_ttl must be a non-negative number"):
        proxy_def(key="m", format="maven", url="http://127.0.0.1:1/", negative_ttl="5m")


# -- through the proxy, against a fake upstream ----------------------------------------
def test_release_artifact_verified_against_its_sha1_then_immutable(
    make_proxy: MakeProxy, upstream: Upstream, tmp_path: Path
) -> None:
    upstream.files[f"/repo/{JAR_PATH}"] = JAR
    upstream.files[f"/repo/{JAR_PATH}.sha1"] = sha1(JAR) + b"  demo-1.0.jar\n"
    proxy = make_proxy(maven_def(upstream))
    r = get(proxy, JAR_PATH)
    assert (r.status_code, r.content, r.headers["x-upstream-cache"]) == (200, JAR, "miss")
    assert r.headers["content-type"] == "application/octet-stream"  # the upstream's, kept
    # the client's own .sha1 request is served from the cache: the proxy fetched it first
    r = get(proxy, JAR_PATH + ".sha1")
    assert (r.status_code, r.headers["x-upstream-cache"]) == (200, "hit")
    assert r.content == sha1(JAR) + b"  demo-1.0.jar\n"  # passed through unchanged
    assert stored(tmp_path / "cache", JAR_PATH) == "artifact"
    assert stored(tmp_path / "cache", JAR_PATH + ".sha1") == "artifact"
    # immutable: later requests do not even look at the checksum again
    upstream.files[f"/repo/{JAR_PATH}"] = b"changed upstream"
    upstream.files[f"/repo/{JAR_PATH}.sha1"] = sha1(b"changed upstream")
    assert get(proxy, JAR_PATH).content == JAR
    assert upstream.hits[f"/repo/{JAR_PATH}"] == 1
    assert upstream.hits[f"/repo/{JAR_PATH}.sha1"] == 1


@pytest.mark.parametrize("size", [len(JAR), 9 * 1024 * 1024])  # verified before serving / while streaming
def test_checksum_mismatch_is_502_and_nothing_is_stored(
    make_proxy: MakeProxy, upstream: Upstream, tmp_path: Path, size: int
) -> None:
    body = (JAR * (size // len(JAR) + 1))[:size]
    upstream.files[f"/repo/{JAR_PATH}"] = body
    upstream.files[f"/repo/{JAR_PATH}.sha1"] = sha1(b"what the upstream meant to publish")
    proxy = make_proxy(maven_def(upstream))

    def refused() -> None:
        if size <= len(JAR):
            r = get(proxy, JAR_PATH)
            assert r.status_code == 502
            assert "sha1 digest mismatch: upstream published" in r.text
        else:  # too big to hold back: the body is cut short, so the client sees a broken transfer
            with pytest.raises(httpx.HTTPError):
                get(proxy, JAR_PATH)

    refused()
    assert stored(tmp_path / "cache", JAR_PATH) is None
    assert not list((tmp_path / "cache").rglob("*.part"))
    refused()  # nothing was remembered: the next request downloads and checks again
    assert upstream.hits[f"/repo/{JAR_PATH}"] == 2
    assert stored(tmp_path / "cache", JAR_PATH) is None


def test_missing_checksum_is_not_an_error(make_proxy: MakeProxy, upstream: Upstream, tmp_path: Path) -> None:
    upstream.files[f"/repo/{JAR_PATH}"] = JAR
    proxy = make_proxy(maven_def(upstream))
    r = get(proxy, JAR_PATH)
    assert (r.status_code, r.content) == (200, JAR)
    assert stored(tmp_path / "cache", JAR_PATH) == "artifact"
    assert stored(tmp_path / "cache", JAR_PATH + ".sha1") == "notfound"
    # the client's .sha1 and .md5 requests: 404s, the first one already remembered
    assert get(proxy, JAR_PATH + ".sha1").status_code == 404
    assert get(proxy, JAR_PATH + ".md5").status_code == 404
    assert upstream.hits[f"/repo/{JAR_PATH}.sha1"] == 1


def test_unreadable_checksum_file_is_not_used(make_proxy: MakeProxy, upstream: Upstream) -> None:
    upstream.files[f"/repo/{JAR_PATH}"] = JAR
    upstream.files[f"/repo/{JAR_PATH}.sha1"] = b"<html>a login page</html>"
    proxy = make_proxy(maven_def(upstream))
    assert get(proxy, JAR_PATH).content == JAR


def test_checksum_upstream_failure_is_502(make_proxy: MakeProxy, upstream: Upstream, tmp_path: Path) -> None:
    from .upstreams import Fault

    upstream.files[f"/repo/{JAR_PATH}"] = JAR
    upstream.faults[f"/repo/{JAR_PATH}.sha1"] = Fault(status=503)
    proxy = make_proxy(maven_def(upstream))
    r = get(proxy, JAR_PATH)
    assert r.status_code == 502
    assert stored(tmp_path / "cache", JAR_PATH) is None


def test_negative_cache_then_replay_answers_the_404(
    make_proxy: MakeProxy, upstream: Upstream, tmp_path: Path
) -> None:
    missing = "org/example/demo/9.9/demo-9.9.pom"
    proxy = make_proxy(maven_def(upstream))
    first = get(proxy, missing)
    assert first.status_code == 404
    assert "not found upstream" in first.text
    hits_after_first = dict(upstream.hits)
    second = get(proxy, missing)
    assert second.status_code == 404
    assert dict(upstream.hits) == hits_after_first  # neither the pom nor its .sha1 was asked again
    assert upstream.hits[f"/repo/{missing}"] == 1
    assert [(r.path, r.cache, r.status) for r in proxy.served.records] == [
        (missing, "miss", 404),
        (missing, "hit", 404),
    ]
    assert stored(tmp_path / "cache", missing) == "notfound"
    # replay: the upstream is gone, the recorded 404 is the answer; what was never asked is a miss
    upstream.stop()
    replay = make_proxy(maven_def(upstream), mode="replay")
    assert get(replay, missing).status_code == 404
    assert get(replay, missing + ".sha1").status_code == 404
    unrecorded = get(replay, "org/example/demo/9.8/demo-9.8.pom")
    assert unrecorded.status_code == 504
    assert "replay mode" in unrecorded.text


def test_negative_cache_expires(make_proxy: MakeProxy, upstream: Upstream) -> None:
    missing = "org/example/demo/9.9/demo-9.9.pom"
    clock = ManualClock()
    proxy = make_proxy(maven_def(upstream, negative_ttl=1.5), clock=clock)
    assert get(proxy, missing).status_code == 404
    clock.advance(1.4)
    assert get(proxy, missing).status_code == 404
    assert upstream.hits[f"/repo/{missing}"] == 1
    clock.advance(0.2)
    upstream.files[f"/repo/{missing}"] = b"<project/>"  # published meanwhile
    r = get(proxy, missing)
    assert (r.status_code, r.content) == (200, b"<project/>")
    assert upstream.hits[f"/repo/{missing}"] == 2


def test_metadata_404_is_not_remembered_longer_than_the_metadata_ttl(
    make_proxy: MakeProxy, upstream: Upstream
) -> None:
    path = "org/example/demo/maven-metadata.xml"
    clock = ManualClock()
    proxy = make_proxy(maven_def(upstream, metadata_ttl=1.5, negative_ttl=300), clock=clock)
    assert get(proxy, path).status_code == 404
    clock.advance(1.4)
    assert get(proxy, path).status_code == 404
    assert upstream.hits[f"/repo/{path}"] == 1
    clock.advance(0.2)
    upstream.files[f"/repo/{path}"] = METADATA
    assert get(proxy, path).content == METADATA


def test_metadata_is_refreshed_after_its_ttl(make_proxy: MakeProxy, upstream: Upstream) -> None:
    path = "org/example/demo/maven-metadata.xml"
    upstream.files[f"/repo/{path}"] = METADATA
    clock = ManualClock()
    proxy = make_proxy(maven_def(upstream, metadata_ttl=1.5), clock=clock)
    assert get(proxy, path).content == METADATA
    newer = METADATA.replace(b"1.0</version>", b"1.0</version><version>1.1</version>")
    upstream.files[f"/repo/{path}"] = newer
    clock.advance(1.4)
    assert get(proxy, path).content == METADATA  # still fresh
    clock.advance(0.2)
    r = get(proxy, path)
    assert (r.content, r.headers["x-upstream-cache"]) == (newer, "miss")
    assert r.headers["content-type"] == "application/octet-stream"  # as the upstream sent it
    assert upstream.hits[f"/repo/{path}"] == 2


@pytest.mark.parametrize(
    "body",
    [b"<metadata><versioning>", b'<!DOCTYPE x [<!ENTITY a "aaaa">]><metadata>&a;</metadata>'],
)
def test_malformed_metadata_is_502_and_not_stored(
    make_proxy: MakeProxy, upstream: Upstream, tmp_path: Path, body: bytes
) -> None:
    path = "org/example/demo/maven-metadata.xml"
    upstream.files[f"/repo/{path}"] = body
    proxy = make_proxy(maven_def(upstream))
    r = get(proxy, path)
    assert r.status_code == 502
    assert "maven-metadata.xml" in r.text
    assert stored(tmp_path / "cache", path) is None


def test_malformed_metadata_refresh_keeps_the_good_copy(make_proxy: MakeProxy, upstream: Upstream) -> None:
    path = "org/example/demo/maven-metadata.xml"
    upstream.files[f"/repo/{path}"] = METADATA
    proxy = make_proxy(maven_def(upstream, metadata_ttl=0))
    assert get(proxy, path).content == METADATA
    upstream.files[f"/repo/{path}"] = b"<metadata>"
    assert get(proxy, path).content != b"<metadata>"  # never served, never stored
    assert upstream.hits[f"/repo/{path}"] == 2
    entry = Cache(proxy.engine.settings.cache_dir).lookup("m", path)
    assert entry is not None and entry.sha256 == hashlib.sha256(METADATA).hexdigest()


def test_snapshot_timestamped_file_is_verified_and_metadata(
    make_proxy: MakeProxy, upstream: Upstream, tmp_path: Path
) -> None:
    snap = "org/example/demo/1.0-SNAPSHOT/demo-1.0-20240101.120000-1.jar"
    plain = "org/example/demo/1.0-SNAPSHOT/demo-1.0-SNAPSHOT.jar"
    upstream.files[f"/repo/{snap}"] = JAR
    upstream.files[f"/repo/{snap}.sha1"] = sha1(b"other bytes")
    upstream.files[f"/repo/{plain}"] = JAR
    upstream.files[f"/repo/{plain}.sha1"] = sha1(b"other bytes")  # stale: not used to verify
    proxy = make_proxy(maven_def(upstream))
    assert get(proxy, snap).status_code == 502
    assert stored(tmp_path / "cache", snap) is None
    r = get(proxy, plain)
    assert (r.status_code, r.content) == (200, JAR)
    assert stored(tmp_path / "cache", plain) == "metadata"


def test_bad_paths_are_400(make_proxy: MakeProxy, upstream: Upstream) -> None:
    proxy = make_proxy(maven_def(upstream))
    for target in (
        "/m/org/example/../../../etc/passwd",
        "/m/org/%2e%2e/%2e%2e/etc/passwd",
        "/m/org/example%2fdemo/1.0/demo-1.0.jar",
        "/m/org/example/demo/1.0/demo-1.0.jar%00.sha1",
        "/m/org/ex%20ample/demo/1.0/demo-1.0.jar",
        "/m/org/example/demo/1.0/other-1.0.jar",
        "/m/org/example/demo/1.0/",
        "/m/pom.xml",
    ):
        status, body = raw_get(proxy, target)
        assert status == 400, (target, status, body)
        assert "path" in body
    assert sum(upstream.hits.values()) == 0
    status, body = raw_get(proxy, "/m/org/ex%20ample/demo/1.0/demo-1.0.jar")
    assert body == (
        "not a Maven repository path: /org/ex ample/demo/1.0/demo-1.0.jar: segment 'ex ample' is not a "
        "Maven name (letters, digits and _ . + ~ -, starting with a letter, digit or _)\n"
    )


def test_upload_is_refused(make_proxy: MakeProxy, upstream: Upstream) -> None:
    proxy = make_proxy(maven_def(upstream))
    r = httpx.put(f"{proxy.url('m')}{JAR_PATH}", content=JAR, timeout=30)
    assert r.status_code == 405
    assert r.headers["allow"] == "GET, HEAD"


def test_basic_auth_reaches_the_upstream_for_checksums_and_artifacts(
    make_proxy: MakeProxy, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MVN_USER", "deployer")
    monkeypatch.setenv("MVN_PASS", "s3cret")
    upstream.files[f"/repo/{JAR_PATH}"] = JAR
    upstream.files[f"/repo/{JAR_PATH}.sha1"] = sha1(JAR)
    proxy = make_proxy(maven_def(upstream, auth="basic", username_env="MVN_USER", password_env="MVN_PASS"))
    assert get(proxy, JAR_PATH).content == JAR
    sent = {path: headers.get("Authorization") for path, headers in upstream.request_headers}
    assert sent == {
        f"/repo/{JAR_PATH}.sha1": "Basic ZGVwbG95ZXI6czNjcmV0",
        f"/repo/{JAR_PATH}": "Basic ZGVwbG95ZXI6czNjcmV0",
    }


def test_head_of_an_uncached_artifact(make_proxy: MakeProxy, upstream: Upstream) -> None:
    upstream.files[f"/repo/{JAR_PATH}"] = JAR
    upstream.files[f"/repo/{JAR_PATH}.sha1"] = sha1(JAR)
    proxy = make_proxy(maven_def(upstream))
    r = httpx.head(f"{proxy.url('m')}{JAR_PATH}", timeout=30)
    assert (r.status_code, r.headers["content-length"]) == (200, str(len(JAR)))


# -- the settings.xml the fixture writes --------------------------------------------------
NS = {"s": "http://maven.apache.org/SETTINGS/1.0.0"}


def test_maven_settings(make_proxy: MakeProxy, upstream: Upstream, tmp_path: Path) -> None:
    server = make_proxy(
        proxy_def(key="files", format="generic", url=upstream.url),
        maven_def(upstream),
        proxy_def(key="snaps", format="maven", url=upstream.url + "/snaps/"),
    )
    harness = UpstreamProxy(server)
    assert harness.maven_mirror_url() == server.url("m")
    assert harness.maven_mirror_url("snaps") == server.url("snaps")
    with pytest.raises(ValueError, match="'files' has format 'generic', not 'maven'"):
        harness.maven_settings("files")
    with pytest.raises(KeyError, match="no upstream proxy with key 'nope'"):
        harness.maven_settings("nope")

    path = harness.maven_settings(local_repo=tmp_path / "m2")
    root = ET.parse(path).getroot()
    assert root.findtext("s:localRepository", namespaces=NS) == str(tmp_path / "m2")
    (mirror,) = root.findall("s:mirrors/s:mirror", NS)
    assert mirror.findtext("s:mirrorOf", namespaces=NS) == "*"
    assert mirror.findtext("s:url", namespaces=NS) == server.url("m")
    repos = root.findall("s:profiles/s:profile/s:repositories/s:repository", NS)
    assert [r.findtext("s:id", namespaces=NS) for r in repos] == ["central"]
    assert repos[0].findtext("s:snapshots/s:enabled", namespaces=NS) == "true"
    assert root.findtext("s:activeProfiles/s:activeProfile", namespaces=NS) == "pytest-upstream"

    with_snaps = ET.parse(harness.maven_settings("m", extra_keys=["snaps"])).getroot()
    assert with_snaps.find("s:localRepository", NS) is None
    assert with_snaps.findtext("s:mirrors/s:mirror/s:mirrorOf", namespaces=NS) == "*,!snaps"
    ids_urls = [
        (r.findtext("s:id", namespaces=NS), r.findtext("s:url", namespaces=NS))
        for r in with_snaps.findall("s:profiles/s:profile/s:pluginRepositories/s:pluginRepository", NS)
    ]
    assert ids_urls[1] == ("snaps", server.url("snaps"))
    written = path.parent
    harness.stop()
    assert not written.exists()


def test_maven_settings_without_a_maven_proxy(make_proxy: MakeProxy, upstream: Upstream) -> None:
    harness = UpstreamProxy(make_proxy(proxy_def(key="files", format="generic", url=upstream.url)))
    with pytest.raises(KeyError, match="no maven upstream proxy is configured"):
        harness.maven_settings()


# -- real mvn against nginx ------------------------------------------------------------------
def require_maven() -> None:
    require_peer(*maven_peers.PEER_COMMANDS, install=maven_peers.INSTALL)


GREETER = textwrap.dedent(
    """\
    package org.example;

    public class Greeter {
        public static String greet(String name) {
            return "Hello, " + name;
        }
    }
    """
)
GREETER_TEST = textwrap.dedent(
    """\
    package org.example;

    import static org.junit.Assert.assertEquals;
    import org.junit.Test;

    public class GreeterTest {
        @Test
        public void greets() {
            assertEquals("Hello, Maven", Greeter.greet("Maven"));
        }
    }
    """
)

# The inner test run by pytester: the pytest plugin's fixture writes the settings,
# mvn builds through it.  Asserts that everything the build downloaded came from
# the proxy, and that replay serves it all without an upstream.
INNER = """
import shutil, sys
from pathlib import Path

sys.path.insert(0, {tests_parent!r})
from tests import maven_peers


def test_build(upstream_proxy, tmp_path):
    project = shutil.copytree({project!r}, tmp_path / "app")
    settings = upstream_proxy.maven_settings(local_repo=tmp_path / "m2")
    result = maven_peers.mvn(project, settings, "package")
    maven_peers.assert_success(result)
    assert "Tests run: 1, Failures: 0, Errors: 0, Skipped: 0" in result.stdout
    assert (project / "target/app-1.0.jar").is_file()
    served = upstream_proxy.test_served
    assert all(r.key == "central" for r in served)
    assert not [r for r in served if r.status >= 500], [r for r in served if r.status >= 500]
    ok = {{r.path for r in served if r.status == 200}}
    downloaded = [p for p in (tmp_path / "m2").rglob("*") if p.suffix in (".jar", ".pom")]
    assert len(downloaded) > 50
    for p in downloaded:
        assert str(p.relative_to(tmp_path / "m2")) in ok, p
    if upstream_proxy.mode == "replay":
        assert all(r.cache == "hit" for r in served), [r for r in served if r.cache != "hit"]
        assert any(r.status == 404 for r in served)  # Maven's .sha1/.md5 probes, answered from the record
    else:
        assert any(r.cache == "miss" for r in served)
"""


@pytest.mark.slow
def test_mvn_package_through_the_proxy_then_replay_without_upstream(
    pytester: pytest.Pytester, tmp_path: Path
) -> None:
    require_maven()
    project = maven_peers.write_project(
        tmp_path / "app",
        "app",
        "1.0",
        deps=f"<dependency><groupId>junit</groupId><artifactId>junit</artifactId>"
        f"<version>{maven_peers.JUNIT}</version><scope>test</scope></dependency>",
        sources={
            "src/main/java/org/example/Greeter.java": GREETER,
            "src/test/java/org/example/GreeterTest.java": GREETER_TEST,
        },
    )
    pytester.makepyfile(
        test_inner=INNER.format(
            tests_parent=str(Path(__file__).resolve().parent.parent), project=str(project)
        )
    )
    with maven_peers.nginx(tmp_path / "nginx") as upstream:
        (pytester.path / "pyproject.toml").write_text(
            textwrap.dedent(
                f"""
                [tool.pytest-upstream]
                cache = "cache-dir"
                [[tool.pytest-upstream.proxy]]
                key = "central"
                source = "maven-central"
                url = "{upstream.repo_url}"
                """
            )
        )
        started = time.monotonic()
        record = pytester.runpytest_subprocess("--upstream-proxy", "-p", "no:cacheprovider")
        record_time = time.monotonic() - started
        record.assert_outcomes(passed=1)
        assert len(upstream.requests()) > 100  # mvn knows only the proxy: these came through it
    # nginx is gone; mvn stays online, the proxy answers everything from the record
    started = time.monotonic()
    replay = pytester.runpytest_subprocess(
        "--upstream-proxy", "--upstream-mode=replay", "-p", "no:cacheprovider"
    )
    replay_time = time.monotonic() - started
    replay.assert_outcomes(passed=1)
    # (the summary counts the answered 404s of Maven's checksum probes as errors)
    replay.stdout.fnmatch_lines(
        ["pytest-upstream (replay, *): * requests, * hits, 0 misses, 0 stale, 0 B from upstream*"]
    )
    print(f"mvn package: record {record_time:.1f}s, replay {replay_time:.1f}s")


@pytest.mark.slow
def test_mvn_snapshot_redeploy_is_seen_after_the_metadata_ttl(make_proxy: MakeProxy, tmp_path: Path) -> None:
    require_maven()
    clock = ManualClock()
    with maven_peers.nginx(tmp_path / "nginx") as upstream:
        server = make_proxy(
            proxy_def(key="central", source="maven-central", url=upstream.repo_url),
            proxy_def(key="snaps", format="maven", url=upstream.dav_url, metadata_ttl=1),
            clock=clock,
        )
        harness = UpstreamProxy(server)
        lib = maven_peers.write_project(
            tmp_path / "lib", "lib", "1.0-SNAPSHOT", sources={"src/main/resources/lib.txt": "v1\n"}
        )
        deploy_settings = harness.maven_settings(local_repo=tmp_path / "m2-lib")
        maven_peers.deploy(lib, deploy_settings, upstream.dav_url)

        app = maven_peers.write_project(
            tmp_path / "app",
            "app",
            "1.0",
            deps="<dependency><groupId>org.example</groupId><artifactId>lib</artifactId>"
            "<version>1.0-SNAPSHOT</version></dependency>",
        )
        app_settings = harness.maven_settings(local_repo=tmp_path / "m2-app", extra_keys=["snaps"])
        resolved = tmp_path / "m2-app/org/example/lib/1.0-SNAPSHOT/lib-1.0-SNAPSHOT.jar"
        maven_peers.assert_success(maven_peers.mvn(app, app_settings, "-U", "compile"))
        assert maven_peers.jar_entry(resolved, "lib.txt") == "v1\n"
        first = [r for r in server.served.records if r.key == "snaps"]
        # the timestamped jar was verified against its .sha1, which the proxy fetched first
        (jar,) = [r for r in first if r.path.endswith(".jar") and r.status == 200]
        assert jar.kind == "metadata" and "-1.jar" in jar.path
        assert [r.cache for r in first if r.path == jar.path + ".sha1"] == ["hit"]

        (lib / "src/main/resources/lib.txt").write_text("v2\n")
        maven_peers.deploy(lib, deploy_settings, upstream.dav_url)
        clock.advance(1.1)  # the snaps proxy's metadata_ttl
        mark = server.served.mark()
        maven_peers.assert_success(maven_peers.mvn(app, app_settings, "-U", "compile"))
        assert maven_peers.jar_entry(resolved, "lib.txt") == "v2\n"
        again = [r for r in server.served.since(mark)[0] if r.key == "snaps"]
        assert ("org/example/lib/1.0-SNAPSHOT/maven-metadata.xml", "miss") in [
            (r.path, r.cache) for r in again
        ]
        assert any(r.path.endswith("-2.jar") and r.status == 200 for r in again)
