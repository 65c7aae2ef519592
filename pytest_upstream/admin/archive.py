"""``cache export`` and ``cache import``: a cache as a deterministic tar archive, and back.

Archives hold ``VERSION``, ``blobs/`` and ``entries/`` exactly as laid out on disk
(store/layout.py), never ``locks/``, ``verified/``, ``leases/`` or ``tmp/``, which belong to
one machine.  They are deterministic: the same entries and blobs give the same bytes.  An
import checks everything before it merges anything; a refused import changes nothing, and
creates no cache where there was none.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, cast

from pytest_upstream.admin.scan import open_cache
from pytest_upstream.config.keys import InvalidKeyError, validate_key
from pytest_upstream.repro.lockfile import LockFile
from pytest_upstream.store.blobs import stamp_of
from pytest_upstream.store.cache import Cache, CacheError
from pytest_upstream.store.entry import MAX_ENTRY_BYTES, Entry, entry_bytes, parse_entry
from pytest_upstream.store.files import AtomicFile, fsync_dir
from pytest_upstream.store.inventory import scan_entries
from pytest_upstream.store.layout import HEX2, HEX64, LAYOUT_VERSION, blob_rel, entry_rel

_CHUNK = 1024 * 1024


class ArchiveRefused(CacheError):
    """An archive that is not a well-formed, intact cache archive; nothing was imported."""


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

    With a lock: every blob the lock names (a missing one is an error) and the index entries
    that match a lock line (same key, path, variant and sha256).  Without: every readable
    entry whose blob is present, and those blobs.  Each blob is re-hashed on the way; a
    corrupt one is an error.  ``compress`` defaults to gzip for names ending in ``.gz`` or
    ``.tgz``.  The archive is written next to ``dest`` and renamed into place (AtomicFile).
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
    with AtomicFile(dest) as out:
        raw = out.file
        gz = (
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) if compress else None
        )
        stream = cast(IO[bytes], gz) if gz is not None else raw
        with tarfile.open(fileobj=stream, mode="w", format=tarfile.GNU_FORMAT) as tar:
            writer = _DeterministicTar(tar)
            writer.add_bytes("VERSION", LAYOUT_VERSION.encode())
            exported: set[str] = set()
            for sha in sorted(shas):
                size = writer.add_blob(cache, sha, sizes.get(sha), required=lock is not None)
                if size is not None:
                    exported.add(sha)
                    report.blobs += 1
                    report.blob_bytes += size
            for entry in sorted(chosen, key=lambda e: entry_rel(e.key, e.id)):
                if entry.sha256 in exported:  # its blob vanished meanwhile: leave the entry out
                    writer.add_bytes(entry_rel(entry.key, entry.id), entry_bytes(entry))
                    report.entries += 1
        if gz is not None:
            gz.close()
        raw.flush()
        report.archive_bytes = raw.tell()
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
        name = blob_rel(sha)
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
                    f"blob {sha} has {size} bytes, its entry or lock line says {expected_size}: "
                    "run `upstream-proxy cache verify` (it removes a wrong entry, keeps an intact blob)"
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


def import_into(root: Path, src: Path, lock_timeout: float = 30.0) -> tuple[Cache, ImportReport]:
    """``cache import``: merge ``src`` into the cache at ``root``, creating it only for a good archive.

    Where there is no cache yet, the archive is checked once without staging anything (a
    refused archive leaves no empty cache behind), then imported as usual.
    """
    root = Path(root)
    if not (root / "VERSION").is_file():
        _read_archive(Path(src), None, {}, [])
    cache = open_cache(root, create=True)
    return cache, import_archive(cache, src, lock_timeout)


def import_archive(cache: Cache, src: Path, lock_timeout: float = 30.0) -> ImportReport:
    """Merge a cache archive into ``cache``.

    Everything is checked before anything is merged: member names and types (only
    ``VERSION``, ``blobs/sha256/<2>/<64>`` and ``entries/<key>/<2>/<id>.json``, plus their
    directories; no links, devices or ``..``), every blob's sha256 against its name, every
    entry against its file name and its blob.  A bad archive raises ArchiveRefused and leaves
    the cache as it was.  Then blobs are hard-linked into place (an existing blob is kept) and
    entries written by atomic rename under their lock, keeping whichever copy has the newer
    ``fetched_at``.
    """
    staged: dict[str, AtomicFile] = {}  # sha256 -> verified bytes in tmp/
    entries: list[Entry] = []
    try:
        _read_archive(Path(src), cache, staged, entries)
        return _merge(cache, staged, entries, lock_timeout)
    finally:
        for out in staged.values():
            out.discard()


def _read_archive(
    src: Path, cache: Cache | None, staged: dict[str, AtomicFile], entries: list[Entry]
) -> None:
    """Check every member; stage each blob in ``cache``'s tmp/ (with no cache: only check)."""
    seen: set[str] = set()
    sizes: dict[str, int] = {}
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
                    sizes[parts[3]] = _stage_blob(cache, data, parts[3], name, staged)
                else:
                    raw = data.read(MAX_ENTRY_BYTES + 1)
                    try:
                        entries.append(parse_entry(raw, parts[1], parts[3]))
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
    for entry in entries:
        if entry.sha256 not in sizes:
            raise ArchiveRefused(
                f"{src}: refused, nothing imported: entry {entry.key} {entry.path!r} names blob "
                f"{entry.sha256}, which is not in the archive"
            )
        if sizes[entry.sha256] != entry.size:
            raise ArchiveRefused(
                f"{src}: refused, nothing imported: entry {entry.key} {entry.path!r} says {entry.size} "
                f"bytes, its blob has {sizes[entry.sha256]}"
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
        ) and (len(parts) < 3 or HEX2.fullmatch(parts[2]) is not None)
    elif name == "VERSION":
        ok = True
    elif parts[0] == "blobs":
        ok = (
            len(parts) == 4
            and parts[1] == "sha256"
            and HEX64.fullmatch(parts[3]) is not None
            and parts[2] == parts[3][:2]
        )
    elif parts[0] == "entries":
        stem = parts[3][: -len(".json")] if len(parts) == 4 and parts[3].endswith(".json") else ""
        ok = (
            bool(stem) and _valid_key(parts[1]) and HEX64.fullmatch(stem) is not None and parts[2] == stem[:2]
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


def _stage_blob(
    cache: Cache | None, data: IO[bytes], sha: str, name: str, staged: dict[str, AtomicFile]
) -> int:
    """Hash a blob member (into an AtomicFile in tmp/, given a cache); its size.  Refused if
    its bytes do not hash to its name."""
    out = AtomicFile(tmp_dir=cache.tmp) if cache is not None else None
    h = hashlib.sha256()
    size = 0
    try:
        while chunk := data.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
            if out is not None:
                out.write(chunk)
        if out is not None:
            out.sync()
    except BaseException:
        if out is not None:
            out.discard()
        raise
    if h.hexdigest() != sha:
        if out is not None:
            out.discard()
        raise ArchiveRefused(f"{name}: its bytes hash to {h.hexdigest()}, not to its name")
    if out is not None:
        staged[sha] = out
    return size


def _merge(
    cache: Cache, staged: dict[str, AtomicFile], entries: list[Entry], lock_timeout: float
) -> ImportReport:
    report = ImportReport()
    touched: set[Path] = set()
    for sha, out in sorted(staged.items()):
        target = cache.blob_path(sha)
        target.parent.mkdir(parents=True, exist_ok=True)
        outcome = _place_blob(cache, sha, out.path)
        out.discard()  # the staged name goes first: dropping a hard link changes the blob's ctime
        if outcome == "kept":
            report.blobs_kept += 1
        else:
            touched.add(target.parent)
            report.blobs_added += outcome == "added"
            report.blobs_repaired += outcome == "repaired"
            cache.verifier.remember(sha, stamp_of(os.stat(target)), marker=True)  # we just hashed it
    for directory in sorted(touched):
        fsync_dir(directory)
    for entry in sorted(entries, key=lambda e: entry_rel(e.key, e.id)):
        target = cache.root / entry_rel(entry.key, entry.id)
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


def _place_blob(cache: Cache, sha: str, staged: Path) -> str:
    """Hard-link a verified blob into place: "added", "kept" (already there) or "repaired".

    An existing blob of another size cannot hold the bytes its name promises (ours hash to
    that name), so it is replaced: the content rule, not a claim.
    """
    target = cache.blob_path(sha)
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
            if target.stat().st_size != staged.stat().st_size:
                os.replace(staged, target)
                return "repaired"
            cache.freshen_blob(sha)  # so a concurrent prune keeps it for the entry we will write
            return "kept"
        except FileNotFoundError:
            continue  # pruned meanwhile: link ours
