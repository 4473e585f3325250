"""A trigger that changes the row being written (``BEFORE INSERT OR UPDATE``), as
docs/write-paths.md says to declare it:

- a column the trigger fills, which the flush does not send, declared as SQLAlchemy asks
  (``server_default=FetchedValue()``, ``server_onupdate=FetchedValue()``): the flush expires it,
  so the commit leaves a miss and the next get loads what the trigger stored; with
  ``eager_defaults=True`` the flush reads it back and it is written through;
- a value the flush sends and the trigger changes (``NEW.email = lower(NEW.email)``): nothing
  tells the ORM, so the model is given ``strategy="invalidate"``;
- the same trigger, undeclared: the cache asks the database which tables have such triggers
  (once per pool), and their commits invalidate as if declared (before: the value the flush
  sent was written into Redis and served, older than what the commit stored). A model whose
  options say its strategy is taken at its word.

What is observed: what a get returns, against a load without the cache.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from sqlalchemy import FetchedValue, String
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_writethrough import CachedModel, WriteThroughCache

from _cache_helpers import cache_on
from _servers import capture_sql, reset_schema

pytestmark = pytest.mark.databases("postgresql", "mariadb")


class Base(DeclarativeBase):
    pass


class TgStamped(Base, CachedModel):
    __tablename__ = "tg_stamped"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(60))
    # what the trigger writes: lower(email)
    folded: Mapped[str] = mapped_column(
        String(60), server_default=FetchedValue(), server_onupdate=FetchedValue()
    )


class TgEagerStamped(Base, CachedModel):
    __tablename__ = "tg_eager_stamped"
    __mapper_args__ = {"eager_defaults": True}
    # its trigger fills only a column declared as the trigger's: the flush reads it back, and
    # the model says its commits may write through (else a table with a trigger invalidates)
    __writethrough__ = {"strategy": "write-through"}
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(60))
    folded: Mapped[str] = mapped_column(
        String(60), server_default=FetchedValue(), server_onupdate=FetchedValue()
    )


class TgNormalised(Base, CachedModel):
    __tablename__ = "tg_normalised"
    __writethrough__ = {"strategy": "invalidate"}  # the trigger rewrites what the flush sent
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(60))
    folded: Mapped[str | None] = mapped_column(String(60))


class TgUndeclared(Base, CachedModel):
    """TgNormalised's trigger, and nothing said of it."""

    __tablename__ = "tg_undeclared"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(60))
    folded: Mapped[str | None] = mapped_column(String(60))


TRIGGERS = {  # table -> what the trigger sets
    "tg_stamped": ("folded", "lower(NEW.email)"),
    "tg_eager_stamped": ("folded", "lower(NEW.email)"),
    "tg_normalised": ("email", "lower(NEW.email)"),
    "tg_undeclared": ("email", "lower(NEW.email)"),
}


def _create_triggers(engine: Engine) -> None:
    with engine.begin() as conn:
        for table, (column, value) in TRIGGERS.items():
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql(
                    f"CREATE OR REPLACE FUNCTION {table}_fn() RETURNS trigger AS $$ "
                    f"BEGIN NEW.{column} := {value}; RETURN NEW; END $$ LANGUAGE plpgsql"
                )
                conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {table}_tg ON {table}")
                conn.exec_driver_sql(
                    f"CREATE TRIGGER {table}_tg BEFORE INSERT OR UPDATE ON {table} "
                    f"FOR EACH ROW EXECUTE FUNCTION {table}_fn()"
                )
            else:
                for when in ("INSERT", "UPDATE"):
                    name = f"{table}_{when.lower()}"
                    conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {name}")
                    conn.exec_driver_sql(
                        f"CREATE TRIGGER {name} BEFORE {when} ON {table} "
                        f"FOR EACH ROW SET NEW.{column} = {value}"
                    )


@pytest.fixture
def cache(engine: Engine, redis_url: str, prefix: str) -> Iterator[WriteThroughCache]:
    reset_schema(engine, Base.metadata)
    _create_triggers(engine)
    made = WriteThroughCache(redis_url, prefix=prefix, stats_interval=None)
    yield made
    made.close()


@pytest.fixture
def factory(engine: Engine, cache: WriteThroughCache) -> Iterator[sessionmaker[Session]]:
    made = sessionmaker(engine)
    cache.install(made)
    yield made
    cache.uninstall(made)


def _values(factory: sessionmaker[Session], model: type) -> tuple[tuple[str, str | None], int]:
    with factory() as session, capture_sql(session.get_bind()) as statements:
        row = session.get(model, 1)
        assert row is not None
        return (row.email, row.folded), len(statements)


@pytest.mark.parametrize("model", [TgStamped, TgEagerStamped, TgNormalised, TgUndeclared])
def test_a_row_trigger_is_read_as_it_stored(
    factory: sessionmaker[Session], engine: Engine, model: type
) -> None:
    with factory() as session:
        session.add(model(id=1, email="Ann@Example.COM"))
        session.commit()
    first, _ = _values(factory, model)
    assert _values(factory, model) == (first, 0)  # filled or written through: a hit now
    with factory() as session:
        row = session.get(model, 1)
        assert row is not None
        row.email = "Bob@Example.COM"
        session.commit()
    values, statements = _values(factory, model)
    with Session(engine) as plain:
        fresh = plain.get(model, 1)
        assert fresh is not None
        assert values == (fresh.email, fresh.folded)
    assert "bob@example.com" in values
    if model is TgEagerStamped:
        assert statements == 0  # the flush read the trigger's value back: written through


def test_an_undeclared_trigger_makes_the_commits_invalidate(
    factory: sessionmaker[Session], cache: WriteThroughCache, engine: Engine
) -> None:
    """What the cache says of it: the report names the trigger, the model's strategy is
    unchanged, and a commit leaves a miss (the next get reads what the trigger stored)."""
    with factory() as session:
        session.add(TgUndeclared(id=1, email="Ann@Example.COM"))
        session.commit()
    values, statements = _values(factory, TgUndeclared)
    assert values == ("ann@example.com", None) and statements == 1  # a miss, then a fill
    assert _values(factory, TgUndeclared) == (values, 0)  # loads are served
    report = cache.models(engine)
    info = report[TgUndeclared]
    assert info.options.strategy == "write-through"
    assert "tg_undeclared" in info.commits_invalidate_because
    assert "commits invalidate: " in str(report)
    for declared in (TgNormalised, TgEagerStamped):  # their options say: taken at their word
        assert report[declared].commits_invalidate_because == ""
    assert report[TgStamped].commits_invalidate_because != ""  # FetchedValue said, no strategy


@pytest.mark.databases("sqlite")
def test_a_sqlite_trigger_that_rewrites_its_own_row(
    engine: Engine, redis_url: str, prefix: str
) -> None:
    """SQLite's way to stamp a row: an ``AFTER UPDATE`` trigger that updates it. Every table
    of SQLite with a trigger is taken as rewriting its rows."""
    reset_schema(engine, Base.metadata)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TRIGGER tg_undeclared_fold AFTER UPDATE OF email ON tg_undeclared "
            "BEGIN UPDATE tg_undeclared SET email = lower(NEW.email) WHERE id = NEW.id; END"
        )
    with cache_on(engine, redis_url, prefix) as (_, made):
        with made() as session:
            session.add(TgUndeclared(id=1, email="ann"))
            session.commit()
        with made() as session:
            session.get(TgUndeclared, 1).email = "Bob"
            session.commit()
        with made() as session, Session(engine) as plain:
            assert session.get(TgUndeclared, 1).email == plain.get(TgUndeclared, 1).email == "bob"


@pytest.mark.databases("postgresql")
def test_a_postgresql_after_trigger_that_updates_its_own_row(
    engine: Engine, redis_url: str, prefix: str
) -> None:
    """PostgreSQL's way when the trigger needs the row as stored (a materialized path, which
    needs the row's key): an ``AFTER INSERT OR UPDATE`` trigger that updates the row again.
    The values the flush sent were written through, and served, where the database holds the
    trigger's (before: ``folded`` None in the cache, "ann" in the database). Every trigger on
    INSERT or UPDATE, before or after, row or statement, is taken as one that may change the
    rows written."""
    reset_schema(engine, Base.metadata)  # empties the tables: their triggers stay
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TRIGGER IF EXISTS tg_undeclared_tg ON tg_undeclared")
        conn.exec_driver_sql(
            "CREATE OR REPLACE FUNCTION tg_undeclared_after_fn() RETURNS trigger AS $$ BEGIN "
            "IF pg_trigger_depth() = 1 THEN "
            "UPDATE tg_undeclared SET folded = lower(NEW.email) WHERE id = NEW.id; END IF; "
            "RETURN NULL; END $$ LANGUAGE plpgsql"
        )
        conn.exec_driver_sql(
            "CREATE TRIGGER tg_undeclared_after AFTER INSERT OR UPDATE OF email ON tg_undeclared "
            "FOR EACH ROW EXECUTE FUNCTION tg_undeclared_after_fn()"
        )
    try:
        with cache_on(engine, redis_url, prefix) as (cache, made):
            with made() as session:
                session.add(TgUndeclared(id=1, email="Ann"))
                session.commit()
            assert _values(made, TgUndeclared)[0] == ("Ann", "ann")
            assert _values(made, TgUndeclared) == (("Ann", "ann"), 0)  # served once filled
            with made() as session:
                session.get(TgUndeclared, 1).email = "Bob"
                session.commit()
            assert _values(made, TgUndeclared)[0] == ("Bob", "bob")
            reasons = cache.models(engine)[TgUndeclared].commits_invalidate_because
            assert "tg_undeclared" in reasons
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TRIGGER IF EXISTS tg_undeclared_after ON tg_undeclared")


def test_a_cache_that_invalidates_anyway_says_nothing_of_the_trigger(
    engine: Engine, redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``strategy="invalidate"`` cache-wide: the commits invalidate already, so the trigger
    is no reason given (nor logged)."""
    reset_schema(engine, Base.metadata)
    _create_triggers(engine)
    caplog.set_level(logging.INFO, logger="sqlalchemy_writethrough")
    with cache_on(engine, redis_url, prefix, strategy="invalidate") as (cache, made):
        with made() as session:
            session.add(TgUndeclared(id=1, email="Ann"))
            session.commit()
        assert cache.models(engine)[TgUndeclared].commits_invalidate_because == ""
        assert "tg_undeclared" not in caplog.text


@pytest.mark.databases("sqlite", "postgresql", "mariadb")
@pytest.mark.parametrize("how", ["installed", "reinstalled", "derived"])
def test_a_trigger_created_later_is_seen_after_engine_dispose(
    engine: Engine, redis_url: str, prefix: str, how: str
) -> None:
    """The catalog is asked once per pool: a migration that adds a trigger while the
    application runs is seen once the engine's pool is replaced (``engine.dispose()``), as a
    restart would; also by a cache uninstalled and installed again meanwhile (which takes
    its listeners off the engines), and by sessions bound to an engine derived from it with
    ``execution_options()`` (which shares its pool). Before, the model kept what the first
    pool said until a restart: its commits went on writing through the value the flush
    sent."""
    reset_schema(engine, Base.metadata)
    with engine.begin() as conn:  # the other tests' triggers (the tables are kept)
        on = " ON tg_undeclared" if conn.dialect.name == "postgresql" else ""
        for name in ("tg_undeclared_tg", "tg_undeclared_insert", "tg_undeclared_update"):
            conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {name}{on}")
        conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS tg_undeclared_fold{on}")
    bind = engine.execution_options(logging_token="app") if how == "derived" else engine
    with cache_on(bind, redis_url, prefix) as (cache, made):
        with made() as session:
            session.add(TgUndeclared(id=1, email="Ann"))
            session.commit()
        assert _values(made, TgUndeclared) == (("Ann", None), 0)  # written through
        if how == "reinstalled":
            cache.uninstall(made)
            cache.install(made)
            assert _values(made, TgUndeclared) == (("Ann", None), 0)
        with engine.begin() as conn:
            if conn.dialect.name == "sqlite":
                conn.exec_driver_sql(
                    "CREATE TRIGGER tg_undeclared_fold AFTER UPDATE OF email ON tg_undeclared "
                    "BEGIN UPDATE tg_undeclared SET email = lower(NEW.email) "
                    "WHERE id = NEW.id; END"
                )
        if engine.dialect.name != "sqlite":
            _create_triggers(engine)
        engine.dispose()
        with made() as session:
            row = session.get(TgUndeclared, 1)
            assert row is not None
            row.email = "Bob"
            session.commit()
        with Session(engine) as plain:
            fresh = plain.get(TgUndeclared, 1)
            assert fresh is not None and fresh.email == "bob"
        assert _values(made, TgUndeclared)[0] == ("bob", None)
