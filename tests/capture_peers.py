"""An HTTPS upstream on 127.0.0.2 with its own CA (made by capture's own CA code in another
directory), for the capture tests."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Self

from cryptography.hazmat.primitives import serialization

from pytest_upstream.capture.ca import CertificateAuthority
from pytest_upstream.config.sources import BUILTIN_SOURCES
from tests.upstreams import Upstream, _Handler, _Server

HOST = "127.0.0.2"  # not in the plugin's NO_PROXY (127.0.0.1, localhost): clients go through the proxy


def tls_files(authority: CertificateAuthority, host: str, directory: Path) -> tuple[Path, Path]:
    """(certificate chain, key) files of a leaf for ``host`` signed by ``authority``, for a peer
    server that reads its certificate from files (docker-registry)."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "cert.pem", directory / "key.pem"
    cert.write_bytes(authority.leaf_pem(host) + authority.cert_pem)
    key.write_bytes(
        authority._leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    key.chmod(0o600)
    return cert, key


def role_host(source: str, role: str) -> str:
    """The public host a built-in source's table names for ``role`` (config/sources.py), so tests
    name no public host themselves."""
    builtin = BUILTIN_SOURCES[source]
    hosts = [builtin.host] if role == "registry" else []
    hosts += [host for host, r in builtin.other_hosts if r == role]
    hosts += list(builtin.auth_hosts) if role == "token" else []
    return hosts[0]


class TlsUpstream(Upstream):
    """``Upstream`` over HTTPS on ``HOST``; ``ca_file`` is the CA its certificate chains to."""

    def __init__(self, ca_dir: Path) -> None:
        super().__init__()
        self.authority = CertificateAuthority(ca_dir)
        self.ca_file = self.authority.cert_path

    @property
    def url(self) -> str:
        return f"https://{HOST}:{self.port}"

    def start(self) -> Self:
        self.stopped = False
        self._server = _Server((HOST, self.port), _Handler)
        self._server.upstream = self
        self._server.socket = self.authority.server_context(HOST).wrap_socket(
            self._server.socket, server_side=True
        )
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, args=(0.01,), daemon=True).start()
        return self
