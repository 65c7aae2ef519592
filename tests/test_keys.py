"""The upstream proxy key grammar, checked against an independent statement of it.

The oracle below is written from the grammar in ``keys.py``'s docstring
(split into words and separators) rather than from ``KEY_PATTERN``, so a
mistake in the regex cannot hide behind itself.
"""

from __future__ import annotations

import re
import string

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from pytest_upstream.config.keys import (
    KEY_PATTERN,
    MAX_KEY_LENGTH,
    OCI_PATH_COMPONENT,
    RESERVED_KEYS,
    InvalidKeyError,
    key_error,
    validate_key,
)

_ALNUM = frozenset(string.ascii_lowercase + string.digits)

# The OCI distribution spec's repository-name grammar (path components joined by "/").
OCI_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
OCI_REPOSITORY_NAME = re.compile(rf"{OCI_COMPONENT}(?:/{OCI_COMPONENT})*")
OCI_MAX_NAME = 255


def oracle(s: str) -> bool:
    """key := letter alnum* (separator alnum+)*, separator := '.' | '_' | '__' | '-'+."""
    if not s or len(s) > MAX_KEY_LENGTH or s in RESERVED_KEYS:
        return False
    if not ("a" <= s[0] <= "z"):
        return False
    parts = re.split(r"([._-]+)", s)
    words, separators = parts[0::2], parts[1::2]
    if any(not word or not set(word) <= _ALNUM for word in words):
        return False  # empty word: leading/trailing separator; else a foreign character
    return all(sep in (".", "_", "__") or set(sep) == {"-"} for sep in separators)


def test_documented_limits() -> None:
    # The README and the OCI maths both rely on these values.
    assert MAX_KEY_LENGTH == 63
    assert "v2" in RESERVED_KEYS


valid_keys = st.from_regex(KEY_PATTERN, fullmatch=True).filter(
    lambda s: len(s) <= MAX_KEY_LENGTH and s not in RESERVED_KEYS
)


@given(valid_keys)
def test_generated_keys_are_accepted(key: str) -> None:
    assert key_error(key) is None
    assert validate_key(key) == key
    assert oracle(key)


@given(
    st.one_of(
        st.text(alphabet="abcz09._-A/ %\x00", max_size=80),
        st.text(alphabet="ab0._-", min_size=55, max_size=70),  # near the length limit
        st.text(max_size=20),
        valid_keys.flatmap(lambda k: st.sampled_from([k + "_", k + ".", "_" + k, k + "A", k.upper(), k * 2])),
    )
)
@example("v2")
@example("a" * MAX_KEY_LENGTH)
@example("a" * (MAX_KEY_LENGTH + 1))
@example("a._b")
@example("a-_b")
@example("a_-b")
@example("a---b")
@example("é")
@example("aé")
@example("a\u0660")  # an Arabic-Indic digit: str.isdigit() is true, the grammar says no
def test_accepts_exactly_the_grammar(s: str) -> None:
    assert (key_error(s) is None) == oracle(s), (s, key_error(s))
    if oracle(s):
        assert validate_key(s) == s
    else:
        with pytest.raises(InvalidKeyError):
            validate_key(s)


@given(valid_keys)
def test_every_key_is_an_oci_path_component(key: str) -> None:
    assert OCI_PATH_COMPONENT.fullmatch(key)
    assert re.fullmatch(OCI_COMPONENT, key)
    repository = f"{key}/library/alpine"
    assert OCI_REPOSITORY_NAME.fullmatch(repository)
    assert len(repository) <= OCI_MAX_NAME


@pytest.mark.parametrize("value", [None, 5, b"abc", ["a"]])
def test_non_strings_are_rejected(value: object) -> None:
    assert key_error(value) == "a key must be a string"
    with pytest.raises(InvalidKeyError):
        validate_key(value)


BAD_KEYS = [
    ("", "must not be empty"),
    ("1abc", "must start with a lowercase letter"),
    ("Abc", "must start with a lowercase letter"),
    ("a..b", "separators must stand between letters or digits"),
    ("a_", "must not end with"),
    ("a/b", "may only contain lowercase letters, digits"),
    ("a b", "may only contain lowercase letters, digits"),
    ("a___b", "separators must stand between letters or digits"),
    ("v2", "reserved"),
    ("a" * (MAX_KEY_LENGTH + 1), f"at most {MAX_KEY_LENGTH} characters"),
]


@pytest.mark.parametrize(("key", "rule"), BAD_KEYS, ids=[repr(k[:12]) for k, _ in BAD_KEYS])
def test_bad_keys_name_key_and_rule(key: str, rule: str) -> None:
    error = key_error(key)
    assert error is not None and rule in error
    with pytest.raises(InvalidKeyError) as info:
        validate_key(key)
    message = str(info.value)
    assert repr(key) in message
    assert rule in message
    assert info.value.key == key
    assert info.value.rule == error


def test_foreign_characters_are_named() -> None:
    error = key_error("a/b c")
    assert error is not None
    assert "'/'" in error and "' '" in error


@pytest.mark.parametrize("key", ["dockerhub", "maven-central", "a.b_c-d", "a__b", "a--b", "a", "z9", "v3"])
def test_good_keys(key: str) -> None:
    assert key_error(key) is None
    assert validate_key(key) == key
    assert oracle(key)
