"""``S3Backend``: the storage seam (backend.py) on an S3-compatible bucket, for a cache shared by
many machines.

Objects under the location's prefix (docs/object-storage.md)::

    PREFIX/blobs/<2 hex>/<sha256>   the bytes, named by their sha256 (content-addressed)
    PREFIX/index/<key>/<name>       index objects; their version is the ETag
    PREFIX/leases/<name>            "<token> <expiry>": who fetches what, until when

- A blob is created only if absent (``If-None-Match: *`` on ``PutObject``, or on
  ``CompleteMultipartUpload`` for big files): an existing copy is kept, as on disk.
- An index object is created with ``If-None-Match: *``, replaced with ``If-Match: <ETag>`` and
  deleted with ``If-Match: <ETag>`` after a check of the ETag (the check alone protects stores
  that ignore conditions on deletes).  An ETag is the MD5 of the bytes, so a writer that
  stores the *same* bytes leaves the version unchanged: harmless for index objects (nothing
  changed), and leases always hold a fresh random token.
- A lease is claimed by a conditional create; an expired one is taken over by a replace
  conditional on the ETag read, so of two machines that both saw it expire only one wins.
  Renew and release check our token (and the ETag).  Expiries are wall-clock times compared
  by every machine (``now``, injectable for tests, like ``LocalBackend``).
- Every request has a connect and a read timeout and a bounded number of tries; every failure
  is an ``ObjectStoreError`` naming the operation, bucket, key and status, never a credential
  (s3_client.py).  A request retried after its answer was lost may find its own write: the
  lease methods recognise their token; a create of an index object reports "already present".
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, cast

from pytest_upstream.config.s3_location import S3Location
from pytest_upstream.store.backend import BlobInfo, IndexObject
from pytest_upstream.store.errors import ObjectStoreError
from pytest_upstream.store.layout import HEX64
from pytest_upstream.store.s3_client import DEFAULT_TIMEOUTS, Refused, Timeouts, call, make_client

MiB = 1024 * 1024
MULTIPART_THRESHOLD = 16 * MiB  # a bigger blob goes up in parts (retried part by part)
PART_SIZE = 16 * MiB
MAX_PARTS = 10_000  # S3's limit: the part size grows for blobs over PART_SIZE * MAX_PARTS
MAX_INDEX_BYTES = 1 * MiB  # an index object is a few hundred bytes; a bigger one is not ours
MAX_LEASE_BYTES = 256
CONDITION_FAILED = (412, 409)  # 409: ConditionalRequestConflict (a concurrent conditional write)


class S3Backend:
    """The ``Backend`` of one ``s3://BUCKET/PREFIX``."""

    def __init__(
        self,
        location: S3Location,
        *,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        now: Callable[[], float] = time.time,
        part_size: int = PART_SIZE,
        multipart_threshold: int = MULTIPART_THRESHOLD,
    ) -> None:
        self.location = location
        self.bucket = location.bucket
        self._now = now
        self._part_size = part_size
        self._multipart_threshold = multipart_threshold
        self._timeouts = timeouts
        self._client: Any = None
        self._client_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"S3Backend({self.location.url!r}, endpoint={self.location.endpoint_url!r})"

    @property
    def client(self) -> Any:
        """The boto3 client, made on first use (importing boto3 is slow: s3_client.py)."""
        if self._client is None:
            with self._client_lock:
                if self._client is None:
                    self._client = make_client(self.location, self._timeouts)
        return self._client

    def _call(self, operation: str, key: str, fn: Callable[[], Any], refusals: tuple[int, ...] = ()) -> Any:
        return call(operation, self.bucket, key, fn, refusals=refusals)

    # -- keys ------------------------------------------------------------------
    def blob_key(self, sha256: str) -> str:
        if not HEX64.fullmatch(sha256):
            raise ValueError(f"not a sha256 digest: {sha256[:80]!r}")
        return self.location.key(f"blobs/{sha256[:2]}/{sha256}")

    def index_key(self, key: str, name: str) -> str:
        return self.location.key(f"index/{_segment(key, 'key')}/{_segment(name, 'name')}")

    def lease_key(self, name: str) -> str:
        return self.location.key(f"leases/{_segment(name, 'lease name')}")

    # -- blobs -------------------------------------------------------------------
    def blob_stat(self, sha256: str) -> BlobInfo | None:
        key = self.blob_key(sha256)
        got = self._call("HEAD", key, lambda: self.client.head_object(Bucket=self.bucket, Key=key), (404,))
        return None if isinstance(got, Refused) else BlobInfo(sha256, int(got["ContentLength"]))

    def blob_local_path(self, sha256: str) -> Path | None:
        return None  # no local file: a hit streams (the local tier in front has files)

    def open_blob(self, sha256: str) -> BinaryIO:
        body, _etag = self._get_stream(self.blob_key(sha256))
        return cast(BinaryIO, body)

    def _get_stream(self, key: str) -> tuple[_BodyReader, str]:
        got = self._call("GET", key, lambda: self.client.get_object(Bucket=self.bucket, Key=key), (404,))
        if isinstance(got, Refused):
            raise FileNotFoundError(f"s3://{self.bucket}/{key}")
        return _BodyReader(got["Body"], f"s3://{self.bucket}/{key}"), str(got["ETag"])

    def put_blob(self, source: Path, sha256: str) -> bool:
        key = self.blob_key(sha256)
        try:
            size = os.stat(source).st_size
            if size > self._multipart_threshold:
                return self._put_multipart(source, key, size)
            with open(source, "rb") as f:
                got = self._call(
                    "PUT",
                    key,
                    lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=f, IfNoneMatch="*"),
                    CONDITION_FAILED,
                )
            return not isinstance(got, Refused)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(source)

    def _put_multipart(self, source: Path, key: str, size: int) -> bool:
        head = self._call("HEAD", key, lambda: self.client.head_object(Bucket=self.bucket, Key=key), (404,))
        if not isinstance(head, Refused):
            return False  # already there: kept (content addressing), no upload
        part_size = max(self._part_size, -(-size // MAX_PARTS))
        upload = self._call(
            "CreateMultipartUpload",
            key,
            lambda: self.client.create_multipart_upload(Bucket=self.bucket, Key=key),
        )
        upload_id = str(upload["UploadId"])
        done = False
        try:
            parts = []
            with open(source, "rb") as f:
                number = 1
                while block := f.read(part_size):
                    part = self._call(
                        f"UploadPart {number}",
                        key,
                        functools.partial(
                            self.client.upload_part,
                            Bucket=self.bucket,
                            Key=key,
                            UploadId=upload_id,
                            PartNumber=number,
                            Body=block,
                        ),
                    )
                    parts.append({"ETag": part["ETag"], "PartNumber": number})
                    number += 1
            got = self._call(
                "CompleteMultipartUpload",
                key,
                lambda: self.client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                    IfNoneMatch="*",
                ),
                CONDITION_FAILED,
            )
            done = not isinstance(got, Refused)
            return done
        finally:
            if not done:  # failed, or another copy landed first: leave no parts behind
                with contextlib.suppress(ObjectStoreError):
                    self._call(
                        "AbortMultipartUpload",
                        key,
                        lambda: self.client.abort_multipart_upload(
                            Bucket=self.bucket, Key=key, UploadId=upload_id
                        ),
                        (404,),
                    )

    def delete_blob_if_corrupt(self, sha256: str) -> bool:
        key = self.blob_key(sha256)
        try:
            body, etag = self._get_stream(key)
        except FileNotFoundError:
            return False
        with body:
            if hashlib.file_digest(body, "sha256").hexdigest() == sha256:
                return False
        # Only the copy we hashed: a fresh, intact copy put meanwhile has another ETag.
        return self._delete_version(key, etag)

    # -- index -----------------------------------------------------------------------
    def get_index(self, key: str, name: str) -> IndexObject | None:
        got = self._get_small(self.index_key(key, name), MAX_INDEX_BYTES)
        return None if got is None else IndexObject(*got)

    def _get_small(self, key: str, limit: int) -> tuple[bytes, str] | None:
        """A small object's bytes and ETag (None if absent); ObjectStoreError if over ``limit``."""
        try:
            body, etag = self._get_stream(key)
        except FileNotFoundError:
            return None
        with body:
            data = body.read(limit + 1)
        if len(data) > limit:
            raise ObjectStoreError(f"object store: s3://{self.bucket}/{key} is over {limit} bytes: not ours")
        return data, etag

    def put_index(
        self,
        key: str,
        name: str,
        data: bytes,
        *,
        if_absent: bool = False,
        if_version: str | None = None,
        durable: bool = True,  # an object store is durable once it answers 200
    ) -> str | None:
        return self._put_small(self.index_key(key, name), data, if_absent=if_absent, if_version=if_version)

    def _put_small(
        self, key: str, data: bytes, *, if_absent: bool = False, if_version: str | None = None
    ) -> str | None:
        condition: dict[str, str] = {}
        if if_absent:
            condition["IfNoneMatch"] = "*"
        elif if_version is not None:
            condition["IfMatch"] = if_version
        got = self._call(
            "PUT",
            key,
            lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=data, **condition),
            # 404: If-Match on an object deleted meanwhile
            (*CONDITION_FAILED, 404) if condition else (),
        )
        return None if isinstance(got, Refused) else str(got["ETag"])

    def delete_index(self, key: str, name: str, *, if_version: str | None = None) -> bool:
        object_key = self.index_key(key, name)
        if if_version is not None:
            return self._delete_version(object_key, if_version)
        head = self._call(
            "HEAD", object_key, lambda: self.client.head_object(Bucket=self.bucket, Key=object_key), (404,)
        )
        if isinstance(head, Refused):
            return False
        self._call(
            "DELETE", object_key, lambda: self.client.delete_object(Bucket=self.bucket, Key=object_key)
        )
        return True

    def _delete_version(self, key: str, etag: str) -> bool:
        """Delete ``key`` only while its ETag is ``etag``: checked first (for stores that ignore
        ``If-Match`` on deletes), then sent as ``If-Match`` (atomic where the store supports it)."""
        head = self._call("HEAD", key, lambda: self.client.head_object(Bucket=self.bucket, Key=key), (404,))
        if isinstance(head, Refused) or head.get("ETag") != etag:
            return False
        got = self._call(
            "DELETE",
            key,
            lambda: self.client.delete_object(Bucket=self.bucket, Key=key, IfMatch=etag),
            (*CONDITION_FAILED, 404),
        )
        return not isinstance(got, Refused)

    def list_index(self, key: str | None = None) -> Iterator[tuple[str, str]]:
        base = self.location.key("index/")
        prefix = base + (f"{_segment(key, 'key')}/" if key else "")
        found: list[tuple[str, str]] = []
        pages = iter(self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix))
        # One request per page (1,000 keys), each bounded and mapped like any other request.
        while (page := self._call("LIST", prefix, lambda: next(pages, None))) is not None:
            for item in page.get("Contents") or ():
                k, slash, name = str(item["Key"])[len(base) :].partition("/")
                if slash and _segment_problem(k) is None and _segment_problem(name) is None:
                    found.append((k, name))  # anything else under index/ is not ours: skipped
        # S3 lists in byte order of the whole key ("a-b/x" before "a/x"); the contract sorts by (key, name).
        yield from sorted(found)

    # -- leases ----------------------------------------------------------------------------
    def acquire_lease(self, name: str, ttl: float) -> str | None:
        key = self.lease_key(name)
        token = secrets.token_hex(16)
        for _ in range(3):
            data = _lease_bytes(token, self._now() + ttl)
            if self._put_small(key, data, if_absent=True) is not None:
                return token
            got = self._get_small(key, MAX_LEASE_BYTES)
            if got is None:
                continue  # released meanwhile: try to create it again
            held = _parse_lease(got[0])
            if held is not None and held[0] == token:
                return token  # our own create, retried after its answer was lost
            if held is not None and held[1] > self._now():
                return None  # held and alive
            # Expired (or unreadable): take it over, only if nobody changed it since we read it.
            data = _lease_bytes(token, self._now() + ttl)
            if self._put_small(key, data, if_version=got[1]) is not None:
                return token
            after = self._get_small(key, MAX_LEASE_BYTES)
            return token if after is not None and after[0] == data else None
        return None

    def renew_lease(self, name: str, token: str, ttl: float) -> bool:
        key = self.lease_key(name)
        got = self._get_small(key, MAX_LEASE_BYTES)
        held = None if got is None else _parse_lease(got[0])
        if got is None or held is None or held[0] != token or held[1] <= self._now():
            return False
        data = _lease_bytes(token, self._now() + ttl)
        if self._put_small(key, data, if_version=got[1]) is not None:
            return True
        after = self._get_small(key, MAX_LEASE_BYTES)
        return after is not None and after[0] == data  # our own write, retried after a lost answer

    def release_lease(self, name: str, token: str) -> None:
        key = self.lease_key(name)
        got = self._get_small(key, MAX_LEASE_BYTES)
        held = None if got is None else _parse_lease(got[0])
        if got is not None and held is not None and held[0] == token:
            self._delete_version(key, got[1])


class _BodyReader(io.RawIOBase):
    """A streamed GET's body as a raw file: its read errors (a timeout, a reset) become
    ``ObjectStoreError``, so a reader never gets a short blob without an error.

    ``read(n)`` hands on the library's own bytes (n of them, fewer only at the end), with no
    buffer in between: a blob streamed in 128 KiB reads (a pull) is not copied twice more on its
    way; ``readinto`` serves ``hashlib.file_digest``."""

    def __init__(self, body: Any, where: str) -> None:
        self._body = body
        self._where = where

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        return self._read(None if size is None or size < 0 else size)

    def readall(self) -> bytes:
        return self._read(None)

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self._read(len(view))
        view[: len(data)] = data
        return len(data)

    def _read(self, size: int | None) -> bytes:
        try:
            return bytes(self._body.read(size) or b"")
        except Exception as exc:
            raise ObjectStoreError(
                f"object store: reading {self._where}: {type(exc).__name__}", code="read-failed"
            ) from None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._body.close()
        super().close()


def _segment_problem(text: str) -> str | None:
    if not text or text in (".", "..") or "/" in text or "\\" in text:
        return "is empty, '.', '..' or has a slash"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        return "has a control character"
    if len(text.encode()) > 255:
        return "is longer than 255 bytes"
    return None


def _segment(text: str, what: str) -> str:
    """``text`` as one segment of an object key (ValueError if it could become another key)."""
    if problem := _segment_problem(text):
        raise ValueError(f"an index {what} {problem}: {text[:80]!r}")
    return text


def _lease_bytes(token: str, expiry: float) -> bytes:
    return f"{token} {expiry!r}\n".encode()


def _parse_lease(data: bytes) -> tuple[str, float] | None:
    try:
        token, expiry = data.decode().split()
        return token, float(expiry)
    except ValueError:
        return None
