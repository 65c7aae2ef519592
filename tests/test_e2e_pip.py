"""Real pip, through the proxy, from a real PyPI-compatible server on loopback.

Record with the upstream up; then stop it and install again in replay mode
into a fresh target: once through the pytest plugin, once through
``upstream-proxy serve``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fixtures.build_wheels import DISTS

from .peers import pypiserver, serve_process
from .pip_setup import importable_in_subprocesses, installed, pip_env, pip_install, publish, pypi_project

pytestmark = pytest.mark.slow


@pytest.fixture
def packages(tmp_path: Path) -> Path:
    return publish(tmp_path / "upstream-files")


def test_pip_through_serve_then_offline_replay(tmp_path: Path, packages: Path) -> None:
    cache = tmp_path / "cache"
    with pypiserver(packages) as index_url:
        config = pypi_project(tmp_path / "pyproject.toml", index_url, cache)
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
    assert installed(tmp_path / "t1") == installed(tmp_path / "t2")
    assert (tmp_path / "t2" / "upstream_demo_a" / "__init__.py").is_file()
    assert (tmp_path / "t2" / "upstream_demo_b" / "__init__.py").is_file()


INNER_TEST = """
import os

from tests.pip_setup import pip_env, pip_install

REQUIREMENTS = ["upstream-demo-a"]
EXPECT_INSTALLED = True

def test_install(upstream_proxy, tmp_path):
    assert os.environ["PIP_INDEX_URL"] == upstream_proxy.url("local") + "simple/"
    target = tmp_path / "target"
    result = pip_install(target, *REQUIREMENTS, env=pip_env(os.environ["PIP_INDEX_URL"]))
    if not EXPECT_INSTALLED:
        return
    assert result.returncode == 0, result.stderr
    assert (target / "upstream_demo_b" / "__init__.py").is_file()
    paths = {r.path for r in upstream_proxy.test_served}
    assert "simple/upstream-demo-a/" in paths and "simple/upstream-demo-b/" in paths
    if upstream_proxy.mode == "replay":
        upstream_proxy.assert_hits("files/upstream-demo-a/*.whl", "files/upstream-demo-b/*.whl")
"""


def test_pip_through_plugin_then_offline_replay(
    pytester: pytest.Pytester, packages: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = pytester.path / "shared-cache"
    importable_in_subprocesses(monkeypatch)
    pytester.makepyfile(test_inner=INNER_TEST)
    with pypiserver(packages) as index_url:
        pypi_project(pytester.path / "pyproject.toml", index_url, cache)
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
        test_inner=INNER_TEST.replace(
            'REQUIREMENTS = ["upstream-demo-a"]', 'REQUIREMENTS = ["upstream-demo-a", "never-recorded"]'
        ).replace("EXPECT_INSTALLED = True", "EXPECT_INSTALLED = False")
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
        config = pypi_project(tmp_path / "pyproject.toml", index_url, cache)
        with serve_process(config) as base:
            for dist in DISTS:
                project = dist.name
                with urllib.request.urlopen(f"{base}/local/files/{project}/{dist.filename}") as r:
                    assert r.read() == (packages / dist.filename).read_bytes()
