"""Block network connections that do not go through the proxy (``--upstream-block-network``).

While installed, a connection from this process to anything but loopback
raises ``NetworkBlockedError`` naming the host, before any packet is sent
and before a host name is resolved.  Patched: ``socket.socket.connect``,
``socket.socket.connect_ex`` (which ``ssl``, ``http.client``, asyncio and
httpcore all end up in) and ``socket.create_connection`` (checked before its
DNS look-up).  The proxy's own threads are exempt: in record mode they must
reach the upstreams.  Standard library only.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections.abc import Callable
from typing import Any

_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
_INET = (socket.AF_INET, socket.AF_INET6)
_exempt = threading.local()


class NetworkBlockedError(RuntimeError):
    """A test tried to reach a host other than loopback while the network is blocked.

    A RuntimeError, not an OSError, so that client code that retries or falls
    back on connection errors does not swallow it.
    """


def exempt_current_thread() -> None:
    """Let this thread connect anywhere (the proxy's request threads call this)."""
    _exempt.on = True


def is_loopback(host: str | bytes) -> bool:
    name = (host.decode("ascii", "replace") if isinstance(host, bytes) else host).strip("[]").lower()
    if name in _LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        ip = ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return False  # a host name: not resolved, so nothing leaves the machine
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


class NetworkGuard:
    """Installed for a session (or one test); ``blocked`` lists (host:port, test) of refused attempts."""

    def __init__(self, current_test: Callable[[], str] = lambda: "") -> None:
        self.current_test = current_test
        self.blocked: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        self._saved: dict[str, Any] = {}

    @property
    def installed(self) -> bool:
        return bool(self._saved)

    def check(self, host: str | bytes, port: object) -> None:
        """Raise NetworkBlockedError unless ``host`` is loopback or this thread is exempt."""
        if getattr(_exempt, "on", False) or is_loopback(host):
            return
        shown = host.decode("ascii", "replace") if isinstance(host, bytes) else host
        target = f"[{shown}]:{port}" if ":" in shown else f"{shown}:{port}"
        test = self.current_test()
        with self._lock:
            self.blocked.append((target, test))
        raise NetworkBlockedError(
            f"pytest-upstream blocked a network connection to {target}"
            + (f" from {test}" if test else "")
            + ": the network is blocked (--upstream-block-network, on by default in replay mode); "
            "only loopback may be reached, so fetch through the upstream proxy instead"
        )

    def install(self) -> None:
        if self._saved:
            return
        original_connect = socket.socket.connect
        original_connect_ex = socket.socket.connect_ex
        original_create = socket.create_connection
        self._saved = {
            "connect": socket.socket.__dict__.get("connect"),
            "connect_ex": socket.socket.__dict__.get("connect_ex"),
            "create_connection": original_create,
        }
        guard = self

        def _check_address(sock: socket.socket, address: Any) -> None:
            if sock.family in _INET and isinstance(address, tuple) and address:
                guard.check(address[0], address[1] if len(address) > 1 else "?")

        def connect(self: socket.socket, address: Any) -> None:
            _check_address(self, address)
            original_connect(self, address)

        def connect_ex(self: socket.socket, address: Any) -> int:
            _check_address(self, address)
            return original_connect_ex(self, address)

        def create_connection(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
            guard.check(address[0], address[1])
            return original_create(address, *args, **kwargs)

        socket.socket.connect = connect  # type: ignore[method-assign,assignment]
        socket.socket.connect_ex = connect_ex  # type: ignore[method-assign,assignment]
        socket.create_connection = create_connection  # type: ignore[assignment]

    def uninstall(self) -> None:
        if not self._saved:
            return
        for name in ("connect", "connect_ex"):
            if self._saved[name] is None:
                delattr(socket.socket, name)  # inherited from _socket.socket again
            else:
                setattr(socket.socket, name, self._saved[name])
        socket.create_connection = self._saved["create_connection"]
        self._saved = {}
