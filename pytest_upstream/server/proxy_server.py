"""The HTTP face of the engine: a threaded HTTP/1.1 server on loopback.

One thread per connection (keep-alive), so a client waiting on a slow
upstream or on another process's download never blocks the others.  Cached
files go out with ``socket.sendfile`` (constant memory, zero copy); misses
stream to the client while the engine writes them to the cache.
"""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pytest_upstream.config.settings import Settings
from pytest_upstream.engine.clock import Clock
from pytest_upstream.engine.dispatch import Engine
from pytest_upstream.engine.flights import FlightReader
from pytest_upstream.messages import BadPath, Headers, ProxyRequest, Reply, split_proxy_path
from pytest_upstream.repro.netguard import exempt_current_thread, is_loopback
from pytest_upstream.repro.served import ServedLog

log = logging.getLogger("pytest_upstream.server.proxy_server")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")
_MAX_HEADERS = 100
_MAX_HEADER_LINE = 65536
_DATE_CACHE: list[object] = [0, ""]  # [second, formatted Date header]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "pytest-upstream"
    server: _Server

    def setup(self) -> None:
        super().setup()
        exempt_current_thread()  # the proxy must reach upstreams while tests are blocked (netguard.py)
        # Headers and a sendfile body are two writes: without NODELAY, Nagle
        # plus delayed ACKs would stall every keep-alive response by ~40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if log.isEnabledFor(logging.DEBUG):
            super().log_request(code, size)

    def date_time_string(self, timestamp: float | None = None) -> str:
        if timestamp is not None:
            return super().date_time_string(timestamp)
        now = int(time.time())
        cached = _DATE_CACHE
        if cached[0] != now:
            cached[:] = [now, super().date_time_string(now)]
        return str(cached[1])

    def parse_request(self) -> bool:
        """A lean parse of the plain HTTP/1.x case (the stdlib's goes through the
        email package, a fifth of a warm hit's time); anything else is left to it."""
        raw: bytes = self.raw_requestline  # type: ignore[attr-defined]
        line = str(raw, "iso-8859-1").rstrip("\r\n")
        words = line.split(" ")
        if len(words) != 3 or words[2] not in ("HTTP/1.1", "HTTP/1.0"):
            return super().parse_request()
        self.requestline = line
        self.command, self.path, self.request_version = words
        items: list[tuple[str, str]] = []
        for _ in range(_MAX_HEADERS + 1):
            raw = self.rfile.readline(_MAX_HEADER_LINE + 1)
            if len(raw) > _MAX_HEADER_LINE:
                self.send_error(431, "Request header line too long")
                return False
            if raw in (b"\r\n", b"\n", b""):
                break
            text = raw.decode("iso-8859-1")
            if text[0] in " \t" and items:  # obsolete line folding
                items[-1] = (items[-1][0], f"{items[-1][1]} {text.strip()}")
                continue
            name, sep, value = text.partition(":")
            if not sep or not name or name != name.strip():
                self.send_error(400, f"Bad header line {text.strip()!r}")
                return False
            items.append((name, value.strip()))
        else:
            self.send_error(431, "Too many request headers")
            return False
        headers = Headers(items)
        self.headers = headers  # type: ignore[assignment]
        connection = (headers.get("Connection") or "").lower()
        if "close" in connection:
            self.close_connection = True
        else:
            self.close_connection = self.request_version == "HTTP/1.0" and "keep-alive" not in connection
        if (headers.get("Expect") or "").lower() == "100-continue":
            self.send_response_only(100)
            self.end_headers()
        return True

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_CONNECT(self) -> None:
        self._refuse_forward(urlsplit(f"//{self.path}").hostname or self.path)

    def _dispatch(self) -> None:
        # The stdlib rewrites a leading '//' in self.path to '/'; judge the target as sent.
        words = self.requestline.split()
        raw_path, _, query = (words[1] if len(words) >= 2 else self.path).partition("?")
        if raw_path.startswith(("http://", "https://")):  # absolute-form: a client using us as HTTP_PROXY
            target = urlsplit(raw_path)
            if not (is_loopback(target.hostname or "") and target.port == self.server.server_address[1]):
                self._refuse_forward(target.hostname or target.netloc)
                return
            raw_path = target.path or "/"  # addressed to this proxy itself: serve it
        self._discard_request_body()
        if raw_path in ("/", ""):
            self._send(Reply.json(200, self.server.index()))
            return
        try:
            key, rest = split_proxy_path(raw_path)
        except (BadPath, UnicodeDecodeError) as exc:
            self._send(Reply.text(400, f"bad request path: {exc}"))
            return
        host = self.headers.get("Host") or "{}:{}".format(*self.server.server_address[:2])
        request = ProxyRequest(
            method=self.command,
            key=key,
            path=rest,
            query=query,
            headers=self.headers
            if isinstance(self.headers, Headers)
            else Headers(list(self.headers.items())),
            base_url=f"http://{host}",
        )
        try:
            reply = self.server.engine.handle(request)
        except Exception as exc:  # a bug: answer 500 instead of dropping the connection
            log.exception("error handling %s %s", self.command, self.path)
            reply = Reply.text(500, f"internal error in pytest-upstream: {type(exc).__name__}: {exc}")
        self._send(reply)

    def _refuse_forward(self, host: str) -> None:
        """403 for a forward-proxy request (the plugin exports HTTP(S)_PROXY pointing here while
        the network is blocked); the reason phrase carries the message, as CONNECT clients show it."""
        message = f"no upstream proxy is configured for {host}; the build tried to reach it directly"
        log.warning("refused %s %s: %s", self.command, self.path, message)
        self.server.refused.append((host, self.server.engine.served.current_test))
        body = (message + "\n").encode()
        self.close_connection = True
        self.send_response(403, message)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            with contextlib.suppress(OSError):
                self.wfile.write(body)

    def _discard_request_body(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        while length > 0:
            chunk = self.rfile.read(min(length, 65536))
            if not chunk:
                break
            length -= len(chunk)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True

    # -- writing replies ---------------------------------------------------
    def _start(self, status: int, headers: dict[str, str], length: int | None, reason: str = "") -> None:
        self.send_response(status, _reason(reason))
        for name, value in headers.items():
            self.send_header(name, value)
        if length is not None:
            self.send_header("Content-Length", str(length))
        elif self.command != "HEAD":
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _send(self, reply: Reply) -> None:
        try:
            if reply.file is not None:
                self._send_file(reply, reply.file)
            elif reply.stream is not None:
                self._send_stream(reply)
            else:
                self._send_body(reply)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _not_modified(self, reply: Reply) -> bool:
        etag = reply.headers.get("ETag")
        inm = self.headers.get("If-None-Match")
        if (
            reply.status == 200
            and etag
            and inm
            and (inm.strip() == "*" or etag in [t.strip() for t in inm.split(",")])
        ):
            self._start(
                304, {k: v for k, v in reply.headers.items() if k in ("ETag", "X-Upstream-Cache", "Vary")}, 0
            )
            return True
        return False

    def _send_body(self, reply: Reply) -> None:
        if self._not_modified(reply):
            return
        self.send_response(reply.status, _reason(reply.reason))
        for name, value in reply.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(reply.body)))
        # Headers and body in one write: one syscall (and one packet) per small reply.
        buffered: list[bytes] = self._headers_buffer
        buffered.append(b"\r\n")
        if self.command != "HEAD":
            buffered.append(reply.body)
        self._headers_buffer: list[bytes] = []
        self.wfile.write(b"".join(buffered))

    def _send_file(self, reply: Reply, path: Path) -> None:
        if self._not_modified(reply):
            return
        with open(path, "rb") as f:
            size = reply.length if reply.length is not None else f.seek(0, 2)
            offset, count, status, headers = 0, size, reply.status, dict(reply.headers)
            wanted = self.headers.get("Range")
            if wanted and status == 200 and not self._range_stale(headers):
                try:
                    parsed = _parse_range(wanted, size)
                except _Unsatisfiable:
                    self._send_body(Reply(416, {"Content-Range": f"bytes */{size}"}))
                    return
                if parsed is not None:  # else a form we do not serve (e.g. several ranges): send it all
                    offset, count = parsed
                    status = 206
                    headers["Content-Range"] = f"bytes {offset}-{offset + count - 1}/{size}"
            self._start(status, headers, count)
            if self.command != "HEAD" and count:
                self.connection.sendfile(f, offset, count)

    def _range_stale(self, headers: dict[str, str]) -> bool:
        if_range = self.headers.get("If-Range")
        return bool(if_range) and if_range != headers.get("ETag")

    def _send_stream(self, reply: Reply) -> None:
        assert reply.stream is not None
        self._start(reply.status, reply.headers, reply.length)
        chunked = reply.length is None
        if not chunked and isinstance(reply.stream, FlightReader):
            self._sendfile_flight(reply.stream)
            return
        client_ok = True
        try:
            for chunk in reply.stream:
                if not chunk:
                    continue
                try:
                    if chunked:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    else:
                        self.wfile.write(chunk)
                except OSError:  # the client left: the download goes on without it (engine/flights.py)
                    client_ok = False
                    self.close_connection = True
                    break
        except Exception as exc:
            # Truncated upstream or a digest mismatch: cut the connection so the
            # client cannot take a partial body for a whole one.
            log.warning("aborted %s: %s", self.path, exc)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        finally:
            close = getattr(reply.stream, "close", None)
            if close is not None:
                close()
        if chunked and client_ok:
            self.wfile.write(b"0\r\n\r\n")

    def _sendfile_flight(self, reader: FlightReader) -> None:
        """A download in progress, sent from its growing file with ``sendfile`` (engine/flights.py)."""
        try:
            with open(reader.fileno(), "rb", closefd=False) as part:
                while (span := reader.next_span()) is not None:
                    offset, count = span
                    reader.advance(self.connection.sendfile(part, offset, count))
        except OSError:  # the client left: the download goes on without it
            self.close_connection = True
        except Exception as exc:  # the download failed: cut the connection (see _send_stream)
            log.warning("aborted %s: %s", self.path, exc)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
        finally:
            reader.close()


def _reason(text: str) -> str | None:
    """A reason phrase safe for a status line: printable ASCII only, at most 200 characters."""
    cleaned = "".join(c if " " <= c <= "~" else " " for c in text)[:200].strip()
    return cleaned or None


class _Unsatisfiable(Exception):
    pass


def _parse_range(value: str, size: int) -> tuple[int, int] | None:
    """(offset, count) for one byte range; None for forms we ignore (RFC 9110 allows
    answering 200); raises _Unsatisfiable for a range outside the file."""
    m = _RANGE.match(value.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None
    if not m.group(1):  # suffix range: the last N bytes
        n = min(int(m.group(2)), size)
        if n <= 0:
            raise _Unsatisfiable
        return size - n, n
    start = int(m.group(1))
    end = int(m.group(2)) if m.group(2) else size - 1
    if end < start:
        return None
    if start >= size:
        raise _Unsatisfiable
    end = min(end, size - 1)
    return start, end - start + 1


def _base_url(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    name = host.decode() if isinstance(host, bytes) else str(host)
    return f"http://[{name}]:{port}" if ":" in name else f"http://{name}:{port}"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    engine: Engine
    refused: list[tuple[str, str]]  # (host, test) of refused forward-proxy requests

    def index(self) -> dict[str, Any]:
        base = _base_url(self)
        return {
            "service": "pytest-upstream",
            "mode": self.engine.mode,
            "proxies": {
                p.key: {"format": p.format, "source": p.source, "url": f"{base}/{p.key}/"}
                for p in self.engine.settings.proxies
            },
        }


class ProxyServer:
    """The proxy on ``host:port`` (port 0 picks a free one), in a background thread."""

    def __init__(
        self,
        settings: Settings,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        served: ServedLog | None = None,
        clock: Clock | None = None,
    ) -> None:
        """``clock``: the engine's time (TTLs, ages, token expiry); tests pass a ``ManualClock``."""
        self.engine = Engine(settings, log_=served, clock=clock)
        self._server = _Server((host, port), _Handler)
        self._server.engine = self.engine
        self._server.refused = []
        self._thread: threading.Thread | None = None

    @property
    def served(self) -> ServedLog:
        return self.engine.served

    @property
    def refused(self) -> list[tuple[str, str]]:
        """(host, test) of each forward-proxy request refused (see ``_Handler._refuse_forward``)."""
        return list(self._server.refused)

    @property
    def base_url(self) -> str:
        return _base_url(self._server)

    def url(self, key: str) -> str:
        return f"{self.base_url}/{key}/"

    def start(self) -> ProxyServer:
        self._thread = threading.Thread(
            # A short poll keeps stop() (and so every test teardown) quick.
            target=self._server.serve_forever,
            args=(0.05,),
            name="pytest-upstream",
            daemon=True,
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._server.serve_forever(0.05)

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=10)
        self._server.server_close()
        self.engine.close()

    def __enter__(self) -> ProxyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
