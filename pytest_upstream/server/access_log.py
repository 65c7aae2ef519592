"""One line per answered request (a stand-in with the agreed signature; the observability
work replaces it with the full text and JSON formats)."""

from __future__ import annotations

import logging

log = logging.getLogger("pytest_upstream.access")


def log_access(
    *, method: str, target: str, status: int, cache: str, key: str, nbytes: int, millis: float, client: str
) -> None:
    """Called by the server once per answered request, after the body was sent (or failed)."""
    if log.isEnabledFor(logging.INFO):
        log.info(
            "%s %s %d %s %dB %.1fms key=%s client=%s",
            method,
            target,
            status,
            cache or "-",
            nbytes,
            millis,
            key or "-",
            client,
        )
