"""Which proxy path serves an upstream URL: the inverse of the formats' layouts.

Used by in-process routing (``inprocess.py``) and the cassette import
(``cassettes.py``); docs/pytest-plugin.md § In-process clients lists the
mapping.  Paths stay raw (percent-encoded) here: the proxy, or
``http.split_proxy_path``, decodes and checks them.

* generic, maven, npm: the proxy layout is the upstream's own, so
  ``<source url>/<rest>`` maps to ``<key>/<rest>`` (query kept);
* pypi: the source URL itself and one segment below it are index pages
  (``simple/`` and ``simple/<project>/``); a distribution file anywhere on
  the source URL's origin maps to ``files/<project>/<filename>``, the project
  taken from a ``.../files/<project>/<filename>`` path (a proxy-rendered link
  resolved against the page's URL) or else from the file name
  (``formats.pypi.parse_dist_filename``: what packaging does not read as a
  wheel, sdist or egg is not a distribution file);
* docker: nothing (its API lives at ``/v2/<key>/`` and has its own token flow).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import unquote, urljoin, urlsplit

from packaging.utils import canonicalize_name

from pytest_upstream.config.settings import ProxyDefinition
from pytest_upstream.formats.pypi_pages import parse_dist_filename

PATH_PRESERVING = frozenset({"generic", "maven", "npm"})
ROUTED_METHODS = frozenset({"GET", "HEAD"})
DEFAULT_PORTS = {"http": 80, "https": 443}

Origin = tuple[str, str, int]


def origin_of(scheme: str, host: str | None, port: int | None) -> Origin:
    return scheme.lower(), (host or "").lower(), port or DEFAULT_PORTS.get(scheme.lower(), 0)


def url_origin(url: str) -> Origin | None:
    try:
        parts = urlsplit(url)
        return origin_of(parts.scheme, parts.hostname, parts.port)
    except ValueError:  # e.g. a port out of range
        return None


@dataclass(frozen=True)
class Route:
    """The proxy path (below ``/<key>/``, raw, with the query) that serves one URL."""

    proxy: ProxyDefinition
    path: str

    @property
    def key(self) -> str:
        return self.proxy.key


@dataclass(frozen=True)
class _Source:
    proxy: ProxyDefinition
    origin: Origin
    prefix: str  # the source URL's path without its trailing slash ("" for the root)
    root: str  # scheme://netloc of the source URL

    @classmethod
    def of(cls, proxy: ProxyDefinition) -> _Source | None:
        parts = urlsplit(proxy.url)
        if parts.scheme.lower() not in DEFAULT_PORTS or not parts.hostname:
            return None
        return cls(
            proxy,
            origin_of(parts.scheme, parts.hostname, parts.port),
            parts.path.rstrip("/"),
            f"{parts.scheme}://{parts.netloc}",
        )

    def holds(self, path: str) -> bool:
        return path == self.prefix or path.startswith(self.prefix + "/")

    def proxy_path(self, path: str, query: str) -> str | None:
        """The path below ``/<key>/`` that serves ``path`` (raw), or None."""
        fmt = self.proxy.format
        if fmt in PATH_PRESERVING:
            if not path.startswith(self.prefix + "/") or len(path) == len(self.prefix) + 1:
                return None
            rest = path[len(self.prefix) + 1 :]
        elif fmt == "pypi":
            pypi_rest = self._pypi(path or "/")
            if pypi_rest is None:
                return None
            rest = pypi_rest
        else:
            return None
        return f"{rest}?{query}" if query else rest

    def _pypi(self, path: str) -> str | None:
        last = path.rsplit("/", 1)[-1]
        dist = parse_dist_filename(unquote(last)) if last else None
        if dist is not None:
            project = dist[0]
            segments = path.split("/")
            if len(segments) >= 3 and segments[-3] == "files" and segments[-2]:
                project = canonicalize_name(unquote(segments[-2]))
            return f"files/{project}/{last}"
        if path == self.prefix:
            return "simple"  # the proxy redirects to simple/, as an index does
        if not path.startswith(self.prefix + "/"):
            return None
        rest = path[len(self.prefix) + 1 :]
        segments = rest.split("/")
        if len(segments) == 1 or (len(segments) == 2 and segments[1] == ""):
            return "simple/" + rest
        return None

    def source_url(self, rest: str) -> str | None:
        """The inverse of ``proxy_path``: where a proxy path lives under the source URL."""
        if self.proxy.format in PATH_PRESERVING:
            return f"{self.root}{self.prefix}/{rest}"
        if self.proxy.format == "pypi":
            base = f"{self.root}{self.prefix}/"
            if rest == "simple":
                return f"{self.root}{self.prefix}"
            if rest.startswith("simple/"):
                return base + rest[len("simple/") :]
            if rest.startswith("files/"):
                return urljoin(base, "../" + rest)
        return None


class Router:
    """Maps upstream URLs to proxy paths for a set of proxy definitions."""

    def __init__(self, proxies: Iterable[ProxyDefinition], *, exclude: Origin | None = None) -> None:
        sources = [s for p in proxies if (s := _Source.of(p)) is not None]
        self._sources = [s for s in sources if s.origin != exclude]
        self._keys = {s.proxy.key: s for s in self._sources}

    def route(self, url: str, method: str = "GET", *, key: str | None = None) -> Route | None:
        """The proxy path serving ``url``, or None.  Only GET and HEAD are routed.

        When several sources match, the one whose URL holds the path most closely
        wins (a pypi source also claims distribution files elsewhere on its
        origin, but last).  ``key`` restricts the choice to one proxy.
        """
        if method.upper() not in ROUTED_METHODS:
            return None
        parts = urlsplit(url)
        origin = url_origin(url)
        best: tuple[int, Route] | None = None
        for source in self._sources:
            if source.origin != origin or key not in (None, source.proxy.key):
                continue
            path = source.proxy_path(parts.path, parts.query)
            if path is None:
                continue
            score = len(source.prefix) if source.holds(parts.path) else -1
            if best is None or score > best[0]:
                best = (score, Route(source.proxy, path))
        return None if best is None else best[1]

    def route_as(self, url: str, key: str) -> Route | None:
        """Route ``url`` into proxy ``key`` even if recorded against another origin:
        the URL's path is taken as if it lay on the key's source origin."""
        source = self._keys.get(key)
        if source is None:
            return None
        parts = urlsplit(url)
        rebased = f"{source.root}{parts.path}" + (f"?{parts.query}" if parts.query else "")
        return self.route(rebased, key=key)

    def source_location(self, base_url: str, location: str) -> str:
        """A Location the proxy at ``base_url`` answered, moved back under the source URL
        when it names a proxy path (e.g. pypi's ``/simple`` → ``/simple/`` redirect)."""
        path = location
        if location.startswith(base_url + "/"):
            path = location[len(base_url) :]
        if not path.startswith("/"):
            return location
        key, _, rest = path[1:].partition("/")
        source = self._keys.get(key)
        if source is None:
            return location
        return source.source_url(rest) or location
