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

from collections.abc import Mapping
from dataclasses import replace
from urllib.parse import quote

from packaging.utils import canonicalize_name

from pytest_upstream.config.release_policy import parse_time
from pytest_upstream.formats.base import (
    Format,
    FormatContext,
    FormatError,
    GroupRoute,
    Kind,
    MalformedUpstream,
    Resource,
)
from pytest_upstream.formats.hiding import Hiding
from pytest_upstream.formats.pypi_pages import (
    HTML_V1,
    JSON_V1,
    UPSTREAM_ACCEPT,
    choose_representation,
    hide_files,
    hide_projects,
    is_json,
    merge_pages,
    parse_dist_filename,
    parse_page,
    render_html,
    render_json,
    verifiable,
)
from pytest_upstream.formats.refusals import admit, admit_project
from pytest_upstream.messages import Headers, ProxyRequest, Reply


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
            admit_project(ctx.proxy.policy, project, f"project {project!r}")
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
        policy = ctx.proxy.policy
        parsed = parse_dist_filename(filename)
        version = parsed[1] if parsed else None
        admit(policy.without_cooldown(), ctx.now(), project, version, None, filename)
        cached = ctx.cached(path)
        if cached is not None and not policy.cooldown:  # immutable: no need to consult the index again
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
        admit(policy, ctx.now(), project, version, parse_time(link.upload_time), wanted)
        if cached is not None:
            return Resource(path, cached.upstream_url, Kind.ARTIFACT)
        if wanted != filename:
            if link.core_metadata is False:
                raise FormatError(404, f"the index publishes no metadata file for {wanted!r}")
            expected = verifiable(link.core_metadata) if isinstance(link.core_metadata, dict) else {}
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
        if ctype.endswith(("/json", "+json")) and not is_json(body):
            raise MalformedUpstream(f"index page {url}: Content-Type {ctype} but the body is not JSON")
        page = parse_page(body, url, root=root)
        if is_json(body) or page.declared:
            return
        if page.projects if root else any(parse_dist_filename(f.filename) for f in page.files):
            return
        links = "project" if root else "distribution file"
        raise MalformedUpstream(
            f"index page {url} is not a simple index: no pypi:repository-version and no {links} "
            f"links (Content-Type {ctype or 'none'}; an error page?)"
        )

    def render(
        self, resource: Resource, body: bytes, hiding: Hiding | None = None
    ) -> tuple[bytes, str] | None:
        root = resource.path == "simple/"
        project = "" if root else resource.path.split("/")[1]
        page = parse_page(body, resource.upstream_url, root=root)
        if hiding is not None:
            page = hide_projects(page, hiding) if root else hide_files(page, project, hiding)
        if resource.render_as == "json":
            return render_json(project, page, root=root), JSON_V1
        ctype = HTML_V1 if resource.render_as == "html-v1" else "text/html; charset=utf-8"
        return render_html(project, page, root=root), ctype

    def group_route(self, request: ProxyRequest, strategy: str) -> GroupRoute:
        """``first`` (the default): a project page from the first member that has the project,
        its files from that member only (no dependency confusion); ``merge``: pages joined, a
        file from the first member that lists it.  The root index is always joined."""
        parts = request.path.split("/")
        as_json = replace(request, method="GET", query="", headers=Headers([("Accept", JSON_V1)]))
        if parts[0] == "files" and len(parts) == 3 and strategy != "merge":
            return GroupRoute("owner", replace(as_json, path=f"simple/{parts[1]}/"))
        page = parts[0] == "simple" and request.method in ("GET", "HEAD")
        joined = parts[1:] == [""] or (strategy == "merge" and len(parts) == 3 and parts[2] == "")
        if page and joined and choose_representation(request.headers.get("accept")) is not None:
            return GroupRoute("merge", as_json)
        return GroupRoute()

    def group_merge(self, request: ProxyRequest, bodies: list[bytes]) -> tuple[bytes, str]:
        root = request.path == "simple/"
        project = "" if root else request.path.split("/")[1]
        pages = [parse_page(body, f"{request.proxy_url}/{request.path}", root=root) for body in bodies]
        merged = merge_pages(pages)
        rep = choose_representation(request.headers.get("accept"))
        if rep == "json":
            return render_json(project, merged, root=root), JSON_V1
        ctype = HTML_V1 if rep == "html-v1" else "text/html; charset=utf-8"
        return render_html(project, merged, root=root), ctype

    def describe(self, resource: Resource) -> dict[str, str]:
        parts = resource.path.split("/")
        if len(parts) != 3 or not parts[1] or parts[0] not in ("simple", "files"):
            return {}
        if parts[0] == "simple":
            return {"name": parts[1]}
        parsed = parse_dist_filename(parts[2])
        return {"name": parts[1], "version": parsed[1]} if parsed else {"name": parts[1]}
