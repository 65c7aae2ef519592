"""A stateful model of the cache semantics, checked against the real engine.

Hypothesis drives a real ``Engine`` (record and replay mode, on one cache
directory) in front of a loopback upstream with a generic proxy whose
``meta/*`` paths are mutable metadata and whose other paths are immutable
artifacts.  Time is a fake clock, so TTL expiry is exact.  After every
request the model predicts the status, the body, the ``X-Upstream-Cache``
state and how often the upstream was asked for the path:

* an artifact is fetched once and never again, even if the upstream changes it;
* metadata is served from the cache while younger than the TTL, refetched after;
* a failed refetch (upstream down or answering 5xx) serves the cached copy as
  ``stale``; with nothing cached it is a 502;
* a 404 upstream is a 404 (and stores nothing);
* replay mode never contacts the upstream: cached (at any age) is a hit,
  anything else a 504;
* N concurrent requests for one path give the same answers as N sequential
  ones, and fetch from the upstream at most once when the fetch succeeds (for an
  artifact, a failed fetch is shared by the requests that joined it).
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
import tempfile
import threading
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pytest_upstream.config.settings import Settings
from pytest_upstream.config.upstream_limits import HealthLimits
from pytest_upstream.engine.clock import ManualClock
from pytest_upstream.engine.dispatch import Engine
from pytest_upstream.engine.fetch import CACHE_HEADER
from pytest_upstream.messages import Headers, ProxyRequest, Reply

from .conftest import proxy_def
from .upstreams import Fault, Upstream

KEY = "g"
TTL = 100.0
META = ("meta/a", "meta/b")
ARTIFACTS = ("art/x", "art/y")
PATHS = META + ARTIFACTS

Outcome = tuple[int, bytes | None, str | None]  # status, body (None for errors), cache state


class CacheModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = ManualClock(1_000_000.0)
        self.tmp = Path(tempfile.mkdtemp(prefix="cache-model-"))
        self.up = Upstream().start()
        proxy = proxy_def(
            key=KEY, format="generic", url=self.up.url, mutable_paths=["meta/*"], metadata_ttl=TTL
        )
        self.engine = Engine(
            Settings(
                cache_dir=self.tmp / "cache",
                mode="record",
                proxies=(proxy,),
                health=HealthLimits(failures=0),  # the model has no backoff: the upstream is always asked
            ),
            clock=self.clock,
        )
        # the model
        self.published: dict[str, bytes] = {}  # what the upstream serves (absent: 404)
        self.faulty: set[str] = set()  # paths the upstream answers 503 for
        self.up_running = True
        self.mode = "record"
        self.cached: dict[str, tuple[bytes, float]] = {}  # path -> (bytes, fetched_at)
        self.versions = 0
        for path in PATHS:  # start with everything published, so early requests succeed
            self.publish(path, b"")

    def teardown(self) -> None:
        self.engine.close()
        self.up.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- the model's prediction ------------------------------------------
    def predict(self, path: str) -> tuple[Outcome, int]:
        """(status, body, cache state) and the number of upstream requests; updates the model."""
        entry = self.cached.get(path)
        if entry is not None and (
            self.mode == "replay" or not path.startswith("meta/") or self.clock.now() - entry[1] < TTL
        ):
            return (200, entry[0], "hit"), 0
        if self.mode == "replay":
            return (504, None, None), 0
        contacts = 1 if self.up_running else 0
        if self.up_running and path not in self.faulty:
            if path not in self.published:
                return (404, None, None), contacts
            body = self.published[path]
            self.cached[path] = (body, self.clock.now())
            return (200, body, "miss"), contacts
        if entry is not None:  # metadata past its TTL, refetch failed
            return (200, entry[0], "stale"), contacts
        return (502, None, None), contacts

    # -- talking to the engine -------------------------------------------
    def fetch(self, path: str) -> Outcome:
        reply = self.engine.handle(ProxyRequest("GET", KEY, path, "", Headers(), "http://proxy.test"))
        body = _read(reply)
        if reply.status != 200:
            # An error claims no cache state, except a replay miss, which says so.
            assert reply.headers.get(CACHE_HEADER) == ("replay-miss" if reply.status == 504 else None)
            return reply.status, None, None
        state = reply.headers.get(CACHE_HEADER)
        if reply.length is not None:
            assert reply.length == len(body)
        if reply.file is not None:
            assert reply.headers["ETag"] == f'"sha256-{hashlib.sha256(body).hexdigest()}"'
        if state == "stale":
            assert reply.headers.get("X-Upstream-Error")
            assert reply.headers.get("Warning", "").startswith("110")
        return 200, body, state

    def hits(self, path: str) -> int:
        with self.up.lock:
            return self.up.hits["/" + path]

    # -- rules -------------------------------------------------------------
    @rule(path=st.sampled_from(PATHS), data=st.binary(max_size=48))
    def publish(self, path: str, data: bytes) -> None:
        """Publish or change upstream content (artifacts too: the proxy must not notice)."""
        self.versions += 1
        body = f"{path} v{self.versions}\n".encode() + data if data or self.versions % 4 else b""
        with self.up.lock:
            self.up.files["/" + path] = body
        self.published[path] = body

    @rule(path=st.sampled_from(META))
    def unpublish(self, path: str) -> None:
        with self.up.lock:
            self.up.files.pop("/" + path, None)
        self.published.pop(path, None)

    @rule(path=st.sampled_from(PATHS), broken=st.booleans())
    def upstream_error(self, path: str, broken: bool) -> None:
        with self.up.lock:
            if broken:
                self.up.faults["/" + path] = Fault(status=503)
            else:
                self.up.faults.pop("/" + path, None)
        if broken:
            self.faulty.add(path)
        else:
            self.faulty.discard(path)

    @rule(path=st.sampled_from(PATHS))
    def request(self, path: str) -> None:
        before = self.hits(path)
        expected, contacts = self.predict(path)
        got = self.fetch(path)
        assert got == expected, f"{path}: engine answered {got}, model predicts {expected}"
        upstream_requests = self.hits(path) - before
        assert upstream_requests == contacts, (
            f"{path}: {upstream_requests} upstream requests, model {contacts}"
        )

    @rule(path=st.sampled_from(PATHS), n=st.integers(min_value=2, max_value=4))
    def concurrent_get(self, path: str, n: int) -> None:
        before = self.hits(path)
        predictions = [self.predict(path) for _ in range(n)]
        barrier = threading.Barrier(n)
        outcomes: list[Outcome] = []
        errors: list[BaseException] = []

        def worker() -> None:
            try:
                barrier.wait(timeout=10)
                outcome = self.fetch(path)
            except BaseException as exc:
                errors.append(exc)
            else:
                outcomes.append(outcome)

        threads = [threading.Thread(target=worker) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert not errors, errors
        # the same answers as n sequential requests, in whatever order the threads got the lock
        got, expected = sorted(outcomes, key=repr), sorted((p[0] for p in predictions), key=repr)
        assert got == expected, f"{path} x{n}: engine answered {got}, model predicts {expected}"
        contacts = sum(p[1] for p in predictions)
        if any(p[0][2] == "miss" for p in predictions):
            assert contacts == 1  # a successful fetch is shared, never repeated
        if path in ARTIFACTS and contacts > 1:
            # A failing artifact fetch is shared too by the requests that joined its download
            # (engine/flights.py); one that arrives after the failure asks again.
            assert 1 <= self.hits(path) - before <= contacts
        else:
            assert self.hits(path) - before == contacts

    @rule(seconds=st.sampled_from([1.0, TTL - 1, TTL, TTL + 1, 10 * TTL]))
    def advance_clock(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule(path=st.sampled_from(META), offset=st.sampled_from([-1.0, 0.0]))
    def request_at_ttl_boundary(self, path: str, offset: float) -> None:
        """Move the clock to one second before (age TTL-1: fresh) or exactly at (age TTL: expired)
        a cached path's expiry, if that is not in the past, and request it."""
        if path in self.cached:
            self.clock.advance(max(0.0, self.cached[path][1] + TTL + offset - self.clock.now()))
        self.request(path)

    @precondition(lambda self: self.up_running)
    @rule()
    def take_upstream_down(self) -> None:
        self.up.stop()
        self.up_running = False

    @precondition(lambda self: not self.up_running)
    @rule()
    def bring_upstream_up(self) -> None:
        self.up.start()
        self.up_running = True

    @rule(new_engine=st.booleans())
    def switch_mode(self, new_engine: bool) -> None:
        """record <-> replay, on a new engine over the same cache or by swapping the settings."""
        self.mode = "replay" if self.mode == "record" else "record"
        new_settings = dataclasses.replace(self.engine.settings, mode=self.mode)
        if new_engine:
            self.engine.close()
            self.engine = Engine(new_settings, clock=self.clock)
        else:
            self.engine.settings = new_settings

    # -- invariants --------------------------------------------------------
    @invariant()
    def index_matches_model(self) -> None:
        for path in PATHS:
            entry = self.engine.cache.lookup(KEY, path)
            if path not in self.cached:
                assert entry is None, path
                continue
            body, fetched_at = self.cached[path]
            assert entry is not None, path
            assert entry.sha256 == hashlib.sha256(body).hexdigest()
            assert entry.size == len(body)
            assert entry.fetched_at == fetched_at
            assert entry.kind == ("metadata" if path.startswith("meta/") else "artifact")

    @invariant()
    def nothing_left_in_tmp(self) -> None:
        assert not list((self.tmp / "cache" / "tmp").iterdir())


def _read(reply: Reply) -> bytes:
    if reply.stream is not None:
        return b"".join(reply.stream)
    if reply.file is not None:
        return reply.file.read_bytes()
    return reply.body


CacheModel.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestCacheModel = CacheModel.TestCase
