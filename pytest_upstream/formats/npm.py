"""The npm registry API, as far as installs need it: packuments and tarballs.

Proxy layout under ``/<key>/`` (see docs/npm.md):

* ``<name>``, ``@scope%2fname`` and ``@scope/name``: the packument (metadata,
  refetched after the proxy's TTL).  The proxy always asks the upstream for
  the FULL packument and stores it raw, once per package; each request gets
  it rendered as full JSON or as the abbreviated ``install-v1`` document,
  chosen by ``Accept``, with every ``dist.tarball`` rewritten to an absolute
  URL on this proxy (npm needs absolute tarball URLs).
  An upstream 404 is remembered for the proxy's ``negative_ttl`` (at most
  its metadata TTL) and replayed.
* ``<name>/<version-or-tag>``: one version's manifest, cut from the packument.
* ``<name>/-/<file>.tgz``: a tarball (immutable artifact).  Its upstream URL
  and published digests (``dist.integrity``, ``dist.shasum``) come from the
  packument, so the proxy only fetches tarballs a packument lists, and a
  download whose bytes do not match is refused before anything is stored.
* ``-/ping`` answers ``{}``.  Every other ``-/...`` endpoint (search, audit,
  login, tokens, ...) answers 404 "not supported by this proxy" (a 4xx: npm
  retries 5xx answers for a minute); writes (publish, adduser, dist-tag,
  unpublish, the audit POST) are refused by the engine with 405.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

from pytest_upstream.config.settings import ProxyDefinition
from pytest_upstream.formats.base import (
    Format,
    FormatContext,
    FormatError,
    GroupRoute,
    Kind,
    MalformedUpstream,
    Resource,
)
from pytest_upstream.formats.hiding import Hiding, hide_npm_versions
from pytest_upstream.formats.npm_packuments import (
    ABBREVIATED,
    FULL,
    InvalidName,
    PackageName,
    PackumentView,
    abbreviate,
    choose_representation,
    dumps,
    expected_digests,
    parse_name,
    parse_packument,
    publication_time,
    rewrite_tarballs,
    split_name,
)
from pytest_upstream.formats.refusals import admit
from pytest_upstream.messages import ProxyRequest, Reply

_VERSION_SPEC = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+_\-]*")
_PACKUMENT_HEADERS = {"Accept": FULL, "Accept-Encoding": "identity"}
_TARBALL_HEADERS = {"Accept": "*/*", "Accept-Encoding": "identity"}
_ENDPOINTS = {  # first segments below /-/ -> what npm feature they belong to
    "v1": "search or login",
    "npm": "audit and token",
    "user": "login (adduser)",
    "whoami": "whoami",
    "package": "dist-tag and access",
    "org": "org",
    "team": "team",
    "all": "package listing",
}


class NpmFormat(Format):
    name = "npm"

    def describe(self, resource: Resource) -> dict[str, str]:
        name, sep, file = resource.path.partition("/-/")
        if not sep:  # a packument
            return {"name": name}
        stem = file.removesuffix(".tgz")
        base = name.rsplit("/", 1)[-1]  # tarball names leave the scope out
        version = stem[len(base) + 1 :] if stem.startswith(base + "-") else ""
        return {"name": name, "version": version} if version else {"name": name}

    def resolve(self, request: ProxyRequest, ctx: FormatContext) -> Resource | Reply:
        parts = request.path.split("/")
        if request.path in ("", "/"):
            raise FormatError(
                404, f"/{request.key}/ is an npm registry proxy: point npm's registry setting at it"
            )
        if parts[0] == "-" and len(parts) > 1:
            return self._endpoint(request, parts[1:])
        raw_name, rest = split_name(parts)
        try:
            name = parse_name(raw_name)
        except InvalidName as exc:
            raise FormatError(400, f"invalid package name: {exc}") from None
        if rest == []:
            rep = choose_representation(request.headers.get("accept"))
            return self._packument_resource(ctx.proxy, name, PackumentView(rep, request.proxy_url))
        if len(rest) == 2 and rest[0] == "-" and rest[1]:
            return self._tarball(ctx, name, rest[1])
        if len(rest) == 1 and _VERSION_SPEC.fullmatch(rest[0]):
            return self._version(ctx, name, rest[0], request)
        raise FormatError(
            404,
            f"/{request.key}/{request.path}: an npm proxy serves /{request.key}/<package>, "
            f"/{request.key}/<package>/<version> and the tarballs they list",
        )

    # -- routes -------------------------------------------------------------
    @staticmethod
    def _endpoint(request: ProxyRequest, rest: list[str]) -> Reply:
        if rest == ["ping"]:
            return Reply.json(200, {})
        what = _ENDPOINTS.get(rest[0], "registry")
        raise FormatError(
            404,
            f"/-/{'/'.join(rest)}: npm's {what} endpoint is not supported by this proxy "
            "(it serves packuments and tarballs, for installs)",
        )

    def _packument_resource(
        self, proxy: ProxyDefinition, name: PackageName, render_as: PackumentView | None = None
    ) -> Resource:
        base = proxy.url if proxy.url.endswith("/") else proxy.url + "/"
        return Resource(
            name.full,
            base + name.escaped,
            Kind.METADATA,
            request_headers=dict(_PACKUMENT_HEADERS),
            content_type=FULL,
            render_as=render_as or "",
            # an unknown package: remembered (and replayed) like the maven format does
            negative_ttl=min(proxy.negative_ttl, proxy.metadata_ttl),
        )

    def _version(self, ctx: FormatContext, name: PackageName, spec: str, request: ProxyRequest) -> Resource:
        resource = self._packument_resource(ctx.proxy, name)
        _, body = ctx.metadata(resource)
        doc = parse_packument(body, name.full)
        hiding = Hiding(ctx.proxy.policy, ctx.now())
        if ctx.proxy.policy:  # a dist-tag moved off a hidden version leads where the packument's does
            hide_npm_versions(doc, hiding)
        version = doc.get("dist-tags", {}).get(spec, spec)
        if version not in doc["versions"]:
            hidden = next((h for h in hiding.hidden if h.version == version), None)
            if hidden is not None:
                raise FormatError(
                    403,
                    f"{name.full}@{version} is {hidden.reason}",
                    reason=hidden.reason[:1].upper() + hidden.reason[1:],
                )
            raise FormatError(404, f"{name.full} has no version or dist-tag {spec!r}")
        return self._packument_resource(ctx.proxy, name, PackumentView("version", request.proxy_url, version))

    def _tarball(self, ctx: FormatContext, name: PackageName, file: str) -> Resource:
        path = f"{name.full}/-/{file}"
        policy = ctx.proxy.policy
        stem = file.removesuffix(".tgz")
        named = stem[len(name.name) + 1 :] if stem.startswith(f"{name.name}-") else None
        admit(policy.without_cooldown(), ctx.now(), name.full, named, None, f"{name.full} {file}")
        cached = ctx.cached(path)
        if cached is not None and not policy.cooldown:  # immutable: no need to consult the packument again
            return _tarball_resource(path, cached.upstream_url)
        packument = self._packument_resource(ctx.proxy, name)
        _, body = ctx.metadata(packument)
        doc = parse_packument(body, name.full)
        manifest = self._manifest_for_file(doc, name, file)
        if manifest is None:
            raise FormatError(
                404, f"{file!r} is not the tarball of any version of {name.full} listed upstream"
            )
        version = manifest.get("version")
        if policy and isinstance(version, str):
            uploaded = publication_time(doc, version)
            admit(policy, ctx.now(), name.full, version, uploaded, f"{name.full}@{version}")
        if cached is not None:
            return _tarball_resource(path, cached.upstream_url)
        dist = manifest["dist"]
        expected = expected_digests(dist)
        if not expected:
            raise MalformedUpstream(
                f"the packument of {name.full} publishes no integrity or shasum for {file!r}; "
                "refusing to serve an unverifiable tarball"
            )
        url = urljoin(packument.upstream_url, dist["tarball"])
        if urlsplit(url).scheme not in ("http", "https"):
            raise MalformedUpstream(f"the packument of {name.full} lists a non-HTTP tarball URL {url!r}")
        return _tarball_resource(path, url, expected)

    @staticmethod
    def _manifest_for_file(doc: dict[str, Any], name: PackageName, file: str) -> dict[str, Any] | None:
        prefix = f"{name.name}-"
        if file.startswith(prefix) and file.endswith(".tgz"):
            manifest = doc["versions"].get(file[len(prefix) : -len(".tgz")])
            if manifest is not None:
                return manifest  # type: ignore[no-any-return]
        for manifest in doc["versions"].values():  # a layout of the upstream's own
            upstream_file = unquote(urlsplit(manifest["dist"]["tarball"]).path.rsplit("/", 1)[-1])
            if upstream_file == file:
                return manifest  # type: ignore[no-any-return]
        return None

    def group_route(self, request: ProxyRequest, strategy: str) -> GroupRoute:
        """A tarball comes from the member whose packument the group served (its owner)."""
        name, sep, _ = request.path.partition("/-/")
        if sep and name and not request.path.startswith("-/"):
            return GroupRoute("owner", replace(request, method="GET", path=name, query=""))
        return GroupRoute()

    # -- hooks --------------------------------------------------------------
    def check(self, resource: Resource, body: bytes, headers: Mapping[str, str]) -> None:
        parse_packument(body, resource.path)

    def render(
        self, resource: Resource, body: bytes, hiding: Hiding | None = None
    ) -> tuple[bytes, str] | None:
        view = resource.render_as
        if not isinstance(view, PackumentView):
            return None  # fetched for a tarball or version look-up: never served as is
        name = parse_name(resource.path)
        doc = rewrite_tarballs(parse_packument(body, name.full), name, view.proxy_url)
        if hiding is not None:
            hide_npm_versions(doc, hiding)
        if view.representation == "abbreviated":
            return dumps(abbreviate(doc)), ABBREVIATED
        if view.representation == "version":
            version = view.version
            if version not in doc["versions"]:  # the packument changed since resolve looked
                raise FormatError(404, f"{name.full} has no version {version!r}")
            return dumps(doc["versions"][version]), FULL
        return dumps(doc), FULL

    def error(self, ctx: FormatContext, status: int, message: str, code: str = "") -> Reply:
        if status == 405:
            message += (
                "; npm publish, unpublish, adduser/login, dist-tag and audit are not supported by this "
                "proxy: it serves installs only"
            )
        return Reply.json(status, {"error": message})


def _tarball_resource(path: str, url: str, expected: dict[str, str] | None = None) -> Resource:
    return Resource(
        path,
        url,
        Kind.ARTIFACT,
        request_headers=dict(_TARBALL_HEADERS),
        expected=expected or {},
        content_type="application/octet-stream",
    )
