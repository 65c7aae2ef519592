"""The shared cache: content-addressed blobs plus a small index of entries.

The layout is in ``layout.py``, the entry format and its one parser in ``entry.py``, blob
verification in ``blobs.py``, entry locks in ``locks.py`` (docs/cache.md).

Every guarantee lives in this package: blobs and entries are written with ``AtomicFile``
(temp file, fsync, rename), so a reader sees a whole file or none; an entry is written only
after its blob, so an entry never names a missing blob; each entry has a lock so concurrent
misses fetch once; a blob's bytes are hashed before it is first served (once per change of
the file, whichever process asks first), and a blob is deleted only when its bytes do not
hash to its name: an entry or a lock file that claims another size is a wrong claim, and the
valid bytes stay.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from pytest_upstream.store.blobs import Verifier, stamp_of
from pytest_upstream.store.early_sync import EarlySync
from pytest_upstream.store.entry import Entry, entry_bytes, entry_id, parse_entry
from pytest_upstream.store.errors import (
    CacheError,
    ClaimMismatch,
    DigestMismatch,
    LockTimeout,
    StoreFailed,
    cannot_store,
)
from pytest_upstream.store.files import AtomicFile, atomic_write, fsync_dir, is_temporary
from pytest_upstream.store.hasher import Hasher
from pytest_upstream.store.layout import LAYOUT_VERSION, Layout, dir_names
from pytest_upstream.store.local import LocalBackend
from pytest_upstream.store.locks import striped_locks

log = logging.getLogger("pytest_upstream")

__all__ = [
    "LAYOUT_VERSION",
    "UNKNOWN",
    "USE_STAMP_INTERVAL",
    "BlobWriter",
    "Cache",
    "CacheError",
    "ClaimMismatch",
    "DigestMismatch",
    "Entry",
    "LockTimeout",
    "StoreFailed",
    "entry_id",
    "fsync_dir",
    "verify_digests",
]

_STALE_TMP_SECONDS = 24 * 3600
LOW_SPACE = 16 * 1024 * 1024  # free bytes under which the cache counts as degraded
FAILURE_MEMORY = 60.0  # seconds a failed write keeps the cache degraded
UNKNOWN = -1  # Cache.writer's reserve for a download of undeclared length
# A download's part file: ``.part-<entry id>.<random>.tmp`` (``BlobWriter``), so a clean-up can
# ask the entry's lock whether the download that writes it still runs.
_PART = re.compile(r"\.part-([0-9a-f]{64})\.[0-9a-f]{16}\.tmp")
_ENTRY_MEMO_SIZE = 10_000
# A hit sets its entry file's mtime to now (the clock of ``cache prune``'s LRU order) when the
# mtime is older than this, so a warm entry costs one utime a minute, not one per hit.
USE_STAMP_INTERVAL = 60.0


@contextlib.contextmanager
def storing(what: str) -> Iterator[None]:
    """Turn an error that means "cannot store now" (disk full, quota, read-only) into StoreFailed."""
    try:
        yield
    except OSError as exc:
        if cannot_store(exc):
            raise StoreFailed(f"the cache cannot store {what}: {exc.strerror or exc}") from exc
        raise


class BlobWriter:
    """A download in progress: bytes go to a temp file (an ``AtomicFile``) while being hashed.

    ``eid`` (the entry being fetched, under its lock) names the part file, so an orphan (a killed
    download) can be told from a live one: ``Cache.remove_orphan_parts``.  Raises StoreFailed when
    the cache cannot store (disk full, read-only), from the start or on any write.
    """

    def __init__(self, tmp_dir: Path, algorithms: tuple[str, ...] = (), eid: str = "") -> None:
        with storing("a new file"):
            self._out = AtomicFile(tmp_dir=tmp_dir, stem=f"part-{eid}" if eid else None)
        self.path = self._out.path
        self._hasher = Hasher(algorithms)  # in a thread of its own once the body is big (hasher.py)
        self._early_sync = EarlySync(self._out.file.fileno())  # write-back begun as it grows
        self.size = 0
        self._reserved = 0

    def reserve(self, length: int) -> None:
        """Claim ``length`` bytes of disk before the first byte is served (``posix_fallocate``), so
        a full disk is found while the client can still be told (StoreFailed).  Where the file
        system cannot allocate ahead, its free space is compared instead."""
        if length <= 0:
            return
        fd = self._out.file.fileno()
        try:
            os.posix_fallocate(fd, 0, length)
            self._reserved = length
            return
        except AttributeError:  # pragma: no cover - platforms without posix_fallocate
            pass
        except OSError as exc:
            if cannot_store(exc):
                raise StoreFailed(f"the cache cannot store {length} bytes: {exc.strerror or exc}") from exc
        with storing(f"{length} bytes"):
            free = shutil.disk_usage(self.path.parent).free
        if free < length:
            raise StoreFailed(f"the cache cannot store {length} bytes: {free} bytes free")

    def write(self, chunk: bytes) -> None:
        """Hash and write ``chunk``.  Hashed first: when the write fails (StoreFailed) the digests
        still count it, so a flight that relays the rest of the body from memory (flights.py)
        verifies every byte exactly once whether the failure came in ``write`` or ``flush``."""
        self._hasher.update(chunk)
        with storing(f"{self.size + len(chunk)} bytes"):
            self._out.write(chunk)
        self.size += len(chunk)
        self._early_sync.grown(self.size)

    def hash_only(self, chunk: bytes) -> None:
        """Hash bytes that are not written: the disk filled, and a flight relays the rest of the
        body from memory (engine/flights.py), verified like a stored one."""
        self._hasher.update(chunk)

    def digests(self) -> dict[str, str]:
        """The digests (hex) of every byte given to ``write`` and ``hash_only``."""
        return self._hasher.hexdigests()

    def flush(self) -> None:
        """Hand what was written to the OS, so readers of the part file (``open_reader``) see it."""
        with storing(f"{self.size} bytes"):
            self._out.flush()

    def open_reader(self) -> int:
        """A read-only descriptor on the part file, for serving it while it grows.

        It stays valid when the file is committed (renamed to its blob) or discarded (unlinked),
        so a reader that opened it never sees the bytes vanish under it.
        """
        return os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0))

    def finish(self) -> dict[str, str]:
        """Flush and return the digests (hex) of what was written (a reservation past them is cut)."""
        self._early_sync.stop()
        with storing(f"{self.size} bytes"):
            self._out.flush()
            if self._reserved > self.size:
                os.ftruncate(self._out.file.fileno(), self.size)
        return self._hasher.hexdigests()

    def commit(self, target: Path) -> None:
        """fsync, rename to ``target`` and fsync its directory."""
        with storing(f"{self.size} bytes"):
            self._out.commit(target)

    def discard(self) -> None:
        self._early_sync.stop()
        self._hasher.close()
        self._out.discard()


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
        self.layout = Layout(Path(root))
        self.root = self.layout.root
        self.blobs = self.layout.blobs
        self.entries = self.layout.entries
        self.locks = self.layout.locks
        self.tmp = self.layout.tmp
        for d in self.layout.directories:
            d.mkdir(parents=True, exist_ok=True)
        version = self.layout.version_file
        if not version.exists():
            atomic_write(version, LAYOUT_VERSION.encode(), tmp_dir=self.tmp)
        elif (found := version.read_text().strip()) != LAYOUT_VERSION:
            raise CacheError(f"{self.root}: cache layout version {found!r}, expected {LAYOUT_VERSION!r}")
        # Index writes go through the storage seam (backend.py); hits read the local files
        # directly (memoised parse, sendfile), which a local backend allows.
        self.backend = LocalBackend(self.layout)
        self.verifier = Verifier(self.layout)
        self._entry_memo: dict[str, tuple[tuple[int, int, int], Entry]] = {}
        self._store_failure: tuple[float, str] | None = None
        self.orphans_at_open = (0, 0)  # part files (and bytes) the clean-up at open removed
        self._remove_stale_tmp()

    # -- paths -------------------------------------------------------------
    def blob_path(self, sha256: str) -> Path:
        return Path(self.layout.blob(sha256))

    # -- index -------------------------------------------------------------
    def lookup(self, key: str, path: str, variant: str = "") -> Entry | None:
        """The entry for a request, or None; an entry ``parse_entry`` refuses counts as absent.

        Also records the use for ``cache prune`` (see ``USE_STAMP_INTERVAL``).
        """
        return self._read_entry(self.layout.entry(key, entry_id(key, path, variant)), mark_used=True)

    def _read_entry(self, name: str, mark_used: bool = False) -> Entry | None:
        """Parse an entry file, memoised by its (inode, size, mtime): entries are
        replaced by rename, so any change shows up as a new signature."""
        try:
            st = os.stat(name)
        except OSError:
            return None
        signature = (st.st_ino, st.st_size, st.st_mtime_ns)
        memo = self._entry_memo.get(name)
        if memo is not None and memo[0] == signature:
            entry = memo[1]
        else:
            key_dir, _, file_name = name.rsplit("/", 3)[-3:]
            try:
                with open(name, "rb") as f:
                    entry = parse_entry(f.read(), key_dir, file_name)
            except OSError:
                return None
            except ValueError as exc:  # e.g. hand-edited: never served, fetched again over it
                log.warning("ignoring the entry file %s: %s", name, exc)
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
            if (entry := self._read_entry(str(file))) is not None:
                yield entry

    def store_entry(self, entry: Entry, *, durable: bool = True) -> Entry:
        """Write an entry atomically; its blob must already be in place.

        ``durable=False`` skips the fsyncs, for entries whose loss in a crash
        costs only a repeated upstream request (remembered 404s): they were
        two thirds of a cold Maven build's fsyncs.
        """
        if not self.blob_path(entry.sha256).is_file():
            raise CacheError(f"refusing to index {entry.path}: blob {entry.sha256} is missing")
        with storing(f"the index entry of {entry.path}"):
            self.backend.put_index(entry.key, entry.id, entry_bytes(entry), durable=durable)
        return entry

    def touch(self, entry: Entry, **changes: Any) -> Entry:
        """Mark revalidated metadata as fresh again."""
        return self.store_entry(replace(entry, fetched_at=time.time(), **changes))

    def remove_entry(self, entry: Entry) -> None:
        self.backend.delete_index(entry.key, entry.id)

    # -- blobs -------------------------------------------------------------
    def writer(
        self, algorithms: tuple[str, ...] = (), eid: str = "", reserve: int | None = None
    ) -> BlobWriter:
        """A part file for new bytes; ``eid``: the entry whose lock the caller holds while writing;
        ``reserve``: the bytes to claim on disk first (``BlobWriter.reserve``), or ``UNKNOWN`` for
        a stream of undeclared length, refused while the cache is ``degraded`` (it could fill
        the disk after its first bytes were served).  StoreFailed when the cache cannot store
        (nothing is left behind then)."""
        if reserve == UNKNOWN and (why := self.degraded()):
            raise StoreFailed(f"{why} (a download of undeclared length is not started)")
        writer = BlobWriter(self.tmp, algorithms, eid)
        if reserve is not None:
            try:
                writer.reserve(reserve)
            except BaseException:
                writer.discard()
                raise
        return writer

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
                if os.stat(target).st_size == writer.size:
                    # Already stored (content addressing): no second write or fsync. A damaged
                    # copy is caught by the verifier on its first use. The new mtime keeps
                    # `cache prune` (which spares recent blobs) off a blob that is about to be
                    # indexed again.
                    with contextlib.suppress(OSError):  # best effort (a read-only cache)
                        self.freshen_blob(sha)
                    return sha, writer.size
            except FileNotFoundError:
                pass  # not stored, or pruned just now: store ours
            writer.commit(target)  # same content, same name: replacing is harmless
            # We hashed these bytes while writing them: vouch for them, in other processes too.
            self.verifier.remember(sha, stamp_of(os.stat(target)), marker=True)
            return sha, writer.size
        finally:
            writer.discard()

    def freshen_blob(self, sha256: str) -> None:
        """Set a blob's mtime to now (``cache prune`` spares recent blobs), keeping its verification.

        The new mtime (and ctime) changes the blob's stamp; a blob that was vouched for before
        is vouched for under the new stamp, as of the same hash (the re-hash schedule does not
        move), so the touch costs no second hash.
        FileNotFoundError if the blob is not there (pruned meanwhile).
        """
        path = self.layout.blob(sha256)
        hashed_at = self.verifier.known(sha256, stamp_of(os.stat(path)))
        os.utime(path)
        if hashed_at is not None:
            self.verifier.remember(sha256, stamp_of(os.stat(path)), marker=True, hashed_at=hashed_at)

    def store_bytes(self, data: bytes) -> str:
        w = self.writer()
        w.write(data)
        sha, _ = self.commit_blob(w, {}, "bytes")
        return sha

    def verified_blob(self, entry: Entry) -> Path | None:
        """The blob's path if it is intact and has the entry's size, else None.

        A corrupt blob is deleted; the entry goes when its blob is missing or corrupt, or when
        it claims another size than its intact blob has (the entry is wrong, the bytes stay).
        """
        path = self.verified_digest(entry.sha256, entry.size)
        if path is None:
            self.remove_entry(entry)
        return path

    def verified_digest(self, sha256: str, size: int) -> Path | None:
        """The blob named ``sha256`` if it is intact and has ``size`` bytes, else None.

        Only a blob whose bytes do not hash to its name is deleted: a claim (an entry, a lock
        file) of another size gets None and leaves the blob alone (``claimed_blob`` says why).
        Touches no entry: a lock file names bytes, not the index's current answer.
        """
        known = self.verifier.known_path(sha256, size)
        if known is not None:
            return known
        try:
            return self.claimed_blob(sha256, size)
        except CacheError:
            return None

    def claimed_blob(self, sha256: str, size: int, claimant: str = "the claim") -> Path:
        """The intact blob ``sha256`` of ``size`` bytes; CacheError says what is wrong.

        ``ClaimMismatch`` ("the lock file says N bytes, the blob ... has M") when the blob is
        intact but has another size; a corrupt blob is deleted first.
        """
        verdict = self.verifier.check(sha256)
        if verdict.state == "missing":
            raise CacheError(f"blob {sha256} is not in the cache")
        if verdict.state == "corrupt":
            self._remove_corrupt(sha256, verdict.stamp)
            raise CacheError(f"blob {sha256} was corrupt (its bytes hash to {verdict.actual}); removed")
        if verdict.size != size:
            raise ClaimMismatch(
                f"{claimant} says {size} bytes, the blob {sha256} has {verdict.size} (and is intact)"
            )
        return self.blob_path(sha256)

    def _remove_corrupt(self, sha256: str, stamp: tuple[int, int, int, int] | None) -> None:
        """Delete a blob that did not hash to its name, unless it was replaced meanwhile."""
        path = self.layout.blob(sha256)
        with contextlib.suppress(FileNotFoundError):
            if stamp is None or os.stat(path).st_ino == stamp[0]:
                os.unlink(path)
        self.verifier.forget(sha256)

    # -- locks -------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self, key: str, path: str, variant: str, timeout: float) -> Iterator[None]:
        """Hold the entry's lock; the OS drops it if the holder dies (store/locks.py).

        StoreFailed when the lock file cannot be created (a read-only cache): nothing can be
        stored then, so the caller relays or refuses instead.
        """
        message = f"timed out after {timeout:g}s waiting for another process to fetch {path!r} for {key!r}"
        with contextlib.ExitStack() as stack:
            with storing("an entry lock"):
                stack.enter_context(
                    striped_locks(self.layout).hold(entry_id(key, path, variant), timeout, message)
                )
            yield

    def locked_id(self, eid: str, timeout: float) -> contextlib.AbstractContextManager[None]:
        """The lock of an entry known only by its id (an unparseable entry file)."""
        return striped_locks(self.layout).hold(eid, timeout, f"entry {eid} busy")

    # -- health --------------------------------------------------------------
    def store_failed(self, why: str) -> None:
        """Remember that a write failed for want of space or permission (``StoreFailed``)."""
        self._store_failure = (time.monotonic(), why)

    def degraded(self) -> str:
        """Why this cache cannot store now ("" when it can): a read-only or unwritable directory,
        less than ``LOW_SPACE`` free, or a write that failed in the last ``FAILURE_MEMORY`` seconds."""
        for directory in (self.tmp, self.blobs, self.entries):
            if not os.access(directory, os.W_OK | os.X_OK):
                return f"cache directory {directory} is not writable"
        with contextlib.suppress(OSError):
            free = shutil.disk_usage(self.tmp).free
            if free < LOW_SPACE:
                return f"cache file system has {free} bytes free"
        failure = self._store_failure
        if failure is not None and time.monotonic() - failure[0] < FAILURE_MEMORY:
            return failure[1]
        return ""

    # -- helpers -----------------------------------------------------------
    def remove_orphan_parts(self) -> tuple[int, int]:
        """Remove the part files of downloads that no longer run; (files, bytes) removed.

        A part file is written only by the holder of its entry's lock (``BlobWriter``'s ``eid``),
        and the OS drops a killed process's lock: a part file whose lock can be taken at once is
        an orphan.  One whose lock is held (a download in this or another process, or an
        unrelated fetch on the same lock stripe) stays, for the next clean-up.
        """
        removed = freed = 0
        for name in sorted(dir_names(self.tmp)):
            match = _PART.fullmatch(name)
            if match is None:
                continue
            path = self.tmp / name
            try:
                with self.locked_id(match.group(1), 0):
                    size = os.stat(path).st_size
                    os.unlink(path)
            except (CacheError, OSError):
                continue  # busy, gone meanwhile, or a read-only cache
            removed += 1
            freed += size
        return removed, freed

    def _remove_stale_tmp(self) -> None:
        """At start: orphaned part files, and other temporary files left more than a day ago
        (those name no entry, so their age is the only sign that nobody writes them)."""
        self.orphans_at_open = self.remove_orphan_parts()
        cutoff = time.time() - _STALE_TMP_SECONDS
        with contextlib.suppress(OSError), os.scandir(self.tmp) as it:
            for file in it:
                if is_temporary(file.name) and not _PART.fullmatch(file.name):
                    with contextlib.suppress(OSError):
                        if file.stat().st_mtime < cutoff:
                            os.unlink(file.path)
