"""``register_all()`` caches every model it can keep exact; ``cache.models()`` says what it keeps.

* Under ``register_all(Base)`` or ``register_all()``, a model the cache cannot keep exact
  (concrete inheritance, mapped to a join or a select, a Date primary key, a PickleType column)
  is left out with one ``WriteThroughWarning`` and one log line naming it and why, once per
  model and cache; the other models are cached and served with no SQL.
* The warnings are given outside SQLAlchemy's configure: with warnings turned into errors, the
  mappers stay usable.
* A wrong option (``__writethrough__``) still raises, and so do ``register()`` and the mixin on a
  model the cache cannot keep.
* ``cache.models(engine)``: each model's classes, tables, keys and effective options, and the
  columns whose commits invalidate instead of writing through, checked against what a commit
  actually leaves in Redis on each database.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import gc
import logging
import uuid
import warnings
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy import ForeignKey, String, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    column_property,
    mapped_column,
    relationship,
    sessionmaker,
)

from sqlalchemy_writethrough import (
    CachedModel,
    ConfigurationError,
    WriteThroughCache,
    WriteThroughWarning,
    from_cache,
)

from _cache_helpers import entry_key, entry_state, prefix_keys
from _servers import capture_sql, reset_schema

LOG_NAME = "sqlalchemy_writethrough"

_clients: list[redis.Redis] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _clients:
        _clients.pop().close()
    gc.collect()
    gc.collect()  # a register_all() cache left alive would judge the next test's mappers


def make_cache(redis_url: str, prefix: str, **options: Any) -> WriteThroughCache:
    client = redis.Redis.from_url(redis_url, socket_timeout=1)
    _clients.append(client)
    return WriteThroughCache(client, prefix=prefix, **options)


def left_out_models(base: type[DeclarativeBase], mixin: str = "") -> dict[str, type]:
    """Two plain models and five the cache cannot keep exact, mapped on ``base``; the one
    named ``mixin`` has the ``CachedModel`` mixin."""

    def extra(name: str) -> tuple[type, ...]:
        return (CachedModel,) if name == mixin else ()

    class RaPlain(base):  # type: ignore[misc,valid-type]
        __tablename__ = "ra_plain"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        name: Mapped[str] = mapped_column(String(40))

    # a polymorphic concrete base, mapped the classic way (ConcreteBase's listener outlives a
    # disposed registry on SQLAlchemy 2.0)
    employee, manager = (
        sa.Table(
            name,
            base.metadata,
            sa.Column("id", sa.Integer, primary_key=True),
            sa.Column("name", String(40)),
        )
        for name in ("ra_employee", "ra_manager")
    )
    pjoin = sa.orm.polymorphic_union({"employee": employee, "manager": manager}, "type")

    class RaEmployee(base, *extra("RaEmployee")):  # type: ignore[misc,valid-type]
        __table__ = employee
        __mapper_args__ = {
            "polymorphic_on": pjoin.c.type,
            "with_polymorphic": ("*", pjoin),
            "polymorphic_identity": "employee",
        }

    class RaManager(RaEmployee):
        __table__ = manager
        __mapper_args__ = {"polymorphic_identity": "manager", "concrete": True}

    class RaDetail(base):  # type: ignore[misc,valid-type]
        __tablename__ = "ra_detail"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        plain_id: Mapped[int] = mapped_column(ForeignKey("ra_plain.id"))

    plain, detail = RaPlain.__table__, RaDetail.__table__

    class RaJoined(base, *extra("RaJoined")):  # type: ignore[misc,valid-type]
        __table__ = sa.join(plain, detail, plain.c.id == detail.c.plain_id)
        id = column_property(plain.c.id, detail.c.plain_id)
        detail_id = detail.c.id

    class RaSelected(base, *extra("RaSelected")):  # type: ignore[misc,valid-type]
        __table__ = select(plain.c.id, plain.c.name).where(plain.c.id > 0).subquery()
        __mapper_args__ = {"primary_key": [__table__.c.id]}

    class RaDated(base, *extra("RaDated")):  # type: ignore[misc,valid-type]
        __tablename__ = "ra_dated"
        day: Mapped[dt.date] = mapped_column(primary_key=True)

    class RaPickled(base, *extra("RaPickled")):  # type: ignore[misc,valid-type]
        __tablename__ = "ra_pickled"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        blob = mapped_column(sa.PickleType)

    found = (RaPlain, RaEmployee, RaManager, RaDetail, RaJoined, RaSelected, RaDated, RaPickled)
    return {cls.__name__: cls for cls in found}


#: model left out -> what its warning must say
LEFT_OUT = {
    "RaEmployee": "its loads read a UNION of its concrete subclasses' tables",
    "RaJoined": "only models mapped to a Table can be cached, not to a Join",
    "RaSelected": "only models mapped to a Table can be cached, not to a Subquery",
    "RaDated": "primary keys of type Date",
    "RaPickled": "PickleType is never cached",
}


def ours(caught: list[warnings.WarningMessage]) -> list[str]:
    """The WriteThroughWarnings about this module's models."""
    return [
        str(w.message)
        for w in caught
        if issubclass(w.category, WriteThroughWarning) and " Ra" in str(w.message)
    ]


def check_left_out_warnings(messages: list[str]) -> None:
    assert len(messages) == len(LEFT_OUT), messages
    for name, why in LEFT_OUT.items():
        [message] = [m for m in messages if f"leaves {name} out of the cache" in m]
        assert why in message
        assert "its loads go to the database" in message


def test_register_all_leaves_out_what_it_cannot_cache_with_one_warning_each(
    engine: Engine,
    redis_url: str,
    redis_client: redis.Redis,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``register_all(Base)`` before the mappers are configured: configuring them warns once
    per model left out (and logs once), never raises; the plain models, and the concrete leaf
    class of the polymorphic concrete base left out, are cached and served with no SQL; a left-out model reads the database and never touches Redis; later flushes,
    configures and ``models()`` calls do not warn again."""
    cache = make_cache(redis_url, prefix)

    class LocalBase(DeclarativeBase):
        pass

    try:
        models = left_out_models(LocalBase)
        cache.register_all(LocalBase)
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
            warnings.simplefilter("always")
            LocalBase.registry.configure()
        check_left_out_warnings(ours(caught))
        logged = [r.getMessage() for r in caplog.records if r.name == LOG_NAME]
        assert sorted(logged) == sorted(ours(caught))

        reset_schema(engine, LocalBase.metadata)
        factory = sessionmaker(engine)
        cache.install(factory)
        caplog.clear()
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING):
            warnings.simplefilter("always")
            with factory() as session:
                plain, manager = models["RaPlain"], models["RaManager"]
                session.add(plain(id=1, name="p"))
                session.flush()  # no relationship orders the detail row after it
                session.add_all(
                    [
                        models["RaDetail"](id=7, plain_id=1),
                        models["RaEmployee"](id=1, name="e"),
                        manager(id=2, name="m"),
                        models["RaDated"](day=dt.date(2024, 1, 2)),
                        models["RaPickled"](id=1, blob={"a": 1}),
                    ]
                )
                session.commit()
            for model, pk in [(plain, 1), (models["RaDetail"], 7), (manager, 2)]:
                assert entry_state(redis_client, entry_key(cache, model, pk)) == "value"
                with capture_sql(engine) as sql, factory() as session:
                    assert session.get(model, pk) is not None
                assert sql == [], f"{model.__name__} was not served from the cache"
            for name, pk in [("RaEmployee", 1), ("RaJoined", (1, 7))]:
                with capture_sql(engine) as sql, factory() as session:
                    assert session.get(models[name], pk) is not None
                assert len(sql) == 1, f"{name} must be read from the database"
            with capture_sql(engine) as sql, factory() as session:
                assert session.get(models["RaSelected"], 1).name == "p"  # type: ignore[union-attr]
            assert len(sql) == 1
            LocalBase.registry.configure()
            cache.models(engine)
        assert ours(caught) == []
        assert [r for r in caplog.records if r.name == LOG_NAME] == []
        # the three cached tables hold one entry each; nothing else was written
        entities = [k for k in prefix_keys(redis_client, prefix) if k.count(b"}:") == 1]
        assert len(entities) == 3, entities
        cache.uninstall(factory)
    finally:
        del cache
        LocalBase.registry.dispose()


def test_register_all_of_a_configured_base_warns_at_the_call(redis_url: str, prefix: str) -> None:
    """Mappers configured before ``register_all(Base)``: the warnings come from the call, and
    point at the caller's line."""

    class LocalBase(DeclarativeBase):
        pass

    try:
        models = left_out_models(LocalBase)
        LocalBase.registry.configure()
        cache = make_cache(redis_url, prefix)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cache.register_all(LocalBase)
        check_left_out_warnings(ours(caught))
        assert {w.filename for w in caught if " Ra" in str(w.message)} == {__file__}
        report = cache.models(sa.create_engine("sqlite://"))
        assert sorted(e.model.__name__ for e in report.left_out) == sorted(LEFT_OUT)
        # (CachedModel classes of other test modules are cached by every cache)
        cached = sorted(i.model.__name__ for i in report.cached if i.model.__name__[:2] == "Ra")
        assert cached == ["RaDetail", "RaManager", "RaPlain"]
        del models, cache
    finally:
        LocalBase.registry.dispose()


def test_register_all_without_argument_warns_for_models_mapped_later(
    redis_url: str, prefix: str
) -> None:
    """``register_all()`` covers classes mapped after the call: they are judged (and warned
    about) when SQLAlchemy configures them."""
    cache = make_cache(redis_url, prefix)
    cache.register_all()

    class LocalBase(DeclarativeBase):
        pass

    try:
        models = left_out_models(LocalBase)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            LocalBase.registry.configure()
        check_left_out_warnings(ours(caught))
        report = cache.models(sa.create_engine("sqlite://"))
        assert {"RaPlain", "RaDetail"} <= {i.model.__name__ for i in report.cached}
        del models
    finally:
        del cache
        LocalBase.registry.dispose()


def test_a_class_mapped_while_a_cache_lives_and_not_cached_is_freed(
    redis_url: str, prefix: str
) -> None:
    """Every mapper SQLAlchemy configures while a cache lives is looked at (is it cached?);
    the answer "no" was kept with the mapper as its key, so a class mapped at run time (a
    test's, a per-tenant automap) lived as long as the cache: memory that grew with every
    such class. A cached model stays known, as long as the cache."""
    import weakref

    cache = make_cache(redis_url, prefix)

    def mapped_and_dropped() -> weakref.ref[type]:
        class LocalBase(DeclarativeBase):
            pass

        class RaTransient(LocalBase):
            __tablename__ = "ra_transient"
            id: Mapped[int] = mapped_column(primary_key=True)

        LocalBase.registry.configure()
        assert cache._layout_for(sa.inspect(RaTransient)) is None  # looked at: not cached
        return weakref.ref(RaTransient)

    gone = mapped_and_dropped()
    gc.collect()
    assert gone() is None


@pytest.mark.parametrize("covered_by", ["mixin", "register_all"])
def test_a_cached_class_mapped_while_a_cache_lives_is_freed_when_dropped(
    redis_url: str, prefix: str, covered_by: str
) -> None:
    """A class the cache does cache, mapped at run time and used (a commit, reads by primary
    key through ``from_cache()``, a many-to-one lazy load), then dropped: the cache kept its
    layout, keyed by its mapper and holding it, for as long as the cache lived (a per-tenant
    automap, a test suite's classes). Its layout now holds it weakly, and the memos that
    list it are dropped with it. (A ``session.get``'s plan keeps its class, among the last
    256 classes read so, as SQLAlchemy's own compiled cache keeps the statements'.)"""
    import weakref

    cache = make_cache(redis_url, prefix)

    def mapped_used_and_dropped() -> list[weakref.ref[Any]]:
        class LocalBase(DeclarativeBase):
            pass

        mixin: tuple[type, ...] = (CachedModel,) if covered_by == "mixin" else ()

        class RaRunParent(LocalBase, *mixin):  # type: ignore[misc]
            __tablename__ = "ra_run_parent"
            id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)

        class RaRunChild(LocalBase, *mixin):  # type: ignore[misc]
            __tablename__ = "ra_run_child"
            id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
            parent_id: Mapped[int] = mapped_column(ForeignKey("ra_run_parent.id"))
            parent: Mapped[RaRunParent] = relationship()

        if covered_by == "register_all":
            cache.register_all(LocalBase)
        engine = sa.create_engine("sqlite://")
        LocalBase.metadata.create_all(engine)
        factory = sessionmaker(engine)
        cache.install(factory)
        with factory() as session:
            session.add_all([RaRunParent(id=1), RaRunChild(id=1, parent_id=1)])
            session.commit()
        for _ in range(2):  # a fill, then a hit
            with factory() as session:
                child = session.scalars(
                    select(RaRunChild).where(RaRunChild.id == 1).options(from_cache())
                ).one()
                assert child.parent.id == 1
        assert cache.stats().hits > 0
        assert cache._layout_for(sa.inspect(RaRunChild)) is not None
        cache.uninstall(factory)
        engine.dispose()
        return [weakref.ref(RaRunParent), weakref.ref(RaRunChild), weakref.ref(LocalBase)]

    gone = mapped_used_and_dropped()
    gc.collect()
    assert [ref() for ref in gone] == [None, None, None]
    cache.models(sa.create_engine("sqlite://"))  # the cache still answers


@pytest.mark.parametrize("covered_by", ["mixin", "register_all"])
def test_a_disposed_registry_is_freed_though_an_index_links_its_table_to_a_mapper(
    redis_url: str, prefix: str, covered_by: str
) -> None:
    """SQLAlchemy's ``RegistryConfigDisposeTest::test_dispose_releases_classes_w_orm_index``
    (2.1), with the cache: an ``Index`` on an ORM-annotated expression (``Parent.id.desc()``)
    links the table to the mapper, and the cache's layout, which holds the table, was held
    in a dict keyed weakly by that same mapper: ``registry.dispose()`` freed nothing while
    the cache lived. The cache now forgets a class SQLAlchemy uninstruments."""
    import weakref

    cache = make_cache(redis_url, prefix)

    def mapped_used_and_disposed() -> list[weakref.ref[Any]]:
        reg = sa.orm.registry()
        mixin: tuple[type, ...] = (CachedModel,) if covered_by == "mixin" else ()

        @reg.mapped
        class RaIxParent(*mixin):  # type: ignore[misc]
            __tablename__ = "ra_ix_parent"
            id = sa.Column(sa.Integer, primary_key=True, autoincrement=False)

        @reg.mapped
        class RaIxChild(*mixin):  # type: ignore[misc]
            __tablename__ = "ra_ix_child"
            id = sa.Column(sa.Integer, primary_key=True, autoincrement=False)
            parent_id = sa.Column(ForeignKey("ra_ix_parent.id"))
            parent = relationship(RaIxParent)

        sa.Index("ix_ra_ix_parent_id_desc", RaIxParent.id.desc())
        contexts: list[Any] = []
        # a load listener: instances built from the cache get a QueryContext, kept per mapper
        sa.event.listen(RaIxChild, "load", lambda target, context: contexts.append(context))
        reg.configure()
        if covered_by == "register_all":
            cache.register_all(reg)
        engine = sa.create_engine("sqlite://")
        reg.metadata.create_all(engine)
        factory = sessionmaker(engine)
        cache.install(factory)
        with factory() as session:
            session.add_all([RaIxParent(id=1), RaIxChild(id=1, parent_id=1)])
            session.commit()
        for _ in range(2):  # a fill, then a hit
            with factory() as session:
                child = session.get(RaIxChild, 1)
                assert child is not None and child.parent.id == 1
        assert cache.stats().hits > 0
        assert contexts and all(c is not None for c in contexts)
        del contexts[:]
        cache.uninstall(factory)
        engine.dispose()
        refs = [weakref.ref(RaIxParent), weakref.ref(RaIxChild), weakref.ref(RaIxParent.__table__)]
        reg.dispose()
        return refs

    gone = mapped_used_and_disposed()
    gc.collect()
    assert [ref() for ref in gone] == [None, None, None]
    cache.models(sa.create_engine("sqlite://"))  # the cache still answers


def test_warnings_as_errors_leave_the_mappers_usable(
    engine: Engine, redis_url: str, redis_client: redis.Redis, prefix: str
) -> None:
    """With ``WriteThroughWarning`` turned into an error, configuring raises it once, after
    every mapper is configured: no mapper is marked as failed, and the next use works, the
    plain model cached, the left-out ones read from the database; ``models()`` lists them
    all, and the other warnings are not raised later somewhere else."""
    cache = make_cache(redis_url, prefix)

    class LocalBase(DeclarativeBase):
        pass

    try:
        models = left_out_models(LocalBase)
        cache.register_all(LocalBase)
        with warnings.catch_warnings():
            warnings.simplefilter("error", WriteThroughWarning)
            with pytest.raises(WriteThroughWarning, match="leaves Ra"):
                LocalBase.registry.configure()
            LocalBase.registry.configure()  # nothing left to configure, nothing raised
            left_out = cache.models(engine).left_out  # every model left out, none raised again
            assert sorted(e.model.__name__ for e in left_out) == sorted(LEFT_OUT)
            reset_schema(engine, LocalBase.metadata)
            factory = sessionmaker(engine)
            cache.install(factory)
            with factory() as session:
                session.add_all(
                    [models["RaPlain"](id=1, name="p"), models["RaManager"](id=2, name="m")]
                )
                session.commit()
            assert entry_state(redis_client, entry_key(cache, models["RaPlain"], 1)) == "value"
            with factory() as session:
                assert session.get(models["RaManager"], 2) is not None
            cache.uninstall(factory)
    finally:
        del cache
        LocalBase.registry.dispose()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tll": 60}, r"unknown option\(s\) \['tll'\]"),
        ({"exclude": ["nope"]}, r"exclude names unknown attributes \['nope'\]"),
        ({"exclude": ["id"]}, r"primary key column cannot be excluded"),
        ({"ttl": 0}, r"ttl must be a positive"),
    ],
    ids=["unknown-option", "exclude-unknown", "exclude-key", "zero-ttl"],
)
@pytest.mark.parametrize("cacheable", [True, False], ids=["plain", "concrete"])
def test_a_wrong_option_still_raises_under_register_all(
    options: dict[str, Any], message: str, cacheable: bool, redis_url: str, prefix: str
) -> None:
    """A typo in ``__writethrough__`` is a mistake to fix, not a model the cache cannot keep:
    it raises at configuration even under ``register_all()``, even on a concrete hierarchy
    that would otherwise be left out."""
    cache = make_cache(redis_url, prefix)

    class LocalBase(DeclarativeBase):
        pass

    try:

        class RaOpts(LocalBase):
            __tablename__ = "ra_opts"
            __writethrough__ = options
            id: Mapped[int] = mapped_column(primary_key=True)
            name: Mapped[str] = mapped_column(String(40))

        if not cacheable:

            class RaOptsSub(RaOpts):
                __tablename__ = "ra_opts_sub"
                id: Mapped[int] = mapped_column(primary_key=True)
                name: Mapped[str] = mapped_column(String(40))
                __mapper_args__ = {"concrete": True}

        cache.register_all(LocalBase)
        with pytest.raises(ConfigurationError, match=message):
            LocalBase.registry.configure()
    finally:
        del cache
        LocalBase.registry.dispose()


@pytest.mark.parametrize("name", sorted(LEFT_OUT))
@pytest.mark.parametrize("how", ["mixin", "register", "mixin-and-register_all"])
def test_explicitly_cached_models_still_fail_at_configuration(
    name: str, how: str, redis_url: str, prefix: str
) -> None:
    """The mixin or ``register()`` on a model the cache cannot keep raises ConfigurationError,
    also when ``register_all()`` covers the model too."""
    cache = make_cache(redis_url, prefix)

    class LocalBase(DeclarativeBase):
        pass

    try:
        models = left_out_models(LocalBase, mixin="" if how == "register" else name)
        if how == "mixin-and-register_all":
            cache.register_all(LocalBase)
        if how == "register":
            LocalBase.registry.configure()
            with pytest.raises(ConfigurationError, match=LEFT_OUT[name]):
                cache.register(models[name])
        else:
            with pytest.raises(ConfigurationError, match=LEFT_OUT[name]):
                LocalBase.registry.configure()
        del models
    finally:
        del cache
        LocalBase.registry.dispose()


# ------------------------------------------------------------------------- cache.models()


class Color(enum.Enum):
    red = "red"


#: column type -> a typical value a commit writes
COLUMN_TYPES: dict[str, tuple[Any, Any]] = {
    "string": (String(20), "abc"),
    "char": (sa.CHAR(3), "ab"),  # padded (not on SQLite)
    "char_full": (sa.CHAR(3), "abc"),
    "text": (sa.Text(), "long text"),
    "boolean": (sa.Boolean(), True),
    "enum": (sa.Enum(Color), Color.red),
    "big_integer": (sa.BigInteger(), 2**40),
    "double": (sa.Double(), 1.5),
    "float24": (sa.Float(precision=24), 1.5),
    "numeric_scale": (sa.Numeric(10, 2), Decimal("1.25")),
    "numeric": (sa.Numeric(), Decimal("1.25")),
    "datetime": (sa.DateTime(), dt.datetime(2024, 1, 2, 3, 4, 5, 123456)),
    "datetime_tz": (
        sa.DateTime(timezone=True),
        dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc),
    ),
    "date": (sa.Date(), dt.date(2024, 1, 2)),
    "time": (sa.Time(), dt.time(3, 4, 5, 123456)),
    "interval": (sa.Interval(), dt.timedelta(days=1, seconds=5)),
    "uuid": (sa.Uuid(), uuid.UUID(int=5)),
    "uuid_str": (sa.Uuid(as_uuid=False), str(uuid.UUID(int=5))),
    "json": (sa.JSON(), {"b": 1, "a": [1, 2]}),
    "binary": (sa.LargeBinary(), b"\x00\x01"),
}


@pytest.fixture
def typed_models() -> Iterator[tuple[type[DeclarativeBase], dict[str, type]]]:
    class LocalBase(DeclarativeBase):
        pass

    found: dict[str, type] = {}
    for kind, (type_, _) in COLUMN_TYPES.items():
        ns = {
            "__tablename__": f"ra_t_{kind}",
            "id": mapped_column(sa.Integer, primary_key=True, autoincrement=False),
            "value": mapped_column(type_),
        }
        found[kind] = type(f"RaT_{kind}", (LocalBase,), ns)
    try:
        yield LocalBase, found
    finally:
        LocalBase.registry.dispose()


def test_models_names_the_columns_whose_commits_invalidate(
    engine: Engine,
    redis_url: str,
    redis_client: redis.Redis,
    prefix: str,
    typed_models: tuple[type[DeclarativeBase], dict[str, type]],
) -> None:
    """For one model per column type, ``models(engine)`` lists the column as inexact exactly
    when a commit of a typical value leaves a miss instead of the row (what the codec's
    exactness rules decide on this database), with a reason."""
    base, models = typed_models
    cache = make_cache(redis_url, prefix)
    cache.register_all(base)
    base.registry.configure()
    reset_schema(engine, base.metadata)
    factory = sessionmaker(engine)
    cache.install(factory)
    try:
        with factory() as session:
            for kind, model in models.items():
                session.add(model(id=1, value=COLUMN_TYPES[kind][1]))
            session.commit()
        report = cache.models(engine)
        invalidated = {
            kind
            for kind, model in models.items()
            if entry_state(redis_client, entry_key(cache, model, 1)) is None
        }
        listed = {}
        for kind, model in models.items():
            info = report[model]
            assert [c.attribute for c in info.inexact_columns] in ([], ["value"])
            for column in info.inexact_columns:
                assert column.column == f"ra_t_{kind}.value"
                assert column.reason
                listed[kind] = column.reason
        # a CHAR(n) column is listed for its values shorter than n; one of n characters (the
        # "char_full" model's) is written through all the same
        assert set(listed) - {"char_full"} == invalidated
        expected = {"float24", "uuid_str"}
        if engine.dialect.name != "sqlite":  # SQLite stores a CHAR value as given
            assert "CHAR" in listed["char"]
            expected.add("char")
        assert expected <= invalidated
        # JSON writes through on PostgreSQL, MariaDB and SQLite (not on MySQL); so does a CHAR
        # value of the column's length
        written = {"string", "big_integer", "date", "uuid", "binary", "json", "char_full"}
        assert written.isdisjoint(invalidated)
    finally:
        cache.uninstall(factory)
        del cache


def test_models_reports_classes_tables_keys_and_effective_options(
    engine: Engine, redis_url: str, redis_client: redis.Redis, prefix: str
) -> None:
    """Each cached model's classes (a hierarchy under its base), tables, key pattern (it
    matches the entries in Redis), effective options (cache-wide ``exclude`` included), whether
    its loads are served, and the models left out; frozen objects that print readably."""
    cache = make_cache(redis_url, prefix, exclude=["notes"], ttl=120)

    class LocalBase(DeclarativeBase):
        pass

    class RaItem(LocalBase):
        __tablename__ = "ra_item"
        __writethrough__ = {"ttl": 60, "strategy": "write-through", "exclude": ["cost"]}
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        code: Mapped[str] = mapped_column(sa.CHAR())  # CHAR(1): never written through
        cost: Mapped[int] = mapped_column()
        notes: Mapped[str | None] = mapped_column(String(40))

    class RaDocument(LocalBase):
        __tablename__ = "ra_document"
        __writethrough__ = {"strategy": "invalidate", "also_invalidates": ["ra_item"]}
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        type: Mapped[str] = mapped_column(String(20))
        __mapper_args__ = {"polymorphic_on": "type", "polymorphic_identity": "document"}

    class RaInvoice(RaDocument):
        __tablename__ = "ra_invoice"
        id: Mapped[int] = mapped_column(ForeignKey("ra_document.id"), primary_key=True)
        body: Mapped[str] = mapped_column(sa.CHAR())  # a subclass's inexact column
        __mapper_args__ = {"polymorphic_identity": "invoice"}

    class RaOrder(LocalBase):
        __tablename__ = "ra_order"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        item_id: Mapped[int] = mapped_column(ForeignKey("ra_item.id"))
        item: Mapped[RaItem] = relationship(lazy="joined")

    class RaView(LocalBase):
        __table__ = select(RaItem.__table__.c.id).subquery()

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", WriteThroughWarning)
            cache.register_all(LocalBase)
            LocalBase.registry.configure()
        reset_schema(engine, LocalBase.metadata)
        factory = sessionmaker(engine)
        cache.install(factory)
        with factory() as session:
            session.add(RaItem(id=1, code="a", cost=3, notes="n"))
            session.commit()
        with factory() as session:
            session.get(RaItem, 1)  # a fill (the CHAR column made the commit invalidate)

        report = cache.models(engine)
        ours = [i.model for i in report.cached if i.model.__name__[:2] == "Ra"]
        assert ours == [RaDocument, RaItem, RaOrder]
        item, document, order = report[RaItem], report[RaInvoice], report[RaOrder]
        assert document.model is RaDocument and document.classes == (RaDocument, RaInvoice)
        assert document.tables == ("ra_document", "ra_invoice")
        assert document.options.strategy == "invalidate"
        assert document.options.also_invalidates == ("ra_item",)
        assert [(c.attribute, c.column) for c in document.inexact_columns] == [
            ("body", "ra_invoice.body")
        ]
        assert item.classes == (RaItem,) and item.tables == ("ra_item",)
        assert item.options.ttl == 60 and item.options.exclude == frozenset({"cost", "notes"})
        assert report[RaOrder].options.ttl == 120
        assert [c.attribute for c in item.inexact_columns] == ["code"]
        assert item.loads_served and not order.loads_served
        matched = list(redis_client.scan_iter(match=item.keys))
        assert matched == [entry_key(cache, RaItem, 1).encode()]
        assert [(e.model, "Subquery" in e.reason) for e in report.left_out] == [(RaView, True)]
        with pytest.raises(dataclasses.FrozenInstanceError):
            item.loads_served = False  # type: ignore[misc]
        with pytest.raises(KeyError):
            report[RaView]
        text = str(report)
        for expected in ("RaItem", "ttl 60s", "exclude: cost, notes", "code (CHAR pads"):
            assert expected in text
        assert "RaDocument, RaInvoice" in text and "Left out by register_all():" in text
        assert "eagerly loaded relationships: item" in text
        assert order.not_served_because == "eagerly loaded relationships: item"
        assert item.not_served_because == ""
        cache.uninstall(factory)
    finally:
        del cache
        LocalBase.registry.dispose()
