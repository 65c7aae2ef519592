"""Unit tests of the PyPI simple-API format: names, negotiation, parsing, rendering."""

from __future__ import annotations

import json
import string
from html.parser import HTMLParser
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from packaging.utils import canonicalize_name

from pytest_upstream.formats.base import MalformedUpstream
from pytest_upstream.formats.pypi_pages import (
    HTML_V1,
    JSON_V1,
    FileLink,
    Page,
    choose_representation,
    parse_dist_filename,
    parse_page,
    render_html,
    render_json,
)

PAGE_URL = "https://upstream.example/simple/demo/"
PROXY_PAGE_URL = "http://127.0.0.1:9/py/simple/demo/"
SHA_A = "a" * 64
SHA_B = "0123456789abcdef" * 4
META_SHA = "f" * 64

PIP_ACCEPT = f"{JSON_V1}, {HTML_V1}; q=0.1, text/html; q=0.01"
UV_ACCEPT = f"{JSON_V1}, {HTML_V1};q=0.2, text/html;q=0.01"


# -- names and file names (packaging) --------------------------------------------
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("requests", "requests"),
        ("Django", "django"),
        ("zope.interface", "zope-interface"),
        ("typing_extensions", "typing-extensions"),
        ("Foo__Bar", "foo-bar"),
        ("foo.-_bar", "foo-bar"),
        ("A-._-B", "a-b"),
        ("Upstream_Demo.A", "upstream-demo-a"),
    ],
)
def test_normalized_names_are_pep_503(name: str, expected: str) -> None:
    """The proxy serves projects under packaging's canonical name (its URLs rely on it)."""
    assert canonicalize_name(name) == expected
    assert canonicalize_name(expected) == expected


@pytest.mark.parametrize(
    ("filename", "parsed"),
    [
        ("numpy-2.0.0-cp311-cp311-manylinux_2_17_x86_64.whl", ("numpy", "2.0.0")),
        ("demo-1.2.3-1-py3-none-any.whl.metadata", ("demo", "1.2.3")),  # build tag; PEP 658
        ("Zope.Interface-6.0-py3-none-any.whl", ("zope-interface", "6.0")),
        ("pkg-1.0+local-py3-none-any.whl", ("pkg", "1.0+local")),
        ("my-dist-2.0rc1.tar.gz", ("my-dist", "2.0rc1")),  # sdist names may hold '-'
        ("backports_zoneinfo-0.2.1.zip", ("backports-zoneinfo", "0.2.1")),
        ("demo-1.0-RC1.tar.gz", None),  # '-' in the version: packaging takes "RC1" as one
        ("Demo-1.0.RC1.tar.gz", ("demo", "1.0rc1")),  # versions are normalised too
        # legacy archives and eggs, as PyPI still serves them for old releases
        ("old-0.9.tar.bz2", ("old", "0.9")),
        ("old-0.9.tgz", ("old", "0.9")),
        ("old-0.9.tar.xz", ("old", "0.9")),
        ("old-0.9.tar", ("old", "0.9")),
        ("x-1.0-py3.8.egg", ("x", "1.0")),
        ("x-1.0.egg", ("x", "1.0")),
        # not distributions: no version, not PEP 440, bad wheel names, other files
        ("demo.zip", None),
        ("noversion.tar.gz", None),
        ("foo-2004d.tar.gz", None),
        ("x.egg", None),
        ("demo-1.0-py3-none.whl", None),
        ("demo-one-py3-none-any.whl", None),
        ("de__mo-1.0-py3-none-any.whl", None),
        ("-1.0.tar.gz", None),
        ("README.txt", None),
        ("demo-1.0.tar.gz.asc", None),
        ("", None),
    ],
)
def test_parse_dist_filename(filename: str, parsed: tuple[str, str] | None) -> None:
    assert parse_dist_filename(filename) == parsed


@given(st.text(max_size=40))
def test_parse_dist_filename_never_raises(filename: str) -> None:
    parsed = parse_dist_filename(filename)
    assert parsed is None or (canonicalize_name(parsed[0]) == parsed[0] and parsed[1])


# -- Accept negotiation -----------------------------------------------------------
@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (PIP_ACCEPT, "json"),
        (UV_ACCEPT, "json"),
        (None, "html"),
        ("", "html"),
        ("*/*", "html"),
        ("text/html", "html"),
        ("TEXT/HTML", "html"),
        ("text/html, */*;q=0.8", "html"),
        (HTML_V1, "html-v1"),
        ("application/vnd.pypi.simple.latest+json", "json"),
        ("application/vnd.pypi.simple.latest+html", "html-v1"),
        (f"{JSON_V1};q=0.1, text/html", "html"),  # quality decides, not order
        (f"{JSON_V1};q=0, text/html;q=0.5", "html"),  # q=0 means "not acceptable"
        (f"text/html, {JSON_V1}", "html"),  # equal quality: the first listed wins
        ("application/json", None),
        ("image/png", None),
        (f"{JSON_V1};q=0", None),
    ],
)
def test_choose_representation(accept: str | None, expected: str | None) -> None:
    assert choose_representation(accept) == expected


# -- parse_page: HTML -------------------------------------------------------------
HTML_PAGE = f"""<!DOCTYPE html>
<html><head><title>Links for demo</title></head><body>
<h1>Links for demo</h1>
<a href="../../packages/demo-1.0.tar.gz#sha256={SHA_A}"
   data-requires-python="&gt;=3.8">demo-1.0.tar.gz</a><br/>
<a href="https://files.example.org/pkgs/demo-1.1-py3-none-any.whl#sha256={SHA_B.upper()}"
   data-requires-python="&gt;=3.8,&lt;4" data-yanked="" data-gpg-sig="true"
   data-core-metadata="sha256={META_SHA}">demo-1.1-py3-none-any.whl</a><br/>
<a href="/packages/demo-1.2.zip#md5=0cc175b9c0f1b6a831c399e269772661" data-yanked="broken &amp; bad"
   data-dist-info-metadata="true" data-gpg-sig="false">demo-1.2.zip</a><br/>
<a href="demo-1.3.tar.gz" data-core-metadata="true"
   data-dist-info-metadata="sha256={META_SHA}">demo-1.3.tar.gz</a>
<a>no href is not a file</a>
</body></html>
"""


def _by_name(page: Page) -> dict[str, FileLink]:
    return {f.filename: f for f in page.files}


def test_parse_html_page() -> None:
    page = parse_page(HTML_PAGE.encode(), PAGE_URL, root=False)
    files = _by_name(page)
    assert list(files) == ["demo-1.0.tar.gz", "demo-1.1-py3-none-any.whl", "demo-1.2.zip", "demo-1.3.tar.gz"]

    sdist = files["demo-1.0.tar.gz"]
    assert sdist.url == "https://upstream.example/packages/demo-1.0.tar.gz"  # relative, resolved
    assert sdist.hashes == {"sha256": SHA_A}
    assert sdist.requires_python == ">=3.8"  # entity decoded
    assert sdist.yanked is False
    assert sdist.core_metadata is False
    assert sdist.gpg_sig is None

    wheel = files["demo-1.1-py3-none-any.whl"]
    assert wheel.url == "https://files.example.org/pkgs/demo-1.1-py3-none-any.whl"  # another host, kept
    assert wheel.hashes == {"sha256": SHA_B.upper()}
    assert wheel.expected() == {"sha256": SHA_B}  # verified in lower case
    assert wheel.requires_python == ">=3.8,<4"
    assert wheel.yanked is True  # data-yanked="" is yanked without a reason
    assert wheel.gpg_sig is True
    assert wheel.core_metadata == {"sha256": META_SHA}

    zipped = files["demo-1.2.zip"]
    assert zipped.url == "https://upstream.example/packages/demo-1.2.zip"
    assert zipped.hashes == {"md5": "0cc175b9c0f1b6a831c399e269772661"}
    assert zipped.yanked == "broken & bad"
    assert zipped.core_metadata is True  # the PEP 658 spelling of the older attribute
    assert zipped.gpg_sig is False

    bare = files["demo-1.3.tar.gz"]
    assert bare.url == "https://upstream.example/simple/demo/demo-1.3.tar.gz"
    assert bare.hashes == {}
    assert bare.core_metadata is True  # data-core-metadata wins over data-dist-info-metadata


def test_parse_html_root_page() -> None:
    body = b'<html><body><a href="/simple/foo-bar/">Foo_Bar</a><a href="baz/"></a></body></html>'
    page = parse_page(body, "https://upstream.example/simple/", root=True)
    assert page.projects == ["Foo_Bar", "baz"]
    assert page.files == []


# -- parse_page: PEP 691 JSON -----------------------------------------------------
JSON_PAGE = {
    "meta": {"api-version": "1.1"},
    "name": "demo",
    "versions": ["1.0", "1.1"],
    "files": [
        {
            "filename": "demo-1.0.tar.gz",
            "url": "../../packages/demo-1.0.tar.gz#sha256=ignored",
            "hashes": {"sha256": SHA_A, "blake2b_256": "00"},
            "requires-python": ">=3.8",
            "size": 1234,
            "upload-time": "2024-01-02T03:04:05.678901Z",
        },
        {
            "filename": "demo-1.1-py3-none-any.whl",
            "url": "https://files.example.org/pkgs/demo-1.1-py3-none-any.whl",
            "hashes": {"sha256": SHA_B},
            "yanked": "security hole",
            "core-metadata": {"sha256": META_SHA},
            "gpg-sig": False,
        },
        {
            "filename": "demo-1.2.zip",
            "url": "/packages/demo-1.2.zip",
            "hashes": {},
            "yanked": True,
            "dist-info-metadata": True,
        },
    ],
}


def test_parse_json_page() -> None:
    page = parse_page(json.dumps(JSON_PAGE).encode(), PAGE_URL, root=False)
    assert page.name == "demo"
    assert page.versions == ["1.0", "1.1"]
    files = _by_name(page)

    sdist = files["demo-1.0.tar.gz"]
    assert sdist.url == "https://upstream.example/packages/demo-1.0.tar.gz"  # joined, fragment dropped
    assert sdist.hashes == {"sha256": SHA_A, "blake2b_256": "00"}
    assert sdist.expected() == {"sha256": SHA_A}  # only algorithms we can verify
    assert sdist.requires_python == ">=3.8"
    assert sdist.size == 1234
    assert sdist.upload_time == "2024-01-02T03:04:05.678901Z"
    assert sdist.yanked is False
    assert sdist.core_metadata is False
    assert sdist.gpg_sig is None

    wheel = files["demo-1.1-py3-none-any.whl"]
    assert wheel.url == "https://files.example.org/pkgs/demo-1.1-py3-none-any.whl"
    assert wheel.yanked == "security hole"
    assert wheel.core_metadata == {"sha256": META_SHA}
    assert wheel.gpg_sig is False

    zipped = files["demo-1.2.zip"]
    assert zipped.url == "https://upstream.example/packages/demo-1.2.zip"
    assert zipped.yanked is True
    assert zipped.core_metadata is True  # the older key still counts


def test_parse_json_root_page() -> None:
    body = json.dumps({"meta": {"api-version": "1.0"}, "projects": [{"name": "Foo_Bar"}, {"name": "baz"}]})
    page = parse_page(body.encode(), "https://upstream.example/simple/", root=True)
    assert page.projects == ["Foo_Bar", "baz"]


def test_leading_whitespace_before_json_is_still_json() -> None:
    page = parse_page(b"\n  " + json.dumps(JSON_PAGE).encode(), PAGE_URL, root=False)
    assert len(page.files) == 3


# -- malformed upstream answers ---------------------------------------------------
@pytest.mark.parametrize(
    ("body", "root"),
    [
        (b"{not json", False),
        (b'{"name": "demo", "files": [', False),
        (b'{"name": "demo"}', False),  # no files
        (b'{"files": 3}', False),
        (b'{"files": [3]}', False),
        (b'{"files": [{"url": "x", "hashes": {}}]}', False),  # no filename
        (b'{"files": [{"filename": "x.whl", "hashes": {}}]}', False),  # no url
        (b'{"files": [{"filename": "x.whl", "url": "x.whl"}]}', False),  # no hashes
        (b'{"files": [{"filename": "x.whl", "url": "x.whl", "hashes": ["sha256"]}]}', False),
        (b'{"files": [{"filename": "x.whl", "url": 5, "hashes": {}}]}', False),
        (b'{"meta": {}}', True),  # root without projects
        (b'{"projects": [{"title": "x"}]}', True),
        (b"<html><body><a href='x.whl'>\xff\xfe</a></body></html>", False),  # not UTF-8
    ],
)
def test_malformed_pages_raise(body: bytes, root: bool) -> None:
    with pytest.raises(MalformedUpstream):
        parse_page(body, PAGE_URL, root=root)


# -- rendering ------------------------------------------------------------------
class _Anchors(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.hrefs.append(dict(attrs)["href"] or "")


def _hrefs(html_body: bytes) -> list[str]:
    parser = _Anchors()
    parser.feed(html_body.decode())
    return parser.hrefs


def _rich_page() -> Page:
    return Page(
        name="demo",
        versions=["1.0", "1.1"],
        files=[
            FileLink(
                filename="demo-1.0.tar.gz",
                url="https://upstream.example/packages/demo-1.0.tar.gz",
                hashes={"sha256": SHA_A},
                requires_python=">=3.8,<4",
                size=10,
                upload_time="2024-01-02T03:04:05Z",
            ),
            FileLink(
                filename="demo-1.1+local-py3-none-any.whl",
                url="https://other.example/x/demo.whl",
                hashes={"sha256": SHA_B, "md5": "0cc175b9c0f1b6a831c399e269772661"},
                yanked='bad "release" <don\'t> & co',
                core_metadata={"sha256": META_SHA},
                gpg_sig=True,
            ),
            FileLink(
                filename="demo-1.2.zip",
                url="https://upstream.example/demo-1.2.zip",
                hashes={"md5": "0cc175b9c0f1b6a831c399e269772661"},
                yanked=True,
                core_metadata=True,
                gpg_sig=False,
            ),
            FileLink(filename="demo-1.3.tar.gz", url="https://upstream.example/demo-1.3.tar.gz"),
        ],
    )


def _proxied(filename: str) -> str:
    return f"http://127.0.0.1:9/py/files/demo/{quote(filename)}"


def test_render_html_rewrites_links_with_hash_fragments() -> None:
    body = render_html("demo", _rich_page(), root=False)
    assert _hrefs(body) == [
        f"../../files/demo/demo-1.0.tar.gz#sha256={SHA_A}",
        f"../../files/demo/demo-1.1%2Blocal-py3-none-any.whl#sha256={SHA_B}",  # sha256 preferred
        "../../files/demo/demo-1.2.zip#md5=0cc175b9c0f1b6a831c399e269772661",
        "../../files/demo/demo-1.3.tar.gz",
    ]
    assert b'<meta name="pypi:repository-version" content="1.0">' in body
    assert b"upstream.example" not in body and b"other.example" not in body


def test_render_html_round_trip_keeps_attributes() -> None:
    original = _rich_page()
    page = parse_page(render_html("demo", original, root=False), PROXY_PAGE_URL, root=False)
    assert [f.filename for f in page.files] == [f.filename for f in original.files]
    for got, want in zip(page.files, original.files, strict=True):
        assert got.url == _proxied(want.filename)
        hash_algo = "sha256" if "sha256" in want.hashes else next(iter(sorted(want.hashes)), None)
        assert got.hashes == ({hash_algo: want.hashes[hash_algo]} if hash_algo else {})
        assert got.requires_python == want.requires_python
        assert got.yanked == want.yanked
        assert got.core_metadata == want.core_metadata
        assert got.gpg_sig == want.gpg_sig


def test_render_json_round_trip_keeps_attributes() -> None:
    original = _rich_page()
    body = render_json("demo", original, root=False)
    data = json.loads(body)
    assert data["meta"] == {"api-version": "1.0"}
    assert data["name"] == "demo"
    assert [f["url"] for f in data["files"]] == [
        "../../files/demo/demo-1.0.tar.gz",
        "../../files/demo/demo-1.1%2Blocal-py3-none-any.whl",
        "../../files/demo/demo-1.2.zip",
        "../../files/demo/demo-1.3.tar.gz",
    ]
    # PEP 714: both spellings of the metadata key, so old and new clients see it
    assert data["files"][1]["core-metadata"] == data["files"][1]["dist-info-metadata"] == {"sha256": META_SHA}
    page = parse_page(body, PROXY_PAGE_URL, root=False)
    assert page.name == "demo"
    assert page.versions == ["1.0", "1.1"]
    for got, want in zip(page.files, original.files, strict=True):
        assert got.filename == want.filename
        assert got.url == _proxied(want.filename)
        assert got.hashes == want.hashes  # JSON keeps every hash
        assert got.requires_python == want.requires_python
        assert got.yanked == want.yanked
        assert got.core_metadata == want.core_metadata
        assert got.gpg_sig == want.gpg_sig
        assert got.size == want.size
        assert got.upload_time == want.upload_time


def test_render_html_of_parsed_upstream_page() -> None:
    upstream = parse_page(HTML_PAGE.encode(), PAGE_URL, root=False)
    body = render_html("demo", upstream, root=False)
    assert b"files.example.org" not in body and b"upstream.example" not in body
    again = parse_page(body, PROXY_PAGE_URL, root=False)
    assert _essence(again) == _essence(upstream)


@pytest.mark.parametrize("render", [render_html, render_json])
def test_render_root_round_trip(render: object) -> None:
    page = Page(name="", projects=["Foo_Bar", "baz", "Zope.Interface"])
    body = render("", page, root=True)  # type: ignore[operator]
    again = parse_page(body, "http://127.0.0.1:9/py/simple/", root=True)
    assert again.projects == page.projects
    if render is render_html:
        assert _hrefs(body) == ["foo-bar/", "baz/", "zope-interface/"]  # normalised links


# -- property: render -> parse gives back the same files ------------------------
# Distribution filenames start with a letter or digit (so never "." or ".."): the rest may hold any
# character that needs quoting in a URL or escaping in HTML.
_FILENAME = st.builds(
    str.__add__,
    st.sampled_from(string.ascii_letters + string.digits),
    st.text(alphabet=string.ascii_letters + string.digits + "-_.+!~%&#?=,;@'", max_size=40),
)
_SHA = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\x00"),
    min_size=1,
    max_size=30,
)
_LINK = st.builds(
    FileLink,
    filename=_FILENAME,
    url=st.just("https://upstream.example/x"),
    hashes=st.builds(lambda sha: {"sha256": sha}, _SHA),
    requires_python=st.none() | st.sampled_from([">=3.8", ">=3.8,<4", "!=3.0.*,>=2.7", "~=3.11"]) | _TEXT,
    yanked=st.just(False) | st.just(True) | _TEXT,
    core_metadata=st.just(False) | st.just(True) | st.builds(lambda sha: {"sha256": sha}, _SHA),
    gpg_sig=st.none() | st.booleans(),
)
_FILES = st.lists(_LINK, max_size=6, unique_by=lambda f: f.filename)


def _essence(page: Page) -> list[tuple[object, ...]]:
    return [
        (f.filename, f.hashes, f.requires_python, f.yanked, f.core_metadata, f.gpg_sig) for f in page.files
    ]


@settings(max_examples=150, deadline=None)
@given(files=_FILES)
def test_json_render_parse_round_trip(files: list[FileLink]) -> None:
    page = Page(name="demo", files=files)
    again = parse_page(render_json("demo", page, root=False), PROXY_PAGE_URL, root=False)
    assert _essence(again) == _essence(page)
    assert [f.url for f in again.files] == [_proxied(f.filename) for f in files]


@settings(max_examples=150, deadline=None)
@given(files=_FILES)
def test_html_render_parse_round_trip(files: list[FileLink]) -> None:
    page = Page(name="demo", files=files)
    body = render_html("demo", page, root=False)
    again = parse_page(body, PROXY_PAGE_URL, root=False)
    assert _essence(again) == _essence(page)
    assert [f.url for f in again.files] == [_proxied(f.filename) for f in files]
