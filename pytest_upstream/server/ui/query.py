"""The query string of a ``/-/ui/<key>/`` list: filter, kind, sort, order, page, page size.

Every value comes from whoever sent the request, so each one is bounded and checked here, once:
an unknown sort column or order falls back to the default, a filter longer than ``MAX_FILTER``
characters is cut, the page size is one of ``PAGE_SIZES``, the page number at most ``MAX_PAGE``.
Nothing a client sends can make a page cost more than one pass over the key's rows.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from urllib.parse import parse_qsl, urlencode

MAX_FILTER = 200  # characters of the text filter
MAX_QUERY = 4096  # characters of a query string (a longer one is refused: server/ui/routes.py)
MAX_FIELDS = 16  # fields of a query string (more are refused)
MAX_PAGE = 1_000_000
PAGE_SIZES = (25, 50, 100, 200, 500)
DEFAULT_PAGE_SIZE = 50
SORTS = ("name", "version", "path", "kind", "size", "fetched", "served", "hits")
KINDS = ("", "artifact", "metadata", "notfound")
DESCENDING_FIRST = frozenset({"size", "fetched", "served", "hits"})  # a click on them shows the largest first


@dataclass(frozen=True)
class ListQuery:
    """One list page as asked for, every field within bounds."""

    text: str = ""  # case-insensitive substring of name, version or path
    kind: str = ""  # "" (all) or one of the entry kinds
    sort: str = "name"
    descending: bool = False
    page: int = 1
    per_page: int = DEFAULT_PAGE_SIZE

    @classmethod
    def parse(cls, query: str) -> ListQuery:
        """The query from a raw query string (percent-decoded here; unknown values ignored)."""
        try:
            fields = dict(parse_qsl(query[:MAX_QUERY], keep_blank_values=True, max_num_fields=MAX_FIELDS))
        except ValueError:  # too many fields: the defaults
            fields = {}
        sort = fields.get("sort", "name")
        sort = sort if sort in SORTS else "name"
        kind = fields.get("kind", "")
        return cls(
            text=" ".join(fields.get("q", "").split())[:MAX_FILTER],
            kind=kind if kind in KINDS else "",
            sort=sort,
            descending=fields.get("order", "") == "desc",
            page=_bounded(fields.get("page", ""), 1, MAX_PAGE, 1),
            per_page=size
            if (size := _bounded(fields.get("per", ""), 1, 10**6, 0)) in PAGE_SIZES
            else DEFAULT_PAGE_SIZE,
        )

    def query_string(self, **changes: object) -> str:
        """This query with ``changes``, as ``?...`` (defaults left out), for the page's links."""
        q = replace(self, **changes)  # type: ignore[arg-type]
        params = {
            "q": q.text,
            "kind": q.kind,
            "sort": "" if q.sort == "name" else q.sort,
            "order": "desc" if q.descending else "",
            "page": "" if q.page == 1 else str(q.page),
            "per": "" if q.per_page == DEFAULT_PAGE_SIZE else str(q.per_page),
        }
        encoded = urlencode({k: v for k, v in params.items() if v})
        return f"?{encoded}" if encoded else "?"

    def sort_link(self, column: str) -> str:
        """The link of a column's header: sort by it (the other way when it is the sort already)."""
        if column == self.sort:
            return self.query_string(descending=not self.descending, page=1)
        return self.query_string(sort=column, descending=column in DESCENDING_FIRST, page=1)


def _bounded(text: str, low: int, high: int, default: int) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 9:
        return default
    return min(max(int(text), low), high)
