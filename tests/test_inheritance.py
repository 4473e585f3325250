"""Inheritance hierarchies: one keyspace per hierarchy, the row's class in every entry.

``get`` on the base returns the right subclass and ``get`` on another subclass finds no row,
from the cache exactly as from the database; writes of any class of the hierarchy are
published; DML on a joined subclass's own table invalidates the hierarchy.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import ForeignKey, String, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_writethrough import CachedModel, ConfigurationError, WriteThroughCache

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
