"""Upstream health (upstream/health.py): down after failures, doubling backoff, one probe."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pytest_upstream.config.upstream_limits import HealthLimits
from pytest_upstream.engine.clock import ManualClock
from pytest_upstream.upstream.health import Health

from .conftest import MakeProxy, proxy_def
from .peers import free_port
from .upstreams import Upstream


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_down_after_consecutive_failures_then_one_probe_with_doubling_backoff() -> None:
    clock = Clock()
    health = Health(clock, HealthLimits(failures=2, backoff=10, max_backoff=25))
    assert health.check("p") is None
    health.failed("p", "connection refused")
    assert health.check("p") is None  # one failure is not enough
    health.failed("p", "connection refused")
    down = health.check("p")
    assert down is not None and down.until == 1010.0
    assert str(down) == (
        "upstream of 'p' is marked down for 10s more after 2 failure(s) in a row (last: connection refused)"
    )
    assert health.check("other") is None  # per key
    clock.t = 1010.0
    assert health.check("p") is None  # the probe
    assert health.check("p") is not None  # only one at a time
    health.failed("p", "timed out")
    clock.t = 1015.0
    down = health.check("p")
    assert down is not None and down.until == 1030.0  # doubled
    clock.t = 1030.0
    assert health.check("p") is None
    health.failed("p", "timed out")
    assert (down := health.check("p")) is not None and down.until == 1055.0  # capped at 25
    clock.t = 1055.0
    assert health.check("p") is None
    health.succeeded("p")
    assert health.check("p") is None and health.check("p") is None
    assert health.snapshot()["p"] == (False, 0, 4)


def test_a_probe_that_never_reports_frees_the_way_after_a_backoff() -> None:
    clock = Clock()
    health = Health(clock, HealthLimits(failures=1, backoff=10))
    health.failed("p", "refused")
    clock.t += 10
    assert health.check("p") is None  # the probe goes, and its thread dies silently
    assert health.check("p") is not None
    clock.t += 10
    assert health.check("p") is None


def test_failures_zero_never_marks_down() -> None:
    health = Health(Clock(), HealthLimits(failures=0))
    for _ in range(10):
        health.failed("p", "refused")
    assert health.check("p") is None


# -- through the engine -----------------------------------------------------------------------------
def test_a_refusing_upstream_is_contacted_a_handful_of_times_in_a_minute_and_hits_keep_coming(
    make_proxy: MakeProxy,
) -> None:
    clock = ManualClock()
    with Upstream() as up:
        up.files["/cached.txt"] = b"kept"
        proxy = make_proxy(proxy_def(key="g", format="generic", url=up.url), clock=clock)
        assert fetch(proxy.url("g") + "cached.txt") == (200, b"kept")
    # the upstream is gone: its port refuses connections
    answers = []
    for _ in range(60):
        clock.advance(1)
        answers.append(fetch(proxy.url("g") + "missing.txt")[0])
        assert fetch(proxy.url("g") + "cached.txt") == (200, b"kept")
    attempts = [url for url in proxy.served.fetches if url.endswith("/missing.txt")]
    assert set(answers) <= {502, 503} and answers.count(503) >= 50
    assert 2 <= len(attempts) <= 5, attempts  # 2 to mark it down, then probes at +15 s and +45 s
    status, body = fetch(proxy.url("g") + "missing.txt")
    assert status == 503 and b"is marked down for" in body and b"failure(s) in a row" in body
    metrics = fetch(proxy.base_url + "/-/metrics")[1].decode()
    assert 'upstream_proxy_upstream_down{key="g"} 1' in metrics
    skipped = [
        line
        for line in metrics.splitlines()
        if line.startswith('upstream_proxy_upstream_skipped_total{key="g"}')
    ]
    assert skipped and int(skipped[0].split()[-1]) >= 50


def test_offline_serves_only_what_is_cached(
    upstream: Upstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    upstream.files["/a.txt"] = b"a"
    upstream.files["/b.txt"] = b"b"
    online = make_proxy(proxy_def(key="g", format="generic", url=upstream.url), cache=tmp_path / "c")
    assert fetch(online.url("g") + "a.txt") == (200, b"a")
    offline = make_proxy(
        proxy_def(key="g", format="generic", url=upstream.url, offline=True), cache=tmp_path / "c"
    )
    assert fetch(offline.url("g") + "a.txt") == (200, b"a")
    status, body = fetch(offline.url("g") + "b.txt")
    assert status == 503 and b"offline = true" in body
    assert upstream.hits["/b.txt"] == 0


def fetch(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_the_pytest_summary_names_an_upstream_marked_down(pytester: pytest.Pytester) -> None:
    port = free_port()  # nothing listens there: connections are refused
    (pytester.path / "pyproject.toml").write_text(
        "[tool.pytest-upstream]\n"
        'cache = "cache-dir"\n'
        "[[tool.pytest-upstream.proxy]]\n"
        'key = "g"\nformat = "generic"\n'
        f'url = "http://127.0.0.1:{port}/"\n'
    )
    pytester.makepyfile(
        test_x="""
import urllib.error, urllib.request

def test_x(upstream_proxy):
    for _ in range(5):
        try:
            urllib.request.urlopen(upstream_proxy.url("g") + "x.bin", timeout=10)
        except urllib.error.HTTPError as exc:
            assert exc.code in (502, 503)
"""
    )
    result = pytester.runpytest_subprocess("--upstream-proxy", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        ["*upstream of 'g' failed; marked down (down now): 3 requests not sent to it*"]
    )


def test_a_group_skips_a_member_marked_down(make_proxy: MakeProxy) -> None:
    clock = ManualClock()
    dead = f"http://127.0.0.1:{free_port()}/"  # refuses connections
    with Upstream() as live:
        for i in range(20):
            live.files[f"/f{i}.txt"] = f"file {i}".encode()
        proxy = make_proxy(
            proxy_def(key="dead", format="generic", url=dead),
            proxy_def(key="live", format="generic", url=live.url),
            groups=({"key": "g", "members": ["dead", "live"]},),
            clock=clock,
        )
        for i in range(20):
            clock.advance(0.5)
            assert fetch(proxy.url("g") + f"f{i}.txt") == (200, f"file {i}".encode())
    tried = [url for url in proxy.served.fetches if url.startswith(dead)]
    assert len(tried) == 2  # two failures mark it down; the 15 s backoff outlasts the 10 s of requests
