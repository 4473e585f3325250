"""A Redis that forgets: no entry older than a completed commit is served after Redis goes back
in time (guarantee 8 of docs/consistency.md, and its "Epochs").

Each test runs real throwaway ``redis-server`` processes on loopback ports:

* restart from a snapshot: v1 cached, ``SAVE``, v2 committed and published, the server restarted
  from the RDB file (which holds v1): the cache must not serve v1, in this process (whose
  connections reconnect) or in a new one;
* a different server behind the same address: a loopback proxy switched from one server to
  another that holds an older copy;
* ``REPLICAOF`` on a live connection: the server becomes a replica of a server holding older
  data, then a primary again, while the cache's connections stay open;
* ``FLUSHALL``: nothing old can survive it; the cache notices and goes on.

Each scenario was run with the epoch check switched off (``epoch_check_interval`` huge and the
check disabled) to see v1 served: that is what these tests guard against.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import String
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_writethrough import CachedModel, CacheUnavailableError, WriteThroughCache
from sqlalchemy_writethrough.keys import registry_version_key
from stress.proxy import FaultyProxy
from stress.redis_server import RedisServer, server_binary

from _cache_helpers import entry_key
from _servers import capture_sql, in_ci, reset_schema

pytestmark = pytest.mark.databases("sqlite", "postgresql")


class Base(DeclarativeBase):
    pass


class EpItem(Base, CachedModel):
    __tablename__ = "ep_item"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(40))


@pytest.fixture
def schema(engine: Engine) -> Engine:
    reset_schema(engine, Base.metadata)
    return engine


@pytest.fixture
def servers() -> Iterator[Any]:
    """``servers()``: a started throwaway RedisServer; all closed afterwards."""
    if server_binary() is None:
        if in_ci():
            pytest.fail("[CI] no redis-server binary on PATH", pytrace=False)
        pytest.skip("no redis-server binary on PATH")
    started: list[RedisServer] = []

    def start() -> RedisServer:
        server = RedisServer()
        server.start()
        started.append(server)
        # a replica's first sync would otherwise wait 5 s for more replicas to join
        server.admin().config_set("repl-diskless-sync-delay", 0)
        return server

    yield start
    for server in started:
        server.close()


def _cache(url: str, **kw: Any) -> WriteThroughCache:
    return WriteThroughCache(url, prefix="ep", socket_timeout=2, **kw)


def _commit_name(factory: sessionmaker[Session], name: str) -> None:
    with factory() as session:
        item = session.get(EpItem, 1)
        if item is None:
            session.add(EpItem(id=1, name=name))
        else:
            item.name = name
        session.commit()


def _read(factory: sessionmaker[Session], engine: Engine) -> tuple[str, int]:
    """(the name a get returns, how many SQL statements it sent)."""
    with factory() as session, capture_sql(engine) as sql:
        item = session.get(EpItem, 1)
        assert item is not None
        return item.name, len(sql)


def _installed(cache: WriteThroughCache, engine: Engine) -> sessionmaker[Session]:
    factory = sessionmaker(engine)
    cache.install(factory)
    return factory


def test_restart_from_an_older_snapshot_serves_no_old_value(
    servers: Any, schema: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    server: RedisServer = servers()
    cache = _cache(server.url)
    factory = _installed(cache, schema)
    _commit_name(factory, "v1")
    assert _read(factory, schema) == ("v1", 0)  # served from Redis
    server.admin().save()  # the snapshot holds v1
    _commit_name(factory, "v2")
    assert _read(factory, schema) == ("v2", 0)  # Redis acknowledged v2

    server.restart()  # SHUTDOWN NOSAVE, then start from the RDB file: v1 is back in Redis
    raw = server.admin().get(entry_key(cache, EpItem, 1))
    assert raw is not None and b"v1" in raw, "the restart must restore the old entry"

    with caplog.at_level(logging.WARNING, logger="sqlalchemy_writethrough"):
        name, statements = _read(factory, schema)
    assert (name, statements) == ("v2", 1)  # from the database, not the restored v1
    assert any("new epoch" in r.getMessage() for r in caplog.records)
    assert cache.stats().epochs == 1
    assert _read(factory, schema) == ("v2", 0)  # filled again, served again

    # a process started after the restart never saw v1 either
    fresh = _cache(server.url)
    assert _read(_installed(fresh, schema), schema) == ("v2", 0)


def test_a_new_process_after_the_restart_is_protected_too(servers: Any, schema: Engine) -> None:
    """The process that saw v1 is gone; the first process to connect starts the epoch."""
    server: RedisServer = servers()
    writer = _cache(server.url)
    factory = _installed(writer, schema)
    _commit_name(factory, "v1")
    server.admin().save()
    _commit_name(factory, "v2")
    server.restart()

    reader = _cache(server.url)
    reader_factory = _installed(reader, schema)
    assert _read(reader_factory, schema) == ("v2", 1)
    assert reader.stats().epochs == 1


def test_another_server_behind_the_same_address(servers: Any, schema: Engine) -> None:
    old: RedisServer = servers()
    new: RedisServer = servers()
    proxy = FaultyProxy(old.port)
    try:
        cache = _cache(proxy.url)
        factory = _installed(cache, schema)
        new.admin().replicaof("127.0.0.1", old.port)  # before the cache's first check
        _wait_for(lambda: new.admin().info("replication")["master_link_status"] == "up")
        _commit_name(factory, "v1")
        # the other server holds a copy of this data set (v1), and keeps it
        _wait_for(lambda: new.admin().get(entry_key(cache, EpItem, 1)) is not None)
        new.admin().replicaof("NO", "ONE")
        _commit_name(factory, "v2")
        assert _read(factory, schema) == ("v2", 0)

        proxy.upstream_port = new.port  # same address, another server holding v1
        proxy.kill_connections()
        assert _read(factory, schema) == ("v2", 1)
        assert _read(factory, schema) == ("v2", 0)
    finally:
        proxy.close()


def test_replicaof_on_open_connections(servers: Any, schema: Engine) -> None:
    """The server the cache talks to becomes a replica of a server holding v1, then a primary
    again; the cache's connections stay open all along."""
    ours: RedisServer = servers()
    stale: RedisServer = servers()
    # (a primary takes a new replication id when its first replica attaches: attach it before
    # the cache first looks, or that too would start an epoch)
    stale.admin().replicaof("127.0.0.1", ours.port)
    _wait_for(lambda: stale.admin().info("replication")["master_link_status"] == "up")
    cache = _cache(ours.url, epoch_check_interval=0.05)
    factory = _installed(cache, schema)
    _commit_name(factory, "v1")
    key = entry_key(cache, EpItem, 1)
    _wait_for(lambda: stale.admin().get(key) is not None)
    stale.admin().replicaof("NO", "ONE")  # stale now holds v1 for good
    _commit_name(factory, "v2")
    assert _read(factory, schema) == ("v2", 0)

    ours.admin().replicaof("127.0.0.1", stale.port)  # ours now holds v1, as a replica
    _wait_for(lambda: b"v1" in (ours.admin().get(key) or b""))
    time.sleep(0.1)  # past the interval: the open connection is checked again
    assert _read(factory, schema) == ("v2", 1)  # a replica is not used

    ours.admin().replicaof("NO", "ONE")  # a primary again, holding v1
    time.sleep(0.1)
    # never v1; served from Redis again once the breaker (opened by the refusals of the
    # replica) has closed and the new epoch is set
    reads = [_read(factory, schema)]
    while reads[-1][1] and len(reads) < 50:
        time.sleep(0.05)
        reads.append(_read(factory, schema))
    assert {name for name, _ in reads} == {"v2"}
    assert reads[-1] == ("v2", 0)
    assert cache.stats().epochs == 1


def test_strict_mode_refuses_writes_while_the_epoch_cannot_be_checked(
    servers: Any, schema: Engine
) -> None:
    primary: RedisServer = servers()
    replica: RedisServer = servers()
    replica.admin().replicaof("127.0.0.1", primary.port)
    cache = _cache(replica.url, on_redis_error="strict")
    factory = _installed(cache, schema)
    with factory() as session:
        session.add(EpItem(id=1, name="v1"))
        with pytest.raises(CacheUnavailableError, match="not a primary"):
            session.commit()


def test_flushall_is_noticed_and_harmless(servers: Any, schema: Engine) -> None:
    server: RedisServer = servers()
    cache = _cache(server.url, epoch_check_interval=0.05)
    factory = _installed(cache, schema)
    _commit_name(factory, "v1")
    assert _read(factory, schema) == ("v1", 0)
    server.admin().flushall()
    time.sleep(0.1)
    assert _read(factory, schema) == ("v1", 1)
    assert cache.stats().epochs == 1
    _commit_name(factory, "v2")  # the registry is written again with the next entry
    assert server.admin().hkeys("ep:registry")
    assert _read(factory, schema) == ("v2", 0)


def test_the_epoch_check_costs_nothing_per_command(servers: Any, schema: Engine) -> None:
    """One check per connection: a thousand cached reads send no more epoch scripts."""
    server: RedisServer = servers()
    client = redis.Redis.from_url(server.url, socket_timeout=1)
    try:
        cache = WriteThroughCache(client, prefix="ep")
        factory = _installed(cache, schema)
        _commit_name(factory, "v1")
        before = _evalsha_calls(client)
        for _ in range(1000):
            with factory() as session:
                session.get(EpItem, 1)
        # the hits are MGETs: at most a few scripts (interval checks), not one per read
        assert _evalsha_calls(client) - before < 20
    finally:
        client.close()


def _evalsha_calls(client: redis.Redis) -> int:
    stats: dict[str, Any] = client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def _wait_for(condition: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.02)


def test_a_switch_back_to_a_server_that_kept_its_own_older_data(
    servers: Any, schema: Engine
) -> None:
    """The address moves from A to B and back to A, which ran all along, unreached, holding
    v1 under an epoch key naming itself. Nothing about A changed, but this process used another
    epoch since A's: it starts a new one on A (as a process late from a failover does)."""
    a: RedisServer = servers()
    b: RedisServer = servers()
    proxy = FaultyProxy(a.port)
    try:
        cache = _cache(proxy.url)
        factory = _installed(cache, schema)
        _commit_name(factory, "v1")
        assert _read(factory, schema) == ("v1", 0)  # A holds v1

        proxy.upstream_port = b.port
        proxy.kill_connections()
        _commit_name(factory, "v2")
        assert _read(factory, schema) == ("v2", 0)  # B: a new epoch, then v2

        proxy.upstream_port = a.port  # back to A, which still holds v1
        proxy.kill_connections()
        assert _read(factory, schema) == ("v2", 1)
    finally:
        proxy.close()


def test_a_snapshot_taken_between_a_flushall_and_its_notice(servers: Any, schema: Engine) -> None:
    """``FLUSHALL`` empties the keyspace registry too. A lease records its keyspace again, in
    its own round trip but not atomically with it: a ``FLUSHALL`` between the two (modelled
    here by deleting the registry after the fill) leaves an entry and no registry until the
    process notices the flush (at its next interval check). A snapshot taken then holds an
    entry and no registry: a restart from it must still not serve that entry. (Before every
    lease recorded its keyspace, any fill in that moment did this.)"""
    server: RedisServer = servers()
    cache = _cache(server.url, epoch_check_interval=30)
    factory = _installed(cache, schema)
    _commit_name(factory, "v1")
    assert _read(factory, schema) == ("v1", 0)
    server.admin().flushall()
    assert _read(factory, schema) == ("v1", 1)  # a miss, filled again
    assert _read(factory, schema) == ("v1", 0)
    assert server.admin().hkeys("ep:registry")  # recorded again with the lease
    server.admin().delete("ep:registry", registry_version_key("ep"))
    server.admin().save()  # v1 cached, no registry
    _commit_name(factory, "v2")  # went by a registry that was not whole: makes it whole
    assert _read(factory, schema) == ("v2", 1)  # which replaced the generation v2 went under
    assert _read(factory, schema) == ("v2", 0)

    server.restart()  # from the snapshot: v1 is back, under its generation
    assert _read(factory, schema) == ("v2", 1)


def test_processes_that_arrive_at_a_new_epoch_do_not_keep_replacing_each_other(
    servers: Any, schema: Engine
) -> None:
    """After a restart the first process starts the epoch and a second one, which saw the
    server before it, replaces the generations once more: it cannot tell the restart from a
    failover it arrived late at. The first then finds a new token under the same server
    identity, and must not take it for another late arrival: the two used to replace each
    other's generations at every check, forever, and the cache stayed cold."""
    server: RedisServer = servers()
    caches = [_cache(server.url, epoch_check_interval=0.05) for _ in range(2)]
    factories = [_installed(cache, schema) for cache in caches]
    _commit_name(factories[0], "v1")
    for factory in factories:
        assert _read(factory, schema) == ("v1", 0)
    server.restart()

    statements = []
    for _ in range(12):
        time.sleep(0.06)  # every connection is due for its check again
        statements.append(sum(_read(factory, schema)[1] for factory in factories))
    assert statements[4:] == [0] * 8, statements


class EpOther(Base, CachedModel):
    """A model only the second process of the test below uses."""

    __tablename__ = "ep_other"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(40))


def test_a_snapshot_taken_while_the_registry_was_evicted(servers: Any, schema: Engine) -> None:
    """An ``allkeys-*`` policy may evict the keyspace registry alone, entries staying. A
    snapshot taken before the registry is whole again holds entries of a keyspace it does not
    list. The process that starts the epoch after a restart from it replaces the generations
    of the listed keyspaces, of its own, and (the registry not being whole) of every
    generation key on the server, found by SCAN: a process started after the restart that
    reads the other keyspace first is not served the snapshot's entry. (Before: it was, until
    a process that used that keyspace before the restart arrived, or the entry's TTL.)"""
    server: RedisServer = servers()
    first = _installed(_cache(server.url, epoch_check_interval=30), schema)
    other = _installed(_cache(server.url, epoch_check_interval=30), schema)
    _commit_name(first, "v1")
    assert _read(first, schema) == ("v1", 0)
    with other() as session:
        session.add(EpOther(id=1, name="o1"))
        session.commit()

    def read_other() -> tuple[str, int]:
        with other() as session, capture_sql(schema) as sql:
            row = session.get(EpOther, 1)
            assert row is not None
            return row.name, len(sql)

    assert read_other() == ("o1", 0)
    server.admin().delete("ep:registry")  # evicted (allkeys-random, allkeys-lru...)
    server.admin().save()  # o1 cached, a registry without its keyspace
    with other() as session:
        row = session.get(EpOther, 1)
        assert row is not None
        row.name = "o2"
        session.commit()  # its lock's reply: the registry is not whole; it makes it whole
    assert read_other() == ("o2", 1)  # which replaced o2's bucket too
    assert read_other() == ("o2", 0)

    server.restart()  # from the snapshot: o1 is back, under its generation
    assert _read(first, schema) == ("v1", 1)  # starts the epoch: its own keyspace, listed ones
    newcomer = _installed(_cache(server.url, epoch_check_interval=30), schema)

    def read_newcomer() -> tuple[str, int]:
        with newcomer() as session, capture_sql(schema) as sql:
            row = session.get(EpOther, 1)
            assert row is not None
            return row.name, len(sql)

    assert read_newcomer() == ("o2", 1)  # not the snapshot's o1
    assert read_newcomer() == ("o2", 0)
