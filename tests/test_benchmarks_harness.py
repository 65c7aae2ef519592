"""benchmarks/harness.py: each benchmark script rewrites its own section of docs/benchmarks.md
and nothing else, and a proxy child process starts, answers and stops."""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import harness  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"
SCRIPTS = (
    "run.py",
    "docker_bench.py",
    "build_bench.py",
    "service_bench.py",
    "s3_client_bench.py",
    "shared_cache_bench.py",
    "capture_bench.py",
)


def section_of(text: str, name: str) -> str:
    begin, end = harness.markers(name)
    assert text.count(begin) == 1 and text.count(end) == 1, name
    return text.split(begin)[1].split(end)[0]


def test_every_script_has_its_section_and_rewriting_it_changes_nothing(tmp_path: Path) -> None:
    doc = DOC.read_text()
    copy = tmp_path / "benchmarks.md"
    copy.write_text(doc)
    for name in SCRIPTS:
        assert (ROOT / "benchmarks" / name).is_file()
        harness.write_section(copy, name, section_of(doc, name))
        assert copy.read_text() == doc, name


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_new_section_replaces_only_its_own(tmp_path: Path, name: str) -> None:
    doc = DOC.read_text()
    copy = tmp_path / "benchmarks.md"
    copy.write_text(doc)
    harness.write_section(copy, name, "## New figures\n\n| a | b |\n")
    text = copy.read_text()
    assert section_of(text, name) == "\n## New figures\n\n| a | b |\n"
    for other in SCRIPTS:
        if other != name:
            assert section_of(text, other) == section_of(doc, other)
    assert text.replace(section_of(text, name), section_of(doc, name)) == doc
    assert [p.name for p in tmp_path.iterdir()] == ["benchmarks.md"]  # no temporary file left


def test_sections_are_appended_to_a_new_file(tmp_path: Path) -> None:
    path = tmp_path / "out.md"
    harness.write_section(path, "docker_bench.py", "## Docker\n")
    harness.write_section(path, "run.py", "Loopback.")
    harness.write_section(path, "docker_bench.py", "## Docker, again")
    begin_d, end_d = harness.markers("docker_bench.py")
    begin_r, end_r = harness.markers("run.py")
    assert path.read_text() == (
        f"# Benchmarks\n\n{begin_d}\n## Docker, again\n{end_d}\n\n{begin_r}\nLoopback.\n{end_r}\n"
    )


def test_a_proxy_process_serves_and_stops(tmp_path: Path) -> None:
    config = tmp_path / "pyproject.toml"
    config.write_text(
        '[[tool.pytest-upstream.proxy]]\nkey = "g"\nformat = "generic"\nurl = "http://127.0.0.1:9/"\n'
    )
    with harness.ProxyProcess(config, tmp_path / "cache", tmp_path / "stderr.log") as proxy:
        assert proxy.url("g") == f"http://127.0.0.1:{proxy.port}/g/"
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"{proxy.base_url}/nope/x", timeout=10)
        assert info.value.code == 404  # the proxy answered: no proxy "nope"
    assert proxy.proc.poll() is not None


def test_a_proxy_process_can_run_with_the_usual_descriptor_limit(tmp_path: Path) -> None:
    config = tmp_path / "pyproject.toml"
    config.write_text(
        '[[tool.pytest-upstream.proxy]]\nkey = "g"\nformat = "generic"\nurl = "http://127.0.0.1:9/"\n'
    )
    with harness.ProxyProcess(config, tmp_path / "cache", tmp_path / "stderr.log", nofile=256) as proxy:
        limits = Path(f"/proc/{proxy.pid}/limits").read_text()
        assert "Max open files            256 " in limits  # what service_bench's EMFILE case relies on


def test_the_holder_keeps_its_connections_open_and_reopens_what_the_server_closes() -> None:
    import socket
    import time

    import service_bench

    with socket.create_server(("127.0.0.1", 0), backlog=64) as listener:
        port = listener.getsockname()[1]
        holder = service_bench.Holder(port, 10, trickle_every=0.1).start()
        try:
            accepted = []
            listener.settimeout(10)
            for _ in range(10):
                accepted.append(listener.accept()[0])
            assert holder.wait_open(10) < 10 and holder.open_now == 10
            starts = []
            for conn in accepted:
                conn.settimeout(0.3)
                try:
                    starts.append(conn.recv(4096))
                except TimeoutError:
                    starts.append(b"")  # an idle one: connected, sends nothing
            assert sum(1 for s in starts if s.startswith(b"GET /files/small.bin HTTP/1.1\r\n")) == 5
            assert sum(1 for s in starts if s == b"") == 5
            accepted.pop().close()  # the server drops one: the holder notices and connects again
            deadline = time.monotonic() + 10
            while (holder.closed_by_server, holder.started) != (1, 11) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert (holder.closed_by_server, holder.started) == (1, 11)
            accepted.append(listener.accept()[0])
            assert holder.wait_open(10) < 10 and holder.open_now == 10
        finally:
            holder.stop()
            for conn in accepted:
                conn.close()
