"""One client connection: its request/response loop in the connection's own thread.

``request_reader.py`` parses (httptools) and ``responses.py`` frames; this module keeps the
deadlines: the whole head within ``header_timeout`` (slowloris), ``idle_timeout`` between
kept-alive requests, and it routes: the index, the forward-proxy refusal, ``/<key>/<path>`` to
the engine.  A malformed request gets its status (400, 408, 413, 414, 431, 505) and the
connection closes, so nothing after it (a body, a request hidden in one) is ever read as a
request.  Deadlines are kernel timeouts on a blocking socket (SO_RCVTIMEO, SO_SNDTIMEO):
a request that arrives whole costs no extra system call, where a socket timeout in Python
would poll before every read and write.

The blocking engine runs right here: a client waiting on a slow upstream or on another
process's download holds its own thread and nothing else.  A client that goes away
(reset, broken pipe, a stalled reader past ``send_timeout``) is ordinary, not an error.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from pytest_upstream.engine.dispatch import Engine
from pytest_upstream.messages import BadPath, Headers, ProxyRequest, Reply, split_proxy_path
from pytest_upstream.repro.netguard import exempt_current_thread, is_loopback
from pytest_upstream.server import access_log
from pytest_upstream.server.admission import Admission
from pytest_upstream.server.limits import Limits
from pytest_upstream.server.request_reader import BadRequest, ParsedRequest, RequestReader
from pytest_upstream.server.responses import (
    StreamFailed,
    Wire,
    cut,
    error_bytes,
    send_reply,
    set_send_timeout,
    timeval,
)

log = logging.getLogger("pytest_upstream.server")
# After the last reply: read what the client still sends for a moment, so that closing with
# unread bytes does not reset the connection before the client has read that reply.
_LINGER_SECONDS = 1.0
_LINGER_BYTES = 256 * 1024


@dataclass
class Site:
    """What every connection of one server shares."""

    engine: Engine
    limits: Limits
    port: int
    index: Callable[[], dict[str, Any]]
    refused: list[tuple[str, str]] = field(default_factory=list)  # (host, test) of refused forward requests
    stopping: threading.Event = field(default_factory=threading.Event)
    admission: Admission = field(default_factory=lambda: Admission(loopback_bound=False))  # admission.py


class Connection:
    """One accepted client socket; ``run()`` is its thread's body."""

    def __init__(
        self, sock: socket.socket, client: str, site: Site, on_close: Callable[[Connection], None]
    ) -> None:
        self.sock = sock
        self.client = client
        self.site = site
        self.wire = Wire(sock)
        self.reader = RequestReader(site.limits, self._send_continue)
        self._on_close = on_close
        self._lock = threading.Lock()
        self._recv_timeout = -1.0
        self.idle = False  # waiting, kept alive, for the first byte of a next request
        self.idle_since = time.monotonic()
        # Waiting for (the rest of) a request head since this time; None while answering.  At the
        # cap such a connection is shed after the idle ones, the longest waiting first: so
        # connections trickling a header (slowloris) cannot keep a real client out.
        self.head_since: float | None = time.monotonic()

    def shed(self, *, only_idle: bool = True) -> bool:
        """Close this connection from another thread (the cap, EMFILE, stop); False if it was
        answering a request (``only_idle``: if it was not idle between requests either)."""
        with self._lock:
            if only_idle and not self.idle:
                return False
            if self.head_since is None:
                return False
            cut(self.sock)
            return True

    def shed_waiting(self) -> bool:
        """Close this connection if it is still waiting for a request head (the cap)."""
        with self._lock:
            if self.head_since is None:
                return False
            cut(self.sock)
            return True

    def run(self) -> None:
        exempt_current_thread()  # the proxy must reach upstreams while tests are blocked (netguard.py)
        metrics = self.site.engine.metrics
        metrics.connection_opened()
        try:
            # Headers and a sendfile body are two writes: without NODELAY, Nagle plus
            # delayed ACKs would stall every keep-alive response by ~40 ms.
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            set_send_timeout(self.sock, self.site.limits.send_timeout)
            self._serve()
        except OSError as exc:  # reset, broken pipe, a timeout: the client went away
            log.debug("connection from %s ended: %s", self.client, exc)
        except Exception:
            log.exception("connection from %s failed", self.client)
        finally:
            with contextlib.suppress(OSError):
                self.sock.close()
            metrics.connection_closed()
            self._on_close(self)

    def _serve(self) -> None:
        opened = time.monotonic()
        reader = self.reader
        while True:
            while not reader.ready:
                try:
                    if not self._receive(opened):
                        return
                except BadRequest as bad:
                    while reader.ready:  # whole requests before the bad one are answered first
                        if not self._answer(reader.ready.popleft()):
                            return
                    self._refuse(bad.status, bad.reason)
                    return
            opened = 0.0
            with self._lock:
                self.head_since = None  # answering: never shed
            if not self._answer(reader.ready.popleft()) or self.site.stopping.is_set():
                self._linger()
                return
            with self._lock:
                self.head_since = time.monotonic()

    # -- reading ------------------------------------------------------------
    def _receive(self, opened: float) -> bool:
        """Read and parse more bytes within the deadlines; False when the client is gone or
        was idle too long; raises BadRequest for a malformed request or a late head."""
        limits = self.site.limits
        reader = self.reader
        if reader.started is not None and not reader.head_done:  # the whole head, from its first byte
            timeout = (opened or reader.started) + limits.header_timeout - time.monotonic()
        elif reader.started is not None:
            timeout = limits.send_timeout  # a body, read to be dropped: progress, like a write
        elif opened:
            timeout = opened + limits.header_timeout - time.monotonic()  # a new connection's first head
        else:
            timeout = limits.idle_timeout
        if timeout <= 0:
            raise BadRequest(408, "Request Timeout (the request head took too long)")
        idle = reader.started is None and not opened
        if idle:
            with self._lock:
                self.idle = True
                self.idle_since = time.monotonic()
        try:
            self._set_recv_timeout(timeout)
            data = self.sock.recv(65536)
        except BlockingIOError:  # SO_RCVTIMEO expired
            if idle:
                return False  # idle past idle_timeout: close quietly
            if reader.started is None or not reader.head_done:
                raise BadRequest(408, "Request Timeout (the request head took too long)") from None
            return False
        finally:
            if idle:
                with self._lock:
                    self.idle = False
        if not data:
            return False
        reader.feed(data)
        return True

    def _set_recv_timeout(self, seconds: float) -> None:
        """SO_RCVTIMEO, set only when it changes (one system call per idle wait at most)."""
        if abs(seconds - self._recv_timeout) > 0.001:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval(max(seconds, 0.001)))
            self._recv_timeout = seconds

    def _send_continue(self) -> None:
        self.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")

    # -- answering ----------------------------------------------------------
    def _answer(self, request: ParsedRequest) -> bool:
        """Answer one request; False when the connection must close afterwards."""
        started = time.monotonic()
        method, target = request.method, request.target
        headers = Headers(request.headers)
        self.wire.start(method, request.version, request.keep_alive)
        key, reply = self._route(method, target, headers)
        ok = self._send(method, target, headers, reply)
        access_log.log_access(
            method=method,
            target=target,
            status=reply.status,
            cache=reply.headers.get("X-Upstream-Cache", ""),
            key=key,
            nbytes=self.wire.sent,
            millis=(time.monotonic() - started) * 1000,
            client=self.client,
        )
        return ok and self.wire.keep_alive

    def _route(self, method: str, target: str, headers: Headers) -> tuple[str, Reply]:
        """(key, reply) for one request."""
        if method == "CONNECT":
            return "", self._refuse_forward(method, target, urlsplit(f"//{target}").hostname or target)
        raw_path, _, query = target.partition("?")
        if raw_path.startswith(("http://", "https://")):  # absolute-form: a client using us as HTTP_PROXY
            url = urlsplit(raw_path)
            try:
                port = url.port
            except ValueError:
                port = None
            if not (is_loopback(url.hostname or "") and port == self.site.port):
                return "", self._refuse_forward(method, target, url.hostname or url.netloc)
            raw_path = url.path or "/"  # addressed to this proxy itself: serve it
            host_checked = True  # the URL names this proxy on a loopback address
        else:
            host_checked = False
        if (refusal := self.site.admission.refusal(raw_path, headers, host_checked)) is not None:
            return "", refusal
        if raw_path == "/":
            return "", Reply.json(200, self.site.index())
        try:
            key, rest = split_proxy_path(raw_path)
        except (BadPath, UnicodeDecodeError) as exc:
            reply = Reply.text(400, f"bad request path: {exc}")
            reply.reason = f"Bad request path ({exc})"
            return "", reply
        host = headers.get("Host") or f"127.0.0.1:{self.site.port}"
        request = ProxyRequest(
            method=method, key=key, path=rest, query=query, headers=headers, base_url=f"http://{host}"
        )
        try:
            return key, self.site.engine.handle(request)
        except Exception as exc:  # a bug: answer 500 instead of dropping the connection
            log.exception("error handling %s %s", method, target)
            why = self.site.engine.scrub(f"{type(exc).__name__}: {exc}")
            return key, _error(500, f"Internal error in pytest-upstream ({why})")

    def _refuse_forward(self, method: str, target: str, host: str) -> Reply:
        """403 for a forward-proxy request (the plugin exports HTTP(S)_PROXY pointing here while
        the network is blocked); the reason phrase carries the message, as CONNECT clients show it."""
        message = f"no upstream proxy is configured for {host}; the build tried to reach it directly"
        log.warning("refused %s %s: %s", method, target, message)
        self.site.refused.append((host, self.site.engine.served.current_test))
        reply = Reply.text(403, message, {"Connection": "close"})
        reply.reason = message
        return reply

    def _send(self, method: str, target: str, headers: Headers, reply: Reply) -> bool:
        try:
            send_reply(self.wire, headers, reply)
        except StreamFailed as exc:
            log.warning("aborted %s %s: %s", method, target, exc)
            cut(self.sock)
            return False
        except OSError as exc:
            log.debug("client %s left during %s %s: %s", self.client, method, target, exc)
            return False
        return True

    def _refuse(self, status: int, reason: str) -> None:
        """Answer a request that cannot be read, then close."""
        log.debug("refused a request from %s: %d %s", self.client, status, reason)
        with contextlib.suppress(OSError):
            self.sock.sendall(error_bytes(status, reason))
        access_log.log_access(
            method="-", target="-", status=status, cache="", key="", nbytes=0, millis=0.0, client=self.client
        )
        self._linger()

    def _linger(self) -> None:
        """Close gracefully: stop sending, then read and drop what the client still sends."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + _LINGER_SECONDS
            left = _LINGER_BYTES
            while left > 0 and (remaining := deadline - time.monotonic()) > 0:
                self._set_recv_timeout(remaining)
                data = self.sock.recv(65536)
                if not data:
                    break
                left -= len(data)


def _error(status: int, reason: str) -> Reply:
    reply = Reply.text(status, reason)
    reply.reason = reason
    return reply
