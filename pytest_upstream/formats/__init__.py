"""Registry formats: one module per format, each subclassing ``base.Format``."""

from __future__ import annotations

import functools
import importlib

from pytest_upstream.formats.base import Format

# format name -> (module in this package, class); a module that has not
# landed yet makes its format answer "not supported yet".
_MODULES = {
    "pypi": ("pypi", "PyPIFormat"),
    "generic": ("generic", "GenericFormat"),
    "npm": ("npm", "NpmFormat"),
    "docker": ("docker", "DockerFormat"),
    "maven": ("maven", "MavenFormat"),
}


@functools.cache
def get_format(name: str) -> Format | None:
    """The format's handler (one per process: formats may keep caches such as tokens), or None."""
    if name not in _MODULES:
        return None
    module_name, class_name = _MODULES[name]
    qualified = f"{__package__}.{module_name}"
    try:
        module = importlib.import_module(qualified)
    except ModuleNotFoundError as exc:
        if exc.name == qualified:
            return None
        raise
    handler: Format = getattr(module, class_name)()
    return handler


@functools.cache
def root_routes() -> dict[str, Format]:
    """First path segment -> the format that claims it for all its proxies (``Format.root_prefix``)."""
    claimed = {}
    for name in _MODULES:
        fmt = get_format(name)
        if fmt is not None and fmt.root_prefix:
            claimed[fmt.root_prefix] = fmt
    return claimed
