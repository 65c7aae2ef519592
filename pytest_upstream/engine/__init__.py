"""The proxy engine: from a ``ProxyRequest`` to a ``Reply`` through a format, the store and an
upstream, in record, replay or refresh mode.  Knows nothing of HTTP servers or pytest."""
