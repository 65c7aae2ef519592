"""Kept-out releases vanish from each format's metadata (formats/hiding.py, pypi_pages.hide_files),
and the cooldown (config/release_policy.py) counts from the times the formats publish."""

from __future__ import annotations

import json
import re
import urllib.request
import xml.etree.ElementTree as ET
from dataclasses import asdict

import pytest

from pytest_upstream.config.release_policy import (
    ReleasePolicy,
    TooNew,
    parse_policy,
    parse_time,
    policy_table,
)
from pytest_upstream.config.rules import parse_rules
from pytest_upstream.formats.hiding import Hiding, hide_maven_versions, hide_npm_versions, hide_tags
from pytest_upstream.formats.pypi_pages import hide_files, parse_page, render_json
from pytest_upstream.formats.refusals import refused
from pytest_upstream.repro.lockfile import LockFileEntry

from .conftest import MakeProxy, proxy_def
from .upstreams import Upstream

DAY = 86400.0
NOW = parse_time("2026-11-30T12:00:00Z") or 0.0


def policy(
    fmt: str, *, allow: list[str] | None = None, block: list[str] | None = None, **kw: object
) -> ReleasePolicy:
    return ReleasePolicy(parse_rules(fmt, allow or [], block or []), **kw)  # type: ignore[arg-type]


def test_publication_times_as_the_formats_write_them() -> None:
    assert parse_time("2026-11-30T12:00:00Z") == parse_time("2026-11-30T12:00:00.000+00:00")
    assert parse_time("20261130120000") == NOW  # Maven's lastUpdated, UTC
    for bad in [None, 3, "", "yesterday", "2026-13-01T00:00:00Z", "x" * 100]:
        assert parse_time(bad) is None


def test_cooldown_hides_young_releases_and_says_until_when() -> None:
    cool = ReleasePolicy(min_age=3 * DAY)
    young = cool.refusal("p", "2.0", NOW - DAY, NOW)
    assert isinstance(young, TooNew) and young.visible_at == NOW + 2 * DAY
    assert str(young) == "published 1d ago, within min_age 3d"
    assert cool.refusal("p", "1.0", NOW - 4 * DAY, NOW) is None
    assert cool.refusal("p", "1.0", None, NOW) is None  # unknown time: let in by default
    strict = ReleasePolicy(min_age=3 * DAY, min_age_unknown="hide")
    assert str(strict.refusal("p", "1.0", None, NOW)).startswith("no publication time known")
    assert not ReleasePolicy() and cool


def _pypi_page() -> bytes:
    def file(name: str, uploaded: str) -> dict[str, object]:
        return {
            "filename": name,
            "url": f"https://files.example/{name}",
            "hashes": {},
            "upload-time": uploaded,
        }

    return json.dumps(
        {
            "meta": {"api-version": "1.1"},
            "name": "gamma-demo",
            "versions": ["0.3", "0.4", "0.5", "0.6"],
            "files": [
                file("gamma_demo-0.3-py3-none-any.whl", "2026-01-01T00:00:00Z"),
                file("gamma_demo-0.3.tar.gz", "2026-01-01T00:00:00Z"),
                file("gamma_demo-0.4-py3-none-any.whl", "2026-02-01T00:00:00Z"),
                file("gamma_demo-0.5-py3-none-any.whl", "2026-11-29T12:00:00Z"),
            ],
        }
    ).encode()


def test_pypi_a_blocked_and_a_young_release_vanish_from_the_page() -> None:
    page = parse_page(_pypi_page(), "https://up.example/simple/gamma-demo/", root=False)
    hiding = Hiding(policy("pypi", block=["gamma-demo==0.4"], min_age=3 * DAY), NOW)
    shown = hide_files(page, "gamma-demo", hiding)
    assert [f.filename for f in shown.files] == ["gamma_demo-0.3-py3-none-any.whl", "gamma_demo-0.3.tar.gz"]
    assert shown.versions == ["0.3", "0.6"]  # 0.6 has no files and no rule names it
    assert [(h.version, h.reason) for h in hiding.hidden] == [
        ("0.4", "blocked by rule 'gamma-demo==0.4'"),
        ("0.5", "published 1d ago, within min_age 3d"),
    ]
    assert hiding.visible_at == parse_time("2026-12-02T12:00:00Z")
    rendered = json.loads(render_json("gamma-demo", shown, root=False))
    assert "0.4" not in json.dumps(rendered) and "0.5" not in json.dumps(rendered)


def test_pypi_an_allow_list_keeps_unnamed_projects_out() -> None:
    page = parse_page(_pypi_page(), "https://up.example/simple/gamma-demo/", root=False)
    hiding = Hiding(policy("pypi", allow=["internal-*"]), NOW)
    assert hide_files(page, "gamma-demo", hiding).files == []
    assert {h.reason for h in hiding.hidden} == {"not named by any allow rule"}


def _packument() -> dict[str, object]:
    versions = ["1.0.0", "1.1.0", "1.2.0", "2.0.0-rc.1"]
    return {
        "name": "left-pad",
        "versions": {v: {"name": "left-pad", "version": v, "dist": {"tarball": "t"}} for v in versions},
        "time": {
            "created": "2025-01-01T00:00:00Z",
            "1.0.0": "2025-01-01T00:00:00Z",
            "1.1.0": "2025-06-01T00:00:00Z",
            "1.2.0": "2026-11-30T06:00:00Z",
            "2.0.0-rc.1": "2025-07-01T00:00:00Z",
        },
        "dist-tags": {"latest": "1.2.0", "next": "2.0.0-rc.1", "legacy": "1.0.0"},
    }


def test_npm_young_and_blocked_versions_vanish_and_latest_moves_back() -> None:
    doc = _packument()
    hiding = Hiding(policy("npm", block=["left-pad@>=2.0.0-0"], min_age=DAY), NOW)
    hide_npm_versions(doc, hiding)
    assert list(doc["versions"]) == ["1.0.0", "1.1.0"]  # type: ignore[call-overload]
    assert doc["dist-tags"] == {"latest": "1.1.0", "legacy": "1.0.0"}
    assert "1.2.0" not in doc["time"] and "created" in doc["time"]  # type: ignore[operator]
    assert [h.version for h in hiding.hidden] == ["1.2.0", "2.0.0-rc.1"]


def test_npm_nothing_left_means_no_latest() -> None:
    doc = _packument()
    hide_npm_versions(doc, Hiding(policy("npm", block=["left-pad"]), NOW))
    assert doc["versions"] == {} and doc["dist-tags"] == {}


MAVEN_METADATA = b"""<?xml version="1.0" encoding="UTF-8"?>
<metadata xmlns="http://maven.apache.org/METADATA/1.1.0">
  <groupId>org.example</groupId>
  <artifactId>lib</artifactId>
  <versioning>
    <latest>2.1-SNAPSHOT</latest>
    <release>2.0</release>
    <versions>
      <version>1.0</version>
      <version>1.5</version>
      <version>2.0</version>
      <version>2.1-SNAPSHOT</version>
    </versions>
    <lastUpdated>20261130110000</lastUpdated>
  </versioning>
</metadata>
"""


def test_maven_blocked_range_and_young_latest_vanish_pointers_move() -> None:
    hiding = Hiding(policy("maven", block=["org.example:lib:[2.0,3.0)"], min_age=DAY), NOW)
    out = hide_maven_versions(MAVEN_METADATA, "org.example:lib", hiding)
    root = ET.fromstring(out)
    ns = "{http://maven.apache.org/METADATA/1.1.0}"
    assert [v.text for v in root.iter(f"{ns}version")] == ["1.0", "1.5"]
    assert root.findtext(f"{ns}versioning/{ns}latest") == "1.5"
    assert root.findtext(f"{ns}versioning/{ns}release") == "1.5"
    assert root.findtext(f"{ns}groupId") == "org.example"
    assert b"ns0:" not in out and out.startswith(b'<?xml version="1.0" encoding="UTF-8"?>')
    untouched = Hiding(policy("maven", block=["org.other:*"]), NOW)
    assert hide_maven_versions(MAVEN_METADATA, "org.example:lib", untouched) is MAVEN_METADATA


def test_docker_tags_and_the_403_text() -> None:
    hiding = Hiding(policy("docker", block=["nginx:1.25-*"]), NOW)
    doc = hide_tags(
        {"name": "library/nginx", "tags": ["1.24", "1.25-alpine", "latest"]}, "library/nginx", hiding
    )
    assert doc == {"name": "library/nginx", "tags": ["1.24", "latest"]}
    assert hide_tags(["not", "a", "list"], "x", hiding) == ["not", "a", "list"]
    refusal = policy("pypi", block=["requests<2.31"]).refusal("requests", "2.30", None, NOW)
    assert refusal is not None
    error = refused("requests 2.30", refusal)
    assert error.status == 403 and str(error) == "requests 2.30 is blocked by rule 'requests<2.31'"
    young = ReleasePolicy(min_age=DAY).refusal("x", "1", NOW - 60, NOW)
    assert young is not None
    assert str(refused("x 1", young)) == "x 1 is held back: published 1m ago, within min_age 1d"


def test_policy_fields_parse_and_round_trip() -> None:
    entry = {"allow": ["gamma-*"], "block": ["gamma-demo==0.4"], "min_age": "3d", "min_age_unknown": "hide"}
    parsed = parse_policy(entry, "pypi")
    assert parsed.min_age == 3 * DAY and parsed.min_age_unknown == "hide"
    assert parsed.rules.block[0].text == "gamma-demo==0.4"
    assert parse_policy(policy_table(parsed), "pypi") == parsed
    assert parse_policy({}, "npm") == ReleasePolicy(parse_rules("npm"))
    assert policy_table(parse_policy({}, "npm")) == {}
    for bad, says in [
        ({"allow": "x"}, "allow must be a list"),
        ({"block": ["requests<<2"]}, "allow/block: rule 'requests<<2'"),
        ({"min_age": "soon"}, "min_age: not an age"),
        ({"min_age": -1}, "must not be negative"),
        ({"min_age": True}, "min_age must be an age"),
        ({"min_age_unknown": "maybe"}, "min_age_unknown must be one of allow, hide"),
    ]:
        with pytest.raises(ValueError, match=re.escape(says)):
            parse_policy(bad, "pypi")


def test_what_a_rule_hid_is_in_the_served_record_and_the_lock(
    upstream: Upstream, make_proxy: MakeProxy
) -> None:
    names = ["gamma_demo-0.3-py3-none-any.whl", "gamma_demo-0.4-py3-none-any.whl"]
    links = "".join(f'<a href="/files/{n}#sha256={"a" * 64}">{n}</a>' for n in names)
    upstream.files["/simple/gamma-demo/"] = f"<html><body>{links}</body></html>".encode()
    upstream.content_types["/simple/gamma-demo/"] = "text/html"
    proxy = make_proxy(
        proxy_def(key="py", format="pypi", url=upstream.url + "/simple/", block=["gamma-demo==0.4"])
    )
    with urllib.request.urlopen(proxy.url("py") + "simple/gamma-demo/", timeout=10) as resp:
        page = resp.read().decode()
    assert names[0] in page and names[1] not in page
    why = "gamma-demo 0.4: blocked by rule 'gamma-demo==0.4'"
    assert [r.hidden for r in proxy.served.records] == [(why,)]
    locked = [e for e in proxy.engine.recorded_lock() if e.path == "simple/gamma-demo/"]
    assert [e.hidden for e in locked] == [(why,)]
    assert f'"hidden":["{why}"]' in proxy.engine.recorded_lock().dumps()
    with pytest.raises(ValueError, match="hidden"):
        LockFileEntry.from_dict({**asdict(locked[0]), "hidden": ["bad\nline"]})
