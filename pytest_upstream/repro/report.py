"""``--upstream-report``: what each test used, and the summary of tests that needed the network.

Built from ``ServedRecord``s on each xdist worker (``usage``), combined on the
controller (``combine_usage``) and written as deterministic JSON: tests sorted
by node id, each test's items sorted and without duplicates, no timestamps.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pytest_upstream.config.settings import Settings
from pytest_upstream.config.units import plural
from pytest_upstream.formats import get_format
from pytest_upstream.formats.base import Kind, Resource
from pytest_upstream.repro.served import ServedRecord
from pytest_upstream.store.files import atomic_write

REPORT_VERSION = 1
OUTSIDE = "(outside a test)"
_LISTED = 20  # tests listed in the terminal summary before "... and N more"


def describe(settings: Settings, record: ServedRecord) -> dict[str, str]:
    """What the record's format says it is (name, version, ...), from its path: {} when it cannot tell."""
    proxy = settings.proxy(record.key)
    if proxy is None or record.kind not in (Kind.METADATA.value, Kind.ARTIFACT.value):
        return {}
    fmt = get_format(proxy.format)
    if fmt is None:
        return {}
    return fmt.describe(Resource(record.path, record.upstream_url, Kind(record.kind)))


def _item(settings: Settings, record: ServedRecord) -> dict[str, Any]:
    item: dict[str, Any] = {
        "key": record.key,
        "path": record.path,
        **describe(settings, record),
        "sha256": record.sha256,
        "size": record.size,
        "cache": record.cache,
        "status": record.status,
        "upstream_url": record.upstream_url,
    }
    if record.variant:
        item["variant"] = record.variant
    if record.method != "GET":
        item["method"] = record.method
    if record.hidden:  # what a release policy took out of this metadata (docs/rules.md)
        item["hidden"] = sorted(record.hidden)
    return item


def _sorted_unique(items: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    unique = {json.dumps(item, sort_keys=True): dict(item) for item in items}
    return [unique[k] for k in sorted(unique, key=lambda k: (unique[k]["key"], unique[k]["path"], k))]


def usage(settings: Settings, records: Iterable[ServedRecord]) -> dict[str, list[dict[str, Any]]]:
    """Per test node id: what it was served (key, path, name/version, digest, size, cache, URL)."""
    per_test: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        per_test.setdefault(record.test or OUTSIDE, []).append(_item(settings, record))
    return {test: _sorted_unique(items) for test, items in sorted(per_test.items())}


def combine_usage(parts: Iterable[Mapping[str, list[dict[str, Any]]]]) -> dict[str, list[dict[str, Any]]]:
    merged: dict[str, list[dict[str, Any]]] = {}
    for part in parts:
        for test, items in part.items():
            merged.setdefault(test, []).extend(items)
    return {test: _sorted_unique(items) for test, items in sorted(merged.items())}


def write_report(path: Path, mode: str, tests: Mapping[str, list[dict[str, Any]]]) -> None:
    """Write atomically, readable like any file the user writes; the same session gives the same bytes."""
    data = {"version": REPORT_VERSION, "mode": mode, "tests": dict(sorted(tests.items()))}
    atomic_write(Path(path), (json.dumps(data, indent=1, sort_keys=True) + "\n").encode("utf-8"))


def misses_by_test(records: Iterable[ServedRecord]) -> dict[str, int]:
    """Tests that needed the network: the number of cache misses each had."""
    counts = Counter(r.test or OUTSIDE for r in records if r.cache == "miss")
    return dict(sorted(counts.items()))


def network_lines(reports: Iterable[Mapping[str, Any]]) -> list[str]:
    """Terminal summary lines: tests that had misses, and connections that were blocked."""
    reports = list(reports)
    misses: Counter[str] = Counter()
    blocked: set[tuple[str, str]] = set()
    for report in reports:
        misses.update(report.get("misses_by_test", {}))
        blocked.update((str(target), str(test)) for target, test in report.get("blocked", []))
    lines = []
    if misses:
        lines.append(f"tests that needed the network ({len(misses)}):")
        for test in sorted(misses)[:_LISTED]:
            n = misses[test]
            lines.append(f"  {test}: {plural(n, 'miss')}")
        if len(misses) > _LISTED:
            lines.append(f"  ... and {len(misses) - _LISTED} more (--upstream-report FILE lists them all)")
    if blocked:
        lines.append(
            f"network connections blocked ({len(blocked)}): the build tried to reach these directly:"
        )
        for target, test in sorted(blocked, key=lambda b: (b[1], b[0])):
            lines.append(f"  {test or OUTSIDE}: {target}")
    return lines
