"""A commit publishes the whole row from the committing session's memory, columns it did not
write included: when another transaction committed one of those columns after this session
loaded the row (READ COMMITTED; MariaDB's REPEATABLE READ too), the published entry holds the
older value, and every later read is served a row the database never held (guarantees 2 and 4).

Found by the verify round of issue #15 (not by the stress checker: its workers write rows they
loaded under a row lock). Fixed: an UPDATE that leaves loaded columns unwritten sends the row as
loaded with its lock, and the lock is contended (the publish leaves a miss) unless the entry it
replaces holds exactly that (docs/consistency.md, "How: locks, leases and a guarded publish").
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from _flavours import async_url
from redis.cluster import ClusterNode, RedisCluster
from sqlalchemy import Integer, String, select
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.orm.exc import StaleDataError

from sqlalchemy_writethrough import CachedModel, WriteThroughCache

from _servers import capture_sql, reset_schema


class Base(DeclarativeBase):
    pass


class SlcRow(Base, CachedModel):
    """Two independent columns: one session writes ``a``, another ``b``."""

    __tablename__ = "slc_row"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    a: Mapped[str] = mapped_column(String(20))
    b: Mapped[str] = mapped_column(String(20))


class SlvRow(Base, CachedModel):
    __tablename__ = "slv_row"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    a: Mapped[str] = mapped_column(String(20))
    b: Mapped[str] = mapped_column(String(20))
    v: Mapped[int] = mapped_column(Integer)
    __mapper_args__ = {"version_id_col": v}


class SliRow(Base, CachedModel):
    __tablename__ = "sli_row"
    __writethrough__ = {"strategy": "invalidate"}
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    a: Mapped[str] = mapped_column(String(20))
    b: Mapped[str] = mapped_column(String(20))


@pytest.fixture
def make_session(engine: Engine, redis_url: str, prefix: str) -> Iterator[sessionmaker[Session]]:
    """A sessionmaker with a cache installed, on a fresh ``slc_row`` table holding row 1."""
    reset_schema(engine, Base.metadata)
    client = redis.Redis.from_url(redis_url, socket_timeout=1)
    cache = WriteThroughCache(client, prefix=prefix, stats_interval=None)
    factory = sessionmaker(engine)
    cache.install(factory)
    with factory() as session:
        session.add(SlcRow(id=1, a="a0", b="b0"))
        session.add(SlvRow(id=1, a="a0", b="b0"))
        session.add(SliRow(id=1, a="a0", b="b0"))
        session.commit()
    try:
        yield factory
    finally:
        cache.close()
        client.close()


def test_a_column_another_commit_changed_after_the_load_is_not_published_stale(
    engine: Engine, make_session: sessionmaker[Session]
) -> None:
    """Session A loads row 1, session B changes ``b`` and commits, A changes ``a`` and commits.
    The database holds (a1, b1); a later get must not be served (a1, b0)."""
    with make_session() as writer_a:
        row = writer_a.get(SlcRow, 1)
        assert row is not None and row.b == "b0"
        with make_session() as writer_b:
            other = writer_b.get(SlcRow, 1)
            assert other is not None
            other.b = "b1"
            writer_b.commit()
        row.a = "a1"
        writer_a.commit()

    with make_session() as reader, capture_sql(engine) as statements:
        got = reader.get(SlcRow, 1)
        assert got is not None
        served = (got.a, got.b)
    assert served == ("a1", "b1"), f"served {served} from {'SQL' if statements else 'Redis'}"


@pytest.mark.parametrize("model", [SlvRow, SliRow], ids=["version_id_col", "invalidate"])
def test_the_documented_ways_around_it_serve_what_the_database_holds(
    engine: Engine, make_session: sessionmaker[Session], model: type[Base]
) -> None:
    """What docs/consistency.md advised before the fix, for rows whose columns concurrent
    transactions change apart, still serves what the database holds: a ``version_id_col`` (the second writer's UPDATE finds no row: StaleDataError, and
    nothing is published) or the model's ``strategy="invalidate"`` (a commit leaves a miss)."""
    with make_session() as writer_a:
        row: Any = writer_a.get(model, 1)
        with make_session() as writer_b:
            other: Any = writer_b.get(model, 1)
            other.b = "b1"
            writer_b.commit()
        row.a = "a1"
        try:
            writer_a.commit()
        except StaleDataError:
            writer_a.rollback()
    with make_session() as reader:
        got: Any = reader.get(model, 1)
        served = (got.a, got.b)
    with engine.connect() as conn:
        held = tuple(conn.execute(select(model.a, model.b).where(model.id == 1)).one())  # type: ignore[attr-defined]
    assert served == held


def _rows(factory: sessionmaker[Session], engine: Engine) -> tuple[tuple[str, str], int]:
    """(row 1 as a get serves it, how many SQL statements the get sent)."""
    with factory() as reader, capture_sql(engine) as statements:
        got = reader.get(SlcRow, 1)
        assert got is not None
        return (got.a, got.b), len(statements)


def _drop_entries(redis_url: str, prefix: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        for key in client.scan_iter(f"{prefix}*slc_row*"):
            client.delete(key)
    finally:
        client.close()


@pytest.mark.parametrize("entry", ["published", "filled"])
def test_a_row_nothing_else_changed_is_still_published(
    engine: Engine, make_session: sessionmaker[Session], redis_url: str, prefix: str, entry: str
) -> None:
    """The fix costs no write-through where nobody else wrote: the entry the writer's lock
    replaces holds the row as the writer loaded it (the seeding INSERT's publish, read by the
    writer's get; or filled by the writer's get), so the commit publishes and the next get runs
    no SQL."""
    if entry == "filled":
        _drop_entries(redis_url, prefix)
    with make_session() as writer, capture_sql(engine) as statements:
        row = writer.get(SlcRow, 1)
        assert row is not None
        assert len(statements) == (1 if entry == "filled" else 0)
        row.a = "a1"
        writer.commit()
    assert _rows(make_session, engine) == (("a1", "b0"), 0)
    with make_session() as writer:  # a second UPDATE over the published entry
        row = writer.get(SlcRow, 1)
        assert row is not None
        row.b = "b2"
        writer.commit()
    assert _rows(make_session, engine) == (("a1", "b2"), 0)


def test_an_update_writing_every_column_publishes_whatever_the_entry_held(
    engine: Engine, make_session: sessionmaker[Session], redis_url: str, prefix: str
) -> None:
    """No column from memory, nothing to check: a writer that sets every column publishes even
    over an entry that changed since its load (here: none at all)."""
    with make_session() as writer:
        row = writer.get(SlcRow, 1)
        assert row is not None
        _drop_entries(redis_url, prefix)
        row.a, row.b = "a1", "b1"
        writer.commit()
    assert _rows(make_session, engine) == (("a1", "b1"), 0)


def _entry_kinds(redis_url: str, prefix: str) -> list[bytes]:
    """The first byte of each ``slc_row`` entry in Redis (``V`` a value, ``L`` a lock...)."""
    client = redis.Redis.from_url(redis_url)
    try:
        kinds = []
        for key in client.scan_iter(f"{prefix}*slc_row*:1"):
            value = client.get(key)
            if value:
                kinds.append(value[:1])
        return kinds
    finally:
        client.close()


def test_a_row_loaded_with_select_gets_its_entry_back_at_its_read_back(
    engine: Engine, make_session: sessionmaker[Session], redis_url: str, prefix: str
) -> None:
    """A row loaded with a plain ``select()`` (from the database), changed in one column and
    committed while its entry is gone (TTL, eviction, a Redis that forgot) leaves a miss: the
    publish cannot check the unwritten column. The read-back of the expired object then
    fills the entry from the database, so the next commits write through again and their
    read-backs send no SQL (before: every read-back went to the database, for good)."""
    _drop_entries(redis_url, prefix)
    read_backs = []
    for i in range(3):
        with make_session() as writer:
            row = writer.scalars(select(SlcRow).where(SlcRow.id == 1)).one()
            row.a = f"a{i}"
            writer.commit()
            with capture_sql(engine) as statements:
                assert (row.a, row.b) == (f"a{i}", "b0")
            read_backs.append(len(statements))
    assert read_backs == [1, 0, 0]
    assert _entry_kinds(redis_url, prefix) == [b"V"]
    assert _rows(make_session, engine) == (("a2", "b0"), 0)


def test_a_partial_read_back_with_a_pending_change_fills_nothing(
    engine: Engine, make_session: sessionmaker[Session], redis_url: str, prefix: str
) -> None:
    """Only a read-back that reloads every column the entry holds fills it: one expired
    column reloaded beside a changed, unflushed one must not put that change in Redis."""
    _drop_entries(redis_url, prefix)
    with make_session() as session:
        row = session.scalars(select(SlcRow).where(SlcRow.id == 1)).one()
        session.expire(row, ["a"])
        row.b = "pending"
        with session.no_autoflush:
            assert row.a == "a0"
        session.rollback()
    assert _entry_kinds(redis_url, prefix) == []
    assert _rows(make_session, engine) == (("a0", "b0"), 1)


def test_a_row_locked_at_the_reasserting_final_flush_is_checked_too(
    engine: Engine, redis_url: str, prefix: str
) -> None:
    """A transaction whose first locks are older than half ``lock_timeout`` when it commits
    takes them again in the same round trip as its final flush (after the flush's statements,
    not before): the row that flush changes carries its row as loaded there too."""
    reset_schema(engine, Base.metadata)
    client = redis.Redis.from_url(redis_url, socket_timeout=1)
    cache = WriteThroughCache(client, prefix=prefix, stats_interval=None, lock_timeout=0.4)
    factory = sessionmaker(engine)
    cache.install(factory)
    try:
        with factory() as session:
            session.add_all([SlcRow(id=1, a="a0", b="b0"), SlcRow(id=2, a="a0", b="b0")])
            session.commit()
        with factory() as writer_a:
            row = writer_a.get(SlcRow, 1)
            assert row is not None
            with factory() as writer_b:
                other = writer_b.get(SlcRow, 1)
                assert other is not None
                other.b = "b1"
                writer_b.commit()
            if engine.dialect.name != "sqlite":  # SQLite: one writer at a time
                two = writer_a.get(SlcRow, 2)
                assert two is not None
                two.a = "a1"
                writer_a.flush()  # locks row 2 now
                time.sleep(0.25)  # older than half the lock timeout at commit
            row.a = "a1"
            writer_a.commit()
        with factory() as reader:
            got = reader.get(SlcRow, 1)
            assert got is not None
            assert (got.a, got.b) == ("a1", "b1")
    finally:
        cache.close()
        client.close()


def test_the_asyncio_flavour_does_not_publish_a_stale_column(
    engine: Engine,
    make_session: sessionmaker[Session],
    db_url: str,
    redis_url: str,
    prefix: str,
    loop: Any,
) -> None:
    """As the first test, with AsyncSessions and a redis.asyncio client (same scripts)."""
    import redis.asyncio

    async def scenario() -> tuple[str, str]:
        async_engine = create_async_engine(async_url(db_url))
        client = redis.asyncio.Redis.from_url(redis_url, socket_timeout=1)
        cache = WriteThroughCache(client, prefix=prefix, stats_interval=None)
        factory = async_sessionmaker(async_engine, expire_on_commit=False)
        cache.install(factory)
        try:
            async with factory() as writer_a:
                row = await writer_a.get(SlcRow, 1)
                assert row is not None and row.b == "b0"
                async with factory() as writer_b:
                    other = await writer_b.get(SlcRow, 1)
                    assert other is not None
                    other.b = "b1"
                    await writer_b.commit()
                row.a = "a1"
                await writer_a.commit()
            async with factory() as reader:
                got = await reader.get(SlcRow, 1)
                assert got is not None
                return got.a, got.b
        finally:
            await cache.aclose()
            await client.aclose()
            await async_engine.dispose()

    assert loop.run_until_complete(scenario()) == ("a1", "b1")


@pytest.mark.cluster
@pytest.mark.databases("sqlite")
def test_the_cluster_flavour_does_not_publish_a_stale_column(engine: Engine, cluster: Any) -> None:
    """As the first test, on a Redis Cluster (the lock split per hash tag carries each
    pair's expected row), with rows on several nodes."""
    reset_schema(engine, Base.metadata)
    client = RedisCluster(
        startup_nodes=[ClusterNode(h, p) for h, p in cluster.startup_nodes], socket_timeout=1
    )
    cache = WriteThroughCache(
        client, prefix=f"slcc{random.randrange(1 << 30):x}", stats_interval=None
    )
    factory = sessionmaker(engine)
    cache.install(factory)
    ids = range(1, 9)
    try:
        with factory() as session:
            session.add_all(SlcRow(id=i, a="a0", b="b0") for i in ids)
            session.commit()
        with factory() as writer_a:
            rows = [writer_a.get(SlcRow, i) for i in ids]
            with factory() as writer_b:
                for i in ids[::2]:
                    other = writer_b.get(SlcRow, i)
                    assert other is not None
                    other.b = "b1"
                writer_b.commit()
            for row in rows:
                assert row is not None
                row.a = "a1"
            writer_a.commit()
        with factory() as reader:
            served = [(r.a, r.b) for r in (reader.get(SlcRow, i) for i in ids) if r is not None]
        assert served == [("a1", "b1") if i % 2 else ("a1", "b0") for i in ids]
        with factory() as reader, capture_sql(engine) as statements:
            for i in ids:
                reader.get(SlcRow, i)
        assert statements == []  # every entry filled or published again
    finally:
        cache.close()
        client.close()
