"""Which clients the proxy server answers: the Host check and the client token.

Both live in the server, not the engine: they are about who reached this socket (the Host
check needs the address the server is bound to), they must come before every route (the index at
``/``, the proxy's own ``/-/…`` URLs, every proxy key), and an in-process client (the pytest
plugin routing a test's own HTTP calls to the engine) never comes through a socket.

- **Host (DNS rebinding):** a web page can make a browser send requests to a name that resolves
  to 127.0.0.1; the browser then sends that name as the Host.  A loopback-bound proxy answers only a
  Host that is a loopback name or address, or one listed in ``allowed_hosts``; anything else gets
  ``421 Misdirected Request``.  A proxy bound to another address is reached by names nobody can
  list in advance, so it relies on the token instead (``serve`` warns when it has none).
- **Token (``serve --token-env VAR``):** every request carries ``Authorization: Bearer <token>``
  or Basic with the token as the password (any user name): how pip, npm and Maven send the
  credentials of an index URL or a settings file.  Otherwise ``401`` with a ``WWW-Authenticate``
  challenge.  ``/-/ready`` stays open for readiness probes (it tells nothing but "ready").
  The browser pages under ``/-/ui/`` (docs/ui.md) also take the token once as ``?token=``
  (the UI then sets a cookie and redirects to the page without it) and from then on that
  cookie: an HttpOnly, SameSite=Strict value derived from the token by HMAC, so the cookie
  never holds the token, opens nothing but ``/-/ui/`` and stops working when the token changes.
  The token is read from the environment per request (checked at start by ``serve``) and compared
  in constant time; it is never stored or printed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

from pytest_upstream.config.settings import Settings
from pytest_upstream.engine.hosts import checked_base_url
from pytest_upstream.messages import Headers, Reply
from pytest_upstream.repro.netguard import is_loopback

_VERDICTS = 256  # Host values whose verdict is remembered
OPEN_PATHS = ("/-/ready",)  # answered without the token: readiness probes carry no credentials
UI_PREFIX = "/-/ui/"  # the browser pages: the token may come as ?token= or the UI cookie
UI_COOKIE = "upstream_ui"
_UI_COOKIE_MESSAGE = b"pytest-upstream /-/ui/ cookie v1"


@dataclass(frozen=True)
class Admission:
    """What one server checks before routing a request."""

    loopback_bound: bool  # bound to a loopback address: the Host check applies
    allowed_hosts: frozenset[str] = frozenset()  # "host" (any port) or "host:port", lower case
    token_env: str | None = None  # the variable holding the clients' token (names only: safe to print)
    _verdicts: dict[str, bool] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def for_server(cls, settings: Settings, bind_host: str) -> Admission:
        return cls(
            loopback_bound=is_loopback(bind_host),
            allowed_hosts=frozenset(h.lower() for h in settings.allowed_hosts),
            token_env=settings.client_token_env,
        )

    def refusal(
        self, raw_path: str, headers: Headers, host_checked: bool = False, query: str = ""
    ) -> Reply | None:
        """The reply refusing this request, or None to answer it (``host_checked``: an absolute
        URL already named this proxy on a loopback address; ``query``: the UI's ``?token=``)."""
        host = headers.get("Host") or ""
        # A Host that is no host[:port] at all is the engine's 400 (one check, dispatch.py).
        host_checked = host_checked or (bool(host) and checked_base_url(f"http://{host}") is None)
        if self.loopback_bound and not host_checked and not self.host_allowed(host):
            reply = Reply.text(
                421,
                "this proxy is bound to loopback and answers only requests addressed to a loopback "
                "name or address (or a name in allowed_hosts): the Host header names another host",
                {"Connection": "close"},
            )
            reply.reason = "Misdirected Request (Host not allowed)"
            return reply
        if (
            self.token_env
            and raw_path not in OPEN_PATHS
            and not self.token_ok(headers.get("Authorization"))
            and not (raw_path.startswith(UI_PREFIX) and self._ui_token_ok(headers, query))
        ):
            reply = Reply.text(
                401,
                "this proxy requires a token: send 'Authorization: Bearer <token>', or the token as "
                "the password of the index URL (http://user:<token>@host:port/...)"
                + (
                    " or of the browser's prompt, or open /-/ui/?token=<token> once"
                    if raw_path.startswith(UI_PREFIX)
                    else ""
                ),
                {"WWW-Authenticate": 'Basic realm="pytest-upstream", charset="UTF-8"'},
            )
            reply.reason = "Token required"
            return reply
        return None

    def forward_refusal(self, headers: Headers) -> Reply | None:
        """The reply refusing a forward-proxy request (capture: ``CONNECT``, absolute-form), or
        None.  Its Host names the upstream, not us, so only the token applies, sent as
        ``Proxy-Authorization`` (what clients send for ``http://user:<token>@host:port`` in
        ``HTTPS_PROXY``)."""
        if self.token_env and not self.token_ok(headers.get("Proxy-Authorization")):
            reply = Reply.text(
                407,
                "this proxy requires a token: put it in the proxy URL (http://user:<token>@host:port)",
                {
                    "Proxy-Authenticate": 'Basic realm="pytest-upstream", charset="UTF-8"',
                    "Connection": "close",
                },
            )
            reply.reason = "Proxy token required"
            return reply
        return None

    def host_allowed(self, host: str) -> bool:
        """Whether a Host header (``name``, ``name:port``, ``[v6]:port``) is loopback or listed
        (remembered for a few hundred Host values: clients send the same one every request)."""
        known = self._verdicts.get(host)
        if known is None:
            known = self._host_allowed(host)
            if len(self._verdicts) >= _VERDICTS:
                self._verdicts.clear()  # the Host is the client's: a flood of them stays bounded
            self._verdicts[host] = known
        return known

    def _host_allowed(self, host: str) -> bool:
        host = host.strip().lower()
        if not host:
            return True  # HTTP/1.0 without Host: nothing a browser sends
        parts = urlsplit(f"//{host}")
        try:
            port = parts.port
        except ValueError:
            return False
        name = parts.hostname or ""
        shown = f"[{name}]" if ":" in name else name
        if is_loopback(name) or shown in self.allowed_hosts:
            return True
        return port is not None and f"{shown}:{port}" in self.allowed_hosts

    def ui_cookie(self) -> str | None:
        """The UI cookie's value for the current token (None without a token): an HMAC of a fixed
        message keyed by the token, so the cookie is not the token and dies with it."""
        expected = os.environ.get(self.token_env or "")
        if not expected:
            return None
        return hmac.new(expected.encode(), _UI_COOKIE_MESSAGE, hashlib.sha256).hexdigest()

    def _ui_token_ok(self, headers: Headers, query: str) -> bool:
        """The UI's own ways to carry the token: its cookie, or ``?token=`` (once, then the cookie)."""
        expected = self.ui_cookie()
        if expected is None:
            return False
        for part in (headers.get("Cookie") or "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == UI_COOKIE and hmac.compare_digest(value.encode(), expected.encode()):
                return True
        if query:
            try:
                tokens = [v for n, v in parse_qsl(query[:4096], max_num_fields=16) if n == "token"]
            except ValueError:  # more fields than a UI page takes
                return False
            return len(tokens) == 1 and self.token_ok(f"Bearer {tokens[0]}")
        return False

    def token_ok(self, authorization: str | None) -> bool:
        expected = os.environ.get(self.token_env or "")
        if not expected or not authorization:
            return False  # an unset token refuses everything: fail closed
        scheme, _, value = authorization.strip().partition(" ")
        value = value.strip()
        if scheme.lower() == "bearer":
            given = value
        elif scheme.lower() == "basic":
            try:
                pair = base64.b64decode(value, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return False
            given = pair.partition(":")[2]
        else:
            return False
        return hmac.compare_digest(given.encode(), expected.encode())
