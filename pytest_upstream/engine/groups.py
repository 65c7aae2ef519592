"""Ordered groups: one URL in front of several proxies of one format (docs/rules.md § Groups).

A request to ``/<group>/...`` is passed to the group's members, in order, as the same request to
``/<member>/...`` (``ProxyRequest.via`` remembers the group, so absolute links in the answers lead
back through it).  Each member answers with everything a proxy does (its cache, rules, replay,
lock entries, records); the group's own rules are applied on top of each member's
(``ReleasePolicy.and_then``).  What "the answer" is depends on the format:

- **first answer** (generic, docker, maven artifacts, npm packuments): the first member whose
  answer is not an absence goes to the client.  An absence is a 404/410, or a failure to reach
  the member (502/503/504, a replay miss): a group skips a member that is down.  A refusal (403)
  or another client error is final: a member's rule is a decision, not an absence.
- **owner** (pypi with ``strategy = "first"``, npm tarballs): the first member that has the
  project (its project page or packument answers 200) owns it; the project's files come from that
  member only, even if a later member lists others (dependency confusion: a public index cannot
  add a higher version of an internal project).
- **merged** (pypi with ``strategy = "merge"``, maven-metadata.xml): every member that has the
  document contributes; the union is rendered.  For pypi this is pip's ``--extra-index-url``
  behaviour, with its risk; for Maven it lists the versions every member has, and an artifact
  still comes from the first member that has it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace

from pytest_upstream.config.groups import GroupDefinition
from pytest_upstream.config.settings import ProxyDefinition, Settings
from pytest_upstream.engine.fetch import CACHE_HEADER
from pytest_upstream.formats.maven import METADATA_FILE, merge_metadata
from pytest_upstream.formats.pypi_pages import (
    JSON_V1,
    Page,
    choose_representation,
    parse_page,
    render_html,
    render_json,
)
from pytest_upstream.messages import Headers, ProxyRequest, Reply

# Answers that mean "not here": the next member is asked.
ABSENT = frozenset({404, 410, 502, 503, 504})
MEMBER_HEADER = "X-Upstream-Member"
_CACHE_ORDER = ("hit", "stale", "miss")  # the merged answer reports the least cached part

HandleMember = Callable[[ProxyRequest, ProxyDefinition], Reply]


class Groups:
    """The groups of one engine's settings, and how their requests reach their members."""

    def __init__(self, settings: Settings, handle_member: HandleMember) -> None:
        self._handle = handle_member
        self._members: dict[str, tuple[ProxyDefinition, ...]] = {}
        for group in settings.groups:
            members = []
            for key in group.members:
                proxy = settings.proxy(key)
                assert proxy is not None  # config/groups.py checked every member
                members.append(replace(proxy, policy=proxy.policy.and_then(group.policy)))
            self._members[group.key] = tuple(members)

    def handle(self, group: GroupDefinition, req: ProxyRequest) -> Reply:
        members = self._members[group.key]
        if group.format == "pypi":
            return self._pypi(group, members, req)
        if group.format == "npm" and "/-/" in req.path and not req.path.startswith("-/"):
            name = req.path.split("/-/", 1)[0]
            return self._owned(members, req, replace(req, path=name, query=""))
        if group.format == "maven" and req.path.rsplit("/", 1)[-1] == METADATA_FILE:
            return self._maven_metadata(members, req)
        return self._first(members, req)

    # -- the three ways ---------------------------------------------------------------
    def _ask(self, member: ProxyDefinition, req: ProxyRequest) -> Reply:
        sub = replace(req, key=member.key, via=req.client_key)
        reply = self._handle(sub, member)
        reply.headers[MEMBER_HEADER] = member.key
        return reply

    def _first(self, members: Iterable[ProxyDefinition], req: ProxyRequest) -> Reply:
        last: Reply | None = None
        for member in members:
            reply = self._ask(member, req)
            if reply.status not in ABSENT:
                return reply
            last = reply
        assert last is not None  # a group has at least one member
        return last

    def _owner(self, members: Iterable[ProxyDefinition], probe: ProxyRequest) -> ProxyDefinition | Reply:
        """The first member whose answer to ``probe`` (a project page, a packument) is a 200;
        else the last absence."""
        last: Reply | None = None
        for member in members:
            reply = self._ask(member, probe)
            if reply.status == 200:
                return member
            if reply.status not in ABSENT:
                return reply
            last = reply
        assert last is not None
        return last

    def _owned(self, members: Iterable[ProxyDefinition], req: ProxyRequest, probe: ProxyRequest) -> Reply:
        owner = self._owner(members, probe)
        return owner if isinstance(owner, Reply) else self._ask(owner, req)

    # -- pypi ----------------------------------------------------------------------------
    def _pypi(self, group: GroupDefinition, members: tuple[ProxyDefinition, ...], req: ProxyRequest) -> Reply:
        parts = req.path.split("/")
        if parts[0] == "files" and len(parts) == 3:
            if group.strategy == "merge":
                return self._first(members, req)  # the first member that lists the file
            probe = replace(req, method="GET", path=f"simple/{parts[1]}/", query="", headers=_json_accept())
            return self._owned(members, req, probe)
        if parts[0] == "simple" and req.method in ("GET", "HEAD"):
            root = parts[1:] == [""]
            project = len(parts) == 3 and parts[2] == "" and parts[1]
            if root or (project and group.strategy == "merge"):
                return self._merged_page(members, req, root=root)
        return self._first(members, req)  # a project page: the first member that has it owns it

    def _merged_page(self, members: tuple[ProxyDefinition, ...], req: ProxyRequest, *, root: bool) -> Reply:
        rep = choose_representation(req.headers.get("accept"))
        if rep is None:
            return self._first(members[:1], req)  # the member's own 406
        probe = replace(req, method="GET", headers=_json_accept())
        pages: list[Page] = []
        caches: list[str] = []
        last: Reply | None = None
        for member in members:
            reply = self._ask(member, probe)
            if reply.status == 200 and reply.body:
                pages.append(parse_page(reply.body, f"{req.proxy_url}/{req.path}", root=root))
                caches.append(reply.headers.get(CACHE_HEADER, "hit"))
            elif reply.status not in ABSENT:
                return reply
            else:
                last = reply
        if not pages:
            assert last is not None
            return last
        merged = _merge_pages(pages)
        project = "" if root else req.path.split("/")[1]
        if rep == "json":
            body, ctype = render_json(project, merged, root=root), JSON_V1
        else:
            body = render_html(project, merged, root=root)
            ctype = "application/vnd.pypi.simple.v1+html" if rep == "html-v1" else "text/html; charset=utf-8"
        cache = max(caches, key=_CACHE_ORDER.index) if caches else "hit"
        headers = {"Content-Type": ctype, "Vary": "Accept", CACHE_HEADER: cache}
        return Reply(200, headers, body=b"" if req.method == "HEAD" else body)

    # -- maven ----------------------------------------------------------------------------
    def _maven_metadata(self, members: tuple[ProxyDefinition, ...], req: ProxyRequest) -> Reply:
        bodies: list[bytes] = []
        last: Reply | None = None
        for member in members:
            reply = self._ask(member, replace(req, method="GET"))
            if reply.status == 200 and reply.file is not None:
                bodies.append(reply.file.read_bytes())
            elif reply.status == 200:
                bodies.append(reply.body)
            elif reply.status not in ABSENT:
                return reply
            else:
                last = reply
        if not bodies:
            assert last is not None
            return last
        body = merge_metadata(bodies)
        headers = {"Content-Type": "text/xml", CACHE_HEADER: "hit"}
        return Reply(200, headers, body=b"" if req.method == "HEAD" else body)


def _json_accept() -> Headers:
    return Headers([("Accept", JSON_V1)])


def _merge_pages(pages: list[Page]) -> Page:
    """The union of project pages (files by name, the first member's copy of a file winning) or
    of root indexes (project names)."""
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
    first = pages[0]
    has_versions = any(page.versions is not None for page in pages)
    return replace(
        first, files=files, projects=sorted(projects), versions=list(versions) if has_versions else None
    )
