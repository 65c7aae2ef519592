"""pytest-upstream: a pull-through cache for registries, with a pytest plugin."""

from __future__ import annotations

from .config import ProxyDefinition, Settings, load_settings
from .keys import InvalidKeyError, validate_key
from .server import ProxyServer

__all__ = ["InvalidKeyError", "ProxyDefinition", "ProxyServer", "Settings", "load_settings", "validate_key"]
__version__ = "0.1.0"
