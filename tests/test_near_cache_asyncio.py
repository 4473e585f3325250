"""The near cache (``near_cache=``) under ``AsyncSession``: the same guarantees as sync.

* a hit from memory sends no Redis command and no SQL;
* another client's commit is seen once its message arrives; the session's own at once;
* an IN list with ``from_cache()``: from memory first, one MGET for the rest (the other batch
  cases: test_near_cache_batch.py);
* one near cache serves both flavours of a cache given a URL;
* closing the ``redis.asyncio`` client, or installing on another factory, does not end the
  subscription (the subscriber is a thread on a synchronous twin of the client);
* a frozen Redis: the near cache stops serving within the bound, the event loop is never
  blocked, and the callers get the database's rows;
* a Redis that forgets (a restart): nothing older than the bound behind a completed commit;
* a ``redis.asyncio`` Sentinel client, across a failover.

Tests wait for messages by polling (``asyncio.sleep``); none asserts a duration, except the
staleness bound itself, measured from when the commit returned.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis
import redis.asyncio
from _flavours import async_url
from _loop_watch import LoopWatch
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from sqlalchemy import String, select, update
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from sqlalchemy_writethrough import CachedModel, NearCacheOptions, WriteThroughCache, from_cache
from sqlalchemy_writethrough.near import TwinSubscriptions
from stress.redis_server import RedisServer

from _cache_helpers import BOUND, LASTING, entry_key, monitored, near_of
from _servers import capture_sql, reset_schema

pytestmark = pytest.mark.databases("sqlite")


class Base(DeclarativeBase):
    pass


class NaItem(Base, CachedModel):
    __tablename__ = "na_item"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))


# ---------------------------------------------------------------------------- helpers


async def await_until(condition: Callable[[], Any], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def serving(cache: WriteThroughCache) -> None:
    """Until the subscription is confirmed and has handled everything published so far."""
    near = near_of(cache)
    now = time.monotonic()
    await await_until(lambda: near.serving() and near._heard >= now, "the subscription")


async def seed(factory: Any, *objects: Any) -> None:
    async with factory() as s:
        s.add_all(objects)
        await s.commit()


async def name_of(factory: Any, pk: int = 1) -> str:
    async with factory() as s:
        obj = await s.get(NaItem, pk)
        assert obj is not None
        return str(obj.name)


async def rename(factory: Any, name: str, pk: int = 1) -> None:
    async with factory() as s:
        obj = await s.get(NaItem, pk)
        assert obj is not None
        obj.name = name
        await s.commit()


def run(loop: asyncio.AbstractEventLoop, scenario: Callable[[], Awaitable[Any]]) -> Any:
    return loop.run_until_complete(scenario())


@pytest.fixture
def schema(engine: Any) -> Any:
    reset_schema(engine, Base.metadata)
    return engine


def async_client(url: str, **kwargs: Any) -> Any:
    kwargs.setdefault("socket_timeout", 1)
    return redis.asyncio.Redis.from_url(url, **kwargs)


def near_cache(client: Any, prefix: str, **options: Any) -> WriteThroughCache:
    options.setdefault("near_cache", NearCacheOptions(staleness=LASTING))
    return WriteThroughCache(client, prefix=prefix, stats_interval=None, **options)


# ------------------------------------------------------------------------------ tests


def test_a_hit_from_memory_sends_no_redis_command_and_no_sql(
    schema: Any, db_url: str, redis_url: str, prefix: str, loop: Any
) -> None:
    async def scenario() -> None:
        engine = create_async_engine(async_url(db_url))
        client = async_client(redis_url)
        cache = near_cache(client, prefix)
        try:
            factory = async_sessionmaker(engine, expire_on_commit=False)
            cache.install(factory)
            near = near_of(cache)
            assert isinstance(near.source, TwinSubscriptions)
            await seed(factory, NaItem(id=1, name="a"))
            await serving(cache)
            assert await name_of(factory) == "a"  # from Redis, now in memory
            with monitored(redis_url, prefix) as commands, capture_sql(engine.sync_engine) as sql:
                assert await name_of(factory) == "a"
                assert await name_of(factory) == "a"
            assert commands == []
            assert sql == []
            assert near.hits == 2
            stats = cache.stats()
            assert stats.near_hits == 2 and stats.models["NaItem"].near_hits == 2
        finally:
            await cache.aclose()
            await client.aclose()
            await engine.dispose()

    run(loop, scenario)


def test_another_client_commit_is_seen_once_its_message_arrives_own_commits_at_once(
    schema: Any, db_url: str, redis_url: str, prefix: str, loop: Any
) -> None:
    async def scenario() -> None:
        engine = create_async_engine(async_url(db_url))
        reader_client, writer_client = async_client(redis_url), async_client(redis_url)
        reader, writer = near_cache(reader_client, prefix), near_cache(writer_client, prefix)
        try:
            mine = async_sessionmaker(engine, expire_on_commit=False)
            theirs = async_sessionmaker(engine, expire_on_commit=False)
            reader.install(mine)
            writer.install(theirs)
            await seed(theirs, NaItem(id=1, name="a"))
            await serving(reader)
            near = near_of(reader)
            assert await name_of(mine) == "a" and await name_of(mine) == "a"
            assert near.hits == 1
            key = entry_key(reader, NaItem, 1, bind=schema)
            await rename(theirs, "b")
            await await_until(lambda: key not in near._entries, "the writer's message")
            # its lock's message, then its publish's: a read that began before the second one
            # was handled keeps no copy (the fill race); once both are, the next read copies it
            await serving(reader)
            assert await name_of(mine) == "b"
            assert await name_of(mine) == "b"
            hits = near.hits
            assert hits == 2
            # its own commit: read at once, without waiting for its message
            await rename(mine, "c")
            assert await name_of(mine) == "c"
            async with mine() as s:  # and a rollback leaves the committed row
                obj = await s.get(NaItem, 1)
                assert obj is not None
                obj.name = "never"
                await s.flush()
                await s.rollback()
            assert await name_of(mine) == "c"
        finally:
            for cache, client in ((reader, reader_client), (writer, writer_client)):
                await cache.aclose()
                await client.aclose()
            await engine.dispose()

    run(loop, scenario)


def test_an_in_list_is_served_from_memory_and_sees_another_client_commit(
    schema: Any, db_url: str, redis_url: str, prefix: str, loop: Any
) -> None:
    """A batch read (``select()`` of an IN list with ``from_cache()``): the keys in memory
    from there, one MGET for the rest, then nothing sent at all; another client's commit to
    one of the rows is seen once its message arrives."""

    async def batch(factory: Any, ids: list[int]) -> list[tuple[int, str]]:
        async with factory() as s:
            stmt = select(NaItem).where(NaItem.id.in_(ids)).options(from_cache())
            return [(row.id, row.name) for row in await s.scalars(stmt)]

    async def scenario() -> None:
        engine = create_async_engine(async_url(db_url))
        reader_client, writer_client = async_client(redis_url), async_client(redis_url)
        reader = near_cache(reader_client, prefix)
        writer = near_cache(writer_client, prefix)
        try:
            mine = async_sessionmaker(engine, expire_on_commit=False)
            theirs = async_sessionmaker(engine, expire_on_commit=False)
            reader.install(mine)
            writer.install(theirs)
            await seed(theirs, *[NaItem(id=i, name=f"n{i}") for i in (1, 2, 3)])
            await serving(reader)
            near = near_of(reader)
            assert await name_of(mine, 1) == "n1"  # 1 in memory
            ids = [3, 2, 1]
            with monitored(redis_url, prefix) as commands:
                assert await batch(mine, ids) == [(1, "n1"), (2, "n2"), (3, "n3")]  # key order
            assert [c.split(" ")[0].strip('"').upper() for c in commands] == ["MGET"]
            assert entry_key(reader, NaItem, 1, bind=schema) not in commands[0]
            assert near.hits == 1
            with monitored(redis_url, prefix) as commands, capture_sql(engine.sync_engine) as sql:
                assert await batch(mine, ids) == [(1, "n1"), (2, "n2"), (3, "n3")]  # key order
            assert commands == [] and sql == []
            assert near.hits == 4 and reader.stats().near_hits == 4
            key = entry_key(reader, NaItem, 2, bind=schema)
            await rename(theirs, "b", pk=2)
            await await_until(lambda: key not in near._entries, "the writer's message")
            assert await batch(mine, ids) == [(1, "n1"), (2, "b"), (3, "n3")]
            assert near.hits == 6
        finally:
            for cache, client in ((reader, reader_client), (writer, writer_client)):
                await cache.aclose()
                await client.aclose()
            await engine.dispose()

    run(loop, scenario)


def test_one_near_cache_serves_both_flavours_and_outlives_the_asyncio_client(
    schema: Any, db_url: str, redis_url: str, prefix: str, loop: Any
) -> None:
    """A cache given a URL has a sync and an asyncio client: one near cache, one subscriber.
    A cache given a redis.asyncio client subscribes through a twin of its own: the
    application closing (and the client reconnecting) or a second factory change nothing."""

    async def scenario() -> None:
        engine = create_async_engine(async_url(db_url))
        both = WriteThroughCache(
            redis_url,
            prefix=prefix,
            stats_interval=None,
            near_cache=NearCacheOptions(staleness=LASTING),
        )
        client = async_client(redis_url)
        other = near_cache(client, prefix)
        try:
            sync_factory = sessionmaker(schema)
            both.install(sync_factory)
            factory = async_sessionmaker(engine, expire_on_commit=False)
            both.install(factory)
            with sync_factory() as s:
                s.add(NaItem(id=1, name="a"))
                s.commit()
            await serving(both)
            with sync_factory() as s:
                assert s.get(NaItem, 1).name == "a"  # type: ignore[union-attr]
            near = near_of(both)
            assert await name_of(factory) == "a"
            assert near.hits == 1  # the sync session's copy, served to the AsyncSession

            first = async_sessionmaker(engine, expire_on_commit=False)
            other.install(first)
            await serving(other)
            assert await name_of(first) == "a" and await name_of(first) == "a"
            theirs = near_of(other)
            assert theirs.hits == 1
            await client.aclose()  # the application closes its client
            resets = theirs.resets
            await serving(other)  # a heartbeat sent after the close came back
            assert theirs.resets == resets
            second = async_sessionmaker(engine, expire_on_commit=False)
            other.install(second)
            assert await name_of(second) == "a"
            assert theirs.hits == 2
            await rename(factory, "b")  # the other cache's commit reaches this one
            key = entry_key(other, NaItem, 1, bind=schema)
            await await_until(lambda: key not in theirs._entries, "the message")
            assert await name_of(second) == "b"  # the closed client reconnects
        finally:
            await both.aclose()
            await other.aclose()
            await client.aclose()
            await engine.dispose()

    run(loop, scenario)


def test_a_frozen_redis_never_blocks_the_loop_and_serves_nothing_stale(
    schema: Any, db_url: str, prefix: str, loop: Any, server: RedisServer
) -> None:
    """Redis stops answering (SIGSTOP): the heartbeat is late, the near cache stops serving
    within the bound, a row changed behind the cache meanwhile is read from the database,
    and the loop never stays on one line for 50 ms (the subscriber waits in its thread)."""

    async def scenario() -> dict[str, Any]:
        engine = create_async_engine(async_url(db_url))
        client = redis.asyncio.Redis.from_url(
            server.url,
            socket_timeout=0.3,
            socket_connect_timeout=0.3,
            retry=AsyncRetry(NoBackoff(), 0),
        )
        cache = near_cache(
            client, prefix, breaker_cooldown=0.05, near_cache=NearCacheOptions(staleness=BOUND)
        )
        near = near_of(cache)
        factory = async_sessionmaker(engine, expire_on_commit=False)
        cache.install(factory)
        result: dict[str, Any] = {}
        try:
            await seed(factory, NaItem(id=1, name="a"))
            await serving(cache)
            assert await name_of(factory) == "a" and await name_of(factory) == "a"
            assert near.hits == 1
            stop = asyncio.Event()
            tick = asyncio.ensure_future(watch.tick(stop))
            await asyncio.sleep(0.2)
            server.freeze()
            watch.window = "frozen"
            try:
                await await_until(lambda: not near.serving(), "the heartbeat to be late")
                async with engine.begin() as conn:  # behind the cache
                    await conn.execute(update(NaItem).where(NaItem.id == 1).values(name="db"))
                result["frozen"] = [await name_of(factory) for _ in range(5)]
                result["hits while frozen"] = near.hits - 1
                await asyncio.sleep(0.5)
                stop.set()
                await tick
            finally:
                server.thaw()
            watch.window = "after"
            await serving(cache)
            while cache._async is not None and cache._async.runtime.backend.breaker.is_open:
                await name_of(factory)  # the breaker's probe is a task on this loop
                await asyncio.sleep(0.02)
            assert await cache.ainvalidate(NaItem, 1)
            hits = near.hits
            result["after"] = [await name_of(factory) for _ in range(3)]
            result["hits after"] = near.hits - hits
        finally:
            await cache.aclose()
            await client.aclose()
            await engine.dispose()
        return result

    with LoopWatch(loop, blocked=0.05) as watch:
        result = run(loop, scenario)
    assert watch.blocks == [], "\n".join(watch.blocks)
    assert result["frozen"] == ["db"] * 5
    assert result["hits while frozen"] == 0
    assert watch.stalled.get("frozen", 0.0) < 0.3, (watch.lag, watch.stalled)
    # a miss (filled), a read from Redis (copied), a hit
    assert result["after"] == ["db"] * 3 and result["hits after"] == 1


def test_a_redis_that_forgets_serves_nothing_older_than_the_bound(
    schema: Any, db_url: str, prefix: str, loop: Any, server: RedisServer
) -> None:
    """A restart (an empty Redis, every connection dropped): a copy taken before it is not
    served once ``staleness`` has passed since a commit made after it; the subscription comes
    back on the new server, empty."""

    async def scenario() -> None:
        engine = create_async_engine(async_url(db_url))
        reader_client = async_client(server.url, retry=AsyncRetry(NoBackoff(), 1))
        writer_client = async_client(server.url, retry=AsyncRetry(NoBackoff(), 1))
        short = NearCacheOptions(staleness=BOUND)  # the test waits for the bound
        reader = near_cache(reader_client, prefix, epoch_check_interval=0.05, near_cache=short)
        writer = near_cache(writer_client, prefix, epoch_check_interval=0.05, near_cache=short)
        try:
            mine = async_sessionmaker(engine, expire_on_commit=False)
            theirs = async_sessionmaker(engine, expire_on_commit=False)
            reader.install(mine)
            writer.install(theirs)
            await seed(theirs, NaItem(id=1, name="a"))
            await serving(reader)
            near = near_of(reader)
            assert await name_of(mine) == "a" and await name_of(mine) == "a"
            assert near.hits == 1
            resets = near.resets
            server.restart()
            await rename(theirs, "b")
            committed = time.monotonic()
            while True:
                began = time.monotonic()
                seen = await name_of(mine)
                if seen != "a":
                    break
                assert began - committed <= BOUND, "served older than the staleness bound"
            assert seen == "b"
            await await_until(lambda: near.resets > resets, "a new subscription")
            await serving(reader)
            assert await name_of(mine) == "b" and await name_of(mine) == "b"
        finally:
            for cache, client in ((reader, reader_client), (writer, writer_client)):
                await cache.aclose()
                await client.aclose()
            await engine.dispose()

    run(loop, scenario)


def test_an_asyncio_sentinel_client_keeps_it_correct_across_a_failover(
    schema: Any, db_url: str, loop: Any
) -> None:
    """A ``redis.asyncio`` ``master_for()`` client: the subscriber's twin follows the same
    service through the same sentinels, before and after a ``SENTINEL FAILOVER``."""
    from stress.sentinel import wait_for

    from _sentinel import async_master_for, master_for, running_group

    with running_group() as group:

        async def scenario() -> None:
            engine = create_async_engine(async_url(db_url))
            client = async_master_for(group)
            reader = near_cache(client, "nca")
            writer = near_cache(master_for(group), "nca")
            later: WriteThroughCache | None = None
            try:
                mine = async_sessionmaker(engine, expire_on_commit=False)
                reader.install(mine)
                theirs = sessionmaker(schema)
                writer.install(theirs)
                with theirs() as s:
                    s.add(NaItem(id=1, name="a"))
                    s.commit()
                await serving(reader)
                near = near_of(reader)
                assert await name_of(mine) == "a" and await name_of(mine) == "a"
                assert near.hits == 1
                key = entry_key(reader, NaItem, 1, bind=schema)
                await asyncio.to_thread(_rename_sync, theirs, "b")
                await await_until(lambda: key not in near._entries, "the writer's message")
                assert await name_of(mine) == "b"

                old = group.primary_port()
                await asyncio.to_thread(group.failover)
                await asyncio.to_thread(
                    wait_for,
                    lambda: group.primary_port() not in (None, old),
                    10,
                    "the promotion",
                )
                later = near_cache(master_for(group), "nca")
                fresh = sessionmaker(schema)
                later.install(fresh)
                await asyncio.to_thread(_rename_sync, fresh, "c")
                deadline = time.monotonic() + 15
                while await name_of(mine) != "c":
                    assert time.monotonic() < deadline, "the reader never saw the new commit"
                    await asyncio.sleep(0.02)
                await serving(reader)
                hits = near.hits
                assert await name_of(mine) == "c" and await name_of(mine) == "c"
                assert near.hits > hits  # from memory again
                await asyncio.to_thread(_rename_sync, fresh, "d")
                await await_until(lambda: key not in near._entries, "a message after it")
                assert await name_of(mine) == "d"
            finally:
                await reader.aclose()
                await client.aclose()
                for asker in client.connection_pool.sentinel_manager.sentinels:
                    await asker.aclose()
                for cache in (writer, later):
                    if cache is not None:
                        cache.close()
                        cache.redis.close()
                await engine.dispose()

        run(loop, scenario)


def _rename_sync(factory: Any, name: str) -> None:
    with factory() as s:
        obj = s.get(NaItem, 1)
        assert obj is not None
        obj.name = name
        s.commit()


def test_the_subscriber_is_one_thread_per_cache(
    schema: Any, db_url: str, redis_url: str, prefix: str, loop: Any
) -> None:
    """Documented: with ``near_cache`` an asyncio cache starts one thread (the subscriber),
    stopped by ``aclose()``."""

    async def scenario() -> None:
        client = async_client(redis_url)
        before = set(threading.enumerate())
        cache = near_cache(client, prefix)
        started = set(threading.enumerate()) - before
        assert [t.name for t in started] == ["writethrough-near-cache"]
        await serving(cache)
        await cache.aclose()
        await await_until(lambda: not any(t.is_alive() for t in started), "the thread's end")
        assert not near_of(cache).serving()
        await client.aclose()

    run(loop, scenario)


def test_aclose_does_not_wait_for_the_subscriber_on_the_loop(
    redis_url: str, prefix: str, loop: Any
) -> None:
    """``aclose()`` tells the subscriber thread to stop and waits for its end in the loop's
    executor, not on the loop: joining it there would hold the loop until the thread's next
    look for a stop. The loop is watched throughout: no tick of it is late by 50 ms."""

    async def scenario() -> None:
        client = async_client(redis_url)
        cache = near_cache(client, prefix, near_cache=NearCacheOptions(staleness=4.0))
        await serving(cache)
        thread = near_of(cache)._thread
        assert thread is not None
        stop = asyncio.Event()
        tick = asyncio.ensure_future(watch.tick(stop))
        await asyncio.sleep(0.05)
        watch.window = "aclose"
        await cache.aclose()
        await asyncio.sleep(0.05)
        stop.set()
        await tick
        assert not near_of(cache).serving()
        await await_until(lambda: not thread.is_alive(), "the thread's end")
        assert near_of(cache).source.client is None  # it closed the twin it built
        await client.aclose()

    with LoopWatch(loop, blocked=0.05) as watch:
        run(loop, scenario)
    assert watch.blocks == [], "\n".join(watch.blocks)
