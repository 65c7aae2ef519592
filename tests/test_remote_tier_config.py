"""Choosing the object store: ``cache = "s3://BUCKET/PREFIX"`` in the table, ``--cache``,
``--upstream-cache`` and ``UPSTREAM_PROXY_CACHE``; ``local_cache``, ``s3_endpoint_url``,
``s3_region`` and ``s3_claim_ttl`` (config/object_store.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_upstream.cli.main import resolve_settings
from pytest_upstream.config.s3_location import S3Location
from pytest_upstream.config.settings import ConfigError, Settings, load_settings
from pytest_upstream.pytest_plugin.harness import settings_for


@pytest.fixture(autouse=True)
def no_aws_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("UPSTREAM_PROXY_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def table(tmp_path: Path, body: str) -> Settings:
    config = tmp_path / "pyproject.toml"
    config.write_text(f"[tool.pytest-upstream]\n{body}\n")
    return load_settings(config)


def test_an_s3_cache_in_the_table_is_the_object_store_and_local_cache_its_tier(tmp_path: Path) -> None:
    settings = table(
        tmp_path,
        'cache = "s3://ci-cache/fleet/"\nlocal_cache = ".tier"\n'
        's3_endpoint_url = "http://127.0.0.1:8333"\ns3_region = "eu-west-1"',
    )
    assert settings.object_store == S3Location("ci-cache", "fleet", "http://127.0.0.1:8333", "eu-west-1")
    assert settings.cache_dir == tmp_path.resolve() / ".tier"  # relative to the config file


def test_without_local_cache_the_tier_is_the_per_user_cache_dir(tmp_path: Path) -> None:
    settings = table(tmp_path, 'cache = "s3://ci-cache"')
    assert settings.object_store == S3Location("ci-cache", "", None, None)
    assert settings.cache_dir == tmp_path / "xdg" / "pytest-upstream"


def test_the_endpoint_and_region_come_from_the_aws_variables_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://minio.internal:9000/")
    monkeypatch.setenv("AWS_REGION", "auto")
    settings = table(tmp_path, 'cache = "s3://ci-cache/p"')
    assert settings.object_store == S3Location("ci-cache", "p", "https://minio.internal:9000", "auto")


@pytest.mark.parametrize(
    ("value", "seconds"), [(None, 60.0), ("5", 5.0), ('"90s"', 90.0), ('"2m"', 120.0), ("0.5", 0.5)]
)
def test_the_claim_ttl_is_seconds_or_an_age_and_reaches_the_engine(
    tmp_path: Path, value: str | None, seconds: float
) -> None:
    from pytest_upstream.engine.shared_tier import shared_tier
    from pytest_upstream.store.cache import Cache

    body = 'cache = "s3://ci-cache/p"\ns3_endpoint_url = "http://127.0.0.1:9"'
    settings = table(tmp_path, body + (f"\ns3_claim_ttl = {value}" if value else ""))
    assert settings.store_options.claim_ttl == seconds
    shared = shared_tier(settings, Cache(tmp_path / "tier"))
    assert shared is not None and shared.claim_ttl == seconds


@pytest.mark.parametrize("value", ["0", "-1", '"soon"', "true", '""', "inf"])
def test_a_claim_ttl_that_is_not_a_positive_duration_is_refused(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match="s3_claim_ttl must be a positive number of seconds"):
        table(tmp_path, f'cache = "s3://ci-cache/p"\ns3_claim_ttl = {value}')


def test_a_directory_cache_has_no_object_store(tmp_path: Path) -> None:
    settings = table(tmp_path, 'cache = "shared"\nlocal_cache = "ignored"')
    assert settings.object_store is None and settings.cache_dir == tmp_path.resolve() / "shared"


def test_a_flag_or_the_environment_chooses_either_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    on_disk = table(
        tmp_path, 'cache = "shared"\nlocal_cache = "/var/tier"\ns3_endpoint_url = "http://s3.test"'
    )
    to_s3 = on_disk.with_overrides(cache="s3://other-bucket/x")
    assert to_s3.object_store == S3Location("other-bucket", "x", "http://s3.test", None)
    assert to_s3.cache_dir == Path("/var/tier")
    back = to_s3.with_overrides(cache=str(tmp_path / "dir"))
    assert back.object_store is None and back.cache_dir == tmp_path / "dir"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("UPSTREAM_PROXY_CACHE", "s3://env-bucket/y")
    from_env = resolve_settings(None)
    assert from_env.object_store is not None and from_env.object_store.url == "s3://env-bucket/y"
    assert resolve_settings(None, cache="s3://flag-bucket").object_store == S3Location(
        "flag-bucket", "", "http://s3.test"
    )


def test_the_pytest_plugin_passes_an_s3_location_through(tmp_path: Path) -> None:
    settings = settings_for(
        config_file=None, search_dir=tmp_path, cache="s3://ci-cache/pytest", mode=None, base_dir=tmp_path
    )
    assert settings.object_store is not None and settings.object_store.url == "s3://ci-cache/pytest"
    relative = settings_for(config_file=None, search_dir=tmp_path, cache="c", mode=None, base_dir=tmp_path)
    assert relative.object_store is None and relative.cache_dir == tmp_path / "c"


@pytest.mark.parametrize(
    ("body", "fragments"),
    [
        ('cache = "s3://Bad_Bucket/x"', ["cache", "Bad_Bucket", "bucket name"]),
        ('cache = "s3://ok-bucket/a//b"', ["cache", "empty segment"]),
        ('cache = "s3://ok-bucket"\ns3_endpoint_url = "ftp://x"', ["s3_endpoint_url", "http"]),
        ('cache = "s3://ok-bucket"\nlocal_cache = 3', ["local_cache", "string"]),
        ('cache = "s3://ok-bucket"\ns3_region = "a b"', ["s3_region"]),
    ],
)
def test_bad_object_store_settings_name_the_setting(tmp_path: Path, body: str, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as caught:
        table(tmp_path, body)
    assert all(f in str(caught.value) for f in fragments), caught.value


def test_an_endpoint_with_credentials_is_refused_without_showing_them(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        table(tmp_path, 'cache = "s3://ok-bucket"\ns3_endpoint_url = "https://key:hunter2secret@s3.test"')
    assert "hunter2secret" not in str(caught.value) and "***@s3.test" in str(caught.value)
    with pytest.raises(ConfigError, match=r"^cache: "):
        Settings(cache_dir=tmp_path).with_overrides(cache="s3://x")


def test_the_aws_secrets_are_scrubbed_from_output_once_a_bucket_is_used(tmp_path: Path) -> None:
    assert "AWS_SECRET_ACCESS_KEY" not in table(tmp_path, 'cache = "dir"').secret_env_names()
    names = table(tmp_path, 'cache = "s3://ci-cache"').secret_env_names()
    assert {"AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} <= set(names)
