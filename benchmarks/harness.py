"""Interleaved timing: every compared variant runs once per round, in a shuffled order.

A *variant* is one row of the results table: a function ``op(i) -> nanoseconds`` that performs
the operation for iteration ``i`` and returns how long the measured part took (measured with
``time.perf_counter_ns`` inside the op, so setup that is not part of the operation, such as
loading the rows a commit then changes, stays out of the number). A *group* is a set of variants
that are compared with one another; the variants of a group are run round-robin (each round
runs every variant once, in an order shuffled with a fixed seed), so slow drifts of the machine
(CPU frequency, other load, PostgreSQL checkpoints) hit every variant alike instead of whichever
happened to run last. Warm-up rounds run the same way and are discarded.

Sample ``i`` of every variant of a group was taken in round ``i`` (a variant that fails stops
being measured and reports no numbers), so two rows of a group are *paired* round by round.
How sure a ratio of two rows is comes from that pairing: the rounds are cut into ``BLOCKS``
consecutive blocks, each block gives its own ratio (of the two rows' medians over the same
rounds), and the report shows the median of those block ratios with their 10th-90th
percentile (:func:`paired_spread`). A run disturbed for part of its time shows as blocks that
disagree; the spread of one row's block medians (:meth:`Variant.block_spread`) shows it for
the floor.
"""

from __future__ import annotations

import gc
import math
import os
import random
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Op = Callable[[int], int]

#: how many consecutive blocks the measured rounds of a group are cut into (fewer when a group
#: has fewer rounds: at least one round per block)
BLOCKS = 10


def block_slices(n: int, blocks: int = BLOCKS) -> list[slice]:
    """``min(blocks, n)`` consecutive slices of ``range(n)`` of (nearly) equal sizes."""
    k = max(1, min(blocks, n))
    return [slice(round(i * n / k), round((i + 1) * n / k)) for i in range(k)]


def percentile(ordered: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of sorted values, linear between the nearest ranks."""
    if not ordered:
        raise ValueError("no values")
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class Spread:
    """The median of per-block values and their 10th and 90th percentiles."""

    value: float
    low: float
    high: float
    blocks: int
    """how many blocks the values come from"""

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        ordered = sorted(values)
        return cls(
            value=float(statistics.median(ordered)),
            low=percentile(ordered, 0.1),
            high=percentile(ordered, 0.9),
            blocks=len(ordered),
        )


def paired_spread(
    num: list[int], den: list[int], fn: Callable[[float, float], float] = lambda a, b: a / b
) -> Spread | None:
    """``fn(median of num, median of den)`` per block of the rounds both rows ran, as a Spread.

    ``num[i]`` and ``den[i]`` were measured in the same round, so each block compares the two
    rows over the same stretch of time. None when there is no common round or a block's
    denominator median is 0.
    """
    n = min(len(num), len(den))
    if n == 0:
        return None
    values = []
    for part in block_slices(n):
        a = float(statistics.median(num[part]))
        b = float(statistics.median(den[part]))
        if b == 0:
            return None
        values.append(fn(a, b))
    return Spread.of(values)


@dataclass
class Variant:
    """One row of the results: an operation done one way (ours, a peer, the database...)."""

    key: str
    """stable identifier, e.g. ``get.cached``; ratios refer to rows by key"""
    label: str
    """what the results table calls the row"""
    who: str
    """``floor``, ``postgresql``, ``ours`` or a peer's name"""
    op: Op | None
    """None: the row cannot be run (``note`` says why)"""
    note: str = ""
    samples: list[int] = field(default_factory=list)
    error: str | None = None
    metrics: dict[str, list[float]] = field(default_factory=dict)
    """per-operation extra numbers (e.g. Redis round trips per commit)"""
    check: Callable[[], str | None] | None = None
    """run once after warm-up: returns a note when the variant did not do what it claims"""

    @property
    def ran(self) -> bool:
        return self.op is not None and self.error is None and bool(self.samples)

    def stats(self) -> Stats | None:
        return Stats.of(self.samples) if self.samples and self.error is None else None

    def block_medians(self) -> list[float]:
        """The median of each block of rounds (see :func:`block_slices`), in round order."""
        if not self.samples or self.error is not None:
            return []
        return [float(statistics.median(self.samples[p])) for p in block_slices(len(self.samples))]

    def block_spread(self) -> Spread | None:
        """How much this row's median moved between blocks of rounds (None: did not run)."""
        medians = self.block_medians()
        return Spread.of(medians) if medians else None

    def metric_mean(self, name: str) -> float | None:
        values = self.metrics.get(name)
        return statistics.fmean(values) if values else None


@dataclass(frozen=True)
class Stats:
    n: int
    median_ns: float
    p99_ns: float
    min_ns: float
    mean_ns: float

    @classmethod
    def of(cls, samples: list[int]) -> Stats:
        ordered = sorted(samples)
        n = len(ordered)
        rank = max(1, math.ceil(0.99 * n))  # nearest-rank p99
        return cls(
            n=n,
            median_ns=float(statistics.median(ordered)),
            p99_ns=float(ordered[rank - 1]),
            min_ns=float(ordered[0]),
            mean_ns=statistics.fmean(ordered),
        )


@dataclass
class Group:
    """Variants compared with one another, run interleaved."""

    key: str
    title: str
    variants: list[Variant]
    iterations: int
    warmup: int
    description: str = ""
    elapsed_s: float = 0.0
    load_before: tuple[float, ...] | None = None
    """``os.getloadavg()`` when the group started (None: unknown)"""
    load_after: tuple[float, ...] | None = None
    """``os.getloadavg()`` when the group ended"""

    def find(self, key: str) -> Variant | None:
        for variant in self.variants:
            if variant.key == key:
                return variant
        return None


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > 160:
        first = first[:157] + "..."
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def run_group(group: Group, seed: int = 1234, log: Callable[[str], None] = print) -> None:
    """Warm up, then measure every runnable variant of ``group``, round-robin."""
    rng = random.Random(seed)
    group.load_before = load_average()
    active = [v for v in group.variants if v.op is not None]
    started = time.perf_counter()
    gc.collect()

    def one_round(index: int, measure: bool) -> None:
        order = active[:]
        rng.shuffle(order)
        for variant in order:
            if variant.error is not None:
                continue
            assert variant.op is not None
            try:
                elapsed = variant.op(index)
            except Exception as exc:  # a broken row (say, a peer's) must not stop the run
                variant.error = _describe(exc)
                log(f"  ! {variant.label}: {variant.error}")
                if variant.who in ("floor", "postgresql", "ours"):
                    traceback.print_exc(limit=8)  # ours: the library or the suite is broken
                continue
            if measure:
                variant.samples.append(elapsed)

    # Warm-up indices come after the measured ones, so both see the same kind of inputs.
    for i in range(group.warmup):
        one_round(group.iterations + i, measure=False)
    for variant in active:
        if variant.error is None and variant.check is not None:
            try:
                problem = variant.check()
            except Exception as exc:
                problem = f"check failed: {_describe(exc)}"
            if problem:
                variant.note = f"{variant.note}; {problem}" if variant.note else problem
    for variant in active:  # warm-up metrics are not reported
        variant.metrics.clear()
    gc.collect()
    for i in range(group.iterations):
        one_round(i, measure=True)
    group.elapsed_s = time.perf_counter() - started
    group.load_after = load_average()


def load_average() -> tuple[float, ...] | None:
    """The 1, 5 and 15 minute load averages, or None where the system does not say."""
    try:
        return tuple(os.getloadavg())
    except (AttributeError, OSError):
        return None


def timed(fn: Callable[[], Any]) -> int:
    """Run ``fn`` and return its duration in nanoseconds."""
    t0 = time.perf_counter_ns()
    fn()
    return time.perf_counter_ns() - t0
