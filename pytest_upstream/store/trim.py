"""Shrinking a cache directory while it is in use: least recently used entries first, then the
blobs no entry names.  The one eviction of the project: ``cache prune`` (admin/prune.py) and the
proxy's size cap (``max_size``, engine/trimmer.py) both call ``trim``.

"Used" is the entry file's mtime: written on a fetch, bumped by hits (at most once a minute,
store/cache.py ``USE_STAMP_INTERVAL``), so the order costs no write per hit.  The size counted
is the bytes of the blobs on disk (entries, markers and locks are a few hundred bytes each;
part files of downloads in flight are not counted).

Safe while the cache is in use (store/inventory.py), with a grace period for requests running
at the same time: a blob is deleted only when no entry has named it for ``pause`` seconds, and
never a blob written in the last ``grace`` seconds, so a request that read its entry just
before the entry went still finds the blob when it opens it (and, once open, reads it to the
end: an unlinked file lives while a descriptor is open on it), and a fetch that just stored a
blob can still index it (``grace=0`` is only for a cache nobody else is using); to meet a size,
an entry whose blob is that fresh stays too (removing it would free nothing yet).  Never removed:
an entry whose lock is held (being fetched, its part file open), an entry used or replaced
since it was judged, the blobs in ``keep`` (what lock files name).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pytest_upstream.store.blobs import remove_marker
from pytest_upstream.store.cache import Cache, Entry, LockTimeout
from pytest_upstream.store.inventory import BlobFile, evict_blob, remove_entry_file, scan_blobs, scan_entries
from pytest_upstream.store.layout import dir_names

DEFAULT_GRACE = 5.0


@dataclass
class TrimReport:
    size_before: int = 0  # bytes of blobs on disk
    size_after: int = 0
    removed: list[Entry] = field(default_factory=list)
    busy: list[Entry] = field(default_factory=list)  # lock held: skipped
    used_meanwhile: int = 0  # hit or replaced after the scan: kept
    blobs_removed: int = 0
    bytes_freed: int = 0
    # What keeps the size up when it stays above the target:
    pinned_bytes: int = 0  # blobs the kept lock files name (their entries are kept too)
    session_bytes: int = 0  # blobs of entries spared as used by the session (spare_used_since)
    busy_bytes: int = 0  # blobs of busy entries
    recent_bytes: int = 0  # unreferenced blobs written within the grace period
    parts_removed: int = 0  # part files of killed downloads (Cache.remove_orphan_parts)
    part_bytes_freed: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "size_before": self.size_before,
            "size_after": self.size_after,
            "entries_removed": [{"key": e.key, "path": e.path, "variant": e.variant} for e in self.removed],
            "entries_busy": [{"key": e.key, "path": e.path, "variant": e.variant} for e in self.busy],
            "entries_used_meanwhile": self.used_meanwhile,
            "blobs_removed": self.blobs_removed,
            "bytes_freed": self.bytes_freed,
            "pinned_bytes": self.pinned_bytes,
            "busy_bytes": self.busy_bytes,
            "recent_bytes": self.recent_bytes,
            "parts_removed": self.parts_removed,
            "part_bytes_freed": self.part_bytes_freed,
        }


def trim(
    cache: Cache,
    *,
    max_size: int | None = None,
    older_than: float | None = None,
    grace: float = DEFAULT_GRACE,
    now: float | None = None,
    keep: frozenset[str] = frozenset(),
    start_above: int | None = None,
    pause: float | None = None,
    sleep: Callable[[float], object] = time.sleep,
    cancelled: Callable[[], bool] = lambda: False,
    spare_used_since: float | None = None,
) -> TrimReport:
    """Remove entries least recently used first, then the blobs no entry names, and the part
    files of downloads that no longer run (their entry lock is free: store/cache.py).

    An entry goes when it was last used more than ``older_than`` seconds before ``now``, or
    while the blobs add up to more than ``max_size`` bytes.  With neither, only unreferenced
    blobs go.  ``start_above``: do nothing unless the blobs on disk add up to more than this
    (the size cap trims to a low-water mark, and only once the cap is passed).

    Blobs in ``keep`` (the digests lock files name: a locked replay serves them by digest,
    whatever the index says) are never removed.  Their entries go only when they are too old
    (``older_than``), never to meet ``max_size``: removing them would free nothing.

    ``spare_used_since``: no entry used since this time (a file time) goes to meet ``max_size``:
    what a session that will write a lock file used (store/cache.py bumps a use at most once a
    ``USE_STAMP_INTERVAL``, so pass the session's start less that).

    ``grace`` is judged against ``now`` (the caller's clock); ``pause`` (default ``grace``) is
    real time waited, with ``sleep``, between removing entries and removing their blobs; when
    ``cancelled()`` says so after it (the proxy is closing), the blobs are left for a later pass.
    """
    now = time.time() if now is None else now
    pause = grace if pause is None else pause
    report = TrimReport()
    blobs, _ = scan_blobs(cache)
    report.size_before = sum(b.size for b in blobs.values())
    if start_above is not None and report.size_before <= start_above:
        report.size_after = report.size_before
        return report
    report.parts_removed, report.part_bytes_freed = cache.remove_orphan_parts()
    files = [f for f in scan_entries(cache) if f.entry is not None]
    refs = Counter(f.entry.sha256 for f in files if f.entry is not None)
    refs.update(keep)
    size = sum(b.size for sha, b in blobs.items() if refs[sha] or b.mtime > now - grace)
    report.pinned_bytes = sum(b.size for sha, b in blobs.items() if sha in keep)
    busy_shas: set[str] = set()
    recent_shas: set[str] = set()
    by_use = sorted(files, key=lambda f: (f.mtime_ns, f.rel))
    for n, ef in enumerate(by_use):
        assert ef.entry is not None
        too_old = older_than is not None and ef.last_used < now - older_than
        too_big = max_size is not None and size > max_size
        if not (too_old or too_big):
            break  # sorted oldest first: nothing later is older, and the size only went down
        if not too_old and spare_used_since is not None and ef.last_used >= spare_used_since:
            spared = {f.entry.sha256 for f in by_use[n:] if f.entry is not None} - keep
            report.session_bytes = sum(blobs[sha].size for sha in spared if sha in blobs)
            break  # used by the session, and so is every entry after it
        if not too_old and ef.entry.sha256 in keep:
            continue  # pinned: removing the entry would free nothing
        blob = blobs.get(ef.entry.sha256)
        if not too_old and (blob is None or blob.mtime > now - grace):
            recent_shas.add(ef.entry.sha256)
            continue  # just stored (or after the scan): its blob could not go yet, so the entry stays
        try:
            removed = remove_entry_file(cache, ef, still_bad=lambda _: True, raise_busy=True)
        except LockTimeout:
            report.busy.append(ef.entry)
            busy_shas.add(ef.entry.sha256)
            continue
        if not removed:
            report.used_meanwhile += 1
            continue
        report.removed.append(ef.entry)
        refs[ef.entry.sha256] -= 1
        if not refs[ef.entry.sha256] and blob is not None and blob.mtime <= now - grace:
            size -= blob.size
    report.busy_bytes = sum(blobs[sha].size for sha in busy_shas - keep if sha in blobs)
    report.recent_bytes = sum(
        b.size
        for sha, b in blobs.items()
        if (not refs[sha] or sha in recent_shas) and sha not in keep and b.mtime > now - grace
    )
    # unreferenced now; a blob written within the grace period may be about to be indexed
    candidates = sorted(sha for sha, b in blobs.items() if not refs[sha] and b.mtime <= now - grace)
    if candidates and pause > 0:
        sleep(pause)  # a request that read an entry before it went has opened its blob by now
    if cancelled():
        candidates = []
    referenced = {f.entry.sha256 for f in scan_entries(cache) if f.entry is not None} | keep
    for sha in candidates:
        if sha in referenced:
            continue
        freed = evict_blob(cache, blobs[sha].path, blobs[sha].ino, min_age=grace, now=now)
        if freed is not None:
            report.blobs_removed += 1
            report.bytes_freed += freed
    after, _ = scan_blobs(cache)
    report.size_after = sum(b.size for b in after.values())
    _remove_orphan_markers(cache, after)
    return report


def _remove_orphan_markers(cache: Cache, blobs: dict[str, BlobFile]) -> None:
    """Verification markers of blobs that are gone (removed by hand, or by an older version).

    A marker is written after its blob is in place, so one without a blob is never about to
    be used; removing one by mistake would cost a single hash.
    """
    for prefix in sorted(dir_names(cache.layout.verified)):
        for name in sorted(dir_names(cache.layout.verified / prefix)):
            if name not in blobs and not os.path.exists(cache.layout.blob(name)):
                remove_marker(cache.layout, name)
