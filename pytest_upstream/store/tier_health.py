"""Whether the object store is usable now: the shared tier's circuit breaker (remote_tier.py).

A failed request (``ObjectStoreError``: unreachable, timed out, refused) marks the store
*degraded* for ``backoff`` seconds: calls in that time do not touch the store at all (each is
counted as skipped), so a stopped store costs a build one bounded failure, not one per request.
After the backoff the next call is let through as a probe; a success ends the outage.

An outage is logged once at WARNING when it starts (with the cause, which ``s3_client`` has
already scrubbed of credentials) and once at INFO when it ends, never per request.  The
counters are plain integers a metrics page reads (``TierHealth.snapshot``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("pytest_upstream")

DEFAULT_BACKOFF = 30.0  # seconds the store is left alone after a failure

COUNTERS = (
    "pulled",  # entries copied from the store into the local tier
    "pull_misses",  # lookups the shared index did not have
    "published",  # entries (and their blobs) written to the store
    "publish_conflicts",  # entries another machine wrote first: theirs kept
    "corrupt",  # objects that did not hash to their name: removed, never served
    "claims_won",  # upstream fetches this machine was given
    "claims_waited",  # times another machine was fetching
    "claims_taken_over",  # claims won after another machine's claim expired or ended
    "failures",  # requests to the store that failed
    "skipped",  # calls that did not ask the store because it is degraded
    "outages",  # failures that started a degraded period
)


class TierHealth:
    """The state of one object store for one process; thread-safe."""

    def __init__(
        self, where: str, backoff: float = DEFAULT_BACKOFF, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.where = where  # s3://bucket/prefix: for messages
        self.backoff = backoff
        self._clock = clock
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._last_failure = 0.0
        self._cause = ""
        self.counts = dict.fromkeys(COUNTERS, 0)

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] += n

    def snapshot(self) -> dict[str, int]:
        """The counters and ``degraded`` (1 while the store is left alone), for /-/metrics."""
        with self._lock:
            return {**self.counts, "degraded": int(bool(self._degraded_locked()))}

    def degraded(self) -> str:
        """Why the store is left alone now ("" when it may be asked)."""
        with self._lock:
            return self._degraded_locked()

    def _degraded_locked(self) -> str:
        if self._down_since is None or self._clock() - self._last_failure >= self.backoff:
            return ""
        return f"object store {self.where} unavailable: {self._cause}"

    def available(self) -> bool:
        """True if a call may ask the store; else counts the call as skipped."""
        with self._lock:
            if not self._degraded_locked():
                return True
            self.counts["skipped"] += 1
            return False

    def failed(self, cause: BaseException) -> None:
        """A request failed: degraded for ``backoff`` seconds from now (logged when it starts)."""
        with self._lock:
            self.counts["failures"] += 1
            self._last_failure = self._clock()
            self._cause = " ".join(str(cause).split())[:300] or type(cause).__name__
            starts = self._down_since is None
            if starts:
                self._down_since = self._last_failure
                self.counts["outages"] += 1
        if starts:
            log.warning(
                "object store %s unavailable (%s); serving from the local tier only, trying again in %gs",
                self.where,
                self._cause,
                self.backoff,
            )

    def succeeded(self) -> None:
        """A request got an answer: the outage, if any, is over."""
        if self._down_since is None:  # the common case: no lock taken
            return
        with self._lock:
            since, self._down_since = self._down_since, None
        if since is not None:
            log.info("object store %s available again after %.0fs", self.where, self._clock() - since)
