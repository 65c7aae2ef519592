"""What the benchmark scripts share: child processes, the proxy, the machine, the report.

``run.py``, ``service_bench.py``, ``build_bench.py`` and ``docker_bench.py`` each measure
something else, but all of them start ``upstream-proxy serve`` and other servers as child
processes and stop them again, work in a temp dir that is removed at the end (showing the
proxies' stderr when a run fails), describe the machine they ran on, and write their own
section of docs/benchmarks.md.  That is done here, once.  (The instruments ``run.py`` and
``service_bench.py`` share, a raw-socket client, nginx, wrk and /proc readings, are in
``instruments.py``.)

Each script's section sits between two marker comments, ``<!-- NAME: begin ... -->`` and
``<!-- NAME: end -->`` (NAME is the script's file name); a full run replaces what is between
them and leaves the rest of the file alone, so the scripts can run in any order.

Importing this module puts the repository root on ``sys.path``, for ``pytest_upstream``,
``tests`` and ``fixtures``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pytest_upstream.store.files import atomic_write  # noqa: E402
from tests.peers import free_port  # noqa: E402

__all__ = [
    "DOC",
    "ROOT",
    "ProxyProcess",
    "Results",
    "Row",
    "busy",
    "free_port",
    "log",
    "machine",
    "raise_file_limit",
    "stop",
    "wait_port",
    "work_dir",
    "write_section",
]

HOST = "127.0.0.1"
DOC = ROOT / "docs" / "benchmarks.md"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- child processes ---------------------------------------------------------------------
def stop(proc: subprocess.Popen[Any] | None, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    """Signal a child (SIGTERM lets the proxy close its cache cleanly), then kill it if it stays."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def wait_port(port: int, proc: subprocess.Popen[Any], timeout: float = 15.0) -> None:
    """Wait until something listens on ``port``; fail early if ``proc`` exits instead."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {HOST}:{port} after {timeout}s")


_BASE_URL = re.compile(r"http://[0-9.]+:[0-9]+")


def raise_file_limit(want: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards ``want`` (children inherit it); the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        soft = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


def proxy_command() -> list[str]:
    script = Path(sys.executable).parent / "upstream-proxy"
    return [str(script)] if script.exists() else [sys.executable, "-m", "pytest_upstream"]


class ProxyProcess:
    """``upstream-proxy --config FILE serve --port 0 --cache DIR [--workers N] [EXTRA...]``, a child
    process (with ``nofile``: its descriptor limits, soft and hard, set to that).

    Its stderr is appended to ``stderr`` (``work_dir`` shows the end of it when a run fails);
    its stdout, after the first line (the URL), is drained so it never blocks on a full pipe.
    """

    def __init__(
        self,
        config: Path,
        cache: Path,
        stderr: Path,
        workers: int = 1,
        nofile: int | None = None,
        extra: Sequence[str] = (),
    ) -> None:
        self.cache = cache
        self._stderr = open(stderr, "ab")  # noqa: SIM115 - closed in stop()
        command = [*proxy_command(), "--config", str(config), "serve", "--port", "0", "--cache", str(cache)]
        self.proc = subprocess.Popen(
            [*command, *(["--workers", str(workers)] if workers != 1 else []), *extra],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        if nofile is not None:  # set at once, long before the child opens many descriptors
            # Both limits: serve raises its soft limit to the hard one when it starts.
            _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            limit = min(nofile, hard)
            resource.prlimit(self.proc.pid, resource.RLIMIT_NOFILE, (limit, limit))
        assert self.proc.stdout is not None
        # The base URL is the first http:// URL of the banner's first lines (its wording may change).
        lines: list[str] = []
        while len(lines) < 5 and (line := self.proc.stdout.readline()):
            lines.append(line.strip())
            if found := _BASE_URL.search(line):
                break
        else:
            self.stop()
            raise RuntimeError(f"upstream-proxy did not print its URL (got {lines!r}); see {stderr}")
        self.base_url = found.group(0)
        self.port = int(self.base_url.rsplit(":", 1)[1])
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def url(self, key: str) -> str:
        return f"{self.base_url}/{key}/"

    def wait_stored(self, key: str, count: int, timeout: float = 60.0) -> None:
        """Wait until ``count`` entries of ``key`` are indexed (the blob is committed then)."""
        deadline = time.monotonic() + timeout
        base = self.cache / "entries" / key
        while time.monotonic() < deadline:
            if base.is_dir() and sum(1 for _ in base.rglob("*.json")) >= count:
                return
            time.sleep(0.02)
        raise RuntimeError(f"the proxy did not index {count} entries under {base} within {timeout}s")

    def stop(self) -> None:
        stop(self.proc)
        self._stderr.close()

    def __enter__(self) -> ProxyProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def work_dir(prefix: str, parent: Path | None, logs: Iterable[str] = ()) -> Iterator[Path]:
    """A temp dir for one run, removed at the end.  When the run fails, the last lines of the
    files named ``logs`` (globs relative to the dir: the proxies' stderr) are shown first."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield work
    except BaseException:
        for pattern in logs:
            for path in sorted(work.glob(pattern)):
                with contextlib.suppress(OSError):
                    tail = path.read_text(errors="replace").splitlines()[-40:]
                    if tail:
                        log(f"last lines of {path.relative_to(work)}:\n" + "\n".join(tail))
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- the machine ---------------------------------------------------------------------------
def _first(path: str, prefix: str, sep: str) -> str | None:
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.split(sep, 1)[1].strip().strip('"')
    return None


def machine() -> dict[str, str]:
    """CPU, cores, RAM, kernel, OS, Python and the date, for a report's machine line or table."""
    ram = "unknown"
    with contextlib.suppress(OSError, IndexError, ValueError):
        kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
        ram = f"{kb / 1024 / 1024:.1f} GiB"
    return {
        "CPU": _first("/proc/cpuinfo", "model name", ":") or "unknown",
        "Cores": str(os.cpu_count()),
        "RAM": ram,
        "Kernel": f"{platform.system()} {platform.release()}",
        "OS": _first("/etc/os-release", "PRETTY_NAME=", "=") or platform.platform(),
        "Python": f"{platform.python_version()} ({sys.executable})",
        "Date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def busy(*loads: float) -> bool:
    """True when a 1-minute load average was above the core count (the figures are noisy)."""
    return max(loads) > (os.cpu_count() or 1)


# -- results -------------------------------------------------------------------------------
@dataclass
class Row:
    """One measured line of a report: against a ``target`` (``ok``), or informational (None)."""

    label: str
    measured: str
    target: str
    ok: bool | None
    reference: str = ""  # what it is compared with, measured in the same run
    ratio: str = ""

    @property
    def verdict(self) -> str:
        return "" if self.ok is None else ("PASS" if self.ok else "MISS")


@dataclass
class Results:
    """The rows and the raw-number lines of one run, logged as they come."""

    rows: list[Row] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    echo_details: bool = False

    def row(
        self, label: str, measured: str, target: str, ok: bool | None, *, reference: str = "", ratio: str = ""
    ) -> None:
        self.rows.append(Row(label, measured, target, ok, reference, ratio))
        against = f" (reference: {reference}; {ratio or 'no ratio'})" if reference else ""
        verdict = " (reference)" if ok is None and not reference else ""
        verdict = verdict if ok is None else f" (target {target}) {'PASS' if ok else 'MISS'}"
        log(f"{label}: {measured}{against}{verdict}")

    def detail(self, text: str) -> None:
        self.details.append(text)
        if self.echo_details:
            log(text)

    @property
    def missed(self) -> list[str]:
        return [row.label for row in self.rows if row.ok is False]


# -- the report ----------------------------------------------------------------------------
def markers(name: str) -> tuple[str, str]:
    return (
        f"<!-- {name}: begin (this section is rewritten by benchmarks/{name}) -->",
        f"<!-- {name}: end -->",
    )


def write_section(path: Path, name: str, text: str) -> None:
    """Put ``text`` between ``name``'s markers in ``path``: in place, or appended if missing."""
    begin, end = markers(name)
    section = f"{begin}\n{text.strip(chr(10))}\n{end}"
    old = path.read_text() if path.exists() else ""
    head, found, rest = old.partition(begin)
    if found and end in rest:
        new = head + section + rest.partition(end)[2]
    else:
        new = (old.rstrip("\n") if old.strip() else "# Benchmarks") + "\n\n" + section + "\n"
    atomic_write(path, new.encode())


def publish(output: Path | None, script: str, report: str, missed: list[str], took: float) -> None:
    """Print ``report`` (no ``output``) or put it in ``script``'s section of ``output``; then the
    closing line every benchmark prints."""
    if output is None:
        print(report)
    else:
        write_section(output, script, report)
        log(f"wrote its section of {output}")
    log(f"done in {took:.0f} s; {len(missed)} target(s) missed")
