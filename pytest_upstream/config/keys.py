"""The upstream proxy key grammar.

A key names an upstream proxy.  It becomes the first path segment of every
proxied URL (``/<key>/...``) and the first component of OCI repository names
(``/v2/<key>/<image>/...``), so it must be valid as both.  The grammar is the
seed's rule (start with a lowercase letter; lowercase alphanumerics, ``_``,
``.`` and ``-`` only) narrowed to what the OCI distribution spec accepts for a
path component:

    key        := letter alnum* ( separator alnum+ )*
    letter     := [a-z]
    alnum      := [a-z0-9]
    separator  := "." | "_" | "__" | "-"+

so a key never ends with a separator and never holds ``..``, ``._``, ``___``
and the like.  It is at most ``MAX_KEY_LENGTH`` characters, which leaves
room for an image name inside OCI's 255-character repository-name limit, and
it is not one of ``RESERVED_KEYS`` (paths the proxy itself answers).
"""

from __future__ import annotations

import re

MAX_KEY_LENGTH = 63
RESERVED_KEYS = frozenset({"v2"})

KEY_PATTERN = re.compile(r"[a-z][a-z0-9]*(?:(?:[._]|__|-+)[a-z0-9]+)*")
# The OCI distribution spec's path-component grammar, used by the tests to
# show every accepted key is also a valid repository-name component.
OCI_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*")

_ALLOWED_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_.-")


class InvalidKeyError(ValueError):
    """A key broke one rule of the grammar; the message quotes key and rule."""

    def __init__(self, key: object, rule: str) -> None:
        self.key = key
        self.rule = rule
        super().__init__(f"invalid upstream proxy key {key!r}: {rule}")


def key_error(key: object) -> str | None:
    """Return the first rule that ``key`` breaks, or None when it is valid."""
    if not isinstance(key, str):
        return "a key must be a string"
    if not key:
        return "a key must not be empty"
    if len(key) > MAX_KEY_LENGTH:
        return f"a key is at most {MAX_KEY_LENGTH} characters (this one has {len(key)})"
    if not ("a" <= key[0] <= "z"):
        return "a key must start with a lowercase letter (a-z)"
    bad = sorted({c for c in key if c not in _ALLOWED_CHARS})
    if bad:
        shown = ", ".join(repr(c) for c in bad)
        return f"a key may only contain lowercase letters, digits, '_', '.' and '-' (found {shown})"
    if key[-1] in "._-":
        return "a key must not end with '.', '_' or '-'"
    if not KEY_PATTERN.fullmatch(key):
        return (
            "separators must stand between letters or digits: one '.', one '_', "
            "'__' or a run of '-' (no '..', '._', '___' and the like)"
        )
    if key in RESERVED_KEYS:
        return f"{key!r} is reserved for the proxy's own URLs"
    return None


def validate_key(key: object) -> str:
    """Return ``key`` if it is valid, else raise InvalidKeyError."""
    rule = key_error(key)
    if rule is not None:
        raise InvalidKeyError(key, rule)
    assert isinstance(key, str)
    return key
