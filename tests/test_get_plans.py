"""The cached get's memo of what it decided per entity class, and what it must notice.

A plain ``session.get`` keeps, per mapped class, its mapper and its model's layout
(``Models.get_plans``), instead of ``inspect()`` and the registry on every call. Everything
that changes what a get of that class reads must be seen by the next get: the model registered
again with other options, a subclass mapped after the first get, the class unmapped and mapped
again, a ``do_orm_execute`` listener added to the factory, the cache uninstalled. Each test
gets once (making the memo), changes one thing, and shows that the next get reads what it
reads without any memo: a get that used the stale memo would read the old keys, answer
without SQL, or skip the listener.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import Column, Integer, MetaData, String, Table, event, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    ORMExecuteState,
    Session,
    mapped_column,
    registry,
    sessionmaker,
    with_loader_criteria,
)

from sqlalchemy_writethrough import CachedModel, WriteThroughCache

from _servers import capture_sql, reset_schema

pytestmark = pytest.mark.databases("sqlite")


class Base(DeclarativeBase):
    pass


class GpItem(Base, CachedModel):
    __tablename__ = "gp_item"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    hidden: Mapped[bool] = mapped_column(default=False)


@pytest.fixture
def db(engine: Engine) -> Engine:
    reset_schema(engine, Base.metadata)
    return engine


@pytest.fixture
def cache(redis_url: str, prefix: str) -> Iterator[WriteThroughCache]:
    client = redis.Redis.from_url(redis_url, socket_timeout=1)
    try:
        yield WriteThroughCache(client, prefix=prefix)
    finally:
        client.close()


@pytest.fixture
def factory(db: Engine, cache: WriteThroughCache) -> sessionmaker[Session]:
    maker = sessionmaker(db)
    cache.install(maker)
    return maker


def seed(factory: Any, *objects: Any) -> None:
    with factory() as s:
        s.add_all(objects)
        s.commit()


def change_behind_the_cache(db: Engine, table: Any, pk: int, **values: Any) -> None:
    """Change a row in the database only: a get served from Redis still sees the old one."""
    with db.begin() as conn:
        conn.execute(update(table).where(table.c.id == pk).values(**values))


def get_name(factory: Any, model: Any, pk: int, db: Engine) -> tuple[str, int]:
    """(the name a new session's get returns, SQL statements it ran)."""
    with factory() as s, capture_sql(db) as sql:
        found = s.get(model, pk)
        assert found is not None
        return found.name, len(sql)


def test_a_model_registered_again_with_other_options_is_read_with_its_new_layout(
    factory: sessionmaker[Session], db: Engine, cache: WriteThroughCache
) -> None:
    """Registered again with a column left out, the model has other entries (its keys follow
    its stored columns): the next get is a miss that reads the database, not the old entry."""
    seed(factory, GpItem(id=1, name="cached"))
    assert get_name(factory, GpItem, 1, db) == ("cached", 0)
    change_behind_the_cache(db, GpItem.__table__, 1, name="database")
    assert get_name(factory, GpItem, 1, db) == ("cached", 0)
    cache.register(GpItem, exclude=["hidden"])
    assert get_name(factory, GpItem, 1, db) == ("database", 1)
    assert get_name(factory, GpItem, 1, db) == ("database", 0)  # the new entry, filled


def test_a_subclass_mapped_after_the_first_get_is_served_from_its_entry(
    db: Engine, cache: WriteThroughCache
) -> None:
    """A hierarchy's layout is built again when a subclass is mapped: the base's next gets
    read with it (the subclass's rows, and the new keys: the old entries are not read)."""

    class LocalBase(DeclarativeBase):
        pass

    class GpAnimal(LocalBase, CachedModel):
        __tablename__ = "gp_animal"
        __mapper_args__ = {"polymorphic_on": "kind", "polymorphic_identity": "animal"}

        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        kind: Mapped[str] = mapped_column(String(20))
        name: Mapped[str] = mapped_column(String(50))

    try:
        reset_schema(db, LocalBase.metadata)
        factory = sessionmaker(db)
        cache.install(factory)
        seed(factory, GpAnimal(id=1, name="generic"))
        assert get_name(factory, GpAnimal, 1, db) == ("generic", 0)
        change_behind_the_cache(db, GpAnimal.__table__, 1, name="database")
        assert get_name(factory, GpAnimal, 1, db) == ("generic", 0)

        class GpDog(GpAnimal):
            __mapper_args__ = {"polymorphic_identity": "dog"}

        # this registry's only: configure_mappers() would configure the mappers of every
        # module the xdist worker collected, each judged by every cache alive (15-25 s late
        # in a CI run)
        LocalBase.registry.configure()
        seed(factory, GpDog(id=2, name="rex"))
        with factory() as s, capture_sql(db) as sql:
            dog = s.get(GpAnimal, 2)
            assert type(dog) is GpDog and dog.name == "rex"
        assert sql == []
        # the hierarchy's entries moved with its layout: the old one is not read any more
        assert get_name(factory, GpAnimal, 1, db) == ("database", 1)
    finally:
        LocalBase.registry.dispose()
        gc.collect()


def test_a_class_unmapped_and_mapped_again_is_read_with_its_new_mapper(
    db: Engine, cache: WriteThroughCache
) -> None:
    """Imperative mappings disposed and made again (as SQLAlchemy's own test suite does): the
    class's gets answer with its new mapper, whose objects the session can use."""

    class GpThing(CachedModel):
        def __init__(self, id: int, name: str) -> None:
            self.id = id
            self.name = name

    metadata = MetaData()
    table = Table(
        "gp_thing",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=False),
        Column("name", String(50)),
    )
    reset_schema(db, metadata)
    factory = sessionmaker(db)
    cache.install(factory)
    reg = registry()
    try:
        for name in ("first", "second"):
            reg = registry()
            reg.map_imperatively(GpThing, table)
            with factory() as s:
                s.merge(GpThing(id=1, name=name))
                s.commit()
            with factory() as s, capture_sql(db) as sql:
                thing = s.get(GpThing, 1)
                assert thing is not None and thing.name == name
                thing.name = name + "!"  # the object is instrumented by the new mapper
                s.commit()
            assert len([q for q in sql if q.lstrip().upper().startswith("UPDATE")]) == 1
            reg.dispose()  # this registry's mappers only (clear_mappers() is everyone's)
    finally:
        reg.dispose()
        gc.collect()


def test_a_listener_added_to_the_factory_after_the_first_get_sees_the_next_gets(
    factory: sessionmaker[Session], db: Engine
) -> None:
    """A ``do_orm_execute`` listener of the user's, added once gets were served (and put
    first): the next get goes through it, and a row it filters out is not returned."""
    seed(factory, GpItem(id=1, name="one"), GpItem(id=2, name="two", hidden=True))
    assert get_name(factory, GpItem, 1, db) == ("one", 0)
    seen: list[str] = []

    def hide(state: ORMExecuteState) -> None:
        seen.append("get")
        state.statement = state.statement.options(
            with_loader_criteria(GpItem, GpItem.hidden.is_(False), include_aliases=True)
        )

    event.listen(factory, "do_orm_execute", hide, insert=True)
    with factory() as s:
        assert s.get(GpItem, 2) is None
    assert seen == ["get"]


def test_a_get_after_uninstall_reads_the_database(
    factory: sessionmaker[Session], db: Engine, cache: WriteThroughCache
) -> None:
    seed(factory, GpItem(id=1, name="cached"))
    assert get_name(factory, GpItem, 1, db) == ("cached", 0)
    change_behind_the_cache(db, GpItem.__table__, 1, name="database")
    cache.uninstall(factory)
    assert get_name(factory, GpItem, 1, db) == ("database", 1)


def test_always_refresh_set_after_the_first_get_is_seen_by_the_next_gets(
    db: Engine, cache: WriteThroughCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Mapper.always_refresh`` sends a class's gets through SQLAlchemy's own ``get`` (the
    ``do_orm_execute`` path), set before the first get or after it: the memo of the first
    get does not keep answering them directly. (Seen through the cache's ``do_orm_execute``
    listener, wrapped before it is installed: without always_refresh it is not called.)"""
    from sqlalchemy import inspect

    from sqlalchemy_writethrough.loading import ReadPath

    through_statement: list[int] = []
    on_execute = ReadPath.on_execute

    def counted(self: ReadPath, orm_state: ORMExecuteState) -> Any:
        through_statement.append(1)
        return on_execute(self, orm_state)

    monkeypatch.setattr(ReadPath, "on_execute", counted)
    factory = sessionmaker(db)
    cache.install(factory)
    seed(factory, GpItem(id=1, name="cached"))
    mapper = inspect(GpItem)
    try:
        through_statement.clear()
        assert get_name(factory, GpItem, 1, db) == ("cached", 0)  # warm: a fill, then a hit
        assert get_name(factory, GpItem, 1, db) == ("cached", 0)
        through_statement.clear()
        assert get_name(factory, GpItem, 1, db) == ("cached", 0)
        assert through_statement == []  # answered before any statement
        mapper.always_refresh = True
        assert get_name(factory, GpItem, 1, db) == ("cached", 0)
        assert through_statement == [1]
        mapper.always_refresh = False
        through_statement.clear()
        assert get_name(factory, GpItem, 1, db) == ("cached", 0)
        assert through_statement == []
    finally:
        mapper.always_refresh = False
