"""Downloads decoupled from their clients (engine/flights.py) and the fetch deadlines.

One background download per entry; every client of the entry, the first included, is served
from the growing part file, so a stalled, slow or vanished client blocks no one and holds no
lock.  A download whose clients all left stops after ``orphan_deadline``; every download keeps
to ``fetch_deadline`` and ``min_rate``.  All on loopback, each test bounded to a few seconds.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from pytest_upstream.cli.main import build_parser, with_fetch_flags
from pytest_upstream.config.settings import (
    ConfigError,
    FetchLimits,
    ProxyDefinition,
    Settings,
    parse_table,
)
from pytest_upstream.engine.clock import Clock, ManualClock
from pytest_upstream.engine.dispatch import Engine
from pytest_upstream.engine.fetch import CACHE_HEADER, VERIFY_BEFORE_SERVE_LIMIT
from pytest_upstream.engine.flights import FlightFailed, FlightReader
from pytest_upstream.messages import Headers, ProxyRequest
from pytest_upstream.server.proxy_server import ProxyServer
from pytest_upstream.store.cache import Cache
from pytest_upstream.upstream.client import Pace, UpstreamError

from .conftest import proxy_def
from .upstreams import Fault, Upstream

MiB = 1024 * 1024
NO_LIMITS = FetchLimits(deadline=0, min_rate=0, orphan_deadline=60)


# -- helpers ------------------------------------------------------------------
@dataclass
class Got:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes
    complete: bool  # False when the connection was cut before the declared end


def get(base: str, path: str, timeout: float = 10.0) -> Got:
    """GET on a fresh connection; a body cut short comes back with ``complete`` False."""
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        try:
            return Got(resp.status, headers, resp.read(), True)
        except http.client.IncompleteRead as exc:
            return Got(resp.status, headers, exc.partial, False)
        except (ConnectionError, TimeoutError):
            return Got(resp.status, headers, b"", False)
    finally:
        conn.close()


def get_many(base: str, paths: list[str], timeout: float = 10.0) -> list[Got]:
    results: list[Got | BaseException] = [RuntimeError("no answer")] * len(paths)

    def run(i: int) -> None:
        try:
            results[i] = get(base, paths[i], timeout)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(paths))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 5)
    assert not any(t.is_alive() for t in threads), "a client hung"
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == []
    return [r for r in results if isinstance(r, Got)]


def raw_get(base: str, path: str, rcvbuf: int | None = None) -> socket.socket:
    """Send a GET and return the socket unread (a client that stalls, or is about to vanish)."""
    parts = urlsplit(base)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:  # a small window: the proxy's writes to it block soon
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect((parts.hostname or "", parts.port or 0))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode())
    return sock


def read_some(sock: socket.socket) -> tuple[bytes, bytes]:
    """Read an answer's head and the first bytes of its body."""
    got = b""
    while b"\r\n\r\n" not in got or got.endswith(b"\r\n\r\n"):
        more = sock.recv(65536)
        assert more, "the proxy closed the connection"
        got += more
    head, _, body = got.partition(b"\r\n\r\n")
    return head, body


def wait_until(condition: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def part_files(cache_dir: Path) -> list[Path]:
    return [p for p in (cache_dir / "tmp").iterdir() if p.name.endswith((".tmp", ".part"))]


def entry_free(cache: Cache, key: str, path: str) -> bool:
    """Whether nobody holds the entry's lock (taken without waiting)."""
    try:
        with cache.locked(key, path, "", 0):
            return True
    except Exception:
        return False


StartProxy = Callable[..., ProxyServer]


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[StartProxy]:
    """``start_proxy(proxy_def(...), fetch=FetchLimits(...), clock=...)``: a ProxyServer on loopback."""
    started: list[ProxyServer] = []

    def start(
        *proxies: ProxyDefinition, fetch: FetchLimits = NO_LIMITS, clock: Clock | None = None
    ) -> ProxyServer:
        settings = Settings(cache_dir=tmp_path / "cache", proxies=proxies, lock_timeout=30, fetch=fetch)
        server = ProxyServer(settings, clock=clock).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


def engine_for(tmp_path: Path, up: Upstream, fetch: FetchLimits, clock: Clock) -> Engine:
    proxy = proxy_def(key="g", format="generic", url=up.url)
    return Engine(Settings(cache_dir=tmp_path / "cache", proxies=(proxy,), fetch=fetch), clock=clock)


def engine_get(engine: Engine, path: str) -> FlightReader:
    reply = engine.handle(ProxyRequest("GET", "g", path, "", Headers(), "http://proxy.test"))
    assert reply.status == 200 and isinstance(reply.stream, FlightReader), reply.body
    return reply.stream


# -- clients that stall or leave ----------------------------------------------
def test_a_stalled_first_client_blocks_no_other_client(upstream: Upstream, start_proxy: StartProxy) -> None:
    data = os.urandom(8 * MiB)
    upstream.files["/big.bin"] = data
    upstream.faults["/big.bin"] = Fault(chunk_delay=0.004)  # 128 chunks, ~0.5 s: the others join it
    proxy = start_proxy(proxy_def(key="g", format="generic", url=upstream.url))

    stalled = raw_get(proxy.base_url, "/g/big.bin", rcvbuf=4096)  # sends GET, never reads
    try:
        wait_until(lambda: upstream.hits["/big.bin"] == 1, what="the download to start")
        started = time.monotonic()
        results = get_many(proxy.base_url, ["/g/big.bin"] * 6)
        took = time.monotonic() - started
        assert [(r.status, r.complete, r.body == data) for r in results] == [(200, True, True)] * 6
        assert {r.headers["x-upstream-cache"] for r in results} == {"hit"}  # they joined its download
        assert took < 5, f"the others waited for the stalled client ({took:.1f}s)"
        assert upstream.hits["/big.bin"] == 1
        cache = proxy.engine.cache
        assert (entry := cache.lookup("g", "big.bin")) is not None and entry.sha256 == sha(data)
        assert entry_free(cache, "g", "big.bin"), "the stalled client holds the entry lock"
        assert get(proxy.base_url, "/g/big.bin").headers["x-upstream-cache"] == "hit"
    finally:
        stalled.close()


def test_a_vanished_client_leaves_the_download_to_finish(upstream: Upstream, start_proxy: StartProxy) -> None:
    data = os.urandom(4 * MiB)
    upstream.files["/v.bin"] = data
    upstream.faults["/v.bin"] = Fault(chunk_delay=0.005)  # 64 chunks, ~0.3 s
    proxy = start_proxy(proxy_def(key="g", format="generic", url=upstream.url))

    sock = raw_get(proxy.base_url, "/g/v.bin")
    head, body = read_some(sock)
    assert head.startswith(b"HTTP/1.1 200") and b"X-Upstream-Cache: miss" in head
    assert body and data.startswith(body)
    sock.close()  # gone after the first bytes

    assert proxy.engine.flights.wait_idle(10), "the download did not end"
    assert (entry := proxy.engine.cache.lookup("g", "v.bin")) is not None and entry.sha256 == sha(data)
    later = get(proxy.base_url, "/g/v.bin")
    assert (later.status, later.headers["x-upstream-cache"], later.body == data) == (200, "hit", True)
    assert upstream.hits["/v.bin"] == 1
    assert part_files(proxy.engine.cache.root) == []


def test_a_download_whose_clients_vanished_stops_at_the_orphan_deadline(
    upstream: Upstream, start_proxy: StartProxy
) -> None:
    upstream.files["/gone.bin"] = os.urandom(2 * MiB)
    upstream.faults["/gone.bin"] = Fault(chunk_delay=0.05)  # 32 chunks, ~1.6 s
    limits = FetchLimits(deadline=0, min_rate=0, orphan_deadline=0.2)
    proxy = start_proxy(proxy_def(key="g", format="generic", url=upstream.url), fetch=limits)

    sock = raw_get(proxy.base_url, "/g/gone.bin")
    read_some(sock)
    sock.close()  # the server notices at its next write, and lets go of the download
    assert proxy.engine.flights.wait_idle(5), "the orphaned download went on"
    cache = proxy.engine.cache
    assert cache.lookup("g", "gone.bin") is None
    assert part_files(cache.root) == []
    assert entry_free(cache, "g", "gone.bin")
    assert upstream.hits["/gone.bin"] == 1


@pytest.mark.parametrize("encoded", [False, True], ids=["content-length", "gzip-no-length"])
def test_the_first_client_and_joiners_all_get_the_whole_body(
    upstream: Upstream, start_proxy: StartProxy, encoded: bool
) -> None:
    """Every client reads the body from its first byte, whenever it joined; with a length or
    without one (a gzip-encoded upstream answer is stored decoded, so its length is unknown)."""
    data = os.urandom(3 * MiB + 123)
    upstream.files["/j.bin"] = gzip.compress(data, compresslevel=1) if encoded else data
    upstream.faults["/j.bin"] = Fault(
        chunk_delay=0.02, headers={"Content-Encoding": "gzip"} if encoded else {}
    )
    proxy = start_proxy(proxy_def(key="g", format="generic", url=upstream.url))

    first: list[Got] = []
    t = threading.Thread(target=lambda: first.append(get(proxy.base_url, "/g/j.bin")), daemon=True)
    t.start()
    wait_until(lambda: upstream.hits["/j.bin"] == 1, what="the download to start")
    time.sleep(0.1)  # well into the download
    joined = get_many(proxy.base_url, ["/g/j.bin"] * 3)
    t.join(10)
    assert [(g.status, g.complete, g.body == data) for g in first + joined] == [(200, True, True)] * 4
    assert [g.headers["x-upstream-cache"] for g in first + joined] == ["miss", "hit", "hit", "hit"]
    if encoded:  # no length to declare: chunked to the clients
        assert all(g.headers.get("transfer-encoding") == "chunked" for g in first + joined)
    else:
        assert all(g.headers["content-length"] == str(len(data)) for g in first + joined)
    records = [(r.cache, r.status, r.size, r.sha256) for r in proxy.served.records if r.path == "j.bin"]
    assert sorted(records) == [("hit", 200, len(data), sha(data))] * 3 + [("miss", 200, len(data), sha(data))]
    assert upstream.hits["/j.bin"] == 1


def test_joiners_read_a_part_file_that_was_discarded_for_an_existing_blob(
    upstream: Upstream, start_proxy: StartProxy
) -> None:
    """Same bytes under a second name: the blob is there already, so the part file is deleted
    instead of renamed; clients reading it keep their descriptors and get every byte."""
    data = os.urandom(2 * MiB)
    upstream.files["/a.bin"] = data
    upstream.files["/b.bin"] = data
    proxy = start_proxy(proxy_def(key="g", format="generic", url=upstream.url))
    assert get(proxy.base_url, "/g/a.bin").body == data
    upstream.faults["/b.bin"] = Fault(chunk_delay=0.02)
    results = get_many(proxy.base_url, ["/g/b.bin"] * 3)
    assert [(r.status, r.complete, r.body == data) for r in results] == [(200, True, True)] * 3
    assert sorted(r.headers["x-upstream-cache"] for r in results) == ["hit", "hit", "miss"]
    assert upstream.hits["/b.bin"] == 1
    assert proxy.engine.flights.wait_idle(5)
    assert part_files(proxy.engine.cache.root) == []


# -- deadlines -------------------------------------------------------------------
def test_an_orphaned_download_is_cancelled_after_the_orphan_deadline(
    upstream: Upstream, tmp_path: Path
) -> None:
    data = os.urandom(2 * MiB)
    upstream.files["/o.bin"] = data
    upstream.faults["/o.bin"] = Fault(chunk_delay=0.05)  # 32 chunks, ~1.6 s
    clock = ManualClock()
    engine = engine_for(tmp_path, upstream, FetchLimits(deadline=0, min_rate=0, orphan_deadline=30), clock)
    try:
        stream = engine_get(engine, "o.bin")
        first = next(stream)  # the first chunk, once the second arrived
        assert first and data.startswith(first)
        stream.close()  # the only client leaves (the server does this when its socket fails)
        clock.advance(29)
        time.sleep(0.15)  # a few more chunks: still within the deadline, still downloading
        assert engine.flights.in_flight() == 1
        clock.advance(2)
        assert engine.flights.wait_idle(5), "the orphaned download went on"
        cache = engine.cache
        assert cache.lookup("g", "o.bin") is None
        assert part_files(cache.root) == []
        assert entry_free(cache, "g", "o.bin")
        assert upstream.hits["/o.bin"] == 1
    finally:
        engine.close()


def test_a_client_that_comes_back_keeps_an_orphaned_download(upstream: Upstream, tmp_path: Path) -> None:
    data = os.urandom(1 * MiB)
    upstream.files["/b.bin"] = data
    upstream.faults["/b.bin"] = Fault(chunk_delay=0.03)
    clock = ManualClock()
    engine = engine_for(tmp_path, upstream, FetchLimits(deadline=0, min_rate=0, orphan_deadline=10), clock)
    try:
        first = engine_get(engine, "b.bin")
        next(first)
        first.close()
        second = engine_get(engine, "b.bin")  # joins the download before its orphan deadline
        clock.advance(60)  # the download has a client again: the deadline no longer applies
        assert b"".join(second) == data
        assert engine.flights.wait_idle(5)
        assert (entry := engine.cache.lookup("g", "b.bin")) is not None and entry.sha256 == sha(data)
        assert upstream.hits["/b.bin"] == 1
    finally:
        engine.close()


def test_the_fetch_deadline_fails_a_streamed_download(upstream: Upstream, tmp_path: Path) -> None:
    data = os.urandom(2 * MiB)
    upstream.files["/d.bin"] = data
    upstream.faults["/d.bin"] = Fault(chunk_delay=0.05)
    clock = ManualClock()
    engine = engine_for(tmp_path, upstream, FetchLimits(deadline=3600, min_rate=0), clock)
    try:
        stream = engine_get(engine, "d.bin")
        received = next(stream)
        clock.advance(3601)
        with pytest.raises(FlightFailed, match=r"gave up after the fetch deadline \(3600s, fetch_deadline\)"):
            for chunk in stream:
                received += chunk
        assert len(received) < len(data)
        assert engine.flights.wait_idle(5)
        assert engine.cache.lookup("g", "d.bin") is None
        assert part_files(engine.cache.root) == []
        assert entry_free(engine.cache, "g", "d.bin")
        (record,) = [r for r in engine.served.records if r.path == "d.bin"]
        assert (record.cache, record.status) == ("error", 502)
        assert "fetch_deadline" in record.error and upstream.url in record.error
    finally:
        engine.close()


def test_min_rate_fails_a_dripping_upstream_in_bounded_time(
    upstream: Upstream, start_proxy: StartProxy
) -> None:
    data = os.urandom(4 * MiB)
    upstream.files["/slow.bin"] = data
    upstream.faults["/slow.bin"] = Fault(chunk_delay=0.1)  # 640 KiB/s: ~6.4 s for the whole file
    limits = FetchLimits(deadline=0, min_rate=4 * MiB, rate_window=0.5)
    proxy = start_proxy(proxy_def(key="g", format="generic", url=upstream.url), fetch=limits)

    started = time.monotonic()
    got = get(proxy.base_url, "/g/slow.bin")
    took = time.monotonic() - started
    assert got.status == 200 and not got.complete  # streamed: the answer started, then was cut
    assert took < 3, f"the slow download lasted {took:.1f}s"
    assert proxy.engine.flights.wait_idle(5)
    (record,) = [r for r in proxy.served.records if r.path == "slow.bin"]
    assert (record.cache, record.status) == ("error", 502)
    assert "too slow" in record.error and "below the minimum 4.0 MiB/s (min_rate)" in record.error
    assert proxy.engine.cache.lookup("g", "slow.bin") is None
    assert part_files(proxy.engine.cache.root) == []
    # A client arriving after the failure asks again: a new download.
    del upstream.faults["/slow.bin"]
    again = get(proxy.base_url, "/g/slow.bin")
    assert (again.status, again.complete, again.body == data) == (200, True, True)
    assert upstream.hits["/slow.bin"] == 2


def test_deadlines_on_metadata_serve_stale_or_say_why(upstream: Upstream, start_proxy: StartProxy) -> None:
    """Whole-body downloads (metadata) keep the deadlines too: stale copy if any, else a 502."""
    body = os.urandom(1 * MiB)
    upstream.files["/meta.json"] = body
    upstream.files["/new.json"] = body
    proxy = start_proxy(
        proxy_def(key="g", format="generic", url=upstream.url, mutable_paths=["*.json"], metadata_ttl=0),
        fetch=FetchLimits(deadline=0.3, min_rate=0),
    )
    assert get(proxy.base_url, "/g/meta.json").headers["x-upstream-cache"] == "miss"
    upstream.default_fault = Fault(chunk_delay=0.1)  # 16 chunks, ~1.6 s: past the deadline

    started = time.monotonic()
    stale = get(proxy.base_url, "/g/meta.json")
    assert (stale.status, stale.headers["x-upstream-cache"], stale.body == body) == (200, "stale", True)
    assert "fetch deadline (0.3s, fetch_deadline)" in stale.headers["x-upstream-error"]
    fresh = get(proxy.base_url, "/g/new.json")
    assert fresh.status == 502
    assert "fetch deadline (0.3s, fetch_deadline)" in fresh.body.decode()
    assert time.monotonic() - started < 3


def test_closing_the_engine_cancels_its_downloads(upstream: Upstream, tmp_path: Path) -> None:
    upstream.files["/c.bin"] = os.urandom(2 * MiB)
    upstream.faults["/c.bin"] = Fault(chunk_delay=0.05)  # ~1.6 s
    engine = engine_for(tmp_path, upstream, NO_LIMITS, ManualClock())
    stream = engine_get(engine, "c.bin")
    next(stream)
    started = time.monotonic()
    engine.close()
    assert time.monotonic() - started < 1.5
    assert engine.flights.in_flight() == 0
    with pytest.raises(FlightFailed, match="cancelled: the proxy is shutting down"):
        b"".join(stream)
    assert engine.cache.lookup("g", "c.bin") is None
    assert part_files(engine.cache.root) == []


# -- verification ----------------------------------------------------------------
def test_a_failed_verification_cuts_every_joined_client(upstream: Upstream, start_proxy: StartProxy) -> None:
    size = 9 * MiB
    assert size > VERIFY_BEFORE_SERVE_LIMIT  # streamed, not verified before the first byte
    data = bytes(range(256)) * (size // 256)
    name = "big-1.0-py3-none-any.whl"
    upstream.files[f"/files/{name}"] = data
    upstream.faults[f"/files/{name}"] = Fault(chunk_delay=0.01)  # 144 chunks, ~1.5 s
    upstream.files["/simple/big/"] = (
        f'<!DOCTYPE html><html><body><a href="../../files/{name}#sha256={sha(b"other")}">{name}</a>'
        "</body></html>\n"
    ).encode()
    proxy = start_proxy(proxy_def(key="p", format="pypi", url=upstream.url + "/simple/"))
    path = f"/p/files/big/{name}"

    first: list[Got] = []
    t = threading.Thread(target=lambda: first.append(get(proxy.base_url, path)), daemon=True)
    t.start()
    wait_until(lambda: upstream.hits[f"/files/{name}"] == 1, what="the download to start")
    joined = get_many(proxy.base_url, [path] * 3)
    t.join(10)
    everyone = first + joined
    assert [(g.status, g.complete) for g in everyone] == [(200, False)] * 4
    assert all(g.body == data[: len(g.body)] for g in everyone)
    assert proxy.engine.flights.wait_idle(5)
    errors = [r for r in proxy.served.records if r.path.endswith(name)]
    assert [(r.cache, r.status) for r in errors] == [("error", 502)] * 4
    assert all("sha256 digest mismatch" in r.error for r in errors)
    assert proxy.engine.cache.lookup("p", f"files/big/{name}") is None
    assert sha(data) not in {p.name for p in (proxy.engine.cache.root / "blobs").rglob("*")}
    assert part_files(proxy.engine.cache.root) == []
    assert upstream.hits[f"/files/{name}"] == 1


def test_a_failure_before_the_answer_reaches_every_client_as_an_error(
    upstream: Upstream, start_proxy: StartProxy
) -> None:
    upstream.faults["/gone.bin"] = Fault(status=503, delay=1.0)  # everyone joins, then 503
    proxy = start_proxy(proxy_def(key="g", format="generic", url=upstream.url))
    results = get_many(proxy.base_url, ["/g/gone.bin"] * 4)
    assert [r.status for r in results] == [502] * 4
    assert all("answered 503" in r.body.decode() for r in results)
    assert upstream.hits["/gone.bin"] == 1


# -- the pace, the settings ---------------------------------------------------------
def test_pace_judges_the_average_rate_over_each_window() -> None:
    now = [1000.0]
    pace = Pace(FetchLimits(deadline=100, min_rate=1000, rate_window=10), lambda: now[0])
    now[0] += 50  # the upstream took its time to answer: no transfer yet, so not a slow one
    pace.body_starts()
    now[0] += 9
    pace.check(10)  # the window has not passed yet
    now[0] += 1
    pace.check(10_000)  # 10,000 B in 10 s: exactly the minimum
    now[0] += 10
    slow = r"too slow: 9.8 KiB in the last 10s, below the minimum 1000 B/s \(min_rate\)"
    with pytest.raises(UpstreamError, match=slow):
        pace.check(19_999)
    now[0] += 30
    pace.check(10**9)  # 100 s since the request: the deadline, not past it
    now[0] += 1
    with pytest.raises(UpstreamError, match=r"gave up after the fetch deadline \(100s, fetch_deadline\)"):
        pace.check(10**9)
    quiet = Pace(FetchLimits(deadline=0, min_rate=0), lambda: now[0])
    now[0] += 10**6
    quiet.check(1)  # no limits: never raises
    late = Pace(FetchLimits(deadline=5, min_rate=0), lambda: now[0])
    now[0] += 5.5
    with pytest.raises(UpstreamError, match="fetch deadline"):
        late.check(1)


def test_fetch_limits_from_the_table_and_serve_flags(tmp_path: Path) -> None:
    table = {"fetch_deadline": "2h", "min_rate": "4K", "min_rate_window": 10, "orphan_deadline": "90s"}
    settings = parse_table(table, "pyproject.toml", tmp_path)
    assert settings.fetch == FetchLimits(deadline=7200, min_rate=4096, rate_window=10, orphan_deadline=90)
    assert parse_table({}, "pyproject.toml", tmp_path).fetch == FetchLimits()
    cases: list[tuple[dict[str, Any], str]] = [
        ({"min_rate": -1}, "min_rate must be a non-negative number of bytes"),
        ({"fetch_deadline": "soon"}, "fetch_deadline: not an age: 'soon'"),
        ({"min_rate_window": 0}, "min_rate_window must be more than 0 seconds"),
        ({"orphan_deadline": True}, "orphan_deadline must be a non-negative number of seconds"),
    ]
    for bad, message in cases:
        with pytest.raises(ConfigError, match=message):
            parse_table(bad, "pyproject.toml", tmp_path)

    args = build_parser().parse_args(
        ["serve", "--fetch-deadline", "30m", "--min-rate", "0", "--orphan-deadline", "5s"]
    )
    flagged = with_fetch_flags(args, settings)
    assert flagged.fetch == FetchLimits(deadline=1800, min_rate=0, rate_window=10, orphan_deadline=5)
    unflagged = with_fetch_flags(build_parser().parse_args(["serve"]), settings)
    assert unflagged.fetch == settings.fetch
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--min-rate", "fast"])


def test_a_lone_download_reports_its_cache_state(upstream: Upstream, start_proxy: StartProxy) -> None:
    """The starter of a download is the miss, with the upstream's Content-Length."""
    data = os.urandom(300_000)
    upstream.files["/one.bin"] = data
    proxy = start_proxy(proxy_def(key="g", format="generic", url=upstream.url))
    got = get(proxy.base_url, "/g/one.bin")
    assert (got.status, got.headers[CACHE_HEADER.lower()], got.body == data) == (200, "miss", True)
    assert proxy.engine.flights.wait_idle(5)
    assert proxy.engine.flights.in_flight() == 0
