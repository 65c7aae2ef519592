"""Rendered metadata, memoised: rewriting a large index (npm packuments run to megabytes) for
every request would cost more than serving it.

A format's ``render`` may depend only on the resource's path, its ``render_as`` (a hashable value)
and the stored bytes, so those (with the proxy key) are the memo's key; the stored bytes are
named by their sha256.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Hashable
from pathlib import Path

from pytest_upstream.formats.base import Format, Resource
from pytest_upstream.store.cache import Entry

MEMO_SIZE = 256

Rendered = tuple[bytes, str, str]  # body, content type, ETag


class RenderMemo:
    def __init__(self, size: int = MEMO_SIZE) -> None:
        self._size = size
        self._memo: OrderedDict[tuple[str, str, Hashable, str], Rendered] = OrderedDict()
        self._lock = threading.Lock()

    def render(self, key: str, fmt: Format, res: Resource, entry: Entry, blob: Path) -> Rendered | None:
        """The client's view of stored metadata, or None to serve the stored bytes as they are."""
        memo_key = (key, res.path, res.render_as, entry.sha256)
        with self._lock:
            if memo_key in self._memo:
                self._memo.move_to_end(memo_key)
                return self._memo[memo_key]
        out = fmt.render(res, blob.read_bytes())
        if out is None:
            return None
        data, ctype = out
        result = (data, ctype, f'"sha256-{hashlib.sha256(data).hexdigest()}"')
        with self._lock:
            self._memo[memo_key] = result
            while len(self._memo) > self._size:
                self._memo.popitem(last=False)
        return result
