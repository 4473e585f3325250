"""Two caches installed on one session factory, as a SQLAlchemy user would expect of two
extensions on one factory: both work. Each model is served by the cache that caches it (here
cache A caches ``TcUser`` on one prefix, cache B ``TcOrder`` on another), a commit keeps each
cache's entries current, and uninstalling one leaves the other serving. The same on a
``sessionmaker`` and on an ``async_sessionmaker`` (whose sessions run one ``Session`` subclass
the first install made: the second cache's listeners go on it too).

What is observed: the entries each prefix holds (read with a plain client) and the SQL each
get sends."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import redis.asyncio
from _flavours import async_url
from sqlalchemy import String
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_writethrough import WriteThroughCache

from _cache_helpers import cached_values
from _servers import capture_sql, delete_prefix, new_prefix, reset_schema

pytestmark = [pytest.mark.databases("sqlite")]


class Base(DeclarativeBase):
    pass


class TcUser(Base):
    __tablename__ = "tc_user"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))


class TcOrder(Base):
    __tablename__ = "tc_order"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    item: Mapped[str] = mapped_column(String(40))


@pytest.fixture
def schema(engine: Engine) -> Engine:
    reset_schema(engine, Base.metadata)
    with Session(engine) as s:
        s.add_all([TcUser(id=1, name="ann"), TcOrder(id=1, item="tea")])
        s.commit()
    return engine


@pytest.fixture
def prefixes(redis_client: redis.Redis) -> Iterator[tuple[str, str]]:
    made = (new_prefix(), new_prefix())
    yield made
    for prefix in made:
        delete_prefix(redis_client, prefix)


def _caches(target: Any, prefixes: tuple[str, str]) -> tuple[WriteThroughCache, WriteThroughCache]:
    a = WriteThroughCache(target(), prefix=prefixes[0], stats_interval=None)
    a.register(TcUser)
    b = WriteThroughCache(target(), prefix=prefixes[1], stats_interval=None)
    b.register(TcOrder)
    return a, b


class Flavour:
    """The scenario's steps, on a sync or an async factory."""

    def __init__(self, engine: Engine, asynchronous: bool, loop: Any) -> None:
        self.asynchronous = asynchronous
        self.loop = loop
        self.engine = engine
        if asynchronous:
            from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

            self.async_engine = create_async_engine(async_url(str(engine.url)))
            self.factory: Any = async_sessionmaker(self.async_engine, expire_on_commit=False)
            self.sql_engine = self.async_engine.sync_engine
        else:
            self.factory = sessionmaker(engine, expire_on_commit=False)
            self.sql_engine = engine

    def run(self, step: Callable[[], Any]) -> Any:
        return self.loop.run_until_complete(step()) if self.asynchronous else step()

    def get(self, model: type, ident: int) -> tuple[Any, int]:
        """(the attribute value the get returns, how many SQL statements it sent)."""
        column = "name" if model is TcUser else "item"
        if self.asynchronous:

            async def step() -> tuple[Any, int]:
                with capture_sql(self.sql_engine) as sql:
                    async with self.factory() as s:
                        obj = await s.get(model, ident)
                return getattr(obj, column), len(sql)

            return self.run(step)  # type: ignore[no-any-return]
        with capture_sql(self.sql_engine) as sql, self.factory() as s:
            obj = s.get(model, ident)
        return getattr(obj, column), len(sql)

    def rename(self, name: str, item: str) -> None:
        """One commit changing a row of each model."""
        if self.asynchronous:

            async def step() -> None:
                async with self.factory() as s:
                    (await s.get(TcUser, 1)).name = name
                    (await s.get(TcOrder, 1)).item = item
                    await s.commit()

            self.run(step)
            return
        with self.factory() as s:
            s.get(TcUser, 1).name = name
            s.get(TcOrder, 1).item = item
            s.commit()

    def close(self, caches: tuple[WriteThroughCache, ...]) -> None:
        if self.asynchronous:

            async def step() -> None:
                for cache in caches:
                    await cache.aclose()
                    await cache.redis.aclose()
                await self.async_engine.dispose()

            self.run(step)
        else:
            for cache in caches:
                cache.close()
                cache.redis.close()


@pytest.mark.parametrize("flavour", ["sync", "async"])
@pytest.mark.parametrize("first_out", ["A", "B"])
def test_two_caches_on_one_factory_each_serve_their_models(
    schema: Engine,
    redis_url: str,
    redis_client: redis.Redis,
    prefixes: tuple[str, str],
    loop: asyncio.AbstractEventLoop,
    flavour: str,
    first_out: str,
) -> None:
    """``first_out``: the cache uninstalled first (A was installed first, B second: B's
    uninstall must not take A's gets with it, nor A's B's)."""
    app = Flavour(schema, flavour == "async", loop)
    if app.asynchronous:

        def client() -> Any:
            return redis.asyncio.Redis.from_url(redis_url, socket_timeout=1)

        async def build() -> tuple[WriteThroughCache, WriteThroughCache]:
            return _caches(client, prefixes)  # inside the loop its connections will use

        a, b = loop.run_until_complete(build())
    else:
        a, b = _caches(lambda: redis.Redis.from_url(redis_url, socket_timeout=1), prefixes)
    a.install(app.factory)
    b.install(app.factory)
    try:
        assert app.get(TcUser, 1) == ("ann", 1)  # a miss: A fills its entry
        assert app.get(TcOrder, 1) == ("tea", 1)  # B fills its own
        assert app.get(TcUser, 1) == ("ann", 0)  # served by A
        assert app.get(TcOrder, 1) == ("tea", 0)  # served by B
        dialect = schema.dialect
        held_a = cached_values(a, redis_client, TcUser, 1, dialect=dialect)
        held_b = cached_values(b, redis_client, TcOrder, 1, dialect=dialect)
        assert held_a is not None and held_a["name"] == "ann"
        assert held_b is not None and held_b["item"] == "tea"

        app.rename("bob", "coffee")  # one commit: each cache publishes its own model's row
        held_a = cached_values(a, redis_client, TcUser, 1, dialect=dialect)
        held_b = cached_values(b, redis_client, TcOrder, 1, dialect=dialect)
        assert held_a is not None and held_a["name"] == "bob"
        assert held_b is not None and held_b["item"] == "coffee"
        assert app.get(TcUser, 1) == ("bob", 0)
        assert app.get(TcOrder, 1) == ("coffee", 0)

        if first_out == "A":
            a.uninstall(app.factory)  # B keeps serving; A's model goes to the database
            assert app.get(TcOrder, 1) == ("coffee", 0)
            assert app.get(TcUser, 1) == ("bob", 1)
        else:
            b.uninstall(app.factory)  # A keeps serving; B's model goes to the database
            assert app.get(TcUser, 1) == ("bob", 0)
            assert app.get(TcOrder, 1) == ("coffee", 1)
        (b if first_out == "A" else a).uninstall(app.factory)
        assert app.get(TcOrder, 1) == ("coffee", 1)
        assert app.get(TcUser, 1) == ("bob", 1)
        assert (a.stats().errors, b.stats().errors) == (0, 0)
    finally:
        app.close((a, b))


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_model_both_caches_cache_is_kept_current_in_both(
    schema: Engine,
    redis_url: str,
    redis_client: redis.Redis,
    prefixes: tuple[str, str],
    loop: asyncio.AbstractEventLoop,
    flavour: str,
) -> None:
    """Both caches cache ``TcUser``: the first installed answers its reads, a commit
    publishes the row to both (neither is left with a value older than the commit)."""
    app = Flavour(schema, flavour == "async", loop)

    def both(make: Callable[[], Any]) -> tuple[WriteThroughCache, WriteThroughCache]:
        a, b = _caches(make, prefixes)
        b.register(TcUser)
        return a, b

    if app.asynchronous:

        async def build() -> tuple[WriteThroughCache, WriteThroughCache]:
            return both(lambda: redis.asyncio.Redis.from_url(redis_url, socket_timeout=1))

        a, b = loop.run_until_complete(build())
    else:
        a, b = both(lambda: redis.Redis.from_url(redis_url, socket_timeout=1))
    a.install(app.factory)
    b.install(app.factory)
    try:
        assert app.get(TcUser, 1) == ("ann", 1)
        assert app.get(TcUser, 1) == ("ann", 0)
        app.rename("cyd", "tea")
        dialect = schema.dialect
        for cache in (a, b):
            held = cached_values(cache, redis_client, TcUser, 1, dialect=dialect)
            assert held is not None and held["name"] == "cyd"
        a.uninstall(app.factory)
        assert app.get(TcUser, 1) == ("cyd", 0)  # B serves it now, current
    finally:
        app.close((a, b))
