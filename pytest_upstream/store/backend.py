"""The storage seam: what the cache needs from the place its bytes live.

The cache (``cache.py``) and the admin commands speak to storage through ``Backend``.  The
local directory (``local.py``, ``LocalBackend``) is the first backend; object storage (S3 and
the like, for a cache shared by many machines) is meant to be the next, so the interface is
shaped for it, not for POSIX:

- **Blobs are content-addressed and immutable**: put once under their sha256, never
  modified.  A blob is deleted only when its content does not hash to its name
  (``delete_blob_if_corrupt``), or by ``prune`` when nothing names it.  A backend that has a
  local file for a blob says so (``blob_local_path``), so hits can be sent with ``sendfile``.
- **Index objects are small** (an entry is a few hundred bytes) and every change is
  *conditional*: create only if absent, replace or delete only if the version read is still
  current (S3: ``If-None-Match: *`` / ``If-Match: <etag>``; local: ``O_EXCL``/link, and the
  version ``<inode>-<mtime_ns>``).  So two writers never silently overwrite each other, and
  ``prune`` deletes an entry only if nobody used or replaced it since it was judged.
- **Leases, not flocks**, for "one fetch at a time" across machines: acquire with an expiry
  (a token, or None while someone else holds it), renew while working, release when done; a
  holder that dies stops renewing and its lease is taken over after expiry.  On one machine
  the cache uses cheaper striped ``flock``s (``locks.py``), which the OS releases at once when
  a holder dies.

Where things are is the backend's business: keys are ``(key, name)`` for index objects and
the sha256 for blobs; ``store/layout.py`` maps them to paths for the local backend.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol


@dataclass(frozen=True)
class BlobInfo:
    sha256: str
    size: int


@dataclass(frozen=True)
class IndexObject:
    data: bytes
    version: str  # opaque; pass it back to replace or delete only this version


class Backend(Protocol):
    """Content-addressed blobs, small conditional index objects, and leases."""

    # -- blobs -------------------------------------------------------------
    def blob_stat(self, sha256: str) -> BlobInfo | None:
        """The blob's size, or None if it is absent."""
        ...

    def blob_local_path(self, sha256: str) -> Path | None:
        """A local file holding the blob (for ``sendfile``), or None if there is none."""
        ...

    def open_blob(self, sha256: str) -> BinaryIO:
        """The blob's bytes for reading; FileNotFoundError if absent."""
        ...

    def put_blob(self, source: Path, sha256: str) -> bool:
        """Store the local file ``source``, whose bytes the caller hashed to ``sha256``.

        ``source`` is consumed (moved or deleted).  False if the blob was already there
        (content addressing: the stored copy is kept).
        """
        ...

    def delete_blob_if_corrupt(self, sha256: str) -> bool:
        """Hash the stored blob; delete it only if its content does not hash to its name."""
        ...

    # -- index ---------------------------------------------------------------
    def get_index(self, key: str, name: str) -> IndexObject | None: ...

    def put_index(
        self,
        key: str,
        name: str,
        data: bytes,
        *,
        if_absent: bool = False,
        if_version: str | None = None,
        durable: bool = True,
    ) -> str | None:
        """Write an index object; its new version, or None if the condition failed.

        ``if_absent``: only create.  ``if_version``: only replace that version.
        Neither: replace unconditionally.
        """
        ...

    def delete_index(self, key: str, name: str, *, if_version: str | None = None) -> bool:
        """Delete (only the version ``if_version``, if given); False if absent or changed."""
        ...

    def list_index(self, key: str | None = None) -> Iterator[tuple[str, str]]:
        """``(key, name)`` of every index object (of one key), sorted."""
        ...

    # -- leases ----------------------------------------------------------------
    def acquire_lease(self, name: str, ttl: float) -> str | None:
        """A token if we now hold lease ``name`` for ``ttl`` seconds; None while another holds it."""
        ...

    def renew_lease(self, name: str, token: str, ttl: float) -> bool:
        """Extend our lease; False if it expired and was taken over (stop working)."""
        ...

    def release_lease(self, name: str, token: str) -> None:
        """Give the lease up (nothing happens if it is no longer ours)."""
        ...
