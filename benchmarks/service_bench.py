#!/usr/bin/env python3
"""The serving core as a long-running service: issue 9's targets, measured against references.

    benchmarks/setup.sh                                     # once: nginx, wrk, curl (apt-get)
    .venv/bin/python benchmarks/service_bench.py            # ~3 minutes; rewrites its section
    .venv/bin/python benchmarks/service_bench.py --quick    # each part well under a minute, prints
    .venv/bin/python benchmarks/service_bench.py --only 13  # some parts only

What is measured, each against a reference taken in the same run:

(1) held connections: 1,000 connections held open against ``upstream-proxy serve`` (half idle,
    half trickling an unfinished header one byte a second; any the server closes are opened
    again, as an attacker would), and a probe request's latency meanwhile: median and max of 20
    probes, against the same probes with nothing held.  Then the same with serve limited to the
    usual 1,024 descriptors and 1,100 connections (the EMFILE case), with serve's CPU use.
(2) one stalled client (sends a GET, never reads) and 16 clients on one cold artifact (50 MiB):
    the time for the 16 to finish against a lone cold download's time through the proxy, and how
    many times the proxy fetched the artifact from the upstream (nginx's access log).
(3) memory: serve's VmRSS before and after 100,000 warm hits on a 1 KiB file (wrk, keep-alive),
    and VmRSS added while serving a 1 GiB artifact (a cold miss, then a warm hit).
(4) a cold 100 MiB miss against a direct download from the same upstream: time ratio, and the
    proxy's first body byte.

Everything runs on 127.0.0.1 with bounded sizes, counts and deadlines (a client that gets no
answer gives up and is counted as such); the temp dir is removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness import (
    DOC,
    ROOT,
    ProxyProcess,
    Results,
    busy,
    log,
    machine,
    publish,
    raise_file_limit,
    work_dir,
)
from instruments import (
    HOST,
    Fetch,
    MiB,
    Nginx,
    RssSampler,
    cpu_seconds,
    established,
    expect,
    http_get,
    open_fds,
    proc_status_kb,
    run_wrk,
    write_random_file,
)

SMALL = 1024
CODE = ("pytest_upstream", "benchmarks", "pyproject.toml")  # a change here changes the figures


@dataclass
class Profile:
    connections: int  # (1) held connections
    emfile_connections: int  # (1) against serve limited to 1,024 descriptors
    hold_seconds: float  # (1) how long they are held while the probes run
    probes: int
    stall_bytes: int  # (2)
    stall_clients: int
    stall_deadline: float  # (2) a client that has no whole answer by then gives up
    lone_reps: int
    hits: int  # (3)
    big_bytes: int  # (3)
    miss_bytes: int  # (4)
    miss_reps: int


FULL = Profile(1000, 1100, 30.0, 20, 50 * MiB, 16, 60.0, 3, 100_000, 1024 * MiB, 100 * MiB, 5)
QUICK = Profile(1000, 1100, 8.0, 20, 20 * MiB, 16, 15.0, 2, 20_000, 128 * MiB, 20 * MiB, 2)


def load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def counted(items: list[str]) -> str:
    """``a x3, b x1``: a list of outcomes, each with how often it happened."""
    return ", ".join(f"{k} x{v}" for k, v in Counter(items).items())


def size_label(n: int) -> str:
    return f"{n / (1024 * MiB):g} GiB" if n >= 1024 * MiB else f"{n // MiB} MiB"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


# -- (1) held connections ------------------------------------------------------------------
@dataclass
class _Held:
    sock: socket.socket
    trickle: bool
    since: float
    open: bool = False


class Holder:
    """Keeps ``count`` connections to a server open from one thread (non-blocking, a selector);
    ``server_count`` (the server side's established connections) paces the ramp.

    Half of them only connect; the other half send the start of a request and then one more byte
    of an endless header line every ``trickle_every`` seconds.  A connection the server closes or
    answers is counted and opened again (at most ``burst`` new ones per tick), and a connect that
    has not completed within 3 s is dropped and retried: the pressure stays on for the whole hold.
    """

    def __init__(
        self,
        port: int,
        count: int,
        trickle_every: float = 1.0,
        burst: int = 20,
        server_count: Callable[[], int] | None = None,
    ) -> None:
        self.port, self.count, self.trickle_every, self.burst = port, count, trickle_every, burst
        self.server_count = server_count
        self.sel = selectors.DefaultSelector()
        self.conns: dict[int, _Held] = {}
        self.started = 0  # connects begun
        self.established = 0  # connects that completed
        self.connect_failed = 0  # refused, reset, or no descriptor on our side
        self.connect_timeouts = 0  # not completed within 3 s (SYN dropped: backlog full)
        self.closed_by_server = 0  # an open connection the server closed
        self.answered = 0  # ... after sending something (e.g. a 408 or 503)
        self._made = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="holder", daemon=True)

    @property
    def open_now(self) -> int:
        return sum(1 for c in list(self.conns.values()) if c.open)

    def start(self) -> Holder:
        self._thread.start()
        return self

    def wait_open(self, timeout: float) -> float:
        """Wait until all are open (or ``timeout``); the seconds it took."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout and self.open_now < self.count:
            time.sleep(0.05)
        return time.monotonic() - t0

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for c in self.conns.values():
            with contextlib.suppress(OSError):
                c.sock.close()
        self.conns.clear()
        self.sel.close()

    def _drop(self, fd: int) -> None:
        c = self.conns.pop(fd)
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(c.sock)
        c.sock.close()

    def _open_some(self, now: float) -> None:
        want = min(self.burst, self.count - len(self.conns))
        if want > 0 and self.server_count is not None:
            # Never run more than 64 ahead of what the server has established: a connect the full
            # listen backlog drops still looks open to an idle client, which would never learn.
            server = self.server_count()
            if server >= 0:
                want = min(want, server + 64 - len(self.conns))
        for _ in range(want):
            try:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            except OSError:
                self.connect_failed += 1
                return
            s.setblocking(False)
            err = s.connect_ex((HOST, self.port))
            self.started += 1
            if err not in (0, 115):  # 115: EINPROGRESS
                self.connect_failed += 1
                s.close()
                continue
            self._made += 1
            self.conns[s.fileno()] = _Held(s, trickle=self._made % 2 == 0, since=now)
            self.sel.register(s, selectors.EVENT_WRITE)

    def _on_event(self, fd: int, now: float) -> None:
        c = self.conns.get(fd)
        if c is None:
            return
        if not c.open:
            err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.connect_failed += 1
                self._drop(fd)
                return
            c.open, c.since = True, now
            self.established += 1
            self.sel.modify(c.sock, selectors.EVENT_READ)
            if c.trickle:
                start = f"GET /files/small.bin HTTP/1.1\r\nHost: {HOST}:{self.port}\r\nX-Trickle: "
                with contextlib.suppress(OSError):
                    c.sock.send(start.encode())
            return
        try:
            data = c.sock.recv(65536)
        except OSError:
            data = b""
        self.closed_by_server += 1
        if data:
            self.answered += 1
        self._drop(fd)

    def _run(self) -> None:
        next_trickle = time.monotonic() + self.trickle_every
        while not self._stop.is_set():
            now = time.monotonic()
            self._open_some(now)
            for key, _ in self.sel.select(timeout=0.05):
                self._on_event(key.fd, now)
            for fd, c in list(self.conns.items()):
                if not c.open and now - c.since > 3.0:
                    self.connect_timeouts += 1
                    self._drop(fd)
            if now >= next_trickle:
                next_trickle = now + self.trickle_every
                for fd, c in list(self.conns.items()):
                    if c.open and c.trickle:
                        try:
                            c.sock.send(b"a")
                        except BlockingIOError:
                            pass
                        except OSError:
                            self.closed_by_server += 1
                            self._drop(fd)


@dataclass
class Probes:
    times: list[float]  # seconds, answered probes
    failures: list[str]
    held: list[int]  # connections serve had established when each probe started

    def summary(self) -> str:
        if not self.times:
            return f"no probe answered ({len(self.failures)} failed)"
        text = f"median {ms(statistics.median(self.times))} ms, max {ms(max(self.times))} ms"
        return text + (f", {len(self.failures)} of {self.count} failed" if self.failures else "")

    @property
    def count(self) -> int:
        return len(self.times) + len(self.failures)


def probe(port: int, count: int, spacing: float, until: float | None = None, watch: bool = False) -> Probes:
    """Up to ``count`` GETs of the small file, each on a new connection with a 2 s deadline,
    ``spacing`` s apart, none started after ``until`` (monotonic) once 3 were made.  With
    ``watch``, serve's established connections are counted before each."""
    out = Probes([], [], [])
    for i in range(count):
        if i:
            if until is not None and i >= 3 and time.monotonic() + spacing > until:
                break
            time.sleep(spacing)
        if watch:
            out.held.append(established(port))
        try:
            f = http_get(port, "/files/small.bin", timeout=2.0)
            if f.status != 200 or f.size != SMALL:
                out.failures.append(f"status {f.status}, {f.size} bytes")
            else:
                out.times.append(f.t_total)
        except (OSError, RuntimeError, ValueError, IndexError) as exc:
            out.failures.append(type(exc).__name__)
    return out


def settle(port: int, want: int, timeout: float) -> int:
    """Wait until serve holds ``want`` connections, or their count stops rising for 1 s."""
    deadline = time.monotonic() + timeout
    best, since = established(port), time.monotonic()
    while best < want and time.monotonic() < deadline and time.monotonic() - since < 1.0:
        time.sleep(0.1)
        now = established(port)
        if now > best:
            best, since = now, time.monotonic()
    return best


# -- (2) stalled client ----------------------------------------------------------------------
def stalled_client(port: int, path: str) -> socket.socket:
    """A client that sends a GET and never reads (a small receive buffer, so it stalls early)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect((HOST, port))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nUser-Agent: stalled\r\n\r\n".encode())
    return s


def crowd(port: int, path: str, n: int, timeout: float) -> tuple[float, list[Fetch | str]]:
    """``n`` clients GET ``path`` at once; (seconds until the last finished or gave up, outcomes)."""
    outcomes: list[Fetch | str] = ["not started"] * n
    barrier = threading.Barrier(n + 1)

    def one(i: int) -> None:
        barrier.wait()
        try:
            outcomes[i] = http_get(port, path, timeout=timeout)
        except (OSError, RuntimeError, ValueError, IndexError) as exc:
            outcomes[i] = f"{type(exc).__name__}"

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join(timeout + 10)
    return time.perf_counter() - t0, outcomes


# -- the benchmark -------------------------------------------------------------------------------
def write_config(path: Path, nginx_port: int) -> None:
    path.write_text(
        f"""[tool.pytest-upstream]
metadata_ttl = 3600

[[tool.pytest-upstream.proxy]]
key = "files"
source = "custom"
format = "generic"
url = "http://{HOST}:{nginx_port}/big"
"""
    )


class Bench:
    def __init__(self, work: Path, profile: Profile, results: Results) -> None:
        self.work, self.p, self.r = work, profile, results
        self.www = work / "www"
        (self.www / "big").mkdir(parents=True)
        self.nginx = Nginx(work, self.www, log_requests=True)
        self.config = work / "pyproject.toml"
        self.logs = work / "proxy-stderr.log"
        self.proxies: list[ProxyProcess] = []
        self._caches = 0

    def prepare(self, parts: str) -> None:
        big = self.www / "big"
        (big / "small.bin").write_bytes(os.urandom(SMALL))
        files = {"2": ("stall.bin", self.p.stall_bytes), "3": ("huge.bin", self.p.big_bytes)}
        files["4"] = ("miss.bin", self.p.miss_bytes)
        for part, (name, size) in files.items():
            if part in parts:
                log(f"writing {size_label(size)} {name}")
                write_random_file(big / name, size)
        write_config(self.config, self.nginx.port)
        self.nginx.start()

    def new_proxy(self, nofile: int | None = None) -> ProxyProcess:
        self._caches += 1
        proxy = ProxyProcess(self.config, self.work / f"cache-{self._caches}", self.logs, nofile=nofile)
        self.proxies.append(proxy)
        expect(http_get(proxy.port, "/files/small.bin", timeout=10), "warm-up miss", SMALL)
        expect(http_get(proxy.port, "/files/small.bin", timeout=10), "warm-up hit", SMALL, "hit")
        return proxy

    def drop_proxy(self, proxy: ProxyProcess) -> None:
        proxy.stop()
        self.proxies.remove(proxy)
        shutil.rmtree(proxy.cache, ignore_errors=True)

    def close(self) -> None:
        for proxy in list(self.proxies):
            self.drop_proxy(proxy)
        self.nginx.stop()

    def section(self, name: str, run: Callable[[], None]) -> None:
        before = load()
        log(f"running {name} (load average {before})")
        t0 = time.monotonic()
        run()
        self.r.detail(
            f"- {name}: {time.monotonic() - t0:.0f} s, load average {before} at start, {load()} at end"
        )

    # (1)
    def held_connections(self) -> None:
        p = self.p
        spacing = max(0.0, (p.hold_seconds - 2.0) / p.probes)
        for count, nofile in ((p.connections, None), (p.emfile_connections, 1024)):
            proxy = self.new_proxy(nofile=nofile)
            limit = f"serve's descriptor limit {nofile}" if nofile else "serve's descriptor limit raised"
            what = f"(1) {count:,} connections held ({limit})"
            try:
                quiet = probe(proxy.port, p.probes, 0.05)
                cpu0, t0 = cpu_seconds(proxy.pid), time.monotonic()
                watch = functools.partial(established, proxy.port)
                holder = Holder(proxy.port, count, server_count=watch).start()
                try:
                    ramp = holder.wait_open(15.0)
                    connected = holder.open_now
                    held = settle(proxy.port, count, 10.0)
                    fds, threads = open_fds(proxy.pid), proc_status_kb(proxy.pid)["Threads"]
                    loaded = probe(
                        proxy.port, p.probes, spacing, until=time.monotonic() + p.hold_seconds, watch=True
                    )
                    cpu = (cpu_seconds(proxy.pid) - cpu0) / (time.monotonic() - t0)
                    fds_end = open_fds(proxy.pid)
                finally:
                    holder.stop()
                alive = proxy.proc.poll() is None
                time.sleep(0.5)
                after = probe(proxy.port, 3, 0.5) if alive else Probes([], ["serve exited"], [])
            finally:
                self.drop_proxy(proxy)
            ok = bool(loaded.times) and not loaded.failures and max(loaded.times) < 0.1
            ratio = (
                f"{statistics.median(loaded.times) / statistics.median(quiet.times):.1f}x median"
                if loaded.times and quiet.times
                else "-"
            )
            self.r.row(
                f"{what}: probe latency",
                loaded.summary(),
                "every probe < 100 ms",
                ok,
                reference=quiet.summary() + " with none held",
                ratio=ratio,
            )
            self.r.row(
                f"{what}: serve's CPU while held", f"{cpu * 100:.0f} % of a core", "(not a target)", None
            )
            self.r.detail(
                f"- {what}: the client side had {connected:,} connected after {ramp:.1f} s, serve's port "
                f"{held:,} established, accepted or queued ({fds:,} descriptors, {threads:,} threads; "
                f"{fds_end:,} descriptors at the end); established at each probe "
                f"{min(loaded.held, default=0):,}-{max(loaded.held, default=0):,}; connects begun "
                f"{holder.started:,}, completed {holder.established:,}, failed {holder.connect_failed:,}, "
                f"timed out {holder.connect_timeouts:,}; closed by serve {holder.closed_by_server:,} "
                f"({holder.answered:,} after an answer); probes ms "
                f"{', '.join(ms(t) for t in loaded.times) or '-'}"
                + (f"; failed probes: {counted(loaded.failures)}" if loaded.failures else "")
                + f"; after release: {after.summary()}; serve {'alive' if alive else 'EXITED'}"
            )

    # (2)
    def stalled(self) -> None:
        p = self.p
        path, size = "/files/stall.bin", p.stall_bytes
        upstream = "/big/stall.bin"
        lone = []
        for _ in range(p.lone_reps):
            proxy = self.new_proxy()
            try:
                f = http_get(proxy.port, path, timeout=p.stall_deadline)
                lone.append(expect(f, "lone cold download", size, "miss").t_total)
                proxy.wait_stored("files", 2)
            finally:
                self.drop_proxy(proxy)
        fetched_before = len(self.nginx.requests(upstream))
        proxy = self.new_proxy()
        stalled: socket.socket | None = None
        try:
            stalled = stalled_client(proxy.port, path)
            time.sleep(0.05)  # its request arrives first and starts the fetch; the others join it
            took, outcomes = crowd(proxy.port, path, p.stall_clients, p.stall_deadline)
        finally:
            if stalled is not None:
                stalled.close()
            self.drop_proxy(proxy)  # ends any upstream transfer still running, so nginx logs it
        fetches = self._settled_requests(upstream)[fetched_before:]
        done = [o for o in outcomes if isinstance(o, Fetch) and o.status == 200 and o.size == size]
        others = [
            o if isinstance(o, str) else f"status {o.status} ({o.size} bytes)"
            for o in outcomes
            if not any(o is d for d in done)
        ]
        alone = statistics.median(lone)
        n = p.stall_clients
        if len(done) == n:
            measured = f"{n} of {n} in {took * 1000:.0f} ms"
            ratio, ok = f"{took / alone:.2f}x", took <= 1.5 * alone
        else:
            measured = f"{len(done)} of {n} finished within {p.stall_deadline:g} s"
            ratio, ok = "-", False
        what = f"(2) one stalled client + {n} clients on one cold {size_label(size)} artifact"
        self.r.row(
            f"{what}: time for the {n}",
            measured,
            "<= 1.5x",
            ok,
            reference=f"lone cold download {alone * 1000:.0f} ms",
            ratio=ratio,
        )
        gets = [f for f in fetches if f[0] == "GET"]
        self.r.row(f"{what}: upstream fetches", f"{len(gets)}", "1", len(gets) == 1)
        times = sorted(o.t_total for o in done)
        self.r.detail(
            f"- {what}: lone download ms {', '.join(f'{t * 1000:.0f}' for t in lone)}; the {n}'s times ms "
            f"{', '.join(f'{t * 1000:.0f}' for t in times) or '-'}"
            + (f"; answered as {counted([o.cache or '(none)' for o in done])}" if done else "")
            + (f"; not finished: {counted(others)}" if others else "")
            + "; upstream requests (method status bytes sent) "
            + (", ".join(f"{m} {s} {b / MiB:.1f} MiB" for m, s, b in fetches) or "none logged")
        )

    def _settled_requests(self, path: str) -> list[tuple[str, int, int]]:
        """nginx logs a request when it ends: wait until the log stops growing (at most 5 s)."""
        last, since = self.nginx.requests(path), time.monotonic()
        deadline = since + 5.0
        while time.monotonic() < deadline and time.monotonic() - since < 1.0:
            time.sleep(0.1)
            now = self.nginx.requests(path)
            if len(now) != len(last):
                last, since = now, time.monotonic()
        return last

    # (3)
    def memory(self) -> None:
        p = self.p
        proxy = self.new_proxy()
        url = f"http://{HOST}:{proxy.port}/files/small.bin"
        burst = 2
        try:
            run_wrk(url, 1)  # warm-up: first allocations, thread pools, memos
            base = proc_status_kb(proxy.pid)
            total, errors, curve, rps = 0, 0, [], []
            while total < p.hits:
                w = run_wrk(url, burst)
                total, errors = total + w.requests, errors + w.errors
                rps.append(w.rps)
                curve.append((total, proc_status_kb(proxy.pid)["VmRSS"]))
            after = proc_status_kb(proxy.pid)
        finally:
            self.drop_proxy(proxy)
        grow = (after["VmRSS"] - base["VmRSS"]) / 1024
        self.r.row(
            f"(3) VmRSS across {total:,} warm hits ({SMALL} B file, wrk keep-alive)",
            f"{after['VmRSS'] / 1024:.1f} MB after ({grow:+.1f} MB)",
            "within +-5 MB",
            abs(grow) <= 5 and errors == 0,
            reference=f"{base['VmRSS'] / 1024:.1f} MB before",
            ratio=f"{grow * 1024 * 1024 / total:+.0f} B per hit",
        )
        self.r.detail(
            f"- (3) hits: wrk -t2 -c16 in {burst} s bursts, {errors} errors, req/s "
            f"{statistics.median(rps):,.0f} (median of bursts); VmRSS MB after each burst "
            + ", ".join(f"{n // 1000}k {kb / 1024:.1f}" for n, kb in curve)
            + f"; VmHWM {base['VmHWM'] / 1024:.1f} -> {after['VmHWM'] / 1024:.1f} MB"
        )
        label = size_label(p.big_bytes)
        proxy = self.new_proxy()
        try:
            base = proc_status_kb(proxy.pid)
            with RssSampler(proxy.pid) as miss:
                f_miss = http_get(proxy.port, "/files/huge.bin", timeout=300)
                expect(f_miss, f"{label} miss", p.big_bytes, "miss")
                proxy.wait_stored("files", 2)
            with RssSampler(proxy.pid) as hit:
                f_hit = expect(
                    http_get(proxy.port, "/files/huge.bin", timeout=300), f"{label} hit", p.big_bytes
                )
            after = proc_status_kb(proxy.pid)
        finally:
            self.drop_proxy(proxy)
        miss_grow = (max(miss.peak_kb, after["VmRSS"]) - base["VmRSS"]) / 1024
        hit_grow = (max(hit.peak_kb, after["VmRSS"]) - base["VmRSS"]) / 1024
        hwm_grow = (after["VmHWM"] - base["VmRSS"]) / 1024
        worst = max(miss_grow, hit_grow, hwm_grow)
        self.r.row(
            f"(3) VmRSS added while serving a {label} artifact (cold miss, then warm hit)",
            f"+{worst:.1f} MB",
            "< 50 MB",
            worst < 50,
            reference=f"{base['VmRSS'] / 1024:.1f} MB before",
        )
        self.r.detail(
            f"- (3) {label}: sampled VmRSS peak during the miss +{miss_grow:.1f} MB "
            f"({f_miss.mb_per_s:.0f} MB/s, "
            f"{miss.samples} samples), during the hit +{hit_grow:.1f} MB ({f_hit.mb_per_s:.0f} MB/s); "
            f"VmHWM after - VmRSS before +{hwm_grow:.1f} MB"
        )

    # (4)
    def cold_miss(self) -> None:
        p = self.p
        size = p.miss_bytes
        direct, through, first, cpus = [], [], [], []
        for i in range(p.miss_reps):
            proxy = self.new_proxy()
            try:
                for who in ("d", "p") if i % 2 == 0 else ("p", "d"):
                    if who == "d":
                        direct.append(
                            expect(http_get(self.nginx.port, "/big/miss.bin"), "direct", size).t_total
                        )
                    else:
                        cpu = cpu_seconds(proxy.pid)
                        f = expect(http_get(proxy.port, "/files/miss.bin", timeout=120), "miss", size, "miss")
                        through.append(f.t_total)
                        first.append(f.t_first)
                        proxy.wait_stored("files", 2)
                        cpus.append(cpu_seconds(proxy.pid) - cpu)
            finally:
                self.drop_proxy(proxy)
        d, t, fb = statistics.median(direct), statistics.median(through), statistics.median(first)
        what = f"(4) cold {size_label(size)} miss"
        self.r.row(
            f"{what}: whole time",
            f"{t * 1000:.0f} ms",
            "<= 2x",
            t / d <= 2.0,
            reference=f"direct download {d * 1000:.0f} ms",
            ratio=f"{t / d:.2f}x",
        )
        self.r.row(f"{what}: first body byte", f"{ms(fb)} ms", "<= 10 ms", fb <= 0.010)
        self.r.detail(
            f"- {what}: {p.miss_reps} runs, fresh cache each, alternating; ms through the proxy "
            f"{', '.join(f'{x * 1000:.0f}' for x in through)}; "
            f"direct {', '.join(f'{x * 1000:.0f}' for x in direct)}; "
            f"first body byte {', '.join(ms(x) for x in first)}; the proxy's CPU time (user + system, "
            f"all its threads) per miss {', '.join(f'{x * 1000:.0f}' for x in cpus)} ms"
        )


# -- report ----------------------------------------------------------------------------------------
HOW = """\
- **Upstream:** nginx (2 workers, sendfile, an access log of method, path, status and bytes sent)
  serving random-byte files from a temp dir; the proxy's upstream fetches are counted from that log.
- **Proxy:** `upstream-proxy --config FILE serve --port 0 --cache DIR` as a child process, a
  `generic` proxy in front of nginx, default settings otherwise; a new process on a fresh cache for
  each measurement, warmed up by one miss and one hit of a 1 KiB file.
- **Client:** the raw-socket reader of `benchmarks/instruments.py` (one connection per request,
  a deadline on the whole exchange); wrk for the warm hits of (3).
- **(1)** one thread holds the connections with non-blocking sockets: half only connect, half send
  `GET /files/small.bin HTTP/1.1`, `Host` and the start of a header line, then one byte of it a
  second. Connects run at most 64 ahead of the connections serve's port has established (`ss`), so
  none is lost unseen to a full listen backlog. Any the server closes (or answers) are opened again,
  and a connect not completed in 3 s is retried, so the pressure stays on. Once all are open and
  serve's count stops rising, probes of the 1 KiB file (a new connection each, a 2 s deadline) run
  spread over the hold (30 s in a full run; fewer when they time out); the reference is the same probes
  just before, with nothing held. The second variant starts serve with a soft
  `RLIMIT_NOFILE` of 1,024 (the usual default) and holds 1,100; serve's CPU use over the hold shows
  an accept loop spinning on EMFILE. The bench raises its own descriptor limit; the first serve
  inherits it.
- **(2)** the lone time is a cold download through a fresh proxy, alone (median of the runs). Then a
  fresh proxy gets the stalled client first (a 4 KiB receive buffer, a GET, never a read), and
  50 ms later the clients start together, while the fetch runs; each gives up at the deadline (their
  `X-Upstream-Cache` answers are listed). Time runs from their start
  to the last one's last byte. Upstream fetches: nginx's log lines for the file, read after the
  proxy was stopped (nginx logs a transfer when it ends).
- **(3)** wrk `-t2 -c16` (keep-alive) on the warm 1 KiB file in 2 s bursts until the count is
  reached, VmRSS read from `/proc/PID/status` after a 1 s warm-up burst and after each burst. Then a
  fresh proxy serves the big file as a cold miss and once more as a warm hit while VmRSS is sampled
  every 5 ms; growth = the highest of the sampled peaks and VmHWM, minus VmRSS before.
- **Load average** counts runnable threads, serve's own among them: the 1,000 threads of the
  current server waking at once when (1) releases its connections show up in it.
- **(4)** a fresh proxy per run; a direct download from nginx and one through the proxy
  alternate. First body byte: connect to the first byte after the proxy's headers. The proxy's CPU
  time per miss (`/proc/PID/stat`, user + system, every thread, until the entry is stored) is
  listed because it moves far less with the machine's load than the wall time does.
"""


def render(info: dict[str, str], tools: str, profile: Profile, quick: bool, r: Results, took: float) -> str:
    out = [
        "## The serving core as a service: `benchmarks/service_bench.py`",
        "",
        "Issue 9's service targets on loopback, each next to a reference measured in the same run "
        "(ratios, since absolute figures on a shared 2-core machine are noisy).",
    ]
    if quick:
        out += ["", "**`--quick` run: small sizes, short holds; a smoke check, not a measurement.**"]
    out += ["", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in info.items())]
    out += [f"| Tools | {tools} |", f"| Run time | {took:.0f} s |", f"| Load average at end | {load()} |"]
    start = float(info["Load average at start"].split(",")[0])
    if busy(start, os.getloadavg()[0]):
        out += [
            "",
            "*The machine was busy with other work (load average above the core count): the figures "
            "are noisy, and the Python proxy loses more to that than nginx does.*",
        ]
    out += [
        "",
        "| Measurement | Measured | Reference | Ratio | Target | Result |",
        "|---|---|---|---|---|---|",
        *(
            f"| {w.label} | {w.measured} | {w.reference} | {w.ratio} | {w.target} | {w.verdict} |"
            for w in r.rows
        ),
        "",
        "### Raw numbers",
        "",
        *r.details,
        "",
        "### How it is measured",
        "",
        HOW,
        "```sh",
        "benchmarks/setup.sh                                   # nginx, wrk, curl via apt-get (if missing)",
        ".venv/bin/python benchmarks/service_bench.py          # full run; rewrites this section",
        ".venv/bin/python benchmarks/service_bench.py --quick  # smoke check, prints only",
        ".venv/bin/python benchmarks/service_bench.py --only 2 # one part: any of 1, 2, 3, 4",
        "```",
        "",
        f"Needs about {size_label(profile.big_bytes + profile.miss_bytes + profile.stall_bytes)} free under "
        "the temp dir (`--tmp DIR`) plus the proxy's copies; everything is removed afterwards.",
    ]
    return "\n".join(out) + "\n"


def code_version() -> str:
    """The commit measured (and whether its code had changes), so figures can be told apart."""
    try:
        rev = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no", "--", *CODE],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"commit {rev}" + (" with uncommitted changes" if dirty else "")


def tool_versions(nginx: Nginx) -> str:
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    words = (wrk.stdout + wrk.stderr).split()
    return f"{nginx.version()}, wrk {words[1] if len(words) > 1 else '?'}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, short holds, fewer hits")
    parser.add_argument("--only", default="1234", help="which parts to run: any of 1, 2, 3, 4")
    parser.add_argument(
        "--output",
        type=Path,
        help="where to write the report (default: docs/benchmarks.md; --quick prints it)",
    )
    parser.add_argument("--tmp", type=Path, help="parent of the temp dir (default: the system's)")
    args = parser.parse_args()
    if shutil.which("wrk") is None or (
        shutil.which("nginx") is None and not Path("/usr/sbin/nginx").exists()
    ):
        sys.exit("nginx or wrk not found: run benchmarks/setup.sh first")
    profile = QUICK if args.quick else FULL
    limit = raise_file_limit(4 * max(profile.connections, profile.emfile_connections) + 256)
    log(f"descriptor limit of this process and the proxies it starts: {limit}")
    output = args.output or (None if args.quick else DOC)
    info = machine()
    date = info.pop("Date")
    info = {**info, "Code": code_version(), "Load average at start": load(), "Date": date}
    results = Results(echo_details=True)
    started = time.monotonic()
    with work_dir("upstream-service-bench-", args.tmp, logs=["proxy-stderr.log", "nginx/error.log"]) as work:
        bench = Bench(work, profile, results)
        try:
            bench.prepare(args.only)
            tools = tool_versions(bench.nginx)
            parts = {
                "1": ("(1) held connections", bench.held_connections),
                "2": ("(2) stalled client", bench.stalled),
                "3": ("(3) memory", bench.memory),
                "4": ("(4) cold miss", bench.cold_miss),
            }
            for key, (name, run) in parts.items():
                if key in args.only:
                    bench.section(name, run)
        finally:
            bench.close()
    took = time.monotonic() - started
    report = render(info, tools, profile, args.quick, results, took)
    publish(output, "service_bench.py", report, results.missed, took)
    return 0


if __name__ == "__main__":
    sys.exit(main())
