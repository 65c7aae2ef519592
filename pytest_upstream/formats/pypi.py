"""PyPI's simple repository API (PEP 503 HTML, PEP 691 JSON, PEP 658/714 metadata).

Proxy layout under ``/<key>/``:

* ``simple/`` and ``simple/<project>/``: index pages (metadata, with a TTL).
  The upstream is asked for JSON first and HTML second; whatever it sends is
  stored as is and rendered per request as HTML or JSON (by ``Accept``), with
  every file link rewritten to ``../../files/<project>/<filename>#<hash>``.
  Non-normalised project names are redirected to the normalised URL.
* ``files/<project>/<filename>`` (and ``<filename>.metadata``): artifacts,
  immutable.  Their upstream URL and published hashes come from the project
  page, so the proxy never fetches a URL that an index did not list, and a
  file whose bytes do not match the index's hash is refused.
"""

from __future__ import annotations

import hashlib
import html
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
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

from pytest_upstream.formats.base import Format, FormatContext, FormatError, Kind, MalformedUpstream, Resource
from pytest_upstream.messages import ProxyRequest, Reply

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
        return _verifiable(self.hashes)


def _verifiable(hashes: dict[str, str]) -> dict[str, str]:
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


def _is_json(body: bytes) -> bool:
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
        if _is_json(body):
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


class PyPIFormat(Format):
    name = "pypi"

    def resolve(self, request: ProxyRequest, ctx: FormatContext) -> Resource | Reply:
        parts = request.path.split("/")
        if parts[0] == "simple":
            return self._index(request, ctx, parts[1:])
        if parts[0] == "files" and len(parts) == 3 and parts[2]:
            return self._file(ctx, parts[1], parts[2])
        raise FormatError(
            404,
            f"/{request.key}/{request.path}: a pypi proxy serves /{request.key}/simple/ "
            f"and the files its pages link to",
        )

    def _index(self, request: ProxyRequest, ctx: FormatContext, rest: list[str]) -> Resource | Reply:
        rep = choose_representation(request.headers.get("accept"))
        if rep is None:
            raise FormatError(
                406, f"none of the media types in Accept is offered; try {JSON_V1} or text/html"
            )
        base = ctx.proxy.url if ctx.proxy.url.endswith("/") else ctx.proxy.url + "/"
        if not rest:  # /simple without its slash
            location = f"/{request.key}/simple/"
            return Reply(
                301, {"Location": location, "Content-Type": "text/plain"}, body=f"see {location}\n".encode()
            )
        if rest == [""]:  # /simple/
            return Resource(
                "simple/", base, Kind.METADATA, request_headers={"Accept": UPSTREAM_ACCEPT}, render_as=rep
            )
        if len(rest) == 1 or (len(rest) == 2 and rest[1] == ""):
            project = canonicalize_name(rest[0])
            if rest != [project, ""]:
                location = f"/{request.key}/simple/{quote(project)}/"
                return Reply(
                    301,
                    {"Location": location, "Content-Type": "text/plain"},
                    body=f"see {location}\n".encode(),
                )
            return Resource(
                f"simple/{project}/",
                base
                + quote(project, safe="")
                + "/",  # base ends with "/"; a normalised name has no dot segments
                Kind.METADATA,
                request_headers={"Accept": UPSTREAM_ACCEPT},
                render_as=rep,
            )
        raise FormatError(404, f"/{request.key}/{request.path}: no such index page")

    def _file(self, ctx: FormatContext, project: str, filename: str) -> Resource:
        if canonicalize_name(project) != project:
            raise FormatError(
                404, f"files are served under the normalised project name {canonicalize_name(project)!r}"
            )
        path = f"files/{project}/{filename}"
        cached = ctx.cached(path)
        if cached is not None:  # immutable: no need to consult the index again
            return Resource(path, cached.upstream_url, Kind.ARTIFACT)
        base = ctx.proxy.url if ctx.proxy.url.endswith("/") else ctx.proxy.url + "/"
        index = Resource(
            f"simple/{project}/",
            base + quote(project, safe="") + "/",  # base ends with "/"; a normalised name has no dot segments
            Kind.METADATA,
            request_headers={"Accept": UPSTREAM_ACCEPT},
        )
        _, body = ctx.metadata(index)
        page = parse_page(body, index.upstream_url, root=False)
        wanted = filename[: -len(".metadata")] if filename.endswith(".metadata") else filename
        link = next((f for f in page.files if f.filename == wanted), None)
        if link is None:
            raise FormatError(404, f"{wanted!r} is not listed on the index page of {project!r}")
        if wanted != filename:
            if link.core_metadata is False:
                raise FormatError(404, f"the index publishes no metadata file for {wanted!r}")
            expected = _verifiable(link.core_metadata) if isinstance(link.core_metadata, dict) else {}
            return Resource(
                path,
                link.url + ".metadata",
                Kind.ARTIFACT,
                expected=expected,
                content_type="text/plain; charset=utf-8",
            )
        return Resource(path, link.url, Kind.ARTIFACT, expected=link.expected())

    def check(self, resource: Resource, body: bytes, headers: Mapping[str, str]) -> None:
        """A simple index, or an upstream failure (the stored page stays and is served stale).

        The body must be what its Content-Type says (JSON under a JSON type); an HTML page must
        be a simple index: it declares PEP 629's ``pypi:repository-version``, or it links at
        least one project (the root index) or distribution file (a project page).  A "502 Bad
        Gateway" page from a load balancer does neither.
        """
        url, root = resource.upstream_url, resource.path == "simple/"
        ctype = (headers.get("content-type") or "").split(";", 1)[0].strip().lower()
        if ctype.endswith(("/json", "+json")) and not _is_json(body):
            raise MalformedUpstream(f"index page {url}: Content-Type {ctype} but the body is not JSON")
        page = parse_page(body, url, root=root)
        if _is_json(body) or page.declared:
            return
        if page.projects if root else any(parse_dist_filename(f.filename) for f in page.files):
            return
        links = "project" if root else "distribution file"
        raise MalformedUpstream(
            f"index page {url} is not a simple index: no pypi:repository-version and no {links} "
            f"links (Content-Type {ctype or 'none'}; an error page?)"
        )

    def render(self, resource: Resource, body: bytes) -> tuple[bytes, str] | None:
        root = resource.path == "simple/"
        project = "" if root else resource.path.split("/")[1]
        page = parse_page(body, resource.upstream_url, root=root)
        if resource.render_as == "json":
            return render_json(project, page, root=root), JSON_V1
        ctype = HTML_V1 if resource.render_as == "html-v1" else "text/html; charset=utf-8"
        return render_html(project, page, root=root), ctype

    def describe(self, resource: Resource) -> dict[str, str]:
        parts = resource.path.split("/")
        if len(parts) != 3 or not parts[1] or parts[0] not in ("simple", "files"):
            return {}
        if parts[0] == "simple":
            return {"name": parts[1]}
        parsed = parse_dist_filename(parts[2])
        return {"name": parts[1], "version": parsed[1]} if parsed else {"name": parts[1]}


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
