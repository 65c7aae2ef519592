"""The engine's one source of "now": metadata and negative-cache TTLs, entry ages and the expiry
of a registry's tokens (``FormatContext.now``) are all measured with it, so a test can advance
time instead of sleeping it out."""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch, like ``time.time()``."""
        ...


class SystemClock:
    """The wall clock: what a running proxy uses."""

    def now(self) -> float:
        return time.time()


class ManualClock:
    """A clock that moves only when told to (tests): ``advance(61)`` makes a 60 s TTL run out.

    Starts at the wall clock's time, so ages that other code computes with ``time.time()``
    (``cache ls``, the store's own bookkeeping) stay sensible.
    """

    def __init__(self, start: float | None = None) -> None:
        self._now = time.time() if start is None else start
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"a clock does not go back (advance({seconds}))")
        with self._lock:
            self._now += seconds
