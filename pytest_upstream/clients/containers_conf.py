"""A containers-registries.conf(5) that sends pulls through a docker proxy (podman, skopeo, buildah).

Written by ``UpstreamProxy.registries_conf``; see docs/docker.md.
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

from pytest_upstream.config.settings import ProxyDefinition
from pytest_upstream.config.sources import IMAGE_DOMAINS


def image_domain(proxy: ProxyDefinition) -> str:
    """The registry part of image names that the upstream of ``proxy`` serves (``host[:port]``)."""
    return IMAGE_DOMAINS.get(proxy.source) or urlsplit(proxy.url).netloc


def registries_conf_text(proxy: ProxyDefinition, proxy_host: str) -> str:
    """``proxy_host`` is the proxy's ``host:port``; the mirror is ``<proxy_host>/<key>``."""
    domain = image_domain(proxy)
    mirror = f"{proxy_host}/{proxy.key}"
    upstream_insecure = urlsplit(proxy.url).scheme == "http"
    q = json.dumps  # a TOML basic string is a JSON string for these characters
    lines = [
        f"# pytest-upstream: pull {domain}/... through the upstream proxy {proxy.key!r} at {mirror}.",
        f"unqualified-search-registries = [{q(domain)}]",
        "",
        "[[registry]]",
        f"prefix = {q(domain)}",
        f"location = {q(domain)}",
        f"insecure = {'true' if upstream_insecure else 'false'}",
        "",
        "[[registry.mirror]]",
        f"location = {q(mirror)}",
        "insecure = true  # the proxy speaks plain HTTP on loopback",
        "",
        "# The proxy addressed directly: <proxy_host>/<key>/<name>:<tag>",
        "[[registry]]",
        f"location = {q(proxy_host)}",
        "insecure = true",
        "",
    ]
    return "\n".join(lines)
