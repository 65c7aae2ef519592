"""The lock file: which bytes a build was served, so a replay serves exactly those.

A record run writes one line per distinct request (proxy key, cache path and
negotiated variant) with the sha256 and size of the stored bytes it was
answered from.  The file is deterministic (sorted, no timestamps, one entry
per line) so that it can be committed and diffed.  Replay with a lock
serves each entry from the content-addressed store by that digest, whatever
the shared cache's index says now; anything not in the lock is a miss.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pytest_upstream.store.files import atomic_write
from pytest_upstream.store.headers import KEPT_HEADERS, header_problem, headers_problem

LOCK_VERSION = 1


class LockError(ValueError):
    """An unreadable or inconsistent lock file; the message names the file."""


@dataclass(frozen=True, order=True)
class LockFileEntry:
    key: str
    path: str
    variant: str
    sha256: str
    size: int
    kind: str  # store.entry's METADATA | ARTIFACT | NOT_FOUND
    # The upstream's Content-Type and kept headers (e.g. Docker-Content-Digest), so a locked
    # replay answers exactly as recorded even after the shared index has moved on.
    content_type: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    # What the proxy's release policy took out of this metadata when it was recorded
    # ("name version: why", docs/rules.md): a reviewer of the lock sees what a rule kept out.
    hidden: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> LockFileEntry:
        """From JSON or a worker's report, where the header pairs arrive as lists."""
        fields = dict(raw)
        if "headers" in fields:
            fields["headers"] = tuple((str(n), str(v)) for n, v in fields["headers"])
        if "hidden" in fields and isinstance(fields["hidden"], list):
            fields["hidden"] = tuple(fields["hidden"])
        entry = cls(**fields)
        entry.check()
        return entry

    def check(self) -> None:
        """ValueError unless the fields are of their types and the headers are safe to send:
        a lock file is committed and edited by hand, and its headers are replayed."""
        for name in ("key", "path", "variant", "sha256", "kind"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"field {name!r} is not a string")
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 0:
            raise ValueError("field 'size' is not a non-negative integer")
        if self.content_type is not None:
            if not isinstance(self.content_type, str):
                raise ValueError("field 'content_type' is not a string or null")
            if problem := header_problem("Content-Type", self.content_type):
                raise ValueError(f"field 'content_type': {problem}")
        if problem := headers_problem(self.headers, KEPT_HEADERS):
            raise ValueError(f"field 'headers': {problem}")
        if not isinstance(self.hidden, tuple) or not all(
            isinstance(h, str) and len(h) <= 1024 and h.isprintable() for h in self.hidden
        ):
            raise ValueError("field 'hidden' is not a list of printable strings (at most 1024 characters)")

    @property
    def identity(self) -> tuple[str, str, str]:
        return (self.key, self.path, self.variant)


class LockFile:
    """Entries by (key, path, variant); the last one recorded for an identity wins."""

    def __init__(self, entries: Iterable[LockFileEntry] = ()) -> None:
        self._entries: dict[tuple[str, str, str], LockFileEntry] = {}
        for entry in entries:
            self.add(entry)

    def add(self, entry: LockFileEntry) -> None:
        self._entries[entry.identity] = entry

    def get(self, key: str, path: str, variant: str = "") -> LockFileEntry | None:
        return self._entries.get((key, path, variant))

    def merge(self, other: LockFile) -> None:
        for entry in other:
            self.add(entry)

    def __iter__(self) -> Iterator[LockFileEntry]:
        return iter(sorted(self._entries.values()))

    def __len__(self) -> int:
        return len(self._entries)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LockFile) and list(self) == list(other)

    def dumps(self) -> str:
        lines = [json.dumps(_fields(e), sort_keys=True, separators=(",", ":")) for e in self]
        body = ",\n".join(f"  {line}" for line in lines)
        return (
            f'{{"version": {LOCK_VERSION}, "entries": [\n{body}\n]}}\n'
            if lines
            else (f'{{"version": {LOCK_VERSION}, "entries": []}}\n')
        )

    def save(self, path: Path) -> None:
        """Write atomically (a reader never sees half a lock), readable like any file the user writes."""
        atomic_write(Path(path), self.dumps().encode("utf-8"))

    @classmethod
    def load(cls, path: Path) -> LockFile:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LockError(f"{path}: lock file not found") from None
        except ValueError as exc:
            raise LockError(f"{path}: not a valid lock file: {exc}") from None
        if not isinstance(data, dict) or data.get("version") != LOCK_VERSION:
            raise LockError(
                f"{path}: unsupported lock version {data.get('version')!r}"
                if isinstance(data, dict)
                else f"{path}: not a lock file"
            )
        entries = []
        for i, raw in enumerate(data.get("entries", [])):
            try:
                entry = LockFileEntry.from_dict(raw)
            except (TypeError, ValueError) as exc:
                raise LockError(f"{path}: entry {i + 1}: {exc}") from None
            if len(entry.sha256) != 64 or any(c not in "0123456789abcdef" for c in entry.sha256):
                raise LockError(f"{path}: entry {i + 1}: sha256 must be 64 lowercase hex digits")
            entries.append(entry)
        return cls(entries)


def _fields(entry: LockFileEntry) -> dict[str, Any]:
    """An entry as the file holds it; ``hidden`` only when a policy hid something."""
    fields = asdict(entry)
    if not entry.hidden:
        del fields["hidden"]
    return fields
