"""An artifact miss the cache cannot store, relayed from the upstream to one client as it arrives.

When the disk is full or the cache read-only (``StoreFailed`` before the first byte was written:
the part file could not be created, or ``BlobWriter.reserve`` found no room for the declared
length), the flight (flights.py) hands the open upstream answer to one client instead of failing
it: that client gets the whole body, marked ``X-Upstream-Cache: pass-through``, and nothing is
stored.  The other clients of that flight are refused with a 503 before any body (they can retry;
each retry is a flight of its own).  The entry lock is released before the relay starts: nothing
is being written, so nothing needs excluding.

The upstream's published digests are still checked: the last chunk is held back until the whole
body hashed to them, as in a flight, so a body that fails verification is cut, never completed.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import httpx

from pytest_upstream.engine.context import RequestContext
from pytest_upstream.engine.fetch import CACHE_HEADER, store_failed
from pytest_upstream.engine.recorders import Answer, Recorders
from pytest_upstream.formats.base import Resource
from pytest_upstream.messages import Reply
from pytest_upstream.store.cache import Cache, StoreFailed, verify_digests
from pytest_upstream.upstream.client import Pace, iter_body

PASS_THROUGH = "pass-through"  # the X-Upstream-Cache value, and the served record's cache state


class PassThrough:
    """The body of one pass-through reply (``Reply.stream``); closing it closes the upstream answer."""

    def __init__(
        self,
        stack: contextlib.ExitStack,
        resp: httpx.Response,
        pace: Pace,
        ctx: RequestContext,
        res: Resource,
        recorders: Recorders,
    ) -> None:
        self._stack = stack  # the upstream answer and the fetch's bookkeeping (Fetcher.open)
        self._ctx = ctx
        self._res = res
        self._recorders = recorders
        self._hashes = {"sha256": hashlib.sha256()}
        for algo in res.expected:
            self._hashes.setdefault(algo, hashlib.new(algo))
        self._size = 0
        self._body: Iterator[bytes] | None = iter_body(resp, pace)
        self._held = b""  # the last chunk, sent once the body is verified

    def reply(self, cache: Cache, why: StoreFailed, headers: dict[str, str], length: int | None) -> Reply:
        """The reply that carries this body (logged at WARNING, and the cache marked degraded)."""
        store_failed(cache, why, f"passing {self._res.upstream_url} through uncached")
        return Reply(200, {**headers, CACHE_HEADER: PASS_THROUGH}, stream=self, length=length)

    def __iter__(self) -> PassThrough:
        return self

    def __next__(self) -> bytes:
        if self._body is None:
            raise StopIteration
        try:
            for chunk in self._body:
                if not chunk:
                    continue
                for h in self._hashes.values():
                    h.update(chunk)
                self._size += len(chunk)
                out, self._held = self._held, chunk
                if out:
                    return out
            self._body = None
            self._verified()
        except BaseException as exc:
            self._fail(str(exc) or type(exc).__name__)
            raise
        out, self._held = self._held, b""
        if not out:
            self.close()
            raise StopIteration
        return out

    def _verified(self) -> None:
        """Check the published digests (CacheError names the mismatch), then record the answer."""
        ctx, res = self._ctx, self._res
        digests = {algo: h.hexdigest() for algo, h in self._hashes.items()}
        verify_digests(digests, res.expected, res.upstream_url)
        sha = digests["sha256"]
        self._recorders.answered(Answer(ctx.request, res.path, res, PASS_THROUGH, 200, self._size, sha))

    def _fail(self, why: str) -> None:
        ctx, res = self._ctx, self._res
        self._recorders.answered(Answer(ctx.request, res.path, res, "error", 502, error=why))
        self.close()

    def close(self) -> None:
        """Stop relaying (the client left, or the body was sent); idempotent."""
        self._body = None
        self._held = b""
        with contextlib.suppress(Exception):
            self._stack.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
