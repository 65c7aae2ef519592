"""The worker threads that answer what must wait: daemon threads, started as needed.

At most ``limit`` threads (the server passes ``max_connections``: a connection has at most one
request being answered, so no job ever waits for another's to finish, as with a thread per
connection).  A thread that finished a job waits for the next; threads are not retired (an idle
one is a blocked ``get`` and a mostly untouched stack).  Daemon threads, unlike
``concurrent.futures``' (which the interpreter joins at exit): a process stopping does not wait
for a client that stopped reading or an upstream that drips.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable

from pytest_upstream.repro.netguard import exempt_current_thread

Job = Callable[[], None]


class Workers:
    def __init__(self, limit: int, name: str = "pytest-upstream-worker") -> None:
        self._limit = max(1, limit)
        self._name = name
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0  # threads waiting for a job that no queued job is promised to yet

    @property
    def threads(self) -> int:
        return self._threads

    def submit(self, job: Job) -> None:
        """Run ``job`` in a worker thread; RuntimeError when none can be started."""
        with self._lock:
            if self._idle or self._threads >= self._limit:
                self._idle = max(0, self._idle - 1)
                self._jobs.put(job)
                return
            self._threads += 1
        try:
            threading.Thread(target=self._run, name=self._name, daemon=True).start()
        except RuntimeError:
            with self._lock:
                self._threads -= 1
            raise
        self._jobs.put(job)

    def close(self) -> None:
        """Let every thread end once it finished its job."""
        for _ in range(self._threads):
            self._jobs.put(None)

    def _run(self) -> None:
        exempt_current_thread()  # the engine reaches upstreams while tests are blocked (netguard.py)
        while (job := self._jobs.get()) is not None:
            job()
            with self._lock:
                self._idle += 1
