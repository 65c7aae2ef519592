"""Why the engine could not answer a request from the cache or the upstream.

Raised deep in the fetch pipeline or the replay of a lock file, and turned into the format's
error reply in one place (``dispatch.Engine``).
"""

from __future__ import annotations

from pytest_upstream.formats.base import FormatError


class WouldBlock(Exception):
    """``Engine.answer_warm``: the answer needs waiting (a lock, the upstream, a download, hashing
    a blob, rendering): the server answers this request in a worker thread instead."""


class ReplayMiss(Exception):
    """Replay mode, and what was asked for was not recorded (answered 504)."""


class UpstreamFailed(Exception):
    """No usable answer from the upstream; carries what the client should read."""

    # The format's own answer (Format.upstream_error) when no stale copy can be served.
    passthrough: FormatError | None = None


class UpstreamDown(UpstreamFailed):
    """The upstream was not asked at all: the proxy is ``offline``, or its upstream is marked down
    after failing (upstream/health.py).  Answered 503; not an upstream failure of its own, so it is
    neither logged nor counted again for every request it spares the upstream."""


# A status line's few words for an error whose raiser gave none (FormatError carries a status).
_REASONS = {400: "Bad request", 403: "Forbidden", 404: "Not found", 502: "Upstream failed", 504: "Timed out"}


def reason_for(status: int, message: str) -> str:
    """A short reason phrase for an error the engine made: "Not found upstream" for the upstream's
    404, else the status's words."""
    if status == 404 and message.startswith("not found upstream"):
        return "Not found upstream"
    return _REASONS.get(status, "")
