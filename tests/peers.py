"""Real upstream servers and clients, started on loopback by the tests."""

from __future__ import annotations

import os
import select
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not answer within {timeout:g}s") from None
            time.sleep(0.1)


def pypiserver_command() -> list[str]:
    exe = shutil.which("pypi-server", path=str(Path(sys.executable).parent)) or shutil.which("pypi-server")
    return [exe] if exe else [sys.executable, "-m", "pypiserver"]


@contextmanager
def pypiserver(packages: Path) -> Iterator[str]:
    """pypiserver over ``packages``; yields its /simple/ URL.  No fallback to the public index."""
    port = free_port()
    proc = subprocess.Popen(
        [
            *pypiserver_command(),
            "run",
            "-p",
            str(port),
            "-i",
            "127.0.0.1",
            "--disable-fallback",
            str(packages),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}/simple/"
        wait_http(url)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def spawn_serve(config: Path, *args: str) -> subprocess.Popen[str]:
    """``upstream-proxy --config FILE serve --port 0 ARGS`` in a child process (see ``serve_url``)."""
    return subprocess.Popen(
        [sys.executable, "-m", "pytest_upstream", "--config", str(config), "serve", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def serve_url(proc: subprocess.Popen[str], timeout: float = 20.0) -> str:
    """The base URL a spawned ``serve`` prints first; kills it if it does not start."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline().strip() if ready else ""
    if not line.startswith("http://"):
        proc.kill()
        proc.wait(5)
        raise RuntimeError(f"upstream-proxy serve did not start (first line {line!r})")
    return line


@contextmanager
def serve_process(config: Path, *args: str) -> Iterator[str]:
    """``upstream-proxy --config FILE serve ARGS``; yields the base URL it prints."""
    proc = spawn_serve(config, *args)
    try:
        yield serve_url(proc)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def require_peer(*commands: str, install: str) -> None:
    """Skip (or, with UPSTREAM_REQUIRE_PEERS=1 as in CI, fail) when a real peer is not installed.

    ``install`` names the script that installs it, e.g. ``scripts/peers/docker.sh``.
    """
    import pytest

    missing = [c for c in commands if shutil.which(c) is None and not Path(c).exists()]
    if not missing:
        return
    message = f"real peer(s) {', '.join(missing)} not installed: run {install} (./run.sh test does)"
    if os.environ.get("UPSTREAM_REQUIRE_PEERS") == "1":
        pytest.fail(message)
    pytest.skip(message)
