"""Counter and histogram families for one thread: the event loop's hot path.

prometheus_client's own metrics take a lock on every increment and check their state on every call: a
proxied request touches about a dozen series, and those checks measured as nine percent of the gateway's
instructions per request. Everything that updates these families runs on the event loop's thread, so a
child here is a plain number (a counter) or a list of bucket counts and a sum (a histogram), and the
family is a :class:`prometheus_client.registry.Collector` that turns them into samples when scraped.

The exposition is prometheus_client's: the same names, ``_total``, ``_bucket``/``_sum``/``_count``,
``_created`` (unless ``PROMETHEUS_DISABLE_CREATED_SERIES`` or ``disable_created_metrics()`` turned those
off, as for prometheus_client's own metrics) and ``le`` labels, text format or OpenMetrics. Only call these
from the thread that owns them (the loop); the scrape reads them from the same thread.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence

from prometheus_client import metrics as _client_metrics
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString


def _created_series() -> bool:
    """Whether ``_created`` series are exported: prometheus_client's own switch, read at each scrape."""
    return bool(getattr(_client_metrics, "_use_created", True))


class CounterChild:
    """One labelled series of a :class:`LoopCounter`."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters only go up: a negative increment")
        self.value += amount


class HistogramChild:
    """One labelled series of a :class:`LoopHistogram`: observations per bucket (not cumulative) and
    their sum."""

    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        # The first bucket whose upper bound is >= amount, as prometheus_client counts them (le).
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.sum += amount


class _Family(Collector):
    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 registry: CollectorRegistry | None):
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        if registry is not None:
            registry.register(self)

    def _check(self, values: tuple[object, ...]) -> tuple[str, ...]:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {len(values)} values")
        return tuple(str(v) for v in values)

    def describe(self) -> Iterator[Metric]:
        # the registry learns the family's names (and refuses duplicates); collect() is the subclass's
        return iter(self.collect())


class LoopCounter(_Family):
    """A counter family (``name`` without ``_total``, as prometheus_client's Counter takes it)."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 registry: CollectorRegistry | None = None):
        self._children: dict[tuple[str, ...], CounterChild] = {}
        super().__init__(name, documentation, labelnames, registry)
        if not self.labelnames:
            self._unlabelled = self._children[()] = CounterChild()

    def labels(self, *values: object) -> CounterChild:
        key = self._check(values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = CounterChild()
        return child

    def inc(self, amount: float = 1.0) -> None:
        """Increment the unlabelled counter."""
        self._unlabelled.inc(amount)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        created = _created_series()
        for key, child in list(self._children.items()):
            family.add_metric(key, child.value, created=child.created if created else None)
        yield family


class LoopHistogram(_Family):
    """A histogram family with fixed upper bounds (``+Inf`` is added)."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 registry: CollectorRegistry | None = None, buckets: Sequence[float] = ()):
        bounds = sorted(float(b) for b in buckets)
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        self.bounds = tuple(bounds)
        self._children: dict[tuple[str, ...], HistogramChild] = {}
        super().__init__(name, documentation, labelnames, registry)

    def labels(self, *values: object) -> HistogramChild:
        key = self._check(values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = HistogramChild(self.bounds)
        return child

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        created = _created_series()
        for key, child in list(self._children.items()):
            running = 0
            buckets = []
            for bound, count in zip(self.bounds, child.counts, strict=True):
                running += count
                buckets.append((floatToGoString(bound), running))
            family.add_metric(key, buckets, child.sum)
            if created:
                family.samples.append(Sample(f"{self.name}_created", dict(zip(self.labelnames, key, strict=True)),
                                             child.created))
        yield family
