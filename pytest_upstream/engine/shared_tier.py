"""The engine's side of an ``s3://`` cache: the object store behind the local tier (docs/object-storage.md).

``store/remote_tier.py`` knows how to move entries between a local directory and the bucket and
how machines agree on who fetches; this module says *when* the engine does it:

- a **local miss** (also in replay mode) first asks the bucket: what another machine fetched is
  served from here, verified, without asking the upstream.  An artifact GET is a flight whose
  source is the bucket (``acquire`` gives a ``Pull``; engine/flights.py): its clients read the
  part file as it grows, the last bytes held back until ``commit`` verified it; everything else
  (metadata, a HEAD, replay mode) is pulled whole first (``pull``);
- **stale metadata** is looked up in the bucket before the upstream: another machine may have
  refreshed it, and its fetch time counts here too (``fresher``);
- an **artifact download** starts only once this machine holds the entry's claim (``acquire``,
  in the download's thread, under the entry's local lock), renewed in the background while the
  download runs (``Claim.keep_alive``); while another machine downloads it, this one waits for
  the object and then streams it from the bucket the same way;
- what this machine stored from the upstream is **published** (blob, then entry) once its clients
  have it, and only then is the claim released, so a waiting machine finds the object.

A store that is down degrades to local-only behaviour (store/tier_health.py): nothing here raises
because of the bucket.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator

from pytest_upstream.config.object_store import DEFAULT_CLAIM_TTL
from pytest_upstream.config.settings import Settings
from pytest_upstream.formats.base import Resource
from pytest_upstream.repro.netguard import exempt_current_thread
from pytest_upstream.store.cache import BlobWriter, Cache, Entry, LockTimeout
from pytest_upstream.store.entry import NOT_FOUND
from pytest_upstream.store.errors import ObjectStoreError
from pytest_upstream.store.remote_tier import Claim, Pull, RemoteTier, open_tier

log = logging.getLogger("pytest_upstream")


class SharedTier:
    """One engine's use of a ``RemoteTier``; thread-safe as the tier and the cache are."""

    def __init__(
        self,
        tier: RemoteTier,
        cache: Cache,
        *,
        claim_wait: float = 300.0,
        claim_ttl: float = DEFAULT_CLAIM_TTL,
    ) -> None:
        self.tier = tier
        self.cache = cache
        self.claim_wait = claim_wait
        self.claim_ttl = claim_ttl  # s3_claim_ttl: how soon another machine takes over from a dead one
        # Told the bytes of each blob pulled into the local tier: the size cap (engine/trimmer.py)
        # counts them as it counts stored misses, so a capped local tier stays near its cap.
        self.on_pulled: Callable[[int], None] | None = None

    def pull(self, key: str, path: str, variant: str) -> Entry | None:
        """A local miss: the bucket's entry, pulled into the local tier under the entry's lock.

        Only if the lock is free at once: a holder in this process is fetching or pulling the
        entry (perhaps waiting for another machine's download), and the caller then joins that
        download instead of queueing behind it (None)."""
        try:
            with self.cache.locked(key, path, variant, 0):
                if (entry := self.cache.lookup(key, path, variant)) is not None:
                    return entry  # another thread pulled or fetched it meanwhile
                return self._pulled(self.tier.pull(self.cache, key, path, variant))
        except LockTimeout:
            return None

    def _pulled(self, entry: Entry | None) -> Entry | None:
        if entry is not None and self.on_pulled is not None:
            self.on_pulled(entry.size)
        return entry

    def fresher(self, key: str, path: str, variant: str, local: Entry | None) -> Entry | None:
        """The bucket's copy if it was fetched after ``local`` (called under the entry's lock)."""
        pulled = self._pulled(self.tier.pull(self.cache, key, path, variant))
        if pulled is not None and (local is None or pulled.fetched_at > local.fetched_at):
            return pulled
        return None

    def acquire(self, key: str, path: str, variant: str) -> Entry | Pull | Claim:
        """Before an upstream download (under the entry's lock): the entry another machine put in
        the bucket (a ``Pull`` to stream when its blob is not here yet), else the claim to fetch
        it here, kept alive until released (see ``RemoteTier.acquire``)."""
        outcome = self.tier.acquire(
            self.cache, key, path, variant, ttl=self.claim_ttl, wait=self.claim_wait, stream=True
        )
        if isinstance(outcome, Entry):
            self._pulled(outcome)
        elif isinstance(outcome, Claim):
            outcome.keep_alive(exempt_current_thread)  # the proxy's threads reach the store
        return outcome

    def chunks(self, pull: Pull) -> Iterator[bytes]:
        """``pull``'s bytes as they arrive; a failed read degrades the tier (then raises)."""
        try:
            yield from pull.chunks()
        except ObjectStoreError as exc:
            self.tier.health.failed(exc)
            raise

    def commit(self, pull: Pull, writer: BlobWriter, verified: Callable[[], None]) -> Entry:
        """Store what was streamed (``Pull.commit``: verified, or ``PullRefused``)."""
        entry = pull.commit(self.cache, writer, verified)
        self._pulled(entry)
        return entry

    def publish_not_found(self, key: str, res: Resource, claim: Claim | None = None) -> None:
        """Share the 404 just remembered for ``res`` (the negative cache), if it was."""
        remembered = self.cache.lookup(key, res.path, res.variant)
        if remembered is not None and remembered.kind == NOT_FOUND:
            self.publish(remembered, claim)
        elif claim is not None:
            claim.release()

    def publish(self, entry: Entry, claim: Claim | None = None) -> None:
        """Share what this machine stored, then let waiting machines go."""
        try:
            self.tier.publish(self.cache, entry)
        except Exception:  # the tier degrades on store errors; anything else is a bug worth a line
            log.exception("publishing %s/%s to %s failed", entry.key, entry.path, self.tier.where)
        finally:
            if claim is not None:
                claim.release()


def shared_tier(settings: Settings, cache: Cache) -> SharedTier | None:
    """The engine's shared tier when the cache is an ``s3://`` bucket, else None.

    The bucket's client is made in a background thread at once: importing boto3 and making the
    client takes a few hundred milliseconds, which the first miss would otherwise wait for (the
    proxy itself starts without waiting)."""
    if settings.object_store is None:
        return None
    tier = open_tier(settings.object_store)
    threading.Thread(target=_warm, args=(tier,), name="pytest-upstream-s3-warm", daemon=True).start()
    return SharedTier(tier, cache, claim_ttl=settings.store_options.claim_ttl)


def _warm(tier: RemoteTier) -> None:
    try:
        tier.warm()
    except Exception as exc:  # the first real call reports a store that cannot be reached
        log.debug("making the client of %s failed: %s", tier.where, exc)
