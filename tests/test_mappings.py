"""Every kind of mapping, loaded through the cache and compared with a database load.

Invariants 4 and 7: whatever the mapping, an object built from Redis equals the object a session
without the cache loads, and behaves the same (lazy="raise", version counters, ``__init__`` not
called, deferred and computed attributes loaded on access).

* composite, natural (string) and UUID primary keys, including UPDATEs of the key itself;
* dataclass-mapped models (``MappedAsDataclass``) with defaults;
* deferred and excluded columns; ``expire_on_commit`` True and False;
* several engines: one sessionmaker with ``binds`` over SQLite, PostgreSQL and MariaDB, and one
  model on two databases with two caches;
* SQL expressions as values at flush time (``Model.n + 1``, ``func.now()``);
* ``column_property`` (``a + b``, a correlated count) and ``hybrid_property``;
* relationships with ``lazy="raise"``; ``__init__`` with side effects and ``@reconstructor``;
* ``version_id_col``: the cached version, and ``StaleDataError`` as without the cache;
* what the cache refuses (a polymorphic concrete base, Date / Numeric keys, PickleType, a 2-D ARRAY,
  a type with no stored form) is refused when the mapper is configured.

Inheritance hierarchies have their own module (test_inheritance.py).
"""

from __future__ import annotations

import dataclasses
import gc
import uuid
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy import (
    DateTime,
    ForeignKey,
    Integer,
    Numeric,
    PickleType,
    String,
    Text,
    Uuid,
    func,
    inspect,
    select,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Engine
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.ext.hybrid import hybrid_property
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    MappedAsDataclass,
    Session,
    column_property,
    composite,
    joinedload,
    mapped_column,
    reconstructor,
    relationship,
    sessionmaker,
    synonym,
    undefer,
)
from sqlalchemy.orm.exc import StaleDataError
from sqlalchemy.types import UserDefinedType

from sqlalchemy_writethrough import CachedModel, ConfigurationError, WriteThroughCache
from sqlalchemy_writethrough import from_cache as cache_option

from _cache_helpers import cached_values, entry_key, entry_state, keyspace
from _servers import capture_sql, reset_schema

# ------------------------------------------------------------------------------ models


class Base(DeclarativeBase):
    pass


class MxCountry(Base, CachedModel):
    """A natural string primary key."""

    __tablename__ = "mx_country"

    code: Mapped[str] = mapped_column(String(12), primary_key=True)
    name: Mapped[str] = mapped_column(String(40))


class MxCity(Base, CachedModel):
    """References a natural key with ``ON UPDATE CASCADE``: the database rewrites its rows."""

    __tablename__ = "mx_city"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    country_code: Mapped[str] = mapped_column(
        String(12), ForeignKey("mx_country.code", onupdate="CASCADE")
    )


class MxLine(Base, CachedModel):
    """A composite primary key; one of its attributes is named unlike its column."""

    __tablename__ = "mx_line"

    order_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    line_no: Mapped[int] = mapped_column("line_number", primary_key=True, autoincrement=False)
    qty: Mapped[int] = mapped_column()
    price: Mapped[Decimal] = mapped_column(Numeric(10, 2))


class MxToken(Base, CachedModel):
    """A UUID primary key."""

    __tablename__ = "mx_token"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    label: Mapped[str] = mapped_column(String(40))


class MxDoc(Base, CachedModel):
    """A deferred column and an excluded one: neither is stored; both load on access."""

    __tablename__ = "mx_doc"
    __writethrough__ = {"exclude": ["secret"]}

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    title: Mapped[str] = mapped_column(String(40))
    body: Mapped[str | None] = mapped_column(Text, deferred=True)
    secret: Mapped[str | None] = mapped_column(String(40))
    audit: Mapped[str | None] = mapped_column(String(40), deferred=True, deferred_raiseload=True)
    heading = synonym("title")


@dataclasses.dataclass
class Point:
    x: int
    y: int


class MxShape(Base, CachedModel):
    """A composite() value object over two columns."""

    __tablename__ = "mx_shape"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    corner: Mapped[Point] = composite(mapped_column("x"), mapped_column("y"))


class MxCounter(Base, CachedModel):
    __tablename__ = "mx_counter"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    n: Mapped[int] = mapped_column()
    stamp: Mapped[datetime | None] = mapped_column(DateTime)


class MxOrder(Base, CachedModel):
    """Computed attributes: column_property expressions (deferred: a load leaves them to be
    loaded on access, so the cache may serve the row; selected with it, they would keep the
    model's loads off the cache, see test_read_path) and a hybrid."""

    __tablename__ = "mx_order"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    a: Mapped[int] = mapped_column()
    b: Mapped[int] = mapped_column()
    total: Mapped[int] = column_property(a + b, deferred=True)

    @hybrid_property
    def doubled(self) -> int:
        return self.a * 2


class MxOrderItem(Base, CachedModel):
    __tablename__ = "mx_order_item"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    order_id: Mapped[int] = mapped_column(ForeignKey("mx_order.id"))
    sku: Mapped[str] = mapped_column(String(20))


MxOrder.n_items = column_property(
    select(func.count(MxOrderItem.id))
    .where(MxOrderItem.order_id == MxOrder.id)
    .correlate_except(MxOrderItem)
    .scalar_subquery(),
    deferred=True,
)


class MxParent(Base, CachedModel):
    __tablename__ = "mx_parent"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    children: Mapped[list[MxChild]] = relationship(back_populates="parent", lazy="raise")


class MxChild(Base, CachedModel):
    __tablename__ = "mx_child"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    parent_id: Mapped[int] = mapped_column(ForeignKey("mx_parent.id"))
    parent: Mapped[MxParent] = relationship(back_populates="children", lazy="raise")


INIT_CALLS: list[dict[str, Any]] = []
RECONSTRUCTED: list[int] = []


class MxCounted(Base, CachedModel):
    """``__init__`` with side effects; ``@reconstructor`` runs on every load instead."""

    __tablename__ = "mx_counted"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))

    def __init__(self, **kwargs: Any) -> None:
        INIT_CALLS.append(kwargs)
        self.scratch: list[str] = ["set by __init__"]
        super().__init__(**kwargs)

    @reconstructor
    def _loaded(self) -> None:
        RECONSTRUCTED.append(self.id)


class MxVersioned(Base, CachedModel):
    __tablename__ = "mx_versioned"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    version: Mapped[int] = mapped_column(nullable=False)

    __mapper_args__ = {"version_id_col": version}


class DcBase(MappedAsDataclass, DeclarativeBase):
    pass


class MxDcItem(DcBase, CachedModel):
    """A dataclass-mapped model with defaults."""

    __tablename__ = "mx_dc_item"

    name: Mapped[str] = mapped_column(String(40))
    id: Mapped[int] = mapped_column(primary_key=True, default=None)
    qty: Mapped[int] = mapped_column(default=1)
    note: Mapped[str | None] = mapped_column(String(40), default=None)


class BindBase(DeclarativeBase):
    pass


class MxBoundA(BindBase, CachedModel):
    __tablename__ = "mx_bound_a"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    amount: Mapped[Decimal] = mapped_column(Numeric(10, 2))


class MxBoundB(BindBase, CachedModel):
    __tablename__ = "mx_bound_b"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    amount: Mapped[Decimal] = mapped_column(Numeric(10, 2))


class MxBoundC(BindBase, CachedModel):
    __tablename__ = "mx_bound_c"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    amount: Mapped[Decimal] = mapped_column(Numeric(10, 2))


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture
def db(engine: Engine) -> Engine:
    reset_schema(engine, Base.metadata)
    reset_schema(engine, DcBase.metadata)
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


# ----------------------------------------------------------------------------- helpers


def column_values(obj: Any) -> dict[str, Any]:
    """Every column attribute (deferred, excluded and computed ones load on access)."""
    return {p.key: getattr(obj, p.key) for p in inspect(type(obj)).column_attrs}


def fresh(engine: Engine, model: type, pk: Any) -> dict[str, Any] | None:
    """The row as a session without the cache loads it (None: no row)."""
    with Session(engine) as s:
        obj = s.get(model, pk)
        return None if obj is None else column_values(obj)


def served_from_cache(
    factory: sessionmaker[Session], engine: Engine, model: type, pk: Any
) -> dict[str, Any]:
    """``session.get`` served from Redis: the entity takes no SQL (attributes that are not
    stored may load afterwards, on access)."""
    with factory() as s:
        with capture_sql(engine) as sql:
            obj = s.get(model, pk)
        assert sql == [], f"expected a cache hit for {model.__name__}({pk!r})"
        assert obj is not None
        return column_values(obj)


def state(cache: WriteThroughCache, client: redis.Redis, model: type, *pk: Any) -> str | None:
    return entry_state(client, entry_key(cache, model, *pk))


def is_current_value(cache: WriteThroughCache, client: redis.Redis, model: type, *pk: Any) -> bool:
    """The entry is a VALUE of its bucket's current generation (a VALUE left from before a
    whole-model invalidation is a miss)."""
    key, gen_key = keyspace(cache, model).pair(list(pk))
    raw, gen = client.mget(key, gen_key)
    return raw is not None and raw[:1] == b"V" and raw[1 : raw.index(b":", 1)] == gen


def assert_served_like_database(
    factory: sessionmaker[Session],
    engine: Engine,
    cache: WriteThroughCache,
    client: redis.Redis,
    model: type,
    pk: Any,
) -> dict[str, Any]:
    """The row through the cache (a fill first if the commit left a miss) equals the row a
    database load returns."""
    key_parts = pk if isinstance(pk, tuple) else (pk,)
    if not is_current_value(cache, client, model, *key_parts):
        with factory() as s:
            assert s.get(model, pk) is not None  # the load that fills
    served = served_from_cache(factory, engine, model, pk)
    assert served == fresh(engine, model, pk)
    return served


# ------------------------------------------------------------------------ primary keys


def test_natural_string_key_and_its_update(
    factory: sessionmaker[Session], db: Engine, cache: WriteThroughCache, client: redis.Redis
) -> None:
    """String keys (one with the key separator and hash-tag characters in it) are served from
    the cache; an UPDATE of the key itself leaves the old key a miss that finds no row, and the
    new key a miss that fills with the row: the row's other columns come from memory, and no
    entry under the new key can tell that nobody changed them since the load
    (test_stale_loaded_columns.py)."""
    with factory() as s:
        s.add_all([MxCountry(code="FR", name="France"), MxCountry(code="a:b{c}%d", name="odd")])
        s.commit()
    assert_served_like_database(factory, db, cache, client, MxCountry, "FR")
    assert_served_like_database(factory, db, cache, client, MxCountry, "a:b{c}%d")

    with factory() as s:
        country = s.get(MxCountry, "FR")
        assert country is not None
        country.code = "FX"
        s.commit()
    assert state(cache, client, MxCountry, "FR") is None
    with factory() as s:
        assert s.get(MxCountry, "FR") is None
    assert fresh(db, MxCountry, "FR") is None
    assert state(cache, client, MxCountry, "FR") is None  # no row, nothing filled
    assert state(cache, client, MxCountry, "FX") is None
    served = assert_served_like_database(factory, db, cache, client, MxCountry, "FX")
    assert state(cache, client, MxCountry, "FX") == "value"
    assert served == {"code": "FX", "name": "France"}


def test_natural_key_update_cascading_to_cached_rows(
    factory: sessionmaker[Session], db: Engine, cache: WriteThroughCache, client: redis.Redis
) -> None:
    """Renaming a natural key that another cached model references with ``ON UPDATE
    CASCADE``: the database rewrites the referencing rows, and the cache serves them as the
    database holds them afterwards (never the old key)."""
    if db.dialect.name == "sqlite":
        with factory() as s:
            s.connection().exec_driver_sql("PRAGMA foreign_keys=ON")
            s.commit()
    with factory() as s:
        s.add(MxCountry(code="FR", name="France"))
        s.flush()
        s.add_all([MxCity(id=1, name="Paris", country_code="FR"), MxCity(id=2, name="Lyon",
                   country_code="FR")])  # fmt: skip
        s.commit()
    assert served_from_cache(factory, db, MxCity, 1)["country_code"] == "FR"
    with factory() as s:
        if db.dialect.name == "sqlite":
            s.connection().exec_driver_sql("PRAGMA foreign_keys=ON")
        country = s.get(MxCountry, "FR")
        assert country is not None
        country.code = "FX"
        s.commit()
    assert fresh(db, MxCity, 1) == {"id": 1, "name": "Paris", "country_code": "FX"}
    for pk in (1, 2):
        served = assert_served_like_database(factory, db, cache, client, MxCity, pk)
        assert served["country_code"] == "FX"


def test_composite_key_and_its_update(
    factory: sessionmaker[Session], db: Engine, cache: WriteThroughCache, client: redis.Redis
) -> None:
    """A composite key: each row has its own entry; changing one part of the key moves the row
    to the new key and leaves the old one a miss."""
    with factory() as s:
        s.add_all(
            [
                MxLine(order_id=1, line_no=1, qty=3, price=Decimal("9.99")),
                MxLine(order_id=1, line_no=2, qty=1, price=Decimal("0.50")),
                MxLine(order_id=2, line_no=1, qty=7, price=Decimal("100.00")),
            ]
        )
        s.commit()
    for pk in ((1, 1), (1, 2), (2, 1)):
        assert_served_like_database(factory, db, cache, client, MxLine, pk)
    with factory() as s, capture_sql(db) as sql:  # the other ways to name the same row
        by_dict = s.get(MxLine, {"order_id": 2, "line_no": 1})
        by_select = s.scalars(
            select(MxLine).where(MxLine.line_no == 1, MxLine.order_id == 2).options(cache_option())
        ).one()
        assert by_dict is by_select and by_dict is not None and by_dict.qty == 7
    assert sql == []

    with factory() as s:
        line = s.get(MxLine, (1, 2))
        assert line is not None
        line.line_no = 5
        line.qty = 4
        s.commit()
    assert state(cache, client, MxLine, 1, 2) is None
    with factory() as s:
        assert s.get(MxLine, (1, 2)) is None
    served = assert_served_like_database(factory, db, cache, client, MxLine, (1, 5))
    assert served["qty"] == 4
    assert served_from_cache(factory, db, MxLine, (1, 1))["qty"] == 3  # the neighbours are intact


def test_uuid_key_and_its_update(
    factory: sessionmaker[Session], db: Engine, cache: WriteThroughCache, client: redis.Redis
) -> None:
    """UUID keys (generated by a Python default at flush) are published and served; a new
    UUID for the row moves it."""
    with factory() as s:
        token = MxToken(label="first")
        s.add(token)
        s.commit()
        old = token.id
    assert isinstance(old, uuid.UUID)
    assert state(cache, client, MxToken, old) == "value"
    assert_served_like_database(factory, db, cache, client, MxToken, old)

    new = uuid.uuid4()
    with factory() as s:
        obj = s.get(MxToken, old)
        assert obj is not None
        obj.id = new
        obj.label = "moved"
        s.commit()
    assert state(cache, client, MxToken, old) is None
    with factory() as s:
        assert s.get(MxToken, old) is None
    assert assert_served_like_database(factory, db, cache, client, MxToken, new)["label"] == "moved"


@pytest.mark.databases("mariadb")
def test_case_insensitive_key_is_not_filled_under_another_spelling(
    factory: sessionmaker[Session], db: Engine, cache: WriteThroughCache, client: redis.Redis
) -> None:
    """MariaDB's collation matches ``"fr"`` and ``"FR "`` to the row ``"FR"``: the cached
    session returns what a plain one does, and fills no entry under the other spelling."""
    with factory() as s:
        s.add(MxCountry(code="FR", name="France"))
        s.commit()
    for spelling in ("fr", "FR "):
        with Session(db) as s:
            plain = s.get(MxCountry, spelling)
            expected = None if plain is None else column_values(plain)
        with factory() as s:
            obj = s.get(MxCountry, spelling)
            got = None if obj is None else column_values(obj)
        assert got == expected
        assert state(cache, client, MxCountry, spelling) is None
    assert served_from_cache(factory, db, MxCountry, "FR") == {"code": "FR", "name": "France"}


# ----------------------------------------------------------------- dataclasses, columns


def test_dataclass_model_with_defaults(
    factory: sessionmaker[Session], db: Engine, cache: WriteThroughCache, client: redis.Redis
) -> None:
    """A MappedAsDataclass model: the dataclass defaults reach the database and the cache; the
    cached instance equals (dataclass ``==``) the database-loaded one and has its repr."""
    with factory() as s:
        item = MxDcItem(name="bolt")
        s.add(item)
        s.commit()
        pk = item.id
    assert state(cache, client, MxDcItem, pk) == "value"
    with factory() as s, capture_sql(db) as sql:
        cached = s.get(MxDcItem, pk)
        assert cached is not None
        cached_repr = repr(cached)
        with Session(db) as plain:
            loaded = plain.get(MxDcItem, pk)
            assert loaded is not None
            sql.clear()
            assert cached == loaded
            assert cached_repr == repr(loaded)
    assert sql == []
    assert (cached.name, cached.qty, cached.note) == ("bolt", 1, None)

    with factory() as s:
        obj = s.get(MxDcItem, pk)
        assert obj is not None
        obj.qty = 5
        obj.note = "boxed"
        s.commit()
    served = assert_served_like_database(factory, db, cache, client, MxDcItem, pk)
    assert served == {"name": "bolt", "id": pk, "qty": 5, "note": "boxed"}


def test_deferred_and_excluded_columns_load_on_access(
    factory: sessionmaker[Session], db: Engine, cache: WriteThroughCache, client: redis.Redis
) -> None:
    """Neither a deferred nor an excluded column is in Redis; on a cached instance each loads
    on access, as after a database load, and equals the database's value; ``undefer()``
    bypasses the cache. Updates of either column are seen by the next read."""
    with factory() as s:
        s.add(MxDoc(id=1, title="t", body="long text", secret="s3cret"))
        s.commit()
    held = cached_values(cache, client, MxDoc, 1, dialect=db.dialect)
    assert held == {"id": 1, "title": "t"}

    with factory() as s:
        with capture_sql(db) as sql:
            doc = s.get(MxDoc, 1)
            assert doc is not None
            assert doc.title == "t"
        assert sql == []
        with capture_sql(db) as sql:
            assert doc.body == "long text"
            assert doc.secret == "s3cret"
        assert len(sql) == 2  # each loads on access, as after a database load
        assert doc.heading == "t"
        with pytest.raises(InvalidRequestError) as cached_error:
            doc.audit  # noqa: B018 - deferred_raiseload raises, as after a database load
    with Session(db) as s:
        loaded = s.get(MxDoc, 1)
        assert loaded is not None
        with pytest.raises(InvalidRequestError) as loaded_error:
            loaded.audit  # noqa: B018
    assert str(cached_error.value) == str(loaded_error.value)
    with factory() as s, capture_sql(db) as sql:
        doc = s.get(MxDoc, 1, options=[undefer(MxDoc.body)])
        assert doc is not None and "body" in doc.__dict__
    assert len(sql) == 1  # a loader option: served by the database

    with factory() as s:
        doc = s.get(MxDoc, 1)
        assert doc is not None
        doc.body = "new text"
        doc.secret = "other"
        s.commit()
    with factory() as s:
        doc = s.get(MxDoc, 1, options=[undefer(MxDoc.audit)])
        assert doc is not None
        served = {k: getattr(doc, k) for k in ("id", "title", "body", "secret", "audit")}
    assert served == {"id": 1, "title": "t", "body": "new text", "secret": "other", "audit": None}


@pytest.mark.parametrize("expire_on_commit", [True, False], ids=["expire", "keep"])
def test_expire_on_commit(
    db: Engine, cache: WriteThroughCache, client: redis.Redis, expire_on_commit: bool
) -> None:
    """With expire_on_commit=False the committed objects keep their values (no SQL on access)
    and the cache still holds the committed row; with True they reload from the entry the
    commit published (no SQL either). Either way a new session's ``get`` is served from the
    cache and equals the database."""
    maker = sessionmaker(db, expire_on_commit=expire_on_commit)
    cache.install(maker)
    with maker() as s:
        country = MxCountry(code="DE", name="Germany")
        s.add(country)
        s.commit()
        with capture_sql(db) as sql:
            assert country.name == "Germany"
        assert sql == []
        country.name = "Deutschland"
        s.commit()
        with capture_sql(db) as sql:
            assert country.name == "Deutschland"
        assert sql == []
        assert state(cache, client, MxCountry, "DE") == "value"
        with maker() as other:
            with capture_sql(db) as sql:
                other_country = other.get(MxCountry, "DE")
            assert sql == []
            assert other_country is not None and other_country.name == "Deutschland"
    assert served_from_cache(maker, db, MxCountry, "DE") == fresh(db, MxCountry, "DE")


def test_composite_value_object(
    factory: sessionmaker[Session], db: Engine, cache: WriteThroughCache, client: redis.Redis
) -> None:
    """A ``composite()`` attribute is rebuilt from its cached columns, equal to a load's; an
    update through it is published."""
    with factory() as s:
        s.add(MxShape(id=1, corner=Point(2, 3)))
        s.commit()
    with factory() as s, capture_sql(db) as sql:
        shape = s.get(MxShape, 1)
        assert shape is not None
        corner = shape.corner
    assert sql == []
    with Session(db) as s:
        loaded = s.get(MxShape, 1)
        assert loaded is not None
        assert corner == loaded.corner == Point(2, 3)
    with factory() as s:
        shape = s.get(MxShape, 1)
        assert shape is not None
        shape.corner = Point(5, 8)
        s.commit()
    assert state(cache, client, MxShape, 1) == "value"
    assert served_from_cache(factory, db, MxShape, 1)["x"] == 5
    with factory() as s:
        shape = s.get(MxShape, 1)
        assert shape is not None and shape.corner == Point(5, 8)


# ------------------------------------------------------------------------ several databases


def test_one_sessionmaker_with_binds_over_three_databases(
    tmp_path: Path, postgresql_url: str, mariadb_url: str, redis_url: str, prefix: str
) -> None:
    """``sessionmaker(binds={A: SQLite, B: PostgreSQL, C: MariaDB})`` with one cache: each
    model's rows are published with its own database's exactness rules (``Numeric(10, 2)``
    rounds ``1.005`` to 1.00 on SQLite and to 1.01 on the servers) and served like a load
    from its own database."""
    engines = {
        MxBoundA: sa.create_engine(f"sqlite:///{tmp_path / 'binds.db'}"),
        MxBoundB: sa.create_engine(postgresql_url),
        MxBoundC: sa.create_engine(mariadb_url),
    }
    client = redis.Redis.from_url(redis_url, socket_timeout=1)
    try:
        for engine in engines.values():
            reset_schema(engine, BindBase.metadata)
        cache = WriteThroughCache(client, prefix=prefix)
        maker = sessionmaker(binds=dict(engines))
        cache.install(maker)
        with maker() as s:
            for i, model in enumerate(engines):
                s.add(model(id=1, name=f"{model.__name__} row", amount=Decimal("1.005") + i))
            s.commit()
        expected = {MxBoundA: Decimal("1.00"), MxBoundB: Decimal("2.01"), MxBoundC: Decimal("3.01")}
        for model, engine in engines.items():
            assert state(cache, client, model, 1) == "value"
            with maker() as s:
                with capture_sql(engine) as sql:
                    obj = s.get(model, 1)
                assert sql == []
                assert obj is not None
                served = column_values(obj)
            assert served == fresh(engine, model, 1)
            assert served["amount"] == expected[model]
            assert served["amount"].as_tuple() == expected[model].as_tuple()
            for other in engines:  # the table exists everywhere; only the bound one has rows
                if engines[other] is not engine:
                    assert fresh(engine, other, 1) is None
    finally:
        client.close()
        for engine in engines.values():
            engine.dispose()


def test_one_model_on_two_databases_with_two_caches(
    tmp_path: Path, postgresql_url: str, redis_url: str, prefix: str
) -> None:
    """The same model on SQLite and on PostgreSQL (two sessionmakers, two caches with their own
    prefixes): rows with the same key but different values never mix."""
    sqlite_engine = sa.create_engine(f"sqlite:///{tmp_path / 'two.db'}")
    pg_engine = sa.create_engine(postgresql_url)
    client = redis.Redis.from_url(redis_url, socket_timeout=1)
    try:
        pairs = []
        for engine, suffix in ((sqlite_engine, "lite"), (pg_engine, "pg")):
            reset_schema(engine, BindBase.metadata)
            cache = WriteThroughCache(client, prefix=f"{prefix}-{suffix}")
            maker = sessionmaker(engine)
            cache.install(maker)
            with maker() as s:
                s.add(MxBoundA(id=1, name=suffix, amount=Decimal("2.675")))
                s.commit()
            pairs.append((engine, cache, maker, suffix))
        for engine, cache, maker, suffix in pairs:
            assert state(cache, client, MxBoundA, 1) == "value"
            served = served_from_cache(maker, engine, MxBoundA, 1)
            assert served["name"] == suffix
            assert served == fresh(engine, MxBoundA, 1)
        assert served_from_cache(pairs[0][2], sqlite_engine, MxBoundA, 1)["amount"] == Decimal(
            "2.67"
        )
        assert served_from_cache(pairs[1][2], pg_engine, MxBoundA, 1)["amount"] == Decimal("2.68")
    finally:
        client.close()
        sqlite_engine.dispose()
        pg_engine.dispose()


# ------------------------------------------------------------------- computed at flush


def test_sql_expression_values_leave_a_miss(
    factory: sessionmaker[Session], db: Engine, cache: WriteThroughCache, client: redis.Redis
) -> None:
    """Values that are SQL expressions (``Model.n + 1``, ``func.now()``) are known only after
    a database round trip: the UPDATE's commit leaves a miss (never the expression or the old
    value), and the next read returns the database's values. An INSERT with an expression
    either publishes what the database returned or leaves a miss."""
    with factory() as s:
        s.add(MxCounter(id=1, n=1))
        s.add(MxCounter(id=2, n=sa.literal(40) + 2))
        s.commit()
    assert state(cache, client, MxCounter, 2) in ("value", None)
    assert assert_served_like_database(factory, db, cache, client, MxCounter, 2)["n"] == 42

    with factory() as s:
        counter = s.get(MxCounter, 1)
        assert counter is not None
        counter.n = MxCounter.n + 1
        counter.stamp = func.now()
        s.commit()
    assert state(cache, client, MxCounter, 1) is None
    served = assert_served_like_database(factory, db, cache, client, MxCounter, 1)
    assert served["n"] == 2 and isinstance(served["stamp"], datetime)

    with factory() as s:  # twice in one transaction, with a flush in between
        counter = s.get(MxCounter, 1)
        assert counter is not None
        counter.n = MxCounter.n + 10
        s.flush()
        counter.n = MxCounter.n * 2
        s.commit()
    assert state(cache, client, MxCounter, 1) is None
    assert assert_served_like_database(factory, db, cache, client, MxCounter, 1)["n"] == 24


def test_column_property_and_hybrid_property(
    factory: sessionmaker[Session], db: Engine, cache: WriteThroughCache, client: redis.Redis
) -> None:
    """A cached instance (built with no SQL) gives the same deferred ``column_property``
    values as a database load (they load on access, so a correlated count is never stale) and the same
    hybrid values; the hybrid also works in a query through the cached session."""
    with factory() as s:
        s.add(MxOrder(id=1, a=2, b=3))
        s.add_all([MxOrderItem(id=1, order_id=1, sku="x"), MxOrderItem(id=2, order_id=1, sku="y")])
        s.commit()
    assert cached_values(cache, client, MxOrder, 1, dialect=db.dialect) == {"id": 1, "a": 2, "b": 3}

    def both() -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
        with factory() as s:
            with capture_sql(db) as sql:
                order = s.get(MxOrder, 1)
            assert sql == []
            assert order is not None
            cached = (order.a, order.total, order.n_items, order.doubled)
        with Session(db) as s:
            loaded = s.get(MxOrder, 1)
            assert loaded is not None
            return cached, (loaded.a, loaded.total, loaded.n_items, loaded.doubled)

    cached, loaded = both()
    assert cached == loaded == (2, 5, 2, 4)

    with factory() as s:  # another table changes: the count must not come from the cache
        s.add(MxOrderItem(id=3, order_id=1, sku="z"))
        order = s.get(MxOrder, 1)
        assert order is not None
        order.b = 10
        s.commit()
    if state(cache, client, MxOrder, 1) is None:
        with factory() as s:
            s.get(MxOrder, 1)  # fill
    cached, loaded = both()
    assert cached == loaded == (2, 12, 3, 4)

    with factory() as s:
        found = s.scalars(select(MxOrder).where(MxOrder.doubled == 4)).all()
        assert [o.id for o in found] == [1]


def test_lazy_raise_relationships_raise_as_without_the_cache(
    factory: sessionmaker[Session], db: Engine
) -> None:
    """``lazy="raise"`` on both sides: a cached instance raises the same error, with the same
    message, as a database-loaded one; an eager option on ``get`` bypasses the cache and loads
    the relationship."""
    with factory() as s:
        s.add(MxParent(id=1, name="p"))
        s.add(MxChild(id=1, parent_id=1))
        s.commit()

    def errors(maker: Any) -> list[tuple[type, str]]:
        found = []
        with maker() as s:
            child = s.get(MxChild, 1)
            parent = s.get(MxParent, 1)
            for access in (lambda: child.parent, lambda: parent.children):
                with pytest.raises(InvalidRequestError) as caught:
                    access()
                found.append((type(caught.value), str(caught.value)))
        return found

    with capture_sql(db) as sql:
        cached = errors(factory)
    assert sql == []  # both instances came from the cache
    assert cached == errors(sessionmaker(db))
    with factory() as s, capture_sql(db) as sql:
        child = s.get(MxChild, 1, options=[joinedload(MxChild.parent)])
        assert child is not None and child.parent.name == "p"
    assert len(sql) == 1


def test_init_is_not_called_for_cached_instances(
    factory: sessionmaker[Session], db: Engine
) -> None:
    """Instances built from the cache do not run ``__init__`` (as a database load does not)
    and do run ``@reconstructor`` (as a database load does)."""
    with factory() as s:
        s.add(MxCounted(id=1, name="n"))
        s.commit()
    assert len(INIT_CALLS) == 1
    INIT_CALLS.clear()
    RECONSTRUCTED.clear()

    with factory() as s, capture_sql(db) as sql:
        cached = s.get(MxCounted, 1)
        assert cached is not None
        cached_state = (INIT_CALLS[:], RECONSTRUCTED[:], hasattr(cached, "scratch"), cached.name)
    assert sql == []
    INIT_CALLS.clear()
    RECONSTRUCTED.clear()
    with Session(db) as s:
        loaded = s.get(MxCounted, 1)
        assert loaded is not None
        loaded_state = (INIT_CALLS[:], RECONSTRUCTED[:], hasattr(loaded, "scratch"), loaded.name)
    assert cached_state == loaded_state == ([], [1], False, "n")


def test_version_id_col(
    factory: sessionmaker[Session], db: Engine, cache: WriteThroughCache, client: redis.Redis
) -> None:
    """A cached instance carries the committed version; an update through a stale instance
    raises StaleDataError as without the cache (same message), and afterwards the cache holds
    the row the database holds."""

    def race(maker: Any, pk: int) -> str:
        with maker() as s:
            s.add(MxVersioned(id=pk, name="v1"))
            s.commit()
        stale = maker()
        try:
            obj = stale.get(MxVersioned, pk)
            assert obj is not None and obj.version == 1
            with maker() as other:
                fresh_obj = other.get(MxVersioned, pk)
                assert fresh_obj is not None
                fresh_obj.name = "v2"
                other.commit()
            obj.name = "lost"
            with pytest.raises(StaleDataError) as caught:
                stale.commit()
            return str(caught.value)
        finally:
            stale.close()

    with capture_sql(db) as sql:
        cached_error = race(factory, 1)
    selects = [q for q in sql if q.lstrip().upper().startswith("SELECT")]
    assert selects == [], "the instances were not served from the cache"
    assert cached_error == race(sessionmaker(db), 2)
    served = assert_served_like_database(factory, db, cache, client, MxVersioned, 1)
    assert (served["name"], served["version"]) == ("v2", 2)


# ---------------------------------------------------------------- refused at configuration


class _Point(UserDefinedType[Any]):
    cache_ok = True

    def get_col_spec(self, **kw: Any) -> str:
        return "POINT"


def _concrete(base: Any) -> list[type]:
    """A polymorphic concrete base: its loads read a UNION of the concrete tables. (The
    classic mapping: ``ConcreteBase``'s listener outlives a disposed registry on SA 2.0.)"""
    employee = sa.Table("mx_employee", base.metadata, sa.Column("id", Integer, primary_key=True))
    manager = sa.Table("mx_manager", base.metadata, sa.Column("id", Integer, primary_key=True))
    pjoin = sa.orm.polymorphic_union({"employee": employee, "manager": manager}, "type")

    class MxEmployee(base, CachedModel):  # type: ignore[misc,valid-type]
        __table__ = employee
        __mapper_args__ = {
            "polymorphic_on": pjoin.c.type,
            "with_polymorphic": ("*", pjoin),
            "polymorphic_identity": "employee",
        }

    class MxManager(MxEmployee):
        __table__ = manager
        __mapper_args__ = {"polymorphic_identity": "manager", "concrete": True}

    return [MxEmployee, MxManager]


def _one_column(column: Any, primary_key: bool = False) -> Any:
    def build(base: type) -> list[type]:
        ns: dict[str, Any] = {"__tablename__": "mx_refused", "__annotations__": {}}
        if primary_key:
            ns["key"] = sa.orm.mapped_column(column, primary_key=True)
        else:
            ns["id"] = sa.orm.mapped_column(Integer, primary_key=True)
            ns["value"] = sa.orm.mapped_column(column)
        return [type("MxRefused", (base, CachedModel), ns)]

    return build


REFUSED = [
    pytest.param(_concrete, r"loads read a UNION.*cache the concrete classes", id="concrete"),
    pytest.param(
        _one_column(sa.Date, primary_key=True), r"primary keys of type Date", id="date-pk"
    ),
    pytest.param(
        _one_column(Numeric(10, 2), primary_key=True), r"primary keys of type Numeric", id="num-pk"
    ),
    pytest.param(_one_column(PickleType), r"PickleType is never cached", id="pickle"),
    pytest.param(
        _one_column(ARRAY(Integer, dimensions=2)), r"multi-dimensional ARRAY", id="2d-array"
    ),
    pytest.param(_one_column(_Point()), r"no exact stored form", id="user-defined-type"),
]


@pytest.mark.parametrize(("build", "message"), REFUSED)
def test_unsupported_mappings_are_refused_at_configuration(
    build: Any, message: str, redis_url: str, prefix: str
) -> None:
    """What the cache cannot keep exact raises ConfigurationError, naming the model and what
    to do, when SQLAlchemy configures the mapper: never later, at a read."""
    client = redis.Redis.from_url(redis_url, socket_timeout=1)
    cache = WriteThroughCache(client, prefix=prefix)

    class LocalBase(DeclarativeBase):
        pass

    try:
        models = build(LocalBase)
        with pytest.raises(ConfigurationError, match=message) as caught:
            LocalBase.registry.configure()
        assert models[0].__name__ in str(caught.value)
        del models
    finally:
        LocalBase.registry.dispose()
        del cache
        client.close()
        gc.collect()
        gc.collect()
