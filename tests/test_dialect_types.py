"""A column type with a stored form on SQLAlchemy's default dialect but none on the database.

A TypeDecorator may pick its implementation per database (``load_dialect_impl``):
sqlalchemy-utils' ``DateRangeType`` is an Integer to SQLAlchemy's default dialect and
PostgreSQL's ``DATERANGE`` on PostgreSQL. The configuration check (on the default dialect)
passes; the cache meets the database's type at the first flush or load, inside the
application's commit or get, which used to raise ``ConfigurationError`` from there: the
commit failed after its SQL ran, every get of the model raised. Now that column stores
nothing on that database: rows holding a value there are never cached (NULL is), each commit
invalidates them, and a ``WriteThroughWarning`` says so once. What is observed: that commits
and gets work, what they return, and the SQL each get emits.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import String
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.types import TypeDecorator, UserDefinedType

from sqlalchemy_writethrough import CachedModel, WriteThroughCache, WriteThroughWarning

from _servers import capture_sql, reset_schema


class _DatabaseOwnText(UserDefinedType[str]):
    """A type of the database's own, which the cache has no stored form for."""

    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "VARCHAR(40)"


class PerDatabaseText(TypeDecorator[str]):
    """A String to SQLAlchemy's default dialect, the database's own type elsewhere."""

    impl = String(40)
    cache_ok = True

    def load_dialect_impl(self, dialect: Any) -> Any:
        if dialect.name == "default":
            return dialect.type_descriptor(String(40))
        return dialect.type_descriptor(_DatabaseOwnText())


class Base(DeclarativeBase):
    pass


class DtRow(Base, CachedModel):
    __tablename__ = "dt_row"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    label: Mapped[str | None] = mapped_column(PerDatabaseText())


_caches: list[WriteThroughCache] = []


def _factory(engine: Engine, redis_url: str, prefix: str) -> Iterator[sessionmaker[Session]]:
    cache = WriteThroughCache(redis_url, prefix=prefix, stats_interval=None)
    made = sessionmaker(engine)
    cache.install(made)
    _caches.append(cache)
    yield made
    _caches.remove(cache)
    cache.uninstall(made)
    cache.close()


@pytest.fixture
def factory(engine: Engine, redis_url: str, prefix: str) -> Iterator[sessionmaker[Session]]:
    reset_schema(engine, Base.metadata)
    yield from _factory(engine, redis_url, prefix)


@pytest.fixture
def reader(engine: Engine, redis_url: str, prefix: str) -> Iterator[sessionmaker[Session]]:
    """Another process's cache (its layouts meet the database at its first load)."""
    yield from _factory(engine, redis_url, prefix)


def _get(factory: sessionmaker[Session], engine: Engine, pk: int) -> tuple[Any, int]:
    with factory() as session, capture_sql(engine) as statements:
        row = session.get(DtRow, pk)
        values = None if row is None else (row.name, row.label)
    return values, len(statements)


def test_commit_and_get_of_a_type_the_database_makes_its_own(
    engine: Engine, factory: sessionmaker[Session], reader: sessionmaker[Session]
) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with factory() as session:
            session.add_all([DtRow(id=1, name="a", label="x"), DtRow(id=2, name="b")])
            session.commit()
    said = [str(w.message) for w in caught if issubclass(w.category, WriteThroughWarning)]
    assert any("DtRow.label" in text and "never cached" in text for text in said), said

    # a process whose first contact with the database is a get
    assert _get(reader, engine, 1) == (("a", "x"), 1)
    assert _get(reader, engine, 1) == (("a", "x"), 1), "a row with a value is never cached"
    assert _get(factory, engine, 2)[0] == ("b", None)
    assert _get(factory, engine, 2) == (("b", None), 0), "a NULL is stored"

    with factory() as session:
        row = session.get(DtRow, 1)
        assert row is not None
        row.label = "y"
        other = session.get(DtRow, 2)
        assert other is not None
        other.label = "z"
        session.commit()
    assert _get(reader, engine, 1)[0] == ("a", "y")
    assert _get(reader, engine, 2)[0] == ("b", "z")
    # what the cache says of the model on this database (the CLI's `models` prints it)
    inexact = _caches[0].models(engine)[DtRow].inexact_columns
    assert [(c.attribute, "never cached" in str(c)) for c in inexact] == [("label", True)]
