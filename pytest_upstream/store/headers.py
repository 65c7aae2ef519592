"""The one check for header values read from files (entries, lock files, archives, cassettes).

A value read from a file is sent to clients (``Content-Type``, ``Last-Modified``, the kept
headers) or to upstreams (``ETag`` as ``If-None-Match``).  A file can be edited by hand or come
from elsewhere (an imported archive, a cassette, a committed lock file), so a CR or LF in it
would split a response (``X-Injected:``, ``Set-Cookie:``).  Every reader calls ``header_problem``
before it trusts a value: only the header names an entry may keep, no control characters
(tab aside, as RFC 9110 allows), a bounded length.  It lives in ``store/`` so that every
layer that reads such files (store, repro, admin) shares it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

# What an entry may keep besides its Content-Type, ETag and Last-Modified: the union of every
# format's ``Resource.keep_headers`` (tests/test_hostile_files.py checks that it covers them).
KEPT_HEADERS = frozenset({"docker-content-digest", "link"})
# The names an entry, a lock line or a cassette answer may carry into a reply.
ENTRY_HEADERS = KEPT_HEADERS | {"content-type", "etag", "last-modified"}
MAX_VALUE = 8192  # a Link with a long `last=` is the longest we keep; 8 KiB is far above it
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def value_problem(value: str) -> str:
    """Why ``value`` cannot be sent as a header value ("" when it can)."""
    if len(value) > MAX_VALUE:
        return f"is {len(value)} characters long (at most {MAX_VALUE})"
    if (bad := _CONTROL.search(value)) is not None:
        return f"holds the control character {bad.group()!r}"
    return ""


def header_problem(name: str, value: str, known: Iterable[str] | None = ENTRY_HEADERS) -> str:
    """Why the header ``name: value`` from a file cannot be used ("" when it can): a name that
    is not a token or not among ``known`` (lower-case; None: any name), or a bad value."""
    if not _TOKEN.fullmatch(name):
        return f"header name {name[:40]!r} is not a valid header name"
    if known is not None and name.lower() not in set(known):
        return f"header {name!r} is not one the proxy keeps"
    problem = value_problem(value)
    return f"header {name} {problem}" if problem else ""


def headers_problem(headers: Iterable[tuple[str, str]], known: Iterable[str] | None = ENTRY_HEADERS) -> str:
    """The first problem of any of ``headers`` ("" when all are usable)."""
    names = None if known is None else frozenset(known)
    for name, value in headers:
        if problem := header_problem(name, value, names):
            return problem
    return ""
