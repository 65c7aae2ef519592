"""The size cap (``max_size``): the cache directory stays near a cap while the proxy serves.

A background trimmer (engine/trimmer.py) removes the least recently used entries, and the blobs
only they name, with the store's one eviction (store/trim.py, which ``cache prune`` runs too):
never an entry being fetched, never a blob a lock file pins, never from under a client being
sent a blob, and one process at a time on a shared directory.  Entry and blob ages are judged
with the engine's clock, so a test moves a ManualClock instead of waiting.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from pytest_upstream.admin.verify import verify
from pytest_upstream.cli.main import build_parser, main
from pytest_upstream.cli.size_cap_flags import with_size_cap_flags
from pytest_upstream.config.settings import ConfigError, Settings, parse_table, with_max_size
from pytest_upstream.engine.clock import ManualClock
from pytest_upstream.engine.metrics import Metrics
from pytest_upstream.engine.trimmer import LOW_WATER, Trimmer, lock_pins, session_spare
from pytest_upstream.repro.lockfile import LockError, LockFile, LockFileEntry
from pytest_upstream.server.proxy_server import ProxyServer
from pytest_upstream.store.cache import Cache, entry_id
from pytest_upstream.store.entry import Entry
from pytest_upstream.store.inventory import scan_blobs
from pytest_upstream.store.trim import trim

from .conftest import proxy_def
from .upstreams import Answer, Upstream

MiB = 1024 * 1024
CAP = 50 * MiB


class Generated(Upstream):
    """``/a<i>.bin``: ``size`` bytes made from ``i`` on demand (no 200 MB held in memory)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def answer(self, path: str, headers: dict[str, str]) -> Answer:
        if not (path.startswith("/a") and path.endswith(".bin") and path[2:-4].isdigit()):
            return super().answer(path, headers)
        return Answer(200, body(int(path[2:-4]), self.size), {"Content-Type": "application/octet-stream"})


def body(i: int, size: int) -> bytes:
    return (i.to_bytes(4, "big") * (size // 4 + 1))[:size]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def get(base: str, path: str) -> tuple[int, bytes]:
    """GET over a raw socket (HTTP/1.0, read to the end): status and body."""
    parts = urlsplit(base)
    with socket.create_connection((parts.hostname or "", parts.port or 80), timeout=30) as sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {parts.netloc}\r\n\r\n".encode())
        data = b"".join(iter(lambda: sock.recv(1 << 20), b""))
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), rest


def stored(cache: Cache, i: int, size: int, url: str = "http://u") -> str:
    """Artifact ``a<i>.bin`` of ``size`` bytes, in the cache as a fetch leaves it; its sha256."""
    data = body(i, size)
    blob = cache.store_bytes(data)
    cache.store_entry(Entry("g", f"a{i}.bin", "", f"{url}/a{i}.bin", blob, size, "artifact", time.time()))
    return blob


def sample(exposition: str, name: str) -> int:
    """The value of an unlabelled series in a ``/-/metrics`` exposition."""
    found = re.search(rf"^upstream_proxy_{name} (\d+)$", exposition, re.MULTILINE)
    assert found is not None, exposition
    return int(found.group(1))


def blob_bytes(cache_dir: Path) -> int:
    return sum(b.size for b in scan_blobs(Cache(cache_dir))[0].values())


@pytest.fixture
def generated() -> Iterator[Generated]:
    with Generated(5 * MiB) as up:
        yield up


def capped(upstream: Upstream, cache_dir: Path, clock: ManualClock, **settings: object) -> ProxyServer:
    server = ProxyServer(
        Settings(
            cache_dir=cache_dir,
            proxies=(proxy_def(key="g", format="generic", url=upstream.url),),
            **settings,  # type: ignore[arg-type]
        ),
        clock=clock,
    )
    trimmer = server.engine.trimmer
    assert trimmer is not None
    trimmer.pause = 0.02  # real seconds between dropping entries and their blobs (default: 5)
    return server.start()


def lock_naming(path: Path, items: dict[str, bytes]) -> Path:
    lock = LockFile(LockFileEntry("g", p, "", sha(data), len(data), "artifact") for p, data in items.items())
    lock.save(path)
    return path


# -- the cap while serving -------------------------------------------------------------------
def test_a_cache_capped_at_50_mib_serves_200_mib_whole_and_stays_near_the_cap(
    generated: Generated, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """40 artifacts of 5 MiB through a 50 MiB cap: each served whole and right, the blobs never
    above the cap once the trimmer has looked, the pinned ones kept, evictions counted."""
    caplog.set_level(logging.INFO, logger="pytest_upstream")
    clock = ManualClock()
    pinned = {f"a{i}.bin": body(i, generated.size) for i in range(3)}
    keep = lock_naming(tmp_path / "keep.lock", pinned)
    cache_dir = tmp_path / "cache"
    server = capped(generated, cache_dir, clock, max_size=CAP, keep_locks=(keep,))
    trimmer = server.engine.trimmer
    assert trimmer is not None
    try:
        sizes = []
        for i in range(40):
            clock.advance(10)  # what was stored before is older than the grace period now
            status, got = get(server.base_url, f"/g/a{i}.bin")
            assert (status, sha(got)) == (200, sha(body(i, generated.size))), i
            trimmer.settle()  # the answer told the trimmer; its look (if any) is done
            sizes.append(blob_bytes(cache_dir))
        assert max(sizes) <= CAP, [s // MiB for s in sizes]
        assert sizes[-1] >= LOW_WATER * CAP - 5 * MiB  # trimmed to the low-water mark, not emptied
        cache = Cache(cache_dir)
        for path, data in pinned.items():  # pinned by the lock file: entry and blob kept
            assert cache.lookup("g", path) is not None and cache.blob_path(sha(data)).is_file()
        assert cache.lookup("g", "a3.bin") is None  # the least recently used unpinned one went
        assert cache.lookup("g", "a39.bin") is not None
        # Evicted artifacts are fetched again, whole.
        clock.advance(10)
        assert get(server.base_url, "/g/a3.bin")[1] == body(3, generated.size)
        assert generated.hits["/a3.bin"] == 2 and generated.hits["/a0.bin"] == 1
        metrics = server.engine.metrics.exposition()
        evictions, freed = sample(metrics, "evictions_total"), sample(metrics, "evicted_bytes_total")
        assert evictions >= 30 and freed >= evictions * 5 * MiB
        assert f"upstream_proxy_cache_bytes {sizes[-1]}" in metrics
    finally:
        server.stop()
    assert verify(Cache(cache_dir)).ok
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("size cap: removed")]
    assert lines and "freed) in " in lines[0] and "of 50.0 MiB" in lines[0]


def test_the_least_recently_used_entries_go_first_and_a_hit_counts_as_a_use(
    tmp_path: Path,
) -> None:
    """Uses are the entry files' mtimes (a hit bumps one at most once a minute): what was hit
    recently stays, what was fetched long ago and never used again goes."""
    with Generated(4 * MiB) as up:
        clock = ManualClock()
        server = capped(up, tmp_path / "c", clock, max_size=20 * MiB)
        trimmer = server.engine.trimmer
        assert trimmer is not None
        try:
            for i in range(5):  # 20 MiB: at the cap, not over it
                assert get(server.base_url, f"/g/a{i}.bin")[0] == 200
            trimmer.settle()
            entries = Path(server.engine.cache.layout.entry("g", entry_id("g", "a0.bin", "")))
            old = time.time() - 3600
            for i in range(5):  # fetched an hour ago, in this order
                when = old + i
                os.utime(server.engine.cache.layout.entry("g", entry_id("g", f"a{i}.bin", "")), (when, when))
            assert get(server.base_url, "/g/a0.bin")[0] == 200  # a hit: a0 is the most recent now
            assert entries.stat().st_mtime > old + 3000
            clock.advance(3600)
            assert get(server.base_url, "/g/a5.bin")[0] == 200  # 24 MiB: over; trimmed to 18 MiB
            trimmer.settle()
            cache = server.engine.cache
            kept = [i for i in range(6) if cache.lookup("g", f"a{i}.bin") is not None]
            assert kept == [0, 3, 4, 5]
        finally:
            server.stop()


def test_an_entry_being_fetched_and_its_part_file_are_never_trimmed(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c")
    for i in range(3):
        stored(cache, i, 1000)
    with cache.locked("g", "a1.bin", "", timeout=5):  # a fetch in flight: its lock held, a part file open
        part = cache.writer(eid=entry_id("g", "a1.bin", ""))
        part.write(b"partial")
        part.flush()
        report = trim(cache, max_size=0, grace=0, now=time.time() + 60, sleep=lambda _: None)
        assert [e.path for e in report.busy] == ["a1.bin"]
        assert sorted(e.path for e in report.removed) == ["a0.bin", "a2.bin"]
        assert cache.lookup("g", "a1.bin") is not None and part.path.exists()
        assert cache.blob_path(sha(body(1, 1000))).is_file()
        assert not cache.blob_path(sha(body(0, 1000))).exists()
        part.discard()


def test_a_blob_removed_while_it_is_being_sent_keeps_streaming(tmp_path: Path) -> None:
    """sendfile reads an open descriptor: unlinking the blob mid-send loses no byte."""
    size = 48 * MiB
    with Generated(size) as up:
        clock = ManualClock()
        server = capped(up, tmp_path / "c", clock, max_size=1024 * MiB)
        try:
            want = body(7, size)
            assert get(server.base_url, "/g/a7.bin")[1] == want  # stored
            blob = server.engine.cache.blob_path(sha(want))
            parts = urlsplit(server.base_url)
            with socket.create_connection((parts.hostname or "", parts.port or 80), timeout=30) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
                sock.sendall(f"GET /g/a7.bin HTTP/1.0\r\nHost: {parts.netloc}\r\n\r\n".encode())
                first = sock.recv(64 * 1024)  # the hit is being sent: its blob is open
                assert first.startswith(b"HTTP/1.1 200")
                report = trim(server.engine.cache, max_size=0, grace=0, now=clock.now() + 60, pause=0)
                assert [e.path for e in report.removed] == ["a7.bin"] and not blob.exists()
                rest = b"".join(iter(lambda: sock.recv(1 << 20), b""))
            got = (first + rest).partition(b"\r\n\r\n")[2]
            assert len(got) == size and sha(got) == sha(want)
        finally:
            server.stop()


# -- one trimmer at a time, across processes -------------------------------------------------
def test_processes_sharing_a_directory_trim_one_at_a_time(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c")
    one = Trimmer(cache, 10, Metrics(), time.time, frozenset)
    two = Trimmer(Cache(tmp_path / "c"), 10, Metrics(), time.time, frozenset)
    try:
        one.run_now()
        two.run_now()
        one._file_lock.acquire()  # one is trimming now (its lock file is a flock: per open file)
        try:
            assert two.look() is None
        finally:
            one._file_lock.release()
        assert two.look() is not None
    finally:
        one.close()
        two.close()


class Serve:
    """``upstream-proxy serve --max-size SIZE`` in a child process."""

    def __init__(self, config: Path, cache: Path, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("UPSTREAM_PROXY_")}
        cmd = [sys.executable, "-m", "pytest_upstream", "--config", str(config), "serve", "--port", "0"]
        self.proc = subprocess.Popen(
            [*cmd, "--cache", str(cache), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        assert self.proc.stdout is not None
        self.base_url = self.proc.stdout.readline().decode().strip()
        assert self.base_url.startswith("http://"), self.base_url

    def stop(self) -> str:
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=30)
        return err.decode()


def test_two_serve_processes_sharing_a_capped_directory_never_corrupt_it(tmp_path: Path) -> None:
    """Two ``serve --max-size`` processes (one with forked workers) on one directory full of old
    entries, clients on both at once: every download whole, the old entries evicted, no trim
    failing, ``cache verify`` clean."""
    size = MiB
    with Generated(size) as up:
        cache_dir = tmp_path / "cache"
        cache = Cache(cache_dir)
        old = time.time() - 3600
        for i in range(100, 130):  # 30 MiB fetched an hour ago
            blob = stored(cache, i, size, up.url)
            os.utime(cache.layout.entry("g", entry_id("g", f"a{i}.bin", "")), (old, old))
            os.utime(cache.blob_path(blob), (old, old))
        config = tmp_path / "pyproject.toml"
        config.write_text(
            '[[tool.pytest-upstream.proxy]]\nkey = "g"\nsource = "custom"\nformat = "generic"\n'
            f'url = "{up.url}"\n'
        )
        # one of them forks two workers: each starts its own trimmer thread
        servers = [
            Serve(config, cache_dir, "--max-size", "12M", *workers) for workers in ((), ("--workers", "2"))
        ]
        failures: list[str] = []

        def client(base: str, first: int) -> None:
            for i in range(first, first + 12):
                for path in (f"/g/a{i}.bin", f"/g/a{100 + i}.bin"):  # new ones, and old ones again
                    status, got = get(base, path)
                    n = int(path[4:-4])
                    if status != 200 or got != body(n, size):
                        failures.append(f"{path}: {status}, {len(got)} bytes")

        threads = [threading.Thread(target=client, args=(s.base_url, 12 * k)) for k, s in enumerate(servers)]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
            evictions: list[int] = []
            deadline = time.monotonic() + 60
            while sum(evictions) < 10 and time.monotonic() < deadline:  # a pass ends after its pause
                time.sleep(0.2)
                evictions = [
                    sample(get(s.base_url, "/-/metrics")[1].decode(), "evictions_total") for s in servers
                ]
        finally:
            logs = [s.stop() for s in servers]
        assert not failures, failures
        assert sum(evictions) >= 10, (evictions, logs)  # old entries nobody asked for again
        assert any("size cap: removed" in log for log in logs)
        assert not any("could not trim" in log or "Traceback" in log for log in logs), logs
        checked = subprocess.run(
            [sys.executable, "-m", "pytest_upstream", "cache", "verify", "--cache", str(cache_dir)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert (
            Cache(cache_dir).lookup("g", "a100.bin") is None
            or Cache(cache_dir).lookup("g", "a129.bin") is None
        )


# -- the pins --------------------------------------------------------------------------------
def test_the_session_lock_pins_what_it_names_and_what_it_will_name(tmp_path: Path) -> None:
    keep = lock_naming(tmp_path / "keep.lock", {"k.bin": b"k"})
    loaded = LockFile([LockFileEntry("g", "l.bin", "", sha(b"l"), 1, "artifact")])
    recorded = LockFile([LockFileEntry("g", "r.bin", "", sha(b"r"), 1, "artifact")])
    settings = Settings(cache_dir=tmp_path, keep_locks=(keep,))
    pins = lock_pins(lambda: settings, loaded, lambda: recorded)
    assert pins() == {sha(b"k"), sha(b"l")}  # no lock file written: nothing recorded is pinned
    settings = Settings(cache_dir=tmp_path, keep_locks=(keep,), lock_file=tmp_path / "up.lock")
    assert pins() == {sha(b"k"), sha(b"l"), sha(b"r")}  # record mode writes it: what it will name
    settings = Settings(cache_dir=tmp_path, mode="replay", lock_file=tmp_path / "up.lock")
    assert pins() == {sha(b"l")}


def test_a_keep_lock_that_cannot_be_read_refuses_to_start_and_later_skips_the_pass(tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path / "c", max_size=MiB, keep_locks=(tmp_path / "missing.lock",))
    with pytest.raises(LockError):
        ProxyServer(settings)
    cache = Cache(tmp_path / "c")
    blob = cache.store_bytes(b"x" * 100)
    trimmer = Trimmer(
        cache, 10, Metrics(), lambda: time.time() + 60, lambda: LockFile.load(tmp_path / "nope")
    )
    try:
        assert trimmer.look() is None and cache.blob_path(blob).exists()
    finally:
        trimmer.close()


# -- configuration ---------------------------------------------------------------------------
def test_max_size_from_the_table_flags_and_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert parse_table({"max_size": "10G"}, "t", tmp_path).max_size == 10 * 1024**3
    assert parse_table({"max_size": 1000}, "t", tmp_path).max_size == 1000
    assert parse_table({"max_size": 0}, "t", tmp_path).max_size is None
    assert parse_table({}, "t", tmp_path).max_size is None
    for bad in ("ten", -1, True):
        with pytest.raises(ConfigError, match="max_size"):
            parse_table({"max_size": bad}, "t", tmp_path)
    base = parse_table({"max_size": "1G"}, "t", tmp_path)
    assert with_max_size(base, "50M").max_size == 50 * MiB
    assert with_max_size(base, "0").max_size is None and with_max_size(base, None).max_size == 1024**3
    with pytest.raises(ConfigError, match="not a size"):
        with_max_size(base, "lots")
    args = build_parser().parse_args(
        ["serve", "--max-size", "2G", "--keep-lock", "a.lock", "--keep-lock", "b.lock"]
    )
    flagged = with_size_cap_flags(args, base)
    assert flagged.max_size == 2 * 1024**3 and flagged.keep_locks == (Path("a.lock"), Path("b.lock"))
    monkeypatch.setenv("UPSTREAM_PROXY_MAX_SIZE", "3M")
    assert with_size_cap_flags(build_parser().parse_args(["serve"]), base).max_size == 3 * MiB
    assert with_size_cap_flags(args, base).max_size == 2 * 1024**3  # the flag beats the variable
    assert main(["serve", "--max-size", "lots", "--cache", str(tmp_path / "c")]) == 2  # before binding


def test_the_pytest_option_caps_the_sessions_proxy(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytester.makepyfile(
        """
        def test_cap(upstream_proxy):
            assert upstream_proxy.server.engine.settings.max_size == 5 * 1024 * 1024
            assert upstream_proxy.server.engine.trimmer is not None
        """
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--upstream-cache", str(tmp_path / "c"), "--upstream-max-size", "5M"
    )
    result.assert_outcomes(passed=1)


def test_no_cap_no_trimmer(tmp_path: Path) -> None:
    server = ProxyServer(Settings(cache_dir=tmp_path / "c"))
    try:
        assert server.engine.trimmer is None
        assert "upstream_proxy_cache_bytes" not in server.engine.metrics.exposition()
        assert "upstream_proxy_evictions_total 0" in server.engine.metrics.exposition()
    finally:
        server.engine.close()


def test_a_trim_cut_short_by_closing_leaves_the_blobs_for_a_later_pass(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c")
    blob = stored(cache, 1, 1000)
    later = time.time() + 60
    report = trim(cache, max_size=0, grace=5, now=later, sleep=lambda _: None, cancelled=lambda: True)
    assert [e.path for e in report.removed] == ["a1.bin"] and cache.blob_path(blob).is_file()
    assert trim(cache, max_size=0, grace=5, now=later, pause=0).blobs_removed == 1
    assert not cache.blob_path(blob).exists()


def test_a_session_that_writes_a_lock_file_spares_every_entry_it_used(tmp_path: Path) -> None:
    """xdist workers record apart: what any of them used since the session started stays (the
    entries' use times say so), so the lock file written at the end names only present blobs."""
    started = time.time()
    settings = Settings(cache_dir=tmp_path, lock_file=tmp_path / "up.lock")
    assert session_spare(lambda: settings, started)() == started - 60
    assert session_spare(lambda: Settings(cache_dir=tmp_path), started)() is None
    cache = Cache(tmp_path / "c")
    for i, age in enumerate((7200, 3600, 30)):  # used 2 h ago, 1 h ago, during this session
        blob = stored(cache, i, 1000)
        when = started - age
        os.utime(cache.layout.entry("g", entry_id("g", f"a{i}.bin", "")), (when, when))
        os.utime(cache.blob_path(blob), (when, when))
    report = trim(cache, max_size=0, grace=5, pause=0, spare_used_since=started - 60)
    assert sorted(e.path for e in report.removed) == ["a0.bin", "a1.bin"]
    assert report.session_bytes == 1000 and cache.lookup("g", "a2.bin") is not None


def test_a_burst_too_fresh_to_trim_is_trimmed_once_past_the_grace_period(tmp_path: Path) -> None:
    """No further download is needed: the look that found only fresh blobs looks again."""
    cache = Cache(tmp_path / "c")
    for i in range(5):  # 5000 bytes, just written: over the cap, none removable yet
        stored(cache, i, 1000)
    trimmer = Trimmer(cache, 3000, Metrics(), time.time, frozenset, grace=2, pause=0)
    try:
        first = trimmer.look()  # (its thread is not started yet)
        assert first is not None and first.removed == [] and first.recent_bytes == 5000
        trimmer.settle()  # starts its thread, whose first look finds the same
        deadline = time.monotonic() + 30
        while blob_bytes(tmp_path / "c") > 3000 * LOW_WATER and time.monotonic() < deadline:
            time.sleep(0.05)  # the trimmer's own wait of ``grace``, in its thread
        assert blob_bytes(tmp_path / "c") <= 3000 * LOW_WATER
    finally:
        trimmer.close()
