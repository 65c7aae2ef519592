"""Capture: the forward proxy's TLS side (docs/capture.md).  The CA of one cache (``ca.py``) and
how a captured host becomes a proxy key and a generic proxy (``hosts.py``).  The server does the
forwarding itself (``server/forward.py``); this package knows nothing of sockets or the engine."""
