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
import uuid
import zoneinfo
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import msgpack
from sqlalchemy import types as sqltypes

from ._sa_compat import ABSTRACT_INTERVAL
from .exc import ConfigurationError

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect
    from sqlalchemy.schema import Column

#: Bump when the payload layout or any codec's stored form changes; it is part of every key's
#: schema digest, so a new version reads a new keyspace and never decodes old entries.
FORMAT_VERSION = 1
_HEADER = bytes([FORMAT_VERSION])

#: What :meth:`ColumnCodec.exact` returns when the database may return something else.
NOT_EXACT: Any = type("NotExact", (), {"__repr__": lambda self: "NOT_EXACT"})()


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
        """The tzinfo psycopg 3 attaches to ``timestamptz`` values on this connection."""
        if self._pg_timezone is None:
            tz = None
            try:
                assert self._connection is not None
                info = self._connection().connection.dbapi_connection.info
                tz = info.timezone
            except Exception:  # another driver, or no connection: not predictable
                tz = None
            self._pg_timezone = tz if isinstance(tz, dt.tzinfo) else False
        return self._pg_timezone or None


Exact = Callable[[Any, FlushContext], Any]


class ColumnCodec:
    """How one column is stored, read back, and predicted after a flush."""

    __slots__ = ("decode", "encode", "exact", "kind", "stored_type")

    def __init__(
        self,
        kind: str,
        encode: Callable[[Any], Any],
        decode: Callable[[Any], Any],
        exact: Exact,
    ) -> None:
        self.kind = kind
        self.encode = encode
        self.decode = decode
        self.exact = exact
        #: when ``decode`` only checks that the stored value is None or of this type and
        #: returns it: the row decoder checks such columns inline instead of calling it
        self.stored_type: type | None = getattr(decode, _STORED_TYPE, None)

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
    return str(v)


def _dec_decimal(v: Any) -> Any:
    if type(v) is not str:
        raise _fail("str", v)
    try:
        return decimal.Decimal(v)
    except decimal.InvalidOperation as exc:
        raise DecodeError(f"bad decimal {v!r}") from exc


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
    if type(v) is not uuid.UUID:
        raise EncodeError(f"expected UUID, got {type(v).__name__}")
    return v.bytes


def _dec_uuid(v: Any) -> Any:
    if type(v) is not bytes or len(v) != 16:
        raise _fail("16 bytes", v)
    return uuid.UUID(bytes=v)


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
    if type(v) is list:
        return all(_json_ok(i, depth + 1) for i in v)
    if type(v) is dict:
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


def _exact_str(length: int | None, padded: bool) -> Exact:
    def ex(v: Any, ctx: FlushContext) -> Any:
        if type(v) is not str or padded:
            return NOT_EXACT
        if length is not None and len(v) > length:
            return NOT_EXACT  # truncated by a lenient MySQL sql_mode, or an error
        return v

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
        return v

    return ex


_ONE = decimal.Decimal(1)


def _exact_decimal(scale: int | None, return_scale: int) -> Exact:
    quantum = decimal.Decimal(1).scaleb(-scale) if scale is not None else None
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
        if ctx.name in ("postgresql", "mysql", "mariadb"):
            if quantum is None:
                if ctx.name != "postgresql":
                    return NOT_EXACT
                if v.as_tuple().exponent > 0:  # type: ignore[operator]
                    v = v.quantize(_ONE)  # PostgreSQL returns 1.2E+3 as 1200
                return v.copy_abs() if v.is_zero() else v
            try:
                rounded = v.quantize(quantum, rounding=decimal.ROUND_HALF_UP)
            except decimal.InvalidOperation:
                return NOT_EXACT
            return rounded.copy_abs() if rounded.is_zero() else rounded  # no "-0.00" in SQL
        return NOT_EXACT

    return ex


def _exact_datetime(timezone: bool, fsp: int | None) -> Exact:
    def ex(v: Any, ctx: FlushContext) -> Any:
        if type(v) is not dt.datetime:
            return NOT_EXACT
        name = ctx.name
        if name == "postgresql":
            if not timezone:
                return v if v.tzinfo is None else NOT_EXACT
            tz = ctx.pg_timezone() if v.tzinfo is not None else None
            if tz is None:
                return NOT_EXACT
            try:
                return v.astimezone(tz)
            except OverflowError:  # year 1 / 9999 shifted out of datetime's range
                return NOT_EXACT
        if v.tzinfo is not None:
            v = v.replace(tzinfo=None)  # SQLite and MySQL keep the wall time, drop the zone
        if name == "sqlite":
            return v
        if name in ("mysql", "mariadb"):
            if fsp == 6 or v.microsecond == 0:
                return v
            if not fsp and ctx.is_mariadb:
                return v.replace(microsecond=0)  # MariaDB truncates; MySQL rounds
        return NOT_EXACT

    return ex


def _exact_time(fsp: int | None) -> Exact:
    def ex(v: Any, ctx: FlushContext) -> Any:
        if type(v) is not dt.time or v.tzinfo is not None:
            return NOT_EXACT
        if ctx.name in ("postgresql", "sqlite"):
            return v
        if ctx.name in ("mysql", "mariadb"):
            if fsp == 6 or v.microsecond == 0:
                return v
            if not fsp and ctx.is_mariadb:
                return v.replace(microsecond=0)
        return NOT_EXACT

    return ex


def _exact_interval(v: Any, ctx: FlushContext) -> Any:
    return v if type(v) is dt.timedelta and ctx.name == "postgresql" else NOT_EXACT


def _exact_bytes(v: Any, ctx: FlushContext) -> Any:
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v)
    return NOT_EXACT


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


def _array_codec(t: Any, where: str) -> ColumnCodec:
    """One-dimensional ARRAY of a scalar type: a msgpack list of the element codec's values.
    NULL elements are kept; a nested list (more dimensions) is never stored."""
    if t.dimensions not in (None, 1):
        raise ConfigurationError(
            f"{where}: multi-dimensional ARRAY columns are not cached; add the column to `exclude`"
        )
    item = _base_codec(t.item_type, where)
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

    return ColumnCodec(f"array[{item.kind}]", *_nullable(enc, dec, ex))


# --- choosing a codec from a column's type -------------------------------------------------


def _mysql_fsp(type_: Any) -> int | None:
    fsp = getattr(type_, "fsp", None)
    return fsp if isinstance(fsp, int) else None


def _base_codec(type_: sqltypes.TypeEngine[Any], where: str) -> ColumnCodec:
    t: Any = type_
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
        return ColumnCodec("int", *_nullable(_enc_int, _dec_type(int), _exact_type(int)))
    if isinstance(t, sqltypes.Float) and not t.asdecimal:
        precision = getattr(t, "precision", None)
        double = isinstance(t, sqltypes.Double) or precision is None or precision > 24
        if isinstance(t, sqltypes.REAL):
            double = False
        return ColumnCodec(
            "float", *_nullable(_enc_type(float), _dec_type(float), _exact_float(double))
        )
    if isinstance(t, sqltypes.Numeric):
        if not t.asdecimal:
            return ColumnCodec("float", *_nullable(_enc_type(float), _dec_type(float), _never))
        if isinstance(t, sqltypes.Float):
            exact: Exact = _never
        else:
            return_scale = t.decimal_return_scale
            if return_scale is None:
                return_scale = t.scale if t.scale is not None else 10
            exact = _exact_decimal(t.scale, return_scale)
        return ColumnCodec("decimal", *_nullable(_enc_decimal, _dec_decimal, exact))
    if isinstance(t, sqltypes.DateTime):
        return ColumnCodec(
            "datetime",
            *_nullable(
                _enc_datetime, _dec_datetime, _exact_datetime(bool(t.timezone), _mysql_fsp(t))
            ),
        )
    if isinstance(t, sqltypes.Date):
        return ColumnCodec(
            "date", *_nullable(_enc_iso(dt.date), _dec_iso(dt.date), _exact_type(dt.date))
        )
    if isinstance(t, sqltypes.Time):
        return ColumnCodec(
            "time",
            *_nullable(_enc_iso(dt.time), _dec_iso(dt.time), _exact_time(_mysql_fsp(t))),
        )
    if isinstance(t, ABSTRACT_INTERVAL):  # Interval and postgresql.INTERVAL
        return ColumnCodec("interval", *_nullable(_enc_interval, _dec_interval, _exact_interval))
    if isinstance(t, sqltypes.Uuid):
        if t.as_uuid:
            return ColumnCodec("uuid", *_nullable(_enc_uuid, _dec_uuid, _exact_type(uuid.UUID)))
        return ColumnCodec("str", *_nullable(_enc_type(str), _dec_type(str), _never))
    if isinstance(t, sqltypes.ARRAY):
        return _array_codec(t, where)
    if isinstance(t, sqltypes.JSON):
        return ColumnCodec("json", _enc_json, _dec_json, _never)
    if isinstance(t, sqltypes.String):
        padded = isinstance(t, (sqltypes.CHAR, sqltypes.NCHAR))
        return ColumnCodec(
            "str",
            *_nullable(_enc_type(str), _dec_type(str), _exact_str(t.length, padded)),
        )
    if isinstance(t, sqltypes._Binary):
        return ColumnCodec("bytes", *_nullable(_enc_bytes, _dec_type(bytes), _exact_bytes))
    raise ConfigurationError(
        f"{where}: the cache has no exact stored form for type {t!r}; "
        "add the column to `exclude` (it is then loaded from the database on access)"
    )


class _DecoratedCodec(ColumnCodec):
    """A TypeDecorator column: the cache stores the implementation's value, as the database
    does, and ``decode`` runs ``process_result_value`` exactly as a database load does."""

    __slots__ = ("_from_impl", "_inner", "_to_impl")

    def __init__(
        self,
        kind: str,
        inner: ColumnCodec,
        to_impl: Callable[[Any], Any],
        from_impl: Callable[[Any], Any],
    ) -> None:
        inner_decode = inner.decode

        def decode(v: Any) -> Any:
            return from_impl(inner_decode(v))

        super().__init__(kind, inner.encode, decode, inner.exact)
        self._inner = inner
        self._to_impl = to_impl
        self._from_impl = from_impl

    def flushed(self, value: Any, ctx: FlushContext) -> Any:
        # process_bind_param runs once, as the flush ran it; the implementation's rules
        # predict what the database stored
        return self._inner.flushed(self._to_impl(value), ctx)

    def loaded(self, value: Any) -> Any:
        # the database holds the implementation's value, which we only see through
        # process_result_value: store it only if binding it again gives back the same value
        stored = self._to_impl(value)
        again = self._from_impl(stored)
        if type(again) is not type(value) or again != value:
            raise EncodeError("process_bind_param does not invert process_result_value")
        return self._inner.loaded(stored)


def column_codec(column: Column[Any], dialect: Dialect, where: str) -> ColumnCodec:
    """The codec of one column on one dialect; TypeDecorators wrap their implementation's."""
    type_: Any = column.type
    # Interval is a TypeDecorator over DateTime on databases without one, but its Python values
    # are timedeltas on every database: it has a codec of its own
    if isinstance(type_, sqltypes.TypeDecorator) and not isinstance(type_, sqltypes.Interval):
        if isinstance(type_, sqltypes.PickleType):
            _base_codec(type_, where)  # raises with the hint
        # load_dialect_impl() returns the generic implementation type (String(), ...)
        inner = _base_codec(type_.load_dialect_impl(dialect), where)
        td = type_
        cls = type(td)
        binds = cls.process_bind_param is not sqltypes.TypeDecorator.process_bind_param
        results = cls.process_result_value is not sqltypes.TypeDecorator.process_result_value

        def to_impl(v: Any) -> Any:
            return td.process_bind_param(v, dialect) if binds else v

        def from_impl(v: Any) -> Any:
            return td.process_result_value(v, dialect) if results else v

        return _DecoratedCodec(f"{cls.__name__}({inner.kind})", inner, to_impl, from_impl)
    # the column's own type decides: dialect implementation classes do not always subclass
    # their generic type (SQLAlchemy 2.0's psycopg Float is a Numeric)
    return _base_codec(type_, where)


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
