"""MySQL/MariaDB in a lenient ``sql_mode`` (without ``STRICT_TRANS_TABLES``, as older
applications still run): a value the column cannot hold is not refused but changed, with a
warning: an integer beyond its type's range is clipped to the range, a text longer than a
``TEXT`` (65,535 bytes) is cut, a number beyond a ``DECIMAL(p, s)``'s digits becomes its
largest value, a ``TIMESTAMP`` beyond 1970 to 2038 the zero date. The cache predicted them as written and served values the database did not
hold (an ``INT`` column's ``2**31`` for its ``2**31 - 1``); they now invalidate.

What is observed: each value a get returns after its commit, against a fresh load of the row,
on a connection whose session runs ``SET sql_mode = ''``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from _cache_helpers import caching_all, one_column_models, served_and_stored
from _servers import reset_schema

pytestmark = pytest.mark.databases("mariadb")


class Base(DeclarativeBase):
    pass


#: name -> (the column's type, values beyond it and within it)
DECLARED: dict[str, tuple[Any, list[Any]]] = {
    "small": (sa.SmallInteger(), [32767, 32768, -32769]),
    "int": (sa.Integer(), [2**31 - 1, 2**31, -(2**31) - 1]),
    "big": (sa.BigInteger(), [2**63 - 1, 2**63]),
    "tiny_unsigned": (mysql.TINYINT(unsigned=True), [255, 256, -1]),
    "medium": (mysql.MEDIUMINT(), [2**23 - 1, 2**23]),
    "text": (sa.Text(), ["x" * 65535, "x" * 65536, "é" * 40000]),
    "tiny_text": (mysql.TINYTEXT(), ["x" * 255, "x" * 256]),
    "string": (sa.String(5), ["abcde", "abcdef"]),
    "numeric": (sa.Numeric(5, 2), [Decimal("999.99"), Decimal("1000.00"), Decimal("-1000")]),
    "binary": (sa.VARBINARY(4), [b"abcd", b"abcde"]),
    # beyond 1970 to 2038 (UTC): the zero date, which PyMySQL loads as a string
    "timestamp": (
        mysql.TIMESTAMP(),
        [dt.datetime(2000, 1, 1), dt.datetime(1960, 1, 1), dt.datetime(2040, 1, 1)],
    ),
}

MODELS = one_column_models(Base, "lm", {name: t for name, (t, _) in DECLARED.items()})


@pytest.fixture
def made(engine: Engine, redis_url: str, prefix: str) -> Iterator[sessionmaker[Session]]:
    reset_schema(engine, Base.metadata)
    lenient = sa.create_engine(
        engine.url, connect_args={"init_command": "SET SESSION sql_mode = ''"}
    )
    try:
        with caching_all(lenient, redis_url, prefix, Base) as (_, factory):
            yield factory
    finally:
        lenient.dispose()


def test_a_get_after_a_commit_returns_what_the_database_stored(
    made: sessionmaker[Session],
) -> None:
    wrong = []
    changed = 0  # not vacuous: the database did change values
    for name, model in MODELS.items():
        for key, value in enumerate(DECLARED[name][1]):
            found = served_and_stored(made, model, key, value)
            assert found is not None, (name, value)  # a lenient mode refuses nothing here
            got, stored = found
            changed += stored != value
            if got != stored:
                wrong.append((name, str(value)[:12], str(got)[:12], str(stored)[:12]))
    assert wrong == []
    assert changed >= 10
