"""Columns whose type differs by database (``with_variant()``) or carries MySQL's own options.

``DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")`` is how an application
keeps microseconds on MySQL: the cache predicted from ``DateTime``, which MariaDB truncates,
and served ``12:34:56`` for a column that holds ``12:34:56.123456``. The same for every
variant (a ``TIMESTAMP(3)``, a ``NUMERIC(20, 2)``, an ``INT`` for a ``BigInteger``): the cache
now predicts from the type the table was created with on each database. And MySQL's own:
a ``ZEROFILL`` integer is unsigned, an ``UNSIGNED`` DECIMAL makes a negative 0 in a lenient
``sql_mode``, a ``TINYBLOB`` holds 255 bytes and a ``LONGBLOB`` 4 GiB (written through, not
held to a BLOB's 65,535 bytes); PostgreSQL returns ``NUMERIC(2, -3)``'s ``12000`` written out.

What is observed: each value a get returns after its commit, against a fresh load of the row,
class and printed form included; and whether a large ``LONGBLOB`` value was written through.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from sqlalchemy_writethrough import WriteThroughCache

from _cache_helpers import (
    caching_all,
    entry_key,
    entry_state,
    one_column_models,
    served_and_stored,
)
from _servers import reset_schema

pytestmark = [
    pytest.mark.databases("postgresql", "mariadb"),
    pytest.mark.filterwarnings("ignore::sqlalchemy_writethrough.WriteThroughWarning"),
]

T = dt.datetime(2024, 6, 1, 12, 34, 56, 123456)


class Base(DeclarativeBase):
    pass


class MysqlBase(DeclarativeBase):
    pass


class PostgresqlBase(DeclarativeBase):
    pass


#: name -> (the column's type, values); MySQL's own types only on MariaDB
DECLARED: dict[str, tuple[Any, list[Any]]] = {
    "datetime": (
        sa.DateTime()
        .with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
        .with_variant(pg.TIMESTAMP(precision=3), "postgresql"),
        [T],
    ),
    "numeric": (
        sa.Numeric(20, 8)
        .with_variant(mysql.DECIMAL(20, 2), "mysql", "mariadb")
        .with_variant(pg.NUMERIC(20, 2), "postgresql"),
        [Decimal("1.12345678")],
    ),
    "big_integer": (sa.BigInteger().with_variant(mysql.INTEGER(), "mysql", "mariadb"), [2**40]),
}
MYSQL_ONLY: dict[str, tuple[Any, list[Any]]] = {
    "zerofill": (mysql.INTEGER(zerofill=True), [-5, 5]),
    "unsigned_decimal": (mysql.DECIMAL(10, 2, unsigned=True), [Decimal("-1.5"), Decimal("1.5")]),
    "tinyblob": (mysql.TINYBLOB(), [b"x" * 300, b"x" * 10]),
    "longblob": (mysql.LONGBLOB(), [b"x" * 70000]),
}
POSTGRESQL_ONLY: dict[str, tuple[Any, list[Any]]] = {
    "negative_scale": (sa.Numeric(2, -3), [Decimal("12345")]),
    "array_of_variant": (
        pg.ARRAY(sa.DateTime().with_variant(pg.TIMESTAMP(precision=3), "postgresql")),
        [[T]],
    ),
}


def _models(declared: dict[str, tuple[Any, list[Any]]], base: type) -> dict[str, type]:
    return one_column_models(base, "dv", {name: t for name, (t, _) in declared.items()})


MODELS = {
    **_models(DECLARED, Base),
    **_models(MYSQL_ONLY, MysqlBase),
    **_models(POSTGRESQL_ONLY, PostgresqlBase),
}
VALUES = {name: v for name, (_, v) in {**DECLARED, **MYSQL_ONLY, **POSTGRESQL_ONLY}.items()}


@pytest.fixture
def cached(
    engine: Engine, redis_url: str, prefix: str
) -> Iterator[tuple[WriteThroughCache, sessionmaker[Session], list[str]]]:
    on_postgresql = engine.dialect.name == "postgresql"
    own = PostgresqlBase if on_postgresql else MysqlBase
    mine = [*DECLARED, *(POSTGRESQL_ONLY if on_postgresql else MYSQL_ONLY)]
    reset_schema(engine, Base.metadata)
    reset_schema(engine, own.metadata)
    # a lenient sql_mode on MariaDB: the database changes what it cannot hold, instead of
    # refusing it (refused, nothing would be cached to be wrong)
    args = {} if on_postgresql else {"init_command": "SET SESSION sql_mode = ''"}
    lenient = sa.create_engine(engine.url, connect_args=args)
    try:
        with caching_all(lenient, redis_url, prefix, Base, own) as (cache, made):
            yield cache, made, mine
    finally:
        lenient.dispose()


def test_a_get_after_a_commit_returns_what_the_database_stored(
    cached: tuple[WriteThroughCache, sessionmaker[Session], list[str]], redis_client: Any
) -> None:
    cache, made, mine = cached
    wrong = []
    written = []
    for name in mine:
        model = MODELS[name]
        for key, value in enumerate(VALUES[name]):

            def look(model: Any = model, key: int = key, name: str = name) -> None:
                if entry_state(redis_client, entry_key(cache, model, key)) == "value":
                    written.append(name)  # by the commit

            found = served_and_stored(made, model, key, value, look)
            assert found is not None, (name, value)
            got, stored = found
            if (type(got), str(got)) != (type(stored), str(stored)):
                wrong.append((name, str(value)[:20], str(got)[:20], str(stored)[:20]))
    assert wrong == []
    if "longblob" in mine:  # written through: a LONGBLOB holds it
        assert "longblob" in written
