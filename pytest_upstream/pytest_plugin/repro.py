"""The pytest face of reproducible builds (docs/reproducible-builds.md).

Loaded with the ``upstream`` plugin (its ``pytest_plugins``):

* ``--upstream-lock FILE``: a record or refresh session writes the lock at the
  end (combined over xdist workers); a replay serves exactly what it names;
* ``@pytest.mark.upstream(mode=..., proxies=[...])``: a test's own mode, and
  the only keys it may use (others answer 403);
* ``--upstream-report FILE``: what each test used, as JSON;
* ``--upstream-report-html FILE``: the same session on one page, with timings and a timeline;
* ``--upstream-block-network`` (on by default in replay mode; off with
  ``--upstream-allow-network``): no connections but to loopback.

Its options and the marker are registered by ``options``; the stash keys live in ``state``.
Like the main plugin, this imports nothing beyond pytest until it is used.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

from pytest_upstream.pytest_plugin.options import (
    MARKER,
    block_setting,
    proxy_enabled,
    report_html_path,
    report_path,
)
from pytest_upstream.pytest_plugin.state import (
    BARE_GUARD,
    LOCK_NOTE,
    SCOPED,
    all_reports,
    is_xdist_controller,
    running_proxy,
)


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    started = running_proxy(config) is not None  # e.g. by --upstream-inprocess
    if block_setting(config) and not started and not proxy_enabled(config):
        if is_xdist_controller(config):
            return  # the workers run the tests
        from pytest_upstream.repro.netguard import NetworkGuard

        guard = NetworkGuard()  # no proxy (yet): block this process's own connections
        guard.install()
        config.stash[BARE_GUARD] = guard


def pytest_unconfigure(config: pytest.Config) -> None:
    guard = config.stash.get(BARE_GUARD, None)
    if guard is not None:
        guard.uninstall()
        del config.stash[BARE_GUARD]


# -- per test: the marker ---------------------------------------------------------
def _marker_value(item: pytest.Item, name: str) -> Any:
    """The closest ``upstream`` marker (test, class, module) that sets ``name``."""
    return next((m.kwargs[name] for m in item.iter_markers(MARKER) if name in m.kwargs), None)


def _begin_scope(item: pytest.Item) -> None:
    proxy = running_proxy(item.config)
    if proxy is None or SCOPED in item.stash:
        return
    mode, proxies = _marker_value(item, "mode"), _marker_value(item, "proxies")
    if mode is None and proxies is None:
        return
    if isinstance(proxies, str):
        proxies = [proxies]
    try:
        proxy.set_test_scope(mode=mode, proxies=proxies)
        problem = ""
    except (KeyError, ValueError) as exc:
        problem = str(exc.args[0] if exc.args else exc)
    if problem:
        pytest.fail(f"@pytest.mark.{MARKER}: {problem}", pytrace=False)
    blocks_here = (
        proxy.mode == "replay" and not proxy.network_blocked and block_setting(item.config) is not False
    )
    if blocks_here:
        proxy.block_network()
    item.stash[SCOPED] = blocks_here


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _begin_scope(item)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    _begin_scope(item)  # a proxy started lazily by the fixture did not exist at setup


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, object, object]:
    try:
        return (yield)
    finally:
        if SCOPED in item.stash:
            proxy = running_proxy(item.config)
            if proxy is not None:
                proxy.clear_test_scope()
                if item.stash[SCOPED]:
                    proxy.unblock_network()
            del item.stash[SCOPED]


# -- at the end: the lock file and the report -------------------------------------
@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    if hasattr(config, "workerinput"):
        return  # the controller writes, from every worker's report
    html_path = report_html_path(config)
    reports = all_reports(config, detail=report_path(config) is not None, answers=html_path is not None)
    if not reports:
        return
    lock_files = sorted({r["lock_file"] for r in reports if r.get("lock_file")})
    interrupted = session.exitstatus in (pytest.ExitCode.INTERRUPTED, pytest.ExitCode.INTERNAL_ERROR)
    if lock_files and not interrupted:
        from pytest_upstream.repro.lock_tools import combined_lock, write_lock

        config.stash[LOCK_NOTE] = "lock file written: " + write_lock(
            Path(lock_files[0]), combined_lock(reports)
        )
    if (path := report_path(config)) is not None:
        from pytest_upstream.repro.report import combine_usage, write_report

        write_report(path, reports[0]["mode"], combine_usage(r.get("tests", {}) for r in reports))
    if html_path is not None:
        from pytest_upstream.repro.html_report import build, write_html_report

        rows = [row for r in reports for row in r.get("answers", [])]
        write_html_report(html_path, build(reports[0]["mode"], rows, workers=len(reports)))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if (note := config.stash.get(LOCK_NOTE, None)) is not None:
        terminalreporter.write_line(note)
