"""The pytest plugin, driven through pytester against a loopback upstream."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from pytest_upstream.pytest_plugin.harness import summary_lines

from .upstreams import Upstream


def _pyproject(path: Path, upstream_url: str, extra: str = "") -> None:
    path.write_text(
        textwrap.dedent(
            f"""
            [tool.pytest-upstream]
            cache = "cache-dir"
            {extra}
            [[tool.pytest-upstream.proxy]]
            key = "g"
            source = "custom"
            format = "generic"
            url = "{upstream_url}/files"
            mutable_paths = ["*.json"]
            """
        )
    )


INNER = """
import urllib.request, pytest

def get(upstream_proxy, name):
    with urllib.request.urlopen(upstream_proxy.url("g") + name) as r:
        return r.read()

@pytest.mark.parametrize("n", range(4))
def test_fetch(upstream_proxy, n):
    assert get(upstream_proxy, "a.bin") == b"A" * 1000
    assert get(upstream_proxy, f"f{n}.bin") == b"%d" % n * 100
    assert [r.path for r in upstream_proxy.test_served] == ["a.bin", f"f{n}.bin"]
"""


@pytest.fixture
def files_upstream(upstream: Upstream) -> Upstream:
    upstream.files["/files/a.bin"] = b"A" * 1000
    for n in range(4):
        upstream.files[f"/files/f{n}.bin"] = b"%d" % n * 100
    upstream.files["/files/meta.json"] = b'{"v": 1}'
    return upstream


def test_xdist_workers_share_the_cache_and_the_summary_adds_up(
    pytester: pytest.Pytester, files_upstream: Upstream
) -> None:
    _pyproject(pytester.path / "pyproject.toml", files_upstream.url)
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess("--upstream-proxy", "-n", "2", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
    # 8 requests in all; a.bin was fetched from the upstream exactly once across both workers
    result.stdout.re_match_lines(
        [r"pytest-upstream \(record, .*\) across 2 workers: 8 requests, 3 hits, 5 misses"]
    )
    assert files_upstream.hits["/files/a.bin"] == 1
    assert all(files_upstream.hits[f"/files/f{n}.bin"] == 1 for n in range(4))
    # a second run is all hits, and the upstream is not contacted again
    again = pytester.runpytest_subprocess("--upstream-proxy", "-n", "2", "-p", "no:cacheprovider")
    again.assert_outcomes(passed=4)
    again.stdout.re_match_lines([r".* across 2 workers: 8 requests, 8 hits, 0 misses"])
    assert files_upstream.hits["/files/a.bin"] == 1


def test_replay_offline_after_record(pytester: pytest.Pytester, files_upstream: Upstream) -> None:
    _pyproject(pytester.path / "pyproject.toml", files_upstream.url)
    pytester.makepyfile(test_inner=INNER)
    pytester.runpytest_subprocess("--upstream-proxy", "-p", "no:cacheprovider").assert_outcomes(passed=4)
    files_upstream.stop()
    replay = pytester.runpytest_subprocess(
        "--upstream-proxy", "--upstream-mode=replay", "-p", "no:cacheprovider"
    )
    replay.assert_outcomes(passed=4)
    assert replay.ret == 0
    replay.stdout.re_match_lines([r"pytest-upstream \(replay, .*: 8 requests, 8 hits, 0 misses, 0 stale"])
    # the header names the server, its mode and cache, and that replay blocked the network
    replay.stdout.fnmatch_lines(
        ["pytest-upstream: http://127.0.0.1:* (mode replay, cache *cache-dir, network blocked)"]
    )


HELPERS = """
import urllib.request, urllib.error, pytest

def get(upstream_proxy, name):
    with urllib.request.urlopen(upstream_proxy.url("g") + name) as r:
        return r.read(), r.headers["X-Upstream-Cache"]

def test_assert_hits_and_no_upstream(upstream_proxy):
    assert get(upstream_proxy, "a.bin")[1] == "miss"
    with pytest.raises(AssertionError, match="a.bin was a miss"):
        upstream_proxy.assert_hits("a.bin")
    with pytest.raises(AssertionError, match="'nothing' was not served"):
        upstream_proxy.assert_hits("nothing")
    with upstream_proxy.no_upstream_requests():
        assert get(upstream_proxy, "a.bin") == (b"A" * 1000, "hit")
    with pytest.raises(AssertionError, match="upstream requests were made: .*/files/f1.bin"):
        with upstream_proxy.no_upstream_requests():
            get(upstream_proxy, "f1.bin")
    upstream_proxy.assert_hits("a.bin", records=upstream_proxy.test_served[1:2])

def test_per_test_view_and_session_view(upstream_proxy):
    assert upstream_proxy.test_served == []
    get(upstream_proxy, "a.bin")
    upstream_proxy.assert_hits("a.bin")
    assert [r.cache for r in upstream_proxy.test_served] == ["hit"]
    assert len(upstream_proxy.served) == 4
    rec = upstream_proxy.test_served[0]
    assert (rec.key, rec.path, rec.status, rec.size) == ("g", "a.bin", 200, 1000)
    assert rec.test.endswith("test_per_test_view_and_session_view")

def test_env_and_urls(upstream_proxy):
    import os
    env = upstream_proxy.env()
    assert env["UPSTREAM_PROXY_URL"] == upstream_proxy.base_url == os.environ["UPSTREAM_PROXY_URL"]
    assert "PIP_INDEX_URL" not in env  # no pypi-format proxy configured
    with pytest.raises(KeyError, match="no upstream proxy with key 'nope'"):
        upstream_proxy.url("nope")

def test_unknown_key_is_404(upstream_proxy):
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(upstream_proxy.base_url + "/nope/x")
    assert info.value.code == 404
"""


def test_fixture_helpers(pytester: pytest.Pytester, files_upstream: Upstream) -> None:
    _pyproject(pytester.path / "pyproject.toml", files_upstream.url)
    pytester.makepyfile(test_helpers=HELPERS)
    result = pytester.runpytest_subprocess("--upstream-proxy", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)


def test_cli_flags_override_ini_and_env_overrides_ini(
    pytester: pytest.Pytester, files_upstream: Upstream
) -> None:
    _pyproject(pytester.path / "pyproject.toml", files_upstream.url)
    pytester.makeini("[pytest]\nupstream_proxy = true\nupstream_cache = ini-cache\nupstream_mode = replay\n")
    pytester.makepyfile(
        test_where="""
        def test_where(upstream_proxy, pytestconfig):
            print("MODE", upstream_proxy.mode, "CACHE", upstream_proxy.cache_dir.name)
        """
    )
    ini = pytester.runpytest_subprocess("-s", "-p", "no:cacheprovider")
    ini.stdout.fnmatch_lines(["*MODE replay CACHE ini-cache*"])
    cli = pytester.runpytest_subprocess(
        "-s",
        "-p",
        "no:cacheprovider",
        "--upstream-mode",
        "refresh",
        "--upstream-cache",
        str(pytester.path / "cli"),
    )
    cli.stdout.fnmatch_lines(["*MODE refresh CACHE cli*"])


def test_without_the_flag_nothing_starts(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_cost="""
        import sys, threading
        def test_nothing_loaded():
            assert "pytest_upstream.server.proxy_server" not in sys.modules
            assert "httpx" not in sys.modules
            assert not [t for t in threading.enumerate() if t.name == "pytest-upstream"]
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:respx", "-p", "no:httpx")
    result.assert_outcomes(passed=1)
    assert "pytest-upstream" not in result.stdout.str()


def test_bad_config_is_a_usage_error(pytester: pytest.Pytester) -> None:
    (pytester.path / "pyproject.toml").write_text(
        '[tool.pytest-upstream]\n[[tool.pytest-upstream.proxy]]\nkey = "Bad Key"\nsource = "pypi"\n'
    )
    pytester.makepyfile(test_x="def test_x(): pass")
    result = pytester.runpytest_subprocess("--upstream-proxy", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*pyproject.toml*entry 1*invalid upstream proxy key 'Bad Key'*"])
    assert "Traceback" not in result.stderr.str()


def test_lazy_start_without_the_flag_under_xdist(pytester: pytest.Pytester, files_upstream: Upstream) -> None:
    """The fixture starts the proxy on first use; records carry the test, the summary adds up workers."""
    _pyproject(pytester.path / "pyproject.toml", files_upstream.url)
    pytester.makepyfile(
        test_lazy="""
        import urllib.request, pytest

        @pytest.mark.parametrize("n", range(2))
        def test_lazy(upstream_proxy, n):
            urllib.request.urlopen(upstream_proxy.url("g") + "a.bin").read()
            assert upstream_proxy.served[-1].test.endswith(f"test_lazy[{n}]")
        """
    )
    result = pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    result.stdout.re_match_lines([r"pytest-upstream \(record, .*\)( across 2 workers)?: 2 requests"])


def test_options_and_the_marker_are_registered_once(pytester: pytest.Pytester) -> None:
    """One module registers them (pytest_plugin/options.py): a second registration of an option
    would be a startup error, a second marker line a duplicate in ``--markers``."""
    markers = pytester.runpytest_subprocess("--markers", "-p", "no:cacheprovider")
    lines = [line for line in markers.stdout.lines if line.startswith("@pytest.mark.upstream(")]
    assert len(lines) == 1, lines
    assert all(word in lines[0] for word in ("mode=", "proxies=", "inprocess="))
    usage = pytester.runpytest_subprocess("--help", "-p", "no:cacheprovider").stdout.str()
    for option in ("--upstream-proxy", "--upstream-inprocess", "--upstream-lock", "--upstream-block-network"):
        assert len(re.findall(rf"^  {option}\b", usage, re.MULTILINE)) == 1, option


def test_the_summary_agrees_in_number_and_prints_sizes_one_way() -> None:
    one = {"requests": 1, "hits": 1, "misses": 1, "stale": 0, "errors": 1, "not_found": 0}
    report = {
        "mode": "record",
        "cache_dir": "/c",
        "stats": {**one, "bytes_upstream": 249856, "bytes_cache": 512, "upstream_fetches": 1},
        "replay_misses": [],
        "misses_by_test": {"t.py::test_a": 1, "t.py::test_b": 2},
    }
    lines = summary_lines([report])
    assert lines[0] == (
        "pytest-upstream (record, cache /c): 1 request, 1 hit, 1 miss, 0 stale, "
        "244.0 KiB from upstream, 512 B from cache, 1 error, 0 not found"
    )
    assert lines[1:] == [
        "tests that needed the network (2):",
        "  t.py::test_a: 1 miss",
        "  t.py::test_b: 2 misses",
    ]
    two = summary_lines([report, report])[0]
    assert "across 2 workers: 2 requests, 2 hits, 2 misses, 0 stale, 488.0 KiB from upstream" in two
