"""``serve --workers N``: forked worker processes on one listening socket, watched and restarted."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from pytest_upstream.config.units import plural

if TYPE_CHECKING:
    from pytest_upstream.server.proxy_server import ProxyServer

log = logging.getLogger("pytest_upstream.serve")


def serve_in_worker(server: ProxyServer) -> None:
    """A forked worker: serve on the inherited listening socket until the supervisor ends it."""
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    code = 1
    try:
        server.serve_forever()
        code = 0
    finally:
        os._exit(code)


class Supervisor:
    """``serve --workers N``: N forked processes accept on the one listening socket; this process
    only watches them.  The shared cache is safe across processes (per-entry file locks), so
    this scales warm hits past one interpreter's GIL.

    The supervisor runs no server thread, so every fork (the first ones and each restart) copies
    a process with one thread.  A worker that dies is reported at WARNING with its exit status
    and started again; one that keeps dying soon after its start is restarted after a growing
    pause (``BACKOFF_START`` doubling up to ``BACKOFF_MAX``), so a crash loop does not spin.
    """

    BACKOFF_START = 0.1
    BACKOFF_MAX = 30.0
    HEALTHY_AFTER = 10.0  # seconds a worker must live for its restart to be immediate again

    def __init__(self, target: Callable[[], None], count: int) -> None:
        self.target = target
        self.count = count
        self.children: dict[int, float] = {}  # pid -> start time
        self.backoff = 0.0

    def spawn(self) -> int:
        pid = os.fork()
        if pid == 0:
            self.target()  # never returns: the worker exits the process
            os._exit(1)
        self.children[pid] = time.monotonic()
        return pid

    def run(self) -> None:
        try:
            for _ in range(self.count):
                self.spawn()
            log.info("started %s: %s", plural(self.count, "worker"), ", ".join(map(str, self.children)))
            while True:
                pid, status = os.waitpid(-1, 0)
                started = self.children.pop(pid, None)
                if started is None:
                    continue
                lived = time.monotonic() - started
                self.backoff = (
                    0.0
                    if lived >= self.HEALTHY_AFTER
                    else min(max(self.backoff * 2, self.BACKOFF_START), self.BACKOFF_MAX)
                )
                log.warning(
                    "worker %d %s after %.1fs; restarting it%s",
                    pid,
                    describe_exit(status),
                    lived,
                    f" in {self.backoff:.1f}s" if self.backoff else "",
                )
                time.sleep(self.backoff)
                new = self.spawn()
                log.info("worker %d started in place of %d", new, pid)
        finally:
            self.stop()

    def stop(self) -> None:
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in list(self.children):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.children.clear()


def describe_exit(status: int) -> str:
    """``exited with status 3`` or ``was killed by SIGKILL``, from a ``waitpid`` status."""
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name}"
    return f"exited with status {code}"
