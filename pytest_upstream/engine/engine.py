"""The proxy engine: cache look-up, modes, TTLs, locking, upstream fetches.

It knows nothing of HTTP servers or pytest: it turns a ProxyRequest into a
Reply, asking the proxy's format module what the request means.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import httpx

from pytest_upstream.config.auth import CredentialsError
from pytest_upstream.config.settings import MODES, ProxyDefinition, Settings
from pytest_upstream.formats import get_format
from pytest_upstream.formats.base import Format, FormatError, Kind, MalformedUpstream, Resource
from pytest_upstream.messages import ProxyRequest, Reply
from pytest_upstream.repro.lockfile import LockError, LockFile, LockFileEntry
from pytest_upstream.repro.served import ServedLog, ServedRecord
from pytest_upstream.store.cache import Cache, CacheError, DigestMismatch, Entry, LockTimeout
from pytest_upstream.upstream.client import UpstreamClient, UpstreamError, iter_body

log = logging.getLogger("pytest_upstream")

CACHE_HEADER = "X-Upstream-Cache"
USER_AGENT = "pytest-upstream"
NOT_FOUND = "notfound"  # entry kind of a remembered upstream 404 (see Resource.negative_ttl)
REGISTRY_PREFIX = "v2"  # /v2/<key>/... is the OCI distribution API
REGISTRY_HEADERS = {"Docker-Distribution-API-Version": "registry/2.0"}
# Artifacts whose digest the upstream publishes are downloaded whole and
# verified before the first byte is sent when they are at most this big, so
# a mismatch is a clean 502.  Larger ones stream to the client while they
# are written; on a mismatch the connection is cut (the client sees a
# truncated body) and nothing is stored.
VERIFY_BEFORE_SERVE_LIMIT = 8 * 1024 * 1024
_RETRYABLE_STATUS = frozenset({429, 500, 502, 503, 504})
_RENDER_MEMO_SIZE = 256


class ReplayMiss(Exception):
    pass


class UpstreamFailed(Exception):
    """No usable answer from the upstream; carries what the client should read."""

    # The format's own answer (Format.upstream_error) when no stale copy can be served.
    passthrough: FormatError | None = None


@dataclass
class Obtained:
    entry: Entry
    cache: str  # hit | miss | stale
    note: str = ""  # why a stale copy was served
    blob: Path | None = None  # the verified blob, when already checked


class _Context:
    """The FormatContext a format sees while resolving one request."""

    def __init__(self, engine: Engine, proxy: ProxyDefinition, fmt: Format) -> None:
        self.engine = engine
        self.proxy = proxy
        self.fmt = fmt

    def cached(self, path: str, variant: str = "") -> Entry | None:
        entry = self.engine.cache.lookup(self.proxy.key, path, variant)
        if entry is None or self.engine.cache.verified_blob(entry) is None:
            return None
        return entry

    def metadata(self, resource: Resource) -> tuple[Entry, bytes]:
        obtained = self.engine.obtain(self.proxy, self.fmt, resource)
        path = obtained.blob or self.engine.cache.verified_blob(obtained.entry)
        if path is None:
            raise UpstreamFailed(f"cached copy of {resource.upstream_url} vanished; retry")
        self.engine.remember(self.proxy.key, resource, obtained.entry)
        return obtained.entry, path.read_bytes()


class Engine:
    def __init__(self, settings: Settings, *, log_: ServedLog | None = None) -> None:
        self.settings = settings
        self.cache = Cache(settings.cache_dir)
        self.client = UpstreamClient()
        self.served = log_ or ServedLog()
        self._refreshed: set[tuple[str, str, str]] = set()
        self._refreshed_lock = threading.Lock()
        self._render_memo: OrderedDict[tuple[str, str, str, str], tuple[bytes, str, str]] = OrderedDict()
        self._render_lock = threading.Lock()
        # The lock file (docs/reproducible-builds.md): replay serves exactly what it names;
        # ``recorded`` collects what every answer came from, for a record or refresh run to save.
        self.lock = _load_lock(settings)
        self.recorded = LockFile()
        self._recorded_lock = threading.Lock()
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
        self.client.close()

    # -- request handling --------------------------------------------------
    def handle(self, req: ProxyRequest) -> Reply:
        if req.key == REGISTRY_PREFIX:
            return self._handle_registry(req)
        proxy = self.settings.proxy(req.key)
        if proxy is None:
            known = ", ".join(p.key for p in self.settings.proxies) or "none"
            return Reply.text(404, f"no upstream proxy with key {req.key!r} (configured: {known})")
        fmt = get_format(proxy.format)
        if fmt is None:
            return Reply.text(
                501, f"format {proxy.format!r} (proxy {proxy.key!r}) is not supported yet by this version"
            )
        return self._handle_with(req, proxy, fmt)

    def _handle_registry(self, req: ProxyRequest) -> Reply:
        """The OCI distribution API lives at /v2/<key>/<name>/...: the key comes second.

        When the first component is not a docker proxy's key, the whole path is a
        repository of the registry mirror proxy (``Settings.registry_mirror``), as
        the Docker daemon's ``registry-mirrors`` and containerd mirrors ask for it.
        """
        if req.path == "":
            return Reply(200, {"Content-Type": "application/json", **REGISTRY_HEADERS}, body=b"{}")
        key, _, rest = req.path.partition("/")
        proxy = self.settings.proxy(key)
        keyless = proxy is None or proxy.format != "docker"
        if keyless:
            proxy, rest = self.settings.registry_mirror(), req.path
        if proxy is None:
            known = ", ".join(p.key for p in self.settings.proxies if p.format == "docker") or "none"
            return _registry_error(
                404,
                "NAME_UNKNOWN",
                f"no docker upstream proxy with key {key!r} (configured: {known}), and no registry "
                "mirror for keyless /v2/<name>/... (mark a docker proxy with mirror = true)",
            )
        fmt = get_format(proxy.format)
        if fmt is None:
            return _registry_error(
                501,
                "UNSUPPORTED",
                f"format 'docker' (proxy {proxy.key!r}) is not supported yet by this version",
            )
        return self._handle_with(replace(req, key=proxy.key, path=rest, keyless=keyless), proxy, fmt)

    def _handle_with(self, req: ProxyRequest, proxy: ProxyDefinition, fmt: Format) -> Reply:
        if self.allowed_keys is not None and proxy.key not in self.allowed_keys:
            allowed = ", ".join(sorted(self.allowed_keys)) or "none"
            return self._fail(
                req,
                fmt,
                None,
                403,
                f"upstream proxy {proxy.key!r} is not allowed now: the running test "
                f"({self.served.current_test or 'unknown'}) may use only {allowed} (upstream marker)",
            )
        if req.method not in ("GET", "HEAD"):
            reply = fmt.error(
                405, f"{req.method} is not allowed: {proxy.key!r} is a read-only upstream proxy"
            )
            reply.headers["Allow"] = "GET, HEAD"
            return reply
        ctx = _Context(self, proxy, fmt)
        resource: Resource | None = None
        try:
            target = fmt.resolve(req, ctx)
            if isinstance(target, Reply):
                return target
            resource = target
            return self._serve(req, proxy, fmt, resource)
        except FormatError as exc:
            return self._fail(req, fmt, resource, exc.status, str(exc), cache=exc.cache, code=exc.code)
        except ReplayMiss as exc:
            return self._fail(req, fmt, resource, 504, str(exc), cache="miss")
        except UpstreamFailed as exc:
            if (err := exc.passthrough) is not None:
                return self._fail(req, fmt, resource, err.status, str(err), cache=err.cache, code=err.code)
            return self._fail(req, fmt, resource, 502, str(exc))
        except (MalformedUpstream, DigestMismatch, CredentialsError) as exc:
            return self._fail(req, fmt, resource, 502, str(exc))
        except LockTimeout as exc:
            return self._fail(req, fmt, resource, 504, str(exc))
        except CacheError as exc:
            log.exception("cache failure")
            return self._fail(req, fmt, resource, 500, f"cache error: {exc}")

    def _fail(
        self,
        req: ProxyRequest,
        fmt: Format,
        res: Resource | None,
        status: int,
        msg: str,
        cache: str = "error",
        code: str = "",
    ) -> Reply:
        self.served.add(
            ServedRecord(
                key=req.key,
                path=req.path,
                cache=cache,
                status=status,
                size=0,
                method=req.method,
                upstream_url=res.upstream_url if res else "",
                kind=res.kind.value if res else "",
                variant=res.variant if res else "",
                error=msg,
                test=self.served.current_test,
            )
        )
        return fmt.error(status, msg, code)

    def _serve(self, req: ProxyRequest, proxy: ProxyDefinition, fmt: Format, res: Resource) -> Reply:
        streamed = self._try_stream(req, proxy, fmt, res)
        if isinstance(streamed, Reply):
            return streamed
        obtained = streamed or self.obtain(proxy, fmt, res)
        entry = obtained.entry
        blob = obtained.blob or self.cache.verified_blob(entry)
        if blob is None:  # corrupt on disk and removed: fetch again once
            obtained = self.obtain(proxy, fmt, res)
            entry = obtained.entry
            blob = self.cache.verified_blob(entry)
            if blob is None:
                raise UpstreamFailed(
                    f"cached copy of {res.upstream_url} is corrupt and could not be refetched"
                )
        headers = {CACHE_HEADER: obtained.cache}
        if obtained.cache == "stale":
            headers["X-Upstream-Error"] = obtained.note
            headers["Warning"] = '110 - "Response is Stale"'
        if entry.last_modified:
            headers["Last-Modified"] = entry.last_modified
        rendered = self._render(proxy, fmt, res, entry, blob) if entry.is_metadata else None
        if rendered is not None:
            body, ctype, etag = rendered
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
            headers.update(fmt.reply_headers(res, entry.headers))
            reply = Reply(200, headers, file=blob, length=entry.size)
            size = entry.size
        self._record(req, res, obtained.cache, 200, size, entry.sha256)
        self.remember(proxy.key, res, entry)
        return reply

    def _record(self, req: ProxyRequest, res: Resource, cache: str, status: int, size: int, sha: str) -> None:
        self.served.add(
            ServedRecord(
                key=req.key,
                path=res.path,
                cache=cache,
                status=status,
                size=0 if req.method == "HEAD" else size,
                method=req.method,
                upstream_url=res.upstream_url,
                sha256=sha,
                kind=res.kind.value,
                variant=res.variant,
                test=self.served.current_test,
            )
        )

    def _render(
        self, proxy: ProxyDefinition, fmt: Format, res: Resource, entry: Entry, blob: object
    ) -> tuple[bytes, str, str] | None:
        memo_key = (proxy.key, res.path, res.render_as, entry.sha256)
        with self._render_lock:
            if memo_key in self._render_memo:
                self._render_memo.move_to_end(memo_key)
                return self._render_memo[memo_key]
        body = self.cache.blob_path(entry.sha256).read_bytes()
        out = fmt.render(res, body)
        if out is None:
            return None
        data, ctype = out
        result = (data, ctype, f'"sha256-{hashlib.sha256(data).hexdigest()}"')
        with self._render_lock:
            self._render_memo[memo_key] = result
            while len(self._render_memo) > _RENDER_MEMO_SIZE:
                self._render_memo.popitem(last=False)
        return result

    # -- cache policy ------------------------------------------------------
    def _fresh(self, proxy: ProxyDefinition, res: Resource, entry: Entry) -> bool:
        if not entry.is_metadata:
            return True
        if self.mode == "refresh":
            with self._refreshed_lock:
                return (proxy.key, res.path, res.variant) in self._refreshed
        return entry.age() < proxy.metadata_ttl

    def _usable(self, proxy: ProxyDefinition, res: Resource) -> Entry | None:
        """The intact cached entry, or None; raises 404 for a remembered not-found answer."""
        found = self._usable_blob(proxy, res)
        return found[0] if found else None

    def _usable_blob(self, proxy: ProxyDefinition, res: Resource) -> tuple[Entry, Path] | None:
        if self.lock is not None and self.mode == "replay":
            return self._locked_blob(proxy, res)
        entry = self.cache.lookup(proxy.key, res.path, res.variant)
        if entry is None:
            return None
        if entry.kind == NOT_FOUND:
            age = entry.age()
            if self.mode == "replay" or (self._fresh_enough(res, age) and self.mode != "refresh"):
                self.remember(proxy.key, res, entry)
                raise FormatError(
                    404, f"not found upstream: {res.upstream_url} (answer cached {age:.0f}s ago)", cache="hit"
                )
            return None
        blob = self.cache.verified_blob(entry)
        return None if blob is None else (entry, blob)

    @staticmethod
    def _fresh_enough(res: Resource, age: float) -> bool:
        return res.negative_ttl is not None and age < res.negative_ttl

    def _upstream_headers(
        self, proxy: ProxyDefinition, fmt: Format, res: Resource, stale: Entry | None
    ) -> dict[str, str]:
        headers = {"User-Agent": USER_AGENT, **res.request_headers, **fmt.upstream_headers(proxy, res)}
        if stale is not None and stale.is_metadata:
            if stale.etag:
                headers["If-None-Match"] = stale.etag
            if stale.last_modified:
                headers["If-Modified-Since"] = stale.last_modified
        return headers

    def obtain(self, proxy: ProxyDefinition, fmt: Format, res: Resource) -> Obtained:
        """Get a resource into the cache (or find it there) without streaming."""
        found = self._usable_blob(proxy, res)
        if found is not None and (self.mode == "replay" or self._fresh(proxy, res, found[0])):
            return Obtained(found[0], "hit", blob=found[1])
        if self.mode == "replay":
            raise ReplayMiss(self._replay_message(proxy, res))
        with self.cache.locked(proxy.key, res.path, res.variant, self.settings.lock_timeout):
            entry = self._usable(proxy, res)
            if entry is not None and self._fresh(proxy, res, entry):
                return Obtained(entry, "hit")  # another thread or process fetched it meanwhile
            return self._fetch_whole(proxy, fmt, res, entry)

    def _open_upstream(
        self,
        stack: contextlib.ExitStack,
        proxy: ProxyDefinition,
        fmt: Format,
        res: Resource,
        stale: Entry | None,
    ) -> httpx.Response:
        """Send the upstream request (retrying once after an auth challenge) inside ``stack``."""
        self.served.upstream_fetch(res.upstream_url)
        headers = self._upstream_headers(proxy, fmt, res, stale)
        resp = stack.enter_context(
            self.client.stream(res.upstream_url, headers=headers, timeout=proxy.timeout)
        )
        if resp.status_code == 401:
            retry = fmt.reauthenticate(proxy, res, resp, self.client)
            if retry is not None:
                resp.close()
                headers.update(retry)
                resp = stack.enter_context(
                    self.client.stream(res.upstream_url, headers=headers, timeout=proxy.timeout)
                )
        return resp

    def _replay_message(self, proxy: ProxyDefinition, res: Resource) -> str:
        if self.lock is not None:
            return (
                f"replay mode: {res.upstream_url} ({proxy.key} {res.path}) is not in the lock file "
                f"{self.settings.lock_file}; run in record or refresh mode to add it"
            )
        return (
            f"replay mode: {res.upstream_url} was not recorded for upstream proxy {proxy.key!r} "
            f"(cache {self.settings.cache_dir}); run in record mode to fetch it"
        )

    def _fetch_whole(
        self, proxy: ProxyDefinition, fmt: Format, res: Resource, stale: Entry | None
    ) -> Obtained:
        """Download, verify and store; on upstream failure fall back to ``stale``."""
        try:
            with contextlib.ExitStack() as stack:
                resp = self._open_upstream(stack, proxy, fmt, res, stale)
                if resp.status_code == 304 and stale is not None:
                    self._mark_refreshed(proxy, res)
                    return Obtained(self.cache.touch(stale), "hit")
                self._check_status(proxy, fmt, res, resp)
                return self._store_response(proxy, fmt, res, resp)
        except (UpstreamError, UpstreamFailed) as exc:
            if stale is not None:
                self._mark_refreshed(proxy, res)
                return Obtained(stale, "stale", f"{proxy.key}: upstream {res.upstream_url}: {exc}")
            if isinstance(exc, UpstreamFailed):
                raise
            raise UpstreamFailed(f"upstream {res.upstream_url} for {proxy.key!r}: {exc}") from exc

    def _store_response(
        self, proxy: ProxyDefinition, fmt: Format, res: Resource, resp: httpx.Response
    ) -> Obtained:
        """Read a 200 answer whole, check and verify it, then store blob and entry."""
        expected = {**fmt.published_digests(res, resp.headers), **res.expected}
        writer = self.cache.writer(tuple(expected))
        try:
            body = bytearray() if res.kind is Kind.METADATA else None
            for chunk in iter_body(resp):
                writer.write(chunk)
                if body is not None:
                    body += chunk
            if body is not None:
                fmt.check(res, bytes(body))
            sha, size = self.cache.commit_blob(writer, expected, res.upstream_url)
        finally:
            writer.discard()
        entry = self._index(proxy, res, resp, sha, size)
        self._mark_refreshed(proxy, res)
        return Obtained(entry, "miss")

    def _mark_refreshed(self, proxy: ProxyDefinition, res: Resource) -> None:
        if self.mode == "refresh":
            with self._refreshed_lock:
                self._refreshed.add((proxy.key, res.path, res.variant))

    def _check_status(self, proxy: ProxyDefinition, fmt: Format, res: Resource, resp: httpx.Response) -> None:
        status = resp.status_code
        if status == 200:
            return
        if status in _RETRYABLE_STATUS or status >= 500:
            what = "rate limited" if status == 429 else f"answered {status}"
            failed = UpstreamFailed(f"upstream {res.upstream_url} for {proxy.key!r} {what}")
            if status < 500:  # 429: the format may pass the upstream's error on (when nothing is stale)
                failed.passthrough = fmt.upstream_error(res, status, _error_body(resp))
            raise failed
        resp.read()
        if status in (404, 410):
            if res.negative_ttl is not None and self.mode != "replay":
                notfound = self.cache.store_entry(
                    Entry(
                        key=proxy.key,
                        path=res.path,
                        variant=res.variant,
                        upstream_url=res.upstream_url,
                        sha256=self.cache.store_bytes(b""),
                        size=0,
                        kind=NOT_FOUND,
                        fetched_at=time.time(),
                    ),
                    durable=False,
                )
                self.remember(proxy.key, res, notfound)
            raise FormatError(404, f"not found upstream: {res.upstream_url} answered {status}", cache="miss")
        if status in (401, 403):
            raise FormatError(
                502,
                f"upstream {res.upstream_url} refused access ({status}); check the auth "
                f"settings of proxy {proxy.key!r}",
            )
        if 400 <= status < 500 and (passthrough := fmt.upstream_error(res, status, resp.content[:65536])):
            raise passthrough
        raise FormatError(502, f"upstream {res.upstream_url} answered {status}")

    def _index(
        self, proxy: ProxyDefinition, res: Resource, resp: httpx.Response, sha: str, size: int
    ) -> Entry:
        return self.cache.store_entry(res.index_entry(proxy.key, resp.headers, sha, size, time.time()))

    # -- the lock file (docs/reproducible-builds.md) ------------------------
    def remember(self, key: str, res: Resource, entry: Entry) -> None:
        """Note the stored bytes (or remembered 404) a request was answered from."""
        locked = LockFileEntry(
            key,
            res.path,
            res.variant,
            entry.sha256,
            entry.size,
            entry.kind,
            content_type=entry.content_type,
            headers=tuple(sorted(entry.headers.items())),
        )
        with self._recorded_lock:
            self.recorded.add(locked)

    def recorded_lock(self) -> LockFile:
        """What this engine answered from so far: the lock a record or refresh run saves."""
        with self._recorded_lock:
            return LockFile(self.recorded)

    def _locked_blob(self, proxy: ProxyDefinition, res: Resource) -> tuple[Entry, Path]:
        """Replay with a lock: exactly the locked bytes, whatever the cache's index says now."""
        assert self.lock is not None
        locked = self.lock.get(proxy.key, res.path, res.variant)
        if locked is None:
            raise ReplayMiss(self._replay_message(proxy, res))
        current = self.cache.lookup(proxy.key, res.path, res.variant)
        if current is None or current.sha256 != locked.sha256 or current.kind != locked.kind:
            # The index moved on (another project refreshed it): the bytes are still in the
            # content-addressed store, and the lock kept the upstream's headers.
            current = Entry(
                key=proxy.key,
                path=res.path,
                variant=res.variant,
                upstream_url=res.upstream_url,
                sha256=locked.sha256,
                size=locked.size,
                kind=locked.kind,
                fetched_at=0.0,
                content_type=locked.content_type or res.content_type,
                headers=dict(locked.headers),
            )
        if locked.kind == NOT_FOUND:
            self.remember(proxy.key, res, current)
            where = self.settings.lock_file
            raise FormatError(404, f"not found upstream: {res.upstream_url} (locked in {where})", cache="hit")
        blob = self.cache.verified_digest(locked.sha256, locked.size)
        if blob is None:
            raise ReplayMiss(
                f"replay mode: the bytes the lock file {self.settings.lock_file} names for "
                f"{res.upstream_url} (sha256 {locked.sha256}) are not in the cache "
                f"{self.settings.cache_dir}; run `upstream-proxy lock verify`, or record again"
            )
        return current, blob

    # -- streaming misses --------------------------------------------------
    def _try_stream(
        self, req: ProxyRequest, proxy: ProxyDefinition, fmt: Format, res: Resource
    ) -> Reply | Obtained | None:
        """For an artifact miss: a Reply whose body streams while it is stored.

        Returns the stored entry instead for a small artifact with a published
        digest (verified before serving), and None when ``obtain`` should
        serve it (a hit, metadata, a HEAD, replay mode, or another process
        fetched it while we waited for the lock).
        """
        if res.kind is not Kind.ARTIFACT or req.method != "GET" or self.mode == "replay":
            return None
        if self._usable(proxy, res) is not None:
            return None
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(
                self.cache.locked(proxy.key, res.path, res.variant, self.settings.lock_timeout)
            )
            if self._usable(proxy, res) is not None:
                stack.close()
                return None
            resp = self._open_upstream(stack, proxy, fmt, res, None)
            self._check_status(proxy, fmt, res, resp)
            length = _declared_length(resp)
            if res.expected and length is not None and length <= VERIFY_BEFORE_SERVE_LIMIT:
                with stack:  # small and published digest: verify before the first byte is sent
                    return self._store_response(proxy, fmt, res, resp)
        except UpstreamError as exc:
            stack.close()
            raise UpstreamFailed(f"upstream {res.upstream_url} for {proxy.key!r}: {exc}") from exc
        except BaseException:
            stack.close()
            raise
        headers = {
            CACHE_HEADER: "miss",
            "Content-Type": resp.headers.get("content-type")
            or res.content_type
            or "application/octet-stream",
            **fmt.reply_headers(res, _kept_headers(res, resp)),
        }
        return Reply(200, headers, stream=self._tee(req, proxy, res, resp, stack), length=length)

    def _tee(
        self,
        req: ProxyRequest,
        proxy: ProxyDefinition,
        res: Resource,
        resp: httpx.Response,
        stack: contextlib.ExitStack,
    ) -> Iterator[bytes]:
        """Yield upstream chunks while writing them to the cache; commit at the end.

        Raises (so the server cuts the connection) on a truncated body or a
        digest mismatch; nothing is stored then.  The last chunk is held back
        until the blob is verified and indexed, so a client never receives a
        whole body that failed verification, and one that did receive a whole
        body finds it in the cache.
        """
        held = b""
        with stack:
            writer = self.cache.writer(tuple(res.expected))
            try:
                for chunk in iter_body(resp):
                    writer.write(chunk)
                    if held:
                        yield held
                    held = chunk
                sha, size = self.cache.commit_blob(writer, res.expected, res.upstream_url)
            except Exception as exc:
                self._record_error(req, res, str(exc))
                raise
            finally:
                writer.discard()
            entry = self._index(proxy, res, resp, sha, size)
        self._record(req, res, "miss", 200, size, sha)
        self.remember(proxy.key, res, entry)
        if held:
            yield held

    def _record_error(self, req: ProxyRequest, res: Resource, msg: str) -> None:
        self.served.add(
            ServedRecord(
                key=req.key,
                path=res.path,
                cache="error",
                status=502,
                size=0,
                method=req.method,
                upstream_url=res.upstream_url,
                kind=res.kind.value,
                error=msg,
                test=self.served.current_test,
            )
        )


def _load_lock(settings: Settings) -> LockFile | None:
    """The configured lock file; required in replay mode, optional (written later) otherwise."""
    path = settings.lock_file
    if path is None:
        return None
    if path.is_file():
        return LockFile.load(path)
    if settings.mode == "replay":
        raise LockError(f"{path}: lock file not found; run in record mode to write it")
    return None


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


def _registry_error(status: int, code: str, message: str) -> Reply:
    body = json.dumps({"errors": [{"code": code, "message": message, "detail": None}]}).encode()
    return Reply(status, {"Content-Type": "application/json", **REGISTRY_HEADERS}, body=body)


def _declared_length(resp: httpx.Response) -> int | None:
    """Content-Length, when it describes the bytes we will relay (no content coding)."""
    if resp.headers.get("content-encoding", "identity").lower() not in ("", "identity"):
        return None
    try:
        return int(resp.headers["content-length"])
    except (KeyError, ValueError):
        return None
