"""``upstream-proxy``: the command-line face of the engine (no pytest here)."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import os
import signal
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

from pytest_upstream.cli.ca_commands import CA_COMMANDS, add_ca_parsers
from pytest_upstream.cli.capture_flags import add_capture_flags, capture_lines, with_capture_flags
from pytest_upstream.cli.client_flags import add_client_flags, warn_if_open, with_client_flags
from pytest_upstream.cli.logs import LOG_FORMATS, serve_logging
from pytest_upstream.cli.size_cap_flags import add_size_cap_flags, with_size_cap_flags
from pytest_upstream.cli.workers import Supervisor, serve_in_worker
from pytest_upstream.config.auth import AUTH_MODES, scrub
from pytest_upstream.config.connection_limits import CONNECTION_LIMIT_FIELDS
from pytest_upstream.config.keys import InvalidKeyError, validate_key
from pytest_upstream.config.settings import (
    DEFAULT_METADATA_TTL,
    DEFAULT_TIMEOUT,
    MODES,
    ConfigError,
    Settings,
    load_settings,
    parse_proxy,
)
from pytest_upstream.config.sources import FORMATS, SOURCES
from pytest_upstream.config.units import parse_age, parse_size, plural
from pytest_upstream.repro.lock_tools import WRITING_MODES
from pytest_upstream.repro.lockfile import LockError, LockFile
from pytest_upstream.repro.served import SERVE_LOG_LIMIT, ServedLog
from pytest_upstream.store.cache import CacheError

if TYPE_CHECKING:
    from pytest_upstream.server.proxy_server import ProxyServer

ENV_CACHE = "UPSTREAM_PROXY_CACHE"
ENV_MODE = "UPSTREAM_PROXY_MODE"


def resolve_settings(
    config: str | None, cache: str | None = None, mode: str | None = None, lock: str | None = None
) -> Settings:
    """Flags beat environment variables, which beat the config file."""
    settings = load_settings(config)
    return settings.with_overrides(
        cache=cache or os.environ.get(ENV_CACHE) or None,
        mode=mode or os.environ.get(ENV_MODE) or None,
        lock=lock,
    )


class ServeError(Exception):
    """The server cannot start as asked (e.g. its port is taken): one line, exit 1."""


def _serve_checks(args: argparse.Namespace, settings: Settings) -> bool:
    """Refuse what cannot work before anything is printed or bound; True if a lock is written."""
    writes_lock = settings.lock_file is not None and settings.mode in WRITING_MODES
    if args.workers > 1 and writes_lock:
        raise ConfigError("--workers above 1 cannot write a lock: each process sees only some requests")
    return writes_lock


def _bind(settings: Settings, host: str, port: int) -> ProxyServer:
    from pytest_upstream.server.proxy_server import ProxyServer

    try:
        # A bounded served log: serve runs for weeks (repro/served.py).
        return ProxyServer(settings, host=host, port=port, served=ServedLog(limit=SERVE_LOG_LIMIT))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ServeError(
                f"port {port} on {host} is already in use (choose another --port, or 0)"
            ) from None
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _cmd_serve(args: argparse.Namespace) -> int:
    settings = with_fetch_flags(
        args, _with_connection_limits(resolve_settings(args.config, args.cache, args.mode, args.lock), args)
    )
    settings = with_capture_flags(args, with_size_cap_flags(args, with_client_flags(args, settings)))
    writes_lock = _serve_checks(args, settings)
    from pytest_upstream.server.limits import raise_open_file_limit

    raise_open_file_limit()  # before the connection cap is derived from it
    names = settings.secret_env_names()
    with serve_logging(verbose=args.verbose, log_format=args.log_format, scrub=lambda t: scrub(t, names)):
        return _serve(args, settings, writes_lock)


def _serve(args: argparse.Namespace, settings: Settings, writes_lock: bool) -> int:
    server = _bind(settings, args.host, args.port)
    warn_if_open(args.host, settings)
    print(server.base_url, flush=True)
    for proxy in settings.proxies:
        where = client_url(server.base_url, proxy.key, proxy.format)
        print(f"  {proxy.key:<20} {proxy.format:<8} {where} -> {proxy.url}", flush=True)
    for group in settings.groups:
        where = client_url(server.base_url, group.key, group.format)
        print(f"  {group.key:<20} {group.format:<8} {where} -> {' then '.join(group.members)}", flush=True)
    print(f"  cache {settings.cache_dir} (mode {settings.mode})", flush=True)
    for line in capture_lines(settings, server.base_url):
        print(line, flush=True)
    if settings.lock_file is not None:
        what = "written at shutdown" if writes_lock else "replayed"
        print(f"  lock {settings.lock_file} ({what})", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        if args.workers > 1:
            Supervisor(lambda: serve_in_worker(server), args.workers).run()
        else:
            server.serve_forever()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.stop()
        if writes_lock and settings.lock_file is not None:
            from pytest_upstream.repro.lock_tools import write_lock

            note = write_lock(settings.lock_file, server.engine.recorded_lock())
            print(f"  lock written: {note}", flush=True)
    return 0


def client_url(base_url: str, key: str, fmt: str) -> str:
    """What a client of the proxy (or group) ``key`` is pointed at: pip's index URL
    (``/<key>/simple/``), npm's registry and maven's repository URL (``/<key>/``), docker's image
    prefix (``HOST:PORT/<key>/``, the API itself is under ``/v2/``), generic's base URL."""
    if fmt == "pypi":
        return f"{base_url}/{key}/simple/"
    if fmt == "docker":
        return f"{base_url.removeprefix('http://')}/{key}/<image>"
    return f"{base_url}/{key}/"


def _cmd_lock_verify(args: argparse.Namespace) -> int:
    """Does the cache hold every blob the lock names, intact?  Exit 1 and list what is not."""
    from pytest_upstream.repro.lock_tools import verify

    settings = resolve_settings(args.config, args.cache, lock=args.lock)
    if settings.lock_file is None:
        raise ConfigError("no lock file: pass --lock FILE or set lock in [tool.pytest-upstream]")
    lock = LockFile.load(settings.lock_file)
    problems = verify(lock, settings.cache_dir)
    for line in problems:
        print(line)
    if problems:
        print(
            f"lock {settings.lock_file}: {len(problems)} of {plural(len(lock), 'entry')} missing or corrupt "
            f"in cache {settings.cache_dir}",
            file=sys.stderr,
        )
        return 1
    every = "the only entry" if len(lock) == 1 else f"all {plural(len(lock), 'entry')}"
    print(f"lock {settings.lock_file}: {every} present and intact in {settings.cache_dir}")
    return 0


def _config_path(args: argparse.Namespace) -> Path:
    return Path(args.config) if args.config else Path.cwd() / "pyproject.toml"


def _cmd_create(args: argparse.Namespace) -> int:
    from pytest_upstream.cli.pyproject_edit import add_proxy

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
    from pytest_upstream.cli.pyproject_edit import remove_proxy

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


def _cmd_cache(args: argparse.Namespace) -> int:
    from pytest_upstream.cli.cache_commands import run_cli

    settings = resolve_settings(args.config, args.cache)
    if settings.object_store is not None and args.cache_command not in CA_COMMANDS:  # the bucket's
        from pytest_upstream.cli.store_commands import run_store_cli

        return run_store_cli(args, settings.object_store, settings.lock_timeout)
    return run_cli(args, settings.cache_dir, settings.lock_timeout)


def _cmd_import_cassettes(args: argparse.Namespace) -> int:
    from pytest_upstream.admin.cassettes import CassetteError, import_cassettes

    settings = resolve_settings(args.config, args.cache)
    try:
        report = import_cassettes(args.paths, settings, key=args.key)
    except CassetteError as exc:
        print(f"upstream-proxy: error: {exc}; nothing was imported", file=sys.stderr)
        return 1
    if args.verbose:
        for note in report.notes:
            print(f"  skipped {note}")
    print(report.summary(settings.cache_dir))
    return 0


def _add_cache_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``cache ls|verify|prune|export|import`` (cli/cache_commands.py, admin/, docs/cache.md)."""
    cache = sub.add_parser("cache", help="list, verify, prune, export or import the cache")
    actions = cache.add_subparsers(dest="cache_command", required=True)
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--cache", metavar="DIR|s3://B/P", help=f"the cache (env {ENV_CACHE}, else config)")
    ls = actions.add_parser("ls", parents=[where], help="list entries and totals")
    ls.add_argument("--key", help="only this proxy key")
    ls.add_argument("--json", action="store_true")
    verify = actions.add_parser("verify", parents=[where], help="re-hash every blob, remove broken files")
    verify.add_argument("--json", action="store_true")
    prune = actions.add_parser("prune", parents=[where], help="remove least recently used entries")
    prune.add_argument("--max-size", metavar="SIZE", help="shrink the blobs to SIZE (1024, 500M, 2G)")
    prune.add_argument("--older-than", metavar="AGE", help="remove entries unused for AGE (90m, 12h, 30d)")
    prune.add_argument("--grace", metavar="AGE", help="keep blobs unreferenced or written within AGE (5s)")
    prune.add_argument(
        "--keep-lock",
        metavar="FILE",
        action="append",
        help="never remove the blobs this lock file names (repeatable)",
    )
    prune.add_argument("--json", action="store_true")
    export = actions.add_parser("export", parents=[where], help="write a deterministic tar of the cache")
    export.add_argument("file", metavar="FILE", help="archive to write (gzip if it ends in .gz or .tgz)")
    export.add_argument("--lock", metavar="FILE", help="only what this lock file names (upstream.lock)")
    imp = actions.add_parser("import", parents=[where], help="merge an archive made by `cache export`")
    imp.add_argument("file", metavar="FILE")
    for action in (ls, verify, prune, export, imp):
        action.set_defaults(func=_cmd_cache)
    add_ca_parsers(actions, where, _cmd_cache)
    cassettes = actions.add_parser(
        "import-cassettes",
        parents=[where],
        help="import vcrpy/pytest-recording cassettes (docs/cassettes.md)",
    )
    cassettes.add_argument("paths", nargs="+", metavar="DIR", type=Path, help="cassette directories or files")
    cassettes.add_argument("--key", help="import into this proxy, whatever the recorded origin")
    cassettes.add_argument("-v", "--verbose", action="store_true", help="list every skipped interaction")
    cassettes.set_defaults(func=_cmd_import_cassettes)


def _version() -> str:
    """The installed distribution's version (pyproject.toml's), as pip reports it."""
    try:
        return version("pytest-upstream")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "(not installed)"


def _seconds(text: str) -> float:
    """A timeout flag: ``10``, ``10s``, ``2m`` (more than 0)."""
    try:
        seconds = parse_age(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds (got {text!r})")
    return seconds


def _count(text: str) -> int:
    try:
        count = int(text)
    except ValueError:
        count = -1
    if count < 0:
        raise argparse.ArgumentTypeError(f"not a whole number >= 0: {text!r}")
    return count


def _with_connection_limits(settings: Settings, args: argparse.Namespace) -> Settings:
    """The connection-limit flags of ``serve`` over the config's values."""
    given = {name: getattr(args, name) for name in CONNECTION_LIMIT_FIELDS if getattr(args, name) is not None}
    return dataclasses.replace(settings, **given)


def _port(text: str) -> int:
    """A TCP port, 0 (a free one) to 65535, refused by argparse before anything starts."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535 (got {port})")
    return port


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


# -- fetch deadlines: serve flags (docs/configuration.md § Fetch deadlines) -------------------------
def _add_fetch_flags(serve: argparse.ArgumentParser) -> None:
    flags = serve.add_argument_group("fetch deadlines (default: the config's)")
    flags.add_argument(
        "--fetch-deadline",
        type=_age,
        metavar="AGE",
        help="longest a download may take (1h; 0: none)",
    )
    flags.add_argument(
        "--min-rate", type=_size, metavar="SIZE", help="slowest download kept, per second (1K; 0: none)"
    )
    flags.add_argument("--min-rate-window", type=_age, metavar="AGE", help="time min-rate is averaged over")
    flags.add_argument(
        "--orphan-deadline",
        type=_age,
        metavar="AGE",
        help="how long a download outlives its clients",
    )


def with_fetch_flags(args: argparse.Namespace, settings: Settings) -> Settings:
    """``settings`` with the fetch-deadline flags given to ``serve`` (they beat the config)."""
    given = {
        name: value
        for name, value in (
            ("deadline", args.fetch_deadline),
            ("min_rate", args.min_rate),
            ("rate_window", args.min_rate_window),
            ("orphan_deadline", args.orphan_deadline),
        )
        if value is not None
    }
    if not given:
        return settings
    if given.get("rate_window") == 0:
        raise ConfigError("--min-rate-window must be more than 0 seconds")
    return dataclasses.replace(settings, fetch=dataclasses.replace(settings.fetch, **given))


def _age(text: str) -> float:
    try:
        return parse_age(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# -- end of fetch deadlines ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="upstream-proxy", description="A pull-through cache for registries."
    )
    parser.add_argument("--config", metavar="FILE", help="pyproject.toml to read (default: ./pyproject.toml)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy until interrupted; prints its base URL")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    serve.add_argument("--port", type=_port, default=0, help="port (default 0: a free one)")
    serve.add_argument("--cache", metavar="DIR", help=f"cache directory (env {ENV_CACHE})")
    serve.add_argument("--mode", choices=MODES, help=f"record, replay or refresh (env {ENV_MODE})")
    serve.add_argument("-v", "--verbose", action="store_true", help="add the proxy's debug lines to the log")
    serve.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="text",
        help="text (default) or json: one JSON object per line, for log shippers",
    )
    serve.add_argument(
        "--workers",
        type=_positive,
        default=1,
        metavar="N",
        help="processes accepting on the same port, restarted if they die "
        "(default 1; not with a lock being written)",
    )
    serve.add_argument(
        "--lock", metavar="FILE", help="lock file: record/refresh write it at shutdown, replay serves it"
    )
    # Connection limits: override [tool.pytest-upstream] (docs/configuration.md#connection-limits)
    limits = serve.add_argument_group("connection limits (default: the config's, see docs/configuration.md)")
    limits.add_argument("--header-timeout", type=_seconds, metavar="AGE", help="a request head within (10s)")
    limits.add_argument(
        "--idle-timeout", type=_seconds, metavar="AGE", help="close idle kept-alive after (30s)"
    )
    limits.add_argument(
        "--send-timeout", type=_seconds, metavar="AGE", help="drop a client not reading for (30s)"
    )
    limits.add_argument(
        "--max-connections",
        type=_count,
        metavar="N",
        help="open connections at most (0: from the open-file limit)",
    )
    _add_fetch_flags(serve)
    add_size_cap_flags(serve)
    add_capture_flags(serve)
    add_client_flags(serve)
    serve.set_defaults(func=_cmd_serve)

    lock = sub.add_parser("lock", help="check a lock file against the cache")
    lock_actions = lock.add_subparsers(dest="lock_command", required=True)
    verify = lock_actions.add_parser("verify", help="does the cache hold every blob the lock names?")
    verify.add_argument("--lock", metavar="FILE", help="lock file (default: the table's lock)")
    verify.add_argument("--cache", metavar="DIR", help=f"cache directory (env {ENV_CACHE}, else the table's)")
    verify.set_defaults(func=_cmd_lock_verify)

    create = sub.add_parser("create", help="add an upstream proxy to pyproject.toml")
    create.add_argument("key", help="the proxy key (lowercase; see docs/configuration.md)")
    create.add_argument(
        "--source",
        choices=SOURCES,
        default="custom",
        help="a built-in upstream, or custom (the default, as in the table): then --format and --url",
    )
    create.add_argument("--url", help="upstream URL (required for custom; a mirror for a built-in)")
    create.add_argument("--format", choices=FORMATS, help="registry format (custom sources)")
    create.add_argument(
        "--auth", choices=AUTH_MODES, default="anonymous", help="how to log in upstream (default anonymous)"
    )
    create.add_argument("--username-env", metavar="VAR", help="variable holding the username (basic)")
    create.add_argument("--password-env", metavar="VAR", help="variable holding the password (basic)")
    create.add_argument("--token-env", metavar="VAR", help="variable holding the token (bearer)")
    create.set_defaults(func=_cmd_create)

    remove = sub.add_parser("remove", help="delete an upstream proxy from pyproject.toml")
    remove.add_argument("key")
    remove.set_defaults(func=_cmd_remove)

    lst = sub.add_parser("list", help="show the upstream proxies and their URLs")
    lst.add_argument("--host", default="127.0.0.1")
    lst.add_argument("--port", type=_port, default=0, help="show URLs for a server on this port")
    lst.set_defaults(func=_cmd_list)

    _add_cache_parser(sub)
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
    except (ConfigError, LockError) as exc:
        print(f"upstream-proxy: error: {exc}", file=sys.stderr)
        return 2
    except (CacheError, ServeError) as exc:
        print(f"upstream-proxy: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"upstream-proxy: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
