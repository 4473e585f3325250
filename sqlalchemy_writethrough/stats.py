"""Counters and latency histograms, so that what the cache did is observable (``cache.stats()``).

Counting is always on, so it has to be cheap: one dictionary increment under a lock per event
(the same lock for every counter: events are rare next to the Redis round trip they describe),
and for latencies one ``bisect`` into a fixed table of bucket bounds. No samples are kept: a
percentile is read from the bucket counts, to within one bucket (a ratio of 10**0.1, 26%, from
bound to bound; interpolated inside the bucket).

Counts are kept per model (its hierarchy's base class name) and summed into the totals when a
snapshot is taken. The snapshot types (:class:`CacheStats`, :class:`ModelStats`,
:class:`Latency`) are plain frozen dataclasses: the same values the command-line tool shows
for every process at once (:mod:`.shared`), and the exporters publish.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import threading
from collections.abc import Iterable, Mapping
from typing import Literal

from . import forks

#: upper bounds of the latency buckets, in seconds: 1 µs to 100 s, ten per decade
BOUNDS: tuple[float, ...] = tuple(1e-6 * 10 ** (k / 10) for k in range(81))
#: histogram names: a cached read (its Redis round trips and decoding); the cache's share of
#: a committed transaction (its locks and its publish); the whole ``commit()`` call
HISTOGRAMS = ("read", "commit_cache", "commit")

#: reasons an entry (or a whole model) was left as a miss instead of holding a value
INVALIDATION_REASONS = (
    "delete",  # a committed transaction deleted the row (or changed its primary key)
    "inexact",  # a committed row had a column whose stored value is not known exactly
    "strategy",  # the model's strategy is "invalidate"
    "statement",  # bulk DML, Core or raw SQL changed rows named by key
    "model",  # every row of a model: range DML, raw SQL, cascades, migrations, invalidate(Model)
    "contended",  # another writer or an invalidation overlapped the transaction
    "rollback",  # a rollback could not restore the previous value
    "manual",  # cache.invalidate(Model, pk)
    "journal",  # keys journaled while Redis could not be locked, replayed
    "epoch",  # Redis started a new epoch (restarted, failed over, flushed)
    "unregistered",  # Redis refused to record the model's keyspace in the registry
)

#: read:write ratio above which a model is worth writing through (the pattern's rule of thumb)
WRITE_THROUGH_RATIO = 10.0
#: below this many primary-key reads and written rows of a model, no recommendation is made
MIN_EVENTS = 100

Strategy = Literal["write-through", "invalidate", "do not cache", "not enough data"]


@dataclasses.dataclass(frozen=True)
class Latency:
    """A latency distribution, from fixed buckets (:data:`BOUNDS`)."""

    count: int = 0
    #: total seconds
    total: float = 0.0
    #: events per bucket: ``buckets[i]`` counts latencies up to ``BOUNDS[i]`` (and above
    #: ``BOUNDS[i - 1]``); the last one, those above ``BOUNDS[-1]``
    buckets: tuple[int, ...] = ()

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    def percentile(self, q: float) -> float | None:
        """The latency below which a fraction ``q`` (0 to 1) of the events fell, in seconds;
        None when nothing was measured."""
        if not self.count:
            return None
        rank = q * self.count
        seen = 0
        for i, n in enumerate(self.buckets):
            if n and seen + n >= rank:
                if i >= len(BOUNDS):
                    return BOUNDS[-1]
                upper = BOUNDS[i]
                lower = BOUNDS[i - 1] if i else upper / 10**0.1
                fraction = max(0.0, min(1.0, (rank - seen) / n))
                return float(lower * (upper / lower) ** fraction)
            seen += n
        return BOUNDS[-1]

    @property
    def p50(self) -> float | None:
        return self.percentile(0.50)

    @property
    def p95(self) -> float | None:
        return self.percentile(0.95)

    @property
    def p99(self) -> float | None:
        return self.percentile(0.99)


@dataclasses.dataclass(frozen=True)
class Recommendation:
    """What the measured traffic of a model suggests: the pattern's decision rule (a
    read:write ratio above 10:1 points to write-through, a lower one to invalidating on
    write, fewer reads than writes to not caching the model at all)."""

    strategy: Strategy
    reason: str

    def __str__(self) -> str:
        return f"{self.strategy}: {self.reason}"


@dataclasses.dataclass(frozen=True)
class ModelStats:
    """What the cache did for one model (a hierarchy counts under its base class)."""

    model: str
    hits: int = 0
    misses: int = 0
    #: of the hits, those served from the near cache (process memory)
    near_hits: int = 0
    fills: int = 0
    fills_refused: int = 0
    #: reads that found the entry locked by a writer (they went to the database)
    locked_reads: int = 0
    bypasses: int = 0
    decode_errors: int = 0
    #: rows committed transactions wrote (published or left as a miss)
    writes: int = 0
    publishes: int = 0
    #: entries (or, for "model", whole models) left as a miss, by reason
    invalidations_by_reason: Mapping[str, int] = dataclasses.field(default_factory=dict)
    restores: int = 0

    @property
    def invalidations(self) -> int:
        return sum(self.invalidations_by_reason.values())

    @property
    def reads(self) -> int:
        """Primary-key loads that asked Redis."""
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float | None:
        return self.hits / self.reads if self.reads else None

    @property
    def read_write_ratio(self) -> float | None:
        """Reads per written row (infinite when reads were made and nothing was written)."""
        if self.writes:
            return self.reads / self.writes
        return math.inf if self.reads else None

    def recommendation(self) -> Recommendation:
        return recommend(self.reads, self.writes)


@dataclasses.dataclass(frozen=True)
class CacheStats:
    """A snapshot of the counters since the cache was created (or ``stats(reset=True)``), in
    total (the attributes) and per model (:attr:`models`)."""

    hits: int = 0
    """primary-key loads served from Redis (or from the near cache: ``near_hits``)"""
    misses: int = 0
    """primary-key loads that went to the database"""
    near_hits: int = 0
    """of the hits, those served from the near cache (process memory, ``near_cache=``)"""
    fills: int = 0
    """rows written to Redis after a miss"""
    fills_refused: int = 0
    """fills refused because a writer or an invalidation took the key meanwhile"""
    locked_reads: int = 0
    """reads that found the entry locked by a writer (served by the database)"""
    publishes: int = 0
    """rows written to Redis after a commit"""
    invalidations: int = 0
    """entries left as a miss after a commit, rollback or invalidate() instead of a value
    (a whole model counts once)"""
    restores: int = 0
    """previous values put back by a rollback"""
    bypasses: int = 0
    """primary-key loads sent to the database without asking Redis (options, locks, types)"""
    errors: int = 0
    """Redis calls that failed (connection, timeout, server error) or were skipped by the breaker"""
    decode_errors: int = 0
    """entries that could not be decoded (garbage, another version): served as a miss"""
    lock_failures: int = 0
    """flushes whose locks could not be taken (journaled in degrade mode, raised in strict)"""
    epochs: int = 0
    """times this process found Redis in a new epoch (restarted, failed over, flushed,
    replaced): every entry written before it was invalidated"""
    registries_made_whole: int = 0
    """times this process found the keyspace registry forgotten while entries stayed (evicted
    under an ``allkeys-*`` policy, deleted) and replaced the buckets made before it"""
    commits: int = 0
    """committed transactions that changed cached rows"""
    rollbacks: int = 0
    """transactions that changed cached rows and ended without a commit"""
    commit_failures: int = 0
    """of those, the ones whose ``commit()`` was called and failed (the database refused)"""
    cache_write_failures: int = 0
    """transactions whose locks, publish or restore Redis did not complete (their entries
    became misses: never stale, but not written through either)"""
    breaker_openings: int = 0
    """times the circuit breaker opened"""
    breaker_open: bool = False
    """whether the circuit breaker is open now (every operation goes to the database)"""
    journal_size: int = 0
    """keys (and buckets) journaled while Redis could not be locked, not yet invalidated"""
    pending_publishes: int = 0
    """``publish="background"``: ended transactions whose publish (or restore) the background
    worker has not written yet; their entries are locked (misses) meanwhile"""
    background_overflows: int = 0
    """``publish="background"``: publishes run by the committing caller because the background
    queue was full"""
    invalidations_by_reason: Mapping[str, int] = dataclasses.field(default_factory=dict)
    errors_by_kind: Mapping[str, int] = dataclasses.field(default_factory=dict)
    """Redis errors by exception class (``TimeoutError``, ``ConnectionError``, ``breaker``...)"""
    read_latency: Latency = Latency()
    """cached primary-key reads: the Redis round trips and the decoding (not the database)"""
    commit_cache_latency: Latency = Latency()
    """the cache's share of a committed transaction: its locks and its publish (its locks only
    with ``publish="background"``: the publish is the worker's)"""
    commit_latency: Latency = Latency()
    """whole ``commit()`` calls of transactions that changed cached rows"""
    models: Mapping[str, ModelStats] = dataclasses.field(default_factory=dict)
    """per model, by the name of its (hierarchy's base) class"""

    @property
    def hit_rate(self) -> float | None:
        reads = self.hits + self.misses
        return self.hits / reads if reads else None

    @property
    def cache_write_success_rate(self) -> float | None:
        """Of the transactions that changed cached rows, the share whose Redis writes (locks,
        publish or restore) all succeeded."""
        ended = self.commits + self.rollbacks
        return (ended - self.cache_write_failures) / ended if ended else None

    @property
    def database_write_success_rate(self) -> float | None:
        """Of the ``commit()`` calls of transactions that changed cached rows, the share the
        database accepted."""
        tried = self.commits + self.commit_failures
        return self.commits / tried if tried else None

    @property
    def rollback_frequency(self) -> float | None:
        """Of the transactions that changed cached rows, the share that rolled back."""
        ended = self.commits + self.rollbacks
        return self.rollbacks / ended if ended else None

    def recommendations(self) -> dict[str, Recommendation]:
        """A strategy per model, from what was measured (see :class:`Recommendation`)."""
        return {name: m.recommendation() for name, m in self.models.items()}


def recommend(reads: int, writes: int) -> Recommendation:
    """The pattern's decision rule, applied to a model's measured reads and written rows."""
    if reads + writes < MIN_EVENTS:
        return Recommendation(
            "not enough data", f"{reads} reads and {writes} writes so far (fewer than {MIN_EVENTS})"
        )
    if not writes:
        return Recommendation("write-through", f"{reads} reads and no writes")
    ratio = reads / writes
    text = f"read:write {ratio:.1f}:1"
    if ratio >= WRITE_THROUGH_RATIO:
        return Recommendation("write-through", f"{text}, above {WRITE_THROUGH_RATIO:g}:1")
    if ratio >= 1:
        return Recommendation(
            "invalidate",
            f"{text}, below {WRITE_THROUGH_RATIO:g}:1: writing each change through costs "
            "more than the misses it saves",
        )
    return Recommendation(
        "do not cache", f"{text}: more writes than reads, the cache saves less than it costs"
    )


#: counter names a snapshot sums over the models into CacheStats attributes
_MODEL_FIELDS = tuple(
    f.name for f in dataclasses.fields(ModelStats) if f.type in ("int", int) and f.name != "model"
)
_TOTAL_FIELDS = tuple(
    f.name for f in dataclasses.fields(CacheStats) if f.type in ("int", int) and f.name != "model"
)
NBUCKETS = len(BOUNDS) + 1
_COMMITS = ("", "commits")


def _add_all(
    got: dict[tuple[str, str], int], counts: Iterable[tuple[tuple[str, str], int]]
) -> None:
    """``counts`` added into ``got`` (the caller holds the counters' lock)."""
    for key, n in counts:
        got[key] = got.get(key, 0) + n


class Counters:
    """The live counters of one cache. ``add`` and ``observe`` are the only calls on hot paths.

    Keys are ``(model, name)``, ``model`` being ``""`` for what concerns no model (errors,
    epochs); ``invalidated:<reason>`` and ``error:<kind>`` names carry a reason or a kind.
    """

    __slots__ = ("__weakref__", "_counts", "_hist", "_lock", "_sums")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        forks.renew_in_child(self, "_lock")
        self._counts: dict[tuple[str, str], int] = {}
        self._hist = {name: [0] * NBUCKETS for name in HISTOGRAMS}
        self._sums = dict.fromkeys(HISTOGRAMS, 0.0)

    def add(self, name: str, n: int = 1, model: str = "") -> None:
        if not n:
            return
        key = (model, name)
        with self._lock:
            counts = self._counts
            counts[key] = counts.get(key, 0) + n

    def invalidated(self, reason: str, n: int = 1, model: str = "") -> None:
        """``n`` entries (or one whole model, for ``"model"``) left as a miss, for ``reason``."""
        self.add("invalidated:" + reason, n, model)

    def error(self, kind: str) -> None:
        """A failed (or skipped) Redis call, by exception class name."""
        key = ("", "error:" + kind)
        with self._lock:
            counts = self._counts
            counts[key] = counts.get(key, 0) + 1
            counts[("", "errors")] = counts.get(("", "errors"), 0) + 1

    def observe(self, histogram: str, seconds: float) -> None:
        i = bisect.bisect_left(BOUNDS, seconds)
        with self._lock:
            self._hist[histogram][i] += 1
            self._sums[histogram] += seconds

    def observe_read(
        self, seconds: float, model: str = "", hits: int = 0, near_hits: int = 0
    ) -> None:
        """``observe("read", seconds)`` and the read's hits (of them, near-cache hits) under
        one lock: a cached get's whole accounting in one call."""
        i = bisect.bisect_left(BOUNDS, seconds)
        with self._lock:
            self._hist["read"][i] += 1
            self._sums["read"] += seconds
            if hits:
                counts = self._counts
                key = (model, "hits")
                counts[key] = counts.get(key, 0) + hits
                if near_hits:
                    key = (model, "near_hits")
                    counts[key] = counts.get(key, 0) + near_hits

    def add_many(self, counts: Iterable[tuple[tuple[str, str], int]]) -> None:
        """Several ``add`` calls (``((model, name), n)`` each) under one lock."""
        with self._lock:
            _add_all(self._counts, counts)

    def committed(
        self,
        counts: Iterable[tuple[tuple[str, str], int]],
        cache_seconds: float,
        commit_seconds: float | None,
    ) -> None:
        """A commit's whole accounting under one lock: ``commits``, its ``commit_cache`` and
        (unless None) ``commit`` latencies, and the publish's ``counts`` (as :meth:`add_many`)."""
        i = bisect.bisect_left(BOUNDS, cache_seconds)
        j = -1 if commit_seconds is None else bisect.bisect_left(BOUNDS, commit_seconds)
        with self._lock:
            got = self._counts
            if counts:
                _add_all(got, counts)
            got[_COMMITS] = got.get(_COMMITS, 0) + 1
            self._hist["commit_cache"][i] += 1
            self._sums["commit_cache"] += cache_seconds
            if commit_seconds is not None:
                self._hist["commit"][j] += 1
                self._sums["commit"] += commit_seconds

    def raw(
        self, reset: bool = False
    ) -> tuple[dict[tuple[str, str], int], dict[str, list[int]], dict[str, float]]:
        """Copies of (counts, histogram buckets, histogram sums); ``reset`` zeroes them."""
        with self._lock:
            counts = dict(self._counts)
            hist = {name: list(b) for name, b in self._hist.items()}
            sums = dict(self._sums)
            if reset:
                self._counts = {}
                self._hist = {name: [0] * NBUCKETS for name in HISTOGRAMS}
                self._sums = dict.fromkeys(HISTOGRAMS, 0.0)
        return counts, hist, sums

    def snapshot(
        self,
        reset: bool = False,
        *,
        breaker_open: bool = False,
        journal_size: int = 0,
        pending_publishes: int = 0,
    ) -> CacheStats:
        counts, hist, sums = self.raw(reset)
        return build_stats(
            counts.items(),
            hist,
            sums,
            breaker_open=breaker_open,
            journal_size=journal_size,
            pending_publishes=pending_publishes,
        )


def build_stats(
    counts: Iterable[tuple[tuple[str, str], int]],
    hist: Mapping[str, list[int]],
    sums: Mapping[str, float],
    *,
    breaker_open: bool = False,
    journal_size: int = 0,
    pending_publishes: int = 0,
) -> CacheStats:
    """A :class:`CacheStats` of raw counts: this process's, or every process's (:mod:`.shared`)."""
    per_model: dict[str, dict[str, int]] = {}
    reasons: dict[str, dict[str, int]] = {}
    totals: dict[str, int] = {}
    total_reasons: dict[str, int] = {}
    errors_by_kind: dict[str, int] = {}
    for (model, name), n in counts:
        if name.startswith("invalidated:"):
            reason = name[12:]
            total_reasons[reason] = total_reasons.get(reason, 0) + n
            totals["invalidations"] = totals.get("invalidations", 0) + n
            if model:
                by = reasons.setdefault(model, {})
                by[reason] = by.get(reason, 0) + n
            continue
        if name.startswith("error:"):
            errors_by_kind[name[6:]] = errors_by_kind.get(name[6:], 0) + n
            continue
        if name in _TOTAL_FIELDS:
            totals[name] = totals.get(name, 0) + n
        if model and name in _MODEL_FIELDS:
            fields = per_model.setdefault(model, {})
            fields[name] = fields.get(name, 0) + n
    models = {
        model: ModelStats(model=model, invalidations_by_reason=reasons.get(model, {}), **fields)
        for model, fields in sorted(per_model.items())
    }
    for model in sorted(set(reasons) - set(models)):
        models[model] = ModelStats(model=model, invalidations_by_reason=reasons[model])

    def latency(name: str) -> Latency:
        buckets = tuple(hist.get(name) or ())
        count = sum(buckets)
        if not count:
            return Latency()  # equal to a fresh CacheStats()'s
        return Latency(count, float(sums.get(name, 0.0)), buckets)

    return CacheStats(
        **totals,
        breaker_open=breaker_open,
        journal_size=journal_size,
        pending_publishes=pending_publishes,
        invalidations_by_reason=dict(sorted(total_reasons.items())),
        errors_by_kind=dict(sorted(errors_by_kind.items())),
        read_latency=latency("read"),
        commit_cache_latency=latency("commit_cache"),
        commit_latency=latency("commit"),
        models=models,
    )
