"""A ``timestamptz`` value in the reading session's time zone.

PostgreSQL's drivers return ``DateTime(timezone=True)`` values in the time zone of the
connection that loaded them (psycopg 3 as ``ZoneInfo``, psycopg2 as a fixed offset), asyncpg
always in UTC. An entry holds the value as its writer or loader saw it; served as it is, a
reader whose session has another time zone (``SET TIME ZONE`` at ``after_begin``, a
``timezone`` in ``connect_args``, another driver) got the same instant with another offset:
``11:00+01:00`` where every database load says ``15:30+05:30``. Each read now gives the value
in the reader's time zone, as its load would.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import pytest
import redis.asyncio
import sqlalchemy as sa
from sqlalchemy import event, make_url
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_writethrough import CachedModel, WriteThroughCache, from_cache

from _servers import capture_sql, reset_schema

pytestmark = pytest.mark.databases("postgresql")


class Base(DeclarativeBase):
    pass


class TzEvent(Base, CachedModel):
    __tablename__ = "tz_event"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    at: Mapped[dt.datetime] = mapped_column(sa.DateTime(timezone=True))
    local: Mapped[dt.datetime] = mapped_column(sa.DateTime())  # no zone: as stored


AT = dt.datetime(2026, 12, 5, 10, 0, tzinfo=dt.timezone.utc)


@pytest.fixture
def db(engine: Engine) -> Engine:
    reset_schema(engine, Base.metadata)
    return engine


def engine_in(db: Engine, driver: str, zone: str | None = None) -> Engine:
    url = make_url(db.url.render_as_string(hide_password=False)).set(drivername=driver)
    connect_args = {"options": f"-c timezone={zone}"} if zone else {}
    return sa.create_engine(url, connect_args=connect_args)


def loaded(maker: sessionmaker[Session], how: str = "get") -> list[str]:
    with maker() as s:
        if how == "batch":
            stmt = sa.select(TzEvent).where(TzEvent.id.in_([1, 2])).options(from_cache())
            found = sorted(s.scalars(stmt), key=lambda e: e.id)
        else:
            found = [s.get(TzEvent, 1), s.get(TzEvent, 2)]
        return [f"{e.at.isoformat()} {e.at.tzinfo!r} {e.local.isoformat()}" for e in found if e]


@pytest.mark.parametrize("near", [False, True], ids=["redis", "near"])
@pytest.mark.parametrize("how", ["get", "batch"])
@pytest.mark.parametrize(
    ("writer", "reader", "zone"),
    [
        ("postgresql+psycopg", "postgresql+psycopg", "Asia/Kolkata"),
        ("postgresql+psycopg", "postgresql+psycopg2", "+05:30"),
        ("postgresql+psycopg2", "postgresql+psycopg", "Europe/Berlin"),
    ],
)
def test_a_reader_in_another_time_zone_gets_its_own(
    db: Engine,
    redis_url: str,
    prefix: str,
    writer: str,
    reader: str,
    zone: str,
    how: str,
    near: bool,
) -> None:
    """The writer's sessions are in UTC; the reader's engine has another ``timezone``. With
    the near cache, the second read of each comes from memory (the decoding it keeps)."""
    pytest.importorskip("psycopg2")
    engines = [engine_in(db, writer), engine_in(db, reader, zone.replace("+", "-"))]
    if zone.startswith("+"):  # a fixed offset: POSIX signs are west-positive, as in -c timezone
        engines[1].dispose()
        engines[1] = sa.create_engine(
            engines[1].url, connect_args={"options": "-c timezone=<+05:30>-05:30"}
        )
    cache = WriteThroughCache(redis_url, prefix=prefix, near_cache=near)
    makers = [sessionmaker(e) for e in engines]
    for m in makers:
        cache.install(m)
    try:
        with makers[0]() as s:
            s.add(TzEvent(id=1, at=AT, local=AT.replace(tzinfo=None)))
            s.commit()
        with engines[0].begin() as conn:  # row 2 reaches the cache through a load
            conn.execute(
                TzEvent.__table__.insert(), {"id": 2, "at": AT, "local": AT.replace(tzinfo=None)}
            )
        loaded(makers[0])  # fills row 2 as UTC
        expected = loaded(sessionmaker(engines[1]))  # each load, by the reader's driver
        with capture_sql(engines[1]) as sql:
            assert loaded(makers[1], how) == expected
            assert loaded(makers[1], how) == expected  # the near cache's copies, if any
            assert loaded(makers[0], how) == loaded(sessionmaker(engines[0]))  # UTC again
        assert sql == []
    finally:
        for m in makers:
            cache.uninstall(m)
        for e in engines:
            e.dispose()
        cache.close()


def test_a_time_zone_set_per_transaction_is_the_readers(
    db: Engine, redis_url: str, prefix: str
) -> None:
    """``SET TIME ZONE`` at ``after_begin`` (an application rendering each user's local
    time): the cache takes the connection for that listener, and reads in its time zone."""
    zone = {"name": "UTC"}

    def sessions() -> sessionmaker[Session]:
        maker = sessionmaker(db)

        @event.listens_for(maker, "after_begin")
        def set_zone(session: Session, transaction: Any, connection: Any) -> None:
            connection.exec_driver_sql(f"SET TIME ZONE '{zone['name']}'")

        return maker

    cache = WriteThroughCache(redis_url, prefix=prefix)
    maker = sessions()
    cache.install(maker)
    try:
        with maker() as s:
            s.add_all([TzEvent(id=i, at=AT, local=AT.replace(tzinfo=None)) for i in (1, 2)])
            s.commit()
        for name in ("Asia/Kolkata", "America/New_York", "UTC"):
            zone["name"] = name
            expected = loaded(sessions())
            with capture_sql(db) as sql:
                assert loaded(maker) == expected
            assert not [q for q in sql if q.lstrip().upper().startswith("SELECT")]
    finally:
        cache.uninstall(maker)
        cache.redis.close()


def test_an_asyncpg_reader_gets_utc(
    db: Engine, redis_url: str, prefix: str, loop: asyncio.AbstractEventLoop
) -> None:
    """asyncpg returns every ``timestamptz`` in UTC, whatever the session's time zone: an
    entry written by a psycopg 3 process in ``Asia/Kolkata`` is read by an asyncio process in
    UTC, as its load would be."""
    pytest.importorskip("asyncpg")
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    writer = engine_in(db, "postgresql+psycopg", "Asia/Kolkata")
    sync_cache = WriteThroughCache(redis_url, prefix=prefix)
    maker = sessionmaker(writer)
    sync_cache.install(maker)
    with maker() as s:
        s.add_all([TzEvent(id=i, at=AT, local=AT.replace(tzinfo=None)) for i in (1, 2)])
        s.commit()
    assert loaded(maker)[0].startswith("2026-12-05T15:30:00+05:30")

    async def read() -> tuple[list[str], list[str], int]:
        url = db.url.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)
        engine = create_async_engine(url)
        client = redis.asyncio.Redis.from_url(redis_url)
        cache = WriteThroughCache(client, prefix=prefix)
        factory = async_sessionmaker(engine)
        cache.install(factory)
        try:
            seen = []
            for m in (factory, async_sessionmaker(engine)):  # the cache's, then a load's
                async with m() as s:
                    rows = [await s.get(TzEvent, i) for i in (1, 2)]
                    seen.append([f"{e.at.isoformat()} {e.at.tzinfo!r}" for e in rows if e])
            return seen[0], seen[1], cache.stats().hits
        finally:
            await cache.aclose()
            await client.aclose()  # the caller's client: the cache leaves it open
            await engine.dispose()

    try:
        cached, plain, hits = loop.run_until_complete(read())
        assert cached == plain and plain[0].startswith("2026-12-05T10:00:00+00:00")
        assert hits == 2
    finally:
        sync_cache.uninstall(maker)
        sync_cache.close()
        writer.dispose()
