"""Registry-aware capture of Docker Hub (docs/capture.md § Registries): skopeo, with nothing but
``HTTPS_PROXY`` and ``SSL_CERT_FILE`` (capture's exports), pulls an image by its Docker Hub name;
its requests to the registry host's ``/v2/`` are answered by the configured ``dockerhub``-source
proxy as keyless registry requests (the docker format's digest checks, its key in the records).
The proxy's url points at CNCF distribution over HTTPS on loopback, standing in for the public
registry.  Recorded, then replayed with the registry gone.  The token realm answers an anonymous
token, the blob host a 404 (the proxy follows blob redirects itself)."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from pytest_upstream.capture.ca import CertificateAuthority
from pytest_upstream.config.capture import CaptureSettings
from pytest_upstream.config.settings import ProxyDefinition, Settings
from pytest_upstream.config.sources import IMAGE_DOMAINS
from pytest_upstream.pytest_plugin.harness import capture_env
from pytest_upstream.server.proxy_server import ProxyServer
from tests.capture_peers import HOST, role_host, tls_files
from tests.oci import build_image, registry, skopeo, write_layout
from tests.peers import require_peer
from tests.test_capture_proxy import _split, curl


def _skopeo(server: ProxyServer, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """skopeo with capture's environment only: no TLS flag, no registries.conf."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "XDG_RUNTIME_DIR": str(home)}
    env.update(capture_env(server))
    return subprocess.run(
        ["skopeo", "--insecure-policy", *args], capture_output=True, text=True, timeout=180, env=env
    )


def _pull(server: ProxyServer, image: str, out: Path, home: Path) -> subprocess.CompletedProcess[str]:
    """``skopeo copy docker://IMAGE oci:OUT``."""
    return _skopeo(server, home, "copy", f"docker://{image}", f"oci:{out}:v1")


@pytest.mark.slow
def test_skopeo_pulls_a_docker_hub_name_through_the_dockerhub_proxy(tmp_path: Path) -> None:
    require_peer("docker-registry", "skopeo", install="scripts/peers/docker.sh")
    authority = CertificateAuthority(tmp_path / "registry-ca")
    image = build_image("amd64", {"hello": b"captured from the hub\n"})
    layout = write_layout(tmp_path / "layout", image.blobs, {"v1": image.manifest})
    home = tmp_path / "home"
    home.mkdir()
    with registry(tmp_path / "reg", tls=tls_files(authority, HOST, tmp_path / "tls"), host=HOST) as reg:
        pushed = skopeo(
            "copy",
            "--dest-tls-verify=false",
            f"oci:{layout}:v1",
            f"docker://{HOST}:{reg.port}/library/demo:v1",
            home=home,
        )
        assert pushed.returncode == 0, pushed.stderr
        proxy = ProxyDefinition(key="hub", source="dockerhub", format="docker", url=f"{reg.url}/")
        settings = Settings(
            cache_dir=tmp_path / "cache",
            proxies=(proxy,),
            capture=CaptureSettings(enabled=True, upstream_ca=authority.cert_path),
        )
        name = f"{IMAGE_DOMAINS['dockerhub']}/demo:v1"  # an official image: library/demo on the registry
        with ProxyServer(settings) as server:
            done = _pull(server, name, tmp_path / "first", home)
            assert done.returncode == 0, done.stderr
            tags = _skopeo(server, home, "list-tags", f"docker://{name.rsplit(':', 1)[0]}")
            assert tags.returncode == 0, tags.stderr
            assert json.loads(tags.stdout)["Tags"] == ["v1"]
            records = {(r.key, r.path) for r in server.served.records}
            token = _split(curl(server, f"https://{role_host('dockerhub', 'token')}/token?scope=x").stdout)
            blob_host = role_host("dockerhub", "blobs")
            redirected = _split(curl(server, f"https://{blob_host}/registry-v2/blobs/sha256/00/data").stdout)
        assert {key for key, _ in records} == {"hub"}
        assert {("hub", "library/demo/manifests/v1"), ("hub", "library/demo/tags/list")} <= records
        assert {("hub", f"library/demo/blobs/{b.digest}") for b in (image.config, *image.layers)} <= records
        assert token[0] == b"HTTP/1.1 200 OK" and json.loads(token[1])["token"]
        assert redirected[0] == b"HTTP/1.1 404 Not served through capture (docker blob host)"
    # the registry is gone: the same pull from the record
    with ProxyServer(replace(settings, mode="replay")) as server:
        done = _pull(server, name, tmp_path / "again", home)
        assert done.returncode == 0, done.stderr
        assert {r.cache for r in server.served.records} == {"hit"}
        missing = _pull(server, f"{IMAGE_DOMAINS['dockerhub']}/other:v1", tmp_path / "none", home)
    assert missing.returncode != 0 and "504 Not recorded (replay mode)" in missing.stderr
    blobs = tmp_path / "again" / "blobs" / "sha256"
    assert all((blobs / b.digest.split(":")[1]).read_bytes() == b.data for b in image.blobs)
