"""How many connections each ``serve --workers`` process holds, in memory they all share.

The forked processes accept on one listening socket, and the kernel wakes whichever waits: on
a busy machine one process can take every connection of a burst while its sibling is not
scheduled, and two processes then serve no faster than one.  So each process publishes its
count of open connections in a small table mapped before the fork (anonymous shared memory),
and a process holding more than its least busy sibling leaves a newcomer to it for a moment
(``Listener``).  A slot not refreshed for a second (a worker that died) is ignored.  It is a
hint, read and written without locks: a torn read costs one unbalanced accept, nothing else.
"""

from __future__ import annotations

import mmap
import os
import struct
import time

_SLOT = struct.Struct("@iid")  # pid, open connections, monotonic time of the last update
_SLOTS = 64
_STALE = 1.0  # seconds: a slot older than this belongs to no live process


class Siblings:
    def __init__(self) -> None:
        self._table = mmap.mmap(-1, _SLOT.size * _SLOTS)  # MAP_SHARED | MAP_ANONYMOUS: kept across fork
        self._slot: int | None = None
        self._pid = 0

    def publish(self, count: int) -> None:
        """This process's count of open connections, now."""
        now = time.monotonic()
        if self._slot is None or self._pid != os.getpid():
            self._pid = os.getpid()
            self._slot = self._claim(now)
        if self._slot is not None:
            _SLOT.pack_into(self._table, self._slot * _SLOT.size, self._pid, count, now)

    def least_busy(self) -> int | None:
        """The fewest connections a live sibling holds; None when there is none."""
        now = time.monotonic()
        counts = [
            count
            for pid, count, stamp in _SLOT.iter_unpack(self._table)
            if pid and pid != self._pid and now - stamp < _STALE
        ]
        return min(counts, default=None)

    def close(self) -> None:
        self._table.close()

    def _claim(self, now: float) -> int | None:
        free = None
        for index, (pid, _, stamp) in enumerate(_SLOT.iter_unpack(self._table)):
            if pid == self._pid:
                return index
            if free is None and (not pid or now - stamp >= _STALE):
                free = index
        return free
