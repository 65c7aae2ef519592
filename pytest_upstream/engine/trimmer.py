"""The size cap (``max_size``): keep a cache directory under a size while the proxy serves.

A ``Trimmer`` runs in one background thread per engine, never on a request's path.  It learns
of stored bytes from the answers (it is one of the engine's recorders: a miss that was stored
adds its size to an estimate), and looks at the directory when the estimate passes the cap, when
this process stored another ``CHECK_STEP`` of the cap since the last look (so growth by other
processes sharing the directory is seen too), every ``RECHECK_INTERVAL`` seconds, and when a
process starts answering requests.
A look over the cap trims the least recently used entries, and the blobs only they named, down
to ``LOW_WATER`` of the cap, with the store's one eviction (store/trim.py ``trim``: busy entries,
entries used meanwhile and fresh blobs are left; a blob being sent stays readable), never
removing a blob pinned by a lock file (``lock_pins``).

Processes sharing a directory trim one at a time: a look takes ``locks/trim.lock`` without
waiting, and a process that finds it held leaves the pass to its holder.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

import filelock

from pytest_upstream.config.settings import Settings
from pytest_upstream.config.units import human_size, plural
from pytest_upstream.engine.metrics import Metrics
from pytest_upstream.engine.recorders import Answer
from pytest_upstream.formats.base import Resource
from pytest_upstream.repro.lock_tools import WRITING_MODES
from pytest_upstream.repro.lockfile import LockError, LockFile
from pytest_upstream.store.cache import USE_STAMP_INTERVAL, Cache, Entry
from pytest_upstream.store.trim import DEFAULT_GRACE, TrimReport, trim

log = logging.getLogger("pytest_upstream")

LOW_WATER = 0.9  # a pass over the cap trims down to this fraction of it (docs/cache.md § Size cap)
CHECK_STEP = 0.05  # look again once this process stored this fraction of the cap since the last look
RECHECK_INTERVAL = 300.0  # seconds between looks whatever this process stored


class Trimmer:
    """Keeps ``cache`` under ``max_size`` bytes of blobs (see the module docstring).

    ``now``: the engine's clock, against which entry and blob ages are judged (``grace``);
    ``pause``: real seconds between removing entries and removing their blobs (default ``grace``),
    so a request that read an entry just before it went has opened its blob.
    """

    def __init__(
        self,
        cache: Cache,
        max_size: int,
        metrics: Metrics,
        now: Callable[[], float],
        pins: Callable[[], frozenset[str]],
        *,
        spare: Callable[[], float | None] = lambda: None,
        grace: float = DEFAULT_GRACE,
        pause: float | None = None,
        interval: float = RECHECK_INTERVAL,
    ) -> None:
        self.cache = cache
        self.max_size = max_size
        self.low_water = int(max_size * LOW_WATER)
        self.step = max(int(max_size * CHECK_STEP), 1)
        self.metrics = metrics
        self.now = now
        self.pins = pins
        self.spare = spare
        self.grace = grace
        self.pause = grace if pause is None else pause
        self.interval = interval
        self.last: TrimReport | None = None  # the last look's report (tests, diagnostics)
        self._start_lock = threading.Lock()
        self._stopped = False
        self._pid = 0  # the process whose thread runs (none yet)
        self._fresh_state()

    def _fresh_state(self) -> None:
        """The per-process state: a forked child starts with its own (its parent's locks and
        events may have been held by a thread the child does not have, and filelock refuses a
        lock object made in another process)."""
        self._state_pid = os.getpid()
        self._file_lock = filelock.FileLock(
            self.cache.layout.trim_lock, thread_local=False, is_singleton=False
        )
        self._cond = threading.Condition()
        self._size: int | None = None  # the blobs' bytes at the last look
        self._added = 0  # bytes this process stored since
        self._asked = 0  # looks asked for
        self._looked = 0  # of those, covered by a finished look
        self._wake = threading.Event()
        self._stop = threading.Event()

    def _running(self) -> bool:
        """Start this process's thread on first use, not at construction: ``serve --workers``
        forks its workers from a process that must have one thread (cli/workers.py), and a fork
        keeps no thread, so each process that answers requests starts its own.  False once closed."""
        if self._pid == os.getpid() or self._stopped:
            return not self._stopped
        with self._start_lock:
            if self._pid == os.getpid():
                return True
            if self._state_pid != os.getpid():  # a forked child (serve --workers)
                self._fresh_state()
            self._thread = threading.Thread(target=self._run, name="upstream-size-cap", daemon=True)
            self._ask()  # a first look when the process starts answering
            self._thread.start()
            self._pid = os.getpid()
            return True

    # -- the recorder seam (engine/recorders.py): learns of stored bytes ---------------------
    def fetching(self, url: str, key: str = "") -> None:
        """Bytes count once stored: ``answered``."""

    def fetch_ended(self, key: str, url: str) -> None:
        """Bytes count once stored: ``answered``."""

    def upstream_failed(self, key: str, url: str, error: str) -> None:
        """Nothing was stored."""

    def answered(self, answer: Answer) -> None:
        """Every request's answer (hits too: the first starts this process's thread)."""
        self._running()
        if answer.cache == "miss" and answer.status == 200 and answer.size > 0:
            self.stored(answer.size)

    def used(self, key: str, resource: Resource, entry: Entry) -> None:
        """A use is the entry file's mtime, which the cache bumps already."""

    # -- control ------------------------------------------------------------------------
    def stored(self, nbytes: int) -> None:
        """``nbytes`` more were stored: look when the estimate passes the cap or a step."""
        if not self._running():
            return
        with self._cond:
            self._added += nbytes
            over = self._size is not None and self._size + self._added > self.max_size
            if over or self._added >= self.step:
                self._ask_locked()

    def run_now(self, timeout: float = 60.0) -> TrimReport | None:
        """Ask for a look and wait until one that started after this call finished; the last
        look's report (not a new one if another process held the trim lock)."""
        if not self._running():
            return None
        self._ask()
        self.settle(timeout)
        return self.last

    def settle(self, timeout: float = 60.0) -> None:
        """Wait until every look asked for so far is done."""
        if not self._running():
            return
        with self._cond:
            if not self._cond.wait_for(lambda: self._looked >= self._asked or self._stop.is_set(), timeout):
                raise TimeoutError(f"the size cap's look did not finish within {timeout:g}s")

    def close(self) -> None:
        self._stopped = True
        if self._pid != os.getpid():
            return  # no thread in this process
        self._stop.set()
        self._wake.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=60)

    def _ask(self) -> None:
        with self._cond:
            self._ask_locked()

    def _ask_locked(self) -> None:
        self._asked += 1
        self._wake.set()

    # -- the thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._wake.wait(self.interval):
                self._ask()
            if self._stop.is_set():
                return
            with self._cond:
                asked = self._asked
                self._wake.clear()
            report = None
            try:
                report = self.look()
            except Exception:  # never let a bad file stop the cap for good
                log.exception("the size cap could not trim %s", self.cache.root)
            with self._cond:
                self._looked = max(self._looked, asked)
                self._cond.notify_all()
            if report is not None and report.size_after > self.max_size:
                # What is left is busy, pinned or just written: give it time.  What was just
                # written can go once past the grace period: look again then, stored or not.
                self._stop.wait(max(self.pause, self.grace if report.recent_bytes else 0))
                if report.recent_bytes and not self._stop.is_set():
                    self._ask()

    def look(self) -> TrimReport | None:
        """Measure the directory and trim it if it is over the cap; None if another process is
        trimming it now (or a lock file to keep cannot be read: nothing is removed then)."""
        try:
            self._file_lock.acquire(timeout=0)
        except filelock.Timeout:
            return None
        try:
            try:
                keep = self.pins()
            except (LockError, OSError) as exc:
                log.warning("size cap: not trimming %s: a lock file to keep: %s", self.cache.root, exc)
                return None
            with self._cond:
                added = self._added
            started = time.monotonic()
            report = trim(
                self.cache,
                max_size=self.low_water,
                start_above=self.max_size,
                grace=self.grace,
                now=self.now(),
                keep=keep,
                spare_used_since=self.spare(),
                pause=self.pause,
                sleep=self._stop.wait,  # closing the engine cuts the pause short...
                cancelled=self._stop.is_set,  # ...and leaves the blobs for the next pass
            )
            seconds = time.monotonic() - started
        finally:
            self._file_lock.release()
        with self._cond:
            self._size = report.size_after
            self._added = max(self._added - added, 0)
        self.last = report
        self.metrics.cache_size(report.size_after)
        if report.size_before > self.max_size:
            self.metrics.evicted(len(report.removed), report.bytes_freed)
            self._log(report, seconds)
        return report

    def _log(self, report: TrimReport, seconds: float) -> None:
        log.info(
            "size cap: removed %s and %s (%s freed) in %.2fs; the cache holds %s of %s",
            plural(len(report.removed), "entry"),
            plural(report.blobs_removed, "blob"),
            human_size(report.bytes_freed),
            seconds,
            human_size(report.size_after),
            human_size(self.max_size),
        )
        if report.size_after <= self.max_size:
            return
        why = [
            f"{human_size(n)} {what}"
            for n, what in (
                (report.pinned_bytes, "pinned by lock files"),
                (report.session_bytes, "used by this session (it writes a lock file)"),
                (report.busy_bytes, "being fetched"),
                (report.recent_bytes, f"written within the last {self.grace:g}s (looked at again then)"),
            )
            if n
        ]
        # Only what stays for good is worth a WARNING: a burst of downloads goes at the next look.
        stuck = report.size_after - report.recent_bytes > self.max_size
        log.log(
            logging.WARNING if stuck else logging.DEBUG,
            "size cap: still over it: %s",
            ", ".join(why) or "stored during the look",
        )


def lock_pins(
    settings: Callable[[], Settings], loaded: LockFile | None, recorded: Callable[[], LockFile]
) -> Callable[[], frozenset[str]]:
    """What the size cap never removes, asked at every look: the blobs the session's lock file
    names (``loaded``), those it will name when the session writes it (``recorded``, in record
    and refresh modes with a lock file), and those of ``serve --keep-lock`` files (read again
    each time: CI may rewrite them)."""

    def pins() -> frozenset[str]:
        now = settings()
        shas = {e.sha256 for path in now.keep_locks for e in LockFile.load(path)}
        if loaded is not None:
            shas.update(e.sha256 for e in loaded)
        if writes_lock(now):
            shas.update(e.sha256 for e in recorded())
        return frozenset(shas)

    return pins


def session_spare(settings: Callable[[], Settings], started: float) -> Callable[[], float | None]:
    """While the session will write a lock file: spare every entry used since it started (less
    the cache's ``USE_STAMP_INTERVAL``, the resolution of a use), whichever process used it.
    pytest-xdist workers each run a proxy and record apart, so one worker's ``recorded`` pins do
    not know another's; the entries' use times do."""

    def since() -> float | None:
        return started - USE_STAMP_INTERVAL if writes_lock(settings()) else None

    return since


def writes_lock(settings: Settings) -> bool:
    return settings.lock_file is not None and settings.mode in WRITING_MODES


def size_cap(
    settings: Callable[[], Settings],
    cache: Cache,
    metrics: Metrics,
    now: Callable[[], float],
    loaded: LockFile | None,
    recorded: Callable[[], LockFile],
) -> Trimmer | None:
    """The engine's trimmer (``settings``: the engine's current ones, its mode may change), or
    None without a cap.  A ``--keep-lock`` file that cannot be read is an error at start
    (LockError), not a silent pass without its pins later."""
    first = settings()
    if not first.max_size:
        return None
    for path in first.keep_locks:
        LockFile.load(path)
    pins = lock_pins(settings, loaded, recorded)
    return Trimmer(cache, first.max_size, metrics, now, pins, spare=session_spare(settings, time.time()))
