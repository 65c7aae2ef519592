"""The pytest face of pytest-upstream: options, the session proxy, the
``upstream_proxy`` fixture and the summary line.

Without ``--upstream-proxy`` (or ini ``upstream_proxy = true``) nothing here
starts or imports the server; the only cost is registering the options.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pytest_upstream.config.settings import MODES

if TYPE_CHECKING:
    from pytest_upstream.pytest_plugin.harness import UpstreamProxy

pytest_plugins = [
    "pytest_upstream.pytest_plugin.inprocess",  # --upstream-inprocess, upstream_inprocess fixture
    # --upstream-lock/-report/-block-network, the upstream marker's mode
    "pytest_upstream.pytest_plugin.repro",
]

_STASH: pytest.StashKey[UpstreamProxy] = pytest.StashKey()
_WORKER_STATS: pytest.StashKey[list[dict[str, Any]]] = pytest.StashKey()
_OUTPUT_KEY = "pytest_upstream"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("upstream", "upstream proxy (pytest-upstream)")
    group.addoption(
        "--upstream-proxy",
        action="store_true",
        default=None,
        dest="upstream_proxy",
        help="start the upstream proxy for the session and point clients at it",
    )
    group.addoption(
        "--upstream-cache",
        metavar="DIR",
        dest="upstream_cache",
        help="shared cache directory (env UPSTREAM_PROXY_CACHE; ini upstream_cache)",
    )
    group.addoption(
        "--upstream-mode",
        choices=MODES,
        dest="upstream_mode",
        help="record (default), replay (offline) or refresh (env UPSTREAM_PROXY_MODE)",
    )
    group.addoption(
        "--upstream-config",
        metavar="FILE",
        dest="upstream_config",
        help="file holding [tool.pytest-upstream] (default: <rootdir>/pyproject.toml)",
    )
    parser.addini("upstream_proxy", "start the upstream proxy for the session", type="bool", default=False)
    parser.addini("upstream_cache", "shared cache directory", default=None)
    parser.addini("upstream_mode", "record, replay or refresh", default=None)
    parser.addini("upstream_config", "file holding [tool.pytest-upstream]", default=None)


def _enabled(config: pytest.Config) -> bool:
    flag = config.getoption("upstream_proxy")
    return bool(flag) if flag is not None else bool(config.getini("upstream_proxy"))


def _is_xdist_controller(config: pytest.Config) -> bool:
    return config.pluginmanager.hasplugin("dsession") and not hasattr(config, "workerinput")


def _session_proxy(config: pytest.Config) -> UpstreamProxy:
    """The session's proxy, started on first use (and at session start with the flag)."""
    proxy = config.stash.get(_STASH, None)
    if proxy is None:
        from pytest_upstream.config.settings import ConfigError
        from pytest_upstream.pytest_plugin.harness import UpstreamProxy, settings_for
        from pytest_upstream.pytest_plugin.repro import after_start, lock_option
        from pytest_upstream.repro.lockfile import LockError

        ini_cache = config.getini("upstream_cache")
        if ini_cache:
            ini_cache = str(config.rootpath / ini_cache)
        ini_mode = config.getini("upstream_mode")
        config_file = config.getoption("upstream_config") or config.getini("upstream_config")
        if config_file:
            config_file = str(config.rootpath / config_file)
        settings = settings_for(
            config_file=config_file,
            search_dir=config.rootpath,
            cache=config.getoption("upstream_cache") or os.environ.get("UPSTREAM_PROXY_CACHE") or ini_cache,
            mode=config.getoption("upstream_mode") or os.environ.get("UPSTREAM_PROXY_MODE") or ini_mode,
            base_dir=config.rootpath,
            lock=lock_option(config),
        )
        try:
            proxy = UpstreamProxy.start(settings)
        except LockError as exc:  # e.g. replay with a lock file that is not there
            raise ConfigError(str(exc)) from None
        config.stash[_STASH] = proxy
        after_start(config, proxy)
    return proxy


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    if not _enabled(config):
        return
    if _is_xdist_controller(config):
        config.stash[_WORKER_STATS] = []
        return
    from pytest_upstream.config.settings import ConfigError
    from pytest_upstream.store.cache import CacheError

    try:
        _session_proxy(config)
    except (ConfigError, CacheError) as exc:
        raise pytest.UsageError(f"pytest-upstream: {exc}") from None


def pytest_unconfigure(config: pytest.Config) -> None:
    proxy = config.stash.get(_STASH, None)
    if proxy is not None:
        proxy.stop()
        del config.stash[_STASH]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, object, object]:
    proxy = item.config.stash.get(_STASH, None)
    if proxy is None:
        return (yield)
    proxy.begin_test(item.nodeid)
    try:
        return (yield)
    finally:
        proxy.end_test()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    # A proxy started lazily by the fixture did not exist when the test began.
    proxy = item.config.stash.get(_STASH, None)
    if proxy is not None and not proxy.server.served.current_test:
        proxy.server.served.current_test = item.nodeid


@pytest.fixture(scope="session")
def upstream_proxy(pytestconfig: pytest.Config) -> UpstreamProxy:
    """The session's upstream proxy: URLs, exported environment, what it served.

    Started on first use when ``--upstream-proxy`` was not given.
    """
    return _session_proxy(pytestconfig)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    proxy = config.stash.get(_STASH, None)
    if proxy is not None and hasattr(config, "workeroutput"):
        from pytest_upstream.pytest_plugin.repro import report_path

        report = proxy.report(detail=report_path(config) is not None)
        worker = getattr(config, "workerinput", {}).get("workerid")
        config.workeroutput[_OUTPUT_KEY] = {**report, "worker": worker}
    reports = _all_reports(config)
    failed = any(r["replay_misses"] or r.get("blocked") for r in reports)  # blocked: the network was tried
    if failed and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_testnodedown(node: Any, error: Any) -> None:
    output = getattr(node, "workeroutput", {}).get(_OUTPUT_KEY)
    if output:  # also when a worker started its proxy lazily, without the flag
        node.config.stash.setdefault(_WORKER_STATS, []).append(output)


def _all_reports(config: pytest.Config, detail: bool = False) -> list[dict[str, Any]]:
    if (workers := config.stash.get(_WORKER_STATS, None)) is not None:
        return workers
    proxy = config.stash.get(_STASH, None)
    return [proxy.report(detail=detail)] if proxy is not None else []


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    reports = _all_reports(config)
    if not reports or hasattr(config, "workerinput"):
        return
    from pytest_upstream.pytest_plugin.harness import summary_lines

    for line in summary_lines(reports):
        terminalreporter.write_line(line)


def pytest_report_header(config: pytest.Config) -> str | None:
    proxy = config.stash.get(_STASH, None)
    if proxy is None:
        return None
    lock = proxy.server.engine.settings.lock_file
    extra = (f", lock {lock}" if lock else "") + (", network blocked" if proxy.network_blocked else "")
    return f"upstream proxy: {proxy.base_url} (mode {proxy.mode}, cache {Path(proxy.cache_dir)}{extra})"
