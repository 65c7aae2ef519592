from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pytest_upstream.config.groups import parse_groups
from pytest_upstream.config.s3_location import S3Location
from pytest_upstream.config.settings import ProxyDefinition, Settings, parse_proxy
from pytest_upstream.engine.clock import Clock
from pytest_upstream.server.proxy_server import ProxyServer

from .upstreams import Upstream

pytest_plugins = ["pytester"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-public", action="store_true", help="run tests that need the public registries")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-public"):
        return
    skip = pytest.mark.skip(reason="needs the public registries: pass --run-public")
    for item in items:
        if "public_registry" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with Upstream() as up:
        yield up


def proxy_def(**entry: Any) -> ProxyDefinition:
    """A validated definition, e.g. ``proxy_def(key="g", format="generic", url=...)``."""
    entry.setdefault("source", "custom")
    return parse_proxy(entry, "test", 600.0, 10.0)


MakeProxy = Callable[..., ProxyServer]


@pytest.fixture
def make_proxy(tmp_path: Path) -> Iterator[MakeProxy]:
    """Start a ProxyServer on loopback; stopped at teardown.

    ``make_proxy(proxy_def(...), ..., mode="record", cache=path, clock=ManualClock())``;
    ``groups=({"key": "all", "members": ["a", "b"]},)`` adds groups of those proxies;
    ``allow_hosts=("127.0.0.1:<port>",)`` lets it reach a loopback host that is no upstream.
    """
    started: list[ProxyServer] = []

    def make(
        *proxies: ProxyDefinition,
        mode: str = "record",
        cache: Path | None = None,
        lock_timeout: float = 30.0,
        clock: Clock | None = None,
        allow_hosts: tuple[str, ...] = (),
        groups: tuple[dict[str, Any], ...] = (),
        object_store: S3Location | None = None,
    ) -> ProxyServer:
        settings = Settings(
            cache_dir=cache or tmp_path / "cache",
            mode=mode,
            proxies=tuple(proxies),
            groups=parse_groups(list(groups), {p.key: p.format for p in proxies}, "test"),
            object_store=object_store,
            lock_timeout=lock_timeout,
            allow_hosts=allow_hosts,
        )
        server = ProxyServer(settings, clock=clock).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()
