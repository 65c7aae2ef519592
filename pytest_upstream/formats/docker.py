"""The pull side of the OCI distribution API (registry API v2), for Docker Hub and any OCI registry.

Proxy layout under ``/v2/<key>/``: the format claims the ``v2`` root prefix
(``DockerFormat.route``), so the engine hands it every ``/v2/...`` request and
it picks the proxy, then resolves ``<rest>`` of ``/v2/<key>/<rest>``; ``<name>``
is the repository name as the client spells it, mapped to ``library/<name>``
for official Docker Hub images.  The registry mirror proxy
(``Settings.registry_mirror``) is also reached without its key,
``/v2/<name>/...`` (``request.keyless``), when the first component of
``<name>`` is not a docker proxy's key:

* ``<name>/manifests/<tag>``: metadata (refetched after the proxy's TTL),
  cached once per *negotiated media type*: the variant is the client's
  ``Accept`` header, merged over repeated lines and normalised (media types
  lower-cased, parameters kept, duplicates dropped, sorted).  The variant is
  chosen before the upstream answers, so it cannot be the returned
  ``Content-Type``; two clients that accept the same set of types share an
  entry, and a client that accepts only single-platform manifests never gets
  a cached index (registries answer differently per Accept: distribution
  converts a manifest list to schema 1 or 404s an OCI index without it).
  The bytes are passed through unchanged, with ``Content-Type`` and
  ``Docker-Content-Digest`` replayed; a body whose digest does not match the
  upstream's ``Docker-Content-Digest`` is refused and nothing is stored.
* ``<name>/manifests/<digest>`` and ``<name>/blobs/<digest>``: immutable
  artifacts, verified against the digest in the URL (``sha256`` or
  ``sha512``).  Manifests by digest are asked for with every manifest type in
  ``Accept`` so the registry returns the stored bytes, whatever the client sent.
* ``<name>/tags/list``: metadata, one entry per page (``n`` and ``last`` are
  passed on, in that order); the upstream's ``Link: <…>; rel="next"`` is kept
  and served pointing back through the proxy, spelled as the client asked.

Everything else is refused with the registry's JSON errors; pushes get
``405 UNSUPPORTED``.  Upstream 4xx answers other than 401/403/404/410 pass the
registry's own error code and message on with the upstream's status (a 429
still serves a stale copy when there is one).  Upstream auth: ``bearer`` sends a static token; ``basic``
sends the credentials directly (htpasswd registries) and to the token realm;
any mode follows a ``WWW-Authenticate: Bearer`` challenge by fetching a token
from the realm, cached per (proxy, repository scope) until it expires (``docker_auth``).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, quote

from pytest_upstream.config.settings import ProxyDefinition, Settings
from pytest_upstream.formats.base import Format, FormatContext, FormatError, Kind, MalformedUpstream, Resource
from pytest_upstream.formats.docker_auth import Tokens
from pytest_upstream.formats.docker_tags import hidden_tag_list, rewrite_link, tags_query
from pytest_upstream.formats.hiding import Hiding
from pytest_upstream.formats.refusals import admit, admit_project
from pytest_upstream.messages import ProxyRequest, Reply

if TYPE_CHECKING:
    from collections.abc import Mapping

    import httpx

    from pytest_upstream.upstream.client import UpstreamClient

log = logging.getLogger("pytest_upstream.docker")

API_HEADERS = {"Docker-Distribution-API-Version": "registry/2.0"}
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
MANIFEST_TYPES = (
    OCI_INDEX,
    OCI_MANIFEST,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    DOCKER_SCHEMA1_SIGNED,
    DOCKER_SCHEMA1,
)
# Asked for when the bytes are pinned by a digest: the registry must not convert.
ALL_MANIFESTS_ACCEPT = ", ".join(MANIFEST_TYPES)
DIGEST_HEADER = "Docker-Content-Digest"

MAX_NAME = 255  # <key>/<name>, as the client sees the repository
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
NAME_RE = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_DIGEST_ANY = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
DIGEST_HEX = {"sha256": 64, "sha512": 128}


# -- validation --------------------------------------------------------------------------
def name_problem(key: str, name: str) -> str | None:
    """Why ``name`` is not a valid repository name behind proxy ``key`` ("": keyless), or None."""
    if not name:
        return "the repository name is empty"
    shown = f"{key}/{name}" if key else name
    if len(shown) > MAX_NAME:
        return (
            f"the repository name {shown[:40]}... is {len(shown)} characters long "
            f"(at most {MAX_NAME}{', counting the proxy key' if key else ''})"
        )
    if NAME_RE.fullmatch(name) is None:
        return (
            f"invalid repository name {name!r}: path components are lower-case letters and digits, "
            "separated by '.', '_', '__' or dashes"
        )
    return None


def parse_digest(value: str) -> tuple[str, str]:
    """(algorithm, hex) of a supported digest; FormatError (400) otherwise."""
    algo, sep, encoded = value.partition(":")
    if sep and algo in DIGEST_HEX:
        if len(encoded) == DIGEST_HEX[algo] and re.fullmatch(r"[0-9a-f]+", encoded):
            return algo, encoded
        raise FormatError(
            400,
            f"invalid digest {value!r}: {algo} digests are {DIGEST_HEX[algo]} lower-case hex digits",
            code="DIGEST_INVALID",
        )
    if _DIGEST_ANY.fullmatch(value):
        raise FormatError(
            400, f"unsupported digest algorithm {algo!r} in {value!r} (sha256 or sha512)", code="UNSUPPORTED"
        )
    raise FormatError(400, f"invalid digest {value!r}: expected sha256:<64 hex>", code="DIGEST_INVALID")


def normalize_accept(value: str | None) -> str:
    """The client's Accept (repeated lines already joined by ', ') as one canonical line."""
    if not value:
        return ""
    seen: set[str] = set()
    for part in value.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        if not media:
            continue
        item = ";".join([media.lower(), *(p.replace(" ", "") for p in params if p)])
        seen.add(item)
    return ", ".join(sorted(seen))


def _base_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


@dataclass(frozen=True)
class _Target:
    """What a request is about, for error messages: read from the request itself, so an error
    names the image of the request that failed, never one served earlier on the same thread."""

    what: str  # "manifest" | "blob" | "tags"
    image: str  # <key>/<name> (or <name> when keyless) as the client spells it
    reference: str


def _target(request: ProxyRequest) -> _Target | None:
    """The manifest, blob or tag list a request path names (as ``resolve`` reads it), or None."""
    parts = request.path.rstrip("/").split("/")
    if len(parts) < 3:
        return None
    name = _client_name(request, "/".join(parts[:-2]))
    if parts[-2] == "manifests":
        return _Target("manifest", name, parts[-1])
    if parts[-2] == "blobs":
        return _Target("blob", name, parts[-1])
    if parts[-2:] == ["tags", "list"]:
        return _Target("tags", name, "tags/list")
    return None


def _client_name(request: ProxyRequest, name: str) -> str:
    """The repository as the client addressed it: ``<key>/<name>``, or ``<name>`` when keyless."""
    return name if request.keyless else f"{request.client_key}/{name}"


class DockerFormat(Format):
    name = "docker"
    root_prefix = "v2"  # /v2/<key>/<name>/... is the OCI distribution API: the key comes second

    def describe(self, resource: Resource) -> dict[str, str]:
        for marker, field_name in (("/manifests/", "reference"), ("/blobs/", "digest")):
            name, sep, ref = resource.path.partition(marker)
            if sep:
                return {"name": name, field_name: ref}
        name, sep, _ = resource.path.partition("/tags/list")
        return {"name": name} if sep else {}

    def __init__(self) -> None:
        self._tokens = Tokens()

    # -- routing -----------------------------------------------------------------------
    def route(
        self, request: ProxyRequest, settings: Settings
    ) -> tuple[ProxyDefinition, ProxyRequest] | Reply:
        """``/v2/<key>/<rest>`` to the docker proxy ``<key>``; when the first component is not a
        docker proxy's key, the whole path is a repository of the registry mirror proxy
        (``Settings.registry_mirror``), as the Docker daemon's ``registry-mirrors`` and
        containerd mirrors ask for it."""
        if request.path == "":
            return Reply(200, {"Content-Type": "application/json", **API_HEADERS}, body=b"{}")
        key, _, rest = request.path.partition("/")
        proxy = settings.proxy(key)
        keyless = proxy is None or proxy.format != self.name
        if keyless:
            proxy, rest = settings.registry_mirror(), request.path
        if proxy is None:
            known = ", ".join(p.key for p in settings.proxies if p.format == self.name) or "none"
            return _error_reply(
                404,
                "NAME_UNKNOWN",
                f"no docker upstream proxy with key {key!r} (configured: {known}), and no registry "
                "mirror for keyless /v2/<name>/... (mark a docker proxy with mirror = true)",
            )
        return proxy, replace(request, key=proxy.key, path=rest, keyless=keyless)

    # -- resolve ---------------------------------------------------------------------
    def resolve(self, request: ProxyRequest, ctx: FormatContext) -> Resource | Reply:
        key, path = request.key, request.path
        root = "/v2" if request.keyless else f"/v2/{request.client_key}"
        if path in ("", "/"):  # /v2/<key>/: the API version check, scoped to one proxy
            return Reply(200, {"Content-Type": "application/json", **API_HEADERS}, body=b"{}")
        parts = path.rstrip("/").split("/")
        if ["blobs", "uploads"] in (parts[-2:], parts[-3:-1]):
            raise FormatError(405, f"{key!r} is a read-only upstream proxy: blob uploads are not accepted")
        if len(parts) >= 3 and parts[-2] == "manifests":
            return self._manifest(request, ctx, "/".join(parts[:-2]), parts[-1])
        if len(parts) >= 3 and parts[-2] == "blobs":
            return self._blob(request, ctx, "/".join(parts[:-2]), parts[-1])
        if len(parts) >= 3 and parts[-2:] == ["tags", "list"]:
            return self._tags(request, ctx, "/".join(parts[:-2]))
        if parts[0] == "_catalog":
            raise FormatError(404, "the proxy does not list repositories (_catalog)", code="UNSUPPORTED")
        raise FormatError(
            404,
            f"{root}/{path}: a docker proxy serves {root}/<name>/manifests/<reference>, "
            f"{root}/<name>/blobs/<digest> and {root}/<name>/tags/list",
            code="UNSUPPORTED",
        )

    def _upstream_name(self, request: ProxyRequest, proxy: ProxyDefinition, name: str) -> str:
        if problem := name_problem("" if request.keyless else proxy.key, name):
            raise FormatError(400, problem, code="NAME_INVALID")
        if proxy.source == "dockerhub" and "/" not in name:
            return f"library/{name}"  # official images live in the library namespace
        return name

    @staticmethod
    def _url(proxy: ProxyDefinition, name: str, rest: str) -> str:
        base = proxy.url.rstrip("/")
        if base.endswith("/v2"):
            base = base[: -len("/v2")]
        return f"{base}/v2/{name}/{rest}"

    def _manifest(self, request: ProxyRequest, ctx: FormatContext, name: str, reference: str) -> Resource:
        proxy = ctx.proxy
        upstream = self._upstream_name(request, proxy, name)
        if ":" in reference:
            admit_project(proxy.policy, upstream, name)  # a digest names no tag: the name's rules
            algo, hexdigest = parse_digest(reference)
            client_accept = normalize_accept(request.headers.get("accept"))
            accept = normalize_accept(f"{client_accept}, {ALL_MANIFESTS_ACCEPT}")
            return Resource(
                f"{upstream}/manifests/{reference}",
                self._url(proxy, upstream, f"manifests/{reference}"),
                Kind.ARTIFACT,
                request_headers={"Accept": accept},
                expected={algo: hexdigest},
                content_type=OCI_MANIFEST,
                keep_headers=(DIGEST_HEADER,),
            )
        if TAG_RE.fullmatch(reference) is None:
            raise FormatError(
                400,
                f"invalid tag {reference!r}: tags are up to 128 letters, digits, '_', '.' and '-'",
                code="NAME_INVALID",
            )
        admit(proxy.policy, ctx.now(), upstream, reference, None, f"{name}:{reference}")
        accept = normalize_accept(request.headers.get("accept"))
        return Resource(
            f"{upstream}/manifests/{reference}",
            self._url(proxy, upstream, f"manifests/{quote(reference)}"),
            Kind.METADATA,
            variant=accept,
            request_headers={"Accept": accept} if accept else {},
            keep_headers=(DIGEST_HEADER,),
        )

    def _blob(self, request: ProxyRequest, ctx: FormatContext, name: str, digest: str) -> Resource:
        proxy = ctx.proxy
        upstream = self._upstream_name(request, proxy, name)
        admit_project(proxy.policy, upstream, name)
        algo, hexdigest = parse_digest(digest)
        return Resource(
            f"{upstream}/blobs/{digest}",
            self._url(proxy, upstream, f"blobs/{digest}"),
            Kind.ARTIFACT,
            expected={algo: hexdigest},
            keep_headers=(DIGEST_HEADER,),
        )

    def _tags(self, request: ProxyRequest, ctx: FormatContext, name: str) -> Resource:
        proxy = ctx.proxy
        client = _client_name(request, name)
        upstream = self._upstream_name(request, proxy, name)
        admit_project(proxy.policy, upstream, name)
        query = tags_query(parse_qsl(request.query, keep_blank_values=True))
        query = f"?{query}" if query else ""
        return Resource(  # one entry per page; render_as: where the client's next page is
            f"{upstream}/tags/list{query}",
            self._url(proxy, upstream, f"tags/list{query}"),
            Kind.METADATA,
            content_type="application/json",
            render_as=f"/v2/{client}/tags/list",
            keep_headers=("Link",),
        )

    # -- replies ----------------------------------------------------------------------
    def render(
        self, resource: Resource, body: bytes, hiding: Hiding | None = None
    ) -> tuple[bytes, str] | None:
        """A tag list without the tags a policy keeps out; everything else as stored."""
        return hidden_tag_list(resource.path, body, hiding)

    def reply_headers(self, resource: Resource, stored: Mapping[str, str]) -> dict[str, str]:
        """A tag list's ``Link: <…/tags/list?n=…&last=…>; rel="next"`` leads back through the proxy."""
        out = dict(stored)
        link = out.pop("Link", None)
        if link is not None and isinstance(resource.render_as, str) and resource.render_as:
            if rewritten := rewrite_link(link, resource.render_as):
                out["Link"] = rewritten
            else:
                log.warning(
                    "dropped upstream Link %r of %s: no next page the proxy can serve",
                    link,
                    resource.upstream_url,
                )
        return out

    def upstream_error(self, resource: Resource, status: int, body: bytes) -> FormatError | None:
        """The registry's own error (code and message) with its status; 407 and 408 stay 502."""
        if status in (407, 408):
            return None
        code, message = _first_error(body)
        text = f"upstream {resource.upstream_url} answered {status}"
        text += f" {code}" if code else ""
        text += f": {message}" if message else ""
        return FormatError(status, text, code=code or _CODES.get(status, "UNKNOWN"))

    # -- verification -----------------------------------------------------------------
    def check(self, resource: Resource, body: bytes, headers: Mapping[str, str]) -> None:
        """Tag lists and manifests by tag must be JSON objects (an HTML login page is not); a
        manifest must be of a manifest media type the client accepts, its body's ``mediaType``
        (when it has one) must agree, and its digest (``published_digests``) must match."""
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise MalformedUpstream(f"{resource.upstream_url} did not answer a JSON object")
        if "/manifests/" in resource.path:
            _check_manifest_type(resource, data, _base_type(headers.get("content-type")))

    def published_digests(self, resource: Resource, headers: Mapping[str, str]) -> dict[str, str]:
        """A manifest fetched by tag must match the upstream's Docker-Content-Digest."""
        if "/manifests/" not in resource.path or resource.kind is not Kind.METADATA:
            return {}
        value = headers.get(DIGEST_HEADER)
        if not value:
            return {}
        # A signed schema 1 manifest's digest covers the payload without its signatures.
        if _base_type(headers.get("content-type")) == DOCKER_SCHEMA1_SIGNED:
            return {}
        try:
            algo, hexdigest = parse_digest(value.strip())
        except FormatError:
            log.warning("ignoring unusable %s %r from %s", DIGEST_HEADER, value, resource.upstream_url)
            return {}
        return {algo: hexdigest}

    # -- errors -----------------------------------------------------------------------
    def error(self, ctx: FormatContext, status: int, message: str, code: str = "") -> Reply:
        target = _target(ctx.request) if status != 405 else None
        if target is not None:
            shown = target.image
            if target.what != "tags":  # image:tag or image@digest
                shown += ("@" if ":" in target.reference else ":") + target.reference
            message = f"{target.what} {shown}: {message}"
        return _error_reply(status, code or _default_code(status, target), message)

    # -- upstream auth ------------------------------------------------------------------
    def upstream_headers(self, ctx: FormatContext, resource: Resource) -> dict[str, str]:
        if ctx.proxy.auth.mode != "bearer":
            token = self._tokens.cached(ctx, resource)
            if token is not None:
                return {"Authorization": f"Bearer {token}"}
        return ctx.proxy.auth.headers()

    def reauthenticate(
        self, ctx: FormatContext, resource: Resource, challenge: httpx.Response, client: UpstreamClient
    ) -> dict[str, str] | None:
        return self._tokens.fetch(ctx, resource, challenge, client)


def _check_manifest_type(resource: Resource, data: dict[str, object], ctype: str) -> None:
    """MalformedUpstream unless a manifest's media type is a manifest type the client accepted.

    The type is the answer's Content-Type, else the body's ``mediaType``.  Schema 1 (what a
    registry converts to for a client that accepts nothing newer) is always allowed; otherwise,
    when the client's Accept (the variant) names manifest types, the answer's must be one.
    """
    declared = data.get("mediaType")
    media = ctype if ctype in MANIFEST_TYPES else declared if isinstance(declared, str) else ""
    if media == "" and data.get("schemaVersion") == 1:
        media = DOCKER_SCHEMA1
    if media not in MANIFEST_TYPES:
        shown = ctype or "none"
        raise MalformedUpstream(f"{resource.upstream_url} answered Content-Type {shown}, not a manifest")
    if isinstance(declared, str) and declared and declared != media:
        raise MalformedUpstream(
            f"{resource.upstream_url} answered Content-Type {media} for a manifest of type {declared}"
        )
    accepted = {part.split(";", 1)[0] for part in resource.variant.split(", ") if part}
    if (
        accepted & set(MANIFEST_TYPES)
        and media not in accepted
        and media
        not in (
            DOCKER_SCHEMA1,
            DOCKER_SCHEMA1_SIGNED,
        )
    ):
        raise MalformedUpstream(
            f"{resource.upstream_url} answered a {media} manifest, which the client did not accept"
        )


def _error_reply(status: int, code: str, message: str) -> Reply:
    """The registry API's JSON error, which docker and containerd print."""
    body = json.dumps({"errors": [{"code": code, "message": message, "detail": None}]}).encode()
    return Reply(status, {"Content-Type": "application/json; charset=utf-8", **API_HEADERS}, body=body)


_ERROR_CODE = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
_MAX_MESSAGE = 300


def _first_error(body: bytes) -> tuple[str, str]:
    """(code, message) of a registry's ``{"errors": [{"code": …, "message": …}]}`` answer."""
    try:
        first = json.loads(body)["errors"][0]
        code, message = first.get("code"), first.get("message")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return "", ""
    code = code if isinstance(code, str) and _ERROR_CODE.fullmatch(code) else ""
    message = " ".join(message.split())[:_MAX_MESSAGE] if isinstance(message, str) else ""
    return code, message


_CODES = {401: "UNAUTHORIZED", 403: "DENIED", 405: "UNSUPPORTED", 429: "TOOMANYREQUESTS", 501: "UNSUPPORTED"}
_UNKNOWN = {"manifest": "MANIFEST_UNKNOWN", "blob": "BLOB_UNKNOWN", "tags": "NAME_UNKNOWN"}


def _default_code(status: int, target: _Target | None) -> str:
    if status == 404:
        return _UNKNOWN[target.what] if target is not None else "NAME_UNKNOWN"
    if status == 400:
        return "NAME_INVALID"
    if status in (503, 504):
        return "UNAVAILABLE"
    return _CODES.get(status, "UNKNOWN")
