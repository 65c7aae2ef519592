"""Where everything lives in a cache directory: the one description of the on-disk layout.

Layout version "1" (docs/cache.md)::

    VERSION                           layout version ("1")
    blobs/sha256/<2 hex>/<64 hex>     the bytes, named by their sha256
    entries/<key>/<2 hex>/<id>.json   one index entry per cached request
    verified/<2 hex>/<64 hex>         a blob's verification marker: the (inode, size, mtime,
                                      ctime) it had when its bytes were last hashed
    locks/stripe-<4 hex>.lock         LOCK_STRIPES file locks, shared by entries by their id
    locks/trim.lock                   held by the one process trimming to the size cap
    leases/<name>.lease               leases of the storage backend (store/local.py)
    tmp/                              files being written (same file system as the rest)

Markers, stripes and leases are additions to layout "1": an older version ignores them, and a
cache an older version wrote (with ``locks/<key>/<2 hex>/<id>.lock`` files) keeps working; its
old lock files are simply no longer used.  Paths are plain string joins: they are computed on
every cache hit, where pathlib's parsing was the largest single cost.
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

LAYOUT_VERSION = "1"
LOCK_STRIPES = 1024  # lock files in locks/: bounded, whatever the number of entries
HEX64 = re.compile(r"[0-9a-f]{64}")
HEX2 = re.compile(r"[0-9a-f]{2}")


class Layout:
    """The paths of one cache directory; computes, never touches the disk."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.version_file = self.root / "VERSION"
        self.blobs = self.root / "blobs" / "sha256"
        self.entries = self.root / "entries"
        self.verified = self.root / "verified"
        self.locks = self.root / "locks"
        self.trim_lock = self.locks / "trim.lock"  # engine/trimmer.py: one trimmer at a time
        self.leases = self.root / "leases"
        self.tmp = self.root / "tmp"
        self._blobs = str(self.blobs)
        self._entries = str(self.entries)
        self._verified = str(self.verified)

    @property
    def directories(self) -> tuple[Path, ...]:
        """The directories a cache has from the start."""
        return (self.blobs, self.entries, self.verified, self.locks, self.tmp)

    def blob(self, sha256: str) -> str:
        return f"{self._blobs}/{sha256[:2]}/{sha256}"

    def marker(self, sha256: str) -> str:
        return f"{self._verified}/{sha256[:2]}/{sha256}"

    def entry(self, key: str, eid: str) -> str:
        return f"{self._entries}/{key}/{eid[:2]}/{eid}.json"

    def lock_stripe(self, eid: str) -> Path:
        return self.locks / f"stripe-{stripe_of(eid):04x}.lock"

    def lease(self, name: str) -> Path:
        return self.leases / f"{name}.lease"


def stripe_of(eid: str) -> int:
    """The lock stripe of an entry id (64 hex digits, uniformly spread by sha256).

    Any other name (a stray file under ``entries/``) gets a stripe too, by its crc32.
    """
    try:
        return int(eid[:8], 16) % LOCK_STRIPES
    except ValueError:
        return zlib.crc32(eid.encode()) % LOCK_STRIPES


def blob_rel(sha256: str) -> str:
    """A blob's path below the cache root, with forward slashes (also its archive member name)."""
    return f"blobs/sha256/{sha256[:2]}/{sha256}"


def entry_rel(key: str, eid: str) -> str:
    """An entry's path below the cache root, with forward slashes (also its archive member name)."""
    return f"entries/{key}/{eid[:2]}/{eid}.json"


def dir_names(directory: Path) -> Iterator[str]:
    """The names in ``directory`` (none if it is missing): how the layout's folders are walked."""
    try:
        with os.scandir(directory) as it:
            for d in it:
                yield d.name
    except (FileNotFoundError, NotADirectoryError):
        return
