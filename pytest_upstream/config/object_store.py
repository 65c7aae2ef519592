"""Where the cache lives: a directory, or an object store with a local tier in front
(issue 11; docs/object-storage.md, docs/configuration.md § Cache location).

``cache`` (the table's, ``--cache``, ``--upstream-cache``, ``UPSTREAM_PROXY_CACHE``) is either
a directory (the whole cache) or ``s3://BUCKET/PREFIX`` (the shared cache in a bucket).  With a
bucket, ``local_cache`` (default: the per-user cache directory) is the local tier every hit is
served from; ``Settings.cache_dir`` is always the directory the proxy reads and writes, so
everything that works on a directory (the size cap, locks, sendfile) works on the local tier.

The endpoint and region are resolved once, here (config/s3_location.py): the table's
``s3_endpoint_url`` / ``s3_region``, else the AWS variables.  Credentials are never read here:
they stay in boto3's chain; ``SECRET_ENV`` names the variables whose values output is scrubbed of.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_upstream.config.checks import ConfigError
from pytest_upstream.config.s3_location import S3Location, S3LocationError, is_s3_url, s3_location
from pytest_upstream.config.units import parse_age

_LOCATION_FIELDS = ("local_cache", "s3_endpoint_url", "s3_region")
OBJECT_STORE_FIELDS = frozenset({*_LOCATION_FIELDS, "s3_claim_ttl"})
# Seconds a machine's claim to fetch an entry lives unless renewed.  A live download renews it
# every third of that (store/remote_tier.py ``Claim.keep_alive``), so it only bounds how long the
# other machines wait after the fetching machine died (killed, lost its network) before one of
# them fetches instead.  Shorter means a faster take-over and more renewals (two requests each).
DEFAULT_CLAIM_TTL = 60.0
# What boto3's chain may read that is a secret (the access key id is an identifier, scrubbed too).
SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID")


@dataclass(frozen=True)
class StoreOptions:
    """The table's object-store fields, kept so a flag's ``s3://`` cache is resolved like the table's."""

    local_cache: Path | None = None  # the local tier; None: the per-user cache directory
    endpoint_url: str | None = None  # s3_endpoint_url
    region: str | None = None  # s3_region
    claim_ttl: float = DEFAULT_CLAIM_TTL  # s3_claim_ttl: seconds ("90s", "2m", or a number)


@dataclass(frozen=True)
class CacheLocation:
    cache_dir: Path  # the directory served from: the whole cache, or the local tier
    object_store: S3Location | None  # the shared tier, if any


def parse_store_options(table: Mapping[str, Any], where: str, base_dir: Path) -> StoreOptions:
    """``local_cache`` (relative to the config file's directory), ``s3_endpoint_url``, ``s3_region``,
    ``s3_claim_ttl``."""
    values: dict[str, str | None] = {}
    for name in _LOCATION_FIELDS:
        value = table.get(name)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ConfigError(f"{where}: {name} must be a non-empty string (got {value!r})")
        values[name] = value
    local = values["local_cache"]
    return StoreOptions(
        local_cache=base_dir / Path(local).expanduser() if local else None,
        endpoint_url=values["s3_endpoint_url"],
        region=values["s3_region"],
        claim_ttl=_claim_ttl(table.get("s3_claim_ttl", DEFAULT_CLAIM_TTL), where),
    )


def _claim_ttl(value: object, where: str) -> float:
    """A positive number of seconds, or an age (``"90s"``, ``"2m"``)."""
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = parse_age(value)
        except ValueError:
            seconds = None
    if seconds is None or not 0 < seconds < float("inf"):
        raise ConfigError(
            f"{where}: s3_claim_ttl must be a positive number of seconds or an age like '90s' (got {value!r})"
        )
    return seconds


def resolve_cache(
    cache: str | Path, options: StoreOptions, where: str, default_dir: Callable[[], Path]
) -> CacheLocation:
    """``cache`` (a directory, or ``s3://``) with the table's ``options``; ConfigError names
    ``where`` (the setting the value came from) when an ``s3://`` location cannot be used."""
    if isinstance(cache, str) and is_s3_url(cache):
        try:
            location = s3_location(cache, endpoint_url=options.endpoint_url, region=options.region)
        except S3LocationError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        return CacheLocation(options.local_cache or default_dir(), location)
    return CacheLocation(Path(cache).expanduser(), None)
