"""An ``s3://`` cache, measured (issue 11): the local tier in front of a bucket on SeaweedFS.

    python benchmarks/shared_cache_bench.py            # ~1 minute, writes its section of docs/benchmarks.md
    python benchmarks/shared_cache_bench.py --quick    # fewer runs, prints the section only

A ``weed mini`` (tests/s3_peers.py) and nginx (the upstream, serving a 100 MiB random file) on
loopback; ``upstream-proxy serve`` processes with ``cache = "s3://…"`` and a local tier each:

- **(1) cold miss through the store path**: a proxy with an empty local tier and an empty bucket
  (a new prefix each run) fetches from nginx, stores locally and publishes to the bucket;
  against a direct download from nginx (each new proxy first has one small miss: the first
  request of a process waits for boto3's import and client);
- **(2) a local miss served from the bucket**: a second proxy ("another machine", empty local
  tier) gets what the first published; against a direct streamed GET of the same object with the
  same library (boto3), hashed with sha256 as the proxy hashes what it pulls (target >= 0.8x);
- **(3) a local-tier hit**: the second proxy again; against nginx serving the file (as (a) of
  run.py);
- **(4) object-store calls per warm hit**: the shared tier's counters in ``/-/metrics`` before
  and after 200 warm hits (target 0).

The client is the raw-socket reader of instruments.py; figures are medians of runs alternating
with their reference, compared within one run.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from harness import DOC, busy, log, machine, proxy_command, publish, stop, work_dir
from instruments import Nginx, http_get, write_random_file

from pytest_upstream.config.s3_location import S3Location
from tests.s3_peers import ACCESS_KEY, SECRET_KEY, S3Peer, seaweedfs

MiB = 1024 * 1024
SCRIPT = "shared_cache_bench.py"
SIZE = 100 * MiB
_BASE_URL = re.compile(r"http://[0-9.]+:[0-9]+")


class Machine:
    """``upstream-proxy serve`` with an ``s3://`` cache and a local tier of its own."""

    def __init__(self, work: Path, name: str, peer: S3Peer, prefix: str, upstream: str) -> None:
        config = work / f"{name}.toml"
        config.write_text(
            "[tool.pytest-upstream]\n"
            f'cache = "s3://{peer.bucket}/{prefix}"\n'
            f'local_cache = "{work / name}"\n'
            f's3_endpoint_url = "{peer.endpoint}"\n'
            's3_region = "us-east-1"\n'
            "[[tool.pytest-upstream.proxy]]\n"
            f'key = "g"\nformat = "generic"\nurl = "{upstream}"\n'
        )
        env = {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
        self.stderr = open(work / f"{name}.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*proxy_command(), "--config", str(config), "serve", "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        found = _BASE_URL.search(line)
        if not found:
            self.stop()
            raise RuntimeError(f"serve printed {line!r}")
        self.base_url = found.group(0)
        self.port = int(self.base_url.rsplit(":", 1)[1])
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def get(self, path: str, size: int = SIZE) -> float:
        f = http_get(self.port, f"/g/{path}", timeout=120)
        assert f.status == 200 and f.size == size, (f.status, f.size)
        return f.t_total

    def store_events(self) -> dict[str, int]:
        with urllib.request.urlopen(f"{self.base_url}/-/metrics", timeout=10) as resp:
            text = resp.read().decode()
        prefix = 'upstream_proxy_object_store_events_total{event="'
        return {
            line[len(prefix) :].split('"', 1)[0]: int(float(line.rsplit(" ", 1)[1]))
            for line in text.splitlines()
            if line.startswith(prefix)
        }

    def store_calls(self) -> int:
        """The shared tier's events so far (every one is a call to the bucket, or one skipped)."""
        with urllib.request.urlopen(f"{self.base_url}/-/metrics", timeout=10) as resp:
            text = resp.read().decode()
        return sum(
            int(float(line.rsplit(" ", 1)[1]))
            for line in text.splitlines()
            if line.startswith("upstream_proxy_object_store_events_total{")
        )

    def stop(self) -> None:
        stop(self.proc)
        self.stderr.close()


def s3_client(peer: S3Peer) -> Any:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=peer.endpoint,
        region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
    )


def wait_published(machine: Machine, peer: S3Peer, location: S3Location, count: int) -> None:
    """Until ``machine`` published ``count`` entries (or found newer ones) and released its claims
    (at most 60 s): it publishes after its client had the last byte, and another machine asking
    before that would wait for the claim (polling) instead of pulling: not what (2) measures."""
    client, deadline = s3_client(peer), time.monotonic() + 60
    while (
        sum(machine.store_events().get(event, 0) for event in ("published", "publish_conflicts")) < count
        or client.list_objects_v2(Bucket=peer.bucket, Prefix=location.key("leases/")).get("KeyCount", 0) > 0
    ):
        if time.monotonic() > deadline:
            raise TimeoutError("the object was never published")
        time.sleep(0.02)


def direct_store_get(peer: S3Peer, key: str) -> float:
    """A streamed GET of ``key`` with boto3, 1 MiB reads hashed with sha256; seconds."""
    client = s3_client(peer)
    start = time.perf_counter()
    body = client.get_object(Bucket=peer.bucket, Key=key)["Body"]
    digest = hashlib.sha256()
    while chunk := body.read(MiB):
        digest.update(chunk)
    return time.perf_counter() - start


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs; print the section only")
    parser.add_argument("--output", type=Path, default=DOC, help="the file whose section is rewritten")
    args = parser.parse_args()
    runs = 2 if args.quick else 5
    started = time.monotonic()
    load_before = os.getloadavg()
    with work_dir("shared-cache-bench-", None, logs=("*.log",)) as work:
        www = work / "www"
        www.mkdir()
        write_random_file(www / "big.bin", SIZE)
        write_random_file(www / "warm.bin", 1024)
        sha = hashlib.sha256((www / "big.bin").read_bytes()).hexdigest()
        nginx = Nginx(work, www).start()
        try:
            with seaweedfs(work / "weed") as peer:
                rows = measure(work, peer, nginx, sha, runs)
        finally:
            nginx.stop()
    took = time.monotonic() - started
    load_after = os.getloadavg()
    report, missed = render(rows, load_before, load_after, runs, took)
    publish(None if args.quick else args.output, SCRIPT, report, missed, took)
    return 0


def measure(work: Path, peer: S3Peer, nginx: Nginx, sha: str, runs: int) -> dict[str, list[float]]:
    upstream = f"http://127.0.0.1:{nginx.port}/"
    rows: dict[str, list[float]] = {k: [] for k in ("cold", "direct", "pull", "s3get", "hit", "nginx")}
    calls = 0
    for run in range(runs):
        prefix = f"bench-{uuid.uuid4().hex[:8]}"
        a = Machine(work, f"a{run}", peer, prefix, upstream)
        b = Machine(work, f"b{run}", peer, prefix, upstream)
        try:
            a.get("warm.bin", 1024)  # a small miss first: a new process makes its S3 client
            b.get("warm.bin", 1024)  # (a proxy that runs for a while has it already)
            rows["direct"].append(http_get(nginx.port, "/big.bin", timeout=60).t_total)
            rows["cold"].append(a.get("big.bin"))
            location = S3Location(peer.bucket, prefix, peer.endpoint, "us-east-1")
            wait_published(a, peer, location, 2)  # warm.bin and big.bin
            rows["s3get"].append(direct_store_get(peer, location.key(f"blobs/{sha[:2]}/{sha}")))
            rows["pull"].append(b.get("big.bin"))
            for _ in range(3):  # hits, alternating with nginx
                rows["hit"].append(b.get("big.bin"))
                rows["nginx"].append(http_get(nginx.port, "/big.bin", timeout=60).t_total)
            before = b.store_calls()
            for _ in range(200):
                f = http_get(b.port, "/g/big.bin", headers={"Range": "bytes=0-0"}, timeout=30)
                assert f.status == 206, f.status
            calls = max(calls, b.store_calls() - before)
        finally:
            a.stop()
            b.stop()
        log(f"run {run + 1}: cold {rows['cold'][-1] * 1e3:.0f} ms, pull {rows['pull'][-1] * 1e3:.0f} ms")
    rows["calls"] = [float(calls)]
    return rows


def render(
    rows: dict[str, list[float]],
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
    runs: int,
    took: float,
) -> tuple[str, list[str]]:
    med = {k: statistics.median(v) for k, v in rows.items()}
    mb = SIZE / 1e6
    lines = [
        "## Shared cache on object storage (issue 11)",
        "",
        f"{machine()['CPU']}, {machine()['Cores']} cores; SeaweedFS `weed mini` and nginx on loopback; "
        f"{runs} runs; load average {load_before[0]:.2f} at start, {load_after[0]:.2f} at end"
        + (" (busy: the ratios are pessimistic)" if busy(load_before[0], load_after[0]) else "")
        + f"; {took:.0f} s.",
        "",
        "| measurement | proxy | reference | ratio | target | |",
        "|---|---|---|---|---|---|",
    ]
    missed = []
    cold = med["cold"] / med["direct"]
    lines.append(
        f"| (1) cold 100 MiB miss through the store path / direct download from nginx (time) | "
        f"{med['cold'] * 1e3:.0f} ms | {med['direct'] * 1e3:.0f} ms | {cold:.2f}x | (not a target) | |"
    )
    pull = med["s3get"] / med["pull"]
    ok = pull >= 0.8
    missed += [] if ok else ["(2)"]
    lines.append(
        f"| (2) a local miss served from the bucket / a direct boto3 GET of the object, hashed "
        f"(throughput) | {mb / med['pull']:.0f} MB/s | {mb / med['s3get']:.0f} MB/s | {pull:.2f}x | "
        f">= 0.8x | {'PASS' if ok else 'MISS'} |"
    )
    hit = med["nginx"] / med["hit"]
    lines.append(
        f"| (3) local-tier hit / nginx serving the file (throughput) | {mb / med['hit']:.0f} MB/s | "
        f"{mb / med['nginx']:.0f} MB/s | {hit:.2f}x | (as run.py (a)) | |"
    )
    calls = int(rows["calls"][0])
    missed += [] if calls == 0 else ["(4)"]
    lines.append(
        f"| (4) object-store calls per warm hit (200 hits) | {calls / 200:.2f} | | | 0 | "
        f"{'PASS' if calls == 0 else 'MISS'} |"
    )
    lines += [
        "",
        "Where the time goes: with the process's S3 client made, the store path adds a few ms to a "
        "cold miss (an index look-up and a claim by conditional PUT, 1-3 ms each on SeaweedFS), so "
        "(1) is the cold miss of run.py; the first request of a new process would wait 200-400 ms "
        "for boto3's import and client, which the proxy now makes in the background at start. A "
        "pull streams (engine/flights.py with the bucket as its source): the client's first byte "
        "waits for the index GET and the blob's GET, then it reads the part file as it grows, the "
        "last chunk held back until the blob hashed to the entry's sha256 (not for the fsync). What "
        "(2) pays beyond the reference, which only reads and hashes into a reused buffer, is "
        "writing 100 MiB into the local tier: 20-40 ms when this VM's memory allows, and then "
        "(2) is about 0.7x. Warm hits never ask the bucket (4) and are served from the local tier "
        "like any hit (3).",
        "",
        "Why pulls are bimodal here (about 140 ms or about 300 ms), measured: timed inside the "
        "proxy, a slow pull spends 250-300 ms in `write` (the kernel's copy into the page cache: "
        "60-83% of the CPU samples in copy_folio_from_iter_atomic), a fast one 20-30 ms; hashing "
        "costs that thread 4-18 ms in both. It is not the pull path: a loop that writes 100 MiB "
        "files from one reused 256 KiB buffer, in the bench's own process with no network, slows from 18 to "
        "250 ms per file at the same moments, after 0.2-2 GB of new files (more when files were "
        "deleted just before), on either vCPU. In that state the size and alignment of the writes "
        "decide: 256 KiB or 1 MiB writes at aligned offsets take 250 ms per 100 MiB; 128 KiB, "
        "64 KiB, 252 KiB or 256 KiB + 1 byte writes take 20-30 ms, and touching 100 MiB of new "
        "anonymous memory (4 KiB pages) 60 ms as ever. ext4 on this kernel (6.18) caches a write "
        "in folios as large as its size and alignment allow, so it is large page allocations "
        "that are slow: consistent with the VM's free page reporting (page_reporting_order=11 "
        "on its command line: free 8 MiB blocks are handed back to the host, smaller free pieces "
        "stay backed), where a large folio splits a returned block and each of its pages faults "
        "on the host when first written. The cold path writes what the upstream sends, chunks "
        "that are not page-aligned, hence mostly smaller folios: that is why it stayed fast while pulls "
        "(256 KiB reads, aligned) were slow. Pulls now read and write 128 KiB: in 10 runs "
        "alternating the two, 128 KiB pulls took 147, 134, 151, 224, 336 ms and 256 KiB ones "
        "140, 171, 326, 346, 306 ms. That only delays it: each run leaves 300 MiB of new page "
        "cache (both local tiers and the bucket), and from the eighth run every writer paid, cold "
        "misses included (150-170 ms in `write`). Nothing in the pull path avoids it: storing "
        "100 MiB locally needs 100 MiB of page cache (written with O_DIRECT, the first hit "
        "would fault it in instead). Full runs one after the other, three with 128 KiB reads "
        "(0.72x, 0.74x, 0.73x) and two with 256 KiB (0.75x, 0.73x), met only fast pulls: the "
        "runs before had freed several GB, and which state a run meets depends on what the "
        "machine did before it, not on the pull path. In the fast state the pull pays 30-40 ms "
        "more than the reference: 20-30 ms in `write`, the rest serving the client from the "
        "part file on the same two cores; without the early write-back (store/early_sync.py) one "
        "run gave 0.77x, within the noise, and slower cold misses (a longer final fsync): kept. "
        "Ruled out as well: posix_fallocate, memory pressure (16 GB "
        "free), the hashing thread, the early write-back, where the part file lives (the cache's "
        "tmp/ on both paths), a second copy. The earlier finding that 1 MiB reads made a pull "
        "5-8x slower than 256 KiB ones was most likely this effect, not the CPU's cache. Before "
        "streaming, the whole copy came first and (2) was 0.32-0.44x.",
        "",
        "Raw (ms): "
        + "; ".join(
            f"{k} " + ", ".join(f"{v * 1e3:.0f}" for v in rows[k])
            for k in ("cold", "direct", "pull", "s3get", "hit", "nginx")
        ),
        "",
        "```sh",
        ".venv/bin/python benchmarks/shared_cache_bench.py          # full run; rewrites this section",
        ".venv/bin/python benchmarks/shared_cache_bench.py --quick  # smoke check, prints only",
        "```",
    ]
    for line in lines:
        if "|" in line and ("PASS" in line or "MISS" in line or "target" in line):
            log(line)
    return "\n".join(lines) + "\n", missed


if __name__ == "__main__":
    sys.exit(main())
