"""SQLite databases a "connect" listener ATTACHes (a database per tenant, a shared catalogue
file), and TEMP triggers and views it creates on every connection: the cache read only the
``main`` database's catalog, of the file, on a connection of its own. A trigger in an
attached database was not seen (the values the flush sent were written through and served
where the database held the trigger's), nor a view there (served after the table under it
changed), nor a TEMP trigger on a table of ``main``.

On a sync driver the cache now reads the catalog on a connection made like the engine's
(its listeners run), of every database it has. What is observed: what a get returns against
a load without the cache, the SQL a get emits, and the reason ``cache.models()`` gives.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import String, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from sqlalchemy_writethrough import CachedModel

from _cache_helpers import cache_on
from _servers import capture_sql

pytestmark = pytest.mark.databases("sqlite")


class Base(DeclarativeBase):
    pass


class SaFolded(Base, CachedModel):
    """In the attached database; its trigger there folds email."""

    __tablename__ = "sa_folded"
    __table_args__ = {"schema": "tenant"}
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(60))


class SaStamped(Base, CachedModel):
    """In ``main``; a TEMP trigger each connection creates folds email."""

    __tablename__ = "sa_stamped"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(60))


class SaLabel(Base, CachedModel):
    """A view in the attached database (not created by the metadata)."""

    __table__ = sa.Table(
        "sa_label",
        sa.MetaData(),
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("email", String(60)),
        schema="tenant",
    )


def _engine(tmp_path: Path, temp_trigger: bool) -> Engine:
    """An engine on ``main.db`` whose connections ATTACH ``tenant.db`` as ``tenant`` (and
    create a TEMP trigger on ``main.sa_stamped``)."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'main.db'}")

    @event.listens_for(engine, "connect")
    def attach(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.execute(f"ATTACH DATABASE '{tmp_path / 'tenant.db'}' AS tenant")
        if temp_trigger:
            dbapi_connection.execute(
                "CREATE TEMP TRIGGER sa_stamped_fold AFTER UPDATE OF email ON main.sa_stamped "
                "BEGIN UPDATE sa_stamped SET email = lower(NEW.email) WHERE id = NEW.id; END"
            )

    return engine


@pytest.fixture
def attached(tmp_path: Path) -> Iterator[Engine]:
    """The application's engine, on tables, a trigger and a view made beforehand."""
    setup = _engine(tmp_path, temp_trigger=False)
    Base.metadata.create_all(setup)
    with setup.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TRIGGER tenant.sa_folded_fold AFTER UPDATE OF email ON sa_folded BEGIN "
            "UPDATE sa_folded SET email = lower(NEW.email) WHERE id = NEW.id; END"
        )
        conn.exec_driver_sql("CREATE VIEW tenant.sa_label AS SELECT id, email FROM sa_folded")
    setup.dispose()
    engine = _engine(tmp_path, temp_trigger=True)
    yield engine
    engine.dispose()


@pytest.mark.parametrize("model", [SaFolded, SaStamped])
def test_a_trigger_of_an_attached_database_or_a_temp_one_is_read_as_it_stored(
    attached: Engine, redis_url: str, prefix: str, model: Any
) -> None:
    with cache_on(attached, redis_url, prefix) as (cache, made):
        with made() as session:
            session.add(model(id=1, email="ann"))
            session.commit()
        with made() as session:
            session.get(model, 1).email = "BOB"
            session.commit()
        with made() as session, Session(attached) as plain:
            assert session.get(model, 1).email == plain.get(model, 1).email == "bob"
        table = "tenant.sa_folded" if model is SaFolded else "main.sa_stamped"
        reason = cache.models(attached)[model].commits_invalidate_because
        assert f"a trigger of {table} may change the rows a flush writes" in reason


def test_a_view_of_an_attached_database_is_not_served(
    attached: Engine, redis_url: str, prefix: str
) -> None:
    with cache_on(attached, redis_url, prefix) as (cache, made):
        with made() as session:
            session.add(SaFolded(id=1, email="ann"))
            session.commit()
        for _ in range(2):
            with made() as session, capture_sql(attached) as statements:
                assert session.get(SaLabel, 1).email == "ann"
            assert len(statements) == 1  # from the database, every time
        assert "tenant.sa_label is a view" in cache.models(attached)[SaLabel].not_served_because


def test_with_aiosqlite_an_attached_databases_trigger_is_read_as_it_stored(
    attached: Engine, redis_url: str, prefix: str, loop: Any
) -> None:
    """aiosqlite's connections must be awaited: the catalog was read from the file's ``main``
    database alone. The cache asks in SQLAlchemy's greenlet, where an AsyncSession's loads
    and flushes run, on a connection made like the engine's."""
    pytest.importorskip("aiosqlite")
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    from sqlalchemy_writethrough import WriteThroughCache

    path = attached.url.database

    async def scenario() -> tuple[str, str, str]:
        engine = create_async_engine(f"sqlite+aiosqlite:///{path}")

        @event.listens_for(engine.sync_engine, "connect")
        def attach(dbapi_connection: Any, record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute(f"ATTACH DATABASE '{Path(str(path)).parent / 'tenant.db'}' AS tenant")
            cursor.close()

        cache = WriteThroughCache(redis_url, prefix=prefix, stats_interval=None)
        made = async_sessionmaker(engine, expire_on_commit=False)
        cache.install(made)
        try:
            async with made() as session:
                session.add(SaFolded(id=1, email="ann"))
                await session.commit()
            async with made() as session:
                (await session.get(SaFolded, 1)).email = "BOB"
                await session.commit()
            async with made() as session:
                cached = (await session.get(SaFolded, 1)).email
            with Session(attached) as plain:
                fresh = plain.get(SaFolded, 1).email
            reason = cache.models(engine.sync_engine)[SaFolded].commits_invalidate_because
            return cached, fresh, reason
        finally:
            cache.uninstall(made)
            await cache.aclose()
            await engine.dispose()

    cached, fresh, reason = loop.run_until_complete(scenario())
    assert cached == fresh == "bob"
    assert "a trigger of tenant.sa_folded may change the rows a flush writes" in reason
