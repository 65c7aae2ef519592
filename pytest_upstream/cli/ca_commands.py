"""``upstream-proxy cache export-ca FILE`` / ``cache import-ca FILE [--replace]``: one capture CA
for a fleet (capture/ca_transfer.py; docs/capture.md § One CA for a fleet).

Only public facts are printed (the certificate's subject, fingerprint and expiry, the paths):
never the key.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # cryptography is imported only when a CA command runs
    from pytest_upstream.capture.ca import CertificateAuthority


CA_COMMANDS = ("export-ca", "import-ca")  # of the directory cache, or an s3:// cache's local tier


def add_ca_parsers(actions: Any, where: argparse.ArgumentParser, run: Any) -> None:
    """The two subcommands under ``cache`` (``run`` is main's handler for ``cache``)."""
    export = actions.add_parser(
        "export-ca", parents=[where], help="write the capture CA's key and certificate to a new file (0600)"
    )
    export.add_argument("file", metavar="FILE", help="a file that does not exist yet")
    imp = actions.add_parser(
        "import-ca", parents=[where], help="make the CA in FILE (from export-ca) this cache's"
    )
    imp.add_argument("file", metavar="FILE")
    imp.add_argument("--replace", action="store_true", help="swap a different CA the cache already has")
    for action in (export, imp):
        action.set_defaults(func=run)


def run_ca_cli(args: Any, cache_dir: Path) -> int:
    from pytest_upstream.capture.ca import CAError
    from pytest_upstream.capture.ca_transfer import export_ca, import_ca

    try:
        if args.cache_command == "export-ca":
            ca = export_ca(cache_dir, Path(args.file))
            print(f"wrote the capture CA's key and certificate to {args.file} (mode 0600: keep it secret)")
        else:
            ca = import_ca(cache_dir, Path(args.file), replace=args.replace)
            print(f"the capture CA of {cache_dir} is now the one in {args.file}")
    except CAError as exc:
        print(f"upstream-proxy: error: {exc}", file=sys.stderr)
        return 1
    _describe(ca)
    return 0


def _describe(ca: CertificateAuthority) -> None:
    from cryptography.hazmat.primitives import hashes

    cert = ca.certificate
    print(f"  subject      {cert.subject.rfc4514_string()}")
    print(f"  sha256       {cert.fingerprint(hashes.SHA256()).hex(':')}")
    print(f"  valid until  {cert.not_valid_after_utc:%Y-%m-%d}")
    print(f"  certificate  {ca.cert_path}")
    print(f"  bundle       {ca.bundle_path}")
