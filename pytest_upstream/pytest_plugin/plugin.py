"""The ``upstream`` plugin (the ``pytest11`` entry point): the session's proxy server, its
lifetime, the ``upstream_proxy`` fixture, the report header and the summary lines.

Options and the marker are registered by ``options``, state lives in ``state``; the other hook
modules are loaded through ``pytest_plugins``.  Without ``--upstream-proxy`` (or ini
``upstream_proxy = true``) nothing here starts or imports the server; the only cost is
registering the options.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pytest_upstream.pytest_plugin.options import proxy_enabled, report_html_path, report_path
from pytest_upstream.pytest_plugin.state import (
    OUTPUT_KEY,
    PROXY,
    WORKER_REPORTS,
    all_reports,
    is_xdist_controller,
    running_proxy,
    session_proxy,
    start_at_configure,
)

if TYPE_CHECKING:
    from pytest_upstream.pytest_plugin.harness import UpstreamProxy

pytest_plugins = [
    "pytest_upstream.pytest_plugin.options",  # every option, ini value and the upstream marker
    "pytest_upstream.pytest_plugin.inprocess",  # --upstream-inprocess, upstream_inprocess fixture
    "pytest_upstream.pytest_plugin.repro",  # lock file, report, blocked network, the marker's mode
]


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    if not proxy_enabled(config):
        return
    if is_xdist_controller(config):  # each worker starts its own proxy server
        config.stash[WORKER_REPORTS] = []
        return
    start_at_configure(config)


def pytest_unconfigure(config: pytest.Config) -> None:
    proxy = running_proxy(config)
    if proxy is not None:
        proxy.stop()
        del config.stash[PROXY]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, object, object]:
    proxy = running_proxy(item.config)
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
    proxy = running_proxy(item.config)
    if proxy is not None and not proxy.server.served.current_test:
        proxy.server.served.current_test = item.nodeid


@pytest.fixture(scope="session")
def upstream_proxy(pytestconfig: pytest.Config) -> UpstreamProxy:
    """The session's proxy server: URLs per key, exported environment, what it served.

    Started on first use when ``--upstream-proxy`` was not given.
    """
    return session_proxy(pytestconfig)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    proxy = running_proxy(config)
    if proxy is not None and hasattr(config, "workeroutput"):
        report = proxy.report(
            detail=report_path(config) is not None, answers=report_html_path(config) is not None
        )
        worker = getattr(config, "workerinput", {}).get("workerid")
        config.workeroutput[OUTPUT_KEY] = {**report, "worker": worker}
    reports = all_reports(config)
    failed = any(r["replay_misses"] or r.get("blocked") for r in reports)  # blocked: the network was tried
    if failed and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_testnodedown(node: Any, error: Any) -> None:
    output = getattr(node, "workeroutput", {}).get(OUTPUT_KEY)
    if output:  # also when a worker started its proxy lazily, without the flag
        node.config.stash.setdefault(WORKER_REPORTS, []).append(output)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    reports = all_reports(config)
    if not reports or hasattr(config, "workerinput"):
        return
    from pytest_upstream.pytest_plugin.harness import summary_lines

    for line in summary_lines(reports):
        terminalreporter.write_line(line)


def pytest_report_header(config: pytest.Config) -> str | None:
    proxy = running_proxy(config)
    if proxy is None:
        return None
    lock = proxy.server.engine.settings.lock_file
    extra = (f", lock {lock}" if lock else "") + (", network blocked" if proxy.network_blocked else "")
    return f"pytest-upstream: {proxy.base_url} (mode {proxy.mode}, cache {Path(proxy.cache_dir)}{extra})"
