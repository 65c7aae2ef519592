"""``GET /-/ui/``: the read-only browser view of what the proxy holds (docs/ui.md).

``routes.py`` answers the requests (paths, methods, headers, the bounded query); one view model
per page (``overview.py``, ``listing.py`` with ``query.py``, ``detail.py``) turns the engine's
state into plain values, which ``pages/templates/ui_*.html`` render, escaped; ``values.py`` shows
a time and a URL without its secrets.
"""
