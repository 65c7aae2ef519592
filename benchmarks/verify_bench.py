"""First hit of a large blob in a new process vs later hits: what blob verification costs.

    python benchmarks/verify_bench.py            # ~1 minute, writes its section of docs/benchmarks.md
    python benchmarks/verify_bench.py --quick    # fewer runs, prints the section only

A 300 MB blob is written in 16 MB blocks into a fresh cache (``Cache.writer`` and
``commit_blob``, as a download is).  Then each run starts a new process that serves the blob
several times the way a hit does: ``Cache.verified_digest`` (is it intact?), then ``sendfile``
of the whole blob into a socket that another thread drains.  The first hit of a process is
timed apart from the later ones (which find the answer in memory).  The ratio is the later
hits' median time over the first hits' median: 1.0x means a new process (a new CI job, a new
xdist worker) serves its first hit as fast as a warm one.

Two rounds: "marker" is the cache as it is (the writer left a verification marker, so a new
process trusts the blob without reading it); "no marker" deletes the marker before each run,
which is how every process behaved before markers (it re-hashed every blob on first use).
Standalone: the standard library and this package.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from harness import write_section  # noqa: E402

from pytest_upstream.config.units import human_size  # noqa: E402
from pytest_upstream.store.cache import Cache  # noqa: E402
from pytest_upstream.store.layout import Layout  # noqa: E402

SECTION = "## Blob verification: first hit in a new process"
DOC = ROOT / "docs" / "benchmarks.md"
MiB = 1024 * 1024
BLOCK = 16 * MiB
TARGET = 0.8

CHILD = textwrap.dedent(
    """
    import json, os, socket, sys, threading, time
    from pytest_upstream.store.cache import Cache

    root, sha, size, hits = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    out, into = socket.socketpair()
    into.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)

    def drain():
        while into.recv(1 << 20):
            pass

    threading.Thread(target=drain, daemon=True).start()
    cache = Cache(root)
    times = []
    for _ in range(hits):
        start = time.perf_counter()
        path = cache.verified_digest(sha, size)
        assert path is not None
        with open(path, "rb") as f:
            sent = 0
            while sent < size:
                sent += os.sendfile(out.fileno(), f.fileno(), sent, size - sent)
        times.append(time.perf_counter() - start)
    out.close()
    print(json.dumps(times))
    """
)


def write_blob(cache: Cache, size: int) -> str:
    blocks = [os.urandom(BLOCK) for _ in range(3)]
    writer = cache.writer()
    written = 0
    i = 0
    while written < size:
        block = blocks[i % len(blocks)][: size - written]
        writer.write(block)
        written += len(block)
        i += 1
    sha, _ = cache.commit_blob(writer, {}, "benchmark blob")
    return sha


def run_child(root: Path, sha: str, size: int, hits: int) -> list[float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(root), sha, str(size), str(hits)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    times: list[float] = json.loads(out)
    return times


def measure(root: Path, sha: str, size: int, runs: int, hits: int, marker: bool) -> tuple[float, float]:
    """Medians of (first hit, later hits) over ``runs`` new processes."""
    firsts: list[float] = []
    laters: list[float] = []
    for _ in range(runs):
        if not marker:
            Path(Layout(root).marker(sha)).unlink(missing_ok=True)
        times = run_child(root, sha, size, hits)
        firsts.append(times[0])
        laters.extend(times[1:])
    return statistics.median(firsts), statistics.median(laters)


def section(size: int, runs: int, hits: int, rows: list[tuple[str, float, float]]) -> str:
    lines = [
        SECTION,
        "",
        f"`benchmarks/verify_bench.py`: a {human_size(size)} blob in a fresh cache; {runs} new processes,",
        f"each serving it {hits} times like a hit (`Cache.verified_digest`, then `sendfile` into a drained",
        "socket). Ratio = median later hit / median first hit (1.0x: the first hit is as fast as a",
        f"warm one; target >= {TARGET}x). Machine: {platform.machine()}, {os.cpu_count()} cores,",
        f"Python {platform.python_version()}.",
        "",
        "| cache | first hit | later hits | ratio |",
        "|---|---|---|---|",
    ]
    for label, first, later in rows:
        lines.append(f"| {label} | {first * 1000:.0f} ms | {later * 1000:.0f} ms | {later / first:.2f}x |")
    lines += [
        "",
        '"no marker" deletes the blob\'s verification marker before each process: every process then',
        "re-hashes the blob on its first use, as all did before markers (docs/cache.md).",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer runs; print the section only")
    parser.add_argument("--size-mb", type=int, default=300)
    parser.add_argument("--output", type=Path, help=f"file to put the section in (default {DOC})")
    args = parser.parse_args()
    runs, hits = (2, 3) if args.quick else (5, 4)
    size = args.size_mb * MiB
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="verify-bench-") as tmp:
        root = Path(tmp) / "cache"
        sha = write_blob(Cache(root), size)
        rows = []
        for label, marker in (("marker (now)", True), ("no marker (before)", False)):
            first, later = measure(root, sha, size, runs, hits, marker)
            print(f"{label}: first {first * 1000:.0f} ms, later {later * 1000:.0f} ms, {later / first:.2f}x")
            rows.append((label, first, later))
    text = section(size, runs, hits, rows)
    print(f"({time.monotonic() - started:.0f}s)\n")
    output = args.output or (None if args.quick else DOC)
    if output is None:
        print(text)
    else:
        write_section(output, "verify_bench.py", text)
        print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
