"""Plain HTTP: ``/<key>/<path>`` maps to ``<url>/<path>``.

Everything is an immutable artifact unless its path matches one of the
proxy's ``mutable_paths`` glob patterns, which makes it metadata with a TTL.
The upstream publishes no digests, so none are verified beyond the cache's
own sha256.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from urllib.parse import quote

from pytest_upstream.formats.base import Format, FormatContext, FormatError, Kind, Resource
from pytest_upstream.formats.refusals import admit
from pytest_upstream.messages import ProxyRequest, Reply


class GenericFormat(Format):
    name = "generic"

    def resolve(self, request: ProxyRequest, ctx: FormatContext) -> Resource | Reply:
        if not request.path or request.path.endswith("/"):
            raise FormatError(
                404, f"a generic proxy serves files, not directories: /{request.key}/{request.path}"
            )
        admit(ctx.proxy.policy, ctx.now(), request.path, None, None, f"/{request.key}/{request.path}")
        url = ctx.proxy.url.rstrip("/") + "/" + quote(request.path, safe="/@:+,;=!$&'()*~")
        name = request.path
        if request.query:
            url += "?" + request.query
            name += "?" + request.query
        mutable = any(fnmatchcase(request.path, pattern) for pattern in ctx.proxy.mutable_paths)
        return Resource(path=name, upstream_url=url, kind=Kind.METADATA if mutable else Kind.ARTIFACT)
