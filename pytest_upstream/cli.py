"""``upstream-proxy``: the command-line face of the engine (no pytest here)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from .auth import AUTH_MODES
from .cache import CacheError
from .config import (
    DEFAULT_METADATA_TTL,
    DEFAULT_TIMEOUT,
    MODES,
    ConfigError,
    Settings,
    load_settings,
    parse_proxy,
)
from .keys import InvalidKeyError, validate_key
from .sources import FORMATS, SOURCES

ENV_CACHE = "UPSTREAM_PROXY_CACHE"
ENV_MODE = "UPSTREAM_PROXY_MODE"


def resolve_settings(config: str | None, cache: str | None = None, mode: str | None = None) -> Settings:
    """Flags beat environment variables, which beat the config file."""
    settings = load_settings(config)
    return settings.with_overrides(
        cache=cache or os.environ.get(ENV_CACHE) or None,
        mode=mode or os.environ.get(ENV_MODE) or None,
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    from .server import ProxyServer

    settings = resolve_settings(args.config, args.cache, args.mode)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(message)s",
    )
    server = ProxyServer(settings, host=args.host, port=args.port)
    print(server.base_url, flush=True)
    for proxy in settings.proxies:
        print(f"  {proxy.key:<20} {proxy.format:<8} {server.url(proxy.key)} -> {proxy.url}", flush=True)
    print(f"  cache {settings.cache_dir} (mode {settings.mode})", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        server.serve_forever()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.stop()
    return 0


def _config_path(args: argparse.Namespace) -> Path:
    return Path(args.config) if args.config else Path.cwd() / "pyproject.toml"


def _cmd_create(args: argparse.Namespace) -> int:
    from .config_edit import add_proxy

    path = _config_path(args)
    entry: dict[str, object] = {"key": args.key, "source": args.source, "auth": args.auth}
    for name in ("url", "format", "username_env", "password_env", "token_env"):
        if (value := getattr(args, name)) is not None:
            entry[name] = value
    definition = parse_proxy(entry, f"{path}: new proxy", DEFAULT_METADATA_TTL, DEFAULT_TIMEOUT)
    add_proxy(path, definition)
    print(f"created upstream proxy {definition.key!r} ({definition.format}, {definition.url}) in {path}")
    return 0


def _cmd_remove(args: argparse.Namespace) -> int:
    from .config_edit import remove_proxy

    path = _config_path(args)
    remove_proxy(path, args.key)
    print(f"removed upstream proxy {args.key!r} from {path}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    settings = resolve_settings(args.config)
    origin = str(settings.config_file) if settings.config_file else "built-in defaults"
    print(f"# {origin}; cache {settings.cache_dir}; mode {settings.mode}")
    base = f"http://{args.host}:{args.port}" if args.port else "http://HOST:PORT"
    for p in settings.proxies:
        auth = p.auth.mode + (f" ({', '.join(p.auth.required_env())})" if p.auth.required_env() else "")
        print(f"{p.key:<20} {p.source:<14} {p.format:<8} {p.url:<45} {auth:<24} {base}/{p.key}/")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="upstream-proxy", description="A pull-through cache for registries."
    )
    parser.add_argument("--config", metavar="FILE", help="pyproject.toml to read (default: ./pyproject.toml)")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy until interrupted; prints its base URL")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=int, default=0, help="port (default 0: a free one)")
    serve.add_argument("--cache", metavar="DIR", help=f"cache directory (env {ENV_CACHE})")
    serve.add_argument("--mode", choices=MODES, help=f"record, replay or refresh (env {ENV_MODE})")
    serve.add_argument("-v", "--verbose", action="store_true", help="log every request")
    serve.set_defaults(func=_cmd_serve)

    create = sub.add_parser("create", help="add an upstream proxy to pyproject.toml")
    create.add_argument("key", help="the proxy key (lowercase; see docs/configuration.md)")
    create.add_argument("--source", required=True, choices=SOURCES)
    create.add_argument("--url", help="upstream URL (custom sources)")
    create.add_argument("--format", choices=FORMATS, help="registry format (custom sources)")
    create.add_argument("--auth", choices=AUTH_MODES, default="anonymous")
    create.add_argument("--username-env", metavar="VAR", help="variable holding the username (basic)")
    create.add_argument("--password-env", metavar="VAR", help="variable holding the password (basic)")
    create.add_argument("--token-env", metavar="VAR", help="variable holding the token (bearer)")
    create.set_defaults(func=_cmd_create)

    remove = sub.add_parser("remove", help="delete an upstream proxy from pyproject.toml")
    remove.add_argument("key")
    remove.set_defaults(func=_cmd_remove)

    lst = sub.add_parser("list", help="show the upstream proxies and their URLs")
    lst.add_argument("--host", default="127.0.0.1")
    lst.add_argument("--port", type=int, default=0, help="show URLs for a server on this port")
    lst.set_defaults(func=_cmd_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "key", None) is not None:
        try:
            validate_key(args.key)
        except InvalidKeyError as exc:
            print(f"upstream-proxy: error: {exc}", file=sys.stderr)
            return 2
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"upstream-proxy: error: {exc}", file=sys.stderr)
        return 2
    except CacheError as exc:
        print(f"upstream-proxy: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"upstream-proxy: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
