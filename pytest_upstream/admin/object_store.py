"""``cache ls|verify|prune|export|import --cache s3://BUCKET/PREFIX``: the admin commands on the
shared tier in a bucket (docs/object-storage.md § Administration).

They speak to the bucket through the storage seam (``S3Backend``) and the shared tier
(``RemoteTier``, strict: a failed request is an error here, not a degradation), and reuse the
directory commands' reports, so the output reads the same:

- ``ls``: the shared index (one GET per entry) and the totals of the blobs listed.
- ``verify``: every blob re-hashed as it streams (``delete_blob_if_corrupt``: only a blob whose
  bytes do not hash to its name is removed), every entry parsed and checked against its blob;
  a broken entry is removed only if it is still the version read.
- ``prune``: entries fetched longest ago first (an object store records no use: the fetch time
  is the age; a revalidation republishes it), by ``--older-than`` and ``--max-size``, never one
  whose blob a ``--keep-lock`` file names; then the blobs no entry names, written more than
  ``grace`` ago (by the store's clock).  Every delete is conditional on the version judged.
  Bucket lifecycle rules are the alternative (docs/object-storage.md).
- ``export``: the entries pulled (verified) into a temporary directory, then the directory
  command's deterministic archive: byte for byte what ``cache export`` makes of a directory.
- ``import``: the archive imported into a temporary directory with all of the directory
  command's checks, then every entry published (blob first, entry last, never over a newer one).

The size cap (``max_size``) applies to a machine's local tier only; nothing here trims it.
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_upstream.admin.archive import ExportReport, ImportReport, export_archive, import_into
from pytest_upstream.admin.listing import totals_json
from pytest_upstream.admin.verify import Problem, VerifyReport
from pytest_upstream.config.s3_location import S3Location
from pytest_upstream.repro.lockfile import LockFile
from pytest_upstream.store.cache import Cache
from pytest_upstream.store.entry import Entry, parse_entry
from pytest_upstream.store.remote_tier import RemoteTier
from pytest_upstream.store.s3 import S3Backend
from pytest_upstream.store.s3_inventory import delete_blob, list_blobs
from pytest_upstream.store.trim import TrimReport

STORE_GRACE = 3600.0  # an unreferenced blob younger than this may be a publish (or upload) under way


def open_store(location: S3Location) -> tuple[S3Backend, RemoteTier]:
    backend = S3Backend(location)
    return backend, RemoteTier(backend, location.url, strict=True)


@dataclass(frozen=True)
class StoredEntry:
    """One index object: its entry, or why it is not one."""

    key: str
    name: str
    version: str
    entry: Entry | None
    error: str = ""

    @property
    def rel(self) -> str:
        return f"index/{self.key}/{self.name}"


def scan_index(backend: S3Backend, key: str | None = None) -> list[StoredEntry]:
    found: list[StoredEntry] = []
    for k, name in backend.list_index(key):
        got = backend.get_index(k, name)
        if got is None:
            continue  # removed meanwhile
        try:
            found.append(StoredEntry(k, name, got.version, parse_entry(got.data, k, f"{name}.json")))
        except ValueError as exc:
            found.append(StoredEntry(k, name, got.version, None, str(exc)))
    return found


# -- ls --------------------------------------------------------------------------------------------
@dataclass
class StoreListing:
    entries: list[Entry]
    unreadable: list[StoredEntry]
    blobs: int
    blob_bytes: int
    unreferenced_blobs: int
    unreferenced_bytes: int

    @property
    def entry_bytes(self) -> int:
        return sum(e.size for e in self.entries)

    def as_json(self, now: float) -> dict[str, Any]:
        return {
            "entries": [
                {
                    "key": e.key,
                    "path": e.path,
                    "variant": e.variant,
                    "kind": e.kind,
                    "size": e.size,
                    "sha256": e.sha256,
                    "fetched_at": e.fetched_at,
                    "age": round(now - e.fetched_at, 3),
                }
                for e in self.entries
            ],
            "unreadable_entries": [s.rel for s in self.unreadable],
            "totals": totals_json(self),
        }


def list_store(backend: S3Backend, key: str | None = None) -> StoreListing:
    """The shared index (all, or one key's) with the blob totals of the whole store."""
    index = scan_index(backend)
    blobs = {b.sha256: b for b in list_blobs(backend)}
    referenced = {s.entry.sha256 for s in index if s.entry is not None}
    unreferenced = [b for sha, b in blobs.items() if sha not in referenced]
    shown = [s for s in index if key is None or s.key == key]
    entries = [s.entry for s in shown if s.entry is not None]
    entries.sort(key=lambda e: (e.key, e.path, e.variant))
    return StoreListing(
        entries=entries,
        unreadable=[s for s in shown if s.entry is None],
        blobs=len(blobs),
        blob_bytes=sum(b.size for b in blobs.values()),
        unreferenced_blobs=len(unreferenced),
        unreferenced_bytes=sum(b.size for b in unreferenced),
    )


# -- verify ----------------------------------------------------------------------------------------
def verify_store(backend: S3Backend) -> VerifyReport:
    """Re-hash every blob (removing those whose bytes do not hash to their name), then remove
    the entries that cannot be parsed, name a missing blob or claim another size."""
    report = VerifyReport()
    sizes: dict[str, int] = {}
    for blob in list_blobs(backend):
        report.blobs += 1
        report.blob_bytes += blob.size
        rel = f"blobs/{blob.sha256[:2]}/{blob.sha256}"
        if backend.delete_blob_if_corrupt(blob.sha256):
            report.problems.append(Problem("corrupt-blob", rel, "its bytes do not hash to its name", True))
        else:
            sizes[blob.sha256] = blob.size
    for stored in scan_index(backend):
        report.entries += 1
        problem = _entry_problem(backend, stored, sizes)
        if problem is not None:
            repaired = backend.delete_index(stored.key, stored.name, if_version=stored.version)
            report.problems.append(Problem(problem[0], stored.rel, problem[1], repaired))
    return report


def _entry_problem(backend: S3Backend, stored: StoredEntry, sizes: dict[str, int]) -> tuple[str, str] | None:
    entry = stored.entry
    if entry is None:
        return "unreadable-entry", stored.error
    size = sizes.get(entry.sha256)
    if size is None:  # not listed (or removed as corrupt): ask once more, it may have landed since
        info = backend.blob_stat(entry.sha256)
        if info is None:
            return "missing-blob", f"{entry.key} {entry.path}: blob {entry.sha256} is missing"
        size = info.size
    if size != entry.size:
        return "size-mismatch", f"{entry.key} {entry.path}: entry says {entry.size} bytes, blob has {size}"
    return None


# -- prune -----------------------------------------------------------------------------------------
def prune_store(
    backend: S3Backend,
    *,
    max_size: int | None = None,
    older_than: float | None = None,
    grace: float = STORE_GRACE,
    keep: frozenset[str] = frozenset(),
    now: float | None = None,
) -> TrimReport:
    """Remove entries fetched longest ago first (see the module docstring), then unreferenced blobs."""
    now = time.time() if now is None else now
    report = TrimReport()
    index = [s for s in scan_index(backend) if s.entry is not None]
    blobs = {b.sha256: b for b in list_blobs(backend)}
    report.size_before = sum(b.size for b in blobs.values())
    kept = {s.name: s for s in index}
    report.pinned_bytes = sum(blobs[sha].size for sha in keep if sha in blobs)
    candidates = sorted(
        (s for s in index if s.entry is not None and s.entry.sha256 not in keep),
        key=lambda s: s.entry.fetched_at if s.entry is not None else 0.0,
    )
    # The bytes of the blobs that kept entries (or the lock files) name, each blob once.
    names = Counter(s.entry.sha256 for s in index if s.entry is not None)
    named_bytes = sum(blobs[sha].size for sha in set(names) | set(keep) if sha in blobs)
    for stored in candidates:
        entry = stored.entry
        assert entry is not None
        too_old = older_than is not None and entry.fetched_at < now - older_than
        too_big = max_size is not None and named_bytes > max_size
        if not (too_old or too_big):
            continue
        if backend.delete_index(stored.key, stored.name, if_version=stored.version):
            del kept[stored.name]
            report.removed.append(entry)
            names[entry.sha256] -= 1
            if names[entry.sha256] == 0 and entry.sha256 in blobs and entry.sha256 not in keep:
                named_bytes -= blobs[entry.sha256].size
        else:
            report.used_meanwhile += 1  # replaced (republished) since it was read: kept
    named = {s.entry.sha256 for s in kept.values() if s.entry is not None} | set(keep)
    for sha, blob in sorted(blobs.items()):
        if sha in named:
            continue
        if blob.modified > now - grace:
            report.recent_bytes += blob.size
        elif delete_blob(backend, blob):
            report.blobs_removed += 1
            report.bytes_freed += blob.size
    report.size_after = report.size_before - report.bytes_freed
    return report


# -- export / import -------------------------------------------------------------------------------
@dataclass
class StoreExport:
    report: ExportReport
    skipped: list[str] = field(default_factory=list)  # entries whose blob was missing or corrupt


def export_store(tier: RemoteTier, dest: Path, lock: LockFile | None = None) -> StoreExport:
    """The shared cache (or what ``lock`` names) as ``cache export``'s archive."""
    backend = tier.backend
    skipped: list[str] = []
    with tempfile.TemporaryDirectory(prefix="upstream-export-") as tmp:
        cache = Cache(Path(tmp) / "cache")
        wanted = None if lock is None else {(le.key, le.path, le.variant) for le in lock}
        for k, name in backend.list_index():
            got = backend.get_index(k, name)
            if got is None:
                continue
            try:
                entry = parse_entry(got.data, k, f"{name}.json")
            except ValueError:
                continue  # `cache verify` reports it
            if wanted is not None and (entry.key, entry.path, entry.variant) not in wanted:
                continue
            if tier.pull(cache, entry.key, entry.path, entry.variant) is None:
                skipped.append(f"{entry.key} {entry.path}")
        for le in lock or ():  # the lock's bytes even where the index moved on (superseded)
            if cache.verified_digest(le.sha256, le.size) is None:
                _pull_blob(tier, cache, le.sha256, le.size)
        return StoreExport(export_archive(cache, dest, lock), skipped)


def _pull_blob(tier: RemoteTier, cache: Cache, sha256: str, size: int) -> None:
    """One blob into ``cache``, verified (a missing one is left for ``export_archive`` to name)."""
    try:
        source = tier.backend.open_blob(sha256)
    except FileNotFoundError:
        return
    writer = cache.writer(reserve=size)
    with source:
        while chunk := source.read(1024 * 1024):
            writer.write(chunk)
    cache.commit_blob(writer, {"sha256": sha256}, f"{tier.where} blob {sha256}")


@dataclass
class StoreImport:
    report: ImportReport  # what the archive held (its checks, as for a directory)
    published: int = 0  # entries now in the shared index
    kept: int = 0  # entries the store had newer: theirs kept


def import_store(tier: RemoteTier, src: Path, lock_timeout: float = 30.0) -> StoreImport:
    with tempfile.TemporaryDirectory(prefix="upstream-import-") as tmp:
        cache, report = import_into(Path(tmp) / "cache", src, lock_timeout)
        result = StoreImport(report)
        for entry in cache.iter_entries():
            if tier.publish(cache, entry):
                result.published += 1
            else:
                result.kept += 1
        return result
