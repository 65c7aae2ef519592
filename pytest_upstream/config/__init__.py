"""What the user wrote: proxy keys, built-in sources, auth modes and the settings read from
``[tool.pytest-upstream]``.  The bottom layer: imports nothing else of the package."""
