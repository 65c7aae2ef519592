"""``cache verify``: re-hash every blob and check every entry; remove what is broken.

The rule is the proxy's (store/cache.py): a blob is removed only when its bytes do not hash
to its name.  An entry that claims another size than its intact blob has is a wrong entry:
the entry goes, the blob stays.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from pytest_upstream.store.blobs import stamp_of
from pytest_upstream.store.cache import Cache
from pytest_upstream.store.entry import Entry
from pytest_upstream.store.inventory import (
    EntryFile,
    evict_blob,
    rel,
    remove_entry_file,
    scan_blobs,
    scan_entries,
)


@dataclass(frozen=True)
class Problem:
    kind: str  # corrupt-blob | stray-file | unreadable-entry | missing-blob | size-mismatch
    path: str  # below the cache root
    detail: str
    repaired: bool


@dataclass
class VerifyReport:
    blobs: int = 0
    blob_bytes: int = 0
    entries: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "blobs": self.blobs,
            "blob_bytes": self.blob_bytes,
            "entries": self.entries,
            "problems": [asdict(p) for p in self.problems],
        }


def verify(cache: Cache) -> VerifyReport:
    """Re-hash every blob and check every entry; remove what is broken.

    Removed: blobs whose bytes do not match their name (and stray files under ``blobs/``),
    entry files that cannot be parsed or sit under the wrong name, and entries whose blob is
    missing or has another size (the blob is kept: it is intact).  An entry whose lock is held
    is left alone (a fetch is replacing it) and reported as not repaired.  Every blob found
    intact gets a fresh verification marker, so the proxy does not hash it again.
    """
    report = VerifyReport()
    blobs, stray = scan_blobs(cache)
    for path in stray:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        report.problems.append(Problem("stray-file", rel(cache, path), "not named by a sha256", True))
    for sha, blob in sorted(blobs.items()):
        try:
            with open(blob.path, "rb") as f:
                before = stamp_of(os.fstat(f.fileno()))
                actual = hashlib.file_digest(f, "sha256").hexdigest()
                after = stamp_of(os.fstat(f.fileno()))
        except FileNotFoundError:
            continue  # pruned meanwhile
        report.blobs += 1
        report.blob_bytes += after[1]
        if actual != sha:
            removed = evict_blob(cache, blob.path, after[0], min_age=0.0) is not None
            report.problems.append(
                Problem("corrupt-blob", rel(cache, blob.path), f"its bytes hash to {actual}", removed)
            )
        elif before == after:
            cache.verifier.remember(sha, after, marker=True)
    for ef in scan_entries(cache):
        report.entries += 1
        problem = (
            Problem("unreadable-entry", ef.rel, ef.error, False)
            if ef.entry is None
            else _blob_problem(cache, ef.entry, ef.rel)
        )
        if problem is None:
            continue
        repaired = remove_entry_file(cache, ef, still_bad=lambda e: _still_bad(cache, e))
        report.problems.append(Problem(problem.kind, problem.path, problem.detail, repaired))
    return report


def _blob_problem(cache: Cache, entry: Entry, rel_path: str) -> Problem | None:
    try:
        size = os.stat(cache.blob_path(entry.sha256)).st_size
    except FileNotFoundError:
        return Problem(
            "missing-blob", rel_path, f"{entry.key} {entry.path}: blob {entry.sha256} is missing", False
        )
    if size != entry.size:
        detail = (
            f"{entry.key} {entry.path}: entry says {entry.size} bytes, blob {entry.sha256} has {size} "
            "(the blob is kept)"
        )
        return Problem("size-mismatch", rel_path, detail, False)
    return None


def _still_bad(cache: Cache, ef: EntryFile) -> bool:
    return ef.entry is None or _blob_problem(cache, ef.entry, ef.rel) is not None
