"""The pytest face of in-process routing (``pytest_upstream.clients.inprocess``).

Loaded with the ``upstream`` plugin (its ``pytest_plugins``).  Three ways on:

* ``--upstream-inprocess`` / ini ``upstream_inprocess = true``: for the whole
  session, from configure (so session fixtures are routed too) to unconfigure;
  it starts the proxy as ``--upstream-proxy`` does;
* the ``upstream_inprocess`` fixture: for one test, starting the proxy lazily;
* ``@pytest.mark.upstream(inprocess=True)``: the same, by marker;
  ``inprocess=False`` suspends session-wide routing for one test.

Like the main plugin, this imports nothing beyond pytest until routing is on.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from pytest_upstream.clients.inprocess import InProcessRouting
    from pytest_upstream.pytest_plugin.harness import UpstreamProxy

_SESSION_ROUTING: pytest.StashKey[InProcessRouting] = pytest.StashKey()
MARKER = "upstream"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("upstream", "upstream proxy (pytest-upstream)")
    group.addoption(
        "--upstream-inprocess",
        action="store_true",
        default=None,
        dest="upstream_inprocess",
        help="route this process's own requests/httpx/urllib calls to configured upstreams "
        "through the proxy (starts the proxy; ini upstream_inprocess)",
    )
    parser.addini(
        "upstream_inprocess",
        "route the test process's own HTTP clients through the upstream proxy",
        type="bool",
        default=False,
    )


def inprocess_enabled(config: pytest.Config) -> bool:
    flag = config.getoption("upstream_inprocess", None)
    return bool(flag) if flag is not None else bool(config.getini("upstream_inprocess"))


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(inprocess=True): route this test's own requests/httpx/urllib calls through the "
        "upstream proxy (inprocess=False: not even under --upstream-inprocess)",
    )
    if not inprocess_enabled(config):
        return
    import pytest_upstream.pytest_plugin.plugin as plugin

    if plugin._is_xdist_controller(config):  # each worker routes through its own proxy
        return
    from pytest_upstream.config.settings import ConfigError
    from pytest_upstream.store.cache import CacheError

    try:
        proxy = plugin._session_proxy(config)
    except (ConfigError, CacheError) as exc:
        raise pytest.UsageError(f"pytest-upstream: {exc}") from None
    from pytest_upstream.clients.inprocess import InProcessRouting

    routing = InProcessRouting.for_server(proxy.server)
    routing.start()
    config.stash[_SESSION_ROUTING] = routing


@pytest.hookimpl(tryfirst=True)  # before the main plugin stops the proxy
def pytest_unconfigure(config: pytest.Config) -> None:
    routing = config.stash.get(_SESSION_ROUTING, None)
    if routing is not None:
        del config.stash[_SESSION_ROUTING]
        routing.stop()
        routing.close()


@pytest.fixture
def upstream_inprocess(upstream_proxy: UpstreamProxy) -> Iterator[InProcessRouting]:
    """Route this test's own HTTP clients through the proxy; ``.routed`` lists what went there."""
    from pytest_upstream.clients.inprocess import InProcessRouting

    routing = InProcessRouting.for_server(upstream_proxy.server)
    with routing.activate():
        yield routing
    routing.close()


@pytest.fixture(autouse=True)
def _upstream_inprocess_marker(request: pytest.FixtureRequest) -> Iterator[None]:
    # The closest ``upstream`` marker that says ``inprocess`` (others may say only mode=, proxies=).
    wanted = next(
        (m.kwargs["inprocess"] for m in request.node.iter_markers(MARKER) if "inprocess" in m.kwargs), None
    )
    if wanted is None:
        yield
    elif wanted:
        request.getfixturevalue("upstream_inprocess")
        yield
    else:
        from pytest_upstream.clients.inprocess import suspended

        with suspended():
            yield
