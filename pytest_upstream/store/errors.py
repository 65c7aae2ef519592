"""The store's exceptions: what the engine maps to status codes and the CLI to messages."""

from __future__ import annotations

import errno


class CacheError(RuntimeError):
    """The cache could not be read or written."""


class DigestMismatch(CacheError):
    """Downloaded bytes do not match the digest the upstream published."""


class LockTimeout(CacheError):
    """Another process held an entry's lock for longer than the timeout."""


class ClaimMismatch(CacheError):
    """An entry or a lock file claims a size its (intact) blob does not have: the claim is wrong.

    The blob hashes to its name, so its bytes are kept; only the claim is in error.
    """


class StoreFailed(CacheError):
    """The cache cannot store now: the disk is full, over quota, or the cache is read-only.

    Not a fault of the bytes or of the cache's contents: hits keep working, and the engine
    passes a miss through or refuses it before any body byte (docs/cache.md, "Disk full").
    """


# The errors that mean "the cache cannot take more bytes now", rather than a bug or a bad file.
CANNOT_STORE_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("ENOSPC", "EDQUOT", "EROFS", "EACCES", "EPERM", "EFBIG")
    if hasattr(errno, name)
)


def cannot_store(exc: BaseException) -> bool:
    """Whether ``exc`` says the cache cannot store (``CANNOT_STORE_ERRNOS``)."""
    return isinstance(exc, StoreFailed) or (isinstance(exc, OSError) and exc.errno in CANNOT_STORE_ERRNOS)


class ObjectStoreError(CacheError):
    """The object store (an ``s3://`` cache) failed a request: unreachable, timed out, refused
    access or answered an error.  The message names the operation, bucket, key and status, never
    a credential; local-tier hits do not depend on it, so callers may degrade instead of failing.
    """

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status, or None when no answer came
        self.code = code  # the S3 error code (AccessDenied, ...) or our own kind (unreachable, timeout)
