"""squire_kernel.metrics renders what prometheus_client's own families render."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from squire_kernel.metrics import CounterFamily, FamiliesCollector, HistogramFamily

BUCKETS = (0.0001, 0.001, 0.01, 0.1, 1, 10)


def _samples(registry: CollectorRegistry) -> set[str]:
    # _created series carry wall-clock times and are not rendered by the fast families
    return {
        line for line in generate_latest(registry).decode().splitlines()
        if line and not line.startswith("#") and "_created" not in line
    }


def test_histogram_and_counter_expose_the_same_samples() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast_h = HistogramFamily("t_seconds", "help", ["operation"], BUCKETS)
    fast_c = CounterFamily("t_tasks", "help", ["operation", "outcome"])
    ours.register(FamiliesCollector([fast_h, fast_c]))
    ref_h = Histogram("t_seconds", "help", ["operation"], buckets=BUCKETS, registry=theirs)
    ref_c = Counter("t_tasks", "help", ["operation", "outcome"], registry=theirs)

    rng = random.Random(7)
    for _ in range(2_000):
        op = rng.choice(["a", "b"])
        # bucket edges themselves too: "le" is inclusive
        value = rng.choice([*BUCKETS, rng.uniform(0, 20)])
        fast_h.labels(op).observe(value)
        ref_h.labels(op).observe(value)
        outcome = rng.choice(["ok", "error"])
        fast_c.labels(op, outcome).inc()
        ref_c.labels(op, outcome).inc()

    assert _samples(ours) == _samples(theirs)


def test_an_unobserved_registry_renders_no_series() -> None:
    registry = CollectorRegistry()
    registry.register(FamiliesCollector([HistogramFamily("x_seconds", "h", ["op"], BUCKETS)]))
    assert _samples(registry) == set()
