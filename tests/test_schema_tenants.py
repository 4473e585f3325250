"""One schema per tenant, chosen with ``schema_translate_map`` anywhere SQLAlchemy takes it:
tenants never share an entry (invariant 10).

SQLAlchemy applies the map of a statement over the map of its connection over the map of its
engine. Each of those names the tenant's rows here, as it names the tables the SQL reads:

* on the Session's connection: ``session.connection(execution_options=...)`` before the first
  load, or ``Session(bind=connection.execution_options(...))``;
* on a statement: ``session.get(..., execution_options=...)``,
  ``select(...).execution_options(...)``, an ORM UPDATE's ``execution_options``;
* on the engine (``engine.execution_options(...)``), as before.

Each tenant is served its own row from the cache (no SQL the second time), its commits write
through to its own entry only, and a statement on one tenant's table invalidates that
tenant's entries only. On PostgreSQL: schemas in the run's database; on MariaDB, where a
schema is a database, databases beside the run's.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy import String, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_writethrough import CachedModel, WriteThroughCache, from_cache

from _servers import capture_sql

pytestmark = pytest.mark.databases("postgresql", "mariadb")


class StBase(DeclarativeBase):
    pass


class StItem(StBase, CachedModel):
    __tablename__ = "st_item"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))


#: a schema of tables every tenant shares, named on the model: a tenant's map leaves it alone
SHARED = f"st_shared_{uuid.uuid4().hex[:6]}"


class StPlan(StBase, CachedModel):
    __tablename__ = "st_plan"
    __table_args__ = {"schema": SHARED}

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))


@pytest.fixture
def schemas(engine: Engine) -> Iterator[tuple[str, str]]:
    """Two tenants' schemas, each with its own st_item holding row 1 named after it; the
    default schema's table holds row 1 too ("default")."""
    names = tuple(f"st_{t}_{uuid.uuid4().hex[:6]}" for t in ("a", "b"))
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {SHARED}")
        StBase.metadata.drop_all(conn)
        StBase.metadata.create_all(conn)
        conn.execute(StPlan.__table__.insert(), {"id": 1, "name": "shared"})
        conn.execute(StItem.__table__.insert(), {"id": 1, "name": "default"})
        for name in names:
            conn.exec_driver_sql(f"CREATE SCHEMA {name}")
            tenant = conn.execution_options(schema_translate_map={None: name})
            StBase.metadata.create_all(tenant, tables=[StItem.__table__])
            tenant.execute(StItem.__table__.insert(), {"id": 1, "name": name})
    yield names[0], names[1]
    with engine.begin() as conn:
        for name in names:
            # MariaDB's DROP SCHEMA (a database) drops its tables and takes no CASCADE
            cascade = " CASCADE" if engine.dialect.name == "postgresql" else ""
            conn.exec_driver_sql(f"DROP SCHEMA {name}{cascade}")
        StBase.metadata.drop_all(conn)
        conn.exec_driver_sql(f"DROP SCHEMA {SHARED}{cascade}")


@pytest.fixture
def maker(engine: Engine, redis_url: str, prefix: str) -> Iterator[sessionmaker[Session]]:
    client = redis.Redis.from_url(redis_url, socket_timeout=1)
    cache = WriteThroughCache(client, prefix=prefix)
    # session.connection() begins the transaction before the first load: under MariaDB's
    # REPEATABLE READ such a load does not fill (its snapshot may predate the lease); these
    # tests are about naming, so they read as READ COMMITTED does, where every load may fill
    bind = (
        engine.execution_options(isolation_level="READ COMMITTED")
        if engine.dialect.name == "mysql"
        else engine
    )
    factory = sessionmaker(bind)
    cache.install(factory)
    try:
        yield factory
    finally:
        cache.uninstall(factory)
        client.close()


def _tenant(schema: str) -> dict[str, Any]:
    return {"schema_translate_map": {None: schema}}


def read_on_connection(maker: sessionmaker[Session], engine: Engine, schema: str) -> Any:
    """(the name ``session.get`` returns with the tenant chosen on the session's connection,
    the SQL it sent)."""
    with maker() as session, capture_sql(engine) as sql:
        session.connection(execution_options=_tenant(schema))
        found = session.get(StItem, 1)
        return (found.name if found else None), len(sql)


def test_a_tenant_chosen_on_the_sessions_connection_reads_its_own_rows(
    maker: sessionmaker[Session], engine: Engine, schemas: tuple[str, str]
) -> None:
    a, b = schemas
    for _ in range(2):  # the second round from the cache
        assert read_on_connection(maker, engine, a)[0] == a
        assert read_on_connection(maker, engine, b)[0] == b
        with maker() as session:
            found = session.get(StItem, 1)
            assert found is not None and found.name == "default"
    assert read_on_connection(maker, engine, a) == (a, 0), "served from the cache"
    assert read_on_connection(maker, engine, b) == (b, 0), "served from the cache"


def test_a_tenants_commit_writes_through_to_its_own_entry_only(
    maker: sessionmaker[Session], engine: Engine, schemas: tuple[str, str]
) -> None:
    a, b = schemas
    for schema in (a, b, "default"):  # warm every entry
        if schema == "default":
            with maker() as session:
                session.get(StItem, 1)
        else:
            read_on_connection(maker, engine, schema)
    with maker() as session:
        session.connection(execution_options=_tenant(b))
        item = session.get(StItem, 1)
        assert item is not None
        item.name = "b changed"
        session.commit()
    assert read_on_connection(maker, engine, b) == ("b changed", 0), "written through"
    assert read_on_connection(maker, engine, a) == (a, 0)
    with maker() as session:
        found = session.get(StItem, 1)
        assert found is not None and found.name == "default"
    with engine.connect() as conn:
        tenant = conn.execution_options(schema_translate_map={None: b})
        assert tenant.scalar(select(StItem.name).where(StItem.id == 1)) == "b changed"


def test_a_session_bound_to_a_tenants_connection(
    maker: sessionmaker[Session], engine: Engine, schemas: tuple[str, str]
) -> None:
    a, b = schemas
    with engine.connect() as conn:
        for _ in range(2):
            for schema in (a, b):
                with maker(bind=conn.execution_options(**_tenant(schema))) as session:
                    found = session.get(StItem, 1)
                    assert found is not None and found.name == schema
                    found.name = schema  # unchanged: nothing to flush
                    session.commit()
        with maker(bind=conn.execution_options(**_tenant(b))) as session:
            item = session.get(StItem, 1)
            assert item is not None
            item.name = "b again"
            session.commit()
        with maker(bind=conn.execution_options(**_tenant(a))) as session:
            found = session.get(StItem, 1)
            assert found is not None and found.name == a
        with maker(bind=conn.execution_options(**_tenant(b))) as session:
            found = session.get(StItem, 1)
            assert found is not None and found.name == "b again"


def test_a_tenant_chosen_on_the_statement(
    maker: sessionmaker[Session], engine: Engine, schemas: tuple[str, str]
) -> None:
    a, b = schemas
    with maker() as session:
        found = session.get(StItem, 1)  # the default schema's row, now cached
        assert found is not None and found.name == "default"
    for _ in range(2):
        with maker() as session:
            found = session.get(StItem, 1, execution_options=_tenant(a))
            assert found is not None and found.name == a
        with maker() as session:
            stmt = select(StItem).where(StItem.id == 1).options(from_cache())
            found = session.scalars(stmt.execution_options(**_tenant(b))).one()
            assert found.name == b
        with maker() as session:
            found = session.scalars(
                select(StItem).where(StItem.id == 1).options(from_cache()),
                execution_options=_tenant(a),
            ).one()
            assert found.name == a


def test_an_in_list_with_the_tenant_on_the_statement_reads_the_tenants_rows(
    maker: sessionmaker[Session], engine: Engine, schemas: tuple[str, str]
) -> None:
    """An ``IN``-list read with ``from_cache()`` whose map is on the statement (``select``'s
    or the legacy ``Query``'s ``execution_options``): the misses it loads from the database
    are the tenant's rows, as the hits are. (Found by the stress checker's batch reads: the
    misses were loaded from the default schema, a cross-tenant read.)"""
    a, b = schemas
    in_list = select(StItem).where(StItem.id.in_([1, 2])).options(from_cache())
    for _ in range(2):  # cold, then from the cache
        with maker() as session:
            found = session.scalars(in_list.execution_options(**_tenant(a))).all()
            assert [row.name for row in found] == [a]
        with maker() as session:
            query = session.query(StItem).filter(StItem.id.in_([1, 2])).options(from_cache())
            assert [row.name for row in query.execution_options(**_tenant(b)).all()] == [b]
        with maker() as session:  # the map in the call's options
            found = session.scalars(in_list, execution_options=_tenant(b)).all()
            assert [row.name for row in found] == [b]
        with maker() as session:
            assert [row.name for row in session.scalars(in_list).all()] == ["default"]


def test_a_statement_on_a_tenants_table_invalidates_that_tenants_entries(
    maker: sessionmaker[Session], engine: Engine, schemas: tuple[str, str]
) -> None:
    a, b = schemas
    read_on_connection(maker, engine, a)
    read_on_connection(maker, engine, b)
    with maker() as session:
        session.execute(
            update(StItem).where(StItem.id == 1).values(name="b by statement"),
            execution_options=_tenant(b),
        )
        session.commit()
    assert read_on_connection(maker, engine, b)[0] == "b by statement"
    assert read_on_connection(maker, engine, a) == (a, 0), "the other tenant stays served"
    with maker() as session:
        found = session.get(StItem, 1)
        assert found is not None and found.name == "default"  # cached
    with maker() as session:
        session.connection(execution_options=_tenant(a))
        # raw SQL names its table itself: the map does not apply, the default schema's row
        # changes; whichever it changed, no tenant is served a row it no longer has
        session.execute(sa.text("UPDATE st_item SET name = 'by hand' WHERE id = 1"))
        session.commit()
    with maker() as session:
        found = session.get(StItem, 1)
        assert found is not None and found.name == "by hand"
    assert read_on_connection(maker, engine, a)[0] == a


def test_a_tenant_chosen_on_an_async_sessions_connection(
    engine: Engine, schemas: tuple[str, str], redis_url: str, prefix: str
) -> None:
    """The same with an AsyncSession and redis.asyncio: each tenant is served its own row,
    and a commit writes through to its tenant's entry only."""
    import asyncio

    import redis.asyncio
    from _flavours import async_url
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    a, b = schemas

    async def scenario() -> list[Any]:
        aengine = create_async_engine(async_url(engine.url.render_as_string(False)))
        client = redis.asyncio.Redis.from_url(redis_url, socket_timeout=5)
        cache = WriteThroughCache(client, prefix=prefix)
        factory = async_sessionmaker(aengine, expire_on_commit=False)
        cache.install(factory)
        seen: list[Any] = []

        async def read(schema: str) -> Any:
            async with factory() as session:
                await session.connection(execution_options=_tenant(schema))
                found = await session.get(StItem, 1)
                return found.name if found else None

        try:
            for _ in range(2):
                seen += [await read(a), await read(b)]
            async with factory() as session:
                await session.connection(execution_options=_tenant(b))
                item = await session.get(StItem, 1)
                assert item is not None
                item.name = "b async"
                await session.commit()
            seen += [await read(a), await read(b)]
            hits = cache.stats().hits
        finally:
            await client.aclose()
            await aengine.dispose()
        return [*seen, hits > 0]

    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(scenario()) == [a, b, a, b, a, "b async", True]
    finally:
        loop.close()


# ----------------------------------------------- statements outside the unit of work

#: where a test gives the tenant's map: on the statement, in ``session.execute(...,
#: execution_options=...)``, on the session's connection, on the engine the session is bound to
WHERE = ("statement", "execute", "connection", "engine")


def _rows(engine: Engine, schema: str | None) -> dict[int, Any]:
    """What the database holds in rows 1 and 2 of a tenant, read without the cache."""
    with engine.connect() as conn:
        if schema is not None:
            conn = conn.execution_options(**_tenant(schema))
        found = {i: n for i, n in conn.execute(select(StItem.id, StItem.name)).all()}
        return {pk: found.get(pk) for pk in (1, 2)}


def _served(maker: sessionmaker[Session], engine: Engine, schema: str | None) -> dict[int, Any]:
    """What ``session.get`` returns for rows 1 and 2 in a tenant (None: the default schema);
    asserts the second read of each came from the cache."""
    served: dict[int, Any] = {}
    options = _tenant(schema) if schema is not None else {}
    for pk in (1, 2):
        for attempt in range(2):
            with maker() as session, capture_sql(engine) as sql:
                found = session.get(StItem, pk, execution_options=options)
                served[pk] = found.name if found else None
            if attempt and found is not None:
                assert sql == [], "the second read is served from the cache"
    return served


def _bulk(session: Session, path: str, where: str, schema: str) -> None:
    """One statement outside the unit of work (or a flush, for comparison), with the tenant's
    map given ``where``."""
    on_statement = _tenant(schema) if where == "statement" else {}
    on_execute = _tenant(schema) if where == "execute" else {}
    if where == "connection":
        session.connection(execution_options=_tenant(schema))
    rows = [{"id": 1, "name": "X"}, {"id": 2, "name": "X"}]
    table = StItem.__table__
    if path == "update by pk":
        stmt = update(StItem).execution_options(**on_statement)
        session.execute(stmt, rows, execution_options=on_execute)
    elif path == "update where":
        stmt = update(StItem).where(StItem.id == 1).values(name="X")
        session.execute(stmt.execution_options(**on_statement), execution_options=on_execute)
    elif path == "delete where":
        stmt = sa.delete(StItem).where(StItem.id == 1)
        session.execute(stmt.execution_options(**on_statement), execution_options=on_execute)
    elif path == "insert":
        stmt = sa.insert(StItem).execution_options(**on_statement)
        session.execute(stmt, [{"id": 2, "name": "X"}], execution_options=on_execute)
    elif path == "core update":
        stmt = table.update().where(table.c.id == 1).values(name="X")
        session.execute(stmt.execution_options(**on_statement), execution_options=on_execute)
    elif path == "bulk_update_mappings":
        session.bulk_update_mappings(StItem, rows)  # type: ignore[arg-type]
    elif path == "bulk_save_objects":
        items = [session.get(StItem, 1), session.get(StItem, 2)]
        for item in items:
            assert item is not None
            item.name = "X"
        session.bulk_save_objects(items)
    else:
        assert path == "flush"
        found = session.get(StItem, 1, execution_options={**on_statement, **on_execute})
        assert found is not None
        found.name = "X"


#: the paths that take no execution options of a statement
_NO_STATEMENT = {"bulk_update_mappings", "bulk_save_objects"}
#: (path, where) whose SQL SQLAlchemy (2.0 and 2.1) renders without the map: a bulk UPDATE by
#: primary key ignores ``session.execute``'s execution options (only the statement's and the
#: connection's reach its SQL); a flush uses its connection's, never a load's
_DEFAULT_SCHEMA = {("update by pk", "execute"), ("flush", "statement"), ("flush", "execute")}


@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize(
    "path",
    ["update by pk", "update where", "delete where", "insert", "core update",
     "bulk_update_mappings", "bulk_save_objects", "flush"],
)  # fmt: skip
def test_a_statement_with_a_tenants_map_leaves_no_tenant_stale(
    maker: sessionmaker[Session],
    engine: Engine,
    schemas: tuple[str, str],
    path: str,
    where: str,
) -> None:
    """Whichever table SQLAlchemy writes (the SQL says), every tenant is then served what its
    own table holds: the entries of the table written are invalidated or written through, the
    others stay served."""
    if path in _NO_STATEMENT and where in ("statement", "execute"):
        pytest.skip(f"{path} takes no execution options")
    a, b = schemas
    with engine.begin() as conn:  # row 2 in every schema (row 1 is there already)
        for schema in (None, a, b):
            tenant = conn.execution_options(**_tenant(schema)) if schema else conn
            if path == "insert":
                tenant.execute(StItem.__table__.delete().where(StItem.id == 2))
            else:
                tenant.execute(StItem.__table__.insert(), {"id": 2, "name": f"{schema} 2"})
    before = {schema: _served(maker, engine, schema) for schema in (None, a, b)}
    bind = engine.execution_options(**_tenant(a)) if where == "engine" else engine
    with maker(bind=bind) as session, capture_sql(engine) as sql:  # an OptionEngine's too
        _bulk(session, path, where, a)
        session.commit()
    written = [s for s in sql if s.lstrip().split()[0].upper() in ("INSERT", "UPDATE", "DELETE")]
    assert written, "the path wrote"
    expected = None if (path, where) in _DEFAULT_SCHEMA else a
    for statement in written:  # SQLAlchemy's behaviour, pinned: which table it wrote
        assert (a in statement) == (expected == a), statement
    changed = _rows(engine, expected)
    assert changed != before[expected], "the rows written changed"
    for schema in (None, a, b):
        assert _served(maker, engine, schema) == _rows(engine, schema), schema
    assert _rows(engine, b) == before[b]


@pytest.mark.parametrize("path", ["update by pk", "update where", "flush"])
def test_a_shared_table_is_one_entry_whatever_map_names_it(
    maker: sessionmaker[Session], engine: Engine, schemas: tuple[str, str], path: str
) -> None:
    """A table in a schema the map does not translate is the same table with or without the
    map (SQLAlchemy renders its own schema): a tenant's write to it is seen by a session with
    no map and by another tenant's, and the other way round."""
    a, b = schemas

    def plan(schema: str | None) -> Any:
        with maker() as session:
            if schema is not None:
                session.connection(execution_options=_tenant(schema))
            found = session.get(StPlan, 1)
            return found.name if found else None

    def write(schema: str | None, name: str) -> None:
        with maker() as session:
            if schema is not None:
                session.connection(execution_options=_tenant(schema))
            if path == "update by pk":
                session.execute(update(StPlan), [{"id": 1, "name": name}])
            elif path == "update where":
                session.execute(update(StPlan).where(StPlan.id == 1).values(name=name))
            else:
                found = session.get(StPlan, 1)
                assert found is not None
                found.name = name
            session.commit()

    for writer, name in ((a, "by a"), (None, "by nobody"), (b, "by b")):
        for reader in (None, a, b):  # every entry warm
            plan(reader)
        write(writer, name)
        for reader in (None, a, b):
            assert plan(reader) == name, (writer, reader)
    with capture_sql(engine) as sql:
        assert plan(None) == plan(a) == plan(b) == "by b"
    assert sql == [], "served from the cache"


# -- ORM bulk UPDATE by primary key with the map only in session.execute()'s options --------
# Found by ``python -m stress --tenants``: SQLAlchemy (2.0 and 2.1) runs that UPDATE without
# the map, on the default schema (plain sessions too, without the cache), so the tenant's row
# keeps its value and the default schema's row changes. The strict xfails flag the day that
# changes; the same map on the statement, ``update(M).execution_options(...)``, reaches the
# tenant; and the cache answers each schema's row as its database holds it either way.

KNOWN = (
    "known: SQLAlchemy's ORM bulk UPDATE by primary key ignores a schema_translate_map given "
    "only in session.execute()'s execution_options (it writes the default schema)"
)


def _bulk_names(engine: Engine, schema: str) -> tuple[str | None, str | None]:
    """(the tenant's row 1, the default schema's row 1), straight from the database."""
    stmt = select(StItem.name).where(StItem.id == 1)
    with engine.connect() as conn:
        default = conn.scalar(stmt)
    with engine.connect() as conn:  # Connection.execution_options() changes conn itself
        return conn.execution_options(**_tenant(schema)).scalar(stmt), default


@pytest.mark.xfail(strict=True, reason=KNOWN)
def test_bulk_update_by_pk_with_the_map_in_execute_options_writes_the_tenant(
    maker: sessionmaker[Session],
    engine: Engine,
    schemas: tuple[str, str],
) -> None:
    a, _b = schemas
    with maker() as session:
        session.execute(update(StItem), [{"id": 1, "name": "a bulk"}], execution_options=_tenant(a))
        session.commit()
    assert _bulk_names(engine, a) == ("a bulk", "default")


@pytest.mark.xfail(strict=True, reason=KNOWN)
def test_without_the_cache_too(engine: Engine, schemas: tuple[str, str]) -> None:
    """The same statement through a plain Session: SQLAlchemy's own behaviour."""
    a, _b = schemas
    with Session(engine) as session:
        session.execute(update(StItem), [{"id": 1, "name": "a bulk"}], execution_options=_tenant(a))
        session.commit()
    assert _bulk_names(engine, a) == ("a bulk", "default")


def test_the_map_on_the_statement_writes_the_tenant(
    maker: sessionmaker[Session],
    engine: Engine,
    schemas: tuple[str, str],
) -> None:
    """The workaround: the map on the statement itself."""
    a, _b = schemas
    with maker() as session:
        session.execute(update(StItem).execution_options(**_tenant(a)), [{"id": 1, "name": "a"}])
        session.commit()
    assert _bulk_names(engine, a) == ("a", "default")


def test_bulk_update_by_pk_leaves_no_stale_entry_whichever_schema_it_wrote(
    maker: sessionmaker[Session],
    engine: Engine,
    schemas: tuple[str, str],
) -> None:
    """Whatever schema the UPDATE reached, the cache answers each schema's row as its
    database holds it afterwards (every entry warmed first)."""
    a, _b = schemas
    for _ in range(2):  # warm: the second round from the cache
        with maker() as session:
            assert session.get(StItem, 1, execution_options=_tenant(a)) is not None
            assert session.get(StItem, 1) is not None
    with maker() as session:
        session.execute(update(StItem), [{"id": 1, "name": "a bulk"}], execution_options=_tenant(a))
        session.commit()
    in_tenant, in_default = _bulk_names(engine, a)
    with maker() as session:
        found = session.get(StItem, 1, execution_options=_tenant(a))
        assert found is not None and found.name == in_tenant
    with maker() as session:
        found = session.get(StItem, 1)
        assert found is not None and found.name == in_default


@pytest.mark.parametrize("writer", ["no map", "map"])
def test_a_map_naming_the_default_schema_shares_the_entries_of_no_map(
    maker: sessionmaker[Session], engine: Engine, schemas: tuple[str, str], writer: str
) -> None:
    """``{None: "public"}`` on PostgreSQL (``{None: <the database>}`` on MariaDB) reaches the
    tables no map reaches: a commit through either is seen through the other."""
    query = (
        "SELECT current_schema()" if engine.dialect.name == "postgresql" else "SELECT DATABASE()"
    )
    with engine.connect() as conn:
        default = conn.exec_driver_sql(query).scalar()
    assert default
    options = {"schema_translate_map": {None: default}}

    def read(mapped: bool) -> Any:
        with maker() as session:
            found = session.get(StItem, 1, execution_options=options if mapped else {})
            return found.name if found else None

    for mapped in (False, True, False, True):  # both entries warm
        assert read(mapped) == "default"
    with maker() as session:
        if writer == "map":
            session.connection(execution_options=options)
        found = session.get(StItem, 1)
        assert found is not None
        found.name = f"by {writer}"
        session.commit()
    with capture_sql(engine) as sql:
        assert read(False) == read(True) == f"by {writer}"
    assert sql == [], "served from the cache"
