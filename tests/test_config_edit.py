"""Comment- and order-preserving edits of pyproject.toml.

Most tests compare the whole file text: an edit may add or cut one run of
lines and must leave every other byte alone.
"""

from __future__ import annotations

import os
import stat
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytest_upstream.cli.pyproject_edit import add_proxy, remove_proxy
from pytest_upstream.config.auth import AuthSpec
from pytest_upstream.config.settings import ConfigError, ProxyDefinition, load_settings, parse_proxy


def definition(key: str = "internal", **entry: object) -> ProxyDefinition:
    entry.setdefault("format", "pypi")
    entry.setdefault("url", f"https://{key}.example/simple/")
    return parse_proxy({"key": key, **entry}, "test", 600.0, 30.0)


def block(key: str = "internal") -> str:
    return (
        "[[tool.pytest-upstream.proxy]]\n"
        f'key = "{key}"\n'
        'source = "custom"\n'
        'format = "pypi"\n'
        f'url = "https://{key}.example/simple/"\n'
        'auth = "anonymous"\n'
    )


def is_one_insertion(before: str, after: str) -> bool:
    """``after`` is ``before`` with one contiguous run of text added."""
    for i in range(len(before) + 1):
        if after.startswith(before[:i]) and after.endswith(before[i:]) and len(after) > len(before):
            return True
    return False


def files_in(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


PYPROJECT = """\
# Project metadata; keep the comments.
[build-system]
requires = ["setuptools>=68"]  # pinned low on purpose
build-backend = "setuptools.build_meta"

[project]
name = "demo"
dependencies = [
    "httpx",  # the client
]

[tool.pytest-upstream]
# Shared with CI.
cache = ".upstream-cache"   # relative to this file
mode = "record"

# The company mirror.
[[tool.pytest-upstream.proxy]]
key = "corp-pypi"
format = "pypi"
url = "https://pypi.corp.example/simple/"   # via VPN only

# Public npm, through the proxy.
[[tool.pytest-upstream.proxy]]
key = "npm"
source = "npm"
# token later

# Lint settings follow.
[tool.ruff]
line-length = 110
"""


@pytest.fixture
def pyproject(tmp_path: Path) -> Path:
    path = tmp_path / "pyproject.toml"
    path.write_text(PYPROJECT, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- add


def test_add_keeps_everything_else(pyproject: Path) -> None:
    add_proxy(pyproject, definition())
    expected = PYPROJECT.replace(
        "# token later\n\n# Lint settings follow.",
        "# token later\n\n" + block() + "\n# Lint settings follow.",
    )
    assert pyproject.read_text(encoding="utf-8") == expected
    settings = load_settings(pyproject)
    assert [p.key for p in settings.proxies] == ["corp-pypi", "npm", "internal"]
    assert settings.proxy("internal") == definition()


def test_add_to_a_fresh_file(tmp_path: Path) -> None:
    path = tmp_path / "pyproject.toml"
    add_proxy(path, definition())
    assert path.read_text(encoding="utf-8") == block()
    assert [p.key for p in load_settings(path).proxies] == ["internal"]
    assert files_in(tmp_path) == ["pyproject.toml"]  # no temporary file left behind


def test_add_twice_then_remove_both_restores_the_file(pyproject: Path) -> None:
    add_proxy(pyproject, definition("one"))
    add_proxy(pyproject, definition("two"))
    text = pyproject.read_text(encoding="utf-8")
    assert text.index('key = "one"') < text.index('key = "two"') < text.index("[tool.ruff]")
    remove_proxy(pyproject, "one")
    remove_proxy(pyproject, "two")
    assert pyproject.read_text(encoding="utf-8") == PYPROJECT


@pytest.mark.parametrize(
    "original",
    [
        pytest.param("", id="empty file"),
        pytest.param('[project]\nname = "demo"  # c\n', id="no tool table"),
        pytest.param(
            '[project]\nname = "demo"\n\n[tool.ruff]\nx = 1 # c\n\n[build-system]\nrequires = []\n',
            id="tools",
        ),
        pytest.param(
            '[tool.pytest-upstream]\ncache = "c"\n\n# ruff\n[tool.ruff]\nx = 1\n', id="table, no proxies"
        ),
        pytest.param("[tool.pytest-upstream]\n\n[tool.ruff]\nx = 1\n", id="empty table"),
        pytest.param('[tool]\npytest-upstream.cache = "c"  # dotted\n', id="dotted keys"),
        pytest.param(
            '[tool.pytest-upstream]\ncache = "c"\n\n[tool.ruff]\nx = 1\n\n'
            '[[tool.pytest-upstream.proxy]]\nkey = "a"\nsource = "pypi"\n\n[project]\nname = "x"\n',
            id="entries after another table",
        ),
        pytest.param(
            '[tool.pytest-upstream]\nproxy = [\n  { key = "a", source = "pypi" },  # c\n]\n# after\n',
            id="inline array",
        ),
        pytest.param(
            '[tool.pytest-upstream]\nproxy = [{ key = "a", source = "pypi" }]  # c\n',
            id="one-line inline array",
        ),
        pytest.param(
            '[project]\ndescription = """\n[[tool.pytest-upstream.proxy]]\n# not a comment\n"""\n'
            "[tool.pytest-upstream]\ncache = 'c'\n",
            id="header-like text in a string",
        ),
        pytest.param(
            '[[tool."pytest-upstream".proxy]]  # quoted\nkey = "a"\nsource = "pypi"\n',
            id="quoted header name",
        ),
    ],
)
def test_add_and_remove_in_other_layouts(tmp_path: Path, original: str) -> None:
    path = tmp_path / "pyproject.toml"
    path.write_text(original, encoding="utf-8")
    table = tomllib.loads(original).get("tool", {}).get("pytest-upstream", {})
    before_keys = [entry["key"] for entry in table.get("proxy", [])]

    add_proxy(path, definition())
    added = path.read_text(encoding="utf-8")
    assert is_one_insertion(original, added)
    assert [p.key for p in load_settings(path).proxies] == [*before_keys, "internal"]

    remove_proxy(path, "internal")
    assert path.read_text(encoding="utf-8") == original


def test_add_keeps_crlf_line_endings(tmp_path: Path) -> None:
    original = PYPROJECT.replace("\n", "\r\n").encode()
    path = tmp_path / "pyproject.toml"
    path.write_bytes(original)
    add_proxy(path, definition())
    data = path.read_bytes()
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert is_one_insertion(original.decode(), data.decode())
    remove_proxy(path, "internal")
    assert path.read_bytes() == original


def test_file_without_final_newline(tmp_path: Path) -> None:
    path = tmp_path / "pyproject.toml"
    path.write_text('[project]\nname = "demo"', encoding="utf-8")
    add_proxy(path, definition())
    assert path.read_text(encoding="utf-8") == '[project]\nname = "demo"\n\n' + block()


def test_add_builtin_source_with_mirror_url(tmp_path: Path) -> None:
    path = tmp_path / "pyproject.toml"
    mirror = definition("mirror", source="pypi", format="pypi", url="https://mirror.example/simple/")
    add_proxy(path, mirror)
    assert 'url = "https://mirror.example/simple/"' in path.read_text(encoding="utf-8")
    assert load_settings(path).proxy("mirror") == mirror


def test_add_with_auth_and_mutable_paths(tmp_path: Path) -> None:
    path = tmp_path / "pyproject.toml"
    d = definition(
        "private",
        auth="bearer",
        token_env="PRIVATE_TOKEN",
        mutable_paths=["simple/*", "latest"],
    )
    add_proxy(path, d)
    assert load_settings(path).proxy("private") == d
    assert load_settings(path).proxy("private").auth == AuthSpec("bearer", token_env="PRIVATE_TOKEN")  # type: ignore[union-attr]


def test_duplicate_key_is_refused_and_file_unchanged(pyproject: Path) -> None:
    with pytest.raises(ConfigError) as info:
        add_proxy(pyproject, definition("corp-pypi"))
    message = str(info.value)
    assert str(pyproject) in message and "'corp-pypi'" in message and "already defined" in message
    assert pyproject.read_text(encoding="utf-8") == PYPROJECT
    assert files_in(pyproject.parent) == ["pyproject.toml"]


@pytest.mark.parametrize("key", ["Bad", "v2", "a..b", "has space", "x" * 64])
def test_invalid_key_is_refused_and_file_unchanged(pyproject: Path, key: str) -> None:
    bad = ProxyDefinition(key=key, source="custom", format="pypi", url="https://x.example/")
    with pytest.raises(ConfigError) as info:
        add_proxy(pyproject, bad)
    message = str(info.value)
    assert str(pyproject) in message and repr(key) in message and "invalid upstream proxy key" in message
    assert pyproject.read_text(encoding="utf-8") == PYPROJECT
    assert files_in(pyproject.parent) == ["pyproject.toml"]


def test_invalid_definition_does_not_create_a_file(tmp_path: Path) -> None:
    path = tmp_path / "pyproject.toml"
    bad = ProxyDefinition(key="x", source="custom", format="rpm", url="https://x.example/")
    with pytest.raises(ConfigError, match="unknown format 'rpm'"):
        add_proxy(path, bad)
    assert not path.exists()


def test_add_refuses_when_the_existing_table_is_invalid(tmp_path: Path) -> None:
    original = '[[tool.pytest-upstream.proxy]]\nkey = "a"\nformat = "rpm"\nurl = "https://a.example/"\n'
    path = tmp_path / "pyproject.toml"
    path.write_text(original, encoding="utf-8")
    with pytest.raises(ConfigError, match="unknown format 'rpm'") as info:
        add_proxy(path, definition())
    assert str(path) in str(info.value)
    assert path.read_text(encoding="utf-8") == original


def test_layout_that_cannot_be_extended_is_refused(tmp_path: Path) -> None:
    original = 'tool.pytest-upstream = { cache = "c" }\n'
    path = tmp_path / "pyproject.toml"
    path.write_text(original, encoding="utf-8")
    with pytest.raises(ConfigError, match="edit it by hand") as info:
        add_proxy(path, definition())
    assert str(path) in str(info.value) and "'internal'" in str(info.value)
    assert path.read_text(encoding="utf-8") == original


def test_invalid_toml_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pyproject.toml"
    path.write_text("[project\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        add_proxy(path, definition())
    with pytest.raises(ConfigError, match="not valid TOML"):
        remove_proxy(path, "x")
    assert path.read_text(encoding="utf-8") == "[project\n"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")
def test_permissions_are_kept(pyproject: Path) -> None:
    pyproject.chmod(0o640)
    add_proxy(pyproject, definition())
    assert stat.S_IMODE(pyproject.stat().st_mode) == 0o640


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks need privileges on Windows")
def test_symlinked_pyproject_stays_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real.toml"
    real.write_text(PYPROJECT, encoding="utf-8")
    link = tmp_path / "pyproject.toml"
    link.symlink_to(real)
    add_proxy(link, definition())
    assert link.is_symlink()
    assert 'key = "internal"' in real.read_text(encoding="utf-8")


def test_concurrent_change_is_not_overwritten(pyproject: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_fsync = os.fsync

    def fsync_and_interfere(fd: int) -> None:
        real_fsync(fd)
        pyproject.write_text(PYPROJECT + "# someone else's edit\n", encoding="utf-8")

    monkeypatch.setattr(os, "fsync", fsync_and_interfere)  # config_edit fsyncs the temp file
    with pytest.raises(ConfigError, match="changed while it was being edited"):
        add_proxy(pyproject, definition())
    assert pyproject.read_text(encoding="utf-8").endswith("# someone else's edit\n")
    assert files_in(pyproject.parent) == ["pyproject.toml"]


# --------------------------------------------------------------------------- remove


def test_remove_keeps_everything_else(pyproject: Path) -> None:
    remove_proxy(pyproject, "corp-pypi")
    expected = PYPROJECT.replace(
        "# The company mirror.\n"
        "[[tool.pytest-upstream.proxy]]\n"
        'key = "corp-pypi"\n'
        'format = "pypi"\n'
        'url = "https://pypi.corp.example/simple/"   # via VPN only\n'
        "\n",
        "",
    )
    assert expected != PYPROJECT
    assert pyproject.read_text(encoding="utf-8") == expected
    assert [p.key for p in load_settings(pyproject).proxies] == ["npm"]


def test_remove_last_entry_keeps_trailing_comments(pyproject: Path) -> None:
    remove_proxy(pyproject, "npm")
    expected = PYPROJECT.replace(
        '# Public npm, through the proxy.\n[[tool.pytest-upstream.proxy]]\nkey = "npm"\nsource = "npm"\n',
        "",
    )
    assert pyproject.read_text(encoding="utf-8") == expected
    assert [p.key for p in load_settings(pyproject).proxies] == ["corp-pypi"]


def test_remove_every_entry_falls_back_to_builtins(pyproject: Path) -> None:
    remove_proxy(pyproject, "npm")
    remove_proxy(pyproject, "corp-pypi")
    text = pyproject.read_text(encoding="utf-8")
    assert "[[tool.pytest-upstream.proxy]]" not in text
    assert "# Shared with CI." in text and "# Lint settings follow." in text and "# token later" in text
    assert [p.key for p in load_settings(pyproject).proxies] == ["pypi", "npm", "dockerhub", "maven-central"]


def test_remove_entry_at_end_of_file(tmp_path: Path) -> None:
    path = tmp_path / "pyproject.toml"
    head = '[project]\nname = "demo"\n'
    path.write_text(head + "\n# mine\n" + block(), encoding="utf-8")
    remove_proxy(path, "internal")
    assert path.read_text(encoding="utf-8") == head


def test_remove_unknown_key_is_an_error(pyproject: Path) -> None:
    with pytest.raises(ConfigError) as info:
        remove_proxy(pyproject, "nope")
    message = str(info.value)
    assert str(pyproject) in message and "'nope'" in message and "no such upstream proxy" in message
    assert "'corp-pypi'" in message  # lists what is defined
    assert pyproject.read_text(encoding="utf-8") == PYPROJECT


def test_remove_from_missing_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "pyproject.toml"
    with pytest.raises(ConfigError) as info:
        remove_proxy(path, "x")
    assert str(path) in str(info.value) and "'x'" in str(info.value)
    assert not path.exists()


def test_remove_builtin_key_not_in_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "pyproject.toml"
    path.write_text('[project]\nname = "demo"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="no such upstream proxy"):
        remove_proxy(path, "pypi")


def test_remove_duplicated_key_is_refused(tmp_path: Path) -> None:
    original = block("a") + "\n" + block("a")
    path = tmp_path / "pyproject.toml"
    path.write_text(original, encoding="utf-8")
    with pytest.raises(ConfigError, match="defined 2 times"):
        remove_proxy(path, "a")
    assert path.read_text(encoding="utf-8") == original


def test_remove_from_inline_array(tmp_path: Path) -> None:
    original = (
        '[tool.pytest-upstream]\nproxy = [\n  { key = "a", source = "pypi" },  # c\n'
        '  { key = "b", source = "npm" },\n]\n'
    )
    path = tmp_path / "pyproject.toml"
    path.write_text(original, encoding="utf-8")
    remove_proxy(path, "a")
    assert path.read_text(encoding="utf-8") == (
        '[tool.pytest-upstream]\nproxy = [\n  { key = "b", source = "npm" },\n]\n'
    )
    assert [p.key for p in load_settings(path).proxies] == ["b"]


# --------------------------------------------------------------------------- property


KEYS = ["alpha", "beta", "gamma", "delta"]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.sampled_from(KEYS)), max_size=10))
def test_any_sequence_of_edits_matches_a_model(ops: list[tuple[bool, str]]) -> None:
    """After any add/remove sequence the proxies are the model's, and every original comment survives."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pyproject.toml"
        path.write_text(PYPROJECT, encoding="utf-8")
        model = ["corp-pypi", "npm"]
        for add, key in ops:
            if add and key not in model:
                add_proxy(path, definition(key))
                model.append(key)
            elif not add and key in model:
                remove_proxy(path, key)
                model.remove(key)
            else:
                with pytest.raises(ConfigError):
                    (add_proxy(path, definition(key)) if add else remove_proxy(path, key))
        text = path.read_text(encoding="utf-8")
        assert [p.key for p in load_settings(path).proxies] == model
        for line in PYPROJECT.splitlines():
            if line.startswith(("# Project", "# Shared", "# token", "# Lint", "[tool.ruff]", "[project]")):
                assert line in text
        for key in [k for k in model if k in KEYS]:
            remove_proxy(path, key)
        assert path.read_text(encoding="utf-8") == PYPROJECT


# --------------------------------------------------------------------------- positions from tomlkit's model


def test_remove_an_entry_with_a_multi_line_array_and_comment_like_strings(tmp_path: Path) -> None:
    """Positions come from tomlkit's model, so text that looks like a header or a comment inside a
    value does not move the cut."""
    first = (
        "# first\n"
        "[[tool.pytest-upstream.proxy]]\n"
        'key = "a"\n'
        'source = "custom"\n'
        'format = "generic"\n'
        'url = "https://a.example/#[[not.a.header]]"\n'
        "mutable_paths = [\n"
        '    "latest",  # a comment inside the array\n'
        "# a comment line inside the array\n"
        '    "[[x]]",\n'
        "]\n"
        "# trailing, stays\n"
    )
    second = '\n[[tool.pytest-upstream.proxy]]\nkey = "b"\nsource = "npm"\n'
    path = tmp_path / "pyproject.toml"
    path.write_text(first + second, encoding="utf-8")
    remove_proxy(path, "a")
    assert path.read_text(encoding="utf-8") == "# trailing, stays\n" + second
    assert [p.key for p in load_settings(path).proxies] == ["b"]


def test_add_after_an_entry_that_ends_in_a_multi_line_array(tmp_path: Path) -> None:
    original = (
        "[[tool.pytest-upstream.proxy]]\n"
        'key = "a"\n'
        'source = "npm"\n'
        'mutable_paths = [\n    "x",\n    "[tool.ruff]",\n]\n'
        "\n# ruff\n[tool.ruff]\nx = 1\n"
    )
    path = tmp_path / "pyproject.toml"
    path.write_text(original, encoding="utf-8")
    add_proxy(path, definition())
    assert path.read_text(encoding="utf-8") == original.replace("\n\n# ruff", "\n\n" + block() + "\n# ruff")
    remove_proxy(path, "internal")
    assert path.read_text(encoding="utf-8") == original


def test_entries_spelt_two_ways_are_refused_not_rewritten(tmp_path: Path) -> None:
    """tomlkit renders one array of tables under one spelling; a file that mixes two cannot be
    edited as a splice, so it is left alone."""
    original = (
        '[[tool."pytest-upstream".proxy]]\nkey = "a"\nsource = "npm"\n\n'
        '[[tool.pytest-upstream.proxy]]\nkey = "b"\nsource = "npm"\n'
    )
    path = tmp_path / "pyproject.toml"
    path.write_text(original, encoding="utf-8")
    for edit in (lambda: remove_proxy(path, "a"), lambda: add_proxy(path, definition())):
        with pytest.raises(ConfigError, match="edit it by hand"):
            edit()
        assert path.read_text(encoding="utf-8") == original
    assert files_in(tmp_path) == ["pyproject.toml"]


def test_add_after_an_entry_followed_directly_by_a_header(tmp_path: Path) -> None:
    """No blank line between the last entry and the next table, and text like a header in a string
    after it: the new block still goes right after the entry, and removing it leaves a valid file."""
    entry = (
        '[tool.pytest-upstream]\nmode = "record"\n[[tool.pytest-upstream.proxy]]\nkey = "a"\nsource = "npm"\n'
    )
    rest = '[tool.x]\ny = """\n# not a comment\n[[tool.pytest-upstream.proxy]]\n"""\n'
    path = tmp_path / "pyproject.toml"
    path.write_text(entry + rest, encoding="utf-8")
    add_proxy(path, definition())
    assert path.read_text(encoding="utf-8") == entry + "\n" + block() + "\n" + rest
    assert [p.key for p in load_settings(path).proxies] == ["a", "internal"]
    remove_proxy(path, "internal")
    assert path.read_text(encoding="utf-8") == entry + "\n" + rest  # one blank line where it was
    assert [p.key for p in load_settings(path).proxies] == ["a"]
