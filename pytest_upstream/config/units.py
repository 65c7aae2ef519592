"""Sizes, ages and counts as people write and read them: one parser and one printer for each,
so every command, summary and config value agrees (``244.0 KiB`` everywhere, ``1 entry``)."""

from __future__ import annotations

import re

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)
_AGE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)")
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_AGE_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_size(text: str) -> int:
    """Bytes from ``1024``, ``500K``, ``500M``, ``2G``, ``1T`` (binary units; ``MB``/``MiB`` too)."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"not a size: {text!r} (examples: 1024, 500M, 2G)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def parse_age(text: str) -> float:
    """Seconds from ``90s``, ``90m``, ``12h``, ``30d``, ``2w`` (a bare number is seconds)."""
    m = _AGE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"not an age: {text!r} (examples: 90m, 12h, 30d)")
    return float(m.group(1)) * _AGE_UNITS[m.group(2)]


def human_size(n: float) -> str:
    """``512 B``, ``244.0 KiB``, ``1.5 GiB``: binary units, one space."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError  # pragma: no cover - the loop returns at GiB


def human_age(seconds: float) -> str:
    """``45s``, ``12m``, ``3h``, ``30d``: the largest whole unit."""
    seconds = max(seconds, 0.0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def plural(count: int, singular: str, plural_form: str | None = None) -> str:
    """``1 entry``, ``2 entries``, ``0 misses``: the count and the word that agrees with it."""
    word = singular if count == 1 else (plural_form or _plural(singular))
    return f"{count} {word}"


def _plural(word: str) -> str:
    if word.endswith(("s", "x", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"
