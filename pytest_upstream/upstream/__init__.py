"""Talking to upstreams (the remote registries): the pinned httpx client (``client.py``), bounded
decoding of content codings (``decoding.py``), the SSRF guard (``addresses.py``) and their one
error type (``errors.py``).  Imports only ``config``."""
