"""The shared cache: content-addressed blobs plus a small index of entries.

Layout under the cache root (see docs/cache.md)::

    VERSION                         layout version ("1")
    blobs/sha256/<2 hex>/<64 hex>   the bytes, named by their sha256
    entries/<key>/<2 hex>/<id>.json one index entry per cached request
    locks/<key>/<2 hex>/<id>.lock   one file lock per entry
    tmp/                            downloads in progress (same filesystem)

Every guarantee lives here: blobs and entries are written to ``tmp/``,
fsynced and renamed into place, so a reader sees a whole file or none; an
entry is written only after its blob, so an entry never names a missing
blob; each entry has a file lock so concurrent misses fetch once; and a blob
is re-hashed on its first use in each process, so a blob corrupted on disk is
removed instead of served.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

import filelock

LAYOUT_VERSION = "1"
_CHUNK = 1024 * 1024
_STALE_TMP_SECONDS = 24 * 3600
_ENTRY_MEMO_SIZE = 10_000
# A hit sets its entry file's mtime to now (the clock of ``cache prune``'s LRU order) when the
# mtime is older than this, so a warm entry costs one utime a minute, not one per hit.
USE_STAMP_INTERVAL = 60.0


class CacheError(RuntimeError):
    """The cache could not be read or written."""


class DigestMismatch(CacheError):
    """Downloaded bytes do not match the digest the upstream published."""


class LockTimeout(CacheError):
    """Another process held an entry's lock for longer than the timeout."""


@dataclass(frozen=True)
class Entry:
    """What the index knows about one cached response."""

    key: str
    path: str
    variant: str
    upstream_url: str
    sha256: str
    size: int
    kind: str  # "metadata" | "artifact"
    fetched_at: float
    content_type: str | None = None
    etag: str | None = None
    last_modified: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def is_metadata(self) -> bool:
        return self.kind == "metadata"

    def age(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.fetched_at


def entry_id(key: str, path: str, variant: str) -> str:
    """Stable file name for an entry: paths may be long or hold any character."""
    return hashlib.sha256(f"{key}\0{path}\0{variant}".encode()).hexdigest()


class BlobWriter:
    """A download in progress: bytes go to a temp file while being hashed."""

    def __init__(self, tmp_dir: Path, algorithms: tuple[str, ...] = ()) -> None:
        self.path = tmp_dir / f"{uuid.uuid4().hex}.part"
        self._file: BinaryIO = open(self.path, "xb")  # noqa: SIM115 - closed in finish/discard
        self._hashes = {"sha256": hashlib.sha256()}
        for algo in algorithms:
            self._hashes.setdefault(algo, hashlib.new(algo))
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self._file.write(chunk)
        for h in self._hashes.values():
            h.update(chunk)
        self.size += len(chunk)

    def finish(self) -> dict[str, str]:
        """Flush and return the digests (hex) of what was written; ``sync`` makes it durable."""
        self._file.flush()
        return {algo: h.hexdigest() for algo, h in self._hashes.items()}

    def sync(self) -> None:
        os.fsync(self._file.fileno())
        self._file.close()

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def verify_digests(actual: dict[str, str], expected: dict[str, str], what: str) -> None:
    for algo, want in expected.items():
        got = actual.get(algo)
        if got is None:
            raise CacheError(f"cannot verify {what}: digest {algo} was not computed")
        if got.lower() != want.lower():
            raise DigestMismatch(f"{what}: {algo} digest mismatch: upstream published {want}, got {got}")


class Cache:
    """One cache directory; safe to share between threads and processes."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs" / "sha256"
        self.entries = self.root / "entries"
        self.locks = self.root / "locks"
        self.tmp = self.root / "tmp"
        for d in (self.blobs, self.entries, self.locks, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        version = self.root / "VERSION"
        if not version.exists():
            self._write_atomic(version, LAYOUT_VERSION.encode())
        elif (found := version.read_text().strip()) != LAYOUT_VERSION:
            raise CacheError(f"{self.root}: cache layout version {found!r}, expected {LAYOUT_VERSION!r}")
        self._blobs_str = str(self.blobs)
        self._entries_str = str(self.entries)
        self._entry_memo: dict[str, tuple[tuple[int, int, int], Entry]] = {}
        self._verified: dict[tuple[str, int, int, int], Path] = {}  # stamp -> blob path
        self._verified_lock = threading.Lock()
        self._remove_stale_tmp()

    # -- paths -------------------------------------------------------------
    # Plain string joins: these run on every cache hit, where pathlib's
    # parsing was the largest single cost.
    def blob_path(self, sha256: str) -> Path:
        return Path(f"{self._blobs_str}/{sha256[:2]}/{sha256}")

    def _entry_path(self, key: str, eid: str) -> Path:
        return Path(self._entry_str(key, eid))

    def _entry_str(self, key: str, eid: str) -> str:
        return f"{self._entries_str}/{key}/{eid[:2]}/{eid}.json"

    # -- index -------------------------------------------------------------
    def lookup(self, key: str, path: str, variant: str = "") -> Entry | None:
        """The entry for a request, or None; unreadable entries count as absent.

        Also records the use for ``cache prune`` (see ``USE_STAMP_INTERVAL``).
        """
        return self._read_entry(self._entry_str(key, entry_id(key, path, variant)), mark_used=True)

    def _read_entry(self, file: str | Path, mark_used: bool = False) -> Entry | None:
        """Parse an entry file, memoised by its (inode, size, mtime): entries are
        replaced by rename, so any change shows up as a new signature."""
        name = str(file)
        try:
            st = os.stat(name)
        except OSError:
            return None
        signature = (st.st_ino, st.st_size, st.st_mtime_ns)
        memo = self._entry_memo.get(name)
        if memo is not None and memo[0] == signature:
            entry = memo[1]
        else:
            try:
                with open(name, "rb") as f:
                    entry = Entry(**json.loads(f.read()))
            except (ValueError, TypeError, OSError):
                return None
            if len(self._entry_memo) >= _ENTRY_MEMO_SIZE:
                self._entry_memo.clear()
            self._entry_memo[name] = (signature, entry)
        if mark_used and st.st_mtime < time.time() - USE_STAMP_INTERVAL:
            self._mark_used(name, signature, entry)
        return entry

    def _mark_used(self, name: str, signature: tuple[int, int, int], entry: Entry) -> None:
        """Set an entry file's mtime to now; the memo follows, so the next hit does not re-parse.

        Best effort: an entry removed meanwhile or a read-only cache just keeps its old time.
        If the file was replaced since ``signature`` was taken, it has another inode, so the
        moved memo signature can never match it.
        """
        now = time.time_ns()
        try:
            os.utime(name, ns=(now, now))
        except OSError:
            return
        memo = self._entry_memo.get(name)
        if memo is not None and memo[0] == signature:
            self._entry_memo[name] = ((signature[0], signature[1], now), entry)

    def iter_entries(self, key: str | None = None) -> Iterator[Entry]:
        base = self.entries / key if key else self.entries
        for file in sorted(base.rglob("*.json")):
            if (entry := self._read_entry(file)) is not None:
                yield entry

    def store_entry(self, entry: Entry, *, durable: bool = True) -> Entry:
        """Write an entry atomically; its blob must already be in place.

        ``durable=False`` skips the fsyncs, for entries whose loss in a crash
        costs only a repeated upstream request (remembered 404s): they were
        two thirds of a cold Maven build's fsyncs.
        """
        if not self.blob_path(entry.sha256).is_file():
            raise CacheError(f"refusing to index {entry.path}: blob {entry.sha256} is missing")
        target = self._entry_path(entry.key, entry_id(entry.key, entry.path, entry.variant))
        self._write_atomic(target, json.dumps(asdict(entry), sort_keys=True).encode(), durable=durable)
        return entry

    def touch(self, entry: Entry, **changes: Any) -> Entry:
        """Mark revalidated metadata as fresh again."""
        return self.store_entry(replace(entry, fetched_at=time.time(), **changes))

    def remove_entry(self, entry: Entry) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._entry_path(entry.key, entry_id(entry.key, entry.path, entry.variant)).unlink()

    # -- blobs -------------------------------------------------------------
    def writer(self, algorithms: tuple[str, ...] = ()) -> BlobWriter:
        return BlobWriter(self.tmp, algorithms)

    def commit_blob(self, writer: BlobWriter, expected: dict[str, str], what: str) -> tuple[str, int]:
        """Finish a download, verify it, and move it into the store.

        On any failure the temp file is removed and nothing is stored.
        """
        try:
            digests = writer.finish()
            verify_digests(digests, expected, what)
            sha = digests["sha256"]
            target = self.blob_path(sha)
            try:
                if target.stat().st_size == writer.size:
                    # Already stored (content addressing): no second write or fsync. A
                    # damaged copy is caught by verified_blob on its first use. The new
                    # mtime keeps `cache prune` (which spares recent blobs) off a blob
                    # that is about to be indexed again.
                    os.utime(target)
                    return sha, writer.size
            except FileNotFoundError:
                pass
            writer.sync()
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(writer.path, target)  # same content, same name: replacing is harmless
            fsync_dir(target.parent)
            self._mark_verified(target, sha)
            return sha, writer.size
        finally:
            writer.discard()

    def store_bytes(self, data: bytes) -> str:
        w = self.writer()
        w.write(data)
        sha, _ = self.commit_blob(w, {}, "bytes")
        return sha

    def verified_blob(self, entry: Entry) -> Path | None:
        """The blob's path if it is whole and matches its digest, else None.

        A corrupt blob is deleted (with its entry) so it is never served.
        The hash is recomputed once per process per (inode, size, mtime).
        """
        path = self.verified_digest(entry.sha256, entry.size)
        if path is None:
            self.remove_entry(entry)
        return path

    def verified_digest(self, sha256: str, size: int) -> Path | None:
        """The blob named ``sha256`` if it is whole and intact, else None (a corrupt one is deleted).

        Touches no entry: a lock file names bytes, not the index's current answer.
        """
        try:
            st = os.stat(f"{self._blobs_str}/{sha256[:2]}/{sha256}")
        except FileNotFoundError:
            return None
        stamp = (sha256, st.st_ino, st.st_size, st.st_mtime_ns)
        with self._verified_lock:
            known = self._verified.get(stamp)
        if known is not None and st.st_size == size:
            return known
        path = self.blob_path(sha256)
        if st.st_size != size or _sha256_file(path) != sha256:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return None
        with self._verified_lock:
            self._verified[stamp] = path
        return path

    def _mark_verified(self, path: Path, sha: str) -> None:
        st = path.stat()
        with self._verified_lock:
            self._verified[(sha, st.st_ino, st.st_size, st.st_mtime_ns)] = path

    # -- locks -------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self, key: str, path: str, variant: str, timeout: float) -> Iterator[None]:
        """Hold the entry's lock; the OS drops it if the holder dies."""
        eid = entry_id(key, path, variant)
        lock_path = self.locks / key / eid[:2] / f"{eid}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(lock_path, thread_local=False, is_singleton=False)
        try:
            lock.acquire(timeout=timeout)
        except filelock.Timeout:
            raise LockTimeout(
                f"timed out after {timeout:g}s waiting for another process to fetch {path!r} for {key!r}"
            ) from None
        try:
            yield
        finally:
            lock.release()

    # -- helpers -----------------------------------------------------------
    def _write_atomic(self, target: Path, data: bytes, *, durable: bool = True) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp / f"{uuid.uuid4().hex}.part"
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, target)
        if durable:
            fsync_dir(target.parent)

    def _remove_stale_tmp(self) -> None:
        cutoff = time.time() - _STALE_TMP_SECONDS
        for file in self.tmp.glob("*.part"):
            with contextlib.suppress(OSError):
                if file.stat().st_mtime < cutoff:
                    file.unlink()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX); shared by every writer of the cache."""
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
