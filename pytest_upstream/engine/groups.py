"""Ordered groups: one URL in front of several proxies of one format (docs/rules.md § Groups).

A request to ``/<group>/...`` is passed to the group's members, in order, as the same request to
``/<member>/...`` (``ProxyRequest.via`` remembers the group, so absolute links in the answers lead
back through it).  Each member answers with everything a proxy does (its cache, rules, replay,
lock entries, records); the group's own rules are applied on top of each member's
(``ReleasePolicy.and_then``).  The format says how each request is answered
(``Format.group_route``):

- **first**: the first member whose answer is not an absence goes to the client.  An absence is a
  404/410, or a failure to reach the member (502/503/504, a replay miss): a group skips a member
  that is down.  A refusal (403) or another client error is final: a member's rule is a
  decision, not an absence.
- **owner**: the first member whose answer to the format's probe (a project page, a packument)
  is a 200 owns the name, and the request goes to that member alone (a public index cannot add a
  higher version of an internal project: dependency confusion).
- **merge**: every member is asked the probe; the format joins the 200 answers
  (``Format.group_merge``: a merged project page, maven-metadata.xml with every member's versions).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import replace

from pytest_upstream.config.groups import GroupDefinition
from pytest_upstream.config.settings import ProxyDefinition, Settings
from pytest_upstream.engine.fetch import CACHE_HEADER
from pytest_upstream.formats import get_format
from pytest_upstream.formats.base import Format
from pytest_upstream.messages import ProxyRequest, Reply

# Answers that mean "not here": the next member is asked.
ABSENT = frozenset({404, 410, 502, 503, 504})
MEMBER_HEADER = "X-Upstream-Member"
_CACHE_ORDER = ("hit", "stale", "miss")  # a merged answer reports its least cached part
_MAX_MERGED_BYTES = 64 * 1024 * 1024  # what one member may add to a merged document

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
        fmt = get_format(group.format)
        if fmt is None:
            return Reply.text(501, f"format {group.format!r} (group {group.key!r}) is not supported")
        route = fmt.group_route(req, group.strategy)
        if route.way == "owner" and route.probe is not None:
            owner = self._owner(members, route.probe)
            return owner if isinstance(owner, Reply) else self._ask(owner, req)
        if route.way == "merge" and route.probe is not None:
            return self._merged(fmt, members, req, route.probe)
        return self._first(members, req)

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
        """The first member whose answer to ``probe`` is a 200; else the answer to pass on."""
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

    def _merged(
        self, fmt: Format, members: Iterable[ProxyDefinition], req: ProxyRequest, probe: ProxyRequest
    ) -> Reply:
        bodies: list[bytes] = []
        caches: list[str] = []
        last: Reply | None = None
        for member in members:
            reply = self._ask(member, probe)
            if reply.status == 200:
                bodies.append(_body(reply))
                caches.append(reply.headers.get(CACHE_HEADER, "hit"))
            elif reply.status not in ABSENT:
                return reply
            else:
                last = reply
        if not bodies:
            assert last is not None
            return last
        body, ctype = fmt.group_merge(req, bodies)
        cache = max(caches, key=lambda c: _CACHE_ORDER.index(c) if c in _CACHE_ORDER else 0)
        headers = {"Content-Type": ctype, "Vary": "Accept", CACHE_HEADER: cache}
        return Reply(200, headers, body=b"" if req.method == "HEAD" else body)


def _body(reply: Reply) -> bytes:
    """A member's 200 answer as bytes (metadata: rendered in memory, or a stored file)."""
    if reply.file is not None:
        if (reply.length or 0) > _MAX_MERGED_BYTES:
            raise ValueError(f"a document of {reply.length} bytes is too big to merge")
        return reply.file.read_bytes()
    if reply.stream is not None:
        body = bytearray()
        for chunk in reply.stream:
            body += chunk
            if len(body) > _MAX_MERGED_BYTES:
                raise ValueError(f"a document of more than {_MAX_MERGED_BYTES} bytes is too big to merge")
        return bytes(body)
    return reply.body
