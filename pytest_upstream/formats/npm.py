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

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urljoin, urlsplit

from pytest_upstream.config.release_policy import parse_time
from pytest_upstream.config.settings import ProxyDefinition
from pytest_upstream.formats.base import Format, FormatContext, FormatError, Kind, MalformedUpstream, Resource
from pytest_upstream.formats.hiding import Hiding, hide_npm_versions
from pytest_upstream.formats.refusals import admit
from pytest_upstream.messages import ProxyRequest, Reply

FULL = "application/json"
ABBREVIATED = "application/vnd.npm.install-v1+json"
MAX_NAME_LENGTH = 214
# encodeURIComponent leaves exactly these unescaped: npm's "URL-friendly" characters.
_URL_SAFE = re.compile(r"[A-Za-z0-9\-_.!~*'()]+")
_RESERVED_NAMES = frozenset({"node_modules", "favicon.ico"})
_VERSION_SPEC = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+_\-]*")
_SHA1_HEX = re.compile(r"[0-9a-fA-F]{40}")
_SRI_ALGOS = ("sha512", "sha384", "sha256", "sha1")
# Upstream requests: full packuments, and bytes exactly as published (no
# content coding to undo; the published digests are over these bytes).
_PACKUMENT_HEADERS = {"Accept": FULL, "Accept-Encoding": "identity"}
_TARBALL_HEADERS = {"Accept": "*/*", "Accept-Encoding": "identity"}
# What a version keeps in the abbreviated document (the registry's install-v1 fields).
_ABBREVIATED_FIELDS = (
    "name",
    "version",
    "deprecated",
    "dependencies",
    "optionalDependencies",
    "devDependencies",
    "bundleDependencies",
    "bundledDependencies",
    "peerDependencies",
    "peerDependenciesMeta",
    "acceptDependencies",
    "bin",
    "directories",
    "dist",
    "engines",
    "cpu",
    "os",
    "libc",
    "funding",
    "_hasShrinkwrap",
)
_INSTALL_SCRIPTS = ("preinstall", "install", "postinstall")
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


class InvalidName(ValueError):
    """A package name npm's rules refuse."""


@dataclass(frozen=True)
class PackageName:
    name: str  # the name without its scope
    scope: str = ""  # without the '@'

    @property
    def full(self) -> str:
        return f"@{self.scope}/{self.name}" if self.scope else self.name

    @property
    def escaped(self) -> str:
        """How npm puts it in a registry URL: one path segment."""
        return f"@{self.scope}%2f{self.name}" if self.scope else self.name

    def tarball_file(self, version: str) -> str:
        return f"{self.name}-{version}.tgz"


def parse_name(text: str) -> PackageName:
    """Validate a package name by npm's rules (validate-npm-package-name).

    Errors there are errors here.  Its "no longer allowed for new packages"
    rules are kept only for the length: capitals and ``~'!()*`` stay allowed,
    because old packages that installs still need have them (``JSONStream``).
    """
    if not text:
        raise InvalidName("a package name cannot be empty")
    if len(text) > MAX_NAME_LENGTH:
        raise InvalidName(f"a package name cannot be longer than {MAX_NAME_LENGTH} characters")
    if text[0] in "._":
        raise InvalidName(f"package name {text!r} cannot start with a period or an underscore")
    if text.lower() in _RESERVED_NAMES:
        raise InvalidName(f"{text!r} is a reserved name")
    if text.startswith("@"):
        scope, slash, name = text[1:].partition("/")
        if not slash or not scope or not name:
            raise InvalidName(f"scoped package name {text!r} must have the form @scope/name")
        parts = [("scope", scope), ("name", name)]
    else:
        scope, name = "", text
        parts = [("name", name)]
    for what, part in parts:
        if not _URL_SAFE.fullmatch(part):
            raise InvalidName(
                f"package name {text!r}: the {what} can only contain URL-friendly characters "
                "(letters, digits and -._~!*'())"
            )
        if part[0] == ".":
            raise InvalidName(f"package name {text!r}: the {what} cannot start with a period")
    return PackageName(name=name, scope=scope)


def split_name(parts: list[str]) -> tuple[str, list[str]]:
    """The package name at the start of a proxy path (scoped names take two segments) and the rest."""
    if parts[0].startswith("@"):
        if len(parts) < 2:
            return parts[0], []  # refused by parse_name: a scope without a name
        return f"{parts[0]}/{parts[1]}", parts[2:]
    return parts[0], parts[1:]


def sri_to_hex(integrity: str) -> dict[str, str]:
    """Subresource-integrity string (``sha512-<base64> ...``) -> {algorithm: hex}.

    Unknown algorithms are ignored; a known one with bad base64 or the wrong
    length raises MalformedUpstream.
    """
    out: dict[str, str] = {}
    for token in integrity.split():
        algo, dash, value = token.partition("-")
        algo = algo.lower()
        if not dash or algo not in _SRI_ALGOS:
            continue
        value = value.split("?", 1)[0]  # SRI options
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise MalformedUpstream(f"integrity {token!r} is not valid base64") from None
        if len(raw) != {"sha512": 64, "sha384": 48, "sha256": 32, "sha1": 20}[algo]:
            raise MalformedUpstream(f"integrity {token!r} has the wrong length for {algo}")
        hexed = raw.hex()
        if out.get(algo, hexed) != hexed:
            raise MalformedUpstream(f"integrity {integrity!r} gives two different {algo} digests")
        out[algo] = hexed
    return out


def expected_digests(dist: dict[str, Any]) -> dict[str, str]:
    """What a tarball must hash to: ``dist.integrity`` plus ``dist.shasum`` (sha1)."""
    expected: dict[str, str] = {}
    integrity = dist.get("integrity")
    if isinstance(integrity, str):
        expected.update(sri_to_hex(integrity))
    shasum = dist.get("shasum")
    if isinstance(shasum, str) and shasum:
        if not _SHA1_HEX.fullmatch(shasum):
            raise MalformedUpstream(f"shasum {shasum!r} is not a sha1 hex digest")
        if expected.get("sha1", shasum.lower()) != shasum.lower():
            raise MalformedUpstream("dist.integrity and dist.shasum disagree about the sha1 digest")
        expected["sha1"] = shasum.lower()
    return expected


def choose_representation(accept: str | None) -> str:
    """'abbreviated' when Accept prefers npm's install-v1 type, else 'full' (the registry's default)."""
    q_abbreviated = 0.0
    q_full = 0.0
    for part in (accept or "").split(","):
        media, *params = [p.strip() for p in part.split(";")]
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        media = media.lower()
        if media == ABBREVIATED:
            q_abbreviated = max(q_abbreviated, q)
        elif media in (FULL, "application/*", "*/*"):
            q_full = max(q_full, q)
    return "abbreviated" if q_abbreviated > 0 and q_abbreviated >= q_full else "full"


def parse_packument(body: bytes, expected_name: str) -> dict[str, Any]:
    """The packument as a dict, checked for what the proxy relies on; MalformedUpstream if unusable."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedUpstream(f"packument of {expected_name!r} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise MalformedUpstream(f"packument of {expected_name!r} is not a JSON object")
    named = doc.get("name", doc.get("_id"))
    if named != expected_name:
        raise MalformedUpstream(f"packument of {expected_name!r} names another package: {named!r}")
    if "versions" not in doc:
        time = doc.get("time")
        if isinstance(time, dict) and "unpublished" in time:
            doc["versions"] = {}  # an unpublished package: no versions left
        else:
            raise MalformedUpstream(f"packument of {expected_name!r} has no 'versions'")
    versions = doc["versions"]
    if not isinstance(versions, dict):
        raise MalformedUpstream(f"packument of {expected_name!r}: 'versions' is not an object")
    for version, manifest in versions.items():
        where = f"packument of {expected_name!r}, version {version!r}"
        if not isinstance(manifest, dict):
            raise MalformedUpstream(f"{where} is not an object")
        dist = manifest.get("dist")
        if not isinstance(dist, dict):
            raise MalformedUpstream(f"{where} has no 'dist' object")
        if not isinstance(dist.get("tarball"), str) or not dist["tarball"]:
            raise MalformedUpstream(f"{where} has no 'dist.tarball'")
    tags = doc.get("dist-tags", {})
    if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
        raise MalformedUpstream(f"packument of {expected_name!r}: 'dist-tags' is not an object of strings")
    return doc


def rewrite_tarballs(doc: dict[str, Any], name: PackageName, proxy_url: str) -> dict[str, Any]:
    """Point every ``dist.tarball`` at ``<proxy_url>/<name>/-/<name>-<version>.tgz`` (in place)."""
    base = proxy_url.rstrip("/")
    for version, manifest in doc["versions"].items():
        file = quote(name.tarball_file(version), safe="+")
        manifest["dist"]["tarball"] = f"{base}/{name.full}/-/{file}"
    return doc


def abbreviate(doc: dict[str, Any]) -> dict[str, Any]:
    """The install-v1 ("corgi") document derived from a full packument."""
    out: dict[str, Any] = {"name": doc["name"] if "name" in doc else doc.get("_id")}
    modified = doc.get("modified")
    time = doc.get("time")
    if modified is None and isinstance(time, dict):
        modified = time.get("modified")
    if isinstance(modified, str):
        out["modified"] = modified
    out["dist-tags"] = doc.get("dist-tags", {})
    versions: dict[str, Any] = {}
    for version, manifest in doc["versions"].items():
        short = {k: manifest[k] for k in _ABBREVIATED_FIELDS if k in manifest}
        scripts = manifest.get("scripts")
        if manifest.get("hasInstallScript") is True or (
            isinstance(scripts, dict) and any(s in scripts for s in _INSTALL_SCRIPTS)
        ):
            short["hasInstallScript"] = True
        versions[version] = short
    out["versions"] = versions
    return out


@dataclass(frozen=True)
class PackumentView:
    """How one client gets a packument (``Resource.render_as``): the representation, and the
    proxy URL the client used, because rendered tarball URLs are absolute."""

    representation: str  # "full", "abbreviated", or "version" (one version's manifest)
    proxy_url: str
    version: str = ""


def _dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


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
            return Resource(
                path,
                cached.upstream_url,
                Kind.ARTIFACT,
                request_headers=dict(_TARBALL_HEADERS),
                content_type="application/octet-stream",
            )
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
            raw_times = doc.get("time")
            times: dict[str, Any] = raw_times if isinstance(raw_times, dict) else {}
            admit(
                policy,
                ctx.now(),
                name.full,
                version,
                parse_time(times.get(version)),
                f"{name.full}@{version}",
            )
        if cached is not None:
            return Resource(
                path,
                cached.upstream_url,
                Kind.ARTIFACT,
                request_headers=dict(_TARBALL_HEADERS),
                content_type="application/octet-stream",
            )
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
        return Resource(
            path,
            url,
            Kind.ARTIFACT,
            request_headers=dict(_TARBALL_HEADERS),
            expected=expected,
            content_type="application/octet-stream",
        )

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
            return _dumps(abbreviate(doc)), ABBREVIATED
        if view.representation == "version":
            version = view.version
            if version not in doc["versions"]:  # the packument changed since resolve looked
                raise FormatError(404, f"{name.full} has no version {version!r}")
            return _dumps(doc["versions"][version]), FULL
        return _dumps(doc), FULL

    def error(self, ctx: FormatContext, status: int, message: str, code: str = "") -> Reply:
        if status == 405:
            message += (
                "; npm publish, unpublish, adduser/login, dist-tag and audit are not supported by this "
                "proxy: it serves installs only"
            )
        return Reply.json(status, {"error": message})
