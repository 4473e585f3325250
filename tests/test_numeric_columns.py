"""What a commit writes through of a ``Numeric`` column, declared every way SQLAlchemy allows.

The cache predicted the stored value from the declared precision and scale, not from the
column SQLAlchemy creates: ``Numeric(scale=2)`` is created as ``NUMERIC``, without the scale
(unconstrained on PostgreSQL: ``1.005`` stays ``1.005``; ``DECIMAL(10, 0)`` on MySQL: ``1``),
and ``Numeric(10)`` as ``NUMERIC(10)``, whose scale is 0 (``1.5`` is stored as ``2``). The
cache served ``1.01`` and ``1.5``: 17 values of these ten that neither database held, 9 on
MariaDB. A value beyond the column's digits (which MySQL's lenient modes clip to the largest
the column holds) is not predicted either.

What is observed: each value a get returns after its commit, against a fresh load of the row;
and what ``cache.models(engine)`` says of the columns it does not predict.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from sqlalchemy_writethrough import WriteThroughCache

from _cache_helpers import caching_all, one_column_models, served_and_stored
from _servers import reset_schema

pytestmark = [
    pytest.mark.databases("postgresql", "mariadb", "sqlite"),
    # each commit of a column not predicted invalidates, said once at the first flush
    pytest.mark.filterwarnings("ignore::sqlalchemy_writethrough.WriteThroughWarning"),
]


class Base(DeclarativeBase):
    pass


#: name -> how the column is declared
DECLARED: dict[str, sa.Numeric[Any]] = {
    "scale_only": sa.Numeric(scale=2),
    "precision_only": sa.Numeric(10),
    "both": sa.Numeric(10, 2),
    "neither": sa.Numeric(),
    "wide": sa.Numeric(40, 3),
}

MODELS = one_column_models(Base, "nc", DECLARED)

VALUES = [
    "1.005",
    "1.5",
    "2.5",
    "-0.5",
    "-0.005",
    "12345678.125",
    "123456789012.5",  # beyond Numeric(10, 2): refused, or clipped in a lenient mode
    "1.2E+3",
    "0.000001",
    "-0",
    "1.2E+40",  # PostgreSQL's unconstrained NUMERIC: 41 digits (28 is decimal's default)
    "123456789012345678901234567890.5",  # 31 digits: Numeric(40, 3) holds it
]


@pytest.fixture
def cached(
    engine: Engine, redis_url: str, prefix: str
) -> Iterator[tuple[WriteThroughCache, sessionmaker[Session]]]:
    reset_schema(engine, Base.metadata)
    with caching_all(engine, redis_url, prefix, Base) as found:
        yield found


def test_a_get_after_a_commit_returns_what_the_database_stored(
    cached: tuple[WriteThroughCache, sessionmaker[Session]],
) -> None:
    _, made = cached
    wrong = []
    for name, model in MODELS.items():
        for key, value in enumerate(VALUES):
            found = served_and_stored(made, model, key, Decimal(value))
            if found is not None and str(found[0]) != str(found[1]):
                wrong.append((name, value, *map(str, found)))
    assert wrong == []


def test_models_says_which_declarations_are_not_predicted(
    engine: Engine, cached: tuple[WriteThroughCache, sessionmaker[Session]]
) -> None:
    cache, _ = cached
    report = cache.models(engine)
    inexact = {
        name: [c.reason for c in report[model].inexact_columns] for name, model in MODELS.items()
    }
    if engine.dialect.name == "sqlite":  # a float at the return scale: predicted
        assert inexact == {name: [] for name in MODELS}
        return
    assert "no precision" in inexact["scale_only"][0]
    assert inexact["precision_only"] == inexact["both"] == inexact["wide"] == []
    if engine.dialect.name == "postgresql":
        assert inexact["neither"] == []  # unconstrained: the value as given
    else:
        assert "DECIMAL(10, 0)" in inexact["neither"][0]
