"""Allow/block rules (config/rules.py) and Maven's version order (config/maven_versions.py).

The version grammars are checked against independent implementations: Maven's own
``ComparableVersion`` (the Debian maven package's maven-artifact jar, run once per batch), npm's
own semver module (the one npm ships, run by node once per batch), and packaging for PEP 440.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from pytest_upstream.config.maven_versions import compare_versions, parse_range, version_key
from pytest_upstream.config.rules import Refusal, parse_rule, parse_rules

from .peers import require_peer

MAVEN_ARTIFACT_JAR = Path("/usr/share/maven/lib/maven-artifact-3.x.jar")
NPM_SEMVER = Path("/usr/lib/node_modules/npm/node_modules/semver")


# -- Maven's order, against Maven itself ------------------------------------------------------------
_TOKENS = ["0", "1", "2", "10", "01", "alpha", "a", "beta", "b", "m", "milestone", "rc", "cr"]
_TOKENS += ["snapshot", "SNAPSHOT", "ga", "final", "release", "sp", "abc", "xyz"]


def _random_versions(seed: int, count: int) -> list[str]:
    rng = random.Random(seed)
    versions = []
    for _ in range(count):
        text = rng.choice(["0", "1", "2", "10"])
        for _ in range(rng.randint(0, 4)):
            text += rng.choice([".", "-", ""]) + rng.choice(_TOKENS)
        versions.append(text)
    return versions


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_maven_order_agrees_with_mavens_comparable_version(seed: int) -> None:
    require_peer("java", str(MAVEN_ARTIFACT_JAR), install="scripts/peers/maven.sh")
    versions = _random_versions(seed, 300)
    out = subprocess.run(
        [
            "java",
            "-cp",
            str(MAVEN_ARTIFACT_JAR),
            "org.apache.maven.artifact.versioning.ComparableVersion",
            *versions,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    pairs = re.findall(r"^   (\S+) (<|>|==) (\S+)$", out, re.M)
    assert len(pairs) == len(versions) - 1
    wrong = [(a, op, b) for a, op, b in pairs if compare_versions(a, b) != {"<": -1, "==": 0, ">": 1}[op]]
    assert wrong == []


def test_maven_order_known_cases() -> None:
    ordered = ["1-alpha-1", "1-beta-2", "1-m3", "1-rc1", "1-SNAPSHOT", "1", "1-sp1", "1-foo", "1.0.1"]
    assert sorted(reversed(ordered), key=version_key) == ordered
    for a, b in [("1", "1.0.0"), ("1-ga", "1"), ("1-final", "1.0"), ("1cr", "1rc"), ("1-a1", "1-alpha-1")]:
        assert compare_versions(a, b) == 0, (a, b)


@settings(max_examples=200)
@given(st.lists(st.sampled_from(_random_versions(7, 60)), min_size=2, max_size=2))
def test_maven_order_is_antisymmetric(pair: list[str]) -> None:
    # Not transitive in every corner, as Maven's own is not: 10.milestone < 10.final <
    # 10.abc-SNAPSHOT < 10.milestone (Maven 3.8.7's ComparableVersion says the same).
    a, b = pair
    assert compare_versions(a, b) == -compare_versions(b, a)
    assert compare_versions(a, a) == 0


def test_maven_ranges() -> None:
    cases = {
        "[1.0,2.0)": (["1.0", "1.5", "2.0-SNAPSHOT", "2.0-rc1"], ["0.9", "2.0", "2.0.0", "3"]),
        "(,1.0],[1.2,)": (["0.1", "1.0", "1.2", "9"], ["1.1", "1.0.1"]),
        "[1.5]": (["1.5", "1.5.0"], ["1.5.1", "1.4"]),
        "1.5": (["1.5"], ["1.6"]),
        "(1.0,)": (["1.0.1", "1.1"], ["1.0", "1"]),
    }
    for spec, (inside, outside) in cases.items():
        parsed = parse_range(spec)
        assert [v for v in inside if v not in parsed] == [], spec
        assert [v for v in outside if v in parsed] == [], spec
    for bad in ["", "[1.0,2.0", "[2.0,1.0]", "(1.0)", "[1,2,3]", "[1.0],", "[1.0]x", "[a b]"]:
        with pytest.raises(ValueError):
            parse_range(bad)


# -- npm ranges, against npm's own semver module -------------------------------------------------------
_NPM_RANGES = ["^1.2.3", "~1.2", "1.x", "<2.0.0", ">=1.0.0 <2.0.0 || >=3", "*", "1.2.3 - 2.3"]
_NPM_RANGES += [">=2.0.0-beta.1 <2.0.0", "^0.2.3", "~0.0.1", "=1.2.3", "<=1.2.3", ">1.2.3-alpha"]
_NPM_VERSIONS = ["0.0.1", "0.2.3", "0.2.9", "0.3.0", "1.0.0", "1.2.3", "1.2.4", "1.3.0", "1.9.9"]
_NPM_VERSIONS += ["2.0.0", "2.0.0-beta.2", "2.0.0-rc.1", "2.3.9", "2.4.0", "3.0.0", "1.5.0-rc.1"]
_NPM_VERSIONS += ["1.2.3-alpha.1", "1.2.4-alpha", "not-a-version", "1.2"]


def test_npm_rules_match_as_npms_own_semver_does() -> None:
    require_peer("node", str(NPM_SEMVER), install="scripts/peers/npm.sh")
    script = (
        f"const s = require({json.dumps(str(NPM_SEMVER))});"
        f"const r = {json.dumps(_NPM_RANGES)}, v = {json.dumps(_NPM_VERSIONS)};"
        "console.log(JSON.stringify(r.map(x => v.map(y => s.valid(y) ? s.satisfies(y, x) : false))));"
    )
    truth = json.loads(
        subprocess.run(["node", "-e", script], capture_output=True, text=True, check=True).stdout
    )
    ours = [[parse_rule("npm", f"pkg@{r}").matches("pkg", v) for v in _NPM_VERSIONS] for r in _NPM_RANGES]
    mismatches = [
        (r, v, ours[i][j])
        for i, r in enumerate(_NPM_RANGES)
        for j, v in enumerate(_NPM_VERSIONS)
        if ours[i][j] != truth[i][j]
    ]
    assert mismatches == []


def test_npm_rule_names_scopes_and_errors() -> None:
    rule = parse_rule("npm", "@Scope/Pkg@^1.0.0")
    assert rule.matches("@scope/pkg", "1.4.0") and not rule.matches("@scope/pkg", "2.0.0")
    assert not rule.matches("@scope/other", "1.4.0")
    assert parse_rule("npm", "@scope/*").matches("@scope/anything", None)
    with pytest.raises(ValueError, match="not an npm semver range"):
        parse_rule("npm", "pkg@>>1")


# -- PEP 440, against packaging -------------------------------------------------------------------------
_NAMES = st.sampled_from(["requests", "Gamma_Demo", "gamma.demo", "zope-interface", "Django"])
_VERSIONS = st.sampled_from(
    ["0.1", "0.4", "1.0", "2.30", "2.30rc1", "2.31", "2.31.0.post1", "3!1.0", "1.0.dev3"]
)
_SPECS = st.sampled_from(["<2.31", "==0.4", ">=1,<3", "~=2.30", "!=2.31", "==2.*", ">0.1"])


@settings(max_examples=300)
@given(rule_name=_NAMES, spec=_SPECS, name=_NAMES, version=_VERSIONS)
def test_pypi_rules_match_the_pep_440_model(rule_name: str, spec: str, name: str, version: str) -> None:
    rule = parse_rule("pypi", f"{rule_name}{spec}")
    model = canonicalize_name(rule_name) == canonicalize_name(name) and SpecifierSet(spec).contains(
        Version(version), prereleases=True
    )
    assert rule.matches(canonicalize_name(name), version) == model


def test_pypi_rule_spellings() -> None:
    assert parse_rule("pypi", "Gamma_Demo == 0.4").matches("gamma-demo", "0.4")
    assert parse_rule("pypi", "internal-*").matches("internal-tools", None)
    legacy = parse_rule("pypi", "old<2")
    assert not legacy.matches("old", "1.0-foo-bar")  # not PEP 440: a versioned rule cannot say
    for bad in ["requests<<2", "re quests", "", "requests; python_version<'3'"]:
        with pytest.raises(ValueError):
            parse_rule("pypi", bad)


# -- docker, maven and generic names ------------------------------------------------------------------------
def test_docker_rules() -> None:
    nginx = parse_rule("docker", "nginx:1.25-*")
    assert nginx.name == "library/nginx"
    assert nginx.matches("library/nginx", "1.25-alpine") and not nginx.matches("library/nginx", "1.26")
    port = parse_rule("docker", "registry.local:5000/team/app")  # a port, not a tag
    assert port.versions is None and port.name == "registry.local:5000/team/app"
    assert parse_rule("docker", "Team/*:dev-*").matches("team/app", "dev-1")


def test_maven_and_generic_rules() -> None:
    rule = parse_rule("maven", "org.example:lib:[1.0,2.0)")
    assert rule.matches("org.example:lib", "1.9") and not rule.matches("org.example:lib", "2.0")
    assert parse_rule("maven", "org.evil*:*").matches("org.evilcorp:x", "1")
    with pytest.raises(ValueError, match="GROUP:ARTIFACT"):
        parse_rule("maven", "org.example")
    files = parse_rule("generic", "/releases/*.exe")
    assert files.matches("releases/setup.exe", None) and not files.matches("releases/setup.msi", None)


# -- the rule set: block wins, an allow list keeps everything else out --------------------------------------
def test_block_wins_and_allow_lists_keep_the_rest_out() -> None:
    rules = parse_rules("pypi", allow=["gamma-demo", "requests"], block=["gamma-demo==0.4"])
    assert rules.release("Gamma_Demo", "0.4") == Refusal("gamma-demo==0.4", blocked=True)
    assert str(rules.release("gamma-demo", "0.4")) == "blocked by rule 'gamma-demo==0.4'"
    assert rules.release("gamma-demo", "0.3") is None
    assert rules.project("gamma-demo") is None  # some releases come in
    assert rules.project("evil") == Refusal("", blocked=False)
    assert str(rules.release("evil", "1.0")) == "not named by any allow rule"
    whole = parse_rules("pypi", block=["evil-*"])
    assert whole.project("evil-pkg") == Refusal("evil-*", blocked=True)
    assert not parse_rules("pypi") and rules


def test_a_rule_is_a_bounded_string() -> None:
    for bad in [None, 3, "", "   ", "x" * 600]:
        with pytest.raises(ValueError):
            parse_rule("pypi", bad)
    with pytest.raises(ValueError, match="not supported"):
        parse_rule("helm", "x")


# -- npm ranges, against a second, independent implementation (hypothesis) --------------------------------
_PARTS = st.integers(min_value=0, max_value=12)
_RELEASES = st.builds(lambda a, b, c: f"{a}.{b}.{c}", _PARTS, _PARTS, _PARTS)
_OPERATORS = st.sampled_from(["", "=", "<", "<=", ">", ">=", "^", "~"])


@st.composite
def _npm_ranges(draw: st.DrawFn) -> str:
    def comparator() -> str:
        return draw(_OPERATORS) + draw(_RELEASES)

    sets = [
        " ".join(comparator() for _ in range(draw(st.integers(1, 2)))) for _ in range(draw(st.integers(1, 2)))
    ]
    return " || ".join(sets)


@settings(max_examples=300)
@given(spec=_npm_ranges(), version=_RELEASES)
def test_npm_rules_agree_with_semantic_version_on_releases(spec: str, version: str) -> None:
    # semantic_version's NpmSpec reads npm's range grammar independently (it differs from npm only
    # on prereleases, which this test leaves out).
    import semantic_version

    model = semantic_version.NpmSpec(spec).match(semantic_version.Version(version))
    assert parse_rule("npm", f"pkg@{spec}").matches("pkg", version) == model
