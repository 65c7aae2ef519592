"""The object store as a shared tier behind a local cache (store/remote_tier.py), against real
S3 servers started on loopback (SeaweedFS's ``weed mini`` and moto's server, tests/s3_peers.py)
and against a directory standing in for the store (the protocol without a server).

Two ``Cache`` directories with one ``RemoteTier`` each stand for two machines: they share
nothing but the bucket.  Each test uses a prefix of its own, so the servers start once.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from pytest_upstream.config.s3_location import S3Location
from pytest_upstream.engine.clock import ManualClock
from pytest_upstream.store.backend import Backend
from pytest_upstream.store.blobs import stamp_of
from pytest_upstream.store.cache import Cache
from pytest_upstream.store.entry import ARTIFACT, METADATA, Entry, entry_bytes
from pytest_upstream.store.errors import ObjectStoreError
from pytest_upstream.store.layout import Layout
from pytest_upstream.store.local import LocalBackend
from pytest_upstream.store.remote_tier import Claim, Pull, PullRefused, RemoteTier, open_tier
from pytest_upstream.store.s3 import S3Backend
from pytest_upstream.store.s3_client import Timeouts

from .s3_peers import S3Peer, require_s3_peer, started
from .test_backend_contract import isolate_aws, s3_peer  # noqa: F401 (a fixture)

KINDS = ("local", "seaweedfs", "moto")
S3_KINDS = ("seaweedfs", "moto")
FAST = Timeouts(connect=1, read=2, attempts=1)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Bucket:
    """One shared store, and how to reach it from a new machine."""

    kind: str
    make: Callable[..., Backend]  # make(now=...): a backend on the store, as a new machine has
    corrupt: Callable[[str, bytes], None]  # overwrite a blob object behind the tier's back
    where: str


@pytest.fixture(params=KINDS)
def bucket(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    s3_peer: Callable[[str], S3Peer],  # noqa: F811
) -> Bucket:
    kind: str = request.param
    if kind == "local":
        layout = Layout(tmp_path / "store")
        layout.tmp.mkdir(parents=True)

        def replace_file(digest: str, data: bytes) -> None:
            # A new file: the store's blob may be a hard link of a machine's local copy.
            aside = tmp_path / "corrupt.tmp"
            aside.write_bytes(data)
            os.replace(aside, layout.blob(digest))

        return Bucket(kind, lambda **options: LocalBackend(layout, **options), replace_file, str(layout.root))
    peer = s3_peer(kind)
    isolate_aws(monkeypatch)
    location = S3Location(peer.bucket, f"t-{uuid.uuid4().hex[:12]}/shared", peer.endpoint, "us-east-1")
    raw = S3Backend(location)

    def corrupt(digest: str, data: bytes) -> None:
        raw.client.put_object(Bucket=peer.bucket, Key=raw.blob_key(digest), Body=data)

    return Bucket(kind, lambda **options: S3Backend(location, **options), corrupt, location.url)


@dataclass
class Machine:
    cache: Cache
    tier: RemoteTier


def machine(bucket: Bucket, root: Path, **options: Any) -> Machine:
    return Machine(Cache(root), RemoteTier(bucket.make(**options), bucket.where))


def store_local(cache: Cache, data: bytes, path: str = "pkg/a-1.0.tar.gz", **fields: Any) -> Entry:
    """What a fetch leaves in the local tier: the blob, then its entry."""
    digest = cache.store_bytes(data)
    entry = Entry(
        key=fields.pop("key", "pypi"),
        path=path,
        variant="",
        upstream_url=f"https://upstream.invalid/{path}",
        sha256=digest,
        size=len(data),
        kind=fields.pop("kind", ARTIFACT),
        fetched_at=fields.pop("fetched_at", time.time() - 1234.5),
        content_type="application/octet-stream",
        **fields,
    )
    return cache.store_entry(entry)


# -- publish on one machine, pull on another --------------------------------------------------------
def test_published_on_one_machine_pulled_on_another_with_its_fetch_time(
    bucket: Bucket, tmp_path: Path
) -> None:
    a, b = machine(bucket, tmp_path / "a"), machine(bucket, tmp_path / "b")
    data = os.urandom(300_000)
    entry = store_local(a.cache, data, kind=METADATA, fetched_at=1_700_000_000.25, etag='"v1"')
    assert b.tier.pull(b.cache, "pypi", entry.path) is None  # not published yet
    assert a.tier.publish(a.cache, entry)
    assert a.tier.publish(a.cache, entry)  # again: the same bytes, nothing to change

    pulled = b.tier.pull(b.cache, "pypi", entry.path)
    assert pulled == entry  # every field, fetched_at included: freshness means the same everywhere
    local = b.cache.lookup("pypi", entry.path)
    assert local == entry
    assert b.cache.blob_path(entry.sha256).read_bytes() == data
    assert b.cache.verified_blob(local) is not None
    assert b.tier.health.snapshot()["pulled"] == 1 and b.tier.health.snapshot()["pull_misses"] == 1
    assert a.tier.health.snapshot()["published"] == 2


def test_a_remembered_404_and_an_empty_blob_travel_too(bucket: Bucket, tmp_path: Path) -> None:
    a, b = machine(bucket, tmp_path / "a"), machine(bucket, tmp_path / "b")
    entry = store_local(a.cache, b"", path="maven/missing.pom", kind="notfound", key="maven")
    assert a.tier.publish(a.cache, entry)
    assert b.tier.pull(b.cache, "maven", entry.path) == entry


def test_a_pull_never_replaces_a_newer_local_entry(bucket: Bucket, tmp_path: Path) -> None:
    a, b = machine(bucket, tmp_path / "a"), machine(bucket, tmp_path / "b")
    shared = store_local(a.cache, b"index v1", path="simple/p/", kind=METADATA, fetched_at=1000.0)
    assert a.tier.publish(a.cache, shared)
    newer = store_local(b.cache, b"index v2", path="simple/p/", kind=METADATA, fetched_at=2000.0)
    assert b.tier.pull(b.cache, "pypi", "simple/p/") == newer
    assert b.cache.lookup("pypi", "simple/p/") == newer


def test_the_blob_is_in_the_store_before_the_entry_names_it(tmp_path: Path) -> None:
    """The order of writes, seen by the store: the entry is written last."""
    layout = Layout(tmp_path / "store")
    layout.tmp.mkdir(parents=True)
    writes: list[str] = []

    class Recording(LocalBackend):
        def put_blob(self, source: Path, sha256: str) -> bool:
            writes.append("blob")
            return super().put_blob(source, sha256)

        def put_index(self, key: str, name: str, data: bytes, **conditions: Any) -> str | None:
            writes.append("index")
            assert self.blob_stat(sha(b"payload")) is not None  # the blob is complete already
            return super().put_index(key, name, data, **conditions)

    cache = Cache(tmp_path / "a")
    tier = RemoteTier(Recording(layout), "store")
    entry = store_local(cache, b"payload")
    assert tier.publish(cache, entry)
    assert writes == ["blob", "index"]
    assert cache.blob_path(entry.sha256).read_bytes() == b"payload"  # the local tier keeps its copy
    # ...still vouched for: linking it for the upload changed its ctime, not its bytes.
    assert cache.verifier.known(entry.sha256, stamp_of(os.stat(cache.blob_path(entry.sha256)))) is not None
    assert not list(cache.tmp.iterdir())


def test_a_newer_entry_from_another_machine_is_never_overwritten(bucket: Bucket, tmp_path: Path) -> None:
    a, b, c = (machine(bucket, tmp_path / name) for name in "abc")
    old = store_local(a.cache, b"index v1", path="simple/pkg/", kind=METADATA, fetched_at=1000.0)
    new = store_local(b.cache, b"index v2", path="simple/pkg/", kind=METADATA, fetched_at=2000.0)
    assert b.tier.publish(b.cache, new)
    assert not a.tier.publish(a.cache, old)  # older than what is shared: theirs kept
    assert a.tier.health.snapshot()["publish_conflicts"] == 1
    assert c.tier.pull(c.cache, "pypi", "simple/pkg/") == new
    # A revalidation on A (a newer fetch time) replaces the shared entry: freshness travels.
    touched = a.cache.touch(old)
    assert a.tier.publish(a.cache, touched)
    assert c.tier.pull(c.cache, "pypi", "simple/pkg/") == touched


def test_an_entry_replaced_between_read_and_write_is_not_overwritten(tmp_path: Path) -> None:
    """The replace is conditional on the version read: a writer that lost the race keeps off."""
    layout = Layout(tmp_path / "store")
    layout.tmp.mkdir(parents=True)
    cache = Cache(tmp_path / "a")
    newer = store_local(cache, b"v2", path="p", fetched_at=5000.0)
    older = store_local(cache, b"v1", path="p", fetched_at=4000.0)

    class Interleaved(LocalBackend):
        """Another machine writes its newer entry just after each of our reads."""

        def get_index(self, key: str, name: str) -> Any:
            got = super().get_index(key, name)
            LocalBackend(layout).put_index(key, name, entry_bytes(replace(newer, fetched_at=time.time())))
            return got

    LocalBackend(layout).put_index("pypi", older.id, entry_bytes(replace(older, fetched_at=1.0)))
    tier = RemoteTier(Interleaved(layout), "store")
    assert not tier.publish(cache, older)
    shared = LocalBackend(layout).get_index("pypi", older.id)
    assert shared is not None and b'"sha256": "%s"' % newer.sha256.encode() in shared.data


# -- a bit-flipped object ---------------------------------------------------------------------------
def test_a_bit_flipped_object_is_refused_removed_and_fetched_again(bucket: Bucket, tmp_path: Path) -> None:
    a, b = machine(bucket, tmp_path / "a"), machine(bucket, tmp_path / "b")
    data = os.urandom(200_000)
    entry = store_local(a.cache, data)
    assert a.tier.publish(a.cache, entry)
    flipped = bytearray(data)
    flipped[123_456] ^= 0x01
    bucket.corrupt(entry.sha256, bytes(flipped))

    assert b.tier.pull(b.cache, "pypi", entry.path) is None  # the caller fetches it again
    assert b.cache.lookup("pypi", entry.path) is None  # nothing was indexed locally...
    assert not b.cache.blob_path(entry.sha256).exists()  # ...nor stored
    assert not list(b.cache.tmp.iterdir())  # and no part file is left behind
    assert bucket.make().blob_stat(entry.sha256) is None  # the bad object is gone from the store
    assert b.tier.health.snapshot()["corrupt"] == 1
    assert not b.tier.degraded()  # a bad object is not an outage

    # The refetch publishes the blob again; now every machine gets the right bytes.
    assert a.tier.publish(a.cache, entry)
    assert b.tier.pull(b.cache, "pypi", entry.path) == entry
    assert b.cache.blob_path(entry.sha256).read_bytes() == data


def test_an_artifact_pull_streams_and_is_stored_only_once_committed(bucket: Bucket, tmp_path: Path) -> None:
    a, b = machine(bucket, tmp_path / "a"), machine(bucket, tmp_path / "b")
    data = os.urandom(3 * 1024 * 1024 + 5)
    entry = store_local(a.cache, data)
    assert a.tier.publish(a.cache, entry)
    pull = b.tier.open_pull(b.cache, "pypi", entry.path)
    assert isinstance(pull, Pull) and pull.entry == entry
    writer = b.cache.writer(eid=entry.id, reserve=entry.size)
    got = b""
    for chunk in pull.chunks():
        assert b.cache.lookup("pypi", entry.path) is None  # nothing is stored while it streams
        # Written to the part file as read: 256 KiB+ writes take large page-cache folios, slow
        # on a VM that hands free memory back to its host (remote_tier.CHUNK).
        assert len(chunk) <= 128 * 1024
        writer.write(chunk)
        got += chunk
    assert got == data
    assert pull.commit(b.cache, writer) == entry  # verified: blob and entry, A's fetch time
    writer.discard()
    assert b.cache.lookup("pypi", entry.path) == entry
    assert b.cache.blob_path(entry.sha256).read_bytes() == data
    assert b.tier.health.snapshot()["pulled"] == 1
    b.cache.remove_entry(entry)  # the blob is here already: the entry alone, nothing to stream
    assert b.tier.open_pull(b.cache, "pypi", entry.path) == entry
    page = store_local(a.cache, b"<a>index</a>", path="simple/p/", kind=METADATA)
    assert a.tier.publish(a.cache, page)
    assert b.tier.open_pull(b.cache, "pypi", "simple/p/") == page  # metadata: pulled whole


def test_a_longer_object_is_refused_before_any_byte_past_the_entry_size(
    bucket: Bucket, tmp_path: Path
) -> None:
    """A streamed pull never hands out more than the entry's size, so a client served from it
    never gets a whole body of the wrong bytes (the extra bytes would arrive in a chunk of their
    own here: the size is a multiple of the read size)."""
    a, b = machine(bucket, tmp_path / "a"), machine(bucket, tmp_path / "b")
    data = os.urandom(2 * 1024 * 1024)
    entry = store_local(a.cache, data)
    assert a.tier.publish(a.cache, entry)
    bucket.corrupt(entry.sha256, data + b"tail")
    pull = b.tier.open_pull(b.cache, "pypi", entry.path)
    assert isinstance(pull, Pull)
    seen = 0
    with pytest.raises(PullRefused, match="longer than its entry says"):
        for chunk in pull.chunks():
            seen += len(chunk)
    assert seen <= entry.size
    assert bucket.make().blob_stat(entry.sha256) is None  # it does not hash to its name: removed
    assert b.tier.health.snapshot()["corrupt"] == 1


def test_a_store_failing_before_a_pulls_first_byte_makes_it_a_local_fetch(tmp_path: Path) -> None:
    """Nothing was sent yet: the machine fetches from the upstream (a local-only claim, the tier
    degraded) instead of answering a body it would have to cut at once."""

    class Broken(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, buffer: Any) -> int:
            raise ObjectStoreError("object store: reading s3://b/k: ReadTimeoutError", code="read-failed")

    class FailingReads(LocalBackend):
        def open_blob(self, sha256: str) -> BinaryIO:
            super().open_blob(sha256).close()  # present
            return io.BufferedReader(Broken())

    layout = Layout(tmp_path / "store")
    layout.tmp.mkdir(parents=True)
    a = Machine(Cache(tmp_path / "a"), RemoteTier(LocalBackend(layout), "store"))
    b = Machine(Cache(tmp_path / "b"), RemoteTier(FailingReads(layout), "store"))
    entry = store_local(a.cache, os.urandom(100_000))
    assert a.tier.publish(a.cache, entry)
    outcome = b.tier.acquire(b.cache, "pypi", entry.path, stream=True)
    assert isinstance(outcome, Claim) and not outcome.shared  # fetch it here
    assert "ReadTimeoutError" in b.tier.degraded()
    assert not list(b.cache.tmp.iterdir())


@pytest.mark.slow
def test_a_claim_kept_alive_outlives_its_ttl_until_released(bucket: Bucket, tmp_path: Path) -> None:
    a, b = machine(bucket, tmp_path / "a"), machine(bucket, tmp_path / "b")
    # A ttl with room for SeaweedFS's second-long answer to a contended conditional write.
    held = a.tier.claim("pypi", "pkg/long.whl", ttl=3)
    assert held is not None and held.shared
    held.keep_alive()
    time.sleep(6.5)  # more than twice the ttl: renewed meanwhile
    assert b.tier.claim("pypi", "pkg/long.whl", ttl=3) is None
    held.release()  # stops renewing and lets go
    taken = b.tier.claim("pypi", "pkg/long.whl", ttl=3)
    assert taken is not None and taken.shared
    taken.release()


def test_an_entry_whose_blob_is_missing_is_a_miss(bucket: Bucket, tmp_path: Path) -> None:
    a, b = machine(bucket, tmp_path / "a"), machine(bucket, tmp_path / "b")
    entry = store_local(a.cache, b"bytes")
    bucket.make().put_index("pypi", entry.id, entry_bytes(entry))  # an entry without its blob
    assert b.tier.pull(b.cache, "pypi", entry.path) is None
    assert b.cache.lookup("pypi", entry.path) is None


@pytest.mark.parametrize("claimed", [5, 7])
def test_an_entry_claiming_another_size_is_a_miss_and_its_intact_blob_stays(
    bucket: Bucket, tmp_path: Path, claimed: int
) -> None:
    a, b = machine(bucket, tmp_path / "a"), machine(bucket, tmp_path / "b")
    entry = store_local(a.cache, b"sixsix")
    assert a.tier.publish(a.cache, entry)
    bucket.make().put_index("pypi", entry.id, entry_bytes(replace(entry, size=claimed)))
    assert b.tier.pull(b.cache, "pypi", entry.path) is None
    assert b.cache.lookup("pypi", entry.path) is None
    assert bucket.make().blob_stat(entry.sha256) is not None  # the bytes are right: kept
    assert b.tier.health.snapshot()["corrupt"] == 0


def test_a_shared_entry_that_is_not_ours_is_ignored(bucket: Bucket, tmp_path: Path) -> None:
    b = machine(bucket, tmp_path / "b")
    entry = store_local(b.cache, b"bytes")
    b.cache.remove_entry(entry)
    bucket.make().put_index("pypi", entry.id, b'{"key": "pypi", "path": "../../x"}')
    assert b.tier.pull(b.cache, "pypi", entry.path) is None
    assert b.cache.lookup("pypi", entry.path) is None


# -- one upstream fetch across machines -------------------------------------------------------------
def test_concurrent_claims_across_two_machines_have_exactly_one_holder(
    bucket: Bucket, tmp_path: Path
) -> None:
    machines = [machine(bucket, tmp_path / "a"), machine(bucket, tmp_path / "b")]
    barrier = threading.Barrier(16)
    claims: list[Claim | None] = [None] * 16

    def contend(i: int) -> None:
        barrier.wait()
        claims[i] = machines[i % 2].tier.claim("pypi", "pkg/b-2.0.whl", ttl=60)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    holders = [c for c in claims if c is not None]
    assert len(holders) == 1 and holders[0].shared, claims


@pytest.mark.slow
def test_sixteen_clients_on_two_machines_fetch_one_cold_artifact_once(bucket: Bucket, tmp_path: Path) -> None:
    """The whole protocol (``acquire``): one fetch, every client gets the right bytes."""
    machines = [machine(bucket, tmp_path / "a"), machine(bucket, tmp_path / "b")]
    data = os.urandom(2 * 1024 * 1024 + 3)
    fetches: list[int] = []
    barrier = threading.Barrier(16)
    got: list[bytes | None] = [None] * 16
    errors: list[BaseException] = []

    def client(i: int) -> None:
        m = machines[i % 2]
        barrier.wait()
        try:
            outcome = m.tier.acquire(m.cache, "pypi", "pkg/c-3.0.whl", ttl=30, wait=60)
            if isinstance(outcome, Claim):
                with outcome:
                    assert outcome.shared
                    fetches.append(i)  # the upstream fetch
                    time.sleep(0.3)
                    entry = store_local(m.cache, data, path="pkg/c-3.0.whl")
                    assert m.tier.publish(m.cache, entry)
            else:
                entry = outcome
            got[i] = m.cache.blob_path(entry.sha256).read_bytes()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(fetches) == 1, fetches
    assert all(g == data for g in got)


def test_an_expired_claim_is_taken_over_and_the_old_holder_learns_it(bucket: Bucket, tmp_path: Path) -> None:
    clock = ManualClock(1_000_000.0)
    a = machine(bucket, tmp_path / "a", now=clock.now)
    b = machine(bucket, tmp_path / "b", now=clock.now)
    held = a.tier.claim("pypi", "pkg/d.whl", ttl=30)
    assert held is not None and held.shared
    assert b.tier.claim("pypi", "pkg/d.whl", ttl=30) is None  # alive
    clock.advance(31)  # A died: it stopped renewing
    taken = b.tier.acquire(b.cache, "pypi", "pkg/d.whl", ttl=30, wait=5)
    assert isinstance(taken, Claim) and taken.shared
    assert not held.renew()  # the old holder stops working
    held.release()  # not its claim any more: nothing happens
    assert a.tier.claim("pypi", "pkg/d.whl", ttl=30) is None
    assert taken.renew()
    taken.release()
    again = a.tier.claim("pypi", "pkg/d.whl", ttl=30)
    assert again is not None and again.shared


def test_a_waiter_takes_over_when_the_holder_gives_up(bucket: Bucket, tmp_path: Path) -> None:
    a, b = machine(bucket, tmp_path / "a"), machine(bucket, tmp_path / "b")
    held = a.tier.claim("pypi", "pkg/e.whl", ttl=60)
    assert held is not None

    def release_once_b_waits() -> None:  # the fetch failed: released without an entry
        deadline = time.monotonic() + 20
        while b.tier.health.snapshot()["claims_waited"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        held.release()

    timer = threading.Thread(target=release_once_b_waits)
    timer.start()
    start = time.monotonic()
    outcome = b.tier.acquire(b.cache, "pypi", "pkg/e.whl", ttl=60, wait=30)
    timer.join()
    assert isinstance(outcome, Claim) and outcome.shared and outcome.taken_over
    assert time.monotonic() - start < 15
    snapshot = b.tier.health.snapshot()
    assert snapshot["claims_waited"] == 1 and snapshot["claims_taken_over"] == 1
    outcome.release()


def test_a_bounded_wait_ends_in_a_local_claim(tmp_path: Path) -> None:
    layout = Layout(tmp_path / "store")
    layout.tmp.mkdir(parents=True)
    a = Machine(Cache(tmp_path / "a"), RemoteTier(LocalBackend(layout), "store"))
    clock = ManualClock(0.0)
    naps: list[float] = []

    def nap(seconds: float) -> None:
        naps.append(seconds)
        clock.advance(seconds)

    b = Machine(Cache(tmp_path / "b"), RemoteTier(LocalBackend(layout), "store", clock=clock.now, sleep=nap))
    assert a.tier.claim("pypi", "slow.whl", ttl=600) is not None
    outcome = b.tier.acquire(b.cache, "pypi", "slow.whl", wait=5)
    assert isinstance(outcome, Claim) and not outcome.shared  # fetch here too, rather than hang
    assert sum(naps) == pytest.approx(5) and naps[:3] == [0.1, 0.2, 0.4] and max(naps) <= 1.0


# -- the store down ------------------------------------------------------------------------------------
class Broken(LocalBackend):
    """A store that fails every request while ``down`` is set (and counts the requests)."""

    down = False
    requests = 0

    def _maybe_fail(self) -> None:
        type(self).requests += 1
        if type(self).down:
            raise ObjectStoreError(
                "object store: GET s3://cache/x: cannot connect to the endpoint", code="unreachable"
            )

    def get_index(self, key: str, name: str) -> Any:
        self._maybe_fail()
        return super().get_index(key, name)

    def blob_stat(self, sha256: str) -> Any:
        self._maybe_fail()
        return super().blob_stat(sha256)

    def acquire_lease(self, name: str, ttl: float) -> str | None:
        self._maybe_fail()
        return super().acquire_lease(name, ttl)


def test_a_failing_store_degrades_the_tier_for_a_backoff_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    layout = Layout(tmp_path / "store")
    layout.tmp.mkdir(parents=True)
    clock = ManualClock(0.0)
    cache = Cache(tmp_path / "a")
    tier = RemoteTier(Broken(layout), "s3://cache/x", backoff=30, clock=clock.now)
    entry = store_local(cache, b"local bytes")
    Broken.down = True
    try:
        with caplog.at_level(logging.INFO, logger="pytest_upstream"):
            assert tier.pull(cache, "pypi", "other") is None
            before = Broken.requests
            for _ in range(5):  # degraded: answered at once, the store not asked
                assert tier.pull(cache, "pypi", "other") is None
                assert not tier.publish(cache, entry)
                claim = tier.claim("pypi", "other")
                assert claim is not None and not claim.shared and claim.renew()
                claim.release()
            assert Broken.requests == before
            assert "unavailable" in tier.degraded()
            assert cache.lookup("pypi", entry.path) == entry  # local hits do not depend on the store
            clock.advance(31)  # the backoff is over: one probe, which fails again
            assert tier.pull(cache, "pypi", "other") is None
            assert Broken.requests == before + 1
            Broken.down = False
            clock.advance(31)
            assert tier.publish(cache, entry)  # back
            assert not tier.degraded()
    finally:
        Broken.down = False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert (
        "s3://cache/x unavailable" in warnings[0].getMessage()
        and "cannot connect" in warnings[0].getMessage()
    )
    assert any("available again" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    counts = tier.health.snapshot()
    assert counts["failures"] == 2 and counts["outages"] == 1 and counts["skipped"] == 15
    assert counts["degraded"] == 0 and counts["published"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("kind", S3_KINDS)
@pytest.mark.parametrize("how", ["killed", "frozen"])
def test_a_stopped_store_degrades_quickly_and_local_hits_go_on(
    kind: str, how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_s3_peer(kind)
    isolate_aws(monkeypatch)
    with started(kind) as peer:
        location = S3Location(peer.bucket, "stopped", peer.endpoint, "us-east-1")
        a = Machine(Cache(tmp_path / "a"), open_tier(location, timeouts=FAST, backoff=60))
        b = Machine(Cache(tmp_path / "b"), open_tier(location, timeouts=FAST, backoff=60))
        entry = store_local(a.cache, b"shared before the outage")
        assert a.tier.publish(a.cache, entry)
        assert b.tier.pull(b.cache, "pypi", entry.path) == entry
        if how == "killed":
            peer.proc.send_signal(signal.SIGKILL)
            peer.proc.wait(10)
        else:
            peer.pause()
        try:
            start = time.monotonic()
            assert b.tier.pull(b.cache, "pypi", "pkg/new.whl") is None
            first = time.monotonic() - start
            start = time.monotonic()
            for _ in range(20):
                assert b.tier.pull(b.cache, "pypi", "pkg/new.whl") is None
                claim = b.tier.claim("pypi", "pkg/new.whl")
                assert claim is not None and not claim.shared
            later = time.monotonic() - start
            hit = b.cache.lookup("pypi", entry.path)
            assert hit == entry and b.cache.verified_blob(hit) is not None
            fresh = store_local(
                b.cache, b"fetched from the upstream while the store is down", path="pkg/new.whl"
            )
            assert not b.tier.publish(b.cache, fresh)  # stored locally only
            assert b.cache.lookup("pypi", "pkg/new.whl") == fresh
        finally:
            if how == "frozen":
                peer.resume()
    # Bounds, not speed: a connect/read timeout of the FAST kind, then the breaker answers at once
    # (generous margins: the suite runs two workers on two cores).
    assert first < 20, first
    assert later < 8, later  # without the breaker: 40 calls of 1-2 s each
    assert b.tier.degraded() and b.tier.health.snapshot()["outages"] == 1


HOLDER = """
import sys, time
from pytest_upstream.config.s3_location import S3Location
from pytest_upstream.store.remote_tier import open_tier
tier = open_tier(S3Location(sys.argv[1], sys.argv[2], sys.argv[3], "us-east-1"))
before = time.time()  # the lease expires no sooner than ttl after this
claim = tier.claim("pypi", "pkg/killed.whl", ttl=float(sys.argv[4]))
print(repr(before) if claim is not None and claim.shared else "not held", flush=True)
time.sleep(600)  # "downloading" until killed
"""


@pytest.mark.slow
@pytest.mark.parametrize("kind", S3_KINDS)
def test_a_holder_killed_mid_fetch_is_taken_over_after_its_claim_expires(
    kind: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    s3_peer: Callable[[str], S3Peer],  # noqa: F811
) -> None:
    """A real process holds the claim and is killed -9: nothing it wrote is visible, and another
    machine fetches once the claim's time to live has passed (not before)."""
    peer = s3_peer(kind)
    isolate_aws(monkeypatch)
    prefix = f"t-{uuid.uuid4().hex[:12]}/killed"
    ttl = 3.0
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, peer.bucket, prefix, peer.endpoint, str(ttl)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    try:
        assert holder.stdout is not None
        claimed = float(holder.stdout.readline())  # wall time before the claim ("not held": fails)
        holder.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        holder.wait(10)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
        if holder.stdout is not None:
            holder.stdout.close()
    location = S3Location(peer.bucket, prefix, peer.endpoint, "us-east-1")
    b = Machine(Cache(tmp_path / "b"), open_tier(location))
    outcome = b.tier.acquire(b.cache, "pypi", "pkg/killed.whl", ttl=30, wait=60)
    waited, since_claim = time.monotonic() - killed_at, time.time() - claimed
    assert isinstance(outcome, Claim) and outcome.shared and outcome.taken_over
    assert since_claim >= ttl - 0.2, since_claim  # not before it expired (a loaded machine reads late)
    assert waited < ttl + 10, waited
    assert b.cache.lookup("pypi", "pkg/killed.whl") is None
    outcome.release()
