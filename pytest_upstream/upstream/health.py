"""Upstream health: an upstream that keeps failing is left alone for a while (docs/rules.md).

Like Nexus's auto-blocking of a proxy repository: after ``failures`` consecutive connection
failures or timeouts, an upstream is *down* for a backoff period, during which the proxy does
not contact it at all: hits and stale copies are served, a group skips it, a miss is answered at
once with the reason (instead of every build waiting out a connect timeout per request).  When
the period ends, the next request is let through as a probe: a success makes the upstream
healthy again, a failure marks it down for twice as long, up to ``max_backoff``.

Only failures to get an answer count (refused, reset, timed out, a broken protocol): an upstream
that answers, even 404 or 500, is reachable.  State is per proxy key, in memory, per process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from pytest_upstream.config.upstream_limits import HealthLimits

log = logging.getLogger("pytest_upstream.upstream")


@dataclass(frozen=True)
class Down:
    """Why an upstream is not contacted now, and until when."""

    key: str
    until: float
    failures: int
    error: str  # the last failure, already scrubbed of secrets by whoever reported it
    now: float

    def __str__(self) -> str:
        left = max(self.until - self.now, 0.0)
        return (
            f"upstream of {self.key!r} is marked down for {left:.0f}s more after "
            f"{self.failures} failure(s) in a row (last: {self.error})"
        )


@dataclass
class _State:
    failures: int = 0
    down_until: float = 0.0
    backoff: float = 0.0
    error: str = ""
    probing: bool = False  # one request is let through after the period; others keep waiting
    probe_until: float = 0.0  # a probe that never reports back frees the way again after this
    skipped: int = 0  # requests not sent upstream because it was down (for metrics)


class Health:
    """The health of every upstream of one engine; thread-safe."""

    def __init__(self, now: Callable[[], float], limits: HealthLimits | None = None) -> None:
        self._now = now
        self.limits = limits or HealthLimits()
        self._states: dict[str, _State] = {}
        self._lock = threading.Lock()

    def check(self, key: str) -> Down | None:
        """None if a request may go to ``key``'s upstream now (possibly as the probe that ends
        a down period), else why not."""
        now = self._now()
        with self._lock:
            state = self._states.get(key)
            if state is None or state.down_until == 0.0:
                return None
            if now >= state.down_until and (not state.probing or now >= state.probe_until):
                state.probing = True
                state.probe_until = now + state.backoff
                return None
            state.skipped += 1
            return Down(key, max(state.down_until, now), state.failures, state.error, now)

    def failed(self, key: str, error: str) -> None:
        """A request to ``key``'s upstream got no answer (connect, read or protocol failure)."""
        limits = self.limits
        with self._lock:
            state = self._states.setdefault(key, _State())
            state.failures += 1
            state.error = error[:300]
            state.probing = False
            if limits.failures and state.failures >= limits.failures:
                state.backoff = (
                    limits.backoff if state.backoff == 0 else min(state.backoff * 2, limits.max_backoff)
                )
                state.down_until = self._now() + state.backoff
                log.warning(
                    "upstream of %r marked down for %.0fs after %d failure(s) in a row (last: %s)",
                    key,
                    state.backoff,
                    state.failures,
                    state.error,
                )

    def succeeded(self, key: str) -> None:
        """``key``'s upstream answered: healthy again."""
        with self._lock:
            state = self._states.get(key)
            if state is not None and (state.failures or state.down_until):
                if state.down_until:
                    log.warning("upstream of %r answers again: no longer marked down", key)
                skipped = state.skipped
                self._states[key] = _State(skipped=skipped)

    def down_until(self) -> dict[str, tuple[float, int]]:
        """``key -> (until when it is marked down, consecutive failures)`` for each upstream
        marked down now (the ``/-/ui/`` overview; ``until`` on the engine's clock)."""
        now = self._now()
        with self._lock:
            return {
                key: (state.down_until, state.failures)
                for key, state in self._states.items()
                if state.down_until > now or state.probing
            }

    def snapshot(self) -> dict[str, tuple[bool, int, int]]:
        """``key -> (down now, consecutive failures, requests skipped so far)`` for metrics."""
        now = self._now()
        with self._lock:
            return {
                key: (state.down_until > now or state.probing, state.failures, state.skipped)
                for key, state in self._states.items()
            }
