"""Invariant 4, property-based: a row served from the cache equals a fresh database load.

Hypothesis generates rows over every column type the cache stores, with values the database may
change on the way in (rounding to a scale, single-precision floats, microseconds, time zones,
CHAR padding, TypeDecorator bind processing, server defaults, ``onupdate`` values, a
``version_id_col``). Each example, on one database:

1. inserts one row of each model through the ORM and commits;
2. reads every row back through the cache (a VALUE published by the commit is read with no SQL;
   an invalidated entry is loaded once, which fills it, then read with no SQL) and compares it
   with a load by a session without the cache, field by field and type by type;
3. updates the rows through instances the cache built, commits, and compares again.

The update step assigns, per field, a new value, nothing, or a value *equal* to the current one
in another form (``-0.0`` for ``0.0``, ``Decimal("1.5")`` for ``Decimal("1.50")``, the same
instant in another time zone): a form that re-saves what it showed is the commonest update.

Values a database cannot store at all (out of range, NUL in PostgreSQL text, longer than the
column where the database is strict, NaN in MariaDB) are not generated for that database.
Examples that hypothesis found during development are kept as explicit ``@example``s.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import uuid
from collections.abc import Callable, Iterator
from datetime import date, datetime, time, timedelta, timezone
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation, localcontext
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from sqlalchemy import (
    CHAR,
    JSON,
    NCHAR,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Double,
    Enum,
    Float,
    Integer,
    Interval,
    LargeBinary,
    Numeric,
    SmallInteger,
    String,
    Text,
    Time,
    TypeDecorator,
    Unicode,
    Uuid,
    func,
    inspect,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.ext.mutable import MutableDict
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_writethrough import CachedModel, WriteThroughCache

from _cache_helpers import entry_key, entry_state, keyspace
from _servers import capture_sql, reset_schema

# ------------------------------------------------------------------------ column types


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"
    BLUE = "blue"


SIZES = ("s", "m", "l", "xl")


class CentsDecimal(TypeDecorator[Decimal]):
    """Money stored as an integer number of cents, returned as a Decimal with two places."""

    impl = Integer
    cache_ok = True

    def process_bind_param(self, value: Decimal | None, dialect: Dialect) -> int | None:
        if value is None:
            return None
        return int((value * 100).to_integral_value(rounding=ROUND_HALF_EVEN))

    def process_result_value(self, value: int | None, dialect: Dialect) -> Decimal | None:
        return None if value is None else Decimal(value).scaleb(-2)


class TrimmedLower(TypeDecorator[str]):
    """An e-mail address stored stripped and lower-cased; returned as stored."""

    impl = String(60)
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return None if value is None else value.strip().lower()


class Boxed(TypeDecorator[Any]):
    """A JSON document stored inside ``{"v": ...}``: a TypeDecorator over JSON."""

    impl = JSON
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        return None if value is None else {"v": value}

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        return None if value is None else value["v"]


def _now_python() -> datetime:
    """A Python-side insert default and ``onupdate``: known at flush, microseconds included."""
    return datetime.now()


# ------------------------------------------------------------------------------ models


class Base(DeclarativeBase):
    pass


class HxRow(Base, CachedModel):
    """Every scalar type the cache can publish exactly on at least one database."""

    __tablename__ = "hx_row"

    id: Mapped[int] = mapped_column(primary_key=True)
    n_int: Mapped[int | None] = mapped_column(Integer)
    n_big: Mapped[int | None] = mapped_column(BigInteger)
    n_small: Mapped[int | None] = mapped_column(SmallInteger)
    flag: Mapped[bool | None] = mapped_column(Boolean)
    name: Mapped[str | None] = mapped_column(String(40))
    body: Mapped[str | None] = mapped_column(Text)
    label: Mapped[str | None] = mapped_column(Unicode(40))
    ratio: Mapped[float | None] = mapped_column(Float)
    dbl: Mapped[float | None] = mapped_column(Double)
    amount: Mapped[Decimal | None] = mapped_column(Numeric(12, 3))
    plain_num: Mapped[Decimal | None] = mapped_column(Numeric)
    day: Mapped[date | None] = mapped_column(Date)
    naive_at: Mapped[datetime | None] = mapped_column(DateTime)
    aware_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    clock: Mapped[time | None] = mapped_column(Time)
    span: Mapped[timedelta | None] = mapped_column(Interval)
    blob: Mapped[bytes | None] = mapped_column(LargeBinary)
    uid: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    color: Mapped[Color | None] = mapped_column(Enum(Color, name="hx_color"))
    size: Mapped[str | None] = mapped_column(Enum(*SIZES, name="hx_size"))
    cents: Mapped[Decimal | None] = mapped_column(CentsDecimal)
    email: Mapped[str | None] = mapped_column(TrimmedLower)
    level: Mapped[int] = mapped_column(server_default="7")
    touched: Mapped[datetime] = mapped_column(default=_now_python, onupdate=_now_python)
    version: Mapped[int] = mapped_column(nullable=False)

    __mapper_args__ = {"version_id_col": version}


class HxLossy(Base, CachedModel):
    """Types whose commits invalidate: the database formats a UUID string, and pads a CHAR value
    shorter than the column (one of its full length is written through)."""

    __tablename__ = "hx_lossy"

    id: Mapped[int] = mapped_column(primary_key=True)
    code: Mapped[str | None] = mapped_column(CHAR(6))
    uid_str: Mapped[str | None] = mapped_column(Uuid(as_uuid=False))


class HxChar(Base, CachedModel):
    """CHAR(n): a value of n characters is written through (on MySQL and MariaDB, one not
    ending in a space), a shorter one padded, so invalidated (SQLite stores it as given)."""

    __tablename__ = "hx_char"

    id: Mapped[int] = mapped_column(primary_key=True)
    code: Mapped[str] = mapped_column(CHAR(6))
    ncode: Mapped[str | None] = mapped_column(NCHAR(6))


class HxDoc(Base, CachedModel):
    """JSON, written through: PostgreSQL ``json``, MariaDB and SQLite keep the text sent."""

    __tablename__ = "hx_doc"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str | None] = mapped_column(String(20))
    doc: Mapped[Any] = mapped_column(JSON, nullable=True)
    sql_null: Mapped[Any] = mapped_column(JSON(none_as_null=True), nullable=True)
    tracked: Mapped[dict[str, Any] | None] = mapped_column(MutableDict.as_mutable(JSON))
    boxed: Mapped[Any] = mapped_column(Boxed, nullable=True)


class HxStamped(Base, CachedModel):
    """An ``onupdate`` SQL expression, with an insert default: known only to the database."""

    __tablename__ = "hx_stamped"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(40))
    stamp: Mapped[datetime] = mapped_column(DateTime, default=func.now(), onupdate=func.now())


class PgBase(DeclarativeBase):
    pass


class HxPgDoc(PgBase, CachedModel):
    """JSONB: keys reordered and deduplicated, numbers kept as ``numeric``: predicted."""

    __tablename__ = "hx_pg_doc"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str | None] = mapped_column(String(20))
    doc: Mapped[Any] = mapped_column(JSONB, nullable=True)
    sql_null: Mapped[Any] = mapped_column(JSONB(none_as_null=True), nullable=True)
    tracked: Mapped[dict[str, Any] | None] = mapped_column(MutableDict.as_mutable(JSONB))
    variant: Mapped[Any] = mapped_column(JSON().with_variant(JSONB(), "postgresql"), nullable=True)


class HxPgArray(PgBase, CachedModel):
    __tablename__ = "hx_pg_array"

    id: Mapped[int] = mapped_column(primary_key=True)
    nums: Mapped[list[int | None] | None] = mapped_column(ARRAY(Integer))
    words: Mapped[list[str | None] | None] = mapped_column(ARRAY(String(20)))
    amounts: Mapped[list[Decimal | None] | None] = mapped_column(ARRAY(Numeric(8, 2)))


MODELS: dict[str, type[Any]] = {
    "row": HxRow,
    "lossy": HxLossy,
    "char": HxChar,
    "doc": HxDoc,
    "stamped": HxStamped,
    "pg_doc": HxPgDoc,
    "pg_array": HxPgArray,
}

# -------------------------------------------------------------------------- strategies


class _Equal:
    """In an update: assign a value equal (``==``) to the current one, in another form."""

    def __repr__(self) -> str:
        return "EQUAL"


EQUAL: Any = _Equal()

Strategy = st.SearchStrategy[Any]

UTC_OFFSETS: Strategy = st.integers(-14 * 60, 14 * 60).map(
    lambda minutes: timezone(timedelta(minutes=minutes))
)
ZONES: Strategy = st.one_of(st.just(timezone.utc), UTC_OFFSETS, st.timezones())
FLOAT32_MAX = 3.4028234663852886e38  # the largest FLOAT MariaDB accepts


def text(db: str, max_size: int, min_size: int = 0) -> Strategy:
    """Any text the database stores: no surrogates, no NUL in PostgreSQL."""
    chars = st.characters(codec="utf-8", exclude_characters=("\x00",) if db == "postgresql" else ())
    awkward = st.sampled_from(["", " ", "trailing  ", "  lead", "Straße", "İ", "🙂", "a\tb\r\n"])
    return st.one_of(
        st.text(chars, min_size=min_size, max_size=max_size),
        awkward.filter(lambda s: min_size <= len(s) <= max_size),
    )


def decimals(db: str, whole_digits: int, special: bool, scaled: bool = True) -> Strategy:
    """Decimals with 0 to 6 places (and some with a positive exponent), below
    ``10 ** whole_digits`` in magnitude; with ``special``, NaN where the database has it, and
    infinities where it has them (PostgreSQL, a NUMERIC without precision: ``scaled=False``)."""
    bound = Decimal(10) ** whole_digits - 1
    places = st.integers(0, 6).flatmap(
        lambda p: st.decimals(-bound, bound, places=p, allow_nan=False, allow_infinity=False)
    )
    exponent = st.builds(
        lambda digits, exp: Decimal(digits).scaleb(exp), st.integers(-999, 999), st.integers(1, 5)
    ).filter(lambda d: abs(d) <= bound)
    common = st.sampled_from(["0", "0.00", "-0.0", "1.50", "-2.675", "100"]).map(Decimal)
    options = [common, places, exponent]
    if special and db == "postgresql":
        # a NUMERIC with a precision holds NaN but no infinity
        specials = ["NaN"] if scaled else ["NaN", "Infinity", "-Infinity"]
        options.append(st.sampled_from([Decimal(s) for s in specials]))
    if special and db == "sqlite":
        options.append(st.just(Decimal("NaN")))
    return st.one_of(*options)


COMMON_FLOATS = (0.0, -0.0, 0.1, 0.5, 1.0, -1.0, 2.5, 100.0, 1e-7)


def floats(db: str, single: bool) -> Strategy:
    """Any float the column stores, and the everyday ones (zeros of both signs included)."""
    if db == "mariadb":
        if single:
            anything = st.floats(-FLOAT32_MAX, FLOAT32_MAX, width=32)
        else:
            anything = st.floats(allow_nan=False, allow_infinity=False)
    else:
        anything = st.floats()
    return st.one_of(st.sampled_from(COMMON_FLOATS), anything)


def uuids(db: str) -> Strategy:
    """MariaDB's UUID type refuses some bit patterns that are no RFC 4122 UUID: uuid4 there."""
    if db == "mariadb":
        return st.one_of(st.just(uuid.UUID(int=0)), st.uuids(version=4))
    return st.uuids()


def first_year(db: str) -> int:
    return 1000 if db == "mariadb" else 1


def scalar_values(db: str) -> dict[str, Strategy]:
    """One strategy per writable column of HxRow (None is added by the caller)."""
    min_day = date(first_year(db), 1, 1)
    strict = db != "sqlite"  # PostgreSQL and MariaDB (strict mode) refuse over-long strings
    return {
        "n_int": st.integers(-(2**31), 2**31 - 1),
        "n_big": st.integers(-(2**63), 2**63 - 1),
        "n_small": st.integers(-(2**15), 2**15 - 1),
        "flag": st.booleans(),
        "name": text(db, 40 if strict else 45),
        "body": text(db, 200),
        "label": text(db, 40 if strict else 45),
        "ratio": floats(db, single=True),
        "dbl": floats(db, single=False),
        "amount": decimals(db, 9, special=True),
        "plain_num": decimals(db, 9, special=True, scaled=False),
        "day": st.dates(min_value=min_day),
        "naive_at": st.datetimes(min_value=datetime.combine(min_day, time())),
        # a year clear of both ends, so that the value in UTC is a datetime too
        "aware_at": st.datetimes(
            min_value=datetime(max(2, first_year(db) + 1), 1, 1),
            max_value=datetime(9998, 12, 31),
            timezones=ZONES,
        ),
        "clock": st.times(),
        # MariaDB and SQLite store an interval as the epoch plus the interval
        "span": st.timedeltas(timedelta(days=-20_000), timedelta(days=20_000)),
        "blob": st.binary(max_size=64),
        "uid": uuids(db),
        "color": st.sampled_from(Color),
        "size": st.sampled_from(SIZES),
        "cents": st.decimals(-(10**6), 10**6, places=2, allow_nan=False, allow_infinity=False),
        "email": text(db, 30),
    }


def char_codes(db: str, national: bool = False) -> Strategy:
    """CHAR(6) values: shorter than the column (padded), of its length (written through; one
    ending in a space is stripped by MySQL), longer (SQLite only: refused elsewhere).
    ``national``: NCHAR's, which MySQL and MariaDB keep in utf8mb3 (no character beyond the
    BMP: refused)."""
    if national and db == "mariadb":
        chars = st.characters(codec="utf-8", max_codepoint=0xFFFF)
        return st.one_of(
            st.text(chars, max_size=6),
            st.text(chars, min_size=6, max_size=6),
            st.sampled_from(["abcde ", "Straße", "ab"]),
        )
    return st.one_of(
        text(db, 8 if db == "sqlite" else 6),
        text(db, 6, min_size=6),
        st.sampled_from(["abcde ", "  ab  ", "🙂é\tİ b", "Straße", "ab"]),
    )


def lossy_values(db: str) -> dict[str, Strategy]:
    return {
        "code": char_codes(db),
        "uid_str": uuids(db).map(str),
    }


#: numbers a database may print in another form: jsonb prints 1e+20 as an integer, SQLite
#: stores a document that is one integral number as an INTEGER
JSON_FLOATS = (
    0.0, -0.0, 1.0, 100.0, 0.1, 1e-5, 1.5e-7, 5e-324, 1e16, 1.2345e16, 1e20, 1e23,
    12345678901234567890.0, 9.223372036854776e18, -9.223372036854776e18, 1.7976931348623157e308,
)  # fmt: skip
JSON_INTS = (0, -1, 2**53 + 1, 2**63 - 1, -(2**63), 2**63, 2**64 - 1, 2**64, -(2**63) - 1, 10**30)
JSON_STRINGS = ("", "🙂", "é", "İ", 'a"b\\c', "\u2028", "a\tb\n", "1", "aa", "b")


def json_documents(nul: bool = True) -> Strategy:
    """JSON documents: nested lists (and tuples) and objects with keys in any order (integer
    keys too, which collide with their text: ``{1: "a", "1": "b"}``), integers and floats of any
    size, unicode strings with astral characters, booleans and null. ``nul=False``: no NUL
    character (jsonb refuses ``\\u0000``)."""
    chars = st.characters(codec="utf-8", exclude_characters=() if nul else ("\x00",))
    strings = st.one_of(st.text(chars, max_size=10), st.sampled_from(JSON_STRINGS))
    keys = st.one_of(strings, st.integers(-2, 2))
    number = st.one_of(
        st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(JSON_FLOATS)
    )
    integer = st.one_of(st.integers(), st.sampled_from(JSON_INTS))
    leaves = st.one_of(st.none(), st.booleans(), integer, number, strings)
    return st.recursive(
        leaves,
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.lists(children, max_size=3).map(tuple),
            st.dictionaries(keys, children, max_size=5),
        ),
        max_leaves=10,
    )


def json_objects(nul: bool = True) -> Strategy:
    chars = st.characters(codec="utf-8", exclude_characters=() if nul else ("\x00",))
    return st.dictionaries(st.text(chars, max_size=6), json_documents(nul), max_size=4)


def json_nulls() -> Strategy:
    """SQL NULL or JSON null, as the ORM spells them."""
    return st.sampled_from([None, JSON.NULL])


def doc_values(db: str, binary: bool) -> dict[str, Strategy]:
    nul = not binary  # the json text type, MariaDB and SQLite store \u0000; jsonb refuses it
    values = {
        "name": text(db, 20),
        "doc": st.one_of(json_documents(nul), json_nulls()),
        "sql_null": st.one_of(json_documents(nul), json_nulls()),
        "tracked": optional(json_objects(nul)),
    }
    values["variant" if binary else "boxed"] = optional(json_documents(nul))
    return values


class _InPlace:
    """In an update: change a JSON attribute's object in place, not assigning the attribute."""

    def __init__(self, key: str, value: Any) -> None:
        self.key, self.value = key, value

    def apply(self, obj: Any, attr: str) -> None:
        current = getattr(obj, attr)
        if type(current) is list:
            current.append(self.value)
        elif isinstance(current, dict):
            current[self.key] = self.value  # a MutableDict sees it; a plain dict does not

    def __repr__(self) -> str:
        return f"IN_PLACE({self.key!r}, {self.value!r})"


def in_place(nul: bool) -> Strategy:
    return st.builds(_InPlace, st.sampled_from(["k", "a", "zz"]), json_documents(nul))


def doc_updates(db: str, binary: bool) -> Strategy:
    """A new value or an in-place change per attribute; an UPDATE that changes only ``name``
    while ``doc`` was changed in place (unseen by the ORM) must not publish the changed doc."""
    nul = not binary
    values = {k: st.one_of(v, in_place(nul)) for k, v in doc_values(db, binary).items()}
    values["name"] = text(db, 20)
    return st.fixed_dictionaries({}, optional=values)


def optional(values: Strategy) -> Strategy:
    return st.one_of(st.none(), values)


def insert_rows(db: str) -> Strategy:
    """``{model name: {attribute: value}}`` for one INSERT per model; an attribute left out
    is not assigned (the INSERT sends NULL, or its default)."""
    scalars = {k: optional(v) for k, v in scalar_values(db).items()}
    lossy = {k: optional(v) for k, v in lossy_values(db).items()}
    models: dict[str, Strategy] = {
        "row": st.fixed_dictionaries({}, optional=scalars),
        "lossy": st.fixed_dictionaries({}, optional=lossy),
        "char": st.fixed_dictionaries(
            {"code": char_codes(db)}, optional={"ncode": optional(char_codes(db, national=True))}
        ),
        "doc": st.fixed_dictionaries({}, optional=doc_values(db, binary=False)),
        "stamped": st.fixed_dictionaries({"name": text(db, 40)}),
    }
    if db == "postgresql":
        models["pg_doc"] = st.fixed_dictionaries({}, optional=doc_values(db, binary=True))
        models["pg_array"] = st.fixed_dictionaries(
            {},
            optional={
                "nums": optional(st.lists(optional(st.integers(-(2**31), 2**31 - 1)))),
                "words": optional(st.lists(optional(text(db, 20)), max_size=5)),
                "amounts": optional(st.lists(optional(decimals(db, 6, special=False)))),
            },
        )
    return st.fixed_dictionaries(models)


def equal_or(values: Strategy) -> Strategy:
    """EQUAL half of the time (a flattened ``one_of`` would make it rare), else ``values``."""
    return st.booleans().flatmap(lambda equal: st.just(EQUAL) if equal else values)


def update_rows(db: str) -> Strategy:
    """``{model name: {attribute: new value or EQUAL}}`` for the UPDATE step."""
    scalars = scalar_values(db)
    row = {k: equal_or(optional(v)) for k, v in scalars.items()}
    row["level"] = st.integers(-(2**31), 2**31 - 1)
    lossy = {k: optional(v) for k, v in lossy_values(db).items()}
    models: dict[str, Strategy] = {
        "row": st.fixed_dictionaries({}, optional=row),
        "lossy": st.fixed_dictionaries({}, optional=lossy),
        "char": st.fixed_dictionaries(
            {"code": equal_or(char_codes(db))},
            optional={"ncode": optional(char_codes(db, national=True))},
        ),
        "doc": doc_updates(db, binary=False),
        "stamped": st.fixed_dictionaries({}, optional={"name": text(db, 40)}),
    }
    if db == "postgresql":
        models["pg_doc"] = doc_updates(db, binary=True)
        models["pg_array"] = st.fixed_dictionaries(
            {},
            optional={
                "nums": equal_or(optional(st.lists(st.integers(-99, 99)))),
                "words": optional(st.lists(optional(text(db, 20)), max_size=5)),
                "amounts": equal_or(optional(st.lists(optional(decimals(db, 6, special=False))))),
            },
        )
    return st.fixed_dictionaries(models)


def equal_variant(value: Any) -> Any:
    """A value ``==`` to ``value`` in another form, as a form re-submitting it would send."""
    if isinstance(value, float) and value == 0:
        return -value
    if isinstance(value, Decimal) and value.is_finite():
        with localcontext() as ctx:
            ctx.prec = 60
            exponent = value.as_tuple().exponent
            assert isinstance(exponent, int)
            try:
                return value.quantize(Decimal(1).scaleb(exponent - 2))  # two more zeros
            except InvalidOperation:
                return value
    if isinstance(value, datetime) and value.tzinfo is not None:
        return value.astimezone(timezone(timedelta(hours=-3, minutes=-30)))
    if isinstance(value, list):
        return [equal_variant(v) for v in value]
    return value


# ---------------------------------------------------------------------------- fixtures


@dataclasses.dataclass
class Hx:
    """One database's engine, cache, and session factories, reused by every example."""

    db: str
    engine: Engine
    client: redis.Redis
    cache: WriteThroughCache
    cached: sessionmaker[Session]
    plain: sessionmaker[Session]
    models: tuple[str, ...]
    outcomes: dict[str, int] = dataclasses.field(default_factory=dict)

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        event(outcome)


@pytest.fixture
def hx(engine: Engine, db_name: str, redis_url: str, prefix: str) -> Iterator[Hx]:
    reset_schema(engine, Base.metadata)
    models = ("row", "lossy", "char", "doc", "stamped")
    if db_name == "postgresql":
        reset_schema(engine, PgBase.metadata)
        models += ("pg_doc", "pg_array")
    client = redis.Redis.from_url(redis_url, socket_timeout=1)
    cache = WriteThroughCache(client, prefix=prefix)
    cached = sessionmaker(engine)
    cache.install(cached)
    try:
        yield Hx(db_name, engine, client, cache, cached, sessionmaker(engine), models)
    finally:
        client.close()


SETTINGS = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# ---------------------------------------------------------------------------- checking


def differences(cached: Any, fresh: Any) -> str | None:
    """Why two attribute values differ (None when they do not), types and forms included."""
    if type(cached) is not type(fresh):
        return f"type {type(cached).__name__} != {type(fresh).__name__}"
    if isinstance(cached, float):
        if math.isnan(cached) and math.isnan(fresh):
            return None
        if cached != fresh:
            return "value"
        if math.copysign(1.0, cached) != math.copysign(1.0, fresh):
            return "sign of zero"
        return None
    if isinstance(cached, Decimal):
        if cached.as_tuple() != fresh.as_tuple():
            return "decimal sign/digits/exponent"
        return None
    if isinstance(cached, (datetime, time)):
        if cached != fresh:
            return "value"
        if cached.tzinfo != fresh.tzinfo:
            return "tzinfo"
        if cached.utcoffset() != fresh.utcoffset():
            return "utcoffset"
        if cached.replace(tzinfo=None) != fresh.replace(tzinfo=None) or cached.fold != fresh.fold:
            return "wall time or fold"
        return None
    if isinstance(cached, list):
        if len(cached) != len(fresh):
            return "list length"
        for i, (x, y) in enumerate(zip(cached, fresh, strict=True)):
            why = differences(x, y)
            if why:
                return f"[{i}]: {why}"
        return None
    if isinstance(cached, dict):
        if list(cached) != list(fresh):
            return "keys or key order"
        for k in cached:
            why = differences(cached[k], fresh[k])
            if why:
                return f"[{k!r}]: {why}"
        return None
    return None if cached == fresh else "value"


def snapshot(obj: Any) -> dict[str, Any]:
    return {p.key: getattr(obj, p.key) for p in inspect(type(obj)).column_attrs}


def assert_same(model: type, cached: dict[str, Any], fresh: dict[str, Any], how: str) -> None:
    wrong = {
        attr: (why, cached[attr], fresh[attr])
        for attr in fresh
        if (why := differences(cached[attr], fresh[attr])) is not None
    }
    assert not wrong, f"{model.__name__} {how} from the cache != database: {wrong}"


def fresh_load(hx: Hx, model: type, pk: int) -> dict[str, Any]:
    """The row as a session without the cache loads it."""
    with hx.plain() as s:
        obj = s.get(model, pk)
        assert obj is not None
        return snapshot(obj)


def storable(values: dict[str, Any]) -> bool:
    """Whether every JSON document of a row fits msgpack (integers within 64 bits)."""
    from sqlalchemy_writethrough.codec import _json_ok

    return all(_json_ok(v) for v in values.values() if isinstance(v, (dict, list, int)))


def served(hx: Hx, model: type, pk: int, step: str) -> tuple[dict[str, Any], str]:
    """The row as ``session.get`` builds it from Redis with no SQL, and how: ``a hit`` on the
    entry the commit left, or ``a miss, filled`` when the commit invalidated it (one load
    then fills it, and the read after that is the hit compared)."""
    raw, gen = hx.client.mget(*keyspace(hx.cache, model).pair([pk]))
    state = entry_state(hx.client, entry_key(hx.cache, model, pk))
    assert state in ("value", None), f"{model.__name__}: entry left as {state!r} after commit"
    current = raw is not None and raw[:1] == b"V" and raw[1 : raw.index(b":", 1)] == gen
    how = "a hit" if current else "a miss, filled"
    hx.count(f"{step}: {model.__name__} {how}")
    if not current:
        with hx.cached() as s, capture_sql(hx.engine) as sql:
            assert s.get(model, pk) is not None
        assert len(sql) == 1, sql
        filled = entry_state(hx.client, entry_key(hx.cache, model, pk))
        if filled != "value" and not storable(fresh_load(hx, model, pk)):
            # a JSON number msgpack cannot hold (beyond 64 bits): never cached, always read
            # from the database, never an error
            with hx.cached() as s, capture_sql(hx.engine) as sql:
                obj = s.get(model, pk)
                assert obj is not None
                values = snapshot(obj)
            assert len(sql) == 1, sql
            return values, "not storable, read from the database"
        assert filled == "value", f"{model.__name__}: the load did not fill the entry"
    hits = hx.cache.stats().hits
    with hx.cached() as s, capture_sql(hx.engine) as sql:
        obj = s.get(model, pk)
        assert obj is not None
        values = snapshot(obj)
    assert sql == [], f"{model.__name__}: expected a cache hit, got SQL {sql}"
    assert hx.cache.stats().hits == hits + 1
    return values, how


def check_all(hx: Hx, pks: dict[str, int], step: str) -> None:
    for name, pk in pks.items():
        model = MODELS[name]
        cached, how = served(hx, model, pk, step)
        assert_same(model, cached, fresh_load(hx, model, pk), f"{how} after {step}")


def round_trip(hx: Hx, first: dict[str, dict[str, Any]], second: dict[str, dict[str, Any]]) -> None:
    """Insert, compare; update through cached instances, compare."""
    names = [n for n in hx.models if n in first]
    with hx.cached() as s:
        objects = {n: MODELS[n](**first[n]) for n in names}
        s.add_all(objects.values())
        s.flush()
        # the keys before COMMIT: read after it, an expired object's read-back would fill
        # the entries the commit left as misses, and the misses are what is checked
        pks = {n: o.id for n, o in objects.items()}
        s.commit()
    check_all(hx, pks, "insert")

    with hx.cached() as s:
        for name, pk in pks.items():
            obj = s.get(MODELS[name], pk)
            assert obj is not None
            for attr, value in second.get(name, {}).items():
                if isinstance(value, _InPlace):
                    value.apply(obj, attr)
                else:
                    setattr(
                        obj, attr, equal_variant(getattr(obj, attr)) if value is EQUAL else value
                    )
        s.commit()
    check_all(hx, pks, "update")


def run_property(hx: Hx, test: Callable[[], None]) -> None:
    """Run the hypothesis property, then check that both paths were exercised: commits that
    published a VALUE and commits that left a miss."""
    test()
    assert hx.outcomes.get("insert: HxRow a hit"), f"no INSERT published a value: {hx.outcomes}"
    assert hx.outcomes.get("insert: HxLossy a miss, filled"), hx.outcomes
    # a CHAR value of the column's length is written through, a shorter one padded
    assert hx.outcomes.get("insert: HxChar a hit"), hx.outcomes
    if hx.db != "sqlite":
        assert hx.outcomes.get("insert: HxChar a miss, filled"), hx.outcomes
    for model in ("HxDoc", "HxPgDoc") if hx.db == "postgresql" else ("HxDoc",):
        for step in ("insert", "update"):  # JSON is written through, not invalidated
            assert hx.outcomes.get(f"{step}: {model} a hit"), hx.outcomes


# ------------------------------------------------------------------------------- tests

# Failing examples hypothesis found during development (shrunk), kept so they are re-run first.

#: every database: a row whose Interval column is not NULL is never cached. ``Interval`` is a
#: TypeDecorator over DateTime; codec.column_codec takes the TypeDecorator branch (before
#: _base_codec's Interval rule), Interval has no process_bind_param, so the timedelta reaches
#: the DateTime codec: EncodeError on every fill, NOT_EXACT on every publish.
INTERVAL_NEVER_CACHED: dict[str, dict[str, Any]] = {
    "row": {"span": timedelta(0)},
    "doc": {"doc": None},
    "stamped": {"name": ""},
}
#: PostgreSQL: ``Numeric()`` without a scale returns ``Decimal('0')`` for ``Decimal('0E+1')``
#: (NUMERIC has no positive exponent); the publish kept ``0E+1``.
PG_NUMERIC_POSITIVE_EXPONENT: dict[str, dict[str, Any]] = {
    "row": {"plain_num": Decimal(0).scaleb(1)},
    "doc": {"doc": None},
    "stamped": {"name": ""},
    "pg_doc": {"doc": None},
    "pg_array": {},
}
#: PostgreSQL: the UPDATE assigns ``-0.0`` where the row holds ``0.0``. The ORM sees no change
#: and does not write the column, but the publish takes the assigned ``-0.0`` from the
#: instance: the cache serves ``-0.0``, the database ``0.0``.
PG_EQUAL_FLOAT_ZERO: dict[str, dict[str, Any]] = {
    "row": {"ratio": 0.0},
    "doc": {"doc": None},
    "stamped": {"name": ""},
    "pg_doc": {"doc": None},
    "pg_array": {},
}
#: PostgreSQL, the same with a scale-less Numeric: ``Decimal("1.500")`` assigned over ``1.5``
#: is not written; the cache serves ``1.500``, the database ``1.5`` (found by reading the case
#: above).
PG_EQUAL_DECIMAL: dict[str, dict[str, Any]] = {
    "row": {"plain_num": Decimal("1.5")},
    "stamped": {"name": ""},
}
#: PostgreSQL: JSONB keeps a number as NUMERIC and returns ``1.8446744073709552e+19`` as the
#: integer 18446744073709552000 (above 2**64): the fill's msgpack packing raises OverflowError
#: out of ``session.get``.
PG_JSONB_BIG_NUMBER: dict[str, dict[str, Any]] = {
    "row": {},
    "doc": {"doc": None},
    "stamped": {"name": ""},
    "pg_doc": {"doc": 1.8446744073709552e19},
    "pg_array": {},
}
#: every database, the same fill bug with a JSON integer beyond 64 bits (found by reading the
#: JSONB case; the JSON strategy generates such integers too)
JSON_BIG_INTEGER: dict[str, dict[str, Any]] = {
    "row": {},
    "doc": {"doc": {"n": 2**64}},
    "stamped": {"name": ""},
}


#: every database: ``doc`` changed in place (unseen by the ORM) while ``name`` changes: the
#: UPDATE writes only ``name``, the database keeps the old document, and the publish took the
#: changed one from the instance (also true of a PostgreSQL ARRAY)
JSON_UNTRACKED_IN_PLACE: tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]] = (
    {"doc": {"doc": [], "name": "a"}, "stamped": {"name": ""}},
    {"doc": {"doc": _InPlace("k", None), "name": "b"}},
)


@pytest.mark.databases("sqlite")
def test_sqlite_cache_equals_database(hx: Hx) -> None:
    """SQLite: every cache-served row equals a fresh load (types, scale, zone, sign of zero)."""

    @SETTINGS
    @given(first=insert_rows("sqlite"), second=update_rows("sqlite"))
    @example(first=INTERVAL_NEVER_CACHED, second={})
    @example(first=JSON_BIG_INTEGER, second={})
    @example(*JSON_UNTRACKED_IN_PLACE)
    def prop(first: dict[str, dict[str, Any]], second: dict[str, dict[str, Any]]) -> None:
        round_trip(hx, first, second)

    run_property(hx, prop)


@pytest.mark.databases("postgresql")
def test_postgresql_cache_equals_database(hx: Hx) -> None:
    """PostgreSQL (with JSONB and ARRAY columns too): every cache-served row equals a fresh
    load."""

    @SETTINGS
    @given(first=insert_rows("postgresql"), second=update_rows("postgresql"))
    @example(first=INTERVAL_NEVER_CACHED, second={})
    @example(first=PG_NUMERIC_POSITIVE_EXPONENT, second={})
    @example(first=PG_EQUAL_FLOAT_ZERO, second={"row": {"ratio": EQUAL}})
    @example(first=PG_EQUAL_DECIMAL, second={"row": {"plain_num": EQUAL}})
    @example(first=PG_JSONB_BIG_NUMBER, second={})
    @example(*JSON_UNTRACKED_IN_PLACE)
    def prop(first: dict[str, dict[str, Any]], second: dict[str, dict[str, Any]]) -> None:
        round_trip(hx, first, second)

    run_property(hx, prop)


@pytest.mark.databases("mariadb")
def test_mariadb_cache_equals_database(hx: Hx) -> None:
    """MariaDB: every cache-served row equals a fresh load."""

    @SETTINGS
    @given(first=insert_rows("mariadb"), second=update_rows("mariadb"))
    @example(first=INTERVAL_NEVER_CACHED, second={})
    @example(first=JSON_BIG_INTEGER, second={})
    @example(*JSON_UNTRACKED_IN_PLACE)
    def prop(first: dict[str, dict[str, Any]], second: dict[str, dict[str, Any]]) -> None:
        round_trip(hx, first, second)

    run_property(hx, prop)
