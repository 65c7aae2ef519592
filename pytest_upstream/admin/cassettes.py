"""Import vcrpy / pytest-recording cassettes into the cache (docs/cassettes.md).

``upstream-proxy cache import-cassettes DIR`` reads every cassette with
vcrpy's own loader (both the current format and the pre-1.0 one, which
vcrpy's migration code converts; YAML or JSON), undoes a recorded
``Content-Encoding`` with vcrpy's own decoder, and stores each GET answered
200 under the proxy whose source URL holds the request's URL (the same
mapping as in-process routing, ``routes.py``), or under ``--key``.

Each body goes into the content-addressed store (identical bodies are stored
once) and gets an index entry exactly as a live fetch would: the format
resolves the path, so the upstream URL, the kind (metadata or artifact; for
generic proxies ``mutable_paths``) and any published digest are the ones the
proxy itself would use, and metadata must pass the format's checks.
Resolving happens offline: a pypi file is resolved from its project page,
which must be in the cache or among the imported interactions (pages are
imported first).  Entries already in the cache are kept.

vcrpy is imported only here, and only when this runs.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from pytest_upstream.clients.routes import Route, Router
from pytest_upstream.config.settings import ProxyDefinition, Settings
from pytest_upstream.config.upstream_limits import DecodeLimits
from pytest_upstream.engine.fetch import store_answer
from pytest_upstream.formats import get_format
from pytest_upstream.formats.base import Format, FormatError, Kind, MalformedUpstream, Resource
from pytest_upstream.messages import BadPath, Headers, ProxyRequest, Reply, split_proxy_path
from pytest_upstream.store.cache import Cache, DigestMismatch, Entry
from pytest_upstream.store.headers import headers_problem
from pytest_upstream.upstream.decoding import DecodingRefused, DecompressionBomb, coding_of, decode

# Formats whose resolve() works offline from the cache alone.
IMPORTABLE_FORMATS = ("generic", "maven", "pypi")
CASSETTE_SUFFIXES = (".yaml", ".yml", ".json")
_CHECKSUM_SUFFIXES = (".sha1", ".md5", ".sha256", ".sha512")


class CassetteError(ValueError):
    """A cassette that does not parse; the message names the file."""


@dataclass(frozen=True)
class Interaction:
    """One recorded request and its answer, body already decoded."""

    source: str  # "<file>#<index>"
    method: str
    url: str
    request_headers: dict[str, str]
    status: int
    headers: httpx.Headers
    body: bytes


@dataclass
class ImportReport:
    cassettes: int = 0
    interactions: int = 0
    imported: int = 0  # new index entries
    already_cached: int = 0  # an entry for that path was there (kept)
    new_blobs: int = 0
    new_bytes: int = 0
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> count
    notes: list[str] = field(default_factory=list)  # one line per skipped interaction, with the reason

    def skip(self, interaction: Interaction, reason: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        self.notes.append(f"{interaction.source}: {interaction.method} {interaction.url}: {detail or reason}")

    def summary(self, cache_dir: Path) -> str:
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) or "none"
        return (
            f"imported {self.imported} responses from {self.cassettes} cassettes "
            f"({self.interactions} interactions) into {cache_dir}: {self.new_blobs} new blobs, "
            f"{self.new_bytes} bytes; {self.already_cached} already cached; skipped: {skipped}"
        )


# -- reading -----------------------------------------------------------------------
def find_cassettes(paths: Iterable[Path]) -> list[Path]:
    """The cassette files among ``paths``: files as given, directories searched recursively."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in CASSETTE_SUFFIXES))
        elif path.is_file():
            found.append(path)
        else:
            raise CassetteError(f"{path}: no such file or directory")
    return found


def _vcr() -> Any:
    try:
        from vcr import migration, serialize  # type: ignore[import-untyped]
        from vcr.filters import decode_response  # type: ignore[import-untyped]
        from vcr.serializers import jsonserializer, yamlserializer  # type: ignore[import-untyped]
    except ImportError as exc:
        raise CassetteError(f"importing cassettes needs vcrpy (pip install vcrpy): {exc}") from None
    return migration, serialize, decode_response, jsonserializer, yamlserializer


def _coding_problem(response: Any) -> str:
    """Why a recorded content-coded body may not be decoded ("" if it may): a decompression bomb,
    judged by the proxy's own bounded decoder with the default caps (upstream/decoding.py)
    without keeping what it decodes.  Anything else (a body recorded already decoded, an
    unknown coding) is left to vcrpy's decoder, as before."""
    headers = response.get("headers") or {} if isinstance(response, dict) else {}
    values = [v for k, vs in headers.items() if str(k).lower() == "content-encoding" for v in _values(vs)]
    body = (response.get("body") or {}).get("string") if values else None
    if not isinstance(body, bytes | bytearray):
        return ""
    try:
        coding = coding_of(", ".join(values))
        if coding:
            for _ in decode([bytes(body)], coding, DecodeLimits()):
                pass
    except DecompressionBomb as exc:
        return str(exc)
    except DecodingRefused:
        return ""
    return ""


def read_cassette(path: Path) -> list[Interaction]:
    """Every interaction of one cassette, in the order recorded.

    Raises CassetteError, naming the file, if vcrpy cannot load it.
    """
    migration, serialize, decode_response, jsonserializer, yamlserializer = _vcr()
    is_json = path.suffix == ".json"
    serializer = jsonserializer if is_json else yamlserializer
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CassetteError(f"{path}: cannot read the cassette: {exc}") from None
    try:
        try:
            loaded = serialize.deserialize(text, serializer)
        except ValueError as first:
            # vcrpy refuses pre-1.0 cassettes; its migration code turns them into the current format.
            migrated = io.StringIO()
            try:
                converted = (migration.migrate_json if is_json else migration.migrate_yml)(
                    io.StringIO(text), migrated
                )
            except Exception:
                converted = False
            if not converted:
                raise first from None
            loaded = serialize.deserialize(migrated.getvalue(), serializer)
        requests, responses = loaded[0], loaded[1]
        interactions = []
        for index, (request, response) in enumerate(zip(requests, responses, strict=True)):
            if problem := _coding_problem(response):  # before vcrpy inflates it whole in memory
                raise CassetteError(f"{path}: interaction {index}: refused: {problem}")
            decoded = decode_response(response)
            pairs = [
                (str(k), str(v)) for k, vs in (decoded.get("headers") or {}).items() for v in _values(vs)
            ]
            if problem := headers_problem(pairs, known=None):  # a CR/LF would split a reply
                raise CassetteError(f"{path}: interaction {index}: refused: {problem}")
            headers = httpx.Headers(pairs)
            body = (decoded.get("body") or {}).get("string") or b""
            if isinstance(body, str):
                body = body.encode("utf-8")
            interactions.append(
                Interaction(
                    source=f"{path}#{index}",
                    method=str(request.method).upper(),
                    url=str(request.uri),
                    request_headers={str(k): ", ".join(_values(v)) for k, v in request.headers.items()},
                    status=int(decoded["status"]["code"]),
                    headers=headers,
                    body=bytes(body),
                )
            )
    except CassetteError:
        raise
    except Exception as exc:  # vcrpy and PyYAML raise a wide variety for a file that is not a cassette
        raise CassetteError(f"{path}: not a vcrpy cassette: {type(exc).__name__}: {exc}") from None
    return interactions


def _values(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


# -- storing -----------------------------------------------------------------------
class _OfflineContext:
    """A FormatContext that answers from the cache only (no upstream, any age)."""

    def __init__(self, cache: Cache, proxy: ProxyDefinition, request: ProxyRequest) -> None:
        self.cache = cache
        self.proxy = proxy
        self.request = request

    def now(self) -> float:
        return time.time()

    def cached(self, path: str, variant: str = "") -> Entry | None:
        entry = self.cache.lookup(self.proxy.key, path, variant)
        if entry is None or self.cache.verified_blob(entry) is None:
            return None
        return entry

    def metadata(self, resource: Resource) -> tuple[Entry, bytes]:
        entry = self.cached(resource.path, resource.variant)
        if entry is None or entry.kind not in (Kind.METADATA.value, Kind.ARTIFACT.value):
            raise FormatError(404, f"{resource.upstream_url} is neither cached nor in the cassettes")
        return entry, self.cache.blob_path(entry.sha256).read_bytes()


def _priority(route: Route) -> int:
    """Index pages and checksums first: files are resolved and verified against them."""
    if route.proxy.format == "pypi" and route.path.startswith("simple"):
        return 0
    if route.proxy.format == "maven" and route.path.split("?", 1)[0].endswith(_CHECKSUM_SUFFIXES):
        return 0
    return 1


class CassetteImporter:
    def __init__(self, settings: Settings, *, key: str | None = None) -> None:
        if key is not None and settings.proxy(key) is None:
            known = ", ".join(p.key for p in settings.proxies) or "none"
            raise CassetteError(f"no upstream proxy with key {key!r} (configured: {known})")
        self.settings = settings
        self.key = key
        self.cache = Cache(settings.cache_dir)
        self.router = Router(settings.proxies)
        self.report = ImportReport()

    def run(self, paths: Iterable[Path]) -> ImportReport:
        """Parse every cassette first (one bad file: nothing is imported), then store."""
        cassettes = find_cassettes(paths)
        parsed = [read_cassette(path) for path in cassettes]
        self.report.cassettes = len(cassettes)
        queue: list[tuple[int, int, Interaction, Route]] = []
        for interaction in (i for items in parsed for i in items):
            self.report.interactions += 1
            route = self._route(interaction)
            if route is not None:
                queue.append((_priority(route), len(queue), interaction, route))
        for _, _, interaction, route in sorted(queue, key=lambda item: item[:2]):
            self._import(interaction, route)
        return self.report

    def _route(self, interaction: Interaction) -> Route | None:
        if interaction.method != "GET":
            self.report.skip(interaction, "not GET")
            return None
        if interaction.status != 200:
            self.report.skip(interaction, "not 200", f"answered {interaction.status}")
            return None
        if self.key is not None:
            route = self.router.route_as(interaction.url, self.key)
        else:
            route = self.router.route(interaction.url)
        if route is None:
            where = f"proxy {self.key!r}" if self.key else "any configured proxy"
            self.report.skip(interaction, "no proxy", f"not under the source URL of {where}")
            return None
        if route.proxy.format not in IMPORTABLE_FORMATS:
            self.report.skip(interaction, "unsupported format", f"format {route.proxy.format!r}")
            return None
        encoding = interaction.headers.get("content-encoding", "identity")
        if encoding.strip().lower() not in ("", "identity"):
            self.report.skip(
                interaction, "undecodable", f"Content-Encoding {encoding} (vcrpy cannot decode it)"
            )
            return None
        return route

    def _import(self, interaction: Interaction, route: Route) -> None:
        proxy = route.proxy
        fmt = get_format(proxy.format)
        assert fmt is not None
        raw_path, _, query = route.path.partition("?")
        try:
            _, path = split_proxy_path(f"/{proxy.key}/{raw_path}")
        except (BadPath, UnicodeDecodeError) as exc:
            self.report.skip(interaction, "bad path", str(exc))
            return
        request = ProxyRequest(
            method="GET",
            key=proxy.key,
            path=path,
            query=query,
            headers=Headers(list(interaction.request_headers.items())),
            base_url="http://127.0.0.1",
        )
        try:
            resource = fmt.resolve(request, _OfflineContext(self.cache, proxy, request))
        except (FormatError, MalformedUpstream) as exc:
            self.report.skip(interaction, "unresolved", str(exc))
            return
        if isinstance(resource, Reply):  # e.g. pypi's redirect to the normalised name
            self.report.skip(interaction, "unresolved", f"the proxy answers {resource.status} there")
            return
        try:
            self._store(interaction, proxy, fmt, resource)
        except MalformedUpstream as exc:
            self.report.skip(interaction, "malformed", str(exc))
        except DigestMismatch as exc:
            self.report.skip(interaction, "digest mismatch", str(exc))

    def _store(self, interaction: Interaction, proxy: ProxyDefinition, fmt: Format, res: Resource) -> None:
        with self.cache.locked(proxy.key, res.path, res.variant, self.settings.lock_timeout):
            existing = self.cache.lookup(proxy.key, res.path, res.variant)
            if existing is not None and self.cache.verified_blob(existing) is not None:
                self.report.already_cached += 1
                return
            body = interaction.body
            is_new = not self.cache.blob_path(hashlib.sha256(body).hexdigest()).is_file()
            # the live fetch's pipeline: the format's checks, published digests, blob and entry
            entry = store_answer(self.cache, fmt, res, proxy.key, interaction.headers, [body], time.time())
        self.report.imported += 1
        if is_new:
            self.report.new_blobs += 1
            self.report.new_bytes += entry.size


def import_cassettes(paths: Iterable[Path], settings: Settings, *, key: str | None = None) -> ImportReport:
    """Import the cassettes at ``paths`` (files or directories) into ``settings.cache_dir``."""
    return CassetteImporter(settings, key=key).run(paths)


__all__ = [
    "CassetteError",
    "ImportReport",
    "Interaction",
    "find_cassettes",
    "import_cassettes",
    "read_cassette",
]
