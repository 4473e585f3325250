"""A row whose identity holds a primary-key value of another type than the column's.

Reads only ever cache keys of the column's exact type (``True`` or ``5.0`` must not load row
1 or 5 under a key of their own), and the write path skipped the others: an object created
with ``id=Num.FIVE`` (an ``IntEnum``) or loaded with such a key kept that value in its
identity, so its UPDATE and DELETE neither locked nor replaced the entry a ``get(Model, 5)``
had cached, which then served the old row. Such a write now invalidates the model's
entries in that database (no key it can name is sure to be the row's). What is observed:
what a get returns after each commit.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import String, Uuid, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_writethrough import CachedModel, ConfigurationError, WriteThroughCache

from _servers import reset_schema


class Base(DeclarativeBase):
    pass


class PtRow(Base, CachedModel):
    __tablename__ = "pt_row"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))


class PtUuRow(Base, CachedModel):
    __tablename__ = "pt_uu_row"
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    name: Mapped[str] = mapped_column(String(40))


class Num(enum.IntEnum):
    FIVE = 5


@pytest.fixture
def cache(redis_url: str, prefix: str) -> Iterator[WriteThroughCache]:
    made = WriteThroughCache(redis_url, prefix=prefix, stats_interval=None)
    yield made
    made.redis.close()


@pytest.fixture
def factory(engine: Engine, cache: WriteThroughCache) -> Iterator[sessionmaker[Session]]:
    reset_schema(engine, Base.metadata)
    made = sessionmaker(engine, expire_on_commit=False)
    cache.install(made)
    yield made
    cache.uninstall(made)


def _name(factory: sessionmaker[Session]) -> str | None:
    with factory() as session:
        row = session.get(PtRow, 5)
        return None if row is None else row.name


def test_writes_of_an_object_keyed_by_an_int_subclass_reach_the_cached_row(
    factory: sessionmaker[Session],
) -> None:
    with factory() as session:
        mine = PtRow(id=Num.FIVE, name="a")  # its identity holds Num.FIVE from now on
        session.add(mine)
        session.commit()
        assert _name(factory) == "a"  # another session: filled under row 5's key
        assert _name(factory) == "a"  # served from the cache
        mine.name = "b"
        session.commit()
        assert _name(factory) == "b"
        session.delete(mine)
        session.commit()
    assert _name(factory) is None


def test_invalidate_takes_the_key_as_the_database_compares_it(
    factory: sessionmaker[Session], cache: WriteThroughCache, engine: Engine
) -> None:
    """``cache.invalidate(Model, ident)`` after a change made behind the cache's back: a UUID
    given as text named a key no entry has (the call reported success and the old row stayed
    served), an ``IntEnum`` member raised TypeError. Both now reach the row's entry; a value
    that cannot be the column's (5.5 for an Integer key) is refused."""
    key = uuid.uuid4()
    with factory() as session:
        session.add_all([PtRow(id=5, name="a"), PtUuRow(id=key, name="a")])
        session.commit()
    for _ in range(2):  # filled, then served
        with factory() as session:
            assert session.get(PtRow, 5).name == "a"  # type: ignore[union-attr]
            assert session.get(PtUuRow, key).name == "a"  # type: ignore[union-attr]
    with engine.begin() as conn:  # behind the cache's back
        conn.execute(update(PtRow).values(name="b"))
        conn.execute(update(PtUuRow).values(name="b"))
    assert cache.invalidate(PtRow, Num.FIVE)
    assert cache.invalidate(PtUuRow, str(key))
    with factory() as session:
        assert session.get(PtRow, 5).name == "b"  # type: ignore[union-attr]
        assert session.get(PtUuRow, key).name == "b"  # type: ignore[union-attr]
    with pytest.raises(ConfigurationError, match="primary key value"):
        cache.invalidate(PtRow, 5.5)
    with pytest.raises(ConfigurationError, match="primary key value"):
        cache.invalidate(PtUuRow, "not a uuid")
