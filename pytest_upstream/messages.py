"""Plain data that crosses the seam between the HTTP server, the engine and
the format modules: a parsed request and the reply to send."""

from __future__ import annotations

import json
import re
import time
import unicodedata
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote


class BadPath(ValueError):
    """A request path that could escape its proxy or the cache."""


# A percent-encoded overlong UTF-8 sequence (%c0%ae is '.', %c0%af '/', %e0%80%ae ...): invalid
# UTF-8 that the strict decoding below refuses too; refused by name first, for a clear reason.
_OVERLONG = re.compile(r"%c[01]%[89ab][0-9a-f]|%e0%[89][0-9a-f]%|%f0%8[0-9a-f]%", re.IGNORECASE)


def split_proxy_path(raw_path: str) -> tuple[str, str]:
    """Split ``/<key>/<rest>`` into (key, rest), decoding and refusing traversal.

    Refused: NUL and other control characters, backslashes, encoded slashes
    (``%2f``, ``%5c``), empty or dot segments (``//``, ``.``, ``..``, also when
    percent-encoded, as ``.%2e``), dot segments that a common server reads as ``..``
    (``..;``, ``..;x``, ``%2e%2e;x``: servlet containers drop the ``;`` parameter; fullwidth
    dots, which Unicode folding turns into ``..``), and
    overlong UTF-8 (``%c0%ae``).  Checked here, before anything is forwarded.
    ``rest`` keeps a trailing slash when the URL had one.

    One exception: npm sends a scoped package name as one segment,
    ``@scope%2fname``.  A segment below the key that starts with a literal
    ``@`` may hold one ``%2f``; it decodes to a plain slash (``@scope/name``),
    and both halves then pass the same checks as every other segment.
    """
    if not raw_path.startswith("/"):
        raise BadPath("the request path must be absolute")
    for index, raw_segment in enumerate(raw_path.split("/")):
        lowered = raw_segment.lower()
        if "%5c" in lowered:
            raise BadPath("encoded slashes are not allowed in paths")
        scope, _, name = lowered.partition("%2f")
        npm_scope = index >= 2 and len(scope) > 1 and scope[0] == "@" and bool(name) and "%2f" not in name
        if "%2f" in lowered and not npm_scope:
            raise BadPath("encoded slashes are not allowed in paths (except one in an npm @scope%2fname)")
    if _OVERLONG.search(raw_path):
        raise BadPath("overlong UTF-8 encodings are not allowed in paths")
    path = unquote(raw_path, errors="strict")
    if any(ord(c) < 0x20 or c == "\x7f" for c in path):
        raise BadPath("control characters (such as NUL) are not allowed in paths")
    if "\\" in path:
        raise BadPath("backslashes are not allowed in paths")
    segments = path[1:].split("/")
    trailing = len(segments) > 1 and segments[-1] == ""
    if trailing:
        segments = segments[:-1]
    for seg in segments:
        if seg in ("", ".", ".."):
            raise BadPath("empty, '.' and '..' path segments are not allowed")
        if unicodedata.normalize("NFKC", seg.split(";", 1)[0]).strip() in (".", ".."):
            # Servlet containers (Tomcat, Jetty) drop a ";parameter" from a segment, some
            # servers trim blanks or fold Unicode (fullwidth dots): "..;x", ".. " and U+FF0E twice
            # reach them as "..".
            raise BadPath("a segment some servers read as '.' or '..' (';' parameter, blanks, wide dots)")
    key, rest = segments[0], "/".join(segments[1:])
    if trailing and rest:
        rest += "/"
    return key, rest


class Headers:
    """Case-insensitive request headers; repeated headers joined with ', '."""

    def __init__(self, items: list[tuple[str, str]] | None = None) -> None:
        self._raw = list(items or [])
        self._items: dict[str, str] = {}
        for name, value in self._raw:
            low = name.lower()
            self._items[low] = f"{self._items[low]}, {value}" if low in self._items else value

    def get(self, name: str, default: str | None = None) -> str | None:
        return self._items.get(name.lower(), default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def items(self) -> list[tuple[str, str]]:
        """As received: original names, repeated headers separate."""
        return list(self._raw)


@dataclass
class ProxyRequest:
    method: str
    key: str
    path: str
    query: str
    headers: Headers
    base_url: str  # scheme://host:port of the proxy, as the client addressed it
    keyless: bool = False  # a /v2/<name>/... registry request routed to the mirror proxy (docs/docker.md)
    via: str = ""  # the group the client addressed, when a group passed this request to a member
    # When it was read (time.monotonic()): a served record's ``duration`` counts from here, as the
    # access log's time does.  Not part of what the request *is* (not compared).
    received: float = field(default_factory=time.monotonic, compare=False)

    @property
    def client_key(self) -> str:
        """The key in the URL the client used: the group's, for a request a group passed on."""
        return self.via or self.key

    @property
    def proxy_url(self) -> str:
        """Where the client reaches what this request's answer links to (npm's absolute tarball
        URLs): through the group when one passed the request on."""
        return f"{self.base_url}/{self.client_key}"


@dataclass
class Reply:
    """What to send: exactly one of ``body``, ``file`` or ``stream``."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    file: Path | None = None
    stream: Iterator[bytes] | None = None
    length: int | None = None  # for file/stream bodies when known
    # The status line's reason phrase ("" for the standard one).  pip and uv print the status
    # line and never the body, so an error the proxy makes says why here too.
    reason: str = ""

    @classmethod
    def text(cls, status: int, message: str, headers: Mapping[str, str] | None = None) -> Reply:
        h = {"Content-Type": "text/plain; charset=utf-8", **(headers or {})}
        return cls(status, h, body=(message.rstrip("\n") + "\n").encode())

    @classmethod
    def json(cls, status: int, data: object, content_type: str = "application/json") -> Reply:
        return cls(status, {"Content-Type": content_type}, body=json.dumps(data, indent=1).encode())
