"""``--upstream-report-html``: a session's answers on one self-contained page.

The JSON report (``report.py``) is for machines and diffs: deterministic, no timings.  This page
is for a person asking "which test pulled 400 MB, and when?": every answer per test with its
size and how long the proxy took, totals per key, the slowest and biggest downloads, and a
timeline (``timeline.py``).  Each xdist worker sends its answers as plain data (``answer_rows``);
the controller builds one ``HtmlReport`` from all of them (``build``) and writes one file.

Everything shown (paths, names, versions, URLs, error texts) came from a client, an upstream or
a file on disk: the page is rendered by the escaping environment of ``pages/``, and its
Content-Security-Policy lets it load nothing and run no script.
"""

from __future__ import annotations

import math
import time
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_upstream.config.settings import Settings
from pytest_upstream.config.units import plural
from pytest_upstream.pages.templates import render
from pytest_upstream.repro.report import OUTSIDE, describe
from pytest_upstream.repro.served import ServedRecord, Stats
from pytest_upstream.repro.timeline import Timeline, timeline
from pytest_upstream.store.files import atomic_write

TOP = 10  # the slowest and the biggest downloads listed
_TYPES = typing.get_type_hints(ServedRecord)  # field name -> str, int, float, tuple[str, ...]
_REQUIRED = {"key": "", "path": "", "cache": "", "status": 0, "size": 0}  # fields with no default


@dataclass(frozen=True)
class Answer:
    """One answer of the session, with the test that caused it and the artifact as its format names it."""

    record: ServedRecord
    test: str
    artifact: str


@dataclass(frozen=True)
class TestAnswers:
    test: str
    answers: list[Answer]  # in the order they ended
    stats: Stats
    seconds: float  # the proxy's time over all of them


@dataclass(frozen=True)
class HtmlReport:
    mode: str
    generated: str  # when the file was written (UTC), for the reader
    workers: int
    tests: list[TestAnswers]
    totals: list[tuple[str, Stats]]  # per key, by key
    total: Stats
    slowest: list[Answer]
    biggest: list[Answer]
    timeline: Timeline


def artifact_name(described: Mapping[str, str], path: str) -> str:
    """``requests 2.32.3``, ``library/alpine:3.20``, ``library/alpine@sha256:...``, or the path."""
    name = described.get("name", "")
    if not name:
        return path
    if version := described.get("version"):
        return f"{name} {version}"
    if reference := described.get("reference"):
        return f"{name}@{reference}" if ":" in reference else f"{name}:{reference}"
    if digest := described.get("digest"):
        return f"{name}@{digest}"
    return name


def answer_rows(settings: Settings, records: Iterable[ServedRecord]) -> list[dict[str, Any]]:
    """Plain data (what an xdist worker can send): each record's fields and its artifact name."""
    return [
        {**r.as_dict(), "hidden": list(r.hidden), "artifact": artifact_name(describe(settings, r), r.path)}
        for r in records
    ]


def _value(name: str, value: object) -> object:
    """``value`` as field ``name`` of a record, or None when it is not one (wrong type, NaN)."""
    hint = _TYPES.get(name)
    if hint is str:
        return value if isinstance(value, str) else None
    if hint in (int, float):
        number = value if isinstance(value, int | float) and not isinstance(value, bool) else None
        return hint(number) if number is not None and math.isfinite(number) else None
    if name == "hidden" and isinstance(value, list | tuple):
        return tuple(str(v) for v in value)
    return None


def _answer(row: Mapping[str, Any]) -> Answer:
    """An ``Answer`` from a worker's row, field by field: a stray field is ignored and a field of
    the wrong type left at its default, so an odd row cannot break the page (or its chart)."""
    values: dict[str, Any] = dict(_REQUIRED)
    for name, value in row.items():
        if (checked := _value(name, value)) is not None:
            values[name] = checked
    record = ServedRecord(**values)
    artifact = row.get("artifact")
    return Answer(record, record.test or OUTSIDE, artifact if isinstance(artifact, str) else record.path)


def _stats(answers: Iterable[Answer]) -> Stats:
    stats = Stats()
    for answer in answers:
        stats.count(answer.record)
    return stats


def build(mode: str, rows: Iterable[Mapping[str, Any]], workers: int = 1) -> HtmlReport:
    """The page's data from every worker's rows (timestamps from every worker on one axis)."""
    answers = sorted((_answer(row) for row in rows), key=lambda a: (a.record.time, a.test, a.record.path))
    per_test: dict[str, list[Answer]] = {}
    per_key: dict[str, list[Answer]] = {}
    for answer in answers:
        per_test.setdefault(answer.test, []).append(answer)
        per_key.setdefault(answer.record.key, []).append(answer)
    tests = [
        TestAnswers(test, items, _stats(items), sum(a.record.duration for a in items))
        for test, items in sorted(per_test.items())
    ]
    return HtmlReport(
        mode=mode,
        generated=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        workers=workers,
        tests=tests,
        totals=[(key, _stats(items)) for key, items in sorted(per_key.items())],
        total=_stats(answers),
        slowest=sorted(answers, key=lambda a: -a.record.duration)[:TOP],
        biggest=sorted((a for a in answers if a.record.size), key=lambda a: -a.record.size)[:TOP],
        timeline=timeline([a.record for a in answers], [a.test for a in answers]),
    )


def write_html_report(path: Path, report: HtmlReport) -> None:
    """Render and write atomically, readable like any file the user writes (0644)."""
    html = render("report_page.html", report=report, plural=plural)
    atomic_write(Path(path), html.encode("utf-8"), mode=0o644)
