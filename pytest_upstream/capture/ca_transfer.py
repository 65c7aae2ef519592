"""Moving a cache's capture CA between machines, only when asked (docs/capture.md § One CA for a fleet).

Each cache makes its own CA (``ca.py``), which is right for one machine.  A fleet of CI runners
that bakes one trusted root into its images, or that wants the bundle a test exported yesterday
to stay valid on a fresh runner, needs the same CA everywhere: ``cache export-ca FILE`` writes
the key and certificate to a new file (mode 0600, never over an existing file, never to the
terminal), and ``cache import-ca FILE`` installs one into another cache, where it is kept in a
CI secret in between.

An imported CA is checked before anything is written: one EC private key and one certificate
that is a CA (basic constraints), whose public key is the key's, valid now and for at least a
day more.  A cache that already has a different CA keeps it unless ``replace`` is given: the
clients of that cache trust the old one, and swapping it silently would break them.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pytest_upstream.capture.ca import CA_DIR, CA_FILE, CAError, CertificateAuthority
from pytest_upstream.store.files import AtomicFile

MAX_CA_FILE = 64 * 1024  # a key and a certificate are a few KiB; anything bigger is not one


def export_ca(cache_dir: Path, dest: Path) -> CertificateAuthority:
    """Write the cache's CA (made now if the cache has none) to ``dest``, a new file, 0600."""
    ca = CertificateAuthority(cache_dir)
    pem = (Path(cache_dir) / CA_DIR / CA_FILE).read_bytes()
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise CAError(f"{dest} exists: the CA is written only to a new file") from None
    except OSError as exc:
        raise CAError(f"cannot write {dest}: {exc.strerror}") from None
    with os.fdopen(fd, "wb") as out:
        out.write(pem)
        out.flush()
        os.fsync(out.fileno())
    return ca


def check_ca(pem: bytes, source: str) -> x509.Certificate:
    """The certificate of ``pem`` if it holds a usable CA key and certificate, else ``CAError``."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
        cert = x509.load_pem_x509_certificate(pem)
    except (ValueError, TypeError):
        raise CAError(f"{source} is not an unencrypted PEM private key followed by its certificate") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CAError(f"{source}: the key is not an EC key (the capture CA signs with EC P-256)")
    if cert.public_key() != key.public_key():
        raise CAError(f"{source}: the certificate is not the key's")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise CAError(f"{source}: the certificate is not a CA (no basic constraints with CA:TRUE)")
    now = datetime.datetime.now(datetime.UTC)
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc - datetime.timedelta(days=1):
        until = f"{cert.not_valid_after_utc:%Y-%m-%d}"
        raise CAError(f"{source}: the certificate is not valid now and for a day more (until {until})")
    return cert


def import_ca(cache_dir: Path, src: Path, *, replace: bool = False) -> CertificateAuthority:
    """Install the CA in ``src`` as the cache's; an existing different CA is kept unless ``replace``."""
    try:
        with open(src, "rb") as f:
            pem = f.read(MAX_CA_FILE + 1)
    except OSError as exc:
        raise CAError(f"cannot read {src}: {exc.strerror}") from None
    if len(pem) > MAX_CA_FILE:
        raise CAError(f"{src} is over {MAX_CA_FILE // 1024} KiB: not a CA key and certificate")
    check_ca(pem, str(src))
    directory = Path(cache_dir) / CA_DIR
    target = directory / CA_FILE
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            os.chmod(directory, 0o700)
        try:
            current = target.read_bytes()
        except FileNotFoundError:
            current = None
        if current is not None and current != pem and not replace:
            raise CAError(
                f"{target} holds another CA, which this cache's clients may trust: pass --replace to swap it"
            )
        if current != pem:
            candidate = AtomicFile(tmp_dir=directory, stem="ca")
            try:
                os.chmod(candidate.path, 0o600)
                candidate.write(pem)
                candidate.sync()
                if current is None:
                    os.link(candidate.path, target)  # fails if a process made one meanwhile
                else:
                    candidate.commit(target)
            finally:
                candidate.discard()
    except FileExistsError:
        raise CAError(f"{target} was created meanwhile by another process: run the import again") from None
    except OSError as exc:
        raise CAError(f"cannot install the CA in {directory}: {exc.strerror}") from None
    return CertificateAuthority(cache_dir)  # rewrites ca-cert.pem and ca-bundle.pem
