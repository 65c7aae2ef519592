"""The accept loop: a thread per connection, at most ``max_connections`` of them.

At the cap, the oldest connection idling between kept-alive requests is closed to make room
(a client re-opens one at no cost), else the one that has waited longest for its request head
(a client trickling a header, slowloris, cannot keep real clients out); when every connection
is being answered the newcomer gets ``503`` and is closed, so the clients already being served
keep their descriptors.  Running out of descriptors
(EMFILE) sheds a connection the same way; else one reserved descriptor answers one client 503
and the loop backs off (up to a second) instead of spinning on a listening socket that stays
readable.  ``serve --workers`` forks processes that run this same loop on the one socket.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import socket
import threading
import time

from pytest_upstream.server.connection import Connection, Site
from pytest_upstream.server.responses import error_bytes

log = logging.getLogger("pytest_upstream.server")
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_BACKLOG = 1024
_MAX_BACKOFF = 1.0


class Listener:
    """The listening socket (bound in ``__init__``) and the connections it accepted."""

    def __init__(self, host: str, port: int, site: Site) -> None:
        self.site = site
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((host, port))
            self.sock.listen(_BACKLOG)
        except OSError:
            self.sock.close()
            raise
        self.sock.setblocking(False)  # several worker processes may race for one connection
        self._wake_r, self._wake_w = socket.socketpair()
        self._connections: dict[Connection, None] = {}  # insertion-ordered: oldest first
        self._lock = threading.Lock()
        self._reserve: int | None = _open_reserve()
        self._backoff = 0.0
        self._warned = 0.0

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return str(host), int(port)

    def open_connections(self) -> int:
        with self._lock:
            return len(self._connections)

    def serve_forever(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self.sock, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self.site.stopping.is_set():
                selector.select()
                if not self.site.stopping.is_set():
                    self._accept()

    def stop(self) -> None:
        """Stop accepting, close idle connections; busy ones finish their reply and close."""
        self.site.stopping.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def close(self) -> None:
        for sock in (self.sock, self._wake_r, self._wake_w):
            sock.close()
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            connection.shed()

    def _accept(self) -> None:
        try:
            sock, address = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if exc.errno in _OUT_OF_DESCRIPTORS:
                self._out_of_descriptors(exc)
                return
            if self.site.stopping.is_set():
                return
            raise
        self._backoff = 0.0
        sock.setblocking(True)  # some platforms pass the listening socket's O_NONBLOCK on
        with self._lock:
            full = len(self._connections) >= self.site.limits.max_connections
        if full and not self._shed_oldest_idle():
            self._turn_away(sock, "Service Unavailable (too many open connections)")
            return
        connection = Connection(sock, str(address[0]), self.site, self._closed)
        with self._lock:
            self._connections[connection] = None
        thread = threading.Thread(target=connection.run, name="pytest-upstream-conn", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # no more threads: as full as out of descriptors
            self._closed(connection)
            self._turn_away(sock, "Service Unavailable (cannot start a thread)")

    def _closed(self, connection: Connection) -> None:
        with self._lock:
            self._connections.pop(connection, None)

    def _shed_oldest_idle(self) -> bool:
        """Make room: the connection idle the longest, else the one waiting longest for its
        request head (a slowloris client); never one being answered."""
        with self._lock:
            connections = list(self._connections)
        idle = sorted((c for c in connections if c.idle), key=lambda c: c.idle_since)
        if any(c.shed() for c in idle):
            return True
        waiting = sorted(
            (c for c in connections if not c.idle and c.head_since is not None),
            key=lambda c: c.head_since or 0.0,
        )
        return any(c.shed_waiting() for c in waiting)

    def _out_of_descriptors(self, exc: OSError) -> None:
        now = time.monotonic()
        if now - self._warned > 10:
            self._warned = now
            log.warning(
                "out of file descriptors accepting a connection (%s, %d open): closing idle ones, "
                "refusing new ones; raise the open-file limit or lower max_connections",
                exc.strerror,
                self.open_connections(),
            )
        if self._shed_oldest_idle():
            return
        if self._reserve is not None:  # free one descriptor to tell one client why
            os.close(self._reserve)
            self._reserve = None
            with contextlib.suppress(OSError):
                sock, _ = self.sock.accept()
                self._turn_away(sock, "Service Unavailable (out of file descriptors)")
            self._reserve = _open_reserve()
        self._backoff = min(max(self._backoff * 2, 0.01), _MAX_BACKOFF)
        self.site.stopping.wait(self._backoff)

    def _turn_away(self, sock: socket.socket, reason: str) -> None:
        """503 and close, without blocking the accept loop."""
        with contextlib.suppress(OSError):
            sock.setblocking(False)
            sock.send(error_bytes(503, reason))
            sock.shutdown(socket.SHUT_WR)
            sock.recv(65536)  # what the client sent already, so that closing does not reset
        sock.close()


def _open_reserve() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY)
    except OSError:
        return None
