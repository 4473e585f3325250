"""The sweep of ``test_declarations_swept.py`` on PostgreSQL through asyncpg, whose values
differ from the text drivers' (NUMERIC read in binary: ``Decimal("1E+8")``; its own UUID
class, infinite timestamps), with the cache on an ``async_sessionmaker`` (its asyncio flavour),
its sessions driven from synchronous code on one event loop."""

from __future__ import annotations

from typing import Any

import pytest
from _flavours import async_url
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

from sqlalchemy_writethrough import WriteThroughCache

from _cache_helpers import register_all_quietly
from _declarations import sweep, swept

pytestmark = pytest.mark.databases("postgresql")


class _SyncStyle:
    """An ``async_sessionmaker``'s sessions used from synchronous code on one loop."""

    def __init__(self, factory: Any, loop: Any) -> None:
        self._factory = factory
        self._loop = loop

    def __call__(self) -> _SyncSession:
        return _SyncSession(self._factory(), self._loop)


class _SyncSession:
    def __init__(self, session: Any, loop: Any) -> None:
        self._session = session
        self._loop = loop

    def __enter__(self) -> _SyncSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.run_until_complete(self._session.close())

    def add(self, obj: Any) -> None:
        self._session.add(obj)

    def commit(self) -> None:
        self._loop.run_until_complete(self._session.commit())

    def get(self, model: Any, key: Any) -> Any:
        return self._loop.run_until_complete(self._session.get(model, key))

    def scalars(self, statement: Any) -> Any:
        return self._loop.run_until_complete(self._session.scalars(statement))


def test_what_a_get_returns_is_what_a_load_returns_on_asyncpg(
    engine: Engine, db_url: str, redis_url: str, prefix: str, loop: Any
) -> None:
    base, models = swept(engine)
    async_engine = create_async_engine(async_url(db_url))
    cache = WriteThroughCache(redis_url, prefix=prefix, stats_interval=None)
    factory = async_sessionmaker(async_engine, expire_on_commit=False)
    cache.install(factory)
    try:
        register_all_quietly(cache, base)
        assert sweep(_SyncStyle(factory, loop), models) == []
    finally:
        cache.uninstall(factory)
        loop.run_until_complete(cache.aclose())
        loop.run_until_complete(async_engine.dispose())
