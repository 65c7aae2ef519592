#!/usr/bin/env python3
"""Docker/OCI pulls on loopback: pytest-upstream vs CNCF distribution's own pull-through cache.

    scripts/peers/docker.sh                              # once: docker-registry, skopeo (apt-get)
    /tmp/venv/bin/python benchmarks/docker_bench.py          # ~1 minute; writes its section of
                                                             # docs/benchmarks.md
    /tmp/venv/bin/python benchmarks/docker_bench.py --quick  # smoke check: small layers, prints only

Upstream: distribution (``docker-registry serve``, filesystem storage, access log on)
holding one image, ``bench/app:v1``: an OCI manifest, a config and 3 layers of random
bytes (5, 10 and 20 MiB; ``--quick``: 1, 1 and 2 MiB) built with tests/oci.py.  The two
caches in front of it, each on its own port and fresh storage:

* ours: ``upstream-proxy serve`` (a separate process) with one docker proxy, ``bench``;
  the image is ``127.0.0.1:PORT/bench/bench/app:v1``;
* distribution's pull-through cache: a second ``docker-registry`` with
  ``proxy: remoteurl: <upstream>``; the image is ``127.0.0.1:PORT/bench/app:v1``.

(a) warm pull: each cache is filled by one pull (not counted), then
    ``skopeo copy docker://IMAGE oci:DIR:v1`` through ours and through distribution
    alternate, 3 times each (``--quick``: 1), each into a fresh directory; the median
    wall time of the skopeo process.  Reference: the same pull straight from the upstream.
(b) cold concurrent pull: fresh caches; 8 skopeo processes (``--quick``: 4) started at
    once through one cache, wall time until the last one ends.  Upstream requests are
    counted from the upstream's access log (the lines written while that cache was
    pulling): blob GETs, bytes sent, manifest requests.

Everything runs on 127.0.0.1 with bounded sizes and timeouts; the temp dir (storages,
caches, pulled layouts) and every child process are removed at the end.  The report
section sits between markers at the end of docs/benchmarks.md and is replaced on each
full run; the rest of that file is left alone.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness import DOC, ProxyProcess, busy, free_port, log, stop, work_dir, write_section

from tests.oci import build_image, http, push_http, wait_listening

MiB = 1024 * 1024
NAME, TAG = "bench/app", "v1"
KEY = "bench"
SKOPEO_TIMEOUT = 300


@dataclass(frozen=True)
class Profile:
    layers_mib: tuple[int, ...]
    warm_reps: int
    clients: int


FULL = Profile(layers_mib=(5, 10, 20), warm_reps=3, clients=8)
QUICK = Profile(layers_mib=(1, 1, 2), warm_reps=1, clients=4)


# -- processes ---------------------------------------------------------------------------
class Distribution:
    """``docker-registry serve`` on loopback: the upstream, or (``remote``) a pull-through cache."""

    def __init__(self, work: Path, name: str, *, remote: str | None = None, access_log: bool = False) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.storage = work / name / "storage"
        self.storage.mkdir(parents=True)
        lines = [
            "version: 0.1",
            "log:",
            "  level: error",
            "  accesslog:",
            f"    disabled: {'false' if access_log else 'true'}",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.storage}",
            "http:",
            f"  addr: 127.0.0.1:{self.port}",
            "  secret: docker-bench-secret",
        ]
        if remote is not None:
            lines += ["proxy:", f"  remoteurl: {remote}"]
        config = work / name / "registry.yml"
        config.write_text("\n".join(lines) + "\n")
        self.access_log = work / name / "access.log"  # the access log goes to stdout
        self._out = self.access_log.open("wb")
        self._err = (work / name / "registry.err").open("wb")
        self.proc = subprocess.Popen(
            ["docker-registry", "serve", str(config)], stdout=self._out, stderr=self._err
        )
        try:
            wait_listening(self.url + "/v2/")
        except TimeoutError:
            self.stop()
            raise RuntimeError(f"docker-registry ({name}) did not start: see {work / name}") from None

    def log_size(self) -> int:
        self._out.flush()
        return self.access_log.stat().st_size

    def log_since(self, offset: int) -> list[str]:
        with self.access_log.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace").splitlines()

    def stop(self) -> None:
        stop(self.proc)
        self._out.close()
        self._err.close()


def our_proxy(work: Path, name: str, upstream: str) -> ProxyProcess:
    """``upstream-proxy serve`` with one docker proxy, ``bench``, on a fresh cache."""
    base = work / name
    base.mkdir(parents=True)
    config = base / "pyproject.toml"
    config.write_text(
        "[tool.pytest-upstream]\n\n[[tool.pytest-upstream.proxy]]\n"
        f'key = "{KEY}"\nformat = "docker"\nurl = "{upstream}/"\n'
    )
    return ProxyProcess(config, base / "cache", base / "proxy.err")


# -- pulls ---------------------------------------------------------------------------------
def skopeo_copy(image: str, dest: Path, home: Path) -> subprocess.Popen[bytes]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "XDG_RUNTIME_DIR": str(home)}
    return subprocess.Popen(
        [
            "skopeo",
            "--insecure-policy",
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            f"docker://{image}",
            f"oci:{dest}:{TAG}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )


def finish(proc: subprocess.Popen[bytes], what: str) -> None:
    try:
        _, err = proc.communicate(timeout=SKOPEO_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError(f"skopeo pull of {what} took more than {SKOPEO_TIMEOUT}s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"skopeo pull of {what} failed: {err.decode(errors='replace')[-800:]}")


class Puller:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.home = work / "home"
        self.home.mkdir()
        (work / "pulled").mkdir()
        self._n = 0

    def _dest(self) -> Path:
        self._n += 1
        return self.work / "pulled" / f"{self._n}"

    def timed(self, image: str) -> float:
        dest = self._dest()
        started = time.monotonic()
        finish(skopeo_copy(image, dest, self.home), image)
        took = time.monotonic() - started
        shutil.rmtree(dest, ignore_errors=True)
        return took

    def concurrent(self, image: str, clients: int) -> float:
        dests = [self._dest() for _ in range(clients)]
        started = time.monotonic()
        procs = [skopeo_copy(image, d, self.home) for d in dests]
        for proc in procs:
            finish(proc, image)
        took = time.monotonic() - started
        for d in dests:
            shutil.rmtree(d, ignore_errors=True)
        return took


# -- upstream access log -------------------------------------------------------------------
_LINE = re.compile(r'"(?P<method>[A-Z]+) (?P<path>\S+) HTTP/[\d.]+" (?P<status>\d{3}) (?P<bytes>\d+|-)')


@dataclass
class Upstream:
    blob_gets: int = 0
    blob_heads: int = 0
    blob_bytes: int = 0
    manifest_gets: int = 0
    manifest_heads: int = 0
    pings: int = 0  # GET /v2/
    other: int = 0
    per_blob: dict[str, int] = field(default_factory=dict)

    @classmethod
    def count(cls, lines: list[str]) -> Upstream:
        out = cls()
        for line in lines:
            m = _LINE.search(line)
            if m is None:
                continue
            path, method = m["path"], m["method"]
            size = int(m["bytes"]) if m["bytes"] != "-" else 0
            if "/blobs/" in path and method == "GET":
                out.blob_gets += 1
                out.blob_bytes += size
                digest = path.rsplit("/", 1)[1]
                out.per_blob[digest] = out.per_blob.get(digest, 0) + 1
            elif "/blobs/" in path:
                out.blob_heads += 1
            elif "/manifests/" in path:
                if method == "GET":
                    out.manifest_gets += 1
                else:
                    out.manifest_heads += 1
            elif path == "/v2/":
                out.pings += 1
            else:
                out.other += 1
        return out

    def add(self, other: Upstream) -> None:
        for name in (
            "blob_gets",
            "blob_heads",
            "blob_bytes",
            "manifest_gets",
            "manifest_heads",
            "pings",
            "other",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for digest, n in other.per_blob.items():
            self.per_blob[digest] = self.per_blob.get(digest, 0) + n

    @property
    def requests(self) -> int:
        return (
            self.blob_gets
            + self.blob_heads
            + self.manifest_gets
            + self.manifest_heads
            + self.pings
            + self.other
        )

    def describe(self) -> str:
        return (
            f"{self.blob_gets} blob GETs ({self.blob_bytes / MiB:.1f} MiB), {self.blob_heads} blob HEADs, "
            f"{self.manifest_gets} manifest GETs, {self.manifest_heads} manifest HEADs, "
            f"{self.pings} GET /v2/, {self.other} other"
        )


# -- the run -------------------------------------------------------------------------------
@dataclass
class Results:
    image_mib: float = 0.0
    layers: int = 0
    warm_ours: list[float] = field(default_factory=list)
    warm_dist: list[float] = field(default_factory=list)
    warm_direct: list[float] = field(default_factory=list)
    cold_ours: float = 0.0
    cold_dist: float = 0.0
    up_ours: Upstream = field(default_factory=Upstream)
    up_dist: Upstream = field(default_factory=Upstream)
    fill_ours: Upstream = field(default_factory=Upstream)
    fill_dist: Upstream = field(default_factory=Upstream)
    warm_up_ours: Upstream = field(default_factory=Upstream)
    warm_up_dist: Upstream = field(default_factory=Upstream)


def run(work: Path, profile: Profile) -> Results:
    res = Results()
    children: list[Distribution | ProxyProcess] = []

    def track(child: Distribution | ProxyProcess) -> Distribution | ProxyProcess:
        children.append(child)
        return child

    try:
        log(f"building the image: layers of {', '.join(map(str, profile.layers_mib))} MiB")
        files = {f"layer{i}": os.urandom(mib * MiB) for i, mib in enumerate(profile.layers_mib)}
        image = build_image("amd64", files)
        res.layers = len(image.layers)
        res.image_mib = sum(len(b.data) for b in image.blobs) / MiB
        upstream = Distribution(work, "upstream", access_log=True)
        track(upstream)
        push_http(upstream.url, NAME, image.blobs, TAG, image.manifest)
        accept = {"Accept": image.manifest.media_type}
        status, _, _ = http(f"{upstream.url}/v2/{NAME}/manifests/{TAG}", method="HEAD", headers=accept)
        assert status == 200, status
        puller = Puller(work)
        direct = f"127.0.0.1:{upstream.port}/{NAME}:{TAG}"

        # (a) warm pulls
        ours = our_proxy(work, "ours-warm", upstream.url)
        track(ours)
        dist = Distribution(work, "dist-warm", remote=upstream.url)
        track(dist)
        ours_image = f"{ours.base_url.split('://', 1)[1]}/{KEY}/{NAME}:{TAG}"
        dist_image = f"127.0.0.1:{dist.port}/{NAME}:{TAG}"
        mark = upstream.log_size()
        puller.timed(ours_image)  # fill (not counted)
        res.fill_ours = Upstream.count(upstream.log_since(mark))
        mark = upstream.log_size()
        puller.timed(dist_image)
        res.fill_dist = Upstream.count(upstream.log_since(mark))
        time.sleep(1.0)  # distribution stores a blob in the background after serving it
        puller.timed(direct)  # warm the upstream's page cache and skopeo's binary as well
        log(f"(a) warm pulls, {profile.warm_reps} each, alternating")
        for _ in range(profile.warm_reps):
            for image_name, times, counts in (
                (ours_image, res.warm_ours, res.warm_up_ours),
                (dist_image, res.warm_dist, res.warm_up_dist),
            ):
                mark = upstream.log_size()
                times.append(puller.timed(image_name))
                counts.add(Upstream.count(upstream.log_since(mark)))
            res.warm_direct.append(puller.timed(direct))
        ours.stop()
        dist.stop()

        # (b) cold concurrent pulls: fresh caches, one cache at a time
        log(f"(b) {profile.clients} concurrent cold pulls through each")
        ours = our_proxy(work, "ours-cold", upstream.url)
        track(ours)
        mark = upstream.log_size()
        res.cold_ours = puller.concurrent(
            f"{ours.base_url.split('://', 1)[1]}/{KEY}/{NAME}:{TAG}", profile.clients
        )
        res.up_ours = Upstream.count(upstream.log_since(mark))
        ours.stop()
        dist = Distribution(work, "dist-cold", remote=upstream.url)
        track(dist)
        mark = upstream.log_size()
        res.cold_dist = puller.concurrent(f"127.0.0.1:{dist.port}/{NAME}:{TAG}", profile.clients)
        time.sleep(1.0)  # let its background stores finish, so their fetches are counted too
        res.up_dist = Upstream.count(upstream.log_since(mark))
        dist.stop()
    finally:
        for child in reversed(children):
            with contextlib.suppress(Exception):
                child.stop()
    return res


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def versions() -> tuple[str, str]:
    sk = subprocess.run(["skopeo", "--version"], capture_output=True, text=True).stdout.strip()
    reg = subprocess.run(["docker-registry", "--version"], capture_output=True, text=True).stdout.strip()
    return sk.removeprefix("skopeo version "), reg.split()[-1] if reg else "?"


def render(res: Results, profile: Profile, quick: bool, took: float, load: tuple[str, str]) -> str:
    wo, wd, wr = (statistics.median(x) for x in (res.warm_ours, res.warm_dist, res.warm_direct))
    skopeo_v, dist_v = versions()
    blobs = res.layers + 1  # layers and the config
    ms = lambda xs: ", ".join(f"{x * 1000:.0f}" for x in xs)  # noqa: E731
    out = [
        "## Docker/OCI pulls: pytest-upstream vs distribution's pull-through cache",
        "",
        f"Measured by `benchmarks/docker_bench.py`{' --quick' if quick else ''} on "
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC in {took:.0f} s (skopeo {skopeo_v}, "
        f"distribution {dist_v}, {os.cpu_count()} cores, load average {load[0]} at start, {load[1]} "
        "at end). Each section of this file is written by its own script in `benchmarks/`.",
        "",
        *(
            [
                "*The machine was busy during this run (load average above the core count): the times "
                "are noisy.*",
                "",
            ]
            if busy(float(load[0].split(",")[0]), float(load[1].split(",")[0]))
            else []
        ),
        f"Image: one OCI manifest, a config and {res.layers} layers of random bytes "
        f"({', '.join(f'{m} MiB' for m in profile.layers_mib)}; {res.image_mib:.1f} MiB in all), "
        "pushed to a `docker-registry` upstream on loopback. Client: `skopeo copy docker://IMAGE "
        "oci:DIR` (a new directory each time).",
        "",
        "| Measurement | pytest-upstream | distribution proxy | ours / distribution |",
        "|---|---|---|---|",
        f"| (a) warm pull, median of {profile.warm_reps} | {wo * 1000:.0f} ms | {wd * 1000:.0f} ms "
        f"| {ratio(wo, wd)} |",
        f"| (a) reference: the same pull straight from the upstream | {wr * 1000:.0f} ms | | |",
        f"| (a) upstream requests during the {profile.warm_reps} warm pulls | {res.warm_up_ours.requests} "
        f"| {res.warm_up_dist.requests} | |",
        f"| (b) {profile.clients} concurrent cold pulls, wall time | {res.cold_ours * 1000:.0f} ms "
        f"| {res.cold_dist * 1000:.0f} ms | {ratio(res.cold_ours, res.cold_dist)} |",
        f"| (b) upstream blob GETs ({blobs} blobs in the image) | {res.up_ours.blob_gets} "
        f"| {res.up_dist.blob_gets} | |",
        f"| (b) upstream blob bytes | {res.up_ours.blob_bytes / MiB:.1f} MiB "
        f"| {res.up_dist.blob_bytes / MiB:.1f} MiB "
        f"| {ratio(res.up_ours.blob_bytes, res.up_dist.blob_bytes)} |",
        f"| (b) upstream manifest requests (GET + HEAD) | "
        f"{res.up_ours.manifest_gets + res.up_ours.manifest_heads} "
        f"| {res.up_dist.manifest_gets + res.up_dist.manifest_heads} | |",
        f"| (b) upstream requests in all | {res.up_ours.requests} | {res.up_dist.requests} | |",
        "",
        "### Raw numbers",
        "",
        f"- (a) ms, in the order run (ours, distribution, direct alternating): ours {ms(res.warm_ours)}; "
        f"distribution {ms(res.warm_dist)}; direct {ms(res.warm_direct)}",
        f"- (a) filling pull, upstream requests: ours {res.fill_ours.describe()}; "
        f"distribution {res.fill_dist.describe()}",
        f"- (a) warm pulls, upstream requests: ours {res.warm_up_ours.describe()}; "
        f"distribution {res.warm_up_dist.describe()}",
        f"- (b) upstream requests: ours {res.up_ours.describe()}; distribution {res.up_dist.describe()}",
        f"- (b) upstream GETs per blob: ours {sorted(res.up_ours.per_blob.values(), reverse=True)}; "
        f"distribution {sorted(res.up_dist.per_blob.values(), reverse=True)}",
        "",
        "### How it is measured",
        "",
        "- **Upstream:** `docker-registry serve` (filesystem storage, access log on), the image pushed "
        "with the registry API. Upstream requests are counted from its access log, over the lines "
        "written while one cache was being pulled through.",
        f"- **pytest-upstream:** `upstream-proxy serve` as a child process, one docker proxy (`{KEY}`, "
        "default `metadata_ttl` of 600 s, so a warm pull asks the upstream for nothing).",
        "- **distribution proxy:** a second `docker-registry` with `proxy: remoteurl:` pointing at the "
        "upstream, on its own storage. A warm pull still asks the upstream for the tag (it resolves "
        "tags remotely on every pull).",
        f"- **(a)** each cache is filled by one pull first (not counted); then ours, distribution and "
        f"the direct pull alternate, {profile.warm_reps} times each; the time is the skopeo process's "
        "wall time (start-up and the TLS probe skopeo makes on a plain-HTTP port included, the same "
        "for every row).",
        f"- **(b)** a fresh cache each; {profile.clients} skopeo processes are started at once and the "
        "time runs until the last one exits. One cache at a time. Distribution's upstream counts "
        "depend on how the clients' requests overlap, so they vary from run to run. Ours waits on the "
        "entry's lock, so each blob is fetched once however the requests overlap.",
        "",
        "```sh",
        "scripts/peers/docker.sh                                 # docker-registry, skopeo (apt-get)",
        "/tmp/venv/bin/python benchmarks/docker_bench.py          # full run; rewrites this section",
        "/tmp/venv/bin/python benchmarks/docker_bench.py --quick  # smoke check, prints only",
        "```",
    ]
    return "\n".join(out)


def loadavg() -> str:
    return ", ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="1-2 MiB layers, 1 warm pull, 4 clients; prints only"
    )
    parser.add_argument(
        "--output", type=Path, help="the Markdown file to update (default: docs/benchmarks.md)"
    )
    parser.add_argument("--tmp", type=Path, help="parent of the temp dir (default: the system's)")
    args = parser.parse_args()
    for tool in ("docker-registry", "skopeo"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: run scripts/peers/docker.sh first")
    profile = QUICK if args.quick else FULL
    output = args.output or (None if args.quick else DOC)
    load_start = loadavg()
    started = time.monotonic()
    with work_dir("docker-bench-", args.tmp, logs=["*/proxy.err", "*/registry.err"]) as work:
        res = run(work, profile)
    section = render(res, profile, args.quick, time.monotonic() - started, (load_start, loadavg()))
    print(section)
    if output is not None:
        write_section(output, "docker_bench.py", section)
        log(f"wrote its section of {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
