"""The forward proxy of capture (docs/capture.md): ``CONNECT host:port`` and absolute-form
``GET http://host/path`` from clients whose ``HTTP(S)_PROXY`` names this server.

A captured host's ``CONNECT`` is answered ``200``, and the tunnel's TLS is terminated here with
a leaf the cache's CA minted for that host (capture/ca.py); the requests inside are read with the
server's own parser and answered by the engine as requests to the host's generic proxy
(capture/hosts.py), or, for a public registry's host, to the configured proxy of its built-in
source (server/capture_registries.py), so they are cached, recorded, replayed and reported like
any key's.  All of
it runs in the connection's worker thread, with blocking TLS bounded by the server's deadlines
(``header_timeout`` for the handshake and each request head, ``idle_timeout`` between requests,
``send_timeout`` for each write): never on the event loop, which only hands the connection over.

A host that is not captured is tunnelled untouched (bytes both ways, nothing cached) while the
network is allowed, and refused like every forward request today while it is blocked
(``tunnels`` off: the pytest plugin's network guard; ``Connection._refuse_forward``).  Without
capture nothing here runs: every forward request is refused.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import socket
import ssl
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from pytest_upstream.capture.hosts import captured, host_proxy, registry_route
from pytest_upstream.config.capture import CaptureSettings
from pytest_upstream.engine.dispatch import Engine
from pytest_upstream.messages import BadPath, Headers, ProxyRequest, Reply, split_proxy_path
from pytest_upstream.server import access_log
from pytest_upstream.server.capture_registries import registry_target
from pytest_upstream.server.limits import Limits
from pytest_upstream.server.request_reader import BadRequest, ParsedRequest, RequestReader
from pytest_upstream.server.responses import StreamFailed, Wire, error_bytes, send_reply

if TYPE_CHECKING:
    from collections.abc import Callable

    from pytest_upstream.capture.ca import CertificateAuthority  # imported when capture is on

log = logging.getLogger("pytest_upstream.server")
_SPLICE = 65536


def target_of(target: str, default_port: int) -> tuple[str, int] | None:
    """(host, port) of a ``CONNECT`` target or an absolute URL's authority, None when malformed."""
    parts = urlsplit(target if "://" in target else f"//{target}")
    try:
        port = parts.port or default_port
    except ValueError:
        return None
    host = parts.hostname or ""
    return (host, port) if host else None


@dataclass
class Forwarder:
    """Capture's state in one server: the CA, and whether hosts not captured may be tunnelled."""

    settings: CaptureSettings
    ca: CertificateAuthority
    engine: Engine
    limits: Limits
    tunnels: bool = True  # off while the pytest plugin blocks the network

    def captures(self, host: str) -> bool:
        return captured(self.settings, host)

    # -- one request for a captured origin -----------------------------------------------------
    def answer(
        self, method: str, target: str, headers: Headers, scheme: str, host: str, port: int, warm_only: bool
    ) -> tuple[str, Reply | None]:
        """(key, reply) for a request to a captured origin; reply None when ``warm_only`` and the
        engine would wait.  A public registry's host is answered by its configured proxy, as the
        host's role says (server/capture_registries.py; links the proxy renders point back at
        ``https://<host>/<key>/...``, asked for through us again); any other host by its own
        generic proxy (capture/hosts.py)."""
        raw_path, _, query = target.partition("?")
        if "://" in raw_path:
            raw_path = urlsplit(raw_path).path or "/"
        route = registry_route(self.engine.settings.proxies, host, port) if scheme == "https" else None
        keyless = False
        if route is not None:
            proxy = route.proxy
            mapped = registry_target(route, raw_path)
            if isinstance(mapped, Reply):
                return proxy.key, mapped
            (path, keyless), base_url = mapped, f"https://{host}"
        else:
            template = self.engine.settings.proxies[0] if self.engine.settings.proxies else None
            proxy = host_proxy(host, port, scheme, template)
            path, base_url = raw_path, proxy.url.rstrip("/")
        key = proxy.key
        try:
            key, rest = split_proxy_path(f"/{key}{path}")
        except (BadPath, UnicodeDecodeError) as exc:
            reply = Reply.text(400, f"bad request path: {exc}")
            reply.reason = f"Bad request path ({exc})"
            return key, reply
        request = ProxyRequest(
            method=method,
            key=key,
            path=rest,
            query=query,
            headers=headers,
            base_url=base_url,
            keyless=keyless,
        )
        try:
            return key, self.engine.handle_captured(request, proxy, warm_only=warm_only)
        except Exception as exc:  # a bug: answer 500 instead of dropping the tunnel
            log.exception("error handling %s %s for %s", method, target, host)
            reply = Reply.text(500, "internal error")
            reply.reason = f"Internal error in pytest-upstream ({self.engine.scrub(type(exc).__name__)})"
            return key, reply

    # -- CONNECT -------------------------------------------------------------------------------
    def connect(
        self, sock: socket.socket, client: str, host: str, port: int, stopping: Callable[[], bool]
    ) -> None:
        """Serve a ``CONNECT`` the caller has checked (a worker thread; ``sock`` blocking):
        intercept a captured host, tunnel another one.  The caller closes ``sock`` afterwards."""
        if self.captures(host):
            self._intercept(sock, client, host, port, stopping)
        else:
            self._tunnel(sock, client, host, port)

    def _intercept(
        self, sock: socket.socket, client: str, host: str, port: int, stopping: Callable[[], bool]
    ) -> None:
        limits = self.limits
        try:
            context = self.ca.server_context(host)
        except ValueError as exc:  # a name no certificate can carry
            with contextlib.suppress(OSError):
                sock.sendall(error_bytes(400, f"Bad Request (no certificate for {host!r}: {exc})"))
            return
        try:
            sock.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        except OSError:
            return  # the client left
        raw = socket.socket(fileno=os.dup(sock.fileno()))  # the TLS layer's own; the caller closes sock
        raw.settimeout(limits.header_timeout)
        try:
            tls = context.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as exc:  # a client that does not trust the CA ends here
            log.info("TLS handshake with %s for %s failed: %s", client, host, exc)
            raw.close()
            return
        try:
            self._requests(tls, client, host, port, stopping)
        finally:
            with contextlib.suppress(OSError, ValueError):
                tls.close()

    def _requests(
        self, tls: ssl.SSLSocket, client: str, host: str, port: int, stopping: Callable[[], bool]
    ) -> None:
        """Read and answer the requests inside one tunnel until it closes or a deadline passes."""
        limits = self.limits

        def send_continue() -> None:
            with contextlib.suppress(OSError):
                tls.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")

        reader = RequestReader(limits, send_continue)
        wire = Wire(tls)
        answered = 0
        while not stopping():
            began = time.monotonic()
            while not reader.ready:
                if reader.started is not None:
                    deadline = reader.started + limits.header_timeout
                else:
                    deadline = began + (limits.idle_timeout if answered else limits.header_timeout)
                remaining = deadline - time.monotonic()
                try:
                    if remaining <= 0:
                        raise TimeoutError
                    tls.settimeout(remaining)
                    data = tls.recv(_SPLICE)
                except TimeoutError:
                    if reader.started is not None:
                        self._refuse(tls, 408, "Request Timeout (the request head took too long)")
                    return
                except (ssl.SSLError, OSError):
                    return
                if not data:
                    return
                try:
                    reader.feed(data)
                except BadRequest as bad:
                    if not reader.ready:
                        self._refuse(tls, bad.status, bad.reason)
                        return
            request = reader.ready.popleft()
            if not self._answer(tls, wire, request, client, host, port):
                return
            answered += 1
            if not wire.keep_alive:
                return

    def _answer(
        self, tls: ssl.SSLSocket, wire: Wire, request: ParsedRequest, client: str, host: str, port: int
    ) -> bool:
        started = time.monotonic()
        headers = Headers(request.headers)
        wire.start(request.method, request.version, request.keep_alive)
        if request.method == "CONNECT":
            key, reply = "", Reply.text(405, "CONNECT inside a tunnel is not supported")
            wire.keep_alive = False
        else:
            key, routed = self.answer(request.method, request.target, headers, "https", host, port, False)
            assert routed is not None
            reply = routed
        tls.settimeout(self.limits.send_timeout)
        ok = True
        try:
            send_reply(wire, headers, reply)
        except StreamFailed as exc:
            log.warning("aborted %s %s for %s: %s", request.method, request.target, host, exc)
            ok = False
        except (ssl.SSLError, OSError) as exc:
            log.debug("client %s left during %s %s: %s", client, request.method, request.target, exc)
            ok = False
        access_log.log_access(
            method=request.method,
            target=f"https://{host}:{port}{request.target}",
            status=reply.status,
            cache=reply.headers.get("X-Upstream-Cache", ""),
            key=key,
            nbytes=wire.sent,
            millis=(time.monotonic() - started) * 1000,
            client=client,
        )
        return ok

    def _refuse(self, tls: ssl.SSLSocket, status: int, reason: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            tls.settimeout(self.limits.send_timeout)
            tls.sendall(error_bytes(status, reason))

    # -- tunnelling a host not captured --------------------------------------------------------
    def _tunnel(self, sock: socket.socket, client: str, host: str, port: int) -> None:
        """Bytes both ways between the client and ``host:port``, until one side closes or
        nothing moves for ``idle_timeout``."""
        try:
            upstream = socket.create_connection((host, port), timeout=self.limits.header_timeout)
        except OSError as exc:
            message = f"cannot reach {host}:{port} ({exc.strerror or exc})"
            reply = error_bytes(502, f"Bad Gateway ({message})")
            with contextlib.suppress(OSError):
                sock.sendall(reply)
            return
        log.info("tunnelling %s to %s:%d (not captured)", client, host, port)
        with upstream, selectors.DefaultSelector() as selector:
            try:
                sock.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            except OSError:
                return
            upstream.settimeout(self.limits.send_timeout)
            selector.register(sock, selectors.EVENT_READ, upstream)
            selector.register(upstream, selectors.EVENT_READ, sock)
            while True:
                ready = selector.select(self.limits.idle_timeout)
                if not ready:
                    return
                for key, _ in ready:
                    source = key.fileobj
                    assert isinstance(source, socket.socket)
                    try:
                        data = source.recv(_SPLICE)
                        if not data:
                            return
                        key.data.sendall(data)
                    except OSError:
                        return
