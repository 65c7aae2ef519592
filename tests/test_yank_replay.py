"""A lock freezes resolution: newer and yanked releases upstream do not change a replay.

Real pip, through ``upstream-proxy serve --lock``, from a static PEP 503 tree on
loopback whose pages the test rewrites between runs (the tree's index gains a
release and marks the recorded one yanked, as PyPI would).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from fixtures.build_wheels import Dist, build_wheel

from .peers import serve_process
from .pip_setup import installed, pip_env, pip_install, pypi_project
from .upstreams import Upstream

pytestmark = pytest.mark.slow

A = Dist("upstream-demo-a", "1.0", requires=["upstream-demo-b>=1.0"], code="VALUE = 'a'\n")
B = {v: Dist("upstream-demo-b", v, code=f"VALUE = 'b-{v}'\n") for v in ("1.0", "1.1", "2.0")}


def publish(up: Upstream, dists: list[Dist], yanked: dict[str, str]) -> None:
    """Serve a PEP 503 tree of ``dists``; ``yanked`` maps a filename to its reason."""
    pages: dict[str, list[str]] = {}
    for dist in dists:
        data = build_wheel(dist)
        up.files[f"/files/{dist.filename}"] = data
        attrs = f' data-yanked="{yanked[dist.filename]}"' if dist.filename in yanked else ""
        link = f'<a href="../../files/{dist.filename}#sha256={hashlib.sha256(data).hexdigest()}"{attrs}>'
        pages.setdefault(dist.name, []).append(f"{link}{dist.filename}</a><br/>")
    for name, links in pages.items():
        up.files[f"/simple/{name}/"] = ("<html><body>\n" + "\n".join(links) + "\n</body></html>\n").encode()
        up.content_types[f"/simple/{name}/"] = "text/html"


def locked_files(lock: Path) -> set[str]:
    entries = json.loads(lock.read_text())["entries"]
    return {e["path"].rsplit("/", 1)[1] for e in entries if e["path"].startswith("files/")}


def test_replay_with_a_lock_ignores_newer_and_yanked_releases(tmp_path: Path) -> None:
    config = tmp_path / "pyproject.toml"
    lock = tmp_path / "upstream.lock"
    cache = tmp_path / "shared-cache"
    with Upstream() as up:
        pypi_project(config, f"{up.url}/simple/", cache)
        publish(up, [A, B["1.0"], B["1.1"]], {})
        with serve_process(config, "--lock", str(lock)) as base:  # record
            result = pip_install(tmp_path / "t1", "upstream-demo-a", env=pip_env(f"{base}/local/simple/"))
            assert result.returncode == 0, result.stderr
        assert (tmp_path / "t1" / "upstream_demo_b" / "__init__.py").read_text() == "VALUE = 'b-1.1'\n"
        assert locked_files(lock) == {A.filename, B["1.1"].filename}

        # Upstream: 2.0 is published and the recorded 1.1 is yanked.  Another project on the
        # same cache refreshes the index and gets 2.0.
        publish(up, [A, B["1.0"], B["1.1"], B["2.0"]], {B["1.1"].filename: "broken"})
        with serve_process(config, "--mode", "refresh", "--lock", str(tmp_path / "other.lock")) as base:
            result = pip_install(tmp_path / "t2", "upstream-demo-a", env=pip_env(f"{base}/local/simple/"))
            assert result.returncode == 0, result.stderr
        assert (tmp_path / "t2" / "upstream_demo_b" / "__init__.py").read_text() == "VALUE = 'b-2.0'\n"

        up.stop()  # offline: this project's lock still replays what it recorded, byte for byte
        with serve_process(config, "--mode", "replay", "--lock", str(lock)) as base:
            result = pip_install(tmp_path / "t3", "upstream-demo-a", env=pip_env(f"{base}/local/simple/"))
            assert result.returncode == 0, result.stderr
        assert installed(tmp_path / "t3") == installed(tmp_path / "t1")
        assert locked_files(lock) == {A.filename, B["1.1"].filename}  # replay leaves the lock alone

        up.start()  # refresh picks up the new release and rewrites the lock
        with serve_process(config, "--mode", "refresh", "--lock", str(lock)) as base:
            result = pip_install(tmp_path / "t4", "upstream-demo-a", env=pip_env(f"{base}/local/simple/"))
            assert result.returncode == 0, result.stderr
        assert (tmp_path / "t4" / "upstream_demo_b" / "__init__.py").read_text() == "VALUE = 'b-2.0'\n"
        assert locked_files(lock) == {A.filename, B["2.0"].filename}
