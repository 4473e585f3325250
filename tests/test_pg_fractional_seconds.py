"""PostgreSQL time types declared with fewer digits of seconds, or fields, than a value has.

``TIMESTAMP(0)`` stores ``12:34:56.789567`` as ``12:34:57``, ``TIMESTAMP(3)`` as ``...56.790``,
``TIME(0)`` and ``INTERVAL(0)`` (``Interval(second_precision=0)``) round the same way,
``INTERVAL DAY`` drops the hours, and ``TIME WITH TIME ZONE`` gives a value written without an
offset the session's. The cache wrote the value through as given and served it: 9 of these
values were ones the database did not hold. They now invalidate (a value with no digits to
round is still written through), and ``cache.models(engine)`` says why.

What is observed: each value a get returns after its commit, against a fresh load of the row.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
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
    pytest.mark.databases("postgresql"),
    pytest.mark.filterwarnings("ignore::sqlalchemy_writethrough.WriteThroughWarning"),
]

UTC = dt.timezone.utc
T = dt.datetime(2024, 6, 1, 12, 34, 56, 789567)


class Base(DeclarativeBase):
    pass


#: name -> (the column's type, values: some it changes, one it keeps as given)
DECLARED: dict[str, tuple[Any, list[Any]]] = {
    "timestamp_0": (pg.TIMESTAMP(precision=0), [T, T.replace(microsecond=0)]),
    "timestamp_3": (pg.TIMESTAMP(precision=3), [T, T.replace(microsecond=790000)]),
    "timestamptz_0": (pg.TIMESTAMP(timezone=True, precision=0), [T.replace(tzinfo=UTC)]),
    "time_0": (pg.TIME(precision=0), [T.time(), T.time().replace(microsecond=0)]),
    "time_tz": (sa.Time(timezone=True), [T.time()]),
    "interval_day": (pg.INTERVAL(fields="DAY"), [dt.timedelta(days=1, hours=5)]),
    "interval_0": (pg.INTERVAL(precision=0), [dt.timedelta(seconds=1, microseconds=600000)]),
    "interval_generic_0": (sa.Interval(second_precision=0), [dt.timedelta(microseconds=700000)]),
    "interval_minute": (pg.INTERVAL(fields="HOUR TO MINUTE"), [dt.timedelta(hours=5, seconds=30)]),
}

MODELS = one_column_models(Base, "fs", {name: t for name, (t, _) in DECLARED.items()})


@pytest.fixture
def cached(
    engine: Engine, redis_url: str, prefix: str
) -> Iterator[tuple[WriteThroughCache, sessionmaker[Session]]]:
    reset_schema(engine, Base.metadata)
    with caching_all(engine, redis_url, prefix, Base) as found:
        yield found


def test_a_get_after_a_commit_returns_what_the_database_stored(
    cached: tuple[WriteThroughCache, sessionmaker[Session]], redis_client: Any
) -> None:
    cache, made = cached
    wrong = []
    written = []
    for name, model in MODELS.items():
        for key, value in enumerate(DECLARED[name][1]):

            def look(model: Any = model, key: int = key, name: str = name) -> None:
                if entry_state(redis_client, entry_key(cache, model, key)) == "value":
                    written.append(name)  # by the commit

            found = served_and_stored(made, model, key, value, look)
            assert found is not None, (name, value)
            got, stored = found
            if (type(got), got) != (type(stored), stored):
                wrong.append((name, value, got, stored))
    assert wrong == []
    # a value with nothing to round is still written through
    assert sorted(written) == ["time_0", "timestamp_0", "timestamp_3"]


def test_models_says_why_commits_invalidate(
    engine: Engine, cached: tuple[WriteThroughCache, sessionmaker[Session]]
) -> None:
    cache, _ = cached
    report = cache.models(engine)
    for name, model in MODELS.items():
        [column] = report[model].inexact_columns
        assert column.reason, name
