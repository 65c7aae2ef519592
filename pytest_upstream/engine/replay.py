"""Serving from a lock file (docs/reproducible-builds.md): in replay mode with a lock, exactly
the bytes it names are served, whatever the shared cache's index says now (another project may
have refreshed it); anything the lock does not name is a miss."""

from __future__ import annotations

from pathlib import Path

from pytest_upstream.config.settings import ProxyDefinition, Settings
from pytest_upstream.engine.errors import ReplayMiss
from pytest_upstream.engine.recorders import Recorders
from pytest_upstream.formats.base import FormatError, Resource
from pytest_upstream.repro.lockfile import LockError, LockFile
from pytest_upstream.store.cache import Cache, CacheError, Entry
from pytest_upstream.store.entry import NOT_FOUND


def load_lock(settings: Settings) -> LockFile | None:
    """The configured lock file; required in replay mode, optional (written later) otherwise."""
    path = settings.lock_file
    if path is None:
        return None
    if path.is_file():
        return LockFile.load(path)
    if settings.mode == "replay":
        raise LockError(f"{path}: lock file not found; run in record mode to write it")
    return None


def miss_message(settings: Settings, lock: LockFile | None, proxy: ProxyDefinition, res: Resource) -> str:
    if lock is not None:
        return (
            f"replay mode: {res.upstream_url} ({proxy.key} {res.path}) is not in the lock file "
            f"{settings.lock_file}; run in record or refresh mode to add it"
        )
    return (
        f"replay mode: {res.upstream_url} was not recorded for upstream proxy {proxy.key!r} "
        f"(cache {settings.cache_dir}); run in record mode to fetch it"
    )


def locked_blob(
    settings: Settings,
    lock: LockFile,
    cache: Cache,
    recorders: Recorders,
    proxy: ProxyDefinition,
    res: Resource,
) -> tuple[Entry, Path]:
    """The locked entry and its verified bytes; ReplayMiss, or a 404 for a locked not-found answer."""
    locked = lock.get(proxy.key, res.path, res.variant)
    if locked is None:
        raise ReplayMiss(miss_message(settings, lock, proxy, res))
    current = cache.lookup(proxy.key, res.path, res.variant)
    if current is None or current.sha256 != locked.sha256 or current.kind != locked.kind:
        # The index moved on: the bytes are still in the content-addressed store, and the
        # lock kept the upstream's headers.
        current = Entry(
            key=proxy.key,
            path=res.path,
            variant=res.variant,
            upstream_url=res.upstream_url,
            sha256=locked.sha256,
            size=locked.size,
            kind=locked.kind,
            fetched_at=0.0,
            content_type=locked.content_type or res.content_type,
            headers=dict(locked.headers),
        )
    if locked.kind == NOT_FOUND:
        recorders.used(proxy.key, res, current)
        where = settings.lock_file
        raise FormatError(404, f"not found upstream: {res.upstream_url} (locked in {where})", cache="hit")
    try:
        blob = cache.claimed_blob(locked.sha256, locked.size, f"the lock file {settings.lock_file}")
    except CacheError as exc:  # missing, corrupt (and removed), or a size the lock file misstates
        raise ReplayMiss(
            f"replay mode: cannot serve {res.upstream_url} as the lock file names it: {exc}; "
            f"cache {settings.cache_dir}; run `upstream-proxy lock verify`, or record again"
        ) from None
    return current, blob
