"""``[[tool.pytest-upstream.group]]`` (config/groups.py): members of one format, no nesting."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from pytest_upstream.config.settings import ConfigError, parse_table


def table(*groups: dict[str, Any]) -> dict[str, Any]:
    return {
        "proxy": [
            {"key": "internal", "format": "pypi", "url": "http://127.0.0.1:9/simple/"},
            {"key": "public", "format": "pypi", "url": "http://127.0.0.1:8/simple/"},
            {"key": "npmjs", "format": "npm", "url": "http://127.0.0.1:7/"},
        ],
        "group": list(groups),
    }


def test_a_group_parses_and_round_trips() -> None:
    settings = parse_table(
        table({"key": "py", "members": ["internal", "public"], "block": ["evil-*"], "strategy": "merge"}),
        "t",
        Path("."),
    )
    group = settings.group("py")
    assert group is not None and group.format == "pypi" and group.members == ("internal", "public")
    assert group.strategy == "merge" and group.policy.rules.block[0].text == "evil-*"
    assert group.as_table() == {
        "key": "py",
        "members": ["internal", "public"],
        "strategy": "merge",
        "block": ["evil-*"],
    }
    assert settings.group("internal") is None and parse_table(table(), "t", Path(".")).groups == ()


@pytest.mark.parametrize(
    ("group", "says"),
    [
        ({"key": "Py", "members": ["internal"]}, "invalid group key 'Py'"),
        ({"members": ["internal"]}, "invalid group key None: missing"),
        ({"key": "internal", "members": ["public"]}, "'internal' is already a proxy's key"),
        ({"key": "py", "members": []}, "members must be a non-empty list"),
        ({"key": "py", "members": "internal"}, "members must be a non-empty list"),
        ({"key": "py", "members": ["internal", "nope"]}, "member 'nope' is not a proxy's key"),
        ({"key": "py", "members": ["py"]}, "a group cannot be its own member"),
        ({"key": "py", "members": ["internal", "internal"]}, "listed twice"),
        (
            {"key": "py", "members": ["internal", "npmjs"]},
            "members must be of one format, not internal (pypi), npmjs (npm)",
        ),
        ({"key": "py", "members": ["internal"], "strategy": "all"}, "strategy must be one of first, merge"),
        ({"key": "py", "members": ["internal"], "colour": "red"}, "unknown field(s) colour"),
        ({"key": "py", "members": ["internal"], "block": ["x<<1"]}, "allow/block: rule 'x<<1'"),
    ],
)
def test_bad_groups_are_refused_with_the_reason(group: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(says)):
        parse_table(table(group), "t", Path("."))


def test_no_nesting_and_merge_only_for_pypi() -> None:
    with pytest.raises(ConfigError, match="a group cannot be a member of another group"):
        parse_table(
            table({"key": "a", "members": ["internal"]}, {"key": "b", "members": ["a"]}), "t", Path(".")
        )
    with pytest.raises(ConfigError, match="strategy applies to pypi groups only"):
        parse_table(table({"key": "js", "members": ["npmjs"], "strategy": "merge"}), "t", Path("."))
    with pytest.raises(ConfigError, match="duplicate group key 'a'"):
        parse_table(
            table({"key": "a", "members": ["internal"]}, {"key": "a", "members": ["public"]}), "t", Path(".")
        )


def test_every_toml_example_in_docs_rules_md_is_valid_configuration() -> None:
    import tomllib

    text = (Path(__file__).resolve().parent.parent / "docs" / "rules.md").read_text()
    blocks = re.findall(r"^```toml\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    assert len(blocks) >= 4
    proxies = [
        {"key": "npm-internal", "format": "npm", "url": "http://127.0.0.1:9/"},
        {"key": "npm", "source": "npm"},
    ]
    for block in blocks:
        table = tomllib.loads(block)["tool"]["pytest-upstream"]
        if "group" in table and "proxy" not in table:
            table["proxy"] = proxies
        parse_table(table, "docs/rules.md", Path("."))
