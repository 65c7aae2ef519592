"""The one way this package replaces a file: ``AtomicFile``, and ``atomic_write`` built on it.

Every writer uses it: cache blobs and index entries, the cache's ``VERSION``, lock files,
reports, pyproject edits, export archives and blobs staged by an import.  A reader sees the
whole old file or the whole new one, never a mix, and a crash leaves at most a temporary file
that the cache's clean-up (or nobody, for a file beside the target, which is named
``.NAME.*.tmp``) removes.

The steps, and why each:

1. a temporary file, created exclusively (``O_EXCL``) in the target's directory or in the
   cache's ``tmp/`` (``os.replace`` is atomic only within one file system); its permissions
   are the usual ``0o666`` less the umask, like any file the user creates (``mkstemp``'s
   ``0600`` made lock files and reports unreadable to the rest of a team), or ``mode``;
2. the bytes, then ``fsync`` (``durable``): the data is on disk before the name points at it;
3. ``before_replace()``: a last check by the caller (a pyproject edit refuses when the file
   changed meanwhile);
4. ``os.replace``, then ``fsync`` of the directory (``durable``): the rename survives a crash.

``AtomicFile`` is the streaming form (a download, an archive): write, then ``commit`` (to a
target named only then, for content-addressed blobs) or ``discard``.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

Writer = Callable[[BinaryIO], None]
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)


class AtomicFile:
    """A temporary file that becomes ``target`` on ``commit``, or disappears on ``discard``.

    ``tmp_dir`` must be on the target's file system (the cache passes its ``tmp/``); by default
    the temporary file lies beside the target.  The temporary file is named ``.STEM.<random>.tmp``;
    ``stem`` defaults to the target's name (the cache names a download's part file after its
    entry, so a clean-up can tell whether its download still runs: store/cache.py).  As a
    context manager it commits when the block ends normally and discards on an exception.
    """

    def __init__(
        self,
        target: Path | None = None,
        *,
        tmp_dir: Path | None = None,
        durable: bool = True,
        mode: int | None = None,
        stem: str | None = None,
    ) -> None:
        if target is None and tmp_dir is None:
            raise ValueError("AtomicFile needs a target or a tmp_dir")
        # A symlinked target stays a symlink: the file it points to is replaced.
        self.target = Path(os.path.realpath(target)) if target is not None else None
        self.durable = durable
        self.mode = mode
        where = tmp_dir if tmp_dir is not None else self.target.parent  # type: ignore[union-attr]
        where.mkdir(parents=True, exist_ok=True)
        if stem is None:
            stem = self.target.name[:64] if self.target is not None else "blob"
        while True:
            self.path = where / f".{stem}.{secrets.token_hex(8)}.tmp"
            try:
                fd = os.open(self.path, _FLAGS, 0o666)
                break
            except FileExistsError:  # pragma: no cover - 64 random bits
                continue
        self.file: BinaryIO = os.fdopen(fd, "wb")
        self._done = False

    def write(self, data: bytes | bytearray | memoryview) -> int:
        return self.file.write(data)

    def flush(self) -> None:
        """Push buffered bytes to the OS (no fsync), e.g. before reading the temp file back."""
        self.file.flush()

    def sync(self) -> None:
        """Flush, and fsync when ``durable``: the bytes are on disk (e.g. before linking them)."""
        self.file.flush()
        if self.durable:
            os.fsync(self.file.fileno())

    def commit(self, target: Path | None = None, *, before_replace: Callable[[], None] | None = None) -> Path:
        """Make the bytes durable (``durable``) and rename them to ``target``; returns the target."""
        final = Path(target) if target is not None else self.target
        if final is None:
            raise ValueError("AtomicFile.commit needs a target")
        try:
            self.file.flush()
            if self.durable:
                os.fsync(self.file.fileno())
            self.file.close()
            if self.mode is not None:
                os.chmod(self.path, self.mode)
            if before_replace is not None:
                before_replace()
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.path, final)
        except BaseException:
            self.discard()
            raise
        self._done = True
        if self.durable:
            fsync_dir(final.parent)
        return final

    def discard(self) -> None:
        """Remove the temporary file (after a commit: nothing to do)."""
        with contextlib.suppress(OSError):
            self.file.close()
        if not self._done:
            self._done = True
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None and not self._done:
            self.commit()
        else:
            self.discard()


def atomic_write(
    target: Path,
    data: bytes | Writer,
    *,
    durable: bool = True,
    tmp_dir: Path | None = None,
    mode: int | None = None,
    before_replace: Callable[[], None] | None = None,
) -> None:
    """Replace ``target`` with ``data`` (bytes, or a function that writes to the open file).

    The target's directory is created if missing.
    """
    out = AtomicFile(Path(target), tmp_dir=tmp_dir, durable=durable, mode=mode)
    try:
        if isinstance(data, bytes | bytearray | memoryview):
            out.write(data)
        else:
            data(out.file)
    except BaseException:
        out.discard()
        raise
    out.commit(before_replace=before_replace)


def is_temporary(name: str) -> bool:
    """Whether a file name is one of AtomicFile's temporary files (or an older ``.part`` file)."""
    return name.endswith(".part") or (name.startswith(".") and name.endswith(".tmp"))


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable where the platform allows it (POSIX)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
