"""``upstream-proxy cache import-cassettes``: vcrpy cassettes into the cache, then served offline.

The cassettes are recorded here with real vcrpy against a loopback upstream,
so their format is exactly what vcrpy writes (binary bodies as base64
``!!binary``, gzip bodies still compressed, the JSON serializer too).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import textwrap
import urllib.request
from pathlib import Path

import httpx
import pytest
import requests
import vcr

from pytest_upstream.cli import main as cli
from pytest_upstream.clients.inprocess import InProcessRouting
from pytest_upstream.store.cache import Cache

from .conftest import MakeProxy, proxy_def
from .upstreams import Fault, Upstream

BINARY = os.urandom(3000)
TEXT = b"plain text, " * 50
GZ_TEXT = b"stored decoded, served decoded. " * 40
SDIST = b"the sdist's bytes"


def _config(path: Path, upstream_url: str) -> Path:
    path.write_text(
        textwrap.dedent(
            f"""
            [tool.pytest-upstream]
            [[tool.pytest-upstream.proxy]]
            key = "g"
            source = "custom"
            format = "generic"
            url = "{upstream_url}/files"
            mutable_paths = ["*.json"]
            [[tool.pytest-upstream.proxy]]
            key = "py"
            source = "custom"
            format = "pypi"
            url = "{upstream_url}/simple/"
            """
        )
    )
    return path


def _publish(up: Upstream) -> None:
    up.files["/files/a.bin"] = BINARY
    up.files["/files/copy.bin"] = BINARY  # the same bytes under another name, in another cassette
    up.files["/files/b.txt"] = TEXT
    up.content_types["/files/b.txt"] = "text/plain; charset=utf-8"
    up.files["/files/index.json"] = b'{"latest": "1.0"}'
    up.files["/files/gz.txt"] = gzip.compress(GZ_TEXT)
    up.faults["/files/gz.txt"] = Fault(headers={"Content-Encoding": "gzip"})
    good, bad = hashlib.sha256(SDIST).hexdigest(), "0" * 64
    up.files["/simple/demo-pkg/"] = (
        f'<a href="../../packages/demo_pkg-1.0.tar.gz#sha256={good}">demo_pkg-1.0.tar.gz</a>\n'
        f'<a href="../../packages/demo_pkg-2.0.tar.gz#sha256={bad}">demo_pkg-2.0.tar.gz</a>\n'
    ).encode()
    up.content_types["/simple/demo-pkg/"] = "text/html"
    up.files["/packages/demo_pkg-1.0.tar.gz"] = SDIST
    up.files["/packages/demo_pkg-2.0.tar.gz"] = SDIST  # not what the page's hash says


def _record(up: Upstream, directory: Path) -> None:
    recorder = vcr.VCR(record_mode="once")
    with recorder.use_cassette(str(directory / "one.yaml")):
        assert requests.get(up.url + "/files/a.bin", timeout=10).content == BINARY
        assert httpx.get(up.url + "/files/b.txt").content == TEXT
        assert requests.get(up.url + "/files/gz.txt", timeout=10).content == GZ_TEXT  # requests decodes
        assert requests.get(up.url + "/files/missing.bin", timeout=10).status_code == 404
        assert requests.post(up.url + "/files/a.bin", data=b"x", timeout=10).status_code == 501
        # a file before its index page: the import orders pages first
        with urllib.request.urlopen(up.url + "/packages/demo_pkg-1.0.tar.gz") as r:
            assert r.read() == SDIST
        assert requests.get(up.url + "/packages/demo_pkg-2.0.tar.gz", timeout=10).content == SDIST
        assert requests.get(up.url + "/simple/demo-pkg/", timeout=10).status_code == 200
    with recorder.use_cassette(str(directory / "nested" / "two.yaml")):
        assert requests.get(up.url + "/files/a.bin", timeout=10).content == BINARY
        assert requests.get(up.url + "/files/copy.bin", timeout=10).content == BINARY
    with recorder.use_cassette(str(directory / "three.json"), serializer="json"):  # text bodies only
        assert httpx.get(up.url + "/files/index.json").json() == {"latest": "1.0"}


def _old_format_cassette(path: Path, port: int) -> None:
    """A cassette as vcrpy wrote them before 1.0 (tags, flat request fields, header lines)."""
    path.write_text(
        textwrap.dedent(
            f"""\
            - request: !!python/object:vcr.request.Request
                body: null
                headers: !!python/object/apply:builtins.frozenset
                - - !!python/tuple [accept, '*/*']
                host: 127.0.0.1
                method: GET
                path: /files/old.txt
                port: {port}
                protocol: http
              response:
                body: {{string: !!python/unicode "recorded by an old vcrpy"}}
                headers: [!!python/unicode "content-type: text/plain\\r\\n", "content-length: 24\\r\\n"]
                status: {{code: 200, message: OK}}
            """
        )
    )


def _import(config: Path, cache: Path, *args: str) -> int:
    return cli.main(["--config", str(config), "cache", "import-cassettes", *args, "--cache", str(cache)])


def _blobs(cache: Path) -> list[Path]:
    return [p for p in (cache / "blobs" / "sha256").rglob("*") if p.is_file()]


def test_import_then_replay_offline(
    upstream: Upstream, make_proxy: MakeProxy, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _publish(upstream)
    cassettes = tmp_path / "cassettes"
    _record(upstream, cassettes)
    _old_format_cassette(cassettes / "old.yaml", upstream.port)
    one = (cassettes / "one.yaml").read_text()
    assert "!!binary" in one and "gzip" in one  # vcrpy's own encodings, as recorded
    config = _config(tmp_path / "pyproject.toml", upstream.url)
    cache_dir = tmp_path / "cache"

    assert _import(config, cache_dir, str(cassettes), "-v") == 0
    out = capsys.readouterr().out
    assert f"imported 8 responses from 4 cassettes (12 interactions) into {cache_dir}: 7 new blobs, " in out
    assert "1 already cached; skipped: 1 digest mismatch, 1 not 200, 1 not GET" in out
    assert "one.yaml#4: POST" in out and "demo_pkg-2.0.tar.gz: " in out

    cache = Cache(cache_dir)
    entries = {(e.key, e.path): e for e in cache.iter_entries()}
    assert sorted(entries) == [
        ("g", "a.bin"),
        ("g", "b.txt"),
        ("g", "copy.bin"),
        ("g", "gz.txt"),
        ("g", "index.json"),
        ("g", "old.txt"),
        ("py", "files/demo-pkg/demo_pkg-1.0.tar.gz"),
        ("py", "simple/demo-pkg/"),
    ]
    assert entries["g", "a.bin"].sha256 == entries["g", "copy.bin"].sha256  # one blob for both
    assert len(_blobs(cache_dir)) == 7
    assert entries["g", "a.bin"].upstream_url == upstream.url + "/files/a.bin"
    assert entries["g", "index.json"].kind == "metadata"
    assert entries["py", "simple/demo-pkg/"].kind == "metadata"
    assert entries["g", "b.txt"].kind == "artifact"
    assert entries["g", "b.txt"].content_type == "text/plain; charset=utf-8"
    assert entries["g", "gz.txt"].size == len(GZ_TEXT)  # stored decoded
    assert entries["py", "files/demo-pkg/demo_pkg-1.0.tar.gz"].upstream_url.endswith(
        "/packages/demo_pkg-1.0.tar.gz"
    )

    upstream.stop()
    proxy = make_proxy(
        *(proxy_def(key=k, format=f, url=upstream.url + p) for k, f, p in _DEFS),
        mode="replay",
        cache=cache_dir,
    )
    served = {
        "g/a.bin": BINARY,
        "g/copy.bin": BINARY,
        "g/b.txt": TEXT,
        "g/gz.txt": GZ_TEXT,
        "g/old.txt": b"recorded by an old vcrpy",
        "py/files/demo-pkg/demo_pkg-1.0.tar.gz": SDIST,
    }
    for path, data in served.items():
        assert httpx.get(f"{proxy.base_url}/{path}").content == data, path
    assert json.loads(httpx.get(f"{proxy.base_url}/g/index.json").content) == {"latest": "1.0"}
    page = httpx.get(f"{proxy.base_url}/py/simple/demo-pkg/")
    assert page.status_code == 200 and "../../files/demo-pkg/demo_pkg-1.0.tar.gz#sha256=" in page.text

    # the code that made the recordings, run again in-process: served from the cache
    with InProcessRouting.for_server(proxy).activate() as routing:
        assert requests.get(upstream.url + "/files/a.bin", timeout=10).content == BINARY
        assert httpx.get(upstream.url + "/files/b.txt").content == TEXT
        with urllib.request.urlopen(upstream.url + "/packages/demo_pkg-1.0.tar.gz") as r:
            assert r.read() == SDIST
    assert len(routing.routed) == 3
    assert all(r.cache == "hit" for r in proxy.served.records)


_DEFS = [("g", "generic", "/files"), ("py", "pypi", "/simple/")]


def test_key_imports_another_origin(
    upstream: Upstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _config(tmp_path / "pyproject.toml", upstream.url)
    with Upstream() as mirror:  # recorded against another host with the same layout
        mirror.files["/files/k.bin"] = b"k"
        with vcr.VCR(record_mode="once").use_cassette(str(tmp_path / "c" / "k.yaml")):
            requests.get(mirror.url + "/files/k.bin", timeout=10)
    assert _import(config, tmp_path / "cache", str(tmp_path / "c")) == 0
    assert "imported 0 responses" in capsys.readouterr().out  # no proxy has that origin
    assert _import(config, tmp_path / "cache", str(tmp_path / "c" / "k.yaml"), "--key", "g") == 0
    assert "imported 1 responses" in capsys.readouterr().out
    (entry,) = Cache(tmp_path / "cache").iter_entries()
    assert (entry.key, entry.path, entry.upstream_url) == ("g", "k.bin", upstream.url + "/files/k.bin")
    assert _import(config, tmp_path / "cache", str(tmp_path / "c"), "--key", "nope") == 1
    assert "no upstream proxy with key 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "text",
    [
        "interactions: [oops",
        "just a string\n",
        "- request: {}\n  response: {}\n",
        "{version: 1, interactions: [{}]}",
    ],
)
def test_a_cassette_that_does_not_parse_is_refused_by_name(
    upstream: Upstream, tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
) -> None:
    upstream.files["/files/ok.bin"] = b"ok"
    directory = tmp_path / "c"
    with vcr.VCR(record_mode="once").use_cassette(str(directory / "good.yaml")):
        requests.get(upstream.url + "/files/ok.bin", timeout=10)
    (directory / "broken.yaml").write_text(text)
    config = _config(tmp_path / "pyproject.toml", upstream.url)
    assert _import(config, tmp_path / "cache", str(directory)) == 1
    err = capsys.readouterr().err
    assert f"{directory / 'broken.yaml'}: not a vcrpy cassette" in err
    assert "nothing was imported" in err
    assert list(Cache(tmp_path / "cache").iter_entries()) == []


def test_a_recorded_decompression_bomb_is_refused_before_it_is_inflated(
    upstream: Upstream, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A cassette is a file anyone may have edited: a gzip body inflating to 256 MiB is refused by
    the proxy's bounded decoder, naming the cassette, before vcrpy would inflate it whole."""
    import zlib

    import yaml

    squeezer = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    bomb = b"".join(squeezer.compress(bytes(1 << 20)) for _ in range(256)) + squeezer.flush()
    upstream.files["/files/bomb.bin"] = gzip.compress(b"small")
    upstream.faults["/files/bomb.bin"] = Fault(headers={"Content-Encoding": "gzip"})
    directory = tmp_path / "c"
    cassette = directory / "bomb.yaml"
    with vcr.VCR(record_mode="once").use_cassette(str(cassette)):
        requests.get(upstream.url + "/files/bomb.bin", timeout=10)
    recorded = yaml.safe_load(cassette.read_text())
    recorded["interactions"][0]["response"]["body"]["string"] = bomb  # hand-edited: still "gzip"
    cassette.write_text(yaml.safe_dump(recorded))
    config = _config(tmp_path / "pyproject.toml", upstream.url)
    assert _import(config, tmp_path / "cache", str(directory)) == 1
    err = capsys.readouterr().err
    assert f"{cassette}: interaction 0: refused:" in err
    assert "decompression bomb" in err
    assert list(Cache(tmp_path / "cache").iter_entries()) == []
