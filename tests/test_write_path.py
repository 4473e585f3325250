"""The write path: lock at flush, publish after COMMIT, restore after ROLLBACK.

Every test runs on SQLite, PostgreSQL and MariaDB against the real Redis and asserts what a user
can observe: what Redis holds (entry states, decoded rows, keys), which SQL a ``get`` emitted,
and what the caller got back, compared with a fresh load from the database.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy import ForeignKey, String, event, inspect, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)

from sqlalchemy_writethrough import CachedModel, WriteThroughCache

from _cache_helpers import cached_values, entry_key, entry_state, prefix_keys
from _servers import COUNTED, capture_sql, counting_redis, reset_schema

TESTS_DIR = Path(__file__).resolve().parent
PROJECT_DIR = TESTS_DIR.parent


# ------------------------------------------------------------------------------- models


class Base(DeclarativeBase):
    pass


class WpProduct(Base, CachedModel):
    """A cached model with explicit primary keys and several exactly-predictable column types."""

    __tablename__ = "wp_product"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    qty: Mapped[int] = mapped_column(default=0)
    active: Mapped[bool] = mapped_column(default=True)
    note: Mapped[str | None] = mapped_column(String(100))
    added: Mapped[dt.datetime | None] = mapped_column(sa.DateTime)


class WpItem(Base, CachedModel):
    """A cached model whose primary key the database generates."""

    __tablename__ = "wp_item"

    id: Mapped[int] = mapped_column(primary_key=True)
    label: Mapped[str] = mapped_column(String(50))


class WpNote(Base, CachedModel):
    """``strategy="invalidate"`` chosen by the model itself."""

    __tablename__ = "wp_note"
    __writethrough__ = {"strategy": "invalidate"}

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    body: Mapped[str] = mapped_column(String(100))


class WpTag(Base):
    """Not a CachedModel: cached only where a test calls ``cache.register(WpTag, ...)``."""

    __tablename__ = "wp_tag"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    body: Mapped[str] = mapped_column(String(100))


class WpBox(Base, CachedModel):
    """A cached parent whose children are deleted with it and when taken out of it
    (``delete-orphan``), and whose loose children only lose their foreign key."""

    __tablename__ = "wp_box"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    parts: Mapped[list[WpPart]] = relationship(cascade="all, delete-orphan")
    loose: Mapped[list[WpLoose]] = relationship()


class WpPart(Base, CachedModel):
    __tablename__ = "wp_part"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    box_id: Mapped[int | None] = mapped_column(ForeignKey("wp_box.id"))
    name: Mapped[str] = mapped_column(String(50))


class WpLoose(Base, CachedModel):
    __tablename__ = "wp_loose"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    box_id: Mapped[int | None] = mapped_column(ForeignKey("wp_box.id"))
    name: Mapped[str] = mapped_column(String(50))


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def cache(redis_url: str, prefix: str) -> Iterator[WriteThroughCache]:
    client = redis.Redis.from_url(redis_url, socket_timeout=1)
    try:
        yield WriteThroughCache(client, prefix=prefix)
    finally:
        client.close()


@pytest.fixture
def make_session(engine: Engine, cache: WriteThroughCache) -> sessionmaker[Session]:
    """A sessionmaker with ``cache`` installed, on freshly created ``wp_*`` tables."""
    reset_schema(engine, Base.metadata)
    factory = sessionmaker(engine)
    cache.install(factory)
    return factory


@pytest.fixture
def savepoint_safe(engine: Engine) -> Engine:
    """Make SAVEPOINT work on SQLite (SQLAlchemy's documented pysqlite workaround).

    pysqlite does not emit BEGIN before SAVEPOINT, so a savepoint opened first in a transaction
    would be the transaction and its RELEASE would COMMIT. The workaround lets SQLAlchemy emit
    BEGIN itself. The other databases are left as they are.
    """
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _no_driver_transactions(dbapi_connection: Any, record: Any) -> None:
            dbapi_connection.isolation_level = None

        @event.listens_for(engine, "begin")
        def _begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN")

        engine.dispose()  # pooled connections were made without the workaround
    return engine


# ------------------------------------------------------------------------------ helpers


def values_of(obj: Any) -> dict[str, Any]:
    """Every column attribute of a loaded instance."""
    return {attr.key: getattr(obj, attr.key) for attr in inspect(type(obj)).column_attrs}


def assert_same(got: dict[str, Any], expected: dict[str, Any]) -> None:
    """Equal values of the same Python types (``1 == True``, so types are checked too)."""
    assert got == expected
    assert {k: type(v) for k, v in got.items()} == {k: type(v) for k, v in expected.items()}


def db_values(engine: Engine, model: type, pk: Any) -> dict[str, Any] | None:
    """The row as a fresh ORM load from the database returns it (a plain Session, no cache)."""
    with Session(engine) as session:
        obj: Any = session.get(model, pk)
        return None if obj is None else values_of(obj)


def get_from_cache(
    factory: sessionmaker[Session], engine: Engine, model: type, pk: Any
) -> dict[str, Any]:
    """A NEW session's ``get``; asserts it was served with no SQL at all."""
    with factory() as session, capture_sql(engine) as statements:
        obj: Any = session.get(model, pk)
        assert obj is not None, f"{model.__name__}({pk!r}) not found"
        values = values_of(obj)
    assert statements == [], f"get({model.__name__}, {pk!r}) emitted SQL: {statements}"
    return values


def get_via_database(
    factory: sessionmaker[Session], engine: Engine, model: type, pk: Any
) -> dict[str, Any] | None:
    """A NEW session's ``get``; asserts it went to the database (SQL was emitted)."""
    with factory() as session, capture_sql(engine) as statements:
        obj: Any = session.get(model, pk)
        values = None if obj is None else values_of(obj)
    assert statements, f"get({model.__name__}, {pk!r}) was served from the cache"
    return values


def full_product(pk: int, name: str) -> WpProduct:
    """A new product with every column given a value."""
    return WpProduct(
        id=pk,
        name=name,
        qty=pk * 10,
        active=True,
        note=f"note {pk}",
        added=dt.datetime(2024, 1, 1 + pk % 28, 12, 30, 15),
    )


def seed_products(engine: Engine, *ids: int) -> None:
    """Insert products through a plain Session (no cache involved)."""
    with Session(engine) as session:
        session.add_all([full_product(i, f"product {i}") for i in ids])
        session.commit()


def warm(
    factory: sessionmaker[Session],
    engine: Engine,
    cache: WriteThroughCache,
    client: redis.Redis,
    model: type,
    *pks: Any,
) -> dict[Any, dict[str, Any]]:
    """Load each row once (a miss that fills), check it is now a cached VALUE, return its values."""
    before: dict[Any, dict[str, Any]] = {}
    for pk in pks:
        get_via_database(factory, engine, model, pk)
        assert entry_state(client, entry_key(cache, model, pk)) == "value"
        cached = cached_values(cache, client, model, pk, dialect=engine.dialect)
        assert cached is not None
        before[pk] = cached
    return before


def assert_restored(
    factory: sessionmaker[Session],
    engine: Engine,
    cache: WriteThroughCache,
    client: redis.Redis,
    model: type,
    pk: Any,
    previous: dict[str, Any],
) -> None:
    """The entry holds exactly its previous VALUE, the database agrees, and get needs no SQL."""
    assert entry_state(client, entry_key(cache, model, pk)) == "value"
    cached = cached_values(cache, client, model, pk, dialect=engine.dialect)
    assert cached is not None
    assert_same(cached, previous)
    database = db_values(engine, model, pk)
    assert database is not None
    assert_same(database, previous)
    assert_same(get_from_cache(factory, engine, model, pk), previous)


def assert_value_or_miss(
    factory: sessionmaker[Session],
    engine: Engine,
    cache: WriteThroughCache,
    client: redis.Redis,
    model: type,
    pk: Any,
) -> dict[str, Any]:
    """The entry is a miss or a VALUE equal to the database row; a new get returns the DB row."""
    database = db_values(engine, model, pk)
    assert database is not None
    state = entry_state(client, entry_key(cache, model, pk))
    assert state in ("value", None), f"entry of {pk!r} is {state!r}"
    if state == "value":
        cached = cached_values(cache, client, model, pk, dialect=engine.dialect)
        assert cached is not None
        assert_same(cached, database)
    with factory() as session:
        obj: Any = session.get(model, pk)
        assert obj is not None
        assert_same(values_of(obj), database)
    return database


def generation_key(key: str) -> str:
    """The bucket generation key an (integer-keyed) entity key belongs to."""
    return key.rsplit(":", 1)[0]


# ------------------------------------------------------------- 1. commit publishes rows


def test_commit_publishes_inserted_and_updated_rows_and_forgets_deleted(
    engine: Engine,
    make_session: sessionmaker[Session],
    cache: WriteThroughCache,
    redis_client: redis.Redis,
) -> None:
    """After commit() returns, a new session's get of every inserted or updated row is served
    with no SQL and equals a fresh database load (values and types); a deleted row's entry is
    gone and get returns None from the database."""
    seed_products(engine, 1, 2, 3)
    warm(make_session, engine, cache, redis_client, WpProduct, 1, 2, 3)

    with make_session() as session:
        session.add(
            WpProduct(id=4, name="inserted", note=None, added=dt.datetime(2024, 5, 6, 7, 8, 9))
        )  # qty and active come from Python-side defaults
        item = WpItem(label="database-generated key")
        session.add(item)
        one = session.get(WpProduct, 1)
        assert one is not None
        one.name, one.qty, one.note, one.active = "renamed", 7, None, False
        two = session.get(WpProduct, 2)
        assert two is not None
        two.added = dt.datetime(2025, 2, 3, 4, 5, 6)
        three = session.get(WpProduct, 3)
        session.delete(three)
        session.commit()
        identity = inspect(item).identity
        assert identity is not None
        item_id = identity[0]

    expected_rows: list[tuple[type, Any]] = [
        (WpProduct, 1),
        (WpProduct, 2),
        (WpProduct, 4),
        (WpItem, item_id),
    ]
    for model, pk in expected_rows:
        assert entry_state(redis_client, entry_key(cache, model, pk)) == "value", (model, pk)
        database = db_values(engine, model, pk)
        assert database is not None
        assert_same(get_from_cache(make_session, engine, model, pk), database)
        cached = cached_values(cache, redis_client, model, pk, dialect=engine.dialect)
        assert cached is not None
        assert_same(cached, database)

    assert db_values(engine, WpProduct, 1) == {
        "id": 1, "name": "renamed", "qty": 7, "active": False, "note": None,
        "added": dt.datetime(2024, 1, 2, 12, 30, 15),
    }  # fmt: skip
    assert db_values(engine, WpProduct, 4) == {
        "id": 4, "name": "inserted", "qty": 0, "active": True, "note": None,
        "added": dt.datetime(2024, 5, 6, 7, 8, 9),
    }  # fmt: skip

    # the deleted row: no entry left behind, and get goes to the database and finds nothing
    assert entry_state(redis_client, entry_key(cache, WpProduct, 3)) is None
    assert get_via_database(make_session, engine, WpProduct, 3) is None


def test_insert_leaving_nullable_columns_unset_is_published(
    engine: Engine,
    make_session: sessionmaker[Session],
    cache: WriteThroughCache,
    redis_client: redis.Redis,
) -> None:
    """An insert that leaves nullable columns without defaults unset (SQLAlchemy sends NULL
    for them, and reads them back as None without SQL) is published like any other insert:
    a new session's get emits no SQL and equals a fresh database load."""
    with make_session() as session:
        session.add(WpProduct(id=7, name="only the required columns"))
        session.commit()

    database = db_values(engine, WpProduct, 7)
    assert database is not None
    assert database["note"] is None and database["added"] is None
    assert entry_state(redis_client, entry_key(cache, WpProduct, 7)) == "value"
    assert_same(get_from_cache(make_session, engine, WpProduct, 7), database)


def test_published_datetime_with_microseconds_equals_database_load(
    engine: Engine,
    make_session: sessionmaker[Session],
    cache: WriteThroughCache,
    redis_client: redis.Redis,
) -> None:
    """A DATETIME written with microseconds (which MariaDB's DATETIME drops) is published as the
    database will return it, or not at all: never a value a fresh load would not return."""
    seed_products(engine, 1)
    warm(make_session, engine, cache, redis_client, WpProduct, 1)
    with make_session() as session:
        product = session.get(WpProduct, 1)
        assert product is not None
        product.added = dt.datetime(2025, 6, 7, 8, 9, 10, 987654)
        session.commit()

    database = db_values(engine, WpProduct, 1)
    assert database is not None
    state = entry_state(redis_client, entry_key(cache, WpProduct, 1))
    assert state in ("value", None)
    if state == "value":
        cached = cached_values(cache, redis_client, WpProduct, 1, dialect=engine.dialect)
        assert cached is not None
        assert_same(cached, database)
    with make_session() as session:
        got = session.get(WpProduct, 1)
        assert got is not None
        assert_same(values_of(got), database)


# ------------------------------------------------------- 2. publish only after the COMMIT


def test_entry_is_a_lock_between_flush_and_commit(
    engine: Engine,
    make_session: sessionmaker[Session],
    cache: WriteThroughCache,
    redis_client: redis.Redis,
) -> None:
    """Between flush and COMMIT the entry is a LOCK (no value readable); the commit publishes."""
    seed_products(engine, 1)
    warm(make_session, engine, cache, redis_client, WpProduct, 1)
    key = entry_key(cache, WpProduct, 1)

    with make_session() as session:
        product = session.get(WpProduct, 1)
        assert product is not None
        product.name = "flushed"
        session.flush()
        assert entry_state(redis_client, key) == "lock"
        assert cached_values(cache, redis_client, WpProduct, 1, dialect=engine.dialect) is None
        session.commit()

    assert entry_state(redis_client, key) == "value"
    cached = cached_values(cache, redis_client, WpProduct, 1, dialect=engine.dialect)
    assert cached is not None
    assert cached["name"] == "flushed"
    database = db_values(engine, WpProduct, 1)
    assert database is not None
    assert_same(cached, database)


@pytest.mark.parametrize("failure", ["connection_commit", "before_commit"])
def test_failed_commit_publishes_nothing_and_rollback_restores(
    engine: Engine,
    make_session: sessionmaker[Session],
    cache: WriteThroughCache,
    redis_client: redis.Redis,
    failure: str,
) -> None:
    """When the COMMIT fails, nothing is published (the entry stays a LOCK) and the rollback
    puts back the previous VALUE.

    ``connection_commit``: the engine's ``commit`` event raises just before the DBAPI COMMIT,
    after the commit's own flush took the lock. ``before_commit``: a Session ``before_commit``
    listener added after install() raises, after an explicit flush took the lock.
    """
    seed_products(engine, 1)
    previous = warm(make_session, engine, cache, redis_client, WpProduct, 1)[1]
    key = entry_key(cache, WpProduct, 1)

    def refuse(*args: Any) -> None:
        raise RuntimeError("commit refused")

    target: Any = engine if failure == "connection_commit" else make_session
    event.listen(target, "commit" if failure == "connection_commit" else "before_commit", refuse)
    try:
        with make_session() as session:
            product = session.get(WpProduct, 1)
            assert product is not None
            product.name = "never committed"
            if failure == "before_commit":
                session.flush()
            with pytest.raises(RuntimeError, match="commit refused"):
                session.commit()
            assert entry_state(redis_client, key) == "lock"
            assert cache.stats().publishes == 0
            session.rollback()
    finally:
        event.remove(
            target, "commit" if failure == "connection_commit" else "before_commit", refuse
        )

    assert cache.stats().publishes == 0
    assert_restored(make_session, engine, cache, redis_client, WpProduct, 1, previous)


# -------------------------------------------------------------------- 3. round trips


def test_commit_costs_a_constant_number_of_redis_round_trips(
    engine: Engine, redis_url: str, prefix: str
) -> None:
    """Committing 1, 10 or 100 inserted, updated or deleted rows costs the same two Redis round
    trips (lock at the commit's flush, publish after COMMIT); an explicit flush() then commit()
    costs the same constant for every size (within the budget of three: here two)."""
    client, counter = counting_redis(redis_url, socket_timeout=10)
    try:
        cache = WriteThroughCache(client, prefix=prefix, **COUNTED)
        reset_schema(engine, Base.metadata)
        factory = sessionmaker(engine)
        cache.install(factory)

        # warm-up: the first call of a script on a server may cost SCRIPT LOAD round trips
        with factory() as session:
            session.add(WpProduct(id=1, name="warm-up"))
            session.commit()
        with factory() as session:
            warm_up = session.get(WpProduct, 1)
            assert warm_up is not None
            warm_up.qty = 1
            session.commit()

        def rows(session: Session, start: int, n: int) -> list[WpProduct]:
            # a plain select() (no from_cache()) does not ask Redis
            stmt = select(WpProduct).where(WpProduct.id >= start, WpProduct.id < start + n)
            return list(session.scalars(stmt))

        inserts: dict[int, int] = {}
        updates: dict[int, int] = {}
        flush_then_commit: dict[int, int] = {}
        deletes: dict[int, int] = {}
        for n in (1, 10, 100):
            start = n * 1000
            with factory() as session:
                session.add_all([WpProduct(id=start + i, name=f"p{i}") for i in range(n)])
                counter.reset()
                session.commit()
            inserts[n] = counter.count

            with factory() as session:
                loaded = rows(session, start, n)
                assert len(loaded) == n
                for product in loaded:
                    product.qty += 1
                counter.reset()
                session.commit()
            updates[n] = counter.count

            with factory() as session:
                for product in rows(session, start, n):
                    product.name = "flushed first"
                counter.reset()
                session.flush()
                session.commit()
            flush_then_commit[n] = counter.count

            with factory() as session:
                for product in rows(session, start, n):
                    session.delete(product)
                counter.reset()
                session.commit()
            deletes[n] = counter.count

        assert inserts == {1: 2, 10: 2, 100: 2}
        assert updates == {1: 2, 10: 2, 100: 2}
        assert deletes == {1: 2, 10: 2, 100: 2}
        # lock at flush + publish after COMMIT (the locks are young: no re-assert before COMMIT)
        assert flush_then_commit == {1: 2, 10: 2, 100: 2}
    finally:
        client.close()


# --------------------------------------------------------------- 4. rollback restores


def test_rollback_after_flush_restores_previous_values(
    engine: Engine,
    make_session: sessionmaker[Session],
    cache: WriteThroughCache,
    redis_client: redis.Redis,
) -> None:
    """(a) Changes flushed then rolled back: every entry is its previous VALUE again, served
    with no SQL (an update, a delete and an insert over a warm key)."""
    seed_products(engine, 1, 2)
    before = warm(make_session, engine, cache, redis_client, WpProduct, 1, 2)

    with make_session() as session:
        one = session.get(WpProduct, 1)
        assert one is not None
        one.name = "rolled back"
        session.delete(session.get(WpProduct, 2))
        session.add(WpProduct(id=3, name="rolled back insert"))
        session.flush()
        for pk in (1, 2, 3):
            assert entry_state(redis_client, entry_key(cache, WpProduct, pk)) == "lock"
        session.rollback()

    for pk in (1, 2):
        assert_restored(make_session, engine, cache, redis_client, WpProduct, pk, before[pk])
    # the insert had no previous value: it leaves no entry, and the row does not exist
    assert entry_state(redis_client, entry_key(cache, WpProduct, 3)) is None
    assert get_via_database(make_session, engine, WpProduct, 3) is None


def test_failed_flush_in_commit_restores_previous_values(
    engine: Engine,
    make_session: sessionmaker[Session],
    cache: WriteThroughCache,
    redis_client: redis.Redis,
) -> None:
    """(b) An earlier flush locked row 1; the commit's flush updates row 2 and then fails on a
    duplicate primary key insert (IntegrityError). After the rollback rows 1, 2 and 3 all hold
    their previous VALUEs, as the database does."""
    seed_products(engine, 1, 2, 3)
    before = warm(make_session, engine, cache, redis_client, WpProduct, 1, 2, 3)

    with make_session() as session:
        one = session.get(WpProduct, 1)
        assert one is not None
        one.name = "flushed, then rolled back"
        session.flush()
        assert entry_state(redis_client, entry_key(cache, WpProduct, 1)) == "lock"
        two = session.get(WpProduct, 2)
        assert two is not None
        two.name = "updated in the failing flush"
        session.add(WpProduct(id=3, name="duplicate primary key"))
        with pytest.raises(IntegrityError):
            session.commit()
        session.rollback()

    for pk in (1, 2, 3):
        assert_restored(make_session, engine, cache, redis_client, WpProduct, pk, before[pk])
    assert cache.stats().publishes == 0


def test_close_with_flushed_transaction_restores_previous_value(
    engine: Engine,
    make_session: sessionmaker[Session],
    cache: WriteThroughCache,
    redis_client: redis.Redis,
) -> None:
    """(c) close() with a flushed, open transaction (no rollback event fires) releases the
    locks: the previous VALUE is back and served with no SQL."""
    seed_products(engine, 1)
    previous = warm(make_session, engine, cache, redis_client, WpProduct, 1)[1]

    session = make_session()
    product = session.get(WpProduct, 1)
    assert product is not None
    product.name = "abandoned"
    session.flush()
    assert entry_state(redis_client, entry_key(cache, WpProduct, 1)) == "lock"
    session.close()

    assert_restored(make_session, engine, cache, redis_client, WpProduct, 1, previous)


def test_released_savepoint_then_outer_rollback_restores(
    savepoint_safe: Engine,
    engine: Engine,
    make_session: sessionmaker[Session],
    cache: WriteThroughCache,
    redis_client: redis.Redis,
) -> None:
    """(d) Row 1 changed in the outer transaction, row 2 in a savepoint that is released; the
    outer transaction rolls back: both entries hold their previous VALUEs."""
    seed_products(engine, 1, 2)
    before = warm(make_session, engine, cache, redis_client, WpProduct, 1, 2)

    with make_session() as session:
        one = session.get(WpProduct, 1)
        assert one is not None
        one.name = "outer"
        savepoint = session.begin_nested()  # flushes row 1 first
        two = session.get(WpProduct, 2)
        assert two is not None
        two.name = "in released savepoint"
        session.flush()
        savepoint.commit()
        for pk in (1, 2):
            assert entry_state(redis_client, entry_key(cache, WpProduct, pk)) == "lock"
        session.rollback()

    for pk in (1, 2):
        assert_restored(make_session, engine, cache, redis_client, WpProduct, pk, before[pk])


def test_rolled_back_savepoint_then_outer_commit(
    savepoint_safe: Engine,
    engine: Engine,
    make_session: sessionmaker[Session],
    cache: WriteThroughCache,
    redis_client: redis.Redis,
) -> None:
    """(e) A savepoint rolls back, then the outer transaction commits.

    Row 1, changed only in the savepoint: previous value or a miss, never the rolled-back one.
    Row 2, changed in the outer transaction and again in the savepoint: the outer value or a
    miss, and a new get returns exactly what the database holds (the outer value).
    Row 3, changed only in the outer transaction: its new VALUE is published.
    """
    seed_products(engine, 1, 2, 3)
    before = warm(make_session, engine, cache, redis_client, WpProduct, 1, 2, 3)

    with make_session() as session:
        two = session.get(WpProduct, 2)
        three = session.get(WpProduct, 3)
        assert two is not None and three is not None
        two.name = "outer"
        three.name = "outer only"
        session.flush()
        savepoint = session.begin_nested()
        one = session.get(WpProduct, 1)
        assert one is not None
        one.name = "savepoint only"
        two.name = "savepoint"
        session.flush()
        savepoint.rollback()
        session.commit()

    one_db = assert_value_or_miss(make_session, engine, cache, redis_client, WpProduct, 1)
    assert_same(one_db, before[1])
    two_db = assert_value_or_miss(make_session, engine, cache, redis_client, WpProduct, 2)
    assert two_db["name"] == "outer"
    assert entry_state(redis_client, entry_key(cache, WpProduct, 3)) == "value"
    three_db = db_values(engine, WpProduct, 3)
    assert three_db is not None and three_db["name"] == "outer only"
    assert_same(get_from_cache(make_session, engine, WpProduct, 3), three_db)


@pytest.mark.parametrize("outer", ["commit", "rollback"])
def test_nested_savepoints_with_mixed_release_and_rollback(
    savepoint_safe: Engine,
    engine: Engine,
    make_session: sessionmaker[Session],
    cache: WriteThroughCache,
    redis_client: redis.Redis,
    outer: str,
) -> None:
    """(f) Two levels of savepoints, released and rolled back in both orders.

    sp1 { row 1; sp2 { row 2 } released } rolled back; sp3 { row 3; sp4 { row 4 } rolled back }
    released. Outer commit: rows 1, 2 and 4 hold their previous value or a miss, row 3 its new
    VALUE. Outer rollback: every row holds its previous VALUE.
    """
    seed_products(engine, 1, 2, 3, 4)
    before = warm(make_session, engine, cache, redis_client, WpProduct, 1, 2, 3, 4)

    def rename(session: Session, pk: int, name: str) -> None:
        product = session.get(WpProduct, pk)
        assert product is not None
        product.name = name
        session.flush()

    with make_session() as session:
        sp1 = session.begin_nested()
        rename(session, 1, "sp1, rolled back")
        sp2 = session.begin_nested()
        rename(session, 2, "sp2, released into rolled-back sp1")
        sp2.commit()
        sp1.rollback()
        sp3 = session.begin_nested()
        rename(session, 3, "sp3, released")
        sp4 = session.begin_nested()
        rename(session, 4, "sp4, rolled back")
        sp4.rollback()
        sp3.commit()
        if outer == "commit":
            session.commit()
        else:
            session.rollback()

    if outer == "rollback":
        for pk in (1, 2, 3, 4):
            assert_restored(make_session, engine, cache, redis_client, WpProduct, pk, before[pk])
        return
    for pk in (1, 2, 4):
        database = assert_value_or_miss(make_session, engine, cache, redis_client, WpProduct, pk)
        assert_same(database, before[pk])
    assert entry_state(redis_client, entry_key(cache, WpProduct, 3)) == "value"
    three_db = db_values(engine, WpProduct, 3)
    assert three_db is not None and three_db["name"] == "sp3, released"
    assert_same(get_from_cache(make_session, engine, WpProduct, 3), three_db)


# ----------------------------------------------- 5. readers during an uncommitted flush


def test_reader_during_uncommitted_flush_reads_database_and_fills_nothing(
    engine: Engine,
    make_session: sessionmaker[Session],
    cache: WriteThroughCache,
    redis_client: redis.Redis,
) -> None:
    """While a writer has flushed but not committed, another session's get goes to the
    database, returns the committed (old) row, and writes nothing into the cache."""
    seed_products(engine, 1)
    previous = warm(make_session, engine, cache, redis_client, WpProduct, 1)[1]
    key = entry_key(cache, WpProduct, 1)

    with make_session() as writer:
        product = writer.get(WpProduct, 1)
        assert product is not None
        product.name = "uncommitted"
        writer.flush()
        assert entry_state(redis_client, key) == "lock"
        stats_before = cache.stats()

        seen = get_via_database(make_session, engine, WpProduct, 1)
        assert seen is not None
        assert_same(seen, previous)
        assert entry_state(redis_client, key) == "lock"
        stats_after = cache.stats()
        assert stats_after.fills == stats_before.fills
        assert stats_after.fills_refused == stats_before.fills_refused
        writer.commit()

    assert get_from_cache(make_session, engine, WpProduct, 1)["name"] == "uncommitted"


# ------------------------------------------- 6. writer killed between COMMIT and publish

_CRASHING_WRITER = textwrap.dedent(
    """
    import os
    import signal
    import sys

    import redis
    from sqlalchemy import create_engine, event
    from sqlalchemy.orm import sessionmaker

    from sqlalchemy_writethrough import WriteThroughCache
    from test_write_path import WpProduct

    db_url, redis_url, prefix, lock_timeout, new_name = sys.argv[1:6]
    cache = WriteThroughCache(
        redis.Redis.from_url(redis_url, socket_timeout=1),
        prefix=prefix,
        lock_timeout=float(lock_timeout),
    )
    Session = sessionmaker(create_engine(db_url))
    cache.install(Session)


    def die(session):
        # runs after the database COMMIT and before the cache's publish (inserted in front)
        os.kill(os.getpid(), signal.SIGKILL)


    event.listen(Session, "after_commit", die, insert=True)
    with Session() as session:
        product = session.get(WpProduct, 1)
        product.name = new_name
        session.commit()
    sys.exit(3)  # not reached
    """
)


def test_writer_killed_after_commit_leaves_misses_never_stale_values(
    engine: Engine,
    make_session: sessionmaker[Session],
    cache: WriteThroughCache,
    redis_client: redis.Redis,
    redis_url: str,
    prefix: str,
) -> None:
    """A writer process SIGKILLed after its DB COMMIT, before its publish: readers get misses
    (the entry is the writer's LOCK, and once lock_timeout passes it is absent), never the old
    value; every get returns the committed new value from the database, and a later fill
    caches it."""
    lock_timeout = 1.0
    seed_products(engine, 1)
    warm(make_session, engine, cache, redis_client, WpProduct, 1)
    key = entry_key(cache, WpProduct, 1)

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PROJECT_DIR), str(TESTS_DIR), env.get("PYTHONPATH")) if p
    )
    url = engine.url.render_as_string(hide_password=False)
    child = subprocess.run(
        [sys.executable, "-c", _CRASHING_WRITER, url, redis_url, prefix, str(lock_timeout), "new"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr

    # the commit happened; the publish did not
    database = db_values(engine, WpProduct, 1)
    assert database is not None and database["name"] == "new"
    assert entry_state(redis_client, key) == "lock"

    # a reader misses, reads the new row from the database, and cannot fill over the lock
    fills_before = cache.stats().fills
    seen = get_via_database(make_session, engine, WpProduct, 1)
    assert seen is not None
    assert_same(seen, database)
    assert entry_state(redis_client, key) == "lock"
    assert cache.stats().fills == fills_before

    # the lock expires into a miss (bounded wait: a little over lock_timeout)
    deadline = time.monotonic() + lock_timeout + 5
    while entry_state(redis_client, key) == "lock" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert entry_state(redis_client, key) is None

    seen = get_via_database(make_session, engine, WpProduct, 1)
    assert seen is not None
    assert_same(seen, database)
    assert entry_state(redis_client, key) == "value"
    assert_same(get_from_cache(make_session, engine, WpProduct, 1), database)


# -------------------------------------------------------- 7. primary key updates


def test_primary_key_update_moves_the_entry(
    engine: Engine,
    make_session: sessionmaker[Session],
    cache: WriteThroughCache,
    redis_client: redis.Redis,
) -> None:
    """Changing the primary key invalidates the old key (get returns None from the database)
    and the new key holds the row or a miss; get of the new key returns the database row."""
    seed_products(engine, 1)
    warm(make_session, engine, cache, redis_client, WpProduct, 1)

    with make_session() as session:
        product = session.get(WpProduct, 1)
        assert product is not None
        product.id = 50
        session.commit()

    assert entry_state(redis_client, entry_key(cache, WpProduct, 1)) is None
    assert get_via_database(make_session, engine, WpProduct, 1) is None
    moved = assert_value_or_miss(make_session, engine, cache, redis_client, WpProduct, 50)
    assert moved["name"] == "product 1"
    assert_same(get_from_cache(make_session, engine, WpProduct, 50), moved)


def test_rows_deleted_re_added_and_renumbered_in_one_transaction(
    engine: Engine,
    make_session: sessionmaker[Session],
    cache: WriteThroughCache,
    redis_client: redis.Redis,
) -> None:
    """One flush deletes row 1 and adds a new row 1 (SQLAlchemy's row switch: an UPDATE) and
    renumbers rows 2 and 4 to 3 and 5; the next adds new rows 2 and 4 (keys the first flush
    locked): every key holds the database's row or a miss, and each get returns it."""
    seed_products(engine, 1, 2, 4)
    warm(make_session, engine, cache, redis_client, WpProduct, 1, 2, 4)
    with make_session() as session:
        one, two, four = (session.get(WpProduct, pk) for pk in (1, 2, 4))
        assert one is not None and two is not None and four is not None
        session.delete(one)
        session.add(full_product(1, "re-added 1"))
        two.id = 3
        four.id = 5
        session.flush()
        session.add_all([full_product(2, "new 2"), full_product(4, "new 4")])
        session.commit()
    expected = {1: "re-added 1", 2: "new 2", 3: "product 2", 4: "new 4", 5: "product 4"}
    for pk, name in expected.items():
        for _ in range(2):  # what the commit left, then what a fill left
            got = assert_value_or_miss(make_session, engine, cache, redis_client, WpProduct, pk)
            assert got["name"] == name


def test_key_changed_after_the_early_lock_is_published_under_the_new_key(
    engine: Engine,
    make_session: sessionmaker[Session],
    cache: WriteThroughCache,
    redis_client: redis.Redis,
) -> None:
    """The early lock computes each row's key before the flush and after_flush reuses it only
    for the same key: a listener that runs after the cache's before_flush and gives a pending
    row another primary key gets the row published under the key it was inserted with, and
    the key locked early ends as a miss, not as a value."""
    seed_products(engine, 1)
    warm(make_session, engine, cache, redis_client, WpProduct, 1)

    @event.listens_for(make_session, "before_flush")
    def renumber(session: Session, flush_context: Any, instances: Any) -> None:
        for obj in session.new:
            if isinstance(obj, WpProduct) and obj.id == 60:
                obj.id = 61

    with make_session() as session:
        session.add(
            WpProduct(id=60, name="renumbered", note=None, added=dt.datetime(2024, 5, 6, 7, 8))
        )
        one = session.get(WpProduct, 1)
        assert one is not None
        one.name = "updated"
        session.commit()

    assert db_values(engine, WpProduct, 60) is None
    assert entry_state(redis_client, entry_key(cache, WpProduct, 60)) is None
    for pk in (61, 1):
        assert entry_state(redis_client, entry_key(cache, WpProduct, pk)) == "value", pk
        database = db_values(engine, WpProduct, pk)
        assert database is not None
        cached = cached_values(cache, redis_client, WpProduct, pk, dialect=engine.dialect)
        assert cached is not None
        assert_same(cached, database)
    assert db_values(engine, WpProduct, 1)["name"] == "updated"  # type: ignore[index]


def test_an_explicit_zero_in_an_auto_increment_key_is_never_published_as_row_zero(
    engine: Engine,
    make_session: sessionmaker[Session],
    cache: WriteThroughCache,
    redis_client: redis.Redis,
) -> None:
    """MySQL and MariaDB (without ``NO_AUTO_VALUE_ON_ZERO`` in ``sql_mode``) give a row
    inserted with 0 in its ``AUTO_INCREMENT`` column the next value instead, and SQLAlchemy
    does not read it back: the entry must not say that row 0 exists. Every later session
    gets what the database gives for 0 and for the row's real key."""
    with make_session() as session:
        session.add(WpItem(id=1, label="one"))
        session.commit()
    with make_session() as session:
        session.add(WpItem(id=0, label="zero"))
        session.commit()
    with Session(engine) as plain:
        real = plain.scalars(select(WpItem.id).where(WpItem.label == "zero")).one()
    for pk in (0, real, 0):  # each twice: a fill, then what the entry says
        for _ in range(2):
            with make_session() as session:
                got = session.get(WpItem, pk)
                database = db_values(engine, WpItem, pk)
                assert (None if got is None else values_of(got)) == database, pk
    if real != 0:  # the server gave it another key: no entry says row 0 is there
        assert entry_state(redis_client, entry_key(cache, WpItem, 0)) != "value"


# ------------------------------------------------------------ 8. strategy="invalidate"


@pytest.mark.parametrize("model", [WpNote, WpTag], ids=["__writethrough__", "register"])
def test_invalidate_strategy_leaves_a_miss_then_fills_from_database(
    engine: Engine,
    make_session: sessionmaker[Session],
    cache: WriteThroughCache,
    redis_client: redis.Redis,
    model: Any,
) -> None:
    """With strategy="invalidate" (per model, by ``__writethrough__`` or ``register()``), a
    commit leaves a miss instead of a value; the next get loads from the database and fills."""
    if model is WpTag:
        cache.register(WpTag, strategy="invalidate")
    with Session(engine) as session:
        session.add(model(id=1, body="seeded"))
        session.commit()
    warm(make_session, engine, cache, redis_client, model, 1)

    with make_session() as session:
        row: Any = session.get(model, 1)
        row.body = "updated"
        session.add(model(id=2, body="inserted"))
        session.commit()

    assert cache.stats().publishes == 0
    for pk, body in ((1, "updated"), (2, "inserted")):
        key = entry_key(cache, model, pk)
        assert entry_state(redis_client, key) is None
        fills = cache.stats().fills
        seen = get_via_database(make_session, engine, model, pk)
        assert seen == {"id": pk, "body": body}
        assert cache.stats().fills == fills + 1
        assert entry_state(redis_client, key) == "value"
        assert get_from_cache(make_session, engine, model, pk) == seen


# ------------------------------------------------------------- 9. prefixes are isolated


def test_two_prefixes_on_one_redis_never_see_each_others_keys(
    engine: Engine, redis_url: str, redis_client: redis.Redis, prefix: str
) -> None:
    """Two caches with different prefixes on one Redis: each only writes, reads and
    invalidates keys under its own prefix."""
    reset_schema(engine, Base.metadata)
    other = f"{prefix}x"  # the prefix fixture deletes both namespaces afterwards
    client_a = redis.Redis.from_url(redis_url, socket_timeout=1)
    client_b = redis.Redis.from_url(redis_url, socket_timeout=1)
    try:
        cache_a = WriteThroughCache(client_a, prefix=prefix)
        cache_b = WriteThroughCache(client_b, prefix=other)
        factory_a = sessionmaker(engine)
        factory_b = sessionmaker(engine)
        cache_a.install(factory_a)
        cache_b.install(factory_b)

        with factory_a() as session:
            session.add_all([full_product(1, "a1"), full_product(2, "a2")])
            session.commit()
        with factory_b() as session:
            session.add(full_product(10, "b10"))
            session.commit()

        def expected(cache: WriteThroughCache, *pks: int) -> list[bytes]:
            keys = {entry_key(cache, WpProduct, pk) for pk in pks}
            keys |= {generation_key(k) for k in keys}
            keys.add(f"{cache.prefix}:registry")  # the keyspaces that hold entries
            # the registry's version (see sqlalchemy_writethrough.siblings)
            keys.add(f"{cache.prefix}:registry:{{{cache.prefix}:registry}}")
            # the registry was pruned lately (see lua/register.lua)
            keys.add(f"{cache.prefix}:registry:pruning:{{{cache.prefix}:registry}}")
            keys.add(f"{cache.prefix}:epoch")  # the Redis data set last validated
            return sorted(k.encode() for k in keys)

        assert prefix_keys(redis_client, prefix) == expected(cache_a, 1, 2)
        assert prefix_keys(redis_client, other) == expected(cache_b, 10)

        # B does not see A's value of row 1: a miss that fills under B's prefix only
        a_row_1 = cached_values(cache_a, redis_client, WpProduct, 1, dialect=engine.dialect)
        assert get_via_database(factory_b, engine, WpProduct, 1) == a_row_1
        assert prefix_keys(redis_client, other) == expected(cache_b, 1, 10)
        assert prefix_keys(redis_client, prefix) == expected(cache_a, 1, 2)

        # invalidations through A leave B's entries alone
        assert cache_a.invalidate(WpProduct, 1)
        assert cache_a.invalidate(WpProduct)
        assert entry_state(redis_client, entry_key(cache_a, WpProduct, 1)) is None
        assert get_from_cache(factory_b, engine, WpProduct, 1)["name"] == "a1"
        assert get_from_cache(factory_b, engine, WpProduct, 10)["name"] == "b10"
        assert prefix_keys(redis_client, other) == expected(cache_b, 1, 10)
    finally:
        client_a.close()
        client_b.close()


# -------------------------------------------- 10. a session joined to an outer transaction


def test_session_joined_to_an_outer_transaction_never_publishes(
    engine: Engine,
    make_session: sessionmaker[Session],
    cache: WriteThroughCache,
    redis_client: redis.Redis,
) -> None:
    """``Session(bind=connection)`` on a connection already in a transaction (the usual test
    recipe): the session's commit() does not COMMIT, so nothing it wrote may reach Redis; after
    the outer transaction rolls back, readers get the old row."""
    seed_products(engine, 1)
    warm(make_session, engine, cache, redis_client, WpProduct, 1)
    key = entry_key(cache, WpProduct, 1)
    with engine.connect() as connection:
        outer = connection.begin()
        with make_session(bind=connection) as session:
            product = session.get(WpProduct, 1)
            assert product is not None
            product.name = "never committed"
            session.commit()
        assert entry_state(redis_client, key) == "lock", "the outer COMMIT has not happened"
        outer.rollback()
    assert (
        entry_state(redis_client, key) != "value"
        or (cached_values(cache, redis_client, WpProduct, 1, dialect=engine.dialect) or {}).get(
            "name"
        )
        == "product 1"
    )
    seen = get_via_database(make_session, engine, WpProduct, 1)
    assert seen is not None and seen["name"] == "product 1"


# ---------------------------------------------- locks sent before the flush's SQL runs


def test_rows_changed_by_a_later_before_flush_listener_are_locked_and_published(
    engine: Engine,
    make_session: sessionmaker[Session],
    cache: WriteThroughCache,
    redis_client: redis.Redis,
) -> None:
    """The cache sends the locks of the rows it can name in its before_flush; a listener that
    runs after it changes another cached row. That row is locked before COMMIT all the same
    and published after it."""
    seed_products(engine, 1, 2)
    warm(make_session, engine, cache, redis_client, WpProduct, 1, 2)

    @event.listens_for(make_session, "before_flush")
    def touch_row_two(session: Session, flush_context: Any, instances: Any) -> None:
        two = session.get(WpProduct, 2)
        assert two is not None
        two.name = "changed by a listener"

    with make_session() as session:
        one = session.get(WpProduct, 1)
        assert one is not None
        one.name = "changed by the caller"
        session.flush()
        assert entry_state(redis_client, entry_key(cache, WpProduct, 1)) == "lock"
        assert entry_state(redis_client, entry_key(cache, WpProduct, 2)) == "lock"
        session.commit()
    event.remove(make_session, "before_flush", touch_row_two)

    for pk, name in ((1, "changed by the caller"), (2, "changed by a listener")):
        assert entry_state(redis_client, entry_key(cache, WpProduct, pk)) == "value"
        assert (
            assert_value_or_miss(make_session, engine, cache, redis_client, WpProduct, pk)["name"]
            == name
        )


@pytest.mark.parametrize("order", ["before the cache's", "after the cache's"])
def test_rows_a_before_flush_listener_adds_or_deletes_are_published(
    engine: Engine,
    make_session: sessionmaker[Session],
    cache: WriteThroughCache,
    redis_client: redis.Redis,
    order: str,
) -> None:
    """A before_flush listener, running before or after the cache's own, adds one row and
    deletes another: the commit publishes the new row and leaves no entry of the deleted
    one (after_flush reads what the flush wrote, whatever the listeners' order)."""
    seed_products(engine, 1, 2)
    warm(make_session, engine, cache, redis_client, WpProduct, 1, 2)

    def add_and_delete(session: Session, flush_context: Any, instances: Any) -> None:
        if session.get(WpProduct, 3) is None:
            session.add(full_product(3, "added by a listener"))
            session.delete(session.get(WpProduct, 2))

    event.listen(make_session, "before_flush", add_and_delete, insert=order.startswith("before"))
    try:
        with make_session() as session:
            one = session.get(WpProduct, 1)
            assert one is not None
            one.name = "changed by the caller"
            session.commit()
    finally:
        event.remove(make_session, "before_flush", add_and_delete)

    assert db_values(engine, WpProduct, 2) is None
    assert entry_state(redis_client, entry_key(cache, WpProduct, 2)) is None
    assert get_via_database(make_session, engine, WpProduct, 2) is None
    for pk, name in ((1, "changed by the caller"), (3, "added by a listener")):
        assert entry_state(redis_client, entry_key(cache, WpProduct, pk)) == "value"
        assert (
            assert_value_or_miss(make_session, engine, cache, redis_client, WpProduct, pk)["name"]
            == name
        )


def test_a_child_deleted_as_an_orphan_is_never_served_from_the_cache(
    engine: Engine,
    make_session: sessionmaker[Session],
    cache: WriteThroughCache,
    redis_client: redis.Redis,
) -> None:
    """A ``delete-orphan`` child taken out of its parent's collection is deleted by the flush
    without ever being in ``session.deleted``: its cached entry goes with it."""
    with Session(engine) as seed:
        seed.add(WpBox(id=1, parts=[WpPart(id=1, name="kept"), WpPart(id=2, name="dropped")]))
        seed.commit()
    warm(make_session, engine, cache, redis_client, WpPart, 1, 2)

    with make_session() as session:
        box = session.get(WpBox, 1)
        part = session.get(WpPart, 2)
        assert box is not None and part is not None
        box.parts.remove(part)
        session.commit()

    assert db_values(engine, WpPart, 2) is None
    assert entry_state(redis_client, entry_key(cache, WpPart, 2)) is None
    with make_session() as session:
        assert session.get(WpPart, 2) is None
    assert assert_value_or_miss(make_session, engine, cache, redis_client, WpPart, 1)["name"] == (
        "kept"
    )


def test_a_child_taken_out_of_its_parent_is_published_without_its_parent(
    engine: Engine,
    make_session: sessionmaker[Session],
    cache: WriteThroughCache,
    redis_client: redis.Redis,
) -> None:
    """A child taken out of a collection (no ``delete-orphan``) gets its foreign key set to
    NULL by the flush, though the child itself was never modified: the cache serves the
    row the database holds, not the one with its old parent."""
    with Session(engine) as seed:
        seed.add(WpBox(id=1, loose=[WpLoose(id=1, name="one"), WpLoose(id=2, name="two")]))
        seed.commit()
    warm(make_session, engine, cache, redis_client, WpLoose, 1, 2)

    with make_session() as session:
        box = session.get(WpBox, 1)
        loose = session.get(WpLoose, 2)
        assert box is not None and loose is not None
        box.loose.remove(loose)
        session.commit()

    assert db_values(engine, WpLoose, 2) == {"id": 2, "box_id": None, "name": "two"}
    assert (
        assert_value_or_miss(make_session, engine, cache, redis_client, WpLoose, 2)["box_id"]
        is None
    )
    assert (
        assert_value_or_miss(make_session, engine, cache, redis_client, WpLoose, 1)["box_id"] == 1
    )


@pytest.mark.parametrize("failure", ["before_flush", "database_commit"])
def test_failed_commits_restore_entries_and_return_connections(
    engine: Engine,
    redis_url: str,
    prefix: str,
    failure: str,
) -> None:
    """A commit fails after the cache sent its locks: a before_flush listener after the
    cache's raises (the flush never runs), or the database COMMIT fails (the commit's flush
    kept the lock's connection for the publish). Either way the rollback releases the locks
    (previous VALUEs restored) and no Redis connection stays checked out of the pool, however
    often it happens."""
    reset_schema(engine, Base.metadata)
    name = f"wt-{prefix}"
    client = redis.Redis.from_url(redis_url, socket_timeout=1, client_name=name)
    try:
        cache = WriteThroughCache(client, prefix=prefix)
        factory = sessionmaker(engine)
        cache.install(factory)
        seed_products(engine, 1)
        before = warm(factory, engine, cache, client, WpProduct, 1)[1]

        def refuse(*args: Any) -> None:
            raise RuntimeError("refused")

        target: Any = factory if failure == "before_flush" else engine
        event_name = "before_flush" if failure == "before_flush" else "commit"
        event.listen(target, event_name, refuse)
        try:
            for _ in range(25):
                with factory() as session:
                    product = session.get(WpProduct, 1)
                    assert product is not None
                    product.name = "never committed"
                    with pytest.raises(RuntimeError):
                        session.commit()
                    session.rollback()
        finally:
            event.remove(target, event_name, refuse)

        assert_restored(factory, engine, cache, client, WpProduct, 1, before)
        ours = [c for c in client.client_list() if c.get("name") == name]
        assert len(ours) <= 3, f"{len(ours)} connections: the pool is leaking them"
    finally:
        client.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_worker_never_shares_lock_owner_tokens_with_its_parent() -> None:
    """Lock owners are a per-process prefix and a counter: a worker forked after import (as
    gunicorn and Celery prefork do) must draw its own prefix, or its locks would pass for its
    parent's (a second writer's lock joining the first would not mark it contended)."""
    from sqlalchemy_writethrough.tracking import SessionTracker

    def token() -> str:
        with Session() as session:
            return SessionTracker(session).owner_token()

    parent_before = token()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report one token, leave at once
        try:
            os.write(write, token().encode())
        finally:
            os._exit(0)
    os.close(write)
    child = os.read(read, 200).decode()
    os.close(read)
    os.waitpid(pid, 0)
    parent_after = token()
    assert child and child != parent_after
    assert child.split(".")[0] != parent_before.split(".")[0]
    assert parent_after.split(".")[0] == parent_before.split(".")[0]


def test_statements_after_a_flush_a_listener_stopped_are_still_tracked(
    engine: Engine,
    make_session: sessionmaker[Session],
    cache: WriteThroughCache,
    redis_client: redis.Redis,
) -> None:
    """A before_flush listener after the cache's raises once; the application catches the
    error and goes on in the same transaction with an UPDATE statement. That statement must be
    seen (the cache had marked the session as flushing, and the flush never ended), or row 1
    stays cached with its old name after the commit."""
    seed_products(engine, 1, 2)
    warm(make_session, engine, cache, redis_client, WpProduct, 1, 2)
    refused: list[bool] = []

    @event.listens_for(make_session, "before_flush")
    def refuse_once(session: Session, flush_context: Any, instances: Any) -> None:
        if not refused:
            refused.append(True)
            raise RuntimeError("refused once")

    try:
        with make_session() as session:
            two = session.get(WpProduct, 2)
            assert two is not None
            two.name = "renamed by the unit of work"
            with pytest.raises(RuntimeError):
                session.flush()
            # Core on the session's connection: no autoflush comes first to end the "flush"
            session.connection().execute(
                sa.update(WpProduct.__table__)
                .where(WpProduct.__table__.c.id == 1)
                .values(name="renamed by a statement")
            )
            session.commit()
    finally:
        event.remove(make_session, "before_flush", refuse_once)

    for pk in (1, 2):
        assert entry_state(redis_client, entry_key(cache, WpProduct, pk)) != "lock"
    one = assert_value_or_miss(make_session, engine, cache, redis_client, WpProduct, 1)
    assert one["name"] == "renamed by a statement"
    assert (
        assert_value_or_miss(make_session, engine, cache, redis_client, WpProduct, 2)["name"]
        == "renamed by the unit of work"
    )


def test_a_flush_that_writes_nothing_after_all_leaves_no_lock_behind(
    engine: Engine,
    make_session: sessionmaker[Session],
    cache: WriteThroughCache,
    redis_client: redis.Redis,
) -> None:
    """The cache sends the lock of a changed row when the flush starts; a later before_flush
    listener expunges that row, so the flush has nothing to do and SQLAlchemy returns before
    after_flush. The lock's reply is read before COMMIT all the same, and the commit leaves the
    entry a miss or the unchanged VALUE, never a LOCK that only lock_timeout would clear."""
    seed_products(engine, 1)
    previous = warm(make_session, engine, cache, redis_client, WpProduct, 1)[1]

    @event.listens_for(make_session, "before_flush")
    def drop_it(session: Session, flush_context: Any, instances: Any) -> None:
        for obj in list(session.dirty):
            session.expunge(obj)

    try:
        with make_session() as session:
            product = session.get(WpProduct, 1)
            assert product is not None
            product.name = "never written"
            session.commit()
    finally:
        event.remove(make_session, "before_flush", drop_it)

    assert entry_state(redis_client, entry_key(cache, WpProduct, 1)) != "lock"
    assert (
        assert_value_or_miss(make_session, engine, cache, redis_client, WpProduct, 1)["name"]
        == previous["name"]
    )


def test_a_blocking_pool_takes_the_locks_synchronously(
    engine: Engine, redis_url: str, prefix: str
) -> None:
    """With a bounded BlockingConnectionPool the locks are not sent ahead of the flush (a
    connection held while the database waits on row locks could starve the pool): they are
    taken after the flush's statements, still before COMMIT, and the commit publishes."""
    reset_schema(engine, Base.metadata)
    pool = redis.BlockingConnectionPool.from_url(redis_url, max_connections=2, timeout=1)
    client = redis.Redis(connection_pool=pool, socket_timeout=1)
    try:
        cache = WriteThroughCache(client, prefix=prefix)
        factory = sessionmaker(engine)
        cache.install(factory)
        seed_products(engine, 1)
        warm(factory, engine, cache, client, WpProduct, 1)
        with factory() as session:
            product = session.get(WpProduct, 1)
            assert product is not None
            product.name = "through a blocking pool"
            session.flush()
            assert entry_state(client, entry_key(cache, WpProduct, 1)) == "lock"
            session.commit()
        assert entry_state(client, entry_key(cache, WpProduct, 1)) == "value"
        got = assert_value_or_miss(factory, engine, cache, client, WpProduct, 1)
        assert got["name"] == "through a blocking pool"
    finally:
        client.close()
