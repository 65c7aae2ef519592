"""An ``s3://`` cache end to end: proxies on two "machines" (separate local tiers) sharing one
bucket on a real SeaweedFS started on loopback (engine/shared_tier.py, docs/object-storage.md)."""

from __future__ import annotations

import hashlib
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pytest_upstream.config.s3_location import S3Location
from pytest_upstream.config.settings import ProxyDefinition, Settings

from .conftest import MakeProxy, proxy_def
from .peers import free_port
from .s3_peers import S3Peer
from .test_backend_contract import isolate_aws, s3_peer  # noqa: F401 (a fixture)
from .test_npm import installed_tree, npm_install, publish_demo_packages, verdaccio  # noqa: F401
from .upstreams import Upstream

pytestmark = pytest.mark.slow

BIG = bytes(range(256)) * (4 * 1024 * 16)  # 16 MiB


def get(url: str) -> tuple[int, bytes, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


@pytest.fixture
def bucket(s3_peer: Callable[[str], S3Peer], monkeypatch: pytest.MonkeyPatch) -> S3Location:  # noqa: F811
    peer = s3_peer("seaweedfs")
    isolate_aws(monkeypatch)
    return S3Location(peer.bucket, f"t-{uuid.uuid4().hex[:12]}/cache", peer.endpoint, "us-east-1")


def test_sixteen_clients_on_two_machines_one_upstream_fetch_then_a_third_machine_replays(
    upstream: Upstream, make_proxy: MakeProxy, bucket: S3Location, tmp_path: Path
) -> None:
    upstream.files["/big.bin"] = BIG
    upstream.files["/small.txt"] = b"small"
    definition = proxy_def(key="g", format="generic", url=upstream.url)
    a = make_proxy(definition, cache=tmp_path / "machine-a", object_store=bucket)
    b = make_proxy(definition, cache=tmp_path / "machine-b", object_store=bucket)
    results: list[tuple[int, str]] = []

    def client(i: int) -> None:
        status, body, _ = get((a if i % 2 else b).url("g") + "big.bin")
        results.append((status, hashlib.sha256(body).hexdigest()))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == [(200, hashlib.sha256(BIG).hexdigest())] * 16
    assert upstream.hits["/big.bin"] == 1  # one machine fetched; the other waited for the bucket
    assert get(a.url("g") + "small.txt")[1] == b"small"
    # machine C: an empty local tier, replay mode, the upstream gone: served from the bucket
    upstream.files.clear()
    c = make_proxy(definition, cache=tmp_path / "machine-c", object_store=bucket, mode="replay")
    status, body, _ = get(c.url("g") + "big.bin")
    assert (status, body == BIG) == (200, True)
    assert get(c.url("g") + "small.txt")[:2] == (200, b"small")
    status, _, _ = get(c.url("g") + "never-fetched.txt")
    assert status == 504  # not recorded anywhere: a replay miss, as without a bucket
    metrics = get(a.base_url + "/-/metrics")[1].decode()
    assert "upstream_proxy_object_store_degraded 0" in metrics
    assert 'upstream_proxy_object_store_events_total{event="published"}' in metrics


def test_a_store_that_is_down_leaves_local_hits_and_upstream_misses_working(
    upstream: Upstream, make_proxy: MakeProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    isolate_aws(monkeypatch)
    dead = S3Location("cache", "p", f"http://127.0.0.1:{free_port()}", "us-east-1")  # refuses connections
    upstream.files["/a.txt"] = b"a"
    upstream.files["/b.txt"] = b"b"
    proxy = make_proxy(proxy_def(key="g", format="generic", url=upstream.url), object_store=dead)
    assert get(proxy.url("g") + "a.txt")[:2] == (200, b"a")  # the store failed: fetched upstream
    assert get(proxy.url("g") + "a.txt")[:2] == (200, b"a")  # a local hit
    assert get(proxy.url("g") + "b.txt")[:2] == (200, b"b")
    metrics = get(proxy.base_url + "/-/metrics")[1].decode()
    assert "upstream_proxy_object_store_degraded 1" in metrics
    assert upstream.hits["/a.txt"] == 1


def test_metadata_and_a_remembered_404_travel_between_machines(
    upstream: Upstream, make_proxy: MakeProxy, bucket: S3Location, tmp_path: Path
) -> None:
    upstream.files["/index.json"] = b'{"v": 1}'
    definition = proxy_def(key="m", format="maven", url=upstream.url)
    pages = proxy_def(key="g", format="generic", url=upstream.url, mutable_paths=["*.json"])
    a = make_proxy(definition, pages, cache=tmp_path / "a", object_store=bucket)
    b = make_proxy(definition, pages, cache=tmp_path / "b", object_store=bucket)
    assert get(a.url("g") + "index.json")[:2] == (200, b'{"v": 1}')
    assert get(b.url("g") + "index.json")[:2] == (200, b'{"v": 1}')  # from the bucket: fresh there
    assert upstream.hits["/index.json"] == 1
    missing = "org/example/lib/9.9/lib-9.9.pom"
    assert get(a.url("m") + missing)[0] == 404  # remembered (maven's negative cache) and shared
    assert get(b.url("m") + missing)[0] == 404
    assert upstream.hits["/" + missing] == 1


def test_pip_records_on_one_machine_and_another_replays_from_the_bucket(
    make_proxy: MakeProxy, bucket: S3Location, tmp_path: Path
) -> None:
    from .peers import pypiserver
    from .pip_setup import installed, pip_env, pip_install, publish

    files = publish(tmp_path / "upstream")
    with pypiserver(files) as index_url:
        definition = proxy_def(key="local", format="pypi", url=index_url)
        a = make_proxy(definition, cache=tmp_path / "machine-a", object_store=bucket)
        first = pip_install(tmp_path / "t1", "upstream-demo-a", env=pip_env(a.url("local") + "simple/"))
        assert first.returncode == 0, first.stderr
    # the index is gone; machine C has an empty local tier and replays from the bucket
    c = make_proxy(definition, cache=tmp_path / "machine-c", object_store=bucket, mode="replay")
    again = pip_install(tmp_path / "t2", "upstream-demo-a", env=pip_env(c.url("local") + "simple/"))
    assert again.returncode == 0, again.stderr
    assert installed(tmp_path / "t1") == installed(tmp_path / "t2")
    assert {r.cache for r in c.served.records} == {"hit"}


def test_npm_records_on_one_machine_and_another_replays_from_the_bucket(
    verdaccio: tuple[str, subprocess.Popen[bytes]],  # noqa: F811 (the fixture imported above)
    make_proxy: MakeProxy,
    bucket: S3Location,
    tmp_path: Path,
) -> None:
    registry_url, registry_proc = verdaccio
    publish_demo_packages(registry_url, tmp_path)
    definition = proxy_def(key="npm", format="npm", url=registry_url)
    a = make_proxy(definition, cache=tmp_path / "machine-a", object_store=bucket)
    npm_install(a.url("npm"), tmp_path / "first", tmp_path / "npm-cache-1")
    registry_proc.terminate()
    registry_proc.wait(timeout=10)
    c = make_proxy(definition, cache=tmp_path / "machine-c", object_store=bucket, mode="replay")
    npm_install(c.url("npm"), tmp_path / "second", tmp_path / "npm-cache-2")
    assert installed_tree(tmp_path / "second") == installed_tree(tmp_path / "first")
    assert {r.cache for r in c.served.records} == {"hit"}


def test_the_pytest_summary_says_when_the_bucket_failed(
    pytester: pytest.Pytester, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    isolate_aws(monkeypatch)
    upstream.files["/a.txt"] = b"a"
    (pytester.path / "pyproject.toml").write_text(
        "[tool.pytest-upstream]\n"
        'cache = "s3://cache/ci"\n'
        'local_cache = "local-tier"\n'
        f's3_endpoint_url = "http://127.0.0.1:{free_port()}"\n'  # refuses connections
        "[[tool.pytest-upstream.proxy]]\n"
        f'key = "g"\nformat = "generic"\nurl = "{upstream.url}"\n'
    )
    pytester.makepyfile(
        test_x="""
import urllib.request

def test_x(upstream_proxy):
    for _ in range(3):
        assert urllib.request.urlopen(upstream_proxy.url("g") + "a.txt", timeout=30).read() == b"a"
"""
    )
    result = pytester.runpytest_subprocess("--upstream-proxy", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*object store s3://cache/ci failed during the session: *served locally*"])
    assert upstream.hits["/a.txt"] == 1  # then hits from the local tier


def test_a_local_tier_capped_at_50_mib_serves_200_mib_from_the_bucket(
    bucket: S3Location, tmp_path: Path
) -> None:
    from pytest_upstream.engine.clock import ManualClock
    from pytest_upstream.server.proxy_server import ProxyServer

    from .test_size_cap import CAP, Generated, body, sha
    from .test_size_cap import get as raw_get

    clock = ManualClock()
    with Generated(5 * 1024 * 1024) as up:
        definition = proxy_def(key="g", format="generic", url=up.url)
        a = make_server(ProxyServer, definition, tmp_path / "a", bucket, clock)
        b = make_server(ProxyServer, definition, tmp_path / "b", bucket, clock, max_size=CAP)
        trimmer = b.engine.trimmer
        assert trimmer is not None
        trimmer.pause = 0.02
        try:
            for i in range(40):  # 200 MiB fetched by machine A, published to the bucket
                assert sha(raw_get(a.base_url, f"/g/a{i}.bin")[1]) == sha(body(i, up.size))
            for _ in range(2):  # machine B, capped at 50 MiB, twice through all of them
                for i in range(40):
                    clock.advance(10)
                    status, got = raw_get(b.base_url, f"/g/a{i}.bin")
                    assert (status, sha(got)) == (200, sha(body(i, up.size))), i
                    trimmer.settle()
            assert all(up.hits[f"/a{i}.bin"] == 1 for i in range(40))  # B never asked the upstream
            assert sum(f.stat().st_size for f in (tmp_path / "b" / "blobs").rglob("*") if f.is_file()) <= CAP
        finally:
            a.stop()
            b.stop()


def make_server(
    server_class: type,
    proxy: ProxyDefinition,
    local: Path,
    bucket: S3Location,
    clock: object,
    **settings: object,
) -> Any:
    return server_class(
        Settings(cache_dir=local, proxies=(proxy,), object_store=bucket, **settings),  # type: ignore[arg-type]
        clock=clock,
    ).start()


def test_xdist_workers_share_an_s3_cache(
    pytester: pytest.Pytester, upstream: Upstream, bucket: S3Location, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream.files["/big.bin"] = BIG
    (pytester.path / "pyproject.toml").write_text(
        "[tool.pytest-upstream]\n"
        f'cache = "s3://{bucket.bucket}/{bucket.prefix}"\n'
        'local_cache = "local-tier"\n'
        f's3_endpoint_url = "{bucket.endpoint_url}"\n'
        "[[tool.pytest-upstream.proxy]]\n"
        f'key = "g"\nformat = "generic"\nurl = "{upstream.url}"\n'
    )
    test = """
import hashlib, urllib.request

def test_{n}(upstream_proxy):
    body = urllib.request.urlopen(upstream_proxy.url("g") + "big.bin", timeout=120).read()
    assert hashlib.sha256(body).hexdigest() == "{sha}"
"""
    digest = hashlib.sha256(BIG).hexdigest()
    pytester.makepyfile(**{f"test_{n}": test.format(n=n, sha=digest) for n in ("a", "b", "c", "d")})
    result = pytester.runpytest_subprocess("--upstream-proxy", "-n", "2", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
    assert upstream.hits["/big.bin"] == 1  # two workers, one local tier and one bucket: one fetch


def test_the_bucket_stopped_mid_run_leaves_the_proxy_working_locally(
    upstream: Upstream, make_proxy: MakeProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import signal

    from .s3_peers import require_s3_peer, started

    require_s3_peer("seaweedfs")
    isolate_aws(monkeypatch)
    for name in ("before.txt", "after.txt"):
        upstream.files[f"/{name}"] = name.encode()
    with started("seaweedfs") as peer:
        bucket = S3Location(peer.bucket, "mid-run", peer.endpoint, "us-east-1")
        proxy = make_proxy(proxy_def(key="g", format="generic", url=upstream.url), object_store=bucket)
        assert get(proxy.url("g") + "before.txt")[:2] == (200, b"before.txt")
        published = 'upstream_proxy_object_store_events_total{event="published"} 1'
        deadline = time.monotonic() + 20  # the publish follows the client's last byte
        while published not in get(proxy.base_url + "/-/metrics")[1].decode():
            assert time.monotonic() < deadline, "never published"
            time.sleep(0.05)
        peer.proc.send_signal(signal.SIGKILL)  # the store goes away while the proxy serves
        peer.proc.wait(10)
        assert get(proxy.url("g") + "before.txt")[:2] == (200, b"before.txt")  # a local hit
        assert get(proxy.url("g") + "after.txt")[:2] == (200, b"after.txt")  # a miss: the upstream
        assert get(proxy.url("g") + "after.txt")[:2] == (200, b"after.txt")  # now a local hit
    assert upstream.hits["/before.txt"] == 1 and upstream.hits["/after.txt"] == 1
    metrics = get(proxy.base_url + "/-/metrics")[1].decode()
    assert "upstream_proxy_object_store_degraded 1" in metrics
