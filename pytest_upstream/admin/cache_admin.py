"""Looking after a cache directory: list, verify, prune, export and import.

The ``upstream-proxy cache ...`` commands (see docs/cache.md) call these.  Every
one is safe to run while proxies, pytest sessions and other admin commands use
the same directory:

- files are only ever replaced by atomic renames, as in ``cache.py``;
- an entry is removed only while its entry lock is held (taken without
  waiting: a busy entry is skipped), and only if it is still the file that
  was judged;
- a blob is removed by renaming it into ``tmp/`` first and checking that the
  renamed file is the one that was judged (same inode); a fresh copy that a
  fetch or an import put there meanwhile is renamed back (same name, same
  bytes), so a blob being indexed right now is not lost;
- ``prune`` deletes a blob only when no entry has named it for ``grace``
  seconds, and never a blob written in the last ``grace`` seconds, so a
  request that read its entry just before the entry went still finds the
  blob when it opens it, and a fetch that just stored a blob can still
  index it (``grace=0`` is only for a cache nobody else is using).

Archives (``export``/``import``) are plain tar files holding ``VERSION``,
``blobs/`` and ``entries/`` exactly as laid out on disk, never ``locks/`` or
``tmp/``.  They are deterministic: the same entries and blobs give the same
bytes.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import re
import sys
import tarfile
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, cast

import filelock

from pytest_upstream.config.keys import InvalidKeyError, validate_key
from pytest_upstream.config.units import human_age, human_size, parse_age, parse_size
from pytest_upstream.repro.lockfile import LockError, LockFile
from pytest_upstream.store.cache import (
    LAYOUT_VERSION,
    Cache,
    CacheError,
    Entry,
    LockTimeout,
    entry_id,
    fsync_dir,
)

DEFAULT_GRACE = 5.0
_CHUNK = 1024 * 1024
_MAX_ENTRY_BYTES = 1024 * 1024
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX2 = re.compile(r"[0-9a-f]{2}")


class ArchiveRefused(CacheError):
    """An archive that is not a well-formed, intact cache archive; nothing was imported."""


def open_cache(root: Path, *, create: bool = False) -> Cache:
    """The cache at ``root``; without ``create``, a directory that is not a cache is an error."""
    root = Path(root)
    if not create and not (root / "VERSION").is_file():
        raise CacheError(f"{root}: not a cache directory (no VERSION file)")
    return Cache(root)


# -- reading the index -------------------------------------------------------
@dataclass(frozen=True)
class EntryFile:
    """One file under ``entries/``: its parsed entry, or why it could not be parsed."""

    file: Path
    rel: str  # path below the cache root, with forward slashes
    ino: int
    mtime_ns: int  # the entry's last use (Cache.lookup bumps it) or write
    entry: Entry | None
    error: str = ""

    @property
    def last_used(self) -> float:
        return self.mtime_ns / 1e9


def parse_entry(data: bytes, key_dir: str, file_name: str) -> Entry:
    """An entry file's contents, checked against where it lives; ValueError says what is wrong."""
    if len(data) > _MAX_ENTRY_BYTES:
        raise ValueError(f"entry file is {len(data)} bytes")
    try:
        raw = json.loads(data)
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError("not a JSON object")
    try:
        entry = Entry(**raw)
    except TypeError as exc:
        raise ValueError(f"not an entry: {exc}") from None
    for name in ("key", "path", "variant", "upstream_url", "sha256", "kind"):
        if not isinstance(getattr(entry, name), str):
            raise ValueError(f"field {name!r} is not a string")
    for name in ("content_type", "etag", "last_modified"):
        if not isinstance(getattr(entry, name), str | None):
            raise ValueError(f"field {name!r} is not a string or null")
    if not isinstance(entry.size, int) or isinstance(entry.size, bool) or entry.size < 0:
        raise ValueError("field 'size' is not a non-negative integer")
    if not isinstance(entry.fetched_at, int | float) or isinstance(entry.fetched_at, bool):
        raise ValueError("field 'fetched_at' is not a number")
    if not isinstance(entry.headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in entry.headers.items()
    ):
        raise ValueError("field 'headers' is not an object of strings")
    if not _HEX64.fullmatch(entry.sha256):
        raise ValueError("field 'sha256' is not 64 lowercase hex digits")
    eid = entry_id(entry.key, entry.path, entry.variant)
    if entry.key != key_dir or file_name != f"{eid}.json":
        raise ValueError(f"entry for {entry.key!r} {entry.path!r} is filed under the wrong name")
    return entry


def scan_entries(cache: Cache, key: str | None = None) -> list[EntryFile]:
    """Every ``*.json`` file under ``entries/`` (or ``entries/<key>/``), sorted by path."""
    found: list[EntryFile] = []
    keys = [key] if key else sorted(_names(cache.entries))
    for k in keys:
        for prefix in sorted(_names(cache.entries / k)):
            for name in sorted(_names(cache.entries / k / prefix)):
                if not name.endswith(".json"):
                    continue
                file = cache.entries / k / prefix / name
                try:
                    with open(file, "rb") as f:
                        st = os.fstat(f.fileno())
                        data = f.read(_MAX_ENTRY_BYTES + 1)
                except FileNotFoundError:
                    continue  # replaced or removed meanwhile
                except OSError as exc:
                    found.append(EntryFile(file, _rel(cache, file), 0, 0, None, str(exc)))
                    continue
                try:
                    entry: Entry | None = parse_entry(data, k, name)
                    error = ""
                except ValueError as exc:
                    entry, error = None, str(exc)
                found.append(EntryFile(file, _rel(cache, file), st.st_ino, st.st_mtime_ns, entry, error))
    return found


@dataclass(frozen=True)
class BlobFile:
    sha256: str
    path: Path
    size: int
    ino: int
    mtime: float


def scan_blobs(cache: Cache) -> tuple[dict[str, BlobFile], list[Path]]:
    """The blobs on disk by digest, and stray files under ``blobs/`` that are not named as one."""
    blobs: dict[str, BlobFile] = {}
    stray: list[Path] = []
    root = cache.root / "blobs"
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        here = Path(dirpath)
        for name in sorted(filenames):
            path = here / name
            well_placed = here.parent == cache.blobs and _HEX2.fullmatch(here.name) and _HEX64.fullmatch(name)
            if not well_placed or name[:2] != here.name:
                stray.append(path)
                continue
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            blobs[name] = BlobFile(name, path, st.st_size, st.st_ino, st.st_mtime)
    return blobs, stray


# -- ls ----------------------------------------------------------------------
@dataclass
class Listing:
    entries: list[EntryFile]
    unreadable: list[EntryFile]
    blobs: int  # blob files on disk
    blob_bytes: int
    unreferenced_blobs: int
    unreferenced_bytes: int

    @property
    def entry_bytes(self) -> int:
        return sum(e.entry.size for e in self.entries if e.entry is not None)

    def as_json(self, now: float) -> dict[str, Any]:
        return {
            "entries": [
                {
                    "key": e.entry.key,
                    "path": e.entry.path,
                    "variant": e.entry.variant,
                    "kind": e.entry.kind,
                    "size": e.entry.size,
                    "sha256": e.entry.sha256,
                    "fetched_at": e.entry.fetched_at,
                    "age": round(now - e.entry.fetched_at, 3),
                    "last_used": round(e.last_used, 3),
                    "idle": round(now - e.last_used, 3),
                }
                for e in self.entries
                if e.entry is not None
            ],
            "unreadable_entries": [e.rel for e in self.unreadable],
            "totals": {
                "entries": len(self.entries),
                "entry_bytes": self.entry_bytes,
                "blobs": self.blobs,
                "blob_bytes": self.blob_bytes,
                "unreferenced_blobs": self.unreferenced_blobs,
                "unreferenced_bytes": self.unreferenced_bytes,
            },
        }


def list_entries(cache: Cache, key: str | None = None) -> Listing:
    """Entries (all, or one key's) with the blob totals of the whole cache."""
    files = scan_entries(cache)
    blobs, _ = scan_blobs(cache)
    referenced = {f.entry.sha256 for f in files if f.entry is not None}
    unreferenced = [b for sha, b in blobs.items() if sha not in referenced]
    shown = [f for f in files if key is None or f.rel.split("/")[1] == key]
    shown.sort(key=lambda f: (f.entry.key, f.entry.path, f.entry.variant) if f.entry else ("", f.rel, ""))
    return Listing(
        entries=[f for f in shown if f.entry is not None],
        unreadable=[f for f in shown if f.entry is None],
        blobs=len(blobs),
        blob_bytes=sum(b.size for b in blobs.values()),
        unreferenced_blobs=len(unreferenced),
        unreferenced_bytes=sum(b.size for b in unreferenced),
    )


# -- verify ------------------------------------------------------------------
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

    Removed: blobs whose bytes do not match their name (and stray files under
    ``blobs/``), entry files that cannot be parsed or sit under the wrong name,
    and entries whose blob is missing or has another size.  An entry whose lock
    is held is left alone (a fetch is replacing it) and reported as not repaired.
    """
    report = VerifyReport()
    blobs, stray = scan_blobs(cache)
    for path in stray:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        report.problems.append(Problem("stray-file", _rel(cache, path), "not named by a sha256", True))
    for sha, blob in sorted(blobs.items()):
        try:
            with open(blob.path, "rb") as f:
                ino = os.fstat(f.fileno()).st_ino
                actual = _hash_stream(f)
                size = f.tell()
        except FileNotFoundError:
            continue  # pruned meanwhile
        report.blobs += 1
        report.blob_bytes += size
        if actual != sha:
            removed = _evict_blob(cache, blob.path, ino, min_age=0.0) is not None
            report.problems.append(
                Problem("corrupt-blob", _rel(cache, blob.path), f"its bytes hash to {actual}", removed)
            )
    for ef in scan_entries(cache):
        report.entries += 1
        problem = (
            Problem("unreadable-entry", ef.rel, ef.error, False)
            if ef.entry is None
            else _blob_problem(cache, ef.entry, ef.rel)
        )
        if problem is None:
            continue
        repaired = _remove_entry_file(cache, ef, still_bad=lambda e: _still_bad(cache, e))
        report.problems.append(Problem(problem.kind, problem.path, problem.detail, repaired))
    return report


def _blob_problem(cache: Cache, entry: Entry, rel: str) -> Problem | None:
    try:
        size = os.stat(cache.blob_path(entry.sha256)).st_size
    except FileNotFoundError:
        return Problem(
            "missing-blob", rel, f"{entry.key} {entry.path}: blob {entry.sha256} is missing", False
        )
    if size != entry.size:
        detail = f"{entry.key} {entry.path}: entry says {entry.size} bytes, blob {entry.sha256} has {size}"
        return Problem("size-mismatch", rel, detail, False)
    return None


def _still_bad(cache: Cache, ef: EntryFile) -> bool:
    return ef.entry is None or _blob_problem(cache, ef.entry, ef.rel) is not None


# -- prune -------------------------------------------------------------------
@dataclass
class PruneReport:
    size_before: int = 0  # bytes of blobs on disk
    size_after: int = 0
    removed: list[Entry] = field(default_factory=list)
    busy: list[Entry] = field(default_factory=list)  # lock held: skipped
    used_meanwhile: int = 0  # hit or replaced after the scan: kept
    blobs_removed: int = 0
    bytes_freed: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "size_before": self.size_before,
            "size_after": self.size_after,
            "entries_removed": [{"key": e.key, "path": e.path, "variant": e.variant} for e in self.removed],
            "entries_busy": [{"key": e.key, "path": e.path, "variant": e.variant} for e in self.busy],
            "entries_used_meanwhile": self.used_meanwhile,
            "blobs_removed": self.blobs_removed,
            "bytes_freed": self.bytes_freed,
        }


def prune(
    cache: Cache,
    *,
    max_size: int | None = None,
    older_than: float | None = None,
    grace: float = DEFAULT_GRACE,
    now: float | None = None,
    keep: frozenset[str] = frozenset(),
) -> PruneReport:
    """Remove entries least recently used first, then the blobs no entry names.

    Blobs in ``keep`` (the digests lock files name: a locked replay serves them by
    digest, whatever the index says) are never removed, though their entries may be.

    An entry goes when it was last used more than ``older_than`` seconds ago,
    or while the blobs on disk add up to more than ``max_size`` bytes.  With
    neither, only unreferenced blobs go.  "Used" is the entry file's mtime:
    written on a fetch, bumped by hits (at most once a minute).
    """
    now = time.time() if now is None else now
    report = PruneReport()
    files = [f for f in scan_entries(cache) if f.entry is not None]
    blobs, _ = scan_blobs(cache)
    refs = Counter(f.entry.sha256 for f in files if f.entry is not None)
    refs.update(keep)
    size = sum(b.size for sha, b in blobs.items() if refs[sha] or b.mtime > now - grace)
    report.size_before = sum(b.size for b in blobs.values())
    for ef in sorted(files, key=lambda f: (f.mtime_ns, f.rel)):
        assert ef.entry is not None
        too_old = older_than is not None and ef.last_used < now - older_than
        too_big = max_size is not None and size > max_size
        if not (too_old or too_big):
            break  # sorted oldest first: nothing later is older, and the size only went down
        try:
            removed = _remove_entry_file(cache, ef, still_bad=lambda _: True, raise_busy=True)
        except LockTimeout:
            report.busy.append(ef.entry)
            continue
        if not removed:
            report.used_meanwhile += 1
            continue
        report.removed.append(ef.entry)
        refs[ef.entry.sha256] -= 1
        blob = blobs.get(ef.entry.sha256)
        if not refs[ef.entry.sha256] and blob is not None and blob.mtime <= now - grace:
            size -= blob.size
    # unreferenced now; a blob written within the grace period may be about to be indexed
    candidates = sorted(sha for sha, b in blobs.items() if not refs[sha] and b.mtime <= now - grace)
    if candidates and grace > 0:
        time.sleep(grace)  # a request that read an entry before it went has opened its blob by now
    referenced = {f.entry.sha256 for f in scan_entries(cache) if f.entry is not None} | keep
    for sha in candidates:
        if sha in referenced:
            continue
        freed = _evict_blob(cache, blobs[sha].path, blobs[sha].ino, min_age=grace)
        if freed is not None:
            report.blobs_removed += 1
            report.bytes_freed += freed
    after, _ = scan_blobs(cache)
    report.size_after = sum(b.size for b in after.values())
    return report


# -- export ------------------------------------------------------------------
@dataclass
class ExportReport:
    entries: int = 0
    blobs: int = 0
    blob_bytes: int = 0
    archive_bytes: int = 0
    # lock export: lock lines with no index entry for their bytes (only the lock's blob went)
    superseded: list[str] = field(default_factory=list)


def export_archive(
    cache: Cache, dest: Path, lock: LockFile | None = None, compress: bool | None = None
) -> ExportReport:
    """Write the cache (or what ``lock`` names) to a deterministic tar archive at ``dest``.

    With a lock: every blob the lock names (a missing one is an error) and
    the index entries that match a lock line (same key, path, variant and
    sha256).  Without: every readable entry whose blob is present, and those
    blobs.  Each blob is re-hashed on the way; a corrupt one is an error.
    ``compress`` defaults to gzip for names ending in ``.gz`` or ``.tgz``.
    The archive is written next to ``dest`` and renamed into place.
    """
    dest = Path(dest)
    if compress is None:
        compress = dest.name.endswith((".gz", ".tgz"))
    report = ExportReport()
    files = [f for f in scan_entries(cache) if f.entry is not None]
    if lock is not None:
        wanted = {le.identity: le for le in lock}
        chosen: list[Entry] = []
        for f in files:
            assert f.entry is not None
            le = wanted.get((f.entry.key, f.entry.path, f.entry.variant))
            if le is not None and le.sha256 == f.entry.sha256:
                chosen.append(f.entry)
        matched = {(e.key, e.path, e.variant) for e in chosen}
        report.superseded = [f"{le.key} {le.path}" for le in lock if le.identity not in matched]
        shas = {le.sha256 for le in lock}
        missing = sorted(sha for sha in shas if not cache.blob_path(sha).is_file())
        if missing:
            raise CacheError(
                f"the cache lacks {len(missing)} blob(s) the lock names, e.g. {missing[0]}; "
                "record them (or import an archive that has them) first"
            )
    else:
        chosen = [f.entry for f in files if f.entry is not None and cache.blob_path(f.entry.sha256).is_file()]
        shas = {e.sha256 for e in chosen}
    sizes = {le.sha256: le.size for le in lock} if lock is not None else {}
    sizes.update({e.sha256: e.size for e in chosen})
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.parent / f".{dest.name}.{uuid.uuid4().hex}.part"
    try:
        with open(part, "xb") as raw:
            gz = (
                gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6)
                if compress
                else None
            )
            out = cast(IO[bytes], gz) if gz is not None else raw
            with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
                writer = _DeterministicTar(tar)
                writer.add_bytes("VERSION", LAYOUT_VERSION.encode())
                exported: set[str] = set()
                for sha in sorted(shas):
                    size = writer.add_blob(cache, sha, sizes.get(sha), required=lock is not None)
                    if size is not None:
                        exported.add(sha)
                        report.blobs += 1
                        report.blob_bytes += size
                for entry in sorted(chosen, key=lambda e: _entry_rel(e)):
                    if entry.sha256 in exported:  # its blob vanished meanwhile: leave the entry out
                        writer.add_bytes(_entry_rel(entry), _entry_bytes(entry))
                        report.entries += 1
            if gz is not None:
                gz.close()
            raw.flush()
            os.fsync(raw.fileno())
            report.archive_bytes = raw.tell()
        os.replace(part, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
    return report


class _DeterministicTar:
    """Members with fixed metadata; parent directories emitted just before their first file."""

    def __init__(self, tar: tarfile.TarFile) -> None:
        self.tar = tar
        self.dirs: set[str] = set()

    def _info(self, name: str, type_: bytes, mode: int, size: int = 0) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.size, info.mtime = type_, mode, size, 0
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    def _parents(self, name: str) -> None:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self.dirs:
                self.dirs.add(d)
                self.tar.addfile(self._info(d, tarfile.DIRTYPE, 0o755))

    def add_bytes(self, name: str, data: bytes) -> None:
        self._parents(name)
        self.tar.addfile(self._info(name, tarfile.REGTYPE, 0o644, len(data)), io.BytesIO(data))

    def add_blob(self, cache: Cache, sha: str, expected_size: int | None, required: bool) -> int | None:
        """Add one blob, hashing it on the way; None if it vanished (and is not required)."""
        name = f"blobs/sha256/{sha[:2]}/{sha}"
        try:
            f = open(cache.blob_path(sha), "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            if required:
                raise CacheError(f"blob {sha} vanished during the export; retry") from None
            return None
        with f:
            size = os.fstat(f.fileno()).st_size
            if expected_size is not None and size != expected_size:
                raise CacheError(
                    f"blob {sha} has {size} bytes, its entry says {expected_size}: {_RUN_VERIFY}"
                )
            self._parents(name)
            reader = _HashingReader(f)
            self.tar.addfile(self._info(name, tarfile.REGTYPE, 0o644, size), reader)
            if reader.hash.hexdigest() != sha:
                raise CacheError(f"blob {sha} is corrupt (its bytes hash to another digest): {_RUN_VERIFY}")
        return size


_RUN_VERIFY = "run `upstream-proxy cache verify` to remove it, then export again"


class _HashingReader(io.RawIOBase):
    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.hash = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.hash.update(data)
        return data


# -- import ------------------------------------------------------------------
@dataclass
class ImportReport:
    blobs_added: int = 0
    blobs_kept: int = 0  # already present: kept
    blobs_repaired: int = 0  # present with the wrong size: replaced
    entries_added: int = 0
    entries_replaced: int = 0  # the archive's copy was newer
    entries_kept: int = 0  # the cache's copy was as new or newer


def import_archive(cache: Cache, src: Path, lock_timeout: float = 30.0) -> ImportReport:
    """Merge a cache archive into ``cache``.

    Everything is checked before anything is merged: member names and types
    (only ``VERSION``, ``blobs/sha256/<2>/<64>`` and
    ``entries/<key>/<2>/<id>.json``, plus their directories; no links, devices
    or ``..``), every blob's sha256 against its name, every entry against its
    file name and its blob.  A bad archive raises ArchiveRefused and leaves the
    cache as it was.  Then blobs are hard-linked into place (an existing blob is
    kept) and entries written by atomic rename under their lock, keeping
    whichever copy has the newer ``fetched_at``.
    """
    staged: dict[str, Path] = {}  # sha256 -> verified bytes in tmp/
    entries: list[tuple[Entry, bytes]] = []
    try:
        _read_archive(cache, Path(src), staged, entries)
        return _merge(cache, staged, entries, lock_timeout)
    finally:
        for path in staged.values():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _read_archive(
    cache: Cache, src: Path, staged: dict[str, Path], entries: list[tuple[Entry, bytes]]
) -> None:
    seen: set[str] = set()
    version: bytes | None = None
    try:
        with tarfile.open(src, mode="r:*") as tar:
            for member in tar:
                name = _check_member(member, seen)
                if member.isdir():
                    continue
                data = tar.extractfile(member)
                if data is None:
                    raise ArchiveRefused(f"{src}: member {name!r} has no data")
                parts = name.split("/")
                if name == "VERSION":
                    version = data.read(64).strip()
                elif parts[0] == "blobs":
                    staged[parts[3]] = _stage_blob(cache, data, parts[3], name)
                else:
                    raw = data.read(_MAX_ENTRY_BYTES + 1)
                    try:
                        entries.append((parse_entry(raw, parts[1], parts[3]), raw))
                    except ValueError as exc:
                        raise ArchiveRefused(f"{name}: {exc}") from None
    except ArchiveRefused as exc:
        raise ArchiveRefused(f"{src}: refused, nothing imported: {exc}") from None
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        reason = str(exc).splitlines()[0].rstrip(":") or type(exc).__name__
        raise ArchiveRefused(f"{src}: not a readable tar archive, nothing imported: {reason}") from None
    if version is None:
        raise ArchiveRefused(f"{src}: refused, nothing imported: no VERSION member (not a cache archive)")
    if version.decode(errors="replace") != LAYOUT_VERSION:
        raise ArchiveRefused(
            f"{src}: refused, nothing imported: cache layout version {version!r}, expected {LAYOUT_VERSION!r}"
        )
    for entry, _ in entries:
        if entry.sha256 not in staged:
            raise ArchiveRefused(
                f"{src}: refused, nothing imported: entry {entry.key} {entry.path!r} names blob "
                f"{entry.sha256}, which is not in the archive"
            )
        if staged[entry.sha256].stat().st_size != entry.size:
            raise ArchiveRefused(
                f"{src}: refused, nothing imported: entry {entry.key} {entry.path!r} says {entry.size} "
                "bytes, its blob has another size"
            )


def _check_member(member: tarfile.TarInfo, seen: set[str]) -> str:
    """The member's name if it belongs in a cache archive; ArchiveRefused otherwise."""
    name = member.name
    if name in seen:
        raise ArchiveRefused(f"member {name!r} appears twice")
    seen.add(name)
    if not (member.isreg() or member.isdir()) or member.issparse():
        what = "a symlink" if member.issym() else "a hard link" if member.islnk() else "not a regular file"
        raise ArchiveRefused(f"member {name!r} is {what}")
    parts = name.split("/")
    if (
        name.startswith("/")
        or "\\" in name
        or any(p in ("", ".", "..") for p in parts)
        or any(ord(c) < 0x20 or c == "\x7f" for c in name)
    ):
        raise ArchiveRefused(f"member {name!r}: absolute paths, '..' and odd names are not allowed")
    if member.isdir():
        ok = (
            (parts[0] in ("blobs", "entries") and len(parts) == 1)
            or (parts[0] == "blobs" and parts[1:2] == ["sha256"] and len(parts) <= 3)
            or (parts[0] == "entries" and len(parts) <= 3 and _valid_key(parts[1]))
        ) and (len(parts) < 3 or _HEX2.fullmatch(parts[2]) is not None)
    elif name == "VERSION":
        ok = True
    elif parts[0] == "blobs":
        ok = (
            len(parts) == 4
            and parts[1] == "sha256"
            and _HEX64.fullmatch(parts[3]) is not None
            and parts[2] == parts[3][:2]
        )
    elif parts[0] == "entries":
        stem = parts[3][: -len(".json")] if len(parts) == 4 and parts[3].endswith(".json") else ""
        ok = (
            bool(stem)
            and _valid_key(parts[1])
            and _HEX64.fullmatch(stem) is not None
            and parts[2] == stem[:2]
        )
    else:
        ok = False
    if not ok:
        raise ArchiveRefused(f"member {name!r} is not part of a cache (only VERSION, blobs/ and entries/)")
    return name


def _valid_key(key: str) -> bool:
    try:
        validate_key(key)
    except InvalidKeyError:
        return False
    return True


def _stage_blob(cache: Cache, data: IO[bytes], sha: str, name: str) -> Path:
    path = cache.tmp / f"{uuid.uuid4().hex}.part"
    h = hashlib.sha256()
    try:
        with open(path, "xb") as out:
            while chunk := data.read(_CHUNK):
                h.update(chunk)
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    if h.hexdigest() != sha:
        path.unlink(missing_ok=True)
        raise ArchiveRefused(f"{name}: its bytes hash to {h.hexdigest()}, not to its name")
    return path


def _merge(
    cache: Cache, staged: dict[str, Path], entries: list[tuple[Entry, bytes]], lock_timeout: float
) -> ImportReport:
    report = ImportReport()
    touched: set[Path] = set()
    for sha, path in sorted(staged.items()):
        target = cache.blob_path(sha)
        target.parent.mkdir(parents=True, exist_ok=True)
        outcome = _place_blob(path, target)
        if outcome == "kept":
            report.blobs_kept += 1
        else:
            touched.add(target.parent)
            report.blobs_added += outcome == "added"
            report.blobs_repaired += outcome == "repaired"
    for directory in sorted(touched):
        fsync_dir(directory)
    for entry, _ in sorted(entries, key=lambda item: _entry_rel(item[0])):
        target = cache.root / _entry_rel(entry)
        with cache.locked(entry.key, entry.path, entry.variant, lock_timeout):
            try:
                current: Entry | None = parse_entry(target.read_bytes(), entry.key, target.name)
            except (OSError, ValueError):
                current = None
            if (
                current is not None
                and current.fetched_at >= entry.fetched_at
                and cache.blob_path(current.sha256).is_file()
            ):
                report.entries_kept += 1
                continue
            cache.store_entry(entry)  # atomic, at the path computed from the entry (== target)
            if current is None:
                report.entries_added += 1
            else:
                report.entries_replaced += 1
    return report


# -- helpers -----------------------------------------------------------------
def _place_blob(staged: Path, target: Path) -> str:
    """Hard-link a verified blob into place: "added", "kept" (already there) or "repaired"."""
    while True:
        try:
            os.link(staged, target)
            return "added"
        except FileExistsError:
            pass
        except OSError:  # no hard links here: a rename does too (same name, same bytes)
            os.replace(staged, target)
            return "added"
        try:
            if target.stat().st_size != staged.stat().st_size:  # surely corrupt: ours is verified
                os.replace(staged, target)
                return "repaired"
            os.utime(target)  # fresh again, so a concurrent prune keeps it for the entry we will write
            return "kept"
        except FileNotFoundError:
            continue  # pruned meanwhile: link ours


def _names(directory: Path) -> Iterator[str]:
    try:
        with os.scandir(directory) as it:
            for d in it:
                yield d.name
    except (FileNotFoundError, NotADirectoryError):
        return


def _rel(cache: Cache, path: Path) -> str:
    return path.relative_to(cache.root).as_posix()


def _entry_rel(entry: Entry) -> str:
    eid = entry_id(entry.key, entry.path, entry.variant)
    return f"entries/{entry.key}/{eid[:2]}/{eid}.json"


def _entry_bytes(entry: Entry) -> bytes:
    return json.dumps(asdict(entry), sort_keys=True).encode()  # as Cache.store_entry writes it


def _hash_stream(f: IO[bytes]) -> str:
    h = hashlib.sha256()
    while chunk := f.read(_CHUNK):
        h.update(chunk)
    return h.hexdigest()


def _remove_entry_file(
    cache: Cache, ef: EntryFile, still_bad: Callable[[EntryFile], bool], raise_busy: bool = False
) -> bool:
    """Unlink an entry file under its lock if it is still the file that was judged.

    The lock is taken without waiting.  Returns False (kept) when the file
    changed since it was scanned (used, or replaced by a fetch) or, unless
    ``raise_busy``, when the lock is held.
    """
    if ef.entry is not None:
        key, path, variant = ef.entry.key, ef.entry.path, ef.entry.variant
        lock: contextlib.AbstractContextManager[None] = cache.locked(key, path, variant, timeout=0)
    else:
        lock = _EntryFileLock(cache, ef)
    try:
        with lock:
            try:
                st = os.stat(ef.file)
            except FileNotFoundError:
                return False
            if (st.st_ino, st.st_mtime_ns) != (ef.ino, ef.mtime_ns) or not still_bad(ef):
                return False
            ef.file.unlink()
            return True
    except LockTimeout:
        if raise_busy:
            raise
        return False


class _EntryFileLock(contextlib.AbstractContextManager[None]):
    """The lock of an entry known only by its file name (an unparseable entry), as Cache.locked takes it."""

    def __init__(self, cache: Cache, ef: EntryFile) -> None:
        key, prefix, name = ef.rel.split("/")[1:4]
        lock_path = cache.locks / key / prefix / f"{name.removesuffix('.json')}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = filelock.FileLock(lock_path, thread_local=False, is_singleton=False)

    def __enter__(self) -> None:
        try:
            self.lock.acquire(timeout=0)
        except filelock.Timeout:
            raise LockTimeout("entry busy") from None

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


def _evict_blob(cache: Cache, path: Path, ino: int, min_age: float) -> int | None:
    """Remove a blob if it is still the file that was judged; its size, or None if kept.

    The blob is renamed into ``tmp/`` first.  If what was renamed is not that
    file (another inode than ``ino``, or written less than ``min_age`` seconds
    ago), a fetch or an import put a fresh copy there meanwhile: it is renamed
    back, which is harmless because a blob's name is its content.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    if st.st_ino != ino or st.st_mtime > time.time() - min_age:
        return None
    aside = cache.tmp / f"{uuid.uuid4().hex}.part"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return None
    moved = os.stat(aside)
    if moved.st_ino != ino or moved.st_mtime > time.time() - min_age:
        os.replace(aside, path)
        return None
    aside.unlink()
    return moved.st_size


# -- the command line (``upstream-proxy cache ...``; the parser is in cli.py) -----
def run_cli(args: Any, root: Path, lock_timeout: float) -> int:
    """Run one ``cache`` subcommand; returns the exit status."""
    action: str = args.cache_command
    try:
        if action == "ls":
            return _cli_ls(open_cache(root), args.key, args.json)
        if action == "verify":
            return _cli_verify(open_cache(root), args.json)
        if action == "prune":
            max_size = parse_size(args.max_size) if args.max_size is not None else None
            older_than = parse_age(args.older_than) if args.older_than is not None else None
            grace = parse_age(args.grace) if args.grace is not None else DEFAULT_GRACE
            keep = frozenset(e.sha256 for name in args.keep_lock or () for e in LockFile.load(Path(name)))
            return _cli_prune(open_cache(root), max_size, older_than, grace, args.json, keep)
        if action == "export":
            lock = LockFile.load(Path(args.lock)) if args.lock else None
            return _cli_export(open_cache(root), Path(args.file), lock)
        if action == "import":
            return _cli_import(open_cache(root, create=True), Path(args.file), lock_timeout)
    except (ValueError, LockError) as exc:  # a bad SIZE/AGE or lock file
        print(f"upstream-proxy: error: {exc}", file=sys.stderr)
        return 2
    raise AssertionError(action)


def _cli_ls(cache: Cache, key: str | None, as_json: bool) -> int:
    listing = list_entries(cache, key)
    now = time.time()
    if as_json:
        print(json.dumps({"cache": str(cache.root), **listing.as_json(now)}, indent=1))
        return 0
    print(f"{'KEY':<16} {'KIND':<9} {'SIZE':>9} {'SHA256':<12} {'AGE':>6} {'IDLE':>6}  PATH")
    for ef in listing.entries:
        e = ef.entry
        assert e is not None
        variant = f"  [{e.variant}]" if e.variant else ""
        print(
            f"{e.key:<16} {e.kind:<9} {human_size(e.size):>9} {e.sha256[:12]:<12} "
            f"{human_age(now - e.fetched_at):>6} {human_age(now - ef.last_used):>6}  {e.path}{variant}"
        )
    for ef in listing.unreadable:
        print(f"unreadable entry {ef.rel}: {ef.error} (`upstream-proxy cache verify` removes it)")
    t = listing
    print(
        f"# {len(t.entries)} entries ({human_size(t.entry_bytes)}) in {cache.root}; "
        f"{t.blobs} blobs on disk ({human_size(t.blob_bytes)}), "
        f"{t.unreferenced_blobs} unreferenced ({human_size(t.unreferenced_bytes)})"
    )
    return 0


def _cli_verify(cache: Cache, as_json: bool) -> int:
    report = verify(cache)
    if as_json:
        print(json.dumps({"cache": str(cache.root), **report.as_json()}, indent=1))
    else:
        for p in report.problems:
            state = "removed" if p.repaired else "NOT removed (entry busy or changed meanwhile)"
            print(f"{p.kind}: {p.path}: {p.detail}: {state}")
        summary = (
            f"checked {report.blobs} blobs ({human_size(report.blob_bytes)}) and {report.entries} entries "
            f"in {cache.root}"
        )
        print(f"{summary}: {'ok' if report.ok else f'{len(report.problems)} problem(s)'}")
    return 0 if report.ok else 1


def _cli_prune(
    cache: Cache,
    max_size: int | None,
    older_than: float | None,
    grace: float,
    as_json: bool,
    keep: frozenset[str] = frozenset(),
) -> int:
    report = prune(cache, max_size=max_size, older_than=older_than, grace=grace, keep=keep)
    if as_json:
        print(json.dumps({"cache": str(cache.root), **report.as_json()}, indent=1))
        return 0
    for e in report.busy:
        print(f"skipped (in use): {e.key} {e.path}")
    print(
        f"removed {len(report.removed)} entries and {report.blobs_removed} blobs "
        f"({human_size(report.bytes_freed)}); {human_size(report.size_before)} -> "
        f"{human_size(report.size_after)} in {cache.root}"
        + (f"; {len(report.busy)} busy entries skipped" if report.busy else "")
        + (f"; {report.used_meanwhile} used meanwhile, kept" if report.used_meanwhile else "")
    )
    if max_size is not None and report.size_after > max_size:
        why = f"busy entries, or blobs written in the last {grace:g}s"
        print(f"note: still above {human_size(max_size)} ({why})")
    return 0


def _cli_export(cache: Cache, file: Path, lock: LockFile | None) -> int:
    report = export_archive(cache, file, lock)
    for line in report.superseded:
        why = "no index entry for the locked bytes (refreshed or pruned since)"
        print(f"note: {line}: {why}; exported the lock's blob only")
    print(
        f"wrote {file}: {report.entries} entries, {report.blobs} blobs ({human_size(report.blob_bytes)}), "
        f"archive {human_size(report.archive_bytes)}"
    )
    return 0


def _cli_import(cache: Cache, file: Path, lock_timeout: float) -> int:
    r = import_archive(cache, file, lock_timeout)
    print(
        f"imported {file} into {cache.root}: blobs {r.blobs_added} added, {r.blobs_kept} already there"
        + (f", {r.blobs_repaired} repaired" if r.blobs_repaired else "")
        + f"; entries {r.entries_added} added, {r.entries_replaced} replaced by newer, "
        f"{r.entries_kept} kept (as new or newer)"
    )
    return 0
