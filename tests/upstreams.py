"""A small, controllable upstream HTTP server for tests, on loopback.

It serves files from a dict, counts requests per path, and can misbehave on
request: answer a status, cut a body short under a full Content-Length,
slow down, or be stopped altogether.  Real protocol peers (pip, pypiserver)
are used in the end-to-end tests; this one exists to inject faults.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Fault:
    status: int | None = None  # answer this status instead
    truncate_at: int | None = None  # send this many bytes, then close (Content-Length says more)
    delay: float = 0.0  # seconds to sleep before answering
    chunk_delay: float = 0.0  # seconds between 64 KiB chunks
    headers: dict[str, str] = field(default_factory=dict)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_HEAD(self) -> None:
        self.do_GET()

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle stalls

    def do_GET(self) -> None:
        up = self.server.upstream
        if up.stopped:  # a kept-alive connection outlived stop(): answer nothing, like a dead host
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        path = self.path
        with up.lock:
            up.hits[path] += 1
            up.request_headers.append((path, dict(self.headers.items())))
            body = up.files.get(path)
            fault = up.faults.get(path) or up.default_fault
            content_type = up.content_types.get(path, "application/octet-stream")
        if fault and fault.delay:
            time.sleep(fault.delay)
        if fault and fault.status:
            data = f"fault {fault.status}\n".encode()
            self.send_response(fault.status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        if body is None:
            self.send_response(404)
            self.send_header("Content-Length", "10")
            self.end_headers()
            self.wfile.write(b"not found\n")
            return
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (fault.headers if fault else {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        limit = fault.truncate_at if fault and fault.truncate_at is not None else len(body)
        step = 64 * 1024
        for start in range(0, limit, step):
            self.wfile.write(body[start : min(start + step, limit)])
            if fault and fault.chunk_delay:
                time.sleep(fault.chunk_delay)
        if limit < len(body):
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    upstream: Upstream


class Upstream:
    """``with Upstream() as up: up.files["/a"] = b"..."; up.url + "/a"``."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.content_types: dict[str, str] = {}
        self.faults: dict[str, Fault] = {}
        self.default_fault: Fault | None = None
        self.hits: Counter[str] = Counter()
        self.request_headers: list[tuple[str, dict[str, str]]] = []
        self.lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0
        self.stopped = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Upstream:
        self.stopped = False
        self._server = _Server(("127.0.0.1", self.port), _Handler)
        self._server.upstream = self
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop answering (connections are refused); ``start()`` again reuses the port."""
        self.stopped = True
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Upstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
