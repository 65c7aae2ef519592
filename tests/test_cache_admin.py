"""``upstream-proxy cache ls|verify|prune|export|import`` on caches a real proxy built.

Every cache here is filled by a ``ProxyServer`` fetching from a loopback
upstream; the commands run through ``cli.main`` (or the functions behind it)
and the results are checked on disk and by serving through a proxy again.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from pytest_upstream.admin.archive import export_archive, import_archive
from pytest_upstream.admin.listing import list_entries
from pytest_upstream.admin.prune import prune
from pytest_upstream.admin.verify import verify
from pytest_upstream.cli.main import main
from pytest_upstream.config import units
from pytest_upstream.config.settings import ProxyDefinition
from pytest_upstream.repro.lockfile import LockFile, LockFileEntry
from pytest_upstream.store.cache import USE_STAMP_INTERVAL, Cache, CacheError, Entry, entry_id

from .conftest import MakeProxy, proxy_def
from .upstreams import Upstream

FILES = {
    "/a.txt": b"alpha\n" * 100,  # 600 B
    "/dir/b.bin": bytes(range(256)) * 40,  # 10 KiB
    "/dir/c.bin": b"c" * 30_000,
    "/d.tar.gz": os.urandom(50_000),
    "/meta/index.json": b'{"versions": ["1.0"]}',  # metadata (mutable_paths)
}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Recorded:
    cache: Path
    upstream: Upstream
    files: dict[str, bytes]

    def entry_file(self, path: str, key: str = "g") -> Path:
        eid = entry_id(key, path.lstrip("/"), "")
        return self.cache / "entries" / key / eid[:2] / f"{eid}.json"

    def blob(self, path: str) -> Path:
        digest = sha(self.files[path])
        return self.cache / "blobs" / "sha256" / digest[:2] / digest

    def set_used(self, path: str, ago: float) -> None:
        t = time.time() - ago
        os.utime(self.entry_file(path), (t, t))


def generic(url: str, key: str = "g") -> ProxyDefinition:
    return proxy_def(key=key, format="generic", url=url, mutable_paths=["meta/*"])


def fetch_all(base_url: str, paths: list[str], key: str = "g") -> None:
    with httpx.Client(base_url=base_url, timeout=30) as client:
        for path in paths:
            r = client.get(f"/{key}{path}")
            assert r.status_code == 200, r.text


@pytest.fixture
def recorded(upstream: Upstream, make_proxy: MakeProxy, tmp_path: Path) -> Iterator[Recorded]:
    """A cache filled by a record-mode proxy with FILES (all old: last used an hour ago)."""
    upstream.files.update(FILES)
    cache = tmp_path / "cache"
    proxy = make_proxy(generic(upstream.url), cache=cache)
    fetch_all(proxy.base_url, list(FILES))
    rec = Recorded(cache, upstream, dict(FILES))
    for i, path in enumerate(FILES):
        rec.set_used(path, 3600 + i)
    yield rec


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def cache_cmd(
    capsys: pytest.CaptureFixture[str], action: str, cache: Path, *rest: str
) -> tuple[int, str, str]:
    """``upstream-proxy cache <action> --cache <cache> <rest...>``."""
    return run(capsys, "cache", action, "--cache", str(cache), *rest)


def tree(root: Path) -> dict[str, bytes]:
    """Every file under VERSION, blobs/ and entries/, with its bytes."""
    found = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel.split("/")[0] in ("VERSION", "blobs", "entries"):
            found[rel] = p.read_bytes()
    return found


def members(archive: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(archive, "r:*") as tar:
        return tar.getmembers()


# -- hits record their use -----------------------------------------------------
def test_a_hit_bumps_the_entry_mtime_at_most_once_a_minute(recorded: Recorded) -> None:
    cache = Cache(recorded.cache)
    file = recorded.entry_file("/a.txt")
    assert cache.lookup("g", "a.txt") is not None
    assert time.time() - file.stat().st_mtime < 5  # an hour-old entry was bumped to now
    recent = time.time() - USE_STAMP_INTERVAL / 2
    os.utime(file, (recent, recent))
    cache.lookup("g", "a.txt")
    assert file.stat().st_mtime == pytest.approx(recent)  # used within the minute: no utime
    # the memo followed the bump: the entry was not parsed again
    name = str(file)
    assert cache._entry_memo[name][0][2] == file.stat().st_mtime_ns
    # listing the cache is not a use
    old = time.time() - 7200
    os.utime(file, (old, old))
    list(cache.iter_entries())
    list_entries(cache)
    assert file.stat().st_mtime == pytest.approx(old)


# -- ls --------------------------------------------------------------------------
def test_ls_lists_every_entry_with_totals(
    recorded: Recorded, capsys: pytest.CaptureFixture[str], make_proxy: MakeProxy
) -> None:
    status, out, _ = cache_cmd(capsys, "ls", recorded.cache, "--json")
    assert status == 0
    listing = json.loads(out)
    by_path = {e["path"]: e for e in listing["entries"]}
    assert set(by_path) == {p.lstrip("/") for p in FILES}
    for path, data in FILES.items():
        e = by_path[path.lstrip("/")]
        assert (e["key"], e["variant"], e["size"], e["sha256"]) == ("g", "", len(data), sha(data))
        assert e["kind"] == ("metadata" if path.startswith("/meta/") else "artifact")
        assert 3600 <= e["idle"] < 3700 and 0 <= e["age"] < 600
    assert listing["totals"] == {
        "entries": 5,
        "entry_bytes": sum(map(len, FILES.values())),
        "blobs": 5,
        "blob_bytes": sum(map(len, FILES.values())),
        "unreferenced_blobs": 0,
        "unreferenced_bytes": 0,
    }

    status, out, _ = cache_cmd(capsys, "ls", recorded.cache)
    assert status == 0
    assert "dir/c.bin" in out and sha(FILES["/dir/c.bin"])[:12] in out
    assert out.splitlines()[-1].startswith("# 5 entries")

    # --key: another proxy's entries are left out, the totals still cover the cache
    other = make_proxy(generic(recorded.upstream.url, key="h"), cache=recorded.cache)
    fetch_all(other.base_url, ["/a.txt"], key="h")
    status, out, _ = cache_cmd(capsys, "ls", recorded.cache, "--key", "h", "--json")
    listing = json.loads(out)
    assert [(e["key"], e["path"]) for e in listing["entries"]] == [("h", "a.txt")]
    assert listing["totals"]["blobs"] == 5  # same bytes through two keys: one blob
    # the text form says the same as docs/cache.md: the key's entries, the whole cache's blobs
    status, out, _ = cache_cmd(capsys, "ls", recorded.cache, "--key", "h")
    blobs = units.human_size(sum(map(len, FILES.values())))
    assert out.splitlines()[-1] == (
        f"# 1 entry (600 B) in {recorded.cache}; 5 blobs on disk ({blobs}), 0 unreferenced (0 B)"
    )


def test_commands_refuse_a_directory_that_is_not_a_cache(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = cache_cmd(capsys, "ls", tmp_path / "nothing")
    assert status == 1 and "not a cache directory" in err
    assert not (tmp_path / "nothing").exists()


def test_the_cache_defaults_to_the_configured_one(
    recorded: Recorded, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UPSTREAM_PROXY_CACHE", str(recorded.cache))
    monkeypatch.chdir(recorded.cache.parent)
    status, out, _ = run(capsys, "cache", "ls", "--json")
    assert status == 0 and json.loads(out)["totals"]["entries"] == 5


# -- verify ----------------------------------------------------------------------
def test_verify_a_clean_cache(recorded: Recorded, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = cache_cmd(capsys, "verify", recorded.cache)
    assert status == 0
    assert "checked 5 blobs" in out and out.rstrip().endswith(": ok")


def test_verify_removes_what_is_broken_then_the_proxy_refetches(
    recorded: Recorded, capsys: pytest.CaptureFixture[str], make_proxy: MakeProxy
) -> None:
    corrupt = recorded.blob("/dir/c.bin")
    corrupt.write_bytes(b"C" + corrupt.read_bytes()[1:])  # same size, other bytes
    recorded.blob("/d.tar.gz").unlink()
    garbage = recorded.cache / "entries" / "g" / "00" / ("0" * 64 + ".json")
    garbage.parent.mkdir(parents=True, exist_ok=True)
    garbage.write_bytes(b"{not json")
    wrong_size = recorded.entry_file("/a.txt")
    wrong_size.write_text(wrong_size.read_text().replace('"size": 600', '"size": 601'))

    status, out, _ = cache_cmd(capsys, "verify", recorded.cache, "--json")
    assert status == 1
    report = json.loads(out)
    problems = {(p["kind"], p["path"]): p for p in report["problems"]}

    def rel(p: Path) -> str:
        return p.relative_to(recorded.cache).as_posix()

    assert set(problems) == {
        ("corrupt-blob", rel(corrupt)),
        ("missing-blob", rel(recorded.entry_file("/dir/c.bin"))),  # its blob was just removed
        ("missing-blob", rel(recorded.entry_file("/d.tar.gz"))),
        ("unreadable-entry", rel(garbage)),
        ("size-mismatch", rel(wrong_size)),
    }
    assert all(p["repaired"] for p in report["problems"])
    assert not corrupt.exists() and not garbage.exists() and not wrong_size.exists()
    assert not recorded.entry_file("/dir/c.bin").exists() and not recorded.entry_file("/d.tar.gz").exists()
    assert recorded.blob("/a.txt").exists()  # a good blob behind a bad entry is kept

    status, out, _ = cache_cmd(capsys, "verify", recorded.cache)
    assert status == 0, out

    hits_before = recorded.upstream.hits.copy()
    proxy = make_proxy(generic(recorded.upstream.url), cache=recorded.cache)
    with httpx.Client(base_url=proxy.base_url) as client:
        for path, data in FILES.items():
            r = client.get(f"/g{path}")
            assert r.status_code == 200 and r.content == data
    refetched = {p for p in FILES if recorded.upstream.hits[p] > hits_before[p]}
    assert refetched == {"/dir/c.bin", "/d.tar.gz", "/a.txt"}


def test_verify_leaves_a_busy_entry_and_says_so(recorded: Recorded) -> None:
    recorded.blob("/d.tar.gz").unlink()
    cache = Cache(recorded.cache)
    with cache.locked("g", "d.tar.gz", "", timeout=1):
        report = verify(Cache(recorded.cache))
    assert [(p.kind, p.repaired) for p in report.problems] == [("missing-blob", False)]
    assert recorded.entry_file("/d.tar.gz").exists()


# -- prune -----------------------------------------------------------------------
def test_prune_by_size_goes_least_recently_used_first(
    recorded: Recorded, capsys: pytest.CaptureFixture[str], make_proxy: MakeProxy
) -> None:
    order = ["/dir/c.bin", "/a.txt", "/meta/index.json", "/d.tar.gz", "/dir/b.bin"]  # oldest first
    for i, path in enumerate(order):
        recorded.set_used(path, 10_000 - i * 100)
    # a hit through the proxy makes the oldest the most recently used
    proxy = make_proxy(generic(recorded.upstream.url), cache=recorded.cache)
    fetch_all(proxy.base_url, ["/dir/c.bin"])
    # keep c.bin (30000) + b.bin (10240): 40240 bytes; d.tar.gz (50000) does not fit
    limit = len(FILES["/dir/c.bin"]) + len(FILES["/dir/b.bin"]) + 100
    status, out, _ = cache_cmd(
        capsys, "prune", recorded.cache, "--max-size", str(limit), "--grace", "0", "--json"
    )
    assert status == 0
    report = json.loads(out)
    assert [e["path"] for e in report["entries_removed"]] == ["a.txt", "meta/index.json", "d.tar.gz"]
    assert report["blobs_removed"] == 3 and report["size_after"] <= limit
    assert report["bytes_freed"] == sum(len(FILES[p]) for p in ("/a.txt", "/meta/index.json", "/d.tar.gz"))
    assert sorted(p.name for p in (recorded.cache / "blobs").rglob("*") if p.is_file()) == sorted(
        sha(FILES[p]) for p in ("/dir/c.bin", "/dir/b.bin")
    )
    assert verify(Cache(recorded.cache)).ok


def test_prune_older_than_and_unreferenced_blobs(
    recorded: Recorded, capsys: pytest.CaptureFixture[str]
) -> None:
    recorded.set_used("/a.txt", 40 * 86400)
    recorded.set_used("/dir/b.bin", 31 * 86400)
    stray = Cache(recorded.cache).store_bytes(b"nobody names me")
    old = time.time() - 3600
    os.utime(Cache(recorded.cache).blob_path(stray), (old, old))
    status, out, _ = cache_cmd(capsys, "prune", recorded.cache, "--older-than", "30d", "--grace", "0")
    assert status == 0
    assert out.startswith("removed 2 entries and 3 blobs"), out
    assert not recorded.entry_file("/a.txt").exists() and not recorded.entry_file("/dir/b.bin").exists()
    assert not recorded.blob("/a.txt").exists() and not Cache(recorded.cache).blob_path(stray).exists()
    assert recorded.entry_file("/dir/c.bin").exists() and recorded.blob("/dir/c.bin").exists()


def test_prune_keeps_the_blobs_a_lock_names(
    recorded: Recorded, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from pytest_upstream.repro.lockfile import LockFile, LockFileEntry

    recorded.set_used("/a.txt", 40 * 86400)
    recorded.set_used("/dir/b.bin", 40 * 86400)
    lock = tmp_path / "upstream.lock"
    LockFile([LockFileEntry("g", "a.txt", "", sha(FILES["/a.txt"]), len(FILES["/a.txt"]), "artifact")]).save(
        lock
    )
    status, out, _ = cache_cmd(
        capsys, "prune", recorded.cache, "--older-than", "30d", "--grace", "0", "--keep-lock", str(lock)
    )
    assert status == 0, out
    assert not recorded.entry_file("/a.txt").exists()  # the index entry may go ...
    assert recorded.blob("/a.txt").exists()  # ... but a locked replay still finds the bytes
    assert not recorded.blob("/dir/b.bin").exists()


def test_prune_by_size_keeps_the_entries_of_pinned_blobs_and_says_what_holds_the_size(
    recorded: Recorded, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Removing an entry whose blob a lock pins frees nothing: it stays, and the note says why."""
    lock = tmp_path / "upstream.lock"
    LockFile(
        [LockFileEntry("g", p.lstrip("/"), "", sha(d), len(d), "artifact") for p, d in FILES.items()]
    ).save(lock)
    status, out, _ = cache_cmd(
        capsys, "prune", recorded.cache, "--max-size", "1K", "--grace", "0", "--keep-lock", str(lock)
    )
    assert status == 0, out
    assert all(recorded.entry_file(p).exists() for p in FILES)
    total = units.human_size(sum(map(len, FILES.values())))
    assert f"removed 0 entries and 0 blobs (0 B); {total} -> {total}" in out
    assert f"note: still above 1.0 KiB: {total} named by the --keep-lock files" in out
    assert "busy" not in out


def test_prune_removes_the_verification_markers_of_removed_blobs(recorded: Recorded) -> None:
    cache = Cache(recorded.cache)
    for path in FILES:
        assert (recorded.cache / "verified" / sha(FILES[path])[:2] / sha(FILES[path])).is_file()
    recorded.blob("/a.txt").unlink()  # removed by hand: its marker is an orphan
    report = prune(cache, older_than=0, grace=0)
    assert report.blobs_removed == 4
    assert [p for p in (recorded.cache / "verified").rglob("*") if p.is_file()] == []


def test_prune_keeps_blobs_written_within_the_grace_period(recorded: Recorded) -> None:
    fresh = Cache(recorded.cache).store_bytes(b"a fetch is about to index me")
    report = prune(Cache(recorded.cache), grace=60)
    assert report.blobs_removed == 0 and Cache(recorded.cache).blob_path(fresh).exists()


def test_prune_skips_an_entry_whose_lock_is_held(recorded: Recorded) -> None:
    holder = Cache(recorded.cache)
    with holder.locked("g", "dir/c.bin", "", timeout=1):
        report = prune(Cache(recorded.cache), older_than=0, grace=0)
    assert [(e.key, e.path) for e in report.busy] == [("g", "dir/c.bin")]
    assert len(report.removed) == 4
    assert recorded.entry_file("/dir/c.bin").exists() and recorded.blob("/dir/c.bin").exists()
    assert [p.name for p in (recorded.cache / "entries").rglob("*.json")] == [
        recorded.entry_file("/dir/c.bin").name
    ]


def test_size_and_age_arguments() -> None:
    assert units.parse_size("1024") == 1024
    assert units.parse_size("500M") == 500 * 1024**2
    assert units.parse_size("2G") == units.parse_size("2GiB") == 2 * 1024**3
    assert units.parse_size("1.5k") == 1536
    assert units.parse_age("30d") == 30 * 86400
    assert units.parse_age("12h") == 12 * 3600
    assert units.parse_age("90m") == 90 * 60
    assert units.parse_age("45") == 45
    for bad in ("", "-1", "2X", "M"):
        with pytest.raises(ValueError):
            units.parse_size(bad)
    with pytest.raises(ValueError):
        units.parse_age("3 days")


def test_prune_reports_a_bad_size(recorded: Recorded, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = cache_cmd(capsys, "prune", recorded.cache, "--max-size", "lots")
    assert status == 2 and "not a size: 'lots'" in err


# -- export ----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cache.tar", "cache.tgz"])
def test_export_is_deterministic(
    recorded: Recorded, capsys: pytest.CaptureFixture[str], tmp_path: Path, name: str
) -> None:
    first, second = tmp_path / "1" / name, tmp_path / "2" / name
    assert cache_cmd(capsys, "export", recorded.cache, str(first))[0] == 0
    # every file's times change, a hit bumps an entry, locks and temp files appear
    for p in recorded.cache.rglob("*"):
        t = random.uniform(1e9, 2e9)
        os.utime(p, (t, t))
    Cache(recorded.cache).lookup("g", "a.txt")
    with Cache(recorded.cache).locked("g", "x", "", timeout=1):
        (recorded.cache / "tmp" / "leftover.part").write_bytes(b"partial")
    assert cache_cmd(capsys, "export", recorded.cache, str(second))[0] == 0
    assert first.read_bytes() == second.read_bytes()
    assert first.read_bytes()[:2] == (b"\x1f\x8b" if name.endswith(".tgz") else b"VE")

    infos = members(first)
    names = [m.name for m in infos]
    files = [m.name for m in infos if m.isfile()]
    assert files == sorted(files)
    assert files == [
        "VERSION",
        *sorted(f"blobs/sha256/{sha(d)[:2]}/{sha(d)}" for d in FILES.values()),
        *sorted(recorded.entry_file(p).relative_to(recorded.cache).as_posix() for p in FILES),
    ]
    assert not any(n.startswith(("locks", "tmp")) for n in names)
    for m in infos:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.pax_headers) == (0, 0, 0, "", "", {})
        assert m.mode == (0o755 if m.isdir() else 0o644)
        assert m.isdir() or m.isfile()
    with tarfile.open(first, "r:*") as tar:
        for m in infos:
            if m.name.startswith("blobs/") and m.isfile():
                data = tar.extractfile(m)
                assert data is not None and sha(data.read()) == m.name.rsplit("/", 1)[1]


def test_export_refuses_a_corrupt_blob(recorded: Recorded, tmp_path: Path) -> None:
    blob = recorded.blob("/dir/b.bin")
    blob.write_bytes(b"\0" * blob.stat().st_size)
    with pytest.raises(CacheError, match="corrupt"):
        export_archive(Cache(recorded.cache), tmp_path / "x.tar")
    assert not (tmp_path / "x.tar").exists() and list(tmp_path.glob(".x.tar.*")) == []


def test_export_with_a_lock_holds_only_what_it_names(
    recorded: Recorded, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    cache = Cache(recorded.cache)
    chosen = ["/a.txt", "/meta/index.json"]
    lock = LockFile()
    for path in chosen:
        e = cache.lookup("g", path.lstrip("/"))
        assert e is not None
        lock.add(LockFileEntry(e.key, e.path, e.variant, e.sha256, e.size, e.kind))
    # a lock line whose index entry was replaced since: only the lock's blob goes
    old_bytes = b"the bytes the lock recorded"
    old = cache.store_bytes(old_bytes)
    lock.add(LockFileEntry("g", "dir/b.bin", "", old, len(old_bytes), "artifact"))
    lock.save(tmp_path / "upstream.lock")

    archive = tmp_path / "subset.tar.gz"
    status, out, _ = cache_cmd(
        capsys, "export", recorded.cache, str(archive), "--lock", str(tmp_path / "upstream.lock")
    )
    assert status == 0 and "exported the lock's blob only" in out
    files = [m.name for m in members(archive) if m.isfile()]
    assert files == [
        "VERSION",
        *sorted(f"blobs/sha256/{d[:2]}/{d}" for d in [*(sha(FILES[p]) for p in chosen), old]),
        *sorted(recorded.entry_file(p).relative_to(recorded.cache).as_posix() for p in chosen),
    ]

    # a lock naming bytes the cache does not have is an error, and nothing is written
    lock.add(LockFileEntry("g", "gone.bin", "", "f" * 64, 1, "artifact"))
    lock.save(tmp_path / "upstream.lock")
    status, _, err = cache_cmd(
        capsys, "export", recorded.cache, str(tmp_path / "no.tar"), "--lock", str(tmp_path / "upstream.lock")
    )
    assert status == 1 and "lacks 1 blob" in err and not (tmp_path / "no.tar").exists()


# -- import ----------------------------------------------------------------------
def test_import_into_an_empty_cache_replays_offline(
    recorded: Recorded, capsys: pytest.CaptureFixture[str], make_proxy: MakeProxy, tmp_path: Path
) -> None:
    archive = tmp_path / "cache.tgz"
    assert cache_cmd(capsys, "export", recorded.cache, str(archive))[0] == 0
    fresh = tmp_path / "ci-cache"
    status, out, _ = cache_cmd(capsys, "import", fresh, str(archive))
    assert status == 0 and "blobs 5 added" in out and "entries 5 added" in out
    assert tree(fresh) == tree(recorded.cache)
    assert list((fresh / "tmp").iterdir()) == []

    recorded.upstream.stop()  # offline from here on
    proxy = make_proxy(generic(recorded.upstream.url), cache=fresh, mode="replay")
    with httpx.Client(base_url=proxy.base_url) as client:
        for path, data in FILES.items():
            r = client.get(f"/g{path}")
            assert (r.status_code, r.headers["X-Upstream-Cache"], r.content) == (200, "hit", data)
        assert client.get("/g/never-recorded").status_code == 504

    # importing again changes nothing: every blob and entry is already there
    status, out, _ = cache_cmd(capsys, "import", fresh, str(archive))
    assert status == 0 and "blobs 0 added, 5 already there" in out and "5 kept" in out


def test_import_keeps_the_newer_entry(recorded: Recorded, tmp_path: Path) -> None:
    archive = tmp_path / "cache.tar"
    export_archive(Cache(recorded.cache), archive)
    target = Cache(tmp_path / "target")
    newer_bytes, older_bytes = b"newer index", b"older index"
    for data, when in ((newer_bytes, time.time() + 60), (older_bytes, 1.0)):
        path = "meta/index.json" if data == newer_bytes else "a.txt"
        target.store_entry(
            Entry("g", path, "", "http://upstream/x", target.store_bytes(data), len(data), "metadata", when)
        )
    report = import_archive(target, archive)
    assert (report.entries_added, report.entries_replaced, report.entries_kept) == (3, 1, 1)
    assert target.lookup("g", "meta/index.json").sha256 == sha(newer_bytes)  # type: ignore[union-attr]
    assert target.lookup("g", "a.txt").sha256 == sha(FILES["/a.txt"])  # type: ignore[union-attr]


def _tamper(src: Path, dest: Path, change: str) -> None:
    """Copy an exported archive with one bad member."""
    with tarfile.open(src) as tar_in, tarfile.open(dest, "w", format=tarfile.GNU_FORMAT) as tar_out:
        for m in tar_in.getmembers():
            data = tar_in.extractfile(m).read() if m.isfile() else None  # type: ignore[union-attr]
            if change == "blob" and data is not None and m.name.startswith("blobs/") and m.size > 1000:
                data = b"X" + data[1:]  # same name and size, other bytes
                change = "done"
            tar_out.addfile(m, io.BytesIO(data) if data is not None else None)
        extra = tarfile.TarInfo()
        if change == "dotdot":
            extra.name, extra.size = "entries/../../evil.txt", 4
            tar_out.addfile(extra, io.BytesIO(b"evil"))
        elif change == "symlink":
            extra.name, extra.type, extra.linkname = f"blobs/sha256/ab/{'ab' * 32}", tarfile.SYMTYPE, "/x"
            tar_out.addfile(extra)
        elif change == "device":
            extra.name, extra.type, extra.devmajor, extra.devminor = "VERSION2", tarfile.CHRTYPE, 1, 3
            tar_out.addfile(extra)
        elif change == "absolute":
            extra.name, extra.size = "/tmp/evil.txt", 4
            tar_out.addfile(extra, io.BytesIO(b"evil"))
        elif change == "locks":
            extra.name, extra.size = "locks/g/00/x.lock", 0
            tar_out.addfile(extra, io.BytesIO(b""))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("blob", "hash to"),
        ("dotdot", "'..'"),
        ("symlink", "is a symlink"),
        ("device", "not a regular file"),
        ("absolute", "absolute"),
        ("locks", "not part of a cache"),
        ("truncated", "not a readable tar archive"),
    ],
)
def test_import_refuses_a_tampered_archive(
    recorded: Recorded, capsys: pytest.CaptureFixture[str], tmp_path: Path, change: str, message: str
) -> None:
    good = tmp_path / "good.tar"
    export_archive(Cache(recorded.cache), good)
    bad = tmp_path / "bad" / "bad.tar"
    bad.parent.mkdir()
    if change == "truncated":
        bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    else:
        _tamper(good, bad, change)
    # the target already holds one entry; a merge of anything would show
    target = tmp_path / "target"
    partial = tmp_path / "partial.tar"
    lock = LockFile([LockFileEntry("g", "a.txt", "", sha(FILES["/a.txt"]), 600, "artifact")])
    export_archive(Cache(recorded.cache), partial, lock)
    import_archive(Cache(target), partial)
    before = tree(target)

    status, _, err = cache_cmd(capsys, "import", target, str(bad))
    assert status == 1 and "nothing imported" in err and message in err, err
    assert tree(target) == before
    assert list((target / "tmp").iterdir()) == []
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/evil.txt").exists()


def test_a_refused_import_into_a_missing_directory_creates_no_cache(
    recorded: Recorded, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    good = tmp_path / "good.tar"
    export_archive(Cache(recorded.cache), good)
    bad = tmp_path / "bad.tar"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    target = tmp_path / "new-cache"
    status, _, err = cache_cmd(capsys, "import", target, str(bad))
    assert status == 1 and "nothing imported" in err
    assert not target.exists()
    status, out, _ = cache_cmd(capsys, "import", target, str(good))
    assert status == 0 and "blobs 5 added" in out and (target / "VERSION").is_file()


# -- all of it while proxies use the cache ---------------------------------------
def test_prune_and_verify_while_eight_threads_fetch(
    upstream: Upstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    rng = random.Random(5)
    files = {f"/f{i}.bin": rng.randbytes(rng.randint(1, 200_000)) for i in range(24)}
    files.update({f"/meta/m{i}.json": f'{{"n": {i}}}'.encode() for i in range(4)})  # revalidated every time
    hot = [p for p in files if p not in ("/f0.bin", "/f1.bin", "/f2.bin", "/f3.bin")][:-6]
    warm = [p for p in files if p not in hot][4:]  # asked for now and then; f0-f3 never again
    upstream.files.update(files)
    cache = tmp_path / "cache"
    definition = proxy_def(
        key="g", format="generic", url=upstream.url, mutable_paths=["meta/*"], metadata_ttl=0
    )
    record = make_proxy(definition, cache=cache)
    replay = make_proxy(definition, cache=cache, mode="replay")
    fetch_all(record.base_url, list(files))
    total = sum(map(len, files.values()))

    stop = threading.Event()
    errors: list[str] = []
    counts = {"ok": 0, "replay-miss": 0, "miss": 0}
    counts_lock = threading.Lock()

    def client(n: int) -> None:
        base = replay.base_url if n < 2 else record.base_url
        local = random.Random(n)
        with httpx.Client(base_url=base, timeout=30) as c:
            while not stop.is_set():
                path = local.choice(warm) if local.random() < 0.05 else local.choice(hot)
                try:
                    r = c.get(f"/g{path}")
                except httpx.HTTPError as exc:
                    errors.append(f"{base}{path}: {type(exc).__name__}: {exc}")
                    continue
                if r.status_code == 200 and r.content == files[path]:
                    kind = "miss" if r.headers.get("X-Upstream-Cache") == "miss" else "ok"
                elif n < 2 and r.status_code == 504 and "replay mode" in r.text:
                    kind = "replay-miss"
                else:
                    errors.append(f"{base}{path}: {r.status_code} {r.text[:200]!r} ({len(r.content)} bytes)")
                    continue
                with counts_lock:
                    counts[kind] += 1

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(8)]
    for t in threads:
        t.start()
    reports = []
    verified = []
    try:
        for _ in range(3):
            time.sleep(0.3)
            reports.append(prune(Cache(cache), max_size=total // 3, grace=0.5))
            verified.append(verify(Cache(cache)))
            reports.append(prune(Cache(cache), older_than=0, grace=0.5))
            verified.append(verify(Cache(cache)))
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert errors == []
    assert [v.problems for v in verified] == [[]] * len(verified)
    assert sum(len(r.removed) for r in reports) > 20 and sum(r.blobs_removed for r in reports) >= 4
    assert counts["ok"] > 100 and counts["miss"] > 10 and counts["replay-miss"] > 0, counts
    assert verify(Cache(cache)).ok
