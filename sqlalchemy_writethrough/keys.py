"""Redis key names.

``{prefix}:{<table>:<digest>:<database>:<bucket>}:<pk>`` is an entity;
``{prefix}:{<table>:<digest>:<database>:<bucket>}`` is the generation key of its bucket. The part
in braces is the Redis Cluster hash tag, so an entity and its generation always share a slot
while a model still spreads over ``buckets`` slots. The digest covers the format version and the
model's columns and types: a migration or an upgrade moves the model to a new keyspace by itself,
and old entries are never decoded. ``<database>`` names the database the rows come from (see
:mod:`.databases`): two databases never share an entry.
"""

from __future__ import annotations

import logging
import uuid
import zlib
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import Any

log = logging.getLogger("sqlalchemy_writethrough")


def _escape(text: str) -> str:
    if "%" in text or ":" in text or "{" in text or "}" in text:
        text = text.replace("%", "%25").replace(":", "%3A").replace("{", "%7B").replace("}", "%7D")
    return text


def fits_key(value: Any, kind: type | DecoratedKey) -> bool:
    """Whether ``value`` names a key of a column whose values are of type ``kind``: its exact
    type (``True`` or ``5.0`` must not load row 1 or 5 under a key of their own), or a
    ``uuid.UUID`` subclass (asyncpg returns its own class: the same value, the same key); for
    a column of a ``TypeDecorator`` type, a value its type gives back unchanged
    (:class:`DecoratedKey`)."""
    if type(value) is kind:
        return True
    if kind is uuid.UUID:
        return isinstance(value, uuid.UUID)
    return type(kind) is DecoratedKey and kind.fits(value)


class DecoratedKey:
    """The key values of a primary-key column of a ``TypeDecorator`` type (the GUID recipe,
    sqlalchemy-utils' ``UUIDType``): what its ``process_result_value`` returns, and so the
    identity a load gives a row, is known only from values. A value names a key when it is an
    int, a str or a UUID that binding and reading back through the type returns unchanged,
    of the same type: that is the value a load of its row holds (a UUID given as text is not:
    a load returns the UUID, so the text would name another key for the same row)."""

    __slots__ = ("__name__", "_from_impl", "_said", "_to_impl", "_where")

    def __init__(
        self,
        name: str,
        to_impl: Callable[[Any], Any],
        from_impl: Callable[[Any], Any],
        where: str = "",
    ) -> None:
        self.__name__ = name
        self._to_impl = to_impl
        self._from_impl = from_impl
        self._where = where
        self._said = False

    def __repr__(self) -> str:
        return f"DecoratedKey({self.__name__})"

    def canonical(self, value: Any) -> Any:
        """``value`` bound and read back through the type (what a load of its row holds), or
        None when the type refuses it or returns no key value."""
        try:
            again = self._from_impl(self._to_impl(value))
        except Exception:  # the application's code: any error means "not a key"
            return None
        if type(again) is int or type(again) is str or isinstance(again, uuid.UUID):
            return again
        return None

    def key_of(self, value: Any) -> Any:
        """The key value ``value`` stands for: itself when it fits, else what the type turns
        it into when that fits (a UUID's text for a column that loads UUIDs), else None."""
        if self.fits(value):
            return value
        again = self.canonical(value)
        return again if again is not None and self.fits(again) else None

    def fits(self, value: Any) -> bool:
        if isinstance(value, uuid.UUID):
            again = self.canonical(value)
            return isinstance(again, uuid.UUID) and again == value
        if type(value) is not int and type(value) is not str:
            if value is not None and not self._said:
                self._said = True  # once: known only from values, so said when one is seen
                log.warning(
                    "writethrough: %s (%s): a key value of type %s is not an int, a str or a "
                    "UUID, so no key names its row: reads of the model with such keys go to "
                    "the database, and commits writing it invalidate its entries",
                    self._where or "a primary key",
                    self.__name__,
                    type(value).__qualname__,
                )
            return False
        again = self.canonical(value)
        return type(again) is type(value) and again == value


def encode_pk_part(value: Any) -> str:
    """One primary-key value as it appears in a key; types are checked by the caller."""
    if type(value) is int:
        return str(value)
    if type(value) is str:
        return _escape(value)
    if isinstance(value, uuid.UUID):  # asyncpg's own UUID class too: the same hex
        return value.hex
    raise TypeError(f"unsupported primary key value {value!r}")


def registry_key(prefix: str) -> str:
    """A hash listing every keyspace (table, digest, buckets) that holds entries."""
    return f"{prefix}:registry"


def registry_version_key(prefix: str) -> str:
    """A value that changes whenever a new field enters the registry (see :mod:`.siblings`),
    in the registry's Redis Cluster slot: its hash tag is the registry's own (the prefix's
    tag, or the whole registry key when the prefix has none)."""
    return version_key_of(registry_key(prefix))


def version_key_of(registry: str) -> str:
    """:func:`registry_version_key` of a registry key."""
    if "{" not in registry:
        return f"{registry}:{{{registry}}}"
    return f"{registry}:version"


def _beside_registry(prefix: str, name: str) -> str:
    """A key named ``name`` next to the registry, in its Redis Cluster slot."""
    registry = registry_key(prefix)
    if "{" not in registry:
        return f"{registry}:{name}:{{{registry}}}"
    return f"{registry}:{name}"


def registry_pruning_key(prefix: str) -> str:
    """A key that exists while the registry's expired fields were dropped recently (see
    ``lua/register.lua``), in the registry's Redis Cluster slot."""
    return _beside_registry(prefix, "pruning")


def registry_recovery_key(prefix: str) -> str:
    """The lease of the process making a forgotten registry whole again (see
    ``lua/registry_whole.lua``), in the registry's Redis Cluster slot."""
    return _beside_registry(prefix, "recovery")


#: The registry field present while the registry has listed, since it was last made whole,
#: every keyspace that may hold entries (see :mod:`.siblings`). Redis evicting the registry (or
#: anyone deleting it) takes the field with it, and the next registration makes a registry
#: without it. It reads as a keyspace of no bucket, which every reader of the registry, older
#: versions too, passes over; its value is a time no pruning reaches.
REGISTRY_WHOLE = "~|whole|0"


def generation_key_pattern(prefix: str) -> str:
    """A ``SCAN MATCH`` pattern of the prefix's generation keys (and of no entity key: a
    key's parts have their braces escaped, so only a generation key ends with ``}``)."""
    return f"{_glob_escape(prefix)}:{{*}}"


def is_generation_key(prefix: str, key: str) -> bool:
    """Whether ``key`` (a :func:`generation_key_pattern` match) is a generation key of
    ``prefix`` itself, not of a prefix that starts with it (``shop`` and ``shop:eu``)."""
    start = len(prefix) + 2
    return key.startswith(prefix + ":{") and key.endswith("}") and "}" not in key[start:-1]


def epoch_key(prefix: str) -> str:
    """The identity of the Redis data set the cache last validated (see :mod:`.epoch`)."""
    return f"{prefix}:epoch"


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "\\*?[]" else c for c in text)


def prefix_patterns(prefix: str) -> list[str]:
    """SCAN patterns matching every key of ``prefix`` and no key of another prefix (even one
    that starts with this one: ``shop`` must not match ``shop:eu``'s keys)."""
    escaped = _glob_escape(prefix)
    epoch = _glob_escape(epoch_key(prefix))
    # the epoch key, and on Redis Cluster each primary's ({prefix}:epoch:{<n>})
    return [
        f"{escaped}:{{*",
        _glob_escape(registry_key(prefix)),
        _glob_escape(registry_version_key(prefix)),
        _glob_escape(registry_pruning_key(prefix)),
        _glob_escape(registry_recovery_key(prefix)),
        epoch,
        f"{epoch}:{{*",
    ]


#: int primary keys whose pairs a keyspace keeps (about 200 bytes each), then forgets at once
_PAIRS = 4096
#: the type set of a list of int primary keys (no bool: True == 1 must not share 1's key)
_INT = {int}


class KeySpace:
    """The keys of one model's rows in one database, under one cache prefix (``digest`` is
    the schema digest and the database's, ``<schema>:<database>``)."""

    __slots__ = (
        "_buckets",
        "_pairs",
        "_tags",
        "fields",
        "pattern",
        "registry_field",
        "rewritten",
        "self_written",
        "served",
    )

    def __init__(self, prefix: str, table: str, digest: str, buckets: int) -> None:
        self._buckets = buckets
        name = _escape(table)
        self._tags = [f"{prefix}:{{{name}:{digest}:{b}}}" for b in range(buckets)]
        self.registry_field = f"{table}|{digest}|{buckets}"
        #: a ``SCAN MATCH`` pattern of the entity keys (not the generation keys)
        self.pattern = f"{prefix}:{{{name}:{digest}:*}}:*"
        #: what a lease's registration records (see :meth:`.Siblings.registration`)
        self.fields = (self.registry_field,)
        #: the pairs of the int primary keys read lately (at most _PAIRS, then forgotten)
        self._pairs: dict[int, tuple[str, str]] = {}
        #: whether loads may be answered from these keys (False: the database's row-level
        #: security decides which rows a session sees, or the table is a view); None until
        #: the registry asked
        self.served: bool | None = None
        #: whether the database may rewrite a row as it is written (a trigger): commits
        #: invalidate; set with ``served``
        self.rewritten = False
        #: whether the database's triggers write the model's table themselves, maybe other
        #: rows than the flush wrote: every write invalidates the model whole; set with
        #: ``served``
        self.self_written = False

    def pair(self, pk: Sequence[Any]) -> tuple[str, str]:
        """(entity key, generation key) of one primary key."""
        if len(pk) == 1:
            value = pk[0]
            if type(value) is int:  # only ints: True == 1, and must not share its key
                found = self._pairs.get(value)
                if found is not None:
                    return found
                return self._int_pair(value)
            part = encode_pk_part(value)
        else:
            part = ":".join([encode_pk_part(v) for v in pk])
        tag = self._tags[zlib.crc32(part.encode()) % self._buckets]
        return f"{tag}:{part}", tag

    def pairs_of(self, values: Sequence[Any]) -> list[tuple[str, str]]:
        """:meth:`pair` of many single-column primary keys (the batch read path). When all
        are ints whose pairs are kept (rows read again, most often), one ``itemgetter`` call
        looks every one up, in C."""
        if len(values) > 1 and set(map(type, values)) == _INT:
            try:
                return list(itemgetter(*values)(self._pairs))
            except KeyError:  # one not kept: the loop below makes it
                pass
        tags, buckets, crc32, part_of = self._tags, self._buckets, zlib.crc32, encode_pk_part
        known = self._pairs.get
        found: list[tuple[str, str]] = []
        append = found.append
        for value in values:
            if type(value) is int:
                pair = known(value)
                append(self._int_pair(value) if pair is None else pair)
                continue
            part = part_of(value)
            tag = tags[crc32(part.encode()) % buckets]
            append((f"{tag}:{part}", tag))
        return found

    def _int_pair(self, value: int) -> tuple[str, str]:
        """:meth:`pair` of an int primary key, kept for the next reads of it: rows read once
        are often read again, and the key costs a string, its bytes and a CRC."""
        part = str(value)
        tag = self._tags[zlib.crc32(part.encode()) % self._buckets]
        pair = (f"{tag}:{part}", tag)
        pairs = self._pairs
        if len(pairs) >= _PAIRS:
            pairs.clear()
        pairs[value] = pair
        return pair

    def pair_of_part(self, part: str) -> tuple[str, str]:
        """(entity key, generation key) of a primary key already encoded (the part of an
        entity key after its generation key and ``:``): the same row in this keyspace."""
        tag = self._tags[zlib.crc32(part.encode()) % self._buckets]
        return f"{tag}:{part}", tag

    def generation_keys(self) -> list[str]:
        return list(self._tags)


def keyspace_of(prefix: str, registry_field: str) -> tuple[str, str, KeySpace]:
    """(table, digest, keyspace) of a registry field written by :class:`KeySpace`."""
    table, digest, buckets = registry_field.rsplit("|", 2)
    return table, digest, KeySpace(prefix, table, digest, int(buckets))


def generation_keys_of(prefix: str, registry_field: str) -> tuple[str, list[str]]:
    """(table, generation keys) of a registry field written by :class:`KeySpace`."""
    table, _, keys = keyspace_of(prefix, registry_field)
    return table, keys.generation_keys()
