"""Capture through the pytest plugin (docs/capture.md): a test shells out to plain ``curl`` with
no proxy or CA flags, and calls requests and httpx in-process, against an HTTPS upstream on
127.0.0.2 with its own CA (``upstream_ca``).  Recorded with a lock file, then replayed with the
upstream gone: the same bytes; an unrecorded URL fails with the reason in the status line."""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_upstream.pytest_plugin.harness import ADDED_CA_VARIABLES, BUNDLE_VARIABLES
from tests.capture_peers import TlsUpstream

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
BODY = os.urandom(100_000)

INNER = """
import os
import subprocess
from pathlib import Path

import httpx
import requests

URL = os.environ["CAPTURE_TEST_URL"]
OUT = Path(os.environ["CAPTURE_TEST_OUT"])


def test_curl_with_no_flags():
    done = subprocess.run(["curl", "-sS", "-f", URL + "/file.bin"], capture_output=True, check=False)
    assert done.returncode == 0, done.stderr
    (OUT / "curl.bin").write_bytes(done.stdout)


def test_requests_and_httpx_in_process():
    (OUT / "requests.bin").write_bytes(requests.get(URL + "/file.bin", timeout=30).content)
    (OUT / "httpx.bin").write_bytes(httpx.get(URL + "/small.txt", timeout=30).content)


def test_env(upstream_proxy):
    env = upstream_proxy.env()
    (OUT / "env.json").write_text(__import__("json").dumps(env))


def test_unrecorded():
    done = subprocess.run(["curl", "-sS", "-i", URL + "/never.bin"], capture_output=True, check=False)
    (OUT / "unrecorded.txt").write_bytes(done.stdout)
"""


@pytest.fixture
def upstream(tmp_path: Path) -> Iterator[TlsUpstream]:
    with TlsUpstream(tmp_path / "upstream-ca") as up:
        up.files["/file.bin"] = BODY
        up.files["/small.txt"] = b"small\n"
        up.files["/never.bin"] = b"only upstream\n"
        yield up


def test_curl_requests_httpx_recorded_then_replayed(
    pytester: pytest.Pytester, upstream: TlsUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    (pytester.path / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""
            [tool.pytest-upstream]
            capture = true
            upstream_ca = "{upstream.ca_file}"
            lock = "upstream.lock"
            """
        )
    )
    pytester.makepyfile(test_inner=INNER)
    monkeypatch.setenv("CAPTURE_TEST_URL", upstream.url)
    recorded, replayed = pytester.path / "recorded", pytester.path / "replayed"
    recorded.mkdir()
    replayed.mkdir()
    common = ("--upstream-proxy", "--upstream-cache=cache", "-p", "no:cacheprovider")

    monkeypatch.setenv("CAPTURE_TEST_OUT", str(recorded))
    result = pytester.runpytest_subprocess(*common, "-k", "not unrecorded", "--upstream-report=record.json")
    result.assert_outcomes(passed=3)
    assert (recorded / "curl.bin").read_bytes() == BODY
    assert (recorded / "requests.bin").read_bytes() == BODY
    assert (recorded / "httpx.bin").read_bytes() == b"small\n"
    assert upstream.hits["/file.bin"] == 1  # requests was served from the cache
    key = f"ip-127.0.0.2_{upstream.port}"
    assert key in (pytester.path / "upstream.lock").read_text()
    env = json.loads((recorded / "env.json").read_text())
    cache = pytester.path / "cache" / "capture"
    assert env["HTTPS_PROXY"] == env["http_proxy"] != ""
    assert {env[name] for name in BUNDLE_VARIABLES} == {str(cache / "ca-bundle.pem")}
    assert {env[name] for name in ADDED_CA_VARIABLES} == {str(cache / "ca-cert.pem")}
    report = json.loads((pytester.path / "record.json").read_text())
    assert key in json.dumps(report)

    upstream.stop()
    monkeypatch.setenv("CAPTURE_TEST_OUT", str(replayed))
    result = pytester.runpytest_subprocess(*common, "--upstream-mode=replay")
    result.assert_outcomes(passed=4)
    for name in ("curl.bin", "requests.bin", "httpx.bin"):
        assert (replayed / name).read_bytes() == (recorded / name).read_bytes()
    status = (replayed / "unrecorded.txt").read_bytes().split(b"\r\n\r\n")[1].split(b"\r\n")[0]
    assert status == b"HTTP/1.1 504 Not recorded (replay mode)"
    result.stdout.fnmatch_lines(["replay misses (1):*", f"*{key} */never.bin*"])


XDIST_NOTE = """
import hashlib
import json
import os
from pathlib import Path

URL = os.environ["CAPTURE_TEST_URL"]
OUT = Path(os.environ["CAPTURE_TEST_OUT"])


def note(name, worker_id, body):
    bundle = os.environ["SSL_CERT_FILE"]  # exported into the worker's own process too
    (OUT / f"{name}.json").write_text(json.dumps({
        "worker": worker_id,
        "bundle": bundle,
        "bundle_sha": hashlib.sha256(Path(bundle).read_bytes()).hexdigest(),
        "body_sha": hashlib.sha256(body).hexdigest(),
    }))
"""
XDIST_CURL = """
import subprocess
from note import URL, note


def test_curl_in_a_subprocess(worker_id):
    done = subprocess.run(["curl", "-sS", "-f", URL + "/file.bin"], capture_output=True, check=False)
    assert done.returncode == 0, done.stderr
    note("curl", worker_id, done.stdout)
"""
XDIST_HTTPX = """
import httpx
from note import URL, note


def test_httpx_in_process(worker_id):
    reply = httpx.get(URL + "/small.txt", timeout=30)
    assert reply.status_code == 200, reply.text
    note("httpx", worker_id, reply.content)
"""


def test_xdist_workers_capture_with_one_ca_and_one_lock_file(
    pytester: pytest.Pytester, upstream: TlsUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two xdist workers download through capture (curl in a subprocess on one, httpx in-process
    on the other): one CA for both, their records combined into one lock file and one report;
    then the same with ``-n 2`` in replay mode with the upstream gone."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    (pytester.path / "pyproject.toml").write_text(
        f'[tool.pytest-upstream]\ncapture = true\nupstream_ca = "{upstream.ca_file}"\n'
        'lock = "upstream.lock"\n'
    )
    pytester.makepyfile(note=XDIST_NOTE, test_curl=XDIST_CURL, test_httpx=XDIST_HTTPX)
    monkeypatch.setenv("CAPTURE_TEST_URL", upstream.url)
    common = ("--upstream-proxy", "--upstream-cache=cache", "-p", "no:cacheprovider", "-n", "2")
    common += ("--dist", "loadfile")  # one file per worker

    def run(out: str, *extra: str) -> dict[str, dict[str, str]]:
        (pytester.path / out).mkdir()
        monkeypatch.setenv("CAPTURE_TEST_OUT", str(pytester.path / out))
        result = pytester.runpytest_subprocess(*common, *extra)
        result.assert_outcomes(passed=2)
        notes = {
            name: json.loads((pytester.path / out / f"{name}.json").read_text()) for name in ("curl", "httpx")
        }
        assert notes["curl"]["worker"] != notes["httpx"]["worker"]  # two workers
        assert notes["curl"]["bundle"] == notes["httpx"]["bundle"]  # one CA for the run
        assert notes["curl"]["bundle_sha"] == notes["httpx"]["bundle_sha"]
        return notes

    recorded = run("recorded", "--upstream-report=record.json")
    assert upstream.hits["/file.bin"] == upstream.hits["/small.txt"] == 1
    key = f"ip-127.0.0.2_{upstream.port}"
    lock = json.loads((pytester.path / "upstream.lock").read_text())
    assert {(e["key"], e["path"]) for e in lock["entries"]} == {(key, "file.bin"), (key, "small.txt")}
    report = (pytester.path / "record.json").read_text()
    assert "test_curl_in_a_subprocess" in report and "test_httpx_in_process" in report

    upstream.stop()
    replayed = run("replayed", "--upstream-mode=replay")
    assert {n: v["body_sha"] for n, v in replayed.items()} == {n: v["body_sha"] for n, v in recorded.items()}
    assert recorded["curl"]["bundle_sha"] == replayed["curl"]["bundle_sha"]  # the cache's CA, kept
