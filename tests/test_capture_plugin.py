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
