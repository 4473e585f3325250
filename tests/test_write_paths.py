"""Every write path keeps the cache right: bulk DML, Core and raw SQL, database cascades, triggers.

Unit-of-work flushes are covered by ``test_write_path.py``; this module covers the other ways a
session changes rows (statement-level invalidation, ``sqlalchemy_writethrough.dml``): ORM bulk
``update()``/``delete()`` for every ``synchronize_session``, bulk UPDATE/INSERT by primary key,
upserts, ``bulk_save_objects`` and the ``bulk_*_mappings``, Core DML and ``text()`` through the
session and through ``session.connection()``, cascades the database performs, trigger effects
declared with ``also_invalidates``, whole-model invalidation, and statements whose effect cannot
be told (``CALL``).

Every test runs on SQLite, PostgreSQL and MariaDB against the real Redis, reads through the
cache right after the commit and asserts that a NEW session's ``get`` returns exactly the
database row. To show that each test can fail, a representative per path repeats the write on a
raw engine connection that belongs to no session (which the library documents it does not see)
and shows that the stale cached value is then served: that is what the handling under test
prevents.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
import redis
from sqlalchemy import (
    ForeignKey,
    MetaData,
    String,
    Table,
    bindparam,
    case,
    delete,
    event,
    insert,
    inspect,
    text,
    update,
)
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    mapped_column,
    relationship,
    sessionmaker,
)

from sqlalchemy_writethrough import CachedModel, WriteThroughCache

from _cache_helpers import entry_key, entry_state
from _servers import COUNTED, capture_sql, counting_redis, reset_schema

# ------------------------------------------------------------------------------- models
# One declarative base per group of tables, so that each test creates only the tables it uses.


class ItemBase(DeclarativeBase):
    pass


class WxItem(ItemBase, CachedModel):
    """The model most statements change: an explicit integer key and two plain columns."""

    __tablename__ = "wx_item"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    qty: Mapped[int] = mapped_column()


class CascadeBase(DeclarativeBase):
    pass


class WxChild(CascadeBase, CachedModel):
    """Cached child of a cached parent; the database deletes it with its parent."""

    __tablename__ = "wx_child"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    parent_id: Mapped[int] = mapped_column(ForeignKey("wx_parent.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(50))


class WxParent(CascadeBase, CachedModel):
    """Cached parent whose relationship leaves the deletion of children to the database."""

    __tablename__ = "wx_parent"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))
    children: Mapped[list[WxChild]] = relationship(
        cascade="all, delete-orphan", passive_deletes=True
    )


class LoneBase(DeclarativeBase):
    pass


class WxLoneParent(LoneBase):
    """NOT cached, and no ORM relationship to its children at all."""

    __tablename__ = "wx_lone_parent"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))


class WxLoneChild(LoneBase, CachedModel):
    """Cached child whose parent the ORM does not know about (only the FK says it)."""

    __tablename__ = "wx_lone_child"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    parent_id: Mapped[int] = mapped_column(ForeignKey("wx_lone_parent.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(50))


class NullBase(DeclarativeBase):
    pass


class WxNullParent(NullBase, CachedModel):
    __tablename__ = "wx_null_parent"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))


class WxNullChild(NullBase, CachedModel):
    """Cached child whose FK the database sets to NULL when the parent goes."""

    __tablename__ = "wx_null_child"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    parent_id: Mapped[int | None] = mapped_column(
        ForeignKey("wx_null_parent.id", ondelete="SET NULL")
    )
    name: Mapped[str] = mapped_column(String(50))


class NaturalBase(DeclarativeBase):
    pass


class WxNatParent(NaturalBase, CachedModel):
    """Cached parent with a natural (string) primary key that can change."""

    __tablename__ = "wx_nat_parent"

    code: Mapped[str] = mapped_column(String(20), primary_key=True)
    label: Mapped[str] = mapped_column(String(50))


class WxNatChild(NaturalBase, CachedModel):
    """Cached child whose FK the database rewrites when the parent's key changes."""

    __tablename__ = "wx_nat_child"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    parent_code: Mapped[str] = mapped_column(
        String(20), ForeignKey("wx_nat_parent.code", onupdate="CASCADE")
    )
    name: Mapped[str] = mapped_column(String(50))


class SecondaryBase(DeclarativeBase):
    pass


class WxTag(SecondaryBase, CachedModel):
    __tablename__ = "wx_tag"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)


class WxPost(SecondaryBase, CachedModel):
    """Its tags are kept through the table a cached model maps (``secondary=``)."""

    __tablename__ = "wx_post"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    tags: Mapped[list[WxTag]] = relationship(secondary="wx_post_tag")


class WxPostTag(SecondaryBase, CachedModel):
    """Cached, and the ``secondary`` table of ``WxPost.tags``."""

    __tablename__ = "wx_post_tag"

    post_id: Mapped[int] = mapped_column(ForeignKey("wx_post.id"), primary_key=True)
    tag_id: Mapped[int] = mapped_column(ForeignKey("wx_tag.id"), primary_key=True)
    note: Mapped[str] = mapped_column(String(20), default="")


class TriggerBase(DeclarativeBase):
    pass


class WxDst(TriggerBase, CachedModel):
    """Cached; a trigger on ``wx_src`` writes it."""

    __tablename__ = "wx_dst"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    total: Mapped[int] = mapped_column()


class WxSrc(TriggerBase, CachedModel):
    """Cached; its writes fire a trigger that updates ``wx_dst``, and it says so."""

    __tablename__ = "wx_src"
    __writethrough__ = {"also_invalidates": [WxDst]}

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    dst_id: Mapped[int] = mapped_column()
    amount: Mapped[int] = mapped_column()


class WxDst2(TriggerBase, CachedModel):
    """Cached; a trigger on ``wx_src2`` writes it."""

    __tablename__ = "wx_dst2"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    total: Mapped[int] = mapped_column()


class WxSrc2(TriggerBase, CachedModel):
    """The same as ``WxSrc`` WITHOUT ``also_invalidates``: the contrast."""

    __tablename__ = "wx_src2"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    dst_id: Mapped[int] = mapped_column()
    amount: Mapped[int] = mapped_column()


class WxDst3(TriggerBase, CachedModel):
    """Cached; a trigger on ``wx_src3`` writes it."""

    __tablename__ = "wx_dst3"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    total: Mapped[int] = mapped_column()


class WxSrc3(TriggerBase, CachedModel):
    """Like ``WxSrc``, naming the other model by its table name."""

    __tablename__ = "wx_src3"
    __writethrough__ = {"also_invalidates": ["wx_dst3"]}

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    dst_id: Mapped[int] = mapped_column()
    amount: Mapped[int] = mapped_column()


SYNCHRONIZE_SESSION: list[Any] = [False, "evaluate", "fetch", "auto"]

# ----------------------------------------------------------------------------- fixtures


def _sqlite_foreign_keys(dbapi_connection: Any, record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


@pytest.fixture
def cache(redis_url: str, prefix: str) -> Iterator[WriteThroughCache]:
    client = redis.Redis.from_url(redis_url, socket_timeout=1)
    try:
        yield WriteThroughCache(client, prefix=prefix)
    finally:
        client.close()


@pytest.fixture
def factory_for(
    engine: Engine, cache: WriteThroughCache
) -> Callable[[MetaData], sessionmaker[Session]]:
    """Creates a group's tables and returns a sessionmaker with ``cache`` installed.

    SQLite enforces foreign keys (and so performs cascades) only with ``PRAGMA foreign_keys=ON``
    on each connection: a connect event turns it on, so SQLite behaves like PostgreSQL and
    MariaDB/InnoDB, which always enforce them.
    """
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_foreign_keys)

    def make(metadata: MetaData) -> sessionmaker[Session]:
        reset_schema(engine, metadata)
        factory = sessionmaker(engine)
        cache.install(factory)
        return factory

    return make


@pytest.fixture
def items(
    engine: Engine, factory_for: Callable[[MetaData], sessionmaker[Session]]
) -> sessionmaker[Session]:
    """``wx_item`` with rows 1..4 (qty 10, 20, 30, 40), none cached yet."""
    factory = factory_for(ItemBase.metadata)
    with Session(engine) as session:
        session.add_all([WxItem(id=i, name=f"item {i}", qty=10 * i) for i in range(1, 5)])
        session.commit()
    return factory


# ------------------------------------------------------------------------------ helpers


def values_of(obj: Any) -> dict[str, Any]:
    """Every column attribute of a loaded instance."""
    return {attr.key: getattr(obj, attr.key) for attr in inspect(type(obj)).column_attrs}


def db_values(engine: Engine, model: type, pk: Any) -> dict[str, Any] | None:
    """The committed row as a fresh ORM load returns it (a plain Session: no cache)."""
    with Session(engine) as session:
        obj: Any = session.get(model, pk)
        return None if obj is None else values_of(obj)


def read(
    factory: sessionmaker[Session], engine: Engine, model: type, pk: Any
) -> tuple[dict[str, Any] | None, list[str]]:
    """A NEW session's ``get``: the values it returned and the SQL it emitted."""
    with factory() as session, capture_sql(engine) as statements:
        obj: Any = session.get(model, pk)
        values = None if obj is None else values_of(obj)
    return values, list(statements)


def get_from_cache(
    factory: sessionmaker[Session], engine: Engine, model: type, pk: Any
) -> dict[str, Any]:
    """A new session's get, which must be served from Redis (no SQL at all)."""
    values, statements = read(factory, engine, model, pk)
    assert statements == [], f"get({model.__name__}, {pk!r}) emitted SQL: {statements}"
    assert values is not None, f"{model.__name__}({pk!r}) not found"
    return values


def warm(factory: sessionmaker[Session], engine: Engine, model: type, *pks: Any) -> None:
    """Load each row through the cache (a miss fills it), then check it is served from Redis."""
    for pk in pks:
        read(factory, engine, model, pk)
        get_from_cache(factory, engine, model, pk)


def assert_reads_database_row(
    factory: sessionmaker[Session], engine: Engine, model: type, *pks: Any
) -> None:
    """Right after the commit, a new session's get of each row equals the database row."""
    for pk in pks:
        got, _ = read(factory, engine, model, pk)
        assert got == db_values(engine, model, pk), f"{model.__name__}({pk!r})"


def assert_still_cached(
    factory: sessionmaker[Session], engine: Engine, model: type, *pks: Any
) -> None:
    """Rows the write did not touch are still served from Redis (no SQL) and are right."""
    for pk in pks:
        assert get_from_cache(factory, engine, model, pk) == db_values(engine, model, pk)


def assert_untracked_write_serves_stale(
    factory: sessionmaker[Session],
    engine: Engine,
    model: type,
    pk: Any,
    write: Callable[[Connection], Any],
) -> None:
    """The proof that the test around it can fail: the same kind of write on a raw engine
    connection (no session, so the library does not see it) leaves the cached row as it was,
    and a new session's get serves the stale value with no SQL while the database differs."""
    warm(factory, engine, model, pk)
    before = get_from_cache(factory, engine, model, pk)
    with engine.begin() as conn:
        write(conn)
    served = get_from_cache(factory, engine, model, pk)
    assert served == before
    assert db_values(engine, model, pk) != served, "the raw write did not change the row"


def table_of(model: type) -> Table:
    """The model's ``__table__`` (typed as a Table)."""
    table: Any = inspect(model).local_table
    assert isinstance(table, Table)
    return table


def generation_key(key: str) -> str:
    """The bucket generation key of an integer-keyed entity key."""
    return key.rsplit(":", 1)[0]


def entry_is_current(client: redis.Redis, key: str) -> bool:
    """Whether the entry is a VALUE of its bucket's current generation (a reader would hit)."""
    raw = cast(bytes | None, client.get(key))
    if raw is None or raw[:1] != b"V":
        return False
    gen = raw[1 : raw.index(b":", 1)]
    return bool(client.get(generation_key(key)) == gen)


def upsert(dialect: str, target: Any, pk: int, name: str) -> Any:
    """INSERT of ``pk`` that updates the existing row's name, in the dialect's own syntax."""
    row = {"id": pk, "name": name, "qty": 0}
    if dialect == "postgresql":
        pg = postgresql.insert(target).values(**row)
        return pg.on_conflict_do_update(index_elements=["id"], set_={"name": name})
    if dialect == "sqlite":
        lite = sqlite.insert(target).values(**row)
        return lite.on_conflict_do_update(index_elements=["id"], set_={"name": name})
    return mysql.insert(target).values(**row).on_duplicate_key_update(name=name)


def execute_via(session: Session, via: str) -> Callable[..., Any]:
    """``session.execute`` or ``session.connection().execute``."""
    if via == "session":
        return session.execute
    return session.connection().execute


# ======================================================= 1. ORM bulk update()/delete()


@pytest.mark.parametrize("sync", SYNCHRONIZE_SESSION, ids=str)
@pytest.mark.parametrize("op", ["update", "delete"])
def test_orm_bulk_range_dml_for_every_synchronize_session(
    engine: Engine, items: sessionmaker[Session], op: str, sync: Any
) -> None:
    """ORM ``update()``/``delete()`` with range criteria through ``session.execute``, for every
    ``synchronize_session``: right after the commit every row of the model (the changed ones and
    the one the range missed) reads as the database holds it."""
    warm(items, engine, WxItem, 1, 2, 3, 4)
    with items() as session:
        stmt: Any
        if op == "update":
            stmt = update(WxItem).where(WxItem.qty >= 20).values(name="bulk", qty=99)
        else:
            stmt = delete(WxItem).where(WxItem.qty >= 20)
        session.execute(stmt, execution_options={"synchronize_session": sync})
        session.commit()

    assert_reads_database_row(items, engine, WxItem, 1, 2, 3, 4)
    expected = {"id": 3, "name": "bulk", "qty": 99} if op == "update" else None
    assert db_values(engine, WxItem, 3) == expected

    table = table_of(WxItem)
    raw: Any = (
        update(table).where(table.c.qty < 20).values(name="raw")
        if op == "update"
        else delete(table).where(table.c.qty < 20)
    )
    assert_untracked_write_serves_stale(items, engine, WxItem, 1, lambda c: c.execute(raw))


@pytest.mark.parametrize("sync", SYNCHRONIZE_SESSION, ids=str)
@pytest.mark.parametrize("criterion", ["eq", "in"])
@pytest.mark.parametrize("op", ["update", "delete"])
def test_orm_bulk_dml_by_primary_key_invalidates_exactly_those_rows(
    engine: Engine, items: sessionmaker[Session], op: str, criterion: str, sync: Any
) -> None:
    """``where(M.id == x)`` (twice, same statement shape) / ``where(M.id.in_([...]))``: the named
    rows read as the database holds them, and every other row of the model stays cached (served
    with no SQL)."""
    warm(items, engine, WxItem, 1, 2, 3, 4)
    # "eq": two statements of the same shape, so the second reuses the compiled statement
    wheres = [WxItem.id == 2, WxItem.id == 3] if criterion == "eq" else [WxItem.id.in_([2, 3])]
    with items() as session:
        for where in wheres:
            stmt: Any
            if op == "update":
                stmt = update(WxItem).where(where).values(name="by key")
            else:
                stmt = delete(WxItem).where(where)
            session.execute(stmt, execution_options={"synchronize_session": sync})
        session.commit()

    assert_reads_database_row(items, engine, WxItem, 2, 3)
    assert db_values(engine, WxItem, 3) == (
        {"id": 3, "name": "by key", "qty": 30} if op == "update" else None
    )
    assert_still_cached(items, engine, WxItem, 1, 4)

    if sync == "auto":
        table = table_of(WxItem)
        raw: Any = (
            update(table).where(table.c.id == 4).values(name="raw")
            if op == "update"
            else delete(table).where(table.c.id == 4)
        )
        assert_untracked_write_serves_stale(items, engine, WxItem, 4, lambda c: c.execute(raw))


@pytest.mark.parametrize("criterion", ["range", "keys"])
@pytest.mark.parametrize("op", ["update", "delete"])
def test_user_returning_keeps_working(
    engine: Engine, items: sessionmaker[Session], op: str, criterion: str
) -> None:
    """A user's own ``.returning(M.id, M.name)`` on bulk DML returns the right rows, and the
    cache is right afterwards."""
    if op == "update" and not engine.dialect.update_returning:
        pytest.skip("MariaDB has no UPDATE ... RETURNING")
    warm(items, engine, WxItem, 1, 2, 3, 4)
    where = WxItem.qty >= 30 if criterion == "range" else WxItem.id.in_([3, 4])
    with items() as session:
        stmt: Any
        if op == "update":
            stmt = update(WxItem).where(where).values(name="returned")
        else:
            stmt = delete(WxItem).where(where)
        rows = session.execute(stmt.returning(WxItem.id, WxItem.name)).all()
        session.commit()

    expected_name = "returned" if op == "update" else None
    assert sorted((r.id, r.name) for r in rows) == [
        (3, expected_name or "item 3"),
        (4, expected_name or "item 4"),
    ]
    assert_reads_database_row(items, engine, WxItem, 1, 2, 3, 4)
    if criterion == "keys":
        assert_still_cached(items, engine, WxItem, 1, 2)


# ============================================ 2. bulk by primary key, insert(), upserts


def test_orm_bulk_update_by_primary_key_executemany(
    engine: Engine, items: sessionmaker[Session]
) -> None:
    """``session.execute(update(M), [dicts])``: the named rows read as the database holds
    them; the other rows stay cached."""
    warm(items, engine, WxItem, 1, 2, 3, 4)
    with items() as session:
        session.execute(
            update(WxItem), [{"id": 1, "name": "one", "qty": 1}, {"id": 2, "name": "two"}]
        )
        session.commit()

    assert_reads_database_row(items, engine, WxItem, 1, 2)
    assert db_values(engine, WxItem, 1) == {"id": 1, "name": "one", "qty": 1}
    assert_still_cached(items, engine, WxItem, 3, 4)

    table = table_of(WxItem)
    raw = update(table).where(table.c.id == bindparam("b_id")).values(name=bindparam("b_name"))
    assert_untracked_write_serves_stale(
        items, engine, WxItem, 3, lambda c: c.execute(raw, [{"b_id": 3, "b_name": "raw"}])
    )


def test_orm_bulk_insert_list_and_values(engine: Engine, items: sessionmaker[Session]) -> None:
    """``session.execute(insert(M), [dicts])`` and ``insert(M).values(...)``: the new rows read
    as the database holds them, and they leave every cached row cached."""
    warm(items, engine, WxItem, 1, 2, 3, 4)
    with items() as session:
        session.execute(
            insert(WxItem),
            [{"id": 5, "name": "five", "qty": 5}, {"id": 6, "name": "six", "qty": 6}],
        )
        session.execute(insert(WxItem).values(id=7, name="seven", qty=7))
        session.commit()

    assert_reads_database_row(items, engine, WxItem, 5, 6, 7)
    assert db_values(engine, WxItem, 7) == {"id": 7, "name": "seven", "qty": 7}
    assert_still_cached(items, engine, WxItem, 1, 2, 3, 4)


def test_orm_upsert_changing_a_cached_row(engine: Engine, items: sessionmaker[Session]) -> None:
    """An upsert (PostgreSQL/SQLite ``on_conflict_do_update``, MariaDB
    ``on_duplicate_key_update``) through ``session.execute`` that changes an existing cached
    row: the row reads as the database holds it right after the commit."""
    dialect = engine.dialect.name
    warm(items, engine, WxItem, 1, 2)
    with items() as session:
        session.execute(upsert(dialect, WxItem, 1, "upserted"))
        session.commit()

    assert_reads_database_row(items, engine, WxItem, 1, 2)
    assert db_values(engine, WxItem, 1) == {"id": 1, "name": "upserted", "qty": 10}

    raw = upsert(dialect, table_of(WxItem), 2, "raw upsert")
    assert_untracked_write_serves_stale(items, engine, WxItem, 2, lambda c: c.execute(raw))


def test_replace_of_a_cached_row(engine: Engine, items: sessionmaker[Session]) -> None:
    """SQLite's ``INSERT OR REPLACE`` (Core ``insert().prefix_with("OR REPLACE")``) and
    MariaDB's ``REPLACE INTO`` (``text()``) replace an existing cached row: right after the
    commit it reads as the database holds it."""
    dialect = engine.dialect.name
    if dialect == "postgresql":
        pytest.skip("PostgreSQL has no REPLACE / INSERT OR REPLACE (its upsert is tested above)")
    table = table_of(WxItem)
    warm(items, engine, WxItem, 1, 2)
    with items() as session:
        if dialect == "sqlite":
            session.execute(
                insert(table).prefix_with("OR REPLACE").values(id=1, name="replaced", qty=1)
            )
        else:
            session.execute(text("REPLACE INTO wx_item (id, name, qty) VALUES (1, 'replaced', 1)"))
        session.commit()

    assert db_values(engine, WxItem, 1) == {"id": 1, "name": "replaced", "qty": 1}
    assert_reads_database_row(items, engine, WxItem, 1, 2)


# =================================================== 3. bulk_save_objects, *_mappings


def test_bulk_save_objects_new_and_modified(engine: Engine, items: sessionmaker[Session]) -> None:
    """``bulk_save_objects`` with a new object and a modified persistent one (loaded from the
    cache in an earlier session): both read as the database holds them; other rows stay cached."""
    warm(items, engine, WxItem, 1, 2, 3, 4)
    with items() as session:
        loaded = session.get(WxItem, 1)
        assert loaded is not None
    loaded.name = "saved"  # a persistent (now detached) object, changed
    with items() as session:
        session.bulk_save_objects([loaded, WxItem(id=5, name="new", qty=50)])
        session.commit()

    assert_reads_database_row(items, engine, WxItem, 1, 5)
    assert db_values(engine, WxItem, 1) == {"id": 1, "name": "saved", "qty": 10}
    assert db_values(engine, WxItem, 5) == {"id": 5, "name": "new", "qty": 50}
    assert_still_cached(items, engine, WxItem, 2, 3, 4)

    def raw_save(conn: Connection) -> None:
        with Session(bind=conn) as plain:
            obj = plain.get(WxItem, 2)
            assert obj is not None
            plain.expunge(obj)
            obj.name = "raw save"
            plain.bulk_save_objects([obj])
            plain.flush()

    assert_untracked_write_serves_stale(items, engine, WxItem, 2, raw_save)


def test_bulk_insert_mappings(engine: Engine, items: sessionmaker[Session]) -> None:
    """``bulk_insert_mappings``: the new rows read as the database holds them, cached rows stay
    cached."""
    warm(items, engine, WxItem, 1, 2)
    with items() as session:
        session.bulk_insert_mappings(
            inspect(WxItem),
            [{"id": 8, "name": "eight", "qty": 8}, {"id": 9, "name": "n", "qty": 9}],
        )
        session.commit()

    assert_reads_database_row(items, engine, WxItem, 8, 9)
    assert db_values(engine, WxItem, 8) == {"id": 8, "name": "eight", "qty": 8}
    assert_still_cached(items, engine, WxItem, 1, 2)


def test_bulk_update_mappings(engine: Engine, items: sessionmaker[Session]) -> None:
    """``bulk_update_mappings``: the named rows read as the database holds them; the other
    rows stay cached."""
    warm(items, engine, WxItem, 1, 2, 3, 4)
    with items() as session:
        session.bulk_update_mappings(
            inspect(WxItem), [{"id": 3, "name": "mapped"}, {"id": 4, "qty": 4}]
        )
        session.commit()

    assert_reads_database_row(items, engine, WxItem, 3, 4)
    assert db_values(engine, WxItem, 3) == {"id": 3, "name": "mapped", "qty": 30}
    assert db_values(engine, WxItem, 4) == {"id": 4, "name": "item 4", "qty": 4}
    assert_still_cached(items, engine, WxItem, 1, 2)

    def raw_mappings(conn: Connection) -> None:
        with Session(bind=conn) as plain:
            plain.bulk_update_mappings(inspect(WxItem), [{"id": 1, "name": "raw mapped"}])
            plain.flush()

    assert_untracked_write_serves_stale(items, engine, WxItem, 1, raw_mappings)


# ====================================================== 4. Core DML and text() (raw SQL)


@pytest.mark.parametrize("via", ["session", "connection"])
def test_core_dml_by_primary_key_on_model_table(
    engine: Engine, items: sessionmaker[Session], via: str
) -> None:
    """Core ``update``/``delete``/``insert`` on ``M.__table__`` naming primary keys (``=``,
    ``IN``, an executemany), through ``session.execute`` or ``session.connection().execute``:
    the rows read as the database holds them; the untouched row stays cached."""
    table = table_of(WxItem)
    warm(items, engine, WxItem, 1, 2, 3, 4)
    with items() as session:
        run = execute_via(session, via)
        run(update(table).where(table.c.id == 1).values(name="core"))
        run(delete(table).where(table.c.id.in_([2])))
        run(
            update(table).where(table.c.id == bindparam("b_id")).values(name=bindparam("b_name")),
            [{"b_id": 3, "b_name": "many"}],
        )
        run(insert(table).values(id=5, name="five", qty=50))
        session.commit()

    assert_reads_database_row(items, engine, WxItem, 1, 2, 3, 5)
    assert db_values(engine, WxItem, 1) == {"id": 1, "name": "core", "qty": 10}
    assert db_values(engine, WxItem, 2) is None
    assert db_values(engine, WxItem, 3) == {"id": 3, "name": "many", "qty": 30}
    assert_still_cached(items, engine, WxItem, 4)

    raw = update(table).where(table.c.id == 4).values(name="raw")
    assert_untracked_write_serves_stale(items, engine, WxItem, 4, lambda c: c.execute(raw))


@pytest.mark.parametrize("via", ["session", "connection"])
def test_core_range_dml_on_model_table(
    engine: Engine, items: sessionmaker[Session], via: str
) -> None:
    """Core range ``update``/``delete`` on ``M.__table__`` through the session or its
    connection: every row of the model reads as the database holds it."""
    table = table_of(WxItem)
    warm(items, engine, WxItem, 1, 2, 3, 4)
    with items() as session:
        run = execute_via(session, via)
        run(update(table).where(table.c.qty > 25).values(name="range"))
        run(delete(table).where(table.c.qty < 15))
        session.commit()

    assert_reads_database_row(items, engine, WxItem, 1, 2, 3, 4)
    assert db_values(engine, WxItem, 1) is None
    assert db_values(engine, WxItem, 4) == {"id": 4, "name": "range", "qty": 40}

    raw = update(table).where(table.c.qty < 25).values(name="raw")
    assert_untracked_write_serves_stale(items, engine, WxItem, 2, lambda c: c.execute(raw))


@pytest.mark.parametrize("via", ["session", "connection"])
@pytest.mark.parametrize("kind", ["update", "delete"])
def test_text_dml(engine: Engine, items: sessionmaker[Session], kind: str, via: str) -> None:
    """``text("UPDATE wx_item ... WHERE id = :id")`` / ``text("DELETE FROM wx_item ...")``
    through the session or ``session.connection()``: the statement is matched by table name and
    every row of the model reads as the database holds it after the commit."""
    sql = {
        "update": "UPDATE wx_item SET name = :name WHERE id = :id",
        "delete": "DELETE FROM wx_item WHERE id = :id",
    }[kind]
    warm(items, engine, WxItem, 1, 2, 3, 4)
    with items() as session:
        execute_via(session, via)(text(sql), {"name": "text", "id": 1})
        session.commit()

    assert_reads_database_row(items, engine, WxItem, 1, 2, 3, 4)
    assert db_values(engine, WxItem, 1) == (
        {"id": 1, "name": "text", "qty": 10} if kind == "update" else None
    )

    assert_untracked_write_serves_stale(
        items, engine, WxItem, 2, lambda c: c.execute(text(sql), {"name": "raw", "id": 2})
    )


def test_text_select_invalidates_nothing(engine: Engine, items: sessionmaker[Session]) -> None:
    """A ``text()`` SELECT (through the session and its connection) changes nothing: cached rows
    stay served with no SQL, inside that session and in new ones after its commit."""
    warm(items, engine, WxItem, 1, 2, 3, 4)
    with items() as session:
        rows = session.execute(text("SELECT id, name FROM wx_item ORDER BY id")).all()
        assert [r.id for r in rows] == [1, 2, 3, 4]
        count = session.connection().execute(text("select count(*) from wx_item")).scalar()
        assert count == 4
        with capture_sql(engine) as statements:
            obj = session.get(WxItem, 1)
            assert obj is not None and obj.name == "item 1"
        assert statements == []
        session.commit()

    assert_still_cached(items, engine, WxItem, 1, 2, 3, 4)


# ============================================== 5. handled once, and not too much


def test_orm_flush_of_one_row_touches_only_that_row(
    engine: Engine, items: sessionmaker[Session], redis_url: str, prefix: str
) -> None:
    """An ORM flush's own UPDATE is left to ``after_flush`` (not handled again as a statement):
    the commit costs exactly the flush's lock and the publish (2 Redis round trips), the changed
    row is published (served with no SQL, new value) and the other rows stay cached."""
    client, counter = counting_redis(redis_url, socket_timeout=10)
    try:
        counting = WriteThroughCache(client, prefix=prefix, **COUNTED)
        factory = sessionmaker(engine)
        counting.install(factory)
        warm(factory, engine, WxItem, 1, 2, 3, 4)
        with factory() as session:  # a new prefix's first commit makes its registry whole
            session.get(WxItem, 4).qty += 1  # type: ignore[union-attr]
            session.commit()
        warm(factory, engine, WxItem, 4)
        with factory() as session:
            obj = session.get(WxItem, 1)
            assert obj is not None
            counter.reset()
            obj.name = "flushed"
            session.commit()
            round_trips = counter.count
    finally:
        client.close()

    assert round_trips == 2, "one lock at flush, one publish after COMMIT"
    assert get_from_cache(items, engine, WxItem, 1) == {"id": 1, "name": "flushed", "qty": 10}
    assert_still_cached(items, engine, WxItem, 1, 2, 3, 4)


def test_rows_are_cacheable_again_after_a_range_update(
    engine: Engine, items: sessionmaker[Session]
) -> None:
    """After a committed range update the whole model is a miss, but the next read fills and
    the one after it hits (with the new value)."""
    warm(items, engine, WxItem, 1, 2, 3, 4)
    with items() as session:
        session.execute(update(WxItem).where(WxItem.qty > 0).values(qty=7))
        session.commit()

    for pk in (1, 2, 3, 4):
        got, statements = read(items, engine, WxItem, pk)
        assert statements, "the whole model is invalidated: the first read is a miss"
        assert got == db_values(engine, WxItem, pk)
        assert got is not None and got["qty"] == 7
        assert get_from_cache(items, engine, WxItem, pk) == got


@pytest.mark.parametrize("form", ["orm_sync_false", "orm_executemany", "core", "mappings"])
def test_flush_after_a_statement_on_the_same_row(
    engine: Engine, items: sessionmaker[Session], form: str
) -> None:
    """A row loaded into the session, changed by a statement that does not refresh the loaded
    object (``synchronize_session=False``, bulk by primary key, Core, ``bulk_update_mappings``),
    then changed again through the ORM and flushed: the flush's snapshot of the object holds the
    name from before the statement, so it must not be published. Right after the commit the row
    reads as the database holds it (the statement's name and the flush's qty)."""
    table = table_of(WxItem)
    warm(items, engine, WxItem, 1)
    with items() as session:
        obj = session.get(WxItem, 1)
        assert obj is not None
        if form == "orm_sync_false":
            session.execute(
                update(WxItem).where(WxItem.id == 1).values(name="statement"),
                execution_options={"synchronize_session": False},
            )
        elif form == "orm_executemany":
            session.execute(update(WxItem), [{"id": 1, "name": "statement"}])
        elif form == "core":
            session.execute(update(table).where(table.c.id == 1).values(name="statement"))
        else:
            session.bulk_update_mappings(inspect(WxItem), [{"id": 1, "name": "statement"}])
        obj.qty = 5
        session.commit()

    assert db_values(engine, WxItem, 1) == {"id": 1, "name": "statement", "qty": 5}
    assert_reads_database_row(items, engine, WxItem, 1)


def _listener_statement(hook: str) -> tuple[Any, str, Callable[..., Any]]:
    """Where a listener runs SQL during a flush, and the SQL it runs: row 1's qty becomes 99."""
    table = table_of(WxItem)
    core = update(table).where(table.c.id == 1).values(qty=99)
    if hook == "after_flush_runs_first":
        # as sqlalchemy-utils' aggregates do: a Core UPDATE whose WHERE names no key, through
        # the session, in an after_flush listener that runs before the cache's
        def after_flush(session: Session, flush_context: Any) -> None:
            session.execute(
                update(table)
                .where(table.c.qty > 0)
                .values(qty=case((table.c.id == 1, 99), else_=table.c.qty))
            )

        return None, "after_flush", after_flush
    if hook in ("mapper_event", "mapper_event_text"):
        # SQLAlchemy's documented place for more SQL in a flush: the mapper event's connection
        def after_insert(mapper: Any, connection: Connection, target: Any) -> None:
            if hook == "mapper_event":
                connection.execute(core)
            else:
                connection.execute(text("UPDATE wx_item SET qty = 99 WHERE id = 1"))

        return WxItem, "after_insert", after_insert

    def before_flush(session: Session, flush_context: Any, instances: Any) -> None:
        session.execute(core)  # Core: the loaded object's qty is not synchronized

    return None, "before_flush", before_flush


@pytest.mark.parametrize(
    "hook", ["after_flush_runs_first", "mapper_event", "mapper_event_text", "before_flush"]
)
def test_statement_a_listener_runs_during_the_flush(
    engine: Engine, items: sessionmaker[Session], hook: str
) -> None:
    """SQL a listener runs while the session flushes (a mapper event's ``connection.execute``,
    an ``after_flush`` listener that runs before the cache's, a ``before_flush`` listener that
    runs after it) is not the unit of work's own: its rows are invalidated like any other
    statement's. It used to be taken for the flush's, so the commit published the flushed
    object's snapshot of row 1 (its old qty) and gets served it until the TTL."""
    target, name, listener = _listener_statement(hook)
    on = target if target is not None else items
    event.listen(on, name, listener, **({"insert": True} if name == "after_flush" else {}))
    try:
        warm(items, engine, WxItem, 1, 2)
        with items() as session:
            obj = session.get(WxItem, 1)
            assert obj is not None
            obj.name = "flushed"
            session.add(WxItem(id=5, name="item 5", qty=50))
            session.commit()
            assert (obj.name, obj.qty) == ("flushed", 99)  # the read-back after the commit
    finally:
        event.remove(on, name, listener)

    assert db_values(engine, WxItem, 1) == {"id": 1, "name": "flushed", "qty": 99}
    assert_reads_database_row(items, engine, WxItem, 1, 2, 5)


def test_rows_a_flush_writes_through_a_secondary_table_of_a_cached_model(
    engine: Engine, factory_for: Callable[[MetaData], sessionmaker[Session]]
) -> None:
    """A many-to-many writes its ``secondary`` table's rows itself, without the mapper of a
    model mapped to that table: a cached ``WxPostTag`` row the relationship deletes is
    invalidated (it used to be served after the commit, deleted)."""
    factory = factory_for(SecondaryBase.metadata)
    with factory() as session:
        session.add(WxPost(id=1, tags=[WxTag(id=1), WxTag(id=2)]))
        session.commit()
    warm(factory, engine, WxPostTag, (1, 1), (1, 2))
    with factory() as session:
        post = session.get(WxPost, 1)
        assert post is not None
        post.tags.remove(next(tag for tag in post.tags if tag.id == 1))
        session.commit()

    assert db_values(engine, WxPostTag, (1, 1)) is None
    assert_reads_database_row(factory, engine, WxPostTag, (1, 1), (1, 2))


# ============================================================================ 6. rollback


def test_rollback_of_range_update_restores_the_generation(
    engine: Engine,
    items: sessionmaker[Session],
    cache: WriteThroughCache,
    redis_client: redis.Redis,
) -> None:
    """A range update then a rollback: the generation lock is released to the previous token,
    so every previously cached row is served from Redis again, with its old value."""
    warm(items, engine, WxItem, 1, 2, 3, 4)
    before = {pk: get_from_cache(items, engine, WxItem, pk) for pk in (1, 2, 3, 4)}
    gen = generation_key(entry_key(cache, WxItem, 1))
    with items() as session:
        session.execute(update(WxItem).where(WxItem.qty > 0).values(name="rolled back"))
        raw = redis_client.get(gen)
        assert raw is not None and raw[:1] == b"L", "the generation is locked during the txn"
        session.rollback()

    for pk, values in before.items():
        assert get_from_cache(items, engine, WxItem, pk) == values == db_values(engine, WxItem, pk)


@pytest.mark.parametrize("form", ["executemany", "where"])
def test_rollback_of_update_by_primary_key_restores_values(
    engine: Engine,
    items: sessionmaker[Session],
    cache: WriteThroughCache,
    redis_client: redis.Redis,
    form: str,
) -> None:
    """A bulk update by primary key then a rollback: the locked entries get their previous
    VALUEs back, served with no SQL."""
    warm(items, engine, WxItem, 1, 2)
    before = {pk: get_from_cache(items, engine, WxItem, pk) for pk in (1, 2)}
    with items() as session:
        if form == "executemany":
            session.execute(update(WxItem), [{"id": 1, "name": "x"}, {"id": 2, "name": "y"}])
        else:
            session.execute(update(WxItem).where(WxItem.id.in_([1, 2])).values(name="x"))
        assert entry_state(redis_client, entry_key(cache, WxItem, 1)) == "lock"
        session.rollback()

    for pk, values in before.items():
        assert get_from_cache(items, engine, WxItem, pk) == values == db_values(engine, WxItem, pk)


# ======================================================= 7. readers during an open txn


def test_readers_go_to_database_while_range_update_is_uncommitted(
    engine: Engine,
    items: sessionmaker[Session],
    cache: WriteThroughCache,
    redis_client: redis.Redis,
) -> None:
    """While a range update is uncommitted, another session's get goes to the database, gets
    the committed value, and cannot fill (the entry in Redis is exactly as before); after the
    commit the new value is read."""
    warm(items, engine, WxItem, 1, 2)
    key = entry_key(cache, WxItem, 1)
    entry_before = redis_client.get(key)
    with items() as writer:
        writer.execute(update(WxItem).where(WxItem.qty >= 10).values(name="uncommitted"))
        got, statements = read(items, engine, WxItem, 1)
        assert statements, "served from Redis while the model's generation is locked"
        assert got == {"id": 1, "name": "item 1", "qty": 10}
        assert redis_client.get(key) == entry_before, "a fill landed during the transaction"
        writer.commit()

    got, _ = read(items, engine, WxItem, 1)
    assert got == db_values(engine, WxItem, 1) == {"id": 1, "name": "uncommitted", "qty": 10}


# =========================================================== 8. cascades in the database


def test_orm_delete_of_parent_with_passive_deletes_cascades(
    engine: Engine, factory_for: Callable[[MetaData], sessionmaker[Session]]
) -> None:
    """``ON DELETE CASCADE`` + ``relationship(passive_deletes=True)``: deleting the (cached)
    parent through the ORM leaves the database to delete the (cached, unloaded) children; they
    read as missing right after the commit."""
    factory = factory_for(CascadeBase.metadata)
    with Session(engine) as seed:
        seed.add_all([WxParent(id=1, name="p1"), WxParent(id=2, name="p2")])
        seed.flush()
        seed.add_all(
            [
                WxChild(id=11, parent_id=1, name="c11"),
                WxChild(id=12, parent_id=1, name="c12"),
                WxChild(id=21, parent_id=2, name="c21"),
            ]
        )
        seed.commit()
    warm(factory, engine, WxParent, 1, 2)
    warm(factory, engine, WxChild, 11, 12, 21)

    with factory() as session:
        parent = session.get(WxParent, 1)
        session.delete(parent)
        session.commit()

    assert db_values(engine, WxChild, 11) is None
    assert_reads_database_row(factory, engine, WxChild, 11, 12, 21)
    assert_reads_database_row(factory, engine, WxParent, 1, 2)

    parents = table_of(WxParent)
    assert_untracked_write_serves_stale(
        factory,
        engine,
        WxChild,
        21,
        lambda c: c.execute(delete(parents).where(parents.c.id == 2)),
    )


@pytest.mark.parametrize("how", ["orm", "bulk", "text"])
def test_delete_of_uncached_parent_without_relationship_cascades(
    engine: Engine, factory_for: Callable[[MetaData], sessionmaker[Session]], how: str
) -> None:
    """``ON DELETE CASCADE`` with no ORM relationship and an uncached parent: deleting the
    parent (ORM delete, bulk ``delete(Parent)``, or a ``text()`` DELETE) makes the cached
    children misses."""
    factory = factory_for(LoneBase.metadata)
    with Session(engine) as seed:
        seed.add_all([WxLoneParent(id=1, name="p1"), WxLoneParent(id=2, name="p2")])
        seed.flush()
        seed.add_all(
            [
                WxLoneChild(id=11, parent_id=1, name="c11"),
                WxLoneChild(id=21, parent_id=2, name="c21"),
            ]
        )
        seed.commit()
    warm(factory, engine, WxLoneChild, 11, 21)

    with factory() as session:
        if how == "orm":
            session.delete(session.get(WxLoneParent, 1))
        elif how == "bulk":
            session.execute(delete(WxLoneParent).where(WxLoneParent.id == 1))
        else:
            session.execute(text("DELETE FROM wx_lone_parent WHERE id = 1"))
        session.commit()

    assert db_values(engine, WxLoneChild, 11) is None
    assert_reads_database_row(factory, engine, WxLoneChild, 11, 21)

    parents = table_of(WxLoneParent)
    assert_untracked_write_serves_stale(
        factory,
        engine,
        WxLoneChild,
        21,
        lambda c: c.execute(delete(parents).where(parents.c.id == 2)),
    )


@pytest.mark.parametrize("how", ["orm", "bulk", "text"])
def test_delete_of_parent_sets_cached_children_fk_null(
    engine: Engine, factory_for: Callable[[MetaData], sessionmaker[Session]], how: str
) -> None:
    """``ON DELETE SET NULL``: after the parent's delete (ORM, bulk or text), the cached children
    read through the cache have ``parent_id`` None, as in the database."""
    factory = factory_for(NullBase.metadata)
    with Session(engine) as seed:
        seed.add_all([WxNullParent(id=1, name="p1"), WxNullParent(id=2, name="p2")])
        seed.flush()
        seed.add_all(
            [
                WxNullChild(id=11, parent_id=1, name="c11"),
                WxNullChild(id=21, parent_id=2, name="c21"),
            ]
        )
        seed.commit()
    warm(factory, engine, WxNullParent, 1, 2)
    warm(factory, engine, WxNullChild, 11, 21)

    with factory() as session:
        if how == "orm":
            session.delete(session.get(WxNullParent, 1))
        elif how == "bulk":
            session.execute(delete(WxNullParent).where(WxNullParent.id == 1))
        else:
            session.execute(text("DELETE FROM wx_null_parent WHERE id = 1"))
        session.commit()

    got, _ = read(factory, engine, WxNullChild, 11)
    assert got == {"id": 11, "parent_id": None, "name": "c11"} == db_values(engine, WxNullChild, 11)
    assert_reads_database_row(factory, engine, WxNullChild, 21)
    assert_reads_database_row(factory, engine, WxNullParent, 1, 2)

    parents = table_of(WxNullParent)
    assert_untracked_write_serves_stale(
        factory,
        engine,
        WxNullChild,
        21,
        lambda c: c.execute(delete(parents).where(parents.c.id == 2)),
    )


@pytest.mark.parametrize("how", ["orm", "bulk", "text"])
def test_natural_key_change_cascades_to_cached_children(
    engine: Engine, factory_for: Callable[[MetaData], sessionmaker[Session]], how: str
) -> None:
    """``ON UPDATE CASCADE``: when the parent's natural (string) primary key changes (ORM
    attribute change, bulk ``update(Parent)`` or a ``text()`` UPDATE), cached children read
    with the new FK."""
    factory = factory_for(NaturalBase.metadata)
    with Session(engine) as seed:
        seed.add_all([WxNatParent(code="a", label="A"), WxNatParent(code="z", label="Z")])
        seed.flush()
        seed.add_all(
            [
                WxNatChild(id=1, parent_code="a", name="c1"),
                WxNatChild(id=2, parent_code="z", name="c2"),
            ]
        )
        seed.commit()
    warm(factory, engine, WxNatParent, "a", "z")
    warm(factory, engine, WxNatChild, 1, 2)

    with factory() as session:
        if how == "orm":
            parent = session.get(WxNatParent, "a")
            assert parent is not None
            parent.code = "b"
        elif how == "bulk":
            session.execute(update(WxNatParent).where(WxNatParent.code == "a").values(code="b"))
        else:
            session.execute(text("UPDATE wx_nat_parent SET code = 'b' WHERE code = 'a'"))
        session.commit()

    got, _ = read(factory, engine, WxNatChild, 1)
    assert got == {"id": 1, "parent_code": "b", "name": "c1"} == db_values(engine, WxNatChild, 1)
    assert_reads_database_row(factory, engine, WxNatChild, 2)
    assert_reads_database_row(factory, engine, WxNatParent, "a", "b", "z")

    parents = table_of(WxNatParent)
    assert_untracked_write_serves_stale(
        factory,
        engine,
        WxNatChild,
        2,
        lambda c: c.execute(update(parents).where(parents.c.code == "z").values(code="y")),
    )


@pytest.mark.parametrize("how", ["orm", "bulk"])
def test_update_of_parent_non_key_column_leaves_children_cached(
    engine: Engine, factory_for: Callable[[MetaData], sessionmaker[Session]], how: str
) -> None:
    """Not too much: an UPDATE of a parent that does not touch the key its children reference
    (``ON UPDATE CASCADE``) cannot change them, so the cached children stay cached."""
    factory = factory_for(NaturalBase.metadata)
    with Session(engine) as seed:
        seed.add(WxNatParent(code="a", label="A"))
        seed.flush()
        seed.add(WxNatChild(id=1, parent_code="a", name="c1"))
        seed.commit()
    warm(factory, engine, WxNatParent, "a")
    warm(factory, engine, WxNatChild, 1)

    with factory() as session:
        if how == "orm":
            parent = session.get(WxNatParent, "a")
            assert parent is not None
            parent.label = "relabelled"
        else:
            session.execute(
                update(WxNatParent).where(WxNatParent.code == "a").values(label="relabelled")
            )
        session.commit()

    assert_reads_database_row(factory, engine, WxNatParent, "a")
    assert_still_cached(factory, engine, WxNatChild, 1)


# =========================================================== 9. triggers: also_invalidates


def _create_triggers(engine: Engine) -> None:
    """``AFTER UPDATE`` triggers copying ``amount`` into the destination row's ``total``."""
    dialect = engine.dialect.name
    with engine.begin() as conn:
        for src, dst in (("wx_src", "wx_dst"), ("wx_src2", "wx_dst2"), ("wx_src3", "wx_dst3")):
            body = f"UPDATE {dst} SET total = NEW.amount WHERE id = NEW.dst_id"
            # reset_schema empties tables without dropping them: an earlier test's trigger stays
            on = f" ON {src}" if dialect == "postgresql" else ""
            conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {src}_trg{on}")
            if dialect == "postgresql":
                conn.exec_driver_sql(
                    f"CREATE OR REPLACE FUNCTION {src}_copy() RETURNS trigger LANGUAGE plpgsql "
                    f"AS $$ BEGIN {body}; RETURN NEW; END $$"
                )
                conn.exec_driver_sql(
                    f"CREATE TRIGGER {src}_trg AFTER UPDATE ON {src} "
                    f"FOR EACH ROW EXECUTE FUNCTION {src}_copy()"
                )
            elif dialect == "sqlite":
                conn.exec_driver_sql(
                    f"CREATE TRIGGER {src}_trg AFTER UPDATE ON {src} FOR EACH ROW BEGIN {body}; END"
                )
            else:
                conn.exec_driver_sql(
                    f"CREATE TRIGGER {src}_trg AFTER UPDATE ON {src} FOR EACH ROW {body}"
                )


@pytest.mark.parametrize("how", ["orm", "bulk", "text"])
def test_trigger_effects_declared_with_also_invalidates(
    engine: Engine, factory_for: Callable[[MetaData], sessionmaker[Session]], how: str
) -> None:
    """A real trigger on ``wx_src`` updates a cached ``wx_dst`` row. ``WxSrc`` declares
    ``also_invalidates=[WxDst]`` (``WxSrc3``: ``["wx_dst3"]``, by table name), so after a write
    to it (ORM flush, bulk update, or text UPDATE) ``WxDst`` reads as the trigger left it.
    ``WxSrc2`` has the same trigger onto ``WxDst2`` but no declaration: the stale ``WxDst2``
    row was served after the very same write; the cache now reads the trigger's ``UPDATE
    wx_dst2`` from the catalog and invalidates ``WxDst2`` as well."""
    factory = factory_for(TriggerBase.metadata)
    _create_triggers(engine)
    sources: list[tuple[Any, str, Any]] = [
        (WxSrc, "wx_src", WxDst),
        (WxSrc2, "wx_src2", WxDst2),
        (WxSrc3, "wx_src3", WxDst3),
    ]
    with Session(engine) as seed:
        for src, _, dst in sources:
            seed.add_all([dst(id=1, total=0), src(id=1, dst_id=1, amount=0)])
        seed.commit()
    for src, _, dst in sources:
        warm(factory, engine, src, 1)  # the application has read the row it will change
        warm(factory, engine, dst, 1)

    for src, table_name, _ in sources:
        with factory() as session:
            if how == "orm":
                obj: Any = session.get(src, 1)
                obj.amount = 7
            elif how == "bulk":
                session.execute(update(src).where(src.id == 1).values(amount=7))
            else:
                session.execute(text(f"UPDATE {table_name} SET amount = 7 WHERE id = 1"))
            session.commit()

    for dst in (WxDst, WxDst2, WxDst3):
        assert db_values(engine, dst, 1) == {"id": 1, "total": 7}, "the trigger did not run"
    for dst in (WxDst, WxDst2, WxDst3):
        got, _ = read(factory, engine, dst, 1)
        assert got == {"id": 1, "total": 7}, dst.__name__


# ================================================== 10. whole-model invalidation in O(1)


def test_invalidate_model_is_constant_round_trips_and_immediate(
    engine: Engine, items: sessionmaker[Session], redis_url: str, prefix: str
) -> None:
    """``cache.invalidate(M)`` costs the same small number of Redis round trips with 10 and
    with 1000 cached rows, and afterwards every previously cached row is a miss."""
    client, counter = counting_redis(redis_url, socket_timeout=10)
    try:
        counting = WriteThroughCache(client, prefix=prefix, **COUNTED)
        factory = sessionmaker(engine)
        counting.install(factory)
        counting.invalidate(WxItem)  # loads the script once; not what is measured

        def cache_rows(ids: range) -> list[str]:
            with factory() as session:  # inserts are published at commit: cached rows
                session.add_all([WxItem(id=i, name=f"n{i}", qty=i) for i in ids])
                session.commit()
            keys = [entry_key(counting, WxItem, i) for i in ids]
            assert all(entry_is_current(client, k) for k in keys)
            return keys

        def invalidate_counted() -> int:
            # the fewer of two runs (the second does the same work): a one-off of the shared
            # Redis (a script reloaded, a connection's first epoch check) is not what is
            # measured; what each run sent is kept for the message
            counts = []
            for _ in range(2):
                counter.reset()
                assert counting.invalidate(WxItem) is True
                counts.append(counter.count)
                sent.append(list(counter.names))
            return min(counts)

        sent: list[list[str]] = []

        small = cache_rows(range(101, 111))
        get_from_cache(factory, engine, WxItem, 105)
        trips_10 = invalidate_counted()
        assert not any(entry_is_current(client, k) for k in small)

        large = cache_rows(range(1001, 2001))
        get_from_cache(factory, engine, WxItem, 1500)
        trips_1000 = invalidate_counted()
        assert not any(entry_is_current(client, k) for k in large)
    finally:
        client.close()

    assert trips_10 == trips_1000 <= 2, sent
    for pk in (101, 110, 1001, 1500, 2000):
        got, statements = read(items, engine, WxItem, pk)
        assert statements, f"row {pk} was still served from Redis"
        assert got == db_values(engine, WxItem, pk)


# ============================================ 11. statements whose effect cannot be told


def _create_procedure(engine: Engine) -> None:
    """A procedure that changes ``wx_item`` row 1 without naming the table in its CALL."""
    change = "UPDATE wx_item SET qty = qty + 1000 WHERE id = 1"
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql(
                f"CREATE OR REPLACE PROCEDURE wx_bump() LANGUAGE plpgsql AS $$ BEGIN {change}; END $$"
            )
        else:
            conn.exec_driver_sql("DROP PROCEDURE IF EXISTS wx_bump")
            conn.exec_driver_sql(f"CREATE PROCEDURE wx_bump() {change}")


def test_call_makes_its_transaction_read_the_database(
    engine: Engine, items: sessionmaker[Session]
) -> None:
    """After ``text("CALL ...")`` (SQLite, which has no procedures: ``REINDEX``, a statement
    the library cannot classify), the session's gets go to the database (and see what the
    procedure did) until the transaction ends; meanwhile other sessions read the committed
    rows from the database (every cached model is locked); after the rollback, everything is
    served from Redis again."""
    warm(items, engine, WxItem, 1, 2, 3)
    has_procedures = engine.dialect.name != "sqlite"
    if has_procedures:
        _create_procedure(engine)
    with items() as session:
        session.execute(text("CALL wx_bump()" if has_procedures else "REINDEX"))
        for pk in (1, 2):
            with capture_sql(engine) as statements:
                obj = session.get(WxItem, pk)
                assert obj is not None
                seen = values_of(obj)
            assert statements, f"row {pk} was served from Redis after an untracked statement"
            if pk == 1:
                assert seen["qty"] == (1010 if has_procedures else 10)
        # another session reads the committed row from the database: every cached model is
        # locked while a statement that may change any table is uncommitted
        committed, statements = read(items, engine, WxItem, 1)
        assert statements and committed == {"id": 1, "name": "item 1", "qty": 10}
        session.rollback()
        with capture_sql(engine) as statements:
            assert session.get(WxItem, 3) is not None
        assert statements == [], "the next transaction should read from Redis again"

    assert_still_cached(items, engine, WxItem, 1, 2, 3)


@pytest.mark.databases("postgresql")  # PyMySQL and sqlite3 refuse several statements
@pytest.mark.parametrize(
    "sql",
    [
        "SET LOCAL statement_timeout = 5000; UPDATE wx_item SET qty = 7 WHERE id = 1",
        "SELECT 1; /* then */ UPDATE wx_item SET qty = 7 WHERE id = 1;",
        "SELECT ';' AS semicolon; DELETE FROM wx_item WHERE id = 2; "
        "UPDATE wx_item SET qty = 7 WHERE id = 1",
    ],
    ids=["set-local", "select-first", "semicolon-literal"],
)
def test_every_statement_of_raw_sql_holding_several_is_seen(
    engine: Engine, items: sessionmaker[Session], sql: str
) -> None:
    """psycopg runs every statement of ``text("SET LOCAL ...; UPDATE ...")``; the cache looked
    only at the first (read-only), and served the rows as they were before the UPDATE."""
    warm(items, engine, WxItem, 1, 2)
    with items() as session:
        session.execute(text(sql))
        session.commit()
    assert db_values(engine, WxItem, 1)["qty"] == 7  # type: ignore[index]
    assert_reads_database_row(items, engine, WxItem, 1, 2)


@pytest.mark.databases("postgresql", "mariadb")
def test_a_statement_explain_analyze_runs_is_seen(
    engine: Engine, items: sessionmaker[Session]
) -> None:
    """``EXPLAIN ANALYZE UPDATE ...`` (PostgreSQL), ``ANALYZE UPDATE ...`` and ``SET STATEMENT
    ... FOR UPDATE ...`` (MariaDB) run the statement they lead; the cache read them as
    read-only, and served the row as it was before that UPDATE was committed."""
    warm(items, engine, WxItem, 1, 2)
    mariadb = engine.dialect.name != "postgresql"
    prefixes = (
        ["ANALYZE", "SET STATEMENT max_statement_time = 10 FOR"]
        if mariadb
        else [
            "EXPLAIN ANALYZE",
            "EXPLAIN (ANALYZE, BUFFERS)",
        ]
    )
    for qty, prefix in enumerate(prefixes, 97):
        with items() as session:
            session.execute(text(f"{prefix} UPDATE wx_item SET qty = {qty} WHERE id = 1"))
            session.commit()
        assert db_values(engine, WxItem, 1)["qty"] == qty  # type: ignore[index]
        assert_reads_database_row(items, engine, WxItem, 1)


@pytest.mark.databases("mariadb")  # PostgreSQL here has max_prepared_transactions = 0
def test_a_two_phase_commit_writes_through_and_leaves_other_rows_cached(
    engine: Engine, items: sessionmaker[Session], cache: WriteThroughCache
) -> None:
    """``sessionmaker(twophase=True)`` on MySQL/MariaDB runs ``XA START``, ``XA END``, ``XA
    PREPARE`` and ``XA COMMIT`` on the session's connection: statements the cache could not
    classify, so every commit invalidated every cached model whole and published nothing."""
    twophase = sessionmaker(engine, twophase=True)
    cache.install(twophase)
    try:
        warm(twophase, engine, WxItem, 1, 2)
        with twophase() as session:
            obj = session.get(WxItem, 1)
            assert obj is not None
            obj.qty = 11
            session.commit()
        assert get_from_cache(twophase, engine, WxItem, 1) == db_values(engine, WxItem, 1)
        assert db_values(engine, WxItem, 1)["qty"] == 11  # type: ignore[index]
        assert_still_cached(twophase, engine, WxItem, 2)
    finally:
        cache.uninstall(twophase)


def test_procedure_changing_a_cached_row_is_not_served_stale_after_commit(
    engine: Engine, items: sessionmaker[Session]
) -> None:
    """A procedure (``text("CALL ...")``) that changes a cached row, committed through the
    session: right after the commit a new session's get must return the database row
    (guarantee 2; docs/write-paths.md: whole-model invalidation is the fallback for raw SQL)."""
    if engine.dialect.name == "sqlite":
        pytest.skip("SQLite has no stored procedures (no CALL)")
    _create_procedure(engine)
    warm(items, engine, WxItem, 1)
    with items() as session:
        session.execute(text("CALL wx_bump()"))
        session.commit()

    assert db_values(engine, WxItem, 1) == {"id": 1, "name": "item 1", "qty": 1010}
    assert_reads_database_row(items, engine, WxItem, 1)


# ================================= a process whose cache has not met the model yet


@pytest.mark.parametrize("how", ["orm_bulk", "core", "text", "cascade"])
def test_cache_that_has_not_used_a_model_still_invalidates_it(
    engine: Engine,
    factory_for: Callable[[MetaData], sessionmaker[Session]],
    redis_url: str,
    prefix: str,
    how: str,
) -> None:
    """Two processes share Redis (two caches, same prefix). Process A has cached rows;
    process B, whose cache has not loaded the model yet (its mappers were configured before
    B's cache existed), changes them with a statement (ORM bulk, Core, text) or through a
    database cascade. Right after B's commit, A must read the database rows."""
    factory_a = factory_for(LoneBase.metadata)
    reset_schema(engine, ItemBase.metadata)
    with Session(engine) as seed:
        seed.add_all([WxItem(id=1, name="item 1", qty=10), WxLoneParent(id=1, name="p1")])
        seed.flush()
        seed.add(WxLoneChild(id=11, parent_id=1, name="c11"))
        seed.commit()
    warm(factory_a, engine, WxItem, 1)
    warm(factory_a, engine, WxLoneChild, 11)

    client_b = redis.Redis.from_url(redis_url, socket_timeout=1)
    try:
        cache_b = WriteThroughCache(client_b, prefix=prefix)
        factory_b = sessionmaker(engine)
        cache_b.install(factory_b)
        table = table_of(WxItem)
        with factory_b() as session:
            if how == "orm_bulk":
                session.execute(update(WxItem).where(WxItem.id == 1).values(name="by B"))
            elif how == "core":
                session.execute(update(table).where(table.c.id == 1).values(name="by B"))
            elif how == "text":
                session.execute(text("UPDATE wx_item SET name = 'by B' WHERE id = 1"))
            else:
                session.delete(session.get(WxLoneParent, 1))
            session.commit()
    finally:
        client_b.close()

    if how == "cascade":
        assert db_values(engine, WxLoneChild, 11) is None
        assert_reads_database_row(factory_a, engine, WxLoneChild, 11)
    else:
        assert db_values(engine, WxItem, 1) == {"id": 1, "name": "by B", "qty": 10}
        assert_reads_database_row(factory_a, engine, WxItem, 1)


@pytest.mark.parametrize("shape", ["in", "in_case"])
def test_statements_of_one_shape_name_their_own_rows(
    engine: Engine, items: sessionmaker[Session], shape: str
) -> None:
    """SQLAlchemy compiles a statement shape once and reuses it: the keys a statement
    invalidates must come from its own parameters, not from the first statement compiled with
    that shape (found by the stress checker: the second IN update locked the first one's ids)."""
    warm(items, engine, WxItem, 1, 2, 3, 4)
    for ids in ([1, 2], [3, 4]):
        with items() as session:
            if shape == "in":
                stmt = update(WxItem).where(WxItem.id.in_(ids)).values(qty=WxItem.qty + 100)
            else:
                stmt = (
                    update(WxItem)
                    .where(WxItem.id.in_(ids))
                    .values(qty=case({ids[0]: 500, ids[1]: 600}, value=WxItem.id))
                )
            session.execute(stmt, execution_options={"synchronize_session": False})
            session.commit()
        assert_reads_database_row(items, engine, WxItem, *ids)
