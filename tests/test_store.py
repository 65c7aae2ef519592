"""The store's integrity rules, one by one: permissions of files people read, blob verification
remembered across processes and shared between threads, the size rule, striped entry locks,
and the strict entry parser on the hit path.  (The storage seam's contract, LocalBackend's side
included, is tested in test_backend_contract.py.)"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest

from pytest_upstream.repro.lockfile import LockFile, LockFileEntry
from pytest_upstream.repro.report import write_report
from pytest_upstream.store.cache import Cache, ClaimMismatch, Entry, LockTimeout, entry_id
from pytest_upstream.store.entry import NOT_FOUND, entry_bytes
from pytest_upstream.store.files import AtomicFile
from pytest_upstream.store.layout import LOCK_STRIPES, Layout, stripe_of

ROOT = Path(__file__).resolve().parent.parent


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stored(cache: Cache, data: bytes, path: str = "a.bin", key: str = "g") -> Entry:
    digest = cache.store_bytes(data)
    entry = Entry(key, path, "", f"http://up/{path}", digest, len(data), "artifact", time.time())
    return cache.store_entry(entry)


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


# -- files people read --------------------------------------------------------------
def test_lock_file_and_report_are_readable_by_the_team(tmp_path: Path, umask_022: None) -> None:
    lock = LockFile([LockFileEntry("g", "a", "", "0" * 64, 1, "artifact")])
    lock.save(tmp_path / "upstream.lock")
    write_report(tmp_path / "report.json", "record", {})
    assert (tmp_path / "upstream.lock").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "report.json").stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "upstream.lock"]  # no temp files


def test_atomic_file_commits_whole_or_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out" / "archive.tar"
    with pytest.raises(RuntimeError), AtomicFile(target) as out:
        out.write(b"half")
        raise RuntimeError("killed half way")
    assert not target.exists() and list(target.parent.iterdir()) == []
    with AtomicFile(target) as out:
        out.write(b"whole")
    assert target.read_bytes() == b"whole" and [p.name for p in target.parent.iterdir()] == ["archive.tar"]
    # a temp file in tmp/ whose name is known only at the end (a content-addressed blob)
    (tmp_path / "tmp").mkdir()
    blob = AtomicFile(tmp_dir=tmp_path / "tmp")
    blob.write(b"bytes")
    assert blob.commit(tmp_path / "blobs" / sha(b"bytes")).read_bytes() == b"bytes"
    assert list((tmp_path / "tmp").iterdir()) == []


# -- the size rule ----------------------------------------------------------------------
def test_a_wrong_size_claim_keeps_the_intact_blob(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    entry = stored(cache, b"x" * 10)
    assert cache.verified_digest(entry.sha256, 11) is None
    with pytest.raises(ClaimMismatch, match=f"the lock file says 11 bytes, the blob {entry.sha256} has 10"):
        cache.claimed_blob(entry.sha256, 11, "the lock file")
    assert cache.blob_path(entry.sha256).read_bytes() == b"x" * 10
    # an entry claiming another size is the wrong one: it goes, the blob stays
    wrong = cache.store_entry(Entry(**{**entry.__dict__, "path": "b.bin", "size": 9}))
    assert cache.verified_blob(wrong) is None
    assert cache.lookup("g", "b.bin") is None
    assert cache.verified_blob(entry) == cache.blob_path(entry.sha256)


def test_only_a_blob_that_does_not_hash_to_its_name_is_deleted(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    entry = stored(cache, b"good bytes")
    cache.blob_path(entry.sha256).write_bytes(b"evil bytes")  # same size, other content
    assert cache.verified_blob(entry) is None
    assert not cache.blob_path(entry.sha256).exists()
    assert cache.lookup("g", "a.bin") is None


# -- verification remembered --------------------------------------------------------------
_CHILD = textwrap.dedent(
    """
    import hashlib, json, sys
    from unittest import mock
    import pytest_upstream.store.blobs as blobs
    from pytest_upstream.store.cache import Cache

    hashed = []
    real = hashlib.file_digest
    def counting(f, name):
        hashed.append(name)
        return real(f, name)
    with mock.patch.object(blobs.hashlib, "file_digest", counting):
        cache = Cache(sys.argv[1])
        path = cache.verified_digest(sys.argv[2], int(sys.argv[3]))
    print(json.dumps({"found": path is not None, "hashed": len(hashed)}))
    """
)


def first_hit_in_a_new_process(root: Path, digest: str, size: int) -> dict[str, object]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(root), digest, str(size)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    result: dict[str, object] = json.loads(out)
    return result


def test_a_second_process_does_not_hash_a_blob_another_one_verified(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    data = os.urandom(100_000)
    digest = Cache(root).store_bytes(data)  # written and hashed here: a marker vouches for it
    assert first_hit_in_a_new_process(root, digest, len(data)) == {"found": True, "hashed": 0}
    Cache(root).store_bytes(data)  # fetched again: the blob's new mtime keeps its verification
    assert first_hit_in_a_new_process(root, digest, len(data)) == {"found": True, "hashed": 0}

    # a blob changed on disk no longer matches its marker: hashed again, and found corrupt
    blob = root / "blobs" / "sha256" / digest[:2] / digest
    blob.write_bytes(b"\0" * len(data))
    assert first_hit_in_a_new_process(root, digest, len(data)) == {"found": False, "hashed": 1}
    assert not blob.exists()


def test_a_blob_without_a_marker_is_hashed_once_then_trusted_by_the_next_process(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    data = os.urandom(1000)
    digest = Cache(root).store_bytes(data)
    marker = Layout(root).marker(digest)
    os.unlink(marker)  # e.g. a cache restored from an archive, or written by an older version
    assert first_hit_in_a_new_process(root, digest, len(data)) == {"found": True, "hashed": 1}
    assert Path(marker).is_file()
    assert first_hit_in_a_new_process(root, digest, len(data)) == {"found": True, "hashed": 0}


def test_threads_asking_about_one_blob_hash_it_once(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    data = os.urandom(10_000)
    digest = Cache(root).store_bytes(data)
    os.unlink(Layout(root).marker(digest))
    cache = Cache(root)  # a new process's view: nothing known in memory
    calls = []
    real = hashlib.file_digest

    def slow(f: object, name: str) -> object:
        calls.append(name)
        time.sleep(0.3)  # long enough for every thread to arrive while the first one hashes
        return real(f, name)  # type: ignore[arg-type]

    results: list[Path | None] = []
    with mock.patch.object(hashlib, "file_digest", slow):
        threads = [
            threading.Thread(target=lambda: results.append(cache.verified_digest(digest, len(data))))
            for _ in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(calls) == 1
    assert results == [cache.blob_path(digest)] * 8


# -- the strict parser on the hit path --------------------------------------------------------
@pytest.mark.parametrize(
    "change",
    [{"kind": "bogus"}, {"size": "10"}, {"sha256": "ABC"}, {"path": "elsewhere.bin"}],
)
def test_the_hit_path_refuses_what_cache_verify_refuses(tmp_path: Path, change: dict[str, object]) -> None:
    cache = Cache(tmp_path / "cache")
    entry = stored(cache, b"data")
    file = Path(cache.layout.entry("g", entry.id))
    raw = json.loads(entry_bytes(entry))
    file.write_text(json.dumps({**raw, **change}))
    assert Cache(cache.root).lookup("g", "a.bin") is None


def test_not_found_is_one_of_the_entry_kinds(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    digest = cache.store_bytes(b"")
    cache.store_entry(Entry("g", "gone", "", "http://up/gone", digest, 0, NOT_FOUND, 0.0), durable=False)
    found = Cache(cache.root).lookup("g", "gone")
    assert found is not None and found.kind == "notfound"


# -- striped locks ---------------------------------------------------------------------------
def two_ids_on_one_stripe() -> tuple[str, str]:
    seen: dict[int, str] = {}
    for i in range(10 * LOCK_STRIPES):
        path = f"p{i}"
        stripe = stripe_of(entry_id("g", path, ""))
        if stripe in seen:
            return seen[stripe], path
        seen[stripe] = path
    raise AssertionError("no two paths share a stripe")


def test_nested_entries_on_one_stripe_do_not_deadlock(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    a, b = two_ids_on_one_stripe()
    with cache.locked("g", a, "", timeout=2), cache.locked("g", b, "", timeout=2):
        pass
    # and from two threads at once: each holds its own entry while the other holds its own
    inside = threading.Barrier(2, timeout=5)

    def hold(path: str) -> None:
        with cache.locked("g", path, "", timeout=5):
            inside.wait()

    threads = [threading.Thread(target=hold, args=(p,)) for p in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads)


def test_two_cache_objects_of_one_process_share_the_entry_locks(tmp_path: Path) -> None:
    one, two = Cache(tmp_path / "cache"), Cache(tmp_path / "cache")
    a, b = two_ids_on_one_stripe()
    with one.locked("g", a, "", timeout=1):
        # the same entry: busy, whichever Cache asks
        with pytest.raises(LockTimeout), two.locked("g", a, "", timeout=0):
            pass
        with two.locked("g", b, "", timeout=0):  # another entry on the same stripe: free
            pass


def test_one_entry_is_held_by_one_thread_and_a_wait_times_out(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    with cache.locked("g", "x", "", timeout=1):
        errors: list[BaseException] = []

        def other() -> None:
            try:
                with cache.locked("g", "x", "", timeout=0.2):
                    pass
            except LockTimeout as exc:
                errors.append(exc)

        t = threading.Thread(target=other)
        t.start()
        t.join()
    message = "timed out after 0.2s waiting for another process to fetch 'x' for 'g'"
    assert [str(e) for e in errors] == [message]
    with cache.locked("g", "x", "", timeout=0):  # released: free again
        pass


_HOLDER = textwrap.dedent(
    """
    import sys, time
    from pytest_upstream.store.cache import Cache
    with Cache(sys.argv[1]).locked("g", sys.argv[2], "", timeout=5):
        print("held", flush=True)
        time.sleep(float(sys.argv[3]))
    """
)


def test_another_process_holding_the_entry_blocks_until_it_is_done(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    cache = Cache(root)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(root), "x", "1.0"], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(LockTimeout), cache.locked("g", "x", "", timeout=0.1):
            pass
        start = time.monotonic()
        with cache.locked("g", "x", "", timeout=10):
            waited = time.monotonic() - start
        assert waited > 0.2
    finally:
        holder.wait(timeout=30)


def test_the_locks_directory_holds_at_most_the_stripe_count(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    for i in range(3 * LOCK_STRIPES):
        with cache.locked("g", f"path/{i}", "", timeout=1):
            pass
    files = list(cache.locks.rglob("*"))
    assert 0 < len(files) <= LOCK_STRIPES
    assert all(f.name.startswith("stripe-") for f in files)
