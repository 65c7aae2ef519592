"""Which hosts capture intercepts, and the proxy key and generic proxy each one gets.

A captured request is answered as a request to a generic proxy (formats/generic.py) made for its
host on first use; it is in no ``Settings``, but its records, replays, lock file entries and
report lines are those of any key.  The key is derived from the origin (docs/capture.md):

    https://files.example.org/      ->  files.example.org
    https://files.example.org:8443/ ->  files.example.org_8443
    http://files.example.org/       ->  files.example.org_80      (plain HTTP: the port is kept)
    https://127.0.0.2:8443/         ->  ip-127.0.0.2_8443
    https://[::1]:8443/             ->  ip6-0000-0000-0000-0000-0000-0000-0000-0001_8443

that is: the host lower-cased; ``ip-`` before an IPv4 address and ``ip6-`` before an IPv6 one
(written out in full, ``:`` as ``-``), since a key starts with a letter; then ``_<port>`` unless
the port is HTTPS's 443.  A name the key grammar (config/keys.py) still refuses (an underscore,
too long, ``v2``) becomes ``host-`` and 16 hex digits of its sha256.

Registry-aware capture: a public registry's host (config/sources.py ``CAPTURE_REGISTRY_HOSTS``,
derived from the built-in source table) is answered by the configured proxy of that built-in
source instead, under its own key, as the host's role there says (server/capture_registries.py).
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass
from fnmatch import fnmatchcase

from pytest_upstream.config.capture import CaptureSettings
from pytest_upstream.config.keys import key_error
from pytest_upstream.config.settings import ProxyDefinition
from pytest_upstream.config.sources import BUILTIN_SOURCES, CAPTURE_REGISTRY_HOSTS, BuiltinSource


def host_key(host: str, port: int, scheme: str = "https") -> str:
    """The proxy key of a captured origin (see the module's docstring)."""
    name = host.lower().strip("[]")
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        base = name
    else:
        base = f"ip-{ip}" if ip.version == 4 else "ip6-" + ip.exploded.replace(":", "-")
    key = base if scheme == "https" and port == 443 else f"{base}_{port}"
    if "_" not in base and key_error(key) is None:  # "_" only before the port: no two origins share a key
        return key
    return "host-" + hashlib.sha256(f"{scheme}://{name}:{port}".encode()).hexdigest()[:16]


def origin_url(host: str, port: int, scheme: str = "https") -> str:
    """``scheme://host[:port]/``, the default port left out."""
    shown = f"[{host}]" if ":" in host else host
    default = 443 if scheme == "https" else 80
    return f"{scheme}://{shown}/" if port == default else f"{scheme}://{shown}:{port}/"


def captured(settings: CaptureSettings, host: str) -> bool:
    """Whether capture intercepts ``host`` (a name or an address, matched lower-cased against
    ``capture_hosts`` and then ``capture_exclude``, shell-style globs)."""
    if not settings.enabled:
        return False
    name = host.lower().strip("[]")
    if not any(fnmatchcase(name, pattern) for pattern in settings.hosts):
        return False
    return not any(fnmatchcase(name, pattern) for pattern in settings.exclude)


def host_proxy(host: str, port: int, scheme: str, template: ProxyDefinition | None = None) -> ProxyDefinition:
    """The generic proxy that answers a captured origin's requests.  ``template`` lends the
    table's defaults (TTL, timeout), when one is configured."""
    key = host_key(host, port, scheme)
    url = origin_url(host.lower().strip("[]"), port, scheme)
    if template is None:
        return ProxyDefinition(key=key, source="custom", format="generic", url=url)
    return ProxyDefinition(
        key=key,
        source="custom",
        format="generic",
        url=url,
        metadata_ttl=template.metadata_ttl,
        timeout=template.timeout,
    )


@dataclass(frozen=True)
class RegistryRoute:
    """A public registry's host as capture answers it: by ``proxy`` (configured, of ``source``),
    in the host's ``role`` (config/sources.py ``CAPTURE_ROLES``)."""

    proxy: ProxyDefinition
    source: BuiltinSource
    role: str


def registry_route(proxies: tuple[ProxyDefinition, ...], host: str, port: int) -> RegistryRoute | None:
    """How a public registry's host (``CAPTURE_REGISTRY_HOSTS``, HTTPS on 443 only) is answered:
    by the first configured proxy of its built-in source, or None (then the host is generic)."""
    found = CAPTURE_REGISTRY_HOSTS.get(host.lower()) if port == 443 else None
    if found is None:
        return None
    name, role = found
    proxy = next((p for p in proxies if p.source == name), None)
    return None if proxy is None else RegistryRoute(proxy, BUILTIN_SOURCES[name], role)


def registry_path(key: str, raw_path: str) -> str:
    """The path below a registry proxy's key for a request to its public host: the registry's own
    layout is the proxy's (``/simple/<project>/``, ``/<package>``), and a link the proxy
    rendered (``https://<host>/<key>/files/...``) comes back with the key in front."""
    prefix = f"/{key}/"
    return raw_path[len(prefix) - 1 :] if raw_path.startswith(prefix) else raw_path
