"""``GET /-/ui/``: the browser view of what the proxy holds (docs/ui.md).

Routes, below ``/-/ui/``::

    ""                      the overview: proxies, groups, health, counters
    -/counters.json         the overview's counters, for its script to refresh them
    -/static/ui_script.js, ui_style.css   the one script and stylesheet (no inline script or style)
    <key>/                  a key's cached entries: ?q= &kind= &sort= &order= &page= &per=
    <key>/<entry id>        one entry

Read-only: GET and HEAD, anything else is a 405.  Admission (the Host check, the token) runs
before this, in ``connection.py`` as for every route; a browser cannot send a Bearer header, so
``?token=`` (checked by ``Admission``) is answered here with a redirect to the same page without
it that sets an HttpOnly, SameSite=Strict cookie holding a value derived from the token
(``admission.ui_cookie``), never the token itself.  Every reply carries a Content-Security-Policy
that allows no inline script or style, ``nosniff``, ``no-store`` and ``no-referrer``.  Pages are
rendered by the one Jinja2 environment (pages/templates.py), which escapes every value.
"""

from __future__ import annotations

import json
import re
from urllib.parse import parse_qsl, urlencode

from pytest_upstream.config.keys import key_error
from pytest_upstream.engine.dispatch import Engine
from pytest_upstream.messages import Reply
from pytest_upstream.pages.templates import environment, render
from pytest_upstream.server.admission import UI_COOKIE, UI_PREFIX, Admission
from pytest_upstream.server.ui.detail import detail
from pytest_upstream.server.ui.listing import list_page
from pytest_upstream.server.ui.overview import overview
from pytest_upstream.server.ui.query import MAX_FIELDS, MAX_QUERY, ListQuery

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
STATIC = {"ui_script.js": "text/javascript; charset=utf-8", "ui_style.css": "text/css; charset=utf-8"}
_EID = re.compile(r"[0-9a-f]{64}")
HTML = "text/html; charset=utf-8"


def is_ui(raw_path: str) -> bool:
    return raw_path == UI_PREFIX.rstrip("/") or raw_path.startswith(UI_PREFIX)


def answer(engine: Engine, admission: Admission, method: str, raw_path: str, query: str) -> Reply:
    """The reply to a request for ``raw_path`` under ``/-/ui/`` (already admitted)."""
    reply = _answer(engine, admission, method, raw_path, query)
    reply.headers.update(SECURITY_HEADERS)
    return reply


def _answer(engine: Engine, admission: Admission, method: str, raw_path: str, query: str) -> Reply:
    if method not in ("GET", "HEAD"):
        reply = _text(405, f"{method} is not allowed: the UI is read-only")
        reply.headers["Allow"] = "GET, HEAD"
        return reply
    if len(query) > MAX_QUERY:
        return _text(414, "query string too long")
    if raw_path == UI_PREFIX.rstrip("/"):
        return _redirect(UI_PREFIX)
    try:
        params = parse_qsl(query, keep_blank_values=True, max_num_fields=MAX_FIELDS)
    except ValueError:
        return _text(400, f"at most {MAX_FIELDS} query fields")
    if any(name == "token" for name, _ in params):  # admitted: the token is right (or none is needed)
        rest = urlencode([(n, v) for n, v in params if n != "token"])
        reply = _redirect(raw_path + (f"?{rest}" if rest else ""))
        if (cookie := admission.ui_cookie()) is not None:
            reply.headers["Set-Cookie"] = f"{UI_COOKIE}={cookie}; Path={UI_PREFIX}; HttpOnly; SameSite=Strict"
        return reply
    route = raw_path[len(UI_PREFIX) :]
    if route == "":
        engine.artifacts.start()
        return _html(render("ui_overview.html", view=overview(engine)))
    if route == "-/counters.json":
        view = overview(engine)
        counters = {p.key: {"requests": p.requests, "hit_rate": p.hit_rate, **p.counts} for p in view.proxies}
        return Reply(
            200,
            {"Content-Type": "application/json"},
            body=json.dumps({"proxies": counters, "gauges": view.gauges}).encode(),
        )
    if route.startswith("-/static/") and (name := route.removeprefix("-/static/")) in STATIC:
        source, _, _ = environment().loader.get_source(environment(), name)  # type: ignore[union-attr]
        return Reply(200, {"Content-Type": STATIC[name]}, body=source.encode())
    key, slash, rest = route.partition("/")
    known = engine.settings.proxy(key) is not None or key in engine.artifacts.known_keys()
    if key_error(key) is not None or not known:
        return _text(
            404, "no such page: the UI's pages are /-/ui/ and /-/ui/<key>/ for a configured proxy key"
        )
    if not slash:
        return _redirect(f"{UI_PREFIX}{key}/")
    engine.artifacts.start()
    if rest == "":
        return _html(render("ui_key.html", page=list_page(engine, key, ListQuery.parse(query))))
    if _EID.fullmatch(rest) and (found := detail(engine, key, rest)) is not None:
        return _html(render("ui_detail.html", view=found))
    return _text(404, f"no entry {rest[:80]!r} in the cache of {key!r}")


def _html(page: str) -> Reply:
    return Reply(200, {"Content-Type": HTML}, body=page.encode())


def _text(status: int, message: str) -> Reply:
    return Reply.text(status, message)


def _redirect(location: str) -> Reply:
    return Reply(
        303, {"Location": location, "Content-Type": "text/plain; charset=utf-8"}, body=b"see other\n"
    )
