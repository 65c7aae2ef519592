"""Capture's settings (docs/capture.md): the proxy as an HTTP and HTTPS forward proxy for every
client, with the roots its upstream client trusts besides the system's.

    capture = true                         # also: serve --capture, pytest --upstream-capture
    capture_hosts = ["*"]                  # globs of host names / addresses intercepted
    capture_exclude = ["*.internal"]       # ... except these (tunnelled untouched, or refused)
    upstream_ca = "certs/private-ca.pem"   # extra roots for upstream TLS, every proxy's
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pytest_upstream.config.checks import ConfigError

CAPTURE_FIELDS = ("capture", "capture_hosts", "capture_exclude", "upstream_ca")


@dataclass(frozen=True)
class CaptureSettings:
    enabled: bool = False
    hosts: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    upstream_ca: Path | None = None  # a PEM file of roots the upstream client trusts as well


def _globs(table: Mapping[str, Any], name: str, default: tuple[str, ...], where: str) -> tuple[str, ...]:
    value = table.get(name, list(default))
    if not isinstance(value, list) or not all(isinstance(g, str) and g.strip() for g in value):
        raise ConfigError(f'{where}: {name} must be a list of host name globs ("*.example.org")')
    return tuple(g.strip().lower() for g in value)


def parse_capture(table: Mapping[str, Any], where: str, base_dir: Path) -> dict[str, Any]:
    """The ``capture`` keyword argument of ``Settings`` from a ``[tool.pytest-upstream]`` table."""
    enabled = table.get("capture", False)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{where}: capture must be true or false (got {enabled!r})")
    ca = table.get("upstream_ca")
    if ca is not None and (not isinstance(ca, str) or not ca):
        raise ConfigError(f"{where}: upstream_ca must be the path of a PEM file (got {ca!r})")
    upstream_ca = base_dir / Path(ca).expanduser() if ca else None
    if upstream_ca is not None and not upstream_ca.is_file():
        raise ConfigError(f"{where}: upstream_ca: {upstream_ca} is not a file")
    return {
        "capture": CaptureSettings(
            enabled=enabled,
            hosts=_globs(table, "capture_hosts", ("*",), where),
            exclude=_globs(table, "capture_exclude", (), where),
            upstream_ca=upstream_ca,
        )
    }


def with_capture(capture: CaptureSettings, enabled: bool | None) -> CaptureSettings:
    """``capture`` turned on (or off) by a flag or an ini option; None leaves the table's word."""
    return capture if enabled is None else replace(capture, enabled=enabled)
