"""Capture's CA (capture/ca.py) and host mapping (capture/hosts.py): one CA per cache, made once
even by racing processes, its key private; leaves per host that a client verifying against the
CA accepts; the documented key mapping."""

from __future__ import annotations

import multiprocessing
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509

from pytest_upstream.capture.ca import CA_FILE, CertificateAuthority
from pytest_upstream.capture.hosts import captured, host_key, host_proxy
from pytest_upstream.config.capture import CaptureSettings, parse_capture
from pytest_upstream.config.checks import ConfigError
from pytest_upstream.config.keys import key_error


def _make(cache: str) -> None:
    CertificateAuthority(Path(cache))


def test_ca_is_made_once_with_a_private_key(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path)
    key_file = tmp_path / "capture" / CA_FILE
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    assert b"PRIVATE KEY" in key_file.read_bytes()
    assert b"PRIVATE KEY" not in ca.cert_path.read_bytes()
    assert b"PRIVATE KEY" not in ca.bundle_path.read_bytes()
    assert ca.bundle_path.read_bytes().endswith(ca.cert_pem)
    again = CertificateAuthority(tmp_path)
    assert again.cert_pem == ca.cert_pem
    assert not [p for p in key_file.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_racing_processes_agree_on_one_ca(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_make, args=(str(tmp_path),)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    certs = {CertificateAuthority(tmp_path).cert_pem for _ in range(2)}
    assert len(certs) == 1
    assert (tmp_path / "capture" / "ca-cert.pem").read_bytes() in certs


@pytest.mark.parametrize("host", ["files.example.org", "127.0.0.2", "::1"])
def test_a_leaf_names_its_host_and_verifies_against_the_ca(tmp_path: Path, host: str) -> None:
    ca = CertificateAuthority(tmp_path)
    leaf = x509.load_pem_x509_certificate(ca.leaf_pem(host))
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(v) for v in names.get_values_for_type(x509.IPAddress)] + names.get_values_for_type(
        x509.DNSName
    ) == [host]
    server_ctx = ca.server_context(host)
    assert ca.server_context(host.upper()) is server_ctx  # minted once, reused
    client_ctx = ssl.create_default_context(cafile=str(ca.cert_path))
    a, b = socket.socketpair()
    result: list[str] = []

    def serve() -> None:
        with server_ctx.wrap_socket(a, server_side=True) as tls:
            tls.sendall(b"hello")

    thread = threading.Thread(target=serve)
    thread.start()
    with client_ctx.wrap_socket(b, server_hostname=host) as tls:
        result.append(tls.recv(5).decode())
    thread.join(10)
    assert result == ["hello"]


def test_a_leaf_for_another_host_is_refused(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path)
    client_ctx = ssl.create_default_context(cafile=str(ca.cert_path))
    a, b = socket.socketpair()

    def serve() -> None:
        try:
            with ca.server_context("other.example").wrap_socket(a, server_side=True):
                pass
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve)
    thread.start()
    with pytest.raises(ssl.SSLCertVerificationError):
        client_ctx.wrap_socket(b, server_hostname="files.example.org")
    b.close()
    thread.join(10)


@pytest.mark.parametrize(
    ("host", "port", "scheme", "key"),
    [
        ("files.example.org", 443, "https", "files.example.org"),
        ("Files.Example.ORG", 8443, "https", "files.example.org_8443"),
        ("files.example.org", 80, "http", "files.example.org_80"),
        ("127.0.0.2", 8443, "https", "ip-127.0.0.2_8443"),
        ("[::1]", 8443, "https", "ip6-0000-0000-0000-0000-0000-0000-0000-0001_8443"),
    ],
)
def test_documented_key_mapping(host: str, port: int, scheme: str, key: str) -> None:
    assert host_key(host, port, scheme) == key
    assert key_error(key) is None


@pytest.mark.parametrize("host", ["under_score.example", "v2", "x" * 70 + ".example", "-bad.example"])
def test_names_the_grammar_refuses_get_a_hashed_key(host: str) -> None:
    key = host_key(host, 443)
    assert key.startswith("host-") and key_error(key) is None
    assert key != host_key(host, 444)


def test_host_proxy_is_generic_at_the_origin() -> None:
    proxy = host_proxy("127.0.0.2", 8443, "https")
    assert (proxy.key, proxy.format, proxy.url) == ("ip-127.0.0.2_8443", "generic", "https://127.0.0.2:8443/")
    assert host_proxy("files.example.org", 443, "https").url == "https://files.example.org/"


def test_capture_hosts_and_exclude(tmp_path: Path) -> None:
    table = {
        "capture": True,
        "capture_hosts": ["*.example.org", "127.0.0.*"],
        "capture_exclude": ["x.example.org"],
    }
    settings: CaptureSettings = parse_capture(table, "t", tmp_path)["capture"]
    assert captured(settings, "a.example.org") and captured(settings, "127.0.0.2")
    assert not captured(settings, "x.example.org") and not captured(settings, "example.com")
    assert not captured(CaptureSettings(), "a.example.org")  # off by default
    with pytest.raises(ConfigError, match="upstream_ca"):
        parse_capture({"upstream_ca": "missing.pem"}, "t", tmp_path)
    with pytest.raises(ConfigError, match="capture must be"):
        parse_capture({"capture": "yes"}, "t", tmp_path)


def test_a_corrupt_ca_is_a_cache_error(tmp_path: Path) -> None:
    from pytest_upstream.store.errors import CacheError

    (tmp_path / "capture").mkdir()
    (tmp_path / "capture" / CA_FILE).write_bytes(b"not a pem")
    with pytest.raises(CacheError, match="is not a CA key and certificate"):
        CertificateAuthority(tmp_path)
