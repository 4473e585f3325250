"""OpenTelemetry metrics and spans of a cache (``pip install 'sqlalchemy-writethrough[opentelemetry]'``).

::

    from sqlalchemy_writethrough.otel import instrument

    instrument(cache)                    # the global MeterProvider and TracerProvider
    instrument(cache, meter_provider=mp, tracer_provider=tp, spans=False)

Metrics are observable instruments read from one :meth:`~.WriteThroughCache.stats` snapshot
per collection: counters (``writethrough.hits`` ... with a ``model`` attribute, as the
Prometheus collector has), gauges for the breaker and the journal, and the latency
percentiles as gauges (``writethrough.read.duration`` with a ``quantile`` attribute, in
seconds). Nothing runs on a read or write path for them.

Spans: ``writethrough.read`` (a primary-key load asking Redis), ``writethrough.fill``,
``writethrough.lock`` and ``writethrough.publish``, each with ``writethrough.model``,
``db.system.name = redis`` and what it found (``writethrough.result``: hit, miss, locked...).
They are the library's own: its commands bypass ``Redis.execute_command``, so redis-py's
instrumentation sees them only if it was installed before the cache was built (see
docs/operations.md). A cache that was never instrumented pays one attribute check per
operation, and none of OpenTelemetry's cost.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation

from . import __version__
from .stats import CacheStats

if TYPE_CHECKING:
    from .cache import WriteThroughCache

_SCOPE = "sqlalchemy_writethrough"

#: per-model counters: (ModelStats attribute, instrument name, description)
_MODEL_COUNTERS = (
    ("hits", "writethrough.hits", "Primary-key loads served from Redis"),
    ("near_hits", "writethrough.near_hits", "Of the hits, those served from the near cache"),
    ("misses", "writethrough.misses", "Primary-key loads that went to the database"),
    ("fills", "writethrough.fills", "Rows written to Redis after a miss"),
    ("fills_refused", "writethrough.fills_refused", "Fills refused: a writer took the key"),
    ("locked_reads", "writethrough.locked_reads", "Reads that found a writer's lock"),
    ("bypasses", "writethrough.bypasses", "Loads sent to the database without asking Redis"),
    ("decode_errors", "writethrough.decode_errors", "Entries that could not be decoded"),
    ("writes", "writethrough.written_rows", "Rows committed transactions wrote"),
    ("publishes", "writethrough.publishes", "Rows written to Redis after a commit"),
    ("restores", "writethrough.restores", "Previous values put back by a rollback"),
)
_COUNTERS = (
    ("commits", "writethrough.commits", "Committed transactions that changed cached rows"),
    ("rollbacks", "writethrough.rollbacks", "Transactions that changed cached rows, rolled back"),
    ("commit_failures", "writethrough.commit_failures", "commit() calls the database refused"),
    (
        "cache_write_failures",
        "writethrough.cache_write_failures",
        "Transactions whose Redis writes did not complete",
    ),
    ("lock_failures", "writethrough.lock_failures", "Flushes whose locks could not be taken"),
    ("breaker_openings", "writethrough.breaker.openings", "Times the circuit breaker opened"),
    (
        "background_overflows",
        "writethrough.publish.overflows",
        "Publishes run by the committer because the background queue was full",
    ),
    ("epochs", "writethrough.epochs", "Times Redis was found in a new epoch"),
    (
        "registries_made_whole",
        "writethrough.registries_made_whole",
        "Times a forgotten keyspace registry was made whole",
    ),
)
_LATENCIES = (
    ("read_latency", "writethrough.read.duration", "Cached reads: Redis and decoding"),
    ("commit_cache_latency", "writethrough.commit.cache_duration", "The cache's share of a commit"),
    ("commit_latency", "writethrough.commit.duration", "Whole commit() calls"),
)


class _Snapshot:
    """One stats snapshot shared by every callback of one collection (a collection calls
    each callback in turn: without this, each would take its own snapshot)."""

    def __init__(self, cache: WriteThroughCache) -> None:
        self._cache = cache
        self._lock = threading.Lock()
        self._taken = 0.0
        self._stats: CacheStats | None = None

    def get(self) -> CacheStats:
        with self._lock:
            now = time.monotonic()
            if self._stats is None or now - self._taken > 0.5:
                self._stats = self._cache.stats()
                self._taken = now
            return self._stats


def instrument(
    cache: WriteThroughCache,
    *,
    meter_provider: metrics.MeterProvider | None = None,
    tracer_provider: trace.TracerProvider | None = None,
    spans: bool = True,
) -> None:
    """Export ``cache``'s stats as OpenTelemetry metrics, and (``spans``) emit its spans."""
    meter = metrics.get_meter(_SCOPE, __version__, meter_provider=meter_provider)
    snapshot = _Snapshot(cache)
    base = {"writethrough.prefix": cache.prefix}

    def per_model(attr: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            stats = snapshot.get()
            return [
                Observation(getattr(m, attr), {**base, "writethrough.model": name})
                for name, m in stats.models.items()
            ]

        return observe

    def total(attr: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(getattr(snapshot.get(), attr), base)]

        return observe

    def invalidations(options: CallbackOptions) -> Iterable[Observation]:
        stats = snapshot.get()
        found = []
        for name, m in stats.models.items():
            for reason, n in m.invalidations_by_reason.items():
                found.append(
                    Observation(
                        n, {**base, "writethrough.model": name, "writethrough.reason": reason}
                    )
                )
        for reason, n in stats.invalidations_by_reason.items():
            rest = n - sum(m.invalidations_by_reason.get(reason, 0) for m in stats.models.values())
            if rest > 0:
                found.append(Observation(rest, {**base, "writethrough.reason": reason}))
        return found

    def errors(options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(n, {**base, "error.type": kind})
            for kind, n in snapshot.get().errors_by_kind.items()
        ]

    def latency(attr: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def observe(options: CallbackOptions) -> Iterable[Observation]:
            lat = getattr(snapshot.get(), attr)
            found = []
            for q in (0.5, 0.95, 0.99):
                value = lat.percentile(q)
                if value is not None:
                    found.append(Observation(value, {**base, "quantile": q}))
            return found

        return observe

    for attr, name, doc in _MODEL_COUNTERS:
        meter.create_observable_counter(name, [per_model(attr)], unit="1", description=doc)
    for attr, name, doc in _COUNTERS:
        meter.create_observable_counter(name, [total(attr)], unit="1", description=doc)
    meter.create_observable_counter(
        "writethrough.invalidations",
        [invalidations],
        unit="1",
        description="Entries (or whole models) left as a miss, by reason",
    )
    meter.create_observable_counter(
        "writethrough.redis.errors", [errors], unit="1", description="Failed Redis calls by kind"
    )
    meter.create_observable_gauge(
        "writethrough.breaker.open",
        [lambda o: [Observation(int(snapshot.get().breaker_open), base)]],
        unit="1",
        description="1 while the circuit breaker is open",
    )
    meter.create_observable_gauge(
        "writethrough.journal.size",
        [lambda o: [Observation(snapshot.get().journal_size, base)]],
        unit="1",
        description="Keys journaled while Redis could not be locked",
    )
    meter.create_observable_gauge(
        "writethrough.publish.pending",
        [lambda o: [Observation(snapshot.get().pending_publishes, base)]],
        unit="1",
        description="Background publishes not written to Redis yet",
    )
    for attr, name, doc in _LATENCIES:
        meter.create_observable_gauge(name, [latency(attr)], unit="s", description=doc)
    if spans:
        cache._tracer = trace.get_tracer(_SCOPE, __version__, tracer_provider=tracer_provider)


def span_attributes(model: str, **extra: Any) -> dict[str, Any]:
    return {"writethrough.model": model, "db.system.name": "redis", **extra}
