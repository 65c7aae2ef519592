"""Downloads decoupled from the clients that asked for them: one flight per entry.

An artifact miss starts a *flight*: a background thread that takes the entry's lock, asks the
upstream, writes the part file, verifies, stores blob and entry, and releases the lock.  Every
client of that entry in this process, the first included, joins the flight and is served from
the growing part file as bytes arrive (``FlightReader``: its own descriptor; ``pread``, or
``sendfile`` through ``next_span``/``advance``), so a client that stalls, reads slowly or leaves
never blocks, slows or cancels the download or another client, and never holds the entry lock.
Other processes wait for the entry lock (store/locks.py) and then find a hit.

The last chunk is held back until the blob is verified and indexed, so no client receives a
whole body that failed verification.  A download that fails after the upstream's answer began
makes every joined client's stream raise ``FlightFailed`` (the server cuts the connection); a
failure before that reaches every client as an error reply.  The starter is answered ``miss``,
joiners ``hit``.

Deadlines: the upstream's pace (``upstream.client.Pace``: ``fetch_deadline``, ``min_rate``), and
``orphan_deadline`` after the last client left; a cancelled or failed flight stores nothing,
removes its part file and releases the lock.  A cache that cannot store (``StoreFailed`` before
the first byte) relays the answer to one client instead (PASSING, engine/passthrough.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from pytest_upstream.engine.context import RequestContext
from pytest_upstream.engine.errors import UpstreamFailed
from pytest_upstream.engine.fetch import (
    CACHE_HEADER,
    VERIFY_BEFORE_SERVE_LIMIT,
    Fetcher,
    Obtained,
    declared_length,
    store_failed,
)
from pytest_upstream.engine.passthrough import PassThrough
from pytest_upstream.engine.recorders import Answer, Recorders
from pytest_upstream.formats.base import Resource
from pytest_upstream.messages import Reply
from pytest_upstream.repro.netguard import exempt_current_thread
from pytest_upstream.store.cache import UNKNOWN, BlobWriter, Cache, Entry, StoreFailed, entry_id
from pytest_upstream.upstream.client import Pace, UpstreamError, content_coded, iter_body
from pytest_upstream.upstream.decoding import EXPANSION_JUDGED_AFTER

log = logging.getLogger("pytest_upstream.engine.flights")

_READ_CHUNK = 1024 * 1024
_CLOSE_WAIT = 2.0  # seconds Engine.close waits for cancelled flights to clean up

# A flight's states.  STARTING ends in one of the others; STREAMING in DONE or FAILED.
STARTING = "starting"  # waiting for the entry lock or the upstream's answer
FOUND = "found"  # another process stored the entry meanwhile: serve it from the cache
STORED = "stored"  # a small artifact with published digests, stored whole before serving
STREAMING = "streaming"  # the part file grows; clients read it
PASSING = "passing"  # the cache cannot store: one client is relayed the upstream's answer (passthrough.py)
DONE = "done"  # verified, stored and indexed
FAILED = "failed"


class FlightFailed(Exception):
    """The download a client is being served from failed: the server must cut the connection."""


class FlightCancelled(Exception):
    """A flight stopped on purpose (no client left, or the engine closing)."""


@dataclass(frozen=True)
class _Head:
    headers: dict[str, str]
    length: int | None


def _read_at(fd: int, size: int, offset: int) -> bytes:
    if hasattr(os, "pread"):
        return os.pread(fd, size, offset)
    with _SEEK_LOCK:  # pragma: no cover - platforms without pread share one offset per descriptor
        os.lseek(fd, offset, os.SEEK_SET)
        return os.read(fd, size)


_SEEK_LOCK = threading.Lock()


class Flight:
    """One download of one entry, and the clients served from it."""

    def __init__(
        self,
        flights: Flights,
        eid: str,
        ctx: RequestContext,
        res: Resource,
        lock_timeout: float,
        usable: Callable[[], bool],
    ) -> None:
        self._flights = flights
        self.eid = eid
        self.ctx = ctx
        self.res = res
        self._lock_timeout = lock_timeout
        self._usable = usable
        self._cond = threading.Condition()
        # Guarded by _cond:
        self.state = STARTING
        self.head: _Head | None = None
        self.visible = 0  # bytes of the part file clients may send now
        self.entry: Entry | None = None
        self.obtained: Obtained | None = None
        self.error: BaseException | None = None
        self._relay: Reply | None = None  # PASSING: the reply one client takes
        self._fd: int | None = None  # the part file, for clients that have no reader yet
        self._pending = 0  # clients that joined and have no reader yet
        self._readers = 0  # open readers
        self._left_at: float | None = None  # when the last client left
        self._cancel = ""  # why to stop (Flights.close)
        self.thread = threading.Thread(
            target=self._run, name=f"pytest-upstream fetch {res.path[-60:]}", daemon=True
        )

    @property
    def clients(self) -> int:
        return self._pending + self._readers

    # -- the clients' side ---------------------------------------------------
    def attach(self) -> None:
        """A client joins (called with the registry's mutex held, before ``answer``)."""
        with self._cond:
            self._pending += 1
            self._left_at = None

    def answer(self, ctx: RequestContext, res: Resource, first: bool) -> Reply | Obtained | None:
        """What the client of ``ctx`` gets once the upstream answered: a Reply streaming from the
        part file, the whole stored entry (``Obtained``), or None when another process stored it
        (the caller serves the hit).  Raises what the download failed with."""
        cache = "miss" if first else "hit"
        with self._cond:
            while self.state == STARTING:
                self._cond.wait()
            self._pending -= 1
            if self._fd is not None:  # the answer began (it may have ended since): read the file
                fd = os.dup(self._fd)
                self._readers += 1
                self._release_fd_if_unused()
                head = self.head
                assert head is not None
                reader = FlightReader(self, fd, ctx, res, cache)
                return Reply(200, {**head.headers, CACHE_HEADER: cache}, stream=reader, length=head.length)
            self._client_left()
            self._release_fd_if_unused()
            state, error, obtained = self.state, self.error, self.obtained
            relay, self._relay = self._relay, None
        if relay is not None:
            return relay
        if state == PASSING:
            assert error is not None
            raise StoreFailed(f"{error}; another client of this download is being passed it uncached")
        if state == FAILED:
            assert error is not None
            raise error  # the same object in every client's thread: only its traceback differs
        if state == STORED:
            assert obtained is not None
            return Obtained(obtained.entry, cache)
        return None  # FOUND, or DONE and the file already handed over: the entry is a hit now

    def reader_closed(self) -> None:
        with self._cond:
            self._readers -= 1
            self._client_left()

    def _client_left(self) -> None:
        if self.clients == 0:
            self._left_at = self._flights.clock()

    def _release_fd_if_unused(self) -> None:
        if self._fd is not None and self._pending == 0 and self.state not in (STARTING, STREAMING):
            os.close(self._fd)
            self._fd = None

    # -- the download ----------------------------------------------------------
    def _run(self) -> None:
        exempt_current_thread()  # the proxy must reach upstreams while tests are blocked (netguard.py)
        try:
            entry = self._fetch()
        except BaseException as exc:  # every failure ends the flight and reaches its clients
            failure = self._failure(exc)
            if self.head is not None:
                level = logging.INFO if isinstance(exc, FlightCancelled) else logging.WARNING
                scrub = self._flights.recorders.scrub
                url, why = scrub(self.res.upstream_url), scrub(str(failure))
                log.log(level, "download of %s stopped: %s", url, why)
            self._end(FAILED, error=failure)
            if not isinstance(exc, Exception):
                raise
        else:
            if entry is not None:
                self._end(DONE, entry=entry)
        finally:
            self._flights.finished()

    def _fetch(self) -> Entry | None:
        """Download, verify and store; None when the flight already ended (FOUND, STORED)."""
        ctx, res, flights, fetcher = self.ctx, self.res, self._flights, self._flights.fetcher
        lock = flights.cache.locked(ctx.proxy.key, res.path, res.variant, self._lock_timeout)
        with contextlib.ExitStack() as held:
            unlockable = None  # a cache that cannot even lock cannot store: relay (passthrough.py)
            try:
                held.enter_context(lock)
            except StoreFailed as exc:
                unlockable = exc
            if unlockable is None and self._usable():  # another process fetched it meanwhile
                self._end(FOUND)
                return None
            with contextlib.ExitStack() as stack:
                pace = fetcher.pace()
                resp = fetcher.open(stack, ctx, res, None)
                fetcher.check_status(ctx, res, resp)
                length = declared_length(resp)
                head = _Head(fetcher.stream_headers(ctx, res, resp), length)
                try:
                    if unlockable is not None:
                        raise unlockable
                    if res.expected and length is not None and length <= VERIFY_BEFORE_SERVE_LIMIT:
                        self._end(STORED, obtained=fetcher.store(ctx, res, resp, pace))
                        return None
                    size = UNKNOWN if length is None else length
                    writer = flights.cache.writer(tuple(res.expected), self.eid, size)
                except StoreFailed as exc:
                    if resp.is_stream_consumed:  # failed mid-body: nothing was sent, refuse (503)
                        store_failed(flights.cache, exc, f"{res.upstream_url} refused (503)")
                        raise
                    body = PassThrough(stack.pop_all(), resp, pace, ctx, res, flights.recorders)
                    self._end(PASSING, error=exc, relay=body.reply(flights.cache, exc, head.headers, length))
                    return None
                return self._stream(writer, resp, pace, head)

    def _stream(self, writer: BlobWriter, resp: httpx.Response, pace: Pace, head: _Head) -> Entry:
        """Write the body to the part file, publishing all but the last chunk as it grows.  Disk
        full mid-body (no length was declared to reserve) fails the flight; an index entry that
        cannot be written does not: the clients get the whole verified body."""
        ctx, res, cache = self.ctx, self.res, self._flights.cache
        try:
            fd = writer.open_reader()
            chunks, written = iter_body(resp, pace), 0
            if content_coded(resp):
                # Decode past the point where a decompression bomb breaks max_expansion before
                # the first byte goes out, so that a bomb is a clean 502, not a 200 cut short.
                for chunk in chunks:
                    writer.write(chunk)
                    written += len(chunk)
                    if written > EXPANSION_JUDGED_AFTER:
                        break
                writer.flush()
            with self._cond:
                self._fd, self.head, self.state = fd, head, STREAMING
                self._cond.notify_all()
            for chunk in chunks:
                self._check_wanted()
                writer.write(chunk)
                writer.flush()
                if written > self.visible:
                    with self._cond:
                        self.visible = written  # the chunk just written stays held back
                        self._cond.notify_all()
                written += len(chunk)
            sha, size = cache.commit_blob(writer, res.expected, res.upstream_url)
        except StoreFailed as exc:
            store_failed(cache, exc, f"download of {res.upstream_url} stopped")
            raise
        finally:
            writer.discard()
        entry = res.index_entry(ctx.proxy.key, resp.headers, sha, size, ctx.now())
        try:
            return cache.store_entry(entry)
        except StoreFailed as exc:
            store_failed(cache, exc, f"{res.upstream_url} served whole but not indexed")
            return entry

    def _check_wanted(self) -> None:
        """Raise FlightCancelled when the engine closes, or no client came back in time."""
        if self._cancel:
            raise FlightCancelled(self._cancel)
        if self.clients:  # racy read: a quick way out for the usual case
            return
        deadline = self._flights.orphan_deadline
        with self._flights.mutex, self._cond:  # no client may join while we decide
            if self.clients or self._left_at is None:
                return
            if self._flights.clock() - self._left_at < deadline:
                return
            self._flights.forget(self)
        raise FlightCancelled(f"cancelled: no client for {deadline:g}s (orphan_deadline)")

    def _failure(self, exc: BaseException) -> BaseException:
        """What the clients are told: upstream errors name the upstream and the proxy."""
        if isinstance(exc, UpstreamError | FlightCancelled):
            failed = UpstreamFailed(f"upstream {self.res.upstream_url} for {self.ctx.proxy.key!r}: {exc}")
            failed.__cause__ = exc
            return failed
        return exc

    def _end(
        self,
        state: str,
        *,
        entry: Entry | None = None,
        obtained: Obtained | None = None,
        error: BaseException | None = None,
        relay: Reply | None = None,
    ) -> None:
        with self._flights.mutex, self._cond:
            self._flights.forget(self)
            self.state, self.entry, self.obtained, self.error = state, entry, obtained, error
            self._relay = relay
            if entry is not None:
                self.visible = entry.size
            self._release_fd_if_unused()
            self._cond.notify_all()

    def fail_to_start(self, exc: BaseException) -> None:
        self._end(FAILED, error=exc)
        self._flights.finished()

    def cancel(self, why: str) -> None:
        self._cancel = why


class FlightReader:
    """One client's copy of a flight's body: the part file from offset 0, each byte once it is
    visible (``Reply.stream``).  Waits on the flight's condition, never polls; raises
    FlightFailed when the download fails.  Close it (the server does when its client leaves;
    dropping it does too) so the flight knows who is still listening."""

    def __init__(self, flight: Flight, fd: int, ctx: RequestContext, res: Resource, cache: str) -> None:
        self._flight = flight
        self._fd = fd
        self._ctx = ctx
        self._res = res
        self._cache = cache
        self._offset = 0
        self._recorded = False

    def __iter__(self) -> FlightReader:
        return self

    def __next__(self) -> bytes:
        span = self.next_span()
        if span is None:
            raise StopIteration
        offset, count = span
        data = _read_at(self._fd, count, offset)
        if not data:
            self._fail("the part file is shorter than what was written to it")
        self._offset += len(data)
        return data

    def fileno(self) -> int:
        """The part file's descriptor, for a server that sends spans with ``sendfile``."""
        return self._fd

    def next_span(self, limit: int = _READ_CHUNK) -> tuple[int, int] | None:
        """The next bytes to send, as (offset, count) in ``fileno()``, once they are visible; None
        at the end (the reader is closed then).  Raises FlightFailed like iterating does.

        For a server that sends with ``sendfile`` instead of iterating: it calls
        ``advance(sent)`` after each send, and ``close()`` if it stops early.
        """
        if self._fd < 0:
            return None
        flight = self._flight
        with flight._cond:
            while self._offset >= flight.visible and flight.state == STREAMING:
                flight._cond.wait()
            state, visible, entry, error = flight.state, flight.visible, flight.entry, flight.error
        if state == FAILED:
            self._fail(str(error))
        if state == DONE and not self._recorded:  # recorded before the held-back bytes go out
            assert entry is not None
            self._recorded = True
            self._record(entry)
        if self._offset < visible:
            return self._offset, min(visible - self._offset, limit)
        self.close()
        return None

    def advance(self, count: int) -> None:
        """``count`` more bytes were sent from ``next_span``'s offset."""
        self._offset += count

    def _record(self, entry: Entry) -> None:
        ctx, res = self._ctx, self._res
        recorders: Recorders = self._flight._flights.recorders
        recorders.answered(Answer(ctx.request, res.path, res, self._cache, 200, entry.size, entry.sha256))
        recorders.used(ctx.proxy.key, res, entry)

    def _fail(self, why: str) -> None:
        ctx, res = self._ctx, self._res
        self._flight._flights.recorders.answered(Answer(ctx.request, res.path, res, "error", 502, error=why))
        self.close()
        raise FlightFailed(why)

    def close(self) -> None:
        """Stop reading (the client left, or the body was sent); idempotent."""
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        os.close(fd)
        self._flight.reader_closed()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()


class Flights:
    """The flights in progress of one engine, by entry id."""

    def __init__(
        self,
        cache: Cache,
        fetcher: Fetcher,
        recorders: Recorders,
        clock: Callable[[], float],
        orphan_deadline: float,
    ) -> None:
        self.cache = cache
        self.fetcher = fetcher
        self.recorders = recorders
        self.clock = clock
        self.orphan_deadline = orphan_deadline
        self.mutex = threading.Lock()
        self._idle = threading.Condition(self.mutex)
        self._flights: dict[str, Flight] = {}  # joinable flights
        self._running = 0  # download threads not finished yet (a flight may no longer be joinable)

    def serve(
        self, ctx: RequestContext, res: Resource, lock_timeout: float, usable: Callable[[], bool]
    ) -> Reply | Obtained | None:
        """Join the entry's flight, or start one (``usable``: whether the entry is a hit now,
        asked again once the flight holds the entry lock); see ``Flight.answer``."""
        eid = entry_id(ctx.proxy.key, res.path, res.variant)
        with self.mutex:
            flight = self._flights.get(eid)
            first = flight is None
            if flight is None:
                flight = self._flights[eid] = Flight(self, eid, ctx, res, lock_timeout, usable)
            flight.attach()
            if first:
                self._running += 1
        if first:
            try:
                flight.thread.start()
            except BaseException as exc:  # no thread to run it (RuntimeError): fail it, do not strand joiners
                flight.fail_to_start(exc)
                raise
        return flight.answer(ctx, res, first)

    def forget(self, flight: Flight) -> None:
        """Take an ending flight out of the registry (called with ``mutex`` held)."""
        if self._flights.get(flight.eid) is flight:
            del self._flights[flight.eid]

    def finished(self) -> None:
        """A download thread is done: lock released, part file gone or committed."""
        with self.mutex:
            self._running -= 1
            self._idle.notify_all()

    def in_flight(self) -> int:
        """How many downloads are running now."""
        with self.mutex:
            return self._running

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no download runs (tests, shutdown); False if some still do after ``timeout``."""
        with self._idle:
            return self._idle.wait_for(lambda: self._running == 0, timeout)

    def close(self) -> None:
        """Cancel every download (each stops at its next chunk) and wait a little for them."""
        with self.mutex:
            flights = list(self._flights.values())
        for flight in flights:
            flight.cancel("cancelled: the proxy is shutting down")
        self.wait_idle(_CLOSE_WAIT)
