"""Registry-aware capture (docs/capture.md § Registries): pip with no index flag asks the public
index's host through HTTPS_PROXY; capture answers it with the configured ``pypi``-source proxy
(the pypi format's logic, its key), whose url points at an HTTPS PEP 503 server on loopback:
the documented test-only way to stand a local server in for the public host.  Installed, then
installed again in replay mode with that server gone: the same files.  The index's files host
is answered by the same proxy's file route (its hash checks included); npm the same way.  The
public host names come from the built-in source table, as capture's do."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from fixtures.build_wheels import write_tree
from pytest_upstream.capture.hosts import RegistryRoute, registry_route
from pytest_upstream.config.capture import CaptureSettings
from pytest_upstream.config.settings import ProxyDefinition, Settings, builtin_proxies
from pytest_upstream.config.sources import BUILTIN_SOURCES, CAPTURE_REGISTRY_HOSTS, CAPTURE_ROLES
from pytest_upstream.messages import Reply
from pytest_upstream.pytest_plugin.harness import capture_env
from pytest_upstream.server.capture_registries import registry_target
from pytest_upstream.server.proxy_server import ProxyServer
from tests.capture_peers import TlsUpstream, role_host
from tests.pip_setup import installed, pip_env, pip_install
from tests.test_capture_proxy import _split, curl

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")


FILES = "/packages/9a/0b/"  # where the stand-in serves its files, as the public files host does


@pytest.fixture(params=["relative", "absolute"])
def index(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[TlsUpstream]:
    """The demo index; its pages link to the files either relatively or, as the public index
    does, by absolute URL on another path (its own ``/packages/...``, standing in for the files
    host)."""
    tree = tmp_path / "tree"
    write_tree(tree)
    with TlsUpstream(tmp_path / "index-ca") as up:
        for file in tree.rglob("*"):
            if file.is_file():
                path = "/" + file.relative_to(tree).as_posix()
                data = file.read_bytes()
                if path.endswith("/index.html"):
                    path = path.removesuffix("index.html")
                    up.content_types[path] = "text/html"
                    if request.param == "absolute":
                        data = data.replace(b'href="../../files/', f'href="{up.url}{FILES}'.encode())
                elif path.startswith("/files/") and request.param == "absolute":
                    path = FILES + path.removeprefix("/files/")
                up.files[path] = data
        yield up


def _pip(server: ProxyServer, target: Path, *requirements: str) -> str:
    assert server.capture is not None
    env = pip_env()  # no index URL, no pip config: pip asks the public index's host
    env.update(capture_env(server))  # what the session exports with capture on
    done = pip_install(target, *(requirements or ["upstream-demo-a"]), env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_pip_without_an_index_url_goes_through_the_pypi_proxy(tmp_path: Path, index: TlsUpstream) -> None:
    proxy = ProxyDefinition(key="pypi", source="pypi", format="pypi", url=f"{index.url}/simple/")
    settings = Settings(
        cache_dir=tmp_path / "cache",
        proxies=(proxy,),
        capture=CaptureSettings(enabled=True, upstream_ca=index.ca_file),
    )
    with ProxyServer(settings) as server:
        _pip(server, tmp_path / "first")
        keys = {r.key for r in server.served.records}
        paths = {r.path for r in server.served.records}
    assert keys == {"pypi"}  # the format's proxy, not a generic one for the host
    assert {"simple/upstream-demo-a/", "simple/upstream-demo-b/"} <= paths
    assert index.hits["/simple/upstream-demo-a/"] == 1
    index.stop()
    with ProxyServer(replace(settings, mode="replay")) as server:
        _pip(server, tmp_path / "again")
    assert installed(tmp_path / "again") == installed(tmp_path / "first")
    assert "upstream_demo_a" in {p.name for p in (tmp_path / "first").iterdir()}


@pytest.mark.parametrize("index", ["absolute"], indirect=True)
def test_the_files_host_is_answered_by_the_pypi_file_route(tmp_path: Path, index: TlsUpstream) -> None:
    """pip installing a wheel by its URL on the public files host (as a lock file or a direct
    reference names it): the pypi proxy's file route answers it, the file found on its project's
    page and checked against the hash there; recorded under the pypi key, replayed offline."""
    files_host = role_host("pypi", "files")
    wheel_a, wheel_b = "upstream_demo_a-1.0-py3-none-any.whl", "upstream_demo_b-1.0-py3-none-any.whl"
    proxy = ProxyDefinition(key="pypi", source="pypi", format="pypi", url=f"{index.url}/simple/")
    settings = Settings(
        cache_dir=tmp_path / "cache",
        proxies=(proxy,),
        capture=CaptureSettings(enabled=True, upstream_ca=index.ca_file),
    )
    index.files[FILES + wheel_b] += b"tampered"  # not the bytes the project page's hash names
    requirement = f"upstream-demo-a @ https://{files_host}{FILES}{wheel_a}"
    with ProxyServer(settings) as server:
        _pip(server, tmp_path / "first", "--no-deps", requirement)
        assert [(r.key, r.path) for r in server.served.records] == [
            ("pypi", f"files/upstream-demo-a/{wheel_a}")
        ]
        assert index.hits["/simple/upstream-demo-a/"] == 1  # the page the file's hash comes from
        tampered = curl(server, f"https://{files_host}{FILES}{wheel_b}")
        assert _split(tampered.stdout)[0] == b"HTTP/1.1 502 Upstream bytes failed verification"
        other = curl(server, f"https://{files_host}/packages/9a/0b/README.txt")
        assert _split(other.stdout)[0] == b"HTTP/1.1 404 Not served through capture (index files host)"
    index.stop()
    with ProxyServer(replace(settings, mode="replay")) as server:
        _pip(server, tmp_path / "again", "--no-deps", requirement)
        assert {r.cache for r in server.served.records} == {"hit"}
    assert installed(tmp_path / "again") == installed(tmp_path / "first")
    assert "upstream_demo_a" in {p.name for p in (tmp_path / "first").iterdir()}


def _npm_tarball(name: str, version: str, code: str) -> bytes:
    """A package tarball as npm packs one (``package/`` inside a gzipped tar)."""
    files = {
        "package/package.json": json.dumps({"name": name, "version": version, "main": "index.js"}).encode(),
        "package/index.js": code.encode(),
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in files.items():
            info = tarfile.TarInfo(member)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_600_000_000
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.skipif(shutil.which("npm") is None, reason="needs npm")
def test_npm_without_a_registry_flag_goes_through_the_npm_proxy(tmp_path: Path) -> None:
    from tests.test_npm import installed_tree, manifest, npm_env, packument, run

    tarball = _npm_tarball("demo-base", "1.0.0", "module.exports = 'base';\n")
    with TlsUpstream(tmp_path / "registry-ca") as registry:
        url = f"{registry.url}/files/demo-base-1.0.0.tgz"
        registry.files["/demo-base"] = packument(
            "demo-base", {"1.0.0": manifest("demo-base", "1.0.0", url, tarball)}, "1.0.0"
        )
        registry.content_types["/demo-base"] = "application/json"
        registry.files["/files/demo-base-1.0.0.tgz"] = tarball
        proxy = ProxyDefinition(key="npm", source="npm", format="npm", url=f"{registry.url}/")
        settings = Settings(
            cache_dir=tmp_path / "cache",
            proxies=(proxy,),
            capture=CaptureSettings(enabled=True, upstream_ca=registry.ca_file),
        )

        def install(server: ProxyServer, project: Path) -> dict[str, str]:
            project.mkdir()
            deps = {"demo-base": "^1.0.0"}
            (project / "package.json").write_text(
                json.dumps({"name": "c", "version": "1.0.0", "dependencies": deps})
            )
            env = {**npm_env(project.parent / f"{project.name}-home"), **capture_env(server)}
            cmd = ["npm", "install", "--cache", str(project.parent / f"{project.name}-cache"), "--no-audit"]
            run(cmd, project, env, timeout=120)
            return installed_tree(project)

        with ProxyServer(settings) as server:
            first = install(server, tmp_path / "first")
            records = {(r.key, r.path) for r in server.served.records}
        assert {("npm", "demo-base"), ("npm", "demo-base/-/demo-base-1.0.0.tgz")} <= records
        registry.stop()
        with ProxyServer(replace(settings, mode="replay")) as server:
            again = install(server, tmp_path / "again")
    assert again == first and "demo-base/index.js" in first


@pytest.mark.public_registry
def test_pip_through_capture_from_the_real_public_index(tmp_path: Path) -> None:
    """Opt-in (--run-public): pip with no index flags, through capture, from the real public
    index (the built-in sources, the system's roots), and a wheel by its URL on the real files
    host; then both again in replay mode, every answer from the cache."""
    settings = Settings(
        cache_dir=tmp_path / "cache",
        proxies=builtin_proxies(),
        capture=CaptureSettings(enabled=True),
        # a machine that reaches the public hosts through a filtering mirror on a reserved address
        # would have the SSRF guard refuse the files host, which is no configured origin
        allow_hosts=(role_host("pypi", "files"),),
    )
    with ProxyServer(settings) as server:
        _pip(server, tmp_path / "first", "iniconfig==2.0.0")
        records = [(r.key, r.path, r.cache) for r in server.served.records]
        (wheel,) = [r for r in server.served.records if r.path.endswith(".whl")]
    assert ("pypi", "simple/iniconfig/", "miss") in records
    assert any(path.startswith("files/iniconfig/") and cache == "miss" for _, path, cache in records)
    assert wheel.upstream_url.startswith(f"https://{role_host('pypi', 'files')}/packages/")
    with ProxyServer(replace(settings, cache_dir=tmp_path / "other-cache")) as server:
        # by its URL on the files host, as a lock file with URLs names it: the file route (the
        # project's page fetched for the hash) answers it, under the pypi key
        _pip(server, tmp_path / "by-url-first", f"iniconfig @ {wheel.upstream_url}")
        assert [(r.key, r.path, r.cache) for r in server.served.records] == [("pypi", wheel.path, "miss")]
    with ProxyServer(replace(settings, mode="replay")) as server:
        _pip(server, tmp_path / "again", "iniconfig==2.0.0")
        _pip(server, tmp_path / "by-url", f"iniconfig @ {wheel.upstream_url}")
        assert {r.cache for r in server.served.records} == {"hit"}
        assert [r.path for r in server.served.records].count(wheel.path) == 2
    assert installed(tmp_path / "again") == installed(tmp_path / "first")
    code = {
        name: digest for name, digest in installed(tmp_path / "first").items() if ".dist-info/" not in name
    }
    assert code.items() <= installed(tmp_path / "by-url").items()  # (pip notes a direct URL in dist-info)


def _route(source: str, role: str, key: str = "k") -> RegistryRoute:
    builtin = BUILTIN_SOURCES[source]
    proxy = ProxyDefinition(key=key, source=source, format=builtin.format, url=builtin.url)
    host = role_host(source, role)
    route = registry_route((proxy,), host.upper(), 443)  # host names are matched lower-cased
    assert route is not None and (route.proxy, route.role) == (proxy, role)
    assert registry_route((proxy,), host, 8443) is None  # HTTPS on 443 only
    assert registry_route((), host, 443) is None  # no proxy of that source: a generic host
    return route


def test_every_public_host_comes_from_the_source_table() -> None:
    for name, source in BUILTIN_SOURCES.items():
        assert CAPTURE_REGISTRY_HOSTS[source.host] == (name, "registry")
        assert all(CAPTURE_REGISTRY_HOSTS[h] == (name, "token") for h in source.auth_hosts)
        assert all(CAPTURE_REGISTRY_HOSTS[h] == (name, role) for h, role in source.other_hosts)
    assert {role for _, role in CAPTURE_REGISTRY_HOSTS.values()} == set(CAPTURE_ROLES)


@pytest.mark.parametrize(
    ("source", "role", "raw", "expected"),
    [
        ("pypi", "registry", "/simple/demo/", ("/simple/demo/", False)),
        ("pypi", "registry", "/k/files/demo/demo-1.0.tar.gz", ("/files/demo/demo-1.0.tar.gz", False)),
        (
            "pypi",
            "files",
            "/packages/ab/cd/ef/Foo.Bar-1.0-py3-none-any.whl",
            ("/files/foo-bar/Foo.Bar-1.0-py3-none-any.whl", False),
        ),
        (
            "pypi",
            "files",
            "/packages/ab/foo-1.0.tar.gz.metadata",
            ("/files/foo/foo-1.0.tar.gz.metadata", False),
        ),
        (
            "pypi",
            "files",
            "/packages/ab/demo-1.0%2Blocal.tar.gz",
            ("/files/demo/demo-1.0%2Blocal.tar.gz", False),
        ),
        ("pypi", "files", "/packages/ab/README.txt", 404),
        ("pypi", "files", "/elsewhere/foo-1.0.tar.gz", 404),
        ("npm", "registry", "/@scope%2fdemo", ("/@scope%2fdemo", False)),
        ("dockerhub", "registry", "/v2/", ("/", True)),
        ("dockerhub", "registry", "/v2", ("/", True)),
        (
            "dockerhub",
            "registry",
            "/v2/library/demo/blobs/sha256:ab",
            ("/library/demo/blobs/sha256:ab", True),
        ),
        ("dockerhub", "registry", "/v2x/demo", 404),
        ("dockerhub", "token", "/token", 200),
        ("dockerhub", "token", "/v2/token", 404),
        ("dockerhub", "blobs", "/registry-v2/docker/registry/v2/blobs/sha256/ab/ab/data", 404),
        (
            "maven-central",
            "registry",
            "/maven2/org/demo/lib/1.0/lib-1.0.pom",
            ("/org/demo/lib/1.0/lib-1.0.pom", False),
        ),
        (
            "maven-central",
            "registry",
            "/k/org/demo/maven-metadata.xml",
            ("/org/demo/maven-metadata.xml", False),
        ),
        ("maven-central", "registry", "/org/demo/lib/1.0/lib-1.0.pom", 404),
    ],
)
def test_what_a_public_host_request_becomes(source: str, role: str, raw: str, expected: object) -> None:
    got = registry_target(_route(source, role), raw)
    if isinstance(expected, int):
        assert isinstance(got, Reply) and got.status == expected
        if expected == 404:
            assert got.reason.startswith("Not served through capture (")
    else:
        assert got == expected
