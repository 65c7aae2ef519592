"""pytest-upstream: a pull-through cache for registries, with a pytest plugin.

Importing the package is cheap (the pytest plugin loads it on every run);
the server and its httpx client are imported only when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pytest_upstream.config.keys import InvalidKeyError, validate_key
from pytest_upstream.config.settings import ProxyDefinition, Settings, load_settings

if TYPE_CHECKING:
    from pytest_upstream.server.proxy_server import ProxyServer

__all__ = ["InvalidKeyError", "ProxyDefinition", "ProxyServer", "Settings", "load_settings", "validate_key"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "ProxyServer":
        from pytest_upstream.server.proxy_server import ProxyServer

        return ProxyServer
    raise AttributeError(name)
