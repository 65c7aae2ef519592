"""The bounds that keep one server healthy for weeks: deadlines and the connection cap.

A client gets ``header_timeout`` seconds for a whole request head (slowloris), a kept-alive
connection is closed after ``idle_timeout`` seconds without a new request, a client that
stops reading is dropped after ``send_timeout`` seconds without progress, and at most
``max_connections`` connections are open at once (0 in the settings: derived from the
open-file limit, so descriptors stay free for cache files and upstream connections).
The values come from ``Settings`` (docs/configuration.md#connection-limits).
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

from pytest_upstream.config.settings import Settings

# A connection can hold two descriptors (its socket and the file it is sending); this many
# more are kept for the engine: the cache's lock and part files, upstream connections.
_RESERVED_DESCRIPTORS = 64
# Enough for a CI fleet; the event loop checks every connection's deadline 20 times a second.
_MAX_AUTO_CONNECTIONS = 4096


@dataclass(frozen=True)
class Limits:
    header_timeout: float = 10.0
    idle_timeout: float = 30.0
    send_timeout: float = 30.0
    max_connections: int = 512
    max_head: int = 64 * 1024  # request line and headers together (431 beyond)
    max_target: int = 16 * 1024  # the request target alone (414 beyond)
    max_drained_body: int = 1024 * 1024  # a request body read and dropped; a longer one closes the connection

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            header_timeout=settings.header_timeout,
            idle_timeout=settings.idle_timeout,
            send_timeout=settings.send_timeout,
            max_connections=settings.max_connections or auto_max_connections(),
        )


def auto_max_connections() -> int:
    """Connections that fit in the open-file limit, two descriptors each, with a reserve."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return _MAX_AUTO_CONNECTIONS
    return max(16, min(_MAX_AUTO_CONNECTIONS, (soft - _RESERVED_DESCRIPTORS) // 2))


def raise_open_file_limit() -> int:
    """Raise this process's soft open-file limit to its hard limit (``serve`` does, as nginx and
    most servers do: the usual soft default of 1,024 allows a few hundred clients); the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if wanted > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            return int(soft)
        return int(wanted)
    return int(soft)
