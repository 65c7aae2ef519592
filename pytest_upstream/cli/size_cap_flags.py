"""``serve``'s size-cap flags (docs/cache.md § Size cap): ``--max-size`` and ``--keep-lock``."""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path

from pytest_upstream.config.settings import ENV_MAX_SIZE, Settings, with_max_size


def add_size_cap_flags(serve: argparse.ArgumentParser) -> None:
    cap = serve.add_argument_group("size cap (default: the config's max_size, else none)")
    cap.add_argument(
        "--max-size",
        metavar="SIZE",
        help=f"keep the cache's blobs under SIZE while serving (10G; 0: no cap; env {ENV_MAX_SIZE})",
    )
    cap.add_argument(
        "--keep-lock",
        metavar="FILE",
        action="append",
        help="the size cap never removes the blobs this lock file names (repeatable)",
    )


def with_size_cap_flags(args: argparse.Namespace, settings: Settings) -> Settings:
    """``--max-size`` (else ``UPSTREAM_PROXY_MAX_SIZE``) and ``--keep-lock`` over the config."""
    settings = with_max_size(settings, args.max_size or os.environ.get(ENV_MAX_SIZE))
    if args.keep_lock:
        settings = replace(settings, keep_locks=tuple(Path(p).expanduser() for p in args.keep_lock))
    return settings
