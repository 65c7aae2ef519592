"""Ordered groups of upstream proxies: several upstreams behind one URL (docs/rules.md § Groups).

``[[tool.pytest-upstream.group]]`` with ``key`` and ``members = [...]``: the keys of proxies of
one format, asked in that order, served at ``/<group>/...`` like a proxy of that format (Nexus's
group repositories, Artifactory's virtual repositories).  The group's key follows the proxy key
grammar and may not be a proxy's key; a member must be a proxy, not a group (no nesting, so no
cycles), and may appear once.  A group has its own ``allow``/``block``/``min_age``, applied on
top of each member's.

``strategy`` (pypi only): ``"first"`` (the default) serves a project from the first member that
has it and hides it in later members, so a public index cannot squat an internal name with a
higher version (dependency confusion; uv's first-index strategy); ``"merge"`` unions the files
of every member, which is what pip's ``--extra-index-url`` does, with its risk.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pytest_upstream.config.checks import ConfigError
from pytest_upstream.config.keys import key_error
from pytest_upstream.config.release_policy import POLICY_FIELDS, ReleasePolicy, parse_policy

GROUP_STRATEGIES = ("first", "merge")
_GROUP_FIELDS = {"key", "members", "strategy", *POLICY_FIELDS}
MAX_MEMBERS = 64


@dataclass(frozen=True)
class GroupDefinition:
    key: str
    format: str
    members: tuple[str, ...]
    strategy: str = "first"
    policy: ReleasePolicy = field(default_factory=ReleasePolicy)

    def as_table(self) -> dict[str, Any]:
        from pytest_upstream.config.release_policy import policy_table

        table: dict[str, Any] = {"key": self.key, "members": list(self.members)}
        if self.strategy != "first":
            table["strategy"] = self.strategy
        table.update(policy_table(self.policy))
        return table


def parse_groups(entries: object, formats: Mapping[str, str], where: str) -> tuple[GroupDefinition, ...]:
    """The ``group`` array of a table; ``formats`` maps every proxy key to its format."""
    if entries is None:
        return ()
    if not isinstance(entries, list):
        raise ConfigError(f"{where}: 'group' must be an array of tables ([[tool.pytest-upstream.group]])")
    groups: list[GroupDefinition] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        at = f"{where}: [[tool.pytest-upstream.group]] entry {i + 1}"
        group = _parse_group(entry, formats, at)
        if group.key in seen:
            raise ConfigError(f"{at}: duplicate group key {group.key!r}")
        seen.add(group.key)
        groups.append(group)
    return tuple(groups)


def _parse_group(entry: object, formats: Mapping[str, str], where: str) -> GroupDefinition:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: must be a table")
    unknown = sorted(set(entry) - _GROUP_FIELDS)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {', '.join(unknown)}")
    key = entry.get("key")
    if not isinstance(key, str) or (problem := key_error(key)):
        raise ConfigError(
            f"{where}: invalid group key {key!r}: {problem if isinstance(key, str) else 'missing'}"
        )
    where = f"{where} (key {key!r})"
    if key in formats:
        raise ConfigError(f"{where}: {key!r} is already a proxy's key")
    members = entry.get("members")
    if not isinstance(members, Sequence) or isinstance(members, str) or not members:
        raise ConfigError(f"{where}: members must be a non-empty list of proxy keys")
    if len(members) > MAX_MEMBERS:
        raise ConfigError(f"{where}: at most {MAX_MEMBERS} members")
    found: list[str] = []
    for member in members:
        if not isinstance(member, str):
            raise ConfigError(f"{where}: members must be proxy keys (got {member!r})")
        if member == key:
            raise ConfigError(f"{where}: a group cannot be its own member")
        if member not in formats:
            raise ConfigError(
                f"{where}: member {member!r} is not a proxy's key "
                "(members are proxies; a group cannot be a member of another group)"
            )
        if member in found:
            raise ConfigError(f"{where}: member {member!r} is listed twice")
        found.append(member)
    kinds = sorted({formats[m] for m in found})
    if len(kinds) > 1:
        listing = ", ".join(f"{m} ({formats[m]})" for m in found)
        raise ConfigError(f"{where}: members must be of one format, not {listing}")
    fmt = kinds[0]
    strategy = entry.get("strategy", "first")
    if strategy not in GROUP_STRATEGIES:
        raise ConfigError(
            f"{where}: strategy must be one of {', '.join(GROUP_STRATEGIES)} (got {strategy!r})"
        )
    if strategy != "first" and fmt != "pypi":
        raise ConfigError(f"{where}: strategy applies to pypi groups only (this one is {fmt!r})")
    try:
        policy = parse_policy(entry, fmt)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return GroupDefinition(key, fmt, tuple(found), strategy, policy)
