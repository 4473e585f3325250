"""A ``redis.asyncio`` client used from more than one event loop never makes the cache raise.

redis-py binds an asyncio connection to the loop that opened it and raises ``RuntimeError``
("Event loop is closed", "got Future attached to a different loop") when it is used from
another; that happens in ordinary setups: ``asyncio.run()`` twice with one cache (a script, a
command-line tool), pytest-asyncio's loop per test with a module-level cache, a client built at
import time. Here, on real Redis and a real database (aiosqlite, asyncpg):

* a plain client (or a URL) works on every loop: the cache opens connections of its own on
  each loop other than the client's (gets served from Redis with no SQL, commits published);
* a client of its own kind on another loop while its own loop is still open is Redis being
  unreachable: the database answers, the commit's keys are journaled, one warning says how to
  build the client per loop; once its loop is closed, the next loop uses it again, with nothing
  stale;
* a circuit breaker opened on a loop that ``asyncio.run()`` then closed probes on the next one;
* a ``redis.asyncio`` Redis Cluster client moves to the next loop when its loop is closed.
"""

from __future__ import annotations

import asyncio
import gc
import io
import json
import logging
import random
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import redis
import redis.asyncio
from _flavours import async_url
from redis.asyncio.cluster import ClusterNode, RedisCluster
from sqlalchemy import String, select
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import NullPool

from sqlalchemy_writethrough import CachedModel, WriteThroughCache, from_cache
from stress.redis_server import RedisServer

from _sentinel import async_master_for, require_redis_server, running_group
from _servers import capture_sql, reset_schema

pytestmark = pytest.mark.databases("sqlite", "postgresql")


class Base(DeclarativeBase):
    pass


class LoopRow(Base, CachedModel):
    __tablename__ = "loop_row"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))


class OwnKindRedis(redis.asyncio.Redis):  # type: ignore[type-arg]
    """A client of the application's own kind: the cache keeps redis-py's own path for it."""

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        return await super().execute_command(*args, **options)


@pytest.fixture
def schema(engine: Any) -> Any:
    reset_schema(engine, Base.metadata)
    return engine


class App:
    """An asyncio application: an async engine (no pool: a database connection belongs to its
    loop too), a factory, the cache installed on it."""

    def __init__(self, db_url: str, cache: WriteThroughCache) -> None:
        self.engine = create_async_engine(async_url(db_url), poolclass=NullPool)
        self.factory = async_sessionmaker(self.engine, expire_on_commit=False)
        self.cache = cache
        cache.install(self.factory)

    async def seed(self, count: int) -> None:
        async with self.factory() as session:
            session.add_all(LoopRow(id=i, name=f"r{i}") for i in range(1, count + 1))
            await session.commit()

    async def names(self, *ids: int) -> tuple[list[str], int]:
        """(the names gets return, how many SQL statements they sent)."""
        with capture_sql(self.engine.sync_engine) as sql:
            async with self.factory() as session:
                found = [await session.get(LoopRow, i) for i in ids]
        return [row.name for row in found if row is not None], len(sql)

    async def from_cache(self, *ids: int) -> tuple[list[str], int]:
        with capture_sql(self.engine.sync_engine) as sql:
            async with self.factory() as session:
                rows = await session.scalars(
                    select(LoopRow).where(LoopRow.id.in_(ids)).options(from_cache())
                )
                names = sorted(row.name for row in rows)
        return names, len(sql)

    async def rename(self, row_id: int, name: str, commit: bool = True) -> None:
        async with self.factory() as session:
            row = await session.get(LoopRow, row_id)
            assert row is not None
            row.name = name
            await session.flush()
            if commit:
                await session.commit()
            else:
                await session.rollback()


def _run_on(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any]) -> Any:
    return loop.run_until_complete(asyncio.wait_for(coro, 20))


@pytest.mark.parametrize("given", ["url", "client", "near cache", "background publish"])
def test_asyncio_run_twice_with_one_cache(
    given: str, schema: Any, db_url: str, prefix: str, redis_url: str
) -> None:
    """The second ``asyncio.run()`` is served as the first: a cached get sends no SQL, a miss
    fills, a ``from_cache()`` IN list is read from Redis, a commit is published and a rollback
    restores, with no error counted (before the fix, the first call on the second loop raised
    RuntimeError, on redis-py 5.0 and 8)."""
    options: dict[str, Any] = {}
    if given == "near cache":
        options["near_cache"] = True
    if given == "background publish":
        options["publish"] = "background"
    target: Any = redis_url
    if given == "client":  # built at import time: no loop yet
        target = redis.asyncio.Redis.from_url(redis_url, socket_timeout=0.5)
    app = App(db_url, WriteThroughCache(target, prefix=prefix, **options))

    async def first() -> tuple[list[str], int]:
        await app.seed(4)  # the commit puts the rows in Redis
        await app.cache.aflush_publishes()  # a background publish lands after commit()
        return await app.names(1, 2)

    async def second() -> dict[str, Any]:
        try:
            seen: dict[str, Any] = {"cached": await app.names(1)}
            await app.cache.ainvalidate(LoopRow, 3)
            seen["miss"] = await app.names(3)
            seen["again"] = await app.names(3)
            seen["in list"] = await app.from_cache(1, 2, 3)
            await app.rename(2, "renamed")
            await app.rename(4, "rolled back", commit=False)
            await app.cache.aflush_publishes()
            seen["after commit"] = await app.names(2, 4)
            seen["errors"] = app.cache.stats().errors
            return seen
        finally:
            await app.cache.aclose()
            if given == "client":  # the application's own: closed by it, on its last loop
                await target.aclose()

    assert asyncio.run(first()) == (["r1", "r2"], 0)
    seen = asyncio.run(asyncio.wait_for(second(), 20))
    assert seen == {
        "cached": (["r1"], 0),
        "miss": (["r3"], 1),
        "again": (["r3"], 0),
        "in list": (["r1", "r2", "r3"], 0),
        "after commit": (["renamed", "r4"], 0),  # 4: its previous value restored
        "errors": 0,
    }


def test_a_plain_client_serves_two_open_loops(
    schema: Any, db_url: str, prefix: str, redis_url: str
) -> None:
    """Two loops open at once take turns with one cache: each is served from Redis, and sees
    the other's commits (before the fix: RuntimeError, attached to a different loop)."""
    client = redis.asyncio.Redis.from_url(redis_url, socket_timeout=0.5)
    app = App(db_url, WriteThroughCache(client, prefix=prefix))
    one, two = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        _run_on(one, app.seed(2))
        assert _run_on(one, app.names(1, 2)) == (["r1", "r2"], 0)
        assert _run_on(two, app.names(1, 2)) == (["r1", "r2"], 0)
        _run_on(two, app.rename(1, "by two"))
        assert _run_on(one, app.names(1)) == (["by two"], 0)
        _run_on(one, app.rename(2, "by one"))
        assert _run_on(two, app.names(1, 2)) == (["by two", "by one"], 0)
        assert app.cache.stats().errors == 0
        _run_on(two, app.cache.aclose())
        _run_on(one, client.aclose())
    finally:
        one.close()
        two.close()


def test_a_client_of_its_own_kind_on_another_open_loop_is_redis_unreachable(
    schema: Any, db_url: str, prefix: str, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A client the cache cannot open connections for on another loop: while its own loop is
    open, another loop's reads go to the database and its commit is journaled, with one
    warning saying how to build the client per loop; once its loop is closed, the next loop
    uses it again and reads the new name, not the one Redis held."""
    client = OwnKindRedis.from_url(redis_url, socket_timeout=0.5)
    cache = WriteThroughCache(client, prefix=prefix, breaker_threshold=100)
    app = App(db_url, cache)
    home, other, third = (asyncio.new_event_loop() for _ in range(3))
    try:
        _run_on(home, app.seed(2))
        assert _run_on(home, app.names(1, 2)) == (["r1", "r2"], 0)
        with caplog.at_level(logging.WARNING, logger="sqlalchemy_writethrough"):
            assert _run_on(other, app.names(1)) == (["r1"], 1)
            _run_on(other, app.rename(1, "while away"))
            assert _run_on(other, app.names(1)) == (["while away"], 1)
        warned = [r.getMessage() for r in caplog.records if "another event loop" in r.getMessage()]
        assert len(warned) == 1 and "one per loop" in warned[0]
        assert cache.stats().errors > 0
        home.close()
        assert _run_on(third, app.names(1)) == (["while away"], 1)  # journal replayed first
        assert _run_on(third, app.names(1)) == (["while away"], 0)
        _run_on(third, client.aclose())
    finally:
        for loop in (home, other, third):
            loop.close()


def test_another_open_loop_does_not_cut_the_clients_own_loop_off(
    schema: Any, db_url: str, prefix: str, redis_url: str
) -> None:
    """A client the cache cannot open connections for on another loop, with the default
    breaker: that loop's calls are refused (Redis unreachable from there), and the client's
    own loop is served from Redis right after, the other loop's commit made good first.
    Before the fix the refusals opened the cache's one breaker, whose prober was a task on
    the other, idle loop: every read of the client's own loop went to the database for as
    long as the other loop stayed open."""
    client = OwnKindRedis.from_url(redis_url, socket_timeout=0.5)
    app = App(db_url, WriteThroughCache(client, prefix=prefix))
    home, other = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        _run_on(home, app.seed(2))
        assert _run_on(home, app.names(1, 2)) == (["r1", "r2"], 0)
        for _ in range(4):
            assert _run_on(other, app.names(1)) == (["r1"], 1)
        _run_on(other, app.rename(2, "while away"))  # journaled: its lock was refused
        assert _run_on(home, app.names(1, 2)) == (["r1", "while away"], 1)
        assert _run_on(home, app.names(1, 2)) == (["r1", "while away"], 0)
        _run_on(home, client.aclose())
    finally:
        home.close()
        other.close()


@pytest.mark.databases("sqlite")
@pytest.mark.parametrize("given", ["url", "client"])
def test_aclose_on_the_next_loop_sends_the_last_counts(
    given: str, schema: Any, db_url: str, prefix: str, redis_url: str, caplog: Any
) -> None:
    """``asyncio.run()`` for the work, ``asyncio.run()`` again for the shutdown (``await
    cache.aclose()``, then the application's own ``client.aclose()``): the last counts go
    through the client on the loop it has moved to. Before the fix they were sent through
    the client as it was, its connections of the closed loop: "could not send the stats to
    Redis: Event loop is closed", and they arrived only at the exit's send, if any."""
    client = redis.asyncio.Redis.from_url(redis_url, socket_timeout=0.5)
    target: Any = redis_url if given == "url" else client
    app = App(db_url, WriteThroughCache(target, prefix=prefix, stats_interval=60))

    async def first() -> tuple[list[str], int]:
        await app.seed(1)
        return await app.names(1)

    async def last() -> None:
        await app.cache.aclose()
        await client.aclose()

    assert asyncio.run(first()) == (["r1"], 0)
    with caplog.at_level(logging.DEBUG, logger="sqlalchemy_writethrough"):
        asyncio.run(last())
    said = [r.getMessage() for r in caplog.records if "could not send the stats" in r.getMessage()]
    assert said == []
    reader = redis.Redis.from_url(redis_url)
    try:
        assert reader.hget(f"{prefix}:stats", "c|LoopRow|hits") == b"1"
    finally:
        reader.delete(f"{prefix}:stats", f"{prefix}:stats:processes")
        reader.close()


def test_a_connection_the_application_took_to_another_loop(
    schema: Any, db_url: str, prefix: str, redis_url: str
) -> None:
    """The application closes the client's connections on the cache's loop and uses the client
    on another loop, so that a pooled connection now belongs there. Once that loop is closed,
    the cache's loop closes the connection and opens it again before using it, served from
    Redis with no error (before, the read failed on it first, asyncio's RuntimeError counted
    as a Redis error, and was served by the retry). While that loop runs in another thread,
    the cache's loop finds Redis unreachable (the database answers, nothing raises); once it
    stops, Redis serves again."""
    client = redis.asyncio.Redis.from_url(redis_url, socket_timeout=0.5)
    cache = WriteThroughCache(client, prefix=prefix, breaker_threshold=100)
    app = App(db_url, cache)
    home, closed, threaded = (asyncio.new_event_loop() for _ in range(3))
    try:
        _run_on(home, app.seed(2))
        assert _run_on(home, app.names(1, 2)) == (["r1", "r2"], 0)

        _run_on(home, client.connection_pool.disconnect())
        assert _run_on(closed, client.ping())  # the pool's connection, connected there
        closed.close()
        assert _run_on(home, app.names(1, 2)) == (["r1", "r2"], 0)
        assert cache.stats().errors == 0

        _run_on(home, client.connection_pool.disconnect())
        thread = threading.Thread(target=threaded.run_forever, daemon=True)
        thread.start()
        try:
            assert asyncio.run_coroutine_threadsafe(client.ping(), threaded).result(20)
            assert _run_on(home, app.names(1)) == (["r1"], 1)
            assert cache.stats().errors > 0
        finally:
            threaded.call_soon_threadsafe(threaded.stop)
            thread.join(20)
        errors = cache.stats().errors
        assert _run_on(home, app.names(1, 2)) == (["r1", "r2"], 0)
        assert cache.stats().errors == errors
        _run_on(threaded, asyncio.sleep(0))  # the close the cache scheduled there
        _run_on(home, client.aclose())
    finally:
        for loop in (home, closed, threaded):
            loop.close()


#: what each script run in a process of its own starts with: its arguments, the model
_SCRIPT_PRELUDE = """
import asyncio, gc, json, sys, warnings
import redis.asyncio
from sqlalchemy import String
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import NullPool
from sqlalchemy_writethrough import CachedModel, WriteThroughCache

db_url, redis_url, prefix = sys.argv[1:4]

class Base(DeclarativeBase):
    pass

class LoopRow(Base, CachedModel):  # as in the test module
    __tablename__ = "loop_row"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
"""

_ACLOSE_SCRIPT = (
    _SCRIPT_PRELUDE
    + """
engine = create_async_engine(db_url, poolclass=NullPool)
factory = async_sessionmaker(engine, expire_on_commit=False)
client = redis.asyncio.Redis.from_url(redis_url, socket_timeout=2)
cache = WriteThroughCache(client, prefix=prefix)
cache.install(factory)

async def seed():
    async with factory() as session:
        session.add_all(LoopRow(id=i, name=f"r{i}") for i in (1, 2))
        await session.commit()

async def names():
    async with factory() as session:
        return [(await session.get(LoopRow, i)).name for i in (1, 2)]

async def last():
    try:
        return await names()
    finally:
        await cache.aclose()

home = asyncio.new_event_loop()  # the client's own loop, open throughout
home.run_until_complete(seed())
home.run_until_complete(names())
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always", ResourceWarning)
    got = [asyncio.run(names()), asyncio.run(last())]
    errors = cache.stats().errors
    cache.uninstall(factory)
    del cache  # and whatever it held
    gc.collect()
home.run_until_complete(client.aclose())
home.close()
print(json.dumps({
    "got": got,
    "errors": errors,
    "warnings": [str(w.message) for w in seen if issubclass(w.category, ResourceWarning)],
}))
"""
)


def assert_aclose_leaves_nothing_open(db_url: str, redis_url: str, prefix: str) -> None:
    """Run :data:`_ACLOSE_SCRIPT` in a process of its own: both runs served, no error, no
    ResourceWarning."""
    done = subprocess.run(
        [
            sys.executable,
            "-W",
            "error::ResourceWarning",
            "-c",
            _ACLOSE_SCRIPT,
            db_url,
            redis_url,
            prefix,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {
        "got": [["r1", "r2"], ["r1", "r2"]],
        "errors": 0,
        "warnings": [],
    }
    assert "ResourceWarning" not in done.stderr, done.stderr


def test_aclose_closes_the_connections_the_cache_opened_for_its_loop(
    schema: Any, db_url: str, prefix: str, redis_url: str
) -> None:
    """A client whose own loop stays open, and ``asyncio.run()`` twice: each run is served by
    connections the cache opens for its loop; those of the first run are closed when the
    second finds its loop closed, those of the second by ``aclose()``. Nothing is left for
    the garbage collector to warn about (before: an unclosed transport for the first run's,
    an unclosed Connection for the second's). In a process of its own: what other tests left
    for the collector is not this test's."""
    assert_aclose_leaves_nothing_open(async_url(db_url), redis_url, prefix)


async def _served_again(app: App, client: Any = None) -> bool:
    """Whether row 1 ("r1") is served from Redis again within 10 s; the cache closed after,
    on this loop, and the application's own client too when given (this is its last loop)."""
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if await app.names(1) == (["r1"], 0):
                return True
            await asyncio.sleep(0.05)
        return False
    finally:
        await app.cache.aclose()
        if client is not None:
            await client.aclose()


@pytest.mark.databases("sqlite")
def test_a_breaker_opened_on_a_closed_loop_probes_on_the_next(
    schema: Any, db_url: str, prefix: str
) -> None:
    """Redis stops answering during one ``asyncio.run()``: the breaker opens, its prober is a
    task on that loop, cancelled when the run ends. Redis answers again: the next run's reads
    come back to Redis (before the fix the breaker waited forever for the dead prober, and the
    cache was never used again)."""
    require_redis_server()
    server = RedisServer()
    server.start()
    try:
        client = redis.asyncio.Redis.from_url(
            server.url, socket_timeout=0.2, socket_connect_timeout=0.2
        )
        cache = WriteThroughCache(client, prefix=prefix, breaker_cooldown=0.05)
        app = App(db_url, cache)

        async def first() -> bool:
            await app.seed(1)
            await app.names(1)
            server.freeze()
            for _ in range(4):
                assert await app.names(1) == (["r1"], 1)
            return cache.stats().errors > 0

        try:
            assert asyncio.run(first())
        finally:
            server.thaw()

        assert asyncio.run(_served_again(app, client))
    finally:
        server.thaw()
        server.stop()


@pytest.mark.databases("sqlite")
def test_a_breaker_opened_on_a_loop_left_idle_probes_on_the_running_one(
    schema: Any, db_url: str, prefix: str
) -> None:
    """Two loops open: Redis stops answering while one of them runs, the breaker opens, its
    prober a task on that loop, which then sits idle (not closed). Redis answers again: the
    other loop's reads come back to Redis. Before the fix they went to the database for as
    long as the first loop stayed idle: the breaker waited for a prober that never ran."""
    require_redis_server()
    server = RedisServer()
    server.start()
    one, two = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        client = redis.asyncio.Redis.from_url(
            server.url, socket_timeout=0.2, socket_connect_timeout=0.2
        )
        cache = WriteThroughCache(client, prefix=prefix, breaker_cooldown=0.05)
        app = App(db_url, cache)
        _run_on(one, app.seed(1))
        assert _run_on(one, app.names(1)) == (["r1"], 0)
        assert _run_on(two, app.names(1)) == (["r1"], 0)
        server.freeze()
        try:
            for _ in range(4):
                assert _run_on(one, app.names(1)) == (["r1"], 1)
        finally:
            server.thaw()

        assert _run_on(two, _served_again(app))
        _run_on(one, client.aclose())  # its prober runs, finds the breaker closed, ends
    finally:
        one.close()
        two.close()
        server.thaw()
        server.stop()


@pytest.mark.databases("sqlite")
def test_a_prober_cancelled_in_the_middle_of_a_probe_leaves_the_next_loop_to_probe(
    schema: Any, db_url: str, prefix: str
) -> None:
    """As above, but the run ends while the prober awaits its probe of the frozen Redis (not
    while it waits between two probes): cancelled there, it must not start another prober on
    the loop being shut down (which never ran and left the breaker "probing" for ever: the
    cache was never used again; seen under load, where a probe's timeout is most of the
    prober's time)."""
    require_redis_server()
    server = RedisServer()
    server.start()
    try:
        client = redis.asyncio.Redis.from_url(
            server.url, socket_timeout=0.5, socket_connect_timeout=0.5
        )
        cache = WriteThroughCache(client, prefix=prefix, breaker_cooldown=0.01)
        app = App(db_url, cache)
        probing = threading.Event()
        loops: list[asyncio.AbstractEventLoop] = []
        hung: list[str] = []

        def rescue() -> None:
            """asyncio.run() did not return: say which tasks it waits for, then let them end."""
            for task in asyncio.all_tasks(loops[0]):
                frames = io.StringIO()
                task.print_stack(file=frames)
                hung.append(frames.getvalue())
            server.thaw()

        async def first() -> None:
            loops.append(asyncio.get_running_loop())
            await app.seed(1)
            await app.names(1)
            flavour = cache._async
            assert flavour is not None
            breaker = flavour.runtime.backend.breaker
            probe = breaker.probe
            assert probe is not None

            def watched() -> bool:
                probing.set()
                return probe()

            breaker.probe = watched
            server.freeze()
            while not breaker.is_open:
                assert await app.names(1) == (["r1"], 1)
            deadline = time.monotonic() + 10
            while not probing.is_set():  # the prober is awaiting the frozen server
                assert time.monotonic() < deadline, "the breaker never probed"
                await asyncio.sleep(0.005)
            breaker.probe = probe

        timer = threading.Timer(30, rescue)
        timer.start()
        try:
            asyncio.run(first())  # cancels the prober in its probe
        finally:
            timer.cancel()
            server.thaw()
        assert not hung, "asyncio.run() hung on:\n" + "\n".join(hung)

        assert asyncio.run(_served_again(app, client))
    finally:
        server.thaw()
        server.stop()


def test_a_prober_whose_probe_swallowed_its_cancellation_stops_with_its_loop() -> None:
    """The prober is cancelled (``asyncio.run()`` ending) in a probe that swallows the
    CancelledError, as a client that turns it into a timeout would: it must not go on probing
    (``asyncio.run()`` would wait for it as long as Redis stays down: a hang, seen once under
    load in the test above)."""
    from sqlalchemy_writethrough._sa_compat import await_
    from sqlalchemy_writethrough.breaker import CircuitBreaker
    from sqlalchemy_writethrough.redis_async import _PROBER_LOOPS

    if not hasattr(asyncio.Task, "cancelling"):
        pytest.skip("Python 3.10: a task does not say it is being cancelled")
    breaker = CircuitBreaker(threshold=1, cooldown=0.01)
    breaker.launch, breaker.pause = _PROBER_LOOPS.launch, _PROBER_LOOPS.pause
    probing, give_up, returned = threading.Event(), threading.Event(), threading.Event()
    swallowed: list[bool] = []

    def probe() -> bool:
        probing.set()
        try:
            await_(asyncio.sleep(0.2))
        except asyncio.CancelledError:
            swallowed.append(True)
        return give_up.is_set()  # healthy once the test gives up: the prober ends

    breaker.probe = probe

    async def main() -> None:
        breaker.failure()  # opens: the prober starts on this loop
        while not probing.is_set():
            await asyncio.sleep(0.001)

    def run() -> None:
        asyncio.run(main())
        returned.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        assert returned.wait(10), "asyncio.run() waited for a prober that probed on"
        assert swallowed == [True]
        assert breaker.is_open  # the next loop's first call starts a prober there
    finally:
        give_up.set()
        thread.join(10)


def _cluster_client(cluster: Any) -> RedisCluster:
    """A client given one node, as ``RedisCluster.from_url()`` builds it: the first slot map
    is read through that startup node, whose ``ClusterNode`` is not the slot map's (given
    them all, which of them answers is random)."""
    host, port = cluster.startup_nodes[0]
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port)], socket_timeout=0.5, socket_connect_timeout=0.5
    )


@pytest.mark.cluster
@pytest.mark.databases("sqlite")
def test_a_cluster_client_moves_to_the_next_loop(
    schema: Any, db_url: str, cluster: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """``asyncio.run()`` twice with a ``redis.asyncio`` Cluster client: the second run is served
    from the cluster and its commit published (before the fix, the get and the commit raised
    RuntimeError); meanwhile another loop, open while the client's own is, goes to the
    database. The application closes the client on its last loop: the startup nodes'
    connections of the first loop were left open when the client moved, and its ``aclose()``
    raised "Event loop is closed"."""
    prefix = f"aloop-{random.randrange(1 << 40):x}"
    client = _cluster_client(cluster)
    app = App(db_url, WriteThroughCache(client, prefix=prefix))

    async def first() -> tuple[list[str], int]:
        await app.seed(3)
        await app.names(1, 2, 3)
        return await app.names(1, 2, 3)

    async def second() -> dict[str, Any]:
        seen: dict[str, Any] = {"cached": await app.names(1, 2, 3)}
        await app.rename(2, "renamed")
        seen["after commit"] = await app.names(2)
        seen["errors"] = app.cache.stats().errors
        return seen

    assert asyncio.run(first()) == (["r1", "r2", "r3"], 0)
    home = asyncio.new_event_loop()
    other = asyncio.new_event_loop()
    try:
        assert _run_on(home, _call(second)) == {
            "cached": (["r1", "r2", "r3"], 0),
            "after commit": (["renamed"], 0),
            "errors": 0,
        }
        with caplog.at_level(logging.WARNING, logger="sqlalchemy_writethrough"):
            assert _run_on(other, app.names(3)) == (["r3"], 1)
        assert any("another event loop" in r.getMessage() for r in caplog.records)
        _run_on(home, app.cache.aclose())
        _run_on(home, client.aclose())  # the application's own, closed on its last loop
    finally:
        home.close()
        other.close()


@pytest.mark.databases("sqlite")
def test_a_sentinel_client_moves_to_the_next_loop(schema: Any, db_url: str) -> None:
    """``asyncio.run()`` twice with a ``redis.asyncio`` Sentinel ``master_for()`` client, strict:
    the second run's first calls (a get, then a commit) are served, locked and published with
    no error, and no socket of the first loop is left open. Before the fix, the sentinels'
    connections of the first, closed loop were asked where the primary is: the get failed
    with "Event loop is closed" (it read the database, an error counted), and a transport of
    the first loop was collected unclosed."""
    prefix = f"aloop-{random.randrange(1 << 40):x}"
    with running_group() as group:
        client = async_master_for(group)
        app = App(db_url, WriteThroughCache(client, prefix=prefix, on_redis_error="strict"))

        async def first() -> tuple[list[str], int]:
            await app.seed(2)
            return await app.names(1, 2)

        async def second() -> dict[str, Any]:
            await app.rename(1, "renamed")  # a get, then a commit: the first calls here
            seen = {"after commit": await app.names(1, 2), "errors": app.cache.stats().errors}
            await app.cache.aclose()
            await client.aclose()  # the application's own, closed on its last loop
            for sentinel in client.connection_pool.sentinel_manager.sentinels:
                await sentinel.aclose()
            return seen

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            assert asyncio.run(first()) == (["r1", "r2"], 0)
            seen = asyncio.run(asyncio.wait_for(second(), 20))
            gc.collect()
        assert seen == {"after commit": (["renamed", "r2"], 0), "errors": 0}
        assert [str(w.message) for w in caught if w.category is ResourceWarning] == []


async def _call(fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    return await fn()


_CLOSE_AFTER_LOOPS_SCRIPT = (
    _SCRIPT_PRELUDE
    + """
engine = create_async_engine(db_url, poolclass=NullPool)
factory = async_sessionmaker(engine, expire_on_commit=False)
cache = WriteThroughCache(redis_url, prefix=prefix, stats_interval=None)
cache.install(factory)

async def seed():
    async with factory() as session:
        session.add_all(LoopRow(id=i, name=f"r{i}") for i in (1, 2))
        await session.commit()

async def names():
    async with factory() as session:
        return [(await session.get(LoopRow, i)).name for i in (1, 2)]

with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always", ResourceWarning)
    idle = asyncio.new_event_loop()  # the URL's client's first loop: idle, then closed
    idle.run_until_complete(seed())
    got = [idle.run_until_complete(names()), asyncio.run(names())]  # the second on a copy
    cache.uninstall(factory)
    cache.close()  # sync code, no loop running: nothing may be left open
    # closed as asyncio.run() and pytest-asyncio close theirs: a run to shut it down first,
    # where the closes scheduled on it run
    idle.run_until_complete(idle.shutdown_asyncgens())
    idle.close()
    errors = cache.stats().errors
    del cache
    gc.collect()
print(json.dumps({
    "got": got,
    "errors": errors,
    "warnings": [str(w.message) for w in seen if issubclass(w.category, ResourceWarning)],
}))
"""
)


def test_close_from_sync_code_after_the_loops_leaves_nothing_open(
    schema: Any, db_url: str, prefix: str, redis_url: str
) -> None:
    """A cache given a URL, used on a loop left idle and on ``asyncio.run()``'s (connections
    the cache opened for it), then ``close()`` from sync code, as the pytest plugin's fixture
    does after a test's loop: every ``redis.asyncio`` connection is closed (before: collected
    with a ``ResourceWarning`` each, failing suites whose warnings are errors). Those of the
    idle loop are closed as redis-py's ``disconnect(nowait=True)`` closes them: scheduled on
    their loop, which runs them when it shuts down."""
    done = subprocess.run(
        [sys.executable, "-c", _CLOSE_AFTER_LOOPS_SCRIPT, async_url(db_url), redis_url, prefix],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {
        "got": [["r1", "r2"], ["r1", "r2"]],
        "errors": 0,
        "warnings": [],
    }


_FIRST_LOADS_AT_ONCE_SCRIPT = (
    _SCRIPT_PRELUDE
    + """
async def main():
    seed = create_async_engine(db_url, poolclass=NullPool)
    async with seed.begin() as conn:
        await conn.execute(LoopRow.__table__.insert(), [{"id": i, "name": f"r{i}"} for i in (1, 2)])
    await seed.dispose()
    engine = create_async_engine(db_url)  # a pool the cache has never asked about
    factory = async_sessionmaker(engine)
    cache = WriteThroughCache(redis_url, prefix=prefix, stats_interval=None)
    cache.install(factory)

    async def name(i):
        async with factory() as session:
            return (await session.get(LoopRow, i)).name

    try:
        return await asyncio.gather(*(name(1 + i % 2) for i in range(6)))
    finally:
        await cache.aclose()
        await engine.dispose()

print(json.dumps(asyncio.run(main())))
"""
)


def test_the_first_loads_of_a_pool_at_once_do_not_hang_the_loop(
    schema: Any, db_url: str, prefix: str, redis_url: str
) -> None:
    """An application's first requests, all at once: each session's first cached load asks
    the database what it is (once per pool), awaiting the driver. The question was asked under
    a thread lock, held across that await: the next session's load, on the same thread,
    waited for the lock, and the event loop with it, for good (PostgreSQL, SQLite, MariaDB
    alike). In a process of its own, bounded: a hang fails the test."""
    done = subprocess.run(
        [sys.executable, "-c", _FIRST_LOADS_AT_ONCE_SCRIPT, async_url(db_url), redis_url, prefix],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == ["r1", "r2"] * 3
