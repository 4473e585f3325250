"""The ``CachedModel`` mixin, and what the cache learns about a mapped class.

A model's :class:`ModelLayout` is built once, when its mapper is configured (or when it is
registered, if already configured): which attributes are stored, in which order, with which
codecs, and how the primary key reaches a Redis key. Anything the cache cannot keep exact is a
:class:`~sqlalchemy_writethrough.exc.ConfigurationError` then, never a surprise at a read.
"""

from __future__ import annotations

import hashlib
import re
import uuid
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar

from sqlalchemy import Table
from sqlalchemy.orm import Mapper, RelationshipProperty

from . import codec
from .config import ModelOptions, ModelOptionsDict
from .exc import ConfigurationError
from .keys import KeySpace

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
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_PK_KINDS = {"int": int, "str": str, "uuid": uuid.UUID}


class ModelLayout:
    """How one model's rows are stored under one cache's options."""

    def __init__(
        self,
        mapper: Mapper[Any],
        options: ModelOptions,
        prefix: str,
        buckets: int,
        exclude_everywhere: frozenset[str] = frozenset(),
    ):
        where = f"{mapper.class_.__name__}"
        if (
            mapper.inherits is not None
            or mapper.polymorphic_on is not None
            or any(m is not mapper for m in mapper.self_and_descendants)
        ):
            raise ConfigurationError(
                f"{where}: models with inheritance are not cached yet; "
                "leave this hierarchy out of the cache"
            )
        table = mapper.local_table
        if not isinstance(table, Table):
            raise ConfigurationError(f"{where}: only models mapped to a Table can be cached")
        self.mapper = mapper
        self.options = options
        self.table = table
        self.entity_name = mapper.class_.__name__

        pk_columns = list(mapper.primary_key)
        self.pk_attrs = tuple(mapper.get_property_by_column(c).key for c in pk_columns)
        # column *keys* (not attribute keys) as they appear in WHERE clauses
        self.pk_index: dict[str, int] = {str(c.key): i for i, c in enumerate(pk_columns)}

        columns: list[Any] = []
        attrs: list[str] = []
        expired: list[str] = []
        known = {prop.key for prop in mapper.column_attrs}
        unknown = set(options.exclude) - known
        if unknown:
            raise ConfigurationError(f"{where}: exclude names unknown attributes {sorted(unknown)}")
        exclude = options.exclude | (exclude_everywhere & known)
        for prop in mapper.column_attrs:
            if len(prop.columns) != 1 or getattr(prop.columns[0], "table", None) is not table:
                expired.append(prop.key)  # column_property expressions: loaded on access
                continue
            if prop.key in exclude:
                if prop.key in self.pk_attrs:
                    raise ConfigurationError(f"{where}: a primary key column cannot be excluded")
                if not prop.deferred:
                    expired.append(prop.key)
                continue
            if prop.deferred:
                continue  # the deferred loader loads it on access, as after a database load
            columns.append(prop.columns[0])
            attrs.append(prop.key)
        for key in self.pk_attrs:
            if key not in attrs:
                raise ConfigurationError(f"{where}: primary key attribute {key!r} must be loaded")
        self.columns = tuple(columns)
        self.attrs = tuple(attrs)
        # attributes an INSERT sends as NULL when left unset, without putting None in the
        # instance's dict (the same rule as the mapper's private _insert_cols_as_none)
        self.null_on_insert = frozenset(
            a
            for a, c in zip(attrs, columns, strict=True)
            if not c.primary_key
            and not c.server_default
            and not c.default
            and not c.type.should_evaluate_none
        )
        self.expired = tuple(expired)
        self.pk_positions = tuple(attrs.index(k) for k in self.pk_attrs)
        self.eager_relationships = tuple(
            r.key
            for r in mapper.relationships
            if isinstance(r, RelationshipProperty) and r.lazy in _EAGER
        )

        # the default dialect gives every column a codec now, so a type with no stored form
        # fails at configuration; real dialects get theirs at first use
        from sqlalchemy.engine.default import DefaultDialect

        default = DefaultDialect()
        kinds = [
            codec.column_codec(c, default, f"{where}.{a}")
            for c, a in zip(columns, attrs, strict=False)
        ]
        self.pk_types = []
        for pos, key in zip(self.pk_positions, self.pk_attrs, strict=False):
            kind = kinds[pos].kind
            base = kind[kind.find("(") + 1 : -1] if "(" in kind else kind
            if base not in _PK_KINDS or "(" in kind:
                raise ConfigurationError(
                    f"{where}.{key}: primary keys of type {columns[pos].type!r} are not cached "
                    "yet (integer, string and UUID keys are)"
                )
            self.pk_types.append(_PK_KINDS[base])

        description = "|".join(
            f"{a}={c.name}:{_ADDRESS.sub('', repr(c.type))}"
            for a, c in zip(attrs, columns, strict=False)
        )
        digest_source = f"{codec.FORMAT_VERSION}|{table.fullname}|{description}|{self.pk_attrs}"
        self.digest = hashlib.sha1(digest_source.encode()).hexdigest()[:10]
        self.keys = KeySpace(prefix, table.fullname, self.digest, buckets)
        self._codecs: weakref.WeakKeyDictionary[Any, tuple[codec.ColumnCodec, ...]] = (
            weakref.WeakKeyDictionary()
        )

    def codecs(self, dialect: Dialect) -> tuple[codec.ColumnCodec, ...]:
        found = self._codecs.get(dialect)
        if found is None:
            where = self.entity_name
            found = tuple(
                codec.column_codec(c, dialect, f"{where}.{a}")
                for c, a in zip(self.columns, self.attrs, strict=False)
            )
            self._codecs[dialect] = found
        return found

    def pk_is_cacheable(self, pk: Iterable[Any]) -> bool:
        """Only values of the column's exact Python type map to one key (``"42"`` and ``42.0``
        would load row 42 from the database under another key)."""
        return all(type(v) is t for v, t in zip(pk, self.pk_types, strict=False))

    # -- rows ------------------------------------------------------------------------------

    def encode_loaded(self, state_dict: dict[str, Any], dialect: Dialect) -> bytes | None:
        """The payload of a row just loaded from the database, or None if it cannot be stored."""
        values: list[Any] = [0]
        try:
            for attr, col_codec in zip(self.attrs, self.codecs(dialect), strict=False):
                if attr not in state_dict:
                    return None
                values.append(col_codec.loaded(state_dict[attr]))
        except codec.EncodeError:
            return None
        return codec.pack_row(values)

    def encode_flushed(self, state_dict: dict[str, Any], ctx: codec.FlushContext) -> bytes | None:
        """The payload of a row a flush wrote, or None when a load might return anything else."""
        values: list[Any] = [0]
        try:
            for attr, col_codec in zip(self.attrs, self.codecs(ctx.dialect), strict=False):
                if attr not in state_dict:
                    return None  # expired (SQL expression, server default not fetched)
                value = col_codec.flushed(state_dict[attr], ctx)
                if value is codec.NOT_EXACT:
                    return None
                values.append(value)
        except codec.EncodeError:
            return None
        return codec.pack_row(values)

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

    def decode(self, payload: bytes | memoryview, dialect: Dialect) -> dict[str, Any]:
        """Attribute values of a payload; DecodeError when it is not a row of this layout."""
        raw = codec.unpack_row(payload, len(self.attrs))
        if raw[0] != 0:
            raise codec.DecodeError("unknown class tag")
        out: dict[str, Any] = {}
        for attr, col_codec, value in zip(self.attrs, self.codecs(dialect), raw[1:], strict=False):
            out[attr] = col_codec.decode(value)
        return out


def model_overrides(cls: type) -> ModelOptionsDict:
    found = getattr(cls, "__writethrough__", None) or {}
    if not isinstance(found, dict):
        raise ConfigurationError(f"{cls.__name__}.__writethrough__ must be a dict of options")
    return found  # type: ignore[return-value]


def is_cached_model(cls: type) -> bool:
    return isinstance(cls, type) and issubclass(cls, CachedModel)
