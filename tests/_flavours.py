"""Both flavours behind one face, so that one behaviour suite runs each (``test_flavours``).

A test writes its scenario once, in sync style, against :class:`Harness` and :class:`Sess`:

* ``sync``: a ``sessionmaker`` on a sync driver (psycopg, PyMySQL, sqlite3), a ``redis.Redis``
  client;
* ``async-cluster``: the same, with a ``redis.asyncio.cluster.RedisCluster`` client on the
  ``cluster`` fixture's Redis Cluster (3 primaries, 3 replicas);
* ``async``: an ``async_sessionmaker`` on an asyncio driver (asyncpg, aiomysql, aiosqlite), a
  ``redis.asyncio`` client; every call of the scenario is one coroutine
  (``await session.get(...)``, ``await obj.awaitable_attrs.parent``...) run to completion on
  the harness's event loop. The cache's hooks then run in SQLAlchemy's greenlet and await Redis
  on that loop, as in an application.

What a test asserts (what Redis holds, what SQL reached the database, what the caller got) is
observed the same way for both: SQL on the engine's sync core, Redis through a plain client.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

from sqlalchemy_writethrough import WriteThroughCache

from _servers import capture_sql

FLAVOURS = ("sync", "async")

#: the asyncio driver of each database
ASYNC_DRIVERS = {"postgresql": "asyncpg", "mysql": "aiomysql", "mariadb": "aiomysql"}


def async_url(url: str) -> str:
    """The same database through its asyncio driver."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return str(parsed.set(drivername="sqlite+aiosqlite"))
    query = {k: v for k, v in parsed.query.items() if k != "options"}
    return parsed.set(
        drivername=f"{backend}+{ASYNC_DRIVERS[backend]}", query=query
    ).render_as_string(hide_password=False)


class Sess:
    """A session of either flavour, used in sync style."""

    def __init__(self, harness: Harness, session: Any) -> None:
        self.h = harness
        self.session = session

    def _do(self, result: Any) -> Any:
        return self.h.run(result) if self.h.is_async else result

    def get(self, model: type, ident: Any, **kw: Any) -> Any:
        return self._do(self.session.get(model, ident, **kw))

    def execute(self, statement: Any, **kw: Any) -> Any:
        return self._do(self.session.execute(statement, **kw))

    def scalars(self, statement: Any) -> list[Any]:
        return list(self._do(self.session.scalars(statement)).all())

    def add(self, obj: Any) -> None:
        self.session.add(obj)

    def delete(self, obj: Any) -> None:
        self._do(self.session.delete(obj))

    def flush(self) -> None:
        self._do(self.session.flush())

    def commit(self) -> None:
        self._do(self.session.commit())

    def rollback(self) -> None:
        self._do(self.session.rollback())

    def close(self) -> None:
        self._do(self.session.close())

    @contextlib.contextmanager
    def savepoint(self) -> Iterator[None]:
        """``begin_nested()``: released at the end of the block, rolled back if it raises."""
        nested = self._do(self.session.begin_nested())
        try:
            yield
        except BaseException:
            self._do(nested.rollback())
            raise
        self._do(nested.commit())

    def lazy(self, obj: Any, attr: str) -> Any:
        """A lazy-loaded attribute: ``obj.attr``, or ``await obj.awaitable_attrs.attr``."""
        if self.h.is_async:
            return self.h.run(getattr(obj.awaitable_attrs, attr))
        return getattr(obj, attr)

    def run_sync(self, fn: Callable[[Session], Any]) -> Any:
        """``fn(sync session)``: directly, or through ``AsyncSession.run_sync``."""
        if self.h.is_async:
            return self.h.run(self.session.run_sync(fn))
        return fn(self.session)


class Harness:
    """One flavour of the cache on one database."""

    def __init__(
        self, flavour: str, db_url: str, redis_url: str, prefix: str, cluster: Any = None
    ) -> None:
        self.flavour = flavour
        self.is_async = flavour.startswith("async")
        #: the Redis Cluster (a ``stress.cluster.ClusterGroup``) of the async-cluster flavour
        self.cluster = cluster
        self.redis_url = redis_url
        self.prefix = prefix
        #: a sync engine on the same database: schema, checks, and the keys tests look at
        self.engine: Engine = sa.create_engine(db_url)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.async_engine: Any = None
        if self.is_async:
            from sqlalchemy.ext.asyncio import create_async_engine

            self.loop = asyncio.new_event_loop()
            self.async_engine = create_async_engine(async_url(db_url))
        self.caches: list[WriteThroughCache] = []

    @property
    def observed(self) -> Engine:
        """The engine whose cursors the sessions use (the async engine's sync core)."""
        return self.async_engine.sync_engine if self.is_async else self.engine

    def run(self, awaitable: Any) -> Any:
        """Run a coroutine to completion on this harness's loop."""
        assert self.loop is not None
        return self.loop.run_until_complete(awaitable)

    def cache(self, redis_client: Any = None, **options: Any) -> WriteThroughCache:
        """A cache of this flavour on ``redis_client`` (a URL by default)."""
        options.setdefault("prefix", self.prefix)
        if redis_client is None and self.cluster is not None:
            from redis.asyncio.cluster import ClusterNode, RedisCluster

            nodes = [ClusterNode(host, port) for host, port in self.cluster.startup_nodes]
            redis_client = RedisCluster(
                startup_nodes=nodes, socket_timeout=5.0, socket_connect_timeout=5.0
            )
        elif redis_client is None:
            # a loaded CI machine once took over 0.5 s (the default) to answer a publish;
            # these scenarios are about results, not timeouts
            options.setdefault("socket_timeout", 5.0)
        cache = WriteThroughCache(redis_client or self.redis_url, **options)
        self.caches.append(cache)
        return cache

    def factory(self, cache: WriteThroughCache, **kw: Any) -> Any:
        """A session factory of this flavour with ``cache`` installed."""
        if self.is_async:
            from sqlalchemy.ext.asyncio import async_sessionmaker

            factory: Any = async_sessionmaker(self.async_engine, **kw)
        else:
            factory = sessionmaker(self.engine, **kw)
        cache.install(factory)
        return factory

    @contextlib.contextmanager
    def session(self, factory: Any) -> Iterator[Sess]:
        sess = Sess(self, factory())
        try:
            yield sess
        finally:
            sess.close()

    @contextlib.contextmanager
    def sql(self) -> Iterator[list[str]]:
        """Every statement the sessions send to the database meanwhile."""
        with capture_sql(self.observed) as statements:
            yield statements

    def invalidate(self, cache: WriteThroughCache, model: type, ident: Any = None) -> bool:
        """``cache.invalidate()``, or ``await cache.ainvalidate()``."""
        if self.is_async:
            result: bool = self.run(cache.ainvalidate(model, ident))
            return result
        return cache.invalidate(model, ident)

    def close(self) -> None:
        for cache in self.caches:
            if cache._sync is not None:
                cache._sync.runtime.backend.client.close()  # type: ignore[attr-defined]
            if cache._async is not None:
                self.run(cache._async.runtime.backend.client.aclose())  # type: ignore[attr-defined]
        if self.is_async:
            self.run(self.async_engine.dispose())
            assert self.loop is not None
            self.loop.close()
        self.engine.dispose()
