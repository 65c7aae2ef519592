"""The store's exceptions: what the engine maps to status codes and the CLI to messages."""

from __future__ import annotations


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
