"""The sweep of ``test_declarations_swept.py`` on MariaDB in a lenient ``sql_mode``, where the
database stores what it can of a value it cannot hold (``?`` for a character outside the
column's set, a clipped string, a zero date) instead of refusing it: each must invalidate, or
be written through as the database changed it."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from _cache_helpers import caching_all
from _declarations import sweep, swept

pytestmark = pytest.mark.databases("mariadb")


def test_what_a_get_returns_is_what_a_load_returns_in_a_lenient_sql_mode(
    engine: Engine, redis_url: str, prefix: str
) -> None:
    base, models = swept(engine)
    lenient = sa.create_engine(
        engine.url, connect_args={"init_command": "SET SESSION sql_mode = ''"}
    )
    try:
        with caching_all(lenient, redis_url, prefix, base) as (_, made):
            assert sweep(made, models) == []
    finally:
        lenient.dispose()
