"""What an operator sees: ``/-/metrics`` (read with prometheus_client's own parser), ``/-/ready``,
the access log's fields, upstream failures at WARNING, and error reasons in the status line."""

from __future__ import annotations

import http.client
import json
import logging
import shutil
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from pytest_upstream.engine.metrics import Metrics
from pytest_upstream.server.access_log import clean, log_access
from pytest_upstream.server.proxy_server import ProxyServer

from .conftest import MakeProxy, proxy_def
from .upstreams import Fault, Upstream


def get(base: str, target: str, method: str = "GET") -> tuple[int, str, dict[str, str], bytes]:
    """(status, reason phrase, headers, body) of one request on a fresh connection."""
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=20)
    try:
        conn.request(method, target)
        resp = conn.getresponse()
        return resp.status, resp.reason, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def samples(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``/-/metrics`` as prometheus_client's parser reads it."""
    parser = pytest.importorskip("prometheus_client.parser")
    status, _, headers, body = get(base, "/-/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    out = {}
    for family in parser.text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


@pytest.fixture
def served(upstream: Upstream, make_proxy: MakeProxy) -> ProxyServer:
    upstream.files["/a.bin"] = b"a" * 1000
    upstream.files["/b.bin"] = b"b" * 10
    return make_proxy(proxy_def(key="g", format="generic", url=upstream.url))


def test_metrics_parse_and_count_what_was_served(served: ProxyServer, upstream: Upstream) -> None:
    base = served.base_url
    assert get(base, "/g/a.bin")[0] == 200  # miss: 1000 bytes from upstream
    assert get(base, "/g/a.bin")[0] == 200  # hit
    assert get(base, "/g/a.bin")[0] == 200  # hit
    assert get(base, "/g/missing.bin")[0] == 404  # not found upstream
    upstream.faults["/b.bin"] = Fault(status=500)
    assert get(base, "/g/b.bin")[0] == 502  # an upstream failure
    got = samples(base)
    assert got["upstream_proxy_requests_total", (("key", "g"), ("result", "hit"))] == 2
    assert got["upstream_proxy_requests_total", (("key", "g"), ("result", "miss"))] == 2  # a.bin, the 404
    assert got["upstream_proxy_requests_total", (("key", "g"), ("result", "error"))] == 1
    assert got["upstream_proxy_bytes_total", (("key", "g"), ("source", "cache"))] == 2000
    assert got["upstream_proxy_bytes_total", (("key", "g"), ("source", "upstream"))] == 1000
    assert got["upstream_proxy_upstream_fetches_total", (("key", "g"),)] == 3
    assert got["upstream_proxy_upstream_failures_total", (("key", "g"),)] == 1
    assert got["upstream_proxy_fetches_in_flight", ()] == 0
    assert got["upstream_proxy_open_connections", ()] == 1  # the one asking
    assert got["upstream_proxy_connections_total", ()] == 6


def test_metrics_count_a_replay_miss(upstream: Upstream, make_proxy: MakeProxy) -> None:
    proxy = make_proxy(proxy_def(key="g", format="generic", url=upstream.url), mode="replay")
    status, reason, headers, body = get(proxy.base_url, "/g/never.bin")
    assert (status, reason) == (504, "Not recorded (replay mode)")
    assert headers["x-upstream-cache"] == "replay-miss"
    assert b"run in record mode" in body
    got = samples(proxy.base_url)
    assert got["upstream_proxy_requests_total", (("key", "g"), ("result", "replay_miss"))] == 1
    assert ("upstream_proxy_upstream_fetches_total", (("key", "g"),)) not in got


def test_two_engines_do_not_mix_their_metrics(upstream: Upstream, make_proxy: MakeProxy) -> None:
    upstream.files["/x"] = b"x"
    one = make_proxy(proxy_def(key="g", format="generic", url=upstream.url))
    two = make_proxy(proxy_def(key="g", format="generic", url=upstream.url))
    get(one.base_url, "/g/x")
    assert one.engine.metrics.requests("g", "miss") == 1
    assert two.engine.metrics.requests("g", "miss") == 0


def test_metrics_label_values_are_escaped() -> None:
    parser = pytest.importorskip("prometheus_client.parser")
    metrics = Metrics()
    metrics.request('we"ird\\key\n', "hit", 5)
    families = {f.name: f for f in parser.text_string_to_metric_families(metrics.exposition())}
    (sample,) = families["upstream_proxy_requests"].samples
    assert sample.labels["key"] == 'we"ird\\key\n'


def test_ready_answers_200_then_503_when_the_cache_is_unusable(served: ProxyServer) -> None:
    status, _, _, body = get(served.base_url, "/-/ready")
    assert (status, body) == (200, b"ready\n")
    shutil.rmtree(served.engine.cache.layout.tmp)
    status, reason, _, body = get(served.base_url, "/-/ready")
    assert (status, reason) == (503, "Not ready")
    assert b"is missing" in body
    assert get(served.base_url, "/-/nothing")[0] == 404
    assert get(served.base_url, "/-/metrics", method="POST")[0] == 405


@pytest.mark.parametrize(
    ("path", "fault", "status", "reason"),
    [
        ("/g/missing.bin", None, 404, "Not found upstream"),
        ("/g/b.bin", Fault(status=503), 502, "Upstream failed"),
    ],
)
def test_errors_say_why_in_the_status_line(
    served: ProxyServer, upstream: Upstream, path: str, fault: Fault | None, status: int, reason: str
) -> None:
    if fault is not None:
        upstream.faults[path.removeprefix("/g")] = fault
    assert get(served.base_url, path)[:2] == (status, reason)


def test_unknown_key_says_so_in_the_status_line(served: ProxyServer) -> None:
    assert get(served.base_url, "/nope/x")[:2] == (404, "No such upstream proxy")


def test_upstream_failure_is_a_warning_naming_url_and_error(
    served: ProxyServer, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    upstream.faults["/b.bin"] = Fault(status=500)
    with caplog.at_level(logging.WARNING, logger="pytest_upstream"):
        get(served.base_url, "/g/b.bin")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"{upstream.url}/b.bin" in m and "answered 500" in m for m in warnings), warnings


def test_access_log_line_per_request(served: ProxyServer, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="pytest_upstream.access"):
        get(served.base_url, "/g/a.bin")
        get(served.base_url, "/g/a.bin")
        get(served.base_url, "/g/a.bin", method="HEAD")
        deadline = time.monotonic() + 10  # a line is written just after its reply went out
        while len(lines := [r for r in caplog.records if r.name == "pytest_upstream.access"]) < 3:
            assert time.monotonic() < deadline, lines
            time.sleep(0.01)
    assert len(lines) == 3
    # Each line is written once its reply was sent, so two threads' lines may swap places.
    first, second, head = sorted((r.access for r in lines), key=lambda a: (a["method"], a["cache"] != "miss"))  # type: ignore[attr-defined]
    assert {k: first[k] for k in ("method", "target", "status", "cache", "key", "bytes", "client")} == {
        "method": "GET",
        "target": "/g/a.bin",
        "status": 200,
        "cache": "miss",
        "key": "g",
        "bytes": 1000,
        "client": "127.0.0.1",
    }
    assert second["cache"] == "hit" and head["bytes"] == 0
    assert isinstance(first["ms"], float) and first["ms"] >= 0
    hit_line = next(r.getMessage() for r in lines if " hit 1000B " in r.getMessage())
    assert hit_line.startswith("GET /g/a.bin 200 hit 1000B ") and hit_line.endswith(" key=g client=127.0.0.1")


def test_access_log_escapes_what_the_client_sent(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="pytest_upstream.access"):
        log_access(
            method="GET",
            target="/g/x\r\nGET /forged 200",
            status=400,
            cache="",
            key="g",
            nbytes=0,
            millis=0.5,
            client="127.0.0.1",
        )
    (record,) = caplog.records
    message = record.getMessage()
    assert "\n" not in message and "\r" not in message
    assert message.startswith("GET /g/x\\r\\nGET\\x20/forged\\x20200 400 - 0B 0.5ms key=g")
    assert len(clean("x" * 5000, 100)) == 100


def test_json_log_lines_carry_the_access_fields(tmp_path: Path) -> None:
    from pytest_upstream.cli.logs import JsonFormatter

    record = logging.LogRecord("pytest_upstream.access", logging.INFO, __file__, 1, "GET %s", ("/x",), None)
    record.access = {"method": "GET", "status": 200}
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "GET /x" and line["level"] == "INFO" and line["status"] == 200
    assert line["logger"] == "pytest_upstream.access" and "time" in line


@pytest.mark.parametrize("host", ['evil"><script>', "a b", "x:port", ""])
def test_a_bad_host_header_is_a_400_that_says_so(served: ProxyServer, host: str) -> None:
    parts = urlsplit(served.base_url)
    with socket.create_connection((parts.hostname or "", parts.port or 0), timeout=20) as sock:
        sock.sendall(f"GET /g/a.bin HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        status_line = sock.makefile("rb").readline()
    # The server's request reader refuses it before the engine's own check (an empty Host
    # is not valid for an http URI, RFC 9112 section 3.2).
    assert status_line.startswith(b"HTTP/1.1 400 ")
    assert b"bad host header" in status_line.lower()


def test_host_spellings_share_one_memoised_render(upstream: Upstream, make_proxy: MakeProxy) -> None:
    doc = {
        "name": "demo",
        "versions": {"1.0.0": {"name": "demo", "version": "1.0.0", "dist": {"tarball": "x"}}},
    }
    upstream.files["/demo"] = json.dumps(doc).encode()
    proxy = make_proxy(proxy_def(key="js", format="npm", url=upstream.url))
    port = urlsplit(proxy.base_url).port
    # (a loopback-bound proxy answers loopback names only: *.localhost is one, server/admission.py)
    for host in ("LOCALHOST", "localhost", "LocalHost", "my_proxy.localhost"):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        conn.request("GET", "/js/demo", headers={"Host": f"{host}:{port}"})
        resp = conn.getresponse()
        tarball = json.loads(resp.read())["versions"]["1.0.0"]["dist"]["tarball"]
        conn.close()
        assert tarball == f"http://{host.lower()}:{port}/js/demo/-/demo-1.0.0.tgz"
    assert len(proxy.engine.renders._memo) == 2  # localhost and my_proxy.localhost


def test_a_fetch_is_in_flight_until_its_body_is_stored(served: ProxyServer, upstream: Upstream) -> None:
    upstream.files["/slow.bin"] = b"s" * (64 * 1024 * 4)
    upstream.faults["/slow.bin"] = Fault(chunk_delay=0.2)
    metrics = served.engine.metrics
    done = threading.Event()
    thread = threading.Thread(target=lambda: (get(served.base_url, "/g/slow.bin"), done.set()))
    thread.start()
    deadline = time.monotonic() + 10
    while metrics.in_flight == 0 and not done.is_set():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    seen = metrics.in_flight
    thread.join(timeout=30)
    assert seen == 1 and metrics.in_flight == 0


@pytest.mark.parametrize(
    ("base_url", "checked"),
    [
        ("http://LocalHost:8080", "http://localhost:8080"),
        ("http://[::1]:3141", "http://[::1]:3141"),
        ('http://evil"><script>', None),
        ("http://a b", None),
        ("http://x:port", None),
        ("http://", None),
        ("ftp://host", None),
    ],
)
def test_the_engine_checks_the_host_whichever_face_asks(base_url: str, checked: str | None) -> None:
    """The engine's own check, for faces other than the server (whose reader refuses first)."""
    from pytest_upstream.engine.hosts import checked_base_url

    assert checked_base_url(base_url) == checked
