"""The least-privilege ACL documented in docs/running-redis.md is enough for everything the
cache does, and a user without it gets a warning that names the missing permission.

A throwaway ``redis-server`` (ACLs are per server; the shared one is left alone).
"""

from __future__ import annotations

import logging

import pytest
from sqlalchemy import String, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from sqlalchemy_writethrough import CachedModel, WriteThroughCache, from_cache
from stress.redis_server import RedisServer

from _servers import capture_sql, counting_redis, reset_schema

pytestmark = pytest.mark.databases("sqlite")

#: the rules docs/running-redis.md gives, for prefix "shop"
LEAST_PRIVILEGE = "~shop:* -@all +evalsha +script|load +mget +hset +hkeys +scan +unlink +ping +info"
#: what the scripts run inside Redis (run with the caller's permissions)
SCRIPT_COMMANDS = "+get +set +del +pttl +time +hget +hgetall +hdel"


class Base(DeclarativeBase):
    pass


class AclItem(Base, CachedModel):
    __tablename__ = "acl_item"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(40))


def _exercise(cache: WriteThroughCache, engine: Engine) -> list[int]:
    """Commit, read (hit and miss), roll back, invalidate, clear: SQL counts of the reads."""
    reset_schema(engine, Base.metadata)
    factory = sessionmaker(engine)
    cache.install(factory)
    counts = []
    try:
        with factory() as session:
            session.add_all([AclItem(id=1, name="a"), AclItem(id=2, name="b")])
            session.commit()
        with factory() as session, capture_sql(engine) as sql:
            session.get(AclItem, 1)
        counts.append(len(sql))
        with factory() as session:
            item = session.get(AclItem, 1)
            assert item is not None
            item.name = "rolled back"
            session.flush()
            session.rollback()
        cache.invalidate(AclItem, 2)
        cache.invalidate(AclItem)
        with factory() as session, capture_sql(engine) as sql:
            session.get(AclItem, 1)  # a miss and a fill
        with factory() as session, capture_sql(engine) as sql:
            session.get(AclItem, 1)
        counts.append(len(sql))
        cache.clear()
    finally:
        cache.uninstall(factory)
        cache.redis.close()
    return counts


def test_the_documented_acl_is_enough(server: RedisServer, engine: Engine) -> None:
    admin = server.admin()
    admin.acl_setuser(
        "shop", enabled=True, passwords=["+s3cret"], reset=True,
    )  # fmt: skip
    admin.execute_command("ACL", "SETUSER", "shop", *f"{LEAST_PRIVILEGE} {SCRIPT_COMMANDS}".split())
    cache = WriteThroughCache(f"redis://shop:s3cret@127.0.0.1:{server.port}/0", prefix="shop")
    assert _exercise(cache, engine) == [0, 0]
    assert cache.stats().errors == 0


def test_a_missing_permission_is_named(
    server: RedisServer, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    admin = server.admin()
    admin.acl_setuser("shop", enabled=True, passwords=["+s3cret"], reset=True)
    # everything but INFO, which the epoch check runs inside its script
    rules = f"{LEAST_PRIVILEGE} {SCRIPT_COMMANDS}".replace("+info ", "")
    admin.execute_command("ACL", "SETUSER", "shop", *rules.split())
    cache = WriteThroughCache(f"redis://shop:s3cret@127.0.0.1:{server.port}/0", prefix="shop")
    with caplog.at_level(logging.WARNING, logger="sqlalchemy_writethrough"):
        _exercise(cache, engine)  # never raises: the database serves everything
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("permission" in m and "INFO" in m for m in warnings), warnings


def test_a_refused_registration_caches_nothing(
    server: RedisServer, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """Without HSET the keyspace registry cannot record this keyspace: a commit of another
    code version (a rolling deploy) could not find, so could not invalidate, an entry of it.
    Reads and commits then leave misses, never entries, and the database serves every read;
    the warning says why."""
    admin = server.admin()
    admin.acl_setuser("shop", enabled=True, passwords=["+s3cret"], reset=True)
    rules = f"{LEAST_PRIVILEGE} {SCRIPT_COMMANDS}".replace("+hset ", "")
    admin.execute_command("ACL", "SETUSER", "shop", *rules.split())
    cache = WriteThroughCache(f"redis://shop:s3cret@127.0.0.1:{server.port}/0", prefix="shop")
    reset_schema(engine, Base.metadata)
    factory = sessionmaker(engine)
    cache.install(factory)

    def values() -> list[bytes]:
        return [k for k in admin.scan_iter("shop:*") if (admin.get(k) or b"").startswith(b"V")]

    try:
        with caplog.at_level(logging.WARNING, logger="sqlalchemy_writethrough"):
            with factory() as session:
                session.add_all([AclItem(id=1, name="a"), AclItem(id=2, name="b")])
                session.commit()
            with factory() as session:
                item = session.get(AclItem, 1)  # a miss: no entry may be filled
                assert item is not None and item.name == "a"
                assert values() == []
                item.name = "changed"
                session.commit()  # its publish may not write an entry either
            assert values() == []
            with factory() as session:
                rows = session.scalars(
                    select(AclItem).where(AclItem.id.in_([1, 2])).options(from_cache())
                ).all()
                assert sorted(r.name for r in rows) == ["b", "changed"]
            assert values() == []
            for _ in range(2):
                with factory() as session, capture_sql(engine) as sql:
                    assert session.get(AclItem, 1).name == "changed"  # type: ignore[union-attr]
                assert len(sql) == 1  # the database, every time
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert any("registry" in m for m in warnings), warnings
    finally:
        cache.uninstall(factory)
        cache.redis.close()


def test_a_refused_registration_does_not_hold_commits_up(
    server: RedisServer, engine: Engine
) -> None:
    """Without HSET, the registry recovery's first step took its lease (SET) and then failed
    (HSET): the lease stayed, and each later commit of any process waited for it to expire,
    asking again and again (10 s and a few hundred round trips a commit). The step now takes
    the lease last, and a process's own lease never holds it up: a commit costs a handful
    of round trips."""
    admin = server.admin()
    admin.acl_setuser("shop", enabled=True, passwords=["+s3cret"], reset=True)
    rules = f"{LEAST_PRIVILEGE} {SCRIPT_COMMANDS}".replace("+hset ", "")
    admin.execute_command("ACL", "SETUSER", "shop", *rules.split())
    client, counter = counting_redis(
        f"redis://shop:s3cret@127.0.0.1:{server.port}/0", socket_timeout=5
    )
    # two processes' caches (each its own token in the recovery's lease)
    caches = [WriteThroughCache(client, prefix="shop", stats_interval=None) for _ in range(2)]
    reset_schema(engine, Base.metadata)
    factories = [sessionmaker(engine), sessionmaker(engine)]
    for cache, factory in zip(caches, factories, strict=True):
        cache.install(factory)
    trips = []
    try:
        for i in range(6):
            counter.reset()
            with factories[i % 2]() as session:
                session.add(AclItem(id=i + 1, name="a"))
                session.commit()
            trips.append(counter.count)
        # the first commit of each loads the scripts and reads the registry
        assert max(trips[2:]) <= 5, (trips, counter.names)
    finally:
        for cache, factory in zip(caches, factories, strict=True):
            cache.uninstall(factory)
        client.close()
