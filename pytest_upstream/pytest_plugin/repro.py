"""The pytest face of reproducible builds (docs/reproducible-builds.md).

Loaded with the ``upstream`` plugin (its ``pytest_plugins``):

* ``--upstream-lock FILE``: a record or refresh session writes the lock at the
  end (combined over xdist workers); a replay serves exactly what it names;
* ``@pytest.mark.upstream(mode=..., proxies=[...])``: a test's own mode, and
  the only keys it may use (others answer 403);
* ``--upstream-report FILE``: what each test used, as JSON;
* ``--upstream-block-network`` (on by default in replay mode; off with
  ``--upstream-allow-network``): no connections but to loopback.

Like the main plugin, this imports nothing beyond pytest until it is used.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from pytest_upstream.pytest_plugin.harness import UpstreamProxy
    from pytest_upstream.repro.netguard import NetworkGuard

MARKER = "upstream"
_BARE_GUARD: pytest.StashKey[NetworkGuard] = pytest.StashKey()
_SCOPED: pytest.StashKey[bool] = pytest.StashKey()  # item -> this test blocked the network itself
_LOCK_NOTE: pytest.StashKey[str] = pytest.StashKey()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("upstream", "upstream proxy (pytest-upstream)")
    group.addoption(
        "--upstream-lock",
        metavar="FILE",
        dest="upstream_lock",
        help="lock file: record/refresh write it, replay serves exactly what it names "
        "(ini upstream_lock; table: lock)",
    )
    group.addoption(
        "--upstream-report",
        metavar="FILE",
        dest="upstream_report",
        help="write what each test used (JSON) to FILE (ini upstream_report)",
    )
    group.addoption(
        "--upstream-block-network",
        action="store_true",
        default=None,
        dest="upstream_block_network",
        help="fail any connection to a host other than loopback (default: on in replay mode)",
    )
    group.addoption(
        "--upstream-allow-network",
        action="store_false",
        dest="upstream_block_network",
        help="do not block the network, not even in replay mode",
    )
    parser.addini("upstream_lock", "lock file (record/refresh write it, replay serves it)", default=None)
    parser.addini("upstream_report", "write what each test used (JSON) to this file", default=None)
    parser.addini(
        "upstream_block_network",
        "block connections to hosts other than loopback (default: only in replay mode)",
        type="bool",
        default=None,
    )


def _rooted(config: pytest.Config, value: str | None) -> str | None:
    return str(config.rootpath / value) if value else None


def lock_option(config: pytest.Config) -> str | None:
    """``--upstream-lock``, else ini ``upstream_lock`` (relative to the rootdir), else None (the table's)."""
    return _rooted(config, config.getoption("upstream_lock", None) or config.getini("upstream_lock"))


def report_path(config: pytest.Config) -> Path | None:
    value = _rooted(config, config.getoption("upstream_report", None) or config.getini("upstream_report"))
    return Path(value) if value else None


def block_setting(config: pytest.Config) -> bool | None:
    """True or False when asked for; None: block in replay mode only."""
    flag = config.getoption("upstream_block_network", None)
    if flag is not None:
        return bool(flag)
    ini = config.getini("upstream_block_network")
    return None if ini is None else bool(ini)


def after_start(config: pytest.Config, proxy: UpstreamProxy) -> None:
    """Called by the main plugin once the session's proxy runs."""
    bare = config.stash.get(_BARE_GUARD, None)
    if bare is not None:  # the proxy's guard (exempting its own threads) takes over
        bare.uninstall()
        del config.stash[_BARE_GUARD]
    block = block_setting(config)
    if block or (block is None and proxy.session_mode == "replay"):
        proxy.block_network()


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(mode=None, proxies=None): run this test (or module) in mode record, replay or refresh, "
        "and/or let it use only the upstream proxies with these keys (others answer 403)",
    )
    import pytest_upstream.pytest_plugin.plugin as plugin

    started = config.stash.get(plugin._STASH, None) is not None  # e.g. by --upstream-inprocess
    if block_setting(config) and not started and not plugin._enabled(config):
        if plugin._is_xdist_controller(config):
            return  # the workers run the tests
        from pytest_upstream.repro.netguard import NetworkGuard

        guard = NetworkGuard()  # no proxy (yet): block this process's own connections
        guard.install()
        config.stash[_BARE_GUARD] = guard


def pytest_unconfigure(config: pytest.Config) -> None:
    guard = config.stash.get(_BARE_GUARD, None)
    if guard is not None:
        guard.uninstall()
        del config.stash[_BARE_GUARD]


# -- per test: the marker ---------------------------------------------------------
def _marker_value(item: pytest.Item, name: str) -> Any:
    """The closest ``upstream`` marker (test, class, module) that sets ``name``."""
    return next((m.kwargs[name] for m in item.iter_markers(MARKER) if name in m.kwargs), None)


def _begin_scope(item: pytest.Item) -> None:
    import pytest_upstream.pytest_plugin.plugin as plugin

    proxy = item.config.stash.get(plugin._STASH, None)
    if proxy is None or _SCOPED in item.stash:
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
    item.stash[_SCOPED] = blocks_here


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
        if _SCOPED in item.stash:
            import pytest_upstream.pytest_plugin.plugin as plugin

            proxy = item.config.stash.get(plugin._STASH, None)
            if proxy is not None:
                proxy.clear_test_scope()
                if item.stash[_SCOPED]:
                    proxy.unblock_network()
            del item.stash[_SCOPED]


# -- at the end: the lock file and the report -------------------------------------
@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    if hasattr(config, "workerinput"):
        return  # the controller writes, from every worker's report
    import pytest_upstream.pytest_plugin.plugin as plugin

    reports = plugin._all_reports(config, detail=report_path(config) is not None)
    if not reports:
        return
    lock_files = sorted({r["lock_file"] for r in reports if r.get("lock_file")})
    interrupted = session.exitstatus in (pytest.ExitCode.INTERRUPTED, pytest.ExitCode.INTERNAL_ERROR)
    if lock_files and not interrupted:
        from pytest_upstream.repro.lock_tools import combined_lock, write_lock

        config.stash[_LOCK_NOTE] = "upstream lock written: " + write_lock(
            Path(lock_files[0]), combined_lock(reports)
        )
    if (path := report_path(config)) is not None:
        from pytest_upstream.repro.report import combine_usage, write_report

        write_report(path, reports[0]["mode"], combine_usage(r.get("tests", {}) for r in reports))


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if (note := config.stash.get(_LOCK_NOTE, None)) is not None:
        terminalreporter.write_line(note)
