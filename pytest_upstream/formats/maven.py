"""Maven 2 repository layout (what Maven, Gradle, sbt and Ivy resolvers fetch).

Proxy layout under ``/<key>/``: the upstream's own layout, unchanged, so
``/<key>/<group path>/<artifactId>/<version>/<file>`` is fetched from
``<url>/<group path>/<artifactId>/<version>/<file>``.

* Release files (``.jar``, ``.pom``, ``.asc`` …) are immutable artifacts.
  Before one is fetched, its ``.sha1`` is obtained through the cache (a 404
  means the upstream publishes none, which is not an error); the artifact
  must then match it, else the answer is a 502 and nothing is stored.
* ``maven-metadata.xml`` (group, artifact and version level), everything in a
  ``-SNAPSHOT`` version directory (including timestamped files) and the
  repository-wide ``archetype-catalog.xml`` / ``.meta/prefixes.txt`` are
  metadata, refetched after the proxy's ``metadata_ttl``.  Timestamped
  SNAPSHOT files are verified against their ``.sha1`` too; the other
  metadata is not (it and its checksum change together and are fetched at
  different moments).  ``maven-metadata.xml`` must parse as XML without a
  DOCTYPE, else nothing is stored (502).
* Checksum files (``.sha1``, ``.md5``, ``.sha256``, ``.sha512``) are passed
  through unchanged, with the kind of the file they describe.
* An upstream 404 is remembered for the proxy's ``negative_ttl`` (for
  metadata at most its ``metadata_ttl``), and answered from the record in
  replay mode: Maven asks every repository for files it does not have.
"""

from __future__ import annotations

import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import replace
from urllib.parse import quote

from pytest_upstream.config.maven_versions import version_key
from pytest_upstream.formats.base import (
    Format,
    FormatContext,
    FormatError,
    GroupRoute,
    Kind,
    MalformedUpstream,
    Resource,
)
from pytest_upstream.formats.hiding import Hiding, hide_maven_versions
from pytest_upstream.formats.refusals import admit, admit_project
from pytest_upstream.messages import ProxyRequest, Reply

log = logging.getLogger("pytest_upstream")

METADATA_FILE = "maven-metadata.xml"
SNAPSHOT = "SNAPSHOT"
# extension -> (hashlib name, hex length); checksum files are served as they are
CHECKSUMS = {
    ".sha1": ("sha1", 40),
    ".md5": ("md5", 32),
    ".sha256": ("sha256", 64),
    ".sha512": ("sha512", 128),
}
# the checksum a download is verified against: repositories commonly publish .sha1
# for every file (Central has .sha256/.sha512 for some only), and Maven asks for
# it itself, so the fetch is shared with the client's
VERIFY_WITH = ".sha1"
# repository-wide files outside any coordinate (metadata)
_ROOT_FILES = ("archetype-catalog.xml", ".meta/prefixes.txt")
# groupId / artifactId characters (Maven's model validator) plus what versions
# and file names use; a segment starts with a letter, digit or underscore
_SEGMENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+~-]*\Z")
_MAX_SEGMENT = 255
_MAX_PATH = 2048
_TIMESTAMPED = re.compile(r"-\d{8}\.\d{6}-\d+")
_CONTENT_TYPES = {
    ".pom": "application/xml",
    ".xml": "application/xml",
    ".jar": "application/java-archive",
    ".war": "application/java-archive",
    ".asc": "application/pgp-signature",
    ".txt": "text/plain; charset=utf-8",
    ".module": "application/json",
    **dict.fromkeys(CHECKSUMS, "text/plain"),
}


class BadMavenPath(FormatError):
    def __init__(self, path: str, why: str) -> None:
        super().__init__(400, f"not a Maven repository path: /{path}: {why}")


def split_checksum(filename: str) -> tuple[str, str]:
    """(the file a checksum file describes, its checksum extension), or (filename, "")."""
    for ext in CHECKSUMS:
        if filename.endswith(ext) and len(filename) > len(ext):
            return filename[: -len(ext)], ext
    return filename, ""


def parse_checksum(body: bytes, ext: str) -> str | None:
    """The hex digest in a checksum file (``hex``, ``hex  name``, ``hex *name``…), or None."""
    _, length = CHECKSUMS[ext]
    text = body[:4096].decode("ascii", errors="replace")
    match = re.search(rf"(?<![0-9A-Fa-f])[0-9A-Fa-f]{{{length}}}(?![0-9A-Fa-f])", text)
    return match.group(0).lower() if match else None


def check_metadata_xml(body: bytes, what: str) -> None:
    """Raise MalformedUpstream unless ``body`` is a ``<metadata>`` document without DTD tricks.

    Only ASCII-compatible encodings are accepted (Maven writes UTF-8), so that a
    byte search finds every DOCTYPE or ENTITY declaration (entity expansion
    bombs, external entities) before the parser sees the document.
    """
    if body.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in body:
        raise MalformedUpstream(f"{what}: maven-metadata.xml is not UTF-8")
    if b"<!DOCTYPE" in body or b"<!ENTITY" in body:
        raise MalformedUpstream(f"{what}: maven-metadata.xml with a DOCTYPE or ENTITY declaration refused")
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise MalformedUpstream(f"{what}: maven-metadata.xml is not well-formed XML: {exc}") from None
    if root.tag.rsplit("}", 1)[-1] != "metadata":
        raise MalformedUpstream(f"{what}: maven-metadata.xml has root <{root.tag}>, not <metadata>")


def merge_metadata(bodies: list[bytes]) -> bytes:
    """One maven-metadata.xml listing the versions of all of ``bodies`` (a group's members, each
    already checked safe), first seen first; ``latest``/``release`` the newest in Maven's order,
    ``lastUpdated`` the latest.  Group and artifact ids come from the first document."""
    roots = [ET.fromstring(body) for body in bodies]
    first = roots[0]
    ns = _ns(first)
    if any(root.find(f"{_ns(root)}plugins") is not None for root in roots):
        return _merge_plugins(roots)
    if any(root.find(f"{_ns(root)}versioning/{_ns(root)}versions") is None for root in roots):
        return bodies[0]  # a SNAPSHOT's own metadata names one member's builds: the first's
    versions: dict[str, None] = {}
    updated = []
    for root in roots:
        rns = _ns(root)
        for element in root.iter(f"{rns}version"):
            if element.text and element.text.strip():
                versions[element.text.strip()] = None
        updated += [
            e.text.strip() for e in root.iter(f"{rns}lastUpdated") if e.text and e.text.strip().isdigit()
        ]
    out = ET.Element("metadata", {"xmlns": ns[1:-1]} if ns else {})
    for tag in ("groupId", "artifactId"):
        if (text := first.findtext(f"{ns}{tag}")) is not None:
            ET.SubElement(out, tag).text = text
    versioning = ET.SubElement(out, "versioning")
    listed = list(versions)
    releases = [v for v in listed if not v.upper().endswith("-SNAPSHOT")]
    if listed:
        ET.SubElement(versioning, "latest").text = max(listed, key=version_key)
    if releases:
        ET.SubElement(versioning, "release").text = max(releases, key=version_key)
    holder = ET.SubElement(versioning, "versions")
    for version in listed:
        ET.SubElement(holder, "version").text = version
    if updated:
        ET.SubElement(versioning, "lastUpdated").text = max(updated)
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(out, encoding="unicode").encode()


def _ns(root: ET.Element) -> str:
    return root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""


def _merge_plugins(roots: list[ET.Element]) -> bytes:
    """A group-level maven-metadata.xml (plugin prefixes): the union of the plugins, by artifact."""
    out = ET.Element("metadata")
    plugins = ET.SubElement(out, "plugins")
    seen = set()
    for root in roots:
        ns = _ns(root)
        for plugin in root.iter(f"{ns}plugin"):
            artifact = plugin.findtext(f"{ns}artifactId") or ""
            if artifact in seen:
                continue
            seen.add(artifact)
            copy = ET.SubElement(plugins, "plugin")
            for tag in ("name", "prefix", "artifactId"):
                if (text := plugin.findtext(f"{ns}{tag}")) is not None:
                    ET.SubElement(copy, tag).text = text
    return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(out, encoding="unicode").encode()


def classify(path: str) -> tuple[Kind, bool]:
    """(kind, verify against the upstream checksum) of a repository path; raises BadMavenPath.

    Checksum files get the kind of the file they describe and are never verified themselves.
    """
    if not path or path.endswith("/"):
        raise BadMavenPath(path, "directory listings are not served; ask for a file")
    if len(path) > _MAX_PATH:
        raise BadMavenPath(path[:64] + "…", f"longer than {_MAX_PATH} characters")
    described, checksum = split_checksum(path)
    if described in _ROOT_FILES:
        return Kind.METADATA, False
    parts = path.split("/")
    for seg in parts:
        if len(seg) > _MAX_SEGMENT:
            raise BadMavenPath(path, f"a path segment is longer than {_MAX_SEGMENT} characters")
        if not _SEGMENT.match(seg):
            raise BadMavenPath(
                path,
                f"segment {seg!r} is not a Maven name (letters, digits and _ . + ~ -, "
                "starting with a letter, digit or _)",
            )
    dirs, filename = parts[:-1], parts[-1]
    base, _ = split_checksum(filename)
    if base == METADATA_FILE:
        if not dirs:
            raise BadMavenPath(path, "maven-metadata.xml belongs in a group, artifact or version directory")
        return Kind.METADATA, False
    if len(dirs) < 3:
        raise BadMavenPath(path, "expected <group path>/<artifactId>/<version>/<file>")
    artifact_id, version = dirs[-2], dirs[-1]
    if version.endswith(SNAPSHOT):
        prefix = f"{artifact_id}-{version[: -len(SNAPSHOT)]}"  # "a-1.0-": a-1.0-SNAPSHOT.jar, a-1.0-2024….jar
        ok = base.startswith(prefix) and len(base) > len(prefix)
        timestamped = ok and _TIMESTAMPED.match(base, len(prefix) - 1) is not None
        if not ok:
            raise BadMavenPath(path, f"{filename!r} is not a file of {artifact_id} {version}")
        return Kind.METADATA, timestamped and not checksum
    prefix = f"{artifact_id}-{version}"
    if not (base.startswith(prefix) and base[len(prefix) : len(prefix) + 1] in (".", "-")):
        raise BadMavenPath(path, f"{filename!r} is not a file of {artifact_id} {version}")
    return Kind.ARTIFACT, not checksum


def content_type(path: str) -> str | None:
    _, dot, ext = path.rpartition(".")
    return _CONTENT_TYPES.get(f".{ext}") if dot else None


def artifact_coordinates(path: str) -> tuple[str, str] | None:
    """``("group:artifact", version)`` of ``group/path/artifactId/version/file``, or None."""
    parts = path.split("/")
    if len(parts) >= 4 and parts[-1] != METADATA_FILE and parts[-1].startswith(parts[-3] + "-"):
        return f"{'.'.join(parts[:-3])}:{parts[-3]}", parts[-2]
    return None


class MavenFormat(Format):
    name = "maven"

    def describe(self, resource: Resource) -> dict[str, str]:
        coordinates = artifact_coordinates(resource.path)
        return {"name": coordinates[0], "version": coordinates[1]} if coordinates else {}

    def resolve(self, request: ProxyRequest, ctx: FormatContext) -> Resource | Reply:
        path = request.path
        if ctx.proxy.policy:
            if coordinates := artifact_coordinates(path):
                admit(ctx.proxy.policy, ctx.now(), *coordinates, None, ":".join(coordinates))
            elif (parts := path.split("/"))[-1] == METADATA_FILE and len(parts) >= 3:
                name = f"{'.'.join(parts[:-2])}:{parts[-2]}"
                admit_project(ctx.proxy.policy, name, name)
        kind, verify = classify(path)
        if kind is Kind.ARTIFACT:
            cached = ctx.cached(path)
            if cached is not None and cached.kind == Kind.ARTIFACT.value:
                return self._resource(ctx, path, kind)  # immutable and verified when stored
        expected = self._expected(ctx, path, kind) if verify else {}
        return self._resource(ctx, path, kind, expected)

    def _resource(
        self, ctx: FormatContext, path: str, kind: Kind, expected: dict[str, str] | None = None
    ) -> Resource:
        proxy = ctx.proxy
        negative = proxy.negative_ttl
        if kind is Kind.METADATA:  # a 404 is never trusted longer than the metadata would be
            negative = min(negative, proxy.metadata_ttl)
        return Resource(
            path=path,
            upstream_url=proxy.url.rstrip("/") + "/" + quote(path, safe="/+~"),
            kind=kind,
            expected=expected or {},
            content_type=content_type(path),
            negative_ttl=negative,
        )

    def _expected(self, ctx: FormatContext, path: str, kind: Kind) -> dict[str, str]:
        """The digest the upstream publishes for ``path`` (its .sha1, through the cache), if any."""
        try:
            _, body = ctx.metadata(self._resource(ctx, path + VERIFY_WITH, kind))
        except FormatError as exc:
            if exc.status != 404:
                raise
            return {}  # the upstream publishes no checksum: not an error
        digest = parse_checksum(body, VERIFY_WITH)
        if digest is None:
            log.warning(
                "%s: %s%s holds no digest; %s is not verified", ctx.proxy.key, path, VERIFY_WITH, path
            )
            return {}
        return {CHECKSUMS[VERIFY_WITH][0]: digest}

    def check(self, resource: Resource, body: bytes, headers: Mapping[str, str]) -> None:
        if resource.path.rsplit("/", 1)[-1] == METADATA_FILE:
            check_metadata_xml(body, resource.upstream_url)

    def group_route(self, request: ProxyRequest, strategy: str) -> GroupRoute:
        """maven-metadata.xml joins every member's versions; artifacts come from the first."""
        if request.path.rsplit("/", 1)[-1] == METADATA_FILE:
            return GroupRoute("merge", replace(request, method="GET"))
        return GroupRoute()

    def group_merge(self, request: ProxyRequest, bodies: list[bytes]) -> tuple[bytes, str]:
        for body in bodies:
            check_metadata_xml(body, request.path)
        return merge_metadata(bodies), "text/xml"

    def render(
        self, resource: Resource, body: bytes, hiding: Hiding | None = None
    ) -> tuple[bytes, str] | None:
        """maven-metadata.xml without the versions a policy keeps out; else the stored bytes."""
        parts = resource.path.split("/")
        if hiding is None or parts[-1] != METADATA_FILE or len(parts) < 3:
            return None
        check_metadata_xml(body, resource.upstream_url)  # stored bytes are read again: checked again
        shown = hide_maven_versions(body, f"{'.'.join(parts[:-2])}:{parts[-2]}", hiding)
        return None if shown is body else (shown, content_type(resource.path) or "text/xml")
