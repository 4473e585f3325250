"""The stress checker can fail: synthetic histories with a known defect are each reported.

The stress run (``python -m stress``, ``tests/test_stress_short.py``) is only as good as its
checker: a checker that never fails proves nothing. Each test here feeds ``stress.checker.check``
a hand-written history, and asserts the defect it contains is found (and, for the clean and the
excused cases, that nothing is reported).
"""

from __future__ import annotations

import sys
import zlib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stress.checker import check, unversioned, versioned
from stress.models import ITEM_TABLE, SHADOWS, TAG_BITS, stored_value

MS = 1_000_000  # nanoseconds


def v(seq: int, tag: int = 7) -> int:
    """A counter value with sequence number ``seq``."""
    return (seq << TAG_BITS) | tag


def commit(
    tx: str,
    id_: int,
    value: int | None,
    start: int,
    end: int,
    outcome: str = "ok",
    lf: int = 0,
    w: str = "w",
) -> list[dict[str, Any]]:
    return [
        {"e": "cstart", "tx": tx, "writes": [[ITEM_TABLE, id_, value]], "t": start * MS, "w": w},
        {"e": "cend", "tx": tx, "outcome": outcome, "t": end * MS, "lf": lf, "w": w},
    ]


def read(
    id_: int,
    value: int | None,
    t0: int,
    t1: int,
    src: str = "cache",
    iso: str = "READ COMMITTED",
    tx: int | None = None,
    w: str = "r",
) -> dict[str, Any]:
    return {
        "e": "read",
        "tb": ITEM_TABLE,
        "id": id_,
        "v": value,
        "src": src,
        "t0": t0 * MS,
        "t1": t1 * MS,
        "iso": iso,
        "tx": None if tx is None else tx * MS,
        "w": w,
    }


def history() -> list[dict[str, Any]]:
    """Row 1: v1 committed during [0, 1] ms, v2 during [10, 20] ms."""
    return commit("seed", 1, v(1), 0, 1) + commit("w:1", 1, v(2), 10, 20)


DB = {(ITEM_TABLE, 1): {"id": 1, "counter": v(2), "parent_id": 1}}


def test_a_clean_history_passes() -> None:
    """Reads of the old value before the commit completed, and of the new one after it began,
    are consistent; a cache holding the database row is not divergent."""
    events = [
        *history(),
        read(1, v(1), 5, 6),
        read(1, v(1), 15, 16),  # overlaps the commit: either value is fine
        read(1, v(2), 15, 16),
        read(1, v(2), 25, 26),
    ]
    report = check(events, DB, {(ITEM_TABLE, 1): {"id": 1, "counter": v(2), "parent_id": 1}})
    assert report.ok, report.format()
    assert report.reads["cache"] == 4
    assert report.cache_share == 1.0


def test_a_stale_read_is_reported() -> None:
    """A read that began after v2's commit completed and returned v1 is stale."""
    report = check([*history(), read(1, v(1), 25, 26)], DB, {})
    assert len(report.stale) == 1, report.format()
    assert report.stale[0].row == (ITEM_TABLE, 1)
    assert not report.ok


def test_a_read_of_a_value_nobody_committed_is_reported() -> None:
    """A value no commit wrote (here: one that was rolled back) is an uncommitted read."""
    events = [
        *history(),
        {"e": "aborted", "writes": [[ITEM_TABLE, 1, v(3, tag=99)]], "w": "w"},
        read(1, v(3, tag=99), 30, 31),
    ]
    report = check(events, DB, {})
    assert len(report.uncommitted) == 1, report.format()
    assert "rolled-back" in report.uncommitted[0].detail


def test_a_read_of_a_failed_commit_is_reported() -> None:
    events = [*history(), *commit("w:2", 1, v(3, tag=5), 30, 31, outcome="failed")]
    report = check([*events, read(1, v(3, tag=5), 32, 33)], DB, {})
    assert len(report.uncommitted) == 1, report.format()


def test_a_read_before_the_commit_began_is_reported() -> None:
    """Seeing v2 before its commit even started means it was read uncommitted (at flush)."""
    report = check([*history(), read(1, v(2), 2, 3)], DB, {})
    assert len(report.uncommitted) == 1, report.format()


def test_with_a_rewriting_trigger_reads_are_matched_with_what_was_stored() -> None:
    """``stored``: the database stored another value than each write's (a trigger): a read
    of the stored one is consistent; a read of the one written (a cache writing through what
    the flush sent) was never committed, and an entry holding it is divergent."""
    stored = stored_value(v(2))
    assert stored != v(2) and stored >> TAG_BITS == 2
    db = {(ITEM_TABLE, 1): {"id": 1, "counter": stored, "parent_id": 1}}
    events = [*history(), read(1, stored, 25, 26), read(1, stored_value(v(1)), 5, 6)]
    assert check(events, db, {}, stored=stored_value).ok
    report = check(
        [*history(), read(1, v(2), 25, 26)],
        db,
        {(ITEM_TABLE, 1): {"id": 1, "counter": v(2), "parent_id": 1}},
        stored=stored_value,
    )
    assert len(report.uncommitted) == 1 and len(report.divergent) == 1, report.format()
    # without ``stored``, the same history hides the defect
    assert check([*history(), read(1, v(2), 25, 26)], DB, {}).ok


def test_with_a_sibling_trigger_each_write_of_a_hot_item_writes_its_shadow() -> None:
    """``mirrored``: the trigger writes the same value into the item's shadow row, which no
    worker writes: a read of the shadow's old value after the item's commit completed is
    stale, one of its new value consistent (without ``mirrored`` it would read as a value
    nobody wrote)."""
    for mirror in SHADOWS.values():
        found = mirror(ITEM_TABLE, 1)
        assert found is not None and mirror(*found) is None
        table, shadow = found
        db = {**DB, found: {"id": shadow, "counter": v(2)}}
        fresh = {**read(1, v(2), 25, 26), "tb": table, "id": shadow}
        assert check([*history(), fresh], db, {}, mirrored=mirror).ok
        old = {**read(1, v(1), 25, 26), "tb": table, "id": shadow}
        report = check([*history(), old], db, {}, mirrored=mirror)
        assert len(report.stale) == 1 and report.stale[0].row == found
        assert check([*history(), fresh], db, {}).uncommitted


def test_a_divergent_cache_entry_is_reported() -> None:
    """At quiescence, a VALUE entry that differs from its row (or has no row) is divergent."""
    cache = {
        (ITEM_TABLE, 1): {"id": 1, "counter": v(1), "parent_id": 1},
        (ITEM_TABLE, 5): {"id": 5, "counter": v(1), "parent_id": 1},
        (ITEM_TABLE, 6): None,  # undecodable
    }
    report = check(history(), DB, cache)
    assert sorted(x.row[1] for x in report.divergent) == [1, 5, 6], report.format()


def test_a_killed_writer_counts_as_committed_from_its_kill() -> None:
    """A worker killed after COMMIT (before the publish) committed; from its kill on, the old
    value is stale. Killed before COMMIT, its value was never committed."""
    events = [
        *commit("seed", 1, v(1), 0, 1),
        {"e": "cstart", "tx": "w:1", "writes": [[ITEM_TABLE, 1, v(2)]], "t": 10 * MS, "w": "w"},
        {"e": "kill", "where": "after_commit", "tx": "w:1", "t": 12 * MS, "w": "w"},
        {"e": "cstart", "tx": "x:1", "writes": [[ITEM_TABLE, 1, v(3)]], "t": 20 * MS, "w": "x"},
        {"e": "kill", "where": "after_flush", "tx": "x:1", "t": 21 * MS, "w": "x"},
        read(1, v(1), 15, 16),
        read(1, v(3), 25, 26),
    ]
    report = check(events, DB, {})
    assert len(report.stale) == 1 and len(report.uncommitted) == 1, report.format()


def test_a_maybe_commit_may_be_read_but_never_makes_older_reads_stale() -> None:
    events = [
        *commit("seed", 1, v(1), 0, 1),
        {"e": "cstart", "tx": "w:1", "writes": [[ITEM_TABLE, 1, v(2)]], "t": 10 * MS, "w": "w"},
        read(1, v(2), 15, 16),
        read(1, v(1), 30, 31),
    ]
    report = check(events, DB, {})
    assert report.ok, report.format()
    assert report.commits["maybe"] == 1


def test_deleted_rows() -> None:
    """After a delete completed, reading the row is stale; reading it absent is not."""
    events = [
        *commit("w:0", 9, v(1), 0, 1),
        *commit("w:1", 9, None, 10, 20),
        read(9, None, 25, 26, src="db"),
        read(9, v(1), 25, 26),
        read(9, None, 5, 6, src="db"),  # absent, though the insert had completed: stale
    ]
    report = check(events, {}, {})
    assert len(report.stale) == 2, report.format()


def test_repeatable_read_database_reads_begin_at_their_snapshot() -> None:
    """A database read in a REPEATABLE READ transaction that began before a commit may return
    the older value; a cache read in the same transaction may not (cache reads are as fresh
    as their start: docs/consistency.md, "What is not guaranteed")."""
    rr = "REPEATABLE READ"
    events = [
        *history(),
        read(1, v(1), 25, 26, src="db", iso=rr, tx=5),  # snapshot from 5 ms: fine
        read(1, v(1), 25, 26, src="db", iso=rr, tx=22),  # snapshot after the commit: stale
        read(1, v(1), 25, 26, src="cache", iso=rr, tx=5),  # cache: stale
        read(1, v(1), 25, 26, src="db", iso="READ COMMITTED", tx=5),  # RC: stale
    ]
    report = check(events, DB, {})
    assert len(report.stale) == 3, report.format()


def test_stale_reads_behind_a_writer_that_could_not_lock_are_the_documented_gap() -> None:
    """In degrade mode a writer whose locks failed commits anyway: readers elsewhere may see the
    old value. That is reported apart (the gap docs/consistency.md, "What is not guaranteed", documents), not as a violation."""
    events = [
        *commit("seed", 1, v(1), 0, 1),
        *commit("w:1", 1, v(2), 10, 20, lf=1),
        read(1, v(1), 25, 26),
    ]
    cache = {(ITEM_TABLE, 1): {"id": 1, "counter": v(1), "parent_id": 1}}
    report = check(events, DB, cache)
    assert report.ok, report.format()
    assert len(report.gap) == 2  # the stale read and the stale entry at quiescence
    # its window: the read began 5 ms after the commit it missed had completed
    assert report.gap_window() == (
        "degrade gap: 1 stale reads, started 5 ms (median) / 5 ms (p99) / 5 ms (max) after the "
        "commit they missed completed; 1 stale entries at quiescence"
    )


def test_near_cache_reads_within_the_bound_are_reported_apart_beyond_it_stale() -> None:
    """``--near-cache``: a read from memory may be behind a completed commit by up to the
    bound (measured from that commit's completion to the read's start), never more."""
    events = [
        *history(),  # v2 completed at 20 ms
        read(1, v(1), 25, 26, src="near"),  # 5 ms behind
        read(1, v(1), 50, 51, src="near"),  # 30 ms behind
        read(1, v(2), 60, 61, src="near"),
    ]
    report = check(events, DB, {}, near_bound=10 * MS)
    assert len(report.near) == 1 and len(report.stale) == 1, report.format()
    assert "30.0 ms behind" in report.stale[0].detail
    assert report.reads["near"] == 3
    assert report.near_lag() == (
        "near cache: 3 reads from memory (bound 10 ms); 1 behind a completed commit, started "
        "5.0 ms (median) / 5.0 ms (max) after the first commit they missed completed"
    )
    # without a bound (no near cache in the run) the same reads are all stale
    assert len(check(events, DB, {}).stale) == 2


def test_a_near_read_behind_its_own_process_commit_is_own_commit_whatever_the_bound() -> None:
    """A process reads its own commits at once (docs/consistency.md, "Near cache"): a read
    from memory behind a commit the same worker completed before the read began is a
    violation of its own kind, however little behind; the same read by another worker (or by
    a new incarnation of the same slot: another process, another near cache) is within the
    bound; a read overlapping its own commit, or behind an own commit whose outcome is
    unknown, is not."""
    events = [
        *commit("seed", 1, v(1), 0, 1, w="seeder"),
        *commit("w0.0:1", 1, v(2), 10, 20, w="w0.0"),  # completed at 20 ms
        read(1, v(1), 15, 16, src="near", w="w0.0"),  # during its own commit: fine
        read(1, v(1), 21, 22, src="near", w="w0.0"),  # 1 ms after: own-commit
        read(1, v(1), 21, 22, src="near", w="w1.0"),  # another process: near
        read(1, v(1), 21, 22, src="near", w="w0.1"),  # the slot's next process: near
        read(1, v(2), 23, 24, src="near", w="w0.0"),
        *commit("w0.0:2", 1, v(3), 30, 31, outcome="maybe", w="w0.0"),
        read(1, v(2), 40, 41, src="near", w="w0.0"),  # behind a maybe commit: fine
    ]
    report = check(events, DB, {}, near_bound=10 * MS)
    assert [(x.row[1], x.t) for x in report.own_commit] == [(1, 21 * MS)], report.format()
    assert "its own process had committed" in report.own_commit[0].detail
    assert "(tx w0.0:1)" in report.own_commit[0].detail
    assert len(report.near) == 2 and not report.stale, report.format()
    assert not report.ok and report.violations == 1
    assert report.summary()["own_commit"] == 1
    assert "own-commit=1" in report.format()
    # the reads of w0.0 after its own commit completed: what the promise was checked on
    assert report.near_after_own == 3
    assert "3 of a row their own process had committed before" in report.near_lag()
    # without a bound too (the promise does not depend on it), and for a batch's row
    in_batch = {**read(1, v(1), 21, 22, src="near", w="w0.0"), "batch": 2, "q": "select"}
    unbounded = check([*events[:4], in_batch], DB, {})
    assert len(unbounded.own_commit) == 1 and not unbounded.stale, unbounded.format()
    # a read from Redis behind its own commit stays what it was: stale
    from_redis = check([*events[:4], read(1, v(1), 21, 22, w="w0.0")], DB, {})
    assert len(from_redis.stale) == 1 and not from_redis.own_commit, from_redis.format()


def test_a_near_read_of_a_row_its_own_process_deleted_is_own_commit() -> None:
    events = [
        *commit("w0.0:1", 9, v(1), 0, 1, w="w0.0"),
        *commit("w0.0:2", 9, None, 10, 20, w="w0.0"),
        read(9, v(1), 25, 26, src="near", w="w0.0"),
    ]
    report = check(events, {}, {}, near_bound=1000 * MS)
    assert len(report.own_commit) == 1, report.format()
    assert "committed a delete" in report.own_commit[0].detail


# -- batch reads (IN lists) --------------------------------------------------------------------


def batch(rows: list[tuple[int, int | None, str]], t0: int, t1: int) -> list[dict[str, Any]]:
    """An IN-list read as a worker logs it: one read per id asked for, (id, value, source),
    with the batch's times and size (value None: the id was not in the result)."""
    return [
        {**read(id_, value, t0, t1, src=src), "batch": len(rows), "q": "select"}
        for id_, value, src in rows
    ]


def test_batch_reads_are_checked_row_by_row() -> None:
    """Every row of an IN-list read obeys the single-read rules: a stale row, a row of a value
    nobody committed and an existing row missing from the result are each a violation; an id
    that never existed may be missing, and the other rows of the same batch are fine."""
    events = [
        *history(),  # row 1: v2 completed at 20 ms
        *commit("w:2", 9, v(1), 0, 1),  # row 9 inserted
        *batch([(1, v(2), "cache"), (9, v(1), "db"), (900_000, None, "db")], 25, 26),
        *batch([(1, v(1), "cache"), (9, None, "cache"), (2, v(5), "db")], 30, 31),
    ]
    report = check(events, DB, {})
    assert [v.row[1] for v in report.stale] == [1, 9], report.format()
    assert [v.row[1] for v in report.uncommitted] == [2], report.format()
    assert "IN list of 3" in report.stale[0].detail
    assert report.batch_reads == {"cache": 3, "db": 3} and report.batch_missing == 2
    assert report.batches == 2
    assert report.reads == {"cache": 3, "db": 3}
    assert "batch reads: 6 rows in 2 IN-list reads cache=3 db=3; 2 ids not in the result" in (
        report.format()
    )


def test_only_the_rows_of_a_batch_served_from_memory_get_the_near_cache_bound() -> None:
    """``--near-cache``: in one IN-list read, a row from memory may be behind a completed
    commit by up to the bound; a row of the same batch from Redis may not (its source is
    logged per row)."""
    events = [
        *history(),  # v2 completed at 20 ms
        *commit("seed:2", 2, v(1), 0, 1),
        *commit("w:3", 2, v(2), 10, 20),
        *batch([(1, v(1), "near"), (2, v(1), "cache")], 25, 26),  # both 5 ms behind
        *batch([(1, v(1), "near"), (2, v(2), "near")], 50, 51),  # row 1: 30 ms behind
    ]
    report = check(events, DB, {}, near_bound=10 * MS)
    assert len(report.near) == 1 and report.near[0].row[1] == 1, report.format()
    assert [(v.row[1], v.t) for v in report.stale] == [(2, 25 * MS), (1, 50 * MS)]
    assert "beyond the near cache's bound" in report.stale[1].detail
    assert report.batch_reads == {"near": 3, "cache": 1}


# -- tenants (python -m stress --tenants) ------------------------------------------------------


def in_tenant(tenant: str, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``events`` as a ``--tenants`` run records them: each carries its tenant."""
    return [{**e, "tn": tenant} for e in events]


def tenants_history() -> list[dict[str, Any]]:
    """Row 1 in tenants a and b, each with its own values: a's v(1, tag=1) then v(2, tag=1)
    (committed during [10, 20] ms), b's v(1, tag=2)."""
    return [
        *in_tenant("a", commit("seed-a", 1, v(1, tag=1), 0, 1)),
        *in_tenant("b", commit("seed-b", 1, v(1, tag=2), 0, 1)),
        *in_tenant("a", commit("w:1", 1, v(2, tag=1), 10, 20)),
    ]


def test_each_tenant_is_checked_against_its_own_history() -> None:
    """b's row never changed: its old value is not stale after a's commit, and a's row and b's
    are two rows of the report (and of the final state)."""
    events = [
        *tenants_history(),
        *in_tenant("b", [read(1, v(1, tag=2), 25, 26)]),
        *in_tenant("a", [read(1, v(2, tag=1), 25, 26)]),
    ]
    a_row, b_row = ("a/" + ITEM_TABLE, 1), ("b/" + ITEM_TABLE, 1)
    db = {
        a_row: {"id": 1, "counter": v(2, tag=1), "parent_id": 1},
        b_row: {"id": 1, "counter": v(1, tag=2), "parent_id": 1},
    }
    report = check(events, db, dict(db))
    assert report.ok, report.format()
    assert report.tenant_reads == {"a": 1, "b": 1}
    stale = check([*events, *in_tenant("a", [read(1, v(1, tag=1), 30, 31)])], db, {})
    assert [x.row for x in stale.stale] == [a_row], stale.format()


def test_a_read_of_another_tenants_value_is_cross_tenant() -> None:
    """b reading a's committed value (two tenants sharing an entry) fails the run as its own
    kind, not as stale or uncommitted; so does a value another tenant rolled back."""
    events = [
        *tenants_history(),
        *in_tenant("b", [read(1, v(2, tag=1), 25, 26, src="cache")]),
        *in_tenant("a", [{"e": "aborted", "writes": [[ITEM_TABLE, 1, v(3, tag=9)]], "w": "w"}]),
        *in_tenant("b", [read(1, v(3, tag=9), 30, 31, src="cache")]),
    ]
    report = check(events, {}, {})
    assert len(report.cross_tenant) == 2, report.format()
    assert not report.stale and not report.uncommitted, report.format()
    assert {x.row for x in report.cross_tenant} == {("b/" + ITEM_TABLE, 1)}
    assert "tenant a" in report.cross_tenant[0].detail
    assert not report.ok
    assert report.summary()["cross_tenant"] == 2
    assert "cross-tenant=2" in report.format()


def test_a_value_nobody_wrote_in_any_tenant_is_still_uncommitted() -> None:
    events = [*tenants_history(), *in_tenant("b", [read(1, v(5, tag=77), 25, 26)])]
    report = check(events, {}, {})
    assert len(report.uncommitted) == 1 and not report.cross_tenant, report.format()


def test_an_entry_holding_another_tenants_row_at_quiescence_is_cross_tenant() -> None:
    """At quiescence, b's entry holding a's value (two tenants shared it) is ``cross-tenant``,
    not ``divergent``; an entry holding an older value of its own tenant stays divergent."""
    a_row, b_row = ("a/" + ITEM_TABLE, 1), ("b/" + ITEM_TABLE, 1)
    db = {
        a_row: {"id": 1, "counter": v(2, tag=1), "parent_id": 1},
        b_row: {"id": 1, "counter": v(1, tag=2), "parent_id": 1},
    }
    cache = {
        a_row: {"id": 1, "counter": v(1, tag=1), "parent_id": 1},  # a's own older value
        b_row: {"id": 1, "counter": v(2, tag=1), "parent_id": 1},  # a's value
    }
    report = check(tenants_history(), db, cache)
    assert [x.row for x in report.cross_tenant] == [b_row], report.format()
    assert "at quiescence" in report.cross_tenant[0].detail
    assert "tenant a" in report.cross_tenant[0].detail
    assert [x.row for x in report.divergent] == [a_row], report.format()


def test_reads_of_either_model_version_are_checked_against_the_one_history() -> None:
    """``--model-versions 2``: a read by a version-B worker (``mv`` "B") of a value another
    version's commit replaced is stale like any other, named as model B's and counted apart."""
    b_read = {**read(1, v(1), 25, 26, w="w1.0"), "mv": "B"}
    report = check([*history(), read(1, v(2), 22, 23), b_read], DB, {})
    assert [x.row for x in report.stale] == [(ITEM_TABLE, 1)], report.format()
    assert "model B" in report.stale[0].detail
    assert report.version_stale == {"B": 1}
    assert report.version_reads == {"A cache": 1, "B cache": 1}
    assert "model versions: reads A cache=1 B cache=1" in report.format()


def test_each_model_versions_entries_are_compared_with_that_versions_row() -> None:
    """At quiescence an entry of version B's keyspace (``table@B``) is compared with the row as
    version B loads it (its extra column included); an old value there is divergent, named as
    version B's entry, while version A's entry of the same row may be right."""
    b_item = (versioned(ITEM_TABLE, "B"), 1)
    assert unversioned(b_item) == (ITEM_TABLE, 1)
    db = {**DB, b_item: {"id": 1, "counter": v(2), "parent_id": 1, "note": "x"}}
    fresh = {(ITEM_TABLE, 1): dict(DB[(ITEM_TABLE, 1)])}
    assert check(history(), db, {**fresh, b_item: dict(db[b_item])}).ok
    old = {b_item: {"id": 1, "counter": v(1), "parent_id": 1, "note": "x"}}
    report = check(history(), db, {**fresh, **old})
    assert [x.row for x in report.divergent] == [b_item], report.format()
    other_note = {b_item: {**db[b_item], "note": "y"}}
    assert [x.row for x in check(history(), db, {**fresh, **other_note}).divergent] == [b_item]


def _killed_writer(evicted: list[tuple[str, int]]) -> list[dict[str, Any]]:
    """Row 1: v1 seeded; w's transaction began at 5 ms, committed v2 (cstart at 10) and died
    after its COMMIT at 12 ms, before its publish; Redis evicted ``evicted`` (key, ms)."""
    return [
        *commit("seed", 1, v(1), 0, 1),
        {
            "e": "cstart",
            "tx": "w:1",
            "writes": [[ITEM_TABLE, 1, v(2)]],
            "t": 10 * MS,
            "tb": 5 * MS,
            "w": "w",
        },
        {"e": "kill", "where": "after_commit", "tx": "w:1", "t": 12 * MS, "w": "w"},
        *({"e": "evicted", "key": key, "t": t * MS, "w": "redis"} for key, t in evicted),
    ]


ITEM_KEY = "st:{" + ITEM_TABLE + ":d1:db1:%d}"
BUCKET_OF_1 = zlib.crc32(b"1") % 16


def test_a_stale_read_behind_a_dead_writer_whose_lock_was_evicted_is_the_eviction_residual() -> (
    None
):
    """docs/consistency.md, "Eviction of locks": a lock evicted while its writer is between
    flush and publish, and the writer dead after COMMIT, leaves the value a reader filled
    before the COMMIT. The checker reports exactly that apart (``evicted``), for the row's
    entity key and for its bucket's generation key, and at quiescence too."""
    entity = (ITEM_KEY % BUCKET_OF_1) + ":1"
    generation = ITEM_KEY % BUCKET_OF_1
    stale_entry = {(ITEM_TABLE, 1): {"id": 1, "counter": v(1), "parent_id": 1}}
    for key in (entity, generation):
        report = check([*_killed_writer([(key, 8)]), read(1, v(1), 20, 21)], DB, stale_entry)
        assert report.ok, report.format()
        assert len(report.evicted) == 2 and report.evictions == 1, report.format()
        assert "at quiescence" in report.evicted[1].detail


def test_evictions_excuse_nothing_else() -> None:
    """The same stale read is ``stale`` when no key of the row was evicted during the dead
    writer's transaction (none, before it began, another row's, another bucket's, a registry
    key), or when the writer did not die: its publish removes what a reader filled."""
    other_bucket = (BUCKET_OF_1 + 1) % 16
    for evicted in (
        [],
        [((ITEM_KEY % BUCKET_OF_1) + ":1", 3)],  # before its transaction began
        [((ITEM_KEY % BUCKET_OF_1) + ":2", 8)],  # another row
        [(ITEM_KEY % other_bucket, 8)],  # another bucket
        [("st:registry", 8), ("st:epoch", 8)],
    ):
        report = check([*_killed_writer(evicted), read(1, v(1), 20, 21)], DB, {})
        assert len(report.stale) == 1 and not report.evicted, (evicted, report.format())
    events = [
        *commit("seed", 1, v(1), 0, 1),
        *commit("w:1", 1, v(2), 10, 12),
        {"e": "evicted", "key": (ITEM_KEY % BUCKET_OF_1) + ":1", "t": 11 * MS, "w": "redis"},
        read(1, v(1), 20, 21),
    ]
    report = check(events, DB, {(ITEM_TABLE, 1): {"id": 1, "counter": v(1), "parent_id": 1}})
    assert len(report.stale) == 1 and len(report.divergent) == 1, report.format()
    assert not report.evicted


def test_an_eviction_before_the_transactions_first_write_excuses_nothing() -> None:
    """A key evicted after the writer's transaction began but before its first write (``tw``:
    its first flush or statement, which its locks follow) took nothing the writer had locked:
    a value filled then is replaced by the lock, or refused. So a stale read behind that commit
    is ``stale``; an eviction after ``tw`` is still the residual."""
    entity = (ITEM_KEY % BUCKET_OF_1) + ":1"
    for evicted_at, excused in ((7, False), (9, True)):
        events = _killed_writer([(entity, evicted_at)])
        next(e for e in events if e["e"] == "kill")["tw"] = 8 * MS
        report = check([*events, read(1, v(1), 20, 21)], DB, {})
        assert bool(report.evicted) is excused, (evicted_at, report.format())
        assert bool(report.stale) is not excused, (evicted_at, report.format())


def test_with_background_publish_the_eviction_residual_lasts_until_the_publish_lands() -> None:
    """``--publish background``: ``commit()`` returns before the publish; a value a reader filled
    over an evicted lock is there until the background worker's publish removes it. A read
    begun before it landed (``published``) is the residual; one begun after, stale."""
    key = (ITEM_KEY % BUCKET_OF_1) + ":1"
    events = [
        *commit("seed", 1, v(1), 0, 1),
        {"e": "cstart", "tx": "w:1", "writes": [[ITEM_TABLE, 1, v(2)]], "t": 10 * MS, "tb": 5 * MS},
        {"e": "cend", "tx": "w:1", "outcome": "ok", "t": 12 * MS, "lf": 0, "w": "w"},
        {"e": "published", "txs": ["w:1"], "t": 30 * MS, "w": "w"},
        {"e": "evicted", "key": key, "t": 8 * MS, "w": "redis"},
        read(1, v(1), 20, 21),
        read(1, v(1), 35, 36),
    ]
    for e in events:
        e.setdefault("w", "w")
    report = check(events, DB, {})
    assert len(report.evicted) == 1 and report.evicted[0].t == 20 * MS, report.format()
    assert len(report.stale) == 1 and report.stale[0].t == 35 * MS, report.format()


def _evicted_writer(*extra: dict[str, Any], end: dict[str, Any] | None = None) -> list[Any]:
    """Row 1: v1 seeded; w's transaction began at 5 ms and committed v2 (cstart at 10, cend at
    12); Redis evicted the row's key at 8 ms; ``extra`` events (worker ``w`` unless named)."""
    events = [
        *commit("seed", 1, v(1), 0, 1),
        {"e": "cstart", "tx": "w:1", "writes": [[ITEM_TABLE, 1, v(2)]], "t": 10 * MS, "tb": 5 * MS},
        {"e": "cend", "tx": "w:1", "outcome": "ok", "t": 12 * MS, "lf": 0, **(end or {})},
        {"e": "evicted", "key": (ITEM_KEY % BUCKET_OF_1) + ":1", "t": 8 * MS, "w": "redis"},
        *extra,
    ]
    for e in events:
        e.setdefault("w", "w")
    return events


def test_a_publish_redis_did_not_complete_lands_at_its_writers_next_journal_replay() -> None:
    """A publish that Redis refused (an ``OOM`` from a squeezed server, a lost connection)
    journals its keys; the value a reader filled over the evicted lock is removed only when the
    writer's journal replays (docs/consistency.md, "Eviction of locks"), not when the failed
    publish returned. A read begun before that replay is the residual, one begun after it is
    stale; another worker's replay does not count. The checker took the failed publish for a
    landed one, and reported the residual as stale."""
    for published_at, background in ((30, True), (11, False)):
        events = _evicted_writer(
            {"e": "published", "txs": ["w:1"], "t": published_at * MS, "ok": False},
            {"e": "replayed", "t": 33 * MS, "w": "x"},
            {"e": "replayed", "t": 40 * MS},
            *(read(1, v(1), t, t + 1) for t in (20, 35, 45)),
        )
        report = check(events, DB, {})
        assert [x.t for x in report.evicted] == [20 * MS, 35 * MS], (background, report.format())
        assert [x.t for x in report.stale] == [45 * MS], (background, report.format())
        # no replay came: the residual lasts, and an entry left so at quiescence is too
        events = [e for e in events if e["e"] != "replayed" or e["w"] != "w"]
        report = check(events, DB, {(ITEM_TABLE, 1): {"id": 1, "counter": v(1), "parent_id": 1}})
        assert report.ok and len(report.evicted) == 4, (background, report.format())


def test_a_failed_publish_lands_at_the_first_replay_that_began_after_its_journaling() -> None:
    """The worker numbers the journal's adds: the failed publish names the add that journaled
    its keys, each replay the latest add when it began. A replay that began after that add
    lands it, even one that ended before the failed publish's event was written (another
    thread's); one that began before it does not."""
    failed = {"e": "published", "txs": ["w:1"], "t": 30 * MS, "ok": False, "js": 5}
    for replay, landed in (
        ({"e": "replayed", "t": 29 * MS, "js": 5}, 29),  # began after add 5, ended before 30
        ({"e": "replayed", "t": 31 * MS, "js": 4}, None),  # began before add 5
    ):
        reads = [read(1, v(1), t, t + 1) for t in (25, 35)]
        report = check(_evicted_writer(failed, replay, *reads), DB, {})
        excused, stale = ([25, 35], []) if landed is None else ([25], [35])
        assert [x.t // MS for x in report.evicted] == excused, (replay, report.format())
        assert [x.t // MS for x in report.stale] == stale, (replay, report.format())


def test_a_queued_publish_its_worker_died_before_running_is_never_landed() -> None:
    """``--publish background``: a commit queued its publish (``q`` on its ``cend``) and its
    worker died before the background worker ran it (no ``published``): the residual lasts,
    as for a writer killed after its COMMIT. A commit that did not queue it published before
    its ``cend``."""
    reads = [read(1, v(1), 20, 21)]
    assert len(check(_evicted_writer(*reads, end={"q": True}), DB, {}).evicted) == 1
    report = check(_evicted_writer(*reads), DB, {})
    assert len(report.stale) == 1 and not report.evicted, report.format()


def test_a_first_write_recorded_at_the_commits_end_bounds_the_eviction_residual() -> None:
    """Most transactions write first in ``commit()``'s own flush, after their ``cstart``: the
    worker records the first write (``tw``) on the ``cend`` (and on an ``after_commit``
    kill), and an eviction before it excuses nothing."""
    events = [{"e": "published", "txs": ["w:1"], "t": 30 * MS}, read(1, v(1), 20, 21)]
    report = check(_evicted_writer(*events, end={"tw": 9 * MS}), DB, {})
    assert len(report.stale) == 1 and not report.evicted, report.format()
    assert len(check(_evicted_writer(*events, end={"tw": 7 * MS}), DB, {}).evicted) == 1


def test_rows_inserted_by_any_incarnation_of_any_worker_never_share_an_id() -> None:
    """The checker knows a row by its id, so no two inserts of a run may use one: a long run
    respawned a worker more than ten times, its eleventh incarnation inserted the next
    slot's first ids again, and every read of them after their delete was reported stale."""
    from stress.worker import EXTRAS_PER_INCARNATION, extra_id

    seen: dict[int, tuple[int, int]] = {}
    for slot in range(8):
        for incarnation in range(40):
            for n in (0, 1, EXTRAS_PER_INCARNATION - 1):
                id_ = extra_id(slot, incarnation, n)
                assert seen.setdefault(id_, (slot, incarnation)) == (slot, incarnation), id_


def test_uuid_keys_map_ids_both_ways_and_refuse_runs_the_checker_cannot_follow() -> None:
    """``--key-type uuid``: an int id and its UUID key map both ways (asyncpg's UUID class
    too: a subclass), order kept (id ranges); a key's hex part reads back as the id; and a run
    the checker could not follow is refused before it starts."""
    import uuid

    from stress.models import KEY_TYPES, key_part_id
    from stress.runner import StressConfig, key_type_problem

    class DriverUUID(uuid.UUID):  # as asyncpg.pgproto.pgproto.UUID
        pass

    _, key, unkey = KEY_TYPES["uuid"]
    ids = [1, 8, 9, 10, 1_000_000, 2**31 - 1]
    assert [unkey(key(i)) for i in ids] == ids
    assert unkey(DriverUUID(int=1_000_017)) == 1_000_017
    assert sorted(key(i) for i in reversed(ids)) == [key(i) for i in ids]
    assert [key_part_id(key(i).hex, "uuid") for i in ids] == ids
    assert key_part_id("10", "uuid") is None and key_part_id("10", "int") == 10
    assert key_part_id(key(10).hex, "int") is None  # hex digits, "a" among them

    pg = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    assert key_type_problem(StressConfig(db_url=pg, key_type="uuid")) is None
    assert key_type_problem(StressConfig(db_url=pg, key_type="bigint"))
    for refused in (
        StressConfig(db_url="mysql+pymysql://root@127.0.0.1/test", key_type="uuid"),
        StressConfig(db_url=pg, key_type="uuid", tenants=2),
        StressConfig(db_url=pg, key_type="uuid", model_versions=2),
        StressConfig(db_url=pg, key_type="uuid", faults=frozenset({"evict"})),
    ):
        assert key_type_problem(refused), refused
