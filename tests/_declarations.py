"""The declarations and values of the sweep (``tests/test_declarations_swept*.py``), and the
sweep itself: one model per declared column type, for each database, each with its awkward
values, committed (inserted, then updated) and compared with a fresh ``select()``.

Kept in one place so that the sweep's three modules (each database on its sync driver; MariaDB
in a lenient ``sql_mode``; PostgreSQL on asyncpg) sweep the same declarations, and run in
separate pytest-xdist workers (``--dist loadfile``): together, in one module, they were the
slowest module of the suite.
"""

from __future__ import annotations

import datetime as dt
import enum
import math
import uuid
import warnings
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase

from _cache_helpers import one_column_models
from _servers import reset_schema

# ----------------------------------------------------------------------------- values

INTS = [0, 1, -1, 127, 128, 255, 256, -129, 32767, 32768, 8388608, 2**31 - 1, 2**31]
INTS += [2**32, 2**53 + 1, 2**63 - 1, -(2**63), 2**64 - 1, True, 69, 1901, 2155]
FLOATS = [0.0, -0.0, 1.5, 0.1, 1 / 3, 5e-324, 1e300, 3.5e38, 1e16, 16777217.0, 1e-45]
FLOATS += [float("inf"), float("nan"), Decimal("1.005"), 7]
DECIMALS = [Decimal(x) for x in ("0", "-0", "1.005", "-1.5", "1E+3", "0.000001", "1E-20")]
DECIMALS += [Decimal(x) for x in ("99999999.995", "12345678901234567890.123456789", "100000000")]
DECIMALS += [Decimal("1E+30"), Decimal("NaN"), 1, 0.1]
STRINGS = ["", "a", "abc ", " abc", "héllo", "😀", "a\u0301", "\u00a0", "x" * 300, "line\r\n"]
LONG_STRINGS = ["x" * 70000, "é" * 40000]
BYTES = [b"", b"\x00", b"abc\x00", b"x" * 300, bytes(range(256))]
DATETIMES = [
    dt.datetime(2024, 1, 2, 3, 4, 5),
    dt.datetime(2024, 1, 2, 3, 4, 5, 123456),
    dt.datetime(2024, 1, 2, 3, 4, 5, 500000),
    dt.datetime(9999, 12, 31, 23, 59, 59, 999999),
    dt.datetime(1, 1, 1),
    dt.datetime(1969, 12, 31, 23, 59, 59),
    dt.datetime(2039, 1, 1),
    dt.datetime(2024, 6, 1, 12, tzinfo=dt.timezone.utc),
    dt.datetime(2024, 6, 1, 12, 0, 0, 1, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30))),
]
DATES = [dt.date(2024, 2, 29), dt.date(1, 1, 1), dt.date(9999, 12, 31), dt.date(999, 1, 1)]
TIMES = [dt.time(0), dt.time(23, 59, 59, 999999), dt.time(1, 2, 3, 500000), dt.time(12, 0, 0, 5)]
TIMES += [dt.time(12, tzinfo=dt.timezone.utc)]
INTERVALS = [dt.timedelta(0), dt.timedelta(days=1, microseconds=1), dt.timedelta(days=-1)]
INTERVALS += [dt.timedelta(hours=839), dt.timedelta(seconds=-1, microseconds=500000)]
UUIDS = [uuid.UUID(int=0), uuid.UUID("123e4567-e89b-12d3-a456-426614174000")]
DOCUMENTS: list[Any] = [{"b": 1, "a": 2}, [1, 2.5, "x"], "s", 1, 1.0, 1e16, None, True]
DOCUMENTS += [{"é": "😀"}, 0.1, -0.0, {"a": {"b": [None]}}, [], {}, 1.5e300, 2**70]


class Color(enum.Enum):
    RED = "red"
    DARK = "Dark"


def values_for(type_: Any) -> list[Any]:
    """The awkward values of a type's Python class."""
    by_class: dict[type, list[Any]] = {
        bool: [True, False, 0, 1],
        int: INTS,
        float: FLOATS,
        Decimal: DECIMALS,
        str: STRINGS,
        bytes: BYTES,
        dt.datetime: DATETIMES,
        dt.date: DATES,
        dt.time: TIMES,
        dt.timedelta: INTERVALS,
        uuid.UUID: UUIDS,
    }
    if isinstance(type_, postgresql.DOMAIN):
        type_ = type_.data_type  # (a domain's values are its data type's)
    return by_class[type_.python_type]


# ------------------------------------------------------------------------ declarations

#: name -> (declared type, its values: None for those of its Python class)
Declared = dict[str, tuple[Any, "list[Any] | None"]]

COMMON: Declared = {
    "integer": (sa.Integer(), None),
    "small": (sa.SmallInteger(), None),
    "big": (sa.BigInteger(), None),
    "boolean": (sa.Boolean(), None),
    "double": (sa.Double(), None),
    "float": (sa.Float(), None),
    "float_24": (sa.Float(24), None),
    "float_decimal": (sa.Float(asdecimal=True), None),
    "numeric": (sa.Numeric(), None),
    "numeric_10_2": (sa.Numeric(10, 2), None),
    "numeric_10": (sa.Numeric(10), None),
    "numeric_scale_only": (sa.Numeric(scale=2), None),
    "numeric_38_0": (sa.Numeric(38, 0), None),
    "numeric_float": (sa.Numeric(10, 2, asdecimal=False), None),
    "numeric_return_scale": (sa.Numeric(10, 2, decimal_return_scale=4), None),
    "string": (sa.String(5), None),
    "text": (sa.Text(), [*STRINGS, *LONG_STRINGS]),
    "unicode": (sa.Unicode(20), None),
    "char": (sa.CHAR(3), ["abc", "ab", "ab ", "é😀a"]),
    "nchar": (sa.NCHAR(3), ["abc", "éa😀"]),
    "binary": (sa.LargeBinary(), None),
    "binary_5": (sa.LargeBinary(5), None),
    "datetime": (sa.DateTime(), None),
    "datetime_tz": (sa.DateTime(timezone=True), None),
    "timestamp": (sa.TIMESTAMP(), None),
    "date": (sa.Date(), None),
    "time": (sa.Time(), None),
    "time_tz": (sa.Time(timezone=True), None),
    "interval": (sa.Interval(), None),
    "interval_not_native": (sa.Interval(native=False), None),
    "uuid": (sa.Uuid(), None),
    "uuid_text": (sa.Uuid(native_uuid=False), None),
    "uuid_str": (sa.Uuid(as_uuid=False), [str(u) for u in UUIDS]),
    "enum": (sa.Enum(Color, name="swt_color"), [Color.RED, Color.DARK]),
    "enum_not_native": (sa.Enum(Color, native_enum=False), [Color.RED, Color.DARK]),
    "enum_strings": (sa.Enum("a", "Bb", name="swt_strings"), ["a", "Bb"]),
    "json": (sa.JSON(), DOCUMENTS),
    "json_none_as_null": (sa.JSON(none_as_null=True), DOCUMENTS),
    "variant": (
        sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb"),
        None,
    ),
}

POSTGRESQL: Declared = {
    "double_precision": (postgresql.DOUBLE_PRECISION(), None),
    "real": (postgresql.REAL(), None),
    "pg_numeric_5_5": (postgresql.NUMERIC(5, 5), None),
    "bytea": (postgresql.BYTEA(), None),
    "pg_uuid_str": (postgresql.UUID(as_uuid=False), [str(u) for u in UUIDS]),
    "pg_enum": (postgresql.ENUM("a", "Bb", name="swt_pg_enum"), ["a", "Bb"]),
    "timestamp_3": (postgresql.TIMESTAMP(precision=3), None),
    "timestamptz_0": (postgresql.TIMESTAMP(timezone=True, precision=0), None),
    "time_2": (postgresql.TIME(precision=2), None),
    "interval_day": (postgresql.INTERVAL(fields="DAY"), None),
    "interval_1": (postgresql.INTERVAL(precision=1), None),
    "jsonb": (postgresql.JSONB(), DOCUMENTS),
    "array_int": (postgresql.ARRAY(sa.Integer), [[1, 2], [], [None], [2**31 - 1]]),
    "array_text": (postgresql.ARRAY(sa.Text), [["a", "b c", "", "NULL", '"q"', "{x}", "a,b"]]),
    "array_numeric": (postgresql.ARRAY(sa.Numeric(10, 2)), [[Decimal("1.005"), Decimal("2")]]),
    "array_char": (postgresql.ARRAY(sa.CHAR(3)), [["abc"], ["a"]]),
    "array_string": (postgresql.ARRAY(sa.String(5)), [["abcde"], ["abcdef"]]),
    "array_datetime": (postgresql.ARRAY(sa.DateTime), [[dt.datetime(2024, 1, 1, 1, 1, 1, 5)]]),
    "array_float": (postgresql.ARRAY(sa.Float), [[0.1, -0.0, 1e300]]),
    "array_jsonb": (postgresql.ARRAY(postgresql.JSONB), [[{"a": 1}]]),
    "inet": (postgresql.INET(), ["10.0.0.1", "10.0.0.01", "::1"]),
    "cidr": (postgresql.CIDR(), ["10.0.0.0/8"]),
    "macaddr": (postgresql.MACADDR(), ["08:00:2B:01:02:03"]),
    "tsvector": (postgresql.TSVECTOR(), ["b a", "a:1 a:2"]),
    "domain_int": (postgresql.DOMAIN("swt_positive", sa.Integer, check="VALUE > 0"), None),
    "domain_numeric": (postgresql.DOMAIN("swt_money", sa.Numeric(10, 2)), None),
    "domain_text": (postgresql.DOMAIN("swt_code", sa.String(5), not_null=False), None),
    "domain_timestamp": (postgresql.DOMAIN("swt_at", sa.DateTime), None),
}

MARIADB: Declared = {
    "m_double": (mysql.DOUBLE(), None),
    "m_double_10_2": (mysql.DOUBLE(10, 2), None),
    "m_float_7_3": (mysql.FLOAT(7, 3), None),
    "m_decimal_unsigned": (mysql.DECIMAL(10, 2, unsigned=True), None),
    "m_tinyint": (mysql.TINYINT(), None),
    "m_tinyint_1": (mysql.TINYINT(1), None),
    "m_tinyint_unsigned": (mysql.TINYINT(unsigned=True), None),
    "m_mediumint": (mysql.MEDIUMINT(), None),
    "m_int_zerofill": (mysql.INTEGER(zerofill=True), None),
    "m_bigint_unsigned": (mysql.BIGINT(unsigned=True), None),
    "m_year": (mysql.YEAR(), [1901, 2155, 2024, 69, 70, 0]),
    "m_enum": (mysql.ENUM("a", "b", "Cc"), ["a", "Cc", "A", "cc"]),
    "m_tinytext": (mysql.TINYTEXT(), None),
    "m_mediumtext": (mysql.MEDIUMTEXT(), [*STRINGS, *LONG_STRINGS]),
    "m_text_300": (mysql.TEXT(300), None),
    "m_text_latin1": (mysql.TEXT(charset="latin1"), None),
    "m_text_utf32": (mysql.TEXT(charset="utf32"), [*STRINGS, "x" * 16383, "x" * 16384]),
    "m_text_ucs2": (mysql.TEXT(charset="ucs2"), [*STRINGS, "x" * 32768]),
    "m_varchar_latin1": (mysql.VARCHAR(20, charset="latin1"), [*STRINGS, "€"]),
    "m_varchar_ascii": (mysql.VARCHAR(20, charset="ascii"), None),
    "m_varchar_utf8mb3": (mysql.VARCHAR(20, charset="utf8mb3"), None),
    "m_varchar_cp1251": (mysql.VARCHAR(20, charset="cp1251"), [*STRINGS, "привет"]),
    "m_varchar_collation": (sa.String(20, collation="latin1_swedish_ci"), None),
    "m_varchar_binary": (mysql.VARCHAR(20, binary=True), None),
    "m_nvarchar": (mysql.NVARCHAR(20), None),
    "nvarchar": (sa.NVARCHAR(20), None),
    "m_char_latin1": (mysql.CHAR(2, charset="latin1"), ["ab", "éa", "😀a"]),
    "m_tinyblob": (mysql.TINYBLOB(), None),
    "m_varbinary": (mysql.VARBINARY(10), None),
    "m_binary": (mysql.BINARY(3), None),
    "m_datetime_3": (mysql.DATETIME(fsp=3), None),
    "m_timestamp_6": (mysql.TIMESTAMP(fsp=6), None),
    "m_time_6": (mysql.TIME(fsp=6), None),
    "m_json": (mysql.JSON(), DOCUMENTS),
}

SQLITE: Declared = {
    "s_datetime_truncated": (sqlite.DATETIME(truncate_microseconds=True), None),
    "s_datetime_minutes": (
        sqlite.DATETIME(
            storage_format="%(year)04d/%(month)02d/%(day)02d %(hour)02d:%(minute)02d",
            regexp=r"(\d+)/(\d+)/(\d+) (\d+):(\d+)",
        ),
        None,
    ),
    "s_date_us": (
        sqlite.DATE(
            storage_format="%(month)02d/%(day)02d/%(year)04d",
            regexp=r"(?P<month>\d+)/(?P<day>\d+)/(?P<year>\d+)",
        ),
        None,
    ),
    "s_time_truncated": (sqlite.TIME(truncate_microseconds=True), None),
    "s_time_minutes": (
        sqlite.TIME(storage_format="%(hour)02d-%(minute)02d", regexp=r"(\d+)-(\d+)"),
        None,
    ),
    "s_decimal": (sqlite.DECIMAL(10, 2), None),
    "s_real": (sqlite.REAL(), None),
    # (SQLAlchemy 2.1's JSONB; 2.0 has SQLite's JSON only)
    "s_jsonb": (getattr(sqlite, "JSONB", sqlite.JSON)(), DOCUMENTS),
}


def _models(name: str, declared: Declared) -> tuple[type, dict[str, tuple[type, Any]]]:
    class Base(DeclarativeBase):
        pass

    made = one_column_models(Base, f"sw_{name}", {n: t for n, (t, _) in declared.items()})
    return Base, {n: (model, declared[n][1]) for n, model in made.items()}


BY_DATABASE = {
    "postgresql": _models("pg", {**COMMON, **POSTGRESQL}),
    "mariadb": _models("my", {**COMMON, **MARIADB}),
    "sqlite": _models("lite", {**COMMON, **SQLITE}),
}


# ------------------------------------------------------------------------------ checks


def _seen(value: Any) -> Any:
    """What an application sees of a value: its class and ``repr()`` (NaN as itself)."""
    if isinstance(value, float) and math.isnan(value):
        return (float, "nan")
    return (type(value), repr(value))


def _wrong(name: str, value: Any, served: Any, stored: Any) -> tuple[str, ...] | None:
    if _seen(served) == _seen(stored):
        return None
    return (name, repr(value)[:40], repr(served)[:60], repr(stored)[:60])


def _commit(made: Callable[[], Any], model: Any, key: int, value: Any, update: bool) -> bool:
    """Insert (or update) a row of ``value``; False when the database refused it, or when,
    for an update, the row is one the driver cannot load (asyncpg: a ``TIME(2)`` of
    ``23:59:59.999`` rounded to ``24:00``)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a driver's "Data truncated" in a lenient mode
            with made() as session:
                if update:
                    try:
                        row = session.get(model, key)
                    except ValueError:
                        if type(_read(made, model, key, fresh=True)) is tuple:
                            return False  # a load without the cache fails too
                        raise
                    if row is None:
                        return False  # its insert was refused
                    row.value = value
                else:
                    session.add(model(id=key, value=value))
                session.commit()
    except (sa.exc.DBAPIError, sa.exc.StatementError, OverflowError, LookupError):
        return False  # refused by the database, the driver or SQLAlchemy, with or without us
    return True


def _read(made: Callable[[], Any], model: Any, key: int, fresh: bool) -> Any:
    """A get of the row (from the cache), or a fresh select; what either raised, as a value:
    a value the driver cannot load (year 10000) raises with or without the cache."""
    try:
        with made() as session:
            if fresh:
                return session.scalars(sa.select(model.value).where(model.id == key)).one()
            return session.get(model, key).value
    except (ValueError, sa.exc.DBAPIError) as exc:
        return ("raised", type(exc).__name__)


def sweep(made: Callable[[], Any], models: dict[str, tuple[type, Any]]) -> list[Any]:
    """Each model's values inserted, then its first row updated to each: what a get served
    that a fresh ``select()`` does not load (name, value, served, stored), none expected."""
    wrong = []
    for name, (model, values) in models.items():
        for key, value in enumerate(values or values_for(model.__table__.c.value.type), 1):
            if _commit(made, model, key, value, update=False):
                served, stored = _read(made, model, key, False), _read(made, model, key, True)
                found = _wrong(name, value, served, stored)
                if found:
                    wrong.append(found)
        for value in values or values_for(model.__table__.c.value.type):
            if _commit(made, model, 1, value, update=True):
                served, stored = _read(made, model, 1, False), _read(made, model, 1, True)
                found = _wrong(f"{name} (update)", value, served, stored)
                if found:
                    wrong.append(found)
    return wrong


def swept(engine: Engine) -> tuple[type, dict[str, tuple[type, Any]]]:
    """The database's declarative base and models (``BY_DATABASE``), their tables made afresh."""
    name = engine.dialect.name
    base, models = BY_DATABASE["mariadb" if name in ("mysql", "mariadb") else name]
    reset_schema(engine, base.metadata)  # type: ignore[attr-defined]
    return base, models
