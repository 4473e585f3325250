"""ORM programs that SQLAlchemy's own test suite runs, and that the cache once broke.

Each was found by ``nox -s sqlalchemy_suite`` (SQLAlchemy's test/orm with the extension on every
Session): with the extension the program raised, or kept a session alive, where without it it
does not. Each test runs the program with the cache installed and checks what the ORM user
sees, and what Redis holds.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy import Column, Integer, String, Table, literal
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.orm.exc import FlushError

from sqlalchemy_writethrough import CachedModel, WriteThroughCache

from _cache_helpers import entry_key, entry_state
from _servers import capture_sql, reset_schema


class Base(DeclarativeBase):
    pass


class OtItem(Base, CachedModel):
    __tablename__ = "ot_item"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(30))


_partial = Table(
    "ot_partial",
    Base.metadata,
    Column("a", Integer, nullable=True),
    Column("b", Integer, nullable=True),
    Column("name", String(30)),
)


class OtPartial(Base, CachedModel):
    """A composite key that may be partly NULL (``allow_partial_pks``, SQLAlchemy's default)."""

    __table__ = _partial
    __mapper_args__ = {"primary_key": [_partial.c.a, _partial.c.b]}


@pytest.fixture
def factory(engine: Engine, redis_url: str, prefix: str) -> Iterator[sessionmaker[Session]]:
    reset_schema(engine, Base.metadata)
    cache = WriteThroughCache(redis_url, prefix=prefix)
    maker = sessionmaker(engine, info={"cache": cache})
    cache.install(maker)
    yield maker
    cache.uninstall(maker)
    cache.redis.close()


def test_a_sql_expression_as_primary_key_value(
    factory: sessionmaker[Session], engine: Engine, redis_client: redis.Redis
) -> None:
    """``Item(id=literal(2) + 3)``: the database computes the key. The flush raised
    'Boolean value of this clause is not defined'."""
    with factory() as session:
        session.add(OtItem(id=literal(2) + 3, name="computed"))
        session.commit()
    with factory() as session:
        item = session.get(OtItem, 5)
        assert item is not None and item.name == "computed"
    cache = factory.kw["info"]["cache"]
    assert entry_state(redis_client, entry_key(cache, OtItem, 5)) == "value"  # filled
    with factory() as session, capture_sql(engine) as sql:
        assert session.get(OtItem, 5) is not None
    assert sql == []


@pytest.mark.parametrize("change", ["update", "delete"])
def test_a_partly_null_composite_key_fails_as_sqlalchemy_fails_it(
    factory: sessionmaker[Session], engine: Engine, change: str
) -> None:
    """A row whose key is partly NULL, loaded, then changed or deleted: SQLAlchemy refuses the
    flush with its FlushError. With the cache the flush raised TypeError before SQLAlchemy
    could say so (no cache key can name such a row; it is never cached)."""
    with engine.begin() as conn:
        conn.execute(_partial.insert(), [{"a": 1, "b": None, "name": "half"}])
    outcomes = []
    for make in (sessionmaker(engine), factory):  # without the cache, then with it
        with make() as session:
            row = session.scalars(sa.select(OtPartial).where(OtPartial.a == 1)).one()
            assert (row.a, row.b) == (1, None)
            if change == "update":
                row.name = "changed"
            else:
                session.delete(row)
            with pytest.raises(FlushError) as raised:
                session.flush()
            outcomes.append(str(raised.value).split(" (Background")[0])
    assert outcomes[0] == outcomes[1]


def test_a_session_dropped_without_close_is_freed(factory: sessionmaker[Session]) -> None:
    """A session with a flushed, uncommitted change, dropped without close(): nothing of the
    cache keeps it alive (its pooled connection held it through the cache's tracker), so its
    objects are detached and can join another session."""
    session = factory()
    item = OtItem(id=1, name="flushed")
    session.add(item)
    session.flush()
    item.name = "dirty"
    dropped = weakref.ref(session)
    del session
    gc.collect()
    assert dropped() is None
    with factory() as other:
        other.add(item)  # raised "already attached to session" while the old one lived
        other.rollback()
