"""The scheduler's lock-free metrics expose what prometheus_client's own would."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from damselfly.telemetry.metrics import LoopCounter, LoopHistogram, SchedulerMetrics

BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30)


def exposition(registry: CollectorRegistry) -> list[str]:
    """The text format without the ``_created`` samples (a timestamp of prometheus_client's)."""
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


def test_loop_histogram_exposes_the_buckets_count_and_sum_a_histogram_does():
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    h = LoopHistogram("x_seconds", "doc", buckets=BUCKETS, registry=ours)
    ref = Histogram("x_seconds", "doc", buckets=BUCKETS, registry=theirs)
    for v in (0.0, 0.0005, 0.001, 0.0011, 0.05, 0.7, 5.0, 31.0, 1e6):  # on a bound, between, past the last
        h.observe(v)
        ref.observe(v)
    assert exposition(ours) == exposition(theirs)
    assert 'x_seconds_bucket{le="0.001"} 3.0' in exposition(ours)


def test_loop_counter_exposes_what_a_counter_does_and_refuses_to_go_down():
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    c = LoopCounter("y_total", "doc", ("kind",), registry=ours)
    ref = Counter("y_total", "doc", ["kind"], registry=theirs)
    for kind, n in (("a", 1), ("b", 2.5), ("a", 3)):
        c.labels(kind).inc(n)
        ref.labels(kind).inc(n)
    assert exposition(ours) == exposition(theirs)
    with pytest.raises(ValueError, match="only go up"):
        c.labels("a").inc(-1)
    with pytest.raises(ValueError, match="takes labels"):
        c.labels("a", "extra")


def test_the_scheduler_registry_serves_its_decision_histogram():
    m = SchedulerMetrics()
    m.schedule_seconds.observe(0.002)
    lines = exposition(m.registry)
    assert "dragonfly_scheduler_schedule_duration_seconds_count 1.0" in lines
    assert 'dragonfly_scheduler_schedule_duration_seconds_bucket{le="0.005"} 1.0' in lines
