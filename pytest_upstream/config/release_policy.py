"""What a proxy lets in: its allow/block rules (rules.py) and a release cooldown (``min_age``).

A format asks one question per release it is about to list or serve: ``policy.refusal(name,
version, uploaded, now)``, where ``uploaded`` is the publication time the format knows (PEP 700
``upload-time``, npm's ``time``, Maven's ``lastUpdated``) or None.  The answer is None (let it
in) or a ``Refusal`` whose text says why, in words a status line can carry: ``blocked by rule
'requests<2.31'``, ``published 5h ago, within min_age 3d``.

A release with no known publication time is let in by default when a cooldown is set
(``min_age_unknown = "allow"``): many indexes publish no times (a PyPI simple page in HTML, most
Maven repositories), and hiding everything there would make a cooldown unusable.  ``"hide"``
keeps such releases out instead, for those who prefer a build that fails over one that may
take a release younger than the cooldown.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pytest_upstream.config.rules import Refusal, Rules, parse_rules
from pytest_upstream.config.units import human_age, parse_age

UNKNOWN_AGE_POLICIES = ("allow", "hide")
MAX_RULES = 10_000


@dataclass(frozen=True)
class TooNew:
    """A release younger than the cooldown; ``visible_at`` is when it stops being one."""

    age: float | None  # None: no publication time known (and min_age_unknown = "hide")
    min_age: float
    visible_at: float | None

    def __str__(self) -> str:
        if self.age is None:
            return f"no publication time known, and min_age {human_age(self.min_age)} hides such releases"
        return f"published {human_age(max(self.age, 0))} ago, within min_age {human_age(self.min_age)}"


@dataclass(frozen=True)
class ReleasePolicy:
    rules: Rules = field(default_factory=Rules)
    min_age: float = 0.0  # seconds; 0: no cooldown
    min_age_unknown: str = "allow"
    # A group's policy, applied after this (a member's) one: a release must pass both.
    then: ReleasePolicy | None = None

    def __bool__(self) -> bool:
        return bool(self.rules) or self.min_age > 0 or bool(self.then)

    def and_then(self, other: ReleasePolicy) -> ReleasePolicy:
        """This policy, then ``other`` (a group's, on top of its member's)."""
        if not other:
            return self
        if not self:
            return other
        return ReleasePolicy(self.rules, self.min_age, self.min_age_unknown, other)

    @property
    def cooldown(self) -> bool:
        """Does a ``min_age`` (this one's or a group's) apply?"""
        return self.min_age > 0 or (self.then is not None and self.then.cooldown)

    def without_cooldown(self) -> ReleasePolicy:
        """The rules alone: what can be judged before a publication time is known."""
        then = self.then.without_cooldown() if self.then else None
        return ReleasePolicy(self.rules, then=then)

    def project(self, name: str) -> Refusal | None:
        """Why a whole name is kept out (its metadata answers 403), or None."""
        if self.rules and (refused := self.rules.project(name)):
            return refused
        return self.then.project(name) if self.then else None

    def refusal(
        self, name: str, version: str | None, uploaded: float | None, now: float
    ) -> Refusal | TooNew | None:
        if self.rules and (refused := self.rules.release(name, version)):
            return refused
        if self.min_age > 0 and version is not None:
            if uploaded is None:
                if self.min_age_unknown == "hide":
                    return TooNew(None, self.min_age, None)
            elif now - uploaded < self.min_age:
                return TooNew(now - uploaded, self.min_age, uploaded + self.min_age)
        return self.then.refusal(name, version, uploaded, now) if self.then else None


def parse_time(value: object) -> float | None:
    """A publication time as the formats write it (ISO 8601, e.g. ``2024-05-01T12:00:00.123Z``,
    or Maven's ``yyyyMMddHHmmss``), as Unix seconds; None if absent or unreadable (an upstream's
    value is untrusted: a bad one is "unknown", never an error)."""
    if not isinstance(value, str) or not 8 <= len(value) <= 64:
        return None
    text = value.strip()
    try:
        if text.isdigit() and len(text) == 14:  # Maven's lastUpdated, UTC
            moment = dt.datetime.strptime(text, "%Y%m%d%H%M%S").replace(tzinfo=dt.UTC)
        else:
            moment = dt.datetime.fromisoformat(text)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=dt.UTC)
    except ValueError:
        return None
    return moment.timestamp()


POLICY_FIELDS = ("allow", "block", "min_age", "min_age_unknown")


def parse_policy(entry: Mapping[str, Any], fmt: str) -> ReleasePolicy:
    """A proxy's (or group's) ``allow``, ``block``, ``min_age`` and ``min_age_unknown``;
    ValueError names the field and what is wrong."""
    lists = {}
    for name in ("allow", "block"):
        value = entry.get(name, [])
        if not isinstance(value, list):
            raise ValueError(f"{name} must be a list of rules (got {value!r})")
        if len(value) > MAX_RULES:
            raise ValueError(f"{name}: at most {MAX_RULES} rules")
        lists[name] = value
    try:
        rules = (
            parse_rules(fmt, lists["allow"], lists["block"])
            if lists["allow"] or lists["block"]
            else Rules(fmt)
        )
    except ValueError as exc:
        raise ValueError(f"allow/block: {exc}") from None
    raw_age = entry.get("min_age", 0)
    if isinstance(raw_age, bool) or not isinstance(raw_age, str | int | float):
        raise ValueError(f"min_age must be an age such as '3d' or a number of seconds (got {raw_age!r})")
    try:
        min_age = parse_age(raw_age) if isinstance(raw_age, str) else float(raw_age)
    except ValueError as exc:
        raise ValueError(f"min_age: {exc}") from None
    if min_age < 0:
        raise ValueError(f"min_age must not be negative (got {raw_age!r})")
    unknown = entry.get("min_age_unknown", "allow")
    if unknown not in UNKNOWN_AGE_POLICIES:
        raise ValueError(
            f"min_age_unknown must be one of {', '.join(UNKNOWN_AGE_POLICIES)} (got {unknown!r})"
        )
    return ReleasePolicy(rules, min_age, unknown)


def policy_table(policy: ReleasePolicy) -> dict[str, Any]:
    """The fields of ``policy`` as a pyproject table holds them (only those that are set)."""
    table: dict[str, Any] = {}
    if policy.rules.allow:
        table["allow"] = [rule.text for rule in policy.rules.allow]
    if policy.rules.block:
        table["block"] = [rule.text for rule in policy.rules.block]
    if policy.min_age:
        table["min_age"] = policy.min_age
    if policy.min_age_unknown != "allow":
        table["min_age_unknown"] = policy.min_age_unknown
    return table
