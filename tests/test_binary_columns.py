"""What a commit writes through of a binary column on MySQL/MariaDB, whose ``BINARY(n)`` pads.

``BINARY(8)`` stores ``b"ab"`` as ``b"ab"`` and six zero bytes, which a load returns; the
cache served ``b"ab"``. A value longer than a ``VARBINARY(n)`` or a BLOB is refused (or cut,
in a lenient ``sql_mode``): not predicted. SQLite stores bytes as given (and PostgreSQL has
no ``BINARY``; its ``BYTEA`` keeps them as given too, ``tests/test_exactness.py``).

What is observed: each value a get returns after its commit, against a fresh load of the row.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Session, mapped_column, sessionmaker

from sqlalchemy_writethrough import WriteThroughWarning

from _cache_helpers import cache_on
from _servers import reset_schema

pytestmark = pytest.mark.databases("mariadb", "sqlite")


class Base(DeclarativeBase):
    pass


#: name -> how the column is declared
DECLARED: dict[str, Any] = {
    "binary": sa.BINARY(8),
    "binary_one": sa.BINARY(),
    "varbinary": sa.VARBINARY(8),
    "large_binary_8": sa.LargeBinary(8),
    "large_binary": sa.LargeBinary(),
}

MODELS: dict[str, type] = {
    name: type(
        f"Bc_{name}",
        (Base,),
        {
            "__tablename__": f"bc_{name}",
            "id": mapped_column(sa.Integer, primary_key=True, autoincrement=False),
            "data": mapped_column(type_),
        },
    )
    for name, type_ in DECLARED.items()
}

VALUES = [b"a", b"ab", b"abcdefgh", b"abcdefghij", b"ab\x00", b"", b"x" * 70000]


@pytest.fixture
def made(engine: Engine, redis_url: str, prefix: str) -> Iterator[sessionmaker[Session]]:
    reset_schema(engine, Base.metadata)
    with cache_on(engine, redis_url, prefix) as (cache, factory):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", WriteThroughWarning)
            cache.register_all(Base)
            Base.registry.configure()
        yield factory


def test_a_get_after_a_commit_returns_what_the_database_stored(
    made: sessionmaker[Session],
) -> None:
    wrong = []
    for name, model in MODELS.items():
        for key, value in enumerate(VALUES):
            try:
                with made() as session:
                    session.add(model(id=key, data=value))
                    session.commit()
            except sa.exc.DBAPIError:  # longer than the column: refused
                continue
            with made() as session:
                got = session.get(model, key).data  # type: ignore[union-attr]
            with made() as session:
                stored = session.scalars(
                    sa.select(model.data).where(model.id == key)  # type: ignore[attr-defined]
                ).one()
            if got != stored:
                wrong.append((name, value[:12], got[:12], stored[:12]))
    assert wrong == []
