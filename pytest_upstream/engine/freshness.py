"""When a cached answer may be served without asking the upstream again.

Artifacts are immutable: always fresh.  Metadata is fresh for the proxy's ``metadata_ttl``; a
remembered upstream 404 for the resource's ``negative_ttl``.  In refresh mode nothing cached
before the run counts as fresh: each (proxy, path, variant) is refetched once, then served from
the cache for the rest of the run.  Ages are read on the engine's clock, so tests advance it.
"""

from __future__ import annotations

import threading

from pytest_upstream.config.settings import ProxyDefinition
from pytest_upstream.engine.clock import Clock
from pytest_upstream.formats.base import Resource
from pytest_upstream.store.cache import Entry


class Freshness:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._refreshed: set[tuple[str, str, str]] = set()
        self._lock = threading.Lock()

    def age(self, entry: Entry) -> float:
        return entry.age(self.clock.now())

    def fresh(self, mode: str, proxy: ProxyDefinition, res: Resource, entry: Entry) -> bool:
        """Whether a stored answer may be served as it is."""
        if not entry.is_metadata:
            return True
        if mode == "refresh":
            with self._lock:
                return (proxy.key, res.path, res.variant) in self._refreshed
        return self.age(entry) < proxy.metadata_ttl

    def not_found_holds(self, mode: str, res: Resource, entry: Entry) -> bool:
        """Whether a remembered 404 (an entry of kind NOT_FOUND) is still the answer."""
        if mode == "replay":
            return True
        return mode != "refresh" and res.negative_ttl is not None and self.age(entry) < res.negative_ttl

    def mark_refreshed(self, mode: str, proxy: ProxyDefinition, res: Resource) -> None:
        """The upstream was asked (or failed) in this refresh run: serve the cache from now on."""
        if mode == "refresh":
            with self._lock:
                self._refreshed.add((proxy.key, res.path, res.variant))
