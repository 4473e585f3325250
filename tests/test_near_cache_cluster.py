"""The near cache (``near_cache=``) on Redis Cluster, sync and asyncio, on the session's
cluster (3 primaries, 3 replicas; ``tests/conftest.py``).

The scripts ``PUBLISH`` on the node that owns their keys; Redis Cluster forwards every
``PUBLISH`` to every node over the cluster bus, so the subscriber listens on one node:

* a hit from memory sends no command to any node and no SQL;
* another client's commits, on rows of every primary, reach the one subscription; the
  process's own are read at once;
* the subscription's node killed: nothing is served until the subscription is back, on
  another node, empty;
* a cluster that forgets (every primary flushed): nothing older than the bound;
* a ``redis.asyncio`` Cluster client alike.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis
from _flavours import async_url
from redis.cluster import RedisCluster
from sqlalchemy import String
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_writethrough import CachedModel, NearCacheOptions, WriteThroughCache
from sqlalchemy_writethrough import _redis_compat as compat
from sqlalchemy_writethrough.near import ClusterSubscriptions
from stress.cluster import ClusterGroup

from _cache_helpers import BOUND, LASTING, entry_key, near_of
from _servers import (
    COUNTED,
    RoundTripCounter,
    _counting_connection_class,
    capture_sql,
    reset_schema,
)

pytestmark = [pytest.mark.cluster, pytest.mark.databases("sqlite")]

ROWS = range(1, 31)  # their keys spread over every primary


class Base(DeclarativeBase):
    pass


class NkItem(Base, CachedModel):
    __tablename__ = "nk_item"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))


@pytest.fixture
def prefix() -> str:
    return f"nk-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def schema(engine: Engine) -> Engine:
    reset_schema(engine, Base.metadata)
    return engine


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def client_of(cluster: ClusterGroup, **kwargs: Any) -> RedisCluster:
    return RedisCluster(
        startup_nodes=[redis.cluster.ClusterNode(h, p) for h, p in cluster.startup_nodes],
        socket_timeout=0.5,
        socket_connect_timeout=0.5,
        **kwargs,
    )


def cache_of(client: Any, prefix: str, **options: Any) -> WriteThroughCache:
    """Its copies live LASTING unless ``near_cache=`` says otherwise."""
    options.setdefault("stats_interval", None)
    options.setdefault("near_cache", NearCacheOptions(staleness=LASTING))
    return WriteThroughCache(client, prefix=prefix, **options)


def serving(cache: WriteThroughCache) -> None:
    near = near_of(cache)
    now = time.monotonic()
    wait_until(lambda: near.serving() and near._heard >= now, "the subscription")


def installed(cache: WriteThroughCache, engine: Engine) -> sessionmaker[Session]:
    factory = sessionmaker(engine)
    cache.install(factory)
    return factory


def names(factory: Any, ids: range = ROWS) -> list[str]:
    with factory() as s:
        return [s.get(NkItem, i).name for i in ids]


def rename_all(factory: Any, name: str, ids: range = ROWS) -> None:
    with factory() as s:
        for i in ids:
            s.get(NkItem, i).name = name
        s.commit()


def test_hits_send_nothing_to_any_node_and_commits_on_every_primary_reach_it(
    cluster: ClusterGroup, schema: Engine, prefix: str
) -> None:
    counter = RoundTripCounter()
    client = client_of(cluster)
    counting = _counting_connection_class(redis.connection.Connection, counter)
    for node in client.get_nodes():  # before any connection is made
        client.get_redis_connection(node).connection_pool.connection_class = counting
    reader = cache_of(client, prefix, **COUNTED)
    other = client_of(cluster)
    writer = cache_of(other, prefix)
    try:
        mine, theirs = installed(reader, schema), installed(writer, schema)
        with theirs() as s:
            s.add_all(NkItem(id=i, name="a") for i in ROWS)
            s.commit()
        near = near_of(reader)
        assert isinstance(near.source, ClusterSubscriptions)
        serving(reader)
        keys = {entry_key(reader, NkItem, i, bind=schema) for i in ROWS}
        # from Redis, now in memory (a row whose entry was missing is filled first)
        wait_until(lambda: names(mine) == ["a"] * 30 and keys <= set(near._entries), "copies")
        owners = {cluster.owner(redis.crc.key_slot(k.encode())) for k in keys}
        assert len(owners) == 3  # on every primary
        counter.reset()
        hits = near.hits
        with capture_sql(schema) as sql:
            assert names(mine) == ["a"] * 30
        assert counter.count == 0 and sql == []
        assert near.hits == hits + 30

        rename_all(theirs, "b")  # each primary publishes its rows' keys
        wait_until(lambda: not keys & set(near._entries), "every primary's message")
        wait_until(lambda: names(mine) == ["b"] * 30 and keys <= set(near._entries), "copies")
        hits = near.hits
        assert names(mine) == ["b"] * 30
        assert near.hits == hits + 30
        rename_all(mine, "c")  # its own: read at once
        assert names(mine) == ["c"] * 30
    finally:
        reader.close()
        writer.close()
        client.close()
        other.close()


def test_the_subscription_node_killed_serves_nothing_until_back_on_another(
    cluster: ClusterGroup, schema: Engine, prefix: str
) -> None:
    client, other = client_of(cluster), client_of(cluster)
    reader, writer = cache_of(client, prefix), cache_of(other, prefix)
    killed: int | None = None
    try:
        mine, theirs = installed(reader, schema), installed(writer, schema)
        with theirs() as s:
            s.add_all(NkItem(id=i, name="a") for i in ROWS)
            s.commit()
        serving(reader)
        near = near_of(reader)
        source = near.source
        assert isinstance(source, ClusterSubscriptions) and source.node is not None
        assert names(mine) == ["a"] * 30 and names(mine) == ["a"] * 30
        assert near.hits == 30
        resets = near.resets
        killed = source.node[1]
        replica = cluster.replica_of(killed) if killed in cluster.primaries() else None
        cluster.node(killed).kill()  # a primary's replica takes over its slots
        wait_until(lambda: not near.serving(), "the subscription to be lost")
        hits = near.hits
        assert names(mine, range(1, 4)) == ["a"] * 3  # from Redis or the database
        assert near.hits == hits
        wait_until(lambda: near.resets > resets and near.serving(), "a new subscription")
        assert source.node is not None and source.node[1] != killed
        if replica is not None:
            # every node says cluster_state:ok until it finds the killed primary dead: the
            # writes and reads below would otherwise still go to it (to the database, no copy)
            wait_until(lambda: cluster.node(replica).role() == "master", "the promotion")
        cluster.wait_serving()
        assert len(near) == 0  # it starts empty
        rename_all(theirs, "b")
        assert names(mine) == ["b"] * 30
        serving(reader)
        hits = near.hits
        assert names(mine) == ["b"] * 30
        assert names(mine) == ["b"] * 30
        assert near.hits > hits  # from memory again, on the new node
        key = entry_key(reader, NkItem, 1, bind=schema)
        rename_all(theirs, "c", range(1, 2))
        wait_until(lambda: key not in near._entries, "a message through the new node")
        assert names(mine, range(1, 2)) == ["c"]
    finally:
        reader.close()
        writer.close()
        client.close()
        other.close()
        if killed is not None:
            cluster.restart(killed)


def test_a_stalled_subscription_node_is_left_for_another(
    cluster: ClusterGroup, schema: Engine, prefix: str
) -> None:
    """The subscribed node stops answering (SIGSTOP; a replica, so that nothing fails over):
    the near cache stops serving within the bound, then subscribes on another node, empty,
    and serves again while that node is still stopped."""
    client, other = client_of(cluster), client_of(cluster)
    reader, writer = cache_of(client, prefix), cache_of(other, prefix)
    paused: int | None = None
    try:
        mine, theirs = installed(reader, schema), installed(writer, schema)
        with theirs() as s:
            s.add_all(NkItem(id=i, name="a") for i in ROWS)
            s.commit()
        near = near_of(reader)
        source = near.source
        assert isinstance(source, ClusterSubscriptions)
        serving(reader)
        primaries = set(cluster.primaries())
        addresses: list[tuple[str, int]] = []

        def replicas() -> list[int]:  # a new cluster lists its replicas once they synced
            compat.cluster_refresh(client)
            addresses[:] = compat.cluster_addresses(client)
            return [i for i, (_, port) in enumerate(addresses) if port not in primaries]

        wait_until(replicas, "a replica in the slot map")
        replica = replicas()[0]
        source._turn = replica - 1  # the next subscription: on that replica
        near.renew()
        wait_until(lambda: source.node == addresses[replica], "the subscription on a replica")
        serving(reader)
        keys = {entry_key(reader, NkItem, i, bind=schema) for i in ROWS}
        wait_until(lambda: names(mine) == ["a"] * 30 and keys <= set(near._entries), "copies")
        resets = near.resets
        kept = dict(near._entries)  # the copies taken before the stall
        paused = addresses[replica][1]
        cluster.pause(paused)
        wait_until(lambda: not near.serving(), "the heartbeat to be late")
        hits = near.hits
        assert names(mine) == ["a"] * 30  # from Redis: the primaries answer
        assert near.hits == hits
        wait_until(lambda: near.resets > resets and near.serving(), "a subscription elsewhere")
        assert source.node is not None and source.node[1] != paused
        # it started over empty: none of the copies from before the stall is kept (the reads
        # above may have kept new ones since: under load the new subscription can be
        # confirmed while they run, so ``len(near) == 0`` failed now and then)
        assert not any(near._entries.get(key) is copy for key, copy in kept.items())
        rename_all(theirs, "b")
        wait_until(lambda: names(mine) == ["b"] * 30 and keys <= set(near._entries), "copies")
        hits = near.hits
        assert names(mine) == ["b"] * 30
        assert near.hits == hits + 30  # from memory, with the old node still stopped
    finally:
        if paused is not None:
            cluster.resume(paused)
        reader.close()
        writer.close()
        client.close()
        other.close()
        cluster.wait_serving()


def test_a_cluster_that_forgets_serves_nothing_older_than_the_bound(
    cluster: ClusterGroup, schema: Engine, prefix: str
) -> None:
    """Every primary flushed (as a restart without persistence would): a copy taken before
    is not served once ``staleness`` has passed since a commit made after."""
    client, other = client_of(cluster), client_of(cluster)
    short = NearCacheOptions(staleness=BOUND)  # the test waits for the bound
    reader = cache_of(client, prefix, epoch_check_interval=0.05, near_cache=short)
    writer = cache_of(other, prefix, epoch_check_interval=0.05, near_cache=short)
    try:
        mine, theirs = installed(reader, schema), installed(writer, schema)
        with theirs() as s:
            s.add_all(NkItem(id=i, name="a") for i in ROWS)
            s.commit()
        serving(reader)
        assert names(mine) == ["a"] * 30 and names(mine) == ["a"] * 30
        for port in cluster.primaries():
            with cluster.node(port).admin() as admin:
                admin.flushall()
        rename_all(theirs, "b")
        committed = time.monotonic()
        while True:
            began = time.monotonic()
            seen = names(mine)
            if seen == ["b"] * 30:
                break
            assert began - committed <= BOUND, f"served older than the bound: {seen}"
    finally:
        reader.close()
        writer.close()
        client.close()
        other.close()


def test_an_asyncio_cluster_client(
    cluster: ClusterGroup, schema: Engine, db_url: str, prefix: str, loop: Any
) -> None:
    from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

    sync_client = client_of(cluster)
    writer = cache_of(sync_client, prefix)
    theirs = installed(writer, schema)

    async def name_of(factory: Any, pk: int) -> str:
        async with factory() as s:
            return str((await s.get(NkItem, pk)).name)

    async def scenario() -> None:
        engine = create_async_engine(async_url(db_url))
        client = AsyncRedisCluster(
            startup_nodes=[AsyncClusterNode(h, p) for h, p in cluster.startup_nodes],
            socket_timeout=0.5,
        )
        reader = cache_of(client, prefix)
        try:
            mine = async_sessionmaker(engine, expire_on_commit=False)
            reader.install(mine)
            near = near_of(reader)
            assert isinstance(near.source, ClusterSubscriptions)
            await asyncio.to_thread(serving, reader)
            keys = {entry_key(reader, NkItem, i, bind=schema) for i in ROWS}
            for _ in range(50):  # from Redis, now in memory (a missing entry filled first)
                assert [await name_of(mine, i) for i in ROWS] == ["a"] * 30
                if keys <= set(near._entries):
                    break
                await asyncio.sleep(0.01)
            hits = near.hits
            with capture_sql(schema) as sql:
                assert [await name_of(mine, i) for i in ROWS] == ["a"] * 30
            assert sql == [] and near.hits == hits + 30
            await asyncio.to_thread(rename_all, theirs, "b")
            await asyncio.to_thread(
                wait_until, lambda: not keys & set(near._entries), "every primary's message"
            )
            assert [await name_of(mine, i) for i in ROWS] == ["b"] * 30
            async with mine() as s:  # its own commit: read at once
                (await s.get(NkItem, 1)).name = "c"
                await s.commit()
            assert await name_of(mine, 1) == "c"
        finally:
            await reader.aclose()
            await client.aclose()
            await engine.dispose()

    try:
        with theirs() as s:
            s.add_all(NkItem(id=i, name="a") for i in ROWS)
            s.commit()
        loop.run_until_complete(scenario())
    finally:
        writer.close()
        sync_client.close()
