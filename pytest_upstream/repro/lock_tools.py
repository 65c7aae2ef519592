"""Lock files around a session: combining workers' entries, and checking a cache against a lock.

The model (``LockFile``, ``LockFileEntry``, deterministic ``dumps``) is in ``lockfile.py``;
the engine collects entries and serves replays from them (``Engine.remember``,
``Engine._locked_blob``).  See docs/reproducible-builds.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pytest_upstream.config.units import plural
from pytest_upstream.repro.lockfile import LockError, LockFile, LockFileEntry
from pytest_upstream.store.blobs import Verifier
from pytest_upstream.store.entry import NOT_FOUND
from pytest_upstream.store.layout import Layout

WRITING_MODES = ("record", "refresh")  # the session modes that (re)write the lock file


def lock_data(lock: LockFile) -> list[dict[str, Any]]:
    """Plain data for a lock's entries (what an xdist worker sends to the controller)."""
    return [asdict(entry) for entry in lock]


def combined_lock(reports: Iterable[Mapping[str, Any]]) -> LockFile:
    """One lock from the workers' reports, in worker order (``worker`` field; later wins).

    Two workers hold different bytes for one request only if the upstream changed
    during the run; the lock then keeps the last worker's (record again to settle it).
    """
    lock = LockFile()
    for report in sorted(reports, key=lambda r: str(r.get("worker", ""))):
        for raw in report.get("lock", []):
            lock.add(LockFileEntry.from_dict(raw))
    return lock


def write_lock(path: Path, served: LockFile) -> str:
    """Rewrite the lock with exactly what a record or refresh session served; says what changed.

    The change counts make a lock written by a run of only some of the tests stand out.
    """
    path = Path(path)
    try:
        before = {e.identity: e for e in LockFile.load(path)} if path.is_file() else {}
    except LockError:
        before = {}
    after = {e.identity: e for e in served}
    served.save(path)
    added = sum(1 for i in after if i not in before)
    removed = sum(1 for i in before if i not in after)
    changed = sum(1 for i in after if i in before and before[i] != after[i])
    return f"{path} ({plural(len(after), 'entry')}: {added} added, {changed} changed, {removed} removed)"


def verify(lock: LockFile, cache_dir: Path) -> list[str]:
    """One line per entry whose bytes the cache lacks or holds damaged; reads, never changes.

    Remembered 404s (kind ``notfound``) have no bytes and always pass.  A lock line that
    claims another size than its intact blob has is a wrong lock line, not a damaged blob.
    A blob another process already verified (store/blobs.py) is not read again.
    """
    verifier = Verifier(Layout(Path(cache_dir)), write_markers=False)
    problems = []
    for entry in lock:
        if entry.kind == NOT_FOUND:
            continue
        what = f"{entry.key} {entry.path}" + (f" [{entry.variant}]" if entry.variant else "")
        what += f" sha256 {entry.sha256} ({plural(entry.size, 'byte')})"
        verdict = verifier.check(entry.sha256)
        if verdict.state == "missing":
            problems.append(f"missing: {what}")
        elif verdict.state == "corrupt":
            problems.append(f"corrupt: {what}: the blob hashes to {verdict.actual}")
        elif verdict.size != entry.size:
            problems.append(
                f"wrong size: {what}: the lock file says {plural(entry.size, 'byte')}, the blob has "
                f"{plural(verdict.size, 'byte')} (the blob is intact: fix or record the lock file again)"
            )
    return problems
