"""One capture CA for a fleet (capture/ca_transfer.py, ``cache export-ca`` / ``cache import-ca``):
exported only when asked, to a new 0600 file, the key never printed; imported only when it is a
usable CA, never silently over another one; the importing cache's leaves chain to it."""

from __future__ import annotations

import datetime
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from pytest_upstream.capture.ca import CA_FILE, CAError, CertificateAuthority
from pytest_upstream.capture.ca_transfer import MAX_CA_FILE, export_ca, import_ca
from pytest_upstream.cli.main import main


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, cert: x509.Certificate) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ) + cert.public_bytes(serialization.Encoding.PEM)


def _cert(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
    *,
    ca: bool = True,
    days: tuple[int, int] = (-1, 365),
    signer: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key((signer or key).public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(days=days[0]))
        .not_valid_after(now + datetime.timedelta(days=days[1]))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


def test_export_then_import_gives_the_same_ca_and_leaves_that_chain_to_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = tmp_path / "ca-secret.pem"
    code, out, err = _cli(capsys, "cache", "export-ca", "--cache", str(tmp_path / "a"), str(secret))
    assert code == 0, err
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert secret.read_bytes() == (tmp_path / "a" / "capture" / CA_FILE).read_bytes()
    assert "PRIVATE" not in out and "sha256" in out  # public facts only

    code, out, err = _cli(capsys, "cache", "import-ca", "--cache", str(tmp_path / "b"), str(secret))
    assert code == 0, err
    assert "PRIVATE" not in out
    a_cert = (tmp_path / "a" / "capture" / "ca-cert.pem").read_bytes()
    assert (tmp_path / "b" / "capture" / "ca-cert.pem").read_bytes() == a_cert
    assert (tmp_path / "b" / "capture" / "ca-bundle.pem").read_bytes().endswith(a_cert)
    assert stat.S_IMODE((tmp_path / "b" / "capture" / CA_FILE).stat().st_mode) == 0o600
    leaf = x509.load_pem_x509_certificate(CertificateAuthority(tmp_path / "b").leaf_pem("files.example"))
    leaf.verify_directly_issued_by(x509.load_pem_x509_certificate(a_cert))


def test_export_never_overwrites_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    dest = tmp_path / "taken.pem"
    dest.write_text("mine")
    code, _, err = _cli(capsys, "cache", "export-ca", "--cache", str(tmp_path / "c"), str(dest))
    assert code == 1 and "exists" in err
    assert dest.read_text() == "mine"


def test_another_ca_is_kept_unless_replaced(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs.pem"
    export_ca(tmp_path / "x", theirs)
    CertificateAuthority(tmp_path / "mine")
    before = (tmp_path / "mine" / "capture" / CA_FILE).read_bytes()
    with pytest.raises(CAError, match=r"another CA.*--replace"):
        import_ca(tmp_path / "mine", theirs)
    assert (tmp_path / "mine" / "capture" / CA_FILE).read_bytes() == before
    import_ca(tmp_path / "mine", theirs, replace=True)
    assert (tmp_path / "mine" / "capture" / CA_FILE).read_bytes() == theirs.read_bytes()
    assert (tmp_path / "mine" / "capture" / "ca-cert.pem").read_bytes() == (
        tmp_path / "x" / "capture" / "ca-cert.pem"
    ).read_bytes()
    import_ca(tmp_path / "mine", theirs)  # the same CA again: nothing to do, no error


def _bad_files() -> dict[str, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    other = ec.generate_private_key(ec.SECP256R1())
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return {
        "not an unencrypted PEM": b"junk\n",
        "not a CA": _pem(key, _cert(key, ca=False)),
        "not the key's": other.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        + _cert(key).public_bytes(serialization.Encoding.PEM),
        "not valid now": _pem(key, _cert(key, days=(-30, -1))),
        "not an EC key": _pem(rsa_key, _cert(rsa_key)),
        "over 64 KiB": b"#" * (MAX_CA_FILE + 1),
    }


@pytest.mark.parametrize("why", list(_bad_files()))
def test_an_unusable_ca_is_refused_and_nothing_is_written(tmp_path: Path, why: str) -> None:
    src = tmp_path / "bad.pem"
    src.write_bytes(_bad_files()[why])
    with pytest.raises(CAError, match=why):
        import_ca(tmp_path / "cache", src)
    assert not (tmp_path / "cache" / "capture" / CA_FILE).exists()


def test_a_refused_import_prints_no_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    src = tmp_path / "leaf.pem"
    src.write_bytes(_pem(key, _cert(key, ca=False)))
    code, out, err = _cli(capsys, "cache", "import-ca", "--cache", str(tmp_path / "c"), str(src))
    assert code == 1 and "not a CA" in err
    assert "PRIVATE" not in out + err
