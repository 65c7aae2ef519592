"""Add and remove ``[[tool.pytest-upstream.proxy]]`` entries in a pyproject.toml.

A pyproject.toml belongs to its owner: comments, key order, spacing and the
other tools' tables must survive an edit untouched.  So an edit here is a
*splice*: the new file is the old text with one contiguous run inserted (add)
or cut out (remove), and every byte outside that run is kept.

Where that run lies is read from tomlkit's document model, which round-trips a
file byte for byte: a marker put into a fresh parse (before an entry's header,
after its last key) shows, in tomlkit's rendering, the offset of that point in
the file, and the comments and blank lines after an entry's last key are the
trailing ``Comment``/``Whitespace`` items of its table.  Comment lines directly
above a header describe it and go with it; trailing comments stay.  Entries
written inline (``proxy = [{...}]``) are edited as a tomlkit array.

Nothing is trusted blindly: the marked rendering must equal the file with the
marker taken out, the result must be one splice of the old text, it must parse
with tomllib (the parser ``load_settings`` uses) to exactly the old data with
the one entry added or removed, and the table must pass ``config.parse_table``.
A layout this module cannot edit safely is refused with a ConfigError rather
than rewritten.  The file is replaced with ``store.files.atomic_write``, only if
nobody changed it meanwhile, keeping its permission bits (and a symlink).
"""

from __future__ import annotations

import copy
import math
import os
import stat
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomlkit
import tomlkit.exceptions
from tomlkit.items import AoT, Array, Comment, Table, Whitespace

from pytest_upstream.config.settings import TABLE, ConfigError, ProxyDefinition, Settings, parse_table
from pytest_upstream.store.files import atomic_write

__all__ = ["add_proxy", "remove_proxy"]

_PROXY_PATH = ("tool", TABLE, "proxy")
_SECTION = f"[[tool.{TABLE}.proxy]]"
_MARK = "\x00"  # cannot occur in a TOML file (control characters are not allowed anywhere)
_TRIVIA = (Whitespace, Comment)


class _Unsupported(Exception):
    """The layout is not one this module can edit as a single splice."""


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
    _check_round_trip(_validate(expected, path), definition, where)

    new = _edited(old, where, lambda doc: _insert(old, doc, new_entry))
    _verify(old, new, expected, path, where)
    _write(path, new, old)


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

    new = _edited(old, where, lambda doc: _delete(old, doc, index))
    _verify(old, new, expected, path, where)
    _write(path, new, old)


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


def _verify(old: str, new: str, expected: dict[str, Any], path: Path, where: str) -> None:
    """The edit must be one splice and parse to exactly the expected data; else nothing is written."""
    longer, shorter = (new, old) if len(new) > len(old) else (old, new)
    if len(longer) == len(shorter) or not _is_one_splice(longer, shorter):
        raise ConfigError(f"{where}: the edit would reformat other parts of the file; edit it by hand")
    try:
        got = tomllib.loads(new)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"{where}: cannot edit this file's layout automatically ({exc}); edit it by hand"
        ) from None
    if _comparable(_prune(got)) != _comparable(_prune(expected)):
        raise ConfigError(f"{where}: cannot edit this file's layout automatically; edit it by hand")
    _validate(got, path)


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


# --------------------------------------------------------------------------- the document model


def _edited(old: str, where: str, edit: Callable[[tomlkit.TOMLDocument], str]) -> str:
    """Run ``edit`` on a tomlkit parse of ``old``; a layout it cannot handle is refused."""
    try:
        return edit(tomlkit.parse(old))
    except (_Unsupported, tomlkit.exceptions.TOMLKitError, KeyError, TypeError, ValueError):
        raise ConfigError(f"{where}: cannot edit this file's layout automatically; edit it by hand") from None


def _node(doc: tomlkit.TOMLDocument, *names: str | int) -> Any:
    """``doc[names[0]][names[1]]...`` (an int indexes an array of tables), or None if missing."""
    node: Any = doc
    for name in names:
        if isinstance(name, int):
            node = node[name] if isinstance(node, AoT) and name < len(node) else None
        elif isinstance(node, dict) and name in node:
            node = node[name]
        else:
            return None
    return node


def _marked(old: str, names: tuple[str | int, ...], mark: Callable[[Any], str | None]) -> int | None:
    """The offset in ``old`` of a marker that ``mark`` puts into the node at ``names``.

    The node is looked up in a fresh parse, ``mark`` adds a text starting with ``_MARK`` to
    it (and returns that text), and the document is rendered: everything before the marker
    renders unchanged, so where it appears is an offset in ``old``.  None when ``mark``
    declines or the marker does not render; ``_Unsupported`` when anything else moved.
    """
    doc = tomlkit.parse(old)
    marker = mark(_node(doc, *names))
    if marker is None:
        return None
    text = doc.as_string()
    at = text.find(_MARK)
    if at < 0:
        return None
    if text.count(_MARK) != 1 or text[:at] + text[at + len(marker) :] != old:
        raise _Unsupported
    return at


def _header_start(old: str, names: tuple[str | int, ...]) -> int | None:
    """Where the header line of the table at ``names`` starts (None: it has no header)."""

    def mark(table: Any) -> str | None:
        if not isinstance(table, Table):
            return None
        table.trivia.indent = _MARK + table.trivia.indent
        return _MARK

    at = _marked(old, names, mark)
    return at if at is not None and old[at:].lstrip(" \t").startswith("[") else None


def _header_text(old: str, names: tuple[str | int, ...], table: Table) -> str:
    """The ``[[...]]`` of a header as written in the file: its line less indent and comment."""
    start = _header_start(old, names)
    if start is None:
        raise _Unsupported
    line = _line_at(old, start)
    tail = table.trivia.comment_ws + table.trivia.comment + table.trivia.trail
    if not line.endswith(tail):
        raise _Unsupported
    return line.removesuffix(tail).strip(" \t")


def _body_end(old: str, names: tuple[str | int, ...]) -> tuple[int, list[str]]:
    """The end of the last key line of the table at ``names``, and the trivia lines after it.

    The trivia are the table's trailing ``Whitespace``/``Comment`` items: the blank and
    comment lines up to the next header (tomlkit keeps them with the table above).
    """
    trivia: list[str] = []

    def mark(table: Any) -> str | None:
        body = table.value.body
        cut = len(body)
        while cut and body[cut - 1][0] is None and isinstance(body[cut - 1][1], _TRIVIA):
            cut -= 1
        trivia.extend(item.as_string() for _, item in body[cut:])
        # A line of its own: tomlkit adds a newline before the next header after a body
        # that does not end in one, and would move the text after the marker.
        body.insert(cut, (None, Whitespace(_MARK + "\n")))
        return _MARK + "\n"

    at = _marked(old, names, mark)
    if at is None:
        raise _Unsupported
    return at, trivia


def _entry_names(index: int) -> tuple[str | int, ...]:
    """The path ``_node`` follows to entry ``index`` of the proxy array of tables."""
    return (*_PROXY_PATH, index)


# --------------------------------------------------------------------------- the edits


def _insert(old: str, doc: tomlkit.TOMLDocument, entry: dict[str, Any]) -> str:
    proxies = _node(doc, *_PROXY_PATH)
    if isinstance(proxies, Array):  # entries written inline: append to that array
        inline = tomlkit.inline_table()
        inline.update(entry)
        proxies.append(inline)
        return doc.as_string()  # _verify checks that this is one splice
    nl = "\r\n" if "\r\n" in old else "\n"  # the file's own line ending
    header, *lines = tomlkit.dumps({"tool": {TABLE: {"proxy": [entry]}}}).splitlines(keepends=True)
    if isinstance(proxies, AoT) and len(proxies):
        names = _entry_names(len(proxies) - 1)
        header = _header_text(old, names, proxies[-1]) + "\n"  # as the file spells it, so
        pos, trivia = _body_end(old, names)  # tomlkit reads the entries as one array again
    elif _header_start(old, _PROXY_PATH[:-1]) is not None:
        pos, trivia = _body_end(old, _PROXY_PATH[:-1])
    else:
        pos, trivia = len(old), []
    # After the anchor's last key, less the comment lines that sit directly above (and
    # describe) the next header and the blank lines before them.
    keep = list(trivia)
    if pos + sum(map(len, trivia)) < len(old):
        while keep and keep[-1].lstrip(" \t").startswith("#"):
            keep.pop()
    while keep and not keep[-1].strip(" \t\r\n"):
        keep.pop()
    pos += sum(map(len, keep))

    block = "".join([header, *lines]).replace("\n", nl)
    before, after = old[:pos], old[pos:]
    lead = "" if not before or before.endswith("\n") else nl
    if before.strip() and not _ends_with_blank_line(before + lead):
        lead += nl
    trail = nl if after.strip() and not after.startswith(("\n", "\r\n")) else ""
    return before + lead + block + trail + after


def _delete(old: str, doc: tomlkit.TOMLDocument, index: int) -> str:
    proxies = _node(doc, *_PROXY_PATH)
    if isinstance(proxies, Array):  # entries written inline: drop one from that array
        proxies.pop(index)
        return doc.as_string()
    if not isinstance(proxies, AoT):
        raise _Unsupported
    names = _entry_names(index)
    start = _header_start(old, names)
    if start is None:
        raise _Unsupported
    end, _ = _body_end(old, names)
    # The comment lines directly above the header describe the entry and go with it.
    while start and (line := _line_before(old, start)).lstrip(" \t").startswith("#"):
        start -= len(line)
    # Keep a single blank line where the entry was, and none at the end of the file.
    after_blank = end
    while after_blank < len(old) and not (line := _line_at(old, after_blank)).strip(" \t\r\n"):
        after_blank += len(line)
    if after_blank == len(old):
        end = after_blank
        while start and not (line := _line_before(old, start)).strip(" \t\r\n"):
            start -= len(line)
    elif start == 0 or not _line_before(old, start).strip(" \t\r\n"):
        end = after_blank
    return old[:start] + old[end:]


def _line_at(text: str, pos: int) -> str:
    """The line starting at ``pos``, with its line ending."""
    newline = text.find("\n", pos)
    return text[pos:] if newline < 0 else text[pos : newline + 1]


def _line_before(text: str, pos: int) -> str:
    """The whole line that ends just before ``pos`` (``pos`` starts a line)."""
    return text[text.rfind("\n", 0, pos - 1) + 1 : pos]


def _ends_with_blank_line(text: str) -> bool:
    lines = text.replace("\r\n", "\n").split("\n")
    # text ends with "\n", so lines[-1] == "" and lines[-2] is the last line.
    return len(lines) >= 2 and not lines[-2].strip(" \t")


# --------------------------------------------------------------------------- writing


def _write(path: Path, text: str, expected_old: str) -> None:
    """Replace ``path`` (its target, if a symlink) unless it changed since it was read."""
    try:
        mode: int | None = stat.S_IMODE(Path(os.path.realpath(path)).stat().st_mode)
    except FileNotFoundError:
        mode = None  # a new file: 0o666 less the umask, like any file the user creates

    def check_unchanged() -> None:
        if _read(Path(os.path.realpath(path)), missing_ok=True) != expected_old:
            raise ConfigError(f"{path}: changed while it was being edited; nothing written, try again")

    try:
        atomic_write(path, text.encode("utf-8"), mode=mode, before_replace=check_unchanged)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write: {exc}") from exc
