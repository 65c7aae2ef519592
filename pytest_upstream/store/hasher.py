"""The digests of a download, computed beside the download once it is big.

Hashing was the largest single cost of a cold 100 MiB miss (sha256 runs at about 2 GB/s here:
~50 ms, as long as the whole direct download) and it ran in the thread that also receives,
writes and publishes the bytes.  hashlib releases the GIL while it hashes a buffer of more than
2 KiB, so a second thread hashes the chunks while the first goes on receiving and writing: the
hash overlaps the transfer instead of adding to it.

Small bodies (index pages, poms, checksums: most of what a build fetches) are hashed inline,
since a thread costs more than their hash: the thread starts only after ``THREAD_AFTER`` bytes.
The chunks are handed over as they are (``bytes`` are immutable, so nothing is copied), through a
bounded queue: a hash that falls behind slows the download down rather than filling memory.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from typing import Any

THREAD_AFTER = 4 * 1024 * 1024  # bytes hashed inline before a hashing thread starts
_BATCH = 1024 * 1024  # bytes handed to the hashing thread at once (one wake-up per batch)
_QUEUE_BATCHES = 16  # batches waiting for the hashing thread (at most ~16 MiB)


class Hasher:
    """sha256 and any other ``algorithms`` of a stream of chunks, in order."""

    def __init__(self, algorithms: tuple[str, ...] = ()) -> None:
        self._hashes: dict[str, Any] = {"sha256": hashlib.sha256()}
        for algo in algorithms:
            self._hashes.setdefault(algo, hashlib.new(algo))
        self._size = 0
        self._queue: queue.Queue[list[bytes] | None] | None = None
        self._batch: list[bytes] = []  # chunks not handed over yet
        self._batched = 0
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    def update(self, chunk: bytes | bytearray | memoryview) -> None:
        if not chunk:
            return
        if self._queue is not None:
            self._batch.append(chunk if isinstance(chunk, bytes) else bytes(chunk))
            self._batched += len(chunk)
            if self._batched >= _BATCH:
                self._hand_over(self._queue)
            return
        self._update(chunk)
        self._size += len(chunk)
        if self._size > THREAD_AFTER:
            self._start()

    def hexdigests(self) -> dict[str, str]:
        """The digests of everything given to ``update`` (waits for the hashing thread)."""
        self._stop()
        if self._failure is not None:
            raise RuntimeError(f"hashing failed: {self._failure}") from self._failure
        return {algo: h.hexdigest() for algo, h in self._hashes.items()}

    def close(self) -> None:
        """End the hashing thread (the download was abandoned); idempotent."""
        self._stop()

    def _update(self, chunk: bytes | bytearray | memoryview) -> None:
        for h in self._hashes.values():
            h.update(chunk)

    def _hand_over(self, pending: queue.Queue[list[bytes] | None]) -> None:
        if self._batch:
            pending.put(self._batch)
            self._batch, self._batched = [], 0

    def _start(self) -> None:
        self._queue = queue.Queue(_QUEUE_BATCHES)
        self._thread = threading.Thread(
            target=self._run, args=(self._queue,), name="pytest-upstream hash", daemon=True
        )
        self._thread.start()

    def _run(self, batches: queue.Queue[list[bytes] | None]) -> None:
        while (batch := batches.get()) is not None:
            if self._failure is None:
                try:
                    for chunk in batch:
                        self._update(chunk)
                except BaseException as exc:  # pragma: no cover - hashlib does not fail on bytes
                    self._failure = exc

    def _stop(self) -> None:
        thread, pending, self._thread, self._queue = self._thread, self._queue, None, None
        if thread is not None and pending is not None:
            self._hand_over(pending)
            pending.put(None)
            thread.join()  # later updates (none are expected) are hashed inline, still in order
