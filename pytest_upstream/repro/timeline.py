"""The HTML report's timeline: where each answer of a session goes on an inline SVG chart.

Pure geometry (numbers and text), drawn by ``pages/templates/report_timeline.svg``.  Time runs
left to right on one axis for every xdist worker (wall-clock timestamps).  Up to ``MARKS``
answers each get their own bar, in one lane per key, from when the request was read to when
the proxy had the answer (bars that overlap in time are stacked in their lane, up to ``ROWS`` high): a session
of ten downloads shows ten bars.  Beyond that, bars would blur into a
smear and the file would grow with the session, so the chart aggregates: ``BUCKETS`` intervals,
each a stack of the bytes every key served in it (from the upstream and from the cache).  Either
way the number of shapes is bounded (``MARKS`` bars, or ``BUCKETS`` x (``KEYS`` + 1) x 2 stacked
parts), whatever the session's size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pytest_upstream.config.units import human_size, plural
from pytest_upstream.repro.served import ServedRecord

MARKS = 300  # up to this many answers, one bar each; more: stacked bytes per interval
BUCKETS = 60
KEYS = 8  # keys drawn in their own colour (by bytes served); the rest share "other"
OTHER = "(other keys)"
WIDTH = 960.0
LEFT = 150.0  # room for the lane labels
RIGHT = 10.0
ROW = 12.0  # a bar's row within its key's lane
ROWS = 6  # rows a lane stacks overlapping bars into (beyond: they share the earliest-free row)
CHART = 180.0  # the stacked chart's height
AXIS = 28.0  # below the plot: ticks and their labels
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
OTHER_COLOUR = "#7f7f7f"


@dataclass(frozen=True)
class Bar:
    """One shape: an answer (``marks``) or a key's part of an interval (``stacked``)."""

    x: float
    y: float
    width: float
    height: float
    colour: str
    key: str
    title: str  # the tooltip (text: the template escapes it)
    cache: str = ""  # hit | miss | stale | error | ... ("" for a stacked part)
    faint: bool = False  # served from the cache: drawn lighter than traffic from the upstream
    size: float = 0.0  # the bytes it stands for


@dataclass(frozen=True)
class Tick:
    x: float
    label: str


@dataclass(frozen=True)
class Timeline:
    style: str  # "marks", "stacked", or "empty"
    width: float
    height: float
    plot_top: float
    plot_bottom: float
    bars: list[Bar]
    ticks: list[Tick]
    lanes: list[tuple[str, float]]  # label and its y: a key's lane ("marks"), the scale ("stacked")
    legend: list[tuple[str, str]]  # key, colour
    caption: str
    plot_left: float = LEFT  # the plot's sides (lane labels end left of it)
    plot_right: float = WIDTH - RIGHT


@dataclass(frozen=True)
class _Span:
    start: float
    seconds: float

    def x(self, t: float) -> float:
        return LEFT + (t - self.start) / self.seconds * (WIDTH - LEFT - RIGHT)


def _start(r: ServedRecord) -> float:
    return r.time - max(r.duration, 0.0)


def _colours(records: Sequence[ServedRecord]) -> dict[str, str]:
    """The ``KEYS`` keys that served most bytes (then most answers) get a colour each."""
    weight: dict[str, tuple[int, int]] = {}
    for r in records:
        size, count = weight.get(r.key, (0, 0))
        weight[r.key] = (size + r.size, count + 1)
    ranked = sorted(weight, key=lambda k: (-weight[k][0], -weight[k][1], k))
    return {key: PALETTE[i] for i, key in enumerate(sorted(ranked[:KEYS]))}


def _seconds(value: float) -> str:
    if value < 60:
        return f"{value:.3g}s" if value < 10 else f"{value:.0f}s"
    return f"{int(value // 60)}m{int(value % 60):02d}s"


def _ticks(span: _Span) -> list[Tick]:
    """Round steps (1, 2 or 5 times a power of ten) with at most seven labels on the axis."""
    raw = span.seconds / 6
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    count = int(span.seconds / step + 1e-9)
    return [Tick(span.x(span.start + i * step), "+" + _seconds(i * step)) for i in range(count + 1)]


def timeline(records: Sequence[ServedRecord], tests: Sequence[str]) -> Timeline:
    """The chart of ``records``; ``tests[i]`` is the test that caused ``records[i]``."""
    if not records:
        return Timeline("empty", WIDTH, 40.0, 0.0, 0.0, [], [], [], [], "no answers in this session")
    start = min(_start(r) for r in records)
    span = _Span(start, max(max(r.time for r in records) - start, 0.001))
    colours = _colours(records)
    legend = sorted(colours.items())
    if any(r.key not in colours for r in records):
        legend.append((OTHER, OTHER_COLOUR))
    if len(records) <= MARKS:
        return _marks(records, tests, span, colours, legend)
    return _stacked(records, span, colours, legend)


def _pack(spans: list[tuple[float, float]]) -> tuple[list[int], int]:
    """Rows within one lane so that bars overlapping in time sit one above the other: each bar
    (``x0``, ``x1``, taken in order of ``x0``) in the first row free by then; at most ``ROWS``."""
    ends: list[float] = []
    rows = [0] * len(spans)
    for i in sorted(range(len(spans)), key=lambda i: spans[i]):
        x0, x1 = spans[i]
        free = next((row for row, end in enumerate(ends) if end + 1 <= x0), None)
        if free is None and len(ends) < ROWS:
            free = len(ends)
            ends.append(x1)
        elif free is None:
            free = min(range(len(ends)), key=ends.__getitem__)  # crowded: share the earliest row
        ends[free] = max(ends[free], x1)
        rows[i] = free
    return rows, max(len(ends), 1)


def _marks(
    records: Sequence[ServedRecord],
    tests: Sequence[str],
    span: _Span,
    colours: dict[str, str],
    legend: list[tuple[str, str]],
) -> Timeline:
    keys = [key for key, _ in legend]
    members: list[list[int]] = [[] for _ in keys]  # record indices per lane
    for i, r in enumerate(records):
        members[keys.index(r.key if r.key in colours else OTHER)].append(i)
    xs = [(span.x(_start(r)), max(span.x(r.time), span.x(_start(r)) + 2.0)) for r in records]
    bars: list[Bar] = []
    lanes: list[tuple[str, float]] = []
    y = 4.0
    for key, indices in zip(keys, members, strict=True):
        rows, count = _pack([xs[i] for i in indices])
        for i, row in zip(indices, rows, strict=True):
            r, (x0, x1) = records[i], xs[i]
            title = (
                f"{r.key} {r.path}: {r.cache} {r.status}, {human_size(r.size)} "
                f"in {r.duration * 1000:.0f} ms ({tests[i]})" + (f": {r.error}" if r.error else "")
            )
            bars.append(
                Bar(
                    x=round(x0, 1),
                    y=y + 3 + row * ROW,
                    width=round(x1 - x0, 1),
                    height=ROW - 2,
                    colour=colours.get(r.key, OTHER_COLOUR),
                    key=r.key,
                    title=title,
                    cache=r.cache,
                    faint=r.cache in ("hit", "stale"),
                    size=r.size,
                )
            )
        height = count * ROW + 6
        lanes.append((key, y + height / 2))
        y += height
    return Timeline(
        "marks",
        WIDTH,
        y + AXIS,
        4.0,
        y,
        bars,
        _ticks(span),
        lanes,
        legend,
        f"{plural(len(records), 'answer')}, one bar each from request to answer, overlapping "
        "ones stacked in their key's lane (lighter: served from the cache)",
    )


def _stacked(
    records: Sequence[ServedRecord], span: _Span, colours: dict[str, str], legend: list[tuple[str, str]]
) -> Timeline:
    """Bytes per interval, stacked by key and, within a key, from the upstream (solid) and from
    the cache (lighter); an answer's bytes are spread over the intervals it spans."""
    width = span.seconds / BUCKETS
    series = [(key, colour, faint) for key, colour in legend for faint in (False, True)]
    sizes = [[0.0] * BUCKETS for _ in series]
    counts = [[0] * BUCKETS for _ in series]
    index = {(key, faint): i for i, (key, _, faint) in enumerate(series)}
    for r in records:
        one = index[(r.key if r.key in colours else OTHER, r.cache in ("hit", "stale"))]
        begin, end = _start(r), r.time
        first = min(int((begin - span.start) / width), BUCKETS - 1)
        last = min(int((end - span.start) / width), BUCKETS - 1)
        counts[one][last] += 1
        for b in range(first, last + 1):
            low, high = span.start + b * width, span.start + (b + 1) * width
            share = 1.0 if end <= begin else (min(high, end) - max(low, begin)) / (end - begin)
            sizes[one][b] += r.size * max(share, 0.0)
    by_bytes = any(any(s) for s in sizes)
    values = sizes if by_bytes else [[float(c) for c in counts_of] for counts_of in counts]
    peak = max(sum(v[b] for v in values) for b in range(BUCKETS)) or 1.0
    top, bottom = 4.0, 4.0 + CHART
    bars = []
    for b in range(BUCKETS):
        x0, x1 = span.x(span.start + b * width), span.x(span.start + (b + 1) * width)
        y = bottom
        for one, (key, colour, faint) in enumerate(series):
            if values[one][b] <= 0:
                continue
            height = values[one][b] / peak * CHART
            y -= height
            when = f"+{_seconds(b * width)} to +{_seconds((b + 1) * width)}"
            title = (
                f"{key} from {'the cache' if faint else 'upstream'}: {human_size(sizes[one][b])}, "
                f"{plural(counts[one][b], 'answer')} ended {when}"
            )
            bars.append(
                Bar(
                    round(x0, 1),
                    round(y, 1),
                    round(max(x1 - x0 - 1, 1.0), 1),
                    round(height, 1),
                    colour,
                    key,
                    title,
                    faint=faint,
                    size=sizes[one][b],
                )
            )
    measure = f"{human_size(peak)} served" if by_bytes else plural(round(peak), "answer")
    return Timeline(
        "stacked",
        WIDTH,
        bottom + AXIS,
        top,
        bottom,
        bars,
        _ticks(span),
        [(measure, top), ("0", bottom)],  # the scale: the peak interval, and zero
        legend,
        f"{plural(len(records), 'answer')}: {'bytes served' if by_bytes else 'answers'} per "
        f"{_seconds(width)} interval, stacked by key (lighter: served from the cache)",
    )
