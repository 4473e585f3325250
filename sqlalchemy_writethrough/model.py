"""The ``CachedModel`` mixin, and what the cache learns about a mapped class.

A model's :class:`ModelLayout` is built once, when its mapper is configured (or when it is
registered, if already configured): which attributes are stored, in which order, with which
codecs, and how the primary key reaches a Redis key. Anything the cache cannot keep exact is a
:class:`~sqlalchemy_writethrough.exc.ConfigurationError` then, never a surprise at a read.
"""

from __future__ import annotations

import decimal
import enum
import hashlib
import logging
import re
import uuid
import warnings
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import msgpack
from sqlalchemy import Column, DateTime, Table
from sqlalchemy.orm import Mapper, RelationshipProperty
from sqlalchemy.orm.exc import UnmappedColumnError

from . import codec
from .config import ModelOptions, ModelOptionsDict, OptionError
from .exc import ConfigurationError, WriteThroughWarning
from .keys import DecoratedKey, KeySpace, fits_key

log = logging.getLogger("sqlalchemy_writethrough")

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect


class CachedModel:
    """Mixin marking a mapped class as cached by every installed :class:`WriteThroughCache`.

    Per-model options go in ``__writethrough__``::

        class Product(Base, CachedModel):
            __tablename__ = "product"
            __writethrough__ = {"ttl": 600, "exclude": ["cost_price"]}
    """

    __writethrough__: ClassVar[ModelOptionsDict | None] = None


_EAGER = frozenset({"joined", "selectin", "subquery", "immediate"})
#: the strategy of ``query_expression()``: None unless the query gives it an expression
_QUERY_EXPRESSION = (("query_expression", True),)
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_PK_KINDS = {"int": int, "str": str, "uuid": uuid.UUID}


class ClassLayout:
    """How rows of one mapped class are stored: its attributes, in order, with their codecs."""

    def __init__(
        self,
        mapper: Mapper[Any],
        tag: Any,
        exclude: frozenset[str],
        pk_attrs: tuple[str, ...],
        where: str,
    ) -> None:
        # held weakly: a layout lives as long as its cache, a class mapped at run time
        # (a test's, a per-tenant automap) must stay free to be collected
        self.mapper_ref = weakref.ref(mapper)
        self.tag = tag
        tables = set(mapper.tables)
        columns: list[Any] = []
        attrs: list[str] = []
        expired: list[str] = []
        #: SQL expressions a load selects with the row (``column_property`` not deferred)
        self.loaded_expressions: tuple[str, ...] = ()
        for prop in mapper.column_attrs:
            cols = prop.columns
            if not all(isinstance(c, Column) and c.table in tables for c in cols):
                expired.append(prop.key)  # column_property expressions: loaded on access
                if not prop.deferred and prop.strategy_key != _QUERY_EXPRESSION:
                    self.loaded_expressions += (prop.key,)
                continue
            if prop.key in exclude:
                if prop.key in pk_attrs:
                    raise ConfigurationError(f"{where}: a primary key column cannot be excluded")
                if not prop.deferred:
                    expired.append(prop.key)
                continue
            if prop.deferred:
                continue  # the deferred loader loads it on access, as after a database load
            columns.append(cols[0])  # joined inheritance: sub.id and base.id hold one value
            attrs.append(prop.key)
        for key in pk_attrs:
            if key not in attrs:
                raise ConfigurationError(f"{where}: primary key attribute {key!r} must be loaded")
        self.columns = tuple(columns)
        self.attrs = tuple(attrs)
        self._pk_attrs = pk_attrs
        self.attr_set = frozenset(attrs)
        #: the ``DateTime(timezone=True)`` attributes: a driver returns their values in the
        #: time zone of the connection that loaded them (see codec.in_zone)
        self.zoned = tuple(
            a
            for a, c in zip(attrs, columns, strict=True)
            if isinstance(c.type, DateTime) and c.type.timezone
        )
        self.expired = tuple(expired)
        # attributes left NULL by an INSERT when unset, without None in the instance's dict:
        # sent as NULL (the mapper's private _insert_cols_as_none), or, for a type where None
        # means something (JSON's null), left out of the INSERT, with no default to apply
        self.null_on_insert = frozenset(
            a
            for a, c in zip(attrs, columns, strict=True)
            if not c.primary_key and not c.server_default and not c.default
        )
        self.eager_relationships = tuple(
            r.key
            for r in mapper.relationships
            # lazy=False is SQLAlchemy's older spelling of "joined"
            if isinstance(r, RelationshipProperty) and (r.lazy is False or r.lazy in _EAGER)
        )
        self._where = where
        #: (attribute, type of value) a load returned that the codec could not store: said
        self._unstorable_seen: set[tuple[str, type]] = set()
        #: attributes whose values a program can change in place, unseen by the ORM
        self.mutable: frozenset[str] = frozenset()
        #: the attributes an UPDATE may leave unwritten (all but the primary key), or None
        #: when there are none: a commit's publish takes those from memory (see .writing)
        self.unwritten: tuple[str, ...] | None = (
            tuple(a for a in self.attrs if a not in pk_attrs) or None
        )
        self.attr_set = frozenset(self.attrs)
        self._row_codecs: weakref.WeakKeyDictionary[Any, _RowCodec] = weakref.WeakKeyDictionary()
        # the last dialect and its row codec, one tuple replaced whole: a weak dictionary
        # lookup builds a weakref each time (a strong reference per class to the latest
        # dialect is the price)
        self._last: tuple[Any, _RowCodec] | None = None

    @property
    def mapper(self) -> Mapper[Any]:
        """(The read path calls ``mapper_ref()`` itself: no Python frame per row.)"""
        found = self.mapper_ref()
        assert found is not None, "the layout of a class that no longer exists"
        return found

    def description(self) -> str:
        return f"{self.tag!r}:" + ",".join(
            f"{a}={c.name}:{_ADDRESS.sub('', repr(c.type))}"
            for a, c in zip(self.attrs, self.columns, strict=True)
        )

    def row_codec(self, dialect: Dialect) -> _RowCodec:
        last = self._last
        if last is not None and last[0] is dialect:
            return last[1]
        found = self._row_codecs.get(dialect)
        if found is None:
            codecs = tuple(
                codec.column_codec(c, dialect, f"{self._where}.{a}")
                for c, a in zip(self.columns, self.attrs, strict=True)
            )
            found = self._row_codecs[dialect] = _RowCodec(
                self.tag, self.attrs, codecs, self._pk_attrs
            )
        self._last = (dialect, found)
        return found

    def inexact_columns(self, dialect: Dialect) -> list[tuple[str, str]]:
        """(attribute, reason) of each stored column whose typical values make a commit
        invalidate this class's row on ``dialect`` instead of writing it through."""
        found = []
        for attr, column, col_codec in zip(
            self.attrs, self.columns, self.codecs(dialect), strict=True
        ):
            if col_codec.kind == "unstorable":  # no stored form on this database
                found.append((attr, f"no exact stored form on {dialect.name}: never cached"))
                continue
            reason = codec.inexact_reason(column, dialect)
            if reason is not None:
                found.append((attr, reason))
        return found

    def codecs(self, dialect: Dialect) -> tuple[codec.ColumnCodec, ...]:
        return self.row_codec(dialect).codecs

    def announce(self, dialect: Dialect, name: str, is_mariadb: bool) -> None:
        """Warn once per process for each column whose commits never write through on this
        database (``name`` "default": the columns that never do on any database)."""
        for attr, column, col_codec in zip(
            self.attrs, self.columns, self.codecs(dialect), strict=True
        ):
            never = col_codec.never
            if never is None or not never.applies(name, is_mariadb):
                continue
            where = "*" if never.everywhere else ("mariadb" if is_mariadb else name)
            key = (str(column.table.fullname), str(column.name), where)
            if key in _ANNOUNCED:
                continue
            _ANNOUNCED.add(key)
            on = "" if never.everywhere else f" on {where}"
            warnings.warn(
                f"{self._where}.{attr} ({_ADDRESS.sub('', repr(column.type))}){on}: a commit "
                f"cannot know what the database stores, so each commit writing a {self._where} "
                f"row invalidates its cache entry instead of writing it through. "
                f"{never.reason[0].upper()}{never.reason[1:]}; or add {attr!r} to `exclude`, "
                "or set strategy='invalidate' to silence this.",
                WriteThroughWarning,
                stacklevel=2,
            )

    def encode_loaded(self, state_dict: dict[str, Any], dialect: Dialect) -> bytes | None:
        """The payload of a row just loaded from the database, or None if it cannot be stored."""
        values: list[Any] = [self.tag]
        for attr, col_codec in zip(self.attrs, self.codecs(dialect), strict=True):
            if attr not in state_dict:
                return None
            try:
                values.append(col_codec.loaded(state_dict[attr]))
            except codec.EncodeError as exc:
                self._unstorable(attr, state_dict[attr], exc)
                return None
        try:
            return codec.pack_row(values)
        except codec.EncodeError:
            return None

    def _unstorable(self, attr: str, value: Any, exc: Exception) -> None:
        """A loaded value its column's codec cannot store: the row is served from the
        database, never filled. Said once per column and type of value (a driver returning
        a type the codec does not expect would otherwise go unseen: every read a miss)."""
        seen = (attr, type(value))
        if seen in self._unstorable_seen:
            return
        self._unstorable_seen.add(seen)
        log.warning(
            "writethrough: %s.%s: a load returned a %s.%s, which the cache cannot store (%s): "
            "rows loaded with such a value are not cached",
            self._where,
            attr,
            type(value).__module__,
            type(value).__qualname__,
            exc,
        )

    def inserted_values(self, state: Any) -> dict[str, Any]:
        """``state.dict`` of a row this flush inserted, with the unset columns the INSERT sent
        as NULL filled in as None (as a load would return them)."""
        dict_: dict[str, Any] = state.dict
        missing = [
            a for a in self.null_on_insert if a not in dict_ and a not in state.expired_attributes
        ]
        if not missing:
            return dict_
        values = dict(dict_)
        for a in missing:
            values[a] = None
        return values

    def decode_values(self, raw: list[Any], dialect: Dialect) -> dict[str, Any]:
        """Attribute values of a payload's columns (``raw[0]`` is the class tag)."""
        values: dict[str, Any] = self.row_codec(dialect).decode(raw)
        return values


class _RowCodec:
    """One class's rows on one dialect: its column codecs, and two functions generated from
    them (as dataclasses generate ``__init__``):

    ``decode(raw)``            columns stored as their Python value (int, str, bool, float,
                               bytes) are type-checked inline, a decimal or naive datetime
                               stored as a str converted inline, the others call their codec;
    ``flushed(dict_, ctx)``    the stored values of a row a flush wrote, or None when one is
                               not exact; KeyError when an attribute is not loaded;
    ``decode_one(raw, pk)``    ``decode(raw)`` of a row that must be of this class (its tag)
                               and of the single-column key ``pk`` (DecodeError if not):
                               the batch read path's checks inside the one call (None
                               for a key of several columns).

    Against a loop over every column's codec, a cached get decodes in about half the time and
    a commit predicts a row's values in about a third less (``python -m benchmarks``).
    """

    __slots__ = ("codecs", "decode", "decode_one", "flushed", "flushed_again")

    def __init__(
        self,
        tag: Any,
        attrs: tuple[str, ...],
        codecs: tuple[codec.ColumnCodec, ...],
        pk_attrs: tuple[str, ...] = (),
    ) -> None:
        self.codecs = codecs
        namespace: dict[str, Any] = {
            "DecodeError": codec.DecodeError,
            "Enum": enum.Enum,
            "IMMUTABLE": codec.IMMUTABLE,
            "NOT_EXACT": codec.NOT_EXACT,
            "_wrong": _wrong_type,
            "tag": tag,
            "tag_type": type(tag),
        }
        decode = [
            "def decode(raw):",
            f"    if len(raw) != {len(attrs) + 1}:",
            "        raise DecodeError('wrong number of columns')",
        ]
        flushed = ["def flushed(d, ctx):"]
        # flushed_again: the same, reusing the stored value kept for a column whose value is
        # the very (immutable) object encoded before the flush (see .writing)
        again = ["def flushed_again(d, ctx, o, k):"]
        converts = False
        for i, (attr, col_codec) in enumerate(zip(attrs, codecs, strict=True), 1):
            namespace[f"c{i}"] = col_codec
            plain = type(col_codec) is codec.ColumnCodec
            # a nullable codec's None needs no call: the other values go to its inner functions
            exact, encode = col_codec.exact_not_null, col_codec.encode_not_null
            not_exact = [f"if v{i} is NOT_EXACT:", "    return None"]
            if col_codec.stored_type is not None and plain:
                namespace[f"t{i}"] = col_codec.stored_type
                # the type first: most values are not None, and are of their type
                decode.append(f"    if type(v{i}) is not t{i} and v{i} is not None:")
                decode.append(f"        _wrong(t{i}, v{i})")
                # exact() returns None, a value of the stored type, or NOT_EXACT: nothing
                # left for encode() to do
                if exact is not None:
                    namespace[f"x{i}"] = exact
                    body = [
                        f"if v{i} is not None:",
                        f"    v{i} = x{i}(v{i}, ctx)",
                        f"    if v{i} is NOT_EXACT:",
                        "        return None",
                    ]
                else:
                    namespace[f"x{i}"] = col_codec.exact
                    body = [f"v{i} = x{i}(v{i}, ctx)", *not_exact]
            else:
                inline = codec.STR_DECODERS.get(col_codec.not_null) if plain else None  # type: ignore[arg-type]
                if inline is not None:
                    # the common stored form converted here, anything else by the decoder
                    converts = True
                    namespace[f"d{i}"] = col_codec.not_null
                    namespace[f"s{i}"] = inline[0]
                    decode.append(f"    if v{i} is not None:")
                    decode.append(f"        if type(v{i}) is str:")
                    decode.append(f"            v{i} = s{i}(v{i})")
                    if inline[1]:
                        decode.append(f"            if v{i}.tzinfo is not None:")
                        decode.append(
                            "                raise DecodeError('naive datetime expected')"
                        )
                    decode.append("        else:")
                    decode.append(f"            v{i} = d{i}(v{i})")
                elif col_codec.not_null is not None and plain:
                    namespace[f"d{i}"] = col_codec.not_null
                    decode.append(f"    if v{i} is not None:")
                    decode.append(f"        v{i} = d{i}(v{i})")
                else:
                    namespace[f"d{i}"] = col_codec.decode
                    decode.append(f"    v{i} = d{i}(v{i})")
                if plain and exact is not None and encode is not None:
                    # ColumnCodec.flushed: encode(exact(value)), NOT_EXACT passed on
                    namespace[f"x{i}"] = exact
                    namespace[f"e{i}"] = encode
                    body = [
                        f"if v{i} is not None:",
                        f"    v{i} = x{i}(v{i}, ctx)",
                        f"    if v{i} is NOT_EXACT:",
                        "        return None",
                        f"    if v{i} is not None:",
                        f"        v{i} = e{i}(v{i})",
                    ]
                else:
                    namespace[f"f{i}"] = col_codec.flushed
                    body = [f"v{i} = f{i}(v{i}, ctx)", *not_exact]
            # the value read first (KeyError when not loaded), then its stored form
            read = f"    v{i} = d[{attr!r}]"
            flushed.append(read)
            flushed += ["    " + line for line in body]
            again.append(read)
            if col_codec.mutable or not plain:
                # a container, changed in place or not, and a TypeDecorator's value (its
                # process_bind_param is the application's): encoded again
                again += ["    " + line for line in body]
                continue
            if col_codec.kind in codec.IMMUTABLE_KINDS:
                # exact() let only an immutable value through: the kept one was
                again.append(f"    if v{i} is o[{attr!r}]:")
            else:
                again.append(
                    f"    if v{i} is o[{attr!r}] and "
                    f"(type(v{i}) in IMMUTABLE or isinstance(v{i}, Enum)):"
                )
            again.append(f"        v{i} = k[{i}]")
            again.append("    else:")
            again += ["        " + line for line in body]
        names = [f"v{i}" for i in range(1, len(attrs) + 1)]
        # every column in one unpacking of the list (its length checked above), not an
        # index a column
        decode.insert(3, f"    _, {', '.join(names)}, = raw")
        items = ", ".join(f"{attr!r}: {name}" for attr, name in zip(attrs, names, strict=True))
        decode.append(f"    return {{{items}}}")
        one: list[str] = []
        if len(pk_attrs) == 1:
            # the class tag checked as decode_rows checked it (1 is not True), the key last
            pk_name = names[attrs.index(pk_attrs[0])]
            one = [
                "def decode_one(raw, pk):",
                *decode[1:3],
                f"    tag0, {', '.join(names)}, = raw",
                "    if tag0 != tag or type(tag0) is not tag_type:",
                "        raise DecodeError('a row of another class')",
                *decode[4:-1],
                f"    if {pk_name} != pk:",
                "        raise DecodeError('holds another primary key')",
                decode[-1],
            ]
        if converts:
            # what a conversion made inline raises is a DecodeError, as from its decoder
            namespace["InvalidOperation"] = decimal.InvalidOperation
            for lines in (decode, one) if one else (decode,):
                lines[1:] = [
                    "    try:",
                    *("    " + line for line in lines[1:]),
                    "    except DecodeError:",
                    "        raise",
                    "    except (ValueError, InvalidOperation) as exc:",
                    "        raise DecodeError(str(exc)) from exc",
                ]
        flushed.append(f"    return [tag, {', '.join(names)}]")
        again.append(flushed[-1])
        # only attribute-name literals and indexes go into the source
        exec("\n".join(decode), namespace)
        exec("\n".join(flushed), namespace)
        exec("\n".join(again), namespace)
        self.decode: Any = namespace["decode"]
        self.flushed: Any = namespace["flushed"]
        self.flushed_again: Any = namespace["flushed_again"]
        self.decode_one: Any = None
        if one:
            exec("\n".join(one), namespace)
            self.decode_one = namespace["decode_one"]


#: (table, column, database or "*") of the columns already announced in this process
_ANNOUNCED: set[tuple[str, str, str]] = set()


def _wrong_type(expected: type, value: Any) -> None:
    raise codec.DecodeError(f"expected {expected.__name__}, found {type(value).__name__}")


class ModelLayout:
    """How one model, or one inheritance hierarchy, is stored under one cache's options.

    A hierarchy (single-table or joined) shares one keyspace, named after its base table and
    keyed by the base's primary key, as the identity map does; each entry carries the class of
    its row (the polymorphic identity), so ``get(Base, pk)`` builds the right subclass and
    ``get(OtherSubclass, pk)`` finds no row, with no SQL.
    """

    def __init__(
        self,
        mapper: Mapper[Any],
        options: ModelOptions,
        prefix: str,
        buckets: int,
        exclude_everywhere: frozenset[str] = frozenset(),
    ):
        base = cache_root(mapper)
        where = f"{base.class_.__name__}"
        members = cached_members(base)
        mappers = [m for m in members if m is base or m.configured]
        # options first: a wrong option raises even where register_all() would skip the model
        exclude = _checked_exclude(base, mappers, options.exclude, exclude_everywhere, where)
        concrete = [m for m in base.self_and_descendants if m.concrete and m is not base]
        if concrete and (base.with_polymorphic is not None or base.polymorphic_on is not None):
            raise ConfigurationError(
                f"{where}: its loads read a UNION of its concrete subclasses' tables, which "
                f"the cache cannot serve; cache the concrete classes "
                f"({', '.join(m.class_.__name__ for m in concrete)}) instead"
            )
        table = base.local_table
        if not isinstance(table, Table):
            raise ConfigurationError(
                f"{where}: only models mapped to a Table can be cached, not to a "
                f"{type(table).__name__} (a join or a select); leave it out of the cache"
            )
        self.options = options
        #: the model's own options said its strategy (``strategy="write-through"`` there
        #: keeps its commits writing through a table with triggers: see
        #: :meth:`.Models._rewritten`)
        self.strategy_declared = False
        self.table = table
        self.entity_name = base.class_.__name__
        self.polymorphic = base.polymorphic_on is not None or len(members) > 1

        pk_columns = list(base.primary_key)
        self.pk_columns = tuple(pk_columns)
        self.pk_attrs = tuple(base.get_property_by_column(c).key for c in pk_columns)
        # column *keys* (not attribute keys) as they appear in WHERE clauses
        self.pk_index: dict[str, int] = {str(c.key): i for i, c in enumerate(pk_columns)}

        #: the attributes never written to Redis: the model's and the cache-wide ones it has
        self.exclude = exclude
        #: the class layouts of the hierarchy, by polymorphic identity, and by id(mapper)
        #: (checked against the layout's weak reference: see :meth:`variant`)
        self.by_tag: dict[Any, ClassLayout] = {}
        self._by_id: dict[int, ClassLayout] = {}
        for m in mappers:
            tag = _tag(m) if self.polymorphic else 0
            if tag in self.by_tag:
                raise ConfigurationError(
                    f"{m.class_.__name__}: two classes of {where}'s hierarchy share the "
                    f"polymorphic identity {tag!r}"
                )
            variant = ClassLayout(m, tag, exclude, self.pk_attrs, m.class_.__name__)
            self.by_tag[tag] = variant
            self._by_id[id(m)] = variant
        self.tables = frozenset(t for m in mappers for t in m.tables)
        # A load picks the class of a row from its discriminator (``polymorphic_on``), not
        # from the class of the object that wrote it: a commit may write the row through only
        # as the class its discriminator picks. A discriminator that is a SQL expression
        # (SQLAlchemy's ``case()`` recipe) cannot be evaluated here: such a hierarchy's
        # commits leave misses, and loads fill the class they picked.
        on = base.polymorphic_on
        #: the attribute holding the discriminator column, when there is one
        self.discriminator: str | None = None
        #: whether a commit must check the class a load would pick (see :meth:`picks`)
        self.checks_class = on is not None
        #: whether that class can be told at commit (False: an expression discriminator)
        self.class_predicted = True
        if on is not None:
            try:
                prop = base.get_property_by_column(on) if isinstance(on, Column) else None
            except UnmappedColumnError:
                prop = None
            if prop is not None and on.table in self.tables:
                self.discriminator = prop.key
            else:
                self.class_predicted = False
                said = (str(table.fullname), "polymorphic_on", "*")
                if options.strategy != "invalidate" and said not in _ANNOUNCED:
                    _ANNOUNCED.add(said)  # once per process, as the columns' notices
                    warnings.warn(
                        f"{where}: its polymorphic_on is a SQL expression, so a commit cannot "
                        "tell which class a load of the row picks: each commit writing a "
                        f"{where} row invalidates its cache entry instead of writing it "
                        "through (loads fill it). Map polymorphic_on to a column, or set "
                        "strategy='invalidate' to silence this.",
                        WriteThroughWarning,
                        stacklevel=2,
                    )
        #: the schemas its tables name (a schema_translate_map names its rows by these only)
        self.schemas: frozenset[str | None] = frozenset(t.schema for t in self.tables)
        self.eager_relationships = tuple(
            key for v in self.by_tag.values() for key in v.eager_relationships
        )
        #: SQL expressions a load selects with the row (``column_property`` not deferred)
        self.loaded_expressions = tuple(
            key for v in self.by_tag.values() for key in v.loaded_expressions
        )
        #: what a load brings with the row that an entry cannot: present after the session
        #: closes when loaded, where an object built from an entry would have them unloaded
        #: (DetachedInstanceError), so such a model's loads read the database
        self.loaded_with_row = self.eager_relationships + self.loaded_expressions
        #: whether a class of the hierarchy has ``DateTime(timezone=True)`` attributes
        self.zoned = any(v.zoned for v in self.by_tag.values())

        # the default dialect gives every column a codec now, so a type with no stored form
        # fails at configuration; real dialects get theirs at first use
        from sqlalchemy.engine.default import DefaultDialect

        default = DefaultDialect()
        self.announces = options.strategy != "invalidate"
        self._announced: set[tuple[str, bool]] = set()
        for variant in self.by_tag.values():
            variant.mutable = frozenset(
                a for a, c in zip(variant.attrs, variant.codecs(default), strict=True) if c.mutable
            )
            if self.announces:
                variant.announce(default, default.name, False)
        base_variant = self.base_variant = self._by_id[id(base)]
        self.pk_types: list[type | DecoratedKey] = []
        base_codecs = base_variant.codecs(default)
        for key in self.pk_attrs:
            pos = base_variant.attrs.index(key)
            col_codec = base_codecs[pos]
            if isinstance(col_codec, codec.SqlTransformedCodec):
                assert col_codec.never is not None  # its reason
                raise ConfigurationError(
                    f"{where}.{key}: primary keys of type {base_variant.columns[pos].type!r} "
                    f"are not cached: {col_codec.never.reason}, so the key a value names is "
                    "not known"
                )
            if col_codec.kind in _PK_KINDS:
                self.pk_types.append(_PK_KINDS[col_codec.kind])
            elif isinstance(col_codec, codec.DecoratedCodec):
                # the values its process_result_value returns decide, one by one
                self.pk_types.append(col_codec.key_kind(f"{where}.{key}"))
            else:
                raise ConfigurationError(
                    f"{where}.{key}: primary keys of type {base_variant.columns[pos].type!r} "
                    "are not cached yet (integer, string and UUID keys are)"
                )

        description = "|".join(v.description() for v in self.by_tag.values())
        digest_source = f"{codec.FORMAT_VERSION}|{table.fullname}|{description}|{self.pk_attrs}"
        self.digest = hashlib.sha1(digest_source.encode()).hexdigest()[:10]
        self._prefix = prefix
        self._buckets = buckets
        #: one keyspace per database (see .databases), by the database's digest
        self.keyspaces: dict[str, KeySpace] = {}
        #: the last bind and its keyspace, one tuple replaced whole (most processes use one)
        self.last_keys: tuple[Any, Any] = (None, None)

    @property
    def mapper(self) -> Mapper[Any]:
        """The base mapper of the model (or hierarchy)."""
        return self.base_variant.mapper

    def picks(self, mapper: Mapper[Any], values: Mapping[str, Any]) -> bool:
        """Whether a load of the row ``values`` (by attribute) would build ``mapper``'s class,
        as its discriminator says (only asked when :attr:`checks_class`)."""
        if not self.class_predicted:
            return False
        value = values.get(self.discriminator) if self.discriminator is not None else None
        try:
            return mapper.polymorphic_map.get(value) is mapper
        except TypeError:  # an unhashable value: no identity
            return False

    def keyspace(self, database: str) -> KeySpace:
        """The keys of this model's rows in one database (named by its digest)."""
        found = self.keyspaces.get(database)
        if found is None:
            digest = f"{self.digest}:{database}"
            found = KeySpace(self._prefix, self.table.fullname, digest, self._buckets)
            found = self.keyspaces.setdefault(database, found)
        return found

    @property
    def key_pattern(self) -> str:
        """A ``SCAN MATCH`` pattern of this model's entity keys, in every database."""
        return KeySpace(self._prefix, self.table.fullname, self.digest, 1).pattern

    # the base class's layout, for callers that handle plain models
    @property
    def attrs(self) -> tuple[str, ...]:
        return self.base_variant.attrs

    @property
    def expired(self) -> tuple[str, ...]:
        return self.base_variant.expired

    def variant(self, mapper: Mapper[Any]) -> ClassLayout | None:
        found = self._by_id.get(id(mapper))
        if found is not None and found.mapper_ref() is mapper:
            return found
        return None

    def announce(self, ctx: codec.FlushContext) -> None:
        """At a flush to a database first seen: warn about the columns whose commits never
        write through there (MariaDB and MySQL are told apart only once connected)."""
        seen = (ctx.name, ctx.is_mariadb)
        if seen in self._announced:
            return
        self._announced.add(seen)
        if self.announces:
            for variant in self.by_tag.values():
                variant.announce(ctx.dialect, ctx.name, ctx.is_mariadb)

    def pk_is_cacheable(self, pk: Iterable[Any]) -> bool:
        """Only values of the column's exact Python type map to one key (``"42"`` and ``42.0``
        would load row 42 from the database under another key), or of a ``uuid.UUID``
        subclass (:func:`.keys.fits_key`)."""
        types = self.pk_types
        if len(types) == 1:  # no generator for the common case (twice per flushed row)
            for v in pk:
                t = types[0]
                return type(v) is t or fits_key(v, t)  # the call only for another type
            return True
        return all(fits_key(v, t) for v, t in zip(pk, types, strict=False))

    def encode_loaded(self, state_dict: dict[str, Any], dialect: Dialect) -> bytes | None:
        return self.base_variant.encode_loaded(state_dict, dialect)

    def decode_row(
        self, payload: bytes | memoryview, dialect: Dialect
    ) -> tuple[ClassLayout, dict[str, Any]]:
        """The class and attribute values of a payload; DecodeError when it is not a row of
        this layout."""
        raw = codec.unpack_row(payload)
        tag = raw[0]
        variant = self.by_tag.get(tag) if type(tag) in (int, str) else None
        if variant is None:
            raise codec.DecodeError("unknown class tag")
        return variant, variant.decode_values(raw, dialect)

    def decode_rows(
        self, payloads: Sequence[Any], dialect: Dialect, pk_values: Sequence[Any]
    ) -> tuple[list[dict[str, Any] | None], list[ClassLayout | None] | None]:
        """:meth:`decode_row` of many entries of a single-column key, in one loop (the batch
        read path): the attribute values of each, None for an entry that is absent (False),
        cannot be decoded or is not the row of its key (the caller looks at those again); and
        the class layout of each, or None for the list when the layout has one class only.
        Each values dict is new, the caller's to keep.

        :func:`codec.unpack_rows` is inlined: one Python loop a row, not two."""
        by_tag = self.by_tag
        pk_attr = self.pk_attrs[0]
        unpackb = msgpack.unpackb
        version = codec.FORMAT_VERSION
        found: list[dict[str, Any] | None] = []
        append = found.append
        DecodeError = codec.DecodeError
        if len(by_tag) == 1:
            # one class (of the many layouts): its tag is checked, no variant kept per row
            ((_, only),) = by_tag.items()
            # the class tag, the columns and the key checked in one generated function
            decode_one = only.row_codec(dialect).decode_one
            for payload, pk in zip(payloads, pk_values, strict=True):
                if payload is False:  # no entry
                    append(None)
                    continue
                try:
                    # an empty payload raises here too; msgpack >= 1.0's defaults are
                    # raw=False, use_list=True, strict_map_key=True
                    raw = unpackb(payload[1:]) if payload[0] == version else None
                except Exception:  # msgpack raises several unrelated types on garbage
                    raw = None
                if type(raw) is not list:  # not a row (None: not a payload)
                    append(None)
                    continue
                try:  # an empty list, another class's row or another key's: DecodeError
                    append(decode_one(raw, pk))
                except (DecodeError, ValueError):
                    append(None)
            return found, None
        variants: list[ClassLayout | None] = []
        add_variant = variants.append
        last: ClassLayout | None = None
        decode: Any = None
        for raw, pk in zip(codec.unpack_rows(payloads), pk_values, strict=True):
            variant = None
            values = None
            if raw is not None:
                tag = raw[0]
                variant = by_tag.get(tag) if type(tag) in (int, str) else None
            if variant is not None:
                if variant is not last:
                    last, decode = variant, variant.row_codec(dialect).decode
                try:
                    values = decode(raw)
                except (DecodeError, ValueError):
                    variant = None
                if values is not None and values[pk_attr] != pk:
                    variant = values = None
            append(values)
            add_variant(variant)
        return found, variants

    def decode(self, payload: bytes | memoryview, dialect: Dialect) -> dict[str, Any]:
        return self.decode_row(payload, dialect)[1]


def cache_root(mapper: Mapper[Any]) -> Mapper[Any]:
    """The mapper whose layout holds ``mapper``'s rows: its hierarchy's base, or the nearest
    concrete class (each concrete table is a keyspace of its own)."""
    while mapper.inherits is not None and not mapper.concrete:
        mapper = mapper.inherits
    return mapper


def cached_members(root: Mapper[Any]) -> list[Mapper[Any]]:
    """The classes whose rows share ``root``'s keyspace: itself and its descendants up to the
    next concrete class."""
    return [m for m in root.self_and_descendants if cache_root(m) is root]


def _checked_exclude(
    base: Mapper[Any],
    mappers: list[Mapper[Any]],
    exclude: frozenset[str],
    exclude_everywhere: frozenset[str],
    where: str,
) -> frozenset[str]:
    """The attributes a hierarchy leaves out of Redis; OptionError for a wrong ``exclude``."""
    known = {prop.key for m in mappers for prop in m.column_attrs}
    unknown = set(exclude) - known
    if unknown:
        raise OptionError(f"{where}: exclude names unknown attributes {sorted(unknown)}")
    excluded = exclude | (exclude_everywhere & known)
    for column in base.primary_key:
        try:
            key = base.get_property_by_column(column).key
        except UnmappedColumnError:
            continue  # not this check's business: the layout refuses the model
        if key in excluded:
            raise OptionError(f"{where}: a primary key column cannot be excluded")
    return excluded


def _tag(mapper: Mapper[Any]) -> Any:
    identity = mapper.polymorphic_identity
    if type(identity) in (int, str):
        return identity
    return mapper.class_.__name__


def model_overrides(cls: type) -> ModelOptionsDict:
    found = getattr(cls, "__writethrough__", None) or {}
    if not isinstance(found, dict):
        raise ConfigurationError(f"{cls.__name__}.__writethrough__ must be a dict of options")
    return found  # type: ignore[return-value]


def is_cached_model(cls: type) -> bool:
    return isinstance(cls, type) and issubclass(cls, CachedModel)
