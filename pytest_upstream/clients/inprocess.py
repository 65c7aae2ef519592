"""Route the test process's own HTTP clients through the proxy.

Code under test that downloads from an upstream directly (``requests.get``,
``httpx.get``, ``urllib.request.urlopen``) bypasses the environment the
plugin exports for subprocesses.  While an ``InProcessRouting`` is active,
a GET or HEAD whose URL lies under a configured proxy's source URL is sent
to the proxy instead (``<source url>/<rest>`` becomes
``<proxy base>/<key>/<rest>``; pypi and the other formats: ``routes.py``),
so it is recorded and replayed like any other client's request; every
other request passes through unchanged.

One patch per client library, each at the narrowest point that sees the
whole URL (docs/dependencies.md explains the choice):

* httpx: ``httpx.HTTPTransport.handle_request`` and
  ``httpx.AsyncHTTPTransport.handle_async_request``.  The proxy's own
  upstream client (``upstream.py``) pins the original method on a private
  subclass, so this patch never loops its fetches back into the proxy;
* requests and urllib3: ``urllib3.HTTPConnectionPool.urlopen`` (requests
  sends through urllib3; ``responses`` and other mocks of requests sit
  above it and keep working);
* urllib: ``urllib.request.AbstractHTTPHandler.do_open`` (every opener,
  ``urlopen`` included, opens HTTP and HTTPS through it).

A routed request reaches the proxy over loopback through connection
classes captured when this module is imported, so mocks started later
(respx, pytest-httpx, vcrpy) see neither the forwarded request nor its
answer.  The client sees the proxy's answer under the original URL; a
redirect the proxy answers (pypi's ``/simple`` → ``/simple/``) points back
under the source URL.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import ssl
import threading
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpcore
import httpx

# Imported first: it pins httpx before anything below patches it.
import pytest_upstream.upstream.client as _pinned
from pytest_upstream.clients.routes import DEFAULT_PORTS, Router, origin_of
from pytest_upstream.config.settings import ProxyDefinition

try:  # requests' transport; neither is a dependency of pytest-upstream
    import urllib3.connection
    import urllib3.connectionpool
except ImportError:  # pragma: no cover - exercised only without urllib3
    HAS_URLLIB3 = False
else:
    HAS_URLLIB3 = True

__all__ = ["InProcessRouting", "Routed", "Target", "active_routing", "suspended"]

_DROPPED_HEADERS = frozenset({"host", "connection", "content-length", "transfer-encoding", "keep-alive"})


@dataclass(frozen=True)
class Target:
    """Where one request goes instead: the proxy ``key`` and the full proxy URL."""

    key: str
    path: str  # below /<key>/, raw (percent-encoded), with the query
    url: str


@dataclass(frozen=True)
class Routed:
    """One request the routing sent to the proxy."""

    client: str  # "httpx" | "urllib3" (requests too) | "urllib"
    method: str
    url: str  # what the code under test asked for
    proxy_url: str  # where it went


class InProcessRouting:
    """The URL mapping of one proxy server, and a log of what it routed.

    ``with routing.activate(): ...`` routes the whole process (every thread)
    for the block; activations nest, the innermost one decides, and
    ``suspended()`` turns routing off inside one.
    """

    def __init__(self, base_url: str, proxies: Iterable[ProxyDefinition]) -> None:
        self.base_url = base_url.rstrip("/")
        base = urlsplit(self.base_url)
        if base.scheme != "http" or not base.hostname:
            raise ValueError(f"the proxy base URL must be plain http: {base_url!r}")
        self._proxy_host, self._proxy_port = base.hostname, base.port or 80
        # Never route the proxy's own address (a source pointing at the proxy would loop).
        self.router = Router(proxies, exclude=origin_of(base.scheme, base.hostname, base.port))
        self._lock = threading.Lock()
        self._routed: list[Routed] = []
        self._pool: Any = None  # a _ProxyPool, when urllib3 is installed
        self._transport: _pinned._Transport | None = None

    @classmethod
    def for_server(cls, server: Any) -> InProcessRouting:
        """For a running ``ProxyServer`` (or anything with ``base_url`` and ``engine.settings``)."""
        return cls(server.base_url, server.engine.settings.proxies)

    # -- mapping -------------------------------------------------------------
    def target(self, url: str, method: str = "GET") -> Target | None:
        """Where a request for ``url`` is routed, or None if it passes through."""
        route = self.router.route(url, method)
        if route is None:
            return None
        return Target(route.key, route.path, f"{self.base_url}/{route.key}/{route.path}")

    def source_location(self, location: str) -> str:
        """A Location the proxy answered, moved back under the source URL when it names a proxy path."""
        return self.router.source_location(self.base_url, location)

    @property
    def routed(self) -> list[Routed]:
        """Every request routed to the proxy so far, in order."""
        with self._lock:
            return list(self._routed)

    def _note(self, client: str, method: str, url: str, target: Target) -> None:
        with self._lock:
            self._routed.append(Routed(client, method.upper(), url, target.url))

    # -- on and off ------------------------------------------------------------
    @contextlib.contextmanager
    def activate(self) -> Iterator[InProcessRouting]:
        self.start()
        try:
            yield self
        finally:
            self.stop()

    def start(self) -> None:
        _push(self)

    def stop(self) -> None:
        _pop(self)

    def close(self) -> None:
        """Close the loopback connections to the proxy (after the last ``stop``)."""
        with self._lock:
            pool, transport = self._pool, self._transport
            self._pool = self._transport = None
        if pool is not None:
            pool.close()
        if transport is not None:
            transport.close()

    # -- forwarding connections ------------------------------------------------
    def _urllib3_pool(self) -> Any:
        with self._lock:
            if self._pool is None:
                self._pool = _ProxyPool(self._proxy_host, self._proxy_port, maxsize=16)
            return self._pool

    def _httpx_transport(self) -> _pinned._Transport:
        with self._lock:
            if self._transport is None:
                self._transport = _pinned._Transport(ssl.create_default_context(), 16)
            return self._transport


# -- the process-wide switch -------------------------------------------------------
_state_lock = threading.Lock()
_stack: list[InProcessRouting | None] = []  # None: suspended
_installed: list[tuple[type, str, Any, Any]] = []  # (owner, name, previous, wrapper)


def active_routing() -> InProcessRouting | None:
    """The routing that decides right now (None when off or suspended)."""
    try:
        return _stack[-1]
    except IndexError:  # off (read without the lock: this runs on every request)
        return None


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """Turn routing off for a block (e.g. one test while the session routes everything)."""
    _push(None)
    try:
        yield
    finally:
        _pop(None)


def _push(entry: InProcessRouting | None) -> None:
    with _state_lock:
        if not _installed:
            _install()
        _stack.append(entry)


def _pop(entry: InProcessRouting | None) -> None:
    with _state_lock:
        for index in range(len(_stack) - 1, -1, -1):
            if _stack[index] is entry:
                del _stack[index]
                break
        if not _stack and _installed:
            _uninstall()


def _lookup(url: str, method: str, client: str) -> tuple[InProcessRouting, Target] | None:
    routing = active_routing()
    if routing is None:
        return None
    target = routing.target(url, method)
    if target is None:
        return None
    routing._note(client, method, url, target)
    return routing, target


def _install() -> None:
    wrappers: list[tuple[type, str, Callable[[Any], Any]]] = [
        (httpx.HTTPTransport, "handle_request", _httpx_sync_wrapper),
        (httpx.AsyncHTTPTransport, "handle_async_request", _httpx_async_wrapper),
        (urllib.request.AbstractHTTPHandler, "do_open", _urllib_wrapper),
    ]
    if HAS_URLLIB3:
        wrappers.append((urllib3.connectionpool.HTTPConnectionPool, "urlopen", _urllib3_wrapper))
    for owner, name, make in wrappers:
        previous = owner.__dict__[name]
        wrapper = make(previous)
        setattr(owner, name, wrapper)
        _installed.append((owner, name, previous, wrapper))


def _uninstall() -> None:
    # A mock started after us and still active keeps its patch; when it ends it
    # puts our wrapper back, which passes everything through once nothing is active.
    for owner, name, previous, wrapper in reversed(_installed):
        if owner.__dict__.get(name) is wrapper:
            setattr(owner, name, previous)
    _installed.clear()


def _forward_headers(items: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in items if k.lower() not in _DROPPED_HEADERS]


# -- httpx -------------------------------------------------------------------------
# Pinned like upstream.py's classes, for the asynchronous side.
_ASYNC_TRANSPORT_HANDLE = httpx.AsyncHTTPTransport.__dict__["handle_async_request"]
_ASYNC_POOL_HANDLE = httpcore.AsyncConnectionPool.__dict__["handle_async_request"]
_ASYNC_CONNECTION_HANDLE = httpcore.AsyncHTTPConnection.__dict__["handle_async_request"]


class _AsyncConnection(httpcore.AsyncHTTPConnection):
    handle_async_request = _ASYNC_CONNECTION_HANDLE


class _AsyncPool(httpcore.AsyncConnectionPool):
    handle_async_request = _ASYNC_POOL_HANDLE

    def create_connection(self, origin: httpcore.Origin) -> httpcore.AsyncConnectionInterface:
        return _AsyncConnection(origin=origin, keepalive_expiry=self._keepalive_expiry)


class _AsyncTransport(httpx.AsyncHTTPTransport):
    handle_async_request = _ASYNC_TRANSPORT_HANDLE

    def __init__(self) -> None:
        super().__init__()
        self._pool = _AsyncPool(keepalive_expiry=5.0)


class _ClosingStream(httpx.AsyncByteStream):
    """A forwarded async body that closes its one-request transport with it
    (connections cannot be shared across the event loops of different tests)."""

    def __init__(self, stream: httpx.AsyncByteStream, transport: _AsyncTransport) -> None:
        self._stream = stream
        self._transport = transport

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            await self._transport.aclose()


def _forwarded_httpx(request: httpx.Request, target: Target) -> httpx.Request:
    extensions = {k: v for k, v in request.extensions.items() if k == "timeout"}
    return httpx.Request(
        request.method,
        target.url,
        headers=_forward_headers(request.headers.multi_items()),
        extensions=extensions,
    )


def _fix_httpx_location(routing: InProcessRouting, response: httpx.Response) -> None:
    if (location := response.headers.get("location")) is not None:
        response.headers["location"] = routing.source_location(location)


def _httpx_sync_wrapper(previous: Any) -> Callable[..., httpx.Response]:
    def handle_request(self: httpx.HTTPTransport, request: httpx.Request) -> httpx.Response:
        found = _lookup(str(request.url), request.method, "httpx")
        if found is None:
            return previous(self, request)  # type: ignore[no-any-return]
        routing, target = found
        response: httpx.Response = routing._httpx_transport().handle_request(
            _forwarded_httpx(request, target)
        )
        _fix_httpx_location(routing, response)
        return response

    return handle_request


def _httpx_async_wrapper(previous: Any) -> Callable[..., Any]:
    async def handle_async_request(self: httpx.AsyncHTTPTransport, request: httpx.Request) -> httpx.Response:
        found = _lookup(str(request.url), request.method, "httpx")
        if found is None:
            return await previous(self, request)  # type: ignore[no-any-return]
        routing, target = found
        transport = _AsyncTransport()
        try:
            response: httpx.Response = await transport.handle_async_request(_forwarded_httpx(request, target))
        except BaseException:
            await transport.aclose()
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _ClosingStream(response.stream, transport)
        _fix_httpx_location(routing, response)
        return response

    return handle_async_request


# -- urllib3 (and requests) ----------------------------------------------------------
_URLOPEN_ARGS = (
    "body",
    "headers",
    "retries",
    "redirect",
    "assert_same_host",
    "timeout",
    "pool_timeout",
    "release_conn",
    "chunked",
    "body_pos",
    "preload_content",
    "decode_content",
)

if HAS_URLLIB3:
    _URLOPEN = urllib3.connectionpool.HTTPConnectionPool.__dict__["urlopen"]

    class _ProxyPool(urllib3.connectionpool.HTTPConnectionPool):
        """Loopback connections to the proxy, on the connection class urllib3 had at import."""

        ConnectionCls = urllib3.connection.HTTPConnection


def _pool_url(pool: Any, url: str) -> str:
    if "://" in url:  # a request through a forward proxy carries the absolute URL
        return url
    host = pool.host or ""
    if ":" in host:
        host = f"[{host}]"
    port = pool.port or DEFAULT_PORTS.get(pool.scheme, 0)
    return f"{pool.scheme}://{host}:{port}{url}"


def _urllib3_wrapper(previous: Any) -> Callable[..., Any]:
    def urlopen(self: Any, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        full = _pool_url(self, url)
        found = _lookup(full, method, "urllib3")
        if found is None:
            return previous(self, method, url, *args, **kwargs)
        routing, target = found
        kwargs.update(zip(_URLOPEN_ARGS, args, strict=False))
        headers = kwargs.pop("headers", None) or {}
        kwargs["assert_same_host"] = False
        response = _URLOPEN(
            routing._urllib3_pool(),
            method,
            f"/{target.key}/{target.path}",
            headers=dict(_forward_headers(headers.items())),
            **kwargs,
        )
        if (location := response.headers.get("location")) is not None:
            response.headers["Location"] = routing.source_location(location)
        with contextlib.suppress(AttributeError):
            response.url = full
        return response

    return urlopen


# -- urllib ----------------------------------------------------------------------------
_DO_OPEN = urllib.request.AbstractHTTPHandler.__dict__["do_open"]
_HTTP_CONNECTION = http.client.HTTPConnection


def _urllib_wrapper(previous: Any) -> Callable[..., Any]:
    def do_open(
        self: urllib.request.AbstractHTTPHandler,
        http_class: Any,
        req: urllib.request.Request,
        **http_conn_args: Any,
    ) -> Any:
        found = _lookup(req.full_url, req.get_method(), "urllib")
        if found is None:
            return previous(self, http_class, req, **http_conn_args)
        routing, target = found
        forwarded = urllib.request.Request(
            target.url,
            method=req.get_method(),
            headers=dict(_forward_headers(req.header_items())),
        )
        forwarded.timeout = getattr(req, "timeout", socket._GLOBAL_DEFAULT_TIMEOUT)  # type: ignore[attr-defined]
        response = _DO_OPEN(self, _HTTP_CONNECTION, forwarded)
        response.url = req.full_url
        for name in ("Location", "URI"):
            if (location := response.headers.get(name)) is not None:
                response.headers.replace_header(name, routing.source_location(location))
        return response

    return do_open
