"""Registry formats: one module per format, each implementing ``base.Format``."""

from __future__ import annotations

from .base import Format


def get_format(name: str) -> Format | None:
    """The format module's handler, or None while the format is not supported yet."""
    if name == "pypi":
        from .pypi import PyPIFormat

        return PyPIFormat()
    if name == "generic":
        from .generic import GenericFormat

        return GenericFormat()
    return None
