"""Concurrent misses fetch once: across threads, across processes, and past a dead lock holder."""

from __future__ import annotations

import hashlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pytest_upstream.store.cache import Cache

from .conftest import MakeProxy, proxy_def
from .peers import serve_url, spawn_serve
from .upstreams import Fault, Upstream

Result = tuple[int, str, bytes]  # status, X-Upstream-Cache, body


def get(url: str, timeout: float = 30.0) -> Result:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.headers.get("X-Upstream-Cache", ""), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("X-Upstream-Cache", ""), exc.read()


def get_all_at_once(urls: list[str], timeout: float = 30.0) -> list[Result | BaseException]:
    """GET every URL from its own thread, all released by one barrier."""
    barrier = threading.Barrier(len(urls))
    results: list[Result | BaseException] = [RuntimeError("no result")] * len(urls)

    def run(i: int) -> None:
        try:
            barrier.wait(timeout)
            results[i] = get(urls[i], timeout)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(urls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 10)
    assert not any(t.is_alive() for t in threads), "a client thread hung"
    return results


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_blobs_intact(cache_dir: Path) -> None:
    for p in (cache_dir / "blobs").rglob("*"):
        if p.is_file():
            assert hashlib.sha256(p.read_bytes()).hexdigest() == p.name


def test_concurrent_threads_fetch_once(upstream: Upstream, make_proxy: MakeProxy, tmp_path: Path) -> None:
    data = os.urandom(2 * 1024 * 1024)
    upstream.files["/dist/one.tar.gz"] = data
    upstream.faults["/dist/one.tar.gz"] = Fault(
        chunk_delay=0.01
    )  # 32 chunks: the fetch overlaps every client
    proxy = make_proxy(proxy_def(key="g", format="generic", url=upstream.url))

    results = get_all_at_once([f"{proxy.base_url}/g/dist/one.tar.gz"] * 16)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == []
    assert upstream.hits["/dist/one.tar.gz"] == 1
    assert [r[0] for r in results if not isinstance(r, BaseException)] == [200] * 16
    bodies = {r[2] for r in results if not isinstance(r, BaseException)}
    assert bodies == {data}
    states = sorted(r[1] for r in results if not isinstance(r, BaseException))
    assert states == ["hit"] * 15 + ["miss"]
    assert [(e.path, e.sha256) for e in Cache(tmp_path / "cache").iter_entries()] == [
        ("dist/one.tar.gz", sha(data))
    ]
    assert_blobs_intact(tmp_path / "cache")


@pytest.mark.slow
def test_concurrent_processes_on_one_cache_fetch_once(upstream: Upstream, tmp_path: Path) -> None:
    data = os.urandom(2 * 1024 * 1024)
    upstream.files["/dist/shared.whl"] = data
    upstream.faults["/dist/shared.whl"] = Fault(chunk_delay=0.03)  # ~1 s: every process asks meanwhile
    cache = tmp_path / "cache"
    config = tmp_path / "pyproject.toml"
    config.write_text(
        "[tool.pytest-upstream]\n[[tool.pytest-upstream.proxy]]\n"
        f'key = "g"\nsource = "custom"\nformat = "generic"\nurl = "{upstream.url}"\n'
    )
    procs = [spawn_serve(config, "--cache", str(cache), "--mode", "record") for _ in range(4)]
    try:
        bases = [serve_url(p) for p in procs]
        assert len(set(bases)) == 4
        results = get_all_at_once([f"{base}/g/dist/shared.whl" for base in bases])
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == []
    assert upstream.hits["/dist/shared.whl"] == 1
    ok = [r for r in results if not isinstance(r, BaseException)]
    assert [(status, body == data) for status, _, body in ok] == [(200, True)] * 4
    assert sorted(state for _, state, _ in ok) == ["hit", "hit", "hit", "miss"]
    assert [(e.path, e.sha256) for e in Cache(cache).iter_entries()] == [("dist/shared.whl", sha(data))]
    assert_blobs_intact(cache)


_HOLD_LOCK = """
import sys, time
from pathlib import Path
from pytest_upstream.store.cache import Cache

with Cache(Path(sys.argv[1])).locked("g", sys.argv[2], "", 5):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_lock_of_a_killed_process_is_released(
    upstream: Upstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    data = os.urandom(100_000)
    upstream.files["/held.bin"] = data
    cache = tmp_path / "cache"
    proxy = make_proxy(proxy_def(key="g", format="generic", url=upstream.url), cache=cache, lock_timeout=1)
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(cache), "held.bin"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], 20)
        assert ready and child.stdout.readline().strip() == "locked"
        # the child really holds it: the proxy gives up after its lock timeout
        status, _, body = get(f"{proxy.base_url}/g/held.bin")
        assert status == 504, body
        assert upstream.hits["/held.bin"] == 0
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait(10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
    status, state, body = get(f"{proxy.base_url}/g/held.bin")
    assert (status, state) == (200, "miss")
    assert body == data
    assert upstream.hits["/held.bin"] == 1


def test_lock_timeout_is_504_naming_the_path(
    upstream: Upstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    data = b"slow" * 1000
    upstream.files["/pkg/slow.bin"] = data
    cache = tmp_path / "cache"
    proxy = make_proxy(proxy_def(key="g", format="generic", url=upstream.url), cache=cache, lock_timeout=1)
    with Cache(cache).locked("g", "pkg/slow.bin", "", 5):
        started = time.monotonic()
        status, state, body = get(f"{proxy.base_url}/g/pkg/slow.bin")
        elapsed = time.monotonic() - started
    assert status == 504
    assert state == ""
    assert body.decode() == "timed out after 1s waiting for another process to fetch 'pkg/slow.bin' for 'g'\n"
    assert 0.9 <= elapsed < 5
    assert upstream.hits["/pkg/slow.bin"] == 0
    assert list(Cache(cache).iter_entries()) == []
    status, state, body = get(f"{proxy.base_url}/g/pkg/slow.bin")
    assert (status, state, body) == (200, "miss", data)


@pytest.mark.slow
def test_serve_workers_share_the_port_and_the_cache(upstream: Upstream, tmp_path: Path) -> None:
    """``serve --workers 3``: several processes answer on one port; each file is fetched once."""
    files = {f"/w/{n}.bin": os.urandom(50_000) for n in range(6)}
    upstream.files.update(files)
    config = tmp_path / "pyproject.toml"
    config.write_text(
        f'[tool.pytest-upstream]\n[[tool.pytest-upstream.proxy]]\nkey = "g"\nsource = "custom"\n'
        f'format = "generic"\nurl = "{upstream.url}"\n'
    )
    proc = spawn_serve(config, "--cache", str(tmp_path / "cache"), "--workers", "3")
    try:
        base = serve_url(proc)
        time.sleep(0.5)  # let the workers reach accept()
        workers = subprocess.run(
            ["pgrep", "-P", str(proc.pid)], capture_output=True, text=True
        ).stdout.split()
        assert len(workers) == 3  # three forked workers; the first process only watches them
        urls = [f"{base}/g{path}" for path in files for _ in range(4)]
        results = get_all_at_once(urls)
        for url, result in zip(urls, results, strict=True):
            assert not isinstance(result, BaseException), result
            assert result[0] == 200 and result[2] == files[url.removeprefix(f"{base}/g")]
        assert all(upstream.hits[path] == 1 for path in files), dict(upstream.hits)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True).returncode == 1  # none left
