"""Real pip, through the proxy, from a real PyPI-compatible server on loopback.

Record with the upstream up; then stop it and install again in replay mode
into a fresh target: once through the pytest plugin, once through
``upstream-proxy serve``.
"""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

import pytest

from fixtures.build_wheels import DISTS, write_files

from .peers import pip_env, pip_install, pypiserver, serve_process

pytestmark = pytest.mark.slow


@pytest.fixture
def packages(tmp_path: Path) -> Path:
    out = tmp_path / "upstream-files"
    write_files(out)
    for meta in (out / "files").glob("*.metadata"):
        meta.unlink()  # pypiserver serves wheels only
    return out / "files"


def _config(path: Path, index_url: str, cache: Path) -> Path:
    path.write_text(
        textwrap.dedent(
            f"""
            [tool.pytest-upstream]
            cache = "{cache}"

            [[tool.pytest-upstream.proxy]]
            key = "local"
            source = "custom"
            format = "pypi"
            url = "{index_url}"
            """
        )
    )
    return path


def _installed(target: Path) -> dict[str, str]:
    return {
        str(p.relative_to(target)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(target.rglob("*.py"))
        if "dist-info" not in str(p)
    }


def test_pip_through_serve_then_offline_replay(tmp_path: Path, packages: Path) -> None:
    cache = tmp_path / "cache"
    with pypiserver(packages) as index_url:
        config = _config(tmp_path / "pyproject.toml", index_url, cache)
        with serve_process(config) as base:
            result = pip_install(tmp_path / "t1", "upstream-demo-a", env=pip_env(f"{base}/local/simple/"))
            assert result.returncode == 0, result.stderr
            assert "upstream-demo-b" in result.stdout  # the dependency came through the proxy too
    # upstream stopped: a fresh target installs the same files offline
    with serve_process(config, "--mode", "replay") as base:
        result = pip_install(tmp_path / "t2", "upstream-demo-a", env=pip_env(f"{base}/local/simple/"))
        assert result.returncode == 0, result.stderr
        missing = pip_install(tmp_path / "t3", "not-recorded-pkg", env=pip_env(f"{base}/local/simple/"))
        assert missing.returncode != 0
    assert _installed(tmp_path / "t1") == _installed(tmp_path / "t2")
    assert (tmp_path / "t2" / "upstream_demo_a" / "__init__.py").is_file()
    assert (tmp_path / "t2" / "upstream_demo_b" / "__init__.py").is_file()


INNER_TEST = """
import os, subprocess, sys
from pathlib import Path

def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") or k == "PIP_INDEX_URL"}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_NO_CACHE_DIR"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env

def test_install(upstream_proxy, tmp_path):
    assert os.environ["PIP_INDEX_URL"] == upstream_proxy.url("local") + "simple/"
    target = tmp_path / "target"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-compile", "--target", str(target), "upstream-demo-a"],
        env=_env(), capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert (target / "upstream_demo_b" / "__init__.py").is_file()
    paths = {r.path for r in upstream_proxy.test_served}
    assert "simple/upstream-demo-a/" in paths and "simple/upstream-demo-b/" in paths
    if upstream_proxy.mode == "replay":
        upstream_proxy.assert_hits("files/upstream-demo-a/*.whl", "files/upstream-demo-b/*.whl")
"""


def test_pip_through_plugin_then_offline_replay(pytester: pytest.Pytester, packages: Path) -> None:
    cache = pytester.path / "shared-cache"
    pytester.makepyfile(test_inner=INNER_TEST)
    with pypiserver(packages) as index_url:
        _config(pytester.path / "pyproject.toml", index_url, cache)
        recorded = pytester.runpytest_subprocess("--upstream-proxy", "-p", "no:cacheprovider")
        recorded.assert_outcomes(passed=1)
        recorded.stdout.re_match_lines(
            [r"pytest-upstream \(record, .*: \d+ requests, 0 hits, [1-9]\d* misses"]
        )
    replayed = pytester.runpytest_subprocess(
        "--upstream-proxy", "--upstream-mode", "replay", "-p", "no:cacheprovider"
    )
    replayed.assert_outcomes(passed=1)
    replayed.stdout.re_match_lines([r"pytest-upstream \(replay, .*: \d+ requests, \d+ hits, 0 misses"])

    # a test that needs something not recorded fails the run and is listed
    pytester.makepyfile(
        test_inner=INNER_TEST.replace('"upstream-demo-a"]', '"upstream-demo-a", "never-recorded"]')
        .replace("assert result.returncode == 0, result.stderr", "pass")
        .replace('assert (target / "upstream_demo_b" / "__init__.py").is_file()', "")
        .replace(
            'upstream_proxy.assert_hits("files/upstream-demo-a/*.whl", "files/upstream-demo-b/*.whl")', "pass"
        )
    )
    failed = pytester.runpytest_subprocess(
        "--upstream-proxy", "--upstream-mode", "replay", "-p", "no:cacheprovider"
    )
    assert failed.ret == pytest.ExitCode.TESTS_FAILED
    failed.stdout.fnmatch_lines(["replay misses*", "*test_inner.py::test_install: local *never-recorded*"])


def test_wheel_bytes_through_proxy_equal_upstream(tmp_path: Path, packages: Path) -> None:
    import urllib.request

    cache = tmp_path / "cache"
    with pypiserver(packages) as index_url:
        config = _config(tmp_path / "pyproject.toml", index_url, cache)
        with serve_process(config) as base:
            for dist in DISTS:
                project = dist.name
                with urllib.request.urlopen(f"{base}/local/files/{project}/{dist.filename}") as r:
                    assert r.read() == (packages / dist.filename).read_bytes()
