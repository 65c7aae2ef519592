"""Where an object-store cache lives: ``s3://BUCKET/PREFIX``, the endpoint and the region.

Every part is checked here, once, before anything talks to a server, because each one ends up
in request paths and object keys: a bucket name must follow S3's rules (so an odd name fails
with our message, not with an unrelated 400 later), and a prefix must not hold ``..``, empty
segments or control characters (keys are not file paths, but tools that sync a bucket to disk
treat them as such, and an empty segment silently makes a second, different key).

The endpoint is for S3-compatible services (SeaweedFS, MinIO, R2, GCS interop, Ceph RGW): the
table's ``s3_endpoint_url``, else ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL`` (the
variables the AWS SDKs read), else none (AWS itself).  It must be http(s) and carry no
``user:password@``: credentials come only from the client library's standard chain
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``, ``AWS_PROFILE``, instance
roles), which this package never reads, stores or prints.  An error about an endpoint shows it
without its user-info, since that part may be a secret.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

SCHEME = "s3://"
ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
REGION_ENV = ("AWS_REGION", "AWS_DEFAULT_REGION")
MAX_PREFIX_BYTES = 512  # S3 keys are at most 1024 bytes; the rest is for our own key names

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
# Reserved by AWS for its own bucket kinds (access points, directory buckets, demos...).
_BUCKET_RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_BUCKET_RESERVED_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")
_REGION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


class S3LocationError(ValueError):
    """An ``s3://`` location, endpoint or region that cannot be used (the message says why)."""


@dataclass(frozen=True)
class S3Location:
    """A bucket, a key prefix in it (``""`` or ``a/b``, no slash at either end), and how to reach it."""

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None  # None: the library's default (AWS)
    region: str | None = None  # None: the library's chain (AWS_PROFILE's config), else its default

    def key(self, relative: str) -> str:
        """The object key of ``relative`` (``blobs/ab/...``) below the prefix."""
        return f"{self.prefix}/{relative}" if self.prefix else relative

    @property
    def url(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}" if self.prefix else f"{SCHEME}{self.bucket}"

    def __str__(self) -> str:
        return self.url


def is_s3_url(text: str) -> bool:
    """Whether a cache setting names an object store rather than a directory."""
    return text[: len(SCHEME)].lower() == SCHEME


def bucket_problem(bucket: str) -> str | None:
    """Why ``bucket`` is not a valid S3 bucket name (general-purpose bucket rules), or None."""
    if not 3 <= len(bucket) <= 63:
        return "a bucket name has 3 to 63 characters"
    if not _BUCKET.fullmatch(bucket):
        return (
            "a bucket name has only lowercase letters, digits, dots and hyphens, "
            "and begins and ends with a letter or digit"
        )
    if ".." in bucket or ".-" in bucket or "-." in bucket:
        return "a bucket name has no two dots (or a dot and a hyphen) side by side"
    try:
        ipaddress.IPv4Address(bucket)
    except ValueError:
        pass
    else:
        return "a bucket name is not an IP address"
    if bucket.startswith(_BUCKET_RESERVED_PREFIXES) or bucket.endswith(_BUCKET_RESERVED_SUFFIXES):
        return "that bucket name prefix or suffix is reserved by AWS"
    return None


def prefix_problem(prefix: str) -> str | None:
    """Why ``prefix`` (without its slashes at either end) cannot prefix our keys, or None."""
    if not prefix:
        return None
    if len(prefix.encode()) > MAX_PREFIX_BYTES:
        return f"the prefix is longer than {MAX_PREFIX_BYTES} bytes"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in prefix):
        return "the prefix has a control character"
    if "\\" in prefix:
        return "the prefix has a backslash (use / between segments)"
    for segment in prefix.split("/"):
        if segment == "":
            return "the prefix has an empty segment (//)"
        if segment in (".", ".."):
            return f"the prefix has a {segment!r} segment"
    return None


def parse_s3_url(url: str) -> tuple[str, str]:
    """``(bucket, prefix)`` of ``s3://BUCKET[/PREFIX][/]``; S3LocationError if it is not usable."""
    if not is_s3_url(url):
        raise S3LocationError(f"not an s3:// URL: {url!r}")
    rest = url[len(SCHEME) :]
    if "?" in rest or "#" in rest:
        raise S3LocationError(f"{url!r}: an s3:// location has no query or fragment")
    bucket, _, prefix = rest.partition("/")
    if problem := bucket_problem(bucket):
        raise S3LocationError(f"{url!r}: bucket {bucket!r}: {problem}")
    if prefix.endswith("/"):
        prefix = prefix[:-1]
    if problem := prefix_problem(prefix):
        raise S3LocationError(f"{url!r}: {problem}")
    return bucket, prefix


def redact_url(url: str) -> str:
    """``url`` without any ``user:password@`` (for messages: that part may be a secret)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "<not a URL>" if "@" in url else url
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        authority = "***@" + authority.rpartition("@")[2]
    return f"{scheme}{sep}{authority}{slash}{path}"


def check_endpoint(url: str, where: str) -> str:
    """``url`` as an endpoint (http or https, a host, no user-info, query or fragment), without
    a trailing slash; S3LocationError naming ``where`` (the setting it came from) otherwise."""
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise S3LocationError(f"{where}: not a URL: {shown!r} ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise S3LocationError(f"{where}: the endpoint must be an http:// or https:// URL, not {shown!r}")
    if "@" in parts.netloc:
        raise S3LocationError(
            f"{where}: the endpoint must not carry user:password@ ({shown!r}); credentials come from "
            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
        )
    if not parts.hostname:
        raise S3LocationError(f"{where}: the endpoint has no host: {shown!r}")
    if parts.query or parts.fragment:
        raise S3LocationError(f"{where}: the endpoint has a query or fragment: {shown!r}")
    if port == 0:
        raise S3LocationError(f"{where}: the endpoint's port is 0: {shown!r}")
    return url.rstrip("/")


def endpoint_from(configured: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The endpoint: ``configured`` (the table's ``s3_endpoint_url``), else the first of
    ``ENDPOINT_ENV`` that is set; None for the library's default (AWS)."""
    env = os.environ if environ is None else environ
    if configured:
        return check_endpoint(configured, "s3_endpoint_url")
    for name in ENDPOINT_ENV:
        if value := env.get(name, "").strip():
            return check_endpoint(value, name)
    return None


def region_from(configured: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The region: ``configured``, else ``AWS_REGION``/``AWS_DEFAULT_REGION``, else None."""
    env = os.environ if environ is None else environ
    for where, value in (("s3_region", configured), *((name, env.get(name)) for name in REGION_ENV)):
        if value and value.strip():
            if not _REGION.fullmatch(value.strip()):
                raise S3LocationError(f"{where}: not a region name: {value.strip()[:64]!r}")
            return value.strip()
    return None


def s3_location(
    url: str,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> S3Location:
    """The whole location of an ``s3://`` cache setting, checked (S3LocationError if not usable)."""
    bucket, prefix = parse_s3_url(url)
    return S3Location(bucket, prefix, endpoint_from(endpoint_url, environ), region_from(region, environ))
