"""What the admin commands share: opening a cache directory.

Reading one (``scan_entries``, ``scan_blobs``) and removing its files safely
(``remove_entry_file``, ``evict_blob``) are in the store layer (store/inventory.py), where the
proxy's own size cap (store/trim.py) uses them too.
"""

from __future__ import annotations

from pathlib import Path

from pytest_upstream.store.cache import Cache, CacheError


def open_cache(root: Path, *, create: bool = False) -> Cache:
    """The cache at ``root``; without ``create``, a directory that is not a cache is an error."""
    root = Path(root)
    if not create and not (root / "VERSION").is_file():
        raise CacheError(f"{root}: not a cache directory (no VERSION file)")
    return Cache(root)
