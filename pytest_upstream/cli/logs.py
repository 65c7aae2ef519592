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
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

LOG_FORMATS = ("text", "json")
QUIET_LOGGERS = (
    "httpx",
    "httpcore",
    "filelock",
    "hpack",
    "h11",
    "botocore",
    "boto3",
    "s3transfer",
    "urllib3",
)
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


class BatchingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes lines in batches: at most every ``interval`` seconds (a
    background thread flushes a quiet period's lines), and at once for a WARNING or worse.

    One access line per request made a write and a flush per request: measured on a warm index
    page, that cost 40 % of ``serve``'s requests per second; batched, about a quarter
    (docs/operations.md).  Lines reach the stream in order, at most ``interval`` late.
    """

    def __init__(self, stream: Any, interval: float = 0.5) -> None:
        super().__init__(stream)
        self.interval = interval
        self._pending: list[str] = []
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._flusher = threading.Thread(target=self._run, name="pytest-upstream-log", daemon=True)
        self._flusher.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        with self.lock:  # type: ignore[union-attr]
            self._pending.append(line)
            due = record.levelno >= logging.WARNING or time.monotonic() - self._last >= self.interval
        if due:
            self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            lines, self._pending = self._pending, []
            self._last = time.monotonic()
            if lines:
                with contextlib.suppress(OSError, ValueError):
                    self.stream.write("".join(lines))
                    self.stream.flush()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        self.flush()
        super().close()


class Scrubbing(logging.Filter):
    """Takes secrets out of every record before it is formatted: the message with its arguments
    and a traceback's text (an exception raised by the HTTP library may quote a header value)."""

    def __init__(self, scrub: Callable[[str], str]) -> None:
        super().__init__()
        self.scrub = scrub

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = self.scrub(record.getMessage()), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.scrub(record.exc_text)
        return True


@contextlib.contextmanager
def serve_logging(
    *, verbose: bool, log_format: str = "text", scrub: Callable[[str], str] | None = None
) -> Iterator[None]:
    """Log to stderr while ``serve`` runs: INFO (DEBUG for our loggers with ``verbose``) in
    ``log_format``, every line passed through ``scrub``; the previous handlers and levels come
    back afterwards (``main`` may run in-process, as tests do)."""
    handler = BatchingHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    if scrub is not None:
        handler.addFilter(Scrubbing(scrub))
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
        handler.close()
        root.removeHandler(handler)
        for old in saved[0]:
            root.addHandler(old)
        root.setLevel(saved[1])
        ours.setLevel(saved[2])
        for q, level in zip(quiet, saved[3], strict=True):
            q.setLevel(level)
