"""Observers of what the engine answered: the served log (tests' assertions, the report and the
summary line), the lock-file recorder (what a record or refresh run saves) and the metrics
(``GET /-/metrics``).

The engine tells them: every upstream fetch as it starts and ends (``fetching``, ``fetch_ended``),
every upstream failure (``upstream_failed``), every answer it gave (``answered``), and every stored
object an answer came from, including metadata a format read to resolve a request (``used``).  A
recorder decides what it keeps; the engine knows none of their formats.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

from pytest_upstream.engine.metrics import RESULTS, Metrics
from pytest_upstream.formats.base import Resource
from pytest_upstream.formats.hiding import Hidden
from pytest_upstream.messages import ProxyRequest
from pytest_upstream.repro.lockfile import LockFile, LockFileEntry
from pytest_upstream.repro.served import ServedLog, ServedRecord
from pytest_upstream.store.cache import Entry

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger("pytest_upstream")


@dataclass(frozen=True)
class Answer:
    """One reply (or failure to give one), as the recorders see it."""

    request: ProxyRequest
    path: str  # the cache's name when resolved, else the path the client asked for
    resource: Resource | None
    cache: str  # hit | miss | stale | error
    status: int
    size: int = 0
    sha256: str = ""
    error: str = ""
    replay_miss: bool = False  # replay mode, and the answer was not recorded
    hidden: tuple[Hidden, ...] = ()  # releases a policy took out of this metadata (formats/hiding.py)


class Recorder(Protocol):
    def fetching(self, url: str, key: str = "") -> None: ...

    def fetch_ended(self, key: str, url: str) -> None: ...

    def upstream_failed(self, key: str, url: str, error: str) -> None: ...

    def answered(self, answer: Answer) -> None: ...

    def used(self, key: str, resource: Resource, entry: Entry) -> None: ...


def hidden_lines(hidden: tuple[Hidden, ...]) -> tuple[str, ...]:
    """``name version: why`` for each hidden release, as records and lock files hold them."""
    return tuple(f"{h.name} {h.version}".rstrip() + f": {h.reason}" for h in hidden)


class ServedRecorder:
    """Every answer into the ``ServedLog``; a HEAD counts no bytes."""

    def __init__(self, log: ServedLog) -> None:
        self.log = log

    def fetching(self, url: str, key: str = "") -> None:
        self.log.upstream_fetch(url)

    def fetch_ended(self, key: str, url: str) -> None:
        """The log lists fetches as they start."""

    def upstream_failed(self, key: str, url: str, error: str) -> None:
        """The failed answer's record carries the error."""

    def answered(self, answer: Answer) -> None:
        res, req = answer.resource, answer.request
        self.log.add(
            ServedRecord(
                key=req.key,
                path=answer.path,
                cache=answer.cache,
                status=answer.status,
                size=0 if req.method == "HEAD" else answer.size,
                method=req.method,
                upstream_url=res.upstream_url if res else "",
                sha256=answer.sha256,
                kind=res.kind.value if res else "",
                variant=res.variant if res else "",
                error=answer.error,
                test=self.log.current_test,
                hidden=hidden_lines(answer.hidden),
                duration=max(time.monotonic() - req.received, 0.0),
            )
        )

    def used(self, key: str, resource: Resource, entry: Entry) -> None:
        """The log lists replies only."""


class LockRecorder:
    """The stored bytes (or remembered 404) every answer came from (docs/reproducible-builds.md)."""

    def __init__(self) -> None:
        self._recorded = LockFile()
        self._lock = threading.Lock()
        self._hidden: dict[tuple[str, str, str], tuple[str, ...]] = {}  # answered, not yet used

    def fetching(self, url: str, key: str = "") -> None:
        """The lock names objects, which ``used`` reports."""

    def fetch_ended(self, key: str, url: str) -> None:
        """The lock names objects, which ``used`` reports."""

    def upstream_failed(self, key: str, url: str, error: str) -> None:
        """The lock names objects, which ``used`` reports."""

    def answered(self, answer: Answer) -> None:
        """What a policy hid from served metadata goes with its entry (reported by ``used``)."""
        res = answer.resource
        if not answer.hidden or res is None:
            return
        identity = (answer.request.key, res.path, res.variant)
        with self._lock:
            self._hidden[identity] = hidden_lines(answer.hidden)
            if (locked := self._recorded.get(*identity)) is not None:
                self._recorded.add(replace(locked, hidden=self._hidden.pop(identity)))

    def used(self, key: str, resource: Resource, entry: Entry) -> None:
        locked = LockFileEntry(
            key,
            resource.path,
            resource.variant,
            entry.sha256,
            entry.size,
            entry.kind,
            content_type=entry.content_type,
            headers=tuple(sorted(entry.headers.items())),
        )
        with self._lock:
            hidden = self._hidden.pop(locked.identity, ())
            self._recorded.add(replace(locked, hidden=hidden) if hidden else locked)

    def snapshot(self) -> LockFile:
        with self._lock:
            return LockFile(self._recorded)


class MetricsRecorder:
    """Counts for ``GET /-/metrics`` (engine/metrics.py), and a WARNING for every upstream failure:
    an operator learns of a failing upstream from the log, not from a client's complaint."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def fetching(self, url: str, key: str = "") -> None:
        self.metrics.fetch_started(key)

    def fetch_ended(self, key: str, url: str) -> None:
        self.metrics.fetch_ended()

    def upstream_failed(self, key: str, url: str, error: str) -> None:
        self.metrics.upstream_failed(key)
        log.warning("upstream failed for %s: %s: %s", key, url, error)

    def answered(self, answer: Answer) -> None:
        result = answer.cache.replace("-", "_")  # pass-through (X-Upstream-Cache) is pass_through here
        result = result if result in RESULTS else "error"
        if answer.replay_miss:
            result = "replay_miss"
        size = 0 if answer.request.method == "HEAD" else answer.size
        self.metrics.request(answer.request.key, result, size)

    def used(self, key: str, resource: Resource, entry: Entry) -> None:
        """Metrics count replies, not stored objects."""


class Recorders:
    """The engine's observers, told in order."""

    def __init__(self, *recorders: Recorder, scrub: Callable[[str], str] = str) -> None:
        self._recorders = recorders
        # Secrets out of every error text before any recorder (served log, report, lock, log line)
        # sees it: the engine passes its ``Engine.scrub`` (config/auth.py ``scrub``).
        self.scrub = scrub

    def fetching(self, url: str, key: str = "") -> None:
        for recorder in self._recorders:
            recorder.fetching(url, key)

    def fetch_ended(self, key: str, url: str) -> None:
        for recorder in self._recorders:
            recorder.fetch_ended(key, url)

    def upstream_failed(self, key: str, url: str, error: str) -> None:
        url, error = self.scrub(url), self.scrub(error)
        for recorder in self._recorders:
            recorder.upstream_failed(key, url, error)

    def answered(self, answer: Answer) -> None:
        if answer.error:
            answer = replace(answer, error=self.scrub(answer.error))
        if (
            answer.resource is not None
            and (scrubbed := self._scrubbed(answer.resource)) is not answer.resource
        ):
            answer = replace(answer, resource=scrubbed)
        for recorder in self._recorders:
            recorder.answered(answer)

    def _scrubbed(self, resource: Resource) -> Resource:
        """The resource with credentials out of its URL (an index may link ``user:pass@host``)."""
        if "@" not in resource.upstream_url:  # no userinfo: the common case, kept cheap (every hit)
            return resource
        url = self.scrub(resource.upstream_url)
        return resource if url == resource.upstream_url else replace(resource, upstream_url=url)

    def used(self, key: str, resource: Resource, entry: Entry) -> None:
        resource = self._scrubbed(resource)
        for recorder in self._recorders:
            recorder.used(key, resource, entry)
