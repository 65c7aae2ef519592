"""The object tests get from the ``upstream_proxy`` fixture.

It wraps one ProxyServer for the session: URLs per key, the environment it
exports for subprocess clients, what it served (for the session and for the
running test) and assertions over that.  It holds no pytest state itself, so
it works the same from a plain script.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from pytest_upstream.clients.containers_conf import registries_conf_text
from pytest_upstream.clients.maven_settings import settings_xml
from pytest_upstream.config.capture import with_capture
from pytest_upstream.config.keys import key_error
from pytest_upstream.config.s3_location import is_s3_url
from pytest_upstream.config.settings import MODES, ProxyDefinition, Settings, load_settings, with_max_size
from pytest_upstream.config.units import human_size, plural
from pytest_upstream.repro.html_report import answer_rows
from pytest_upstream.repro.lock_tools import WRITING_MODES, lock_data
from pytest_upstream.repro.netguard import NetworkGuard
from pytest_upstream.repro.report import misses_by_test, network_lines, usage
from pytest_upstream.repro.served import ServedRecord, Stats
from pytest_upstream.server.proxy_server import ProxyServer

NO_PROXY = "127.0.0.1,localhost,::1"


def settings_for(
    *,
    config_file: str | None,
    search_dir: Path,
    cache: str | None,
    mode: str | None,
    base_dir: Path,
    lock: str | None = None,
    max_size: str | None = None,
    capture: bool | None = None,
) -> Settings:
    settings = load_settings(config_file, search_dir=search_dir)
    if cache and not is_s3_url(cache) and not Path(cache).expanduser().is_absolute():
        cache = str(base_dir / cache)
    if lock and not Path(lock).expanduser().is_absolute():
        lock = str(base_dir / lock)
    settings = with_max_size(settings.with_overrides(cache=cache, mode=mode, lock=lock), max_size)
    return replace(settings, capture=with_capture(settings.capture, capture))


def exported_env(server: ProxyServer) -> dict[str, str]:
    """Variables that point subprocess clients at the proxy (docs/pytest-plugin.md)."""
    env = {"UPSTREAM_PROXY_URL": server.base_url}
    pypi = next((p for p in server.engine.settings.proxies if p.format == "pypi"), None)
    if pypi is not None:
        index = server.url(pypi.key) + "simple/"
        env.update({"PIP_INDEX_URL": index, "UV_DEFAULT_INDEX": index, "UV_INDEX_URL": index})
    npm = next((p for p in server.engine.settings.proxies if p.format == "npm"), None)
    if npm is not None:  # npm, pnpm (<11 reads npm_config_*, 11+ pnpm_config_*), yarn 1 and yarn 2+
        registry = server.url(npm.key)
        for name in ("npm_config_registry", "NPM_CONFIG_REGISTRY", "pnpm_config_registry"):
            env[name] = registry
        env.update({"YARN_REGISTRY": registry, "YARN_NPM_REGISTRY_SERVER": registry})
    return {**env, **capture_env(server)}


# Clients that take a CA file *instead of* their roots get the bundle (the system's roots and the
# cache's CA); Node adds NODE_EXTRA_CA_CERTS to its own roots, so it gets the CA alone.
BUNDLE_VARIABLES = (
    "SSL_CERT_FILE",  # OpenSSL's default file: Python's ssl, httpx, urllib, uv, wget, git, ruby, ...
    "REQUESTS_CA_BUNDLE",  # requests (and pip's vendored copy)
    "CURL_CA_BUNDLE",  # curl, and requests as a fallback
    "PIP_CERT",  # pip --cert
    "GIT_SSL_CAINFO",  # git over HTTPS
    "CARGO_HTTP_CAINFO",  # cargo
    "AWS_CA_BUNDLE",  # boto3, the AWS CLI
)
ADDED_CA_VARIABLES = ("NODE_EXTRA_CA_CERTS",)  # node, npm, yarn, pnpm


def capture_env(server: ProxyServer) -> dict[str, str]:
    """With capture on (docs/capture.md): every client's HTTP(S)_PROXY at the proxy, and the
    cache's CA in every common client's CA variable; nothing when it is off."""
    forward = server.capture
    if forward is None:
        return {}
    env = forward_proxy_env(server)
    env.update({name: str(forward.ca.bundle_path) for name in BUNDLE_VARIABLES})
    env.update({name: str(forward.ca.cert_path) for name in ADDED_CA_VARIABLES})
    return env


def forward_proxy_env(server: ProxyServer) -> dict[str, str]:
    """While the network is blocked: clients that honour HTTP(S)_PROXY get a clear refusal from the
    proxy for any other host, instead of reaching it (docs/reproducible-builds.md)."""
    env = {name: server.base_url for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")}
    env.update({"NO_PROXY": NO_PROXY, "no_proxy": NO_PROXY})
    return env


class UpstreamProxy:
    """The session's proxy server as a test sees it.

    Named after the ``upstream_proxy`` fixture, it is the whole server: it serves every
    configured upstream proxy (one per key), and ``url(key)`` is where each one answers.
    """

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self._env = exported_env(server)
        self._saved_env: dict[str, str | None] = {}
        self._test_mark = server.served.mark()
        self._temp_dirs: list[Path] = []  # written by maven_settings, removed by stop
        self.session_mode = server.engine.mode  # ``mode`` may differ while a marked test runs
        self.guard: NetworkGuard | None = None  # set while the network is blocked
        self._saved_forward_env: dict[str, str | None] = {}
        self._blocked_before: list[tuple[str, str]] = []  # from guards already removed

    @classmethod
    def start(cls, settings: Settings) -> UpstreamProxy:
        proxy = cls(ProxyServer(settings).start())
        proxy._apply_env()
        return proxy

    def stop(self) -> None:
        self.unblock_network()
        self._restore_env()
        self.server.stop()
        for directory in self._temp_dirs:
            shutil.rmtree(directory, ignore_errors=True)

    # -- where it is -------------------------------------------------------
    @property
    def base_url(self) -> str:
        return self.server.base_url

    @property
    def mode(self) -> str:
        return self.server.engine.mode

    @property
    def cache_dir(self) -> Path:
        return self.server.engine.settings.cache_dir

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.server.engine.settings.proxies]

    def url(self, key: str) -> str:
        """Base URL of the proxy ``key`` (ends with a slash)."""
        if key not in self.keys:
            raise KeyError(f"no upstream proxy with key {key!r} (configured: {', '.join(self.keys)})")
        return self.server.url(key)

    def env(self) -> dict[str, str]:
        """The variables exported to the session's environment, as a new dict."""
        return {**self._env, **(forward_proxy_env(self.server) if self.guard is not None else {})}

    def _apply_env(self) -> None:
        for name, value in self._env.items():
            self._saved_env[name] = os.environ.get(name)
            os.environ[name] = value

    def _restore_env(self) -> None:
        for name, old in self._saved_env.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old
        self._saved_env.clear()

    # -- per test: mode, keys, network (docs/reproducible-builds.md) ---------
    def set_test_scope(self, *, mode: str | None = None, proxies: Iterable[str] | None = None) -> None:
        """Serve in ``mode``, and only for the keys ``proxies`` (others answer 403), until
        ``clear_test_scope``.  None keeps the session's mode, or allows every key."""
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)} (got {mode!r})")
        keys = None if proxies is None else frozenset(proxies)
        if keys is not None and (unknown := sorted(keys - set(self.keys) - self._capture_keys(keys))):
            known = ", ".join(self.keys)
            raise KeyError(f"no upstream proxy with key(s) {', '.join(unknown)} (configured: {known})")
        self.server.engine.mode = mode or self.session_mode
        self.server.engine.allowed_keys = keys

    def _capture_keys(self, keys: frozenset[str]) -> frozenset[str]:
        """The keys that may name captured hosts (capture/hosts.py): any valid key, with capture on."""
        if self.server.capture is None:
            return frozenset()
        return frozenset(k for k in keys if key_error(k) is None)

    def clear_test_scope(self) -> None:
        self.server.engine.mode = self.session_mode
        self.server.engine.allowed_keys = None

    @contextlib.contextmanager
    def using(self, *, mode: str | None = None, proxies: Iterable[str] | None = None) -> Iterator[None]:
        """``set_test_scope`` for a block."""
        self.set_test_scope(mode=mode, proxies=proxies)
        try:
            yield
        finally:
            self.clear_test_scope()

    @property
    def network_blocked(self) -> bool:
        return self.guard is not None

    def block_network(self) -> None:
        """Refuse connections from this process to anything but loopback, and point clients'
        HTTP(S)_PROXY at the proxy, which refuses to forward them (``netguard.py``)."""
        if self.guard is not None:
            return
        self.guard = NetworkGuard(lambda: self.server.served.current_test)
        self.guard.install()
        if self.server.capture is not None:  # hosts not captured are refused, not tunnelled
            self.server.capture.tunnels = False
        for name, value in forward_proxy_env(self.server).items():
            self._saved_forward_env[name] = os.environ.get(name)
            os.environ[name] = value

    def unblock_network(self) -> None:
        if self.guard is None:
            return
        self.guard.uninstall()
        if self.server.capture is not None:
            self.server.capture.tunnels = True
        self._blocked_before.extend(self.guard.blocked)
        self.guard = None
        for name, old in self._saved_forward_env.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old
        self._saved_forward_env.clear()

    def blocked(self) -> list[tuple[str, str]]:
        """(target, test) of every connection refused: in this process, or forwarded to the proxy."""
        now = self.guard.blocked if self.guard is not None else []
        forwarded = [(f"{host} (through HTTP(S)_PROXY)", test) for host, test in self.server.refused]
        return [*self._blocked_before, *now, *forwarded]

    # -- Maven (docs/maven.md) ---------------------------------------------
    def maven_mirror_url(self, key: str | None = None) -> str:
        """URL of the maven proxy ``key`` (default: the first one configured), for a ``<mirror>``."""
        return self.url(self._maven_key(key))

    def maven_settings(
        self, key: str | None = None, local_repo: str | Path | None = None, *, extra_keys: Iterable[str] = ()
    ) -> Path:
        """Write a settings.xml whose mirror (``mirrorOf *``) is the maven proxy ``key``; use ``mvn -s PATH``.

        ``local_repo`` sets ``<localRepository>``; each of ``extra_keys`` (other maven
        proxies, e.g. one for SNAPSHOTs) becomes a repository of its own, with id = key.
        The file lives in a temp dir removed when the proxy stops.
        """
        mirror = self.maven_mirror_url(key)
        extra = {k: self.maven_mirror_url(k) for k in extra_keys}
        directory = Path(tempfile.mkdtemp(prefix="pytest-upstream-maven-"))
        self._temp_dirs.append(directory)
        path = directory / "settings.xml"
        local = Path(local_repo).expanduser().absolute() if local_repo is not None else None
        path.write_text(settings_xml(mirror, local, extra), encoding="utf-8")
        return path

    def _maven_key(self, key: str | None) -> str:
        proxies = self.server.engine.settings.proxies
        if key is None:
            key = next((p.key for p in proxies if p.format == "maven"), None)
            if key is None:
                raise KeyError(f"no maven upstream proxy is configured (keys: {', '.join(self.keys)})")
        proxy = self.server.engine.settings.proxy(key)
        if proxy is not None and proxy.format != "maven":
            raise ValueError(f"upstream proxy {key!r} has format {proxy.format!r}, not 'maven'")
        return key

    # -- Docker / OCI (docs/docker.md) ---------------------------------------
    def image(self, key: str, ref: str) -> str:
        """``127.0.0.1:PORT/<key>/<ref>`` for a docker proxy, e.g. ``image("hub", "alpine:3")``."""
        self._docker_proxy(key)
        return f"{self.base_url.split('://', 1)[1]}/{key}/{ref}"

    def registries_conf(self, key: str) -> Path:
        """Write a containers registries.conf whose mirror for the upstream of ``key`` is this proxy.

        For podman/skopeo/buildah: ``CONTAINERS_REGISTRIES_CONF=PATH``.  Lives in a
        temp dir removed when the proxy stops.
        """
        proxy = self._docker_proxy(key)
        directory = Path(tempfile.mkdtemp(prefix="pytest-upstream-containers-"))
        self._temp_dirs.append(directory)
        path = directory / "registries.conf"
        path.write_text(registries_conf_text(proxy, self.base_url.split("://", 1)[1]), encoding="utf-8")
        return path

    def _docker_proxy(self, key: str) -> ProxyDefinition:
        proxy = self.server.engine.settings.proxy(key)
        if proxy is None:
            raise KeyError(f"no upstream proxy with key {key!r} (configured: {', '.join(self.keys)})")
        if proxy.format != "docker":
            raise ValueError(f"upstream proxy {key!r} has format {proxy.format!r}, not 'docker'")
        return proxy

    # -- what it served ----------------------------------------------------
    def begin_test(self, nodeid: str) -> None:
        self.server.served.current_test = nodeid
        self._test_mark = self.server.served.mark()

    def end_test(self) -> None:
        self.server.served.current_test = ""

    @property
    def served(self) -> list[ServedRecord]:
        """Everything served this session, in order."""
        return self.server.served.records

    @property
    def test_served(self) -> list[ServedRecord]:
        """What was served since the running test started."""
        return self.server.served.since(self._test_mark)[0]

    def stats(self) -> Stats:
        return self.server.served.stats()

    def assert_hits(
        self, *patterns: str, key: str | None = None, records: Iterable[ServedRecord] | None = None
    ) -> None:
        """Assert each pattern (a path or glob over record paths) was served, every time from the cache.

        Looks at the running test's records unless ``records`` is given.
        """
        pool = [r for r in (self.test_served if records is None else records) if key in (None, r.key)]
        problems = []
        for pattern in patterns:
            matching = [r for r in pool if r.path == pattern or fnmatchcase(r.path, pattern)]
            if not matching:
                problems.append(f"{pattern!r} was not served")
            elif bad := [r for r in matching if r.cache != "hit"]:
                problems.append(
                    f"{pattern!r}: " + ", ".join(f"{r.path} was a {r.cache} ({r.status})" for r in bad)
                )
        if problems:
            raise AssertionError("expected cache hits:\n  " + "\n  ".join(problems))

    @contextlib.contextmanager
    def no_upstream_requests(self) -> Iterator[None]:
        """Fail if the block makes the proxy contact any upstream."""
        mark = self.server.served.mark()
        yield
        _, fetches = self.server.served.since(mark)
        if fetches:
            raise AssertionError("upstream requests were made: " + ", ".join(fetches))

    def _object_store(self) -> dict[str, Any] | None:
        """An s3:// cache's bucket: its counters and why it is left alone now ("" when it is not)."""
        shared = self.server.engine.shared
        if shared is None:
            return None
        counts = shared.tier.health.snapshot()
        return {"where": shared.tier.where, **counts, "degraded": shared.tier.degraded()}

    def report(self, *, detail: bool = False, answers: bool = False) -> dict[str, Any]:
        """A plain-data summary, sent from xdist workers to the controller.

        ``detail`` adds ``tests``, what each test used (``--upstream-report``); ``answers``
        adds ``answers``, every answer with its timing (``--upstream-report-html``).
        """
        records = self.served
        settings = self.server.engine.settings
        writes_lock = settings.lock_file is not None and self.session_mode in WRITING_MODES
        report: dict[str, Any] = {
            "base_url": self.base_url,
            "mode": self.session_mode,
            "cache_dir": str(self.cache_dir),
            "stats": self.stats().as_dict(),
            "replay_misses": [  # a replay miss is answered 504 (a lock timeout is a 504 "error")
                {"test": r.test, "key": r.key, "path": r.path, "upstream_url": r.upstream_url}
                for r in records
                if r.cache == "miss" and r.status == 504
            ],
            "misses_by_test": misses_by_test(records),
            "blocked": [list(b) for b in self.blocked()],
            "lock_file": str(settings.lock_file) if writes_lock else None,
            "lock": lock_data(self.server.engine.recorded_lock()) if writes_lock else [],
            "health": {  # upstreams that failed or were skipped while marked down (docs/rules.md)
                key: {"down": down, "failures": failures, "skipped": skipped}
                for key, (down, failures, skipped) in self.server.engine.health.snapshot().items()
                if down or failures or skipped
            },
            "hidden": sorted({f"{r.key}: {h}" for r in records for h in r.hidden}),
            "object_store": self._object_store(),
        }
        if detail:
            report["tests"] = usage(settings, records)
        if answers:
            report["answers"] = answer_rows(settings, records)
        return report


def _store_lines(reports: list[dict[str, Any]]) -> list[str]:
    """One line when an s3:// cache's bucket failed during the session (the proxy went local-only)."""
    stores = [r["object_store"] for r in reports if r.get("object_store")]
    failing = [s for s in stores if s["outages"] or s["degraded"]]
    if not failing:
        return []
    where, why = failing[0]["where"], next((s["degraded"] for s in failing if s["degraded"]), "")
    skipped = sum(s["skipped"] for s in failing)
    now = f": {why}" if why else " (available again)"
    return [f"object store {where} failed during the session{now}; {plural(skipped, 'call')} served locally"]


def summary_lines(reports: list[dict[str, Any]]) -> list[str]:
    """The terminal summary: totals over every worker's ``report()``, then what went wrong."""
    total = Stats()
    for report in reports:
        total.add(Stats(**report["stats"]))
    first = reports[0]
    workers = f" across {len(reports)} workers" if len(reports) > 1 else ""
    lines = [
        f"pytest-upstream ({first['mode']}, cache {first['cache_dir']}){workers}: "
        f"{plural(total.requests, 'request')}, {plural(total.hits, 'hit')}, {plural(total.misses, 'miss')}, "
        f"{total.stale} stale, "
        f"{human_size(total.bytes_upstream)} from upstream, {human_size(total.bytes_cache)} from cache, "
        f"{plural(total.errors, 'error')}, {total.not_found} not found"
    ]
    misses = [m for r in reports for m in r["replay_misses"]]
    if misses:
        lines.append(f"replay misses ({len(misses)}): these were not recorded, so the run fails:")
        for m in misses:
            lines.append(f"  {m['test'] or '(outside a test)'}: {m['key']} {m['upstream_url'] or m['path']}")
    for key in sorted({k for r in reports for k in r.get("health", {})}):
        states = [r["health"][key] for r in reports if key in r.get("health", {})]
        skipped = sum(s["skipped"] for s in states)
        down = " (down now)" if any(s["down"] for s in states) else ""
        lines.append(
            f"upstream of {key!r} failed; marked down{down}: {plural(skipped, 'request')} not sent to it"
        )
    lines += _store_lines(reports)
    hidden = sorted({h for r in reports for h in r.get("hidden", [])})
    if hidden:
        lines.append(f"kept out by rules or min_age ({len(hidden)}):")
        lines += [f"  {h}" for h in hidden[:20]] + (
            [f"  ... and {len(hidden) - 20} more"] if len(hidden) > 20 else []
        )
    return lines + network_lines(reports)
