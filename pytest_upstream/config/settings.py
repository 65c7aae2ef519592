"""Upstream proxy definitions and settings, read from ``[tool.pytest-upstream]``.

Precedence, highest first: command-line flags, environment variables
(``UPSTREAM_PROXY_CACHE``, ``UPSTREAM_PROXY_MODE``), pytest ini options, the
pyproject table, built-in defaults.  Callers apply the first three with
``Settings.with_overrides``; this module reads the table and the defaults.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pytest_upstream.config.auth import AuthSpec
from pytest_upstream.config.capture import CAPTURE_FIELDS, CaptureSettings, parse_capture
from pytest_upstream.config.checks import ConfigError as ConfigError
from pytest_upstream.config.checks import number as _number
from pytest_upstream.config.checks import positive as _positive
from pytest_upstream.config.checks import size_value
from pytest_upstream.config.connection_limits import (
    CONNECTION_LIMIT_FIELDS,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_SEND_TIMEOUT,
    parse_connection_limits,
)
from pytest_upstream.config.groups import GroupDefinition, parse_groups
from pytest_upstream.config.keys import key_error
from pytest_upstream.config.object_store import (
    OBJECT_STORE_FIELDS,
    SECRET_ENV,
    StoreOptions,
    parse_store_options,
    resolve_cache,
)
from pytest_upstream.config.release_policy import POLICY_FIELDS, ReleasePolicy, parse_policy, policy_table
from pytest_upstream.config.s3_location import S3Location, is_s3_url
from pytest_upstream.config.sources import BUILTIN_SOURCES, FORMATS, SOURCES
from pytest_upstream.config.units import parse_size
from pytest_upstream.config.upstream_limits import (
    DECODE_FIELDS,
    FETCH_FIELDS,
    HEALTH_FIELDS,
    DecodeLimits,
    FetchLimits,
    HealthLimits,
    parse_allow_hosts,
    parse_decode_limits,
    parse_fetch_limits,
    parse_health_limits,
)

MODES = ("record", "replay", "refresh")
TABLE = "pytest-upstream"
DEFAULT_METADATA_TTL = 600.0
DEFAULT_TIMEOUT = 30.0
DEFAULT_LOCK_TIMEOUT = 300.0
DEFAULT_NEGATIVE_TTL = 300.0  # how long formats that cache upstream 404s (maven, npm) trust one

_PROXY_FIELDS = {
    "key",
    "source",
    "format",
    "url",
    "auth",
    "username_env",
    "password_env",
    "token_env",
    "metadata_ttl",
    "timeout",
    "mutable_paths",
    "negative_ttl",
    "mirror",
    "auth_hosts",
}
_TOP_FIELDS = {"cache", "mode", "metadata_ttl", "timeout", "lock_timeout", "lock", "proxy"}
_TOP_FIELDS |= set(CONNECTION_LIMIT_FIELDS)
_TOP_FIELDS |= {"allowed_hosts", "allow_hosts", "group", *FETCH_FIELDS, *HEALTH_FIELDS} | OBJECT_STORE_FIELDS
_PROXY_FIELDS |= set(DECODE_FIELDS)
_PROXY_FIELDS |= set(POLICY_FIELDS)  # what comes in: allow/block rules, min_age (docs/rules.md)
_PROXY_FIELDS |= {"offline"}  # serve only what is cached (docs/rules.md)

# -- the size cap (issue 11; docs/cache.md § Size cap) ---------------------------------------------
ENV_MAX_SIZE = "UPSTREAM_PROXY_MAX_SIZE"
_TOP_FIELDS |= {"max_size"}
_TOP_FIELDS |= set(CAPTURE_FIELDS)  # capture (docs/capture.md, config/capture.py)


def parse_size_cap(table: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``max_size``: the bytes of blobs the cache may hold while the proxy serves (a number or a
    size, ``"10G"``); absent or 0: no cap."""
    value = table.get("max_size")
    return {"max_size": None if value is None else size_value(value, where, "max_size") or None}


def with_max_size(settings: Settings, text: str | None) -> Settings:
    """``settings`` with a flag's or ``UPSTREAM_PROXY_MAX_SIZE``'s cap (``"0"``: none) over the table's."""
    if not text:
        return settings
    try:
        size = parse_size(text)
    except ValueError as exc:
        raise ConfigError(f"max size: {exc}") from None
    return replace(settings, max_size=size or None)


# -- end of the size cap ---------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """The per-user cache directory platformdirs names for us (docs/configuration.md).

    On Linux that is ``$XDG_CACHE_HOME/pytest-upstream`` (an absolute one, as the XDG spec
    says) or ``~/.cache/pytest-upstream``; on macOS and Windows the platform's own place.
    ``appauthor=False`` keeps Windows at ``%LOCALAPPDATA%\\pytest-upstream\\Cache`` rather
    than nesting the name twice.  Imported here so that a pytest session whose proxy never
    starts does not import it.
    """
    from platformdirs import user_cache_path

    return user_cache_path("pytest-upstream", appauthor=False)


@dataclass(frozen=True)
class ProxyDefinition:
    """One upstream proxy: a key, a source (format + URL) and an auth mode."""

    key: str
    source: str
    format: str
    url: str
    auth: AuthSpec = field(default_factory=AuthSpec)
    metadata_ttl: float = DEFAULT_METADATA_TTL
    timeout: float = DEFAULT_TIMEOUT
    mutable_paths: tuple[str, ...] = ()
    negative_ttl: float = DEFAULT_NEGATIVE_TTL
    mirror: bool | None = None  # docker: the registry mirror for keyless /v2/<name>/... (docs/docker.md)
    # secrets and clients: credentials with their origin (issue 10)
    auth_hosts: tuple[str, ...] = ()  # docker: token realms on other origins that may get credentials
    # hostile upstreams: bounded decoding (issue 10)
    decoding: DecodeLimits = field(default_factory=DecodeLimits)
    policy: ReleasePolicy = field(default_factory=ReleasePolicy)  # allow/block, min_age (issue 12)
    offline: bool = False  # never contact the upstream: serve what is cached

    def as_table(self) -> dict[str, Any]:
        """The pyproject entry for this definition (only non-default fields)."""
        table: dict[str, Any] = {"key": self.key, "source": self.source}
        if self.source == "custom":
            table["format"] = self.format
            table["url"] = self.url
        elif (builtin := BUILTIN_SOURCES.get(self.source)) is None or self.url != builtin.url:
            # A built-in source pointed at a mirror: dropping the url would silently
            # send traffic to the public registry instead.
            table["url"] = self.url
        table["auth"] = self.auth.mode
        for name in ("username_env", "password_env", "token_env"):
            if value := getattr(self.auth, name):
                table[name] = value
        if self.mutable_paths:
            table["mutable_paths"] = list(self.mutable_paths)
        if self.mirror is not None:
            table["mirror"] = self.mirror
        if self.auth_hosts:
            table["auth_hosts"] = list(self.auth_hosts)
        table.update(policy_table(self.policy))
        if self.offline:
            table["offline"] = True
        return table


@dataclass(frozen=True)
class Settings:
    cache_dir: Path
    mode: str = "record"
    proxies: tuple[ProxyDefinition, ...] = ()
    groups: tuple[GroupDefinition, ...] = ()  # ordered groups of proxies (config/groups.py)
    lock_timeout: float = DEFAULT_LOCK_TIMEOUT
    config_file: Path | None = None
    lock_file: Path | None = None  # the lock file (docs/reproducible-builds.md), if any
    # The HTTP server's connection limits (server/limits.py, docs/configuration.md#connection-limits)
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    send_timeout: float = DEFAULT_SEND_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    fetch: FetchLimits = field(default_factory=FetchLimits)  # upstream download deadlines
    health: HealthLimits = field(default_factory=HealthLimits)  # when an upstream is marked down
    # secrets and clients: who may use the proxy (issue 10, docs/configuration.md § Clients)
    allowed_hosts: tuple[str, ...] = ()  # Host names a loopback-bound proxy answers besides loopback ones
    client_token_env: str | None = None  # serve --token-env: the variable holding the clients' token
    # hostile upstreams: the SSRF guard (issue 10): hosts besides the upstreams' own the proxy may reach
    allow_hosts: tuple[str, ...] = ()
    # the size cap (issue 11): bytes of blobs kept while serving (None: no cap), and the lock files
    # whose blobs it never removes besides the engine's own (serve --keep-lock)
    max_size: int | None = None
    keep_locks: tuple[Path, ...] = ()
    # the shared cache on object storage (issue 11, config/object_store.py): cache_dir is then its
    # local tier; store_options are the table's local_cache, s3_endpoint_url and s3_region
    object_store: S3Location | None = None
    store_options: StoreOptions = field(default_factory=StoreOptions)
    capture: CaptureSettings = field(default_factory=CaptureSettings)  # the forward proxy (docs/capture.md)

    def secret_env_names(self) -> tuple[str, ...]:
        """The environment variables whose values are secrets: the upstreams' credentials and the
        clients' token.  What every output is scrubbed of (config/auth.py ``scrub``)."""
        names = [name for proxy in self.proxies for name in proxy.auth.required_env()]
        if self.client_token_env:
            names.append(self.client_token_env)
        if self.object_store is not None:  # boto3's chain reads these; never shown
            names.extend(SECRET_ENV)
        return tuple(dict.fromkeys(names))

    def group(self, key: str) -> GroupDefinition | None:
        return next((g for g in self.groups if g.key == key), None)

    def proxy(self, key: str) -> ProxyDefinition | None:
        for p in self.proxies:
            if p.key == key:
                return p
        return None

    def registry_mirror(self) -> ProxyDefinition | None:
        """The docker proxy that serves keyless ``/v2/<name>/...`` requests (registry mirrors).

        The one marked ``mirror = true``; else the only ``dockerhub``-source proxy,
        unless it says ``mirror = false``; else None.  See docs/docker.md.
        """
        docker = [p for p in self.proxies if p.format == "docker"]
        marked = [p for p in docker if p.mirror]
        if marked:
            return marked[0]
        hub = [p for p in docker if p.source == "dockerhub"]
        return hub[0] if len(hub) == 1 and hub[0].mirror is None else None

    def with_overrides(
        self, *, cache: str | Path | None = None, mode: str | None = None, lock: str | Path | None = None
    ) -> Settings:
        if mode is not None and mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)} (got {mode!r})")
        where = resolve_cache(cache, self.store_options, "cache", default_cache_dir) if cache else None
        return replace(
            self,
            cache_dir=where.cache_dir if where else self.cache_dir,
            object_store=where.object_store if where else self.object_store,
            mode=mode or self.mode,
            lock_file=Path(lock).expanduser() if lock else self.lock_file,
        )


def builtin_proxies(
    ttl: float = DEFAULT_METADATA_TTL, timeout: float = DEFAULT_TIMEOUT
) -> tuple[ProxyDefinition, ...]:
    return tuple(
        ProxyDefinition(
            key=s.name, source=s.name, format=s.format, url=s.url, metadata_ttl=ttl, timeout=timeout
        )
        for s in BUILTIN_SOURCES.values()
    )


def parse_proxy(entry: Mapping[str, Any], where: str, ttl: float, timeout: float) -> ProxyDefinition:
    """Validate one ``[[tool.pytest-upstream.proxy]]`` entry."""
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: must be a table")
    unknown = sorted(set(entry) - _PROXY_FIELDS)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}")
    if "key" not in entry:
        raise ConfigError(f"{where}: missing 'key'")
    key = entry["key"]
    where = f"{where} (key {key!r})"
    if rule := key_error(key):
        raise ConfigError(f"{where}: invalid upstream proxy key {key!r}: {rule}")
    source = entry.get("source", "custom")
    if source not in SOURCES:
        raise ConfigError(f"{where}: unknown source {source!r} (known: {', '.join(SOURCES)})")
    if source == "custom":
        fmt = entry.get("format")
        if fmt is None:
            raise ConfigError(f"{where}: a custom source needs 'format' (one of {', '.join(FORMATS)})")
        if fmt not in FORMATS:
            raise ConfigError(f"{where}: unknown format {fmt!r} (known: {', '.join(FORMATS)})")
        url = entry.get("url")
        if not url:
            raise ConfigError(f"{where}: a custom source needs 'url'")
    else:
        builtin = BUILTIN_SOURCES[source]
        fmt = entry.get("format", builtin.format)
        if fmt != builtin.format:
            raise ConfigError(f"{where}: source {source!r} has format {builtin.format!r}, not {fmt!r}")
        url = entry.get("url", builtin.url)
    if not isinstance(url, str):
        raise ConfigError(f"{where}: url must be a string")
    parts = urlsplit(url)
    if parts.username or parts.password:
        raise ConfigError(f"{where}: url must not hold credentials; use auth with username_env/password_env")
    if parts.scheme not in ("http", "https") or not parts.netloc:
        # Never echo a URL that may carry a secret ("user:token@host" parses as a scheme).
        shown = "a URL containing '@' (not shown)" if "@" in url else repr(url)
        raise ConfigError(f"{where}: url must be an absolute http(s) URL (got {shown})")
    for name in ("auth", "username_env", "password_env", "token_env"):
        if name in entry and not isinstance(entry[name], str):
            raise ConfigError(f"{where}: {name} must be a string (got {entry[name]!r})")
    auth = AuthSpec(
        mode=entry.get("auth", "anonymous"),
        username_env=entry.get("username_env"),
        password_env=entry.get("password_env"),
        token_env=entry.get("token_env"),
    )
    if problem := auth.problem():
        raise ConfigError(f"{where}: {problem}")
    mirror = entry.get("mirror")
    if mirror is not None and not isinstance(mirror, bool):
        raise ConfigError(f"{where}: mirror must be true or false (got {mirror!r})")
    if mirror is not None and fmt != "docker":
        raise ConfigError(f"{where}: mirror applies to docker proxies only (this one is {fmt!r})")
    mutable = entry.get("mutable_paths", [])
    if not isinstance(mutable, list) or not all(isinstance(p, str) for p in mutable):
        raise ConfigError(f"{where}: mutable_paths must be a list of glob patterns")
    return ProxyDefinition(
        key=key,
        source=source,
        format=fmt,
        url=url,
        auth=auth,
        metadata_ttl=_number(entry.get("metadata_ttl", ttl), where, "metadata_ttl"),
        timeout=_positive(entry.get("timeout", timeout), where, "timeout"),
        mutable_paths=tuple(mutable),
        negative_ttl=_number(entry.get("negative_ttl", DEFAULT_NEGATIVE_TTL), where, "negative_ttl"),
        mirror=mirror,
        **_secrets_fields(entry, where),
        **parse_decode_limits(entry, where),
        policy=_policy(entry, fmt, where),
        offline=_flag(entry, "offline", where),
    )


def _flag(entry: Mapping[str, Any], name: str, where: str) -> bool:
    value = entry.get(name, False)
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: {name} must be true or false (got {value!r})")
    return value


def _policy(entry: Mapping[str, Any], fmt: str, where: str) -> ReleasePolicy:
    try:
        return parse_policy(entry, fmt)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def parse_table(table: Mapping[str, Any], origin: str, base_dir: Path) -> Settings:
    """Validate a whole ``[tool.pytest-upstream]`` table read from ``origin``."""
    unknown = sorted(set(table) - _TOP_FIELDS)
    if unknown:
        raise ConfigError(f"{origin}: [tool.{TABLE}]: unknown field(s) {', '.join(unknown)}")
    where = f"{origin}: [tool.{TABLE}]"
    mode = table.get("mode", "record")
    if mode not in MODES:
        raise ConfigError(f"{where}: mode must be one of {', '.join(MODES)} (got {mode!r})")
    ttl = _number(table.get("metadata_ttl", DEFAULT_METADATA_TTL), where, "metadata_ttl")
    timeout = _positive(table.get("timeout", DEFAULT_TIMEOUT), where, "timeout")
    lock_timeout = _positive(table.get("lock_timeout", DEFAULT_LOCK_TIMEOUT), where, "lock_timeout")
    entries = table.get("proxy", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{where}: 'proxy' must be an array of tables ([[tool.{TABLE}.proxy]])")
    proxies: list[ProxyDefinition] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        proxy = parse_proxy(entry, f"{origin}: [[tool.{TABLE}.proxy]] entry {i + 1}", ttl, timeout)
        if proxy.key in seen:
            raise ConfigError(
                f"{origin}: [[tool.{TABLE}.proxy]] entry {i + 1}: duplicate key {proxy.key!r} "
                f"(first defined in entry {seen[proxy.key] + 1})"
            )
        seen[proxy.key] = i
        proxies.append(proxy)
    mirrors = [p.key for p in proxies if p.mirror]
    if len(mirrors) > 1:
        raise ConfigError(
            f"{origin}: [[tool.{TABLE}.proxy]]: mirror = true on {', '.join(map(repr, mirrors))}; "
            "at most one docker proxy can be the registry mirror (keyless /v2/<name>/...)"
        )
    cache = table.get("cache")
    if cache is not None and not isinstance(cache, str):
        raise ConfigError(f"{where}: cache must be a path string")
    options = parse_store_options(table, where, base_dir)
    if cache and not is_s3_url(cache):
        cache = str(base_dir / Path(cache).expanduser())
    location = resolve_cache(cache or default_cache_dir(), options, f"{where}: cache", default_cache_dir)
    lock = table.get("lock")
    if lock is not None and (not isinstance(lock, str) or not lock):
        raise ConfigError(f"{where}: lock must be a path string (got {lock!r})")
    all_proxies = tuple(proxies) or builtin_proxies(ttl, timeout)
    return Settings(
        cache_dir=location.cache_dir,
        object_store=location.object_store,
        store_options=options,
        mode=mode,
        proxies=all_proxies,
        groups=parse_groups(table.get("group"), {p.key: p.format for p in all_proxies}, origin),
        lock_timeout=lock_timeout,
        lock_file=base_dir / Path(lock).expanduser() if lock else None,
        **parse_connection_limits(table, where),
        fetch=parse_fetch_limits(table, where),
        health=parse_health_limits(table, where),
        allowed_hosts=_host_list(table, "allowed_hosts", where),
        **parse_allow_hosts(table, where),
        **parse_size_cap(table, where),
        **parse_capture(table, where, base_dir),
    )


# -- secrets and clients (issue 10, docs/configuration.md § Credentials and clients) ----------------
_HOST_NAME = re.compile(r"(?:[a-z0-9_](?:[a-z0-9_.-]{0,251}[a-z0-9_])?|\[[0-9a-f:.]{2,45}\])(?::[0-9]{1,5})?")


def _host_list(table: Mapping[str, Any], name: str, where: str) -> tuple[str, ...]:
    """A list of host names (``host`` or ``host:port``), lower-cased."""
    value = table.get(name, [])
    if not isinstance(value, list) or not all(isinstance(h, str) for h in value):
        raise ConfigError(f"{where}: {name} must be a list of host names (host or host:port)")
    hosts = tuple(h.lower() for h in value)
    for host in hosts:
        if not _HOST_NAME.fullmatch(host):
            raise ConfigError(f"{where}: {name}: {host!r} is not a host name (host or host:port)")
    return hosts


def _secrets_fields(entry: Mapping[str, Any], where: str) -> dict[str, Any]:
    """A proxy's ``auth_hosts``: the origins of token realms (docker) its credentials may go to."""
    return {"auth_hosts": _host_list(entry, "auth_hosts", where)}


# -- end of secrets and clients ---------------------------------------------------------------------


def load_settings(config_file: str | Path | None = None, *, search_dir: Path | None = None) -> Settings:
    """Read settings from ``config_file``, else ``<search_dir or cwd>/pyproject.toml`` if present.

    With no file (or no table) the built-in sources are the proxies.
    """
    if config_file is None:
        candidate = (search_dir or Path.cwd()) / "pyproject.toml"
        if not candidate.is_file():
            return Settings(cache_dir=default_cache_dir(), proxies=builtin_proxies())
        path = candidate
    else:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    tool = data.get("tool", {})
    table = tool.get(TABLE, {}) if isinstance(tool, dict) else None
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [tool.{TABLE}] must be a table")
    settings = parse_table(table, str(path), path.parent.resolve())
    return replace(settings, config_file=path)
