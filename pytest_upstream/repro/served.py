"""What the proxy served, for tests to assert on and for the summary line.

The pytest fixture keeps every record of its session (tests assert on them, the report lists
them).  ``serve`` runs for weeks: there the log keeps the last ``limit`` records in a ring, and
its totals (``stats``) are running counters, so memory stays flat however many hits it serves.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

CACHE_STATES = ("hit", "miss", "stale")


@dataclass(frozen=True)
class ServedRecord:
    key: str
    path: str
    cache: str  # "hit" | "miss" | "stale" | "error" (nothing served from either)
    status: int
    size: int
    method: str = "GET"
    upstream_url: str = ""
    sha256: str = ""
    kind: str = ""
    variant: str = ""  # the negotiated representation (part of the cache identity and of a lock entry)
    error: str = ""
    test: str = ""  # the pytest node id running when it was served, if any
    hidden: tuple[str, ...] = ()  # "name version: why" of each release a policy took out (docs/rules.md)
    time: float = field(default_factory=time.time)  # when the answer ended (wall clock)
    # Seconds from reading the request until the answer was had: a reply ready to send (a hit,
    # stored metadata), or a streamed download complete (stored and verified, as the client's
    # stream reached it; the last bytes go out just after).  0: not measured.
    duration: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Stats:
    requests: int = 0
    hits: int = 0
    misses: int = 0
    stale: int = 0
    errors: int = 0
    not_found: int = 0
    bytes_upstream: int = 0
    bytes_cache: int = 0
    upstream_fetches: int = 0

    def add(self, other: Stats) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    def count(self, r: ServedRecord) -> None:
        """One more answer: a 404 is routine (Maven and npm probe), not an error."""
        self.requests += 1
        if r.cache == "hit":
            self.hits += 1
            self.bytes_cache += r.size
        elif r.cache == "stale":
            self.stale += 1
            self.bytes_cache += r.size
        elif r.cache == "miss":
            self.misses += 1
            self.bytes_upstream += r.size
        if r.status == 404:
            self.not_found += 1
        elif r.status >= 400:
            self.errors += 1

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


SERVE_LOG_LIMIT = 1_000  # records ``serve`` keeps (~500 B each: about 0.5 MB)


class ServedLog:
    """Thread-safe record of replies and upstream fetches: all of them, or the last ``limit``."""

    def __init__(self, limit: int | None = None) -> None:
        """``limit``: None keeps everything (the pytest fixture); a number keeps a ring (``serve``)."""
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be at least 1 (got {limit})")
        self._lock = threading.Lock()
        self._records: deque[ServedRecord] = deque(maxlen=limit)
        self._fetches: deque[str] = deque(maxlen=limit)  # upstream URLs contacted, in order
        # How many were ever added: positions (``mark``) count from the start, not from the ring.
        self._added = 0
        self._fetched = 0
        self._stats = Stats()
        self.current_test = ""

    def add(self, record: ServedRecord) -> None:
        with self._lock:
            self._records.append(record)
            self._added += 1
            self._stats.count(record)

    def upstream_fetch(self, url: str) -> None:
        with self._lock:
            self._fetches.append(url)
            self._fetched += 1
            self._stats.upstream_fetches += 1

    @property
    def records(self) -> list[ServedRecord]:
        with self._lock:
            return list(self._records)

    @property
    def fetches(self) -> list[str]:
        with self._lock:
            return list(self._fetches)

    def mark(self) -> tuple[int, int]:
        """A position to compare against later (see ``since``)."""
        with self._lock:
            return self._added, self._fetched

    def since(self, mark: tuple[int, int]) -> tuple[list[ServedRecord], list[str]]:
        """What was added after ``mark`` (what the ring still holds of it)."""
        with self._lock:
            records = list(self._records)[max(len(self._records) - (self._added - mark[0]), 0) :]
            fetches = list(self._fetches)[max(len(self._fetches) - (self._fetched - mark[1]), 0) :]
            return records, fetches

    def __iter__(self) -> Iterator[ServedRecord]:
        return iter(self.records)

    def stats(self) -> Stats:
        """Totals over everything ever added (the ring's dropped records included)."""
        s = Stats()
        with self._lock:
            s.add(self._stats)
        return s
