"""``git clone`` over HTTPS through capture (docs/capture.md): a dumb-HTTP repository served by an
HTTPS server on loopback with its own CA, cloned in a pytester-run test with no proxy or CA flags,
recorded, then cloned again in replay mode with the server gone: the same tree."""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.capture_peers import TlsUpstream

pytestmark = [pytest.mark.slow, pytest.mark.skipif(shutil.which("git") is None, reason="needs git")]

INNER = """
import os
import subprocess
from pathlib import Path


def test_clone():
    dest = Path(os.environ["CAPTURE_TEST_OUT"])
    done = subprocess.run(
        ["git", "clone", "--quiet", os.environ["CAPTURE_TEST_URL"] + "/repo.git", str(dest)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
"""


def git(*args: str, cwd: Path) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid", "GIT_COMMITTER_NAME": "t"}
    env |= {"GIT_COMMITTER_EMAIL": "t@example.invalid", "HOME": str(cwd), "PATH": "/usr/bin:/bin"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


def dumb_repository(tmp: Path) -> dict[str, bytes]:
    """A bare repository with two commits, prepared for dumb HTTP: path -> bytes under /repo.git/."""
    work = tmp / "work"
    work.mkdir()
    git("init", "--quiet", "-b", "main", cwd=work)
    (work / "README").write_text("hello through capture\n")
    git("add", "README", cwd=work)
    git("commit", "--quiet", "-m", "first", cwd=work)
    (work / "more.txt").write_text("second\n")
    git("add", "more.txt", cwd=work)
    git("commit", "--quiet", "-m", "second", cwd=work)
    git("clone", "--quiet", "--bare", str(work), str(tmp / "repo.git"), cwd=tmp)
    git("update-server-info", cwd=tmp / "repo.git")
    root = tmp / "repo.git"
    return {
        f"/repo.git/{p.relative_to(root).as_posix()}": p.read_bytes() for p in root.rglob("*") if p.is_file()
    }


def test_git_clone_over_https_is_captured_then_replayed(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    files = dumb_repository(tmp_path)
    with TlsUpstream(tmp_path / "upstream-ca") as up:
        up.files.update(files)
        up.files["/repo.git/info/refs?service=git-upload-pack"] = files["/repo.git/info/refs"]
        up.content_types["/repo.git/info/refs?service=git-upload-pack"] = "text/plain"
        (pytester.path / "pyproject.toml").write_text(
            textwrap.dedent(
                f"""
                [tool.pytest-upstream]
                capture = true
                upstream_ca = "{up.ca_file}"
                """
            )
        )
        pytester.makepyfile(test_inner=INNER)
        monkeypatch.setenv("CAPTURE_TEST_URL", up.url)
        common = ("--upstream-proxy", "--upstream-cache=cache", "-p", "no:cacheprovider")
        monkeypatch.setenv("CAPTURE_TEST_OUT", str(tmp_path / "first"))
        pytester.runpytest_subprocess(*common).assert_outcomes(passed=1)
        assert sum(up.hits.values()) > 0  # the clone's requests reached the server through the proxy
    monkeypatch.setenv("CAPTURE_TEST_OUT", str(tmp_path / "second"))
    pytester.runpytest_subprocess(*common, "--upstream-mode=replay").assert_outcomes(passed=1)
    for name in ("README", "more.txt"):
        assert (tmp_path / "second" / name).read_text() == (tmp_path / "first" / name).read_text()
    assert git("log", "--format=%s", cwd=tmp_path / "second").split() == ["second", "first"]
