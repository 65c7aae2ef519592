"""Reading a cache directory whole, and removing its files safely while it is in use.

The admin commands (ls, verify, prune, export) and the proxy's size cap (trim.py) read and
remove files here, and every one is safe while proxies, pytest sessions and other commands use
the same directory (docs/cache.md):

- files are only ever replaced by atomic renames (store/files.py);
- an entry is removed only while its entry lock is held (taken without waiting: a busy entry,
  such as one being fetched, is skipped), and only if it is still the file that was judged
  (same inode and mtime: the local backend's version, store/local.py, so the delete is
  conditional on it: an entry used or replaced since stays);
- a blob is removed by renaming it into ``tmp/`` first and checking that the renamed file is
  the one that was judged (same inode, not freshened within the grace period); a fresh copy
  that a fetch or an import put there meanwhile is renamed back (same name, same bytes), so a
  blob being indexed right now is not lost.  A client being sent the blob keeps its open
  descriptor: the bytes stay readable until it closes it.

Entry files are read with the proxy's own strict parser (store/entry.py ``parse_entry``).
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pytest_upstream.store.blobs import remove_marker
from pytest_upstream.store.cache import Cache, LockTimeout
from pytest_upstream.store.entry import MAX_ENTRY_BYTES, Entry, parse_entry
from pytest_upstream.store.layout import HEX2, HEX64


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

    @property
    def eid(self) -> str:
        return self.rel.rsplit("/", 1)[-1].removesuffix(".json")


def scan_entries(cache: Cache, key: str | None = None) -> list[EntryFile]:
    """Every ``*.json`` file under ``entries/`` (or ``entries/<key>/``), sorted by path."""
    found: list[EntryFile] = []
    for k, eid in cache.backend.list_index(key):
        file = Path(cache.layout.entry(k, eid))
        try:
            with open(file, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read(MAX_ENTRY_BYTES + 1)
        except FileNotFoundError:
            continue  # replaced or removed meanwhile
        except OSError as exc:
            found.append(EntryFile(file, rel(cache, file), 0, 0, None, str(exc)))
            continue
        try:
            entry: Entry | None = parse_entry(data, k, file.name)
            error = ""
        except ValueError as exc:
            entry, error = None, str(exc)
        found.append(EntryFile(file, rel(cache, file), st.st_ino, st.st_mtime_ns, entry, error))
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
    for dirpath, dirnames, filenames in os.walk(cache.layout.blobs.parent):
        dirnames.sort()
        here = Path(dirpath)
        for name in sorted(filenames):
            path = here / name
            well_placed = here.parent == cache.blobs and HEX2.fullmatch(here.name) and HEX64.fullmatch(name)
            if not well_placed or name[:2] != here.name:
                stray.append(path)
                continue
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            blobs[name] = BlobFile(name, path, st.st_size, st.st_ino, st.st_mtime)
    return blobs, stray


def remove_entry_file(
    cache: Cache, ef: EntryFile, still_bad: Callable[[EntryFile], bool], raise_busy: bool = False
) -> bool:
    """Unlink an entry file under its lock if it is still the file that was judged.

    The lock is taken without waiting (an entry known only by its file name is locked by the
    id in that name).  Returns False (kept) when the file changed since it was scanned (used,
    or replaced by a fetch) or, unless ``raise_busy``, when the lock is held.
    """
    try:
        with cache.locked_id(ef.eid, timeout=0):
            if not still_bad(ef):
                return False
            key = ef.rel.split("/")[1]
            return cache.backend.delete_index(
                key, ef.eid, if_version=cache.backend.version_of(ef.ino, ef.mtime_ns)
            )
    except LockTimeout:
        if raise_busy:
            raise
        return False


def evict_blob(cache: Cache, path: Path, ino: int, min_age: float, now: float | None = None) -> int | None:
    """Remove a blob if it is still the file that was judged; its size, or None if kept.

    The blob is renamed into ``tmp/`` first.  If what was renamed is not that file (another
    inode than ``ino``, or written less than ``min_age`` seconds ago), a fetch or an import put
    a fresh copy there meanwhile: it is renamed back, which is harmless because a blob's name
    is its content.  The blob's verification marker goes with it.  ``now``: the caller's clock
    (default the wall clock, which file times follow).
    """
    cutoff = (time.time() if now is None else now) - min_age
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    if st.st_ino != ino or st.st_mtime > cutoff:
        return None
    aside = cache.tmp / f".{path.name[:16]}.{secrets.token_hex(8)}.tmp"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return None
    moved = os.stat(aside)
    if moved.st_ino != ino or moved.st_mtime > cutoff:
        os.replace(aside, path)
        return None
    aside.unlink()
    remove_marker(cache.layout, path.name)
    return moved.st_size


def rel(cache: Cache, path: Path) -> str:
    return path.relative_to(cache.root).as_posix()
