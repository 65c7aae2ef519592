"""The Host a client addressed the proxy by, checked once: it becomes the base of absolute links in
rendered metadata and part of the render memo's key, so no header may inject text into a page, and
spellings of one host share one memoised render.  The server's Host check (server/admission.py)
uses the same grammar."""

from __future__ import annotations

import re

# The Host a client addressed us by (the base of absolute links in rendered metadata): a DNS
# name (underscores allowed: container networks use them), an IPv4 address or a bracketed IPv6
# address, then an optional port.
_HOST = re.compile(
    r"(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)*"
    r"|\[[0-9a-f:.]{2,45}\])"
    r"(?::[0-9]{1,5})?"
)


def checked_base_url(base_url: str) -> str | None:
    """``http://<host>`` with the client's Host lower-cased, or None when it is no host[:port].

    The Host header ends up in rendered links and in the render memo's key (through a format's
    ``render_as``): it is checked once here, so no header can inject text into a rendered page
    and spellings of one host share one memoised render.
    """
    scheme, sep, host = base_url.partition("://")
    host = host.lower()
    if not sep or scheme not in ("http", "https") or len(host) > 300 or not _HOST.fullmatch(host):
        return None
    return f"{scheme}://{host}"
