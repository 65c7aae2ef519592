"""config/s3_location.py: an ``s3://BUCKET/PREFIX`` cache location, its endpoint and region are
checked before anything talks to a server, and a message about an endpoint never shows the
user-info part of the URL (it may be a password)."""

from __future__ import annotations

import pytest

from pytest_upstream.config.s3_location import (
    S3Location,
    S3LocationError,
    endpoint_from,
    is_s3_url,
    parse_s3_url,
    redact_url,
    region_from,
    s3_location,
)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("s3://cache", ("cache", "")),
        ("s3://cache/", ("cache", "")),
        ("S3://my.bucket-1/ci/runners/", ("my.bucket-1", "ci/runners")),
        ("s3://abc/a b/ü", ("abc", "a b/ü")),
    ],
)
def test_a_location_is_a_bucket_and_a_prefix(url: str, expected: tuple[str, str]) -> None:
    assert is_s3_url(url)
    assert parse_s3_url(url) == expected


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("s3://", "3 to 63"),
        ("s3://ab", "3 to 63"),
        ("s3://" + "a" * 64, "3 to 63"),
        ("s3://My-Bucket", "lowercase"),
        ("s3://under_score", "lowercase"),
        ("s3://-abc", "begins and ends"),
        ("s3://a..b", "side by side"),
        ("s3://a.-b", "side by side"),
        ("s3://192.168.1.10", "IP address"),
        ("s3://xn--abc", "reserved"),
        ("s3://data-s3alias", "reserved"),
        ("s3://cache//x", "empty segment"),
        ("s3://cache/a//b", "empty segment"),
        ("s3://cache/a/../b", "'..'"),
        ("s3://cache/./b", "'.'"),
        ("s3://cache/a\nb", "control character"),
        ("s3://cache/a\x7fb", "control character"),
        ("s3://cache/a\\b", "backslash"),
        ("s3://cache/" + "p" * 600, "longer than"),
        ("s3://cache/p?versionId=1", "query"),
        ("s3://cache/p#x", "query or fragment"),
    ],
)
def test_a_bad_location_is_refused_with_the_reason(url: str, why: str) -> None:
    with pytest.raises(S3LocationError, match=why.replace("(", r"\(").replace(".", r"\.")):
        parse_s3_url(url)


def test_a_directory_is_not_an_s3_location() -> None:
    assert not is_s3_url("/var/cache/upstream") and not is_s3_url("s3")
    with pytest.raises(S3LocationError, match="not an s3:// URL"):
        parse_s3_url("/tmp/s3://x")


def test_keys_go_below_the_prefix() -> None:
    assert S3Location("cache", "ci").key("blobs/ab/x") == "ci/blobs/ab/x"
    assert S3Location("cache").key("index/g/n") == "index/g/n"
    assert str(S3Location("cache", "a/b")) == "s3://cache/a/b" and S3Location("cache").url == "s3://cache"


def test_the_endpoint_comes_from_the_table_then_the_aws_variables() -> None:
    env = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_ENDPOINT_URL_S3": "https://s3.example.test/"}
    assert endpoint_from("http://minio.local:9000/", env) == "http://minio.local:9000"
    assert endpoint_from(None, env) == "https://s3.example.test"
    assert endpoint_from(None, {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"}) == "http://127.0.0.1:9000"
    assert endpoint_from(None, {}) is None


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("ftp://host", "http:// or https://"),
        ("host:9000", "http:// or https://"),
        ("http://", "no host"),
        ("http://host:99999", "not a URL"),
        ("http://host:0", "port is 0"),
        ("http://host/?x=1", "query or fragment"),
    ],
)
def test_a_bad_endpoint_is_refused_naming_its_setting(url: str, why: str) -> None:
    with pytest.raises(S3LocationError, match=why.replace("/", ".")) as caught:
        endpoint_from(None, {"AWS_ENDPOINT_URL_S3": url})
    assert str(caught.value).startswith("AWS_ENDPOINT_URL_S3:")


def test_an_endpoint_with_user_info_is_refused_without_showing_it() -> None:
    secret = "hunter2-s3cr3t-value"
    for url in (f"https://AKID:{secret}@s3.example.test", f"http://{secret}@127.0.0.1:1/x"):
        with pytest.raises(S3LocationError, match="user:password@") as caught:
            endpoint_from(url)
        assert secret not in str(caught.value) and "***@" in str(caught.value)
    assert redact_url(f"https://u:{secret}@h:1/p") == "https://***@h:1/p"
    assert secret not in redact_url(f"not a url {secret}@x")


def test_the_region_comes_from_the_table_then_the_aws_variables() -> None:
    assert region_from("eu-west-1", {"AWS_REGION": "us-east-2"}) == "eu-west-1"
    assert region_from(None, {"AWS_REGION": "us-east-2", "AWS_DEFAULT_REGION": "x"}) == "us-east-2"
    assert region_from(None, {"AWS_DEFAULT_REGION": "garage"}) == "garage"
    assert region_from(None, {}) is None
    with pytest.raises(S3LocationError, match="AWS_REGION: not a region name"):
        region_from(None, {"AWS_REGION": "us east/1"})


def test_the_whole_location() -> None:
    env = {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:8333",
        "AWS_REGION": "us-east-1",
        "AWS_SECRET_ACCESS_KEY": "s",
    }
    location = s3_location("s3://cache/ci/", environ=env)
    assert location == S3Location("cache", "ci", "http://127.0.0.1:8333", "us-east-1")
    # No field for credentials: boto3's own chain reads them when a request is signed.
    assert set(S3Location.__dataclass_fields__) == {"bucket", "prefix", "endpoint_url", "region"}
