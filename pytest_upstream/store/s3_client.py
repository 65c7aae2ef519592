"""The S3 client under ``S3Backend`` (s3.py): made lazily, bounded in time, its errors ours.

boto3 is imported only when an object-store cache is opened: importing it takes ~0.35 s, and the
pytest fixture must start in well under 100 ms when no ``s3://`` cache is configured
(docs/dependencies.md has the library choice and its figures).  boto3 is the ``s3`` extra.

- **Credentials** come only from boto3's standard chain (environment, ``AWS_PROFILE``, instance
  roles); nothing here reads, keeps or prints them.
- **Time is bounded**: a connect timeout and a read timeout on every request (a read timeout
  also bounds each read of a streamed body), and at most ``attempts`` tries in botocore's
  "standard" retry mode (connection errors, 5xx, throttling), so a stopped store fails within
  seconds instead of hanging a build.
- **Errors are ours**: ``call`` turns botocore's exceptions into ``ObjectStoreError`` naming the
  operation, bucket, key and HTTP status, scrubbed of the credential variables' values, and
  raised ``from None`` so no library exception (which may carry request details) is chained.
  A failed condition (412, and 409 ``ConditionalRequestConflict``) and a missing object (404,
  but not ``NoSuchBucket``) are answers, not errors: ``call`` returns them as a ``Refused``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pytest_upstream.config.auth import scrub
from pytest_upstream.config.s3_location import S3Location
from pytest_upstream.store.errors import ObjectStoreError

# The environment variables whose values must never appear in a message (boto3's chain reads them).
CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
INSTALL_HINT = "an s3:// cache needs boto3: pip install 'pytest-upstream[s3]'"


@dataclass(frozen=True)
class Timeouts:
    connect: float = 5.0  # seconds to open a connection
    read: float = 30.0  # seconds to wait for any byte of an answer (each read of a body too)
    attempts: int = 3  # tries of one request in all (botocore "standard" retries)


DEFAULT_TIMEOUTS = Timeouts()


@dataclass(frozen=True)
class Refused:
    """A request the store answered with a refusal we expect: 404, 412 or 409."""

    status: int
    code: str


def make_client(location: S3Location, timeouts: Timeouts) -> Any:
    """A boto3 S3 client for ``location`` (its own session: sessions are not thread-safe, clients are)."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ObjectStoreError(INSTALL_HINT, code="missing-library") from None
    config = Config(
        connect_timeout=timeouts.connect,
        read_timeout=timeouts.read,
        retries={"max_attempts": timeouts.attempts, "mode": "standard"},
        # S3-compatible services are reached by path: virtual hosts need wildcard DNS.
        s3={"addressing_style": "path" if location.endpoint_url else "auto"},
        # Checksums only where S3 requires them: several S3-compatible services reject the
        # CRC32 trailers that boto3 >= 1.36 sends by default.  Our blobs are verified by sha256.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        user_agent_extra="pytest-upstream",
    )
    from botocore.exceptions import BotoCoreError

    try:
        session = boto3.session.Session()
        return session.client(
            "s3", endpoint_url=location.endpoint_url, region_name=location.region, config=config
        )
    except (BotoCoreError, ValueError) as exc:  # a missing AWS_PROFILE, a bad region or endpoint
        raise ObjectStoreError(
            _clean(f"object store: s3://{location.bucket}: cannot make a client: {_unreachable(exc)}"),
            code="client-config",
        ) from None


def describe(operation: str, bucket: str, key: str) -> str:
    return f"object store: {operation} s3://{bucket}/{key}"


def call(
    operation: str, bucket: str, key: str, fn: Callable[[], Any], *, refusals: tuple[int, ...] = ()
) -> Any:
    """``fn()`` (one client request); a ``Refused`` for the statuses in ``refusals``;
    ``ObjectStoreError`` for every other failure."""
    from botocore.exceptions import BotoCoreError, ClientError, ConnectTimeoutError, ReadTimeoutError
    from urllib3.exceptions import HTTPError as Urllib3Error

    try:
        return fn()
    except ClientError as exc:
        status, code, message = _client_error(exc)
        if status in refusals and code != "NoSuchBucket":  # a missing bucket is an error, not an answer
            return Refused(status, code)
        detail = f": {message}" if message else ""
        raise ObjectStoreError(
            _clean(f"{describe(operation, bucket, key)}: {code or 'error'} (HTTP {status}){detail}"),
            status=status,
            code=code,
        ) from None
    except (ConnectTimeoutError, ReadTimeoutError) as exc:
        raise ObjectStoreError(
            _clean(f"{describe(operation, bucket, key)}: timed out ({type(exc).__name__})"), code="timeout"
        ) from None
    except (BotoCoreError, Urllib3Error, OSError) as exc:
        raise ObjectStoreError(
            _clean(f"{describe(operation, bucket, key)}: {_unreachable(exc)}"), code="unreachable"
        ) from None


def _client_error(exc: Any) -> tuple[int, str, str]:
    response = getattr(exc, "response", None) or {}
    error = response.get("Error") or {}
    status = int((response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
    code = str(error.get("Code") or "")
    if code.isdigit() and not status:
        status = int(code)
    message = " ".join(str(error.get("Message") or "").split())[:200]
    return status, code, message


def _unreachable(exc: BaseException) -> str:
    """What went wrong, from the exception's class and botocore's own short text."""
    name = type(exc).__name__
    kind = {
        "NoCredentialsError": "no credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)",
        "PartialCredentialsError": "incomplete credentials in the environment or profile",
        "EndpointConnectionError": "cannot connect to the endpoint",
        "ConnectionClosedError": "the connection was closed",
        "ProfileNotFound": "the AWS_PROFILE named is not configured",
        "NoRegionError": "no region (set AWS_REGION)",
    }.get(name)
    return kind or f"{name}: {' '.join(str(exc).split())[:200]}"


def _clean(message: str) -> str:
    return scrub(message, CREDENTIAL_ENV)
