"""Inheritance hierarchies: one keyspace per hierarchy, the row's class in every entry.

``get`` on the base returns the right subclass and ``get`` on another subclass finds no row,
from the cache exactly as from the database; writes of any class of the hierarchy are
published; DML on a joined subclass's own table invalidates the hierarchy.

Concrete table inheritance: each concrete class is a keyspace of its own (its table, its
primary key, its identity), so rows of the base and of a subclass with the same key are two
entries; writes, rollbacks, deletes and statements on one concrete table touch only its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import ForeignKey, String, case, select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SAWarning
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_writethrough import CachedModel, ConfigurationError, WriteThroughCache, from_cache

from _cache_helpers import entry_key, entry_state
from _servers import capture_sql, reset_schema


class Base(DeclarativeBase):
    pass


class InVehicle(Base, CachedModel):
    """Single-table inheritance."""

    __tablename__ = "in_vehicle"
    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    name: Mapped[str] = mapped_column(String(50))
    wheels: Mapped[int | None] = mapped_column()
    payload_kg: Mapped[int | None] = mapped_column()
    __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "vehicle"}


class InCar(InVehicle):
    __mapper_args__ = {"polymorphic_identity": "car"}


class InTruck(InVehicle):
    __mapper_args__ = {"polymorphic_identity": "truck"}


class InDocument(Base, CachedModel):
    """Joined-table inheritance."""

    __tablename__ = "in_document"
    id: Mapped[int] = mapped_column(primary_key=True)
    type: Mapped[str] = mapped_column(String(20))
    title: Mapped[str] = mapped_column(String(50))
    __mapper_args__ = {"polymorphic_on": "type", "polymorphic_identity": "document"}


class InInvoice(InDocument):
    __tablename__ = "in_invoice"
    id: Mapped[int] = mapped_column(ForeignKey("in_document.id"), primary_key=True)
    amount: Mapped[int] = mapped_column()
    __mapper_args__ = {"polymorphic_identity": "invoice"}


class InLetter(InDocument):
    __tablename__ = "in_letter"
    id: Mapped[int] = mapped_column(ForeignKey("in_document.id"), primary_key=True)
    recipient: Mapped[str] = mapped_column(String(50))
    __mapper_args__ = {"polymorphic_identity": "letter"}


class InShape(Base, CachedModel):
    """Concrete table inheritance: the base and each concrete class have their own table."""

    __tablename__ = "in_shape"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))


class InCircle(InShape):
    __tablename__ = "in_circle"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    radius: Mapped[int] = mapped_column()
    __mapper_args__ = {"concrete": True}


class InStaff(Base, CachedModel):
    """``polymorphic_on`` a SQL expression (SQLAlchemy's documented ``case()`` recipe): the
    class a load picks is computed from the row."""

    __tablename__ = "in_staff"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    code: Mapped[str] = mapped_column(String(4))
    name: Mapped[str] = mapped_column(String(50))
    __mapper_args__ = {
        "polymorphic_on": case(
            (code == "EN", "engineer"), (code == "MA", "manager"), else_="staff"
        ),
        "polymorphic_identity": "staff",
    }


class InEngineer(InStaff):
    __mapper_args__ = {"polymorphic_identity": "engineer"}


class InManager(InStaff):
    __mapper_args__ = {"polymorphic_identity": "manager"}


@pytest.fixture
def factory(engine: Engine, redis_url: str, prefix: str) -> Iterator[sessionmaker[Session]]:
    reset_schema(engine, Base.metadata)
    cache = WriteThroughCache(redis.Redis.from_url(redis_url, socket_timeout=1), prefix=prefix)
    factory = sessionmaker(engine)
    cache.install(factory)
    factory.kw["info"] = {"cache": cache}
    with factory() as session:
        session.add_all(
            [
                InVehicle(id=1, name="cart"),
                InCar(id=2, name="mini", wheels=4),
                InTruck(id=3, name="lorry", wheels=6, payload_kg=9000),
                InDocument(id=1, title="memo"),
                InInvoice(id=2, title="bill", amount=120),
                InLetter(id=3, title="note", recipient="Ada"),
                InShape(id=1, name="square"),
                InCircle(id=1, name="ring", radius=3),
            ]
        )
        session.commit()
    yield factory
    cache.uninstall(factory)


def load(engine: Engine, factory: sessionmaker[Session], model: type, pk: int) -> tuple[Any, int]:
    with capture_sql(engine) as sql, factory() as session:
        obj = session.get(model, pk)
        values = None if obj is None else (type(obj).__name__, dict(vars(obj)))
        if values is not None:
            values[1].pop("_sa_instance_state", None)
        return values, len(sql)


@pytest.mark.parametrize(
    ("model", "pk", "expected"),
    [
        (InVehicle, 1, "InVehicle"),
        (InVehicle, 2, "InCar"),
        (InVehicle, 3, "InTruck"),
        (InCar, 2, "InCar"),
        (InCar, 3, None),
        (InTruck, 2, None),
        (InDocument, 2, "InInvoice"),
        (InDocument, 3, "InLetter"),
        (InInvoice, 2, "InInvoice"),
        (InInvoice, 3, None),
        (InLetter, 1, None),
    ],
)
def test_get_returns_the_right_class_or_no_row_from_the_cache(
    engine: Engine, factory: sessionmaker[Session], model: type, pk: int, expected: str | None
) -> None:
    served, sql = load(engine, factory, model, pk)
    assert sql == 0, "published at commit, served from Redis"
    assert (served[0] if served else None) == expected
    with Session(engine) as session:
        db = session.get(model, pk)
        assert (type(db).__name__ if db else None) == expected
        if db is not None and served is not None:
            for key, value in served[1].items():
                assert getattr(db, key) == value, key


def test_subclass_changes_are_published_and_reads_refill(
    engine: Engine, factory: sessionmaker[Session]
) -> None:
    cache = factory.kw["info"]["cache"]
    with factory() as session:
        truck = session.get(InTruck, 3)
        invoice = session.get(InInvoice, 2)
        assert truck is not None and invoice is not None
        truck.payload_kg = 12000
        invoice.amount = 150
        session.commit()
    served, sql = load(engine, factory, InVehicle, 3)
    assert sql == 0 and served == ("InTruck", served[1]) and served[1]["payload_kg"] == 12000
    served, sql = load(engine, factory, InDocument, 2)
    assert sql == 0 and served[1]["amount"] == 150

    cache.invalidate(InDocument, 3)
    served, sql = load(engine, factory, InDocument, 3)  # a base load: a miss
    assert sql >= 1 and served[0] == "InLetter"
    served, sql = load(engine, factory, InLetter, 3)
    assert served[1]["recipient"] == "Ada"


def test_dml_on_a_joined_subclass_table_invalidates_the_hierarchy(
    engine: Engine, factory: sessionmaker[Session], redis_client: redis.Redis
) -> None:
    cache = factory.kw["info"]["cache"]
    with factory() as session:
        session.execute(update(InInvoice.__table__).values(amount=999))
        session.commit()
    served, _ = load(engine, factory, InInvoice, 2)
    assert served is not None and served[1]["amount"] == 999
    assert entry_state(redis_client, entry_key(cache, InDocument, 2)) in ("value", None)


def test_caching_a_subclass_without_its_base_is_refused(redis_url: str, prefix: str) -> None:
    class LocalBase(DeclarativeBase):
        pass

    class Animal(LocalBase):
        __tablename__ = "in_animal"
        id: Mapped[int] = mapped_column(primary_key=True)
        kind: Mapped[str] = mapped_column(String(10))
        __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "animal"}

    class Dog(Animal):
        __mapper_args__ = {"polymorphic_identity": "dog"}

    cache = WriteThroughCache(redis.Redis.from_url(redis_url, socket_timeout=1), prefix=prefix)
    LocalBase.registry.configure()
    with pytest.raises(ConfigurationError, match="base class of its hierarchy"):
        cache.register(Dog)
    cache.register(Animal)
    assert cache._layout_for(Dog.__mapper__) is cache._layout_for(Animal.__mapper__)
    LocalBase.registry.dispose()


# ---------------------------------------------------------------- concrete inheritance


def test_concrete_classes_are_served_each_from_its_own_keyspace(
    engine: Engine, factory: sessionmaker[Session], redis_client: redis.Redis
) -> None:
    """A base row and a concrete subclass row with the same primary key are two entries, each
    served with no SQL as the class its table maps, equal to a database load; in one session
    they are two objects, as the identity map keys them."""
    cache = factory.kw["info"]["cache"]
    shape_key, circle_key = entry_key(cache, InShape, 1), entry_key(cache, InCircle, 1)
    assert shape_key != circle_key
    assert entry_state(redis_client, shape_key) == entry_state(redis_client, circle_key) == "value"
    for model, expected in [(InShape, "InShape"), (InCircle, "InCircle")]:
        served, sql = load(engine, factory, model, 1)
        assert sql == 0 and served is not None and served[0] == expected
        with Session(engine) as session:
            db = session.get(model, 1)
            assert db is not None
            assert served[1] == {k: getattr(db, k) for k in served[1]}
    with capture_sql(engine) as sql, factory() as session:
        shape, circle = session.get(InShape, 1), session.get(InCircle, 1)
        assert type(shape) is InShape and type(circle) is InCircle and shape is not circle
        assert session.get(InShape, 1) is shape and session.get(InCircle, 1) is circle
    assert sql == []


def test_concrete_writes_rollbacks_and_deletes_touch_only_their_own_entry(
    engine: Engine, factory: sessionmaker[Session], redis_client: redis.Redis
) -> None:
    cache = factory.kw["info"]["cache"]
    with factory() as session:
        circle = session.get(InCircle, 1)
        assert circle is not None
        circle.radius = 5
        session.commit()
    served, sql = load(engine, factory, InCircle, 1)
    assert sql == 0 and served is not None and served[1]["radius"] == 5
    served, sql = load(engine, factory, InShape, 1)
    assert sql == 0 and served is not None and served[1]["name"] == "square"

    with factory() as session:
        circle = session.get(InCircle, 1)
        assert circle is not None
        circle.radius = 9
        session.flush()
        assert entry_state(redis_client, entry_key(cache, InCircle, 1)) == "lock"
        session.rollback()
    served, sql = load(engine, factory, InCircle, 1)
    assert sql == 0 and served is not None and served[1]["radius"] == 5  # restored

    with factory() as session:
        session.delete(session.get(InCircle, 1))
        session.add(InCircle(id=2, name="disc", radius=1))
        session.commit()
    assert entry_state(redis_client, entry_key(cache, InCircle, 1)) is None
    served, sql = load(engine, factory, InCircle, 1)
    assert served is None and sql == 1
    for model, pk in [(InCircle, 2), (InShape, 1)]:
        served, sql = load(engine, factory, model, pk)
        assert sql == 0 and served is not None


@pytest.mark.parametrize("how", ["core", "orm-bulk", "text"])
def test_statements_on_a_concrete_table_invalidate_its_entries(
    how: str, engine: Engine, factory: sessionmaker[Session]
) -> None:
    """Core, ORM bulk and raw SQL updates of the subclass's table: the next load returns the
    new row; the base's entry of the same key is another table's and stays served."""
    statement: Any = {
        "core": update(InCircle.__table__).values(radius=7),
        "orm-bulk": update(InCircle).where(InCircle.id == 1).values(radius=7),
        "text": text("UPDATE in_circle SET radius = 7"),
    }[how]
    with factory() as session:
        session.execute(statement)
        session.commit()
    served, _ = load(engine, factory, InCircle, 1)
    assert served is not None and served[1]["radius"] == 7
    served, sql = load(engine, factory, InShape, 1)
    assert sql == 0 and served is not None and served[1]["name"] == "square"


def test_a_concrete_subclass_can_be_cached_without_its_base(
    engine: Engine, redis_url: str, prefix: str
) -> None:
    """Each concrete class is a model of its own: registering only the subclass caches it,
    and leaves the base uncached."""

    class LocalBase(DeclarativeBase):
        pass

    class Part(LocalBase):
        __tablename__ = "in_part"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)

    class Bolt(Part):
        __tablename__ = "in_bolt"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        size: Mapped[int] = mapped_column()
        __mapper_args__ = {"concrete": True}

    client = redis.Redis.from_url(redis_url, socket_timeout=1)
    cache = WriteThroughCache(client, prefix=prefix)
    try:
        LocalBase.registry.configure()
        cache.register(Bolt)
        assert cache._layout_for(Part.__mapper__) is None
        reset_schema(engine, LocalBase.metadata)
        factory = sessionmaker(engine)
        cache.install(factory)
        with factory() as session:
            session.add_all([Part(id=1), Bolt(id=1, size=8)])
            session.commit()
        assert load(engine, factory, Bolt, 1)[1] == 0
        assert load(engine, factory, Part, 1)[1] == 1
        cache.uninstall(factory)
    finally:
        LocalBase.registry.dispose()
        client.close()


@pytest.mark.parametrize(
    ("model", "pk", "expected"),
    [(InCar, 3, None), (InCar, 2, "InCar"), (InInvoice, 3, None), (InVehicle, 3, "InTruck")],
)
@pytest.mark.parametrize("legacy", [False, True], ids=["select", "query"])
def test_from_cache_with_the_row_in_the_identity_map_keeps_to_the_class_asked_for(
    engine: Engine,
    factory: sessionmaker[Session],
    model: type,
    pk: int,
    expected: str | None,
    legacy: bool,
) -> None:
    """An object of another class of the hierarchy in the identity map is no row of this one,
    as the database says (and as ``session.get`` does)."""
    for make in (factory, sessionmaker(engine)):
        with make() as session:
            held = session.get(InVehicle if model is not InInvoice else InDocument, pk)
            assert held is not None  # and kept: the identity map is weak
            column: Any = model.id  # type: ignore[attr-defined]
            if legacy:
                found = session.query(model).filter(column == pk).options(from_cache()).all()
            else:
                stmt = select(model).where(column == pk).options(from_cache())
                found = session.execute(stmt).scalars().all()
            assert [type(obj).__name__ for obj in found] == ([expected] if expected else [])


def classes(maker: sessionmaker[Session], model: type, pks: list[int]) -> list[str | None]:
    with maker() as session:
        return [type(o).__name__ if (o := session.get(model, pk)) else None for pk in pks]


def test_the_class_of_a_row_is_what_its_discriminator_picks(
    engine: Engine, factory: sessionmaker[Session]
) -> None:
    """A load picks the class from the row's discriminator, not from the class of the object
    that wrote it: a car whose ``kind`` was set to "truck" loads as a truck (SQLAlchemy warns
    at that flush), and an entry holding "car" would be another class than every load
    returns. The commit leaves a miss for such a row; the next load fills the class it picked."""
    plain = sessionmaker(engine)
    with factory() as session, pytest.warns(SAWarning, match="incompatible polymorphic identity"):
        car = session.get(InVehicle, 2)
        assert isinstance(car, InCar)
        car.kind = "truck"
        session.commit()
    for model in (InVehicle, InCar, InTruck):
        assert classes(factory, model, [1, 2, 3]) == classes(plain, model, [1, 2, 3])
    assert classes(factory, InVehicle, [2]) == ["InTruck"]


def test_a_polymorphic_on_expression_picks_the_class_of_every_load(
    engine: Engine, factory: sessionmaker[Session]
) -> None:
    """With ``polymorphic_on`` a ``case()`` over a column, a commit cannot tell which class
    a load picks: an engineer written with the manager's code, and one whose code changes,
    load as managers. Commits of such a hierarchy leave misses; loads fill what they pick."""
    plain = sessionmaker(engine)
    with factory() as session:
        session.add_all(
            [
                InEngineer(id=1, code="EN", name="eng"),
                InEngineer(id=2, code="MA", name="odd"),
                InStaff(id=3, code="XX", name="staff"),
            ]
        )
        session.commit()
    for _ in range(2):  # the commit's entries, then the ones the loads filled
        for model in (InStaff, InEngineer, InManager):
            assert classes(factory, model, [1, 2, 3]) == classes(plain, model, [1, 2, 3])
    with factory() as session:
        first = session.get(InStaff, 1)
        assert isinstance(first, InEngineer)
        first.code = "MA"
        session.commit()
    for model in (InStaff, InEngineer, InManager):
        assert classes(factory, model, [1, 2, 3]) == classes(plain, model, [1, 2, 3])
    assert classes(factory, InStaff, [1, 2, 3]) == ["InManager", "InManager", "InStaff"]
