"""Reading requests off one connection with httptools (llhttp, Node.js's HTTP parser, in C).

llhttp is strict by default: a bad or duplicate Content-Length, Content-Length with
Transfer-Encoding, a transfer coding other than a final ``chunked``, control characters in the
target or a header, obs-fold, a bad chunk size: each is an error, and parsing stops there, so
nothing after a malformed head (a body, a request hidden in one) is ever read as a request.
This module adds what llhttp leaves to its user: size limits on the head (431) and the target
(414), exactly one valid ``Host`` on HTTP/1.1, ``Transfer-Encoding`` only as a bare
``chunked`` (``identity, chunked`` is refused, not smuggled), HTTP/1.0 and 1.1 only (505),
and a cap on a request body, which the proxy reads only to drop (413).
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import httptools

from pytest_upstream.server.limits import Limits

_HOST = re.compile(rb"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+)(:[0-9]{1,5})?")
_TARGET = re.compile(rb"[\x21-\x7e]+")


class BadRequest(Exception):
    """A request that cannot be answered normally: its status and reason; the connection closes."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass
class ParsedRequest:
    method: str
    target: str
    version: str  # "1.0" or "1.1"
    headers: list[tuple[str, str]]
    keep_alive: bool  # what the client asked for (version and Connection header)


@dataclass
class RequestReader:
    """Feed it bytes; it queues whole requests (bodies read and dropped) in ``ready``.

    ``started`` is when the request being read began (None between requests) and
    ``head_done`` whether its head is complete: the connection's deadlines follow them.
    """

    limits: Limits
    send_continue: Callable[[], None]  # called when a client waits for "100 Continue"
    ready: deque[ParsedRequest] = field(default_factory=deque)
    started: float | None = None
    head_done: bool = False

    def __post_init__(self) -> None:
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_bytes = 0
        self._body_bytes = 0

    def feed(self, data: bytes) -> None:
        """Parse ``data``; raises BadRequest (requests completed before it stay in ``ready``)."""
        if self.started is not None and not self.head_done:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, BadRequest):
                raise exc.__context__ from None
            raise
        except httptools.HttpParserUpgrade:
            # CONNECT, or an Upgrade header: the request is whole; nothing after it is HTTP/1.1
            # we could read, so the connection closes after the answer.
            if not self.ready:
                raise BadRequest(400, "Bad Request (an upgrade this server does not speak)") from None
            self.ready[-1].keep_alive = False
        except httptools.HttpParserError as exc:
            message = str(exc) or type(exc).__name__
            if "PRI" in message or "version" in message.lower():
                raise BadRequest(505, "HTTP Version Not Supported (HTTP/1.1 and 1.0 only)") from None
            raise BadRequest(400, f"Bad Request ({message})") from None
        if self.started is not None and not self.head_done and self._head_bytes > self.limits.max_head:
            raise BadRequest(431, "Request Header Fields Too Large")

    # -- httptools callbacks --------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.started = time.monotonic()
        self.head_done = False
        self._url = b""
        self._headers = []
        self._head_bytes = 0
        self._body_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url += url  # may come in pieces
        if len(self._url) > self.limits.max_target:
            raise BadRequest(414, "URI Too Long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        if len(self._headers) > 200:
            raise BadRequest(431, "Request Header Fields Too Large (too many headers)")

    def on_headers_complete(self) -> None:
        self.head_done = True
        if len(self._url) + sum(len(n) + len(v) + 4 for n, v in self._headers) > self.limits.max_head:
            raise BadRequest(431, "Request Header Fields Too Large")
        version = self._parser.get_http_version()
        if version not in ("1.0", "1.1"):
            raise BadRequest(505, "HTTP Version Not Supported (HTTP/1.1 and 1.0 only)")
        if not _TARGET.fullmatch(self._url):
            raise BadRequest(400, "Bad Request (bad request target)")
        hosts: list[bytes] = []
        expect = b""
        for name, value in self._headers:
            lowered = name.lower()
            if lowered == b"host":
                hosts.append(value)
            elif lowered == b"transfer-encoding" and value.strip().lower() != b"chunked":
                raise BadRequest(400, "Bad Request (Transfer-Encoding other than chunked)")
            elif lowered == b"expect":
                expect = value.strip().lower()
        if len(hosts) > 1 or (version == "1.1" and not hosts):
            raise BadRequest(400, "Bad Request (HTTP/1.1 needs exactly one Host header)")
        if hosts and not _HOST.fullmatch(hosts[0]):
            raise BadRequest(400, "Bad Request (bad Host header)")
        if expect == b"100-continue" and version == "1.1":
            self.send_continue()

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self.limits.max_drained_body:
            raise BadRequest(413, "Content Too Large (the proxy takes no request bodies)")

    def on_message_complete(self) -> None:
        self.ready.append(
            ParsedRequest(
                method=self._parser.get_method().decode("ascii"),
                target=self._url.decode("ascii"),
                version=self._parser.get_http_version(),
                headers=[(n.decode("latin-1"), v.decode("latin-1")) for n, v in self._headers],
                keep_alive=self._parser.should_keep_alive(),
            )
        )
        self.started = None
        self.head_done = False
