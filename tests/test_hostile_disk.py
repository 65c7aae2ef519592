"""A cache that cannot store (disk full, read-only) and the leftovers of killed downloads.

- A miss the cache cannot store is served whole, passed through and marked
  ``X-Upstream-Cache: pass-through``, or refused with a 503 before any body; never a 200 cut
  short.  Hits keep working; ``/-/ready`` says the cache is degraded.
- A killed download's part file (``tmp/.part-<entry id>.*.tmp``) is removed when the cache is
  opened again and by ``cache prune``, while a download still running in another process keeps
  its part file (its entry lock is held).

A real full or read-only file system is a small tmpfs (skipped with the reason where the
machine refuses mounts); the same paths are also driven by injected errors (ENOSPC from
``posix_fallocate``, EROFS from creating the part file), which run everywhere.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from pytest_upstream.admin.prune import prune
from pytest_upstream.config.settings import Settings
from pytest_upstream.engine import flight_reader as flight_reader_module
from pytest_upstream.server.proxy_server import ProxyServer
from pytest_upstream.store import cache as cache_module
from pytest_upstream.store.cache import Cache, StoreFailed, entry_id
from pytest_upstream.store.errors import cannot_store
from pytest_upstream.store.files import AtomicFile
from pytest_upstream.store.layout import stripe_of

from .conftest import MakeProxy, proxy_def
from .upstreams import Fault, Upstream

MiB = 1024 * 1024


def request(base: str, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes, bool]:
    """(status, lower-cased headers, body, whether the body arrived whole)."""
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=20)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        try:
            return resp.status, headers, resp.read(), True
        except http.client.IncompleteRead as exc:
            return resp.status, headers, exc.partial, False
    finally:
        conn.close()


def parts_in(cache_dir: Path) -> list[Path]:
    return sorted((cache_dir / "tmp").glob(".part-*.tmp"))


def blobs_in(cache_dir: Path) -> list[Path]:
    return sorted(p for p in (cache_dir / "blobs").rglob("*") if p.is_file())


# -- a small file system of our own (tmpfs) -------------------------------------
def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=20, check=False)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs; skips where the machine refuses mounts (not root, a sandbox)."""
    where = tmp_path / "small"
    where.mkdir()
    done = _run("mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(where)) if os.geteuid() == 0 else None
    if done is None or done.returncode != 0:
        why = "not root" if done is None else done.stderr.strip()
        pytest.skip(f"cannot mount a tmpfs here ({why}); the injected-error tests cover these paths")
    try:
        yield where
    finally:
        _run("umount", "-l", str(where))


def remount_read_only(where: Path) -> None:
    done = _run("mount", "-o", "remount,ro", str(where))
    if done.returncode != 0:
        pytest.skip(f"cannot remount the tmpfs read-only ({done.stderr.strip()})")


# -- disk full ---------------------------------------------------------------
def test_a_miss_larger_than_the_free_space_is_passed_through_whole(
    small_fs: Path, upstream: Upstream, make_proxy: MakeProxy
) -> None:
    big = os.urandom(12 * MiB)  # more than the whole tmpfs
    upstream.files["/big.bin"] = big
    upstream.files["/small.bin"] = b"s" * 1000
    cache_dir = small_fs / "cache"
    proxy = make_proxy(proxy_def(key="g", format="generic", url=upstream.url), cache=cache_dir)
    assert request(proxy.base_url, "/g/small.bin")[0] == 200  # stored: the cache works

    status, headers, body, whole = request(proxy.base_url, "/g/big.bin")
    assert (status, whole, headers["x-upstream-cache"]) == (200, True, "pass-through")
    assert body == big
    assert parts_in(cache_dir) == [] and len(blobs_in(cache_dir)) == 1  # nothing of it stored
    status, headers, body, _ = request(proxy.base_url, "/g/small.bin")
    assert (status, headers["x-upstream-cache"], body) == (200, "hit", b"s" * 1000)
    status, _, text, _ = request(proxy.base_url, "/-/ready")
    assert status == 200 and text.startswith(b"ready, degraded: ")
    records = [r for r in proxy.engine.served.records if r.path == "big.bin"]
    assert [r.cache for r in records] == ["pass-through"]
    assert proxy.engine.metrics.requests("g", "pass_through") == 1


def test_enospc_before_the_body_passes_the_miss_through(
    upstream: Upstream, make_proxy: MakeProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(3 * MiB)
    upstream.files["/a.bin"] = data
    proxy = make_proxy(proxy_def(key="g", format="generic", url=upstream.url))

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_module.os, "posix_fallocate", full)
    status, headers, body, whole = request(proxy.base_url, "/g/a.bin")
    assert (status, whole, headers["x-upstream-cache"], body == data) == (200, True, "pass-through", True)
    assert parts_in(tmp_path / "cache") == [] and blobs_in(tmp_path / "cache") == []
    status, _, text, _ = request(proxy.base_url, "/-/ready")
    assert status == 200 and b"degraded" in text and b"No space left" in text
    monkeypatch.undo()  # room again: the next miss is stored, then a hit
    assert request(proxy.base_url, "/g/a.bin")[1]["x-upstream-cache"] == "miss"
    assert request(proxy.base_url, "/g/a.bin")[1]["x-upstream-cache"] == "hit"


def test_joiners_of_a_passed_through_download_get_a_503_before_any_body(
    upstream: Upstream, make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream.files["/a.bin"] = b"a" * (2 * MiB)
    upstream.faults["/a.bin"] = Fault(delay=0.5)  # every client joins before the answer comes
    proxy = make_proxy(proxy_def(key="g", format="generic", url=upstream.url))

    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(cache_module, "AtomicFile", read_only)
    results: list[tuple[int, dict[str, str], bytes, bool]] = []
    threads = [
        threading.Thread(target=lambda: results.append(request(proxy.base_url, "/g/a.bin"))) for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert sorted(r[0] for r in results) == [200, 503, 503]
    for status, headers, body, whole in results:
        assert whole  # a 200 is whole, a 503 is a whole error page
        if status == 200:
            assert (headers["x-upstream-cache"], len(body)) == ("pass-through", 2 * MiB)
        else:
            assert b"cannot store" in body
    assert upstream.hits["/a.bin"] == 1


def test_a_whole_answer_that_cannot_be_stored_is_a_503_or_the_stale_copy(
    upstream: Upstream, make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream.files["/a.bin"] = b"a" * 100
    proxy = make_proxy(proxy_def(key="g", format="generic", url=upstream.url))

    def read_only(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(cache_module, "AtomicFile", read_only)
    status, headers, _, whole = request(proxy.base_url, "/g/a.bin", method="HEAD")  # HEAD: a whole answer
    assert (status, whole) == (503, True)
    assert "x-upstream-cache" not in headers or headers["x-upstream-cache"] != "miss"
    upstream.files.pop("/a.bin")  # a remembered 404 cannot be stored either: still a 404
    assert request(proxy.base_url, "/g/a.bin")[0] == 404


def test_expired_metadata_that_cannot_be_stored_is_served_stale(
    upstream: Upstream, make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream.files["/meta.json"] = b'{"v": 1}'
    definition = proxy_def(
        key="g", format="generic", url=upstream.url, mutable_paths=["*.json"], metadata_ttl=0
    )
    proxy = make_proxy(definition)
    assert request(proxy.base_url, "/g/meta.json")[1]["x-upstream-cache"] == "miss"
    upstream.files["/meta.json"] = b'{"v": 2}'

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_module, "AtomicFile", full)
    status, headers, body, _ = request(proxy.base_url, "/g/meta.json")
    assert (status, headers["x-upstream-cache"], body) == (200, "stale", b'{"v": 1}')
    assert "No space left" in headers["x-upstream-error"]


# -- a read-only cache -------------------------------------------------------
def test_a_read_only_cache_serves_hits_and_passes_misses_through(
    small_fs: Path, upstream: Upstream, tmp_path: Path
) -> None:
    upstream.files["/cached.bin"] = b"c" * 5000
    upstream.files["/new.bin"] = b"n" * 300_000
    upstream.files["/meta.json"] = b'{"v": 1}'
    cache_dir = small_fs / "cache"
    definition = proxy_def(
        key="g", format="generic", url=upstream.url, mutable_paths=["*.json"], metadata_ttl=0
    )
    settings = Settings(cache_dir=cache_dir, mode="record", proxies=(definition,))
    first = ProxyServer(settings).start()
    try:
        assert request(first.base_url, "/g/cached.bin")[0] == 200
        assert request(first.base_url, "/g/meta.json")[0] == 200
    finally:
        first.stop()
    remount_read_only(small_fs)
    proxy = ProxyServer(settings).start()  # starting on a read-only cache works
    try:
        status, headers, body, _ = request(proxy.base_url, "/g/cached.bin")
        assert (status, headers["x-upstream-cache"], body) == (200, "hit", b"c" * 5000)
        status, headers, body, whole = request(proxy.base_url, "/g/new.bin")
        assert (status, whole, headers["x-upstream-cache"]) == (200, True, "pass-through")
        assert body == b"n" * 300_000
        assert request(proxy.base_url, "/g/new.bin", method="HEAD")[0] == 503
        upstream.files["/meta.json"] = b'{"v": 2}'  # expired metadata: the stale copy, saying why
        status, headers, body, _ = request(proxy.base_url, "/g/meta.json")
        assert (status, headers["x-upstream-cache"], body) == (200, "stale", b'{"v": 1}')
        assert "cannot store" in headers["x-upstream-error"]
        status, _, text, _ = request(proxy.base_url, "/-/ready")
        assert status == 200 and b"degraded" in text and b"not writable" in text
    finally:
        proxy.stop()


# -- the store's side ----------------------------------------------------------
def test_cannot_store_means_full_or_read_only_only() -> None:
    assert cannot_store(OSError(errno.ENOSPC, "full"))
    assert cannot_store(OSError(errno.EROFS, "ro"))
    assert not cannot_store(OSError(errno.ENOENT, "gone"))
    assert not cannot_store(ValueError("x"))


def test_a_reservation_past_the_bytes_written_is_cut_before_commit(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c")
    writer = cache.writer(eid="ab" * 32, reserve=10_000)
    assert writer.path.name.startswith(".part-" + "ab" * 32 + ".")
    writer.write(b"x" * 10)
    sha, size = cache.commit_blob(writer, {}, "test")
    assert size == 10 and cache.blob_path(sha).stat().st_size == 10


def test_a_reservation_the_disk_cannot_hold_leaves_nothing(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c")
    with pytest.raises(StoreFailed, match="cannot store"):
        cache.writer(eid="ab" * 32, reserve=1 << 60)
    assert parts_in(tmp_path / "c") == []


# -- orphaned part files ---------------------------------------------------------
class Serve:
    """``upstream-proxy serve`` in a child process, read until its banner."""

    def __init__(self, config: Path, cache: Path) -> None:
        env = {**os.environ, "UPSTREAM_PROXY_CACHE": str(cache)}
        env.pop("UPSTREAM_PROXY_MODE", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pytest_upstream", "--config", str(config), "serve", "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        assert self.proc.stdout is not None
        self.base_url = self.proc.stdout.readline().decode().strip()
        assert self.base_url.startswith("http://"), self.base_url

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=20)


def start_download(base: str, path: str) -> threading.Thread:
    """A client that asks for ``path`` and reads whatever comes, in the background."""

    def run() -> None:
        with contextlib.suppress(OSError):  # its proxy was killed
            request(base, path)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def wait_for(predicate: object, timeout: float = 10.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_killed_downloads_part_file_goes_at_restart_and_prune_a_live_one_stays(
    upstream: Upstream, tmp_path: Path
) -> None:
    # Two paths on different lock stripes (a stripe held by the live download would keep both).
    paths = [f"/slow{i}.bin" for i in range(8)]
    stripes = {p: stripe_of(entry_id("g", p.lstrip("/"), "")) for p in paths}
    killed = paths[0]
    live = next(p for p in paths[1:] if stripes[p] != stripes[killed])
    for path in (killed, live):
        upstream.files[path] = b"z" * (4 * MiB)
        upstream.faults[path] = Fault(chunk_delay=0.1)  # 64 KiB every 0.1 s: 6 s in all
    config = tmp_path / "pyproject.toml"
    config.write_text(
        '[[tool.pytest-upstream.proxy]]\nkey = "g"\nsource = "custom"\nformat = "generic"\n'
        f'url = "{upstream.url}"\n'
    )
    cache_dir = tmp_path / "cache"
    doomed, alive = Serve(config, cache_dir), Serve(config, cache_dir)
    try:
        start_download(doomed.base_url, "/g" + killed)
        wait_for(lambda: len(parts_in(cache_dir)) == 1)
        orphan = parts_in(cache_dir)[0]
        os.kill(doomed.proc.pid, signal.SIGKILL)  # kill -9 mid-download
        doomed.proc.wait(timeout=10)
        start_download(alive.base_url, "/g" + live)
        wait_for(lambda: len(parts_in(cache_dir)) == 2)
        running = next(p for p in parts_in(cache_dir) if p != orphan)
        assert orphan.name.startswith(".part-" + entry_id("g", killed.lstrip("/"), ""))

        reopened = Cache(cache_dir)  # what a restart does first
        assert not orphan.exists() and running.exists()
        assert reopened.orphans_at_open[0] == 1 and reopened.orphans_at_open[1] > 0

        assert prune(reopened, grace=0).parts_removed == 1  # the one removed at open; the live one stays
        assert running.exists()
        os.kill(alive.proc.pid, signal.SIGKILL)  # now an orphan too
        alive.proc.wait(timeout=10)
        report = prune(reopened, grace=0)
        assert (report.parts_removed, running.exists()) == (1, False)
    finally:
        doomed.stop()
        alive.stop()


def test_prune_removes_orphaned_part_files_and_reports_them(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c")
    orphan = cache.writer(eid="cd" * 32)
    orphan.write(b"o" * 1000)
    orphan.flush()
    # The writer's process is alive, but no one holds the entry's lock: an orphan all the same.
    report = prune(cache, grace=0)
    assert (report.parts_removed, report.part_bytes_freed) == (1, 1000)
    assert not orphan.path.exists()
    assert report.as_json()["parts_removed"] == 1
    with cache.locked_id("ef" * 32, 5):  # a download under its lock keeps its part file
        busy = cache.writer(eid="ef" * 32)
        busy.write(b"b")
        busy.flush()
        assert prune(cache, grace=0).parts_removed == 0
        assert busy.path.exists()
    busy.discard()


def test_a_download_of_undeclared_length_is_passed_through_while_the_cache_is_degraded(
    upstream: Upstream, make_proxy: MakeProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = b"u" * 500_000  # content-coded: no length to reserve, so a full disk would cut it
    upstream.files["/u.bin"] = gzip.compress(data)
    upstream.faults["/u.bin"] = Fault(headers={"Content-Encoding": "gzip"})
    proxy = make_proxy(proxy_def(key="g", format="generic", url=upstream.url))
    proxy.engine.cache.store_failed("the cache cannot store 10 bytes: No space left on device")
    status, headers, body, whole = request(proxy.base_url, "/g/u.bin")
    assert (status, whole, headers["x-upstream-cache"], body == data) == (200, True, "pass-through", True)
    assert blobs_in(tmp_path / "cache") == []
    monkeypatch.setattr(cache_module, "FAILURE_MEMORY", 0.0)  # the failure is forgotten: stored again
    assert request(proxy.base_url, "/g/u.bin")[1]["x-upstream-cache"] == "miss"


# -- disk full in the middle of a body of undeclared length ------------------------
def _fill_after(monkeypatch: pytest.MonkeyPatch, limit: int, fails: str = "write") -> list[int]:
    """Part files take ``limit`` bytes, then every ``write`` (or the ``flush`` after it) fails with
    ENOSPC (a disk that fills mid-body); returns the sizes of the writes that failed."""
    failed: list[int] = []
    real_write, real_flush = AtomicFile.write, AtomicFile.flush
    taken: dict[int, int] = {}

    def write(self: AtomicFile, data: bytes | bytearray | memoryview) -> int:
        if self.path.name.startswith(".part-"):
            size = taken.get(id(self), 0) + len(data)
            if size > limit:
                failed.append(len(data))
                if fails == "write":
                    raise OSError(errno.ENOSPC, "No space left on device")
            taken[id(self)] = size
        return real_write(self, data)

    def flush(self: AtomicFile) -> None:
        if failed:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_flush(self)

    monkeypatch.setattr(AtomicFile, "write", write)
    if fails == "flush":
        monkeypatch.setattr(AtomicFile, "flush", flush)
    return failed


@pytest.mark.parametrize("fails", ["write", "flush"])
def test_a_disk_that_fills_mid_body_of_undeclared_length_still_serves_the_joined_clients_whole(
    upstream: Upstream,
    make_proxy: MakeProxy,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    fails: str,
) -> None:
    data = os.urandom(12 * MiB)  # gzip keeps it ~12 MiB: past the 8 MiB judged before the headers
    upstream.files["/u.bin"] = gzip.compress(data, compresslevel=1)
    # Every client joins before the answer; the body then comes slowly enough to be relayed.
    upstream.faults["/u.bin"] = Fault(delay=0.4, chunk_delay=0.002, headers={"Content-Encoding": "gzip"})
    proxy = make_proxy(proxy_def(key="g", format="generic", url=upstream.url))
    failed = _fill_after(monkeypatch, 10 * MiB, fails)  # after the headers (8 MiB decoded first)
    results: list[tuple[int, dict[str, str], bytes, bool]] = []
    threads = [
        threading.Thread(target=lambda: results.append(request(proxy.base_url, "/g/u.bin"))) for _ in range(3)
    ]
    with caplog.at_level("WARNING"):
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert failed, "the disk never filled: the test proves nothing"
    assert len(results) == 3
    for status, headers, body, whole in results:
        assert (status, whole, len(body), body == data) == (200, True, len(data), True)
        assert headers["x-upstream-cache"] in ("miss", "hit")  # sent before the disk filled
    assert upstream.hits["/u.bin"] == 1
    cache_dir = tmp_path / "cache"
    assert proxy.engine.flights.wait_idle(5)
    assert parts_in(cache_dir) == [] and blobs_in(cache_dir) == []  # not stored, part file gone
    assert proxy.engine.cache.lookup("g", "u.bin") is None
    warning = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("No space left" in m and "from memory, uncached" in m for m in warning), warning
    records = [r for r in proxy.engine.served.records if r.path == "u.bin"]
    assert [r.cache for r in records] == ["pass-through"] * 3
    assert {r.sha256 for r in records} == {hashlib.sha256(data).hexdigest()}
    monkeypatch.undo()  # room again, and the failure forgotten: the next request is a fresh miss
    monkeypatch.setattr(cache_module, "FAILURE_MEMORY", 0.0)
    status, headers, body, whole = request(proxy.base_url, "/g/u.bin")
    assert (status, headers["x-upstream-cache"], body == data, whole) == (200, "miss", True, True)
    assert upstream.hits["/u.bin"] == 2
    assert request(proxy.base_url, "/g/u.bin")[1]["x-upstream-cache"] == "hit"


def test_a_relay_from_memory_is_bounded_a_stalled_client_is_cut_the_others_finish(
    upstream: Upstream, make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(14 * MiB)
    upstream.files["/u.bin"] = gzip.compress(data, compresslevel=1)
    upstream.faults["/u.bin"] = Fault(delay=0.4, chunk_delay=0.001, headers={"Content-Encoding": "gzip"})
    proxy = make_proxy(proxy_def(key="g", format="generic", url=upstream.url))
    monkeypatch.setattr(flight_reader_module, "RELAY_LIMIT", 1 * MiB)
    monkeypatch.setattr(flight_reader_module, "RELAY_STALL", 0.5)
    _fill_after(monkeypatch, 9 * MiB)
    parts = urlsplit(proxy.base_url)
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # its window fills at once
    stalled.settimeout(20)
    stalled.connect((parts.hostname or "", parts.port or 0))
    stalled.sendall(f"GET /g/u.bin HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode())
    time.sleep(0.1)  # it asks first and reads nothing
    results: list[tuple[int, dict[str, str], bytes, bool]] = []
    threads = [
        threading.Thread(target=lambda: results.append(request(proxy.base_url, "/g/u.bin"))) for _ in range(2)
    ]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    took = time.monotonic() - started
    assert [(s, whole, body == data) for s, _, body, whole in results] == [(200, True, True)] * 2
    # One wait of RELAY_STALL for the stalled client, not one per chunk after it lost its place
    # (~20 chunks of 256 KiB: 10 s).
    assert took < 4.0, took
    got = b""
    with contextlib.suppress(OSError):
        while more := stalled.recv(1 << 20):
            got += more
    stalled.close()
    assert len(got) < len(data)  # its head and part of the body, then the connection was cut
    records = [r for r in proxy.engine.served.records if r.path == "u.bin"]
    assert sorted(r.cache for r in records) == ["error", "pass-through", "pass-through"]
    assert "fell more than" in next(r.error for r in records if r.cache == "error")
