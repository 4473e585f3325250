"""A cache over TLS (``rediss://``), as managed Redis services serve it: a redis-server of
the test's own with a TLS port and a throwaway CA (``_tls.py``).

* reads, commits and rollbacks over TLS: what Redis holds, what SQL was sent;
* asyncio (``redis.asyncio`` over TLS);
* the near cache's subscription, a connection the cache opens itself, is TLS too;
* client certificates (``tls-auth-clients yes``);
* a certificate the client does not trust: reads go to the database, nothing raises, and
  the reason is logged;
* a Cluster, and a Sentinel group, whose servers replicate (and sentinels watch them) over
  TLS: sync across a failover, asyncio with the near cache.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _flavours import async_url
from _tls import Certificates, TlsServer, make_certificates, tls_server, tls_server_args
from redis.sentinel import SentinelManagedSSLConnection
from sqlalchemy import String
from sqlalchemy.engine import Engine
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_writethrough import NearCacheOptions, WriteThroughCache

from _cache_helpers import LASTING, entry_key, entry_state, serving, wait_until
from _servers import capture_sql, reset_schema

pytestmark = pytest.mark.databases("sqlite")


class Base(DeclarativeBase):
    pass


class TlsItem(Base):
    __tablename__ = "tls_item"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(40))


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls(certificates: Certificates) -> Iterator[TlsServer]:
    with tls_server(certificates) as server:
        yield server


@pytest.fixture
def schema(engine: Engine) -> Engine:
    reset_schema(engine, Base.metadata)
    return engine


def _name(factory: sessionmaker[Session], engine: Engine, pk: int = 1) -> tuple[str | None, int]:
    with factory() as session, capture_sql(engine) as sql:
        row = session.get(TlsItem, pk)
        return (None if row is None else row.name), len(sql)


def _cache(client: Any, prefix: str, **options: Any) -> WriteThroughCache:
    """A cache of TlsItem on ``client`` (a URL or a client)."""
    cache = WriteThroughCache(client, prefix=prefix, stats_interval=None, **options)
    cache.register(TlsItem)
    return cache


def test_reads_commits_and_rollbacks_over_tls(tls: TlsServer, schema: Engine, prefix: str) -> None:
    cache = _cache(tls.url, prefix)
    factory = sessionmaker(schema)
    cache.install(factory)
    try:
        with factory() as session:
            session.add(TlsItem(id=1, name="v1"))
            session.commit()
        key = entry_key(cache, TlsItem, 1)
        admin = tls.admin()
        assert entry_state(admin, key) == "value"  # published over TLS
        assert _name(factory, schema) == ("v1", 0)
        with factory() as session:
            session.get(TlsItem, 1).name = "not committed"  # type: ignore[union-attr]
            session.flush()
            assert entry_state(admin, key) == "lock"
            session.rollback()
        assert _name(factory, schema) == ("v1", 0)  # restored
        with factory() as session:
            session.get(TlsItem, 1).name = "v2"  # type: ignore[union-attr]
            session.commit()
        assert _name(factory, schema) == ("v2", 0)
        stats = cache.stats()
        assert stats.errors == 0 and stats.publishes >= 2
    finally:
        cache.close()


def test_asyncio_over_tls(tls: TlsServer, db_url: str, schema: Engine, prefix: str) -> None:
    """``redis.asyncio`` over TLS; the near cache's subscriber, a thread with a sync twin of
    that client, over TLS too."""

    asyncio.run(_asyncio_near_hits(tls.url, db_url, prefix))


async def _asyncio_near_hits(client: Any, db_url: str, prefix: str) -> None:
    """An asyncio process with the near cache on ``client``: a commit, then two gets with no
    SQL, at least one a near hit (its subscription up), and no error."""
    cache = _cache(client, prefix, near_cache=NearCacheOptions(staleness=LASTING))
    engine = create_async_engine(async_url(db_url))
    factory = async_sessionmaker(engine, expire_on_commit=False)
    cache.install(factory)
    try:
        async with factory() as session:
            session.add(TlsItem(id=1, name="v1"))
            await session.commit()
        serving(cache)
        with capture_sql(engine.sync_engine) as sql:
            for _ in range(2):
                async with factory() as session:
                    row = await session.get(TlsItem, 1)
                    assert row is not None and row.name == "v1"
        assert sql == []
        stats = cache.stats()
        assert stats.errors == 0 and stats.near_hits >= 1
    finally:
        await cache.aclose()
        await engine.dispose()


def _reader_keeps_then_hears(
    reader: WriteThroughCache,
    mine: sessionmaker[Session],
    theirs: sessionmaker[Session],
    schema: Engine,
) -> None:
    """Row 1 (v1) read twice by the reader, the second time from its near cache; the
    writer commits v2, and the reader's subscription hears it."""
    serving(reader)
    assert _name(mine, schema) == ("v1", 0)
    assert _name(mine, schema) == ("v1", 0)
    assert reader.stats().near_hits >= 1
    with theirs() as session:
        session.get(TlsItem, 1).name = "v2"  # type: ignore[union-attr]
        session.commit()
    wait_until(lambda: _name(mine, schema)[0] == "v2", "the reader hears the commit")


def test_the_near_cache_subscribes_over_tls(tls: TlsServer, schema: Engine, prefix: str) -> None:
    """The subscription is a connection the cache opens itself, from the client's options:
    TLS too, or the reader would never hear the writer's commit (nor serve from memory)."""
    reader = _cache(tls.url, prefix, near_cache=NearCacheOptions(staleness=LASTING))
    writer = _cache(tls.url, prefix, near_cache=NearCacheOptions(staleness=LASTING))
    mine, theirs = sessionmaker(schema), sessionmaker(schema)
    reader.install(mine)
    writer.install(theirs)
    try:
        with theirs() as session:
            session.add(TlsItem(id=1, name="v1"))
            session.commit()
        _reader_keeps_then_hears(reader, mine, theirs, schema)
    finally:
        reader.close()
        writer.close()


def test_a_client_certificate(certificates: Certificates, schema: Engine, prefix: str) -> None:
    """``tls-auth-clients yes``: the certificate and key go in the URL's query (or the
    client's ``ssl_certfile`` / ``ssl_keyfile``), to the near cache's subscription too."""
    with tls_server(certificates, auth_clients=True) as tls:
        url = (
            f"{tls.url}&ssl_certfile={certificates.client_cert}"
            f"&ssl_keyfile={certificates.client_key}"
        )
        cache = _cache(url, prefix, near_cache=NearCacheOptions(staleness=LASTING))
        factory = sessionmaker(schema)
        cache.install(factory)
        try:
            with factory() as session:
                session.add(TlsItem(id=1, name="v1"))
                session.commit()
            serving(cache)
            assert _name(factory, schema) == ("v1", 0)
            assert cache.stats().errors == 0
        finally:
            cache.close()


def test_a_server_certificate_the_client_does_not_trust(
    tls: TlsServer,
    schema: Engine,
    prefix: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Another CA: every call fails its handshake. The application goes on with the
    database, and the log says why."""
    other = make_certificates(tmp_path)
    url = f"rediss://127.0.0.1:{tls.tls_port}/0?ssl_ca_certs={other.ca}"
    cache = _cache(url, prefix)
    factory = sessionmaker(schema)
    cache.install(factory)
    try:
        with caplog.at_level(logging.WARNING, logger="sqlalchemy_writethrough"):
            with factory() as session:
                session.add(TlsItem(id=1, name="v1"))
                session.commit()
            assert _name(factory, schema) == ("v1", 1)
        assert cache.stats().errors >= 1
        assert "certificate" in caplog.text.lower()
    finally:
        cache.close()


@pytest.fixture
def tls_cluster(certificates: Certificates) -> Iterator[Any]:
    """A Redis Cluster (3 primaries, 3 replicas) whose nodes take TLS clients, and whose bus
    and replication are TLS too."""
    from stress.cluster import running_cluster

    from _sentinel import require_redis_server

    require_redis_server()
    with running_cluster(tls_args=tls_server_args(certificates)) as group:
        yield group


@pytest.mark.cluster
@pytest.mark.parametrize("given", ["a RedisCluster client", "the rediss:// URL of one node"])
def test_a_redis_cluster_over_tls(
    given: str, tls_cluster: Any, certificates: Certificates, schema: Engine, prefix: str
) -> None:
    """Every node's connections are TLS, those the cache opens itself included: the
    per-node pipelines, a plain client's switch to the cluster when the URL names one node,
    and the near cache's subscription."""
    from redis.cluster import ClusterNode, RedisCluster

    node = tls_cluster.nodes[0]
    if given == "a RedisCluster client":
        client: Any = RedisCluster(
            startup_nodes=[ClusterNode("127.0.0.1", node.tls_port)],
            ssl=True,
            ssl_ca_certs=str(certificates.ca),
            socket_timeout=1.0,
        )
    else:
        client = f"rediss://127.0.0.1:{node.tls_port}/0?ssl_ca_certs={certificates.ca}"
    near = NearCacheOptions(staleness=LASTING)
    reader = _cache(client, prefix, near_cache=near)
    writer = _cache(client, prefix)
    mine, theirs = sessionmaker(schema), sessionmaker(schema)
    reader.install(mine)
    writer.install(theirs)
    try:
        with theirs() as session:
            session.add_all(TlsItem(id=i, name="v1") for i in range(1, 11))
            session.commit()
        for i in range(1, 11):  # rows on every primary
            assert _name(theirs, schema, i) == ("v1", 0)
        assert _name(mine, schema, 2) == ("v1", 0)  # a plain client: switched to the cluster
        _reader_keeps_then_hears(reader, mine, theirs, schema)  # subscribed again, there
        if given == "a RedisCluster client":  # (a URL's first command meets a MOVED)
            assert reader.stats().errors == 0 and writer.stats().errors == 0
    finally:
        reader.close()
        writer.close()


@pytest.fixture
def tls_sentinel_group(certificates: Certificates) -> Iterator[Any]:
    """A Sentinel group (:mod:`stress.sentinel`) whose servers and sentinels also listen on
    TLS ports, replicate and watch each other over them, and name those ports."""
    from stress.sentinel import SentinelGroup

    from _sentinel import require_redis_server

    require_redis_server()
    group = SentinelGroup(tls_args=tls_server_args(certificates))
    try:
        group.start()
    except RuntimeError:
        group.close()
        pytest.skip(f"{group.binary} does not run Sentinel over TLS (built without TLS?)")
    try:
        yield group
    finally:
        group.close()


def _tls_master_for(group: Any, certificates: Certificates, asyncio_client: bool = False) -> Any:
    """``Sentinel(...).master_for(...)`` over TLS, to the sentinels and to the primary, as
    docs/running-redis.md configures it (timeouts, one retry)."""
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError

    from stress.sentinel import SERVICE

    if asyncio_client:
        from redis.asyncio.retry import Retry
        from redis.asyncio.sentinel import Sentinel
    else:
        from redis.retry import Retry  # type: ignore[assignment]
        from redis.sentinel import Sentinel  # type: ignore[assignment]
    tls = {"ssl": True, "ssl_ca_certs": str(certificates.ca)}
    timeouts = {"socket_timeout": 0.5, "socket_connect_timeout": 0.5}
    sentinel = Sentinel(group.addresses, sentinel_kwargs={**tls, **timeouts}, **timeouts)
    return sentinel.master_for(
        SERVICE,
        retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
        retry_on_error=[RedisConnectionError],
        **tls,
        **timeouts,
    )


def test_a_sentinel_group_over_tls(
    tls_sentinel_group: Any, certificates: Certificates, schema: Engine, prefix: str
) -> None:
    """Sentinel over TLS (the sentinels asked over TLS, the primary reached over TLS): reads
    and commits, then a ``SENTINEL FAILOVER``: a process whose connections stay on the old
    primary (not demoted yet, about 10 s) moves to the new one within its epoch check
    interval, as over plain TCP, and reads what another process committed there."""
    group = tls_sentinel_group
    old = group.primary_port()
    assert old is not None
    first = _cache(_tls_master_for(group, certificates), prefix, epoch_check_interval=0.2)
    mine = sessionmaker(schema)
    first.install(mine)
    try:
        with mine() as session:
            session.add(TlsItem(id=1, name="v1"))
            session.commit()
        assert _name(mine, schema) == ("v1", 0)

        group.failover()
        wait_until(lambda: group.primary_port() not in (None, old), "the promotion")
        new = group.primary_port()
        second = _cache(_tls_master_for(group, certificates), prefix)
        theirs = sessionmaker(schema)
        second.install(theirs)
        try:
            with theirs() as session:
                session.get(TlsItem, 1).name = "v2"  # type: ignore[union-attr]
                session.commit()  # on the new primary
            assert group.role(old) == "master"  # not demoted yet: still holds v1
            time.sleep(0.3)  # past the first process's check interval
            assert _name(mine, schema)[0] == "v2"
            assert first.stats().epochs == 1
            pool = first.redis.connection_pool
            conns = pool._available_connections  # type: ignore[attr-defined]
            assert {c.port for c in conns if c._sock} == {new}
            assert all(isinstance(c, SentinelManagedSSLConnection) for c in conns)  # TLS
        finally:
            second.close()
    finally:
        first.close()


def test_an_asyncio_sentinel_client_over_tls(
    tls_sentinel_group: Any, certificates: Certificates, db_url: str, schema: Engine, prefix: str
) -> None:
    """``redis.asyncio``'s Sentinel client over TLS: reads and commits through the cache,
    the near cache's subscriber (a thread with a sync twin of that client) too."""

    async def run() -> None:
        client = _tls_master_for(tls_sentinel_group, certificates, asyncio_client=True)
        try:
            await _asyncio_near_hits(client, db_url, prefix)
        finally:
            await client.aclose()  # the application's client, and its sentinels
            for sentinel in client.connection_pool.sentinel_manager.sentinels:
                await sentinel.aclose()

    asyncio.run(run())


@pytest.mark.cluster
def test_an_asyncio_redis_cluster_over_tls(
    tls_cluster: Any, certificates: Certificates, db_url: str, schema: Engine, prefix: str
) -> None:
    """``redis.asyncio``'s ``RedisCluster`` over TLS: reads and commits through the cache,
    and the near cache's subscriber (a thread with a sync twin of the cluster's node
    options) over TLS too."""
    from redis.asyncio.cluster import ClusterNode, RedisCluster

    async def run() -> None:
        node = tls_cluster.nodes[0]
        client = RedisCluster(
            startup_nodes=[ClusterNode("127.0.0.1", node.tls_port)],
            ssl=True,
            ssl_ca_certs=str(certificates.ca),
            socket_timeout=1.0,
        )
        try:
            await _asyncio_near_hits(client, db_url, prefix)
        finally:
            await client.aclose()

    asyncio.run(run())


def test_aclose_closes_the_tls_connections_of_a_closed_loop(
    tls: TlsServer, engine: Engine, db_url: str, prefix: str
) -> None:
    """``test_asyncio_loops``'s scenario over TLS: the connections of a run whose loop is
    closed are closed from outside it. Over TLS the stream's transport is an SSL transport
    over the socket's own, which must be closed too. (Before: the collector warned of an
    unclosed socket and transport, one file descriptor left open until then.)"""
    from test_asyncio_loops import Base as LoopBase
    from test_asyncio_loops import assert_aclose_leaves_nothing_open

    reset_schema(engine, LoopBase.metadata)
    assert_aclose_leaves_nothing_open(async_url(db_url), tls.url, prefix)
