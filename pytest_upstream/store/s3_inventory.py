"""Reading a bucket's blobs whole, and removing them, for the admin commands on an ``s3://``
cache (admin/object_store.py): what ``inventory.py`` is for a directory.

The storage seam (backend.py) has no "list blobs" or "delete a blob that is intact": the proxy
never needs them, only ``cache ls`` (totals), ``cache verify`` and ``cache prune`` do.  A blob
is removed only if it is still the object that was judged (its ETag, as ``S3Backend`` deletes
index objects), so a copy put again since the listing is kept.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

from pytest_upstream.store.layout import HEX64
from pytest_upstream.store.s3 import S3Backend


@dataclass(frozen=True)
class StoredBlob:
    sha256: str
    size: int
    modified: float  # the store's LastModified, Unix seconds (its clock, not ours)
    etag: str


def list_blobs(backend: S3Backend) -> Iterator[StoredBlob]:
    """Every object under ``PREFIX/blobs/`` named as a blob (``<2 hex>/<64 hex>``); others are skipped."""
    base = backend.location.key("blobs/")
    pages = iter(backend.client.get_paginator("list_objects_v2").paginate(Bucket=backend.bucket, Prefix=base))
    while (page := backend._call("LIST", base, lambda: next(pages, None))) is not None:
        for item in page.get("Contents") or ():
            fan, _, name = str(item["Key"])[len(base) :].partition("/")
            if HEX64.fullmatch(name) and fan == name[:2]:
                modified = item.get("LastModified")
                yield StoredBlob(
                    name,
                    int(item.get("Size") or 0),
                    modified.timestamp() if isinstance(modified, datetime) else 0.0,
                    str(item.get("ETag") or ""),
                )


def delete_blob(backend: S3Backend, blob: StoredBlob) -> bool:
    """Delete ``blob`` only if it is still the object listed (same ETag); False if kept."""
    return backend._delete_version(backend.blob_key(blob.sha256), blob.etag)
