"""``cache prune``: remove entries least recently used first, then the blobs no entry names.

The eviction itself is the store's ``trim`` (store/trim.py), the same code the proxy's size cap
runs while it serves; ``prune`` adds what only a command has: the part files the cache's
opening already removed count in its report.  Safe while the cache is in use, with a grace
period for requests running at the same time (store/trim.py says how).
"""

from __future__ import annotations

from pytest_upstream.store.cache import Cache
from pytest_upstream.store.trim import DEFAULT_GRACE, TrimReport, trim

PruneReport = TrimReport
__all__ = ["DEFAULT_GRACE", "PruneReport", "prune"]


def prune(
    cache: Cache,
    *,
    max_size: int | None = None,
    older_than: float | None = None,
    grace: float = DEFAULT_GRACE,
    now: float | None = None,
    keep: frozenset[str] = frozenset(),
) -> PruneReport:
    """Remove entries unused for ``older_than`` seconds, or least recently used first while the
    blobs add up to more than ``max_size`` bytes, then the blobs no entry names, except those in
    ``keep`` (lock files' digests), and the part files of downloads that no longer run.

    "Used" is the entry file's mtime: written on a fetch, bumped by hits (at most once a minute).
    """
    report = trim(cache, max_size=max_size, older_than=older_than, grace=grace, now=now, keep=keep)
    # Part files of killed downloads: those the cache's opening removed, and any orphaned since.
    report.parts_removed += cache.orphans_at_open[0]
    report.part_bytes_freed += cache.orphans_at_open[1]
    cache.orphans_at_open = (0, 0)
    return report
