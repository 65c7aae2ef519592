"""Examples and claims in README.md and docs/ci.md, run as written.

The README's pytest example runs unchanged; only the built-in ``pypi`` source is pointed at a
pypiserver on loopback (a mirror URL, as a user would), so the suite needs no network.  With
``--run-public`` it also runs exactly as written, on the built-in defaults.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import textwrap
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fixtures.build_wheels import Dist, write_files

from .peers import pypiserver, serve_process
from .pip_setup import pip_env, pip_install

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()

pytestmark = pytest.mark.slow


def _fenced(text: str, after: str, lang: str) -> str:
    """The first ``lang`` code block after the heading or phrase ``after``."""
    rest = text[text.index(after) :]
    match = re.search(rf"^```{lang}\n(.*?)^```", rest, re.MULTILINE | re.DOTALL)
    assert match, f"no {lang} block after {after!r}"
    return match.group(1)


def _readme_example() -> tuple[str, list[list[str]], str]:
    """The test module, the pytest command lines (arguments only) and the summary it promises."""
    code = _fenced(README, "## In pytest", "python")
    commands = [
        shlex.split(line.split("#", 1)[0])[1:]
        for line in _fenced(README, "## In pytest", "sh").splitlines()
        if line.startswith("pytest ")
    ]
    promised = re.search(r"`pytest-upstream \(replay, cache …\): ([^`]*?), …`", README)
    assert promised, "the README quotes the replay summary"
    return code, commands, promised.group(1)


@dataclass
class Index:
    url: str
    stop: Callable[[], None]


@pytest.fixture
def iniconfig_index(tmp_path: Path) -> Iterator[Index]:
    """A loopback index holding one small pure-Python wheel named as in the README."""
    files = tmp_path / "index"
    write_files(files, [Dist("iniconfig", "2.0.0", code="VALUE = 1\n")])
    for meta in (files / "files").glob("*.metadata"):
        meta.unlink()  # pypiserver serves wheels only
    with contextlib.ExitStack() as stack:
        yield Index(stack.enter_context(pypiserver(files / "files")), stack.close)


def _builtin_pypi_at(path: Path, index_url: str, cache: Path) -> Path:
    path.write_text(
        textwrap.dedent(
            f"""
            [tool.pytest-upstream]
            cache = "{cache}"

            [[tool.pytest-upstream.proxy]]
            key = "pypi"
            source = "pypi"
            url = "{index_url}"
            """
        )
    )
    return path


def _run_readme(pytester: pytest.Pytester, stop_index: Callable[[], None] = lambda: None) -> None:
    code, commands, promised = _readme_example()
    assert len(commands) == 2 and "replay" in commands[1]
    pytester.makepyfile(test_cache=code)
    record = pytester.runpytest_subprocess(*commands[0], "-p", "no:cacheprovider")
    record.assert_outcomes(passed=1)
    record.stdout.re_match_lines([r"pytest-upstream \(record, .*: 4 requests, 2 hits, 2 misses"])
    stop_index()  # replay is offline: the index is gone
    replay = pytester.runpytest_subprocess(*commands[1], "-p", "no:cacheprovider")
    replay.assert_outcomes(passed=1)
    assert replay.ret == 0
    replay.stdout.fnmatch_lines([f"pytest-upstream (replay, cache *): {promised}, *"])


def test_the_readme_pytest_example_runs_as_written(
    pytester: pytest.Pytester, tmp_path: Path, iniconfig_index: Index
) -> None:
    _builtin_pypi_at(pytester.path / "pyproject.toml", iniconfig_index.url, tmp_path / "cache")
    _run_readme(pytester, stop_index=iniconfig_index.stop)


@pytest.mark.public_registry
def test_the_readme_pytest_example_on_the_built_in_defaults(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UPSTREAM_PROXY_CACHE", str(tmp_path / "cache"))  # not the per-user cache
    _run_readme(pytester)


def test_what_pip_prints_on_a_replay_miss_is_what_ci_md_says(iniconfig_index: Index, tmp_path: Path) -> None:
    """pip shows the proxy's reason phrase for a file, not for an index page; docs/ci.md quotes
    what it shows."""
    ci = (ROOT / "docs" / "ci.md").read_text()
    no_version = _fenced(ci, "In replay mode, an unrecorded package", "").splitlines()
    config = _builtin_pypi_at(tmp_path / "pyproject.toml", iniconfig_index.url, tmp_path / "cache")

    with serve_process(config, "--mode", "replay") as base:  # nothing recorded: the index page misses
        result = pip_install(tmp_path / "t1", "iniconfig", env=pip_env(f"{base}/pypi/simple/"))
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"{base}/pypi/simple/iniconfig/")
        body = info.value.read().decode()
    assert result.returncode == 1
    assert [line for line in result.stderr.splitlines() if line.startswith("ERROR")] == no_version
    assert "replay mode" not in result.stderr + result.stdout
    assert info.value.code == 504 and body.startswith("replay mode: ") and "was not recorded" in body

    with serve_process(config) as base:  # record only the index page
        urllib.request.urlopen(f"{base}/pypi/simple/iniconfig/").read()
    with serve_process(config, "--mode", "replay") as base:
        result = pip_install(tmp_path / "t2", "iniconfig", env=pip_env(f"{base}/pypi/simple/"))
    assert result.returncode == 1
    quoted = re.search(
        r"`(ERROR: HTTP error 504 while getting )http://127\.0\.0\.1:3141(/pypi/files/iniconfig/)…`", ci
    )
    assert quoted, "docs/ci.md quotes pip's message for an unrecorded file"
    assert f"{quoted.group(1)}{base}{quoted.group(2)}" in result.stderr
    reason = "because of HTTP error 504 Server Error: Not recorded (replay mode) for url: "
    assert f"`… {reason}…`" in ci and reason in result.stderr
