"""The core behaviour, once per flavour: sync sessions, and AsyncSession with redis.asyncio.

Each test is one scenario written against ``_flavours.Harness`` and run twice per database: with
a ``sessionmaker`` on a sync driver and a ``redis.Redis`` client, and with an
``async_sessionmaker`` on asyncpg / aiomysql / aiosqlite and a ``redis.asyncio`` client. Both
must show the same thing: what Redis holds after each step, whether a load sent SQL, what the
caller got, and the counters.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import redis
from _flavours import FLAVOURS, Harness
from redis.cluster import ClusterNode, RedisCluster
from sqlalchemy import ForeignKey, String, select, update
from sqlalchemy.ext.asyncio import AsyncAttrs
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from sqlalchemy_writethrough import CachedModel, from_cache
from stress.redis_server import free_port

from _cache_helpers import cached_values, entry_key, entry_state
from _servers import reset_schema


class Base(AsyncAttrs, DeclarativeBase):
    pass


class FvParent(Base, CachedModel):
    __tablename__ = "fv_parent"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))


class FvItem(Base, CachedModel):
    __tablename__ = "fv_item"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))
    qty: Mapped[int] = mapped_column(default=0)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("fv_parent.id"))
    parent: Mapped[FvParent | None] = relationship()


#: the asyncio flavour on a Redis Cluster (the session's ``cluster`` fixture); the database
#: changes nothing there, so it runs on SQLite only
ASYNC_CLUSTER = pytest.param(
    "async-cluster", marks=[pytest.mark.cluster, pytest.mark.databases("sqlite")]
)


@pytest.fixture(params=[*FLAVOURS, ASYNC_CLUSTER])
def h(
    request: pytest.FixtureRequest, db_url: str, redis_url: str, prefix: str
) -> Iterator[Harness]:
    cluster = request.getfixturevalue("cluster") if request.param == "async-cluster" else None
    harness = Harness(request.param, db_url, redis_url, prefix, cluster)
    reset_schema(harness.engine, Base.metadata)
    try:
        yield harness
    finally:
        harness.close()
        if cluster is not None:
            for port in cluster.primaries():
                with cluster.node(port).admin() as admin:
                    keys = list(admin.scan_iter(match=f"{prefix}:*", count=1000))
                    for key in keys:  # one by one: the keys of one node span many slots
                        admin.unlink(key)


@pytest.fixture
def redis_client(h: Harness, redis_client: redis.Redis) -> Iterator[Any]:
    """What the tests read Redis with: the plain client, or a ``RedisCluster`` on the
    async-cluster flavour's cluster."""
    if h.cluster is None:
        yield redis_client
        return
    nodes = [ClusterNode(host, port) for host, port in h.cluster.startup_nodes]
    client = RedisCluster(startup_nodes=nodes, socket_timeout=5.0)
    try:
        yield client
    finally:
        client.close()


def seeded(h: Harness, **cache_options: Any) -> tuple[Any, Any]:
    """A cache, a factory, and rows committed through them: parent 1, items 1 and 2."""
    cache = h.cache(**cache_options)
    factory = h.factory(cache, expire_on_commit=False)
    with h.session(factory) as s:
        s.add(FvParent(id=1, name="p1"))
        s.add(FvItem(id=1, name="one", parent_id=1))
        s.add(FvItem(id=2, name="two", parent_id=1))
        s.commit()
    return cache, factory


def values(h: Harness, cache: Any, client: redis.Redis, model: type, pk: int) -> Any:
    return cached_values(cache, client, model, pk, dialect=h.engine.dialect, bind=h.engine)


def key(h: Harness, cache: Any, model: type, pk: int) -> str:
    return entry_key(cache, model, pk, bind=h.engine)


def test_commit_writes_through_and_a_get_is_served_without_sql(
    h: Harness, redis_client: redis.Redis
) -> None:
    cache, factory = seeded(h)
    assert values(h, cache, redis_client, FvItem, 1) == {
        "id": 1, "name": "one", "qty": 0, "parent_id": 1,
    }  # fmt: skip
    with h.session(factory) as s, h.sql() as sql:
        item = s.get(FvItem, 1)
        assert (item.id, item.name) == (1, "one")
    assert sql == []
    stats = cache.stats()
    assert (stats.publishes, stats.hits, stats.misses) == (3, 1, 0)


def test_an_update_publishes_the_new_row(h: Harness, redis_client: redis.Redis) -> None:
    cache, factory = seeded(h)
    with h.session(factory) as s:
        item = s.get(FvItem, 1)
        item.qty = 5
        s.commit()
    assert values(h, cache, redis_client, FvItem, 1)["qty"] == 5
    with h.session(factory) as s, h.sql() as sql:
        assert s.get(FvItem, 1).qty == 5
    assert sql == []


def test_a_miss_loads_from_the_database_and_fills(h: Harness, redis_client: redis.Redis) -> None:
    cache, factory = seeded(h)
    assert h.invalidate(cache, FvItem, 2)
    assert entry_state(redis_client, key(h, cache, FvItem, 2)) is None
    with h.session(factory) as s, h.sql() as sql:
        assert s.get(FvItem, 2).name == "two"
    assert len(sql) == 1
    assert entry_state(redis_client, key(h, cache, FvItem, 2)) == "value"
    assert cache.stats().fills == 1


def test_every_miss_of_a_session_fills(h: Harness, redis_client: redis.Redis) -> None:
    """The second and later misses of a session load inside the transaction its first load
    began: they fill when that load could not have predated a commit, as on PostgreSQL (READ
    COMMITTED) and SQLite (whose driver runs a SELECT outside a transaction); not under
    MariaDB's REPEATABLE READ, whose snapshot began with the session's first load. On
    aiosqlite only the first filled (the cache asked SQLAlchemy's adapter, which does not
    say, whether SQLite had begun a transaction): the session's other rows were read from the
    database every time."""
    cache, factory = seeded(h)
    for pk in (1, 2):
        assert h.invalidate(cache, FvItem, pk)
    assert h.invalidate(cache, FvParent, 1)
    with h.session(factory) as s, h.sql() as sql:
        assert [s.get(FvItem, 1).name, s.get(FvItem, 2).name] == ["one", "two"]
        assert s.get(FvParent, 1).name == "p1"
    assert len(sql) == 3
    snapshot = h.engine.dialect.name == "mysql"
    assert cache.stats().fills == (1 if snapshot else 3)
    filled = [
        entry_state(redis_client, key(h, cache, model, pk)) == "value"
        for model, pk in ((FvItem, 1), (FvItem, 2), (FvParent, 1))
    ]
    assert filled == [True, not snapshot, not snapshot]
    with h.session(factory) as s, h.sql() as sql:
        assert [s.get(FvItem, 1).name, s.get(FvItem, 2).name] == ["one", "two"]
    assert len(sql) == (1 if snapshot else 0)


def test_a_rollback_restores_the_previous_value(h: Harness, redis_client: redis.Redis) -> None:
    cache, factory = seeded(h)
    with h.session(factory) as s:
        item = s.get(FvItem, 1)
        item.name = "never"
        s.flush()
        assert entry_state(redis_client, key(h, cache, FvItem, 1)) == "lock"
        s.rollback()
    assert values(h, cache, redis_client, FvItem, 1)["name"] == "one"
    assert cache.stats().restores == 1


def test_savepoints_publish_what_was_released_and_not_what_rolled_back(
    h: Harness, redis_client: redis.Redis
) -> None:
    cache, factory = seeded(h)
    with h.session(factory) as s:
        one = s.get(FvItem, 1)
        two = s.get(FvItem, 2)
        with s.savepoint():
            one.qty = 1
        with pytest.raises(RuntimeError), s.savepoint():
            two.qty = 2
            s.flush()
            raise RuntimeError("roll this savepoint back")
        s.commit()
    assert values(h, cache, redis_client, FvItem, 1)["qty"] == 1
    assert entry_state(redis_client, key(h, cache, FvItem, 2)) is None  # a miss, never qty=2
    with h.session(factory) as s:
        assert s.get(FvItem, 2).qty == 0


def test_select_with_from_cache_and_in_batches(h: Harness, redis_client: redis.Redis) -> None:
    cache, factory = seeded(h)
    with h.session(factory) as s, h.sql() as sql:
        found = s.scalars(select(FvItem).where(FvItem.id == 1).options(from_cache()))
        assert [i.name for i in found] == ["one"]
    assert sql == []
    h.invalidate(cache, FvItem, 2)
    with h.session(factory) as s, h.sql() as sql:
        stmt = select(FvItem).where(FvItem.id.in_([1, 2, 3])).options(from_cache())
        assert sorted(i.id for i in s.scalars(stmt)) == [1, 2]
    assert len(sql) == 1  # the misses (2 and 3), in one query
    assert entry_state(redis_client, key(h, cache, FvItem, 2)) == "value"


def test_a_many_to_one_lazy_load_is_served_from_the_cache(h: Harness) -> None:
    _, factory = seeded(h)
    with h.session(factory) as s:
        item = s.get(FvItem, 1)
        with h.sql() as sql:
            parent = s.lazy(item, "parent")
        assert parent is not None and parent.name == "p1"
    assert sql == []


def test_run_sync_reads_through_the_same_cache(h: Harness) -> None:
    _, factory = seeded(h)
    with h.session(factory) as s, h.sql() as sql:
        name = s.run_sync(lambda session: session.get(FvItem, 2).name)
    assert name == "two"
    assert sql == []


def test_a_statement_write_leaves_a_miss_and_the_next_read_sees_it(
    h: Harness, redis_client: redis.Redis
) -> None:
    cache, factory = seeded(h)
    with h.session(factory) as s:
        s.execute(update(FvItem).where(FvItem.id == 1).values(qty=9))
        assert entry_state(redis_client, key(h, cache, FvItem, 1)) == "lock"
        s.commit()
    assert entry_state(redis_client, key(h, cache, FvItem, 1)) is None
    with h.session(factory) as s:
        assert s.get(FvItem, 1).qty == 9


def test_a_delete_leaves_a_miss(h: Harness, redis_client: redis.Redis) -> None:
    cache, factory = seeded(h)
    with h.session(factory) as s:
        s.delete(s.get(FvItem, 2))
        s.commit()
    assert entry_state(redis_client, key(h, cache, FvItem, 2)) is None
    with h.session(factory) as s:
        assert s.get(FvItem, 2) is None


def test_invalidating_a_whole_model(h: Harness) -> None:
    cache, factory = seeded(h)
    assert h.invalidate(cache, FvItem)
    with h.session(factory) as s, h.sql() as sql:
        assert s.get(FvItem, 1).name == "one"
        assert s.get(FvParent, 1).name == "p1"
    assert len(sql) == 1  # the item; its parent is still cached


@pytest.mark.databases("sqlite")
def test_an_unreachable_redis_costs_database_reads_never_errors(h: Harness) -> None:
    cache = h.cache(f"redis://127.0.0.1:{free_port()}/0")
    factory = h.factory(cache, expire_on_commit=False)
    with h.session(factory) as s:
        s.add(FvParent(id=1, name="p1"))
        s.commit()
    with h.session(factory) as s:
        assert s.get(FvParent, 1).name == "p1"
    assert cache.stats().errors >= 2
