"""Upstream authentication: secrets are read from the environment at request
time and never stored on any object that can be printed, pickled or cached."""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from dataclasses import dataclass

AUTH_MODES = ("anonymous", "basic", "bearer")


class CredentialsError(RuntimeError):
    """A configured environment variable is missing; names the variable only."""


@dataclass(frozen=True)
class AuthSpec:
    """Which auth mode a proxy uses and which variables hold its secrets.

    Holds variable *names* only, so its repr is safe to print.
    """

    mode: str = "anonymous"
    username_env: str | None = None
    password_env: str | None = None
    token_env: str | None = None

    def required_env(self) -> tuple[str, ...]:
        if self.mode == "basic":
            return tuple(v for v in (self.username_env, self.password_env) if v)
        if self.mode == "bearer":
            return tuple(v for v in (self.token_env,) if v)
        return ()

    def problem(self) -> str | None:
        """Why this spec is incomplete, or None."""
        if self.mode not in AUTH_MODES:
            return f"auth must be one of {', '.join(AUTH_MODES)} (got {self.mode!r})"
        if self.mode == "basic" and not (self.username_env and self.password_env):
            return "auth = 'basic' needs username_env and password_env"
        if self.mode == "bearer" and not self.token_env:
            return "auth = 'bearer' needs token_env"
        return None

    def headers(self, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """The Authorization header for a request, built from the environment."""
        env = os.environ if environ is None else environ
        missing = [name for name in self.required_env() if not env.get(name)]
        if missing:
            raise CredentialsError(
                f"{self.mode} auth needs the environment variable(s) {', '.join(missing)}, which are not set"
            )
        if self.mode == "basic":
            assert self.username_env and self.password_env
            pair = f"{env[self.username_env]}:{env[self.password_env]}".encode()
            return {"Authorization": "Basic " + base64.b64encode(pair).decode("ascii")}
        if self.mode == "bearer":
            assert self.token_env
            return {"Authorization": f"Bearer {env[self.token_env]}"}
        return {}
