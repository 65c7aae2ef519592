"""HTML pages: the ``/-/ui/`` views of ``serve`` and the HTML session report (docs/ui.md).

Everything a page shows (package names, versions, paths, headers, URLs) comes from an upstream
or from a file on disk, so every page is rendered by Jinja2 with autoescaping forced on for
every template (``templates.py``): a value is escaped unless a template marks it safe, and no
template here does that with a value it did not build itself.  The templates live in
``templates/`` beside this module and ship inside the wheel (package data).
"""
