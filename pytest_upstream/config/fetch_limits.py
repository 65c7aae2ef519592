"""The fetch deadlines of ``[tool.pytest-upstream]`` (docs/configuration.md § Fetch deadlines):
how long one upstream download may take.  The upstream client applies them (upstream/client.py);
``Settings.fetch`` carries them; this module holds their defaults and the table's checks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pytest_upstream.config.checks import age, positive, size

DEFAULT_FETCH_DEADLINE = 3600.0
DEFAULT_MIN_RATE = 1024
DEFAULT_MIN_RATE_WINDOW = 30.0
DEFAULT_ORPHAN_DEADLINE = 60.0
FETCH_FIELDS = frozenset({"fetch_deadline", "min_rate", "min_rate_window", "orphan_deadline"})


@dataclass(frozen=True)
class FetchLimits:
    """How long one upstream download may take, whoever is waiting for it.

    ``deadline``: seconds from the upstream request to the last byte (0: none).
    ``min_rate``: bytes per second, averaged over each ``rate_window`` seconds, below which a
    download is given up (0: none); a stalled upstream is cut by its read ``timeout`` anyway, this
    catches one that drips.  ``orphan_deadline``: seconds a download continues after its last
    client left (0: it stops as soon as that is noticed).  Checked as each chunk arrives.
    """

    deadline: float = DEFAULT_FETCH_DEADLINE
    min_rate: int = DEFAULT_MIN_RATE
    rate_window: float = DEFAULT_MIN_RATE_WINDOW
    orphan_deadline: float = DEFAULT_ORPHAN_DEADLINE


def parse_fetch_limits(table: Mapping[str, Any], where: str) -> FetchLimits:
    """The fetch deadlines of a ``[tool.pytest-upstream]`` table: seconds as numbers or ages
    (``"1h"``), ``min_rate`` as bytes per second or a size (``"1K"``)."""
    return FetchLimits(
        deadline=age(table.get("fetch_deadline", DEFAULT_FETCH_DEADLINE), where, "fetch_deadline"),
        min_rate=size(table.get("min_rate", DEFAULT_MIN_RATE), where, "min_rate"),
        rate_window=positive(
            age(table.get("min_rate_window", DEFAULT_MIN_RATE_WINDOW), where, "min_rate_window"),
            where,
            "min_rate_window",
        ),
        orphan_deadline=age(table.get("orphan_deadline", DEFAULT_ORPHAN_DEADLINE), where, "orphan_deadline"),
    )
