"""``serve``'s flags for who may use the proxy (``--token-env``, ``--allowed-host``), and the check
at start of every secret a request will read (docs/configuration.md § Credentials and clients)."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

from pytest_upstream.config.auth import env_problems, unset_env, value_problem
from pytest_upstream.config.settings import ConfigError, Settings
from pytest_upstream.repro.netguard import is_loopback


def add_client_flags(serve: argparse.ArgumentParser) -> None:
    flags = serve.add_argument_group("clients (docs/configuration.md § Credentials and clients)")
    flags.add_argument(
        "--token-env",
        metavar="VAR",
        help="require every request to carry the token in this environment variable "
        "(Bearer, or Basic with the token as password; /-/ready stays open)",
    )
    flags.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a Host name a loopback-bound proxy answers besides loopback ones (repeatable; "
        "adds to allowed_hosts)",
    )


def with_client_flags(args: argparse.Namespace, settings: Settings) -> Settings:
    """``settings`` with the client flags; the secrets every request will read checked now.

    A value with CR, LF or surrounding blanks is a configuration error naming the variable (never the
    value).
    """
    token_env = args.token_env or settings.client_token_env
    if args.token_env is not None:
        value = os.environ.get(args.token_env)
        if value is None:
            raise ConfigError(f"--token-env {args.token_env}: the environment variable is not set")
        if problem := value_problem(value):
            raise ConfigError(f"--token-env {args.token_env}: the environment variable {problem}")
    names = [name for proxy in settings.proxies for name in proxy.auth.required_env()]
    if problems := env_problems(names):
        raise ConfigError("; ".join(problems))
    hosts = tuple(dict.fromkeys((*settings.allowed_hosts, *(h.lower() for h in args.allowed_host))))
    return replace(settings, client_token_env=token_env, allowed_hosts=hosts)


def warn_if_open(host: str, settings: Settings) -> None:
    """Once bound: a warning line when a non-loopback bind requires no token, and one per proxy
    whose credential variables are not set."""
    for line in unset_env((p.key, p.auth.required_env()) for p in settings.proxies):
        print(f"warning: {line}", file=sys.stderr, flush=True)
    if not is_loopback(host) and not settings.client_token_env:
        print(
            f"warning: serving on {host} (not loopback) without --token-env: anyone who can reach "
            "this port can use the proxy and its configured upstream credentials",
            file=sys.stderr,
            flush=True,
        )
