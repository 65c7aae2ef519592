"""The plugin's state: every stash key, and the session's proxy server.

The hook modules (``plugin``, ``inprocess``, ``repro``) each read and write this state; keeping
it here, below all of them, means none of them imports another (no import cycle, not even
through a function-level import).  The server itself is imported only when it is started.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import pytest

from pytest_upstream.pytest_plugin.options import (
    block_setting,
    cache_option,
    capture_option,
    config_file_option,
    lock_option,
    max_size_option,
    mode_option,
)

if TYPE_CHECKING:
    from pytest_upstream.clients.inprocess import InProcessRouting
    from pytest_upstream.pytest_plugin.harness import UpstreamProxy
    from pytest_upstream.repro.netguard import NetworkGuard

PROXY: pytest.StashKey[UpstreamProxy] = pytest.StashKey()  # config -> the session's proxy server
WORKER_REPORTS: pytest.StashKey[list[dict[str, Any]]] = pytest.StashKey()  # xdist controller
BARE_GUARD: pytest.StashKey[NetworkGuard] = pytest.StashKey()  # network blocked before a server ran
SESSION_ROUTING: pytest.StashKey[InProcessRouting] = pytest.StashKey()  # --upstream-inprocess
SCOPED: pytest.StashKey[bool] = pytest.StashKey()  # item -> marker scope set; True: it blocked the network
LOCK_NOTE: pytest.StashKey[str] = pytest.StashKey()  # the "lock file written" summary line
OUTPUT_KEY = "pytest_upstream"  # a worker's report in ``config.workeroutput``


def is_xdist_controller(config: pytest.Config) -> bool:
    return config.pluginmanager.hasplugin("dsession") and not hasattr(config, "workerinput")


def running_proxy(config: pytest.Config) -> UpstreamProxy | None:
    return config.stash.get(PROXY, None)


def session_proxy(config: pytest.Config) -> UpstreamProxy:
    """The session's proxy server, started on first use (and at session start with the flag).

    Raises ConfigError (a lock error included) or CacheError for the caller to report.
    """
    proxy = running_proxy(config)
    if proxy is None:
        from pytest_upstream.config.auth import env_problems, unset_env
        from pytest_upstream.config.settings import ConfigError
        from pytest_upstream.pytest_plugin.harness import UpstreamProxy, settings_for
        from pytest_upstream.repro.lockfile import LockError

        settings = settings_for(
            config_file=config_file_option(config),
            search_dir=config.rootpath,
            cache=cache_option(config, os.environ),
            mode=mode_option(config, os.environ),
            base_dir=config.rootpath,
            lock=lock_option(config),
            max_size=max_size_option(config, os.environ),
            capture=capture_option(config),
        )
        if problems := env_problems(n for p in settings.proxies for n in p.auth.required_env()):
            raise ConfigError("; ".join(problems))  # names the variables, never their values
        if warnings := unset_env((p.key, p.auth.required_env()) for p in settings.proxies):
            reporter = config.pluginmanager.get_plugin("terminalreporter")
            for line in warnings:
                if reporter is not None:
                    reporter.write_line(f"pytest-upstream: warning: {line}", yellow=True)
        try:
            proxy = UpstreamProxy.start(settings)
        except LockError as exc:  # e.g. replay with a lock file that is not there
            raise ConfigError(str(exc)) from None
        config.stash[PROXY] = proxy
        _block_network_if_asked(config, proxy)
    return proxy


def _block_network_if_asked(config: pytest.Config, proxy: UpstreamProxy) -> None:
    bare = config.stash.get(BARE_GUARD, None)
    if bare is not None:  # the proxy's guard (exempting its own threads) takes over
        bare.uninstall()
        del config.stash[BARE_GUARD]
    block = block_setting(config)
    if block or (block is None and proxy.session_mode == "replay"):
        proxy.block_network()


def all_reports(config: pytest.Config, detail: bool = False, answers: bool = False) -> list[dict[str, Any]]:
    """Every worker's report on the xdist controller, else this process's proxy's (or none)."""
    if (workers := config.stash.get(WORKER_REPORTS, None)) is not None:
        return workers
    proxy = running_proxy(config)
    return [proxy.report(detail=detail, answers=answers)] if proxy is not None else []


def start_at_configure(config: pytest.Config) -> UpstreamProxy:
    """``session_proxy`` for a configure hook: bad settings become a usage error (exit 4),
    ``ERROR: pytest-upstream: <problem>``, not a traceback."""
    from pytest_upstream.config.settings import ConfigError
    from pytest_upstream.store.cache import CacheError

    try:
        return session_proxy(config)
    except (ConfigError, CacheError) as exc:
        raise pytest.UsageError(f"pytest-upstream: {exc}") from None
