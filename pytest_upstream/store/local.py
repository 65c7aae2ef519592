"""``LocalBackend``: the storage seam (backend.py) on a local cache directory (layout.py).

- Blobs are files named by their sha256; a put hard-links (or renames) a verified temp file
  into place, so a reader sees a whole blob or none.
- Index objects are entry files; their version is ``<inode>-<mtime_ns>``: a replace is a
  rename (new inode) and a hit bumps the mtime, so "still the version I read" means nobody
  replaced or used it since.  Create-if-absent links a complete temp file to the name
  (``link`` fails if the name exists); replace-if-version checks the version and renames.
  The check and the rename are two steps, so callers that replace hold the entry's lock
  (locks.py), as the cache and the admin commands do.
- Leases are files ``leases/<name>.lease`` holding a token and an expiry (Unix time), created
  with ``O_EXCL``; an expired lease is taken over by renaming it aside and checking that the
  file renamed is the one judged expired.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from pytest_upstream.store.backend import BlobInfo, IndexObject
from pytest_upstream.store.blobs import sha256_file
from pytest_upstream.store.files import AtomicFile, atomic_write, fsync_dir
from pytest_upstream.store.layout import Layout, dir_names


class LocalBackend:
    """The ``Backend`` of one cache directory."""

    def __init__(self, layout: Layout, *, now: Callable[[], float] = time.time) -> None:
        self.layout = layout
        # Lease expiries are wall-clock times that other processes and machines compare; tests
        # pass their own clock to expire a lease without waiting for it.
        self._now = now

    # -- blobs ---------------------------------------------------------------
    def blob_stat(self, sha256: str) -> BlobInfo | None:
        try:
            return BlobInfo(sha256, os.stat(self.layout.blob(sha256)).st_size)
        except FileNotFoundError:
            return None

    def blob_local_path(self, sha256: str) -> Path | None:
        path = Path(self.layout.blob(sha256))
        return path if path.is_file() else None

    def open_blob(self, sha256: str) -> BinaryIO:
        return open(self.layout.blob(sha256), "rb")

    def put_blob(self, source: Path, sha256: str) -> bool:
        target = Path(self.layout.blob(sha256))
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            try:
                os.link(source, target)
            except FileExistsError:
                return False
            except OSError:  # no hard links on this file system: a rename does too
                os.replace(source, target)
            fsync_dir(target.parent)
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(source)

    def delete_blob_if_corrupt(self, sha256: str) -> bool:
        path = self.layout.blob(sha256)
        try:
            ino = os.stat(path).st_ino
            if sha256_file(path) == sha256:
                return False
            if os.stat(path).st_ino != ino:  # replaced by a fresh copy meanwhile
                return False
            os.unlink(path)
        except FileNotFoundError:
            return False
        return True

    # -- index -----------------------------------------------------------------
    def _index_path(self, key: str, name: str) -> str:
        return self.layout.entry(key, name)

    @staticmethod
    def version_of(ino: int, mtime_ns: int) -> str:
        """An index object's version from its file's inode and mtime (see the module docstring)."""
        return f"{ino}-{mtime_ns}"

    def _version(self, st: os.stat_result) -> str:
        return self.version_of(st.st_ino, st.st_mtime_ns)

    def index_version(self, key: str, name: str) -> str | None:
        try:
            return self._version(os.stat(self._index_path(key, name)))
        except FileNotFoundError:
            return None

    def get_index(self, key: str, name: str) -> IndexObject | None:
        try:
            with open(self._index_path(key, name), "rb") as f:
                st = os.fstat(f.fileno())
                return IndexObject(f.read(), self._version(st))
        except FileNotFoundError:
            return None

    def put_index(
        self,
        key: str,
        name: str,
        data: bytes,
        *,
        if_absent: bool = False,
        if_version: str | None = None,
        durable: bool = True,
    ) -> str | None:
        target = Path(self._index_path(key, name))
        if if_absent:
            out = AtomicFile(tmp_dir=self.layout.tmp, durable=durable)
            try:
                out.write(data)
                out.flush()
                if durable:
                    os.fsync(out.file.fileno())
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(out.path, target)
                except FileExistsError:
                    return None
            finally:
                out.discard()
            if durable:
                fsync_dir(target.parent)
        else:

            def unchanged() -> None:
                if if_version is not None and self.index_version(key, name) != if_version:
                    raise _Changed

            try:
                atomic_write(target, data, durable=durable, tmp_dir=self.layout.tmp, before_replace=unchanged)
            except _Changed:
                return None
        return self.index_version(key, name)

    def delete_index(self, key: str, name: str, *, if_version: str | None = None) -> bool:
        path = self._index_path(key, name)
        if if_version is not None and self.index_version(key, name) != if_version:
            return False
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        return True

    def list_index(self, key: str | None = None) -> Iterator[tuple[str, str]]:
        keys = [key] if key else sorted(dir_names(self.layout.entries))
        for k in keys:
            for prefix in sorted(dir_names(self.layout.entries / k)):
                for file in sorted(dir_names(self.layout.entries / k / prefix)):
                    if file.endswith(".json"):
                        yield k, file.removesuffix(".json")

    # -- leases ------------------------------------------------------------------
    def acquire_lease(self, name: str, ttl: float) -> str | None:
        path = self.layout.lease(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(16)
        for _ in range(3):
            if self._create_lease(path, token, ttl):
                return token
            held = _read_lease(path)
            if held is not None and held[1] > self._now():
                return None  # held and alive
            self._take_aside(path, held)
        return None

    def renew_lease(self, name: str, token: str, ttl: float) -> bool:
        path = self.layout.lease(name)
        held = _read_lease(path)
        if held is None or held[0] != token or held[1] <= self._now():
            return False
        atomic_write(path, _lease_bytes(token, self._now() + ttl), durable=False, tmp_dir=self.layout.tmp)
        return True

    def release_lease(self, name: str, token: str) -> None:
        path = self.layout.lease(name)
        held = _read_lease(path)
        if held is not None and held[0] == token:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def _create_lease(self, path: Path, token: str, ttl: float) -> bool:
        out = AtomicFile(tmp_dir=self.layout.tmp, durable=False)
        try:
            out.write(_lease_bytes(token, self._now() + ttl))
            out.flush()
            try:
                os.link(out.path, path)
            except FileExistsError:
                return False
            return True
        finally:
            out.discard()

    def _take_aside(self, path: Path, judged: tuple[str, float, int] | None) -> None:
        """Remove an expired (or unreadable) lease, unless it was replaced since it was judged."""
        aside = self.layout.tmp / f".lease.{secrets.token_hex(8)}.tmp"
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return
        moved = _read_lease(aside)
        if judged is not None and (moved is None or moved[2] != judged[2]):
            with contextlib.suppress(OSError):
                os.link(aside, path)  # a new holder's lease: put it back (unless yet another exists)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(aside)


class _Changed(Exception):
    """An index object's version moved between the read and the replace."""


def _lease_bytes(token: str, expiry: float) -> bytes:
    return f"{token} {expiry!r}\n".encode()


def _read_lease(path: Path) -> tuple[str, float, int] | None:
    """(token, expiry, inode) of a lease file, or None if it is absent or unreadable."""
    try:
        with open(path, "rb") as f:
            ino = os.fstat(f.fileno()).st_ino
            token, expiry = f.read(256).decode().split()
        return token, float(expiry), ino
    except (OSError, ValueError):
        return None
