"""``serve`` as an operator runs it for weeks: the banner names the URL each client needs, the log
is one line per request (JSON with ``--log-format json``), a worker that dies is restarted and
reported, and what it remembers stays bounded (served log, render memo, docker tokens)."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_upstream.cli.workers import describe_exit
from pytest_upstream.engine.render import RenderMemo
from pytest_upstream.formats import get_format
from pytest_upstream.formats.base import Kind, Resource
from pytest_upstream.formats.docker import DockerFormat
from pytest_upstream.repro.served import ServedLog, ServedRecord
from pytest_upstream.store.cache import Entry

from .conftest import MakeProxy
from .oci import http
from .pip_setup import pip_env, pip_install
from .upstreams import FakeRegistry, Upstream


class Serve:
    """``upstream-proxy serve`` in a child process; stdout's banner and stderr's log lines read."""

    def __init__(self, config: Path, cache: Path, *args: str) -> None:
        env = {**os.environ, "UPSTREAM_PROXY_CACHE": str(cache)}
        env.pop("UPSTREAM_PROXY_MODE", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pytest_upstream", "--config", str(config), "serve", "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        self._buffers: dict[int, bytes] = {}
        self.banner = [self.line(self.proc.stdout)]
        assert self.banner[0].startswith("http://"), self.banner
        self.base_url = self.banner[0]
        while not (line := self.line(self.proc.stdout)).startswith("  cache "):
            self.banner.append(line)

    def line(self, stream: object, timeout: float = 20.0) -> str:
        """The next line of ``stream`` (select on the descriptor, buffer here: a text wrapper's
        own buffer would hide lines from select)."""
        fd = stream.fileno()  # type: ignore[attr-defined]
        buffered = self._buffers.setdefault(fd, b"")
        deadline = time.monotonic() + timeout
        while b"\n" not in buffered:
            ready, _, _ = select.select([fd], [], [], max(deadline - time.monotonic(), 0))
            chunk = os.read(fd, 65536) if ready else b""
            if not chunk:
                self.stop()
                raise AssertionError(f"serve printed no further line in time (got {buffered!r})")
            buffered += chunk
        line, _, self._buffers[fd] = buffered.partition(b"\n")
        return line.decode()

    def log_until(self, predicate: object, timeout: float = 20.0) -> list[str]:
        """stderr lines up to and including the first for which ``predicate`` holds."""
        assert callable(predicate)
        lines: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.line(self.proc.stderr, deadline - time.monotonic())
            lines.append(line)
            if predicate(line):
                return lines
        raise AssertionError(f"no such log line in {lines}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)


@pytest.fixture
def config(tmp_path: Path, upstream: Upstream) -> Path:
    upstream.files["/a.bin"] = b"a" * 100
    path = tmp_path / "pyproject.toml"
    path.write_text(
        "[[tool.pytest-upstream.proxy]]\n"
        'key = "g"\nsource = "custom"\nformat = "generic"\n'
        f'url = "{upstream.url}"\n'
        '[[tool.pytest-upstream.proxy]]\nkey = "py"\nsource = "pypi"\n'
        '[[tool.pytest-upstream.proxy]]\nkey = "js"\nsource = "npm"\n'
        '[[tool.pytest-upstream.proxy]]\nkey = "hub"\nsource = "dockerhub"\n'
        '[[tool.pytest-upstream.proxy]]\nkey = "mvn"\nsource = "maven-central"\n'
        '[[tool.pytest-upstream.group]]\nkey = "pyall"\nmembers = ["py"]\n'
    )
    return path


@pytest.fixture
def serve(config: Path, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Serve]:
    args = getattr(request, "param", ())
    server = Serve(config, tmp_path / "cache", *args)
    yield server
    server.stop()


def test_banner_prints_the_url_each_client_needs(serve: Serve) -> None:
    base, hostport = serve.base_url, serve.base_url.removeprefix("http://")
    where = {line.split()[0]: line.split()[2] for line in serve.banner[1:]}
    assert where == {
        "g": f"{base}/g/",
        "py": f"{base}/py/simple/",
        "js": f"{base}/js/",
        "hub": f"{hostport}/hub/<image>",
        "mvn": f"{base}/mvn/",
        "pyall": f"{base}/pyall/simple/",
    }
    (group,) = [line for line in serve.banner if line.split()[0] == "pyall"]
    assert group.split()[1:] == ["pypi", f"{base}/pyall/simple/", "->", "py"]


def test_serve_logs_an_access_line_per_request_by_default(serve: Serve) -> None:
    assert urllib.request.urlopen(f"{serve.base_url}/g/a.bin", timeout=20).read() == b"a" * 100
    lines = serve.log_until(lambda line: "/g/a.bin" in line)
    assert lines[-1].endswith(
        " INFO GET /g/a.bin 200 miss 100B " + lines[-1].split()[-3] + " key=g client=127.0.0.1"
    )
    assert not any("Traceback" in line or "httpcore" in line for line in lines)


@pytest.mark.parametrize("serve", [("--log-format", "json", "-v")], indirect=True)
def test_json_log_format_writes_one_object_per_line(serve: Serve) -> None:
    urllib.request.urlopen(f"{serve.base_url}/g/a.bin", timeout=20).read()
    urllib.request.urlopen(f"{serve.base_url}/g/a.bin", timeout=20).read()
    lines = serve.log_until(lambda line: '"cache": "hit"' in line)
    if not any('"cache": "miss"' in line for line in lines):
        # The miss's worker thread logs once its download is wrapped up; the second request's
        # hit, answered at once by the event loop, may be logged first.
        lines += serve.log_until(lambda line: '"cache": "miss"' in line)
    objects = [json.loads(line) for line in lines]  # every line is JSON, debug ones included
    access = [o for o in objects if o["logger"] == "pytest_upstream.access"]
    assert sorted(
        (o["method"], o["target"], o["status"], o["cache"], o["bytes"], o["key"]) for o in access
    ) == [
        ("GET", "/g/a.bin", 200, "hit", 100, "g"),
        ("GET", "/g/a.bin", 200, "miss", 100, "g"),
    ]
    assert not any(o["logger"].startswith(("httpcore", "httpx", "filelock")) for o in objects)


def _children(pid: int) -> set[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return {int(p) for p in found.split()}


@pytest.mark.parametrize("serve", [("--workers", "2")], indirect=True)
def test_a_worker_that_dies_is_restarted_and_reported(serve: Serve) -> None:
    serve.log_until(lambda line: "started 2 workers" in line)
    workers = _children(serve.proc.pid)
    assert len(workers) == 2
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    lines = serve.log_until(lambda line: "started in place of" in line)
    assert any(
        f"WARNING worker {victim} was killed by SIGKILL" in line and "restarting" in line for line in lines
    )
    deadline = time.monotonic() + 10
    while len(now := _children(serve.proc.pid)) != 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(now) == 2 and victim not in now
    for _ in range(4):  # both workers answer
        assert urllib.request.urlopen(f"{serve.base_url}/g/a.bin", timeout=20).status == 200


def test_describe_exit() -> None:
    assert describe_exit(3 << 8) == "exited with status 3"
    assert describe_exit(signal.SIGKILL) == "was killed by SIGKILL"


def _record(n: int, cache: str = "hit") -> ServedRecord:
    return ServedRecord(key="g", path=f"p{n}", cache=cache, status=200, size=10)


def test_the_served_log_of_serve_is_a_ring_with_running_totals() -> None:
    log = ServedLog(limit=3)
    for n in range(5):
        log.add(_record(n))
        log.upstream_fetch(f"u{n}")
    mark = log.mark()
    log.add(_record(5, "miss"))
    assert [r.path for r in log.records] == ["p3", "p4", "p5"]
    assert log.fetches == ["u2", "u3", "u4"]
    assert [r.path for r in log.since(mark)[0]] == ["p5"]
    assert [r.path for r in log.since((0, 0))[0]] == ["p3", "p4", "p5"]  # what the ring still holds
    stats = log.stats()
    assert (stats.requests, stats.hits, stats.misses, stats.bytes_cache, stats.upstream_fetches) == (
        6,
        5,
        1,
        50,
        5,
    )
    with pytest.raises(ValueError):
        ServedLog(limit=0)


def test_the_fixtures_served_log_keeps_everything() -> None:
    log = ServedLog()
    for n in range(20_001):
        log.add(_record(n))
    assert len(log.records) == 20_001 and log.stats().requests == 20_001


def test_the_render_memo_is_bounded_by_bytes(tmp_path: Path) -> None:
    pypi = get_format("pypi")
    assert pypi is not None
    page = b'<html><body><a href="x-1.0.tar.gz#sha256=' + b"0" * 64 + b'">x-1.0.tar.gz</a>' + b" " * 3000
    memo = RenderMemo(budget=3_000)
    for n in range(30):
        blob = tmp_path / f"b{n}"
        blob.write_bytes(page)
        entry = Entry(
            key="py",
            path=f"simple/p{n}/",
            variant="",
            upstream_url="u",
            sha256=f"{n:064x}",
            size=len(page),
            kind="metadata",
            fetched_at=0.0,
        )
        res = Resource(f"simple/p{n}/", "u", Kind.METADATA, render_as="html")
        rendered = memo.render("py", pypi, res, entry, blob)
        assert rendered is not None
        assert memo.held <= 3_000
    assert memo.held > 3_000 - len(rendered[0])  # it keeps renders up to the budget
    huge = RenderMemo(budget=4 * len(rendered[0]) - 1)  # a render over a quarter of the budget is not kept
    assert huge.render("py", pypi, res, entry, blob) is not None and huge.held == 0


def test_the_docker_token_cache_is_bounded(make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    from .test_docker import MANIFEST, OCI_MANIFEST, docker_proxy, v2

    docker = get_format("docker")
    assert isinstance(docker, DockerFormat)
    monkeypatch.setattr(docker._tokens, "_limit", 2)  # the shared format instance: restored after
    with FakeRegistry(auth="token") as fake:
        for name in ("a", "b", "c"):
            fake.add_manifest(f"demo/{name}", "v1", (OCI_MANIFEST, MANIFEST))
        proxy = make_proxy(docker_proxy(fake.url, metadata_ttl=0))
        for name in ("a", "b", "c"):
            assert http(v2(proxy, f"oci/demo/{name}/manifests/v1"))[0] == 200
        assert len(docker._tokens) <= 2
        asked = len(fake.token_requests)
        assert http(v2(proxy, "oci/demo/c/manifests/v1"))[0] == 200  # still cached
        assert len(fake.token_requests) == asked
        assert http(v2(proxy, "oci/demo/a/manifests/v1"))[0] == 200  # the oldest went
        assert len(fake.token_requests) == asked + 1


def _uv() -> str:
    try:
        import uv  # type: ignore[import-not-found, unused-ignore]

        return str(uv.find_uv_bin())
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
        if found is None:
            pytest.skip("uv is not installed (it is in the test extras)")
        return found


def test_pip_and_uv_show_why_a_replay_miss_failed(tmp_path: Path) -> None:
    """What a newcomer sees: both print the status line, so the reason phrase is the message."""
    config = tmp_path / "pyproject.toml"
    config.write_text(
        '[tool.pytest-upstream]\nmode = "replay"\n'
        '[[tool.pytest-upstream.proxy]]\nkey = "py"\nsource = "custom"\nformat = "pypi"\n'
        'url = "http://127.0.0.1:9/simple/"\n'
    )
    serve = Serve(config, tmp_path / "cache")
    try:
        wheel = f"{serve.base_url}/py/files/iniconfig/iniconfig-2.0.0-py3-none-any.whl"
        env = pip_env(f"{serve.base_url}/py/simple/")
        pip = pip_install(tmp_path / "t", wheel, env=env)
        assert pip.returncode != 0
        assert "504 Server Error: Not recorded (replay mode)" in pip.stdout + pip.stderr, pip.stderr
        uv = subprocess.run(
            [
                _uv(),
                "pip",
                "install",
                "--python",
                sys.executable,
                "--target",
                str(tmp_path / "u"),
                "--no-cache",
                wheel,
            ],
            env={**env, "UV_HTTP_RETRIES": "0", "UV_INDEX_URL": f"{serve.base_url}/py/simple/"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert uv.returncode != 0
        assert "504 Not recorded (replay mode)" in uv.stderr, uv.stderr
    finally:
        serve.stop()


def test_log_lines_are_written_in_batches_in_order_and_warnings_at_once() -> None:
    import io
    import logging
    import time

    from pytest_upstream.cli.logs import BatchingHandler

    log = logging.getLogger("pytest_upstream.test_batching")
    log.propagate = False
    log.setLevel(logging.INFO)
    slow, quick = io.StringIO(), io.StringIO()
    for stream, interval in ((slow, 600.0), (quick, 0.1)):
        handler = BatchingHandler(stream, interval=interval)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
        log.addHandler(handler)
    try:
        log.info("one")
        log.info("two")
        assert slow.getvalue() == ""  # batched: not written per line
        log.warning("three")  # a warning goes out at once, after the lines before it
        assert slow.getvalue() == "INFO one\nINFO two\nWARNING three\n"
        deadline = time.monotonic() + 5
        while "three" not in quick.getvalue() and time.monotonic() < deadline:
            time.sleep(0.05)
        log.info("four")  # then nothing more: the flusher writes it within its interval
        while "four" not in quick.getvalue() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert quick.getvalue() == "INFO one\nINFO two\nWARNING three\nINFO four\n"
    finally:
        for handler in list(log.handlers):
            log.removeHandler(handler)
            handler.close()
