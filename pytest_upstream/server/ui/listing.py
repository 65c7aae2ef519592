"""The view model of a key's ``/-/ui/<key>/`` list: filtered, sorted and cut into pages as the
query says (``ui/query.py``), from the engine's in-memory ``ArtifactIndex``: no entry file is
read per request.  Values are never marked safe: the templates escape every one."""

from __future__ import annotations

from dataclasses import dataclass

from pytest_upstream.config.units import human_age, human_size
from pytest_upstream.engine.artifact_index import Row
from pytest_upstream.engine.dispatch import Engine
from pytest_upstream.server.ui.query import ListQuery
from pytest_upstream.server.ui.values import SCAN_WAIT, iso_time


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
        fetched_iso=iso_time(r.fetched_at),
        served=f"{human_age(now - served)} ago" if served else "never",
        served_iso=iso_time(served) if served else "",
        hits=r.hits,
    )


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
