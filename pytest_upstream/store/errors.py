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
