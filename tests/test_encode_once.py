"""A commit encodes each updated row's columns once: before_flush encodes the row as loaded
(the lock's expected payload, see test_stale_loaded_columns.py) and keeps the stored values it
made; after_flush's publish reuses the stored value of each column still holding the very
immutable object encoded then, and encodes the others (``_RowCodec.flushed_again``).

What a user can see of it is only the entries: every payload a commit publishes must be, byte
for byte, what a fresh load of the row would fill, whatever changed between the two encodes (a
column the transaction changed, a ``before_update`` listener's new value, a JSON document
changed in place during the flush, an equal value assigned, a second flush, a failed flush).
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy import (
    JSON,
    DateTime,
    Enum,
    Integer,
    LargeBinary,
    Numeric,
    String,
    event,
    select,
)
from sqlalchemy import types as sa_types
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    attributes,
    mapped_column,
    sessionmaker,
)

from sqlalchemy_writethrough import CachedModel, WriteThroughCache, codec
from sqlalchemy_writethrough.protocol import payload_of

from _cache_helpers import entry_key
from _servers import capture_sql, reset_schema

pytestmark = pytest.mark.databases("sqlite", "postgresql")


class Base(DeclarativeBase):
    pass


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


class EoRow(Base, CachedModel):
    __tablename__ = "eo_row"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    price: Mapped[Decimal] = mapped_column(Numeric(10, 2))
    at: Mapped[dt.datetime] = mapped_column(DateTime)
    qty: Mapped[int | None] = mapped_column(Integer, nullable=True)
    colour: Mapped[Colour] = mapped_column(Enum(Colour))
    stamp: Mapped[str | None] = mapped_column(String(40), nullable=True)


class EoDoc(Base, CachedModel):
    """A JSON document: a commit that leaves it unwritten invalidates the row (it may have
    been changed in place, unseen), so each test here writes it."""

    __tablename__ = "eo_doc"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    price: Mapped[Decimal] = mapped_column(Numeric(10, 2))
    colour: Mapped[Colour] = mapped_column(Enum(Colour))
    doc: Mapped[Any] = mapped_column(JSON)
    blob: Mapped[Any] = mapped_column(LargeBinary)


class EoPair(Base, CachedModel):
    """A composite primary key."""

    __tablename__ = "eo_pair"

    a: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    b: Mapped[str] = mapped_column(String(10), primary_key=True)
    price: Mapped[Decimal] = mapped_column(Numeric(10, 2))
    at: Mapped[dt.datetime] = mapped_column(DateTime)


ROWS = 4
AT = dt.datetime(2024, 5, 6, 7, 8, 9, 123456)


def _row(i: int) -> EoRow:
    return EoRow(
        id=i,
        name=f"row {i}",
        price=Decimal("1.50"),
        at=AT,
        qty=None if i % 2 else i,
        colour=Colour.RED,
        stamp=None,
    )


def _doc(i: int) -> EoDoc:
    return EoDoc(
        id=i, price=Decimal("1.50"), colour=Colour.RED, doc={"n": i, "tags": ["a"]}, blob=b"abc"
    )


class Env:
    def __init__(self, engine: Engine, cache: WriteThroughCache, client: redis.Redis) -> None:
        self.engine = engine
        self.cache = cache
        self.client = client
        self.maker = sessionmaker(engine)
        cache.install(self.maker)

    def payload(self, model: type, *pk: Any) -> bytes | None:
        """The payload of the row's VALUE entry, None when the entry is not a VALUE."""
        raw = self.client.get(entry_key(self.cache, model, *pk))
        if raw is None or raw[:1] != b"V":
            return None
        return bytes(payload_of(raw))

    def filled(self, model: type, *pk: Any) -> bytes:
        """What a fresh load of the row fills its entry with."""
        self.cache.invalidate(model, pk if len(pk) > 1 else pk[0])
        with self.maker() as s, capture_sql(self.engine) as sql:
            assert s.get(model, pk if len(pk) > 1 else pk[0]) is not None
        assert len(sql) == 1, sql
        payload = self.payload(model, *pk)
        assert payload is not None, "the load did not fill the entry"
        return payload

    def check(
        self, published: dict[Any, bytes | None], model: type = EoRow, misses: bool = False
    ) -> None:
        """Each payload the commit published is what a fresh load fills (taken after reading
        them all: filling one row changes no other); ``misses``: a row the commit left as a
        miss is fine (else each must have been published)."""
        for pk, payload in published.items():
            pk = pk if isinstance(pk, tuple) else (pk,)
            if payload is None and misses:
                continue
            assert payload is not None, f"{model.__name__}{pk}: the commit left no VALUE"
            assert payload == self.filled(model, *pk), f"{model.__name__}{pk}"

    def published(self, model: type = EoRow, pks: Any = range(1, ROWS + 1)) -> dict[Any, Any]:
        return {pk: self.payload(model, *(pk if isinstance(pk, tuple) else (pk,))) for pk in pks}


@pytest.fixture
def env(engine: Engine, redis_url: str, prefix: str) -> Iterator[Env]:
    reset_schema(engine, Base.metadata)
    client = redis.Redis.from_url(redis_url, socket_timeout=2)
    cache = WriteThroughCache(client, prefix=prefix, stats_interval=None)
    found = Env(engine, cache, client)
    with found.maker() as s:
        s.add_all([_row(i) for i in range(1, ROWS + 1)])
        s.add_all([_doc(i) for i in range(1, ROWS + 1)])
        s.add(EoPair(a=1, b="x", price=Decimal("2.25"), at=AT))
        s.commit()
    try:
        yield found
    finally:
        cache.close()
        client.close()


def _load(s: Session) -> list[EoRow]:
    return list(s.scalars(select(EoRow).order_by(EoRow.id)))


def _docs(s: Session) -> list[EoDoc]:
    return list(s.scalars(select(EoDoc).order_by(EoDoc.id)))


def test_changed_and_unchanged_columns_of_every_type(env: Env) -> None:
    """Rows loaded with select(): each changes other columns (Numeric, DateTime, int to and
    from NULL, Enum, str), the others keep the values encoded before the flush."""
    with env.maker() as s:
        rows = _load(s)
        rows[0].price = rows[0].price + Decimal("0.01")
        rows[0].qty = 7  # NULL to a value
        rows[1].at = AT + dt.timedelta(microseconds=1)
        rows[1].colour = Colour.BLUE
        rows[2].name = "renamed"
        rows[2].qty = None  # a value to NULL
        rows[3].price = Decimal("9.99")
        rows[3].at = dt.datetime(2030, 1, 1)
        s.commit()
    published = env.published()
    env.check(published)
    with env.maker() as s:
        assert [r.colour for r in _load(s)] == [Colour.RED, Colour.BLUE, Colour.RED, Colour.RED]


def test_a_composite_key(env: Env) -> None:
    with env.maker() as s:
        row = s.get(EoPair, (1, "x"))
        assert row is not None
        row.price = Decimal("3.10")
        s.commit()
    env.check(env.published(EoPair, [(1, "x")]), EoPair)


def test_a_column_assigned_an_equal_value(env: Env) -> None:
    """An equal new object (``1.5`` over ``1.50``, an equal datetime, an equal str): the UPDATE
    leaves it out, the entry keeps the loaded form."""
    with env.maker() as s:
        rows = _load(s)
        for row in rows:
            row.price = Decimal("1.5")
            row.at = dt.datetime(AT.year, AT.month, AT.day, 7, 8, 9, 123456)
            row.name = "".join(["row ", str(row.id)])
        rows[0].qty = 42  # one column really changes
        s.commit()
    published = env.published()
    env.check(published)
    with env.maker() as s:
        assert str(s.get(EoRow, 2).price) == "1.50"  # type: ignore[union-attr]


def test_json_assigned_a_new_document(env: Env) -> None:
    with env.maker() as s:
        docs = _docs(s)
        for row in docs:
            row.doc = {**row.doc, "n": 100 + row.id}
        docs[0].price = Decimal("5.00")
        docs[1].colour = Colour.BLUE
        s.commit()
    env.check(env.published(EoDoc), EoDoc)


def test_json_changed_in_place_with_flag_modified(env: Env) -> None:
    """Its value before the flush is not known (the same object, changed): the commit leaves
    a miss or publishes the row as the database holds it."""
    with env.maker() as s:
        docs = _docs(s)
        for row in docs:
            row.doc["n"] = 100 + row.id
            attributes.flag_modified(row, "doc")
        docs[0].price = Decimal("5.00")
        s.commit()
    env.check(env.published(EoDoc), EoDoc, misses=True)
    with env.maker() as s:
        assert [d.doc["n"] for d in _docs(s)] == [101, 102, 103, 104]


def test_json_changed_in_place_without_flag_modified_is_left_a_miss(env: Env) -> None:
    """The ORM does not see the change, the database keeps the old document: the commit
    leaves a miss (as before), and the fill holds the old document."""
    with env.maker() as s:
        row = _docs(s)[0]
        row.doc["n"] = 999
        row.price = Decimal("5.00")
        s.commit()
    assert env.payload(EoDoc, 1) is None
    env.filled(EoDoc, 1)
    with env.maker() as s, capture_sql(env.engine) as sql:
        got = s.get(EoDoc, 1)
        assert got is not None and got.doc["n"] == 1 and got.price == Decimal("5.00")
    assert sql == []


@pytest.fixture
def listener() -> Iterator[list[Any]]:
    """A ``before_update`` listener of EoRow and EoDoc that runs, during the flush (after
    before_flush encoded the rows as loaded), each function appended to the list on the
    row."""
    functions: list[Any] = []

    def before_update(mapper: Any, connection: Any, target: Any) -> None:
        for fn in functions:
            fn(target)

    for model in (EoRow, EoDoc):
        event.listen(model, "before_update", before_update)
    try:
        yield functions
    finally:
        for model in (EoRow, EoDoc):
            event.remove(model, "before_update", before_update)


def test_a_before_update_listener_changes_columns_during_the_flush(
    env: Env, listener: list[Any]
) -> None:
    """New objects (a str, a Decimal, an Enum member), after before_flush encoded the rows:
    each is encoded again."""

    def change(target: Any) -> None:
        if isinstance(target, EoRow):
            target.stamp = f"stamped {target.id}"
            target.price = target.price * 2
            target.colour = Colour.BLUE

    listener.append(change)
    with env.maker() as s:
        for row in _load(s):
            row.qty = 1000 + row.id
        s.commit()
    env.check(env.published())
    with env.maker() as s:
        assert all(r.stamp and r.price == Decimal("3.00") for r in _load(s))


def test_a_before_update_listener_changes_a_document_in_place(
    env: Env, listener: list[Any]
) -> None:
    """The very document object before_flush encoded with the row as loaded, changed in
    place during the flush (and flagged, so the UPDATE writes it): encoded again."""

    def change(target: Any) -> None:
        if isinstance(target, EoDoc):
            target.doc["seen"] = target.id
            attributes.flag_modified(target, "doc")

    listener.append(change)
    with env.maker() as s:
        for row in _docs(s):
            row.price = Decimal("6.00")
        s.commit()
    env.check(env.published(EoDoc), EoDoc)
    with env.maker() as s:
        assert [d.doc.get("seen") for d in _docs(s)] == [1, 2, 3, 4]


def test_two_flushes_in_one_transaction(env: Env) -> None:
    with env.maker() as s:
        rows = _load(s)
        rows[0].price = Decimal("2.00")
        rows[1].name = "first flush"
        s.flush()
        rows[0].at = AT + dt.timedelta(days=1)
        rows[1].price = Decimal("3.00")
        rows[2].colour = Colour.BLUE  # first written by the second flush
        s.flush()
        s.commit()
    env.check(env.published())


def test_a_failed_flush_retried_in_a_savepoint(env: Env, listener: list[Any]) -> None:
    """The flush fails after before_flush encoded the rows (a listener raises); the savepoint
    is rolled back and the changes flushed again, with other values, in the same transaction:
    nothing the failed flush kept is reused."""
    fail = [True]

    def maybe_fail(target: EoRow) -> None:
        if fail[0]:
            fail[0] = False
            raise RuntimeError("the flush fails")

    listener.append(maybe_fail)
    with env.maker() as s:
        rows = _load(s)
        with pytest.raises(RuntimeError), s.begin_nested():
            for row in rows:
                row.price = Decimal("7.77")
                row.name = "failed"
        for row in rows:
            row.price = Decimal("8.88")
            row.at = AT + dt.timedelta(hours=1)
        s.commit()
    published = env.published()
    env.check(published)
    with env.maker() as s:
        assert {(r.name, r.price) for r in _load(s)} == {
            (f"row {i}", Decimal("8.88")) for i in range(1, ROWS + 1)
        }


def test_a_failed_flush_and_a_new_transaction(env: Env) -> None:
    """A flush that fails in the database (a duplicate key inserted beside the updates): the
    transaction rolls back; the same objects changed again and committed publish what the
    database holds."""
    with env.maker() as s:
        rows = _load(s)
        for row in rows:
            row.price = Decimal("4.44")
        s.add(EoPair(a=1, b="x", price=Decimal("0"), at=AT))  # not loaded here: no warning
        with pytest.raises(IntegrityError):
            s.flush()
        s.rollback()
        for row in rows:
            row.price = Decimal("5.55")
            row.colour = Colour.BLUE
        s.commit()
    env.check(env.published())


def test_many_rows_and_commits(env: Env) -> None:
    """Several commits of the same rows, each changing a different column: each publish
    matches the fill (which replaces the entry the next commit locks)."""
    for step in range(6):
        with env.maker() as s:
            for row in _load(s):
                if step % 3 == 0:
                    row.price = row.price + Decimal("0.01")
                elif step % 3 == 1:
                    row.at = row.at + dt.timedelta(seconds=1)
                else:
                    row.qty = None if row.qty else step
            s.commit()
        env.check(env.published())


def test_a_before_update_listener_changes_a_bytearray_in_place(
    env: Env, listener: list[Any]
) -> None:
    """A column whose codec takes mutable values too (a LargeBinary holding a bytearray, kept
    by a session that does not expire on commit), changed in place during the flush: the
    very object before_flush encoded, so only its type tells it must be encoded again."""

    def change(target: Any) -> None:
        if isinstance(target, EoDoc):
            target.blob[0] = ord("X")
            attributes.flag_modified(target, "blob")

    with env.maker(expire_on_commit=False) as s:
        docs = _docs(s)
        for row in docs:
            row.blob = bytearray(b"abc")
            row.doc = {**row.doc}  # (a document left unwritten leaves a miss)
        s.commit()
        assert type(docs[0].blob) is bytearray
        env.check(env.published(EoDoc), EoDoc)
        listener.append(change)
        for row in docs:
            row.price = Decimal("6.00")
            row.doc = {**row.doc}
        s.commit()
    env.check(env.published(EoDoc), EoDoc)
    with env.maker() as s:
        assert {bytes(d.blob) for d in _docs(s)} == {b"Xbc"}


class _Str(str):
    pass


class _Int(int):
    pass


class _Float(float):
    pass


class _Stamp(dt.datetime):
    pass


_TYPES = [
    Integer(),
    sa_types.BigInteger(),
    sa_types.Boolean(),
    String(10),
    sa_types.Text(),
    sa_types.CHAR(3),
    Enum(Colour),
    Enum("a", "b", name="ab"),
    sa_types.Float(),
    sa_types.Double(),
    DateTime(),
    DateTime(timezone=True),
    sa_types.Date(),
    sa_types.Time(),
    sa_types.Interval(),
    sa_types.Uuid(),
    sa_types.Uuid(as_uuid=False),
]


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql", "mysql"])
def test_the_immutable_kinds_predict_only_immutable_values(dialect: str) -> None:
    """The codecs whose kept values after_flush reuses on identity alone (no type check,
    codec.IMMUTABLE_KINDS) let no mutable value through their ``exact``: a value they
    predicted cannot have been changed in place since."""
    from sqlalchemy.dialects import mysql, postgresql, sqlite

    dialects = {"sqlite": sqlite, "postgresql": postgresql, "mysql": mysql}
    found = dialects[dialect].dialect()
    ctx = codec.FlushContext(found)
    mutable = [
        bytearray(b"1"),
        memoryview(b"1"),
        [1],
        {"a": 1},
        {1},
        object(),
        _Str("a"),
        _Int(1),
        _Float(1.0),
        _Stamp(2024, 1, 1),
    ]
    kinds = set()
    for type_ in _TYPES:
        column = sa.Column("c", type_)
        col_codec = codec.column_codec(column, found, "T.c")
        assert type(col_codec) is codec.ColumnCodec
        kinds.add(col_codec.kind)
        if col_codec.kind not in codec.IMMUTABLE_KINDS:
            continue
        for value in mutable:
            assert col_codec.exact(value, ctx) is codec.NOT_EXACT, (type_, value)
    assert kinds >= codec.IMMUTABLE_KINDS  # every kind of the set was looked at
