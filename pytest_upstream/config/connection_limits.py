"""The HTTP server's connection limits as the table gives them (docs/configuration.md#connection-limits).

The server applies them (server/limits.py); ``Settings`` carries them; this module holds their
defaults, names (``serve``'s flags override exactly these fields) and the table's checks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pytest_upstream.config.checks import ConfigError, positive

DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_IDLE_TIMEOUT = 30.0
DEFAULT_SEND_TIMEOUT = 30.0
DEFAULT_MAX_CONNECTIONS = 0  # 0: derived from the open-file limit
CONNECTION_LIMIT_FIELDS = ("header_timeout", "idle_timeout", "send_timeout", "max_connections")


def parse_connection_limits(table: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The server's connection limits from the table: timeouts > 0 seconds, a count >= 0."""
    limits: dict[str, Any] = {
        name: positive(table.get(name, default), where, name)
        for name, default in (
            ("header_timeout", DEFAULT_HEADER_TIMEOUT),
            ("idle_timeout", DEFAULT_IDLE_TIMEOUT),
            ("send_timeout", DEFAULT_SEND_TIMEOUT),
        )
    }
    count = table.get("max_connections", DEFAULT_MAX_CONNECTIONS)
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ConfigError(
            f"{where}: max_connections must be a whole number >= 0 (0: from the open-file limit)"
        )
    limits["max_connections"] = count
    return limits
