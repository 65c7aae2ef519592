"""The HTTP core on raw sockets: strict parsing, no smuggling, HTTP/1.0 framing, ranges,
and the bounds on connections (head and idle deadlines, the cap, the send timeout).

Every test is bounded: short configured timeouts, generous limits on waiting."""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_upstream.config.settings import ConfigError, Settings, parse_table
from pytest_upstream.server import connection as connection_module
from pytest_upstream.server.limits import Limits, auto_max_connections
from pytest_upstream.server.proxy_server import ProxyServer

from .conftest import proxy_def
from .upstreams import Fault, Upstream

Serve = Callable[..., ProxyServer]


@pytest.fixture
def serve(tmp_path: Path, upstream: Upstream) -> Iterator[Serve]:
    """A ProxyServer with one generic proxy ``g`` in front of ``upstream``; limits as given."""
    started: list[ProxyServer] = []

    def make(**limits: Any) -> ProxyServer:
        settings = Settings(
            cache_dir=tmp_path / "cache",
            proxies=(proxy_def(key="g", format="generic", url=upstream.url + "/files"),),
            **limits,
        )
        server = ProxyServer(settings).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


def port_of(server: ProxyServer) -> int:
    return int(server.base_url.rsplit(":", 1)[1])


def connect(server: ProxyServer, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port_of(server)), timeout=timeout)


def until_closed(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the server sends until it closes the connection; fails if it stays open."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pytest.fail(f"the server kept the connection open; got {data[:200]!r}")
    except ConnectionResetError:
        pass
    return data


def exchange(server: ProxyServer, request: bytes) -> bytes:
    with connect(server) as sock:
        sock.sendall(request)
        return until_closed(sock)


def status_lines(data: bytes) -> list[bytes]:
    """Every status line in what a connection received (a body may end without a newline)."""
    return re.findall(rb"HTTP/1\.[01] [0-9]{3} [^\r\n]*", data)


OK = b"GET /g/ok.bin HTTP/1.1\r\nHost: 127.0.0.1\r\n"
MALFORMED = {
    "content-length-not-a-number": (OK + b"Content-Length: abc\r\n\r\n", 400),
    "two-different-content-lengths": (OK + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", 400),
    "content-length-list": (OK + b"Content-Length: 5, 6\r\n\r\nhello!", 400),
    "negative-content-length": (OK + b"Content-Length: -5\r\n\r\n", 400),
    "identity-then-chunked": (OK + b"Transfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n", 400),
    "unknown-transfer-coding": (OK + b"Transfer-Encoding: gzip\r\n\r\n", 400),
    "two-transfer-encodings": (OK + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    "length-and-chunked": (OK + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "bare-cr-in-target": (b"GET /g/ok.bin\rX HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400),
    "control-character-in-target": (b"GET /g/ok\x01.bin HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400),
    "nul-in-target": (b"GET /g/a\x00.bin HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400),
    "nul-in-header": (OK + b"X-A: a\x00b\r\n\r\n", 400),
    "bare-cr-in-header": (OK + b"X-A: a\rb\r\n\r\n", 400),
    "obs-fold": (OK + b"X-A: a\r\n b\r\n\r\n", 400),
    "header-without-colon": (OK + b"X-A\r\n\r\n", 400),
    "space-before-colon": (OK + b"X-A : b\r\n\r\n", 400),
    "missing-host": (b"GET /g/ok.bin HTTP/1.1\r\n\r\n", 400),
    "two-hosts": (OK + b"Host: 127.0.0.2\r\n\r\n", 400),
    "bad-host": (b'GET /g/ok.bin HTTP/1.1\r\nHost: x"><script>\r\n\r\n', 400),
    "bad-chunk-size": (OK + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", 400),
    "garbage": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n\r\n", 400),
    "http2-preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    "http-3": (b"GET /g/ok.bin HTTP/3.0\r\nHost: 127.0.0.1\r\n\r\n", 505),
    "target-too-long": (b"GET /g/" + b"a" * 20000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 414),
    "headers-too-large": (
        OK + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 1000) for i in range(80)) + b"\r\n",
        431,
    ),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_a_malformed_request_gets_its_status_and_the_connection_closes(
    serve: Serve, upstream: Upstream, name: str
) -> None:
    upstream.files["/files/ok.bin"] = b"ok"
    request, status = MALFORMED[name]
    server = serve()
    data = exchange(server, request)  # until_closed: fails unless the server closes
    assert status_lines(data) and status_lines(data)[0].startswith(b"HTTP/1.1 %d " % status), data[:300]
    assert b"\r\nConnection: close\r\n" in data
    assert len(status_lines(data)[0]) > len(b"HTTP/1.1 400 ")  # a reason phrase says why
    assert upstream.hits["/files/ok.bin"] == 0


HIDDEN = b"GET /g/secret.bin HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
SMUGGLING = {
    "negative-length": OK + b"Content-Length: -5\r\n\r\n" + HIDDEN,
    "identity-chunked": OK + b"Transfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n" + HIDDEN,
    "length-and-chunked": OK
    + b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" % (5 + len(HIDDEN))
    + HIDDEN,
    "two-lengths": OK + b"Content-Length: 0\r\nContent-Length: %d\r\n\r\n" % len(HIDDEN) + HIDDEN,
    "obs-folded-length": OK + b"X-A: a\r\n Content-Length: %d\r\n\r\n" % len(HIDDEN) + HIDDEN,
}


@pytest.mark.parametrize("name", sorted(SMUGGLING))
def test_a_request_hidden_after_a_bad_head_is_never_answered(
    serve: Serve, upstream: Upstream, name: str
) -> None:
    upstream.files["/files/ok.bin"] = b"ok"
    upstream.files["/files/secret.bin"] = b"secret"
    server = serve()
    data = exchange(server, SMUGGLING[name])
    assert len(status_lines(data)) == 1 and status_lines(data)[0].startswith(b"HTTP/1.1 400 ")
    assert b"secret" not in data
    assert upstream.hits["/files/secret.bin"] == 0 and upstream.hits["/files/ok.bin"] == 0


def test_a_body_is_drained_never_read_as_a_request(serve: Serve, upstream: Upstream) -> None:
    upstream.files["/files/secret.bin"] = b"secret"
    server = serve()
    request = (
        b"POST /g/ok.bin HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % len(HIDDEN) + HIDDEN
    )
    with connect(server) as sock:
        sock.sendall(request + b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        data = until_closed(sock)
    assert [line.split(b" ")[1] for line in status_lines(data)] == [
        b"405",
        b"200",
    ]  # the POST, then the index
    assert b"secret" not in data and upstream.hits["/files/secret.bin"] == 0


def test_pipelined_requests_before_a_bad_one_are_answered_then_it_gets_400(serve: Serve) -> None:
    server = serve()
    good = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    data = exchange(server, good + good + b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n" + good)
    assert [line.split(b" ")[1] for line in status_lines(data)] == [b"200", b"200", b"400"]


def test_an_upgrade_request_is_answered_then_the_connection_closes(serve: Serve) -> None:
    server = serve()
    upgrade = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
    data = exchange(server, upgrade + b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert [line.split(b" ")[1] for line in status_lines(data)] == [b"200"]
    assert b"\r\nConnection: close\r\n" in data


def test_expect_100_continue_is_answered_before_the_body(serve: Serve) -> None:
    server = serve()
    with connect(server) as sock:
        sock.sendall(
            b"POST /g/x HTTP/1.1\r\nHost: 127.0.0.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n"
        )
        assert sock.recv(65536).startswith(b"HTTP/1.1 100 ")
        sock.sendall(b"abc")
        assert sock.recv(65536).startswith(b"HTTP/1.1 405 ")


def test_http10_gets_a_close_delimited_body_never_chunked(serve: Serve, upstream: Upstream) -> None:
    payload = b"streamed bytes " * 20000
    upstream.files["/files/gz.bin"] = gzip.compress(payload)
    upstream.faults["/files/gz.bin"] = Fault(headers={"Content-Encoding": "gzip"})  # length unknown: a stream
    server = serve()
    data = exchange(server, b"GET /g/gz.bin HTTP/1.0\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"transfer-encoding" not in head.lower() and b"content-length" not in head.lower()
    assert body == payload
    # now a hit of known length: an HTTP/1.0 client that asks for keep-alive gets it
    with connect(server) as sock:
        sock.sendall(b"GET /g/gz.bin HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        data = b""
        while len(data.partition(b"\r\n\r\n")[2]) < len(payload):
            data += sock.recv(1 << 20)
        head, _, body = data.partition(b"\r\n\r\n")
        assert b"\r\nConnection: keep-alive" in head and b"\r\nContent-Length: %d" % len(payload) in head
        assert body == payload
        sock.sendall(b"GET /g/gz.bin HTTP/1.0\r\n\r\n")  # the same connection, then closed
        assert until_closed(sock).endswith(payload)


def test_http11_stream_without_a_length_is_chunked(serve: Serve, upstream: Upstream) -> None:
    upstream.files["/files/gz.bin"] = gzip.compress(b"x" * 1000)
    upstream.faults["/files/gz.bin"] = Fault(headers={"Content-Encoding": "gzip"})
    server = serve()
    data = exchange(server, b"GET /g/gz.bin HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    head = data.partition(b"\r\n\r\n")[0].lower()
    assert b"transfer-encoding: chunked" in head and data.endswith(b"0\r\n\r\n")


def test_range_past_the_end_is_416_with_the_size(serve: Serve, upstream: Upstream) -> None:
    upstream.files["/files/r.bin"] = b"0123456789"
    server = serve()
    exchange(server, b"GET /g/r.bin HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")  # now cached
    data = exchange(
        server, b"GET /g/r.bin HTTP/1.1\r\nHost: 127.0.0.1\r\nRange: bytes=10-\r\nConnection: close\r\n\r\n"
    )
    assert data.startswith(b"HTTP/1.1 416 ") and b"\r\nContent-Range: bytes */10\r\n" in data
    data = exchange(
        server, b"GET /g/r.bin HTTP/1.1\r\nHost: 127.0.0.1\r\nRange: bytes=8-20\r\nConnection: close\r\n\r\n"
    )
    assert (
        data.startswith(b"HTTP/1.1 206 ") and b"Content-Range: bytes 8-9/10" in data and data.endswith(b"89")
    )


def test_head_of_a_file_sends_its_length_and_no_body(serve: Serve, upstream: Upstream) -> None:
    upstream.files["/files/h.bin"] = b"0123456789"
    server = serve()
    exchange(server, b"GET /g/h.bin HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    with connect(server) as sock:
        sock.sendall(
            b"HEAD /g/h.bin HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        data = until_closed(sock)
    assert [line.split(b" ")[1] for line in status_lines(data)] == [b"200", b"200"]
    assert b"Content-Length: 10\r\n" in data and b"0123456789" not in data


# -- bounded connections ----------------------------------------------------------------
def test_slowloris_heads_are_closed_at_the_deadline_while_a_probe_is_answered(serve: Serve) -> None:
    server = serve(header_timeout=1.0)
    tricklers = [connect(server) for _ in range(40)]
    stop = threading.Event()

    def trickle() -> None:
        line = b"GET /g/x HTTP/1.1\r\nX-Slow: " + b"a" * 100
        for i in range(len(line)):
            if stop.is_set():
                return
            for sock in tricklers:
                with contextlib.suppress(OSError):
                    sock.send(line[i : i + 1])
            time.sleep(0.05)

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        time.sleep(0.3)
        started = time.monotonic()
        data = exchange(server, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 200 ") and time.monotonic() - started < 0.5
        for sock in tricklers:  # each is answered 408 and closed at its deadline (1 s), well before 4 s
            data = until_closed(sock, timeout=4.0)
            assert data.startswith(b"HTTP/1.1 408 ")
    finally:
        stop.set()
        thread.join()
        for sock in tricklers:
            sock.close()


def test_a_connection_that_sends_nothing_is_closed_at_the_head_deadline(serve: Serve) -> None:
    server = serve(header_timeout=0.5)
    with connect(server) as sock:
        started = time.monotonic()
        until_closed(sock, timeout=4.0)
        assert 0.4 < time.monotonic() - started < 3.0


def test_an_idle_keep_alive_connection_is_closed_quietly_after_idle_timeout(serve: Serve) -> None:
    server = serve(idle_timeout=0.5, header_timeout=5.0)
    with connect(server) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 ")
        started = time.monotonic()
        assert until_closed(sock, timeout=4.0) == b""  # no 408 for a connection between requests
        assert 0.4 < time.monotonic() - started < 3.0


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def test_at_the_cap_the_oldest_idle_connection_is_shed(serve: Serve) -> None:
    server = serve(max_connections=3)
    kept = [connect(server) for _ in range(3)]
    for sock in kept:  # each served once, then idle between requests
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        time.sleep(0.05)  # idle since: oldest first
    try:
        data = exchange(server, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 200 ")
        assert until_closed(kept[0], timeout=2.0) == b""  # the oldest idle one made room
        kept[1].sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # the others still serve
        assert kept[1].recv(65536).startswith(b"HTTP/1.1 200 ")
    finally:
        for sock in kept:
            sock.close()


def test_at_the_cap_a_trickled_head_is_shed_before_a_newcomer_is_refused(serve: Serve) -> None:
    """Connections trickling a header (slowloris) cannot keep a real client out at the cap."""
    server = serve(max_connections=2, header_timeout=5.0)
    slow = [connect(server) for _ in range(2)]
    try:
        for sock in slow:  # a head begun, not finished
            sock.sendall(b"GET / HTTP/1.1\r\n")
            time.sleep(0.05)  # waiting since: oldest first
        assert wait_for(lambda: server.open_connections() == 2)
        data = exchange(server, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 200 ")
        assert until_closed(slow[0], timeout=2.0) == b""  # the one waiting longest made room
        slow[1].sendall(b"Host: 127.0.0.1\r\nConnection: close\r\n\r\n")  # the other is still served
        assert until_closed(slow[1]).startswith(b"HTTP/1.1 200 ")
    finally:
        for sock in slow:
            sock.close()


def test_at_the_cap_with_every_connection_answering_a_newcomer_gets_503(
    serve: Serve, upstream: Upstream
) -> None:
    upstream.files["/files/slow.bin"] = b"x" * 100
    upstream.faults["/files/slow.bin"] = Fault(delay=2.0)
    server = serve(max_connections=2, header_timeout=5.0)
    busy = [connect(server) for _ in range(2)]
    try:
        for sock in busy:  # being answered: a miss waiting for a slow upstream
            sock.sendall(b"GET /g/slow.bin HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert wait_for(lambda: server.open_connections() == 2)
        time.sleep(0.2)  # both heads read and being answered
        data = exchange(server, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert data.startswith(b"HTTP/1.1 503 Service Unavailable (too many open connections)\r\n")
        for sock in busy:  # the busy ones are answered in full
            assert until_closed(sock, timeout=10.0).startswith(b"HTTP/1.1 200 ")
    finally:
        for sock in busy:
            sock.close()


def test_a_client_that_stops_reading_is_dropped_after_send_timeout_others_are_served(
    serve: Serve, upstream: Upstream
) -> None:
    payload = bytes(range(256)) * (64 * 1024)  # 16 MiB: more than the socket buffers hold
    upstream.files["/files/big.bin"] = payload
    server = serve(send_timeout=0.5)
    request = b"GET /g/big.bin HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    assert exchange(server, request).endswith(payload[-100:])
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", port_of(server)))
    try:
        stalled.sendall(b"GET /g/big.bin HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # and never reads
        assert wait_for(lambda: server.open_connections() == 1)
        started = time.monotonic()
        data = exchange(server, b"GET /g/big.bin HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert data.partition(b"\r\n\r\n")[2] == payload and time.monotonic() - started < 3.0
        assert wait_for(lambda: server.open_connections() == 0, timeout=5.0)  # the stalled one was dropped
    finally:
        stalled.close()


def test_a_client_dropping_a_keep_alive_connection_is_not_an_error(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    server = serve()
    caplog.set_level(logging.DEBUG)
    for _ in range(3):
        sock = connect(server)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        sock.recv(65536)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # reset
        sock.close()
    assert wait_for(lambda: server.open_connections() == 0)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]


# -- the access log and metrics hooks ------------------------------------------------------
def test_each_answered_request_is_logged_once_with_its_fields(
    serve: Serve, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream.files["/files/a.bin"] = b"abc"
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(connection_module.access_log, "log_access", lambda **kw: calls.append(kw))
    server = serve()
    with connect(server) as sock:
        sock.sendall(
            b"GET /g/a.bin HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            b"GET /g/a.bin HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        until_closed(sock)
    exchange(server, b"GET /g/a.bin HTTP/1.1\r\nContent-Length: x\r\n\r\n")
    assert [(c["method"], c["target"], c["status"], c["cache"], c["key"], c["nbytes"]) for c in calls] == [
        ("GET", "/g/a.bin", 200, "miss", "g", 3),
        ("GET", "/g/a.bin", 200, "hit", "g", 3),
        ("-", "-", 400, "", "", 0),
    ]
    assert all(c["client"] == "127.0.0.1" and c["millis"] >= 0 for c in calls)


def test_connections_are_counted_in_the_engine_metrics(serve: Serve) -> None:
    class Counting:
        opened = closed = 0

        def connection_opened(self) -> None:
            self.opened += 1

        def connection_closed(self) -> None:
            self.closed += 1

    server = serve()
    counting = Counting()
    server.engine.metrics = counting  # type: ignore[attr-defined]
    for _ in range(3):
        exchange(server, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert wait_for(lambda: counting.closed == 3) and counting.opened == 3


# -- settings ----------------------------------------------------------------------------
def test_connection_limits_are_read_from_the_table(tmp_path: Path) -> None:
    table = {"header_timeout": 2, "idle_timeout": 5.5, "send_timeout": 7, "max_connections": 100}
    limits = Limits.from_settings(parse_table(table, "pyproject.toml", tmp_path))
    assert (limits.header_timeout, limits.idle_timeout, limits.send_timeout, limits.max_connections) == (
        2.0,
        5.5,
        7.0,
        100,
    )
    assert (
        Limits.from_settings(parse_table({}, "pyproject.toml", tmp_path)).max_connections
        == auto_max_connections()
    )


@pytest.mark.parametrize(
    "table",
    [
        {"header_timeout": 0},
        {"idle_timeout": -1},
        {"send_timeout": "30s"},
        {"max_connections": -1},
        {"max_connections": 1.5},
    ],
)
def test_bad_connection_limits_are_refused(tmp_path: Path, table: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=next(iter(table))):
        parse_table(table, "pyproject.toml", tmp_path)


def test_serve_flags_override_the_table(tmp_path: Path) -> None:
    from pytest_upstream.cli.main import _with_connection_limits, build_parser

    args = build_parser().parse_args(
        ["serve", "--header-timeout", "2s", "--idle-timeout", "1m", "--max-connections", "9"]
    )
    settings = _with_connection_limits(
        parse_table({"send_timeout": 7, "idle_timeout": 3}, "t", tmp_path), args
    )
    assert (
        settings.header_timeout,
        settings.idle_timeout,
        settings.send_timeout,
        settings.max_connections,
    ) == (
        2.0,
        60.0,
        7.0,
        9,
    )


@pytest.mark.parametrize(
    "argv", [["--header-timeout", "0"], ["--send-timeout", "soon"], ["--max-connections", "-2"]]
)
def test_bad_serve_limit_flags_are_refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from pytest_upstream.cli.main import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", *argv])
    assert argv[0] in capsys.readouterr().err


# -- out of file descriptors --------------------------------------------------------------------
_LOW_LIMIT_SERVER = """
import pathlib, resource, sys, tempfile
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from pytest_upstream.config.settings import Settings
from pytest_upstream.server.proxy_server import ProxyServer
settings = Settings(cache_dir=pathlib.Path(tempfile.mkdtemp()), max_connections=10_000, header_timeout=30)
with ProxyServer(settings) as server:
    print(server.base_url, flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def low_limit_server() -> Iterator[tuple[int, int]]:
    """(port, pid) of a server in a process allowed 64 open files, with no connection cap of its own."""
    import subprocess
    import sys

    proc = subprocess.Popen(
        [sys.executable, "-c", _LOW_LIMIT_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        yield int(proc.stdout.readline().strip().rsplit(":", 1)[1]), proc.pid
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_out_of_descriptors_the_server_sheds_idle_and_waiting_ones_and_does_not_spin(
    low_limit_server: tuple[int, int],
) -> None:
    port, pid = low_limit_server
    probe = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    idle = []
    for _ in range(80):  # each served, then idle: EMFILE closes the oldest idle ones to make room
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(probe)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        idle.append(sock)
    for sock in idle:
        sock.close()
    busy = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(80)]
    try:
        for sock in busy:
            sock.sendall(b"GET / HTTP/1.1\r\n")  # heads begun, never finished
        time.sleep(0.3)
        before = _cpu_seconds(pid)
        time.sleep(1.0)
        assert _cpu_seconds(pid) - before < 0.3  # backing off, not spinning on accept
        turned_away = 0  # shed (a head waited on longest is closed to make room) or told why
        for sock in busy:
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError, ConnectionResetError):
                data = sock.recv(65536)
                turned_away += data == b"" or data.startswith(
                    b"HTTP/1.1 503 Service Unavailable (out of file descriptors)"
                )
        assert turned_away >= 1
    finally:
        for sock in busy:
            sock.close()
    assert wait_for(lambda: _probe_ok(port, probe))  # and serving again once descriptors are free


def _probe_ok(port: int, probe: bytes) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(probe)
            return sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    except OSError:
        return False
