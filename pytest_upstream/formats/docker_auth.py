"""A registry's bearer-token flow (the distribution token spec), for the docker format.

Any auth mode follows a ``WWW-Authenticate: Bearer realm=...`` challenge by asking the realm for
a pull token (anonymously, or with the proxy's Basic credentials), and the token is cached per
(proxy, repository scope) until shortly before it expires.  Expiry is measured with the request
context's clock, so a test can let a token run out without waiting for it.

The cache is bounded (``MAX_TOKENS``): a proxy serving many repositories for weeks gets one scope
per repository, so when full, expired tokens go first, then the least recently used.

Credentials stay with their origin (``may_send_credentials``): the Basic credentials go to a realm
on the proxy's own origin, or on a host the proxy lists in ``auth_hosts`` (a built-in source's own
pair, such as the Docker Hub registry's auth host, is built in: ``config/sources.py``), and never
from https to http.  Any other realm is asked anonymously, and a warning names its host: the
upstream (or whoever answered for it) chose that realm, not the operator.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlencode, urlsplit

from pytest_upstream.config.auth import AuthSpec, value_problem
from pytest_upstream.config.settings import ProxyDefinition
from pytest_upstream.config.sources import BUILTIN_SOURCES
from pytest_upstream.formats.base import FormatContext, FormatError, Resource, same_origin
from pytest_upstream.upstream.client import iter_body

if TYPE_CHECKING:
    import httpx

    from pytest_upstream.upstream.client import UpstreamClient

_TOKEN_MARGIN = 10.0  # seconds before a token's expiry at which it is no longer sent
_DEFAULT_TOKEN_LIFE = 60.0  # the token spec's default for a missing expires_in
MAX_TOKENS = 1024

TokenKey = tuple[str, str, AuthSpec, str]
_MAX_TOKEN_ANSWER = 1024 * 1024
log = logging.getLogger("pytest_upstream")


def may_send_credentials(proxy: ProxyDefinition, realm: str) -> bool:
    """Whether the proxy's credentials may go to the token realm ``realm``: never from https to
    http; to the proxy's own origin; to a host in its ``auth_hosts`` (``host`` for any port, or
    ``host:port``) or in its built-in source's pair (when the URL is the built-in one)."""
    realm_parts, own = urlsplit(realm), urlsplit(proxy.url)
    if own.scheme == "https" and realm_parts.scheme != "https":
        return False
    if same_origin(realm, proxy.url):
        return True
    allowed = set(proxy.auth_hosts)
    builtin = BUILTIN_SOURCES.get(proxy.source)
    if builtin is not None and proxy.url == builtin.url:
        allowed |= set(builtin.auth_hosts)
    host = (realm_parts.hostname or "").lower()
    try:
        port = realm_parts.port
    except ValueError:
        return False
    shown = f"[{host}]" if ":" in host else host
    return shown in allowed or (port is not None and f"{shown}:{port}" in allowed)


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="…",service="…"`` -> ("bearer", {"realm": …, "service": …})."""
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    for match in re.finditer(r'([A-Za-z][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))', rest):
        value = match.group(2) if match.group(2) is not None else match.group(3)
        params[match.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
    return scheme.lower(), params


def scope(resource: Resource) -> str:
    """The pull scope of a resource: ``repository:<upstream name>:pull``."""
    path = resource.path.split("?", 1)[0]
    for marker in ("/manifests/", "/blobs/", "/tags/list"):
        if marker in path:
            return f"repository:{path.rsplit(marker, 1)[0]}:pull"
    return "registry:catalog:*"


def token_key(ctx: FormatContext, resource: Resource) -> TokenKey:
    """Tokens are cached per proxy (its key, upstream and credentials) and pull scope."""
    return (ctx.proxy.key, ctx.proxy.url, ctx.proxy.auth, scope(resource))


@dataclass(frozen=True)
class _Token:
    value: str
    expires: float  # on the context's clock


class Tokens:
    """The tokens fetched so far, shared by every request of every docker proxy."""

    def __init__(self, limit: int = MAX_TOKENS) -> None:
        self._tokens: OrderedDict[TokenKey, _Token] = OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._tokens)

    def cached(self, ctx: FormatContext, resource: Resource) -> str | None:
        key = token_key(ctx, resource)
        with self._lock:
            token = self._tokens.get(key)
            if token is None:
                return None
            if token.expires <= ctx.now():
                del self._tokens[key]
                return None
            self._tokens.move_to_end(key)
            return token.value

    def fetch(
        self, ctx: FormatContext, resource: Resource, challenge: httpx.Response, client: UpstreamClient
    ) -> dict[str, str] | None:
        """Answer a 401's Bearer challenge with a token from its realm; None when retrying cannot help."""
        proxy = ctx.proxy
        scheme, params = parse_challenge(challenge.headers.get("www-authenticate", ""))
        if scheme != "bearer" or proxy.auth.mode == "bearer":
            return None  # Basic was already sent (or a static token was): retrying cannot help
        realm = params.get("realm", "")
        parts = urlsplit(realm)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise FormatError(
                502, f"upstream {resource.upstream_url} sent a Bearer challenge without a usable realm"
            )
        query = [(k, params[k]) for k in ("service", "scope") if params.get(k)]
        if "scope" not in params:
            query.append(("scope", scope(resource)))
        url = realm + ("&" if parts.query else "?") + urlencode(query)
        headers = {"Accept": "application/json"}
        if proxy.auth.mode == "basic":
            if may_send_credentials(proxy, realm):
                headers.update(proxy.auth.headers())
            else:
                log.warning(
                    "proxy %r: token realm %s is not the upstream's origin nor in auth_hosts (or is "
                    "plain http after https): asking it without the proxy's credentials",
                    proxy.key,
                    f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else ""),
                )
        try:
            with client.stream(url, headers=headers, timeout=proxy.timeout) as resp:
                status = resp.status_code
                body = bytearray()
                for chunk in iter_body(resp):  # a token is a few KiB: a larger answer is refused
                    body += chunk
                    if len(body) > _MAX_TOKEN_ANSWER:
                        raise FormatError(502, f"answered more than {_MAX_TOKEN_ANSWER} bytes for a token")
        except Exception as exc:  # UpstreamError and friends: say which step failed
            raise FormatError(502, f"token server {realm} for {proxy.key!r}: {exc}") from exc
        if status != 200:
            raise FormatError(
                502,
                f"token server {realm} refused a token for {params.get('scope') or scope(resource)} "
                f"({status}); check the auth settings of proxy {proxy.key!r}",
            )
        try:
            data = json.loads(body)
            value = data.get("token") or data.get("access_token")
            life = float(data.get("expires_in") or _DEFAULT_TOKEN_LIFE)
        except (ValueError, AttributeError, TypeError):
            value = None
            life = 0.0
        if not isinstance(value, str) or not value:
            raise FormatError(502, f"token server {realm} answered without a token")
        if value_problem(value):  # it would go into a header: refused, and never quoted
            raise FormatError(502, f"token server {realm} answered with a token that is not a header value")
        expires = ctx.now() + max(life - min(_TOKEN_MARGIN, life / 10), 0.0)
        now = ctx.now()
        with self._lock:
            self._tokens[token_key(ctx, resource)] = _Token(value, expires)
            self._tokens.move_to_end(token_key(ctx, resource))
            if len(self._tokens) > self._limit:
                for old in [k for k, t in self._tokens.items() if t.expires <= now]:
                    del self._tokens[old]
            while len(self._tokens) > self._limit:
                self._tokens.popitem(last=False)
        return {"Authorization": f"Bearer {value}"}
