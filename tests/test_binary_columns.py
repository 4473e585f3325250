"""What a commit writes through of a binary column on MySQL/MariaDB, whose ``BINARY(n)`` pads.

``BINARY(8)`` stores ``b"ab"`` as ``b"ab"`` and six zero bytes, which a load returns; the
cache served ``b"ab"``. A value longer than a ``VARBINARY(n)`` or a BLOB is refused (or cut,
in a lenient ``sql_mode``): not predicted. SQLite stores bytes as given (and PostgreSQL has
no ``BINARY``; its ``BYTEA`` keeps them as given too, ``tests/test_exactness.py``).

What is observed: each value a get returns after its commit, against a fresh load of the row.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from _cache_helpers import caching_all, one_column_models, served_and_stored
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

MODELS = one_column_models(Base, "bc", DECLARED)

VALUES = [b"a", b"ab", b"abcdefgh", b"abcdefghij", b"ab\x00", b"", b"x" * 70000]


@pytest.fixture
def made(engine: Engine, redis_url: str, prefix: str) -> Iterator[sessionmaker[Session]]:
    reset_schema(engine, Base.metadata)
    with caching_all(engine, redis_url, prefix, Base) as (_, factory):
        yield factory


def test_a_get_after_a_commit_returns_what_the_database_stored(
    made: sessionmaker[Session],
) -> None:
    wrong = []
    for name, model in MODELS.items():
        for key, value in enumerate(VALUES):
            found = served_and_stored(made, model, key, value)
            if found is not None and found[0] != found[1]:
                wrong.append((name, value[:12], found[0][:12], found[1][:12]))
    assert wrong == []
