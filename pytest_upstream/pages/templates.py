"""The one Jinja2 environment for every page (docs/ui.md; docs/dependencies.md says why Jinja2).

Autoescaping is on for every template whatever its name (not only ``.html``: an inline SVG
template gets it too), undefined names are errors rather than empty strings (a typo in a
template fails its test instead of rendering a blank cell), and the filters a page needs to
show sizes and ages are the ones the terminal commands use (``config/units.py``).  Jinja2 is
imported on first use: a proxy that never renders a page never pays for it.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from pytest_upstream.config.units import human_age, human_size

if TYPE_CHECKING:
    import jinja2


@functools.cache
def environment() -> jinja2.Environment:
    """The shared environment (thread-safe once made: Jinja2 templates render concurrently)."""
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("pytest_upstream.pages", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        auto_reload=False,
    )
    env.filters["human_size"] = human_size
    env.filters["human_age"] = human_age
    return env


def render(template: str, **context: Any) -> str:
    """``template`` (a file name under ``templates/``) rendered with ``context``, escaped."""
    return environment().get_template(template).render(**context)
