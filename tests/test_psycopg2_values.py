"""``timestamptz`` values as psycopg2 returns them, written through instead of invalidated.

psycopg2 (SQLAlchemy's default PostgreSQL driver: ``postgresql://``) returns a ``timestamptz``
with a fixed offset, ``datetime.timezone(offset)``, the offset PostgreSQL's own time zone
database gives for the session's ``TimeZone`` at that instant. The cache took it for
unpredictable: each commit of a row with a ``DateTime(timezone=True)`` column invalidated the
entry instead of writing it through. Where the session's zone is UTC or a fixed offset (the
usual server setting), the offset does not depend on any time zone database and the commit
knows what a load returns. Observed: what Redis holds after a commit, and what a get then
returns (types, values, offsets) against a load from the database.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import zoneinfo
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import DateTime, Double, Integer, String, create_engine, make_url, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_writethrough import CachedModel, WriteThroughCache
from sqlalchemy_writethrough.testing import assert_no_sql

from _cache_helpers import entry_key, entry_state
from _servers import reset_schema

pytestmark = [pytest.mark.databases("postgresql")]
psycopg2 = pytest.importorskip("psycopg2")


class Base(DeclarativeBase):
    pass


class PtRow(Base, CachedModel):
    __tablename__ = "pt_row"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    name: Mapped[str] = mapped_column(String(40))
    ratio: Mapped[float | None] = mapped_column(Double)


AT = [
    dt.datetime(2024, 1, 6, 7, 8, 9, 123456, tzinfo=dt.timezone.utc),
    dt.datetime(2024, 7, 6, 7, 8, 9, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30))),
    dt.datetime(2024, 11, 3, 1, 30, fold=1, tzinfo=zoneinfo.ZoneInfo("America/New_York")),
    dt.datetime(1900, 1, 1, 12, tzinfo=dt.timezone(-dt.timedelta(hours=3, minutes=30))),
]


@pytest.fixture
def psycopg2_engine(db_url: str) -> Iterator[Engine]:
    engine = create_engine(make_url(db_url).set(drivername="postgresql+psycopg2"))
    reset_schema(engine, Base.metadata)
    yield engine
    engine.dispose()


@contextlib.contextmanager
def _installed(
    engine: Engine, zone: str, redis_url: str, prefix: str
) -> Iterator[tuple[sessionmaker[Session], WriteThroughCache]]:
    """Sessions whose connections have ``zone`` as their ``TimeZone``, with a cache."""
    zoned = create_engine(engine.url, connect_args={"options": f"-c timezone={zone}"})
    factory = sessionmaker(zoned, expire_on_commit=False)
    cache = WriteThroughCache(redis_url, prefix=prefix)
    cache.install(factory)
    try:
        yield factory, cache
    finally:
        cache.uninstall(factory)
        cache.close()
        zoned.dispose()


def _seen(row: PtRow) -> tuple[Any, ...]:
    """What a user sees of ``at``: its type, instant, offset, zone's type and name."""
    at = row.at
    return (type(at), at, at.utcoffset(), type(at.tzinfo), at.tzname())


@pytest.mark.parametrize(
    "zone", ["UTC", "Etc/UTC", "Etc/GMT-3", "<+05:30>-05:30"], ids=["utc", "etc", "gmt", "posix"]
)
def test_psycopg2_timestamptz_is_written_through_and_served_as_loaded(
    zone: str,
    psycopg2_engine: Engine,
    prefix: str,
    redis_url: str,
    redis_client: redis.Redis,
) -> None:
    with _installed(psycopg2_engine, zone, redis_url, prefix) as (factory, cache):
        with factory() as session:
            session.add_all(PtRow(id=i, at=at, name="a") for i, at in enumerate(AT, 1))
            session.commit()
        # written through: the commit knew what the database stores
        states = [entry_state(redis_client, entry_key(cache, PtRow, i)) for i in range(1, 5)]
        assert states == ["value"] * 4, (states, cache.stats().invalidations_by_reason)
        with factory() as session:
            from_db = {row.id: _seen(row) for row in session.scalars(select(PtRow))}
        with factory() as session, assert_no_sql(session):
            published = {i: _seen(session.get_one(PtRow, i)) for i in range(1, 5)}
        assert published == from_db
        # an update too
        with factory() as session:
            row = session.get_one(PtRow, 2)
            row.at = dt.datetime(2030, 3, 4, 5, 6, 7, tzinfo=dt.timezone.utc)
            session.commit()
        assert entry_state(redis_client, entry_key(cache, PtRow, 2)) == "value"
        with factory() as session:
            from_db[2] = _seen(session.scalars(select(PtRow).where(PtRow.id == 2)).one())
        with factory() as session, assert_no_sql(session):
            assert _seen(session.get_one(PtRow, 2)) == from_db[2]


def test_psycopg2_in_a_zone_with_transitions_invalidates_and_says_why(
    psycopg2_engine: Engine,
    prefix: str,
    redis_url: str,
    redis_client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """In ``Europe/Paris`` the offset comes from PostgreSQL's time zone database, which may
    disagree with Python's for some instants: the commit leaves a miss, never a guess, and a
    warning names the remedy; a load still fills the entry as psycopg2 returned it."""
    with _installed(psycopg2_engine, "Europe/Paris", redis_url, prefix) as (factory, cache):
        with (
            caplog.at_level(logging.WARNING, logger="sqlalchemy_writethrough"),
            factory() as session,
        ):
            session.add(PtRow(id=1, at=AT[0], name="a"))
            session.commit()
        assert entry_state(redis_client, entry_key(cache, PtRow, 1)) != "value"
        assert any("Europe/Paris" in r.getMessage() for r in caplog.records), caplog.text
        with factory() as session:
            from_db = _seen(session.scalars(select(PtRow)).one())
        assert from_db[2] == dt.timedelta(hours=1)
        with factory() as session:
            assert _seen(session.get_one(PtRow, 1)) == from_db  # a miss: filled
        with factory() as session, assert_no_sql(session):
            assert _seen(session.get_one(PtRow, 1)) == from_db


def test_psycopg2_negative_zero_is_served_as_the_database_stored_it(
    psycopg2_engine: Engine, prefix: str, redis_url: str
) -> None:
    """psycopg2 writes ``-0.0`` into the statement as the literal `` -0.0``, the negation of
    a numeric zero: PostgreSQL stores ``0.0``. The commit published ``-0.0``, and a cached
    get returned it where the database returns ``0.0``. (Found running the exactness tests
    on psycopg2.)"""
    with _installed(psycopg2_engine, "UTC", redis_url, prefix) as (factory, _):
        with factory() as session:
            session.add(PtRow(id=1, at=AT[0], name="a", ratio=-0.0))
            session.add(PtRow(id=2, at=AT[0], name="a", ratio=1.5))
            session.commit()
        with factory() as session:
            row = session.get_one(PtRow, 2)
            row.ratio = -0.0
            session.commit()
        with factory() as session:
            from_db = {r.id: repr(r.ratio) for r in session.scalars(select(PtRow))}
        assert from_db == {1: "0.0", 2: "0.0"}
        with factory() as session:
            cached = {i: repr(session.get_one(PtRow, i).ratio) for i in (1, 2)}
        assert cached == from_db
