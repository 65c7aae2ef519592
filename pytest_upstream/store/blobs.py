"""Is a blob intact?  Hashed once per change of the file, whichever process asks first.

A blob is intact when its bytes hash to its name.  Hashing a large blob costs as much as
serving it, so the answer is remembered:

- in memory, per blob, as the file's stamp (inode, size, mtime, ctime) when it was hashed
  (bounded: the oldest answers are forgotten first);
- on disk, in a verification marker (``verified/<2 hex>/<sha256>``, store/layout.py) holding
  the same stamp, so the first hit in a new process (a new CI job, a new xdist worker) trusts
  a blob another process already hashed instead of reading it again;
- in flight: two threads that ask about one blob at once hash it once; the second waits for
  the first's answer.

Any write to the blob changes its mtime and ctime (the ctime cannot be set back by a user:
``os.utime`` restoring the mtime sets the ctime to now), and replacing it changes its inode,
so a changed blob no longer matches its stamp and is hashed again on its next use.  What a
stamp cannot see is the disk silently flipping bits under an unchanged inode (or a change
within one tick of the kernel's coarse file clock after the hash); so a remembered answer is
trusted for ``REVERIFY_AFTER`` at most, counted from the hash that gave it (the marker's own
mtime, for another process): the next use after that hashes the blob again.  ``cache verify``
re-hashes every blob whatever its stamp.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pytest_upstream.store.files import atomic_write
from pytest_upstream.store.layout import Layout

Stamp = tuple[int, int, int, int]  # inode, size, mtime_ns, ctime_ns
# How long a hash vouches for a blob whose stamp has not changed (docs/cache.md): bit rot under
# an unchanged stamp is caught on the first use after this, in a long-running serve as well.
REVERIFY_AFTER = 24 * 3600.0
_MEMO_SIZE = 16_384
_MARKER_MAX = 256


@dataclass(frozen=True)
class Verdict:
    """What a check found: ``intact`` (with the blob's size), ``missing`` or ``corrupt``."""

    state: Literal["intact", "missing", "corrupt"]
    size: int = 0
    stamp: Stamp | None = None
    actual: str = ""  # what a corrupt blob hashes to


MISSING = Verdict("missing")


def stamp_of(st: os.stat_result) -> Stamp:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file's bytes (hex)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_marker(layout: Layout, sha256: str) -> tuple[Stamp, float] | None:
    """The stamp a blob had when it was last found intact and when it was hashed (the marker's
    mtime), or None (absent or unreadable)."""
    try:
        with open(layout.marker(sha256), "rb") as f:
            fields = f.read(_MARKER_MAX).split()
            hashed_at = os.fstat(f.fileno()).st_mtime
        if len(fields) != 5 or fields[0].decode() != sha256:
            return None
        ino, size, mtime, ctime = (int(x) for x in fields[1:])
    except (OSError, ValueError):
        return None
    return (ino, size, mtime, ctime), hashed_at


def write_marker(layout: Layout, sha256: str, stamp: Stamp, hashed_at: float | None = None) -> None:
    """Record that the blob with this stamp is intact (best effort: a read-only cache has none),
    as of ``hashed_at`` (the marker's mtime; default now).

    Not fsynced: a marker lost in a crash costs one more hash, never a wrong answer.
    """
    line = " ".join([sha256, *(str(x) for x in stamp)]) + "\n"
    marker = Path(layout.marker(sha256))
    with contextlib.suppress(OSError):
        atomic_write(marker, line.encode(), durable=False, tmp_dir=layout.tmp)
        if hashed_at is not None:
            os.utime(marker, (hashed_at, hashed_at))


def remove_marker(layout: Layout, sha256: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(layout.marker(sha256))


class _Flight:
    def __init__(self) -> None:
        self.done = threading.Event()


class Verifier:
    """Answers "is blob X intact?" for one cache directory; shared by the threads of a process.

    ``reverify_after`` and ``now`` (seconds since the epoch, like file times) are the schedule
    of re-hashing a blob whose stamp has not changed; tests shorten the one or move the other.
    """

    def __init__(
        self,
        layout: Layout,
        *,
        write_markers: bool = True,
        reverify_after: float = REVERIFY_AFTER,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.layout = layout
        self.write_markers = write_markers
        self.reverify_after = reverify_after
        self.now = now
        # sha256 -> (stamp, path, when hashed)
        self._memo: OrderedDict[str, tuple[Stamp, Path, float]] = OrderedDict()
        self._lock = threading.Lock()
        self._flights: dict[str, _Flight] = {}

    def known_path(self, sha256: str, size: int) -> Path | None:
        """The hit path's shortcut: the blob's path if this process already vouches for it as it
        is now and it has ``size`` bytes; None means "ask ``check``".  One ``stat``, one look-up.
        """
        try:
            st = os.stat(self.layout.blob(sha256))
        except FileNotFoundError:
            return None
        with self._lock:
            known = self._memo.get(sha256)
        if known is None or st.st_size != size or not self._recent(known[2]):
            return None
        if known[0] != (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns):
            return None
        return known[1]

    def _recent(self, hashed_at: float) -> bool:
        """Whether a hash made at ``hashed_at`` still vouches (``reverify_after``)."""
        return self.now() - hashed_at <= self.reverify_after

    def check(self, sha256: str) -> Verdict:
        """``intact`` (without reading the bytes when the stamp is known), ``missing`` or ``corrupt``."""
        path = self.layout.blob(sha256)
        while True:
            try:
                stamp = stamp_of(os.stat(path))
            except FileNotFoundError:
                return MISSING
            with self._lock:
                known = self._memo.get(sha256)
                if known is not None and known[0] == stamp and self._recent(known[2]):
                    return Verdict("intact", stamp[1], stamp)
                flight = self._flights.get(sha256)
                if flight is None:
                    flight = self._flights[sha256] = _Flight()
                    leader = True
                else:
                    leader = False
            if not leader:
                flight.done.wait()
                continue  # the leader's answer is in the memo now (or the blob is gone)
            try:
                return self._check_uncached(sha256, path, stamp)
            finally:
                with self._lock:
                    del self._flights[sha256]
                flight.done.set()

    def _check_uncached(self, sha256: str, path: str, stamp: Stamp) -> Verdict:
        marked = read_marker(self.layout, sha256)
        if marked is not None and marked[0] == stamp and self._recent(marked[1]):
            self.remember(sha256, stamp, hashed_at=marked[1])
            return Verdict("intact", stamp[1], stamp)
        try:
            with open(path, "rb") as f:
                before = stamp_of(os.fstat(f.fileno()))
                actual = hashlib.file_digest(f, "sha256").hexdigest()
                after = stamp_of(os.fstat(f.fileno()))
        except FileNotFoundError:
            return MISSING
        if actual != sha256:
            return Verdict("corrupt", after[1], after, actual)
        if before == after:  # not written to while we read it
            self.remember(sha256, after, marker=self.write_markers)
        return Verdict("intact", after[1], after)

    def remember(
        self, sha256: str, stamp: Stamp, *, marker: bool = False, hashed_at: float | None = None
    ) -> None:
        """Trust this blob while it keeps ``stamp`` (``marker``: in other processes too), for
        ``reverify_after`` from ``hashed_at`` (default: now, just hashed)."""
        when = self.now() if hashed_at is None else hashed_at
        with self._lock:
            self._memo[sha256] = (stamp, Path(self.layout.blob(sha256)), when)
            self._memo.move_to_end(sha256)
            while len(self._memo) > _MEMO_SIZE:
                self._memo.popitem(last=False)
        if marker:
            write_marker(self.layout, sha256, stamp, hashed_at)

    def known(self, sha256: str, stamp: Stamp) -> float | None:
        """When the hash was made that lets this process or a marker vouch for the blob with
        ``stamp`` now, or None when nothing vouches for it."""
        with self._lock:
            known = self._memo.get(sha256)
        if known is not None and known[0] == stamp and self._recent(known[2]):
            return known[2]
        marked = read_marker(self.layout, sha256)
        if marked is not None and marked[0] == stamp and self._recent(marked[1]):
            return marked[1]
        return None

    def forget(self, sha256: str) -> None:
        with self._lock:
            self._memo.pop(sha256, None)
        remove_marker(self.layout, sha256)
