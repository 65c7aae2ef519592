"""The readers' side of a flight (engine/flights.py): what one client sees of a download.

``FlightBody`` is the part of a flight its clients read: its state, how many bytes they may send
now (``visible``: all but the last chunk until the blob is verified and indexed), and, after the
disk filled under a download of undeclared length, the tail of the body held in memory.
``FlightReader`` is one client's copy of it, from offset 0, each byte once it is visible; it
waits on the flight's condition, never polls.

A *relay* (the cache cannot store the rest of a body whose length was not declared up front, so
no disk could be reserved for it): the first ``in_file`` bytes stay readable in the part file
(each reader holds its own descriptor, which outlives the file's removal), the rest comes from
``tail``, chunks in memory that the download drops once every reader has passed them.  The
download keeps at most ``RELAY_LIMIT`` bytes there; a reader that falls further behind for
``RELAY_STALL`` seconds is cut (FlightFailed), so one stalled client cannot hold the memory or
the others.  The relayed body is verified like a stored one before its last chunk goes out.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from collections import deque

from pytest_upstream.engine.context import RequestContext
from pytest_upstream.engine.passthrough import PASS_THROUGH
from pytest_upstream.engine.recorders import Answer, Recorders
from pytest_upstream.formats.base import Resource
from pytest_upstream.store.cache import Entry

READ_CHUNK = 1024 * 1024  # at most this much per span or chunk handed to the server
RELAY_LIMIT = 32 * 1024 * 1024  # bytes of a relayed body held in memory for slower readers
RELAY_STALL = 10.0  # seconds a reader may hold a full relay buffer without reading
PUBLISH_BYTES = 1024 * 1024  # new bytes that wake the readers ...
PUBLISH_AFTER = 0.005  # ... or seconds since they were last woken, whichever comes first

# A flight's states.  STARTING ends in one of the others; STREAMING in DONE, RELAYED or FAILED.
STARTING = "starting"  # waiting for the entry lock or the upstream's answer
FOUND = "found"  # another process stored the entry meanwhile: serve it from the cache
STORED = "stored"  # a small artifact with published digests, stored whole before serving
STREAMING = "streaming"  # the part file grows (or, relaying, the tail); clients read it
PASSING = "passing"  # the cache cannot store: one client is relayed the upstream's answer (passthrough.py)
DONE = "done"  # verified, stored and indexed
RELAYED = "relayed"  # the whole body reached the readers, verified, and nothing was stored
FAILED = "failed"


class FlightFailed(Exception):
    """The download a client is being served from failed: the server must cut the connection."""


class FlightBody:
    """What the readers of one download share; every field is guarded by ``cond``."""

    def __init__(self, recorders: Recorders) -> None:
        self.recorders = recorders
        self.cond = threading.Condition()
        self.state = STARTING
        self.visible = 0  # bytes of the body clients may send now
        self.entry: Entry | None = None
        self.error: BaseException | None = None
        self.in_file: int | None = None  # relaying: the bytes of the body in the part file
        self.tail: deque[tuple[int, bytes]] = deque()  # relaying: (offset, chunk) past in_file
        self.dropped_to = 0  # relaying: the tail before this offset was dropped
        self.sha256 = ""  # relayed: the body's digest
        self._tail_bytes = 0  # relaying: the bytes in ``tail``
        self._cancel = ""  # why to stop (Flights.close)
        self._published = 0.0  # when the readers were last woken for new bytes (the download's own)
        # Open readers (their offsets bound the tail); a reader dropped unclosed leaves by itself.
        self.readers: weakref.WeakSet[FlightReader] = weakref.WeakSet()

    def grown(self, written: int, verified: bool = False) -> None:
        """The download wrote the body up to ``written``: make it visible, waking the readers for
        the first bytes at once, then every ``PUBLISH_BYTES`` or ``PUBLISH_AFTER`` seconds
        (``verified``: at once, the whole body is known good).  Waking every reader (and their
        threads taking the GIL) for each 256 KiB read cost as much CPU as the hash.  Called by
        the download's thread only."""
        now = time.monotonic()
        if written <= self.visible or (
            not verified
            and self.visible
            and written - self.visible < PUBLISH_BYTES
            and now - self._published < PUBLISH_AFTER
        ):
            return
        self._published = now
        with self.cond:
            self.visible = written
            self.cond.notify_all()

    def reader_closed(self, reader: FlightReader) -> None:
        """A reader stopped (called with ``cond`` held)."""
        self.readers.discard(reader)

    def slowest(self) -> int | None:
        """The smallest offset an open reader still needs (called with ``cond`` held).  A reader
        behind ``dropped_to`` lost its place (it fails when it gets there): it holds up nothing."""
        return min((r.offset for r in self.readers if r.offset >= self.dropped_to), default=None)

    def _hold(self, offset: int, chunk: bytes) -> None:
        """Add a relayed chunk to the tail, publishing the one before it; drop what every reader
        passed, and past ``RELAY_LIMIT`` bytes wait for the slowest reader, at most
        ``RELAY_STALL`` seconds without progress (then it loses its place: flight_reader.py)."""
        with self.cond:
            self.tail.append((offset, chunk))
            self._tail_bytes += len(chunk)
            self.visible = offset
            self.cond.notify_all()
            slowest, since = self.slowest(), time.monotonic()
            while self.tail:
                start, oldest = self.tail[0]
                now = self.slowest()
                if now is None or now >= start + len(oldest):
                    self._drop_oldest()
                    continue
                if self._tail_bytes <= RELAY_LIMIT or self._cancel:
                    return
                if now != slowest:
                    slowest, since = now, time.monotonic()
                left = RELAY_STALL - (time.monotonic() - since)
                if left <= 0:
                    self._drop_oldest()  # the reader stuck before it fails when it gets there
                    continue
                self.cond.wait(left)

    def _drop_oldest(self) -> None:
        start, chunk = self.tail.popleft()
        self._tail_bytes -= len(chunk)
        self.dropped_to = start + len(chunk)


def _read_at(fd: int, size: int, offset: int) -> bytes:
    if hasattr(os, "pread"):
        return os.pread(fd, size, offset)
    with _SEEK_LOCK:  # pragma: no cover - platforms without pread share one offset per descriptor
        os.lseek(fd, offset, os.SEEK_SET)
        return os.read(fd, size)


_SEEK_LOCK = threading.Lock()


class FlightReader:
    """One client's copy of a flight's body (``Reply.stream``); raises FlightFailed when the
    download fails.  Close it (the server does when its client leaves; dropping it does too)
    so the flight knows who is still listening."""

    def __init__(self, body: FlightBody, fd: int, ctx: RequestContext, res: Resource, cache: str) -> None:
        self._body = body
        self._fd = fd
        self._ctx = ctx
        self._res = res
        self._cache = cache
        self.offset = 0  # guarded by the body's cond while it relays (the download trims by it)
        self._recorded = False
        with body.cond:
            body.readers.add(self)

    def __iter__(self) -> FlightReader:
        return self

    def __next__(self) -> bytes:
        span = self._next(READ_CHUNK)
        if span is None:
            raise StopIteration
        offset, count, data = span
        if data is None:
            data = _read_at(self._fd, count, offset)
            if not data:
                self._fail("the part file is shorter than what was written to it")
        with self._body.cond:
            self.offset += len(data)
            self._body.cond.notify_all()  # a relay waiting for room may go on
        return data

    def fileno(self) -> int:
        """The part file's descriptor, for a server that sends spans with ``sendfile``."""
        return self._fd

    def next_span(self, limit: int = READ_CHUNK) -> tuple[int, int] | None:
        """The next bytes to send, as (offset, count) in ``fileno()``, once they are visible; None
        at the end (the reader is closed then).  Raises FlightFailed like iterating does.

        For a server that sends with ``sendfile`` instead of iterating: it calls
        ``advance(sent)`` after each send, and ``close()`` if it stops early.  Only a body of
        declared length is sent so; a relay (which only a body of undeclared length becomes)
        is not in the file, and is iterated.
        """
        span = self._next(limit)
        if span is None:
            return None
        offset, count, data = span
        if data is not None:
            self._fail("the rest of this body is not in the part file (iterate the reader)")
        return offset, count

    def advance(self, count: int) -> None:
        """``count`` more bytes were sent from ``next_span``'s offset."""
        self.offset += count

    def _next(self, limit: int) -> tuple[int, int, bytes | None] | None:
        """The next visible bytes: (offset, count, None) in the part file, or (offset, count,
        bytes) from a relay's tail; None at the end."""
        if self._fd < 0:
            return None
        body = self._body
        with body.cond:
            while self.offset >= body.visible and body.state == STREAMING:
                body.cond.wait()
            state, visible, in_file = body.state, body.visible, body.in_file
            relayed = in_file is not None and in_file <= self.offset < visible
            data = self._from_tail(min(visible - self.offset, limit)) if relayed else None
        if state == FAILED:
            self._fail(str(body.error))
        if relayed and data is None:
            self._fail(
                f"this client fell more than {RELAY_LIMIT} bytes behind a download relayed from memory"
            )
        if self.offset >= visible:
            self._record_once(state)
            self.close()
            return None
        if data is None:
            end = visible if in_file is None else min(visible, in_file)
            count = min(end - self.offset, limit)
        else:
            count = len(data)
        # Recorded before the held-back bytes go out (a stored body: as soon as it is; a relayed
        # one: with its last bytes, since a reader that fell behind may still be cut before).
        if state == DONE or (state == RELAYED and self.offset + count >= visible):
            self._record_once(state)
        return self.offset, count, data

    def _from_tail(self, limit: int) -> bytes | None:
        """The relay's bytes at our offset (called with the body's cond held); None when the
        download dropped them: this reader fell too far behind."""
        for start, chunk in self._body.tail:
            if start <= self.offset < start + len(chunk):
                at = self.offset - start
                return chunk[at : at + limit]
        return None

    def _record_once(self, state: str) -> None:
        if self._recorded or state not in (DONE, RELAYED):
            return
        self._recorded = True
        ctx, res, recorders = self._ctx, self._res, self._body.recorders
        entry = self._body.entry
        if state == DONE:
            assert entry is not None
            recorders.answered(Answer(ctx.request, res.path, res, self._cache, 200, entry.size, entry.sha256))
            recorders.used(ctx.proxy.key, res, entry)
        else:
            size, sha = self._body.visible, self._body.sha256
            recorders.answered(Answer(ctx.request, res.path, res, PASS_THROUGH, 200, size, sha))

    def _fail(self, why: str) -> None:
        ctx, res = self._ctx, self._res
        self._body.recorders.answered(Answer(ctx.request, res.path, res, "error", 502, error=why))
        self.close()
        raise FlightFailed(why)

    def close(self) -> None:
        """Stop reading (the client left, or the body was sent); idempotent."""
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        os.close(fd)
        with self._body.cond:
            self._body.reader_closed(self)
            self._body.cond.notify_all()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
