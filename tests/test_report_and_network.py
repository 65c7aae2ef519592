"""The upstream marker (mode and keys per test), --upstream-report, and the blocked network.

Nothing here reaches a real external host: blocked connections go to TEST-NET
(192.0.2.1) or ``.invalid`` names and are refused before a packet is sent or a
name is resolved; forward-proxy requests are answered by our own proxy.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import threading

import pytest

from fixtures.build_wheels import write_tree
from pytest_upstream.formats.base import Kind, Resource
from pytest_upstream.formats.pypi import PyPIFormat
from pytest_upstream.repro.netguard import (
    NetworkBlockedError,
    NetworkGuard,
    exempt_current_thread,
    is_loopback,
)
from pytest_upstream.server.proxy_server import ProxyServer

from .conftest import MakeProxy, proxy_def
from .upstreams import Upstream, custom_proxies_toml


# -- the socket guard, in this process ------------------------------------------------------
def test_guard_refuses_non_loopback_before_connecting_and_restores_socket() -> None:
    original = (socket.socket.connect, socket.socket.connect_ex, socket.create_connection)
    assert "connect" not in socket.socket.__dict__
    guard = NetworkGuard(lambda: "the-test")
    guard.install()
    try:
        with pytest.raises(
            NetworkBlockedError, match=r"blocked a network connection to 192\.0\.2\.1:80 from the-test"
        ):
            socket.create_connection(("192.0.2.1", 80), timeout=1)
        with socket.socket() as s, pytest.raises(NetworkBlockedError, match=r"192\.0\.2\.1:443"):
            s.connect_ex(("192.0.2.1", 443))
        with socket.socket() as s, pytest.raises(NetworkBlockedError, match=r"example\.invalid:80"):
            s.connect(("example.invalid", 80))  # refused before any DNS look-up
        with (
            socket.socket(socket.AF_INET6) as s,
            pytest.raises(NetworkBlockedError, match=r"\[2001:db8::1\]:80"),
        ):
            s.connect(("2001:db8::1", 80, 0, 0))
        # loopback is fine
        with socket.create_server(("127.0.0.1", 0)) as server:
            port = server.getsockname()[1]
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            socket.create_connection(("localhost", port), timeout=5).close()
        assert [target for target, _ in guard.blocked] == [
            "192.0.2.1:80",
            "192.0.2.1:443",
            "example.invalid:80",
            "[2001:db8::1]:80",
        ]
        # the proxy's request threads are exempt: they fetch from the upstreams
        verdicts: list[str] = []

        def exempt() -> None:
            exempt_current_thread()
            guard.check("192.0.2.1", 80)
            verdicts.append("allowed")

        thread = threading.Thread(target=exempt)
        thread.start()
        thread.join()
        assert verdicts == ["allowed"]
    finally:
        guard.uninstall()
    assert (socket.socket.connect, socket.socket.connect_ex, socket.create_connection) == original
    assert "connect" not in socket.socket.__dict__


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("foo.localhost", True),
        ("192.0.2.1", False),
        ("::ffff:192.0.2.1", False),
        ("example.invalid", False),
        ("0.0.0.0", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


# -- forward-proxy requests to the proxy ------------------------------------------------------
def _raw(server: ProxyServer, request: bytes) -> bytes:
    port = int(server.base_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def test_proxy_refuses_forward_proxy_requests_naming_the_host(
    make_proxy: MakeProxy, upstream: Upstream
) -> None:
    upstream.files["/files/a.txt"] = b"hello"
    server = make_proxy(proxy_def(key="g", format="generic", url=upstream.url + "/files"))
    message = b"no upstream proxy is configured for example.invalid; the build tried to reach it directly"
    get = _raw(server, b"GET http://example.invalid/x?y=1 HTTP/1.1\r\nHost: example.invalid\r\n\r\n")
    assert get.startswith(b"HTTP/1.1 403 " + message + b"\r\n") and get.endswith(message + b"\n")
    connect = _raw(server, b"CONNECT example.invalid:443 HTTP/1.1\r\nHost: example.invalid:443\r\n\r\n")
    assert connect.startswith(b"HTTP/1.1 403 " + message + b"\r\n")
    assert server.refused == [("example.invalid", ""), ("example.invalid", "")]
    # absolute-form addressed to the proxy itself is served as usual
    host = server.base_url.removeprefix("http://")  # HTTP/1.1 requires Host, absolute-form too (RFC 9112 3.2)
    own = _raw(
        server,
        f"GET {server.base_url}/g/a.txt HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode(),
    )
    assert own.startswith(b"HTTP/1.1 200 ") and own.endswith(b"hello")

    # clients that honour HTTP(S)_PROXY show the refusal (urllib here, in a subprocess)
    env = {"PATH": "/usr/bin:/bin", "HTTP_PROXY": server.base_url, "HTTPS_PROXY": server.base_url}
    for url, shown in [
        ("http://example.invalid/", "HTTP Error 403: no upstream proxy is configured for example.invalid"),
        (
            "https://example.invalid/",
            "Tunnel connection failed: 403 no upstream proxy is configured for example",
        ),
    ]:
        code = f"import urllib.request; urllib.request.urlopen({url!r}, timeout=10)"
        result = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
        )
        assert result.returncode != 0 and shown in result.stderr, result.stderr
    assert len(server.refused) == 4


# -- the report's name/version --------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "described"),
    [
        ("simple/upstream-demo-b/", {"name": "upstream-demo-b"}),
        ("files/demo/demo-1.2.3-py3-none-any.whl", {"name": "demo", "version": "1.2.3"}),
        ("files/demo/demo-1.2.3-1-py3-none-any.whl.metadata", {"name": "demo", "version": "1.2.3"}),
        ("files/my-dist/my-dist-2.0rc1.tar.gz", {"name": "my-dist", "version": "2.0rc1"}),
        ("files/demo/demo.zip", {"name": "demo"}),
        ("files/x/x-1.0-py3.8.egg", {"name": "x", "version": "1.0"}),
        ("simple/", {}),
    ],
)
def test_pypi_describe(path: str, described: dict[str, str]) -> None:
    assert PyPIFormat().describe(Resource(path, "http://127.0.0.1/x", Kind.ARTIFACT)) == described


# -- through the plugin: marker, report, network ----------------------------------------------
INNER = """
import os, socket, subprocess, sys, urllib.error, urllib.request, pytest
from pytest_upstream.repro.netguard import NetworkBlockedError

pytestmark = pytest.mark.upstream(proxies=["g", "p"])

def get(upstream_proxy, key, name):
    with urllib.request.urlopen(upstream_proxy.url(key) + name) as r:
        return r.read()

def test_record_it(upstream_proxy):
    assert upstream_proxy.mode == "record" and os.environ.get("HTTP_PROXY") != upstream_proxy.base_url
    assert get(upstream_proxy, "g", "a.bin") == b"A" * 100
    get(upstream_proxy, "p", "simple/upstream-demo-b/")
    get(upstream_proxy, "p", "files/upstream-demo-b/upstream_demo_b-1.0-py3-none-any.whl")

@pytest.mark.upstream(mode="replay")
def test_replay_marked(upstream_proxy):
    assert upstream_proxy.mode == "replay"
    assert get(upstream_proxy, "g", "a.bin") == b"A" * 100
    with pytest.raises(urllib.error.HTTPError) as info:
        get(upstream_proxy, "g", "never.bin")
    assert info.value.code == 504
    # a replay-marked test runs with the network blocked: in process ...
    with pytest.raises(NetworkBlockedError, match="192.0.2.1:80"):
        socket.create_connection(("192.0.2.1", 80), timeout=1)
    # ... and for subprocesses that honour HTTP_PROXY
    assert os.environ["HTTP_PROXY"] == upstream_proxy.base_url and "127.0.0.1" in os.environ["NO_PROXY"]
    code = "import urllib.request; urllib.request.urlopen('http://example.invalid/', timeout=10)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "no upstream proxy is configured for example.invalid" in result.stderr

def test_other_keys_are_forbidden(upstream_proxy):
    with pytest.raises(urllib.error.HTTPError) as info:
        get(upstream_proxy, "h", "a.bin")
    assert info.value.code == 403
    assert "upstream proxy 'h' is not allowed now" in info.value.read().decode()

@pytest.mark.upstream(proxies=["h"])
def test_the_closest_marker_wins(upstream_proxy):
    assert get(upstream_proxy, "h", "a.bin") == b"A" * 100

def test_all_restored(upstream_proxy):
    assert upstream_proxy.mode == "record" and os.environ.get("HTTP_PROXY") != upstream_proxy.base_url
    socket.socket().close()
    assert "connect" not in socket.socket.__dict__

@pytest.mark.upstream(mode="offline")
def test_bad_marker(upstream_proxy):
    pass
"""


def test_marker_report_and_blocked_network_through_the_plugin(
    pytester: pytest.Pytester, upstream: Upstream
) -> None:
    upstream.files["/files/a.bin"] = b"A" * 100
    tree = pytester.path.parent / "tree"
    write_tree(tree)
    for file in tree.rglob("*"):
        if file.is_file():
            upstream.files["/pypi/" + file.relative_to(tree).as_posix()] = file.read_bytes()
    upstream.files["/pypi/simple/upstream-demo-b/"] = upstream.files[
        "/pypi/simple/upstream-demo-b/index.html"
    ]
    (pytester.path / "pyproject.toml").write_text(
        custom_proxies_toml(
            upstream.url,
            [
                ("g", "generic", "files"),
                ("h", "generic", "files"),
                ("p", "pypi", "pypi/simple/"),
            ],
        )
    )
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest_subprocess(
        "--upstream-proxy",
        "--upstream-cache=c1",
        "--upstream-report=report.json",
        "-p",
        "no:cacheprovider",
        "-rfE",
    )
    result.assert_outcomes(passed=5, errors=1)
    result.stdout.fnmatch_lines(
        ["@pytest.mark.upstream: mode must be one of record, replay, refresh (got 'offline')"]
    )
    # the replay miss and the blocked connection (both caught by the test) fail the run, and are listed
    result.stdout.fnmatch_lines(
        [
            "replay misses (1):*",
            "*test_replay_marked: g */files/never.bin",
            "tests that needed the network (3):",
            "  test_inner.py::test_record_it: 3 misses",
            "  test_inner.py::test_replay_marked: 1 miss",
            "  test_inner.py::test_the_closest_marker_wins: 1 miss",
            "network connections blocked (2): *",
            "  test_inner.py::test_replay_marked: 192.0.2.1:80",
            "  test_inner.py::test_replay_marked: example.invalid (through HTTP(S)_PROXY)",
        ]
    )
    report = json.loads((pytester.path / "report.json").read_text())
    assert report["version"] == 1 and report["mode"] == "record"
    tests = report["tests"]
    assert list(tests) == sorted(tests)
    recorded = {(i["key"], i["path"]): i for i in tests["test_inner.py::test_record_it"]}
    wheel = recorded[("p", "files/upstream-demo-b/upstream_demo_b-1.0-py3-none-any.whl")]
    data = (tree / "files" / "upstream_demo_b-1.0-py3-none-any.whl").read_bytes()
    assert wheel == {
        "key": "p",
        "path": "files/upstream-demo-b/upstream_demo_b-1.0-py3-none-any.whl",
        "name": "upstream-demo-b",
        "version": "1.0",
        "sha256": __import__("hashlib").sha256(data).hexdigest(),
        "size": len(data),
        "cache": "miss",
        "status": 200,
        "upstream_url": f"{upstream.url}/pypi/files/upstream_demo_b-1.0-py3-none-any.whl",
    }
    assert recorded[("p", "simple/upstream-demo-b/")]["name"] == "upstream-demo-b"
    assert [(i["path"], i["cache"], i["status"]) for i in tests["test_inner.py::test_replay_marked"]] == [
        ("a.bin", "hit", 200),
        ("never.bin", "miss", 504),
    ]
    assert [(i["key"], i["status"]) for i in tests["test_inner.py::test_other_keys_are_forbidden"]] == [
        ("h", 403)
    ]

    # the same session on a fresh cache under xdist: the workers' parts combine to the same bytes
    again = pytester.runpytest_subprocess(
        "--upstream-proxy",
        "--upstream-cache=c2",
        "--upstream-report=report2.json",
        "-p",
        "no:cacheprovider",
        "-n",
        "2",
        "--dist",
        "loadfile",
    )
    again.assert_outcomes(passed=5, errors=1)
    assert (pytester.path / "report2.json").read_bytes() == (pytester.path / "report.json").read_bytes()


def test_replay_blocks_the_network_by_default_and_allow_network_turns_it_off(
    pytester: pytest.Pytester, upstream: Upstream
) -> None:
    (pytester.path / "pyproject.toml").write_text(
        textwrap.dedent(
            f"""
            [tool.pytest-upstream]
            cache = "c"
            mode = "replay"
            [[tool.pytest-upstream.proxy]]
            key = "g"
            source = "custom"
            format = "generic"
            url = "{upstream.url}/files"
            """
        )
    )
    pytester.makepyfile(
        test_net="""
        import os, socket, pytest
        from pytest_upstream.repro.netguard import NetworkBlockedError

        def test_blocked(upstream_proxy):
            blocked = os.environ.get("EXPECT_BLOCKED") == "1"
            assert upstream_proxy.network_blocked is blocked
            assert ("HTTP_PROXY" in upstream_proxy.env()) is blocked
            if blocked:
                with pytest.raises(NetworkBlockedError):
                    socket.create_connection(("192.0.2.1", 80), timeout=1)
        """
    )
    pytester.makeconftest(
        "import os\ndef pytest_configure(config):\n"
        "    allowed = config.getoption('upstream_block_network') is False\n"
        "    os.environ['EXPECT_BLOCKED'] = '0' if allowed else '1'\n"
    )
    blocked = pytester.runpytest_subprocess("--upstream-proxy", "-p", "no:cacheprovider")
    blocked.assert_outcomes(passed=1)
    assert blocked.ret == pytest.ExitCode.TESTS_FAILED  # the attempt is listed and fails the run
    blocked.stdout.fnmatch_lines(
        ["network connections blocked (1): *", "  test_net.py::test_blocked: 192.0.2.1:80"]
    )
    allowed = pytester.runpytest_subprocess(
        "--upstream-proxy", "--upstream-allow-network", "-p", "no:cacheprovider"
    )
    allowed.assert_outcomes(passed=1)
    assert allowed.ret == 0
