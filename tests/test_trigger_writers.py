"""A trigger of one table that writes another cached model's rows: the counter cache
(``product.review_count``, kept by a trigger on ``review``). Nothing the cache sees says that
a review's INSERT changed a product row: the product's entry is served stale until its TTL
unless the review's model declares ``also_invalidates=[Product]``, and nothing said so.

Now the cache reads the code of every trigger (and PostgreSQL rule) once per pool and names,
in a warning at the product's first use and in ``cache.models(engine)``, the tables whose
triggers name the product's table; declared, the writes invalidate the product and the
warning is not given. What is observed: the log, the report, and what a get returns against
a load without the cache.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import ForeignKey, String, insert, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_writethrough import CachedModel, WriteThroughCache

from _cache_helpers import cache_on
from _servers import reset_schema

pytestmark = pytest.mark.databases("sqlite", "postgresql", "mariadb")


class Base(DeclarativeBase):
    pass


class TwProduct(Base, CachedModel):
    __tablename__ = "tw_product"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    review_count: Mapped[int] = mapped_column(default=0)


class TwReview(Base):
    """Not cached: its trigger counts it into tw_product."""

    __tablename__ = "tw_review"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    product_id: Mapped[int] = mapped_column(ForeignKey("tw_product.id"))


class TwNote(Base, CachedModel):
    """Cached, and declares what its trigger writes."""

    __tablename__ = "tw_note"
    __writethrough__ = {"also_invalidates": [TwProduct]}
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    product_id: Mapped[int] = mapped_column(ForeignKey("tw_product.id"))


_COUNT = "UPDATE tw_product SET review_count = review_count + 1 WHERE id = NEW.product_id"


def _create_triggers(engine: Engine) -> None:
    with engine.begin() as conn:
        for table in ("tw_review", "tw_note"):
            name = f"{table}_counts"
            if conn.dialect.name == "postgresql":
                conn.exec_driver_sql(
                    f"CREATE OR REPLACE FUNCTION {name}() RETURNS trigger AS $$ "
                    f"BEGIN {_COUNT}; RETURN NEW; END $$ LANGUAGE plpgsql"
                )
                conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {name} ON {table}")
                conn.exec_driver_sql(
                    f"CREATE TRIGGER {name} AFTER INSERT ON {table} "
                    f"FOR EACH ROW EXECUTE FUNCTION {name}()"
                )
            elif conn.dialect.name == "sqlite":
                conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {name}")
                conn.exec_driver_sql(
                    f"CREATE TRIGGER {name} AFTER INSERT ON {table} BEGIN {_COUNT}; END"
                )
            else:
                conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {name}")
                conn.exec_driver_sql(
                    f"CREATE TRIGGER {name} AFTER INSERT ON {table} FOR EACH ROW {_COUNT}"
                )


@contextlib.contextmanager
def _installed(
    engine: Engine, redis_url: str, prefix: str
) -> Iterator[tuple[WriteThroughCache, sessionmaker[Session]]]:
    reset_schema(engine, Base.metadata)
    _create_triggers(engine)
    with cache_on(engine, redis_url, prefix) as installed:
        yield installed


def _count(made: sessionmaker[Session], engine: Engine) -> tuple[int, int]:
    """The product's review count through the cache, and without it."""
    with made() as session, Session(engine) as plain:
        cached, fresh = session.get(TwProduct, 1), plain.get(TwProduct, 1)
        assert cached is not None and fresh is not None
        return cached.review_count, fresh.review_count


def test_a_trigger_that_writes_a_cached_models_table_is_named(
    engine: Engine, redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sqlalchemy_writethrough")
    with _installed(engine, redis_url, prefix) as (cache, made):
        with made() as session:
            session.add(TwProduct(id=1, name="lamp"))
            session.commit()
        assert _count(made, engine) == (0, 0)
        warned = [r.getMessage() for r in caplog.records if "tw_review" in r.getMessage()]
        assert len(warned) == 1, caplog.text
        assert "TwProduct" in warned[0] and '"also_invalidates": [TwProduct]' in warned[0]
        assert not [r for r in caplog.records if "tw_note" in r.getMessage()]  # declared
        info = cache.models(engine)[TwProduct]
        assert [name.rpartition(".")[2] for name in info.written_by_triggers_of] == ["tw_review"]
        assert "named by triggers of: " in str(info)
        assert cache.models(engine)[TwNote].written_by_triggers_of == ()
        # what the warning is about: the undeclared trigger's write is not seen...
        with made() as session:
            session.add(TwReview(id=1, product_id=1))
            session.commit()
        assert _count(made, engine) == (0, 1)
        # ...the declared one's is
        with made() as session:
            session.add(TwNote(id=1, product_id=1))
            session.commit()
        assert _count(made, engine) == (2, 2)
        _count(made, engine)
        assert len([r for r in caplog.records if "tw_review" in r.getMessage()]) == 1  # once


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
        with made() as session:
            session.add(TwProduct(id=1, name="lamp"))
            session.commit()
        assert _count(made, engine) == (0, 0)
        with made() as session:
            session.execute(text("INSERT INTO tw_note (id, product_id) VALUES (5, 1)"))
            session.commit()
        assert _count(made, engine) == (1, 1)
        with made() as session:
            session.execute(insert(TwNote.__table__).values(id=6, product_id=1))
            session.commit()
        assert _count(made, engine) == (2, 2)
