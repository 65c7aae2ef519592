"""Refresh mode, metadata TTLs and upstream authentication through a real server."""

from __future__ import annotations

import base64
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pytest_upstream.engine.clock import ManualClock

from .conftest import MakeProxy, proxy_def
from .upstreams import Upstream


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as r:
            return r.status, r.read(), dict(r.headers.items())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers.items())


def generic(url: str, **extra: object) -> object:
    return proxy_def(key="g", format="generic", url=url, mutable_paths=["*.json"], **extra)


def test_refresh_refetches_metadata_once_and_keeps_artifacts(
    upstream: Upstream, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    upstream.files["/m.json"] = b"v1"
    upstream.files["/a.bin"] = b"artifact-1"
    cache = tmp_path / "shared"
    rec = make_proxy(generic(upstream.url), cache=cache)
    assert get(rec.url("g") + "m.json")[1] == b"v1"
    assert get(rec.url("g") + "a.bin")[1] == b"artifact-1"
    upstream.files["/m.json"] = b"v2"
    upstream.files["/a.bin"] = b"artifact-2"  # an upstream that rewrites an artifact is ignored
    # record within the TTL: still the recorded metadata
    assert get(rec.url("g") + "m.json")[1] == b"v1"
    ref = make_proxy(generic(upstream.url), cache=cache, mode="refresh")
    status, body, headers = get(ref.url("g") + "m.json")
    assert (status, body, headers["X-Upstream-Cache"]) == (200, b"v2", "miss")
    assert get(ref.url("g") + "m.json")[2]["X-Upstream-Cache"] == "hit"  # once per run
    assert get(ref.url("g") + "a.bin")[1] == b"artifact-1"
    assert upstream.hits["/m.json"] == 2 and upstream.hits["/a.bin"] == 1


def test_metadata_ttl_expiry_refetches(upstream: Upstream, make_proxy: MakeProxy) -> None:
    clock = ManualClock()
    upstream.files["/m.json"] = b"v1"
    proxy = make_proxy(generic(upstream.url, metadata_ttl=600), clock=clock)
    assert get(proxy.url("g") + "m.json")[1] == b"v1"
    upstream.files["/m.json"] = b"v2"
    clock.advance(599)
    status, body, headers = get(proxy.url("g") + "m.json")
    assert (status, body, headers["X-Upstream-Cache"]) == (200, b"v1", "hit")
    clock.advance(1)
    status, body, headers = get(proxy.url("g") + "m.json")
    assert (status, body, headers["X-Upstream-Cache"]) == (200, b"v2", "miss")
    assert upstream.hits["/m.json"] == 2


SECRET_USER, SECRET_PASS, SECRET_TOKEN = "alice-user-7f3a", "s3cr3t-pass-91bd", "tok-e5a1c0ffee"


def _cache_text(cache: Path) -> bytes:
    return b"".join(p.read_bytes() for p in cache.rglob("*") if p.is_file())


@pytest.mark.parametrize("mode", ["basic", "bearer"])
def test_credentials_come_from_env_and_are_never_stored(
    mode: str, upstream: Upstream, make_proxy: MakeProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UP_USER", SECRET_USER)
    monkeypatch.setenv("UP_PASS", SECRET_PASS)
    monkeypatch.setenv("UP_TOKEN", SECRET_TOKEN)
    auth = (
        {"auth": "basic", "username_env": "UP_USER", "password_env": "UP_PASS"}
        if mode == "basic"
        else {"auth": "bearer", "token_env": "UP_TOKEN"}
    )
    upstream.files["/a.bin"] = b"private"
    definition = generic(upstream.url, **auth)
    proxy = make_proxy(definition, cache=tmp_path / "cache")
    assert get(proxy.url("g") + "a.bin")[1] == b"private"
    sent = dict((k.lower(), v) for k, v in upstream.request_headers[-1][1].items())
    expected = (
        "Basic " + base64.b64encode(f"{SECRET_USER}:{SECRET_PASS}".encode()).decode()
        if mode == "basic"
        else f"Bearer {SECRET_TOKEN}"
    )
    assert sent["authorization"] == expected
    stored = _cache_text(tmp_path / "cache")
    for secret in (SECRET_USER, SECRET_PASS, SECRET_TOKEN, expected):
        assert secret.encode() not in stored
        assert secret not in repr(definition)
        assert secret not in repr(proxy.served.records)


def test_missing_credentials_variable_is_a_clear_502(
    upstream: Upstream, make_proxy: MakeProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("UP_TOKEN", raising=False)
    upstream.files["/a.bin"] = b"private"
    proxy = make_proxy(generic(upstream.url, auth="bearer", token_env="UP_TOKEN"))
    status, body, _ = get(proxy.url("g") + "a.bin")
    assert status == 502
    assert b"UP_TOKEN" in body and b"not set" in body
    assert upstream.hits["/a.bin"] == 0


def test_upstream_refusing_credentials_is_a_502_naming_the_proxy(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    from .upstreams import Fault

    upstream.files["/a.bin"] = b"private"
    upstream.faults["/a.bin"] = Fault(status=401)
    proxy = make_proxy(generic(upstream.url))
    status, body, _ = get(proxy.url("g") + "a.bin")
    assert status == 502
    assert b"refused access (401)" in body and b"'g'" in body


@pytest.mark.public_registry
def test_builtin_pypi_source_with_real_pip(tmp_path: Path) -> None:
    """Opt-in (--run-public): real pip through the built-in ``pypi`` source, no config at all."""
    from pytest_upstream.config.settings import Settings, builtin_proxies
    from pytest_upstream.server.proxy_server import ProxyServer

    from .pip_setup import pip_env, pip_install

    with ProxyServer(Settings(cache_dir=tmp_path / "c", proxies=builtin_proxies())) as server:
        result = pip_install(tmp_path / "t", "six", env=pip_env(server.url("pypi") + "simple/"))
        assert result.returncode == 0, result.stderr
        assert any(r.path.startswith("files/six/") and r.cache == "miss" for r in server.served.records)
