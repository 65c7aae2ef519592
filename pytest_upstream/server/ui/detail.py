"""The view model of one entry's ``/-/ui/<key>/<entry id>`` page: its entry file (read with the
one strict parser, without marking it used), its row's counts, and what pins it (lock files).
Headers shown are the entry's kept ones (store/headers.py) minus anything that looks like a
credential; the URL goes through ``shown_url``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from pytest_upstream.config.units import human_age, human_size
from pytest_upstream.engine.dispatch import Engine
from pytest_upstream.repro.lockfile import LockError, LockFile
from pytest_upstream.server.ui.values import iso_time, shown_url
from pytest_upstream.store.entry import MAX_ENTRY_BYTES, Entry, parse_entry

_SECRET_WORDS = ("auth", "cookie", "token", "secret", "password")


@dataclass(frozen=True)
class Detail:
    key: str
    eid: str
    name: str
    version: str
    fields: list[tuple[str, str, str]]  # (id, label, value), in order
    headers: list[tuple[str, str]]
    pins: list[str] = field(default_factory=list)  # what pins the entry, one line each


def detail(engine: Engine, key: str, eid: str) -> Detail | None:
    """The entry ``eid`` of ``key`` as its file says now (None when there is no such entry)."""
    entry = _read_entry(engine, key, eid)
    if entry is None:
        return None
    row = engine.artifacts.row(key, eid)
    now = engine.clock.now()
    name = (row.name if row else "") or entry.path
    version = row.version if row else ""
    served = row.last_served if row else 0.0
    blob = os.path.exists(engine.cache.layout.blob(entry.sha256))
    fields = [
        ("key", "key", entry.key),
        ("path", "path", entry.path),
        ("variant", "variant", entry.variant or "-"),
        ("kind", "kind", entry.kind),
        ("upstream", "upstream URL", shown_url(engine, entry.upstream_url)),
        ("sha256", "sha256", entry.sha256),
        ("size", "size", f"{human_size(entry.size)} ({entry.size} bytes)"),
        ("fetched", "fetched at", f"{iso_time(entry.fetched_at)} ({human_age(now - entry.fetched_at)} ago)"),
        (
            "served",
            "last served",
            f"{iso_time(served)} ({human_age(now - served)} ago)" if served else "never",
        ),
        ("hits", "hits (this process)", str(row.hits if row else 0)),
        ("content-type", "content type", entry.content_type or "-"),
        ("etag", "ETag", entry.etag or "-"),
        ("last-modified", "Last-Modified", entry.last_modified or "-"),
        ("blob", "blob", "present" if blob else "missing (the next request fetches it again)"),
    ]
    headers = sorted(
        (k, v) for k, v in entry.headers.items() if not any(w in k.lower() for w in _SECRET_WORDS)
    )
    return Detail(key, eid, name, version, fields, headers, pins(engine, entry))


def pins(engine: Engine, entry: Entry) -> list[str]:
    """What keeps ``entry`` (or its blob) from eviction: the session's lock file and ``--keep-lock`` files."""
    out = []
    settings = engine.settings
    if engine.lock is not None:
        where = str(settings.lock_file) if settings.lock_file else "the session's lock file"
        out += _pinned_by(engine.lock, entry, where)
    for path in settings.keep_locks:
        try:
            lock = LockFile.load(path)
        except (LockError, OSError) as exc:
            out.append(f"{path}: cannot be read ({engine.scrub(str(exc))})")
            continue
        out += _pinned_by(lock, entry, f"{path} (--keep-lock)")
    return out


def _pinned_by(lock: LockFile, entry: Entry, where: str) -> list[str]:
    locked = lock.get(entry.key, entry.path, entry.variant)
    if locked is not None and locked.sha256 == entry.sha256:
        return [f"{where}: names this entry and its bytes"]
    if locked is not None:
        return [f"{where}: names this entry with other bytes ({locked.sha256[:12]}...)"]
    if any(e.sha256 == entry.sha256 for e in lock):
        return [f"{where}: names its bytes (under another path)"]
    return []


def _read_entry(engine: Engine, key: str, eid: str) -> Entry | None:
    """The entry file, read with the one strict parser, without marking it used (a look is no use)."""
    name = engine.cache.layout.entry(key, eid)
    try:
        with open(name, "rb") as f:
            return parse_entry(f.read(MAX_ENTRY_BYTES + 1), key, f"{eid}.json")
    except (OSError, ValueError):
        return None
