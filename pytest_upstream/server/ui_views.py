"""The view models of the ``/-/ui/`` pages: plain values a template shows, built from the engine.

Three pages (docs/ui.md): the **overview** (every proxy and group, with health and the counters
of ``/-/metrics``, read from the same ``Metrics``), a key's **list** of cached entries (from the
engine's in-memory ``ArtifactIndex``: no entry file is read per request), and one entry's
**detail** (its entry file, read strictly, and what pins it).  Values here are never marked safe:
the templates escape every one (pages/templates.py).  What could carry a secret is cut before
it gets here: URLs lose any user-info and pass ``Engine.scrub``; headers are the entry's kept
ones (store/headers.py) minus anything that looks like a credential.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from pytest_upstream.config.units import human_age, human_size
from pytest_upstream.engine.artifact_index import Row
from pytest_upstream.engine.dispatch import Engine
from pytest_upstream.engine.metrics import RESULTS
from pytest_upstream.repro.lockfile import LockError, LockFile
from pytest_upstream.server.ui_query import ListQuery
from pytest_upstream.store.entry import MAX_ENTRY_BYTES, Entry, parse_entry

SCAN_WAIT = 0.5  # seconds a list page waits for the start-up scan before showing what it has
_SECRET_WORDS = ("auth", "cookie", "token", "secret", "password")


@dataclass(frozen=True)
class ProxyView:
    key: str
    source: str
    format: str
    url: str
    auth: str  # the mode only ("anonymous", "basic", "bearer"), never a value
    mode: str
    health: str  # "up", "backed off", "offline"
    health_note: str  # "until 12:00:03 UTC after 3 failures", ""
    requests: int
    hit_rate: str  # "87%", "-" before any answer
    counts: dict[str, int]  # by result, and bytes_cache, bytes_upstream, fetches, failures
    entries: int


@dataclass(frozen=True)
class GroupView:
    key: str
    format: str
    members: tuple[str, ...]
    strategy: str


@dataclass(frozen=True)
class Overview:
    mode: str
    proxies: list[ProxyView]
    groups: list[GroupView]
    gauges: dict[str, int]
    results: tuple[str, ...] = RESULTS


@dataclass(frozen=True)
class RowView:
    eid: str
    name: str  # the format's name, else the path
    version: str
    path: str
    variant: str
    kind: str
    size: str
    fetched: str  # "3h ago"
    fetched_iso: str
    served: str  # "5m ago", "never"
    served_iso: str
    hits: int


@dataclass(frozen=True)
class ListPage:
    key: str
    format: str
    query: ListQuery
    rows: list[RowView]
    total: int  # entries of the key
    matched: int  # entries the filter kept
    pages: int
    scanning: bool  # the start-up scan is still reading the cache: the list may be partial


@dataclass(frozen=True)
class Detail:
    key: str
    eid: str
    name: str
    version: str
    fields: list[tuple[str, str, str]]  # (id, label, value), in order
    headers: list[tuple[str, str]]
    pins: list[str] = field(default_factory=list)  # what pins the entry, one line each


def overview(engine: Engine) -> Overview:
    settings = engine.settings
    counts = engine.metrics.per_key()
    down = engine.health.down_until()
    engine.artifacts.wait_scanned(SCAN_WAIT)
    proxies = []
    for p in settings.proxies:
        mine = counts.get(p.key, {})
        answered = sum(mine.get(r, 0) for r in RESULTS)
        served = sum(mine.get(r, 0) for r in ("hit", "miss", "stale", "pass_through"))
        health, note = "up", ""
        if p.offline:
            health = "offline"
        elif p.key in down:
            until, failures = down[p.key]
            health, note = "backed off", f"until {_iso(until)[11:]}, {failures} failures in a row"
        proxies.append(
            ProxyView(
                key=p.key,
                source=p.source,
                format=p.format,
                url=shown_url(engine, p.url),
                auth=p.auth.mode,
                mode=settings.mode,
                health=health,
                health_note=note,
                requests=answered,
                hit_rate=f"{100 * mine.get('hit', 0) / served:.0f}%" if served else "-",
                counts=mine,
                entries=engine.artifacts.count(p.key),
            )
        )
    groups = [GroupView(g.key, g.format, g.members, g.strategy) for g in settings.groups]
    return Overview(settings.mode, proxies, groups, engine.metrics.gauges())


def list_page(engine: Engine, key: str, query: ListQuery) -> ListPage:
    """One page of ``key``'s entries: filtered, sorted and cut as ``query`` says."""
    index = engine.artifacts
    scanning = not index.wait_scanned(SCAN_WAIT)
    counts = query.sort in ("served", "hits")  # change with every answer: not remembered
    rows = index.ordered(key, "" if counts else query.sort, _SORT_KEYS[query.sort], query.descending)
    total = len(rows)
    if query.kind:
        rows = [r for r in rows if r.kind == query.kind]
    if query.text:
        needle = query.text.lower()
        rows = [r for r in rows if needle in r.search]
    pages = max((len(rows) + query.per_page - 1) // query.per_page, 1)
    page = min(query.page, pages)
    start = (page - 1) * query.per_page
    now = engine.clock.now()
    shown = [_row_view(r, now) for r in rows[start : start + query.per_page]]
    proxy = engine.settings.proxy(key)
    return ListPage(
        key=key,
        format=proxy.format if proxy else "",
        query=ListQuery(query.text, query.kind, query.sort, query.descending, page, query.per_page),
        rows=shown,
        total=total,
        matched=len(rows),
        pages=pages,
        scanning=scanning,
    )


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
        ("fetched", "fetched at", f"{_iso(entry.fetched_at)} ({human_age(now - entry.fetched_at)} ago)"),
        ("served", "last served", f"{_iso(served)} ({human_age(now - served)} ago)" if served else "never"),
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


def shown_url(engine: Engine, url: str) -> str:
    """``url`` without user-info, and without any configured secret (``Engine.scrub``)."""
    try:
        parts = urlsplit(url)
        if parts.username is not None or parts.password is not None:
            host = parts.hostname or ""
            netloc = (f"[{host}]" if ":" in host else host) + (f":{parts.port}" if parts.port else "")
            url = urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "(not a valid URL)"
    return engine.scrub(url)


def _read_entry(engine: Engine, key: str, eid: str) -> Entry | None:
    """The entry file, read with the one strict parser, without marking it used (a look is no use)."""
    name = engine.cache.layout.entry(key, eid)
    try:
        with open(name, "rb") as f:
            return parse_entry(f.read(MAX_ENTRY_BYTES + 1), key, f"{eid}.json")
    except (OSError, ValueError):
        return None


def _row_view(r: Row, now: float) -> RowView:
    served = r.last_served
    return RowView(
        eid=r.eid,
        name=r.name or r.path,
        version=r.version,
        path=r.path,
        variant=r.variant,
        kind=r.kind,
        size=human_size(r.size),
        fetched=f"{human_age(now - r.fetched_at)} ago",
        fetched_iso=_iso(r.fetched_at),
        served=f"{human_age(now - served)} ago" if served else "never",
        served_iso=_iso(served) if served else "",
        hits=r.hits,
    )


def _iso(t: float) -> str:
    try:
        return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return "-"


_SORT_KEYS = {
    "name": lambda r: ((r.name or r.path).lower(), r.version, r.path, r.variant),
    "version": lambda r: (r.version, (r.name or r.path).lower(), r.path),
    "path": lambda r: (r.path, r.variant),
    "kind": lambda r: (r.kind, r.path),
    "size": lambda r: (r.size, r.path),
    "fetched": lambda r: (r.fetched_at, r.path),
    "served": lambda r: (r.last_served, r.path),
    "hits": lambda r: (r.hits, r.path),
}
