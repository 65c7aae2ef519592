"""Reading ``[tool.pytest-upstream]``: good tables, bad tables, and secrets that must not leak."""

from __future__ import annotations

import base64
import pickle
import sys
from pathlib import Path

import pytest

from pytest_upstream.config.auth import AuthSpec, CredentialsError
from pytest_upstream.config.settings import (
    DEFAULT_METADATA_TTL,
    ConfigError,
    ProxyDefinition,
    Settings,
    default_cache_dir,
    load_settings,
    parse_proxy,
)

BUILTIN_KEYS = ("pypi", "npm", "dockerhub", "maven-central")

PASSWORD = "pw-S3CRET-value-71"
TOKEN = "tok-S3CRET-value-42"
USERNAME = "alice-S3CRET-user"
SECRETS = (PASSWORD, TOKEN, USERNAME)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pyproject.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REG_USER", USERNAME)
    monkeypatch.setenv("REG_PASSWORD", PASSWORD)
    monkeypatch.setenv("REG_TOKEN", TOKEN)


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text
        assert base64.b64encode(secret.encode()).decode() not in text


# --------------------------------------------------------------------------- defaults


def test_no_pyproject_means_builtin_proxies(tmp_path: Path) -> None:
    settings = load_settings(search_dir=tmp_path)
    assert tuple(p.key for p in settings.proxies) == BUILTIN_KEYS
    assert settings.config_file is None
    assert settings.mode == "record"
    assert {p.key: p.format for p in settings.proxies} == {
        "pypi": "pypi",
        "npm": "npm",
        "dockerhub": "docker",
        "maven-central": "maven",
    }
    assert all(p.auth == AuthSpec() for p in settings.proxies)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the Linux default is documented")
def test_default_cache_dir_on_linux(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/configuration.md: $XDG_CACHE_HOME/pytest-upstream, else ~/.cache/pytest-upstream."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "pytest-upstream"
    assert load_settings(search_dir=tmp_path).cache_dir == tmp_path / "xdg" / "pytest-upstream"
    for unusable in ("", "relative/cache"):  # the XDG spec: a relative path is ignored
        monkeypatch.setenv("XDG_CACHE_HOME", unusable)
        assert default_cache_dir() == tmp_path / "home" / ".cache" / "pytest-upstream"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "pytest-upstream"
    assert not (tmp_path / "home").exists()  # naming it creates nothing


def test_pyproject_without_table_means_builtin_proxies(tmp_path: Path) -> None:
    path = write(tmp_path, '[project]\nname = "x"\n')
    settings = load_settings(search_dir=tmp_path)
    assert tuple(p.key for p in settings.proxies) == BUILTIN_KEYS
    assert settings.config_file == path


def test_table_without_proxies_keeps_builtins_with_table_timings(tmp_path: Path) -> None:
    write(tmp_path, "[tool.pytest-upstream]\nmetadata_ttl = 5\ntimeout = 7\n")
    settings = load_settings(search_dir=tmp_path)
    assert tuple(p.key for p in settings.proxies) == BUILTIN_KEYS
    assert {p.metadata_ttl for p in settings.proxies} == {5.0}
    assert {p.timeout for p in settings.proxies} == {7.0}


def test_missing_explicit_config_file_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="config file not found") as info:
        load_settings(missing)
    assert str(missing) in str(info.value)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[tool.pytest-upstream\n")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load_settings(path)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------- good tables

GOOD = """\
[project]
name = "demo"

[tool.pytest-upstream]
cache = ".upstream-cache"
mode = "replay"
metadata_ttl = 60
timeout = 12.5

[[tool.pytest-upstream.proxy]]
key = "internal-pypi"
format = "pypi"
url = "https://pypi.internal.example/simple/"
auth = "basic"
username_env = "REG_USER"
password_env = "REG_PASSWORD"
mutable_paths = ["simple/*"]

[[tool.pytest-upstream.proxy]]
key = "pypi"
source = "pypi"

[[tool.pytest-upstream.proxy]]
key = "npm-mirror"
source = "npm"
url = "https://npm.mirror.example/"
auth = "bearer"
token_env = "REG_TOKEN"
metadata_ttl = 0
"""


def test_good_table(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    settings = load_settings(path)
    assert settings.config_file == path
    assert settings.mode == "replay"
    assert settings.cache_dir == tmp_path.resolve() / ".upstream-cache"
    assert [p.key for p in settings.proxies] == ["internal-pypi", "pypi", "npm-mirror"]

    internal = settings.proxy("internal-pypi")
    assert internal is not None
    assert (internal.source, internal.format, internal.url) == (
        "custom",
        "pypi",
        "https://pypi.internal.example/simple/",
    )
    assert internal.auth == AuthSpec("basic", username_env="REG_USER", password_env="REG_PASSWORD")
    assert internal.mutable_paths == ("simple/*",)
    assert (internal.metadata_ttl, internal.timeout) == (60.0, 12.5)  # inherited from the table

    pypi = settings.proxy("pypi")
    assert pypi is not None and (pypi.format, pypi.url) == ("pypi", "https://pypi.org/simple/")

    mirror = settings.proxy("npm-mirror")
    assert mirror is not None
    assert (mirror.format, mirror.url, mirror.metadata_ttl) == ("npm", "https://npm.mirror.example/", 0.0)
    assert mirror.auth == AuthSpec("bearer", token_env="REG_TOKEN")
    assert settings.proxy("nope") is None


def test_overrides(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, GOOD))
    changed = settings.with_overrides(cache=tmp_path / "elsewhere", mode="refresh")
    assert (changed.cache_dir, changed.mode) == (tmp_path / "elsewhere", "refresh")
    assert settings.with_overrides() == settings
    with pytest.raises(ConfigError, match="mode must be one of"):
        settings.with_overrides(mode="sometimes")


# --------------------------------------------------------------------------- bad tables

ENTRY = "[[tool.pytest-upstream.proxy]]\n"

BAD_ENTRIES = {
    "unknown format": (
        ENTRY + 'key = "x"\nformat = "rpm"\nurl = "https://x.example/"\n',
        ["entry 1", "'x'", "unknown format 'rpm'"],
    ),
    "custom without format": (
        ENTRY + 'key = "x"\nurl = "https://x.example/"\n',
        ["entry 1", "'x'", "needs 'format'"],
    ),
    "missing url": (ENTRY + 'key = "x"\nformat = "pypi"\n', ["entry 1", "'x'", "needs 'url'"]),
    "missing key": (ENTRY + 'source = "pypi"\n', ["entry 1", "missing 'key'"]),
    "invalid key": (ENTRY + 'key = "Bad.Key"\nsource = "pypi"\n', ["entry 1", "'Bad.Key'", "lowercase"]),
    "reserved key": (ENTRY + 'key = "v2"\nsource = "pypi"\n', ["entry 1", "'v2'", "reserved"]),
    "duplicate key": (
        ENTRY + 'key = "x"\nsource = "pypi"\n' + ENTRY + 'key = "x"\nsource = "npm"\n',
        ["entry 2", "duplicate key 'x'", "entry 1"],
    ),
    "unknown field": (
        ENTRY + 'key = "x"\nsource = "pypi"\ncolour = "red"\n',
        ["entry 1", "unknown field(s) colour"],
    ),
    "unknown source": (ENTRY + 'key = "x"\nsource = "cpan"\n', ["entry 1", "'x'", "unknown source 'cpan'"]),
    "builtin with wrong format": (
        ENTRY + 'key = "x"\nsource = "pypi"\nformat = "npm"\n',
        ["entry 1", "'x'", "has format 'pypi'"],
    ),
    "basic without password_env": (
        ENTRY + 'key = "x"\nsource = "pypi"\nauth = "basic"\nusername_env = "REG_USER"\n',
        ["entry 1", "'x'", "needs username_env and password_env"],
    ),
    "basic without username_env": (
        ENTRY + 'key = "x"\nsource = "pypi"\nauth = "basic"\npassword_env = "REG_PASSWORD"\n',
        ["entry 1", "'x'", "needs username_env and password_env"],
    ),
    "bearer without token_env": (
        ENTRY + 'key = "x"\nsource = "pypi"\nauth = "bearer"\nusername_env = "REG_USER"\n',
        ["entry 1", "'x'", "needs token_env"],
    ),
    "unknown auth": (
        ENTRY + 'key = "x"\nsource = "pypi"\nauth = "digest"\ntoken_env = "REG_TOKEN"\n',
        ["entry 1", "'x'", "auth must be one of"],
    ),
    "url with credentials": (
        ENTRY + f'key = "x"\nformat = "pypi"\nurl = "https://{USERNAME}:{PASSWORD}@x.example/simple/"\n',
        ["entry 1", "'x'", "must not hold credentials"],
    ),
    "url with token as username": (
        ENTRY + f'key = "x"\nsource = "npm"\nurl = "https://{TOKEN}@x.example/"\n',
        ["entry 1", "'x'", "must not hold credentials"],
    ),
    "non-http url with credentials": (
        ENTRY + f'key = "x"\nformat = "generic"\nurl = "ftp://u:{PASSWORD}@x.example/"\n',
        ["entry 1", "'x'", "must not hold credentials"],
    ),
    "schemeless url with credentials": (
        ENTRY + f'key = "x"\nformat = "generic"\nurl = "{USERNAME}:{PASSWORD}@x.example/"\n',
        ["entry 1", "'x'", "absolute http(s) URL"],
    ),
    "relative url": (
        ENTRY + 'key = "x"\nformat = "generic"\nurl = "x.example/files/"\n',
        ["entry 1", "'x'", "absolute http(s) URL", "'x.example/files/'"],
    ),
    "negative timeout": (
        ENTRY + 'key = "x"\nsource = "pypi"\ntimeout = -1\n',
        ["entry 1", "'x'", "timeout must be a non-negative number"],
    ),
    "mutable_paths not a list": (
        ENTRY + 'key = "x"\nsource = "pypi"\nmutable_paths = "a/*"\n',
        ["entry 1", "'x'", "mutable_paths must be a list"],
    ),
}


@pytest.mark.parametrize(("text", "fragments"), BAD_ENTRIES.values(), ids=BAD_ENTRIES.keys())
@pytest.mark.usefixtures("secret_env")
def test_bad_entries_name_file_and_entry(tmp_path: Path, text: str, fragments: list[str]) -> None:
    path = write(tmp_path, '[project]\nname = "demo"\n\n' + text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert str(path) in message
    assert "[[tool.pytest-upstream.proxy]]" in message
    for fragment in fragments:
        assert fragment in message
    assert_no_secret(message)


BAD_TOP = {
    "unknown mode": ('mode = "sometimes"\n', "mode must be one of"),
    "unknown top-level field": ('caches = "x"\n', "unknown field(s) caches"),
    "bad ttl": ('metadata_ttl = "soon"\n', "metadata_ttl must be a non-negative number"),
    "bool timeout": ("timeout = true\n", "timeout must be a non-negative number"),
    "cache not a string": ("cache = 5\n", "cache must be a path string"),
    "proxy not an array": ('proxy = "pypi"\n', "'proxy' must be an array of tables"),
}


@pytest.mark.parametrize(("body", "fragment"), BAD_TOP.values(), ids=BAD_TOP.keys())
def test_bad_top_level_fields_name_the_file(tmp_path: Path, body: str, fragment: str) -> None:
    path = write(tmp_path, "[tool.pytest-upstream]\n" + body)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(path) in str(info.value)
    assert "[tool.pytest-upstream]" in str(info.value)
    assert fragment in str(info.value)


def test_table_must_be_a_table(tmp_path: Path) -> None:
    path = write(tmp_path, '[tool]\npytest-upstream = "yes"\n')
    with pytest.raises(ConfigError, match="must be a table") as info:
        load_settings(path)
    assert str(path) in str(info.value)


# --------------------------------------------------------------------------- as_table


@pytest.mark.parametrize(
    "entry",
    [
        {"key": "g", "source": "custom", "format": "generic", "url": "https://files.example/"},
        {"key": "pypi", "source": "pypi"},
        {"key": "mirror", "source": "pypi", "url": "https://mirror.example/simple/"},
        {"key": "m", "source": "maven-central", "mutable_paths": ["**/maven-metadata.xml"]},
        {
            "key": "b",
            "source": "dockerhub",
            "auth": "basic",
            "username_env": "REG_USER",
            "password_env": "REG_PASSWORD",
        },
        {"key": "t", "source": "npm", "auth": "bearer", "token_env": "REG_TOKEN"},
    ],
)
def test_as_table_round_trips(entry: dict[str, object]) -> None:
    definition = parse_proxy(entry, "test", DEFAULT_METADATA_TTL, 30.0)
    assert parse_proxy(definition.as_table(), "test", DEFAULT_METADATA_TTL, 30.0) == definition


# --------------------------------------------------------------------------- secrets


SECRET_TABLE = """\
[[tool.pytest-upstream.proxy]]
key = "basic-reg"
format = "generic"
url = "https://reg.example/"
auth = "basic"
username_env = "REG_USER"
password_env = "REG_PASSWORD"

[[tool.pytest-upstream.proxy]]
key = "bearer-reg"
source = "npm"
auth = "bearer"
token_env = "REG_TOKEN"
"""


@pytest.mark.usefixtures("secret_env")
def test_reprs_never_hold_secrets(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, SECRET_TABLE))
    basic, bearer = settings.proxies

    # Secrets are read when a request is made ...
    basic_header = basic.auth.headers()["Authorization"]
    assert base64.b64decode(basic_header.removeprefix("Basic ")).decode() == f"{USERNAME}:{PASSWORD}"
    assert bearer.auth.headers() == {"Authorization": f"Bearer {TOKEN}"}

    # ... and are held by nothing that can be printed or pickled afterwards.
    for obj in (settings, basic, bearer, basic.auth, bearer.auth):
        assert_no_secret(repr(obj))
        assert_no_secret(str(obj))
        assert_no_secret(pickle.dumps(obj).decode("latin-1"))
    assert "REG_PASSWORD" in repr(basic)  # the variable's name is fine to show
    assert basic.auth.required_env() == ("REG_USER", "REG_PASSWORD")
    assert bearer.auth.required_env() == ("REG_TOKEN",)


def test_headers_from_an_explicit_environment() -> None:
    spec = AuthSpec("bearer", token_env="REG_TOKEN")
    assert spec.headers({"REG_TOKEN": TOKEN}) == {"Authorization": f"Bearer {TOKEN}"}
    assert AuthSpec().headers({}) == {}
    assert_no_secret(repr(spec))


@pytest.mark.usefixtures("secret_env")
def test_missing_variable_is_named_without_values(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, SECRET_TABLE))
    basic, bearer = settings.proxies

    monkeypatch.delenv("REG_PASSWORD")
    with pytest.raises(CredentialsError) as info:
        basic.auth.headers()
    message = str(info.value)
    assert "REG_PASSWORD" in message
    assert "REG_USER" not in message  # it is set: only what is missing is named
    assert_no_secret(message)

    monkeypatch.setenv("REG_TOKEN", "")  # empty counts as missing
    with pytest.raises(CredentialsError, match="REG_TOKEN") as info:
        bearer.auth.headers()
    assert_no_secret(str(info.value))


@pytest.mark.usefixtures("secret_env")
def test_definitions_built_directly_do_not_leak() -> None:
    definition = ProxyDefinition(
        key="k",
        source="custom",
        format="generic",
        url="https://reg.example/",
        auth=AuthSpec("basic", username_env="REG_USER", password_env="REG_PASSWORD"),
    )
    definition.auth.headers()
    assert_no_secret(repr(definition))
    assert_no_secret(repr(Settings(cache_dir=Path("c"), proxies=(definition,))))
    assert_no_secret(repr(definition.as_table()))
