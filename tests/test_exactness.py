"""Invariant 4: a row served from the cache equals a fresh load from the database.

Same values, same Python types, same precision (a ``Decimal``'s digits, sign and exponent),
same time zone (``tzinfo`` and UTC offset, not only the same instant), same server defaults,
same ``onupdate`` values; on SQLite, PostgreSQL and MariaDB.

A row reaches Redis in one of two ways:

* **publish** (after COMMIT): the cache stores what the flush *sent*. The database may change a
  value on the way in: it rounds ``Numeric(10, 2)`` (``1.005`` is ``1.01`` on PostgreSQL and
  MariaDB; SQLite binds a float and SQLAlchemy formats it back as ``1.00``), truncates
  microseconds (MariaDB ``DATETIME``/``TIME`` without fsp), drops or converts a time zone
  (SQLite and MariaDB keep the wall time and return a naive datetime; PostgreSQL returns the
  instant in the connection's time zone), rounds a single-precision ``FLOAT`` (MariaDB), runs a
  ``TypeDecorator``'s bind processing, or computes an ``onupdate`` SQL expression. For each
  column the codec predicts what a load will return. Where it can predict exactly, the commit
  publishes a VALUE built from the prediction; where it cannot, the publish becomes an
  invalidation: the entry is a miss, and the first read fills it from the database.
* **fill** (after a miss): the cache stores what the database just returned.

The tests compare, field by field, the object ``session.get`` builds from Redis (with no SQL)
with the object a session without the cache loads from the database, right after the commit
(publish path), after ``cache.invalidate`` and a refilling load (fill path), and after a second
commit that updates every field. ``test_publish_or_invalidate_per_column`` pins which columns
and databases give a VALUE right after commit and which give a miss.
"""

from __future__ import annotations

import enum
import html
import logging
import math
import uuid
from collections.abc import Iterator
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import redis
from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Enum,
    Float,
    Integer,
    Numeric,
    String,
    Text,
    Time,
    TypeDecorator,
    Uuid,
    func,
    inspect,
)
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_writethrough import CachedModel, WriteThroughCache

from _cache_helpers import entry_key, entry_state
from _servers import capture_sql, reset_schema

# ------------------------------------------------------------------------ column types


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class LowerEmail(TypeDecorator[str]):
    """Stores an e-mail address stripped and lower-cased; returns what is stored."""

    impl = String(120)
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return None if value is None else value.strip().lower()


class CommaList(TypeDecorator[list[str]]):
    """A list of strings stored comma-joined in a VARCHAR."""

    impl = String(200)
    cache_ok = True

    def process_bind_param(self, value: list[str] | None, dialect: Dialect) -> str | None:
        return None if value is None else ",".join(value)

    def process_result_value(self, value: str | None, dialect: Dialect) -> list[str] | None:
        if value is None:
            return None
        return value.split(",") if value else []


class UtcDateTime(TypeDecorator[datetime]):
    """SQLAlchemy's documented recipe: store aware datetimes as naive UTC, return them aware."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=timezone.utc)


class EscapedText(TypeDecorator[str]):
    """HTML-escapes on the way in and returns what the database holds (no result processing),
    so binding is not idempotent: binding the loaded value again would escape it twice."""

    impl = String(200)
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return None if value is None else html.escape(value, quote=False)


# ------------------------------------------------------------------------------ models


class Base(DeclarativeBase):
    pass


class ExRow(Base, CachedModel):
    __tablename__ = "ex_row"

    id: Mapped[int] = mapped_column(primary_key=True)
    n_int: Mapped[int | None] = mapped_column(Integer)
    n_big: Mapped[int | None] = mapped_column(BigInteger)
    s50: Mapped[str | None] = mapped_column(String(50))
    body: Mapped[str | None] = mapped_column(Text)
    flag: Mapped[bool | None] = mapped_column(Boolean)
    amount: Mapped[Decimal | None] = mapped_column(Numeric(10, 2))
    ratio: Mapped[float | None] = mapped_column(Float)
    naive_at: Mapped[datetime | None] = mapped_column(DateTime)
    aware_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    day: Mapped[date | None] = mapped_column(Date)
    clock: Mapped[time | None] = mapped_column(Time)
    email: Mapped[str | None] = mapped_column(LowerEmail)
    tags: Mapped[list[str] | None] = mapped_column(CommaList)
    utc_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    uid: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    color: Mapped[Color | None] = mapped_column(Enum(Color, name="ex_color"))
    level: Mapped[int] = mapped_column(server_default="7")
    created_at: Mapped[datetime] = mapped_column(DateTime, server_default=func.now())


class ExStamped(Base, CachedModel):
    """A column the database computes on UPDATE (``onupdate`` SQL expression)."""

    __tablename__ = "ex_stamped"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    touched_at: Mapped[datetime | None] = mapped_column(DateTime, onupdate=func.now())


class ExEscaped(Base, CachedModel):
    __tablename__ = "ex_escaped"

    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str | None] = mapped_column(EscapedText)


ROW_ATTRS = tuple(p.key for p in inspect(ExRow).column_attrs)
#: the columns a test writes (every one explicitly: a column left unset at INSERT is not in
#: the flushed state, and such a row is not published)
WRITABLE = tuple(a for a in ROW_ATTRS if a not in ("id", "level", "created_at"))

# ---------------------------------------------------------------------------- values

NEW_YORK = ZoneInfo("America/New_York")
KATHMANDU = ZoneInfo("Asia/Kathmandu")
IST = timezone(timedelta(hours=5, minutes=30))
NEWFOUNDLAND_ISH = timezone(timedelta(hours=-9, minutes=-30))


def awkward_rows() -> list[dict[str, Any]]:
    """Four rows of values a database likes to change on the way in."""
    a = {
        "n_int": -(2**31),
        "n_big": 2**62 + 1,  # not a float in disguise
        "s50": "trailing spaces   ",
        "body": "ünïcødé ✓ 🙂\nsecond line\t ",
        "flag": True,
        "amount": Decimal("1.005"),
        "ratio": 0.1,
        "naive_at": datetime(2024, 2, 29, 23, 59, 59, 123456),
        "aware_at": datetime(2024, 3, 31, 1, 30, 0, 123456, tzinfo=IST),
        "day": date(2024, 2, 29),
        "clock": time(23, 59, 59, 123456),
        "email": "  Mixed.Case@Example.COM ",
        "tags": ["a", "b c", "ü"],
        "utc_at": datetime(2024, 11, 3, 1, 30, 0, 654321, fold=1, tzinfo=NEW_YORK),
        "uid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "color": Color.GREEN,
    }
    b = {
        "n_int": 0,
        "n_big": -(2**63),
        "s50": "é" * 50,
        "body": "",
        "flag": False,
        "amount": Decimal("-2.675"),
        "ratio": 0.1 + 0.2,
        "naive_at": datetime(1999, 12, 31, 23, 59, 59, 999999),
        # the second 01:30 of the day clocks go back (fold=1), in a ZoneInfo zone
        "aware_at": datetime(2024, 11, 3, 1, 30, 0, 654321, fold=1, tzinfo=NEW_YORK),
        "day": date(1970, 1, 1),
        "clock": time(0, 0, 0, 1),
        "email": "ÅSA@Example.org",
        "tags": [],
        "utc_at": datetime(2000, 1, 1, 0, 0, 0, 1, tzinfo=NEWFOUNDLAND_ISH),
        "uid": uuid.UUID(int=0),
        "color": Color.RED,
    }
    c = {  # like a, but no float: publishable on MariaDB too
        **a,
        "n_int": 2**31 - 1,
        "s50": "  leading and trailing  ",
        "amount": Decimal("99999999.99"),
        "ratio": None,
        "naive_at": datetime(2030, 1, 1, 0, 0, 0, 500000),
        "aware_at": datetime(2024, 6, 1, 12, 0, 0, 999999, tzinfo=KATHMANDU),
        "clock": time(12, 0, 0, 999999),
        "uid": uuid.UUID("ffffffff-ffff-ffff-ffff-ffffffffffff"),
    }
    d = dict.fromkeys(WRITABLE)  # every nullable column None
    return [a, b, c, d]


def expected_after_commit(db_name: str, values: dict[str, Any]) -> str | None:
    """The entry state right after a commit that wrote ``values``.

    Every value here is predictable exactly except a FLOAT on MariaDB (single precision,
    printed rounded): such a row is invalidated instead of published.
    """
    if db_name == "mariadb" and values.get("ratio") is not None:
        return None
    return "value"


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture
def db(engine: Engine) -> Engine:
    reset_schema(engine, Base.metadata)
    return engine


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url, socket_timeout=1)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def cache(client: redis.Redis, prefix: str) -> WriteThroughCache:
    return WriteThroughCache(client, prefix=prefix)


@pytest.fixture
def factory(db: Engine, cache: WriteThroughCache) -> sessionmaker[Session]:
    maker = sessionmaker(db)
    cache.install(maker)
    return maker


# --------------------------------------------------------------------------- helpers


def differences(cached: Any, fresh: Any) -> str | None:
    """Why two attribute values are not the same (None when they are), types included."""
    if type(cached) is not type(fresh):
        return f"type {type(cached).__name__} != {type(fresh).__name__}"
    if cached != fresh:
        return "value"
    if isinstance(cached, Decimal) and cached.as_tuple() != fresh.as_tuple():
        return "decimal sign/digits/exponent"
    if isinstance(cached, float) and math.copysign(1.0, cached) != math.copysign(1.0, fresh):
        return "float sign"
    if isinstance(cached, (datetime, time)):
        if cached.tzinfo != fresh.tzinfo:
            return "tzinfo"
        if cached.utcoffset() != fresh.utcoffset():
            return "utcoffset"
        if cached.replace(tzinfo=None) != fresh.replace(tzinfo=None) or cached.fold != fresh.fold:
            return "wall time"
    if isinstance(cached, list):
        for x, y in zip(cached, fresh, strict=True):
            why = differences(x, y)
            if why:
                return f"element: {why}"
    return None


def assert_same_row(cached: dict[str, Any], fresh: dict[str, Any]) -> None:
    wrong = {
        attr: (why, cached[attr], fresh[attr])
        for attr in fresh
        if (why := differences(cached[attr], fresh[attr])) is not None
    }
    assert not wrong, f"cache != database: {wrong}"


def insert(factory: sessionmaker[Session], model: type, *rows: dict[str, Any]) -> list[int]:
    with factory() as s:
        objects = [model(**row) for row in rows]
        s.add_all(objects)
        s.flush()
        ids = [o.id for o in objects]
        s.commit()
    return ids


def fresh_load(engine: Engine, model: type, pk: int) -> dict[str, Any]:
    """The row as a session *without* the cache loads it from the database."""
    with sessionmaker(engine)() as s:
        obj = s.get(model, pk)
        assert obj is not None
        return {p.key: getattr(obj, p.key) for p in inspect(model).column_attrs}


def served_from_cache(
    factory: sessionmaker[Session], engine: Engine, cache: WriteThroughCache, model: type, pk: int
) -> dict[str, Any]:
    """The row as ``session.get`` builds it from Redis; fails unless that took no SQL."""
    hits = cache.stats().hits
    with factory() as s, capture_sql(engine) as sql:
        obj = s.get(model, pk)
        assert obj is not None
        values = {p.key: getattr(obj, p.key) for p in inspect(model).column_attrs}
    assert sql == [], "expected a cache hit"
    assert cache.stats().hits == hits + 1
    return values


def load_and_fill(factory: sessionmaker[Session], engine: Engine, model: type, pk: int) -> None:
    """A read that misses and fills (one SELECT)."""
    with factory() as s, capture_sql(engine) as sql:
        assert s.get(model, pk) is not None
    assert len(sql) == 1


def state_of(cache: WriteThroughCache, client: redis.Redis, model: type, pk: int) -> str | None:
    return entry_state(client, entry_key(cache, model, pk))


def check_publish_then_fill(
    factory: sessionmaker[Session],
    engine: Engine,
    cache: WriteThroughCache,
    client: redis.Redis,
    db_name: str,
    pks: list[int],
    rows: list[dict[str, Any]],
) -> None:
    """After a commit wrote ``rows``: the entry states are as predicted; the cache-served rows
    equal the database's, on the publish path and again on the fill path."""
    states = {pk: state_of(cache, client, ExRow, pk) for pk in pks}
    assert states == {
        pk: expected_after_commit(db_name, row) for pk, row in zip(pks, rows, strict=True)
    }
    for pk in pks:
        if states[pk] is None:
            load_and_fill(factory, engine, ExRow, pk)  # the invalidation: a miss fills
        assert_same_row(
            served_from_cache(factory, engine, cache, ExRow, pk), fresh_load(engine, ExRow, pk)
        )
    for pk in pks:  # fill path
        cache.invalidate(ExRow, pk)
        assert state_of(cache, client, ExRow, pk) is None
        load_and_fill(factory, engine, ExRow, pk)
        assert state_of(cache, client, ExRow, pk) == "value"
        assert_same_row(
            served_from_cache(factory, engine, cache, ExRow, pk), fresh_load(engine, ExRow, pk)
        )


# ----------------------------------------------------------------------------- tests


def test_inserted_rows_equal_a_fresh_load(
    factory: sessionmaker[Session],
    db: Engine,
    cache: WriteThroughCache,
    client: redis.Redis,
    db_name: str,
) -> None:
    """Rows inserted through the ORM: the published (or filled) entry equals a fresh load,
    field by field and type by type; so does the entry refilled after an invalidation."""
    rows = awkward_rows()
    pks = insert(factory, ExRow, *rows)
    check_publish_then_fill(factory, db, cache, client, db_name, pks, rows)


def test_updated_rows_equal_a_fresh_load(
    factory: sessionmaker[Session],
    db: Engine,
    cache: WriteThroughCache,
    client: redis.Redis,
    db_name: str,
) -> None:
    """A second commit changes every field of every row (loaded from the cache): the entries
    published by the UPDATE, and refilled afterwards, equal a fresh load."""
    rows = awkward_rows()
    pks = insert(factory, ExRow, *rows)
    for pk in pks:  # an INSERT that could not publish (a FLOAT on MariaDB) left a miss
        if state_of(cache, client, ExRow, pk) is None:
            load_and_fill(factory, db, ExRow, pk)
    new_rows = rows[1:] + rows[:1]  # each row takes the next row's values
    with factory() as s:
        for pk, values in zip(pks, new_rows, strict=True):
            obj = s.get(ExRow, pk)
            assert obj is not None
            for attr, value in values.items():
                setattr(obj, attr, value)
        s.commit()
    check_publish_then_fill(factory, db, cache, client, db_name, pks, new_rows)


def test_server_defaults_are_cached_as_the_database_computed_them(
    factory: sessionmaker[Session],
    db: Engine,
    cache: WriteThroughCache,
    client: redis.Redis,
    db_name: str,
) -> None:
    """``server_default`` values (a literal and ``now()``) fetched at INSERT are published
    exactly as a load returns them."""
    (pk,) = insert(factory, ExRow, dict.fromkeys(WRITABLE))
    assert state_of(cache, client, ExRow, pk) == "value"
    cached = served_from_cache(factory, db, cache, ExRow, pk)
    fresh = fresh_load(db, ExRow, pk)
    assert fresh["level"] == 7
    assert isinstance(fresh["created_at"], datetime)
    assert_same_row(cached, fresh)


def test_onupdate_sql_expression_makes_the_update_a_miss(
    factory: sessionmaker[Session],
    db: Engine,
    cache: WriteThroughCache,
    client: redis.Redis,
) -> None:
    """A column the database computes on UPDATE (``onupdate=func.now()``) is not known at
    publish time: the UPDATE's commit leaves a miss, and the fill caches the computed value."""
    (pk,) = insert(factory, ExStamped, {"name": "a", "touched_at": None})
    assert state_of(cache, client, ExStamped, pk) == "value"
    with factory() as s:
        obj = s.get(ExStamped, pk)
        assert obj is not None
        obj.name = "b"
        s.commit()
    assert state_of(cache, client, ExStamped, pk) is None
    load_and_fill(factory, db, ExStamped, pk)
    cached = served_from_cache(factory, db, cache, ExStamped, pk)
    fresh = fresh_load(db, ExStamped, pk)
    assert fresh["name"] == "b" and isinstance(fresh["touched_at"], datetime)
    assert_same_row(cached, fresh)


# Per column: (values written, {db: state right after commit}, {db: what a load returns}).
# A state of ... means "either": only exactness is checked.
ANY: Any = ...
ALL_VALUE = {"sqlite": "value", "postgresql": "value", "mariadb": "value"}
PROBES: list[Any] = [
    pytest.param(
        {"amount": Decimal("1.005")},
        ALL_VALUE,
        {
            "sqlite": Decimal("1.00"),  # bound as the float 1.00499999..., formatted "%.2f"
            "postgresql": Decimal("1.01"),
            "mariadb": Decimal("1.01"),
        },
        id="numeric-1.005",
    ),
    pytest.param(
        {"amount": Decimal("-2.675")},
        ALL_VALUE,
        {"sqlite": Decimal("-2.67"), "postgresql": Decimal("-2.68"), "mariadb": Decimal("-2.68")},
        id="numeric--2.675",
    ),
    pytest.param(
        {"amount": Decimal("-0.001")},
        {"sqlite": ANY, "postgresql": ANY, "mariadb": ANY},
        {"postgresql": Decimal("0.00"), "mariadb": Decimal("0.00")},
        id="numeric-rounds-to-negative-zero",
    ),
    pytest.param(
        {"ratio": 0.1},
        {"sqlite": "value", "postgresql": "value", "mariadb": None},
        {"sqlite": 0.1, "postgresql": 0.1, "mariadb": 0.1},
        id="float-0.1",
    ),
    pytest.param(
        {"ratio": -0.0},
        {"sqlite": ANY, "postgresql": ANY, "mariadb": None},
        {},
        id="float-negative-zero",
    ),
    pytest.param(
        {"aware_at": datetime(2024, 3, 31, 1, 30, 0, 123456, tzinfo=IST)},
        ALL_VALUE,
        {
            "sqlite": datetime(2024, 3, 31, 1, 30, 0, 123456),  # wall time, zone dropped
            "postgresql": datetime(2024, 3, 30, 20, 0, 0, 123456, tzinfo=timezone.utc),
            "mariadb": datetime(2024, 3, 31, 1, 30, 0),  # wall time, microseconds truncated
        },
        id="datetime-tz-fixed-offset",
    ),
    pytest.param(
        {"aware_at": datetime(2024, 11, 3, 1, 30, 0, 654321, fold=1, tzinfo=NEW_YORK)},
        ALL_VALUE,
        {
            "sqlite": datetime(2024, 11, 3, 1, 30, 0, 654321),
            "postgresql": datetime(2024, 11, 3, 6, 30, 0, 654321, tzinfo=timezone.utc),
            "mariadb": datetime(2024, 11, 3, 1, 30, 0),
        },
        id="datetime-tz-zoneinfo-fold",
    ),
    pytest.param(
        {"naive_at": datetime(2024, 2, 29, 23, 59, 59, 999999)},
        ALL_VALUE,
        {
            "sqlite": datetime(2024, 2, 29, 23, 59, 59, 999999),
            "postgresql": datetime(2024, 2, 29, 23, 59, 59, 999999),
            "mariadb": datetime(2024, 2, 29, 23, 59, 59),  # truncated, not rounded up
        },
        id="datetime-microseconds",
    ),
    pytest.param(
        {"clock": time(23, 59, 59, 123456)},
        ALL_VALUE,
        {
            "sqlite": time(23, 59, 59, 123456),
            "postgresql": time(23, 59, 59, 123456),
            "mariadb": time(23, 59, 59),
        },
        id="time-microseconds",
    ),
    pytest.param(
        {"s50": "trailing ü  ", "body": "🙂 tab\t "},
        ALL_VALUE,
        {},
        id="strings-trailing-spaces-unicode",
    ),
    pytest.param(
        {"email": " Mixed.Case@Example.COM "},
        ALL_VALUE,
        dict.fromkeys(("sqlite", "postgresql", "mariadb"), "mixed.case@example.com"),
        id="typedecorator-lowercase-email",
    ),
    pytest.param({"tags": ["x", "y z"]}, ALL_VALUE, {}, id="typedecorator-comma-list"),
    pytest.param(
        {"utc_at": datetime(2024, 6, 1, 12, 0, 0, 250000, tzinfo=KATHMANDU)},
        ALL_VALUE,
        {
            "sqlite": datetime(2024, 6, 1, 6, 15, 0, 250000, tzinfo=timezone.utc),
            "postgresql": datetime(2024, 6, 1, 6, 15, 0, 250000, tzinfo=timezone.utc),
            "mariadb": datetime(2024, 6, 1, 6, 15, 0, tzinfo=timezone.utc),
        },
        id="typedecorator-utc-datetime",
    ),
    pytest.param(
        {"uid": uuid.UUID(int=1), "color": Color.GREEN, "flag": False, "n_big": 2**63 - 1},
        ALL_VALUE,
        {},
        id="uuid-enum-bool-bigint",
    ),
]


@pytest.mark.parametrize(("values", "states", "loaded"), PROBES)
def test_publish_or_invalidate_per_column(
    factory: sessionmaker[Session],
    db: Engine,
    cache: WriteThroughCache,
    client: redis.Redis,
    db_name: str,
    values: dict[str, Any],
    states: dict[str, Any],
    loaded: dict[str, Any],
) -> None:
    """One column at a time (the others None): whether the commit publishes a VALUE or
    leaves a miss, what the database returns for the value written, and that the entry, once
    there, equals a fresh load."""
    row = {**dict.fromkeys(WRITABLE), **values}
    (pk,) = insert(factory, ExRow, row)
    state = state_of(cache, client, ExRow, pk)
    fresh = fresh_load(db, ExRow, pk)
    if db_name in loaded:
        attr = next(iter(values))  # the first column written is the one probed
        got, want = fresh[attr], loaded[db_name]
        if db_name == "postgresql" and isinstance(want, datetime) and want.tzinfo is not None:
            # timestamptz comes back in the connection's time zone (whatever the server's is)
            assert got.tzinfo is not None and got == want, got
        else:
            assert differences(got, want) is None, got
    if states[db_name] is not ANY:
        assert state == states[db_name]
    if state is None:
        load_and_fill(factory, db, ExRow, pk)
    assert_same_row(served_from_cache(factory, db, cache, ExRow, pk), fresh)


def test_non_idempotent_type_decorator_publish(
    factory: sessionmaker[Session],
    db: Engine,
    cache: WriteThroughCache,
    client: redis.Redis,
) -> None:
    """A TypeDecorator whose bind processing is not idempotent (escaping) and that returns
    what is stored: after the commit the cache holds what a load returns ("Fish &amp; Chips"),
    or a miss; never the value escaped twice."""
    (pk,) = insert(factory, ExEscaped, {"title": "Fish & Chips"})
    fresh = fresh_load(db, ExEscaped, pk)
    assert fresh["title"] == "Fish &amp; Chips"
    if state_of(cache, client, ExEscaped, pk) is None:
        load_and_fill(factory, db, ExEscaped, pk)
    assert_same_row(served_from_cache(factory, db, cache, ExEscaped, pk), fresh)


def test_non_idempotent_type_decorator_fill(
    factory: sessionmaker[Session],
    db: Engine,
    cache: WriteThroughCache,
    client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The same TypeDecorator on the fill path: the entry a miss fills from a load holds what
    the load returned, or the row is not cached, and the log says which column; never the
    value escaped twice."""
    (pk,) = insert(factory, ExEscaped, {"title": "Fish & Chips"})
    fresh = fresh_load(db, ExEscaped, pk)
    cache.invalidate(ExEscaped, pk)
    with caplog.at_level(logging.WARNING, logger="sqlalchemy_writethrough"):
        load_and_fill(factory, db, ExEscaped, pk)
    if state_of(cache, client, ExEscaped, pk) is None:  # not cached at all is exact too
        assert any("ExEscaped.title" in r.getMessage() for r in caplog.records), caplog.text
        return
    assert_same_row(served_from_cache(factory, db, cache, ExEscaped, pk), fresh)


def test_generated_row_functions_agree_with_the_column_codecs() -> None:
    """The generated ``decode`` and ``flushed`` of a row (None checked inline for nullable
    codecs) give what calling each column's codec gives, for None, ordinary values and values
    a codec cannot predict, on every dialect."""
    from sqlalchemy.dialects import mysql, postgresql, sqlite

    from sqlalchemy_writethrough import codec
    from sqlalchemy_writethrough.model import ClassLayout

    layout = ClassLayout(inspect(ExRow), 0, frozenset(), ("id",), "ExRow")
    full = {
        "id": 1,
        "n_int": 5,
        "n_big": 2**40,
        "s50": "abc",
        "body": "text",
        "flag": True,
        "amount": Decimal("1.50"),
        "ratio": 0.5,
        "naive_at": datetime(2024, 1, 2, 3, 4, 5, 600),
        "aware_at": datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc),
        "day": date(2024, 1, 2),
        "clock": time(3, 4, 5),
        "email": "A@B.example",
        "tags": ["a", "b"],
        "utc_at": datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc),
        "uid": uuid.UUID(int=7),
        "color": Color.RED,
        "level": 7,
        "created_at": datetime(2024, 1, 2),
    }
    empty = {
        key: (value if key in ("id", "level", "created_at") else None)
        for key, value in full.items()
    }
    odd = dict(full, amount=Decimal("1.005"), ratio=math.nan, s50="x" * 60)
    for dialect in (postgresql.dialect(), mysql.dialect(), sqlite.dialect()):
        row_codec = layout.row_codec(dialect)
        ctx = codec.FlushContext(dialect)
        for values in (full, empty, odd):
            expected: list[Any] | None = [0]
            for attr, col_codec in zip(layout.attrs, row_codec.codecs, strict=True):
                try:
                    stored = col_codec.flushed(values[attr], ctx)
                except codec.EncodeError:
                    stored = codec.NOT_EXACT
                if stored is codec.NOT_EXACT:
                    expected = None
                    break
                expected.append(stored)
            try:
                generated = row_codec.flushed(values, ctx)
            except codec.EncodeError:
                generated = None
            assert generated == expected, (dialect.name, values)
            if expected is None:
                continue
            raw = codec.unpack_row(codec.pack_row(expected))
            decoded = row_codec.decode(raw)
            assert decoded == {
                attr: col_codec.decode(raw[i])
                for i, (attr, col_codec) in enumerate(
                    zip(layout.attrs, row_codec.codecs, strict=True), 1
                )
            }
