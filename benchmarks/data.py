"""Creating, filling and dropping the ``bench_*`` tables (in a schema of their own, see
``context``), and cleaning Redis key namespaces."""

from __future__ import annotations

import datetime as dt
import decimal
import random
from typing import Any

import redis
from sqlalchemy import insert
from sqlalchemy.engine import Connection, Engine

from .models import Base, Category, Department, Item, Section

#: Rows in ``bench_item``.
ITEM_ROWS = 10_000
CATEGORIES = 100
SECTIONS = 20
DEPARTMENTS = 5

_WORDS = [
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
    "quebec",
    "romeo",
    "sierra",
    "tango",
    "uniform",
    "victor",
    "whiskey",
    "xray",
    "yankee",
    "zulu",
]
_EPOCH = dt.datetime(2024, 1, 1, 8, 0, 0)


def item_row(i: int) -> dict[str, Any]:
    """The deterministic content of item ``i`` (1-based)."""
    rnd = random.Random(i)
    return {
        "id": i,
        "name": f"item {i:05d}",
        "description": " ".join(rnd.choice(_WORDS) for _ in range(18)),
        "price": decimal.Decimal(i * 37 % 1_000_000).scaleb(-2),
        "active": i % 3 != 0,
        "created_at": _EPOCH + dt.timedelta(seconds=i * 97, microseconds=i * 7919 % 1_000_000),
        "quantity": i * 7 % 1000,
        "category_id": i % CATEGORIES + 1,
    }


def create_and_fill(engine: Engine, schema: str, rows: int = ITEM_ROWS) -> None:
    """Create ``schema`` (the engine's search_path) and its ``bench_*`` tables, fill them."""
    quoted = engine.dialect.identifier_preparer.quote_identifier(schema)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {quoted} CASCADE")
        conn.exec_driver_sql(f"CREATE SCHEMA {quoted}")
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        fill(conn, rows)
        conn.exec_driver_sql(f"ANALYZE {Item.__tablename__}")


def fill(conn: Connection, rows: int = ITEM_ROWS) -> None:
    """Insert the departments, sections, categories and ``rows`` items into the empty
    ``bench_*`` tables: the same rows for the wall-clock bench (PostgreSQL) and the
    instruction counts (``benchmarks.callgrind``, SQLite), so both measure the same data."""
    conn.execute(
        insert(Department), [{"id": i, "name": f"dept {i}"} for i in range(1, DEPARTMENTS + 1)]
    )
    conn.execute(
        insert(Section),
        [
            {"id": i, "name": f"section {i}", "department_id": i % DEPARTMENTS + 1}
            for i in range(1, SECTIONS + 1)
        ],
    )
    conn.execute(
        insert(Category),
        [
            {"id": i, "name": f"category {i}", "section_id": i % SECTIONS + 1}
            for i in range(1, CATEGORIES + 1)
        ],
    )
    batch = 2000
    for start in range(1, rows + 1, batch):
        conn.execute(
            insert(Item), [item_row(i) for i in range(start, min(start + batch, rows + 1))]
        )


def drop(engine: Engine, schema: str) -> None:
    """Drop the run's schema and every ``bench_*`` table in it."""
    quoted = engine.dialect.identifier_preparer.quote_identifier(schema)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {quoted} CASCADE")


def delete_pattern(client: redis.Redis, pattern: str) -> int:
    """Delete every key matching a glob ``pattern`` (SCAN + UNLINK); return how many."""
    deleted = 0
    batch: list[bytes] = []
    for key in client.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) >= 500:
            deleted += int(client.unlink(*batch))
            batch.clear()
    if batch:
        deleted += int(client.unlink(*batch))
    return deleted


def glob_escape(text: str) -> str:
    """``text`` with Redis glob metacharacters escaped."""
    return "".join("\\" + c if c in "\\*?[]" else c for c in text)
