"""The per-request context a format's hooks receive (``formats.base.FormatContext``).

One object per request, passed to every hook that needs more than the resource, so a hook learns
about its request from here and never from state left on a thread by an earlier request (a
keep-alive connection reuses its thread).  It also pins the mode for the whole request: the
pytest plugin may switch modes between tests while a request is in flight.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pytest_upstream.config.settings import ProxyDefinition
from pytest_upstream.engine.clock import Clock
from pytest_upstream.engine.errors import WouldBlock
from pytest_upstream.formats.base import Format, Resource
from pytest_upstream.messages import ProxyRequest
from pytest_upstream.store.cache import Cache, Entry


@dataclass(eq=False)
class RequestContext:
    request: ProxyRequest
    proxy: ProxyDefinition
    fmt: Format
    mode: str
    cache: Cache
    clock: Clock
    # Engine.metadata: a metadata resource through the cache, honouring the mode.
    fetch_metadata: Callable[[RequestContext, Resource], tuple[Entry, bytes]]
    # Engine.answer_warm: raise WouldBlock rather than wait (for a lock, the upstream, hashing).
    warm_only: bool = False

    def now(self) -> float:
        return self.clock.now()

    def cached(self, path: str, variant: str = "") -> Entry | None:
        entry = self.cache.lookup(self.proxy.key, path, variant)
        if entry is None:
            return None
        if self.warm_only and self.cache.verifier.known_path(entry.sha256, entry.size) is None:
            raise WouldBlock  # verifying the blob would hash it
        if self.cache.verified_blob(entry) is None:
            return None
        return entry

    def metadata(self, resource: Resource) -> tuple[Entry, bytes]:
        return self.fetch_metadata(self, resource)
