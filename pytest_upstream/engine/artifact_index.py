"""What the cache holds, per proxy key, in memory: the rows of the ``/-/ui/`` artifact list.

A page of a 100,000-entry key must render in well under a second, so a request never reads the
entry files: the index reads each one once (a background scan when ``serve`` starts, per
process: a ``serve --workers`` child scans for itself after the fork; under the pytest
fixture, from the first ``/-/ui/`` request) and keeps a small row per
entry (names, size, times; bounded: no headers, no URLs).  It stays right by two means:

- **this process** tells it as it goes: it is one of the engine's recorders, so an entry stored
  or refreshed by a fetch arrives through ``used`` (the entry the answer came from), and every
  answer counts a hit and its time (``answered``), kept only for entries the index holds;
- **another process** (an xdist worker, another ``serve``, ``cache prune``, the size cap) writes
  entry files by atomic rename into ``entries/<key>/<2 hex>/``, which moves that directory's
  mtime.  Before answering, ``rows`` stats the key's (at most 256) subdirectories and re-reads
  only the ones that moved: it lists their names and inodes (``scandir``, no stat per file) and
  parses only the files whose inode is new.  A directory whose mtime is within ``SETTLE``
  seconds of the look is looked at again next time, since two renames within one tick of the
  file system's clock leave the same mtime ("racy" timestamps, as git handles its index).

Hits count the answers this process gave from the cache since it started (hit or stale; the
miss that stored an entry is no hit); "last served" is the later of this process's last answer
(a miss included) and the entry file's use stamp (``Cache.lookup`` bumps its mtime at most
once a minute, in any process).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pytest_upstream.config.settings import Settings
from pytest_upstream.engine.recorders import Answer
from pytest_upstream.formats import get_format
from pytest_upstream.formats.base import Kind, Resource
from pytest_upstream.store.cache import Cache, Entry
from pytest_upstream.store.entry import MAX_ENTRY_BYTES, entry_id, parse_entry
from pytest_upstream.store.layout import HEX2, dir_names

log = logging.getLogger("pytest_upstream")

SETTLE = 2.0  # seconds: a directory changed this recently is looked at again on the next request
_STEM = ".json"
_SORTED = 4  # sorted lists remembered (each holds a reference per row)
_EARLY = 1024  # answers remembered until their entry's row arrives (``answered`` before ``used``)


def describe(settings: Settings, entry: Entry) -> dict[str, str]:
    """What a cached object is, as the format of its key's proxy names it (``Format.describe``:
    a name, and a version, tag or digest when the path tells); ``{}`` when the format does not
    tell (the path then says it all).  The engine names no format: each describes its own."""
    proxy = settings.proxy(entry.key)
    fmt = get_format(proxy.format) if proxy is not None else None
    if fmt is None:
        return {}
    kind = Kind.ARTIFACT if entry.kind == Kind.ARTIFACT.value else Kind.METADATA
    return fmt.describe(Resource(path=entry.path, upstream_url=entry.upstream_url, kind=kind))


@dataclass(slots=True)
class Row:
    """One entry as the list shows it (a few hundred bytes: no headers, no URL)."""

    eid: str
    path: str
    variant: str
    kind: str
    size: int
    fetched_at: float
    name: str  # the format's name for it (Format.describe), else ""
    version: str  # version, tag or digest when the format tells, else ""
    stamp: float  # the entry file's mtime when read: its last use by any process
    ino: int  # the file's inode when read (0: told by this process, not read)
    hits: int = 0  # answers from the cache by this process (hit or stale)
    served_at: float = 0.0  # this process's last answer from it
    search: str = field(init=False)  # name, version and path in lower case: what the filter looks in

    def __post_init__(self) -> None:
        # The path itself when it is lower case and holds the name and version (pypi, npm, a
        # generic file): no second copy of it per row.
        low = self.path.lower()
        path = self.path if low == self.path else low
        if self.name.lower() in path and self.version.lower() in path:
            self.search = path
        else:
            self.search = f"{self.name}\n{self.version}\n{self.path}".lower()

    @property
    def last_served(self) -> float:
        """The later of this process's last answer and the file's use stamp (0: never)."""
        used = self.stamp if self.stamp > self.fetched_at + 1 else 0.0
        return max(self.served_at, used)


class _Key:
    """The rows of one key, by entry id, with the state of its subdirectories."""

    def __init__(self) -> None:
        self.rows: dict[str, Row] = {}
        self.dirs: dict[str, int] = {}  # subdirectory -> the mtime_ns it had when read (-1: look again)
        self.generation = 0  # moves whenever rows change (the views' sort memo)


class ArtifactIndex:
    """Rows per key, kept current (see the module docstring); thread-safe."""

    def __init__(
        self, cache: Cache, settings: Callable[[], Settings], now: Callable[[], float] = time.time
    ) -> None:
        self.cache = cache
        self.settings = settings  # the engine's current settings (which proxy has which format)
        self.now = now
        self._keys: dict[str, _Key] = {}
        self._lock = threading.Lock()  # guards _keys and every _Key
        self._refresh = threading.Lock()  # one re-read of the directories at a time
        self._scanned = threading.Event()
        self._pid = 0
        self._sorted: dict[tuple[str, str, bool], tuple[int, list[Row]]] = {}  # ordered()'s memo
        self._early: dict[str, float] = {}  # entry id -> when answered, before ``used`` brought its row

    # -- the scan ---------------------------------------------------------------------------
    def start(self) -> None:
        """Scan the whole cache in a background thread (once per process)."""
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._scanned = threading.Event()
        threading.Thread(target=self._scan_all, name="upstream-artifact-index", daemon=True).start()

    def _scan_all(self) -> None:
        try:
            for key in sorted(dir_names(self.cache.entries)):
                self.refresh(key)
        except Exception:  # the index is a view: a failure here must not take anything down
            log.exception("reading the cache for the artifact index failed")
        finally:
            self._scanned.set()

    def wait_scanned(self, timeout: float) -> bool:
        """Whether no start-up scan is running (waiting up to ``timeout`` seconds for it to end)."""
        return self._pid != os.getpid() or self._scanned.wait(timeout)

    # -- reading ----------------------------------------------------------------------------
    def rows(self, key: str, refresh: bool = True) -> tuple[list[Row], int]:
        """The current rows of ``key`` (re-reading what other processes changed, unless
        ``refresh`` is False: while the start-up scan runs, it does that) and their generation."""
        if refresh:
            self.refresh(key)
        with self._lock:
            known = self._keys.get(key)
            return (list(known.rows.values()), known.generation) if known else ([], 0)

    def ordered(self, key: str, order: str, sort_key: Callable[[Row], Any], reverse: bool) -> list[Row]:
        """``key``'s rows sorted, remembered until they change (``order`` names the sort; a sort
        on this process's counts changes with every answer: pass ``order=""`` not to remember)."""
        rows, generation = self.rows(key, refresh=self.wait_scanned(0))
        memo_key = (key, order, reverse)
        with self._lock:
            found = self._sorted.get(memo_key)
        if order and found is not None and found[0] == generation:
            return found[1]
        rows.sort(key=sort_key, reverse=reverse)
        if order:
            with self._lock:
                if len(self._sorted) >= _SORTED:
                    self._sorted.clear()
                self._sorted[memo_key] = (generation, rows)
        return rows

    def row(self, key: str, eid: str) -> Row | None:
        with self._lock:
            known = self._keys.get(key)
            return known.rows.get(eid) if known else None

    def known_keys(self) -> list[str]:
        with self._lock:
            return sorted(self._keys)

    def count(self, key: str) -> int:
        """How many rows ``key`` has (re-reading what moved, unless the start-up scan runs)."""
        if self.wait_scanned(0):
            self.refresh(key)
        with self._lock:
            known = self._keys.get(key)
            return len(known.rows) if known else 0

    def refresh(self, key: str) -> None:
        """Re-read the subdirectories of ``entries/<key>/`` whose mtime moved."""
        base = f"{self.cache.entries}/{key}"
        with self._refresh:
            try:
                with os.scandir(base) as it:
                    subdirs = {
                        d.name: d.stat().st_mtime_ns for d in it if HEX2.fullmatch(d.name) and d.is_dir()
                    }
            except (FileNotFoundError, NotADirectoryError):
                subdirs = {}
            with self._lock:
                state = self._keys.setdefault(key, _Key())
                gone = [d for d in state.dirs if d not in subdirs]
                moved = [d for d, mtime in subdirs.items() if state.dirs.get(d) != mtime]
            for sub in gone:
                self._forget_dir(key, sub)
            settle = (time.time() - SETTLE) * 1e9
            for sub in moved:
                self._read_dir(key, sub, f"{base}/{sub}")
                with self._lock:
                    state.dirs[sub] = subdirs[sub] if subdirs[sub] < settle else -1

    def _forget_dir(self, key: str, sub: str) -> None:
        with self._lock:
            state = self._keys[key]
            state.dirs.pop(sub, None)
            dropped = [eid for eid in state.rows if eid[:2] == sub]
            for eid in dropped:
                del state.rows[eid]
            state.generation += bool(dropped)

    def _read_dir(self, key: str, sub: str, directory: str) -> None:
        """List one subdirectory; parse the files whose inode is new, drop the rows whose file went."""
        found: dict[str, int] = {}
        try:
            with os.scandir(directory) as it:
                for d in it:
                    if d.name.endswith(_STEM) and len(d.name) == 64 + len(_STEM):
                        found[d.name[:64]] = d.inode()
        except (FileNotFoundError, NotADirectoryError):
            pass
        with self._lock:
            state = self._keys[key]
            stale = [eid for eid in state.rows if eid[:2] == sub and eid not in found]
            fresh = [eid for eid, ino in found.items() if (r := state.rows.get(eid)) is None or r.ino != ino]
        rows = [row for eid in fresh if (row := self._read(key, directory, eid)) is not None]
        with self._lock:
            for eid in stale:
                state.rows.pop(eid, None)
            for row in rows:
                old = state.rows.get(row.eid)
                if old is not None:  # same entry, a new file: keep this process's counts
                    row.hits, row.served_at = old.hits, old.served_at
                row.served_at = max(row.served_at, self._early.pop(row.eid, 0.0))
                state.rows[row.eid] = row
            state.generation += bool(stale or rows)

    def _read(self, key: str, directory: str, eid: str) -> Row | None:
        name = f"{eid}{_STEM}"
        try:
            with open(f"{directory}/{name}", "rb") as f:
                st = os.fstat(f.fileno())
                entry = parse_entry(f.read(MAX_ENTRY_BYTES + 1), key, name)
        except (OSError, ValueError):
            return None  # gone meanwhile, or a file the proxy would not serve either
        return self._row(entry, st.st_mtime_ns / 1e9, st.st_ino)

    def _row(self, entry: Entry, stamp: float, ino: int) -> Row:
        try:
            names = describe(self.settings(), entry)
        except Exception:  # a format's describe on an odd path: the path is name enough
            names = {}
        version = names.get("version") or names.get("reference") or names.get("digest") or ""
        return Row(
            eid=entry.id,
            path=entry.path,
            variant=sys.intern(entry.variant),  # a few distinct values: one string each
            kind=sys.intern(entry.kind),
            size=entry.size,
            fetched_at=entry.fetched_at,
            name=names.get("name", ""),
            version=version,
            stamp=stamp,
            ino=ino,
        )

    # -- the recorder seam (engine/recorders.py) --------------------------------------------
    def fetching(self, url: str, key: str = "") -> None:
        """Rows change when entries do: ``used``."""

    def fetch_ended(self, key: str, url: str) -> None:
        """Rows change when entries do: ``used``."""

    def upstream_failed(self, key: str, url: str, error: str) -> None:
        """Rows change when entries do: ``used``."""

    def answered(self, answer: Answer) -> None:
        """Note an answer on the entry it came from: its time, and a hit when it was one (a miss
        is answered before its entry reaches ``used``: its time waits in ``_early`` until then)."""
        res = answer.resource
        if res is None or answer.status != 200:
            return
        eid = entry_id(answer.request.key, res.path, res.variant)
        now = self.now()
        with self._lock:
            known = self._keys.get(answer.request.key)
            row = known.rows.get(eid) if known else None
            if row is None:
                if len(self._early) >= _EARLY:
                    self._early.clear()  # answers whose entry never came (not stored): bounded
                self._early[eid] = now
                return
            row.served_at = now
            row.hits += answer.cache in ("hit", "stale")

    def used(self, key: str, resource: Resource, entry: Entry) -> None:
        """An entry an answer came from: a new or refreshed one replaces its row at once."""
        with self._lock:
            known = self._keys.setdefault(key, _Key())  # a new key: its directories are read on the next look
            old = known.rows.get(entry.id)
            same = old is not None and (old.fetched_at, old.size) == (entry.fetched_at, entry.size)
            if same:
                return  # the common case, every hit: nothing new
        row = self._row(entry, 0.0, 0)
        with self._lock:
            if old is not None:
                row.hits, row.served_at, row.stamp = old.hits, old.served_at, old.stamp
            row.served_at = max(row.served_at, self._early.pop(row.eid, 0.0))
            known.rows[row.eid] = row
            known.generation += 1
