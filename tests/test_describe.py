"""What each format says a served path is, for --upstream-report."""

from __future__ import annotations

import pytest

from pytest_upstream.formats import get_format
from pytest_upstream.formats.base import Kind, Resource


@pytest.mark.parametrize(
    ("fmt", "path", "expected"),
    [
        ("npm", "lodash", {"name": "lodash"}),
        ("npm", "lodash/-/lodash-4.17.21.tgz", {"name": "lodash", "version": "4.17.21"}),
        ("npm", "@demo/util/-/util-1.0.0-rc.1.tgz", {"name": "@demo/util", "version": "1.0.0-rc.1"}),
        ("npm", "@demo/util", {"name": "@demo/util"}),
        ("maven", "org/example/demo/1.2/demo-1.2.jar", {"name": "org.example:demo", "version": "1.2"}),
        ("maven", "org/example/demo/1.2/demo-1.2.pom.sha1", {"name": "org.example:demo", "version": "1.2"}),
        ("maven", "org/example/demo/maven-metadata.xml", {}),
        ("docker", "library/alpine/manifests/3", {"name": "library/alpine", "reference": "3"}),
        ("docker", "a/b/blobs/sha256:" + "0" * 64, {"name": "a/b", "digest": "sha256:" + "0" * 64}),
        ("docker", "library/alpine/tags/list?n=2", {"name": "library/alpine"}),
        ("pypi", "files/demo/demo-1.0-py3-none-any.whl", {"name": "demo", "version": "1.0"}),
        ("generic", "any/file.bin", {}),
    ],
)
def test_describe(fmt: str, path: str, expected: dict[str, str]) -> None:
    handler = get_format(fmt)
    assert handler is not None
    assert handler.describe(Resource(path, "http://upstream.invalid/" + path, Kind.ARTIFACT)) == expected
