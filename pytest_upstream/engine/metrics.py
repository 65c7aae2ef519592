"""What a long-running proxy has done, as counters and gauges for ``GET /-/metrics``.

One ``Metrics`` per engine, no process-global registry: two engines in one process (tests start
several) never mix their counts.  The engine feeds it through ``recorders.MetricsRecorder`` (the
observer seam) and the server through ``connection_opened``/``connection_closed``.  Every label
value comes from a bounded set (configured proxy keys, a fixed list of results), so a client
cannot grow it.  The exposition is Prometheus text format 0.0.4, written by hand: a few counters
need no dependency (docs/operations.md lists the series).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

RESULTS = ("hit", "miss", "stale", "replay_miss", "pass_through", "error")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "upstream_proxy"


class Metrics:
    """Thread-safe counters (only ever grow) and gauges (go up and down)."""

    # Set by the engine: upstream health per key, ``key -> (down, failures in a row, skipped)``.
    health: Callable[[], dict[str, tuple[bool, int, int]]] | None = None
    # Set by the engine for an s3:// cache: the object store's counters and ``degraded``.
    object_store: Callable[[], dict[str, int]] | None = None

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, str]] = Counter()  # (key, result)
        self._bytes: Counter[tuple[str, str]] = Counter()  # (key, "cache" | "upstream")
        self._fetches: Counter[str] = Counter()  # key
        self._failures: Counter[str] = Counter()  # key
        self._in_flight = 0
        self._connections = 0
        self._connections_total = 0
        # the size cap (engine/trimmer.py): what it removed, and the cache's size at its last look
        self._evicted_entries = 0
        self._evicted_bytes = 0
        self._cache_bytes: int | None = None  # unknown without a cap

    # -- the server ----------------------------------------------------------
    def connection_opened(self) -> None:
        with self._lock:
            self._connections += 1
            self._connections_total += 1

    def connection_closed(self) -> None:
        with self._lock:
            self._connections = max(self._connections - 1, 0)

    # -- the engine (through MetricsRecorder) --------------------------------
    def request(self, key: str, result: str, nbytes: int) -> None:
        """One answered request; ``result`` one of RESULTS."""
        with self._lock:
            self._requests[key, result] += 1
            if nbytes and result in ("hit", "stale"):
                self._bytes[key, "cache"] += nbytes
            elif nbytes and result in ("miss", "pass_through"):
                self._bytes[key, "upstream"] += nbytes

    def fetch_started(self, key: str) -> None:
        with self._lock:
            self._fetches[key] += 1
            self._in_flight += 1

    def fetch_ended(self) -> None:
        with self._lock:
            self._in_flight = max(self._in_flight - 1, 0)

    def upstream_failed(self, key: str) -> None:
        with self._lock:
            self._failures[key] += 1

    # -- the size cap (engine/trimmer.py) --------------------------------------
    def evicted(self, entries: int, nbytes: int) -> None:
        with self._lock:
            self._evicted_entries += entries
            self._evicted_bytes += nbytes

    def cache_size(self, nbytes: int) -> None:
        with self._lock:
            self._cache_bytes = nbytes

    # -- reading -------------------------------------------------------------
    def requests(self, key: str, result: str) -> int:
        with self._lock:
            return self._requests[key, result]

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    @property
    def connections(self) -> int:
        with self._lock:
            return self._connections

    def per_key(self) -> dict[str, dict[str, int]]:
        """The counters of each key, as ``exposition`` writes them: requests by result (``hit``,
        ``miss``...), ``bytes_cache``, ``bytes_upstream``, ``fetches``, ``failures`` (the
        ``/-/ui/`` overview shows these: one source of truth with ``/-/metrics``)."""
        out: dict[str, dict[str, int]] = {}
        with self._lock:
            for (key, result), n in self._requests.items():
                out.setdefault(key, {})[result] = n
            for (key, source), n in self._bytes.items():
                out.setdefault(key, {})[f"bytes_{source}"] = n
            for key, n in self._fetches.items():
                out.setdefault(key, {})["fetches"] = n
            for key, n in self._failures.items():
                out.setdefault(key, {})["failures"] = n
        return out

    def gauges(self) -> dict[str, int]:
        """The process-wide series: fetches in flight, open and total connections, evictions."""
        with self._lock:
            return {
                "fetches_in_flight": self._in_flight,
                "open_connections": self._connections,
                "connections_total": self._connections_total,
                "evictions_total": self._evicted_entries,
                "evicted_bytes_total": self._evicted_bytes,
            }

    def exposition(self) -> str:
        """The Prometheus text exposition (format 0.0.4) of every series."""
        with self._lock:
            requests = sorted(self._requests.items())
            nbytes = sorted(self._bytes.items())
            fetches = sorted(self._fetches.items())
            failures = sorted(self._failures.items())
            in_flight, connections, total = self._in_flight, self._connections, self._connections_total
            evicted, evicted_bytes, cache_bytes = (
                self._evicted_entries,
                self._evicted_bytes,
                self._cache_bytes,
            )
        out: list[str] = []
        _family(out, "requests_total", "counter", "Requests answered, by proxy key and cache result.")
        out += [_sample("requests_total", {"key": k, "result": r}, n) for (k, r), n in requests]
        _family(out, "bytes_total", "counter", "Body bytes sent, by proxy key and source (cache, upstream).")
        out += [_sample("bytes_total", {"key": k, "source": s}, n) for (k, s), n in nbytes]
        _family(out, "upstream_fetches_total", "counter", "Requests sent to an upstream, by proxy key.")
        out += [_sample("upstream_fetches_total", {"key": k}, n) for k, n in fetches]
        _family(out, "upstream_failures_total", "counter", "Upstream failures, by proxy key.")
        out += [_sample("upstream_failures_total", {"key": k}, n) for k, n in failures]
        _family(out, "fetches_in_flight", "gauge", "Upstream fetches running now.")
        out.append(_sample("fetches_in_flight", {}, in_flight))
        _family(out, "open_connections", "gauge", "Client connections open now.")
        out.append(_sample("open_connections", {}, connections))
        _family(out, "connections_total", "counter", "Client connections accepted.")
        out.append(_sample("connections_total", {}, total))
        _family(out, "evictions_total", "counter", "Entries the size cap removed.")
        out.append(_sample("evictions_total", {}, evicted))
        _family(out, "evicted_bytes_total", "counter", "Blob bytes the size cap freed.")
        out.append(_sample("evicted_bytes_total", {}, evicted_bytes))
        if cache_bytes is not None:  # measured by the size cap's looks only
            _family(
                out,
                "cache_bytes",
                "gauge",
                "Blob bytes in the cache at the size cap's last look.",
            )
            out.append(_sample("cache_bytes", {}, cache_bytes))
        health = sorted(self.health().items()) if self.health else []
        _family(out, "upstream_down", "gauge", "1 while a proxy's upstream is marked down (not contacted).")
        out += [_sample("upstream_down", {"key": k}, int(down)) for k, (down, _, _) in health]
        _family(out, "upstream_skipped_total", "counter", "Requests not sent to an upstream marked down.")
        out += [_sample("upstream_skipped_total", {"key": k}, skipped) for k, (_, _, skipped) in health]
        if self.object_store is not None:
            store = self.object_store()
            _family(
                out, "object_store_degraded", "gauge", "1 while the object store is left alone after failing."
            )
            out.append(_sample("object_store_degraded", {}, store.pop("degraded", 0)))
            _family(out, "object_store_events_total", "counter", "What the shared tier did, by event.")
            out += [_sample("object_store_events_total", {"event": e}, n) for e, n in sorted(store.items())]
        return "\n".join(out) + "\n"


def _family(out: list[str], name: str, kind: str, help_: str) -> None:
    out.append(f"# HELP {PREFIX}_{name} {help_}")
    out.append(f"# TYPE {PREFIX}_{name} {kind}")


def _sample(name: str, labels: dict[str, str], value: int) -> str:
    if not labels:
        return f"{PREFIX}_{name} {value}"
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
    return f"{PREFIX}_{name}{{{inner}}} {value}"


def _escape(value: str) -> str:
    """A label value as the format requires: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
