"""A commit's publish goes on the connection its flush's lock used (round 7 of issue #15).

Inside ``commit()``, the lock's connection stays checked out from the lock's reply (after the
flush's SQL) to the publish after COMMIT: one pool checkout and one release fewer a commit.
These tests observe redis-py's pool through a subclass that counts checkouts and releases,
and what Redis holds: the connection goes back on every path (publish, rollback, a failed
flush or COMMIT, the breaker, a broken connection, a collected handle, a fork), is never
left checked out, and the entries are what the protocol says (never the older value).
"""

from __future__ import annotations

import functools
import gc
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import String, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from sqlalchemy_writethrough import CachedModel, WriteThroughCache
from sqlalchemy_writethrough.redis_sync import SyncTransport

from _cache_helpers import cached_values, entry_key, entry_state
from _servers import COUNTED, reset_schema


class Base(DeclarativeBase):
    pass


class CcRow(Base, CachedModel):
    __tablename__ = "cc_row"

    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(50))


class CountingPool(redis.ConnectionPool):
    """redis-py's pool, counting checkouts and releases (and so the connections out)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.checkouts = 0
        self.releases = 0
        self.checked_out: set[Any] = set()

    # redis-py's own signature (a command name is required before 5.3, deprecated after),
    # which the transport reads to call it
    @functools.wraps(redis.ConnectionPool.get_connection)
    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        conn = super().get_connection(*args, **kwargs)
        self.checkouts += 1
        self.checked_out.add(conn)
        return conn

    def release(self, connection: Any) -> None:
        self.releases += 1
        self.checked_out.discard(connection)
        super().release(connection)

    @property
    def out(self) -> int:
        return self.checkouts - self.releases


@pytest.fixture
def pool(redis_url: str) -> Iterator[CountingPool]:
    made = CountingPool.from_url(redis_url, socket_timeout=5)
    assert isinstance(made, CountingPool)
    yield made
    made.disconnect()


@pytest.fixture
def cache(pool: CountingPool, prefix: str) -> Iterator[WriteThroughCache]:
    made = WriteThroughCache(redis.Redis(connection_pool=pool), prefix=prefix, **COUNTED)
    yield made
    made.close()


@pytest.fixture
def maker(engine: Engine, cache: WriteThroughCache) -> sessionmaker[Session]:
    reset_schema(engine, Base.metadata)
    factory = sessionmaker(engine)
    cache.install(factory)
    with factory() as s:
        s.add(CcRow(id=1, name="one"))
        s.commit()
    return factory


def _transport(cache: WriteThroughCache) -> SyncTransport:
    transport = cache._backend.transport
    assert isinstance(transport, SyncTransport)
    return transport


def _holds(cache: WriteThroughCache) -> None:
    # the precondition of every test here: this client's locks overlap the flush, and so
    # their connection can be kept for the publish
    assert _transport(cache).holds


@pytest.mark.databases("sqlite", "postgresql")
def test_a_one_row_commit_checks_out_one_connection(
    maker: sessionmaker[Session], pool: CountingPool, cache: WriteThroughCache, redis_client: Any
) -> None:
    _holds(cache)
    with maker() as s:
        row = s.get(CcRow, 1)
        assert row is not None
        row.name = "two"
        before = pool.checkouts
        s.commit()
        # the lock (sent at the flush) and the publish share one checkout (two before)
        assert pool.checkouts - before == 1
        assert pool.out == 0
    key = entry_key(cache, CcRow, 1)
    assert entry_state(redis_client, key) == "value"
    assert cached_values(cache, redis_client, CcRow, 1, dialect=s.bind.dialect)["name"] == "two"  # type: ignore[union-attr,index]


@pytest.mark.databases("sqlite")
def test_a_flush_outside_commit_keeps_nothing(
    maker: sessionmaker[Session], pool: CountingPool, cache: WriteThroughCache
) -> None:
    with maker() as s:
        row = s.get(CcRow, 1)
        assert row is not None
        row.name = "two"
        s.flush()
        assert pool.out == 0
        s.commit()
        assert pool.out == 0


@pytest.mark.databases("sqlite")
def test_a_failed_commit_gives_the_connection_back(
    maker: sessionmaker[Session], pool: CountingPool, cache: WriteThroughCache, redis_client: Any
) -> None:
    engine = maker.kw["bind"]
    failing = [True]

    def fail(conn: Any) -> None:
        if failing[0]:
            raise RuntimeError("COMMIT failed")

    event.listen(engine, "commit", fail)
    try:
        # the session ends its transaction as the application says: rollback(), close(),
        # or, when it does neither, its collection (the connection waits for a checkout)
        for end in ("rollback", "close", "drop"):
            s = maker()
            row = s.get(CcRow, 1)
            assert row is not None
            row.name = "never"
            with pytest.raises(RuntimeError):
                s.commit()
            if end == "rollback":
                s.rollback()
                assert pool.out == 0
                s.close()
            elif end == "close":
                s.close()
                assert pool.out == 0
            else:
                del s, row
                gc.collect()
                cache._backend.transport.command("PING")
                assert pool.out == 0
    finally:
        failing[0] = False
        event.remove(engine, "commit", fail)
    assert pool.out == 0
    # the rollback restored the entry (or left a miss): never the uncommitted value
    values = cached_values(cache, redis_client, CcRow, 1, dialect=engine.dialect)
    assert values is None or values["name"] == "one"


@pytest.mark.databases("sqlite")
def test_a_failed_flush_inside_commit_gives_the_connection_back(
    maker: sessionmaker[Session], pool: CountingPool, cache: WriteThroughCache
) -> None:
    with maker() as s:
        row = s.get(CcRow, 1)
        assert row is not None
        row.name = "x"
        s.add(CcRow(id=1, name="duplicate"))  # the flush fails (identity conflict or INSERT)
        with pytest.raises(Exception):  # noqa: B017 - whichever the ORM raises
            s.commit()
        s.rollback()
    assert pool.out == 0


@pytest.mark.databases("sqlite")
def test_the_breaker_open_at_publish_gives_the_connection_back(
    maker: sessionmaker[Session], pool: CountingPool, cache: WriteThroughCache, redis_client: Any
) -> None:
    engine = maker.kw["bind"]
    breaker = cache._backend.breaker

    def trip(conn: Any) -> None:  # after the lock's reply, before COMMIT
        for _ in range(50):
            breaker.failure()
        assert breaker.is_open

    event.listen(engine, "commit", trip)
    try:
        with maker() as s:
            row = s.get(CcRow, 1)
            assert row is not None
            row.name = "two"
            s.commit()
            assert pool.out == 0
    finally:
        event.remove(engine, "commit", trip)
    # no publish: the entry still holds the lock (a miss for readers), never "one"
    assert entry_state(redis_client, entry_key(cache, CcRow, 1)) == "lock"


@pytest.mark.databases("sqlite")
def test_a_connection_killed_before_the_publish(
    maker: sessionmaker[Session],
    pool: CountingPool,
    cache: WriteThroughCache,
    redis_client: Any,
    redis_url: str,
) -> None:
    engine = maker.kw["bind"]
    admin = redis.Redis.from_url(redis_url)

    def kill(conn: Any) -> None:  # the held connection dies between the lock and the publish
        killed = 0
        for held in list(pool.checked_out):  # only this test's connections (a shared server)
            host, port = held._sock.getsockname()[:2]
            admin.client_kill(f"{host}:{port}")
            killed += 1
        assert killed == 1

    event.listen(engine, "commit", kill)
    try:
        with maker() as s:
            row = s.get(CcRow, 1)
            assert row is not None
            row.name = "two"
            s.commit()
            assert pool.out == 0
    finally:
        event.remove(engine, "commit", kill)
        admin.close()
    # redis-py's retry reconnected and published, or the publish failed and the lock stays:
    # never the value before the commit
    state = entry_state(redis_client, entry_key(cache, CcRow, 1))
    if state == "value":
        values = cached_values(cache, redis_client, CcRow, 1, dialect=engine.dialect)
        assert values is not None and values["name"] == "two"
    else:
        assert state in ("lock", None)


@pytest.mark.databases("sqlite")
def test_background_publish_does_not_hold(engine: Engine, pool: CountingPool, prefix: str) -> None:
    reset_schema(engine, Base.metadata)
    cache = WriteThroughCache(
        redis.Redis(connection_pool=pool), prefix=prefix, publish="background", **COUNTED
    )
    try:
        factory = sessionmaker(engine)
        cache.install(factory)
        with factory() as s:
            s.add(CcRow(id=1, name="one"))
            s.commit()
        with factory() as s:
            row = s.get(CcRow, 1)
            assert row is not None
            row.name = "two"
            s.commit()
        assert cache.flush_publishes(5.0)
    finally:
        cache.close()
    assert pool.out == 0


# -- the transport's handle, directly -------------------------------------------------------


def test_a_collected_handle_goes_back_to_the_pool(pool: CountingPool) -> None:
    transport = SyncTransport(redis.Redis(connection_pool=pool), "test")
    assert transport.holds
    handle = transport.begin(["PING"])
    assert transport.complete(handle, hold=True) in (b"PONG", True, "PONG")
    assert pool.out == 1
    del handle
    gc.collect()
    assert pool.out == 1  # never released from inside the collector
    assert transport.command("PING")
    assert pool.out == 0  # given back at the next checkout


def test_a_collected_unread_handle_is_closed_then_given_back(pool: CountingPool) -> None:
    transport = SyncTransport(redis.Redis(connection_pool=pool), "test")
    handle = transport.begin(["PING"])  # its reply never read
    conn = handle.connection
    del handle
    gc.collect()
    assert transport.command("ECHO", "after") == b"after"  # not the unread PONG
    assert pool.out == 0
    assert conn._sock is None or conn in pool._available_connections


def test_a_held_connection_runs_one_command_then_goes_back(pool: CountingPool) -> None:
    transport = SyncTransport(redis.Redis(connection_pool=pool), "test")
    handle = transport.begin(["ECHO", "lock"])
    assert transport.complete(handle, hold=True) == b"lock"
    checkouts = pool.checkouts
    assert transport.command_on(handle, "ECHO", "publish") == b"publish"
    assert pool.checkouts == checkouts  # on the held connection
    assert pool.out == 0
    transport.let_go(handle)  # nothing held any more: no double release
    assert pool.out == 0
    assert transport.command_on(handle, "ECHO", "again") == b"again"  # a checkout of its own
    assert pool.out == 0


def test_a_handle_is_never_used_in_a_forked_child(pool: CountingPool) -> None:
    if not hasattr(os, "fork"):
        pytest.skip("no fork")
    transport = SyncTransport(redis.Redis(connection_pool=pool), "test")
    handle = transport.begin(["ECHO", "parent"])
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: the parent's connection is neither read, used nor released
        code = 1
        try:
            ok = handle.take() is None
            ok = ok and transport.command_on(handle, "ECHO", "child") == b"child"
            os.write(write, b"ok" if ok else b"no")
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    assert os.read(read, 2) == b"ok" and status == 0
    os.close(read)
    # the parent's reply is intact: the child read nothing from the shared socket
    assert transport.complete(handle, hold=True) == b"parent"
    transport.let_go(handle)
    assert pool.out == 0


def test_threads_each_commit_on_their_own_connection(
    maker: sessionmaker[Session], pool: CountingPool, cache: WriteThroughCache, redis_client: Any
) -> None:
    with maker() as s:
        s.add_all([CcRow(id=i, name="start") for i in range(2, 6)])
        s.commit()
    errors: list[BaseException] = []

    def work(pk: int) -> None:
        try:
            for n in range(20):
                with maker() as s:
                    row = s.get(CcRow, pk)
                    assert row is not None
                    row.name = f"{pk}-{n}"
                    s.commit()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(pk,)) for pk in range(2, 6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert pool.out == 0
    engine = maker.kw["bind"]
    for pk in range(2, 6):
        values = cached_values(cache, redis_client, CcRow, pk, dialect=engine.dialect)
        assert values is not None and values["name"] == f"{pk}-19"
