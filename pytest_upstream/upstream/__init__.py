"""Talking to upstreams (the remote registries): the pinned httpx client and its errors.
Imports only ``config``."""
