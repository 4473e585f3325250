"""Every declaration a database's dialect offers, against the values that database changes.

For each database, one model per declared column type (the generic types in their forms,
the dialect's own, with precisions, scales, lengths, character sets, time zones, storage
formats), and for each a list of awkward values (``tests/_declarations.py``): for each value,
the row is committed, got (from what the commit wrote, or from a load that filled the entry),
and compared with a fresh ``select()`` of the row: class and ``repr()`` must agree. Then one
row is updated to each value in turn and compared again. A value the database refuses is
skipped; a value a column cannot cache makes its commit invalidate, which passes (the get then
loads).

This is the sweep that found the wrong values of ``Numeric(scale=2)``, ``with_variant()``,
``BINARY(n)``, declared MySQL character sets, SQLite's storage formats and asyncpg's whole
numbers; kept so that a new rule is checked against every declaration, not only its own.
MariaDB runs it in a lenient ``sql_mode`` too (``test_declarations_swept_lenient.py``),
PostgreSQL on asyncpg too (``test_declarations_swept_asyncpg.py``).
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from _cache_helpers import caching_all, entry_key, entry_state
from _declarations import sweep, swept
from _servers import capture_sql


def test_what_a_get_returns_after_a_commit_is_what_a_load_returns(
    engine: Engine, redis_url: str, prefix: str
) -> None:
    base, models = swept(engine)
    with caching_all(engine, redis_url, prefix, base) as (_, made):
        assert sweep(made, models) == []


@pytest.mark.databases("postgresql")
def test_a_domain_is_cached_as_its_data_type(
    engine: Engine, redis_url: str, prefix: str, redis_client: Any
) -> None:
    """A ``DOMAIN`` column (what reflection gives a model of a database that uses them) left
    its model out of the cache; the drivers load its values as its data type's, and a commit
    now writes them through as that type's would (``Numeric(10, 2)``'s rounding included)."""
    base, models = swept(engine)
    with caching_all(engine, redis_url, prefix, base) as (cache, made):
        for name, value, expected in (
            ("domain_int", 5, 5),
            ("domain_numeric", Decimal("1.005"), Decimal("1.01")),
            ("domain_text", "ab", "ab"),
            ("domain_timestamp", dt.datetime(2024, 1, 2, 3, 4, 5, 6), None),
        ):
            model = models[name][0]
            with made() as session:
                session.add(model(id=100, value=value))
                session.commit()
            state = entry_state(redis_client, entry_key(cache, model, 100))
            assert state == "value", name
            with made() as session, capture_sql(engine) as sql:
                got = session.get(model, 100).value
            assert sql == [], name
            assert got == (value if expected is None else expected), name
