"""A local miss served from an ``s3://`` cache's bucket streams to its clients as it lands
(engine/flights.py with a ``Pull`` as its source; docs/object-storage.md), and the fetching
machine killed -9 mid-download is taken over by another, through the proxy.

Proxies on two "machines" (separate local tiers) share one bucket on a real SeaweedFS started on
loopback (the kill -9 test also on moto's server).  To see bytes arrive *before* the pull is
stored, machine B reaches the store through a throttling TCP relay on loopback (``SlowLink``):
the bytes are the store's own.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from pytest_upstream.config.s3_location import S3Location
from pytest_upstream.server.proxy_server import ProxyServer
from pytest_upstream.store.entry import Entry, parse_entry
from pytest_upstream.store.s3 import S3Backend

from .conftest import MakeProxy, proxy_def
from .peers import serve_url
from .s3_peers import S3Peer
from .test_backend_contract import isolate_aws, s3_peer  # noqa: F401 (a fixture)
from .upstreams import Fault, Upstream

pytestmark = pytest.mark.slow

MiB = 1024 * 1024
BIG = hashlib.sha256(b"seed").digest() * (16 * MiB // 32)  # 16 MiB


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class SlowLink:
    """A TCP relay on loopback to ``target`` that sends the answers back at ``rate`` bytes/s."""

    def __init__(self, target: tuple[str, int], rate: float) -> None:
        self.target, self.rate = target, rate
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                server = socket.create_connection(self.target)
                threading.Thread(target=self._pump, args=(client, server, 0.0), daemon=True).start()
                threading.Thread(target=self._pump, args=(server, client, self.rate), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, rate: float) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(64 * 1024):
                sink.sendall(data)
                if rate:
                    time.sleep(len(data) / rate)
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def peer(s3_peer: Callable[[str], S3Peer], monkeypatch: pytest.MonkeyPatch) -> S3Peer:  # noqa: F811
    isolate_aws(monkeypatch)
    return s3_peer("seaweedfs")


@pytest.fixture
def slow_link(peer: S3Peer) -> Iterator[SlowLink]:
    link = SlowLink(("127.0.0.1", peer.port), rate=8 * MiB)  # 16 MiB in about 2 s
    yield link
    link.close()


def location(peer: S3Peer, prefix: str, endpoint: str | None = None) -> S3Location:
    return S3Location(peer.bucket, prefix, endpoint or peer.endpoint, "us-east-1")


def published(proxy: ProxyServer, count: int = 1) -> None:
    """Wait until ``proxy`` published ``count`` entries (publishing follows its client's last byte)."""
    deadline = time.monotonic() + 30
    while proxy.engine.shared is None or proxy.engine.shared.tier.health.snapshot()["published"] < count:
        assert time.monotonic() < deadline, "never published"
        time.sleep(0.05)


def stored_entry(proxy: ProxyServer, path: str) -> Entry:
    """The entry ``proxy`` stores once the pull is committed.  The last chunk reaches the clients
    when the bytes are verified, before the local fsync and rename: a client can finish first."""
    deadline = time.monotonic() + 30
    while (entry := proxy.engine.cache.lookup("g", path)) is None:
        assert time.monotonic() < deadline, "never stored"
        time.sleep(0.05)
    return entry


def open_get(url: str) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=60)
    conn.request("GET", parts.path)
    return conn, conn.getresponse()


def read_streamed(proxy: ProxyServer, path: str) -> tuple[dict[str, str], bytes, bool]:
    """GET ``path``: the headers, the body, and whether the first MiB came while the local tier
    had no entry yet (the pull was still landing)."""
    conn, resp = open_get(proxy.url("g") + path)
    try:
        assert resp.status == 200
        first = resp.read(MiB)
        before_stored = proxy.engine.cache.lookup("g", path) is None
        return dict(resp.getheaders()), first + resp.read(), before_stored
    finally:
        conn.close()


def test_a_local_miss_streams_from_the_bucket_before_it_is_stored(
    upstream: Upstream, make_proxy: MakeProxy, peer: S3Peer, slow_link: SlowLink, tmp_path: Path
) -> None:
    upstream.files["/big.bin"] = BIG
    prefix = f"t-{uuid.uuid4().hex[:12]}/stream"
    definition = proxy_def(key="g", format="generic", url=upstream.url)
    a = make_proxy(definition, cache=tmp_path / "a", object_store=location(peer, prefix))
    assert urllib.request.urlopen(a.url("g") + "big.bin", timeout=60).read() == BIG
    published(a)
    b = make_proxy(definition, cache=tmp_path / "b", object_store=location(peer, prefix, slow_link.endpoint))
    headers, body, before_stored = read_streamed(b, "big.bin")
    assert sha(body) == sha(BIG) and headers["Content-Length"] == str(len(BIG))
    assert headers["X-Upstream-Cache"] == "hit"  # from the shared cache, not the upstream
    assert before_stored  # the first MiB was served while the rest was still coming from the store
    assert upstream.hits["/big.bin"] == 1
    stored = stored_entry(b, "big.bin")
    assert stored.sha256 == sha(BIG)  # then committed, with A's fetch time
    assert stored.fetched_at == a.engine.cache.lookup("g", "big.bin").fetched_at  # type: ignore[union-attr]
    assert b.engine.shared is not None
    deadline = time.monotonic() + 10  # counted just after the entry is stored
    while b.engine.shared.tier.health.snapshot()["pulled"] != 1:
        assert time.monotonic() < deadline, b.engine.shared.tier.health.snapshot()
        time.sleep(0.02)
    with urllib.request.urlopen(b.url("g") + "big.bin", timeout=60) as again:  # a local hit now
        assert again.headers["X-Upstream-Cache"] == "hit" and again.read() == BIG


def test_a_machine_waiting_for_another_download_streams_the_object_once_it_lands(
    upstream: Upstream, make_proxy: MakeProxy, peer: S3Peer, slow_link: SlowLink, tmp_path: Path
) -> None:
    upstream.files["/big.bin"] = BIG
    upstream.faults["/big.bin"] = Fault(chunk_delay=0.005)  # about 1.5 s: B asks while A fetches
    prefix = f"t-{uuid.uuid4().hex[:12]}/wait"
    definition = proxy_def(key="g", format="generic", url=upstream.url)
    a = make_proxy(definition, cache=tmp_path / "a", object_store=location(peer, prefix))
    b = make_proxy(definition, cache=tmp_path / "b", object_store=location(peer, prefix, slow_link.endpoint))
    conn, resp = open_get(a.url("g") + "big.bin")
    got: list[tuple[dict[str, str], bytes, bool]] = []
    try:
        first = resp.read(64 * 1024)  # A holds the claim and is downloading
        waiter = threading.Thread(target=lambda: got.append(read_streamed(b, "big.bin")))
        waiter.start()
        assert first + resp.read() == BIG  # A's client reads on, to the end
    finally:
        conn.close()
    waiter.join(60)
    _, body, before_stored = got[0]
    assert sha(body) == sha(BIG)
    assert before_stored  # B's client had bytes before B stored the object: streamed, not copied first
    assert upstream.hits["/big.bin"] == 1  # one fetch: B waited for A's
    assert b.engine.shared is not None and b.engine.shared.tier.health.snapshot()["claims_waited"] == 1


def test_a_bit_flipped_object_cuts_the_clients_and_is_fetched_again(
    upstream: Upstream, make_proxy: MakeProxy, peer: S3Peer, tmp_path: Path
) -> None:
    upstream.files["/big.bin"] = BIG
    prefix = f"t-{uuid.uuid4().hex[:12]}/flipped"
    bucket = location(peer, prefix)
    definition = proxy_def(key="g", format="generic", url=upstream.url)
    a = make_proxy(definition, cache=tmp_path / "a", object_store=bucket)
    assert urllib.request.urlopen(a.url("g") + "big.bin", timeout=60).read() == BIG
    published(a)
    raw = S3Backend(bucket)
    flipped = bytearray(BIG)
    flipped[len(BIG) // 2] ^= 0x01  # one bit, in the middle: the same length
    raw.client.put_object(Bucket=peer.bucket, Key=raw.blob_key(sha(BIG)), Body=bytes(flipped))
    b = make_proxy(definition, cache=tmp_path / "b", object_store=bucket)
    conn, resp = open_get(b.url("g") + "big.bin")
    try:
        assert resp.status == 200 and resp.headers["Content-Length"] == str(len(BIG))
        with pytest.raises(http.client.IncompleteRead) as cut:
            resp.read()
        assert len(cut.value.partial) < len(BIG)  # never the whole length of wrong bytes
    finally:
        conn.close()
    assert raw.blob_stat(sha(BIG)) is None  # removed from the store
    assert b.engine.cache.lookup("g", "big.bin") is None  # nothing wrong stored locally
    assert not any((tmp_path / "b" / "blobs").rglob("*")) or all(
        sha(f.read_bytes()) == f.name for f in (tmp_path / "b" / "blobs").rglob("*") if f.is_file()
    )
    with urllib.request.urlopen(b.url("g") + "big.bin", timeout=60) as again:  # from the upstream
        assert again.read() == BIG
    assert upstream.hits["/big.bin"] == 2
    published(b)
    with raw.open_blob(sha(BIG)) as blob:  # B put a good copy back
        assert hashlib.file_digest(blob, "sha256").hexdigest() == sha(BIG)


# -- kill -9 of the fetching machine, through the proxy ----------------------------------------------
def serve(work: Path, name: str, bucket: S3Location, upstream: str, ttl: str) -> subprocess.Popen[str]:
    """``upstream-proxy serve`` as machine ``name``: its own local tier, the shared bucket."""
    config = work / f"{name}.toml"
    config.write_text(
        "[tool.pytest-upstream]\n"
        f'cache = "s3://{bucket.bucket}/{bucket.prefix}"\n'
        f'local_cache = "{work / name}"\n'
        f's3_endpoint_url = "{bucket.endpoint_url}"\n'
        's3_region = "us-east-1"\n'
        f's3_claim_ttl = "{ttl}"\n'
        "[[tool.pytest-upstream.proxy]]\n"
        f'key = "g"\nformat = "generic"\nurl = "{upstream}"\n'
    )
    with (work / f"{name}.log").open("ab") as log:  # the child keeps its own descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "pytest_upstream", "--config", str(config), "serve", "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
        )


def store_events(base_url: str) -> dict[str, int]:
    with urllib.request.urlopen(base_url + "/-/metrics", timeout=10) as resp:
        text = resp.read().decode()
    prefix = 'upstream_proxy_object_store_events_total{event="'
    return {
        line[len(prefix) :].split('"', 1)[0]: int(float(line.rsplit(" ", 1)[1]))
        for line in text.splitlines()
        if line.startswith(prefix)
    }


@pytest.mark.parametrize("kind", ["seaweedfs", "moto"])
def test_the_fetching_proxy_killed_mid_download_is_taken_over_and_nothing_partial_remains(
    kind: str,
    upstream: Upstream,
    s3_peer: Callable[[str], S3Peer],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Machine A downloads from a slow upstream; B's client asks for the same artifact and waits
    on A's claim; A is killed -9 mid-body; once A's claim expires (s3_claim_ttl = 4s, renewed
    while A lived: B never took over early) B fetches it itself, and its client gets the right
    bytes.  A's client got a cut body; the bucket holds only complete, verified objects."""
    isolate_aws(monkeypatch)
    store = s3_peer(kind)
    body = BIG[: 3 * MiB]
    upstream.files["/big.bin"] = body
    upstream.faults["/big.bin"] = Fault(chunk_delay=0.25)  # 48 chunks of 64 KiB: about 12 s for A
    bucket = location(store, f"t-{uuid.uuid4().hex[:12]}/killed")
    ttl = 4.0  # room for SeaweedFS's second-long answer to a contended conditional write
    a = serve(tmp_path, "a", bucket, upstream.url, f"{ttl:g}s")
    b = serve(tmp_path, "b", bucket, upstream.url, f"{ttl:g}s")
    results: dict[str, Any] = {}
    try:
        a_url, b_url = serve_url(a), serve_url(b)
        conn, resp = open_get(a_url + "/g/big.bin")
        assert resp.status == 200 and resp.read(64 * 1024)  # A holds the claim, mid-body
        claimed_at = time.monotonic()

        def b_client() -> None:
            with urllib.request.urlopen(b_url + "/g/big.bin", timeout=120) as got:
                results["b"] = got.read()

        waiter = threading.Thread(target=b_client)
        waiter.start()
        deadline = time.monotonic() + 20
        while store_events(b_url).get("claims_waited", 0) < 1:  # B waits on A's claim
            assert time.monotonic() < deadline, "B never waited"
            time.sleep(0.05)
        # Twice the ttl and more (B polls at most a second apart): A renewed its claim meanwhile.
        time.sleep(max(0.0, claimed_at + 2 * ttl + 0.5 - time.monotonic()))
        assert upstream.hits["/big.bin"] == 1 and waiter.is_alive()  # B did not take over early
        upstream.faults["/big.bin"] = Fault(chunk_delay=0.01)  # B's own fetch need not be slow
        a.send_signal(signal.SIGKILL)
        a.wait(10)
        try:
            partial = resp.read()
            cut = False
        except http.client.IncompleteRead as exc:
            partial, cut = exc.partial, True
        conn.close()
        assert cut or len(partial) < len(body) - 64 * 1024  # A's client never got a whole body
        waiter.join(60)
        assert sha(results["b"]) == sha(body)  # B's client: the right bytes, from B's own fetch
        assert upstream.hits["/big.bin"] == 2  # A's cut fetch and B's
        deadline = time.monotonic() + 20  # B publishes after its client had the last byte
        while (events := store_events(b_url)).get("published", 0) < 1:
            assert time.monotonic() < deadline, "B never published"
            time.sleep(0.05)
        assert events.get("claims_taken_over") == 1
        assert_only_complete_objects(bucket, {sha(body): len(body)})  # B still running: released
    finally:
        for proc in (a, b):
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            if proc.stdout is not None:
                proc.stdout.close()


def listing(raw: S3Backend, bucket: S3Location) -> list[str]:
    pages = raw.client.get_paginator("list_objects_v2").paginate(Bucket=bucket.bucket, Prefix=bucket.key(""))
    return [str(item["Key"]) for page in pages for item in page.get("Contents") or ()]


def assert_only_complete_objects(bucket: S3Location, blobs: dict[str, int]) -> None:
    """Every blob in the bucket hashes to its name and is one of ``blobs``; every index entry
    names a blob there of its size; no lease is left over (B releases its claim just after
    publishing: waited for)."""
    raw = S3Backend(bucket)
    deadline = time.monotonic() + 20
    while "leases" in (
        kinds := {key[len(bucket.key("")) :].split("/", 1)[0] for key in listing(raw, bucket)}
    ):
        assert time.monotonic() < deadline, "a lease was left behind"
        time.sleep(0.05)
    listed = listing(raw, bucket)
    assert kinds <= {"blobs", "index"}, listed
    found = {}
    for key in listed:
        if "/blobs/" in key:
            with raw.open_blob(key.rsplit("/", 1)[1]) as f:
                data = f.read()
            assert sha(data) == key.rsplit("/", 1)[1]
            found[sha(data)] = len(data)
    assert found == blobs
    for k, name in raw.list_index():
        got = raw.get_index(k, name)
        assert got is not None
        entry = parse_entry(got.data, k, f"{name}.json")
        assert found.get(entry.sha256) == entry.size, json.loads(got.data)
