"""Upstream authentication: secrets are read from the environment at request
time and never stored on any object that can be printed, pickled or cached.

A value is checked before it goes into a header (``env_value``: no CR, LF or other control
character, no surrounding blanks, not empty), at start (``env_problems``, called by ``serve`` and
the pytest plugin) and again at request time, and every error names the *variable*, never the
value.  ``scrub`` is the one function that takes secrets out of a text that leaves the process
(a reply, a log line, a served record, a report): the engine shapes every error through it.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

AUTH_MODES = ("anonymous", "basic", "bearer")


class CredentialsError(RuntimeError):
    """A configured environment variable is missing or unusable; names the variable only."""


def value_problem(value: str) -> str | None:
    """Why an environment value cannot go into a header (never quoting it), or None."""
    if not value:
        return "is empty"
    if any(ord(c) < 0x20 or c == "\x7f" for c in value.strip()):
        return "contains a control character (CR, LF, TAB, ...)"
    if value != value.strip():
        return "has leading or trailing whitespace (a stray newline or space?)"
    return None


def env_value(name: str, environ: Mapping[str, str] | None = None) -> str:
    """The value of environment variable ``name``, checked; CredentialsError names ``name`` only."""
    env = os.environ if environ is None else environ
    value = env.get(name)
    if value is None:
        raise CredentialsError(f"the environment variable {name} is not set")
    if problem := value_problem(value):
        raise CredentialsError(f"the environment variable {name} {problem}")
    return value


def env_problems(names: Iterable[str], environ: Mapping[str, str] | None = None) -> list[str]:
    """Configuration errors for the variables that are set but unusable (one line each, naming
    the variable).  An unset variable is reported when a request needs it, as before."""
    env = os.environ if environ is None else environ
    problems = []
    for name in dict.fromkeys(names):
        value = env.get(name)
        if value is not None and (problem := value_problem(value)):
            problems.append(f"the environment variable {name} {problem}")
    return problems


def unset_env(
    needs: Iterable[tuple[str, Iterable[str]]], environ: Mapping[str, str] | None = None
) -> list[str]:
    """One warning line per proxy whose credential variables are not set (``needs``: pairs of a
    proxy key and the variables its auth reads).  Not an error: a proxy nobody uses in this run
    needs no credentials; one that is used answers 502 naming the variable."""
    env = os.environ if environ is None else environ
    lines = []
    for key, names in needs:
        if missing := [name for name in dict.fromkeys(names) if name not in env]:
            lines.append(
                f"proxy {key!r}: the environment variable{'s' if len(missing) > 1 else ''} "
                f"{', '.join(missing)} {'are' if len(missing) > 1 else 'is'} not set; its "
                "requests will answer 502 until the proxy is started with "
                f"{'them' if len(missing) > 1 else 'it'}"
            )
    return lines


_REDACTED = "<redacted>"
# Credentials in a URL (scheme://user:pass@host) and the value of an Authorization-like header.
_URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s'\"]+@")
# An Authorization value as a header shows it (capitalised scheme, a token68 of 8+ characters), not
# prose such as "basic auth needs ..." or a challenge's "Bearer realm=...".
_AUTH_VALUE = re.compile(r"\b(Bearer|Basic)(\s+)(?!realm\b)[A-Za-z0-9._~+/-]{8,}=*")


def scrub(text: str, env_names: Iterable[str] = (), environ: Mapping[str, str] | None = None) -> str:
    """``text`` without secrets: URL credentials, ``Bearer``/``Basic`` values and the values of
    the environment variables ``env_names`` (as they are, stripped, and as Python would quote
    them in an exception's repr) replaced by ``<redacted>``."""
    env = os.environ if environ is None else environ
    if "@" in text:  # each pattern needs its marker: most texts (an access line) skip the regexes
        text = _URL_CREDENTIALS.sub(rf"\1{_REDACTED}@", text)
    if "Bearer" in text or "Basic" in text:
        text = _AUTH_VALUE.sub(rf"\1\2{_REDACTED}", text)
    for name in dict.fromkeys(env_names):
        value = env.get(name) or ""
        forms = {value, value.strip(), repr(value)[1:-1], repr(value.strip())[1:-1]}
        for form in sorted(forms, key=len, reverse=True):
            if len(form.strip()) >= 3:  # a value of one or two characters is no secret worth mangling text
                text = text.replace(form, _REDACTED)
    return text


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
        """The Authorization header for a request, built from the environment (values checked:
        a CR or LF would otherwise reach the HTTP library, whose error quotes the header)."""
        env = os.environ if environ is None else environ
        missing = [name for name in self.required_env() if not env.get(name)]
        if missing:
            raise CredentialsError(
                f"{self.mode} auth needs the environment variable(s) {', '.join(missing)}, which are not set"
            )
        if self.mode == "basic":
            assert self.username_env and self.password_env
            user, password = env_value(self.username_env, env), env_value(self.password_env, env)
            pair = f"{user}:{password}".encode()
            return {"Authorization": "Basic " + base64.b64encode(pair).decode("ascii")}
        if self.mode == "bearer":
            assert self.token_env
            return {"Authorization": f"Bearer {env_value(self.token_env, env)}"}
        return {}
