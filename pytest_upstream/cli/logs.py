"""How ``serve`` logs: INFO by default (one access line per request, upstream failures at
WARNING), ``-v`` adds our own DEBUG lines only, ``--log-format json`` writes one JSON object per
line for log shippers.

Third-party loggers (httpx, httpcore, filelock) stay at WARNING even with ``-v``: their DEBUG
lines describe every socket operation and drown what the operator asked to see.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from typing import Any

LOG_FORMATS = ("text", "json")
QUIET_LOGGERS = ("httpx", "httpcore", "filelock", "hpack", "h11")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, the access fields if any
    (``server/access_log.py``), and the traceback as text."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            out.update({k: v for k, v in access.items() if k not in out})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=True)


@contextlib.contextmanager
def serve_logging(*, verbose: bool, log_format: str = "text") -> Iterator[None]:
    """Log to stderr while ``serve`` runs: INFO (DEBUG for our loggers with ``verbose``) in
    ``log_format``; the previous handlers and levels come back afterwards (``main`` may run
    in-process, as tests do)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    ours = logging.getLogger("pytest_upstream")
    quiet = [logging.getLogger(name) for name in QUIET_LOGGERS]
    saved = (list(root.handlers), root.level, ours.level, [q.level for q in quiet])
    for old in saved[0]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    ours.setLevel(logging.DEBUG if verbose else logging.INFO)
    for q in quiet:
        q.setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.removeHandler(handler)
        for old in saved[0]:
            root.addHandler(old)
        root.setLevel(saved[1])
        ours.setLevel(saved[2])
        for q, level in zip(quiet, saved[3], strict=True):
            q.setLevel(level)
