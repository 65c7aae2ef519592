"""The proxy engine: from a ``ProxyRequest`` to a ``Reply`` through a format, the store and an
upstream, in record, replay or refresh mode.  Knows nothing of HTTP servers, pytest or any one
format.  ``dispatch.Engine`` is the front; ``freshness`` decides what may be served as cached,
``fetch`` is the one fetch-and-store pipeline, ``replay`` serves a lock file, ``render`` memoises
rendered metadata, ``recorders`` observe every answer, ``clock`` is the time all of them read."""
