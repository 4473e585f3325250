"""A short stress run in the normal suite: several worker processes, all faults, the checker.

For each server database, about half a minute of ``stress.runner.run_stress``: five worker
processes (two of them with AsyncSession and redis.asyncio; each its own engine and cache,
through a misbehaving loopback proxy to a throwaway ``redis-server``) read and write eight hot rows and their parents under READ COMMITTED and
REPEATABLE READ (reads of one row, and ``IN``-list reads of 2-8, each row checked), while Redis forgets (restarted with its data lost, restarted from an older
snapshot, flushed, replaced by another server holding an older copy), its connections are
killed, the proxy delays, stalls and drops traffic, workers SIGKILL themselves between flush and
COMMIT and between COMMIT and publish, and two-row transactions deadlock. The checker must then
find no stale read, no read of an uncommitted value and, at quiescence, no cached entry that
differs from its row (guarantees 1, 2, 3 and 5 of docs/consistency.md).

With ``tenants=3`` (one schema per tenant, reached through ``schema_translate_map`` in the
ways users choose it), the same on PostgreSQL adds zero cross-tenant reads; with the sabotage
``tenant-blind-keys`` it must find some.

Bounded: the workload stops at its deadline, every wait has a timeout, and every process and
server started is stopped. Loopback only. The longer run is ``nox -s stress``.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
from _stress_runs import ran, redis_server_binary_or_skip

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stress.faults import ALL_FAULTS
from stress.runner import StressConfig, run_stress

#: workload seconds per database; with start-up and quiescence a run takes about 30 s
SECONDS = 22.0
#: workload seconds of the Redis Cluster run (started in about 3 s)
CLUSTER_SECONDS = 16.0
#: workload seconds of the background-publish run (about 20 s in all)
BACKGROUND_SECONDS = 5.0
#: workload seconds of the background run whose publish gives its locks up first
BACKGROUND_SABOTAGE_SECONDS = 6.0
#: workload seconds of the near-cache run
NEAR_SECONDS = 10.0
#: workload seconds of the two-model-versions run (a rolling deploy; about 15 s in all)
VERSIONS_SECONDS = 6.0

pytestmark = pytest.mark.stress


def _publishes_of_both(publishes: Counter[str], asyncio_workers: int, workers: int) -> None:
    """The checker saw the background publishes of an asyncio worker (slots below
    ``asyncio_workers``) and of a sync one: each flavour's are recorded by its own write path's
    instrumentation (``stress.worker``), which once watched the wrong one and recorded none.
    Not every slot's: a worker SIGKILLed (``sigkill``) at its first flush or COMMIT, before its
    first publish ran, has none, and its respawn cannot make up for it in a 5 s run (a worker
    takes 7 s to start on a 2-CPU machine, 13 s loaded: it is ready after the deadline)."""
    asyncio_slots, sync_slots = range(asyncio_workers), range(asyncio_workers, workers)
    assert any(publishes[f"w{slot}"] for slot in asyncio_slots), publishes
    assert any(publishes[f"w{slot}"] for slot in sync_slots), publishes


@pytest.fixture(scope="module")
def redis_server_binary() -> str:
    return redis_server_binary_or_skip()


@pytest.mark.timeout(150)
@pytest.mark.parametrize("db", ["postgresql", "mariadb"])
def test_short_stress_run_finds_no_violation(
    db: str, redis_server_binary: str, request: pytest.FixtureRequest
) -> None:
    """All faults at once, strict mode (the proxy's per-connection faults are partitions, where
    degrade mode has a documented gap): zero stale, uncommitted or divergent."""
    url: str = request.getfixturevalue(f"{db}_url")
    result = ran(
        StressConfig(
            db_url=url,
            seconds=SECONDS,
            faults=frozenset(ALL_FAULTS),
            workers=5,
            asyncio_workers=2,  # AsyncSession + redis.asyncio, next to 3 sync workers
            on_redis_error="strict",
            lock_wait=60,  # another stress run on the same database: wait, bounded
        )
    )
    report = result.report
    # Redis went back in time, was flushed and was replaced by an older copy
    forgot = ("restarts from an older snapshot", "FLUSHALLs", "switches to an older copy")
    for fault in forgot:
        assert any(k.startswith(fault) for k in result.info), result.format()
    # the run did something worth checking: IN-list reads too, from Redis and the database
    assert report.reads["cache"] > 0 and report.reads["db"] > 0, result.format()
    assert report.batch_reads["cache"] > 0 and report.batch_reads["db"] > 0, result.format()
    assert report.commits["ok"] > 0, result.format()
    assert report.ok, result.format()


@pytest.mark.timeout(150)
def test_short_background_publish_run_finds_no_violation(
    redis_server_binary: str, postgresql_url: str
) -> None:
    """``publish="background"`` in every worker (two of five asyncio): a read after a commit may
    miss while its publish is pending, never be stale. Workers SIGKILLed with publishes still
    queued leave locks that expire; connections killed and ``FLUSHALL`` while publishes are
    pending; deadlocks. (The all-faults runs above cover the rest; in a run this short, the
    proxy's partitions and the restarts left too little to check on a loaded machine.) Zero
    stale, uncommitted or divergent."""
    result = ran(
        StressConfig(
            db_url=postgresql_url,
            seconds=BACKGROUND_SECONDS,
            faults=frozenset({"sigkill", "client-kill", "flushall", "db-errors"}),
            workers=5,
            asyncio_workers=2,
            on_redis_error="strict",
            publish="background",
            lock_wait=60,
        )
    )
    report = result.report
    assert report.reads["cache"] > 0 and report.commits["ok"] > 0, result.format()
    # the background publishes of both flavours' workers are seen (see _publishes_of_both)
    _publishes_of_both(report.publishes, asyncio_workers=2, workers=5)
    assert report.ok, result.format()


@pytest.mark.timeout(150)
def test_short_evict_run_finds_no_violation(redis_server_binary: str, postgresql_url: str) -> None:
    """Redis evicting keys of every kind (``evict``: squeezed below the memory it uses, under
    ``allkeys-random`` or ``volatile-random``) while workers publish in the background (two of
    five asyncio) and die after COMMIT: every eviction is heard, and nothing is stale but the
    documented residual of an evicted lock whose publish had not landed (reported apart as
    ``evicted``, not a failure)."""
    result = ran(
        StressConfig(
            db_url=postgresql_url,
            seconds=BACKGROUND_SECONDS,
            faults=frozenset({"evict", "sigkill"}),
            workers=5,
            asyncio_workers=2,
            on_redis_error="strict",
            publish="background",
            kill_prob=0.005,
            lock_wait=60,
        )
    )
    report = result.report
    assert report.reads["cache"] > 0 and report.commits["ok"] > 0, result.format()
    assert report.evictions > 0, result.format()
    assert result.info["evictions heard"] == report.evictions, result.format()
    assert result.info["keys evicted (the servers' count)"] == report.evictions, result.format()
    # the residual ends when a publish lands: the checker must see both flavours' (see
    # _publishes_of_both)
    _publishes_of_both(report.publishes, asyncio_workers=2, workers=5)
    assert report.ok, result.format()


@pytest.mark.timeout(240)  # two runs at most
def test_short_near_cache_run_finds_no_violation(
    redis_server_binary: str, postgresql_url: str
) -> None:
    """``near_cache`` (1 s bound) in every worker, the two asyncio ones included, under every
    fault: no read from memory may be further behind a completed commit than the bound, nor
    behind one its own process completed (own-commit), and zero stale, uncommitted or
    divergent. Every run must hold; a second run (its own seed) when the first read nothing
    from memory: under every fault Redis is away much of the time, and on a loaded machine
    one 10 s run made 7 cache reads, none of them near."""
    for _ in range(2):
        result = ran(
            StressConfig(
                db_url=postgresql_url,
                seconds=NEAR_SECONDS,
                faults=frozenset(ALL_FAULTS),
                workers=5,
                asyncio_workers=2,
                on_redis_error="strict",
                near_cache=1.0,
                lock_wait=60,
            )
        )
        report = result.report
        assert not report.own_commit, result.format()
        assert report.ok, result.format()
        # IN-list reads, each row checked against the bound only when it came from memory
        if report.reads["near"] > 0 and report.commits["ok"] > 0 and report.batches > 0:
            return
    pytest.fail(f"two runs read nothing from memory, or committed nothing:\n{result.format()}")


@pytest.mark.timeout(150)
def test_short_two_model_versions_run_finds_no_violation(
    redis_server_binary: str, postgresql_url: str
) -> None:
    """A rolling deploy (``--model-versions 2``): two of four workers (one sync, one asyncio)
    map the tables with the next model version (one more column, so another keyspace of the
    same prefix) and read and write the same rows as the others; every read of either version
    is checked against the one history, and at quiescence each version's entries against the
    row as that version loads it, while the keyspace registry is evicted alone every 0.2 to
    1 s (``evict-registry``). Zero stale, uncommitted or divergent. (On a library whose
    commits reach only their own version's keyspace, a few seconds find hundreds of stale
    reads: seen with this very test before the fix; on one that did not make a forgotten
    registry whole, 20 s found 53.)"""
    result = ran(
        StressConfig(
            db_url=postgresql_url,
            seconds=VERSIONS_SECONDS,
            workers=4,
            asyncio_workers=2,
            on_redis_error="strict",
            faults=frozenset({"evict-registry"}),
            model_versions=2,
            lock_wait=60,
        )
    )
    report = result.report
    # both versions read from the cache and commit
    assert report.version_reads["A cache"] and report.version_reads["B cache"], result.format()
    assert report.commits["ok"] > 0, result.format()
    assert report.ok, result.format()


@pytest.mark.timeout(60)
def test_final_state_reads_each_model_versions_entries(
    redis_server_binary: str, postgresql_url: str
) -> None:
    """The run's final look at Redis tells the two versions' keyspaces apart by the model
    digest their keys name (whatever each version's ``buckets``), decodes each entry with its
    own version's model, and names version B's ``table@B``, beside the row as version B loads
    it (its extra column included); without ``model_versions`` its keys are unknown."""
    from sqlalchemy.orm import sessionmaker

    from sqlalchemy_writethrough import WriteThroughCache
    from stress.models import StItem, StItemB, StParent, StParentB, metadata_of, reset_schema
    from stress.redis_server import RedisServer
    from stress.runner import exclusive_tables, final_state
    from stress.worker import make_engine

    engine = make_engine(postgresql_url)
    try:
        with exclusive_tables(engine, 60), RedisServer() as server:
            reset_schema(engine, metadata_of(2))
            prefix = "st-versions"
            a_maker, b_maker = sessionmaker(engine), sessionmaker(engine)
            caches = [
                WriteThroughCache(server.url, prefix=prefix, stats_interval=None),
                WriteThroughCache(server.url, prefix=prefix, stats_interval=None, buckets=4),
            ]
            caches[0].install(a_maker)
            caches[1].install(b_maker)
            with b_maker() as s:
                s.add(StParentB(id=1, counter=10, note="p"))
                s.flush()
                s.add(StItemB(id=1, counter=20, parent_id=1, note="i"))
                s.commit()
            for maker, models in ((a_maker, (StParent, StItem)), (b_maker, (StParentB, StItemB))):
                with maker() as s:
                    for model in models:
                        s.get(model, 1)  # a miss, filled: one entry per version
            db, cached, leftover = final_state(engine, server.url, prefix, None, 2)
            for cache in caches:
                cache.close()
            assert cached == {
                ("stress_parent", 1): {"id": 1, "counter": 10},
                ("stress_item", 1): {"id": 1, "counter": 20, "parent_id": 1},
                ("stress_parent@B", 1): {"id": 1, "counter": 10, "note": "p"},
                ("stress_item@B", 1): {"id": 1, "counter": 20, "parent_id": 1, "note": "i"},
            }
            assert db == cached and not leftover
            _, cached, leftover = final_state(engine, server.url, prefix)
            assert set(cached) == {("stress_parent", 1), ("stress_item", 1)}
            assert sum(leftover.values()) == 2 and all("unknown key" in k for k in leftover)
    finally:
        engine.dispose()


def test_final_state_leaves_out_the_entries_of_a_new_epoch_nobody_checked(
    postgresql_url: str,
) -> None:
    """A server that goes back in time after the workers stopped (here restarted from an
    older snapshot; on a Cluster, a node restarted from the RDB file of its last full sync as
    a replica, promoted once the run was over) holds old values under generations that look
    current, yet no process is ever served them: the first one to use it sees its new
    identity and replaces every generation first. The run's final look at Redis counts them
    apart (``leftover``), never as entries to compare with their rows (a ``divergent`` that
    is none); once a process has checked the epoch, entries count again."""
    from sqlalchemy.orm import sessionmaker

    from sqlalchemy_writethrough import WriteThroughCache
    from stress.models import StParent, reset_schema
    from stress.redis_server import RedisServer
    from stress.runner import UNCHECKED_EPOCH, exclusive_tables, final_state
    from stress.worker import make_engine

    engine = make_engine(postgresql_url)
    row = ("stress_parent", 1)
    try:
        with exclusive_tables(engine, 60), RedisServer() as server:
            reset_schema(engine)
            prefix = "st-epoch"
            maker = sessionmaker(engine)
            cache = WriteThroughCache(server.url, prefix=prefix, stats_interval=None)
            cache.install(maker)
            with maker() as s:
                s.add(StParent(id=1, counter=10))
                s.commit()
            with maker() as s:
                assert s.get(StParent, 1).counter == 10
            older = server.snapshot()
            with maker() as s:
                s.get(StParent, 1).counter = 11
                s.commit()
            db, cached, leftover = final_state(engine, server.url, prefix)
            assert db[row] == cached[row] == {"id": 1, "counter": 11} and not leftover

            server.restart(from_rdb=older)  # 10 again, under the generation of then
            db, cached, leftover = final_state(engine, server.url, prefix)
            assert db[row] == {"id": 1, "counter": 11}
            assert cached == {} and leftover == {UNCHECKED_EPOCH: 1}
            # workers that never check epochs (--sabotage no-epoch-check) would serve it
            _, cached, leftover = final_state(engine, server.url, prefix, epochs=False)
            assert cached == {row: {"id": 1, "counter": 10}} and not leftover

            with maker() as s:  # what a process is served: the new epoch, then the row
                assert s.get(StParent, 1).counter == 11
            assert cache.stats().epochs == 1
            db, cached, leftover = final_state(engine, server.url, prefix)
            assert UNCHECKED_EPOCH not in leftover
            assert cached == {row: {"id": 1, "counter": 11}}
            cache.close()
    finally:
        engine.dispose()


@pytest.mark.timeout(150)
def test_short_background_run_with_unlocked_publish_fails(
    redis_server_binary: str, postgresql_url: str
) -> None:
    """The checker can fail on the background path: a commit that gives its locks up before
    its publish is queued (the previous values come back, as in a naive asynchronous cache)
    serves stale reads. (The sabotage went inert once a queued job stopped carrying its pairs
    before the worker built them; this run would have passed.)"""
    result = run_stress(
        StressConfig(
            db_url=postgresql_url,
            seconds=BACKGROUND_SABOTAGE_SECONDS,
            workers=4,
            on_redis_error="strict",
            publish="background",
            sabotage="unlocked-background-publish",
            lock_wait=60,
        ),
        log=print,
    )
    print(result.format())
    assert result.report.stale, result.format()


@pytest.mark.cluster
@pytest.mark.timeout(150)
def test_short_cluster_failover_run_finds_no_violation(
    redis_server_binary: str, postgresql_url: str
) -> None:
    """The same workers (half of them asyncio) on a Redis Cluster (3 primaries, 3 replicas) whose
    primaries are SIGKILLed, replaced with ``CLUSTER FAILOVER`` or restarted in place from an
    older snapshot every few seconds, with SIGKILLed workers and deadlocks; strict mode: zero
    stale, uncommitted or divergent."""
    result = ran(
        StressConfig(
            db_url=postgresql_url,
            seconds=CLUSTER_SECONDS,
            faults=frozenset({"cluster-failover", "sigkill", "db-errors"}),
            workers=4,
            asyncio_workers=2,  # redis.asyncio.cluster.RedisCluster, next to 2 sync workers
            on_redis_error="strict",
            lock_wait=60,
        )
    )
    report = result.report
    assert any(k.startswith(("Cluster primaries", "CLUSTER FAILOVERs")) for k in result.info)
    assert report.reads["cache"] > 0 and report.commits["ok"] > 0, result.format()
    assert report.ok, result.format()


@pytest.mark.timeout(150)
def test_repeat_lists_the_failing_seeds_and_keeps_only_their_histories(
    redis_server_binary: str,
    postgresql_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``python -m stress --repeat N`` (loop a short run to find a rare violation): each
    repetition has its own seed, the failing ones are listed with theirs, and only their
    histories stay on disk. Sabotaged, so that repetitions fail: the cache blind to the
    rewriting trigger writes through what the flush sent at every commit (``unguarded-fill``,
    a race, was missed by all three 2-second runs once on a loaded machine); the test asks
    for one failure in three, and that the list, the kept histories and the exit status
    agree."""
    import re
    import shutil

    from stress.__main__ import main

    monkeypatch.setenv("POSTGRESQL_URL", postgresql_url)
    argv = ["--db", "postgresql", "--faults", "none", "--workers", "3", "--seconds", "2"]
    argv += ["--repeat", "3", "--seed", "5", "--rewriting-trigger", "--sabotage", "blind-triggers"]
    try:
        status = main(argv)
    finally:
        out = capsys.readouterr().out
        kept = re.findall(r"histories kept in (\S+)", out)
        for folder in kept:
            shutil.rmtree(folder, ignore_errors=True)
    print(out)
    assert re.findall(r"\bseed=(\d+)", out) == ["5", "6", "7"]
    failed = re.search(r"== (\d+) of 3 runs failed", out)
    assert failed is not None
    listed = re.findall(r"repetition \d: postgresql, faults none: --seed (\d+)", out)
    assert int(failed.group(1)) == len(listed) == len(kept) >= 1
    assert set(listed) <= {"5", "6", "7"}
    assert status == 1


@pytest.mark.timeout(150)
def test_keep_logs_failed_removes_the_histories_of_a_passing_run(
    redis_server_binary: str, postgresql_url: str
) -> None:
    """``--repeat`` keeps the histories of failing runs only: a passing run's are removed."""
    lines: list[str] = []
    result = run_stress(
        StressConfig(db_url=postgresql_url, seconds=1, workers=2, keep_logs="failed", lock_wait=60),
        log=lines.append,
    )
    assert result.report.ok, result.format()
    assert not [line for line in lines if "histories kept" in line]
