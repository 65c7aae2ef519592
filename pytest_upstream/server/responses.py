"""Writing a ``Reply`` to one client: bytes, a file by ``sendfile``, or a stream.

The framing is the one RFC 9112 asks for and no more: ``Content-Length`` when the length is
known; for a stream of unknown length ``Transfer-Encoding: chunked`` to an HTTP/1.1 client and
a close-delimited body to an HTTP/1.0 one (which never gets chunked); no body for HEAD, 204
and 304.  A stream that yields more or fewer bytes than its declared length fails
(``StreamFailed``), so the connection is cut rather than a short body passed off as whole.
A file's bytes go out with ``os.sendfile`` (zero copy, constant memory).  Conditional requests
(If-None-Match, Range with If-Range) are decided here, on the reply's ETag and the file's size.

A worker thread writes on a blocking socket with a kernel timeout (``SO_SNDTIMEO`` =
``send_timeout``): a write that makes no progress for that long fails with
``BlockingIOError``, so a client that stops reading is dropped and holds nothing but its own
worker; a write that progresses costs no extra system call.  The event loop writes a reply
whose bytes are in hand (``reply_bytes``) without blocking, and leaves what the socket did not
take to a worker.
"""

from __future__ import annotations

import contextlib
import email.utils
import logging
import os
import re
import socket
import ssl
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import BinaryIO

from pytest_upstream.engine.flights import FlightReader
from pytest_upstream.messages import Headers, Reply

log = logging.getLogger("pytest_upstream.server")
SERVER_NAME = b"pytest-upstream"
_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")
_date_cache: tuple[int, bytes] = (0, b"")  # (second, formatted Date header)
_KEEP_ON_304 = ("ETag", "X-Upstream-Cache", "Vary")
_FRAMING = frozenset({"connection", "content-length", "transfer-encoding", "keep-alive"})
_PHRASES = {s.value: s.phrase for s in HTTPStatus}
_TLS_CHUNK = 256 * 1024  # bytes read per write on a TLS socket
_TIMEVAL = struct.Struct("@ll")  # struct timeval: seconds, microseconds


class StreamFailed(Exception):
    """The body could not be completed: the connection must be cut."""


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
    cleaned = "".join(c if " " <= c <= "~" else " " for c in text)[:200].strip() if text else ""
    return (cleaned or _PHRASES.get(status, "")).encode()


def error_bytes(status: int, reason: str) -> bytes:
    """A whole error reply that closes the connection: for a request that could not be
    read (a malformed or timed-out head) or a client refused at accept."""
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


def set_send_timeout(sock: socket.socket, seconds: float) -> None:
    """A kernel timeout on every write (SO_SNDTIMEO); the socket stays blocking."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval(seconds))


def timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return _TIMEVAL.pack(whole, int((seconds - whole) * 1_000_000))


@dataclass
class Wire:
    """One client's socket: frames one reply at a time and counts the body bytes sent."""

    sock: socket.socket
    sent: int = 0
    head_only: bool = False  # the request was HEAD: headers as for GET, no body
    version: str = "1.1"
    keep_alive: bool = True  # the client's wish, turned off when the reply ends the connection
    _chunked: bool = False
    _remaining: int | None = None  # body bytes still owed when the length was declared

    def start(self, method: str, version: str, keep_alive: bool) -> None:
        """A new request: reset the per-request state."""
        self.sent = 0
        self.head_only = method == "HEAD"
        self.version = version
        self.keep_alive = keep_alive
        self._chunked = False
        self._remaining = None

    def _head(self, status: int, headers: dict[str, str], reason: str, length: int | None) -> bytes:
        lines = [
            b"HTTP/1.1 %d %s\r\nServer: %s\r\nDate: %s\r\n"
            % (status, reason_phrase(reason, status), SERVER_NAME, http_date())
        ]
        for name, value in headers.items():
            lowered = name.lower()
            if lowered in _FRAMING:
                if lowered == "connection" and value.lower() == "close":
                    self.keep_alive = False
                continue
            if "\r" in value or "\n" in value or "\x00" in value or "\r" in name or "\n" in name:
                log.warning("dropped a reply header with a line break: %r", name)
                continue
            lines.append(b"%s: %s\r\n" % (name.encode("latin-1"), value.encode("latin-1", "replace")))
        bodiless = status in (204, 304) or status < 200
        if bodiless:
            self._remaining = 0
        elif length is not None:
            lines.append(b"Content-Length: %d\r\n" % length)
            self._remaining = 0 if self.head_only else length
        elif self.head_only:
            self._remaining = 0
        elif self.version == "1.1":
            lines.append(b"Transfer-Encoding: chunked\r\n")
            self._chunked = True
        else:  # HTTP/1.0 and no length: the body ends when the connection does
            self.keep_alive = False
        if not self.keep_alive:
            lines.append(b"Connection: close\r\n")
        elif self.version == "1.0":
            lines.append(b"Connection: keep-alive\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    def head(self, status: int, headers: dict[str, str], reason: str = "", length: int | None = None) -> None:
        self.sock.sendall(self._head(status, headers, reason, length))

    def whole(self, status: int, headers: dict[str, str], body: bytes, reason: str = "") -> None:
        """A reply with a body in hand: head and body in one write (one packet when small)."""
        self.sock.sendall(self.whole_bytes(status, headers, body, reason))

    def whole_bytes(self, status: int, headers: dict[str, str], body: bytes, reason: str = "") -> bytes:
        """The bytes of a reply with a body in hand (counted as sent): the event loop writes
        them without blocking, and a worker thread the rest (listener.py)."""
        head = self._head(status, headers, reason, len(body))
        out = head + body if self._remaining else head
        self.sent += len(body) if self._remaining else 0
        self._remaining = 0
        return out

    def data(self, chunk: bytes) -> None:
        if self.head_only or not chunk:
            return
        if self._remaining is not None:
            if len(chunk) > self._remaining:
                raise StreamFailed(
                    f"the body is longer than its declared length ({self.sent + len(chunk)} bytes)"
                )
            self._remaining -= len(chunk)
        self.sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk) if self._chunked else chunk)
        self.sent += len(chunk)

    def file(self, f: BinaryIO, offset: int, count: int) -> None:
        """``count`` bytes of an open file from ``offset``, by sendfile."""
        if not count or self.head_only:
            return
        done = _sendfile(self.sock, f, offset, count)
        self.sent += done
        self._remaining = max(0, (self._remaining or 0) - done)
        if done != count:  # the file shrank under us: the body would be short
            raise StreamFailed(f"file ended after {done} of {count} bytes")

    def end(self) -> None:
        if self._remaining:
            raise StreamFailed(f"the body ended {self._remaining} bytes short of its declared length")
        if self._chunked:
            self.sock.sendall(b"0\r\n\r\n")


def _sendfile(sock: socket.socket, f: BinaryIO, offset: int, count: int) -> int:
    """Bytes sent by ``os.sendfile``: a timeout (SO_SNDTIMEO) with no progress raises
    TimeoutError; the end of the file ends it early.  ``socket.sendfile`` would block forever
    on a stalled client of a blocking socket, so this loop is ours.  A TLS socket (a captured
    tunnel, server/forward.py) gets the bytes read and written: its file descriptor carries
    records, not the file's bytes."""
    if isinstance(sock, ssl.SSLSocket):
        return _send_read(sock, f, offset, count)
    if not hasattr(os, "sendfile"):  # pragma: no cover - platforms without it
        return sock.sendfile(f, offset, count)
    out, fd, done = sock.fileno(), f.fileno(), 0
    cork = count >= _CORK_FROM and hasattr(socket, "TCP_CORK")
    if cork:  # full segments only while the file goes out (nginx's tcp_nopush)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
    try:
        while done < count:
            try:
                n = os.sendfile(out, fd, offset + done, min(count - done, 1 << 30))
            except BlockingIOError:
                raise TimeoutError("the client read nothing within the send timeout") from None
            except InterruptedError:
                continue
            if n == 0:
                break
            done += n
    finally:
        if cork:
            with contextlib.suppress(OSError):  # the client may be gone
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
    return done


_CORK_FROM = 1024 * 1024  # bytes of a file reply from which its segments are sent full


def _send_read(sock: socket.socket, f: BinaryIO, offset: int, count: int) -> int:
    done = 0
    while done < count:
        chunk = os.pread(f.fileno(), min(count - done, _TLS_CHUNK), offset + done)
        if not chunk:
            break
        sock.sendall(chunk)
        done += len(chunk)
    return done


def send_reply(wire: Wire, request: Headers, reply: Reply) -> None:
    """Send ``reply`` as the answer to a request with ``request`` headers.

    Raises OSError when the client is gone or stalled past the send timeout, and
    StreamFailed when the body could not be completed (the caller cuts the connection).
    """
    if reply.stream is not None:
        _send_stream(wire, reply)
    elif reply.file is not None:
        _send_file(wire, request, reply, reply.file)
    else:
        wire.sock.sendall(_in_hand(wire, request, reply))


def reply_bytes(wire: Wire, request: Headers, reply: Reply, max_file: int = 0) -> bytes | None:
    """All the bytes of a reply whose body is in hand, or is a file of at most ``max_file``
    bytes (read whole: the event loop sends a small file so, with its ranges, 304 and 416
    decided as ``send_reply`` decides them); None for a stream or a bigger file.  Raises OSError
    when the file cannot be read, StreamFailed when it is shorter than the reply says."""
    if reply.stream is not None:
        return None
    if reply.file is None:
        return _in_hand(wire, request, reply)
    if reply.length is None or reply.length > max_file:
        return None
    if _not_modified(request, reply):
        return _in_hand(wire, request, reply)
    with open(reply.file, "rb") as f:
        plan = _file_plan(wire, request, reply, f)
        if isinstance(plan, bytes):
            return plan
        status, headers, offset, count = plan
        if wire.head_only:  # the length a GET would get, no body
            return wire._head(status, headers, reply.reason, count)
        body = os.pread(f.fileno(), count, offset) if count else b""
    if len(body) != count:  # the file shrank under us
        raise StreamFailed(f"file ended after {len(body)} of {count} bytes")
    return wire.whole_bytes(status, headers, body, reply.reason)


def _in_hand(wire: Wire, request: Headers, reply: Reply) -> bytes:
    """The bytes of a reply with its body in hand, or its 304."""
    if _not_modified(request, reply):
        return wire.whole_bytes(304, {k: v for k, v in reply.headers.items() if k in _KEEP_ON_304}, b"")
    return wire.whole_bytes(reply.status, reply.headers, reply.body, reply.reason)


def _not_modified(request: Headers, reply: Reply) -> bool:
    etag = reply.headers.get("ETag")
    inm = request.get("If-None-Match")
    if reply.status != 200 or not etag or not inm:
        return False
    return inm.strip() == "*" or etag in [t.strip() for t in inm.split(",")]


def _file_plan(
    wire: Wire, request: Headers, reply: Reply, f: BinaryIO
) -> bytes | tuple[int, dict[str, str], int, int]:
    """(status, headers, offset, count) of a file reply, its Range decided; or the whole bytes
    of a 416 for a range outside the file."""
    size = reply.length if reply.length is not None else f.seek(0, 2)
    offset, count, status, headers = 0, size, reply.status, dict(reply.headers)
    wanted = request.get("Range")
    if_range = request.get("If-Range")
    if wanted and status == 200 and not (if_range and if_range != headers.get("ETag")):
        try:
            parsed = parse_range(wanted, size)
        except Unsatisfiable:
            return wire.whole_bytes(416, {"Content-Range": f"bytes */{size}"}, b"", "Range Not Satisfiable")
        if parsed is not None:  # else a form we do not serve (e.g. several ranges): send it all
            offset, count = parsed
            status = 206
            headers["Content-Range"] = f"bytes {offset}-{offset + count - 1}/{size}"
    return status, headers, offset, count


def _send_file(wire: Wire, request: Headers, reply: Reply, path: Path) -> None:
    if _not_modified(request, reply):
        wire.sock.sendall(_in_hand(wire, request, reply))
        return
    with open(path, "rb") as f:
        plan = _file_plan(wire, request, reply, f)
        if isinstance(plan, bytes):
            wire.sock.sendall(plan)
            return
        status, headers, offset, count = plan
        wire.head(status, headers, reply.reason, count)
        wire.file(f, offset, count)
        wire.end()


def _send_stream(wire: Wire, reply: Reply) -> None:
    """A body as the engine produces it: a download in progress (engine/flights.py) or another
    stream.  A client that leaves stops reading the stream and closes it; the download goes on
    for the others without it.  A stream that fails (a truncated upstream, a digest mismatch)
    raises StreamFailed: the caller cuts the connection, so the body never ends normally."""
    assert reply.stream is not None
    stream = reply.stream
    try:
        wire.head(reply.status, reply.headers, reply.reason, reply.length)
        if wire.head_only:
            return
        if isinstance(stream, FlightReader) and reply.length is not None:
            _send_flight(wire, stream)
        else:
            for chunk in _guarded(stream):
                wire.data(chunk)  # OSError: the client left or stalled past the send timeout
        wire.end()
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()


def _guarded(stream: Iterator[bytes]) -> Iterator[bytes]:
    """The stream's chunks; its own failures become StreamFailed (the client's stay OSError)."""
    while True:
        try:
            chunk = next(stream)
        except StopIteration:
            return
        except Exception as exc:
            raise StreamFailed(str(exc) or type(exc).__name__) from exc
        yield chunk


def _send_flight(wire: Wire, reader: FlightReader) -> None:
    """A download in progress, sent from its growing part file with sendfile, span by span as
    the bytes arrive (the last span only once the download is verified and stored)."""
    with open(reader.fileno(), "rb", closefd=False) as part:
        while True:
            try:
                span = reader.next_span()
            except Exception as exc:
                raise StreamFailed(str(exc) or type(exc).__name__) from exc
            if span is None:
                return
            offset, count = span
            wire.file(part, offset, count)
            reader.advance(count)


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
