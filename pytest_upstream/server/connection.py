"""One client connection: its state, and answering its requests.

The event loop (``listener.py``) owns a connection while it is idle or reading a request head:
it reads without blocking, parses (``request_reader.py``, httptools) and keeps the deadlines
(the whole head within ``header_timeout``, ``idle_timeout`` between kept-alive requests).  A
whole request is answered right there when the engine can answer it without waiting
(``answer_inline``: a warm hit, an error, the index, ``/-/…``), else the connection goes to a
worker thread (``answer_in_worker``), which runs the blocking engine (misses, downloads in
flight, sendfile of big files, streams) and hands the connection back when the reply is done.
Routing is one function for both: the index, the forward-proxy refusal, the ``/-/ui/`` pages
(``ui/routes.py``, always in a worker), ``/<key>/<path>`` to the engine.  A malformed request gets
its status (400, 408, 413, 414, 431, 505) and the connection closes, so nothing after it (a
body, a request hidden in one) is ever read as a request.  A client that goes away (reset,
broken pipe, a stalled reader past ``send_timeout``, a kernel timeout ``SO_SNDTIMEO`` on the
worker's blocking writes) is ordinary, not an error.
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
from pytest_upstream.repro.netguard import is_loopback
from pytest_upstream.server import access_log
from pytest_upstream.server.admission import Admission
from pytest_upstream.server.forward import Forwarder, target_of
from pytest_upstream.server.limits import Limits
from pytest_upstream.server.request_reader import BadRequest, ParsedRequest, RequestReader
from pytest_upstream.server.responses import StreamFailed, Wire, cut, error_bytes, reply_bytes, send_reply
from pytest_upstream.server.ui import routes as ui

log = logging.getLogger("pytest_upstream.server")
# After the last reply: read what the client still sends for a moment, so that closing with
# unread bytes does not reset the connection before the client has read that reply.
LINGER_SECONDS = 1.0
LINGER_BYTES = 256 * 1024
_PATHS = 1024  # split request paths remembered (Site.paths)
INLINE_FILE = 64 * 1024  # a hit of a file up to this size is read and sent by the event loop


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
    # split_proxy_path's answers for the paths asked for lately: a warm page is asked for again and again
    paths: dict[str, tuple[str, str]] = field(default_factory=dict)
    forward: Forwarder | None = None  # capture (server/forward.py): None refuses every forward request


# What a connection is doing, for the deadlines and the order connections are shed in at the cap.
HEAD = "head"  # waiting for (the rest of) a request head: its first one, or one begun
IDLE = "idle"  # kept alive between requests, no byte of the next one yet
BODY = "body"  # reading a request body to drop it
BUSY = "busy"  # being answered by a worker thread: never shed
LINGER = "linger"  # answered for the last time: reading what the client still sends, then closed


@dataclass(eq=False)
class Pending:
    """What a worker thread finishes for the event loop: the request being answered, with the
    reply the loop already has (a file or a stream) or the bytes it could not write at once."""

    request: ParsedRequest
    started: float
    key: str = ""
    reply: Reply | None = None
    unsent: bytes = b""


class Connection:
    """One accepted client socket (non-blocking while the event loop owns it)."""

    def __init__(self, sock: socket.socket, client: str, site: Site) -> None:
        self.sock = sock
        self.client = client
        self.site = site
        self.wire = Wire(sock)
        self.reader = RequestReader(site.limits, self._send_continue)
        self.opened = time.monotonic()
        self.state = HEAD
        self.since = self.opened  # when the state began (a read of the body moves it on)
        self.answered = 0  # requests answered on this connection
        self.refusal: BadRequest | None = None  # a malformed request after the ready ones
        self.lingered = 0  # bytes read and dropped while lingering

    def deadline(self) -> tuple[float, int]:
        """(when, status): the status to answer when the deadline passes (0: close quietly)."""
        limits = self.site.limits
        if self.state == IDLE:
            return self.since + limits.idle_timeout, 0
        if self.state == BODY:
            return self.since + limits.send_timeout, 0  # progress, like a write
        if self.state == LINGER:
            return self.since + LINGER_SECONDS, 0
        if self.state == BUSY:
            return float("inf"), 0
        began = self.opened if not self.answered else (self.reader.started or self.since)
        return began + limits.header_timeout, 408

    def _send_continue(self) -> None:
        with contextlib.suppress(OSError):  # a small write: the socket buffer takes it
            self.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")

    def refuse(self, status: int, reason: str) -> None:
        """Answer a request that cannot be read (without blocking: the reply is small); the
        caller then closes the connection."""
        log.debug("refused a request from %s: %d %s", self.client, status, reason)
        with contextlib.suppress(OSError):
            self.sock.send(error_bytes(status, reason))
        access_log.log_access(
            method="-", target="-", status=status, cache="", key="", nbytes=0, millis=0.0, client=self.client
        )

    # -- answering ----------------------------------------------------------
    def answer_inline(self, request: ParsedRequest) -> Pending | None:
        """Answer ``request`` now if that takes no waiting (the event loop's thread; the socket
        is non-blocking); else what a worker must finish."""
        started = time.monotonic()
        headers = Headers(request.headers)
        self.wire.start(request.method, request.version, request.keep_alive)
        key, reply = self._route(request.method, request.target, headers, started, warm_only=True)
        if reply is None:
            return Pending(request, started)
        try:
            data = reply_bytes(self.wire, headers, reply, INLINE_FILE)
        except (OSError, StreamFailed):  # the file went or shrank: the worker's send says so
            data = None
        if data is None:
            return Pending(request, started, key, reply)
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            log.debug(
                "client %s left during %s %s: %s", self.client, request.method, _shown(request.target), exc
            )
            self.wire.keep_alive = False
            sent = len(data)
        if sent < len(data):
            return Pending(request, started, key, reply, data[sent:])
        self._log(request, key, reply, started)
        return None

    def answer_in_worker(self, pending: Pending) -> bool:
        """Finish ``pending`` (a worker thread; the socket is blocking, with ``SO_SNDTIMEO``);
        False when the connection must close afterwards.  Requests read with it are the loop's
        again once the connection is handed back."""
        request = pending.request
        headers = Headers(request.headers)
        if pending.reply is None and request.method == "CONNECT":
            return self._connect(request, headers, pending.started)
        if pending.reply is None:
            self.wire.start(request.method, request.version, request.keep_alive)
            pending.key, routed = self._route(request.method, request.target, headers, pending.started)
            assert routed is not None  # only warm_only routing answers None
            reply = routed
            ok = self._send(request, headers, reply)
        elif pending.unsent:
            reply = pending.reply
            try:
                self.sock.sendall(pending.unsent)
                ok = True
            except OSError as exc:
                log.debug(
                    "client %s left during %s %s: %s",
                    self.client,
                    request.method,
                    _shown(request.target),
                    exc,
                )
                ok = False
        else:
            reply = pending.reply
            ok = self._send(request, headers, reply)
        self._log(request, pending.key, reply, pending.started)
        return ok and self.wire.keep_alive

    def _log(self, request: ParsedRequest, key: str, reply: Reply, started: float) -> None:
        access_log.log_access(
            method=request.method,
            target=_shown(request.target),
            status=reply.status,
            cache=reply.headers.get("X-Upstream-Cache", ""),
            key=key,
            nbytes=self.wire.sent,
            millis=(time.monotonic() - started) * 1000,
            client=self.client,
        )

    def _route(
        self, method: str, target: str, headers: Headers, started: float, warm_only: bool = False
    ) -> tuple[str, Reply | None]:
        """(key, reply) for one request read at ``started`` (monotonic: a served record's duration
        counts from it, as the access log's time does); ``warm_only``: reply None when the engine
        would wait."""
        if method == "CONNECT":  # answered by a worker (_connect) unless refused now
            return "", self._connect_refusal(target, headers)
        raw_path, _, query = target.partition("?")
        if raw_path.startswith(("http://", "https://")):  # absolute-form: a client using us as HTTP_PROXY
            url = urlsplit(raw_path)
            try:
                port = url.port
            except ValueError:
                port = None
            if not (is_loopback(url.hostname or "") and port == self.site.port):
                forward, origin = self.site.forward, target_of(raw_path, 443 if url.scheme == "https" else 80)
                if forward is None or origin is None or not forward.captures(origin[0]):
                    return "", self._refuse_forward(method, target, url.hostname or url.netloc)
                if (refusal := self.site.admission.forward_refusal(headers)) is not None:
                    return "", refusal
                return forward.answer(method, target, headers, url.scheme, *origin, warm_only)
            raw_path = url.path or "/"  # addressed to this proxy itself: serve it
            host_checked = True  # the URL names this proxy on a loopback address
        else:
            host_checked = False
        if (refusal := self.site.admission.refusal(raw_path, headers, host_checked, query)) is not None:
            return "", refusal
        if ui.is_ui(raw_path):  # the browser pages (server/ui/): rendered by a worker
            if warm_only:
                return "", None
            try:
                return "", ui.answer(self.site.engine, self.site.admission, method, raw_path, query)
            except Exception as exc:  # a bug: a 500, logged without the query (it may hold the token)
                log.exception("error rendering %s %s", method, raw_path)
                return "", _error(500, f"Internal error in pytest-upstream ({type(exc).__name__})")
        if raw_path == "/":
            return "", Reply.json(200, self.site.index())
        split = self.site.paths.get(raw_path)
        if split is None:
            try:
                split = split_proxy_path(raw_path)
            except (BadPath, UnicodeDecodeError) as exc:
                reply = Reply.text(400, f"bad request path: {exc}")
                reply.reason = f"Bad request path ({exc})"
                return "", reply
            if len(self.site.paths) >= _PATHS:
                self.site.paths.clear()  # the paths are the clients': a flood of them stays bounded
            self.site.paths[raw_path] = split
        key, rest = split
        host = headers.get("Host") or f"127.0.0.1:{self.site.port}"
        request = ProxyRequest(
            method=method,
            key=key,
            path=rest,
            query=query,
            headers=headers,
            base_url=f"http://{host}",
            received=started,
        )
        try:
            if warm_only:
                return key, self.site.engine.answer_warm(request)
            return key, self.site.engine.handle(request)
        except Exception as exc:  # a bug: answer 500 instead of dropping the connection
            log.exception("error handling %s %s", method, _shown(target))
            why = self.site.engine.scrub(f"{type(exc).__name__}: {exc}")
            return key, _error(500, f"Internal error in pytest-upstream ({why})")

    def _connect_refusal(self, target: str, headers: Headers) -> Reply | None:
        """The reply refusing a ``CONNECT``, or None when a worker is to serve it: capture is on,
        the target is well-formed, the token (if any) is right, and its host is captured or
        may be tunnelled."""
        forward = self.site.forward
        origin = target_of(target, 443)
        host = origin[0] if origin else target
        if forward is None or origin is None or not (forward.tunnels or forward.captures(host)):
            return self._refuse_forward("CONNECT", target, host)
        return self.site.admission.forward_refusal(headers)

    def _connect(self, request: ParsedRequest, headers: Headers, started: float) -> bool:
        """A ``CONNECT`` (a worker thread): refused, or the tunnel served to its end; the
        connection closes afterwards either way."""
        self.wire.start(request.method, request.version, False)
        refusal = self._connect_refusal(request.target, headers)
        origin = target_of(request.target, 443)
        if refusal is None and self.site.forward is not None and origin is not None:
            self.site.forward.connect(self.sock, self.client, *origin, self.site.stopping.is_set)
            reply = Reply.text(200, "")
        else:
            reply = refusal or _error(400, "Bad Request (bad CONNECT target)")
            self._send(request, headers, reply)
        self._log(request, "", reply, started)
        return False

    def _refuse_forward(self, method: str, target: str, host: str) -> Reply:
        """403 for a forward-proxy request (the plugin exports HTTP(S)_PROXY pointing here while
        the network is blocked); the reason phrase carries the message, as CONNECT clients show it."""
        message = f"no upstream proxy is configured for {host}; the build tried to reach it directly"
        log.warning("refused %s %s: %s", method, target, message)
        self.site.refused.append((host, self.site.engine.served.current_test))
        reply = Reply.text(403, message, {"Connection": "close"})
        reply.reason = message
        return reply

    def _send(self, request: ParsedRequest, headers: Headers, reply: Reply) -> bool:
        try:
            send_reply(self.wire, headers, reply)
        except StreamFailed as exc:
            log.warning("aborted %s %s: %s", request.method, _shown(request.target), exc)
            cut(self.sock)
            return False
        except OSError as exc:
            log.debug(
                "client %s left during %s %s: %s", self.client, request.method, _shown(request.target), exc
            )
            return False
        return True


def _shown(target: str) -> str:
    """A request target as log lines show it: a UI ``?token=`` redacted (access_log.py)."""
    return access_log.without_token(target)


def _error(status: int, reason: str) -> Reply:
    reply = Reply.text(status, reason)
    reply.reason = reason
    return reply
