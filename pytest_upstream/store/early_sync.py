"""Durability started early: a big part file is flushed to disk while it is still being written.

A finished download is made durable (``fsync``) before it is indexed, and the last chunk of a
streamed miss waits for that (engine/flights.py).  Done only at the end, the ``fsync`` of a
100 MiB part file writes all of it back at once: tens of milliseconds in which the client has
every byte but the last chunk.  ``EarlySync`` asks the OS to write back what is already there
every ``EVERY`` bytes, in a thread of its own (``fdatasync`` releases the GIL and does not block
the writer: the kernel lets writes go on while older pages are written back), so the final
``fsync`` finds little left to do.  Nothing is promised by these early syncs: the guarantee is
still the final ``fsync`` in ``AtomicFile.commit``.

Small files never start the thread: it starts at the first ``EVERY`` bytes.
"""

from __future__ import annotations

import contextlib
import os
import threading

EVERY = 16 * 1024 * 1024  # bytes written between two early syncs


class EarlySync:
    """Write back the file behind ``fd`` in the background as it grows (``grown``)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._next = EVERY
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def grown(self, size: int) -> None:
        """The file now holds ``size`` bytes (written to the OS, not necessarily to disk)."""
        if size < self._next:
            return
        self._next = size + EVERY
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="pytest-upstream sync", daemon=True)
            self._thread.start()
        self._wake.set()

    def stop(self) -> None:
        """End the thread (before the file is committed or closed); idempotent."""
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stopping = True
            self._wake.set()
            thread.join()

    def _run(self) -> None:
        sync = getattr(os, "fdatasync", os.fsync)
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stopping:
                return
            with contextlib.suppress(OSError):  # best effort: the final fsync reports failures
                sync(self._fd)
