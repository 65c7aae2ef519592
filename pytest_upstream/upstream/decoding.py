"""Undoing an upstream's Content-Encoding with a cap on what it may grow to.

httpx decodes gzip and deflate without limit: about 1 MB of gzip inflates to a gigabyte, which the
proxy would hold in memory (an index page is read whole) or write to disk.  So the upstream client
never lets httpx decode (``client.py`` takes the coding off the answer's headers) and decodes here
instead, in bounded steps: no single step yields more than ``_STEP`` bytes, the total may not pass
``DecodeLimits.max_size``, and once it passes ``EXPANSION_JUDGED_AFTER`` it may not exceed
``max_expansion`` times the encoded bytes read.  Past a cap, ``DecodingRefused`` (an
UpstreamError): the engine answers 502 and stores nothing.

One coding per answer (``gzip``, ``x-gzip``, ``deflate``; ``identity`` is none): that is what the
client offers, and a chain of codings is something no registry sends.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator

from pytest_upstream.config.units import human_size
from pytest_upstream.config.upstream_limits import DecodeLimits
from pytest_upstream.upstream.errors import UpstreamError

OFFERED = "gzip, deflate"  # the Accept-Encoding the client sends unless identity is asked for
_STEP = 256 * 1024  # at most this many decoded bytes per decompress call
EXPANSION_JUDGED_AFTER = 8 * 1024 * 1024  # the expansion cap is judged once the output is past this


class DecodingRefused(UpstreamError):
    """An upstream's content-coded body broke a decoding cap, or its coding is unknown."""


class DecompressionBomb(DecodingRefused):
    """The body broke ``max_decoded_size`` or ``max_expansion``."""


def coding_of(value: str | None) -> str:
    """The one content coding named by a Content-Encoding value ("" for none); raises
    DecodingRefused for a coding we do not decode or for a chain of them."""
    codings = [c.strip().lower() for c in (value or "").split(",")]
    codings = [c for c in codings if c and c != "identity"]
    if not codings:
        return ""
    if len(codings) > 1:
        raise DecodingRefused(f"the answer is content-coded more than once ({', '.join(codings)})")
    coding = "gzip" if codings[0] == "x-gzip" else codings[0]
    if coding not in ("gzip", "deflate"):
        raise DecodingRefused(f"content coding {coding!r} is not supported (asked for {OFFERED})")
    return coding


def decode(chunks: Iterable[bytes], coding: str, limits: DecodeLimits) -> Iterator[bytes]:
    """The decoded bytes of ``chunks`` (content-coded with ``coding``), within ``limits``."""
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 16 if coding == "gzip" else zlib.MAX_WBITS)
    raw = decoded = 0
    first = True
    for chunk in chunks:
        raw += len(chunk)
        data = chunk
        while data:
            try:
                piece = inflater.decompress(data, _STEP)
            except zlib.error as exc:
                if first and coding == "deflate":  # "deflate" without its zlib wrapper: raw deflate
                    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
                    first = False
                    continue
                raise DecodingRefused(f"the {coding}-coded answer does not decode: {exc}") from None
            first = False
            data = inflater.unconsumed_tail
            if inflater.eof:
                data = b""  # trailing bytes after the end of the stream are ignored, as httpx does
            if piece:
                decoded += len(piece)
                _check(coding, limits, raw, decoded)
                yield piece
    try:
        rest = inflater.flush()
    except zlib.error as exc:  # pragma: no cover - flush after decompress rarely fails
        raise DecodingRefused(f"the {coding}-coded answer does not decode: {exc}") from None
    if rest:
        decoded += len(rest)
        _check(coding, limits, raw, decoded)
        yield rest


def _check(coding: str, limits: DecodeLimits, raw: int, decoded: int) -> None:
    if limits.max_size and decoded > limits.max_size:
        raise DecompressionBomb(
            f"the {coding}-coded answer decodes to more than {human_size(limits.max_size)} "
            f"(max_decoded_size); refused as a decompression bomb"
        )
    if limits.max_expansion and decoded > EXPANSION_JUDGED_AFTER and decoded > limits.max_expansion * raw:
        raise DecompressionBomb(
            f"the {coding}-coded answer expands more than {limits.max_expansion:g} times "
            f"({human_size(raw)} became {human_size(decoded)}, max_expansion); refused as a "
            "decompression bomb"
        )
