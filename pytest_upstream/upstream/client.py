"""The proxy's own upstream HTTP client, built on httpx.

Test-time mocking libraries patch httpx and httpcore *classes* process-wide:
respx patches ``httpx.Client._transport_for_url`` and the ``handle_request``
methods of httpcore's connection pool and connections; pytest-httpx and vcrpy
patch ``httpx.HTTPTransport.handle_request``.  A proxy running inside the
test process must not have its upstream traffic captured by them, so this
module takes the original methods when it is imported (at plugin load, before
any test starts a mock: the plugin starts the proxy at configure time) and
pins them on private subclasses.  Mocks started later patch the base
classes and never reach these.  A mock already active at import is refused
with a clear error rather than silently capturing the proxy's traffic.

The proxy's own transport (``_UpstreamTransport``) adds the guards against hostile upstreams:
content codings are undone here, within caps (``decoding.py``), never by httpx; every connection
goes through the SSRF guard (``addresses.py``); and a GET or HEAD that fails on a reused pooled
connection (the server closed it, or broke the protocol) is sent once more on a fresh one.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import h11
import httpcore
import httpx

from pytest_upstream.config.units import human_size
from pytest_upstream.config.upstream_limits import DecodeLimits, FetchLimits
from pytest_upstream.upstream.addresses import AddressPolicy, GuardedBackend
from pytest_upstream.upstream.decoding import OFFERED, coding_of, decode
from pytest_upstream.upstream.errors import UpstreamError

__all__ = ["UNTRUSTED", "Pace", "UpstreamClient", "UpstreamError", "content_coded", "iter_body"]

# Request and response extensions (httpx hands a request's dict to httpcore as it is).
_DECODING = "pytest_upstream.decoding"  # the DecodeLimits of this request
_REUSED = "pytest_upstream.reused"  # set by _Connection: the request went over a reused connection
_FRESH = "pytest_upstream.fresh"  # this request must go over a new connection
_CODED = "pytest_upstream.content_coding"  # the coding the answer came in (decoded here)
_BROKEN_CONNECTION = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


def _original(cls: type, name: str) -> Callable[..., Any]:
    method = cls.__dict__[name]
    if isinstance(method, mock.Base):  # pragma: no cover - imported under an active mock
        raise RuntimeError(f"{cls.__name__}.{name} is already mocked; import pytest_upstream earlier")
    return method  # type: ignore[no-any-return]


_connection_handle_request = _original(httpcore.HTTPConnection, "handle_request")


class _WideReads(httpcore.NetworkStream):
    """A connection's stream that asks the socket for at least ``_READ_SIZE`` bytes per read.

    httpcore reads 64 KiB at a time; every read then costs a pass through h11 and httpx and a
    wake-up of the flight's readers.  A 100 MiB body arrived in ~1,600 reads, whose fixed costs
    were a large part of a cold miss; wider reads keep the per-byte work (copies, hashing) the
    same and cut the per-read work.  h11 buffers whatever it was given beyond the current answer.
    """

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner
        self.inner = inner  # for reads that must not go past a given length (_DirectBody)

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max(max_bytes, _READ_SIZE), timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, timeout)

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        return _WideReads(self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


_READ_SIZE = 256 * 1024
# The decoder judges ``max_expansion`` against the coded bytes it was handed (decoding.py): fed
# a whole wide read, a bomb would look 4x tamer at the point where it must be refused (before a
# flight's headers go out).  Coded bodies are fed to it in httpcore's own read size.
_CODED_PIECE = 64 * 1024


def _pieces(raw: Iterable[bytes]) -> Iterator[bytes]:
    for chunk in raw:
        if len(chunk) <= _CODED_PIECE:
            yield chunk
            continue
        for at in range(0, len(chunk), _CODED_PIECE):
            yield chunk[at : at + _CODED_PIECE]


class _DirectBody(httpcore.HTTP11Connection):
    """HTTP/1.1 whose long Content-Length bodies bypass h11's buffer.

    h11 hands a body over through its receive buffer: appended to a bytearray, sliced out twice,
    then copied to ``bytes`` by httpcore: four copies of every byte in Python beside the one
    ``recv`` makes, a large part of a cold miss's CPU.  For a body of at least ``_DIRECT_AFTER``
    bytes, what h11 already buffered is taken through it as usual, then the rest is read from the
    socket as it is, exactly up to the declared length (never into the next answer), and h11's
    count of what remains is kept, so it ends the message and the connection is reused as before.
    Any other body (chunked, close-delimited, short), or an h11 whose internals differ, takes
    httpcore's own path.  Content codings are undone above this (``_Decoded``).
    """

    def _receive_response_body(self, request: httpcore.Request) -> Iterator[bytes]:
        reader = getattr(self._h11_state, "_reader", None)
        remaining = getattr(reader, "_remaining", None)
        if not isinstance(remaining, int) or remaining < _DIRECT_AFTER or not hasattr(reader, "_length"):
            yield from super()._receive_response_body(request)
            return
        timeout = request.extensions.get("timeout", {}).get("read")
        while True:  # the body bytes h11 holds already
            try:
                event = self._h11_state.next_event()
            except h11.RemoteProtocolError as exc:
                raise httpcore.RemoteProtocolError(str(exc)) from exc
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif event is h11.NEED_DATA:
                break
            else:  # EndOfMessage: h11 had it all
                return
        stream = self._network_stream
        raw = stream.inner if isinstance(stream, _WideReads) else stream
        while reader._remaining > 0:  # type: ignore[union-attr]
            data = raw.read(min(reader._remaining, _READ_SIZE), timeout=timeout)  # type: ignore[union-attr]
            if not data:
                got = reader._length - reader._remaining  # type: ignore[union-attr]
                raise httpcore.RemoteProtocolError(
                    "peer closed connection without sending complete message body "
                    f"(received {got} bytes, expected {reader._length})"  # type: ignore[union-attr]
                )
            reader._remaining -= len(data)  # type: ignore[union-attr]
            yield data
        yield from super()._receive_response_body(request)  # h11 sees the end of the message


_DIRECT_AFTER = 1024 * 1024  # bodies at least this long are read past h11 (_DirectBody)


class _Connection(httpcore.HTTPConnection):
    _served = 0  # requests sent over this connection so far

    def _connect(self, request: httpcore.Request) -> httpcore.NetworkStream:
        return _WideReads(super()._connect(request))

    def handle_request(self, request: httpcore.Request) -> httpcore.Response:
        if self._served and request.extensions.get(_FRESH):
            # The retry of a request that broke on a reused connection: this one is idle and
            # reused too, so close it and let the pool hand over another (or open a new one).
            self.close()
            raise httpcore.ConnectionNotAvailable()
        request.extensions[_REUSED] = self._served > 0
        self._served += 1
        response: httpcore.Response = _connection_handle_request(self, request)
        if type(self._connection) is httpcore.HTTP11Connection:  # read at body time: takes effect now
            self._connection.__class__ = _DirectBody
        return response


class _Pool(httpcore.ConnectionPool):
    handle_request = _original(httpcore.ConnectionPool, "handle_request")

    def create_connection(self, origin: httpcore.Origin) -> httpcore.ConnectionInterface:
        return _Connection(
            origin=origin,
            ssl_context=self._ssl_context,
            keepalive_expiry=self._keepalive_expiry,
            http1=self._http1,
            http2=self._http2,
            retries=self._retries,
            local_address=self._local_address,
            uds=self._uds,
            network_backend=self._network_backend,
            socket_options=self._socket_options,
        )


class _Transport(httpx.HTTPTransport):
    handle_request = _original(httpx.HTTPTransport, "handle_request")

    def __init__(
        self,
        ssl_context: ssl.SSLContext,
        max_connections: int,
        network_backend: httpcore.NetworkBackend | None = None,
    ) -> None:
        super().__init__(verify=ssl_context)
        self._pool = _Pool(
            ssl_context=ssl_context,
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=30.0,
            network_backend=network_backend,
        )


class _Client(httpx.Client):
    _transport_for_url = _original(httpx.Client, "_transport_for_url")


class _Decoded(httpx.SyncByteStream):
    def __init__(self, raw: httpx.SyncByteStream, coding: str, limits: DecodeLimits) -> None:
        self._raw, self._coding, self._limits = raw, coding, limits

    def __iter__(self) -> Iterator[bytes]:
        yield from decode(_pieces(self._raw), self._coding, self._limits)

    def close(self) -> None:
        self._raw.close()


class _UpstreamTransport(_Transport):
    """The proxy's transport to upstreams: guarded connections, content codings undone within the
    request's ``DecodeLimits``.  The answer loses its Content-Encoding and Content-Length (they
    describe the coded bytes), so httpx never decodes anything itself."""

    def __init__(self, ssl_context: ssl.SSLContext, max_connections: int, policy: AddressPolicy) -> None:
        super().__init__(ssl_context, max_connections, GuardedBackend(policy))

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response: httpx.Response = super().handle_request(request)
        try:
            coding = coding_of(response.headers.get("content-encoding"))
        except UpstreamError:
            response.close()
            raise
        if not coding:
            return response
        assert isinstance(response.stream, httpx.SyncByteStream)
        headers = [(k, v) for k, v in response.headers.multi_items() if k not in _CODING_HEADERS]
        limits = request.extensions.get(_DECODING) or DecodeLimits()
        return httpx.Response(
            response.status_code,
            headers=headers,
            stream=_Decoded(response.stream, coding, limits),
            extensions={**response.extensions, _CODED: coding},
        )


_CODING_HEADERS = frozenset({"content-encoding", "content-length"})


def content_coded(response: httpx.Response) -> str:
    """The content coding ``response`` came in ("" for none); its body is decoded already."""
    return str(response.extensions.get(_CODED, ""))


def _broke_reused_connection(exc: httpx.HTTPError) -> bool:
    if not isinstance(exc, _BROKEN_CONNECTION):
        return False
    try:
        return bool(exc.request.extensions.get(_REUSED))
    except RuntimeError:  # pragma: no cover - httpx always sets the request on these
        return False


# What an upstream error says when the upstream's certificate failed verification: the engine
# puts it in the status line (a 502 that says the certificate was not trusted, docs/capture.md).
UNTRUSTED = "upstream certificate not trusted"


def _untrusted(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    seen: BaseException | None = exc
    for _ in range(8):  # httpx wraps httpcore's error, which wraps ssl's
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _describe(exc: Exception) -> str:
    if (bad := _untrusted(exc)) is not None:
        why = bad.verify_message or bad.reason or "verification failed"
        return f"{UNTRUSTED} ({why}; add its CA to upstream_ca if it is a private one)"
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({type(exc).__name__})"
    if isinstance(exc, httpx.ConnectError):
        return f"connection failed: {exc or 'refused'}"
    if isinstance(exc, httpx.RemoteProtocolError):
        return f"protocol error: {exc}"
    return f"{type(exc).__name__}: {exc}"


class UpstreamClient:
    """Shared by all proxies of a server; thread-safe (httpx clients are).

    ``policy`` is the SSRF guard: where redirects and links may take the proxy (addresses.py).
    """

    def __init__(
        self, policy: AddressPolicy, *, max_connections: int = 64, extra_ca: Path | None = None
    ) -> None:
        # Upstream requests ignore HTTP(S)_PROXY on purpose: the plugin may
        # point those variables at this very proxy for its clients.
        # TLS is never weakened: the system's roots, plus ``upstream_ca``'s for private
        # registries and tests (docs/capture.md); hostnames are checked as always.
        ctx = ssl.create_default_context()
        if extra_ca is not None:
            ctx.load_verify_locations(cafile=str(extra_ca))
        self._client = _Client(
            transport=_UpstreamTransport(ctx, max_connections, policy),
            follow_redirects=True,  # httpx drops Authorization on a cross-origin redirect
            trust_env=False,
            headers={"Accept-Encoding": OFFERED},  # only what decoding.py undoes
        )

    @contextmanager
    def stream(
        self,
        url: str,
        *,
        headers: Mapping[str, str],
        timeout: float,
        method: str = "GET",
        decoding: DecodeLimits | None = None,
    ) -> Iterator[httpx.Response]:
        """The upstream's answer to ``method url``, its body not read yet.  A GET or HEAD that
        broke on a reused connection before any answer came is sent once more, on a connection
        opened for it (``_FRESH``)."""
        attempts = 2 if method in ("GET", "HEAD") else 1
        for attempt in range(attempts):
            request = self._client.build_request(
                method,
                url,
                headers=dict(headers),
                timeout=httpx.Timeout(timeout),
                extensions={_DECODING: decoding or DecodeLimits(), _FRESH: attempt > 0},
            )
            try:
                response = self._client.send(request, stream=True)
                break
            except httpx.HTTPError as exc:
                if attempt + 1 < attempts and _broke_reused_connection(exc):
                    continue
                raise UpstreamError(_describe(exc)) from exc
        try:
            yield response
        except httpx.HTTPError as exc:
            raise UpstreamError(_describe(exc)) from exc
        finally:
            response.close()

    def close(self) -> None:
        self._client.close()


class Pace:
    """A download's deadline and minimum rate (``FetchLimits``), judged as its chunks arrive.

    The read ``timeout`` cuts an upstream that sends nothing; this cuts one that keeps a download
    alive by dripping (a byte every few seconds resets every read timeout): the average rate over
    each ``rate_window`` must reach ``min_rate``, and the whole download must end within
    ``deadline``.  ``now`` is the engine's clock, so a test can advance it instead of waiting.
    """

    def __init__(self, limits: FetchLimits, now: Callable[[], float] = time.time) -> None:
        self.limits = limits
        self._now = now
        self.started = now()
        self._mark = (self.started, 0)  # (time, bytes so far) at the start of the current window

    def body_starts(self) -> None:
        """The rate is judged from the first byte on: an upstream slow to answer is the read
        ``timeout``'s business (and the deadline's), not a slow transfer."""
        self._mark = (self._now(), 0)

    def check(self, received: int) -> None:
        """Raise UpstreamError if the download, ``received`` bytes so far, broke a limit."""
        limits, now = self.limits, self._now()
        if limits.deadline and now - self.started > limits.deadline:
            raise UpstreamError(f"gave up after the fetch deadline ({limits.deadline:g}s, fetch_deadline)")
        since, at = self._mark
        elapsed = now - since
        if limits.min_rate and elapsed >= limits.rate_window:
            if received - at < limits.min_rate * elapsed:
                raise UpstreamError(
                    f"too slow: {human_size(received - at)} in the last {elapsed:.0f}s, below the "
                    f"minimum {human_size(limits.min_rate)}/s (min_rate)"
                )
            self._mark = (now, received)


def iter_body(response: httpx.Response, pace: Pace | None = None) -> Iterator[bytes]:
    """The body with any Content-Encoding undone (within the request's ``DecodeLimits``, by the
    transport), turning transport errors into UpstreamError.

    The cache stores and verifies the content itself, never a transfer compression of it.
    Chunks come as the socket delivers them: re-cutting them to a fixed size
    copied every byte once more and cost a third of a cold miss.  With a ``pace``, a download
    that breaks its deadline or minimum rate raises UpstreamError too.
    """
    received = 0
    if pace is not None:
        pace.body_starts()
    try:
        for chunk in response.iter_raw():
            if pace is not None:
                received += len(chunk)
                pace.check(received)
            yield chunk
    except httpx.HTTPError as exc:
        raise UpstreamError(_describe(exc)) from exc
