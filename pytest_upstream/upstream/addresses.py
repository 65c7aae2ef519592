"""The SSRF guard: which hosts the proxy's upstream client may connect to.

An upstream chooses where the proxy goes next: a redirect, a file link on an index page, a token
realm.  A hostile or compromised one could point it at the proxy's own network (a database on
loopback, an admin page on 10.x, the cloud metadata service on 169.254.169.254) and have the
answer cached and served.  So every connection is judged here, at connect time, on the address
actually connected to:

- the configured upstreams' own origins (scheme-less host and port, as configured) are always
  reached, whatever they resolve to: a registry on the local network, or a test's on loopback;
- hosts in ``allow_hosts`` (a name, ``name:port``, an address or a network) are reached too;
- any other name is resolved here and refused if one of its addresses is not public (loopback,
  RFC 1918 private, link-local, unique-local, unspecified, reserved...); otherwise the client
  connects to exactly the addresses that were checked, so a name that resolves differently the
  second time (DNS rebinding) cannot slip past.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import httpcore

from pytest_upstream.upstream.errors import UpstreamError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class AddressRefused(UpstreamError):
    """A connection the SSRF guard refused."""


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


def _split_host_port(text: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]``, ``[v6]:port`` or a bare IPv6 address."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else None
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, int(port)
    return text, None


def why_not_public(ip: IPAddress) -> str:
    """Why an address is refused ("" when it is public)."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is not None:
            return why_not_public(embedded)
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address (cloud metadata services live there)"
    if isinstance(ip, ipaddress.IPv6Address) and ip in ipaddress.IPv6Network("fc00::/7"):
        return "a unique-local address"
    if ip.is_private:
        return "a private address"
    if ip.is_multicast or not ip.is_global:
        return "not a public address"
    return ""


class AddressPolicy:
    """What the upstream client may connect to: ``origins`` (the configured upstreams' URLs) and
    ``allow_hosts`` always, anything else only at public addresses."""

    def __init__(self, origins: Iterable[str], allow_hosts: Iterable[str] = ()) -> None:
        self._origins: set[tuple[str, int]] = set()
        for url in origins:
            self.add_origin(url)
        self._hosts: set[tuple[str, int | None]] = set()
        self._networks: list[tuple[IPNetwork, int | None]] = []
        for entry in allow_hosts:
            host, port = _split_host_port(entry.strip().lower())
            try:
                self._networks.append((ipaddress.ip_network(host, strict=False), port))
            except ValueError:
                self._hosts.add((host, port))

    def add_origin(self, url: str) -> None:
        """Trust one more upstream's origin (capture's per-host proxies, made as clients ask)."""
        parts = urlsplit(url)
        if parts.hostname:
            self._origins.add((parts.hostname.lower(), parts.port or _default_port(parts.scheme)))

    @staticmethod
    def check_entry(entry: str) -> str:
        """Why an ``allow_hosts`` entry is unusable ("" when it is fine)."""
        try:
            host, port = _split_host_port(entry.strip())
        except ValueError:
            return f"{entry!r} has a port that is not a number"
        if not host or (port is not None and not 0 < port < 65536):
            return f"{entry!r} is not a host, host:port, address or network"
        return ""

    def trusted(self, host: str, port: int) -> bool:
        """A configured upstream's origin, or a name listed in ``allow_hosts``."""
        host = host.lower()
        return (host, port) in self._origins or (host, None) in self._hosts or (host, port) in self._hosts

    def refusal(self, host: str, port: int, ip: IPAddress) -> str:
        """Why connecting to ``ip`` (resolved from ``host``) is refused ("" when allowed)."""
        if any(ip in net and allowed in (None, port) for net, allowed in self._networks):
            return ""
        why = why_not_public(ip)
        if not why:
            return ""
        shown = host if host == str(ip) else f"{host} ({ip})"
        return (
            f"refused to connect to {shown} port {port}: {why}, and not a configured upstream's "
            "origin; list it in allow_hosts to allow it"
        )

    def resolve(self, host: str, port: int) -> list[str]:
        """The addresses to connect to for ``host``: every one checked; raises AddressRefused."""
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        addresses: list[str] = []
        for _family, _type, _proto, _name, sockaddr in infos:
            text = str(sockaddr[0]).split("%", 1)[0]
            if text not in addresses:
                addresses.append(text)
        for text in addresses:
            if why := self.refusal(host, port, ipaddress.ip_address(text)):
                raise AddressRefused(why)
        return addresses


class GuardedBackend(httpcore.SyncBackend):
    """httpcore's network backend, connecting only where ``AddressPolicy`` allows."""

    def __init__(self, policy: AddressPolicy) -> None:
        self.policy = policy

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        if self.policy.trusted(host, port):
            return super().connect_tcp(host, port, timeout, local_address, socket_options)
        failure: Exception | None = None
        for address in self.policy.resolve(host, port):  # connect to what was checked, nothing else
            try:
                return super().connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:
                failure = exc
        raise failure or httpcore.ConnectError(f"{host} has no address")
