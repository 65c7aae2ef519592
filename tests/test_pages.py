"""The page environment escapes everything it prints (pytest_upstream/pages/templates.py)."""

from __future__ import annotations

import jinja2
import pytest

from pytest_upstream.pages.templates import environment, render

HOSTILE = "<img src=x onerror=alert(1)>\"'&"


def test_values_are_escaped_in_text_and_attributes() -> None:
    html = render("escape_check.html", value=HOSTILE)
    assert "<img" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;&#34;&#39;&amp;" in html


def test_autoescaping_does_not_depend_on_the_file_name() -> None:
    template = environment().from_string("{{ v }}")
    assert template.render(v="<svg onload=x>") == "&lt;svg onload=x&gt;"


def test_an_undefined_name_is_an_error_not_a_blank() -> None:
    with pytest.raises(jinja2.UndefinedError):
        render("escape_check.html")


def test_filters_are_the_terminal_ones() -> None:
    assert environment().from_string("{{ n | human_size }}").render(n=250_000) == "244.1 KiB"
