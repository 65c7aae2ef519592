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
    # The registry's other public hosts a client may name, each with its role for capture
    # (``CAPTURE_ROLES``); the URL's own host is ``registry`` and each auth host ``token``.
    other_hosts: tuple[tuple[str, str], ...] = ()

    @property
    def host(self) -> str:
        """The host of the registry's URL, the one a client names for its API."""
        return self.url.split("://", 1)[1].split("/", 1)[0]

    @property
    def path(self) -> str:
        """The path of the registry's URL ("/maven2/"): the layout root on every one of its hosts."""
        rest = self.url.split("://", 1)[1]
        return "/" + rest.split("/", 1)[1] if "/" in rest else "/"


BUILTIN_SOURCES: dict[str, BuiltinSource] = {
    s.name: s
    for s in (
        BuiltinSource("pypi", "pypi", "https://pypi.org/simple/", (), (("files.pythonhosted.org", "files"),)),
        BuiltinSource("npm", "npm", "https://registry.npmjs.org/"),
        BuiltinSource(
            "dockerhub",
            "docker",
            "https://registry-1.docker.io/",
            ("auth.docker.io",),
            (("production.cloudflare.docker.com", "blobs"),),
        ),
        BuiltinSource(
            "maven-central",
            "maven",
            "https://repo.maven.apache.org/maven2/",
            (),
            (("repo1.maven.org", "registry"),),
        ),
    )
}

SOURCES = (*BUILTIN_SOURCES, "custom")

# Registry-aware capture (docs/capture.md): a captured HTTPS request to one of a built-in
# source's public hosts is answered by the configured proxy of that source (its format's logic,
# its key), not by a generic proxy of the host.  The proxy's own url decides where it is fetched
# from: pointed at a mirror (or a test's server), the host's requests go there.  The role says
# what the host serves:
#   registry  the registry's API in the source URL's layout (pypi's index, npm, docker's /v2/,
#             Maven Central under both of its names)
#   files     pypi's files host: /packages/.../<filename>, answered by the file route
#   token     docker's token realm: answered locally (the proxy does the upstream's token dance)
#   blobs     docker's blob host (where the registry redirects blobs): refused, as the proxy
#             follows those redirects itself and a client through capture never sees one
CAPTURE_ROLES = ("registry", "files", "token", "blobs")


def _capture_hosts() -> dict[str, tuple[str, str]]:
    hosts: dict[str, tuple[str, str]] = {}
    for source in BUILTIN_SOURCES.values():
        hosts[source.host] = (source.name, "registry")
        hosts.update((host, (source.name, "token")) for host in source.auth_hosts)
        hosts.update((host, (source.name, role)) for host, role in source.other_hosts)
    return hosts


# host -> (built-in source, role), derived from the table above
CAPTURE_REGISTRY_HOSTS: dict[str, tuple[str, str]] = _capture_hosts()

# The domain that container tools (podman, skopeo, containerd) use in image names
# for a built-in registry, when it differs from the host of its URL.
IMAGE_DOMAINS = {"dockerhub": "docker.io"}
