"""The checker: a pure function of the histories and the final database and Redis contents.

It fails a run on:

``stale``        a read returned a value older than the newest value whose commit had completed
                 (``session.commit()`` returned, or the writer died after its COMMIT) before the
                 read began. A read "begins" at its start, except a database read under
                 REPEATABLE READ / SERIALIZABLE, which begins when its transaction's database
                 connection began (before its first statement: the snapshot cannot be older).
                 docs/consistency.md allows a cache read to be newer than the transaction's snapshot, never
                 older than its own start, so cache reads are always checked against their start.
``uncommitted``  a read returned a value that no commit wrote (rolled back, lost with a killed
                 worker, never written), or saw it before that commit had even begun. Commits
                 whose outcome is unknown ("maybe": the worker died in the middle, or the error
                 left it unknown) count as committed here, and never as completed for ``stale``.
``cross-tenant`` (with ``--tenants``) a read in one tenant's schema returned a value written (by any
                 commit, failed or rolled back too) in another tenant's: two tenants shared a
                 cache entry, or a statement reached the wrong schema. Every row is the tenant's
                 own (``row[0]`` is ``tenant/table``): each read is checked against its own
                 tenant's committed history only.
``own-commit``   a read served from a near cache (``src`` "near") returned a value older than a
                 commit that the same worker process completed (its ``session.commit()``
                 returned) before the read began: docs/consistency.md ("Near cache") promises a
                 process reads its own commits at once, whatever the staleness bound. A worker
                 (``w``, ``w<slot>.<incarnation>``) is one process with one ``WriteThroughCache``,
                 so one near cache: the same ``w`` is the same cache instance, and a respawned
                 worker (a new incarnation, an empty near cache) is another.
``divergent``    at quiescence (workers stopped, locks and leases expired), a VALUE entry of a
                 current generation differs from its database row, or its row does not exist;
                 with ``--tenants``, an entry holding a value only another tenant wrote is
                 ``cross-tenant`` instead (two tenants shared the entry). An entry on a server
                 or Cluster node whose epoch no process checked since its identity changed (it
                 went back in time after the workers stopped) is no such entry: the first
                 process to use that server replaces every generation there before reading
                 anything, so it is never served; the runner does not hand it to the checker
                 and counts it among the ``leftover`` ("new epoch nobody checked", see
                 :func:`stress.runner.epoch_checked`).

With ``--model-versions 2`` (a rolling deploy), reads carry their worker's model version
(``mv``) and are checked like any other (by ``counter``: the second version's extra column is
never needed); ``final_cache`` then also holds the second version's entries, named
``table@B`` (:func:`versioned`), each compared with the row as that version loads it (also in
``final_db`` under that name) and judged by the row's one history.

With ``--sibling-trigger`` (a trigger that copies each hot item's counter into its shadow row,
see :func:`stress.models.shadow_of`), every write of a hot item in the histories comes with the
same write of its shadow (unless the transaction wrote the shadow itself, which no worker does):
a read of a shadow's entry a write left behind is ``stale``.

With ``--rewriting-trigger`` (a trigger that stores another value than the one written, see
:func:`stress.models.stored_value`), every write of the histories is taken as the value stored:
a read of the value a flush sent (a cache writing it through) is ``uncommitted``, and an entry
holding it at quiescence ``divergent``.

A stale read is reported apart, as ``gap`` and not as a failure, when a newer commit of that row
could not lock Redis and went ahead anyway (``on_redis_error="degrade"`` journals such keys): the
gap docs/consistency.md documents for a writer that cannot reach Redis while readers can.

A batch read (an ``IN`` list, ``batch`` the number of ids asked for) is one read event per id,
each checked by the same rules: an id missing from the result is a read of "no such row", stale
if the row existed (a committed insert or the seed completed, no delete) before the read began.

A read served from a near cache (``src`` "near", ``--near-cache``) may be behind a completed commit by
up to the near cache's staleness bound (docs/consistency.md, "Near cache"): such a read is
reported apart, as ``near`` with how far behind it was (from the completion of the first
commit it missed to its start); one further behind than the bound is ``stale``; one behind a
commit its own process completed before it began is ``own-commit``, whatever the bound.

With the ``evict`` fault (Redis evicting keys under ``maxmemory``, every eviction recorded as an
``evicted`` event with its key and the time it was heard), a stale read is reported apart, as
``evicted`` and not as a failure, when it is the residual docs/consistency.md ("Eviction of
locks") documents: an evicted lock lets a reader fill the value from before the COMMIT, and only
the commit's publish removes it. Exactly: for every completed commit of the row that the read
missed, the row's entity key or its bucket's generation key (in any keyspace) was evicted
between that transaction's first write (``tw``, when its first flush or statement began,
before its locks, on its ``cend`` or ``after_commit`` kill; ``tb``, when its database
transaction began, where it has none) and its
completion (its ``cend``, or its worker's death after COMMIT; the notice heard at
most :data:`EVICTION_NOTICE_SLACK_NS` later), and the read began before that commit's publish
landed: never, when the worker died after its COMMIT and before its publish (``kill``
``after_commit``), nor when it died with the publish still queued (``q`` on its ``cend``, no
``published``); at its ``published`` event with ``--publish background``; when Redis did not
complete the publish (``published`` with ``"ok": false``, the keys journaled by the journal's
add number ``js``), at the first journal replay of its worker that began after that add
(``replayed``, with the latest add number when it began), or never if none did. An entry left so
at quiescence (every later commit's writer died before publishing) is ``evicted`` too, instead
of ``divergent``. Anything else stale with evictions is still ``stale``.

A stale read begun inside a failover window (``windows``: from a ``SENTINEL FAILOVER`` to the
promotion plus the cache's ``epoch_check_interval``) is reported apart too, as ``window``: the
moment docs/running-redis.md documents, when two primaries take writes and a process that has
not left the old one yet reads there what a process already on the new one has replaced.
"""

from __future__ import annotations

import bisect
import dataclasses
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .models import DELETED_RANK, rank

Row = tuple[str, int]
#: the tenant label of the default schema's rows in a ``--tenants`` run (no worker means them)
DEFAULT_TENANT = "(default)"
SNAPSHOT_LEVELS = frozenset({"REPEATABLE READ", "SERIALIZABLE"})
#: how long after an eviction its notice may be heard (the listener's read of a keyspace
#: notification, on a loaded machine): an eviction heard this long after a writer's death is
#: still taken to have come before it
EVICTION_NOTICE_SLACK_NS = 250_000_000


@dataclasses.dataclass
class Version:
    """One committed (or maybe committed) write of one row."""

    rank: int
    value: int | None  # None: deleted
    start: int
    end: int | None  # None: not known to have completed
    status: str  # "ok" | "maybe"
    tx: str
    worker: str
    trouble: bool  # the transaction could not lock Redis (degrade mode went ahead)
    #: the row's key (or bucket) was evicted during the transaction: a reader may have filled
    #: the value from before it, which stays until the publish (the residual of an evicted lock)
    evicted: bool = False
    #: when its publish landed (None: never, its writer died after COMMIT); a commit's
    #: publish lands before its ``cend``, a background one at its ``published`` event
    landed: int | None = None


@dataclasses.dataclass
class Violation:
    kind: str
    row: Row
    detail: str
    t: int = 0  # when the read began (0: not a read)
    newer: int = 0  # stale reads: when the newer commit the read missed had completed


@dataclasses.dataclass
class Report:
    ops: Counter[str] = dataclasses.field(default_factory=Counter)
    errors: Counter[str] = dataclasses.field(default_factory=Counter)
    reads: Counter[str] = dataclasses.field(default_factory=Counter)
    #: the rows of IN-list reads among ``reads``, by source, and those not in the result
    batch_reads: Counter[str] = dataclasses.field(default_factory=Counter)
    batch_missing: int = 0
    #: how many IN-list reads those rows came from
    batches: int = 0
    commits: Counter[str] = dataclasses.field(default_factory=Counter)
    kills: Counter[str] = dataclasses.field(default_factory=Counter)
    #: worker slot ("w0": all its incarnations) -> the commits whose publish its background
    #: worker recorded (``published``), failed ones included
    publishes: Counter[str] = dataclasses.field(default_factory=Counter)
    cached_entries: int = 0
    leftover: Counter[str] = dataclasses.field(default_factory=Counter)
    stale: list[Violation] = dataclasses.field(default_factory=list)
    uncommitted: list[Violation] = dataclasses.field(default_factory=list)
    #: reads per tenant and per way of reaching it (``--tenants``)
    tenant_reads: Counter[str] = dataclasses.field(default_factory=Counter)
    way_reads: Counter[str] = dataclasses.field(default_factory=Counter)
    #: reads per model version and source, "A cache", "B db"... (``--model-versions 2``)
    version_reads: Counter[str] = dataclasses.field(default_factory=Counter)
    #: stale reads per model version of the reader (``--model-versions 2``)
    version_stale: Counter[str] = dataclasses.field(default_factory=Counter)
    #: reads in one tenant of a value written in another (``--tenants``)
    cross_tenant: list[Violation] = dataclasses.field(default_factory=list)
    divergent: list[Violation] = dataclasses.field(default_factory=list)
    gap: list[Violation] = dataclasses.field(default_factory=list)
    window: list[Violation] = dataclasses.field(default_factory=list)
    #: stale reads and entries explained by an evicted lock whose commit's publish had not
    #: landed (its writer died after COMMIT, or it was still queued): the documented residual
    evicted: list[Violation] = dataclasses.field(default_factory=list)
    #: the keys Redis evicted (``evict``), as the run heard them
    evictions: int = 0
    #: near-cache reads behind a completed commit, within the staleness bound
    near: list[Violation] = dataclasses.field(default_factory=list)
    #: near-cache reads behind a commit their own process had completed (never allowed)
    own_commit: list[Violation] = dataclasses.field(default_factory=list)
    #: near-cache reads of a row their own process had committed before they began (what
    #: ``own_commit`` had to check: how often the promise was put to the test)
    near_after_own: int = 0
    #: the near cache's staleness bound (ns), when the run used one
    near_bound: int | None = None
    #: the failover windows of the run (history times, ns)
    windows: list[tuple[int, int]] = dataclasses.field(default_factory=list)

    @property
    def violations(self) -> int:
        return (
            len(self.stale)
            + len(self.uncommitted)
            + len(self.own_commit)
            + len(self.cross_tenant)
            + len(self.divergent)
        )

    @property
    def ok(self) -> bool:
        return self.violations == 0

    @property
    def cache_share(self) -> float:
        cached = self.reads["cache"] + self.reads["near"]
        served = cached + self.reads["db"]
        return cached / served if served else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "ops": sum(self.ops.values()),
            "reads": sum(self.reads.values()),
            "batches": self.batches,
            "batch_reads": sum(self.batch_reads.values()),
            "cache_share": round(self.cache_share, 3),
            "commits": dict(self.commits),
            "kills": dict(self.kills),
            "errors": sum(self.errors.values()),
            "stale": len(self.stale),
            "uncommitted": len(self.uncommitted),
            "own_commit": len(self.own_commit),
            "cross_tenant": len(self.cross_tenant),
            "divergent": len(self.divergent),
            "gap": len(self.gap),
            "window": len(self.window),
            "evicted": len(self.evicted),
            "near_behind": len(self.near),
            "near_after_own": self.near_after_own,
        }

    def near_lag(self) -> str:
        """How far behind a completed commit the near-cache reads were, against the bound."""
        bound = (self.near_bound or 0) / 1e6
        lags = sorted((v.t - v.newer) / 1e6 for v in self.near)
        head = f"near cache: {self.reads['near']} reads from memory (bound {bound:.0f} ms)"
        if self.near_after_own:
            head += f", {self.near_after_own} of a row their own process had committed before"
        if not lags:
            return f"{head}; none behind a completed commit"
        return (
            f"{head}; {len(lags)} behind a completed commit, started {lags[len(lags) // 2]:.1f} "
            f"ms (median) / {lags[-1]:.1f} ms (max) after the first commit they missed completed"
        )

    def gap_window(self) -> str:
        """How far behind the documented degrade gap reads were: from the completion of the
        commit a gap read missed to that read's start (ms), and the entries left at the end."""
        lags = sorted((v.t - v.newer) / 1e6 for v in self.gap if v.t)
        left = sum(1 for v in self.gap if not v.t)
        if not lags:
            return f"degrade gap: no stale read; {left} stale entries at quiescence"
        return (
            f"degrade gap: {len(lags)} stale reads, started {lags[len(lags) // 2]:.0f} ms "
            f"(median) / {lags[min(len(lags) - 1, int(0.99 * len(lags)))]:.0f} ms (p99) / "
            f"{lags[-1]:.0f} ms (max) after the commit they missed completed; {left} stale "
            "entries at quiescence"
        )

    def failover_window(self) -> str:
        """The failover windows, and the stale reads begun inside them."""
        spans = sorted((b - a) / 1e6 for a, b in self.windows)
        lags = sorted((v.t - v.newer) / 1e6 for v in self.window if v.t)
        text = (
            f"failover windows: {len(spans)}, {spans[0]:.0f} to {spans[-1]:.0f} ms from the "
            "failover to the promotion plus the epoch check interval"
            if spans
            else "failover windows: none"
        )
        if not lags:
            return f"{text}; no stale read in them"
        return (
            f"{text}; {len(lags)} stale reads in them, started {lags[len(lags) // 2]:.0f} ms "
            f"(median) / {lags[-1]:.0f} ms (max) after the commit they missed completed"
        )

    def format(self, limit: int = 5) -> str:
        lines = [
            f"operations: {sum(self.ops.values())} "
            + " ".join(f"{k}={n}" for k, n in sorted(self.ops.items())),
            f"reads: {sum(self.reads.values())} "
            + " ".join(f"{k}={n}" for k, n in sorted(self.reads.items()))
            + f"; served from cache: {self.cache_share:.1%} of cache-eligible reads",
            *(
                [
                    f"batch reads: {sum(self.batch_reads.values())} rows in "
                    f"{self.batches} IN-list reads "
                    + " ".join(f"{k}={n}" for k, n in sorted(self.batch_reads.items()))
                    + f"; {self.batch_missing} ids not in the result"
                ]
                if self.batch_reads
                else []
            ),
            *(
                [
                    "model versions: reads "
                    + " ".join(f"{k}={n}" for k, n in sorted(self.version_reads.items()))
                    + "; stale reads by the reader's version "
                    + (" ".join(f"{k}={n}" for k, n in sorted(self.version_stale.items())) or "0")
                ]
                if any(k.startswith("B") for k in self.version_reads)
                else []
            ),
            *(
                [
                    "tenants: reads "
                    + " ".join(f"{k}={n}" for k, n in sorted(self.tenant_reads.items()))
                    + "; by way "
                    + " ".join(f"{k}={n}" for k, n in sorted(self.way_reads.items()))
                ]
                if self.tenant_reads
                else []
            ),
            "commits: " + " ".join(f"{k}={n}" for k, n in sorted(self.commits.items())),
            "worker kills: " + (" ".join(f"{k}={n}" for k, n in sorted(self.kills.items())) or "0"),
            "errors seen by callers: "
            + (" ".join(f"{k}={n}" for k, n in self.errors.most_common()) or "0"),
            f"cached VALUE entries at quiescence: {self.cached_entries}"
            + (
                " (left over: " + " ".join(f"{k}={n}" for k, n in self.leftover.items()) + ")"
                if self.leftover
                else ""
            ),
            f"violations: stale={len(self.stale)} uncommitted={len(self.uncommitted)} "
            f"own-commit={len(self.own_commit)} cross-tenant={len(self.cross_tenant)} divergent={len(self.divergent)}"
            f"   (documented degrade gap, not failures: stale={len(self.gap)}"
            + (f"; failover windows: stale={len(self.window)}" if self.windows else "")
            + (
                f"; evicted lock before an unlanded publish: stale={len(self.evicted)}"
                if self.evictions or self.evicted
                else ""
            )
            + ")",
        ]
        if self.evictions:
            lines.append(f"evictions heard: {self.evictions}")
        if self.gap:
            lines.append(self.gap_window())
        if self.windows:
            lines.append(self.failover_window())
        if self.near_bound is not None:
            lines.append(self.near_lag())
        for name in (
            "stale",
            "uncommitted",
            "own_commit",
            "cross_tenant",
            "divergent",
            "gap",
            "window",
            "evicted",
            "near",
        ):
            found: list[Violation] = getattr(self, name)
            for v in found[:limit]:
                lines.append(f"  {name.replace('_', '-')} {v.row[0]}#{v.row[1]}: {v.detail}")
            if len(found) > limit:
                lines.append(f"  ... {len(found) - limit} more {name.replace('_', '-')}")
        return "\n".join(lines)


def tenant_table(tenant: str | None, table: str) -> str:
    """The table part of a row's name: ``tenant/table`` in a ``--tenants`` run."""
    return table if tenant is None else f"{tenant}/{table}"


#: what separates a table from its model version in the name of a row at quiescence
VERSION_MARK = "@"


def versioned(table: str, version: str) -> str:
    """The table part of the name of an entry (and of its row) at quiescence, in the keyspace
    of model version ``version`` (``--model-versions 2``): ``table@B``; the first version's
    (``A``) is the table's name as without versions."""
    return table if version == "A" else f"{table}{VERSION_MARK}{version}"


def unversioned(row: Row) -> Row:
    """The row (as the histories name it) of an entry named by :func:`versioned`."""
    return (row[0].split(VERSION_MARK, 1)[0], row[1])


def _row(tb: str, id_: int, tenant: str | None = None) -> Row:
    return (tenant_table(tenant, tb), int(id_))


def _rewritten(event: Mapping[str, Any], stored: Callable[[int], int]) -> Mapping[str, Any]:
    """``event`` with the values of its writes (a commit's start, an aborted write) as the
    database stores them."""
    if "writes" not in event:
        return event
    writes = [[tb, id_, None if v is None else stored(v)] for tb, id_, v in event["writes"]]
    return {**event, "writes": writes}


def _mirrored(
    event: Mapping[str, Any], mirror: Callable[[str, int], tuple[str, int] | None]
) -> Mapping[str, Any]:
    """``event`` with, beside each of its writes (a commit's start, an aborted write), the
    write a trigger makes of another row: the same value in ``mirror``'s (table, id)."""
    if "writes" not in event:
        return event
    writes = [list(w) for w in event["writes"]]
    named = {(tb, int(id_)) for tb, id_, _ in writes}
    for tb, id_, value in list(writes):
        other = mirror(tb, int(id_))
        if other is not None and other not in named:
            writes.append([*other, value])
    return {**event, "writes": writes}


def check(
    events: Iterable[Mapping[str, Any]],
    final_db: Mapping[Row, Mapping[str, Any]],
    final_cache: Mapping[Row, Mapping[str, Any] | None],
    leftover: Mapping[str, int] | None = None,
    windows: Iterable[tuple[int, int]] = (),
    near_bound: int | None = None,
    buckets: tuple[int, ...] = (16,),
    stored: Callable[[int], int] | None = None,
    mirrored: Callable[[str, int], tuple[str, int] | None] | None = None,
) -> Report:
    """Check a run. ``final_cache`` maps rows to the decoded VALUE Redis holds (None: a VALUE
    that could not be decoded); ``final_db`` maps rows to their columns; ``windows``: the
    failover windows (history times); ``near_bound``: the near cache's staleness bound (ns);
    ``buckets``: the cache ``buckets`` of the run's keyspaces (an evicted generation key
    names its bucket, a row falls in one of each); ``stored``: what the database stores for
    each value written, where a trigger rewrites it (``--rewriting-trigger``): the histories
    say what the workers wrote, every read is matched with what was stored; ``mirrored``:
    the row (table, id) a trigger writes with the same value as each row written, if any
    (``--sibling-trigger``: :data:`stress.models.SHADOWS`)."""
    if stored is not None:
        events = [_rewritten(e, stored) for e in events]
    if mirrored is not None:
        events = [_mirrored(e, mirrored) for e in events]
    report = Report()
    report.near_bound = near_bound
    report.windows = list(windows)
    report.leftover.update(leftover or {})
    events = list(events)
    t_ref = min(
        (int(e["t0"] if "t0" in e else e["t"]) for e in events if "t0" in e or "t" in e), default=0
    )

    def ms(t: int | None) -> str:
        return "?" if t is None else f"{(t - t_ref) / 1e6:.1f}ms"

    starts: dict[str, Mapping[str, Any]] = {}
    ends: dict[str, Mapping[str, Any]] = {}
    kills: dict[str, Mapping[str, Any]] = {}
    #: (table, id or None, bucket or None) -> when each eviction of such a key was heard
    evicted_at: dict[tuple[str, int | None, int | None], list[int]] = defaultdict(list)
    #: tx -> when the background worker wrote its publish (or the commit's own publish failed)
    published: dict[str, int] = {}
    #: tx -> (its worker, the number of the journal add that journaled its keys), for the
    #: commits whose publish Redis did not complete
    unpublished: dict[str, tuple[str, int | None]] = {}
    #: worker -> (when each of its journal replays completed, the number of the journal's
    #: latest add when it began: it replayed every add up to that one)
    replays: dict[str, list[tuple[int, int | None]]] = defaultdict(list)
    reads: list[Mapping[str, Any]] = []
    aborted: set[tuple[Row, int]] = set()
    #: (table, id, value) -> the tenants whose history wrote it (committed, failed or aborted)
    written_in: dict[tuple[str, int, int], set[str | None]] = defaultdict(set)
    for e in events:
        kind = e["e"]
        if kind == "read":
            reads.append(e)
        elif kind == "cstart":
            starts[e["tx"]] = e
        elif kind == "cend":
            ends[e["tx"]] = e
        elif kind == "kill":
            report.kills[e["where"]] += 1
            if e.get("tx"):
                kills[e["tx"]] = e
        elif kind == "aborted":
            for tb, id_, value in e["writes"]:
                if value is not None:
                    aborted.add((_row(tb, id_, e.get("tn")), value))
                    written_in[(tb, int(id_), value)].add(e.get("tn"))
        elif kind == "published":
            report.publishes[str(e.get("w", "?")).split(".", 1)[0]] += len(e["txs"])
            for tx in e["txs"]:
                published[tx] = int(e["t"])
                if e.get("ok") is False:
                    unpublished[tx] = (str(e.get("w", "?")), e.get("js"))
        elif kind == "replayed":
            replays[str(e.get("w", "?"))].append((int(e["t"]), e.get("js")))
        elif kind == "evicted":
            report.evictions += 1
            named = evicted_key(e["key"])
            if named is not None:
                evicted_at[named].append(int(e["t"]))
        elif kind == "op":
            report.ops[e["k"]] += 1
            if e.get("err"):
                report.errors[e["err"].split(":", 1)[0]] += 1

    for times_ in evicted_at.values():
        times_.sort()
    for replayed in replays.values():
        replayed.sort()

    def landed_at(tx: str, end_t: int | None, queued: bool) -> int | None:
        """When the publish of commit ``tx`` removed what readers may have filled: its own
        publish (the ``published`` event, or the commit's end); when Redis did not complete
        it, the first journal replay of its worker that began after its keys were journaled
        (None: none did); a publish queued for the background worker and never run (its
        process died first): None."""
        if queued and tx not in published:
            return None
        at = published.get(tx, end_t)
        failed = unpublished.get(tx)
        if failed is None or at is None:
            return at
        worker, added = failed
        for t, began_after in replays.get(worker, ()):
            if added is None or began_after is None:
                if t > at:
                    return t
            elif began_after >= added:
                return t
        return None

    def evicted_during(tb: str, id_: int, lo: int, hi: int) -> bool:
        """Was the key of row ``id_`` of table ``tb``, or its bucket's generation key, evicted
        (heard) between ``lo`` and ``hi``?"""
        names = [(tb, id_, None)]
        part = str(id_).encode()
        names += [(tb, None, zlib.crc32(part) % n) for n in buckets]
        for name in names:
            heard = evicted_at.get(name)
            if heard and bisect.bisect_left(heard, lo) < bisect.bisect_right(heard, hi):
                return True
        return False

    versions: dict[Row, list[Version]] = defaultdict(list)
    failed: set[tuple[Row, int]] = set()
    for tx, start in starts.items():
        end = ends.get(tx)
        kill = kills.get(tx)
        if kill is not None and kill["where"] == "after_commit":
            status, end_t = "ok", int(kill["t"])
        elif kill is not None and kill["where"] == "after_flush":
            status, end_t = "failed", None
        elif end is None or end["outcome"] == "maybe":
            status, end_t = "maybe", None
        elif end["outcome"] == "ok":
            status, end_t = "ok", int(end["t"])
        else:
            status, end_t = "failed", None
        report.commits[status] += 1
        trouble = bool(end is not None and end.get("lf"))
        for tb, id_, value in start["writes"]:
            row = _row(tb, id_, start.get("tn"))
            if value is not None:
                written_in[(tb, int(id_), value)].add(start.get("tn"))
            if status == "failed":
                if value is not None:
                    failed.add((row, value))
                continue
            died = kill is not None and kill["where"] == "after_commit"
            evicted = (
                end_t is not None
                and bool(evicted_at)
                and evicted_during(
                    tb,
                    int(id_),
                    # a completed commit has a cend or an after_commit kill: both say "tw"
                    int((end or kill or {}).get("tw") or start.get("tb") or start["t"]),
                    end_t + EVICTION_NOTICE_SLACK_NS,
                )
            )
            versions[row].append(
                Version(
                    rank=DELETED_RANK if value is None else rank(value),
                    value=value,
                    start=int(start["t"]),
                    end=end_t,
                    status=status,
                    tx=tx,
                    worker=str(start.get("w", "?")),
                    trouble=trouble,
                    evicted=evicted,
                    landed=None if died else landed_at(tx, end_t, bool(end and end.get("q"))),
                )
            )

    by_value: dict[tuple[Row, int], Version] = {}
    completed: dict[Row, tuple[list[int], list[Version]]] = {}
    for row, vers in versions.items():
        for ver in vers:
            if ver.value is not None:
                by_value.setdefault((row, ver.value), ver)
        done = sorted((v for v in vers if v.end is not None), key=lambda v: v.end or 0)
        times: list[int] = []
        best: list[Version] = []
        for ver in done:
            times.append(ver.end or 0)
            best.append(ver if not best or ver.rank > best[-1].rank else best[-1])
        completed[row] = (times, best)

    batches: set[tuple[str, int]] = set()
    for r in reads:
        report.reads[r["src"]] += 1
        batch = r.get("batch")
        if batch is not None:
            report.batch_reads[r["src"]] += 1
            report.batch_missing += r["v"] is None
            batches.add((r["w"], int(r["t0"])))  # a worker's batch: its rows share their times
            report.batches = len(batches)
        tenant = r.get("tn")
        if tenant is not None:
            report.tenant_reads[tenant] += 1
            report.way_reads[r.get("way") or "?"] += 1
        row = _row(r["tb"], r["id"], tenant)
        t0, t1 = int(r["t0"]), int(r["t1"])
        value = r["v"]
        version = r.get("mv") or "A"
        report.version_reads[f"{version} {r['src']}"] += 1
        how = f", {r['way']}" if r.get("way") else ""
        if version != "A":
            how += f", model {version}"
        if batch is not None:
            how += f", IN list of {batch}"
        where = (
            f"{r['w']} read {value} ({r['src']}, {r.get('iso')}{how}) during [{ms(t0)}, {ms(t1)}]"
        )
        if value is not None:
            ver = by_value.get((row, value))
            others = written_in.get((r["tb"], int(r["id"]), value), set()) - {tenant}
            if ver is None and others:
                report.cross_tenant.append(
                    Violation(
                        "cross-tenant",
                        row,
                        f"{where}: a value of tenant {', '.join(sorted(map(str, others)))}",
                        t0,
                    )
                )
                continue
            if ver is None:
                why = (
                    "a rolled-back value"
                    if (row, value) in aborted
                    else "the value of a failed commit"
                    if (row, value) in failed
                    else "a value nobody committed"
                )
                report.uncommitted.append(Violation("uncommitted", row, f"{where}: {why}", t0))
                continue
            if ver.start > t1:
                report.uncommitted.append(
                    Violation(
                        "uncommitted",
                        row,
                        f"{where}: its commit ({ver.worker} {ver.tx}) only began at "
                        f"{ms(ver.start)}",
                        t0,
                    )
                )
                continue
            seen = ver.rank
        else:
            deleted = any(v.rank == DELETED_RANK and v.start <= t1 for v in versions.get(row, ()))
            seen = DELETED_RANK if deleted else 0
        begin = t0
        if r["src"] == "db" and r.get("iso") in SNAPSHOT_LEVELS and r.get("tx") is not None:
            begin = min(t0, int(r["tx"]))
        if r["src"] == "near" and any(
            v.worker == r["w"] and v.end is not None and v.end <= begin
            for v in versions.get(row, ())
        ):
            report.near_after_own += 1
        times, best = completed.get(row, ([], []))
        i = bisect.bisect_left(times, begin)
        if i == 0:
            continue
        newest = best[i - 1]
        if newest.rank <= seen:
            continue
        detail = (
            f"{where}, read began {ms(begin)}; but {newest.worker} committed "
            f"{'a delete' if newest.value is None else newest.value} (rank {newest.rank} > "
            f"{seen}) by {ms(newest.end)} (tx {newest.tx})"
        )
        if r["src"] == "near":
            own = [
                v
                for v in versions.get(row, ())
                if v.worker == r["w"] and v.end is not None and v.end <= begin and v.rank > seen
            ]
            if own:
                mine = max(own, key=lambda v: v.rank)
                report.own_commit.append(
                    Violation(
                        "own-commit",
                        row,
                        f"{where}, read began {ms(begin)}; but its own process had committed "
                        f"{'a delete' if mine.value is None else mine.value} (rank {mine.rank} > "
                        f"{seen}) by {ms(mine.end)} (tx {mine.tx}"
                        + (", which could not lock Redis" if mine.trouble else "")
                        + ")",
                        t0,
                        mine.end or 0,
                    )
                )
                continue
        if r["src"] == "near" and near_bound is not None:
            missed = min(
                v.end
                for v in versions.get(row, ())
                if v.end is not None and v.rank > seen and v.end <= begin
            )
            if begin - missed <= near_bound:
                report.near.append(Violation("near", row, detail, t0, missed))
                continue
            detail += f": {(begin - missed) / 1e6:.1f} ms behind, beyond the near cache's bound"
        excused = any(v.trouble and seen < v.rank <= newest.rank for v in versions.get(row, ()))
        missed = [
            v
            for v in versions.get(row, ())
            if v.end is not None and v.end <= begin and v.rank > seen
        ]
        if all(v.evicted and (v.landed is None or begin < v.landed) for v in missed):
            report.evicted.append(Violation("evicted", row, detail, t0, newest.end or 0))
        elif excused:
            report.gap.append(Violation("gap", row, detail, t0, newest.end or 0))
        elif any(a <= t0 <= b for a, b in report.windows):
            report.window.append(Violation("window", row, detail, t0, newest.end or 0))
        else:
            report.stale.append(Violation("stale", row, detail, t0, newest.end or 0))
            report.version_stale[version] += 1

    report.cached_entries = len(final_cache)
    for entry, cached in sorted(final_cache.items()):
        # an entry of another model version's keyspace is compared with the row as that
        # version loads it (``final_db`` names it alike), and judged by the row's history
        db = final_db.get(entry)
        row = unversioned(entry)
        if cached is None:
            detail = "an undecodable VALUE entry"
        elif db is None:
            detail = f"cached {dict(cached)} but the row does not exist"
        elif dict(cached) != dict(db):
            detail = f"cached {dict(cached)} != database {dict(db)}"
        else:
            continue
        tenant, _, table = row[0].rpartition("/")
        value = None if cached is None else cached.get("counter")
        others = (
            written_in.get((table, row[1], value), set()) - {tenant}
            if tenant and isinstance(value, int) and (row, value) not in by_value
            else set()
        )
        if others:
            # the tenant's entry holds a row of another tenant's: two tenants shared the entry
            report.cross_tenant.append(
                Violation(
                    "cross-tenant",
                    entry,
                    f"at quiescence: {detail}: a value of tenant "
                    f"{', '.join(sorted(map(str, others)))}",
                )
            )
            continue
        kept = (
            None
            if not isinstance(value, int) or (row, value) not in by_value
            else by_value[(row, value)].rank
        )
        later = [
            v
            for v in versions.get(row, ())
            if v.end is not None and kept is not None and v.rank > kept
        ]
        if later and all(v.evicted and v.landed is None for v in later):
            # every commit after the value it holds died before its publish, its lock evicted
            report.evicted.append(Violation("evicted", entry, f"at quiescence: {detail}"))
        elif any(v.trouble for v in versions.get(row, ())):
            # a commit of this row could not lock Redis: its writer's journal invalidates the
            # entry before that process reads again, nobody else knows (the degrade gap)
            report.gap.append(Violation("gap", entry, f"at quiescence: {detail}"))
        else:
            report.divergent.append(Violation("divergent", entry, detail))
    return report


def evicted_key(key: str) -> tuple[str, int | None, int | None] | None:
    """(table, id, None) of an evicted entity key ``{prefix}:{<table>:<digest>:<database>:
    <bucket>}:<id>``, (table, None, bucket) of a generation key (the same without ``:<id>``),
    None for any other key (the registry, the epoch key, a key of no int id)."""
    if "{" not in key or "}" not in key:
        return None
    inner, _, rest = key.partition("{")[2].partition("}")
    parts = inner.split(":")
    if len(parts) < 4 or not parts[-1].isdigit():
        return None
    table = parts[0]
    if not rest:
        return table, None, int(parts[-1])
    id_ = rest[1:] if rest.startswith(":") else ""
    return (table, int(id_), None) if id_.isdigit() else None
