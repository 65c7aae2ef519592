"""Issue 10, part "secrets": secrets never in output, credentials stay with their origin,
untrusted clients (the token, the Host check) and dot-segment variants refused before forwarding.

Loopback only; every test bounded.  pip (from the venv), npm and curl are the real clients.
"""

from __future__ import annotations

import base64
import json
import logging
import shutil
import socket
import subprocess
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from pytest_upstream.cli.client_flags import warn_if_open
from pytest_upstream.cli.main import main
from pytest_upstream.config.auth import AuthSpec, CredentialsError, env_problems, scrub, value_problem
from pytest_upstream.config.settings import ConfigError, Settings, parse_table
from pytest_upstream.config.sources import BUILTIN_SOURCES
from pytest_upstream.formats.docker_auth import may_send_credentials
from pytest_upstream.messages import BadPath, Headers, split_proxy_path
from pytest_upstream.pytest_plugin.harness import UpstreamProxy
from pytest_upstream.server.admission import Admission
from pytest_upstream.server.proxy_server import ProxyServer

from .conftest import MakeProxy, proxy_def
from .oci import OCI_MANIFEST, http
from .upstreams import Answer as UpstreamAnswer
from .upstreams import FakeRegistry, Upstream

SECRET = "tok-5ecret-value-93f1"
MANIFEST = b'{"schemaVersion": 2, "layers": []}'


def raw(server: ProxyServer, request: bytes, timeout: float = 5.0) -> bytes:
    """Send ``request`` on a new connection, read until the server closes it."""
    port = urlsplit(server.base_url).port
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., ProxyServer]]:
    """``start(*proxies, host=..., **settings fields)``: a ProxyServer with any settings."""
    servers: list[ProxyServer] = []

    def make(*proxies: object, host: str = "127.0.0.1", **fields: object) -> ProxyServer:
        settings = Settings(cache_dir=tmp_path / "cache", proxies=tuple(proxies), **fields)  # type: ignore[arg-type]
        server = ProxyServer(settings, host=host).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


# -- secrets never in output ---------------------------------------------------------------------
def test_scrub_removes_url_credentials_header_values_and_env_values() -> None:
    env = {"PRIV_TOKEN": SECRET + "\n", "PRIV_PASS": "hunter2-pass"}
    text = (
        f"Illegal header value b'Bearer {SECRET}\\n'; fetching https://bob:hunter2-pass@host/x "
        "with Basic Ym9iOmh1bnRlcjItcGFzcw== failed; basic auth needs PRIV_TOKEN"
    )
    out = scrub(text, ["PRIV_TOKEN", "PRIV_PASS"], env)
    assert SECRET not in out and "hunter2-pass" not in out and "Ym9iOmh1bnRlcjItcGFzcw" not in out
    assert "https://<redacted>@host/x" in out
    assert "basic auth needs PRIV_TOKEN" in out  # prose and variable names stay readable


def test_a_value_scrubbed_also_when_only_python_quoted_it() -> None:
    env = {"T": "line1\nline2-secret"}
    assert "line2-secret" not in scrub(repr("x line1\nline2-secret y"), ["T"], env)


@pytest.mark.parametrize(
    "value", [SECRET + "\n", SECRET + "\r\n", " " + SECRET, SECRET + " ", "a\rb-token", ""]
)
def test_bad_environment_values_are_errors_naming_the_variable_only(value: str) -> None:
    assert value_problem(value)
    (problem,) = env_problems(["PRIV_TOKEN", "UNSET_VAR"], {"PRIV_TOKEN": value})
    assert problem.startswith("the environment variable PRIV_TOKEN ")
    assert SECRET not in problem and (not value.strip() or value.strip() not in problem)
    with pytest.raises(CredentialsError, match="PRIV_TOKEN") as info:
        AuthSpec("bearer", token_env="PRIV_TOKEN").headers({"PRIV_TOKEN": value})
    assert SECRET not in str(info.value)


def test_a_token_gone_bad_at_request_time_is_in_no_output(
    upstream: Upstream,
    make_proxy: MakeProxy,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A token with a stray newline once reached the HTTP library, whose error quoted the header:
    the 502 body and the served record carried the whole token.  Now it is refused by name."""
    upstream.files["/a.bin"] = b"private"
    monkeypatch.setenv("PRIV_TOKEN", SECRET)
    proxy = make_proxy(
        proxy_def(key="g", format="generic", url=upstream.url, auth="bearer", token_env="PRIV_TOKEN")
    )
    monkeypatch.setenv("PRIV_TOKEN", SECRET + "\n")
    caplog.set_level(logging.DEBUG, logger="pytest_upstream")
    port = urlsplit(proxy.base_url).port
    answer = raw(
        proxy, f"GET /g/a.bin HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode()
    )
    assert answer.startswith(b"HTTP/1.1 502 ") and b"PRIV_TOKEN" in answer
    report = json.dumps(UpstreamProxy(proxy).report(detail=True))
    records = repr(proxy.served.records)
    for output in (answer.decode("latin-1"), report, records, caplog.text):
        assert SECRET not in output
    assert upstream.hits["/a.bin"] == 0


def test_serve_refuses_a_token_with_a_newline_naming_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "pyproject.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [tool.pytest-upstream]
            cache = "{tmp_path / "cache"}"
            [[tool.pytest-upstream.proxy]]
            key = "g"
            format = "generic"
            url = "http://127.0.0.1:9/"
            auth = "bearer"
            token_env = "PRIV_TOKEN"
            """
        )
    )
    monkeypatch.setenv("PRIV_TOKEN", SECRET + "\n")
    assert main(["--config", str(config), "serve", "--port", "0"]) == 2
    out, err = capsys.readouterr()
    assert "PRIV_TOKEN" in err and "whitespace" in err and SECRET not in out + err
    monkeypatch.setenv("PRIV_TOKEN", SECRET)
    monkeypatch.setenv("CLIENT_TOKEN", " " + SECRET)
    assert main(["--config", str(config), "serve", "--port", "0", "--token-env", "CLIENT_TOKEN"]) == 2
    out, err = capsys.readouterr()
    assert "CLIENT_TOKEN" in err and SECRET not in out + err


# -- credentials stay with their origin ------------------------------------------------------------
@pytest.fixture
def registry_creds(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeRegistry]:
    with FakeRegistry(auth="token") as fake:
        monkeypatch.setenv("REG_USER", fake.user[0])
        monkeypatch.setenv("REG_PASS", fake.user[1])
        fake.add_manifest("demo/app", "v1", (OCI_MANIFEST, MANIFEST))
        yield fake


def _docker_basic(url: str, **extra: object) -> object:
    return proxy_def(
        key="oci",
        format="docker",
        url=url,
        auth="basic",
        username_env="REG_USER",
        password_env="REG_PASS",
        **extra,
    )


def test_a_token_realm_on_another_origin_gets_no_credentials(
    registry_creds: FakeRegistry, make_proxy: MakeProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """The proxy reaches the registry as ``localhost``; its challenge names a realm on
    ``127.0.0.1`` (another origin): the token is asked for anonymously, and a warning says why."""
    fake = registry_creds
    # allow_hosts lets the proxy connect to the realm (a loopback address: the SSRF guard's
    # business), which is not the same as sending it credentials (auth_hosts).
    proxy = make_proxy(
        _docker_basic(f"http://localhost:{fake.port}"), allow_hosts=(f"127.0.0.1:{fake.port}",)
    )
    status, _, _ = http(f"{proxy.base_url}/v2/oci/demo/app/manifests/v1")
    assert status == 200  # an anonymous pull token does for this image
    assert fake.token_requests and all("Authorization" not in h for _, h in fake.token_requests)
    assert "without the proxy's credentials" in caplog.text


def test_a_token_realm_listed_in_auth_hosts_gets_the_credentials(
    registry_creds: FakeRegistry, make_proxy: MakeProxy
) -> None:
    fake = registry_creds
    proxy = make_proxy(_docker_basic(f"http://localhost:{fake.port}", auth_hosts=[f"127.0.0.1:{fake.port}"]))
    assert http(f"{proxy.base_url}/v2/oci/demo/app/manifests/v1")[0] == 200
    basic = "Basic " + base64.b64encode(f"{fake.user[0]}:{fake.user[1]}".encode()).decode()
    assert [h.get("Authorization") for _, h in fake.token_requests] == [basic]


def test_realm_rules_https_to_http_never_and_the_built_in_pair() -> None:
    secure = proxy_def(key="r", format="docker", url="https://registry.example/", auth_hosts=["auth.example"])
    assert may_send_credentials(secure, "https://registry.example/token")
    assert may_send_credentials(secure, "https://auth.example/token")
    assert may_send_credentials(secure, "https://auth.example:8443/token")  # "host": any port
    assert not may_send_credentials(secure, "http://registry.example/token")  # https -> http
    assert not may_send_credentials(secure, "http://auth.example/token")  # listed, but downgraded
    assert not may_send_credentials(secure, "https://elsewhere.example/token")
    pinned = proxy_def(key="p", format="docker", url="http://127.0.0.1:5000/", auth_hosts=["127.0.0.1:6000"])
    assert may_send_credentials(pinned, "http://127.0.0.1:6000/token")
    assert not may_send_credentials(pinned, "http://127.0.0.1:6001/token")
    hub = BUILTIN_SOURCES["dockerhub"]
    builtin = proxy_def(key="hub", source="dockerhub")
    (auth_host,) = hub.auth_hosts
    assert may_send_credentials(builtin, f"https://{auth_host}/token")
    assert not may_send_credentials(builtin, f"http://{auth_host}/token")
    assert not may_send_credentials(builtin, "https://auth.example/token")
    # the built-in pair is for the built-in URL only, not a mirror configured in its place
    mirror = proxy_def(key="hub", source="dockerhub", url="https://mirror.example/")
    assert not may_send_credentials(mirror, f"https://{auth_host}/token")


def test_auth_hosts_and_allowed_hosts_are_validated() -> None:
    table = {
        "allowed_hosts": ["Proxy.Internal", "10.0.0.5:8080"],
        "proxy": [{"key": "d", "format": "docker", "url": "https://r.example/", "auth_hosts": ["a.example"]}],
    }
    settings = parse_table(table, "t", Path("."))
    assert settings.allowed_hosts == ("proxy.internal", "10.0.0.5:8080")
    assert settings.proxies[0].auth_hosts == ("a.example",)
    assert settings.proxies[0].as_table()["auth_hosts"] == ["a.example"]
    for bad in (
        {"allowed_hosts": "x"},
        {"allowed_hosts": ["a b"]},
        {"allowed_hosts": ["x\r\nSet-Cookie: a"]},
    ):
        with pytest.raises(ConfigError, match="allowed_hosts"):
            parse_table(bad, "t", Path("."))


# -- clients: Host check (DNS rebinding) -----------------------------------------------------------
def test_a_loopback_proxy_answers_only_loopback_or_listed_hosts(
    upstream: Upstream, start: Callable[..., ProxyServer]
) -> None:
    upstream.files["/a.txt"] = b"hello"
    proxy = start(proxy_def(key="g", format="generic", url=upstream.url), allowed_hosts=("proxy.internal",))
    port = urlsplit(proxy.base_url).port

    def status(host: str, path: str = "/g/a.txt") -> bytes:
        answer = raw(proxy, f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        return answer.split(b"\r\n", 1)[0]

    for host in (
        f"127.0.0.1:{port}",
        f"localhost:{port}",
        f"[::1]:{port}",
        "proxy.internal",
        f"proxy.internal:{port}",
    ):
        assert status(host).startswith(b"HTTP/1.1 200 "), host
    for host in (
        "attacker.example",
        f"attacker.example:{port}",
        "192.168.1.10",
        f"proxy.internal.evil:{port}",
    ):
        assert status(host).startswith(b"HTTP/1.1 421 "), host
        assert status(host, "/").startswith(b"HTTP/1.1 421 ")  # the index too
        assert status(host, "/-/metrics").startswith(b"HTTP/1.1 421 ")
    assert upstream.hits["/a.txt"] == 1


def test_the_host_check_applies_to_loopback_binds_only() -> None:
    admission = Admission(loopback_bound=False)
    assert admission.refusal("/g/x", Headers([("Host", "proxy.example.com")])) is None
    loopback = Admission(loopback_bound=True, allowed_hosts=frozenset({"[fd00::1]"}))
    assert loopback.host_allowed("[fd00::1]:8080") and loopback.host_allowed("sub.localhost")
    assert not loopback.host_allowed("127.0.0.1.nip.example")


def test_a_non_loopback_bind_without_a_token_warns(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    settings = Settings(cache_dir=tmp_path)
    warn_if_open("0.0.0.0", settings)
    assert "warning: serving on 0.0.0.0 (not loopback) without --token-env" in capsys.readouterr().err
    for host, fields in (("127.0.0.1", {}), ("::1", {}), ("0.0.0.0", {"client_token_env": "T"})):
        warn_if_open(host, Settings(cache_dir=tmp_path, **fields))  # type: ignore[arg-type]
        assert capsys.readouterr().err == ""


def test_serve_warns_at_start_of_a_credential_variable_that_is_not_set(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = {
        "proxy": [
            {
                "key": "priv",
                "format": "generic",
                "url": "http://127.0.0.1:9/",
                "auth": "bearer",
                "token_env": "PRIV_TOKEN",
            },
            {
                "key": "reg",
                "format": "generic",
                "url": "http://127.0.0.1:9/",
                "auth": "basic",
                "username_env": "REG_USER",
                "password_env": "REG_PASS",
            },
            {"key": "open", "format": "generic", "url": "http://127.0.0.1:9/"},
        ]
    }
    settings = parse_table(table, "t", tmp_path)
    for name in ("PRIV_TOKEN", "REG_USER", "REG_PASS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("REG_USER", "someone")
    warn_if_open("127.0.0.1", settings)
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "warning: proxy 'priv': the environment variable PRIV_TOKEN is not set; its requests will "
        "answer 502 until the proxy is started with it",
        "warning: proxy 'reg': the environment variable REG_PASS is not set; its requests will "
        "answer 502 until the proxy is started with it",
    ]
    monkeypatch.setenv("PRIV_TOKEN", SECRET)
    monkeypatch.setenv("REG_PASS", SECRET)
    warn_if_open("127.0.0.1", settings)
    assert capsys.readouterr().err == ""


BEARER_PROJECT = textwrap.dedent(
    """
    [tool.pytest-upstream]
    cache = "cache-dir"
    [[tool.pytest-upstream.proxy]]
    key = "g"
    format = "generic"
    url = "http://127.0.0.1:9/"
    auth = "bearer"
    token_env = "PRIV_TOKEN"
    """
)


def test_the_pytest_plugin_warns_of_a_credential_variable_that_is_not_set(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    (pytester.path / "pyproject.toml").write_text(BEARER_PROJECT)
    pytester.makepyfile(test_x="def test_x(): pass\n")
    monkeypatch.delenv("PRIV_TOKEN", raising=False)
    result = pytester.runpytest_subprocess("--upstream-proxy", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["*proxy 'g': the environment variable PRIV_TOKEN is not set*"])


# -- clients: the token ----------------------------------------------------------------------------
@pytest.fixture
def token(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("PROXY_TOKEN", SECRET)
    return SECRET


def test_token_required_bearer_or_basic_password_ready_stays_open(
    upstream: Upstream, start: Callable[..., ProxyServer], token: str
) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    upstream.files["/a.txt"] = b"hello"
    proxy = start(proxy_def(key="g", format="generic", url=upstream.url), client_token_env="PROXY_TOKEN")
    url = proxy.url("g") + "a.txt"

    def run(*args: str) -> tuple[str, str]:
        done = subprocess.run([curl, "-s", "-i", *args], capture_output=True, text=True, timeout=20)
        head, _, body = done.stdout.partition("\n\n")  # text mode: CRLF read as LF
        return head, body

    head, body = run(url)
    assert head.startswith("HTTP/1.1 401 ") and 'WWW-Authenticate: Basic realm="pytest-upstream"' in head
    assert upstream.hits["/a.txt"] == 0 and token not in head + body
    assert run("-H", f"Authorization: Bearer {token}", url)[1] == "hello"
    assert run("-u", f"anyone:{token}", url)[1] == "hello"  # Basic, the token as the password
    assert run("-H", "Authorization: Bearer wrong-token", url)[0].startswith("HTTP/1.1 401 ")
    assert run("-u", f"{token}:", url)[0].startswith("HTTP/1.1 401 ")  # the token as user name is not it
    assert run(proxy.base_url + "/-/ready")[0].startswith("HTTP/1.1 200 ")
    assert run(proxy.base_url + "/-/metrics")[0].startswith("HTTP/1.1 401 ")
    assert run(proxy.base_url + "/")[0].startswith("HTTP/1.1 401 ")


def test_token_unset_at_request_time_refuses_everything(
    upstream: Upstream, start: Callable[..., ProxyServer], token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    upstream.files["/a.txt"] = b"hello"
    proxy = start(proxy_def(key="g", format="generic", url=upstream.url), client_token_env="PROXY_TOKEN")
    monkeypatch.delenv("PROXY_TOKEN")
    status, _, _ = http(proxy.url("g") + "a.txt", headers={"Authorization": "Bearer "})
    assert status == 401 and upstream.hits["/a.txt"] == 0


def test_npm_with_an_auth_token_in_npmrc(
    upstream: Upstream, start: Callable[..., ProxyServer], token: str, tmp_path: Path
) -> None:
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed")
    from .test_npm import Registry, npm_env

    Registry(upstream)
    proxy = start(proxy_def(key="npm", format="npm", url=upstream.url + "/"), client_token_env="PROXY_TOKEN")
    registry = proxy.url("npm")
    env = npm_env(tmp_path / "npm")
    npmrc = tmp_path / "npm" / "project-npmrc"

    def view() -> subprocess.CompletedProcess[str]:
        cmd = [npm, "view", "demo-base", "version", "--registry", registry, "--userconfig", str(npmrc)]
        cmd += ["--cache", str(tmp_path / "npm" / "cache"), "--prefer-online"]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)

    npmrc.write_text("")
    refused = view()
    assert refused.returncode != 0 and token not in refused.stdout + refused.stderr
    npmrc.write_text(f"//{urlsplit(registry).netloc}/npm/:_authToken={token}\n")
    done = view()
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1.0.0"


@pytest.mark.slow
def test_pip_with_the_token_in_the_index_url(tmp_path: Path, token: str) -> None:
    from .peers import pypiserver, serve_process
    from .pip_setup import pip_env, pip_install, publish, pypi_project

    packages = publish(tmp_path / "upstream-files")
    with pypiserver(packages) as index_url:
        config = pypi_project(tmp_path / "pyproject.toml", index_url, tmp_path / "cache")
        with serve_process(config, "--token-env", "PROXY_TOKEN") as base:
            host = base.removeprefix("http://")
            refused = pip_install(
                tmp_path / "t0",
                "upstream-demo-a",
                env=pip_env(f"{base}/local/simple/") | {"PIP_NO_INPUT": "1"},
            )
            assert refused.returncode != 0 and token not in refused.stdout + refused.stderr
            url = f"http://pip:{token}@{host}/local/simple/"
            result = pip_install(tmp_path / "t1", "upstream-demo-a", env=pip_env(url) | {"PIP_NO_INPUT": "1"})
            assert result.returncode == 0, result.stderr
            assert (tmp_path / "t1" / "upstream_demo_a" / "__init__.py").is_file()


# -- path confinement --------------------------------------------------------------------------------
DOT_SEGMENT_VARIANTS = [
    "/g/..;/private/x",
    "/g/a/..;x/private",
    "/g/a/..;/..;/x",
    "/g/.%2e/private/x",
    "/g/%2e%2e/private/x",
    "/g/%2E%2e;x/private",
    "/g/.;/x",
    "/g/a/%c0%ae%c0%ae/private",
    "/g/%c0%ae%c0%ae%c0%af/x",
    "/g/a%5c..%5cprivate",
    "/g/a/..%5cprivate",
    "/g/a/..%20/private",
    "/g/a/%e0%80%ae%e0%80%ae/x",
    "/g/%ef%bc%8e%ef%bc%8e/private",  # fullwidth dots: Unicode folding makes them ".."
]


@pytest.mark.parametrize("path", DOT_SEGMENT_VARIANTS)
def test_dot_segment_variants_are_refused_before_forwarding(path: str) -> None:
    with pytest.raises((BadPath, UnicodeDecodeError)):
        split_proxy_path(path)


def test_dot_segment_variants_never_reach_the_upstream(upstream: Upstream, make_proxy: MakeProxy) -> None:
    upstream.files["/files/ok.txt"] = b"ok"
    proxy = make_proxy(proxy_def(key="g", format="generic", url=upstream.url + "/files"))
    port = urlsplit(proxy.base_url).port
    for path in DOT_SEGMENT_VARIANTS:
        answer = raw(
            proxy, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode()
        )
        assert answer.startswith(b"HTTP/1.1 400 "), (path, answer[:80])
    assert upstream.request_headers == []
    # names that merely contain dots and semicolons still go through
    for name in ("a..b;c.txt", "x;v=1.txt"):
        upstream.files[f"/files/{name}"] = b"dots"
        assert http(proxy.url("g") + name)[:2] == (200, b"dots")


def test_the_pytest_plugin_refuses_a_token_with_a_newline_naming_the_variable(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    (pytester.path / "pyproject.toml").write_text(BEARER_PROJECT)
    pytester.makepyfile(test_x="def test_x(): pass\n")
    monkeypatch.setenv("PRIV_TOKEN", SECRET + "\n")
    result = pytester.runpytest_subprocess("--upstream-proxy", "-p", "no:cacheprovider")
    output = result.stdout.str() + result.stderr.str()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "PRIV_TOKEN" in output and SECRET not in output


def test_a_linked_url_with_credentials_is_recorded_without_them(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    """An index may link a file as ``http://user:pass@host/...``: the served records, the report
    and the recorded lock name it without the credentials."""
    from pytest_upstream.engine.recorders import Answer
    from pytest_upstream.formats.base import Kind, Resource
    from pytest_upstream.messages import ProxyRequest

    proxy = make_proxy(proxy_def(key="g", format="generic", url=upstream.url))
    res = Resource("a.bin", f"http://bob:{SECRET}@127.0.0.1:9/a.bin", Kind.ARTIFACT)
    request = ProxyRequest("GET", "g", "a.bin", "", Headers(), "http://127.0.0.1")
    answer = Answer(request, "a.bin", res, "error", 502, error=f"failed: {res.upstream_url}")
    proxy.engine.recorders.answered(answer)
    outputs = repr(proxy.served.records) + json.dumps(UpstreamProxy(proxy).report(detail=True))
    assert SECRET not in outputs and "http://<redacted>@127.0.0.1:9/a.bin" in outputs


def test_serve_logs_are_scrubbed_tracebacks_included(monkeypatch: pytest.MonkeyPatch) -> None:
    """A traceback logged by serve (a bug, or the HTTP library quoting a header) carries no secret."""
    import io
    import logging

    from pytest_upstream.cli.logs import BatchingHandler, Scrubbing
    from pytest_upstream.config.auth import scrub

    monkeypatch.setenv("LOG_TOKEN", "tok-very-secret-42")
    stream = io.StringIO()
    handler = BatchingHandler(stream, interval=600)
    handler.addFilter(Scrubbing(lambda text: scrub(text, ["LOG_TOKEN"])))
    log = logging.getLogger("pytest_upstream.test_scrubbing")
    log.propagate = False
    log.addHandler(handler)
    try:
        try:
            raise ValueError("Illegal header value b'Bearer tok-very-secret-42\\n'")
        except ValueError:
            log.exception("upstream %s failed with %s", "https://u:pw-1234567@host/x", "tok-very-secret-42")
        handler.flush()
    finally:
        log.removeHandler(handler)
        handler.close()
    out = stream.getvalue()
    assert "Traceback" in out and "ValueError" in out
    assert "tok-very-secret-42" not in out and "pw-1234567" not in out
    assert out.count("<redacted>") >= 3


def test_a_token_server_answering_megabytes_is_refused(make_proxy: MakeProxy) -> None:
    """The token answer is read within a bound (a few KiB is a token; a flood is not stored in memory)."""

    class Flooding(FakeRegistry):
        def answer(self, path: str, headers: dict[str, str]) -> UpstreamAnswer:
            if path.startswith(self.TOKEN_PATH):
                return UpstreamAnswer(200, b'{"token": "' + b"x" * (2 * 1024 * 1024) + b'"}')
            return super().answer(path, headers)

    with Flooding(auth="token") as fake:
        fake.add_manifest("demo/app", "v1", (OCI_MANIFEST, MANIFEST))
        proxy = make_proxy(proxy_def(key="oci", format="docker", url=fake.url))
        status, body, _ = http(f"{proxy.base_url}/v2/oci/demo/app/manifests/v1")
    assert status == 502
    assert b"more than 1048576 bytes for a token" in body
