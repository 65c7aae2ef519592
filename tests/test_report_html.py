"""``--upstream-report-html``: the model (repro/html_report.py, repro/timeline.py), its escaping,
and real sessions through the plugin, with and without xdist, read back with html.parser and
opened in headless Chromium (tests/browser.py).

``UPSTREAM_SCREENSHOTS=1`` also writes the browser's picture of a realistic session to
docs/report.png (it always goes to the test's tmp_path).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from fixtures.build_wheels import Dist, write_tree
from pytest_upstream.repro.html_report import (
    TOP,
    answer_rows,
    artifact_name,
    build,
    write_html_report,
)
from pytest_upstream.repro.report import OUTSIDE
from pytest_upstream.repro.served import ServedRecord
from pytest_upstream.repro.timeline import BUCKETS, KEYS, LEFT, MARKS, RIGHT, WIDTH, timeline

from .browser import browser, page, screenshot  # noqa: F401 (fixtures)
from .conftest import MakeProxy, proxy_def
from .upstreams import Fault, Upstream, custom_proxies_toml

HOSTILE_NAME = "<img src=x onerror=alert(1)>"
HOSTILE_ERROR = "upstream said </svg><script>alert(2)</script> and <b>bold</b>"
DOCS_PICTURE = Path(__file__).resolve().parent.parent / "docs" / "report.png"


# -- reading a report back: html.parser, no regular expressions ----------------------------------
@dataclass
class Element:
    tag: str
    attrs: dict[str, str]
    parents: list[Element]
    text: str = ""
    children: list[Element] = field(default_factory=list)

    def find(self, tag: str, **attrs: str) -> list[Element]:
        found = []
        for child in self.children:
            if child.tag == tag and all(child.attrs.get(k.rstrip("_")) == v for k, v in attrs.items()):
                found.append(child)
            found += child.find(tag, **attrs)
        return found

    def all_text(self) -> str:
        return self.text + "".join(c.all_text() for c in self.children)


VOID = {"meta", "br", "hr", "img", "input", "link", "area", "base", "col", "embed", "source", "wbr"}


class Tree(HTMLParser):
    """The page as elements; SVG's self-closed shapes (``<line/>``) close themselves."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#root", {}, [])
        self.stack = [self.root]
        self.tags: Counter[str] = Counter()
        self.elements: list[Element] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] += 1
        element = Element(tag, {k: v or "" for k, v in attrs}, list(self.stack))
        self.stack[-1].children.append(element)
        self.elements.append(element)
        if tag not in VOID:
            self.stack.append(element)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] += 1
        element = Element(tag, {k: v or "" for k, v in attrs}, list(self.stack))
        self.stack[-1].children.append(element)
        self.elements.append(element)

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        assert self.stack[-1].tag == tag, f"</{tag}> closes <{self.stack[-1].tag}>"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.stack[-1].text += data


def cells(row: Element) -> list[str]:
    return [td.all_text().strip() for td in row.find("td")]


def table_rows(table: Element) -> list[Element]:
    (body,) = table.find("tbody")
    return body.find("tr")


# -- the model -------------------------------------------------------------------------------------
def record(n: int, **fields: Any) -> ServedRecord:
    values: dict[str, Any] = {
        "key": "g",
        "path": f"f{n}.bin",
        "cache": "miss",
        "status": 200,
        "size": 100,
        "test": "t.py::test_a",
        "time": 1_000.0 + n,
        "duration": 0.1,
        **fields,
    }
    return ServedRecord(**values)


def rows(*records: ServedRecord) -> list[dict[str, Any]]:
    return [{**r.as_dict(), "artifact": r.path.upper()} for r in records]


@pytest.mark.parametrize(
    ("described", "shown"),
    [
        ({"name": "requests", "version": "2.32.3"}, "requests 2.32.3"),
        ({"name": "requests"}, "requests"),
        ({"name": "library/alpine", "reference": "3.20"}, "library/alpine:3.20"),
        ({"name": "library/alpine", "reference": "sha256:ab"}, "library/alpine@sha256:ab"),
        ({"name": "library/alpine", "digest": "sha256:cd"}, "library/alpine@sha256:cd"),
        ({}, "the/path.bin"),
    ],
)
def test_artifact_name_as_the_format_names_it(described: dict[str, str], shown: str) -> None:
    assert artifact_name(described, "the/path.bin") == shown


def test_totals_per_key_and_the_top_lists() -> None:
    records = [record(n, size=1000 * n, duration=0.01 * (30 - n)) for n in range(1, 16)]
    records += [
        record(20, key="h", cache="hit", size=7, test="t.py::test_b"),
        record(21, key="h", cache="stale", size=5, test="t.py::test_b"),
        record(22, key="h", cache="miss", status=404, size=0, test="t.py::test_b"),
        record(23, key="h", cache="error", status=502, size=0, error="boom", duration=9.0, test=""),
    ]
    report = build("record", rows(*reversed(records)), workers=2)
    assert report.workers == 2 and report.mode == "record"
    totals = dict(report.totals)
    assert (totals["g"].requests, totals["g"].misses, totals["g"].bytes_upstream) == (15, 15, 120_000)
    h = totals["h"]
    assert (h.requests, h.hits, h.stale, h.misses, h.errors, h.not_found) == (4, 1, 1, 1, 1, 1)
    assert (h.bytes_cache, h.bytes_upstream) == (12, 0)
    assert report.total.requests == 19
    # per test, sorted by node id, each test's answers in the order they ended
    assert [t.test for t in report.tests] == [OUTSIDE, "t.py::test_a", "t.py::test_b"]
    test_a = report.tests[1]
    assert [a.record.path for a in test_a.answers] == [f"f{n}.bin" for n in range(1, 16)]
    assert [a.artifact for a in test_a.answers][:2] == ["F1.BIN", "F2.BIN"]
    assert test_a.seconds == pytest.approx(sum(0.01 * (30 - n) for n in range(1, 16)))
    # the slowest: the error (9 s), then f1 (0.29 s), f2 ...; the biggest: f15, f14 ...
    assert len(report.slowest) == len(report.biggest) == TOP
    assert [a.record.path for a in report.slowest[:3]] == ["f23.bin", "f1.bin", "f2.bin"]
    assert report.slowest[0].test == OUTSIDE
    assert [a.record.size for a in report.biggest] == [1000 * n for n in range(15, 5, -1)]


def test_rows_from_a_worker_are_taken_field_by_field() -> None:
    """A row of the wrong shape (an older worker, a stray field) does not break the page."""
    row = {"key": "g", "path": 7, "size": "big", "status": True, "cache": "hit", "bogus": 1, "hidden": ["x"]}
    odd = {**row, "time": float("nan"), "duration": float("inf")}
    (answer,) = build("record", [odd]).tests[0].answers
    assert (answer.record.path, answer.record.size, answer.record.hidden) == ("", 0, ("x",))
    assert answer.artifact == "" and answer.record.duration == 0.0 and answer.test == OUTSIDE
    assert answer.record.status == 0 and 0 < answer.record.time <= time.time()


def test_rows_name_the_artifact_from_the_settings() -> None:
    from pytest_upstream.config.settings import Settings

    settings = Settings(
        Path("unused"), proxies=(proxy_def(key="p", format="pypi", url="http://127.0.0.1:1/simple/"),)
    )
    wheel = record(1, key="p", path="files/demo/demo-1.2.3-py3-none-any.whl", kind="artifact")
    (row,) = answer_rows(settings, [wheel])
    assert row["artifact"] == "demo 1.2.3" and row["duration"] == 0.1
    assert json.loads(json.dumps(row)) == row  # plain data: what xdist sends


def test_timeline_draws_a_bar_per_answer_for_a_few() -> None:
    records = [
        record(0, time=100.0, duration=1.0),
        record(1, time=100.5, duration=0.5, key="h", cache="hit"),
        record(2, time=103.0, duration=2.0),
    ]
    chart = timeline(records, ["a", "b", "c"])
    assert chart.style == "marks" and len(chart.bars) == 3
    assert [label for label, _ in chart.lanes] == ["g", "h"]
    first, last, hit = chart.bars  # lane by lane
    assert first.x == LEFT and last.x + last.width == pytest.approx(WIDTH - RIGHT, abs=0.2)
    assert first.width == pytest.approx((WIDTH - LEFT - RIGHT) / 4, abs=0.2)  # 1 s of 4
    assert hit.faint and not first.faint and hit.y > first.y  # its own lane, lighter
    assert "a)" in first.title and chart.ticks[0].label == "+0s"
    assert first.y == last.y  # one after the other: one row


def test_timeline_stacks_overlapping_bars_in_their_lane() -> None:
    records = [record(n, time=100.0 + n * 0.1, duration=1.0) for n in range(9)]
    records.append(record(9, time=110.0, duration=1.0))  # after all of them: the first row again
    chart = timeline(records, ["t"] * len(records))
    rows = [b.y for b in chart.bars]
    assert len(set(rows[:6])) == 6  # up to ROWS rows, one above the other
    assert set(rows[6:9]) <= set(rows[:6])  # crowded: they share rows, the chart stays bounded
    assert rows[9] == rows[0]
    assert chart.plot_bottom - chart.plot_top == 6 * 12.0 + 6


def test_timeline_aggregates_ten_thousand_answers_into_a_bounded_chart() -> None:
    keys = [f"k{i:02d}" for i in range(12)]  # more keys than colours: the rest share "other"
    records = [
        record(
            n,
            key=keys[n % 12],
            time=1000.0 + n * 0.01,
            duration=0.05,
            size=1 + n % 7,
            cache=("miss", "hit")[n % 2],
        )
        for n in range(10_000)
    ]
    chart = timeline(records, ["t"] * len(records))
    assert chart.style == "stacked" and [label for label, _ in chart.lanes] == ["668 B served", "0"]
    assert 0 < len(chart.bars) <= BUCKETS * (KEYS + 1) * 2
    assert {b.faint for b in chart.bars} == {True, False}  # hits apart from misses
    assert len(chart.legend) == KEYS + 1 and chart.legend[-1][0] == "(other keys)"
    assert sum(b.size for b in chart.bars) == pytest.approx(sum(r.size for r in records))
    assert all(b.x >= LEFT and b.x + b.width <= WIDTH - RIGHT + 0.2 for b in chart.bars)
    assert max(b.y + b.height for b in chart.bars) <= chart.plot_bottom + 0.2
    twice = timeline(records * 2, ["t"] * len(records) * 2)
    assert len(twice.bars) <= BUCKETS * (KEYS + 1) * 2  # the size of the chart does not grow


def test_the_page_of_a_large_session_stays_bounded_in_its_chart(tmp_path: Path) -> None:
    many = [record(n, time=1000.0 + n * 0.01) for n in range(MARKS + 1)]
    write_html_report(tmp_path / "r.html", build("record", rows(*many)))
    tree = Tree((tmp_path / "r.html").read_text())
    (svg,) = tree.root.find("svg")
    assert svg.attrs["data-style"] == "stacked" and len(svg.find("rect")) <= BUCKETS * 2


# -- escaping, no network, atomic -------------------------------------------------------------------
def test_every_outside_value_is_text_in_the_html_and_in_the_svg(tmp_path: Path) -> None:
    hostile = [
        record(1, path=HOSTILE_NAME, key="g", test=f"t.py::test_x[{HOSTILE_NAME}]"),
        record(2, path="a.bin", cache="error", status=502, error=HOSTILE_ERROR, size=0),
    ]
    report = build("record", [{**r.as_dict(), "artifact": r.path} for r in hostile])
    write_html_report(tmp_path / "r.html", report)
    html = (tmp_path / "r.html").read_text()
    tree = Tree(html)
    assert not {"img", "script", "b", "iframe", "object", "link"} & set(tree.tags)
    assert tree.tags["svg"] == 1  # the error text did not close the chart early
    (svg,) = tree.root.find("svg")
    titles = [t.all_text() for t in svg.find("title")]
    assert any(HOSTILE_NAME in t for t in titles) and any(HOSTILE_ERROR in t for t in titles)
    artifacts = [td.all_text() for td in tree.root.find("td", class_="artifact")]
    assert HOSTILE_NAME in artifacts
    assert [td.all_text() for td in tree.root.find("td", class_="why") if td.all_text()] == [HOSTILE_ERROR]
    # nothing on the page can load anything, and no script may run
    (csp,) = [m for m in tree.root.find("meta") if m.attrs.get("http-equiv") == "Content-Security-Policy"]
    assert "default-src 'none'" in csp.attrs["content"] and "script-src" not in csp.attrs["content"]
    assert not any(
        {"src", "href", "xlink:href", "style"} & set(e.attrs) for e in tree.elements if e.tag != "i"
    )


def test_no_credentials_reach_the_page(make_proxy: MakeProxy, upstream: Upstream, tmp_path: Path) -> None:
    """An index may link a file as ``http://user:pass@host/...``: the page shows it without them
    (the recorders scrub URLs and error texts before any record is made)."""
    from pytest_upstream.engine.recorders import Answer as EngineAnswer
    from pytest_upstream.formats.base import Kind, Resource
    from pytest_upstream.messages import Headers, ProxyRequest
    from pytest_upstream.pytest_plugin.harness import UpstreamProxy

    secret = "tok-5ecret-value-93f1"
    proxy = make_proxy(proxy_def(key="g", format="generic", url=upstream.url))
    res = Resource("a.bin", f"http://bob:{secret}@127.0.0.1:9/a.bin", Kind.ARTIFACT)
    request = ProxyRequest("GET", "g", "a.bin", "", Headers([("Authorization", secret)]), "http://127.0.0.1")
    proxy.engine.recorders.answered(
        EngineAnswer(request, "a.bin", res, "error", 502, error=f"at {res.upstream_url}")
    )
    report = UpstreamProxy(proxy).report(answers=True)
    write_html_report(tmp_path / "r.html", build(report["mode"], report["answers"]))
    html = (tmp_path / "r.html").read_text()
    assert secret not in html and "http://&lt;redacted&gt;@127.0.0.1:9/a.bin" in html


def test_a_session_that_fetched_nothing_says_so(tmp_path: Path) -> None:
    write_html_report(tmp_path / "r.html", build("replay", []))
    tree = Tree((tmp_path / "r.html").read_text())
    (svg,) = tree.root.find("svg")
    assert svg.attrs["data-style"] == "empty" and not svg.find("rect")
    assert any("the session's tests fetched nothing" in p.all_text() for p in tree.root.find("p"))


def test_written_atomically_and_readable_by_all(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "r.html"
    old = os.umask(0o077)
    try:
        write_html_report(target, build("record", rows(record(1))))
    finally:
        os.umask(old)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert [p.name for p in target.parent.iterdir()] == ["r.html"]  # no temporary file left


# -- a record's duration ------------------------------------------------------------------------------
def test_a_record_s_duration_is_the_time_the_proxy_took(make_proxy: MakeProxy, upstream: Upstream) -> None:
    upstream.files["/f/a.bin"] = b"a" * 10
    upstream.faults["/f/a.bin"] = Fault(delay=0.3)
    server = make_proxy(proxy_def(key="g", format="generic", url=upstream.url + "/f"))
    durations = []
    for _ in range(2):
        began = time.monotonic()
        assert urllib.request.urlopen(server.base_url + "/g/a.bin", timeout=20).read() == b"a" * 10
        elapsed = time.monotonic() - began
        durations.append((server.served.records[-1].cache, server.served.records[-1].duration, elapsed))
    (miss, miss_took, miss_elapsed), (hit, hit_took, _) = durations
    assert (miss, hit) == ("miss", "hit")
    assert 0.3 <= miss_took <= miss_elapsed  # the upstream's delay counts, the client's own time not
    assert 0 < hit_took < 0.3


# -- real sessions through the plugin -------------------------------------------------------------
PYPI = [
    Dist("requests", "2.32.3", requires=["urllib3", "idna", "certifi"]),
    Dist("urllib3", "2.2.2"),
    Dist("idna", "3.7"),
    Dist("certifi", "2024.7.4"),
]
NODE = "node-v20.11.1-linux-x64.tar.xz"
GRADLE = "gradle-8.7-bin.zip"
BIG = 3 * 1024 * 1024 + 17

INNER = f"""
import urllib.error, urllib.request, pytest

def get(upstream_proxy, key, path):
    with urllib.request.urlopen(upstream_proxy.url(key) + path) as r:
        return r.read()

def test_install_requests(upstream_proxy):
    for name, wheel in [
        ("requests", "requests-2.32.3-py3-none-any.whl"),
        ("urllib3", "urllib3-2.2.2-py3-none-any.whl"),
        ("idna", "idna-3.7-py3-none-any.whl"),
        ("certifi", "certifi-2024.7.4-py3-none-any.whl"),
    ]:
        get(upstream_proxy, "pypi", f"simple/{{name}}/")
        get(upstream_proxy, "pypi", f"files/{{name}}/{{wheel}}")
    get(upstream_proxy, "pypi", "simple/requests/")  # pip asks again: a hit

def test_npm_left_pad(upstream_proxy):
    get(upstream_proxy, "npm", "left-pad")
    get(upstream_proxy, "npm", "left-pad/-/left-pad-1.3.0.tgz")

def test_toolchain(upstream_proxy):
    assert len(get(upstream_proxy, "files", "{NODE}")) == {BIG}
    get(upstream_proxy, "files", "{GRADLE}")

def test_missing_file(upstream_proxy):
    with pytest.raises(urllib.error.HTTPError) as info:
        get(upstream_proxy, "files", "protoc-99.0-linux-x86_64.zip")
    assert info.value.code == 404

def test_odd_names(upstream_proxy):
    assert get(upstream_proxy, "files", "%3Cimg%20src=x%20onerror=alert(1)%3E") == b"odd"
"""


def _npm(upstream: Upstream) -> None:
    tarball = b"left-pad tarball bytes"
    url = f"{upstream.url}/npm/left-pad/-/left-pad-1.3.0.tgz"
    dist = {
        "tarball": url,
        "integrity": "sha512-" + base64.b64encode(hashlib.sha512(tarball).digest()).decode(),
        "shasum": hashlib.sha1(tarball).hexdigest(),
    }
    document = {
        "_id": "left-pad",
        "name": "left-pad",
        "dist-tags": {"latest": "1.3.0"},
        "versions": {"1.3.0": {"name": "left-pad", "version": "1.3.0", "dist": dist}},
        "time": {"modified": "2024-01-02T03:04:05.000Z"},
    }
    upstream.files["/npm/left-pad"] = json.dumps(document).encode()
    upstream.files["/npm/left-pad/-/left-pad-1.3.0.tgz"] = tarball


def realistic_session(pytester: pytest.Pytester, upstream: Upstream) -> None:
    """A project whose tests fetch what a build does: pip's wheels, an npm package, toolchains."""
    tree = pytester.path.parent / "tree"
    write_tree(tree, PYPI)
    for file in tree.rglob("*"):
        if file.is_file():
            upstream.files["/pypi/" + file.relative_to(tree).as_posix()] = file.read_bytes()
    for dist in PYPI:
        upstream.files[f"/pypi/simple/{dist.name}/"] = upstream.files[f"/pypi/simple/{dist.name}/index.html"]
    _npm(upstream)
    upstream.files[f"/files/{NODE}"] = b"n" * BIG
    upstream.files[f"/files/{GRADLE}"] = b"g" * 50_000
    upstream.faults[f"/files/{GRADLE}"] = Fault(delay=1.0)  # the slowest
    upstream.faults[f"/files/{NODE}"] = Fault(chunk_delay=0.004)  # the biggest takes a while too
    upstream.files["/files/%3Cimg%20src=x%20onerror=alert(1)%3E"] = b"odd"
    (pytester.path / "pyproject.toml").write_text(
        custom_proxies_toml(
            upstream.url,
            [
                ("pypi", "pypi", "pypi/simple/"),
                ("npm", "npm", "npm"),
                ("files", "generic", "files"),
            ],
        )
    )
    pytester.makepyfile(test_build=INNER)


def run(pytester: pytest.Pytester, cache: str, out: str, *args: str, ini: bool = False) -> Tree:
    """The session, its page written to ``out`` (by the flag, or by the ini option)."""
    where = f"-o upstream_report_html={out}" if ini else f"--upstream-report-html={out}"
    result = pytester.runpytest_subprocess(
        "--upstream-proxy", f"--upstream-cache={cache}", *where.split(" "), "-p", "no:cacheprovider", *args
    )
    result.assert_outcomes(passed=5)
    return Tree((pytester.path / out).read_text())


TestRows = dict[str, list[tuple[str, ...]]]


def per_test(tree: Tree) -> TestRows:
    """Per test: (key, artifact, cache, status, bytes) of each answer, sorted (xdist interleaves)."""
    tests: TestRows = {}
    for table in tree.root.find("table", class_="answers"):
        tests[table.attrs["data-test"]] = sorted(
            (*cells(row)[:4], row.find("td")[4].attrs["data-bytes"]) for row in table_rows(table)
        )
    return tests


def test_a_session_on_one_page_with_and_without_xdist(pytester: pytest.Pytester, upstream: Upstream) -> None:
    realistic_session(pytester, upstream)
    serial = run(pytester, "c1", "report.html")
    tests = per_test(serial)
    name = "test_build.py::test_"
    assert sorted(tests) == [
        name + t for t in ("install_requests", "missing_file", "npm_left_pad", "odd_names", "toolchain")
    ]
    wheel = (pytester.path.parent / "tree" / "files" / "requests-2.32.3-py3-none-any.whl").stat().st_size
    assert ("pypi", "requests 2.32.3", "miss", "200", str(wheel)) in tests[name + "install_requests"]
    assert [r[:4] for r in tests[name + "install_requests"]].count(("pypi", "requests", "hit", "200")) == 1
    assert [r[:3] for r in tests[name + "npm_left_pad"]] == [
        ("npm", "left-pad", "miss"),
        ("npm", "left-pad 1.3.0", "miss"),
    ]
    assert tests[name + "toolchain"] == [
        ("files", GRADLE, "miss", "200", "50000"),
        ("files", NODE, "miss", "200", str(BIG)),
    ]
    assert [r[2:4] for r in tests[name + "missing_file"]] == [("miss", "404")]
    assert tests[name + "odd_names"] == [("files", HOSTILE_NAME, "miss", "200", "3")]

    (totals,) = serial.root.find("table", id="totals")
    by_key = {cells(row)[0]: cells(row)[1:7] for row in table_rows(totals)}
    assert by_key["pypi"] == ["9", "1", "8", "0", "0", "0"]  # requests hits misses stale errors 404
    assert by_key["npm"] == ["2", "0", "2", "0", "0", "0"]
    assert by_key["files"] == ["4", "0", "4", "0", "0", "1"]
    assert by_key["all"] == ["15", "1", "14", "0", "0", "1"]

    (slowest,) = serial.root.find("table", id="slowest")
    first = cells(table_rows(slowest)[0])
    assert (first[0], first[2]) == (name + "toolchain", GRADLE)
    assert float(table_rows(slowest)[0].find("td")[6].attrs["data-seconds"]) >= 1.0
    (biggest,) = serial.root.find("table", id="biggest")
    assert [cells(r)[0] + " " + cells(r)[2] for r in table_rows(biggest)[:2]] == [
        f"{name}toolchain {NODE}",
        f"{name}toolchain {GRADLE}",
    ]
    assert len(table_rows(slowest)) == len(table_rows(biggest)) == TOP

    (svg,) = serial.root.find("svg")
    marks = svg.find("rect", class_="mark")
    assert svg.attrs["data-style"] == "marks" and len(marks) == 15
    assert Counter(m.attrs["data-key"] for m in marks) == {"pypi": 9, "files": 4, "npm": 2}
    assert [m.attrs["data-cache"] for m in marks].count("hit") == 1

    # the same session on a fresh cache under xdist: one page from both workers
    # (the ini option this time, into a directory that does not exist yet)
    combined = run(pytester, "c2", "sub/report2.html", "-n", "2", ini=True)
    assert per_test(combined) == tests
    assert "on 2 workers" in combined.root.find("p", class_="meta")[0].all_text()
    (svg,) = combined.root.find("svg")
    marks = svg.find("rect", class_="mark")
    assert len(marks) == 15
    assert all(LEFT - 0.1 <= float(m.attrs["x"]) <= WIDTH - RIGHT for m in marks)


@pytest.mark.slow
def test_the_page_in_a_browser_loads_nothing_and_runs_nothing(
    pytester: pytest.Pytester,
    upstream: Upstream,
    page: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    from selenium.common.exceptions import NoAlertPresentException
    from selenium.webdriver.common.by import By

    realistic_session(pytester, upstream)
    run(pytester, "c1", "report.html", "-n", "2")
    # add an error whose text tries to close the chart, written into the same kind of page
    target = pytester.path / "report.html"
    page.get(target.as_uri())
    time.sleep(0.2)
    assert page.title == "pytest-upstream session report"
    assert len(page.find_elements(By.CSS_SELECTOR, "#totals tbody tr")) == 4
    assert len(page.find_elements(By.CSS_SELECTOR, "table.answers")) == 5
    assert len(page.find_elements(By.CSS_SELECTOR, "svg rect.mark")) == 15
    artifacts = [e.text for e in page.find_elements(By.CSS_SELECTOR, "td.artifact")]
    assert HOSTILE_NAME in artifacts
    assert page.execute_script("return document.querySelectorAll('img, script, iframe').length") == 0
    assert page.execute_script("return performance.getEntriesByType('resource').length") == 0
    with pytest.raises(NoAlertPresentException):
        page.switch_to.alert.text  # noqa: B018 (no dialog opened)
    screenshot(page, tmp_path / "report.png")
    assert (tmp_path / "report.png").stat().st_size > 10_000
    if os.environ.get("UPSTREAM_SCREENSHOTS") == "1":  # the top of the page: kept small for docs/
        page.set_window_size(1280, 1150)
        page.save_screenshot(str(DOCS_PICTURE))
        page.set_window_size(1280, 900)
        assert DOCS_PICTURE.stat().st_size < 200_000

    hostile = build(
        "record",
        [
            {
                **record(1, path=HOSTILE_NAME, error=HOSTILE_ERROR, cache="error", status=502).as_dict(),
                "artifact": HOSTILE_NAME,
            }
        ],
    )
    write_html_report(tmp_path / "hostile.html", hostile)
    page.get((tmp_path / "hostile.html").as_uri())
    assert page.execute_script("return document.querySelectorAll('img, script, b').length") == 0
    assert page.execute_script("return document.querySelectorAll('svg').length") == 1
    errors = [e.text for e in page.find_elements(By.CSS_SELECTOR, "td.why")]
    assert errors == [HOSTILE_ERROR]
    title = page.execute_script("return document.querySelector('svg rect.mark title').textContent")
    assert HOSTILE_ERROR in title and HOSTILE_NAME in title
    assert page.execute_script("return performance.getEntriesByType('resource').length") == 0
    with pytest.raises(NoAlertPresentException):
        page.switch_to.alert.text  # noqa: B018
