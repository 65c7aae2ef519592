"""Maven version order and version ranges, for rules such as ``org.example:lib:[1.0,2.0)``.

Maven orders versions with its own algorithm (``ComparableVersion``, described in the Maven POM
reference under "Version Order Specification"), not by semver or PEP 440: ``1.0-alpha-1`` <
``1.0-beta`` < ``1.0-rc1`` < ``1.0-SNAPSHOT`` < ``1.0`` = ``1.0.0`` = ``1.0-ga`` < ``1.0-sp1``
< ``1.0-foo`` < ``1.0.1``.  A rule must order versions as Maven does, or a range would hide the
wrong releases from maven-metadata.xml; so this module implements that specification:

- the version is lower-cased and cut into items at ``.``, at ``-`` and where digits meet
  letters; ``-`` and a digit/letter switch open a sub-list;
- numbers compare as numbers; qualifiers in the order alpha < beta < milestone < rc (= cr) <
  snapshot < "" (= ga = final = release) < sp < any other (alphabetically); ``a1``/``b1``/``m1``
  mean alpha-1, beta-1, milestone-1; a number is newer than a qualifier;
- trailing "null" items (0, "", ga, ...) are dropped, so ``1.0.0`` equals ``1``.

A range is Maven's range syntax: ``[1.0,2.0)``, ``(,1.0]``, ``[1.5,)``, ``[1.0]`` (exactly),
several joined by commas (``(,1.0],[1.2,)``: either); a bare version in a rule means exactly
that version (in a POM it would be a soft preference, which a rule has no use for).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

_QUALIFIERS = ("alpha", "beta", "milestone", "rc", "snapshot", "", "sp")
_ALIASES = {"ga": "", "final": "", "release": "", "cr": "rc"}
_RELEASE = str(_QUALIFIERS.index(""))
_SHORT = {"a": "alpha", "b": "beta", "m": "milestone"}

# An item is an int (a number), a str (a qualifier's sort key) or a list of items (a sub-list).
_Item = int | str | list["_Item"]


def _qualifier(text: str, followed_by_digit: bool) -> str:
    if followed_by_digit and text in _SHORT:
        text = _SHORT[text]
    text = _ALIASES.get(text, text)
    return str(_QUALIFIERS.index(text)) if text in _QUALIFIERS else f"{len(_QUALIFIERS)}-{text}"


def _parse(version: str) -> list[_Item]:
    root: list[_Item] = []
    current = root
    stack = [root]
    start = 0
    digit = False
    text = version.lower()

    def open_list() -> None:
        nonlocal current
        sub: list[_Item] = []
        current.append(sub)
        current = sub
        stack.append(sub)

    def add_piece(end: int, last: bool = False) -> None:
        chunk = text[start:end]
        if not chunk:
            current.append(0)
        elif digit:
            current.append(int(chunk))
        else:
            if last and current:  # a last ".X" is read as "-X": 1.0.x < 1.0-y needs x < y
                open_list()
            current.append(_qualifier(chunk, False))

    for i, char in enumerate(text):
        if char == ".":
            add_piece(i)
            start = i + 1
        elif char == "-":
            add_piece(i)
            start = i + 1
            open_list()
        elif char.isdigit() and char.isascii():
            if not digit and i > start:  # "rc1": the qualifier, then a sub-list for the number
                if current:  # "1.0.x1" is read as "1.0-x-1"
                    open_list()
                current.append(_qualifier(text[start:i], True))
                start = i
                open_list()
            digit = True
        else:
            if digit and i > start:  # "1rc": the number, then a sub-list for the qualifier
                current.append(int(text[start:i]))
                start = i
                open_list()
            digit = False
    if len(text) > start:
        add_piece(len(text), last=True)
    for items in reversed(stack):  # innermost first, as Maven normalises
        _normalise(items)
    return root


def _is_null(item: _Item) -> bool:
    return item == 0 or item == _RELEASE or item == []


def _normalise(items: list[_Item]) -> None:
    for i in range(len(items) - 1, -1, -1):
        if _is_null(items[i]):
            del items[i]
        elif not isinstance(items[i], list):
            break


def _compare(left: _Item | None, right: _Item | None) -> int:
    """-1, 0 or 1; None is the padding Maven compares a shorter list with."""
    if left is None:
        return 0 if right is None else -_compare(right, None)
    if isinstance(left, int):
        if right is None:
            return 0 if left == 0 else 1
        if isinstance(right, int):
            return (left > right) - (left < right)
        return 1  # a number is newer than a qualifier or a sub-list
    if isinstance(left, str):
        if right is None:
            return (left > _RELEASE) - (left < _RELEASE)
        if isinstance(right, str):
            return (left > right) - (left < right)
        return -1  # older than a number and than a sub-list
    # a list
    if right is None:
        for item in left:
            if result := _compare(item, None):
                return result
        return 0
    if isinstance(right, int):
        return -1
    if isinstance(right, str):
        return 1
    for i in range(max(len(left), len(right))):
        result = _compare(left[i] if i < len(left) else None, right[i] if i < len(right) else None)
        if result:
            return result
    return 0


def compare_versions(a: str, b: str) -> int:
    """-1, 0 or 1 as Maven orders ``a`` and ``b``."""
    return _compare(_parse(a), _parse(b))


version_key = functools.cmp_to_key(compare_versions)


@dataclass(frozen=True)
class _Interval:
    low: str | None
    low_inclusive: bool
    high: str | None
    high_inclusive: bool

    def __contains__(self, version: str) -> bool:
        if self.low is not None:
            c = compare_versions(version, self.low)
            if c < 0 or (c == 0 and not self.low_inclusive):
                return False
        if self.high is not None:
            c = compare_versions(version, self.high)
            if c > 0 or (c == 0 and not self.high_inclusive):
                return False
        return True


@dataclass(frozen=True)
class MavenRange:
    """A Maven version range (see the module docstring); ``version in range``."""

    text: str
    intervals: tuple[_Interval, ...]

    def __contains__(self, version: str) -> bool:
        return any(version in interval for interval in self.intervals)


def _check_version(text: str, spec: str) -> str:
    if not text or any(c in text for c in "[](),") or not text.isprintable() or " " in text:
        raise ValueError(f"{spec!r}: {text!r} is not a Maven version")
    return text


def parse_range(spec: str) -> MavenRange:
    """A range or a bare version (exactly it); ValueError says what is wrong."""
    text = spec.strip()
    if not text:
        raise ValueError("an empty Maven version range")
    if text[0] not in "[(":
        version = _check_version(text, spec)
        return MavenRange(spec, (_Interval(version, True, version, True),))
    intervals = []
    rest = text
    while rest:
        close = min((i for i in (rest.find("]"), rest.find(")")) if i >= 0), default=-1)
        if rest[0] not in "[(" or close < 0:
            raise ValueError(f"{spec!r}: a range is [low,high], (low,high), [v] or several joined by ','")
        body = rest[1:close]
        low_inclusive, high_inclusive = rest[0] == "[", rest[close] == "]"
        if "," not in body:
            if not (low_inclusive and high_inclusive):
                raise ValueError(f"{spec!r}: a single version must be written [v]")
            version = _check_version(body.strip(), spec)
            intervals.append(_Interval(version, True, version, True))
        else:
            low_text, _, high_text = body.partition(",")
            if "," in high_text:
                raise ValueError(f"{spec!r}: an interval has one low and one high bound")
            low = _check_version(low_text.strip(), spec) if low_text.strip() else None
            high = _check_version(high_text.strip(), spec) if high_text.strip() else None
            if low is not None and high is not None and compare_versions(low, high) > 0:
                raise ValueError(f"{spec!r}: the low bound {low} is newer than the high bound {high}")
            intervals.append(_Interval(low, low_inclusive, high, high_inclusive))
        rest = rest[close + 1 :].strip()
        if rest:
            if rest[0] != ",":
                raise ValueError(f"{spec!r}: ranges are joined by ','")
            rest = rest[1:].strip()
            if not rest:
                raise ValueError(f"{spec!r}: a ',' with no range after it")
    return MavenRange(spec, tuple(intervals))
