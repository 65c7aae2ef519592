"""The pytest face of in-process routing (``pytest_upstream.clients.inprocess``).

Loaded with the ``upstream`` plugin (its ``pytest_plugins``).  Three ways on:

* ``--upstream-inprocess`` / ini ``upstream_inprocess = true``: for the whole
  session, from configure (so session fixtures are routed too) to unconfigure;
  it starts the proxy as ``--upstream-proxy`` does;
* the ``upstream_inprocess`` fixture: for one test, starting the proxy lazily;
* ``@pytest.mark.upstream(inprocess=True)``: the same, by marker;
  ``inprocess=False`` suspends session-wide routing for one test.

Its option and the marker are registered by ``options``; the stash keys live in ``state``.
Like the main plugin, this imports nothing beyond pytest until routing is on.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from pytest_upstream.pytest_plugin.options import MARKER, inprocess_enabled
from pytest_upstream.pytest_plugin.state import SESSION_ROUTING, is_xdist_controller, start_at_configure

if TYPE_CHECKING:
    from pytest_upstream.clients.inprocess import InProcessRouting
    from pytest_upstream.pytest_plugin.harness import UpstreamProxy


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    if not inprocess_enabled(config):
        return
    if is_xdist_controller(config):  # each worker routes through its own proxy
        return
    proxy = start_at_configure(config)
    from pytest_upstream.clients.inprocess import InProcessRouting

    routing = InProcessRouting.for_server(proxy.server)
    routing.start()
    config.stash[SESSION_ROUTING] = routing


@pytest.hookimpl(tryfirst=True)  # before the main plugin stops the proxy
def pytest_unconfigure(config: pytest.Config) -> None:
    routing = config.stash.get(SESSION_ROUTING, None)
    if routing is not None:
        del config.stash[SESSION_ROUTING]
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
