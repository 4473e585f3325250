"""MySQL and MariaDB: a schema is a database, and ``information_schema.TABLES`` and
``COLUMNS`` list every database of the server. The cache asked them whole once per engine
pool (views, ``ON UPDATE CURRENT_TIMESTAMP`` columns, generated columns): a server holding a
database per tenant, each reached by an engine of its own (docs/recipes/tenant-databases.md),
had every engine's first cached load read every tenant's tables, and keep what they said per
pool (6,000 tables: 0.45 s and one entry per table, per engine).

Now a pool asks about the schemas its sessions reach: its own with its first question, one
reached through ``schema_translate_map`` (or named on a model) when first reached. What is
observed: the catalog queries the pool's connections ran (a recording cursor set by a
"connect" listener, which the cache's own connection gets as the application's do), and what
a get returns against a load without the cache.
"""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from _flavours import async_url
from sqlalchemy import String, event
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_writethrough import WriteThroughCache

from _cache_helpers import cache_on

pytestmark = pytest.mark.databases("mariadb")


class Base(DeclarativeBase):
    pass


class PsItem(Base):
    __tablename__ = "ps_item"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(60))


@pytest.fixture
def recorded(engine: Engine) -> Iterator[tuple[Engine, list[str]]]:
    """``engine`` (a copy with a "connect" listener) and the statements every DBAPI cursor
    of its connections ran, the cache's catalog connection's included."""
    import pymysql.cursors

    statements: list[str] = []

    class Recording(pymysql.cursors.Cursor):
        def execute(self, query: Any, args: Any = None) -> int:
            statements.append(str(query))
            return super().execute(query, args)

    eng = sa.create_engine(engine.url)

    @event.listens_for(eng, "connect")
    def record(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.cursorclass = Recording

    try:
        yield eng, statements
    finally:
        eng.dispose()


@pytest.fixture
def schemas(engine: Engine) -> Iterator[tuple[str, str]]:
    """A tenant's database reached through ``schema_translate_map``, whose ps_item has a
    trigger folding the email, and a far one no session reaches (a table with an ``ON
    UPDATE CURRENT_TIMESTAMP`` column); the run's own database's ps_item has no trigger."""
    tenant, far = (f"ps_{kind}_{uuid.uuid4().hex[:6]}" for kind in ("tenant", "far"))
    try:
        with engine.begin() as conn:
            Base.metadata.drop_all(conn)
            Base.metadata.create_all(conn)
            conn.execute(PsItem.__table__.insert(), {"id": 1, "email": "Ann"})
            conn.exec_driver_sql(f"CREATE DATABASE {tenant}")
            conn.exec_driver_sql(f"CREATE DATABASE {far}")
        with engine.begin() as conn:
            # a Connection's execution_options() changes it in place
            mapped = conn.execution_options(schema_translate_map={None: tenant})
            Base.metadata.create_all(mapped)
            mapped.execute(PsItem.__table__.insert(), {"id": 1, "email": "Ann"})
            conn.exec_driver_sql(
                f"CREATE TRIGGER {tenant}.ps_item_fold BEFORE UPDATE ON {tenant}.ps_item "
                "FOR EACH ROW SET NEW.email = lower(NEW.email)"
            )
            conn.exec_driver_sql(
                f"CREATE TABLE {far}.stamped (id INT PRIMARY KEY, at TIMESTAMP NOT NULL "
                "DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP)"
            )
        yield tenant, far
    finally:
        with engine.begin() as conn:
            for name in (tenant, far):
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
            Base.metadata.drop_all(conn)


def _catalog_reads(statements: list[str]) -> list[str]:
    """The statements that read information_schema.TABLES or COLUMNS."""
    return [
        s
        for s in statements
        if "information_schema.TABLES" in s or "information_schema.COLUMNS" in s
    ]


def _email(session: Session, schema: str | None = None) -> str:
    """Row 1's email as ``session`` gets it, in ``schema`` (chosen on its connection, before
    its first load, as the flush needs it too) or in the run's database."""
    if schema is not None:
        session.connection(execution_options={"schema_translate_map": {None: schema}})
    found = session.get(PsItem, 1)
    assert found is not None
    return found.email


def test_a_pool_asks_about_the_schemas_its_sessions_reach(
    recorded: tuple[Engine, list[str]],
    schemas: tuple[str, str],
    redis_url: str,
    prefix: str,
) -> None:
    eng, statements = recorded
    tenant, far = schemas
    own = eng.url.database
    with cache_on(eng, redis_url, prefix) as (cache, made):
        cache.register(PsItem)
        with made() as session:
            assert _email(session) == "Ann"
        asked = _catalog_reads(statements)
        assert asked and all(f"= '{own}'" in s for s in asked), asked
        assert not [s for s in statements if far in s]
        with made() as session:
            assert _email(session, tenant) == "Ann"
        more = _catalog_reads(statements)[len(asked) :]
        assert more and all(f"= '{tenant}'" in s for s in more), more
        for schema in (tenant, None, tenant):  # asked once per pool and schema
            with made() as session:
                assert _email(session, schema) == "Ann"
        assert len(_catalog_reads(statements)) == len(asked) + len(more)
        assert not [s for s in statements if far in s]


def test_a_trigger_of_a_schema_first_reached_later_is_seen(
    engine: Engine, schemas: tuple[str, str], redis_url: str, prefix: str
) -> None:
    """The tenant's BEFORE UPDATE trigger rewrites what the flush sent: its commits
    invalidate (asked when the tenant's schema was first reached), the run's own database's
    are written through."""
    tenant, _ = schemas
    with cache_on(engine, redis_url, prefix) as (cache, made):
        cache.register(PsItem)
        for schema in (None, tenant):
            with made() as session:
                assert _email(session, schema) == "Ann"  # now cached
            with made() as session:
                _email(session, schema)
                session.get_one(PsItem, 1).email = "Bob"
                session.commit()
        for schema, stored in ((None, "Bob"), (tenant, "bob")):
            with made() as session, Session(engine) as plain:
                assert _email(plain, schema) == stored
                assert _email(session, schema) == stored


def test_an_async_session_asks_about_a_schema_first_reached_later(
    engine: Engine, schemas: tuple[str, str], redis_url: str, prefix: str
) -> None:
    """The same through aiomysql, the cache on ``async_sessionmaker`` (``redis.asyncio``):
    the tenant's schema is asked inside SQLAlchemy's greenlet, on a connection of the
    engine's asyncio pool, when the tenant is first reached."""
    tenant, _ = schemas
    tenant_map = {"schema_translate_map": {None: tenant}}

    async def main() -> list[str]:
        eng = create_async_engine(async_url(engine.url.render_as_string(hide_password=False)))
        cache = WriteThroughCache(redis_url, prefix=prefix, stats_interval=None)
        cache.register(PsItem)
        made = async_sessionmaker(eng)
        cache.install(made)
        try:
            for _ in range(2):  # the second is served
                async with made() as session:
                    await session.connection(execution_options=tenant_map)
                    assert (await session.get_one(PsItem, 1)).email == "Ann"
            async with made() as session:
                await session.connection(execution_options=tenant_map)
                (await session.get_one(PsItem, 1)).email = "Bob"
                await session.commit()
            found = []
            async with made() as session:
                await session.connection(execution_options=tenant_map)
                found.append((await session.get_one(PsItem, 1)).email)
            async with AsyncSession(eng) as plain:
                await plain.connection(execution_options=tenant_map)
                found.append((await plain.get_one(PsItem, 1)).email)
            return found
        finally:
            cache.uninstall(made)
            await cache.aclose()
            await eng.dispose()

    assert asyncio.run(main()) == ["bob", "bob"]


def test_engines_of_one_server_keep_what_its_triggers_say_once(
    engine: Engine, schemas: tuple[str, str], redis_url: str, prefix: str
) -> None:
    """MySQL's triggers and routines are read for the whole server, once per pool (a
    trigger's code may write any database's tables): with an engine per tenant database,
    each engine's pool parsed every tenant's triggers and kept its own copy of what their
    code says (the names it uses, the tables it writes). The same answer is now parsed and
    kept once. What is observed: the memory a new engine's first cached load keeps
    (tracemalloc), before and after a far database gets 150 triggers; the engines are
    kept alive, as an application's are."""
    _, far = schemas
    cache = WriteThroughCache(redis_url, prefix=prefix, stats_interval=None)
    cache.register(PsItem)
    made = sessionmaker()
    cache.install(made)
    engines: list[Engine] = []

    def kept_by_a_new_engine() -> int:
        engines.append(sa.create_engine(engine.url))
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        with made(bind=engines[-1]) as session:
            assert _email(session) == "Ann"
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before

    tracemalloc.start()
    try:
        kept_by_a_new_engine()  # what the first engine alone keeps (the model's layout...)
        alone = kept_by_a_new_engine()
        with engine.begin() as conn:
            for i in range(50):
                conn.exec_driver_sql(f"CREATE TABLE {far}.audit_{i} (id INT PRIMARY KEY)")
                for when in ("INSERT", "UPDATE", "DELETE"):
                    words = ", ".join(f"'w_{i}_{when}_{k}'" for k in range(20))
                    conn.exec_driver_sql(
                        f"CREATE TRIGGER {far}.audit_{i}_{when.lower()} AFTER {when} ON "
                        f"{far}.audit_{i} FOR EACH ROW UPDATE {far}.counter_{i} "
                        f"SET seen_{when.lower()} = CONCAT({words}) WHERE id = 1"
                    )
        first = kept_by_a_new_engine()  # reads and parses the 150 triggers
        # the least of three: another test's triggers (made at the same time on this
        # server) change what the whole server's triggers say
        second = min(kept_by_a_new_engine() for _ in range(3))
    finally:
        tracemalloc.stop()
        cache.uninstall(made)
        cache.close()
        for eng in engines:
            eng.dispose()
    assert first - alone > 100_000, (alone, first)  # what the triggers' answer weighs
    assert second - alone < (first - alone) / 4, (alone, first, second)
