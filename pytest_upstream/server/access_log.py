"""One access-log line per answered request, on the logger ``pytest_upstream.access``.

The server calls ``log_access`` once per request after the body was sent (or sending it failed).
The line is for people first (``GET /pypi/simple/x/ 200 hit 5.1 KiB 1.2ms key=pypi
client=127.0.0.1``); the same fields ride on the record as ``access`` (a dict) so a JSON formatter
(``serve --log-format json``, cli/logs.py) writes them as fields a log shipper can index.  The
request target comes from the client: anything but printable ASCII is escaped, so a crafted path
cannot forge a second log line; the UI's ``?token=`` is redacted (``without_token``).
"""

from __future__ import annotations

import logging
from urllib.parse import unquote_plus

from pytest_upstream.config.units import human_size

log = logging.getLogger("pytest_upstream.access")

_MAX_TARGET = 2048


def log_access(
    *, method: str, target: str, status: int, cache: str, key: str, nbytes: int, millis: float, client: str
) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    fields = {
        "method": clean(method, 16),
        "target": clean(target, _MAX_TARGET),
        "status": status,
        "cache": clean(cache, 32) or "-",
        "key": clean(key, 64) or "-",
        "bytes": nbytes,
        "ms": round(millis, 1),
        "client": clean(client, 64),
    }
    log.info(
        "%s %s %d %s %s %.1fms key=%s client=%s",
        fields["method"],
        fields["target"],
        status,
        fields["cache"],
        human_size(nbytes).replace(" ", ""),
        millis,
        fields["key"],
        fields["client"],
        extra={"access": fields},
    )


def without_token(target: str) -> str:
    """``target`` with the value of a ``token=`` query parameter (the UI's, server/ui/routes.py) redacted,
    however its name is spelled (``%74oken=`` is ``token=`` to a query parser)."""
    path, sep, query = target.partition("?")
    if not sep or "=" not in query:
        return target
    parts = [
        f"{name}=<redacted>" if unquote_plus(name).strip().lower() == "token" else part
        for part in query.split("&")
        for name in [part.partition("=")[0]]
    ]
    return f"{path}?{'&'.join(parts)}"


def clean(text: str, limit: int) -> str:
    """Printable ASCII kept, anything else as ``\\xNN`` (or ``\\uNNNN``), at most ``limit`` characters."""
    if text.isascii() and text.isprintable() and " " not in text:
        out = text  # the common case, every request: nothing to escape
    else:
        out = "".join(_escape(c) for c in text)
    return out if len(out) <= limit else out[: limit - 3] + "..."


def _escape(char: str) -> str:
    if "!" <= char <= "~":
        return char
    return "\\x20" if char == " " else char.encode("unicode_escape").decode("ascii")
