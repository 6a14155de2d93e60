"""Counters and histograms cheap enough to update once per task.

``prometheus_client``'s ``Counter`` and ``Histogram`` take a lock on every
update and walk the bucket list in Python: about 1.5 µs per observation,
which was 10-18 % of a service's CPU when tasks are trivial (see
``bench/README.md``). The services update these families from their event
loop thread only; a scrape (another thread) reads them through the
``prometheus_client`` custom-collector API. Under the GIL each read of an
int or a list copy is atomic, so a scrape sees every count at most one
update late, which Prometheus tolerates by design.

Exposition is the same as ``prometheus_client``'s own families, without
the ``_created`` series.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from typing import Generic, TypeVar

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString


class CounterChild:
    """One labelled series: ``child.value += n`` is the update."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: float = 0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


Child = TypeVar("Child")


class _Family(Generic[Child]):
    """Named series by label values; ``labels()`` makes a child on first use."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], Child] = {}

    def _new_child(self) -> Child:
        raise NotImplementedError

    def labels(self, *values: str) -> Child:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}")
            child = self._children[values] = self._new_child()
        return child


class CounterFamily(_Family[CounterChild]):
    def _new_child(self) -> CounterChild:
        return CounterChild()

    def collect(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            family.add_metric(values, child.value)
        return family


class HistogramChild:
    __slots__ = ("_bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, amount: float, count: int = 1) -> None:
        """Observe ``amount`` (``count`` times: one call for a run of equal values)."""
        # bisect_left: the first bound >= amount, i.e. Prometheus' "le".
        self.counts[bisect_left(self._bounds, amount)] += count
        self.sum += amount * count


class HistogramFamily(_Family[HistogramChild]):
    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Iterable[float],
    ) -> None:
        super().__init__(name, documentation, labelnames)
        self.bounds = tuple(sorted(float(b) for b in buckets if b != float("inf")))

    def _new_child(self) -> HistogramChild:
        return HistogramChild(self.bounds)

    def collect(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        edges = [floatToGoString(b) for b in self.bounds] + ["+Inf"]  # type: ignore[no-untyped-call]
        for values, child in list(self._children.items()):
            counts = list(child.counts)  # one consistent copy
            total = child.sum
            cumulative = 0
            buckets = []
            for edge, n in zip(edges, counts, strict=True):
                cumulative += n
                buckets.append((edge, cumulative))
            family.add_metric(values, buckets, total)
        return family


class FamiliesCollector(Collector):
    """Exposes a fixed set of families through a ``CollectorRegistry``."""

    def __init__(self, families: Sequence[CounterFamily | HistogramFamily]) -> None:
        self._families = tuple(families)

    def collect(self) -> Iterator[Metric]:
        for family in self._families:
            yield family.collect()
