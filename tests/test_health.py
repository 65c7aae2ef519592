"""Upstream health (upstream/health.py): down after failures, doubling backoff, one probe."""

from __future__ import annotations

from pytest_upstream.upstream.health import Health, HealthLimits


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_down_after_consecutive_failures_then_one_probe_with_doubling_backoff() -> None:
    clock = Clock()
    health = Health(clock, HealthLimits(failures=2, backoff=10, max_backoff=25))
    assert health.check("p") is None
    health.failed("p", "connection refused")
    assert health.check("p") is None  # one failure is not enough
    health.failed("p", "connection refused")
    down = health.check("p")
    assert down is not None and down.until == 1010.0
    assert str(down) == (
        "upstream of 'p' is marked down for 10s more after 2 failure(s) in a row (last: connection refused)"
    )
    assert health.check("other") is None  # per key
    clock.t = 1010.0
    assert health.check("p") is None  # the probe
    assert health.check("p") is not None  # only one at a time
    health.failed("p", "timed out")
    clock.t = 1015.0
    down = health.check("p")
    assert down is not None and down.until == 1030.0  # doubled
    clock.t = 1030.0
    assert health.check("p") is None
    health.failed("p", "timed out")
    assert (down := health.check("p")) is not None and down.until == 1055.0  # capped at 25
    clock.t = 1055.0
    assert health.check("p") is None
    health.succeeded("p")
    assert health.check("p") is None and health.check("p") is None
    assert health.snapshot()["p"] == (False, 0, 4)


def test_a_probe_that_never_reports_frees_the_way_after_a_backoff() -> None:
    clock = Clock()
    health = Health(clock, HealthLimits(failures=1, backoff=10))
    health.failed("p", "refused")
    clock.t += 10
    assert health.check("p") is None  # the probe goes, and its thread dies silently
    assert health.check("p") is not None
    clock.t += 10
    assert health.check("p") is None


def test_failures_zero_never_marks_down() -> None:
    health = Health(Clock(), HealthLimits(failures=0))
    for _ in range(10):
        health.failed("p", "refused")
    assert health.check("p") is None
