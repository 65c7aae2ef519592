"""Entry locks: one entry fetched by one thread of one process at a time, from a bounded set of files.

Each entry used to have its own lock file, kept forever (a million entries, a million files).
Now ``LOCK_STRIPES`` lock files under ``locks/`` are shared by the entries, chosen by entry id
(store/layout.py).  Two rules make sharing a file safe:

- **Within a process, exclusion is per entry**, by a reference-counted ``threading.Lock``
  per entry id, shared by every ``Cache`` the process opens on the directory
  (``striped_locks``).  A stripe's ``flock`` belongs to an open file description, so two lock
  objects on one stripe in one process would block each other; instead, the stripe's
  cross-process lock is shared by all threads of the process that hold an entry on it: the
  first takes it, the last releases it.  So a thread holding entry A can take entry B on the same stripe (the
  engine fetches metadata and then an artifact; formats may nest) without deadlocking itself.
- **Across processes, exclusion is per stripe**: a process holding any entry of a stripe keeps
  other processes from every entry of that stripe, which costs at most a wait for an unrelated
  fetch (1 in ``LOCK_STRIPES`` pairs).  The OS drops a dead holder's ``flock``.  One caveat:
  two processes that each hold one entry and then ask for another, in opposite stripe order,
  wait for each other until ``timeout``; the engine does not nest entry locks across a fetch
  (a format's metadata is resolved before the artifact's lock is taken), so keep it that way.

Timeouts raise ``LockTimeout`` with the caller's message; ``timeout=0`` takes without waiting.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import filelock

from pytest_upstream.store.errors import LockTimeout
from pytest_upstream.store.layout import Layout, stripe_of

_REGISTRY: dict[str, StripedLocks] = {}
_REGISTRY_LOCK = threading.Lock()


def striped_locks(layout: Layout) -> StripedLocks:
    """The entry locks of a cache directory, one set per process however many ``Cache`` objects
    it opens on it: so in-process exclusion and stripe sharing hold between them too."""
    key = os.path.realpath(layout.locks)
    with _REGISTRY_LOCK:
        locks = _REGISTRY.get(key)
        if locks is None:
            locks = _REGISTRY[key] = StripedLocks(layout)
        return locks


def _forget_after_fork() -> None:
    """A forked child holds none of its parent's locks (its threads are gone): start afresh."""
    global _REGISTRY_LOCK
    _REGISTRY_LOCK = threading.Lock()
    _REGISTRY.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


class _EntryLock:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0  # threads holding or waiting for it


class _Stripe:
    def __init__(self, path: Path) -> None:
        self.file = filelock.FileLock(path, thread_local=False, is_singleton=False)
        self.holders = 0  # threads of this process holding an entry of this stripe
        self.acquiring = False  # a thread is waiting for the flock
        self.cond = threading.Condition()


class StripedLocks:
    """The entry locks of one cache directory, for all threads of a process."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._mutex = threading.Lock()
        self._entries: dict[str, _EntryLock] = {}
        self._stripes: dict[int, _Stripe] = {}

    @contextlib.contextmanager
    def hold(self, eid: str, timeout: float, message: str) -> Iterator[None]:
        """Hold entry ``eid``'s lock; ``LockTimeout(message)`` after ``timeout`` seconds."""
        deadline = time.monotonic() + max(timeout, 0.0)
        entry = self._entry(eid)
        try:
            got = entry.lock.acquire(timeout=timeout) if timeout > 0 else entry.lock.acquire(blocking=False)
            if not got:
                raise LockTimeout(message)
            try:
                stripe = self._stripe(eid)
                self._enter_stripe(stripe, deadline, message)
                try:
                    yield
                finally:
                    self._leave_stripe(stripe)
            finally:
                entry.lock.release()
        finally:
            self._drop_entry(eid, entry)

    def _entry(self, eid: str) -> _EntryLock:
        with self._mutex:
            entry = self._entries.get(eid)
            if entry is None:
                entry = self._entries[eid] = _EntryLock()
            entry.users += 1
            return entry

    def _drop_entry(self, eid: str, entry: _EntryLock) -> None:
        with self._mutex:
            entry.users -= 1
            if entry.users == 0:
                del self._entries[eid]

    def _stripe(self, eid: str) -> _Stripe:
        n = stripe_of(eid)
        with self._mutex:
            stripe = self._stripes.get(n)
            if stripe is None:
                self.layout.locks.mkdir(parents=True, exist_ok=True)
                stripe = self._stripes[n] = _Stripe(self.layout.lock_stripe(eid))
            return stripe

    def _enter_stripe(self, stripe: _Stripe, deadline: float, message: str) -> None:
        with stripe.cond:
            while True:
                if stripe.holders > 0:  # this process holds the flock already: share it
                    stripe.holders += 1
                    return
                if not stripe.acquiring:
                    stripe.acquiring = True
                    break
                left = deadline - time.monotonic()
                if left <= 0 or not stripe.cond.wait(left):
                    if stripe.holders == 0 and not stripe.acquiring:
                        continue  # woken at the deadline with the stripe free: take it now
                    raise LockTimeout(message)
        try:
            stripe.file.acquire(timeout=max(deadline - time.monotonic(), 0.0))
        except filelock.Timeout:
            with stripe.cond:
                stripe.acquiring = False
                stripe.cond.notify_all()
            raise LockTimeout(message) from None
        except BaseException:
            with stripe.cond:
                stripe.acquiring = False
                stripe.cond.notify_all()
            raise
        with stripe.cond:
            stripe.acquiring = False
            stripe.holders = 1
            stripe.cond.notify_all()

    def _leave_stripe(self, stripe: _Stripe) -> None:
        with stripe.cond:
            stripe.holders -= 1
            if stripe.holders == 0:
                stripe.file.release()
                stripe.cond.notify_all()
