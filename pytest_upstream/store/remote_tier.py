"""The object store as a shared tier behind a local ``Cache`` (issue 11; docs/object-storage.md).

Every hit is served from the local tier (a ``Cache`` directory: sendfile, the size cap); this
module moves entries between that directory and the shared store (any ``Backend``, in practice
``S3Backend``), and makes machines agree on who fetches what from the upstream:

- ``pull``: a local miss asks the shared index; its blob is streamed into the local tier and
  hashed on the way; only if it hashes to its name (and has the entry's size) is it stored and
  the entry written locally, with the shared entry's ``fetched_at`` (so the metadata TTL,
  revalidation and the negative cache mean the same on every machine).  A bit-flipped object is
  removed from the store (``delete_blob_if_corrupt``) and never served: the caller refetches.
- ``publish``: after a local store, the blob (content-addressed, created only if absent), then
  the index entry, written last and conditionally (create if absent, else replace only the
  version read, and never with an older ``fetched_at``): a reader never finds an entry whose
  blob was not complete first, and two machines never silently overwrite each other.
- ``claim`` / ``Claim.renew`` / ``Claim.release``: one upstream fetch per artifact across
  machines, on the backend's leases (conditional creates, expiry, take-over); ``acquire`` is
  the whole protocol for a miss: pull, else claim, else wait for the entry to land (polling,
  bounded), taking over when the holder's claim expires.
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
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from pytest_upstream.config.s3_location import S3Location
from pytest_upstream.store.backend import Backend
from pytest_upstream.store.blobs import stamp_of
from pytest_upstream.store.cache import Cache
from pytest_upstream.store.entry import Entry, entry_bytes, entry_id, parse_entry
from pytest_upstream.store.errors import DigestMismatch, ObjectStoreError
from pytest_upstream.store.s3 import S3Backend
from pytest_upstream.store.s3_client import Timeouts
from pytest_upstream.store.tier_health import DEFAULT_BACKOFF, TierHealth

log = logging.getLogger("pytest_upstream")
_T = TypeVar("_T")

CHUNK = 1024 * 1024
# The tier's requests fail fast: a store that does not answer costs a build seconds, not minutes.
TIER_TIMEOUTS = Timeouts(connect=2.0, read=10.0, attempts=2)
DEFAULT_CLAIM_TTL = 60.0  # seconds a claim lives unless renewed (a fetch renews it as it goes)
POLL_FIRST, POLL_MAX = 0.1, 1.0  # a waiter's polls: first interval, doubling up to the max


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

    @property
    def shared(self) -> bool:
        return self.token is not None

    def renew(self) -> bool:
        """Extend the claim; False if it was lost (expired and taken over: another machine fetches)."""
        if self.token is None:
            return True
        token = self.token
        return self.tier._call(lambda: self.tier.backend.renew_lease(self.name, token, self.ttl), True)

    def release(self) -> None:
        if self.token is None or self.released:
            return
        self.released = True
        token = self.token
        self.tier._call(lambda: self.tier.backend.release_lease(self.name, token), None)

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


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
        return self._call(lambda: self._pull(cache, key, eid), None)

    def _pull(self, cache: Cache, key: str, eid: str) -> Entry | None:
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
        if cache.verified_digest(entry.sha256, entry.size) is None and not self._pull_blob(cache, entry):
            return None
        cache.store_entry(entry)  # fetched_at as the machine that fetched it saw it
        self.health.count("pulled")
        return entry

    def _pull_blob(self, cache: Cache, entry: Entry) -> bool:
        """Stream the entry's blob into the local tier; False if it is missing, corrupt (then
        removed from the store) or not of the entry's size."""
        what = f"{self.where} blob {entry.sha256} of {entry.path!r}"
        writer = cache.writer(eid=entry.id, reserve=entry.size)  # a killed pull's part: an orphan
        try:
            try:
                source = self.backend.open_blob(entry.sha256)
            except FileNotFoundError:
                log.warning("the shared entry of %r names a missing blob in %s", entry.path, self.where)
                self.health.count("pull_misses")
                return False
            with source:
                while chunk := source.read(CHUNK):
                    writer.write(chunk)
                    if writer.size > entry.size:
                        break  # more than the entry says: do not read an endless body to its end
            try:
                cache.commit_blob(writer, {"sha256": entry.sha256}, what)
            except DigestMismatch:
                # Hashed whole by the store's own check: only a copy that does not hash to its
                # name goes (an intact one read short, or longer than the entry says, stays).
                if self.backend.delete_blob_if_corrupt(entry.sha256):
                    self.health.count("corrupt")
                    log.warning("%s did not hash to its name: removed from the store; refetching", what)
                else:
                    log.warning("%s is intact but not of the entry's size: fetching it again", what)
                return False
        finally:
            writer.discard()
        if writer.size != entry.size:  # intact bytes, a wrong claim: the entry is not served
            log.warning("the shared entry of %r has a wrong size (%d)", entry.path, entry.size)
            return False
        return True

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
    ) -> Entry | Claim:
        """A local miss: the shared entry (pulled into ``cache``), else a claim to fetch it.

        While another machine holds the claim, poll for its entry (first after ``POLL_FIRST``
        seconds, doubling up to ``POLL_MAX``), for at most ``wait`` seconds; a claim that
        expires (its holder died) or is released without an entry is taken over.  After
        ``wait``, a local-only claim: this machine fetches too (one extra fetch, never a hang).
        """
        deadline = self._clock() + wait
        interval = POLL_FIRST
        waited = False
        while True:
            if (entry := self.pull(cache, key, path, variant)) is not None:
                return entry
            claim = self.claim(key, path, variant, ttl)
            if claim is not None:
                if claim.shared and (entry := self.pull(cache, key, path, variant)) is not None:
                    claim.release()  # landed between our look and our claim
                    return entry
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
