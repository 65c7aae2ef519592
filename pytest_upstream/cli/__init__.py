"""``upstream-proxy``: the command-line face of the engine (no pytest here)."""
