"""The event loop: one thread owns the listening socket and every connection that is idle or
reading a request; worker threads answer what must wait.

The loop (``selectors``: epoll on Linux) accepts, reads without blocking, parses, keeps each
connection's deadline (swept every ``_SWEEP`` seconds) and answers a request whose answer is at
hand (a warm hit, an error: ``Connection.answer_inline``), so a warm page costs no thread
switch.  A request that needs waiting (a miss, a download in flight, a big file by sendfile, a
stream) goes with its connection to a worker thread (``Connection.answer_in_worker``), which
hands the connection back when the reply is done.  At most one worker per connection, so the
pool (``max_connections`` threads at most, started as needed) never makes a request wait for
another's; an idle or trickling connection costs a descriptor and no thread.

At the cap, the oldest connection idling between kept-alive requests is closed to make room
(a client re-opens one at no cost), else the one that has waited longest for its request head
(a client trickling a header, slowloris, cannot keep real clients out); when every connection
is being answered the newcomer gets ``503`` and is closed, so the clients already being served
keep their descriptors.  Running out of descriptors (EMFILE) sheds a connection the same way;
else one reserved descriptor answers one client 503 and the loop stops accepting for a while
(up to a second) instead of spinning on a listening socket that stays readable; the
connections it owns are served meanwhile.  ``serve --workers`` forks processes that run this
same loop on the one socket.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import selectors
import socket
import threading
import time

from pytest_upstream.repro.netguard import exempt_current_thread
from pytest_upstream.server.connection import (
    BODY,
    BUSY,
    HEAD,
    IDLE,
    LINGER,
    LINGER_BYTES,
    Connection,
    Pending,
    Site,
)
from pytest_upstream.server.request_reader import BadRequest
from pytest_upstream.server.responses import cut, error_bytes, set_send_timeout
from pytest_upstream.server.siblings import Siblings
from pytest_upstream.server.workers import Workers

log = logging.getLogger("pytest_upstream.server")
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_BACKLOG = 1024
_MAX_BACKOFF = 1.0
_SWEEP = 0.05  # seconds between deadline checks: a deadline is kept to within this
_ACCEPTS = 64  # connections accepted per readiness of the listening socket (one when shared)
_ACCEPT_DEFER = 0.02  # seconds at most a process leaves newcomers to a less busy sibling
_ACCEPT_PAUSE = 0.002  # ... looking again this often


class Listener:
    """The listening socket (bound in ``__init__``), the event loop and the worker threads."""

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
        self._wake_r.setblocking(False)
        self._connections: dict[Connection, None] = {}  # every open one, oldest first (loop thread only)
        self._returned: queue.SimpleQueue[tuple[Connection, bool]] = queue.SimpleQueue()
        self._selector = selectors.DefaultSelector()
        self._workers = Workers(site.limits.max_connections)
        self._handback = threading.Lock()
        self._loop_done = False  # a worker then closes the connection it finished
        self._reserve: int | None = _open_reserve()
        self._backoff = 0.0
        self._paused_until = 0.0  # not accepting until then (out of descriptors, or left to a sibling)
        self._warned = 0.0
        self._open = 0
        self._pid = os.getpid()  # serve --workers forks after this: see serve_forever
        self._siblings = Siblings()
        self._deferring_since: float | None = None  # newcomers left to a sibling since then

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return str(host), int(port)

    def open_connections(self) -> int:
        return self._open

    def serve_forever(self) -> None:
        exempt_current_thread()  # the index and warm hits are answered on this thread (netguard.py)
        # Each process its own epoll and wake-up pair: ``serve --workers`` forks after __init__,
        # and an inherited epoll or socket pair would be shared with the other processes.
        self._selector.close()
        self._selector = selector = selectors.DefaultSelector()
        for old in (self._wake_r, self._wake_w):
            old.close()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        selector.register(self.sock, selectors.EVENT_READ)
        selector.register(self._wake_r, selectors.EVENT_READ)
        swept = time.monotonic()
        # A forked process (``serve --workers``) shares the socket with its siblings: it takes one
        # newcomer at a time, and leaves it to a sibling holding fewer connections for a moment
        # (siblings.py).  Alone, it takes every waiting one.
        shared = os.getpid() != self._pid
        accepts = 1 if shared else _ACCEPTS
        published = -1
        try:
            while not self.site.stopping.is_set():
                timeout = _SWEEP
                if self._paused_until:
                    timeout = min(timeout, max(0.0, self._paused_until - time.monotonic()))
                for key, _ in selector.select(timeout):
                    if key.fileobj is self.sock:
                        if not (shared and self._leave_to_sibling()):
                            self._accept(accepts)
                    elif key.fileobj is self._wake_r:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(4096)
                    else:
                        self._readable(key.data)
                self._take_back()
                now = time.monotonic()
                if self._paused_until and now >= self._paused_until and not self.site.stopping.is_set():
                    self._paused_until = 0.0
                    selector.register(self.sock, selectors.EVENT_READ)
                if shared and (self._open != published or now - swept >= _SWEEP):
                    published = self._open
                    self._siblings.publish(published)
                if now - swept >= _SWEEP:
                    swept = now
                    self._sweep(now)
        finally:
            with self._handback:
                self._loop_done = True
            self._take_back()
            for connection in list(self._connections):
                if connection.state != BUSY:  # a busy one finishes its reply, then closes
                    self._close(connection)

    def stop(self) -> None:
        """Stop accepting, close idle connections; busy ones finish their reply and close."""
        self.site.stopping.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def close(self) -> None:
        self._workers.close()
        for sock in (self.sock, self._wake_r, self._wake_w):
            sock.close()
        self._selector.close()
        self._siblings.close()
        if self._reserve is not None:
            os.close(self._reserve)
            self._reserve = None

    # -- accepting ------------------------------------------------------------------------------
    def _leave_to_sibling(self) -> bool:
        """Whether to leave the waiting newcomers to a sibling process holding fewer connections:
        then stop accepting for ``_ACCEPT_PAUSE``, at most ``_ACCEPT_DEFER`` in a row."""
        now = time.monotonic()
        least = self._siblings.least_busy()
        if least is None or self._open <= least:
            self._deferring_since = None
            return False
        if self._deferring_since is None:
            self._deferring_since = now
        elif now - self._deferring_since >= _ACCEPT_DEFER:
            self._deferring_since = None  # left long enough: take it
            return False
        self._paused_until = now + _ACCEPT_PAUSE
        self._selector.unregister(self.sock)
        return True

    def _accept(self, count: int) -> None:
        for _ in range(count):
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
            if len(self._connections) >= self.site.limits.max_connections and not self._shed_one():
                self._turn_away(sock, "Service Unavailable (too many open connections)")
                continue
            try:
                sock.setblocking(False)
                # Headers and a sendfile body are two writes: without NODELAY, Nagle plus
                # delayed ACKs would stall every keep-alive response by ~40 ms.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                set_send_timeout(sock, self.site.limits.send_timeout)  # a worker's blocking writes
            except OSError:  # the client is gone already
                sock.close()
                continue
            connection = Connection(sock, str(address[0]), self.site)
            self._connections[connection] = None
            self._open += 1
            self.site.engine.metrics.connection_opened()
            self._selector.register(sock, selectors.EVENT_READ, connection)

    def _shed_one(self) -> bool:
        """Make room: the connection idle the longest, else the one waiting longest for its
        request head (a slowloris client); never one being answered."""
        for state in (IDLE, HEAD):
            waiting = [c for c in self._connections if c.state == state]
            if waiting:
                self._close(min(waiting, key=lambda c: c.since), shut=True)
                return True
        return False

    def _out_of_descriptors(self, exc: OSError) -> None:
        now = time.monotonic()
        if now - self._warned > 10:
            self._warned = now
            log.warning(
                "out of file descriptors accepting a connection (%s, %d open): closing idle ones, "
                "refusing new ones; raise the open-file limit or lower max_connections",
                exc.strerror,
                self._open,
            )
        if self._shed_one():
            return
        if self._reserve is not None:  # free one descriptor to tell one client why
            os.close(self._reserve)
            self._reserve = None
            with contextlib.suppress(OSError):
                sock, _ = self.sock.accept()
                self._turn_away(sock, "Service Unavailable (out of file descriptors)")
            self._reserve = _open_reserve()
        self._backoff = min(max(self._backoff * 2, 0.01), _MAX_BACKOFF)
        self._paused_until = now + self._backoff
        self._selector.unregister(self.sock)  # the loop registers it again

    def _turn_away(self, sock: socket.socket, reason: str) -> None:
        """503 and close, without blocking the loop."""
        with contextlib.suppress(OSError):
            sock.setblocking(False)
            sock.send(error_bytes(503, reason))
            sock.shutdown(socket.SHUT_WR)
            sock.recv(65536)  # what the client sent already, so that closing does not reset
        sock.close()

    # -- reading --------------------------------------------------------------------------------
    def _readable(self, connection: Connection) -> None:
        try:
            data = connection.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # reset: the client went away
            log.debug("connection from %s ended: %s", connection.client, exc)
            self._close(connection)
            return
        if not data:
            self._close(connection)
            return
        if connection.state == LINGER:
            connection.lingered += len(data)
            if connection.lingered > LINGER_BYTES:
                self._close(connection)
            return
        reader = connection.reader
        try:
            reader.feed(data)
        except BadRequest as bad:
            connection.refusal = bad  # answered after the whole requests before it
        if reader.ready or connection.refusal is not None:
            self._answer(connection)
        elif reader.started is not None:
            if reader.head_done:
                connection.state, connection.since = BODY, time.monotonic()
            elif connection.state == IDLE:
                connection.state, connection.since = HEAD, time.monotonic()

    def _answer(self, connection: Connection) -> None:
        """Answer the whole requests read (inline while they need no waiting), then what follows."""
        reader = connection.reader
        while reader.ready:
            request = reader.ready.popleft()
            try:
                pending = connection.answer_inline(request)
            except Exception:
                log.exception("connection from %s failed", connection.client)
                self._close(connection, shut=True)
                return
            if pending is not None:
                self._to_worker(connection, pending)
                return
            connection.answered += 1
            if not connection.wire.keep_alive or self.site.stopping.is_set():
                self._linger(connection)
                return
        if connection.refusal is not None:
            connection.refuse(connection.refusal.status, connection.refusal.reason)
            self._linger(connection)
            return
        waiting = reader.started is not None
        connection.state = (BODY if reader.head_done else HEAD) if waiting else IDLE
        connection.since = time.monotonic()

    # -- workers --------------------------------------------------------------------------------
    def _to_worker(self, connection: Connection, pending: Pending) -> None:
        connection.state = BUSY
        self._selector.unregister(connection.sock)
        try:
            connection.sock.setblocking(True)  # kernel timeouts (SO_SNDTIMEO) bound each write
            self._workers.submit(lambda: self._work(connection, pending))
        except (RuntimeError, OSError):  # no thread to start: as full as out of descriptors
            connection.refuse(503, "Service Unavailable (cannot start a thread)")
            self._close(connection, shut=True)

    def _work(self, connection: Connection, pending: Pending) -> None:
        """A worker thread's job: finish one answer, then hand the connection back."""
        keep = False
        try:
            keep = connection.answer_in_worker(pending)
        except Exception:
            log.exception("connection from %s failed", connection.client)
        with self._handback:
            if not self._loop_done:
                self._returned.put((connection, keep))
                with contextlib.suppress(OSError):
                    self._wake_w.send(b"x")
                return
        cut(connection.sock)  # the server stopped: nobody takes the connection back
        with contextlib.suppress(OSError):
            connection.sock.close()
        self._open -= 1
        self.site.engine.metrics.connection_closed()

    def _take_back(self) -> None:
        while True:
            try:
                connection, keep = self._returned.get_nowait()
            except queue.Empty:
                return
            connection.answered += 1
            try:
                connection.sock.setblocking(False)
            except OSError:
                self._close(connection)
                continue
            if not keep or self.site.stopping.is_set():
                if self._loop_done:
                    self._close(connection, shut=True)
                else:
                    self._linger(connection)
                continue
            connection.state = HEAD  # until _answer says otherwise
            self._selector.register(connection.sock, selectors.EVENT_READ, connection)
            self._answer(connection)  # requests read with the one answered, else wait for more

    # -- deadlines and closing ------------------------------------------------------------------
    def _sweep(self, now: float) -> None:
        for connection in list(self._connections):
            when, status = connection.deadline()
            if now < when:
                continue
            if status and connection.reader.started is None and connection.answered:
                status = 0  # idle, not late
            if status:
                connection.refuse(status, "Request Timeout (the request head took too long)")
                self._linger(connection)
            else:
                self._close(connection)

    def _linger(self, connection: Connection) -> None:
        """Close gracefully: stop sending, then read and drop what the client still sends (for
        a moment), so unread bytes do not reset the connection before the client read the reply."""
        if connection.state == LINGER:
            return
        if connection.state == BUSY:
            self._selector.register(connection.sock, selectors.EVENT_READ, connection)
        connection.state, connection.since = LINGER, time.monotonic()
        try:
            connection.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(connection)

    def _close(self, connection: Connection, shut: bool = False) -> None:
        """Close a connection the loop owns (``shut``: cut it first, so a client cannot take
        what it got for a whole reply)."""
        if connection not in self._connections:
            return  # closed already
        del self._connections[connection]
        if connection.state != BUSY:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(connection.sock)
        if shut:
            cut(connection.sock)
        with contextlib.suppress(OSError):
            connection.sock.close()
        self._open -= 1
        self.site.engine.metrics.connection_closed()


def _open_reserve() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY)
    except OSError:
        return None
