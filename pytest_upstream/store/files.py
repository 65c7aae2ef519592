"""The one way this package replaces a file: ``atomic_write``.

Every writer uses it: cache blobs' index entries, lock files, reports, pyproject edits and
export archives.  A reader sees the whole old file or the whole new one, never a mix, and a
crash leaves at most a temporary file that the cache's clean-up (or nobody, for a file beside
the target, which is named ``.NAME.*.tmp``) removes.

The steps, and why each:

1. a temporary file, created exclusively (``O_EXCL``) in the target's directory or in the
   cache's ``tmp/`` (``os.replace`` is atomic only within one file system); its permissions
   are the usual ``0o666`` less the umask, like any file the user creates (``mkstemp``'s
   ``0600`` made lock files and reports unreadable to the rest of a team), or ``mode``;
2. the bytes, then ``fsync`` (``durable``): the data is on disk before the name points at it;
3. ``before_replace()``: a last check by the caller (a pyproject edit refuses when the file
   changed meanwhile);
4. ``os.replace``, then ``fsync`` of the directory (``durable``): the rename survives a crash.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

Writer = Callable[[BinaryIO], None]


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

    ``tmp_dir`` must be on the target's file system (the cache passes its ``tmp/``); by default
    the temporary file lies beside the target.  The target's directory is created if missing.
    A symlinked target stays a symlink: the file it points to is replaced.
    """
    target = Path(os.path.realpath(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    where = tmp_dir if tmp_dir is not None else target.parent
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = where / f".{target.name[:64]}.{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(tmp, flags, 0o666)
            break
        except FileExistsError:  # pragma: no cover - 64 random bits
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, bytes | bytearray | memoryview):
                f.write(data)
            else:
                data(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        if before_replace is not None:
            before_replace()
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(target.parent)


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
