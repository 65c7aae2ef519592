"""What a big download's part file does beside the download (store/hasher.py, store/early_sync.py):
the digests computed in a second thread are the digests of every byte in order, the early
write-back starts only for big files, and neither leaves a thread behind."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from pytest_upstream.store import early_sync, hasher
from pytest_upstream.store.cache import BlobWriter, Cache, DigestMismatch
from pytest_upstream.store.hasher import Hasher

MiB = 1024 * 1024


def helper_threads() -> list[str]:
    return [
        t.name for t in threading.enumerate() if t.name in ("pytest-upstream hash", "pytest-upstream sync")
    ]


def test_digests_from_the_hashing_thread_are_those_of_every_byte_in_order() -> None:
    pieces = [os.urandom(n) for n in (1000, 3 * MiB, 2 * MiB, 17, 5 * MiB, 1)]
    h = Hasher(("md5", "sha512"))
    seen: list[str] = []
    for i, piece in enumerate(pieces):  # bytes, bytearray and memoryview, as writers pass them
        h.update(piece if i % 3 == 0 else bytearray(piece) if i % 3 == 1 else memoryview(piece))
        seen += helper_threads()
    whole = b"".join(pieces)
    assert "pytest-upstream hash" in seen  # past THREAD_AFTER the hash ran beside the writer
    assert h.hexdigests() == {
        "sha256": hashlib.sha256(whole).hexdigest(),
        "md5": hashlib.md5(whole).hexdigest(),
        "sha512": hashlib.sha512(whole).hexdigest(),
    }
    assert helper_threads() == []


def test_a_small_body_is_hashed_inline_and_an_abandoned_one_leaves_no_thread() -> None:
    small = Hasher()
    small.update(b"x" * 1000)
    assert helper_threads() == []
    assert small.hexdigests()["sha256"] == hashlib.sha256(b"x" * 1000).hexdigest()
    big = Hasher()
    big.update(os.urandom(hasher.THREAD_AFTER + 1))
    big.update(b"more")
    assert helper_threads() == ["pytest-upstream hash"]
    big.close()
    assert helper_threads() == []


def test_a_big_blob_is_verified_and_committed_with_the_threads_and_a_mismatch_still_refused(
    tmp_path: Path,
) -> None:
    cache = Cache(tmp_path / "cache")
    data = os.urandom(9 * MiB)
    w = cache.writer(("sha512",), reserve=len(data))
    for at in range(0, len(data), 256 * 1024):
        w.write(data[at : at + 256 * 1024])
    sha, size = cache.commit_blob(w, {"sha512": hashlib.sha512(data).hexdigest()}, "big")
    assert (sha, size) == (hashlib.sha256(data).hexdigest(), len(data))
    assert cache.blob_path(sha).read_bytes() == data
    w = cache.writer(("sha512",))
    w.write(data)
    with pytest.raises(DigestMismatch):
        cache.commit_blob(w, {"sha512": "0" * 128}, "tampered")
    assert helper_threads() == []
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []


def test_the_write_back_starts_every_16_mib_for_a_big_file_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []
    real = os.fdatasync

    def fdatasync(fd: int) -> None:
        synced.append(os.fstat(fd).st_size)
        real(fd)

    monkeypatch.setattr(early_sync.os, "fdatasync", fdatasync)
    small = BlobWriter(tmp_path)
    small.write(b"s" * MiB)
    small.finish()
    small.discard()
    assert synced == [] and helper_threads() == []
    big = BlobWriter(tmp_path)
    chunk = os.urandom(MiB)
    for _ in range(40):
        big.write(chunk)
        big.flush()
    deadline = time.monotonic() + 5
    while not synced and time.monotonic() < deadline:  # the thread runs when the machine lets it
        time.sleep(0.01)
    big.finish()
    assert helper_threads() == []  # stopped before the commit's own fsync
    assert synced and all(size >= early_sync.EVERY for size in synced)
    assert len(synced) <= 40 // 16
    big.discard()
