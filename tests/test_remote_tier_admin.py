"""``cache ls|verify|prune|export|import --cache s3://...`` against real S3 servers on loopback
(tests/s3_peers.py), run as a user runs them: ``upstream-proxy`` with the location in the
environment (``UPSTREAM_PROXY_CACHE``) or the flag, and the endpoint in ``AWS_ENDPOINT_URL``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from pytest_upstream.admin.archive import export_archive
from pytest_upstream.admin.object_store import open_store, prune_store
from pytest_upstream.cli.main import main
from pytest_upstream.config.s3_location import S3Location
from pytest_upstream.repro.lockfile import LockFile, LockFileEntry
from pytest_upstream.store.cache import Cache
from pytest_upstream.store.entry import Entry, entry_bytes
from pytest_upstream.store.remote_tier import RemoteTier
from pytest_upstream.store.s3 import S3Backend

from .s3_peers import S3Peer
from .test_backend_contract import isolate_aws, s3_peer  # noqa: F401 (a fixture)
from .test_remote_tier import store_local

S3_KINDS = ("seaweedfs", "moto")


@dataclass
class Shared:
    url: str
    location: S3Location
    backend: S3Backend
    tier: RemoteTier


@pytest.fixture(params=S3_KINDS)
def shared(
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    s3_peer: Callable[[str], S3Peer],  # noqa: F811
) -> Shared:
    peer = s3_peer(request.param)
    isolate_aws(monkeypatch)
    monkeypatch.setenv("AWS_ENDPOINT_URL", peer.endpoint)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.chdir(tmp_path)  # no pyproject.toml: the defaults
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    url = f"s3://{peer.bucket}/t-{uuid.uuid4().hex[:12]}/cache"
    monkeypatch.setenv("UPSTREAM_PROXY_CACHE", url)
    location = S3Location(peer.bucket, url.split("/", 3)[3], peer.endpoint, "us-east-1")
    backend, tier = open_store(location)
    return Shared(url, location, backend, tier)


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out + err


def publish(shared: Shared, cache: Cache, data: bytes, path: str, **fields: object) -> Entry:
    entry = store_local(cache, data, path=path, **fields)
    assert shared.tier.publish(cache, entry)
    return entry


def test_ls_lists_the_shared_index_not_the_local_tier(
    shared: Shared, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    machine = Cache(tmp_path / "machine")
    publish(shared, machine, b"a" * 1000, "pkg/a.whl")
    publish(shared, machine, b"b" * 2000, "pkg/b.whl")
    store_local(machine, b"local only", path="pkg/local.whl")  # never published
    code, out = cli(capsys, "cache", "ls")
    assert code == 0, out
    assert "pkg/a.whl" in out and "pkg/b.whl" in out and "pkg/local.whl" not in out
    assert f"# 2 entries (2.9 KiB) in {shared.url}; 2 blobs in the store" in out
    code, out = cli(capsys, "cache", "ls", "--json", "--key", "pypi")
    listing = json.loads(out)
    assert listing["cache"] == shared.url and listing["totals"]["entries"] == 2
    assert not (tmp_path / "xdg" / "pytest-upstream" / "entries").exists()  # the local tier untouched


def test_verify_removes_a_bit_flipped_blob_and_the_entries_it_breaks(
    shared: Shared, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    machine = Cache(tmp_path / "machine")
    good = publish(shared, machine, b"good bytes", "pkg/good.whl")
    bad = publish(shared, machine, b"will be flipped", "pkg/bad.whl")
    wrong = publish(shared, machine, b"x" * 10, "pkg/wrong.whl")
    raw = shared.backend
    raw.client.put_object(Bucket=raw.bucket, Key=raw.blob_key(bad.sha256), Body=b"will be flipPed")
    shared.backend.put_index("pypi", wrong.id, _entry_json(wrong, size=11))  # a wrong size
    raw.client.put_object(Bucket=raw.bucket, Key=raw.index_key("pypi", "f" * 64), Body=b"not json")
    code, out = cli(capsys, "cache", "verify", "--cache", shared.url)
    assert code == 1, out
    assert f"corrupt-blob: blobs/{bad.sha256[:2]}/{bad.sha256}" in out
    assert f"missing-blob: index/pypi/{bad.id}" in out
    assert f"size-mismatch: index/pypi/{wrong.id}" in out
    assert "unreadable-entry: index/pypi/" + "f" * 64 in out
    assert out.count(": removed") == 4, out
    assert shared.backend.blob_stat(bad.sha256) is None
    assert shared.backend.blob_stat(wrong.sha256) is not None  # intact bytes stay
    code, out = cli(capsys, "cache", "verify")
    assert code == 0 and "checked 2 blobs" in out and "1 entry" in out and ": ok" in out, out
    assert shared.backend.get_index("pypi", good.id) is not None


def _entry_json(entry: Entry, **changes: Any) -> bytes:
    return entry_bytes(replace(entry, **changes))


def test_prune_by_age_and_size_keeps_locked_and_recent_blobs(shared: Shared, tmp_path: Path) -> None:
    machine = Cache(tmp_path / "machine")
    now = time.time()
    old = publish(shared, machine, b"o" * 4000, "pkg/old.whl", fetched_at=now - 40 * 86400)
    mid = publish(shared, machine, b"m" * 3000, "pkg/mid.whl", fetched_at=now - 10 * 86400)
    locked = publish(shared, machine, b"l" * 5000, "pkg/locked.whl", fetched_at=now - 50 * 86400)
    new = publish(shared, machine, b"n" * 2000, "pkg/new.whl", fetched_at=now - 60)
    keep = frozenset({locked.sha256})
    # Age: only `old` (the locked one is older still, but pinned); its blob is younger than the grace.
    report = prune_store(shared.backend, older_than=30 * 86400, keep=keep)
    assert [e.path for e in report.removed] == ["pkg/old.whl"]
    assert report.blobs_removed == 0 and report.recent_bytes == 4000
    # Size, with no grace: oldest fetched first until the named blobs fit.
    report = prune_store(shared.backend, max_size=8000, keep=keep, grace=0, now=time.time() + 5)
    assert [e.path for e in report.removed] == ["pkg/mid.whl"]
    assert report.blobs_removed == 2 and report.bytes_freed == 7000
    assert report.size_after == 7000 and report.pinned_bytes == 5000
    left = {name for _, name in shared.backend.list_index()}
    assert left == {locked.id, new.id}
    assert shared.backend.blob_stat(old.sha256) is None and shared.backend.blob_stat(mid.sha256) is None


def test_prune_from_the_command_line(
    shared: Shared, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    machine = Cache(tmp_path / "machine")
    publish(shared, machine, b"o" * 4000, "pkg/old.whl", fetched_at=time.time() - 40 * 86400)
    kept = publish(shared, machine, b"k" * 100, "pkg/kept.whl", fetched_at=time.time() - 40 * 86400)
    lock = tmp_path / "upstream.lock"
    LockFile([LockFileEntry("pypi", kept.path, "", kept.sha256, kept.size, kept.kind)]).save(lock)
    code, out = cli(
        capsys, "cache", "prune", "--older-than", "30d", "--grace", "0s", "--keep-lock", str(lock)
    )
    assert code == 0, out
    assert out.startswith("removed 1 entry and 1 blob (3.9 KiB)") and shared.url in out, out


def test_export_from_the_store_equals_the_directory_export_and_imports_back(
    shared: Shared, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    machine = Cache(tmp_path / "machine")
    for i in range(3):
        publish(shared, machine, os.urandom(5000 + i), f"pkg/{i}.whl", fetched_at=1_700_000_000.0 + i)
    archive = tmp_path / "shared.tar.gz"
    code, out = cli(capsys, "cache", "export", str(archive))
    assert code == 0 and "3 entries, 3 blobs" in out, out
    reference = tmp_path / "dir.tar.gz"
    export_archive(machine, reference)
    assert hashlib.sha256(archive.read_bytes()).digest() == hashlib.sha256(reference.read_bytes()).digest()

    other = f"{shared.url}-copy"
    code, out = cli(capsys, "cache", "import", str(archive), "--cache", other)
    assert code == 0 and "3 entries published, 0 kept" in out, out
    code, out = cli(capsys, "cache", "import", str(archive), "--cache", other)  # again: nothing newer
    assert code == 0 and "3 entries published" in out, out  # the same bytes: already there
    monkeypatch.setenv("UPSTREAM_PROXY_CACHE", other)
    code, out = cli(capsys, "cache", "ls", "--json")
    assert json.loads(out)["totals"] == json.loads(_ls_json(capsys, shared.url))["totals"]


def _ls_json(capsys: pytest.CaptureFixture[str], url: str) -> str:
    code, out = cli(capsys, "cache", "ls", "--json", "--cache", url)
    assert code == 0
    return out


def test_an_unreachable_store_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from .peers import free_port

    isolate_aws(monkeypatch)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    code, out = cli(capsys, "cache", "ls", "--cache", "s3://cache/p")
    assert code == 1 and "cannot connect" in out and "s3://cache/p" in out, out
