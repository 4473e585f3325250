"""Alembic migrations and the cache, with the example project's real ``alembic upgrade``.

A schema change moves a model to a new keyspace (the digest in every key), so an entry written
under one schema is never decoded under another; a data migration run inside
``invalidate_migrated_tables`` leaves no cached row older than the migration.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import Integer, String, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_writethrough import WriteThroughCache
from sqlalchemy_writethrough.keys import registry_key
from sqlalchemy_writethrough.model import ModelLayout

from _cache_helpers import entry_key, entry_state
from _servers import capture_sql

alembic_command = pytest.importorskip("alembic.command")
alembic_config = pytest.importorskip("alembic.config")

PROJECT = Path(__file__).resolve().parents[1] / "examples" / "alembic_project"
TABLE = "alembic_demo_product"


class Base(DeclarativeBase):
    pass


class Product(Base):
    __tablename__ = TABLE
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    price_cents: Mapped[int] = mapped_column(Integer)


class V2Base(DeclarativeBase):
    pass


class ProductV2(V2Base):
    """The same table after a migration added a column."""

    __tablename__ = TABLE
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    price_cents: Mapped[int] = mapped_column(Integer)
    sku: Mapped[str | None] = mapped_column(String(20))


@pytest.fixture
def alembic(engine: Engine, redis_url: str, prefix: str) -> Iterator[object]:
    with engine.begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {TABLE}"))
        conn.execute(text("DROP TABLE IF EXISTS wt_test_alembic_version"))
    saved = {k: os.environ.get(k) for k in ("DATABASE_URL", "REDIS_URL", "WRITETHROUGH_PREFIX")}
    os.environ["DATABASE_URL"] = engine.url.render_as_string(hide_password=False)
    os.environ["REDIS_URL"] = redis_url
    os.environ["WRITETHROUGH_PREFIX"] = prefix
    os.environ["ALEMBIC_VERSION_TABLE"] = "wt_test_alembic_version"
    config = alembic_config.Config(str(PROJECT / "alembic.ini"))
    config.attributes["configure_logger"] = False
    try:
        yield config
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        os.environ.pop("ALEMBIC_VERSION_TABLE", None)
        with engine.begin() as conn:
            conn.execute(text(f"DROP TABLE IF EXISTS {TABLE}"))
            conn.execute(text("DROP TABLE IF EXISTS wt_test_alembic_version"))


@pytest.fixture
def cache(redis_url: str, prefix: str) -> WriteThroughCache:
    cache = WriteThroughCache(redis.Redis.from_url(redis_url, socket_timeout=1), prefix=prefix)
    cache.register(Product)
    return cache


def seeded(engine: Engine, cache: WriteThroughCache) -> sessionmaker[Session]:
    factory = sessionmaker(engine)
    cache.install(factory)
    with factory() as session:
        session.add_all(
            [
                Product(id=1, name="Teapot", price_cents=1500),
                Product(id=2, name="Mug", price_cents=450),
            ]
        )
        session.commit()
    return factory


def price_and_sql(engine: Engine, factory: sessionmaker[Session], pk: int) -> tuple[int, int]:
    with capture_sql(engine) as sql, factory() as session:
        product = session.get(Product, pk)
        assert product is not None
        return product.price_cents, len(sql)


def test_data_migration_invalidates_cached_rows(
    engine: Engine, alembic: object, cache: WriteThroughCache, redis_client: redis.Redis
) -> None:
    alembic_command.upgrade(alembic, "0001")
    factory = seeded(engine, cache)
    assert price_and_sql(engine, factory, 1) == (1500, 0), "served from Redis"

    alembic_command.upgrade(alembic, "0002")
    assert price_and_sql(engine, factory, 1)[0] == 3000
    assert price_and_sql(engine, factory, 2) == (900, 1), "read from the database once"
    assert price_and_sql(engine, factory, 2) == (900, 0), "then cached again"

    alembic_command.downgrade(alembic, "0001")
    assert price_and_sql(engine, factory, 1)[0] == 1500
    assert price_and_sql(engine, factory, 2)[0] == 450


def test_a_data_migration_after_redis_forgot_the_registry(
    engine: Engine,
    alembic: object,
    cache: WriteThroughCache,
    redis_client: redis.Redis,
    prefix: str,
) -> None:
    """The migration's process registers no model: it finds the keyspaces of the tables it
    changes in the keyspace registry. Evicted alone (``allkeys-*``), the registry no longer
    lists the application's keyspace; the migration makes it whole first (every bucket made
    before it replaced), so the application is not served the rows as they were. (Before: it
    found nothing to lock and the application served the old price.)"""
    alembic_command.upgrade(alembic, "0001")
    factory = seeded(engine, cache)
    assert price_and_sql(engine, factory, 1) == (1500, 0), "served from Redis"
    redis_client.delete(registry_key(prefix))  # evicted
    alembic_command.upgrade(alembic, "0002")
    assert price_and_sql(engine, factory, 1) == (3000, 1)


def test_without_the_integration_a_data_migration_leaves_stale_rows(
    engine: Engine, alembic: object, cache: WriteThroughCache
) -> None:
    """The contrast: the same UPDATE run outside invalidate_migrated_tables."""
    alembic_command.upgrade(alembic, "0001")
    factory = seeded(engine, cache)
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE {TABLE} SET price_cents = price_cents * 2"))
    assert price_and_sql(engine, factory, 1) == (1500, 0), "the stale row is served"


def test_a_schema_change_moves_the_model_to_a_new_keyspace(
    engine: Engine, alembic: object, cache: WriteThroughCache, redis_client: redis.Redis
) -> None:
    alembic_command.upgrade(alembic, "0001")
    seeded(engine, cache)
    old_key = entry_key(cache, Product, 1)
    assert entry_state(redis_client, old_key) == "value"

    with engine.begin() as conn:  # what a migration adding a column does
        conn.execute(text(f"ALTER TABLE {TABLE} ADD COLUMN sku VARCHAR(20)"))
        conn.execute(text(f"UPDATE {TABLE} SET sku = 'T-1' WHERE id = 1"))
    new_cache = WriteThroughCache(cache.redis, prefix=cache.prefix)
    new_cache.register(ProductV2)
    new_key = entry_key(new_cache, ProductV2, 1, bind=engine)
    assert new_key != old_key
    v1 = ModelLayout(Product.__mapper__, cache._defaults, cache.prefix, 16)
    v2 = ModelLayout(ProductV2.__mapper__, cache._defaults, cache.prefix, 16)
    assert v1.digest != v2.digest

    new_factory = sessionmaker(engine)
    new_cache.install(new_factory)
    with capture_sql(engine) as sql, new_factory() as session:
        product = session.get(ProductV2, 1)
        assert product is not None and product.sku == "T-1"
    assert sql, "the new schema never decodes the old entry"
    assert entry_state(redis_client, new_key) == "value"


@pytest.mark.parametrize("listed", ["another keyspace listed", "no keyspace listed"])
def test_a_keyspace_registered_during_the_migration_is_invalidated_at_its_end(
    listed: str, engine: Engine, redis_url: str, prefix: str, cache: WriteThroughCache
) -> None:
    """The migration finds the keyspaces of the tables it changes in the registry when it
    begins. The next version's first process starts while it runs (a rolling deploy), or a
    keyspace the registry had dropped comes back: its reads register a keyspace of the
    table the migration did not lock, and fill the rows as they were before its COMMIT. The
    registry is read again at the end, and those keyspaces' buckets replaced too, also of a
    table the registry listed no keyspace of when the migration began. (Before, found by
    review: the new version served the price from before the migration.)"""
    from sqlalchemy_writethrough.alembic import invalidate_migrated_tables

    with engine.begin() as conn:
        conn.execute(text(f"DROP TABLE IF EXISTS {TABLE}"))
    V2Base.metadata.create_all(engine)
    made: list[WriteThroughCache] = []

    def process(model: type | None) -> tuple[WriteThroughCache, sessionmaker[Session]]:
        client = redis.Redis.from_url(redis_url, socket_timeout=1)
        one = WriteThroughCache(client, prefix=prefix, stats_interval=None)
        made.append(one)
        factory = sessionmaker(engine)
        if model is not None:
            one.register(model)
            one.install(factory)
        return one, factory

    def new_price(factory: sessionmaker[Session]) -> tuple[int, int]:
        with capture_sql(engine) as sql, factory() as session:
            product = session.get(ProductV2, 1)
            assert product is not None
            return product.price_cents, len(sql)

    try:
        if listed == "another keyspace listed":
            factory = seeded(engine, cache)
            assert price_and_sql(engine, factory, 1) == (1500, 0)
        else:
            with engine.begin() as conn:
                conn.execute(
                    text(f"INSERT INTO {TABLE} (id, name, price_cents) VALUES (1, 'Teapot', 1500)")
                )
        migrator, _ = process(None)
        with (
            engine.connect() as conn,
            invalidate_migrated_tables(migrator, conn),
            conn.begin(),
        ):
            conn.execute(text(f"UPDATE {TABLE} SET price_cents = price_cents * 2"))
            _, newer = process(ProductV2)  # starts now: reads as before the COMMIT
            assert new_price(newer) == (1500, 1)
            assert new_price(newer) == (1500, 0)
        if listed == "another keyspace listed":
            assert price_and_sql(engine, factory, 1) == (3000, 1)
        assert new_price(newer) == (3000, 1)
    finally:
        for one in made:
            one.close()
        with engine.begin() as conn:
            conn.execute(text(f"DROP TABLE IF EXISTS {TABLE}"))
