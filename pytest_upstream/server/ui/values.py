"""How the ``/-/ui/`` pages show a time and an upstream URL (shared by the views).

A URL shown on a page loses any user-info and passes ``Engine.scrub``, so no configured secret
reaches a page even if an entry file or a configuration carried one.
"""

from __future__ import annotations

import datetime
from urllib.parse import urlsplit, urlunsplit

from pytest_upstream.engine.dispatch import Engine

SCAN_WAIT = 0.5  # seconds a page waits for the index's start-up scan before showing what it has


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


def iso_time(t: float) -> str:
    """``2026-11-30 22:41:42 UTC`` (a time from a file on disk may be absurd: then ``-``)."""
    try:
        return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return "-"
