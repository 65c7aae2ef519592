"""The HTTP face of the engine: an HTTP/1.1 server, httptools for parsing, an event loop and
worker threads.

One event-loop thread holds every idle or reading connection and answers what needs no waiting
(a warm hit, an error), so idle connections cost no thread and a warm page no thread switch;
worker threads run the blocking engine for the rest (a client waiting on a slow upstream or on
another process's download holds one worker and nothing else).  Cached files go out with
``os.sendfile`` (constant memory, zero copy); misses stream to the client while the engine
writes them to the cache.  The bounds that keep it up for weeks (deadlines, the connection cap)
are in ``limits.py``; why httptools is in docs/dependencies.md; threads and connections in
docs/operations.md.

    listener.py     the event loop: accept, read, deadlines, connection cap, EMFILE back-off
    workers.py          the threads that answer what must wait
    siblings.py     serve --workers: the processes' connection counts, to share the clients
    connection.py       one client: its state, routing, answering inline or in a worker
    forward.py      capture: CONNECT and absolute-form requests (docs/capture.md)
    request_reader.py   parsing (httptools) and the checks llhttp leaves to us
    responses.py    writing a Reply: bytes, sendfile with ranges, streams
"""

from __future__ import annotations

import threading
from typing import Any

from pytest_upstream.config.settings import Settings
from pytest_upstream.engine.clock import Clock
from pytest_upstream.engine.dispatch import Engine
from pytest_upstream.repro.served import ServedLog
from pytest_upstream.server.admission import Admission
from pytest_upstream.server.connection import Site
from pytest_upstream.server.forward import Forwarder
from pytest_upstream.server.limits import Limits
from pytest_upstream.server.listener import Listener


class ProxyServer:
    """The proxy on ``host:port`` (port 0 picks a free one), in a background thread."""

    def __init__(
        self,
        settings: Settings,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        served: ServedLog | None = None,
        clock: Clock | None = None,
    ) -> None:
        """``clock``: the engine's time (TTLs, ages, token expiry); tests pass a ``ManualClock``.
        Binds at once (so a taken port fails here), serves from ``start()`` or ``serve_forever()``."""
        self.engine = Engine(settings, log_=served, clock=clock)
        self.limits = Limits.from_settings(settings)
        try:
            self._site = Site(
                engine=self.engine,
                limits=self.limits,
                port=port,
                index=self._index,
                admission=Admission.for_server(settings, host),
            )
            if settings.capture.enabled:
                self._site.forward = _forwarder(settings, self.engine, self.limits)
            self._listener = Listener(host, port, self._site)
        except BaseException:
            self.engine.close()
            raise
        self._site.port = self._listener.address[1]
        self._thread: threading.Thread | None = None

    @property
    def served(self) -> ServedLog:
        return self.engine.served

    @property
    def refused(self) -> list[tuple[str, str]]:
        """(host, test) of each forward-proxy request refused (see ``Connection._refuse_forward``)."""
        return list(self._site.refused)

    @property
    def capture(self) -> Forwarder | None:
        """Capture's forwarder (server/forward.py), None when capture is off."""
        return self._site.forward

    @property
    def base_url(self) -> str:
        host, port = self._listener.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def url(self, key: str) -> str:
        return f"{self.base_url}/{key}/"

    def open_connections(self) -> int:
        return self._listener.open_connections()

    def _index(self) -> dict[str, Any]:
        base = self.base_url
        return {
            "service": "pytest-upstream",
            "mode": self.engine.mode,
            "proxies": {
                p.key: {"format": p.format, "source": p.source, "url": f"{base}/{p.key}/"}
                for p in self.engine.settings.proxies
            },
        }

    def start(self) -> ProxyServer:
        self._thread = threading.Thread(
            target=self._listener.serve_forever, name="pytest-upstream", daemon=True
        )
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve in this thread (``upstream-proxy serve``, and each ``--workers`` process after
        the fork): the artifact index of ``/-/ui/`` is read in the background from the start.
        (``start``, the pytest fixture's way, reads it on the first ``/-/ui/`` request only: a
        test session should not spend its CPU reading a big cache nobody looks at.)"""
        self.engine.artifacts.start()
        self._listener.serve_forever()

    def stop(self) -> None:
        self._listener.stop()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._listener.close()
        self.engine.close()

    def __enter__(self) -> ProxyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _forwarder(settings: Settings, engine: Engine, limits: Limits) -> Forwarder:
    """Capture's forwarder with the cache's CA (cryptography is imported only here)."""
    from pytest_upstream.capture.ca import CertificateAuthority

    return Forwarder(settings.capture, CertificateAuthority(settings.cache_dir), engine, limits)
