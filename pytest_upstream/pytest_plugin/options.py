"""Every option, ini value and the ``upstream`` marker of the plugin, registered here once, and
the functions that read them back.

Loaded with the ``upstream`` plugin (its ``pytest_plugins``).  One place, so that two modules
cannot register the same group, option or marker line twice, and so that a reader of an option
lives next to its definition.  Imports nothing beyond pytest and the small config module.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest

from pytest_upstream.config.s3_location import is_s3_url
from pytest_upstream.config.settings import ENV_MAX_SIZE, MODES

MARKER = "upstream"
MARKER_HELP = (
    f"{MARKER}(mode=None, proxies=None, inprocess=None): run this test (or module) in mode record, "
    "replay or refresh; let it use only the upstream proxies with these keys (others answer 403); "
    "inprocess=True routes its own requests/httpx/urllib calls through the proxy server "
    "(inprocess=False: not even under --upstream-inprocess)"
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("upstream", "pytest-upstream (pull-through cache for registries)")
    group.addoption(
        "--upstream-proxy",
        action="store_true",
        default=None,
        dest="upstream_proxy",
        help="start the proxy server for the session and point clients at it",
    )
    group.addoption(
        "--upstream-cache",
        metavar="DIR",
        dest="upstream_cache",
        help="shared cache: a directory or s3://BUCKET/PREFIX (env UPSTREAM_PROXY_CACHE; ini upstream_cache)",
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
    group.addoption(
        "--upstream-inprocess",
        action="store_true",
        default=None,
        dest="upstream_inprocess",
        help="route this process's own requests/httpx/urllib calls to configured upstreams "
        "through the proxy server (starts it; ini upstream_inprocess)",
    )
    group.addoption(
        "--upstream-lock",
        metavar="FILE",
        dest="upstream_lock",
        help="lock file: record/refresh write it, replay serves exactly what it names "
        "(ini upstream_lock; table: lock)",
    )
    group.addoption(
        "--upstream-max-size",
        metavar="SIZE",
        dest="upstream_max_size",
        help="keep the cache's blobs under SIZE while the proxy serves, least recently used out first "
        "(10G; 0: no cap; env UPSTREAM_PROXY_MAX_SIZE; ini upstream_max_size; table: max_size)",
    )
    group.addoption(
        "--upstream-capture",
        action="store_true",
        default=None,
        dest="upstream_capture",
        help="also be an HTTP(S) forward proxy: export HTTP(S)_PROXY and the cache's CA to every "
        "client, and cache what they fetch (ini upstream_capture; table: capture; docs/capture.md)",
    )
    group.addoption(
        "--upstream-report",
        metavar="FILE",
        dest="upstream_report",
        help="write what each test used (JSON) to FILE (ini upstream_report)",
    )
    group.addoption(
        "--upstream-report-html",
        metavar="FILE",
        dest="upstream_report_html",
        help="write a page of what each test downloaded, totals, the slowest and biggest downloads "
        "and a timeline (one self-contained HTML file) to FILE (ini upstream_report_html)",
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
    parser.addini("upstream_proxy", "start the proxy server for the session", type="bool", default=False)
    parser.addini("upstream_cache", "shared cache directory", default=None)
    parser.addini("upstream_mode", "record, replay or refresh", default=None)
    parser.addini("upstream_config", "file holding [tool.pytest-upstream]", default=None)
    parser.addini(
        "upstream_inprocess",
        "route the test process's own HTTP clients through the proxy server",
        type="bool",
        default=False,
    )
    parser.addini("upstream_lock", "lock file (record/refresh write it, replay serves it)", default=None)
    parser.addini("upstream_max_size", "cap on the cache's size while the proxy serves (10G)", default=None)
    parser.addini(
        "upstream_capture",
        "capture every client's downloads (HTTP(S)_PROXY and a CA)",
        type="bool",
        default=None,
    )
    parser.addini("upstream_report", "write what each test used (JSON) to this file", default=None)
    parser.addini(
        "upstream_report_html", "write a page of what each test downloaded (HTML) to this file", default=None
    )
    parser.addini(
        "upstream_block_network",
        "block connections to hosts other than loopback (default: only in replay mode)",
        type="bool",
        default=None,
    )


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)


def _rooted(config: pytest.Config, value: str | None) -> str | None:
    return str(config.rootpath / value) if value else None


def proxy_enabled(config: pytest.Config) -> bool:
    """``--upstream-proxy``, else ini ``upstream_proxy``: start the server at session start."""
    flag = config.getoption("upstream_proxy")
    return bool(flag) if flag is not None else bool(config.getini("upstream_proxy"))


def inprocess_enabled(config: pytest.Config) -> bool:
    flag = config.getoption("upstream_inprocess", None)
    return bool(flag) if flag is not None else bool(config.getini("upstream_inprocess"))


def cache_option(config: pytest.Config, environ: Mapping[str, str]) -> str | None:
    """``--upstream-cache``, else env ``UPSTREAM_PROXY_CACHE``, else ini (relative to the rootdir)."""
    return (
        config.getoption("upstream_cache")
        or environ.get("UPSTREAM_PROXY_CACHE")
        or _rooted_cache(config, config.getini("upstream_cache"))
    )


def _rooted_cache(config: pytest.Config, value: str | None) -> str | None:
    """An ini cache: a directory relative to the rootdir, or an ``s3://`` location as it is."""
    return value if value and is_s3_url(value) else _rooted(config, value)


def mode_option(config: pytest.Config, environ: Mapping[str, str]) -> str | None:
    """``--upstream-mode``, else env ``UPSTREAM_PROXY_MODE``, else ini ``upstream_mode``."""
    mode: str | None = (
        config.getoption("upstream_mode")
        or environ.get("UPSTREAM_PROXY_MODE")
        or config.getini("upstream_mode")
    )
    return mode


def max_size_option(config: pytest.Config, environ: Mapping[str, str]) -> str | None:
    """``--upstream-max-size``, else env ``UPSTREAM_PROXY_MAX_SIZE``, else ini ``upstream_max_size``
    (None: the table's ``max_size``)."""
    size: str | None = (
        config.getoption("upstream_max_size", None)
        or environ.get(ENV_MAX_SIZE)
        or config.getini("upstream_max_size")
    )
    return size


def capture_option(config: pytest.Config) -> bool | None:
    """``--upstream-capture``, else ini ``upstream_capture``; None: the table's ``capture``."""
    flag = config.getoption("upstream_capture", None)
    if flag is not None:
        return bool(flag)
    ini = config.getini("upstream_capture")
    return None if ini is None else bool(ini)


def config_file_option(config: pytest.Config) -> str | None:
    """``--upstream-config``, else ini ``upstream_config`` (relative to the rootdir), else None."""
    return _rooted(config, config.getoption("upstream_config") or config.getini("upstream_config"))


def lock_option(config: pytest.Config) -> str | None:
    """``--upstream-lock``, else ini ``upstream_lock`` (relative to the rootdir), else None (the table's)."""
    return _rooted(config, config.getoption("upstream_lock", None) or config.getini("upstream_lock"))


def report_path(config: pytest.Config) -> Path | None:
    value = _rooted(config, config.getoption("upstream_report", None) or config.getini("upstream_report"))
    return Path(value) if value else None


def report_html_path(config: pytest.Config) -> Path | None:
    """``--upstream-report-html``, else ini ``upstream_report_html`` (relative to the rootdir)."""
    value = _rooted(
        config, config.getoption("upstream_report_html", None) or config.getini("upstream_report_html")
    )
    return Path(value) if value else None


def block_setting(config: pytest.Config) -> bool | None:
    """True or False when asked for; None: block in replay mode only."""
    flag = config.getoption("upstream_block_network", None)
    if flag is not None:
        return bool(flag)
    ini = config.getini("upstream_block_network")
    return None if ini is None else bool(ini)
