"""The upstream client's one error type, apart so that the decoding and address guards can raise it."""

from __future__ import annotations


class UpstreamError(Exception):
    """The upstream could not give an answer: refused, timed out, broke the protocol, or sent
    something the proxy will not take (a decompression bomb, a redirect to a private address)."""
