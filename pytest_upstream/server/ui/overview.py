"""The ``/-/ui/`` overview's view model: every proxy and group, with its health and the counters
of ``/-/metrics``, read from the same ``Metrics`` object (one source of truth)."""

from __future__ import annotations

from dataclasses import dataclass

from pytest_upstream.engine.dispatch import Engine
from pytest_upstream.engine.metrics import RESULTS
from pytest_upstream.server.ui.values import SCAN_WAIT, iso_time, shown_url


@dataclass(frozen=True)
class ProxyView:
    key: str
    source: str
    format: str
    url: str
    auth: str  # the mode only ("anonymous", "basic", "bearer"), never a value
    mode: str
    health: str  # "up", "backed off", "offline"
    health_note: str  # "until 12:00:03 UTC, 3 failures in a row", ""
    requests: int
    hit_rate: str  # "87%", "-" before any answer
    counts: dict[str, int]  # by result, and bytes_cache, bytes_upstream, fetches, failures
    entries: int


@dataclass(frozen=True)
class GroupView:
    key: str
    format: str
    members: tuple[str, ...]
    strategy: str


@dataclass(frozen=True)
class Overview:
    mode: str
    proxies: list[ProxyView]
    groups: list[GroupView]
    gauges: dict[str, int]
    results: tuple[str, ...] = RESULTS


def overview(engine: Engine) -> Overview:
    settings = engine.settings
    counts = engine.metrics.per_key()
    down = engine.health.down_until()
    engine.artifacts.wait_scanned(SCAN_WAIT)
    proxies = []
    for p in settings.proxies:
        mine = counts.get(p.key, {})
        answered = sum(mine.get(r, 0) for r in RESULTS)
        served = sum(mine.get(r, 0) for r in ("hit", "miss", "stale", "pass_through"))
        health, note = "up", ""
        if p.offline:
            health = "offline"
        elif p.key in down:
            until, failures = down[p.key]
            health, note = "backed off", f"until {iso_time(until)[11:]}, {failures} failures in a row"
        proxies.append(
            ProxyView(
                key=p.key,
                source=p.source,
                format=p.format,
                url=shown_url(engine, p.url),
                auth=p.auth.mode,
                mode=settings.mode,
                health=health,
                health_note=note,
                requests=answered,
                hit_rate=f"{100 * mine.get('hit', 0) / served:.0f}%" if served else "-",
                counts=mine,
                entries=engine.artifacts.count(p.key),
            )
        )
    groups = [GroupView(g.key, g.format, g.members, g.strategy) for g in settings.groups]
    return Overview(settings.mode, proxies, groups, engine.metrics.gauges())
