"""A commit's counters taken in one call (round 7 of issue #15): the same stats as the calls
they replace."""

from __future__ import annotations

from sqlalchemy_writethrough.stats import Counters


def test_committed_counts_as_add_and_observe_did() -> None:
    one, other = Counters(), Counters()
    one.add("writes", 2, "Item")
    one.add("publishes", 1, "Item")
    one.invalidated("inexact", 1, "Item")
    one.add("commits")
    one.observe("commit_cache", 0.0004)
    one.observe("commit", 0.002)
    other.committed(
        [(("Item", "writes"), 2), (("Item", "publishes"), 1), (("Item", "invalidated:inexact"), 1)],
        0.0004,
        0.002,
    )
    assert other.raw() == one.raw()
    assert other.snapshot() == one.snapshot()


def test_committed_without_a_commit_latency() -> None:
    counters = Counters()
    counters.committed([], 0.001, None)
    stats = counters.snapshot()
    assert stats.commits == 1
    assert stats.commit_cache_latency.count == 1
    assert stats.commit_latency.count == 0


def test_add_many() -> None:
    one, other = Counters(), Counters()
    one.add("writes", 3, "A")
    one.add("writes", 1, "B")
    other.add_many([(("A", "writes"), 3), (("B", "writes"), 1)])
    assert other.raw() == one.raw()
