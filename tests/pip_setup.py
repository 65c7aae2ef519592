"""One set-up for the end-to-end tests with real pip: publish wheels, point a project at them,
install through the proxy, compare what was installed.

The pieces, each used by tests/test_e2e_pip.py, tests/test_lock.py and tests/test_yank_replay.py:

* ``publish`` writes the demo wheels where pypiserver serves them;
* ``pypi_project`` writes a pyproject.toml with one pypi proxy, key ``local``;
* ``pip_env`` and ``pip_install`` run pip so that it sees only the index given (this machine's
  pip reads extra wheel folders from ``PIP_FIND_LINKS`` and a global config; either would let
  it bypass the proxy);
* ``installed`` fingerprints an install target, to show two installs are byte for byte alike.

Tests that pytester runs in a subprocess import ``pip_env``/``pip_install`` from here as well:
``importable_in_subprocesses`` puts the repository on their ``PYTHONPATH``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

from fixtures.build_wheels import Dist, write_files

if TYPE_CHECKING:
    import pytest

REPO = Path(__file__).resolve().parent.parent


def publish(out: Path, *dists: Dist) -> Path:
    """Write wheels (the demo set by default) to ``out/files``; returns that directory.

    The PEP 658 ``.metadata`` files are left out: pypiserver serves wheels only.
    """
    write_files(out, *([list(dists)] if dists else []))
    for meta in (out / "files").glob("*.metadata"):
        meta.unlink()
    return out / "files"


def pypi_project(path: Path, index_url: str, cache: Path, *, lock: str | None = None) -> Path:
    """A pyproject.toml at ``path`` whose one proxy, ``local``, is the pypi index at ``index_url``."""
    lock_line = f'lock = "{lock}"' if lock else ""
    path.write_text(
        textwrap.dedent(
            f"""
            [tool.pytest-upstream]
            cache = "{cache}"
            {lock_line}
            [[tool.pytest-upstream.proxy]]
            key = "local"
            source = "custom"
            format = "pypi"
            url = "{index_url}"
            """
        )
    )
    return path


def pip_env(index_url: str | None = None) -> dict[str, str]:
    """This process's environment without pip's and uv's settings, with ``index_url`` as the index."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "UV_"))}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_CACHE_DIR"] = "1"
    if index_url:
        env["PIP_INDEX_URL"] = index_url
    return env


def pip_install(
    target: Path | str, *requirements: str, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-compile", "--target", str(target), *requirements],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def installed(target: Path) -> dict[str, str]:
    """Every file pip put into ``target`` (bytecode aside) and its sha256."""
    return {
        str(p.relative_to(target)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(target.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def importable_in_subprocesses(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let a test that pytester runs in a subprocess ``from tests.pip_setup import pip_install``."""
    paths = [str(REPO), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))
