"""The seam every registry format plugs into.

A format module knows its URL layout (which upstream URL a proxy path maps
to), which responses are mutable metadata and which immutable content, how to
rewrite metadata so that links lead back through the proxy, and which digests
the upstream publishes.  The engine does HTTP, caching, locking and streaming
once for all of them.

A format subclasses ``Format`` and overrides ``resolve`` (required) and any
of the hooks whose default does not fit.  A format object serves every request
of every proxy of its format, on many threads at once: what a hook learns about
one request comes from that request's context (``FormatContext``), never from
state on the format object.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

from pytest_upstream.config.settings import ProxyDefinition, Settings
from pytest_upstream.formats.hiding import Hiding
from pytest_upstream.messages import ProxyRequest, Reply
from pytest_upstream.store.cache import Entry
from pytest_upstream.store.headers import KEPT_HEADERS, header_problem

if TYPE_CHECKING:
    from collections.abc import Mapping

    import httpx

    from pytest_upstream.upstream.client import UpstreamClient


def same_origin(a: str, b: str) -> bool:
    pa, pb = urlsplit(a), urlsplit(b)
    return (pa.scheme, pa.hostname, pa.port) == (pb.scheme, pb.hostname, pb.port)


class Kind(StrEnum):
    METADATA = "metadata"  # mutable: refetched after the proxy's metadata_ttl
    ARTIFACT = "artifact"  # immutable: fetched once, never refetched


class FormatError(Exception):
    """A request the format cannot serve: carries the status to answer."""

    def __init__(
        self, status: int, message: str, code: str = "", cache: str = "error", reason: str = ""
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code  # a format-specific error code (e.g. the registry's MANIFEST_UNKNOWN)
        self.cache = cache  # how the served record counts it: "error", or "hit"/"miss" for a 404
        self.reason = reason  # the status line's phrase, when the status's own words say too little


class MalformedUpstream(Exception):
    """The upstream answered 200 with bytes this format cannot use."""


@dataclass(frozen=True)
class Resource:
    """One upstream object, as the cache and the engine see it."""

    path: str  # the cache's name for it within the proxy key
    upstream_url: str
    kind: Kind
    variant: str = ""  # negotiated representation, part of the cache identity
    request_headers: dict[str, str] = field(default_factory=dict)
    expected: dict[str, str] = field(default_factory=dict)  # algorithm -> hex digest
    content_type: str | None = None  # default when the upstream sends none
    # The representation chosen for the client (e.g. HTML or JSON), for ``render`` and
    # ``reply_headers``: any hashable value (a string, a frozen dataclass), part of the render memo's key.
    render_as: Hashable = ""
    keep_headers: tuple[str, ...] = ()  # upstream response headers stored and replayed
    negative_ttl: float | None = None  # cache an upstream 404 for this long (None: never)

    def __post_init__(self) -> None:
        # Entry files, lock files and archives may carry only the headers in KEPT_HEADERS
        # (store/headers.py); a header a format keeps must be among them, or it could not be read back.
        for name in self.keep_headers:
            if name.lower() not in KEPT_HEADERS:
                raise ValueError(f"keep_headers: {name!r} is not in store.headers.KEPT_HEADERS")

    def index_entry(
        self, key: str, headers: Mapping[str, str], sha256: str, size: int, fetched_at: float
    ) -> Entry:
        """The index entry for this resource answered with ``headers`` (any case) and these bytes."""
        # What the entry readers would refuse (a control character, an over-long value) is not
        # stored, so an upstream's odd header cannot make every later read of the entry fail.
        low = {
            name.lower(): value for name, value in headers.items() if not header_problem(name, value, None)
        }
        return Entry(
            key=key,
            path=self.path,
            variant=self.variant,
            upstream_url=self.upstream_url,
            sha256=sha256,
            size=size,
            kind=self.kind.value,
            fetched_at=fetched_at,
            content_type=low.get("content-type") or self.content_type,
            etag=low.get("etag"),
            last_modified=low.get("last-modified"),
            headers={name: low[name.lower()] for name in self.keep_headers if name.lower() in low},
        )


class FormatContext(Protocol):
    """One request, as a format's hooks see it: created per request, never shared between requests."""

    request: ProxyRequest  # after routing: ``key`` is the proxy's, ``path`` what follows it
    proxy: ProxyDefinition

    def now(self) -> float:
        """The engine clock's time (seconds since the epoch): tests advance it instead of sleeping."""
        ...

    def cached(self, path: str, variant: str = "") -> Entry | None:
        """The cache entry for a path of this proxy, if one is stored and intact."""
        ...

    def metadata(self, resource: Resource) -> tuple[Entry, bytes]:
        """Obtain a metadata resource through the cache (honouring the mode)."""
        ...


@dataclass(frozen=True)
class GroupRoute:
    """How an ordered group of proxies answers one request (engine/groups.py, docs/rules.md).

    ``first``: the first member whose answer is not an absence.  ``owner``: the first member
    whose answer to ``probe`` is a 200 owns the name; the request goes to it alone.  ``merge``:
    every member is asked ``probe`` and ``Format.group_merge`` joins the 200 answers.
    """

    way: str = "first"  # "first" | "owner" | "merge"
    probe: ProxyRequest | None = None


class Format:
    """Defaults for every hook; a format overrides what differs."""

    name = ""
    # A first path segment this format claims for all its proxies (docker: "v2", the OCI API's
    # /v2/<key>/...); requests under it go to ``route`` before any proxy key is looked up.
    root_prefix = ""

    def route(
        self, request: ProxyRequest, settings: Settings
    ) -> tuple[ProxyDefinition, ProxyRequest] | Reply:
        """For a request under ``/<root_prefix>/`` (``request.path`` is what follows): the proxy
        that serves it and the request as that proxy's ``resolve`` should see it, or a reply."""
        return Reply.text(404, f"/{request.key}/ is not routed by the {self.name} format")

    def resolve(self, request: ProxyRequest, ctx: FormatContext) -> Resource | Reply:
        """Map a proxy request to an upstream resource, or answer it directly."""
        raise NotImplementedError

    def check(self, resource: Resource, body: bytes, headers: Mapping[str, str]) -> None:
        """Raise MalformedUpstream if a metadata answer (bytes and the upstream's response
        ``headers``) is not what the format expects: nothing is then stored, and a stale copy
        is served instead (an upstream failure, like a 5xx)."""

    def published_digests(self, resource: Resource, headers: Mapping[str, str]) -> dict[str, str]:
        """Digests {algo: hex} that the upstream's response headers vouch for (e.g. a
        registry's Docker-Content-Digest), verified like ``Resource.expected``: on a
        mismatch nothing is stored.  Called for responses read whole (not streamed)."""
        return {}

    def render(
        self, resource: Resource, body: bytes, hiding: Hiding | None = None
    ) -> tuple[bytes, str] | None:
        """Metadata as the client gets it (links rewritten), or None to serve the bytes as stored.

        Must depend only on ``resource.path``, ``resource.render_as``, ``body`` and ``hiding``:
        the engine memoises the result by those.  ``hiding``, when the proxy has a release policy
        (allow/block rules, ``min_age``): the releases it keeps out are taken out of the document
        and recorded in ``hiding`` (formats/hiding.py).
        """
        return None

    def reply_headers(self, resource: Resource, stored: Mapping[str, str]) -> dict[str, str]:
        """The kept upstream headers (``Resource.keep_headers``) as the client gets them, e.g.
        a pagination ``Link`` pointed back through the proxy.  Like ``render``, may use
        only ``resource`` (``render_as`` carries the client's view) and ``stored``."""
        return dict(stored)

    def upstream_error(self, resource: Resource, status: int, body: bytes) -> FormatError | None:
        """What to answer for an upstream 4xx other than 401, 403, 404 and 410, given the start
        of its body: a FormatError passing the upstream's own error on, or None for the
        engine's default (502 "answered N"; for 429 the stale copy when there is one, which
        is also served when this returns an error)."""
        return None

    def group_route(self, request: ProxyRequest, strategy: str) -> GroupRoute:
        """How a group of this format's proxies answers ``request`` (``strategy``: the group's)."""
        return GroupRoute()

    def group_merge(self, request: ProxyRequest, bodies: list[bytes]) -> tuple[bytes, str]:
        """One answer (bytes, Content-Type) from the members' 200 answers to a ``merge`` probe."""
        raise NotImplementedError(f"{self.name}: no merged answers")

    def describe(self, resource: Resource) -> dict[str, str]:
        """What a resource is, for ``--upstream-report``: e.g. ``{"name": ..., "version": ...}``
        when the path tells; ``{}`` when it does not.  Only ``path``, ``upstream_url`` and
        ``kind`` of ``resource`` are set (it is rebuilt from a served record)."""
        return {}

    def error(self, ctx: FormatContext, status: int, message: str, code: str = "") -> Reply:
        """An error in the shape this format's clients print usefully."""
        return Reply.text(status, message)

    def upstream_headers(self, ctx: FormatContext, resource: Resource) -> dict[str, str]:
        """Credentials for an upstream request: the proxy's auth mode, sent only to the
        configured URL's origin (an index may link files on other hosts, which must
        not see the credentials)."""
        if not same_origin(resource.upstream_url, ctx.proxy.url):
            return {}
        return ctx.proxy.auth.headers()

    def reauthenticate(
        self, ctx: FormatContext, resource: Resource, challenge: httpx.Response, client: UpstreamClient
    ) -> dict[str, str] | None:
        """Headers to retry with after a 401 (e.g. a registry's token flow), or None to give up."""
        return None
