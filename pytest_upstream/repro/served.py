"""What the proxy served, for tests to assert on and for the summary line."""

from __future__ import annotations

import threading
import time
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
    time: float = field(default_factory=time.time)

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

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class ServedLog:
    """Thread-safe record of every reply and every upstream fetch."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[ServedRecord] = []
        self._fetches: list[str] = []  # upstream URLs contacted, in order
        self.current_test = ""

    def add(self, record: ServedRecord) -> None:
        with self._lock:
            self._records.append(record)

    def upstream_fetch(self, url: str) -> None:
        with self._lock:
            self._fetches.append(url)

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
            return len(self._records), len(self._fetches)

    def since(self, mark: tuple[int, int]) -> tuple[list[ServedRecord], list[str]]:
        with self._lock:
            return self._records[mark[0] :], self._fetches[mark[1] :]

    def __iter__(self) -> Iterator[ServedRecord]:
        return iter(self.records)

    def stats(self) -> Stats:
        s = Stats()
        with self._lock:
            s.upstream_fetches = len(self._fetches)
            for r in self._records:
                s.requests += 1
                if r.cache == "hit":
                    s.hits += 1
                    s.bytes_cache += r.size
                elif r.cache == "stale":
                    s.stale += 1
                    s.bytes_cache += r.size
                elif r.cache == "miss":
                    s.misses += 1
                    s.bytes_upstream += r.size
                if r.status == 404:
                    s.not_found += 1  # routine for Maven and npm probing, not an error
                elif r.status >= 400:
                    s.errors += 1
        return s
