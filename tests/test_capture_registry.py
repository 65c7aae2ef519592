"""Registry-aware capture (docs/capture.md § Registries): pip with no index flag asks the public
index's host through HTTPS_PROXY; capture answers it with the configured ``pypi``-source proxy
(the pypi format's logic, its key), whose url points at an HTTPS PEP 503 server on loopback:
the documented test-only way to stand a local server in for the public host.  Installed, then
installed again in replay mode with that server gone: the same files."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from fixtures.build_wheels import write_tree
from pytest_upstream.config.capture import CaptureSettings
from pytest_upstream.config.settings import ProxyDefinition, Settings
from pytest_upstream.pytest_plugin.harness import capture_env
from pytest_upstream.server.proxy_server import ProxyServer
from tests.capture_peers import TlsUpstream
from tests.pip_setup import installed, pip_env, pip_install

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")


@pytest.fixture
def index(tmp_path: Path) -> Iterator[TlsUpstream]:
    tree = tmp_path / "tree"
    write_tree(tree)
    with TlsUpstream(tmp_path / "index-ca") as up:
        for file in tree.rglob("*"):
            if file.is_file():
                path = "/" + file.relative_to(tree).as_posix()
                if path.endswith("/index.html"):
                    path = path.removesuffix("index.html")
                    up.content_types[path] = "text/html"
                up.files[path] = file.read_bytes()
        yield up


def _pip(server: ProxyServer, target: Path) -> str:
    assert server.capture is not None
    env = pip_env()  # no index URL, no pip config: pip asks the public index's host
    env.update(capture_env(server))  # what the session exports with capture on
    done = pip_install(target, "upstream-demo-a", env=env)
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
