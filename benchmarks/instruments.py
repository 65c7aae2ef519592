"""The measuring instruments the benchmark scripts share: a raw-socket HTTP client, nginx as
upstream and peer, wrk, and the proxy process's memory, CPU and descriptors from /proc.

``run.py`` and ``service_bench.py`` measure different targets with the same instruments, so the
figures of one can be read next to the other's.  (Process start/stop, the machine and the report
file are in ``harness.py``.)
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from harness import free_port, stop, wait_port

__all__ = [
    "HOST",
    "Fetch",
    "MiB",
    "Nginx",
    "RssSampler",
    "WrkResult",
    "cpu_seconds",
    "curl_get",
    "established",
    "expect",
    "http_get",
    "open_fds",
    "proc_status_kb",
    "run_wrk",
    "write_random_file",
]

HOST = "127.0.0.1"
MiB = 1024 * 1024


# -- clients ---------------------------------------------------------------
@dataclass
class Fetch:
    status: int
    headers: dict[str, str]
    size: int
    t_head: float  # seconds from connect to the end of the response headers
    t_first: float  # ... to the first body byte
    t_total: float  # ... to the last body byte
    max_gap: float = 0.0  # the longest wait between two reads of the body

    @property
    def mb_per_s(self) -> float:
        return self.size / self.t_total / 1e6

    @property
    def cache(self) -> str:
        return self.headers.get("x-upstream-cache", "")


_BUFFERS = threading.local()


def _buffer() -> memoryview:
    """This thread's reused 8 MiB receive buffer (clients in several threads must not share one)."""
    buf: memoryview | None = getattr(_BUFFERS, "buf", None)
    if buf is None:
        buf = _BUFFERS.buf = memoryview(bytearray(8 * MiB))
    return buf


def http_get(
    port: int, path: str, headers: dict[str, str] | None = None, timeout: float | None = None
) -> Fetch:
    """One GET over a fresh connection; the body is read into a reused 8 MiB buffer and dropped.

    A raw-socket reader (recv_into, no parsing of the body) so the client
    costs next to nothing next to the server it measures, and it can tell
    the first body byte apart from the headers.  ``timeout`` bounds the whole
    exchange (connect to last byte): past it, ``TimeoutError``.
    """
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {HOST}:{port}",
        "User-Agent: upstream-bench",
        "Connection: close",
    ]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    mv = _buffer()
    t0 = time.perf_counter()
    deadline = None if timeout is None else t0 + timeout

    def left() -> float | None:
        if deadline is None:
            return None
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            raise TimeoutError(f"GET {path}: no whole answer within {timeout:g} s")
        return remaining

    with socket.create_connection((HOST, port), timeout=left()) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(request)
        head = bytearray()
        while (end := head.find(b"\r\n\r\n")) < 0:
            s.settimeout(left())
            n = s.recv_into(mv)
            if not n:
                raise RuntimeError(f"GET {path}: connection closed before the headers ended")
            head += mv[:n]
        t_head = time.perf_counter()
        status_line, *header_lines = head[:end].decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        hdrs: dict[str, str] = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            hdrs[name.strip().lower()] = value.strip()
        if "chunked" in hdrs.get("transfer-encoding", "").lower():
            raise RuntimeError(f"GET {path}: unexpected chunked body (no Content-Length)")
        length = int(hdrs["content-length"]) if "content-length" in hdrs else None
        got = len(head) - end - 4
        t_first = t_head if got else 0.0
        max_gap, last = 0.0, t_head
        while length is None or got < length:
            if deadline is not None:
                s.settimeout(left())
            n = s.recv_into(mv)
            now = time.perf_counter()
            if not n:
                break
            if not t_first:
                t_first = now
            got += n
            max_gap, last = max(max_gap, now - last), now
        t_end = time.perf_counter()
    if length is not None and got != length:
        raise RuntimeError(f"GET {path}: got {got} of {length} bytes")
    return Fetch(status, hdrs, got, t_head - t0, (t_first or t_end) - t0, t_end - t0, max_gap)


def curl_get(url: str) -> Fetch:
    """The same GET with curl (a cross-check that the Python reader is not the bottleneck)."""
    fmt = "%{http_code} %{size_download} %{time_starttransfer} %{time_total}"
    out = subprocess.run(
        ["curl", "-s", "-o", "/dev/null", "-w", fmt, url], check=True, capture_output=True, text=True
    ).stdout.split()
    return Fetch(int(out[0]), {}, int(out[1]), float(out[2]), float(out[2]), float(out[3]))


def expect(f: Fetch, what: str, size: int, cache: str | None = None) -> Fetch:
    if f.status != 200 or f.size != size or (cache is not None and f.cache != cache):
        raise RuntimeError(
            f"{what}: status {f.status}, {f.size} bytes, X-Upstream-Cache {f.cache!r} "
            f"(expected 200, {size} bytes, {cache!r})"
        )
    return f


# -- servers ---------------------------------------------------------------
class Nginx:
    """nginx from a generated config: ``port`` serves ``www`` (sendfile), ``cache_port`` is nginx's
    own pull-through cache in front of it.  With ``log_requests`` the first server writes one line
    per finished request (method, path, status, body bytes sent) that ``requests`` reads: the
    count of upstream fetches a proxy made.  Off by default, since logging costs nginx time."""

    def __init__(self, work: Path, www: Path, log_requests: bool = False) -> None:
        self.dir = work / "nginx"
        self.dir.mkdir()
        self.port = free_port()
        self.cache_port = free_port()  # nginx's own pull-through cache, a reference for (b)
        self.binary = shutil.which("nginx") or "/usr/sbin/nginx"
        user = "user root;\n" if os.geteuid() == 0 else ""
        temps = "".join(
            f"    {name}_temp_path {self.dir / name};\n"
            for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        self.access_log = self.dir / "access.log"
        access = f"access_log {self.access_log} bench;" if log_requests else ""
        self.conf = self.dir / "nginx.conf"
        self.conf.write_text(
            f"""{user}worker_processes 2;
daemon off;
pid {self.dir / "nginx.pid"};
error_log {self.dir / "error.log"} warn;
events {{ worker_connections 1024; }}
http {{
    types {{ text/html html; application/octet-stream bin whl; }}
    default_type application/octet-stream;
    access_log off;
    log_format bench '$request_method $uri $status $body_bytes_sent';
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 1000000;
{temps}    proxy_cache_path {self.dir / "cache"} levels=1:2 keys_zone=bench:10m max_size=8g use_temp_path=off;
    server {{
        listen {HOST}:{self.port};
        root {www};
        {access}
        location / {{ }}
    }}
    server {{
        listen {HOST}:{self.cache_port};
        location / {{
            proxy_pass http://{HOST}:{self.port};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache bench;
            proxy_cache_valid 200 1h;
            add_header X-Cache-Status $upstream_cache_status;
        }}
    }}
}}
"""
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Nginx:
        self.proc = subprocess.Popen(
            [self.binary, "-p", str(self.dir), "-e", str(self.dir / "error.log"), "-c", str(self.conf)],
            stdin=subprocess.DEVNULL,
        )
        wait_port(self.port, self.proc)
        wait_port(self.cache_port, self.proc)
        return self

    def stop(self) -> None:
        stop(self.proc, signal.SIGQUIT)

    def requests(self, path: str) -> list[tuple[str, int, int]]:
        """(method, status, body bytes sent) of each finished request for ``path`` (logged at the
        end of a request: one still sending is not listed yet)."""
        out: list[tuple[str, int, int]] = []
        with contextlib.suppress(FileNotFoundError):
            for line in self.access_log.read_text().splitlines():
                method, uri, status, sent = line.split(" ")
                if uri == path:
                    out.append((method, int(status), int(sent)))
        return out

    def version(self) -> str:
        out = subprocess.run([self.binary, "-v"], capture_output=True, text=True)
        return (out.stderr or out.stdout).strip().removeprefix("nginx version: ")


# -- the proxy process, from /proc ----------------------------------------------
def proc_status_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM in KiB, and Threads (a count)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM", "Threads"):
                out[name] = int(value.split()[0])
    return out


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used (a process spinning on EMFILE shows here)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def open_fds(pid: int) -> int:
    """How many descriptors the process holds."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def established(port: int) -> int:
    """Connections to ``port`` that the server side has established (``ss``): a client's view
    overcounts, since a connect the listen backlog dropped still looks open until it sends."""
    try:
        out = subprocess.run(
            ["ss", "-tanH", "state", "established", f"( sport = :{port} )"], capture_output=True, text=True
        ).stdout
    except FileNotFoundError:  # no iproute2: unknown
        return -1
    return sum(1 for line in out.splitlines() if line.strip())


class RssSampler:
    """Polls VmRSS of a process every few milliseconds while a transfer runs."""

    def __init__(self, pid: int, interval: float = 0.005) -> None:
        self.pid, self.interval = pid, interval
        self.peak_kb = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, KeyError):
                self.peak_kb = max(self.peak_kb, proc_status_kb(self.pid)["VmRSS"])
                self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# -- files ---
def write_random_file(path: Path, size: int) -> None:
    """Random (incompressible) bytes: a 16 MiB random block repeated, written in chunks."""
    block = os.urandom(min(size, 16 * MiB))
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, len(block))
            f.write(block[:n] if n < len(block) else block)
            left -= n


# -- wrk -------------------------------------------------------------------
@dataclass
class WrkResult:
    rps: float
    requests: int
    errors: int
    p50_ms: float
    p99_ms: float


def _ms(value: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value)
    if not m:
        return float("nan")
    return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[m.group(2)]


def run_wrk(url: str, seconds: int) -> WrkResult:
    out = subprocess.run(
        ["wrk", "-t2", "-c16", f"-d{seconds}s", "--latency", "-H", "Accept: text/html", url],
        check=True,
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = 0
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(g) for g in m.groups())
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    return WrkResult(
        rps,
        requests,
        errors,
        _ms(p50.group(1)) if p50 else float("nan"),
        _ms(p99.group(1)) if p99 else float("nan"),
    )
