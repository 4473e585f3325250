"""What the cache leaves alone of the application's process: the ``random`` module's shared
generator, and the thread's ``decimal`` context.

An application, or its test suite, seeds it for reproducible data (``random.seed(n)`` then
``random.randint(...)``: SQLAlchemy-Easy-SoftDelete's suite builds its rows so, and compares
them with stored snapshots). Each commit of a cached row drew its TTL jitter from that
generator: the data the suite made after a commit changed with the extension on (11 of its
73 tests failed only with it). The cache now draws from a generator of its own.

A money service sets its thread's ``decimal`` context to trap ``Inexact`` (a rounding it did
not ask for is a bug there). The cache predicted what the database stores of a ``Numeric``
value (rounded to the column's scale) in that context: a commit the database accepts, and
rounds, raised ``decimal.Inexact`` out of ``session.commit()``. The cache's arithmetic now has
a context of its own.

What is observed: the numbers the application draws after seeding, with a cache committing,
filling and invalidating rows in between, against the same draws with nothing in between;
what a commit and the gets after it return, and the SQL those gets send.
"""

from __future__ import annotations

import decimal
import os
import random
from collections.abc import Iterator
from decimal import Decimal

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy import String
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_writethrough import CachedModel, WriteThroughCache

from _cache_helpers import entry_key
from _servers import capture_sql, reset_schema


class Base(DeclarativeBase):
    pass


class PsItem(Base, CachedModel):
    __tablename__ = "ps_item"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(30))


class PsPrice(Base, CachedModel):
    __tablename__ = "ps_price"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    amount: Mapped[Decimal] = mapped_column(sa.Numeric(12, 2))


@pytest.fixture
def factory(engine: Engine, redis_url: str, prefix: str) -> Iterator[sessionmaker[Session]]:
    reset_schema(engine, Base.metadata)
    cache = WriteThroughCache(redis_url, prefix=prefix, stats_interval=None, ttl=3600)
    maker = sessionmaker(engine, info={"cache": cache})
    cache.install(maker)
    try:
        yield maker
    finally:
        cache.clear()
        cache.uninstall(maker)
        cache.close()


def _draws(between: object = None) -> list[int]:
    """Three draws after ``random.seed(7)``, ``between`` called after the first."""
    random.seed(7)
    drawn = [random.randint(0, 10**9)]
    if callable(between):
        between()
    drawn += [random.randint(0, 10**9) for _ in range(2)]
    return drawn


@pytest.mark.databases("sqlite")
def test_the_cache_draws_nothing_from_the_applications_random_generator(
    factory: sessionmaker[Session],
) -> None:
    def use_the_cache() -> None:
        with factory() as session:  # rows written through (each with its TTL's jitter)
            session.add_all(PsItem(id=n, name="a") for n in range(1, 6))
            session.commit()
        with factory() as session:
            session.execute(sa.update(PsItem).where(PsItem.id > 3).values(name="b"))
            session.commit()  # invalidated
        with factory() as session:  # misses that fill, then hits
            assert [session.get(PsItem, n).name for n in range(1, 6)] == ["a"] * 3 + ["b"] * 2  # type: ignore[union-attr]
        with factory() as session:
            row = session.get(PsItem, 1)
            assert row is not None
            row.name = "c"
            session.flush()
            session.rollback()  # the previous value put back

    assert _draws(use_the_cache) == _draws()


@pytest.mark.databases("postgresql", "mariadb")
def test_a_decimal_context_that_traps_rounding_changes_nothing_of_a_commit(
    engine: Engine, factory: sessionmaker[Session]
) -> None:
    """The database rounds ``1.005`` to ``1.01`` (half away from zero), with the cache as
    without it; the commit writes that through (the get after it sends no SQL); and a
    context of little precision changes nothing either."""
    with decimal.localcontext() as context:
        context.traps[decimal.Inexact] = True
        context.traps[decimal.Rounded] = True
        with factory() as session:
            session.add(PsPrice(id=1, amount=Decimal("1.005")))
            session.commit()
        with capture_sql(engine) as sql, factory() as session:
            assert session.get(PsPrice, 1).amount == Decimal("1.01")  # type: ignore[union-attr]
        assert sql == []
        context.prec = 4
        with factory() as session:
            price = session.get(PsPrice, 1)
            assert price is not None
            price.amount = Decimal("123456.789")
            session.commit()
        with factory() as session:
            assert session.get(PsPrice, 1).amount == Decimal("123456.79")  # type: ignore[union-attr]


@pytest.mark.databases("sqlite")
def test_forked_workers_draw_different_ttls(
    factory: sessionmaker[Session], redis_client: redis.Redis, prefix: str
) -> None:
    """A pre-forking server's workers each commit a row: their entries' TTLs take different
    jitters (the cache's generator is reseeded in a forked child, as the ``random`` module's
    is; were it not, both would draw the same first number). The TTL is an hour, so its 10%
    jitter spans 360 s: two independent draws fall within 20 ms of each other 1 time in 9,000
    (the same draw, a millisecond or two apart: the time between the two commits)."""
    with factory() as session:
        session.add_all(PsItem(id=n, name="a") for n in (1, 2))
        session.commit()
    ttls = []
    for key in (1, 2):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                factory.kw["bind"].dispose(close=False)  # the parent's connections: not ours
                with factory() as session:
                    row = session.get(PsItem, key)
                    assert row is not None
                    row.name = "b"
                    session.commit()
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert status == 0
        ttls.append(redis_client.pttl(entry_key(factory.kw["info"]["cache"], PsItem, key)))
    assert all(ttl > 0 for ttl in ttls), ttls
    assert abs(ttls[0] - ttls[1]) > 20, ttls
