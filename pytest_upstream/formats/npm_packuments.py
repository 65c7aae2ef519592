"""npm's documents: package names, packuments (full and abbreviated), integrity digests.

``formats/npm.py`` (the proxy's routing) reads upstream packuments with ``parse_packument`` and
answers clients with the full document or its abbreviated ``install-v1`` form (``abbreviate``),
tarball URLs rewritten to point through the proxy (``rewrite_tarballs``).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from pytest_upstream.config.release_policy import parse_time
from pytest_upstream.formats.base import MalformedUpstream

FULL = "application/json"
ABBREVIATED = "application/vnd.npm.install-v1+json"
MAX_NAME_LENGTH = 214
# encodeURIComponent leaves exactly these unescaped: npm's "URL-friendly" characters.
_URL_SAFE = re.compile(r"[A-Za-z0-9\-_.!~*'()]+")
_RESERVED_NAMES = frozenset({"node_modules", "favicon.ico"})
_SHA1_HEX = re.compile(r"[0-9a-fA-F]{40}")
_SRI_ALGOS = ("sha512", "sha384", "sha256", "sha1")
# Upstream requests: full packuments, and bytes exactly as published (no
# content coding to undo; the published digests are over these bytes).
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


def dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode()


def publication_time(doc: dict[str, Any], version: str) -> float | None:
    """When ``version`` was published, from the packument's ``time`` (None: unknown)."""
    times = doc.get("time")
    return parse_time(times.get(version)) if isinstance(times, dict) else None
