"""The one fetch-and-store pipeline: ask the upstream (retrying once after an auth challenge),
check its status, verify the bytes and store blob and index entry.  A whole answer is stored
here; an artifact streamed to its clients while it is stored runs in a flight (flights.py) built
on these steps.  Every download keeps to the fetch deadlines (``FetchLimits``, through
``upstream.client.Pace``).  ``store_answer`` is also how imported cassettes enter the cache, so an
imported answer is checked and indexed exactly like a live one.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import httpx

from pytest_upstream.config.upstream_limits import FetchLimits
from pytest_upstream.engine.context import RequestContext
from pytest_upstream.engine.errors import UpstreamDown, UpstreamFailed
from pytest_upstream.engine.freshness import Freshness
from pytest_upstream.engine.recorders import Recorders
from pytest_upstream.formats.base import Format, FormatError, Kind, MalformedUpstream, Resource
from pytest_upstream.store.cache import BlobWriter, Cache, DigestMismatch, Entry, StoreFailed, entry_id
from pytest_upstream.store.entry import NOT_FOUND
from pytest_upstream.upstream.client import Pace, UpstreamClient, UpstreamError, content_coded, iter_body
from pytest_upstream.upstream.health import Health

log = logging.getLogger("pytest_upstream.engine.fetch")

CACHE_HEADER = "X-Upstream-Cache"
USER_AGENT = "pytest-upstream"
# Artifacts whose digest the upstream publishes are downloaded whole and
# verified before the first byte is sent when they are at most this big, so
# a mismatch is a clean 502.  Larger ones stream to the client while they
# are written; on a mismatch the connection is cut (the client sees a
# truncated body) and nothing is stored.
VERIFY_BEFORE_SERVE_LIMIT = 8 * 1024 * 1024
_RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})


@dataclass
class Obtained:
    entry: Entry
    cache: str  # hit | miss | stale
    note: str = ""  # why a stale copy was served
    quiet: bool = False  # the upstream was not asked (offline, marked down): nothing new to log
    blob: Path | None = None  # the verified blob, when already checked


def store_answer(
    cache: Cache,
    fmt: Format,
    res: Resource,
    key: str,
    headers: Mapping[str, str],
    chunks: Iterable[bytes],
    fetched_at: float,
    eid: str = "",
) -> Entry:
    """Check and verify a 200 answer read whole, then store its blob and index entry.

    Raises MalformedUpstream (the format's ``check``) or DigestMismatch; nothing is stored then.
    StoreFailed when the cache cannot store (disk full, read-only).  ``eid``: the entry whose
    lock the caller holds (names the part file, ``Cache.writer``).
    """
    expected = {**fmt.published_digests(res, headers), **res.expected}
    writer = cache.writer(tuple(expected), eid)
    try:
        body = bytearray() if res.kind is Kind.METADATA else None
        for chunk in chunks:
            writer.write(chunk)
            if body is not None:
                body += chunk
        if body is not None:
            fmt.check(res, bytes(body), headers)
        sha, size = cache.commit_blob(writer, expected, res.upstream_url)
    finally:
        writer.discard()
    return cache.store_entry(res.index_entry(key, headers, sha, size, fetched_at))


class Fetcher:
    def __init__(
        self,
        cache: Cache,
        client: UpstreamClient,
        freshness: Freshness,
        recorders: Recorders,
        limits: FetchLimits | None = None,
        health: Health | None = None,
    ) -> None:
        self.cache = cache
        self.client = client
        self.freshness = freshness
        self.recorders = recorders
        self.limits = limits or FetchLimits()
        self.health = health or Health(freshness.clock.now)

    def pace(self) -> Pace:
        """The deadline and minimum rate of one download, on the engine's clock."""
        return Pace(self.limits, self.freshness.clock.now)

    # -- asking --------------------------------------------------------------
    def open(
        self, stack: contextlib.ExitStack, ctx: RequestContext, res: Resource, stale: Entry | None
    ) -> httpx.Response:
        """Send the upstream request (retrying once after an auth challenge) inside ``stack``.

        Not at all when the proxy is ``offline`` or its upstream is marked down (upstream/health.py):
        UpstreamFailed at once, so a stale copy is served, a group asks its next member, and a
        miss is told why instead of waiting out a connect timeout."""
        key = ctx.proxy.key
        if ctx.proxy.offline:
            raise UpstreamDown(f"proxy {key!r} is offline (offline = true): only cached copies are served")
        if (down := self.health.check(key)) is not None:
            raise UpstreamDown(str(down))
        self.recorders.fetching(res.upstream_url, ctx.proxy.key)
        stack.callback(self.recorders.fetch_ended, ctx.proxy.key, res.upstream_url)  # when the fetch ends
        headers = {"User-Agent": USER_AGENT, **res.request_headers, **ctx.fmt.upstream_headers(ctx, res)}
        if res.expected:  # bytes hashed against a published digest: no content coding to undo
            headers["Accept-Encoding"] = "identity"
        if stale is not None and stale.is_metadata:
            if stale.etag:
                headers["If-None-Match"] = stale.etag
            if stale.last_modified:
                headers["If-Modified-Since"] = stale.last_modified
        timeout, decoding = ctx.proxy.timeout, ctx.proxy.decoding
        try:
            resp = stack.enter_context(
                self.client.stream(res.upstream_url, headers=headers, timeout=timeout, decoding=decoding)
            )
        except UpstreamError as exc:
            self.health.failed(key, str(exc))
            raise
        self.health.succeeded(key)
        if resp.status_code == 401:
            retry = ctx.fmt.reauthenticate(ctx, res, resp, self.client)
            if retry is not None:
                resp.close()
                headers.update(retry)
                resp = stack.enter_context(
                    self.client.stream(res.upstream_url, headers=headers, timeout=timeout, decoding=decoding)
                )
        return resp

    def check_status(self, ctx: RequestContext, res: Resource, resp: httpx.Response) -> None:
        """Return for a 200; raise what the client should be told otherwise (remembering a 404)."""
        status, proxy = resp.status_code, ctx.proxy
        if status == 200:
            return
        if status in _RETRYABLE_STATUS or status >= 500:
            what = "rate limited" if status == 429 else f"answered {status}"
            failed = UpstreamFailed(f"upstream {res.upstream_url} for {proxy.key!r} {what}")
            if status < 500:  # 429: the format may pass the upstream's error on (when nothing is stale)
                failed.passthrough = ctx.fmt.upstream_error(res, status, _error_body(resp))
            raise failed
        body = _error_body(resp)  # bounded: an error page is no reason to read gigabytes
        if status in (404, 410):
            if res.negative_ttl is not None:
                self._remember_not_found(ctx, res)
            raise FormatError(404, f"not found upstream: {res.upstream_url} answered {status}", cache="miss")
        if status in (401, 403):
            raise FormatError(
                502,
                f"upstream {res.upstream_url} refused access ({status}); check the auth "
                f"settings of proxy {proxy.key!r}",
            )
        if 400 <= status < 500 and (passthrough := ctx.fmt.upstream_error(res, status, body)):
            raise passthrough
        raise FormatError(502, f"upstream {res.upstream_url} answered {status}")

    def _remember_not_found(self, ctx: RequestContext, res: Resource) -> None:
        """Best effort: a cache that cannot store just asks the upstream again next time."""
        try:
            self._store_not_found(ctx, res)
        except StoreFailed as exc:
            store_failed(self.cache, exc)

    def _store_not_found(self, ctx: RequestContext, res: Resource) -> None:
        entry = Entry(
            key=ctx.proxy.key,
            path=res.path,
            variant=res.variant,
            upstream_url=res.upstream_url,
            sha256=self.cache.store_bytes(b""),
            size=0,
            kind=NOT_FOUND,
            fetched_at=ctx.now(),
        )
        self.recorders.used(ctx.proxy.key, res, self.cache.store_entry(entry, durable=False))

    # -- whole answers -------------------------------------------------------
    def fetch_whole(self, ctx: RequestContext, res: Resource, stale: Entry | None) -> Obtained:
        """Download, verify and store; on upstream failure fall back to ``stale``."""
        proxy = ctx.proxy
        try:
            with contextlib.ExitStack() as stack:
                pace = self.pace()
                resp = self.open(stack, ctx, res, stale)
                if resp.status_code == 304 and stale is not None:
                    self.freshness.mark_refreshed(ctx.mode, proxy, res)
                    return Obtained(self.cache.store_entry(replace(stale, fetched_at=ctx.now())), "hit")
                self.check_status(ctx, res, resp)
                return self.store(ctx, res, resp, pace)
        except (MalformedUpstream, DigestMismatch) as exc:
            # A 200 that is not what the format expects (an HTML error page where an index or a
            # packument belongs, a manifest of another media type or digest): an upstream
            # failure like a 5xx, so the stored copy stays and is served as stale.
            if stale is None:
                raise
            self.freshness.mark_refreshed(ctx.mode, proxy, res)
            return Obtained(stale, "stale", f"{proxy.key}: upstream {res.upstream_url}: {exc}")
        except StoreFailed as exc:  # nothing was sent yet: the stale copy, or a 503 (dispatch.py)
            store_failed(self.cache, exc, "serving the stale copy" if stale else "refused (503)")
            if stale is None:
                raise
            self.freshness.mark_refreshed(ctx.mode, proxy, res)
            return Obtained(stale, "stale", f"{proxy.key}: {exc}")
        except (UpstreamError, UpstreamFailed) as exc:
            if stale is not None:
                if isinstance(exc, UpstreamDown):  # asked again once the backoff ends
                    return Obtained(stale, "stale", f"{proxy.key}: {exc}", quiet=True)
                self.freshness.mark_refreshed(ctx.mode, proxy, res)
                return Obtained(stale, "stale", f"{proxy.key}: upstream {res.upstream_url}: {exc}")
            if isinstance(exc, UpstreamFailed):
                raise
            raise UpstreamFailed(f"upstream {res.upstream_url} for {proxy.key!r}: {exc}") from exc

    def store(self, ctx: RequestContext, res: Resource, resp: httpx.Response, pace: Pace | None) -> Obtained:
        """Store the 200 answer ``resp`` read whole (``store_answer``), keeping to ``pace``."""
        key = ctx.proxy.key
        eid = entry_id(key, res.path, res.variant)
        entry = store_answer(
            self.cache, ctx.fmt, res, key, resp.headers, iter_body(resp, pace), ctx.now(), eid
        )
        self.freshness.mark_refreshed(ctx.mode, ctx.proxy, res)
        return Obtained(entry, "miss")

    # -- streamed answers (the download itself runs in engine/flights.py) --------
    def commit_streamed(
        self, ctx: RequestContext, res: Resource, headers: Mapping[str, str], writer: BlobWriter
    ) -> Entry:
        """Verify and store a body streamed from the upstream (its answer's ``headers``).  An
        index entry that cannot be written does not fail the download: its clients get the whole
        verified body."""
        sha, size = self.cache.commit_blob(writer, res.expected, res.upstream_url)
        entry = res.index_entry(ctx.proxy.key, headers, sha, size, ctx.now())
        try:
            return self.cache.store_entry(entry)
        except StoreFailed as exc:
            store_failed(self.cache, exc, f"{res.upstream_url} served whole but not indexed")
            return entry

    def entry_headers(self, ctx: RequestContext, res: Resource, entry: Entry) -> dict[str, str]:
        """The headers of a stored ``entry`` streamed while it is copied into the cache (from an
        ``s3://`` cache's bucket): those of a hit on it."""
        headers = {
            CACHE_HEADER: "hit",
            "Content-Type": entry.content_type or res.content_type or "application/octet-stream",
            "ETag": f'"sha256-{entry.sha256}"',
            **ctx.fmt.reply_headers(res, entry.headers),
        }
        if entry.last_modified:
            headers["Last-Modified"] = entry.last_modified
        return headers

    def stream_headers(self, ctx: RequestContext, res: Resource, resp: httpx.Response) -> dict[str, str]:
        """The headers of an answer streamed while the upstream's ``resp`` is stored."""
        return {
            CACHE_HEADER: "miss",
            "Content-Type": resp.headers.get("content-type")
            or res.content_type
            or "application/octet-stream",
            **ctx.fmt.reply_headers(res, _kept_headers(res, resp)),
        }


def _kept_headers(res: Resource, resp: httpx.Response) -> dict[str, str]:
    return {name: resp.headers[name] for name in res.keep_headers if name in resp.headers}


def _error_body(resp: httpx.Response, limit: int = 65536) -> bytes:
    """The start of an error answer's body (a registry's JSON errors), read at most ``limit``."""
    body = b""
    with contextlib.suppress(UpstreamError, httpx.HTTPError):
        for chunk in iter_body(resp):
            body += chunk
            if len(body) >= limit:
                break
    return body[:limit]


def store_failed(cache: Cache, exc: StoreFailed, action: str = "") -> None:
    """Log (WARNING) and remember that the cache could not store: ``/-/ready`` reports it."""
    cache.store_failed(str(exc))
    log.warning("%s%s", exc, f"; {action}" if action else "")


def declared_length(resp: httpx.Response) -> int | None:
    """Content-Length, when it describes the bytes we will relay (no content coding)."""
    if content_coded(resp):  # the client took the coded length off; be sure anyway
        return None
    try:
        return int(resp.headers["content-length"])
    except (KeyError, ValueError):
        return None
