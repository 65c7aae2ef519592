"""A docker tag list (``/v2/<name>/tags/list``): its pages and the tags a policy keeps out.

Registries page a tag list with ``n`` and ``last`` and a ``Link`` header to the next page; the
proxy keeps one cache entry per page and points the ``Link`` back through itself.  A release
policy's hidden tags are taken out of each page (formats/hiding.py).
"""

from __future__ import annotations

import json
import re
from urllib.parse import parse_qsl, urlencode, urlsplit

from pytest_upstream.formats.hiding import Hiding, hide_tags


def hidden_tag_list(path: str, body: bytes, hiding: Hiding | None) -> tuple[bytes, str] | None:
    """The tag list at ``path`` without the tags ``hiding`` keeps out, or None (not a tag list,
    or no policy: the stored bytes are served)."""
    image, sep, _ = path.partition("/tags/list")
    if hiding is None or not sep:
        return None
    shown = hide_tags(json.loads(body), image, hiding)
    return json.dumps(shown, separators=(",", ":")).encode(), "application/json"


def tags_query(pairs: list[tuple[str, str]]) -> str:
    """``n`` and ``last`` (the last of each), in that order: one cache entry per page."""
    values = {k: v for k, v in pairs if k in ("n", "last")}
    return urlencode([(k, values[k]) for k in ("n", "last") if k in values])


def rewrite_link(value: str, target: str) -> str:
    """The ``/tags/list`` links of an upstream ``Link`` header, pointed at ``target`` (the
    client's ``/v2/[<key>/]<name>/tags/list``) with the canonical page query.  Links whose
    query the proxy would not pass on (anything but ``n`` and ``last``) are dropped: the
    client would get the first page again and again."""
    links = []
    for match in re.finditer(r"<([^>]*)>([^,]*)", value):
        parts = urlsplit(match.group(1).strip())
        pairs = parse_qsl(parts.query, keep_blank_values=True)
        query = tags_query(pairs)
        if (
            not parts.path.endswith("/tags/list")
            or not query
            or any(k not in ("n", "last") for k, _ in pairs)
        ):
            continue
        links.append(f"<{target}?{query}>{match.group(2).rstrip()}")
    return ", ".join(links)
