"""Downloads decoupled from the clients that asked for them: one flight per entry.

An artifact miss starts a *flight*: a background thread that takes the entry's lock, asks the
upstream, writes the part file, verifies, stores blob and entry, and releases the lock.  Every
client of that entry in this process, the first included, joins the flight and is served from
the growing part file as bytes arrive (``FlightReader`` in flight_reader.py: its own descriptor;
``pread``, or ``sendfile`` through ``next_span``/``advance``), so a client that stalls, reads slowly or leaves
never blocks, slows or cancels the download or another client, and never holds the entry lock.
Other processes wait for the entry lock (store/locks.py) and then find a hit.

With an ``s3://`` cache the source may be the bucket: an entry another machine fetched (a
``Pull`` from ``SharedTier.acquire``) streams the same way, verified against the entry's sha256
and size before its last chunk; a bit-flipped object cuts the bodies (it is removed from the
bucket: the next request fetches from the upstream).  Its clients are answered ``hit``.

The last chunk is held back until the blob is verified and indexed, so no client receives a
whole body that failed verification.  A download that fails after the upstream's answer began
makes every joined client's stream raise ``FlightFailed`` (the server cuts the connection); a
failure before that reaches every client as an error reply.  The starter is answered ``miss``,
joiners ``hit``.

Deadlines: the upstream's pace (``upstream.client.Pace``: ``fetch_deadline``, ``min_rate``), and
``orphan_deadline`` after the last client left; a cancelled or failed flight stores nothing,
removes its part file and releases the lock.  A cache that cannot store (``StoreFailed`` before
the first byte) relays the answer to one client instead (PASSING, engine/passthrough.py); one
that fills up in the middle of a body of undeclared length (nothing could be reserved for it)
relays the rest to the clients already joined from memory, bounded, and stores nothing
(RELAYED, flight_reader.py).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

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
from pytest_upstream.engine.flight_reader import (
    DONE,
    FAILED,
    FOUND,
    PASSING,
    RELAYED,
    STARTING,
    STORED,
    STREAMING,
    FlightBody,
    FlightFailed,
    FlightReader,
)
from pytest_upstream.engine.passthrough import PassThrough
from pytest_upstream.engine.recorders import Recorders
from pytest_upstream.engine.shared_tier import SharedTier
from pytest_upstream.formats.base import FormatError, Resource
from pytest_upstream.messages import Reply
from pytest_upstream.repro.netguard import exempt_current_thread
from pytest_upstream.store.cache import (
    UNKNOWN,
    BlobWriter,
    Cache,
    Entry,
    StoreFailed,
    entry_id,
    verify_digests,
)
from pytest_upstream.store.remote_tier import Claim, Pull
from pytest_upstream.upstream.client import UpstreamError, content_coded, iter_body
from pytest_upstream.upstream.decoding import EXPANSION_JUDGED_AFTER

__all__ = ["FlightCancelled", "FlightFailed", "FlightReader", "Flights"]

log = logging.getLogger("pytest_upstream.engine.flights")

_CLOSE_WAIT = 2.0  # seconds Engine.close waits for cancelled flights to clean up


class FlightCancelled(Exception):
    """A flight stopped on purpose (no client left, or the engine closing)."""


@dataclass(frozen=True)
class _Head:
    headers: dict[str, str]
    length: int | None


class Flight(FlightBody):
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
        super().__init__(flights.recorders)
        self._flights = flights
        self.eid = eid
        self.ctx = ctx
        self.res = res
        self._lock_timeout = lock_timeout
        self._usable = usable
        # Guarded by cond, like FlightBody's fields:
        self.head: _Head | None = None
        self.obtained: Obtained | None = None
        self._relay: Reply | None = None  # PASSING: the reply one client takes
        self._fd: int | None = None  # the part file, for clients that have no reader yet
        self._pending = 0  # clients that joined and have no reader yet
        self._readers = 0  # open readers
        self._left_at: float | None = None  # when the last client left
        self._claim: Claim | None = None  # the bucket's claim to download this entry (s3:// caches)
        self._source = res.upstream_url  # where the bytes come from (the bucket's blob, for a pull)
        self.from_bucket = False  # set before STREAMING: the answer is a hit of the shared cache
        self.thread = threading.Thread(
            target=self._run, name=f"pytest-upstream fetch {res.path[-60:]}", daemon=True
        )

    @property
    def clients(self) -> int:
        return self._pending + self._readers

    # -- the clients' side ---------------------------------------------------
    def attach(self) -> None:
        """A client joins (called with the registry's mutex held, before ``answer``)."""
        with self.cond:
            self._pending += 1
            self._left_at = None

    def answer(self, ctx: RequestContext, res: Resource, first: bool) -> Reply | Obtained | None:
        """What the client of ``ctx`` gets once the upstream answered: a Reply streaming from the
        part file, the whole stored entry (``Obtained``), or None when another process stored it
        (the caller serves the hit).  Raises what the download failed with."""
        with self.cond:
            while self.state == STARTING:
                self.cond.wait()
            cache = "miss" if first and not self.from_bucket else "hit"
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

    def reader_closed(self, reader: FlightReader) -> None:
        super().reader_closed(reader)
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
                url, why = scrub(self._source), scrub(str(failure))
                log.log(level, "download of %s stopped: %s", url, why)
            self._end(FAILED, error=failure)
            if isinstance(exc, FormatError) and exc.status == 404 and self._flights.shared is not None:
                claim, self._claim = self._claim, None  # a remembered 404 is shared too
                self._flights.shared.publish_not_found(self.ctx.proxy.key, self.res, claim)
            if not isinstance(exc, Exception):
                raise
        else:
            if entry is not None:
                self._end(DONE, entry=entry)
                if not self.from_bucket:
                    self._share(entry)  # after the clients have it all
        finally:
            if self._claim is not None:  # failed, or found: let another machine go
                self._claim.release()
            self._flights.finished()

    def _share(self, entry: Entry) -> None:
        """Publish to the bucket what this machine stored, then release the claim."""
        if self._flights.shared is not None:
            claim, self._claim = self._claim, None
            self._flights.shared.publish(entry, claim)

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
            if unlockable is None and flights.shared is not None:  # or another machine did
                outcome = flights.shared.acquire(ctx.proxy.key, res.path, res.variant)
                if isinstance(outcome, Pull):
                    return self._pull(outcome)
                if not isinstance(outcome, Claim):
                    self._end(FOUND)
                    return None
                self._claim = outcome
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
                        obtained = fetcher.store(ctx, res, resp, pace)
                        self._end(STORED, obtained=obtained)
                        self._share(obtained.entry)
                        return None
                    size = UNKNOWN if length is None else length
                    writer = flights.cache.writer(tuple(res.expected), self.eid, size)
                    chunks, coded = iter_body(resp, pace), bool(content_coded(resp))
                except StoreFailed as exc:
                    if resp.is_stream_consumed:  # failed mid-body: nothing was sent, refuse (503)
                        store_failed(flights.cache, exc, f"{res.upstream_url} refused (503)")
                        raise
                    body = PassThrough(stack.pop_all(), resp, pace, ctx, res, flights.recorders)
                    self._end(PASSING, error=exc, relay=body.reply(flights.cache, exc, head.headers, length))
                    return None
                commit = functools.partial(fetcher.commit_streamed, ctx, res, resp.headers)
                return self._stream(writer, chunks, head, commit, coded=coded)

    def _pull(self, pull: Pull) -> Entry | None:
        """Stream an entry another machine put in the bucket (called holding the entry lock), as
        a download from the upstream is streamed; ``Pull.commit`` verifies and stores it."""
        shared, ctx, res, entry = self._flights.shared, self.ctx, self.res, pull.entry
        assert shared is not None
        self._source, self.from_bucket = pull.what, True
        head = _Head(self._flights.fetcher.entry_headers(ctx, res, entry), entry.size)
        try:
            writer = self._flights.cache.writer((), self.eid, entry.size)
            verified = functools.partial(self.grown, entry.size, True)  # the last chunk may go
            return self._stream(writer, shared.chunks(pull), head, lambda w: shared.commit(pull, w, verified))
        finally:
            pull.close()

    def _stream(
        self,
        writer: BlobWriter,
        chunks: Iterator[bytes],
        head: _Head,
        commit: Callable[[BlobWriter], Entry],
        *,
        coded: bool = False,
    ) -> Entry | None:
        """Write the body to the part file, publishing all but the last chunk as it grows, then
        ``commit`` it (verify and store).  Disk full mid-body (no length was declared to reserve)
        relays the rest from memory (``_relay_from_memory``: None then, nothing stored)."""
        cache = self._flights.cache
        try:
            fd = writer.open_reader()
            written = 0
            if coded:
                # Decode past the point where a decompression bomb breaks max_expansion before
                # the first byte goes out, so that a bomb is a clean 502, not a 200 cut short.
                for chunk in chunks:
                    writer.write(chunk)
                    written += len(chunk)
                    if written > EXPANSION_JUDGED_AFTER:
                        break
                writer.flush()
            with self.cond:
                self._fd, self.head, self.state = fd, head, STREAMING
                self.cond.notify_all()
            for chunk in chunks:
                self._check_wanted()
                try:
                    writer.write(chunk)
                    writer.flush()
                except StoreFailed as exc:
                    if head.length is not None:  # sent with sendfile from the file: cut (rare:
                        raise  # the length was reserved on disk before the first byte)
                    self._relay_from_memory(writer, exc, written, chunk, chunks)
                    return None
                self.grown(written)  # the chunk just written stays held back
                written += len(chunk)
            return commit(writer)
        except StoreFailed as exc:
            store_failed(cache, exc, f"download of {self._source} stopped")
            raise
        finally:
            writer.discard()

    def _relay_from_memory(
        self, writer: BlobWriter, why: StoreFailed, in_file: int, failed: bytes, rest: Iterator[bytes]
    ) -> None:
        """The disk filled after ``in_file`` bytes of a body of undeclared length, writing the chunk
        ``failed`` (hashed already: ``BlobWriter.write``): relay it and ``rest`` to the clients
        already joined from memory (flight_reader.py), verify, store nothing.  The flight leaves
        the registry first, so the next request is a fresh miss."""
        res, cache = self.res, self._flights.cache
        action = f"relaying the rest of {res.upstream_url} to its clients from memory, uncached"
        store_failed(cache, why, action)
        writer.discard()  # the part file goes; every reader holds its own descriptor on it
        with self._flights.mutex, self.cond:
            self._flights.forget(self)
            self.in_file = in_file
        self._hold(in_file, failed)
        offset = in_file + len(failed)
        for chunk in rest:
            if self._cancel or not self.clients:  # nothing is stored: no reason to go on alone
                raise FlightCancelled(self._cancel or "cancelled: every client of the relay left")
            writer.hash_only(chunk)
            self._hold(offset, chunk)
            offset += len(chunk)
        digests = writer.digests()
        verify_digests(digests, res.expected, res.upstream_url)
        self._end(RELAYED, relayed=(offset, digests["sha256"]))

    def slowest(self) -> int | None:
        """A client that joined and has no reader yet will start at offset 0 (and has lost its
        place already if part of the tail was dropped)."""
        return 0 if self._pending and not self.dropped_to else super().slowest()

    def _check_wanted(self) -> None:
        """Raise FlightCancelled when the engine closes, or no client came back in time."""
        if self._cancel:
            raise FlightCancelled(self._cancel)
        if self.clients:  # racy read: a quick way out for the usual case
            return
        deadline = self._flights.orphan_deadline
        with self._flights.mutex, self.cond:  # no client may join while we decide
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
        relayed: tuple[int, str] | None = None,
    ) -> None:
        with self._flights.mutex, self.cond:
            self._flights.forget(self)
            self.state, self.entry, self.obtained, self.error = state, entry, obtained, error
            self._relay = relay
            if entry is not None:
                self.visible = entry.size
            if relayed is not None:  # the whole relayed body, verified (RELAYED)
                self.visible, self.sha256 = relayed
            self._release_fd_if_unused()
            self.cond.notify_all()

    def fail_to_start(self, exc: BaseException) -> None:
        self._end(FAILED, error=exc)
        self._flights.finished()

    def cancel(self, why: str) -> None:
        with self.cond:
            self._cancel = why
            self.cond.notify_all()  # a relay waiting for a slow reader stops waiting


class Flights:
    """The flights in progress of one engine, by entry id."""

    def __init__(
        self,
        cache: Cache,
        fetcher: Fetcher,
        recorders: Recorders,
        clock: Callable[[], float],
        orphan_deadline: float,
        shared: SharedTier | None = None,
    ) -> None:
        self.cache = cache
        self.fetcher = fetcher
        self.recorders = recorders
        self.clock = clock
        self.orphan_deadline = orphan_deadline
        self.shared = shared  # an s3:// cache's bucket: one download per entry across machines
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
