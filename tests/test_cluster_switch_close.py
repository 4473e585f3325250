"""A cache given a URL (or a plain client) at a Redis Cluster node switches to a Cluster
client it builds (``cache._switch_to_cluster``). What the cache built it closes: after
``close()`` / ``aclose()`` no connection it opened stays open on any node of the cluster,
neither the plain client's of its URL (switched away from) nor the Cluster client's; a plain
client the caller passed is left open for the caller.

Observed from the servers: every connection is named (``client_name``, which the Cluster
client built from a plain one inherits) and ``CLIENT LIST`` is read on every node. Before
the fix the plain client a URL cache switched away from was never closed, nor was the
Cluster client a cache built from a caller's plain client."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
import redis
import redis.asyncio
from sqlalchemy import String, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sqlalchemy_writethrough import CachedModel, WriteThroughCache
from sqlalchemy_writethrough.cluster import ClusterBackend
from stress.cluster import ClusterGroup

pytestmark = [pytest.mark.cluster]

#: the database whose entries are invalidated (named only: nothing is read from it)
DB = create_engine("sqlite://")


class Base(DeclarativeBase):
    pass


class CsItem(Base, CachedModel):
    __tablename__ = "cs_item"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))


def _open_named(cluster: ClusterGroup, name: str) -> int:
    """How many connections named ``name`` the cluster's nodes hold."""
    count = 0
    for port in cluster.ports:
        with cluster.node(port).admin() as admin:
            count += sum(1 for c in admin.client_list() if c.get("name") == name)
    return count


def _node(cluster: ClusterGroup) -> tuple[str, int]:
    host, port = cluster.startup_nodes[0]
    return host, port


@pytest.mark.parametrize("given", ["url", "client"])
def test_close_closes_what_the_cache_built_after_a_switch(
    cluster: ClusterGroup, given: str
) -> None:
    name = f"cs-{uuid.uuid4().hex[:10]}"
    host, port = _node(cluster)
    prefix = f"cs-{uuid.uuid4().hex[:10]}"
    mine: Any = None
    if given == "url":
        target: Any = f"redis://{host}:{port}/0?client_name={name}"
    else:
        target = mine = redis.Redis(host=host, port=port, socket_timeout=1, client_name=name)
    cache = WriteThroughCache(target, prefix=prefix, stats_interval=None)
    cache.register(CsItem)
    plain = cache.redis  # held, as an application may hold it: not closed by the collector
    try:
        # 16 buckets over every primary: MOVED, then the switch
        cache.invalidate(CsItem, bind=DB)
        assert isinstance(cache._backend, ClusterBackend)
        assert cache.invalidate(CsItem, bind=DB)  # through the cluster
        assert _open_named(cluster, name) > 0
        cache.close()
        if mine is not None:
            assert mine.ping()  # the caller's client is the caller's to close
            mine.close()
        assert _open_named(cluster, name) == 0
        assert plain is not cache.redis  # switched away from (and still held here)
    finally:
        if mine is not None:
            mine.close()
        for port_ in cluster.primaries():
            with cluster.node(port_).admin() as admin:
                for key in admin.scan_iter(match=f"{prefix}:*"):
                    admin.delete(key)


@pytest.mark.parametrize("given", ["url", "client"])
def test_aclose_closes_what_the_cache_built_after_a_switch(
    cluster: ClusterGroup, given: str, loop: asyncio.AbstractEventLoop
) -> None:
    """The same with ``redis.asyncio``: an async factory's client built from the URL, or a
    ``redis.asyncio.Redis`` passed, switched to a ``redis.asyncio.cluster.RedisCluster``."""
    from sqlalchemy_writethrough.cluster_async import AsyncClusterBackend

    name = f"cs-{uuid.uuid4().hex[:10]}"
    host, port = _node(cluster)
    prefix = f"cs-{uuid.uuid4().hex[:10]}"

    async def scenario() -> tuple[int, int]:
        mine: Any = None
        if given == "url":
            target: Any = f"redis://{host}:{port}/0?client_name={name}"
        else:
            target = mine = redis.asyncio.Redis(
                host=host, port=port, socket_timeout=1, client_name=name
            )
        cache = WriteThroughCache(target, prefix=prefix, stats_interval=None)
        cache.register(CsItem)
        flavour = cache._async_flavour()
        plain = flavour.runtime.backend.client  # type: ignore[attr-defined]
        assert plain is mine or given == "url"
        await cache.ainvalidate(CsItem, bind=DB)  # the switch
        assert isinstance(flavour.runtime.backend, AsyncClusterBackend)
        assert await cache.ainvalidate(CsItem, bind=DB)
        before = await asyncio.to_thread(_open_named, cluster, name)
        await cache.aclose()
        if mine is not None:
            assert await mine.ping()  # the caller's client is the caller's to close
            await mine.aclose()
        after = await asyncio.to_thread(_open_named, cluster, name)
        assert plain is not flavour.runtime.backend.client  # type: ignore[attr-defined]
        return before, after

    try:
        before, after = loop.run_until_complete(scenario())
        assert before > 0
        assert after == 0
    finally:
        for port_ in cluster.primaries():
            with cluster.node(port_).admin() as admin:
                for key in admin.scan_iter(match=f"{prefix}:*"):
                    admin.delete(key)
