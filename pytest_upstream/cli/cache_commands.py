"""``upstream-proxy cache ls|verify|prune|export|import``: run one, print what it did
(``export-ca|import-ca``: ca_commands.py).

The work is in ``pytest_upstream/admin`` (listing, verify, prune, archive); this module only
turns arguments into calls and reports into lines, with the counts and sizes of
``config/units.py`` (``1 entry``, ``244.0 KiB``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from pytest_upstream.admin.archive import export_archive, import_into
from pytest_upstream.admin.listing import list_entries
from pytest_upstream.admin.prune import DEFAULT_GRACE, prune
from pytest_upstream.admin.scan import open_cache
from pytest_upstream.admin.verify import VerifyReport, verify
from pytest_upstream.cli.ca_commands import CA_COMMANDS, run_ca_cli
from pytest_upstream.config.units import human_age, human_size, parse_age, parse_size, plural
from pytest_upstream.repro.lockfile import LockError, LockFile
from pytest_upstream.store.cache import Cache


def run_cli(args: Any, root: Path, lock_timeout: float) -> int:
    """Run one ``cache`` subcommand; returns the exit status."""
    action: str = args.cache_command
    if action in CA_COMMANDS:
        return run_ca_cli(args, root)
    try:
        if action == "ls":
            return _ls(open_cache(root), args.key, args.json)
        if action == "verify":
            return _verify(open_cache(root), args.json)
        if action == "prune":
            max_size = parse_size(args.max_size) if args.max_size is not None else None
            older_than = parse_age(args.older_than) if args.older_than is not None else None
            grace = parse_age(args.grace) if args.grace is not None else DEFAULT_GRACE
            keep = frozenset(e.sha256 for name in args.keep_lock or () for e in LockFile.load(Path(name)))
            return _prune(open_cache(root), max_size, older_than, grace, args.json, keep)
        if action == "export":
            lock = LockFile.load(Path(args.lock)) if args.lock else None
            return _export(open_cache(root), Path(args.file), lock)
        if action == "import":
            return _import(root, Path(args.file), lock_timeout)
    except (ValueError, LockError) as exc:  # a bad SIZE/AGE or lock file
        print(f"upstream-proxy: error: {exc}", file=sys.stderr)
        return 2
    raise AssertionError(action)


def _ls(cache: Cache, key: str | None, as_json: bool) -> int:
    listing = list_entries(cache, key)
    now = time.time()
    if as_json:
        print(json.dumps({"cache": str(cache.root), **listing.as_json(now)}, indent=1))
        return 0
    print(f"{'KEY':<16} {'KIND':<9} {'SIZE':>9} {'SHA256':<12} {'AGE':>6} {'IDLE':>6}  PATH")
    for ef in listing.entries:
        e = ef.entry
        assert e is not None
        variant = f"  [{e.variant}]" if e.variant else ""
        print(
            f"{e.key:<16} {e.kind:<9} {human_size(e.size):>9} {e.sha256[:12]:<12} "
            f"{human_age(now - e.fetched_at):>6} {human_age(now - ef.last_used):>6}  {e.path}{variant}"
        )
    for ef in listing.unreadable:
        print(f"unreadable entry {ef.rel}: {ef.error} (`upstream-proxy cache verify` removes it)")
    t = listing
    print(
        f"# {plural(len(t.entries), 'entry')} ({human_size(t.entry_bytes)}) in {cache.root}; "
        f"{plural(t.blobs, 'blob')} on disk ({human_size(t.blob_bytes)}), "
        f"{t.unreferenced_blobs} unreferenced ({human_size(t.unreferenced_bytes)})"
    )
    return 0


def _verify(cache: Cache, as_json: bool) -> int:
    return print_verify(verify(cache), str(cache.root), as_json, "entry busy or changed meanwhile")


def print_verify(report: VerifyReport, where: str, as_json: bool, not_removed: str) -> int:
    """``cache verify``'s output for a directory or a bucket (``where``); its exit status."""
    if as_json:
        print(json.dumps({"cache": where, **report.as_json()}, indent=1))
    else:
        for p in report.problems:
            state = "removed" if p.repaired else f"NOT removed ({not_removed})"
            print(f"{p.kind}: {p.path}: {p.detail}: {state}")
        summary = (
            f"checked {plural(report.blobs, 'blob')} ({human_size(report.blob_bytes)}) and "
            f"{plural(report.entries, 'entry')} in {where}"
        )
        print(f"{summary}: {'ok' if report.ok else plural(len(report.problems), 'problem')}")
    return 0 if report.ok else 1


def _prune(
    cache: Cache,
    max_size: int | None,
    older_than: float | None,
    grace: float,
    as_json: bool,
    keep: frozenset[str] = frozenset(),
) -> int:
    report = prune(cache, max_size=max_size, older_than=older_than, grace=grace, keep=keep)
    if as_json:
        print(json.dumps({"cache": str(cache.root), **report.as_json()}, indent=1))
        return 0
    for e in report.busy:
        print(f"skipped (in use): {e.key} {e.path}")
    print(
        f"removed {plural(len(report.removed), 'entry')} and {plural(report.blobs_removed, 'blob')} "
        f"({human_size(report.bytes_freed)}); {human_size(report.size_before)} -> "
        f"{human_size(report.size_after)} in {cache.root}"
        + (f"; {plural(len(report.busy), 'busy entry', 'busy entries')} skipped" if report.busy else "")
        + (f"; {report.used_meanwhile} used meanwhile, kept" if report.used_meanwhile else "")
        + (
            f"; {plural(report.parts_removed, 'orphaned part file')} removed "
            f"({human_size(report.part_bytes_freed)})"
            if report.parts_removed
            else ""
        )
    )
    if max_size is not None and report.size_after > max_size:
        why = [
            f"{human_size(n)} {what}"
            for n, what in (
                (report.pinned_bytes, "named by the --keep-lock files"),
                (report.busy_bytes, "of busy entries"),
                (report.recent_bytes, f"written in the last {grace:g}s (--grace)"),
            )
            if n
        ]
        print(f"note: still above {human_size(max_size)}" + (f": {'; '.join(why)}" if why else ""))
    return 0


def _export(cache: Cache, file: Path, lock: LockFile | None) -> int:
    report = export_archive(cache, file, lock)
    for line in report.superseded:
        why = "no index entry for the locked bytes (refreshed or pruned since)"
        print(f"note: {line}: {why}; exported the lock's blob only")
    print(
        f"wrote {file}: {plural(report.entries, 'entry')}, {plural(report.blobs, 'blob')} "
        f"({human_size(report.blob_bytes)}), archive {human_size(report.archive_bytes)}"
    )
    return 0


def _import(root: Path, file: Path, lock_timeout: float) -> int:
    cache, r = import_into(root, file, lock_timeout)
    print(
        f"imported {file} into {cache.root}: blobs {r.blobs_added} added, {r.blobs_kept} already there"
        + (f", {r.blobs_repaired} repaired" if r.blobs_repaired else "")
        + f"; entries {r.entries_added} added, {r.entries_replaced} replaced by newer, "
        f"{r.entries_kept} kept (as new or newer)"
    )
    return 0
