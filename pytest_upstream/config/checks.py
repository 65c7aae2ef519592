"""``ConfigError`` and the checks of table values that every settings module shares, so a bad
number reads the same whichever part of ``[tool.pytest-upstream]`` it is in."""

from __future__ import annotations

from typing import Any

from pytest_upstream.config.units import parse_age, parse_size


class ConfigError(ValueError):
    """Bad configuration; the message names the file and the entry."""


def number(value: Any, where: str, name: str) -> float:
    """Seconds (or another quantity) >= 0; bools are refused (TOML ``true`` is no number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"{where}: {name} must be a non-negative number of seconds (got {value!r})")
    return float(value)


def positive(value: Any, where: str, name: str) -> float:
    """Seconds > 0 (a timeout of 0 would refuse everything)."""
    seconds = number(value, where, name)
    if seconds == 0:
        raise ConfigError(f"{where}: {name} must be more than 0 seconds")
    return seconds


def age_value(value: Any, where: str, name: str) -> float:
    """Seconds as a number, or an age as text (``"1h"``, config/units.py)."""
    if isinstance(value, str):
        try:
            return parse_age(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: {name}: {exc}") from None
    return number(value, where, name)


def size_value(value: Any, where: str, name: str) -> int:
    """Bytes as a number >= 0, or a size as text (``"10G"``, config/units.py)."""
    if isinstance(value, str):
        try:
            return parse_size(value)
        except ValueError as exc:
            raise ConfigError(f"{where}: {name}: {exc}") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"{where}: {name} must be a non-negative number of bytes (got {value!r})")
    return int(value)
