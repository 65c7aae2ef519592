"""Rendered metadata, memoised: rewriting a large index (npm packuments run to megabytes) for
every request would cost more than serving it.

A format's ``render`` may depend only on the resource's path, its ``render_as`` (a hashable value)
and the stored bytes, so those (with the proxy key) are the memo's key; the stored bytes are
named by their sha256.

The memo is bounded by the bytes it holds (``MEMO_BYTES``), least recently used first out; a
render bigger than a quarter of the budget is not kept at all, so a few huge packuments cannot
flush every small index page, and no client (not even one sending many Host values, which
``render_as`` may carry as the base URL) can make it hold more than the budget.

A proxy with a release policy (allow/block rules, ``min_age``) renders through it: the releases
it keeps out are taken out of the document (formats/hiding.py) and listed with the result.  The
policy is fixed per proxy key, so the key still names the render, but a cooldown ends at a
moment: a render that hid a too-new release is good only until the first of them comes of age
(``visible_at``), then it is rendered again.

Concurrent renders of one key share one: the first request renders, the others wait for its
result (or its error).  A render's memory is a small multiple of the document's size (the stored
bytes, the parsed model, the output), so N clients asking for a large packument at once cost
that once, not N times, whether or not the result is kept in the memo afterwards.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Hashable
from pathlib import Path

from pytest_upstream.config.release_policy import ReleasePolicy
from pytest_upstream.engine.errors import WouldBlock
from pytest_upstream.formats.base import Format, Resource
from pytest_upstream.formats.hiding import Hidden, Hiding
from pytest_upstream.store.cache import Entry

MEMO_BYTES = 64 * 1024 * 1024

Rendered = tuple[bytes, str, str, tuple[Hidden, ...]]  # body, content type, ETag, what it hid
MemoKey = tuple[str, str, Hashable, str]


class _Pending:
    """A render in progress that others of the same key wait for."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: Rendered | None = None
        self.error: BaseException | None = None


class RenderMemo:
    def __init__(self, budget: int = MEMO_BYTES) -> None:
        self._budget = budget
        self._held = 0  # bytes of the rendered bodies in the memo
        self._memo: OrderedDict[MemoKey, Rendered] = OrderedDict()
        self._until: dict[MemoKey, float] = {}  # renders that hid a too-new release: good until then
        self._pending: dict[MemoKey, _Pending] = {}  # renders in progress
        self._lock = threading.Lock()

    @property
    def held(self) -> int:
        with self._lock:
            return self._held

    def render(
        self,
        key: str,
        fmt: Format,
        res: Resource,
        entry: Entry,
        blob: Path,
        policy: ReleasePolicy | None = None,
        now: float = 0.0,
        *,
        memoised_only: bool = False,
    ) -> Rendered | None:
        """The client's view of stored metadata, or None to serve the stored bytes as they are;
        ``policy``: the proxy's release policy, ``now`` the engine clock's time; ``memoised_only``:
        raise WouldBlock unless the render is memoised (``Engine.answer_warm``)."""
        memo_key = (key, res.path, res.render_as, entry.sha256)
        with self._lock:
            if memo_key in self._memo and now >= self._until.get(memo_key, now + 1):
                self._drop(memo_key)
            if memo_key in self._memo:
                self._memo.move_to_end(memo_key)
                return self._memo[memo_key]
            if memoised_only:
                raise WouldBlock
            pending = self._pending.get(memo_key)
            first = pending is None
            if pending is None:
                pending = self._pending[memo_key] = _Pending()
        if not first:
            pending.done.wait()
            if pending.error is not None:
                raise pending.error
            return pending.result
        try:
            pending.result = self._render(memo_key, fmt, res, blob, policy, now)
        except BaseException as exc:
            pending.error = exc
            raise
        finally:
            with self._lock:
                del self._pending[memo_key]
            pending.done.set()
        return pending.result

    def _render(
        self,
        memo_key: MemoKey,
        fmt: Format,
        res: Resource,
        blob: Path,
        policy: ReleasePolicy | None,
        now: float,
    ) -> Rendered | None:
        hiding = Hiding(policy, now) if policy else None
        out = fmt.render(res, blob.read_bytes(), hiding)
        if out is None:
            return None
        data, ctype = out
        hidden = tuple(hiding.hidden) if hiding else ()
        result = (data, ctype, f'"sha256-{hashlib.sha256(data).hexdigest()}"', hidden)
        if len(data) > self._budget // 4:
            return result
        with self._lock:
            if memo_key not in self._memo:
                self._memo[memo_key] = result
                self._held += len(data)
                if hiding is not None and hiding.visible_at is not None:
                    self._until[memo_key] = hiding.visible_at
            while self._held > self._budget:
                self._drop(next(iter(self._memo)))
        return result

    def _drop(self, memo_key: MemoKey) -> None:
        """Forget one render (the lock is held)."""
        dropped = self._memo.pop(memo_key)
        self._held -= len(dropped[0])
        self._until.pop(memo_key, None)
