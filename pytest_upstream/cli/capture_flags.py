"""``serve``'s capture flag (docs/capture.md): ``--capture`` makes the proxy an HTTP and HTTPS
forward proxy for every client, intercepting with the cache's CA."""

from __future__ import annotations

import argparse
from dataclasses import replace

from pytest_upstream.config.capture import with_capture
from pytest_upstream.config.settings import Settings


def add_capture_flags(serve: argparse.ArgumentParser) -> None:
    serve.add_argument(
        "--capture",
        action="store_true",
        default=None,
        help="also be an HTTP(S) forward proxy that caches what clients fetch through HTTPS_PROXY "
        "(table: capture; the CA is in <cache>/capture/ca-cert.pem)",
    )


def with_capture_flags(args: argparse.Namespace, settings: Settings) -> Settings:
    return replace(settings, capture=with_capture(settings.capture, args.capture))


def capture_lines(settings: Settings, base_url: str) -> list[str]:
    """What ``serve`` prints about capture: where clients point and which CA they trust."""
    if not settings.capture.enabled:
        return []
    ca = settings.cache_dir / "capture"
    return [
        f"  capture: HTTPS_PROXY={base_url} (hosts {', '.join(settings.capture.hosts)})",
        f"  capture CA: {ca / 'ca-cert.pem'} (bundle with the system's roots: {ca / 'ca-bundle.pem'})",
    ]
