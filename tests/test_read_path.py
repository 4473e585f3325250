"""The read path: which primary-key loads are served from Redis, and what they return.

Checked against real Redis on SQLite, PostgreSQL and MariaDB:

* ``session.get``, ``select(M).where(M.id == x).options(from_cache())``, ``filter_by``, many-to-one
  lazy loads and composite keys are served from Redis with no SQL at all;
* everything that asks the ORM for more than "this entity by this key" goes to the database
  and returns the database's row (invariant 7): locking, ``populate_existing``, ``refresh``,
  loader criteria, joins, eager loads, ``from_cache(False)``, a plain ``select()``, limits,
  non-key filters. Those tests first make the cache hold an older row than the database (an
  UPDATE outside any session), so a result served from Redis would be visible;
* the identity map wins over the cache (unflushed edits are never overwritten);
* a miss loads from the database and fills the entry, only from a fresh read (docs/consistency.md,
  "How: locks, leases and a guarded publish");
* instances built from the cache are ordinary persistent ORM objects;
* excluded and deferred columns never come from Redis;
* bad cache contents are a miss, a warning and a metric, never an exception (invariant 8).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest
import redis
from sqlalchemy import (
    ForeignKey,
    String,
    Text,
    event,
    inspect,
    literal,
    select,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    MappedAsDataclass,
    ORMExecuteState,
    Session,
    column_property,
    deferred,
    joinedload,
    mapped_column,
    query_expression,
    relationship,
    selectinload,
    sessionmaker,
    with_loader_criteria,
)
from sqlalchemy.orm.exc import DetachedInstanceError

from sqlalchemy_writethrough import CachedModel, CacheStats, WriteThroughCache, from_cache
from sqlalchemy_writethrough.protocol import payload_of

from _cache_helpers import cached_values, entry_key, entry_state
from _servers import capture_sql, reset_schema

# ------------------------------------------------------------------------------ models


class Base(DeclarativeBase):
    pass


class RpParent(Base, CachedModel):
    __tablename__ = "rp_parent"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    rank: Mapped[int] = mapped_column(default=0)
    deleted: Mapped[bool] = mapped_column(default=False)
    children: Mapped[list[RpChild]] = relationship(back_populates="parent")


class RpChild(Base, CachedModel):
    __tablename__ = "rp_child"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    parent_id: Mapped[int] = mapped_column(ForeignKey("rp_parent.id"))
    name: Mapped[str] = mapped_column(String(50))
    parent: Mapped[RpParent] = relationship(back_populates="children")


class RpGrandchild(Base, CachedModel):
    __tablename__ = "rp_grandchild"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    child_id: Mapped[int] = mapped_column(ForeignKey("rp_child.id"))
    name: Mapped[str] = mapped_column(String(50))
    child: Mapped[RpChild] = relationship()


class RpPair(Base, CachedModel):
    """Composite primary key (string, integer)."""

    __tablename__ = "rp_pair"

    region: Mapped[str] = mapped_column(String(20), primary_key=True)
    number: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    label: Mapped[str] = mapped_column(String(50))


class RpAccount(Base, CachedModel):
    """An excluded column and two deferred ones (both spellings)."""

    __tablename__ = "rp_account"
    __writethrough__ = {"exclude": ["secret"]}

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    login: Mapped[str] = mapped_column(String(50))
    secret: Mapped[str] = mapped_column(String(100))
    notes: Mapped[str | None] = mapped_column(Text, deferred=True)
    bio: Mapped[str | None] = deferred(mapped_column(Text))


class RpPoint(MappedAsDataclass, Base, CachedModel):
    """A dataclass-mapped model (``__eq__`` compares fields, ``__hash__`` is None)."""

    __tablename__ = "rp_point"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    label: Mapped[str] = mapped_column(String(50))
    x: Mapped[int] = mapped_column(default=0)


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


# ----------------------------------------------------------------------------- helpers


def seed(factory: sessionmaker[Session], *objects: Any) -> None:
    """Insert ``objects`` through the ORM and commit (which publishes them to Redis)."""
    with factory() as s:
        s.add_all(objects)
        s.commit()


#: the counters of single cache events these tests watch
EVENTS = ("hits", "misses", "fills", "fills_refused", "publishes", "invalidations", "restores")
EVENTS += ("bypasses", "errors", "decode_errors", "lock_failures", "epochs")


def delta(before: CacheStats, after: CacheStats) -> dict[str, int]:
    """The event counters that moved between two snapshots (not the transaction counts,
    gauges, latencies or per-model breakdowns)."""
    out = {}
    for name in EVENTS:
        moved = getattr(after, name) - getattr(before, name)
        if moved:
            out[name] = moved
    return out


def stale_parent(
    factory: sessionmaker[Session], engine: Engine, cache: WriteThroughCache, client: redis.Redis
) -> None:
    """Row 1 is "cached" in Redis but "db" in the database (changed outside any session).

    A load that bypasses the cache returns "db"; one served from Redis would return "cached".
    """
    seed(factory, RpParent(id=1, name="cached"), RpChild(id=10, parent_id=1, name="kid"))
    values = cached_values(cache, client, RpParent, 1, dialect=engine.dialect)
    assert values is not None and values["name"] == "cached"
    with engine.begin() as conn:
        conn.execute(update(RpParent).where(RpParent.id == 1).values(name="db"))


def insert_behind_cache(engine: Engine, **row: Any) -> None:
    """Insert a parent row with Core, outside any session: Redis knows nothing about it."""
    with engine.begin() as conn:
        conn.execute(RpParent.__table__.insert().values(rank=0, deleted=False, **row))


def replace_payload(client: redis.Redis, key: str, payload: bytes) -> None:
    """Keep the entry's VALUE header (and real generation), swap the payload."""
    raw = client.get(key)
    assert raw is not None and raw[:1] == b"V"
    header = raw[: raw.index(b":", 1) + 1]
    client.set(key, header + payload)


# ------------------------------------------------------------- 1. served with no SQL


def test_get_is_served_from_redis_with_no_sql(
    factory: sessionmaker[Session], db: Engine, cache: WriteThroughCache
) -> None:
    """After a commit published the row, ``session.get`` runs no SQL and counts a hit."""
    seed(factory, RpParent(id=1, name="alpha", rank=3))
    before = cache.stats()
    with factory() as s, capture_sql(db) as sql:
        p = s.get(RpParent, 1)
        assert p is not None
        assert (p.id, p.name, p.rank, p.deleted) == (1, "alpha", 3, False)
    assert sql == []
    assert delta(before, cache.stats()) == {"hits": 1}


@pytest.mark.parametrize(
    "load",
    [
        pytest.param(
            lambda s: s.execute(
                select(RpParent).where(RpParent.id == 1).options(from_cache())
            ).scalar_one(),
            id="execute-scalar_one",
        ),
        pytest.param(
            lambda s: s.scalars(
                select(RpParent).where(RpParent.id == 1).options(from_cache())
            ).one(),
            id="scalars-one",
        ),
        pytest.param(
            lambda s: s.scalars(
                select(RpParent).where(RpParent.id == 1).options(from_cache())
            ).all()[0],
            id="scalars-all",
        ),
        pytest.param(
            lambda s: s.scalars(select(RpParent).filter_by(id=1).options(from_cache())).first(),
            id="filter_by",
        ),
        pytest.param(
            lambda s: s.scalar(
                select(RpParent).where(1 == RpParent.id).options(from_cache())  # noqa: SIM300
            ),
            id="reversed-equality",
        ),
    ],
)
def test_select_with_from_cache_is_served_with_no_sql(
    factory: sessionmaker[Session],
    db: Engine,
    cache: WriteThroughCache,
    load: Callable[[Session], Any],
) -> None:
    """``select(M).where(pk == x).options(from_cache())`` is served from Redis, no SQL."""
    seed(factory, RpParent(id=1, name="alpha"))
    before = cache.stats()
    with factory() as s, capture_sql(db) as sql:
        p = load(s)
        assert isinstance(p, RpParent)
        assert (p.id, p.name) == (1, "alpha")
    assert sql == []
    assert delta(before, cache.stats()) == {"hits": 1}


def test_many_to_one_lazy_load_is_served_from_redis(
    factory: sessionmaker[Session], db: Engine
) -> None:
    """``child.parent`` of a cached parent: no SQL, whether the child came from Redis or SQL."""
    seed(factory, RpParent(id=1, name="mum"))
    seed(factory, RpChild(id=10, parent_id=1, name="kid"))
    with factory() as s:
        with capture_sql(db) as sql:
            child = s.get(RpChild, 10)
            assert child is not None
            assert child.parent.name == "mum"
        assert sql == []

    with factory() as s:
        children = s.scalars(select(RpChild).where(RpChild.name == "kid")).all()  # SQL
        with capture_sql(db) as sql:
            assert children[0].parent.id == 1
            assert children[0].parent.name == "mum"
        assert sql == []


def test_chain_of_two_many_to_one_hops_is_served_from_redis(
    factory: sessionmaker[Session], db: Engine
) -> None:
    """``grandchild.child.parent``: every hop is a primary-key load served from Redis."""
    seed(factory, RpParent(id=1, name="gran"))
    seed(factory, RpChild(id=10, parent_id=1, name="mum"))
    seed(factory, RpGrandchild(id=100, child_id=10, name="kid"))
    with factory() as s, capture_sql(db) as sql:
        g = s.get(RpGrandchild, 100)
        assert g is not None
        assert g.child.name == "mum"
        assert g.child.parent.name == "gran"
    assert sql == []


def test_composite_primary_key_get_with_tuple_and_dict(
    factory: sessionmaker[Session], db: Engine, cache: WriteThroughCache
) -> None:
    """A composite key is served from Redis whether ``get`` receives a tuple or a dict."""
    seed(
        factory,
        RpPair(region="eu", number=7, label="seven"),
        RpPair(region="us", number=7, label="other"),
    )
    before = cache.stats()
    with factory() as s, capture_sql(db) as sql:
        by_tuple = s.get(RpPair, ("eu", 7))
        assert by_tuple is not None and by_tuple.label == "seven"
    assert sql == []
    with factory() as s, capture_sql(db) as sql:
        by_dict = s.get(RpPair, {"region": "us", "number": 7})
        assert by_dict is not None and by_dict.label == "other"
        both = s.scalars(
            select(RpPair).where(RpPair.number == 7, RpPair.region == "eu").options(from_cache())
        ).one()
        assert both.label == "seven"
    assert sql == []
    assert delta(before, cache.stats()) == {"hits": 3}


# ------------------------------------------------------------- 2. always the database


def _joined_select(s: Session) -> Any:
    stmt = select(RpParent).join(RpParent.children).where(RpParent.id == 1).options(from_cache())
    return s.scalars(stmt).first()


BYPASSING_LOADS: list[Any] = [
    pytest.param(lambda s: s.get(RpParent, 1, with_for_update=True), id="get-with_for_update"),
    pytest.param(lambda s: s.get(RpParent, 1, populate_existing=True), id="get-populate_existing"),
    pytest.param(
        lambda s: s.get(RpParent, 1, execution_options={"populate_existing": True}),
        id="get-execution_options-populate_existing",
    ),
    pytest.param(
        lambda s: s.scalars(
            select(RpParent)
            .where(RpParent.id == 1)
            .options(from_cache())
            .execution_options(populate_existing=True)
        ).one(),
        id="select-populate_existing",
    ),
    pytest.param(
        lambda s: s.scalars(
            select(RpParent).where(RpParent.id == 1).options(from_cache()).with_for_update()
        ).one(),
        id="select-with_for_update",
    ),
    pytest.param(
        lambda s: s.get(
            RpParent, 1, options=[with_loader_criteria(RpParent, RpParent.deleted.is_(False))]
        ),
        id="get-with_loader_criteria",
    ),
    pytest.param(
        lambda s: s.scalars(
            select(RpParent)
            .where(RpParent.id == 1)
            .options(from_cache(), with_loader_criteria(RpParent, RpParent.deleted.is_(False)))
        ).one(),
        id="select-with_loader_criteria",
    ),
    pytest.param(_joined_select, id="select-join"),
    pytest.param(
        lambda s: s.get(RpParent, 1, options=[joinedload(RpParent.children)]),
        id="get-joinedload",
    ),
    pytest.param(
        lambda s: (
            s.scalars(
                select(RpParent)
                .where(RpParent.id == 1)
                .options(from_cache(), joinedload(RpParent.children))
            )
            .unique()
            .one()
        ),
        id="select-joinedload",
    ),
    pytest.param(
        lambda s: s.get(RpParent, 1, options=[selectinload(RpParent.children)]),
        id="get-selectinload",
    ),
    pytest.param(
        lambda s: s.scalars(
            select(RpParent)
            .where(RpParent.id == 1)
            .options(from_cache(), selectinload(RpParent.children))
        ).one(),
        id="select-selectinload",
    ),
    pytest.param(
        lambda s: s.get(RpParent, 1, options=[from_cache(False)]), id="get-from_cache-False"
    ),
    pytest.param(
        lambda s: s.scalars(
            select(RpParent).where(RpParent.id == 1).options(from_cache(False))
        ).one(),
        id="select-from_cache-False",
    ),
    pytest.param(
        lambda s: s.scalars(select(RpParent).where(RpParent.id == 1)).one(),
        id="select-without-from_cache",
    ),
    pytest.param(
        lambda s: s.scalars(
            select(RpParent).where(RpParent.name == "db").options(from_cache())
        ).one(),
        id="select-non-pk-filter",
    ),
]


@pytest.mark.parametrize("load", BYPASSING_LOADS)
def test_loads_that_must_read_the_database(
    factory: sessionmaker[Session],
    db: Engine,
    cache: WriteThroughCache,
    client: redis.Redis,
    load: Callable[[Session], Any],
) -> None:
    """Invariant 7: these loads emit SQL and return the database's row, not Redis's."""
    stale_parent(factory, db, cache, client)
    before = cache.stats()
    with factory() as s, capture_sql(db) as sql:
        p = load(s)
        assert p is not None
        assert p.name == "db"
    assert any("rp_parent" in stmt for stmt in sql)
    assert delta(before, cache.stats()).get("hits", 0) == 0


def test_refresh_reads_the_database(
    factory: sessionmaker[Session], db: Engine, cache: WriteThroughCache, client: redis.Redis
) -> None:
    """``session.refresh()`` of a cache-served object emits SQL and takes the database's row."""
    stale_parent(factory, db, cache, client)
    with factory() as s:
        with capture_sql(db) as sql:
            p = s.get(RpParent, 1)
            assert p is not None and p.name == "cached"  # a cache hit (the row changed behind it)
        assert sql == []
        with capture_sql(db) as sql:
            s.refresh(p)
        assert len(sql) == 1
        assert p.name == "db"


@pytest.mark.parametrize(
    "stmt",
    [
        pytest.param(
            lambda: select(RpParent).where(RpParent.id == 1).limit(0).options(from_cache()),
            id="limit-0",
        ),
        pytest.param(
            lambda: (
                select(RpParent)
                .where(RpParent.id == 1, RpParent.name == "cached")
                .options(from_cache())
            ),
            id="pk-and-non-pk-filter",
        ),
    ],
)
def test_statements_that_select_no_row_in_the_database_return_no_row(
    factory: sessionmaker[Session],
    db: Engine,
    cache: WriteThroughCache,
    client: redis.Redis,
    stmt: Callable[[], Any],
) -> None:
    """A limit or an extra non-key filter goes to the database, which returns no row here."""
    stale_parent(factory, db, cache, client)
    with factory() as s, capture_sql(db) as sql:
        assert s.scalars(stmt()).all() == []
    assert len(sql) == 1


def test_loader_criteria_that_filter_the_row_out_return_nothing(
    factory: sessionmaker[Session], db: Engine, cache: WriteThroughCache, client: redis.Redis
) -> None:
    """A soft-deleted row is cached, but a soft-delete criteria hides it: None / no row."""
    seed(factory, RpParent(id=1, name="gone", deleted=True))
    assert entry_state(client, entry_key(cache, RpParent, 1)) == "value"
    not_deleted = with_loader_criteria(RpParent, RpParent.deleted.is_(False))
    with factory() as s, capture_sql(db) as sql:
        assert s.get(RpParent, 1, options=[not_deleted]) is None
    assert len(sql) == 1
    with factory() as s, capture_sql(db) as sql:
        stmt = select(RpParent).where(RpParent.id == 1).options(from_cache(), not_deleted)
        assert s.scalars(stmt).all() == []
    assert len(sql) == 1


def test_soft_delete_listener_added_before_install_hides_cached_row(
    db: Engine, cache: WriteThroughCache, client: redis.Redis
) -> None:
    """The usual global soft-delete recipe (a ``do_orm_execute`` listener adding loader
    criteria, installed before the cache) also hides a cached row from ``get``."""
    factory = sessionmaker(db)

    @event.listens_for(factory, "do_orm_execute")
    def _soft_delete(state: ORMExecuteState) -> None:
        if state.is_select and not state.is_column_load and not state.is_relationship_load:
            state.statement = state.statement.options(
                with_loader_criteria(RpParent, RpParent.deleted.is_(False))
            )

    cache.install(factory)
    seed(factory, RpParent(id=1, name="gone", deleted=True), RpParent(id=2, name="here"))
    assert entry_state(client, entry_key(cache, RpParent, 1)) == "value"
    with factory() as s, capture_sql(db) as sql:
        assert s.get(RpParent, 1) is None
        here = s.get(RpParent, 2)
        assert here is not None and here.name == "here"
    assert len(sql) == 2


# ------------------------------------------------------------------ 3. identity map


def test_identity_map_wins_over_the_cache(factory: sessionmaker[Session], db: Engine) -> None:
    """An object with unflushed edits is returned as is by ``get`` and ``select`` +
    ``from_cache()``: its edits are not overwritten and it stays dirty (no autoflush here)."""
    seed(factory, RpParent(id=1, name="cached", rank=1))
    with factory() as s:
        p = s.get(RpParent, 1)
        assert p is not None
        p.name = "edited"
        p.rank = 99
        with capture_sql(db) as sql:
            assert s.get(RpParent, 1) is p
            with s.no_autoflush:
                stmt = select(RpParent).where(RpParent.id == 1).options(from_cache())
                assert s.scalars(stmt).one() is p
        assert sql == []
        assert (p.name, p.rank) == ("edited", 99)
        assert p in s.dirty
        assert s.is_modified(p)


def test_select_from_cache_autoflushes_like_a_database_select(
    factory: sessionmaker[Session], db: Engine
) -> None:
    """Invariant 7 (the ORM behaves as without the extension, apart from fewer SELECTs):
    with autoflush on, a ``select()`` flushes pending edits before it runs. A ``from_cache()``
    select of an identity-mapped, edited object must still flush them (an UPDATE, no SELECT
    needed), and the object comes back with its edits."""
    seed(factory, RpParent(id=1, name="cached"))
    with factory() as s:
        p = s.get(RpParent, 1)
        assert p is not None
        p.name = "edited"
        with capture_sql(db) as sql:
            stmt = select(RpParent).where(RpParent.id == 1).options(from_cache())
            assert s.scalars(stmt).one() is p
        assert p.name == "edited"
        assert [sent for sent in sql if sent.lstrip().upper().startswith("UPDATE")], sql
        assert p not in s.dirty


def test_cache_hit_autoflushes_pending_changes_like_a_database_load(
    factory: sessionmaker[Session], db: Engine
) -> None:
    """Invariant 7: ``session.get`` of a row not in the identity map autoflushes the session
    before it loads (plain SQLAlchemy does). Served from Redis, it must flush the pending
    edit of another object too; only the SELECT may be saved."""
    seed(factory, RpParent(id=1, name="one"), RpParent(id=2, name="two"))
    with factory() as s:
        two = s.get(RpParent, 2)
        assert two is not None
        two.name = "edited"
        with capture_sql(db) as sql:
            one = s.get(RpParent, 1)
            assert one is not None and one.name == "one"
        assert [sent for sent in sql if sent.lstrip().upper().startswith("UPDATE")], sql
        assert two not in s.dirty


# ------------------------------------------------------------------ 4. miss and fill


def test_miss_loads_from_the_database_and_fills(
    factory: sessionmaker[Session], db: Engine, cache: WriteThroughCache, client: redis.Redis
) -> None:
    """A row Redis does not know: the get emits SQL, then the entry is a VALUE and the next
    session's get has no SQL. Counters: a miss and a fill, then a hit."""
    insert_behind_cache(db, id=5, name="fresh")
    key = entry_key(cache, RpParent, 5)
    assert entry_state(client, key) is None
    before = cache.stats()
    with factory() as s, capture_sql(db) as sql:
        p = s.get(RpParent, 5)
        assert p is not None and p.name == "fresh"
    assert len(sql) == 1
    assert entry_state(client, key) == "value"
    assert cached_values(cache, client, RpParent, 5, dialect=db.dialect) == {
        "id": 5,
        "name": "fresh",
        "rank": 0,
        "deleted": False,
    }
    middle = cache.stats()
    assert delta(before, middle) == {"misses": 1, "fills": 1}
    with factory() as s, capture_sql(db) as sql:
        p = s.get(RpParent, 5)
        assert p is not None and p.name == "fresh"
    assert sql == []
    assert delta(middle, cache.stats()) == {"hits": 1}


def test_select_with_from_cache_miss_fills(
    factory: sessionmaker[Session], db: Engine, cache: WriteThroughCache, client: redis.Redis
) -> None:
    """A ``from_cache()`` select that misses fills the entry like ``get``."""
    insert_behind_cache(db, id=6, name="six")
    with factory() as s:
        stmt = select(RpParent).where(RpParent.id == 6).options(from_cache())
        assert s.scalars(stmt).one().name == "six"
    assert entry_state(client, entry_key(cache, RpParent, 6)) == "value"
    with factory() as s, capture_sql(db) as sql:
        p = s.get(RpParent, 6)
        assert p is not None and p.name == "six"
    assert sql == []


def test_get_of_a_missing_row_returns_none(
    factory: sessionmaker[Session], db: Engine, cache: WriteThroughCache, client: redis.Redis
) -> None:
    """A get of a key no row has: None, one SELECT, no exception, nothing cached."""
    before = cache.stats()
    for _ in range(2):
        with factory() as s, capture_sql(db) as sql:
            assert s.get(RpParent, 404) is None
            stmt = select(RpParent).where(RpParent.id == 404).options(from_cache())
            assert s.scalars(stmt).first() is None
        assert len(sql) == 2
    assert entry_state(client, entry_key(cache, RpParent, 404)) != "value"
    moved = delta(before, cache.stats())
    assert moved.get("misses") == 4
    assert "fills" not in moved and "hits" not in moved and "errors" not in moved


# ------------------------------------------------------------------- 5. fill rules


def test_no_fill_from_a_session_that_wrote(
    factory: sessionmaker[Session], db: Engine, cache: WriteThroughCache, client: redis.Redis
) -> None:
    """(a) A transaction that flushed a write does not fill a miss of another row."""
    insert_behind_cache(db, id=1, name="one")
    key = entry_key(cache, RpParent, 1)
    before = cache.stats()
    with factory() as s:
        s.add(RpParent(id=2, name="two"))
        s.flush()
        p = s.get(RpParent, 1)
        assert p is not None and p.name == "one"
        assert entry_state(client, key) != "value"
        s.commit()
    assert entry_state(client, key) != "value"
    assert entry_state(client, entry_key(cache, RpParent, 2)) == "value"  # its own write
    # a miss (not a bypass) that did not fill; the commit published row 2
    assert delta(before, cache.stats()) == {"misses": 1, "publishes": 1}


@pytest.mark.databases("postgresql", "mariadb")
def test_repeatable_read_fills_only_from_the_first_statement(
    db: Engine, cache: WriteThroughCache, client: redis.Redis
) -> None:
    """(b) Under REPEATABLE READ the snapshot starts at the first statement: a load that is
    the transaction's first statement fills; a load after another statement does not."""
    rr = sessionmaker(db.execution_options(isolation_level="REPEATABLE READ"))
    cache.install(rr)
    insert_behind_cache(db, id=1, name="one")
    insert_behind_cache(db, id=2, name="two")

    before = cache.stats()
    with rr() as s:
        p = s.get(RpParent, 1)  # the first statement of the transaction
        assert p is not None and p.name == "one"
        s.commit()
    assert entry_state(client, entry_key(cache, RpParent, 1)) == "value"
    assert delta(before, cache.stats()) == {"misses": 1, "fills": 1}

    before = cache.stats()
    with rr() as s:
        assert s.execute(select(literal(1))).scalar_one() == 1  # the snapshot starts here
        p = s.get(RpParent, 2)
        assert p is not None and p.name == "two"
        s.commit()
    assert entry_state(client, entry_key(cache, RpParent, 2)) != "value"
    assert delta(before, cache.stats()) == {"misses": 1}  # asked Redis, did not fill


@pytest.mark.parametrize(
    ("db_name", "isolation_level"),
    [
        pytest.param("postgresql", None, id="postgresql-default-read-committed"),
        pytest.param("mariadb", "READ COMMITTED", id="mariadb-read-committed"),
        pytest.param("sqlite", None, id="sqlite-select-outside-transaction"),
    ],
    indirect=["db_name"],
)
def test_read_committed_later_statement_may_fill(
    db: Engine, cache: WriteThroughCache, client: redis.Redis, isolation_level: str | None
) -> None:
    """(c) Under READ COMMITTED every statement sees the latest commits, so a load that is not
    the transaction's first statement still fills (SQLite: a SELECT outside a write
    transaction, pysqlite opens none)."""
    bind = db if isolation_level is None else db.execution_options(isolation_level=isolation_level)
    factory = sessionmaker(bind)
    cache.install(factory)
    insert_behind_cache(db, id=1, name="one")
    before = cache.stats()
    with factory() as s:
        assert s.execute(select(literal(1))).scalar_one() == 1
        p = s.get(RpParent, 1)
        assert p is not None and p.name == "one"
        assert entry_state(client, entry_key(cache, RpParent, 1)) == "value"
    assert delta(before, cache.stats()) == {"misses": 1, "fills": 1}


# --------------------------------------------------- 6. cache-built objects are ORM objects


def test_cache_built_instance_is_a_clean_persistent_object(
    factory: sessionmaker[Session], db: Engine
) -> None:
    """Persistent, clean, unmodified, with clean attribute history; a second get returns the
    same object with no SQL."""
    seed(factory, RpParent(id=1, name="alpha", rank=2))
    with factory() as s, capture_sql(db) as sql:
        p = s.get(RpParent, 1)
        assert p is not None
        st = inspect(p)
        assert st.persistent and not st.transient and not st.detached and not st.pending
        assert st.session is s
        assert st.identity == (1,)
        assert p not in s.dirty and p not in s.new
        assert not s.is_modified(p)
        assert not st.modified
        for attr in ("id", "name", "rank", "deleted"):
            history = st.attrs[attr].history
            assert not history.added and not history.deleted
            assert list(history.unchanged) == [getattr(p, attr)]
        assert s.get(RpParent, 1) is p
    assert sql == []


def test_one_to_many_collection_lazy_loads_with_one_select(
    factory: sessionmaker[Session], db: Engine
) -> None:
    """The collection of a cache-built parent lazy-loads with exactly one SELECT."""
    seed(factory, RpParent(id=1, name="mum"))
    seed(factory, RpChild(id=10, parent_id=1, name="a"), RpChild(id=11, parent_id=1, name="b"))
    with factory() as s:
        with capture_sql(db) as sql:
            p = s.get(RpParent, 1)
            assert p is not None
        assert sql == []
        with capture_sql(db) as sql:
            assert sorted(c.name for c in p.children) == ["a", "b"]
        assert len(sql) == 1 and "rp_child" in sql[0]


def test_change_to_cache_built_instance_flushes_a_minimal_update(
    factory: sessionmaker[Session], db: Engine, cache: WriteThroughCache, client: redis.Redis
) -> None:
    """Changing one attribute of a cache-built object UPDATEs only that column, and the
    commit publishes the new row."""
    seed(factory, RpParent(id=1, name="alpha", rank=2))
    with factory() as s:
        p = s.get(RpParent, 1)
        assert p is not None
        p.rank = 3
        assert p in s.dirty and s.is_modified(p)
        with capture_sql(db) as sql:
            s.commit()
    updates = [sent for sent in sql if sent.lstrip().upper().startswith("UPDATE")]
    assert len(updates) == 1, sql
    set_clause = updates[0].split(" SET ", 1)[1].split(" WHERE ", 1)[0]
    assigned = [part.split("=", 1)[0].strip().strip('`"') for part in set_clause.split(",")]
    assert assigned == ["rank"], updates[0]
    assert cached_values(cache, client, RpParent, 1, dialect=db.dialect) == {
        "id": 1,
        "name": "alpha",
        "rank": 3,
        "deleted": False,
    }
    with db.connect() as conn:
        assert conn.execute(select(RpParent.rank).where(RpParent.id == 1)).scalar_one() == 3


def test_orm_load_events_fire_for_cache_built_instances(
    factory: sessionmaker[Session], db: Engine
) -> None:
    """The mapper ``load`` event and the session ``loaded_as_persistent`` event fire once per
    instance built from Redis, as for a database load."""
    seed(factory, RpParent(id=1, name="alpha"))
    loaded: list[Any] = []
    persistent: list[Any] = []

    def on_load(target: Any, context: Any) -> None:
        loaded.append(target)

    def on_persistent(session: Session, instance: Any) -> None:
        persistent.append(instance)

    event.listen(RpParent, "load", on_load)
    event.listen(factory, "loaded_as_persistent", on_persistent)
    try:
        with factory() as s, capture_sql(db) as sql:
            p = s.get(RpParent, 1)
            assert s.get(RpParent, 1) is p
        assert sql == []
        assert loaded == [p]
        assert persistent == [p]
    finally:
        event.remove(RpParent, "load", on_load)


def test_delete_of_cache_built_instance(
    factory: sessionmaker[Session], db: Engine, cache: WriteThroughCache, client: redis.Redis
) -> None:
    """``session.delete()`` of a cache-built object deletes the row and the entry."""
    seed(factory, RpParent(id=1, name="alpha"))
    with factory() as s:
        p = s.get(RpParent, 1)
        assert p is not None
        s.delete(p)
        with capture_sql(db) as sql:
            s.commit()
    assert any(stmt.lstrip().upper().startswith("DELETE") for stmt in sql)
    assert entry_state(client, entry_key(cache, RpParent, 1)) != "value"
    with factory() as s:
        assert s.get(RpParent, 1) is None
    with db.connect() as conn:
        assert conn.execute(select(RpParent.id)).all() == []


# ---------------------------------------------------------- 7. excluded and deferred


def test_excluded_column_never_reaches_redis(
    factory: sessionmaker[Session], db: Engine, cache: WriteThroughCache, client: redis.Redis
) -> None:
    """An excluded column is in no entry, published or filled; a cache-built instance loads
    it from the database on access."""
    secret = "s3cr3t-Value-41"
    seed(factory, RpAccount(id=1, login="ann", secret=secret, notes="n1", bio="b1"))
    key = entry_key(cache, RpAccount, 1)

    def check_entry() -> None:
        values = cached_values(cache, client, RpAccount, 1, dialect=db.dialect)
        assert values == {"id": 1, "login": "ann"}
        raw = client.get(key)
        assert raw is not None
        payload = bytes(payload_of(raw))  # not the generation token, which may hold "n1"
        for hidden in (secret, "n1", "b1"):
            assert hidden.encode() not in payload

    check_entry()  # the publish after commit
    cache.invalidate(RpAccount, 1)
    with factory() as s:
        a = s.get(RpAccount, 1)
        assert a is not None and a.secret == secret
    check_entry()  # the fill after a miss

    with factory() as s:
        with capture_sql(db) as sql:
            a = s.get(RpAccount, 1)
            assert a is not None and a.login == "ann"
            assert "secret" not in a.__dict__
        assert sql == []
        with capture_sql(db) as sql:
            assert a.secret == secret
        assert len(sql) == 1
        assert not s.is_modified(a)


def test_deferred_columns_stay_unloaded_and_load_on_access(
    factory: sessionmaker[Session], db: Engine
) -> None:
    """Deferred columns are not in the entry: a cache-built instance leaves them unloaded
    and the deferred loader loads each on access, as after a database load."""
    seed(factory, RpAccount(id=1, login="ann", secret="x", notes="some notes", bio="a bio"))
    with factory() as s:
        with capture_sql(db) as sql:
            a = s.get(RpAccount, 1)
            assert a is not None
            assert set(inspect(a).unloaded) >= {"notes", "bio", "secret"}
        assert sql == []
        with capture_sql(db) as sql:
            assert a.notes == "some notes"
        assert len(sql) == 1
        with capture_sql(db) as sql:
            assert a.bio == "a bio"
        assert len(sql) == 1
        assert not s.is_modified(a)


# ------------------------------------------------------------------ 8. dataclasses


def test_dataclass_model_is_served_by_get_and_select(
    factory: sessionmaker[Session], db: Engine, cache: WriteThroughCache
) -> None:
    """A ``MappedAsDataclass`` model: ``get`` and ``select`` + ``from_cache()`` + ``.unique()``
    are served from Redis, and the object equals a database load field by field."""
    seed(factory, RpPoint(id=1, label="p", x=4))
    before = cache.stats()
    with factory() as s, capture_sql(db) as sql:
        by_get = s.get(RpPoint, 1)
        stmt = select(RpPoint).where(RpPoint.id == 1).options(from_cache())
        by_select = s.scalars(stmt).unique().one()
        assert by_select is by_get
    assert sql == []
    assert delta(before, cache.stats()) == {"hits": 1}
    with factory() as s, capture_sql(db) as sql:
        rows = s.execute(select(RpPoint).filter_by(id=1).options(from_cache())).unique().all()
        assert len(rows) == 1
    assert sql == []
    with sessionmaker(db)() as plain:
        from_db = plain.get(RpPoint, 1)
    assert by_get == from_db
    assert by_get == RpPoint(id=1, label="p", x=4)


# ---------------------------------------------------------------- 9. bad contents


def _payload_of_row_2(cache: WriteThroughCache, client: redis.Redis) -> bytes:
    raw = client.get(entry_key(cache, RpParent, 2))
    assert raw is not None and raw[:1] == b"V"
    return raw[raw.index(b":", 1) + 1 :]


#: random, but the same on every run
RANDOM_BYTES = random.Random(8).randbytes(40)

BAD_ENTRIES: list[Any] = [
    pytest.param(lambda key, c, cache: c.set(key, b"\x93\x00garbage\xff\xfe"), id="garbage"),
    pytest.param(lambda key, c, cache: c.set(key, b"Egarbage"), id="lease-header-garbage"),
    pytest.param(
        lambda key, c, cache: replace_payload(c, key, bytes(range(200, 240))),
        id="value-header-garbage",
    ),
    pytest.param(
        lambda key, c, cache: replace_payload(c, key, b"\x01" + RANDOM_BYTES),
        id="value-header-v1-random",
    ),
    pytest.param(
        lambda key, c, cache: replace_payload(c, key, b"\x01" + msgpack.packb([0, 1, "x"])),
        id="msgpack-wrong-length",
    ),
    pytest.param(
        lambda key, c, cache: replace_payload(
            c, key, b"\x01" + msgpack.packb([0, "one", 1, b"no", []])
        ),
        id="msgpack-wrong-types",
    ),
    pytest.param(
        lambda key, c, cache: replace_payload(
            c, key, b"\x01" + msgpack.packb([7, 1, "alpha", 0, False])
        ),
        id="msgpack-unknown-class-tag",
    ),
    pytest.param(
        lambda key, c, cache: replace_payload(
            c, key, b"\x02" + msgpack.packb([0, 1, "alpha", 0, False])
        ),
        id="other-format-version",
    ),
    pytest.param(
        lambda key, c, cache: replace_payload(c, key, _payload_of_row_2(cache, c)[:-3]),
        id="truncated",
    ),
    pytest.param(
        lambda key, c, cache: replace_payload(c, key, _payload_of_row_2(cache, c)),
        id="another-rows-payload",
    ),
]


@pytest.mark.parametrize("corrupt", BAD_ENTRIES)
def test_bad_cache_contents_are_a_logged_miss(
    factory: sessionmaker[Session],
    db: Engine,
    cache: WriteThroughCache,
    client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
    corrupt: Callable[[str, redis.Redis, WriteThroughCache], Any],
) -> None:
    """Invariant 8: a damaged entry gives the database row and no exception; the cache
    recovers (the next reads fill, then hit); the damage shows as a decode error in the
    stats and a warning in the log."""
    seed(factory, RpParent(id=1, name="alpha"), RpParent(id=2, name="beta"))
    with db.begin() as conn:  # the database is the truth; Redis still holds "alpha"
        conn.execute(update(RpParent).where(RpParent.id == 1).values(name="db-alpha"))
    key = entry_key(cache, RpParent, 1)
    corrupt(key, client, cache)

    before = cache.stats()
    with caplog.at_level(logging.WARNING, logger="sqlalchemy_writethrough"):
        with factory() as s, capture_sql(db) as sql:
            p = s.get(RpParent, 1)
            assert p is not None
            assert (p.id, p.name) == (1, "db-alpha")
        assert len(sql) == 1
    first_read = delta(before, cache.stats())
    warned = [
        r
        for r in caplog.records
        if r.name == "sqlalchemy_writethrough" and r.levelno >= logging.WARNING
    ]

    # recovery: the next read (at the latest the one after) fills, then reads hit
    for _ in range(2):
        with factory() as s:
            p = s.get(RpParent, 1)
            assert p is not None and p.name == "db-alpha"
        if entry_state(client, key) == "value":
            break
    assert cached_values(cache, client, RpParent, 1, dialect=db.dialect) == {
        "id": 1,
        "name": "db-alpha",
        "rank": 0,
        "deleted": False,
    }, f"entry still {client.get(key)!r}"
    before = cache.stats()
    with factory() as s, capture_sql(db) as sql:
        p = s.get(RpParent, 1)
        assert p is not None and p.name == "db-alpha"
    assert sql == []
    assert delta(before, cache.stats()) == {"hits": 1}

    # the damage was observable: a metric and a log line
    assert first_read.get("decode_errors") == 1, first_read
    assert warned, caplog.text


def test_garbage_lock_entry_does_not_disable_the_cache(
    factory: sessionmaker[Session], db: Engine, cache: WriteThroughCache, client: redis.Redis
) -> None:
    """Invariant 8: an entry with a LOCK header and an undecodable body (no TTL) is harmless:
    reads get the database row, a write of that row commits, other rows are still served
    from Redis, and the damaged entry is eventually a normal VALUE again."""
    seed(factory, RpParent(id=1, name="alpha"), RpParent(id=2, name="beta"))
    key = entry_key(cache, RpParent, 1)
    client.set(key, b"L\xc1garbage")

    with factory() as s:
        p = s.get(RpParent, 1)
        assert p is not None and p.name == "alpha"
        p.name = "changed"
        s.commit()
    with db.connect() as conn:
        assert conn.execute(select(RpParent.name).where(RpParent.id == 1)).scalar_one() == (
            "changed"
        )

    with factory() as s, capture_sql(db) as sql:
        other = s.get(RpParent, 2)
        assert other is not None and other.name == "beta"
    assert sql == [], "one damaged entry stopped this process from reading Redis at all"

    for _ in range(2):
        with factory() as s:
            p = s.get(RpParent, 1)
            assert p is not None and p.name == "changed"
        if entry_state(client, key) == "value":
            break
    assert cached_values(cache, client, RpParent, 1, dialect=db.dialect) == {
        "id": 1,
        "name": "changed",
        "rank": 0,
        "deleted": False,
    }, f"entry still {client.get(key)!r}"


@pytest.mark.parametrize("lazy", ["joined", False, "selectin", "subquery", "immediate"])
def test_a_model_with_an_eager_relationship_is_loaded_with_it(
    engine: Engine, client: redis.Redis, prefix: str, lazy: Any
) -> None:
    """A relationship loaded with its parent (``lazy=False`` is SQLAlchemy's old spelling of
    ``"joined"``) is there after the session closes; a parent built from the cache had it
    unloaded, and reading it raised DetachedInstanceError. Such a model's loads read the
    database, whatever the spelling."""

    class LocalBase(DeclarativeBase):
        pass

    class EgParent(LocalBase, CachedModel):
        __tablename__ = "eg_parent"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        children: Mapped[list[EgChild]] = relationship(lazy=lazy)

    class EgChild(LocalBase, CachedModel):
        __tablename__ = "eg_child"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        parent_id: Mapped[int] = mapped_column(ForeignKey("eg_parent.id"))

    reset_schema(engine, LocalBase.metadata)
    cache = WriteThroughCache(client, prefix=prefix)
    maker = sessionmaker(engine)
    cache.install(maker)
    try:
        with maker() as s:
            s.add(EgParent(id=1, children=[EgChild(id=1), EgChild(id=2)]))
            s.commit()
        for m in (sessionmaker(engine), maker):
            with m() as s:
                parent = s.get(EgParent, 1)
            assert parent is not None
            assert sorted(c.id for c in parent.children) == [1, 2]  # no DetachedInstanceError
    finally:
        cache.uninstall(maker)
        LocalBase.registry.dispose()


@pytest.mark.parametrize("deferred", [False, True], ids=["selected", "deferred"])
def test_a_column_property_expression_is_there_as_a_load_leaves_it(
    engine: Engine, client: redis.Redis, prefix: str, deferred: bool
) -> None:
    """``column_property(first + " " + last)`` is selected with the row: after the session
    closes a load's object still has it. Built from the cache it was unloaded, and reading
    it raised DetachedInstanceError. Such a model's loads now read the database; declared
    ``deferred=True`` it loads on access with or without the cache, and is served."""

    class LocalBase(DeclarativeBase):
        pass

    class CpUser(LocalBase, CachedModel):
        __tablename__ = "cp_user"
        id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        first: Mapped[str] = mapped_column(String(20))
        last: Mapped[str] = mapped_column(String(20))
        full = column_property(first + " " + last, deferred=deferred)
        picked: Mapped[str | None] = query_expression()  # None unless a query gives one

    reset_schema(engine, LocalBase.metadata)
    cache = WriteThroughCache(client, prefix=prefix)
    maker = sessionmaker(engine)
    cache.install(maker)

    def seen(m: sessionmaker[Session]) -> list[Any]:
        with m() as s:
            user = s.get(CpUser, 1)
        assert user is not None
        try:
            return [user.picked, user.full]
        except DetachedInstanceError:
            return [user.picked, "detached"]

    try:
        with maker() as s:
            s.add(CpUser(id=1, first="Ada", last="Lovelace"))
            s.commit()
        with capture_sql(engine) as sql:
            assert seen(maker) == seen(sessionmaker(engine))
        assert len(sql) == (1 if deferred else 2)  # the plain load's, and not served: ours
        info = cache.models(engine)[CpUser]
        assert info.loads_served is deferred
        assert info.not_served_because == (
            ""
            if deferred
            else "column_property expressions selected with the row: full; "
            "declare them deferred=True"
        )
    finally:
        cache.uninstall(maker)
        LocalBase.registry.dispose()
