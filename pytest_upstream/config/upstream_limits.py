"""Limits on what the proxy takes from an upstream: how long and how slowly a download may run
(``FetchLimits``), how far a content-coded answer may inflate (``DecodeLimits``), and which
private hosts an upstream's links and redirects may still reach (``allow_hosts``, the SSRF
guard's exceptions).  Read from ``[tool.pytest-upstream]`` (docs/configuration.md)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pytest_upstream.config.checks import ConfigError, age_value, positive, size_value

# -- fetch deadlines (docs/configuration.md § Fetch deadlines)
DEFAULT_FETCH_DEADLINE = 3600.0
DEFAULT_MIN_RATE = 1024
DEFAULT_MIN_RATE_WINDOW = 30.0
DEFAULT_ORPHAN_DEADLINE = 60.0
FETCH_FIELDS = ("fetch_deadline", "min_rate", "min_rate_window", "orphan_deadline")


@dataclass(frozen=True)
class FetchLimits:
    """How long one upstream download may take, whoever is waiting for it.

    ``deadline``: seconds from the upstream request to the last byte (0: none).
    ``min_rate``: bytes per second, averaged over each ``rate_window`` seconds, below which a
    download is given up (0: none); a stalled upstream is cut by its read ``timeout`` anyway, this
    catches one that drips.  ``orphan_deadline``: seconds a download continues after its last
    client left (0: it stops as soon as that is noticed).  Checked as each chunk arrives.
    """

    deadline: float = DEFAULT_FETCH_DEADLINE
    min_rate: int = DEFAULT_MIN_RATE
    rate_window: float = DEFAULT_MIN_RATE_WINDOW
    orphan_deadline: float = DEFAULT_ORPHAN_DEADLINE


def parse_fetch_limits(table: Mapping[str, Any], where: str) -> FetchLimits:
    """The fetch deadlines of a ``[tool.pytest-upstream]`` table: seconds as numbers or ages
    (``"1h"``), ``min_rate`` as bytes per second or a size (``"1K"``)."""
    return FetchLimits(
        deadline=age_value(table.get("fetch_deadline", DEFAULT_FETCH_DEADLINE), where, "fetch_deadline"),
        min_rate=size_value(table.get("min_rate", DEFAULT_MIN_RATE), where, "min_rate"),
        rate_window=positive(
            age_value(table.get("min_rate_window", DEFAULT_MIN_RATE_WINDOW), where, "min_rate_window"),
            where,
            "min_rate_window",
        ),
        orphan_deadline=age_value(
            table.get("orphan_deadline", DEFAULT_ORPHAN_DEADLINE), where, "orphan_deadline"
        ),
    )


# -- hostile upstreams: bounded decoding and the SSRF guard (issue 10)
DEFAULT_MAX_DECODED_SIZE = 1024**3
DEFAULT_MAX_EXPANSION = 100.0
DECODE_FIELDS = ("max_decoded_size", "max_expansion")


@dataclass(frozen=True)
class DecodeLimits:
    """Caps on undoing an upstream's Content-Encoding (gzip, deflate): a small body must not
    inflate into gigabytes of memory or disk.  ``max_size``: decoded bytes (0: none);
    ``max_expansion``: decoded bytes per encoded byte, judged once the output passes a few MiB
    (0: none)."""

    max_size: int = DEFAULT_MAX_DECODED_SIZE
    max_expansion: float = DEFAULT_MAX_EXPANSION


def parse_decode_limits(entry: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A proxy entry's ``max_decoded_size`` (bytes or a size, ``"1G"``) and ``max_expansion``."""
    ratio = entry.get("max_expansion", DEFAULT_MAX_EXPANSION)
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or ratio < 0:
        raise ConfigError(f"{where}: max_expansion must be a non-negative number (got {ratio!r})")
    limit = size_value(entry.get("max_decoded_size", DEFAULT_MAX_DECODED_SIZE), where, "max_decoded_size")
    return {"decoding": DecodeLimits(max_size=limit, max_expansion=float(ratio))}


def parse_allow_hosts(table: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``allow_hosts``: host names, ``host:port``, IP addresses or networks (``10.1.0.0/16``)."""
    hosts = table.get("allow_hosts", [])
    if not isinstance(hosts, list) or not all(isinstance(h, str) and h.strip() for h in hosts):
        raise ConfigError(f"{where}: allow_hosts must be a list of host names, addresses or networks")
    for host in hosts:  # "name:port" or "[v6]:port" (a bare IPv6 address has several colons)
        port = host.rpartition("]:")[2] if host.startswith("[") else host.partition(":")[2]
        if (host.count(":") == 1 or "]:" in host) and not (port.isdigit() and 0 < int(port) < 65536):
            raise ConfigError(f"{where}: allow_hosts: {host!r} has no valid port after its ':'")
    return {"allow_hosts": tuple(h.strip().lower() for h in hosts)}


# -- upstream health: an upstream that keeps failing is left alone for a while (issue 12)
DEFAULT_HEALTH_FAILURES = 2
DEFAULT_HEALTH_BACKOFF = 15.0
DEFAULT_HEALTH_MAX_BACKOFF = 600.0
HEALTH_FIELDS = ("down_after_failures", "down_backoff", "down_max_backoff")


@dataclass(frozen=True)
class HealthLimits:
    """When an upstream is marked down (upstream/health.py): after ``failures`` consecutive
    failures to get an answer (0: never), for ``backoff`` seconds, doubling on each failed probe
    up to ``max_backoff``."""

    failures: int = DEFAULT_HEALTH_FAILURES
    backoff: float = DEFAULT_HEALTH_BACKOFF
    max_backoff: float = DEFAULT_HEALTH_MAX_BACKOFF


def parse_health_limits(table: Mapping[str, Any], where: str) -> HealthLimits:
    failures = table.get("down_after_failures", DEFAULT_HEALTH_FAILURES)
    if isinstance(failures, bool) or not isinstance(failures, int) or failures < 0:
        raise ConfigError(f"{where}: down_after_failures must be a whole number >= 0 (got {failures!r})")
    backoff = positive(
        age_value(table.get("down_backoff", DEFAULT_HEALTH_BACKOFF), where, "down_backoff"),
        where,
        "down_backoff",
    )
    longest = age_value(table.get("down_max_backoff", DEFAULT_HEALTH_MAX_BACKOFF), where, "down_max_backoff")
    if longest < backoff:
        raise ConfigError(f"{where}: down_max_backoff must be at least down_backoff")
    return HealthLimits(failures, backoff, longest)
