"""A Prometheus collector of a cache's stats (``pip install 'sqlalchemy-writethrough[prometheus]'``).

::

    from prometheus_client import REGISTRY
    from sqlalchemy_writethrough.prometheus import WriteThroughCollector

    REGISTRY.register(WriteThroughCollector(cache))

Each scrape takes one :meth:`~.WriteThroughCache.stats` snapshot of this process (nothing is
counted twice, nothing is kept between scrapes); ``shared=True`` exports every process's
counters from Redis instead (one ``HGETALL`` per scrape: for a single exporter per service,
not for every worker, whose sums would add up the same counts many times).

Counters carry a ``model`` label (the hierarchy's base class name; ``""`` for what concerns
no model) and every metric a ``prefix`` label. Latencies are histograms in seconds, with
buckets from 10 µs to 10 s.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from .stats import BOUNDS, CacheStats, Latency

if TYPE_CHECKING:
    from .cache import WriteThroughCache

#: indices into BOUNDS exported as bucket bounds: 1, 2 and 5 times each power of ten,
#: from 10 µs to 10 s
_EXPORTED = tuple(k for k in range(10, 71) if k % 10 in (0, 3, 7))

#: per-model counters: (ModelStats attribute, metric name, help)
_MODEL_COUNTERS = (
    ("hits", "hits", "Primary-key loads served from Redis"),
    ("near_hits", "near_hits", "Of the hits, those served from the near cache"),
    ("misses", "misses", "Primary-key loads that went to the database"),
    ("fills", "fills", "Rows written to Redis after a miss"),
    ("fills_refused", "fills_refused", "Fills refused: a writer took the key meanwhile"),
    ("locked_reads", "locked_reads", "Reads that found the entry locked by a writer"),
    ("bypasses", "bypasses", "Primary-key loads sent to the database without asking Redis"),
    ("decode_errors", "decode_errors", "Entries that could not be decoded (served as misses)"),
    ("writes", "written_rows", "Rows committed transactions wrote"),
    ("publishes", "publishes", "Rows written to Redis after a commit"),
    ("restores", "restores", "Previous values put back by a rollback"),
)

#: process-wide counters: (CacheStats attribute, metric name, help)
_COUNTERS = (
    ("commits", "commits", "Committed transactions that changed cached rows"),
    ("rollbacks", "rollbacks", "Transactions that changed cached rows and did not commit"),
    ("commit_failures", "commit_failures", "commit() calls the database refused"),
    (
        "cache_write_failures",
        "cache_write_failures",
        "Transactions whose locks, publish or restore Redis did not complete",
    ),
    ("lock_failures", "lock_failures", "Flushes whose locks could not be taken"),
    ("breaker_openings", "breaker_openings", "Times the circuit breaker opened"),
    (
        "background_overflows",
        "background_overflows",
        "Publishes run by the committing caller because the background queue was full",
    ),
    ("epochs", "epochs", "Times Redis was found in a new epoch (restart, failover, flush)"),
    (
        "registries_made_whole",
        "registries_made_whole",
        "Times a forgotten keyspace registry was made whole, its older buckets replaced",
    ),
)


class WriteThroughCollector(Collector):
    """Exports one cache's stats; register one per cache (their ``prefix`` labels differ)."""

    def __init__(
        self, cache: WriteThroughCache, *, shared: bool = False, namespace: str = "writethrough"
    ) -> None:
        self.cache = cache
        self.shared = shared
        self.namespace = namespace

    def describe(self) -> Iterator[CounterMetricFamily]:
        return iter(())  # described at the first scrape (the models are known only then)

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        stats = self.cache.shared_stats() if self.shared else self.cache.stats()
        yield from export(stats, self.cache.prefix, self.namespace)


def export(
    stats: CacheStats, prefix: str, namespace: str = "writethrough"
) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
    """The metric families of one snapshot."""
    ns = namespace
    for attr, name, doc in _MODEL_COUNTERS:
        family = CounterMetricFamily(f"{ns}_{name}", doc, labels=["prefix", "model"])
        for model, m in stats.models.items():
            family.add_metric([prefix, model], getattr(m, attr))
        rest = getattr(stats, attr, 0) - sum(getattr(m, attr) for m in stats.models.values())
        if rest > 0 or not stats.models:
            family.add_metric([prefix, ""], max(rest, 0))
        yield family

    family = CounterMetricFamily(
        f"{ns}_invalidations",
        "Entries (or whole models) left as a miss instead of a value, by reason",
        labels=["prefix", "model", "reason"],
    )
    for model, m in stats.models.items():
        for reason, n in m.invalidations_by_reason.items():
            family.add_metric([prefix, model, reason], n)
    for reason, n in stats.invalidations_by_reason.items():
        rest = n - sum(m.invalidations_by_reason.get(reason, 0) for m in stats.models.values())
        if rest > 0:
            family.add_metric([prefix, "", reason], rest)
    yield family

    for attr, name, doc in _COUNTERS:
        family = CounterMetricFamily(f"{ns}_{name}", doc, labels=["prefix"])
        family.add_metric([prefix], getattr(stats, attr))
        yield family

    family = CounterMetricFamily(
        f"{ns}_redis_errors",
        "Redis calls that failed, by exception class ('breaker': skipped while it was open)",
        labels=["prefix", "kind"],
    )
    for kind, n in stats.errors_by_kind.items():
        family.add_metric([prefix, kind], n)
    yield family

    gauge = GaugeMetricFamily(
        f"{ns}_breaker_open", "1 while the circuit breaker is open", labels=["prefix"]
    )
    gauge.add_metric([prefix], 1.0 if stats.breaker_open else 0.0)
    yield gauge
    gauge = GaugeMetricFamily(
        f"{ns}_journal_size",
        "Keys journaled while Redis could not be locked, not yet invalidated",
        labels=["prefix"],
    )
    gauge.add_metric([prefix], stats.journal_size)
    yield gauge
    gauge = GaugeMetricFamily(
        f"{ns}_pending_publishes",
        "Background publishes (publish='background') not written to Redis yet",
        labels=["prefix"],
    )
    gauge.add_metric([prefix], stats.pending_publishes)
    yield gauge

    for name, latency, doc in (
        ("read_seconds", stats.read_latency, "Cached primary-key reads (Redis and decoding)"),
        (
            "commit_cache_seconds",
            stats.commit_cache_latency,
            "The cache's share of a committed transaction (locks and publish)",
        ),
        ("commit_seconds", stats.commit_latency, "Whole commit() calls that changed cached rows"),
    ):
        hist = HistogramMetricFamily(f"{ns}_{name}", doc, labels=["prefix"])
        hist.add_metric([prefix], _buckets(latency), latency.total)
        yield hist


def _buckets(latency: Latency) -> list[tuple[str, float]]:
    counts = latency.buckets or (0,) * (len(BOUNDS) + 1)
    out: list[tuple[str, float]] = []
    cumulative = 0
    done = 0
    for k in _EXPORTED:
        while done <= k:
            cumulative += counts[done]
            done += 1
        out.append((f"{BOUNDS[k]:.6g}", cumulative))
    out.append(("+Inf", latency.count))
    return out
