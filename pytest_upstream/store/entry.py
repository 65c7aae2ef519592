"""An index entry: what the cache knows about one response, and the ONE parser of entry files.

The proxy's hit path and the admin commands (ls, verify, prune, export, import) read entry
files with the same strict ``parse_entry``: a file the proxy would serve from is exactly a file
``cache verify`` accepts.  (There used to be a lenient reader for hits and a strict one for the
admin commands, so a hand-edited entry could be served and yet be reported as broken.)
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass, field

from pytest_upstream.store.headers import KEPT_HEADERS, header_problem, headers_problem
from pytest_upstream.store.layout import HEX64

METADATA = "metadata"  # has a TTL; refreshed
ARTIFACT = "artifact"  # immutable
NOT_FOUND = "notfound"  # a remembered upstream 404: its blob is empty
KINDS = (METADATA, ARTIFACT, NOT_FOUND)
MAX_ENTRY_BYTES = 1024 * 1024
_HEADER_FIELDS = (("content_type", "Content-Type"), ("etag", "ETag"), ("last_modified", "Last-Modified"))
_URL_BAD = re.compile(r"[\x00-\x20\x7f]")  # an entry is a few hundred bytes; a larger file is not one


@dataclass(frozen=True)
class Entry:
    """What the index knows about one cached response."""

    key: str
    path: str
    variant: str
    upstream_url: str
    sha256: str
    size: int
    kind: str  # METADATA | ARTIFACT | NOT_FOUND
    fetched_at: float
    content_type: str | None = None
    etag: str | None = None
    last_modified: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def is_metadata(self) -> bool:
        return self.kind == METADATA

    @property
    def id(self) -> str:
        return entry_id(self.key, self.path, self.variant)

    def age(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.fetched_at


def entry_id(key: str, path: str, variant: str) -> str:
    """Stable file name for an entry: paths may be long or hold any character."""
    return hashlib.sha256(f"{key}\0{path}\0{variant}".encode()).hexdigest()


def entry_bytes(entry: Entry) -> bytes:
    """An entry file's contents: sorted keys, so the same entry always gives the same bytes."""
    return json.dumps(asdict(entry), sort_keys=True).encode()


def parse_entry(data: bytes, key_dir: str, file_name: str) -> Entry:
    """An entry file's contents, checked against where it lives; ValueError says what is wrong."""
    if len(data) > MAX_ENTRY_BYTES:
        raise ValueError(f"entry file is {len(data)} bytes")
    try:
        raw = json.loads(data)
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError("not a JSON object")
    try:
        entry = Entry(**raw)
    except TypeError as exc:
        raise ValueError(f"not an entry: {exc}") from None
    for name in ("key", "path", "variant", "upstream_url", "sha256", "kind"):
        if not isinstance(getattr(entry, name), str):
            raise ValueError(f"field {name!r} is not a string")
    for name in ("content_type", "etag", "last_modified"):
        if not isinstance(getattr(entry, name), str | None):
            raise ValueError(f"field {name!r} is not a string or null")
    if not isinstance(entry.size, int) or isinstance(entry.size, bool) or entry.size < 0:
        raise ValueError("field 'size' is not a non-negative integer")
    if not isinstance(entry.fetched_at, int | float) or isinstance(entry.fetched_at, bool):
        raise ValueError("field 'fetched_at' is not a number")
    if not isinstance(entry.headers, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in entry.headers.items()
    ):
        raise ValueError("field 'headers' is not an object of strings")
    # Values that reach a reply or an upstream request: a hand-edited file cannot split one.
    for name, header in (
        ("content_type", "Content-Type"),
        ("etag", "ETag"),
        ("last_modified", "Last-Modified"),
    ):
        value = getattr(entry, name)
        if value is not None and (problem := header_problem(header, value)):
            raise ValueError(f"field {name!r}: {problem}")
    if problem := headers_problem(entry.headers.items(), KEPT_HEADERS):
        raise ValueError(f"field 'headers': {problem}")
    if _URL_BAD.search(entry.upstream_url):
        raise ValueError("field 'upstream_url' holds whitespace or a control character")
    if not HEX64.fullmatch(entry.sha256):
        raise ValueError("field 'sha256' is not 64 lowercase hex digits")
    if entry.kind not in KINDS:
        raise ValueError(f"field 'kind' is {entry.kind!r}, not one of {', '.join(KINDS)}")
    if entry.key != key_dir or file_name != f"{entry.id}.json":
        raise ValueError(f"entry for {entry.key!r} {entry.path!r} is filed under the wrong name")
    return entry
