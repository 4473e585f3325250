"""Values as asyncpg returns them, from the cache as from the database.

asyncpg returns its own ``UUID`` class (``asyncpg.pgproto.pgproto.UUID``, a ``uuid.UUID``
subclass) and every ``timestamptz`` in UTC. The cache refused to store the first (a load of a
row with a ``Uuid`` column was never filled: every read of it a miss, silently), and took the
second for unpredictable (each commit of a row with a ``DateTime(timezone=True)`` column
invalidated its entry instead of writing it through). What is observed: the entry Redis holds
after a commit, the counters of the fills and hits, and the values and their types a get
returns, against a load from the database.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import uuid
import zoneinfo
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import pytest
import redis
from _flavours import async_url
from sqlalchemy import DateTime, Numeric, String, Uuid, create_engine, select
from sqlalchemy.dialects.postgresql import UUID as PG_UUID
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from sqlalchemy_writethrough import CachedModel, WriteThroughCache, from_cache

from _cache_helpers import entry_state
from _servers import capture_sql, reset_schema

pytestmark = [pytest.mark.databases("postgresql")]


class Base(DeclarativeBase):
    pass


class ApRow(Base, CachedModel):
    __tablename__ = "ap_row"
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    other: Mapped[uuid.UUID] = mapped_column(PG_UUID(as_uuid=True))
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    name: Mapped[str] = mapped_column(String(40))


ATTRS = ("id", "other", "at", "name")


class ApNumber(Base, CachedModel):
    """Whole numbers, which asyncpg and the text drivers write differently, and a UUID stored
    as text, which SQLAlchemy (not asyncpg) makes a ``uuid.UUID``."""

    __tablename__ = "ap_number"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    whole: Mapped[Decimal | None] = mapped_column(Numeric(38, 0))
    plain: Mapped[Decimal | None] = mapped_column(Numeric)
    cents: Mapped[Decimal | None] = mapped_column(Numeric(40, 2))
    as_text: Mapped[uuid.UUID | None] = mapped_column(Uuid(native_uuid=False))


NUMBERS = [
    Decimal("100000000"),
    Decimal("12340000"),
    Decimal("-20000"),
    Decimal("1E+30"),
    Decimal("99999999.995"),
    Decimal("10"),
    Decimal("0"),
]


@pytest.fixture
def schema(engine: Any) -> Any:
    reset_schema(engine, Base.metadata)
    return engine


@contextlib.asynccontextmanager
async def _installed(
    db_url: str, redis_url: str, prefix: str, **factory_options: Any
) -> AsyncIterator[tuple[Any, WriteThroughCache, Any]]:
    """An asyncpg engine, a cache from the URL, and a factory it is installed on."""
    engine = create_async_engine(async_url(db_url))
    cache = WriteThroughCache(redis_url, prefix=prefix)
    factory = async_sessionmaker(engine, **factory_options)
    cache.install(factory)
    try:
        yield engine, cache, factory
    finally:
        cache.uninstall(factory)
        await cache.aclose()
        await engine.dispose()


async def _add(factory: Any, key_id: uuid.UUID, at: dt.datetime) -> None:
    async with factory() as session:
        session.add(ApRow(id=key_id, other=uuid.uuid4(), at=at, name="a"))
        await session.commit()


def _seen(row: Any) -> dict[str, tuple[type, Any, Any]]:
    """Each attribute's type, value and, for a datetime, its offset."""
    return {
        a: (type(v), v, v.utcoffset() if isinstance(v, dt.datetime) else None)
        for a in ATTRS
        if (v := getattr(row, a)) is not None
    }


@pytest.mark.parametrize(
    "at",
    [
        dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.timezone.utc),
        dt.datetime(2024, 5, 6, 7, 8, 9, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30))),
        dt.datetime(2024, 11, 3, 1, 30, fold=1, tzinfo=zoneinfo.ZoneInfo("America/New_York")),
    ],
    ids=["utc", "offset", "zone"],
)
def test_asyncpg_values_are_written_through_filled_and_served_as_loaded(
    at: dt.datetime,
    schema: Any,
    db_url: str,
    prefix: str,
    redis_url: str,
    redis_client: redis.Redis,
    loop: Any,
) -> None:
    key_id = uuid.uuid4()

    async def scenario() -> None:
        async with _installed(db_url, redis_url, prefix, expire_on_commit=False) as (
            _,
            cache,
            factory,
        ):
            await _add(factory, key_id, at)
            # written through: the commit knew what the database stores
            keys = [k for k in redis_client.scan_iter(f"{prefix}:*ap_row*") if b":g" not in k]
            states = {entry_state(redis_client, k.decode()) for k in keys}
            assert "value" in states, (keys, states, cache.stats())
            async with factory() as session:
                loaded = (await session.execute(select(ApRow))).scalar_one()
                from_db = _seen(loaded)
            async with factory() as session:
                published = _seen(await session.get(ApRow, key_id))
            assert published == from_db
            # filled from a load, then served
            await cache.ainvalidate(ApRow, key_id)
            for _ in range(2):
                async with factory() as session:
                    got = _seen(await session.get(ApRow, key_id))
                assert got == from_db
            stats = cache.stats()
            assert (stats.fills, stats.hits) == (1, 2), stats

    loop.run_until_complete(scenario())


def test_rows_loaded_by_asyncpg_are_locked_and_invalidated_by_their_writes(
    schema: Any, db_url: str, prefix: str, redis_url: str, loop: Any
) -> None:
    """An object loaded through a plain ``select()`` has asyncpg's UUID class in its
    identity; the write path took only ``uuid.UUID`` for the column's key, so its UPDATE and
    DELETE neither locked nor replaced the cached entry, and later gets served the old row
    (the deleted one too)."""
    key_id = uuid.uuid4()
    at = dt.datetime(2024, 5, 6, tzinfo=dt.timezone.utc)

    async def scenario() -> tuple[str, str, Any]:
        async with _installed(db_url, redis_url, prefix, expire_on_commit=False) as (
            _,
            _cache,
            factory,
        ):
            await _add(factory, key_id, at)
            async with factory() as session:
                first = (await session.get(ApRow, key_id)).name  # from the cache
            async with factory() as session:
                row = (await session.execute(select(ApRow))).scalar_one()
                assert type(row.id) is not uuid.UUID  # asyncpg's own class
                row.name = "b"
                await session.commit()
            async with factory() as session:
                second = (await session.get(ApRow, key_id)).name
            async with factory() as session:
                row = (await session.execute(select(ApRow))).scalar_one()
                await session.delete(row)
                await session.commit()
            async with factory() as session:
                gone = await session.get(ApRow, key_id)
            return first, second, gone

    assert loop.run_until_complete(scenario()) == ("a", "b", None)


def test_asyncpg_keys_are_served_in_batches_and_a_reloaded_key_has_not_moved(
    schema: Any, db_url: str, prefix: str, redis_url: str, loop: Any
) -> None:
    """Keys taken from rows asyncpg loaded are UUIDs of its own class: an IN-list read of
    them bypassed the cache (``from_cache()`` sent its SELECT every time), and an UPDATE of a
    row inserted with ``uuid.UUID`` and reloaded (expire_on_commit) took its key for changed
    (it recorded a delete and locked every model its foreign keys cascade to)."""
    ids = [uuid.uuid4() for _ in range(3)]
    at = dt.datetime(2024, 5, 6, tzinfo=dt.timezone.utc)

    async def scenario() -> tuple[int, int, dict[str, int], str]:
        # expire_on_commit: rows reload through asyncpg
        async with _installed(db_url, redis_url, prefix) as (engine, cache, factory):
            async with factory() as session:
                rows = [ApRow(id=i, other=i, at=at, name="a") for i in ids]
                session.add_all(rows)
                await session.commit()
                loaded = []
                for row in rows:
                    await session.refresh(row)  # reloaded through asyncpg: its UUIDs
                    row.name = "b"
                    loaded.append(row.id)
                await session.commit()
                reasons = dict(cache.stats().invalidations_by_reason)
            assert all(type(i) is not uuid.UUID for i in loaded)
            query = select(ApRow).where(ApRow.id.in_(loaded)).options(from_cache())
            async with factory() as session:
                with capture_sql(engine.sync_engine) as sql:
                    got = (await session.scalars(query)).all()
            return len(got), len(sql), reasons, got[0].name

    assert loop.run_until_complete(scenario()) == (3, 0, {}, "b")


def _numbers(row: Any) -> list[tuple[str, str, str]]:
    """Each column's class and ``str()``: what an application prints."""
    return [
        (a, f"{type(v).__module__}.{type(v).__qualname__}", str(v))
        for a in ("whole", "plain", "cents", "as_text")
        if (v := getattr(row, a)) is not None
    ]


def test_whole_numbers_and_text_uuids_are_served_as_each_driver_loads_them(
    schema: Any, db_url: str, prefix: str, redis_url: str, loop: Any
) -> None:
    """asyncpg reads ``NUMERIC`` in binary and gives ``Decimal("1E+8")`` where psycopg gives
    ``Decimal("100000000")``: a get on asyncpg served the text drivers' form (from a commit,
    or from a psycopg process's fill), and a psycopg get asyncpg's (from an asyncpg fill).
    A ``Uuid(native_uuid=False)`` was served as asyncpg's UUID class, which only a native
    column loads as. Each reader now gets its own driver's form."""
    sync_engine = create_engine(db_url)
    sync_cache = WriteThroughCache(redis_url, prefix=prefix)
    sync_factory = sessionmaker(sync_engine)
    sync_cache.install(sync_factory)

    def sync_seen(key: int, fresh: bool) -> list[tuple[str, str, str]]:
        with sync_factory() as session:
            if fresh:
                return _numbers(
                    session.execute(select(ApNumber).where(ApNumber.id == key)).scalar_one()
                )
            return _numbers(session.get(ApNumber, key))

    async def scenario() -> list[Any]:
        wrong: list[Any] = []
        async with _installed(db_url, redis_url, prefix, expire_on_commit=False) as (
            _,
            cache,
            factory,
        ):

            async def seen(key: int, fresh: bool) -> list[tuple[str, str, str]]:
                async with factory() as session:
                    if fresh:
                        found = await session.execute(select(ApNumber).where(ApNumber.id == key))
                        return _numbers(found.scalar_one())
                    return _numbers(await session.get(ApNumber, key))

            for key, value in enumerate(NUMBERS):
                row = ApNumber(id=key, whole=value, plain=value, cents=value, as_text=uuid.uuid4())
                async with factory() as session:  # published by asyncpg's commit
                    session.add(row)
                    await session.commit()
                loaded = await seen(key, fresh=True)
                served = [await seen(key, fresh=False), sync_seen(key, fresh=False)]
                expected = [loaded, sync_seen(key, fresh=True)]
                await cache.ainvalidate(ApNumber, key)
                await seen(key, fresh=False)  # filled by asyncpg
                served += [await seen(key, fresh=False), sync_seen(key, fresh=False)]
                await cache.ainvalidate(ApNumber, key)
                sync_seen(key, fresh=False)  # filled by psycopg
                served += [await seen(key, fresh=False), sync_seen(key, fresh=False)]
                if served != expected * 3:
                    wrong.append((str(value), served, expected))
        return wrong

    try:
        assert loop.run_until_complete(scenario()) == []
    finally:
        sync_cache.uninstall(sync_factory)
        sync_cache.close()
        sync_engine.dispose()
