"""Ordered groups (engine/groups.py) with real pip against two pypiservers, and the other formats
against loopback upstreams: first answer, owner, merged (docs/rules.md § Groups)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fixtures.build_wheels import Dist

from .conftest import MakeProxy, proxy_def
from .peers import pypiserver, require_peer
from .pip_setup import pip_env, pip_install, publish
from .upstreams import Upstream

A = Dist("upstream-demo-a", "1.0", requires=["upstream-demo-b>=1.0"], code="VALUE = 'a'\n")
B_INTERNAL = Dist("upstream-demo-b", "1.0", code="VALUE = 'internal'\n")
B_SQUAT = Dist("upstream-demo-b", "9.0", code="VALUE = 'squatted'\n")


def get(url: str, accept: str | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["first", "merge"])
def test_pip_through_a_group_is_safe_from_dependency_confusion_by_default(
    tmp_path: Path, make_proxy: MakeProxy, strategy: str
) -> None:
    internal = publish(tmp_path / "internal", B_INTERNAL)
    public = publish(tmp_path / "public", A, B_SQUAT)
    with pypiserver(internal) as internal_url, pypiserver(public) as public_url:
        proxy = make_proxy(
            proxy_def(key="internal", format="pypi", url=internal_url),
            proxy_def(key="public", format="pypi", url=public_url),
            groups=({"key": "py", "members": ["internal", "public"], "strategy": strategy},),
        )
        index = proxy.url("py") + "simple/"
        result = pip_install(tmp_path / "t", "upstream-demo-a", env=pip_env(index))
        assert result.returncode == 0, result.stderr
        b = (tmp_path / "t" / "upstream_demo_b" / "__init__.py").read_text()
        # first: the internal project hides the public squatter; merge: pip takes the higher version
        assert b == ("VALUE = 'internal'\n" if strategy == "first" else "VALUE = 'squatted'\n")
        assert (tmp_path / "t" / "upstream_demo_a" / "__init__.py").is_file()  # only in public
        status, headers, _ = get(proxy.url("py") + "files/upstream-demo-b/" + B_SQUAT.filename)
        if strategy == "first":
            assert status == 404  # internal owns the project and does not list the squatter's file
        else:
            assert status == 200 and headers["X-Upstream-Member"] == "public"


def test_generic_group_first_200_and_group_rules_on_top(upstream: Upstream, make_proxy: MakeProxy) -> None:
    with Upstream() as second:
        upstream.files["/only-first.txt"] = b"first"
        upstream.files["/both.txt"] = b"first-both"
        second.files["/both.txt"] = b"second-both"
        second.files["/only-second.txt"] = b"second"
        second.files["/secret.bin"] = b"x"
        proxy = make_proxy(
            proxy_def(key="one", format="generic", url=upstream.url),
            proxy_def(key="two", format="generic", url=second.url),
            groups=({"key": "files", "members": ["one", "two"], "block": ["*.bin"]},),
        )
        base = proxy.url("files")
        assert get(base + "both.txt")[2] == b"first-both"
        assert get(base + "only-second.txt")[2] == b"second"
        status, headers, _ = get(base + "only-first.txt")
        assert status == 200 and headers["X-Upstream-Member"] == "one"
        assert get(base + "nowhere.txt")[0] == 404
        assert get(base + "secret.bin")[0] == 403  # the group's rule
        assert get(proxy.url("two") + "secret.bin")[2] == b"x"  # the member alone has no such rule
        assert upstream.hits["/only-second.txt"] == 1  # asked first, answered 404


def test_npm_group_packument_from_the_first_member_and_tarballs_from_its_owner(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    from .test_npm import manifest, packument

    with Upstream() as second:
        for up, tag in ((upstream, b"one"), (second, b"two")):
            data = b"tarball-" + tag
            up.files["/dup"] = packument(
                "dup", {"1.0.0": manifest("dup", "1.0.0", f"{up.url}/dup/-/dup-1.0.0.tgz", data)}, "1.0.0"
            )
            up.files["/dup/-/dup-1.0.0.tgz"] = data
        second.files["/solo"] = packument(
            "solo", {"2.0.0": manifest("solo", "2.0.0", f"{second.url}/solo/-/solo-2.0.0.tgz", b"s")}, "2.0.0"
        )
        second.files["/solo/-/solo-2.0.0.tgz"] = b"s"
        proxy = make_proxy(
            proxy_def(key="one", format="npm", url=upstream.url + "/"),
            proxy_def(key="two", format="npm", url=second.url + "/"),
            groups=({"key": "js", "members": ["one", "two"]},),
        )
        status, _, body = get(proxy.url("js") + "dup")
        assert status == 200
        doc = json.loads(body)
        tarball = doc["versions"]["1.0.0"]["dist"]["tarball"]
        assert tarball == proxy.url("js") + "dup/-/dup-1.0.0.tgz"  # back through the group
        assert get(tarball)[2] == b"tarball-one"
        assert get(proxy.url("js") + "solo/-/solo-2.0.0.tgz")[2] == b"s"


def test_maven_group_merges_versions_and_serves_artifacts_from_the_first_that_has_them(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    def metadata(*versions: str) -> bytes:
        listed = "".join(f"<version>{v}</version>" for v in versions)
        return (
            "<?xml version='1.0' encoding='UTF-8'?><metadata><groupId>org.example</groupId>"
            f"<artifactId>lib</artifactId><versioning><latest>{versions[-1]}</latest>"
            f"<release>{versions[-1]}</release><versions>{listed}</versions>"
            "<lastUpdated>20260101000000</lastUpdated></versioning></metadata>"
        ).encode()

    with Upstream() as second:
        upstream.files["/org/example/lib/maven-metadata.xml"] = metadata("1.0", "1.1")
        second.files["/org/example/lib/maven-metadata.xml"] = metadata("1.1", "2.0")
        upstream.files["/org/example/lib/1.0/lib-1.0.jar"] = b"jar-1.0"
        second.files["/org/example/lib/2.0/lib-2.0.jar"] = b"jar-2.0"
        proxy = make_proxy(
            proxy_def(key="one", format="maven", url=upstream.url),
            proxy_def(key="two", format="maven", url=second.url),
            groups=({"key": "mvn", "members": ["one", "two"], "block": ["org.example:lib:[2.0,)"]},),
        )
        status, _, body = get(proxy.url("mvn") + "org/example/lib/maven-metadata.xml")
        assert status == 200
        text = body.decode()
        assert "<version>1.0</version><version>1.1</version>" in text and "2.0" not in text
        assert "<latest>1.1</latest>" in text and "<release>1.1</release>" in text
        assert get(proxy.url("mvn") + "org/example/lib/1.0/lib-1.0.jar")[2] == b"jar-1.0"
        assert get(proxy.url("mvn") + "org/example/lib/2.0/lib-2.0.jar")[0] == 403


def test_replay_through_a_group(upstream: Upstream, make_proxy: MakeProxy, tmp_path: Path) -> None:
    with Upstream() as second:
        second.files["/x.txt"] = b"from-two"
        definitions = (
            proxy_def(key="one", format="generic", url=upstream.url),
            proxy_def(key="two", format="generic", url=second.url),
        )
        groups = ({"key": "g", "members": ["one", "two"]},)
        record = make_proxy(*definitions, cache=tmp_path / "c", groups=groups)
        assert get(record.url("g") + "x.txt")[2] == b"from-two"
    replay = make_proxy(*definitions, cache=tmp_path / "c", groups=groups, mode="replay")
    status, headers, body = get(replay.url("g") + "x.txt")  # one: not recorded (504), two: recorded
    assert (status, body, headers["X-Upstream-Member"]) == (200, b"from-two", "two")


@pytest.mark.slow
def test_skopeo_pulls_through_a_docker_group(make_proxy: MakeProxy, tmp_path: Path) -> None:
    from .oci import build_image, registry, skopeo
    from .test_docker import layout_top_digest, pull, push_oci

    require_peer("docker-registry", "skopeo", "htpasswd", "openssl", install="scripts/peers/docker.sh")
    internal = build_image("amd64", {"hello": b"internal build"})
    squat = build_image("amd64", {"hello": b"public squatter"})
    other = build_image("amd64", {"hello": b"only upstream"})
    with registry(tmp_path / "reg-a") as reg_a, registry(tmp_path / "reg-b") as reg_b:
        push_oci(tmp_path, reg_a, "team/app", "v1", internal.manifest, internal.blobs)
        push_oci(tmp_path, reg_b, "team/app", "v1", squat.manifest, squat.blobs)
        push_oci(tmp_path, reg_b, "team/other", "v1", other.manifest, other.blobs)
        server = make_proxy(
            proxy_def(key="mine", format="docker", url=reg_a.url),
            proxy_def(key="hub", format="docker", url=reg_b.url),
            groups=({"key": "images", "members": ["mine", "hub"], "block": ["team/other:v2*"]},),
        )
        host = server.base_url.split("://", 1)[1]
        r = pull(tmp_path, f"{host}/images/team/app:v1", tmp_path / "app")
        assert r.returncode == 0, r.stderr
        assert layout_top_digest(tmp_path / "app") == internal.manifest.digest  # the first member's
        r = pull(tmp_path, f"{host}/images/team/other:v1", tmp_path / "other")
        assert r.returncode == 0, r.stderr
        assert layout_top_digest(tmp_path / "other") == other.manifest.digest  # only the second has it
        members = {(r.key, r.path.split("/")[-2]) for r in server.served.records if r.status == 200}
        assert ("mine", "manifests") in members and ("hub", "blobs") in members
        tags = skopeo("list-tags", "--tls-verify=false", f"docker://{host}/images/team/app", home=tmp_path)
        assert tags.returncode == 0 and json.loads(tags.stdout)["Tags"] == ["v1"], tags.stderr
        status, _, body = get(f"{server.base_url}/v2/images/team/other/manifests/v2.0")
        assert status == 403 and b"blocked by rule 'team/other:v2*'" in body  # the group's rule
