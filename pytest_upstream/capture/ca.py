"""The certificate authority of one cache, and the leaf certificates it signs per host.

Capture terminates the TLS of a client's ``CONNECT`` tunnel, so the client must trust a
certificate for the host it asked for: the proxy presents a leaf minted for that host (its one
SAN is the host name or IP address) and signed by a CA that the session exports to the
clients' CA variables (docs/capture.md).  The CA is made once per cache directory, so records
and replays in the same cache see the same CA, and a bundle once exported stays valid.

On disk, in ``<cache>/capture/`` (a directory only its owner can enter):

    ca.pem          the CA key and certificate in one file, mode 0600: never printed or exported
    ca-cert.pem     the certificate alone: what clients that add roots are given
    ca-bundle.pem   the system's roots plus the certificate: for clients that replace their roots

Two processes starting at once (xdist workers, parallel jobs) each write their own candidate and
``link`` it to ``ca.pem``; a link fails when the name exists, so exactly one wins and the loser
reads the winner's.  The public files are derived from ``ca.pem`` and rewritten atomically when
they differ.  Leaves live in memory only (bounded, least recently used dropped): one EC key
shared by every leaf of a process, a certificate per host.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import secrets
import ssl
import threading
from collections import OrderedDict
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pytest_upstream.store.errors import CacheError
from pytest_upstream.store.files import AtomicFile, atomic_write

CA_DIR = "capture"
CA_FILE = "ca.pem"
CERT_FILE = "ca-cert.pem"
BUNDLE_FILE = "ca-bundle.pem"
CA_NAME = "pytest-upstream capture CA"
CA_DAYS = 3650
LEAF_DAYS = 30
MAX_LEAVES = 256  # per process: hosts a test run talks to


class CAError(CacheError):
    """The CA cannot be created or read (an unreadable or corrupt ``ca.pem``, a cache directory
    another user made): a cache error, which ``serve`` and the plugin report in one line."""


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _new_ca() -> bytes:
    """A fresh CA: key and certificate, PEM, in one document."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"pytest-upstream {secrets.token_hex(4)}"),
        ]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem + cert.public_bytes(serialization.Encoding.PEM)


def system_roots() -> bytes:
    """The system's trusted roots (OpenSSL's default file), else certifi's when installed, else
    nothing (the bundle then holds our CA alone, and says so in docs/capture.md)."""
    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile):
        if candidate and os.path.isfile(candidate):
            with contextlib.suppress(OSError):
                return Path(candidate).read_bytes()
    try:
        import certifi  # an optional fallback, present wherever requests is
    except ImportError:
        return b""
    with contextlib.suppress(OSError):
        return Path(certifi.where()).read_bytes()
    return b""


class CertificateAuthority:
    """The cache's CA (created on first use) and this process's leaves."""

    def __init__(self, cache_dir: Path) -> None:
        self.directory = Path(cache_dir) / CA_DIR
        self.cert_path = self.directory / CERT_FILE
        self.bundle_path = self.directory / BUNDLE_FILE
        pem = self._load_or_create()
        try:
            self._key = serialization.load_pem_private_key(pem, password=None)
            self._cert = x509.load_pem_x509_certificate(pem)
        except ValueError as exc:
            raise CAError(f"{self.directory / CA_FILE} is not a CA key and certificate: {exc}") from None
        if not isinstance(self._key, ec.EllipticCurvePrivateKey):
            raise CAError(f"{self.directory / CA_FILE} does not hold an EC key")
        self.cert_pem = self._cert.public_bytes(serialization.Encoding.PEM)
        self._write_public()
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._leaves: OrderedDict[str, ssl.SSLContext] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def certificate(self) -> x509.Certificate:
        """The CA's certificate (public)."""
        return self._cert

    # -- the CA on disk ------------------------------------------------------------------------
    def _load_or_create(self) -> bytes:
        target = self.directory / CA_FILE
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                os.chmod(self.directory, 0o700)
            return target.read_bytes()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise CAError(f"cannot read the capture CA {target}: {exc.strerror}") from None
        try:
            return self._create(target)
        except OSError as exc:
            raise CAError(f"cannot create the capture CA in {self.directory}: {exc.strerror}") from None

    def _create(self, target: Path) -> bytes:
        candidate = AtomicFile(tmp_dir=self.directory, stem="ca")
        try:
            os.chmod(candidate.path, 0o600)
            candidate.write(_new_ca())
            candidate.sync()
            with contextlib.suppress(FileExistsError):  # another process won: use its CA
                os.link(candidate.path, target)
        finally:
            candidate.discard()
        return target.read_bytes()

    def _write_public(self) -> None:
        """``ca-cert.pem`` and ``ca-bundle.pem``, rewritten (atomically) only when they differ."""
        bundle = system_roots()
        if bundle and not bundle.endswith(b"\n"):
            bundle += b"\n"
        for path, data in ((self.cert_path, self.cert_pem), (self.bundle_path, bundle + self.cert_pem)):
            try:
                same = path.read_bytes() == data
            except OSError:
                same = False
            if not same:
                atomic_write(path, data, mode=0o644)

    # -- leaves --------------------------------------------------------------------------------
    def server_context(self, host: str) -> ssl.SSLContext:
        """A TLS server context presenting a leaf for ``host`` (a name or an IP address),
        minted on first use and kept (at most ``MAX_LEAVES``, least recently used dropped)."""
        host = host.lower().strip("[]")
        with self._lock:
            ctx = self._leaves.get(host)
            if ctx is not None:
                self._leaves.move_to_end(host)
                return ctx
        ctx = self._mint(host)
        with self._lock:
            self._leaves[host] = ctx
            while len(self._leaves) > MAX_LEAVES:
                self._leaves.popitem(last=False)
        return ctx

    def leaf_pem(self, host: str) -> bytes:
        """The certificate a leaf for ``host`` would carry (for tests and ``describe``)."""
        return self._leaf_cert(host).public_bytes(serialization.Encoding.PEM)

    def _leaf_cert(self, host: str) -> x509.Certificate:
        try:
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            san = x509.DNSName(host)
        now = _now()
        assert isinstance(self._key, ec.EllipticCurvePrivateKey)
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64])]))
            .issuer_name(self._cert.subject)
            .public_key(self._leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=LEAF_DAYS))
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )

    def _mint(self, host: str) -> ssl.SSLContext:
        cert = self._leaf_cert(host)
        chain = cert.public_bytes(serialization.Encoding.PEM) + self.cert_pem
        key = self._leaf_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["http/1.1"])
        # load_cert_chain reads files only: a temporary one in the owner-only directory, gone at once
        scratch = AtomicFile(tmp_dir=self.directory, stem="leaf", durable=False)
        try:
            os.chmod(scratch.path, 0o600)
            scratch.write(key + chain)
            scratch.flush()
            ctx.load_cert_chain(scratch.path)
        finally:
            scratch.discard()
        return ctx
