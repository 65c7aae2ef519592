"""``cache ls``: the entries of a cache (or of one key) with the totals of the whole cache."""

from __future__ import annotations

from collections.abc import Sized
from dataclasses import dataclass
from typing import Any, Protocol

from pytest_upstream.store.cache import Cache
from pytest_upstream.store.inventory import EntryFile, scan_blobs, scan_entries


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
            "totals": totals_json(self),
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


class Totals(Protocol):
    @property
    def entries(self) -> Sized: ...
    @property
    def entry_bytes(self) -> int: ...
    @property
    def blobs(self) -> int: ...
    @property
    def blob_bytes(self) -> int: ...
    @property
    def unreferenced_blobs(self) -> int: ...
    @property
    def unreferenced_bytes(self) -> int: ...


def totals_json(listing: Totals) -> dict[str, int]:
    """The ``totals`` of ``cache ls --json``, for a directory's listing and a bucket's."""
    return {
        "entries": len(listing.entries),
        "entry_bytes": listing.entry_bytes,
        "blobs": listing.blobs,
        "blob_bytes": listing.blob_bytes,
        "unreferenced_blobs": listing.unreferenced_blobs,
        "unreferenced_bytes": listing.unreferenced_bytes,
    }
