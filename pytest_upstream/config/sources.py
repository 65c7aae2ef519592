"""Built-in upstream sources.

This table is the one place in the project that names public registries.
"""

from __future__ import annotations

from dataclasses import dataclass

FORMATS = ("pypi", "npm", "docker", "maven", "generic")


@dataclass(frozen=True)
class BuiltinSource:
    name: str
    format: str
    url: str
    # Hosts other than the URL's that this registry's token flow sends credentials to (a
    # docker realm on another origin); a configured proxy adds its own with ``auth_hosts``.
    auth_hosts: tuple[str, ...] = ()


BUILTIN_SOURCES: dict[str, BuiltinSource] = {
    s.name: s
    for s in (
        BuiltinSource("pypi", "pypi", "https://pypi.org/simple/"),
        BuiltinSource("npm", "npm", "https://registry.npmjs.org/"),
        BuiltinSource("dockerhub", "docker", "https://registry-1.docker.io/", ("auth.docker.io",)),
        BuiltinSource("maven-central", "maven", "https://repo.maven.apache.org/maven2/"),
    )
}

SOURCES = (*BUILTIN_SOURCES, "custom")

# Registry-aware capture (docs/capture.md): a captured HTTPS request to one of these public hosts
# is answered by the configured proxy of that built-in source (its format's logic, its key), not
# by a generic proxy of the host.  The proxy's own url decides where it is fetched from: pointed
# at a mirror (or a test's server), the host's requests go there.
CAPTURE_REGISTRY_HOSTS = {"pypi.org": "pypi", "registry.npmjs.org": "npm"}

# The domain that container tools (podman, skopeo, containerd) use in image names
# for a built-in registry, when it differs from the host of its URL.
IMAGE_DOMAINS = {"dockerhub": "docker.io"}
