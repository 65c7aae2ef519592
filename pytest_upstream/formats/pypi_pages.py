"""The simple repository API's documents: PEP 503 HTML and PEP 691 JSON pages, read into one
model (``Page``: the files a project page lists, with their hashes, PEP 658 metadata, PEP 592
yanks and PEP 700 upload times) and rendered back for a client, and distribution file names.

``formats/pypi.py`` (the proxy's routing) reads upstream pages with ``parse_page`` and answers
clients with ``render_html``/``render_json``; ``hide_files`` takes out the releases a proxy's
policy keeps out (docs/rules.md) before a page is rendered.
"""

from __future__ import annotations

import hashlib
import html
import json
from dataclasses import dataclass, field, replace
from html.parser import HTMLParser
from typing import Any
from urllib.parse import quote, unquote, urldefrag, urljoin, urlsplit

from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    canonicalize_name,
    parse_sdist_filename,
    parse_wheel_filename,
)
from packaging.version import InvalidVersion

from pytest_upstream.config.release_policy import parse_time
from pytest_upstream.formats.base import MalformedUpstream
from pytest_upstream.formats.hiding import Hiding

JSON_V1 = "application/vnd.pypi.simple.v1+json"
HTML_V1 = "application/vnd.pypi.simple.v1+html"
UPSTREAM_ACCEPT = f"{JSON_V1}, {HTML_V1};q=0.2, text/html;q=0.01"
_OFFERS = {  # media type a client may ask for -> what we render
    JSON_V1: "json",
    "application/vnd.pypi.simple.latest+json": "json",
    HTML_V1: "html-v1",
    "application/vnd.pypi.simple.latest+html": "html-v1",
    "text/html": "html",
}
_HASH_ALGOS = ("sha256", "sha384", "sha512", "sha224", "sha1", "md5", "blake2b", "blake2s")


@dataclass
class FileLink:
    filename: str
    url: str  # absolute upstream URL, no fragment
    hashes: dict[str, str] = field(default_factory=dict)
    requires_python: str | None = None
    yanked: bool | str = False
    core_metadata: bool | dict[str, str] = False
    gpg_sig: bool | None = None
    size: int | None = None
    upload_time: str | None = None

    def expected(self) -> dict[str, str]:
        return verifiable(self.hashes)


def verifiable(hashes: dict[str, str]) -> dict[str, str]:
    return {a: v.lower() for a, v in hashes.items() if a in _HASH_ALGOS and a in hashlib.algorithms_available}


@dataclass
class Page:
    name: str
    files: list[FileLink] = field(default_factory=list)
    projects: list[str] = field(default_factory=list)  # the root index
    versions: list[str] | None = None
    declared: bool = False  # an HTML page that names its PEP 629 repository version


class _AnchorParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.anchors: list[tuple[dict[str, str | None], str]] = []
        self._open: dict[str, str | None] | None = None
        self._text: list[str] = []
        self.repository_version = False  # PEP 629's <meta name="pypi:repository-version">

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._open, self._text = dict(attrs), []
        elif tag == "meta" and dict(attrs).get("name") == "pypi:repository-version":
            self.repository_version = True

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._open is not None:
            self.anchors.append((self._open, "".join(self._text).strip()))
            self._open = None


def is_json(body: bytes) -> bool:
    return body.lstrip()[:1] == b"{"


def _metadata_attr(value: str | None) -> bool | dict[str, str]:
    if value is None:
        return False
    if value.strip().lower() in ("", "true"):
        return True
    algo, _, digest = value.partition("=")
    return {algo.strip().lower(): digest.strip()} if digest else True


def parse_page(body: bytes, page_url: str, *, root: bool) -> Page:
    """Parse an upstream index page (HTML or JSON) into one neutral model."""
    try:
        if is_json(body):
            return _parse_json(json.loads(body), page_url, root=root)
        return _parse_html(body.decode("utf-8"), page_url, root=root)
    except MalformedUpstream:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise MalformedUpstream(f"unreadable index page {page_url}: {exc}") from None


def _parse_html(text: str, page_url: str, *, root: bool) -> Page:
    parser = _AnchorParser()
    parser.feed(text)
    parser.close()
    page = Page(name="", declared=parser.repository_version)
    for attrs, label in parser.anchors:
        href = attrs.get("href")
        if not href:
            continue
        if root:
            page.projects.append(label or unquote(href.rstrip("/").rsplit("/", 1)[-1]))
            continue
        url, frag = urldefrag(urljoin(page_url, href))
        filename = label or unquote(urlsplit(url).path.rsplit("/", 1)[-1])
        hashes = {}
        if "=" in frag:
            algo, _, digest = frag.partition("=")
            hashes[algo.lower()] = digest
        yanked: bool | str = False
        if "data-yanked" in attrs:
            yanked = attrs["data-yanked"] or True
        core = _metadata_attr(attrs.get("data-core-metadata", attrs.get("data-dist-info-metadata")))
        gpg = attrs.get("data-gpg-sig")
        page.files.append(
            FileLink(
                filename=filename,
                url=url,
                hashes=hashes,
                requires_python=attrs.get("data-requires-python") or None,
                yanked=yanked,
                core_metadata=core,
                gpg_sig=None if gpg is None else gpg == "true",
            )
        )
    return page


def _parse_json(data: dict[str, Any], page_url: str, *, root: bool) -> Page:
    if not isinstance(data, dict):
        raise MalformedUpstream(f"index page {page_url} is not a JSON object")
    if root:
        return Page(name="", projects=[str(p["name"]) for p in data["projects"]])
    page = Page(name=str(data.get("name", "")), versions=data.get("versions"))
    for f in data["files"]:
        core = f.get("core-metadata", f.get("dist-info-metadata", f.get("data-dist-info-metadata", False)))
        hashes = f["hashes"]
        if not isinstance(hashes, dict):
            raise MalformedUpstream(f"index page {page_url}: 'hashes' of {f['filename']!r} is not an object")
        page.files.append(
            FileLink(
                filename=str(f["filename"]),
                url=urldefrag(urljoin(page_url, f["url"]))[0],
                hashes=dict(hashes),
                requires_python=f.get("requires-python"),
                yanked=f.get("yanked", False),
                core_metadata=core if isinstance(core, (bool, dict)) else False,
                gpg_sig=f.get("gpg-sig"),
                size=f.get("size"),
                upload_time=f.get("upload-time"),
            )
        )
    return page


def choose_representation(accept: str | None) -> str | None:
    """'json', 'html-v1' or 'html' by the client's Accept (PEP 691); None if none is acceptable."""
    if not accept:
        return "html"
    best: tuple[float, int, str] | None = None
    for index, part in enumerate(accept.split(",")):
        media, *params = [p.strip() for p in part.split(";")]
        q = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        media = media.lower()
        if media in ("*/*", "text/*", "application/*"):
            rep = "html" if media != "application/*" else "json"
        else:
            rep = _OFFERS.get(media)  # type: ignore[assignment]
        if rep is None or q <= 0:
            continue
        candidate = (q, -index, rep)
        if best is None or candidate > best:
            best = candidate
    return None if best is None else best[2]


def _file_href(project: str, link: FileLink) -> str:
    href = f"../../files/{quote(project)}/{quote(link.filename)}"
    for algo in ("sha256", *sorted(link.hashes)):
        if algo in link.hashes:
            return f"{href}#{algo}={link.hashes[algo]}"
    return href


def _meta_value(core: bool | dict[str, str]) -> str | None:
    if core is False:
        return None
    if isinstance(core, dict) and core:
        algo = "sha256" if "sha256" in core else sorted(core)[0]
        return f"{algo}={core[algo]}"
    return "true"


def render_html(project: str, page: Page, *, root: bool) -> bytes:
    out = ['<!DOCTYPE html>\n<html>\n<head>\n<meta name="pypi:repository-version" content="1.0">']
    title = "Simple index" if root else f"Links for {html.escape(project)}"
    out.append(f"<title>{title}</title>\n</head>\n<body>\n<h1>{title}</h1>")
    if root:
        for name in page.projects:
            out.append(f'<a href="{quote(canonicalize_name(name))}/">{html.escape(name)}</a><br/>')
    for link in page.files:
        attrs = [f'href="{html.escape(_file_href(project, link))}"']
        if link.requires_python:
            attrs.append(f'data-requires-python="{html.escape(link.requires_python)}"')
        if link.yanked is not False:
            reason = link.yanked if isinstance(link.yanked, str) else ""
            attrs.append(f'data-yanked="{html.escape(reason)}"')
        if (meta := _meta_value(link.core_metadata)) is not None:
            attrs.append(f'data-core-metadata="{html.escape(meta)}"')
            attrs.append(f'data-dist-info-metadata="{html.escape(meta)}"')
        if link.gpg_sig is not None:
            attrs.append(f'data-gpg-sig="{"true" if link.gpg_sig else "false"}"')
        out.append(f"<a {' '.join(attrs)}>{html.escape(link.filename)}</a><br/>")
    out.append("</body>\n</html>\n")
    return "\n".join(out).encode()


def render_json(project: str, page: Page, *, root: bool) -> bytes:
    data: dict[str, Any] = {"meta": {"api-version": "1.0"}}
    if root:
        data["projects"] = [{"name": name} for name in page.projects]
    else:
        data["name"] = project
        files = []
        for link in page.files:
            f: dict[str, Any] = {
                "filename": link.filename,
                "url": _file_href(project, link).split("#", 1)[0],
                "hashes": link.hashes,
            }
            if link.requires_python:
                f["requires-python"] = link.requires_python
            if link.yanked is not False:
                f["yanked"] = link.yanked
            if link.core_metadata is not False:
                f["core-metadata"] = link.core_metadata
                f["dist-info-metadata"] = link.core_metadata
            if link.gpg_sig is not None:
                f["gpg-sig"] = link.gpg_sig
            if link.size is not None:
                f["size"] = link.size
            if link.upload_time is not None:
                f["upload-time"] = link.upload_time
            files.append(f)
        data["files"] = files
        if page.versions is not None:
            data["versions"] = page.versions
    return json.dumps(data, sort_keys=True).encode()


# Archive types of old sdists that PyPI still serves (uploads before PEP 527); packaging's
# parse_sdist_filename knows only today's .tar.gz and .zip.
_LEGACY_SDIST_SUFFIXES = (".tar.bz2", ".tar.xz", ".tgz", ".tar")


def parse_dist_filename(filename: str) -> tuple[str, str] | None:
    """(normalised project, version) of a distribution file's name, or None if it is not one.

    Wheels, sdists and eggs; a trailing ``.metadata`` (PEP 658) is ignored.  The names come
    from an upstream's page, so anything packaging refuses (no version, a version that is not
    PEP 440, a bad wheel tag) is simply "not a distribution" rather than an error.  Legacy
    sdist archives and eggs (``name-version[-pyX.Y[-platform]].egg``) are read as the sdist
    ``name-version.tar.gz`` would be, so packaging still checks the name and the version.
    """
    name = filename.removesuffix(".metadata")
    try:
        if name.endswith(".whl"):
            project, version, _, _ = parse_wheel_filename(name)
            return project, str(version)
        if name.endswith(".egg"):
            fields = name.removesuffix(".egg").split("-")
            if len(fields) < 2:
                return None
            name = f"{fields[0]}-{fields[1]}.tar.gz"
        for suffix in _LEGACY_SDIST_SUFFIXES:
            if name.endswith(suffix):
                name = name.removesuffix(suffix) + ".tar.gz"
                break
        project, version = parse_sdist_filename(name)
        return project, str(version)
    except (InvalidWheelFilename, InvalidSdistFilename, InvalidVersion):
        return None


def hide_files(page: Page, project: str, hiding: Hiding) -> Page:
    """``page`` without the files of the releases ``hiding``'s policy keeps out.

    A file is judged by the release its name says (a file whose name is no distribution's is
    judged by the project alone) and its PEP 700 ``upload-time``; PEP 700's ``versions`` keeps a
    version only if a file of it is kept, or, for a version with no files, if the policy lets it
    in by its number alone.
    """
    files, kept_versions, seen_versions = [], set(), set()
    for link in page.files:
        parsed = parse_dist_filename(link.filename)
        version = parsed[1] if parsed else None
        if version is not None:
            seen_versions.add(version)
        if hiding.keep(project, version, parse_time(link.upload_time)):
            files.append(link)
            if version is not None:
                kept_versions.add(version)
    versions = page.versions
    if versions is not None:
        versions = [
            v
            for v in versions
            if v in kept_versions or (v not in seen_versions and hiding.keep(project, v, None))
        ]
    return replace(page, files=files, versions=versions)


def hide_projects(page: Page, hiding: Hiding) -> Page:
    """The root index without the projects ``hiding``'s policy keeps out as a whole."""
    kept = []
    for name in page.projects:
        if hiding.policy.project(name) is None:
            kept.append(name)
        else:
            hiding.keep(name, None, None)  # records it, with the reason
    return replace(page, projects=kept)


def merge_pages(pages: list[Page]) -> Page:
    """The union of project pages (files by name, the first page's copy of a file winning) or of
    root indexes (project names), for a group that joins its members' pages."""
    files, seen = [], set()
    projects: dict[str, None] = {}
    versions: dict[str, None] = {}
    for page in pages:
        for link in page.files:
            if link.filename not in seen:
                seen.add(link.filename)
                files.append(link)
        projects.update(dict.fromkeys(page.projects))
        versions.update(dict.fromkeys(page.versions or ()))
    has_versions = any(page.versions is not None for page in pages)
    return replace(
        pages[0], files=files, projects=sorted(projects), versions=list(versions) if has_versions else None
    )
