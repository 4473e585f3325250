"""PostgreSQL's row-level security: which rows a session sees depends on its role and its
settings (a tenant set with ``SET LOCAL`` at ``after_begin``, as multi-tenant applications
do), and the cache cannot know them. A row cached from one tenant's commit was served to
another tenant's ``get``, where the database returns nothing.

A table with row security enabled is never read from the cache on that database: its loads go
to the database (which applies the policies), and the cache says so once. Tables without it,
in the same database, are served as always.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import String, event, make_url
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_writethrough import CachedModel, WriteThroughCache

from _cache_helpers import entry_key, entry_state
from _servers import capture_sql, reset_schema

pytestmark = pytest.mark.databases("postgresql")


class Base(DeclarativeBase):
    pass


class RsDoc(Base, CachedModel):
    """Each tenant sees its own rows only (the policy below)."""

    __tablename__ = "rs_doc"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    tenant: Mapped[int]
    body: Mapped[str] = mapped_column(String(40))


class RsPlan(Base, CachedModel):
    """Shared by every tenant: no row security."""

    __tablename__ = "rs_plan"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))


@pytest.fixture
def app_engine(engine: Engine) -> Iterator[Engine]:
    """An engine of a role of this run's that owns no table, so that the policies apply."""
    reset_schema(engine, Base.metadata)
    role = f"wt_rs_{uuid.uuid4().hex[:8]}"
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(f"CREATE ROLE {role} LOGIN")
    except sa.exc.ProgrammingError as exc:  # a server user without CREATEROLE
        pytest.skip(f"cannot create a role of this run's: {exc}")
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE rs_doc ENABLE ROW LEVEL SECURITY")
        conn.exec_driver_sql(
            "CREATE POLICY by_tenant ON rs_doc "
            "USING (tenant = current_setting('wt.tenant', true)::int)"
        )
        conn.exec_driver_sql(f"GRANT ALL ON rs_doc, rs_plan TO {role}")
    app = sa.create_engine(make_url(str(engine.url.render_as_string(False))).set(username=role))
    try:
        with app.connect():
            pass
    except sa.exc.OperationalError as exc:  # a server that wants a password for it
        app.dispose()
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE IF EXISTS rs_doc, rs_plan")
            conn.exec_driver_sql(f"DROP ROLE IF EXISTS {role}")
        pytest.skip(f"cannot log in as a role of this run's: {exc}")
    try:
        yield app
    finally:
        app.dispose()
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE IF EXISTS rs_doc, rs_plan")
            conn.exec_driver_sql(f"DROP ROLE IF EXISTS {role}")


def tenant_sessions(app_engine: Engine, current: dict[str, int]) -> sessionmaker[Session]:
    maker = sessionmaker(app_engine)

    @event.listens_for(maker, "after_begin")
    def set_tenant(session: Session, transaction: Any, connection: Any) -> None:
        connection.exec_driver_sql(f"SET LOCAL wt.tenant = '{current['tenant']}'")

    return maker


def test_a_row_secured_table_is_never_served_from_the_cache(
    app_engine: Engine, redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    current = {"tenant": 1}
    maker = tenant_sessions(app_engine, current)
    plain = tenant_sessions(app_engine, current)
    cache = WriteThroughCache(redis_url, prefix=prefix)
    cache.install(maker)
    caplog.set_level(logging.WARNING, logger="sqlalchemy_writethrough")
    try:
        with maker() as s:
            s.add_all([RsDoc(id=1, tenant=1, body="tenant 1's"), RsPlan(id=1, name="basic")])
            s.commit()
        current["tenant"] = 2
        for m in (plain, maker):  # what the database says, then what the cache's session says
            with m() as s:
                assert s.get(RsDoc, 1) is None  # tenant 2 may not see it
        current["tenant"] = 1
        with maker() as s, capture_sql(app_engine) as sql:
            doc = s.get(RsDoc, 1)
            assert doc is not None and doc.body == "tenant 1's"
            plan = s.get(RsPlan, 1)  # the shared table: from the cache
            assert plan is not None and plan.name == "basic"
        assert [q for q in sql if "rs_doc" in q] and not [q for q in sql if "rs_plan" in q]
        stats = cache.stats().models
        assert stats["RsDoc"].hits == 0 and stats["RsPlan"].hits == 1
        warned = [r.getMessage() for r in caplog.records if "row-level security" in r.getMessage()]
        assert len(warned) == 1 and "rs_doc" in warned[0], caplog.text
        report = cache.models(app_engine)  # what cache.models() says, per database
        assert not report[RsDoc].loads_served and report[RsPlan].loads_served
        assert report[RsDoc].not_served_because == "row-level security on public.rs_doc"
        assert "loads go to the database (row-level security on public.rs_doc)" in str(report)
        assert cache.models(app_engine.dialect)[RsDoc].loads_served  # no database: not asked
    finally:
        cache.uninstall(maker)
        cache.redis.close()


def test_a_row_secured_table_rows_are_never_copied_into_redis(
    app_engine: Engine, redis_url: str, prefix: str, redis_client: Any
) -> None:
    """Nothing reads a row-secured table's entries, so its commits write none: a tenant's
    rows are not copied into Redis, where anyone who can read Redis would see every tenant's
    (a commit leaves the key a miss, as ``strategy="invalidate"`` does); the shared table's
    rows are written through as always."""
    current = {"tenant": 1}
    maker = tenant_sessions(app_engine, current)
    cache = WriteThroughCache(redis_url, prefix=prefix)
    cache.install(maker)
    try:
        with maker() as s:
            s.add_all([RsDoc(id=1, tenant=1, body="secret"), RsPlan(id=1, name="basic")])
            s.commit()
        doc_key = entry_key(cache, RsDoc, 1, bind=app_engine)
        plan_key = entry_key(cache, RsPlan, 1, bind=app_engine)
        assert entry_state(redis_client, doc_key) is None
        assert entry_state(redis_client, plan_key) == "value"
        with maker() as s:  # an update, and a load in between
            doc = s.get(RsDoc, 1)
            assert doc is not None
            doc.body = "still secret"
            s.commit()
            assert doc.body == "still secret"
        assert entry_state(redis_client, doc_key) is None
        values = [
            redis_client.get(k)
            for k in redis_client.scan_iter(f"{prefix}:*")
            if redis_client.type(k) == b"string"
        ]
        assert not [v for v in values if v and b"secret" in v]
    finally:
        cache.uninstall(maker)
        cache.redis.close()
