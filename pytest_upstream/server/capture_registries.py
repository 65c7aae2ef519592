"""Registry-aware capture (docs/capture.md § Registries): what a request to one of a public
registry's hosts becomes, by the host's role in the built-in source table (config/sources.py).

``registry``
    npm, pypi: the path as it is, below the proxy's key (``/simple/<project>/`` is the pypi
    proxy's own layout).  maven: the path below the source URL's root (``/maven2/<path>`` ->
    ``<path>``), on either of Maven Central's names.  For these three a link the proxy rendered
    (``https://<host>/<key>/...``) comes back with the key in front and is taken as the proxy's.
    docker: ``/v2/<rest>`` as a keyless registry request of the proxy; ``/v2/``, the API check,
    is answered ``200`` with no challenge: the proxy does the upstream's token dance itself, so
    the client needs no token, and the client's ``Authorization`` is never sent upstream.
``files``
    pypi's files host: ``/packages/.../<filename>`` -> ``files/<project>/<filename>``, the file
    route: the file must be listed on its project's index page (fetched through the proxy) and
    match the hash published there.  The project comes from the file name, so only distribution
    files (wheels, sdists, eggs and their ``.metadata``) are served.
``token``
    docker's token realm: an anonymous token, answered here, for a client that asks for one
    before the API check (through capture it is never needed, and never sent upstream).
``blobs``
    docker's blob host: ``404``.  The registry redirects blob downloads there; the proxy follows
    those redirects itself, so a client through capture never gets one, and a signed URL from
    elsewhere names no repository the proxy could fetch the blob from.

A path a role does not serve is a ``404`` whose status line says so.
"""

from __future__ import annotations

import json
import time
from urllib.parse import unquote

from pytest_upstream.capture.hosts import RegistryRoute, registry_path
from pytest_upstream.formats.pypi_pages import parse_dist_filename
from pytest_upstream.messages import Reply

DOCKER_API = "/v2"
FILES_ROOT = "/packages/"
TOKEN_LIFETIME = 3600


def _not_served(host_role: str, why: str) -> Reply:
    reply = Reply.text(404, f"{why}\n")
    reply.reason = f"Not served through capture ({host_role})"
    return reply


def _token() -> Reply:
    """An anonymous token as a docker token realm answers (docs/docker.md § Upstream auth)."""
    issued = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    body = {"token": "captured", "access_token": "captured", "expires_in": TOKEN_LIFETIME}
    body["issued_at"] = issued
    return Reply(200, {"Content-Type": "application/json"}, body=json.dumps(body).encode())


def registry_target(route: RegistryRoute, raw_path: str) -> tuple[str, bool] | Reply:
    """(the path below the proxy's key, from its leading "/"; whether it is a keyless docker
    registry request) for a request to ``raw_path`` on a host of ``route``, or a reply answered
    here (see the module's docstring)."""
    fmt, key, role = route.proxy.format, route.proxy.key, route.role
    if role == "token":
        if raw_path.rstrip("/") != "/token":
            return _not_served("docker token realm", f"{raw_path}: a token realm serves /token only")
        return _token()
    if role == "blobs":
        return _not_served(
            "docker blob host",
            f"{raw_path}: blobs are fetched through the registry's /v2/<name>/blobs/<digest>; the proxy "
            "follows the registry's redirects to this host itself",
        )
    if role == "files":
        filename = raw_path.rsplit("/", 1)[-1]
        parsed = parse_dist_filename(unquote(filename)) if raw_path.startswith(FILES_ROOT) else None
        if parsed is None:
            return _not_served(
                "index files host", f"{raw_path}: only /packages/.../<distribution file> is served"
            )
        return f"/files/{parsed[0]}/{filename}", False
    if fmt == "docker":
        if raw_path != DOCKER_API and not raw_path.startswith(DOCKER_API + "/"):
            return _not_served("docker registry", f"{raw_path}: a registry serves {DOCKER_API}/ only")
        return "/" + raw_path[len(DOCKER_API) + 1 :], True
    path = registry_path(key, raw_path)
    if fmt == "maven" and path == raw_path:  # not a link the proxy rendered: the public layout
        root = route.source.path
        if not raw_path.startswith(root):
            return _not_served("maven repository", f"{raw_path}: the repository is under {root}")
        path = "/" + raw_path[len(root) :]
    return path, False
