"""A trigger of one table that writes another cached model's rows: the counter cache
(``product.review_count``, kept by a trigger on ``review``). Nothing the cache sees says that
a review's INSERT changed a product row: the product's entry was served stale until its TTL
unless the review's model declared ``also_invalidates=[Product]``.

Now the cache reads the code of every trigger (and PostgreSQL rule) once per pool: a trigger
whose statements write a cached model's table (``UPDATE product ...``) has every write of its
table, cached or not, invalidate that model whole (the unit of work, Core and ORM DML, raw
SQL). One whose code names the table otherwise (dynamic SQL, a query) is named in a warning
at the model's first use and in ``cache.models(engine)``, with what to declare. What is
observed: what a get returns against a load without the cache, the log, and the report.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import ForeignKey, String, create_engine, delete, insert, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_writethrough import CachedModel, WriteThroughCache

from _cache_helpers import cache_on
from _servers import capture_sql, reset_schema

pytestmark = pytest.mark.databases("sqlite", "postgresql", "mariadb")


class Base(DeclarativeBase):
    pass


class TwProduct(Base, CachedModel):
    __tablename__ = "tw_product"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    review_count: Mapped[int] = mapped_column(default=0)


class TwReview(Base):
    """Not cached: its triggers count it into tw_product."""

    __tablename__ = "tw_review"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    product_id: Mapped[int] = mapped_column(ForeignKey("tw_product.id"))


class TwNote(Base, CachedModel):
    """Cached, and declares what its trigger writes."""

    __tablename__ = "tw_note"
    __writethrough__ = {"also_invalidates": [TwProduct]}
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    product_id: Mapped[int] = mapped_column(ForeignKey("tw_product.id"))


class TwLog(Base):
    __tablename__ = "tw_log"
    id: Mapped[int] = mapped_column(primary_key=True)
    n: Mapped[int]


class TwAudit(Base):
    """Not cached: its trigger reads tw_product and writes tw_log."""

    __tablename__ = "tw_audit"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    product_id: Mapped[int] = mapped_column(ForeignKey("tw_product.id"))


_COUNT = "UPDATE tw_product SET review_count = review_count + 1 WHERE id = NEW.product_id"
_UNCOUNT = "UPDATE tw_product SET review_count = review_count - 1 WHERE id = OLD.product_id"
_AUDIT = "INSERT INTO tw_log (n) SELECT review_count FROM tw_product WHERE id = NEW.product_id"


def _create_triggers(engine: Engine) -> None:
    triggers = [
        ("tw_review_counts", "tw_review", "INSERT", _COUNT),
        ("tw_review_uncounts", "tw_review", "DELETE", _UNCOUNT),
        ("tw_note_counts", "tw_note", "INSERT", _COUNT),
        ("tw_audit_logs", "tw_audit", "INSERT", _AUDIT),
    ]
    with engine.begin() as conn:
        for name, table, event, body in triggers:
            if conn.dialect.name == "postgresql":
                result = "OLD" if event == "DELETE" else "NEW"
                conn.exec_driver_sql(
                    f"CREATE OR REPLACE FUNCTION {name}() RETURNS trigger AS $$ "
                    f"BEGIN {body}; RETURN {result}; END $$ LANGUAGE plpgsql"
                )
                conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {name} ON {table}")
                conn.exec_driver_sql(
                    f"CREATE TRIGGER {name} AFTER {event} ON {table} "
                    f"FOR EACH ROW EXECUTE FUNCTION {name}()"
                )
            elif conn.dialect.name == "sqlite":
                conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {name}")
                conn.exec_driver_sql(
                    f"CREATE TRIGGER {name} AFTER {event} ON {table} BEGIN {body}; END"
                )
            else:
                conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {name}")
                conn.exec_driver_sql(
                    f"CREATE TRIGGER {name} AFTER {event} ON {table} FOR EACH ROW {body}"
                )


@contextlib.contextmanager
def _installed(
    engine: Engine, redis_url: str, prefix: str
) -> Iterator[tuple[WriteThroughCache, sessionmaker[Session]]]:
    reset_schema(engine, Base.metadata)
    _create_triggers(engine)
    with cache_on(engine, redis_url, prefix) as installed:
        with installed[1]() as session:
            session.add(TwProduct(id=1, name="lamp"))
            session.commit()
        yield installed


def _count(made: sessionmaker[Session], engine: Engine) -> tuple[int, int]:
    """The product's review count through the cache, and without it."""
    with made() as session, Session(engine) as plain:
        cached, fresh = session.get(TwProduct, 1), plain.get(TwProduct, 1)
        assert cached is not None and fresh is not None
        return cached.review_count, fresh.review_count


def _bare(tables: Any) -> list[str]:
    return [name.rpartition(".")[2] for name in tables]


def test_a_trigger_that_writes_a_cached_models_table_invalidates_it_at_every_write(
    engine: Engine, redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Each way a review is written, its model not cached: the unit of work, Core, raw SQL,
    a delete (whose trigger counts down)."""
    caplog.set_level(logging.INFO, logger="sqlalchemy_writethrough")
    with _installed(engine, redis_url, prefix) as (cache, made):
        assert _count(made, engine) == (0, 0)  # now cached
        with made() as session:
            session.add(TwReview(id=1, product_id=1))
            session.commit()
        assert _count(made, engine) == (1, 1)
        with made() as session:
            session.execute(insert(TwReview.__table__).values(id=2, product_id=1))
            session.commit()
        assert _count(made, engine) == (2, 2)
        with made() as session:
            session.execute(text("INSERT INTO tw_review (id, product_id) VALUES (3, 1)"))
            session.commit()
        assert _count(made, engine) == (3, 3)
        with made() as session:
            session.delete(session.get(TwReview, 1))
            session.commit()
        assert _count(made, engine) == (2, 2)
        with made() as session:
            session.execute(delete(TwReview).where(TwReview.id == 2))
            session.commit()
        assert _count(made, engine) == (1, 1)
        # the declared one's too (its model cached)
        with made() as session:
            session.add(TwNote(id=1, product_id=1))
            session.commit()
        assert _count(made, engine) == (2, 2)
        info = cache.models(engine)[TwProduct]
        assert _bare(info.invalidated_by_writes_to) == ["tw_note", "tw_review"]
        assert "invalidated whole by every write to: " in str(info)
        said = [r for r in caplog.records if "writes TwProduct's table" in r.getMessage()]
        assert sorted(r.levelname for r in said) == ["INFO", "INFO"], caplog.text


def test_a_trigger_that_names_a_cached_models_table_otherwise_is_warned_of(
    engine: Engine, redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The audit trigger reads the product and writes the log: the cache cannot tell it
    from one that writes the product through code it cannot read, so it says so, once."""
    caplog.set_level(logging.WARNING, logger="sqlalchemy_writethrough")
    with _installed(engine, redis_url, prefix) as (cache, made):
        assert _count(made, engine) == (0, 0)
        warned = [r.getMessage() for r in caplog.records if "tw_audit" in r.getMessage()]
        assert len(warned) == 1, caplog.text
        assert "TwProduct" in warned[0] and '"also_invalidates": [TwProduct]' in warned[0]
        assert not [r for r in caplog.records if "tw_review" in r.getMessage()]  # acted on
        info = cache.models(engine)[TwProduct]
        assert _bare(info.written_by_triggers_of) == ["tw_audit"]
        assert "named by triggers of: " in str(info)
        assert cache.models(engine)[TwNote].written_by_triggers_of == ()
        with made() as session:
            session.add(TwAudit(id=1, product_id=1))
            session.commit()
        assert _count(made, engine) == (0, 0)
        _count(made, engine)
        assert len([r for r in caplog.records if "tw_audit" in r.getMessage()]) == 1  # once


@pytest.mark.parametrize(
    ("code", "words"),
    [
        (
            "BEGIN UPDATE public.Product SET n = n + 1 WHERE id = NEW.product_id; END",
            {"public.product", "product", "n"},
        ),
        ('UPDATE "Tw_Product" SET x = OLD.y -- tw_gone\n', {"tw_product", "x"}),
        ("/* tw_gone */ INSERT INTO `log` VALUES ('tw_said')", {"log", "tw_said"}),
    ],
)
def test_the_names_a_triggers_code_uses(code: str, words: set[str]) -> None:
    """Quotes are taken off, comments left out, ``NEW.x``/``OLD.x`` are the written row's
    columns; a string's words count (dynamic SQL)."""
    from sqlalchemy_writethrough.databases import _words

    found: Any = _words(code)
    assert words <= found
    assert not {"tw_gone", "new.product_id", "product_id", "y"} & found


def test_a_declared_triggers_plain_insert_invalidates_in_raw_sql_too(
    engine: Engine, redis_url: str, prefix: str
) -> None:
    """A plain ``INSERT`` cannot change a row the cache holds, so raw SQL's was let through
    untouched, and the counter its table's declared trigger keeps on the product was served
    stale (the ORM's and Core's INSERTs were seen)."""
    with _installed(engine, redis_url, prefix) as (_cache, made):
        assert _count(made, engine) == (0, 0)
        with made() as session:
            session.execute(text("INSERT INTO tw_note (id, product_id) VALUES (5, 1)"))
            session.commit()
        assert _count(made, engine) == (1, 1)
        with made() as session:
            session.execute(insert(TwNote.__table__).values(id=6, product_id=1))
            session.commit()
        assert _count(made, engine) == (2, 2)


@pytest.mark.databases("sqlite", "postgresql")
def test_with_asyncsession_a_triggers_write_invalidates_too(
    engine: Engine, db_url: str, redis_url: str, prefix: str, loop: Any
) -> None:
    """The same on an AsyncSession (aiosqlite, asyncpg), the cache's asyncio flavour: the
    catalog is asked in SQLAlchemy's greenlet, at the flush of a model the cache does not
    hold."""
    from _flavours import async_url
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    reset_schema(engine, Base.metadata)
    _create_triggers(engine)

    async def scenario() -> list[int]:
        aengine = create_async_engine(async_url(db_url))
        cache = WriteThroughCache(redis_url, prefix=prefix, stats_interval=None)
        made = async_sessionmaker(aengine, expire_on_commit=False)
        cache.install(made)
        counts = []
        try:
            async with made() as session:
                session.add(TwProduct(id=1, name="lamp"))
                await session.commit()
            for n in (1, 2):
                async with made() as session:
                    counts.append((await session.get(TwProduct, 1)).review_count)
                async with made() as session:
                    session.add(TwReview(id=n, product_id=1))
                    await session.commit()
            async with made() as session:
                counts.append((await session.get(TwProduct, 1)).review_count)
            return counts
        finally:
            cache.uninstall(made)
            await cache.aclose()
            await aengine.dispose()

    assert loop.run_until_complete(scenario()) == [0, 1, 2]


class TwVote(Base):
    """Not cached: its trigger counts it into tw_product through a function it calls."""

    __tablename__ = "tw_vote"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    product_id: Mapped[int] = mapped_column(ForeignKey("tw_product.id"))


@pytest.mark.databases("postgresql", "mariadb")
def test_a_trigger_that_writes_through_a_function_it_calls_invalidates_too(
    engine: Engine, redis_url: str, prefix: str
) -> None:
    """The trigger's own code only calls ``tw_bump``; the helper's ``UPDATE tw_product``
    counts as the trigger's (a PL/pgSQL function on PostgreSQL, a stored procedure CALLed on
    MariaDB), nested one level deeper too."""
    reset_schema(engine, Base.metadata)
    _create_triggers(engine)
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(
                "CREATE OR REPLACE FUNCTION tw_bump_deep(p integer) RETURNS void AS $$ "
                "UPDATE tw_product SET review_count = review_count + 1 WHERE id = p "
                "$$ LANGUAGE sql"
            )
            conn.exec_driver_sql(
                "CREATE OR REPLACE FUNCTION tw_bump(p integer) RETURNS void AS $$ "
                "BEGIN PERFORM tw_bump_deep(p); END $$ LANGUAGE plpgsql"
            )
            conn.exec_driver_sql(
                "CREATE OR REPLACE FUNCTION tw_vote_counts() RETURNS trigger AS $$ "
                "BEGIN PERFORM tw_bump(NEW.product_id); RETURN NEW; END $$ "
                "LANGUAGE plpgsql"
            )
            conn.exec_driver_sql("DROP TRIGGER IF EXISTS tw_vote_counts ON tw_vote")
            conn.exec_driver_sql(
                "CREATE TRIGGER tw_vote_counts AFTER INSERT ON tw_vote "
                "FOR EACH ROW EXECUTE FUNCTION tw_vote_counts()"
            )
        else:
            for name in ("tw_bump", "tw_bump_deep"):
                conn.exec_driver_sql(f"DROP PROCEDURE IF EXISTS {name}")
            conn.exec_driver_sql(
                "CREATE PROCEDURE tw_bump_deep(p INT) "
                "UPDATE tw_product SET review_count = review_count + 1 WHERE id = p"
            )
            conn.exec_driver_sql("CREATE PROCEDURE tw_bump(p INT) CALL tw_bump_deep(p)")
            conn.exec_driver_sql("DROP TRIGGER IF EXISTS tw_vote_counts")
            conn.exec_driver_sql(
                "CREATE TRIGGER tw_vote_counts AFTER INSERT ON tw_vote "
                "FOR EACH ROW CALL tw_bump(NEW.product_id)"
            )
    try:
        with cache_on(engine, redis_url, prefix) as (cache, made):
            with made() as session:
                session.add(TwProduct(id=1, name="lamp"))
                session.commit()
            assert _count(made, engine) == (0, 0)
            with made() as session:
                session.add(TwVote(id=1, product_id=1))
                session.commit()
            assert _count(made, engine) == (1, 1)
            info = cache.models(engine)[TwProduct]
            assert "tw_vote" in _bare(info.invalidated_by_writes_to)
    finally:
        _drop_vote_triggers(engine)


def _drop_vote_triggers(engine: Engine) -> None:
    """Take this module's triggers off ``tw_vote`` (emptying the tables keeps them)."""
    with engine.begin() as conn:
        on = " ON tw_vote" if conn.dialect.name == "postgresql" else ""
        for name in ("tw_vote_counts", "tw_vote_later"):
            conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {name}{on}")


@pytest.mark.databases("sqlite", "postgresql")
def test_a_trigger_created_later_is_seen_on_the_engines_next_pool(
    engine: Engine, redis_url: str, prefix: str
) -> None:
    """The catalog is asked once per pool: a trigger created after it was asked is seen once
    the engine's pool is replaced (``engine.dispose()``), for a model the cache does not hold
    too."""
    reset_schema(engine, Base.metadata)
    _drop_vote_triggers(engine)
    with _installed(engine, redis_url, prefix) as (_cache, made):
        with made() as session:
            session.add(TwVote(id=1, product_id=1))
            session.commit()
        assert _count(made, engine) == (0, 0)  # no trigger yet
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql(
                    "CREATE OR REPLACE FUNCTION tw_vote_later() RETURNS trigger AS $$ "
                    f"BEGIN {_COUNT}; RETURN NEW; END $$ LANGUAGE plpgsql"
                )
                conn.exec_driver_sql("DROP TRIGGER IF EXISTS tw_vote_later ON tw_vote")
                conn.exec_driver_sql(
                    "CREATE TRIGGER tw_vote_later AFTER INSERT ON tw_vote "
                    "FOR EACH ROW EXECUTE FUNCTION tw_vote_later()"
                )
            else:
                conn.exec_driver_sql(
                    f"CREATE TRIGGER tw_vote_later AFTER INSERT ON tw_vote BEGIN {_COUNT}; END"
                )
        try:
            engine.dispose()
            with made() as session:
                session.add(TwVote(id=2, product_id=1))
                session.commit()
            assert _count(made, engine) == (1, 1)
        finally:
            _drop_vote_triggers(engine)


#: MySQL's own ways of writing a table, in a trigger's code: each was read as writing no
#: cached table (only a word warning), so the product was served stale until its TTL
_MYSQL_WRITES = {
    "multi-table-update": (
        "UPDATE tw_log RIGHT JOIN tw_product ON tw_log.n = tw_product.id "
        "SET tw_product.review_count = tw_product.review_count + 1 "
        "WHERE tw_product.id = NEW.product_id"
    ),
    "update-modifiers": (
        "UPDATE LOW_PRIORITY IGNORE tw_product SET review_count = review_count + 1 "
        "WHERE id = NEW.product_id"
    ),
    "insert-without-into": (
        "INSERT tw_product (id, name) VALUES (NEW.product_id, 'new') "
        "ON DUPLICATE KEY UPDATE review_count = review_count + 1"
    ),
    "replace-without-into": (
        "REPLACE tw_product (id, name, review_count) VALUES (NEW.product_id + 1, 'desk', 7)"
    ),
    "delete-target-first": "DELETE tw_product FROM tw_product WHERE id = NEW.product_id + 1",
}


def _products(session: Session) -> list[tuple[str, int] | None]:
    found = [session.get(TwProduct, pk) for pk in (1, 2)]
    return [None if p is None else (p.name, p.review_count) for p in found]


@pytest.mark.databases("mariadb")
@pytest.mark.parametrize("body", list(_MYSQL_WRITES.values()), ids=list(_MYSQL_WRITES))
def test_mysqls_own_forms_of_a_write_in_a_trigger_are_read(
    engine: Engine, redis_url: str, prefix: str, body: str
) -> None:
    """A multi-table UPDATE naming the product second, LOW_PRIORITY/IGNORE, INSERT and
    REPLACE without INTO, ``DELETE t FROM t``: the trigger on the vote writes the product."""
    reset_schema(engine, Base.metadata)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            f"CREATE TRIGGER tw_vote_counts AFTER INSERT ON tw_vote FOR EACH ROW {body}"
        )
    try:
        with cache_on(engine, redis_url, prefix) as (cache, made):
            with made() as session:
                session.add_all([TwProduct(id=1, name="lamp"), TwProduct(id=2, name="desk")])
                session.commit()
            with made() as session:
                before = _products(session)  # now cached
            with made() as session:
                session.add(TwVote(id=1, product_id=1))
                session.commit()
            with made() as session, Session(engine) as plain:
                fresh = _products(plain)
                assert fresh != before  # the trigger wrote
                assert _products(session) == fresh
            info = cache.models(engine)[TwProduct]
            assert "tw_vote" in _bare(info.invalidated_by_writes_to)
    finally:
        _drop_vote_triggers(engine)


@contextlib.contextmanager
def _neighbour(engine: Engine) -> Iterator[Engine]:
    """Another database on ``engine``'s MySQL server (another suite's, another tenant's),
    dropped at the end."""
    name = f"wt_nb_{uuid.uuid4().hex[:8]}"
    with engine.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    other = create_engine(engine.url.set(database=name))
    try:
        yield other
    finally:
        other.dispose()
        with engine.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")


@pytest.mark.databases("mariadb")
def test_a_trigger_of_another_mysql_database_counts_only_for_the_tables_it_names(
    engine: Engine,
    redis_url: str,
    prefix: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """MySQL's catalog lists the triggers of every database of the server, and a trigger's
    unqualified names are tables of its own database. The same tables and triggers in a
    neighbouring database (a second test suite, another tenant) were read as the engine's
    own: the warning and ``cache.models()`` named the neighbour's tables, and raw SQL writing
    this database's ``tw_log`` invalidated the product for a neighbour's trigger. A
    neighbour's trigger naming this database's table by its qualified name still counts."""
    caplog.set_level(logging.WARNING, logger="sqlalchemy_writethrough")
    own = engine.url.database
    with _neighbour(engine) as other:
        reset_schema(other, Base.metadata)
        _create_triggers(other)
        with other.begin() as conn:
            conn.exec_driver_sql(
                "CREATE TRIGGER tw_log_counts AFTER INSERT ON tw_log FOR EACH ROW "
                f"UPDATE {own}.tw_product SET review_count = review_count + 1 WHERE id = NEW.n"
            )
        with _installed(engine, redis_url, prefix) as (cache, made):
            assert _count(made, engine) == (0, 0)  # now cached
            info = cache.models(engine)[TwProduct]
            assert list(info.written_by_triggers_of) == [f"{own}.tw_audit"]
            assert sorted(info.invalidated_by_writes_to) == sorted(
                [f"{own}.tw_note", f"{own}.tw_review", f"{other.url.database}.tw_log"]
            )
            warned = [r.getMessage() for r in caplog.records]
            assert len(warned) == 1 and f"{own}.tw_audit" in warned[0], caplog.text
            # this database's tw_log has no trigger: its raw SQL leaves the product served
            with made() as session:
                session.execute(text("INSERT INTO tw_log (n) VALUES (1)"))
                session.commit()
            with capture_sql(engine) as statements, made() as session:
                assert session.get(TwProduct, 1) is not None
            assert statements == []


class ShopBase(DeclarativeBase):
    pass


class ShopProduct(ShopBase, CachedModel):
    """In a schema the engine's ``schema_translate_map`` names (one per tenant)."""

    __tablename__ = "tw_shop_product"
    __table_args__ = {"schema": "shop"}
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    review_count: Mapped[int] = mapped_column(default=0)


class ShopReview(ShopBase):
    __tablename__ = "tw_shop_review"
    __table_args__ = {"schema": "shop"}
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    product_id: Mapped[int]


@pytest.mark.databases("postgresql", "mariadb")
def test_a_trigger_writing_a_translated_schemas_table_invalidates_its_model(
    engine: Engine, redis_url: str, prefix: str
) -> None:
    """The model's schema (``shop``) is translated to the database's own (``public``, the
    MySQL database): a trigger's statement naming the table with that schema (MySQL: bare,
    in the trigger's own database) writes the model's rows, and was not matched with a model
    of another schema name: the product was served stale."""
    own = "public" if engine.dialect.name == "postgresql" else engine.url.database
    tenant = engine.execution_options(schema_translate_map={"shop": own})
    target = "public.tw_shop_product" if engine.dialect.name == "postgresql" else "tw_shop_product"
    body = f"UPDATE {target} SET review_count = review_count + 1 WHERE id = NEW.product_id"
    ShopBase.metadata.drop_all(tenant)
    ShopBase.metadata.create_all(tenant)
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(
                "CREATE OR REPLACE FUNCTION tw_shop_counts() RETURNS trigger AS $$ "
                f"BEGIN {body}; RETURN NEW; END $$ LANGUAGE plpgsql"
            )
            conn.exec_driver_sql(
                "CREATE TRIGGER tw_shop_counts AFTER INSERT ON tw_shop_review "
                "FOR EACH ROW EXECUTE FUNCTION tw_shop_counts()"
            )
        else:
            conn.exec_driver_sql(
                f"CREATE TRIGGER tw_shop_counts AFTER INSERT ON tw_shop_review FOR EACH ROW {body}"
            )
    try:
        with cache_on(tenant, redis_url, prefix) as (_cache, made):
            with made() as session:
                session.add(ShopProduct(id=1))
                session.commit()
            with made() as session:
                assert session.get(ShopProduct, 1).review_count == 0  # type: ignore[union-attr]
            with made() as session:
                session.add(ShopReview(id=1, product_id=1))
                session.commit()
            with made() as session, Session(tenant) as plain:
                fresh = plain.get(ShopProduct, 1)
                assert fresh is not None and fresh.review_count == 1  # the trigger wrote
                assert session.get(ShopProduct, 1).review_count == 1  # type: ignore[union-attr]
    finally:
        ShopBase.metadata.drop_all(tenant)
