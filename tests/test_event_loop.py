"""The server's event loop and its worker threads (server/listener.py, server/workers.py) and the
engine's non-blocking entry point (``Engine.answer_warm``).

What the design promises and these tests hold it to: a warm hit is answered on the loop's own
thread and nothing that may wait ever is; a request handed to a worker and the requests read
with it are answered in order; an idle or trickling connection costs no thread; workers start
only when needed and never beyond their bound; ``answer_warm`` records nothing when it declines.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_upstream.config.settings import Settings
from pytest_upstream.engine.dispatch import Engine
from pytest_upstream.messages import Headers, ProxyRequest
from pytest_upstream.server.proxy_server import ProxyServer
from pytest_upstream.server.siblings import Siblings
from pytest_upstream.server.workers import Workers

from .conftest import proxy_def
from .upstreams import Fault, Upstream


@pytest.fixture
def server(tmp_path: Path, upstream: Upstream) -> Iterator[ProxyServer]:
    settings = Settings(
        cache_dir=tmp_path / "cache",
        proxies=(proxy_def(key="g", format="generic", url=upstream.url + "/files"),),
    )
    with ProxyServer(settings) as srv:
        yield srv


def port_of(server: ProxyServer) -> int:
    return int(server.base_url.rsplit(":", 1)[1])


def get(server: ProxyServer, path: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        return b"".join(iter(lambda: sock.recv(65536), b""))


def spy_on_handle(server: ProxyServer, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """(thread name, warm_only) of every ``Engine.handle`` call."""
    calls: list[tuple[str, bool]] = []
    real = server.engine.handle

    def handle(req: ProxyRequest, *, warm_only: bool = False) -> Any:
        calls.append((threading.current_thread().name, warm_only))
        return real(req, warm_only=warm_only)

    monkeypatch.setattr(server.engine, "handle", handle)
    return calls


def test_a_warm_hit_is_answered_on_the_loop_thread_and_a_miss_in_a_worker(
    server: ProxyServer, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream.files["/files/a.bin"] = b"a" * 1000
    calls = spy_on_handle(server, monkeypatch)
    assert get(server, "/g/a.bin").endswith(b"a" * 1000)
    # The loop asked for a warm answer, got none (a miss), and a worker answered it.
    assert calls == [("pytest-upstream", True), ("pytest-upstream-worker", False)]
    calls.clear()
    assert get(server, "/g/a.bin").endswith(b"a" * 1000)  # a small file hit: read and sent inline
    assert calls == [("pytest-upstream", True)]
    calls.clear()
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=10) as sock:
        for _ in range(3):  # a kept-alive connection, handed back after each answer
            sock.sendall(b"GET /-/ready HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    assert calls == [("pytest-upstream", True)] * 3  # /-/ready: answered inline every time
    assert [r.cache for r in server.served] == ["miss", "hit"]  # recorded once, not per attempt


def raw(server: ProxyServer, head: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=10) as sock:
        sock.sendall(head + b"Host: 127.0.0.1\r\nConnection: close\r\n\r\n")
        return b"".join(iter(lambda: sock.recv(65536), b""))


def test_a_small_file_sent_inline_honours_range_head_and_conditionals(
    server: ProxyServer, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = bytes(range(256)) * 4
    upstream.files["/files/s.bin"] = data
    get(server, "/g/s.bin")
    get(server, "/g/s.bin")  # the blob verified by this process: hits are answered inline now
    calls = spy_on_handle(server, monkeypatch)
    ranged = raw(server, b"GET /g/s.bin HTTP/1.1\r\nRange: bytes=10-19\r\n")
    assert ranged.startswith(b"HTTP/1.1 206 ") and b"Content-Range: bytes 10-19/1024\r\n" in ranged
    assert ranged.endswith(b"\r\n\r\n" + data[10:20])
    head = raw(server, b"HEAD /g/s.bin HTTP/1.1\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: 1024\r\n" in head
    assert head.endswith(b"\r\n\r\n")  # no body
    etag = re.search(rb"ETag: (\S+)\r\n", head)
    assert etag is not None
    again = raw(server, b"GET /g/s.bin HTTP/1.1\r\nIf-None-Match: " + etag.group(1) + b"\r\n")
    assert again.startswith(b"HTTP/1.1 304 ")
    past = raw(server, b"GET /g/s.bin HTTP/1.1\r\nRange: bytes=5000-\r\n")
    assert past.startswith(b"HTTP/1.1 416 ") and b"Content-Range: bytes */1024\r\n" in past
    assert calls == [("pytest-upstream", True)] * 4  # none needed a worker


def test_pipelined_requests_around_one_a_worker_answers_are_answered_in_order(
    server: ProxyServer, upstream: Upstream
) -> None:
    upstream.files["/files/slow.bin"] = b"s" * 300
    upstream.faults["/files/slow.bin"] = Fault(delay=0.3)
    request = b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=10) as sock:
        sock.sendall(request % b"/-/ready" + request % b"/g/slow.bin" + request % b"/-/nothing")
        sock.sendall(b"GET /-/ready HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        data = b"".join(iter(lambda: sock.recv(65536), b""))
    statuses = re.findall(rb"HTTP/1\.1 ([0-9]{3}) ", data)
    assert statuses == [b"200", b"200", b"404", b"200"], data
    assert data.index(b"ready") < data.index(b"s" * 300) < data.index(b"/-/metrics and /-/ready")


def test_idle_and_trickling_connections_cost_no_thread(server: ProxyServer) -> None:
    get(server, "/-/ready")
    threads = threading.active_count()
    held = [socket.create_connection(("127.0.0.1", port_of(server)), timeout=5) for _ in range(200)]
    try:
        for sock in held[::2]:  # half begin a head and stop
            sock.sendall(b"GET /-/ready HTTP/1.1\r\nX-Slow: ")
        deadline = time.monotonic() + 5
        while server.open_connections() < 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.open_connections() == 200
        assert threading.active_count() <= threads  # no thread per connection
        started = time.monotonic()
        assert get(server, "/-/ready").startswith(b"HTTP/1.1 200 ")
        assert time.monotonic() - started < 1.0
    finally:
        for sock in held:
            sock.close()


def test_workers_start_only_when_needed_and_never_beyond_their_bound() -> None:
    workers = Workers(limit=2)
    release = threading.Event()
    ran: list[int] = []
    for n in range(4):  # 2 block; 2 more queue behind them
        workers.submit(lambda n=n: (release.wait(5), ran.append(n)))  # type: ignore[misc]
    assert workers.threads == 2
    release.set()
    deadline = time.monotonic() + 5
    while len(ran) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(ran) == [0, 1, 2, 3]
    workers.submit(lambda: ran.append(4))  # an idle thread takes it: no third thread
    while len(ran) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ran[-1] == 4 and workers.threads == 2
    workers.close()


def _request(path: str) -> ProxyRequest:
    return ProxyRequest("GET", "g", path, "", Headers(), "http://127.0.0.1:1")


def test_answer_warm_declines_what_would_wait_and_records_nothing(tmp_path: Path, upstream: Upstream) -> None:
    upstream.files["/files/a.bin"] = b"abc"
    settings = Settings(
        cache_dir=tmp_path / "cache",
        proxies=(proxy_def(key="g", format="generic", url=upstream.url + "/files"),),
    )
    engine = Engine(settings)
    try:
        assert engine.answer_warm(_request("a.bin")) is None  # a miss: the upstream
        assert list(engine.served) == [] and upstream.hits["/files/a.bin"] == 0
        reply = engine.handle(_request("a.bin"))
        assert reply.headers["X-Upstream-Cache"] == "miss"
        close = getattr(reply.stream, "close", None)
        if close is not None:
            for _ in reply.stream or ():
                pass
            close()
        deadline = time.monotonic() + 5
        while (warm := engine.answer_warm(_request("a.bin"))) is None and time.monotonic() < deadline:
            time.sleep(0.02)  # the download is stored in the background
        assert warm is not None and warm.headers["X-Upstream-Cache"] == "hit"
        assert warm.file is not None and warm.file.read_bytes() == b"abc"
        unknown = ProxyRequest("GET", "nope", "a.bin", "", Headers(), "http://127.0.0.1:1")
        warm_error = engine.answer_warm(unknown)
        assert warm_error is not None and warm_error.status == 404  # errors are answered inline too
    finally:
        engine.close()
    fresh = Engine(settings)  # a new process: it has verified no blob yet
    try:
        assert fresh.answer_warm(_request("a.bin")) is None  # hashing the blob is a worker's job
        assert list(fresh.served) == []
        assert fresh.handle(_request("a.bin")).headers["X-Upstream-Cache"] == "hit"
        again = fresh.answer_warm(_request("a.bin"))
        assert again is not None and again.headers["X-Upstream-Cache"] == "hit"
        assert upstream.hits["/files/a.bin"] == 1
    finally:
        fresh.close()


def test_a_stopped_server_closes_a_connection_a_worker_finishes(upstream: Upstream, tmp_path: Path) -> None:
    upstream.files["/files/slow.bin"] = b"s" * 100
    upstream.faults["/files/slow.bin"] = Fault(delay=0.5)
    settings = Settings(
        cache_dir=tmp_path / "cache",
        proxies=(proxy_def(key="g", format="generic", url=upstream.url + "/files"),),
    )
    server = ProxyServer(settings).start()
    sock = socket.create_connection(("127.0.0.1", port_of(server)), timeout=10)
    try:
        sock.sendall(b"GET /g/slow.bin HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # keep-alive asked
        time.sleep(0.2)
        server._listener.stop()  # the loop ends while the worker waits for the upstream
        data = b""
        with contextlib.suppress(ConnectionResetError):
            data = b"".join(iter(lambda: sock.recv(65536), b""))
        assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"s" * 100)  # answered, then closed
    finally:
        sock.close()
        server.stop()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="serve --workers forks")
def test_sibling_processes_see_each_others_connection_counts() -> None:
    """``serve --workers``: a process holding more connections than a sibling leaves newcomers to it."""
    siblings = Siblings()
    try:
        assert siblings.least_busy() is None  # alone
        child = os.fork()
        if child == 0:  # pragma: no cover - the child process
            siblings.publish(5)
            os._exit(0)
        os.waitpid(child, 0)
        siblings.publish(7)
        assert siblings.least_busy() == 5  # the child's count, through the shared table
    finally:
        siblings.close()
