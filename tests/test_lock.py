"""Lock files: record writes what was served, replay serves exactly that.

The fast tests drive the engine against ``tests.upstreams.Upstream`` and the
plugin through pytester; the slow one is the whole story with real pip and
pypiserver: record with a lock, a newer release appears upstream, a second
project sharing the cache takes it, the first project's replay still installs
the recorded bytes, and refresh moves its lock on.
"""

from __future__ import annotations

import hashlib
import json
import textwrap
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fixtures.build_wheels import Dist
from pytest_upstream.cli.main import main as cli_main
from pytest_upstream.config.settings import ConfigError, Settings, parse_table
from pytest_upstream.repro.lock_tools import write_lock
from pytest_upstream.repro.lockfile import LockError, LockFile, LockFileEntry
from pytest_upstream.server.proxy_server import ProxyServer

from .conftest import proxy_def
from .peers import pypiserver, serve_process
from .pip_setup import importable_in_subprocesses, installed, pip_env, pip_install, publish, pypi_project
from .upstreams import Upstream

Serve = Callable[..., ProxyServer]


@pytest.fixture
def serve(tmp_path: Path, upstream: Upstream) -> Iterator[Serve]:
    """``serve(mode, lock=None)``: a proxy on the shared cache ``tmp_path/cache`` with keys g and m."""
    started: list[ProxyServer] = []

    def make(mode: str = "record", lock: Path | None = None) -> ProxyServer:
        settings = Settings(
            cache_dir=tmp_path / "cache",
            mode=mode,
            proxies=(
                proxy_def(key="g", format="generic", url=upstream.url + "/files", mutable_paths=["*.json"]),
                proxy_def(key="m", format="maven", url=upstream.url + "/repo/"),
            ),
            lock_timeout=30.0,
            lock_file=lock,
        )
        server = ProxyServer(settings).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


def get(server: ProxyServer, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(server.base_url + path, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_replay_with_a_lock_serves_the_locked_bytes_whatever_the_index_says(
    serve: Serve, upstream: Upstream, tmp_path: Path
) -> None:
    upstream.files["/files/a.bin"] = b"A" * 100
    upstream.files["/files/meta.json"] = b'{"v": 1}'
    record = serve("record")
    assert get(record, "/g/a.bin") == (200, b"A" * 100)
    assert get(record, "/g/meta.json") == (200, b'{"v": 1}')
    lock = record.engine.recorded_lock()
    assert [(e.key, e.path, e.variant, e.sha256, e.size, e.kind) for e in lock] == [
        ("g", "a.bin", "", sha(b"A" * 100), 100, "artifact"),
        ("g", "meta.json", "", sha(b'{"v": 1}'), 8, "metadata"),
    ]
    lock_file = tmp_path / "upstream.lock"
    lock.save(lock_file)

    # another project on the same cache refreshes meta.json and fetches something new
    upstream.files["/files/meta.json"] = b'{"v": 2}'
    upstream.files["/files/new.bin"] = b"new"
    other = serve("refresh")
    assert get(other, "/g/meta.json") == (200, b'{"v": 2}')
    assert get(other, "/g/new.bin") == (200, b"new")
    upstream.stop()

    replay = serve("replay", lock=lock_file)
    assert get(replay, "/g/meta.json") == (200, b'{"v": 1}')  # the locked bytes, not the index's
    assert get(replay, "/g/a.bin") == (200, b"A" * 100)
    status, body = get(replay, "/g/new.bin")  # in the cache, but not in the lock
    assert status == 504
    assert f"(g new.bin) is not in the lock file {lock_file}" in body.decode()
    assert [r.cache for r in replay.served.records] == ["hit", "hit", "miss"]
    # without the lock, replay serves what the shared index holds now
    assert get(serve("replay"), "/g/meta.json") == (200, b'{"v": 2}')


def test_a_format_s_own_lookups_and_remembered_404s_are_locked(
    serve: Serve, upstream: Upstream, tmp_path: Path
) -> None:
    """Maven checks a jar against its .sha1 first; the upstream has none, and that 404 is locked too."""
    jar = b"PK\x03\x04 a jar" * 20
    upstream.files["/repo/org/example/demo/1.0/demo-1.0.jar"] = jar
    record = serve("record")
    assert get(record, "/m/org/example/demo/1.0/demo-1.0.jar") == (200, jar)
    lock = record.engine.recorded_lock()
    assert {(e.path, e.kind) for e in lock} == {
        ("org/example/demo/1.0/demo-1.0.jar", "artifact"),
        ("org/example/demo/1.0/demo-1.0.jar.sha1", "notfound"),
    }
    lock_file = tmp_path / "upstream.lock"
    lock.save(lock_file)
    upstream.stop()
    replay = serve("replay", lock=lock_file)
    assert get(replay, "/m/org/example/demo/1.0/demo-1.0.jar") == (200, jar)
    status, body = get(replay, "/m/org/example/demo/1.0/demo-1.0.jar.sha1")
    assert status == 404 and f"locked in {lock_file}" in body.decode()


def test_lock_verify_and_a_replay_whose_blob_is_gone(
    serve: Serve, upstream: Upstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    upstream.files["/files/a.bin"] = b"A" * 100
    upstream.files["/files/b.bin"] = b"B" * 100
    record = serve("record")
    get(record, "/g/a.bin")
    get(record, "/g/b.bin")
    lock_file = tmp_path / "upstream.lock"
    record.engine.recorded_lock().save(lock_file)
    cache = tmp_path / "cache"
    args = ["lock", "verify", "--lock", str(lock_file), "--cache", str(cache)]
    assert cli_main(args) == 0
    assert "all 2 entries present and intact" in capsys.readouterr().out

    blob_a = cache / "blobs" / "sha256" / sha(b"A" * 100)[:2] / sha(b"A" * 100)
    blob_b = cache / "blobs" / "sha256" / sha(b"B" * 100)[:2] / sha(b"B" * 100)
    blob_a.unlink()
    blob_b.write_bytes(b"C" * 100)  # same size, other bytes
    assert cli_main(args) == 1
    out, err = capsys.readouterr()
    assert f"missing: g a.bin sha256 {sha(b'A' * 100)} (100 bytes)" in out
    assert (
        f"corrupt: g b.bin sha256 {sha(b'B' * 100)} (100 bytes): the blob hashes to {sha(b'C' * 100)}" in out
    )
    assert "2 of 2 entries missing or corrupt" in err
    assert blob_b.read_bytes() == b"C" * 100  # verify only reads

    replay = serve("replay", lock=lock_file)
    status, body = get(replay, "/g/a.bin")
    assert status == 504 and "upstream-proxy lock verify" in body.decode()
    assert get(replay, "/g/b.bin")[0] == 504  # a corrupt blob is never served (and is removed)
    assert not blob_b.exists()


def test_a_lock_claiming_a_wrong_size_leaves_the_valid_blob_and_cache_verify_passes(
    serve: Serve, upstream: Upstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A hand-edited lock whose size is off by one is a wrong lock, not a damaged blob."""
    upstream.files["/files/a.bin"] = b"A" * 100
    record = serve("record")
    get(record, "/g/a.bin")
    lock = record.engine.recorded_lock()
    (entry,) = list(lock)
    lock_file = tmp_path / "upstream.lock"
    LockFile([LockFileEntry(**{**entry.__dict__, "size": entry.size + 1})]).save(lock_file)
    cache = tmp_path / "cache"
    blob = cache / "blobs" / "sha256" / sha(b"A" * 100)[:2] / sha(b"A" * 100)

    upstream.stop()
    replay = serve("replay", lock=lock_file)
    status, body = get(replay, "/g/a.bin")
    assert status == 504
    assert b"says 101 bytes, the blob " in body and b"has 100 (and is intact)" in body  # the claim is named
    assert blob.read_bytes() == b"A" * 100  # the shared cache keeps the valid bytes

    assert cli_main(["lock", "verify", "--lock", str(lock_file), "--cache", str(cache)]) == 1
    out = capsys.readouterr().out
    assert "the lock file says 101 bytes, the blob has 100 bytes (the blob is intact" in out
    assert cli_main(["cache", "verify", "--cache", str(cache)]) == 0
    assert capsys.readouterr().out.rstrip().endswith(": ok")
    assert get(serve("replay"), "/g/a.bin") == (200, b"A" * 100)  # the index still serves it


def test_lock_configuration(tmp_path: Path) -> None:
    settings = parse_table({"lock": "locks/upstream.lock"}, "pyproject.toml", tmp_path)
    assert settings.lock_file == tmp_path / "locks" / "upstream.lock"
    assert settings.with_overrides(lock="/elsewhere.lock").lock_file == Path("/elsewhere.lock")
    with pytest.raises(ConfigError, match=r"lock must be a path string \(got 3\)"):
        parse_table({"lock": 3}, "pyproject.toml", tmp_path)
    missing = Settings(cache_dir=tmp_path / "cache", mode="replay", lock_file=tmp_path / "nope.lock")
    with pytest.raises(LockError, match=r"nope\.lock: lock file not found; run in record mode to write it"):
        ProxyServer(missing)
    # record and refresh may start without one: they write it
    ProxyServer(Settings(cache_dir=tmp_path / "cache", lock_file=tmp_path / "nope.lock")).stop()


def test_lock_bytes_are_deterministic() -> None:
    entries = [
        LockFileEntry("g", "b", "", "b" * 64, 2, "artifact"),
        LockFileEntry("g", "a", "", "a" * 64, 1, "metadata"),
    ]
    assert LockFile(entries).dumps() == LockFile(reversed(entries)).dumps()
    first = LockFile(entries).dumps().splitlines()[1]
    assert first.startswith('  {"content_type":null,"headers":[],"key":"g","kind":"metadata","path":"a"')


def test_lock_keeps_the_upstream_headers_for_a_locked_replay(tmp_path: Path) -> None:
    entry = LockFileEntry(
        "hub",
        "library/a/manifests/1",
        "accept",
        "d" * 64,
        10,
        "metadata",
        content_type="application/vnd.oci.image.index.v1+json",
        headers=(("Docker-Content-Digest", "sha256:" + "d" * 64),),
    )
    path = tmp_path / "upstream.lock"
    LockFile([entry]).save(path)
    assert list(LockFile.load(path)) == [entry]


def test_writing_a_lock_rewrites_it_and_says_what_changed(tmp_path: Path) -> None:
    a = LockFileEntry("g", "a", "", "a" * 64, 1, "artifact")
    b1 = LockFileEntry("g", "b", "", "1" * 64, 1, "metadata")
    b2 = LockFileEntry("g", "b", "", "2" * 64, 1, "metadata")
    c = LockFileEntry("g", "c", "", "c" * 64, 1, "artifact")
    path = tmp_path / "upstream.lock"
    assert write_lock(path, LockFile([a, b1])) == f"{path} (2 entries: 2 added, 0 changed, 0 removed)"
    assert write_lock(path, LockFile([b2, c])) == f"{path} (2 entries: 1 added, 1 changed, 1 removed)"
    one = path.with_name("one.lock")
    assert write_lock(one, LockFile([c])) == f"{one} (1 entry: 1 added, 0 changed, 0 removed)"
    assert list(LockFile.load(path)) == [b2, c]  # exactly what the run served


# -- through the plugin -------------------------------------------------------------------
INNER = """
import urllib.request, urllib.error, pytest

def get(upstream_proxy, name):
    with urllib.request.urlopen(upstream_proxy.url("g") + name) as r:
        return r.read()

@pytest.mark.parametrize("n", range(3))
def test_fetch(upstream_proxy, n):
    assert get(upstream_proxy, "a.bin") == b"A" * 1000
    assert get(upstream_proxy, f"f{n}.bin") == b"%d" % n * 100
    assert get(upstream_proxy, "meta.json") == b'{"v": 1}'
"""

NOT_LOCKED = """
def test_not_locked(upstream_proxy):
    with pytest.raises(urllib.error.HTTPError) as info:
        get(upstream_proxy, "new.bin")
    assert info.value.code == 504 and "is not in the lock file" in info.value.read().decode()
"""


def test_plugin_writes_one_deterministic_lock_and_replays_it(
    pytester: pytest.Pytester, upstream: Upstream
) -> None:
    upstream.files["/files/a.bin"] = b"A" * 1000
    for n in range(3):
        upstream.files[f"/files/f{n}.bin"] = b"%d" % n * 100
    upstream.files["/files/meta.json"] = b'{"v": 1}'
    (pytester.path / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""
            [tool.pytest-upstream]
            cache = "cache-dir"
            lock = "upstream.lock"
            [[tool.pytest-upstream.proxy]]
            key = "g"
            source = "custom"
            format = "generic"
            url = "{upstream.url}/files"
            mutable_paths = ["*.json"]
            """
        )
    )
    pytester.makepyfile(test_inner=INNER)
    lock_file = pytester.path / "upstream.lock"
    first = pytester.runpytest_subprocess("--upstream-proxy", "-p", "no:cacheprovider")
    first.assert_outcomes(passed=3)
    first.stdout.fnmatch_lines([f"lock file written: {lock_file} (5 entries: 5 added, 0 changed, 0 removed)"])
    recorded = lock_file.read_bytes()
    assert [e["path"] for e in json.loads(recorded)["entries"]] == [
        "a.bin",
        "f0.bin",
        "f1.bin",
        "f2.bin",
        "meta.json",
    ]
    # the same session again, and under xdist (entries combined on the controller): the same bytes
    pytester.runpytest_subprocess("--upstream-proxy", "-p", "no:cacheprovider").assert_outcomes(passed=3)
    assert lock_file.read_bytes() == recorded
    lock_file.unlink()
    xdist = pytester.runpytest_subprocess("--upstream-proxy", "-n", "2", "-p", "no:cacheprovider")
    xdist.assert_outcomes(passed=3)
    assert lock_file.read_bytes() == recorded

    # another project refreshes the shared cache: meta.json moves on, new.bin arrives
    upstream.files["/files/meta.json"] = b'{"v": 2}'
    upstream.files["/files/new.bin"] = b"new"
    settings = Settings(
        cache_dir=pytester.path / "cache-dir",
        mode="refresh",
        proxies=(
            proxy_def(key="g", format="generic", url=upstream.url + "/files", mutable_paths=["*.json"]),
        ),
    )
    with ProxyServer(settings) as other:
        assert get(other, "/g/meta.json") == (200, b'{"v": 2}')
        assert get(other, "/g/new.bin") == (200, b"new")
    upstream.stop()

    pytester.makepyfile(test_inner=INNER + NOT_LOCKED)
    replay = pytester.runpytest_subprocess(
        "--upstream-proxy", "--upstream-mode=replay", "-p", "no:cacheprovider"
    )
    replay.assert_outcomes(passed=4)  # meta.json is v1: the locked bytes
    assert replay.ret == pytest.ExitCode.TESTS_FAILED  # the unlocked request fails the run
    replay.stdout.fnmatch_lines(["replay misses (1):*", "*test_not_locked: g */files/new.bin"])
    assert lock_file.read_bytes() == recorded  # replay never writes the lock


# -- the whole story with pip -------------------------------------------------------------
PIP_TEST = """
import os

from tests.pip_setup import pip_env, pip_install

def test_install(upstream_proxy):
    if upstream_proxy.mode == "replay":  # the network is blocked by default; pip must not mind
        assert os.environ["HTTP_PROXY"] == upstream_proxy.base_url
    env = pip_env(os.environ["PIP_INDEX_URL"])
    result = pip_install(os.environ["DEMO_TARGET"], "upstream-demo-a", env=env)
    assert result.returncode == 0, result.stderr
"""


@pytest.mark.slow
def test_replay_installs_the_locked_release_after_a_newer_one_is_published(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, cache = tmp_path / "upstream-files", tmp_path / "shared-cache"
    publish(out)
    importable_in_subprocesses(monkeypatch)
    b1 = (out / "files" / "upstream_demo_b-1.0-py3-none-any.whl").read_bytes()
    pytester.makepyfile(test_pip=PIP_TEST)
    lock_file = pytester.path / "upstream.lock"
    run = ("--upstream-proxy", "-p", "no:cacheprovider")

    with pypiserver(out / "files") as index_url:
        pypi_project(pytester.path / "pyproject.toml", index_url, cache, lock="upstream.lock")
        monkeypatch.setenv("DEMO_TARGET", str(tmp_path / "t-record"))
        pytester.runpytest_subprocess(*run).assert_outcomes(passed=1)
        recorded = lock_file.read_text()
        entries = {e["path"]: e for e in json.loads(recorded)["entries"]}
        assert sorted(entries) == [
            "files/upstream-demo-a/upstream_demo_a-1.0-py3-none-any.whl",
            "files/upstream-demo-b/upstream_demo_b-1.0-py3-none-any.whl",
            "simple/upstream-demo-a/",
            "simple/upstream-demo-b/",
        ]
        wheel_b = entries["files/upstream-demo-b/upstream_demo_b-1.0-py3-none-any.whl"]
        assert (wheel_b["sha256"], wheel_b["size"]) == (sha(b1), len(b1))

        # upstream-demo-b 2.0 is published; a second project on the same cache refreshes and gets it
        publish(out, Dist("upstream-demo-b", "2.0", code="VALUE = 'b-2.0'\n"))
        other = tmp_path / "other"
        other.mkdir()
        pypi_project(other / "pyproject.toml", index_url, cache, lock="upstream.lock")
        with serve_process(other / "pyproject.toml", "--mode", "refresh") as base:
            result = pip_install(
                tmp_path / "t-other", "upstream-demo-b", env=pip_env(f"{base}/local/simple/")
            )
            assert result.returncode == 0, result.stderr
        assert "b-2.0" in (tmp_path / "t-other" / "upstream_demo_b" / "__init__.py").read_text()
        assert (other / "upstream.lock").is_file()  # its own lock, written at shutdown

    # upstream stopped: the first project's replay installs what its lock names, byte for byte
    monkeypatch.setenv("DEMO_TARGET", str(tmp_path / "t-replay"))
    pytester.runpytest_subprocess(*run, "--upstream-mode", "replay").assert_outcomes(passed=1)
    assert installed(tmp_path / "t-replay") == installed(tmp_path / "t-record")
    assert "b-1.0" in (tmp_path / "t-replay" / "upstream_demo_b" / "__init__.py").read_text()
    assert lock_file.read_text() == recorded
    assert cli_main(["--config", str(pytester.path / "pyproject.toml"), "lock", "verify"]) == 0

    # refresh picks the new release up and rewrites the lock
    with pypiserver(out / "files") as index_url:
        pypi_project(pytester.path / "pyproject.toml", index_url, cache, lock="upstream.lock")
        monkeypatch.setenv("DEMO_TARGET", str(tmp_path / "t-refresh"))
        pytester.runpytest_subprocess(*run, "--upstream-mode", "refresh").assert_outcomes(passed=1)
    assert "b-2.0" in (tmp_path / "t-refresh" / "upstream_demo_b" / "__init__.py").read_text()
    refreshed = lock_file.read_text()
    assert "upstream_demo_b-2.0-py3-none-any.whl" in refreshed
    assert "upstream_demo_b-1.0-py3-none-any.whl" not in refreshed


def test_locked_replay_answers_with_the_recorded_content_type_after_the_index_moved(
    upstream: Upstream, tmp_path: Path
) -> None:
    upstream.files["/a.bin"] = b"recorded"
    upstream.content_types["/a.bin"] = "application/x-recorded"
    cache, lock_path = tmp_path / "cache", tmp_path / "upstream.lock"
    proxy = proxy_def(key="g", format="generic", url=upstream.url)
    with ProxyServer(Settings(cache_dir=cache, proxies=(proxy,))) as rec:
        urllib.request.urlopen(rec.url("g") + "a.bin").read()
        write_lock(lock_path, rec.engine.recorded_lock())
    for entry_file in (cache / "entries").rglob("*.json"):
        entry_file.unlink()  # another project's refresh moved the index on; the blob stays
    settings = Settings(cache_dir=cache, mode="replay", proxies=(proxy,), lock_file=lock_path)
    with ProxyServer(settings) as rep, urllib.request.urlopen(rep.url("g") + "a.bin") as r:
        assert (r.read(), r.headers["Content-Type"]) == (b"recorded", "application/x-recorded")


def test_workers_lock_entries_with_headers_combine_like_loaded_ones() -> None:
    from pytest_upstream.repro.lock_tools import combined_lock

    entry = LockFileEntry(
        "hub", "a/manifests/1", "", "e" * 64, 3, "metadata", "x/y", (("Docker-Content-Digest", "d"),)
    )
    as_sent = {**entry.__dict__, "headers": [["Docker-Content-Digest", "d"]]}  # lists after transport
    assert list(combined_lock([{"worker": "gw1", "lock": [as_sent]}])) == [entry]
