"""What only the asyncio flavour has: the install targets, its misuses, and a loop never blocked.

The behaviour both flavours share is ``test_flavours``. Here: ``async_scoped_session`` and
``AsyncSession`` subclasses are covered like ``async_sessionmaker``; a client of the wrong kind
or bound to another event loop fails at ``install()``; and with Redis frozen (SIGSTOP on a
throwaway server) while tasks read and write, the event loop keeps running (lag under 50 ms),
callers get the database's rows, no thread is started, and the cache is back in use once Redis
answers again (the circuit breaker's probe ran as a task on the loop).
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import weakref
from typing import Any

import pytest
import redis
import redis.asyncio
from _flavours import async_url
from _loop_watch import LoopWatch
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from sqlalchemy import String, select
from sqlalchemy.ext.asyncio import (
    AsyncAttrs,
    AsyncSession,
    async_scoped_session,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_writethrough import CachedModel, ConfigurationError, WriteThroughCache
from stress.redis_server import RedisServer

from _sentinel import require_redis_server
from _servers import capture_sql, reset_schema


class Base(AsyncAttrs, DeclarativeBase):
    pass


class AsRow(Base, CachedModel):
    __tablename__ = "as_row"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    n: Mapped[int] = mapped_column(default=0)


@pytest.fixture
def schema(engine: Any) -> Any:
    reset_schema(engine, Base.metadata)
    return engine


async def _seed_and_read(factory: Any, cache: WriteThroughCache, engine: Any) -> tuple[str, int]:
    async with factory() as session:
        session.add(AsRow(id=1, name="one"))
        await session.commit()
    async with factory() as session:
        with capture_sql(engine.sync_engine) as sql:
            row = await session.get(AsRow, 1)
        return row.name, len(sql)


@pytest.mark.databases("sqlite")
@pytest.mark.parametrize("kind", ["scoped", "subclass"])
def test_async_scoped_session_and_asyncsession_subclasses_are_covered(
    kind: str, schema: Any, db_url: str, prefix: str, redis_url: str, loop: Any
) -> None:
    async def scenario() -> tuple[str, int]:
        engine = create_async_engine(async_url(db_url))
        cache = WriteThroughCache(redis_url, prefix=prefix)
        try:
            if kind == "scoped":
                target: Any = async_scoped_session(
                    async_sessionmaker(engine, expire_on_commit=False),
                    scopefunc=asyncio.current_task,
                )
                factory = target
            else:

                class MySession(AsyncSession):
                    pass

                target = MySession
                factory = async_sessionmaker(engine, class_=MySession, expire_on_commit=False)
            cache.install(target)
            if kind == "scoped":
                async with factory() as session:
                    session.add(AsRow(id=1, name="one"))
                    await session.commit()
                with capture_sql(engine.sync_engine) as sql:
                    row = await factory.get(AsRow, 1)
                await factory.remove()
                return row.name, len(sql)
            return await _seed_and_read(factory, cache, engine)
        finally:
            await cache.aclose()
            await engine.dispose()

    assert loop.run_until_complete(scenario()) == ("one", 0)


@pytest.mark.databases("sqlite")
def test_installing_on_an_asyncsession_leaves_other_factories_alone(
    schema: Any, db_url: str, prefix: str, redis_url: str, loop: Any
) -> None:
    """The listeners go on a Session subclass of the factory's own: a second factory on the
    same engine, not installed, never reads Redis."""

    async def scenario() -> tuple[int, int]:
        engine = create_async_engine(async_url(db_url))
        cache = WriteThroughCache(redis_url, prefix=prefix)
        installed = async_sessionmaker(engine, expire_on_commit=False)
        plain = async_sessionmaker(engine, expire_on_commit=False)
        cache.install(installed)
        try:
            await _seed_and_read(installed, cache, engine)
            async with plain() as session:
                with capture_sql(engine.sync_engine) as sql:
                    await session.get(AsRow, 1)
            return len(sql), cache.stats().hits
        finally:
            cache.uninstall(installed)
            await cache.aclose()
            await engine.dispose()

    assert loop.run_until_complete(scenario()) == (1, 1)


@pytest.mark.databases("sqlite")
def test_one_cache_on_session_and_an_async_factory_raises_at_install(
    schema: Any, db_url: str, prefix: str, redis_url: str, loop: Any
) -> None:
    """An AsyncSession runs a subclass of ``Session``: with the cache installed on ``Session``
    too, both flavours' listeners ran on its commits, and the first async commit raised an
    AttributeError from the cache. install() now refuses, saying where to install instead,
    and the async factory works on its own once ``Session`` is uninstalled."""

    async def scenario() -> tuple[str, int]:
        engine = create_async_engine(async_url(db_url))
        cache = WriteThroughCache(redis_url, prefix=prefix)
        factory = async_sessionmaker(engine, expire_on_commit=False)
        cache.install(Session)
        try:
            with pytest.raises(ConfigurationError, match="async_sessionmaker, for instance"):
                cache.install(factory)
        finally:
            cache.uninstall(Session)
        cache.install(factory)
        try:
            return await _seed_and_read(factory, cache, engine)
        finally:
            cache.uninstall(factory)
            await cache.aclose()
            await engine.dispose()

    assert loop.run_until_complete(scenario()) == ("one", 0)


@pytest.mark.databases("sqlite")
def test_sibling_async_factories_after_an_install_on_asyncsession(
    schema: Any, db_url: str, prefix: str, redis_url: str, loop: Any, monkeypatch: Any
) -> None:
    """An install() on ``AsyncSession`` leaves ``AsyncSession.sync_session_class`` the class
    it made; two default async_sessionmakers inherit it. Each gets a subclass of its own
    again (siblings: both install, each commit goes through the cache once), where the
    second was refused, and before that the two shared one class and ran every hook twice."""

    # the class install() gives AsyncSession stays there: put Session back afterwards
    monkeypatch.setattr(AsyncSession, "sync_session_class", AsyncSession.sync_session_class)

    async def scenario() -> tuple[str, int, int, str]:
        engine = create_async_engine(async_url(db_url))
        earlier = WriteThroughCache(redis_url, prefix=prefix + "-earlier")
        earlier.install(AsyncSession)
        earlier.uninstall(AsyncSession)
        await earlier.aclose()
        cache = WriteThroughCache(redis_url, prefix=prefix)
        one = async_sessionmaker(engine, expire_on_commit=False)
        two = async_sessionmaker(engine, expire_on_commit=False)
        cache.install(one)
        cache.install(two)
        try:
            name, sql = await _seed_and_read(one, cache, engine)
            async with two() as session:
                row = await session.get(AsRow, 1)
            return name, sql, cache.stats().commits, row.name
        finally:
            cache.uninstall(one)
            cache.uninstall(two)
            await cache.aclose()
            await engine.dispose()

    assert loop.run_until_complete(scenario()) == ("one", 0, 1, "one")


@pytest.mark.databases("sqlite")
def test_one_cache_on_a_sessionmaker_and_an_async_sessionmaker(
    schema: Any, db_url: str, prefix: str, redis_url: str, loop: Any
) -> None:
    """The installation docs recommend for sync and async code side by side: both work."""

    async def scenario() -> tuple[str, int, str]:
        engine = create_async_engine(async_url(db_url))
        cache = WriteThroughCache(redis_url, prefix=prefix)
        factory = async_sessionmaker(engine, expire_on_commit=False)
        sync_factory = sessionmaker(engine.sync_engine)
        cache.install(sync_factory)
        cache.install(factory)
        try:
            name, sql = await _seed_and_read(factory, cache, engine)
            with sync_factory() as session:
                row = session.get(AsRow, 1)
                assert row is not None
                return name, sql, row.name
        finally:
            cache.uninstall(factory)
            cache.uninstall(sync_factory)
            await cache.aclose()
            await engine.dispose()

    assert loop.run_until_complete(scenario()) == ("one", 0, "one")


@pytest.mark.databases("sqlite")
def test_close_on_the_loop_of_a_cache_serving_asyncsessions_says_aclose(
    schema: Any, db_url: str, prefix: str, redis_url: str, loop: Any
) -> None:
    """A cache given a URL serves sync and async sessions; ``close()`` called on the event
    loop returned and left the ``redis.asyncio`` connections open (a ResourceWarning at
    exit, a connection held on the server). It now raises, naming ``aclose()``; the cache
    keeps working, and ``aclose()`` then closes it."""

    async def scenario() -> tuple[str, int]:
        engine = create_async_engine(async_url(db_url))
        cache = WriteThroughCache(redis_url, prefix=prefix)
        factory = async_sessionmaker(engine, expire_on_commit=False)
        cache.install(factory)
        try:
            result = await _seed_and_read(factory, cache, engine)
            with pytest.raises(ConfigurationError, match=r"await cache\.aclose\(\)"):
                cache.close()
            async with factory() as session:
                assert (await session.get(AsRow, 1)).name == "one"
            return result
        finally:
            cache.uninstall(factory)
            await cache.aclose()
            await engine.dispose()

    assert loop.run_until_complete(scenario()) == ("one", 0)


def test_a_sync_client_with_an_async_factory_fails_at_install(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url, socket_timeout=0.5)
    cache = WriteThroughCache(client, prefix="as-misuse")
    engine = create_async_engine("sqlite+aiosqlite://")
    try:
        with pytest.raises(ConfigurationError, match=r"redis\.asyncio"):
            cache.install(async_sessionmaker(engine))
    finally:
        client.close()


def test_an_async_client_with_a_sync_factory_fails_at_install(redis_url: str) -> None:
    client = redis.asyncio.Redis.from_url(redis_url, socket_timeout=0.5)
    cache = WriteThroughCache(client, prefix="as-misuse")
    with pytest.raises(ConfigurationError, match="AsyncSession"):
        cache.install(sessionmaker())


def test_a_single_asyncsession_is_refused(redis_url: str) -> None:
    cache = WriteThroughCache(redis_url, prefix="as-misuse")
    try:
        with pytest.raises(ConfigurationError, match="not a single Session"):
            cache.install(AsyncSession())
    finally:
        cache.redis.close()


def test_a_client_bound_to_another_loop_fails_at_install(redis_url: str) -> None:
    client = redis.asyncio.Redis.from_url(redis_url, socket_timeout=0.5)
    other = asyncio.new_event_loop()
    try:
        other.run_until_complete(client.ping())  # its connection now belongs to `other`
        cache = WriteThroughCache(client, prefix="as-misuse")

        async def install() -> None:
            cache.install(async_sessionmaker(create_async_engine("sqlite+aiosqlite://")))

        with pytest.raises(ConfigurationError, match="another event loop"):
            asyncio.run(install())
    finally:
        other.run_until_complete(client.aclose())
        other.close()


@pytest.mark.databases("sqlite")
@pytest.mark.parametrize("check_due", [False, True], ids=["check-not-due", "check-due"])
def test_a_restart_costs_no_error_the_dead_connection_is_retried(
    schema: Any, db_url: str, prefix: str, loop: Any, check_due: bool
) -> None:
    """A cache given a URL builds its redis.asyncio client with one retry for a pooled
    connection that died (a restart), as the sync client has: the first call after the restart
    reconnects instead of failing (the retry is redis.asyncio's own, awaited).

    ``check-due``: the connection's periodic epoch check is due when it is next used (its
    interval passed while the restart blocked the loop, as on a loaded machine). asyncio sees
    the server's close only once its loop runs, so the pool handed the dead connection out and
    the check, sent on it outside the client's retry, failed: one ConnectionError, the get
    read the database (``check-not-due`` failed so, twice, under CI's load). The check now
    runs under the retry, as commands do: the connection is reconnected and checked."""
    require_redis_server()
    server = RedisServer()
    server.start()

    async def scenario() -> dict[str, int]:
        engine = create_async_engine(async_url(db_url))
        # the retry of a dead connection is tested here, not the timeouts: on a loaded CI
        # machine one reconnection once took longer than the default 0.5 s
        cache = WriteThroughCache(
            server.url,
            prefix=prefix,
            stats_interval=None,
            socket_timeout=5.0,
            socket_connect_timeout=5.0,
            epoch_check_interval=0.05 if check_due else 1.0,
        )
        factory = async_sessionmaker(engine, expire_on_commit=False)
        cache.install(factory)
        try:
            async with factory() as session:
                session.add(AsRow(id=1, name="one"))
                await session.commit()
            server.restart()  # every pooled connection is dead now; the loop has not seen it
            if check_due:
                time.sleep(0.2)  # blocking too: the check is due
            async with factory() as session:
                assert (await session.get(AsRow, 1)).name == "one"
            return dict(cache.stats().errors_by_kind)  # the kind, should one fail
        finally:
            await cache.aclose()
            await engine.dispose()

    try:
        assert loop.run_until_complete(scenario()) == {}
    finally:
        server.close()


@pytest.mark.databases("sqlite")
def test_a_cache_dropped_while_redis_was_away_stops_probing(
    schema: Any, db_url: str, prefix: str, loop: Any
) -> None:
    """An AsyncSession's cache dropped (uninstalled, never closed) while its breaker was open:
    its prober, a task on the loop, kept it alive and probed Redis every second for as long
    as the loop ran, and used a server that answered on that address again. A collected cache
    stops probing (as a sync one's thread does: tests/test_redis_failures.py)."""
    require_redis_server()
    server = RedisServer()
    server.start()

    async def scenario() -> tuple[bool, int, int]:
        engine = create_async_engine(async_url(db_url))
        cache = WriteThroughCache(server.url, prefix=prefix, stats_interval=None)
        factory = async_sessionmaker(engine, expire_on_commit=False)
        cache.install(factory)
        async with factory() as session:
            session.add(AsRow(id=1, name="one"))
            await session.commit()
        server.stop()
        for _ in range(5):  # Redis away: the breaker opens, its prober is a task on this loop
            async with factory() as session:
                assert (await session.get(AsRow, 1)).name == "one"  # type: ignore[union-attr]
        cache.uninstall(factory)
        dropped = weakref.ref(cache)
        del cache, session  # a session made before uninstall() keeps the cache's listeners
        gc.collect()
        gc.collect()  # a class collected drops its listeners' deque in a weakref callback
        server.start()  # same port, no data
        observer = server.admin()
        try:
            before = int(observer.info("stats")["total_connections_received"])
            await asyncio.sleep(2.5)  # the loop runs: more than the prober's longest pause, twice
            after = int(observer.info("stats")["total_connections_received"])
        finally:
            observer.close()
            await engine.dispose()
        return dropped() is None, before, after

    try:
        collected, before, after = loop.run_until_complete(scenario())
    finally:
        server.close()
    assert collected, "the dropped cache is still alive"
    assert after == before, "a dropped cache connected to Redis"


@pytest.mark.databases("postgresql")
def test_a_frozen_redis_never_blocks_the_event_loop(
    schema: Any, db_url: str, prefix: str, loop: Any
) -> None:
    """Redis stops answering (SIGSTOP) while 6 tasks read and write: every call waits out its
    socket timeout on the loop, then the breaker opens; the callers get the database's rows, no
    thread is started, and after SIGCONT the breaker's probe (a task on the loop) puts the
    cache back in use. The loop never stays on one line for 50 ms (a blocking client would
    wait out the 300 ms socket timeout on every call, and tests/_loop_watch.py sees it), and
    the ticks' lateness beyond 50 ms adds up to under 0.3 s of the 1.5 s window: on an idle
    machine no tick is that late; on a loaded one the tasks' own CPU work and the machine
    delay the loop too, frozen Redis or not."""
    require_redis_server()
    server = RedisServer()
    server.start()

    async def scenario() -> dict[str, Any]:
        engine = create_async_engine(async_url(db_url), pool_size=8)
        client = redis.asyncio.Redis.from_url(
            server.url,
            socket_timeout=0.3,
            socket_connect_timeout=0.3,
            retry=AsyncRetry(NoBackoff(), 0),
        )
        cache = WriteThroughCache(client, prefix=prefix, breaker_cooldown=0.05)
        factory = async_sessionmaker(engine, expire_on_commit=False)
        cache.install(factory)
        async with factory() as session:
            session.add_all([AsRow(id=i, name=f"r{i}") for i in range(1, 7)])
            await session.commit()
        threads_before = {t.ident for t in threading.enumerate()}
        stop = asyncio.Event()

        wrong: list[Any] = []
        done = 0

        async def worker(row_id: int) -> None:
            nonlocal done
            while not stop.is_set():
                async with factory() as session:
                    row = await session.get(AsRow, row_id)
                    if row is None or row.name != f"r{row_id}":
                        wrong.append(row)
                    row.n += 1
                    await session.commit()
                async with factory() as session:
                    found = await session.scalar(select(AsRow.n).where(AsRow.id == row_id))
                    if found != row.n:
                        wrong.append((row_id, row.n, found))
                done += 1

        tick = asyncio.ensure_future(watch.tick(stop))
        workers = [asyncio.ensure_future(worker(i)) for i in range(1, 7)]
        await asyncio.sleep(0.75)
        server.freeze()
        watch.window = "frozen"
        try:
            await asyncio.sleep(1.5)
            stop.set()
            await asyncio.gather(*workers, tick)
        finally:
            server.thaw()
        frozen_errors = cache.stats().errors
        new_threads = {t.ident for t in threading.enumerate()} - threads_before

        # Redis answers again: the probe closes the breaker; reads are served from Redis again
        deadline = time.monotonic() + 10
        hits_before = cache.stats().hits
        while time.monotonic() < deadline:
            async with factory() as session:
                await session.get(AsRow, 1)
            if cache.stats().hits > hits_before:
                break
            await asyncio.sleep(0.05)
        result = {
            "wrong": wrong,
            "done": done,
            "errors": frozen_errors,
            "new threads": new_threads,
            "back": cache.stats().hits > hits_before,
        }
        await client.aclose()
        await engine.dispose()
        return result

    try:
        with LoopWatch(loop, blocked=0.05) as watch:
            result = loop.run_until_complete(scenario())
    finally:
        server.thaw()
        server.stop()
    result.update(lag=watch.lag, stalled=watch.stalled, queued=watch.queued)
    assert result["wrong"] == []
    assert result["done"] > 0 and result["errors"] > 0
    assert result["new threads"] == set()
    assert watch.blocks == [], "\n".join(watch.blocks)
    assert watch.stalled.get("frozen", 0.0) < 0.3, result
    assert result["back"]
