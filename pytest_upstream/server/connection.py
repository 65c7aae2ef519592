"""One client connection: h11's request/response loop in the connection's own thread.

h11 parses and frames; this module adds what h11 leaves to its user: deadlines (the whole
head within ``header_timeout``, ``idle_timeout`` between kept-alive requests, progress within
``send_timeout`` on every write), the checks h11 does not make (obs-fold, a request with both
Content-Length and Transfer-Encoding, a bad Host, HTTP versions other than 1.x, a too-long
target), and the proxy's own routing (index, forward-proxy refusal, ``/<key>/<path>``).
A malformed request gets its status (400, 414, 431, 505) and the connection closes, so
nothing after it (a body, a request hidden in one) is ever read as a request.

The blocking engine runs right here: a client waiting on a slow upstream or on another
process's download holds its own thread and nothing else.  A client that goes away
(reset, broken pipe, a stalled reader past ``send_timeout``) is ordinary, not an error.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

import h11

from pytest_upstream.engine.dispatch import Engine
from pytest_upstream.messages import BadPath, Headers, ProxyRequest, Reply, split_proxy_path
from pytest_upstream.repro.netguard import exempt_current_thread, is_loopback
from pytest_upstream.server import access_log
from pytest_upstream.server.limits import Limits
from pytest_upstream.server.responses import StreamFailed, Wire, cut, error_bytes, send_reply

log = logging.getLogger("pytest_upstream.server")
_OBS_FOLD = re.compile(rb"\n[ \t]")
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_QUOTED_BYTES = re.compile(r":? *(bytearray\(.*\)|b'.*'|b\".*\")$", re.DOTALL)
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(:[0-9]{1,5})?")
_LINGER_SECONDS = (
    1.0  # after an error reply: read what the client still sends, so it gets the reply, not a reset
)
_LINGER_BYTES = 256 * 1024


class _Refused(Exception):
    """A request answered with an error status; the connection then closes."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class Site:
    """What every connection of one server shares."""

    engine: Engine
    limits: Limits
    port: int
    index: Callable[[], dict[str, Any]]
    refused: list[tuple[str, str]] = field(default_factory=list)  # (host, test) of refused forward requests
    stopping: threading.Event = field(default_factory=threading.Event)


class Connection:
    """One accepted client socket; ``run()`` is its thread's body."""

    def __init__(
        self, sock: socket.socket, client: str, site: Site, on_close: Callable[[Connection], None]
    ) -> None:
        self.sock = sock
        self.client = client
        self.site = site
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=site.limits.max_head)
        self.wire = Wire(sock, self.h11)
        self._on_close = on_close
        self._lock = threading.Lock()
        self.idle = False  # waiting, kept alive, for the first byte of a next request
        self.idle_since = time.monotonic()

    def shed(self, *, only_idle: bool = True) -> bool:
        """Close this connection from another thread (the cap, EMFILE, stop); False if it was busy."""
        with self._lock:
            if only_idle and not self.idle:
                return False
            cut(self.sock)
            return True

    def run(self) -> None:
        exempt_current_thread()  # the proxy must reach upstreams while tests are blocked (netguard.py)
        metrics = getattr(self.site.engine, "metrics", None)
        if metrics is not None:
            metrics.connection_opened()
        try:
            # Headers and a sendfile body are two writes: without NODELAY, Nagle plus
            # delayed ACKs would stall every keep-alive response by ~40 ms.
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._serve()
        except OSError as exc:  # reset, broken pipe, a timeout: the client went away
            log.debug("connection from %s ended: %s", self.client, exc)
        except Exception:
            log.exception("connection from %s failed", self.client)
        finally:
            with contextlib.suppress(OSError):
                self.sock.close()
            if metrics is not None:
                metrics.connection_closed()
            self._on_close(self)

    def _serve(self) -> None:
        first = True
        while True:
            try:
                request = self._read_head(first)
            except _Refused as refused:
                self._refuse(refused.status, refused.reason)
                return
            if request is None:
                return
            first = False
            if not self._answer(request) or self.site.stopping.is_set():
                self._linger()
                return
            if self.h11.our_state is not h11.DONE or self.h11.their_state is not h11.DONE:
                self._linger()
                return
            self.h11.start_next_cycle()

    # -- reading ------------------------------------------------------------
    def _read_head(self, first: bool) -> h11.Request | None:
        """The next request's head within the deadlines; None when the client is gone or
        timed out; raises _Refused for a malformed head."""
        limits = self.site.limits
        deadline = time.monotonic() + limits.header_timeout if first else None
        while True:
            pending = self.h11.trailing_data[0]
            self._check_raw_head(pending)
            try:
                event = self.h11.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint if exc.error_status_hint in (414, 431) else 400
                raise _Refused(status, f"{HTTPStatus(status).phrase} ({_without_bytes(exc)})") from None
            if isinstance(event, h11.Request):
                self._check_request(event)
                return event
            if event is not h11.NEED_DATA:
                return None  # ConnectionClosed
            if deadline is None and pending:
                deadline = time.monotonic() + limits.header_timeout  # a pipelined head has begun
            with self._lock:
                self.idle = deadline is None
                if self.idle:
                    self.idle_since = time.monotonic()
            timeout = limits.idle_timeout if deadline is None else deadline - time.monotonic()
            if timeout <= 0:
                raise _Refused(408, "Request Timeout (the request head took too long)")
            self.sock.settimeout(timeout)
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                if deadline is None:
                    return None  # idle past idle_timeout: close quietly
                raise _Refused(408, "Request Timeout (the request head took too long)") from None
            finally:
                with self._lock:
                    self.idle = False
            if deadline is None:
                deadline = time.monotonic() + limits.header_timeout
            self.h11.receive_data(data)

    def _check_raw_head(self, pending: bytes) -> None:
        """What h11 accepts but we refuse: obs-fold (RFC 9112 allows rejecting it, and it
        hides headers from some parsers), and a request line longer than ``max_target``."""
        end = _HEAD_END.search(pending)
        head = pending[: end.start() + 1] if end else pending
        first_line = head.split(b"\n", 1)[0]
        if len(first_line) > self.site.limits.max_target + 32:
            raise _Refused(414, "URI Too Long")
        if len(head) > self.site.limits.max_head:  # h11 checks only a head still incomplete
            raise _Refused(431, "Request Header Fields Too Large")
        if _OBS_FOLD.search(head.lstrip(b"\r\n")):
            raise _Refused(400, "Bad Request (obsolete line folding in the headers)")

    def _check_request(self, request: h11.Request) -> None:
        if request.http_version not in (b"1.0", b"1.1"):
            raise _Refused(505, "HTTP Version Not Supported (HTTP/1.1 and 1.0 only)")
        if len(request.target) > self.site.limits.max_target:
            raise _Refused(414, "URI Too Long")
        names = {name for name, _ in request.headers}
        if b"content-length" in names and b"transfer-encoding" in names:
            raise _Refused(400, "Bad Request (both Content-Length and Transfer-Encoding)")
        host = _header(request, b"host")
        if host is not None and not _HOST.fullmatch(host):
            raise _Refused(400, "Bad Request (bad Host header)")

    def _drain_body(self) -> bool:
        """Read and drop a request body (the engine serves GET and HEAD; other methods get
        their refusal).  False when it is longer than ``max_drained_body`` or too slow."""
        if self.h11.they_are_waiting_for_100_continue:
            self.wire.sock.sendall(
                self.h11.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
            )
        left = self.site.limits.max_drained_body
        self.sock.settimeout(self.site.limits.send_timeout)
        while left >= 0:
            event = self.h11.next_event()
            if isinstance(event, h11.EndOfMessage):
                return True
            if isinstance(event, h11.Data):
                left -= len(event.data)
            elif event is h11.NEED_DATA:
                try:
                    self.h11.receive_data(self.sock.recv(65536))
                except TimeoutError:
                    return False
            else:
                return False
        return False

    # -- answering ----------------------------------------------------------
    def _answer(self, request: h11.Request) -> bool:
        """Answer one request; False when the connection must close afterwards."""
        started = time.monotonic()
        method = request.method.decode("ascii")
        target = request.target.decode("ascii")
        headers = Headers(
            [(n.decode("latin-1"), v.decode("latin-1")) for n, v in request.headers.raw_items()]
        )
        self.wire.start(request.method)
        key, reply, keep = "", None, True
        try:
            keep = self._drain_body()
        except h11.RemoteProtocolError as exc:  # a bad chunked body
            reply, keep = _error(400, f"Bad Request ({_without_bytes(exc)})"), False
        if reply is None:
            key, reply = self._route(method, target, headers)
        if reply.headers.get("Connection") == "close":
            keep = False
        elif not keep:  # the rest of a body is unread: tell the client this connection ends
            reply.headers["Connection"] = "close"
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
        return ok and keep

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
            return key, _error(500, f"Internal error in pytest-upstream ({type(exc).__name__}: {exc})")

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
        self.sock.settimeout(self.site.limits.send_timeout)
        try:
            send_reply(self.wire, headers, reply)
        except (StreamFailed, h11.LocalProtocolError) as exc:
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
            self.sock.settimeout(self.site.limits.send_timeout)
            self.sock.sendall(error_bytes(status, reason))
        access_log.log_access(
            method="-", target="-", status=status, cache="", key="", nbytes=0, millis=0.0, client=self.client
        )
        self._linger()

    def _linger(self) -> None:
        """Close gracefully: stop sending, then read and drop what the client still sends for a
        moment, so closing with unread bytes does not reset the connection before the client
        has read our last reply."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + _LINGER_SECONDS
            left = _LINGER_BYTES
            while left > 0 and (remaining := deadline - time.monotonic()) > 0:
                self.sock.settimeout(remaining)
                data = self.sock.recv(65536)
                if not data:
                    break
                left -= len(data)


def _header(request: h11.Request, name: bytes) -> str | None:
    for key, value in request.headers:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def _without_bytes(exc: Exception) -> str:
    """h11's message without the raw bytes it quotes (they may hold anything)."""
    return _QUOTED_BYTES.sub("", str(exc)) or type(exc).__name__


def _error(status: int, reason: str) -> Reply:
    reply = Reply.text(status, reason)
    reply.reason = reason
    return reply
