"""The object store as a shared tier behind a local ``Cache`` (issue 11; docs/object-storage.md).

Every hit is served from the local tier (a ``Cache`` directory: sendfile, the size cap); this
module moves entries between that directory and the shared store (any ``Backend``, in practice
``S3Backend``), and makes machines agree on who fetches what from the upstream:

- ``pull``: a local miss asks the shared index; its blob is streamed into the local tier and
  hashed on the way; only if it hashes to its name (and has the entry's size) is it stored and
  the entry written locally, with the shared entry's ``fetched_at`` (so the metadata TTL,
  revalidation and the negative cache mean the same on every machine).  A bit-flipped object is
  removed from the store (``delete_blob_if_corrupt``) and never served: the caller refetches.
  ``open_pull`` is the same pull handed to the caller as a ``Pull`` (the shared entry and its
  blob's open stream): the engine streams it to its clients as it lands (engine/flights.py),
  and ``Pull.commit`` stores it under the same checks.
- ``publish``: after a local store, the blob (content-addressed, created only if absent), then
  the index entry, written last and conditionally (create if absent, else replace only the
  version read, and never with an older ``fetched_at``): a reader never finds an entry whose
  blob was not complete first, and two machines never silently overwrite each other.
- ``claim`` / ``Claim.renew`` / ``Claim.release``: one upstream fetch per artifact across
  machines, on the backend's leases (conditional creates, expiry, take-over); ``acquire`` is
  the whole protocol for a miss: pull, else claim, else wait for the entry to land (polling,
  bounded), taking over when the holder's claim expires.  ``Claim.keep_alive`` renews a claim
  in the background while its download runs, however slowly the upstream sends.
- **Store down**: every call is bounded in time (the client's connect and read timeouts, a few
  tries), and a failure makes the tier degraded for a backoff (``tier_health.py``): calls then
  answer at once as if the store were empty (``pull`` None, ``publish`` False, ``claim`` a
  local-only claim), so the caller goes on with local-only behaviour.

Where a store lacks conditional writes, leases cannot exclude (two machines may both fetch, at
most one fetch per machine: the local entry locks still hold), and the last index write wins;
blobs stay content-addressed and every pulled blob is verified, so bytes are never wrong.

Callers hold the entry's local lock (``Cache.locked``) around ``pull`` and ``acquire``, as
they do around any fetch, so one process pulls an entry once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, NoReturn, TypeVar

from pytest_upstream.config.object_store import DEFAULT_CLAIM_TTL
from pytest_upstream.config.s3_location import S3Location
from pytest_upstream.store.backend import Backend
from pytest_upstream.store.blobs import stamp_of
from pytest_upstream.store.cache import BlobWriter, Cache
from pytest_upstream.store.entry import ARTIFACT, Entry, entry_bytes, entry_id, parse_entry
from pytest_upstream.store.errors import DigestMismatch, ObjectStoreError
from pytest_upstream.store.s3 import S3Backend
from pytest_upstream.store.s3_client import Timeouts
from pytest_upstream.store.tier_health import DEFAULT_BACKOFF, TierHealth

log = logging.getLogger("pytest_upstream")
_T = TypeVar("_T")

# A pull reads the store, and writes its part file, 128 KiB at a time.  Linux (ext4, 6.x) gives
# a write a page-cache folio as large as its size and alignment allow, and on a VM that hands
# free memory back to its host (free page reporting) large folios are the first to come from
# memory touched for the first time: 256 KiB (or 1 MiB) writes at aligned offsets then copied
# 100 MiB in 250 ms where 128 KiB writes took 20 ms.  That only delays it: after enough new
# page cache, every write pays (docs/benchmarks.md, "Shared cache on object storage").  Each
# read is also hashed and written while still in the CPU's cache.
CHUNK = 128 * 1024
# The tier's requests fail fast: a store that does not answer costs a build seconds, not minutes.
TIER_TIMEOUTS = Timeouts(connect=2.0, read=10.0, attempts=2)
POLL_FIRST, POLL_MAX = 0.1, 1.0  # a waiter's polls: first interval, doubling up to the max
RELEASE_WAIT = 30.0  # seconds a release waits for a renewal in flight (one request's tries)


@dataclass
class Claim:
    """The right to fetch one entry from the upstream, across machines, until it expires.

    ``token`` None: a local-only claim (the store was degraded or the wait timed out): the
    caller fetches, and other machines may too.  Renew it more often than ``ttl`` while a long
    download runs; release it after ``publish`` (or on failure, so a waiter takes over at once).
    """

    tier: RemoteTier
    name: str
    token: str | None
    ttl: float
    taken_over: bool = False
    released: bool = field(default=False, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _renewer: threading.Thread | None = field(default=None, repr=False)

    @property
    def shared(self) -> bool:
        return self.token is not None

    def renew(self) -> bool:
        """Extend the claim; False if it was lost (expired and taken over: another machine fetches)."""
        if self.token is None:
            return True
        token = self.token
        return self.tier._call(lambda: self.tier.backend.renew_lease(self.name, token, self.ttl), True)

    def keep_alive(self, setup: Callable[[], None] = lambda: None) -> None:
        """Renew the claim every third of its time to live, in a thread of its own (which first
        calls ``setup``), until it is released (or lost): a download that outlives ``ttl`` keeps
        it, whether its upstream sends fast, slowly or not at all for a while; a machine that dies
        stops renewing, and its claim expires ``ttl`` after the last renewal."""
        if self.token is None or self._renewer is not None:
            return
        self._renewer = threading.Thread(
            target=self._renewing, args=(setup,), name=f"pytest-upstream claim {self.name[:40]}", daemon=True
        )
        self._renewer.start()

    def _renewing(self, setup: Callable[[], None]) -> None:
        setup()
        while not self._stop.wait(self.ttl / 3):
            if not self.renew():
                if not self._stop.is_set():
                    log.info("the claim on %s was lost (taken over by another machine)", self.name)
                return

    def release(self) -> None:
        self._stop.set()
        renewer = self._renewer
        if renewer is not None and renewer is not threading.current_thread():
            # A renewal in flight would change the lease's ETag under the release's conditional
            # delete (the lease would stay until it expired): let it finish first (bounded by
            # the tier's request timeouts).
            renewer.join(RELEASE_WAIT)
        if self.token is None or self.released:
            return
        self.released = True
        token = self.token
        self.tier._call(lambda: self.tier.backend.release_lease(self.name, token), None)

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class PullRefused(DigestMismatch):
    """A blob pulled from the store is not what its entry says (does not hash to its name, or
    has another size): nothing is stored, and an object that does not hash to its name has been
    removed from the store."""


@dataclass
class Pull:
    """A shared entry whose blob is being read from the store into the local tier.

    Whoever reads ``chunks`` writes them to a part file (``Cache.writer``) and calls ``commit``:
    the blob is stored only if it hashes to the entry's sha256 and has its size, then the entry
    is written locally with the shared entry's ``fetched_at``.  ``chunks`` never yields more than
    the entry's size, so a reader that serves them as they come (engine/flights.py, holding back
    the last chunk until ``commit``) never sends a longer body either.
    """

    tier: RemoteTier
    entry: Entry
    source: BinaryIO
    _first: bytes | None = field(default=None, repr=False)  # read by ``prefetch``

    @property
    def what(self) -> str:
        return f"{self.tier.where} blob {self.entry.sha256} of {self.entry.path!r}"

    def chunks(self) -> Iterator[bytes]:
        """The blob's bytes as they arrive.  ``ObjectStoreError`` if a read fails (never a short
        body that looks whole); ``PullRefused`` if the object is longer than the entry says,
        raised before any byte past the entry's size is handed out."""
        left = self.entry.size
        with self.source:
            while left > 0:
                chunk, self._first = self._first or self.source.read(min(CHUNK, left)), None
                if not chunk:
                    break  # short: refused at ``commit``
                left -= len(chunk)
                yield chunk
            longer = left == 0 and bool(self.source.read(1))
        if longer:
            self._refuse("is longer than its entry says")

    def prefetch(self) -> None:
        """Read the first chunk now: a store that fails before the blob's first byte (an
        ``ObjectStoreError`` here, inside the tier's error handling) makes the pull a miss,
        fetched from the upstream, rather than a body cut before it began."""
        if self.entry.size > 0:
            self._first = self.source.read(min(CHUNK, self.entry.size))

    def commit(self, cache: Cache, writer: BlobWriter, verified: Callable[[], None] = lambda: None) -> Entry:
        """Verify what ``chunks`` gave ``writer``, store the blob and the entry locally; the
        entry.  ``PullRefused`` (nothing stored) if the bytes are not the entry's.

        ``verified`` is called once the bytes are known to be the entry's, before the blob is
        made durable (fsync) and renamed: a streamed pull's clients get their last chunk then,
        not after the local tier's commit (which, if it fails, leaves them their right bytes)."""
        if writer.digests()["sha256"] != self.entry.sha256:
            self._refuse("did not hash to its name")
        if writer.size != self.entry.size:  # intact bytes, a wrong claim: the entry is not served
            log.warning("the shared entry of %r has a wrong size (%d)", self.entry.path, self.entry.size)
            raise PullRefused(
                f"{self.what}: the entry says {self.entry.size} bytes, the blob has {writer.size}"
            )
        verified()
        cache.commit_blob(writer, {"sha256": self.entry.sha256}, self.what)  # the same digest, kept
        return self.tier._stored(cache, self.entry)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.source.close()

    def _refuse(self, why: str) -> NoReturn:
        # Hashed whole by the store's own check: only a copy that does not hash to its name goes
        # (an intact one read short, or an entry that claims another size, stays).
        if self.tier._call(lambda: self.tier.backend.delete_blob_if_corrupt(self.entry.sha256), False):
            self.tier.health.count("corrupt")
            log.warning("%s %s: removed from the store; refetching", self.what, why)
        else:
            log.warning("%s is intact but not of the entry's size: fetching it again", self.what)
        raise PullRefused(f"{self.what} {why}: not served")


class RemoteTier:
    """One object store shared by many machines, in front of which each machine has a local ``Cache``."""

    def __init__(
        self,
        backend: Backend,
        where: str,
        *,
        backoff: float = DEFAULT_BACKOFF,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        strict: bool = False,
    ) -> None:
        self.backend = backend
        self.strict = strict  # the admin commands: a failed request is an error, not a degradation
        self.where = where
        self.health = TierHealth(where, backoff, clock)
        self._clock = clock
        self._sleep = sleep

    def warm(self) -> None:
        """Make the backend's client now (an S3 client: import boto3, build it), so the first
        request does not wait for that; a backend without one has nothing to do."""
        getattr(self.backend, "client", None)

    def degraded(self) -> str:
        """Why the store is being left alone now ("" when it is used): for summaries and /-/metrics."""
        return self.health.degraded()

    def _call(self, fn: Callable[[], _T], fallback: _T) -> _T:
        """``fn()`` against the store; ``fallback`` when it is degraded or the request fails
        (``strict``: the ``ObjectStoreError`` itself)."""
        if not self.strict and not self.health.available():
            return fallback
        try:
            result = fn()
        except ObjectStoreError as exc:
            if self.strict:
                raise
            self.health.failed(exc)
            return fallback
        self.health.succeeded()
        return result

    # -- pull: shared index -> local tier ---------------------------------------------------------
    def pull(self, cache: Cache, key: str, path: str, variant: str = "") -> Entry | None:
        """The shared entry for a request, copied into ``cache`` (blob verified first), or None:
        not in the store, its blob missing or corrupt (removed from the store), or the store down.
        A newer local entry (a stale one being revalidated elsewhere) is never replaced: returned."""
        eid = entry_id(key, path, variant)
        found = self._call(lambda: self._pull(cache, key, eid, stream=False), None)
        assert not isinstance(found, Pull)
        return found

    def open_pull(self, cache: Cache, key: str, path: str, variant: str = "") -> Entry | Pull | None:
        """As ``pull``, except that an artifact whose blob is not in the local tier yet comes back
        as a ``Pull`` (the shared entry and its blob's open stream) for the caller to stream to
        its clients while it stores it (``Pull.chunks``, ``Pull.commit``).  Metadata and a
        remembered 404 (a few KiB, read whole to be parsed or replayed) are pulled whole."""
        eid = entry_id(key, path, variant)
        return self._call(lambda: self._pull(cache, key, eid, stream=True), None)

    def _pull(self, cache: Cache, key: str, eid: str, *, stream: bool) -> Entry | Pull | None:
        found = self.backend.get_index(key, eid)
        if found is None:
            self.health.count("pull_misses")
            return None
        try:
            entry = parse_entry(found.data, key, f"{eid}.json")
        except ValueError as exc:  # not one we wrote: never served; a publish replaces it
            log.warning("ignoring the shared entry %s/%s in %s: %s", key, eid, self.where, exc)
            self.health.count("pull_misses")
            return None
        local = cache.lookup(entry.key, entry.path, entry.variant)
        if local is not None and local.fetched_at > entry.fetched_at:
            return local  # the local answer is newer (a revalidation not yet published): kept
        if cache.verified_digest(entry.sha256, entry.size) is not None:
            return self._stored(cache, entry)  # the bytes are here already (content addressing)
        try:
            source = self.backend.open_blob(entry.sha256)
        except FileNotFoundError:
            log.warning("the shared entry of %r names a missing blob in %s", entry.path, self.where)
            self.health.count("pull_misses")
            return None
        pull = Pull(self, entry, source)
        if not (stream and entry.kind == ARTIFACT):
            return self._copy(cache, pull)
        try:
            pull.prefetch()
        except BaseException:
            pull.close()
            raise
        return pull

    def _copy(self, cache: Cache, pull: Pull) -> Entry | None:
        """The whole blob into the local tier, then the entry; None if it was refused."""
        writer = cache.writer(eid=pull.entry.id, reserve=pull.entry.size)  # a killed pull's part: an orphan
        try:
            for chunk in pull.chunks():
                writer.write(chunk)
            return pull.commit(cache, writer)
        except PullRefused:
            return None
        finally:
            writer.discard()
            pull.close()

    def _stored(self, cache: Cache, entry: Entry) -> Entry:
        cache.store_entry(entry)  # fetched_at as the machine that fetched it saw it
        self.health.count("pulled")
        return entry

    # -- publish: local tier -> shared store ------------------------------------------------------------
    def publish(self, cache: Cache, entry: Entry) -> bool:
        """Put ``entry`` (stored in ``cache``) and its blob in the store; True if the shared index
        now holds it, False if another machine's newer entry was kept, or the store is down."""
        return self._call(lambda: self._publish(cache, entry), False)

    def _publish(self, cache: Cache, entry: Entry) -> bool:
        blob = cache.verified_digest(entry.sha256, entry.size)
        if blob is None:  # trimmed or damaged locally meanwhile: nothing trustworthy to share
            log.info("not publishing %r: its local blob is gone or damaged", entry.path)
            return False
        if self.backend.blob_stat(entry.sha256) is None:
            _put_local_blob(self.backend, cache, entry.sha256, blob)
        data = entry_bytes(entry)
        for _ in range(3):
            current = self.backend.get_index(entry.key, entry.id)
            if current is None:
                written = self.backend.put_index(entry.key, entry.id, data, if_absent=True)
            elif current.data == data:
                written = current.version
            else:
                with contextlib.suppress(ValueError):
                    theirs = parse_entry(current.data, entry.key, f"{entry.id}.json")
                    if theirs.fetched_at > entry.fetched_at:
                        self.health.count("publish_conflicts")
                        return False  # a newer answer from another machine: keep it
                written = self.backend.put_index(entry.key, entry.id, data, if_version=current.version)
            if written is not None:
                self.health.count("published")
                return True
        self.health.count("publish_conflicts")  # replaced each time we read it: theirs kept
        return False

    # -- claims: one upstream fetch across machines ----------------------------------------------
    def claim(self, key: str, path: str, variant: str = "", ttl: float = DEFAULT_CLAIM_TTL) -> Claim | None:
        """The claim to fetch this entry (None while another machine holds it).  A degraded
        store gives a local-only claim: fetch, as without a store."""
        name = entry_id(key, path, variant)
        token = self._call(lambda: self.backend.acquire_lease(name, ttl) or "", None)
        if token == "":
            return None
        return Claim(self, name, token, ttl)

    def acquire(
        self,
        cache: Cache,
        key: str,
        path: str,
        variant: str = "",
        *,
        ttl: float = DEFAULT_CLAIM_TTL,
        wait: float = 300.0,
        stream: bool = False,
    ) -> Entry | Pull | Claim:
        """A local miss: the shared entry (pulled into ``cache``; with ``stream``, an artifact
        comes as a ``Pull`` to stream, see ``open_pull``), else a claim to fetch it.

        While another machine holds the claim, poll for its entry (first after ``POLL_FIRST``
        seconds, doubling up to ``POLL_MAX``), for at most ``wait`` seconds; a claim that
        expires (its holder died) or is released without an entry is taken over.  After
        ``wait``, a local-only claim: this machine fetches too (one extra fetch, never a hang).
        """
        look = self.open_pull if stream else self.pull
        deadline = self._clock() + wait
        interval = POLL_FIRST
        waited = False
        while True:
            if (found := look(cache, key, path, variant)) is not None:
                return found
            claim = self.claim(key, path, variant, ttl)
            if claim is not None:
                if claim.shared and (found := look(cache, key, path, variant)) is not None:
                    claim.release()  # landed between our look and our claim
                    return found
                if claim.shared:
                    self.health.count("claims_won")
                    if waited:
                        claim.taken_over = True
                        self.health.count("claims_taken_over")
                return claim
            if not waited:
                self.health.count("claims_waited")
                waited = True
            if self._clock() >= deadline:
                log.warning("waited %gs for another machine to fetch %r; fetching it here too", wait, path)
                return Claim(self, entry_id(key, path, variant), None, ttl)
            self._sleep(min(interval, max(0.0, deadline - self._clock())))
            interval = min(interval * 2, POLL_MAX)


def _put_local_blob(backend: Backend, cache: Cache, sha256: str, blob: Path) -> None:
    """Upload a local blob, which the local tier keeps.

    ``put_blob`` consumes its source, so it gets a second name for the blob in the cache's tmp
    directory (a hard link, or a copy where links are not allowed).  Linking and unlinking
    change the blob's ctime, part of the stamp its verification is remembered by: the blob is
    vouched for again under its new stamp, as of the same hash, so the next hit does not
    re-hash it (as ``Cache.freshen_blob`` does for a new mtime).
    """
    hashed_at = cache.verifier.known(sha256, stamp_of(os.stat(blob)))
    spare = cache.tmp / f".publish.{uuid.uuid4().hex}.tmp"
    try:
        os.link(blob, spare)
    except OSError:
        shutil.copyfile(blob, spare)
    try:
        backend.put_blob(spare, sha256)  # consumes the link only
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(spare)
        if hashed_at is not None:
            with contextlib.suppress(FileNotFoundError):
                cache.verifier.remember(sha256, stamp_of(os.stat(blob)), marker=True, hashed_at=hashed_at)


def open_tier(
    location: S3Location, *, backoff: float = DEFAULT_BACKOFF, timeouts: Timeouts = TIER_TIMEOUTS
) -> RemoteTier:
    """The shared tier of an ``s3://`` cache (boto3 is imported on its first request)."""
    return RemoteTier(S3Backend(location, timeouts=timeouts), location.url, backoff=backoff)
