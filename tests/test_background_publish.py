"""``publish="background"``: the publish after COMMIT runs on a background worker.

What a user can observe: ``commit()`` returns while the entries are still locked; readers meanwhile
miss and get the committed row from the database (never the old value, never a fill); the value
lands afterwards, in commit order; a rollback's restore too; ``close()`` and the ``atexit`` hook
flush what is pending; a failed background publish is journaled like a synchronous one.

The worker is held with its test hook (``Publisher._go``) to keep a publish pending. Each scenario
runs for both flavours (a daemon thread for ``redis.Redis``, a task on the loop for
``redis.asyncio``) where the flavour matters.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from _flavours import FLAVOURS, Harness
from _proxy import RECOVERY_DEADLINE_S, LoopbackProxy, fast_client, upstream_of
from sqlalchemy import String
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncAttrs
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from sqlalchemy_writethrough import CachedModel, WriteThroughCache
from sqlalchemy_writethrough.background import Publisher
from sqlalchemy_writethrough.config import OptionError

from _cache_helpers import cached_values, entry_key, entry_state
from _servers import capture_sql, reset_schema


class Base(AsyncAttrs, DeclarativeBase):
    pass


class BgItem(Base, CachedModel):
    __tablename__ = "bg_item"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    qty: Mapped[int] = mapped_column(default=0)


class BgOwnItem(Base, CachedModel):
    """Publishes in the background by its own option, under a synchronous cache."""

    __tablename__ = "bg_own_item"
    __writethrough__ = {"publish": "background"}
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))


@pytest.fixture(params=FLAVOURS)
def h(
    request: pytest.FixtureRequest, db_url: str, redis_url: str, prefix: str
) -> Iterator[Harness]:
    harness = Harness(request.param, db_url, redis_url, prefix)
    reset_schema(harness.engine, Base.metadata)
    try:
        yield harness
    finally:
        for cache in harness.caches:
            publisher_of(harness, cache)._go.set()
            flush(harness, cache)
        harness.close()


def publisher_of(h: Harness, cache: WriteThroughCache) -> Publisher:
    flavour = cache._async if h.is_async else cache._sync
    assert flavour is not None and flavour.write.publisher is not None
    return flavour.write.publisher


def flush(h: Harness, cache: WriteThroughCache) -> bool:
    """Every pending publish written (the async worker runs only while its loop does)."""
    if h.is_async:
        done: bool = h.run(cache.aflush_publishes(timeout=20.0))
        return done
    return cache.flush_publishes(timeout=20.0)


def seeded(h: Harness, **options: Any) -> tuple[WriteThroughCache, Any]:
    """A background-publishing cache, a factory, and items 1 and 2 published."""
    options.setdefault("publish", "background")
    cache = h.cache(**options)
    factory = h.factory(cache, expire_on_commit=False)
    with h.session(factory) as s:
        s.add(BgItem(id=1, name="one"))
        s.add(BgItem(id=2, name="two"))
        s.commit()
    assert flush(h, cache)
    return cache, factory


def name_in_redis(h: Harness, cache: WriteThroughCache, client: redis.Redis, pk: int) -> Any:
    held = cached_values(cache, client, BgItem, pk, dialect=h.engine.dialect, bind=h.engine)
    return None if held is None else held["name"]


def key(h: Harness, cache: WriteThroughCache, pk: int, model: type = BgItem) -> str:
    return entry_key(cache, model, pk, bind=h.engine)


def rename(h: Harness, factory: Any, pk: int, name: str) -> None:
    with h.session(factory) as s:
        s.get(BgItem, pk).name = name
        s.commit()


def test_readers_miss_while_the_publish_is_pending_then_the_value_lands(
    h: Harness, redis_client: redis.Redis
) -> None:
    cache, factory = seeded(h)
    assert name_in_redis(h, cache, redis_client, 1) == "one"
    publisher_of(h, cache)._go.clear()
    rename(h, factory, 1, "new")  # commit() returns with the publish still queued
    assert entry_state(redis_client, key(h, cache, 1)) == "lock"
    assert cache.stats().pending_publishes == 1

    with h.session(factory) as s, h.sql() as sql:
        assert s.get(BgItem, 1).name == "new"  # the database's row, never "one"
    assert len(sql) == 1
    assert entry_state(redis_client, key(h, cache, 1)) == "lock"  # no fill over the lock
    stats = cache.stats()
    assert (stats.locked_reads, stats.fills, stats.commits) == (1, 0, 2)

    publisher_of(h, cache)._go.set()
    assert flush(h, cache)
    assert name_in_redis(h, cache, redis_client, 1) == "new"
    with h.session(factory) as s, h.sql() as sql:
        assert s.get(BgItem, 1).name == "new"
    assert sql == []
    stats = cache.stats()
    assert (stats.publishes, stats.pending_publishes, stats.cache_write_failures) == (3, 0, 0)


def test_queued_publishes_land_in_commit_order_in_one_batch(
    h: Harness, redis_client: redis.Redis
) -> None:
    """Three commits queued behind the held worker (row 1 twice, row 2 once) are written in one
    round trip, in order: row 1 ends as the later value or a miss (the second writer found the
    first one's lock: contended), never the earlier one; row 2 is published."""
    cache, factory = seeded(h)
    publisher_of(h, cache)._go.clear()
    rename(h, factory, 1, "first")
    rename(h, factory, 2, "other")
    rename(h, factory, 1, "second")
    assert cache.stats().pending_publishes == 3
    for pk in (1, 2):
        assert entry_state(redis_client, key(h, cache, pk)) == "lock"
    publisher_of(h, cache)._go.set()
    assert flush(h, cache)

    assert name_in_redis(h, cache, redis_client, 1) in (None, "second")
    assert entry_state(redis_client, key(h, cache, 1)) in (None, "value")
    assert name_in_redis(h, cache, redis_client, 2) == "other"
    with h.session(factory) as s:
        assert s.get(BgItem, 1).name == "second"
    assert name_in_redis(h, cache, redis_client, 1) == "second"  # filled from the database
    stats = cache.stats()
    assert stats.pending_publishes == 0
    assert stats.publishes + stats.invalidations_by_reason.get("contended", 0) == 2 + 3


def test_a_queued_publish_keeps_its_rows_while_the_session_writes_on(
    h: Harness, redis_client: redis.Redis
) -> None:
    """The worker builds a queued job's script arguments from what its transaction left: the
    same session's next transactions (a commit of another row, a rollback of the first) are
    queued behind it and change nothing of it. Readers miss meanwhile; each row ends as its
    own last committed value."""
    cache, factory = seeded(h)
    publisher_of(h, cache)._go.clear()
    with h.session(factory) as s:
        s.get(BgItem, 1).name = "first"
        s.commit()
        s.get(BgItem, 2).name = "second"
        s.commit()
        s.get(BgItem, 1).name = "never"
        s.flush()
        s.rollback()
    assert cache.stats().pending_publishes == 3
    for pk in (1, 2):
        assert entry_state(redis_client, key(h, cache, pk)) == "lock"
    with h.session(factory) as s, h.sql() as sql:
        assert (s.get(BgItem, 1).name, s.get(BgItem, 2).name) == ("first", "second")
    assert len(sql) == 2  # both from the database: no fill over the locks
    publisher_of(h, cache)._go.set()
    assert flush(h, cache)
    assert name_in_redis(h, cache, redis_client, 2) == "second"
    # row 1: the rollback's restore found the commit's lock still there (contended): a miss
    # or the committed value, never "one" nor "never"
    assert name_in_redis(h, cache, redis_client, 1) in (None, "first")
    with h.session(factory) as s:
        assert (s.get(BgItem, 1).name, s.get(BgItem, 2).name) == ("first", "second")
    stats = cache.stats()
    assert (stats.pending_publishes, stats.cache_write_failures, stats.commits) == (0, 0, 3)


def test_a_rollback_restores_in_the_background(h: Harness, redis_client: redis.Redis) -> None:
    cache, factory = seeded(h)
    publisher_of(h, cache)._go.clear()
    with h.session(factory) as s:
        s.get(BgItem, 1).name = "never"
        s.flush()
        assert entry_state(redis_client, key(h, cache, 1)) == "lock"
        s.rollback()
    assert entry_state(redis_client, key(h, cache, 1)) == "lock"  # the restore is queued
    with h.session(factory) as s:
        assert s.get(BgItem, 1).name == "one"
    publisher_of(h, cache)._go.set()
    assert flush(h, cache)
    assert name_in_redis(h, cache, redis_client, 1) == "one"
    stats = cache.stats()
    assert (stats.restores, stats.rollbacks, stats.pending_publishes) == (1, 1, 0)


def test_close_waits_for_the_pending_publishes(h: Harness, redis_client: redis.Redis) -> None:
    cache, factory = seeded(h)
    publisher = publisher_of(h, cache)
    publisher._go.clear()
    rename(h, factory, 2, "closed")
    assert entry_state(redis_client, key(h, cache, 2)) == "lock"
    publisher._go.set()
    if h.is_async:
        h.run(cache.aclose())
    else:
        cache.close()
    assert name_in_redis(h, cache, redis_client, 2) == "closed"
    assert publisher.pending == 0


@pytest.mark.databases("postgresql")
def test_a_full_queue_publishes_synchronously(h: Harness, redis_client: redis.Redis) -> None:
    cache, factory = seeded(h, publish_queue=1)
    publisher_of(h, cache)._go.clear()
    rename(h, factory, 1, "queued")
    rename(h, factory, 2, "overflow")  # the queue is full: published before commit() returns
    assert name_in_redis(h, cache, redis_client, 2) == "overflow"
    assert entry_state(redis_client, key(h, cache, 1)) == "lock"
    stats = cache.stats()
    assert (stats.background_overflows, stats.pending_publishes) == (1, 1)
    publisher_of(h, cache)._go.set()
    assert flush(h, cache)
    assert name_in_redis(h, cache, redis_client, 1) == "queued"


@pytest.mark.databases("postgresql")
def test_the_per_model_option_and_a_transaction_with_a_synchronous_model(
    h: Harness, redis_client: redis.Redis
) -> None:
    """A cache that publishes synchronously, with one model that opts in: its commits are
    queued; a transaction that also writes a synchronous model publishes synchronously."""
    cache = h.cache()
    factory = h.factory(cache, expire_on_commit=False)
    publisher_of(h, cache)._go.clear()
    with h.session(factory) as s:
        s.add(BgOwnItem(id=1, name="own"))
        s.commit()
    assert entry_state(redis_client, key(h, cache, 1, BgOwnItem)) == "lock"
    with h.session(factory) as s:
        s.add(BgOwnItem(id=2, name="own"))
        s.add(BgItem(id=3, name="sync"))
        s.commit()
    assert entry_state(redis_client, key(h, cache, 2, BgOwnItem)) == "value"
    assert name_in_redis(h, cache, redis_client, 3) == "sync"
    assert cache.stats().pending_publishes == 1
    publisher_of(h, cache)._go.set()
    assert flush(h, cache)
    assert entry_state(redis_client, key(h, cache, 1, BgOwnItem)) == "value"


def test_a_bad_publish_option_is_refused(redis_url: str) -> None:
    with pytest.raises(OptionError, match="publish must be one of"):
        WriteThroughCache(redis_url, publish="later")  # type: ignore[arg-type]
    cache = WriteThroughCache(redis_url, stats_interval=None)
    with pytest.raises(OptionError, match="publish must be one of"):
        cache.register(BgItem, publish="eventually")


# -------------------------------------------------------------- failures and shutdown


@pytest.mark.databases("postgresql")
def test_a_failed_background_publish_is_journaled_and_its_lock_ends_at_the_replay(
    engine: Engine, prefix: str, redis_client: redis.Redis, redis_url: str
) -> None:
    """Redis stops answering between the commit and the worker's publish: the failure is
    counted and journaled with the owner token; readers get the database row meanwhile; when
    Redis answers again the replay ends the lock and the row is cached again."""
    reset_schema(engine, Base.metadata)
    proxy = LoopbackProxy(upstream_of(redis_url))
    cache = WriteThroughCache(
        fast_client(proxy.url),
        prefix=prefix,
        publish="background",
        breaker_cooldown=0.2,
        stats_interval=None,
    )
    try:
        factory = sessionmaker(engine, expire_on_commit=False)
        cache.install(factory)
        with factory() as s:
            s.add(BgItem(id=1, name="v1"))
            s.commit()
        assert cache.flush_publishes(20.0)
        k = entry_key(cache, BgItem, 1)
        assert entry_state(redis_client, k) == "value"

        publisher = cache._sync.write.publisher  # type: ignore[union-attr]
        assert publisher is not None
        publisher._go.clear()
        with factory() as s:
            obj = s.get(BgItem, 1)
            assert obj is not None
            obj.name = "v2"
            s.commit()
        proxy.blackhole()
        publisher._go.set()
        assert cache.flush_publishes(20.0)
        stats = cache.stats()
        assert (stats.cache_write_failures, stats.journal_size) == (1, 1)
        assert entry_state(redis_client, k) == "lock"

        proxy.forward()
        deadline = time.monotonic() + RECOVERY_DEADLINE_S
        while True:
            with factory() as s, capture_sql(engine) as sql:
                obj = s.get(BgItem, 1)
                assert obj is not None and obj.name == "v2"
            if not sql:
                break
            assert time.monotonic() < deadline, "the lock outlived Redis's return"
            time.sleep(0.05)
        assert cache.stats().journal_size == 0
    finally:
        cache.close()
        proxy.close()


@pytest.mark.databases("sqlite")
def test_a_dropped_cache_is_freed_and_its_publishing_thread_ends(
    engine: Engine, redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    """A cache dropped (uninstalled, never closed) after a background publish: its worker
    thread, waiting for the next job, held the publisher, which holds the cache's write path:
    the cache, its client and the thread lived as long as the process (a cache per tenant or
    per test piled up). It waits on the queue alone now: the cache is freed, and the thread
    ends within its 1 s wait."""
    reset_schema(engine, Base.metadata)
    cache = WriteThroughCache(redis_url, prefix=prefix, publish="background", stats_interval=None)
    factory = sessionmaker(engine)
    cache.install(factory)
    with factory() as s:
        s.add(BgItem(id=1, name="one"))
        s.commit()
    assert cache.flush_publishes(timeout=20.0)
    assert cache_name(cache, redis_client, engine, 1) == "one"  # the thread published it
    assert cache._sync is not None and cache._sync.write.publisher is not None
    worker = cache._sync.write.publisher._thread  # this cache's (other tests' caches have theirs)
    assert worker is not None and worker.is_alive()
    cache.uninstall(factory)
    dropped = weakref.ref(cache)
    del cache, s  # a session made before uninstall() keeps the cache's listeners (off)
    gc.collect()
    gc.collect()  # a class collected drops its listeners' deque in a weakref callback
    assert dropped() is None, "the dropped cache is still alive"
    deadline = time.monotonic() + 5
    while worker.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not worker.is_alive(), "its publishing thread still runs"


def cache_name(cache: WriteThroughCache, client: redis.Redis, engine: Engine, pk: int) -> Any:
    held = cached_values(cache, client, BgItem, pk, dialect=engine.dialect, bind=engine)
    return None if held is None else held["name"]


@pytest.mark.databases("postgresql")
def test_a_process_exiting_with_a_pending_publish_writes_it_at_exit(
    db_url: str, redis_url: str, prefix: str, redis_client: redis.Redis, engine: Engine
) -> None:
    """No close(): the ``atexit`` hook waits for the worker, which was still held when the
    main thread returned."""
    reset_schema(engine, Base.metadata)
    script = textwrap.dedent(
        f"""
        import threading
        from sqlalchemy import String, create_engine
        from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
        from sqlalchemy_writethrough import CachedModel, WriteThroughCache

        class Base(DeclarativeBase):
            pass

        class BgItem(Base, CachedModel):  # as in the test module, without its imports
            __tablename__ = "bg_item"
            id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
            name: Mapped[str] = mapped_column(String(40))
            qty: Mapped[int] = mapped_column(default=0)

        cache = WriteThroughCache({redis_url!r}, prefix={prefix!r}, publish="background",
                                  stats_interval=None)
        factory = sessionmaker(create_engine({db_url!r}))
        cache.install(factory)
        publisher = cache._sync.write.publisher
        publisher._go.clear()
        with factory() as s:
            s.add(BgItem(id=7, name="at exit"))
            s.commit()
        assert publisher.pending == 1
        timer = threading.Timer(0.1, publisher._go.set)
        timer.daemon = True  # the interpreter does not wait for it: only the hook does
        timer.start()
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    cache = WriteThroughCache(redis_url, prefix=prefix, stats_interval=None)
    held = cached_values(cache, redis_client, BgItem, 7, dialect=engine.dialect, bind=engine)
    assert held is not None and held["name"] == "at exit"
