"""The get path before the statement, and the read-back of expired objects.

* ``install()`` gives a ``sessionmaker`` (or a ``scoped_session``'s) a subclass of its Session
  class whose ``get()`` answers a plain primary-key get from Redis: no SQL, the ordinary
  persistent object, the same round trips as before on a miss;
* everything that is not the plain case reaches the database exactly as without it: options,
  ``populate_existing``, ``with_for_update``, a ``do_orm_execute`` listener of the user's
  (loader criteria), pending changes (autoflushed first), a Session class of the user's that
  routes binds itself, an uninstalled cache;
* both flavours: an ``async_sessionmaker``, ``AsyncSession`` subclass or
  ``async_scoped_session`` runs the same get path (its ``sync_session_class``, answered through
  ``redis.asyncio`` in SQLAlchemy's greenlet), with the same cases sent to the statement;
* reloading the expired attributes of a cached model's object (the read-back after a commit
  with ``expire_on_commit``) is served from the entry under the same rules, while an explicit
  ``refresh()``, an excluded column, the writer's own uncommitted flush and a row deleted
  meanwhile go to the database.

Tests that make the cache hold an older row than the database (an UPDATE outside any session)
show which loads read the database: those return the database's value.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from _flavours import FLAVOURS, Harness
from sqlalchemy import ForeignKey, String, create_engine, event, inspect, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    ORMExecuteState,
    Session,
    mapped_column,
    relationship,
    scoped_session,
    sessionmaker,
    with_loader_criteria,
)
from sqlalchemy.orm.exc import ObjectDeletedError

from sqlalchemy_writethrough import CachedModel, ConfigurationError, WriteThroughCache, from_cache
from sqlalchemy_writethrough.session import CachedGetSession

from _cache_helpers import cached_values
from _servers import COUNTED, capture_sql, counting_redis, reset_schema

pytestmark = pytest.mark.databases("sqlite")


class Base(DeclarativeBase):
    pass


class SgItem(Base, CachedModel):
    __tablename__ = "sg_item"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    rank: Mapped[int] = mapped_column(default=0)
    deleted: Mapped[bool] = mapped_column(default=False)
    tags: Mapped[list[SgTag]] = relationship(back_populates="item")


class SgTag(Base, CachedModel):
    __tablename__ = "sg_tag"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    item_id: Mapped[int] = mapped_column(ForeignKey("sg_item.id"))
    label: Mapped[str] = mapped_column(String(50))
    item: Mapped[SgItem] = relationship(back_populates="tags")


class SgSecret(Base, CachedModel):
    """A column the cache never stores."""

    __tablename__ = "sg_secret"
    __writethrough__ = {"exclude": ["token"]}

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    login: Mapped[str] = mapped_column(String(50))
    token: Mapped[str] = mapped_column(String(50))


class SgPlain(Base):
    """A model the cache does not hold."""

    __tablename__ = "sg_plain"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture
def db(engine: Engine) -> Engine:
    reset_schema(engine, Base.metadata)
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


def seed(factory: Any, *objects: Any) -> None:
    with factory() as s:
        s.add_all(objects)
        s.commit()


def behind_the_cache(db: Engine, **values: Any) -> None:
    """Change item 1 in the database only: a load served from Redis still sees the old row."""
    with db.begin() as conn:
        conn.execute(update(SgItem).where(SgItem.id == 1).values(**values))


def selects(sql: list[str]) -> list[str]:
    return [s for s in sql if s.lstrip().upper().startswith("SELECT")]


# ----------------------------------------------------------------- the plain get, served


def test_the_factory_makes_sessions_of_a_subclass_of_its_class(
    db: Engine, cache: WriteThroughCache
) -> None:
    """A Session class of the user's stays the class of every session, by name too."""

    class AppSession(Session):
        def app_helper(self) -> str:
            return "mine"

    maker = sessionmaker(db, class_=AppSession)
    cache.install(maker)
    with maker() as s:
        assert isinstance(s, AppSession)
        assert type(s).__name__ == "AppSession"
        assert s.app_helper() == "mine"


@pytest.mark.databases("sqlite", "postgresql")
def test_a_cached_get_runs_no_sql_and_returns_an_ordinary_object(
    factory: sessionmaker[Session], db: Engine, cache: WriteThroughCache
) -> None:
    seed(factory, SgItem(id=1, name="alpha", rank=3), SgTag(id=7, item_id=1, label="t"))
    before = cache.stats().hits
    with factory() as s:
        with capture_sql(db) as sql:
            item = s.get(SgItem, 1)
            again = s.get(SgItem, (1,))
        assert sql == []
        assert item is again and item is not None
        assert (item.id, item.name, item.rank, item.deleted) == (1, "alpha", 3, False)
        assert inspect(item).persistent and item in s
        assert cache.stats().hits == before + 1  # the second get is the identity map's
        assert [t.label for t in item.tags] == ["t"]
        item.rank = 4
        with capture_sql(db) as sql:
            s.commit()
        assert any("UPDATE sg_item SET rank" in stmt for stmt in sql)


def test_a_get_passing_every_keyword_at_its_default_is_served(
    factory: sessionmaker[Session], db: Engine
) -> None:
    """As scoped_session.get, Session.get_one and AsyncSession.get call it."""
    seed(factory, SgItem(id=1, name="cached"))
    behind_the_cache(db, name="db")
    with factory() as s, capture_sql(db) as sql:
        item = s.get(
            SgItem,
            1,
            options=None,
            populate_existing=None,
            with_for_update=None,
            identity_token=None,
            execution_options={},
            bind_arguments=None,
        )
        assert item is not None and item.name == "cached"
        assert s.get_one(SgItem, 1) is item
    assert sql == []


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"options": [from_cache(False)]}, id="from_cache-false"),
        pytest.param({"populate_existing": True}, id="populate_existing"),
        pytest.param({"with_for_update": True}, id="with_for_update"),
        pytest.param({"execution_options": {"populate_existing": True}}, id="exec-options"),
    ],
)
def test_a_get_asking_for_more_reads_the_database(
    factory: sessionmaker[Session], db: Engine, kwargs: dict[str, Any]
) -> None:
    seed(factory, SgItem(id=1, name="cached"))
    behind_the_cache(db, name="db")
    with factory() as s:
        item = s.get(SgItem, 1, **kwargs)
        assert item is not None and item.name == "db"


def test_a_do_orm_execute_listener_of_the_users_still_filters_gets(
    db: Engine, cache: WriteThroughCache
) -> None:
    """A soft-delete listener adding loader criteria (added before install(), as usage.md
    says): a cached row it filters out is not returned."""
    maker = sessionmaker(db)

    @event.listens_for(maker, "do_orm_execute")
    def hide_deleted(state: ORMExecuteState) -> None:
        if state.is_select:
            state.statement = state.statement.options(
                with_loader_criteria(SgItem, SgItem.deleted.is_(False), include_aliases=True)
            )

    cache.install(maker)
    seed(maker, SgItem(id=1, name="gone", deleted=True), SgItem(id=2, name="here"))
    assert cached_values(cache, cache.redis, SgItem, 1, dialect=db.dialect, bind=db) is not None
    with maker() as s:
        assert s.get(SgItem, 1) is None
        found = s.get(SgItem, 2)
        assert found is not None and found.name == "here"


@pytest.mark.parametrize("where", ["factory", "Session class", "session"])
def test_a_do_orm_execute_listener_added_after_install_sees_every_load(
    db: Engine, cache: WriteThroughCache, where: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The same soft-delete listener, added after install() (to the factory, to the Session
    class it derives from, or to one session): SQLAlchemy runs it after the cache's, which
    used to answer the load first, so the listener never saw it and a get returned the
    soft-deleted row. The cache now leaves every load with a listener after its own to the
    database, and says once why."""

    class OwnSession(Session):
        pass

    maker = sessionmaker(db, class_=OwnSession)
    cache.install(maker)
    seed(maker, SgItem(id=1, name="gone", deleted=True), SgItem(id=2, name="here"))
    assert cached_values(cache, cache.redis, SgItem, 1, dialect=db.dialect, bind=db) is not None
    with maker() as s:  # a first tag: the lazy load below is a cached many-to-one
        s.add(SgTag(id=1, item_id=1, label="t"))
        s.commit()
    seen: list[str] = []

    def hide_deleted(state: ORMExecuteState) -> None:
        seen.append("load")
        if state.is_select and not state.is_column_load and not state.is_relationship_load:
            state.statement = state.statement.options(
                with_loader_criteria(SgItem, SgItem.deleted.is_(False), include_aliases=True)
            )

    def loads(s: Session) -> list[Any]:
        stmt = select(SgItem).where(SgItem.id == 1).options(from_cache())
        tag = s.get(SgTag, 1)
        here = s.get(SgItem, 2)
        found = [s.get(SgItem, 1), s.scalars(stmt).all(), tag and tag.item]  # the criteria
        s.commit()  # reach the lazy load too; after it, reading `here` reloads it
        return [*found, here and here.name]

    with sessionmaker(db)() as plain:  # no cache: what the ORM returns
        event.listen(plain, "do_orm_execute", hide_deleted)
        expected = loads(plain)
    assert expected == [None, [], None, "here"] and seen == ["load"] * 6
    seen.clear()
    session = maker()
    target = {"factory": maker, "Session class": OwnSession, "session": session}[where]
    event.listen(target, "do_orm_execute", hide_deleted)
    caplog.set_level("WARNING", logger="sqlalchemy_writethrough")
    with session as s:
        assert loads(s) == expected
    assert seen == ["load"] * 6
    warned = [r.getMessage() for r in caplog.records if "hide_deleted" in r.getMessage()]
    assert len(warned) == 1, caplog.text
    assert "before cache.install()" in warned[0]


@pytest.mark.parametrize("load", ["get", "get after a miss", "select", "lazy", "in batch"])
def test_after_begin_listeners_fire_at_a_cached_load_as_at_a_database_load(
    db: Engine, cache: WriteThroughCache, load: str
) -> None:
    """A database load takes the session's connection, which fires ``after_begin``:
    zope.sqlalchemy joins the session to the transaction manager there, and the manager
    closes the session at the end of the request. A session that only read from the cache
    never fired it, so it was never closed: a ``scoped_session`` kept serving the objects of
    an earlier request. With such a listener the cache takes the connection too (and still
    answers without SQL); the session is in a transaction, as after a database load."""
    maker = sessionmaker(db)
    cache.install(maker)
    seed(
        maker, SgItem(id=1, name="one"), SgItem(id=2, name="two"), SgTag(id=1, item_id=1, label="t")
    )
    if load == "get after a miss":
        cache.invalidate(SgItem, 1)

    def run(s: Session) -> Any:
        if load == "lazy":
            tag = s.get(SgTag, 1)
            began.clear()
            s.commit()  # ends the transaction the tag's get began; the lazy load begins one
            assert tag is not None
            return tag.item.name
        if load == "select":
            return s.scalars(select(SgItem).where(SgItem.id == 1).options(from_cache())).one().name
        if load == "in batch":
            stmt = select(SgItem).where(SgItem.id.in_([1, 2])).options(from_cache())
            return sorted(i.name for i in s.scalars(stmt))
        found = s.get(SgItem, 1)
        return found and found.name

    began: list[Any] = []
    event.listen(maker, "after_begin", lambda s_, transaction, conn: began.append(conn.engine))
    with maker() as s, capture_sql(db) as sql:
        got = run(s)
        assert began == [db] and s.in_transaction()
    if load != "get after a miss":
        assert selects(sql) == []  # answered by the cache all the same
    with sessionmaker(db)() as plain:
        event.listen(plain, "after_begin", lambda s_, transaction, conn: began.append(conn.engine))
        began.clear()
        assert run(plain) == got and began == [db]


@pytest.mark.parametrize("load", ["get", "select", "in batch", "lazy", "expired attribute"])
def test_a_session_without_autobegin_refuses_a_cached_load_outside_a_transaction(
    db: Engine, cache: WriteThroughCache, load: str
) -> None:
    """``Session(autobegin=False)`` refuses a database load outside ``begin()``; a load the
    cache answered was returned instead, so the mistake showed only on a miss, or while
    Redis was down. Inside ``begin()`` both serve it."""
    maker = sessionmaker(db, autobegin=False)
    cache.install(maker)
    with maker() as s, s.begin():
        s.add_all([SgItem(id=1, name="one"), SgItem(id=2, name="two")])
        s.add(SgTag(id=1, item_id=1, label="t"))

    def run(s: Session) -> Any:
        if load in ("lazy", "expired attribute"):
            with s.begin():
                loaded = s.get(SgTag, 1) if load == "lazy" else s.get(SgItem, 1)
            assert loaded is not None
            return loaded.item.name if load == "lazy" else loaded.name  # outside begin()
        if load == "select":
            return s.scalars(select(SgItem).where(SgItem.id == 1).options(from_cache())).one().name
        if load == "in batch":
            stmt = select(SgItem).where(SgItem.id.in_([1, 2])).options(from_cache())
            return sorted(i.name for i in s.scalars(stmt))
        return s.get(SgItem, 1)

    for m in (sessionmaker(db, autobegin=False), maker):  # without the cache, then with it
        with m() as s, pytest.raises(sa.exc.InvalidRequestError, match="Autobegin is disabled"):
            run(s)
    with maker() as s, s.begin(), capture_sql(db) as sql:
        item = s.get(SgItem, 2)
        assert item is not None and item.name == "two" and selects(sql) == []


@pytest.mark.parametrize("load", ["get", "select", "in batch", "lazy"])
@pytest.mark.parametrize("installed_on", ["sessionmaker", "Session class"])
def test_a_cached_load_is_in_the_session_transaction_as_a_database_load_is(
    db: Engine, cache: WriteThroughCache, client: redis.Redis, load: str, installed_on: str
) -> None:
    """A database load autobegins the session's transaction, so what follows it behaves as
    inside one: ``rollback()`` expires every object (the next access reads the row as it is
    now, after another process's commit), ``in_transaction()`` is True and ``begin()``
    raises "already begun". A session that had only read the cache had no transaction:
    ``rollback()`` did nothing and kept the object **older than a completed commit**, and
    ``begin()`` passed where it raises on a miss, or while Redis is down."""
    expire_kept = {"expire_on_commit": False}
    if installed_on == "sessionmaker":
        maker: Any = sessionmaker(db, **expire_kept)
        cache.install(maker)
    else:

        class AppSession(Session):
            pass

        cache.install(AppSession)
        maker = sessionmaker(db, class_=AppSession, **expire_kept)
    plain = sessionmaker(db, **expire_kept)
    seed(maker, SgItem(id=1, name="one"), SgItem(id=2, name="two"))
    seed(maker, SgTag(id=1, item_id=1, label="t"))

    def loaded(s: Session) -> SgItem:
        if load == "lazy":
            with s.begin():
                tag = s.get(SgTag, 1)
            assert tag is not None and not s.in_transaction()
            return tag.item  # outside any transaction
        if load == "select":
            return s.scalars(select(SgItem).where(SgItem.id == 1).options(from_cache())).one()
        if load == "in batch":
            stmt = select(SgItem).where(SgItem.id.in_([1, 2])).options(from_cache())
            return {i.id: i for i in s.scalars(stmt)}[1]
        item = s.get(SgItem, 1)
        assert item is not None
        return item

    def run(m: Any, name: str) -> tuple[Any, ...]:
        with maker() as s:  # the entries filled, the row committed as `name`
            s.get(SgItem, 1)
            s.scalars(select(SgItem).where(SgItem.id.in_([1, 2])).options(from_cache())).all()
        with m() as s, capture_sql(db) as sql:
            item = loaded(s)
            served = selects(sql) == [] if load != "lazy" else None
            in_transaction = s.in_transaction()
            with pytest.raises(sa.exc.InvalidRequestError, match="already begun"):
                s.begin()
            with maker.begin() as other:  # another process commits
                found = other.get(SgItem, 1)
                assert found is not None
                found.name = name
            s.rollback()
            return served, in_transaction, s.get_transaction() is None, item.name

    assert run(plain, "uno") == (None if load == "lazy" else False, True, True, "uno")
    got = run(maker, "eins")
    assert got == (None if load == "lazy" else True, True, True, "eins")
    held = cached_values(cache, client, SgItem, 1, dialect=db.dialect)
    assert held is not None and held["name"] == "eins"


def test_a_session_that_only_read_the_cache_is_closed_by_its_transaction_manager(
    db: Engine, cache: WriteThroughCache
) -> None:
    """zope.sqlalchemy's pattern, reduced: ``after_begin`` joins the session to a request's
    transaction, whose end closes it. A scoped session reused by the next request then loads
    the row as it is now, not the object of the request before (still referenced here, as
    objects of a session often are: by others, by the application)."""
    Scoped = scoped_session(sessionmaker(db))
    cache.install(Scoped)
    seed(Scoped.session_factory, SgItem(id=1, name="one"))
    joined: list[Session] = []
    event.listen(Scoped, "after_begin", lambda s_, transaction, conn: joined.append(s_))
    held: list[SgItem] = []

    def request() -> str:
        try:
            item = Scoped.get(SgItem, 1)
            assert item is not None
            held.append(item)
            return item.name
        finally:  # the manager finishes what joined it
            for s_ in joined:
                s_.commit()
                s_.close()
            joined.clear()

    assert request() == "one"
    with Scoped.session_factory() as other:  # another process's commit
        found = other.get(SgItem, 1)
        assert found is not None
        found.name = "two"
        other.commit()
    assert request() == "two"
    Scoped.remove()


def test_listeners_added_after_a_session_was_made_fire_for_it(
    db: Engine, cache: WriteThroughCache
) -> None:
    """A session of the factory sets up its event collections when it is made (not at its
    first get): listeners given later to the factory, to the Session class it was made from
    or to the session itself still fire for it, at a cached get and at ``close()``, as for a
    plain Session; a ``do_orm_execute`` listener given later sees its gets."""

    class OwnSession(Session):
        pass

    maker = sessionmaker(db, class_=OwnSession)
    cache.install(maker)
    seed(maker, SgItem(id=1, name="one"))
    with maker() as s:
        s.get(SgItem, 1)  # cached now
    seen: list[str] = []
    never = maker()  # made before every listener below; never gets
    early = maker()
    event.listen(maker, "loaded_as_persistent", lambda s_, obj: seen.append(f"loaded {obj.id}"))
    event.listen(OwnSession, "persistent_to_detached", lambda s_, o: seen.append(f"off {o.id}"))
    event.listen(never, "pending_to_transient", lambda s_, obj: seen.append(f"dropped {obj.id}"))
    with capture_sql(db) as sql:
        held = early.get(SgItem, 1)
    assert held is not None and held.name == "one" and selects(sql) == []
    assert seen == ["loaded 1"]
    early.close()
    assert seen == ["loaded 1", "off 1"]
    never.add(SgItem(id=3, name="new"))
    never.close()
    assert seen == ["loaded 1", "off 1", "dropped 3"]
    late = maker()
    calls: list[str] = []
    # first in line (a listener after the cache's would not see a load the cache answers)
    event.listen(maker, "do_orm_execute", lambda state: calls.append("execute"), insert=True)
    with capture_sql(db) as sql:
        again = late.get(SgItem, 1)
    assert again is not None and again.name == "one" and selects(sql) == []
    assert calls == ["execute"]
    late.close()
    assert seen[3:] == ["loaded 1", "off 1"]


def test_pending_changes_are_flushed_before_a_cached_get(
    factory: sessionmaker[Session], db: Engine
) -> None:
    """As before a database load: autoflush first (then the get itself needs no SQL)."""
    seed(factory, SgItem(id=1, name="one"), SgItem(id=2, name="two"))
    with factory() as s:
        first = s.get(SgItem, 1)
        assert first is not None
        first.name = "uno"
        with capture_sql(db) as sql:
            second = s.get(SgItem, 2)
        assert second is not None and second.name == "two"
        assert any(stmt.startswith("UPDATE sg_item") for stmt in sql)
        with s.no_autoflush:
            first.name = "eins"
            s.expunge(second)
            with capture_sql(db) as sql:
                assert s.get(SgItem, 2) is not None
            assert sql == []
        s.rollback()


def test_the_identity_map_wins_over_the_cache(factory: sessionmaker[Session]) -> None:
    seed(factory, SgItem(id=1, name="stored"))
    with factory() as s, s.no_autoflush:
        item = s.get(SgItem, 1)
        assert item is not None
        item.name = "unflushed"
        assert s.get(SgItem, 1) is item
        assert item.name == "unflushed"


def test_a_session_class_routing_binds_itself_is_kept_and_served_through_events(
    db: Engine, cache: WriteThroughCache
) -> None:
    class RoutingSession(Session):
        def get_bind(self, mapper: Any = None, **kw: Any) -> Any:
            return db

    maker = sessionmaker(class_=RoutingSession)
    cache.install(maker)
    seed(maker, SgItem(id=1, name="routed"))
    with maker() as s, capture_sql(db) as sql:
        assert type(s).get_bind is RoutingSession.get_bind
        item = s.get(SgItem, 1)
        assert item is not None and item.name == "routed"
    assert sql == []


def test_a_scoped_session_gets_the_cached_get(db: Engine, cache: WriteThroughCache) -> None:
    scoped = scoped_session(sessionmaker(db))
    cache.install(scoped)
    try:
        seed(scoped, SgItem(id=1, name="scoped"))
        scoped.remove()
        with capture_sql(db) as sql:
            item = scoped.get(SgItem, 1)
        assert sql == [] and item is not None and item.name == "scoped"
    finally:
        scoped.remove()
        cache.uninstall(scoped)


def test_after_uninstall_gets_read_the_database(
    factory: sessionmaker[Session], db: Engine, cache: WriteThroughCache
) -> None:
    seed(factory, SgItem(id=1, name="cached"))
    behind_the_cache(db, name="db")
    cache.uninstall(factory)
    with factory() as s:
        item = s.get(SgItem, 1)
        assert item is not None and item.name == "db"
    cache.install(factory)  # and back: served from the cache again
    with factory() as s, capture_sql(db) as sql:
        item = s.get(SgItem, 1)
        assert item is not None and item.name == "cached"
    assert sql == []


def test_a_miss_costs_the_round_trips_it_cost_before(
    db: Engine, redis_url: str, prefix: str
) -> None:
    """A miss reads the entry once, takes a lease, loads and fills: three round trips (the
    get path's own read of the entry is not repeated behind the statement)."""
    counted, counter = counting_redis(redis_url, socket_timeout=10)
    cache = WriteThroughCache(counted, prefix=prefix, **COUNTED)
    maker = sessionmaker(db)
    cache.install(maker)
    with db.begin() as conn:
        for pk in (1, 2):
            conn.execute(SgItem.__table__.insert().values(id=pk, name="cold", rank=0))
    with maker() as s:
        s.get(SgItem, 2)  # a first miss: the connection, the epoch check, the keyspace record
        counter.reset()
        item = s.get(SgItem, 1)
        assert item is not None and item.name == "cold"
        assert counter.count == 3
    assert cache.stats().fills == 2
    with maker() as s, capture_sql(db) as sql:
        assert s.get(SgItem, 1) is not None
    assert sql == []
    counted.close()


def test_session_class_refuses_a_class_that_loads_gets_its_own_way(
    cache: WriteThroughCache,
) -> None:
    class OwnGet(Session):
        def get(self, entity: Any, ident: Any, **kw: Any) -> Any:
            return super().get(entity, ident, **kw)

    with pytest.raises(ConfigurationError, match=r"overrides how Session\.get loads"):
        cache.session_class(OwnGet)


def test_a_class_from_session_class_answers_gets_once_installed(
    db: Engine, cache: WriteThroughCache
) -> None:
    """What async_sessionmaker(sync_session_class=...) takes; not installed, it is a Session."""
    cls = cache.session_class()
    seed(sessionmaker(db, class_=cls), SgItem(id=1, name="cached"))  # not installed: no publish
    with cls(db) as s, capture_sql(db) as sql:
        assert s.get(SgItem, 1) is not None
    assert len(selects(sql)) == 1
    cache.install(cls)
    try:
        with cls(db) as s:
            s.get(SgItem, 1)  # a miss fills
        with cls(db) as s, capture_sql(db) as sql:
            item = s.get(SgItem, 1)
            assert item is not None and item.name == "cached"
        assert sql == []
    finally:
        cache.uninstall(cls)


# ----------------------------------------------------------------------- the read-back


@pytest.mark.databases("sqlite", "postgresql", "mariadb")
def test_reading_an_object_back_after_its_commit_runs_no_sql(
    factory: sessionmaker[Session], db: Engine, cache: WriteThroughCache
) -> None:
    """Load, change, commit, read: the expired attributes come from the entry the commit
    published, and the object is as clean as after a database reload."""
    seed(factory, SgItem(id=1, name="old", rank=1))
    with factory() as s:
        item = s.get(SgItem, 1)
        assert item is not None
        item.name = "new"
        s.commit()
        hits = cache.stats().hits
        with capture_sql(db) as sql:
            assert (item.id, item.name, item.rank, item.deleted) == (1, "new", 1, False)
        assert sql == []
        assert cache.stats().hits == hits + 1
        state = inspect(item)
        assert not state.expired_attributes and not state.modified and item not in s.dirty
        item.rank = 2
        with capture_sql(db) as sql:
            s.commit()
        assert [stmt for stmt in sql if stmt.startswith("UPDATE")] == [
            next(stmt for stmt in sql if stmt.startswith("UPDATE"))
        ]
        assert "name" not in next(stmt for stmt in sql if stmt.startswith("UPDATE"))
    with factory() as s:
        fresh = s.get(SgItem, 1, options=[from_cache(False)])
        assert fresh is not None and (fresh.name, fresh.rank) == ("new", 2)


def test_an_explicit_refresh_reads_the_database(factory: sessionmaker[Session], db: Engine) -> None:
    seed(factory, SgItem(id=1, name="cached"))
    with factory() as s:
        item = s.get(SgItem, 1)
        assert item is not None
        behind_the_cache(db, name="db")
        s.refresh(item)
        assert item.name == "db"


def test_an_expired_object_reloads_from_the_entry(
    factory: sessionmaker[Session], db: Engine
) -> None:
    """``expire()`` then access: a primary-key load like a get, so it reads what a get would
    (here the cached row; the database was changed behind the cache)."""
    seed(factory, SgItem(id=1, name="cached"))
    with factory() as s:
        item = s.get(SgItem, 1)
        assert item is not None
        behind_the_cache(db, name="db")
        s.expire(item)
        with capture_sql(db) as sql:
            assert item.name == "cached"
        assert sql == []


def test_a_column_the_cache_does_not_store_is_reloaded_from_the_database(
    factory: sessionmaker[Session], db: Engine
) -> None:
    seed(factory, SgSecret(id=1, login="ann", token="t1"))
    with factory() as s:
        secret = s.get(SgSecret, 1)
        assert secret is not None
        secret.login = "anne"
        s.commit()
        with capture_sql(db) as sql:
            assert (secret.login, secret.token) == ("anne", "t1")
        assert len(selects(sql)) == 1


def test_the_writers_own_flushed_row_is_reloaded_from_the_database(
    factory: sessionmaker[Session], db: Engine
) -> None:
    """Within the transaction that flushed it, the entry is locked: the reload reads the
    database, which holds the flushed (uncommitted) row."""
    seed(factory, SgItem(id=1, name="committed"))
    with factory() as s:
        item = s.get(SgItem, 1)
        assert item is not None
        item.name = "flushed"
        s.flush()
        s.expire(item)
        with capture_sql(db) as sql:
            assert item.name == "flushed"
        assert len(selects(sql)) == 1
        s.rollback()


def test_a_row_deleted_meanwhile_is_gone_on_read_back(
    factory: sessionmaker[Session], db: Engine
) -> None:
    seed(factory, SgItem(id=1, name="doomed"))
    with factory() as s:
        item = s.get(SgItem, 1)
        assert item is not None
        item.rank = 5
        s.commit()
        with factory() as other:
            victim = other.get(SgItem, 1)
            other.delete(victim)
            other.commit()
        with pytest.raises(ObjectDeletedError):
            _ = item.name


# ------------------------------------------------------------------------- both flavours


@pytest.fixture(params=FLAVOURS)
def h(
    request: pytest.FixtureRequest, db_url: str, redis_url: str, prefix: str
) -> Iterator[Harness]:
    harness = Harness(request.param, db_url, redis_url, prefix)
    reset_schema(harness.engine, Base.metadata)
    try:
        yield harness
    finally:
        harness.close()


@pytest.fixture
def statement_gets(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The gets that went on to SQLAlchemy's own get (``Session._get_impl``: the identity map,
    then a statement through ``do_orm_execute``); patched on the base class after the factory
    is made, so that the get path's classes are unchanged."""
    calls: list[Any] = []
    original = Session._get_impl

    def counted(self: Session, entity: Any, ident: Any, *args: Any, **kw: Any) -> Any:
        calls.append(entity)
        return original(self, entity, ident, *args, **kw)

    calls.append(lambda: monkeypatch.setattr(Session, "_get_impl", counted))
    return calls


def watch(statement_gets: list[Any]) -> list[Any]:
    statement_gets.pop()()
    return statement_gets


def flavour_seeded(h: Harness, **factory_kw: Any) -> tuple[WriteThroughCache, Any]:
    """A cache and factory of ``h``'s flavour, item 1 committed through them ("cached") and
    changed to "db" behind the cache, and a row of a model the cache does not hold."""
    cache = h.cache()
    factory = h.factory(cache, **factory_kw)
    with h.session(factory) as s:
        s.add(SgItem(id=1, name="cached"))
        s.add(SgPlain(id=1, name="plain"))
        s.commit()
    behind_the_cache(h.engine, name="db")
    return cache, factory


def test_a_plain_get_is_answered_before_the_statement_in_both_flavours(
    h: Harness, statement_gets: list[Any]
) -> None:
    cache, factory = flavour_seeded(h)
    gets = watch(statement_gets)
    hits = cache.stats().hits
    with h.session(factory) as s, h.sql() as sql:
        sync_session = s.session.sync_session if h.is_async else s.session
        assert isinstance(sync_session, CachedGetSession)
        item = s.get(SgItem, 1)
        assert item is not None and item.name == "cached"
        assert inspect(item).persistent and item in sync_session
    assert sql == [] and gets == []
    assert cache.stats().hits == hits + 1


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"options": [from_cache(False)]}, id="from_cache-false"),
        pytest.param({"populate_existing": True}, id="populate_existing"),
        pytest.param({"with_for_update": True}, id="with_for_update"),
        pytest.param({"execution_options": {"populate_existing": True}}, id="exec-options"),
    ],
)
def test_a_get_asking_for_more_reads_the_database_in_both_flavours(
    h: Harness, statement_gets: list[Any], kwargs: dict[str, Any]
) -> None:
    _, factory = flavour_seeded(h)
    gets = watch(statement_gets)
    with h.session(factory) as s:
        item = s.get(SgItem, 1, **kwargs)
        assert item is not None and item.name == "db"
    assert gets == [SgItem]


def test_what_the_get_path_leaves_goes_to_the_statement_in_both_flavours(
    h: Harness, statement_gets: list[Any]
) -> None:
    """An identity token, an object already in the identity map, a model the cache does not
    hold: SQLAlchemy's own get answers them (the cached item still without SQL)."""
    _, factory = flavour_seeded(h)
    gets = watch(statement_gets)
    with h.session(factory) as s:
        with h.sql() as sql:
            item = s.get(SgItem, 1, identity_token=None)
            assert item is not None and item.name == "cached"
            assert s.get(SgItem, 1) is item  # the identity map's
            assert gets == [SgItem]
        assert sql == []
        other = s.get(SgItem, 2, identity_token="shard")
        assert other is None and gets == [SgItem, SgItem]
        with h.sql() as sql:
            plain = s.get(SgPlain, 1)
        assert plain is not None and plain.name == "plain"
        assert gets == [SgItem, SgItem, SgPlain] and len(selects(sql)) == 1


class AppSession(Session):
    def app_helper(self) -> str:
        return "mine"


class OwnGetSession(Session):
    """A user's Session that loads gets its own way: kept, served through do_orm_execute."""

    def get(self, entity: Any, ident: Any, **kw: Any) -> Any:
        self.own_gets = getattr(self, "own_gets", 0) + 1
        return super().get(entity, ident, **kw)


@pytest.mark.parametrize("cls", [AppSession, OwnGetSession])
def test_a_users_session_class_keeps_working_in_both_flavours(
    h: Harness, statement_gets: list[Any], cls: type[Session]
) -> None:
    """``sessionmaker(class_=...)``, ``async_sessionmaker(sync_session_class=...)``: the
    sessions are of the user's class (by name too); one that overrides ``get`` keeps its own
    get, answered from the cache through ``do_orm_execute``."""
    _, factory = flavour_seeded(h, **{"sync_session_class" if h.is_async else "class_": cls})
    gets = watch(statement_gets)
    with h.session(factory) as s, h.sql() as sql:
        sync_session = s.session.sync_session if h.is_async else s.session
        assert isinstance(sync_session, cls) and type(sync_session).__name__ == cls.__name__
        item = s.get(SgItem, 1)
        assert item is not None and item.name == "cached"
    assert sql == []
    if cls is AppSession:
        assert sync_session.app_helper() == "mine"  # type: ignore[attr-defined]
        assert gets == []
    else:
        assert sync_session.own_gets == 1  # type: ignore[attr-defined]
        assert not isinstance(sync_session, CachedGetSession) and gets == [SgItem]


def test_uninstall_restores_database_gets_in_both_flavours(h: Harness) -> None:
    cache, factory = flavour_seeded(h)
    cache.uninstall(factory)
    with h.session(factory) as s:
        item = s.get(SgItem, 1)
        assert item is not None and item.name == "db"
    cache.install(factory)  # and back: served from the cache again
    with h.session(factory) as s, h.sql() as sql:
        item = s.get(SgItem, 1)
        assert item is not None and item.name == "cached"
    assert sql == []


def test_uninstalling_the_first_of_two_caches_gives_the_second_the_get_path_in_both_flavours(
    h: Harness, statement_gets: list[Any]
) -> None:
    """With two caches on one factory neither answers before the statement (each sees the
    other's listener); uninstalling the first gives the second the get path (docs/asyncio.md,
    "Two caches on one factory"), though the first one's listeners stay on the class, turned
    off (uninstall() removes none: removing one while another thread's session runs its
    event makes that session raise)."""
    first, factory = flavour_seeded(h)
    second = h.cache(prefix=f"{h.prefix}-second")
    second.install(factory)
    try:
        gets = watch(statement_gets)
        with h.session(factory) as s:
            assert s.get(SgItem, 1).name == "cached"  # type: ignore[union-attr]
        assert len(gets) == 1  # through do_orm_execute, from the first cache
        first.uninstall(factory)
        with h.session(factory) as s:
            assert s.get(SgItem, 1).name == "db"  # the second cache's miss fills
        del gets[:]
        with h.session(factory) as s, h.sql() as sql:
            assert s.get(SgItem, 1).name == "db"  # type: ignore[union-attr]
        assert (gets, sql) == ([], [])
    finally:
        second.uninstall(factory)


def test_an_async_session_subclass_and_async_scoped_session_get_the_get_path(
    db_url: str, redis_url: str, prefix: str, statement_gets: list[Any]
) -> None:
    """Installed on an ``AsyncSession`` subclass (with a ``sync_session_class`` of the
    user's) and on an ``async_scoped_session``: plain gets answered before the statement."""
    from sqlalchemy.ext.asyncio import AsyncSession, async_scoped_session, async_sessionmaker

    h = Harness("async", db_url, redis_url, prefix)
    reset_schema(h.engine, Base.metadata)
    try:

        class AppAsyncSession(AsyncSession):
            sync_session_class = AppSession

        cache = h.cache()
        cache.install(AppAsyncSession)
        scoped = async_scoped_session(async_sessionmaker(h.async_engine), scopefunc=lambda: 1)
        cache.install(scoped)
        seed_maker = async_sessionmaker(h.async_engine, class_=AppAsyncSession)
        with h.session(seed_maker) as s:
            s.add(SgItem(id=1, name="cached"))
            s.commit()
        behind_the_cache(h.engine, name="db")
        gets = watch(statement_gets)
        with h.session(seed_maker) as s, h.sql() as sql:
            assert isinstance(s.session.sync_session, AppSession)
            assert s.get(SgItem, 1).name == "cached"
        with h.sql() as scoped_sql:
            assert h.run(scoped.get(SgItem, 1)).name == "cached"
            h.run(scoped.remove())
        assert sql == [] and scoped_sql == [] and gets == []
        cache.uninstall(AppAsyncSession)
        with h.session(seed_maker) as s:
            assert s.get(SgItem, 1).name == "db"
        cache.uninstall(scoped)
        assert h.run(scoped.get(SgItem, 1)).name == "db"
        h.run(scoped.remove())
    finally:
        h.close()


def test_a_get_reads_the_database_its_entity_is_bound_to(
    db: Engine, cache: WriteThroughCache, tmp_path: Any
) -> None:
    """``sessionmaker(bind=other, binds={SgItem: db})``: the session has a bind, but its gets of
    ``SgItem`` read ``db``'s entries (answered without the database), never ``other``'s."""
    other = create_engine(f"sqlite:///{tmp_path / 'other.db'}")
    try:
        reset_schema(other, Base.metadata)
        for engine, name in ((db, "bound"), (other, "other")):
            maker = sessionmaker(engine)
            cache.install(maker)
            seed(maker, SgItem(id=1, name=name))
            with maker() as s:
                assert s.get(SgItem, 1).name == name  # each database's entry, filled
        routed = sessionmaker(bind=other, binds={SgItem: db})
        cache.install(routed)
        with routed() as s, capture_sql(db) as sql, capture_sql(other) as other_sql:
            assert s.get(SgItem, 1).name == "bound"
        assert sql == [] and other_sql == []
    finally:
        other.dispose()


def test_a_rollback_after_cached_gets_expires_them_in_both_flavours(h: Harness) -> None:
    """``await session.rollback()`` after gets the cache answered (an ``AsyncSession``'s
    runs its sync session's): the objects are expired, and read again they are the row as
    another process committed it meanwhile; the session is in a transaction after the get,
    as after a database load."""
    cache = h.cache()
    factory = h.factory(cache, expire_on_commit=False)
    with h.session(factory) as s:
        s.add(SgItem(id=1, name="one"))
        s.commit()
    with h.session(factory) as s, h.sql() as sql:
        item = s.get(SgItem, 1)
        assert item is not None and item.name == "one" and sql == []
        in_transaction = s.session.in_transaction()
        with h.session(factory) as other:
            other.get(SgItem, 1).name = "two"
            other.commit()
        s.rollback()
        assert in_transaction and s.run_sync(lambda _: item.name) == "two"


@pytest.mark.parametrize("event_name", ["after_transaction_create", "after_transaction_end"])
def test_transaction_listeners_see_the_transaction_a_cached_get_begins(
    db: Engine, factory: sessionmaker[Session], event_name: str
) -> None:
    """A session with ``after_transaction_create`` or ``after_transaction_end`` listeners of
    its own begins its transaction at a cached get, as at a database load: they fire when
    they would without the cache (the get path's Session subclass otherwise begins it only
    when something can tell, see test_a_cached_load_is_in_the_session_transaction_...)."""
    seed(factory, SgItem(id=1, name="one"))
    seen: list[str] = []

    def run(maker: Any) -> list[str]:
        seen.clear()
        with maker() as s, capture_sql(db):
            event.listen(s, event_name, lambda *a: seen.append(event_name))
            assert s.get(SgItem, 1) is not None
            seen.append("got")
        seen.append("closed")
        return list(seen)

    expected = run(sessionmaker(db))
    assert expected in (
        [event_name, "got", "closed"],
        ["got", event_name, "closed"],
    )
    assert run(factory) == expected


@pytest.mark.parametrize("load", ["get", "select", "in batch", "lazy", "expired attribute"])
def test_load_and_refresh_listeners_get_the_query_context_of_the_load(
    db: Engine, cache: WriteThroughCache, load: str
) -> None:
    """An instance built from the cache fired ``load`` (and ``refresh``, for a reload of
    expired attributes) with ``None`` for the QueryContext, where a database load passes one:
    a listener that reads ``context.session.info`` (the request's user, a tenant) raised
    AttributeError inside ``session.get()``, only when the row was cached. Each now gets a
    QueryContext of a load of the row by primary key: the loading session, its statement
    (``select(Model)`` by key) and the key's values as its parameters."""
    maker = sessionmaker(db, info={"who": "request-7"})
    cache.install(maker)
    seed(maker, SgItem(id=1, name="one"), SgItem(id=2, name="two"))
    seed(maker, SgTag(id=1, item_id=1, label="t"))
    event_name = "refresh" if load == "expired attribute" else "load"
    seen: list[tuple[Any, ...]] = []

    def listener(target: Any, context: Any, *rest: Any) -> None:
        stmt = context.query
        seen.append(
            (
                type(target).__name__,
                context.session.info["who"],
                isinstance(context, sa.orm.QueryContext),
                [d["entity"] for d in stmt.column_descriptions],
                sorted(context.params.values()) if load in ("get", "lazy") else None,
            )
        )

    def run(s: Session) -> Any:
        if load == "lazy":
            tag = s.get(SgTag, 1)
            assert tag is not None
            seen.clear()
            return tag.item.name
        if load == "select":
            return s.scalars(select(SgItem).where(SgItem.id == 1).options(from_cache())).one().name
        if load == "in batch":
            stmt = select(SgItem).where(SgItem.id.in_([1, 2])).options(from_cache())
            return sorted(i.name for i in s.scalars(stmt))
        found = s.get(SgItem, 1)
        assert found is not None
        if load == "expired attribute":
            s.expire(found)
            seen.clear()
            return found.name
        return found.name

    event.listen(SgItem, event_name, listener)
    try:
        outcomes = []
        for m in (sessionmaker(db, info={"who": "request-7"}), maker):  # plain, then cached
            with m() as s, capture_sql(db) as sql:
                seen.clear()
                got = run(s)
            outcomes.append((got, list(seen)))
            if m is maker:
                assert selects(sql) == []  # served from the cache
        assert outcomes[0] == outcomes[1]
        assert outcomes[1][1] and outcomes[1][1][0][1:3] == ("request-7", True)
    finally:
        event.remove(SgItem, event_name, listener)
