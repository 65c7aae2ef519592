"""Add and remove ``[[tool.pytest-upstream.proxy]]`` entries in a pyproject.toml.

A pyproject.toml belongs to its owner: comments, key order, spacing and the
other tools' tables must survive an edit untouched.  So an edit here is a
*splice*: the new file is the old text with one contiguous run of lines
inserted (add) or cut out (remove), and every byte outside that run is kept.

Where the entries are written as ``[[...proxy]]`` blocks (the usual layout and
the one ``add_proxy`` creates) the splice point is found by a small line
classifier that knows just enough TOML (strings, multi-line strings, brackets)
to tell a table header from text that merely looks like one.  Where they are
written inline (``proxy = [{...}]``) tomlkit, which round-trips a document
byte for byte, edits the array and the result is checked to be a single
contiguous change.

Nothing is trusted blindly: before writing, the new text is parsed with
tomllib (the parser ``load_settings`` uses) and must equal the old data with
exactly the one entry added or removed, and the resulting table must pass
``config.parse_table``.  A layout this module cannot edit safely is refused
with a ConfigError rather than rewritten.  The write is atomic (temporary file
in the same directory, then ``os.replace``), so a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import re
import secrets
import stat
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import tomlkit
import tomlkit.exceptions
from tomlkit.items import Array

from pytest_upstream.config.settings import TABLE, ConfigError, ProxyDefinition, Settings, parse_table

__all__ = ["add_proxy", "remove_proxy"]

_PROXY_PATH = ("tool", TABLE, "proxy")
_SECTION = f"[[tool.{TABLE}.proxy]]"

# One key part of a table header: bare, "basic" or 'literal'.  Decoding is left
# to tomllib; this only has to find where the header ends.
_KEY_PART = r"""(?:[A-Za-z0-9_-]+|"(?:[^"\\\n]|\\.)*"|'[^'\n]*')"""
_HEADER = re.compile(
    rf"(?P<open>\[\[?)(?P<name>[ \t]*{_KEY_PART}(?:[ \t]*\.[ \t]*{_KEY_PART})*[ \t]*)(?P<close>\]\]?)"
    r"[ \t]*(?:#.*)?"
)

LineKind = Literal["blank", "comment", "header", "other"]


@dataclass(frozen=True)
class _Line:
    start: int
    end: int  # exclusive, includes the line's "\n"
    kind: LineKind
    path: tuple[str, ...] = ()  # for headers: the dotted table name, decoded
    is_array: bool = False  # for headers: ``[[...]]`` rather than ``[...]``


# --------------------------------------------------------------------------- public API


def add_proxy(path: Path, definition: ProxyDefinition) -> None:
    """Append a ``[[tool.pytest-upstream.proxy]]`` entry for ``definition`` to ``path``.

    Creates the file when it does not exist.  Raises ConfigError (naming the
    file and the key) for a duplicate key, for a result ``load_settings``
    would reject, or for a layout that cannot be edited without reformatting.
    """
    path = Path(path)
    old = _read(path, missing_ok=True)
    old_data = _parse(old, path)
    entries = _entries(old_data, path)
    where = f"{path}: {_SECTION} key {definition.key!r}"
    for i, entry in enumerate(entries):
        if isinstance(entry, dict) and entry.get("key") == definition.key:
            raise ConfigError(f"{where}: already defined (entry {i + 1}); remove it first")

    new_entry = definition.as_table()
    expected = copy.deepcopy(old_data)
    _proxy_list(expected, create=True).append(new_entry)
    settings = _validate(expected, path)
    _check_round_trip(settings, definition, where)

    new = _insert(old, old_data, new_entry, path, where)
    _verify(new, expected, path, where)
    _write_atomic(path, new, old)


def remove_proxy(path: Path, key: str) -> None:
    """Remove the ``[[tool.pytest-upstream.proxy]]`` entry whose key is ``key``.

    Comment lines directly above the entry's header go with it; every other
    byte of the file stays.  Raises ConfigError (naming the file and the key)
    when there is no such entry.
    """
    path = Path(path)
    where = f"{path}: {_SECTION} key {key!r}"
    old = _read(path, missing_ok=False, where=where)
    old_data = _parse(old, path)
    entries = _entries(old_data, path)
    matches = [i for i, e in enumerate(entries) if isinstance(e, dict) and e.get("key") == key]
    if not matches:
        known = [e["key"] for e in entries if isinstance(e, dict) and isinstance(e.get("key"), str)]
        listing = ", ".join(repr(k) for k in known) if known else "none are defined"
        raise ConfigError(f"{where}: no such upstream proxy (defined keys: {listing})")
    if len(matches) > 1:
        raise ConfigError(
            f"{where}: defined {len(matches)} times (entries {', '.join(str(i + 1) for i in matches)}); "
            "remove the extra entries by hand"
        )
    index = matches[0]

    expected = copy.deepcopy(old_data)
    del _proxy_list(expected, create=False)[index]
    _validate(expected, path)

    new = _delete(old, index, len(entries), path, where)
    _verify(new, expected, path, where)
    _write_atomic(path, new, old)


# --------------------------------------------------------------------------- reading and checking


def _read(path: Path, *, missing_ok: bool, where: str | None = None) -> str:
    """The file's text, newlines untouched (``read_text`` would turn CRLF into LF)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if missing_ok:
            return ""
        raise ConfigError(f"{where or path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from exc
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not valid UTF-8 (TOML files must be UTF-8): {exc}") from None


def _parse(text: str, path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


def _table(data: dict[str, Any], path: Path) -> dict[str, Any] | None:
    tool = data.get("tool")
    if tool is None:
        return None
    if not isinstance(tool, dict):
        raise ConfigError(f"{path}: 'tool' must be a table")
    table = tool.get(TABLE)
    if table is None:
        return None
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [tool.{TABLE}] must be a table")
    return table


def _entries(data: dict[str, Any], path: Path) -> list[Any]:
    table = _table(data, path)
    entries = [] if table is None else table.get("proxy", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: [tool.{TABLE}]: 'proxy' must be an array of tables ({_SECTION})")
    return entries


def _proxy_list(data: dict[str, Any], *, create: bool) -> list[Any]:
    """The proxy list inside ``data`` (already shape-checked by ``_entries``)."""
    node: Any = data
    for name in _PROXY_PATH[:-1]:
        node = node.setdefault(name, {}) if create else node[name]
    result: list[Any] = node.setdefault(_PROXY_PATH[-1], []) if create else node[_PROXY_PATH[-1]]
    return result


def _validate(data: dict[str, Any], path: Path) -> Settings:
    """Run the same validation ``load_settings`` will, so a bad result is never written."""
    table = _table(data, path) or {}
    return parse_table(table, str(path), path.parent.resolve())


def _check_round_trip(settings: Settings, definition: ProxyDefinition, where: str) -> None:
    """Refuse to write an entry that would read back as a different proxy.

    ``metadata_ttl`` and ``timeout`` are not compared: an entry without them
    inherits the table's values, which is what a new definition wants.
    """
    stored = settings.proxy(definition.key)
    lost = [
        name
        for name in ("source", "format", "url", "auth", "mutable_paths")
        if stored is None or getattr(stored, name) != getattr(definition, name)
    ]
    if lost:
        raise ConfigError(f"{where}: the entry would not read back the same ({', '.join(lost)} differ)")


def _comparable(value: Any) -> Any:
    """``value`` with NaN made equal to itself, so an unrelated ``nan`` cannot fail ``_verify``."""
    if isinstance(value, float) and math.isnan(value):
        return ("nan",)
    if isinstance(value, dict):
        return {k: _comparable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_comparable(v) for v in value]
    return value


def _prune(data: dict[str, Any]) -> dict[str, Any]:
    """Drop an empty proxy list and the tables it alone created.

    Removing the last ``[[...proxy]]`` block removes the key (and perhaps
    ``[tool.pytest-upstream]`` and ``[tool]``) from the parsed data, while the
    expected data still holds an empty list; both mean "no proxies".
    """
    data = copy.deepcopy(data)
    tool = data.get("tool")
    if isinstance(tool, dict):
        table = tool.get(TABLE)
        if isinstance(table, dict):
            if table.get("proxy") == []:
                del table["proxy"]
            if not table:
                del tool[TABLE]
        if not tool:
            del data["tool"]
    return data


def _verify(new: str, expected: dict[str, Any], path: Path, where: str) -> None:
    """The edited text must parse to exactly the expected data; else nothing is written."""
    try:
        got = tomllib.loads(new)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"{where}: cannot edit this file's layout automatically ({exc}); edit it by hand"
        ) from None
    if _comparable(_prune(got)) != _comparable(_prune(expected)):
        raise ConfigError(f"{where}: cannot edit this file's layout automatically; edit it by hand")
    _validate(got, path)


# --------------------------------------------------------------------------- locating lines


def _lines(text: str) -> list[_Line]:
    """Classify each line as blank, comment, table header or other.

    Tracks just enough state (open multi-line strings, bracket depth of
    multi-line arrays) that a ``[`` or ``#`` inside a value is not mistaken
    for a header or a comment line.
    """
    result: list[_Line] = []
    in_string: str | None = None  # the delimiter of an open multi-line string
    depth = 0
    pos = 0
    while pos < len(text):
        newline = text.find("\n", pos)
        end = len(text) if newline == -1 else newline + 1
        line = text[pos:end]
        body = line.strip(" \t\r\n")
        kind: LineKind = "other"
        header: tuple[tuple[str, ...], bool] | None = None
        if in_string is None and depth == 0:
            if not body:
                kind = "blank"
            elif body.startswith("#"):
                kind = "comment"
            elif body.startswith("[") and (header := _header(body)) is not None:
                kind = "header"
        if header is not None:
            result.append(_Line(pos, end, kind, header[0], header[1]))
        else:
            result.append(_Line(pos, end, kind))
            in_string, depth = _scan(line, in_string, depth)
        pos = end
    return result


def _header(body: str) -> tuple[tuple[str, ...], bool] | None:
    """The decoded name of a ``[table]`` / ``[[array]]`` header line, or None."""
    m = _HEADER.fullmatch(body)
    if m is None or len(m["open"]) != len(m["close"]):
        return None
    try:
        node: Any = tomllib.loads(m["open"] + m["name"] + m["close"])
    except tomllib.TOMLDecodeError:
        return None
    names: list[str] = []
    while isinstance(node, dict) and len(node) == 1:
        name, node = next(iter(node.items()))
        names.append(name)
        if isinstance(node, list):
            return tuple(names), True
    return tuple(names), False


def _scan(line: str, in_string: str | None, depth: int) -> tuple[str | None, int]:
    """Advance the string/bracket state over one line of TOML."""
    i = 0
    n = len(line)
    while i < n:
        if in_string is not None:
            j = i
            closed = False
            while j < n:
                if in_string == '"""' and line[j] == "\\":
                    j += 2
                elif line.startswith(in_string, j):
                    j += 3
                    # Up to two more quotes may stand before the delimiter ('""""' ends with a quote).
                    extra = 0
                    while extra < 2 and j < n and line[j] == in_string[0]:
                        j += 1
                        extra += 1
                    closed = True
                    break
                else:
                    j += 1
            if not closed:
                return in_string, depth
            in_string = None
            i = j
            continue
        c = line[i]
        if c == "#":
            break
        if line.startswith('"""', i) or line.startswith("'''", i):
            in_string = line[i : i + 3]
            i += 3
        elif c == '"':
            i += 1
            while i < n and line[i] != '"':
                i += 2 if line[i] == "\\" else 1
            i += 1
        elif c == "'":
            close = line.find("'", i + 1)
            i = n if close == -1 else close + 1
        else:
            if c in "[{":
                depth += 1
            elif c in "]}":
                depth = max(depth - 1, 0)
            i += 1
    return in_string, depth


def _proxy_headers(lines: list[_Line]) -> list[int]:
    return [
        i
        for i, line in enumerate(lines)
        if line.kind == "header" and line.is_array and line.path == _PROXY_PATH
    ]


def _next_header(lines: list[_Line], after: int) -> int:
    for i in range(after + 1, len(lines)):
        if lines[i].kind == "header":
            return i
    return len(lines)


def _skip_back(lines: list[_Line], index: int, floor: int, kind: LineKind) -> int:
    """Move ``index`` up over lines of ``kind``, never to or above ``floor``."""
    while index - 1 > floor and lines[index - 1].kind == kind:
        index -= 1
    return index


def _newline(text: str) -> str:
    """The file's own line ending, so an added entry does not mix CRLF and LF."""
    return "\r\n" if "\r\n" in text else "\n"


def _ends_with_blank_line(text: str) -> bool:
    lines = text.replace("\r\n", "\n").split("\n")
    # text ends with "\n", so lines[-1] == "" and lines[-2] is the last line.
    return len(lines) >= 2 and not lines[-2].strip(" \t")


# --------------------------------------------------------------------------- the edits


def _insert(old: str, old_data: dict[str, Any], entry: dict[str, Any], path: Path, where: str) -> str:
    lines = _lines(old)
    headers = _proxy_headers(lines)
    table = _table(old_data, path)
    if table is not None and "proxy" in table and not headers:
        # Entries written inline (``proxy = [{...}]``): append to that array.
        return _tomlkit_edit(old, lambda array: array.append(_inline(entry)), where, inserting=True)

    anchor: int | None = headers[-1] if headers else None
    if anchor is None:
        tables = [
            i
            for i, line in enumerate(lines)
            if line.kind == "header" and not line.is_array and line.path == _PROXY_PATH[:-1]
        ]
        anchor = tables[-1] if tables else None
    if anchor is None:
        pos = len(old)
    else:
        # End of the anchor's section, less the blank lines and the comment
        # lines that sit directly above (and describe) the next header.
        nxt = _next_header(lines, anchor)
        cut = _skip_back(lines, nxt, anchor, "comment") if nxt < len(lines) else nxt
        cut = _skip_back(lines, cut, anchor, "blank")
        pos = lines[cut].start if cut < len(lines) else len(old)

    nl = _newline(old)
    block = tomlkit.dumps({"tool": {TABLE: {"proxy": [entry]}}}).replace("\n", nl)
    before, after = old[:pos], old[pos:]
    lead = ""
    if before and not before.endswith("\n"):
        lead += nl
    if before.strip() and not _ends_with_blank_line(before + lead):
        lead += nl
    trail = nl if after.strip() and not after.startswith(("\n", "\r\n")) else ""
    return before + lead + block + trail + after


def _delete(old: str, index: int, count: int, path: Path, where: str) -> str:
    lines = _lines(old)
    headers = _proxy_headers(lines)
    if not headers:
        return _tomlkit_edit(old, lambda array: array.pop(index), where, inserting=False)
    if len(headers) != count:
        raise ConfigError(f"{where}: cannot locate the entry's {_SECTION} block; edit the file by hand")

    h = headers[index]
    # The entry is its header, the comment lines directly above it, and its
    # section up to the last key line; trailing comments are left alone.
    start = h
    while start > 0 and lines[start - 1].kind == "comment":
        start -= 1
    nxt = _next_header(lines, h)
    end = h + 1
    for i in range(h + 1, nxt):
        if lines[i].kind == "other":
            end = i + 1
    # Keep a single blank line where the entry was, and none at the end of the file.
    after_blank = end
    while after_blank < len(lines) and lines[after_blank].kind == "blank":
        after_blank += 1
    if after_blank == len(lines):
        end = after_blank
        while start > 0 and lines[start - 1].kind == "blank":
            start -= 1
    elif start == 0 or lines[start - 1].kind == "blank":
        end = after_blank
    return old[: lines[start].start] + old[lines[end - 1].end :]


def _inline(entry: dict[str, Any]) -> Any:
    table = tomlkit.inline_table()
    table.update(entry)
    return table


def _tomlkit_edit(old: str, edit: Callable[[Array], object], where: str, *, inserting: bool) -> str:
    """Edit an inline ``proxy = [...]`` array with tomlkit; accept only a contiguous change."""
    try:
        doc = tomlkit.parse(old)
        array = doc["tool"][TABLE]["proxy"]
    except (tomlkit.exceptions.TOMLKitError, KeyError, TypeError):
        raise ConfigError(f"{where}: cannot edit this file's layout automatically; edit it by hand") from None
    if not isinstance(array, Array):
        raise ConfigError(f"{where}: cannot edit this file's layout automatically; edit it by hand")
    edit(array)
    new = doc.as_string()
    longer, shorter = (new, old) if inserting else (old, new)
    if len(longer) <= len(shorter) or not _is_one_splice(longer, shorter):
        raise ConfigError(f"{where}: the edit would reformat other parts of the file; edit it by hand")
    return new


def _is_one_splice(longer: str, shorter: str) -> bool:
    """True when ``longer`` is ``shorter`` with one contiguous run of characters added."""
    prefix = 0
    limit = len(shorter)
    while prefix < limit and longer[prefix] == shorter[prefix]:
        prefix += 1
    suffix = 0
    while suffix < limit - prefix and longer[-1 - suffix] == shorter[-1 - suffix]:
        suffix += 1
    return prefix + suffix == len(shorter)


# --------------------------------------------------------------------------- writing


def _write_atomic(path: Path, text: str, expected_old: str) -> None:
    """Replace ``path`` with ``text`` so a reader sees the old file or the new one, never a mix.

    The temporary file lives in the target's directory (``os.replace`` is only
    atomic within a file system), keeps the old file's permission bits, and a
    symlinked pyproject.toml stays a symlink (its target is replaced).  If the
    file changed since it was read, the write is refused rather than losing
    someone else's edit.
    """
    target = Path(os.path.realpath(path))
    data = text.encode("utf-8")
    try:
        mode: int | None = stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        mode = None  # new file: 0o666 less the umask, as os.open applies it
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o666)
            break
        except FileExistsError:
            continue
        except OSError as exc:
            raise ConfigError(f"{path}: cannot write: {exc}") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        current = _read(target, missing_ok=True)
        if current != expected_old:
            raise ConfigError(f"{path}: changed while it was being edited; nothing written, try again")
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise ConfigError(f"{path}: cannot write: {exc}") from exc
        raise
    _fsync_dir(target.parent)


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable where the platform allows it (not on Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
