"""``upstream-proxy cache ls|verify|prune|export|import --cache s3://BUCKET/PREFIX``: the admin
commands on the shared tier (admin/object_store.py), printed as the directory ones are
(cli/cache_commands.py), with the bucket's location where those print the directory.

An object store has no "last used" time, so ``ls`` shows the age only and ``prune
--older-than`` counts from the fetch; ``--grace`` defaults to an hour (a big upload's object
may carry the time it started).  An unreachable store is an ``ObjectStoreError`` (exit 1).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from pytest_upstream.admin.object_store import (
    STORE_GRACE,
    export_store,
    import_store,
    list_store,
    open_store,
    prune_store,
    verify_store,
)
from pytest_upstream.cli.cache_commands import print_verify
from pytest_upstream.config.s3_location import S3Location
from pytest_upstream.config.units import human_age, human_size, parse_age, parse_size, plural
from pytest_upstream.repro.lockfile import LockError, LockFile


def run_store_cli(args: Any, location: S3Location, lock_timeout: float) -> int:
    """Run one ``cache`` subcommand against the bucket; returns the exit status."""
    action: str = args.cache_command
    backend, tier = open_store(location)
    where = location.url
    try:
        if action == "ls":
            return _ls(list_store(backend, args.key), where, args.json)
        if action == "verify":
            return print_verify(verify_store(backend), where, args.json, "changed meanwhile")
        if action == "prune":
            return _prune(args, backend, where)
        if action == "export":
            lock = LockFile.load(Path(args.lock)) if args.lock else None
            result = export_store(tier, Path(args.file), lock)
            for line in result.skipped:
                print(f"note: {line}: its blob is missing or damaged in the store; not exported")
            r = result.report
            for line in r.superseded:
                print(f"note: {line}: no index entry for the locked bytes; exported the lock's blob only")
            print(
                f"wrote {args.file}: {plural(r.entries, 'entry')}, {plural(r.blobs, 'blob')} "
                f"({human_size(r.blob_bytes)}), archive {human_size(r.archive_bytes)}"
            )
            return 0
        if action == "import":
            imported = import_store(tier, Path(args.file), lock_timeout)
            print(
                f"imported {args.file} into {where}: {plural(imported.published, 'entry')} published, "
                f"{imported.kept} kept (the store's were newer); "
                f"{plural(imported.report.blobs_added, 'blob')} in the archive"
            )
            return 0
    except (ValueError, LockError) as exc:  # a bad SIZE/AGE or lock file
        print(f"upstream-proxy: error: {exc}", file=sys.stderr)
        return 2
    raise AssertionError(action)


def _ls(listing: Any, where: str, as_json: bool) -> int:
    now = time.time()
    if as_json:
        print(json.dumps({"cache": where, **listing.as_json(now)}, indent=1))
        return 0
    print(f"{'KEY':<16} {'KIND':<9} {'SIZE':>9} {'SHA256':<12} {'AGE':>6}  PATH")
    for e in listing.entries:
        variant = f"  [{e.variant}]" if e.variant else ""
        print(
            f"{e.key:<16} {e.kind:<9} {human_size(e.size):>9} {e.sha256[:12]:<12} "
            f"{human_age(now - e.fetched_at):>6}  {e.path}{variant}"
        )
    for s in listing.unreadable:
        print(f"unreadable entry {s.rel}: {s.error} (`upstream-proxy cache verify` removes it)")
    t = listing
    print(
        f"# {plural(len(t.entries), 'entry')} ({human_size(t.entry_bytes)}) in {where}; "
        f"{plural(t.blobs, 'blob')} in the store ({human_size(t.blob_bytes)}), "
        f"{t.unreferenced_blobs} unreferenced ({human_size(t.unreferenced_bytes)})"
    )
    return 0


def _prune(args: Any, backend: Any, where: str) -> int:
    max_size = parse_size(args.max_size) if args.max_size is not None else None
    older_than = parse_age(args.older_than) if args.older_than is not None else None
    grace = parse_age(args.grace) if args.grace is not None else STORE_GRACE
    keep = frozenset(e.sha256 for name in args.keep_lock or () for e in LockFile.load(Path(name)))
    report = prune_store(backend, max_size=max_size, older_than=older_than, grace=grace, keep=keep)
    if args.json:
        print(json.dumps({"cache": where, **report.as_json()}, indent=1))
        return 0
    print(
        f"removed {plural(len(report.removed), 'entry')} and {plural(report.blobs_removed, 'blob')} "
        f"({human_size(report.bytes_freed)}); {human_size(report.size_before)} -> "
        f"{human_size(report.size_after)} in {where}"
        + (f"; {report.used_meanwhile} republished meanwhile, kept" if report.used_meanwhile else "")
    )
    if max_size is not None and report.size_after > max_size:
        why = [
            f"{human_size(n)} {what}"
            for n, what in (
                (report.pinned_bytes, "named by the --keep-lock files"),
                (report.recent_bytes, f"unreferenced, written in the last {grace:g}s (--grace)"),
            )
            if n
        ]
        print(f"note: still above {human_size(max_size)}" + (f": {'; '.join(why)}" if why else ""))
    return 0
