"""Allow/block rules and the release cooldown with real clients (docs/rules.md).

pip against pypiserver, npm against verdaccio, mvn against nginx (a WebDAV repository mvn
deploys to): the proxy takes the kept-out releases out of the
metadata, so the resolver picks an allowed one; a direct request is a 403 naming the rule.
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fixtures.build_wheels import Dist
from pytest_upstream.config.release_policy import parse_time
from pytest_upstream.engine.clock import ManualClock
from pytest_upstream.pytest_plugin.harness import UpstreamProxy

from . import maven_peers
from .conftest import MakeProxy, proxy_def
from .peers import pypiserver, require_peer
from .pip_setup import pip_env, pip_install, publish
from .test_npm import npm_env, npm_user, run, verdaccio  # noqa: F401 (verdaccio: a fixture)

pytestmark = pytest.mark.slow

A = Dist("upstream-demo-a", "1.0", requires=["upstream-demo-b>=1.0"], code="VALUE = 'a'\n")
B = [Dist("upstream-demo-b", v, code=f"VALUE = 'b-{v}'\n") for v in ("1.0", "1.1")]


def status_of(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.reason, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.reason, exc.read().decode()


def test_pip_resolves_around_a_blocked_release_and_a_direct_request_is_refused(
    tmp_path: Path, make_proxy: MakeProxy
) -> None:
    files = publish(tmp_path / "upstream", A, *B)
    with pypiserver(files) as index_url:
        proxy = make_proxy(
            proxy_def(key="local", format="pypi", url=index_url, block=["upstream-demo-b==1.1"]),
            cache=tmp_path / "cache",
        )
        result = pip_install(tmp_path / "t", "upstream-demo-a", env=pip_env(proxy.url("local") + "simple/"))
        assert result.returncode == 0, result.stderr
        assert (tmp_path / "t" / "upstream_demo_b" / "__init__.py").read_text() == "VALUE = 'b-1.0'\n"
        status, reason, body = status_of(
            proxy.url("local") + "files/upstream-demo-b/upstream_demo_b-1.1-py3-none-any.whl"
        )
        assert (status, reason) == (403, "Blocked by rule 'upstream-demo-b==1.1'")
        assert "upstream_demo_b-1.1-py3-none-any.whl is blocked by rule 'upstream-demo-b==1.1'" in body
        pinned = pip_install(
            tmp_path / "t2", "upstream-demo-b==1.1", env=pip_env(proxy.url("local") + "simple/")
        )
        assert pinned.returncode != 0  # the release is not listed: pip finds no such version
        hidden = {h for r in proxy.served.records for h in r.hidden}
        assert hidden == {"upstream-demo-b 1.1: blocked by rule 'upstream-demo-b==1.1'"}


def npm_publish(registry_url: str, tmp: Path, token: str, name: str, version: str) -> None:
    src = tmp / "src" / f"{name}-{version}"
    src.mkdir(parents=True)
    (src / "package.json").write_text(json.dumps({"name": name, "version": version, "license": "MIT"}))
    (src / "index.js").write_text(f"module.exports = {json.dumps(version)}\n")
    npmrc = tmp / "npmrc"
    npmrc.write_text(f"//{registry_url.split('://', 1)[1]}:_authToken={token}\n")
    cmd = ["npm", "publish", "--registry", registry_url, "--userconfig", str(npmrc), "--ignore-scripts"]
    run([*cmd, "--cache", str(tmp / "npm-cache")], src, npm_env(tmp / "publisher"))


def installed_version(registry: str, project: Path, spec: str) -> str:
    project.mkdir(parents=True)
    (project / "package.json").write_text(
        json.dumps(
            {"name": "consumer", "version": "1.0.0", "private": True, "dependencies": {"cool-base": spec}}
        )
    )
    cmd = ["npm", "install", "--registry", registry, "--cache", str(project / ".npm-cache"), "--no-audit"]
    run(cmd, project, npm_env(project.parent / f"{project.name}-home"))
    return str(json.loads((project / "node_modules" / "cool-base" / "package.json").read_text())["version"])


def test_npm_with_a_semver_block_and_a_cooldown_installs_the_older_allowed_version(
    verdaccio: tuple[str, subprocess.Popen[bytes]],  # noqa: F811 (the fixture imported above)
    make_proxy: MakeProxy,
    tmp_path: Path,
) -> None:
    registry_url, _ = verdaccio
    token = npm_user(registry_url)
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        npm_publish(registry_url, tmp_path / "pub", token, "cool-base", version)
    with urllib.request.urlopen(registry_url + "cool-base", timeout=10) as resp:
        times = json.load(resp)["time"]
    published = {v: parse_time(times[v]) or 0.0 for v in ("1.0.0", "1.1.0")}
    assert published["1.1.0"] > published["1.0.0"]

    blocked = make_proxy(
        proxy_def(key="npm", format="npm", url=registry_url, block=["cool-base@>=1.2.0"]),
        cache=tmp_path / "cache-block",
    )
    assert installed_version(blocked.url("npm"), tmp_path / "p1", "^1.0.0") == "1.1.0"
    status, reason, _ = status_of(blocked.url("npm") + "cool-base/-/cool-base-1.2.0.tgz")
    assert (status, reason) == (403, "Blocked by rule 'cool-base@>=1.2.0'")

    # The cooldown: "now" is one day after a moment between the first two publications.
    between = (published["1.0.0"] + published["1.1.0"]) / 2
    clock = ManualClock(between + 86400)
    cooled = make_proxy(
        proxy_def(key="npm", format="npm", url=registry_url, min_age="1d"),
        cache=tmp_path / "cache-cool",
        clock=clock,
    )
    with urllib.request.urlopen(cooled.url("npm") + "cool-base", timeout=10) as resp:
        doc = json.load(resp)
    assert list(doc["versions"]) == ["1.0.0"] and doc["dist-tags"]["latest"] == "1.0.0"
    assert installed_version(cooled.url("npm"), tmp_path / "p2", "^1.0.0") == "1.0.0"
    status, reason, _ = status_of(cooled.url("npm") + "cool-base/-/cool-base-1.1.0.tgz")
    assert status == 403 and reason.startswith("Held back: published "), reason
    assert reason.endswith(" ago, within min_age 1d"), reason
    clock.advance(86400)  # a day later every release is old enough: the memoised render is redone
    with urllib.request.urlopen(cooled.url("npm") + "cool-base", timeout=10) as resp:
        assert sorted(json.load(resp)["versions"]) == ["1.0.0", "1.1.0", "1.2.0"]


def test_mvn_resolves_a_version_range_around_a_blocked_release(make_proxy: MakeProxy, tmp_path: Path) -> None:
    require_peer(*maven_peers.PEER_COMMANDS, install=maven_peers.INSTALL)
    with maven_peers.nginx(tmp_path / "nginx") as upstream:
        server = make_proxy(
            proxy_def(key="central", source="maven-central", url=upstream.repo_url),
            proxy_def(key="libs", format="maven", url=upstream.dav_url, block=["org.example:lib:[1.1,)"]),
        )
        harness = UpstreamProxy(server)
        deploy_settings = harness.maven_settings(local_repo=tmp_path / "m2-lib")
        for version in ("1.0", "1.1"):
            lib = maven_peers.write_project(
                tmp_path / f"lib-{version}", "lib", version, sources={"src/main/resources/lib.txt": version}
            )
            maven_peers.deploy(lib, deploy_settings, upstream.dav_url)
        app = maven_peers.write_project(
            tmp_path / "app",
            "app",
            "1.0",
            deps="<dependency><groupId>org.example</groupId><artifactId>lib</artifactId>"
            "<version>[1.0,2.0)</version></dependency>",
        )
        app_settings = harness.maven_settings(local_repo=tmp_path / "m2-app", extra_keys=["libs"])
        maven_peers.assert_success(maven_peers.mvn(app, app_settings, "compile"))
        resolved = tmp_path / "m2-app/org/example/lib/1.0/lib-1.0.jar"
        assert maven_peers.jar_entry(resolved, "lib.txt") == "1.0"
        assert not (tmp_path / "m2-app/org/example/lib/1.1/lib-1.1.jar").exists()
        served = {(r.path, tuple(r.hidden)) for r in server.served.records if r.key == "libs"}
        assert (
            "org/example/lib/maven-metadata.xml",
            ("org.example:lib 1.1: blocked by rule 'org.example:lib:[1.1,)'",),
        ) in served
        status, reason, _ = status_of(server.url("libs") + "org/example/lib/1.1/lib-1.1.jar")
        assert (status, reason) == (403, "Blocked by rule 'org.example:lib:[1.1,)'")
