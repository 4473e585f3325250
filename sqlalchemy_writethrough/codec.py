"""The stored form of a row: msgpack with explicit, per-column types. Never pickle.

A payload is ``FORMAT_VERSION`` (one byte) followed by a msgpack array ``[class tag, v1, ...]``,
one value per cached column in the model's column order. Each column has a codec chosen from its
SQLAlchemy type when the mapper is configured; decoding checks every value's type, so an entry
from another layout or a damaged one is refused (a miss), never turned into a wrong object.

Two ways a row reaches the cache:

* a **fill** stores values the database just returned: exact by construction;
* a **publish** stores the values a flush sent. The database may change a value on the way in
  (rounding, truncated microseconds, a time zone), so every column predicts what a load would
  return (:meth:`ColumnCodec.exact`). When it cannot say for sure, the publish becomes an
  invalidation: the next read loads the row from the database, which is always exact.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import importlib
import ipaddress
import json
import logging
import math
import re
import uuid
import warnings
import zoneinfo
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, cast

import msgpack
from sqlalchemy import types as sqltypes
from sqlalchemy.engine.default import DefaultDialect

from ._sa_compat import ABSTRACT_INTERVAL, json_functions, type_on
from .exc import ConfigurationError, WriteThroughWarning
from .keys import DecoratedKey

log = logging.getLogger("sqlalchemy_writethrough")

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect
    from sqlalchemy.schema import Column

#: Bump when the payload layout or any codec's stored form changes; it is part of every key's
#: schema digest, so a new version reads a new keyspace and never decodes old entries.
FORMAT_VERSION = 1
_HEADER = bytes([FORMAT_VERSION])

#: What :meth:`ColumnCodec.exact` returns when the database may return something else.
NOT_EXACT: Any = type("NotExact", (), {"__repr__": lambda self: "NOT_EXACT"})()

#: the types of values nothing can change in place (a JSON scalar, a TypeDecorator's plain
#: value); with enum members, what a commit may take for unchanged by identity alone
IMMUTABLE: set[type] = {
    *(type(None), bool, int, float, str, bytes, decimal.Decimal, dt.date, dt.datetime, dt.time),
    *(dt.timedelta, uuid.UUID),
}  # (asyncpg's UUID class joins once an asyncpg dialect's codecs are made)

#: the kinds of the plain codecs (not a TypeDecorator's) whose ``exact`` returns NOT_EXACT for
#: every value not of an exact type in IMMUTABLE, or an enum member: a value one of them
#: predicted cannot be changed in place (not "bytes": a bytearray; not "decimal": a Decimal
#: subclass). Keep in step with the rules below (tests/test_encode_once.py checks them).
IMMUTABLE_KINDS = frozenset(
    {"bool", "date", "datetime", "enum", "float", "int", "interval", "str", "time", "uuid"}
)


class DecodeError(ValueError):
    """A payload that is not a valid row of this model (another format, damaged, wrong types)."""


class EncodeError(ValueError):
    """A value this column's codec cannot store exactly (the row is then not cached)."""


class FlushContext:
    """What exactness rules need to know about the database a flush wrote to."""

    __slots__ = ("_connection", "_pg_timezone", "dialect", "is_mariadb", "name")

    def __init__(self, dialect: Dialect, connection: Callable[[], Any] | None = None) -> None:
        self.dialect = dialect
        self.name = dialect.name
        self.is_mariadb = bool(getattr(dialect, "is_mariadb", False))
        #: returns the flush's Connection; called only when a rule needs it (timestamptz)
        self._connection = connection
        self._pg_timezone: Any = None

    def pg_timezone(self) -> dt.tzinfo | None:
        """The tzinfo the driver attaches to ``timestamptz`` values on this connection:
        psycopg 3's is the session's ``TimeZone``; asyncpg's is always UTC; psycopg2's is
        the offset PostgreSQL gives for the session's ``TimeZone``, known here only when
        that zone is UTC or a fixed offset (:func:`psycopg2_zone`)."""
        if self._pg_timezone is None:  # read once per flush, asked once per value
            tz: Any = None
            try:
                if getattr(self.dialect, "driver", None) == "asyncpg":
                    tz = dt.timezone.utc
                else:
                    assert self._connection is not None
                    tz = driver_timezone(self.dialect, self._connection().connection)
            except Exception:  # another driver, or no connection: not predictable
                tz = None
            self._pg_timezone = tz if isinstance(tz, dt.tzinfo) else False
        return self._pg_timezone or None

    def same_as(self, other: FlushContext) -> bool:
        """Whether every stored value predicted in this context is what ``other`` predicts
        for the same value: the same dialect, the same MariaDB-or-MySQL, and the same
        connection time zone where this context read it (the one rule reading the
        connection)."""
        return (
            self.dialect is other.dialect
            and self.is_mariadb == other.is_mariadb
            and (self._pg_timezone is None or (self._pg_timezone or None) == other.pg_timezone())
        )


Exact = Callable[[Any, FlushContext], Any]


def driver_timezone(dialect: Dialect, pooled: Any) -> dt.tzinfo | None:
    """The tzinfo ``dialect``'s driver attaches to ``timestamptz`` values on a pooled
    connection (SQLAlchemy's ``PoolProxiedConnection``): psycopg 3's is the session's
    ``TimeZone``; asyncpg's is always UTC; psycopg2's is the offset PostgreSQL gives for the
    session's ``TimeZone``, known here only when that zone is UTC or a fixed offset
    (:func:`psycopg2_zone`). None when the driver cannot say (another driver)."""
    driver = getattr(dialect, "driver", None)
    if driver == "asyncpg":
        return dt.timezone.utc
    info = pooled.dbapi_connection.info
    if driver == "psycopg2":
        return psycopg2_zone(info.parameter_status("TimeZone"))
    if driver == "psycopg":
        tz = info.timezone
        return tz if isinstance(tz, dt.tzinfo) else None
    return None


def in_zone(
    values: dict[str, Any], attrs: tuple[str, ...], tz: dt.tzinfo, owned: bool = False
) -> dict[str, Any]:
    """``values`` with each ``timestamptz`` value of ``attrs`` in the time zone ``tz``, as a
    load on a connection in that zone returns it: changed in place when ``owned``, else a new
    dict when one changes."""
    changed = values if owned else None
    for attr in attrs:
        value = values[attr]
        # (a naive value is one asyncpg returns for 'infinity' and '-infinity': as loaded)
        if value is not None and value.tzinfo is not tz and value.tzinfo is not None:
            if changed is None:
                changed = dict(values)
            changed[attr] = value.astimezone(tz)
    return values if changed is None else changed


#: the names PostgreSQL reports for a ``TimeZone`` of UTC (lower case)
_PG_UTC_NAMES = frozenset(
    f"{area}{name}"
    for area in ("", "etc/")
    for name in ("utc", "uct", "gmt", "gmt0", "gmt+0", "gmt-0", "zulu", "universal", "greenwich")
) | {"utc0"}
#: ``Etc/GMT+5`` (5 hours west of UTC), or a POSIX zone of one fixed offset,
#: ``<+05:30>-05:30`` (what ``SET TIME ZONE INTERVAL '+05:30'`` reports): both west-positive
_PG_FIXED = re.compile(
    r"(?:etc/gmt|<[^<>,]*>)([+-]?)(\d{1,2})(?::(\d{2}))?(?::(\d{2}))?", re.IGNORECASE
)
_psycopg2_zones_warned: set[str] = set()


def psycopg2_zone(name: str | None) -> dt.timezone | None:
    """The tzinfo psycopg2 attaches to every ``timestamptz`` of a session whose ``TimeZone``
    is ``name``, or None when it depends on the instant. psycopg2 parses the offset
    PostgreSQL prints, which in a zone with transitions comes from the server's time zone
    database: Python's may disagree with it for some instants (historical or newly changed
    rules), so only a zone without transitions is predicted, and the first other one is
    logged with the remedy."""
    if not name:
        return None
    if name.lower() in _PG_UTC_NAMES:
        return dt.timezone.utc
    fixed = _PG_FIXED.fullmatch(name)
    if fixed is not None:
        sign, hours, minutes, seconds = fixed.groups()
        west = dt.timedelta(hours=int(hours), minutes=int(minutes or 0), seconds=int(seconds or 0))
        if west < dt.timedelta(hours=24):
            # timezone(timedelta(0)) is timezone.utc, as psycopg2's own is
            return dt.timezone(west if sign == "-" else -west)
    if name not in _psycopg2_zones_warned:
        _psycopg2_zones_warned.add(name)
        log.warning(
            "writethrough: psycopg2 returns timestamptz values with the offset PostgreSQL "
            "gives for the session's TimeZone %r, which the cache predicts only for UTC or a "
            "fixed offset: commits of DateTime(timezone=True) columns invalidate their rows "
            "instead of writing them through. Give the sessions UTC (connect_args="
            "{'options': '-c timezone=UTC'}) or use psycopg 3 (postgresql+psycopg://).",
            name,
        )
    return None


class Never:
    """Why a column's commits can never be written through on some databases, and the remedy:
    announced once (a :class:`~sqlalchemy_writethrough.exc.WriteThroughWarning`) instead of
    invalidating in silence."""

    __slots__ = ("everywhere", "on", "reason")

    def __init__(self, reason: str, on: Callable[[str, bool], bool] | None = None) -> None:
        self.reason = reason
        #: ``on(dialect name, is_mariadb)``; None: on every database
        self.on = on
        self.everywhere = on is None

    def applies(self, name: str, is_mariadb: bool) -> bool:
        return self.on is None or self.on(name, is_mariadb)


def _mysql_family(name: str, is_mariadb: bool) -> bool:
    return name in ("mysql", "mariadb")


def _real_database(name: str, is_mariadb: bool) -> bool:
    return name != DefaultDialect.name


def _postgresql(name: str, is_mariadb: bool) -> bool:
    return name == "postgresql"


def _server_database(name: str, is_mariadb: bool) -> bool:
    return name in ("postgresql", "mysql", "mariadb")


def _not_postgresql(name: str, is_mariadb: bool) -> bool:
    return name in ("mysql", "mariadb", "sqlite")


class ColumnCodec:
    """How one column is stored, read back, and predicted after a flush."""

    __slots__ = (
        "decode",
        "encode",
        "encode_not_null",
        "exact",
        "exact_not_null",
        "kind",
        "mutable",
        "never",
        "not_null",
        "stored_type",
    )

    def __init__(
        self,
        kind: str,
        encode: Callable[[Any], Any],
        decode: Callable[[Any], Any],
        exact: Exact,
        never: Never | None = None,
        mutable: bool = False,
    ) -> None:
        self.kind = kind
        self.encode = encode
        self.decode = decode
        self.exact = exact
        #: on which databases ``exact`` never predicts a value, and what to do about it
        self.never = never
        #: values are containers a program can change in place, unseen by the ORM
        self.mutable = mutable
        #: when ``decode`` only checks that the stored value is None or of this type and
        #: returns it: the row decoder checks such columns inline instead of calling it
        self.stored_type: type | None = getattr(decode, _STORED_TYPE, None)
        #: when ``decode``, ``encode`` and ``exact`` return None for None and call these for
        #: anything else (see _nullable): the generated row functions check for None inline
        self.not_null: Callable[[Any], Any] | None = getattr(decode, _NULLABLE_OF, None)
        self.encode_not_null: Callable[[Any], Any] | None = getattr(encode, _NULLABLE_OF, None)
        self.exact_not_null: Exact | None = getattr(exact, _NULLABLE_OF, None)

    def flushed(self, value: Any, ctx: FlushContext) -> Any:
        """The stored form of a value a flush sent, or NOT_EXACT."""
        predicted = self.exact(value, ctx)
        if predicted is NOT_EXACT:
            return NOT_EXACT
        return self.encode(predicted)

    def loaded(self, value: Any) -> Any:
        """The stored form of a value a database load returned (EncodeError if none)."""
        return self.encode(value)

    def __repr__(self) -> str:
        return f"ColumnCodec({self.kind})"


def _nullable(
    encode: Callable[[Any], Any], decode: Callable[[Any], Any], exact: Exact
) -> tuple[Callable[[Any], Any], Callable[[Any], Any], Exact]:
    def enc(v: Any) -> Any:
        return None if v is None else encode(v)

    def dec(v: Any) -> Any:
        return None if v is None else decode(v)

    setattr(dec, _STORED_TYPE, getattr(decode, _STORED_TYPE, None))

    def ex(v: Any, ctx: FlushContext) -> Any:
        return None if v is None else exact(v, ctx)

    setattr(enc, _NULLABLE_OF, encode)
    setattr(dec, _NULLABLE_OF, decode)
    setattr(ex, _NULLABLE_OF, exact)
    return enc, dec, ex


def _fail(expected: str, value: Any) -> DecodeError:
    return DecodeError(f"expected {expected}, found {type(value).__name__}")


# --- decoders that check the stored type --------------------------------------------------


def _dec_type(expected: type) -> Callable[[Any], Any]:
    def dec(v: Any) -> Any:
        if type(v) is not expected:
            raise _fail(expected.__name__, v)
        return v

    setattr(dec, _STORED_TYPE, expected)
    return dec


#: attribute naming the type a type-checking decoder accepts (see ColumnCodec.stored_type)
_STORED_TYPE = "_writethrough_stored_type"
#: attribute of a decoder made by _nullable: the decoder it calls for a value that is not None
_NULLABLE_OF = "_writethrough_nullable_of"


def _enc_int(v: Any) -> Any:
    if type(v) is not int:
        raise EncodeError(f"not an int: {type(v).__name__}")
    return v


def _enc_type(expected: type) -> Callable[[Any], Any]:
    def enc(v: Any) -> Any:
        if type(v) is not expected:
            raise EncodeError(f"expected {expected.__name__}, got {type(v).__name__}")
        return v

    return enc


def _enc_decimal(v: Any) -> Any:
    if not isinstance(v, decimal.Decimal):
        raise EncodeError(f"expected Decimal, got {type(v).__name__}")
    text = str(v)
    if "E+" in text and v.is_finite():
        # a whole number as asyncpg loads it (Decimal("1E+8")): stored as the text drivers
        # give it, which every reader but asyncpg's gets as it is (see _dec_decimal_for)
        return str(decimal.Decimal(int(v)))
    return text


def _dec_decimal(v: Any) -> Any:
    if type(v) is not str:
        raise _fail("str", v)
    try:
        return decimal.Decimal(v)
    except decimal.InvalidOperation as exc:
        raise DecodeError(f"bad decimal {v!r}") from exc


def _dec_decimal_for(dialect: Dialect) -> Callable[[Any], Any]:
    """The decoder giving a Decimal written as the dialect's driver writes it. PostgreSQL's
    drivers disagree on whole numbers: one that reads text (psycopg, psycopg2, pg8000) gives
    ``Decimal("100000000")``, asyncpg, which reads the binary form, leaves off the groups of
    four zeros PostgreSQL does not send (``Decimal("1E+8")``); equal, but not alike in
    ``str()``. Entries hold the text form (see :func:`_enc_decimal`), which asyncpg's
    readers are given in asyncpg's."""
    if getattr(dialect, "name", None) == "postgresql" and dialect.driver == "asyncpg":
        return _dec_decimal_asyncpg
    return _dec_decimal


def _dec_decimal_asyncpg(v: Any) -> Any:
    found = _dec_decimal(v)
    if "." in v or "E" in v or not found or not found.is_finite():
        return found  # a scale of its own: written alike
    digits = v.lstrip("-")
    zeros = len(digits) - len(digits.rstrip("0"))
    groups = zeros // 4
    if groups == 0:
        return found
    sign = "-" if v[0] == "-" else ""
    return decimal.Decimal(f"{sign}{digits[: len(digits) - 4 * groups]}E+{4 * groups}")


def _enc_datetime(v: Any) -> Any:
    if type(v) is not dt.datetime:
        raise EncodeError(f"expected datetime, got {type(v).__name__}")
    tz = v.tzinfo
    if tz is None:
        return v.isoformat()
    naive = v.replace(tzinfo=None).isoformat()
    if isinstance(tz, zoneinfo.ZoneInfo) and tz.key:
        return [naive, tz.key, v.fold]
    if type(tz) is dt.timezone:
        offset = tz.utcoffset(None)
        if tz.tzname(None) == dt.timezone(offset).tzname(None):
            return [naive, int(offset.total_seconds() * 1_000_000), 0]
    raise EncodeError(f"time zone {tz!r} has no exact stored form")


#: the instants a ``timestamptz`` entry may hold: one within a day of the ends of
#: ``datetime``'s range may not exist in another time zone (``0001-01-01 03:00+05:00`` is in
#: year 0 in UTC), where a reader would need it; the database's own load raises there
_ZONED_SPAN = (dt.datetime.min + dt.timedelta(days=1), dt.datetime.max - dt.timedelta(days=1))


def _enc_zoned_datetime(v: Any) -> Any:
    """A ``timestamptz`` value: as :func:`_enc_datetime`, but not an instant near the ends of
    ``datetime``'s range (rows loaded with one are not cached, commits invalidate)."""
    if (
        type(v) is dt.datetime
        and v.tzinfo is not None
        and not _ZONED_SPAN[0] <= v.replace(tzinfo=None) <= _ZONED_SPAN[1]
    ):
        raise EncodeError("an instant within a day of year 1 or 9999 (not in every time zone)")
    return _enc_datetime(v)


def _dec_datetime(v: Any) -> Any:
    try:
        if type(v) is str:
            value = dt.datetime.fromisoformat(v)
            if value.tzinfo is not None:
                raise DecodeError("naive datetime expected")
            return value
        if type(v) is list and len(v) == 3 and type(v[0]) is str:
            naive = dt.datetime.fromisoformat(v[0])
            zone = v[1]
            if type(zone) is str:
                tz: dt.tzinfo = zoneinfo.ZoneInfo(zone)
            elif type(zone) is int:
                tz = dt.timezone(dt.timedelta(microseconds=zone))
            else:
                raise _fail("time zone", zone)
            return naive.replace(tzinfo=tz, fold=int(v[2]) and 1)
    except (ValueError, zoneinfo.ZoneInfoNotFoundError) as exc:
        raise DecodeError(str(exc)) from exc
    raise _fail("datetime", v)


def _enc_iso(expected: type) -> Callable[[Any], Any]:
    def enc(v: Any) -> Any:
        if type(v) is not expected or getattr(v, "tzinfo", None) is not None:
            raise EncodeError(f"expected naive {expected.__name__}, got {v!r}")
        return v.isoformat()  # type: ignore[attr-defined]

    return enc


#: decoders whose value stored as a str is ``convert(value)``, a call into C that the generated
#: row decoder (see model._RowCodec) makes inline, without the decoder's own Python frame;
#: ``naive``: the result must carry no time zone, as the decoder checks. Any other stored value
#: goes to the decoder itself, and a ValueError (decimal's InvalidOperation) of ``convert`` is a
#: DecodeError there as here.
STR_DECODERS: dict[Callable[[Any], Any], tuple[Callable[[str], Any], bool]] = {
    _dec_decimal: (decimal.Decimal, False),
    _dec_datetime: (dt.datetime.fromisoformat, True),
}


def _dec_iso(expected: Any) -> Callable[[Any], Any]:
    parse = expected.fromisoformat

    def dec(v: Any) -> Any:
        if type(v) is not str:
            raise _fail("str", v)
        try:
            value = parse(v)
        except ValueError as exc:
            raise DecodeError(str(exc)) from exc
        if type(value) is not expected:
            raise _fail(expected.__name__, value)
        return value

    return dec


def _enc_interval(v: Any) -> Any:
    if type(v) is not dt.timedelta:
        raise EncodeError(f"expected timedelta, got {type(v).__name__}")
    return [v.days, v.seconds, v.microseconds]


def _dec_interval(v: Any) -> Any:
    if type(v) is not list or len(v) != 3 or any(type(p) is not int for p in v):
        raise _fail("interval", v)
    return dt.timedelta(days=v[0], seconds=v[1], microseconds=v[2])


def _enc_uuid(v: Any) -> Any:
    # a subclass too: asyncpg returns its own (asyncpg.pgproto.pgproto.UUID)
    if not isinstance(v, uuid.UUID):
        raise EncodeError(f"expected UUID, got {type(v).__name__}")
    return v.bytes


def _dec_uuid(v: Any) -> Any:
    if type(v) is not bytes or len(v) != 16:
        raise _fail("16 bytes", v)
    return uuid.UUID(bytes=v)


def _dec_uuid_for(dialect: Dialect) -> Callable[[Any], Any]:
    """The decoder giving a UUID of the class the dialect's driver returns: asyncpg's own
    (``asyncpg.pgproto.pgproto.UUID``, a ``uuid.UUID`` subclass built from the 16 bytes)
    on asyncpg, ``uuid.UUID`` elsewhere."""
    if getattr(dialect, "driver", None) != "asyncpg":
        return _dec_uuid
    try:
        make: Callable[[bytes], Any] = importlib.import_module("asyncpg.pgproto.pgproto").UUID
    except (ImportError, AttributeError):  # pragma: no cover - the dialect's own driver
        return _dec_uuid
    IMMUTABLE.add(cast(type, make))  # as immutable as uuid.UUID

    def dec(v: Any) -> Any:
        if type(v) is not bytes or len(v) != 16:
            raise _fail("16 bytes", v)
        return make(v)

    return dec


def _exact_uuid(v: Any, ctx: FlushContext) -> Any:
    return v if isinstance(v, uuid.UUID) else NOT_EXACT


def _enc_bytes(v: Any) -> Any:
    if type(v) is not bytes:
        raise EncodeError(f"expected bytes, got {type(v).__name__}")
    return v


def _json_ok(v: Any, depth: int = 0) -> bool:
    if depth > 64:
        return False
    if type(v) is int:
        return -(2**63) <= v < 2**64  # what msgpack can store
    if v is None or type(v) in (bool, float, str):
        return True
    # subclasses too: a load hands sqlalchemy.ext.mutable's MutableDict and MutableList
    if isinstance(v, list):
        return all(_json_ok(i, depth + 1) for i in v)
    if isinstance(v, dict):
        return all(type(k) is str and _json_ok(i, depth + 1) for k, i in v.items())
    return False


def _enc_json(v: Any) -> Any:
    if not _json_ok(v):
        raise EncodeError("not a plain JSON document")
    return v


def _dec_json(v: Any) -> Any:
    if not _json_ok(v):
        raise DecodeError("not a plain JSON document")
    return v


# --- JSON: what a load returns is deserialize(the text the database gives back) ------------


class _Unpredictable(Exception):
    """A JSON value whose stored form the cache does not predict (the database may refuse it)."""


class _Numeric(str):
    """A JSON number as PostgreSQL's ``numeric`` prints it."""

    __slots__ = ()


#: PostgreSQL numeric limits (digits after the point, before it); beyond them it refuses
_NUMERIC_SCALE_MAX = 16383
_NUMERIC_WEIGHT_MAX = 131072


def _jsonb_number(token: str) -> _Numeric:
    """``1e+20`` is kept as ``100000000000000000000``, ``1.5e-7`` as ``0.00000015``,
    ``-0.0`` as ``0.0``: plain notation, the digits after the point the token had (its scale)."""
    number = decimal.Decimal(token)
    exponent = number.as_tuple().exponent
    if not isinstance(exponent, int) or not (
        -_NUMERIC_SCALE_MAX <= exponent <= _NUMERIC_WEIGHT_MAX - len(number.as_tuple().digits)
    ):
        raise _Unpredictable(token)
    text = format(number, "f")
    return _Numeric(text[1:] if number.is_zero() and text[0] == "-" else text)


def _jsonb_key(key: str) -> tuple[int, bytes]:
    raw = key.encode()
    return len(raw), raw


def _jsonb_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """jsonb keeps the last of duplicate keys, and orders keys shorter first, then bytewise."""
    last = dict(pairs)
    return {k: last[k] for k in sorted(last, key=_jsonb_key)}


def _jsonb_refuse(token: str) -> Any:
    raise _Unpredictable(token)  # NaN, Infinity: PostgreSQL refuses them


_dumps_str = json.JSONEncoder(ensure_ascii=False).encode


def _jsonb_text(v: Any) -> str:
    """The text PostgreSQL prints for a parsed jsonb value (``{"a": 1, "b": [true, null]}``)."""
    if type(v) is _Numeric:
        return v
    if type(v) is str:
        if "\x00" in v:
            raise _Unpredictable("NUL")  # jsonb refuses \u0000
        return _dumps_str(v)
    if type(v) is dict:
        return "{" + ", ".join(f"{_jsonb_text(k)}: {_jsonb_text(x)}" for k, x in v.items()) + "}"
    if type(v) is list:
        return "[" + ", ".join(_jsonb_text(x) for x in v) + "]"
    if v is None:
        return "null"
    if v is True:
        return "true"
    if v is False:
        return "false"
    raise _Unpredictable(type(v).__name__)


_JSON_FAILURES = (ValueError, TypeError, RecursionError, UnicodeError, decimal.InvalidOperation)


def _exact_json(binary: bool, dumps: Callable[[Any], str], loads: Callable[[str], Any]) -> Exact:
    """Predict a JSON column's load from the engine's own serializer and deserializer.

    * PostgreSQL ``json``, MariaDB, SQLite keep the text sent: ``loads(dumps(v))``;
    * PostgreSQL ``jsonb`` parses it: keys reordered and deduplicated, numbers kept as
      ``numeric`` (so ``1e+20`` comes back as an int): the text it prints is rebuilt here;
    * SQLite gives the column NUMERIC affinity: a document that is a single number is stored
      as an INTEGER (``1.0`` comes back as ``1``) or a REAL;
    * MariaDB: only ASCII text (``json.dumps``'s default), since a column or connection
      character set may change other characters; MySQL normalises its JSON type: never.
    """

    def ex(v: Any, ctx: FlushContext) -> Any:
        name = ctx.name
        if v is _JSON_NULL:
            v = None
        try:
            text = dumps(v)
            if name == "postgresql":
                if not binary:
                    return loads(text)
                parsed = json.loads(
                    text,
                    object_pairs_hook=_jsonb_object,
                    parse_float=_jsonb_number,
                    parse_int=_jsonb_number,
                    parse_constant=_jsonb_refuse,
                )
                return loads(_jsonb_text(parsed))
            if name == "sqlite" and not binary:
                return _sqlite_affinity(loads(text))
            if name in ("mysql", "mariadb") and ctx.is_mariadb and text.isascii():
                return loads(text)
        except (_Unpredictable, *_JSON_FAILURES):
            pass
        return NOT_EXACT

    return ex


def _sqlite_affinity(v: Any) -> Any:
    """A document that is one number, as SQLite's NUMERIC affinity stores its text: an
    INTEGER when the number is integral and fits 64 bits (``1.0`` is loaded as ``1``), else a
    REAL from SQLite's own text conversion, which is not always correctly rounded (it is for
    the integral floats below 2**64, exact in its extended precision): others are not predicted.
    """
    kind = type(v)
    if kind is int:
        return v if -(2**63) <= v < 2**63 else NOT_EXACT
    if kind is float:
        if not v.is_integer() or not -(2**64) < v < 2**64:
            return NOT_EXACT
        return int(v) if -(2**63) < v < 2**63 else v
    return v


_JSON_NULL = sqltypes.JSON.NULL


def _json_codec(t: Any, dialect: Dialect) -> ColumnCodec:
    # the type this database gets, so that JSON().with_variant(JSONB(), "postgresql") is jsonb
    binary = getattr(t.dialect_impl(dialect), "__visit_name__", "") == "JSONB"
    dumps, loads = json_functions(dialect)
    if binary:
        never = Never(
            "SQLite's JSONB is read back through json(), which reformats it; use JSON",
            lambda name, is_mariadb: name == "sqlite",
        )
    else:
        never = Never(
            "MySQL normalises its JSON type (key order, numbers); store the text in a Text "
            "column through a TypeDecorator",
            lambda name, is_mariadb: name in ("mysql", "mariadb") and not is_mariadb,
        )
    return ColumnCodec(
        "json", _enc_json, _dec_json, _exact_json(binary, dumps, loads), never, mutable=True
    )


# --- exactness: what the database returns for a value a flush sent -----------------------


def _never(v: Any, ctx: FlushContext) -> Any:
    return NOT_EXACT


def _exact_type(expected: type) -> Exact:
    def ex(v: Any, ctx: FlushContext) -> Any:
        return v if type(v) is expected else NOT_EXACT

    return ex


def _exact_bool(v: Any, ctx: FlushContext) -> Any:
    if type(v) is bool:
        return v
    if type(v) is int and v in (0, 1):
        return bool(v)
    return NOT_EXACT


#: the bytes MySQL's text types hold (``TEXT`` for a ``Text()`` without a length)
_MYSQL_TEXT_BYTES = {"TINYTEXT": 255, "TEXT": 65535, "MEDIUMTEXT": 16777215}


def _exact_str(
    length: int | None, mysql_bytes: int | None = None, charset: str | None = None
) -> Exact:
    """A string as written, unless longer than the column: refused, or cut by a lenient
    MySQL ``sql_mode`` (its characters, or, for a text type without a length, its bytes in
    the column's character set); on MySQL, unless a character is one the column's declared
    character set cannot hold (a lenient ``sql_mode`` stores ``?`` for it)."""
    holds = _mysql_charset_holds(charset)
    # (most string columns have a length and no character set: nothing more to check)
    checks_mysql = holds is not None or mysql_bytes is not None

    def ex(v: Any, ctx: FlushContext) -> Any:
        if type(v) is not str:
            return NOT_EXACT
        if length is not None and len(v) > length:
            return NOT_EXACT  # truncated by a lenient MySQL sql_mode, or an error
        if checks_mysql and ctx.name in ("mysql", "mariadb"):
            if holds is not None and not holds(v):
                return NOT_EXACT
            if (
                mysql_bytes is not None
                and len(v) * 4 > mysql_bytes
                and _mysql_bytes(v, charset) > mysql_bytes
            ):
                return NOT_EXACT
        return v

    return ex


#: bytes per character of the MySQL character sets of a fixed width
_MYSQL_CHARSET_WIDTH = {"ucs2": 2, "utf32": 4}

#: the MySQL character sets that hold every character (a lenient ``sql_mode`` stores ``?``
#: for none); the catalog question of databases.py asks for the columns in any other
MYSQL_WHOLE_UNICODE = ("utf8mb4", "utf16", "utf16le", "utf32")


def _mysql_bytes(v: str, charset: str | None) -> int:
    """The bytes ``v`` takes in a MySQL character set: ``utf16`` 2 or 4 a character, the sets
    of a fixed width that; the rest counted in UTF-8, which takes at least as many bytes for
    every character they hold."""
    if charset in ("utf16", "utf16le"):
        return len(v.encode("utf-16-le", "surrogatepass"))
    if charset in _MYSQL_CHARSET_WIDTH:
        return len(v) * _MYSQL_CHARSET_WIDTH[charset]
    return len(v.encode("utf-8", "surrogatepass"))


#: the names MySQL 8.0's and MariaDB's catalogs give character sets a model may name otherwise
_MYSQL_CATALOG_CHARSET_NAMES = {"utf8": "utf8mb3"}


def _mysql_charset_name(declared: str) -> str:
    """A declared character set by the name the catalog lists it under: lower-cased, and
    MySQL's ``utf8`` is ``utf8mb3``."""
    name = declared.lower()
    return _MYSQL_CATALOG_CHARSET_NAMES.get(name, name)


def _mysql_charset(type_: Any) -> str | None:
    """The character set a MySQL string column is declared with, by its catalog name: its type's
    ``charset``, ``national`` (utf8mb3), ``ascii`` (latin1), ``unicode`` (ucs2), or the one
    its ``collation`` names (``latin1_swedish_ci``); None when undeclared (the table's or the
    database's, utf8mb4 by default since MySQL 8.0)."""
    charset = getattr(type_, "charset", None)
    if charset is None:
        if getattr(type_, "national", False) or isinstance(
            type_, (sqltypes.NVARCHAR, sqltypes.NCHAR)
        ):
            return "utf8mb3"
        if getattr(type_, "ascii", False):
            return "latin1"
        if getattr(type_, "unicode", False):
            return "ucs2"
        collation = getattr(type_, "collation", None)
        if collation:
            charset = str(collation).split("_", 1)[0]
    return _mysql_charset_name(str(charset)) if charset else None


#: the MySQL table options (``mysql_charset=...`` or ``mariadb_...`` in ``__table_args__``)
#: that give its columns' character set, the first found deciding
_TABLE_CHARSET_OPTIONS = ("charset", "character_set", "default_charset", "default_character_set")
_TABLE_COLLATION_OPTIONS = ("collate", "default_collate")


def _mysql_table_charset(column: Any) -> str | None:
    """The character set a column's table declares for MySQL, or the one its collation
    names, by its catalog name; None when it declares neither."""
    options = getattr(getattr(column, "table", None), "kwargs", None) or {}
    for prefix in ("mysql_", "mariadb_"):
        for name in _TABLE_CHARSET_OPTIONS:
            if options.get(prefix + name):
                return _mysql_charset_name(str(options[prefix + name]))
        for name in _TABLE_COLLATION_OPTIONS:
            if options.get(prefix + name):
                return _mysql_charset_name(str(options[prefix + name]).split("_", 1)[0])
    return None


def declared_mysql_charset(column: Any, dialect: Dialect) -> str | None:
    """The MySQL character set a column's model declares for it (its type's, else its
    table's), by its catalog name, as :func:`_column_codec` finds the type whose codec checks
    values against it; None when it declares none."""
    type_ = type_on(column.type, dialect.name)
    if isinstance(type_, sqltypes.TypeDecorator) and not isinstance(type_, sqltypes.Interval):
        type_ = type_.load_dialect_impl(dialect)
    return _mysql_charset(type_) or _mysql_table_charset(column)


def _mysql_charset_holds(charset: str | None) -> Callable[[str], bool] | None:
    """Whether a MySQL character set holds every character of a string (None: it holds all
    of them). A character set not known here is trusted with ASCII only."""
    if charset is None or charset in MYSQL_WHOLE_UNICODE:
        return None
    if charset in ("utf8mb3", "ucs2"):  # the BMP only (a declared utf8 arrives as utf8mb3)
        return lambda v: v.isascii() or max(v) <= "\uffff"
    if charset == "latin1":
        # MySQL's latin1 is cp1252: its 0x80-0x9F are not ISO-8859-1's; trust the rest
        return lambda v: v.isascii() or all(c < "\x80" or "\xa0" <= c <= "\xff" for c in v)
    return str.isascii


def _exact_int(bits: int, unsigned: bool) -> Exact:
    """An int in the column's range; on MySQL, a value beyond it is refused, or clipped to
    the range by a lenient ``sql_mode`` (PostgreSQL refuses it; SQLite stores 64 bits)."""
    low, high = (0, 2**bits - 1) if unsigned else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)

    def ex(v: Any, ctx: FlushContext) -> Any:
        if type(v) is not int:
            return NOT_EXACT
        if not low <= v <= high and ctx.name in ("mysql", "mariadb"):
            return NOT_EXACT
        return v

    return ex


#: the bits of MySQL's integer types (SQLAlchemy's Integer is INT, 32 bits)
_INT_BITS = {"TINYINT": 8, "SMALLINT": 16, "MEDIUMINT": 24, "BIGINT": 64}


def _exact_char(length: int, national: bool, charset: str | None = None) -> Exact:
    """CHAR(n): PostgreSQL and MySQL pad a shorter value with spaces (MySQL strips trailing
    spaces on the way out instead), so a value of exactly n characters is what a load returns
    there (on MySQL one that does not end in a space, of characters its character set
    holds); SQLite stores text as given."""
    holds = _mysql_charset_holds(charset)

    def ex(v: Any, ctx: FlushContext) -> Any:
        if type(v) is not str or len(v) > length:
            return NOT_EXACT
        name = ctx.name
        if name == "sqlite":
            return v
        if len(v) != length:
            return NOT_EXACT  # padded with spaces
        if name == "postgresql":
            return v
        if name in ("mysql", "mariadb") and not national and not v.endswith(" "):
            # (NCHAR is utf8mb3 there: a character beyond the BMP is refused or replaced)
            return v if holds is None or holds(v) else NOT_EXACT
        return NOT_EXACT

    return ex


def _exact_float(double: bool) -> Exact:
    def ex(v: Any, ctx: FlushContext) -> Any:
        if ctx.name not in ("postgresql", "sqlite") or not double:
            return NOT_EXACT  # MySQL FLOAT is single precision and prints rounded
        if type(v) is int and abs(v) < 2**53:
            v = float(v)
        if type(v) is not float or v != v or v in (float("inf"), float("-inf")):
            return NOT_EXACT
        if v == 0 and ctx.name == "sqlite":
            return 0.0  # SQLite stores a zero REAL as the integer 0: no negative zero
        if v == 0 and ctx.dialect.driver == "psycopg2" and math.copysign(1.0, v) < 0:
            # psycopg2 writes the literal " -0.0" into the statement: the negation of a
            # numeric zero, stored as 0.0 unless a cast binds first (a negative zero then)
            return NOT_EXACT
        return v

    return ex


_ONE = decimal.Decimal(1)

#: the digits a PostgreSQL NUMERIC without a precision holds (before and after the point)
_NUMERIC_DIGITS_MAX = _NUMERIC_WEIGHT_MAX + _NUMERIC_SCALE_MAX


def _decimal_context(precision: int) -> decimal.Context:
    """The arithmetic of a column's predictions, never the thread's context: an application's
    own (a money service trapping ``Inexact``, a low ``prec``) made a commit of a value the
    database rounds raise ``decimal.Inexact`` out of ``session.commit()``. The column's digits
    (a value beyond them raises ``InvalidOperation``: not predicted, as the database refuses
    it or, in MySQL's lenient modes, clips it), rounding half away from zero as PostgreSQL and
    MySQL do."""
    return decimal.Context(
        prec=precision,
        rounding=decimal.ROUND_HALF_UP,
        Emax=decimal.MAX_EMAX,
        Emin=decimal.MIN_EMIN,
        traps=[decimal.InvalidOperation],
    )


#: a context in which a number of PostgreSQL's is written out whole (no digits limit of a
#: column's: NUMERIC(2, -3)'s 12000 has five)
_WHOLE_NUMBERS = _decimal_context(_NUMERIC_DIGITS_MAX)


def _exact_decimal(
    precision: int | None, scale: int | None, return_scale: int, unsigned: bool = False
) -> Exact:
    """What PostgreSQL and MySQL store of a Decimal in the column SQLAlchemy creates for
    ``Numeric(precision, scale)``: ``NUMERIC(p, s)``; ``NUMERIC(p)``, whose scale is 0; or,
    without a precision, ``NUMERIC``: unconstrained on PostgreSQL (the value as given), and
    ``DECIMAL(10, 0)`` on MySQL, whatever the scale said (not predicted there); a scale
    without a precision is not predicted anywhere. A negative value in MySQL's ``UNSIGNED``
    (or ``ZEROFILL``) DECIMAL is refused, or made 0 in a lenient ``sql_mode``: not predicted.
    SQLite stores a float."""
    context = _decimal_context(precision if precision is not None else _NUMERIC_DIGITS_MAX)
    quantum = _ONE.scaleb(-(scale or 0), context=context) if precision is not None else None
    fmt = f"%.{return_scale}f"

    def ex(v: Any, ctx: FlushContext) -> Any:
        if type(v) is int:
            v = decimal.Decimal(v)
        if not isinstance(v, decimal.Decimal) or not v.is_finite():
            return NOT_EXACT
        if ctx.name == "sqlite":
            # bound as a float; SQLAlchemy formats the stored REAL with the return scale
            # (SQLite keeps a zero REAL as the integer 0, so there is no negative zero)
            as_float = float(v)
            return decimal.Decimal(fmt % (as_float if as_float != 0 else 0.0))
        if ctx.name not in ("postgresql", "mysql", "mariadb"):
            return NOT_EXACT
        if unsigned and v < 0:
            return NOT_EXACT
        try:
            if quantum is None:
                if ctx.name != "postgresql" or scale is not None:
                    return NOT_EXACT
                if v.as_tuple().exponent > 0:  # type: ignore[operator]
                    v = v.quantize(_ONE, context=context)  # PostgreSQL returns 1.2E+3 as 1200
                return v.copy_abs() if v.is_zero() else v
            rounded = v.quantize(quantum, context=context)
            if scale is not None and scale < 0:  # NUMERIC(2, -3) returns 12000, not 1.2E+4
                rounded = rounded.quantize(_ONE, context=_WHOLE_NUMBERS)
        except decimal.InvalidOperation:
            return NOT_EXACT
        return rounded.copy_abs() if rounded.is_zero() else rounded  # no "-0.00" in SQL

    return ex


def _pg_precision(t: Any) -> int | None:
    """The fractional digits of seconds a PostgreSQL ``TIMESTAMP(p)``, ``TIME(p)`` or
    ``INTERVAL(p)`` keeps (``Interval(second_precision=p)`` is created as ``INTERVAL(p)``),
    when fewer than 6: it rounds the rest."""
    found = getattr(t, "precision", None)
    if found is None:
        found = getattr(t, "second_precision", None)
    return found if type(found) is int and found < 6 else None


def _rounded_by_postgresql(microsecond: int, precision: int | None) -> bool:
    """Whether PostgreSQL rounds these microseconds away (the cache does not predict how)."""
    return precision is not None and microsecond % 10 ** (6 - precision) != 0


#: the wall times a MySQL TIMESTAMP surely holds whatever the session's time zone (its range
#: is 1970-01-01 00:00:01 to 2038-01-19 03:14:07 UTC): beyond them a lenient ``sql_mode``
#: stores the zero date
_MYSQL_TIMESTAMP_SPAN = (dt.datetime(1970, 1, 2), dt.datetime(2038, 1, 18))


def _sqlite_round_trip(t: Any) -> Callable[[Any], Any] | None:
    """SQLite's own ``DATETIME``, ``DATE`` and ``TIME`` store the text their bind processor
    formats, which a load parses back: one declared with a ``storage_format`` or
    ``truncate_microseconds`` of its own drops what its format leaves out (the seconds, the
    microseconds). Its values are predicted by that round trip; None for other types, whose
    format keeps every digit."""
    from sqlalchemy.dialects import sqlite

    if not isinstance(t, (sqlite.DATETIME, sqlite.DATE, sqlite.TIME)):
        return None
    dialect = sqlite.dialect()
    bind = t.bind_processor(dialect)
    result = t.result_processor(dialect, None)
    if bind is None or result is None:
        return None

    def round_trip(v: Any) -> Any:
        try:
            return result(bind(v))
        except (ValueError, TypeError, AttributeError):  # a format that cannot read itself
            return NOT_EXACT

    return round_trip


def _exact_date(sqlite_stored: Callable[[Any], Any] | None) -> Exact:
    def ex(v: Any, ctx: FlushContext) -> Any:
        if type(v) is not dt.date:
            return NOT_EXACT
        return sqlite_stored(v) if sqlite_stored is not None and ctx.name == "sqlite" else v

    return ex


def _exact_datetime(
    timezone: bool,
    fsp: int | None,
    pg_precision: int | None = None,
    mysql_timestamp: bool = False,
    sqlite_stored: Callable[[Any], Any] | None = None,
) -> Exact:
    def ex(v: Any, ctx: FlushContext) -> Any:
        if type(v) is not dt.datetime:
            return NOT_EXACT
        name = ctx.name
        if name == "postgresql":
            if _rounded_by_postgresql(v.microsecond, pg_precision):
                return NOT_EXACT
            if not timezone:
                return v if v.tzinfo is None else NOT_EXACT
            tz = ctx.pg_timezone() if v.tzinfo is not None else None
            if tz is None:
                return NOT_EXACT
            if not _ZONED_SPAN[0] <= v.replace(tzinfo=None) <= _ZONED_SPAN[1]:
                return NOT_EXACT  # (not stored: see _enc_zoned_datetime)
            try:
                return v.astimezone(tz)
            except OverflowError:  # year 1 / 9999 shifted out of datetime's range
                return NOT_EXACT
        if v.tzinfo is not None:
            v = v.replace(tzinfo=None)  # SQLite and MySQL keep the wall time, drop the zone
        if name == "sqlite":
            return v if sqlite_stored is None else sqlite_stored(v)
        if name in ("mysql", "mariadb"):
            if mysql_timestamp and not _MYSQL_TIMESTAMP_SPAN[0] <= v <= _MYSQL_TIMESTAMP_SPAN[1]:
                return NOT_EXACT
            if fsp == 6 or v.microsecond == 0:
                return v
            if not fsp and ctx.is_mariadb:
                return v.replace(microsecond=0)  # MariaDB truncates; MySQL rounds
        return NOT_EXACT

    return ex


def _exact_time(
    fsp: int | None,
    pg_precision: int | None = None,
    timezone: bool = False,
    sqlite_stored: Callable[[Any], Any] | None = None,
) -> Exact:
    def ex(v: Any, ctx: FlushContext) -> Any:
        if type(v) is not dt.time or v.tzinfo is not None:
            return NOT_EXACT
        if ctx.name == "postgresql":
            # TIME WITH TIME ZONE: loaded with the session's offset, which v has not
            if timezone or _rounded_by_postgresql(v.microsecond, pg_precision):
                return NOT_EXACT
            return v
        if ctx.name == "sqlite":
            return v if sqlite_stored is None else sqlite_stored(v)
        if ctx.name in ("mysql", "mariadb"):
            if fsp == 6 or v.microsecond == 0:
                return v
            if not fsp and ctx.is_mariadb:
                return v.replace(microsecond=0)
        return NOT_EXACT

    return ex


def _exact_interval(fields: str | None, pg_precision: int | None) -> Exact:
    """A timedelta, as PostgreSQL's INTERVAL keeps it; not one restricted to ``fields``
    (``INTERVAL DAY`` drops the hours) or whose seconds it rounds."""

    def ex(v: Any, ctx: FlushContext) -> Any:
        if type(v) is not dt.timedelta or ctx.name != "postgresql" or fields is not None:
            return NOT_EXACT
        return NOT_EXACT if _rounded_by_postgresql(v.microseconds, pg_precision) else v

    return ex


#: the bytes MySQL's BLOB types hold (``BLOB`` for a ``LargeBinary()`` without a length)
_MYSQL_BLOB_BYTES = {"TINYBLOB": 255, "BLOB": 65535, "MEDIUMBLOB": 2**24 - 1, "LONGBLOB": 2**32 - 1}


def _exact_bytes(length: int | None, fixed: bool) -> Exact:
    """What a load returns of bytes written to a binary column: as given, but on MySQL a
    ``BINARY(n)`` pads a shorter value with zero bytes, and a value longer than the column
    (``VARBINARY(n)``, the bytes its BLOB type holds) is refused, or cut in a lenient
    ``sql_mode``. PostgreSQL's BYTEA and SQLite have no length (nor a ``BINARY`` type, on
    PostgreSQL)."""

    def ex(v: Any, ctx: FlushContext) -> Any:
        if not isinstance(v, (bytes, bytearray, memoryview)):
            return NOT_EXACT
        try:
            v = bytes(v)
        except ValueError:  # a released memoryview
            return NOT_EXACT
        if ctx.name not in ("mysql", "mariadb"):
            return v
        if length is not None and len(v) > length:
            return NOT_EXACT
        if fixed and length is not None:
            return v.ljust(length, b"\0")
        return v

    return ex


def _exact_enum(enum_class: type[enum.Enum] | None, values: Sequence[str]) -> Exact:
    if enum_class is not None:
        members = enum_class.__members__

        def ex(v: Any, ctx: FlushContext) -> Any:
            if isinstance(v, enum_class):
                return v
            if type(v) is str and v in members:
                return members[v]
            return NOT_EXACT

        return ex
    allowed = frozenset(values)

    def ex_str(v: Any, ctx: FlushContext) -> Any:
        return v if type(v) is str and v in allowed else NOT_EXACT

    return ex_str


def _array_codec(t: Any, where: str, dialect: Dialect) -> ColumnCodec:
    """One-dimensional ARRAY of a scalar type: a msgpack list of the element codec's values.
    NULL elements are kept; a nested list (more dimensions) is never stored."""
    if t.dimensions not in (None, 1):
        raise ConfigurationError(
            f"{where}: multi-dimensional ARRAY columns are not cached; add the column to `exclude`"
        )
    item = _base_codec(type_on(t.item_type, dialect.name), where, dialect)
    item_encode, item_decode, item_exact = item.encode, item.decode, item.exact

    def enc(v: Any) -> Any:
        if type(v) is not list:
            raise EncodeError("an ARRAY value is a list")
        return [None if x is None else item_encode(x) for x in v]

    def dec(v: Any) -> Any:
        if type(v) is not list:
            raise _fail("list", v)
        return [None if x is None else item_decode(x) for x in v]

    def ex(v: Any, ctx: FlushContext) -> Any:
        if ctx.name != "postgresql" or type(v) not in (list, tuple):
            return NOT_EXACT
        out: list[Any] = []
        for x in v:
            if x is None:
                out.append(None)
                continue
            if type(x) in (list, tuple):
                return NOT_EXACT
            predicted = item_exact(x, ctx)
            if predicted is NOT_EXACT:
                return NOT_EXACT
            out.append(predicted)
        return out

    if item.kind == "json":  # an element's text is not the document the driver hands back
        never = Never("an ARRAY of JSON is not predicted; use one JSON column holding a list")
        return ColumnCodec("array[json]", *_nullable(enc, dec, _never), never, mutable=True)
    return ColumnCodec(f"array[{item.kind}]", *_nullable(enc, dec, ex), item.never, mutable=True)


# --- choosing a codec from a column's type -------------------------------------------------


def _mysql_fsp(type_: Any) -> int | None:
    fsp = getattr(type_, "fsp", None)
    return fsp if isinstance(fsp, int) else None


def _mysql_unsigned(type_: Any) -> bool:
    """A MySQL number type declared ``unsigned``, or ``zerofill`` (which makes it unsigned)."""
    return bool(getattr(type_, "unsigned", False) or getattr(type_, "zerofill", False))


def _type_name(type_: Any) -> str:
    """The type's SQL name as its dialect's class says it (``__visit_name__``, upper-cased:
    ``MEDIUMBLOB``, ``TSVECTOR``), for types of a database's own that are not imported here."""
    return str(getattr(type_, "__visit_name__", "")).upper()


#: PostgreSQL types (by ``__visit_name__``) whose values the database rewrites on the way in,
#: so a commit cannot predict what a load returns: loads fill, commits invalidate. Why, each.
_NORMALISED_BY_POSTGRESQL = {
    "TSVECTOR": "PostgreSQL normalises a tsvector (its lexemes sorted, their positions merged)",
    "INET": "PostgreSQL normalises a network address ('10.0.0.01' is stored as '10.0.0.1')",
    "CIDR": "PostgreSQL normalises a network address ('10.0.0.01' is stored as '10.0.0.1')",
    "MACADDR": "PostgreSQL normalises a MAC address (to lower-case, colon-separated)",
    "MACADDR8": "PostgreSQL normalises a MAC address (to lower-case, colon-separated)",
    "HSTORE": "PostgreSQL orders an hstore's keys its own way",
}

#: what an INET or CIDR value loads as: text (psycopg2), or an ``ipaddress`` object (psycopg
#: 3, asyncpg); stored as "tag|text", decoded as the same class
_NETWORK_CLASSES: dict[str, type] = {
    "s": str,
    "a4": ipaddress.IPv4Address,
    "a6": ipaddress.IPv6Address,
    "i4": ipaddress.IPv4Interface,
    "i6": ipaddress.IPv6Interface,
    "n4": ipaddress.IPv4Network,
    "n6": ipaddress.IPv6Network,
}
_NETWORK_TAGS = {cls: tag for tag, cls in _NETWORK_CLASSES.items()}


def _enc_network(v: Any) -> Any:
    tag = _NETWORK_TAGS.get(type(v))
    if tag is None:
        raise EncodeError(f"expected a network address, got {type(v).__name__}")
    return f"{tag}|{v}"


def _dec_network(v: Any) -> Any:
    if type(v) is not str:
        raise _fail("str", v)
    tag, _, text = v.partition("|")
    cls = _NETWORK_CLASSES.get(tag)
    if cls is None:
        raise DecodeError(f"bad network address {v!r}")
    try:
        return cls(text)
    except ValueError as exc:
        raise DecodeError(f"bad network address {v!r}") from exc


def _enc_hstore(v: Any) -> Any:
    """A dict of str to str or None (a ``MutableDict`` too: a load's value of a column the
    application made mutable), stored as a plain one."""
    if not isinstance(v, dict) or not all(
        type(k) is str and (x is None or type(x) is str) for k, x in v.items()
    ):
        raise EncodeError(f"expected a dict of str to str or None, got {type(v).__name__}")
    return dict(v)


def _dec_hstore(v: Any) -> Any:
    if type(v) is not dict:
        raise _fail("dict", v)
    return dict(v)


def _domain_data_type(t: Any) -> Any:
    """The data type of a PostgreSQL ``DOMAIN`` (None for another type): the database sends
    a domain's values as its data type's, and the drivers load them so; its checks only
    refuse values."""
    return getattr(t, "data_type", None) if _type_name(t) == "DOMAIN" else None


def _domain_type(t: Any, where: str) -> Any:
    """:func:`_domain_data_type`, but not one over ``DateTime(timezone=True)``: the cache
    moves such values to each reader's time zone by the column's declared type."""
    data_type = _domain_data_type(t)
    if data_type is None:
        return None
    if isinstance(data_type, sqltypes.DateTime) and data_type.timezone:
        raise ConfigurationError(
            f"{where}: a DOMAIN over a timestamp with time zone is not cached; declare the "
            "column DateTime(timezone=True), or add it to `exclude`"
        )
    return data_type


def _base_codec(
    type_: sqltypes.TypeEngine[Any], where: str, dialect: Dialect, table_charset: str | None = None
) -> ColumnCodec:
    """The codec of a type; ``table_charset`` is the MySQL character set of the column's table,
    where it declares one (a string column's own wins)."""
    t: Any = type_
    domain = _domain_type(t, where)
    if domain is not None:
        return _base_codec(domain, where, dialect, table_charset)
    if isinstance(t, sqltypes.PickleType):
        raise ConfigurationError(
            f"{where}: PickleType is never cached (the cache does not unpickle); "
            "add the column to `exclude`"
        )
    if isinstance(t, sqltypes.Boolean):
        return ColumnCodec("bool", *_nullable(_enc_type(bool), _dec_type(bool), _exact_bool))
    if isinstance(t, sqltypes.Enum):
        if t.enum_class is not None:
            enum_class = t.enum_class
            by_name = enum_class.__members__

            def enc_enum(v: Any) -> Any:
                if not isinstance(v, enum_class):
                    raise EncodeError(f"expected {enum_class.__name__}")
                return v.name

            def dec_enum(v: Any) -> Any:
                if type(v) is not str or v not in by_name:
                    raise _fail(enum_class.__name__, v)
                return by_name[v]

            return ColumnCodec("enum", *_nullable(enc_enum, dec_enum, _exact_enum(enum_class, ())))
        return ColumnCodec(
            "str", *_nullable(_enc_type(str), _dec_type(str), _exact_enum(None, t.enums))
        )
    if isinstance(t, sqltypes.Integer):
        if isinstance(t, sqltypes.SmallInteger):
            bits = 16
        elif isinstance(t, sqltypes.BigInteger):
            bits = 64
        else:
            bits = _INT_BITS.get(_type_name(t), 32)
        exact_int = _exact_int(bits, _mysql_unsigned(t))
        return ColumnCodec("int", *_nullable(_enc_int, _dec_type(int), exact_int))
    if isinstance(t, sqltypes.Float) and not t.asdecimal:
        precision = getattr(t, "precision", None)
        double = isinstance(t, sqltypes.Double) or precision is None or precision > 24
        if isinstance(t, sqltypes.REAL):
            double = False
        rounded = (
            Never("MySQL and MariaDB print floats rounded; use Numeric with a scale", _mysql_family)
            if double
            else Never("a single-precision float is rounded on the way in; use Double")
        )
        return ColumnCodec(
            "float", *_nullable(_enc_type(float), _dec_type(float), _exact_float(double)), rounded
        )
    if isinstance(t, sqltypes.Numeric):
        if not t.asdecimal:
            return ColumnCodec(
                "float",
                *_nullable(_enc_type(float), _dec_type(float), _never),
                Never("Numeric(asdecimal=False) is not predicted; use Numeric or Double"),
            )
        if isinstance(t, sqltypes.Float):
            exact: Exact = _never
            never: Never | None = Never(
                "Float(asdecimal=True) is not predicted; use Numeric with a scale, or Double"
            )
        else:
            return_scale = t.decimal_return_scale
            if return_scale is None:
                return_scale = t.scale if t.scale is not None else 10
            exact = _exact_decimal(t.precision, t.scale, return_scale, _mysql_unsigned(t))
            if t.precision is not None:
                never = None
            elif t.scale is not None:
                never = Never(
                    "a Numeric with a scale and no precision is created as NUMERIC, without the "
                    "scale (unconstrained on PostgreSQL, DECIMAL(10, 0) on MySQL); give it a "
                    "precision",
                    _server_database,
                )
            else:
                never = Never(
                    "a Numeric without a precision is created as NUMERIC, which MySQL makes "
                    "DECIMAL(10, 0); give it a precision and a scale",
                    _mysql_family,
                )
        dec = _dec_decimal_for(dialect)
        return ColumnCodec("decimal", *_nullable(_enc_decimal, dec, exact), never)
    if isinstance(t, sqltypes.DateTime):
        return ColumnCodec(
            "datetime",
            *_nullable(
                _enc_zoned_datetime if t.timezone else _enc_datetime,
                _dec_datetime,
                _exact_datetime(
                    bool(t.timezone),
                    _mysql_fsp(t),
                    _pg_precision(t),
                    isinstance(t, sqltypes.TIMESTAMP),  # TIMESTAMP on MySQL too
                    _sqlite_round_trip(t),
                ),
            ),
        )
    if isinstance(t, sqltypes.Date):
        return ColumnCodec(
            "date",
            *_nullable(_enc_iso(dt.date), _dec_iso(dt.date), _exact_date(_sqlite_round_trip(t))),
        )
    if isinstance(t, sqltypes.Time):
        exact = _exact_time(
            _mysql_fsp(t), _pg_precision(t), bool(t.timezone), _sqlite_round_trip(t)
        )
        zoned = Never(
            "PostgreSQL returns a TIME WITH TIME ZONE with the session's offset; use "
            "DateTime(timezone=True), or Time()",
            _postgresql,
        )
        return ColumnCodec(
            "time",
            *_nullable(_enc_iso(dt.time), _dec_iso(dt.time), exact),
            zoned if t.timezone else None,
        )
    if isinstance(t, ABSTRACT_INTERVAL):  # Interval and postgresql.INTERVAL
        fields = getattr(t, "fields", None)
        return ColumnCodec(
            "interval",
            *_nullable(_enc_interval, _dec_interval, _exact_interval(fields, _pg_precision(t))),
            Never("only PostgreSQL has an interval type (elsewhere: a datetime)", _not_postgresql)
            if fields is None
            else Never(f"PostgreSQL's INTERVAL {fields} drops the other fields"),
        )
    if isinstance(t, sqltypes.Uuid):
        if t.as_uuid:
            # a UUID stored as text (native_uuid=False) is made a uuid.UUID by SQLAlchemy
            dec = _dec_uuid_for(dialect) if getattr(t, "native_uuid", True) else _dec_uuid
            return ColumnCodec("uuid", *_nullable(_enc_uuid, dec, _exact_uuid))
        return ColumnCodec(
            "str",
            *_nullable(_enc_type(str), _dec_type(str), _never),
            Never("the database formats UUID strings; use Uuid(as_uuid=True)"),
        )
    if isinstance(t, sqltypes.ARRAY):
        return _array_codec(t, where, dialect)
    if isinstance(t, sqltypes.JSON):
        return _json_codec(t, dialect)
    if isinstance(t, (sqltypes.CHAR, sqltypes.NCHAR)):
        if t.length is None:  # CHAR(1) on most databases
            return ColumnCodec(
                "str",
                *_nullable(_enc_type(str), _dec_type(str), _never),
                Never("CHAR pads values with spaces; use String"),
            )
        # a fixed-width code (a country or currency code, a UUID's text) is written through
        charset = _mysql_charset(t) or table_charset
        exact = _exact_char(t.length, isinstance(t, sqltypes.NCHAR), charset)
        return ColumnCodec("str", *_nullable(_enc_type(str), _dec_type(str), exact))
    if isinstance(t, sqltypes.String):
        mysql_bytes = None
        if t.length is None:
            name = _type_name(t)
            if isinstance(t, sqltypes.Text) or name in _MYSQL_TEXT_BYTES:
                mysql_bytes = _MYSQL_TEXT_BYTES.get(name, _MYSQL_TEXT_BYTES["TEXT"])
        exact = _exact_str(t.length, mysql_bytes, _mysql_charset(t) or table_charset)
        return ColumnCodec("str", *_nullable(_enc_type(str), _dec_type(str), exact))
    if isinstance(t, sqltypes._Binary):
        fixed = isinstance(t, sqltypes.BINARY)  # MySQL's BINARY without a length: BINARY(1)
        length = t.length
        if length is None:
            name = _type_name(t)
            length = 1 if fixed else _MYSQL_BLOB_BYTES.get(name, _MYSQL_BLOB_BYTES["BLOB"])
        exact = _exact_bytes(length, fixed)
        return ColumnCodec("bytes", *_nullable(_enc_bytes, _dec_type(bytes), exact))
    name = _type_name(t)
    if name in _NORMALISED_BY_POSTGRESQL:
        # stored as a load returned it; a commit invalidates (see _NORMALISED_BY_POSTGRESQL)
        never = Never(_NORMALISED_BY_POSTGRESQL[name])
        if name in ("INET", "CIDR"):
            return ColumnCodec("network", *_nullable(_enc_network, _dec_network, _never), never)
        if name == "HSTORE":
            return ColumnCodec(
                "hstore", *_nullable(_enc_hstore, _dec_hstore, _never), never, mutable=True
            )
        return ColumnCodec("str", *_nullable(_enc_type(str), _dec_type(str), _never), never)
    raise ConfigurationError(
        f"{where}: the cache has no exact stored form for type {t!r}; "
        "add the column to `exclude` (it is then loaded from the database on access)"
    )


def inexact_reason(column: Column[Any], dialect: Dialect) -> str | None:
    """Why a commit of a typical value of ``column`` on ``dialect`` invalidates the row instead
    of writing it, or None when it writes through. This describes the ``exact`` rules of the
    codecs above, type by type in the same order; tests check the two agree."""
    type_: Any = type_on(column.type, dialect.name)
    transformed = sql_expression_reason(type_)
    if transformed is not None:
        return transformed
    if isinstance(type_, sqltypes.TypeDecorator) and not isinstance(type_, sqltypes.Interval):
        type_ = type_.load_dialect_impl(dialect)
    return _type_inexact_reason(type_, dialect)


def _type_inexact_reason(t: Any, dialect: Dialect) -> str | None:
    domain = _domain_data_type(t)
    if domain is not None:
        return _type_inexact_reason(domain, dialect)
    name = dialect.name
    mysql = name in ("mysql", "mariadb")
    if isinstance(t, (sqltypes.Boolean, sqltypes.Enum, sqltypes.Integer)):
        return None
    if isinstance(t, sqltypes.Float) and not t.asdecimal:
        precision = getattr(t, "precision", None)
        double = isinstance(t, sqltypes.Double) or precision is None or precision > 24
        if isinstance(t, sqltypes.REAL) or not double:
            return "single-precision float: the database rounds it"
        if name not in ("postgresql", "sqlite"):
            return f"float: {name} returns it rounded"
        return None
    if isinstance(t, sqltypes.Numeric):
        if not t.asdecimal:
            return "Numeric(asdecimal=False): the database rounds the float"
        if isinstance(t, sqltypes.Float):
            return "Float(asdecimal=True): the database rounds it"
        if name == "sqlite":
            return None
        if name != "postgresql" and not mysql:
            return f"Numeric: rounding on {name} is not known"
        if t.precision is None and t.scale is not None:
            return "Numeric with a scale and no precision: created as NUMERIC, without the scale"
        if mysql and t.precision is None:
            return f"Numeric without a precision: {name} makes it DECIMAL(10, 0)"
        return None
    if isinstance(t, (sqltypes.DateTime, sqltypes.Time)):
        kind = "DateTime" if isinstance(t, sqltypes.DateTime) else "Time"
        if name == "postgresql":
            # psycopg 3 tells the session's time zone; asyncpg always returns UTC; psycopg2
            # the offset of the session's zone, known when it is UTC or fixed (else a warning)
            known = dialect.driver in ("psycopg", "psycopg_async", "asyncpg", "psycopg2")
            if kind == "DateTime" and t.timezone and not known:
                return (
                    "DateTime(timezone=True): only psycopg 3, psycopg2 and asyncpg tell the "
                    "time zone of what they return"
                )
            if kind == "Time" and t.timezone:
                return "Time(timezone=True): returned with the session's offset"
            precision = _pg_precision(t)
            if precision is not None:
                return (
                    f"{kind} of precision {precision}: PostgreSQL rounds the fractional seconds "
                    "(a value with more digits invalidates)"
                )
            return None
        if name == "sqlite":
            return None
        if mysql:
            fsp = _mysql_fsp(t)
            if fsp == 6 or (not fsp and getattr(dialect, "is_mariadb", False)):
                return None
            return (
                f"{kind} without fsp=6: MySQL rounds microseconds (a value with them invalidates)"
            )
        return f"{kind}: what {name} returns is not known"
    if isinstance(t, sqltypes.Date):
        return None
    if isinstance(t, ABSTRACT_INTERVAL):
        if name != "postgresql":
            return f"Interval: {name} stores it as a datetime"
        fields = getattr(t, "fields", None)
        if fields is not None:
            return f"INTERVAL {fields}: PostgreSQL drops the other fields"
        precision = _pg_precision(t)
        if precision is not None:
            return (
                f"Interval of precision {precision}: PostgreSQL rounds the fractional seconds "
                "(a value with more digits invalidates)"
            )
        return None
    if isinstance(t, sqltypes.Uuid):
        return None if t.as_uuid else "Uuid(as_uuid=False): the database may reformat the string"
    if isinstance(t, sqltypes.ARRAY):
        if name != "postgresql":
            return f"ARRAY: not predicted on {name}"
        if isinstance(t.item_type, sqltypes.JSON):
            return "ARRAY of JSON: an element's text is not the document the driver returns"
        item = _type_inexact_reason(type_on(t.item_type, dialect.name), dialect)
        return None if item is None else f"ARRAY of {item}"
    if isinstance(t, sqltypes.JSON):  # the Never rules of _json_codec
        if getattr(t.dialect_impl(dialect), "__visit_name__", "") == "JSONB":
            return "JSONB on SQLite is read back reformatted" if name == "sqlite" else None
        if mysql and not getattr(dialect, "is_mariadb", False):
            return "JSON: MySQL normalises key order and numbers"
        return None
    if isinstance(t, (sqltypes.CHAR, sqltypes.NCHAR)):
        if t.length is None:
            return "CHAR pads the value with spaces"
        if name == "sqlite":
            return None
        return "CHAR pads a value shorter than its length with spaces"
    return _NORMALISED_BY_POSTGRESQL.get(_type_name(t))


class DecoratedCodec(ColumnCodec):
    """A TypeDecorator column: the cache stores the implementation's value, as the database
    does, and ``decode`` runs ``process_result_value`` exactly as a database load does."""

    __slots__ = ("_from_impl", "_inner", "_said", "_to_impl", "_where")

    def __init__(
        self,
        kind: str,
        inner: ColumnCodec,
        to_impl: Callable[[Any], Any],
        from_impl: Callable[[Any], Any],
        mutable: bool,
        where: str = "",
    ) -> None:
        inner_decode = inner.decode

        def decode(v: Any) -> Any:
            return from_impl(inner_decode(v))

        if inner.kind == "uuid":
            to_impl = _text_as_uuid(to_impl)

        super().__init__(kind, inner.encode, decode, inner.exact, inner.never, mutable)
        self._inner = inner
        self._to_impl = to_impl
        self._from_impl = from_impl
        self._where = where
        self._said = False

    def flushed(self, value: Any, ctx: FlushContext) -> Any:
        # process_bind_param runs once more, on the value the flush bound; the
        # implementation's rules predict what the database stored
        try:
            stored = self._to_impl(value)
        except Exception as exc:  # the application's code: the commit must not fail here
            raise self._refused(exc) from exc
        return self._inner.flushed(stored, ctx)

    def _refused(self, exc: Exception) -> EncodeError:
        """The type's ``process_bind_param`` raised on a value a flush had bound: the row is
        left a miss. Said once per column: a type that does more than convert (fastapi-
        storages' ``FileType`` saves an upload and closes its file) fails the second run."""
        if not self._said:
            self._said = True
            warnings.warn(
                f"{self._where or 'a column'} ({self.kind}): its type's process_bind_param "
                f"raised {type(exc).__name__} ({exc}) when a commit ran it again on the "
                "value the flush had bound, to learn what the database stored: each such "
                "commit leaves its row's cache entry a miss. A process_bind_param that does "
                "more than convert (saves a file) runs twice on commit; add the column to "
                "`exclude`, or set strategy='invalidate'.",
                WriteThroughWarning,
                stacklevel=2,
            )
        return EncodeError(f"process_bind_param raised {type(exc).__name__}")

    def key_kind(self, where: str = "") -> DecoratedKey:
        """What values of this column name a key, as a primary key (see :mod:`.keys`);
        ``where``: the model's attribute, for the log."""
        return DecoratedKey(self.kind.split("(", 1)[0], self._to_impl, self._from_impl, where)

    def loaded(self, value: Any) -> Any:
        # the database holds the implementation's value, which we only see through
        # process_result_value: store it only if binding it again gives back the same value
        try:
            stored = self._to_impl(value)
            again = self._from_impl(stored)
        except Exception as exc:  # the application's code: the load must not fail here
            raise EncodeError(f"the type raised {type(exc).__name__}") from exc
        if type(again) is not type(value) or again != value:
            raise EncodeError("process_bind_param does not invert process_result_value")
        return self._inner.loaded(stored)


def _text_as_uuid(to_impl: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A TypeDecorator that binds text into a UUID column (the GUID recipe on PostgreSQL):
    the database parses the text, and a load returns the UUID it spells; text Python cannot
    parse stays text, which the UUID codec finds inexact."""

    def bound(v: Any) -> Any:
        v = to_impl(v)
        if type(v) is str:
            try:
                return uuid.UUID(v)
            except ValueError:
                return v
        return v

    return bound


def column_codec(column: Column[Any], dialect: Dialect, where: str) -> ColumnCodec:
    """The codec of one column on one dialect; TypeDecorators wrap their implementation's.

    A type with no stored form fails at configuration, on SQLAlchemy's default dialect. One
    that has a form there but not on a real database (a TypeDecorator whose
    ``load_dialect_impl`` picks a database's own type: sqlalchemy-utils' range types on
    PostgreSQL) is met at the first flush or load there, inside the application's commit or
    get: its column then stores nothing on that database, so its rows are never cached there
    and each commit invalidates them, with a warning (it used to raise from the commit)."""
    try:
        found = _column_codec(column, dialect, where)
    except ConfigurationError as exc:
        if dialect.name == DefaultDialect.name:
            raise
        return _unstorable_on(dialect.name, exc)
    reason = sql_expression_reason(type_on(column.type, dialect.name))
    return found if reason is None else SqlTransformedCodec(found, reason)


def sql_expression_reason(type_: Any) -> str | None:
    """Why the database, not the value a flush sent, decides what a load of a column of this
    type returns: the type wraps its values in SQL on the way in (``bind_expression``:
    ``lower(?)``, an encryption function) or out (``column_expression``). None when it does
    not. SQLAlchemy's own types that do (SQLite's JSONB) have rules of their own."""
    found: list[str] = []
    t = type_
    while True:
        for name in ("bind_expression", "column_expression"):
            method = getattr(type(t), name, None)
            module = getattr(method, "__module__", None) or "sqlalchemy"
            if name not in found and not module.startswith("sqlalchemy."):
                found.append(name)
        if not isinstance(t, sqltypes.TypeDecorator):
            break
        t = t.impl_instance
    if not found:
        return None
    return (
        f"its type wraps values in SQL ({' and '.join(found)}): the database computes what a "
        "load returns"
    )


class SqlTransformedCodec(ColumnCodec):
    """A column whose values SQL transforms on the way in or out: stored as a load returns
    them (a fill), never predicted from what a flush sent (a commit invalidates)."""

    __slots__ = ("_found",)

    def __init__(self, found: ColumnCodec, reason: str) -> None:
        super().__init__(found.kind, found.encode, found.decode, _never, Never(reason))
        self.mutable = found.mutable
        self._found = found

    def flushed(self, value: Any, ctx: FlushContext) -> Any:
        return NOT_EXACT

    def loaded(self, value: Any) -> Any:
        return self._found.loaded(value)


def _unstorable_on(name: str, refused: ConfigurationError) -> ColumnCodec:
    reason = str(refused).split("; ", 1)[0].split(": ", 1)[-1]

    def refuse(v: Any) -> Any:
        raise EncodeError(reason)

    return ColumnCodec(
        "unstorable",
        *_nullable(refuse, refuse, _never),
        Never(f"{reason}: its rows are never cached there", lambda on, _mariadb: on == name),
    )


def _column_codec(column: Column[Any], dialect: Dialect, where: str) -> ColumnCodec:
    # with_variant(): the type the table was created with on this database
    type_: Any = type_on(column.type, dialect.name)
    # Interval is a TypeDecorator over DateTime on databases without one, but its Python values
    # are timedeltas on every database: it has a codec of its own
    if isinstance(type_, sqltypes.TypeDecorator) and not isinstance(type_, sqltypes.Interval):
        if isinstance(type_, sqltypes.PickleType):
            _base_codec(type_, where, dialect)  # raises with the hint
        # load_dialect_impl() returns the generic implementation type (String(), ...)
        inner = _base_codec(
            type_.load_dialect_impl(dialect), where, dialect, _mysql_table_charset(column)
        )
        td = type_
        cls = type(td)
        binds = cls.process_bind_param is not sqltypes.TypeDecorator.process_bind_param
        results = cls.process_result_value is not sqltypes.TypeDecorator.process_result_value

        def to_impl(v: Any) -> Any:
            return td.process_bind_param(v, dialect) if binds else v

        def from_impl(v: Any) -> Any:
            return td.process_result_value(v, dialect) if results else v

        # process_result_value may return a container (a dict decoded from a String)
        mutable = inner.mutable or results
        kind = f"{cls.__name__}({inner.kind})"
        found = DecoratedCodec(kind, inner, to_impl, from_impl, mutable, where)
        if (
            found.never is not None
            and dialect.name == DefaultDialect.name
            and cls.load_dialect_impl is not sqltypes.TypeDecorator.load_dialect_impl
        ):
            # the default dialect's implementation says nothing of a real database's (the
            # GUID recipe: CHAR there, PostgreSQL's UUID on PostgreSQL): announced at the
            # first flush to each database instead, from its own implementation
            found.never = Never(found.never.reason, _real_database)
        return found
    # the column's own type decides: dialect implementation classes do not always subclass
    # their generic type (SQLAlchemy 2.0's psycopg Float is a Numeric)
    return _base_codec(type_, where, dialect, _mysql_table_charset(column))


# --- payloads --------------------------------------------------------------------------------

_packb = msgpack.Packer(use_bin_type=True, datetime=False).pack


def pack_row(values: list[Any]) -> bytes:
    """Encode already-encoded column values (with the class tag first) as a payload."""
    try:
        return _HEADER + _packb(values)
    except (OverflowError, TypeError, ValueError) as exc:
        raise EncodeError(f"not storable in msgpack: {exc}") from exc


def unpack_row(payload: bytes | memoryview) -> list[Any]:
    """The class tag and raw column values of a payload, or DecodeError."""
    if len(payload) < 2 or payload[0] != FORMAT_VERSION:
        raise DecodeError("unknown payload format")
    try:
        values = msgpack.unpackb(payload[1:], raw=False, use_list=True, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise DecodeError(f"not msgpack: {exc}") from exc
    if type(values) is not list or not values:
        raise DecodeError("not a row")
    return values


def unpack_rows(payloads: Iterable[Any]) -> list[list[Any] | None]:
    """:func:`unpack_row` of many payloads in one loop (the batch read path): None for one
    that is False (no entry) or that :func:`unpack_row` would refuse."""
    unpackb = msgpack.unpackb
    version = FORMAT_VERSION
    found: list[list[Any] | None] = []
    append = found.append
    for payload in payloads:
        if payload is False or len(payload) < 2 or payload[0] != version:
            append(None)
            continue
        try:
            values = unpackb(payload[1:], raw=False, use_list=True, strict_map_key=True)
        except Exception:  # msgpack raises several unrelated types on garbage
            append(None)
            continue
        append(values if type(values) is list and values else None)
    return found
