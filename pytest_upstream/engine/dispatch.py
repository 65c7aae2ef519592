"""The engine's front: from a ``ProxyRequest`` to a ``Reply``.

It finds the proxy (or the format that claims the first path segment, ``Format.root_prefix``), checks the key
is allowed and the method is a read, lets the format resolve the request in a fresh per-request
context, finds the answer (the cache, the lock file, or the fetch pipeline, by mode and
freshness), and shapes every failure into the format's error reply, in one place; that reply's
status line says why in a few words (``504 Not recorded (replay mode)``), since pip and uv print
the status line and never the body.  What it answered goes to the recorders.  The key ``-`` is
the proxy's own (``/-/metrics``, ``/-/ready``; no proxy key can start with ``-``).  It knows
nothing of HTTP servers, pytest or any one format.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from pytest_upstream.config.auth import CredentialsError, scrub
from pytest_upstream.config.settings import MODES, ProxyDefinition, Settings
from pytest_upstream.engine.artifact_index import ArtifactIndex
from pytest_upstream.engine.clock import Clock, SystemClock
from pytest_upstream.engine.context import RequestContext
from pytest_upstream.engine.errors import ReplayMiss, UpstreamDown, UpstreamFailed, WouldBlock, reason_for
from pytest_upstream.engine.fetch import CACHE_HEADER, Fetcher, Obtained
from pytest_upstream.engine.flights import Flights
from pytest_upstream.engine.freshness import Freshness
from pytest_upstream.engine.groups import Groups
from pytest_upstream.engine.hosts import checked_base_url
from pytest_upstream.engine.metrics import CONTENT_TYPE, Metrics
from pytest_upstream.engine.recorders import Answer, LockRecorder, MetricsRecorder, Recorders, ServedRecorder
from pytest_upstream.engine.render import RenderMemo
from pytest_upstream.engine.replay import load_lock, locked_blob, miss_message
from pytest_upstream.engine.shared_tier import shared_tier
from pytest_upstream.engine.trimmer import size_cap
from pytest_upstream.formats import get_format, root_routes
from pytest_upstream.formats.base import FormatError, Kind, MalformedUpstream, Resource
from pytest_upstream.formats.hiding import Hidden
from pytest_upstream.messages import ProxyRequest, Reply
from pytest_upstream.repro.lockfile import LockFile
from pytest_upstream.repro.served import ServedLog
from pytest_upstream.store.cache import Cache, CacheError, DigestMismatch, Entry, LockTimeout, StoreFailed
from pytest_upstream.store.entry import NOT_FOUND
from pytest_upstream.upstream.addresses import AddressPolicy
from pytest_upstream.upstream.client import UNTRUSTED, UpstreamClient
from pytest_upstream.upstream.health import Health

log = logging.getLogger("pytest_upstream")

OWN_KEY = "-"  # /-/metrics, /-/ready: keys start with a letter, so none collides
REPLAY_MISS_REASON = "Not recorded (replay mode)"
# answer_warm reads metadata a format resolves with up to this size (an npm packument can be 100 MB)
INLINE_METADATA = 1024 * 1024


class Engine:
    def __init__(
        self, settings: Settings, *, log_: ServedLog | None = None, clock: Clock | None = None
    ) -> None:
        self.settings = settings
        self.clock: Clock = clock or SystemClock()
        self.cache = Cache(settings.cache_dir)
        # The SSRF guard trusts the upstreams' origins, allow_hosts, and the token realms a
        # proxy's auth_hosts names (credentials may go there, so connections may too).
        trusted = [*settings.allow_hosts, *(host for p in settings.proxies for host in p.auth_hosts)]
        self.addresses = AddressPolicy([p.url for p in settings.proxies], trusted)
        self.client = UpstreamClient(self.addresses, extra_ca=settings.capture.upstream_ca)
        self.served = log_ or ServedLog()
        # The lock file (docs/reproducible-builds.md): replay serves exactly what it names;
        # the lock recorder collects what every answer came from, for a record or refresh run to save.
        self.lock = load_lock(settings)
        self._lock_recorder = LockRecorder()
        self.metrics = Metrics()
        # The size cap (max_size): trims the cache in the background, told of stored bytes as a recorder.
        self.trimmer = size_cap(
            lambda: self.settings, self.cache, self.metrics, self.clock.now, self.lock, self.recorded_lock
        )
        # What the cache holds, per key, for the /-/ui/ pages (kept current as answers go out).
        self.artifacts = ArtifactIndex(self.cache, lambda: self.settings)
        self.recorders = Recorders(
            ServedRecorder(self.served),
            self._lock_recorder,
            MetricsRecorder(self.metrics),
            self.artifacts,
            *([self.trimmer] if self.trimmer is not None else []),
            scrub=self.scrub,
        )
        self.freshness = Freshness(self.clock)
        self.health = Health(self.clock.now, settings.health)
        self.metrics.health = self.health.snapshot
        self.fetcher = Fetcher(
            self.cache, self.client, self.freshness, self.recorders, settings.fetch, self.health
        )
        # Artifact misses: one download per entry in the background, clients served from its file.
        self.shared = shared_tier(settings, self.cache)
        if self.shared is not None:
            self.metrics.object_store = self.shared.tier.health.snapshot
            self.shared.on_pulled = self.trimmer.stored if self.trimmer is not None else None
        self.flights = Flights(
            self.cache,
            self.fetcher,
            self.recorders,
            self.clock.now,
            settings.fetch.orphan_deadline,
            self.shared,
        )
        self.renders = RenderMemo()
        self.groups = Groups(settings, self._handle_proxy)
        self.allowed_keys: frozenset[str] | None = None  # None: all; a test's marker may narrow it

    @property
    def mode(self) -> str:
        return self.settings.mode

    @mode.setter
    def mode(self, mode: str) -> None:
        """Switch modes between requests (the pytest plugin does it per test)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)} (got {mode!r})")
        self.settings = replace(self.settings, mode=mode)

    def close(self) -> None:
        if self.trimmer is not None:
            self.trimmer.close()
        self.flights.close()
        self.client.close()

    def remember(self, key: str, res: Resource, entry: Entry) -> None:
        """Note the stored bytes (or remembered 404) a request was answered from."""
        self.recorders.used(key, res, entry)

    def recorded_lock(self) -> LockFile:
        """What this engine answered from so far: the lock a record or refresh run saves."""
        return self._lock_recorder.snapshot()

    # -- dispatch ------------------------------------------------------------
    def answer_warm(self, req: ProxyRequest) -> Reply | None:
        """``handle``'s reply if it can be given without waiting, else None (nothing recorded):
        the server's event loop answers a fresh hit whose blob this process has verified and
        whose rendering is memoised, an error, or ``/-/…`` itself, and hands anything that may
        wait (a lock, the upstream, a download, hashing a blob, a render) to a worker thread,
        which calls ``handle``.  One code path: ``handle`` with ``warm_only`` set, which raises
        WouldBlock at each place that would wait, before anything is recorded."""
        try:
            return self.handle(req, warm_only=True)
        except WouldBlock:
            return None

    def handle(self, req: ProxyRequest, *, warm_only: bool = False) -> Reply:
        settings = self.settings
        base_url = checked_base_url(req.base_url)
        if base_url is None:
            reply = Reply.text(400, "the Host header must be a host name or address, with an optional port")
            reply.reason = "Bad Host header"
            return reply
        req.base_url = base_url
        if req.key == OWN_KEY:
            return self._own(req)
        router = root_routes().get(req.key)
        if router is not None:
            first, _, rest = req.path.partition("/")
            group = settings.group(first)
            if group is not None and group.format == router.name:  # a group under the root prefix
                if warm_only:  # members are asked in turn: a worker's job (nothing recorded twice)
                    raise WouldBlock
                return self.groups.handle(group, replace(req, key=group.key, path=rest))
            routed = router.route(req, settings)
            if isinstance(routed, Reply):
                return routed
            proxy, req = routed
        else:
            group = settings.group(req.key)
            if group is not None:
                if warm_only:
                    raise WouldBlock
                return self.groups.handle(group, req)
            found = settings.proxy(req.key)
            if found is None:
                known = (
                    ", ".join([p.key for p in settings.proxies] + [g.key for g in settings.groups]) or "none"
                )
                reply = Reply.text(404, f"no upstream proxy with key {req.key!r} (configured: {known})")
                reply.reason = "No such upstream proxy"
                return reply
            proxy = found
        return self._handle_proxy(req, proxy, warm_only=warm_only)

    def handle_captured(
        self, req: ProxyRequest, proxy: ProxyDefinition, *, warm_only: bool = False
    ) -> Reply | None:
        """A captured request (docs/capture.md): for the proxy made for its host, in no Settings,
        or for the configured proxy a public registry's host maps to, routed by capture itself
        (server/capture_registries.py); None when ``warm_only`` and answering would wait.  The SSRF
        guard trusts the proxy's origin:
        the client named it itself, as it could have connected to it itself."""
        self.addresses.add_origin(proxy.url)
        try:
            return self._handle_proxy(req, proxy, warm_only=warm_only)
        except WouldBlock:
            return None

    def _handle_proxy(self, req: ProxyRequest, proxy: ProxyDefinition, *, warm_only: bool = False) -> Reply:
        """A request for one proxy (a group's member included)."""
        settings = self.settings
        fmt = get_format(proxy.format)
        if fmt is None:
            reply = Reply.text(
                501, f"format {proxy.format!r} (proxy {proxy.key!r}) is not supported yet by this version"
            )
            reply.reason = "Format not supported"
            return reply
        ctx = RequestContext(
            req, proxy, fmt, settings.mode, self.cache, self.clock, self._metadata, warm_only=warm_only
        )
        return self._handle_in(ctx)

    def _handle_in(self, ctx: RequestContext) -> Reply:
        req, proxy, fmt = ctx.request, ctx.proxy, ctx.fmt
        if self.allowed_keys is not None and proxy.key not in self.allowed_keys:
            allowed = ", ".join(sorted(self.allowed_keys)) or "none"
            return self._fail(
                ctx,
                None,
                403,
                f"upstream proxy {proxy.key!r} is not allowed now: the running test "
                f"({self.served.current_test or 'unknown'}) may use only {allowed} (upstream marker)",
                reason="Blocked by the upstream marker",
            )
        if req.method not in ("GET", "HEAD"):
            reply = fmt.error(
                ctx, 405, f"{req.method} is not allowed: {proxy.key!r} is a read-only upstream proxy"
            )
            reply.headers["Allow"] = "GET, HEAD"
            return reply
        resource: Resource | None = None
        try:
            target = fmt.resolve(req, ctx)
            if isinstance(target, Reply):
                return target
            resource = target
            return self._serve(ctx, resource)
        except FormatError as exc:
            return self._fail(
                ctx, resource, exc.status, str(exc), cache=exc.cache, code=exc.code, reason=exc.reason
            )
        except ReplayMiss as exc:
            return self._fail(ctx, resource, 504, str(exc), cache="miss", reason=REPLAY_MISS_REASON)
        except UpstreamDown as exc:  # not asked: offline, or marked down after failing
            return self._fail(ctx, resource, 503, str(exc), reason="Upstream not asked (down or offline)")
        except UpstreamFailed as exc:
            self._upstream_failed(ctx, resource, str(exc))
            if (err := exc.passthrough) is not None:
                return self._fail(ctx, resource, err.status, str(err), cache=err.cache, code=err.code)
            reason = "Upstream certificate not trusted" if UNTRUSTED in str(exc) else "Upstream failed"
            return self._fail(ctx, resource, 502, str(exc), reason=reason)
        except DigestMismatch as exc:
            self._upstream_failed(ctx, resource, str(exc))
            return self._fail(ctx, resource, 502, str(exc), reason="Upstream bytes failed verification")
        except MalformedUpstream as exc:
            self._upstream_failed(ctx, resource, str(exc))
            return self._fail(ctx, resource, 502, str(exc), reason="Upstream answer unusable")
        except CredentialsError as exc:
            return self._fail(ctx, resource, 502, str(exc), reason="Upstream credentials not set")
        except LockTimeout as exc:
            return self._fail(ctx, resource, 504, str(exc), reason="Timed out waiting for another fetch")
        except StoreFailed as exc:  # disk full or read-only, before any body byte (docs/cache.md)
            return self._fail(ctx, resource, 503, str(exc), reason="Cache cannot store")
        except CacheError as exc:
            log.exception("cache failure")
            return self._fail(ctx, resource, 500, f"cache error: {exc}", reason="Cache error")

    def scrub(self, text: str) -> str:
        """``text`` without secrets (config/auth.py ``scrub``): every error text the engine lets out
        (reply body and status line, served record, report, log) passes here first."""
        return scrub(text, self.settings.secret_env_names())

    def _upstream_failed(self, ctx: RequestContext, res: Resource | None, error: str) -> None:
        url = res.upstream_url if res is not None else ctx.proxy.url
        self.recorders.upstream_failed(ctx.proxy.key, url, error)  # Recorders scrub it

    def _fail(
        self,
        ctx: RequestContext,
        res: Resource | None,
        status: int,
        msg: str,
        cache: str = "error",
        code: str = "",
        reason: str = "",
    ) -> Reply:
        replay_miss = status == 504 and reason == REPLAY_MISS_REASON
        msg = self.scrub(msg)
        self.recorders.answered(
            Answer(ctx.request, ctx.request.path, res, cache, status, error=msg, replay_miss=replay_miss)
        )
        reply = ctx.fmt.error(ctx, status, msg, code)
        reply.reason = reply.reason or reason or reason_for(status, msg)
        if replay_miss:  # a state a client (and the access log) can read; other errors claim none
            reply.headers[CACHE_HEADER] = "replay-miss"
        return reply

    # -- the proxy's own URLs (/-/...) ----------------------------------------
    def _own(self, req: ProxyRequest) -> Reply:
        """``/-/metrics`` (Prometheus text) and ``/-/ready`` (for readiness probes)."""
        if req.method not in ("GET", "HEAD"):
            reply = Reply.text(405, f"{req.method} is not allowed here")
            reply.headers["Allow"] = "GET, HEAD"
            return reply
        if req.path == "metrics":
            return Reply(200, {"Content-Type": CONTENT_TYPE}, body=self.metrics.exposition().encode())
        if req.path == "ready":
            problem = self.not_ready()
            if problem:
                reply = Reply.text(503, f"not ready: {problem}")
                reply.reason = "Not ready"
                return reply
            degraded = self.cache.degraded()
            if degraded:  # hits are served, misses passed through: ready, and says why it is degraded
                return Reply.text(200, f"ready, degraded: {degraded}")
            return Reply.text(200, "ready")
        reply = Reply.text(404, "the proxy's own URLs are /-/metrics and /-/ready")
        reply.reason = "No such URL"
        return reply

    def not_ready(self) -> str:
        """Why this engine cannot serve now ("" when it can): the cache's directories must exist.

        A cache that cannot store (read-only, full) still serves its hits and passes misses
        through: that is ``Cache.degraded``, reported by a 200.
        """
        for directory in self.cache.layout.directories:
            if not directory.is_dir():
                return f"cache directory {directory} is missing"
        return ""

    # -- answering -----------------------------------------------------------
    def _serve(self, ctx: RequestContext, res: Resource) -> Reply:
        streamed = self._try_stream(ctx, res)
        if isinstance(streamed, Reply):
            return streamed
        obtained = streamed or self.obtain(ctx, res)
        entry = obtained.entry
        blob = obtained.blob or self.cache.verified_blob(entry)
        if blob is None:  # corrupt on disk and removed: fetch again once
            obtained = self.obtain(ctx, res)
            entry = obtained.entry
            blob = self.cache.verified_blob(entry)
            if blob is None:
                raise UpstreamFailed(
                    f"cached copy of {res.upstream_url} is corrupt and could not be refetched"
                )
        headers = {CACHE_HEADER: obtained.cache}
        if obtained.cache == "stale":
            if not obtained.quiet:  # an upstream marked down was not asked: nothing new to log
                self._upstream_failed(ctx, res, obtained.note)
            headers["X-Upstream-Error"] = self.scrub(obtained.note)
            headers["Warning"] = '110 - "Response is Stale"'
        if entry.last_modified:
            headers["Last-Modified"] = entry.last_modified
        rendered = (
            self.renders.render(
                ctx.proxy.key,
                ctx.fmt,
                res,
                entry,
                blob,
                ctx.proxy.policy,
                self.clock.now(),
                memoised_only=ctx.warm_only,
            )
            if entry.is_metadata
            else None
        )
        hidden: tuple[Hidden, ...] = ()
        if rendered is not None:
            body, ctype, etag, hidden = rendered
            headers.update({"Content-Type": ctype, "ETag": etag, "Vary": "Accept"})
            reply = Reply(200, headers, body=body)
            size = len(body)
        else:
            headers.update(
                {
                    "Content-Type": entry.content_type or res.content_type or "application/octet-stream",
                    "ETag": f'"sha256-{entry.sha256}"',
                    "Accept-Ranges": "bytes",
                }
            )
            headers.update(ctx.fmt.reply_headers(res, entry.headers))
            reply = Reply(200, headers, file=blob, length=entry.size)
            size = entry.size
        self.recorders.answered(
            Answer(ctx.request, res.path, res, obtained.cache, 200, size, entry.sha256, hidden=hidden)
        )
        self.recorders.used(ctx.proxy.key, res, entry)
        return reply

    def _metadata(self, ctx: RequestContext, resource: Resource) -> tuple[Entry, bytes]:
        """``FormatContext.metadata``: what a format reads to resolve a request."""
        obtained = self.obtain(ctx, resource)
        if ctx.warm_only and obtained.entry.size > INLINE_METADATA:
            raise WouldBlock  # reading (and parsing) a big document is a worker's job
        path = obtained.blob or self.cache.verified_blob(obtained.entry)
        if path is None:
            raise UpstreamFailed(f"cached copy of {resource.upstream_url} vanished; retry")
        self.recorders.used(ctx.proxy.key, resource, obtained.entry)
        return obtained.entry, path.read_bytes()

    def _usable(self, ctx: RequestContext, res: Resource, *, pull: bool = True) -> tuple[Entry, Path] | None:
        """The intact cached (or locked) entry and blob, or None; raises 404 for a remembered
        not-found answer.  ``pull``: a local miss is pulled whole from an ``s3://`` cache's
        bucket first (else an artifact GET's flight streams it from there: flights.py)."""
        proxy = ctx.proxy
        if self.lock is not None and ctx.mode == "replay":
            if ctx.warm_only:
                raise WouldBlock  # replaying a lock file verifies what it names: a worker's job
            return locked_blob(self.settings, self.lock, self.cache, self.recorders, proxy, res)
        entry = self.cache.lookup(proxy.key, res.path, res.variant)
        if entry is None and pull and self.shared is not None:  # what another machine put in the bucket
            if ctx.warm_only:
                raise WouldBlock  # asking the bucket is a worker's job
            entry = self.shared.pull(proxy.key, res.path, res.variant)
        if entry is None:
            return None
        if entry.kind == NOT_FOUND:
            if self.freshness.not_found_holds(ctx.mode, res, entry):
                self.recorders.used(proxy.key, res, entry)
                age = self.freshness.age(entry)
                raise FormatError(
                    404, f"not found upstream: {res.upstream_url} (answer cached {age:.0f}s ago)", cache="hit"
                )
            return None
        if ctx.warm_only:
            known = self.cache.verifier.known_path(entry.sha256, entry.size)
            if known is None:
                raise WouldBlock  # verifying the blob would hash it
            return entry, known
        blob = self.cache.verified_blob(entry)
        return None if blob is None else (entry, blob)

    def obtain(self, ctx: RequestContext, res: Resource) -> Obtained:
        """Get a resource into the cache (or find it there) without streaming."""
        proxy = ctx.proxy
        found = self._usable(ctx, res)
        if found is not None and (
            ctx.mode == "replay" or self.freshness.fresh(ctx.mode, proxy, res, found[0])
        ):
            return Obtained(found[0], "hit", blob=found[1])
        if ctx.mode == "replay":
            raise ReplayMiss(miss_message(self.settings, self.lock, proxy, res))
        if ctx.warm_only:
            raise WouldBlock  # a miss or a stale copy: the lock and the upstream
        try:
            with self.cache.locked(proxy.key, res.path, res.variant, self.settings.lock_timeout):
                again = self._usable(ctx, res)
                entry = again[0] if again else None
                if entry is not None and self.freshness.fresh(ctx.mode, proxy, res, entry):
                    return Obtained(entry, "hit")  # another thread or process fetched it meanwhile
                if self.shared is not None and entry is not None:  # another machine refreshed it?
                    newer = self.shared.fresher(proxy.key, res.path, res.variant, entry)
                    if newer is not None and self.freshness.fresh(ctx.mode, proxy, res, newer):
                        return Obtained(newer, "hit")
                try:
                    obtained = self.fetcher.fetch_whole(ctx, res, entry)
                except FormatError as exc:  # a remembered 404 is shared too (the negative cache)
                    if self.shared is not None and exc.status == 404:
                        self.shared.publish_not_found(proxy.key, res)
                    raise
                if self.shared is not None and obtained.cache == "miss":
                    self.shared.publish(obtained.entry)
                return obtained
        except StoreFailed as exc:  # a read-only cache cannot lock: its stale copy, else a 503
            if found is None:
                raise
            return Obtained(found[0], "stale", f"{proxy.key}: {exc}", blob=found[1])

    def _try_stream(self, ctx: RequestContext, res: Resource) -> Reply | Obtained | None:
        """For an artifact miss: join the entry's download, or start it (engine/flights.py).

        None when ``obtain`` should serve it (a hit, metadata, a HEAD, replay mode, or another
        process fetched it while the download waited for the lock).
        """
        if res.kind is not Kind.ARTIFACT or ctx.request.method != "GET" or ctx.mode == "replay":
            return None
        if self._usable(ctx, res, pull=False) is not None:  # a miss streams from the bucket too
            return None
        if ctx.warm_only:
            raise WouldBlock  # a download to start or join
        return self.flights.serve(
            ctx, res, self.settings.lock_timeout, lambda: self._usable(ctx, res, pull=False) is not None
        )
