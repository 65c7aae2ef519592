"""The engine's parts on their own: the clock, the freshness policy, the render memo's key, the
seam that lets a format claim a root path prefix (so the engine knows no format by name), and a
revalidation measured on the engine's clock."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from pytest_upstream.config.settings import Settings
from pytest_upstream.engine.clock import ManualClock, SystemClock
from pytest_upstream.engine.dispatch import Engine
from pytest_upstream.engine.fetch import CACHE_HEADER
from pytest_upstream.engine.freshness import Freshness
from pytest_upstream.engine.render import RenderMemo
from pytest_upstream.formats import get_format, root_routes
from pytest_upstream.formats.base import Kind, Resource
from pytest_upstream.formats.docker import DockerFormat
from pytest_upstream.formats.npm_packuments import PackumentView
from pytest_upstream.messages import Headers, ProxyRequest
from pytest_upstream.store.cache import Entry
from pytest_upstream.store.entry import NOT_FOUND

from .conftest import proxy_def

ENGINE = Path(__file__).resolve().parent.parent / "pytest_upstream" / "engine"


def test_manual_clock_moves_only_forward_and_only_when_told() -> None:
    clock = ManualClock(100.0)
    assert clock.now() == clock.now() == 100.0
    clock.advance(2.5)
    assert clock.now() == 102.5
    with pytest.raises(ValueError, match="does not go back"):
        clock.advance(-1)
    assert abs(SystemClock().now() - ManualClock().now()) < 60  # starts at the wall clock's time


def _entry(kind: str, fetched_at: float) -> Entry:
    return Entry(
        key="m",
        path="p",
        variant="",
        upstream_url="u",
        sha256="0" * 64,
        size=0,
        kind=kind,
        fetched_at=fetched_at,
    )


def test_freshness_reads_ages_on_the_engine_clock() -> None:
    clock = ManualClock(1000.0)
    fresh = Freshness(clock)
    proxy = proxy_def(key="m", format="maven", url="http://127.0.0.1:9/", metadata_ttl=60, negative_ttl=30)
    meta = Resource("p", "u", Kind.METADATA, negative_ttl=30)
    entry = _entry("metadata", 1000.0)
    artifact = _entry("artifact", 0.0)
    clock.advance(59.9)
    assert fresh.fresh("record", proxy, meta, entry)
    assert fresh.fresh("record", proxy, meta, artifact)  # immutable: any age
    clock.advance(0.1)
    assert not fresh.fresh("record", proxy, meta, entry)
    gone = _entry(NOT_FOUND, 1000.0)
    assert not fresh.not_found_holds("record", meta, gone)  # 60 s old, negative_ttl 30
    assert fresh.not_found_holds("replay", meta, gone)  # replay: the recorded answer, at any age
    assert fresh.age(gone) == 60.0


def test_refresh_mode_refetches_each_resource_once() -> None:
    fresh = Freshness(ManualClock())
    proxy = proxy_def(key="m", format="maven", url="http://127.0.0.1:9/")
    meta = Resource("p", "u", Kind.METADATA)
    entry = _entry("metadata", ManualClock().now())
    assert not fresh.fresh("refresh", proxy, meta, entry)  # cached before the run: not fresh
    fresh.mark_refreshed("record", proxy, meta)  # only refresh mode keeps count
    assert not fresh.fresh("refresh", proxy, meta, entry)
    fresh.mark_refreshed("refresh", proxy, meta)
    assert fresh.fresh("refresh", proxy, meta, entry)


def test_the_render_memo_keys_on_the_typed_render_as(tmp_path: Path) -> None:
    npm = get_format("npm")
    assert npm is not None
    doc = {"name": "a", "versions": {"1.0.0": {"name": "a", "version": "1.0.0", "dist": {"tarball": "x"}}}}
    blob = tmp_path / "blob"
    blob.write_bytes(json.dumps(doc).encode())
    entry = _entry("metadata", 0.0)
    memo = RenderMemo()
    views = [PackumentView("full", "http://a:1/npm"), PackumentView("full", "http://b:2/npm")]
    bodies = []
    for view in [*views, views[0]]:
        out = memo.render("npm", npm, Resource("a", "u", Kind.METADATA, render_as=view), entry, blob)
        assert out is not None
        bodies.append(json.loads(out[0])["versions"]["1.0.0"]["dist"]["tarball"])
    assert bodies == ["http://a:1/npm/a/-/a-1.0.0.tgz", "http://b:2/npm/a/-/a-1.0.0.tgz", bodies[0]]
    blob.unlink()  # a memoised render does not read the blob again
    again = memo.render("npm", npm, Resource("a", "u", Kind.METADATA, render_as=views[1]), entry, blob)
    assert again is not None and b"http://b:2/npm" in again[0]


def test_docker_claims_the_v2_root_and_the_engine_names_no_format() -> None:
    assert isinstance(root_routes()["v2"], DockerFormat)
    for module in ENGINE.glob("*.py"):
        text = module.read_text().lower()
        assert "docker" not in text and "/v2" not in text, f"{module.name} knows a format by name"


class _Revalidating(BaseHTTPRequestHandler):
    """An upstream that answers 304 to a matching If-None-Match, and counts what it was asked."""

    protocol_version = "HTTP/1.1"
    asked: ClassVar[list[str]] = []

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.asked.append(self.headers.get("If-None-Match", ""))
        if self.headers.get("If-None-Match") == '"v1"':
            self.send_response(304)
            self.send_header("ETag", '"v1"')
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("ETag", '"v1"')
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"v1")


def test_a_revalidated_entry_is_fresh_again_on_the_engine_clock(tmp_path: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Revalidating)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    _Revalidating.asked = []
    clock = ManualClock(time.time() + 100_000)  # far from the wall clock: a wall-clock age would be stale
    proxy = proxy_def(
        key="g",
        format="generic",
        url=f"http://127.0.0.1:{server.server_address[1]}/",
        mutable_paths=["*"],
        metadata_ttl=60,
    )
    engine = Engine(Settings(cache_dir=tmp_path / "cache", mode="record", proxies=(proxy,)), clock=clock)

    def cache_state() -> str:
        reply = engine.handle(ProxyRequest("GET", "g", "m.json", "", Headers(), "http://proxy.test"))
        assert reply.status == 200 and reply.file is not None and reply.file.read_bytes() == b"v1"
        return reply.headers[CACHE_HEADER]

    try:
        assert cache_state() == "miss"
        clock.advance(59)
        assert cache_state() == "hit"
        clock.advance(1)
        assert cache_state() == "hit"  # revalidated: the upstream answered 304
        assert _Revalidating.asked == ["", '"v1"']
        clock.advance(59)
        assert cache_state() == "hit"  # fresh again, counted from the revalidation
        assert len(_Revalidating.asked) == 2
    finally:
        engine.close()
        server.shutdown()
        server.server_close()
