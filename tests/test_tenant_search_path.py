"""One schema per tenant chosen outside ``schema_translate_map``: PostgreSQL's ``search_path``
(``connect_args={"options": "-csearch_path=..."}`` or a pool "connect" listener running ``SET
search_path``) and MariaDB's ``USE`` (in a "connect" listener). Two engines on one URL reach
different tables under one unqualified name, so they are two databases to the cache: a tenant
is never served another tenant's row (invariant 10), and its commits change its own entries
only. An engine on the server's default schema keeps the name it always had (a process of an
older version and one of this version share its entries). A statement switching the schema
mid-connection (``SET search_path``, ``set_config('search_path', ...)``, ``USE``) through a
session is seen: the rest of its transaction reads from the database, and the pool never hands
that connection to another session with the switched schema.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy import String, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_writethrough import CachedModel, WriteThroughCache

from _servers import capture_sql

pytestmark = pytest.mark.databases("postgresql", "mariadb")


class SpBase(DeclarativeBase):
    pass


class SpItem(SpBase, CachedModel):
    """No schema: the table an unqualified name reaches."""

    __tablename__ = "sp_item"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))


#: a schema every tenant shares, named on the model
SHARED = f"sp_shared_{uuid.uuid4().hex[:6]}"


class SpPlan(SpBase, CachedModel):
    __tablename__ = "sp_plan"
    __table_args__ = {"schema": SHARED}

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))


def _drop(engine: Engine, name: str) -> str:
    # MariaDB's DROP SCHEMA (a database) drops its tables and takes no CASCADE
    cascade = " CASCADE" if engine.dialect.name == "postgresql" else ""
    return f"DROP SCHEMA IF EXISTS {name}{cascade}"


@pytest.fixture
def schemas(engine: Engine) -> Iterator[tuple[str, str]]:
    """Two tenants' schemas (per run), each with its own sp_item holding row 1 named after it;
    the default schema's sp_item holds row 1 named "default"; the shared plan 1 "shared"."""
    names = (f"sp_a_{uuid.uuid4().hex[:6]}", f"sp_b_{uuid.uuid4().hex[:6]}")
    with engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {SHARED}")
        SpBase.metadata.drop_all(conn)
        SpBase.metadata.create_all(conn)
        conn.execute(SpItem.__table__.insert(), {"id": 1, "name": "default"})
        conn.execute(SpPlan.__table__.insert(), {"id": 1, "name": "shared"})
        for name in names:
            conn.exec_driver_sql(f"CREATE SCHEMA {name}")
            tenant = conn.execution_options(schema_translate_map={None: name})
            SpBase.metadata.create_all(tenant, tables=[SpItem.__table__])
            tenant.execute(SpItem.__table__.insert(), {"id": 1, "name": name})
    try:
        yield names
    finally:
        with engine.begin() as conn:
            for name in names:
                conn.exec_driver_sql(_drop(engine, name))
            SpBase.metadata.drop_all(conn)
            conn.exec_driver_sql(_drop(engine, SHARED))


@pytest.fixture
def cache(redis_url: str, prefix: str) -> Iterator[WriteThroughCache]:
    client = redis.Redis.from_url(redis_url, socket_timeout=1)
    try:
        yield WriteThroughCache(client, prefix=prefix)
    finally:
        client.close()


@pytest.fixture
def maker(cache: WriteThroughCache) -> Iterator[sessionmaker[Session]]:
    factory = sessionmaker()
    cache.install(factory)
    try:
        yield factory
    finally:
        cache.uninstall(factory)


Tenant = Callable[[str], Engine]


def _switch(engine: Engine, schema: str) -> str:
    if engine.dialect.name == "postgresql":
        return f"SET search_path TO {schema}"
    return f"USE {schema}"


@pytest.fixture(params=["connect_args", "listener"])
def tenant(request: pytest.FixtureRequest, engine: Engine) -> Iterator[Tenant]:
    """``tenant(schema)``: an engine on ``engine``'s URL whose connections reach ``schema``'s
    tables by unqualified names, by ``connect_args`` (PostgreSQL only) or by a pool "connect"
    listener."""
    made: list[Engine] = []

    def make(schema: str) -> Engine:
        if request.param == "connect_args":
            if engine.dialect.name != "postgresql":
                pytest.skip("MariaDB takes the database from the URL: the listener's USE")
            made.append(
                sa.create_engine(engine.url, connect_args={"options": f"-csearch_path={schema}"})
            )
        else:
            made.append(sa.create_engine(engine.url))

            @event.listens_for(made[-1], "connect", insert=True)
            def choose(dbapi_connection: Any, record: Any) -> None:
                # SQLAlchemy's recipe: in autocommit, so that no rollback undoes the SET
                autocommit = dbapi_connection.autocommit
                dbapi_connection.autocommit = True
                cursor = dbapi_connection.cursor()
                cursor.execute(_switch(engine, schema))
                cursor.close()
                dbapi_connection.autocommit = autocommit

        return made[-1]

    try:
        yield make
    finally:
        for each in made:
            each.dispose()


def served(maker: sessionmaker[Session], bind: Engine, model: Any = SpItem) -> tuple[Any, int]:
    """(the name ``session.get`` returns, how many SQL statements it sent)."""
    with maker(bind=bind) as session, capture_sql(bind) as sql:
        found = session.get(model, 1)
        return (found.name if found else None), len(sql)


def rename(maker: sessionmaker[Session], bind: Engine, name: str, model: Any = SpItem) -> None:
    with maker(bind=bind) as session:
        found = session.get(model, 1)
        assert found is not None
        found.name = name
        session.commit()


def test_each_tenant_is_served_its_own_row(
    maker: sessionmaker[Session], engine: Engine, schemas: tuple[str, str], tenant: Tenant
) -> None:
    a, b = schemas
    one, two = tenant(a), tenant(b)
    assert served(maker, one) == (a, 1)
    assert served(maker, two) == (b, 1), "tenant B was served tenant A's row"
    assert served(maker, engine) == ("default", 1)
    assert served(maker, one) == (a, 0), "served from the cache"
    assert served(maker, two) == (b, 0), "served from the cache"
    assert served(maker, engine) == ("default", 0), "served from the cache"


def test_a_commit_in_one_tenant_changes_its_own_entry_only(
    maker: sessionmaker[Session], engine: Engine, schemas: tuple[str, str], tenant: Tenant
) -> None:
    a, b = schemas
    one, two = tenant(a), tenant(b)
    for bind in (one, two, engine):  # warm every entry
        served(maker, bind)
    rename(maker, one, "a changed")
    assert served(maker, one) == ("a changed", 0), "written through"
    assert served(maker, two) == (b, 0)
    assert served(maker, engine) == ("default", 0)
    rename(maker, two, "b changed")
    assert served(maker, one) == ("a changed", 0)
    assert served(maker, two) == ("b changed", 0)
    with engine.connect() as conn:
        for schema, name in ((a, "a changed"), (b, "b changed"), (None, "default")):
            read = conn.execution_options(schema_translate_map={None: schema})
            assert read.scalar(sa.select(SpItem.name).where(SpItem.id == 1)) == name


def test_a_shared_table_named_on_the_model_is_one_entry_for_every_tenant(
    maker: sessionmaker[Session], engine: Engine, schemas: tuple[str, str], tenant: Tenant
) -> None:
    """The schema chosen by the connection moves unqualified names only: a commit to a table
    every tenant shares is seen by every tenant (and by the default engine)."""
    a, b = schemas
    one, two = tenant(a), tenant(b)
    for bind in (one, two, engine):
        assert served(maker, bind, SpPlan)[0] == "shared"
    rename(maker, one, "changed by a", SpPlan)
    for bind in (one, two, engine):
        assert served(maker, bind, SpPlan) == ("changed by a", 0)


def test_the_schema_chosen_by_the_connection_or_by_the_map_is_one_database(
    cache: WriteThroughCache,
    maker: sessionmaker[Session],
    engine: Engine,
    schemas: tuple[str, str],
    tenant: Tenant,
) -> None:
    """A tenant reached by its connection's schema and by ``schema_translate_map`` on the
    default engine reads the same rows: one entry, so a commit through either is seen by both."""
    a, _ = schemas
    by_path = tenant(a)
    by_map = engine.execution_options(schema_translate_map={None: a})
    assert cache._databases.of(by_path) == cache._databases.of(by_map)
    assert served(maker, by_path)[0] == a
    rename(maker, by_map, "a by map")
    assert served(maker, by_path) == ("a by map", 0)


def test_the_default_schema_keeps_its_name(cache: WriteThroughCache, engine: Engine) -> None:
    """An engine on the server's default schema is named as before (no cold cache, and a
    process of an older version shares its entries), and so is one derived from it by
    ``execution_options()``, asked no second time."""
    with engine.connect() as conn:
        if engine.dialect.name == "postgresql":
            assert conn.scalar(text("SELECT current_schema()")) == "public"
            server = conn.scalar(text("SELECT system_identifier::text FROM pg_control_system()"))
            expected = f"postgresql:server={server}/{engine.url.database}"
        else:
            host, port = conn.execute(text("SELECT @@hostname, @@port")).one()
            expected = f"mysql:server={host}:{port}/{engine.url.database}"
    assert cache._databases.identity(engine) == expected
    derived = engine.execution_options(isolation_level="AUTOCOMMIT")
    with capture_sql(derived) as sql:
        assert cache._databases.identity(derived) == expected
    assert sql == []


def test_a_pool_is_asked_once(
    cache: WriteThroughCache, engine: Engine, tenant: Tenant, schemas: tuple[str, str]
) -> None:
    """Asking the server costs one connection per pool, not per engine or per naming."""
    connects: list[object] = []
    one = tenant(schemas[0])
    event.listen(one, "connect", lambda *args: connects.append(args))
    cache._databases.of(one)
    cache._databases.of(one.execution_options(isolation_level="AUTOCOMMIT"))
    cache._databases.renamed(one, {"schema_translate_map": {None: schemas[1]}})
    assert len(connects) == 1


# --------------------------------------------------- a schema switched mid-connection


@pytest.fixture
def warnings(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, logger="sqlalchemy_writethrough")
    return caplog


@pytest.mark.parametrize("how", ["set", "set_config", "driver_sql"])
def test_a_schema_switched_by_a_statement_is_never_served_another_tenants_row(
    maker: sessionmaker[Session],
    engine: Engine,
    schemas: tuple[str, str],
    warnings: pytest.LogCaptureFixture,
    how: str,
) -> None:
    """``SET search_path`` / ``USE`` through a session: what it reads next is the switched
    schema's row, never the default's entry, and its commit leaves no row of the switched
    schema under the default's name; a transaction begun later on that connection reads from
    the database too; a warning (once per engine) says how to name the tenant."""
    a, _ = schemas
    if how == "set_config" and engine.dialect.name != "postgresql":
        pytest.skip("set_config is PostgreSQL's")
    one = sa.create_engine(engine.url, pool_size=1, max_overflow=0)
    other = sa.create_engine(engine.url)  # a connection on the default schema
    try:
        assert served(maker, one) == ("default", 1)
        assert served(maker, one) == ("default", 0)
        for name in ("a changed", "a changed again"):
            with maker(bind=one) as session:
                if how == "set":
                    session.execute(text(_switch(one, a)))
                elif how == "set_config":
                    session.execute(text(f"SELECT set_config('search_path', '{a}', false)"))
                else:
                    session.connection().exec_driver_sql(_switch(one, a))
                found = session.get(SpItem, 1)
                assert found is not None and found.name != "default", "served the default's entry"
                found.name = name
                session.commit()
            with maker(bind=one) as session:  # the pool's one connection, still switched
                session.connection()
                found = session.get(SpItem, 1)
                assert found is not None and found.name == name
                found.name = name  # (no change: the loop's next turn switches again)
            assert served(maker, other)[0] == "default", "a tenant's row under the default's name"
            assert served(maker, other) == ("default", 0)
        switched = [
            r.getMessage() for r in warnings.records if "schema_translate_map" in r.getMessage()
        ]
        assert len(switched) == 1, [r.getMessage() for r in warnings.records]
    finally:
        one.dispose()
        other.dispose()


@pytest.mark.databases("postgresql")
def test_set_local_switches_for_its_transaction_only(
    maker: sessionmaker[Session], engine: Engine, schemas: tuple[str, str]
) -> None:
    """``SET LOCAL search_path`` ends with its transaction: that transaction reads from the
    database, and the next one on the same connection (back on the default schema) is served
    from the cache again."""
    a, _ = schemas
    one = sa.create_engine(engine.url, pool_size=1, max_overflow=0)
    try:
        assert served(maker, one) == ("default", 1)
        with maker(bind=one) as session:
            session.execute(text(f"SET LOCAL search_path TO {a}"))
            found = session.get(SpItem, 1)
            assert found is not None and found.name == a
        assert served(maker, one) == ("default", 0)
        with maker(bind=one) as session:
            session.connection()
            with capture_sql(one) as sql:
                found = session.get(SpItem, 1)
            assert found is not None and found.name == "default" and sql == []
    finally:
        one.dispose()


def test_a_switch_on_a_connection_outside_sessions_is_remembered_by_the_pool(
    maker: sessionmaker[Session], engine: Engine, schemas: tuple[str, str]
) -> None:
    """A ``SET search_path`` / ``USE`` on a plain connection of an engine sessions use leaves
    its pooled connection switched: a session's transaction on it reads the switched schema's
    row from the database, not the default's entry."""
    a, _ = schemas
    one = sa.create_engine(engine.url, pool_size=1, max_overflow=0)
    try:
        assert served(maker, one) == ("default", 1)  # (sessions use the engine)
        with one.connect() as conn:
            conn.exec_driver_sql(_switch(one, a))
            conn.commit()
        with maker(bind=one) as session:
            session.connection()
            found = session.get(SpItem, 1)
            assert found is not None and found.name == a, "served the default's entry"
    finally:
        one.dispose()
