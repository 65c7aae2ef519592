"""Rendered metadata, memoised: rewriting a large index (npm packuments run to megabytes) for
every request would cost more than serving it.

A format's ``render`` may depend only on the resource's path, its ``render_as`` (a hashable value)
and the stored bytes, so those (with the proxy key) are the memo's key; the stored bytes are
named by their sha256.

The memo is bounded by the bytes it holds (``MEMO_BYTES``), least recently used first out; a
render bigger than a quarter of the budget is not kept at all, so a few huge packuments cannot
flush every small index page, and no client (not even one sending many Host values, which
``render_as`` may carry as the base URL) can make it hold more than the budget.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Hashable
from pathlib import Path

from pytest_upstream.formats.base import Format, Resource
from pytest_upstream.store.cache import Entry

MEMO_BYTES = 64 * 1024 * 1024

Rendered = tuple[bytes, str, str]  # body, content type, ETag


class RenderMemo:
    def __init__(self, budget: int = MEMO_BYTES) -> None:
        self._budget = budget
        self._held = 0  # bytes of the rendered bodies in the memo
        self._memo: OrderedDict[tuple[str, str, Hashable, str], Rendered] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        with self._lock:
            return self._held

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
        if len(data) > self._budget // 4:
            return result
        with self._lock:
            if memo_key not in self._memo:
                self._memo[memo_key] = result
                self._held += len(data)
            while self._held > self._budget:
                _, (dropped, _, _) = self._memo.popitem(last=False)
                self._held -= len(dropped)
        return result
