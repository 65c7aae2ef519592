"""Allow and block rules: which releases may come in through a proxy (docs/rules.md).

A rule names what its format knows, in the spelling its users already write:

=========  ===============================  ==========================================
format     rule                             versions
=========  ===============================  ==========================================
pypi       ``name`` / ``name SPECIFIER``    PEP 440 specifiers (``requests<2.31``), via packaging
npm        ``name`` / ``name@RANGE``        npm semver ranges (``lodash@<4.17.21``), via node-semver
maven      ``group:artifact[:RANGE]``       Maven ranges (``[1.0,2.0)``) or one version
docker     ``image[:TAG-GLOB]``             a glob on tags (``nginx:1.25-*``)
generic    ``PATH-GLOB``                    (no versions: the path is the thing)
=========  ===============================  ==========================================

Names are normalised as the format does (PEP 503 for pypi, lower case for npm and docker, a
one-segment docker name is ``library/NAME``), and ``*`` in a name is a glob.  **Block wins**: a
release that a block rule names is hidden even if an allow rule names it too; when ``allow`` is
given, only what it names comes in.  A rule with versions never matches a version its grammar
cannot read (a legacy PyPI version, a tag where no glob applies): such a release is *not blocked*
by that rule and *not allowed* by it either, so an allow list keeps it out.

npm ranges match as ``npm install`` does: a prerelease only matches a range that names a
prerelease of the same major.minor.patch (``<2.0.0`` does not match ``1.5.0-rc.1``); to block
prereleases, block them by name or with such a range.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from pytest_upstream.config.maven_versions import parse_range

RULE_FORMATS = ("pypi", "npm", "maven", "docker", "generic")
_MAX_RULE = 512


class VersionSet(Protocol):
    def __contains__(self, version: str) -> bool: ...


@dataclass(frozen=True)
class _Pep440:
    spec: SpecifierSet

    def __contains__(self, version: str) -> bool:
        try:
            parsed = Version(version)
        except InvalidVersion:
            return False
        # A block of "<2.31" must hide 2.30rc1 too; pip itself skips prereleases unless asked.
        return self.spec.contains(parsed, prereleases=True)


@dataclass(frozen=True)
class _NpmRange:
    text: str

    def __contains__(self, version: str) -> bool:
        import nodesemver

        try:
            return bool(nodesemver.satisfies(version, self.text, loose=False))
        except ValueError:  # not a semver version: no range matches it
            return False


@dataclass(frozen=True)
class _TagGlob:
    glob: str

    def __contains__(self, version: str) -> bool:
        return fnmatch.fnmatchcase(version, self.glob)


@dataclass(frozen=True)
class Rule:
    """One rule as written (``text``, for messages) and what it matches."""

    text: str
    name: str  # the normalised name, or a glob of them
    versions: VersionSet | None = None  # None: every version (and the name itself)

    def names(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.name)

    def matches(self, name: str, version: str | None) -> bool:
        """Does the rule name this release (``version`` None: the name as a whole)?"""
        if not self.names(name):
            return False
        if self.versions is None:
            return True
        return version is not None and version in self.versions


@dataclass(frozen=True)
class Refusal:
    """Why a name or a release is kept out; ``rule`` is the rule's text, or "" for "not allowed"."""

    rule: str
    blocked: bool  # True: a block rule named it; False: no allow rule named it

    def __str__(self) -> str:
        if self.blocked:
            return f"blocked by rule {self.rule!r}"
        return "not named by any allow rule"


@dataclass(frozen=True)
class Rules:
    """A proxy's (or a group's) allow and block rules, parsed; empty lets everything in."""

    format: str = "generic"
    allow: tuple[Rule, ...] = ()
    block: tuple[Rule, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.allow or self.block)

    def normalise(self, name: str) -> str:
        return normalise_name(self.format, name)

    def release(self, name: str, version: str | None) -> Refusal | None:
        """Why this release (``version`` None: a request that names no version) is kept out."""
        name = self.normalise(name)
        for rule in self.block:
            if rule.matches(name, version):
                return Refusal(rule.text, blocked=True)
        if self.allow and not any(rule.matches(name, version) for rule in self.allow):
            return Refusal("", blocked=False)
        return None

    def project(self, name: str) -> Refusal | None:
        """Why the whole name is kept out (its metadata not served at all), or None when some of
        its releases may come in (``release`` then decides each)."""
        name = self.normalise(name)
        for rule in self.block:
            if rule.versions is None and rule.names(name):
                return Refusal(rule.text, blocked=True)
        if self.allow and not any(rule.names(name) for rule in self.allow):
            return Refusal("", blocked=False)
        return None


def normalise_name(fmt: str, name: str) -> str:
    if fmt == "pypi":
        return canonicalize_name(name)
    if fmt == "npm":
        return name.lower()
    if fmt == "docker":
        name = name.lower()
        return name if "/" in name else f"library/{name}"
    return name


_BAD_CHARS = re.compile(r"[\x00-\x20\x7f]")


def _name(fmt: str, text: str, rule: str) -> str:
    if not text or _BAD_CHARS.search(text):
        raise ValueError(f"rule {rule!r}: a name is needed, with no spaces or control characters")
    return normalise_name(fmt, text)


def parse_rule(fmt: str, text: object) -> Rule:
    """One rule of format ``fmt``; ValueError says what is wrong with it."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"a rule must be a non-empty string (got {text!r})")
    if len(text) > _MAX_RULE:
        raise ValueError(f"a rule is at most {_MAX_RULE} characters")
    rule = text.strip()
    if fmt == "pypi":
        match = re.match(r"^([A-Za-z0-9._*-]+)\s*(.*)$", rule)
        if not match:
            raise ValueError(f"rule {rule!r}: a pypi rule is NAME or NAME SPECIFIER (e.g. 'requests<2.31')")
        name, spec = match.groups()
        if not spec:
            return Rule(rule, _name(fmt, name, rule))
        try:
            return Rule(rule, _name(fmt, name, rule), _Pep440(SpecifierSet(spec)))
        except InvalidSpecifier:
            raise ValueError(f"rule {rule!r}: {spec!r} is not a PEP 440 version specifier") from None
    if fmt == "npm":
        at = rule.find("@", 1)  # a scope's '@' comes first
        if at < 0:
            return Rule(rule, _name(fmt, rule, rule))
        name, spec = rule[:at], rule[at + 1 :].strip()
        import nodesemver

        if not spec or nodesemver.valid_range(spec, loose=False) is None:
            raise ValueError(f"rule {rule!r}: {spec!r} is not an npm semver range")
        return Rule(rule, _name(fmt, name, rule), _NpmRange(spec))
    if fmt == "maven":
        parts = rule.split(":", 2)
        if len(parts) < 2 or not parts[0] or not parts[1]:
            raise ValueError(f"rule {rule!r}: a maven rule is GROUP:ARTIFACT or GROUP:ARTIFACT:RANGE")
        name = _name(fmt, f"{parts[0]}:{parts[1]}", rule)
        if len(parts) == 2:
            return Rule(rule, name)
        try:
            return Rule(rule, name, parse_range(parts[2]))
        except ValueError as exc:
            raise ValueError(f"rule {rule!r}: {exc}") from None
    if fmt == "docker":
        # A tag follows the last ':' that is after the last '/' (a registry port is not a tag).
        slash = rule.rfind("/")
        colon = rule.find(":", slash + 1)
        if colon < 0:
            return Rule(rule, _name(fmt, rule, rule))
        tag = rule[colon + 1 :]
        if not tag or _BAD_CHARS.search(tag):
            raise ValueError(f"rule {rule!r}: an empty or malformed tag glob")
        return Rule(rule, _name(fmt, rule[:colon], rule), _TagGlob(tag))
    if fmt == "generic":
        return Rule(rule, _name(fmt, rule.lstrip("/"), rule))
    raise ValueError(f"rules are not supported for format {fmt!r}")


def parse_rules(fmt: str, allow: Iterable[object] = (), block: Iterable[object] = ()) -> Rules:
    return Rules(fmt, tuple(parse_rule(fmt, r) for r in allow), tuple(parse_rule(fmt, r) for r in block))
