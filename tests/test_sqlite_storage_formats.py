"""SQLite's own ``DATETIME``, ``DATE`` and ``TIME`` declared with ``truncate_microseconds``
or a ``storage_format`` of their own: SQLite stores the text the type formats, which may leave
out the microseconds or the seconds, and a load parses back what is left. The cache predicted
the value as written and served ``12:30:15.123456`` for a column that holds ``12:30:15``;
it now predicts what the type's own format keeps.

What is observed: each value a get returns after its commit (served from what the commit
wrote, no SQL), against a fresh load of the row.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from sqlalchemy_writethrough import WriteThroughCache

from _cache_helpers import caching_all, entry_key, entry_state, one_column_models, served_and_stored
from _servers import reset_schema

pytestmark = pytest.mark.databases("sqlite")


class Base(DeclarativeBase):
    pass


AT = dt.datetime(2024, 1, 2, 3, 4, 5, 123456)

#: name -> (the column's type, values)
DECLARED: dict[str, tuple[Any, list[Any]]] = {
    "datetime_truncated": (
        sqlite.DATETIME(truncate_microseconds=True),
        [AT, AT.replace(microsecond=0), AT.replace(tzinfo=dt.timezone.utc)],
    ),
    "datetime_minutes": (
        sqlite.DATETIME(
            storage_format="%(year)04d/%(month)02d/%(day)02d %(hour)02d:%(minute)02d",
            regexp=r"(\d+)/(\d+)/(\d+) (\d+):(\d+)",
        ),
        [AT, AT.replace(second=0, microsecond=0)],
    ),
    "date_us": (
        sqlite.DATE(
            storage_format="%(month)02d/%(day)02d/%(year)04d",
            regexp=r"(?P<month>\d+)/(?P<day>\d+)/(?P<year>\d+)",
        ),
        [AT.date(), dt.date(1, 1, 1)],
    ),
    "time_truncated": (
        sqlite.TIME(truncate_microseconds=True),
        [AT.time(), dt.time(23, 59, 59, 999999), dt.time(1, 2, 3)],
    ),
    "time_minutes": (
        sqlite.TIME(storage_format="%(hour)02d-%(minute)02d", regexp=r"(\d+)-(\d+)"),
        [AT.time(), dt.time(12, 30)],
    ),
    "datetime": (sqlite.DATETIME(), [AT]),
}

MODELS = one_column_models(Base, "sf", {name: t for name, (t, _) in DECLARED.items()})


@pytest.fixture
def cached(
    engine: Engine, redis_url: str, prefix: str
) -> Iterator[tuple[WriteThroughCache, sessionmaker[Session]]]:
    reset_schema(engine, Base.metadata)
    with caching_all(engine, redis_url, prefix, Base) as found:
        yield found


def test_a_get_after_a_commit_returns_what_the_database_stored(
    cached: tuple[WriteThroughCache, sessionmaker[Session]], redis_client: redis.Redis
) -> None:
    cache, made = cached
    wrong = []
    changed = 0  # not vacuous: the format did drop digits
    for name, model in MODELS.items():
        for key, value in enumerate(DECLARED[name][1]):

            def written_through(model: Any = model, key: int = key) -> None:
                assert entry_state(redis_client, entry_key(cache, model, key)) == "value"

            found = served_and_stored(made, model, key, value, after_commit=written_through)
            assert found is not None, (name, value)
            got, stored = found
            changed += stored != value
            if (type(got), got) != (type(stored), stored):
                wrong.append((name, value, got, stored))
    assert wrong == []
    assert changed >= 6
