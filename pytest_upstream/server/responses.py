"""Writing a ``Reply`` to one client over h11: bytes, a file by ``sendfile``, or a stream.

h11 frames the message (Content-Length, chunked for HTTP/1.1 clients, close-delimited for
HTTP/1.0 ones, no body for HEAD) and keeps count of the bytes; a file's bytes go out with
``socket.sendfile`` (zero copy, constant memory) through h11's data pass-through, so the
framing stays h11's while the bytes never enter Python.  Conditional requests (If-None-Match,
Range with If-Range) are decided here, on the reply's ETag and the file's size.

Every write runs under the socket's timeout (``send_timeout``): a client that stops reading
raises ``TimeoutError`` here and is dropped by its connection; it holds nothing but its own
thread.
"""

from __future__ import annotations

import contextlib
import email.utils
import logging
import re
import socket
import time
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

import h11

from pytest_upstream.messages import Headers, Reply

log = logging.getLogger("pytest_upstream.server")
SERVER_NAME = b"pytest-upstream"
_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")
_date_cache: tuple[int, bytes] = (0, b"")  # (second, formatted Date header)
_KEEP_ON_304 = ("ETag", "X-Upstream-Cache", "Vary")


class StreamFailed(Exception):
    """The reply's stream raised: the body is incomplete and the connection must be cut."""


def http_date() -> bytes:
    """The ``Date`` header, formatted once a second."""
    global _date_cache
    now = int(time.time())
    second, value = _date_cache
    if second != now:
        value = email.utils.formatdate(now, usegmt=True).encode()
        _date_cache = (now, value)
    return value


def reason_phrase(text: str, status: int = 0) -> bytes:
    """A reason phrase safe for a status line: printable ASCII only, at most 200 characters;
    the standard phrase for ``status`` when ``text`` is empty."""
    cleaned = "".join(c if " " <= c <= "~" else " " for c in text)[:200].strip()
    if not cleaned and status:
        with contextlib.suppress(ValueError):
            cleaned = HTTPStatus(status).phrase
    return cleaned.encode()


def error_bytes(status: int, reason: str) -> bytes:
    """A whole error reply that closes the connection, written without h11: for a request
    h11 never parsed (a timed-out or refused head) or a client refused at accept."""
    phrase = reason_phrase(reason, status)
    body = phrase + b"\n"
    return b"".join(
        [
            b"HTTP/1.1 %d %s\r\n" % (status, phrase),
            b"Server: %s\r\nDate: %s\r\n" % (SERVER_NAME, http_date()),
            b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n" % len(body),
            b"Connection: close\r\n\r\n",
            body,
        ]
    )


class _Span:
    """A body part h11 counts but never touches: its bytes go out by sendfile."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __len__(self) -> int:
        return self.size


@dataclass
class Wire:
    """One client's socket and its h11 state; counts the body bytes sent."""

    sock: socket.socket
    conn: h11.Connection
    sent: int = 0
    head_only: bool = False  # the request was HEAD: headers as for GET, no body

    def start(self, method: bytes) -> None:
        """A new request: reset the per-request state."""
        self.sent = 0
        self.head_only = method == b"HEAD"

    def _body_allowed(self, status: int) -> bool:
        return not self.head_only and status not in (204, 304)

    def head(self, status: int, headers: dict[str, str], reason: str = "", length: int | None = None) -> None:
        items: list[tuple[bytes, bytes]] = [(b"Server", SERVER_NAME), (b"Date", http_date())]
        items += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        if length is not None:
            items.append((b"Content-Length", b"%d" % length))
        response = h11.Response(status_code=status, headers=items, reason=reason_phrase(reason, status))
        self._write(self.conn.send(response))

    def data(self, chunk: bytes) -> None:
        parts = self.conn.send_with_data_passthrough(h11.Data(data=chunk))
        self._write(b"".join(parts or ()))
        self.sent += len(chunk)

    def whole(self, status: int, headers: dict[str, str], body: bytes, reason: str = "") -> None:
        """A reply with a body in hand: head, body and end in one write (one packet when small)."""
        items: list[tuple[bytes, bytes]] = [(b"Server", SERVER_NAME), (b"Date", http_date())]
        items += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        items.append((b"Content-Length", b"%d" % len(body)))
        out = self.conn.send(
            h11.Response(status_code=status, headers=items, reason=reason_phrase(reason, status))
        )
        if body and self._body_allowed(status):
            out += self.conn.send(h11.Data(data=body))
            self.sent += len(body)
        self._write(out + self.conn.send(h11.EndOfMessage()))

    def file(self, f: object, offset: int, count: int) -> None:
        """``count`` bytes of an open file from ``offset``, by sendfile."""
        if count and not self.head_only:
            self.conn.send_with_data_passthrough(h11.Data(data=_Span(count)))  # type: ignore[arg-type]
            done = self.sock.sendfile(f, offset, count)  # type: ignore[arg-type]
            self.sent += done
            if done != count:  # the file shrank under us: the body would be short
                raise StreamFailed(f"file ended after {done} of {count} bytes")

    def end(self) -> None:
        self._write(self.conn.send(h11.EndOfMessage()))

    def _write(self, data: bytes | None) -> None:
        if data:
            self.sock.sendall(data)


def send_reply(wire: Wire, request: Headers, reply: Reply) -> None:
    """Send ``reply`` as the answer to a request with ``request`` headers.

    Raises OSError when the client is gone or stalled past the send timeout, and
    StreamFailed when the body could not be completed (the caller cuts the connection).
    """
    if reply.file is not None:
        _send_file(wire, request, reply, reply.file)
    elif reply.stream is not None:
        _send_stream(wire, reply)
    elif not _not_modified(wire, request, reply):
        wire.whole(reply.status, reply.headers, reply.body, reply.reason)


def _not_modified(wire: Wire, request: Headers, reply: Reply) -> bool:
    etag = reply.headers.get("ETag")
    inm = request.get("If-None-Match")
    if reply.status != 200 or not etag or not inm:
        return False
    if inm.strip() != "*" and etag not in [t.strip() for t in inm.split(",")]:
        return False
    wire.whole(304, {k: v for k, v in reply.headers.items() if k in _KEEP_ON_304}, b"")
    return True


def _send_file(wire: Wire, request: Headers, reply: Reply, path: Path) -> None:
    if _not_modified(wire, request, reply):
        return
    with open(path, "rb") as f:
        size = reply.length if reply.length is not None else f.seek(0, 2)
        offset, count, status, headers = 0, size, reply.status, dict(reply.headers)
        wanted = request.get("Range")
        if_range = request.get("If-Range")
        if wanted and status == 200 and not (if_range and if_range != headers.get("ETag")):
            try:
                parsed = parse_range(wanted, size)
            except Unsatisfiable:
                wire.whole(416, {"Content-Range": f"bytes */{size}"}, b"", "Range Not Satisfiable")
                return
            if parsed is not None:  # else a form we do not serve (e.g. several ranges): send it all
                offset, count = parsed
                status = 206
                headers["Content-Range"] = f"bytes {offset}-{offset + count - 1}/{size}"
        wire.head(status, headers, reply.reason, count)
        wire.file(f, offset, count)
        wire.end()


def _send_stream(wire: Wire, reply: Reply) -> None:
    """A body as the engine produces it (a miss relayed while it is stored).

    The stream is run to its end even when this client has gone: today's engine stores
    the download as it relays it, for the clients after this one.
    """
    assert reply.stream is not None
    wire.head(reply.status, reply.headers, reply.reason, reply.length)
    client_error: OSError | None = None
    try:
        for chunk in reply.stream:
            if client_error is not None or not chunk or wire.head_only:
                continue
            try:
                wire.data(chunk)
            except OSError as exc:
                client_error = exc
    except Exception as exc:  # truncated upstream, a digest mismatch: never end the body normally
        raise StreamFailed(str(exc) or type(exc).__name__) from exc
    if client_error is not None:
        raise client_error
    wire.end()


def cut(sock: socket.socket) -> None:
    """End a connection at once, so a client cannot take a partial body for a whole one."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class Unsatisfiable(Exception):
    """A Range wholly outside the file: 416."""


def parse_range(value: str, size: int) -> tuple[int, int] | None:
    """(offset, count) for one byte range; None for forms we ignore (RFC 9110 allows
    answering 200); raises Unsatisfiable for a range outside the file."""
    m = _RANGE.match(value.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None
    if not m.group(1):  # suffix range: the last N bytes
        n = min(int(m.group(2)), size)
        if n <= 0:
            raise Unsatisfiable
        return size - n, n
    start = int(m.group(1))
    end = int(m.group(2)) if m.group(2) else size - 1
    if m.group(2) and end < start:
        return None  # an invalid range is ignored
    if start >= size:
        raise Unsatisfiable
    end = min(end, size - 1)
    return start, end - start + 1
