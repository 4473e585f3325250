"""Models mapped to a database view: its rows change when the tables it reads change, and no
commit of the view's own says so. ``register_all()`` caches every mapping, views included: a
view's row, once in Redis, was served after a commit had changed the table under it (stale
until its TTL, on every database).

A view (a materialized view, a foreign table) is never read from the cache: the cache asks the
database which relations are views once per engine pool, as it asks which tables have
row-level security, and ``info={"is_view": True}`` (SQLAlchemy-Utils' ``create_view``) says so
too. Its loads read the database, its commits write no entries, the cache says so once, and
``cache.models(engine)`` says why.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy import Column, Integer, MetaData, String, Table
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_writethrough import WriteThroughCache

from _cache_helpers import entry_key, entry_state
from _servers import capture_sql, reset_schema


class Base(DeclarativeBase):
    pass


class WvProduct(Base):
    __tablename__ = "wv_product"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))


class WvLabel(Base):
    """A view of wv_product (not in Base.metadata: the test makes it with CREATE VIEW)."""

    __table__ = Table(
        "wv_label", MetaData(), Column("id", Integer, primary_key=True), Column("name", String(40))
    )


class WvMarked(Base):
    """A view as SQLAlchemy-Utils' ``create_view`` declares it: ``info={"is_view": True}``."""

    __table__ = Table(
        "wv_marked",
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("name", String(40)),
        info={"is_view": True},
    )


@pytest.fixture
def views(engine: Engine) -> Iterator[Engine]:
    reset_schema(engine, Base.metadata)
    with engine.begin() as conn:
        for name in ("wv_label", "wv_marked"):
            conn.exec_driver_sql(f"DROP VIEW IF EXISTS {name}")
            conn.exec_driver_sql(
                f"CREATE VIEW {name} AS SELECT id, upper(name) AS name FROM wv_product"
            )
    try:
        yield engine
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP VIEW IF EXISTS wv_label")
            conn.exec_driver_sql("DROP VIEW IF EXISTS wv_marked")


@pytest.fixture
def cache(redis_client: redis.Redis, prefix: str) -> Iterator[WriteThroughCache]:
    made = WriteThroughCache(redis_client, prefix=prefix)
    made.register_all(Base)
    yield made
    made.close()


def test_a_view_is_never_served_and_reads_what_a_commit_under_it_changed(
    views: Engine,
    cache: WriteThroughCache,
    redis_client: redis.Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="sqlalchemy_writethrough")
    maker = sessionmaker(views)
    cache.install(maker)
    with maker() as s:
        s.add(WvProduct(id=1, name="old"))
        s.commit()
    for model in (WvLabel, WvMarked):
        with maker() as s:
            assert s.get(model, 1).name == "OLD"
        with maker() as s:  # a second load: still the database's
            with capture_sql(views) as sql:
                assert s.get(model, 1).name == "OLD"
            assert len(sql) == 1, sql
        assert entry_state(redis_client, entry_key(cache, model, 1, bind=views)) is None
    with maker() as s:
        s.get(WvProduct, 1).name = "new"
        s.commit()
    for model in (WvLabel, WvMarked):
        with maker() as s:
            assert s.get(model, 1).name == "NEW"  # before: "OLD", from Redis
    # the table itself is served as always
    with maker() as s, capture_sql(views) as sql:
        assert s.get(WvProduct, 1).name == "new"
    assert sql == []
    warned = [r.getMessage() for r in caplog.records if "is a view" in r.getMessage()]
    assert len(warned) == 2 and "WvLabel" in warned[0] + warned[1], caplog.text
    report = cache.models(views)
    assert report[WvProduct].loads_served
    for model, name in ((WvLabel, "wv_label"), (WvMarked, "wv_marked")):
        assert not report[model].loads_served
        assert report[model].not_served_because.endswith(f"{name} is a view")


@pytest.mark.databases("postgresql")
def test_a_materialized_view_is_not_served_across_a_refresh(
    engine: Engine, cache: WriteThroughCache
) -> None:
    reset_schema(engine, Base.metadata)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP MATERIALIZED VIEW IF EXISTS wv_label_m")
        conn.exec_driver_sql(
            "CREATE MATERIALIZED VIEW wv_label_m AS SELECT id, upper(name) AS name FROM wv_product"
        )

    class WvLabelM(Base):
        __table__ = Table(
            "wv_label_m",
            MetaData(),
            Column("id", Integer, primary_key=True),
            Column("name", String(40)),
        )

    try:
        cache.register(WvLabelM)
        maker = sessionmaker(engine)
        cache.install(maker)
        with maker() as s:
            s.add(WvProduct(id=1, name="old"))
            s.commit()
        with engine.begin() as conn:
            conn.exec_driver_sql("REFRESH MATERIALIZED VIEW wv_label_m")
        with maker() as s:
            assert s.get(WvLabelM, 1).name == "OLD"
        with maker() as s:
            s.get(WvProduct, 1).name = "new"
            s.commit()
        with engine.begin() as conn:
            conn.exec_driver_sql("REFRESH MATERIALIZED VIEW wv_label_m")
        with maker() as s:
            assert s.get(WvLabelM, 1).name == "NEW"
        assert cache.models(engine)[WvLabelM].not_served_because.endswith(
            "wv_label_m is a materialized view"
        )
    finally:
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP MATERIALIZED VIEW IF EXISTS wv_label_m")


def test_a_view_marked_in_its_table_info_is_not_served_on_in_memory_sqlite(
    cache: WriteThroughCache,
) -> None:
    """An in-memory SQLite database cannot be asked (a connection of its own would be another
    database): the table's ``info`` still says it is a view."""
    engine = sa.create_engine("sqlite://")
    try:
        Base.metadata.create_all(engine)
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "CREATE VIEW wv_marked AS SELECT id, upper(name) AS name FROM wv_product"
            )
        maker = sessionmaker(engine)
        cache.install(maker)
        with maker() as s:
            s.add(WvProduct(id=1, name="old"))
            s.commit()
        with maker() as s:
            assert s.get(WvMarked, 1).name == "OLD"
        with maker() as s:
            s.get(WvProduct, 1).name = "new"
            s.commit()
        with Session(engine) as plain, maker() as s:
            assert s.get(WvMarked, 1).name == plain.get(WvMarked, 1).name == "NEW"
    finally:
        engine.dispose()
